// A minimal test harness for the torch-free C++ tests (no GoogleTest: the build must
// work offline on machines that only have a compiler and CMake).
//
//   PROSG_TEST(suite_name) { PROSG_EXPECT(cond) << "context"; PROSG_EXPECT_NEAR(a, b, tol); }
//
// The executable runs every test, or those named on the command line, and exits
// non-zero when one failed. `--ctest-file FILE EXE` writes one add_test() per test
// case so that CTest lists and reports each case on its own (see CMakeLists.txt).
#pragma once

#include <cmath>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace prosg::testing {

struct TestCase {
  const char* name;
  void (*fn)();
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

inline int& failures() {
  static int n = 0;
  return n;
}

// Failures printed in the current test case (the rest are only counted).
inline int& printed() {
  static int n = 0;
  return n;
}

struct Registrar {
  Registrar(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

// Collects the message streamed after a failed expectation and prints it with the
// location when the statement ends.
class Failure {
 public:
  Failure(const char* file, int line, const std::string& what) {
    ++failures();
    msg_ << file << ":" << line << ": FAILED " << what;
  }
  // A broken loop over 100k steps would print 100k lines: show the first few only.
  ~Failure() {
    ++printed();
    if (printed() <= 20) std::cerr << msg_.str() << "\n";
    if (printed() == 21) std::cerr << "(further failures of this test are counted, not printed)\n";
  }
  template <typename T>
  Failure& operator<<(const T& v) {
    msg_ << " " << v;
    return *this;
  }

 private:
  std::ostringstream msg_;
};

// |a - b| <= atol + rtol * |b|, with NaN never near anything.
inline bool near(double a, double b, double atol, double rtol) {
  if (std::isnan(a) || std::isnan(b)) return false;
  return std::fabs(a - b) <= atol + rtol * std::fabs(b);
}

inline std::string describe_near(double a, double b, double atol, double rtol) {
  std::ostringstream s;
  s.precision(17);
  s << "got " << a << " expected " << b << " (|diff| " << std::fabs(a - b) << ", atol " << atol << ", rtol "
    << rtol << ")";
  return s.str();
}

inline int run_main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "--ctest-file") == 0) {
    std::ofstream out(argv[2]);
    for (const auto& t : registry())
      out << "add_test([=[" << t.name << "]=] [=[" << argv[3] << "]=] [=[" << t.name << "]=])\n";
    return out.good() ? 0 : 1;
  }
  if (argc == 2 && std::strcmp(argv[1], "--list") == 0) {
    for (const auto& t : registry()) std::cout << t.name << "\n";
    return 0;
  }
  int ran = 0, failed = 0;
  for (const auto& t : registry()) {
    bool selected = argc == 1;
    for (int i = 1; i < argc; ++i) selected = selected || std::strcmp(argv[i], t.name) == 0;
    if (!selected) continue;
    const int before = failures();
    printed() = 0;
    t.fn();
    ++ran;
    const bool ok = failures() == before;
    failed += ok ? 0 : 1;
    std::cout << (ok ? "[  OK  ] " : "[ FAIL ] ") << t.name << std::endl;
  }
  if (ran == 0) {
    std::cerr << "no test matched the given names (use --list)\n";
    return 2;
  }
  std::cout << (ran - failed) << " passed, " << failed << " failed" << std::endl;
  return failed == 0 ? 0 : 1;
}

}  // namespace prosg::testing

#define PROSG_TEST(name)                                                           \
  static void prosg_test_##name();                                                 \
  static ::prosg::testing::Registrar prosg_registrar_##name(#name, prosg_test_##name); \
  static void prosg_test_##name()

// Streams extra context after the macro: PROSG_EXPECT(x > 0) << "x =" << x;
#define PROSG_EXPECT(cond) \
  if (cond) {              \
  } else                   \
    ::prosg::testing::Failure(__FILE__, __LINE__, "PROSG_EXPECT(" #cond ")")

#define PROSG_EXPECT_NEAR(a, b, atol, rtol)                                                               \
  if (double prosg_a_ = static_cast<double>(a), prosg_b_ = static_cast<double>(b);                        \
      ::prosg::testing::near(prosg_a_, prosg_b_, (atol), (rtol))) {                                       \
  } else                                                                                                  \
    ::prosg::testing::Failure(__FILE__, __LINE__,                                                         \
                              std::string(#a " ~ " #b ": ") +                                             \
                                  ::prosg::testing::describe_near(prosg_a_, prosg_b_, (atol), (rtol)))

#define PROSG_TEST_MAIN() \
  int main(int argc, char** argv) { return ::prosg::testing::run_main(argc, argv); }

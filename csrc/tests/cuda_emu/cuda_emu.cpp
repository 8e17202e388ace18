// Runtime of the CPU execution of the CUDA kernels (cuda_emu.h): launch checks, the
// block scheduler over fibers, barriers, lane exchange, device properties and the
// error state.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_EMU_ASAN 1
#endif
#endif

#if defined(CUDA_EMU_ASAN)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
}
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// The bounds of the static __shared__ section (cuda_emu.h); weak: a program whose
// kernels declare no shared memory has no such section.
extern "C" char __start_cuda_emu_shared[] __attribute__((weak));
extern "C" char __stop_cuda_emu_shared[] __attribute__((weak));

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace cuda_emu {
namespace {

struct ThreadContext {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};

// ---- Fibers -------------------------------------------------------------------------
// A context switch saves the callee-saved registers on the old stack and loads the
// new stack pointer. Hand-written on x86-64 (ucontext's swapcontext makes a signal
// mask system call per switch, and a warp shuffle costs two switches per lane);
// ucontext elsewhere.
#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
extern "C" void cuda_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch

  .p2align 4
  .globl cuda_emu_trampoline
  .type cuda_emu_trampoline, @function
cuda_emu_trampoline:
  movq %r12, %rdi
  subq $8, %rsp
  call cuda_emu_fiber_main@PLT
  ud2
  .size cuda_emu_trampoline, .-cuda_emu_trampoline
)");
#endif

enum class Wait { kReady, kBlock, kWarp, kDone };

struct Fiber {
  char* stack = nullptr;  // lowest usable address (a guard page lies below)
  size_t stack_size = 0;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  bool started = false;
  bool abandoned = false;  // left suspended by a failed launch
  Wait wait = Wait::kReady;
  unsigned warp_mask = 0;
  const char* warp_what = "";
  ThreadContext thread;
  int index = 0;  // linear thread index in the block
#if defined(CUDA_EMU_ASAN)
  void* fake_stack = nullptr;
#endif
};

constexpr size_t kStackSize =
#if defined(CUDA_EMU_ASAN)
    512 << 10;
#else
    128 << 10;
#endif

struct Scheduler;

struct RuntimeState {
  DeviceProperties props;
  Schedule schedule = Schedule::kForward;
  cudaError_t last_error = cudaSuccess;
  std::string failure;
  Stats stats;
  int device = 0;
  std::map<const void*, int> max_dynamic_smem;  // per kernel opt-in
  std::vector<std::unique_ptr<Fiber>> fibers;   // reused across launches
  Scheduler* active = nullptr;
};

RuntimeState& rt() {
  static RuntimeState s;
  return s;
}

// What the block scheduler shares with its fibers.
struct Scheduler {
  const LaunchBody* body = nullptr;
  int nthreads = 0;
  Fiber* current = nullptr;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
#if defined(CUDA_EMU_ASAN)
  void* sched_fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
#endif
  std::vector<uint64_t> lane_values;  // [thread], the exchange slots
  std::vector<char> dynamic_smem;
  bool failed = false;
  std::string failure;
};


Fiber* new_fiber() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* mem = mmap(nullptr, kStackSize + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    std::fprintf(stderr, "cuda_emu: cannot map a fiber stack\n");
    std::abort();
  }
  mprotect(mem, page, PROT_NONE);  // overflow faults instead of corrupting
  auto* f = new Fiber;
  f->stack = static_cast<char*>(mem) + page;
  f->stack_size = kStackSize;
  return f;
}

void switch_to_fiber(Scheduler& s, Fiber& f);
void switch_to_scheduler(Scheduler& s, Fiber& f);

}  // namespace

// Entry of every fiber; runs kernel bodies until the process ends.
extern "C" void cuda_emu_fiber_main(void* arg) {
  auto* f = static_cast<Fiber*>(arg);
  for (;;) {
    Scheduler& s = *rt().active;
#if defined(CUDA_EMU_ASAN)
    __sanitizer_finish_switch_fiber(f->fake_stack, &s.sched_stack_bottom, &s.sched_stack_size);
#endif
    s.body->run(s.body->closure);
    f->wait = Wait::kDone;
    switch_to_scheduler(s, *f);
  }
}

namespace {

#if !defined(__x86_64__)
void ucontext_entry(unsigned lo, unsigned hi) {
  cuda_emu_fiber_main(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

void start_fiber(Fiber& f) {
#if defined(CUDA_EMU_ASAN)
  // A kernel abandoned mid-way leaves its frames' redzones poisoned; one that ran to
  // its end has unpoisoned them on return (and clearing 512 KiB of shadow per thread
  // start would dominate the run time).
  if (f.abandoned) __asan_unpoison_memory_region(f.stack, f.stack_size);
#endif
  f.abandoned = false;
#if defined(__x86_64__)
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(f.stack + f.stack_size) & ~uintptr_t{15});
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  top[-1] = 0;                                                    // fake return address of the trampoline
  top[-2] = reinterpret_cast<uint64_t>(&cuda_emu_trampoline);  // where the first switch returns to
  top[-3] = 0;                                                    // rbp
  top[-4] = 0;                                                    // rbx
  top[-5] = reinterpret_cast<uint64_t>(&f);                    // r12: the trampoline's argument
  top[-6] = 0;                                                    // r13
  top[-7] = 0;                                                    // r14
  top[-8] = 0;                                                    // r15
  top[-9] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  f.sp = &top[-9];
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = f.stack_size;
  f.ctx.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&ucontext_entry), 2, static_cast<unsigned>(p),
              static_cast<unsigned>(p >> 32));
#endif
  f.started = true;
}

void switch_to_fiber(Scheduler& s, Fiber& f) {
  s.current = &f;
  threadIdx = f.thread.thread_idx;
  blockIdx = f.thread.block_idx;
  blockDim = f.thread.block_dim;
  gridDim = f.thread.grid_dim;
#if defined(CUDA_EMU_ASAN)
  __sanitizer_start_switch_fiber(&s.sched_fake_stack, f.stack, f.stack_size);
#endif
#if defined(__x86_64__)
  cuda_emu_switch(&s.sched_sp, f.sp);
#else
  swapcontext(&s.sched_ctx, &f.ctx);
#endif
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(s.sched_fake_stack, nullptr, nullptr);
#endif
  s.current = nullptr;
}

void switch_to_scheduler(Scheduler& s, Fiber& f) {
#if defined(CUDA_EMU_ASAN)
  __sanitizer_start_switch_fiber(&f.fake_stack, s.sched_stack_bottom, s.sched_stack_size);
#endif
#if defined(__x86_64__)
  cuda_emu_switch(&f.sp, s.sched_sp);
#else
  swapcontext(&f.ctx, &s.sched_ctx);
#endif
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, &s.sched_stack_bottom, &s.sched_stack_size);
#endif
}

Scheduler& active_scheduler(const char* what) {
  Scheduler* s = rt().active;
  if (s == nullptr || s->current == nullptr) {
    std::fprintf(stderr, "cuda_emu: %s called outside a kernel\n", what);
    std::abort();
  }
  return *s;
}

// Waits until the scheduler releases this fiber.
void block_here(Scheduler& s, Wait kind, unsigned mask, const char* what) {
  Fiber& f = *s.current;
  f.wait = kind;
  f.warp_mask = mask;
  f.warp_what = what;
  switch_to_scheduler(s, f);
}

std::string describe(const Fiber& f) {
  std::ostringstream o;
  o << "thread (" << f.thread.thread_idx.x << "," << f.thread.thread_idx.y << "," << f.thread.thread_idx.z
    << ") of block (" << f.thread.block_idx.x << "," << f.thread.block_idx.y << "," << f.thread.block_idx.z << ")";
  return o.str();
}

// Releases the fibers that can go on once all are waiting or done. Returns false when
// none can (a deadlock on a GPU), with the reason in s.failure.
bool release(Scheduler& s, std::vector<Fiber*>& block) {
  int live = 0, at_block = 0;
  for (Fiber* f : block) {
    live += f->wait != Wait::kDone;
    at_block += f->wait == Wait::kBlock;
  }
  if (live == 0) return true;
  // Strict: a barrier after some threads of the block returned is undefined in CUDA
  // (it happens to work on some GPUs), so it fails here, below.
  if (at_block == live && live == static_cast<int>(block.size())) {
    for (Fiber* f : block) if (f->wait == Wait::kBlock) f->wait = Wait::kReady;
    ++rt().stats.barriers;
    return true;
  }
  bool released = false;
  const int nwarps = (s.nthreads + kWarpSize - 1) / kWarpSize;
  for (int w = 0; w < nwarps; ++w) {
    Fiber* first = nullptr;
    for (int l = 0; l < kWarpSize && w * kWarpSize + l < s.nthreads; ++l) {
      Fiber* f = block[w * kWarpSize + l];
      if (f->wait == Wait::kWarp) {
        first = f;
        break;
      }
    }
    if (first == nullptr) continue;
    const unsigned mask = first->warp_mask;
    bool complete = true;
    for (int l = 0; l < kWarpSize; ++l) {
      if (!(mask & (1u << l))) continue;
      const int t = w * kWarpSize + l;
      if (t >= s.nthreads) {
        complete = false;
        std::ostringstream o;
        o << first->warp_what << " in " << describe(*first) << ": mask 0x" << std::hex << mask << std::dec
          << " names lane " << l << ", which the block does not have";
        s.failure = o.str();
        return false;
      }
      const Fiber* g = block[t];
      if (g->wait != Wait::kWarp || g->warp_mask != mask) complete = false;
    }
    if (!complete) continue;
    for (int l = 0; l < kWarpSize; ++l)
      if (mask & (1u << l)) block[w * kWarpSize + l]->wait = Wait::kReady;
    released = true;
  }
  if (released) return true;
  // Deadlock: say who waits where.
  std::ostringstream o;
  o << "deadlock: ";
  int exited = live > 0 ? static_cast<int>(block.size()) - live : 0;
  for (Fiber* f : block) {
    if (f->wait == Wait::kBlock) {
      o << "__syncthreads reached by " << at_block << " of " << block.size() << " threads (" << exited
        << " exited, " << (live - at_block) << " wait elsewhere), first waiter " << describe(*f);
      break;
    }
    if (f->wait == Wait::kWarp) {
      o << f->warp_what << " with mask 0x" << std::hex << f->warp_mask << std::dec << " in " << describe(*f)
        << " waits for lanes that exited or wait elsewhere";
      break;
    }
  }
  s.failure = o.str();
  return false;
}

cudaError_t fail(cudaError_t err, const std::string& why) {
  rt().last_error = err;
  rt().failure = why;
  return err;
}

cudaError_t check_config(const cudaLaunchConfig_t& c, const LaunchBody& body) {
  const dim3 g = c.gridDim, b = c.blockDim;
  std::ostringstream o;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535u || g.z > 65535u) {
    o << "invalid grid (" << g.x << ", " << g.y << ", " << g.z
      << "): each dimension must be >= 1, x <= 2^31-1, y and z <= 65535";
    return fail(cudaErrorInvalidConfiguration, o.str());
  }
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024u || b.y > 1024u || b.z > 64u || threads > 1024u) {
    o << "invalid block (" << b.x << ", " << b.y << ", " << b.z
      << "): each dimension >= 1, x and y <= 1024, z <= 64, at most 1024 threads";
    return fail(cudaErrorInvalidConfiguration, o.str());
  }
  int limit = 48 << 10;
  const auto it = rt().max_dynamic_smem.find(body.kernel);
  if (it != rt().max_dynamic_smem.end()) limit = it->second;
  if (c.dynamicSmemBytes > static_cast<size_t>(limit)) {
    o << "dynamic shared memory of " << c.dynamicSmemBytes << " bytes exceeds the kernel's limit of " << limit
      << " (raise it with cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize), at most "
      << rt().props.max_shared_optin << ")";
    return fail(cudaErrorInvalidValue, o.str());
  }
  return cudaSuccess;
}

}  // namespace

DeviceProperties& device_properties() { return rt().props; }
void set_schedule(Schedule s) { rt().schedule = s; }
Schedule schedule() { return rt().schedule; }
const std::string& failure_message() { return rt().failure; }
Stats& stats() { return rt().stats; }

int lane_id() { return active_scheduler("a warp operation").current->index % kWarpSize; }

void sync_block() {
  Scheduler& s = active_scheduler("__syncthreads");
  block_here(s, Wait::kBlock, 0, "__syncthreads");
}

void sync_warp(unsigned mask, const char* what) {
  Scheduler& s = active_scheduler(what);
  const int lane = lane_id();
  if (!(mask & (1u << lane))) {
    s.failed = true;
    std::ostringstream o;
    o << what << " in " << describe(*s.current) << ": the calling lane " << lane << " is not in mask 0x" << std::hex
      << mask;
    s.failure = o.str();
  }
  block_here(s, Wait::kWarp, mask, what);
}

uint64_t exchange(unsigned mask, uint64_t mine, int src_lane, const char* what) {
  Scheduler& s = active_scheduler(what);
  const int me = s.current->index;
  const int warp_base = me - lane_id();
  s.lane_values[me] = mine;
  sync_warp(mask, what);  // every lane has published
  uint64_t out = mine;
  const int src = warp_base + src_lane;
  if ((mask >> src_lane) & 1u) out = s.lane_values[src];  // a lane outside the mask: undefined; keep own
  sync_warp(mask, what);  // every lane has read before any publishes again
  return out;
}

unsigned ballot(unsigned mask, bool pred) {
  Scheduler& s = active_scheduler("__ballot_sync");
  const int me = s.current->index, lane = lane_id(), base = me - lane;
  s.lane_values[me] = pred ? 1 : 0;
  sync_warp(mask, "__ballot_sync");
  unsigned out = 0;
  for (int l = 0; l < kWarpSize; ++l)
    if ((mask >> l) & 1u && base + l < s.nthreads && s.lane_values[base + l]) out |= 1u << l;
  sync_warp(mask, "__ballot_sync");
  return out;
}

void* dynamic_shared_memory() {
  Scheduler& s = active_scheduler("dynamic shared memory");
  return s.dynamic_smem.data();
}

cudaError_t launch(const cudaLaunchConfig_t& config, const LaunchBody& body) {
  static std::recursive_mutex one_launch_at_a_time;  // recursive: a nested launch is reported, not deadlocked
  std::lock_guard<std::recursive_mutex> lock(one_launch_at_a_time);
  RuntimeState& r = rt();
  if (r.active != nullptr) return fail(cudaErrorLaunchFailure, "a kernel launched another kernel");
  if (const cudaError_t e = check_config(config, body); e != cudaSuccess) return e;
  ++r.stats.launches;

  Scheduler s;
  s.body = &body;
  const dim3 g = config.gridDim, bd = config.blockDim;
  s.nthreads = static_cast<int>(bd.x * bd.y * bd.z);
  s.lane_values.assign(s.nthreads, 0);
  s.dynamic_smem.assign(config.dynamicSmemBytes, 0);
  while (r.fibers.size() < static_cast<size_t>(s.nthreads)) r.fibers.emplace_back(new_fiber());
  std::vector<Fiber*> block(s.nthreads);
  for (int t = 0; t < s.nthreads; ++t) block[t] = r.fibers[t].get();
  r.active = &s;

  char* shared_lo = __start_cuda_emu_shared;
  char* shared_hi = __stop_cuda_emu_shared;
  for (unsigned bz = 0; bz < g.z && !s.failed; ++bz)
    for (unsigned by = 0; by < g.y && !s.failed; ++by)
      for (unsigned bx = 0; bx < g.x && !s.failed; ++bx) {
        ++r.stats.blocks;
        if (shared_lo != nullptr && shared_hi > shared_lo)
          std::memset(shared_lo, 0xff, static_cast<size_t>(shared_hi - shared_lo));
        if (!s.dynamic_smem.empty()) std::memset(s.dynamic_smem.data(), 0xff, s.dynamic_smem.size());
        for (int t = 0; t < s.nthreads; ++t) {
          Fiber& f = *block[t];
          f.index = t;
          f.thread.block_idx = uint3{bx, by, bz};
          f.thread.thread_idx = uint3{t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
          f.thread.block_dim = bd;
          f.thread.grid_dim = g;
          f.wait = Wait::kReady;
          start_fiber(f);
        }
        r.stats.threads += s.nthreads;
        for (;;) {
          for (int i = 0; i < s.nthreads && !s.failed; ++i) {
            Fiber& f = *block[r.schedule == Schedule::kForward ? i : s.nthreads - 1 - i];
            if (f.wait == Wait::kReady) switch_to_fiber(s, f);
          }
          if (s.failed) break;
          bool done = true;
          for (Fiber* f : block) done = done && f->wait == Wait::kDone;
          if (done) break;
          if (!release(s, block)) {
            s.failed = true;
            break;
          }
        }
      }
  r.active = nullptr;
  if (s.failed) {
    for (Fiber* f : block) f->abandoned = f->abandoned || f->wait != Wait::kDone;
    return fail(cudaErrorLaunchFailure, s.failure);
  }
  return cudaSuccess;
}

}  // namespace cuda_emu

// ---- Runtime API --------------------------------------------------------------------
using cuda_emu::rt;

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = rt().last_error;
  rt().last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return rt().last_error; }
cudaError_t cudaGetDevice(int* device) {
  *device = rt().device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device != 0) return rt().last_error = cudaErrorInvalidDevice;
  rt().device = device;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return rt().last_error = cudaErrorInvalidDevice;
  const cuda_emu::DeviceProperties& p = rt().props;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 << 10; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = p.sm_count; break;
    case cudaDevAttrComputeCapabilityMajor: *value = p.cc_major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = p.cc_minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = p.max_shared_optin; break;
    default: return rt().last_error = cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > rt().props.max_shared_optin)
    return rt().last_error = cudaErrorInvalidValue;
  rt().max_dynamic_smem[func] = value;
  return cudaSuccess;
}

// The Autograd kernel of an op without a derivative (the backward ops, the
// inference-only decode steps): while grad mode is on, any tensor argument that
// requires grad is refused by name; otherwise the op runs below autograd.
//
// Without it the dispatcher's autograd fallback runs the op and hands back outputs
// whose gradients come out as zeros, or never reach the inputs' .grad: silently. It is
// C++ rather than a Python kernel because the decode steps run once per layer and
// token, and a Python kernel costs each call ~25 us of boxing and interpreter time
// (benchmarks/RESULTS.md, "RWKV-7 decode overheads").
//
// The refusal reads "prosg.<op>: <argument> requires grad, but prosg.<op> <why>"; an
// element j of a tensor-list argument is "<name>[j]", or for the decode steps' delta
// list "deltas[j] (the <kind> delta's U|V)" (kinds: the projections in list order,
// each a (U, V) pair).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

namespace prosg {

struct NotDifferentiable {
  const char* why;
  // Names of the (U, V) pairs of a `deltas` list argument, in order; empty: "name[j]".
  std::initializer_list<const char*> delta_kinds = {};
};

namespace detail {

inline std::string list_item_name(const std::string& name, size_t j, const NotDifferentiable& spec) {
  std::string out = name + "[" + std::to_string(j) + "]";
  if (name == "deltas" && j / 2 < spec.delta_kinds.size()) {
    out += std::string(" (the ") + spec.delta_kinds.begin()[j / 2] + " delta's " + (j % 2 == 0 ? "U" : "V") + ")";
  }
  return out;
}

[[noreturn]] inline void refuse(const c10::OperatorHandle& op, const std::string& argument,
                                const NotDifferentiable& spec) {
  const std::string label = "prosg." + op.operator_name().name.substr(op.operator_name().name.find("::") + 2);
  TORCH_CHECK(false, label, ": ", argument, " requires grad, but ", label, " ", spec.why);
}

inline void refuse_or_redispatch(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack,
                                 const NotDifferentiable& spec) {
  const auto& arguments = op.schema().arguments();
  if (at::GradMode::is_enabled()) {
    const auto first = stack->end() - static_cast<std::ptrdiff_t>(arguments.size());
    for (size_t i = 0; i < arguments.size(); ++i) {
      const c10::IValue& value = first[static_cast<std::ptrdiff_t>(i)];
      if (value.isTensor()) {
        if (value.toTensor().requires_grad()) refuse(op, arguments[i].name(), spec);
      } else if (value.isList()) {  // Tensor[] and Tensor?[]
        const auto items = value.toListRef();
        for (size_t j = 0; j < items.size(); ++j) {
          if (items[j].isTensor() && items[j].toTensor().requires_grad())
            refuse(op, list_item_name(arguments[i].name(), j, spec), spec);
        }
      }
    }
  }
  at::AutoDispatchBelowAutograd below_autograd;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

}  // namespace detail

// The boxed kernel for `spec` (an object with static storage):
//   m.impl("op", torch::CppFunction::makeFromBoxedFunction<&not_differentiable<kSpec>>());
template <const NotDifferentiable& spec>
void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  detail::refuse_or_redispatch(op, keys, stack, spec);
}

}  // namespace prosg

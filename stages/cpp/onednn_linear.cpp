// y = x·wᵀ (+ b) by oneDNN, through libtorch's dispatcher: the op
// `mkldnn::_linear_pointwise` is registered in libtorch_cpu but, not being
// an `aten::` op, has no binding in tch. See `stages/src/model/onednn.rs`.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cstring>
#include <exception>
#include <string>

extern "C" at::Tensor* llmflow_onednn_linear(const at::Tensor* x, const at::Tensor* w, const at::Tensor* b,
                                             char* error, size_t error_len) {
  try {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack;
    stack.emplace_back(*x);
    stack.emplace_back(*w);
    stack.emplace_back(b ? c10::IValue(*b) : c10::IValue());
    stack.emplace_back(std::string("none"));  // no fused activation
    stack.emplace_back(c10::List<std::optional<at::Scalar>>());
    stack.emplace_back(c10::IValue());  // algorithm
    op.callBoxed(&stack);
    return new at::Tensor(stack[0].toTensor());
  } catch (const std::exception& e) {
    std::strncpy(error, e.what(), error_len - 1);
    error[error_len - 1] = '\0';
    return nullptr;
  }
}

// beta·self + alpha·(mat1·mat2) in one `aten::addmm`, the scalars included:
// tch binds addmm without them, and composing it from a product, two scalings
// and a sum rounds in between (in bfloat16, by far more than Muon's reference
// does). See `stages/src/train/muon.rs`.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cstring>
#include <exception>

extern "C" at::Tensor* llmflow_addmm(const at::Tensor* self, const at::Tensor* mat1, const at::Tensor* mat2, double beta,
                                     double alpha, char* error, size_t error_len) {
  try {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("aten::addmm", "");
    torch::jit::Stack stack;
    stack.emplace_back(*self);
    stack.emplace_back(*mat1);
    stack.emplace_back(*mat2);
    stack.emplace_back(at::Scalar(beta));
    stack.emplace_back(at::Scalar(alpha));
    op.callBoxed(&stack);
    return new at::Tensor(stack[0].toTensor());
  } catch (const std::exception& e) {
    std::strncpy(error, e.what(), error_len - 1);
    error[error_len - 1] = '\0';
    return nullptr;
  }
}

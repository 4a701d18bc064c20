//! CPU fast paths, each behind one named function that the maths calls
//! where it applies (and that falls back to libtorch elsewhere): the GeLU
//! kernel, the output head and loss fused on oneDNN, and loops over float
//! buffers.

pub mod floats;
pub mod gelu;
pub mod head;
pub mod onednn;

use tch::Tensor;

/// Backpropagates `grad` (the loss's gradient with respect to `output`) into
/// whatever `output` was computed from. tch's `backward` takes no output
/// gradient, so this goes through the scalar ⟨output, grad⟩, whose gradient
/// with respect to `output` is exactly `grad`.
pub fn backward_from(output: &Tensor, grad: &Tensor) {
    (output * grad).sum(output.kind()).backward();
}

//! CPU fast paths, each behind one named function that the maths calls
//! where it applies (and that falls back to libtorch elsewhere): the GeLU
//! kernel, the output head and loss fused on oneDNN, and loops over float
//! buffers; and [`from_cpp`], the tensor a C++ shim returns.

pub mod floats;
pub mod gelu;
pub mod head;
pub mod onednn;

use std::ffi::{c_char, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

/// The tensor a C++ shim in `cpp/` returns. `call` gets a buffer for the
/// message of what the shim caught; a null result panics with `what` and
/// that message.
pub fn from_cpp(what: impl FnOnce() -> String, call: impl FnOnce(*mut c_char, usize) -> *mut C_tensor) -> Tensor {
    let mut error = [0 as c_char; 512];
    let y = call(error.as_mut_ptr(), error.len());
    if y.is_null() {
        // SAFETY: the C++ side wrote a NUL-terminated message.
        let message = unsafe { CStr::from_ptr(error.as_ptr()) };
        panic!("{}: {}", what(), message.to_string_lossy());
    }
    // SAFETY: a tensor the C++ side allocated for the caller to own.
    unsafe { Tensor::from_ptr(y) }
}

/// Backpropagates `grad` (the loss's gradient with respect to `output`) into
/// whatever `output` was computed from. tch's `backward` takes no output
/// gradient, so this goes through the scalar ⟨output, grad⟩, whose gradient
/// with respect to `output` is exactly `grad`.
pub fn backward_from(output: &Tensor, grad: &Tensor) {
    (output * grad).sum(output.kind()).backward();
}

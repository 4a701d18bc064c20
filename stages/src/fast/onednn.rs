//! Matrix products by oneDNN rather than MKL.
//!
//! libtorch runs `mm` on the CPU with MKL's sgemm. On an AMD CPU MKL takes
//! a generic AVX2 path, while oneDNN, also inside libtorch_cpu, generates
//! kernels for the CPU it runs on. On the 2-core AMD EPYC (Zen 4) of
//! `bench/RESULTS.md`, for the output head of the baby GPT (a [384, 128]
//! slice of hidden states times a [4096, 128] head) oneDNN computes the
//! logits about 25% faster than MKL and their gradient's product with the
//! head a little faster; `pretrain`'s throughput gains 5%.
//!
//! libtorch reaches oneDNN's matmul through the op
//! `mkldnn::_linear_pointwise`, which, not being an `aten::` op, has no tch
//! binding: `cpp/onednn_linear.cpp` calls it through libtorch's dispatcher.
//! There is no autograd behind it: it is for products computed by hand, as
//! the output head's.

use std::ffi::c_char;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn llmflow_onednn_linear(
        x: *const C_tensor,
        w: *const C_tensor,
        b: *const C_tensor,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut C_tensor;
}

/// x·wᵀ for x [M, K] and w [N, K] (either may be a transposed view) → [M, N],
/// f32 on the CPU by oneDNN; elsewhere `mm`.
pub fn mm_t(x: &Tensor, w: &Tensor) -> Tensor {
    if x.device() != Device::Cpu || x.kind() != Kind::Float || w.kind() != Kind::Float {
        return x.mm(&w.tr());
    }
    super::from_cpp(
        || format!("oneDNN matmul of {:?} and {:?}ᵀ", x.size(), w.size()),
        // SAFETY: both pointers are live tensors; the result is a new tensor or null.
        |error, len| unsafe { llmflow_onednn_linear(x.as_ptr(), w.as_ptr(), std::ptr::null(), error, len) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_diff;

    /// The products agree with `mm`, for the head's three shapes and layouts.
    #[test]
    fn agrees_with_mm() {
        let opts = (Kind::Float, Device::Cpu);
        let (n, c, v) = (48, 16, 300);
        let (h, w, g) = (Tensor::randn([n, c], opts), Tensor::randn([v, c], opts), Tensor::randn([n, v], opts));
        for (x, w) in [(&h, w.shallow_clone()), (&g, w.tr()), (&g.tr(), h.tr())] {
            let (ours, want) = (mm_t(x, &w), x.mm(&w.tr()));
            assert_eq!(ours.size(), want.size());
            assert!(max_diff(&ours, &want) < 1e-4, "{}", max_diff(&ours, &want));
        }
    }
}

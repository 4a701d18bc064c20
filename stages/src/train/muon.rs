//! Muon (Jordan et al. 2024): momentum, orthogonalized by a Newton–Schulz
//! iteration, for the hidden matrices of the blocks; [`super::Optimizer`]
//! trains the other variables with AdamW, as nanochat's `MuonAdamW` does.
//! The maths is `torch.optim.Muon`'s (torch 2.13), step for step, so that a
//! step here equals one there.
//!
//! For a matrix W with gradient G and momentum buffer B:
//!
//! B ← μ·B + (1−μ)·G
//! U = G + μ·(B − G) (Nesterov) or B
//! O = NS(U), about U's polar factor
//! W ← W·(1 − lr·λ) − lr·s(W)·O
//!
//! with s(W) the learning-rate scale for W's shape [`Adjust`].
//!
//! A LoRA adapter's two factors, A [r, in] and B [out, r], are matrices of
//! their own: each is orthogonalized on its own, so each step moves all r
//! directions of a factor by the same amount.

use std::ffi::c_char;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

/// The quintic Newton–Schulz coefficients (a, b, c) of Keller Jordan's Muon
/// and `torch.optim.Muon`: the slope at zero as steep as the iteration
/// allows, so that 5 steps bring every singular value into about [0.7, 1.2].
const COEFFICIENTS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// The smallest norm the update is divided by.
const EPS: f64 = 1e-7;

/// The `train.muon` table: Muon's settings for the hidden matrices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MuonHyper {
    /// Peak learning rate of the hidden matrices, on the stage's schedule
    /// (the schedule's factor of `train.lr` times this); `train.lr` is the
    /// AdamW variables'.
    #[schemars(range(max = 10), extend("exclusiveMinimum" = 0))]
    pub lr: f64,
    /// μ, the decay of the momentum buffer.
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 1))]
    pub momentum: f64,
    /// Nesterov momentum: orthogonalize G + μ·(B − G) rather than B.
    pub nesterov: bool,
    /// Newton–Schulz steps.
    #[schemars(range(min = 1, max = 99))]
    pub ns_steps: usize,
    /// λ, decoupled weight decay of the hidden matrices.
    #[schemars(range(min = 0, max = 10))]
    pub weight_decay: f64,
    /// How the learning rate scales with a matrix's shape.
    pub adjust_lr: Adjust,
}

impl Default for MuonHyper {
    /// nanochat's `matrix_lr` and PyTorch's other defaults; no weight decay, as nanochat's.
    fn default() -> Self {
        MuonHyper { lr: 0.02, momentum: 0.95, nesterov: true, ns_steps: 5, weight_decay: 0.0, adjust_lr: Adjust::Original }
    }
}

/// The learning-rate scale s(W) for W [A, B], `torch.optim.Muon`'s `adjust_lr_fn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Adjust {
    /// √max(1, A/B): Keller Jordan's, for matrices taller than wide.
    Original,
    /// 0.2·√max(A, B): an update of AdamW's typical RMS, so that AdamW's
    /// learning rate and weight decay carry over (Moonshot's).
    MatchRmsAdamw,
}

impl Adjust {
    pub fn scale(self, shape: &[i64]) -> f64 {
        let (a, b) = (shape[0] as f64, shape[1] as f64);
        match self {
            Adjust::Original => (a / b).max(1.0).sqrt(),
            Adjust::MatchRmsAdamw => 0.2 * a.max(b).sqrt(),
        }
    }
}

/// Whether Muon trains a variable: the 2-D matrices inside the blocks
/// (attention and MLP weights, and LoRA factors on them). Embeddings, the
/// output head, other heads, norm gains and biases train with AdamW.
pub fn applies(name: &str, tensor: &Tensor) -> bool {
    tensor.dim() == 2 && (name.contains(".h.") || name.contains(".layers."))
}

/// About the polar factor of `u` [A, B] (U·V' for u = U·S·V'), by `steps`
/// quintic Newton–Schulz steps in bfloat16, as `torch.optim.Muon`:
/// X ← a·X + (b·XX' + c·(XX')²)·X on the wide orientation (A ≤ B), from
/// X = u / ‖u‖_F, whose spectral norm is then at most 1.
pub fn orthogonalize(u: &Tensor, steps: usize) -> Tensor {
    let (a, b, c) = COEFFICIENTS;
    let tall = u.size()[0] > u.size()[1];
    let x = u.to_kind(Kind::BFloat16);
    let x = if tall { x.tr() } else { x }; // [min, max]
    let mut x = &x / x.norm().clamp_min(EPS);
    for _ in 0..steps {
        let gram = x.matmul(&x.tr()); // XX' [min, min]
        let poly = addmm(&gram, &gram, &gram, b, c); // b·XX' + c·(XX')²
        x = addmm(&x, &poly, &x, a, 1.0); // a·X + poly·X
    }
    if tall {
        x.tr()
    } else {
        x
    }
}

extern "C" {
    fn llmflow_addmm(
        input: *const C_tensor,
        mat1: *const C_tensor,
        mat2: *const C_tensor,
        beta: f64,
        alpha: f64,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut C_tensor;
}

/// beta·input + alpha·(mat1·mat2), rounded once (`cpp/addmm.cpp`).
fn addmm(input: &Tensor, mat1: &Tensor, mat2: &Tensor, beta: f64, alpha: f64) -> Tensor {
    crate::fast::from_cpp(
        || format!("addmm of {:?} and {:?}", mat1.size(), mat2.size()),
        // SAFETY: the three pointers are live tensors; the result is a new tensor or null.
        |error, len| unsafe { llmflow_addmm(input.as_ptr(), mat1.as_ptr(), mat2.as_ptr(), beta, alpha, error, len) },
    )
}

/// One Muon step of a matrix `w` (in place) from its gradient `g` and
/// momentum buffer `buf` (updated); `lr` is the step's learning rate.
pub fn update(w: &Tensor, g: &Tensor, buf: &Tensor, lr: f64, hyper: &MuonHyper) {
    tch::no_grad(|| {
        let mut buf = buf.shallow_clone();
        let _ = buf.lerp_(g, 1.0 - hyper.momentum); // μ·B + (1−μ)·G
        let u = if hyper.nesterov { g.lerp(&buf, hyper.momentum) } else { buf.shallow_clone() };
        let o = orthogonalize(&u, hyper.ns_steps).to_kind(w.kind());
        let mut w = w.shallow_clone();
        if hyper.weight_decay > 0.0 {
            let _ = w.g_mul_scalar_(1.0 - lr * hyper.weight_decay);
        }
        let _ = w.g_add_(&(o * (-lr * hyper.adjust_lr.scale(&w.size()))));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::torch_rng;

    /// Newton–Schulz brings the singular values near 1, none above 1.3,
    /// whatever the input's scale and shape. (The smallest ones of a random
    /// square matrix, near 0, rise more slowly.)
    #[test]
    fn singular_values_come_near_one() {
        let _rng = torch_rng();
        tch::manual_seed(3);
        for shape in [[32, 32], [16, 48], [48, 16]] {
            let u = Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)) * 100.0;
            let o = orthogonalize(&u, 5).to_kind(Kind::Float);
            assert_eq!(o.size(), shape.to_vec());
            // The singular values: roots of the eigenvalues of O'O, on the smaller side.
            let small = if shape[0] > shape[1] { o.tr().matmul(&o) } else { o.matmul(&o.tr()) };
            let s = Tensor::linalg_eigvalsh(&small.to_kind(Kind::Double), "L").sqrt();
            let (mean, hi) = (s.mean(Kind::Double).double_value(&[]), s.max().double_value(&[]));
            assert!(mean > 0.7 && hi < 1.3, "{shape:?}: singular values of mean {mean}, at most {hi}");
        }
    }

    /// Steps of square, wide and tall matrices, and their Newton–Schulz
    /// iterations, equal `torch.optim.Muon`'s within 1e-5 relative, for
    /// both learning-rate scales.
    #[test]
    fn steps_equal_torch_optim_muon() {
        let Some(python) = crate::testing::python_with("torch") else { return };
        let _rng = torch_rng();
        tch::manual_seed(11);
        let dir = tempfile::tempdir().unwrap();
        let opts = (Kind::Float, tch::Device::Cpu);
        for adjust in [Adjust::Original, Adjust::MatchRmsAdamw] {
            let hyper = MuonHyper { lr: 0.05, weight_decay: 0.1, adjust_lr: adjust, ..Default::default() };
            let shapes = [("square", [24, 24]), ("wide", [16, 40]), ("tall", [40, 16])];
            let mut tensors = Vec::new();
            for (name, shape) in shapes {
                let w = Tensor::randn(shape, opts);
                let buf = w.zeros_like();
                tensors.push((format!("{name}.w0"), w.copy()));
                for step in 1..=3 {
                    let g = Tensor::randn(shape, opts) * 0.01;
                    tensors.push((format!("{name}.g{step}"), g.copy()));
                    update(&w, &g, &buf, hyper.lr, &hyper);
                    tensors.push((format!("{name}.w{step}"), w.copy()));
                }
                let u = Tensor::randn(shape, opts);
                tensors.push((format!("{name}.ns"), orthogonalize(&u, hyper.ns_steps).to_kind(Kind::Float).contiguous()));
                tensors.push((format!("{name}.u"), u));
            }
            let file = dir.path().join("muon.safetensors");
            Tensor::write_safetensors(&tensors, &file).unwrap();
            let settings = serde_json::json!({
                "matrices": shapes.map(|(name, _)| name), "steps": 3, "lr": hyper.lr, "weight_decay": hyper.weight_decay,
                "momentum": hyper.momentum, "nesterov": hyper.nesterov, "ns_steps": hyper.ns_steps, "adjust_lr": adjust,
            });
            let settings_file = dir.path().join("settings.json");
            std::fs::write(&settings_file, settings.to_string()).unwrap();
            crate::testing::run_python(&python, "check_muon.py", &[&file, &settings_file]);
        }
    }

    #[test]
    fn the_scale_follows_the_shape() {
        assert_eq!(Adjust::Original.scale(&[64, 16]), 2.0);
        assert_eq!(Adjust::Original.scale(&[16, 64]), 1.0);
        assert!((Adjust::MatchRmsAdamw.scale(&[16, 100]) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn muon_takes_the_blocks_matrices_only() {
        let m = Tensor::zeros([4, 4], (Kind::Float, tch::Device::Cpu));
        let v = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
        assert!(applies("transformer.h.0.attn.c_attn.weight", &m));
        assert!(applies("model.layers.1.mlp.up_proj.weight", &m));
        assert!(applies("transformer.h.1.attn.c_attn.lora_v.A", &m));
        assert!(!applies("transformer.h.0.ln_1.weight", &v));
        assert!(!applies("transformer.h.0.attn.c_attn.bias", &v));
        assert!(!applies("transformer.wte.weight", &m));
        assert!(!applies("lm_head.weight", &m));
        assert!(!applies("score.weight", &m));
    }
}

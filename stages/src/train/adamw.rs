//! AdamW (Loshchilov & Hutter 2019) on moment buffers this crate owns.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{nn, Kind, Tensor};

use super::Hyper;

/// Whether weight decay applies to a variable: matrices, but not embedding
/// tables (a row is only trained when its token occurs, so decay would shrink
/// rare tokens towards zero), nor norm gains and biases (1-D).
pub fn decays(name: &str, tensor: &Tensor) -> bool {
    const EMBEDDINGS: [&str; 3] = ["wte.weight", "wpe.weight", "embed_tokens.weight"];
    tensor.dim() >= 2 && !EMBEDDINGS.iter().any(|e| name.ends_with(e))
}

struct Param {
    name: String,
    value: Tensor,
    /// First and second moments, f32 like the weights, on their device.
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW with decoupled weight decay over every trainable variable of a
/// VarStore, taken in name order so that sums over them (the gradient norm)
/// add up the same way on every run.
pub struct AdamW {
    params: Vec<Param>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// Updates applied; drives the bias correction.
    t: u64,
}

impl AdamW {
    pub fn new(vs: &nn::VarStore, hyper: &Hyper) -> AdamW {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, value)| Param {
                decay: decays(&name, &value),
                m: value.zeros_like().detach(),
                v: value.zeros_like().detach(),
                name,
                value,
            })
            .collect();
        AdamW {
            params,
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            eps: hyper.eps,
            weight_decay: hyper.weight_decay,
            t: 0,
        }
    }

    /// Updates applied so far.
    pub fn updates(&self) -> u64 {
        self.t
    }

    pub fn zero_grad(&self) {
        for p in &self.params {
            let mut grad = p.value.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// Scales the gradients so that their global L2 norm is at most `max`
    /// (0: no clipping) and returns the norm before scaling.
    pub fn clip_grad_norm(&self, max: f64) -> f64 {
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.value.grad()).filter(Tensor::defined).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let squares: Vec<Tensor> = grads.iter().map(|g| g.square().sum(Kind::Float)).collect();
        let norm = Tensor::stack(&squares, 0).sum(Kind::Float).sqrt().double_value(&[]);
        if max > 0.0 && norm > max {
            tch::no_grad(|| {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(max / (norm + 1e-6));
                }
            });
        }
        norm
    }

    /// One update at learning rate `lr` from the accumulated gradients.
    pub fn step(&mut self, lr: f64) {
        self.t += 1;
        let bias1 = 1.0 - self.beta1.powi(self.t as i32);
        let bias2_sqrt = (1.0 - self.beta2.powi(self.t as i32)).sqrt();
        // In place, two temporaries a tensor: the update is memory-bound, and
        // every extra pass over the weights shows in the step time.
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.value.grad();
                if !g.defined() {
                    continue;
                }
                let _ = p.m.lerp_(&g, 1.0 - self.beta1); // β1·m + (1−β1)·g
                let _ = p.v.lerp_(&g.square(), 1.0 - self.beta2); // β2·v + (1−β2)·g²
                if p.decay && self.weight_decay > 0.0 {
                    let _ = p.value.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                if lr == 0.0 {
                    continue;
                }
                // value −= lr/bias1 · m / (√v/bias2_sqrt + eps), as value += m / denom.
                let mut denom = p.v.sqrt();
                let _ = denom.g_div_scalar_(bias2_sqrt).g_add_scalar_(self.eps).g_mul_scalar_(-bias1 / lr);
                let _ = p.value.addcdiv_(&p.m, &denom);
            }
        });
    }

    /// Writes the moments and the update count (safetensors: `m.NAME`,
    /// `v.NAME`, `t`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.params.len() + 1);
        for p in &self.params {
            tensors.push((format!("m.{}", p.name), p.m.shallow_clone()));
            tensors.push((format!("v.{}", p.name), p.v.shallow_clone()));
        }
        tensors.push(("t".to_string(), Tensor::from(self.t as i64)));
        Tensor::write_safetensors(&tensors, path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Reads back what [`AdamW::save`] wrote, for the same variables.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let mut saved: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(path).with_context(|| format!("cannot read {}", path.display()))?.into_iter().collect();
        let mut take = |name: &str| saved.remove(name).with_context(|| format!("{}: no tensor `{name}`", path.display()));
        self.t = take("t")?.int64_value(&[]) as u64;
        for p in &mut self.params {
            for (moment, prefix) in [(&mut p.m, "m"), (&mut p.v, "v")] {
                let value = take(&format!("{prefix}.{}", p.name))?;
                if value.size() != moment.size() {
                    bail!("{}: `{prefix}.{}` has shape {:?}, the model {:?}", path.display(), p.name, value.size(), moment.size());
                }
                tch::no_grad(|| moment.copy_(&value));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::tests::{build, tiny, torch_rng};

    #[test]
    fn decay_skips_embeddings_norms_and_biases() {
        let t2 = Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu));
        let t1 = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
        assert!(decays("transformer.h.0.attn.c_attn.weight", &t2));
        assert!(decays("lm_head.weight", &t2));
        assert!(!decays("transformer.wte.weight", &t2));
        assert!(!decays("model.embed_tokens.weight", &t2));
        assert!(!decays("transformer.h.0.ln_1.weight", &t1));
    }

    /// The update rule against torch.optim.AdamW's, written out for a weight and a bias.
    #[test]
    fn matches_the_adamw_formula() {
        let _rng = torch_rng();
        let (vs, _) = build(&tiny("gpt2", json!({})), 0);
        let hyper = Hyper { weight_decay: 0.1, ..Default::default() };
        let mut opt = AdamW::new(&vs, &hyper);
        let vars = vs.variables();
        let w = &vars["transformer.h.0.mlp.c_fc.weight"];
        let b = &vars["transformer.h.0.mlp.c_fc.bias"];
        let lr = 0.01;
        // (value, m, v, gradient) for the weight and the bias, by hand.
        let mut expected = [(w.double_value(&[0, 0]), 0.0, 0.0, 3.0), (b.double_value(&[0]), 0.0, 0.0, 2.0)];
        for t in 1..=3 {
            opt.zero_grad();
            // Gradients: 3 for w[0,0], 2 for b[0].
            (w.get(0).get(0) * 3.0 + b.get(0) * 2.0).backward();
            opt.step(lr);
            for (i, (value, m, v, g)) in expected.iter_mut().enumerate() {
                *m = 0.9 * *m + 0.1 * *g;
                *v = 0.99 * *v + 0.01 * *g * *g;
                let (m_hat, v_hat) = (*m / (1.0 - 0.9f64.powi(t)), *v / (1.0 - 0.99f64.powi(t)));
                // Only the weight matrix decays.
                let decay = if i == 0 { 1.0 - lr * 0.1 } else { 1.0 };
                *value = *value * decay - lr * m_hat / (v_hat.sqrt() + 1e-8);
            }
            assert!((w.double_value(&[0, 0]) - expected[0].0).abs() < 1e-6, "step {t}");
            assert!((b.double_value(&[0]) - expected[1].0).abs() < 1e-6, "step {t}");
        }
        assert_eq!(opt.updates(), 3);
    }

    #[test]
    fn clipping_bounds_the_global_norm_and_state_round_trips() {
        let _rng = torch_rng();
        let dir = tempfile::tempdir().unwrap();
        let (vs, _) = build(&tiny("llama", json!({})), 1);
        let mut opt = AdamW::new(&vs, &Hyper::default());
        let vars = vs.variables();
        let total: Tensor = vars.values().map(|t| t.square().sum(Kind::Float)).fold(Tensor::from(0f32), |a, b| a + b);
        (total * 100.0).backward();
        let norm = opt.clip_grad_norm(1.0);
        assert!(norm > 1.0);
        assert!((opt.clip_grad_norm(0.0) - 1.0).abs() < 1e-4);
        opt.step(1e-3);
        let path = dir.path().join("optimizer.safetensors");
        opt.save(&path).unwrap();
        let mut again = AdamW::new(&vs, &Hyper::default());
        again.load(&path).unwrap();
        assert_eq!(again.updates(), 1);
        for (a, b) in opt.params.iter().zip(&again.params) {
            assert!(a.m.equal(&b.m) && a.v.equal(&b.v), "{}", a.name);
        }
    }
}

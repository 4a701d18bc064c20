//! The optimizer: AdamW (Loshchilov & Hutter 2019) on moment buffers this
//! crate owns, or with `train.optimizer = "muon"` Muon for the blocks'
//! matrices ([`super::muon`]) and AdamW for the rest.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use tch::{nn, Kind, Tensor};

use crate::dist::{self, Group, World};

use super::muon::{self, MuonHyper};
use super::{Hyper, OptimizerName};
use crate::fast::floats::{self, cpu_floats, CHUNK};

/// Whether weight decay applies to a variable: matrices, but not embedding
/// tables (a row is only trained when its token occurs, so decay would shrink
/// rare tokens towards zero), nor norm gains and biases (1-D).
pub fn decays(name: &str, tensor: &Tensor) -> bool {
    const EMBEDDINGS: [&str; 3] = ["wte.weight", "wpe.weight", "embed_tokens.weight"];
    tensor.dim() >= 2 && !EMBEDDINGS.iter().any(|e| name.ends_with(e))
}

struct Param {
    name: String,
    /// The variable, or under ZeRO-1 the part of its elements this rank
    /// updates (a view of them, flattened).
    value: Tensor,
    /// First and second moments, f32 like the weights, on their device;
    /// empty for a matrix Muon trains.
    m: Tensor,
    v: Tensor,
    decay: bool,
    /// Muon trains it: AdamW leaves it alone. (Under ZeRO-1 such parts stay
    /// in the list, for the layout of the rank's share.)
    muon: bool,
    /// Under ZeRO-1, where the part's gradient starts in [`Zero::grads`].
    shard_offset: Option<i64>,
}

/// AdamW with decoupled weight decay over every trainable variable of a
/// VarStore (or with Muon, over those Muon does not train), taken in name
/// order so that sums over them (the gradient norm) add up the same way on
/// every run.
///
/// Across ranks ([`crate::dist`]) each rank holds the gradients of its own
/// slice of the batch, accumulated by the backward passes straight into one
/// flat buffer (every variable's gradient is a view of it, in name order).
/// [`Optimizer::reduce_gradients`] makes them the batch's:
/// * plain data parallelism (DDP) all-reduces the buffer in buckets, and
///   every rank then makes the same update with all the moments;
/// * ZeRO-1 reduce-scatters them: each rank holds the summed gradients and
///   the moments of its 1/N of the elements only (the variables
///   concatenated in name order), updates those, and the ranks all-gather
///   the updated weights.
///
/// Muon needs a matrix's whole gradient. Under DDP every rank has it and
/// makes the same update; under ZeRO-1 the ranks all-gather their shares
/// of the summed gradients after clipping, and every rank then
/// orthogonalizes every matrix, with the momentum buffers whole on each:
/// ZeRO-1 partitions AdamW's moments only.
pub struct Optimizer {
    /// Every trainable variable, whole, in name order.
    vars: Vec<Tensor>,
    params: Vec<Param>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// Updates applied; drives the bias correction.
    t: u64,
    /// The ranks that train together; `None` in one process.
    group: Option<&'static Group>,
    /// Across ranks, the gradients of `vars`, concatenated (and under
    /// ZeRO-1 padded to a multiple of the ranks).
    grads: Option<Tensor>,
    zero: Option<Zero>,
    /// With `optimizer = "muon"`: its settings and matrices.
    muon: Option<(MuonHyper, Vec<MuonMatrix>)>,
    /// `train.lr`: a step's learning rate over it is the schedule's factor,
    /// which Muon's learning rate follows too.
    peak_lr: f64,
}

/// A matrix Muon trains, whole, and its momentum buffer.
struct MuonMatrix {
    name: String,
    value: Tensor,
    buf: Tensor,
}

/// ZeRO-1's share of this rank.
struct Zero {
    /// Elements per rank: the variables' total, rounded up to a multiple of the ranks.
    shard: i64,
    /// The summed gradients of this rank's elements.
    grads: Tensor,
}

/// Gradient elements all-reduced at once under DDP (16 MiB of f32).
const BUCKET: i64 = 1 << 22;

impl Optimizer {
    /// The optimizer of `vs`'s trainable variables; `world`'s ranks share
    /// its updates, with AdamW's moments partitioned among them if `zero`.
    pub fn new(vs: &nn::VarStore, hyper: &Hyper, world: &'static World, zero: bool) -> Optimizer {
        let named = super::trainable(vs);
        let vars: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
        let with_muon = hyper.optimizer == OptimizerName::Muon;
        let by_muon = |name: &str, whole: &Tensor| with_muon && muon::applies(name, whole);
        let param = |name: &str, value: Tensor, whole: &Tensor, shard_offset| {
            let muon = by_muon(name, whole);
            let moment = || if muon { Tensor::zeros([0], (Kind::Float, value.device())) } else { value.zeros_like().detach() };
            Param { decay: decays(name, whole), m: moment(), v: moment(), muon, name: name.to_string(), value, shard_offset }
        };
        let muon = with_muon.then(|| {
            let matrices = named
                .iter()
                .filter(|(name, t)| by_muon(name, t))
                .map(|(name, t)| MuonMatrix { name: name.clone(), value: t.shallow_clone(), buf: t.zeros_like().detach() })
                .collect();
            (hyper.muon.clone().unwrap_or_default(), matrices)
        });
        let group = world.group();
        let total: i64 = vars.iter().map(Tensor::numel).sum::<usize>() as i64;
        let ranks = world.size as i64;
        let shard = (total + ranks - 1) / ranks;
        // Every rank holds a gradient for every variable from the start: a
        // rank whose slice reached none (no counted token) still takes part
        // in the update the others make.
        let grads = group.filter(|_| total > 0).map(|_| {
            let flat = Tensor::zeros([if zero { shard * ranks } else { total }], (Kind::Float, vs.device()));
            let mut at = 0;
            for var in &vars {
                let n = var.numel() as i64;
                dist::set_grad(var, &flat.narrow(0, at, n).view_as(var));
                at += n;
            }
            flat
        });
        let (params, zero) = match group.filter(|_| zero) {
            None => (named.iter().map(|(name, t)| param(name, t.shallow_clone(), t, None)).collect(), None),
            Some(group) => {
                let (lo, hi) = (group.rank() as i64 * shard, (group.rank() as i64 + 1) * shard);
                let mut params = Vec::new();
                let mut offset = 0;
                for (name, t) in &named {
                    let n = t.numel() as i64;
                    let (start, end) = (offset.max(lo), (offset + n).min(hi));
                    if start < end {
                        let part = t.detach().view([-1]).narrow(0, start - offset, end - start);
                        params.push(param(name, part, t, Some(start - lo)));
                    }
                    offset += n;
                }
                let grads = Tensor::zeros([shard], (Kind::Float, vs.device()));
                (params, Some(Zero { shard, grads }))
            }
        };
        Optimizer {
            vars,
            params,
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            eps: hyper.eps,
            weight_decay: hyper.weight_decay,
            t: 0,
            group,
            grads,
            zero,
            muon,
            peak_lr: hyper.lr,
        }
    }

    /// What Muon trains and what AdamW does, for the log; `None` without Muon.
    pub fn summary(&self) -> Option<String> {
        let (_, matrices) = self.muon.as_ref()?;
        let muon: usize = matrices.iter().map(|m| m.value.numel()).sum();
        let all: usize = self.vars.iter().map(Tensor::numel).sum();
        let others = self.vars.len() - matrices.len();
        Some(format!(
            "Muon for {} matrices ({muon} parameters), AdamW for {others} other variables ({} parameters)",
            matrices.len(),
            all - muon
        ))
    }

    /// Updates applied so far.
    pub fn updates(&self) -> u64 {
        self.t
    }

    pub fn zero_grad(&self) {
        for var in &self.vars {
            let mut grad = var.grad();
            if grad.defined() {
                // In place: across ranks it is a view of the flat gradients.
                let _ = grad.zero_();
            }
        }
    }

    /// Scales the gradients so that their global L2 norm is at most `max`
    /// (0: no clipping) and returns the norm before scaling.
    pub fn clip_grad_norm(&self, max: f64) -> Result<f64> {
        if let (Some(zero), Some(group)) = (&self.zero, self.group) {
            // The norm over every rank's share; each scales its own.
            let squares = zero.grads.square().sum(Kind::Double);
            group.all_reduce(&squares)?;
            let norm = squares.double_value(&[]).sqrt();
            if max > 0.0 && norm > max {
                let _ = tch::no_grad(|| zero.grads.shallow_clone().g_mul_scalar_(max / (norm + 1e-6)));
            }
            return Ok(norm);
        }
        let grads: Vec<Tensor> = self.vars.iter().map(Tensor::grad).filter(Tensor::defined).collect();
        if grads.is_empty() {
            return Ok(0.0);
        }
        // SAFETY: the gradients are distinct tensors, viewed once each, and
        // nothing else runs meanwhile.
        let on_cpu: Option<Vec<&mut [f32]>> = grads.iter().map(|g| unsafe { cpu_floats(g) }).collect();
        match on_cpu {
            Some(mut slices) => {
                let norm = floats::sum_of_squares(&slices).sqrt();
                if max > 0.0 && norm > max {
                    floats::scale(&mut slices, (max / (norm + 1e-6)) as f32);
                }
                Ok(norm)
            }
            None => {
                let squares: Vec<Tensor> = grads.iter().map(|g| g.square().sum(Kind::Float)).collect();
                let norm = Tensor::stack(&squares, 0).sum(Kind::Float).sqrt().double_value(&[]);
                if max > 0.0 && norm > max {
                    tch::no_grad(|| {
                        for mut g in grads {
                            let _ = g.g_mul_scalar_(max / (norm + 1e-6));
                        }
                    });
                }
                Ok(norm)
            }
        }
    }

    /// Makes each rank's gradients the sum over the ranks (see [`Optimizer`]);
    /// nothing in one process.
    pub fn reduce_gradients(&self) -> Result<()> {
        let (Some(group), Some(grads)) = (self.group, &self.grads) else { return Ok(()) };
        match &self.zero {
            Some(zero) => group.reduce_scatter(&zero.grads, grads),
            None => {
                let total = grads.numel() as i64;
                for at in (0..total).step_by(BUCKET as usize) {
                    group.all_reduce(&grads.narrow(0, at, BUCKET.min(total - at)))?;
                }
                Ok(())
            }
        }
    }

    /// Bytes of this rank's optimizer state: AdamW's moments (under ZeRO-1
    /// its share) and Muon's momentum buffers.
    pub fn state_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64;
        let adam: u64 = self.params.iter().map(|p| bytes(&p.m) + bytes(&p.v)).sum();
        adam + self.muon.iter().flat_map(|(_, matrices)| matrices).map(|m| bytes(&m.buf)).sum::<u64>()
    }

    /// The optimizer state's file in a checkpoint: one for all ranks, or one per
    /// rank under ZeRO-1.
    pub fn file_name(&self) -> String {
        match (&self.zero, self.group) {
            (Some(_), Some(group)) => format!("optimizer.rank-{}-of-{}.safetensors", group.rank(), group.size()),
            _ => "optimizer.safetensors".to_string(),
        }
    }

    /// Whether this rank writes its state into a checkpoint: under
    /// ZeRO-1 every rank, else the first (they are the same on all).
    pub fn saves(&self) -> bool {
        self.zero.is_some() || self.group.is_none_or(|g| g.rank() == 0)
    }

    /// One update at learning rate `lr` from the accumulated gradients
    /// (after [`Optimizer::reduce_gradients`] across ranks).
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.t += 1;
        if let Some((hyper, matrices)) = &self.muon {
            if let (Some(zero), Some(group), Some(grads)) = (&self.zero, self.group, &self.grads) {
                // Every rank's share of the summed gradients into every rank's.
                group.all_gather(grads, &zero.grads)?;
            }
            let muon_lr = hyper.lr * lr / self.peak_lr;
            // Handles to each matrix, its gradient and buffer (a tensor is not `Sync`).
            // A matrix the loss did not reach has no gradient and, as under AdamW, no update.
            let work: Vec<_> = matrices
                .iter()
                .map(|m| (m.value.shallow_clone(), m.value.grad(), m.buf.shallow_clone()))
                .filter(|(_, grad, _)| grad.defined())
                .collect();
            let one = |(value, grad, buf): (Tensor, Tensor, Tensor)| muon::update(&value, &grad, &buf, muon_lr, hyper);
            if matrices.first().is_some_and(|m| m.value.device() == tch::Device::Cpu) {
                // The matrices are small: one a core, each on one libtorch
                // thread, beats each on all of them. Each matrix's update is
                // its own, so the result does not depend on which core takes it.
                work.into_par_iter().for_each(|m| {
                    tch::set_num_threads(1);
                    one(m);
                });
            } else {
                work.into_iter().for_each(one);
            }
        }
        let rule = Rule {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            bias1: 1.0 - self.beta1.powi(self.t as i32),
            bias2_sqrt: (1.0 - self.beta2.powi(self.t as i32)).sqrt(),
        };
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| match (p.shard_offset, &self.zero) {
                (Some(at), Some(zero)) => zero.grads.narrow(0, at, p.value.numel() as i64),
                _ => p.value.grad(),
            })
            .collect();
        // Work for rayon: CPU variables in chunks, each (value, g, m, v, decay).
        let mut chunks = Vec::new();
        tch::no_grad(|| {
            for (p, g) in self.params.iter().zip(&grads) {
                if p.muon || !g.defined() {
                    continue;
                }
                let decay = if p.decay { 1.0 - lr * self.weight_decay } else { 1.0 };
                // SAFETY: a variable, its gradient and its two moments are four
                // distinct tensors, viewed once each, and nothing else runs
                // during the update.
                match unsafe { (cpu_floats(&p.value), cpu_floats(g), cpu_floats(&p.m), cpu_floats(&p.v)) } {
                    (Some(value), Some(g), Some(m), Some(v)) => chunks.extend(
                        value
                            .chunks_mut(CHUNK)
                            .zip(g.chunks(CHUNK))
                            .zip(m.chunks_mut(CHUNK))
                            .zip(v.chunks_mut(CHUNK))
                            .map(|(((value, g), m), v)| (value, g, m, v, decay)),
                    ),
                    _ => rule.apply_tensors(p, g, decay),
                }
            }
        });
        chunks.into_par_iter().for_each(|(value, g, m, v, decay)| rule.apply(value, g, m, v, decay));
        self.gather()
    }

    /// Under ZeRO-1, every rank's updated elements into every rank's variables.
    fn gather(&self) -> Result<()> {
        let (Some(zero), Some(group)) = (&self.zero, self.group) else { return Ok(()) };
        let mut mine: Vec<Tensor> = self.params.iter().map(|p| p.value.shallow_clone()).collect();
        let owned: i64 = mine.iter().map(|t| t.numel() as i64).sum();
        mine.push(Tensor::zeros([zero.shard - owned], (Kind::Float, zero.grads.device())));
        let all = Tensor::zeros([zero.shard * group.size() as i64], (Kind::Float, zero.grads.device()));
        group.all_gather(&all, &Tensor::cat(&mine, 0))?;
        let mut at = 0;
        tch::no_grad(|| {
            for var in &self.vars {
                let n = var.numel() as i64;
                var.detach().view([-1]).copy_(&all.narrow(0, at, n));
                at += n;
            }
        });
        Ok(())
    }

    /// Writes the state and the update count (safetensors: AdamW's moments
    /// `m.NAME`, `v.NAME`, Muon's buffers `momentum.NAME`, and `t`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.params.len() + 1);
        for p in self.params.iter().filter(|p| !p.muon) {
            tensors.push((format!("m.{}", p.name), p.m.shallow_clone()));
            tensors.push((format!("v.{}", p.name), p.v.shallow_clone()));
        }
        for m in self.muon.iter().flat_map(|(_, matrices)| matrices) {
            tensors.push((format!("momentum.{}", m.name), m.buf.shallow_clone()));
        }
        tensors.push(("t".to_string(), Tensor::from(self.t as i64)));
        Tensor::write_safetensors(&tensors, path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Reads back what [`Optimizer::save`] wrote, for the same variables.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let mut saved: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(path).with_context(|| format!("cannot read {}", path.display()))?.into_iter().collect();
        let mut take = |name: &str| saved.remove(name).with_context(|| format!("{}: no tensor `{name}`", path.display()));
        self.t = take("t")?.int64_value(&[]) as u64;
        let adam = self.params.iter_mut().filter(|p| !p.muon).flat_map(|p| [(&mut p.m, "m", &p.name), (&mut p.v, "v", &p.name)]);
        let muon = self.muon.iter_mut().flat_map(|(_, matrices)| matrices).map(|m| (&mut m.buf, "momentum", &m.name));
        for (state, prefix, name) in adam.chain(muon) {
            let value = take(&format!("{prefix}.{name}"))?;
            if value.size() != state.size() {
                bail!("{}: `{prefix}.{name}` has shape {:?}, the model {:?}", path.display(), value.size(), state.size());
            }
            tch::no_grad(|| state.copy_(&value));
        }
        Ok(())
    }
}

/// The update rule of one step, for each element:
/// m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², then
/// value ← value·decay − lr · (m / bias1) / (√v / bias2_sqrt + eps).
struct Rule {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    /// 1 − β1ᵗ
    bias1: f64,
    /// √(1 − β2ᵗ)
    bias2_sqrt: f64,
}

impl Rule {
    /// In one pass over the elements of a variable on the CPU: the update is
    /// memory-bound, and a tensor op per term would read and write the
    /// weights and moments several times over.
    fn apply(&self, value: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decay: f64) {
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let (step, inv_bias2_sqrt, eps, decay) =
            ((self.lr / self.bias1) as f32, (1.0 / self.bias2_sqrt) as f32, self.eps as f32, decay as f32);
        for (((x, &g), m), v) in value.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *x = *x * decay - step * *m / (v.sqrt() * inv_bias2_sqrt + eps);
        }
    }

    /// The same with tensor ops, for any device and dtype; in place, two
    /// temporaries a variable.
    fn apply_tensors(&self, p: &Param, g: &Tensor, decay: f64) {
        let (mut value, mut m, mut v) = (p.value.shallow_clone(), p.m.shallow_clone(), p.v.shallow_clone());
        let _ = m.lerp_(g, 1.0 - self.beta1); // β1·m + (1−β1)·g
        let _ = v.lerp_(&g.square(), 1.0 - self.beta2); // β2·v + (1−β2)·g²
        if decay != 1.0 {
            let _ = value.g_mul_scalar_(decay);
        }
        if self.lr == 0.0 {
            return;
        }
        // value −= lr/bias1 · m / (√v/bias2_sqrt + eps), as value += m / denom.
        let mut denom = v.sqrt();
        let _ = denom.g_div_scalar_(self.bias2_sqrt).g_add_scalar_(self.eps).g_mul_scalar_(-self.bias1 / self.lr);
        let _ = value.addcdiv_(&m, &denom);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testing::{build, max_diff, tiny, torch_rng};

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
        let mut opt = Optimizer::new(&vs, &hyper, crate::dist::world(), false);
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
            opt.step(lr).unwrap();
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

    /// The one-pass CPU update and the tensor-op update (the one other
    /// devices take) agree.
    #[test]
    fn cpu_loop_matches_tensor_ops() {
        let _rng = torch_rng();
        tch::manual_seed(7);
        let rule =
            Rule { lr: 3e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, bias1: 1.0 - 0.9f64.powi(3), bias2_sqrt: (1.0 - 0.95f64.powi(3)).sqrt() };
        let randn = || Tensor::randn([1000], (Kind::Float, tch::Device::Cpu));
        let (value, g, m, v) = (randn(), randn(), randn() * 0.1, randn().square() * 0.01);
        let by_ops =
            Param { name: "w".into(), value: value.copy(), m: m.copy(), v: v.copy(), decay: true, muon: false, shard_offset: None };
        tch::no_grad(|| rule.apply_tensors(&by_ops, &g, 0.999));
        let (value, m, v) = (value.copy(), m.copy(), v.copy());
        // SAFETY: four distinct tensors, used by nothing else here.
        let slices = unsafe { (cpu_floats(&value), cpu_floats(&g), cpu_floats(&m), cpu_floats(&v)) };
        let (Some(x), Some(gs), Some(ms), Some(vs)) = slices else { panic!("CPU f32 tensors") };
        rule.apply(x, gs, ms, vs, 0.999);
        for (name, a, b) in [("value", &value, &by_ops.value), ("m", &m, &by_ops.m), ("v", &v, &by_ops.v)] {
            assert!(a.allclose(b, 1e-6, 1e-7, false), "{name}: {}", max_diff(a, b));
        }
    }

    /// Muon leaves a matrix the loss did not reach unchanged, as AdamW does.
    #[test]
    fn muon_skips_matrices_without_a_gradient() {
        let _rng = torch_rng();
        let (vs, _) = build(&tiny("gpt2", json!({})), 2);
        let hyper = Hyper { optimizer: OptimizerName::Muon, ..Default::default() };
        let mut opt = Optimizer::new(&vs, &hyper, crate::dist::world(), false);
        let vars = vs.variables();
        let (reached, untouched) = (&vars["transformer.h.0.mlp.c_fc.weight"], &vars["transformer.h.1.mlp.c_fc.weight"]);
        let before = (reached.copy(), untouched.copy());
        opt.zero_grad();
        reached.sum(Kind::Float).backward();
        opt.step(1e-3).unwrap();
        assert!(!reached.equal(&before.0), "the matrix with a gradient moves");
        assert!(untouched.equal(&before.1), "the one without stays");
    }

    #[test]
    fn clipping_bounds_the_global_norm_and_state_round_trips() {
        let _rng = torch_rng();
        let dir = tempfile::tempdir().unwrap();
        let (vs, _) = build(&tiny("llama", json!({})), 1);
        let mut opt = Optimizer::new(&vs, &Hyper::default(), crate::dist::world(), false);
        let vars = vs.variables();
        let total: Tensor = vars.values().map(|t| t.square().sum(Kind::Float)).fold(Tensor::from(0f32), |a, b| a + b);
        (total * 100.0).backward();
        let norm = opt.clip_grad_norm(1.0).unwrap();
        assert!(norm > 1.0);
        assert!((opt.clip_grad_norm(0.0).unwrap() - 1.0).abs() < 1e-4);
        opt.step(1e-3).unwrap();
        let path = dir.path().join("optimizer.safetensors");
        opt.save(&path).unwrap();
        let mut again = Optimizer::new(&vs, &Hyper::default(), crate::dist::world(), false);
        again.load(&path).unwrap();
        assert_eq!(again.updates(), 1);
        for (a, b) in opt.params.iter().zip(&again.params) {
            assert!(a.m.equal(&b.m) && a.v.equal(&b.v), "{}", a.name);
        }
    }
}

//! Data parallelism over CPU cores inside one micro-batch.
//!
//! A small model's operations are too short for libtorch's intra-op threads:
//! each one ends at a barrier where the cores wait for each other, and
//! profiles of the default model spend most of their time there. Instead,
//! each core takes a slice of the batch's rows and runs the whole forward
//! and backward pass on its own model replica, single-threaded; the gradients
//! are then added into the main model's, in replica order, so the result is
//! the same on every run (and a resumed run stays bitwise equal).
//!
//! Used on the CPU without dropout only: libtorch's random generator is one
//! per process, and threads drawing from it concurrently would make dropout
//! masks depend on scheduling.

use anyhow::Result;
use tch::{nn, Device, Tensor};

use crate::model::{Gpt, ModelConfig};

/// Model replicas for all cores but the calling thread's, which uses the
/// main model.
pub struct Replicas {
    /// The main model's variables, by name.
    main: Vec<Tensor>,
    replicas: Vec<Replica>,
}

struct Replica {
    gpt: Gpt,
    /// `vs`'s variables in the order of `Replicas::main`.
    vars: Vec<Tensor>,
}

impl Replicas {
    /// Replicas of the model in `vs` for `threads` cores, or `None` where
    /// data parallelism does not apply (one thread, a GPU, dropout).
    pub fn new(vs: &nn::VarStore, config: &ModelConfig, threads: usize) -> Result<Option<Replicas>> {
        if threads < 2 || vs.device() != Device::Cpu || config.dropout > 0.0 {
            return Ok(None);
        }
        let sorted = |vs: &nn::VarStore| {
            let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            vars.into_iter().map(|(_, t)| t).collect::<Vec<_>>()
        };
        let mut replicas = Vec::with_capacity(threads - 1);
        for _ in 1..threads {
            let vs = nn::VarStore::new(Device::Cpu);
            let gpt = Gpt::new(&vs.root(), config)?;
            replicas.push(Replica { vars: sorted(&vs), gpt });
        }
        Ok(Some(Replicas { main: sorted(vs), replicas }))
    }

    /// Forward and backward passes of the rows of `x` and `y` split across
    /// the cores, gradients accumulated into `gpt` (the main model); returns
    /// the loss. `loss_fn(model, hidden, y)` is the mean loss of a slice of
    /// rows; each slice's is weighted by its share of the rows, so the
    /// gradients are those of the whole batch's mean.
    pub fn backward(
        &mut self,
        gpt: &Gpt,
        x: &Tensor,
        y: &Tensor,
        loss_fn: impl Fn(&Gpt, &Tensor, &Tensor) -> Tensor + Sync,
    ) -> f64 {
        tch::no_grad(|| {
            for r in &mut self.replicas {
                for (dst, src) in r.vars.iter_mut().zip(&self.main) {
                    dst.copy_(src);
                }
            }
        });
        let rows = x.size()[0];
        let parts = (self.replicas.len() + 1) as i64;
        let mut slices: Vec<(Tensor, Tensor)> = x.chunk(parts, 0).into_iter().zip(y.chunk(parts, 0)).collect();
        let pass = |model: &Gpt, x: &Tensor, y: &Tensor| {
            let share = x.size()[0] as f64 / rows as f64;
            model.backward(x, true, |h| loss_fn(model, h, y) * share).double_value(&[])
        };
        let (x0, y0) = slices.remove(0);
        let losses: Vec<f64> = std::thread::scope(|s| {
            let workers: Vec<_> = self
                .replicas
                .iter_mut()
                .zip(slices)
                .map(|(r, (x, y))| {
                    let pass = &pass;
                    s.spawn(move || {
                        tch::set_num_threads(1);
                        pass(&r.gpt, &x, &y)
                    })
                })
                .collect();
            tch::set_num_threads(1);
            let mut losses = vec![pass(gpt, &x0, &y0)];
            losses.extend(workers.into_iter().map(|w| w.join().expect("a replica's pass panicked")));
            losses
        });
        tch::no_grad(|| {
            for r in &self.replicas {
                for (main, replica) in self.main.iter().zip(&r.vars) {
                    let (mut total, mut grad) = (main.grad(), replica.grad());
                    if grad.defined() {
                        let _ = total.g_add_(&grad);
                        let _ = grad.zero_();
                    }
                }
            }
        });
        tch::set_num_threads(parts as i32);
        losses.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{build, tiny, torch_rng};
    use crate::model;

    /// The split batch gives the whole batch's loss and gradients, and the
    /// same ones on every run.
    #[test]
    fn replicas_give_the_whole_batch_gradients() {
        let _rng = torch_rng();
        let config = tiny("gpt2", serde_json::json!({}));
        let (vs, gpt) = build(&config, 3);
        let x = Tensor::randint(config.vocab_size, [5, config.context], (tch::Kind::Int64, Device::Cpu));
        let y = x.roll([-1], [1]);
        let loss_fn = |m: &Gpt, h: &Tensor, y: &Tensor| model::loss(&m.logits(h), y);
        let grads = |vs: &nn::VarStore| {
            let mut g: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.grad().copy())).collect();
            g.sort_by(|a, b| a.0.cmp(&b.0));
            for (_, t) in vs.variables() {
                let _ = t.grad().zero_();
            }
            g
        };

        let whole = gpt.backward(&x, true, |h| loss_fn(&gpt, h, &y)).double_value(&[]);
        let expected = grads(&vs);
        let mut replicas = Replicas::new(&vs, &config, 2).unwrap().expect("two CPU threads, no dropout");
        let mut runs = Vec::new();
        for _ in 0..2 {
            let split = replicas.backward(&gpt, &x, &y, loss_fn);
            assert!((split - whole).abs() < 1e-5, "{split} vs {whole}");
            runs.push(grads(&vs));
        }
        for ((name, want), (_, got)) in expected.iter().zip(&runs[0]) {
            assert!(got.allclose(want, 1e-5, 1e-6, false), "{name}");
        }
        for ((name, a), (_, b)) in runs[0].iter().zip(&runs[1]) {
            assert!(a.equal(b), "{name} differs between runs");
        }
        let dropout = ModelConfig { dropout: 0.1, ..config.clone() };
        assert!(Replicas::new(&vs, &dropout, 2).unwrap().is_none());
        assert!(Replicas::new(&vs, &config, 1).unwrap().is_none());
    }
}

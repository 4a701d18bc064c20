//! Data parallelism over the CPU cores inside one micro-batch.
//!
//! libtorch spreads each operation over its intra-op threads. A small
//! model's operations are too short for that to pay: each ends at a barrier,
//! and while one core runs the serial parts (dispatch, autograd bookkeeping)
//! the others spin. Here each core instead takes a slice of the batch's rows
//! and runs a whole forward and backward pass of its own, single-threaded
//! (`bench/RESULTS.md` has the figures).
//!
//! * The calling thread runs the first slice on the main model; each further
//!   core has a persistent worker thread with a **replica**: a [`Gpt`] whose
//!   variables share their memory with the main model's (so an optimizer
//!   update of the main model is the replicas' update too, with no copy) but
//!   are leaves of their own, with gradients of their own.
//! * Each replica accumulates its slices' gradients over an update's
//!   micro-batches; then [`Replicas::add_gradients`] adds them into the main
//!   model's, replica by replica in a fixed order, and resets them. The sums
//!   thus happen in the same order on every run: training is deterministic
//!   for a given thread count and a resumed run ends bitwise equal to an
//!   uninterrupted one. They are also the sums of ranks that each train a
//!   slice (`processes`), whose all-reduce adds the ranks' in order. (Splitting a batch changes the order of
//!   floating-point sums, so the weights differ in their last bits from an
//!   unsplit run's, as they do between different intra-op thread counts.)
//!
//! CPU only. [`Replicas::run`] runs any per-replica work (the evaluation
//! stage scores its batches this way); training through the replicas must
//! be without dropout: libtorch has one random generator per process, and
//! threads drawing dropout masks from it at once would make the masks depend
//! on scheduling. [`Replicas::new`] says `None` where it does not apply, and
//! the caller runs the plain way.

use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Result};
use tch::{nn, Device, Tensor};

use crate::fast::floats::{self, cpu_floats};
use crate::model::{Gpt, ModelConfig};

/// A slice's forward and backward pass: `(model, x, y, weight)` → the
/// weighted loss. The pass multiplies its slice's mean loss by `weight`: the
/// slice's fraction of the batch's rows times the caller's scale, so that the
/// gradients add up to the scaled mean over the whole batch.
pub type Pass = fn(&Gpt, &Tensor, &Tensor, f64) -> f64;

/// Model replicas on worker threads, one for every core but the caller's.
pub struct Replicas {
    /// The main model's trainable variables, in name order.
    main: Vec<Tensor>,
    workers: Vec<Worker>,
    /// Workers holding gradients not yet added into the main model's.
    pending: usize,
    /// The caller's libtorch threads, given back on drop.
    caller_threads: i32,
}

/// Work for a worker: runs on its thread, with its replica.
type Job = Box<dyn FnOnce(&Gpt) + Send>;

/// Work for one replica (or the main model) that returns an `R`.
pub type Task<R> = Box<dyn FnOnce(&Gpt) -> R + Send>;

struct Worker {
    /// `None` once shut down.
    jobs: Option<mpsc::Sender<Job>>,
    /// The replica's variables in the order of [`Replicas::main`]; handles to
    /// the tensors the worker's model holds, touched only while it is idle.
    vars: Vec<Tensor>,
    thread: Option<JoinHandle<()>>,
}

/// The variables of `vs`, in name order.
fn sorted_vars(vs: &nn::VarStore) -> Vec<Tensor> {
    super::sorted_variables(vs).into_iter().map(|(_, t)| t).collect()
}

impl Replicas {
    /// Replicas of the model `config` built in `vs` for `threads` cores, or
    /// `None` where data parallelism does not apply (one thread, not the
    /// CPU). Sets the calling thread's libtorch threads to 1 until the
    /// replicas are dropped: meanwhile the cores are theirs.
    pub fn new(vs: &nn::VarStore, config: &ModelConfig, threads: usize) -> Result<Option<Replicas>> {
        if threads < 2 || vs.device() != Device::Cpu {
            return Ok(None);
        }
        let caller_threads = tch::get_num_threads();
        tch::set_num_threads(1);
        let main = sorted_vars(vs);
        let mut workers = Vec::with_capacity(threads - 1);
        for i in 1..threads {
            let replica_vs = nn::VarStore::new(Device::Cpu);
            // Built with whatever initial values; its variables then take the
            // main model's memory.
            let gpt = tch::no_grad(|| Gpt::new(&replica_vs.root(), config))?;
            let mut vars = sorted_vars(&replica_vs);
            anyhow::ensure!(vars.len() == main.len(), "a replica has {} variables, the model {}", vars.len(), main.len());
            for (replica, main) in vars.iter_mut().zip(&main) {
                replica.set_data(main);
                // A frozen variable (a fine-tuned model's base) stays frozen.
                let _ = replica.set_requires_grad(main.requires_grad());
            }
            let (jobs, inbox) = mpsc::channel::<Job>();
            let thread = std::thread::Builder::new().name(format!("replica-{i}")).spawn(move || {
                let _vs = replica_vs;
                tch::set_num_threads(1);
                for job in inbox {
                    job(&gpt);
                }
            })?;
            workers.push(Worker { jobs: Some(jobs), vars, thread: Some(thread) });
        }
        Ok(Some(Replicas { main, workers, pending: 0, caller_threads }))
    }

    /// Runs `pass` on the rows of `x` and `y` split across the cores, the
    /// first slice on `gpt` (the main model), each slice's gradients
    /// accumulating in its own model until [`Replicas::add_gradients`];
    /// returns the summed loss: the mean over the batch times `scale`.
    pub fn backward(&mut self, gpt: &Gpt, x: &Tensor, y: &Tensor, scale: f64, pass: Pass) -> Result<f64> {
        let (loss, busy) = self.split(gpt, x, y, scale, pass)?;
        self.pending = self.pending.max(busy);
        Ok(loss)
    }

    /// [`Replicas::backward`] for a pass that computes no gradients (an
    /// evaluation): the sum of what the slices' passes return.
    pub fn map(&mut self, gpt: &Gpt, x: &Tensor, y: &Tensor, scale: f64, pass: Pass) -> Result<f64> {
        Ok(self.split(gpt, x, y, scale, pass)?.0)
    }

    /// Runs the slices; returns the sum of their passes and how many workers
    /// took part.
    fn split(&mut self, gpt: &Gpt, x: &Tensor, y: &Tensor, scale: f64, pass: Pass) -> Result<(f64, usize)> {
        let rows = x.size()[0];
        let parts = self.parts() as i64;
        let weight = |t: &Tensor| scale * t.size()[0] as f64 / rows as f64;
        // A batch of fewer rows than cores leaves the last workers idle.
        let tasks: Vec<Task<f64>> = x
            .chunk(parts, 0)
            .into_iter()
            .zip(y.chunk(parts, 0))
            .map(|(x, y)| {
                let weight = weight(&x);
                Box::new(move |gpt: &Gpt| pass(gpt, &x, &y, weight)) as Task<f64>
            })
            .collect();
        let losses = self.run(gpt, tasks)?;
        Ok((losses.iter().sum(), losses.len() - 1))
    }

    /// How many tasks [`Replicas::run`] runs at once: the workers' and the
    /// caller's.
    pub fn parts(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs the first task on `gpt` (the main model) on the calling thread
    /// and each further one on a worker's replica, all at once; at most
    /// [`Replicas::parts`] tasks. Returns their results in order.
    pub fn run<R: Send + 'static>(&self, gpt: &Gpt, tasks: Vec<Task<R>>) -> Result<Vec<R>> {
        anyhow::ensure!(tasks.len() <= self.parts(), "{} tasks for {} replicas", tasks.len(), self.parts());
        let mut tasks = tasks.into_iter();
        let Some(first) = tasks.next() else { return Ok(Vec::new()) };
        let (outbox, results) = mpsc::channel();
        let mut sent = 0;
        for (i, (w, task)) in self.workers.iter().zip(tasks).enumerate() {
            let outbox = outbox.clone();
            let job: Job = Box::new(move |gpt| {
                let _ = outbox.send((i, task(gpt)));
            });
            w.jobs.as_ref().expect("running").send(job).map_err(|_| anyhow!("a model replica's thread has stopped"))?;
            sent += 1;
        }
        drop(outbox);
        let mut out = vec![first(gpt)];
        let mut rest: Vec<Option<R>> = (0..sent).map(|_| None).collect();
        for _ in 0..sent {
            let (i, r) = results.recv().map_err(|_| anyhow!("a model replica's pass panicked; its message is above"))?;
            rest[i] = Some(r);
        }
        out.extend(rest.into_iter().map(|r| r.expect("every worker answered")));
        Ok(out)
    }

    /// Adds the replicas' gradients into the main model's and resets theirs:
    /// after an update's last [`Replicas::backward`].
    pub fn add_gradients(&mut self) -> Result<()> {
        let busy = std::mem::take(&mut self.pending);
        // Each replica's gradients into the main model's, replica by replica.
        for w in &self.workers[..busy] {
            let mut pairs = Vec::with_capacity(self.main.len());
            let (totals, parts): (Vec<Tensor>, Vec<Tensor>) =
                self.main.iter().zip(&w.vars).map(|(main, replica)| (main.grad(), replica.grad())).unzip();
            for (total, part) in totals.iter().zip(&parts) {
                if !part.defined() {
                    continue;
                }
                // Every variable takes part in every slice's pass, so the
                // main model's own slice has defined its gradient.
                anyhow::ensure!(total.defined(), "a variable has a gradient in a replica only");
                // SAFETY: distinct gradient tensors of CPU variables, viewed
                // once each, while the worker is idle.
                match unsafe { (cpu_floats(total), cpu_floats(part)) } {
                    (Some(t), Some(p)) => pairs.push((t, p)),
                    _ => anyhow::bail!("replicas train on the CPU in fp32"),
                }
            }
            floats::add_and_clear(&mut pairs);
        }
        Ok(())
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.jobs = None; // ends the worker's loop
            if let Some(thread) = w.thread.take() {
                let _ = thread.join();
            }
        }
        tch::set_num_threads(self.caller_threads);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{build, max_diff, tiny, torch_rng};

    fn grads(vs: &nn::VarStore) -> Vec<Tensor> {
        let grads = sorted_vars(vs).iter().map(|t| t.grad().copy()).collect();
        for t in sorted_vars(vs) {
            let _ = t.grad().zero_();
        }
        grads
    }

    /// The split batch gives the whole batch's loss and gradients (to
    /// rounding), the same bits on every run, and the replicas see the main
    /// model's updated weights.
    #[test]
    fn replicas_give_the_whole_batch_gradients() {
        let _rng = torch_rng();
        let config = tiny("gpt2", serde_json::json!({}));
        let (vs, gpt) = build(&config, 3);
        let x = Tensor::randint(config.vocab_size, [5, config.context], (tch::Kind::Int64, Device::Cpu));
        let y = x.roll([-1], [1]);
        let pass: Pass = |gpt, x, y, weight| gpt.backward_lm(x, y, weight).double_value(&[]);

        let whole = gpt.backward_lm(&x, &y, 0.5).double_value(&[]);
        let expected = grads(&vs);
        let caller_threads = tch::get_num_threads();
        let mut replicas = Replicas::new(&vs, &config, 3).unwrap().expect("three CPU threads, no dropout");
        assert_eq!(tch::get_num_threads(), 1, "the cores are the replicas'");
        let runs: Vec<Vec<Tensor>> = (0..2)
            .map(|_| {
                let split = replicas.backward(&gpt, &x, &y, 0.5, pass).unwrap();
                replicas.add_gradients().unwrap();
                assert!((split - whole).abs() < 1e-6, "{split} vs {whole}");
                grads(&vs)
            })
            .collect();
        for (want, got) in expected.iter().zip(&runs[0]) {
            assert!(max_diff(want, got) < 1e-6, "{}", max_diff(want, got));
        }
        for (a, b) in runs[0].iter().zip(&runs[1]) {
            assert!(a.equal(b), "the same batch gives the same bits");
        }
        // An update of the main model is the replicas' too: the split loss follows.
        let _ = tch::no_grad(|| sorted_vars(&vs)[0].g_mul_scalar_(0.5));
        let moved = gpt.backward_lm(&x, &y, 0.5).double_value(&[]);
        assert!((replicas.backward(&gpt, &x, &y, 0.5, pass).unwrap() - moved).abs() < 1e-6);
        replicas.add_gradients().unwrap();
        // An evaluation pass: the batch's mean loss, and no gradient moves.
        let eval: Pass = |gpt, x, y, weight| tch::no_grad(|| crate::model::loss(&gpt.forward(x, false), y).double_value(&[])) * weight;
        let mean = tch::no_grad(|| crate::model::loss(&gpt.forward(&x, false), &y).double_value(&[]));
        let _ = grads(&vs); // zeroes them
        assert!((replicas.map(&gpt, &x, &y, 1.0, eval).unwrap() - mean).abs() < 1e-6);
        assert!(grads(&vs).iter().all(|g| g.abs().max().double_value(&[]) == 0.0));
        drop(replicas);
        assert_eq!(tch::get_num_threads(), caller_threads, "threads given back");

        assert!(Replicas::new(&vs, &config, 1).unwrap().is_none());
    }
}

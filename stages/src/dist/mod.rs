//! Training across processes: the ranks of a stage, their rendezvous, and
//! the collectives data parallelism needs, on PyTorch's own distributed
//! engine (c10d), reached from libtorch through `cpp/c10d.cpp`.
//!
//! A stage with `processes = N` runs as N ranks of the stage runner. Each
//! learns its place from the environment, by the conventions the field
//! uses:
//!
//! * torchrun's: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//!   `MASTER_ADDR`, `MASTER_PORT`. The runner's own launcher ([`launch`])
//!   sets these, so does `torchrun` itself; set by anything else (left in a
//!   user's shell) they are an error naming them;
//! * Slurm's, inside an `srun` step: `SLURM_PROCID`, `SLURM_NTASKS`,
//!   `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE`, with `MASTER_ADDR` and
//!   `MASTER_PORT` set by the job script (the allocation's first node).
//!
//! Rank 0 serves a c10d `TCPStore` at the master address; every rank then
//! joins a `ProcessGroupGloo` through it, and collectives on CPU tensors go
//! through Gloo. Collectives on CUDA tensors go through a `ProcessGroupNCCL`
//! on the same store, made at the first of them, in a build with NCCL's
//! headers (`make setup CUDA=1`); each rank then uses the GPU of its local
//! rank ([`crate::device::resolve`]). A collective that waits longer than
//! the group's timeout fails, so a rank that dies or hangs fails the others
//! instead of stalling them.

pub mod launch;

use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tch::Tensor;
use torch_sys::C_tensor;

/// Where this process stands among the ranks of its stage.
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// `None` in a single process.
    group: Option<Group>,
}

static WORLD: OnceLock<World> = OnceLock::new();

/// This process's world: a single process unless [`init`] joined a group.
pub fn world() -> &'static World {
    WORLD.get_or_init(World::single)
}

/// Where the environment places this process, if it names a rank: torchrun's
/// variables, or Slurm's inside an `srun` step. `(rank, size, local_rank,
/// local_size)`.
pub fn placement() -> Result<Option<(usize, usize, usize, usize)>> {
    let var = |name: &str| -> Result<Option<usize>> {
        match std::env::var(name) {
            Ok(v) => Ok(Some(v.trim().parse().with_context(|| format!("{name}={v}: not a number"))?)),
            Err(_) => Ok(None),
        }
    };
    if std::env::var_os("RANK").is_some() || std::env::var_os("WORLD_SIZE").is_some() {
        launched_by_torchrun_or_us()?;
    }
    if let (Some(rank), Some(size)) = (var("RANK")?, var("WORLD_SIZE")?) {
        let local_rank = var("LOCAL_RANK")?.unwrap_or(rank);
        let local_size = var("LOCAL_WORLD_SIZE")?.unwrap_or(size);
        return checked(rank, size, local_rank, local_size);
    }
    // The batch script of a job has SLURM_PROCID too; only a step's tasks are ranks.
    if std::env::var_os("SLURM_STEP_ID").is_some() && std::env::var_os("SLURM_JOB_ID").is_some() {
        if let (Some(rank), Some(size)) = (var("SLURM_PROCID")?, var("SLURM_NTASKS")?) {
            let local_rank = var("SLURM_LOCALID")?.unwrap_or(0);
            // SLURM_NTASKS_PER_NODE reads like "2" or "2(x3)"; the step's local count is SLURM_STEP_TASKS_PER_NODE.
            let per_node = std::env::var("SLURM_STEP_TASKS_PER_NODE").or_else(|_| std::env::var("SLURM_NTASKS_PER_NODE")).ok();
            let local_size = per_node.and_then(|v| v.split(['(', ',']).next()?.parse().ok()).unwrap_or(size);
            return checked(rank, size, local_rank, local_size);
        }
    }
    Ok(None)
}

/// Set by [`launch`] on each rank it starts: the launcher's process id.
pub const LAUNCHER: &str = "LLMFLOW_LAUNCHER";

/// Whether torchrun's variables come from a launcher that sets them: llmflow's
/// own (its process id in [`LAUNCHER`] is this process's parent) or torchrun
/// (`TORCHELASTIC_RUN_ID`). Otherwise they were left in the shell that
/// started `llmflow`, and taking them would make a rank wait for ranks
/// nobody starts until the collective timeout.
fn launched_by_torchrun_or_us() -> Result<()> {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() }.to_string();
    if std::env::var(LAUNCHER).is_ok_and(|pid| pid == parent) || std::env::var_os("TORCHELASTIC_RUN_ID").is_some() {
        return Ok(());
    }
    let set: Vec<String> = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
        .iter()
        .filter_map(|name| Some(format!("{name}={}", std::env::var(name).ok()?)))
        .collect();
    bail!(
        "{} {} set in the environment, but neither llmflow's launcher nor torchrun set them: they were probably left in the shell that started llmflow. Unset them (`unset {}`); `llmflow run` starts a stage's ranks itself",
        set.join(", "),
        if set.len() == 1 { "is" } else { "are" },
        set.iter().map(|s| s.split('=').next().unwrap_or("")).collect::<Vec<_>>().join(" ")
    )
}

fn checked(rank: usize, size: usize, local_rank: usize, local_size: usize) -> Result<Option<(usize, usize, usize, usize)>> {
    ensure!(rank < size && local_rank < local_size, "rank {rank} of {size} (local {local_rank} of {local_size}) is out of range");
    Ok(Some((rank, size, local_rank, local_size)))
}

/// Joins the stage's `processes` ranks, as the environment places this
/// process, with collectives failing after `timeout`; a single process when
/// `processes` is 1 and the environment names no rank.
pub fn init(processes: usize, timeout: Duration) -> Result<&'static World> {
    if let Some(world) = WORLD.get() {
        ensure!(world.size == processes, "this process already trains as one of {} ranks, not {processes}", world.size);
        return Ok(world);
    }
    let world = match placement()? {
        None if processes > 1 => bail!("the stage asks for {processes} processes, but this process was started as no rank of them"),
        None => World::single(),
        // The runner has checked `size` against `processes` for every kind.
        Some((rank, size, local_rank, local_size)) => {
            let group = if size > 1 {
                let host = std::env::var("MASTER_ADDR").context("MASTER_ADDR is not set: where rank 0 serves the rendezvous")?;
                let port: u16 = std::env::var("MASTER_PORT")
                    .context("MASTER_PORT is not set: the rendezvous's port")?
                    .parse()
                    .context("MASTER_PORT is not a port number")?;
                let group = Group::join(&host, port, rank, size, timeout).with_context(|| {
                    format!("rank {rank} of {size} cannot join the process group at {host}:{port} (c10d TCPStore and Gloo)")
                })?;
                // One write, so ranks sharing a stderr (under torchrun) keep their lines whole.
                let line =
                    format!("rank {rank} of {size} (local {local_rank} of {local_size}) joined the process group at {host}:{port}\n");
                std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes())?;
                Some(group)
            } else {
                None
            };
            World { rank, size, group }
        }
    };
    Ok(WORLD.get_or_init(|| world))
}

impl World {
    fn single() -> World {
        World { rank: 0, size: 1, group: None }
    }

    /// Whether this rank writes what the stage publishes and logs.
    pub fn is_first(&self) -> bool {
        self.rank == 0
    }

    /// The process group; `None` in a single process.
    pub fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    /// The sum of `values` over the ranks (each f64 in every rank's order).
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        let Some(group) = &self.group else { return Ok(values.to_vec()) };
        let t = Tensor::from_slice(values);
        group.all_reduce(&t)?;
        Ok(Vec::<f64>::try_from(&t)?)
    }

    /// Makes whole on every rank a tensor whose rows each rank filled for
    /// itself, leaving zeros in the others': the sum over the ranks, in
    /// place (adding zeros is exact).
    pub fn merge(&self, t: &Tensor) -> Result<()> {
        match &self.group {
            Some(group) => group.all_reduce(t),
            None => Ok(()),
        }
    }

    /// [`World::merge`] for token lists: each rank filled its own and left
    /// the others' empty.
    pub fn merge_lists(&self, lists: Vec<Vec<i64>>) -> Result<Vec<Vec<i64>>> {
        if self.group.is_none() {
            return Ok(lists);
        }
        let lengths: Vec<usize> =
            self.sum(&lists.iter().map(|l| l.len() as f64).collect::<Vec<_>>())?.iter().map(|&n| n as usize).collect();
        let width = lengths.iter().copied().max().unwrap_or(0);
        if width == 0 {
            return Ok(lists);
        }
        let mut flat = vec![0i64; lists.len() * width];
        for (row, list) in flat.chunks_mut(width).zip(&lists) {
            row[..list.len()].copy_from_slice(list);
        }
        let t = Tensor::from_slice(&flat);
        self.merge(&t)?;
        let flat = Vec::<i64>::try_from(&t)?;
        Ok(flat.chunks(width).zip(lengths).map(|(row, n)| row[..n].to_vec()).collect())
    }

    /// The `width` values of each of `n` rows, each rank computing its rows
    /// ([`World::rows`]) with `of(start..end)`: every rank gets all of them
    /// (merged as in [`World::merge`]).
    pub fn rows_of(&self, n: usize, width: usize, of: impl FnOnce(std::ops::Range<usize>) -> Result<Vec<f64>>) -> Result<Vec<f64>> {
        if self.group.is_none() {
            return of(0..n);
        }
        let (start, end) = self.rows(n);
        let mut all = vec![0.0; n * width];
        if start < end {
            let mine = of(start..end)?;
            ensure!(mine.len() == (end - start) * width, "{} values for {} rows of {width}", mine.len(), end - start);
            all[start * width..end * width].copy_from_slice(&mine);
        }
        self.sum(&all)
    }

    /// Waits until every rank has come here.
    pub fn barrier(&self) -> Result<()> {
        self.sum(&[0.0]).map(drop)
    }

    /// This rank's rows `[start, end)` of a batch of `rows`: consecutive,
    /// equal slices in rank order, as the single process would split them.
    pub fn rows(&self, rows: usize) -> (usize, usize) {
        (self.rank * rows / self.size, (self.rank + 1) * rows / self.size)
    }

    /// This rank's [`World::rows`] of a batch's `items`, and its share of
    /// the batch by `weight`: an item's 1 where the loss is a mean over
    /// items, its counted tokens where it is a mean over tokens. Each rank's
    /// mean loss times its share adds up, over the ranks, to the batch's.
    /// (A batch of no weight at all is shared by rows.)
    pub fn share<T>(&self, mut items: Vec<T>, weight: impl Fn(&T) -> f64) -> (Vec<T>, f64) {
        let rows = items.len() as f64;
        let total: f64 = items.iter().map(&weight).sum();
        let (start, end) = self.rows(items.len());
        items.truncate(end);
        let mine: Vec<T> = items.drain(start..).collect();
        let share = match total > 0.0 {
            true => mine.iter().map(&weight).sum::<f64>() / total,
            false => mine.len() as f64 / rows,
        };
        (mine, share)
    }
}

extern "C" {
    fn llmflow_c10d_gloo(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        serve: bool,
        iface: *const c_char,
        bind_host: *const c_char,
        error: *mut c_char,
        error_len: usize,
    ) -> *mut std::ffi::c_void;
    fn llmflow_c10d_free(group: *mut std::ffi::c_void);
    fn llmflow_set_grad(var: *mut C_tensor, grad: *mut C_tensor);
    fn llmflow_c10d_collective(
        group: *mut std::ffi::c_void,
        op: c_int,
        a: *mut C_tensor,
        b: *mut C_tensor,
        root: c_int,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// A c10d process group over Gloo, with its TCPStore.
pub struct Group {
    ptr: *mut std::ffi::c_void,
    rank: usize,
    size: usize,
}

// SAFETY: c10d process groups are used from any thread; this crate calls a
// group from one thread at a time (`&self` methods wait for each collective).
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

/// Makes `grad`, a tensor of `var`'s shape (a view of a flat bucket), the
/// gradient `var` accumulates into: backward passes add into it in place.
pub fn set_grad(var: &Tensor, grad: &Tensor) {
    assert_eq!(var.size(), grad.size(), "a gradient has its variable's shape");
    // SAFETY: two live tensors; libtorch copies the handle of `grad`.
    unsafe { llmflow_set_grad(var.as_ptr() as *mut C_tensor, grad.as_ptr() as *mut C_tensor) }
}

#[derive(Clone, Copy)]
enum Op {
    AllReduce = 0,
    ReduceScatter = 1,
    AllGather = 2,
    Broadcast = 3,
}

impl Group {
    /// Joins the group of `size` ranks whose rendezvous rank 0 serves at
    /// `host:port`. Gloo binds the interface `GLOO_SOCKET_IFNAME` names, as
    /// in PyTorch; else the loopback for a loopback master, or the address
    /// this machine's hostname resolves to. Under torchrun, whose agent
    /// serves the store (a new one for each restart), every rank connects
    /// to it, as PyTorch's `_create_c10d_store` does.
    pub fn join(host: &str, port: u16, rank: usize, size: usize, timeout: Duration) -> Result<Group> {
        let iface = std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default();
        let loopback = matches!(host, "127.0.0.1" | "localhost" | "::1");
        let bind = if loopback { "127.0.0.1" } else { "" };
        let serve = rank == 0 && std::env::var("TORCHELASTIC_USE_AGENT_STORE").as_deref() != Ok("True");
        let (host_c, iface_c, bind_c) = (CString::new(host)?, CString::new(iface)?, CString::new(bind)?);
        let mut error = [0 as c_char; 1024];
        // SAFETY: NUL-terminated strings and an error buffer of the given length.
        let ptr = unsafe {
            llmflow_c10d_gloo(
                host_c.as_ptr(),
                c_int::from(port),
                rank as c_int,
                size as c_int,
                timeout.as_millis() as i64,
                serve,
                iface_c.as_ptr(),
                bind_c.as_ptr(),
                error.as_mut_ptr(),
                error.len(),
            )
        };
        if ptr.is_null() {
            // SAFETY: the C++ side wrote a NUL-terminated message.
            bail!("{}", unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy());
        }
        Ok(Group { ptr, rank, size })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn collective(&self, op: Op, a: &Tensor, b: Option<&Tensor>, root: usize) -> Result<()> {
        ensure!(a.is_contiguous() && b.is_none_or(Tensor::is_contiguous), "collectives take contiguous tensors");
        let mut error = [0 as c_char; 1024];
        let b_ptr = b.map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut C_tensor);
        // SAFETY: live tensors and group; the call waits for the collective.
        let rc = unsafe {
            llmflow_c10d_collective(
                self.ptr,
                op as c_int,
                a.as_ptr() as *mut C_tensor,
                b_ptr,
                root as c_int,
                error.as_mut_ptr(),
                error.len(),
            )
        };
        if rc != 0 {
            // SAFETY: as in `join`.
            let message = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy().into_owned();
            bail!("rank {} of {}: a collective failed (another rank died, hung or timed out): {message}", self.rank, self.size);
        }
        Ok(())
    }

    /// t ← Σ over the ranks of t, in place.
    pub fn all_reduce(&self, t: &Tensor) -> Result<()> {
        self.collective(Op::AllReduce, t, None, 0)
    }

    /// `out` (n elements) ← this rank's n-element slice of Σ over the ranks
    /// of `input` (size × n elements).
    pub fn reduce_scatter(&self, out: &Tensor, input: &Tensor) -> Result<()> {
        ensure!(input.numel() == out.numel() * self.size, "reduce-scatter of {} elements into {}", input.numel(), out.numel());
        self.collective(Op::ReduceScatter, out, Some(input), 0)
    }

    /// `out` (size × n elements) ← every rank's `input` (n elements), in rank order.
    pub fn all_gather(&self, out: &Tensor, input: &Tensor) -> Result<()> {
        ensure!(out.numel() == input.numel() * self.size, "all-gather of {} elements into {}", input.numel(), out.numel());
        self.collective(Op::AllGather, out, Some(input), 0)
    }

    /// t ← rank `root`'s t, in place.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        self.collective(Op::Broadcast, t, None, root)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `llmflow_c10d_gloo` and is freed once.
        unsafe { llmflow_c10d_free(self.ptr) }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    /// Each collective of a `size`-rank group (threads of this process, on
    /// loopback), rank r's tensors on `device(r)`, against the same sums
    /// computed here, over sizes that do and do not divide evenly among the
    /// backend's chunks, and over dtypes.
    fn collectives_agree(size: usize, device: fn(usize) -> Device) {
        let port = launch::free_port("127.0.0.1").unwrap();
        let ranks: Vec<_> = (0..size)
            .map(|rank| {
                std::thread::spawn(move || -> Result<()> {
                    let group = Group::join("127.0.0.1", port, rank, size, Duration::from_secs(60))?;
                    let on = device(rank);
                    for kind in [Kind::Float, Kind::Double, Kind::Int64, Kind::BFloat16] {
                        for n in [1i64, 7, 1000, 65_537] {
                            // Rank r's data: (i mod 8 + 1) · (r + 1), whose sums are exact even in bf16.
                            let data = |r: usize, n: i64| {
                                let i = Tensor::arange(n, (Kind::Double, Device::Cpu)).remainder(8) + 1;
                                (i * (r as f64 + 1.0)).to_kind(kind).to_device(on)
                            };
                            let sum_over_ranks = |n: i64| {
                                (0..size)
                                    .map(|r| data(r, n).to_kind(Kind::Double))
                                    .fold(Tensor::zeros([n], (Kind::Double, on)), |a, b| a + b)
                            };
                            let mine = data(rank, n);
                            group.all_reduce(&mine)?;
                            ensure!(mine.to_kind(Kind::Double).equal(&sum_over_ranks(n)), "all-reduce of {n} {kind:?}");

                            let input = data(rank, n * size as i64);
                            let out = Tensor::zeros([n], (kind, on));
                            group.reduce_scatter(&out, &input)?;
                            let want = sum_over_ranks(n * size as i64).narrow(0, rank as i64 * n, n);
                            ensure!(out.to_kind(Kind::Double).equal(&want), "reduce-scatter of {n} {kind:?}");

                            let out = Tensor::zeros([n * size as i64], (kind, on));
                            group.all_gather(&out, &data(rank, n))?;
                            let want = Tensor::cat(&(0..size).map(|r| data(r, n)).collect::<Vec<_>>(), 0);
                            ensure!(out.equal(&want), "all-gather of {n} {kind:?}");

                            let root = size - 1;
                            let t = data(rank, n);
                            group.broadcast(&t, root)?;
                            ensure!(t.equal(&data(root, n)), "broadcast of {n} {kind:?}");
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for (rank, r) in ranks.into_iter().enumerate() {
            r.join().unwrap().unwrap_or_else(|e| panic!("rank {rank}: {e:#}"));
        }
    }

    /// Gloo's collectives on 3 ranks.
    #[test]
    fn collectives_agree_with_a_reference() {
        collectives_agree(3, |_| Device::Cpu);
    }

    /// NCCL's collectives, one rank on each visible GPU (up to 3), in a
    /// build with NCCL; on a machine without a GPU there is nothing to run.
    #[cfg(llmflow_nccl)]
    #[test]
    fn nccl_collectives_agree_with_a_reference() {
        let gpus = tch::Cuda::device_count() as usize;
        if gpus == 0 {
            eprintln!("no CUDA device: NCCL's collectives not run");
            return;
        }
        collectives_agree(gpus.min(3), Device::Cuda);
    }

    /// Two ranks fill their rows of five token lists (one of them empty)
    /// and of a tensor; both end with all of them.
    #[test]
    fn merged_rows_are_whole_on_every_rank() {
        let port = launch::free_port("127.0.0.1").unwrap();
        let lists: Vec<Vec<i64>> = vec![vec![3, 1, 4], vec![], vec![1, 5], vec![9, 2, 6, 5], vec![-3]];
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let lists = lists.clone();
                std::thread::spawn(move || -> Result<()> {
                    let world = World { rank, size: 2, group: Some(Group::join("127.0.0.1", port, rank, 2, Duration::from_secs(60))?) };
                    let (start, end) = world.rows(lists.len());
                    let mine = lists.iter().enumerate().map(|(i, l)| if (start..end).contains(&i) { l.clone() } else { vec![] }).collect();
                    ensure!(world.merge_lists(mine)? == lists, "rank {rank}: the merged lists differ");
                    let t = Tensor::zeros([5, 2], (Kind::Float, Device::Cpu));
                    let _ = t.narrow(0, start as i64, (end - start) as i64).fill_(rank as f64 + 0.5);
                    world.merge(&t)?;
                    let want = Tensor::from_slice(&[0.5f32, 0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5]).view([5, 2]);
                    ensure!(t.equal(&want), "rank {rank}: the merged tensor differs");
                    Ok(())
                })
            })
            .collect();
        for (rank, r) in ranks.into_iter().enumerate() {
            r.join().unwrap().unwrap_or_else(|e| panic!("rank {rank}: {e:#}"));
        }
    }
}

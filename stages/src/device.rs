//! Choosing the libtorch device a stage runs on.
//!
//! The PyPI `torch` wheel that llmflow builds against is the CUDA build, but a
//! CPU machine installs it without NVIDIA's libraries. The linker's
//! `--as-needed` drops `libtorch_cuda.so` from the binary (nothing references
//! it directly), which is what lets one binary start on both kinds of machine.
//! The price is that CUDA must be loaded explicitly: `resolve` opens
//! `libtorch_cuda.so` from libtorch's directory before asking tch whether
//! CUDA is available; its static initializers register the CUDA backend.

use std::ffi::CString;

use anyhow::{bail, Result};
use tch::Device;

use crate::StageCtx;

/// What every stage that runs a model does first: libtorch's intra-op
/// threads set to the stage's share, and its device resolved.
pub fn prepare(ctx: &StageCtx) -> Result<Device> {
    tch::set_num_threads(ctx.threads as i32);
    resolve(&ctx.device)
}

/// Resolves `auto`, `cpu`, `cuda` or `cuda:N`. Ranks of one stage on one
/// machine ([`crate::dist`]) each take the GPU of their local rank, as
/// torchrun's users set it: NCCL wants one GPU per rank.
pub fn resolve(spec: &str) -> Result<Device> {
    let (local_rank, local_size) = crate::dist::placement()?.map_or((0, 1), |(_, _, rank, size)| (rank, size));
    let index = match spec {
        "cpu" => return Ok(Device::Cpu),
        "auto" if load_cuda().is_ok() && tch::Cuda::is_available() => None,
        "auto" => return Ok(Device::Cpu),
        _ => {
            let index = match spec.strip_prefix("cuda") {
                Some("") => None,
                Some(rest) => match rest.strip_prefix(':').and_then(|i| i.parse::<usize>().ok()) {
                    Some(i) => Some(i),
                    None => bail!("unknown device `{spec}`: use auto, cpu, cuda or cuda:N"),
                },
                None => bail!("unknown device `{spec}`: use auto, cpu, cuda or cuda:N"),
            };
            if let Err(why) = load_cuda() {
                bail!("device `{spec}` asked for, but CUDA cannot be loaded: {why}\n  install libtorch with its CUDA libraries: `make setup CUDA=1`");
            }
            if index.is_some() && local_size > 1 {
                bail!("device `{spec}` names one GPU for the {local_size} ranks on this machine: use `cuda`, and each rank takes the GPU of its local rank");
            }
            index
        }
    };
    let index = index.unwrap_or(local_rank);
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        let by = if local_size > 1 { format!(" by {local_size} ranks on this machine, one GPU each") } else { String::new() };
        bail!("device `{spec}` asked for{by}, but {count} CUDA device(s) are visible");
    }
    Ok(Device::Cuda(index))
}

/// Bytes of memory free for a new process (the kernel's `MemAvailable`),
/// where the kernel says.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One line about the compute this machine offers (`llmflow-stage device`).
pub fn describe() -> String {
    let cuda = match load_cuda() {
        Ok(()) if tch::Cuda::is_available() => format!("{} CUDA device(s)", tch::Cuda::device_count()),
        Ok(()) => "libtorch_cuda loaded, no CUDA device visible".to_string(),
        Err(why) => format!("no CUDA ({why})"),
    };
    format!("libtorch CPU threads: {}; {cuda}", tch::get_num_threads())
}

fn load_cuda() -> Result<(), String> {
    let name = CString::new("libtorch_cuda.so").expect("no NUL in name");
    // SAFETY: dlopen with a valid C string; the handle is intentionally never
    // closed so the registered CUDA backend stays alive for the process.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let err = unsafe { libc::dlerror() };
        let why = if err.is_null() {
            "unknown dlopen error".to_string()
        } else {
            unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned()
        };
        return Err(why);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!(resolve("cpu").unwrap(), Device::Cpu);
        assert!(resolve("tpu").unwrap_err().to_string().contains("unknown device `tpu`"));
        assert!(resolve("cuda:x").is_err());
    }
}

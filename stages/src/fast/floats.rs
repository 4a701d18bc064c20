//! In-place loops over the f32 elements of CPU tensors, for the memory-bound
//! steps between two backward passes (adding up replicas' gradients, the
//! gradient norm, AdamW): one pass over the memory where a chain of tensor
//! ops would make several, split into fixed chunks across rayon's threads.
//! Chunks are the same on every run and partial sums are added in chunk
//! order, so results do not depend on scheduling.

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Elements a chunk of parallel work covers.
pub const CHUNK: usize = 1 << 14;

/// The elements of a contiguous f32 tensor on the CPU, to read or update in
/// place; `None` for any other tensor.
///
/// # Safety
/// The slice aliases the tensor's memory: the caller must use it only while
/// nothing else reads or writes that memory, and hold one slice of a tensor
/// at a time.
#[allow(clippy::mut_from_ref)] // The aliasing is the point; see the safety contract.
pub unsafe fn cpu_floats(t: &Tensor) -> Option<&mut [f32]> {
    if t.device() != Device::Cpu || t.kind() != Kind::Float || !t.is_contiguous() {
        return None;
    }
    let n = t.numel();
    if n == 0 {
        return Some(&mut []);
    }
    // SAFETY: a contiguous f32 CPU tensor holds `n` initialized floats at
    // `data_ptr`, alive while `t` is; exclusive use is the caller's contract.
    Some(std::slice::from_raw_parts_mut(t.data_ptr().cast::<f32>(), n))
}

/// Σ x² over all the slices, in f64.
pub fn sum_of_squares(slices: &[&mut [f32]]) -> f64 {
    let chunks: Vec<&[f32]> = slices.iter().flat_map(|s| s.chunks(CHUNK)).collect();
    let partial: Vec<f64> = chunks.par_iter().map(|c| chunk_sum_of_squares(c)).collect();
    partial.iter().sum()
}

/// Eight running sums over interleaved elements, which the CPU adds side by
/// side (one sum would wait on each addition).
fn chunk_sum_of_squares(x: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(x) * f64::from(x);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// x ← x · coef, over all the slices.
pub fn scale(slices: &mut [&mut [f32]], coef: f32) {
    let chunks: Vec<&mut [f32]> = slices.iter_mut().flat_map(|s| s.chunks_mut(CHUNK)).collect();
    chunks.into_par_iter().for_each(|c| c.iter_mut().for_each(|x| *x *= coef));
}

/// total ← total + part and part ← 0, pairwise over the slices.
pub fn add_and_clear(pairs: &mut [(&mut [f32], &mut [f32])]) {
    let chunks: Vec<(&mut [f32], &mut [f32])> = pairs.iter_mut().flat_map(|(t, p)| t.chunks_mut(CHUNK).zip(p.chunks_mut(CHUNK))).collect();
    chunks.into_par_iter().for_each(|(total, part)| {
        for (t, p) in total.iter_mut().zip(part.iter_mut()) {
            *t += *p;
            *p = 0.0;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_loops_compute_what_plain_ones_do() {
        let n = 3 * CHUNK + 11;
        let mut a: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.25 - 12.0).collect();
        let mut b: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let expected: f64 = a.iter().chain(&b).map(|&x| f64::from(x) * f64::from(x)).sum();
        let sum = sum_of_squares(&[&mut a[..], &mut b[..]]);
        assert!((sum - expected).abs() <= 1e-12 * expected, "{sum} vs {expected}");

        let before = a.clone();
        scale(&mut [&mut a[..]], 0.5);
        assert!(a.iter().zip(&before).all(|(x, y)| *x == y * 0.5));

        let mut part: Vec<f32> = (0..n).map(|i| i as f32).collect();
        add_and_clear(&mut [(&mut a[..], &mut part[..])]);
        assert!(a.iter().zip(&before).enumerate().all(|(i, (x, y))| *x == y * 0.5 + i as f32));
        assert!(part.iter().all(|&p| p == 0.0));
    }

    #[test]
    fn only_contiguous_cpu_f32_tensors_are_viewed() {
        let t = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        // SAFETY: nothing else uses these tensors.
        unsafe {
            assert_eq!(cpu_floats(&t).map(|s| s.len()), Some(6));
            assert!(cpu_floats(&t.tr()).is_none());
            assert!(cpu_floats(&t.to_kind(Kind::Double)).is_none());
        }
    }
}

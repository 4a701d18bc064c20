//! GPT-2's activation, the tanh approximation of GeLU (HF's `gelu_new`),
//! computed on the CPU together with its derivative in one pass.
//!
//! ```text
//! gelu(x)  = ½x(1 + tanh u) = x·s,        s = σ(2u),  u = √(2/π)(x + 0.044715x³)
//! gelu′(x) = s + 2x·s(1 − s)·u′,                      u′ = √(2/π)(1 + 3·0.044715x²)
//! ```
//!
//! Why by hand: libtorch evaluates tanh with Sleef's 1-ulp routine in the
//! forward pass and again in the backward pass, which on a CPU costs more
//! than the `c_fc` matmul beside it. Here σ comes from an `exp` accurate to a
//! couple of ulps, in a loop the compiler vectorizes, and the derivative is
//! computed while the values are, so the backward pass is one multiplication.
//!
//! tch has no custom autograd functions, so the derivative joins the graph
//! as `y = gelu(x) + (x − x̄)·gelu′(x)` with x̄ = x detached: the second term
//! is zero, so the value is `gelu(x)` bit for bit, and autograd
//! differentiates it to `gelu′(x)`.

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use crate::fast::floats::{cpu_floats, CHUNK};

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044_715;

/// gelu(x), tanh approximation, with its gradient if `x` requires one.
pub fn gelu(x: &Tensor) -> Tensor {
    if x.device() != Device::Cpu || x.kind() != Kind::Float {
        return x.gelu("tanh");
    }
    let x = x.contiguous();
    let y = x.empty_like();
    let slope = x.requires_grad().then(|| x.empty_like());
    // SAFETY: y and slope are fresh tensors of x's size, and x is only read.
    unsafe {
        let xs = cpu_floats(&x).expect("a contiguous f32 CPU tensor");
        let ys = cpu_floats(&y).expect("the same");
        let ds = slope.as_ref().map(|d| cpu_floats(d).expect("the same"));
        // Fixed chunks, spread over the cores only when libtorch would
        // spread its own ops: a model replica running on one core keeps to it.
        let mut ds = ds.map(|d| d.chunks_mut(CHUNK));
        let chunks: Vec<_> =
            xs.chunks(CHUNK).zip(ys.chunks_mut(CHUNK)).map(|(x, y)| (x, y, ds.as_mut().and_then(Iterator::next))).collect();
        if tch::get_num_threads() > 1 {
            chunks.into_par_iter().for_each(|(x, y, d)| values_and_slopes(x, y, d));
        } else {
            chunks.into_iter().for_each(|(x, y, d)| values_and_slopes(x, y, d));
        }
    }
    match slope {
        // x − x̄ is zero but carries x's gradient, times the slope.
        Some(slope) => y.addcmul(&(&x - x.detach()), &slope),
        None => y,
    }
}

/// y = gelu(x) and, if given, d = gelu′(x), element by element.
fn values_and_slopes(x: &[f32], y: &mut [f32], d: Option<&mut [f32]>) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { values_and_slopes_avx2(x, y, d) };
    }
    values_and_slopes_portable(x, y, d)
}

/// The loop compiled for AVX2 (8 lanes; the baseline x86-64 has 4). Without
/// fused multiply-adds, so the bits are those of the portable loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn values_and_slopes_avx2(x: &[f32], y: &mut [f32], d: Option<&mut [f32]>) {
    values_and_slopes_portable(x, y, d)
}

#[inline(always)]
fn values_and_slopes_portable(x: &[f32], y: &mut [f32], d: Option<&mut [f32]>) {
    match d {
        Some(d) => {
            for ((&x, y), d) in x.iter().zip(y.iter_mut()).zip(d.iter_mut()) {
                let (value, s, e, xc) = value(x);
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * xc * xc);
                *y = value;
                // 1 − s as e·s, which does not cancel as s nears 1.
                *d = s + 2.0 * xc * s * (e * s) * du;
            }
        }
        None => {
            for (&x, y) in x.iter().zip(y.iter_mut()) {
                *y = value(x).0;
            }
        }
    }
}

/// (gelu(x), s, e^(−2u), x clamped). Beyond ±10, s is 0 or 1 to f32's
/// precision (σ(±87)), so u is computed from x clamped there: e stays finite
/// and the slope 0 or 1 for any x, and the value is x·s inside, ≈ 0 below and
/// x above.
#[inline(always)]
fn value(x: f32) -> (f32, f32, f32, f32) {
    // clamp rather than f32::max/min, which would turn a NaN into a bound.
    let xc = x.clamp(-10.0, 10.0);
    let u = SQRT_2_OVER_PI * (xc + CUBIC * xc * xc * xc);
    let e = exp(-2.0 * u);
    let s = 1.0 / (1.0 + e);
    (if x > 10.0 { x } else { xc * s }, s, e, xc)
}

/// eᶻ for |z| ≤ 87.3 (so that 2ⁿ below is a normal float), to within two
/// ulps, without branches: eᶻ = 2ⁿ·eʳ with n = round(z / ln 2) and
/// |r| ≤ ln 2 / 2, eʳ by its Taylor series to r⁷ (the rest is below 2⁻²⁷),
/// 2ⁿ built in the exponent bits.
#[inline(always)]
fn exp(z: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 in two parts (Cody and Waite): n·LN2_HI is exact for |n| < 2¹⁵.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let k = z * std::f32::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = (z - n * LN2_HI) - n * LN2_LO;
    let p =
        1.0 + r * (1.0 + r * (1.0 / 2.0 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n + 127 in the exponent field.
    let two_n = f32::from_bits(k.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    p * two_n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Tensor {
        // Every scale an activation takes, both signs, and the extremes.
        let grid = Tensor::linspace(-12.0, 12.0, 200_001, (Kind::Float, Device::Cpu));
        let wide = Tensor::from_slice(&[-1e30f32, -100.0, -30.0, -1e-30, 0.0, 1e-30, 1e-7, 30.0, 100.0, 1e30]);
        Tensor::cat(&[grid, wide, Tensor::randn([10_000], (Kind::Float, Device::Cpu)) * 3.0], 0)
    }

    /// (values, slopes) of `f` at `x`, through autograd.
    fn values_and_grads(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
        let x = x.detach().set_requires_grad(true);
        let y = f(&x);
        let slope = Tensor::run_backward(&[y.sum(y.kind())], &[&x], false, false).remove(0);
        (y.detach().to_kind(Kind::Double), slope.to_kind(Kind::Double))
    }

    /// Values and slopes agree with the tanh GeLU computed in f64 (libtorch's
    /// own, through autograd) to a few f32 roundings, as libtorch's f32
    /// kernel does, at every magnitude.
    #[test]
    fn matches_the_tanh_gelu() {
        let x = inputs();
        let (want, want_slope) = values_and_grads(&x.to_kind(Kind::Double), |x| x.gelu("tanh"));
        let (ours, ours_slope) = values_and_grads(&x, gelu);
        let (torch, torch_slope) = values_and_grads(&x, |x| x.gelu("tanh"));
        // Relative error, absolute below 1 (where slopes cross zero and
        // values vanish); libtorch's slope is NaN at ±1e30, which is left out.
        let error = |got: &Tensor, want: &Tensor| {
            let e = (got - want).abs() / (want.abs() + 1.0);
            e.masked_select(&e.isfinite()).max().double_value(&[])
        };
        for (what, ours, torch, want) in [("values", &ours, &torch, &want), ("slopes", &ours_slope, &torch_slope, &want_slope)] {
            let (ours, torch) = (error(ours, want), error(torch, want));
            eprintln!("{what}: error {ours:.2e} (libtorch f32 {torch:.2e})");
            assert!(ours <= 4.0 * f32::EPSILON as f64, "{what}: error {ours:.2e}, libtorch's {torch:.2e}");
        }
    }

    /// The value is the same bits with and without a gradient, in one thread
    /// or several, and a NaN stays one.
    #[test]
    fn the_graph_adds_nothing_to_the_value() {
        let x = inputs();
        let plain = gelu(&x);
        let (with_grad, _) = values_and_grads(&x, gelu);
        assert!(plain.to_kind(Kind::Double).equal(&with_grad));
        let threads = tch::get_num_threads();
        tch::set_num_threads(if threads > 1 { 1 } else { 2 });
        let other = gelu(&x);
        tch::set_num_threads(threads);
        assert!(plain.equal(&other));
        assert!(gelu(&Tensor::from(f32::NAN)).double_value(&[]).is_nan());
    }
}

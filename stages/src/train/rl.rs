//! What the policy-gradient stages (`ppo`, `grpo`) share: the clipped
//! policy-ratio objective per token, means over response tokens, and the
//! entropy of the policy there.
//!
//! Tensors are [B, T] on the grid of a padded batch of prompt + response,
//! position `t` holding what concerns the target token `y[t]`; `mask` is 1
//! exactly at response tokens.

use tch::{Kind, Tensor};

/// Mean of `x` over the positions where `mask` is 1.
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Tensor {
    (x * mask).sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0)
}

/// The clipped surrogate per token (Schulman et al. 2017), as a loss:
/// `max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))` with `ρ = exp(logp −
/// old_logp)`; and where the clipped term wins (1.0), i.e. where the token
/// gets no gradient. DAPO's "clip higher" is `ε_high > ε_low`.
pub fn clipped_surrogate(logp: &Tensor, old_logp: &Tensor, advantages: &Tensor, eps_low: f64, eps_high: f64) -> (Tensor, Tensor) {
    let ratio = (logp - old_logp).exp();
    let unclipped = -advantages * &ratio;
    let clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high);
    let was_clipped = clipped.gt_tensor(&unclipped).to_kind(Kind::Float);
    (unclipped.maximum(&clipped), was_clipped)
}

/// Mean entropy (nats) of the next-token distributions of logits [B, T, V]
/// at the positions where `mask` [B, T] is 1.
pub fn entropy(logits: &Tensor, mask: &Tensor) -> Tensor {
    let logp = logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
    let h = -(logp.exp() * &logp).sum_dim_intlist(-1, false, Kind::Float);
    masked_mean(&h, mask)
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v).to_kind(Kind::Float).view([1, -1])
    }

    #[test]
    fn the_surrogate_clips_each_side_at_its_own_epsilon() {
        // Ratios 1.5 and 0.5 with advantage 1, 0.5 with advantage −1, ε_low
        // 0.2, ε_high 0.28: −min(1.5, 1.28) = −1.28 (clipped above);
        // −min(0.5, 0.8) = −0.5 (not clipped: the ratio moved against A);
        // max(0.5, 0.8) = 0.8 (clipped below).
        let logp = t(&[1.5f64.ln(), 0.5f64.ln(), 0.5f64.ln()]).set_requires_grad(true);
        let (loss, clipped) = clipped_surrogate(&logp, &t(&[0.0; 3]), &t(&[1.0, 1.0, -1.0]), 0.2, 0.28);
        let values = Vec::<f64>::try_from(loss.view([-1]).to_kind(Kind::Double)).unwrap();
        assert!(values.iter().zip([-1.28, -0.5, 0.8]).all(|(a, b)| (a - b).abs() < 1e-6), "{values:?}");
        assert_eq!(Vec::<f64>::try_from(clipped.view([-1]).to_kind(Kind::Double)).unwrap(), [1.0, 0.0, 1.0]);
        loss.sum(Kind::Float).backward();
        // d(−A·ρ)/dlogp = −A·ρ where unclipped; 0 where clipped.
        let grad = Vec::<f64>::try_from(logp.grad().view([-1]).to_kind(Kind::Double)).unwrap();
        assert!(grad.iter().zip([0.0, -0.5, 0.0]).all(|(a, b)| (a - b).abs() < 1e-6), "{grad:?}");
    }

    #[test]
    fn entropy_of_uniform_and_certain_distributions() {
        let logits = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0, 100.0, 0.0, 0.0, 0.0]).view([1, 2, 4]);
        let both = entropy(&logits, &Tensor::ones([1, 2], (Kind::Float, Device::Cpu)));
        assert!((both.double_value(&[]) - 4f64.ln() / 2.0).abs() < 1e-5);
        let first = entropy(&logits, &Tensor::from_slice(&[1.0f32, 0.0]).view([1, 2]));
        assert!((first.double_value(&[]) - 4f64.ln()).abs() < 1e-5);
    }
}

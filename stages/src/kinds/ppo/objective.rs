//! PPO's objective for language models, as TRL's `PPOTrainer` computes it
//! (Schulman et al. 2017; Ziegler et al. 2019; Huang et al. 2024, "The N+
//! implementation details of RLHF with PPO").
//!
//! Every response token is one action. Its reward is the KL penalty
//! `−kl_coef · (log π(y_t) − log π_ref(y_t))`, and the last token also gets
//! the reward model's score ([`rewards`]). [`gae`] turns rewards and value
//! estimates into advantages and returns; the advantages are whitened over
//! the whole rollout ([`whiten`]). The losses are means over response tokens
//! (`mask` 1) of the clipped surrogate ([`policy_loss`]) and of the clipped
//! squared value error ([`value_loss`]).

use tch::{Kind, Tensor};

use crate::train::rl::{clipped_surrogate, masked_mean};

/// Per-token rewards of one response: the KL penalty at each token, plus
/// `score` at the last.
pub fn rewards(logp: &[f64], ref_logp: &[f64], score: f64, kl_coef: f64) -> Vec<f64> {
    let mut r: Vec<f64> = logp.iter().zip(ref_logp).map(|(l, r)| -kl_coef * (l - r)).collect();
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// Generalized advantage estimation (Schulman et al. 2016) over one
/// response: `δ_t = r_t + γ·V_{t+1} − V_t` with `V` 0 after the last token,
/// `A_t = δ_t + γλ·A_{t+1}`. Returns (advantages, returns = A + V).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(rewards.len(), values.len());
    let mut advantages = vec![0.0; rewards.len()];
    let mut next = (0.0, 0.0); // (A_{t+1}, V_{t+1})
    for t in (0..rewards.len()).rev() {
        let delta = rewards[t] + gamma * next.1 - values[t];
        advantages[t] = delta + gamma * lam * next.0;
        next = (advantages[t], values[t]);
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    (advantages, returns)
}

/// Shifts `x` to mean 0 and scales it to variance 1, the unbiased variance
/// as TRL's `masked_whiten` takes it.
pub fn whiten(x: &mut [f64]) {
    let n = x.len() as f64;
    if n < 2.0 {
        return;
    }
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let scale = 1.0 / (var + 1e-8).sqrt();
    x.iter_mut().for_each(|v| *v = (*v - mean) * scale);
}

/// The clipped surrogate averaged over response tokens, and the fraction of
/// tokens where the clipped term wins (those get no gradient). Both scalar
/// tensors.
pub fn policy_loss(logp: &Tensor, old_logp: &Tensor, advantages: &Tensor, mask: &Tensor, cliprange: f64) -> (Tensor, Tensor) {
    let (loss, clipped) = clipped_surrogate(logp, old_logp, advantages, cliprange, cliprange);
    (masked_mean(&loss, mask), masked_mean(&clipped, mask))
}

/// The clipped value loss: half the mean of `max((V − R)², (V_clip − R)²)`
/// with `V_clip` the new value kept within `cliprange_value` of the old, and
/// the fraction of tokens where the clipped term wins.
pub fn value_loss(values: &Tensor, old_values: &Tensor, returns: &Tensor, mask: &Tensor, cliprange_value: f64) -> (Tensor, Tensor) {
    let clipped = values.clamp_tensor(Some(old_values - cliprange_value), Some(old_values + cliprange_value));
    let unclipped_loss = (values - returns).square();
    let clipped_loss = (clipped - returns).square();
    let clipfrac = masked_mean(&clipped_loss.gt_tensor(&unclipped_loss).to_kind(Kind::Float), mask);
    (masked_mean(&unclipped_loss.maximum(&clipped_loss), mask) * 0.5, clipfrac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-7)
    }

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v).to_kind(Kind::Float).view([1, -1])
    }

    #[test]
    fn gae_matches_hand_computed_values() {
        // δ = (0 + 0.9·0.2 − 0.5, 0 + 0.9·0.4 − 0.2, 1 − 0.4) = (−0.32, 0.16, 0.6);
        // A_2 = 0.6, A_1 = 0.16 + 0.45·0.6 = 0.43, A_0 = −0.32 + 0.45·0.43 = −0.1265.
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.2, 0.4], 0.9, 0.5);
        assert!(close(&a, &[-0.1265, 0.43, 0.6]), "{a:?}");
        assert!(close(&r, &[0.3735, 0.63, 1.0]), "{r:?}");
        // γ = λ = 1: the advantage is the reward to go minus the value, the
        // return the reward to go (Monte Carlo).
        let (a, r) = gae(&[0.5, -1.0, 2.0], &[0.5, 0.2, 0.4], 1.0, 1.0);
        assert!(close(&a, &[1.0, 0.8, 1.6]), "{a:?}");
        assert!(close(&r, &[1.5, 1.0, 2.0]), "{r:?}");
        // λ = 0: one-step TD errors.
        let (a, _) = gae(&[0.0, 1.0], &[0.3, 0.5], 1.0, 0.0);
        assert!(close(&a, &[0.2, 0.5]), "{a:?}");
    }

    #[test]
    fn rewards_penalize_kl_per_token_and_score_the_last() {
        let r = rewards(&[-1.0, -2.0, -0.5], &[-1.5, -2.0, -0.3], 3.0, 0.1);
        assert!(close(&r, &[-0.05, 0.0, 3.02]), "{r:?}");
    }

    #[test]
    fn whitening_gives_mean_zero_and_unit_unbiased_variance() {
        let mut x = [1.0, 2.0, 3.0, 4.0];
        whiten(&mut x);
        // mean 2.5, unbiased variance 5/3.
        let s = (5.0f64 / 3.0).sqrt();
        assert!(close(&x, &[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]), "{x:?}");
    }

    #[test]
    fn policy_loss_clips_the_ratio_and_stops_its_gradient() {
        // Ratios 1.5, 0.5, 1.1 and a masked 2.0, advantages 1, 1, −2, 5, ε 0.2:
        // max(−1.5, −1.2) = −1.2 (clipped), max(−0.5, −0.8) = −0.5,
        // max(2.2, 2.2) = 2.2; the mean over the three tokens is 0.5/3.
        let ratios = [1.5f64, 0.5, 1.1, 2.0];
        let logp = t(&ratios.map(f64::ln)).set_requires_grad(true);
        let old = t(&[0.0; 4]);
        let (loss, clipfrac) = policy_loss(&logp, &old, &t(&[1.0, 1.0, -2.0, 5.0]), &t(&[1.0, 1.0, 1.0, 0.0]), 0.2);
        assert!((loss.double_value(&[]) - 0.5 / 3.0).abs() < 1e-6);
        assert!((clipfrac.double_value(&[]) - 1.0 / 3.0).abs() < 1e-6);
        loss.backward();
        // d/dlogp of −A·ρ/3 is −A·ρ/3 where unclipped, 0 where clipped or masked.
        let grad = Vec::<f64>::try_from(logp.grad().view([-1]).to_kind(Kind::Double)).unwrap();
        assert!(close(&grad.iter().map(|g| (g * 1e6).round() / 1e6).collect::<Vec<_>>(), &[0.0, -0.166667, 0.733333, 0.0]), "{grad:?}");
    }

    #[test]
    fn value_loss_clips_the_new_value_around_the_old() {
        // V_clip = (0.7, 0.0, 0.5); squared errors (1, 1, 0.25) unclipped,
        // (1.69, 1, 0.25) clipped: half the mean of (1.69, 1, 0.25) is 0.49.
        let (loss, clipfrac) =
            value_loss(&t(&[1.0, 0.0, 0.5, 9.0]), &t(&[0.5, 0.1, 0.5, 0.0]), &t(&[2.0, -1.0, 0.0, 0.0]), &t(&[1.0, 1.0, 1.0, 0.0]), 0.2);
        assert!((loss.double_value(&[]) - 0.49).abs() < 1e-6, "{loss}");
        assert!((clipfrac.double_value(&[]) - 1.0 / 3.0).abs() < 1e-6);
    }
}

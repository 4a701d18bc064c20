//! GRPO's objective (Shao et al. 2024, "DeepSeekMath"), as TRL's
//! `GRPOTrainer` computes it, with the variants it offers.
//!
//! Each prompt gets a group of G completions. A completion's advantage is
//! its reward less the group's mean, divided by the group's standard
//! deviation unless `scale_rewards = false` (Dr. GRPO, Liu et al. 2025), and
//! every token of the completion shares it. The per-token loss is the
//! clipped surrogate ([`crate::train::rl::clipped_surrogate`]) plus β times
//! the k3 estimate of the KL divergence to the reference ([`kl_k3`]);
//! [`reduce`] turns it into the update's loss by one of three
//! normalisations ([`LossType`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How per-token losses become the update's loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// The mean over each completion's tokens, then over completions (the
    /// original GRPO): a long completion's tokens weigh less.
    Grpo,
    /// The sum over tokens divided by completions × `max_new_tokens`, a
    /// constant (Dr. GRPO): no length bias.
    DrGrpo,
    /// The mean over every completion token of the generation batch (DAPO,
    /// Yu et al. 2025): each token weighs the same.
    Dapo,
}

/// Group-relative advantages of `rewards`, groups of `group` consecutive
/// completions: reward − group mean, divided by the group's standard
/// deviation (unbiased, as `torch.std`) + 1e-4 when `scale`. A group whose
/// rewards are all equal gets 0: it teaches nothing.
pub fn group_advantages(rewards: &[f64], group: usize, scale: bool) -> Vec<f64> {
    assert!(group > 0 && rewards.len().is_multiple_of(group), "{} rewards do not make groups of {group}", rewards.len());
    rewards
        .chunks(group)
        .flat_map(|g| {
            let n = g.len() as f64;
            let mean = g.iter().sum::<f64>() / n;
            let std = if g.len() > 1 { (g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
            g.iter().map(move |r| if scale { (r - mean) / (std + 1e-4) } else { r - mean })
        })
        .collect()
}

/// The k3 estimator of KL(π ‖ π_ref) at each token (Schulman 2020):
/// `exp(ref − logp) − (ref − logp) − 1`, never negative, unbiased under
/// samples of π.
pub fn kl_k3(logp: &Tensor, ref_logp: &Tensor) -> Tensor {
    let d = ref_logp - logp;
    d.exp() - &d - 1.0
}

/// This micro-batch's share of the update's loss from per-token losses
/// [B, T] (0 where `mask` is 0): the update's loss is the sum of the shares
/// of its micro-batches. `scale` is 1 / micro-batches per update;
/// `max_new_tokens` is Dr. GRPO's constant; `batch_tokens` counts the
/// completion tokens of the whole update (DAPO's denominator).
pub fn reduce(per_token: &Tensor, mask: &Tensor, loss_type: LossType, scale: f64, max_new_tokens: usize, batch_tokens: f64) -> Tensor {
    let masked = per_token * mask;
    match loss_type {
        LossType::Grpo => {
            (masked.sum_dim_intlist(-1, false, Kind::Float) / mask.sum_dim_intlist(-1, false, Kind::Float).clamp_min(1.0)).mean(Kind::Float)
                * scale
        }
        LossType::DrGrpo => masked.sum(Kind::Float) / (per_token.size()[0] as f64 * max_new_tokens as f64) * scale,
        LossType::Dapo => masked.sum(Kind::Float) / batch_tokens.max(1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::rl::clipped_surrogate;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    fn t(rows: &[&[f64]]) -> Tensor {
        let width = rows[0].len() as i64;
        Tensor::from_slice(&rows.concat()).to_kind(Kind::Float).view([-1, width])
    }

    #[test]
    fn advantages_are_relative_to_the_group() {
        // Group 1: mean 0.5, unbiased std √(1/3) = 0.57735; group 2: all equal.
        let rewards = [1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0];
        let scaled = group_advantages(&rewards, 4, true);
        let a = 0.5 / (0.5773502691896258 + 1e-4);
        assert!(close(&scaled, &[a, -a, a, -a, 0.0, 0.0, 0.0, 0.0]), "{scaled:?}");
        let centered = group_advantages(&rewards, 4, false);
        assert!(close(&centered, &[0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0]), "{centered:?}");
        assert!(close(&group_advantages(&[3.0], 1, true), &[0.0]));
    }

    /// Two completions of 1 and 3 tokens (width 4), per-token losses
    /// (1 | 2, 3, 4) and two micro-batches per update (scale 0.5).
    #[test]
    fn the_three_normalisations_match_hand_computed_values() {
        let losses = t(&[&[1.0, 9.0, 9.0, 9.0], &[2.0, 3.0, 4.0, 9.0]]);
        let mask = t(&[&[1.0, 0.0, 0.0, 0.0], &[1.0, 1.0, 1.0, 0.0]]);
        let value = |loss_type| reduce(&losses, &mask, loss_type, 0.5, 8, 10.0).double_value(&[]);
        // GRPO: mean(1/1, 9/3) · 0.5 = 1.0.
        assert!((value(LossType::Grpo) - 1.0).abs() < 1e-6);
        // Dr. GRPO: (1 + 9) / (2 · 8) · 0.5 = 0.3125.
        assert!((value(LossType::DrGrpo) - 0.3125).abs() < 1e-6);
        // DAPO: (1 + 9) / 10 tokens in the whole update = 1.0, not scaled.
        assert!((value(LossType::Dapo) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn kl_k3_is_zero_at_the_reference_and_positive_elsewhere() {
        let logp = t(&[&[-1.0, -2.0]]);
        let same = kl_k3(&logp, &logp);
        assert_eq!(same.abs().max().double_value(&[]), 0.0);
        // ref − logp = 0.5: e^0.5 − 0.5 − 1 = 0.148721.
        let kl = kl_k3(&logp, &t(&[&[-0.5, -1.5]]));
        assert!(close(&Vec::<f64>::try_from(kl.view([-1]).to_kind(Kind::Double)).unwrap(), &[0.148721270700128, 0.148721270700128]));
    }

    /// The whole loss: tokens whose ratio left the clip range in the
    /// advantage's direction get no gradient; the others −A·ρ / tokens.
    #[test]
    fn clipped_tokens_get_no_gradient() {
        // Ratios 1.5 (clipped at 1.2 for A = 1), 1.1 (inside) and 0.5 with
        // A = 1 (moved against A: not clipped), one completion of 3 tokens.
        let logp = t(&[&[1.5f64.ln(), 1.1f64.ln(), 0.5f64.ln()]]).set_requires_grad(true);
        let advantages = t(&[&[1.0, 1.0, 1.0]]);
        let (per_token, _) = clipped_surrogate(&logp, &t(&[&[0.0; 3]]), &advantages, 0.2, 0.2);
        reduce(&per_token, &t(&[&[1.0; 3]]), LossType::Dapo, 1.0, 3, 3.0).backward();
        let grad = Vec::<f64>::try_from(logp.grad().view([-1]).to_kind(Kind::Double)).unwrap();
        assert!(close(&grad, &[0.0, -1.1 / 3.0, -0.5 / 3.0]), "{grad:?}");
    }
}

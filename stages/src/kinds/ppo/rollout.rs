//! One PPO rollout: responses sampled for a batch of prompts, and everything
//! the update needs of them, computed once without gradients: the policy's
//! and the reference's log-probabilities of each response token, the value
//! estimates, the reward model's scores, and from those the advantages and
//! returns.
//!
//! Every per-token quantity lives on the grid of [`pad`]'s batch of prompt +
//! response: position `t` of a row holds what concerns its target `y[t]`, the
//! response token drawn after seeing tokens `0..=t`, and the value of that
//! state. `mask` is 1 exactly at response tokens.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::objective::{self, gae, whiten};
use super::Params;
use crate::data::sequences::{pad, token_logprobs, Padded, Sequence};
use crate::model::Gpt;
use crate::sample::{generate_batch, Sampling};
use crate::train::head::HeadModel;
use crate::train::rl::entropy;

/// The models PPO runs.
pub struct Models<'a> {
    /// Trained; shares its VarStore with `v_head`.
    pub policy: &'a Gpt,
    /// The value head [1, C]: a linear map of the policy's hidden state.
    pub v_head: Tensor,
    /// The frozen initial policy.
    pub reference: Gpt,
    /// The frozen reward model.
    pub reward: HeadModel,
    /// `<|endoftext|>`: ends responses, pads batches.
    pub eot: i64,
}

impl Models<'_> {
    /// Value estimates [B, T] from the policy's hidden states [B, T, C].
    pub fn values(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(&self.v_head, None).squeeze_dim(-1)
    }
}

pub struct Rollout {
    pub responses: Vec<Vec<i64>>,
    /// Prompt + response per row, the response counted.
    pub batch: Padded,
    pub mask: Tensor,
    /// The policy's log-probabilities, values and the reference's
    /// log-probabilities, [N, T], 0 outside the mask.
    pub logp: Tensor,
    pub values: Tensor,
    pub ref_logp: Tensor,
    /// The reward model's score of each response (before any penalty).
    pub scores: Vec<f64>,
    /// Mean entropy of the policy over the response tokens.
    pub entropy: f64,
}

impl Rollout {
    /// Samples a response to each prompt from `sampler` (the policy, or the
    /// reference to measure the starting point) with seeds from `seed`, and
    /// scores them.
    pub fn collect(sampler: &Gpt, m: &Models, prompts: &[Vec<i64>], seed: u64, p: &Params) -> Result<Rollout> {
        let micro = p.train.batch_size;
        let responses = tch::no_grad(|| sample(sampler, prompts, seed, p.max_new_tokens, p.temperature, micro, m.eot));
        let sequences: Vec<Sequence> = prompts.iter().zip(&responses).map(|(q, r)| Sequence::new(q, r)).collect();
        let batch = pad(&sequences, m.eot, sampler.device());
        let mask = batch.mask();
        let reward_context = m.reward.model.gpt.config().context as usize;
        let (mut logp, mut values, mut ref_logp, mut scores, mut entropies) = (vec![], vec![], vec![], vec![], vec![]);
        tch::no_grad(|| {
            for (i, chunk) in sequences.chunks(micro).enumerate() {
                let rows = |t: &Tensor| t.narrow(0, (i * micro) as i64, chunk.len() as i64);
                let (x, y) = (rows(&batch.x), rows(&batch.y));
                let hidden = m.policy.hidden_states(&x, false);
                let logits = m.policy.logits(&hidden) / p.temperature;
                logp.push(token_logprobs(&logits, &y));
                entropies.push(entropy(&logits, &rows(&mask)) * rows(&mask).sum(Kind::Float));
                values.push(m.values(&hidden));
                ref_logp.push(token_logprobs(&(m.reference.forward(&x, false) / p.temperature), &y));
                let scored: Vec<Sequence> = chunk.iter().map(|s| s.clone().fit(reward_context)).collect();
                let score = m.reward.forward(&pad(&scored, m.eot, sampler.device()), false);
                scores.extend(Vec::<f64>::try_from(score.select(1, 0).to_kind(Kind::Double).to_device(tch::Device::Cpu))?);
            }
            anyhow::Ok(())
        })?;
        let entropy = Tensor::stack(&entropies, 0).sum(Kind::Float).double_value(&[]) / mask.sum(Kind::Float).double_value(&[]);
        Ok(Rollout {
            responses,
            logp: Tensor::cat(&logp, 0),
            values: Tensor::cat(&values, 0) * &mask,
            ref_logp: Tensor::cat(&ref_logp, 0),
            batch,
            mask,
            scores,
            entropy,
        })
    }

    /// Σ_t log π(y_t) − log π_ref(y_t) of each response: the KL estimate of
    /// a sequence sampled from the policy.
    pub fn kl(&self) -> Vec<f64> {
        let kl = (&self.logp - &self.ref_logp).sum_dim_intlist(-1, false, Kind::Double);
        Vec::<f64>::try_from(kl.to_device(tch::Device::Cpu)).expect("a 1-D tensor")
    }

    /// Whether each response ended with `<|endoftext|>`.
    pub fn ended(&self, eot: i64) -> Vec<bool> {
        self.responses.iter().map(|r| r.last() == Some(&eot)).collect()
    }

    /// Whitened advantages and returns [N, T] (0 outside the mask), from the
    /// scores less `missing_eos_penalty` where a response did not end.
    pub fn advantages(&self, p: &Params, eot: i64) -> (Tensor, Tensor) {
        let host = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(tch::Device::Cpu).view([-1])).expect("f64");
        let (logp, ref_logp, values) = (host(&self.logp), host(&self.ref_logp), host(&self.values));
        let width = self.batch.x.size()[1] as usize;
        // Per row, the response's positions on the grid: start − 1 .. len − 1.
        let spans: Vec<std::ops::Range<usize>> = (0..self.responses.len())
            .map(|i| {
                let end = i * width + self.batch.lengths[i] as usize - 1;
                end - self.responses[i].len()..end
            })
            .collect();
        let (mut advantages, mut returns) = (vec![0.0; logp.len()], vec![0.0; logp.len()]);
        let mut all = Vec::new();
        for ((span, &score), ended) in spans.iter().zip(&self.scores).zip(self.ended(eot)) {
            let score = score - if ended { 0.0 } else { p.missing_eos_penalty.unwrap_or(0.0) };
            let r = objective::rewards(&logp[span.clone()], &ref_logp[span.clone()], score, p.kl_coef);
            let (a, ret) = gae(&r, &values[span.clone()], p.gamma, p.lam);
            returns[span.clone()].copy_from_slice(&ret);
            all.extend(a);
        }
        whiten(&mut all);
        let mut whitened = all.into_iter();
        for span in &spans {
            span.clone().for_each(|i| advantages[i] = whitened.next().expect("one per response token"));
        }
        let grid = |v: Vec<f64>| Tensor::from_slice(&v).to_kind(Kind::Float).view([-1, width as i64]).to_device(self.mask.device());
        (grid(advantages), grid(returns))
    }
}

/// Responses to `prompts` drawn in batches of `micro` prompts of similar
/// length (less lockstep feeding of prompt tokens); the prompt at rank `k`
/// in length order draws with seed `seed + k`.
fn sample(gpt: &Gpt, prompts: &[Vec<i64>], seed: u64, max_tokens: usize, temperature: f64, micro: usize, eot: i64) -> Vec<Vec<i64>> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let mut responses = vec![Vec::new(); prompts.len()];
    for (c, chunk) in order.chunks(micro).enumerate() {
        let batch: Vec<Vec<i64>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let s = Sampling { max_tokens, temperature, top_k: None, top_p: None, seed: seed.wrapping_add((c * micro) as u64) };
        for (&i, response) in chunk.iter().zip(generate_batch(gpt, &batch, &s, Some(eot))) {
            responses[i] = response;
        }
    }
    responses
}

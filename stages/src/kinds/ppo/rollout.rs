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
use crate::train::last_token::HeadModel;
use crate::train::ranks;
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
    /// scores them. Across ranks, each samples and scores its rows of every
    /// micro-batch, and every rank ends with the whole rollout.
    pub fn collect(sampler: &Gpt, m: &Models, prompts: &[Vec<i64>], seed: u64, p: &Params) -> Result<Rollout> {
        let micro = p.train.batch_size;
        let responses = tch::no_grad(|| sample(sampler, prompts, seed, p.max_new_tokens, p.temperature, micro, m.eot));
        let responses = ranks::merge_lists(responses)?;
        let sequences: Vec<Sequence> = prompts.iter().zip(&responses).map(|(q, r)| Sequence::new(q, r)).collect();
        let batch = pad(&sequences, m.eot, sampler.device());
        let mask = batch.mask();
        let reward_context = m.reward.model.gpt.config().context as usize;
        let (logp, values, ref_logp) = (mask.zeros_like(), mask.zeros_like(), mask.zeros_like());
        // Each score, then the entropy summed over the response tokens.
        let mut sums = vec![0.0; sequences.len() + 1];
        tch::no_grad(|| {
            for (i, chunk) in sequences.chunks(micro).enumerate() {
                let (start, end) = ranks::rows(chunk.len());
                if start == end {
                    continue;
                }
                let first = i * micro + start;
                let rows = |t: &Tensor| t.narrow(0, first as i64, (end - start) as i64);
                let (x, y) = (rows(&batch.x), rows(&batch.y));
                let hidden = m.policy.hidden_states(&x, false);
                let logits = m.policy.logits(&hidden) / p.temperature;
                rows(&logp).copy_(&token_logprobs(&logits, &y));
                sums[sequences.len()] += (entropy(&logits, &rows(&mask)) * rows(&mask).sum(Kind::Float)).double_value(&[]);
                rows(&values).copy_(&m.values(&hidden));
                rows(&ref_logp).copy_(&token_logprobs(&(m.reference.forward(&x, false) / p.temperature), &y));
                let scored: Vec<Sequence> = chunk[start..end].iter().map(|s| s.clone().fit(reward_context)).collect();
                let score = m.reward.forward(&pad(&scored, m.eot, sampler.device()), false);
                let score = Vec::<f64>::try_from(score.select(1, 0).to_kind(Kind::Double).to_device(tch::Device::Cpu))?;
                sums[first..first + score.len()].copy_from_slice(&score);
            }
            anyhow::Ok(())
        })?;
        for t in [&logp, &values, &ref_logp] {
            ranks::merge(t)?;
        }
        let mut scores = ranks::sum(&sums)?;
        let entropy = scores.pop().expect("the entropy's sum") / mask.sum(Kind::Float).double_value(&[]);
        Ok(Rollout { responses, values: values * &mask, logp, ref_logp, batch, mask, scores, entropy })
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
/// length (less lockstep feeding of prompt tokens); the prompt at place `k`
/// in length order draws with seed `seed + k`. Across ranks, each draws its
/// rows of every batch and leaves the others' responses empty.
fn sample(gpt: &Gpt, prompts: &[Vec<i64>], seed: u64, max_tokens: usize, temperature: f64, micro: usize, eot: i64) -> Vec<Vec<i64>> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let mut responses = vec![Vec::new(); prompts.len()];
    for (c, chunk) in order.chunks(micro).enumerate() {
        let (start, end) = ranks::rows(chunk.len());
        if start == end {
            continue;
        }
        let chunk = &chunk[start..end];
        let batch: Vec<Vec<i64>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let s = Sampling { max_tokens, temperature, top_k: None, top_p: None, seed: seed.wrapping_add((c * micro + start) as u64) };
        for (&i, response) in chunk.iter().zip(generate_batch(gpt, &batch, &s, Some(eot))) {
            responses[i] = response;
        }
    }
    responses
}

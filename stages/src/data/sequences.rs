//! Token sequences with a scored part, padded into batches: the shape of
//! every post-training and evaluation step.
//!
//! A [`Sequence`] is a context (a prompt, a benchmark query) followed by the
//! part that counts (a response, an answer choice). SFT trains on the counted
//! part only, DPO and PPO need its log-probabilities, the reward model and
//! the classifier read the hidden state of its last token, and evaluation
//! sums its log-likelihood. [`pad`] turns any list of them into one batch:
//!
//! ```text
//! x  [B, T]  ids, right-padded with `pad_id`
//! y  [B, T]  y[t] = ids[t+1] where ids[t+1] is counted, else IGNORE_INDEX
//! ```
//!
//! Padding goes on the right, so with causal attention no real token ever
//! attends to a pad and no attention mask is needed: a padded row gives the
//! same logits at its real positions as the row alone (tested).

use tch::{Device, Kind, Tensor};

use crate::model::{Gpt, IGNORE_INDEX};

/// Token ids of which those from `start` on are counted (trained on, scored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub ids: Vec<i64>,
    /// The first counted token; 1 ≤ start ≤ ids.len() (a token needs a
    /// predecessor to be predicted).
    pub start: usize,
}

impl Sequence {
    /// `context` then `counted`.
    pub fn new(context: &[i64], counted: &[i64]) -> Sequence {
        Sequence { ids: [context, counted].concat(), start: context.len() }
    }

    /// Cut to at most `max` tokens, dropping context from the left first,
    /// then counted tokens from the right, and always keeping one token of
    /// context so that the first counted one has a predecessor.
    pub fn fit(mut self, max: usize) -> Sequence {
        let max = max.max(2);
        if self.ids.len() > max {
            let drop = (self.ids.len() - max).min(self.start.saturating_sub(1));
            self.ids.drain(..drop);
            self.start -= drop;
            self.ids.truncate(max);
            self.start = self.start.min(self.ids.len());
        }
        self
    }

    /// Tokens counted.
    pub fn counted(&self) -> usize {
        self.ids.len() - self.start
    }
}

/// A right-padded batch of [`Sequence`]s.
pub struct Padded {
    /// Ids [B, T] (int64), T the longest sequence.
    pub x: Tensor,
    /// Targets [B, T]: the next id at counted positions, IGNORE_INDEX elsewhere.
    pub y: Tensor,
    /// Real tokens per row.
    pub lengths: Vec<i64>,
}

impl Padded {
    /// Index [B] of each row's last real token, for heads that read one
    /// hidden state per sequence (reward, classification, value of the end).
    pub fn last(&self) -> Tensor {
        let last: Vec<i64> = self.lengths.iter().map(|n| n - 1).collect();
        Tensor::from_slice(&last).to_device(self.x.device())
    }

    /// Whether each target counts, as 0/1 floats [B, T].
    pub fn mask(&self) -> Tensor {
        self.y.ne(IGNORE_INDEX).to_kind(Kind::Float)
    }
}

/// One batch of `sequences`, padded with `pad_id`, on `device`.
pub fn pad(sequences: &[Sequence], pad_id: i64, device: Device) -> Padded {
    assert!(!sequences.is_empty(), "a batch needs at least one sequence");
    let width = sequences.iter().map(|s| s.ids.len()).max().unwrap_or(0).max(1);
    let mut x = vec![pad_id; sequences.len() * width];
    let mut y = vec![IGNORE_INDEX; sequences.len() * width];
    for (row, s) in sequences.iter().enumerate() {
        assert!(s.start >= 1 || s.counted() == 0, "a counted token needs a predecessor");
        let base = row * width;
        x[base..base + s.ids.len()].copy_from_slice(&s.ids);
        for t in s.start.max(1)..s.ids.len() {
            y[base + t - 1] = s.ids[t];
        }
    }
    let shape = [sequences.len() as i64, width as i64];
    Padded {
        x: Tensor::from_slice(&x).view(shape).to_device(device),
        y: Tensor::from_slice(&y).view(shape).to_device(device),
        lengths: sequences.iter().map(|s| s.ids.len() as i64).collect(),
    }
}

/// log p(y[t]) under logits [B, T, V], as fp32 [B, T]; 0 where y is
/// IGNORE_INDEX. Differentiable.
pub fn token_logprobs(logits: &Tensor, y: &Tensor) -> Tensor {
    let counted = y.ne(IGNORE_INDEX);
    let index = y.where_scalarother(&counted, 0).unsqueeze(-1);
    let logp = logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float).gather(-1, &index, false).squeeze_dim(-1);
    logp * counted.to_kind(Kind::Float)
}

/// Summed log-probability of each row's counted tokens, [B].
pub fn sequence_logprobs(logits: &Tensor, y: &Tensor) -> Tensor {
    token_logprobs(logits, y).sum_dim_intlist(-1, false, Kind::Float)
}

/// Summed log-probability of each sequence's counted tokens under `gpt`,
/// scored `batch_size` at a time without a graph: evaluation, and the log-
/// probabilities of a frozen reference model.
pub fn score(gpt: &Gpt, sequences: &[Sequence], batch_size: usize, pad_id: i64) -> Vec<f64> {
    let cuda = gpt.device().is_cuda();
    tch::no_grad(|| {
        sequences
            .chunks(batch_size.max(1))
            .flat_map(|chunk| {
                let batch = pad(chunk, pad_id, gpt.device());
                let logprobs = tch::autocast(cuda, || sequence_logprobs(&gpt.forward(&batch.x, false), &batch.y));
                Vec::<f64>::try_from(logprobs.to_kind(Kind::Double).to_device(Device::Cpu)).expect("a 1-D tensor")
            })
            .collect()
    })
}

/// Rows [B, C] of hidden states [B, T, C] at positions `index` [B].
pub fn gather_rows(hidden: &Tensor, index: &Tensor) -> Tensor {
    let c = hidden.size()[2];
    hidden.gather(1, &index.view([-1, 1, 1]).expand([-1, 1, c], false), false).squeeze_dim(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model;
    use crate::testing::{build, tiny, torch_rng};

    #[test]
    fn fit_drops_context_from_the_left_and_keeps_a_predecessor() {
        let s = Sequence::new(&[1, 2, 3, 4], &[5, 6]);
        assert_eq!(s.clone().fit(10), s);
        assert_eq!(s.clone().fit(4), Sequence { ids: vec![3, 4, 5, 6], start: 2 });
        assert_eq!(s.clone().fit(3), Sequence { ids: vec![4, 5, 6], start: 1 });
        assert_eq!(s.fit(2), Sequence { ids: vec![4, 5], start: 1 });
    }

    #[test]
    fn pad_counts_only_the_scored_part_and_pads_on_the_right() {
        let p = pad(&[Sequence::new(&[1, 2], &[3]), Sequence::new(&[4], &[5, 6, 7])], 0, Device::Cpu);
        assert_eq!(Vec::<i64>::try_from(p.x.view([-1])).unwrap(), [1, 2, 3, 0, 4, 5, 6, 7]);
        let i = IGNORE_INDEX;
        assert_eq!(Vec::<i64>::try_from(p.y.view([-1])).unwrap(), [i, 3, i, i, 5, 6, 7, i]);
        assert_eq!(p.lengths, [3, 4]);
        assert_eq!(Vec::<i64>::try_from(p.last()).unwrap(), [2, 3]);
    }

    /// Batched scoring gives each row the log-likelihood it gets alone, and
    /// the sum matches the model's own cross-entropy.
    #[test]
    fn padded_rows_score_as_they_do_alone() {
        let _rng = torch_rng();
        let config = tiny("llama", serde_json::json!({}));
        let (_vs, gpt) = build(&config, 0);
        let seqs = [Sequence::new(&[1, 2, 3], &[4, 5]), Sequence::new(&[6], &[7, 8, 9, 10, 11, 12]), Sequence::new(&[3, 3], &[2])];
        let batch = pad(&seqs, 0, Device::Cpu);
        let together = Vec::<f64>::try_from(sequence_logprobs(&gpt.forward(&batch.x, false), &batch.y)).unwrap();
        for (s, t) in seqs.iter().zip(&together) {
            let alone = pad(std::slice::from_ref(s), 0, Device::Cpu);
            let logits = gpt.forward(&alone.x, false);
            let a = sequence_logprobs(&logits, &alone.y).double_value(&[0]);
            assert!((a - t).abs() < 1e-5, "{a} vs {t}");
            let ce = model::loss(&logits, &alone.y).double_value(&[]) * s.counted() as f64;
            assert!((ce + a).abs() < 1e-4, "{ce} vs {a}");
        }
        let scored = score(&gpt, &seqs, 2, 0);
        assert!(scored.iter().zip(&together).all(|(a, b)| (a - b).abs() < 1e-5), "{scored:?} vs {together:?}");
        let h = gpt.hidden_states(&batch.x, false);
        let rows = gather_rows(&h, &batch.last());
        assert_eq!(rows.size(), [3, config.d_model]);
        let direct = h.get(1).get(6);
        assert!(rows.get(1).allclose(&direct, 1e-6, 1e-6, false));
    }
}

//! Log-likelihood scoring, batched on the model's device, the way
//! lm-evaluation-harness scores: a request is a [`Sequence`] (context, then
//! the continuation whose log-probability counts).
//!
//! * [`encode_pair`] tokenizes (context, continuation) as lm-eval's
//!   `_encode_pair` does: trailing whitespace of the context moves to the
//!   continuation, the context is encoded alone and the continuation is the
//!   tail of the encoding of both; an empty context becomes `<|endoftext|>`.
//! * [`Scorer::score`] sums each continuation's log-probability and says
//!   whether greedy decoding reproduces it (every token is the argmax).
//!   Requests are sorted by length so a batch wastes little on padding;
//!   padding on the right keeps every row's scores what they are alone.
//! * [`rolling_windows`] cuts a token stream into lm-eval's
//!   `loglikelihood_rolling` requests for perplexity.

use anyhow::{anyhow, Result};
use tch::{Kind, Tensor};
use tokenizers::Tokenizer;

use crate::data::sequences::{pad, Sequence};
use crate::model::{Gpt, IGNORE_INDEX};

/// What a continuation scored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Summed log-probability (nats) of the continuation's tokens.
    pub logprob: f64,
    /// Whether every continuation token is the model's most likely one.
    pub greedy: bool,
    /// Continuation tokens scored.
    pub tokens: usize,
}

/// Token ids of `text`, no special tokens added.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<i64>> {
    let encoding = tokenizer.encode(text, false).map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
    Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
}

/// The request for `continuation` after `context`; see the module docs.
pub fn encode_pair(tokenizer: &Tokenizer, eot: i64, context: &str, continuation: &str) -> Result<Sequence> {
    let trimmed = context.trim_end();
    let (context, continuation) = (trimmed, format!("{}{continuation}", &context[trimmed.len()..]));
    if context.is_empty() {
        return Ok(Sequence::new(&[eot], &encode(tokenizer, &continuation)?));
    }
    let whole = encode(tokenizer, &format!("{context}{continuation}"))?;
    let context = encode(tokenizer, context)?;
    Ok(Sequence::new(&context, &whole[context.len().min(whole.len())..]))
}

/// lm-eval's `get_rolling_token_windows` with `context_len = 1`, each made
/// disjoint: every token of `tokens` is predicted exactly once, the first
/// window from `prefix` (`<|endoftext|>`), each later one from as many
/// preceding tokens as fit in the model's `context` (`max_len`).
pub fn rolling_windows(tokens: &[i64], prefix: i64, max_len: usize) -> Vec<Sequence> {
    let mut windows = Vec::new();
    if tokens.is_empty() {
        return windows;
    }
    let first = max_len.min(tokens.len());
    windows.push(Sequence::new(&[prefix], &tokens[..first]));
    let mut predicted = first;
    while predicted < tokens.len() {
        let len = (tokens.len() - predicted).min(max_len);
        let end = predicted + len;
        windows.push(Sequence::new(&tokens[end - max_len - 1..end - len], &tokens[end - len..end]));
        predicted = end;
    }
    windows
}

/// Scores requests with a model, as many sequences per forward pass as fit
/// in `batch_tokens` padded positions (at least one): many short sentences or
/// a few long texts, so that each pass has enough work to share among threads
/// while the logits, batch_tokens × vocabulary floats, stay bounded.
pub struct Scorer<'a> {
    pub gpt: &'a Gpt,
    pub batch_tokens: usize,
    pub pad_id: i64,
}

impl Scorer<'_> {
    /// The score of every request, in order. A request longer than the
    /// model's context + 1 is cut by [`Sequence::fit`] (context from the left
    /// first), as lm-eval keeps the last `max_length + 1` tokens.
    pub fn score(&self, requests: &[Sequence]) -> Vec<Score> {
        let max = self.gpt.config().context as usize + 1;
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(requests[i].ids.len()));
        let mut scores = vec![Score { logprob: 0.0, greedy: true, tokens: 0 }; requests.len()];
        tch::no_grad(|| {
            let mut rest = order.as_slice();
            while !rest.is_empty() {
                // The longest comes first, so it sets the batch's width.
                let width = requests[rest[0]].ids.len().min(max);
                let (chunk, tail) = rest.split_at((self.batch_tokens / width).clamp(1, rest.len()));
                let batch: Vec<Sequence> = chunk.iter().map(|&i| requests[i].clone().fit(max)).collect();
                for (&i, score) in chunk.iter().zip(self.score_batch(&batch)) {
                    scores[i] = score;
                }
                rest = tail;
            }
        });
        scores
    }

    fn score_batch(&self, batch: &[Sequence]) -> Vec<Score> {
        let padded = pad(batch, self.pad_id, self.gpt.device());
        // The last position predicts nothing: its target is always ignored.
        let width = padded.x.size()[1];
        let (x, y) = if width > 1 { (padded.x.narrow(1, 0, width - 1), padded.y.narrow(1, 0, width - 1)) } else { (padded.x, padded.y) };
        // The output head only where a continuation token is predicted: a
        // few positions of each row, most of a small model's work otherwise.
        let hidden = self.gpt.hidden_states(&x, false); // [B, T, C]
        let counted = y.ne(IGNORE_INDEX).reshape([-1]).nonzero().squeeze_dim(-1); // [N]
        let rows = counted.divide_scalar_mode(y.size()[1], "floor"); // [N]: each one's row
        let targets = y.reshape([-1]).index_select(0, &counted); // [N]
        let logits = self.gpt.logits(&hidden.reshape([-1, hidden.size()[2]]).index_select(0, &counted)); // [N, V]
        let logp = logits.log_softmax(-1, Kind::Float).gather(1, &targets.unsqueeze(1), false).squeeze_dim(1); // [N]
        let zeros = Tensor::zeros([batch.len() as i64], (Kind::Float, logp.device()));
        let per_row = zeros.index_add(0, &rows, &logp); // [B]
        let misses = logits.argmax(-1, false).ne_tensor(&targets).to_kind(Kind::Float);
        let missed = zeros.index_add(0, &rows, &misses); // [B]: tokens greedy decoding gets wrong
        let host = |t: Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(tch::Device::Cpu)).expect("a [B] tensor");
        let (logprobs, missed) = (host(per_row), host(missed));
        batch
            .iter()
            .zip(logprobs.into_iter().zip(missed))
            .map(|(s, (logprob, missed))| Score { logprob, greedy: missed == 0.0, tokens: s.counted() })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testing::{build, tiny, torch_rng};

    #[test]
    fn rolling_windows_predict_every_token_once_with_the_longest_context_that_fits() {
        let tokens: Vec<i64> = (10..20).collect();
        let windows = rolling_windows(&tokens, 0, 4);
        let pairs: Vec<(Vec<i64>, Vec<i64>)> = windows.iter().map(|w| (w.ids[..w.start].to_vec(), w.ids[w.start..].to_vec())).collect();
        assert_eq!(pairs, [(vec![0], vec![10, 11, 12, 13]), (vec![13], vec![14, 15, 16, 17]), (vec![15, 16, 17], vec![18, 19]),]);
        assert!(windows.iter().all(|w| w.ids.len() <= 5));
        assert_eq!(rolling_windows(&tokens[..3], 0, 4), [Sequence::new(&[0], &[10, 11, 12])]);
    }

    /// Scores do not depend on the batch a request lands in: each request
    /// alone, in batches of 3 and all at once agree, greedy flags included.
    #[test]
    fn batched_scores_equal_scores_one_at_a_time() {
        let _rng = torch_rng();
        let config = tiny("gpt2", json!({}));
        let (_vs, gpt) = build(&config, 5);
        // Mixed lengths, one longer than the context (12) + 1, one request of
        // a single counted token.
        let requests = vec![
            Sequence::new(&[1, 2, 3], &[4, 5]),
            Sequence::new(&[7], &[8]),
            Sequence::new(&(0..15).collect::<Vec<_>>(), &[3, 4, 5]),
            Sequence::new(&[9, 9, 9, 9], &[1, 2, 3, 4, 5, 6]),
            Sequence::new(&[2], &[2, 2]),
        ];
        let scores = |batch_tokens| Scorer { gpt: &gpt, batch_tokens, pad_id: 0 }.score(&requests);
        let alone = scores(1);
        // The two longest rows, then the other three; all at once.
        for batch_tokens in [26, 1000] {
            for (a, b) in alone.iter().zip(scores(batch_tokens)) {
                assert!((a.logprob - b.logprob).abs() < 1e-5, "{batch_tokens} tokens: {a:?} vs {b:?}");
                assert_eq!((a.greedy, a.tokens), (b.greedy, b.tokens));
            }
        }
        assert_eq!(alone.iter().map(|s| s.tokens).collect::<Vec<_>>(), [2, 1, 3, 6, 2]);

        // The long request is cut to its last 13 tokens, as lm-eval does.
        let cut = Sequence::new(&(5..15).collect::<Vec<_>>(), &[3, 4, 5]);
        let direct = Scorer { gpt: &gpt, batch_tokens: 1, pad_id: 0 }.score(&[cut]);
        assert!((direct[0].logprob - alone[2].logprob).abs() < 1e-6);

        // A continuation made of the model's own greedy picks is greedy.
        let mut ids = vec![4i64];
        for _ in 0..3 {
            let logits = tch::no_grad(|| gpt.forward(&Tensor::from_slice(&ids).view([1, -1]), false));
            ids.push(logits.get(0).get(-1).argmax(-1, false).int64_value(&[]));
        }
        let greedy = Sequence { ids: ids.clone(), start: 1 };
        let mut other = greedy.clone();
        other.ids[3] = (other.ids[3] + 1) % config.vocab_size;
        let s = Scorer { gpt: &gpt, batch_tokens: 100, pad_id: 0 }.score(&[greedy, other]);
        assert!(s[0].greedy && !s[1].greedy, "{s:?}");
    }
}

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
//!   Requests with one context compute it once, and the cores score their
//!   shares on model replicas; see [`Scorer`].
//! * [`rolling_windows`] cuts a token stream into lm-eval's
//!   `loglikelihood_rolling` requests for perplexity.

use anyhow::{anyhow, Result};
use tch::{Kind, Tensor};
use tokenizers::Tokenizer;

use crate::data::sequences::{pad, Sequence};
use crate::model::{Gpt, IGNORE_INDEX};
use crate::train::replicas::{Replicas, Task};

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
/// while the activations stay bounded.
///
/// * Requests that share their context (a multiple-choice item's choices)
///   are a [`Group`]: the context is computed once, and its keys and values
///   are copied to every continuation's row ([`score_groups`]).
/// * With [`Replicas`] (the CPU, several cores) each core scores its share
///   of the work, single-threaded, on `batch_tokens` / cores positions at a
///   time: a small model's operations are too short to spread over
///   intra-op threads.
pub struct Scorer<'a> {
    pub gpt: &'a Gpt,
    pub batch_tokens: usize,
    pub pad_id: i64,
    pub replicas: Option<&'a Replicas>,
}

/// Requests with the same context: (request index, continuation tokens).
struct Group {
    context: Vec<i64>,
    members: Vec<(usize, Vec<i64>)>,
}

/// One core's work: requests scored alone (longest first) and groups
/// (longest context first).
#[derive(Default)]
struct Share {
    alone: Vec<(usize, Sequence)>,
    groups: Vec<Group>,
}

impl Scorer<'_> {
    /// The score of every request, in order. A request longer than the
    /// model's context + 1 is cut by [`Sequence::fit`] (context from the left
    /// first), as lm-eval keeps the last `max_length + 1` tokens.
    pub fn score(&self, requests: &[Sequence]) -> Result<Vec<Score>> {
        let max = self.gpt.config().context as usize + 1;
        let (mut alone, mut groups) = (Vec::new(), Vec::<Group>::new());
        let mut group_of = std::collections::HashMap::<Vec<i64>, usize>::new();
        for (i, request) in requests.iter().enumerate() {
            let request = request.clone().fit(max);
            let (context, continuation) = request.ids.split_at(request.start);
            match group_of.get(context) {
                Some(&g) if !continuation.is_empty() => groups[g].members.push((i, continuation.to_vec())),
                _ if !continuation.is_empty() => {
                    group_of.insert(context.to_vec(), groups.len());
                    groups.push(Group { context: context.to_vec(), members: vec![(i, continuation.to_vec())] });
                }
                _ => alone.push((i, request)),
            }
        }
        // A context of one request is no saving: it is scored alone.
        let (shared, single): (Vec<Group>, Vec<Group>) = groups.into_iter().partition(|g| g.members.len() > 1);
        for g in single {
            let (i, continuation) = g.members.into_iter().next().expect("one member");
            alone.push((i, Sequence::new(&g.context, &continuation)));
        }
        alone.sort_by_key(|(_, s)| std::cmp::Reverse(s.ids.len()));
        let mut shared = shared;
        shared.sort_by_key(|g| std::cmp::Reverse(g.context.len()));

        // Every part takes every parts-th request and group, longest first:
        // an even share of long and short ones.
        let parts = self.replicas.map_or(1, Replicas::parts).min((alone.len() + shared.len()).max(1));
        let mut shares: Vec<Share> = (0..parts).map(|_| Share::default()).collect();
        for (k, request) in alone.into_iter().enumerate() {
            shares[k % parts].alone.push(request);
        }
        for (k, group) in shared.into_iter().enumerate() {
            shares[k % parts].groups.push(group);
        }
        let (per_pass, pad_id) = (self.batch_tokens / parts, self.pad_id);
        let scored: Vec<Vec<(usize, Score)>> = match self.replicas {
            Some(replicas) => replicas.run(
                self.gpt,
                shares.into_iter().map(|share| Box::new(move |gpt: &Gpt| score_share(gpt, share, per_pass, pad_id)) as Task<_>).collect(),
            )?,
            None => shares.into_iter().map(|share| score_share(self.gpt, share, per_pass, pad_id)).collect(),
        };
        let mut scores = vec![Score { logprob: 0.0, greedy: true, tokens: 0 }; requests.len()];
        for (i, score) in scored.into_iter().flatten() {
            scores[i] = score;
        }
        Ok(scores)
    }
}

/// Scores a [`Share`] in passes of at most `batch_tokens` padded positions.
fn score_share(gpt: &Gpt, share: Share, batch_tokens: usize, pad_id: i64) -> Vec<(usize, Score)> {
    let _no_grad = tch::no_grad_guard();
    let mut scores = Vec::new();
    let mut rest = share.alone.as_slice();
    while !rest.is_empty() {
        // The longest comes first, so it sets the batch's width.
        let width = rest[0].1.ids.len();
        let (chunk, tail) = rest.split_at((batch_tokens / width).clamp(1, rest.len()));
        let batch: Vec<Sequence> = chunk.iter().map(|(_, s)| s.clone()).collect();
        scores.extend(chunk.iter().map(|(i, _)| *i).zip(score_batch(gpt, &batch, pad_id)));
        rest = tail;
    }
    // Groups whose contexts have one length share a pass: the keys and
    // values of the contexts line up.
    let mut rest = share.groups.as_slice();
    while !rest.is_empty() {
        let len = rest[0].context.len();
        let (mut n, mut rows, mut width) = (0, 0, 0);
        for g in rest.iter().take_while(|g| g.context.len() == len) {
            let longest = g.members.iter().map(|(_, c)| c.len()).max().unwrap_or(1);
            let (r, w) = (rows + g.members.len(), width.max(longest));
            if n > 0 && ((n + 1) * len > batch_tokens || r * w > batch_tokens) {
                break;
            }
            (n, rows, width) = (n + 1, r, w);
        }
        let (chunk, tail) = rest.split_at(n);
        scores.extend(score_groups(gpt, chunk, pad_id));
        rest = tail;
    }
    scores
}

/// Scores right-padded rows of whole requests in one pass.
fn score_batch(gpt: &Gpt, batch: &[Sequence], pad_id: i64) -> Vec<Score> {
    let padded = pad(batch, pad_id, gpt.device());
    // The last position predicts nothing: its target is always ignored.
    let width = padded.x.size()[1];
    let (x, y) = if width > 1 { (padded.x.narrow(1, 0, width - 1), padded.y.narrow(1, 0, width - 1)) } else { (padded.x, padded.y) };
    let hidden = gpt.hidden_states(&x, false); // [B, T, C]
    let counted = y.ne(IGNORE_INDEX).reshape([-1]).nonzero().squeeze_dim(-1); // [N]
    let rows = counted.divide_scalar_mode(y.size()[1], "floor"); // [N]: each one's row
    let targets = y.reshape([-1]).index_select(0, &counted); // [N]
    let hidden = hidden.reshape([-1, hidden.size()[2]]).index_select(0, &counted); // [N, C]
    let counts = batch.iter().map(Sequence::counted);
    score_positions(gpt, &hidden, &targets, &rows, counts)
}

/// Scores groups whose contexts have one length L: the contexts in one pass
/// through an empty cache, then every member's continuation but its last
/// token after its group's cached keys and values, right-padded. The
/// context's last position predicts each member's first token.
fn score_groups(gpt: &Gpt, groups: &[Group], pad_id: i64) -> Vec<(usize, Score)> {
    let device = gpt.device();
    let len = groups[0].context.len() as i64;
    let contexts: Vec<i64> = groups.iter().flat_map(|g| g.context.iter().copied()).collect();
    let mut cache = gpt.kv_cache(groups.len() as i64);
    let x = Tensor::from_slice(&contexts).view([groups.len() as i64, len]).to_device(device);
    let last = gpt.hidden_cached(&x, &mut cache).select(1, len - 1); // [G, C]
    let members: Vec<(usize, &[i64], i64)> =
        groups.iter().enumerate().flat_map(|(g, group)| group.members.iter().map(move |(i, c)| (*i, c.as_slice(), g as i64))).collect();
    let group_of: Vec<i64> = members.iter().map(|m| m.2).collect();
    let group_of = Tensor::from_slice(&group_of).to_device(device); // [R]
                                                                    // The first tokens, predicted by the contexts' last positions.
    let mut hidden = vec![last.index_select(0, &group_of)]; // [R, C]
    let mut targets: Vec<i64> = members.iter().map(|m| m.1[0]).collect();
    let mut rows: Vec<i64> = (0..members.len() as i64).collect();
    // The later tokens, each predicted by the one before it.
    let width = members.iter().map(|m| m.1.len() - 1).max().unwrap_or(0);
    if width > 0 {
        cache.select_rows(&group_of);
        let mut x = vec![pad_id; members.len() * width];
        let mut at = Vec::new();
        for (r, (_, continuation, _)) in members.iter().enumerate() {
            x[r * width..r * width + continuation.len() - 1].copy_from_slice(&continuation[..continuation.len() - 1]);
            for (t, &target) in continuation.iter().enumerate().skip(1) {
                at.push((r * width + t - 1) as i64);
                targets.push(target);
                rows.push(r as i64);
            }
        }
        let x = Tensor::from_slice(&x).view([members.len() as i64, width as i64]).to_device(device);
        let after = gpt.hidden_cached(&x, &mut cache); // [R, W, C]
        let at = Tensor::from_slice(&at).to_device(device);
        hidden.push(after.reshape([-1, after.size()[2]]).index_select(0, &at));
    }
    let hidden = Tensor::cat(&hidden, 0); // [N, C]
    let targets = Tensor::from_slice(&targets).to_device(device);
    let rows = Tensor::from_slice(&rows).to_device(device);
    let scores = score_positions(gpt, &hidden, &targets, &rows, members.iter().map(|m| m.1.len()));
    members.iter().map(|m| m.0).zip(scores).collect()
}

/// Scores from the hidden states [N, C] of the positions that predict
/// `targets` [N], each in row `rows` [N]; `counts` gives each row's count of
/// targets. The output head runs only at these positions: a few of each
/// row, most of a small model's work otherwise.
fn score_positions(
    gpt: &Gpt,
    hidden: &Tensor,
    targets: &Tensor,
    rows: &Tensor,
    counts: impl ExactSizeIterator<Item = usize>,
) -> Vec<Score> {
    let logits = gpt.logits(hidden); // [N, V]
    let logp = logits.log_softmax(-1, Kind::Float).gather(1, &targets.unsqueeze(1), false).squeeze_dim(1); // [N]
    let zeros = Tensor::zeros([counts.len() as i64], (Kind::Float, logp.device()));
    let per_row = zeros.index_add(0, rows, &logp); // [B]
    let misses = logits.argmax(-1, false).ne_tensor(targets).to_kind(Kind::Float);
    let missed = zeros.index_add(0, rows, &misses); // [B]: tokens greedy decoding gets wrong
    let host = |t: Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(tch::Device::Cpu)).expect("a [B] tensor");
    let (logprobs, missed) = (host(per_row), host(missed));
    counts
        .zip(logprobs.into_iter().zip(missed))
        .map(|(tokens, (logprob, missed))| Score { logprob, greedy: missed == 0.0, tokens })
        .collect()
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
    /// Choices that share their context are scored from one pass over it,
    /// on the cores' replicas or not, and score what each does alone.
    #[test]
    fn shared_contexts_and_replicas_score_what_requests_score_alone() {
        let _rng = torch_rng();
        let config = tiny("gpt2", json!({}));
        let (vs, gpt) = build(&config, 7);
        let mut requests = Vec::new();
        // Two items of four choices with contexts of one length (one pass),
        // one of three with a longer context, choices of 1-4 tokens; one
        // item cut by the context (12): its choices' contexts differ after
        // the cut; two requests alone.
        for (context, choices) in [
            (vec![1, 2, 3], vec![vec![4], vec![5, 6], vec![7, 8, 9], vec![10, 11, 12, 13]]),
            (vec![3, 2, 1], vec![vec![9, 9], vec![8], vec![7, 7, 7], vec![1]]),
            (vec![5, 5, 6, 6, 7], vec![vec![2, 3], vec![2], vec![4, 4, 4, 4]]),
            ((0..11).collect(), vec![vec![1], vec![2, 3, 4]]),
        ] {
            for choice in choices {
                requests.push(Sequence::new(&context, &choice));
            }
        }
        requests.push(Sequence::new(&[4, 4], &[5]));
        requests.insert(3, Sequence::new(&[9], &[1, 2, 3]));
        let scorer = |batch_tokens, replicas| Scorer { gpt: &gpt, batch_tokens, pad_id: 0, replicas };
        let alone: Vec<Score> = requests.iter().map(|r| scorer(1000, None).score(std::slice::from_ref(r)).unwrap()[0]).collect();
        let replicas = Replicas::new(&vs, &config, 2).unwrap().expect("two CPU threads");
        for (batch_tokens, replicas) in [(1000, None), (8, None), (1000, Some(&replicas)), (8, Some(&replicas))] {
            let together = scorer(batch_tokens, replicas).score(&requests).unwrap();
            for (a, b) in alone.iter().zip(&together) {
                assert!((a.logprob - b.logprob).abs() < 1e-5, "{batch_tokens} tokens, replicas {}: {a:?} vs {b:?}", replicas.is_some());
                assert_eq!((a.greedy, a.tokens), (b.greedy, b.tokens));
            }
        }
    }

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
        let scores = |batch_tokens| Scorer { gpt: &gpt, batch_tokens, pad_id: 0, replicas: None }.score(&requests).unwrap();
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
        let direct = Scorer { gpt: &gpt, batch_tokens: 1, pad_id: 0, replicas: None }.score(&[cut]).unwrap();
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
        let s = Scorer { gpt: &gpt, batch_tokens: 100, pad_id: 0, replicas: None }.score(&[greedy, other]).unwrap();
        assert!(s[0].greedy && !s[1].greedy, "{s:?}");
    }
}

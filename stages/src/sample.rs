//! Sampling text from a [`Gpt`] with a KV cache.
//!
//! Each step feeds only the new token and attends to the cached keys and
//! values of the earlier ones. Once the sequence outgrows the context, the
//! model sees the last `context` tokens, as nanoGPT's sampler does; positions
//! then shift by one every step, so every earlier key changes and each step
//! recomputes the window from scratch (exact, but without the cache's saving).
//!
//! The random draws come from a seeded SplitMix64 on the host, not from
//! libtorch's global generator, so sampling neither disturbs nor depends on
//! it and picks the same tokens on every device.

use anyhow::{anyhow, Context, Result};
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use crate::data::rng::Rng;
use crate::formats::tokenizer::END_OF_TEXT;
use crate::model::Gpt;

/// The knobs of [`generate`] beyond the prompt (shared with the engine,
/// which parses `llmflow generate`'s options into it).
pub use llmflow_protocol::Sampling;

/// `prompt` followed by a sampled continuation; an empty prompt starts from
/// `<|endoftext|>`, i.e. a fresh document.
pub fn complete(gpt: &Gpt, tokenizer: &Tokenizer, prompt: &str, sampling: &Sampling) -> Result<String> {
    let ids: Vec<i64> = if prompt.is_empty() {
        vec![i64::from(tokenizer.token_to_id(END_OF_TEXT).context("the tokenizer has no <|endoftext|>")?)]
    } else {
        let encoding = tokenizer.encode(prompt, false).map_err(|e| anyhow!("{e}"))?;
        encoding.get_ids().iter().map(|&id| i64::from(id)).collect()
    };
    let new = tch::no_grad(|| generate(gpt, &ids, sampling));
    let new: Vec<u32> = new.into_iter().map(|id| id as u32).collect();
    Ok(format!("{prompt}{}", tokenizer.decode(&new, false).map_err(|e| anyhow!("{e}"))?))
}

/// Continues `prompt` (token ids, at least one) by `max_tokens` tokens and
/// returns the new ones. `temperature` 0 is greedy decoding; otherwise the
/// logits are divided by it, cut to the `top_k` most likely tokens, then to
/// the smallest set whose probability reaches `top_p` (HF's order), and one
/// token is drawn.
pub fn generate(model: &Gpt, prompt: &[i64], s: &Sampling) -> Vec<i64> {
    assert!(!prompt.is_empty(), "generation needs a prompt of at least one token");
    let context = model.config().context as usize;
    let mut rng = Rng::new(s.seed);
    let mut tokens = prompt.to_vec();
    let mut cache = model.kv_cache(1);
    // tokens[start..] is what the model sees; the cache holds a prefix of it.
    let mut start = 0;
    for _ in 0..s.max_tokens {
        if tokens.len() - start > context {
            start = tokens.len() - context;
            cache = model.kv_cache(1);
        }
        let unseen = &tokens[start + cache.len() as usize..];
        let idx = Tensor::from_slice(unseen).view([1, -1]).to_device(model.device());
        let logits = model.forward_cached(&idx, &mut cache).get(0).get(-1); // [V]
        tokens.push(sample(&logits, s, &mut rng));
    }
    tokens.split_off(prompt.len())
}

/// Continues every prompt of a batch at once, through one KV cache of
/// `prompts.len()` rows, by up to `s.max_tokens` tokens; returns each row's
/// new tokens. A row stops early after drawing `stop` (which it keeps). Row
/// `i` draws as [`generate`] with seed `s.seed + i` would, so the result does
/// not depend on which prompts share a batch.
///
/// Prompts may differ in length: the model's positions admit no left
/// padding, so the rows advance in lockstep over absolute positions instead.
/// Their common prefix length goes in as one block; after that a row still
/// inside its prompt is fed its next prompt token, and the others their last
/// drawn one. No row ever sees a pad. Every prompt plus `max_tokens` must fit
/// the context (no sliding window here).
pub fn generate_batch(model: &Gpt, prompts: &[Vec<i64>], s: &Sampling, stop: Option<i64>) -> Vec<Vec<i64>> {
    generate_groups(model, prompts, 1, s, stop)
}

/// [`generate_batch`] with `group` continuations of each prompt: rows
/// `p · group .. (p + 1) · group` continue prompt `p`, row `i` with seed
/// `s.seed + i`. The prompts' common prefix is computed once per prompt,
/// then its keys and values are copied to the prompt's rows.
pub fn generate_groups(model: &Gpt, prompts: &[Vec<i64>], group: usize, s: &Sampling, stop: Option<i64>) -> Vec<Vec<i64>> {
    let context = model.config().context as usize;
    let shortest = prompts.iter().map(Vec::len).min().expect("a batch needs at least one prompt");
    assert!(shortest > 0 && group > 0, "generation needs a prompt of at least one token and a group of at least one");
    assert!(
        prompts.iter().all(|p| p.len() + s.max_tokens <= context),
        "every prompt plus {} new tokens must fit the context of {context}",
        s.max_tokens
    );
    let rows = prompts.len() * group;
    let prompt_of = |i: usize| &prompts[i / group];
    let mut rngs: Vec<Rng> = (0..rows).map(|i| Rng::new(s.seed.wrapping_add(i as u64))).collect();
    let mut new: Vec<Vec<i64>> = vec![Vec::new(); rows];
    let mut done = vec![s.max_tokens == 0; rows];
    let mut cache = model.kv_cache(prompts.len() as i64);
    let prefix: Vec<i64> = prompts.iter().flat_map(|p| &p[..shortest]).copied().collect();
    let idx = Tensor::from_slice(&prefix).view([prompts.len() as i64, shortest as i64]).to_device(model.device());
    let last = model.forward_cached(&idx, &mut cache).select(1, -1); // [P, V]
    let copies = Tensor::arange(prompts.len() as i64, (Kind::Int64, model.device())).repeat_interleave_self_int(group as i64, 0, None); // [P·G]: each row's prompt
    cache.select_rows(&copies);
    let mut last = last.index_select(0, &copies).to_device(Device::Cpu); // [P·G, V]
                                                                         // `position` is where the token fed next goes.
    for position in shortest.. {
        let mut feed = Vec::with_capacity(rows);
        for i in 0..rows {
            let prompt = prompt_of(i);
            let token = if position < prompt.len() {
                prompt[position]
            } else if !done[i] {
                let token = sample(&last.get(i as i64), s, &mut rngs[i]);
                new[i].push(token);
                done[i] = new[i].len() == s.max_tokens || Some(token) == stop;
                token
            } else {
                prompt[0] // a finished row's input is never read
            };
            feed.push(token);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        let idx = Tensor::from_slice(&feed).view([rows as i64, 1]).to_device(model.device());
        last = model.forward_cached(&idx, &mut cache).select(1, 0).to_device(Device::Cpu);
    }
    new
}

/// Picks a token from logits [V]; see [`generate`].
pub(crate) fn sample(logits: &Tensor, s: &Sampling, rng: &mut Rng) -> i64 {
    let (temperature, top_k, top_p) = (s.temperature, s.top_k, s.top_p);
    if temperature <= 0.0 {
        return logits.argmax(-1, false).int64_value(&[]);
    }
    let vocab = logits.size()[0] as usize;
    let k = top_k.map_or(vocab, |k| k.clamp(1, vocab)) as i64;
    // Candidates, most likely first.
    let (sorted, order) = logits.to_kind(Kind::Float).sort(-1, true);
    let scaled = Vec::<f32>::try_from(&(sorted.narrow(0, 0, k) / temperature).to_device(Device::Cpu)).unwrap();
    let order = Vec::<i64>::try_from(&order.narrow(0, 0, k).to_device(Device::Cpu)).unwrap();
    // Softmax over the top k.
    let mut probs: Vec<f64> = scaled.iter().map(|&l| f64::from(l - scaled[0]).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = top_p {
        let mut mass = 0.0;
        let keep = probs.iter().position(|&p| {
            mass += p;
            mass >= top_p
        });
        probs.truncate(keep.map_or(probs.len(), |i| i + 1));
    }
    // Inverse-CDF draw over what is left (its mass, not 1, after top-p).
    let mut u = rng.next_f64() * probs.iter().sum::<f64>();
    for (p, token) in probs.iter().zip(&order) {
        if u < *p {
            return *token;
        }
        u -= p;
    }
    order[probs.len() - 1]
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testing::{build, max_diff, tiny, torch_rng};

    /// nanoGPT's sampler: the whole window through `forward` at every step.
    fn generate_without_cache(model: &Gpt, prompt: &[i64], s: &Sampling) -> Vec<i64> {
        let context = model.config().context as usize;
        let mut rng = Rng::new(s.seed);
        let mut tokens = prompt.to_vec();
        for _ in 0..s.max_tokens {
            let window = &tokens[tokens.len().saturating_sub(context)..];
            let logits = model.forward(&Tensor::from_slice(window).view([1, -1]), false).get(0).get(-1);
            tokens.push(sample(&logits, s, &mut rng));
        }
        tokens.split_off(prompt.len())
    }

    const CONFIGS: [(&str, &str); 4] = [("gpt2", "sdpa"), ("gpt2", "explicit"), ("llama", "sdpa"), ("llama", "explicit")];

    #[test]
    fn kv_cache_logits_match_full_forward() {
        let _rng = torch_rng();
        for (arch, attention) in CONFIGS {
            let config = tiny(arch, json!({"attention": attention, "n_kv_head": if arch == "llama" { 2 } else { 4 }}));
            let (_, model) = build(&config, 2);
            let idx = Tensor::randint(config.vocab_size, [2, 12], (Kind::Int64, Device::Cpu));
            let full = model.forward(&idx, false);
            // A prompt, one token, then several at once (the mask is no longer a plain triangle).
            let mut cache = model.kv_cache(2);
            let pieces: Vec<Tensor> =
                [(0, 5), (5, 1), (6, 6)].iter().map(|&(start, len)| model.forward_cached(&idx.narrow(1, start, len), &mut cache)).collect();
            assert_eq!(cache.len(), 12);
            let diff = max_diff(&full, &Tensor::cat(&pieces, 1));
            assert!(diff < 1e-5, "{arch}, {attention}: {diff}");
        }
    }

    #[test]
    fn kv_cache_generation_matches_full_recompute() {
        let _rng = torch_rng();
        for (arch, attention) in CONFIGS {
            let config = tiny(arch, json!({"attention": attention}));
            let (_, model) = build(&config, 3);
            let prompt = [3, 1, 4, 1, 5];
            // 20 new tokens run past the context of 12.
            for (temperature, top_k, top_p, seed) in [(0.0, None, None, 0), (1.0, None, None, 42), (0.8, Some(10), Some(0.9), 7)] {
                let s = Sampling { max_tokens: 20, temperature, top_k, top_p, seed };
                let cached = generate(&model, &prompt, &s);
                let recomputed = generate_without_cache(&model, &prompt, &s);
                assert_eq!(cached.len(), 20);
                assert_eq!(cached, recomputed, "{arch}, {attention}, temperature {temperature}");
            }
            let s = Sampling { max_tokens: 20, temperature: 1.0, top_k: None, top_p: None, seed: 42 };
            assert_ne!(generate(&model, &prompt, &Sampling { seed: 43, ..s }), generate(&model, &prompt, &s));
        }
    }

    #[test]
    fn batched_generation_matches_one_prompt_at_a_time() {
        let _rng = torch_rng();
        for arch in ["gpt2", "llama"] {
            let config = tiny(arch, json!({"context": 16}));
            let (_, model) = build(&config, 4);
            let prompts = vec![vec![3, 1, 4, 1, 5], vec![9, 2], vec![6, 5, 3, 5, 8, 9, 7, 9]];
            let mut stopped_early = 0;
            for (temperature, stop) in [(0.0, None), (1.0, None), (1.0, Some(7)), (1.0, Some(3))] {
                let s = Sampling { max_tokens: 8, temperature, top_k: None, top_p: None, seed: 11 };
                let batched = tch::no_grad(|| generate_batch(&model, &prompts, &s, stop));
                for (i, (prompt, got)) in prompts.iter().zip(&batched).enumerate() {
                    let mut alone = generate(&model, prompt, &Sampling { seed: 11 + i as u64, ..s });
                    if let Some(end) = stop.and_then(|stop| alone.iter().position(|&t| t == stop)) {
                        alone.truncate(end + 1);
                        stopped_early += 1;
                    }
                    assert_eq!(got, &alone, "{arch}, row {i}, temperature {temperature}, stop {stop:?}");
                }
            }
            assert!(stopped_early > 0, "{arch}: no row drew a stop token");
        }
    }

    /// A group shares its prompt's prefill; each row still draws as it would alone.
    #[test]
    fn grouped_generation_matches_one_row_at_a_time() {
        let _rng = torch_rng();
        let config = tiny("llama", json!({"context": 16, "n_kv_head": 2}));
        let (_, model) = build(&config, 5);
        let prompts = vec![vec![3, 1, 4, 1, 5], vec![9, 2, 6]];
        let s = Sampling { max_tokens: 6, temperature: 1.0, top_k: None, top_p: None, seed: 21 };
        let grouped = tch::no_grad(|| generate_groups(&model, &prompts, 3, &s, Some(7)));
        assert_eq!(grouped.len(), 6);
        for (i, got) in grouped.iter().enumerate() {
            let mut alone = generate(&model, &prompts[i / 3], &Sampling { seed: 21 + i as u64, ..s });
            if let Some(end) = alone.iter().position(|&t| t == 7) {
                alone.truncate(end + 1);
            }
            assert_eq!(got, &alone, "row {i}");
        }
        assert_ne!(grouped[0], grouped[1], "a group's rows draw differently");
    }

    #[test]
    fn sampling_follows_temperature_top_k_and_top_p() {
        let logits = Tensor::from_slice(&[1.0f32, 3.0, 2.0, 0.5]);
        let mut rng = Rng::new(1);
        let mut draw =
            |temperature, top_k, top_p| sample(&logits, &Sampling { max_tokens: 1, temperature, top_k, top_p, seed: 0 }, &mut rng);
        for _ in 0..20 {
            assert_eq!(draw(0.0, None, None), 1);
            assert_eq!(draw(1.0, Some(1), None), 1);
            // The most likely token alone holds 63% of the mass.
            assert_eq!(draw(1.0, None, Some(0.6)), 1);
            assert!([1, 2].contains(&draw(1.0, None, Some(0.85))));
            assert!([1, 2].contains(&draw(1.0, Some(2), None)));
        }
        let draws = 4000;
        let ones = (0..draws).filter(|_| draw(1.0, None, None) == 1).count();
        // softmax([1, 3, 2, 0.5])[1] = 0.631
        assert!((ones as f64 / draws as f64 - 0.631).abs() < 0.03, "{ones}");
    }
}

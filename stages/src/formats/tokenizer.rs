//! The tokenizer file of an artifact (`tokenizer.json`, Hugging Face's
//! format), the special token that ends documents, and [`BatchEncoder`], which
//! encodes many documents at once.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use rayon::prelude::*;
use tokenizers::tokenizer::pattern::Pattern;
use tokenizers::utils::SysRegex;
use tokenizers::{Model, ModelWrapper, Tokenizer};

/// The file name of the tokenizer inside an artifact.
pub const FILE: &str = "tokenizer.json";

/// The token that ends every document in the token shards.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Loads the tokenizer of an artifact (`train_tokenizer`, `shard`, any model).
pub fn load(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join(FILE);
    Tokenizer::from_file(&path).map_err(|e| anyhow!("{e}")).with_context(|| format!("cannot load {}", path.display()))
}

/// Encodes documents as plain text, giving the ids `Tokenizer::encode` gives
/// with special tokens encoded as text: a special-token string in a document
/// must not become a document boundary or a chat turn.
///
/// For the tokenizers `train_tokenizer` makes (no normalizer, a byte-level
/// pre-tokenizer, BPE, only special added tokens) it is faster than
/// `encode_batch`: the split regex runs on the raw text without the offset
/// bookkeeping of `NormalizedString`, and each thread remembers the ids of the
/// words it has seen. Any other tokenizer goes through `encode_batch_fast`.
pub struct BatchEncoder {
    tokenizer: Tokenizer,
    fast: Option<SysRegex>,
}

impl BatchEncoder {
    pub fn new(tokenizer: &Tokenizer) -> Result<BatchEncoder> {
        let mut tokenizer = tokenizer.clone();
        tokenizer.set_encode_special_tokens(true);
        let fast = match byte_level_split(&tokenizer) {
            Some(pattern) => Some(SysRegex::new(&pattern).map_err(|e| anyhow!("the tokenizer's split pattern: {e}"))?),
            None => None,
        };
        Ok(BatchEncoder { tokenizer, fast })
    }

    /// Encodes texts in parallel in the current rayon pool, without special tokens.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let Some(split) = &self.fast else {
            let encodings = self.tokenizer.encode_batch_fast(texts.to_vec(), false).map_err(|e| anyhow!("encoding documents: {e}"))?;
            return Ok(encodings.into_iter().map(|e| e.get_ids().to_vec()).collect());
        };
        let model = self.tokenizer.get_model();
        let chars = byte_chars();
        // A few chunks per thread balance the load and keep each word cache warm.
        let chunk = texts.len().div_ceil(rayon::current_num_threads() * 4).max(1);
        let chunks: Vec<Vec<Vec<u32>>> = texts
            .par_chunks(chunk)
            .map(|chunk| {
                let mut cache: HashMap<&str, Vec<u32>> = HashMap::new();
                chunk.iter().map(|&text| encode_words(text, split, model, &chars, &mut cache)).collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        Ok(chunks.into_iter().flatten().collect())
    }
}

/// Splits `text` into words and encodes each, through the cache of words seen.
fn encode_words<'t>(
    text: &'t str,
    split: &SysRegex,
    model: &ModelWrapper,
    chars: &[char; 256],
    cache: &mut HashMap<&'t str, Vec<u32>>,
) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    let pieces = split.find_matches(text).map_err(|e| anyhow!("splitting a document: {e}"))?;
    for ((start, end), _) in pieces.into_iter().filter(|((s, e), _)| s < e) {
        let word = &text[start..end];
        if !cache.contains_key(word) {
            let mapped: String = word.bytes().map(|b| chars[b as usize]).collect();
            let tokens = model.tokenize(&mapped).map_err(|e| anyhow!("encoding a document: {e}"))?;
            cache.insert(word, tokens.iter().map(|t| t.id).collect());
        }
        ids.extend_from_slice(&cache[word]);
    }
    Ok(ids)
}

/// The split pattern of a tokenizer that `train_tokenizer` made, or `None`
/// when the tokenizer is any other kind.
fn byte_level_split(tokenizer: &Tokenizer) -> Option<String> {
    let plain = tokenizer.get_normalizer().is_none()
        && matches!(tokenizer.get_model(), ModelWrapper::BPE(_))
        && tokenizer.get_added_tokens_decoder().values().all(|t| t.special);
    if !plain {
        return None;
    }
    // The pre-tokenizer's own serialization is the stable way to look inside it.
    let pre = serde_json::to_value(tokenizer.get_pre_tokenizer()?).ok()?;
    let byte_level =
        |v: &serde_json::Value, regex: bool| v["type"] == "ByteLevel" && v["add_prefix_space"] == false && v["use_regex"] == regex;
    if byte_level(&pre, true) {
        return Some(GPT2_PATTERN.to_string());
    }
    match pre["pretokenizers"].as_array()?.as_slice() {
        [split, bytes]
            if split["type"] == "Split" && split["behavior"] == "Isolated" && split["invert"] == false && byte_level(bytes, false) =>
        {
            split["pattern"]["Regex"].as_str().map(String::from)
        }
        _ => None,
    }
}

/// GPT-2's split pattern, as the byte-level pre-tokenizer applies it.
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// GPT-2's map of bytes to printable characters: printable Latin-1 bytes stand
/// for themselves, the others for 256, 257, … in byte order.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256;
    for b in 0..=255u8 {
        table[b as usize] = if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below the surrogates")
        };
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{corpus, write_docs, CORPORA};

    #[test]
    fn the_encoder_gives_the_ids_of_the_tokenizer() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_docs(&dir.join("docs"), "shakespeare", &corpus("tinyshakespeare.txt"));
        let corpora: Vec<String> = CORPORA.iter().map(|name| corpus(name)).collect();
        let mut texts: Vec<&str> = corpora.iter().flat_map(|c| c.split("\n\n")).collect();
        texts.extend(["", "  ", "\n\n\n", "caf\u{e9} \u{1f600}  tabs\t\r\n 123456789 don't", "<|user|>Hi<|endoftext|>"]);
        for pre_tokenizer in ["gpt2", "gpt4"] {
            let out = dir.join(pre_tokenizer);
            let params = serde_json::json!({"vocab_size": 2000, "pre_tokenizer": pre_tokenizer, "max_chars": 300_000});
            crate::testing::tokenizer_artifact(&dir.join("docs"), &out, params);
            let mut tokenizer = load(&out).unwrap();
            let encoder = BatchEncoder::new(&tokenizer).unwrap();
            assert!(encoder.fast.is_some(), "{pre_tokenizer}");
            tokenizer.set_encode_special_tokens(true);
            let ids = |t: &Tokenizer| -> Vec<Vec<u32>> {
                t.encode_batch(texts.clone(), false).unwrap().iter().map(|e| e.get_ids().to_vec()).collect()
            };
            assert!(encoder.encode(&texts).unwrap() == ids(&tokenizer), "{pre_tokenizer}: ids differ");

            // Any other tokenizer takes the general path.
            tokenizer.with_normalizer(Some(tokenizers::normalizers::Lowercase));
            let encoder = BatchEncoder::new(&tokenizer).unwrap();
            assert!(encoder.fast.is_none());
            assert!(encoder.encode(&texts[..500]).unwrap() == ids(&tokenizer)[..500], "{pre_tokenizer}: general path");
        }
    }
}

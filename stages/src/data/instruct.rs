//! Instruction records and the prompt formats post-training stages share
//! (`sft`, `reward_model`, `dpo`, `ppo`): a model is fine-tuned on one format
//! and must be prompted, judged and preference-tuned in that same format.
//!
//! ```toml
//! template = "alpaca"          # or "chat", or a custom string:
//! template = "Q: {instruction}\n{input}\nA: "
//! ```
//!
//! * `alpaca` (the default): Stanford Alpaca's prompt, with the `### Input:`
//!   section only when the record has an input.
//! * `chat`: the tokenizer's special tokens, `<|user|>` before the request and
//!   `<|assistant|>` before the response.
//! * anything else is a template in which `{instruction}` and `{input}` are
//!   replaced; it must contain `{instruction}`.
//!
//! A response always ends with `<|endoftext|>`, so a tuned model learns to
//! stop.

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::data::sequences::Sequence;
use crate::formats::tokenizer::END_OF_TEXT;
use crate::ParamError;

/// One record of an instruction or preference set (Alpaca fields; `chosen`
/// and `rejected` in preference sets).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Record {
    pub instruction: String,
    #[serde(default)]
    pub input: String,
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub chosen: Option<String>,
    #[serde(default)]
    pub rejected: Option<String>,
}

/// How a record becomes a prompt (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Template {
    #[default]
    Alpaca,
    Chat,
    Custom(String),
}

/// Written as a string (`alpaca`, `chat`, or the template itself).
impl schemars::JsonSchema for Template {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Template".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }
}

impl From<String> for Template {
    fn from(s: String) -> Self {
        match s.as_str() {
            "alpaca" => Template::Alpaca,
            "chat" => Template::Chat,
            _ => Template::Custom(s),
        }
    }
}

impl From<Template> for String {
    fn from(t: Template) -> String {
        match t {
            Template::Alpaca => "alpaca".into(),
            Template::Chat => "chat".into(),
            Template::Custom(s) => s,
        }
    }
}

const ALPACA: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.";

impl Template {
    /// Errors under the param `field` for a custom template without
    /// `{instruction}`.
    pub fn check(&self, field: &str) -> Result<(), ParamError> {
        match self {
            Template::Custom(s) if !s.contains("{instruction}") => {
                Err(ParamError::new(&[field], "a custom template must contain `{instruction}` (or use \"alpaca\" or \"chat\")"))
            }
            _ => Ok(()),
        }
    }

    /// The prompt text of `record`, up to where the response begins.
    pub fn prompt(&self, record: &Record) -> String {
        let (instruction, input) = (record.instruction.trim(), record.input.trim());
        match self {
            Template::Alpaca if input.is_empty() => {
                format!("{ALPACA}\n\n### Instruction:\n{instruction}\n\n### Response:\n")
            }
            Template::Alpaca => format!("{ALPACA}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
            Template::Chat if input.is_empty() => format!("<|user|>\n{instruction}\n<|assistant|>\n"),
            Template::Chat => format!("<|user|>\n{instruction}\n\n{input}\n<|assistant|>\n"),
            Template::Custom(t) => t.replace("{instruction}", instruction).replace("{input}", input),
        }
    }
}

/// A preference record's two answers, formatted and tokenized.
#[derive(Debug, Clone)]
pub struct Pair {
    pub chosen: Sequence,
    pub rejected: Sequence,
}

/// Tokenizes prompts and responses for one model.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: &'a Template,
    /// The id of `<|endoftext|>`, which ends every response.
    pub eot: i64,
}

impl<'a> Encoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer, template: &'a Template) -> Result<Encoder<'a>> {
        let eot = tokenizer.token_to_id(END_OF_TEXT).context("the tokenizer has no <|endoftext|>")?;
        Ok(Encoder { tokenizer, template, eot: i64::from(eot) })
    }

    /// Token ids of `text`; special tokens written in it (the chat format's)
    /// become their ids.
    pub fn ids(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| anyhow!("cannot tokenize: {e}"))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// The prompt of `record`, tokenized.
    pub fn prompt(&self, record: &Record) -> Result<Vec<i64>> {
        self.ids(&self.template.prompt(record))
    }

    /// Prompt then `response` and `<|endoftext|>`, the response counted; cut
    /// to `context` tokens (see [`Sequence::fit`]).
    pub fn sequence(&self, record: &Record, response: &str, context: usize) -> Result<Sequence> {
        let mut counted = self.ids(response.trim())?;
        counted.push(self.eot);
        Ok(Sequence::new(&self.prompt(record)?, &counted).fit(context))
    }

    /// The chosen and rejected answers of every preference record, each
    /// after its prompt and cut to `context` tokens; errors name `source`
    /// and the record that lacks one.
    pub fn pairs(&self, records: &[Record], context: usize, source: &str) -> Result<Vec<Pair>> {
        records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (Some(chosen), Some(rejected)) = (&r.chosen, &r.rejected) else {
                    anyhow::bail!("{source}: record {} needs both `chosen` and `rejected`", i + 1);
                };
                Ok(Pair { chosen: self.sequence(r, chosen, context)?, rejected: self.sequence(r, rejected, context)? })
            })
            .collect()
    }

    /// Text of generated ids, stopping before the first `<|endoftext|>`.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().take_while(|&&id| id != self.eot).map(|&id| id as u32).collect();
        self.tokenizer.decode(&ids, false).map_err(|e| anyhow!("cannot decode: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::tokenizer;
    use crate::testing::{corpus, tokenizer_artifact, write_docs};

    #[test]
    fn templates_render_and_parse() {
        let r = Record { instruction: "Name a color.".into(), ..Default::default() };
        assert!(Template::Alpaca.prompt(&r).ends_with("### Instruction:\nName a color.\n\n### Response:\n"));
        let with_input = Record { input: "sky".into(), ..r.clone() };
        assert!(Template::Alpaca.prompt(&with_input).contains("### Input:\nsky\n\n### Response:\n"));
        assert_eq!(Template::Chat.prompt(&r), "<|user|>\nName a color.\n<|assistant|>\n");
        let custom: Template = serde_json::from_str("\"Q: {instruction} {input}\\nA: \"").unwrap();
        assert_eq!(custom.prompt(&with_input), "Q: Name a color. sky\nA: ");
        assert_eq!(serde_json::from_str::<Template>("\"chat\"").unwrap(), Template::Chat);
        assert_eq!(serde_json::to_string(&Template::Alpaca).unwrap(), "\"alpaca\"");
        assert_eq!(Template::Custom("A: ".into()).check("template").unwrap_err().path, ["template"]);
    }

    #[test]
    fn chat_tokens_encode_as_special_ids_and_responses_end_with_eot() {
        let dir = tempfile::tempdir().unwrap();
        write_docs(&dir.path().join("docs"), "corpus", &corpus("tinyshakespeare.txt")[..20_000]);
        tokenizer_artifact(&dir.path().join("docs"), &dir.path().join("tok"), serde_json::json!({"vocab_size": 300}));
        let tokenizer = tokenizer::load(&dir.path().join("tok")).unwrap();
        let encoder = Encoder::new(&tokenizer, &Template::Chat).unwrap();
        let r = Record { instruction: "Speak.".into(), ..Default::default() };
        let s = encoder.sequence(&r, "Hark!", 64).unwrap();
        let user = i64::from(tokenizer.token_to_id("<|user|>").unwrap());
        assert_eq!(s.ids[0], user);
        assert_eq!(*s.ids.last().unwrap(), encoder.eot);
        assert_eq!(encoder.decode(&s.ids[s.start..]).unwrap(), "Hark!");
        assert_eq!(s.fit(5).ids.len(), 5);
    }
}

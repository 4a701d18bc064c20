//! `filter`: drop low-quality documents with the heuristics of web-scale
//! pipelines.
//!
//! ```toml
//! [stages.clean]
//! kind = "filter"
//! input = "corpus"
//! min_chars = 20
//! gopher_quality = { min_words = 3 }
//! c4 = { enabled = false }
//! language = { languages = ["en"], threshold = 0.5 }
//! ```
//!
//! Rules run in this order and the first that fails removes the document.
//! Every group has `enabled` and its thresholds; the defaults are datatrove's
//! published ones, which are meant for web pages. They remove most paragraphs
//! of a novel (too few words, no stop words in a line of dialogue), so a small
//! corpus wants lower `gopher_quality.min_words`, `c4` off (it keeps only lines
//! ending in punctuation) and `fineweb` off; the stage warns when it removes
//! more than half of its input.
//!
//! * `min_chars` / `max_chars` (0 = no limit): document length in characters.
//! * `language`: whatlang's detection on the first 4,000 bytes; the document is
//!   kept when the detected language is in `languages` (ISO 639-1 or 639-3
//!   codes) with confidence ≥ `threshold` (0.65).
//! * `gopher_repetition`: fractions of duplicated lines and paragraphs (by
//!   count, 0.3, and by characters, 0.2), the character share of the most
//!   frequent 2/3/4-gram (`top_ngrams`, 0.2/0.18/0.16) and of duplicated
//!   5…10-grams (`dup_ngrams`, 0.15 … 0.10).
//! * `gopher_quality`: 50–100,000 words, mean word length 3–10, `#` and
//!   ellipses per word ≤ 0.1, bullet lines ≤ 0.9, lines ending in an ellipsis
//!   ≤ 0.3, words with a letter ≥ 0.8, at least 2 stop words.
//! * `c4`: drops lines without terminal punctuation, with fewer than 3 words,
//!   mentioning javascript or a cookie/privacy policy, and removes documents
//!   with "lorem ipsum", a curly bracket, or fewer than 5 sentences left. This
//!   rule edits the text of the documents it keeps.
//! * `fineweb`: lines ending in punctuation ≥ 0.12, lines of ≤ 30 characters ≤
//!   0.67, characters in duplicated lines ≤ 0.01, newlines per word ≤ 0.3.
//! * `pii` (off by default): replaces e-mail addresses with
//!   `email@example.com` and IPv4 addresses with `0.0.0.0` in kept documents.
//!
//! Outputs: `docs/` (kept documents) and `removed/` (`id`, `text`, `source`,
//! `rule`: the rule that removed it, e.g. `gopher_quality.min_words`), both
//! sharded Parquet ([`crate::formats::docs`]). Metrics: `documents_in`,
//! `documents_out`, `removed` (count per rule) and `parts_cached`.
//!
//! Streaming: each input part is read one row group at a time, its documents
//! judged in parallel; parts run side by side as far as the stage's threads
//! and `memory_mb` (volatile, the only volatile param) allow. Each input part
//! is a unit cached in the store under a hash of its bytes and the params
//! ([`crate::data::units`]): a part filtered before, by any build of the
//! kind, is linked back in, so a new input file filters only its own parts.
//!
//! `on_error`: a part that cannot be read (a `command` stage's output is
//! not checked when it is published) fails the stage, naming the part and
//! the row group; `"skip"` leaves it out, says so in the log and lists it
//! in the metric `skipped` (part and error), and fails when it leaves out
//! every part.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::LazyLock;

use anyhow::Result;
use polars::prelude::Column;
use rayon::prelude::*;
use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64;

use crate::data::hash::ngram_hash;
use crate::data::units::{self, OnError, Unit, Units};
use crate::data::working_memory_mb;
use crate::formats::docs::{self, PartWriter};
use crate::{Inputs, ParamError, Stage, StageCtx};

pub struct Filter;

/// Every group's `Default` is datatrove's published thresholds.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// 0 keeps documents of any length.
    #[schemars(range(max = 1_000_000_000_000_u64))]
    pub min_chars: usize,
    /// Longest document in characters; 0: no limit.
    #[schemars(range(max = 1_000_000_000_000_u64))]
    pub max_chars: usize,
    /// Language identification (whatlang) on the first 4,000 bytes.
    pub language: Language,
    /// Gopher's repetition rules: duplicated lines, paragraphs and n-grams.
    pub gopher_repetition: GopherRepetition,
    /// Gopher's quality rules: word counts and lengths, symbols, bullets, stop words.
    pub gopher_quality: GopherQuality,
    /// C4's rules: drops lines without terminal punctuation, code and boilerplate (edits kept text).
    pub c4: C4,
    /// FineWeb's line rules: punctuation, short lines, duplicated characters, newlines.
    pub fineweb: FineWeb,
    /// Replace e-mail and IPv4 addresses in kept documents.
    pub pii: Pii,
    /// Text per output part, in MB.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub part_mb: usize,
    /// Peak memory of the stage process in MB, the runtime's 128 included; volatile: bounds how many parts are filtered at once.
    #[schemars(range(min = 256, max = 1_000_000_000))]
    pub memory_mb: usize,
    /// `fail` at an input part that cannot be read, or `skip` it (logged, listed in the metric `skipped`).
    pub on_error: OnError,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            min_chars: 0,
            max_chars: 0,
            language: Language::default(),
            gopher_repetition: GopherRepetition::default(),
            gopher_quality: GopherQuality::default(),
            c4: C4::default(),
            fineweb: FineWeb::default(),
            pii: Pii::default(),
            part_mb: 256,
            memory_mb: 1024,
            on_error: OnError::Fail,
        }
    }
}

/// Memory one part being filtered holds: a row group read, its kept and
/// removed rows, and both being encoded.
const PER_PART_MB: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Language {
    /// Apply this rule.
    pub enabled: bool,
    /// Kept languages (ISO 639-1 or 639-3 codes).
    pub languages: Vec<String>,
    /// Least confidence of the detection.
    #[schemars(range(min = 0, max = 1))]
    pub threshold: f64,
}

impl Default for Language {
    fn default() -> Self {
        Language { enabled: true, languages: vec!["en".into()], threshold: 0.65 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GopherRepetition {
    /// Apply this rule.
    pub enabled: bool,
    /// Largest share of lines that repeat an earlier line.
    #[schemars(range(min = 0, max = 1))]
    pub dup_line_frac: f64,
    /// Largest share of paragraphs that repeat an earlier one.
    #[schemars(range(min = 0, max = 1))]
    pub dup_para_frac: f64,
    /// Largest share of characters in repeated lines.
    #[schemars(range(min = 0, max = 1))]
    pub dup_line_char_frac: f64,
    /// Largest share of characters in repeated paragraphs.
    #[schemars(range(min = 0, max = 1))]
    pub dup_para_char_frac: f64,
    /// `(n, max share of characters in the most frequent n-gram)`.
    pub top_ngrams: Vec<NgramRule>,
    /// `(n, max share of characters in repeated n-grams)`.
    pub dup_ngrams: Vec<NgramRule>,
}

/// `(n, largest share of characters)`: a rule on word n-grams.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema)]
pub struct NgramRule(#[schemars(range(min = 1, max = 1024))] pub usize, #[schemars(range(min = 0, max = 1))] pub f64);

impl Default for GopherRepetition {
    fn default() -> Self {
        GopherRepetition {
            enabled: true,
            dup_line_frac: 0.3,
            dup_para_frac: 0.3,
            dup_line_char_frac: 0.2,
            dup_para_char_frac: 0.2,
            top_ngrams: [(2, 0.2), (3, 0.18), (4, 0.16)].map(|(n, share)| NgramRule(n, share)).to_vec(),
            dup_ngrams: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)].map(|(n, share)| NgramRule(n, share)).to_vec(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GopherQuality {
    /// Apply this rule.
    pub enabled: bool,
    /// Fewest words.
    #[schemars(range(max = 1_000_000_000))]
    pub min_words: usize,
    /// Most words.
    #[schemars(range(max = 1_000_000_000))]
    pub max_words: usize,
    /// Shortest mean word length.
    #[schemars(range(min = 0, max = 1_000_000))]
    pub min_avg_word_length: f64,
    /// Longest mean word length.
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_avg_word_length: f64,
    /// Most `#` and ellipses per word.
    #[schemars(range(min = 0, max = 1000))]
    pub max_symbol_word_ratio: f64,
    /// Largest share of lines starting with a bullet.
    #[schemars(range(min = 0, max = 1))]
    pub max_bullet_lines_ratio: f64,
    /// Largest share of lines ending in an ellipsis.
    #[schemars(range(min = 0, max = 1))]
    pub max_ellipsis_lines_ratio: f64,
    /// Least share of words with a letter.
    #[schemars(range(min = 0, max = 1))]
    pub min_alpha_words_ratio: f64,
    /// Fewest stop words.
    #[schemars(range(max = 1_000_000_000))]
    pub min_stop_words: usize,
    /// The stop words counted.
    pub stop_words: Vec<String>,
}

impl Default for GopherQuality {
    fn default() -> Self {
        GopherQuality {
            enabled: true,
            min_words: 50,
            max_words: 100_000,
            min_avg_word_length: 3.0,
            max_avg_word_length: 10.0,
            max_symbol_word_ratio: 0.1,
            max_bullet_lines_ratio: 0.9,
            max_ellipsis_lines_ratio: 0.3,
            min_alpha_words_ratio: 0.8,
            min_stop_words: 2,
            stop_words: ["the", "be", "to", "of", "and", "that", "have", "with"].map(String::from).to_vec(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct C4 {
    /// Apply this rule.
    pub enabled: bool,
    /// Fewest sentences left after the line rules.
    #[schemars(range(max = 1_000_000_000))]
    pub min_sentences: usize,
    /// Lines with fewer words are dropped.
    #[schemars(range(max = 1_000_000_000))]
    pub min_words_per_line: usize,
    /// Lines with a longer word are dropped.
    #[schemars(range(max = 1_000_000_000))]
    pub max_word_length: usize,
    /// Drop lines that do not end in terminal punctuation.
    pub terminal_punctuation: bool,
    /// Remove documents containing "lorem ipsum".
    pub lorem_ipsum: bool,
    /// Drop lines mentioning javascript.
    pub javascript: bool,
    /// Remove documents containing a curly bracket.
    pub curly_bracket: bool,
    /// Drop lines about cookie, privacy or terms-of-use policies.
    pub policy: bool,
}

impl Default for C4 {
    fn default() -> Self {
        C4 {
            enabled: true,
            min_sentences: 5,
            min_words_per_line: 3,
            max_word_length: 1000,
            terminal_punctuation: true,
            lorem_ipsum: true,
            javascript: true,
            curly_bracket: true,
            policy: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FineWeb {
    /// Apply this rule.
    pub enabled: bool,
    /// Least share of lines ending in punctuation.
    #[schemars(range(min = 0, max = 1))]
    pub line_punct_thr: f64,
    /// Largest share of short lines.
    #[schemars(range(min = 0, max = 1))]
    pub short_line_thr: f64,
    /// Characters at most of a short line.
    #[schemars(range(max = 1_000_000_000))]
    pub short_line_length: usize,
    /// Largest share of characters in duplicated lines.
    #[schemars(range(min = 0, max = 1))]
    pub char_duplicates_ratio: f64,
    /// Most newlines per word.
    #[schemars(range(min = 0, max = 1000))]
    pub new_line_ratio: f64,
}

impl Default for FineWeb {
    fn default() -> Self {
        FineWeb {
            enabled: true,
            line_punct_thr: 0.12,
            short_line_thr: 0.67,
            short_line_length: 30,
            char_duplicates_ratio: 0.01,
            new_line_ratio: 0.3,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Pii {
    /// Apply this rule.
    pub enabled: bool,
}

impl Stage for Filter {
    const KIND: &'static str = "filter";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "drop low-quality documents (Gopher, C4, FineWeb, language, length rules)";
    const INPUTS: Inputs = Inputs::Fixed(&["input"]);
    const VOLATILE: &'static [&'static str] = &["memory_mb"];
    type Params = Params;

    fn check(p: &Params, _inputs: &[String]) -> Result<(), ParamError> {
        if p.language.enabled {
            for (i, code) in p.language.languages.iter().enumerate() {
                if lang(code).is_none() {
                    let message = format!("unknown language `{code}`: use an ISO 639-1 (`en`) or 639-3 (`eng`) code");
                    return Err(ParamError::new(&["language", "languages", &i.to_string()], message));
                }
            }
        }
        Ok(())
    }

    fn run(p: &Params, ctx: &mut StageCtx) -> Result<()> {
        let input = ctx.input("input")?.to_path_buf();
        let parts = docs::parts(&input)?;
        let units = Units::new(ctx)?;
        let mut key_params = serde_json::to_value(p)?;
        let key_table = key_params.as_object_mut().expect("params are a table");
        key_table.remove("memory_mb");
        key_table.remove("on_error");
        let rules = Rules::new(p);
        let workers = ctx.threads.min(working_memory_mb(p.memory_mb) / PER_PART_MB).max(1);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(workers).build()?;
        let done: Vec<Result<(Unit, bool)>> = pool.install(|| {
            parts
                .par_iter()
                .map(|part| {
                    let key = units::key(&json!({ "filter": Filter::VERSION, "params": key_params, "part": units::file_digest(part)? }));
                    if let Some(unit) = units.load(&key) {
                        return Ok((unit, true));
                    }
                    Ok((units.build(&key, |dir| filter_part(part, &rules, dir))?, false))
                })
                .collect()
        });
        let labels = parts.iter().map(|part| part.strip_prefix(&input).unwrap_or(part).display().to_string());
        let (done_units, cached) = units::gather(labels.zip(done), p.on_error, ctx)?;
        units.link(&done_units, "docs", docs::DIR, true)?;
        units.link(&done_units, "removed", "removed", true)?;

        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let (mut n, mut out) = (0, 0);
        for unit in &done_units {
            n += unit.meta["documents_in"].as_u64().unwrap_or(0);
            out += unit.meta["documents_out"].as_u64().unwrap_or(0);
            for (rule, count) in unit.meta["removed"].as_object().into_iter().flatten() {
                *counts.entry(rule.clone()).or_default() += count.as_u64().unwrap_or(0);
            }
        }
        eprintln!(
            "filter: {n} documents in, {out} kept, {} removed ({cached} of {} parts unchanged since a cached run, {} skipped)",
            n - out,
            parts.len(),
            parts.len() - done_units.len()
        );
        for (rule, count) in &counts {
            eprintln!("  {count:>9}  {rule}");
        }
        if 2 * (n - out) > n {
            eprintln!(
                "warning: filter removed {:.0}% of the documents; web-scale defaults do not suit short documents, see the counts above and relax those rules",
                100.0 * (n - out) as f64 / n as f64
            );
        }
        ctx.metric("documents_in", n);
        ctx.metric("documents_out", out);
        ctx.metric("removed", counts);
        ctx.metric("parts_cached", cached);
        Ok(())
    }
}

/// Filters one input part into `dir/docs/` and `dir/removed/`, a row group
/// at a time; returns the unit's counts.
fn filter_part(part: &Path, rules: &Rules, dir: &Path) -> Result<serde_json::Value> {
    let part_bytes = rules.p.part_mb << 20;
    let mut kept_out = PartWriter::new(&dir.join("docs"), "part-", part_bytes);
    let mut removed_out = PartWriter::new(&dir.join("removed"), "part-", part_bytes);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for df in docs::batches(part)? {
        let df = df?;
        let texts = df.column("text")?.str()?;
        let texts: Vec<&str> = texts.iter().map(Option::unwrap_or_default).collect();
        let verdicts: Vec<Verdict> = texts.par_iter().map(|t| rules.apply(t)).collect();
        let keep: Vec<bool> = verdicts.iter().map(Result::is_ok).collect();
        let removed_by: Vec<&str> = verdicts.iter().filter_map(|v| v.as_ref().err().map(|r| r.as_ref())).collect();
        let kept_texts: Vec<&str> = verdicts.iter().filter_map(|v| v.as_deref().ok()).collect();
        let mut kept = docs::select(&df, &keep)?;
        kept.replace("text", Column::new("text".into(), kept_texts))?;
        kept_out.push(&kept)?;
        let dropped: Vec<bool> = keep.iter().map(|k| !k).collect();
        let mut removed = docs::select(&df, &dropped)?.select(["id", "text", "source"])?;
        removed.with_column(Column::new("rule".into(), removed_by.clone()))?;
        removed_out.push(&removed)?;
        removed_by.iter().for_each(|r| *counts.entry(r.to_string()).or_default() += 1);
    }
    let (documents_in, documents_out) = (kept_out.rows() + removed_out.rows(), kept_out.rows());
    kept_out.finish()?;
    removed_out.finish()?;
    Ok(json!({ "documents_in": documents_in, "documents_out": documents_out, "removed": counts }))
}

fn lang(code: &str) -> Option<whatlang::Lang> {
    const ISO_639_1: &[(&str, &str)] = &[
        ("ar", "ara"),
        ("cs", "ces"),
        ("da", "dan"),
        ("de", "deu"),
        ("el", "ell"),
        ("en", "eng"),
        ("es", "spa"),
        ("fi", "fin"),
        ("fr", "fra"),
        ("he", "heb"),
        ("hi", "hin"),
        ("hu", "hun"),
        ("it", "ita"),
        ("ja", "jpn"),
        ("ko", "kor"),
        ("nl", "nld"),
        ("pl", "pol"),
        ("pt", "por"),
        ("ru", "rus"),
        ("sv", "swe"),
        ("tr", "tur"),
        ("uk", "ukr"),
        ("zh", "cmn"),
    ];
    let code = ISO_639_1.iter().find(|(short, _)| *short == code).map_or(code, |&(_, long)| long);
    whatlang::Lang::from_code(code)
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}").unwrap());
static IPV4: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b").unwrap());
static CITATION: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\[\d*\]|\[edit\]|\[citation needed\]").unwrap());
const POLICY: &[&str] = &["terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies"];
/// Line endings that count as the end of a sentence; the typographic quotes
/// are there because books use them where web text has straight ones.
const TERMINAL: &[char] = &['.', '!', '?', '"', '\'', '”', '’', '…'];

/// The parameters with the language codes resolved once.
struct Rules<'a> {
    p: &'a Params,
    languages: Vec<whatlang::Lang>,
    stop_words: HashSet<&'a str>,
}

/// The rule that removed a document.
type Rule = Cow<'static, str>;
type Verdict = Result<String, Rule>;

fn reject<T>(rule: &'static str) -> Result<T, Rule> {
    Err(Cow::Borrowed(rule))
}

impl<'a> Rules<'a> {
    fn new(p: &'a Params) -> Self {
        let languages = p.language.languages.iter().filter_map(|c| lang(c)).collect();
        let stop_words = p.gopher_quality.stop_words.iter().map(String::as_str).collect();
        Rules { p, languages, stop_words }
    }

    /// The document's text after the rules that edit it, or the first rule
    /// that removes it.
    fn apply(&self, text: &str) -> Verdict {
        let p = self.p;
        let chars = text.chars().count();
        if chars < p.min_chars {
            return reject("min_chars");
        }
        if p.max_chars > 0 && chars > p.max_chars {
            return reject("max_chars");
        }
        if p.language.enabled {
            self.language(text)?;
        }
        if p.gopher_repetition.enabled {
            gopher_repetition(text, &p.gopher_repetition)?;
        }
        if p.gopher_quality.enabled {
            self.gopher_quality(text)?;
        }
        let mut text = if p.c4.enabled { c4(text, &p.c4)? } else { text.to_string() };
        if p.fineweb.enabled {
            fineweb(&text, &p.fineweb)?;
        }
        if p.pii.enabled {
            text = EMAIL.replace_all(&text, "email@example.com").into_owned();
            text = IPV4.replace_all(&text, "0.0.0.0").into_owned();
        }
        Ok(text)
    }

    fn language(&self, text: &str) -> Result<(), Rule> {
        let mut end = text.len().min(4000);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        match whatlang::detect(&text[..end]) {
            Some(info) if self.languages.contains(&info.lang()) && info.confidence() >= self.p.language.threshold => Ok(()),
            _ => reject("language"),
        }
    }

    fn gopher_quality(&self, text: &str) -> Result<(), Rule> {
        let g = &self.p.gopher_quality;
        let words = tokens(text);
        let n = words.len().max(1) as f64;
        let non_symbol: Vec<&str> = words.iter().copied().filter(|w| w.chars().any(|c| !c.is_ascii_punctuation())).collect();
        if non_symbol.len() < g.min_words {
            return reject("gopher_quality.min_words");
        }
        if non_symbol.len() > g.max_words {
            return reject("gopher_quality.max_words");
        }
        let mean = non_symbol.iter().map(|w| w.chars().count()).sum::<usize>() as f64 / non_symbol.len().max(1) as f64;
        if mean < g.min_avg_word_length {
            return reject("gopher_quality.min_avg_word_length");
        }
        if mean > g.max_avg_word_length {
            return reject("gopher_quality.max_avg_word_length");
        }
        if text.matches('#').count() as f64 / n > g.max_symbol_word_ratio
            || (text.matches("...").count() + text.matches('…').count()) as f64 / n > g.max_symbol_word_ratio
        {
            return reject("gopher_quality.max_symbol_word_ratio");
        }
        let lines: Vec<&str> = text.lines().collect();
        let share = |f: &dyn Fn(&str) -> bool| lines.iter().filter(|l| f(l)).count() as f64 / lines.len().max(1) as f64;
        if share(&|l| l.trim_start().starts_with(['•', '-'])) > g.max_bullet_lines_ratio {
            return reject("gopher_quality.max_bullet_lines_ratio");
        }
        if share(&|l| l.trim_end().ends_with("...") || l.trim_end().ends_with('…')) > g.max_ellipsis_lines_ratio {
            return reject("gopher_quality.max_ellipsis_lines_ratio");
        }
        if (words.iter().filter(|w| w.chars().any(char::is_alphabetic)).count() as f64) / n < g.min_alpha_words_ratio {
            return reject("gopher_quality.min_alpha_words_ratio");
        }
        let stop = words.iter().filter(|w| self.stop_words.contains(w.to_lowercase().as_str())).count();
        if stop < g.min_stop_words {
            return reject("gopher_quality.min_stop_words");
        }
        Ok(())
    }
}

/// Words as a word tokenizer sees them: runs of letters and digits (with
/// inner apostrophes), and every other non-space character on its own.
fn tokens(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let inner_apostrophe = c == '\'' && start.is_some() && chars.peek().is_some_and(|(_, n)| n.is_alphanumeric());
        if c.is_alphanumeric() || inner_apostrophe {
            start.get_or_insert(i);
            continue;
        }
        if let Some(s) = start.take() {
            out.push(&text[s..i]);
        }
        if !c.is_whitespace() {
            out.push(&text[i..i + c.len_utf8()]);
        }
    }
    if let Some(s) = start {
        out.push(&text[s..]);
    }
    out
}

/// How many items repeat an earlier one, and their total length in bytes.
fn duplicates<'t>(items: impl IntoIterator<Item = &'t str>) -> (usize, usize) {
    let mut seen = HashSet::new();
    let (mut count, mut chars) = (0, 0);
    for item in items {
        if !seen.insert(item) {
            count += 1;
            chars += item.len();
        }
    }
    (count, chars)
}

fn gopher_repetition(text: &str, g: &GopherRepetition) -> Result<(), Rule> {
    let len = text.len().max(1) as f64;
    let trimmed = text.trim();
    let paragraphs: Vec<&str> = trimmed.split("\n\n").map(|p| p.trim_matches('\n')).filter(|p| !p.is_empty()).collect();
    let (count, chars) = duplicates(paragraphs.iter().copied());
    if count as f64 / paragraphs.len().max(1) as f64 > g.dup_para_frac {
        return reject("gopher_repetition.dup_para_frac");
    }
    if chars as f64 / len > g.dup_para_char_frac {
        return reject("gopher_repetition.dup_para_char_frac");
    }
    let lines: Vec<&str> = text.split('\n').filter(|l| !l.is_empty()).collect();
    let (count, chars) = duplicates(lines.iter().copied());
    if count as f64 / lines.len().max(1) as f64 > g.dup_line_frac {
        return reject("gopher_repetition.dup_line_frac");
    }
    if chars as f64 / len > g.dup_line_char_frac {
        return reject("gopher_repetition.dup_line_char_frac");
    }
    // N-grams are compared by 64-bit hash, which is many times faster than
    // hashing the strings for each n.
    let words = tokens(text);
    let hashes: Vec<u64> = words.iter().map(|w| xxh3_64(w.as_bytes())).collect();
    let mut offsets = vec![0usize];
    offsets.extend(words.iter().scan(0, |total, w| {
        *total += w.len();
        Some(*total)
    }));
    let chars = |i: usize, n: usize| offsets[i + n] - offsets[i];
    for &NgramRule(n, max) in &g.top_ngrams {
        let mut counts: HashMap<u64, (usize, usize)> = HashMap::new();
        for (i, w) in hashes.windows(n).enumerate() {
            counts.entry(ngram_hash(w)).or_insert((0, chars(i, n))).0 += 1;
        }
        // The characters covered by the most frequent repeated n-gram.
        let top = counts.values().filter(|(count, _)| *count > 1).max();
        if let Some((count, chars)) = top {
            if (count * chars) as f64 / len > max {
                return Err(format!("gopher_repetition.top_{n}_gram").into());
            }
        }
    }
    for &NgramRule(n, max) in &g.dup_ngrams {
        // Overlapping repeats are counted once: skip past a repeated n-gram.
        let mut seen = HashSet::new();
        let (mut i, mut repeated) = (0, 0usize);
        while i + n <= words.len() {
            if seen.insert(ngram_hash(&hashes[i..i + n])) {
                i += 1;
            } else {
                repeated += chars(i, n);
                i += n;
            }
        }
        if repeated as f64 / len > max {
            return Err(format!("gopher_repetition.dup_{n}_gram").into());
        }
    }
    Ok(())
}

fn c4(text: &str, c: &C4) -> Verdict {
    let mut kept = Vec::new();
    let mut sentences = 0;
    for line in text.lines() {
        let words = line.split_whitespace().count();
        if line.split_whitespace().any(|w| w.chars().count() > c.max_word_length) {
            continue;
        }
        let line = CITATION.replace_all(line.trim(), "");
        let line = line.trim();
        if c.terminal_punctuation && (!line.ends_with(TERMINAL) || line.ends_with("...")) {
            continue;
        }
        if words < c.min_words_per_line {
            continue;
        }
        let lower = line.to_lowercase();
        if c.lorem_ipsum && lower.contains("lorem ipsum") {
            return reject("c4.lorem_ipsum");
        }
        if c.javascript && lower.contains("javascript") {
            continue;
        }
        if c.curly_bracket && line.contains('{') {
            return reject("c4.curly_bracket");
        }
        if c.policy && POLICY.iter().any(|p| lower.contains(p)) {
            continue;
        }
        sentences += line.split(['.', '!', '?']).filter(|s| !s.trim().is_empty()).count().max(1);
        kept.push(line.to_string());
    }
    if sentences < c.min_sentences {
        return reject("c4.min_sentences");
    }
    Ok(kept.join("\n"))
}

fn fineweb(text: &str, f: &FineWeb) -> Result<(), Rule> {
    let lines: Vec<&str> = text.split('\n').filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return reject("fineweb.empty");
    }
    let n = lines.len() as f64;
    if lines.iter().filter(|l| l.trim_end().ends_with(TERMINAL)).count() as f64 / n < f.line_punct_thr {
        return reject("fineweb.line_punct_thr");
    }
    if lines.iter().filter(|l| l.chars().count() <= f.short_line_length).count() as f64 / n > f.short_line_thr {
        return reject("fineweb.short_line_thr");
    }
    let (_, dup_chars) = duplicates(lines.iter().copied());
    if dup_chars as f64 / (text.len() - text.matches('\n').count()).max(1) as f64 > f.char_duplicates_ratio {
        return reject("fineweb.char_duplicates_ratio");
    }
    if text.matches('\n').count() as f64 / tokens(text).len().max(1) as f64 > f.new_line_ratio {
        return reject("fineweb.new_line_ratio");
    }
    Ok(())
}

#[cfg(test)]
mod tests;

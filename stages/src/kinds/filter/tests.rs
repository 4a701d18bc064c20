use super::*;
use crate::testing::{novel_paragraphs, run_stage};

/// An English web-style document that passes every default rule.
const GOOD: &str =
    "The committee met on Tuesday to discuss the budget for the coming year and the plans that have been made for the new library.\n\
Members agreed that the building should open in the spring, with a reading room and a space for children to study after school.\n\
Several speakers asked that the opening hours be extended to the evening, so that people with jobs could also use the collection.\n\
The chair said that the final design would be shared with the public before any contract is signed with the builders.\n\
A vote on the proposal will be held at the next meeting, which is expected to take place at the end of the month.";

fn verdict(text: &str, p: &Params) -> Verdict {
    Rules::new(p).apply(text)
}

fn rule(text: &str, p: &Params) -> String {
    verdict(text, p).expect_err("document was kept").into_owned()
}

#[test]
fn good_document_passes_all_defaults() {
    assert_eq!(verdict(GOOD, &Params::default()).unwrap(), GOOD);
}

#[test]
fn each_rule_names_itself() {
    let p = Params::default();
    assert_eq!(rule("Le comité s'est réuni mardi pour discuter du budget de l'année prochaine et des projets de la nouvelle bibliothèque municipale.", &p), "language");
    let repeated = format!("{GOOD}\n{}", "Click here to subscribe to our newsletter today.\n".repeat(8));
    assert_eq!(rule(&repeated, &p), "gopher_repetition.dup_line_frac");
    let any_language = Params { language: Language { enabled: false, ..Language::default() }, ..Params::default() };
    assert_eq!(rule("The cat sat on the mat with the dog and the bird.", &any_language), "gopher_quality.min_words");
    let hashes = format!("{GOOD} {}", (0..20).map(|i| format!("#tag{i}")).collect::<Vec<_>>().join(" "));
    assert_eq!(rule(&hashes, &p), "gopher_quality.max_symbol_word_ratio");
    let lorem = format!("{GOOD}\nLorem ipsum dolor sit amet, and the rest of it goes here.");
    assert_eq!(rule(&lorem, &p), "c4.lorem_ipsum");
    let code = format!("{GOOD}\nThe function is written as {{ return the value; }} in the code.");
    assert_eq!(rule(&code, &p), "c4.curly_bracket");
    let chars = Params { min_chars: 10_000, ..Params::default() };
    assert_eq!(rule(GOOD, &chars), "min_chars");
}

#[test]
fn c4_drops_lines_and_rules_switch_off() {
    let p = Params::default();
    let noisy = format!("Home | About | Contact\n{GOOD}\nThis site uses cookies to improve your experience.\nPlease enable javascript to view the comments.");
    assert_eq!(verdict(&noisy, &p).unwrap(), GOOD);
    let off = Params {
        language: Language { enabled: false, ..Language::default() },
        gopher_quality: GopherQuality { enabled: false, ..GopherQuality::default() },
        c4: C4 { enabled: false, ..C4::default() },
        fineweb: FineWeb { enabled: false, ..FineWeb::default() },
        ..Params::default()
    };
    assert_eq!(verdict("Short one.", &off).unwrap(), "Short one.");
}

#[test]
fn pii_is_redacted_when_enabled() {
    let text = format!("{GOOD}\nWrite to jane.doe@example.org or reach the server at 192.168.10.254 for the details.");
    let p = Params { pii: Pii { enabled: true }, ..Params::default() };
    let out = verdict(&text, &p).unwrap();
    assert!(out.ends_with("Write to email@example.com or reach the server at 0.0.0.0 for the details."), "{out}");
    assert!(verdict(&text, &Params::default()).unwrap().contains("jane.doe@example.org"));
}

#[test]
fn tokens_split_words_and_punctuation() {
    assert_eq!(tokens("Don't stop—now, #1!"), ["Don't", "stop", "—", "now", ",", "#", "1", "!"]);
}

/// Settings for paragraphs of a novel, as the default pipeline uses them.
fn novel_params() -> Params {
    Params {
        min_chars: 20,
        language: Language { threshold: 0.5, ..Language::default() },
        gopher_quality: GopherQuality { min_words: 3, min_stop_words: 1, min_alpha_words_ratio: 0.5, ..GopherQuality::default() },
        c4: C4 { enabled: false, ..C4::default() },
        fineweb: FineWeb { enabled: false, ..FineWeb::default() },
        ..Params::default()
    }
}

#[test]
fn stage_on_a_novel_reports_rules_and_removed_rows() {
    let paragraphs = novel_paragraphs("austen.txt", 1);
    let texts: Vec<&str> = paragraphs.iter().map(String::as_str).collect();
    let (out, ctx) = run_stage::<Filter>(&Params::default(), &texts);
    let kept = ctx.metrics()["documents_out"].as_u64().unwrap() as usize;
    // Web-scale defaults throw most of a novel away (the stage warns).
    assert_eq!((kept, texts.len()), (180, 10298));
    let removed = docs::read_table(&out.path().join("removed")).unwrap();
    assert_eq!(removed.height() + kept, texts.len());
    let rules = ctx.metrics()["removed"].as_object().unwrap();
    assert_eq!(rules.values().map(|v| v.as_u64().unwrap() as usize).sum::<usize>(), removed.height());
    let first: Vec<&str> = removed.column("rule").unwrap().str().unwrap().iter().map(Option::unwrap).collect();
    assert!(rules.contains_key(first[0]));

    let (_, ctx) = run_stage::<Filter>(&novel_params(), &texts);
    let kept = ctx.metrics()["documents_out"].as_u64().unwrap() as usize;
    assert_eq!(kept, 8774);
    assert_eq!(ctx.metrics()["removed"]["language"], 810);
    assert_eq!(ctx.metrics()["removed"]["min_chars"], 452);
}

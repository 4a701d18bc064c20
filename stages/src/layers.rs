//! The layout's rules, checked on the source (README, "Layout"):
//!
//! * the layers depend downwards only, in the order of [`LAYERS`]: the
//!   ground floor `stage` (the `Stage` trait and params) under the shared
//!   layers, and the kinds with their dispatch (`kinds/mod.rs`) on top;
//! * a kind is a leaf: no file under `kinds/` uses another kind, and nothing
//!   outside `kinds/` uses a kind (only the list, `kinds::each_kind`);
//! * a kind never reaches `dist`: it splits rows across ranks through
//!   `train::ranks`, the one place that does;
//! * `lib.rs` only declares the modules and re-exports the ground floor's
//!   names (and the protocol's), so a use of `crate::Stage` is a use of
//!   `stage`.
//!
//! Modules at the crate root that are no layer (`bounds`, `device`,
//! `describe`, `sandbox`, `testing`) may be used from anywhere.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers, lowest first: the ground floor, the shared layers, the kinds.
const LAYERS: [&str; 9] = ["stage", "dist", "fast", "model", "formats", "data", "sample", "train", "kinds"];

/// A `.rs` file under `src/`, its layer (a top-level module) and, under
/// `kinds/`, the kind it belongs to.
struct Source {
    path: PathBuf,
    text: String,
    layer: Option<usize>,
    kind: Option<String>,
}

/// Every source file but this one, whose tests hold examples of bad uses.
fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("layers.rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let parts: Vec<String> = path.strip_prefix(&root).unwrap().iter().map(|p| p.to_string_lossy().into_owned()).collect();
            let top = parts[0].trim_end_matches(".rs");
            let kind = (top == "kinds" && parts.len() > 1 && parts[1] != "mod.rs").then(|| parts[1].trim_end_matches(".rs").to_string());
            Source { text: std::fs::read_to_string(&path).unwrap(), layer: LAYERS.iter().position(|l| *l == top), kind, path }
        })
        .collect()
}

/// The crate paths a file uses, as their first two segments (`model::Gpt`
/// → `["model", "Gpt"]`), from `crate::…` paths and `use crate::{…}` groups.
/// `super::` paths are resolved for files under `kinds/`.
fn uses(source: &Source) -> Vec<[String; 2]> {
    let code: String = source.text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let mut found = Vec::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group, e.g. `use crate::{data::records, Stage}`.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.push(split(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            found.push(split(&item));
        } else {
            found.push(split(&ident_path(rest, &ident)));
        }
    }
    if source.kind.is_some() {
        // In `kinds/x.rs`, `super::` is `kinds`; in `kinds/x/y.rs`, `super::super::`.
        let nested = source.path.parent().is_some_and(|p| !p.ends_with("kinds"));
        let prefix = if nested { "super::super::" } else { "super::" };
        for (i, _) in code.match_indices(prefix) {
            let rest = &code[i + prefix.len()..];
            let name = ident(rest);
            if !name.is_empty() && name != "super" {
                found.push(["kinds".to_string(), name]);
            }
        }
    }
    found
}

fn ident_path(rest: &str, ident: &dyn Fn(&str) -> String) -> String {
    let first = ident(rest);
    match rest[first.len()..].strip_prefix("::") {
        Some(after) => format!("{first}::{}", ident(after)),
        None => first,
    }
}

fn split(item: &str) -> [String; 2] {
    let mut parts = item.trim().split("::").map(|p| p.trim().to_string());
    [parts.next().unwrap_or_default(), parts.next().unwrap_or_default()]
}

/// Every use that breaks a rule, as `file: what`.
fn violations() -> Vec<String> {
    let sources = sources();
    let kinds: BTreeSet<String> = sources.iter().filter_map(|s| s.kind.clone()).collect();
    let mut bad = Vec::new();
    for source in &sources {
        let file = source.path.display();
        for [top, second] in uses(source) {
            if top == "kinds" && kinds.contains(&second) {
                match &source.kind {
                    Some(own) if *own == second => {}
                    Some(own) => bad.push(format!("{file}: the kind `{own}` uses the kind `{second}`")),
                    None => bad.push(format!("{file}: uses the kind `{second}`; only kinds/ may")),
                }
                continue;
            }
            if let (Some(own), "dist") = (&source.kind, top.as_str()) {
                bad.push(format!("{file}: the kind `{own}` uses `dist::{second}`; kinds split rows across ranks through `train::ranks`"));
            }
            let (Some(from), Some(to)) = (source.layer, LAYERS.iter().position(|l| *l == top)) else { continue };
            if to > from {
                bad.push(format!("{file}: the layer `{}` uses `{top}::{second}`, above it", LAYERS[from]));
            }
        }
    }
    bad
}

#[test]
fn kinds_are_leaves_and_layers_depend_downwards() {
    let bad = violations();
    assert!(bad.is_empty(), "{} uses against the layout:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn lib_rs_declares_modules_and_reexports_only() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let code = lib.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("//") && !l.starts_with("#["));
    let items: Vec<&str> =
        code.filter(|l| !(l.starts_with("pub mod ") || l.starts_with("mod ") || l.starts_with("pub(crate) mod "))).collect();
    assert_eq!(
        items,
        [
            "pub use llmflow_protocol::{KindInfo, ParamError, Report, Resolved, Resources, StageCtx};",
            "pub use stage::{params, Inputs, Stage};"
        ]
    );
}

#[test]
fn the_check_sees_what_it_must() {
    let kind = |path: &str, text: &str| Source {
        path: PathBuf::from(path),
        text: text.into(),
        layer: Some(LAYERS.len() - 1),
        kind: Some(path.rsplit('/').next().unwrap().trim_end_matches(".rs").into()),
    };
    let uses_of = |s: &Source| uses(s).into_iter().map(|[a, b]| format!("{a}::{b}")).collect::<Vec<_>>();
    let sft = kind("src/kinds/sft.rs", "use crate::{data::records, kinds::dpo::Params, Stage};\nuse super::ppo;\n// crate::kinds::eval");
    assert_eq!(uses_of(&sft), ["data::records", "kinds::dpo", "Stage::", "kinds::ppo"]);
    let nested = kind("src/kinds/eval/tasks.rs", "use super::code;\nuse super::super::sft::Params;");
    assert_eq!(uses_of(&nested), ["kinds::sft"]);
}

//! The engine's layers, checked on the source: a module uses only modules
//! in layers below its own (or its own module's files), so there is no
//! circle. Adding a module means giving it a place in [`LAYERS`].

use std::collections::BTreeMap;
use std::path::Path;

/// The engine's modules, lowest layer first; modules in one layer do not
/// use each other.
const LAYERS: &[&[&str]] = &[
    &["error", "files", "log", "protocol"],
    &["hash"],
    &["graph", "runner", "store", "ui"],
    &["executor", "remote"],
    &["config"],
    &["plan"],
    &["scheduler"],
    &["commands"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Each top-level module with the modules it names as `crate::NAME`,
/// skipping comments and this file.
fn uses() -> BTreeMap<String, Vec<(String, String)>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path.strip_prefix(&root).unwrap();
            let module = rel.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_string();
            if ["lib", "main", "layers"].contains(&module.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let mut names: Vec<String> = Vec::new();
                if let Some(group) = rest.strip_prefix('{') {
                    // `use crate::{a::b, c}`: the group's top-level names.
                    let (mut depth, mut item) = (0, String::new());
                    for c in group.chars() {
                        match c {
                            '{' => depth += 1,
                            '}' if depth == 0 => break,
                            '}' => depth -= 1,
                            ',' if depth == 0 => names.push(std::mem::take(&mut item)),
                            _ => {}
                        }
                        if c != ',' || depth > 0 {
                            item.push(c);
                        }
                    }
                    names.push(item);
                } else {
                    names.push(rest.to_string());
                }
                for name in names {
                    let used: String = name.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if !used.is_empty() && used != module {
                        found.entry(module.clone()).or_default().push((used, rel.display().to_string()));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn every_module_uses_only_layers_below_it() {
    let mut bad = Vec::new();
    for (module, used) in uses() {
        let Some(from) = layer(&module) else {
            bad.push(format!("src/{module}: a module with no place in LAYERS"));
            continue;
        };
        for (to, file) in used {
            match layer(&to) {
                None => bad.push(format!("src/{file}: uses `crate::{to}`, which has no place in LAYERS")),
                Some(l) if l >= from => bad.push(format!("src/{file}: `{module}` uses `{to}`, which is not below it")),
                Some(_) => {}
            }
        }
    }
    assert!(bad.is_empty(), "{} uses against the engine's layers:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn the_check_sees_the_modules_there_are() {
    let found = uses();
    assert!(found["scheduler"].iter().any(|(to, _)| to == "executor"), "{:?}", found["scheduler"]);
    assert!(found["config"].iter().any(|(to, _)| to == "store"));
    for module in LAYERS.iter().flat_map(|l| l.iter()).filter(|m| **m != "protocol") {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(module);
        assert!(file.with_extension("rs").is_file() || file.join("mod.rs").is_file(), "LAYERS names `{module}`, which is no module");
    }
}

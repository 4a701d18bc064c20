//! `llmflow kinds KIND`: a kind's params with their defaults, as the TOML a
//! user writes under `[stages.NAME]`, each key under a comment line taken
//! from its doc comment. Generated from the kind's `Params` type (its
//! `Default` and its JSON schema), so it cannot drift from the code.

use std::fmt::Write;

use serde_json::{Map, Value};

/// The TOML of `defaults` (a kind's `Params::default()` as JSON) under
/// `[stages.NAME]`, documented from `schema` (its JSON schema).
pub fn params_toml(kind: &str, summary: &str, defaults: &Value, schema: &Value) -> String {
    let mut out = format!("# {summary}\n[stages.NAME]\nkind = \"{kind}\"\n");
    let defs = schema.get("$defs").cloned().unwrap_or(Value::Null);
    table(&mut out, "stages.NAME", defaults, schema, &defs);
    out
}

/// The keys of one table: values first, then each sub-table as a section of
/// its own, as TOML requires.
fn table(out: &mut String, path: &str, values: &Value, schema: &Value, defs: &Value) {
    let Some(values) = values.as_object() else { return };
    let properties = properties(schema, defs);
    let mut sections = Vec::new();
    for (key, value) in values {
        let field = properties.get(key).cloned().unwrap_or(Value::Null);
        let doc = description(&field, defs);
        if is_section(value, &field, defs) {
            sections.push((key, value, field, doc));
            continue;
        }
        comment(out, &doc);
        match value {
            Value::Null => writeln!(out, "# {key} = …  (unset)").expect("a String"),
            _ => writeln!(out, "{key} = {}", inline(value)).expect("a String"),
        }
    }
    for (key, value, field, doc) in sections {
        out.push('\n');
        comment(out, &doc);
        let path = format!("{path}.{key}");
        writeln!(out, "[{path}]").expect("a String");
        table(out, &path, value, &resolve(&field, defs), defs);
    }
}

/// A table whose schema names its keys (a struct): written as a section.
/// Other tables (a variant of an enum) are written inline.
fn is_section(value: &Value, field: &Value, defs: &Value) -> bool {
    value.is_object() && !properties(&resolve(field, defs), defs).is_empty()
}

fn comment(out: &mut String, doc: &str) {
    if !doc.is_empty() {
        writeln!(out, "# {doc}").expect("a String");
    }
}

/// A value as TOML writes it inline.
fn inline(value: &Value) -> String {
    match toml::Value::try_from(value) {
        Ok(v) => v.to_string(),
        Err(_) => value.to_string(),
    }
}

/// The first line of a schema's description, following references.
fn description(schema: &Value, defs: &Value) -> String {
    let own = schema.get("description").and_then(Value::as_str);
    let text = own.map(str::to_string).unwrap_or_else(|| {
        let resolved = resolve(schema, defs);
        resolved.get("description").and_then(Value::as_str).unwrap_or_default().to_string()
    });
    text.lines().next().unwrap_or_default().trim().to_string()
}

/// The properties of an object schema, flattened parts included.
fn properties(schema: &Value, defs: &Value) -> Map<String, Value> {
    let schema = resolve(schema, defs);
    let mut all = schema.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
    for part in schema.get("allOf").and_then(Value::as_array).into_iter().flatten() {
        all.extend(properties(part, defs));
    }
    all
}

/// `schema` with a `$ref` (or an optional's `anyOf: [T, null]`) followed.
fn resolve(schema: &Value, defs: &Value) -> Value {
    if let Some(name) = schema.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/$defs/")) {
        return resolve(&defs[name], defs);
    }
    if let Some(options) = schema.get("anyOf").and_then(Value::as_array) {
        if let Some(some) = options.iter().find(|o| o.get("type") != Some(&Value::from("null"))) {
            return resolve(some, defs);
        }
    }
    schema.clone()
}

/// Every key of `defaults` at any depth whose schema gives no description,
/// as dotted paths (for the test that keeps the docs complete).
pub fn undocumented(defaults: &Value, schema: &Value) -> Vec<String> {
    let defs = schema.get("$defs").cloned().unwrap_or(Value::Null);
    let mut missing = Vec::new();
    walk(&mut missing, "", defaults, schema, &defs);
    missing
}

fn walk(missing: &mut Vec<String>, path: &str, values: &Value, schema: &Value, defs: &Value) {
    let Some(values) = values.as_object() else { return };
    let properties = properties(schema, defs);
    for (key, value) in values {
        let field = properties.get(key).cloned().unwrap_or(Value::Null);
        let dotted = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        if description(&field, defs).is_empty() {
            missing.push(dotted.clone());
        }
        if is_section(value, &field, defs) {
            walk(missing, &dotted, value, &resolve(&field, defs), defs);
        }
    }
}

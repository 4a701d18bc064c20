//! Wiring stage tables into stages: references checked, cycles rejected,
//! sweeps expanded into variants, each wired to the variants it reads.

use std::collections::{BTreeMap, HashMap};

use toml::de::DeTable;

use super::parse::RawStage;
use super::source::{at, Source};
use super::sweep::{self, Variant};
use crate::error::{suggest, ConfigError};
use crate::graph::toposort;

/// The longest name a stage or variant may have: it stands in the store's
/// file names, with a suffix of up to 55 bytes, under the 255 of a name.
const MAX_NAME: usize = 200;

/// One stage to build: a stage table as written, or one variant of a swept one.
pub(super) struct Expanded {
    /// Index of the table in the raw stages.
    pub raw: usize,
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, String>,
}

/// Checks the references between stage tables, rejects cycles, and expands
/// sweeps: each table becomes its variants, in file order, wired to the
/// variants of their inputs.
pub(super) fn expand(src: &Source, spans: &DeTable, raw: &[RawStage], max_stages: u64) -> Result<Vec<Expanded>, ConfigError> {
    let index: HashMap<&str, usize> = raw.iter().enumerate().map(|(i, r)| (r.name.as_str(), i)).collect();
    let input_at = |r: &RawStage, slot: &str| {
        let path: &[&str] =
            if slot == "input" && src.key_span(spans, &["stages", &r.name, "input"]).is_some() { &["input"] } else { &["inputs", slot] };
        at(src, spans, &r.name, path)
    };
    let mut upstream = Vec::with_capacity(raw.len());
    for r in raw {
        let mut ups = Vec::new();
        for (slot, pattern) in &r.inputs {
            match index.get(pattern.stage.as_str()) {
                Some(&u) => ups.push(u),
                None => {
                    let names: Vec<&str> = raw.iter().map(|r| r.name.as_str()).collect();
                    return Err(src.error(
                        input_at(r, slot),
                        format!(
                            "stage `{}`: input `{slot}` names stage `{}`, which does not exist{}",
                            r.name,
                            pattern.stage,
                            suggest(&pattern.stage, &names)
                        ),
                    ));
                }
            }
        }
        upstream.push(ups);
    }
    let order = toposort(&upstream).map_err(|cycle| {
        let path: Vec<&str> = cycle.iter().chain(&cycle[..1]).map(|&i| raw[i].name.as_str()).collect();
        ConfigError(format!(
            "{}: stages form a cycle: {}\n  an input must name a stage that does not depend on this one",
            raw[cycle[0]].location,
            path.join(" → ")
        ))
    })?;

    // Each table's variants, upstream tables first: a stage fans out over
    // the variants of the stages it reads by plain name, then over its own sweep.
    // Counted before they are made: a sweep of millions of variants is a mistake, not a run.
    let mut variants: Vec<Vec<Variant>> = vec![Vec::new(); raw.len()];
    let mut total = 0u64;
    for &i in &order {
        let r = &raw[i];
        let mut acc: Vec<Variant> = vec![Vec::new()];
        let fan_in = r.inputs.values().filter(|p| !p.bracketed).map(|p| &variants[index[p.stage.as_str()]]);
        let own = if r.zip {
            r.axes.first().map_or(1, |a| a.values.len() as u64)
        } else {
            r.axes.iter().map(|a| a.values.len() as u64).product()
        };
        let most = fan_in.clone().fold(own, |n, vs| n.saturating_mul(vs.len() as u64));
        if total.saturating_add(most) > max_stages {
            let at = match r.axes.first() {
                Some(axis) => at(src, spans, &r.name, &["sweep", &axis.path]),
                None => at(src, spans, &r.name, &[]),
            };
            return Err(src.error(
                at,
                format!(
                    "stage `{}` makes up to {most} variants, {} stages with the {total} before it: more than `pipeline.max_stages` = {max_stages} allows; set `max_stages` in [pipeline] to allow more",
                    r.name,
                    total.saturating_add(most)
                ),
            ));
        }
        for vs in fan_in {
            acc = sweep::join(&acc, vs);
        }
        variants[i] = sweep::join(&acc, &sweep::own(&r.name, &r.axes, r.zip));
        total += variants[i].len() as u64;
    }
    let labels: Vec<Vec<Vec<(String, String)>>> = variants
        .iter()
        .map(|vs| {
            let keys = vs.first().map(sweep::label_keys).unwrap_or_default();
            vs.iter().map(|v| keys.iter().cloned().zip(v.iter().map(|a| a.text.clone())).collect()).collect()
        })
        .collect();
    let names: Vec<Vec<String>> = raw.iter().zip(&labels).map(|(r, ls)| ls.iter().map(|l| sweep::name(&r.name, l)).collect()).collect();
    // A stage's name stands in file names in the store (with a suffix or two).
    for (r, ns) in raw.iter().zip(&names) {
        if let Some(long) = ns.iter().find(|n| n.len() > MAX_NAME) {
            let at = r.axes.first().map_or_else(|| at(src, spans, &r.name, &[]), |a| at(src, spans, &r.name, &["sweep", &a.path]));
            return Err(src.error(
                at,
                format!(
                    "stage `{}`: the name `{long}` is {} bytes; a stage's or variant's name stands in file names and may have at most {MAX_NAME}: use shorter names or sweep values",
                    r.name,
                    long.len()
                ),
            ));
        }
    }
    let lookup: Vec<_> = variants.iter().map(|vs| sweep::index(vs)).collect();

    let mut out = Vec::with_capacity(variants.iter().map(Vec::len).sum());
    for (i, r) in raw.iter().enumerate() {
        for (k, v) in variants[i].iter().enumerate() {
            let mut params = r.params.clone();
            for a in v.iter().filter(|a| a.origin == r.name) {
                set_path(&mut params, &a.path, a.value.clone());
            }
            let mut inputs = BTreeMap::new();
            for (slot, pattern) in &r.inputs {
                let u = index[pattern.stage.as_str()];
                if !pattern.bracketed {
                    let (params, map) = &lookup[u];
                    inputs.insert(slot.clone(), names[u][map[&sweep::signature(v, params)]].clone());
                    continue;
                }
                let keys: Vec<&str> = labels[u].first().map_or(Vec::new(), |l| l.iter().map(|(k, _)| k.as_str()).collect());
                if let Some((bad, _)) = pattern.pairs.iter().find(|(k, _)| !keys.contains(&k.as_str())) {
                    let varies = if keys.is_empty() { "is not swept".to_string() } else { format!("varies {}", keys.join(", ")) };
                    return Err(src.error(
                        input_at(r, slot),
                        format!(
                            "stage `{}`: input `{slot}`: `{}` {varies}; `{bad}` is not one of them{}",
                            r.name,
                            pattern.stage,
                            suggest(bad, &keys)
                        ),
                    ));
                }
                let matched = pattern.select(&labels[u]);
                if matched.is_empty() {
                    return Err(src.error(
                        input_at(r, slot),
                        format!(
                            "stage `{}`: input `{slot}`: no variant of `{}` matches `{}`; its variants: {}",
                            r.name,
                            pattern.stage,
                            pattern.text,
                            names[u].join(", ")
                        ),
                    ));
                }
                if let (false, [_, _, ..]) = (pattern.wildcard, &matched[..]) {
                    let names: Vec<&str> = matched.iter().map(|&m| names[u][m].as_str()).collect();
                    return Err(src.error(
                        input_at(r, slot),
                        format!(
                            "stage `{}`: input `{slot}`: `{}` matches {} variants ({}); name one, or add `*` to gather them all",
                            r.name,
                            pattern.text,
                            names.len(),
                            names.join(", ")
                        ),
                    ));
                }
                if pattern.wildcard {
                    for m in matched {
                        let label = &names[u][m][raw[u].name.len()..];
                        inputs.insert(format!("{slot}{label}"), names[u][m].clone());
                    }
                } else {
                    inputs.insert(slot.clone(), names[u][matched[0]].clone());
                }
            }
            out.push(Expanded { raw: i, name: names[i][k].clone(), labels: labels[i][k].clone(), params, inputs });
        }
    }
    Ok(out)
}

/// Sets the value at a dotted path, making the tables on the way.
fn set_path(params: &mut serde_json::Value, path: &str, value: serde_json::Value) {
    let mut at = params;
    for segment in path.split('.') {
        at = &mut at[segment];
        if at.is_null() {
            *at = serde_json::Value::Object(Default::default());
        }
    }
    *at = value;
}

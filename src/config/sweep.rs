//! Sweeps: one stage table written, many variants built.
//!
//! `sweep = { "train.lr" = [1e-3, 3e-3], "model.n_layer" = [2, 4] }` in a
//! stage's table makes one variant per combination (`sweep_mode = "grid"`,
//! the default) or per position in the lists (`"zip"`), named like
//! `pretrain[lr=3e-3,n_layer=4]`. A stage that reads a swept stage by its
//! plain name fans out with it, each variant wired to the upstream variant
//! with the same values. `NAME[k=v,*]` patterns select variants, on the
//! command line and in `inputs`, where a `*` gathers every match into one
//! stage. A variant's name is not part of its key: a variant whose values
//! are unchanged stays fresh when others are added or removed.

use std::collections::HashMap;

/// One swept param: its dotted path in the stage's table and the values it
/// takes, each with the text the variant names show.
#[derive(Debug)]
pub struct Axis {
    pub path: String,
    pub values: Vec<(serde_json::Value, String)>,
}

/// A param value a variant fixes; `origin` is the stage whose sweep set it.
#[derive(Clone, Debug, PartialEq)]
pub struct Assign {
    pub origin: String,
    pub path: String,
    pub value: serde_json::Value,
    pub text: String,
}

/// The values one variant fixes, upstream stages' first.
pub type Variant = Vec<Assign>;

/// The variants a stage's own sweep makes (one empty variant without a sweep).
pub fn own(origin: &str, axes: &[Axis], zip: bool) -> Vec<Variant> {
    let assign = |axis: &Axis, (value, text): &(serde_json::Value, String)| Assign {
        origin: origin.to_string(),
        path: axis.path.clone(),
        value: value.clone(),
        text: text.clone(),
    };
    if zip {
        let n = axes.first().map_or(1, |a| a.values.len());
        return (0..n).map(|i| axes.iter().map(|a| assign(a, &a.values[i])).collect()).collect();
    }
    let mut out: Vec<Variant> = vec![Vec::new()];
    for axis in axes {
        out = out.iter().flat_map(|v| axis.values.iter().map(move |x| [v.clone(), vec![assign(axis, x)]].concat())).collect();
    }
    out
}

/// Every consistent merge of a variant of `a` with one of `b`: where both
/// fix the same param of the same stage, they must agree.
pub fn join(a: &[Variant], b: &[Variant]) -> Vec<Variant> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            if compatible(x, y) {
                let mut merged = x.clone();
                merged.extend(y.iter().filter(|s| !x.iter().any(|t| same_param(s, t))).cloned());
                out.push(merged);
            }
        }
    }
    out
}

fn same_param(a: &Assign, b: &Assign) -> bool {
    a.origin == b.origin && a.path == b.path
}

fn compatible(a: &Variant, b: &Variant) -> bool {
    a.iter().all(|x| b.iter().find(|y| same_param(x, y)).is_none_or(|y| y.text == x.text))
}

/// What each value is called in a variant's name: the param's last segment,
/// the whole path where two would read the same, and `stage.path` where
/// even that is ambiguous (two stages sweeping the same param).
pub fn label_keys(v: &Variant) -> Vec<String> {
    let short = |a: &Assign| a.path.rsplit('.').next().unwrap_or(&a.path).to_string();
    v.iter()
        .map(|a| {
            if v.iter().filter(|b| short(b) == short(a)).count() == 1 {
                short(a)
            } else if v.iter().filter(|b| b.path == a.path).count() == 1 {
                a.path.clone()
            } else {
                format!("{}.{}", a.origin, a.path)
            }
        })
        .collect()
}

/// `base[k=v,...]`, or `base` for a stage that is not swept.
pub fn name(base: &str, labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return base.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{base}[{}]", inner.join(","))
}

/// A canonical text of the values `v` fixes among `params` (origin, path),
/// to find the variant of an upstream stage that goes with `v`.
pub fn signature(v: &Variant, params: &[(String, String)]) -> String {
    params
        .iter()
        .map(|(origin, path)| {
            let text = v.iter().find(|a| &a.origin == origin && &a.path == path).map_or("", |a| a.text.as_str());
            format!("{origin}\u{1}{path}\u{1}{text}")
        })
        .collect::<Vec<_>>()
        .join("\u{2}")
}

/// An index from [`signature`] to variant position, over a stage's variants.
pub fn index(variants: &[Variant]) -> (Vec<(String, String)>, HashMap<String, usize>) {
    let params: Vec<(String, String)> =
        variants.first().map_or(Vec::new(), |v| v.iter().map(|a| (a.origin.clone(), a.path.clone())).collect());
    let map = variants.iter().enumerate().map(|(i, v)| (signature(v, &params), i)).collect();
    (params, map)
}

/// Whether `text` can stand in a variant name and a pattern.
pub fn valid_text(text: &str) -> bool {
    !text.is_empty() && !text.chars().any(|c| c.is_whitespace() || c.is_control() || "[],=*/\\'\"".contains(c))
}

/// `NAME`, `NAME[k=v,...]` or `NAME[k=v,...,*]`: a stage, one variant, or
/// every variant whose values include the given ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    /// As written.
    pub text: String,
    pub stage: String,
    pub pairs: Vec<(String, String)>,
    pub wildcard: bool,
    pub bracketed: bool,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let Some((stage, rest)) = text.split_once('[') else {
            return Ok(Pattern { text: text.to_string(), stage: text.to_string(), pairs: Vec::new(), wildcard: false, bracketed: false });
        };
        let inner =
            rest.strip_suffix(']').ok_or_else(|| format!("`{text}`: a variant pattern ends with `]`, e.g. `{stage}[lr=3e-3,*]`"))?;
        let mut pattern = Pattern { text: text.to_string(), stage: stage.to_string(), pairs: Vec::new(), wildcard: false, bracketed: true };
        for part in inner.split(',').map(str::trim) {
            match part.split_once('=') {
                _ if part == "*" => pattern.wildcard = true,
                Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => {
                    pattern.pairs.push((k.trim().to_string(), v.trim().to_string()))
                }
                _ => return Err(format!("`{text}`: `{part}` is neither KEY=VALUE nor `*`, e.g. `{stage}[lr=3e-3,*]`")),
            }
        }
        Ok(pattern)
    }

    /// Whether a variant with these labels is selected, its values equal
    /// to the pattern's as `same` compares them.
    fn matches_by(&self, labels: &[(String, String)], same: fn(&str, &str) -> bool) -> bool {
        self.pairs.iter().all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && same(lv, v)))
            && (self.wildcard || labels.len() == self.pairs.len())
    }

    /// The variants selected among those with these labels: the ones whose
    /// values read as the pattern's, else those equal as numbers (`3e-3`
    /// names `0.003`), so `01` picks the variant `01` and not `1`.
    pub fn select(&self, variants: &[Vec<(String, String)>]) -> Vec<usize> {
        let by =
            |same: fn(&str, &str) -> bool| -> Vec<usize> { (0..variants.len()).filter(|&i| self.matches_by(&variants[i], same)).collect() };
        let exact = by(|a, b| a == b);
        if exact.is_empty() {
            by(same_value)
        } else {
            exact
        }
    }
}

/// `3e-3` and `0.003` name the same value.
fn same_value(a: &str, b: &str) -> bool {
    a == b || matches!((a.parse::<f64>(), b.parse::<f64>()), (Ok(x), Ok(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn axis(path: &str, values: &[f64]) -> Axis {
        Axis { path: path.into(), values: values.iter().map(|v| (json!(v), v.to_string())).collect() }
    }

    fn texts(v: &Variant) -> Vec<&str> {
        v.iter().map(|a| a.text.as_str()).collect()
    }

    #[test]
    fn grid_is_every_combination_and_zip_pairs_by_position() {
        let axes = [axis("train.lr", &[1.0, 3.0]), axis("model.n_layer", &[2.0, 4.0])];
        let grid = own("p", &axes, false);
        assert_eq!(grid.iter().map(texts).collect::<Vec<_>>(), [["1", "2"], ["1", "4"], ["3", "2"], ["3", "4"]]);
        let zip = own("p", &axes, true);
        assert_eq!(zip.iter().map(texts).collect::<Vec<_>>(), [["1", "2"], ["3", "4"]]);
        assert_eq!(own("p", &[], false), vec![Vec::<Assign>::new()]);
    }

    #[test]
    fn join_keeps_only_consistent_merges() {
        let a = own("p", &[axis("lr", &[1.0, 3.0])], false);
        let b = join(&a, &own("q", &[axis("n", &[2.0])], false));
        // A stage reading both p and b (which fans out over p) gets two variants, not four.
        let both = join(&a, &b);
        assert_eq!(both.iter().map(texts).collect::<Vec<_>>(), [["1", "2"], ["3", "2"]]);
    }

    #[test]
    fn label_keys_lengthen_only_where_ambiguous() {
        let v = [own("p", &[axis("train.lr", &[1.0]), axis("model.n_layer", &[2.0])], false), own("s", &[axis("train.lr", &[5.0])], false)];
        let merged = join(&v[0], &v[1]);
        assert_eq!(label_keys(&merged[0]), ["p.train.lr", "n_layer", "s.train.lr"]);
        let one = own("p", &[axis("train.lr", &[1.0]), axis("optim.lr", &[2.0])], false);
        assert_eq!(label_keys(&one[0]), ["train.lr", "optim.lr"]);
    }

    #[test]
    fn patterns_select_variants() {
        let labels = vec![("lr".to_string(), "3e-3".to_string()), ("n_layer".to_string(), "4".to_string())];
        let selects = |p: &str| Pattern::parse(p).unwrap().select(std::slice::from_ref(&labels)) == [0];
        assert!(selects("p[lr=0.003,*]"));
        assert!(selects("p[n_layer=4, lr=3e-3]"));
        assert!(!selects("p[lr=3e-3]"), "without `*` every value must be named");
        assert!(selects("p[*]"));
        assert!(!selects("p[lr=1e-3,*]"));
        assert!(Pattern::parse("p[lr]").unwrap_err().contains("neither KEY=VALUE nor `*`"));
        assert!(Pattern::parse("p[lr=1").unwrap_err().contains("ends with `]`"));
        assert!(!Pattern::parse("p").unwrap().bracketed);
    }

    #[test]
    fn a_value_as_written_wins_over_a_number_equal_to_it() {
        let variants: Vec<Vec<(String, String)>> = ["1", "01", "1.0"].iter().map(|v| vec![("A".to_string(), v.to_string())]).collect();
        assert_eq!(Pattern::parse("s[A=01]").unwrap().select(&variants), [1]);
        assert_eq!(Pattern::parse("s[A=1]").unwrap().select(&variants), [0]);
        assert_eq!(Pattern::parse("s[A=1e0]").unwrap().select(&variants), [0, 1, 2], "no text matches: every equal number");
    }
}

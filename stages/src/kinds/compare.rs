//! `compare`: the runs of a sweep side by side: a table, the training curves
//! overlaid, and for a sweep over model size a compute-vs-loss fit.
//!
//! ```toml
//! [stages.pretrain]
//! kind = "pretrain"
//! sweep = { "model.d_model" = [64, 128, 192] }
//! ...
//!
//! [stages.sizes]
//! kind = "compare"
//! inputs = { runs = "pretrain[*]" }     # every variant, one input each
//! ```
//!
//! Each input is a built artifact: its params and final metrics come from
//! the `manifest.json` beside its `out/`, its curve from `metrics.jsonl` in
//! it (the training kinds write one). The output:
//! * `compare.md` (`llmflow report STAGE`) and `compare.json`: a row per run
//!   with the params that differ between runs and the final metrics.
//! * `curves.png`: the `curve` column of every run against the step, one
//!   colour per run (the table names the colours).
//! * `scaling.png` and the fit in the table: `fit` (a final metric) against
//!   training compute C = 6·N·D (N the `params` metric, D the last `tokens`
//!   of the curve), fitted as L(C) = a·C^(−b) + c, the form of the
//!   Chinchilla and nanochat miniseries plots. The x axis is log10 C. It
//!   needs three runs of different compute.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::train::{plot, trainer::METRICS_FILE};
use crate::{Inputs, ParamError, Stage, StageCtx};

pub struct Compare;

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Final metrics to tabulate; empty: every numeric metric all runs have.
    pub metrics: Vec<String>,
    /// The `metrics.jsonl` column drawn in curves.png, against `step`.
    pub curve: String,
    /// The final metric fitted against training compute in scaling.png.
    pub fit: String,
}

impl Default for Params {
    fn default() -> Self {
        Params { metrics: Vec::new(), curve: "loss".into(), fit: "val_loss".into() }
    }
}

impl Stage for Compare {
    const KIND: &'static str = "compare";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "runs side by side: a table, overlaid curves, a compute-vs-loss fit";
    const INPUTS: Inputs = Inputs::Any;
    const REPORT: Option<(&'static str, &'static str)> = Some(("compare.md", "compare.json"));
    const SHOW: &'static [&'static str] = &["compare.md", "curves.png", "scaling.png"];
    type Params = Params;

    fn check(_params: &Params, inputs: &[String]) -> Result<(), ParamError> {
        if inputs.len() < 2 {
            return Err(ParamError::new(&[], "compare needs at least two runs, e.g. inputs = { runs = \"pretrain[*]\" }"));
        }
        Ok(())
    }

    fn run(params: &Params, ctx: &mut StageCtx) -> Result<()> {
        let mut runs: Vec<Run> = ctx.inputs.iter().map(|(slot, dir)| Run::read(slot, dir, &params.curve)).collect::<Result<_>>()?;
        let differing = differing_params(&runs);
        // In the order of the values that differ (numbers as numbers), not of the slot names' text.
        runs.sort_by(|a, b| {
            differing.iter().map(|k| order(a.params.get(k), b.params.get(k))).find(|o| o.is_ne()).unwrap_or(Ordering::Equal)
        });
        let metrics: Vec<String> = if params.metrics.is_empty() {
            let first = runs[0].metrics.iter().filter(|(_, v)| v.is_number()).map(|(k, _)| k.clone());
            first.filter(|k| runs.iter().all(|r| r.metrics.get(k).is_some_and(Value::is_number))).collect()
        } else {
            params.metrics.clone()
        };
        for (m, run) in metrics.iter().flat_map(|m| runs.iter().map(move |r| (m, r))) {
            if !run.metrics.contains_key(m) {
                bail!(
                    "run `{}` has no metric `{m}`; its metrics: {}",
                    run.label,
                    run.metrics.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
        }

        let curves: Vec<(&str, &[(f64, f64)])> = runs.iter().map(|r| (r.label.as_str(), r.curve.as_slice())).collect();
        let title = format!("{} of each run", params.curve);
        plot::overlay(&ctx.out.join("curves.png"), plot::Labels { title: &title, x: "step", y: &params.curve }, &curves)?;
        let points: Vec<(f64, f64)> = runs
            .iter()
            .filter_map(|r| Some((r.compute?, r.metrics.get(&params.fit)?.as_f64()?)))
            .filter(|(c, l)| *c > 0.0 && l.is_finite())
            .collect();
        let fit = fit_power_law(&points);
        if let Some(f) = &fit {
            let (lo, hi) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.0.log10()), hi.max(p.0.log10())));
            let curve: Vec<(f64, f64)> = (0..=100).map(|i| lo + (hi - lo) * i as f64 / 100.0).map(|x| (x, f.at(10f64.powf(x)))).collect();
            let logged: Vec<(f64, f64)> = points.iter().map(|&(c, l)| (c.log10(), l)).collect();
            let title = format!("{} against training compute: L(C) = a·C^(−b) + c", params.fit);
            let labels = plot::Labels { title: &title, x: "training compute (FLOPs, log scale)", y: &params.fit };
            plot::fit(&ctx.out.join("scaling.png"), labels, ("runs", &logged), ("fit", &curve))?;
            ctx.metric("fit_b", f.b);
            ctx.metric("fit_c", f.c);
        }

        let rows: Vec<Value> = runs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                json!({
                    "run": r.label,
                    "colour": plot::COLOURS[i % plot::COLOURS.len()].0,
                    "params": differing.iter().map(|k| (k.clone(), r.params.get(k).cloned().unwrap_or(Value::Null))).collect::<serde_json::Map<_, _>>(),
                    "metrics": metrics.iter().map(|k| (k.clone(), r.metrics[k].clone())).collect::<serde_json::Map<_, _>>(),
                    "compute": r.compute,
                })
            })
            .collect();
        let fit_json = fit.as_ref().map(|f| json!({"metric": params.fit, "a": f.a, "b": f.b, "c": f.c, "rmse": f.rmse, "points": points}));
        let results = json!({"runs": rows, "fit": fit_json});
        fs::write(ctx.out.join("compare.json"), serde_json::to_vec_pretty(&results)?)?;
        fs::write(ctx.out.join("compare.md"), report(&runs, &differing, &metrics, &params.fit, fit.as_ref(), points.len()))?;
        eprintln!("compared {} runs in {}", runs.len(), ctx.out.join("compare.md").display());
        Ok(())
    }
}

/// One run: its label, flattened params, final metrics and curve.
struct Run {
    label: String,
    params: BTreeMap<String, Value>,
    metrics: serde_json::Map<String, Value>,
    curve: Vec<(f64, f64)>,
    /// 6·N·D, when the run says how many params and tokens.
    compute: Option<f64>,
}

impl Run {
    fn read(slot: &str, out: &Path, column: &str) -> Result<Run> {
        let path = out.parent().context("an input has no artifact directory")?.join("manifest.json");
        let manifest: Value = serde_json::from_slice(&fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut params = BTreeMap::new();
        flatten("", &manifest["params"], &mut params);
        let metrics = manifest["metrics"].as_object().cloned().unwrap_or_default();
        let rows: Vec<Value> = match fs::read_to_string(out.join(METRICS_FILE)) {
            Ok(text) => text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect(),
            Err(_) => Vec::new(),
        };
        let curve = rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r[column].as_f64()?))).collect();
        let tokens = rows.iter().rev().find_map(|r| r["tokens"].as_f64());
        let compute = metrics.get("params").and_then(Value::as_f64).zip(tokens).map(|(n, d)| 6.0 * n * d);
        // `runs[lr=3e-3]` is labelled by its values; a plain slot by its name.
        let label = slot.find('[').map_or(slot, |i| &slot[i..]).to_string();
        Ok(Run { label, params, metrics, curve, compute })
    }
}

fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    match value.as_object() {
        Some(map) => {
            for (k, v) in map {
                flatten(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
            }
        }
        None => {
            out.insert(prefix.to_string(), value.clone());
        }
    }
}

fn order(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    match (a.and_then(Value::as_f64), b.and_then(Value::as_f64)) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        _ => a.map(Value::to_string).cmp(&b.map(Value::to_string)),
    }
}

/// The params whose values are not the same in every run.
fn differing_params(runs: &[Run]) -> Vec<String> {
    let mut keys: Vec<&String> = runs.iter().flat_map(|r| r.params.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().filter(|k| runs.iter().any(|r| r.params.get(*k) != runs[0].params.get(*k))).cloned().collect()
}

fn report(runs: &[Run], differing: &[String], metrics: &[String], fit_metric: &str, fit: Option<&Fit>, points: usize) -> String {
    let mut md = format!("# {} runs compared\n\n", runs.len());
    let header: Vec<&str> =
        ["run", "colour"].into_iter().chain(differing.iter().map(String::as_str)).chain(metrics.iter().map(String::as_str)).collect();
    md.push_str(&format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len())));
    for (i, r) in runs.iter().enumerate() {
        let mut cells = vec![r.label.clone(), plot::COLOURS[i % plot::COLOURS.len()].0.to_string()];
        cells.extend(differing.iter().map(|k| r.params.get(k).map_or("-".to_string(), |v| v.to_string())));
        cells.extend(metrics.iter().map(|k| match r.metrics[k].as_f64() {
            Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{}", v as i64),
            Some(v) if v.abs() >= 1e5 || v.abs() < 1e-3 => format!("{v:.4e}"),
            Some(v) => format!("{v:.4}"),
            None => r.metrics[k].to_string(),
        }));
        md.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    md.push_str("\ncurves.png: each run's training curve in its colour.\n\n## Compute vs. ");
    md.push_str(fit_metric);
    md.push('\n');
    match fit {
        Some(f) => md.push_str(&format!(
            "\n{fit_metric}(C) = {:.4e} · C^(−{:.4}) + {:.4} over {points} runs (C = 6·params·tokens, in FLOPs; RMSE {:.4}). \
             scaling.png: the runs (dots) and the fit (red) against log10 C.\n",
            f.a, f.b, f.c, f.rmse
        )),
        None => md.push_str(&format!(
            "\nNo fit: it needs three runs of different compute with a `params` metric, `tokens` in metrics.jsonl and `{fit_metric}` ({points} had them).\n"
        )),
    }
    md
}

/// L(C) = a·C^(−b) + c.
#[derive(Debug, Clone, Copy)]
pub struct Fit {
    pub a: f64,
    pub b: f64,
    pub c: f64,
    /// Root mean squared error of the fit on the points, in L's units.
    pub rmse: f64,
}

impl Fit {
    pub fn at(&self, compute: f64) -> f64 {
        self.a * compute.powf(-self.b) + self.c
    }
}

/// Least squares fit of L(C) = a·C^(−b) + c to (C, L) points, b ≥ 0 and
/// 0 ≤ c < min L. For a fixed c the model is a line in log space,
/// ln(L − c) = ln a − b·ln C, so c is searched (a grid, then golden-section
/// refinement around the best cell) and a, b come from linear regression.
/// `None` with fewer than three distinct compute values.
pub fn fit_power_law(points: &[(f64, f64)]) -> Option<Fit> {
    let mut distinct: Vec<f64> = points.iter().map(|p| p.0).collect();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    let min_l = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    if distinct.len() < 3 || min_l <= 0.0 || !min_l.is_finite() {
        return None;
    }
    let fit_at = |c: f64| -> Fit {
        // ln(L - c) = alpha + slope * ln C
        let xs: Vec<f64> = points.iter().map(|p| p.0.ln()).collect();
        let ys: Vec<f64> = points.iter().map(|p| (p.1 - c).ln()).collect();
        let n = xs.len() as f64;
        let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
        let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
        let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
        let slope = (sxy / sxx).min(0.0);
        let a = (my - slope * mx).exp();
        let mut f = Fit { a, b: -slope, c, rmse: 0.0 };
        f.rmse = (points.iter().map(|p| (f.at(p.0) - p.1).powi(2)).sum::<f64>() / n).sqrt();
        f
    };
    const CELLS: usize = 400;
    let top = min_l * (1.0 - 1e-9);
    let grid = |k: usize| top * k as f64 / CELLS as f64;
    let best = (0..CELLS).min_by(|&i, &j| fit_at(grid(i)).rmse.total_cmp(&fit_at(grid(j)).rmse))?;
    let (mut lo, mut hi) = (grid(best.saturating_sub(1)), grid((best + 1).min(CELLS - 1)));
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..100 {
        let (m1, m2) = (hi - phi * (hi - lo), lo + phi * (hi - lo));
        if fit_at(m1).rmse <= fit_at(m2).rmse {
            hi = m2;
        } else {
            lo = m1;
        }
    }
    let refined = fit_at((lo + hi) / 2.0);
    let gridded = fit_at(grid(best));
    Some(if refined.rmse <= gridded.rmse { refined } else { gridded })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_a_known_power_law() {
        let truth = Fit { a: 40.0, b: 0.12, c: 1.7, rmse: 0.0 };
        let points: Vec<(f64, f64)> = [1e12, 3e12, 1e13, 3e13, 1e14, 1e15].iter().map(|&c| (c, truth.at(c))).collect();
        let f = fit_power_law(&points).unwrap();
        assert!(f.rmse < 1e-6, "{f:?}");
        for (got, want) in [(f.a, truth.a), (f.b, truth.b), (f.c, truth.c)] {
            assert!((got - want).abs() / want < 2e-3, "{f:?} vs {truth:?}");
        }
        // Too few distinct compute values: no fit.
        assert!(fit_power_law(&points[..2]).is_none());
        assert!(fit_power_law(&[points[0], points[0], points[1]]).is_none());
    }

    #[test]
    fn only_params_that_differ_are_columns() {
        let run = |lr: f64, steps: u64| {
            let mut params = BTreeMap::new();
            flatten("", &json!({"train": {"lr": lr, "steps": steps}, "seed": 1}), &mut params);
            Run { label: String::new(), params, metrics: Default::default(), curve: Vec::new(), compute: None }
        };
        assert_eq!(differing_params(&[run(1e-3, 10), run(3e-3, 10)]), ["train.lr"]);
        assert_eq!(differing_params(&[run(1e-3, 10), run(1e-3, 20)]), ["train.steps"]);
        assert_eq!(order(Some(&json!(32)), Some(&json!(128))), Ordering::Less, "numbers by value");
        assert_eq!(order(Some(&json!("b")), Some(&json!("a"))), Ordering::Greater);
    }
}

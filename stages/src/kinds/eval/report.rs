//! The report card: `results.json`, `report.md` and its charts, for every
//! model evaluated by one stage side by side.
//!
//! Its charts have a bar per model in each task's group, in input order, in
//! the colours the legend and the report name; the numbers are in the
//! tables next to them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::tasks::{Task, TaskScores};
use crate::formats::events::{self, EventWriter};
use crate::model::ModelConfig;
use crate::train::plot::{self, COLOURS};

/// What the report says about a model besides its scores.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The input slot: the model's name in the report.
    pub label: String,
    pub config: ModelConfig,
    /// Training steps and tokens, from the artifact's `metrics.jsonl` (the
    /// last row's `step`, and its `tokens` where the stage logs them).
    pub steps: Option<u64>,
    pub tokens: Option<u64>,
    /// The artifact's `loss.png`, copied into the report directory.
    pub loss_curve: Option<String>,
}

impl ModelInfo {
    /// Reads what the training stage left in `dir` and copies its loss curve
    /// into `out`.
    pub fn read(label: &str, dir: &Path, config: ModelConfig, out: &Path) -> Result<ModelInfo> {
        let rows: Vec<Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .map(|text| text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
            .unwrap_or_default();
        let last = |key: &str| rows.iter().rev().find_map(|r| r[key].as_u64());
        let loss_curve = if dir.join("loss.png").is_file() {
            let name = format!("loss_{label}.png");
            std::fs::copy(dir.join("loss.png"), out.join(&name)).with_context(|| format!("cannot copy {}/loss.png", dir.display()))?;
            Some(name)
        } else {
            None
        };
        Ok(ModelInfo { label: label.to_string(), config, steps: last("step"), tokens: last("tokens"), loss_curve })
    }
}

/// A task's outcomes on one model, timed.
#[derive(Debug, Clone)]
pub struct Scored {
    pub outcomes: TaskScores,
    pub seconds: f64,
}

impl Scored {
    pub fn examples_per_s(&self) -> f64 {
        self.outcomes.examples as f64 / self.seconds.max(1e-9)
    }
}

/// A task scored on fewer items is a sample: reported, but left out of CORE.
pub const CORE_MIN_EXAMPLES: usize = 100;

/// Why a task's centered score is not in CORE, if it is not.
pub fn not_in_core(task: &Task, scored: &Scored) -> Option<String> {
    if !task.ty.in_core() {
        Some(format!("{} is not a CORE type", task.ty.type_name()))
    } else if scored.outcomes.examples < CORE_MIN_EXAMPLES {
        Some(format!("a sample of {} items", scored.outcomes.examples))
    } else {
        None
    }
}

/// CORE as DCLM and nanochat define it: the mean centered score over the
/// multiple-choice, schema and language-modelling tasks, samples excluded.
pub fn core(tasks: &[Task], scores: &[Scored]) -> Option<f64> {
    let centered: Vec<f64> =
        tasks.iter().zip(scores).filter(|(t, s)| not_in_core(t, s).is_none()).filter_map(|(_, s)| s.outcomes.centered()).collect();
    (!centered.is_empty()).then(|| centered.iter().sum::<f64>() / centered.len() as f64)
}

/// Writes `results.json`, `report.md`, `centered.png`, with perplexity
/// tasks `bits_per_byte.png`, and the scores as a TensorBoard event file
/// (`MODEL/TASK/METRIC` at the model's training step) into `out`; returns
/// the JSON.
/// `scores[m][t]` is task `t` on model `m`.
pub fn write(out: &Path, tasks: &[Task], models: &[ModelInfo], scores: &[Vec<Scored>]) -> Result<Value> {
    let results = results_json(tasks, models, scores);
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&results)? + "\n")?;
    let mut events = EventWriter::create(&out.join(events::FILE))?;
    for (model, row) in models.iter().zip(scores) {
        let values: Vec<(String, f64)> = tasks
            .iter()
            .zip(row)
            .flat_map(|(task, s)| s.outcomes.metrics.iter().map(move |(name, v)| (format!("{}/{}/{name}", model.label, task.name), *v)))
            .chain([(format!("{}/CORE", model.label), core(tasks, row).unwrap_or(f64::NAN))])
            .filter(|(_, v)| v.is_finite())
            .collect();
        events.scalars(model.steps.unwrap_or(0) as i64, &values)?;
    }
    let series: Vec<String> = models.iter().map(|m| m.label.clone()).collect();
    let chart = |name: &str, labels: plot::Labels, pick: &dyn Fn(&TaskScores) -> Option<f64>| -> Result<Option<String>> {
        let rows: Vec<(String, Vec<Option<f64>>)> =
            tasks.iter().enumerate().map(|(t, task)| (task.name.clone(), scores.iter().map(|m| pick(&m[t].outcomes)).collect())).collect();
        let (groups, values): (Vec<String>, Vec<Vec<Option<f64>>>) =
            rows.into_iter().filter(|(_, g)| g.iter().any(Option::is_some)).unzip();
        if groups.is_empty() {
            return Ok(None);
        }
        plot::bars(&out.join(name), labels, &groups, &series, &values)?;
        Ok(Some(name.to_string()))
    };
    let labels = plot::Labels { title: "centered score per task: 0 is chance, 1 is perfect", x: "task", y: "centered score" };
    let centered = chart("centered.png", labels, &|o| o.centered())?;
    let labels = plot::Labels { title: "bits per byte per text (lower is better)", x: "text", y: "bits per byte" };
    let bpb = chart("bits_per_byte.png", labels, &|o| o.chance.is_none().then(|| o.metrics[&o.primary]))?;
    std::fs::write(out.join("report.md"), markdown(tasks, models, scores, centered.as_deref(), bpb.as_deref()))?;
    Ok(results)
}

fn results_json(tasks: &[Task], models: &[ModelInfo], scores: &[Vec<Scored>]) -> Value {
    let mut results = serde_json::Map::new();
    let mut cores = serde_json::Map::new();
    for (model, row) in models.iter().zip(scores) {
        let per_task: serde_json::Map<String, Value> = tasks
            .iter()
            .zip(row)
            .map(|(task, s)| {
                let mut v = serde_json::to_value(&s.outcomes).expect("serializable");
                v["centered"] = json!(s.outcomes.centered());
                v["in_core"] = json!(not_in_core(task, s).is_none());
                v["seconds"] = json!(s.seconds);
                v["examples_per_s"] = json!(s.examples_per_s());
                (task.name.clone(), v)
            })
            .collect();
        results.insert(model.label.clone(), Value::Object(per_task));
        cores.insert(model.label.clone(), json!(core(tasks, row)));
    }
    let models: Vec<Value> = models
        .iter()
        .map(|m| {
            json!({
                "label": m.label, "params": m.config.num_params(), "training_tokens": m.tokens, "steps": m.steps,
                "loss_curve": m.loss_curve, "config": m.config,
            })
        })
        .collect();
    json!({"models": models, "tasks": tasks, "results": results, "core": cores})
}

/// A number in a table: enough digits to compare, not more.
fn number(x: f64) -> String {
    match x.abs() {
        a if a >= 1000.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.2}"),
        _ => format!("{x:.4}"),
    }
}

fn millions(n: f64) -> String {
    format!("{:.2} M", n / 1e6)
}

fn markdown(tasks: &[Task], models: &[ModelInfo], scores: &[Vec<Scored>], centered: Option<&str>, bpb: Option<&str>) -> String {
    let mut md = String::from("# Evaluation report\n\n## Models\n\n");
    md += "| model | colour | parameters | training steps | training tokens | loss curve |\n|---|---|---|---|---|---|\n";
    for (m, info) in models.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            info.label,
            COLOURS[m % COLOURS.len()].0,
            millions(info.config.num_params() as f64),
            info.steps.map_or("—".into(), |s| s.to_string()),
            info.tokens.map_or("—".into(), |t| millions(t as f64)),
            info.loss_curve.as_ref().map_or("—".into(), |f| format!("[loss.png]({f})")),
        );
    }
    let header = |first: &str, second: &str| {
        let names: Vec<&str> = models.iter().map(|m| m.label.as_str()).collect();
        format!("| {first} | {second} | {} |\n|---|---|{}\n", names.join(" | "), "---|".repeat(names.len()))
    };

    md += "\n## Scores\n\nMean ± standard error over the items; ";
    md += "the first metric of each task is the one its centered score uses.\n\n";
    md += &header("task", "metric");
    for (t, task) in tasks.iter().enumerate() {
        let first = &scores[0][t].outcomes;
        let mut names: Vec<&String> = first.metrics.keys().filter(|k| !k.ends_with("_stderr")).collect();
        names.sort_by_key(|k| **k != first.primary);
        for (i, name) in names.into_iter().enumerate() {
            let cells: Vec<String> = scores
                .iter()
                .map(|row| {
                    let metrics = &row[t].outcomes.metrics;
                    match metrics.get(&format!("{name}_stderr")) {
                        Some(se) => format!("{} ± {}", number(metrics[name]), number(*se)),
                        None => number(metrics[name]),
                    }
                })
                .collect();
            let label =
                if i == 0 { format!("{} ({}, {} examples)", task.name, task.ty.type_name(), first.examples) } else { String::new() };
            let _ = writeln!(md, "| {label} | {name} | {} |", cells.join(" | "));
        }
    }

    md += "\n## Centered scores\n\n(score − chance) / (1 − chance), as nanochat's CORE: 0 is guessing, 1 is perfect. ";
    md += "CORE is their mean over the multiple-choice, schema and language-modelling tasks of at least ";
    let _ = write!(md, "{CORE_MIN_EXAMPLES} items (as DCLM's); the others are shown, not averaged.\n\n");
    md += &header("task", "chance");
    for (t, task) in tasks.iter().enumerate() {
        let Some(chance) = scores[0][t].outcomes.chance else { continue };
        let cells: Vec<String> = scores.iter().map(|row| row[t].outcomes.centered().map_or("—".into(), number)).collect();
        let name = match not_in_core(task, &scores[0][t]) {
            Some(why) => format!("{} (not in CORE: {why})", task.name),
            None => task.name.clone(),
        };
        let _ = writeln!(md, "| {name} | {} | {} |", number(chance), cells.join(" | "));
    }
    let cores: Vec<String> = scores.iter().map(|row| core(tasks, row).map_or("—".into(), number)).collect();
    let _ = writeln!(md, "| **CORE** | | {} |", cores.join(" | "));
    let legend = || {
        let names: Vec<String> = models.iter().enumerate().map(|(m, i)| format!("{} {}", COLOURS[m % COLOURS.len()].0, i.label)).collect();
        format!("one bar per model, left to right: {}", names.join(", "))
    };
    if let Some(file) = centered {
        let _ = writeln!(
            md,
            "\n![centered score per task]({file})\n\nCentered score per task, in the order of the table ({}); the black line is 0.",
            legend()
        );
    }
    if let Some(file) = bpb {
        let _ = writeln!(md, "\n![bits per byte per text]({file})\n\nBits per byte per perplexity task, in the order of the scores table ({}); lower is better.", legend());
    }

    for (t, task) in tasks.iter().enumerate() {
        if scores[0][t].outcomes.breakdown.is_empty() {
            continue;
        }
        let breakdown = &scores[0][t].outcomes.breakdown;
        let _ = writeln!(md, "\n<details><summary>{}: accuracy per file ({} files)</summary>\n", task.name, breakdown.len());
        md += &header("file", "pairs");
        let per_file = scores[0][t].outcomes.examples / breakdown.len();
        for name in breakdown.keys() {
            let cells: Vec<String> = scores.iter().map(|row| number(row[t].outcomes.breakdown[name])).collect();
            let _ = writeln!(md, "| {name} | {per_file} | {} |", cells.join(" | "));
        }
        md += "\n</details>\n";
    }

    md += "\n## Throughput\n\nExamples scored per second (windows for perplexity, problems for code).\n\n";
    md += &header("task", "examples");
    for (t, task) in tasks.iter().enumerate() {
        let cells: Vec<String> = scores.iter().map(|row| format!("{:.1}/s ({:.1} s)", row[t].examples_per_s(), row[t].seconds)).collect();
        let _ = writeln!(md, "| {} | {} | {} |", task.name, scores[0][t].outcomes.examples, cells.join(" | "));
    }
    md
}

/// Metric name → value of a model's tasks, for the manifest: the primary
/// metric of each task and the CORE score.
pub fn manifest_metrics(tasks: &[Task], models: &[ModelInfo], scores: &[Vec<Scored>]) -> BTreeMap<String, f64> {
    let mut metrics = BTreeMap::new();
    for (model, row) in models.iter().zip(scores) {
        for (task, s) in tasks.iter().zip(row) {
            metrics.insert(format!("{}.{}.{}", model.label, task.name, s.outcomes.primary), s.outcomes.metrics[&s.outcomes.primary]);
        }
        if let Some(core) = core(tasks, row) {
            metrics.insert(format!("{}.core", model.label), core);
        }
    }
    metrics
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// CORE averages the centered scores of the in-context types over 100
    /// items or more: a 4-item sample and BLiMP stay out.
    #[test]
    fn core_averages_the_in_context_tasks_that_are_not_samples() {
        let task = |name: &str, kind: &str| -> Task { serde_json::from_value(json!({"name": name, "type": kind, "file": "f"})).unwrap() };
        let scored = |primary: &str, value: f64, chance: f64, examples: usize| Scored {
            outcomes: TaskScores {
                metrics: BTreeMap::from([(primary.to_string(), value)]),
                counts: BTreeMap::new(),
                primary: primary.into(),
                chance: Some(chance),
                examples,
                breakdown: BTreeMap::new(),
                items: Vec::new(),
            },
            seconds: 1.0,
        };
        let tasks =
            [task("arc", "multiple_choice"), task("wino", "schema"), task("lambada", "language_modeling"), task("blimp", "minimal_pairs")];
        let row =
            [scored("acc_norm", 0.5, 0.25, 100), scored("acc", 1.0, 0.5, 4), scored("acc", 0.2, 0.0, 150), scored("acc", 0.9, 0.5, 200)];
        let expected = (1.0 / 3.0 + 0.2) / 2.0;
        assert!((core(&tasks, &row).unwrap() - expected).abs() < 1e-12);
        assert_eq!(not_in_core(&tasks[1], &row[1]).unwrap(), "a sample of 4 items");
        assert_eq!(not_in_core(&tasks[3], &row[3]).unwrap(), "minimal_pairs is not a CORE type");
        assert_eq!(core(&tasks[1..2], &row[1..2]), None);
    }
}

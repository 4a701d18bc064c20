//! `dag`: the stage graph, for people (text, DOT, Mermaid) or scripts (JSON).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde_json::json;

use super::{load, print_json};
use crate::config::Pipeline;
use crate::graph::Dag;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Dot,
    Mermaid,
    /// Every stage with its kind and inputs, for scripts.
    Json,
}

pub fn dag(file: &Path, format: Format) -> Result<()> {
    let (p, dag) = load(file)?;
    if format == Format::Json {
        let stages: Vec<_> = dag
            .order
            .iter()
            .map(|&i| {
                let s = &p.stages[i];
                json!({ "name": s.name, "stage": s.base, "kind": s.kind.kind, "inputs": s.inputs, "executor": s.executor.executor })
            })
            .collect();
        return print_json(&json!({ "pipeline": p.name, "stages": stages }));
    }
    print!("{}", render(p, dag, format));
    Ok(())
}

/// The graph as text, Graphviz DOT or Mermaid.
fn render(p: &Pipeline, dag: &Dag, format: Format) -> String {
    let mut out = String::new();
    let edges = || dag.order.iter().flat_map(move |&i| dag.upstream(i).iter().map(move |&u| (u, i)));
    // Mermaid ids must be plain words; a variant's name is not.
    let id = |i: usize| {
        let s = &p.stages[i];
        if s.labels.is_empty() {
            s.name.clone()
        } else {
            format!("{}__{i}", s.base)
        }
    };
    let inputs = |i: usize| -> String {
        let ins: Vec<String> = p.stages[i].inputs.iter().map(|(slot, up)| format!("{slot}={up}")).collect();
        if ins.is_empty() {
            String::new()
        } else {
            format!(" ← {}", ins.join(", "))
        }
    };
    for group in p.groups(dag) {
        let first = &p.stages[group[0]];
        let swept = !first.labels.is_empty();
        match format {
            Format::Json => unreachable!("printed as JSON above"),
            Format::Text if swept => {
                let _ = writeln!(out, "{} ({}), {} variants:", first.base, first.kind.kind, group.len());
                for &i in &group {
                    let _ = writeln!(out, "  {}{}", &p.stages[i].name[first.base.len()..], inputs(i));
                }
            }
            Format::Text => {
                let _ = writeln!(out, "{} ({}){}", first.name, first.kind.kind, inputs(group[0]));
            }
            Format::Dot => {
                if swept {
                    let _ = writeln!(out, "  subgraph \"cluster_{}\" {{\n    label=\"{} ({})\";", first.base, first.base, first.kind.kind);
                }
                for &i in &group {
                    let s = &p.stages[i];
                    let label = if swept { s.name[s.base.len()..].to_string() } else { format!("{}\\n({})", s.name, s.kind.kind) };
                    let _ = writeln!(out, "  \"{}\" [label=\"{label}\"];", s.name);
                }
                if swept {
                    out.push_str("  }\n");
                }
            }
            Format::Mermaid => {
                if swept {
                    let _ = writeln!(out, "  subgraph {}[\"{} ({})\"]", first.base, first.base, first.kind.kind);
                }
                for &i in &group {
                    let s = &p.stages[i];
                    let label = if swept { s.name[s.base.len()..].to_string() } else { format!("{}<br/>({})", s.name, s.kind.kind) };
                    let _ = writeln!(out, "  {}[\"{label}\"]", id(i));
                }
                if swept {
                    out.push_str("  end\n");
                }
            }
        }
    }
    match format {
        Format::Text | Format::Json => {}
        Format::Dot => {
            out.insert_str(0, &format!("digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];\n", p.name));
            for (u, d) in edges() {
                let _ = writeln!(out, "  \"{}\" -> \"{}\";", p.stages[u].name, p.stages[d].name);
            }
            out.push_str("}\n");
        }
        Format::Mermaid => {
            out.insert_str(0, "flowchart LR\n");
            for (u, d) in edges() {
                let _ = writeln!(out, "  {} --> {}", id(u), id(d));
            }
        }
    }
    out
}

//! The stage graph: edges from input references, cycle detection, ordering,
//! target selection and rendering (`llmflow dag`).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;

use petgraph::algo::{is_cyclic_directed, tarjan_scc};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use crate::config::{ConfigError, Pipeline};

/// Stages as indices into `Pipeline::stages`; an edge runs upstream → downstream.
pub struct Dag {
    graph: DiGraph<usize, ()>,
    /// Stage indices in a dependency order (inputs first), ties in file order.
    pub order: Vec<usize>,
}

impl Dag {
    pub fn new(p: &Pipeline) -> Result<Dag, ConfigError> {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..p.stages.len()).map(|i| graph.add_node(i)).collect();
        let index: HashMap<&str, usize> = p.stages.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
        for (i, stage) in p.stages.iter().enumerate() {
            for up in stage.inputs.values() {
                graph.update_edge(nodes[index[up.as_str()]], nodes[i], ());
            }
        }
        if is_cyclic_directed(&graph) {
            let cycle = tarjan_scc(&graph)
                .into_iter()
                .find(|c| c.len() > 1 || graph.contains_edge(c[0], c[0]))
                .expect("a cyclic graph has a cycle");
            let members: BTreeSet<usize> = cycle.iter().map(|n| graph[*n]).collect();
            let path = walk_cycle(p, &members);
            return Err(ConfigError(format!(
                "{}: stages form a cycle: {}\n  an input must name a stage that does not depend on this one",
                p.stages[path[0]].location,
                path.iter().map(|&i| p.stages[i].name.as_str()).chain([p.stages[path[0]].name.as_str()]).collect::<Vec<_>>().join(" → ")
            )));
        }
        // Kahn's algorithm with ties broken by file order: a stable, readable order.
        let mut indegree: Vec<usize> = nodes.iter().map(|&n| graph.neighbors_directed(n, Direction::Incoming).count()).collect();
        let mut ready: BTreeSet<usize> = (0..nodes.len()).filter(|&i| indegree[i] == 0).collect();
        let mut order = Vec::with_capacity(nodes.len());
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for down in graph.neighbors_directed(nodes[i], Direction::Outgoing) {
                let d = graph[down];
                indegree[d] -= 1;
                if indegree[d] == 0 {
                    ready.insert(d);
                }
            }
        }
        Ok(Dag { graph, order })
    }

    /// Direct upstream stages of `i`.
    pub fn upstream(&self, i: usize) -> Vec<usize> {
        self.graph.neighbors_directed(NodeIndex::new(i), Direction::Incoming).map(|n| self.graph[n]).collect()
    }

    /// `targets` and everything they need, in dependency order. No targets
    /// means the whole pipeline.
    pub fn closure(&self, targets: &[usize]) -> Vec<usize> {
        if targets.is_empty() {
            return self.order.clone();
        }
        let mut keep = BTreeSet::new();
        let mut stack: Vec<usize> = targets.to_vec();
        while let Some(i) = stack.pop() {
            if keep.insert(i) {
                stack.extend(self.upstream(i));
            }
        }
        self.order.iter().copied().filter(|i| keep.contains(i)).collect()
    }

    pub fn render(&self, p: &Pipeline, format: Format) -> String {
        let mut out = String::new();
        let edges = || {
            self.order.iter().flat_map(move |&i| {
                let mut ups = self.upstream(i);
                ups.sort();
                ups.into_iter().map(move |u| (u, i))
            })
        };
        match format {
            Format::Text => {
                for &i in &self.order {
                    let s = &p.stages[i];
                    let ins: Vec<String> = s.inputs.iter().map(|(slot, up)| format!("{slot}={up}")).collect();
                    if ins.is_empty() {
                        let _ = writeln!(out, "{} ({})", s.name, s.kind.kind);
                    } else {
                        let _ = writeln!(out, "{} ({}) ← {}", s.name, s.kind.kind, ins.join(", "));
                    }
                }
            }
            Format::Dot => {
                let _ = writeln!(out, "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];", p.name);
                for &i in &self.order {
                    let s = &p.stages[i];
                    let _ = writeln!(out, "  \"{}\" [label=\"{}\\n({})\"];", s.name, s.name, s.kind.kind);
                }
                for (u, d) in edges() {
                    let _ = writeln!(out, "  \"{}\" -> \"{}\";", p.stages[u].name, p.stages[d].name);
                }
                out.push_str("}\n");
            }
            Format::Mermaid => {
                out.push_str("flowchart LR\n");
                for &i in &self.order {
                    let s = &p.stages[i];
                    let _ = writeln!(out, "  {}[\"{}<br/>({})\"]", s.name, s.name, s.kind.kind);
                }
                for (u, d) in edges() {
                    let _ = writeln!(out, "  {} --> {}", p.stages[u].name, p.stages[d].name);
                }
            }
        }
        out
    }
}

/// Orders the members of a strongly connected component along its edges so
/// the message reads as a path: a → b → c → a.
fn walk_cycle(p: &Pipeline, members: &BTreeSet<usize>) -> Vec<usize> {
    let start = *members.first().expect("non-empty");
    let mut path = vec![start];
    let mut seen = BTreeSet::from([start]);
    let mut at = start;
    loop {
        // Follow an edge to a downstream member: a stage whose input is `at`.
        let next = members
            .iter()
            .copied()
            .find(|&m| p.stages[m].inputs.values().any(|up| *up == p.stages[at].name) && (!seen.contains(&m) || m == start));
        match next {
            Some(m) if m == start => return path,
            Some(m) => {
                path.push(m);
                seen.insert(m);
                at = m;
            }
            None => return path,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Dot,
    Mermaid,
}

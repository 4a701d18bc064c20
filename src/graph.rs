//! The stage graph: edges from input references, cycle detection, ordering,
//! target selection and rendering (`llmflow dag`).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;

use crate::config::Pipeline;

/// Stages as indices into `Pipeline::stages`.
pub struct Dag {
    /// Each stage's direct upstream stages.
    upstream: Vec<Vec<usize>>,
    /// Stage indices in a dependency order (inputs first), ties in file order.
    pub order: Vec<usize>,
}

impl Dag {
    /// The graph of a loaded pipeline, which has no cycles (loading rejects them).
    pub fn new(p: &Pipeline) -> Dag {
        let upstream: Vec<Vec<usize>> = p
            .stages
            .iter()
            .map(|s| {
                let ups: BTreeSet<usize> = s.inputs.values().map(|up| p.index(up).expect("checked reference")).collect();
                ups.into_iter().collect()
            })
            .collect();
        let order = toposort(&upstream).expect("loading rejects cycles");
        Dag { upstream, order }
    }

    /// Direct upstream stages of `i`.
    pub fn upstream(&self, i: usize) -> &[usize] {
        &self.upstream[i]
    }

    /// `targets` and everything they need, in dependency order. No targets
    /// means the whole pipeline.
    pub fn closure(&self, targets: &[usize]) -> Vec<usize> {
        if targets.is_empty() {
            return self.order.clone();
        }
        let mut keep = vec![false; self.upstream.len()];
        let mut stack: Vec<usize> = targets.to_vec();
        while let Some(i) = stack.pop() {
            if !keep[i] {
                keep[i] = true;
                stack.extend(self.upstream(i));
            }
        }
        self.order.iter().copied().filter(|&i| keep[i]).collect()
    }

    /// Stages grouped by the table they come from (a swept stage's
    /// variants together), groups in dependency order.
    pub fn groups(&self, p: &Pipeline) -> Vec<Vec<usize>> {
        let mut at: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for &i in &self.order {
            let g = *at.entry(p.stages[i].base.as_str()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        groups
    }

    pub fn render(&self, p: &Pipeline, format: Format) -> String {
        let mut out = String::new();
        let edges = || self.order.iter().flat_map(move |&i| self.upstream(i).iter().map(move |&u| (u, i)));
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
        for group in self.groups(p) {
            let first = &p.stages[group[0]];
            let swept = !first.labels.is_empty();
            match format {
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
                        let _ =
                            writeln!(out, "  subgraph \"cluster_{}\" {{\n    label=\"{} ({})\";", first.base, first.base, first.kind.kind);
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
            Format::Text => {}
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
}

/// Nodes `0..n` (given each one's upstream nodes) in an order where every
/// node follows its upstream ones, ties broken by index (Kahn's algorithm);
/// or, if there is a cycle, one cycle as a path `a → b → …` (back to `a`)
/// starting at its smallest node.
pub fn toposort(upstream: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = upstream.len();
    let mut downstream = vec![Vec::new(); n];
    for (i, ups) in upstream.iter().enumerate() {
        for &u in ups {
            downstream[u].push(i);
        }
    }
    let mut indegree: Vec<usize> = upstream.iter().map(Vec::len).collect();
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &d in &downstream[i] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.insert(d);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Every node left waits on another node left: walking upstream must
    // come back to a node already seen, which closes a cycle.
    let mut at = (0..n).find(|&i| indegree[i] > 0).expect("a node is left");
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let mut walk = Vec::new();
    while !seen.contains_key(&at) {
        seen.insert(at, walk.len());
        walk.push(at);
        at = *upstream[at].iter().find(|&&u| indegree[u] > 0).expect("a node left has an upstream node left");
    }
    let mut cycle: Vec<usize> = walk[seen[&at]..].iter().rev().copied().collect();
    let first = cycle.iter().enumerate().min_by_key(|(_, &v)| v).map(|(k, _)| k).unwrap_or(0);
    cycle.rotate_left(first);
    Err(cycle)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Dot,
    Mermaid,
}

#[cfg(test)]
mod tests {
    use super::toposort;

    #[test]
    fn toposort_breaks_ties_by_index_and_names_a_cycle() {
        // 0 ← 2, 1 ← 0, 3 alone: 2 and 3 are ready first, the smaller goes first.
        assert_eq!(toposort(&[vec![2], vec![0], vec![], vec![]]), Ok(vec![2, 0, 1, 3]));
        // 0 → 1 → 2 → 0 (each reads the one before), and 3 reads the cycle.
        assert_eq!(toposort(&[vec![2], vec![0], vec![1], vec![2]]), Err(vec![0, 1, 2]));
        assert_eq!(toposort(&[vec![0]]), Err(vec![0]), "a stage reading itself");
    }
}

//! The stage graph as numbers: stages are indices, edges their inputs.
//! Ordering, cycle detection and target closure; what the stages are called
//! is the pipeline's business (`config`).

use std::collections::{BTreeSet, HashMap};

/// Stages as indices into `Pipeline::stages`.
pub struct Dag {
    /// Each stage's direct upstream stages.
    upstream: Vec<Vec<usize>>,
    /// Stage indices in a dependency order (inputs first), ties in file order.
    pub order: Vec<usize>,
}

impl Dag {
    /// The graph of stages given each one's upstream stages, which must
    /// form no cycle (loading a pipeline rejects them).
    pub fn new(upstream: Vec<Vec<usize>>) -> Dag {
        let upstream: Vec<Vec<usize>> =
            upstream.into_iter().map(|ups| ups.into_iter().collect::<BTreeSet<_>>().into_iter().collect()).collect();
        let order = toposort(&upstream).expect("no cycles");
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

//! A training stage's rows across its ranks, the one way kinds split work
//! among them (no kind reaches [`crate::dist`] itself; `layers.rs` checks).
//!
//! Every rank reads the whole batch (and the whole held-out set) and works
//! on its consecutive slice of rows, equal slices in rank order, as one
//! process would split them ([`rows`]). What the ranks compute for their
//! rows is then added up ([`sum`], [`rows_of`]) or made whole on every rank
//! ([`merge`], [`merge_lists`]), so every rank holds the single process's
//! numbers. A training loss is weighted by the rank's [`share`] of the batch,
//! so the ranks' gradients add up to the batch's.

use anyhow::Result;
use tch::Tensor;

use crate::dist;

/// Whether this rank writes what the stage publishes and logs.
pub fn is_first() -> bool {
    dist::world().is_first()
}

/// The ranks training together (1 in a single process).
pub fn size() -> usize {
    dist::world().size
}

/// This rank's rows `[start, end)` of a batch of `rows`.
pub fn rows(rows: usize) -> (usize, usize) {
    dist::world().rows(rows)
}

/// This rank's [`rows`] of a batch's `items`, and its share of the batch by
/// `weight`: an item's 1 where the loss is a mean over items, its counted
/// tokens where it is a mean over tokens.
pub fn share<T>(items: Vec<T>, weight: impl Fn(&T) -> f64) -> (Vec<T>, f64) {
    dist::world().share(items, weight)
}

/// This rank's items when whole batches, not rows, are shared out (one in
/// every [`size`], from its rank on).
pub fn interleaved<T>(items: &[T]) -> impl Iterator<Item = &T> {
    let world = dist::world();
    items.iter().skip(world.rank).step_by(world.size)
}

/// The `width` values of each of `n` rows, each rank computing its [`rows`]
/// with `of(start..end)`: every rank gets all of them.
pub fn rows_of(n: usize, width: usize, of: impl FnOnce(std::ops::Range<usize>) -> Result<Vec<f64>>) -> Result<Vec<f64>> {
    dist::world().rows_of(n, width, of)
}

/// The sum of `values` over the ranks.
pub fn sum(values: &[f64]) -> Result<Vec<f64>> {
    dist::world().sum(values)
}

/// Makes whole on every rank a tensor whose rows each rank filled for
/// itself, leaving zeros in the others'.
pub fn merge(t: &Tensor) -> Result<()> {
    dist::world().merge(t)
}

/// [`merge`] for token lists: each rank filled its own and left the others'
/// empty.
pub fn merge_lists(lists: Vec<Vec<i64>>) -> Result<Vec<Vec<i64>>> {
    dist::world().merge_lists(lists)
}

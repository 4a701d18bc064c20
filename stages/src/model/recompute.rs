//! Activation checkpointing (see the module docs of [`crate::model`]):
//! a backward pass that keeps only each block's input and recomputes the
//! block, with its graph, on the way back.

use tch::Tensor;

use super::Gpt;
use crate::fast::backward_from;

impl Gpt {
    /// [`Gpt::backward`] with `checkpoint_activations`.
    pub(super) fn backward_checkpointed(&self, idx: &Tensor, train: bool, loss_fn: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        let seeds = self.dropout_seeds(train);
        let embedded = self.embed(idx, 0, train);
        // Forward without a graph, keeping each block's input: [B, T, C] × n_layer.
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut x = embedded.detach();
        tch::no_grad(|| {
            for (block, seed) in self.blocks.iter().zip(&seeds) {
                let y = self.run_block(block, &x, *seed, train);
                inputs.push(std::mem::replace(&mut x, y));
            }
        });
        // The head, with its graph, gives the gradient at the last block's output.
        let x = x.set_requires_grad(true);
        let loss = loss_fn(&self.norm_f.forward(&x));
        loss.backward();
        let mut grad = x.grad();
        // Each block again, last to first: recompute with a graph, backpropagate
        // the gradient at its output, pass on the gradient at its input.
        for ((block, seed), input) in self.blocks.iter().zip(&seeds).zip(inputs).rev() {
            let input = input.set_requires_grad(true);
            backward_from(&self.run_block(block, &input, *seed, train), &grad);
            grad = input.grad();
        }
        backward_from(&embedded, &grad);
        loss.detach()
    }
}

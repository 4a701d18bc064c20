//! The output head and the cross-entropy of language modelling, forward and
//! backward in one step on the CPU in fp32, by hand rather than by autograd
//! through logits, log-softmax and NLL: that passes over the [N, V] logits
//! fewer times and skips the head at ignored positions.

use tch::{Device, Kind, Tensor};

use super::backward_from;

/// Whether [`backward`] applies to a model whose output head is `weight`.
pub fn applies(weight: &Tensor) -> bool {
    weight.device() == Device::Cpu && weight.kind() == Kind::Float
}

/// `scale` × the mean cross-entropy of the head `weight` [V, C] on `hidden`
/// [B, T, C] against `targets` [B, T] (positions equal to `ignore_index`
/// take no part); gradients accumulated into whatever `hidden` came from and
/// into `weight`. Returns the loss, NaN (and no gradient) when no position
/// counts, as `cross_entropy` gives.
pub fn backward(hidden: &Tensor, weight: &Tensor, targets: &Tensor, ignore_index: i64, scale: f64) -> Tensor {
    let Some(head) = tch::no_grad(|| head_loss(hidden, weight, targets, ignore_index, scale)) else {
        return Tensor::from(f32::NAN);
    };
    backward_from(hidden, &head.d_hidden);
    if weight.requires_grad() {
        let mut grad = weight.grad();
        if grad.defined() {
            // Tied to the embedding, whose backward pass defined it.
            let _ = tch::no_grad(|| grad.g_add_(&head.d_weight));
        } else {
            backward_from(weight, &head.d_weight);
        }
    }
    head.loss
}

/// What [`head_loss`] computes.
struct HeadLoss {
    /// scale · the mean cross-entropy, an f64 scalar.
    loss: Tensor,
    /// Its gradient with respect to the hidden states, [B, T, C].
    d_hidden: Tensor,
    /// Its gradient with respect to the head, [V, C].
    d_weight: Tensor,
}

/// The output head W [V, C] and the cross-entropy on hidden states h
/// [B, T, C], with their gradients, without autograd. Over the N counted
/// positions i (target yᵢ ≠ `ignore_index`), with P = softmax(h·Wᵀ) [N, V]:
///
/// loss = −(scale/N) Σᵢ log Pᵢ,yᵢ
/// G = (scale/N) · (P − onehot(y))
/// d_hidden = G·W (0 at ignored positions), d_weight = Gᵀ·h
///
/// G is built in P's memory and the scale applied to the smaller operands,
/// so the logits are written once and read by the two products. (log Pᵢ,yᵢ
/// of a probability below f32's smallest normal, a loss above 87 nats,
/// counts as that smallest normal's log.) h·Wᵀ and G·W run on oneDNN,
/// faster than MKL for them on the CPU (see `onednn`); Gᵀ·h stays with MKL,
/// which is faster for it. `None` when no position counts.
fn head_loss(hidden: &Tensor, weight: &Tensor, targets: &Tensor, ignore_index: i64, scale: f64) -> Option<HeadLoss> {
    let c = hidden.size()[2];
    let h = hidden.detach().reshape([-1, c]); // [N_all, C]
    let y = targets.reshape([-1]); // [N_all]
    let counted = y.ne(ignore_index).nonzero().squeeze_dim(1); // [N]
    let n = counted.size()[0];
    if n == 0 {
        return None;
    }
    let every = n == y.size()[0];
    let (h, y_counted) = if every { (h, y) } else { (h.index_select(0, &counted), y.index_select(0, &counted)) };
    let y_counted = y_counted.unsqueeze(1); // [N, 1]
    let s = scale / n as f64;
    let mut g = super::onednn::mm_t(&h, weight).softmax(-1, Kind::Float); // P [N, V]

    // The logs by hand, in f64: libtorch's `log` on the CPU can return less
    // accurate values on its first call in a process when two threads (the
    // replicas') make that call at once, and the logged loss would differ
    // from run to run.
    let picked = Vec::<f32>::try_from(g.gather(1, &y_counted, false).reshape([-1])).expect("f32 probabilities");
    let nats: f64 = picked.iter().map(|&p| f64::from(p.max(f32::MIN_POSITIVE)).ln()).sum();
    let loss = Tensor::from(-s * nats);
    let minus_one = Tensor::full([n, 1], -1.0, (Kind::Float, g.device()));
    let _ = g.scatter_add_(1, &y_counted, &minus_one); // P − onehot
    let d_counted = super::onednn::mm_t(&g, &weight.tr()) * s; // [N, C]
    let d_weight = g.tr().mm(&(&h * s)); // [V, C]
    let d_hidden = if every { d_counted } else { hidden.zeros_like().reshape([-1, c]).index_copy(0, &counted, &d_counted) };
    Some(HeadLoss { loss, d_hidden: d_hidden.view_as(hidden), d_weight })
}

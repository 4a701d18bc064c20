//! LoRA (Hu et al. 2021), the one addition to the model's maths: see the
//! module docs of [`crate::model`].

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::{Block, Gpt, Layout, Linear, Mlp, Qkv};
use crate::ParamError;

/// Low-rank adapters for fine-tuning (see the module docs), as written in
/// `pipeline.toml`: `trainable = { lora = { rank = 8, alpha = 16, dropout = 0.05, targets = ["q", "v"] } }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Lora {
    /// r, the adapters' inner dimension.
    #[schemars(range(min = 1, max = 65_536))]
    pub rank: i64,
    /// α: the update is scaled by α/r, so changing r keeps its size.
    #[schemars(range(max = 65_536), extend("exclusiveMinimum" = 0))]
    pub alpha: f64,
    /// Dropout on the adapters' input while training.
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 1))]
    pub dropout: f64,
    /// The projections to adapt in every block: `q`, `k`, `v`, `o`, `gate`
    /// (Llama only), `up`, `down`.
    pub targets: Vec<String>,
}

impl Default for Lora {
    fn default() -> Self {
        Lora { rank: 8, alpha: 16.0, dropout: 0.05, targets: vec!["q".into(), "v".into()] }
    }
}

impl Lora {
    pub const TARGETS: [&'static str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

    /// Checks the target names (the numbers have bounds in the schema);
    /// errors name fields under `table` (e.g. `lora`).
    pub fn check(&self, table: &[&str]) -> Result<(), ParamError> {
        let err = |field: &str, message: String| Err(ParamError::new(&[table, &[field]].concat(), message));
        if self.targets.is_empty() {
            return err("targets", format!("name at least one projection to adapt: {:?}", Self::TARGETS));
        }
        if let Some(t) = self.targets.iter().find(|t| !Self::TARGETS.contains(&t.as_str())) {
            return err("targets", format!("unknown target `{t}`; the projections are {:?}", Self::TARGETS));
        }
        Ok(())
    }

    fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One low-rank update of a [`Linear`], `(α/r)·dropout(x)·Aᵀ·Bᵀ`, added to
/// the output columns `cols` (all of them but for GPT-2's fused q, k, v).
pub(super) struct Adapter {
    a: Tensor, // [r, in]
    b: Tensor, // [cols.len(), r]
    scale: f64,
    dropout: f64,
    cols: std::ops::Range<i64>,
}

impl Adapter {
    /// The update of a layer's output [.., d_out] for its input x [.., d_in]:
    /// zero outside the adapted columns.
    pub(super) fn forward(&self, x: &Tensor, d_out: i64, train: bool) -> Tensor {
        let update = x.dropout(self.dropout, train).linear::<Tensor>(&self.a, None).linear::<Tensor>(&self.b, None) * self.scale;
        update.constant_pad_nd([self.cols.start, d_out - self.cols.end])
    }
}

impl Linear {
    /// Adds an adapter for `target` on output columns `cols` (all if
    /// `None`), its variables under `root` in the layer's name.
    fn add_adapter(&mut self, root: &nn::Path, target: &str, lora: &Lora, cols: Option<std::ops::Range<i64>>) {
        let (d_in, d_out) = self.dims();
        let cols = cols.unwrap_or(0..d_out);
        let p = self.name.split('.').fold(root.clone(), |p, c| p / c) / format!("lora_{target}");
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = p.var_copy("A", &((Tensor::rand([lora.rank, d_in], (Kind::Float, Device::Cpu)) * 2.0 - 1.0) * bound));
        let b = p.zeros("B", &[cols.end - cols.start, lora.rank]);
        self.adapters.push(Adapter { a, b, scale: lora.scale(), dropout: lora.dropout, cols });
    }

    /// Adds each adapter's (α/r)·B·A into the weight and drops the adapters.
    fn merge(&mut self) {
        tch::no_grad(|| {
            for a in self.adapters.drain(..) {
                let update = a.b.matmul(&a.a) * a.scale; // [cols, in]
                let (dim, update) = match self.layout {
                    Layout::OutIn => (0, update),
                    Layout::InOut => (1, update.tr()),
                };
                let mut block = self.weight.narrow(dim, a.cols.start, a.cols.end - a.cols.start);
                let _ = block.g_add_(&update.to_device(block.device()).to_kind(block.kind()));
            }
        });
    }
}

impl Block {
    /// The projection a LoRA target names (see the module docs), with the
    /// output columns it owns when it shares a layer; `None` if this arch has
    /// no such projection.
    fn lora_target(&mut self, target: &str) -> Option<(&mut Linear, Option<std::ops::Range<i64>>)> {
        let attn = &mut self.attn;
        let c = attn.n_head * attn.head_dim;
        let index = ["q", "k", "v"].iter().position(|t| *t == target);
        Some(match (&mut attn.qkv, &mut self.mlp, target) {
            (Qkv::Fused(c_attn), _, _) if index.is_some() => {
                let i = index.expect("checked") as i64;
                (c_attn, Some(i * c..(i + 1) * c))
            }
            (Qkv::Separate { q_proj, .. }, _, "q") => (q_proj, None),
            (Qkv::Separate { k_proj, .. }, _, "k") => (k_proj, None),
            (Qkv::Separate { v_proj, .. }, _, "v") => (v_proj, None),
            (_, _, "o") => (&mut attn.out_proj, None),
            (_, Mlp::Gelu { c_fc, .. }, "up") | (_, Mlp::SwiGlu { up_proj: c_fc, .. }, "up") => (c_fc, None),
            (_, Mlp::Gelu { c_proj, .. }, "down") | (_, Mlp::SwiGlu { down_proj: c_proj, .. }, "down") => (c_proj, None),
            (_, Mlp::SwiGlu { gate_proj, .. }, "gate") => (gate_proj, None),
            _ => return None,
        })
    }
}

impl Gpt {
    /// Adds LoRA adapters to `lora.targets` in every block, their variables
    /// under `root` (a VarStore of their own, see the module docs). Their
    /// initial values are drawn from libtorch's generator on the CPU.
    pub fn add_lora(&mut self, root: &nn::Path, lora: &Lora) -> Result<()> {
        lora.check(&["lora"]).map_err(|e| anyhow::Error::msg(e.message))?;
        let arch = self.config.arch;
        for block in &mut self.blocks {
            for target in &lora.targets {
                let Some((linear, cols)) = block.lora_target(target) else {
                    bail!("arch {arch:?} has no `{target}` projection to adapt (GPT-2 has no `gate`)");
                };
                linear.add_adapter(root, target, lora, cols);
            }
        }
        Ok(())
    }

    /// Adds every adapter's update into the base weights and drops the
    /// adapters: the model computes what it did, as a plain model.
    pub fn merge_lora(&mut self) {
        for block in &mut self.blocks {
            for target in Lora::TARGETS {
                if let Some((linear, _)) = block.lora_target(target) {
                    linear.merge();
                }
            }
        }
    }
}

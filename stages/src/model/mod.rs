//! The language model: a decoder-only transformer in two flavours.
//!
//! * `arch = "gpt2"`: token and learned position embeddings, pre-LayerNorm
//!   blocks, multi-head causal self-attention, a GeLU MLP, a final LayerNorm
//!   and an output head tied to the token embedding (Radford et al. 2019, as in
//!   nanoGPT).
//! * `arch = "llama"`: RMSNorm, rotary position embeddings, a SwiGLU MLP and
//!   grouped-query attention (`n_kv_head` key/value heads shared by `n_head`
//!   query heads), output head untied unless asked (Touvron et al. 2023).
//!
//! Read top to bottom: [`ModelConfig`], then the layers (`Linear`, `Norm`,
//! `Rope`, `SelfAttention`, `Mlp`, `Block`) and [`Gpt`], which puts them
//! together, runs them (plain, with a KV cache, or with activation
//! checkpointing) and computes the loss.
//!
//! # Parameters and their names
//!
//! The parameters live in a `tch::nn::VarStore` under the names *and layouts*
//! of the Hugging Face state dicts, so `vs.save("model.safetensors")` writes a
//! file that `GPT2LMHeadModel` / `LlamaForCausalLM` load as is (given a
//! matching `config.json`), and `vs.load` reads it back into a [`Gpt`] built
//! with the same config. `C` = `d_model`, `F` = `ffn_hidden`, `V` =
//! `vocab_size`, `kv` = `n_kv_head · head_dim`; shapes as stored:
//!
//! | GPT-2 (`transformer.` prefix)        | shape       | Llama (`model.` prefix)                    | shape     |
//! |--------------------------------------|-------------|--------------------------------------------|-----------|
//! | `wte.weight`                         | [V, C]      | `embed_tokens.weight`                      | [V, C]    |
//! | `wpe.weight`                         | [context, C]|                                            |           |
//! | `h.{i}.ln_1.{weight,bias}`           | [C]         | `layers.{i}.input_layernorm.weight`        | [C]       |
//! | `h.{i}.attn.c_attn.{weight,bias}`    | [C, 3C], [3C] | `layers.{i}.self_attn.q_proj.weight`     | [C, C]    |
//! |                                      |             | `layers.{i}.self_attn.{k,v}_proj.weight`   | [kv, C]   |
//! | `h.{i}.attn.c_proj.{weight,bias}`    | [C, C], [C] | `layers.{i}.self_attn.o_proj.weight`       | [C, C]    |
//! | `h.{i}.ln_2.{weight,bias}`           | [C]         | `layers.{i}.post_attention_layernorm.weight` | [C]     |
//! | `h.{i}.mlp.c_fc.{weight,bias}`       | [C, F], [F] | `layers.{i}.mlp.{gate,up}_proj.weight`     | [F, C]    |
//! | `h.{i}.mlp.c_proj.{weight,bias}`     | [F, C], [C] | `layers.{i}.mlp.down_proj.weight`          | [C, F]    |
//! | `ln_f.{weight,bias}`                 | [C]         | `norm.weight`                              | [C]       |
//! | `lm_head.weight` (no prefix; only if untied) | [V, C] | `lm_head.weight` (no prefix; only if untied) | [V, C] |
//!
//! GPT-2 keeps q, k and v fused in `c_attn` (split in that order along the
//! output dimension) and stores its dense weights as HF's `Conv1D` does,
//! `[in, out]` (`y = x·W + b`), the transpose of torch's `nn.Linear`; Llama
//! stores `nn.Linear`'s `[out, in]`. Keeping each family's own layout is what
//! makes the checkpoint an HF state dict without conversion. A tied head has
//! no variable of its own: it is the token embedding. `bias = false` drops
//! the GPT-2 biases of the dense layers and LayerNorms (HF fills missing ones
//! with zeros, their initial value); for Llama `bias = true` adds biases to
//! every projection, HF's `attention_bias` and `mlp_bias`.
//!
//! Rotary embeddings follow HF's `rotate_half` convention (each head's
//! dimensions split in two halves, not interleaved pairs), so q/k weights need
//! no permutation on export. GPT-2's MLP uses the tanh GeLU (`gelu_new`).
//!
//! # Initialization
//!
//! As nanoGPT: dense weights and embeddings N(0, 0.02²), biases 0, norm gains
//! 1; the projections that write into the residual stream (`c_proj`,
//! `o_proj`, `down_proj`) N(0, (0.02/√(2·n_layer))²) so its variance does not
//! grow with depth. Weights are drawn on the CPU from libtorch's global
//! generator in a fixed order, so `tch::manual_seed(seed)` before [`Gpt::new`]
//! gives the same model on every device.
//!
//! # Activation checkpointing
//!
//! With `checkpoint_activations`, [`Gpt::backward`] keeps only each block's
//! input during the forward pass (run without an autograd graph) and
//! recomputes each block, with its graph, during a backward pass it drives
//! block by block from the last to the first. tch exposes neither custom
//! autograd functions nor gradient hooks, so the recompute cannot hide behind
//! `loss.backward()`: it only happens through [`Gpt::backward`], and a plain
//! [`Gpt::forward`] followed by `loss.backward()` keeps every activation.
//! Dropout masks are reproduced on recompute by reseeding libtorch's
//! generator before each block with a seed drawn per block; the plain path
//! draws and uses the same seeds, so turning checkpointing on or off does not
//! change the gradients.
//!
//! # LoRA
//!
//! Low-rank adapters (Hu et al. 2021) are the one addition to the math above:
//! [`Gpt::add_lora`] gives each targeted projection `W` a pair A [r, in],
//! B [out, r], so that it computes `x·W + b + (α/r)·dropout(x)·Aᵀ·Bᵀ`. A
//! starts uniform in ±1/√in (PEFT's Kaiming init), B at zero, so a model with
//! fresh adapters computes what it did without them. The adapters live in a
//! VarStore of their own (names: the layer's, then `lora_{target}.A` / `.B`),
//! which is what a fine-tuning stage trains while the base stays frozen;
//! [`Gpt::merge_lora`] then adds (α/r)·B·A into the base weights, in each
//! weight's layout, and drops the adapters, leaving a plain model.
//!
//! [`Lora::targets`] name projections the same way for both families; GPT-2
//! keeps q, k and v fused in `c_attn`, so each of them adapts its own third of
//! `c_attn`'s output columns:
//!
//! | target | GPT-2                   | Llama            |
//! |--------|-------------------------|------------------|
//! | `q`, `k`, `v` | `attn.c_attn`, columns [0, C), [C, 2C), [2C, 3C) | `self_attn.{q,k,v}_proj` |
//! | `o`    | `attn.c_proj`           | `self_attn.o_proj` |
//! | `gate` | —                       | `mlp.gate_proj`  |
//! | `up`   | `mlp.c_fc`              | `mlp.up_proj`    |
//! | `down` | `mlp.c_proj`            | `mlp.down_proj`  |

use anyhow::{ensure, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use self::lora::Adapter;
use tch::{nn, Device, Kind, Reduction, Tensor};

mod lora;
mod recompute;

pub use lora::Lora;

/// Targets equal to this take no part in the loss (prompt tokens in SFT,
/// padding), as in PyTorch's `cross_entropy`.
pub const IGNORE_INDEX: i64 = -100;

/// Standard deviation of the initial weights.
const INIT_STD: f64 = 0.02;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Gpt2,
    Llama,
}

/// How attention weights are computed; both give the same result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// libtorch's `scaled_dot_product_attention` (flash/memory-efficient
    /// kernels on GPU).
    Sdpa,
    /// Scores, mask, softmax and weighted sum written out.
    Explicit,
}

/// The model's shape and options, as written in `pipeline.toml`.
///
/// Fields whose default depends on `arch` are resolved when deserializing, so
/// the serialized form (what the engine hashes) is the same whether a default
/// is written out or not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "ModelConfigToml")]
pub struct ModelConfig {
    /// `gpt2` or `llama` (see the module docs).
    pub arch: Arch,
    /// 0 until the tokenizer's vocabulary size is filled in by the stage that
    /// builds the model.
    pub vocab_size: i64,
    /// Transformer blocks.
    pub n_layer: i64,
    /// Attention heads per block.
    pub n_head: i64,
    /// Key/value heads (Llama's grouped-query attention); `n_head` by default
    /// and always for GPT-2.
    pub n_kv_head: i64,
    /// Width of the residual stream (C).
    pub d_model: i64,
    /// The longest sequence the model reads (positions 0..context).
    pub context: i64,
    /// Dropout on embeddings, attention weights and residual branches while training.
    pub dropout: f64,
    /// Biases in dense layers (and GPT-2's LayerNorms); GPT-2 true, Llama false.
    pub bias: bool,
    /// Output head shares the token embedding; GPT-2 true, Llama false.
    pub tie_embeddings: bool,
    /// Rotary embedding base (Llama only).
    pub rope_theta: f64,
    /// GPT-2 1e-5 (`layer_norm_epsilon`), Llama 1e-6 (`rms_norm_eps`).
    pub norm_eps: f64,
    /// MLP width: GPT-2 4·d_model; Llama 8/3·d_model rounded up to a multiple
    /// of 64 (SwiGLU's three matrices then cost what GPT-2's two do).
    pub ffn_hidden: i64,
    /// `sdpa` (libtorch's fused kernels) or `explicit`; both give the same result.
    pub attention: Attention,
    /// Recompute each block in the backward pass instead of storing its
    /// activations; see the module docs.
    pub checkpoint_activations: bool,
}

/// [`ModelConfig`] as users write it: `None` takes the arch's default. It is
/// also [`ModelConfig`]'s schema (schemars follows `try_from`), so the bounds
/// of the model params are here.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
struct ModelConfigToml {
    /// `gpt2` or `llama` (see the module docs).
    arch: Arch,
    /// 0 takes the tokenizer's vocabulary size.
    #[schemars(range(min = 0, max = 10_000_000))]
    vocab_size: i64,
    /// Transformer blocks.
    #[schemars(range(min = 1, max = 1024))]
    n_layer: i64,
    /// Attention heads per block.
    #[schemars(range(min = 1, max = 1024))]
    n_head: i64,
    /// Key/value heads (Llama's grouped-query attention); `n_head` if unset, and always for GPT-2.
    #[schemars(range(min = 1, max = 1024))]
    n_kv_head: Option<i64>,
    /// Width of the residual stream (C).
    #[schemars(range(min = 1, max = 65_536))]
    d_model: i64,
    /// The longest sequence the model reads.
    #[schemars(range(min = 1, max = 1_048_576))]
    context: i64,
    /// Dropout on embeddings, attention weights and residual branches while training.
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 1))]
    dropout: f64,
    /// Biases in dense layers (and GPT-2's LayerNorms); GPT-2 true, Llama false if unset.
    bias: Option<bool>,
    /// The output head shares the token embedding; GPT-2 true, Llama false if unset.
    tie_embeddings: Option<bool>,
    /// Rotary embedding base (Llama only).
    #[schemars(range(max = 1_000_000_000), extend("exclusiveMinimum" = 0))]
    rope_theta: f64,
    /// Norm epsilon; GPT-2 1e-5, Llama 1e-6 if unset.
    #[schemars(range(max = 1), extend("exclusiveMinimum" = 0))]
    norm_eps: Option<f64>,
    /// MLP width; GPT-2 4·d_model, Llama 8/3·d_model rounded up to 64 if unset.
    #[schemars(range(min = 1, max = 1_048_576))]
    ffn_hidden: Option<i64>,
    /// `sdpa` (libtorch's fused kernels) or `explicit`; both give the same result.
    attention: Attention,
    /// Recompute each block in the backward pass instead of storing its activations.
    checkpoint_activations: bool,
}

impl Default for ModelConfigToml {
    fn default() -> Self {
        ModelConfigToml {
            arch: Arch::Gpt2,
            vocab_size: 0,
            n_layer: 4,
            n_head: 4,
            n_kv_head: None,
            d_model: 128,
            context: 128,
            dropout: 0.0,
            bias: None,
            tie_embeddings: None,
            rope_theta: 10000.0,
            norm_eps: None,
            ffn_hidden: None,
            attention: Attention::Sdpa,
            checkpoint_activations: false,
        }
    }
}

impl TryFrom<ModelConfigToml> for ModelConfig {
    type Error = String;

    fn try_from(t: ModelConfigToml) -> Result<Self, String> {
        let gpt2 = t.arch == Arch::Gpt2;
        let config = ModelConfig {
            arch: t.arch,
            vocab_size: t.vocab_size,
            n_layer: t.n_layer,
            n_head: t.n_head,
            n_kv_head: t.n_kv_head.unwrap_or(t.n_head),
            d_model: t.d_model,
            context: t.context,
            dropout: t.dropout,
            bias: t.bias.unwrap_or(gpt2),
            tie_embeddings: t.tie_embeddings.unwrap_or(gpt2),
            rope_theta: t.rope_theta,
            norm_eps: t.norm_eps.unwrap_or(if gpt2 { 1e-5 } else { 1e-6 }),
            ffn_hidden: t.ffn_hidden.unwrap_or(if gpt2 { 4 * t.d_model } else { (8 * t.d_model / 3 + 63) / 64 * 64 }),
            attention: t.attention,
            checkpoint_activations: t.checkpoint_activations,
        };
        config.check()?;
        Ok(config)
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfigToml::default().try_into().expect("the default config is valid")
    }
}

impl ModelConfig {
    /// Checks what types cannot: sizes, divisibility, ranges. A `vocab_size`
    /// of 0 passes (it is filled in later); [`Gpt::new`] rejects it.
    pub fn check(&self) -> Result<(), String> {
        let sizes = [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_kv_head", self.n_kv_head),
            ("d_model", self.d_model),
            ("context", self.context),
            ("ffn_hidden", self.ffn_hidden),
        ];
        for (name, value) in sizes {
            if value < 1 {
                return Err(format!("{name} must be at least 1, got {value}"));
            }
        }
        if self.vocab_size < 0 {
            return Err(format!("vocab_size must not be negative, got {}", self.vocab_size));
        }
        if self.d_model % self.n_head != 0 {
            return Err(format!("d_model ({}) must be a multiple of n_head ({})", self.d_model, self.n_head));
        }
        if self.n_head % self.n_kv_head != 0 {
            return Err(format!("n_head ({}) must be a multiple of n_kv_head ({})", self.n_head, self.n_kv_head));
        }
        match self.arch {
            Arch::Gpt2 if self.n_kv_head != self.n_head => {
                return Err("n_kv_head applies to arch = \"llama\"; GPT-2 has one key/value head per query head".into());
            }
            Arch::Llama if self.head_dim() % 2 != 0 => {
                return Err(format!("rotary embeddings need an even head size (d_model / n_head), got {}", self.head_dim()));
            }
            _ => {}
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if self.rope_theta <= 0.0 || self.norm_eps <= 0.0 {
            return Err("rope_theta and norm_eps must be positive".into());
        }
        Ok(())
    }

    pub fn head_dim(&self) -> i64 {
        self.d_model / self.n_head
    }

    /// Parameters of the model this config builds (what the VarStore holds),
    /// computed without building it.
    pub fn num_params(&self) -> i64 {
        let (c, f, v) = (self.d_model, self.ffn_hidden, self.vocab_size);
        let kv = self.n_kv_head * self.head_dim();
        let b = i64::from(self.bias);
        let (norm, attention, mlp, positions) = match self.arch {
            // LayerNorm: gain and bias; c_attn and c_proj; c_fc and c_proj.
            Arch::Gpt2 => (c * (1 + b), 4 * c * c + b * 4 * c, 2 * c * f + b * (f + c), self.context * c),
            // RMSNorm: gain; q, k, v, o; gate, up, down.
            Arch::Llama => (c, 2 * c * c + 2 * c * kv + b * (2 * c + 2 * kv), 3 * c * f + b * (2 * f + c), 0),
        };
        let head = if self.tie_embeddings { 0 } else { v * c };
        v * c + positions + self.n_layer * (2 * norm + attention + mlp) + norm + head
    }

    /// Training FLOPs per token, forward and backward: 6 per parameter that
    /// takes part in a matrix multiplication (not the embedding lookups;
    /// the head counts, tied or not) plus 12·n_layer·d_model·context for the
    /// attention scores and weighted sums (PaLM appendix B, as in nanoGPT).
    pub fn flops_per_token(&self) -> i64 {
        let lookups = match self.arch {
            Arch::Gpt2 => self.context * self.d_model,
            Arch::Llama => 0,
        } + if self.tie_embeddings { 0 } else { self.vocab_size * self.d_model };
        6 * (self.num_params() - lookups) + 12 * self.n_layer * self.d_model * self.context
    }
}

/// A trainable variable drawn from N(0, std²) on the CPU, so that a seed
/// gives the same weights whatever the VarStore's device.
fn normal(p: &nn::Path, name: &str, dims: &[i64], std: f64) -> Tensor {
    p.var_copy(name, &(Tensor::randn(dims, (Kind::Float, Device::Cpu)) * std))
}

/// How a dense layer stores its weight; each family keeps HF's layout.
#[derive(Clone, Copy)]
enum Layout {
    /// `[in, out]`, HF GPT-2's `Conv1D`.
    InOut,
    /// `[out, in]`, torch's `nn.Linear` (HF Llama).
    OutIn,
}

/// A dense layer, `y = x·W + b`, plus its LoRA adapters if any.
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    layout: Layout,
    /// The layer's path in the VarStore, naming its adapters.
    name: String,
    adapters: Vec<Adapter>,
}

impl Linear {
    fn new(p: &nn::Path, d_in: i64, d_out: i64, bias: bool, layout: Layout, std: f64) -> Linear {
        let dims = match layout {
            Layout::InOut => [d_in, d_out],
            Layout::OutIn => [d_out, d_in],
        };
        Linear {
            weight: normal(p, "weight", &dims, std),
            bias: bias.then(|| p.zeros("bias", &[d_out])),
            layout,
            name: p.components().collect::<Vec<_>>().join("."),
            adapters: Vec::new(),
        }
    }

    /// (d_in, d_out)
    fn dims(&self) -> (i64, i64) {
        let (rows, cols) = self.weight.size2().expect("a matrix");
        match self.layout {
            Layout::InOut => (rows, cols),
            Layout::OutIn => (cols, rows),
        }
    }

    /// [.., d_in] → [.., d_out]
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        // `linear` wants [out, in]; the transpose of [in, out] is a view.
        let weight = match self.layout {
            Layout::InOut => self.weight.tr(),
            Layout::OutIn => self.weight.shallow_clone(),
        };
        let y = x.linear(&weight, self.bias.as_ref());
        let d_out = self.dims().1;
        self.adapters.iter().fold(y, |y, a| y + a.forward(x, d_out, train))
    }
}

/// Normalization over the last dimension.
enum Norm {
    /// GPT-2: (x − mean) / √(var + eps) · weight + bias.
    Layer { weight: Tensor, bias: Option<Tensor>, eps: f64 },
    /// Llama: x / √(mean(x²) + eps) · weight.
    Rms { weight: Tensor, eps: f64 },
}

impl Norm {
    fn new(p: &nn::Path, config: &ModelConfig) -> Norm {
        let (weight, eps) = (p.ones("weight", &[config.d_model]), config.norm_eps);
        match config.arch {
            Arch::Gpt2 => Norm::Layer { weight, bias: config.bias.then(|| p.zeros("bias", &[config.d_model])), eps },
            Arch::Llama => Norm::Rms { weight, eps },
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Norm::Layer { weight, bias, eps } => x.layer_norm(weight.size(), Some(weight), bias.as_ref(), *eps, true),
            Norm::Rms { weight, eps } => x.rms_norm(weight.size(), Some(weight), *eps),
        }
    }
}

/// Rotary position embeddings: position m rotates each pair of dimensions
/// (i, i + head_dim/2) of q and k by m·θ^(−2i/head_dim), so q·k depends only
/// on the distance between positions.
struct Rope {
    cos: Tensor, // [context, head_dim]
    sin: Tensor, // [context, head_dim]
}

impl Rope {
    fn new(config: &ModelConfig, device: Device) -> Rope {
        let head_dim = config.head_dim();
        // Computed in fp32 the way transformers does, so exported logits agree.
        let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / head_dim as f64;
        let inv_freq = Tensor::pow_scalar(config.rope_theta, &exponents).reciprocal(); // [head_dim/2]
        let positions = Tensor::arange(config.context, (Kind::Float, Device::Cpu));
        let freqs = positions.outer(&inv_freq); // [context, head_dim/2]
        let angles = Tensor::cat(&[&freqs, &freqs], -1); // [context, head_dim]
        Rope { cos: angles.cos().to_device(device), sin: angles.sin().to_device(device) }
    }

    /// x: [B, heads, T, head_dim] at positions pos..pos+T.
    fn apply(&self, x: &Tensor, pos: i64) -> Tensor {
        let t = x.size()[2];
        let cos = self.cos.narrow(0, pos, t).to_kind(x.kind());
        let sin = self.sin.narrow(0, pos, t).to_kind(x.kind());
        x * cos + rotate_half(x) * sin
    }
}

/// (x1, x2) → (−x2, x1), on the two halves of the last dimension.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1)
}

/// Keys and values of one layer for the positions seen so far, both
/// [B, n_kv_head, T_past, head_dim].
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// Per-layer keys and values for generation: each step feeds only the new
/// tokens and attends to the cached ones.
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> i64 {
        self.layers[0].k.size()[2]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the rows `rows` (int64 [R], repeats allowed), in that order:
    /// [B, …] → [R, …]. One prompt's keys and values for several
    /// continuations.
    pub fn select_rows(&mut self, rows: &Tensor) {
        for layer in &mut self.layers {
            layer.k = layer.k.index_select(0, rows);
            layer.v = layer.v.index_select(0, rows);
        }
    }
}

/// The query, key and value projections.
enum Qkv {
    /// GPT-2's `c_attn`: [C] → [3C], q, k and v side by side.
    Fused(Linear),
    /// Llama: q [C] → [n_head·head_dim], k and v [C] → [n_kv_head·head_dim].
    Separate { q_proj: Linear, k_proj: Linear, v_proj: Linear },
}

/// Multi-head causal self-attention.
struct SelfAttention {
    qkv: Qkv,
    /// `c_proj` / `o_proj`: [C] → [C].
    out_proj: Linear,
    n_head: i64,
    n_kv_head: i64,
    head_dim: i64,
    dropout: f64,
    kind: Attention,
}

impl SelfAttention {
    fn new(p: &nn::Path, config: &ModelConfig, resid_std: f64) -> SelfAttention {
        let (c, kv, bias) = (config.d_model, config.n_kv_head * config.head_dim(), config.bias);
        let (qkv, out_proj) = match config.arch {
            Arch::Gpt2 => (
                Qkv::Fused(Linear::new(&(p / "c_attn"), c, 3 * c, bias, Layout::InOut, INIT_STD)),
                Linear::new(&(p / "c_proj"), c, c, bias, Layout::InOut, resid_std),
            ),
            Arch::Llama => (
                Qkv::Separate {
                    q_proj: Linear::new(&(p / "q_proj"), c, c, bias, Layout::OutIn, INIT_STD),
                    k_proj: Linear::new(&(p / "k_proj"), c, kv, bias, Layout::OutIn, INIT_STD),
                    v_proj: Linear::new(&(p / "v_proj"), c, kv, bias, Layout::OutIn, INIT_STD),
                },
                Linear::new(&(p / "o_proj"), c, c, bias, Layout::OutIn, resid_std),
            ),
        };
        SelfAttention {
            qkv,
            out_proj,
            n_head: config.n_head,
            n_kv_head: config.n_kv_head,
            head_dim: config.head_dim(),
            dropout: config.dropout,
            kind: config.attention,
        }
    }

    /// x: [B, T, C] at positions pos..pos+T → [B, T, C]. With a cache, this
    /// step's keys and values are appended to it and the queries attend to
    /// all of them.
    fn forward(&self, x: &Tensor, pos: i64, rope: Option<&Rope>, cache: Option<&mut LayerCache>, train: bool) -> Tensor {
        let (b, t, c) = x.size3().unwrap();
        let (q, k, v) = match &self.qkv {
            Qkv::Fused(c_attn) => {
                let qkv = c_attn.forward(x, train).split(c, 2); // 3 × [B, T, C]
                (qkv[0].shallow_clone(), qkv[1].shallow_clone(), qkv[2].shallow_clone())
            }
            Qkv::Separate { q_proj, k_proj, v_proj } => (q_proj.forward(x, train), k_proj.forward(x, train), v_proj.forward(x, train)),
        };
        // Split into heads: [B, T, heads·head_dim] → [B, heads, T, head_dim].
        let heads = |x: Tensor, n: i64| x.view([b, t, n, self.head_dim]).transpose(1, 2);
        let (q, k, v) = (heads(q, self.n_head), heads(k, self.n_kv_head), heads(v, self.n_kv_head));
        let (q, k) = match rope {
            Some(rope) => (rope.apply(&q, pos), rope.apply(&k, pos)),
            None => (q, k),
        };
        // With a cache: [B, n_kv_head, T, head_dim] → [B, n_kv_head, T_past + T, head_dim].
        // The cache takes the keys' dtype, which autocast may have lowered.
        let (k, v) = match cache {
            Some(cache) => {
                cache.k = Tensor::cat(&[&cache.k.to_kind(k.kind()), &k], 2);
                cache.v = Tensor::cat(&[&cache.v.to_kind(v.kind()), &v], 2);
                (cache.k.shallow_clone(), cache.v.shallow_clone())
            }
            None => (k, v),
        };
        let n_rep = self.n_head / self.n_kv_head;
        let y = self.attend(&q, &repeat_kv(k, n_rep), &repeat_kv(v, n_rep), train); // [B, n_head, T, head_dim]
                                                                                    // Heads side by side again: [B, n_head, T, head_dim] → [B, T, C].
        let y = y.transpose(1, 2).reshape([b, t, c]);
        self.out_proj.forward(&y, train).dropout(self.dropout, train)
    }

    /// softmax(q·kᵀ/√head_dim, causally masked)·v. q: [B, n_head, T, head_dim];
    /// k, v: [B, n_head, T_k, head_dim] where the last T of the T_k keys are
    /// the queries' own positions → [B, n_head, T, head_dim].
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, train: bool) -> Tensor {
        let (t, t_k) = (q.size()[2], k.size()[2]);
        let dropout = if train { self.dropout } else { 0.0 };
        match self.kind {
            Attention::Explicit => {
                let (b, n_head, _, head_dim) = q.size4().unwrap();
                // Heads as one batch of matrices: [B·n_head, T, head_dim].
                let rows = |x: &Tensor| x.reshape([b * n_head, -1, head_dim]);
                let scale = 1.0 / (head_dim as f64).sqrt();
                // q·kᵀ·scale plus 0 where a query may attend and −∞ where it
                // may not, in one op: [B·n_head, T, T_k].
                let scores = Tensor::baddbmm(&causal_bias(t, t_k, q.kind(), q.device()), &rows(q), &rows(k).transpose(1, 2), 1.0, scale);
                // Softmax in fp32 whatever the model's precision.
                let weights = scores.softmax(-1, Kind::Float).to_kind(q.kind()).dropout(dropout, train);
                weights.bmm(&rows(v)).view([b, n_head, t, head_dim])
            }
            // Without cached keys the mask is the plain lower triangle,
            // which lets libtorch pick its fused causal kernels.
            Attention::Sdpa if t == t_k => Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, dropout, true, None::<f64>, false),
            // is_causal aligns the triangle top-left; cached keys need it
            // bottom-right, so the mask is given explicitly.
            Attention::Sdpa => {
                let mask = causal_mask(t, t_k, q.device());
                Tensor::scaled_dot_product_attention(q, k, v, Some(mask), dropout, false, None::<f64>, false)
            }
        }
    }
}

/// [T, T_k] booleans, true where query i (at key position T_k − T + i) may
/// attend to key j.
fn causal_mask(t: i64, t_k: i64, device: Device) -> Tensor {
    Tensor::ones([t, t_k], (Kind::Bool, device)).tril(t_k - t)
}

/// The same as an additive bias: 0 where [`causal_mask`] is true, −∞ where
/// it is false.
fn causal_bias(t: i64, t_k: i64, kind: Kind, device: Device) -> Tensor {
    Tensor::full([t, t_k], f64::NEG_INFINITY, (kind, device)).triu(t_k - t + 1)
}

/// Grouped-query attention shares each key/value head among n_rep query
/// heads: [B, n_kv_head, T, head_dim] → [B, n_kv_head·n_rep, T, head_dim], query
/// head h reading key/value head h / n_rep (HF's `repeat_kv`).
fn repeat_kv(x: Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return x;
    }
    let (b, n_kv_head, t, head_dim) = x.size4().unwrap();
    x.unsqueeze(2).expand([b, n_kv_head, n_rep, t, head_dim], false).reshape([b, n_kv_head * n_rep, t, head_dim])
}

/// The position-wise feed-forward network.
enum Mlp {
    /// GPT-2: c_proj(gelu(c_fc(x))).
    Gelu { c_fc: Linear, c_proj: Linear },
    /// Llama's SwiGLU: down_proj(silu(gate_proj(x)) ⊙ up_proj(x)).
    SwiGlu { gate_proj: Linear, up_proj: Linear, down_proj: Linear },
}

impl Mlp {
    fn new(p: &nn::Path, config: &ModelConfig, resid_std: f64) -> Mlp {
        let (c, f, bias) = (config.d_model, config.ffn_hidden, config.bias);
        match config.arch {
            Arch::Gpt2 => Mlp::Gelu {
                c_fc: Linear::new(&(p / "c_fc"), c, f, bias, Layout::InOut, INIT_STD),
                c_proj: Linear::new(&(p / "c_proj"), f, c, bias, Layout::InOut, resid_std),
            },
            Arch::Llama => Mlp::SwiGlu {
                gate_proj: Linear::new(&(p / "gate_proj"), c, f, bias, Layout::OutIn, INIT_STD),
                up_proj: Linear::new(&(p / "up_proj"), c, f, bias, Layout::OutIn, INIT_STD),
                down_proj: Linear::new(&(p / "down_proj"), f, c, bias, Layout::OutIn, resid_std),
            },
        }
    }

    /// [B, T, C] → [B, T, F] → [B, T, C]
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            // GPT-2 was trained with the tanh approximation (HF's `gelu_new`);
            // see `gelu` for why it is computed by hand.
            Mlp::Gelu { c_fc, c_proj } => c_proj.forward(&crate::fast::gelu::gelu(&c_fc.forward(x, train)), train),
            Mlp::SwiGlu { gate_proj, up_proj, down_proj } => {
                down_proj.forward(&(gate_proj.forward(x, train).silu() * up_proj.forward(x, train)), train)
            }
        }
    }
}

/// A pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x)).
struct Block {
    norm_1: Norm,
    attn: SelfAttention,
    norm_2: Norm,
    mlp: Mlp,
    dropout: f64,
}

impl Block {
    fn new(p: &nn::Path, config: &ModelConfig, resid_std: f64) -> Block {
        let (norm_1, attn, norm_2, mlp) = match config.arch {
            Arch::Gpt2 => ("ln_1", "attn", "ln_2", "mlp"),
            Arch::Llama => ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
        };
        Block {
            norm_1: Norm::new(&(p / norm_1), config),
            attn: SelfAttention::new(&(p / attn), config, resid_std),
            norm_2: Norm::new(&(p / norm_2), config),
            mlp: Mlp::new(&(p / mlp), config, resid_std),
            dropout: config.dropout,
        }
    }

    /// [B, T, C] → [B, T, C]
    fn forward(&self, x: &Tensor, pos: i64, rope: Option<&Rope>, cache: Option<&mut LayerCache>, train: bool) -> Tensor {
        let x = x + self.attn.forward(&self.norm_1.forward(x), pos, rope, cache, train);
        let mlp = self.mlp.forward(&self.norm_2.forward(&x), train).dropout(self.dropout, train);
        x + mlp
    }
}

/// The model: embeddings, `n_layer` blocks, a final norm and the output head.
pub struct Gpt {
    config: ModelConfig,
    wte: Tensor,         // [V, C]
    wpe: Option<Tensor>, // [context, C], GPT-2
    blocks: Vec<Block>,
    norm_f: Norm,
    lm_head: Tensor, // [V, C]; the same variable as `wte` when tied
    rope: Option<Rope>,
}

impl Gpt {
    /// Creates the model's variables under `root` (normally `vs.root()`),
    /// initialized as the module docs say.
    pub fn new(root: &nn::Path, config: &ModelConfig) -> Result<Gpt> {
        config.check().map_err(anyhow::Error::msg)?;
        ensure!(config.vocab_size > 0, "vocab_size must be set to the tokenizer's vocabulary size");
        let (v, c) = (config.vocab_size, config.d_model);
        let resid_std = INIT_STD / (2.0 * config.n_layer as f64).sqrt();
        let (base, blocks, wte, norm_f) = match config.arch {
            Arch::Gpt2 => (root / "transformer", "h", "wte", "ln_f"),
            Arch::Llama => (root / "model", "layers", "embed_tokens", "norm"),
        };
        let wte = normal(&(&base / wte), "weight", &[v, c], INIT_STD);
        let wpe = (config.arch == Arch::Gpt2).then(|| normal(&(&base / "wpe"), "weight", &[config.context, c], INIT_STD));
        let blocks = (0..config.n_layer).map(|i| Block::new(&(&base / blocks / i), config, resid_std)).collect();
        let norm_f = Norm::new(&(&base / norm_f), config);
        let lm_head = if config.tie_embeddings { wte.shallow_clone() } else { normal(&(root / "lm_head"), "weight", &[v, c], INIT_STD) };
        let rope = (config.arch == Arch::Llama).then(|| Rope::new(config, root.device()));
        Ok(Gpt { config: config.clone(), wte, wpe, blocks, norm_f, lm_head, rope })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.wte.device()
    }

    /// Logits [B, T, V] for token ids idx [B, T] (int64, T ≤ context).
    /// `train` turns dropout on.
    pub fn forward(&self, idx: &Tensor, train: bool) -> Tensor {
        self.logits(&self.hidden_states(idx, train))
    }

    /// The last block's output after the final norm, [B, T, C]: what the
    /// output head (or a reward or value head) reads.
    pub fn hidden_states(&self, idx: &Tensor, train: bool) -> Tensor {
        let seeds = self.dropout_seeds(train);
        let mut x = self.embed(idx, 0, train);
        for (block, seed) in self.blocks.iter().zip(&seeds) {
            x = self.run_block(block, &x, *seed, train);
        }
        self.norm_f.forward(&x)
    }

    /// The output head: hidden states [B, T, C] → logits [B, T, V].
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(&self.lm_head, None)
    }

    /// Runs forward and backward passes, accumulating gradients into the
    /// variables; returns the loss, detached. `loss_fn` maps the hidden
    /// states [B, T, C] to a scalar loss, e.g.
    /// `|h| model::loss(&model.logits(h), &targets)`. This is the entry point
    /// for training: with `checkpoint_activations` it recomputes blocks
    /// instead of storing their activations.
    pub fn backward(&self, idx: &Tensor, train: bool, loss_fn: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        if self.config.checkpoint_activations {
            return self.backward_checkpointed(idx, train, loss_fn);
        }
        let loss = loss_fn(&self.hidden_states(idx, train));
        loss.backward();
        loss.detach()
    }

    /// Forward and backward passes of next-token prediction, the training
    /// step of language modelling: `scale` × the mean cross-entropy of
    /// `targets` [B, T] (int64; [`IGNORE_INDEX`] positions take no part),
    /// gradients accumulated into the variables; returns that loss, detached.
    ///
    /// On the CPU in fp32 the output head and the loss are computed by hand
    /// as one step ([`crate::fast::head`]) rather than by autograd through
    /// logits, log-softmax and NLL. Elsewhere (CUDA, activation
    /// checkpointing) it is [`Gpt::backward`] with [`loss`]; the two agree to
    /// rounding (a test checks).
    pub fn backward_lm(&self, idx: &Tensor, targets: &Tensor, scale: f64) -> Tensor {
        if self.config.checkpoint_activations || !crate::fast::head::applies(&self.lm_head) {
            return self.backward(idx, true, |h| loss(&self.logits(h), targets) * scale);
        }
        crate::fast::head::backward(&self.hidden_states(idx, true), &self.lm_head, targets, IGNORE_INDEX, scale)
    }

    /// An empty cache for `batch` sequences.
    pub fn kv_cache(&self, batch: i64) -> KvCache {
        let dims = [batch, self.config.n_kv_head, 0, self.config.head_dim()];
        let empty = || Tensor::zeros(dims, (self.wte.kind(), self.device()));
        KvCache { layers: self.blocks.iter().map(|_| LayerCache { k: empty(), v: empty() }).collect() }
    }

    /// Logits [B, T, V] for idx [B, T], the tokens that follow those already
    /// in the cache, which then holds them too. Inference only: no dropout,
    /// no graph. Cache length plus T must not exceed the context.
    pub fn forward_cached(&self, idx: &Tensor, cache: &mut KvCache) -> Tensor {
        self.logits(&self.hidden_cached(idx, cache))
    }

    /// [`Gpt::hidden_states`] of what [`Gpt::forward_cached`] reads: [B, T, C].
    pub fn hidden_cached(&self, idx: &Tensor, cache: &mut KvCache) -> Tensor {
        let _no_grad = tch::no_grad_guard();
        let pos = cache.len();
        let mut x = self.embed(idx, pos, false);
        for (block, layer) in self.blocks.iter().zip(&mut cache.layers) {
            x = block.forward(&x, pos, self.rope.as_ref(), Some(layer), false);
        }
        self.norm_f.forward(&x)
    }

    /// Token (and, for GPT-2, position) embeddings of idx [B, T] at positions
    /// pos..pos+T → [B, T, C].
    fn embed(&self, idx: &Tensor, pos: i64, train: bool) -> Tensor {
        let t = idx.size()[1];
        assert!(pos + t <= self.config.context, "{} positions exceed the context of {}", pos + t, self.config.context);
        let x = Tensor::embedding(&self.wte, idx, -1, false, false);
        let x = match &self.wpe {
            Some(wpe) => x + wpe.narrow(0, pos, t),
            None => x,
        };
        x.dropout(self.config.dropout, train)
    }

    fn run_block(&self, block: &Block, x: &Tensor, seed: Option<i64>, train: bool) -> Tensor {
        if let Some(seed) = seed {
            tch::manual_seed(seed);
        }
        block.forward(x, 0, self.rope.as_ref(), None, train)
    }

    /// One generator seed per block when dropout is active, drawn from
    /// libtorch's generator, so a recomputed block draws the same masks.
    fn dropout_seeds(&self, train: bool) -> Vec<Option<i64>> {
        if !train || self.config.dropout == 0.0 {
            return vec![None; self.blocks.len()];
        }
        let seeds = Tensor::randint(i64::MAX, [self.config.n_layer], (Kind::Int64, Device::Cpu));
        Vec::<i64>::try_from(&seeds).expect("a 1-D int64 tensor").into_iter().map(Some).collect()
    }
}

/// Mean cross-entropy of logits [B, T, V] against targets [B, T] (int64),
/// over the positions whose target is not [`IGNORE_INDEX`]. Computed in fp32.
pub fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let vocab = logits.size()[2];
    logits.to_kind(Kind::Float).reshape([-1, vocab]).cross_entropy_loss::<Tensor>(
        &targets.reshape([-1]),
        None,
        Reduction::Mean,
        IGNORE_INDEX,
        0.0,
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;
    use tch::nn::OptimizerConfig;

    use super::*;
    use crate::testing::{build, max_diff, tiny, torch_rng};

    fn random_tokens(config: &ModelConfig, batch: i64, t: i64) -> Tensor {
        Tensor::randint(config.vocab_size, [batch, t], (Kind::Int64, Device::Cpu))
    }

    fn shapes(vs: &nn::VarStore) -> BTreeMap<String, Vec<i64>> {
        vs.variables().into_iter().map(|(name, t)| (name, t.size())).collect()
    }

    #[test]
    fn config_resolves_arch_defaults() {
        let gpt2: ModelConfig = serde_json::from_value(json!({"d_model": 64})).unwrap();
        assert_eq!((gpt2.arch, gpt2.ffn_hidden, gpt2.n_kv_head), (Arch::Gpt2, 256, 4));
        assert!(gpt2.bias && gpt2.tie_embeddings && gpt2.attention == Attention::Sdpa && !gpt2.checkpoint_activations);
        assert_eq!(gpt2.norm_eps, 1e-5);

        let llama: ModelConfig = serde_json::from_value(json!({"arch": "llama", "n_head": 8})).unwrap();
        // 8/3 · 128 = 341.3, rounded up to a multiple of 64.
        assert_eq!((llama.ffn_hidden, llama.n_kv_head, llama.rope_theta, llama.norm_eps), (384, 8, 10000.0, 1e-6));
        assert!(!llama.bias && !llama.tie_embeddings);

        // Writing a default out changes nothing, and the resolved form reads back as itself.
        let explicit: ModelConfig =
            serde_json::from_value(json!({"arch": "llama", "n_head": 8, "n_kv_head": 8, "ffn_hidden": 384, "bias": false})).unwrap();
        assert_eq!(serde_json::to_value(&explicit).unwrap(), serde_json::to_value(&llama).unwrap());
        let again: ModelConfig = serde_json::from_value(serde_json::to_value(&llama).unwrap()).unwrap();
        assert_eq!(again, llama);
        assert_eq!(ModelConfig::default(), serde_json::from_value::<ModelConfig>(json!({})).unwrap());
    }

    #[test]
    fn config_rejects_unknown_keys_and_bad_shapes() {
        let error = |v: serde_json::Value| serde_json::from_value::<ModelConfig>(v).unwrap_err().to_string();
        assert!(error(json!({"n_embd": 64})).contains("unknown field `n_embd`"));
        assert!(error(json!({"arch": "mamba"})).contains("unknown variant `mamba`"));
        assert!(error(json!({"d_model": 100, "n_head": 8})).contains("multiple of n_head"));
        assert!(error(json!({"arch": "llama", "n_head": 8, "n_kv_head": 3})).contains("multiple of n_kv_head"));
        assert!(error(json!({"n_head": 8, "n_kv_head": 2})).contains("applies to arch = \"llama\""));
        assert!(error(json!({"arch": "llama", "d_model": 12, "n_head": 4})).contains("even head size"));
        assert!(error(json!({"dropout": 1.0})).contains("dropout"));
        assert!(error(json!({"n_layer": 0})).contains("n_layer must be at least 1"));
        let no_vocab = nn::VarStore::new(Device::Cpu);
        assert!(Gpt::new(&no_vocab.root(), &ModelConfig::default()).is_err());
    }

    #[test]
    fn parameter_names_follow_hugging_face() {
        let _rng = torch_rng();
        let (vs, _) = build(&tiny("gpt2", json!({"n_layer": 1})), 0);
        let expected: BTreeMap<String, Vec<i64>> = [
            ("transformer.wte.weight", vec![23, 16]),
            ("transformer.wpe.weight", vec![12, 16]),
            ("transformer.h.0.ln_1.weight", vec![16]),
            ("transformer.h.0.ln_1.bias", vec![16]),
            ("transformer.h.0.attn.c_attn.weight", vec![16, 48]),
            ("transformer.h.0.attn.c_attn.bias", vec![48]),
            ("transformer.h.0.attn.c_proj.weight", vec![16, 16]),
            ("transformer.h.0.attn.c_proj.bias", vec![16]),
            ("transformer.h.0.ln_2.weight", vec![16]),
            ("transformer.h.0.ln_2.bias", vec![16]),
            ("transformer.h.0.mlp.c_fc.weight", vec![16, 64]),
            ("transformer.h.0.mlp.c_fc.bias", vec![64]),
            ("transformer.h.0.mlp.c_proj.weight", vec![64, 16]),
            ("transformer.h.0.mlp.c_proj.bias", vec![16]),
            ("transformer.ln_f.weight", vec![16]),
            ("transformer.ln_f.bias", vec![16]),
        ]
        .into_iter()
        .map(|(name, shape)| (name.to_string(), shape))
        .collect();
        assert_eq!(shapes(&vs), expected);

        let (vs, _) = build(&tiny("llama", json!({"n_layer": 1, "n_kv_head": 2, "ffn_hidden": 24})), 0);
        let expected: BTreeMap<String, Vec<i64>> = [
            ("model.embed_tokens.weight", vec![23, 16]),
            ("model.layers.0.input_layernorm.weight", vec![16]),
            ("model.layers.0.self_attn.q_proj.weight", vec![16, 16]),
            ("model.layers.0.self_attn.k_proj.weight", vec![8, 16]),
            ("model.layers.0.self_attn.v_proj.weight", vec![8, 16]),
            ("model.layers.0.self_attn.o_proj.weight", vec![16, 16]),
            ("model.layers.0.post_attention_layernorm.weight", vec![16]),
            ("model.layers.0.mlp.gate_proj.weight", vec![24, 16]),
            ("model.layers.0.mlp.up_proj.weight", vec![24, 16]),
            ("model.layers.0.mlp.down_proj.weight", vec![16, 24]),
            ("model.norm.weight", vec![16]),
            ("lm_head.weight", vec![23, 16]),
        ]
        .into_iter()
        .map(|(name, shape)| (name.to_string(), shape))
        .collect();
        assert_eq!(shapes(&vs), expected);
    }

    #[test]
    fn num_params_counts_the_varstore_and_known_models() {
        let _rng = torch_rng();
        for (arch, extra) in [
            ("gpt2", json!({})),
            ("gpt2", json!({"bias": false, "tie_embeddings": false})),
            ("llama", json!({"n_kv_head": 2})),
            ("llama", json!({"bias": true, "tie_embeddings": true})),
        ] {
            let config = tiny(arch, extra);
            let (vs, _) = build(&config, 0);
            let numel: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
            assert_eq!(config.num_params(), numel, "{config:?}");
        }
        // GPT-2 small and TinyLlama-1.1B as transformers counts them.
        let gpt2_small: ModelConfig =
            serde_json::from_value(json!({"vocab_size": 50257, "n_layer": 12, "n_head": 12, "d_model": 768, "context": 1024})).unwrap();
        assert_eq!(gpt2_small.num_params(), 124_439_808);
        let tiny_llama: ModelConfig = serde_json::from_value(json!({"arch": "llama", "vocab_size": 32000, "n_layer": 22,
            "n_head": 32, "n_kv_head": 4, "d_model": 2048, "ffn_hidden": 5632, "context": 2048}))
        .unwrap();
        assert_eq!(tiny_llama.num_params(), 1_100_048_384);
        // nanoGPT's estimate for GPT-2 small: position embeddings excluded, the tied head counted.
        assert_eq!(gpt2_small.flops_per_token(), 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024);
        // Untied: the embedding lookup costs nothing, the head does.
        assert_eq!(tiny_llama.flops_per_token(), 6 * (1_100_048_384 - 32000 * 2048) + 12 * 22 * 2048 * 2048);
    }

    #[test]
    fn init_is_seeded_and_scales_residual_projections() {
        let _rng = torch_rng();
        let config = tiny("gpt2", json!({"n_layer": 8, "d_model": 64}));
        let (a, _) = build(&config, 7);
        let (b, _) = build(&config, 7);
        let (c, _) = build(&config, 8);
        let (a, b, c) = (a.variables(), b.variables(), c.variables());
        assert!(a.iter().all(|(name, t)| t.equal(&b[name])));
        assert!(!a["transformer.h.0.attn.c_attn.weight"].equal(&c["transformer.h.0.attn.c_attn.weight"]));
        let std = |name: &str| a[name].std(true).double_value(&[]);
        assert!((std("transformer.h.3.mlp.c_fc.weight") / 0.02 - 1.0).abs() < 0.05);
        assert!((std("transformer.h.3.mlp.c_proj.weight") / (0.02 / 4.0) - 1.0).abs() < 0.05);
        assert!(a["transformer.h.3.ln_1.weight"].equal(&Tensor::ones([64], (Kind::Float, Device::Cpu))));
        assert_eq!(a["transformer.h.3.mlp.c_fc.bias"].abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn sdpa_matches_explicit_attention() {
        let _rng = torch_rng();
        for (arch, extra) in [("gpt2", json!({})), ("llama", json!({"n_kv_head": 2, "ffn_hidden": 24}))] {
            let sdpa = tiny(arch, extra.clone());
            let explicit = ModelConfig { attention: Attention::Explicit, ..sdpa.clone() };
            let (_, sdpa_model) = build(&sdpa, 1);
            let (_, explicit_model) = build(&explicit, 1);
            let idx = random_tokens(&sdpa, 3, 12);
            let diff = max_diff(&sdpa_model.forward(&idx, false), &explicit_model.forward(&idx, false));
            assert!(diff < 1e-5, "{arch}: {diff}");
            // With cached keys: 5 tokens, then the other 7 attending to them.
            let cached = |model: &Gpt| {
                let mut cache = model.kv_cache(3);
                let _ = model.forward_cached(&idx.narrow(1, 0, 5), &mut cache);
                model.forward_cached(&idx.narrow(1, 5, 7), &mut cache)
            };
            let diff = max_diff(&cached(&sdpa_model), &cached(&explicit_model));
            assert!(diff < 1e-5, "{arch}, cached: {diff}");
        }
    }

    #[test]
    fn checkpointed_backward_matches_plain_backward() {
        let _rng = torch_rng();
        for (arch, extra) in [("gpt2", json!({"dropout": 0.1})), ("llama", json!({"n_kv_head": 2, "dropout": 0.1}))] {
            let plain = tiny(arch, extra);
            let checkpointed = ModelConfig { checkpoint_activations: true, ..plain.clone() };
            let idx = random_tokens(&plain, 2, 12);
            let targets = random_tokens(&plain, 2, 12);
            let run = |config: &ModelConfig| {
                let (vs, model) = build(config, 3);
                tch::manual_seed(4);
                let loss = model.backward(&idx, true, |h| loss(&model.logits(h), &targets));
                let grads: BTreeMap<String, Tensor> = vs.variables().into_iter().map(|(name, t)| (name, t.grad())).collect();
                (loss, grads)
            };
            let (plain_loss, plain_grads) = run(&plain);
            let (loss, grads) = run(&checkpointed);
            assert!(plain_loss.equal(&loss), "{arch}: {plain_loss:?} vs {loss:?}");
            for (name, grad) in &plain_grads {
                assert!(grad.defined() && grad.abs().max().double_value(&[]) > 0.0, "{arch}: no gradient for {name}");
                let diff = max_diff(grad, &grads[name]);
                assert!(diff < 1e-6, "{arch}: {name} differs by {diff}");
            }
        }
    }

    /// The hand-written head and loss of `backward_lm` give autograd's loss
    /// and gradients, with and without ignored targets, tied or not.
    #[test]
    fn fused_head_matches_autograd() {
        let _rng = torch_rng();
        for (arch, extra) in [("gpt2", json!({})), ("llama", json!({"n_kv_head": 2})), ("llama", json!({"tie_embeddings": true}))] {
            let config = tiny(arch, extra);
            let idx = random_tokens(&config, 3, 12);
            let all = random_tokens(&config, 3, 12);
            let some = all.where_scalarother(&Tensor::rand([3, 12], (Kind::Float, Device::Cpu)).gt(0.3), IGNORE_INDEX);
            for targets in [&all, &some] {
                let run = |fused: bool| {
                    let (vs, model) = build(&config, 3);
                    let loss = if fused {
                        model.backward_lm(&idx, targets, 0.5)
                    } else {
                        model.backward(&idx, true, |h| loss(&model.logits(h), targets) * 0.5)
                    };
                    let grads: BTreeMap<String, Tensor> = vs.variables().into_iter().map(|(n, t)| (n, t.grad())).collect();
                    (loss.double_value(&[]), grads)
                };
                let ((fused_loss, fused), (loss, plain)) = (run(true), run(false));
                assert!((fused_loss - loss).abs() < 1e-6, "{arch}: loss {fused_loss} vs {loss}");
                for (name, grad) in &plain {
                    let diff = max_diff(grad, &fused[name]);
                    assert!(diff < 1e-6, "{arch}: {name} differs by {diff}");
                }
            }
            let (vs, model) = build(&config, 3);
            let none = Tensor::full([3, 12], IGNORE_INDEX, (Kind::Int64, Device::Cpu));
            assert!(model.backward_lm(&idx, &none, 1.0).double_value(&[]).is_nan(), "no counted target: NaN, as cross_entropy");
            assert!(vs.variables().values().all(|t| !t.grad().defined()), "and no gradient");
        }
    }

    #[test]
    fn safetensors_round_trip_is_bitwise() {
        let _rng = torch_rng();
        let dir = tempfile::tempdir().unwrap();
        for (arch, extra) in [("gpt2", json!({})), ("llama", json!({"n_kv_head": 2})), ("llama", json!({"tie_embeddings": true}))] {
            let config = tiny(arch, extra);
            let (saved, model) = build(&config, 5);
            let path = dir.path().join("model.safetensors");
            saved.save(&path).unwrap();
            let (mut loaded, reloaded) = build(&config, 6);
            let idx = random_tokens(&config, 2, 12);
            assert!(!model.forward(&idx, false).equal(&reloaded.forward(&idx, false)));
            loaded.load(&path).unwrap();
            assert!(model.forward(&idx, false).equal(&reloaded.forward(&idx, false)), "{arch}");
            let names: Vec<String> = Tensor::read_safetensors(&path).unwrap().into_iter().map(|(name, _)| name).collect();
            assert_eq!(names.len(), saved.variables().len());
        }
    }

    #[test]
    fn loss_skips_ignored_targets() {
        let _rng = torch_rng();
        tch::manual_seed(0);
        let logits = Tensor::randn([2, 3, 5], (Kind::Float, Device::Cpu));
        let targets = Tensor::from_slice(&[1i64, IGNORE_INDEX, 4, IGNORE_INDEX, 0, 2]).view([2, 3]);
        let log_probs = logits.log_softmax(-1, Kind::Float).view([6, 5]);
        let kept = [(0, 1), (2, 4), (4, 0), (5, 2)];
        let expected = -kept.iter().map(|&(row, token)| log_probs.double_value(&[row, token])).sum::<f64>() / 4.0;
        assert!((loss(&logits, &targets).double_value(&[]) - expected).abs() < 1e-6);
    }

    #[test]
    fn rotary_scores_depend_only_on_distance() {
        let _rng = torch_rng();
        let config = tiny("llama", json!({"context": 64}));
        let rope = Rope::new(&config, Device::Cpu);
        tch::manual_seed(0);
        let q = Tensor::randn([1, 1, 1, config.head_dim()], (Kind::Float, Device::Cpu));
        let k = Tensor::randn([1, 1, 1, config.head_dim()], (Kind::Float, Device::Cpu));
        let score = |m: i64, n: i64| (rope.apply(&q, m) * rope.apply(&k, n)).sum(Kind::Float).double_value(&[]);
        assert!((score(7, 3) - score(50, 46)).abs() < 1e-4);
        assert!((score(7, 3) - score(7, 4)).abs() > 1e-4);
        assert!(rope.apply(&q, 0).equal(&q));
    }

    /// Fresh adapters change nothing and only they get gradients; trained
    /// ones (here: a random B) change the logits, and merging them into the
    /// base weights gives the logits of base + adapters, as a plain model.
    #[test]
    fn merged_lora_gives_the_logits_of_base_plus_adapters() {
        let _rng = torch_rng();
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("gpt2", json!({}), vec!["q", "v", "o", "up", "down"], "transformer.h.1.attn.c_attn.lora_v", [16, 16]),
            ("llama", json!({"n_kv_head": 2}), Lora::TARGETS.to_vec(), "model.layers.0.self_attn.k_proj.lora_k", [8, 16]),
        ];
        for (arch, extra, targets, adapter, [d_out, d_in]) in cases {
            let config = tiny(arch, extra);
            let (mut vs, mut model) = build(&config, 11);
            let idx = random_tokens(&config, 2, 12);
            let base = model.forward(&idx, false);
            vs.freeze();
            let adapters = nn::VarStore::new(Device::Cpu);
            let lora = Lora { targets: targets.iter().map(|t| t.to_string()).collect(), ..Default::default() };
            model.add_lora(&adapters.root(), &lora).unwrap();
            assert!(model.forward(&idx, false).equal(&base), "{arch}: B starts at zero");
            let vars = adapters.variables();
            assert_eq!(vars.len(), 2 * targets.len() * config.n_layer as usize, "{arch}: {:?}", vars.keys());
            assert_eq!(vars[&format!("{adapter}.A")].size(), [8, d_in]);
            assert_eq!(vars[&format!("{adapter}.B")].size(), [d_out, 8]);

            let targets_y = random_tokens(&config, 2, 12);
            let _ = model.backward(&idx, true, |h| loss(&model.logits(h), &targets_y));
            assert!(vs.variables().values().all(|t| !t.grad().defined()), "{arch}: the base is frozen");
            assert!(vars[&format!("{adapter}.B")].grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);

            tch::no_grad(|| {
                for (_, mut b) in vars.into_iter().filter(|(name, _)| name.ends_with(".B")) {
                    b.copy_(&(Tensor::randn(b.size(), (Kind::Float, Device::Cpu)) * 0.1));
                }
            });
            let adapted = model.forward(&idx, false);
            assert!(max_diff(&adapted, &base) > 1e-3, "{arch}: the adapters take part");
            model.merge_lora();
            let diff = max_diff(&model.forward(&idx, false), &adapted);
            assert!(diff < 1e-5, "{arch}: merged differs by {diff}");

            let path = dir.path().join("merged.safetensors");
            vs.save(&path).unwrap();
            let (mut plain, reloaded) = build(&config, 12);
            plain.load(&path).unwrap();
            assert!(max_diff(&reloaded.forward(&idx, false), &adapted) < 1e-5, "{arch}: a plain model");
        }
        let (_, mut gpt2) = build(&tiny("gpt2", json!({})), 0);
        let adapters = nn::VarStore::new(Device::Cpu);
        let gate = Lora { targets: vec!["gate".into()], ..Default::default() };
        assert!(gpt2.add_lora(&adapters.root(), &gate).unwrap_err().to_string().contains("no `gate`"));
        assert_eq!(Lora { targets: vec!["c_attn".into()], ..Default::default() }.check(&["lora"]).unwrap_err().path, ["lora", "targets"]);
    }

    #[test]
    fn training_steps_reduce_loss() {
        let _rng = torch_rng();
        for (arch, extra) in [("gpt2", json!({})), ("llama", json!({"n_kv_head": 2, "checkpoint_activations": true}))] {
            let config = tiny(arch, extra);
            let (vs, model) = build(&config, 9);
            let idx = random_tokens(&config, 4, 12);
            let targets = random_tokens(&config, 4, 12);
            let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
            let mut losses = Vec::new();
            for _ in 0..40 {
                opt.zero_grad();
                losses.push(model.backward(&idx, true, |h| loss(&model.logits(h), &targets)).double_value(&[]));
                opt.step();
            }
            assert!(losses[39] < 0.5 * losses[0], "{arch}: {losses:?}");
        }
    }
}

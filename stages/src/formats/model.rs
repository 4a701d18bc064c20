//! The model artifact: `config.json` (a [`ModelConfig`]), `model.safetensors`
//! (Hugging Face's parameter names) and `tokenizer.json`. What `pretrain`,
//! `sft`, `dpo` and `ppo` write, and `generate`, `export` and `eval` read.

use std::path::Path;

use anyhow::{Context, Result};
use tch::{nn, Device};
use tokenizers::Tokenizer;

use crate::formats::tokenizer;
use crate::model::{Gpt, ModelConfig};

/// A trained model and its tokenizer, loaded from a model artifact
/// (`config.json`, `model.safetensors`, `tokenizer.json`).
pub struct ModelArtifact {
    /// Owns the weights `gpt` uses.
    pub vs: nn::VarStore,
    pub gpt: Gpt,
    pub tokenizer: Tokenizer,
}

impl ModelArtifact {
    pub fn open(dir: &Path, device: Device) -> Result<ModelArtifact> {
        let config_path = dir.join("config.json");
        let config: ModelConfig = serde_json::from_slice(
            &std::fs::read(&config_path)
                .with_context(|| format!("cannot read {}: not a model artifact (pretrain, sft, …)", config_path.display()))?,
        )
        .with_context(|| format!("cannot parse {}", config_path.display()))?;
        let mut vs = nn::VarStore::new(device);
        let gpt = Gpt::new(&vs.root(), &config)?;
        vs.load(dir.join("model.safetensors")).with_context(|| format!("cannot load the weights in {}", dir.display()))?;
        Ok(ModelArtifact { vs, gpt, tokenizer: tokenizer::load(dir)? })
    }
}

/// Writes a model artifact into `out`: the weights of `vs`, `config` and the
/// tokenizer of the artifact (or `train_tokenizer` output) in `tokenizer_dir`.
/// What [`ModelArtifact::open`] reads, and `generate`, `export` and `eval` accept.
pub fn save_model(out: &Path, vs: &nn::VarStore, config: &ModelConfig, tokenizer_dir: &Path) -> Result<()> {
    vs.save(out.join("model.safetensors")).with_context(|| format!("cannot write the weights into {}", out.display()))?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(config)? + "\n")?;
    std::fs::copy(tokenizer_dir.join(tokenizer::FILE), out.join(tokenizer::FILE))
        .with_context(|| format!("cannot copy the tokenizer of {}", tokenizer_dir.display()))?;
    Ok(())
}

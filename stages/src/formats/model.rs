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
        let weights = dir.join("model.safetensors");
        vs.load(&weights).with_context(|| format!("cannot load the weights in {}", dir.display()))?;
        check_finite(&vs, &weights)?;
        Ok(ModelArtifact { vs, gpt, tokenizer: tokenizer::load(dir)? })
    }
}

/// Fails on the first tensor (by name) holding NaN or an infinity: such a
/// model only produces NaN, and would otherwise load without a word.
fn check_finite(vs: &nn::VarStore, weights: &Path) -> Result<()> {
    let mut variables: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, tensor) in variables {
        if tensor.isfinite().all().int64_value(&[]) == 0 {
            anyhow::bail!("{}: tensor `{name}` holds NaN or infinite values", weights.display());
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{corpus, tiny_model};

    #[test]
    fn non_finite_weights_are_an_error_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let (base, _) = tiny_model(dir.path(), &corpus("tinyshakespeare.txt")[..5_000], serde_json::json!({}));
        ModelArtifact::open(&base, Device::Cpu).unwrap();
        let weights = base.join("model.safetensors");
        let mut tensors = tch::Tensor::read_safetensors(&weights).unwrap();
        let (name, tensor) = tensors.iter_mut().find(|(name, _)| name.ends_with("ln_f.weight")).unwrap();
        let _ = tensor.get(0).fill_(f64::NAN);
        let name = name.clone();
        tch::Tensor::write_safetensors(&tensors, &weights).unwrap();
        let err = format!("{:#}", ModelArtifact::open(&base, Device::Cpu).err().unwrap());
        assert!(err.contains(&format!("tensor `{name}` holds NaN")), "{err}");
    }
}

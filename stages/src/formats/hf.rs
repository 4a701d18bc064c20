//! Exporting a model artifact (`pretrain`, and later `sft`, …) to the Hugging
//! Face layout: `config.json`, `model.safetensors`, `tokenizer.json`, which
//! `transformers` loads as `GPT2LMHeadModel` or `LlamaForCausalLM`.
//!
//! The weights need no conversion: the model keeps HF's parameter names and
//! layouts (see [`crate::model`]), so `model.safetensors` is copied as is and
//! only the configuration is translated. A tied head has no tensor of its own,
//! as in HF's checkpoints; GPT-2 without biases leaves them out, and HF fills
//! them with zeros.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::formats::tokenizer::{self, END_OF_TEXT};
use crate::model::{Arch, ModelConfig};

/// Writes the HF export of the model artifact in `dir` into `out`.
pub fn hugging_face(dir: &Path, out: &Path) -> Result<()> {
    let config_path = dir.join("config.json");
    let config: ModelConfig = serde_json::from_slice(
        &fs::read(&config_path).with_context(|| format!("cannot read {}: not a model artifact", config_path.display()))?,
    )?;
    let eot = tokenizer::load(dir)?.token_to_id(END_OF_TEXT).context("the tokenizer has no <|endoftext|>")?;
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for file in ["model.safetensors", tokenizer::FILE] {
        fs::copy(dir.join(file), out.join(file)).with_context(|| format!("cannot copy {file} into {}", out.display()))?;
    }
    let hf = hf_config(&config, eot);
    fs::write(out.join("config.json"), serde_json::to_string_pretty(&hf)? + "\n")?;
    Ok(())
}

/// The `transformers` configuration of a model.
pub fn hf_config(c: &ModelConfig, eot: u32) -> Value {
    let mut hf = match c.arch {
        Arch::Gpt2 => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": c.d_model,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": c.ffn_hidden,
            "n_positions": c.context,
            "n_ctx": c.context,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": c.norm_eps,
            "resid_pdrop": c.dropout,
            "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout,
        }),
        Arch::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": c.d_model,
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head,
            "intermediate_size": c.ffn_hidden,
            "max_position_embeddings": c.context,
            "hidden_act": "silu",
            "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,
            "attention_bias": c.bias,
            "mlp_bias": c.bias,
            "attention_dropout": c.dropout,
        }),
    };
    let common = json!({
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    });
    hf.as_object_mut().expect("object").extend(common.as_object().expect("object").clone());
    hf
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::testing::{build, tiny, torch_rng};
    use crate::testing::{corpus, python_with, run_python, tokenizer_artifact, write_docs};

    /// `transformers` loads each export and gives the logits llmflow gives.
    #[test]
    fn transformers_loads_the_export_with_the_same_logits() {
        let Some(python) = python_with("transformers") else { return };
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_docs(&dir.join("docs"), "shakespeare", &corpus("tinyshakespeare.txt")[..20_000]);
        tokenizer_artifact(&dir.join("docs"), &dir.join("tok"), serde_json::json!({"vocab_size": 300}));
        let variants = [
            ("gpt2", json!({})),
            ("gpt2", json!({"tie_embeddings": false, "bias": false})),
            ("llama", json!({"n_kv_head": 2})),
            ("llama", json!({"tie_embeddings": true})),
        ];
        for (i, (arch, overrides)) in variants.into_iter().enumerate() {
            let mut fields = overrides;
            fields.as_object_mut().unwrap().insert("vocab_size".into(), json!(300));
            let config = tiny(arch, fields);
            let model_dir = dir.join(format!("model{i}"));
            fs::create_dir_all(&model_dir).unwrap();
            let (vs, gpt) = build(&config, i as i64);
            vs.save(model_dir.join("model.safetensors")).unwrap();
            fs::write(model_dir.join("config.json"), serde_json::to_string(&config).unwrap()).unwrap();
            fs::copy(dir.join("tok").join(tokenizer::FILE), model_dir.join(tokenizer::FILE)).unwrap();
            let export = dir.join(format!("export{i}"));
            hugging_face(&model_dir, &export).unwrap();

            let ids = Tensor::randint(config.vocab_size, [2, config.context], (Kind::Int64, Device::Cpu));
            let logits = tch::no_grad(|| gpt.forward(&ids, false));
            let ids_json: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&ids).unwrap();
            let logits_json: Vec<f32> = Vec::<f32>::try_from(&logits.flatten(0, -1)).unwrap();
            let case = dir.join(format!("case{i}.json"));
            fs::write(&case, json!({"ids": ids_json, "logits": logits_json, "tolerance": 1e-4}).to_string()).unwrap();
            run_python(&python, "check_export.py", &[&export, &case]);
        }
    }
}

//! `command`: run any shell command as a stage.
//!
//! This is how a user adds a stage without writing Rust:
//!
//! ```toml
//! [stages.stats]
//! kind = "command"
//! inputs = { docs = "dedup" }
//! deps = ["scripts/doc_stats.py"]          # contents are part of the key
//! cmd = "python3 scripts/doc_stats.py {inputs.docs} {out}"
//! env = { LC_ALL = "C" }
//! ```
//!
//! `cmd` runs under `sh -c` in the pipeline's directory. Placeholders:
//! `{out}` (the directory to write), `{inputs.NAME}` (an input's directory),
//! `{work}` (a directory that survives an interrupted run) and `{threads}`.
//! Other braces, such as `${HOME}`, are left for the shell. The same paths are
//! also in the environment as `LLMFLOW_OUT`, `LLMFLOW_WORK`, `LLMFLOW_THREADS`
//! and `LLMFLOW_INPUT_<NAME>` (upper case, other characters as `_`); slots
//! that would share a name (gathered variants `s[S=a-b]` and `s[S=a.b]`)
//! are an error naming them.
//!
//! Key: `cmd`, `deps` (their contents) and `env`. `threads` (how many CPU
//! threads the scheduler reserves) is volatile.

use std::collections::BTreeMap;
use std::process::Command as Process;

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Inputs, ParamError, Resources, Stage, StageCtx};

pub struct Command;

#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The shell command.
    pub cmd: String,
    /// Files the command reads (scripts, configs), relative to the pipeline's
    /// directory; editing one rebuilds the stage.
    pub deps: Vec<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// CPU threads to reserve while it runs (default 1).
    #[schemars(range(min = 1, max = 4096))]
    pub threads: Option<usize>,
}

impl Stage for Command {
    const KIND: &'static str = "command";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "run a shell command: cmd with {inputs.NAME} and {out}";
    const INPUTS: Inputs = Inputs::Any;
    const VOLATILE: &'static [&'static str] = &["threads"];
    type Params = Params;

    fn check(params: &Params, inputs: &[String]) -> Result<(), ParamError> {
        if params.cmd.trim().is_empty() {
            return Err(ParamError::new(&["cmd"], "`cmd` is required: the shell command to run"));
        }
        // Two slots under one variable name would leave one input unreachable.
        let mut variables: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for slot in inputs {
            variables.entry(input_variable(slot)).or_default().push(slot);
        }
        if let Some((variable, slots)) = variables.iter().find(|(_, slots)| slots.len() > 1) {
            let base = slots[0].split('[').next().unwrap_or(slots[0]);
            let path: &[&str] = if base == "input" { &["input"] } else { &["inputs", base] };
            let names: Vec<String> = slots.iter().map(|s| format!("`{s}`")).collect();
            return Err(ParamError::new(
                path,
                format!(
                    "inputs {} would all be ${variable}: give them names (or sweep values) that differ in more than punctuation",
                    names.join(", ")
                ),
            ));
        }
        for name in placeholders(&params.cmd).filter_map(|p| p.strip_prefix("inputs.")) {
            if !inputs.iter().any(|i| i == name) {
                let wired = if inputs.is_empty() { "none".to_string() } else { inputs.join(", ") };
                return Err(ParamError::new(
                    &["cmd"],
                    format!("`{{inputs.{name}}}` names no input of this stage (inputs: {wired}); add it to `inputs`"),
                ));
            }
        }
        Ok(())
    }

    fn files(params: &Params) -> Vec<String> {
        params.deps.clone()
    }

    fn resources(params: &Params) -> Resources {
        Resources { threads: Some(params.threads.unwrap_or(1)), ..Default::default() }
    }

    fn run(params: &Params, ctx: &mut StageCtx) -> Result<()> {
        let script = substitute(&params.cmd, ctx)?;
        let mut child = Process::new("sh");
        child.arg("-c").arg(&script).current_dir(&ctx.project_dir);
        child.env("LLMFLOW_OUT", &ctx.out).env("LLMFLOW_WORK", &ctx.work);
        child.env("LLMFLOW_THREADS", ctx.threads.to_string());
        for (name, dir) in &ctx.inputs {
            child.env(input_variable(name), dir);
        }
        child.envs(&params.env);
        eprintln!("$ {script}");
        let status = child.status().context("cannot start `sh`")?;
        if !status.success() {
            match status.code() {
                Some(code) => bail!("command exited with status {code}: {script}"),
                None => bail!("command was killed by a signal: {script}"),
            }
        }
        Ok(())
    }
}

/// `LLMFLOW_INPUT_<NAME>`: the slot name upper-cased, anything but letters
/// and digits as `_` (a gathered variant's slot is `runs[lr=3e-3]`).
fn input_variable(slot: &str) -> String {
    let name: String = slot.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("LLMFLOW_INPUT_{name}")
}

/// The `{...}` placeholders llmflow substitutes; other braces are the shell's.
fn placeholders(cmd: &str) -> impl Iterator<Item = &str> {
    cmd.match_indices('{').filter_map(move |(start, _)| {
        let rest = &cmd[start + 1..];
        let end = rest.find('}')?;
        let name = &rest[..end];
        let ours = matches!(name, "out" | "work" | "threads") || name.starts_with("inputs.");
        ours.then_some(name)
    })
}

/// Replaces llmflow's placeholders in one pass: a substituted path that
/// itself contains `{out}` is left as it is.
fn substitute(cmd: &str, ctx: &StageCtx) -> Result<String> {
    let mut script = String::with_capacity(cmd.len());
    let mut rest = cmd;
    while let Some(start) = rest.find('{') {
        script.push_str(&rest[..start]);
        let tail = &rest[start + 1..];
        let name = tail.find('}').map(|end| &tail[..end]);
        let value = match name {
            Some("out") => shell_quote(&ctx.out.to_string_lossy()),
            Some("work") => shell_quote(&ctx.work.to_string_lossy()),
            Some("threads") => ctx.threads.to_string(),
            Some(input) if input.starts_with("inputs.") => shell_quote(&ctx.input(&input["inputs.".len()..])?.to_string_lossy()),
            _ => {
                script.push('{');
                rest = tail;
                continue;
            }
        };
        script.push_str(&value);
        rest = &tail[name.map_or(0, str::len) + 1..];
    }
    script.push_str(rest);
    Ok(script)
}

fn shell_quote(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:=@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_llmflow_placeholders_are_found() {
        let found: Vec<_> = placeholders("cat {inputs.docs}/a ${HOME} {out} {x} {threads}").collect();
        assert_eq!(found, ["inputs.docs", "out", "threads"]);
    }

    #[test]
    fn substitutes_quoted_paths() {
        let mut ctx = StageCtx::new("s", "/p".as_ref(), "/tmp/o ut".as_ref(), "/w".as_ref());
        ctx.inputs.insert("docs".into(), "/a/docs".into());
        let s = substitute("cp {inputs.docs}/x {out}/ && echo ${HOME}", &ctx).unwrap();
        assert_eq!(s, "cp /a/docs/x '/tmp/o ut'/ && echo ${HOME}");
    }

    #[test]
    fn a_substituted_path_is_not_substituted_again() {
        let ctx = StageCtx::new("s", "/p".as_ref(), "/st{work} $(touch X)/out".as_ref(), "/w".as_ref());
        let s = substitute("ls {out} {x} {", &ctx).unwrap();
        assert_eq!(s, "ls '/st{work} $(touch X)/out' {x} {");
    }

    #[test]
    fn slots_that_share_a_variable_are_rejected() {
        let p = Params { cmd: "true".into(), ..Default::default() };
        let slots = ["s[S=a-b]", "s[S=a.b]", "s[S=a_c]"].map(String::from);
        let err = Command::check(&p, &slots).unwrap_err();
        assert_eq!(err.path, ["inputs", "s"]);
        assert!(err.message.contains("`s[S=a-b]`, `s[S=a.b]`") && err.message.contains("$LLMFLOW_INPUT_S_S_A_B_"), "{}", err.message);
        assert!(Command::check(&p, &slots[1..]).is_ok());
    }

    #[test]
    fn unknown_input_placeholder_is_rejected() {
        let p = Params { cmd: "cat {inputs.nope}".into(), ..Default::default() };
        let err = Command::check(&p, &["docs".to_string()]).unwrap_err();
        assert_eq!(err.path, ["cmd"]);
        assert!(err.message.contains("inputs: docs"), "{}", err.message);
    }
}

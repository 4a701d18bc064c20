//! `llmflow-stage`: the stage runner. The engine (`llmflow`) starts it; it is
//! not meant to be run by hand.
//!
//! * `llmflow-stage kinds` prints every stage kind's declaration as JSON.
//! * `llmflow-stage resolve` reads a resolve request (JSON) on stdin and
//!   prints each stage's params with defaults applied, or what is wrong.
//! * `llmflow-stage run SPEC` runs one stage. The scheduler writes SPEC (the
//!   kind, its params and the stage's context) into the stage's temporary
//!   build directory, with output going to the stage's log; metrics are
//!   written beside SPEC as `metrics.json`.

use std::fs;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use llmflow::protocol::{ResolveRequest, Spec};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["kinds"] => print_json(&llmflow_stages::kinds()),
        ["resolve"] => resolve(),
        ["run", spec] => run(Path::new(spec)),
        _ => {
            eprintln!("usage: llmflow-stage kinds | resolve | run SPEC  (started by `llmflow`)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

fn resolve() -> Result<()> {
    let request: ResolveRequest = serde_json::from_reader(std::io::stdin().lock()).context("reading the resolve request")?;
    print_json(&llmflow_stages::resolve(&request))
}

fn run(spec_path: &Path) -> Result<()> {
    let spec: Spec = serde_json::from_slice(&fs::read(spec_path).context("reading the stage spec")?)?;
    let mut ctx = spec.ctx;
    llmflow_stages::run(&spec.kind, spec.params, &mut ctx)?;
    fs::write(spec_path.with_file_name("metrics.json"), serde_json::to_vec_pretty(ctx.metrics())?)?;
    Ok(())
}

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use llmflow::commands::{self, Format, RunArgs};
use llmflow::error::{ConfigError, Interrupted, StageFailed};
use llmflow::protocol::Sampling;

/// Train a language model from scratch as a declarative, content-hashed pipeline.
///
/// Stages live in pipeline.toml; `llmflow run` builds what is missing or
/// stale and reuses every artifact whose inputs, params and implementation are
/// unchanged. Edit the file and run again: only what your change invalidated
/// is rebuilt.
#[derive(Parser)]
#[command(name = "llmflow", version, max_term_width = 100)]
#[command(after_help = "Examples:
  llmflow run                          build every stage (nothing, if all are fresh)
  llmflow run tokens                   build `tokens` and what it needs
  llmflow status                       what is fresh, and why the rest is not
  llmflow status sft --json            `sft` and what it needs, for scripts
  llmflow run --dry-run                what a run would build, why, and what it costs
  llmflow generate pretrain -p \"ROMEO:\"
  llmflow report                       the report card (of the pipeline's eval stage)
  llmflow kinds pretrain               pretrain's params, their defaults and what each does
  llmflow push                         share what is built here on the pipeline's remote

A STAGE is a stage's name, one variant of a swept stage ('pretrain[lr=3e-3]'),
or a pattern naming several ('pretrain[lr=3e-3,*]'), wherever a verb takes one.
Every verb that prints for scripts takes --json.

Exit codes: 0 success, 1 a stage failed (or verify found damage), 2 a mistake in pipeline.toml or the command line, 130 interrupted.")]
struct Cli {
    /// The pipeline file.
    #[arg(short, long, global = true, default_value = "pipeline.toml", value_name = "PATH")]
    file: PathBuf,
    /// Leave the pipeline's remote (`[pipeline] remote`) alone: build and look only here.
    #[arg(long, global = true)]
    offline: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build TARGETs (default: every stage) and whatever they need.
    Run {
        /// Stages to build; their inputs are built first.
        #[arg(value_name = "STAGE")]
        targets: Vec<String>,
        /// Show what would be built and why, without building.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: the plan for scripts.
        #[arg(long, requires = "dry_run")]
        json: bool,
        /// Rebuild STAGE even if it is fresh (repeatable).
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Stages to run at once [default: number of cores].
        #[arg(short, long, value_name = "N")]
        jobs: Option<usize>,
        /// After a failure, keep building stages that do not depend on it.
        #[arg(short, long)]
        keep_going: bool,
    },
    /// Show each stage: fresh, stale (and why), missing, queued (on Slurm), running or failed.
    Status {
        /// Stages to show, with what they need, as `run` would build them [default: every stage].
        #[arg(value_name = "STAGE")]
        targets: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Upload built artifacts to the pipeline's remote (`[pipeline] remote`).
    ///
    /// Pushes the stages named and what they need (default: every stage)
    /// that are built here and missing on the remote: each file once, by its
    /// BLAKE3, then the artifact's entry. `run` pushes what it builds unless
    /// `remote_push = false`.
    Push {
        #[arg(value_name = "STAGE")]
        targets: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Fetch artifacts from the pipeline's remote into this store.
    ///
    /// Pulls the stages named and what they need (default: every stage) that
    /// the remote has and this store lacks, every file checked against its
    /// BLAKE3. `run` pulls by itself what it would otherwise build.
    Pull {
        #[arg(value_name = "STAGE")]
        targets: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the stage graph.
    Dag {
        /// text, dot (Graphviz), mermaid, or json for scripts.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Show a stage's artifact: manifest, metrics and paths; a table of variants for a swept stage.
    Show {
        /// The stage, a variant, or a pattern of variants.
        stage: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the report card a stage wrote (an eval stage's scores, centered scores, throughput).
    Report {
        /// The stage [default: the pipeline's only stage whose kind writes a report].
        stage: Option<String>,
        /// Print the report for scripts (an eval stage's results.json) instead.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every artifact and cached unit in the store, and the files stages read; report damage.
    Verify {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove artifacts that no pipeline using the store needs.
    ///
    /// Keeps every stage's current artifact for this pipeline file and for
    /// every other pipeline file that has run into the same store. Removes
    /// only what llmflow made: `<stage>/<key>` folders with a manifest, their
    /// logs, and its own work, temporary and state files. Waits while a run
    /// uses the store.
    Gc {
        /// List what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Fail at once, naming who uses the store, instead of waiting.
        #[arg(long)]
        no_wait: bool,
        /// Keep only what this pipeline file uses, even if other pipeline
        /// files build into the same store.
        #[arg(long)]
        only_this_pipeline: bool,
        /// Machine-readable output: what was (or would be) removed.
        #[arg(long)]
        json: bool,
    },
    /// Sample text from a trained model: the artifact of STAGE (pretrain, sft, …).
    Generate {
        /// The stage whose model to sample from; it must be built and fresh.
        stage: String,
        /// The text to continue.
        #[arg(long, short)]
        prompt: String,
        /// New tokens at most; generation also stops at <|endoftext|>.
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        /// Sampling temperature; 0 samples greedily.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Sample among the K most likely tokens only.
        #[arg(long, value_name = "K")]
        top_k: Option<usize>,
        /// Sample among the most likely tokens whose probabilities add up to P (nucleus sampling).
        #[arg(long, value_name = "P")]
        top_p: Option<f64>,
        /// Seeds the sampling: the same seed and prompt give the same text.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a trained model in the Hugging Face layout (transformers loads it).
    Export {
        /// The stage whose model to export; it must be built and fresh.
        stage: String,
        #[arg(long, value_enum, default_value = "hf")]
        format: ExportFormat,
        /// The directory to write config.json, model.safetensors and tokenizer.json into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Size, FLOPs, memory and expected time of building STAGE (training stages).
    Estimate {
        stage: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List the stage kinds llmflow knows, or print KIND's params with their defaults as TOML.
    Kinds {
        /// A kind, e.g. `pretrain`.
        kind: Option<String>,
        /// The kinds' declarations (inputs, volatile params, report) for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print the BLAKE3 digest of files, as `b3sum` does, with llmflow's hasher.
    #[command(hide = true)]
    Hash { files: Vec<PathBuf> },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// GPT2LMHeadModel or LlamaForCausalLM: config.json, model.safetensors, tokenizer.json.
    Hf,
}

// Loading a 10,000-stage pipeline makes hundreds of thousands of small
// allocations across threads: mimalloc spares a no-op `status` a quarter of
// its time against glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    llmflow::remote::OFFLINE.store(cli.offline, std::sync::atomic::Ordering::Relaxed);
    let result = match cli.command {
        Cmd::Run { targets, dry_run, json, force, jobs, keep_going } => {
            commands::run(&cli.file, RunArgs { targets, dry_run, json, force, jobs, keep_going })
        }
        Cmd::Status { targets, json } => commands::status(&cli.file, &targets, json),
        Cmd::Push { targets, json } => commands::push(&cli.file, &targets, json),
        Cmd::Pull { targets, json } => commands::pull(&cli.file, &targets, json),
        Cmd::Dag { format } => commands::dag(&cli.file, format),
        Cmd::Show { stage, json } => commands::show(&cli.file, &stage, json),
        Cmd::Report { stage, json } => commands::report(&cli.file, stage.as_deref(), json),
        Cmd::Verify { json } => commands::verify(&cli.file, json),
        Cmd::Gc { dry_run, no_wait, only_this_pipeline, json } => commands::gc(&cli.file, dry_run, !no_wait, only_this_pipeline, json),
        Cmd::Generate { stage, prompt, max_tokens, temperature, top_k, top_p, seed } => {
            commands::generate(&cli.file, &stage, prompt, Sampling { max_tokens, temperature, top_k, top_p, seed })
        }
        Cmd::Export { stage, format: ExportFormat::Hf, out } => commands::export(&cli.file, &stage, &out),
        Cmd::Estimate { stage, json } => commands::estimate(&cli.file, &stage, json),
        Cmd::Kinds { kind, json } => commands::kinds(kind.as_deref(), json),
        Cmd::Hash { files } => commands::hash(&files),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`llmflow status | head -1`): nothing is wrong.
        Err(e) if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)) => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            let (code, text) = if e.is::<ConfigError>() {
                (2, format!("{e}"))
            } else if e.is::<Interrupted>() {
                (130, format!("{e}"))
            } else if e.is::<StageFailed>() {
                (1, format!("{e}"))
            } else {
                (1, format!("{e:#}"))
            };
            eprintln!("{} {text}", console::style("error:").red().bold());
            ExitCode::from(code)
        }
    }
}

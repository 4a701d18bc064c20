//! Throughput of the data stages, each run as the stage runner runs it (by
//! kind name, on a documents artifact, params over the kind's defaults).
//! One JSON line per measurement on stdout; `bench/run.sh` and
//! `bench/tokenize.sh` put them beside the Python tools in one table.
//!
//! usage: cargo bench -p llmflow-stages --bench data -- minhash|filter|tokenizer|encode
//!   minhash, filter: on the corpus in `$LLMFLOW_BENCH_CORPUS` (bench/make_corpus.py)
//!   tokenizer, encode: on the shipped Austen corpus; encode runs
//!   bench/encode_python.py on the same tokenizer with `$LLMFLOW_PYTHON`
//!   (default python3) and `$BENCH_THREADS` threads (default: all cores)

use std::path::{Path, PathBuf};
use std::time::Instant;

use llmflow_protocol::{ResolveRequest, StageCtx, StageRequest};
use llmflow_stages::formats::{docs, tokenizer};
use serde_json::{json, Value};

fn main() {
    let which: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    for name in &which {
        match name.as_str() {
            "minhash" => minhash(),
            "filter" => filter(),
            "tokenizer" => train_tokenizer(),
            "encode" => encode(),
            other => panic!("unknown benchmark `{other}`: minhash, filter, tokenizer or encode"),
        }
    }
}

/// Runs stage kind `kind` by name with `params` over its defaults on the
/// documents artifact `input`; returns its context (for metrics).
fn run(kind: &str, params: Value, input: &Path, out: &Path) -> StageCtx {
    std::fs::create_dir_all(out).unwrap();
    let mut ctx = StageCtx::new("bench", input, out, out);
    ctx.inputs.insert("input".into(), input.to_path_buf());
    ctx.threads = std::thread::available_parallelism().unwrap().get();
    let request =
        ResolveRequest { stages: vec![StageRequest { name: "bench".into(), kind: kind.into(), params, inputs: vec!["input".into()] }] };
    let resolved = llmflow_stages::kinds::resolve(&request).stages.remove(0).unwrap().unwrap();
    llmflow_stages::kinds::run(kind, resolved.params, &mut ctx).unwrap();
    ctx
}

/// A documents artifact in `dir` with `texts`, ids `d0`, `d1`, ….
fn documents(dir: &Path, texts: &[String]) {
    std::fs::create_dir_all(dir).unwrap();
    let ids = (0..texts.len()).map(|i| format!("d{i}")).collect();
    let df = docs::frame(ids, texts.to_vec(), vec!["bench".to_string(); texts.len()]).unwrap();
    docs::write(dir, &df).unwrap();
}

/// The benchmark corpus of `bench/make_corpus.py`: its directory and texts.
fn bench_corpus() -> (PathBuf, Vec<String>) {
    let dir = PathBuf::from(std::env::var("LLMFLOW_BENCH_CORPUS").expect("set LLMFLOW_BENCH_CORPUS; see bench/run.sh"));
    let texts = std::fs::read_to_string(dir.join("corpus.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["text"].as_str().unwrap().to_string())
        .collect();
    (dir, texts)
}

fn austen() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/corpora/austen.txt")).unwrap()
}

/// MinHash dedup: throughput, and recall and precision on the planted pairs.
fn minhash() {
    let (dir, texts) = bench_corpus();
    let tmp = tempfile::tempdir().unwrap();
    documents(&tmp.path().join("in"), &texts);
    // The stage's own work: Parquet in, dedup, Parquet out.
    let started = Instant::now();
    let ctx = run("dedup", json!({}), &tmp.path().join("in"), &tmp.path().join("out"));
    let seconds = started.elapsed().as_secs_f64();
    let clusters = docs::read_table(&tmp.path().join("out").join("clusters")).unwrap();
    let cluster: Vec<&str> = clusters.column("cluster").unwrap().str().unwrap().iter().map(Option::unwrap).collect();
    let truth: Vec<Value> =
        std::fs::read_to_string(dir.join("truth.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let same = |t: &Value| cluster[t["a"].as_u64().unwrap() as usize] == cluster[t["b"].as_u64().unwrap() as usize];
    let high: Vec<_> = truth.iter().filter(|t| t["jaccard"].as_f64().unwrap() >= 0.85).collect();
    let low: Vec<_> = truth.iter().filter(|t| t["jaccard"].as_f64().unwrap() < 0.6).collect();
    let bytes: usize = texts.iter().map(String::len).sum();
    let report = json!({
        "impl": "llmflow", "documents": texts.len(), "seconds": seconds,
        "docs_per_s": texts.len() as f64 / seconds, "mb_per_s": bytes as f64 / 1e6 / seconds,
        "removed": texts.len() as u64 - ctx.metrics()["documents_out"].as_u64().unwrap(),
        "recall_above_0.85": high.iter().filter(|t| same(t)).count() as f64 / high.len() as f64,
        "merged_below_0.6": low.iter().filter(|t| same(t)).count(),
    });
    println!("{report}");
}

/// The quality filter at its defaults and at the loosened ones for prose.
fn filter() {
    let (_, texts) = bench_corpus();
    let bytes: usize = texts.iter().map(String::len).sum();
    let tmp = tempfile::tempdir().unwrap();
    documents(&tmp.path().join("in"), &texts);
    let novel = json!({
        "min_chars": 20, "language": {"threshold": 0.5},
        "gopher_quality": {"min_words": 3, "min_stop_words": 1, "min_alpha_words_ratio": 0.5},
        "c4": {"enabled": false}, "fineweb": {"enabled": false},
    });
    for (name, params) in [("defaults", json!({})), ("novel", novel)] {
        let started = Instant::now();
        let ctx = run("filter", params, &tmp.path().join("in"), &tmp.path().join(name));
        let seconds = started.elapsed().as_secs_f64();
        let report = json!({
            "impl": "llmflow-filter", "params": name, "documents": texts.len(), "seconds": seconds,
            "mb_per_s": bytes as f64 / 1e6 / seconds, "kept": ctx.metrics()["documents_out"],
        });
        println!("{report}");
    }
}

/// `train_tokenizer` at its defaults on Austen's paragraphs.
fn train_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let paragraphs: Vec<String> = austen().split("\n\n").filter(|p| !p.trim().is_empty()).map(String::from).collect();
    documents(&tmp.path().join("docs"), &paragraphs);
    let ctx = run("train_tokenizer", json!({}), &tmp.path().join("docs"), &tmp.path().join("tok"));
    println!("{}", json!({"impl": "llmflow-train_tokenizer", "metrics": Value::Object(ctx.metrics().clone())}));
}

/// The `shard` stage's batch encoder against Python's `encode_batch`: the
/// same tokenizer, documents and thread count.
fn encode() {
    let threads = std::env::var("BENCH_THREADS")
        .map_or_else(|_| std::thread::available_parallelism().unwrap().get(), |t| t.parse().expect("BENCH_THREADS is a number"));
    let tmp = tempfile::tempdir().unwrap();
    let text = austen();
    let docs: Vec<&str> = text.split("\n\n").filter(|p| !p.trim().is_empty()).collect();
    documents(&tmp.path().join("docs"), &docs.iter().map(|d| d.to_string()).collect::<Vec<_>>());
    run("train_tokenizer", json!({}), &tmp.path().join("docs"), &tmp.path().join("tok"));
    let tok = tokenizer::load(&tmp.path().join("tok")).unwrap();
    let bytes: usize = docs.iter().map(|d| d.len()).sum();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let start = Instant::now();
    let encoder = tokenizer::BatchEncoder::new(&tok).unwrap();
    let tokens: usize = pool.install(|| encoder.encode(&docs)).unwrap().iter().map(Vec::len).sum();
    let seconds = start.elapsed().as_secs_f64();
    let rust = bytes as f64 / 1e6 / seconds;
    eprintln!("shard: {} documents, {:.2} MB, {tokens} tokens in {seconds:.3} s on {threads} threads", docs.len(), bytes as f64 / 1e6);
    let python = std::env::var("LLMFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/encode_python.py");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/corpora/austen.txt");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(tmp.path().join("tok").join(tokenizer::FILE))
        .arg(corpus)
        .arg(threads.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    eprint!("{stdout}");
    let python: f64 = stdout.lines().find_map(|l| l.strip_prefix("python_mb_per_s=")).unwrap().parse().unwrap();
    println!(
        "{}",
        json!({"impl": "encode", "threads": threads, "llmflow_mb_per_s": rust, "python_mb_per_s": python, "ratio": rust / python})
    );
}

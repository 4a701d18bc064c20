//! The data stages at corpus scale, through the real binaries: peak memory
//! within `memory_mb` on a corpus larger than what the budget leaves for
//! buffers, an added input file downloaded, filtered, signed and tokenized
//! alone with every output equal to a full rebuild's,
//! `against` dedup, corrupt files named with their line or skipped (but
//! not all of them), and cached units checked before they are reused.

mod common;

use std::fs;
use std::path::Path;

use common::Project;

/// `bytes` of JSONL documents of 100–400 words drawn from Austen's
/// vocabulary, seeded; every tenth document repeats an earlier one of the
/// same file (an exact duplicate).
fn jsonl(seed: u64, bytes: usize) -> String {
    let text = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/corpora/austen.txt")).unwrap();
    let mut vocabulary: Vec<&str> = text.split_whitespace().collect();
    vocabulary.sort_unstable();
    vocabulary.dedup();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let (mut out, mut docs) = (String::new(), Vec::new());
    while out.len() < bytes {
        let doc = if docs.len() % 10 == 9 {
            let earlier: &String = &docs[next(docs.len())];
            earlier.clone()
        } else {
            let words: Vec<&str> = (0..100 + next(300)).map(|_| vocabulary[next(vocabulary.len())]).collect();
            words.join(" ")
        };
        out.push_str(&serde_json::json!({ "text": doc }).to_string());
        out.push('\n');
        docs.push(doc);
    }
    out
}

fn metrics(p: &Project, stage: &str) -> serde_json::Value {
    p.manifest(stage)["metrics"].clone()
}

/// Every file of a stage's output, by path, with its bytes.
fn outputs(p: &Project, stage: &str) -> Vec<(String, Vec<u8>)> {
    let root = p.out_dir(stage);
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push((path.strip_prefix(&root).unwrap().to_string_lossy().into_owned(), fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

const STAGES: &str = r#"
[stages.corpus]
kind = "download"
sources = [{ url = "raw/*.jsonl" }]
memory_mb = 256
part_mb = PART

[stages.clean]
kind = "filter"
input = "corpus"
memory_mb = 256
part_mb = PART
min_chars = 20
language = { enabled = false }
gopher_repetition = { enabled = false }
gopher_quality = { enabled = false }
c4 = { enabled = false }
fineweb = { enabled = false }

[stages.dedup]
kind = "dedup"
input = "clean"
memory_mb = 256
part_mb = PART
"#;

#[test]
fn peak_memory_stays_within_the_budget_on_a_corpus_larger_than_it() {
    // 192 MB of text against a budget that leaves 128 MB for buffers.
    let p = Project::new(&STAGES.replace("PART", "16"));
    for file in 0..6 {
        p.write(&format!("raw/{file}.jsonl"), &jsonl(file, 32 << 20));
    }
    let run = p.llmflow(&["run"]);
    assert_eq!(run.code, 0, "{}", run.all());
    for stage in ["corpus", "clean", "dedup"] {
        let m = metrics(&p, stage);
        let peak = m["peak_rss_mb"].as_f64().unwrap();
        eprintln!("{stage}: peak {peak} MB");
        assert!(peak <= 256.0, "{stage} peaked at {peak} MB over its 256 MB budget");
    }
    assert!(metrics(&p, "corpus")["text_bytes"].as_u64().unwrap() > 190_000_000);
    assert!(fs::read_dir(p.out_dir("corpus").join("docs")).unwrap().count() >= 12, "16 MB parts");
    assert!(metrics(&p, "dedup")["duplicate_fraction"].as_f64().unwrap() > 0.09);
}

/// A tokenizer trained on a file of its own (so it stays the same when the
/// corpus grows) and `shard` on the deduplicated documents, in shards of
/// 200,000 tokens that run across the 1 MB parts.
const SHARD: &str = r#"
[stages.vocab]
kind = "download"
sources = [{ url = "vocab.txt", split = "paragraph" }]

[stages.tok]
kind = "train_tokenizer"
input = "vocab"
vocab_size = 512

[stages.tokens]
kind = "shard"
inputs = { docs = "dedup", tokenizer = "tok" }
shard_tokens = 200000
"#;

#[test]
fn an_added_file_is_processed_alone_and_the_result_equals_a_full_rebuild() {
    let stages = format!(
        "{}{SHARD}\n[stages.more]\nkind = \"download\"\nsources = [{{ url = \"more.jsonl\" }}]\n\n[stages.more_dedup]\nkind = \"dedup\"\ninputs = {{ input = \"more\", against = \"dedup\" }}\n",
        STAGES.replace("PART", "1")
    );
    let incremental = Project::new(&stages);
    let full = Project::new(&stages);
    let files: Vec<String> = (0..4).map(|seed| jsonl(seed, 2 << 20)).collect();
    for (n, text) in files.iter().enumerate() {
        full.write(&format!("raw/{n}.jsonl"), text);
        if n < 3 {
            incremental.write(&format!("raw/{n}.jsonl"), text);
        }
    }
    // `more`: 50 documents of file 0 and 50 of its own (5 of them repeats).
    let own = jsonl(9, 200_000);
    let more: Vec<&str> = files[0].lines().take(50).chain(own.lines().take(50)).collect();
    let vocab = jsonl(7, 200_000);
    for p in [&incremental, &full] {
        p.write("more.jsonl", &(more.join("\n") + "\n"));
        p.write("vocab.txt", &vocab.replace("{\"text\":", "\n"));
    }
    let run = incremental.llmflow(&["run", "tokens"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let parts_before = outputs(&incremental, "dedup").into_iter().filter(|(path, _)| path.starts_with("docs/")).collect::<Vec<_>>();
    incremental.write("raw/3.jsonl", &files[3]);
    let run = incremental.llmflow(&["run"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(metrics(&incremental, "corpus")["files_cached"], 3);
    // One part per 2 MB file: the three old parts are linked, the new one filtered and signed.
    assert_eq!(metrics(&incremental, "clean")["parts_cached"], 3);
    assert_eq!(fs::read_dir(incremental.out_dir("clean").join("units")).unwrap().count(), 4);
    assert_eq!(metrics(&incremental, "dedup")["parts_cached"], 3);
    // Dedup's output parts before the new documents are unchanged: shard
    // encodes only the parts that changed or are new, and packs all runs.
    let parts_after: Vec<_> = outputs(&incremental, "dedup").into_iter().filter(|(path, _)| path.starts_with("docs/")).collect();
    let unchanged = parts_after.iter().filter(|part| parts_before.contains(part)).count();
    assert!(unchanged >= 1 && unchanged < parts_after.len(), "{unchanged} of {} parts unchanged", parts_after.len());
    let m = metrics(&incremental, "tokens");
    assert_eq!(m["parts_cached"], unchanged, "{m}");
    let log = fs::read_dir(incremental.artifacts().join(".logs/tokens"))
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
        .find(|log| log.contains(&format!("{unchanged} unchanged since a cached run")))
        .unwrap_or_default();
    assert!(log.contains(&format!("{} of {} parts encoded", parts_after.len() - unchanged, parts_after.len())), "{log}");

    let run = full.llmflow(&["run"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(metrics(&full, "tokens")["parts_cached"], 0);
    for stage in ["corpus", "clean", "dedup", "tokens", "more_dedup"] {
        assert!(outputs(&incremental, stage) == outputs(&full, stage), "{stage}: the incremental build differs from the full one");
        assert_eq!(incremental.manifest(stage)["output_digest"], full.manifest(stage)["output_digest"], "{stage}");
    }
    // Deduplicated against `dedup`: file 0's documents go, the new ones stay.
    let m = metrics(&full, "more_dedup");
    assert_eq!((m["against_duplicates"].as_u64(), m["documents_out"].as_u64()), (Some(50), Some(45)));
}

#[test]
fn a_corrupt_file_is_named_with_its_line_or_skipped() {
    let p = Project::new(&STAGES.replace("PART", "1"));
    p.write("raw/a.jsonl", &jsonl(1, 10_000));
    p.write("raw/b.jsonl", "{\"text\": \"fine\"}\n{\"text\": \"also fine\"}\n{\"text\": broken\n");
    let run = p.llmflow(&["run"]);
    assert_eq!(run.code, 1);
    assert!(run.all().contains("raw/b.jsonl") && run.all().contains("line 3: invalid JSON"), "{}", run.all());

    p.edit("memory_mb = 256\npart_mb = 1\n\n[stages.clean]", "memory_mb = 256\npart_mb = 1\non_error = \"skip\"\n\n[stages.clean]");
    let run = p.llmflow(&["run"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let skipped = &metrics(&p, "corpus")["skipped"];
    assert_eq!(skipped[0]["file"], "raw/b.jsonl");
    assert!(skipped[0]["error"].as_str().unwrap().contains("line 3"), "{skipped}");
    let log = fs::read_dir(p.artifacts().join(".logs/corpus"))
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
        .collect::<String>();
    assert!(log.contains("warning: skipped raw/b.jsonl: line 3: invalid JSON"), "{log}");
}

#[test]
fn a_corrupt_part_of_a_command_output_is_named_by_filter_or_skipped() {
    // `mixed` publishes a good part and a copy of it with its first data
    // page overwritten; nothing checks a command's output, filter is the
    // first to read it.
    let p = Project::new(
        r#"
[stages.corpus]
kind = "download"
sources = [{ url = "raw/*.jsonl" }]

[stages.mixed]
kind = "command"
inputs = { docs = "corpus" }
cmd = "mkdir -p {out}/docs && cp {inputs.docs}/docs/part-00000.parquet {out}/docs/ && cp {inputs.docs}/docs/part-00000.parquet {out}/docs/part-00001.parquet && printf '%0100d' 0 | dd of={out}/docs/part-00001.parquet bs=1 seek=64 conv=notrunc 2>/dev/null"

[stages.clean]
kind = "filter"
input = "mixed"
min_chars = 20
language = { enabled = false }
gopher_repetition = { enabled = false }
gopher_quality = { enabled = false }
c4 = { enabled = false }
fineweb = { enabled = false }
"#,
    );
    p.write("raw/a.jsonl", &jsonl(1, 100_000));
    let run = p.llmflow(&["run"]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.all().contains("cannot read docs/part-00001.parquet"), "{}", run.all());
    assert!(run.all().contains("part-00001.parquet: row group 0 (rows 0.."), "{}", run.all());

    p.edit("fineweb = { enabled = false }", "fineweb = { enabled = false }\non_error = \"skip\"");
    let run = p.llmflow(&["run"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let m = metrics(&p, "clean");
    assert_eq!(m["skipped"][0]["file"], "docs/part-00001.parquet", "{m}");
    assert!(m["skipped"][0]["error"].as_str().unwrap().contains("row group 0"), "{m}");
    assert_eq!(m["documents_in"], metrics(&p, "corpus")["documents"], "the good part is filtered");
    let log = fs::read_dir(p.artifacts().join(".logs/clean"))
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
        .collect::<String>();
    assert!(log.contains("warning: skipped docs/part-00001.parquet:"), "{log}");
}

#[test]
fn skipping_every_file_fails_the_stage_naming_them() {
    let p = Project::new(&STAGES.replace("PART", "1").replacen("part_mb = 1\n", "part_mb = 1\non_error = \"skip\"\n", 1));
    p.write("raw/a.jsonl", "{\"text\": broken\n");
    // Named as gzip, but plain text: the error says so rather than "invalid JSON".
    p.write("raw/b.jsonl.gz", "{\"text\": \"plain, not gzip\"}\n");
    p.edit("url = \"raw/*.jsonl\"", "url = \"raw/*.jsonl*\"");
    let run = p.llmflow(&["run", "corpus"]);
    assert_eq!(run.code, 1, "{}", run.all());
    let all = run.all();
    assert!(all.contains("every input was skipped") && all.contains("raw/a.jsonl, raw/b.jsonl.gz"), "{all}");
    assert!(all.contains("raw/a.jsonl: line 1: invalid JSON"), "{all}");
    assert!(all.contains("raw/b.jsonl.gz: cannot decompress: the name ends in `.gz` but the bytes are not gzip data"), "{all}");
    assert_ne!(p.state("corpus"), "fresh", "nothing is published");

    // A good file beside them is published alone.
    p.write("raw/c.jsonl", &jsonl(3, 5_000));
    let run = p.llmflow(&["run", "corpus"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(metrics(&p, "corpus")["skipped"].as_array().map(Vec::len), Some(2));
}

#[test]
fn filter_skipping_every_part_fails() {
    let p = Project::new(
        r#"
[stages.broken]
kind = "command"
cmd = "mkdir -p {out}/docs && echo 'not parquet' > {out}/docs/part-00000.parquet"

[stages.clean]
kind = "filter"
input = "broken"
on_error = "skip"
language = { enabled = false }
fineweb = { enabled = false }
"#,
    );
    let run = p.llmflow(&["run"]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.all().contains("every input was skipped") && run.all().contains("docs/part-00000.parquet"), "{}", run.all());
    assert_ne!(p.state("clean"), "fresh");
}

/// A stage that writes into its input's token runs (root ignores their
/// 0444; the runs are the cache's own inodes): the engine notices, and the
/// rebuild under the same key makes the runs again rather than link the
/// damaged ones back, so its output equals a fresh store's.
#[test]
fn a_damaged_artifact_is_not_the_source_of_its_rebuild() {
    let pipeline = format!(
        "{}\n[stages.vandal]\nkind = \"command\"\ninputs = {{ t = \"tokens\" }}\ncmd = \"for f in {{inputs.t}}/units/*.tokens.bin; do chmod u+w $f; dd if=/dev/zero of=$f bs=4096 count=1 conv=notrunc 2>/dev/null; done; touch {{out}}/done\"\n",
        common::TINY_DATA
    );
    let p = Project::new(&pipeline);
    let fresh = Project::new(&pipeline);
    for project in [&p, &fresh] {
        project.write_corpus(30_000);
        let run = project.llmflow(&["run", "tokens"]);
        assert_eq!(run.code, 0, "{}", run.all());
    }
    let run = p.llmflow(&["run", "vandal"]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.all().contains("wrote into its input"), "{}", run.all());
    // `verify` sees the cached units the vandal damaged through the artifact's links.
    let verify = p.llmflow(&["verify"]);
    assert_eq!(verify.code, 1, "{}", verify.all());
    assert!(verify.stdout.contains(".tokens.bin: its bytes differ from its recorded BLAKE3"), "{}", verify.stdout);
    let run = p.llmflow(&["run", "tokens"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(run.built(), ["tokens"]);
    let (got, want) = (p.manifest("tokens"), fresh.manifest("tokens"));
    assert_eq!(got["key"], want["key"]);
    assert_eq!(got["output_digest"], want["output_digest"], "the rebuild reused damaged token runs");
    assert_eq!(p.llmflow(&["verify"]).code, 0);
    // `gc` keeps the units in use with their sidecars, and nothing it leaves fails `verify`.
    assert_eq!(p.llmflow(&["gc"]).code, 0);
    let cache: Vec<String> = std::fs::read_dir(p.artifacts().join(".cache/shard"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let sidecars = cache.iter().filter(|n| n.ends_with(".blake3")).count();
    assert!(sidecars > 0 && sidecars * 2 == cache.len(), "a sidecar for each unit file: {cache:?}");
    let verify = p.llmflow(&["verify", "--json"]);
    assert_eq!(verify.code, 0, "{}", verify.all());
    let json: serde_json::Value = serde_json::from_str(&verify.stdout).unwrap();
    assert_eq!(json["unrecorded_units"], 0, "{json}");
}

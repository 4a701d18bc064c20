//! Sweeps: variants of a stage from one table, fan-out of the stages that
//! read it, gathering variants into one stage, targeting by pattern, and
//! the mistakes a sweep can hold.

mod common;

use common::{config_error, Project, TINY_DATA};

/// data → train (swept over LR × N) → eval (fans out) → summary (gathers every eval).
/// Each command logs its run in runs/STAGE with the values it saw.
const SWEPT: &str = r#"
[stages.data]
kind = "command"
cmd = "mkdir -p runs && echo run >> runs/data && echo corpus > {out}/d"

[stages.train]
kind = "command"
input = "data"
cmd = "mkdir -p runs && echo $LR-$N >> runs/train && echo $LR $N > {out}/m"
sweep = { "env.LR" = ["1e-3", "3e-3"], "env.N" = ["2", "4"] }

[stages.eval]
kind = "command"
input = "train"
cmd = "mkdir -p runs && cat {inputs.input}/m >> runs/eval && cat {inputs.input}/m > {out}/score"

[stages.summary]
kind = "command"
inputs = { runs = "eval[*]" }
cmd = "mkdir -p runs && echo run >> runs/summary && env | grep '^LLMFLOW_INPUT_' | sort | sed 's/=.*//' > {out}/slots"
"#;

fn lines(p: &Project, file: &str) -> Vec<String> {
    let mut l: Vec<String> = p.read(file).lines().map(str::to_string).collect();
    l.sort();
    l
}

#[test]
fn a_sweep_expands_fans_out_gathers_and_reuses_unchanged_variants() {
    let p = Project::new(SWEPT);
    let r = p.llmflow(&["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let mut built = r.built();
    built.sort();
    assert_eq!(
        built,
        [
            "data",
            "eval[LR=1e-3,N=2]",
            "eval[LR=1e-3,N=4]",
            "eval[LR=3e-3,N=2]",
            "eval[LR=3e-3,N=4]",
            "summary",
            "train[LR=1e-3,N=2]",
            "train[LR=1e-3,N=4]",
            "train[LR=3e-3,N=2]",
            "train[LR=3e-3,N=4]"
        ]
    );
    assert_eq!(p.runs("data"), 1, "the unswept upstream is built once");
    assert_eq!(lines(&p, "runs/train"), ["1e-3-2", "1e-3-4", "3e-3-2", "3e-3-4"]);
    // Each eval variant read its own train variant.
    assert_eq!(lines(&p, "runs/eval"), ["1e-3 2", "1e-3 4", "3e-3 2", "3e-3 4"]);
    let slots = std::fs::read_to_string(p.out_dir("summary").join("slots")).unwrap();
    assert_eq!(slots.lines().count(), 4, "summary reads every eval variant: {slots}");

    // status --json carries the table name and the variant's values.
    let s = p.status_json();
    let v = s["stages"].as_array().unwrap().iter().find(|x| x["name"] == "eval[LR=3e-3,N=4]").unwrap();
    assert_eq!((v["stage"].as_str(), v["variant"]["LR"].as_str(), v["variant"]["N"].as_str()), (Some("eval"), Some("3e-3"), Some("4")));
    let text = p.llmflow(&["status"]).stdout;
    assert!(text.contains("train") && text.contains("4 variants: 4 fresh"), "{text}");
    let dag = p.llmflow(&["dag"]).stdout;
    assert!(dag.contains("eval (command), 4 variants:\n  [LR=1e-3,N=2] ← input=train[LR=1e-3,N=2]\n"), "{dag}");

    // Replacing one value builds only the new variants and what gathers them.
    p.edit(r#"["1e-3", "3e-3"]"#, r#"["1e-3", "1e-2"]"#);
    let r = p.llmflow(&["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let mut built = r.built();
    built.sort();
    assert_eq!(built, ["eval[LR=1e-2,N=2]", "eval[LR=1e-2,N=4]", "summary", "train[LR=1e-2,N=2]", "train[LR=1e-2,N=4]"]);
    assert!(p.llmflow(&["run"]).built().is_empty());
}

#[test]
fn patterns_target_variants_on_the_command_line() {
    let p = Project::new(SWEPT);
    // `3e-3` and `0.003` name the same value; `*` leaves the rest open.
    let r = p.llmflow(&["run", "eval[LR=0.003,*]"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let mut built = r.built();
    built.sort();
    assert_eq!(built, ["data", "eval[LR=3e-3,N=2]", "eval[LR=3e-3,N=4]", "train[LR=3e-3,N=2]", "train[LR=3e-3,N=4]"]);
    // A plain name is every variant; an exact name is one.
    let r = p.llmflow(&["run", "train"]);
    assert_eq!(r.built().len(), 2, "{}", r.all());
    let one = p.llmflow(&["show", "train[N=2,LR=1e-3]"]);
    assert_eq!(one.code, 0, "{}", one.all());
    assert!(one.stdout.starts_with("train[LR=1e-3,N=2] (command) — fresh"), "{}", one.stdout);
    let group = p.llmflow(&["show", "train"]);
    assert!(group.stdout.starts_with("train (command) — 4 variants"), "{}", group.stdout);

    let bad = p.llmflow(&["run", "train[lr=1e-3,*]"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("`train` varies LR, N; `lr` is not one of them"), "{}", bad.stderr);
    let none = p.llmflow(&["run", "train[LR=5,*]"]);
    assert_eq!(none.code, 2);
    assert!(none.stderr.contains("no variant of `train` matches `train[LR=5,*]`; its variants: train[LR=1e-3,N=2]"), "{}", none.stderr);
    let many = p.llmflow(&["generate", "train", "-p", "x"]);
    assert_eq!(many.code, 2);
    assert!(many.stderr.contains("`train` names 4 variants; name one, e.g. `train[LR=1e-3,N=2]`"), "{}", many.stderr);
}

#[test]
fn zip_pairs_values_and_a_fan_in_joins_matching_variants() {
    let p = Project::new(
        r#"
[stages.a]
kind = "command"
cmd = "echo $X > {out}/x"
sweep = { "env.X" = ["1", "2", "3"], "env.Y" = ["a", "b", "c"] }
sweep_mode = "zip"

[stages.b]
kind = "command"
input = "a"
cmd = "cat {inputs.input}/x > {out}/x"

[stages.both]
kind = "command"
inputs = { a = "a", b = "b" }
cmd = "cat {inputs.a}/x {inputs.b}/x > {out}/x"

[stages.pick]
kind = "command"
inputs = { a = "a[Y=c,X=3]" }
cmd = "cat {inputs.a}/x > {out}/x"
"#,
    );
    let names: Vec<String> = p.states().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.iter().filter(|n| n.starts_with("a[")).count(), 3, "{names:?}");
    assert!(names.contains(&"a[X=2,Y=b]".to_string()), "{names:?}");
    // `both` reads a and b, which fans out over a: three variants, each wired to one a.
    let s = p.status_json();
    let both: Vec<&serde_json::Value> = s["stages"].as_array().unwrap().iter().filter(|x| x["stage"] == "both").collect();
    assert_eq!(both.len(), 3);
    let b2 = both.iter().find(|x| x["name"] == "both[X=2,Y=b]").unwrap();
    assert_eq!((b2["inputs"]["a"].as_str(), b2["inputs"]["b"].as_str()), (Some("a[X=2,Y=b]"), Some("b[X=2,Y=b]")));
    // A pattern naming every value is one variant, read through a plain slot; `pick` does not fan out.
    let pick: Vec<&serde_json::Value> = s["stages"].as_array().unwrap().iter().filter(|x| x["stage"] == "pick").collect();
    assert_eq!(pick.len(), 1);
    assert_eq!(pick[0]["inputs"]["a"], "a[X=3,Y=c]");
}

const STAGE: &str = "[stages.s]\nkind = \"command\"\ncmd = \"true\"\n";

#[test]
fn sweep_mistakes_are_config_errors_with_a_location() {
    let e = config_error(&format!("{STAGE}sweep = {{ \"cmdd\" = [\"true\", \"false\"] }}\n"));
    assert!(e.contains("pipeline.toml:4:11: stage `s[cmdd=true]` (command): sweep `cmdd`: unknown field `cmdd`"), "{e}");
    assert!(e.contains("did you mean `cmd`?"), "{e}");
    let e = config_error(&format!("{STAGE}sweep = {{ \"env.A\" = [] }}\n"));
    assert!(e.contains("pipeline.toml:4:11: stage `s`: sweep `env.A`: the list is empty"), "{e}");
    let e = config_error(&format!("{STAGE}sweep = {{ \"threads\" = [1, 1.0] }}\n"));
    assert!(e.contains("sweep `threads`: `1.0` repeats `1`; each value once"), "{e}");
    let e = config_error(&format!("{STAGE}sweep = {{ \"env.A\" = [\"1\", \"2\"], \"env.B\" = [\"x\"] }}\nsweep_mode = \"zip\"\n"));
    assert!(e.contains("sweep_mode = \"zip\" pairs the lists by position, but `env.A` has 2 values and `env.B` has 1"), "{e}");
    let e = config_error(&format!("{STAGE}sweep = {{ \"env.A\" = [\"1\", \"1\"], \"env.B\" = [\"x\", \"x\"] }}\nsweep_mode = \"zip\"\n"));
    assert!(e.contains("two variants of `s` are both named `s[A=1,B=x]`"), "{e}");
    let e = config_error(&format!("{STAGE}sweep = {{ \"env.A\" = [\"a b\"] }}\n"));
    assert!(e.contains("`a b` cannot stand in a variant name"), "{e}");
    let e = config_error(&format!("{STAGE}env = {{ A = \"1\" }}\nsweep = {{ \"env.A\" = [\"2\"] }}\n"));
    assert!(e.contains("`env.A` is also set in the table; set it in one place"), "{e}");
    let e = config_error(&format!("{STAGE}sweep_mode = \"grd\"\n"));
    assert!(e.contains("`sweep_mode` is \"grid\""), "{e}");

    // Gathering needs a kind that takes any inputs; a pattern must match.
    let swept = format!("{STAGE}sweep = {{ \"env.A\" = [\"1\", \"2\"] }}\n");
    let e = config_error(&format!("{swept}[stages.f]\nkind = \"filter\"\ninput = \"s[*]\"\n"));
    assert!(e.contains("stage `f` (filter) reads one artifact in `input`, but `s[*]` gathers variants"), "{e}");
    let e = config_error(&format!("{swept}[stages.t]\nkind = \"command\"\ninputs = {{ x = \"s[A=3,*]\" }}\ncmd = \"true\"\n"));
    assert!(
        e.contains("pipeline.toml:7:12: stage `t`: input `x`: no variant of `s` matches `s[A=3,*]`; its variants: s[A=1], s[A=2]"),
        "{e}"
    );
    let e = config_error(&format!("{swept}[stages.t]\nkind = \"command\"\ninputs = {{ x = \"s[B=3,*]\" }}\ncmd = \"true\"\n"));
    assert!(e.contains("input `x`: `s` varies A; `B` is not one of them"), "{e}");
}

/// A size sweep of a small GPT, compared: the table names the swept param
/// and every run's final metrics, the curves are overlaid, and the final
/// validation loss is fitted against training compute.
#[test]
fn a_model_size_sweep_is_compared_with_a_compute_fit() {
    let p = Project::new(&format!(
        r#"{TINY_DATA}
[stages.pretrain]
kind = "pretrain"
inputs = {{ data = "tokens", tokenizer = "tok" }}
model = {{ n_layer = 1, n_head = 2, context = 32, dropout = 0.0 }}
train = {{ steps = 12, batch_size = 4, lr = 3e-3, warmup = 2 }}
eval_every = 12
eval_batches = 2
samples = {{ count = 0 }}
sweep = {{ "model.d_model" = [16, 32, 64] }}

[stages.sizes]
kind = "compare"
inputs = {{ runs = "pretrain[*]" }}
"#
    ));
    p.write_corpus(60_000);
    let r = p.llmflow(&["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(r.built().iter().filter(|b| b.starts_with("pretrain[d_model=")).count(), 3, "{:?}", r.built());

    let out = p.out_dir("sizes");
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("compare.json")).unwrap()).unwrap();
    let runs = results["runs"].as_array().unwrap();
    assert_eq!(runs.iter().map(|r| r["run"].as_str().unwrap()).collect::<Vec<_>>(), ["[d_model=16]", "[d_model=32]", "[d_model=64]"]);
    for (run, d) in runs.iter().zip([16, 32, 64]) {
        // Only what differs between runs: the swept width and the FFN width derived from it.
        assert_eq!(run["params"].as_object().unwrap().keys().collect::<Vec<_>>(), ["model.d_model", "model.ffn_hidden"]);
        assert_eq!(
            (&run["params"]["model.d_model"], &run["params"]["model.ffn_hidden"]),
            (&serde_json::json!(d), &serde_json::json!(4 * d))
        );
        assert!(run["metrics"]["val_loss"].as_f64().unwrap() > 0.0, "{run}");
        assert!(run["compute"].as_f64().unwrap() > 0.0, "{run}");
    }
    // Compute grows with the model: 6 · params · tokens, the same tokens each.
    let compute: Vec<f64> = runs.iter().map(|r| r["compute"].as_f64().unwrap()).collect();
    assert!(compute[0] < compute[1] && compute[1] < compute[2], "{compute:?}");
    let fit = &results["fit"];
    assert_eq!(fit["points"].as_array().unwrap().len(), 3, "{fit}");
    // The fit passes near its points (three points, three parameters).
    for point in fit["points"].as_array().unwrap() {
        let (c, l) = (point[0].as_f64().unwrap(), point[1].as_f64().unwrap());
        let at = fit["a"].as_f64().unwrap() * c.powf(-fit["b"].as_f64().unwrap()) + fit["c"].as_f64().unwrap();
        assert!((at - l).abs() < 0.05 * l, "fit {fit} misses ({c}, {l})");
    }
    for png in ["curves.png", "scaling.png"] {
        assert_eq!(&std::fs::read(out.join(png)).unwrap()[1..4], b"PNG", "{png}");
    }
    let report = p.llmflow(&["report", "sizes"]);
    assert_eq!(report.code, 0, "{}", report.all());
    assert!(report.stdout.contains("| run | colour | model.d_model | model.ffn_hidden | "), "{}", report.stdout);
    assert!(report.stdout.contains("| [d_model=32] | orange | 32 | 128 |"), "{}", report.stdout);
    assert!(report.stdout.contains("val_loss(C) = "), "{}", report.stdout);
}

/// Gathered variants whose slots differ only in punctuation would share one
/// `LLMFLOW_INPUT_` variable, losing all but one: refused, naming them.
#[test]
fn gathered_slots_that_would_share_a_variable_are_refused() {
    let err = config_error(
        r#"
[stages.x]
kind = "command"
cmd = "echo $S > {out}/v"
sweep = { "env.S" = ["a-b", "a.b", "a_b"] }

[stages.all]
kind = "command"
inputs = { s = "x[*]" }
cmd = "env | grep LLMFLOW_INPUT_ > {out}/slots"
"#,
    );
    assert!(err.contains("`s[S=a-b]`, `s[S=a.b]`, `s[S=a_b]`") && err.contains("$LLMFLOW_INPUT_S_S_A_B_"), "{err}");
    assert!(err.contains("pipeline.toml:9"), "the error points at the gathering slot: {err}");
}

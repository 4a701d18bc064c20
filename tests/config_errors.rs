//! Mistakes in pipeline.toml: exit code 2, `file:line:column`, the stage and
//! field, and a suggestion where one fits. Nothing runs.

mod common;

use common::{config_error, Project};

#[test]
fn unknown_param_names_line_column_stage_and_suggests() {
    let e = config_error("[stages.s]\nkind = \"command\"\ncmd = \"true\"\ndpes = [\"x\"]\n");
    assert!(e.contains("pipeline.toml:4:1: stage `s` (command): unknown field `dpes`"), "{e}");
    assert!(e.contains("did you mean `deps`?"), "{e}");
}

#[test]
fn unknown_kind_lists_known_kinds() {
    let e = config_error("[stages.s]\nkind = \"comand\"\n");
    assert!(e.contains("pipeline.toml:2:1: stage `s`: unknown kind `comand`, did you mean `command`?"), "{e}");
    assert!(e.contains("known kinds: command"), "{e}");
}

#[test]
fn wrong_type_names_the_field() {
    let e = config_error("[stages.s]\nkind = \"command\"\ncmd = 42\n");
    assert!(e.contains("pipeline.toml:3:1: stage `s` (command): invalid type: integer `42`, expected a string"), "{e}");
}

#[test]
fn cycle_is_printed() {
    let e = config_error(
        "[stages.a]\nkind = \"command\"\ninput = \"c\"\ncmd = \"true\"\n\
         [stages.b]\nkind = \"command\"\ninput = \"a\"\ncmd = \"true\"\n\
         [stages.c]\nkind = \"command\"\ninput = \"b\"\ncmd = \"true\"\n",
    );
    assert!(e.contains("stages form a cycle: a → b → c → a"), "{e}");
}

#[test]
fn missing_reference_is_named() {
    let e = config_error("[stages.b]\nkind = \"command\"\ninputs = { docs = \"clen\" }\ncmd = \"true\"\n[stages.clean]\nkind = \"command\"\ncmd = \"true\"\n");
    assert!(
        e.contains("pipeline.toml:3:12: stage `b`: input `docs` names stage `clen`, which does not exist, did you mean `clean`?"),
        "{e}"
    );
}

#[test]
fn placeholder_for_unwired_input_is_rejected() {
    let e = config_error("[stages.s]\nkind = \"command\"\ncmd = \"cat {inputs.docs}\"\n");
    assert!(e.contains("`{inputs.docs}` names no input of this stage (inputs: none)"), "{e}");
}

#[test]
fn toml_syntax_error_has_a_location() {
    let e = config_error("[stages.s]\nkind = \"command\"\ncmd = \"true\n");
    assert!(e.contains("pipeline.toml:3:"), "{e}");
}

#[test]
fn missing_kind_and_bad_device() {
    let e = config_error("[stages.s]\ncmd = \"true\"\n");
    assert!(e.contains("stage `s` has no `kind`; known kinds:"), "{e}");
    let e = config_error("[pipeline]\ndevice = \"gpu\"\n");
    assert!(e.contains("pipeline.toml:2:1: unknown device `gpu`"), "{e}");
}

#[test]
fn missing_file_and_unknown_target() {
    let p = Project::new("");
    let r = p.llmflow(&["--file", "nope.toml", "status"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("cannot read nope.toml"), "{}", r.stderr);
    let p = Project::new("[stages.build]\nkind = \"command\"\ncmd = \"true\"\n");
    let r = p.llmflow(&["run", "biuld"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no stage named `biuld`"), "{}", r.stderr);
    let r = p.llmflow(&["frobnicate"]);
    assert_eq!(r.code, 2, "usage errors exit 2");
}

#[test]
fn dependency_file_missing_is_a_config_error() {
    let e = config_error("[stages.s]\nkind = \"command\"\ndeps = [\"gone.py\"]\ncmd = \"true\"\n");
    assert!(e.contains("stage `s` reads `gone.py`"), "{e}");
}

#[test]
fn a_moved_param_says_what_to_write_instead() {
    let e = config_error(
        "[stages.s]\nkind = \"sft\"\ninputs = { model = \"m\" }\nlora = { rank = 4 }\n[stages.m]\nkind = \"command\"\ncmd = \"true\"\n",
    );
    assert!(e.contains("pipeline.toml:4:1: stage `s` (sft): `lora` is no longer a param of `sft`"), "{e}");
    assert!(e.contains("write `trainable = { lora = {"), "{e}");
    let e = config_error("[stages.s]\nkind = \"dpo\"\ninputs = { model = \"m\" }\ntrainable = { last_block = 2 }\n[stages.m]\nkind = \"command\"\ncmd = \"true\"\n");
    assert!(e.contains("stage `s` (dpo)") && e.contains("unknown variant `last_block`"), "{e}");
}

#[test]
fn kinds_kind_prints_every_param_with_its_default_and_doc() {
    let p = common::Project::new("");
    let r = p.llmflow(&["kinds", "shard"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("[stages.NAME]\nkind = \"shard\"\n"), "{}", r.stdout);
    assert!(
        r.stdout.contains("# The share of documents held out for validation; 0 writes no validation shards.\nval_fraction = 0.1\n"),
        "{}",
        r.stdout
    );
    let sft = p.llmflow(&["kinds", "sft"]);
    assert!(sft.stdout.contains("trainable = \"all\"") && sft.stdout.contains("[stages.NAME.train]\n"), "{}", sft.stdout);
    let typo = p.llmflow(&["kinds", "shrad"]);
    assert_eq!(typo.code, 2, "{}", typo.all());
    assert!(typo.stderr.contains("unknown stage kind `shrad`, did you mean `shard`?"), "{}", typo.stderr);
}

#[test]
fn numbers_out_of_range_non_finite_and_path_slot_names_are_errors() {
    let stages = "[stages.a]\nkind = \"command\"\ncmd = \"true\"\n[stages.d]\nkind = \"dedup\"\ninput = \"a\"\n";
    let e = config_error(&format!("{stages}bands = 4611686018427387904\n"));
    assert!(e.contains("pipeline.toml:7:1: stage `d` (dedup): `bands` must be between 1 and 1024, not 4611686018427387904"), "{e}");
    let e = config_error(&format!("{stages}threshold = nan\n"));
    assert!(e.contains("pipeline.toml:7:1: stage `d`: `threshold` is nan or inf; give a finite number"), "{e}");
    let e = config_error(&format!("{stages}[stages.m]\nkind = \"command\"\ninputs = {{ \"/tmp/x\" = \"a\" }}\ncmd = \"true\"\n"));
    assert!(e.contains("stage `m`: input slot `/tmp/x` may use only letters, digits, `_` and `-`"), "{e}");
    let e = config_error("[stages.a]\nkind = \"download\"\nsources = [{ url = \"x.txt\" }]\ntimeout_secs = 0\n");
    assert!(e.contains("`timeout_secs` must be between 1 and 86400, not 0"), "{e}");
}

#[test]
fn an_error_in_one_of_an_array_of_tables_points_at_its_line() {
    let e = config_error(
        "[stages.a]\nkind = \"command\"\ncmd = \"true\"\n\
         [stages.e]\nkind = \"eval\"\ninputs = { m = \"a\" }\n\
         [[stages.e.tasks]]\nname = \"x\"\ntype = \"perplexity\"\nfile = \"f.txt\"\n\
         [[stages.e.tasks]]\nname = \"y\"\ntype = \"code\"\nfile = \"h.jsonl\"\nconfirm_run_unsafe_code = true\ntimeout_s = 1e300\n",
    );
    assert!(e.contains("pipeline.toml:16:1: stage `e` (eval): `tasks[1].timeout_s` must be in (0, 86400], not 1e+300"), "{e}");
}

//! `ecst validate` and `ecst graph`: every problem, with file, line, column and key.

use std::time::Duration;

use crate::common::*;

const GOOD: &str = r#"name: athletes
source:
  stream: athletes.athlete-updated.v1
  group: rankings.athletes-replica.v1
stages:
  decode: { type: decode }
  latest: { type: version_filter, input: decode }
  cache: { type: redis_hash, input: latest, key: "athlete:{aggregateId}" }
"#;

fn validate(yaml: &str) -> (bool, String, String) {
    let file = pipeline_file("validate", yaml);
    let mut cmd = ecst();
    cmd.arg("validate")
        .arg(&file)
        .env_remove("UNSET_VAR_FOR_TEST");
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    let path = file.display().to_string();
    let text = String::from_utf8_lossy(&out.stderr).replace(&path, "FILE");
    (
        out.status.success(),
        text,
        String::from_utf8_lossy(&out.stdout).replace(&path, "FILE"),
    )
}

fn assert_errors(yaml: &str, expected: &[&str]) {
    let (ok, stderr, _) = validate(yaml);
    assert!(!ok, "validate accepted a broken file:\n{yaml}");
    for line in expected {
        assert!(stderr.contains(line), "missing\n  {line}\nin\n{stderr}");
    }
    let count = format!(
        "{} error{}",
        expected.len(),
        if expected.len() == 1 { "" } else { "s" }
    );
    assert!(
        stderr.trim_end().ends_with(&count),
        "expected {count}:\n{stderr}"
    );
}

#[test]
fn a_good_file_validates_and_graphs() {
    let (ok, stderr, stdout) = validate(GOOD);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "FILE: ok (3 stages)");
    let file = pipeline_file("graph", GOOD);
    let out = run_with_deadline(
        {
            let mut c = ecst();
            c.arg("graph").arg(&file);
            c
        },
        Duration::from_secs(30),
    );
    let mermaid = String::from_utf8_lossy(&out.stdout);
    assert!(mermaid.starts_with("flowchart LR"), "{mermaid}");
    assert!(
        mermaid.contains("s_decode --> s_latest") && mermaid.contains("s_latest --> s_cache"),
        "{mermaid}"
    );
    let out = run_with_deadline(
        {
            let mut c = ecst();
            c.arg("graph").arg(&file).args(["--format", "dot"]);
            c
        },
        Duration::from_secs(30),
    );
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.contains("\"latest\" -> \"cache\";"), "{dot}");
}

#[test]
fn unknown_keys_are_named_with_their_position() {
    assert_errors(
        &GOOD
            .replace(
                "  group: rankings.athletes-replica.v1\n",
                "  group: rankings.athletes-replica.v1\n  grup: typo\n",
            )
            .replace(
                "  decode: { type: decode }",
                "  decode: { type: decode, fromat: json }",
            ),
        &[
            "FILE:5:3: source.grup: unknown field `grup`",
            "FILE:7:27: stages.decode.fromat: unknown field `fromat`",
        ],
    );
}

#[test]
fn unknown_stage_types_list_the_known_ones() {
    assert_errors(
        &GOOD.replace("type: version_filter", "type: version_filtre"),
        &[
            "FILE:7:13: stages.latest.type: unknown stage type `version_filtre` (expected one of decode, version_filter, tombstone, validate, project, upcast, claim_check, delta, fetch, redis_hash, postgres)",
        ],
    );
}

#[test]
fn missing_and_cyclic_inputs() {
    assert_errors(
        r#"name: p
source: { stream: s, group: g }
stages:
  decode: { type: decode }
  a: { type: project, input: b, include: ["*"] }
  b: { type: project, input: a, include: ["*"] }
  cache: { type: redis_hash, input: nowhere, key: "k:{aggregateId}" }
"#,
        &[
            "FILE:4:3: stages.decode: stage `decode` is read by no stage",
            "FILE:6:23: stages.b.input: cycle: b -> a -> b",
            "FILE:7:30: stages.cache.input: input `nowhere` is not a stage of this pipeline (stages: a, b, decode)",
        ],
    );
}

#[test]
fn a_stage_nobody_reads_is_a_sinkless_branch() {
    assert_errors(
        &(GOOD.to_string() + "  orphan: { type: project, input: latest, include: [\"*\"] }\n"),
        &[
            "FILE:9:3: stages.orphan: stage `orphan` is read by no stage, so its branch reaches no sink",
        ],
    );
}

#[test]
fn bad_durations_and_read_timeout_under_block() {
    assert_errors(
        &GOOD
            .replace(
                "  group: rankings.athletes-replica.v1\n",
                "  group: g\n  block: 5s\n  read_timeout: 5500ms\n",
            )
            .replace(
                "  latest: { type: version_filter, input: decode }",
                "  latest: { type: tombstone, input: decode, keep_for: 7 days }",
            ),
        &[
            "FILE:6:3: source.read_timeout: 5500ms must exceed block (5s) by at least 1s",
            "FILE:9:45: stages.latest.keep_for: invalid duration \"7 days\": expected an integer and a unit, e.g. 500ms, 2s, 5m, 12h, 7d",
        ],
    );
}

#[test]
fn unset_variables_without_default_are_reported_where_used() {
    assert_errors(
        &GOOD.replace("  stream: athletes.athlete-updated.v1", "  stream: ${UNSET_VAR_FOR_TEST}\n  redis: ${UNSET_VAR_FOR_TEST:-redis://127.0.0.1:6379}"),
        &["FILE:3:11: source.stream: environment variable UNSET_VAR_FOR_TEST is not set and has no default"],
    );
}

#[test]
fn yaml_syntax_errors_point_at_the_spot() {
    let (ok, stderr, _) = validate("name: p\nsource: { stream: s, group: g\nstages: {}\n");
    assert!(!ok);
    assert!(stderr.starts_with("FILE:"), "{stderr}");
    assert!(stderr.contains("invalid YAML"), "{stderr}");
}

#[test]
fn several_problems_are_all_reported_at_once() {
    assert_errors(
        r#"name: "bad name!"
source: { stream: s, group: g, batch_size: 0, start: latest }
stages:
  decode: { type: decode }
  proj: { type: project, input: decode, fields: { x: payloads.name }, where: "payload.status ===" }
  cache: { type: redis_hash, input: proj, key: "athlete" }
"#,
        &[
            "FILE:1:1: name: must be a name of letters, digits",
            "FILE:2:47: source.start: start must be \"0\" (the whole stream) or \"$\" (new entries only), got \"latest\"",
            "FILE:5:51: stages.proj.fields.x: path \"payloads.name\" must start with one of",
            "FILE:5:71: stages.proj.where: invalid CEL expression",
            "FILE:6:43: stages.cache.key: key template \"athlete\" has no placeholder",
        ],
    );
}

#[test]
fn missing_sections_and_non_decode_roots() {
    assert_errors(
        "name: p\nstages:\n  proj: { type: project, include: [\"*\"] }\n  cache: { type: redis_hash, input: proj, key: \"k:{aggregateId}\" }\n",
        &[
            "FILE:1:1: missing key `source`",
            "FILE:3:3: stages.proj: stage `proj` (project) needs `input`",
            "FILE:3:3: stages.proj: the pipeline has no decode stage reading the source",
        ],
    );
}

#[test]
fn a_variable_holding_yaml_cannot_add_keys() {
    let file = pipeline_file(
        "inject",
        &GOOD.replace(
            "  group: rankings.athletes-replica.v1",
            "  group: ${INJECTED}",
        ),
    );
    let mut cmd = ecst();
    cmd.arg("validate")
        .arg(&file)
        .env("INJECTED", "g\n  evil: true");
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr_of(&out));
}

#[test]
fn secrets_in_urls_never_reach_the_output() {
    let file = pipeline_file(
        "secret",
        &GOOD.replace(
            "  group: rankings.athletes-replica.v1",
            "  group: g\n  redis: \"rediss://app:hunter2@cache:6379/0\"\n  batch_size: 0",
        ),
    );
    let out = run_with_deadline(
        {
            let mut c = ecst();
            c.arg("validate").arg(&file);
            c
        },
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let text = stderr_of(&out);
    assert!(text.contains("batch_size"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn identifier_injection_in_a_postgres_sink_is_rejected() {
    assert_errors(
        &(GOOD.to_string()
            + "  table: { type: postgres, input: latest, url: \"postgres://127.0.0.1/db\", table: \"x; drop table y\", columns: { \"a b\": text } }\n"),
        &[
            "FILE:9:75: stages.table.table: \"x; drop table y\" is not a valid identifier",
            "FILE:9:112: stages.table.columns.a b: \"a b\" is not a valid identifier",
        ],
    );
}

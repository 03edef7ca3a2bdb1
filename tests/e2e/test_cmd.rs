//! `ecst test`: pipeline test cases run through the real stages and sinks against the real
//! Redis and Postgres, reported like a test runner, each case isolated and cleaned up.

use std::path::Path;
use std::time::Duration;

use redis::Commands;
use serde_json::Value;

use crate::common::{
    athletes_pipeline, database_url, ecst, event, hash, pipeline_file, postgres, redis,
    run_with_deadline, stderr_of, unique,
};

const LIMIT: Duration = Duration::from_secs(120);

/// `ecst test FILE...` with its stdout and exit code.
fn ecst_test(files: &[&Path], extra: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = ecst();
    cmd.arg("test").args(files).args(extra);
    let out = run_with_deadline(cmd, LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code(), stdout, stderr_of(&out))
}

fn json(value: &Value) -> String {
    serde_json::to_string(value).expect("json")
}

#[test]
fn a_passing_file_reports_each_case_ok_and_exits_0() {
    let stream = unique("test-cmd-pass");
    let prefix = format!("{stream}:");
    let pipeline = athletes_pipeline(&stream, &prefix, "");
    let tests = format!(
        r#"tests:
  - name: the newest version wins
    input:
      - event: {v2}
      - event: {v1}
    expect:
      replicas:
        cache:
          "{prefix}athlete:a-1": {{ display_name: Two, status: active, _version: 2 }}
      decisions:
        latest: {{ 1: passed, 2: coalesced }}
        cache: {{ 1: applied, 2: none }}
  - name: a poison entry is dead-lettered
    input:
      - fields: {{ v: "{{oops" }}
    expect:
      dead_letters:
        - {{ entry: 1, reason: "invalid JSON body" }}
      decisions:
        decode: {{ 1: dead_lettered }}
"#,
        v2 = json(&event("a-1", 2, "Two")),
        v1 = json(&event("a-1", 1, "One")),
    );
    let file = pipeline_file("test-cmd-pass", &format!("{pipeline}{tests}"));
    let (code, stdout, stderr) = ecst_test(&[&file], &[]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let expected = format!(
        "\nrunning 2 tests from {} (pipeline athletes)\ntest the newest version wins ... ok\ntest a poison entry is dead-lettered ... ok\n\ntest result: ok. 2 passed; 0 failed\n",
        file.display()
    );
    assert_eq!(stdout, expected);
}

#[test]
fn a_failing_case_prints_what_it_expected_against_what_happened_and_exits_1() {
    let stream = unique("test-cmd-fail");
    let prefix = format!("{stream}:");
    let pipeline = athletes_pipeline(&stream, &prefix, "");
    let tests = format!(
        r#"tests:
  - name: a late update is stale
    batch_size: 1
    input:
      - event: {v2}
      - event: {v1}
    expect:
      replicas:
        cache:
          "{prefix}athlete:a-1": {{ display_name: Late, status: active }}
          "{prefix}athlete:a-2": {{ display_name: Never }}
      dead_letters:
        - {{ entry: 1, reason: "anything" }}
      decisions:
        latest: {{ 2: passed }}
"#,
        v2 = json(&event("a-1", 2, "First")),
        v1 = json(&event("a-1", 1, "Late")),
    );
    let file = pipeline_file("test-cmd-fail", &format!("{pipeline}{tests}"));
    let (code, stdout, stderr) = ecst_test(&[&file], &[]);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    let path = file.display();
    let expected = format!(
        r#"
running 1 test from {path} (pipeline athletes)
test a late update is stale ... FAILED

failures:

---- {path}: a late update is stale ----
replica {cache} {prefix}athlete:a-1 field display_name
  - expected: "Late"
  + actual:   "First"
replica {cache} {prefix}athlete:a-2
  - expected: {{display_name: "Never"}}
  + actual:   absent
dead letter of entry 1
  - expected: a reason matching /anything/
  + actual:   not dead-lettered
decision latest entry 2
  - expected: passed
  + actual:   stale

test result: FAILED. 0 passed; 1 failed
"#,
        cache = "cache",
    );
    assert_eq!(stdout, expected);
}

#[test]
fn cases_leave_nothing_behind_and_never_touch_the_real_replica() {
    let stream = unique("test-cmd-isolation");
    let prefix = format!("{stream}:");
    let table = format!("t_{}", stream.replace([':', '-'], "_")).to_lowercase();
    let pg = postgres();
    // The real replicas a worker keeps: a hash and a row the cases must not see nor change.
    pg.execute(&format!(
        "CREATE TABLE {table} (athlete_id text PRIMARY KEY, display_name text, source_version bigint); \
         INSERT INTO {table} VALUES ('a-1', 'Real', 5)"
    ));
    let mut conn = redis();
    let real_key = format!("{prefix}athlete:a-1");
    let _: () = conn
        .hset_multiple(&real_key, &[("display_name", "Real"), ("_version", "5")])
        .expect("HSET");
    let pipeline = format!(
        r#"{}  table:
    type: postgres
    input: athlete
    url: {}
    table: {table}
    key: athlete_id
    columns: {{ display_name: text }}
"#,
        athletes_pipeline(&stream, &prefix, ""),
        database_url()
    );
    let tests = format!(
        r#"tests:
  - name: both replicas take version 1
    input:
      - event: {v1}
      - fields: {{ v: "not json" }}
    expect:
      replicas:
        cache: {{ "{prefix}athlete:a-1": {{ display_name: One, status: active }} }}
        table: {{ a-1: {{ display_name: One, source_version: 1 }} }}
  - name: a failing case is cleaned up too
    batch_size: 1
    input:
      - event: {v1}
      - event: {delete}
    expect:
      replicas:
        table: {{ a-1: {{ display_name: One }} }}
"#,
        v1 = json(&event("a-1", 1, "One")),
        delete = json(&crate::common::delete("a-1", 2)),
    );
    let file = pipeline_file("test-cmd-isolation", &format!("{pipeline}{tests}"));
    let (code, stdout, stderr) = ecst_test(&[&file], &["--json"]);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(
        (report["passed"].as_u64(), report["failed"].as_u64()),
        (Some(1), Some(1))
    );
    let cases = report["cases"].as_array().expect("cases");
    assert_eq!(
        cases[1]["mismatches"],
        serde_json::json!([{ "at": "replica table a-1", "expected": "{display_name: \"One\"}", "actual": "absent" }])
    );
    for case in cases {
        let case_prefix = case["redis_prefix"].as_str().expect("redis_prefix");
        let left: Vec<String> = conn
            .scan_match::<_, String>(format!("{case_prefix}*"))
            .expect("SCAN")
            .collect::<Result<_, _>>()
            .expect("SCAN");
        assert!(left.is_empty(), "{left:?}");
        let freshness = format!("ecst:freshness:{case_prefix}{prefix}athlete:{{aggregateId}}");
        let exists: bool = conn.exists(&freshness).expect("EXISTS");
        assert!(!exists, "{freshness} is left");
        let schema = case["postgres_schema"].as_str().expect("postgres_schema");
        let schemas = pg.query("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema]);
        assert!(schemas.is_empty(), "schema {schema} is left");
    }
    let real = hash(&mut conn, &real_key);
    assert_eq!(real.get("display_name").map(String::as_str), Some("Real"));
    assert_eq!(real.len(), 2, "{real:?}");
    let rows = pg.query(
        &format!("SELECT display_name, source_version FROM {table}"),
        &[],
    );
    let rows: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, [("Real".to_string(), 5)]);
    pg.execute(&format!("DROP TABLE {table}"));
    let _: () = conn.del(&real_key).expect("DEL");
}

#[test]
fn a_bad_file_or_an_unreachable_store_exits_2_and_says_where() {
    let stream = unique("test-cmd-errors");
    let prefix = format!("{stream}:");
    let pipeline = athletes_pipeline(&stream, &prefix, "");
    let bad = pipeline_file(
        "test-cmd-bad",
        &format!(
            "{pipeline}tests:\n  - name: x\n    input: []\n    expect:\n      decisions:\n        lastest: {{ 1: passed }}\n"
        ),
    );
    let (code, stdout, stderr) = ecst_test(&[&bad], &[]);
    assert_eq!(code, Some(2), "{stdout}\n{stderr}");
    let path = bad.display();
    assert!(
        stderr.contains(&format!(
            "{path}:28:9: tests.0.expect.decisions.lastest: the pipeline has no stage `lastest`"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{path}:28:20: tests.0.expect.decisions.lastest.1: `1` is not an input number (the case has no input)"
        )),
        "{stderr}"
    );

    let unreachable = format!(
        "{pipeline}  table:\n    type: postgres\n    input: athlete\n    url: postgres://postgres@127.0.0.1:1/postgres\n    table: t\n    key: athlete_id\n    columns: {{ display_name: text }}\ntests:\n  - name: y\n    input: []\n"
    );
    let file = pipeline_file("test-cmd-unreachable", &unreachable);
    let (code, stdout, stderr) = ecst_test(&[&file], &[]);
    assert_eq!(code, Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("cannot reach Postgres at postgres://postgres@127.0.0.1:1/postgres"),
        "{stderr}"
    );
}

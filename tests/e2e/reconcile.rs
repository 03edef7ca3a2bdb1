//! `ecst reconcile`: drift planted by hand in a Redis and a Postgres replica is found, counted
//! and repaired.

use std::time::Duration;

use redis::Commands;
use serde_json::Value;

use crate::bootstrap::Source;
use crate::common::*;

fn reconcile(pipeline: &std::path::Path, extra: &[&str]) -> (i32, Value) {
    let mut cmd = ecst();
    cmd.arg("reconcile").arg(pipeline).arg("--json").args(extra);
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    let code = out.status.code().expect("exit code");
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr:\n{}", stderr_of(&out)));
    (code, report)
}

fn counts(report: &Value, sink: &str) -> [u64; 5] {
    let s = &report["sinks"][sink];
    ["missing", "stale", "mismatched", "orphans", "repaired"].map(|k| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("{sink}.{k} in {report}"))
    })
}

#[test]
fn reconcile_finds_each_kind_of_drift_and_repair_fixes_it() {
    let mut conn = redis();
    let pg = postgres();
    let source = Source::create("reconcile", 1_000);
    let stream = unique("reconcile");
    let prefix = format!("{stream}:");
    let replica = format!("{}_replica", source.table);
    let query = format!(
        "SELECT id, version, jsonb_build_object('displayName', display_name, 'status', status) FROM {} WHERE ($1::text IS NULL OR id > $1) ORDER BY id LIMIT $2",
        source.table
    );
    let yaml = format!(
        r#"name: reconcile
source:
  stream: "{stream}"
  group: replica
  block: 100ms
stages:
  decode: {{ type: decode }}
  athlete:
    type: project
    input: decode
    fields: {{ display_name: payload.displayName, status: payload.status }}
  cache:
    type: redis_hash
    input: athlete
    key: "{prefix}athlete:{{aggregateId}}"
    tombstone_prefix: "{prefix}tombstone:"
  table:
    type: postgres
    input: athlete
    url: "{db}"
    table: {replica}
    key: athlete_id
    create: true
    columns: {{ display_name: text, status: text }}
bootstrap:
  postgres: "{db}"
  query: "{query}"
  page_size: 300
"#,
        db = database_url()
    );
    let pipeline = pipeline_file("reconcile", &yaml);
    // A new group bootstraps both replicas, then the drain ends.
    drain(&pipeline);
    let (code, report) = reconcile(&pipeline, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["source_rows"], 1_000);
    assert_eq!(counts(&report, "cache"), [0; 5]);
    assert_eq!(counts(&report, "table"), [0; 5]);

    // Drift, by hand: a deleted row, a stale version, a corrupted field, an orphan.
    let key = |id: &str| format!("{prefix}athlete:{id}");
    let _: () = conn.del(key("a000010")).expect("DEL");
    let _: () = conn.hset(key("a000020"), "_version", 1).expect("HSET");
    let _: () = conn
        .hset(key("a000030"), "display_name", "corrupted")
        .expect("HSET");
    let _: () = conn
        .hset_multiple(
            key("zz-orphan"),
            &[("_version", "4"), ("display_name", "ghost")],
        )
        .expect("HSET");
    pg.execute(&format!(
        "DELETE FROM {replica} WHERE athlete_id = 'a000011';
         UPDATE {replica} SET source_version = 2 WHERE athlete_id = 'a000021';
         UPDATE {replica} SET status = 'retired' WHERE athlete_id = 'a000031';
         INSERT INTO {replica} (athlete_id, source_version, display_name, status)
           VALUES ('zz-orphan', 9, 'ghost', 'active');"
    ));

    let (code, report) = reconcile(&pipeline, &[]);
    assert_eq!(code, 1, "drift must fail the exit code: {report}");
    assert_eq!(counts(&report, "cache"), [1, 1, 1, 1, 0], "{report}");
    assert_eq!(counts(&report, "table"), [1, 1, 1, 1, 0], "{report}");
    assert_eq!(
        report["sinks"]["table"]["examples"]["mismatched"][0],
        "a000031 (status)"
    );
    assert_eq!(
        report["sinks"]["cache"]["examples"]["mismatched"][0],
        Value::String(format!("{} (display_name)", key("a000030")))
    );

    let (code, report) = reconcile(&pipeline, &["--repair"]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(counts(&report, "cache")[4], 4, "{report}");
    assert_eq!(counts(&report, "table")[4], 4, "{report}");

    let (code, report) = reconcile(&pipeline, &[]);
    assert_eq!(code, 0, "after --repair: {report}");
    assert!(source.differences(&mut conn, &prefix).is_empty());
    let orphan: Option<String> = conn
        .get(format!("{prefix}tombstone:{}", key("zz-orphan")))
        .expect("GET");
    assert_eq!(
        orphan.as_deref(),
        Some("4"),
        "an evicted orphan leaves a tombstone at its version"
    );
    let rows = pg.query(
        &format!("SELECT count(*) FROM {replica} WHERE athlete_id = 'zz-orphan'"),
        &[],
    );
    assert_eq!(rows[0].get::<_, i64>(0), 0);

    pg.execute(&format!("DROP TABLE {replica}, {replica}_tombstones"));
    source.drop();
    cleanup(&mut conn, &stream);
    cleanup(&mut conn, &prefix);
}

#[test]
fn reconcile_without_a_source_says_so() {
    let stream = unique("reconcile-nosrc");
    let pipeline = pipeline_file(
        "reconcile",
        &athletes_pipeline(&stream, &format!("{stream}:"), ""),
    );
    let mut cmd = ecst();
    cmd.arg("reconcile").arg(&pipeline);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("has none"), "{}", stderr_of(&out));
}

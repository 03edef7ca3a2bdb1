//! One verdict per record across a fan-out: what a sink can check without its store is
//! checked for every sink before any applies; what only a store can refuse is dead-lettered
//! naming the sinks that did apply it, counted, and shown by `ecst status`.

use std::time::Duration;

use redis::Commands;
use serde_json::{Value, json};

use crate::common::*;
use crate::fanout::Fanout;

/// The verdict tests' pipeline: a cache and a table that also takes `totalCents`.
fn yaml(f: &Fanout) -> String {
    let (stream, prefix, table) = (&f.stream, &f.prefix, &f.table);
    let database_url = database_url();
    format!(
        r#"name: verdict
source:
  stream: "{stream}"
  group: replica
  block: 100ms
  claim_every: 200ms
stages:
  decode: {{ type: decode }}
  athlete:
    type: project
    input: decode
    fields: {{ display_name: payload.displayName, points: payload.totalCents }}
  cache:
    type: redis_hash
    input: athlete
    key: "{prefix}athlete:{{aggregateId}}"
  table:
    type: postgres
    input: athlete
    url: "{database_url}"
    table: {table}
    key: athlete_id
    create: true
    timeout: 2s
    columns: {{ display_name: text, points: bigint }}
"#
    )
}

/// The cache's `display_name` of `id`.
fn card(f: &Fanout, conn: &mut redis::Connection, id: &str) -> Option<String> {
    hash(conn, &format!("{}athlete:{id}", f.prefix))
        .get("display_name")
        .cloned()
}

/// The table's (version, display_name) of `id`.
fn row(f: &Fanout, pg: &postgres_client::Client, id: &str) -> Option<(i64, String)> {
    pg.query(
        &format!(
            "SELECT source_version, display_name FROM {} WHERE athlete_id = $1",
            f.table
        ),
        &[&id],
    )
    .first()
    .map(|r| (r.get(0), r.get(1)))
}

fn athlete(id: &str, version: u64, name: &str, cents: Value) -> Value {
    json!({"aggregateType": "athlete", "aggregateId": id, "aggregateVersion": version,
           "occurredAt": "2026-11-24T10:00:00Z",
           "payload": {"displayName": name, "totalCents": cents}})
}

#[test]
fn a_value_one_sink_cannot_write_is_refused_by_every_sink() {
    let mut conn = redis();
    let pg = postgres();
    let f = Fanout::new("verdict-data");
    let ids = publish(
        &mut conn,
        &f.stream,
        &[
            athlete("a", 1, "a v1", json!(1200)),
            athlete("a", 2, "a v2", json!("twelve")),
            athlete("b", 1, "b v1", json!(300)),
        ],
    );
    drain(&pipeline_file("verdict-data", &yaml(&f)));

    // Neither replica took version 2 of `a`: both still hold version 1.
    assert_eq!(card(&f, &mut conn, "a").as_deref(), Some("a v1"));
    assert_eq!(row(&f, &pg, "a"), Some((1, "a v1".into())));
    assert_eq!(card(&f, &mut conn, "b").as_deref(), Some("b v1"));
    assert_eq!(row(&f, &pg, "b"), Some((1, "b v1".into())));
    let dead = dead_letters(&mut conn, &format!("{}.dlq", f.stream));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["source_id"], ids[1]);
    assert_eq!(dead[0]["error_class"], "sink_rejected");
    assert!(
        dead[0]["error"].starts_with("sink `table`: column `points`:")
            && dead[0]["error"].contains("twelve"),
        "{}",
        dead[0]["error"]
    );
    assert_eq!(group_pending(&mut conn, &f.stream, "replica"), 0);
    f.finish(&mut conn, &pg);
}

#[test]
fn a_record_only_the_store_refuses_is_dead_lettered_as_a_divergence() {
    let mut conn = redis();
    let pg = postgres();
    let f = Fanout::new("verdict-store");
    // The table refuses what no sink can know in advance: a CHECK constraint.
    pg.execute(&format!(
        "CREATE TABLE {} (athlete_id text PRIMARY KEY, source_version bigint NOT NULL, \
         source_updated_at timestamptz, replicated_at timestamptz NOT NULL, deleted_at timestamptz, \
         display_name text CHECK (display_name <> 'forbidden'), points bigint)",
        f.table
    ));
    let ids = publish(
        &mut conn,
        &f.stream,
        &[
            athlete("a", 1, "a v1", json!(100)),
            athlete("a", 2, "forbidden", json!(200)),
            athlete("b", 1, "b v1", json!(300)),
        ],
    );
    let pipeline = pipeline_file("verdict-store", &yaml(&f));
    drain(&pipeline);

    // The cache applied version 2, the table could not: the dead letter says so.
    assert_eq!(card(&f, &mut conn, "a").as_deref(), Some("forbidden"));
    assert_eq!(row(&f, &pg, "a"), Some((1, "a v1".into())));
    assert_eq!(row(&f, &pg, "b"), Some((1, "b v1".into())));
    let dead = dead_letters(&mut conn, &format!("{}.dlq", f.stream));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["source_id"], ids[1]);
    let error = &dead[0]["error"];
    assert!(
        error.starts_with("sink `table`: refused by the store:")
            && error.contains("check constraint")
            && error.ends_with("the replicas DIVERGE: already applied by sink `cache`"),
        "{error}"
    );

    // `ecst status` shows the divergence, in JSON and as text.
    let mut cmd = ecst();
    cmd.arg("status").arg(&pipeline).arg("--json");
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(report["groups"][0]["fanout_divergent"], json!({"table": 1}));
    let mut cmd = ecst();
    cmd.arg("status").arg(&pipeline);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAN-OUT DIVERGENCE: the store of sink table refused 1 record(s)"),
        "{text}"
    );
    assert_eq!(group_pending(&mut conn, &f.stream, "replica"), 0);
    let _: () = conn
        .del(format!("ecst:fanout-divergent:{}:replica", f.stream))
        .unwrap_or(());
    f.finish(&mut conn, &pg);
}

#[test]
fn a_lone_record_the_store_refuses_is_dead_lettered_after_max_deliveries() {
    let mut conn = redis();
    let stream = unique("verdict-lone");
    let prefix = format!("{stream}:");
    // The replica's key is taken by a value of another type: Redis refuses the script.
    let _: () = conn
        .set(format!("{prefix}athlete:a"), "not a hash")
        .expect("SET");
    let ids = publish(&mut conn, &stream, &[event("a", 1, "Ada")]);
    let out = drain(&pipeline_file(
        "verdict-lone",
        &athletes_pipeline(&stream, &prefix, "  max_deliveries: 3"),
    ));

    let dead = dead_letters(&mut conn, &format!("{stream}.dlq"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["source_id"], ids[0]);
    assert_eq!(dead[0]["error_class"], "sink_rejected");
    assert!(
        dead[0]["error"].contains("refused by the store") && dead[0]["error"].contains("WRONGTYPE"),
        "{}",
        dead[0]["error"]
    );
    // It was retried before it was given up, not dead-lettered at the first refusal.
    let log = stderr_of(&out);
    assert_eq!(
        log.matches("Sink failed to apply a batch").count(),
        2,
        "two retries, then the dead letter:\n{log}"
    );
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0);
    let _: () = conn.del(format!("{prefix}athlete:a")).unwrap_or(());
    cleanup(&mut conn, &stream);
}

#[test]
fn an_entry_with_thousands_of_fields_is_dead_lettered_by_reference() {
    let mut conn = redis();
    let stream = unique("verdict-wide");
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&stream).arg("*");
    for i in 0..5_000 {
        cmd.arg(format!("f{i}")).arg(i);
    }
    let wide: String = cmd.query(&mut conn).expect("XADD");
    let ids = publish(&mut conn, &stream, &[event("a", 1, "Ada")]);
    let prefix = format!("{stream}:");
    drain(&pipeline_file(
        "verdict-wide",
        &athletes_pipeline(&stream, &prefix, ""),
    ));
    let dead = dead_letters(&mut conn, &format!("{stream}.dlq"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["source_id"], wide);
    assert_eq!(dead[0]["fields_not_copied"], "5000");
    assert_eq!(dead[0]["error_class"], "invalid_event");
    assert_eq!(
        hash(&mut conn, &format!("{prefix}athlete:a"))
            .get("display_name")
            .map(String::as_str),
        Some("Ada"),
        "the entry after it ({}) replicates",
        ids[0]
    );
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0);
    cleanup(&mut conn, &stream);
}

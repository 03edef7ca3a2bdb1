//! Thin events (reference + API): the `fetch` stage against a real `ecst snapshot serve` over
//! a real Postgres table, with a TCP proxy the test cuts to take the endpoint down.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};

use crate::common::*;

struct Source {
    worker: Worker,
    table: String,
    port: u16,
}

impl Source {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}/snapshot", self.port)
    }

    fn stop(self) {
        postgres().execute(&format!("DROP TABLE {}", self.table));
        let (status, log) = self.worker.terminate();
        assert!(status.success(), "{log}");
    }
}

/// A source table of `rows` athletes (athlete `i` at version `i % 5 + 1`) and a snapshot
/// server for it, answering at most 50 ids per batch.
fn source(label: &str, rows: i64) -> Source {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let table = format!("e2e_fetch_{label}_{}_{nanos}", std::process::id());
    let pg = postgres();
    pg.execute(&format!(
        "CREATE TABLE {table} (id text PRIMARY KEY, version bigint NOT NULL, display_name text, status text)"
    ));
    pg.query(
        &format!(
            "INSERT INTO {table} SELECT 'a' || g, g % 5 + 1, 'athlete ' || g,
             CASE WHEN g % 3 = 0 THEN 'retired' ELSE 'active' END FROM generate_series(1, $1::bigint) g"
        ),
        &[&rows],
    );
    let file = pipeline_file(
        "fetch-snapshot",
        &format!(
            "listen: 127.0.0.1:0\npostgres: \"{url}\"\nmax_batch_ids: 50\nentities:\n  athlete:\n    table: {table}\n    payload: {{ displayName: display_name, status: status }}\n",
            url = database_url()
        ),
    );
    let mut cmd = ecst();
    cmd.args(["snapshot", "serve"]).arg(&file);
    let worker = Worker::spawn(cmd);
    let port = worker.listen_port("Snapshot server listening.");
    wait_until(Duration::from_secs(20), "the snapshot server", || {
        http_get(port, "/healthz").0 == 200
    });
    Source {
        worker,
        table,
        port,
    }
}

/// The group's pending count, `None` before the worker created the group.
fn pending_if_grouped(conn: &mut redis::Connection, stream: &str) -> Option<i64> {
    let reply: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg(stream)
        .arg("replica")
        .query(conn);
    match reply {
        Ok(redis::Value::Array(items)) => match items.first() {
            Some(redis::Value::Int(n)) => Some(*n),
            _ => None,
        },
        _ => None,
    }
}

fn thin(id: &str, version: u64) -> Value {
    json!({"eventId": format!("{id}-{version}"), "eventType": "athlete.changed",
           "occurredAt": "2026-11-24T10:00:00Z", "aggregateType": "athlete",
           "aggregateId": id, "aggregateVersion": version})
}

fn pipeline(stream: &str, prefix: &str, url: &str, fetch_extra: &str) -> PathBuf {
    pipeline_file(
        "fetch",
        &format!(
            r#"name: athletes-thin
source:
  stream: "{stream}"
  group: replica
  block: 100ms
  claim_every: 200ms
stages:
  decode: {{ type: decode }}
  latest: {{ type: version_filter, input: decode }}
  fetch:
    type: fetch
    input: latest
    url: "{url}"
    batch_size: 20
    timeout: 2s
    retries: 1
    backoff: 20ms
    backoff_max: 200ms
    breaker_failures: 3
    breaker_open_for: 300ms
{fetch_extra}
  athlete:
    type: project
    input: fetch
    fields:
      display_name: payload.displayName
      status: payload.status
  cache:
    type: redis_hash
    input: athlete
    key: "{prefix}athlete:{{aggregateId}}"
    tombstone_prefix: "{prefix}tombstone:"
"#
        ),
    )
}

/// Every row of the source table: id -> (version, display_name, status).
fn source_rows(table: &str) -> HashMap<String, (i64, String, String)> {
    postgres()
        .query(
            &format!("SELECT id, version, display_name, status FROM {table}"),
            &[],
        )
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect()
}

/// Asserts the replica equals the source, field by field, and that `gone` ids have no entry.
fn assert_replica_equals_source(
    conn: &mut redis::Connection,
    prefix: &str,
    table: &str,
    gone: &[String],
) {
    for (id, (version, name, status)) in source_rows(table) {
        let h = hash(conn, &format!("{prefix}athlete:{id}"));
        assert_eq!(h.get("display_name"), Some(&name), "{id}: {h:?}");
        assert_eq!(h.get("status"), Some(&status), "{id}: {h:?}");
        assert_eq!(h.get("_version"), Some(&version.to_string()), "{id}: {h:?}");
    }
    for id in gone {
        assert!(
            hash(conn, &format!("{prefix}athlete:{id}")).is_empty(),
            "{id} is deleted"
        );
    }
}

#[test]
fn single_and_batch_reads_follow_the_contract() {
    let source = source("contract", 120);
    let client = reqwest::blocking::Client::new();
    let (status, body) = http_get(source.port, "/snapshot/athlete/a7");
    assert_eq!(status, 200, "{body}");
    let row: Value = serde_json::from_str(&body).expect("one JSON object");
    assert_eq!(
        row,
        json!({"aggregateId": "a7", "aggregateVersion": 3,
               "payload": {"displayName": "athlete 7", "status": "active"}})
    );
    let (status, body) = http_get(source.port, "/snapshot/athlete/nope");
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON")["code"],
        "not_found"
    );
    let (status, body) = http_get(source.port, "/snapshot/nobody/a1");
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON")["code"],
        "unknown_entity"
    );
    let batch = |ids: Vec<String>| {
        let response = client
            .post(format!("{}/athlete:batch", source.base()))
            .body(json!({ "ids": ids }).to_string())
            .send()
            .expect("POST");
        (response.status().as_u16(), response.text().expect("body"))
    };
    let (status, body) = batch(vec!["a1".into(), "zz".into(), "a3".into(), "a1".into()]);
    assert_eq!(status, 200, "{body}");
    let mut found: Vec<String> = body
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("NDJSON")["aggregateId"].to_string())
        .collect();
    found.sort();
    assert_eq!(found, ["\"a1\"", "\"a3\""]);
    let (status, body) = batch((0..51).map(|i| format!("a{i}")).collect());
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("at most 50"), "{body}");
    source.stop();
}

#[test]
fn thin_events_shuffled_and_duplicated_converge_to_the_source() {
    let mut conn = redis();
    let source = source("converge", 300);
    // Ten athletes deleted at the source: their last event is answered 404, a tombstone.
    let gone: Vec<String> = (1..=10).map(|i| format!("a{}", i * 30)).collect();
    postgres().execute(&format!(
        "DELETE FROM {} WHERE id IN ({})",
        source.table,
        gone.iter()
            .map(|g| format!("'{g}'"))
            .collect::<Vec<_>>()
            .join(",")
    ));
    let stream = unique("fetch-converge");
    let prefix = format!("{stream}:");
    let mut events = Vec::new();
    for i in 1..=300u64 {
        let id = format!("a{i}");
        let last = if gone.contains(&id) {
            i % 5 + 2
        } else {
            i % 5 + 1
        };
        for v in 1..=last {
            events.push(thin(&id, v));
            if (i + v) % 4 == 0 {
                events.push(thin(&id, v));
            }
        }
    }
    events.shuffle(&mut rand::rngs::StdRng::seed_from_u64(15));
    publish(&mut conn, &stream, &events);
    let file = pipeline(&stream, &prefix, &source.base(), "");
    drain(&file);
    assert_replica_equals_source(&mut conn, &prefix, &source.table, &gone);
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0);
    assert!(dead_letters(&mut conn, &format!("{stream}.dlq")).is_empty());
    source.stop();
    cleanup(&mut conn, &stream);
}

#[test]
fn a_lagging_endpoint_is_retried_until_it_catches_up_and_dead_lettered_past_the_bound() {
    let mut conn = redis();
    let source = source("lag", 3);
    // a1 is at version 2 in the source; the events say 4: the endpoint lags.
    let stream = unique("fetch-lag");
    let prefix = format!("{stream}:");
    publish(&mut conn, &stream, &[thin("a1", 4)]);
    let file = pipeline(&stream, &prefix, &source.base(), "    lag_retry_for: 60s\n");
    let worker = Worker::start(&file, &[]);
    let key = format!("{prefix}athlete:a1");
    wait_for_worker(
        &worker,
        Duration::from_secs(20),
        "the entry to be read",
        || pending_if_grouped(&mut conn, &stream) == Some(1),
    );
    assert!(
        hash(&mut conn, &key).is_empty(),
        "an older state is never applied"
    );
    postgres().execute(&format!(
        "UPDATE {} SET version = 4, display_name = 'caught up' WHERE id = 'a1'",
        source.table
    ));
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the caught-up state",
        || hash(&mut conn, &key).get("_version").map(String::as_str) == Some("4"),
    );
    assert_eq!(
        hash(&mut conn, &key)
            .get("display_name")
            .map(String::as_str),
        Some("caught up")
    );
    wait_for_worker(&worker, Duration::from_secs(10), "the ack", || {
        group_pending(&mut conn, &stream, "replica") == 0
    });
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");

    // Past the bound: dead-lettered, naming both versions.
    let stream2 = unique("fetch-lag-bound");
    publish(&mut conn, &stream2, &[thin("a2", 9)]);
    let file = pipeline(
        &stream2,
        &prefix,
        &source.base(),
        "    lag_retry_for: 500ms\n",
    );
    drain(&file);
    let dead = dead_letters(&mut conn, &format!("{stream2}.dlq"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    let error = dead[0].get("error").cloned().unwrap_or_default();
    assert!(
        error.contains("version 3") && error.contains("9"),
        "{error}"
    );
    assert_eq!(group_pending(&mut conn, &stream2, "replica"), 0);
    source.stop();
    cleanup(&mut conn, &stream);
    cleanup(&mut conn, &stream2);
}

#[test]
fn the_endpoint_down_holds_the_batch_unacked_then_it_converges() {
    let mut conn = redis();
    let source = source("down", 40);
    let proxy = Proxy::start(&format!("127.0.0.1:{}", source.port));
    proxy.cut();
    let stream = unique("fetch-down");
    let prefix = format!("{stream}:");
    let events: Vec<Value> = (1..=40u64)
        .map(|i| thin(&format!("a{i}"), i % 5 + 1))
        .collect();
    publish(&mut conn, &stream, &events);
    let url = format!("http://127.0.0.1:{}/snapshot", proxy.port);
    let file = pipeline(&stream, &prefix, &url, "");
    let worker = Worker::start(&file, &[]);
    let metrics = worker.listen_port("Metrics on /metrics");
    wait_for_worker(
        &worker,
        Duration::from_secs(20),
        "/readyz to name the endpoint",
        || {
            let (code, body) = http_get(metrics, "/readyz");
            code == 503 && body.contains("fetch endpoint") && body.contains("unreachable")
        },
    );
    assert_eq!(
        group_pending(&mut conn, &stream, "replica"),
        40,
        "nothing acked"
    );
    let (_, text) = http_get(metrics, "/metrics");
    assert!(text.contains("ecst_fetch_requests_total{"), "{text}");
    assert!(text.contains("outcome=\"circuit_open\""), "{text}");
    proxy.restore();
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "every entry acked",
        || group_pending(&mut conn, &stream, "replica") == 0,
    );
    wait_for_worker(&worker, Duration::from_secs(10), "/readyz ready", || {
        http_get(metrics, "/readyz").0 == 200
    });
    assert_replica_equals_source(&mut conn, &prefix, &source.table, &[]);
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    source.stop();
    cleanup(&mut conn, &stream);
}

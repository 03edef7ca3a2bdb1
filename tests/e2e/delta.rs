//! Deltas: patches delivered shuffled and duplicated converge to the source's state; a patch
//! over a missing version is never applied, stays pending, and applies once the version came;
//! with `repair:`, versions never published are repaired from a real `ecst snapshot serve` over
//! a Postgres source table, in a Redis hash and a Postgres replica alike.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

use crate::common::*;

fn pipeline(stream: &str, prefix: &str) -> String {
    format!(
        r#"name: athletes-delta
source:
  stream: "{stream}"
  group: replica
  block: 100ms
  claim_idle: 300ms
  claim_every: 200ms
  max_deliveries: 1000
stages:
  decode: {{ type: decode }}
  patches: {{ type: delta, input: decode }}
  deletes: {{ type: tombstone, input: patches, mode: delete, keep_for: 1h }}
  cache:
    type: redis_hash
    input: deletes
    key: "{prefix}athlete:{{aggregateId}}"
    tombstone_prefix: "{prefix}tombstone:"
"#
    )
}

fn metric(port: u16, name: &str) -> f64 {
    let body = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
        .and_then(|r| r.text())
        .unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Each aggregate's patches 1..=versions (version 1 on nothing), random fields changed or
/// removed, and the source's final state.
fn patches(
    rng: &mut rand::rngs::StdRng,
    id: &str,
    versions: u64,
) -> (Vec<Value>, BTreeMap<String, String>) {
    let mut state = BTreeMap::new();
    let mut events = Vec::new();
    for version in 1..=versions {
        let mut change = Map::new();
        for _ in 0..rng.random_range(1..4) {
            let field = format!("f{}", rng.random_range(0..6));
            if version > 1 && rng.random_bool(0.25) {
                state.remove(&field);
                change.insert(field, Value::Null);
            } else {
                let value = format!("{id}-v{version}-{}", rng.random_range(0..1000));
                state.insert(field.clone(), value.clone());
                change.insert(field, Value::String(value));
            }
        }
        events.push(json!({
            "eventType": "athlete.changed", "occurredAt": "2026-11-24T10:00:00Z",
            "aggregateType": "athlete", "aggregateId": id, "aggregateVersion": version,
            "baseVersion": version - 1, "payload": change
        }));
    }
    (events, state)
}

#[test]
fn shuffled_deltas_converge_field_by_field_and_gaps_wait_for_their_version() {
    let mut conn = redis();
    let stream = unique("delta");
    let prefix = format!("{stream}:");
    let path = pipeline_file("delta", &pipeline(&stream, &prefix));
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let mut events = Vec::new();
    let mut expected: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    for a in 0..20 {
        let id = format!("ath-{a}");
        let (mut evs, state) = patches(&mut rng, &id, 12);
        // Duplicates, which come back stale.
        let dup = evs[rng.random_range(0..evs.len())].clone();
        evs.push(dup);
        events.extend(evs);
        expected.insert(id, state);
    }
    events.shuffle(&mut rng);
    // One version held back: its successors wait on it.
    let held = events
        .iter()
        .position(|e| e["aggregateId"] == "ath-0" && e["aggregateVersion"] == 5)
        .map(|i| events.remove(i))
        .unwrap();
    events.retain(|e| !(e["aggregateId"] == "ath-0" && e["aggregateVersion"] == 5));

    let worker = Worker::start(&path, &["--metrics-addr", "127.0.0.1:0"]);
    let port = worker.listen_port("Metrics on /metrics");
    publish(&mut conn, &stream, &events);
    let key = |id: &str| format!("{prefix}athlete:{id}");
    // Every other aggregate converges; ath-0 stops at version 4, never patched over the gap.
    wait_for_worker(
        &worker,
        Duration::from_secs(60),
        "the other aggregates",
        || {
            (1..20).all(|a| {
                hash(&mut conn, &key(&format!("ath-{a}")))
                    .get("_version")
                    .map(String::as_str)
                    == Some("12")
            })
        },
    );
    wait_for_worker(&worker, Duration::from_secs(30), "gaps counted", || {
        metric(port, "ecst_delta_gaps_total") > 0.0
    });
    assert_eq!(
        hash(&mut conn, &key("ath-0"))
            .get("_version")
            .map(String::as_str),
        Some("4")
    );
    assert!(group_pending(&mut conn, &stream, "replica") > 0);
    // The missing version arrives: the waiting patches apply on it.
    publish(&mut conn, &stream, &[held]);
    wait_for_worker(&worker, Duration::from_secs(60), "ath-0 converged", || {
        hash(&mut conn, &key("ath-0"))
            .get("_version")
            .map(String::as_str)
            == Some("12")
    });
    wait_for_worker(&worker, Duration::from_secs(30), "nothing pending", || {
        group_pending(&mut conn, &stream, "replica") == 0
    });
    for (id, state) in &expected {
        let mut got = hash(&mut conn, &key(id));
        assert_eq!(got.remove("_version").as_deref(), Some("12"), "{id}");
        got.remove("_occurred_at");
        let got: BTreeMap<String, String> = got.into_iter().collect();
        assert_eq!(&got, state, "{id}: field by field, removed fields removed");
    }
    assert!(
        metric(port, "ecst_events_stale_total") >= 19.0,
        "duplicates are stale"
    );
    assert!(dead_letters(&mut conn, &format!("{stream}.dlq")).is_empty());
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    cleanup(&mut conn, &stream);
}

/// A source table holding each aggregate's final state (columns f0..f5, NULL where absent) at
/// `version`, and an `ecst snapshot serve` over it; returns the server, the table, its port.
fn repair_source(
    states: &HashMap<String, BTreeMap<String, String>>,
    version: i64,
) -> (Worker, String, u16) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let table = format!("e2e_delta_{}_{nanos}", std::process::id());
    let pg = postgres();
    pg.execute(&format!(
        "CREATE TABLE {table} (id text PRIMARY KEY, version bigint NOT NULL, f0 text, f1 text, f2 text, f3 text, f4 text, f5 text)"
    ));
    for (id, state) in states {
        let cols: Vec<Option<String>> = (0..6)
            .map(|f| state.get(&format!("f{f}")).cloned())
            .collect();
        pg.query(
            &format!("INSERT INTO {table} VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"),
            &[
                id, &version, &cols[0], &cols[1], &cols[2], &cols[3], &cols[4], &cols[5],
            ],
        );
    }
    let file = pipeline_file(
        "delta-snapshot",
        &format!(
            "listen: 127.0.0.1:0\npostgres: \"{url}\"\nentities:\n  athlete:\n    table: {table}\n    payload: {{ f0: f0, f1: f1, f2: f2, f3: f3, f4: f4, f5: f5 }}\n",
            url = database_url()
        ),
    );
    let mut cmd = ecst();
    cmd.args(["snapshot", "serve"]).arg(&file);
    let server = Worker::spawn(cmd);
    let port = server.listen_port("Snapshot server listening.");
    wait_until(Duration::from_secs(20), "the snapshot server", || {
        http_get(port, "/healthz").0 == 200
    });
    (server, table, port)
}

#[test]
fn versions_never_published_are_repaired_from_the_source_through_the_snapshot_endpoint() {
    let mut conn = redis();
    let stream = unique("delta-repair");
    let prefix = format!("{stream}:");
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let mut events = Vec::new();
    let mut expected: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    let mut missing = 0;
    for a in 0..20 {
        let id = format!("ath-{a}");
        let (mut evs, state) = patches(&mut rng, &id, 12);
        let dup = evs[rng.random_range(0..evs.len())].clone();
        evs.push(dup);
        // Half the aggregates lose a version (never the last) that is never published.
        if a % 2 == 0 {
            let lost = rng.random_range(2..12);
            evs.retain(|e| e["aggregateVersion"] != lost);
            missing += 1;
        }
        events.extend(evs);
        expected.insert(id, state);
    }
    events.shuffle(&mut rng);
    let (server, table, port) = repair_source(&expected, 12);
    let yaml = pipeline(&stream, &prefix).replace(
        "  patches: { type: delta, input: decode }\n",
        &format!(
            "  patches:\n    type: delta\n    input: decode\n    repair:\n      url: \"http://127.0.0.1:{port}/snapshot\"\n      timeout: 2s\n      retries: 1\n      backoff: 20ms\n"
        ),
    );
    assert!(yaml.contains("repair:"), "{yaml}");
    // The same patches into a Postgres replica too: applied on their base, gaps repaired.
    let replica = format!("{table}_replica");
    let yaml = format!(
        "{yaml}  table:\n    type: postgres\n    input: deletes\n    url: \"{url}\"\n    table: {replica}\n    create: true\n    columns: {{ f0: text, f1: text, f2: text, f3: text, f4: text, f5: text }}\n",
        url = database_url()
    );
    let path = pipeline_file("delta-repair", &yaml);
    let pg = postgres();
    // Each replica row's version and its non-null columns, by aggregate id.
    let rows = || -> HashMap<String, (i64, BTreeMap<String, String>)> {
        pg.query(
            &format!("SELECT aggregate_id, source_version, f0, f1, f2, f3, f4, f5 FROM {replica}"),
            &[],
        )
        .iter()
        .map(|r| {
            let fields = (0..6)
                .filter_map(|f| Some((format!("f{f}"), r.get::<_, Option<String>>(f + 2)?)))
                .collect();
            (r.get(0), (r.get(1), fields))
        })
        .collect()
    };

    let worker = Worker::start(&path, &["--metrics-addr", "127.0.0.1:0"]);
    let metrics = worker.listen_port("Metrics on /metrics");
    publish(&mut conn, &stream, &events);
    let key = |id: &str| format!("{prefix}athlete:{id}");
    wait_for_worker(
        &worker,
        Duration::from_secs(60),
        "every aggregate at 12",
        || {
            (0..20).all(|a| {
                hash(&mut conn, &key(&format!("ath-{a}")))
                    .get("_version")
                    .map(String::as_str)
                    == Some("12")
            })
        },
    );
    wait_for_worker(&worker, Duration::from_secs(30), "nothing pending", || {
        group_pending(&mut conn, &stream, "replica") == 0
    });
    let table_rows = rows();
    for (id, state) in &expected {
        let mut got = hash(&mut conn, &key(id));
        assert_eq!(got.remove("_version").as_deref(), Some("12"), "{id}");
        got.remove("_occurred_at");
        let got: BTreeMap<String, String> = got.into_iter().collect();
        assert_eq!(&got, state, "{id}: field by field, removed fields removed");
        assert_eq!(
            table_rows.get(id),
            Some(&(12, state.clone())),
            "{id}: the Postgres row, column by column, removed columns NULL"
        );
    }
    let gaps = metric(metrics, "ecst_delta_gaps_total");
    let repaired = metric(metrics, "ecst_delta_gaps_repaired_total");
    assert!(
        gaps >= f64::from(missing),
        "one gap at least per lost version: {gaps}"
    );
    assert!(repaired >= f64::from(missing), "{repaired} repaired");
    assert!(repaired <= gaps, "{repaired} repaired of {gaps}");
    // Late, stale deltas (a redelivered old version) change nothing.
    let stale_before = metric(metrics, "ecst_events_stale_total");
    let late: Vec<Value> = (0..20)
        .map(|a| {
            json!({
                "eventType": "athlete.changed", "occurredAt": "2026-11-24T10:00:00Z",
                "aggregateType": "athlete", "aggregateId": format!("ath-{a}"),
                "aggregateVersion": 7, "baseVersion": 6, "payload": {"f0": "late", "f1": null}
            })
        })
        .collect();
    publish(&mut conn, &stream, &late);
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "late deltas stale",
        || {
            metric(metrics, "ecst_events_stale_total") >= stale_before + 20.0
                && group_pending(&mut conn, &stream, "replica") == 0
        },
    );
    for (id, state) in &expected {
        let mut got = hash(&mut conn, &key(id));
        got.remove("_occurred_at");
        assert_eq!(got.remove("_version").as_deref(), Some("12"), "{id}");
        let got: BTreeMap<String, String> = got.into_iter().collect();
        assert_eq!(&got, state, "{id}: untouched by a stale delta");
    }
    assert_eq!(
        rows(),
        table_rows,
        "Postgres rows untouched by stale deltas"
    );
    assert!(dead_letters(&mut conn, &format!("{stream}.dlq")).is_empty());
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    pg.execute(&format!(
        "DROP TABLE {table}; DROP TABLE {replica}; DROP TABLE {replica}_tombstones"
    ));
    let (status, log) = server.terminate();
    assert!(status.success(), "{log}");
    cleanup(&mut conn, &stream);
}

#[test]
fn a_repair_endpoint_lagging_behind_the_patch_leaves_it_pending_until_it_catches_up() {
    let mut conn = redis();
    let stream = unique("delta-lag");
    let prefix = format!("{stream}:");
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut events = Vec::new();
    let mut expected: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    for a in 0..4 {
        let id = format!("ath-{a}");
        let (evs, state) = patches(&mut rng, &id, 12);
        // Version 6 is never published; the endpoint answers version 5 for now.
        events.extend(evs.into_iter().filter(|e| e["aggregateVersion"] != 6));
        expected.insert(id, state);
    }
    let (server, table, port) = repair_source(&expected, 5);
    let yaml = pipeline(&stream, &prefix).replace(
        "  patches: { type: delta, input: decode }\n",
        &format!(
            "  patches:\n    type: delta\n    input: decode\n    repair:\n      url: \"http://127.0.0.1:{port}/snapshot\"\n      timeout: 2s\n      retries: 0\n"
        ),
    );
    let path = pipeline_file("delta-lag", &yaml);
    let worker = Worker::start(&path, &["--metrics-addr", "127.0.0.1:0"]);
    let metrics = worker.listen_port("Metrics on /metrics");
    publish(&mut conn, &stream, &events);
    let key = |id: &str| format!("{prefix}athlete:{id}");
    // Asked more than once (the entries are claimed again), never covered.
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "repeated repair fetches",
        || metric(metrics, "ecst_fetch_ids_total") >= 8.0,
    );
    assert_eq!(metric(metrics, "ecst_delta_gaps_repaired_total"), 0.0);
    assert!(group_pending(&mut conn, &stream, "replica") > 0);
    for a in 0..4 {
        let h = hash(&mut conn, &key(&format!("ath-{a}")));
        assert_eq!(h.get("_version").map(String::as_str), Some("5"), "{h:?}");
    }
    // The endpoint catches up: the next claim repairs every gap.
    postgres().execute(&format!("UPDATE {table} SET version = 12"));
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "repaired and acked",
        || group_pending(&mut conn, &stream, "replica") == 0,
    );
    for (id, state) in &expected {
        let mut got = hash(&mut conn, &key(id));
        assert_eq!(got.remove("_version").as_deref(), Some("12"), "{id}");
        got.remove("_occurred_at");
        let got: BTreeMap<String, String> = got.into_iter().collect();
        assert_eq!(&got, state, "{id}: field by field");
    }
    assert!(metric(metrics, "ecst_delta_gaps_repaired_total") >= 4.0);
    assert!(dead_letters(&mut conn, &format!("{stream}.dlq")).is_empty());
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    postgres().execute(&format!("DROP TABLE {table}"));
    let (status, log) = server.terminate();
    assert!(status.success(), "{log}");
    cleanup(&mut conn, &stream);
}

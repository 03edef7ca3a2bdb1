//! Deltas: patches delivered shuffled and duplicated converge to the source's state; a patch
//! over a missing version is never applied, stays pending, and applies once the version came.

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

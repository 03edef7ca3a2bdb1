//! Claim check: payloads too large for the stream, stored by `ecst publish` in Redis and
//! resolved by the `claim_check` stage, checked by size and hash; missing and corrupt claims
//! are dead-lettered after the retry bound, a late one is applied.

use std::collections::HashMap;
use std::time::Duration;

use redis::Commands;
use serde_json::{Value, json};

use crate::common::*;

/// A 5 MB string that is not one byte repeated (so a wrong slice would not compare equal).
fn blob(seed: u64) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..5 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

fn big_event(id: &str, version: u64, blob: &str) -> Value {
    json!({
        "eventType": "athlete.updated", "occurredAt": "2026-11-24T10:00:00Z",
        "aggregateId": id, "aggregateVersion": version,
        "payload": {"displayName": format!("Athlete {id}"), "blob": blob}
    })
}

/// The `payloadRef.key` of each aggregate's entry in `stream`.
fn claim_keys(conn: &mut redis::Connection, stream: &str) -> HashMap<String, String> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(stream).expect("XRANGE");
    let mut keys = HashMap::new();
    for entry in reply.ids {
        let body: String = entry.get("v").expect("v");
        let body: Value = serde_json::from_str(&body).expect("JSON body");
        if let Some(key) = body["payloadRef"]["key"].as_str() {
            keys.insert(
                body["aggregateId"].as_str().unwrap_or_default().to_string(),
                key.to_string(),
            );
        }
    }
    keys
}

#[test]
fn claim_checked_5mb_payloads_land_intact_and_bad_claims_are_dead_lettered() {
    let mut conn = redis();
    let stream = unique("claim");
    let prefix = format!("{stream}:");
    let claim_prefix = format!("{stream}:claim:");
    let blobs: HashMap<&str, String> = [("big", 1), ("corrupt", 2), ("missing", 3), ("late", 4)]
        .into_iter()
        .map(|(id, seed)| (id, blob(seed)))
        .collect();
    let mut events: Vec<Value> = blobs
        .iter()
        .map(|(id, blob)| big_event(id, 1, blob))
        .collect();
    events.push(event("small", 1, "Inline"));
    let ndjson = std::env::temp_dir().join(format!("{}.ndjson", stream.replace(':', "_")));
    let lines: Vec<String> = events.iter().map(Value::to_string).collect();
    std::fs::write(&ndjson, lines.join("\n")).expect("write events");

    let mut cmd = ecst();
    cmd.args([
        "publish",
        "--stream",
        &stream,
        "--claim-check-over",
        "1048576",
    ])
    .args(["--claim-ttl", "1h", "--claim-prefix", &claim_prefix])
    .arg("--file")
    .arg(&ndjson);
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let _ = std::fs::remove_file(&ndjson);

    // Every large payload went to the claim store; the stream carries only references.
    let keys = claim_keys(&mut conn, &stream);
    assert_eq!(keys.len(), 4, "{keys:?}");
    let longest: usize = {
        let reply: redis::streams::StreamRangeReply = conn.xrange_all(&stream).expect("XRANGE");
        reply
            .ids
            .iter()
            .map(|e| e.get::<String>("v").map_or(0, |v| v.len()))
            .max()
            .unwrap_or(0)
    };
    assert!(longest < 2048, "an entry of {longest} bytes");
    let ttl: i64 = conn.ttl(&keys["big"]).expect("TTL");
    assert!((3000..=3600).contains(&ttl), "claim TTL {ttl}");

    // Corrupt one claim, delete another, and hold the third back until the worker has
    // looked for it once.
    let forged = r#"{"displayName":"Mallory"}"#;
    let _: () = conn.set(&keys["corrupt"], forged).expect("SET");
    let _: () = conn.del(&keys["missing"]).expect("DEL");
    let late_body: Vec<u8> = conn.get(&keys["late"]).expect("GET");
    let _: () = conn.del(&keys["late"]).expect("DEL");

    let pipeline = pipeline_file(
        "claim",
        &format!(
            r#"name: claims
source:
  stream: "{stream}"
  group: replica
  block: 100ms
stages:
  decode: {{ type: decode }}
  latest: {{ type: version_filter, input: decode }}
  claims: {{ type: claim_check, input: latest, attempts: 8, retry_backoff: 100ms }}
  cache:
    type: redis_hash
    input: claims
    key: "{prefix}athlete:{{aggregateId}}"
    tombstone_prefix: "{prefix}tombstone:"
"#
        ),
    );
    let worker = Worker::start(&pipeline, &[]);
    wait_for_worker(
        &worker,
        Duration::from_secs(60),
        "a first unresolved read",
        || worker.log().contains("Claims not resolved yet"),
    );
    let _: () = conn.set(&keys["late"], &late_body).expect("SET");

    let dlq = format!("{stream}.dlq");
    wait_for_worker(
        &worker,
        Duration::from_secs(60),
        "the batch settled",
        || {
            let mut c = redis();
            group_pending(&mut c, &stream, "replica") == 0 && dead_letters(&mut c, &dlq).len() == 2
        },
    );
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");

    for id in ["big", "late"] {
        let stored = hash(&mut conn, &format!("{prefix}athlete:{id}"));
        let field = stored.get("blob").map(String::as_str).unwrap_or_default();
        assert_eq!(field.len(), blobs[id].len(), "{id}");
        assert!(field == blobs[id], "{id}: the stored blob differs");
        assert_eq!(stored["displayName"], format!("Athlete {id}"));
    }
    assert_eq!(
        hash(&mut conn, &format!("{prefix}athlete:small"))["displayName"],
        "Inline"
    );
    for id in ["corrupt", "missing"] {
        assert!(
            hash(&mut conn, &format!("{prefix}athlete:{id}")).is_empty(),
            "{id}"
        );
    }
    let reasons: Vec<String> = dead_letters(&mut conn, &dlq)
        .into_iter()
        .map(|d| d.get("error").cloned().unwrap_or_default())
        .collect();
    assert!(
        reasons.contains(&format!(
            "claim `{}` is corrupt: size {} bytes, reference says {}",
            keys["corrupt"],
            forged.len(),
            serde_json::to_vec(
                &json!({"displayName": "Athlete corrupt", "blob": blobs["corrupt"]})
            )
            .unwrap()
            .len()
        )),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&format!(
            "claim `{}` not found after 8 attempts",
            keys["missing"]
        )),
        "{reasons:?}"
    );
    cleanup(&mut conn, &stream);
}

#[test]
fn the_relay_claim_checks_a_5mb_outbox_payload() {
    use crate::relay::{drop_outbox, outbox, outbox_count, relay_file, start_relay};
    let pg = postgres();
    let mut conn = redis();
    let table = outbox("claim");
    let stream = unique("relay-claim");
    let blob = blob(5);
    let payload = json!({"displayName": "Outboxed", "blob": blob}).to_string();
    pg.query(
        &format!(
            "INSERT INTO {table} (stream, aggregate_type, aggregate_id, aggregate_version, event_type,
                                  event_id, schema_version, occurred_at, payload)
             VALUES ($1, 'athlete', 'big', 1, 'athlete.updated', 'c81bc81b-dead-4e5d-abff-90865d1e13b1', 1,
                     '2026-11-24T10:00:00Z', $2::text::jsonb),
                    ($1, 'athlete', 'small', 1, 'athlete.updated', 'c81bc81b-dead-4e5d-abff-90865d1e13b2', 1,
                     '2026-11-24T10:00:00Z', '{{\"displayName\": \"Inline\"}}')"
        ),
        &[&stream, &payload],
    );
    let file = relay_file(
        &table,
        &database_url(),
        &redis_url(),
        &format!("claim_check: {{ over_bytes: 1048576, ttl: 1h, prefix: \"{stream}:claim:\" }}\n"),
    );
    let relay = start_relay(&file);
    wait_until(Duration::from_secs(30), "the outbox to empty", || {
        outbox_count(&pg, &table) == 0
    });
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    let keys = claim_keys(&mut conn, &stream);
    assert_eq!(
        keys.len(),
        1,
        "only the large payload is claim-checked: {keys:?}"
    );
    assert!(keys["big"].starts_with(&format!("{stream}:claim:sha256:")));

    // A pipeline without claim_check refuses the reference rather than write an empty row.
    let unresolved = pipeline_file(
        "relay-noclaim",
        &format!(
            r#"name: no-claims
source:
  stream: "{stream}"
  group: no-claims
  block: 100ms
stages:
  decode: {{ type: decode }}
  cache:
    type: redis_hash
    input: decode
    key: "{stream}:plain:{{aggregateId}}"
    tombstone_prefix: "{stream}:plain-tombstone:"
"#
        ),
    );
    drain(&unresolved);
    assert!(hash(&mut conn, &format!("{stream}:plain:big")).is_empty());
    assert_eq!(
        hash(&mut conn, &format!("{stream}:plain:small"))["displayName"],
        "Inline"
    );
    let dead = dead_letters(&mut conn, &format!("{stream}.dlq"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0]["error"],
        format!(
            "sink `cache`: payloadRef `{}` is not resolved: add a claim_check stage before this sink",
            keys["big"]
        )
    );

    let prefix = format!("{stream}:");
    let pipeline = pipeline_file(
        "relay-claim",
        &format!(
            r#"name: claims
source:
  stream: "{stream}"
  group: replica
  block: 100ms
stages:
  decode: {{ type: decode }}
  claims: {{ type: claim_check, input: decode }}
  cache:
    type: redis_hash
    input: claims
    key: "{prefix}athlete:{{aggregateId}}"
    tombstone_prefix: "{prefix}tombstone:"
"#
        ),
    );
    drain(&pipeline);
    let stored = hash(&mut conn, &format!("{prefix}athlete:big"));
    assert!(stored.get("blob") == Some(&blob), "the stored blob differs");
    assert_eq!(stored["displayName"], "Outboxed");
    assert_eq!(
        hash(&mut conn, &format!("{prefix}athlete:small"))["displayName"],
        "Inline"
    );
    drop_outbox(&pg, &table);
    cleanup(&mut conn, &stream);
}

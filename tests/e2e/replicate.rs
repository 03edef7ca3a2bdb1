//! Replication semantics: duplicates, reordering, deletes, poison, foreign shapes, sharing.

use std::collections::HashMap;
use std::time::Duration;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};

use crate::common::*;

#[test]
fn duplicates_and_reordering_converge_to_the_newest_version() {
    let mut conn = redis();
    let stream = unique("reorder");
    let prefix = format!("{stream}:");
    // 40 aggregates x 12 versions, each event twice, shuffled across the whole stream so that
    // versions arrive out of order both within a batch and across batches (batch_size 7).
    let mut events: Vec<Value> = Vec::new();
    for a in 0..40 {
        for v in 1..=12u64 {
            let e = event(&format!("a{a}"), v, &format!("name {a} v{v}"));
            events.push(e.clone());
            events.push(e);
        }
    }
    events.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    publish(&mut conn, &stream, &events);
    let file = pipeline_file(
        "reorder",
        &athletes_pipeline(&stream, &prefix, "  batch_size: 7"),
    );
    drain(&file);
    for a in 0..40 {
        let h = hash(&mut conn, &format!("{prefix}athlete:a{a}"));
        assert_eq!(
            h.get("_version").map(String::as_str),
            Some("12"),
            "aggregate a{a}: {h:?}"
        );
        assert_eq!(h.get("display_name"), Some(&format!("name {a} v12")));
    }
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0);
    cleanup(&mut conn, &stream);
}

#[test]
fn a_delete_is_never_resurrected_by_a_late_older_update() {
    let mut conn = redis();
    let stream = unique("delete");
    let prefix = format!("{stream}:");
    let file = pipeline_file("delete", &athletes_pipeline(&stream, &prefix, ""));
    publish(
        &mut conn,
        &stream,
        &[event("x", 3, "three"), delete("x", 9)],
    );
    drain(&file);
    let key = format!("{prefix}athlete:x");
    assert!(hash(&mut conn, &key).is_empty());
    // The late update arrives in a later batch and a later run: only the store's tombstone
    // can stop it (the worker's in-memory filter is gone).
    publish(&mut conn, &stream, &[event("x", 8, "eight")]);
    drain(&file);
    assert!(
        hash(&mut conn, &key).is_empty(),
        "version 8 resurrected a delete at version 9"
    );
    publish(&mut conn, &stream, &[event("x", 10, "reborn")]);
    drain(&file);
    assert_eq!(
        hash(&mut conn, &key)
            .get("display_name")
            .map(String::as_str),
        Some("reborn")
    );
    cleanup(&mut conn, &stream);
}

#[test]
fn poison_entries_go_to_the_dead_letter_stream_and_the_rest_replicates() {
    let mut conn = redis();
    let stream = unique("poison");
    let prefix = format!("{stream}:");
    let dlq = format!("{stream}.dlq");
    let mut ids = Vec::new();
    ids.extend(publish(&mut conn, &stream, &[event("good1", 1, "one")]));
    let bad_bodies: Vec<(&str, Vec<u8>)> = vec![
        ("bad json", b"{\"aggregateId\": ".to_vec()),
        (
            "no version",
            br#"{"aggregateId":"p1","payload":{}}"#.to_vec(),
        ),
        (
            "negative version",
            br#"{"aggregateId":"p2","aggregateVersion":-4,"payload":{}}"#.to_vec(),
        ),
        (
            "string version",
            br#"{"aggregateId":"p3","aggregateVersion":"7","payload":{}}"#.to_vec(),
        ),
        (
            "too large",
            format!(
                r#"{{"aggregateId":"p4","aggregateVersion":1,"payload":{{"x":"{}"}}}}"#,
                "y".repeat(3000)
            )
            .into_bytes(),
        ),
        ("bad bytes", vec![0xff, 0xfe, 0x00, 0x9c]),
    ];
    let mut bad_ids = Vec::new();
    for (_, body) in &bad_bodies {
        let id: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("v")
            .arg(body.as_slice())
            .arg("origin")
            .arg("test")
            .query(&mut conn)
            .expect("XADD");
        bad_ids.push(id);
    }
    ids.extend(publish(&mut conn, &stream, &[event("good2", 1, "two")]));
    let yaml = athletes_pipeline(&stream, &prefix, "").replace(
        "  decode: { type: decode }",
        "  decode: { type: decode, max_body_bytes: 2048 }",
    );
    drain(&pipeline_file("poison", &yaml));

    assert_eq!(
        hash(&mut conn, &format!("{prefix}athlete:good1"))
            .get("display_name")
            .map(String::as_str),
        Some("one")
    );
    assert_eq!(
        hash(&mut conn, &format!("{prefix}athlete:good2"))
            .get("display_name")
            .map(String::as_str),
        Some("two")
    );
    let dead = dead_letters(&mut conn, &dlq);
    assert_eq!(dead.len(), bad_bodies.len(), "{dead:?}");
    let by_id: HashMap<&str, &HashMap<String, String>> =
        dead.iter().map(|d| (d["source_id"].as_str(), d)).collect();
    let expected_reasons = [
        "invalid JSON body".to_string(),
        "missing aggregateVersion (key `aggregateVersion`)".to_string(),
        "aggregateVersion (key `aggregateVersion`) must be a non-negative integer, got -4"
            .to_string(),
        "aggregateVersion (key `aggregateVersion`) must be a non-negative integer, got \"7\""
            .to_string(),
        format!(
            "body is {} bytes, over the limit of 2048 bytes",
            bad_bodies[4].1.len()
        ),
        "body is not an object".to_string(),
    ];
    for ((id, (label, _)), reason) in bad_ids.iter().zip(&bad_bodies).zip(expected_reasons) {
        let d = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{label} ({id}) not dead-lettered: {dead:?}"));
        assert!(
            d["error"].starts_with(reason.as_str()),
            "{label}: {}",
            d["error"]
        );
        assert_eq!(d["source_stream"], stream);
        assert_eq!(d["group"], "replica");
        assert_eq!(d["origin"], "test", "original fields are kept");
        assert!(d.contains_key("v"));
    }
    assert_eq!(
        group_pending(&mut conn, &stream, "replica"),
        0,
        "poison is acked, never left pending"
    );
    cleanup(&mut conn, &stream);
}

#[test]
fn the_first_seeds_python_shape_replicates_by_mapping_alone() {
    let mut conn = redis();
    let stream = unique("seed");
    let prefix = format!("{stream}:");
    // CustomerStateTransferEvent from the pattern guide: snake_case, body in `data`,
    // naive isoformat() timestamps, deletes as is_deleted with a null payload.
    let customer = |v: u64, tier: &str| {
        json!({
            "event_id": format!("evt-{v}"), "event_type": "CUSTOMER_UPDATED", "customer_id": "C-001",
            "payload": {"customer_id": "C-001", "name": "Alice Johnson", "email": "alice@example.com",
                        "tier": tier, "loyalty_points": 0},
            "timestamp": "2024-05-01T12:00:00.123456", "version": v
        })
    };
    for body in [
        customer(0, "premium"),
        customer(1, "gold"),
        json!({
        "event_id": "evt-2", "event_type": "CUSTOMER_DELETED", "customer_id": "C-002", "payload": null,
        "timestamp": "2024-05-01T12:01:00", "version": 2, "is_deleted": true}),
    ] {
        redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("data")
            .arg(body.to_string())
            .query::<String>(&mut conn)
            .expect("XADD");
    }
    let yaml = format!(
        r#"name: orders-customers
source:
  stream: "{stream}"
  group: order-service
  block: 100ms
stages:
  decode:
    type: decode
    field: data
    envelope:
      event_id: event_id
      event_type: event_type
      aggregate_id: customer_id
      aggregate_version: version
      occurred_at: timestamp
      deleted: is_deleted
  customers:
    type: project
    input: decode
    include: ["*"]
    exclude: [email]
  replica:
    type: redis_hash
    input: customers
    key: "{prefix}customer:{{aggregateId}}"
"#
    );
    drain(&pipeline_file("seed", &yaml));
    let h = hash(&mut conn, &format!("{prefix}customer:C-001"));
    assert_eq!(h.get("tier").map(String::as_str), Some("gold"));
    assert_eq!(h.get("_version").map(String::as_str), Some("1"));
    assert_eq!(
        h.get("_occurred_at").map(String::as_str),
        Some("2024-05-01T12:00:00.123456Z")
    );
    assert_eq!(h.get("email"), None);
    assert_eq!(h.get("loyalty_points").map(String::as_str), Some("0"));
    assert_eq!(dead_letters(&mut conn, &format!("{stream}.dlq")).len(), 0);
    cleanup(&mut conn, &stream);
}

#[test]
fn msgpack_bodies_are_decoded_by_content_type() {
    let mut conn = redis();
    let stream = unique("msgpack");
    let prefix = format!("{stream}:");
    let body = rmp_serde::to_vec_named(&event("m1", 4, "packed")).expect("encode");
    redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("v")
        .arg(body)
        .arg("ct")
        .arg("application/msgpack")
        .query::<String>(&mut conn)
        .expect("XADD");
    drain(&pipeline_file(
        "msgpack",
        &athletes_pipeline(&stream, &prefix, ""),
    ));
    assert_eq!(
        hash(&mut conn, &format!("{prefix}athlete:m1"))
            .get("display_name")
            .map(String::as_str),
        Some("packed")
    );
    cleanup(&mut conn, &stream);
}

#[test]
fn two_workers_in_one_group_share_the_stream_and_agree() {
    let mut conn = redis();
    let stream = unique("shared");
    let prefix = format!("{stream}:");
    let mut events = Vec::new();
    for v in 1..=20u64 {
        for a in 0..300 {
            events.push(event(&format!("s{a}"), v, &format!("n{a}v{v}")));
        }
    }
    events.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
    publish(&mut conn, &stream, &events);
    let file = pipeline_file(
        "shared",
        &athletes_pipeline(&stream, &prefix, "  batch_size: 50"),
    );
    let mut a = ecst();
    a.arg("run")
        .arg(&file)
        .arg("--drain")
        .env("ECST_CONSUMER", "worker-a");
    let mut b = ecst();
    b.arg("run")
        .arg(&file)
        .arg("--drain")
        .env("ECST_CONSUMER", "worker-b");
    let (ha, hb) = (
        std::thread::spawn(move || run_with_deadline(a, Duration::from_secs(120))),
        std::thread::spawn(move || run_with_deadline(b, Duration::from_secs(120))),
    );
    let (oa, ob) = (ha.join().expect("worker a"), hb.join().expect("worker b"));
    assert!(
        oa.status.success() && ob.status.success(),
        "{}\n{}",
        stderr_of(&oa),
        stderr_of(&ob)
    );
    for a in 0..300 {
        let h = hash(&mut conn, &format!("{prefix}athlete:s{a}"));
        assert_eq!(
            h.get("_version").map(String::as_str),
            Some("20"),
            "s{a}: {h:?}"
        );
    }
    // Both consumers took part (and, drained, left the group).
    for log in [stderr_of(&oa), stderr_of(&ob)] {
        let acked = log
            .lines()
            .find(|l| l.contains("Stopped reading."))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("acked=")))
            .and_then(|n| n.parse::<u64>().ok());
        assert!(acked.is_some_and(|n| n > 0), "{log}");
    }
    let consumers: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&stream)
        .arg("replica")
        .query(&mut conn)
        .expect("XINFO CONSUMERS");
    assert!(consumers.is_empty(), "{consumers:?}");
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0);
    cleanup(&mut conn, &stream);
}

#[test]
fn bench_reports_a_correct_replica() {
    let mut cmd = ecst();
    cmd.args([
        "bench",
        "--aggregates",
        "300",
        "--versions",
        "4",
        "--latency-seconds",
        "1",
        "--latency-rate",
        "500",
        "--json",
    ]);
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "events",
        "events_per_sec",
        "ceiling_events_per_sec",
        "ratio",
        "p50_ms",
        "p99_ms",
        "peak_rss_mb",
        "mismatches",
    ] {
        assert!(report.get(key).is_some(), "missing {key}: {report}");
    }
    assert_eq!(report["mismatches"], 0);
    assert!(report["events"].as_u64().unwrap_or(0) >= 1200);
    assert!(report["latency_samples"].as_u64().unwrap_or(0) >= 500);
}

#[test]
fn bench_with_worker_processes_reports_a_correct_replica() {
    let mut cmd = ecst();
    cmd.args([
        "bench",
        "--aggregates",
        "300",
        "--versions",
        "4",
        "--workers",
        "2",
        "--latency-seconds",
        "1",
        "--latency-rate",
        "500",
        "--json",
    ]);
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["workers"], 2, "{report}");
    assert_eq!(report["masters"], 1, "{report}");
    let per_partition: u64 = report["partition_events"]
        .as_array()
        .expect("partition_events")
        .iter()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(Some(per_partition), report["events"].as_u64(), "{report}");
    assert!(
        report["redis_cpu_us_per_event"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    // Counted inside the workers, which the bench does not see.
    assert_eq!(report["applied"], Value::Null, "{report}");
}

#[test]
fn a_record_the_store_refuses_is_dead_lettered_and_the_batch_commits() {
    let mut conn = redis();
    let stream = unique("wrongtype");
    let prefix = format!("{stream}:");
    // Someone else's plain string sits where one athlete's hash belongs: Redis refuses the
    // whole script (WRONGTYPE), so the worker must find that record and set it aside.
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}athlete:w3"))
        .arg("not a hash")
        .query(&mut conn)
        .expect("SET");
    let events: Vec<Value> = (0..6).map(|i| event(&format!("w{i}"), 1, "n")).collect();
    let ids = publish(&mut conn, &stream, &events);
    let out = drain(&pipeline_file(
        "wrongtype",
        &athletes_pipeline(&stream, &prefix, ""),
    ));
    for i in [0, 1, 2, 4, 5] {
        assert_eq!(
            hash(&mut conn, &format!("{prefix}athlete:w{i}"))
                .get("_version")
                .map(String::as_str),
            Some("1")
        );
    }
    let dead = dead_letters(&mut conn, &format!("{stream}.dlq"));
    assert_eq!(dead.len(), 1, "{dead:?}\n{}", stderr_of(&out));
    assert_eq!(dead[0]["source_id"], ids[3]);
    assert!(
        dead[0]["error"].starts_with("sink `cache`: refused by the store:"),
        "{}",
        dead[0]["error"]
    );
    assert!(
        dead[0]["error"].contains("WRONGTYPE"),
        "{}",
        dead[0]["error"]
    );
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0);
    cleanup(&mut conn, &stream);
}

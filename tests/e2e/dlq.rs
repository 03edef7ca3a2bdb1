//! `ecst dlq`: dead letters listed by reason, shown decoded, replayed after a config fix into
//! the replica exactly once, and purged only when asked twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

fn dlq(pipeline: &PathBuf, args: &[&str]) -> Output {
    let mut cmd = ecst();
    cmd.arg("dlq").arg(pipeline).args(args).stdin(Stdio::null());
    run_with_deadline(cmd, Duration::from_secs(60))
}

fn dlq_json(pipeline: &PathBuf, args: &[&str]) -> Value {
    let out = dlq(pipeline, &[args, &["--json"]].concat());
    assert!(
        out.status.success(),
        "ecst dlq {args:?}: {}",
        stderr_of(&out)
    );
    serde_json::from_slice(&out.stdout).expect("dlq --json prints JSON")
}

fn xlen(conn: &mut redis::Connection, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query(conn).expect("XLEN")
}

/// The athletes pipeline with bodies over `max_body_bytes` dead-lettered.
fn pipeline_with_body_limit(stream: &str, prefix: &str, limit: Option<u32>) -> String {
    let decode = match limit {
        Some(limit) => format!("decode: {{ type: decode, max_body_bytes: {limit} }}"),
        None => "decode: { type: decode }".to_string(),
    };
    athletes_pipeline(stream, prefix, "").replace("decode: { type: decode }", &decode)
}

#[test]
fn replay_after_a_config_fix_lands_in_the_replica_once_and_purge_asks_first() {
    let mut conn = redis();
    let stream = unique("dlq");
    let prefix = format!("{stream}:");
    let dead_letter_stream = format!("{stream}.dlq");
    let strict = pipeline_file(
        "dlq",
        &pipeline_with_body_limit(&stream, &prefix, Some(400)),
    );
    let long = "x".repeat(500);
    let mut array = event("z", 1, "unused");
    array["payload"] = json!(["Zed"]);
    let ids = publish(
        &mut conn,
        &stream,
        &[
            event("a", 1, "Ada"),
            event("b", 1, &format!("Bea {long}")),
            event("c", 1, &format!("Cy {long}")),
            array,
        ],
    );
    drain(&strict);
    assert!(hash(&mut conn, &format!("{prefix}athlete:b")).is_empty());
    assert_eq!(xlen(&mut conn, &dead_letter_stream), 3);

    // list: two reasons, counted, with their ids.
    let listed = dlq_json(&strict, &["list"]);
    assert_eq!(listed["total"], 3, "{listed}");
    let reasons: HashMap<String, (u64, Vec<String>)> = listed["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|r| {
            (
                format!(
                    "{}: {}",
                    r["class"].as_str().unwrap(),
                    r["reason"].as_str().unwrap()
                ),
                (
                    r["count"].as_u64().unwrap(),
                    serde_json::from_value(r["ids"].clone()).unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{listed}");
    let too_large = "invalid_event: body is * bytes, over the limit of * bytes";
    let (count, letters) = &reasons[too_large];
    assert_eq!(*count, 2, "{listed}");
    let not_object =
        "invalid_event: payload (key `payload`) must be an object or null, got an array";
    assert_eq!(reasons[not_object].0, 1, "{listed}");
    let array_letter = reasons[not_object].1[0].clone();

    // show: the original body decoded, the reason and where it came from.
    let shown = dlq(&strict, &["show", &array_letter]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{}", stderr_of(&shown));
    assert!(
        text.contains("reason:   invalid_event: payload (key `payload`) must be an object or null, got an array"),
        "{text}"
    );
    assert!(
        text.contains(&format!("source:   {stream} entry {}", ids[3])),
        "{text}"
    );
    assert!(text.contains("\"aggregateId\": \"z\""), "{text}");

    // A dead letter of b recorded twice (as a crash between replay's XADD and XDEL would
    // leave it): both are replayed, and the replica takes b once.
    let raw: Vec<(String, Vec<u8>)> = {
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&dead_letter_stream)
            .arg(&letters[0])
            .arg(&letters[0])
            .query(&mut conn)
            .expect("XRANGE");
        let redis::Value::Array(entries) = reply else {
            panic!("XRANGE reply")
        };
        let redis::Value::Array(entry) = &entries[0] else {
            panic!("entry")
        };
        let redis::Value::Array(flat) = &entry[1] else {
            panic!("fields")
        };
        flat.chunks(2)
            .map(|kv| {
                (
                    redis::from_redis_value::<String>(kv[0].clone()).unwrap(),
                    redis::from_redis_value::<Vec<u8>>(kv[1].clone()).unwrap(),
                )
            })
            .collect()
    };
    assert!(
        raw.iter()
            .any(|(k, v)| k == "source_id" && v == ids[1].as_bytes()),
        "{raw:?}"
    );
    let mut copy = redis::cmd("XADD");
    copy.arg(&dead_letter_stream).arg("*");
    for (k, v) in &raw {
        copy.arg(k).arg(v.as_slice());
    }
    let _: String = copy.query(&mut conn).expect("XADD copy");

    // Dry run: names what it would replay, writes nothing.
    let stream_len = xlen(&mut conn, &stream);
    let dry = dlq_json(
        &strict,
        &["replay", "--reason", "body is * bytes*", "--dry-run"],
    );
    assert_eq!(dry["replayed"].as_array().map(Vec::len), Some(3), "{dry}");
    assert_eq!(xlen(&mut conn, &stream), stream_len);
    assert_eq!(xlen(&mut conn, &dead_letter_stream), 4);

    let fixed = pipeline_file(
        "dlq-fixed",
        &pipeline_with_body_limit(&stream, &prefix, None),
    );
    let replayed = dlq_json(&fixed, &["replay", "--reason", "body is * bytes*"]);
    assert_eq!(
        replayed["replayed"].as_array().map(Vec::len),
        Some(3),
        "{replayed}"
    );
    assert_eq!(xlen(&mut conn, &stream), stream_len + 3);
    let left = dead_letters(&mut conn, &dead_letter_stream);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["source_id"], ids[3]);

    let out = drain(&fixed);
    for (id, name) in [("b", "Bea"), ("c", "Cy")] {
        let replica = hash(&mut conn, &format!("{prefix}athlete:{id}"));
        assert_eq!(
            replica.get("display_name").map(|n| n.starts_with(name)),
            Some(true),
            "{replica:?}\n{}",
            stderr_of(&out)
        );
        assert_eq!(replica.get("_version").map(String::as_str), Some("1"));
    }
    assert_eq!(
        xlen(&mut conn, &dead_letter_stream),
        1,
        "the replayed entries were dead-lettered again"
    );
    // Nothing left to replay for that reason.
    let again = dlq_json(&fixed, &["replay", "--reason", "body is * bytes*"]);
    assert_eq!(
        again["replayed"].as_array().map(Vec::len),
        Some(0),
        "{again}"
    );

    // purge: a dry run deletes nothing, no --yes without a terminal refuses, --yes deletes.
    let dry = dlq(&fixed, &["purge", "--all", "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr_of(&dry));
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains(&format!("would delete {array_letter}")),
        "{}",
        String::from_utf8_lossy(&dry.stdout)
    );
    assert_eq!(xlen(&mut conn, &dead_letter_stream), 1);
    let refused = dlq(&fixed, &["purge", "--all"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr_of(&refused).contains("needs --yes"),
        "{}",
        stderr_of(&refused)
    );
    assert_eq!(xlen(&mut conn, &dead_letter_stream), 1);
    let purged = dlq_json(&fixed, &["purge", "--reason", "invalid_event", "--yes"]);
    assert_eq!(purged["deleted"], 1, "{purged}");
    assert_eq!(xlen(&mut conn, &dead_letter_stream), 0);
    cleanup(&mut conn, &stream);
}

#[test]
fn replay_needs_a_selector_and_skips_entries_dead_lettered_by_reference() {
    let mut conn = redis();
    let stream = unique("dlq-ref");
    let prefix = format!("{stream}:");
    let file = pipeline_file("dlq-ref", &athletes_pipeline(&stream, &prefix, ""));
    let dead_letter_stream = format!("{stream}.dlq");
    // What commit.rs writes for an entry with too many fields to copy.
    let letter: String = redis::cmd("XADD")
        .arg(&dead_letter_stream)
        .arg("*")
        .arg("fields_not_copied")
        .arg(4000)
        .arg("error")
        .arg("body is not an object")
        .arg("error_class")
        .arg("invalid_event")
        .arg("source_stream")
        .arg(&stream)
        .arg("source_id")
        .arg("1-0")
        .arg("group")
        .arg("replica")
        .arg("consumer")
        .arg("w")
        .query(&mut conn)
        .expect("XADD");

    let out = dlq(&file, &["replay"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("say which dead letters"),
        "{}",
        stderr_of(&out)
    );

    let replayed = dlq_json(&file, &["replay", "--id", &letter]);
    assert_eq!(
        replayed["replayed"].as_array().map(Vec::len),
        Some(0),
        "{replayed}"
    );
    let skipped = replayed["skipped"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(
        skipped.starts_with("dead-lettered by reference (4000 fields, not copied)"),
        "{replayed}"
    );
    assert_eq!(xlen(&mut conn, &dead_letter_stream), 1);
    cleanup(&mut conn, &stream);
}

#[test]
fn replay_of_a_partitioned_stream_goes_back_to_the_entrys_partition() {
    let mut conn = redis();
    let stream = unique("dlq-part");
    let prefix = format!("{stream}:");
    let with_partitions = |limit| {
        pipeline_with_body_limit(&stream, &prefix, limit).replace(
            "  claim_every: 200ms\n",
            "  claim_every: 200ms\n  partitions: 4\n",
        )
    };
    let strict = pipeline_file("dlq-part", &with_partitions(Some(400)));
    // The worker records the partitioning before the events go to their partitions.
    drain(&strict);
    let long = "x".repeat(500);
    let mut partitions_used = Vec::new();
    for (id, name) in [("a", "Ada".to_string()), ("b", format!("Bea {long}"))] {
        let partition = ecst_schemas::partition::partition_stream(
            &stream,
            ecst_schemas::partition::partition_of(id, 4),
            4,
        );
        publish(&mut conn, &partition, &[event(id, 1, &name)]);
        partitions_used.push(partition);
    }
    drain(&strict);
    let dead = dead_letters(&mut conn, &format!("{stream}.dlq"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["source_stream"], partitions_used[1]);
    let before = xlen(&mut conn, &partitions_used[1]);

    let fixed = pipeline_file("dlq-part-fixed", &with_partitions(None));
    let replayed = dlq_json(&fixed, &["replay", "--all"]);
    assert_eq!(
        replayed["replayed"][0]["stream"].as_str(),
        Some(partitions_used[1].as_str()),
        "{replayed}"
    );
    assert_eq!(xlen(&mut conn, &partitions_used[1]), before + 1);
    let out = drain(&fixed);
    let b = hash(&mut conn, &format!("{prefix}athlete:b"));
    assert_eq!(
        b.get("display_name").map(|n| n.starts_with("Bea")),
        Some(true),
        "{b:?}\n{}",
        stderr_of(&out)
    );
    assert!(dead_letters(&mut conn, &format!("{stream}.dlq")).is_empty());
    cleanup(&mut conn, &stream);
    let _: i64 = redis::cmd("DEL")
        .arg(ecst_schemas::partition::partitioning_key(&stream))
        .query(&mut conn)
        .expect("DEL");
}

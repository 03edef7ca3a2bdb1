//! Producers on partitioned streams: `ecst publish --partitions N` and the relay's `partitions`
//! route each event to its aggregate's partition, refuse a stream recorded with another
//! partitioning without writing anything, and agree with the Python and JavaScript references.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use ecst_schemas::partition::{fnv1a_32, partition_of, partition_stream, partitioning_key};
use rand::Rng;
use redis::Commands;
use serde_json::{Value, json};

use crate::common::*;
use crate::relay::{drop_outbox, outbox, outbox_count, relay_file, start_relay};

/// The README's test vectors: (aggregateId, FNV-1a 32, partitions, partition).
const VECTORS: [(&str, u32, u32, u32); 6] = [
    ("", 0x811c_9dc5, 8, 5),
    ("a", 0xe40c_292c, 8, 4),
    ("athlete-1", 0x0d22_bb12, 8, 2),
    ("42", 0x87e3_8583, 16, 3),
    ("ünïcode", 0x45f2_402b, 8, 3),
    ("order:2024-0001", 0xda67_41e5, 3, 0),
];

/// Writes NDJSON lines to a fresh file.
fn ndjson(label: &str, lines: &[Value]) -> std::path::PathBuf {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    pipeline_file(label, &text)
}

fn publish_cmd(stream: &str, file: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = ecst();
    cmd.args(["publish", "--stream", stream, "--file"])
        .arg(file)
        .args(extra);
    run_with_deadline(cmd, Duration::from_secs(30))
}

/// The aggregateIds on one stream key, in stream order.
fn aggregate_ids(conn: &mut redis::Connection, key: &str) -> Vec<String> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(key).expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|entry| {
            let body: Vec<u8> = entry.get("v").expect("field v");
            let value: Value = serde_json::from_slice(&body).expect("JSON body");
            value["aggregateId"]
                .as_str()
                .expect("aggregateId")
                .to_string()
        })
        .collect()
}

/// Every key under `stream` with its entry count: what "nothing was written" compares.
fn stream_keys(conn: &mut redis::Connection, stream: &str) -> BTreeMap<String, u64> {
    let keys: Vec<String> = conn
        .scan_match(format!("{stream}*"))
        .expect("SCAN")
        .collect::<Result<_, _>>()
        .expect("SCAN");
    keys.into_iter()
        .map(|k| {
            let len: u64 = conn.xlen(&k).expect("XLEN");
            (k, len)
        })
        .collect()
}

fn recorded(conn: &mut redis::Connection, stream: &str) -> BTreeMap<String, String> {
    conn.hgetall(partitioning_key(stream)).expect("HGETALL")
}

fn forget(conn: &mut redis::Connection, stream: &str) {
    cleanup(conn, stream);
    let _: () = conn.del(partitioning_key(stream)).expect("DEL");
}

/// Checks every entry of every partition key is where its aggregateId belongs; returns the
/// total count.
fn assert_routed(conn: &mut redis::Connection, stream: &str, partitions: u32) -> usize {
    let mut total = 0;
    for p in 0..partitions {
        let key = partition_stream(stream, p, partitions);
        let ids = aggregate_ids(conn, &key);
        for id in &ids {
            assert_eq!(
                partition_of(id, partitions),
                p,
                "{id} is on {key}, not its partition"
            );
        }
        total += ids.len();
    }
    let plain: bool = conn.exists(stream).expect("EXISTS");
    assert!(
        !plain,
        "nothing may go to the plain key of a partitioned stream"
    );
    total
}

#[test]
fn publish_sends_each_event_to_its_aggregates_partition() {
    let mut conn = redis();
    let stream = unique("part-publish");
    let mut lines: Vec<Value> = (0..200)
        .map(|i| event(&format!("ath-{}", i % 50), i / 50 + 1, &format!("n{i}")))
        .collect();
    lines.insert(17, json!({"aggregateVersion": 1, "payload": {}}));
    let out = publish_cmd(
        &stream,
        &ndjson("part-publish", &lines),
        &["--partitions", "4"],
    );
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "one bad line: {err}");
    assert!(err.contains(":18: missing aggregateId"), "{err}");
    assert!(
        err.contains("published 200 events") && err.contains("4 partitions"),
        "{err}"
    );
    assert_eq!(assert_routed(&mut conn, &stream, 4), 200);
    let record = recorded(&mut conn, &stream);
    assert_eq!(record["partitions"], "4");
    assert_eq!(record["hash"], "fnv1a_32");
    assert_eq!(record["key"], "aggregateId");

    // A line published as it is still needs an aggregateId to find its partition.
    let raw = ndjson(
        "part-publish-raw",
        &[
            json!({"aggregateId": "raw-1", "customer_id": "c1"}),
            json!({"customer_id": "c2"}),
        ],
    );
    let out = publish_cmd(&stream, &raw, &["--partitions", "4", "--raw"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(":2: no aggregateId") && err.contains("published 1 events"),
        "{err}"
    );
    assert_eq!(assert_routed(&mut conn, &stream, 4), 201);
    forget(&mut conn, &stream);
}

/// Issue 11: producers and a stream disagreeing on the partition count. A stream recorded as
/// 8 partitions; `ecst publish --partitions 4` and relays with `partitions: 4` refuse it, name
/// both partitionings, and write nothing to any key of the stream.
#[test]
fn producers_with_4_partitions_refuse_a_stream_recorded_as_8() {
    let mut conn = redis();
    let pg = postgres();
    let stream = unique("part-mismatch");
    let first: Vec<Value> = (0..40)
        .map(|i| event(&format!("ath-{i}"), 1, "first"))
        .collect();
    let out = publish_cmd(
        &stream,
        &ndjson("part-mismatch", &first),
        &["--partitions", "8"],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(assert_routed(&mut conn, &stream, 8), 40);
    let before = stream_keys(&mut conn, &stream);
    let record = recorded(&mut conn, &stream);
    assert_eq!(record["partitions"], "8");

    let refused = |err: &str, role: &str| {
        for expected in [
            format!("stream `{stream}` is recorded as 8 partitions by fnv1a_32(aggregateId)"),
            format!("but this {role} uses 4 partitions by fnv1a_32(aggregateId)"),
            "changing the partition count or key is a new stream version".to_string(),
            format!("`{stream}.v2`"),
            "nothing was written".to_string(),
        ] {
            assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
        }
    };

    let second: Vec<Value> = (0..10)
        .map(|i| event(&format!("ath-{i}"), 2, "second"))
        .collect();
    let out = publish_cmd(
        &stream,
        &ndjson("part-mismatch-2", &second),
        &["--partitions", "4"],
    );
    assert!(!out.status.success());
    refused(&stderr_of(&out), "producer");
    assert_eq!(stream_keys(&mut conn, &stream), before);

    // The relay finds out when a batch holds a row for the stream: it rolls back and stops.
    let table = outbox("part_mismatch");
    let rows: i64 = 10;
    pg.query(
        &format!(
            "INSERT INTO {table} (stream, aggregate_type, aggregate_id, aggregate_version, event_type, payload)
             SELECT $1, 'athlete', 'ath-' || g, 3, 'athlete.updated', '{{}}'
             FROM generate_series(1, $2::bigint) g"
        ),
        &[&stream, &rows],
    );
    let file = relay_file(&table, &database_url(), &redis_url(), "partitions: 4\n");
    let mut cmd = ecst();
    cmd.arg("relay").arg(&file);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    refused(&stderr_of(&out), "relay");
    assert_eq!(
        outbox_count(&pg, &table),
        rows,
        "the rows stay in the outbox"
    );
    assert_eq!(stream_keys(&mut conn, &stream), before);

    // Named in `streams`, the stream is checked as the relay connects.
    let file = relay_file(
        &table,
        &database_url(),
        &redis_url(),
        &format!("partitions: 8\nstreams:\n  \"{stream}\": {{ partitions: 4 }}\n"),
    );
    let mut cmd = ecst();
    cmd.arg("relay").arg(&file);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    refused(&stderr_of(&out), "relay");
    assert_eq!(outbox_count(&pg, &table), rows);
    assert_eq!(stream_keys(&mut conn, &stream), before);
    assert_eq!(
        recorded(&mut conn, &stream),
        record,
        "the record is untouched"
    );

    // A worker of 4 partitions (and one of a single key) refuses too, before creating a group.
    for (partitions, says) in [(4, "4 partitions"), (1, "1 partition by")] {
        let pipeline = pipeline_file(
            "part-mismatch-worker",
            &athletes_pipeline(&stream, "unused:", &format!("  partitions: {partitions}")),
        );
        let mut cmd = ecst();
        cmd.arg("run").arg(&pipeline);
        let out = run_with_deadline(cmd, Duration::from_secs(30));
        assert!(!out.status.success());
        let err = stderr_of(&out);
        if partitions == 4 {
            refused(&err, "worker");
        }
        assert!(err.contains(says), "{err}");
        let groups: Vec<redis::Value> = (0..8)
            .filter_map(|p| {
                redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(ecst_schemas::partition::partition_stream(&stream, p, 8))
                    .query(&mut conn)
                    .ok()
            })
            .collect();
        assert!(
            groups.iter().all(|g| *g == redis::Value::Array(vec![])),
            "a group was created: {groups:?}"
        );
        assert_eq!(stream_keys(&mut conn, &stream), before);
    }

    drop_outbox(&pg, &table);
    forget(&mut conn, &stream);
}

#[test]
fn a_single_key_stream_is_not_partitioned_in_place() {
    let mut conn = redis();
    let stream = unique("part-single");
    let lines: Vec<Value> = (0..5)
        .map(|i| event(&format!("ath-{i}"), 1, "single"))
        .collect();
    let file = ndjson("part-single", &lines);
    let out = publish_cmd(&stream, &file, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        recorded(&mut conn, &stream),
        BTreeMap::new(),
        "one partition records nothing"
    );
    let before = stream_keys(&mut conn, &stream);
    assert_eq!(before.get(&stream), Some(&5));
    let out = publish_cmd(&stream, &file, &["--partitions", "4"]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("is a single-key stream (5 entries")
            && err.contains("new stream version")
            && err.contains("nothing was written"),
        "{err}"
    );
    assert_eq!(stream_keys(&mut conn, &stream), before);
    assert_eq!(recorded(&mut conn, &stream), BTreeMap::new());
    forget(&mut conn, &stream);
}

#[test]
fn the_relay_routes_rows_by_partition_and_dead_letters_those_without_an_id() {
    let mut conn = redis();
    let pg = postgres();
    let stream = unique("part-relay");
    let table = outbox("part_relay");
    let rows: i64 = 300;
    pg.query(
        &format!(
            "INSERT INTO {table} (stream, aggregate_type, aggregate_id, aggregate_version, event_type, payload)
             SELECT $1, 'athlete', CASE WHEN g = 150 THEN '' ELSE 'a' || (g % 97) END, g,
                    'athlete.updated', '{{}}'
             FROM generate_series(1, $2::bigint) g"
        ),
        &[&stream, &rows],
    );
    let file = relay_file(&table, &database_url(), &redis_url(), "partitions: 8\n");
    let relay = start_relay(&file);
    wait_for_worker(
        &relay,
        Duration::from_secs(30),
        "the outbox to empty",
        || outbox_count(&pg, &table) == 0,
    );
    assert_eq!(assert_routed(&mut conn, &stream, 8), 299);
    assert_eq!(recorded(&mut conn, &stream)["partitions"], "8");
    let dead: Vec<String> = pg
        .query(&format!("SELECT error FROM {table}_dead_letters"), &[])
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(dead, ["aggregate_id is empty: the row has no partition"]);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    drop_outbox(&pg, &table);
    forget(&mut conn, &stream);
}

/// Runs a reference implementation on `input` (`ID<TAB>N` lines, or pairs as arguments) and
/// returns its lines.
fn reference(program: &str, script: &str, args: &[String], input: &str) -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(script);
    let mut child = Command::new(program)
        .arg(&path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} {}: {e}", path.display()));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_string();
    // Written from a thread so that a large input cannot deadlock against the output pipe.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "{program} {script} did not finish within 30s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    writer.join().expect("writer").expect("write stdin");
    let out = child.wait_with_output().expect("output");
    assert!(
        out.status.success(),
        "{program} {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8 output")
        .lines()
        .map(str::to_string)
        .collect()
}

fn expected_line(id: &str, partitions: u32) -> String {
    format!(
        "{id}\t{:08x}\t{partitions}\t{}",
        fnv1a_32(id.as_bytes()),
        partition_of(id, partitions)
    )
}

/// A random id: ASCII, accented Latin, CJK, emoji and other scripts, no tab or line break.
fn random_id(rng: &mut impl Rng) -> String {
    const RANGES: [(u32, u32); 6] = [
        (0x20, 0x7e),
        (0xa0, 0x24f),
        (0x370, 0x52f),
        (0x4e00, 0x9fff),
        (0xac00, 0xd7a3),
        (0x1f300, 0x1faff),
    ];
    let len = rng.random_range(0..24);
    (0..len)
        .map(|_| {
            let (low, high) = RANGES[rng.random_range(0..RANGES.len())];
            char::from_u32(rng.random_range(low..=high)).unwrap_or('x')
        })
        .collect()
}

/// The README's Python and JavaScript references route exactly as ecst does.
#[test]
fn the_python_and_node_references_agree_with_ecst() {
    let mut args = Vec::new();
    for (id, hash, partitions, partition) in VECTORS {
        assert_eq!(fnv1a_32(id.as_bytes()), hash);
        assert_eq!(partition_of(id, partitions), partition);
        args.extend([id.to_string(), partitions.to_string()]);
    }
    let vectors: Vec<String> = VECTORS
        .iter()
        .map(|(id, _, n, _)| expected_line(id, *n))
        .collect();
    let mut rng = rand::rng();
    let random: Vec<(String, u32)> = (0..1000)
        .map(|_| (random_id(&mut rng), rng.random_range(1..=64)))
        .collect();
    assert!(random.iter().any(|(id, _)| !id.is_ascii()));
    let input: String = random
        .iter()
        .map(|(id, n)| format!("{id}\t{n}\n"))
        .collect();
    let expected: Vec<String> = random.iter().map(|(id, n)| expected_line(id, *n)).collect();
    for (program, script) in [("python3", "partition.py"), ("node", "partition.js")] {
        assert_eq!(
            reference(program, script, &args, ""),
            vectors,
            "{script} on the test vectors"
        );
        let got = reference(program, script, &[], &input);
        assert_eq!(got.len(), expected.len(), "{script}");
        for (got, want) in got.iter().zip(&expected) {
            assert_eq!(got, want, "{script} disagrees with ecst");
        }
    }
}

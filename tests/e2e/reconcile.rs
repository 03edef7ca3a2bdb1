//! `ecst reconcile`: drift planted by hand in a Redis and a Postgres replica is found, counted
//! and repaired.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// The key of a table's advisory lock, as the `postgres` sink computes it (FNV-1a of
/// `schema.table`), so that the test can hold it as a live worker's batch does.
fn sink_lock_key(schema: &str, table: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in schema.bytes().chain([b'.']).chain(table.bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// A live worker writes a newer version of a corrupted row after reconcile compared it and
/// before its repair removes it: the newer version must survive the repair.
#[test]
fn repair_never_overwrites_a_version_written_after_the_compare() {
    let mut conn = redis();
    let pg = postgres();
    let source = Source::create("recrace", 20);
    let stream = unique("reconcile-race");
    let replica = format!("{}_replica", source.table);
    let query = format!(
        "SELECT id, version, jsonb_build_object('displayName', display_name, 'status', status) FROM {} WHERE ($1::text IS NULL OR id > $1) ORDER BY id LIMIT $2",
        source.table
    );
    let yaml = format!(
        r#"name: reconcile-race
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
"#,
        db = database_url()
    );
    let pipeline = pipeline_file("reconcile-race", &yaml);
    drain(&pipeline);
    // Corrupted at the source's version (3).
    pg.execute(&format!(
        "UPDATE {replica} SET status = 'retired' WHERE athlete_id = 'a000005'"
    ));

    // The live worker's batch: the sink's table lock, then version 4, not yet committed.
    let worker = postgres();
    let worker_pid: i32 = worker.query("SELECT pg_backend_pid()", &[])[0].get(0);
    worker.execute(&format!(
        "BEGIN;
         SELECT pg_advisory_xact_lock(1701016436, {lock});
         UPDATE {replica} SET source_version = 4, display_name = 'live v4', status = 'active'
           WHERE athlete_id = 'a000005';",
        lock = sink_lock_key("public", &replica)
    ));
    let repair = {
        let pipeline = pipeline.clone();
        std::thread::spawn(move || reconcile(&pipeline, &["--repair"]))
    };
    // Reconcile has compared (it saw version 3, the worker's write being uncommitted) and
    // waits on the worker to remove the row.
    wait_until(
        Duration::from_secs(60),
        "the repair to wait on the live worker's transaction",
        || {
            let rows = pg.query(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE $1 = ANY(pg_blocking_pids(pid))
                   AND (query ILIKE '%DELETE%' OR query ILIKE '%pg_advisory_xact_lock%')",
                &[&worker_pid],
            );
            rows[0].get::<_, i64>(0) > 0
        },
    );
    worker.execute("COMMIT");
    let (code, report) = repair.join().expect("reconcile thread");
    assert_eq!(code, 1, "{report}");
    assert_eq!(
        counts(&report, "table")[2],
        1,
        "the corrupted row was compared before the worker committed: {report}"
    );
    let rows = pg.query(
        &format!(
            "SELECT source_version, display_name, status FROM {replica} WHERE athlete_id = 'a000005'"
        ),
        &[],
    );
    assert_eq!(rows.len(), 1, "the row is gone");
    let row: (i64, String, String) = (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!(
        row,
        (4, "live v4".to_string(), "active".to_string()),
        "the live worker's newer version must survive the repair"
    );

    pg.execute(&format!("DROP TABLE {replica}, {replica}_tombstones"));
    source.drop();
    cleanup(&mut conn, &stream);
}

/// The Redis replica's eviction removes a hash only while it is still at the version
/// compared: a newer write made in between stays.
#[test]
fn redis_eviction_spares_a_hash_written_since_the_compare() {
    use ecst_operators::replica::Eviction;
    use ecst_operators::sinks::redis_hash::RedisHashConfig;
    use ecst_operators::stage::BuildContext;

    let mut conn = redis();
    let prefix = format!("{}:", unique("evict"));
    let config: RedisHashConfig = serde_json::from_value(serde_json::json!({
        "key": format!("{prefix}athlete:{{aggregateId}}"),
        "tombstone_prefix": format!("{prefix}tombstone:"),
    }))
    .expect("config");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The pool's reaper needs the runtime.
    let sink = runtime
        .block_on(async {
            config.build(&BuildContext {
                pipeline: "evict".into(),
                stage: "cache".into(),
                source_redis: ecst_operators::SecretUrl::new(redis_url()),
                payload_reads: Default::default(),
                schemas: None,
            })
        })
        .expect("sink");
    let replica = ecst_operators::Sink::replica(&sink).expect("a replica");
    let key = format!("{prefix}athlete:a1");
    let tombstone = format!("{prefix}tombstone:{key}");

    // Compared at version 1 (corrupted); a live worker then wrote version 2.
    let _: () = conn
        .hset_multiple(&key, &[("_version", "2"), ("display_name", "live v2")])
        .expect("HSET");
    for why in [Eviction::Rewrite, Eviction::Orphan] {
        let removed = runtime
            .block_on(replica.evict(&[(key.clone(), 1)], why))
            .expect("evict");
        assert_eq!(removed, 0, "{why:?}");
        assert_eq!(hash(&mut conn, &key)["display_name"], "live v2", "{why:?}");
    }
    let buried: Option<String> = conn.get(&tombstone).expect("GET");
    assert_eq!(buried, None, "nothing evicted, nothing buried");

    // Still at the version compared: removed; a rewrite leaves no tombstone (it would refuse
    // the rewrite), an orphan does.
    let removed = runtime
        .block_on(replica.evict(&[(key.clone(), 2)], Eviction::Rewrite))
        .expect("evict");
    assert_eq!(removed, 1);
    assert!(hash(&mut conn, &key).is_empty());
    let buried: Option<String> = conn.get(&tombstone).expect("GET");
    assert_eq!(buried, None);
    let _: () = conn.hset(&key, "_version", "5").expect("HSET");
    let removed = runtime
        .block_on(replica.evict(&[(key.clone(), 5)], Eviction::Orphan))
        .expect("evict");
    assert_eq!(removed, 1);
    let buried: Option<String> = conn.get(&tombstone).expect("GET");
    assert_eq!(buried.as_deref(), Some("5"));
    cleanup(&mut conn, &prefix);
}

/// A TCP proxy to Redis that, once armed, holds back the first command that removes a key
/// (`EVAL` or `DEL`, as a RESP bulk string) until released: the moment between a
/// reconcile's compare and its repair, made to last.
struct EvictHold {
    port: u16,
    armed: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    release: std::sync::mpsc::Sender<()>,
}

impl EvictHold {
    fn start(upstream: String) -> EvictHold {
        // Bound once and kept: the port is never released and reused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (armed, held) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Arc::new(Mutex::new(Some(released)));
        let (armed2, held2) = (armed.clone(), held.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let Ok(mut server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let (Ok(mut client_out), Ok(mut server_in)) =
                    (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut server_in, &mut client_out);
                });
                let (armed, held, released) = (armed2.clone(), held2.clone(), released.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = client.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let chunk = &buf[..n];
                        let removes = [&b"\r\nEVAL\r\n"[..], &b"\r\nDEL\r\n"[..]]
                            .iter()
                            .any(|cmd| chunk.windows(cmd.len()).any(|w| w == *cmd));
                        if removes && armed.swap(false, Ordering::SeqCst) {
                            let wait = released.lock().expect("lock").take();
                            held.store(true, Ordering::SeqCst);
                            if let Some(wait) = wait {
                                let _ = wait.recv();
                            }
                        }
                        if server.write_all(chunk).is_err() {
                            break;
                        }
                    }
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        EvictHold {
            port,
            armed,
            held,
            release,
        }
    }
}

/// The Redis side of the race: a live worker's newer version lands between the compare and
/// the repair's eviction, and must survive the repair.
#[test]
fn repair_never_overwrites_a_redis_hash_written_after_the_compare() {
    let mut conn = redis();
    let source = Source::create("recraceredis", 20);
    let stream = unique("reconcile-race-redis");
    let prefix = format!("{stream}:");
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let hold = EvictHold::start(upstream);
    let query = format!(
        "SELECT id, version, jsonb_build_object('displayName', display_name, 'status', status) FROM {} WHERE ($1::text IS NULL OR id > $1) ORDER BY id LIMIT $2",
        source.table
    );
    let yaml = format!(
        r#"name: reconcile-race-redis
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
    redis: "redis://127.0.0.1:{port}"
    key: "{prefix}athlete:{{aggregateId}}"
    tombstone_prefix: "{prefix}tombstone:"
bootstrap:
  postgres: "{db}"
  query: "{query}"
"#,
        port = hold.port,
        db = database_url()
    );
    let pipeline = pipeline_file("reconcile-race-redis", &yaml);
    drain(&pipeline);
    let key = format!("{prefix}athlete:a000005");
    // Corrupted at the source's version (3).
    let _: () = conn.hset(&key, "status", "retired").expect("HSET");

    hold.armed.store(true, Ordering::SeqCst);
    let repair = {
        let pipeline = pipeline.clone();
        std::thread::spawn(move || reconcile(&pipeline, &["--repair"]))
    };
    wait_until(
        Duration::from_secs(60),
        "the repair's eviction to be held",
        || hold.held.load(Ordering::SeqCst),
    );
    // The live worker's newer version, written after the compare.
    let _: () = conn
        .hset_multiple(
            &key,
            &[
                ("_version", "4"),
                ("display_name", "live v4"),
                ("status", "active"),
            ],
        )
        .expect("HSET");
    hold.release.send(()).expect("release");
    let (code, report) = repair.join().expect("reconcile thread");
    assert_eq!(code, 1, "{report}");
    assert_eq!(counts(&report, "cache")[2], 1, "{report}");
    let stored = hash(&mut conn, &key);
    assert_eq!(
        (
            stored.get("_version").map(String::as_str),
            stored.get("display_name").map(String::as_str),
            stored.get("status").map(String::as_str),
        ),
        (Some("4"), Some("live v4"), Some("active")),
        "the live worker's newer version must survive the repair: {stored:?}"
    );

    source.drop();
    cleanup(&mut conn, &prefix);
    cleanup(&mut conn, &stream);
}

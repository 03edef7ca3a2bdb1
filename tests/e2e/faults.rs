//! Faults: processes killed, signals, dead consumers, trimmed entries, vanished groups, a
//! Redis that goes away.

use std::collections::HashSet;
use std::time::Duration;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use redis::Commands;
use serde_json::Value;

use crate::common::*;
use crate::servers::{PrivateRedis, signal};

#[test]
fn kill_9_mid_stream_then_restart_converges_with_nothing_pending() {
    let mut conn = redis();
    let stream = unique("kill9");
    let prefix = format!("{stream}:");
    let (aggregates, versions) = (2_000u64, 50u64);
    let mut events: Vec<Value> = Vec::with_capacity((aggregates * versions) as usize);
    for v in 1..=versions {
        for a in 0..aggregates {
            if a % 10 == 0 && v == versions {
                events.push(delete(&format!("k{a}"), v));
            } else {
                events.push(event(&format!("k{a}"), v, &format!("k{a} v{v}")));
            }
        }
    }
    // Shuffle inside windows of 2000 so versions of an aggregate arrive out of order.
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for chunk in events.chunks_mut(2000) {
        chunk.shuffle(&mut rng);
    }
    publish(&mut conn, &stream, &events);
    let file = pipeline_file(
        "kill9",
        &athletes_pipeline(&stream, &prefix, "  batch_size: 500\n  consumer: crashy"),
    );

    let mut worker = Worker::start(&file, &[]);
    wait_until(
        Duration::from_secs(120),
        "the worker to get a fifth of the way",
        || entries_read(&mut conn, &stream, "replica") >= 20_000,
    );
    worker.kill_9();
    let read_at_kill = entries_read(&mut conn, &stream, "replica");
    assert!(
        read_at_kill < 100_000,
        "the kill landed after the end; nothing was tested"
    );

    drain(&file);
    let mut wrong = Vec::new();
    for a in 0..aggregates {
        let h = hash(&mut conn, &format!("{prefix}athlete:k{a}"));
        let ok = if a % 10 == 0 {
            h.is_empty()
        } else {
            h.get("_version").map(String::as_str) == Some("50")
                && h.get("display_name") == Some(&format!("k{a} v50"))
        };
        if !ok {
            wrong.push(a);
        }
    }
    assert!(
        wrong.is_empty(),
        "{} aggregates wrong after the crash, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0);
    cleanup(&mut conn, &stream);
}

#[test]
fn sigterm_finishes_in_flight_work_acks_it_and_exits_zero() {
    let mut conn = redis();
    let stream = unique("sigterm");
    let prefix = format!("{stream}:");
    let file = pipeline_file("sigterm", &athletes_pipeline(&stream, &prefix, ""));
    let worker = Worker::start(&file, &[]);
    let events: Vec<Value> = (0..2000).map(|i| event(&format!("t{i}"), 1, "x")).collect();
    publish(&mut conn, &stream, &events);
    wait_until(
        Duration::from_secs(60),
        "the first entries to be read",
        || entries_read(&mut conn, &stream, "replica") > 0,
    );
    let (status, log) = worker.terminate();
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    // Whatever was read was committed and acked: nothing is left pending.
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0, "{log}");
    let read = entries_read(&mut conn, &stream, "replica");
    let applied = (0..2000)
        .filter(|i| !hash(&mut conn, &format!("{prefix}athlete:t{i}")).is_empty())
        .count() as u64;
    assert_eq!(applied, read, "every read entry was applied before exit");
    cleanup(&mut conn, &stream);
}

#[test]
fn entries_of_a_dead_consumer_are_claimed_and_trimmed_ones_dead_lettered() {
    let mut conn = redis();
    let stream = unique("claim");
    let prefix = format!("{stream}:");
    let ids = publish(
        &mut conn,
        &stream,
        &(0..30)
            .map(|i| event(&format!("c{i}"), 1, "claimed"))
            .collect::<Vec<_>>(),
    );
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("replica")
        .arg("0")
        .query(&mut conn)
        .expect("group");
    // A consumer reads everything and dies without acking.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("replica")
        .arg("dead-consumer")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query(&mut conn)
        .expect("read");
    // Two of its entries are trimmed away while pending.
    let _: i64 = conn.xdel(&stream, &[&ids[3], &ids[17]]).expect("XDEL");
    let file = pipeline_file(
        "claim",
        &athletes_pipeline(&stream, &prefix, "  claim_idle: 50ms"),
    );
    let out = drain(&file);
    let applied: HashSet<usize> = (0..30)
        .filter(|i| !hash(&mut conn, &format!("{prefix}athlete:c{i}")).is_empty())
        .collect();
    assert_eq!(applied.len(), 28, "{}", stderr_of(&out));
    assert!(!applied.contains(&3) && !applied.contains(&17));
    let dead = dead_letters(&mut conn, &format!("{stream}.dlq"));
    let trimmed: HashSet<&str> = dead
        .iter()
        .filter(|d| d["error"] == "trimmed before applied")
        .map(|d| d["source_id"].as_str())
        .collect();
    assert_eq!(
        trimmed,
        HashSet::from([ids[3].as_str(), ids[17].as_str()]),
        "{dead:?}"
    );
    assert!(stderr_of(&out).contains("trimmed from the stream before they were applied"));
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0);
    cleanup(&mut conn, &stream);
}

#[test]
fn an_entry_delivered_too_often_is_dead_lettered() {
    let mut conn = redis();
    let stream = unique("maxdeliver");
    let prefix = format!("{stream}:");
    let ids = publish(
        &mut conn,
        &stream,
        &[event("d1", 1, "poison?"), event("d2", 1, "fine")],
    );
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("replica")
        .arg("0")
        .query(&mut conn)
        .expect("group");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("replica")
        .arg("crashy")
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query(&mut conn)
        .expect("read");
    // As if the worker had crashed on it nine times.
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&stream)
        .arg("replica")
        .arg("crashy")
        .arg(0)
        .arg(&ids[0])
        .arg("RETRYCOUNT")
        .arg(9)
        .query(&mut conn)
        .expect("XCLAIM");
    let file = pipeline_file(
        "maxdeliver",
        &athletes_pipeline(&stream, &prefix, "  consumer: crashy\n  max_deliveries: 5"),
    );
    drain(&file);
    assert!(hash(&mut conn, &format!("{prefix}athlete:d1")).is_empty());
    assert_eq!(
        hash(&mut conn, &format!("{prefix}athlete:d2"))
            .get("display_name")
            .map(String::as_str),
        Some("fine")
    );
    let dead = dead_letters(&mut conn, &format!("{stream}.dlq"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["source_id"], ids[0]);
    assert!(
        dead[0]["error"].starts_with("delivered 10 times, over max_deliveries 5"),
        "{}",
        dead[0]["error"]
    );
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0);
    cleanup(&mut conn, &stream);
}

#[test]
fn a_vanished_group_is_recreated_at_the_configured_start_and_said_loudly() {
    let mut conn = redis();
    let stream = unique("nogroup");
    let prefix = format!("{stream}:");
    let file = pipeline_file("nogroup", &athletes_pipeline(&stream, &prefix, ""));
    let worker = Worker::start(&file, &[]);
    publish(&mut conn, &stream, &[event("g1", 1, "before")]);
    wait_until(Duration::from_secs(30), "the first event", || {
        !hash(&mut conn, &format!("{prefix}athlete:g1")).is_empty()
    });
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg("replica")
        .query(&mut conn)
        .expect("destroy");
    publish(&mut conn, &stream, &[event("g2", 1, "after")]);
    wait_until(
        Duration::from_secs(30),
        "the event after the group vanished",
        || !hash(&mut conn, &format!("{prefix}athlete:g2")).is_empty(),
    );
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("vanished (NOGROUP)"), "{log}");
    cleanup(&mut conn, &stream);
}

#[test]
fn a_redis_outage_acks_nothing_and_the_worker_resumes_when_redis_returns() {
    let mut server = PrivateRedis::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let stream = "athletes";
    let prefix = "replica:";
    let yaml = athletes_pipeline(
        stream,
        prefix,
        &format!("  redis: {}\n  timeout: 500ms", server.url()),
    );
    let file = pipeline_file("outage", &yaml);
    let mut conn = server.conn();
    publish(
        &mut conn,
        stream,
        &(0..100)
            .map(|i| event(&format!("o{i}"), 1, "before"))
            .collect::<Vec<_>>(),
    );
    let mut worker = Worker::start(&file, &[]);
    wait_until(Duration::from_secs(30), "the first batch", || {
        !hash(&mut conn, &format!("{prefix}athlete:o99")).is_empty()
    });
    server.kill_9();
    wait_until(
        Duration::from_secs(30),
        "the worker to notice the outage",
        || {
            worker
                .log()
                .contains("Reading the stream failed; retrying.")
        },
    );
    assert!(
        worker.is_running(),
        "the worker must survive a Redis outage:\n{}",
        worker.log()
    );
    server.restart();
    let mut conn = server.conn();
    publish(
        &mut conn,
        stream,
        &(0..100)
            .map(|i| event(&format!("o{i}"), 2, "after"))
            .collect::<Vec<_>>(),
    );
    wait_until(Duration::from_secs(60), "events after the outage", || {
        hash(&mut conn, &format!("{prefix}athlete:o99"))
            .get("display_name")
            .map(String::as_str)
            == Some("after")
    });
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    for i in 0..100 {
        assert_eq!(
            hash(&mut conn, &format!("{prefix}athlete:o{i}"))
                .get("_version")
                .map(String::as_str),
            Some("2")
        );
    }
    assert_eq!(group_pending(&mut conn, stream, "replica"), 0);
}

#[test]
fn a_script_flush_is_recovered_from() {
    // SCRIPT FLUSH empties the script cache of the whole server: a private one.
    let server = PrivateRedis::start(&[]);
    let stream = "athletes";
    let prefix = "replica:";
    let yaml = athletes_pipeline(stream, prefix, &format!("  redis: {}", server.url()));
    let worker = Worker::start(&pipeline_file("scriptflush", &yaml), &[]);
    let mut conn = server.conn();
    let version = |conn: &mut redis::Connection| {
        hash(conn, &format!("{prefix}athlete:f1"))
            .get("_version")
            .cloned()
    };
    publish(&mut conn, stream, &[event("f1", 1, "before")]);
    wait_for_worker(&worker, Duration::from_secs(30), "the first write", || {
        version(&mut conn).as_deref() == Some("1")
    });
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut conn)
        .expect("SCRIPT FLUSH");
    publish(&mut conn, stream, &[event("f1", 2, "after")]);
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the write after the flush",
        || version(&mut conn).as_deref() == Some("2"),
    );
    // The ack follows the write.
    wait_for_worker(&worker, Duration::from_secs(30), "the ack", || {
        group_pending(&mut conn, stream, "replica") == 0
    });
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn a_poison_entry_claimed_from_a_stalled_worker_is_dead_lettered_once() {
    let mut conn = redis();
    let pg = postgres();
    let stream = unique("dlqonce");
    let table = format!("e2e_dlqonce_{}", std::process::id());
    let proxy = Proxy::start("127.0.0.1:5432");
    let stalled_url =
        database_url().replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port), 1);
    assert_ne!(
        stalled_url,
        database_url(),
        "DATABASE_URL must point at 127.0.0.1:5432"
    );
    let yaml = |url: &str, consumer: &str| {
        format!(
            r#"name: dlqonce
source:
  stream: "{stream}"
  group: replica
  consumer: {consumer}
  block: 100ms
  claim_idle: 300ms
  claim_every: 100ms
stages:
  decode: {{ type: decode }}
  table: {{ type: postgres, input: decode, url: "{url}", table: {table}, key: athlete_id, create: true, timeout: 1s, columns: {{ displayName: text }} }}
"#
        )
    };
    proxy.cut();
    let ids = publish(
        &mut conn,
        &stream,
        &[event("q1", 1, "good"), serde_json::json!("not an envelope")],
    );
    // The first worker reads both entries and stalls on its Postgres; nothing is acked.
    let stalled = Worker::start(
        &pipeline_file("dlqonce", &yaml(&stalled_url, "stalled")),
        &[],
    );
    wait_for_worker(&stalled, Duration::from_secs(30), "the stall", || {
        stalled.log().contains("Sink failed to apply a batch")
    });
    // A live worker keeps its in-flight entries claimed; a frozen one (a long GC pause, a
    // stopped VM) cannot, and then they are claimed by another.
    signal(stalled.child.id(), "STOP");
    // A second one claims them once idle, applies, dead-letters the poison and acks.
    let rescuer = Worker::start(
        &pipeline_file("dlqonce", &yaml(&database_url(), "rescuer")),
        &[],
    );
    wait_for_worker(&rescuer, Duration::from_secs(30), "the claim", || {
        group_pending(&mut conn, &stream, "replica") == 0
    });
    let (status, rescuer_log) = rescuer.terminate();
    assert!(status.success(), "{rescuer_log}");
    // The stalled worker finishes the same batch late: its dead letter must not repeat.
    proxy.restore();
    signal(stalled.child.id(), "CONT");
    wait_for_worker(&stalled, Duration::from_secs(30), "the late commit", || {
        stalled.log().contains("Sink recovered; batch committed.")
    });
    let (status, log) = stalled.terminate();
    assert!(status.success(), "{log}");
    let dead: Vec<String> = dead_letters(&mut conn, &format!("{stream}.dlq"))
        .into_iter()
        .map(|d| d["source_id"].clone())
        .collect();
    assert_eq!(
        dead,
        vec![ids[1].clone()],
        "stalled:\n{log}\nrescuer:\n{rescuer_log}"
    );
    pg.execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_tombstones"
    ));
    cleanup(&mut conn, &stream);
}

#[test]
fn status_counts_the_lag_redis_forgot_when_it_reloaded_the_stream() {
    let mut server = PrivateRedis::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut conn = server.conn();
    let stream = unique("aof-lag");
    publish(
        &mut conn,
        &stream,
        &(1..=10).map(|v| event("a", v, "Ada")).collect::<Vec<_>>(),
    );
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("replica")
        .arg("0")
        .query(&mut conn)
        .expect("XGROUP CREATE");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("replica")
        .arg("w")
        .arg("COUNT")
        .arg(4)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query(&mut conn)
        .expect("XREADGROUP");
    let pipeline = pipeline_file(
        "aof-lag",
        &athletes_pipeline(&stream, "aof:", &format!("  redis: \"{}\"", server.url())),
    );
    let status = |args: &[&str]| {
        let mut cmd = ecst();
        cmd.arg("status").arg(&pipeline).args(args);
        let out = run_with_deadline(cmd, Duration::from_secs(30));
        assert!(out.status.success(), "{}", stderr_of(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before: serde_json::Value = serde_json::from_str(&status(&["--json"])).expect("JSON");
    assert_eq!(before["groups"][0]["lag"], 6);
    assert_eq!(before["groups"][0]["lag_counted"], false);

    // Reloaded from its AOF, Redis no longer knows how far the group read.
    server.restart();
    let after: serde_json::Value = serde_json::from_str(&status(&["--json"])).expect("JSON");
    assert_eq!(after["groups"][0]["entries_read"], serde_json::Value::Null);
    assert_eq!(after["groups"][0]["lag"], 6, "{after}");
    assert_eq!(after["groups"][0]["lag_counted"], true);
    let text = status(&[]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("replica") && l.split_whitespace().nth(1) == Some("6*")),
        "{text}"
    );
}

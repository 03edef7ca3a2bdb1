//! `ecst relay` against the real Postgres and Redis: outbox rows to stream entries, crashes,
//! late commits, concurrent relays, outages and poisoned rows.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use redis::Commands;
use serde_json::{Value, json};

use crate::common::*;

/// A fresh outbox table (installed by `ecst outbox install`) and its name.
pub fn outbox(label: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let table = format!(
        "e2e_outbox_{label}_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut cmd = ecst();
    cmd.args(["outbox", "install", "--table", &table])
        .env("DATABASE_URL", database_url());
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "outbox install: {}", stderr_of(&out));
    table
}

pub fn relay_file(table: &str, postgres: &str, redis: &str, extra: &str) -> PathBuf {
    pipeline_file(
        "relay",
        &format!(
            "name: test-relay\npostgres: \"{postgres}\"\nredis: \"{redis}\"\noutbox: {{ table: {table} }}\npoll_interval: 200ms\ntimeout: 2s\n{extra}"
        ),
    )
}

pub fn start_relay(file: &PathBuf) -> Worker {
    let mut cmd = ecst();
    cmd.arg("relay").arg(file);
    Worker::spawn(cmd)
}

/// Inserts `n` rows for `stream`; returns their event ids in id order.
fn insert_rows(pg: &postgres_client::Client, table: &str, stream: &str, n: i64) -> Vec<String> {
    pg.query(
        &format!(
            "INSERT INTO {table} (stream, aggregate_type, aggregate_id, aggregate_version, event_type, payload)
             SELECT $1, 'athlete', 'a' || (g % 97), g, 'athlete.updated',
                    jsonb_build_object('athleteId', 'a' || (g % 97), 'n', g)
             FROM generate_series(1, $2::bigint) g
             RETURNING event_id::text"
        ),
        &[&stream, &n],
    )
    .iter()
    .map(|r| r.get(0))
    .collect()
}

pub fn outbox_count(pg: &postgres_client::Client, table: &str) -> i64 {
    pg.query(&format!("SELECT count(*) FROM {table}"), &[])[0].get(0)
}

/// Every entry of a stream as (fields, decoded JSON body).
fn entries(conn: &mut redis::Connection, stream: &str) -> Vec<(HashMap<String, Vec<u8>>, Value)> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(stream).expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|entry| {
            let fields: HashMap<String, Vec<u8>> = entry
                .map
                .into_iter()
                .map(|(k, v)| (k, redis::from_redis_value(v).expect("bytes")))
                .collect();
            let body = &fields["v"];
            let value = match fields.get("ct").map(|c| c.as_slice()) {
                Some(b"application/msgpack") => rmp_serde::from_slice(body).expect("msgpack body"),
                _ => serde_json::from_slice(body).expect("JSON body"),
            };
            (fields, value)
        })
        .collect()
}

fn event_ids(conn: &mut redis::Connection, stream: &str) -> Vec<String> {
    entries(conn, stream)
        .into_iter()
        .map(|(_, v)| v["eventId"].as_str().expect("eventId").to_string())
        .collect()
}

pub fn drop_outbox(pg: &postgres_client::Client, table: &str) {
    pg.execute(&format!(
        "DROP TABLE IF EXISTS {table}, {table}_dead_letters; DROP FUNCTION IF EXISTS {table}_notify()"
    ));
}

#[test]
fn outbox_rows_reach_the_stream_with_every_field() {
    let pg = postgres();
    let mut conn = redis();
    let table = outbox("fields");
    let stream = unique("relay-fields");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    pg.query(
        &format!(
            "INSERT INTO {table} (stream, aggregate_type, aggregate_id, aggregate_version, event_type,
                                  event_id, schema_version, occurred_at, payload, headers)
             VALUES ($1, 'athlete', 'ath-1', 7, 'athlete.updated', 'a81bc81b-dead-4e5d-abff-90865d1e13b1', 2,
                     '2026-11-24T10:00:00.5Z', '{{\"displayName\": \"Ana\", \"status\": \"active\"}}',
                     jsonb_build_object('traceparent', $2::text)),
                    ($1, 'athlete', 'ath-2', 3, 'athlete.deleted', 'b81bc81b-dead-4e5d-abff-90865d1e13b2', 2,
                     '2026-11-24T10:00:01Z', NULL, '{{\"traceparent\": \"garbage\"}}')"
        ),
        &[&stream, &traceparent],
    );
    let file = relay_file(&table, &database_url(), &redis_url(), "");
    let relay = start_relay(&file);
    wait_until(Duration::from_secs(20), "both rows on the stream", || {
        conn.xlen::<_, usize>(&stream).unwrap_or(0) == 2
    });
    let got = entries(&mut conn, &stream);
    assert_eq!(
        got[0].1,
        json!({"schemaVersion": 2, "eventId": "a81bc81b-dead-4e5d-abff-90865d1e13b1",
               "eventType": "athlete.updated", "occurredAt": "2026-11-24T10:00:00.5Z",
               "aggregateType": "athlete", "aggregateId": "ath-1", "aggregateVersion": 7,
               "payload": {"displayName": "Ana", "status": "active"}})
    );
    assert_eq!(got[0].0["traceparent"], traceparent.as_bytes());
    assert!(!got[0].0.contains_key("ct"), "JSON bodies carry no ct");
    assert_eq!(got[1].1["deleted"], json!(true));
    assert_eq!(got[1].1["payload"], Value::Null);
    assert!(
        !got[1].0.contains_key("traceparent"),
        "a malformed traceparent must not be passed on"
    );
    wait_until(Duration::from_secs(10), "the outbox to empty", || {
        outbox_count(&pg, &table) == 0
    });
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    drop_outbox(&pg, &table);
    cleanup(&mut conn, &stream);
}

#[test]
fn mark_mode_keeps_rows_and_msgpack_sets_ct() {
    let pg = postgres();
    let mut conn = redis();
    let table = outbox("mark");
    let stream = unique("relay-mark");
    insert_rows(&pg, &table, &stream, 50);
    let file = relay_file(
        &table,
        &database_url(),
        &redis_url(),
        "on_publish: mark\ncontent_type: msgpack\nretention: { maxlen: 20 }\n",
    );
    let relay = start_relay(&file);
    wait_until(
        Duration::from_secs(20),
        "every row marked published",
        || {
            pg.query(
                &format!("SELECT count(*) FROM {table} WHERE published_at IS NULL"),
                &[],
            )[0]
            .get::<_, i64>(0)
                == 0
        },
    );
    assert_eq!(outbox_count(&pg, &table), 50, "mark keeps the rows");
    let got = entries(&mut conn, &stream);
    assert!(
        got.iter()
            .all(|(fields, _)| fields["ct"] == b"application/msgpack"),
        "msgpack entries must say so in ct"
    );
    assert_eq!(
        got.last().expect("entries").1["aggregateVersion"],
        json!(50)
    );
    // MAXLEN ~ trims in whole radix-tree nodes, so "about 20" keeps fewer than all 50.
    assert!(
        got.len() < 50,
        "retention did not trim: {} entries",
        got.len()
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    drop_outbox(&pg, &table);
    cleanup(&mut conn, &stream);
}

#[test]
fn a_relay_killed_at_random_points_never_loses_a_row() {
    let pg = postgres();
    let mut conn = redis();
    let table = outbox("crash");
    let stream = unique("relay-crash");
    let inserted: HashSet<String> = insert_rows(&pg, &table, &stream, 3000)
        .into_iter()
        .collect();
    let file = relay_file(&table, &database_url(), &redis_url(), "batch_size: 10\n");
    let mut kills = 0;
    while outbox_count(&pg, &table) > 0 && kills < 100 {
        let mut relay = start_relay(&file);
        // Fault injection, not synchronisation: the kill lands wherever the relay is.
        std::thread::sleep(Duration::from_millis(rand_between(20, 150)));
        relay.kill_9();
        kills += 1;
    }
    // Whatever is left, a last relay drains.
    let relay = start_relay(&file);
    wait_until(Duration::from_secs(60), "the outbox to drain", || {
        outbox_count(&pg, &table) == 0
    });
    // The outbox may have drained before this relay started; SIGTERM before its handler is
    // installed would end it by the signal.
    wait_until(Duration::from_secs(20), "the last relay to start", || {
        relay.log().contains("listening for outbox notifications")
    });
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    assert!(
        kills >= 3,
        "only {kills} kills landed before the outbox drained"
    );
    let published = event_ids(&mut conn, &stream);
    let distinct: HashSet<String> = published.iter().cloned().collect();
    let lost: Vec<&String> = inserted.difference(&distinct).collect();
    assert!(
        lost.is_empty(),
        "{} rows lost after {kills} kills",
        lost.len()
    );
    assert!(
        distinct.is_subset(&inserted),
        "entries that no row produced"
    );
    eprintln!(
        "{kills} kills, {} entries for {} rows ({} duplicates)",
        published.len(),
        inserted.len(),
        published.len() - distinct.len()
    );
    drop_outbox(&pg, &table);
    cleanup(&mut conn, &stream);
}

fn rand_between(low: u64, high: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    low + nanos % (high - low)
}

#[test]
fn a_row_committed_after_a_higher_id_is_still_published() {
    let pg = postgres();
    let mut conn = redis();
    let table = outbox("late");
    let stream = unique("relay-late");
    let file = relay_file(&table, &database_url(), &redis_url(), "");
    let relay = start_relay(&file);
    let early = postgres();
    let late = postgres();
    let insert = |c: &postgres_client::Client, id: &str| {
        c.query(
            &format!(
                "INSERT INTO {table} (stream, aggregate_type, aggregate_id, aggregate_version, event_type, payload)
                 VALUES ($1, 'athlete', $2, 1, 'athlete.updated', '{{}}') RETURNING id"
            ),
            &[&stream, &id],
        )[0]
        .get::<_, i64>(0)
    };
    // `early` takes the lower id but commits last.
    early.execute("BEGIN");
    let low = insert(&early, "early");
    late.execute("BEGIN");
    let high = insert(&late, "late");
    assert!(low < high);
    late.execute("COMMIT");
    wait_until(Duration::from_secs(20), "the higher id published", || {
        conn.xlen::<_, usize>(&stream).unwrap_or(0) == 1
    });
    early.execute("COMMIT");
    wait_until(
        Duration::from_secs(20),
        "the lower id published too",
        || conn.xlen::<_, usize>(&stream).unwrap_or(0) == 2,
    );
    let ids: Vec<String> = entries(&mut conn, &stream)
        .into_iter()
        .map(|(_, v)| v["aggregateId"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids, ["late", "early"]);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    drop_outbox(&pg, &table);
    cleanup(&mut conn, &stream);
}

#[test]
fn two_relays_publish_each_row_once() {
    let pg = postgres();
    let mut conn = redis();
    let table = outbox("pair");
    let stream = unique("relay-pair");
    let inserted = insert_rows(&pg, &table, &stream, 5000);
    let file = relay_file(&table, &database_url(), &redis_url(), "batch_size: 100\n");
    let a = start_relay(&file);
    let b = start_relay(&file);
    wait_until(Duration::from_secs(60), "the outbox to drain", || {
        outbox_count(&pg, &table) == 0
    });
    let (status_a, log_a) = a.terminate();
    let (status_b, log_b) = b.terminate();
    assert!(status_a.success(), "{log_a}");
    assert!(status_b.success(), "{log_b}");
    let published = event_ids(&mut conn, &stream);
    assert_eq!(published.len(), 5000, "a row was published twice or lost");
    let distinct: HashSet<&String> = published.iter().collect();
    assert_eq!(distinct.len(), 5000);
    assert_eq!(
        distinct,
        inserted.iter().collect::<HashSet<_>>(),
        "published rows differ from the outbox"
    );
    let share = |log: &str| {
        log.lines()
            .find(|l| l.contains("Relay stopped."))
            .and_then(|l| l.split("published=").nth(1))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(share(&log_a) + share(&log_b), 5000, "{log_a}\n{log_b}");
    drop_outbox(&pg, &table);
    cleanup(&mut conn, &stream);
}

#[test]
fn rows_wait_in_the_outbox_while_redis_is_down() {
    let pg = postgres();
    let mut conn = redis();
    let table = outbox("redisdown");
    let stream = unique("relay-redisdown");
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let proxy = Proxy::start(&upstream);
    let file = relay_file(
        &table,
        &database_url(),
        &format!("redis://127.0.0.1:{}", proxy.port),
        "",
    );
    let relay = start_relay(&file);
    insert_rows(&pg, &table, &stream, 10);
    wait_until(Duration::from_secs(20), "the first rows published", || {
        conn.xlen::<_, usize>(&stream).unwrap_or(0) == 10
    });
    proxy.cut();
    insert_rows(&pg, &table, &stream, 100);
    wait_until(
        Duration::from_secs(20),
        "the relay to report Redis down",
        || relay.log().contains("Relay batch failed"),
    );
    assert_eq!(
        outbox_count(&pg, &table),
        100,
        "rows left the outbox while Redis was down"
    );
    assert_eq!(conn.xlen::<_, usize>(&stream).unwrap_or(0), 10);
    proxy.restore();
    wait_until(Duration::from_secs(30), "the backlog published", || {
        outbox_count(&pg, &table) == 0
    });
    assert!(conn.xlen::<_, usize>(&stream).unwrap_or(0) >= 110);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    drop_outbox(&pg, &table);
    cleanup(&mut conn, &stream);
}

#[test]
fn the_relay_resumes_after_postgres_connections_are_cut() {
    let pg = postgres();
    let mut conn = redis();
    let table = outbox("pgdown");
    let stream = unique("relay-pgdown");
    let proxy = Proxy::start("127.0.0.1:5432");
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port);
    let file = relay_file(&table, &url, &redis_url(), "");
    let relay = start_relay(&file);
    insert_rows(&pg, &table, &stream, 10);
    wait_until(Duration::from_secs(20), "the first rows published", || {
        conn.xlen::<_, usize>(&stream).unwrap_or(0) == 10
    });
    proxy.cut();
    insert_rows(&pg, &table, &stream, 200);
    wait_until(
        Duration::from_secs(20),
        "the relay to report Postgres down",
        || relay.log().contains("Relay batch failed"),
    );
    proxy.restore();
    wait_until(Duration::from_secs(30), "the backlog published", || {
        outbox_count(&pg, &table) == 0
    });
    let published: HashSet<String> = event_ids(&mut conn, &stream).into_iter().collect();
    assert_eq!(published.len(), 210);
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    drop_outbox(&pg, &table);
    cleanup(&mut conn, &stream);
}

#[test]
fn poisoned_rows_are_moved_aside_without_blocking_the_rest() {
    let pg = postgres();
    let mut conn = redis();
    let table = outbox("poison");
    let stream = unique("relay-poison");
    let wrongtype = unique("relay-poison-hash");
    let _: () = conn.hset(&wrongtype, "not", "a stream").expect("HSET");
    pg.query(
        &format!(
            "INSERT INTO {table} (stream, aggregate_type, aggregate_id, aggregate_version, event_type, payload) VALUES
             ($1, 'athlete', 'good-1', 1, 'athlete.updated', '{{}}'),
             ('', 'athlete', 'no-stream', 1, 'athlete.updated', '{{}}'),
             ($1, 'athlete', 'array', 1, 'athlete.updated', '[1, 2]'),
             ($1, 'athlete', 'negative', -4, 'athlete.updated', '{{}}'),
             ('somewhere.else', 'athlete', 'not-allowed', 1, 'athlete.updated', '{{}}'),
             ($2, 'athlete', 'wrongtype', 1, 'athlete.updated', '{{}}'),
             ($1, 'athlete', 'good-2', 1, 'athlete.updated', '{{}}')"
        ),
        &[&stream, &wrongtype],
    );
    let file = relay_file(
        &table,
        &database_url(),
        &redis_url(),
        &format!("streams:\n  \"{stream}\": {{}}\n  \"{wrongtype}\": {{}}\n"),
    );
    let relay = start_relay(&file);
    wait_until(Duration::from_secs(20), "the outbox to empty", || {
        outbox_count(&pg, &table) == 0
    });
    let good: Vec<String> = entries(&mut conn, &stream)
        .into_iter()
        .map(|(_, v)| v["aggregateId"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(good, ["good-1", "good-2"]);
    let dead: HashMap<String, String> = pg
        .query(
            &format!("SELECT aggregate_id, error FROM {table}_dead_letters"),
            &[],
        )
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(dead.len(), 5, "{dead:?}");
    assert_eq!(dead["no-stream"], "stream name is empty");
    assert!(dead["array"].contains("got an array"), "{dead:?}");
    assert!(dead["negative"].contains("-4 is negative"), "{dead:?}");
    assert!(
        dead["not-allowed"].contains("not among the relay's `streams`"),
        "{dead:?}"
    );
    assert!(dead["wrongtype"].contains("not a stream"), "{dead:?}");
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    drop_outbox(&pg, &table);
    cleanup(&mut conn, &stream);
    let _: () = conn.del(&wrongtype).expect("DEL");
}

/// A hand-made outbox may allow NULLs the documented DDL forbids: such a row is moved to the
/// dead letters with the column named, and the rows around it are published in order.
#[test]
fn a_row_with_a_null_column_is_dead_lettered_and_the_rest_published_in_order() {
    let pg = postgres();
    let mut conn = redis();
    let table = outbox("nulls");
    let stream = unique("relay-nulls");
    pg.execute(&format!(
        "ALTER TABLE {table} ALTER COLUMN aggregate_id DROP NOT NULL,
                             ALTER COLUMN event_type DROP NOT NULL,
                             ALTER COLUMN headers DROP NOT NULL"
    ));
    pg.query(
        &format!(
            "INSERT INTO {table} (stream, aggregate_type, aggregate_id, aggregate_version, event_type, payload, headers) VALUES
             ($1, 'athlete', 'good-1', 1, 'athlete.updated', '{{}}', '{{}}'),
             ($1, 'athlete', NULL, 1, 'athlete.updated', '{{}}', '{{}}'),
             ($1, 'athlete', 'no-type', 1, NULL, '{{}}', '{{}}'),
             ($1, 'athlete', 'no-headers', 1, 'athlete.updated', '{{}}', NULL),
             ($1, 'athlete', 'good-2', 1, 'athlete.updated', '{{}}', '[1]')"
        ),
        &[&stream],
    );
    let file = relay_file(&table, &database_url(), &redis_url(), "");
    let mut relay = start_relay(&file);
    wait_for_worker(
        &relay,
        Duration::from_secs(20),
        "the outbox to empty",
        || outbox_count(&pg, &table) == 0,
    );
    assert!(relay.is_running(), "the relay died:\n{}", relay.log());
    let published: Vec<String> = entries(&mut conn, &stream)
        .into_iter()
        .map(|(_, v)| v["aggregateId"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(published, ["good-1", "no-headers", "good-2"]);
    let dead: Vec<(Option<String>, String)> = pg
        .query(
            &format!("SELECT aggregate_id, error FROM {table}_dead_letters ORDER BY id"),
            &[],
        )
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        dead,
        [
            (None, "column aggregate_id is NULL".to_string()),
            (
                Some("no-type".to_string()),
                "column event_type is NULL".to_string()
            ),
        ]
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    drop_outbox(&pg, &table);
    cleanup(&mut conn, &stream);
}

#[test]
fn a_notification_wakes_the_relay_long_before_its_poll() {
    let pg = postgres();
    let mut conn = redis();
    let table = outbox("notify");
    let stream = unique("relay-notify");
    // The poll is a minute away: only NOTIFY can deliver within the deadline below.
    let file = pipeline_file(
        "relay",
        &format!(
            "postgres: \"{}\"\nredis: \"{}\"\noutbox: {{ table: {table} }}\npoll_interval: 60s\n",
            database_url(),
            redis_url()
        ),
    );
    let relay = start_relay(&file);
    wait_until(Duration::from_secs(20), "the relay to listen", || {
        relay.log().contains("listening for outbox notifications")
    });
    // The first pass has run once it listens; give it a row only now.
    insert_rows(&pg, &table, &stream, 1);
    wait_until(Duration::from_secs(10), "the row on the stream", || {
        conn.xlen::<_, usize>(&stream).unwrap_or(0) == 1
    });
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    drop_outbox(&pg, &table);
    cleanup(&mut conn, &stream);
}

#[test]
fn a_missing_outbox_table_refuses_to_start() {
    let file = relay_file("no_such_outbox_table", &database_url(), &redis_url(), "");
    let mut cmd = ecst();
    cmd.arg("relay").arg(&file);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("table public.no_such_outbox_table does not exist")
            && err.contains("ecst outbox install"),
        "{err}"
    );
}

#[test]
fn relay_files_are_validated_with_positions() {
    let file = pipeline_file(
        "relay",
        "postgres: postgres://db/app?sslmode=sometimes\nbatch_size: 0\nretention:\n  maxlen: 10\n  max_age: 1d\nstreams:\n  \"two words\": {}\n",
    );
    let mut cmd = ecst();
    cmd.arg("validate").arg(&file);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    let err = stderr_of(&out);
    let path = file.display().to_string();
    for expected in [
        format!("{path}:1:1: postgres: "),
        format!("{path}:2:1: batch_size: must be between 1 and 10000"),
        format!("{path}:3:1: retention: give `maxlen` or `max_age`, not both"),
        format!("{path}:7:3: streams.two words: stream name \"two words\" contains whitespace"),
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
    assert!(err.contains("invalid sslmode `sometimes`"), "{err}");
}

#[test]
fn an_outbox_with_a_wrong_column_type_refuses_to_start() {
    let pg = postgres();
    let table = outbox("types");
    pg.execute(&format!(
        "ALTER TABLE {table} ALTER COLUMN aggregate_version TYPE integer"
    ));
    let file = relay_file(&table, &database_url(), &redis_url(), "");
    let mut cmd = ecst();
    cmd.arg("relay").arg(&file);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!(
            "column public.{table}.aggregate_version is integer, expected bigint"
        )),
        "{err}"
    );
    drop_outbox(&pg, &table);
}

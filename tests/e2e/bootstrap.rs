//! Bootstrap from a real snapshot server (or query) over a real Postgres source, racing live
//! events, interrupted, contended, and after a retention gap.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use redis::Commands;

use crate::common::*;

/// The source of truth: an athletes table in Postgres.
pub struct Source {
    pub pg: postgres_client::Client,
    pub table: String,
}

impl Source {
    pub fn create(label: &str, rows: i64) -> Source {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let table = format!("e2e_src_{label}_{}_{nanos}", std::process::id());
        let pg = postgres();
        pg.execute(&format!(
            "CREATE TABLE {table} (id text PRIMARY KEY, version bigint NOT NULL,
                                   display_name text NOT NULL, status text NOT NULL DEFAULT 'active',
                                   updated_at timestamptz NOT NULL DEFAULT now())"
        ));
        pg.query(
            &format!(
                "INSERT INTO {table} (id, version, display_name)
                 SELECT 'a' || lpad(g::text, 6, '0'), 3, 'name ' || g FROM generate_series(1, $1::bigint) g"
            ),
            &[&rows],
        );
        Source { pg, table }
    }

    /// Changes `ids` at the source (version + 1) and publishes each change, as a producer would.
    pub fn update_and_publish(&self, conn: &mut redis::Connection, stream: &str, ids: &[String]) {
        publish(conn, stream, &self.update(ids));
    }

    /// Changes `ids` at the source (version + 1); returns the events a producer publishes.
    pub fn update(&self, ids: &[String]) -> Vec<serde_json::Value> {
        let changed = self.pg.query(
            &format!(
                "UPDATE {t} SET version = version + 1, display_name = 'changed v' || (version + 1)
                 WHERE id = ANY($1) RETURNING id, version, display_name",
                t = self.table
            ),
            &[&ids],
        );
        changed
            .iter()
            .map(|r| {
                event(
                    &r.get::<_, String>(0),
                    r.get::<_, i64>(1) as u64,
                    &r.get::<_, String>(2),
                )
            })
            .collect()
    }

    /// Deletes `ids` at the source and publishes the tombstones.
    pub fn delete_and_publish(&self, conn: &mut redis::Connection, stream: &str, ids: &[String]) {
        let gone = self.pg.query(
            &format!(
                "DELETE FROM {} WHERE id = ANY($1) RETURNING id, version",
                self.table
            ),
            &[&ids],
        );
        let events: Vec<serde_json::Value> = gone
            .iter()
            .map(|r| delete(&r.get::<_, String>(0), r.get::<_, i64>(1) as u64 + 1))
            .collect();
        publish(conn, stream, &events);
    }

    pub fn rows(&self) -> HashMap<String, (i64, String)> {
        self.pg
            .query(
                &format!("SELECT id, version, display_name FROM {}", self.table),
                &[],
            )
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect()
    }

    /// Ids of the replica that differ from the source (first few), or empty when equal.
    pub fn differences(&self, conn: &mut redis::Connection, prefix: &str) -> Vec<String> {
        let rows = self.rows();
        let mut ids: Vec<&String> = rows.keys().collect();
        ids.sort();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET")
                .arg(format!("{prefix}athlete:{id}"))
                .arg("_version")
                .arg("display_name");
        }
        let got: Vec<(Option<String>, Option<String>)> = pipe.query(conn).expect("HMGET");
        let mut wrong: Vec<String> = ids
            .iter()
            .zip(got)
            .filter(|(id, (version, name))| {
                let (v, n) = &rows[**id];
                version.as_deref() != Some(&v.to_string()) || name.as_deref() != Some(n)
            })
            .map(|(id, _)| (*id).clone())
            .take(5)
            .collect();
        let keys: Vec<String> = conn
            .scan_match(format!("{prefix}athlete:*"))
            .expect("SCAN")
            .collect::<Result<_, _>>()
            .expect("SCAN");
        if keys.len() != rows.len() {
            wrong.push(format!(
                "{} replica keys for {} source rows",
                keys.len(),
                rows.len()
            ));
        }
        wrong
    }

    pub fn drop(self) {
        self.pg.execute(&format!("DROP TABLE {}", self.table));
    }
}

/// `ecst snapshot serve` over the source table, on a port it picks; returns it and the port.
pub fn snapshot_server(source: &Source) -> (Worker, u16) {
    let file = pipeline_file(
        "snapshot",
        &format!(
            "listen: 127.0.0.1:0\npostgres: \"{}\"\nentities:\n  athletes:\n    table: {}\n    occurred_at: updated_at\n    payload: {{ athleteId: id, displayName: display_name, status: status }}\n",
            database_url(),
            source.table
        ),
    );
    let mut cmd = ecst();
    cmd.args(["snapshot", "serve"]).arg(&file);
    let server = Worker::spawn(cmd);
    let port = server.listen_port("Snapshot server listening.");
    let health = format!("http://127.0.0.1:{port}/healthz");
    wait_until(Duration::from_secs(20), "the snapshot server", || {
        reqwest::blocking::get(&health).is_ok_and(|r| r.status().is_success())
    });
    (server, port)
}

pub fn bootstrap_pipeline(stream: &str, prefix: &str, bootstrap: &str) -> PathBuf {
    let mut yaml = athletes_pipeline(stream, prefix, "  gap_check_every: 200ms");
    yaml.push_str(&format!("bootstrap:\n{bootstrap}"));
    pipeline_file("bootstrap", &yaml)
}

pub fn http_bootstrap(port: u16, extra: &str) -> String {
    format!(
        "  url: http://127.0.0.1:{port}/snapshot/athletes\n  page_size: 1000\n  lease: 2s\n  timeout: 5s\n{extra}"
    )
}

pub fn ids(range: std::ops::Range<i64>) -> Vec<String> {
    range.map(|n| format!("a{n:06}")).collect()
}

fn progress(conn: &mut redis::Connection, stream: &str) -> HashMap<String, String> {
    conn.hgetall(format!("ecst:bootstrap:{stream}:replica:progress"))
        .expect("HGETALL")
}

fn cleanup_bootstrap(conn: &mut redis::Connection, stream: &str, prefix: &str) {
    cleanup(conn, stream);
    cleanup(conn, prefix);
    let _: () = conn
        .del(format!("ecst:bootstrap:{stream}:replica:progress"))
        .expect("DEL");
}

#[test]
fn a_new_group_bootstraps_50k_rows_while_live_events_race_it() {
    let mut conn = redis();
    let source = Source::create("race", 50_000);
    let stream = unique("boot-race");
    let prefix = format!("{stream}:");
    // Old history still on the stream: older than the snapshot, it must not win.
    let stale: Vec<serde_json::Value> = ids(1..500).iter().map(|id| event(id, 1, "old")).collect();
    publish(&mut conn, &stream, &stale);
    let (server, port) = snapshot_server(&source);
    let pipeline = bootstrap_pipeline(&stream, &prefix, &http_bootstrap(port, ""));
    let worker = Worker::start(&pipeline, &[]);
    wait_until(Duration::from_secs(30), "the bootstrap to start", || {
        worker.log().contains("Bootstrap starting")
    });
    // Live changes while the snapshot is being paged: updates all over the key space, and
    // deletes.
    for chunk in ids(1..50_001).chunks(5_000) {
        let picked: Vec<String> = chunk.iter().step_by(7).cloned().collect();
        source.update_and_publish(&mut conn, &stream, &picked);
    }
    source.delete_and_publish(&mut conn, &stream, &ids(40_000..40_300));
    wait_until(Duration::from_secs(120), "the bootstrap to finish", || {
        worker.log().contains("Bootstrap finished")
    });
    wait_until(
        Duration::from_secs(60),
        "the replica to equal the source",
        || source.differences(&mut conn, &prefix).is_empty(),
    );
    assert_eq!(progress(&mut conn, &stream)["state"], "done");
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("reason=the consumer group does not exist yet"),
        "{log}"
    );
    let (status, log) = server.terminate();
    assert!(status.success(), "{log}");
    source.drop();
    cleanup_bootstrap(&mut conn, &stream, &prefix);
}

#[test]
fn an_interrupted_bootstrap_resumes_from_its_cursor() {
    let mut conn = redis();
    let source = Source::create("resume", 20_000);
    let stream = unique("boot-resume");
    let prefix = format!("{stream}:");
    let (server, port) = snapshot_server(&source);
    let pipeline = bootstrap_pipeline(
        &stream,
        &prefix,
        &format!(
            "  url: http://127.0.0.1:{port}/snapshot/athletes\n  page_size: 200\n  lease: 1s\n"
        ),
    );
    let mut first = Worker::start(&pipeline, &[]);
    wait_until(Duration::from_secs(60), "a few pages applied", || {
        progress(&mut conn, &stream)
            .get("rows")
            .and_then(|r| r.parse::<u64>().ok())
            .is_some_and(|rows| rows >= 2_000)
    });
    first.kill_9();
    let interrupted = progress(&mut conn, &stream);
    assert_eq!(interrupted["state"], "running");
    let cursor = interrupted["after"].clone();
    assert!(!cursor.is_empty());
    let done_before: u64 = interrupted["rows"].parse().expect("rows");
    assert!(
        done_before < 20_000,
        "the kill came too late to interrupt anything"
    );

    let second = Worker::start(&pipeline, &[]);
    wait_until(Duration::from_secs(60), "the bootstrap to finish", || {
        second.log().contains("Bootstrap finished")
    });
    let log = second.log();
    assert!(
        log.contains("reason=an interrupted bootstrap resumes"),
        "{log}"
    );
    let resumed_at = log
        .lines()
        .find(|l| l.contains("Bootstrap starting"))
        .and_then(|l| l.split("resume_after=Some(\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_string();
    // The kill may land after a page was applied but before its progress was written: the
    // resumed cursor is the last recorded one, at most one page behind.
    assert!(
        resumed_at >= cursor,
        "resumed at {resumed_at:?}, recorded {cursor:?}"
    );
    let total: u64 = progress(&mut conn, &stream)["rows"].parse().expect("rows");
    assert!(
        (20_000..=20_200).contains(&total),
        "{total} rows counted: the resume started over instead of from the cursor"
    );
    wait_until(
        Duration::from_secs(30),
        "the replica to equal the source",
        || source.differences(&mut conn, &prefix).is_empty(),
    );
    for worker in [second, server] {
        let (status, log) = worker.terminate();
        assert!(status.success(), "{log}");
    }
    source.drop();
    cleanup_bootstrap(&mut conn, &stream, &prefix);
}

#[test]
fn two_workers_starting_together_bootstrap_once() {
    let mut conn = redis();
    let source = Source::create("pair", 10_000);
    let stream = unique("boot-pair");
    let prefix = format!("{stream}:");
    let (server, port) = snapshot_server(&source);
    let pipeline = bootstrap_pipeline(&stream, &prefix, &http_bootstrap(port, ""));
    let a = Worker::start(&pipeline, &["--consumer", "a"]);
    let b = Worker::start(&pipeline, &["--consumer", "b"]);
    wait_until(Duration::from_secs(60), "the bootstrap to finish", || {
        a.log().contains("Bootstrap finished") || b.log().contains("Bootstrap finished")
    });
    wait_until(
        Duration::from_secs(30),
        "the replica to equal the source",
        || source.differences(&mut conn, &prefix).is_empty(),
    );
    // Both stream afterwards: a change reaches the replica through either.
    source.update_and_publish(&mut conn, &stream, &ids(1..101));
    wait_until(
        Duration::from_secs(30),
        "the live change replicated",
        || source.differences(&mut conn, &prefix).is_empty(),
    );
    let (status_a, log_a) = a.terminate();
    let (status_b, log_b) = b.terminate();
    assert!(status_a.success(), "{log_a}");
    assert!(status_b.success(), "{log_b}");
    let bootstraps = [&log_a, &log_b]
        .iter()
        .filter(|l| l.contains("Bootstrap starting"))
        .count();
    assert_eq!(bootstraps, 1, "A:\n{log_a}\nB:\n{log_b}");
    let (status, log) = server.terminate();
    assert!(status.success(), "{log}");
    source.drop();
    cleanup_bootstrap(&mut conn, &stream, &prefix);
}

#[test]
fn a_retention_gap_is_detected_and_healed_from_the_source_query() {
    let mut conn = redis();
    let source = Source::create("gap", 2_000);
    let stream = unique("boot-gap");
    let prefix = format!("{stream}:");
    let query = format!(
        "SELECT id, version, jsonb_build_object('displayName', display_name, 'status', status), updated_at FROM {} WHERE ($1::text IS NULL OR id > $1) ORDER BY id LIMIT $2",
        source.table
    );
    let pipeline = bootstrap_pipeline(
        &stream,
        &prefix,
        &format!(
            "  postgres: \"{}\"\n  query: \"{query}\"\n  lease: 2s\n",
            database_url()
        ),
    );
    let worker = Worker::start(&pipeline, &[]);
    wait_until(Duration::from_secs(30), "the first bootstrap", || {
        source.differences(&mut conn, &prefix).is_empty()
    });
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");

    // While the worker is down: changes and deletions at the source, published, then trimmed
    // away before the worker saw them.
    source.update_and_publish(&mut conn, &stream, &ids(1..301));
    source.delete_and_publish(&mut conn, &stream, &ids(1_500..1_550));
    let _: i64 = redis::cmd("XTRIM")
        .arg(&stream)
        .arg("MAXLEN")
        .arg(0)
        .query(&mut conn)
        .expect("XTRIM");
    assert!(!source.differences(&mut conn, &prefix).is_empty());

    let worker = Worker::start(&pipeline, &[]);
    wait_for_worker(
        &worker,
        Duration::from_secs(60),
        "the gap to be healed",
        || source.differences(&mut conn, &prefix).is_empty(),
    );
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("RETENTION GAP"), "{log}");
    assert!(
        log.contains("reason=retention gap: every entry up to"),
        "{log}"
    );
    source.drop();
    cleanup_bootstrap(&mut conn, &stream, &prefix);
}

#[test]
fn on_gap_fail_stops_the_worker_and_says_why() {
    let mut conn = redis();
    let stream = unique("boot-gapfail");
    let prefix = format!("{stream}:");
    publish(&mut conn, &stream, &[event("x", 1, "x")]);
    let pipeline = bootstrap_pipeline(
        &stream,
        &prefix,
        "  url: http://127.0.0.1:9/snapshot/athletes\n  on_new_group: false\n  on_gap: fail\n",
    );
    drain(&pipeline);
    publish(
        &mut conn,
        &stream,
        &[event("x", 2, "x"), event("y", 1, "y")],
    );
    let _: i64 = redis::cmd("XTRIM")
        .arg(&stream)
        .arg("MAXLEN")
        .arg(0)
        .query(&mut conn)
        .expect("XTRIM");
    let mut cmd = ecst();
    cmd.arg("run").arg(&pipeline).arg("--drain");
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("retention gap: every entry up to"), "{err}");
    assert!(err.contains("XGROUP SETID"), "{err}");
    cleanup_bootstrap(&mut conn, &stream, &prefix);
}

#[test]
fn a_snapshot_endpoint_that_is_down_is_retried_and_never_reported_done() {
    let mut conn = redis();
    let source = Source::create("down", 3_000);
    let stream = unique("boot-down");
    let prefix = format!("{stream}:");
    // The endpoint is down behind a proxy that refuses connections, until the server is up.
    let proxy = Proxy::start("127.0.0.1:9");
    proxy.cut();
    let pipeline = bootstrap_pipeline(&stream, &prefix, &http_bootstrap(proxy.port, ""));
    let worker = Worker::start(&pipeline, &[]);
    wait_until(
        Duration::from_secs(30),
        "the worker to report the endpoint down",
        || {
            worker
                .log()
                .contains("Fetching a snapshot page failed (the bootstrap is not done)")
        },
    );
    assert_eq!(progress(&mut conn, &stream)["state"], "running");
    let (server, port) = snapshot_server(&source);
    proxy.set_upstream(&format!("127.0.0.1:{port}"));
    proxy.restore();
    wait_until(Duration::from_secs(60), "the bootstrap to finish", || {
        worker.log().contains("Bootstrap finished")
    });
    wait_until(
        Duration::from_secs(30),
        "the replica to equal the source",
        || source.differences(&mut conn, &prefix).is_empty(),
    );
    for worker in [worker, server] {
        let (status, log) = worker.terminate();
        assert!(status.success(), "{log}");
    }
    source.drop();
    cleanup_bootstrap(&mut conn, &stream, &prefix);
}

//! Helpers for end-to-end tests: a real Redis, the real `ecst` binary, unique names.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Commands;
use serde_json::{Value, json};

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn redis() -> redis::Connection {
    let client = redis::Client::open(redis_url()).expect("REDIS_URL is a valid URL");
    client
        .get_connection_with_timeout(Duration::from_secs(5))
        .expect(
            "a Redis server answers on REDIS_URL (run .ci/run or scripts/services.sh to start one)",
        )
}

/// A name unique to this test process and call.
pub fn unique(label: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "e2e:{label}:{}:{}:{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn ecst() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ecst"));
    cmd.env("REDIS_URL", redis_url()).env("ECST_LOG", "info");
    cmd
}

/// Writes a pipeline file into a fresh temporary directory.
pub fn pipeline_file(label: &str, yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(label).replace(':', "_"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("pipeline.yaml");
    std::fs::write(&path, yaml).expect("write pipeline");
    path
}

/// A standard athletes pipeline reading `stream` and writing `<prefix>athlete:{aggregateId}`.
pub fn athletes_pipeline(stream: &str, prefix: &str, extra_source: &str) -> String {
    format!(
        r#"name: athletes
source:
  stream: "{stream}"
  group: replica
  block: 100ms
  claim_every: 200ms
{extra_source}
stages:
  decode: {{ type: decode }}
  latest: {{ type: version_filter, input: decode }}
  deletes: {{ type: tombstone, input: latest, mode: delete, keep_for: 1h }}
  athlete:
    type: project
    input: deletes
    fields:
      display_name: payload.displayName
      status: payload.status
  cache:
    type: redis_hash
    input: athlete
    key: "{prefix}athlete:{{aggregateId}}"
    tombstone_prefix: "{prefix}tombstone:"
"#
    )
}

pub fn event(id: &str, version: u64, name: &str) -> Value {
    json!({
        "schemaVersion": 1, "eventId": format!("{id}-{version}"), "eventType": "athlete.updated",
        "occurredAt": "2026-11-24T10:00:00Z", "aggregateType": "athlete", "aggregateId": id,
        "aggregateVersion": version,
        "payload": {"athleteId": id, "displayName": name, "status": "active"}
    })
}

pub fn delete(id: &str, version: u64) -> Value {
    json!({"eventType": "athlete.deleted", "occurredAt": "2026-11-24T10:00:00Z", "aggregateId": id,
           "aggregateVersion": version, "payload": null, "deleted": true})
}

/// XADDs JSON bodies in field `v`, pipelined; returns the entry ids.
pub fn publish(conn: &mut redis::Connection, stream: &str, events: &[Value]) -> Vec<String> {
    let mut ids = Vec::new();
    for chunk in events.chunks(1000) {
        let mut pipe = redis::pipe();
        for e in chunk {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("v")
                .arg(e.to_string());
        }
        let chunk_ids: Vec<String> = pipe.query(conn).expect("XADD");
        ids.extend(chunk_ids);
    }
    ids
}

pub fn hash(conn: &mut redis::Connection, key: &str) -> HashMap<String, String> {
    conn.hgetall(key).expect("HGETALL")
}

pub fn group_pending(conn: &mut redis::Connection, stream: &str, group: &str) -> i64 {
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query(conn)
        .expect("XPENDING");
    match reply {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => panic!("XPENDING summary without a count"),
        },
        other => panic!("XPENDING returned {other:?}"),
    }
}

/// Dead-letter entries as field maps.
pub fn dead_letters(conn: &mut redis::Connection, stream: &str) -> Vec<HashMap<String, String>> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(stream).expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|e| {
            e.map
                .into_iter()
                .map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap_or_default()))
                .collect()
        })
        .collect()
}

/// Runs a command to completion within `limit`, killing it if it overruns.
pub fn run_with_deadline(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ecst");
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "command did not finish within {limit:?}\nstderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `ecst run --drain` on a pipeline file; panics with its log unless it exits 0.
pub fn drain(pipeline: &PathBuf) -> Output {
    let mut cmd = ecst();
    cmd.arg("run").arg(pipeline).arg("--drain");
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "ecst run --drain failed: {:?}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A running `ecst run` whose log is collected as it is written.
pub struct Worker {
    pub child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    pub fn start(pipeline: &PathBuf, extra: &[&str]) -> Worker {
        let mut cmd = ecst();
        cmd.arg("run")
            .arg(pipeline)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ecst run");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut log) = sink.lock() {
                    log.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Worker {
            child,
            log,
            reader: Some(reader),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// Sends SIGTERM and waits for the exit; returns the status and the whole log.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not stop within 60s of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (status, self.log())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Removes everything a passing test wrote under `stream` (failing tests leave it for a look).
pub fn cleanup(conn: &mut redis::Connection, stream: &str) {
    for pattern in [format!("{stream}*"), format!("ecst:tombstone:{stream}*")] {
        let keys: Vec<String> = conn
            .scan_match(&pattern)
            .expect("SCAN")
            .collect::<Result<_, _>>()
            .expect("SCAN");
        for chunk in keys.chunks(1000) {
            let _: i64 = redis::cmd("UNLINK").arg(chunk).query(conn).expect("UNLINK");
        }
    }
}

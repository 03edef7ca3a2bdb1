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

/// The shared local Redis Cluster `scripts/services.sh` starts.
pub fn cluster_url() -> String {
    std::env::var("ECST_CLUSTER_URL")
        .unwrap_or_else(|_| "redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".into())
}

/// A cluster client for a test's own reads and writes (it follows MOVED and ASK), from the
/// seed nodes of a `redis+cluster://` URL.
pub fn cluster(url: &str) -> redis::cluster::ClusterConnection {
    let seeds: Vec<String> = url
        .strip_prefix("redis+cluster://")
        .expect("a redis+cluster:// URL")
        .trim_end_matches('/')
        .split(',')
        .map(|s| format!("redis://{s}"))
        .collect();
    redis::cluster::ClusterClientBuilder::new(seeds)
        .connection_timeout(Duration::from_secs(5))
        .response_timeout(Duration::from_secs(5))
        .build()
        .expect("cluster client")
        .get_connection()
        .expect("a Redis Cluster answers (run scripts/services.sh to start the local one)")
}

/// Entries pending in `group` over every partition of `stream`; `None` while a partition has
/// no group or cannot be read.
pub fn pending_in_partitions(
    conn: &mut impl redis::ConnectionLike,
    stream: &str,
    group: &str,
    partitions: u32,
) -> Option<i64> {
    let mut total = 0;
    for p in 0..partitions {
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(ecst_schemas::partition::partition_stream(
                stream, p, partitions,
            ))
            .arg(group)
            .query(conn)
            .ok()?;
        let redis::Value::Array(items) = summary else {
            return None;
        };
        let Some(redis::Value::Int(n)) = items.first() else {
            return None;
        };
        total += n;
    }
    Some(total)
}

/// Aggregates `<id_prefix>0..<id_prefix>{aggregates - 1}`, versions 1..=`versions`, every
/// tenth deleted at its last version, 5% duplicated, shuffled: the events and each
/// aggregate's expected display name (`None` when deleted).
pub fn shuffled_workload(
    id_prefix: &str,
    aggregates: usize,
    versions: u64,
    seed: u64,
) -> (Vec<Value>, HashMap<String, Option<String>>) {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut events = Vec::new();
    let mut expected = HashMap::new();
    for a in 0..aggregates {
        let id = format!("{id_prefix}{a}");
        for v in 1..=versions {
            let e = if v == versions && a % 10 == 0 {
                delete(&id, v)
            } else {
                event(&id, v, &format!("name {a} v{v}"))
            };
            if rng.random_bool(0.05) {
                events.push(e.clone());
            }
            events.push(e);
        }
        expected.insert(id, (a % 10 != 0).then(|| format!("name {a} v{versions}")));
    }
    events.shuffle(&mut rng);
    (events, expected)
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
    // Workers serve metrics; tests run many at once, each on a port of its own.
    cmd.env("REDIS_URL", redis_url())
        .env("ECST_LOG", "info")
        .env("ECST_METRICS_ADDR", "127.0.0.1:0");
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

/// Runs a command to completion within `limit`, killing it if it overruns. Its output is read
/// while it runs, so a child that writes more than a pipe holds cannot block on it.
pub fn run_with_deadline(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ecst");
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("stdout")));
    let stderr = read_all(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + limit;
    let (status, overran) = loop {
        match child.try_wait().expect("wait") {
            Some(status) => break (status, false),
            None if Instant::now() > deadline => {
                let _ = child.kill();
                break (child.wait().expect("reap"), true);
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let out = Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    };
    assert!(
        !overran,
        "command did not finish within {limit:?}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// GET `path` on a local port: the status and body, or `(0, "")` when nothing answers.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    match reqwest::blocking::get(format!("http://127.0.0.1:{port}{path}")) {
        Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default()),
        Err(_) => (0, String::new()),
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
        cmd.arg("run").arg(pipeline).args(extra);
        Worker::spawn(cmd)
    }

    /// Runs any `ecst` command line (relay, snapshot server) the same way.
    pub fn spawn(mut cmd: Command) -> Worker {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ecst");
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

    /// Waits for the log line containing `message` and returns the port of the `addr=` it
    /// names: a child told to listen on port 0 says where it bound, so no port is guessed.
    pub fn listen_port(&self, message: &str) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            let port = log
                .lines()
                .find(|l| l.contains(message))
                .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
                .and_then(|addr| addr.parse::<std::net::SocketAddr>().ok())
                .map(|addr| addr.port());
            if let Some(port) = port {
                return port;
            }
            assert!(
                Instant::now() < deadline,
                "no `{message}` line with addr= within 30s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit; returns the status (assert it) and the whole log.
    #[must_use = "assert the exit status"]
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

/// Like [`wait_until`], with the worker's log in the failure message.
pub fn wait_for_worker(
    worker: &Worker,
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; worker log:\n{}",
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(25));
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

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn postgres() -> postgres_client::Client {
    postgres_client::Client::connect(&database_url())
}

/// A blocking Postgres client for assertions (a small runtime around tokio-postgres).
pub mod postgres_client {
    pub struct Client {
        runtime: tokio::runtime::Runtime,
        client: tokio_postgres::Client,
    }

    impl Client {
        pub fn connect(url: &str) -> Client {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let client = runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .expect("a PostgreSQL server answers on DATABASE_URL (scripts/services.sh starts one)");
                tokio::spawn(connection);
                client
            });
            Client { runtime, client }
        }

        pub fn query(
            &self,
            sql: &str,
            params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        ) -> Vec<tokio_postgres::Row> {
            self.runtime
                .block_on(self.client.query(sql, params))
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        }

        pub fn try_query(
            &self,
            sql: &str,
        ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
            self.runtime.block_on(self.client.query(sql, &[]))
        }

        pub fn execute(&self, sql: &str) {
            self.runtime
                .block_on(self.client.batch_execute(sql))
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
}

/// A TCP proxy in front of a server, whose link the test can cut and restore: a real
/// connection failure, as a network partition or a server restart looks to a client.
pub struct Proxy {
    pub port: u16,
    upstream: Arc<Mutex<String>>,
    cut: Arc<std::sync::atomic::AtomicBool>,
    live: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    pub fn start(upstream: &str) -> Proxy {
        use std::sync::atomic::AtomicBool;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let upstream = Arc::new(Mutex::new(upstream.to_string()));
        let (cut2, live2, upstream2) = (cut.clone(), live.clone(), upstream.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if cut2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let target = upstream2.lock().map(|u| u.clone()).unwrap_or_default();
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    if let Ok(mut live) = live2.lock() {
                        live.push(c2.try_clone().expect("clone"));
                        live.push(s2.try_clone().expect("clone"));
                    }
                    let pump = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    };
                    pump(client, s2);
                    pump(server, c2);
                }
            }
        });
        Proxy {
            port,
            upstream,
            cut,
            live,
        }
    }

    /// Sends new connections to `upstream` from now on.
    pub fn set_upstream(&self, upstream: &str) {
        if let Ok(mut current) = self.upstream.lock() {
            *current = upstream.to_string();
        }
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        if let Ok(mut live) = self.live.lock() {
            for s in live.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// A group's pending count and entries read, from one `XINFO GROUPS` reply (one moment: a
/// worker reading between two separate calls would make them disagree).
pub fn pending_and_read(conn: &mut redis::Connection, stream: &str, group: &str) -> (u64, u64) {
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query(conn)
        .expect("XINFO GROUPS");
    let group = groups
        .iter()
        .find(
            |g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == group.as_bytes()),
        )
        .expect("the group exists");
    let int = |key: &str| match group.get(key) {
        Some(redis::Value::Int(n)) => *n as u64,
        other => panic!("XINFO GROUPS {key}: {other:?}"),
    };
    (int("pending"), int("entries-read"))
}

/// `entries-read` of a group (how far its consumers have read).
pub fn entries_read(conn: &mut redis::Connection, stream: &str, group: &str) -> u64 {
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query(conn)
        .unwrap_or_default();
    groups
        .iter()
        .find(
            |g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == group.as_bytes()),
        )
        .and_then(|g| match g.get("entries-read") {
            Some(redis::Value::Int(n)) => Some(*n as u64),
            _ => None,
        })
        .unwrap_or(0)
}

/// Resident memory of a process, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[test]
fn run_with_deadline_reads_output_while_the_child_runs() {
    // More than a pipe holds (64 KiB) on both streams: a helper that read only after the
    // exit waited for an exit that never came.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "head -c 1000000 /dev/zero; head -c 1000000 /dev/zero >&2",
    ]);
    let out = run_with_deadline(cmd, Duration::from_secs(20));
    assert!(out.status.success(), "{:?}", out.status);
    assert_eq!((out.stdout.len(), out.stderr.len()), (1_000_000, 1_000_000));
}

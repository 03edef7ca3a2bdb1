//! A chaos run with a checker, in the spirit of Jepsen: three workers replicate a known,
//! seeded history into Redis and Postgres while processes are killed, servers crash, pause and
//! restart and acknowledged entries are trimmed; then the replicas are compared with the history.
//!
//! `ECST_CHAOS_SECS` sets how long faults are injected (default 60) and `ECST_CHAOS_SEED`
//! replays a run (the seed is printed in the result line).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::Commands;
use serde_json::json;

use crate::common::*;
use crate::servers::{PrivatePostgres, PrivateRedis};

const STREAM: &str = "chaos.athletes";
const GROUP: &str = "replica";
const DEAD_LETTER: &str = "chaos.athletes.dlq";
const TABLE: &str = "athletes";
const AGGREGATES: u64 = 400;
const WORKERS: usize = 3;

fn chaos_secs() -> u64 {
    std::env::var("ECST_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

fn chaos_seed() -> u64 {
    std::env::var("ECST_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

fn pipeline(redis_url: &str, database_url: &str) -> String {
    format!(
        r#"name: chaos
source:
  redis: "{redis_url}"
  stream: "{STREAM}"
  group: {GROUP}
  dead_letter: "{DEAD_LETTER}"
  batch_size: 100
  block: 200ms
  timeout: 2s
  claim_idle: 2s
  claim_every: 500ms
  gap_check_every: 1s
  # Every kill of a worker holding a batch, and every claim from a frozen one, counts as a
  # delivery; a good event dead-lettered for that is the max_deliveries policy at work, not
  # what this run checks.
  max_deliveries: 1000
stages:
  decode: {{ type: decode }}
  latest: {{ type: version_filter, input: decode }}
  deletes: {{ type: tombstone, input: latest, mode: delete, keep_for: 1h }}
  card:
    type: project
    input: deletes
    fields: {{ display_name: payload.displayName, status: payload.status }}
  row:
    type: project
    input: deletes
    fields: {{ display_name: payload.displayName, status: payload.status, points: payload.points }}
  cache:
    type: redis_hash
    input: card
    key: "athlete:{{aggregateId}}"
    tombstone_prefix: "tomb:"
    timeout: 2s
  table:
    type: postgres
    input: row
    url: "{database_url}"
    table: {TABLE}
    key: athlete_id
    create: true
    timeout: 2s
    columns: {{ display_name: text, status: text, points: bigint }}
"#
    )
}

/// The source's truth: per aggregate, its highest version and whether that is a delete.
#[derive(Default)]
struct History {
    last: HashMap<String, (u64, bool)>,
    poison: HashSet<String>,
    events: usize,
}

impl History {
    fn note(&mut self, id: &str, version: u64, deleted: bool) {
        let last = self.last.entry(id.to_string()).or_insert((0, false));
        if version > last.0 {
            *last = (version, deleted);
        }
    }
}

fn update_body(id: &str, version: u64) -> String {
    let status = if version.is_multiple_of(3) {
        "retired"
    } else {
        "active"
    };
    json!({"eventType": "athlete.updated", "occurredAt": "2026-11-25T10:00:00Z",
           "aggregateType": "athlete", "aggregateId": id, "aggregateVersion": version,
           "payload": {"displayName": format!("{id} v{version}"), "status": status, "points": version}})
    .to_string()
}

fn delete_body(id: &str, version: u64) -> String {
    json!({"eventType": "athlete.deleted", "occurredAt": "2026-11-25T10:00:00Z",
           "aggregateType": "athlete", "aggregateId": id, "aggregateVersion": version,
           "payload": null, "deleted": true})
    .to_string()
}

/// Writes the seeded history with explicit, increasing entry ids, so that a write whose reply
/// was lost to a crash is neither lost nor written twice: after any failure the stream's last
/// generated id says how much of the chunk is in.
struct Producer {
    url: String,
    conn: Option<redis::Connection>,
    rng: StdRng,
    last_ms: u64,
    seq: u64,
    next_version: Vec<u64>,
    /// Every body sent per aggregate, to send again (duplicates, stale replays).
    sent: Vec<Vec<String>>,
    /// Versions held back to arrive after newer ones.
    held: Vec<String>,
    history: History,
}

impl Producer {
    fn new(url: String, seed: u64) -> Producer {
        Producer {
            url,
            conn: None,
            rng: StdRng::seed_from_u64(seed),
            last_ms: 0,
            seq: 0,
            next_version: vec![1; AGGREGATES as usize],
            sent: vec![Vec::new(); AGGREGATES as usize],
            held: Vec::new(),
            history: History::default(),
        }
    }

    fn next_id(&mut self) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if now > self.last_ms {
            (self.last_ms, self.seq) = (now, 0);
        } else {
            self.seq += 1;
        }
        format!("{}-{}", self.last_ms, self.seq)
    }

    /// One step of the history: a few bodies for random aggregates.
    fn step(&mut self) -> Vec<String> {
        let mut bodies = Vec::new();
        let a = self.rng.random_range(0..AGGREGATES) as usize;
        let id = format!("a{a}");
        let v = self.next_version[a];
        let roll = self.rng.random_range(0..100);
        let fresh = |me: &mut Producer, version: u64, deleted: bool| {
            let body = if deleted {
                delete_body(&id, version)
            } else {
                update_body(&id, version)
            };
            me.history.note(&id, version, deleted);
            me.sent[a].push(body.clone());
            body
        };
        match roll {
            // A newer version, sometimes skipping one (versions need not be dense).
            0..65 => {
                let version = v + u64::from(self.rng.random_bool(0.1));
                self.next_version[a] = version + 1;
                bodies.push(fresh(self, version, false));
            }
            65..75 => {
                self.next_version[a] = v + 1;
                bodies.push(fresh(self, v, true));
            }
            // Out of order: v+1 now, v later.
            75..85 => {
                self.next_version[a] = v + 2;
                bodies.push(fresh(self, v + 1, false));
                let late_is_delete = self.rng.random_bool(0.3);
                let late = fresh(self, v, late_is_delete);
                self.held.push(late);
            }
            // A duplicate or stale replay of anything sent before (after a delete, too).
            85..97 if !self.sent[a].is_empty() => {
                let i = self.rng.random_range(0..self.sent[a].len());
                bodies.push(self.sent[a][i].clone());
            }
            _ => {}
        }
        if !self.held.is_empty() && self.rng.random_bool(0.2) {
            let i = self.rng.random_range(0..self.held.len());
            bodies.push(self.held.swap_remove(i));
        }
        bodies
    }

    /// Publishes a chunk of entries: (body, poison) with fresh ids; retries until all are in.
    fn publish(&mut self, bodies: Vec<(String, bool)>) {
        let mut entries: Vec<(String, String)> = Vec::with_capacity(bodies.len());
        for (body, poison) in bodies {
            let entry_id = self.next_id();
            if poison {
                self.history.poison.insert(entry_id.clone());
            }
            entries.push((entry_id, body));
        }
        self.history.events += entries.len();
        let mut attempt = 0u32;
        while !entries.is_empty() {
            attempt += 1;
            assert!(
                attempt < 10_000,
                "the producer could not publish for a long time"
            );
            let Some(conn) = self.connection() else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let mut pipe = redis::pipe();
            for (entry_id, body) in &entries {
                pipe.cmd("XADD")
                    .arg(STREAM)
                    .arg(entry_id)
                    .arg("v")
                    .arg(body)
                    .ignore();
            }
            if pipe.query::<()>(conn).is_ok() {
                return;
            }
            // The reply is lost, not necessarily the writes: keep what is not in yet.
            self.conn = None;
            let Some(last) = self.last_generated_id() else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            entries.retain(|(entry_id, _)| id_pair(entry_id) > id_pair(&last));
        }
    }

    fn connection(&mut self) -> Option<&mut redis::Connection> {
        if self.conn.is_none() {
            let conn = redis::Client::open(self.url.as_str())
                .ok()?
                .get_connection_with_timeout(Duration::from_secs(1))
                .ok()?;
            conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            conn.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
            self.conn = Some(conn);
        }
        self.conn.as_mut()
    }

    fn last_generated_id(&mut self) -> Option<String> {
        let conn = self.connection()?;
        let info: Result<HashMap<String, redis::Value>, _> =
            redis::cmd("XINFO").arg("STREAM").arg(STREAM).query(conn);
        match info {
            Ok(info) => match info.get("last-generated-id") {
                Some(value) => redis::from_redis_value::<String>(value.clone()).ok(),
                None => None,
            },
            Err(_) => {
                self.conn = None;
                None
            }
        }
    }

    /// Produces until `stop`, then sends what was held back; returns the history.
    fn run(mut self, stop: Arc<AtomicBool>) -> History {
        while !stop.load(Ordering::SeqCst) {
            let mut chunk = Vec::new();
            for _ in 0..10 {
                chunk.extend(self.step().into_iter().map(|b| (b, false)));
                if self.rng.random_bool(0.02) {
                    let n = self.history.poison.len();
                    chunk.push((format!("{{\"aggregateId\": \"a1\", broken {n}"), true));
                }
            }
            self.publish(chunk);
            // Paces the history over the run (about 200 entries a second).
            std::thread::sleep(Duration::from_millis(50));
        }
        let held: Vec<(String, bool)> = std::mem::take(&mut self.held)
            .into_iter()
            .map(|b| (b, false))
            .collect();
        self.publish(held);
        self.history
    }
}

fn id_pair(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Faults injected, by kind.
#[derive(Default)]
struct Faults {
    kill_worker: u32,
    redis_kill: u32,
    pg_restart: u32,
    redis_pause: u32,
    trim: u32,
    trimmed_entries: u64,
}

impl Faults {
    fn total(&self) -> u32 {
        self.kill_worker + self.redis_kill + self.pg_restart + self.redis_pause + self.trim
    }
}

/// The workers, each restartable under its consumer name; logs of every run are kept.
struct Workers {
    file: PathBuf,
    redis_url: String,
    logs_dir: PathBuf,
    running: Vec<Worker>,
    names: Vec<String>,
    runs: usize,
    exits: Vec<String>,
}

impl Workers {
    fn start(&mut self, index: usize) -> Worker {
        let mut cmd = ecst();
        cmd.env("REDIS_URL", &self.redis_url)
            .arg("run")
            .arg(&self.file)
            .args(["--consumer", &self.names[index]]);
        self.runs += 1;
        Worker::spawn(cmd)
    }

    fn keep_log(&self, index: usize, worker: &Worker) {
        let path = self
            .logs_dir
            .join(format!("{}-run{}.log", self.names[index], self.runs));
        let _ = std::fs::write(path, worker.log());
    }

    fn kill_and_restart(&mut self, index: usize, rng: &mut StdRng) {
        self.running[index].kill_9();
        self.keep_log(index, &self.running[index]);
        // Half the time it comes back as itself (its own pending entries to re-read), half
        // the time as a new consumer (the dead one's entries must be claimed).
        if rng.random_bool(0.5) {
            self.names[index] = format!("w{index}-{}", self.runs);
        }
        let worker = self.start(index);
        self.running[index] = worker;
    }

    /// A worker that exited without being killed is a finding: its log is kept and it is
    /// restarted, as a supervisor would.
    fn check_alive(&mut self) {
        for index in 0..self.running.len() {
            if let Some(status) = self.running[index].child.try_wait().expect("try_wait") {
                self.exits.push(format!(
                    "{} exited by itself with {status:?}; last lines:\n{}",
                    self.names[index],
                    tail(&self.running[index].log(), 15)
                ));
                self.keep_log(index, &self.running[index]);
                let worker = self.start(index);
                self.running[index] = worker;
            }
        }
    }
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Trims entries below both the group's oldest pending entry and its last-delivered id:
/// acknowledged entries only. Returns how many went.
fn trim_acknowledged(conn: &mut redis::Connection) -> redis::RedisResult<u64> {
    let delivered = last_delivered(conn)?;
    let oldest_pending: redis::Value = redis::cmd("XPENDING")
        .arg(STREAM)
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(1)
        .query(conn)?;
    let mut min_id = delivered;
    if let redis::Value::Array(items) = oldest_pending
        && let Some(redis::Value::Array(first)) = items.first()
        && let Some(value) = first.first()
    {
        let pending: String = redis::from_redis_value(value.clone())?;
        if id_pair(&pending) < id_pair(&min_id) {
            min_id = pending;
        }
    }
    redis::cmd("XTRIM")
        .arg(STREAM)
        .arg("MINID")
        .arg(&min_id)
        .query(conn)
}

fn last_delivered(conn: &mut redis::Connection) -> redis::RedisResult<String> {
    let groups: Vec<HashMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("GROUPS").arg(STREAM).query(conn)?;
    let group = groups
        .iter()
        .find(
            |g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == GROUP.as_bytes()),
        )
        .and_then(|g| g.get("last-delivered-id").cloned());
    match group {
        Some(id) => Ok(redis::from_redis_value(id)?),
        None => Ok("0-0".into()),
    }
}

/// Entries not yet delivered to the group plus entries delivered and not acknowledged.
fn unfinished(conn: &mut redis::Connection) -> redis::RedisResult<u64> {
    let delivered = last_delivered(conn)?;
    let undelivered: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(STREAM)
        .arg(format!("({delivered}"))
        .arg("+")
        .query(conn)?;
    let pending: redis::Value = redis::cmd("XPENDING").arg(STREAM).arg(GROUP).query(conn)?;
    let pending = match pending {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    };
    Ok(undelivered.len() as u64 + pending)
}

/// What the checker found.
#[derive(Default)]
struct Verdict {
    lost: Vec<String>,
    resurrected: Vec<String>,
    stuck: u64,
    wrong: Vec<String>,
    dead_letter_dupes: Vec<String>,
}

fn check(
    history: &History,
    conn: &mut redis::Connection,
    pg: &postgres_client::Client,
    stuck: u64,
) -> Verdict {
    let mut verdict = Verdict {
        stuck,
        ..Verdict::default()
    };
    let rows: HashMap<String, (i64, Option<String>)> = pg
        .query(
            &format!("SELECT athlete_id, source_version, display_name FROM {TABLE}"),
            &[],
        )
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let pg_tombs: HashMap<String, i64> = pg
        .query(
            &format!("SELECT athlete_id, source_version FROM {TABLE}_tombstones"),
            &[],
        )
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut ids: Vec<&String> = history.last.keys().collect();
    ids.sort();
    for id in ids {
        let (version, deleted) = history.last[id];
        let card = hash(conn, &format!("athlete:{id}"));
        let cached = card.get("_version").and_then(|v| v.parse::<u64>().ok());
        let row = rows.get(id.as_str());
        let name = format!("{id} v{version}");
        if deleted {
            let tomb: Option<u64> = conn.get(format!("tomb:athlete:{id}")).expect("GET");
            for (store, present, seen) in [
                ("redis", cached.is_some(), cached),
                ("postgres", row.is_some(), row.map(|r| r.0 as u64)),
            ] {
                if present {
                    verdict.resurrected.push(format!(
                        "{store} {id}: deleted at v{version}, replica at v{seen:?}"
                    ));
                }
            }
            if tomb != Some(version) {
                verdict.wrong.push(format!(
                    "redis {id}: tombstone {tomb:?}, deleted at v{version}"
                ));
            }
            let pg_tomb = pg_tombs.get(id.as_str()).map(|v| *v as u64);
            if pg_tomb != Some(version) {
                verdict.wrong.push(format!(
                    "postgres {id}: tombstone {pg_tomb:?}, deleted at v{version}"
                ));
            }
            continue;
        }
        match cached {
            Some(v) if v == version && card.get("display_name") == Some(&name) => {}
            Some(v) if v > version => verdict
                .wrong
                .push(format!("redis {id}: v{v}, the source's last is v{version}")),
            Some(v) if v == version => verdict
                .wrong
                .push(format!("redis {id}: v{v} holds {card:?}")),
            seen => verdict.lost.push(format!(
                "redis {id}: at {seen:?}, the source's last is v{version}"
            )),
        }
        match row {
            Some((v, n)) if *v as u64 == version && n.as_ref() == Some(&name) => {}
            Some((v, _)) if *v as u64 > version => verdict.wrong.push(format!(
                "postgres {id}: v{v}, the source's last is v{version}"
            )),
            Some((v, n)) if *v as u64 == version => verdict
                .wrong
                .push(format!("postgres {id}: v{v} holds {n:?}")),
            seen => verdict.lost.push(format!(
                "postgres {id}: at {:?}, the source's last is v{version}",
                seen.map(|r| r.0)
            )),
        }
    }
    for id in rows.keys() {
        if !history.last.contains_key(id) {
            verdict
                .wrong
                .push(format!("postgres {id}: a row the source never had"));
        }
    }

    let mut dead: HashMap<String, usize> = HashMap::new();
    for entry in dead_letters(conn, DEAD_LETTER) {
        let source_id = entry.get("source_id").cloned().unwrap_or_default();
        *dead.entry(source_id).or_default() += 1;
    }
    for poison in &history.poison {
        match dead.get(poison) {
            None => verdict
                .lost
                .push(format!("poison {poison}: not in the dead letters")),
            Some(1) => {}
            Some(n) => verdict
                .dead_letter_dupes
                .push(format!("poison {poison}: dead-lettered {n} times")),
        }
    }
    for (source_id, n) in &dead {
        if !history.poison.contains(source_id) {
            verdict.wrong.push(format!(
                "entry {source_id}: a good event dead-lettered {n} times"
            ));
        }
    }
    verdict
}

fn sample(items: &[String]) -> String {
    items.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
}

#[test]
fn chaos_run_loses_nothing_resurrects_nothing_and_dead_letters_poison_once() {
    let seed = chaos_seed();
    let secs = chaos_secs();
    eprintln!("chaos: seed={seed} secs={secs} (replay with ECST_CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut redis_server = PrivateRedis::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut pg = PrivatePostgres::start();
    let logs_dir = std::env::temp_dir().join(format!("ecst-chaos-{seed}"));
    std::fs::create_dir_all(&logs_dir).expect("logs dir");

    let mut conn = redis_server.conn();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut conn)
        .expect("XGROUP CREATE");
    let file = pipeline_file("chaos", &pipeline(&redis_server.url(), &pg.url()));
    let mut workers = Workers {
        file,
        redis_url: redis_server.url(),
        logs_dir: logs_dir.clone(),
        running: Vec::new(),
        names: (0..WORKERS).map(|i| format!("w{i}")).collect(),
        runs: 0,
        exits: Vec::new(),
    };
    for index in 0..WORKERS {
        let worker = workers.start(index);
        workers.running.push(worker);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (url, stop) = (redis_server.url(), stop.clone());
        let producer_seed = rng.random();
        std::thread::spawn(move || Producer::new(url, producer_seed).run(stop))
    };

    let mut faults = Faults::default();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        // Pacing between faults, drawn from the seed; the faults themselves are waited on.
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
        workers.check_alive();
        match rng.random_range(0..100) {
            0..30 => {
                let index = rng.random_range(0..WORKERS);
                workers.kill_and_restart(index, &mut rng);
                faults.kill_worker += 1;
            }
            30..45 => {
                redis_server.kill_9();
                std::thread::sleep(Duration::from_millis(rng.random_range(0..1000)));
                redis_server.restart();
                faults.redis_kill += 1;
            }
            45..60 => {
                pg.stop_immediate();
                std::thread::sleep(Duration::from_millis(rng.random_range(200..2000)));
                pg.start_again();
                faults.pg_restart += 1;
            }
            60..80 => {
                redis_server.pause();
                std::thread::sleep(Duration::from_millis(rng.random_range(200..3000)));
                redis_server.resume();
                faults.redis_pause += 1;
            }
            _ => {
                if let Ok(n) = trim_acknowledged(&mut redis_server.conn()) {
                    faults.trimmed_entries += n;
                    faults.trim += 1;
                }
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let history = producer.join().expect("the producer");
    workers.check_alive();

    // Drain: nothing left undelivered or pending, within a deadline.
    let mut conn = redis_server.conn();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut stuck = unfinished(&mut conn).expect("group state");
    while stuck > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        workers.check_alive();
        stuck = unfinished(&mut conn).expect("group state");
    }
    let pg_client = postgres_client::Client::connect(&pg.url());
    let verdict = check(&history, &mut conn, &pg_client, stuck);

    println!(
        "chaos: seed={seed} faults={} (kill_worker={} redis_kill={} pg_restart={} redis_pause={} trim={}) events={} lost={} resurrected={} stuck={} wrong={} dead_letter_dupes={}",
        faults.total(),
        faults.kill_worker,
        faults.redis_kill,
        faults.pg_restart,
        faults.redis_pause,
        faults.trim,
        history.events,
        verdict.lost.len(),
        verdict.resurrected.len(),
        verdict.stuck,
        verdict.wrong.len(),
        verdict.dead_letter_dupes.len(),
    );
    eprintln!(
        "chaos: {} acknowledged entries trimmed, {} poison entries, {} worker runs, logs in {}",
        faults.trimmed_entries,
        history.poison.len(),
        workers.runs,
        logs_dir.display()
    );

    let mut statuses = Vec::new();
    for (index, worker) in std::mem::take(&mut workers.running).into_iter().enumerate() {
        let (status, log) = worker.terminate();
        let _ = std::fs::write(
            logs_dir.join(format!("{}-final.log", workers.names[index])),
            &log,
        );
        statuses.push((workers.names[index].clone(), status, tail(&log, 15)));
    }
    let failed = !verdict.lost.is_empty()
        || !verdict.resurrected.is_empty()
        || verdict.stuck > 0
        || !verdict.wrong.is_empty()
        || !verdict.dead_letter_dupes.is_empty();
    assert!(
        !failed,
        "chaos run failed (replay with ECST_CHAOS_SEED={seed}; worker logs in {}):\nlost: {}\nresurrected: {}\nstuck: {}\nwrong: {}\ndead-letter dupes: {}",
        logs_dir.display(),
        sample(&verdict.lost),
        sample(&verdict.resurrected),
        verdict.stuck,
        sample(&verdict.wrong),
        sample(&verdict.dead_letter_dupes),
    );
    assert!(
        workers.exits.is_empty(),
        "workers exited without being killed (seed {seed}):\n{}",
        workers.exits.join("\n")
    );
    for (name, status, tail) in statuses {
        assert!(
            status.success(),
            "{name} did not stop cleanly on SIGTERM: {status:?}\n{tail}"
        );
    }
    assert!(
        faults.total() > 0 && history.events > 0,
        "nothing was tested"
    );
    let _ = std::fs::remove_dir_all(&logs_dir);
}

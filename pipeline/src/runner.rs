//! The run loop: read a batch, push it through the DAG, apply every sink's share, dead-letter
//! what cannot be applied, and XACK the batch only once all of that committed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ecst_operators::redis_pool::{RedisPool, describe_run_error, redis_pool};
use ecst_operators::{
    BuildContext, BuiltStage, Outcomes, RawEntry, Record, Sink, SinkError, SinkReport, Stage,
};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::config::PipelineConfig;
use crate::metrics::{GroupStats, Histogram, SinkStats, StageStats, now_ms, reason_class};
use crate::source::{Origin, SourceBatch, StreamSource, parse_id};

/// Counters of one worker, shared with the benchmark and the metrics endpoint.
#[derive(Debug)]
pub struct Stats {
    /// Entries read from the stream.
    pub read: AtomicU64,
    /// Records written by sinks.
    pub applied: AtomicU64,
    /// Records dropped as not newer (by `version_filter` or a store guard).
    pub stale: AtomicU64,
    /// Records dropped as not newer by `version_filter`.
    pub stale_filtered: AtomicU64,
    /// Records dropped by `where:` or `tombstone mode: ignore`.
    pub filtered: AtomicU64,
    /// Entries sent to the dead-letter stream.
    pub dead_lettered: AtomicU64,
    /// Entries acknowledged.
    pub acked: AtomicU64,
    /// Sink, dead-letter or ack attempts that failed and were retried.
    pub retries: AtomicU64,
    /// Sinks currently failing (in backoff).
    pub failing_sinks: AtomicUsize,
    /// A bootstrap is running (here, or in another worker this one waits for).
    pub bootstrapping: AtomicBool,
    /// Snapshot rows applied by bootstraps.
    pub bootstrap_rows: AtomicU64,
    /// The group missed entries that are gone from the stream, and no bootstrap fixed it yet.
    pub retention_gap: AtomicBool,
    /// Retention gaps detected.
    pub gaps_detected: AtomicU64,
    /// The last read from the stream succeeded.
    pub source_connected: AtomicBool,
    /// Entries per batch read.
    pub batch_size: Histogram,
    /// The consumer group, as last read.
    pub group: GroupStats,
    sinks: OnceLock<Vec<SinkStats>>,
    stages: OnceLock<Vec<StageStats>>,
    dead_letter_reasons: Mutex<BTreeMap<&'static str, u64>>,
    latencies_ms: Mutex<Option<Vec<u32>>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            read: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            stale_filtered: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            failing_sinks: AtomicUsize::new(0),
            bootstrapping: AtomicBool::new(false),
            bootstrap_rows: AtomicU64::new(0),
            retention_gap: AtomicBool::new(false),
            gaps_detected: AtomicU64::new(0),
            source_connected: AtomicBool::new(false),
            batch_size: Histogram::batch_size(),
            group: GroupStats::default(),
            sinks: OnceLock::new(),
            stages: OnceLock::new(),
            dead_letter_reasons: Mutex::new(BTreeMap::new()),
            latencies_ms: Mutex::new(None),
        }
    }
}

impl Stats {
    /// Per-sink counters, in the DAG's sink order (empty before the worker built its DAG).
    pub fn sinks(&self) -> &[SinkStats] {
        self.sinks.get().map_or(&[], Vec::as_slice)
    }

    /// Per-stage timings (empty before the worker built its DAG).
    pub fn stages(&self) -> &[StageStats] {
        self.stages.get().map_or(&[], Vec::as_slice)
    }

    /// Dead letters by reason class.
    pub fn dead_letter_reasons(&self) -> Vec<(&'static str, u64)> {
        self.dead_letter_reasons
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    fn count_dead_letter(&self, reason: &str) {
        if let Ok(mut m) = self.dead_letter_reasons.lock() {
            *m.entry(reason_class(reason)).or_default() += 1;
        }
    }

    /// Starts recording, per acked entry, the time from its XADD (its id) to its ack.
    pub fn record_latencies(&self) {
        if let Ok(mut guard) = self.latencies_ms.lock() {
            *guard = Some(Vec::new());
        }
    }

    /// Takes the recorded latencies, in milliseconds.
    pub fn take_latencies(&self) -> Vec<u32> {
        self.latencies_ms
            .lock()
            .ok()
            .and_then(|mut guard| guard.as_mut().map(std::mem::take))
            .unwrap_or_default()
    }

    fn note_latencies(&self, ids: &[String]) {
        let Ok(mut guard) = self.latencies_ms.lock() else {
            return;
        };
        let Some(samples) = guard.as_mut() else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        samples.extend(
            ids.iter()
                .map(|id| u32::try_from(now.saturating_sub(parse_id(id).0)).unwrap_or(u32::MAX)),
        );
    }
}

/// How `run` behaves.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Exit once nothing is left to read and nothing is pending in the group.
    pub drain: bool,
    /// Bootstrap from the snapshot now, whatever the group's state, then exit.
    pub bootstrap_only: bool,
}

/// A run ended badly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A stage failed to build.
    #[error(transparent)]
    Build(#[from] ecst_operators::BuildError),
    /// The configuration cannot run (e.g. an invalid Redis URL).
    #[error("{0}")]
    Config(String),
    /// Shutdown came before the bootstrap finished.
    #[error("the bootstrap was interrupted; its progress is kept and the next start resumes it")]
    BootstrapInterrupted,
    /// The group missed entries that are gone from the stream.
    #[error(
        "retention gap: {0}. The replica has missed events. Configure `bootstrap:` (with on_gap: bootstrap) or run `ecst bootstrap`; to accept the loss instead, move the group past it with XGROUP SETID."
    )]
    RetentionGap(String),
    /// Batches were still uncommitted when the shutdown timeout ran out.
    #[error(
        "{0} batch(es) were not committed within the shutdown timeout; their entries stay pending and will be redelivered"
    )]
    Abandoned(usize),
}

enum Node {
    Transform(Box<dyn Stage>),
    Sink(usize),
}

pub(crate) struct Dag {
    stats: Arc<Stats>,
    /// Index into `stats.stages()` of each transform node.
    stage_slots: Vec<Option<usize>>,
    order: Vec<usize>,
    nodes: Vec<Node>,
    inputs: Vec<Vec<usize>>,
    readers: Vec<usize>,
    sinks: Vec<(String, Arc<dyn Sink>)>,
}

impl Dag {
    /// Builds every stage and sink of the pipeline.
    pub(crate) async fn build(
        config: &PipelineConfig,
        stats: Arc<Stats>,
    ) -> Result<Self, RunError> {
        let nodes_view = config.graph_nodes();
        let order = crate::graph::topo_order(&nodes_view)
            .ok_or_else(|| RunError::Config("the stage graph has a cycle".into()))?;
        let index: HashMap<&str, usize> = config
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut nodes = Vec::new();
        let mut sinks = Vec::new();
        let mut inputs = Vec::new();
        let mut readers = vec![0usize; config.stages.len()];
        for stage in &config.stages {
            let ctx = BuildContext {
                pipeline: config.name.clone(),
                stage: stage.name.clone(),
                source_redis: config.source.redis.clone(),
            };
            nodes.push(match stage.config.build(&ctx).await? {
                BuiltStage::Stage(s) => Node::Transform(s),
                BuiltStage::Sink(s) => {
                    sinks.push((stage.name.clone(), s));
                    Node::Sink(sinks.len() - 1)
                }
            });
            let ins: Vec<usize> = stage
                .inputs
                .iter()
                .filter_map(|n| index.get(n.as_str()).copied())
                .collect();
            for i in &ins {
                readers[*i] += 1;
            }
            inputs.push(ins);
        }
        let mut stage_slots = Vec::with_capacity(nodes.len());
        let mut stage_stats = Vec::new();
        for (node, stage) in nodes.iter().zip(&config.stages) {
            stage_slots.push(match node {
                Node::Transform(_) => {
                    stage_stats.push(StageStats {
                        name: stage.name.clone(),
                        duration: Histogram::latency(),
                    });
                    Some(stage_stats.len() - 1)
                }
                Node::Sink(_) => None,
            });
        }
        let _ = stats.stages.set(stage_stats);
        let _ = stats
            .sinks
            .set(sinks.iter().map(|(name, _)| SinkStats::new(name)).collect());
        Ok(Dag {
            stats,
            stage_slots,
            order,
            nodes,
            inputs,
            readers,
            sinks,
        })
    }

    /// Forgets every stage's memory of earlier batches.
    pub(crate) fn reset(&mut self) {
        for node in &mut self.nodes {
            if let Node::Transform(stage) = node {
                stage.reset();
            }
        }
    }

    /// The sinks, by stage name.
    pub(crate) fn sinks(&self) -> &[(String, Arc<dyn Sink>)] {
        &self.sinks
    }

    /// Runs the transforms over a batch; returns each sink's records.
    fn run(&mut self, entries: &[RawEntry], out: &mut Outcomes) -> Vec<Vec<Record>> {
        self.run_from(entries, None, out)
    }

    /// Runs a batch whose records are already decoded (snapshot rows): they stand in for the
    /// output of the root stages.
    pub(crate) fn run_decoded(
        &mut self,
        entries: &[RawEntry],
        records: Vec<Record>,
        out: &mut Outcomes,
    ) -> Vec<Vec<Record>> {
        self.run_from(entries, Some(records), out)
    }

    fn run_from(
        &mut self,
        entries: &[RawEntry],
        decoded: Option<Vec<Record>>,
        out: &mut Outcomes,
    ) -> Vec<Vec<Record>> {
        let mut outputs: Vec<Option<Vec<Record>>> = (0..self.nodes.len()).map(|_| None).collect();
        let mut remaining = self.readers.clone();
        let mut per_sink: Vec<Vec<Record>> = (0..self.sinks.len()).map(|_| Vec::new()).collect();
        for &i in &self.order {
            let mut input = Vec::new();
            for &from in &self.inputs[i] {
                remaining[from] -= 1;
                let records = if remaining[from] == 0 {
                    outputs[from].take().unwrap_or_default()
                } else {
                    outputs[from].clone().unwrap_or_default()
                };
                input.extend(records);
            }
            match &mut self.nodes[i] {
                Node::Transform(_) if self.inputs[i].is_empty() && decoded.is_some() => {
                    outputs[i] = decoded.clone();
                }
                Node::Transform(stage) => {
                    let timing = self.stage_slots[i].and_then(|slot| self.stats.stages().get(slot));
                    let _span = tracing::info_span!(
                        "ecst.stage",
                        ecst.stage = timing.map_or("", |s| s.name.as_str()),
                        ecst.records = input.len()
                    )
                    .entered();
                    let started = Instant::now();
                    outputs[i] = Some(stage.process(input, entries, out));
                    if let Some(s) = timing {
                        s.duration.observe(started.elapsed().as_secs_f64());
                    }
                }
                Node::Sink(s) => per_sink[*s] = input,
            }
        }
        per_sink
    }
}

/// Everything a batch task needs after the transforms ran.
pub(crate) struct Shared {
    pub(crate) pipeline: String,
    pub(crate) stream: String,
    pub(crate) group: String,
    pub(crate) consumer: String,
    dead_letter: String,
    dead_letter_maxlen: u64,
    timeout: Duration,
    pub(crate) pool: RedisPool,
    sinks: Vec<(String, Arc<dyn Sink>)>,
    pub(crate) stats: Arc<Stats>,
}

pub(crate) struct Batch {
    pub(crate) entries: Vec<RawEntry>,
    pub(crate) per_sink: Vec<Vec<Record>>,
    pub(crate) outcomes: Outcomes,
    pub(crate) extra_dead: Vec<(RawEntry, String)>,
    /// Ids XAUTOCLAIM found trimmed while pending; Redis already took them out of the group.
    pub(crate) trimmed: Vec<RawEntry>,
    /// False for snapshot rows, which are not stream entries.
    pub(crate) ack: bool,
}

/// Capped exponential backoff with jitter: 100ms, 200ms, ... up to 5s.
pub fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1u64 << attempt.min(6)).min(5_000);
    let jitter = rand::random_range(0..=base / 4);
    Duration::from_millis(base - base / 8 + jitter)
}

async fn apply_with_retry(shared: &Shared, sink_index: usize, records: &[Record]) -> SinkReport {
    let started = Instant::now();
    let report = apply_until_committed(shared, sink_index, records).await;
    if let Some(s) = shared.stats.sinks().get(sink_index) {
        let now = now_ms();
        s.apply_duration.observe(started.elapsed().as_secs_f64());
        s.applied
            .fetch_add(report.applied as u64, Ordering::Relaxed);
        s.stale.fetch_add(report.stale as u64, Ordering::Relaxed);
        s.last_apply_ms.store(now, Ordering::Relaxed);
        let mut newest = None;
        for record in records {
            if let Some(at) = record.event.occurred_at {
                let at_ms = i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
                s.apply_lag.observe((now - at_ms) as f64 / 1000.0);
                newest = newest.max(Some(at_ms));
            }
        }
        if let Some(newest) = newest {
            s.newest_source_ms.fetch_max(newest, Ordering::Relaxed);
            s.last_lag_ms.store(now - newest, Ordering::Relaxed);
        }
    }
    report
}

fn set_failing(shared: &Shared, sink_index: usize, failing: bool) {
    if failing {
        shared.stats.failing_sinks.fetch_add(1, Ordering::Relaxed);
    } else {
        shared.stats.failing_sinks.fetch_sub(1, Ordering::Relaxed);
    }
    if let Some(s) = shared.stats.sinks().get(sink_index) {
        s.failing.store(failing, Ordering::Relaxed);
    }
}

async fn apply_until_committed(
    shared: &Shared,
    sink_index: usize,
    records: &[Record],
) -> SinkReport {
    let (name, sink) = &shared.sinks[sink_index];
    let mut attempt = 0u32;
    let mut failing = false;
    loop {
        match sink.apply_batch(records).await {
            Ok(report) => {
                if failing {
                    set_failing(shared, sink_index, false);
                    tracing::info!(pipeline = %shared.pipeline, sink = %name, attempts = attempt + 1, "Sink recovered; batch committed.");
                }
                return report;
            }
            Err(e) => {
                if matches!(e, SinkError::Refused { .. })
                    && records.len() > 1
                    && let Some(report) = isolate_refused(shared, sink_index, records).await
                {
                    if failing {
                        set_failing(shared, sink_index, false);
                    }
                    return report;
                }
                if !failing {
                    failing = true;
                    set_failing(shared, sink_index, true);
                }
                shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                let wait = backoff(attempt);
                tracing::warn!(pipeline = %shared.pipeline, sink = %name, attempt = attempt + 1, retry_in_ms = wait.as_millis() as u64, error = %e, "Sink failed to apply a batch; nothing acked, retrying.");
                tokio::time::sleep(wait).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// The store refused a whole batch: applies its records one at a time so that the ones it
/// refuses are dead-lettered and the rest commit. When every record is refused the cause is
/// not in the data (a dropped table, a permission) and `None` sends the batch back to retry,
/// loudly, rather than dead-letter the whole stream.
async fn isolate_refused(
    shared: &Shared,
    sink_index: usize,
    records: &[Record],
) -> Option<SinkReport> {
    let (name, sink) = &shared.sinks[sink_index];
    let mut merged = SinkReport::default();
    let mut refused = Vec::new();
    for record in records {
        match sink.apply_batch(std::slice::from_ref(record)).await {
            Ok(report) => {
                merged.applied += report.applied;
                merged.stale += report.stale;
                merged.rejected.extend(report.rejected);
            }
            Err(SinkError::Refused { message, .. }) => refused.push((record.entry, message)),
            // The store went away meanwhile: retry the whole batch (repeats are harmless).
            Err(_) => return None,
        }
    }
    if refused.len() == records.len() {
        return None;
    }
    tracing::warn!(pipeline = %shared.pipeline, sink = %name, refused = refused.len(), "The store refused some records of a batch; dead-lettering them and committing the rest.");
    merged.rejected.extend(
        refused
            .into_iter()
            .map(|(entry, message)| (entry, format!("refused by the store: {message}"))),
    );
    Some(merged)
}

/// Runs a pipeline on the shared pool until it succeeds.
async fn with_redis_retry(shared: &Shared, what: &str, pipe: &redis::Pipeline) {
    let mut attempt = 0u32;
    loop {
        let result = match shared.pool.get().await {
            Ok(mut conn) => {
                conn.begin();
                match tokio::time::timeout(shared.timeout, pipe.query_async::<()>(conn.conn()))
                    .await
                {
                    Ok(r) => {
                        conn.settle(&r);
                        r.map_err(|e| e.to_string())
                    }
                    Err(_) => Err("timed out".to_string()),
                }
            }
            Err(e) => Err(describe_run_error(e)),
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                let wait = backoff(attempt);
                tracing::warn!(pipeline = %shared.pipeline, attempt = attempt + 1, retry_in_ms = wait.as_millis() as u64, error = %e, "{what} failed; retrying.");
                tokio::time::sleep(wait).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

pub(crate) async fn complete(shared: Arc<Shared>, batch: Batch) {
    let Batch {
        entries,
        per_sink,
        mut outcomes,
        extra_dead,
        trimmed,
        ack,
    } = batch;
    let applies = per_sink
        .iter()
        .enumerate()
        .filter(|(_, records)| !records.is_empty())
        .map(|(i, records)| {
            let shared = &shared;
            let span = tracing::info_span!(
                "ecst.sink.apply",
                ecst.sink = %shared.sinks[i].0,
                ecst.records = records.len()
            );
            async move { (i, apply_with_retry(shared, i, records).await) }.instrument(span)
        });
    let reports = futures::future::join_all(applies).await;

    let stats = &shared.stats;
    // (entry, reason, still pending in the group: acked together with its dead letter)
    let mut dead: Vec<(&RawEntry, String, bool)> = Vec::new();
    for (i, report) in reports {
        stats
            .applied
            .fetch_add(report.applied as u64, Ordering::Relaxed);
        stats
            .stale
            .fetch_add(report.stale as u64, Ordering::Relaxed);
        for (entry, reason) in report.rejected {
            outcomes.dead_letter(entry, format!("sink `{}`: {reason}", shared.sinks[i].0));
        }
    }
    for (entry, reason) in &outcomes.dead_letters {
        if let Some(raw) = entries.get(*entry) {
            dead.push((raw, reason.clone(), ack));
        }
    }
    for (raw, reason) in &extra_dead {
        dead.push((raw, reason.clone(), ack));
    }
    for raw in &trimmed {
        dead.push((raw, "trimmed before applied".into(), false));
    }
    for (_, reason) in &outcomes.dropped {
        match reason {
            ecst_operators::DropReason::Stale => {
                stats.stale_filtered.fetch_add(1, Ordering::Relaxed);
                stats.stale.fetch_add(1, Ordering::Relaxed)
            }
            _ => stats.filtered.fetch_add(1, Ordering::Relaxed),
        };
    }

    if !dead.is_empty() {
        for (raw, reason, _) in &dead {
            stats.count_dead_letter(reason);
            tracing::warn!(pipeline = %shared.pipeline, stream = %shared.stream, entry_id = %raw.id, reason = %reason, dead_letter = %shared.dead_letter, "Entry dead-lettered.");
        }
        let mut pipe = redis::pipe();
        for (raw, reason, pending) in &dead {
            pipe.add_command(dead_letter_cmd(&shared, raw, reason, *pending))
                .ignore();
        }
        with_redis_retry(&shared, "Writing to the dead-letter stream", &pipe)
            .instrument(tracing::info_span!(
                "ecst.dead_letter",
                ecst.entries = dead.len()
            ))
            .await;
        stats
            .dead_lettered
            .fetch_add(dead.len() as u64, Ordering::Relaxed);
    }

    let mut ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    ids.extend(extra_dead.iter().map(|(e, _)| e.id.clone()));
    ids.extend(trimmed.iter().map(|e| e.id.clone()));
    if ack && !ids.is_empty() {
        let mut pipe = redis::pipe();
        pipe.cmd("XACK")
            .arg(&shared.stream)
            .arg(&shared.group)
            .arg(&ids)
            .ignore();
        with_redis_retry(&shared, "XACK", &pipe)
            .instrument(tracing::info_span!(
                "ecst.ack",
                messaging.batch.message_count = ids.len()
            ))
            .await;
        stats.acked.fetch_add(ids.len() as u64, Ordering::Relaxed);
        stats.note_latencies(&ids);
    }
}

/// Acks a stream entry and writes its dead letter in one atomic step, only if the entry was
/// still pending: a retry after a lost reply, a crash between the two writes, or a second
/// consumer that claimed the same entry can then never write a second dead letter.
/// KEYS: stream, dead-letter stream; ARGV: group, entry id, MAXLEN, then the fields.
const ACK_AND_DEAD_LETTER: &str = "if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then \
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4)) return 1 end return 0";

/// The dead letter of `raw`: acked with it if it is `pending` in the group, a plain XADD
/// otherwise (snapshot rows, entries Redis already dropped from the group).
fn dead_letter_cmd(shared: &Shared, raw: &RawEntry, reason: &str, pending: bool) -> redis::Cmd {
    let mut cmd;
    if pending {
        cmd = redis::cmd("EVAL");
        cmd.arg(ACK_AND_DEAD_LETTER)
            .arg(2)
            .arg(&shared.stream)
            .arg(&shared.dead_letter)
            .arg(&shared.group)
            .arg(&raw.id)
            .arg(shared.dead_letter_maxlen);
    } else {
        cmd = redis::cmd("XADD");
        cmd.arg(&shared.dead_letter)
            .arg("MAXLEN")
            .arg("~")
            .arg(shared.dead_letter_maxlen)
            .arg("*");
    }
    for (k, v) in &raw.fields {
        cmd.arg(k).arg(v.as_slice());
    }
    cmd.arg("error")
        .arg(reason)
        .arg("source_stream")
        .arg(&shared.stream)
        .arg("source_id")
        .arg(&raw.id)
        .arg("group")
        .arg(&shared.group)
        .arg("consumer")
        .arg(&shared.consumer);
    cmd
}

/// A handle that tells `run` to stop reading and finish what is in flight.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A trigger and its handle.
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    /// Whether shutdown was asked for.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is asked for.
    pub async fn wait(&mut self) {
        if self.0.wait_for(|stop| *stop).await.is_err() {
            // The trigger is gone without firing: nothing can stop us any more.
            std::future::pending::<()>().await;
        }
    }
}

/// Reads the group's lag, pending count and oldest pending idle time into `stats.group`,
/// every [`crate::metrics::GROUP_REFRESH`].
async fn watch_group(shared: Arc<Shared>) {
    use crate::bootstrap::{as_map, bulk};
    let mut ticker = tokio::time::interval(crate::metrics::GROUP_REFRESH);
    loop {
        ticker.tick().await;
        let Ok(mut conn) = shared.pool.get().await else {
            continue;
        };
        let mut pipe = redis::pipe();
        pipe.cmd("XINFO").arg("GROUPS").arg(&shared.stream);
        pipe.cmd("XPENDING")
            .arg(&shared.stream)
            .arg(&shared.group)
            .arg("-")
            .arg("+")
            .arg(1);
        conn.begin();
        let result = tokio::time::timeout(
            shared.timeout,
            pipe.query_async::<(redis::Value, redis::Value)>(conn.conn()),
        )
        .await
        .unwrap_or_else(|_| Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))));
        conn.settle(&result);
        let Ok((groups, oldest)) = result else {
            continue;
        };
        let groups = match groups {
            redis::Value::Array(items) => items.into_iter().map(as_map).collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        let Some(g) = groups
            .iter()
            .find(|g| bulk(g.get("name")).as_deref() == Some(shared.group.as_str()))
        else {
            continue;
        };
        let number = |key: &str| bulk(g.get(key)).and_then(|n| n.parse::<i64>().ok());
        let stats = &shared.stats.group;
        stats
            .lag
            .store(number("lag").unwrap_or(-1), Ordering::Relaxed);
        stats
            .pending
            .store(number("pending").unwrap_or(0), Ordering::Relaxed);
        let idle = match oldest {
            redis::Value::Array(entries) => match entries.first() {
                Some(redis::Value::Array(fields)) => {
                    bulk(fields.get(2)).and_then(|n| n.parse::<i64>().ok())
                }
                _ => None,
            },
            _ => None,
        };
        stats
            .oldest_pending_idle_ms
            .store(idle.unwrap_or(0), Ordering::Relaxed);
        stats.refreshed_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// Runs a worker until `shutdown` fires (or, with `drain`, until the group is empty).
pub async fn run(
    config: &PipelineConfig,
    options: RunOptions,
    mut shutdown: Shutdown,
    stats: Arc<Stats>,
) -> Result<(), RunError> {
    let source_cfg = &config.source;
    let consumer = source_cfg.consumer_name();
    let mut dag = Dag::build(config, stats.clone()).await?;
    let pool = redis_pool(&source_cfg.redis, 4, source_cfg.timeout.0)
        .map_err(|e| RunError::Config(format!("invalid Redis URL {}: {e}", source_cfg.redis)))?;
    let mut source = StreamSource::new(source_cfg, consumer.clone())
        .map_err(|e| RunError::Config(format!("invalid Redis URL {}: {e}", source_cfg.redis)))?;
    let shared = Arc::new(Shared {
        pipeline: config.name.clone(),
        stream: source_cfg.stream.clone(),
        group: source_cfg.group.clone(),
        consumer: consumer.clone(),
        dead_letter: source_cfg.dead_letter_stream(),
        dead_letter_maxlen: source_cfg.dead_letter_maxlen,
        timeout: source_cfg.timeout.0,
        pool,
        sinks: dag.sinks.clone(),
        stats: stats.clone(),
    });
    tracing::info!(pipeline = %config.name, stream = %source_cfg.stream, group = %source_cfg.group, consumer = %consumer, "Worker starting.");

    let _watching = AbortOnDrop(tokio::spawn(watch_group(shared.clone())));
    let mut hint = options
        .bootstrap_only
        .then_some(crate::bootstrap::Reason::Forced);
    loop {
        if !crate::bootstrap::settle_group(config, &mut dag, &shared, hint.take(), &mut shutdown)
            .await?
        {
            return if options.bootstrap_only {
                Err(RunError::BootstrapInterrupted)
            } else {
                Ok(())
            };
        }
        if options.bootstrap_only {
            return Ok(());
        }
        match stream_until(
            config,
            &options,
            &mut dag,
            &shared,
            &mut source,
            &mut shutdown,
        )
        .await?
        {
            Some(gap) => hint = Some(crate::bootstrap::Reason::Gap(gap)),
            None => return Ok(()),
        }
    }
}

/// Most producer links one batch span carries.
const MAX_LINKS: usize = 128;

/// One span per entry that carries a sampled `traceparent`, a child of the producer's span
/// (so that Jaeger shows producer, relay and worker as one trace), linked to the batch span
/// that processed it. A batch holds many producers' events, so it can only link to them.
fn trace_events(
    config: &PipelineConfig,
    batch: &tracing::Span,
    entries: &[RawEntry],
) -> Vec<(usize, tracing::Span)> {
    use crate::telemetry;
    if !telemetry::exporting() {
        return Vec::new();
    }
    if let Some(id) = telemetry::trace_id_of(batch) {
        batch.record("trace_id", id.as_str());
    }
    let batch_context = telemetry::traceparent_of(batch);
    let mut spans = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let Some(traceparent) = entry
            .field(ecst_schemas::wire::FIELD_TRACEPARENT)
            .and_then(|b| std::str::from_utf8(b).ok())
        else {
            continue;
        };
        if i < MAX_LINKS {
            telemetry::link(batch, traceparent);
        }
        let span = tracing::info_span!(
            parent: None,
            "ecst.event",
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.destination.name = %config.source.stream,
            messaging.consumer.group.name = %config.source.group,
            messaging.message.id = %entry.id,
            ecst.pipeline = %config.name,
            ecst.aggregate_type = tracing::field::Empty,
        );
        if telemetry::adopt(&span, traceparent) {
            if let Some(batch_context) = &batch_context {
                telemetry::link(&span, batch_context);
            }
            spans.push((i, span));
        }
    }
    spans
}

/// Records each traced event's aggregate type, as the pipeline decoded it.
fn name_event_spans(spans: &[(usize, tracing::Span)], per_sink: &[Vec<Record>]) {
    for (entry, span) in spans {
        if let Some(kind) = per_sink
            .iter()
            .flatten()
            .find(|r| r.entry == *entry)
            .and_then(|r| r.event.aggregate_type.as_deref())
        {
            span.record("ecst.aggregate_type", kind);
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Streams from the group until shutdown, drain, or a retention gap (returned).
async fn stream_until(
    config: &PipelineConfig,
    options: &RunOptions,
    dag: &mut Dag,
    shared: &Arc<Shared>,
    source: &mut StreamSource,
    shutdown: &mut Shutdown,
) -> Result<Option<String>, RunError> {
    let source_cfg = &config.source;
    let stats = &shared.stats;
    let mut attempt = 0u32;
    loop {
        match source.ensure_group().await {
            Ok(created) => {
                if created {
                    tracing::info!(stream = %source_cfg.stream, group = %source_cfg.group, start = source_cfg.start.as_id(), "Created consumer group.");
                }
                break;
            }
            Err(e) => {
                let wait = backoff(attempt);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "Cannot reach the source; retrying.");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait() => return Ok(None),
                }
                attempt = attempt.saturating_add(1);
            }
        }
    }

    let permits = Arc::new(Semaphore::new(source_cfg.in_flight));
    let in_flight_ids: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut last_claim = Instant::now();
    let mut read_failures = 0u32;

    let mut gap: Option<String> = None;
    let mut last_gap_check = Instant::now();
    let bootstrap_on_gap = config
        .bootstrap
        .as_ref()
        .is_some_and(|b| b.on_gap == crate::bootstrap::OnGap::Bootstrap);

    loop {
        if shutdown.is_set() {
            break;
        }
        if source.take_group_vanished() {
            stats.gaps_detected.fetch_add(1, Ordering::Relaxed);
            // Recreated at `$`, the entries after the old position are skipped: a gap. At
            // `0` everything still in the stream is read again.
            if config.bootstrap.is_some() || source_cfg.start == crate::config::StartPosition::End {
                gap = Some(format!(
                    "the group or stream {} vanished (NOGROUP) and was recreated",
                    source_cfg.stream
                ));
                break;
            }
        }
        if last_gap_check.elapsed() >= source_cfg.gap_check_every.0 {
            last_gap_check = Instant::now();
            if let Some(found) = crate::bootstrap::check_gap(shared).await {
                gap = Some(found);
                break;
            }
        }
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.wait() => break,
        };

        // A read in progress is not cancelled by shutdown: Redis may already have delivered
        // its entries to this consumer, and they are finished like any other batch. The wait
        // is bounded by `block` (and the reader's timeout).
        let claim_due = source.pending_done() && last_claim.elapsed() >= source_cfg.claim_every.0;
        // At debug level: an idle worker reads (and would export a span) every `block`.
        let read_span = tracing::debug_span!(
            "ecst.read",
            messaging.system = "redis",
            messaging.operation.type = "receive",
            messaging.destination.name = %source_cfg.stream,
            messaging.consumer.group.name = %source_cfg.group,
            ecst.claim = claim_due,
        );
        let read = if claim_due {
            last_claim = Instant::now();
            source
                .claim()
                .instrument(read_span)
                .await
                .map(|b| (Origin::Claimed, b))
        } else {
            source.next_batch().instrument(read_span).await
        };
        let (origin, batch) = match read {
            Ok(ok) => {
                read_failures = 0;
                stats.source_connected.store(true, Ordering::Relaxed);
                ok
            }
            Err(e) => {
                stats.source_connected.store(false, Ordering::Relaxed);
                let wait = backoff(read_failures);
                tracing::warn!(pipeline = %config.name, error = %e, retry_in_ms = wait.as_millis() as u64, "Reading the stream failed; retrying.");
                read_failures = read_failures.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait() => break,
                }
                continue;
            }
        };

        if batch.is_empty() {
            drop(permit);
            if origin == Origin::New && options.drain {
                tokio::select! {
                    _ = async { while tasks.join_next().await.is_some() {} } => {}
                    _ = shutdown.wait() => break,
                }
                match source.group_pending().await {
                    Ok(0) => {
                        tracing::info!(pipeline = %config.name, "Drained: nothing left to read and nothing pending.");
                        break;
                    }
                    Ok(n) => {
                        tracing::debug!(
                            pending = n,
                            "Drain waits for entries pending elsewhere in the group."
                        );
                        // Entries pending at other consumers are claimed once idle.
                        last_claim = last_claim
                            .checked_sub(source_cfg.claim_every.0)
                            .unwrap_or(last_claim);
                    }
                    Err(e) => tracing::warn!(error = %e, "Cannot read the group's pending count."),
                }
            }
            continue;
        }

        let SourceBatch {
            mut entries,
            mut over_delivered,
            trimmed,
        } = batch;
        // A re-read (after a read error) or a claim can hand back entries this worker is still
        // applying; they are left to the batch that holds them, never acked twice or early.
        if let Ok(mut ids) = in_flight_ids.lock() {
            entries.retain(|e| !ids.contains(&e.id));
            over_delivered.retain(|(e, _)| !ids.contains(&e.id));
            ids.extend(entries.iter().map(|e| e.id.clone()));
            ids.extend(over_delivered.iter().map(|(e, _)| e.id.clone()));
        }
        let batch_ids: Vec<String> = entries
            .iter()
            .map(|e| e.id.clone())
            .chain(over_delivered.iter().map(|(e, _)| e.id.clone()))
            .collect();
        let mut extra_dead: Vec<(RawEntry, String)> = Vec::new();
        for (entry, count) in over_delivered {
            extra_dead.push((
                entry,
                format!(
                    "delivered {count} times, over max_deliveries {}",
                    source_cfg.max_deliveries
                ),
            ));
        }
        if !trimmed.is_empty() {
            tracing::error!(pipeline = %config.name, stream = %source_cfg.stream, count = trimmed.len(), ids = ?trimmed, "Pending entries were trimmed from the stream before they were applied; recording them in the dead-letter stream.");
        }
        let trimmed: Vec<RawEntry> = trimmed
            .into_iter()
            .map(|id| RawEntry {
                id,
                fields: Vec::new(),
            })
            .collect();
        stats
            .read
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        stats.batch_size.observe(entries.len() as f64);
        let mut outcomes = Outcomes::default();
        let batch_span = tracing::info_span!(
            "ecst.batch",
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.operation.type = "process",
            messaging.destination.name = %source_cfg.stream,
            messaging.consumer.group.name = %source_cfg.group,
            messaging.batch.message_count = entries.len(),
            ecst.pipeline = %config.name,
            trace_id = tracing::field::Empty,
        );
        let event_spans = trace_events(config, &batch_span, &entries);
        let per_sink = batch_span.in_scope(|| dag.run(&entries, &mut outcomes));
        name_event_spans(&event_spans, &per_sink);
        let shared = shared.clone();
        let in_flight_ids = in_flight_ids.clone();
        tasks.spawn(async move {
            complete(
                shared,
                Batch {
                    entries,
                    per_sink,
                    outcomes,
                    extra_dead,
                    trimmed,
                    ack: true,
                },
            )
            .instrument(batch_span)
            .await;
            // The events' spans end when their batch is acked.
            drop(event_spans);
            if let Ok(mut ids) = in_flight_ids.lock() {
                for id in &batch_ids {
                    ids.remove(id);
                }
            }
            drop(permit);
        });
    }

    tracing::info!(pipeline = %config.name, in_flight = tasks.len(), "Stopping: finishing in-flight batches.");
    let deadline = source_cfg.shutdown_timeout.0;
    let finished = tokio::time::timeout(deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        let left = tasks.len();
        tasks.abort_all();
        return Err(RunError::Abandoned(left));
    }
    tracing::info!(pipeline = %config.name, acked = stats.acked.load(Ordering::Relaxed), "Worker stopped.");
    match gap {
        Some(gap) if bootstrap_on_gap => Ok(Some(gap)),
        Some(gap) => Err(RunError::RetentionGap(gap)),
        None => Ok(None),
    }
}

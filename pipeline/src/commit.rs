//! Committing a batch: apply every sink's share (retrying until the store takes it), dead-letter
//! what cannot be applied, and XACK the batch only once all of that committed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ecst_operators::redis_pool::{RedisPool, describe_run_error};
use ecst_operators::{DropReason, Outcomes, RawEntry, Record, Sink, SinkError, SinkReport};
use tracing::Instrument;

use crate::retry::Backoff;
use crate::stats::{Stats, now_ms};

/// Everything a batch task needs after the transforms ran.
pub(crate) struct Shared {
    pub(crate) pipeline: String,
    pub(crate) stream: String,
    pub(crate) group: String,
    pub(crate) consumer: String,
    pub(crate) dead_letter: String,
    pub(crate) dead_letter_maxlen: u64,
    pub(crate) timeout: Duration,
    pub(crate) pool: RedisPool,
    pub(crate) sinks: Vec<(String, Arc<dyn Sink>)>,
    pub(crate) stats: Arc<Stats>,
}

/// One batch after the transforms: its entries, each sink's records, and what was decided.
pub(crate) struct Batch {
    pub(crate) entries: Vec<RawEntry>,
    pub(crate) per_sink: Vec<Vec<Record>>,
    pub(crate) outcomes: Outcomes,
    pub(crate) extra_dead: Vec<(RawEntry, String)>,
    /// False for snapshot rows, which are not stream entries.
    pub(crate) ack: bool,
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
    let mut backoff = Backoff::new();
    let mut failing = false;
    loop {
        match sink.apply_batch(records).await {
            Ok(report) => {
                if failing {
                    set_failing(shared, sink_index, false);
                    tracing::info!(pipeline = %shared.pipeline, sink = %name, attempts = backoff.failures() + 1, "Sink recovered; batch committed.");
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
                let wait = backoff.next_delay();
                tracing::warn!(pipeline = %shared.pipeline, sink = %name, attempt = backoff.failures(), retry_in_ms = wait.as_millis() as u64, error = %e, "Sink failed to apply a batch; nothing acked, retrying.");
                tokio::time::sleep(wait).await;
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
    let mut backoff = Backoff::new();
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
                let wait = backoff.next_delay();
                tracing::warn!(pipeline = %shared.pipeline, attempt = backoff.failures(), retry_in_ms = wait.as_millis() as u64, error = %e, "{what} failed; retrying.");
                tokio::time::sleep(wait).await;
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
    let mut dead: Vec<(&RawEntry, String)> = Vec::new();
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
            dead.push((raw, reason.clone()));
        }
    }
    for (raw, reason) in &extra_dead {
        dead.push((raw, reason.clone()));
    }
    for (_, reason) in &outcomes.dropped {
        match reason {
            DropReason::Stale => {
                stats.stale_filtered.fetch_add(1, Ordering::Relaxed);
                stats.stale.fetch_add(1, Ordering::Relaxed)
            }
            _ => stats.filtered.fetch_add(1, Ordering::Relaxed),
        };
    }

    if !dead.is_empty() {
        for (raw, reason) in &dead {
            stats.count_dead_letter(reason);
            tracing::warn!(pipeline = %shared.pipeline, stream = %shared.stream, entry_id = %raw.id, reason = %reason, dead_letter = %shared.dead_letter, "Entry dead-lettered.");
        }
        let mut pipe = redis::pipe();
        for (raw, reason) in &dead {
            pipe.add_command(dead_letter_cmd(&shared, raw, reason))
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

fn dead_letter_cmd(shared: &Shared, raw: &RawEntry, reason: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&shared.dead_letter)
        .arg("MAXLEN")
        .arg("~")
        .arg(shared.dead_letter_maxlen)
        .arg("*");
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

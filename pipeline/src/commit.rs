//! Committing a batch: apply every sink's share (retrying until the store takes it), dead-letter
//! what cannot be applied, and XACK the batch only once all of that committed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ecst_operators::SecretUrl;
use ecst_operators::redis_pool::{RedisPool, describe_run_error, report_failure, resolve_failure};
use ecst_operators::{
    DeadLetterReason, DropReason, Outcomes, RawEntry, Record, Sink, SinkError, SinkReport,
};
use tracing::Instrument;

use crate::dag::Trace;
use crate::gap_repair::{Repair, repair_gaps};
use crate::retry::Backoff;
use crate::stats::{Stats, now_ms};

/// Everything a batch task needs after the transforms ran.
pub(crate) struct Shared {
    pub(crate) pipeline: String,
    /// The stream key this worker (or lane) reads and acks.
    pub(crate) stream: String,
    /// Every stream key the group reads: `[stream]`, or each partition of a partitioned stream
    /// (a bootstrap notes a position on each).
    pub(crate) streams: Vec<String>,
    pub(crate) group: String,
    pub(crate) consumer: String,
    pub(crate) dead_letter: String,
    pub(crate) dead_letter_maxlen: u64,
    pub(crate) max_deliveries: u64,
    pub(crate) timeout: Duration,
    pub(crate) pool: RedisPool,
    /// The source's Redis, which the pool connects to.
    pub(crate) redis_url: SecretUrl,
    pub(crate) sinks: Vec<(String, Arc<dyn Sink>)>,
    pub(crate) stats: Arc<Stats>,
    /// The partition `stream` is, of a partitioned stream.
    pub(crate) partition: Option<u32>,
    /// The source is a Redis Cluster: no script spans the stream and its dead-letter stream.
    pub(crate) cluster: bool,
    /// Whether an `ecst tap` is attached, and what it wants.
    pub(crate) tap: Arc<crate::tap::TapSwitch>,
}

/// One batch after the transforms: its entries, each sink's records, and what was decided.
pub(crate) struct Batch {
    pub(crate) entries: Vec<RawEntry>,
    pub(crate) per_sink: Vec<Vec<Record>>,
    pub(crate) outcomes: Outcomes,
    pub(crate) extra_dead: Vec<(RawEntry, DeadLetterReason)>,
    /// Ids XAUTOCLAIM found trimmed while pending; Redis already took them out of the group.
    pub(crate) trimmed: Vec<RawEntry>,
    /// False for snapshot rows, which are not stream entries.
    pub(crate) ack: bool,
    /// What the stages did with each entry, when the batch is traced: the sinks add theirs.
    pub(crate) trace: Option<Trace>,
    /// Where patches over a gap get their aggregate's full state (a `delta` stage's `repair`).
    pub(crate) repair: Option<Arc<Repair>>,
}

/// Applies one sink's share until the store takes it, counting what it did.
pub(crate) async fn apply_with_retry(
    shared: &Shared,
    sink_index: usize,
    records: &[Record],
) -> SinkReport {
    let started = Instant::now();
    let report = apply_until_committed(shared, sink_index, records).await;
    if let Some(s) = shared.stats.sinks().get(sink_index) {
        let now = now_ms();
        s.apply_duration.observe(started.elapsed().as_secs_f64());
        s.applied
            .fetch_add(report.applied as u64, Ordering::Relaxed);
        s.stale.fetch_add(report.stale as u64, Ordering::Relaxed);
        s.delta_gaps
            .fetch_add(report.gaps.len() as u64, Ordering::Relaxed);
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
    let mut conflicts = 0u64;
    loop {
        let error = match sink.apply_batch(records).await {
            Ok(report) => {
                if failing {
                    set_failing(shared, sink_index, false);
                    tracing::info!(pipeline = %shared.pipeline, sink = %name, attempts = backoff.failures() + 1, "Sink recovered; batch committed.");
                }
                return report;
            }
            Err(e) => e,
        };
        let isolated = match (&error, records) {
            // A record that conflicts with what the store holds, alone in its batch, is
            // refused like a redelivered entry: after max_deliveries attempts it goes to the
            // dead letters. A refusal of the store's own (a dropped table, a permission) is
            // retried however small the batch.
            (SinkError::Conflict { message, .. }, [record]) => {
                conflicts += 1;
                (conflicts >= shared.max_deliveries).then(|| SinkReport {
                    refused: vec![(record.entry, message.clone())],
                    ..SinkReport::default()
                })
            }
            (SinkError::Conflict { .. } | SinkError::Refused { .. }, [_, _, ..]) => {
                isolate_refused(shared, sink_index, records).await
            }
            _ => None,
        };
        if let Some(report) = isolated {
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
        tracing::warn!(pipeline = %shared.pipeline, sink = %name, attempt = backoff.failures(), retry_in_ms = wait.as_millis() as u64, error = %error, "Sink failed to apply a batch; nothing acked, retrying.");
        tokio::time::sleep(wait).await;
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
    // In version order: a delta patch applied before the one it builds on would gap.
    let mut ordered: Vec<&Record> = records.iter().collect();
    ordered.sort_by_key(|r| r.event.aggregate_version);
    for record in ordered {
        match sink.apply_batch(std::slice::from_ref(record)).await {
            Ok(report) => {
                merged.applied += report.applied;
                merged.stale += report.stale;
                merged.stale_entries.extend(report.stale_entries);
                merged.rejected.extend(report.rejected);
                merged.refused.extend(report.refused);
                merged.gaps.extend(report.gaps);
            }
            Err(SinkError::Refused { message, .. } | SinkError::Conflict { message, .. }) => {
                refused.push((record.entry, message))
            }
            // The store went away meanwhile: retry the whole batch (repeats are harmless).
            Err(_) => return None,
        }
    }
    if refused.len() == records.len() {
        return None;
    }
    tracing::warn!(pipeline = %shared.pipeline, sink = %name, refused = refused.len(), "The store refused some records of a batch; dead-lettering them and committing the rest.");
    merged.refused.extend(refused);
    Some(merged)
}

/// Asks every sink that holds records of the batch whether it can write them, before any
/// applies: an entry one sink cannot write is taken out of every sink's share and
/// dead-lettered once, so that the replicas of a fan-out agree on it.
fn refuse_unwritable(shared: &Shared, per_sink: &mut [Vec<Record>], outcomes: &mut Outcomes) {
    let fan_out = per_sink.iter().filter(|r| !r.is_empty()).count();
    if fan_out < 2 {
        // A lone sink reports its own data errors when it applies; asking first would only
        // repeat the work.
        return;
    }
    let mut refused: HashMap<usize, DeadLetterReason> = HashMap::new();
    for (i, records) in per_sink.iter().enumerate() {
        let sink = &shared.sinks[i];
        for record in records {
            if refused.contains_key(&record.entry) {
                continue;
            }
            if let Err(message) = sink.1.check_record(record) {
                refused.insert(
                    record.entry,
                    DeadLetterReason::SinkRejected {
                        sink: sink.0.clone(),
                        message,
                    },
                );
            }
        }
    }
    if refused.is_empty() {
        return;
    }
    for records in per_sink.iter_mut() {
        records.retain(|r| !refused.contains_key(&r.entry));
    }
    let mut refused: Vec<(usize, DeadLetterReason)> = refused.into_iter().collect();
    refused.sort_unstable_by_key(|(entry, _)| *entry);
    for (entry, reason) in refused {
        outcomes.dead_letter(entry, reason);
    }
}

/// The sinks (other than `refusing`) whose share held `entry` and that did not reject it:
/// their replicas hold the record now.
fn applied_elsewhere(
    shared: &Shared,
    per_sink: &[Vec<Record>],
    not_applied: &[HashSet<usize>],
    refusing: usize,
    entry: usize,
) -> Vec<String> {
    per_sink
        .iter()
        .enumerate()
        .filter(|(j, records)| {
            *j != refusing
                && !not_applied[*j].contains(&entry)
                && records.iter().any(|r| r.entry == entry)
        })
        .map(|(j, _)| shared.sinks[j].0.clone())
        .collect()
}

/// How acks and dead letters name themselves in `/readyz` when Redis refuses them.
const ACKS: &str = "acks and dead letters";

/// Runs a pipeline on the shared pool until it succeeds. On a Redis Cluster, whose pipelines
/// must stay within one slot, its commands run one after another, each until it succeeds.
async fn with_redis_retry(shared: &Shared, what: &str, pipe: &redis::Pipeline) {
    if shared.cluster {
        for cmd in pipe.cmd_iter() {
            let mut one = redis::pipe();
            one.add_command(cmd.clone()).ignore();
            run_until_done(shared, what, &one).await;
        }
    } else {
        run_until_done(shared, what, pipe).await;
    }
}

async fn run_until_done(shared: &Shared, what: &str, pipe: &redis::Pipeline) {
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
                        // A refused password or command shows in /readyz, not only here.
                        r.map_err(|e| report_failure(ACKS, &shared.redis_url, &e).to_string())
                    }
                    Err(_) => Err("timed out".to_string()),
                }
            }
            Err(e) => Err(describe_run_error(e)),
        };
        match result {
            Ok(()) => {
                resolve_failure(ACKS, &shared.redis_url);
                return;
            }
            Err(e) => {
                shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                let wait = backoff.next_delay();
                tracing::warn!(pipeline = %shared.pipeline, attempt = backoff.failures(), retry_in_ms = wait.as_millis() as u64, error = %e, "{what} failed; retrying.");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Applies a batch to every sink, dead-letters what cannot be applied, and XACKs the batch
/// once all of that committed. A traced batch gives back its trace, with the sinks' decisions.
pub(crate) async fn complete(shared: Arc<Shared>, batch: Batch) -> Option<Trace> {
    let Batch {
        entries,
        mut per_sink,
        mut outcomes,
        extra_dead,
        trimmed,
        ack,
        mut trace,
        repair,
    } = batch;
    let checked_from = outcomes.dead_letters.len();
    refuse_unwritable(&shared, &mut per_sink, &mut outcomes);
    if let Some(trace) = trace.as_mut() {
        for (entry, reason) in &outcomes.dead_letters[checked_from..] {
            trace.sink_rejected(*entry, reason);
        }
    }
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
    if let Some(trace) = trace.as_mut() {
        for (i, report) in &reports {
            trace.sink(&shared.sinks[*i].0, &per_sink[*i], report);
        }
    }

    // A patch over a gap was not applied: its entry stays pending, and is delivered again
    // (XAUTOCLAIM after claim_idle, or a restart) when the missing version may have come,
    // unless the aggregate's full state fetched for it covers it.
    let mut gaps: HashSet<usize> = reports
        .iter()
        .flat_map(|(_, report)| report.gaps.iter().copied())
        .collect();
    if let Some(repair) = repair.as_deref()
        && !gaps.is_empty()
    {
        let repaired = repair_gaps(&shared, repair, &entries, &per_sink, &reports).await;
        gaps.retain(|e| !repaired.contains(e));
    }
    let stats = &shared.stats;
    let mut not_applied: Vec<HashSet<usize>> = vec![HashSet::new(); per_sink.len()];
    for (i, report) in &reports {
        not_applied[*i].extend(
            report
                .rejected
                .iter()
                .chain(&report.refused)
                .map(|(e, _)| *e)
                // A gapped patch was not applied either, repaired or not.
                .chain(report.gaps.iter().copied()),
        );
    }
    for (i, report) in reports {
        stats
            .applied
            .fetch_add(report.applied as u64, Ordering::Relaxed);
        stats
            .stale
            .fetch_add(report.stale as u64, Ordering::Relaxed);
        let sink = &shared.sinks[i].0;
        for (entry, message) in report.rejected {
            outcomes.dead_letter(
                entry,
                DeadLetterReason::SinkRejected {
                    sink: sink.clone(),
                    message,
                },
            );
        }
        for (entry, message) in report.refused {
            let applied_by = applied_elsewhere(&shared, &per_sink, &not_applied, i, entry);
            outcomes.dead_letter(
                entry,
                DeadLetterReason::StoreRefused {
                    sink: sink.clone(),
                    message,
                    applied_by,
                },
            );
        }
    }
    // (entry, reason, still pending in the group: acked together with its dead letter)
    let mut dead: Vec<(&RawEntry, &DeadLetterReason, bool)> = Vec::new();
    for (entry, reason) in &outcomes.dead_letters {
        if let Some(raw) = entries.get(*entry) {
            dead.push((raw, reason, ack));
        }
    }
    for (raw, reason) in &extra_dead {
        dead.push((raw, reason, ack));
    }
    for raw in &trimmed {
        dead.push((raw, &DeadLetterReason::Trimmed, false));
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
        let mut pipe = redis::pipe();
        for (raw, reason, pending) in &dead {
            stats.count_dead_letter(reason);
            if reason.is_divergent() {
                tracing::error!(pipeline = %shared.pipeline, stream = %shared.stream, entry_id = %raw.id, reason = %reason, dead_letter = %shared.dead_letter, "FAN-OUT DIVERGENCE: a store refused a record that other sinks applied; the replicas disagree on it until it is fixed and replayed.");
                if let (DeadLetterReason::StoreRefused { sink, .. }, false) = (reason, *pending) {
                    pipe.cmd("HINCRBY")
                        .arg(divergence_key(&shared.stream, &shared.group))
                        .arg(sink)
                        .arg(1)
                        .ignore();
                }
            } else {
                tracing::warn!(pipeline = %shared.pipeline, stream = %shared.stream, entry_id = %raw.id, reason = %reason, dead_letter = %shared.dead_letter, "Entry dead-lettered.");
            }
            add_dead_letter(&mut pipe, &shared, raw, reason, *pending);
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

    let mut ids: Vec<String> = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| !gaps.contains(i))
        .map(|(_, e)| e.id.clone())
        .collect();
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
    trace
}

/// The Redis hash that counts, per sink, the records its store refused after other sinks of
/// the fan-out applied them (`ecst status` shows it).
pub fn divergence_key(stream: &str, group: &str) -> String {
    format!("ecst:fanout-divergent:{stream}:{group}")
}

/// Acks a stream entry and writes its dead letter in one atomic step, only if the entry was
/// still pending: a retry after a lost reply, a crash between the two writes, or a second
/// consumer that claimed the same entry can then never write a second dead letter.
/// A divergent record also counts once against its refusing sink in the divergence hash.
/// KEYS: stream, dead-letter stream, divergence hash; ARGV: group, entry id, MAXLEN, the
/// refusing sink of a divergence (or empty), then the dead letter's fields.
const ACK_AND_DEAD_LETTER: &str = "if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then \
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 5)) \
    if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[4], 1) end return 1 end return 0";

/// Most fields of an entry its dead letter copies.
const MAX_COPIED_FIELDS: usize = 3_000;

/// Adds the dead letter of `raw` to `pipe`: acked with it if it is `pending` in the group, a
/// plain XADD otherwise (snapshot rows, entries Redis already dropped from the group).
///
/// On a Redis Cluster the stream, the dead-letter stream and the divergence hash live in
/// different slots, so no script can touch all three: the dead letter is added first, then the
/// entry acked. A crash (or a takeover) between the two can record the dead letter twice, never
/// lose it; its `source_stream` and `source_id` fields tell the copies apart.
fn add_dead_letter(
    pipe: &mut redis::Pipeline,
    shared: &Shared,
    raw: &RawEntry,
    reason: &DeadLetterReason,
    pending: bool,
) {
    let divergent_sink = match reason {
        DeadLetterReason::StoreRefused { sink, .. } if pending && reason.is_divergent() => {
            Some(sink.as_str())
        }
        _ => None,
    };
    if pending && !shared.cluster {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(ACK_AND_DEAD_LETTER)
            .arg(3)
            .arg(&shared.stream)
            .arg(&shared.dead_letter)
            .arg(divergence_key(&shared.stream, &shared.group))
            .arg(&shared.group)
            .arg(&raw.id)
            .arg(shared.dead_letter_maxlen)
            .arg(divergent_sink.unwrap_or(""));
        pipe.add_command(dead_letter_fields(cmd, shared, raw, reason))
            .ignore();
        return;
    }
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&shared.dead_letter)
        .arg("MAXLEN")
        .arg("~")
        .arg(shared.dead_letter_maxlen)
        .arg("*");
    pipe.add_command(dead_letter_fields(cmd, shared, raw, reason))
        .ignore();
    if pending {
        pipe.cmd("XACK")
            .arg(&shared.stream)
            .arg(&shared.group)
            .arg(&raw.id)
            .ignore();
        if let Some(sink) = divergent_sink {
            pipe.cmd("HINCRBY")
                .arg(divergence_key(&shared.stream, &shared.group))
                .arg(sink)
                .arg(1)
                .ignore();
        }
    }
}

/// `cmd` with the dead letter's fields: the entry's own, then why and where from.
fn dead_letter_fields(
    mut cmd: redis::Cmd,
    shared: &Shared,
    raw: &RawEntry,
    reason: &DeadLetterReason,
) -> redis::Cmd {
    // The script hands the fields to XADD through Lua's `unpack`, which stops near 8,000
    // values: an entry with more fields is dead-lettered by reference (it stays in the stream
    // until trimmed) rather than never.
    if raw.fields.len() <= MAX_COPIED_FIELDS {
        for (k, v) in &raw.fields {
            cmd.arg(k).arg(v.as_slice());
        }
    } else {
        cmd.arg("fields_not_copied").arg(raw.fields.len());
    }
    cmd.arg("error")
        .arg(reason.to_string())
        .arg("error_class")
        .arg(reason.class())
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

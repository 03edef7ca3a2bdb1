//! The read loop: XREADGROUP (and XAUTOCLAIM) batches through the DAG into commit tasks, with
//! at most `in_flight` batches uncommitted, until shutdown, drain or a retention gap.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ecst_operators::{DeadLetterReason, Outcomes, RawEntry};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::keep_claimed::{InFlightIds, keep_claimed};
use super::trace::{name_event_spans, trace_events};
use super::{AbortOnDrop, RunOptions};
use crate::commit::{Batch, Shared, complete};
use crate::config::PipelineConfig;
use crate::dag::{Dag, Trace};
use crate::error::RunError;
use crate::gap_repair::Repair;
use crate::redis_reply::{StreamId, parse_id};
use crate::retry::{Backoff, sleep_or_shutdown};
use crate::shutdown::Shutdown;
use crate::source::{Origin, SourceBatch, StreamSource};

/// Streams from the group until shutdown, drain, or a retention gap (returned).
pub(super) async fn stream_until(
    config: &PipelineConfig,
    options: &RunOptions,
    dag: &Arc<tokio::sync::Mutex<Dag>>,
    shared: &Arc<Shared>,
    source: &mut StreamSource,
    shutdown: &mut Shutdown,
) -> Result<Option<String>, RunError> {
    let source_cfg = &config.source;
    let stats = &shared.stats;
    let repair = Repair::of(config, dag).map_err(RunError::Config)?;
    let mut backoff = Backoff::new();
    loop {
        match source.ensure_group().await {
            Ok(created) => {
                if created {
                    tracing::info!(stream = %source_cfg.stream, group = %source_cfg.group, start = source_cfg.start.as_id(), "Created consumer group.");
                }
                break;
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, attempt = backoff.failures(), retry_in_ms = wait.as_millis() as u64, "Cannot reach the source; retrying.");
                if !sleep_or_shutdown(wait, shutdown).await {
                    return Ok(None);
                }
            }
        }
    }

    let permits = Arc::new(Semaphore::new(source_cfg.in_flight));
    // The ids of batches read and not yet acked, with when they were read.
    let in_flight_ids: Arc<Mutex<InFlightIds>> = Arc::default();
    // A batch whose sink is down can stay in flight longer than claim_idle; without this its
    // entries would be claimed (each claim a delivery) until they pass max_deliveries.
    let _keeping = AbortOnDrop(tokio::spawn(keep_claimed(
        shared.clone(),
        in_flight_ids.clone(),
        (source_cfg.claim_idle.0 / 3).max(Duration::from_millis(50)),
    )));
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut last_claim = Instant::now();
    let mut read_backoff = Backoff::new();

    let mut gap: Option<String> = None;
    // Why a stage stopped the worker; the batch that said so is never acked.
    let mut halted: Option<String> = None;
    let mut last_gap_check = Instant::now();
    let bootstrap_on_gap = config
        .bootstrap
        .as_ref()
        .is_some_and(|b| b.on_gap == crate::config::OnGap::Bootstrap);

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
        let claim_due = source.pending_done()
            && (source.taking_over() || last_claim.elapsed() >= source_cfg.claim_every.0);
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
                read_backoff.reset();
                stats.source_connected.store(true, Ordering::Relaxed);
                ok
            }
            Err(e) => {
                stats.source_connected.store(false, Ordering::Relaxed);
                let wait = read_backoff.next_delay();
                tracing::warn!(pipeline = %config.name, error = %e, attempt = read_backoff.failures(), retry_in_ms = wait.as_millis() as u64, "Reading the stream failed; retrying.");
                if !sleep_or_shutdown(wait, shutdown).await {
                    break;
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
        if let Ok(ids) = in_flight_ids.lock() {
            entries.retain(|e| !ids.contains_key(&parse_id(&e.id)));
            over_delivered.retain(|(e, _)| !ids.contains_key(&parse_id(&e.id)));
        }
        let batch_ids: Vec<StreamId> = entries
            .iter()
            .map(|e| parse_id(&e.id))
            .chain(over_delivered.iter().map(|(e, _)| parse_id(&e.id)))
            .collect();
        if let Ok(mut ids) = in_flight_ids.lock() {
            let now = Instant::now();
            ids.extend(batch_ids.iter().map(|&id| (id, now)));
        }
        let mut extra_dead: Vec<(RawEntry, DeadLetterReason)> = Vec::new();
        for (entry, count) in over_delivered {
            extra_dead.push((
                entry,
                DeadLetterReason::MaxDeliveries {
                    count,
                    max: source_cfg.max_deliveries,
                },
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
        // Traced only while an `ecst tap` is attached; otherwise this is one atomic load.
        let mut trace = shared.tap.wants_batch().then(Trace::default);
        let tapped: Option<(Arc<Shared>, Vec<String>)> = trace.is_some().then(|| {
            (
                shared.clone(),
                entries.iter().map(|e| e.id.clone()).collect(),
            )
        });
        let run = async {
            let mut dag = dag.lock().await;
            match trace.as_mut() {
                Some(trace) => dag.run_traced(&entries, &mut outcomes, trace).await,
                None => dag.run(&entries, &mut outcomes).await,
            }
        };
        // Shutdown finishes a batch whose stages finish; one that an async stage still holds
        // (its service is down) after the shutdown timeout is abandoned un-acked: it stays
        // pending and is redelivered.
        let per_sink = {
            let run = run.instrument(batch_span.clone());
            tokio::pin!(run);
            tokio::select! {
                biased;
                per_sink = &mut run => Some(per_sink),
                _ = shutdown.wait() => {
                    tokio::time::timeout(source_cfg.shutdown_timeout.0, &mut run).await.ok()
                }
            }
        };
        let Some(per_sink) = per_sink else {
            tracing::warn!(pipeline = %config.name, stream = %source_cfg.stream, entries = batch_ids.len(), "Stopping while a stage waits; the batch stays pending.");
            break;
        };
        if let Some(reason) = outcomes.halt.take() {
            tracing::error!(pipeline = %config.name, stream = %source_cfg.stream, reason = %reason, "A stage stopped the worker; the batch stays pending.");
            halted = Some(reason);
            break;
        }
        name_event_spans(&event_spans, &per_sink);
        let shared = shared.clone();
        let repair = repair.clone();
        let in_flight_ids = in_flight_ids.clone();
        tasks.spawn(async move {
            let trace = complete(
                shared,
                Batch {
                    entries,
                    per_sink,
                    outcomes,
                    extra_dead,
                    trimmed,
                    ack: true,
                    trace,
                    repair,
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
            // The batch's slot is free before the tap is written to: a slow tap write must
            // not hold back the next read.
            drop(permit);
            if let (Some(trace), Some((shared, ids))) = (trace, tapped) {
                publish_to_tap(&shared, &ids, &trace).await;
            }
        });
    }

    tracing::info!(pipeline = %config.name, stream = %source_cfg.stream, in_flight = tasks.len(), "Stopping: finishing in-flight batches.");
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
    if let Some(reason) = halted {
        return Err(RunError::Halted(reason));
    }
    match shared.partition {
        // The counters are the worker's, not the partition's.
        Some(partition) => {
            tracing::info!(pipeline = %config.name, stream = %source_cfg.stream, partition, "Stopped reading the partition.")
        }
        None => {
            tracing::info!(pipeline = %config.name, stream = %source_cfg.stream, acked = stats.acked.load(Ordering::Relaxed), "Stopped reading.")
        }
    }
    if gap.is_none() {
        match source.leave_group_if_idle().await {
            Ok(true) => {
                tracing::info!(stream = %source_cfg.stream, group = %source_cfg.group, consumer = %source.consumer(), "Left the group: nothing was pending at this consumer.")
            }
            Ok(false) => {
                tracing::info!(stream = %source_cfg.stream, group = %source_cfg.group, consumer = %source.consumer(), "Staying in the group: entries are pending at this consumer.")
            }
            Err(e) => {
                tracing::warn!(error = %e, consumer = %source.consumer(), "Cannot remove this consumer from the group; `ecst status` shows it as stale.")
            }
        }
    }
    match gap {
        Some(gap) if bootstrap_on_gap => Ok(Some(gap)),
        Some(gap) => Err(RunError::RetentionGap(gap)),
        None => Ok(None),
    }
}

/// Publishes what the stages and sinks decided about a traced batch to the attached tap.
async fn publish_to_tap(shared: &Shared, ids: &[String], trace: &Trace) {
    let lines = shared
        .tap
        .lines(&shared.stream, &shared.consumer, ids, trace);
    crate::tap::publish(
        &shared.pool,
        &shared.pipeline,
        shared.timeout,
        &shared.stats.tap_decisions_published,
        &lines,
    )
    .await;
}

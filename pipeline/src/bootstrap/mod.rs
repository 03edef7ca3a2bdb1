//! Bootstrap from a snapshot, and the retention gap that calls for one.
//!
//! A stream only goes back as far as its retention. A new group, a reset one, or one that fell
//! behind a trim must start from the source's current state: note the stream position, move
//! the group there, page through the snapshot applying every row through the pipeline's own
//! stages and sinks (the version guard makes rows that race live events harmless), then stream
//! from the noted position. Progress is recorded in Redis after every page so an interrupted
//! bootstrap resumes; a lease with expiry makes a second worker wait instead of bootstrapping
//! too.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ecst_operators::Outcomes;
use ecst_operators::redis_pool::{RedisManager, describe_run_error};

use crate::commit::{Batch, Shared, complete};
use crate::config::{BootstrapConfig, OnGap, PipelineConfig};
use crate::dag::Dag;
use crate::error::RunError;
use crate::orphans::SeenKeys;
use crate::retry::{Backoff, sleep_or_shutdown};
use crate::shutdown::Shutdown;

pub(crate) use gap::check_gap;
pub use gap::{GroupState, group_state, stream_info};
pub(crate) use reader::{SnapshotReader, page_records};

use gap::{last_generated_id, place_group};
use lease::{Keys, LeaseKeeper, release_lease, take_lease};
use progress::{Progress, ProgressReport, read_progress};

type Pooled = bb8::PooledConnection<'static, RedisManager>;

async fn pooled(shared: &Shared) -> Result<Pooled, String> {
    shared.pool.get_owned().await.map_err(describe_run_error)
}

/// Runs a Redis step on a pooled connection, marking the connection broken on failure.
macro_rules! on_redis {
    ($conn:expr, |$c:ident| $call:expr) => {{
        let conn: &mut ecst_operators::redis_pool::PooledRedis = $conn;
        conn.begin();
        let result = {
            let $c = conn.conn();
            $call.await
        };
        conn.settle(&result);
        result.map_err(|e: redis::RedisError| e.to_string())
    }};
}

mod gap;
mod lease;
mod progress;
mod reader;

/// Asks the snapshot source for one row, as a bootstrap's first page would: `Ok` with what
/// answered and how many lines came back, `Err` with why not.
pub async fn probe_snapshot(config: &BootstrapConfig) -> Result<String, String> {
    let mut reader = SnapshotReader::new(config)?;
    let lines = reader.page(None, 1, config.timeout.0).await?;
    Ok(format!(
        "{} answered ({} line{} for a page of 1)",
        reader.describe(),
        lines.len(),
        if lines.len() == 1 { "" } else { "s" }
    ))
}

/// Why a worker bootstraps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reason {
    NewGroup,
    Resume,
    Gap(String),
    Forced,
}

impl Reason {
    fn describe(&self) -> String {
        match self {
            Reason::NewGroup => "the consumer group does not exist yet".into(),
            Reason::Resume => "an interrupted bootstrap resumes".into(),
            Reason::Gap(gap) => format!("retention gap: {gap}"),
            Reason::Forced => "asked for (ecst bootstrap)".into(),
        }
    }
}

/// Makes the group ready to stream: bootstraps first when it is new (and bootstrap is
/// configured), when an earlier bootstrap was interrupted, when `hint` asks (forced, or a gap
/// seen while running), or when a gap is found now. Waits while another worker bootstraps.
/// `false` when shutdown came first.
pub(crate) async fn settle_group(
    config: &PipelineConfig,
    dag: &mut Dag,
    shared: &Arc<Shared>,
    mut hint: Option<Reason>,
    shutdown: &mut Shutdown,
) -> Result<bool, RunError> {
    let keys = Keys::new(&shared.stream, &shared.group);
    let me = shared.consumer.clone();
    let mut backoff = Backoff::new();
    let mut last_wait_log: Option<Instant> = None;
    let (streams, group) = (shared.streams.clone(), shared.group.clone());
    loop {
        if shutdown.is_set() {
            return Ok(false);
        }
        let looked = async {
            let mut conn = pooled(shared).await?;
            let state = on_redis!(&mut conn, |c| streams_state(c, &streams, &group))?;
            let progress = on_redis!(&mut conn, |c| read_progress(c, &keys))?;
            Ok::<_, String>((conn, state, progress))
        }
        .await;
        let (mut conn, state, progress) = match looked {
            Ok(looked) => looked,
            Err(e) => {
                // Every worker reads its group here, with or without `bootstrap:`: a failure
                // is reaching the source, so it is the runner's to report, not bootstrap's.
                let wait = backoff.next_delay();
                tracing::warn!(target: "ecst_pipeline::runner", pipeline = %shared.pipeline, attempt = backoff.failures(), retry_in_ms = wait.as_millis() as u64, error = %e, "Cannot read the consumer group from Redis; retrying.");
                sleep_or_shutdown(wait, shutdown).await;
                continue;
            }
        };
        let reason = if progress.running {
            Some(Reason::Resume)
        } else if let Some(hint) = hint.clone() {
            Some(hint)
        } else if !state.exists {
            config
                .bootstrap
                .as_ref()
                .filter(|b| b.on_new_group)
                .map(|_| Reason::NewGroup)
        } else if let Some(gap) = state.gap {
            shared.stats.retention_gap.store(true, Ordering::Relaxed);
            shared.stats.gaps_detected.fetch_add(1, Ordering::Relaxed);
            tracing::error!(pipeline = %shared.pipeline, stream = %shared.stream, group = %shared.group, gap = %gap, "RETENTION GAP: the group missed entries that are gone from the stream.");
            match &config.bootstrap {
                Some(b) if b.on_gap == OnGap::Bootstrap => Some(Reason::Gap(gap)),
                _ => return Err(RunError::RetentionGap(gap)),
            }
        } else {
            None
        };
        let Some(reason) = reason else {
            shared.stats.bootstrapping.store(false, Ordering::Relaxed);
            shared.stats.retention_gap.store(false, Ordering::Relaxed);
            return Ok(true);
        };
        let Some(bootstrap) = &config.bootstrap else {
            return Err(match reason {
                Reason::Gap(gap) => RunError::RetentionGap(gap),
                _ => RunError::Config(
                    "the pipeline has no `bootstrap:` section to bootstrap from".into(),
                ),
            });
        };
        shared.stats.bootstrapping.store(true, Ordering::Relaxed);
        match on_redis!(&mut conn, |c| take_lease(c, &keys, &me, bootstrap.lease.0)) {
            Err(e) => {
                pause(
                    shared,
                    &mut backoff,
                    "Cannot take the bootstrap lease",
                    &e,
                    shutdown,
                )
                .await;
                continue;
            }
            Ok(Err(holder)) => {
                if last_wait_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    last_wait_log = Some(Instant::now());
                    tracing::info!(pipeline = %shared.pipeline, holder = %holder, "Another worker is bootstrapping this group; waiting for it.");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = shutdown.wait() => {}
                }
                continue;
            }
            Ok(Ok(())) => {}
        }
        // Under the lease, look again: the worker that held it may have just finished.
        let progress = match on_redis!(&mut conn, |c| read_progress(c, &keys)) {
            Ok(p) => p,
            Err(e) => {
                pause(
                    shared,
                    &mut backoff,
                    "Cannot read the bootstrap progress",
                    &e,
                    shutdown,
                )
                .await;
                continue;
            }
        };
        let reason = if progress.running {
            Reason::Resume
        } else {
            reason
        };
        if reason == Reason::NewGroup {
            let exists = on_redis!(&mut conn, |c| streams_state(c, &streams, &group))
                .map(|s| s.exists)
                .unwrap_or(false);
            if exists {
                let _ = on_redis!(&mut conn, |c| release_lease(c, &keys, &me));
                continue;
            }
        }
        drop(conn);
        let result = run_bootstrap(
            bootstrap,
            dag,
            shared,
            &keys,
            reason.clone(),
            progress,
            shutdown,
        )
        .await;
        if let Ok(mut conn) = pooled(shared).await {
            let _ = on_redis!(&mut conn, |c| release_lease(c, &keys, &me));
        }
        match result {
            Ok(true) => {
                backoff.reset();
                hint = None;
                if reason == Reason::Forced {
                    return Ok(true);
                }
            }
            Ok(false) => return Ok(false),
            Err(Fatal(e)) => return Err(e),
        }
    }
}

/// The group on every stream key it reads: it exists only if it exists on all of them, and
/// the first gap found is the gap.
async fn streams_state(
    conn: &mut ecst_operators::redis_pool::RedisConn,
    streams: &[String],
    group: &str,
) -> Result<GroupState, redis::RedisError> {
    let mut all = GroupState {
        exists: true,
        gap: None,
    };
    for stream in streams {
        let state = group_state(conn, stream, group).await?;
        all.exists &= state.exists;
        if all.gap.is_none() {
            all.gap = state.gap;
        }
    }
    Ok(all)
}

/// Whether a bootstrap for `reason` ends by removing rows the snapshot did not produce.
fn sweeps(reason: &Reason) -> bool {
    matches!(reason, Reason::NewGroup | Reason::Gap(_))
}

/// A bootstrap error that retrying cannot fix.
pub(crate) struct Fatal(RunError);

/// Logs a failed step and waits the backoff's next delay (or until shutdown).
async fn pause(
    shared: &Shared,
    backoff: &mut Backoff,
    what: &str,
    error: &str,
    shutdown: &mut Shutdown,
) {
    let wait = backoff.next_delay();
    tracing::warn!(pipeline = %shared.pipeline, attempt = backoff.failures(), retry_in_ms = wait.as_millis() as u64, error = %error, "{what}; retrying.");
    sleep_or_shutdown(wait, shutdown).await;
}

/// Notes the position, moves the group there, pages the snapshot through the pipeline and
/// records progress after every page. `Ok(false)` on shutdown (progress stays `running`).
async fn run_bootstrap(
    config: &BootstrapConfig,
    dag: &mut Dag,
    shared: &Arc<Shared>,
    keys: &Keys,
    reason: Reason,
    progress: Progress,
    shutdown: &mut Shutdown,
) -> Result<bool, Fatal> {
    let mut reader = SnapshotReader::new(config).map_err(|e| Fatal(RunError::Config(e)))?;
    // Stages must not judge snapshot rows by versions they saw streaming (a version_filter
    // would drop a row the replica already has, and the sweep would take it for an orphan).
    dag.reset();
    let started_ms = crate::stats::now_ms();
    let me = shared.consumer.clone();
    let group = shared.group.clone();
    let mut backoff = Backoff::new();
    // Note the position (or take the interrupted bootstrap's) and move the group to it.
    let (position, mut after, mut rows) = loop {
        if shutdown.is_set() {
            return Ok(false);
        }
        let noted = async {
            let mut conn = pooled(shared).await?;
            let resumed = match (&reason, progress.positions(shared.streams.len())) {
                (Reason::Resume, Some(positions)) => Some(positions),
                (Reason::Resume, None) => {
                    tracing::warn!(pipeline = %shared.pipeline, position = %progress.position, streams = shared.streams.len(), "The interrupted bootstrap's noted positions do not match the stream's partitions; starting it over.");
                    None
                }
                _ => None,
            };
            let (positions, after, rows) = if let Some(positions) = resumed {
                (positions, progress.after.clone(), progress.rows)
            } else {
                let mut positions = Vec::with_capacity(shared.streams.len());
                for stream in &shared.streams {
                    positions.push(on_redis!(&mut conn, |c| last_generated_id(c, stream))?);
                }
                let noted: Vec<&str> = positions.iter().map(|(p, _)| p.as_str()).collect();
                let added: Vec<String> = positions
                    .iter()
                    .map(|(_, n)| n.map_or(String::new(), |n| n.to_string()))
                    .collect();
                let now = ecst_schemas::envelope::format_timestamp(time::OffsetDateTime::now_utc());
                let mut pipe = redis::pipe();
                pipe.cmd("DEL").arg(&keys.progress).ignore();
                pipe.cmd("HSET")
                    .arg(&keys.progress)
                    .arg("state")
                    .arg("running")
                    .arg("position")
                    .arg(noted.join(" "))
                    .arg("entries_added")
                    .arg(added.join(" "))
                    .arg("after")
                    .arg("")
                    .arg("rows")
                    .arg(0)
                    .arg("started_at")
                    .arg(&now)
                    .arg("holder")
                    .arg(&me)
                    .arg("sweep")
                    .arg(if sweeps(&reason) { "1" } else { "0" })
                    .ignore();
                on_redis!(&mut conn, |c| pipe.query_async::<()>(c))?;
                (positions, None, 0)
            };
            for (stream, (position, entries_added)) in shared.streams.iter().zip(&positions) {
                on_redis!(&mut conn, |c| place_group(
                    c,
                    stream,
                    &group,
                    position,
                    *entries_added
                ))?;
            }
            let position = positions
                .iter()
                .map(|(p, _)| p.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            Ok::<_, String>((position, after, rows))
        }
        .await;
        match noted {
            Ok(noted) => break noted,
            Err(e) => {
                pause(
                    shared,
                    &mut backoff,
                    "Cannot start the bootstrap",
                    &e,
                    shutdown,
                )
                .await
            }
        }
    };
    tracing::info!(pipeline = %shared.pipeline, stream = %shared.stream, group = %shared.group, reason = %reason.describe(), source = %reader.describe(), position = %position, resume_after = ?after, "Bootstrap starting: the group streams from the noted position once the snapshot is applied.");
    // A gap (or a new group over an old replica) can hide deletions: rows no snapshot row
    // produces are removed at the end. Not after a forced bootstrap, while other workers
    // stream: what they add meanwhile is not in the snapshot (`ecst reconcile` covers that).
    let sweep = if reason == Reason::Resume {
        progress.sweep
    } else {
        sweeps(&reason)
    };
    let mut seen = SeenKeys::new(
        shared.pool.clone(),
        &shared.pipeline,
        dag.sinks().len(),
        config.timeout.0,
    );
    let lease = LeaseKeeper::start(shared.clone(), keys, &me, config.lease.0);
    let total = reader.count().await;
    let mut report = ProgressReport::new(&shared.pipeline, total);
    let mut done_here = 0u64;
    let started = Instant::now();
    loop {
        if shutdown.is_set() {
            tracing::info!(pipeline = %shared.pipeline, rows, after = ?after, "Bootstrap interrupted; the next start resumes it.");
            return Ok(false);
        }
        if lease.lost() {
            tracing::warn!(pipeline = %shared.pipeline, "Bootstrap lease lost; another worker continues it.");
            return Ok(true);
        }
        let lines = match reader
            .page(after.as_deref(), config.page_size, config.timeout.0)
            .await
        {
            Ok(lines) => lines,
            Err(e) => {
                pause(
                    shared,
                    &mut backoff,
                    "Fetching a snapshot page failed (the bootstrap is not done)",
                    &e,
                    shutdown,
                )
                .await;
                continue;
            }
        };
        if lines.is_empty() {
            break;
        }
        let n = lines.len() as u64;
        let mut outcomes = Outcomes::default();
        let (entries, records, cursor) = match page_records(lines, &mut outcomes) {
            Ok(page) => page,
            Err(e) => {
                pause(
                    shared,
                    &mut backoff,
                    "A snapshot page cannot be paged past",
                    &e,
                    shutdown,
                )
                .await;
                continue;
            }
        };
        // An async stage whose service is down waits; shutdown abandons the page.
        let per_sink = tokio::select! {
            per_sink = dag.run_decoded(&entries, records, &mut outcomes) => per_sink,
            _ = shutdown.wait() => return Ok(false),
        };
        if let Some(reason) = outcomes.halt.take() {
            return Err(Fatal(RunError::Halted(format!(
                "{reason}, in the snapshot"
            ))));
        }
        if sweep && seen.is_complete() {
            for (i, records) in per_sink.iter().enumerate() {
                if let Some(replica) = dag.sinks()[i].1.replica() {
                    let keys: Vec<String> = records
                        .iter()
                        .filter(|r| r.action == ecst_operators::Action::Upsert)
                        .filter_map(|r| replica.key_of(r).ok())
                        .collect();
                    if let Err(e) = seen.record(i, &keys).await {
                        tracing::warn!(pipeline = %shared.pipeline, error = %e, "Cannot record the snapshot's keys: rows the source no longer has will not be removed.");
                    }
                }
            }
        }
        let applied = complete(
            shared.clone(),
            Batch {
                entries,
                per_sink,
                outcomes,
                extra_dead: Vec::new(),
                trimmed: Vec::new(),
                ack: false,
                trace: None,
                repair: None,
            },
        );
        // A sink that is down retries forever; SIGTERM must still end the bootstrap (the page
        // is applied again on resume).
        tokio::select! {
            _ = applied => {}
            _ = shutdown.wait() => {
                tracing::info!(pipeline = %shared.pipeline, rows, after = ?after, "Bootstrap interrupted; the next start resumes it.");
                return Ok(false);
            }
        }
        rows += n;
        done_here += n;
        shared.stats.bootstrap_rows.fetch_add(n, Ordering::Relaxed);
        let saved = async {
            let mut conn = pooled(shared).await?;
            let mut cmd = redis::cmd("HSET");
            cmd.arg(&keys.progress)
                .arg("after")
                .arg(&cursor)
                .arg("rows")
                .arg(rows);
            on_redis!(&mut conn, |c| cmd.query_async::<()>(c))
        }
        .await;
        if let Err(e) = saved {
            // The page is applied; if the progress is lost it is applied again (harmlessly).
            tracing::warn!(pipeline = %shared.pipeline, error = %e, "Cannot record bootstrap progress.");
        }
        after = Some(cursor);
        backoff.reset();
        report.update(done_here, rows, false);
    }
    if sweep && (reason != Reason::Resume || progress.after.is_none()) {
        let sinks = dag.sinks().to_vec();
        let found = loop {
            match seen.sweep(&sinks, true, started_ms).await {
                Ok(found) => break found,
                // Retrying cannot bring back keys that were not recorded.
                Err(e) if !seen.is_complete() => {
                    tracing::warn!(pipeline = %shared.pipeline, error = %e, "Rows the source no longer has are not removed.");
                    break Vec::new();
                }
                Err(e) => {
                    pause(
                        shared,
                        &mut backoff,
                        "Removing rows the source no longer has",
                        &e.to_string(),
                        shutdown,
                    )
                    .await
                }
            }
            if shutdown.is_set() {
                return Ok(false);
            }
        };
        seen.discard().await;
        for ((sink, _), found) in sinks.iter().zip(&found) {
            if found.orphans > 0 {
                tracing::warn!(pipeline = %shared.pipeline, sink = %sink, removed = found.evicted, examples = ?found.examples, "Removed replica rows the source no longer has (their deletions were missed).");
            }
        }
    } else if sweep {
        tracing::warn!(pipeline = %shared.pipeline, "This bootstrap resumed midway, so it cannot tell which replica rows the source no longer has; run `ecst reconcile --repair` to remove them.");
    }
    loop {
        let finished = async {
            let mut conn = pooled(shared).await?;
            let now = ecst_schemas::envelope::format_timestamp(time::OffsetDateTime::now_utc());
            let mut cmd = redis::cmd("HSET");
            cmd.arg(&keys.progress)
                .arg("state")
                .arg("done")
                .arg("rows")
                .arg(rows)
                .arg("finished_at")
                .arg(&now);
            on_redis!(&mut conn, |c| cmd.query_async::<()>(c))
        }
        .await;
        match finished {
            Ok(()) => break,
            Err(e) if !shutdown.is_set() => {
                pause(
                    shared,
                    &mut backoff,
                    "Cannot record the bootstrap as done",
                    &e,
                    shutdown,
                )
                .await
            }
            Err(_) => return Ok(false),
        }
    }
    report.update(done_here, rows, true);
    shared.stats.retention_gap.store(false, Ordering::Relaxed);
    tracing::info!(pipeline = %shared.pipeline, rows, seconds = started.elapsed().as_secs_f64(), position = %position, "Bootstrap finished; streaming from the noted position.");
    Ok(true)
}

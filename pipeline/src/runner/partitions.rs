//! A partitioned stream's worker: it holds a fair share of the partitions by lease (see
//! [`crate::lease`]) and runs one read loop, a lane, per partition it holds; every lane feeds
//! the same stages and sinks.
//!
//! Every `lease / 3` the worker renews all its leases (also those of lanes still finishing),
//! heartbeats, and compares what it holds with its share of the live members: above it, the
//! highest partitions finish their in-flight batches and are given back; below it, free or
//! expired partitions are taken, and a lane on a taken partition first claims everything the
//! previous owner left pending. A renewal that finds another owner (or none that succeeded for
//! two thirds of a lease) stops the lane at once: another worker may be reading the partition,
//! and the version guard covers the overlap.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ecst_operators::redis_pool::is_transport_error;
use ecst_schemas::partition::partition_stream;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use super::{AbortOnDrop, RunOptions, group_watch, read_loop};
use crate::bootstrap::{self, Reason};
use crate::commit::Shared;
use crate::config::PipelineConfig;
use crate::dag::Dag;
use crate::error::RunError;
use crate::lease::{PartitionLeases, fair_share};
use crate::shutdown::Shutdown;
use crate::source::StreamSource;

/// How a lane ended.
enum LaneEnd {
    /// Asked to stop (shutdown, rebalance, fenced off).
    Stopped,
    /// Nothing left to read or pending (`--drain`).
    Drained,
    /// The partition's group missed entries that are gone from it.
    Gap(String),
}

/// Why a lane is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopping {
    /// Running.
    No,
    /// Above this worker's share: give the lease back once its batches are in.
    Rebalance,
    /// Another worker owns it now (or the lease could not be renewed): do not release.
    Fenced,
    /// The worker is shutting down: give the lease back.
    Shutdown,
}

struct Lane {
    generation: u64,
    renewed: Instant,
    stopping: Stopping,
    drained: bool,
    trigger: watch::Sender<bool>,
    task: Option<JoinHandle<Result<LaneEnd, RunError>>>,
    _watching: AbortOnDrop,
}

/// What every lane shares.
struct Context {
    config: PipelineConfig,
    options: RunOptions,
    /// The logical stream's: `stream` is its name, `streams` every partition's key.
    logical: Arc<Shared>,
    dag: Arc<Mutex<Dag>>,
}

/// Runs a worker of a partitioned stream until shutdown (or, with `drain`, until the
/// partitions it holds are drained).
pub(super) async fn run_partitioned(
    config: &PipelineConfig,
    options: RunOptions,
    mut shutdown: Shutdown,
    dag: Dag,
    logical: Arc<Shared>,
) -> Result<(), RunError> {
    let source_cfg = &config.source;
    let partitions = source_cfg.partitions;
    let consumer = logical.consumer.clone();
    // The lease owner is this process, not only its consumer name: two processes started
    // with the same `consumer` must not both believe they hold every partition.
    let owner = format!(
        "{consumer}#{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let leases = PartitionLeases::new(
        &source_cfg.stream,
        &source_cfg.group,
        &owner,
        source_cfg.lease.0,
    );
    let cx = Arc::new(Context {
        config: config.clone(),
        options,
        logical,
        dag: Arc::new(Mutex::new(dag)),
    });
    tracing::info!(pipeline = %config.name, stream = %source_cfg.stream, group = %source_cfg.group, consumer = %consumer, partitions, lease_ms = source_cfg.lease.0.as_millis() as u64, "Partitioned worker starting.");
    // One bootstrap for the whole logical stream (under its lease), before any partition is read.
    let hint = cx.options.bootstrap_only.then_some(Reason::Forced);
    if !settle(&cx, hint, &mut shutdown).await? {
        return if cx.options.bootstrap_only {
            Err(RunError::BootstrapInterrupted)
        } else {
            Ok(())
        };
    }
    if cx.options.bootstrap_only {
        return Ok(());
    }

    let tick = (source_cfg.lease.0 / 3).max(Duration::from_millis(100));
    let mut lanes: BTreeMap<u32, Lane> = BTreeMap::new();
    let mut failure: Option<RunError> = None;
    let mut gap: Option<String> = None;
    let mut share: Option<usize> = None;
    let mut last_round: Option<Instant> = None;
    loop {
        let stopping = shutdown.is_set() || failure.is_some() || gap.is_some();
        if stopping {
            for lane in lanes.values_mut() {
                if lane.stopping == Stopping::No {
                    lane.stopping = Stopping::Shutdown;
                }
                lane.trigger.send_replace(true);
            }
        }
        reap_finished(&cx, &leases, &mut lanes, &mut failure, &mut gap).await;
        if stopping && lanes.is_empty() {
            if failure.is_none()
                && !shutdown.is_set()
                && let Some(found) = gap.take()
            {
                if !settle(&cx, Some(Reason::Gap(found)), &mut shutdown).await? {
                    break;
                }
                last_round = None;
                continue;
            }
            break;
        }
        if last_round.is_none_or(|t| t.elapsed() >= tick) {
            last_round = Some(Instant::now());
            // Leases are renewed while lanes finish too: a lane still applying must not be
            // taken over before it acked.
            renew_all(&cx, &leases, &mut lanes).await;
            fence_unrenewed(&cx, &mut lanes);
            if !stopping {
                share = rebalance(&cx, &leases, &mut lanes).await.or(share);
            }
        }
        if !stopping
            && cx.options.drain
            && let Some(share) = share
            && lanes.len() >= share
            && lanes.values().all(|l| l.drained)
        {
            tracing::info!(pipeline = %config.name, partitions = lanes.len(), "Drained: the partitions this worker holds have nothing left to read and nothing pending.");
            break;
        }
        let wait = if stopping {
            Duration::from_millis(50)
        } else {
            tick.saturating_sub(last_round.map_or(tick, |t| t.elapsed()))
                .max(Duration::from_millis(10))
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait(), if !shutdown.is_set() => {}
        }
    }

    // Give every lease back and leave, so the other workers take over at once.
    for (p, lane) in std::mem::take(&mut lanes) {
        if lane.stopping != Stopping::Fenced {
            release(&cx, &leases, p, lane.generation).await;
        }
    }
    if let Ok(mut conn) = cx.logical.pool.get().await {
        conn.begin();
        let left = within(source_cfg.timeout.0, leases.leave(conn.conn())).await;
        conn.settle(&left);
    }
    failure.map_or(Ok(()), Err)
}

/// Makes the group ready on every partition, bootstrapping the logical stream when it must.
/// `false` when shutdown came first.
async fn settle(
    cx: &Context,
    hint: Option<Reason>,
    shutdown: &mut Shutdown,
) -> Result<bool, RunError> {
    let mut dag = cx.dag.lock().await;
    bootstrap::settle_group(&cx.config, &mut dag, &cx.logical, hint, shutdown).await
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "timed out"))
}

/// A lease command bounded by `deadline`; running out of time is an I/O error.
async fn within<T>(
    deadline: Duration,
    command: impl std::future::Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, redis::RedisError> {
    tokio::time::timeout(deadline, command)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
}

/// How long one lease command may take: less than the lease, so a slow Redis cannot keep a
/// lane reading past its expiry.
fn lease_call_deadline(cx: &Context) -> Duration {
    cx.config.source.timeout.0.min(cx.config.source.lease.0 / 2)
}

/// Stops lanes whose lease was not renewed for two thirds of a lease period (counted from
/// when the last successful renewal was sent): it may expire on the server any moment, and
/// another worker may then hold it.
fn fence_unrenewed(cx: &Context, lanes: &mut BTreeMap<u32, Lane>) {
    let limit = cx.config.source.lease.0 * 2 / 3;
    for (&p, lane) in lanes.iter_mut() {
        if lane.stopping != Stopping::Fenced && lane.renewed.elapsed() >= limit {
            tracing::warn!(pipeline = %cx.config.name, partition = p, "The lease of partition {p} could not be renewed in time; stopping its reads.");
            cx.logical
                .stats
                .partition(p)
                .lost
                .fetch_add(1, Ordering::Relaxed);
            lane.stopping = Stopping::Fenced;
            lane.trigger.send_replace(true);
        }
    }
}

/// Renews every lease this worker holds, all at once; a lease found taken over stops its lane.
async fn renew_all(cx: &Context, leases: &PartitionLeases, lanes: &mut BTreeMap<u32, Lane>) {
    let held: Vec<(u32, u64)> = lanes
        .iter()
        .filter(|(_, l)| l.stopping != Stopping::Fenced)
        .map(|(p, l)| (*p, l.generation))
        .collect();
    if held.is_empty() {
        return;
    }
    let Ok(mut conn) = cx.logical.pool.get().await else {
        return;
    };
    let deadline = lease_call_deadline(cx);
    let sent = Instant::now();
    let base = conn.conn().clone();
    let renewals = held.iter().map(|&(p, generation)| {
        let mut c = base.clone();
        async move {
            let renewed = within(deadline, leases.renew(&mut c, p, generation)).await;
            (p, renewed)
        }
    });
    conn.begin();
    let results = futures::future::join_all(renewals).await;
    let broken = results
        .iter()
        .find_map(|(_, r)| r.as_ref().err().filter(|e| is_transport_error(e)))
        .map(|_| Err::<(), _>(timed_out()));
    conn.settle(&broken.unwrap_or(Ok(())));
    for (p, renewed) in results {
        let Some(lane) = lanes.get_mut(&p) else {
            continue;
        };
        match renewed {
            Ok(true) => lane.renewed = sent,
            Ok(false) => {
                tracing::warn!(pipeline = %cx.config.name, partition = p, generation = lane.generation, "Lost partition {p} to another worker (its lease was taken over); stopping its reads now. The version guard keeps any overlap harmless.");
                cx.logical
                    .stats
                    .partition(p)
                    .lost
                    .fetch_add(1, Ordering::Relaxed);
                lane.stopping = Stopping::Fenced;
                lane.trigger.send_replace(true);
            }
            Err(e) => {
                tracing::warn!(pipeline = %cx.config.name, partition = p, error = %e, "Cannot renew the lease of partition {p}; retrying.");
            }
        }
    }
}

/// Heartbeats, then gives back partitions above this worker's fair share or takes free ones
/// up to it; returns the share (`None` when Redis could not be asked).
async fn rebalance(
    cx: &Arc<Context>,
    leases: &PartitionLeases,
    lanes: &mut BTreeMap<u32, Lane>,
) -> Option<usize> {
    let partitions = cx.config.source.partitions;
    let deadline = lease_call_deadline(cx);
    let mut conn = cx.logical.pool.get().await.ok()?;
    conn.begin();
    let members = within(deadline, leases.heartbeat(conn.conn())).await;
    conn.settle(&members);
    let members = match members {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(pipeline = %cx.config.name, error = %e, "Cannot renew this worker's membership; retrying.");
            return None;
        }
    };
    let index = members.iter().position(|m| m == leases.owner())?;
    let share = fair_share(partitions, members.len(), index) as usize;
    let held: Vec<u32> = lanes
        .iter()
        .filter(|(_, l)| l.stopping == Stopping::No)
        .map(|(p, _)| *p)
        .collect();
    if held.len() > share {
        for &p in held.iter().rev().take(held.len() - share) {
            if let Some(lane) = lanes.get_mut(&p) {
                tracing::info!(pipeline = %cx.config.name, partition = p, share, members = members.len(), "Giving partition {p} back to rebalance: finishing its in-flight batches first.");
                lane.stopping = Stopping::Rebalance;
                lane.trigger.send_replace(true);
            }
        }
    } else if held.len() < share {
        // Start where this member's even share would begin, so members rarely race.
        let start = (index as u64 * u64::from(partitions) / members.len() as u64) as u32;
        let mut want = share - held.len();
        for offset in 0..partitions {
            if want == 0 {
                break;
            }
            let p = (start + offset) % partitions;
            if lanes.contains_key(&p) {
                continue;
            }
            conn.begin();
            let taken = within(deadline, leases.acquire(conn.conn(), p)).await;
            conn.settle(&taken);
            match taken {
                Ok(Some(taken)) => {
                    tracing::info!(pipeline = %cx.config.name, partition = p, generation = taken.generation, previous = %taken.previous, "Took partition {p}.");
                    lanes.insert(p, start_lane(cx, p, taken.generation));
                    want -= 1;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(pipeline = %cx.config.name, partition = p, error = %e, "Cannot take the lease of partition {p}; retrying.");
                    break;
                }
            }
        }
    }
    Some(share)
}

/// Collects lanes whose task ended: gives back rebalanced ones, records drains, gaps and
/// failures.
async fn reap_finished(
    cx: &Context,
    leases: &PartitionLeases,
    lanes: &mut BTreeMap<u32, Lane>,
    failure: &mut Option<RunError>,
    gap: &mut Option<String>,
) {
    // Finished lanes, and drained ones (their task is gone) that are being stopped.
    let finished: Vec<u32> = lanes
        .iter()
        .filter(|(_, l)| match &l.task {
            Some(task) => task.is_finished(),
            None => l.stopping != Stopping::No,
        })
        .map(|(p, _)| *p)
        .collect();
    for p in finished {
        let Some(lane) = lanes.get_mut(&p) else {
            continue;
        };
        if let Some(task) = lane.task.take() {
            let end = match task.await {
                Ok(end) => end,
                Err(e) => Err(RunError::Config(format!(
                    "the lane of partition {p} failed: {e}"
                ))),
            };
            match end {
                Ok(LaneEnd::Drained) if lane.stopping == Stopping::No => {
                    lane.drained = true;
                    continue;
                }
                Ok(LaneEnd::Gap(found)) => {
                    gap.get_or_insert(format!("partition {p}: {found}"));
                }
                Ok(_) => {}
                // A partition given away whose batches cannot finish (a sink is down) is
                // left to its next owner: its entries stay pending and are claimed there.
                Err(e @ RunError::Abandoned(_))
                    if matches!(lane.stopping, Stopping::Rebalance | Stopping::Fenced) =>
                {
                    tracing::warn!(pipeline = %cx.config.name, partition = p, error = %e, "Partition {p} was given away with batches still unapplied; its next owner applies them.");
                }
                Err(e) => {
                    tracing::error!(pipeline = %cx.config.name, partition = p, error = %e, "The lane of partition {p} failed.");
                    failure.get_or_insert(e);
                }
            }
        }
        let Some(lane) = lanes.remove(&p) else {
            continue;
        };
        cx.logical
            .stats
            .partition(p)
            .owned
            .store(false, Ordering::Relaxed);
        // A fenced lane's lease is someone else's now; every other one goes back.
        if lane.stopping != Stopping::Fenced {
            release(cx, leases, p, lane.generation).await;
            if lane.stopping == Stopping::Rebalance {
                tracing::info!(pipeline = %cx.config.name, partition = p, "Gave partition {p} back.");
            }
        }
    }
}

async fn release(cx: &Context, leases: &PartitionLeases, partition: u32, generation: u64) {
    let Ok(mut conn) = cx.logical.pool.get().await else {
        return;
    };
    conn.begin();
    let released = within(
        lease_call_deadline(cx),
        leases.release(conn.conn(), partition, generation),
    )
    .await;
    conn.settle(&released);
    if let Err(e) = released {
        tracing::warn!(pipeline = %cx.config.name, partition, error = %e, "Cannot give the lease of partition {partition} back; it expires on its own.");
    }
}

/// Starts the lane of a partition just taken.
fn start_lane(cx: &Arc<Context>, partition: u32, generation: u64) -> Lane {
    let source_cfg = &cx.config.source;
    let mut config = cx.config.clone();
    config.source.stream = partition_stream(&source_cfg.stream, partition, source_cfg.partitions);
    config.source.dead_letter = Some(source_cfg.dead_letter_stream());
    let shared = Arc::new(Shared {
        pipeline: config.name.clone(),
        stream: config.source.stream.clone(),
        streams: vec![config.source.stream.clone()],
        group: source_cfg.group.clone(),
        consumer: cx.logical.consumer.clone(),
        dead_letter: source_cfg.dead_letter_stream(),
        dead_letter_maxlen: source_cfg.dead_letter_maxlen,
        max_deliveries: source_cfg.max_deliveries,
        timeout: source_cfg.timeout.0,
        pool: cx.logical.pool.clone(),
        redis_url: source_cfg.redis.clone(),
        sinks: cx.logical.sinks.clone(),
        stats: cx.logical.stats.clone(),
        partition: Some(partition),
        cluster: cx.logical.cluster,
        tap: cx.logical.tap.clone(),
    });
    let stats = cx.logical.stats.partition(partition);
    stats.owned.store(true, Ordering::Relaxed);
    stats.generation.store(generation, Ordering::Relaxed);
    stats.acquired.fetch_add(1, Ordering::Relaxed);
    let (trigger, lane_shutdown) = Shutdown::new();
    let watching = AbortOnDrop(tokio::spawn(group_watch::watch_group(shared.clone())));
    let cx = cx.clone();
    let task = tokio::spawn(async move { run_lane(cx, config, shared, lane_shutdown).await });
    Lane {
        generation,
        renewed: Instant::now(),
        stopping: Stopping::No,
        drained: false,
        trigger,
        task: Some(task),
        _watching: watching,
    }
}

async fn run_lane(
    cx: Arc<Context>,
    config: PipelineConfig,
    shared: Arc<Shared>,
    mut shutdown: Shutdown,
) -> Result<LaneEnd, RunError> {
    let mut source = StreamSource::new(&config.source, cx.logical.consumer.clone())
        .map_err(|e| RunError::Config(format!("invalid Redis URL {}: {e}", config.source.redis)))?;
    source.take_over();
    let ended = read_loop::stream_until(
        &config,
        &cx.options,
        &cx.dag,
        &shared,
        &mut source,
        &mut shutdown,
    )
    .await?;
    Ok(match ended {
        Some(gap) => LaneEnd::Gap(gap),
        None if shutdown.is_set() => LaneEnd::Stopped,
        None => LaneEnd::Drained,
    })
}

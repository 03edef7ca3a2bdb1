//! The worker: settle the group (bootstrapping when it must), then read batches, push them
//! through the DAG and hand each to a commit task, until shutdown, drain or a retention gap.
//!
//! A partitioned stream (`source.partitions` > 1) is read by `partitions`: the worker holds a
//! share of the partitions by lease and runs the read loop once per partition it holds.
//!
//! Inside: `read_loop` (XREADGROUP / XAUTOCLAIM into batches, at most `in_flight` of them
//! uncommitted), `keep_claimed` (entries of batches still being applied stay this worker's),
//! `group_watch` (the group's lag and pending count, for the metrics) and `trace` (per-event
//! spans that join each producer's trace).

mod group_watch;
mod keep_claimed;
mod partitions;
mod read_loop;
mod trace;

use std::sync::Arc;

use ecst_operators::redis_pool::{describe_run_error, redis_pool};
use ecst_schemas::partition::Partitioning;
use ecst_schemas::partition::partition_stream;

use crate::bootstrap::{self, Reason};
use crate::commit::Shared;
use crate::config::PipelineConfig;
use crate::dag::Dag;
pub use crate::error::RunError;
use crate::partitioning::ensure_partitioning;
use crate::retry::{Backoff, sleep_or_shutdown};
use crate::shutdown::Shutdown;
use crate::source::StreamSource;
use crate::stats::Stats;

/// How `run` behaves.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Exit once nothing is left to read and nothing is pending in the group.
    pub drain: bool,
    /// Bootstrap from the snapshot now, whatever the group's state, then exit.
    pub bootstrap_only: bool,
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
    let dag = Dag::build(config, stats.clone()).await?;
    // In the background: a store that does not answer must not hold up the start.
    let _seeding = AbortOnDrop(tokio::spawn(crate::metrics::seed_freshness(
        dag.sinks().iter().map(|(_, sink)| sink.clone()).collect(),
        stats.clone(),
    )));
    let pool = redis_pool(&source_cfg.redis, 4, source_cfg.timeout.0)
        .map_err(|e| RunError::Config(format!("invalid Redis URL {}: {e}", source_cfg.redis)))?;
    crate::preflight::check_redis_access(config).await?;
    // A partitioned worker must agree before it reads anything. A single-key worker starts
    // while Redis is down, as always, and stops once the check can answer and disagrees.
    let mut refused = None;
    let _checking = if source_cfg.partitions > 1 {
        if !agree_on_partitioning(config, &pool, &mut shutdown).await? {
            return Ok(());
        }
        None
    } else if check_partitioning(config, &pool).await?.is_none() {
        None
    } else {
        let watch = PartitioningWatch::start(config, &pool, shutdown);
        shutdown = watch.shutdown.clone();
        refused = Some(watch.refused.clone());
        Some(watch)
    };
    let result = run_settled(config, options, shutdown, stats, dag, pool, consumer).await;
    match refused.and_then(|slot| slot.lock().ok().and_then(|mut e| e.take())) {
        Some(e) => Err(e),
        None => result,
    }
}

/// The partitioning check of a single-key worker that started before Redis could answer it:
/// retried in the background; a refusal stops the worker through [`Self::shutdown`].
struct PartitioningWatch {
    /// Fires on the worker's own shutdown, or when the check refuses.
    shutdown: Shutdown,
    /// The refusal, once there is one.
    refused: Arc<std::sync::Mutex<Option<RunError>>>,
    _task: AbortOnDrop,
}

impl PartitioningWatch {
    fn start(
        config: &PipelineConfig,
        pool: &ecst_operators::redis_pool::RedisPool,
        mut outer: Shutdown,
    ) -> Self {
        let (stop, inner) = Shutdown::new();
        let refused: Arc<std::sync::Mutex<Option<RunError>>> = Arc::default();
        let (config, pool, slot, mut checking) =
            (config.clone(), pool.clone(), refused.clone(), inner.clone());
        let task = tokio::spawn(async move {
            let refusal = tokio::select! {
                _ = outer.wait() => None,
                agreed = agree_on_partitioning(&config, &pool, &mut checking) => agreed.err(),
            };
            match refusal {
                Some(e) => {
                    if let Ok(mut slot) = slot.lock() {
                        *slot = Some(e);
                    }
                }
                // Agreed: the worker's own shutdown still has to reach it.
                None => outer.wait().await,
            }
            stop.send_replace(true);
        });
        PartitioningWatch {
            shutdown: inner,
            refused,
            _task: AbortOnDrop(task),
        }
    }
}

/// Runs the worker once the partitioning is (or is being) checked.
async fn run_settled(
    config: &PipelineConfig,
    options: RunOptions,
    mut shutdown: Shutdown,
    stats: Arc<Stats>,
    dag: Dag,
    pool: ecst_operators::redis_pool::RedisPool,
    consumer: String,
) -> Result<(), RunError> {
    let source_cfg = &config.source;
    let shared = Arc::new(Shared {
        pipeline: config.name.clone(),
        stream: source_cfg.stream.clone(),
        streams: (0..source_cfg.partitions)
            .map(|p| partition_stream(&source_cfg.stream, p, source_cfg.partitions))
            .collect(),
        group: source_cfg.group.clone(),
        consumer: consumer.clone(),
        dead_letter: source_cfg.dead_letter_stream(),
        dead_letter_maxlen: source_cfg.dead_letter_maxlen,
        max_deliveries: source_cfg.max_deliveries,
        timeout: source_cfg.timeout.0,
        pool,
        redis_url: source_cfg.redis.clone(),
        sinks: dag.sinks().to_vec(),
        stats: stats.clone(),
        partition: None,
        cluster: ecst_operators::redis_pool::is_cluster_url(&source_cfg.redis),
        tap: Arc::default(),
    });
    let _tap_watch = AbortOnDrop(tokio::spawn(crate::tap::watch(
        shared.pool.clone(),
        config.name.clone(),
        shared.timeout,
        shared.tap.clone(),
        shutdown.clone(),
    )));
    if source_cfg.partitions > 1 {
        return partitions::run_partitioned(config, options, shutdown, dag, shared).await;
    }
    let mut source = StreamSource::new(source_cfg, consumer.clone())
        .map_err(|e| RunError::Config(format!("invalid Redis URL {}: {e}", source_cfg.redis)))?;
    tracing::info!(pipeline = %config.name, stream = %source_cfg.stream, group = %source_cfg.group, consumer = %consumer, "Worker starting.");

    let _watching = AbortOnDrop(tokio::spawn(group_watch::watch_group(shared.clone())));
    let dag = Arc::new(tokio::sync::Mutex::new(dag));
    let mut hint = options.bootstrap_only.then_some(Reason::Forced);
    loop {
        let settled = bootstrap::settle_group(
            config,
            &mut *dag.lock().await,
            &shared,
            hint.take(),
            &mut shutdown,
        )
        .await?;
        if !settled {
            return if options.bootstrap_only {
                Err(RunError::BootstrapInterrupted)
            } else {
                Ok(())
            };
        }
        if options.bootstrap_only {
            return Ok(());
        }
        match read_loop::stream_until(config, &options, &dag, &shared, &mut source, &mut shutdown)
            .await?
        {
            Some(gap) => hint = Some(Reason::Gap(gap)),
            None => return Ok(()),
        }
    }
}

/// Checks the stream's recorded partitioning against the pipeline's (recording it for a new
/// partitioned stream): `Ok(None)` when they agree, `Ok(Some(why))` when Redis could not
/// answer, `Err` when they disagree.
async fn check_partitioning(
    config: &PipelineConfig,
    pool: &ecst_operators::redis_pool::RedisPool,
) -> Result<Option<String>, RunError> {
    let wanted = Partitioning::new(config.source.partitions);
    let mut conn = match pool.get().await {
        Ok(conn) => conn,
        Err(e) => return Ok(Some(describe_run_error(e))),
    };
    conn.begin();
    let checked = ensure_partitioning(conn.conn(), &config.source.stream, &wanted, "worker").await;
    let transport = matches!(
        &checked,
        Err(crate::partitioning::PartitioningError::Redis {
            transport: true,
            ..
        })
    );
    conn.settle(&if transport {
        Err(redis::RedisError::from((redis::ErrorKind::Io, "failed")))
    } else {
        Ok(())
    });
    match checked {
        Ok(()) => Ok(None),
        Err(e) if e.is_retryable() => Ok(Some(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// [`check_partitioning`] until Redis answers; `false` on shutdown.
async fn agree_on_partitioning(
    config: &PipelineConfig,
    pool: &ecst_operators::redis_pool::RedisPool,
    shutdown: &mut Shutdown,
) -> Result<bool, RunError> {
    let mut backoff = Backoff::new();
    while let Some(why) = check_partitioning(config, pool).await? {
        let wait = backoff.next_delay();
        tracing::warn!(pipeline = %config.name, error = %why, retry_in_ms = wait.as_millis() as u64, "Cannot check the stream's partitioning; retrying.");
        if !sleep_or_shutdown(wait, shutdown).await {
            return Ok(false);
        }
    }
    Ok(true)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

//! `ecst bench`: a synthetic ECST workload through a real pipeline, next to the ceiling of a
//! minimal guarded write straight to Redis, measured in the same run.
//!
//! With `--cluster`, `--partitions` and `--workers` it measures the scale-out: the workload
//! routed to partitions on a Redis Cluster, drained by several worker processes of one group,
//! with the Redis CPU each event cost summed over the masters.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use ecst_pipeline::config::{self, PipelineConfig};
use ecst_pipeline::runner::{self, RunOptions};
use ecst_pipeline::shutdown::Shutdown;
use ecst_pipeline::stats::Stats;
use ecst_schemas::partition::partition_stream;
use serde_json::json;

use super::bench_target::Target;
use super::bench_workers::{Workers, cpu_seconds};
use super::bench_workload::{
    Event, STATUSES, Workload, aggregate_id, display_name, now_rfc3339, partition_counts, workload,
    write_stream,
};

const BENCH_REDIS: &str = include_str!("../../../examples/bench.yaml");
const BENCH_POSTGRES: &str = include_str!("../../../examples/bench-postgres.yaml");
const BENCH_BOTH: &str = include_str!("../../../examples/bench-both.yaml");

/// Which replica the benchmark writes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BenchSink {
    Redis,
    Postgres,
    Both,
}

impl BenchSink {
    fn redis(self) -> bool {
        matches!(self, BenchSink::Redis | BenchSink::Both)
    }

    fn postgres(self) -> bool {
        matches!(self, BenchSink::Postgres | BenchSink::Both)
    }

    fn name(self) -> &'static str {
        match self {
            BenchSink::Redis => "redis",
            BenchSink::Postgres => "postgres",
            BenchSink::Both => "both",
        }
    }
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Redis URL.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    redis: String,
    /// Redis Cluster to run on instead (`redis+cluster://host1:7001,host2:7002`): the stream,
    /// the replica and the ceiling spread over its masters.
    #[arg(long)]
    cluster: Option<String>,
    /// Partitions of the benchmark stream: events are routed by `partition_of(aggregateId)`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    partitions: u32,
    /// Drain with this many `ecst run --drain` processes of one group instead of one worker
    /// inside the bench (the latency phase keeps the in-process worker).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: Option<u32>,
    /// Postgres URL, for `--sink postgres|both`; the ceiling uses it too. Loopback by default,
    /// without TLS: add `sslmode=require` to measure with it.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
        hide_env_values = true
    )]
    database: String,
    /// Replica to write: the built-in pipelines are examples/bench.yaml, bench-postgres.yaml
    /// and bench-both.yaml.
    #[arg(long, value_enum, default_value_t = BenchSink::Redis)]
    sink: BenchSink,
    /// Distinct aggregates.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) aggregates: u32,
    /// Versions per aggregate.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) versions: u32,
    /// Share of events written twice (0.05 = 5%).
    #[arg(long, default_value_t = 0.05)]
    pub(crate) duplicates: f64,
    /// Share of aggregates deleted at their last version.
    #[arg(long, default_value_t = 0.10)]
    pub(crate) deletes: f64,
    /// Events are shuffled inside windows of this many.
    #[arg(long, default_value_t = 1000)]
    pub(crate) window: usize,
    /// Pipeline file to run instead of the built-in one (it must read ${ECST_BENCH_STREAM},
    /// ${ECST_BENCH_GROUP}, ${ECST_BENCH_PARTITIONS} and write keys
    /// `${ECST_BENCH_PREFIX}athlete:{aggregateId}`, as examples/bench.yaml does).
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Producer rate of the latency phase, events/s.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    latency_rate: u32,
    /// Duration of the latency phase, seconds.
    #[arg(long, default_value_t = 3)]
    latency_seconds: u32,
    /// Random seed of the workload.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// The `${VAR}`s the bench pipelines read, for one run.
fn bench_env(
    args: &BenchArgs,
    stream: &str,
    group: &str,
    prefix: &str,
    table: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("ECST_BENCH_STREAM", stream.to_string()),
        ("ECST_BENCH_GROUP", group.to_string()),
        ("ECST_BENCH_PREFIX", prefix.to_string()),
        ("ECST_BENCH_TABLE", table.to_string()),
        ("ECST_BENCH_PARTITIONS", args.partitions.to_string()),
        ("DATABASE_URL", args.database.clone()),
        ("REDIS_URL", args.redis_url().to_string()),
    ]
}

/// The pipeline file's name (for messages) and text.
fn pipeline_text(args: &BenchArgs) -> anyhow::Result<(PathBuf, String)> {
    Ok(match &args.pipeline {
        Some(path) => (
            path.clone(),
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        ),
        None => match args.sink {
            BenchSink::Redis => (
                PathBuf::from("examples/bench.yaml (built in)"),
                BENCH_REDIS.to_string(),
            ),
            BenchSink::Postgres => (
                PathBuf::from("examples/bench-postgres.yaml (built in)"),
                BENCH_POSTGRES.to_string(),
            ),
            BenchSink::Both => (
                PathBuf::from("examples/bench-both.yaml (built in)"),
                BENCH_BOTH.to_string(),
            ),
        },
    })
}

fn load_pipeline(
    args: &BenchArgs,
    stream: &str,
    group: &str,
    prefix: &str,
    table: &str,
) -> anyhow::Result<PipelineConfig> {
    let (label, text) = pipeline_text(args)?;
    let overrides: HashMap<&str, String> = bench_env(args, stream, group, prefix, table)
        .into_iter()
        .collect();
    config::load_str(&label, &text, &|name| {
        overrides
            .get(name)
            .cloned()
            .or_else(|| std::env::var(name).ok())
    })
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Starts the process's peak RSS afresh, so that the drain's peak is not the ceiling's
/// command buffers; says whether Linux allowed it.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// What each command Redis ran during the drain cost per event, from two readings of
/// `INFO commandstats`: `{"hget": {"calls": 1.02, "us": 0.31}, ...}`. Time spent reading
/// requests and writing replies is in `INFO cpu` only; a script's time includes its commands'.
fn commands_per_event(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    events: usize,
) -> serde_json::Map<String, serde_json::Value> {
    let events = events.max(1) as f64;
    after
        .iter()
        .filter_map(|(command, &(calls, usec))| {
            let (calls_before, usec_before) = before.get(command).copied().unwrap_or_default();
            let calls = calls.saturating_sub(calls_before);
            (calls > 0).then(|| {
                let usec = usec.saturating_sub(usec_before) as f64;
                (
                    command.clone(),
                    json!({
                        "calls": (calls as f64 / events * 1e4).round() / 1e4,
                        "us": (usec / events * 1e3).round() / 1e3,
                    }),
                )
            })
        })
        .collect()
}

/// The reference: one EVALSHA per event doing HGET + HSET, pipelined, nothing else in the way.
const CEILING_SCRIPT: &str = r#"
local cur = redis.call('HGET', KEYS[1], '_version')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], '_version', ARGV[1], '_occurred_at', ARGV[2], 'display_name', ARGV[3],
  'status', ARGV[4], 'country_code', ARGV[5], 'weight_class', ARGV[6])
return 1
"#;

/// One measurement of the ceiling: its rate, and the CPU per event of Redis and of the bench
/// sending it (the client's share of the same work a worker does).
struct CeilingRun {
    events_per_sec: f64,
    redis_cpu_us_per_event: f64,
    client_cpu_us_per_event: Option<f64>,
}

async fn ceiling(target: &Target, prefix: &str, w: &Workload) -> anyhow::Result<CeilingRun> {
    let script = redis::Script::new(CEILING_SCRIPT);
    target
        .on_every_master(redis::cmd("SCRIPT").arg("LOAD").arg(CEILING_SCRIPT))
        .await
        .context("loading the ceiling script")?;
    let occurred = now_rfc3339();
    // Arguments are built and routed before the clock starts, a slice at a time to bound
    // memory: the ceiling measures Redis, not formatting. On a cluster the masters run their
    // shares concurrently, as the workers' writes do.
    let mut busy = Duration::ZERO;
    let mut redis_cpu = 0.0;
    let mut client_cpu = Some(0.0);
    for slice in w.events.chunks(50_000) {
        let routed = target.route(slice.iter().map(|&e| {
            let key = format!("{prefix}athlete:{}", aggregate_id(e.aggregate));
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(script.get_hash())
                .arg(1)
                .arg(&key)
                .arg(e.version)
                .arg(&occurred)
                .arg(display_name(e))
                .arg(STATUSES[(e.version % 3) as usize])
                .arg("GB")
                .arg("lightweight");
            (key, cmd)
        }));
        let redis_before = target.cpu_seconds().await?;
        let client_before = cpu_seconds();
        let started = Instant::now();
        target
            .run(&routed)
            .await
            .context("ceiling EVALSHA failed")?;
        busy += started.elapsed();
        let client_after = cpu_seconds();
        let redis_after = target.cpu_seconds().await?;
        redis_cpu += redis_after.iter().sum::<f64>() - redis_before.iter().sum::<f64>();
        client_cpu = client_cpu
            .zip(client_after.zip(client_before))
            .map(|(sum, ((after, _), (before, _)))| sum + after - before);
    }
    let events = w.events.len() as f64;
    Ok(CeilingRun {
        events_per_sec: events / busy.as_secs_f64(),
        redis_cpu_us_per_event: redis_cpu * 1e6 / events,
        client_cpu_us_per_event: client_cpu.map(|cpu| cpu * 1e6 / events),
    })
}

async fn verify(
    target: &Target,
    prefix: &str,
    w: &Workload,
    args: &BenchArgs,
) -> anyhow::Result<u64> {
    let mut mismatches = 0u64;
    let ids: Vec<u32> = (0..args.aggregates).collect();
    for chunk in ids.chunks(10_000) {
        let hashes: Vec<HashMap<String, String>> = target
            .query(chunk.iter().map(|&a| {
                let key = format!("{prefix}athlete:{}", aggregate_id(a));
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(&key);
                (key, cmd)
            }))
            .await
            .context("HGETALL failed")?;
        for (a, h) in chunk.iter().zip(hashes) {
            let last = Event {
                aggregate: *a,
                version: w.versions,
            };
            let ok = if w.deleted[*a as usize] {
                h.is_empty()
            } else {
                h.get("_version").map(String::as_str) == Some(&w.versions.to_string())
                    && h.get("display_name") == Some(&display_name(last))
                    && h.get("status").map(String::as_str)
                        == Some(STATUSES[(w.versions % 3) as usize])
            };
            if !ok {
                mismatches += 1;
            }
        }
    }
    Ok(mismatches)
}

/// Removes the keys whose names start with `prefix`, and their tombstones.
async fn cleanup(target: &Target, prefix: &str) -> anyhow::Result<()> {
    target.unlink_matching(&format!("{prefix}*")).await?;
    target
        .unlink_matching(&format!("ecst:tombstone:{prefix}*"))
        .await
}

/// Connects the way the sink does (same TLS options), so the ceiling pays what the sink pays.
async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let target = ecst_operators::postgres_tls::parse_postgres_url(url)?;
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(10), target.config.connect(target.tls))
            .await
            .context("Postgres did not answer within 10s")?
            .context("cannot connect to Postgres")?;
    tokio::spawn(connection);
    Ok(client)
}

/// The Postgres reference: the same rows upserted straight into a plain table with a guarded
/// multi-row INSERT ... ON CONFLICT ... WHERE, 1000 rows per statement, nothing else.
async fn pg_ceiling(
    client: &tokio_postgres::Client,
    table: &str,
    w: &Workload,
) -> anyhow::Result<f64> {
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (athlete_id text PRIMARY KEY, source_version bigint NOT NULL, \
             display_name text, status text, country_code text, weight_class text)"
        ))
        .await?;
    let sql = format!(
        "INSERT INTO {table} AS t SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[]) \
         ON CONFLICT (athlete_id) DO UPDATE SET source_version = excluded.source_version, display_name = excluded.display_name, \
         status = excluded.status, country_code = excluded.country_code, weight_class = excluded.weight_class \
         WHERE t.source_version < excluded.source_version"
    );
    let statement = client.prepare(&sql).await?;
    let mut busy = Duration::ZERO;
    for chunk in w.events.chunks(1000) {
        // One statement cannot update a row twice: the newest version per key, made before
        // the clock starts, as the Redis ceiling's arguments are.
        let mut newest: HashMap<u32, u32> = HashMap::new();
        for e in chunk {
            let v = newest.entry(e.aggregate).or_insert(e.version);
            *v = (*v).max(e.version);
        }
        let mut ids = Vec::with_capacity(newest.len());
        let (mut versions, mut names, mut statuses, mut countries, mut classes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (a, v) in newest {
            let e = Event {
                aggregate: a,
                version: v,
            };
            ids.push(format!("ath-{a}"));
            versions.push(i64::from(v));
            names.push(display_name(e));
            statuses.push(STATUSES[(v % 3) as usize].to_string());
            countries.push("GB".to_string());
            classes.push("lightweight".to_string());
        }
        let started = Instant::now();
        client
            .execute(
                &statement,
                &[&ids, &versions, &names, &statuses, &countries, &classes],
            )
            .await?;
        busy += started.elapsed();
    }
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await?;
    Ok(w.events.len() as f64 / busy.as_secs_f64())
}

async fn pg_verify(
    client: &tokio_postgres::Client,
    table: &str,
    w: &Workload,
    args: &BenchArgs,
) -> anyhow::Result<u64> {
    let rows = client
        .query(
            &format!("SELECT athlete_id, source_version, display_name, status FROM {table}"),
            &[],
        )
        .await?;
    let mut found: HashMap<String, (i64, Option<String>, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let mut mismatches = 0u64;
    for a in 0..args.aggregates {
        let row = found.remove(&format!("ath-{a}"));
        let last = Event {
            aggregate: a,
            version: w.versions,
        };
        let ok = if w.deleted[a as usize] {
            row.is_none()
        } else {
            row == Some((
                i64::from(w.versions),
                Some(display_name(last)),
                Some(STATUSES[(w.versions % 3) as usize].to_string()),
            ))
        };
        if !ok {
            mismatches += 1;
        }
    }
    Ok(mismatches + found.len() as u64)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)])
}

impl BenchArgs {
    /// The Redis the bench runs on: `--cluster` if given, else `--redis`.
    fn redis_url(&self) -> &str {
        self.cluster.as_deref().unwrap_or(&self.redis)
    }
}

/// How the throughput phase went.
struct Drained {
    elapsed: Duration,
    /// Known only for the in-process worker.
    applied: Option<u64>,
    stale: Option<u64>,
    dead_lettered: Option<u64>,
    /// The workers' peak RSS (the bench process's during the drain for the in-process worker).
    peak_rss_mb: Option<f64>,
    /// CPU seconds the workers used, start to exit (the bench process's own during the drain
    /// for the in-process worker); `None` where `/proc` cannot tell.
    worker_cpu_seconds: Option<f64>,
}

/// Drains the stream with one worker inside the bench.
async fn drain_in_process(pipeline: &PipelineConfig, events: u64) -> anyhow::Result<Drained> {
    let stats = Arc::new(Stats::default());
    let (_tx, shutdown) = Shutdown::new();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let worker = {
        let stats = stats.clone();
        let pipeline = pipeline.clone();
        tokio::spawn(async move {
            runner::run(
                &pipeline,
                RunOptions {
                    drain: true,
                    bootstrap_only: false,
                },
                shutdown,
                stats,
            )
            .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while stats.acked.load(Ordering::Relaxed) < events {
        if worker.is_finished() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    worker
        .await
        .context("bench worker panicked")?
        .context("bench worker failed")?;
    let worker_cpu_seconds = cpu_seconds()
        .zip(cpu_before)
        .map(|((after, _), (before, _))| after - before);
    let acked = stats.acked.load(Ordering::Relaxed);
    if acked < events {
        bail!("the worker acked {acked} of {events} events");
    }
    Ok(Drained {
        elapsed,
        applied: Some(stats.applied.load(Ordering::Relaxed)),
        stale: Some(stats.stale.load(Ordering::Relaxed)),
        dead_lettered: Some(stats.dead_lettered.load(Ordering::Relaxed)),
        peak_rss_mb: None,
        worker_cpu_seconds,
    })
}

/// Drains the stream with `workers` `ecst run --drain` processes; the clock stops when Redis
/// shows every partition read and acknowledged.
async fn drain_with_workers(
    args: &BenchArgs,
    target: &Target,
    env: &[(&str, String)],
    workers: u32,
    partitions: &[(String, u64)],
    run_id: &str,
) -> anyhow::Result<Drained> {
    let dir = std::env::temp_dir().join(format!("ecst-bench-{run_id}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file = match &args.pipeline {
        Some(path) => path.clone(),
        None => {
            let (_, text) = pipeline_text(args)?;
            let file = dir.join("pipeline.yaml");
            std::fs::write(&file, text)
                .with_context(|| format!("cannot write {}", file.display()))?;
            file
        }
    };
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut running = Workers::spawn(&file, env, workers, &dir)?;
    let logs = || format!("the workers' logs are in {}", dir.display());
    running
        .wait_drained(target, "bench", partitions, Duration::from_secs(600))
        .await
        .with_context(logs)?;
    let elapsed = started.elapsed();
    let peak_rss_mb = running.peak_rss_mb();
    running
        .finish(Duration::from_secs(60))
        .await
        .with_context(logs)?;
    // Every worker has exited and been waited for: their CPU is in the children's account.
    let worker_cpu_seconds = cpu_seconds()
        .zip(cpu_before)
        .map(|((_, after), (_, before))| after - before);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Drained {
        elapsed,
        applied: None,
        stale: None,
        dead_lettered: None,
        peak_rss_mb,
        worker_cpu_seconds,
    })
}

pub(crate) async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        time::OffsetDateTime::now_utc().unix_timestamp()
    );
    let target = Target::connect(args.redis_url()).await?;
    let result = measure(&args, &target, &run_id).await;
    // Everything of this run has the stream's name in its key (partitions, dead letters,
    // replica, tombstones, the recorded partitioning), and goes, whether the run passed or not.
    let cleaned = target
        .unlink_matching(&format!("*ecst:bench:{run_id}*"))
        .await;
    let code = result?;
    cleaned.context("removing the benchmark's keys")?;
    Ok(code)
}

async fn measure(args: &BenchArgs, target: &Target, run_id: &str) -> anyhow::Result<ExitCode> {
    let stream = format!("ecst:bench:{run_id}");
    let latency_stream = format!("ecst:bench:{run_id}:latency");
    let prefix = format!("ecst:bench:{run_id}:");
    let ceiling_prefix = format!("ecst:bench:{run_id}:ceiling:");
    let table = format!("ecst_bench_{}", run_id.replace('-', "_"));
    let ceiling_table = format!("{table}_ceiling");
    let pg = if args.sink.postgres() {
        Some(pg_connect(&args.database).await?)
    } else {
        None
    };

    // Checked before anything is written, so that a bad file leaves nothing behind.
    let pipeline = load_pipeline(args, &stream, "bench", &prefix, &table)?;
    let w = workload(args);
    let events = w.events.len();
    if !args.json {
        eprintln!(
            "writing {events} events ({} aggregates x {} versions, {:.0}% duplicated, {:.0}% deleted) to {stream} ({} partition{}, {} master{})",
            args.aggregates,
            args.versions,
            args.duplicates * 100.0,
            args.deletes * 100.0,
            args.partitions,
            if args.partitions == 1 { "" } else { "s" },
            target.master_names().len(),
            if target.master_names().len() == 1 {
                ""
            } else {
                "s"
            },
        );
    }

    // The ceiling is measured before and after the drain, on its own keys, and averaged, so
    // that drift in the machine's speed during the run weighs on both sides alike.
    let mut redis_ceiling = Vec::new();
    let mut pg_ceiling_eps = Vec::new();
    if args.sink.redis() {
        redis_ceiling.push(ceiling(target, &ceiling_prefix, &w).await?);
        cleanup(target, &ceiling_prefix).await?;
    }
    if let Some(pg) = &pg {
        pg_ceiling_eps.push(pg_ceiling(pg, &ceiling_table, &w).await?);
    }

    write_stream(target, &stream, args.partitions, &w, &w.events).await?;
    let partition_events = partition_counts(&w, args.partitions);

    // Throughput: drain the pre-filled stream, while the masters' CPU time is counted.
    let commands_before = target.command_stats().await?;
    let cpu_before = target.cpu_seconds().await?;
    let drained = match args.workers {
        None => {
            if !reset_peak_rss() {
                eprintln!(
                    "warning: /proc/self/clear_refs refused a reset: peak RSS covers the whole run so far, the ceiling's commands included"
                );
            }
            drain_in_process(&pipeline, events as u64).await?
        }
        Some(workers) => {
            let partitions: Vec<(String, u64)> = partition_events
                .iter()
                .enumerate()
                .map(|(p, n)| (partition_stream(&stream, p as u32, args.partitions), *n))
                .collect();
            let env = bench_env(args, &stream, "bench", &prefix, &table);
            drain_with_workers(args, target, &env, workers, &partitions, run_id).await?
        }
    };
    let cpu_after = target.cpu_seconds().await?;
    let commands_after = target.command_stats().await?;
    let cpu_by_master: Vec<f64> = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|(after, before)| after - before)
        .collect();
    let redis_cpu_us_per_event = cpu_by_master.iter().sum::<f64>() * 1e6 / events as f64;
    let redis_commands = commands_per_event(&commands_before, &commands_after, events);
    let worker_cpu_us_per_event = drained
        .worker_cpu_seconds
        .map(|cpu| cpu * 1e6 / events as f64);
    let elapsed = drained.elapsed;
    let dead_lettered = match drained.dead_lettered {
        Some(n) => n,
        None => {
            let dlq = pipeline.source.dead_letter_stream();
            redis::cmd("XLEN")
                .arg(&dlq)
                .query_async::<u64>(&mut target.conn_for(&dlq))
                .await
                .context("XLEN of the dead-letter stream")?
        }
    };
    let events_per_sec = events as f64 / elapsed.as_secs_f64();
    let rss = drained.peak_rss_mb.unwrap_or_else(peak_rss_mb);
    let mut mismatches = 0;
    if args.sink.redis() {
        mismatches += verify(target, &prefix, &w, args).await?;
        redis_ceiling.push(ceiling(target, &ceiling_prefix, &w).await?);
    }
    if let Some(pg) = &pg {
        mismatches += pg_verify(pg, &table, &w, args).await?;
        pg_ceiling_eps.push(pg_ceiling(pg, &ceiling_table, &w).await?);
    }
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let of_ceiling = |f: fn(&CeilingRun) -> Option<f64>| {
        let values: Option<Vec<f64>> = redis_ceiling.iter().map(f).collect();
        values.and_then(|v| mean(&v))
    };
    let ceiling_redis_cpu = of_ceiling(|c| Some(c.redis_cpu_us_per_event));
    let ceiling_client_cpu = of_ceiling(|c| c.client_cpu_us_per_event);
    let redis_ceiling = of_ceiling(|c| Some(c.events_per_sec));
    let pg_ceiling_eps = mean(&pg_ceiling_eps);
    // With both sinks the slower store bounds the pipeline, so it is the ceiling.
    let ceiling_eps = match (redis_ceiling, pg_ceiling_eps) {
        (Some(r), Some(p)) => r.min(p),
        (Some(r), None) => r,
        (None, Some(p)) => p,
        (None, None) => f64::NAN,
    };

    // Latency: a live producer at a fixed rate, XADD to ack per event.
    let latency_pipeline = load_pipeline(
        args,
        &latency_stream,
        "bench",
        &format!("{prefix}latency:"),
        &format!("{table}_latency"),
    )?;
    let latency_stats = Arc::new(Stats::default());
    latency_stats.record_latencies();
    let (tx, shutdown) = Shutdown::new();
    let worker = {
        let stats = latency_stats.clone();
        tokio::spawn(async move {
            runner::run(
                &latency_pipeline,
                RunOptions {
                    drain: false,
                    bootstrap_only: false,
                },
                shutdown,
                stats,
            )
            .await
        })
    };
    let total = u64::from(args.latency_rate) * u64::from(args.latency_seconds);
    let tick = Duration::from_millis(10);
    let per_tick = (u64::from(args.latency_rate) / 100).max(1);
    let mut sent = 0u64;
    let mut interval = tokio::time::interval(tick);
    let lw = Workload {
        events: Vec::new(),
        deleted: vec![false; total as usize + 1],
        versions: 1,
    };
    while sent < total {
        interval.tick().await;
        let n = per_tick.min(total - sent);
        let batch: Vec<Event> = (sent..sent + n)
            .map(|i| Event {
                aggregate: i as u32,
                version: 1,
            })
            .collect();
        write_stream(target, &latency_stream, args.partitions, &lw, &batch).await?;
        sent += n;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while latency_stats.acked.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = tx.send(true);
    worker
        .await
        .context("latency worker panicked")?
        .context("latency worker failed")?;
    let mut latencies = latency_stats.take_latencies();
    latencies.sort_unstable();
    let (p50, p99) = (percentile(&latencies, 50.0), percentile(&latencies, 99.0));

    if let Some(pg) = &pg {
        pg.batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_tombstones; \
             DROP TABLE IF EXISTS {table}_latency; DROP TABLE IF EXISTS {table}_latency_tombstones"
        ))
        .await?;
    }

    let ratio = events_per_sec / ceiling_eps;
    let report = json!({
        "sink": args.sink.name(),
        "redis_ceiling_events_per_sec": redis_ceiling.map(f64::round),
        "postgres_ceiling_events_per_sec": pg_ceiling_eps.map(f64::round),
        "events": events,
        "aggregates": args.aggregates,
        "versions": args.versions,
        "seconds": elapsed.as_secs_f64(),
        "events_per_sec": events_per_sec.round(),
        "ceiling_events_per_sec": ceiling_eps.round(),
        "ratio": (ratio * 1000.0).round() / 1000.0,
        "p50_ms": p50,
        "p99_ms": p99,
        "latency_rate": args.latency_rate,
        "latency_samples": latencies.len(),
        "peak_rss_mb": (rss * 10.0).round() / 10.0,
        "mismatches": mismatches,
        "applied": drained.applied,
        "stale": drained.stale,
        "dead_lettered": dead_lettered,
        "masters": target.master_names().len(),
        "partitions": args.partitions,
        "workers": args.workers,
        "partition_events": partition_events,
        "redis_cpu_us_per_event": (redis_cpu_us_per_event * 100.0).round() / 100.0,
        "redis_commands_per_event": redis_commands,
        "redis_cpu_seconds_by_master": target
            .master_names()
            .into_iter()
            .zip(&cpu_by_master)
            .map(|(name, cpu)| (name, json!((cpu * 1000.0).round() / 1000.0)))
            .collect::<serde_json::Map<_, _>>(),
        "worker_cpu_seconds": drained.worker_cpu_seconds.map(|cpu| (cpu * 100.0).round() / 100.0),
        "worker_cpu_us_per_event": worker_cpu_us_per_event.map(|us| (us * 100.0).round() / 100.0),
        "ceiling_redis_cpu_us_per_event": ceiling_redis_cpu.map(|us| (us * 100.0).round() / 100.0),
        "ceiling_client_cpu_us_per_event": ceiling_client_cpu.map(|us| (us * 100.0).round() / 100.0),
    });
    if args.json {
        println!("{report}");
    } else {
        println!("events            {events}");
        println!(
            "throughput        {:.0} events/s ({:.2}s)",
            events_per_sec,
            elapsed.as_secs_f64()
        );
        if let Some(r) = redis_ceiling {
            println!(
                "Redis ceiling     {r:.0} events/s (HGET+HSET Lua per event, pipelined, same Redis)"
            );
        }
        if let Some(p) = pg_ceiling_eps {
            println!(
                "Postgres ceiling  {p:.0} events/s (guarded UNNEST upsert, 1000 rows per statement)"
            );
        }
        println!("ratio             {:.1}% of ceiling", ratio * 100.0);
        println!(
            "apply latency     p50 {p50:.0} ms, p99 {p99:.0} ms (XADD to ack, producer at {} events/s)",
            args.latency_rate
        );
        println!(
            "Redis CPU         {redis_cpu_us_per_event:.1} µs per event over {} master{} (INFO cpu, whole servers)",
            cpu_by_master.len(),
            if cpu_by_master.len() == 1 { "" } else { "s" }
        );
        println!(
            "workers           {} over {} partition{}",
            args.workers
                .map_or("1 in the bench".to_string(), |m| format!("{m} processes")),
            args.partitions,
            if args.partitions == 1 { "" } else { "s" }
        );
        if let Some(us) = worker_cpu_us_per_event {
            println!("worker CPU        {us:.1} µs per event (user + system, all workers)");
        }
        if let (Some(redis), Some(client)) = (ceiling_redis_cpu, ceiling_client_cpu) {
            println!(
                "ceiling CPU       Redis {redis:.1} µs, client {client:.1} µs per event (same counters, the ceiling run)"
            );
        }
        println!("peak RSS          {rss:.1} MB (during the drain)");
        println!("mismatches        {mismatches}");
    }
    Ok(if mismatches == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

//! One test case, run through the pipeline's real stages and sinks against its real stores,
//! isolated: Redis sinks write under a key prefix of the case's own (their hashes, tombstones
//! and freshness record), Postgres sinks into a schema of its own created for the case, and
//! dead letters go to a stream under the prefix. Everything is removed afterwards, also when
//! the case fails or cannot run.
//!
//! No stream or consumer group is involved: the entries are handed to the DAG as a read would
//! hand them, and the batches are committed as a worker commits them (`commit::complete`,
//! without the XACK). A case tests what the stages and the stores decide; reading and acking
//! are the worker's own tests' business, and a group per case would only add keys to remove.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ecst_operators::redis_pool::{RedisManager, is_cluster_url, redis_pool};
use ecst_operators::sinks::postgres::PostgresConfig;
use ecst_operators::sinks::redis_hash::RedisHashConfig;
use ecst_operators::{Outcomes, RawEntry, SecretUrl, StageConfig};
use serde_json::{Map, Value};

use super::{Input, TestCase};
use crate::commit::{Batch, Shared, complete};
use crate::config::PipelineConfig;
use crate::dag::{Dag, Decision, Trace};
use crate::stats::Stats;

/// How long one batch may take to commit: a sink whose store does not answer is retried by
/// the commit forever, which a test must not do.
const COMMIT_DEADLINE: Duration = Duration::from_secs(30);

/// Why a case could not run (a store unreachable, a sink that cannot be built).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TestError(pub String);

/// Where a case's writes went, all of it removed after the case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Isolation {
    /// Prefix of every Redis key the case wrote (its sinks' hashes and tombstones, its dead
    /// letters).
    pub redis_prefix: String,
    /// The Postgres schema its Postgres sinks wrote to.
    pub postgres_schema: String,
}

impl Isolation {
    /// A new, unique place.
    pub fn new() -> Self {
        let id = format!("{}_{:08x}", std::process::id(), rand::random::<u32>());
        Isolation {
            redis_prefix: format!("ecst-test:{id}:"),
            postgres_schema: format!("ecst_test_{id}"),
        }
    }

    fn dead_letters(&self) -> String {
        format!("{}dead-letters", self.redis_prefix)
    }
}

impl Default for Isolation {
    fn default() -> Self {
        Isolation::new()
    }
}

/// A replica entry as read after the case: its fields (or columns), or `None` when absent.
pub type ReplicaEntry = Option<Map<String, Value>>;

/// What happened in a case.
#[derive(Debug, Clone, Default)]
pub struct CaseRun {
    /// What each stage and sink did, with entries numbered from 1 over the whole case.
    pub decisions: Vec<Decision>,
    /// The entries dead-lettered (numbered from 1), with their reasons.
    pub dead_letters: Vec<(usize, String)>,
    /// Per sink, per expected key: the replica entry.
    pub replicas: BTreeMap<String, BTreeMap<String, ReplicaEntry>>,
    /// Why a stage stopped the worker, if one did: the batch and the rest are not committed.
    pub stopped: Option<String>,
}

/// Runs `case` against `pipeline` in `isolation`, and removes what it wrote.
pub async fn run_case(
    pipeline: &PipelineConfig,
    case: &TestCase,
    isolation: &Isolation,
) -> Result<CaseRun, TestError> {
    let isolated = isolate(pipeline, isolation);
    let redis_urls = redis_urls(&isolated)?;
    for url in &redis_urls {
        ping(url).await?;
    }
    let mut schemas = Schemas(Vec::new());
    let result = match schemas.create(&isolated, isolation).await {
        Ok(()) => run_isolated(&isolated, case, isolation).await,
        Err(e) => Err(e),
    };
    let cleaned = clean_up(&isolated, isolation, &redis_urls, schemas).await;
    let run = result?;
    cleaned?;
    Ok(run)
}

/// The pipeline with every sink writing into `isolation`.
fn isolate(pipeline: &PipelineConfig, isolation: &Isolation) -> PipelineConfig {
    let mut isolated = pipeline.clone();
    let prefix = &isolation.redis_prefix;
    for stage in &mut isolated.stages {
        match &mut stage.config {
            StageConfig::RedisHash(sink) => {
                sink.key = format!("{prefix}{}", sink.key);
                sink.tombstone_prefix = format!("{prefix}{}", sink.tombstone_prefix);
            }
            StageConfig::Postgres(sink) => {
                sink.schema = isolation.postgres_schema.clone();
                sink.create = true;
            }
            _ => {}
        }
    }
    isolated
}

fn redis_sinks(pipeline: &PipelineConfig) -> impl Iterator<Item = (&str, &RedisHashConfig)> {
    pipeline.stages.iter().filter_map(|s| match &s.config {
        StageConfig::RedisHash(sink) => Some((s.name.as_str(), sink)),
        _ => None,
    })
}

fn postgres_sinks(pipeline: &PipelineConfig) -> impl Iterator<Item = (&str, &PostgresConfig)> {
    pipeline.stages.iter().filter_map(|s| match &s.config {
        StageConfig::Postgres(sink) => Some((s.name.as_str(), sink)),
        _ => None,
    })
}

fn sink_redis<'a>(pipeline: &'a PipelineConfig, sink: &'a RedisHashConfig) -> &'a SecretUrl {
    sink.redis.as_ref().unwrap_or(&pipeline.source.redis)
}

/// Every Redis the case writes to: the source's (dead letters) and each Redis sink's.
fn redis_urls(pipeline: &PipelineConfig) -> Result<Vec<SecretUrl>, TestError> {
    let mut urls = vec![pipeline.source.redis.clone()];
    for (_, sink) in redis_sinks(pipeline) {
        let url = sink_redis(pipeline, sink);
        if !urls.iter().any(|u| u.expose() == url.expose()) {
            urls.push(url.clone());
        }
    }
    if let Some(url) = urls.iter().find(|u| is_cluster_url(u)) {
        return Err(TestError(format!(
            "{url} is a Redis Cluster; ecst test runs against one Redis server (point the pipeline's URLs at one with ${{REDIS_URL}})"
        )));
    }
    Ok(urls)
}

async fn connect_redis(
    url: &SecretUrl,
) -> Result<ecst_operators::redis_pool::RedisConn, TestError> {
    let timeout = Duration::from_secs(5);
    let manager = RedisManager::new(url, timeout)
        .map_err(|e| TestError(format!("invalid Redis URL {url}: {e}")))?;
    manager
        .connect_once(timeout)
        .await
        .map_err(|e| TestError(format!("cannot reach Redis at {url}: {e}")))
}

async fn ping(url: &SecretUrl) -> Result<(), TestError> {
    let mut conn = connect_redis(url).await?;
    redis::cmd("PING")
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| TestError(format!("Redis at {url} does not answer PING: {e}")))
}

/// The case's Postgres schema, created on every Postgres its sinks write to.
struct Schemas(Vec<(SecretUrl, tokio_postgres::Client)>);

impl Schemas {
    /// Creates the schema on each Postgres; those reached stay in `self` even when a later
    /// one fails, so that the clean-up drops them.
    async fn create(
        &mut self,
        pipeline: &PipelineConfig,
        isolation: &Isolation,
    ) -> Result<(), TestError> {
        for (_, sink) in postgres_sinks(pipeline) {
            if self.0.iter().any(|(u, _)| u.expose() == sink.url.expose()) {
                continue;
            }
            let client = connect_postgres(&sink.url).await?;
            let create = format!("CREATE SCHEMA {}", quoted(&isolation.postgres_schema));
            let created = client.batch_execute(&create).await;
            self.0.push((sink.url.clone(), client));
            created.map_err(|e| {
                TestError(format!(
                    "cannot create schema {}: {e}",
                    isolation.postgres_schema
                ))
            })?;
        }
        Ok(())
    }
}

fn quoted(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

async fn connect_postgres(url: &SecretUrl) -> Result<tokio_postgres::Client, TestError> {
    let target = ecst_operators::postgres_tls::parse_postgres_url(url.expose())
        .map_err(|e| TestError(format!("invalid Postgres URL {url}: {e}")))?;
    let connecting = target.config.connect(target.tls.clone());
    let (client, connection) = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| TestError(format!("cannot reach Postgres at {url}: timed out")))?
        .map_err(|e| TestError(format!("cannot reach Postgres at {url}: {e}")))?;
    tokio::spawn(connection);
    // Every statement of a case (schema creation, replica reads, the drop) is bounded by the
    // server: a DROP queued behind a lock must not hang the run.
    let configure = client.batch_execute("SET statement_timeout = '30s'; SET lock_timeout = '30s'");
    tokio::time::timeout(Duration::from_secs(10), configure)
        .await
        .map_err(|_| TestError(format!("Postgres at {url} did not answer: timed out")))?
        .map_err(|e| TestError(format!("cannot configure the session on {url}: {e}")))?;
    Ok(client)
}

async fn run_isolated(
    pipeline: &PipelineConfig,
    case: &TestCase,
    isolation: &Isolation,
) -> Result<CaseRun, TestError> {
    let stats = Arc::new(Stats::default());
    let mut dag = Dag::build(pipeline, stats.clone())
        .await
        .map_err(|e| TestError(e.to_string()))?;
    let source = &pipeline.source;
    let pool = redis_pool(&source.redis, 2, source.timeout.0)
        .map_err(|e| TestError(format!("invalid Redis URL {}: {e}", source.redis)))?;
    let shared = Arc::new(Shared {
        pipeline: pipeline.name.clone(),
        stream: source.stream.clone(),
        streams: vec![source.stream.clone()],
        group: source.group.clone(),
        consumer: "ecst-test".into(),
        dead_letter: isolation.dead_letters(),
        dead_letter_maxlen: source.dead_letter_maxlen,
        max_deliveries: source.max_deliveries,
        timeout: source.timeout.0,
        pool,
        redis_url: source.redis.clone(),
        sinks: dag.sinks().to_vec(),
        stats,
        partition: None,
        cluster: false,
        tap: Arc::default(),
    });
    let entries = entries(pipeline, case);
    let mut run = CaseRun::default();
    let batch_size = case.batch_size.unwrap_or(entries.len()).max(1);
    for (b, batch) in entries.chunks(batch_size).enumerate() {
        let offset = b * batch_size;
        let mut outcomes = Outcomes::default();
        let mut trace = Trace::default();
        let per_sink = dag.run_traced(batch, &mut outcomes, &mut trace).await;
        // A worker stops here without committing the batch; so does the case.
        if let Some(reason) = outcomes.halt.take() {
            run.stopped = Some(reason);
            break;
        }
        let committed = complete(
            shared.clone(),
            Batch {
                entries: batch.to_vec(),
                per_sink,
                outcomes,
                extra_dead: Vec::new(),
                trimmed: Vec::new(),
                ack: false,
                trace: Some(trace),
                repair: None,
            },
        );
        let trace = tokio::time::timeout(COMMIT_DEADLINE, committed)
            .await
            .map_err(|_| {
                TestError(format!(
                    "a batch did not commit within {}s: a sink's store or the source's Redis does not take writes (the log above says why)",
                    COMMIT_DEADLINE.as_secs()
                ))
            })?
            .unwrap_or_default();
        run.decisions
            .extend(trace.decisions.into_iter().map(|d| Decision {
                entry: d.entry + offset + 1,
                ..d
            }));
    }
    run.dead_letters = dead_letters(&source.redis, isolation).await?;
    run.replicas = replicas(pipeline, case, isolation).await?;
    Ok(run)
}

/// The case's inputs as stream entries, ids `1-0`, `2-0`, ...
fn entries(pipeline: &PipelineConfig, case: &TestCase) -> Vec<RawEntry> {
    let body_field = pipeline
        .stages
        .iter()
        .find_map(|s| match &s.config {
            StageConfig::Decode(decode) => Some(decode.field.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "v".into());
    case.input
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let n = i + 1;
            let fields = match input {
                Input::Event(event) => {
                    let mut event = event.clone();
                    if event.contains_key("aggregateId") {
                        let now = time::OffsetDateTime::now_utc();
                        let defaults = [
                            ("eventId", Value::from(format!("ecst-test-{n}"))),
                            (
                                "occurredAt",
                                Value::from(ecst_schemas::envelope::format_timestamp(now)),
                            ),
                        ];
                        for (key, value) in defaults {
                            event.entry(key).or_insert(value);
                        }
                    }
                    let body = Value::Object(event).to_string().into_bytes();
                    vec![(body_field.clone(), body)]
                }
                Input::Fields(fields) => fields
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
                    .collect(),
            };
            RawEntry {
                id: format!("{n}-0"),
                fields,
            }
        })
        .collect()
}

/// The dead letters the case wrote, by entry number.
async fn dead_letters(
    redis: &SecretUrl,
    isolation: &Isolation,
) -> Result<Vec<(usize, String)>, TestError> {
    let mut conn = connect_redis(redis).await?;
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(isolation.dead_letters())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .map_err(|e| TestError(format!("cannot read the dead letters from {redis}: {e}")))?;
    let mut dead = Vec::new();
    for letter in reply.ids {
        let source_id: Option<String> = letter.get("source_id");
        let entry = source_id
            .as_deref()
            .and_then(|id| id.strip_suffix("-0"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let reason: String = letter.get("error").unwrap_or_default();
        dead.push((entry, reason));
    }
    Ok(dead)
}

/// The replica entries the case names, read from each sink's store.
async fn replicas(
    pipeline: &PipelineConfig,
    case: &TestCase,
    isolation: &Isolation,
) -> Result<BTreeMap<String, BTreeMap<String, ReplicaEntry>>, TestError> {
    let mut replicas = BTreeMap::new();
    for (sink_name, keys) in &case.expect.replicas {
        let mut read = BTreeMap::new();
        let stage = pipeline.stages.iter().find(|s| &s.name == sink_name);
        match stage.map(|s| &s.config) {
            Some(StageConfig::RedisHash(sink)) => {
                let mut conn = connect_redis(sink_redis(pipeline, sink)).await?;
                for key in keys.keys() {
                    let hash: BTreeMap<String, String> = redis::cmd("HGETALL")
                        .arg(format!("{}{key}", isolation.redis_prefix))
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| TestError(format!("cannot read hash {key}: {e}")))?;
                    let entry = (!hash.is_empty())
                        .then(|| hash.into_iter().map(|(k, v)| (k, Value::from(v))).collect());
                    read.insert(key.clone(), entry);
                }
            }
            Some(StageConfig::Postgres(sink)) => {
                let client = connect_postgres(&sink.url).await?;
                let columns = sink.key.columns();
                let [key_column] = columns.as_slice() else {
                    return Err(TestError(format!(
                        "sink `{sink_name}` has a composite key; ecst test reads rows by a one-column key only"
                    )));
                };
                let select = format!(
                    "SELECT row_to_json(t)::text FROM {}.{} t WHERE {}::text = $1",
                    quoted(&sink.schema),
                    quoted(&sink.table),
                    quoted(&key_column.column)
                );
                for key in keys.keys() {
                    let rows = client
                        .query(&select, &[key])
                        .await
                        .map_err(|e| TestError(format!("cannot read row {key}: {e}")))?;
                    let entry = match rows.first() {
                        Some(row) => match serde_json::from_str(row.get::<_, &str>(0)) {
                            Ok(Value::Object(columns)) => Some(columns),
                            _ => None,
                        },
                        None => None,
                    };
                    read.insert(key.clone(), entry);
                }
            }
            _ => {
                return Err(TestError(format!("the pipeline has no sink `{sink_name}`")));
            }
        }
        replicas.insert(sink_name.clone(), read);
    }
    Ok(replicas)
}

/// Removes everything the case wrote: the Postgres schema, and every Redis key under the
/// prefix plus the Redis sinks' freshness records.
async fn clean_up(
    pipeline: &PipelineConfig,
    isolation: &Isolation,
    redis_urls: &[SecretUrl],
    schemas: Schemas,
) -> Result<(), TestError> {
    let mut failures = Vec::new();
    for (url, client) in schemas.0 {
        let drop = format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quoted(&isolation.postgres_schema)
        );
        if let Err(e) = client.batch_execute(&drop).await {
            failures.push(format!(
                "cannot drop schema {} on {url}: {e}",
                isolation.postgres_schema
            ));
        }
    }
    for url in redis_urls {
        let freshness: Vec<String> = redis_sinks(pipeline)
            .filter(|(_, sink)| sink_redis(pipeline, sink).expose() == url.expose())
            .map(|(_, sink)| sink.freshness_key())
            .collect();
        if let Err(e) = remove_keys(url, &isolation.redis_prefix, &freshness).await {
            failures.push(e.0);
        }
    }
    match failures.is_empty() {
        true => Ok(()),
        false => Err(TestError(format!(
            "cleaning up after the case: {}",
            failures.join("; ")
        ))),
    }
}

async fn remove_keys(url: &SecretUrl, prefix: &str, extra: &[String]) -> Result<(), TestError> {
    let mut conn = connect_redis(url).await?;
    let failed =
        |e: redis::RedisError| TestError(format!("cannot remove {prefix}* from {url}: {e}"));
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await
                .map_err(failed)?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    if !extra.is_empty() {
        redis::cmd("DEL")
            .arg(extra)
            .query_async::<()>(&mut conn)
            .await
            .map_err(failed)?;
    }
    Ok(())
}

//! `redis_hash`: one Redis hash per aggregate, written behind a version guard in one Lua script
//! per batch (on a Redis Cluster, one per slot of the batch), which on one server also notes
//! the sink's freshness.

mod cluster;
mod delta;
mod pack;
mod replica;
mod script;
mod template;

use std::ops::Range;
use std::time::Duration;

use redis::Script;
use serde::Deserialize;

use crate::duration::ConfigDuration;
use crate::record::{Action, Record};
use crate::redis_pool::{
    RedisConn, RedisManager, RedisPool, check_redis_url, describe_run_error, is_cluster_url,
    is_transport_error, report_failure, resolve_failure,
};
use crate::replica::Replica;
use crate::secret::SecretUrl;
use crate::stage::{
    ApplyFuture, BuildContext, BuiltStage, ComponentConfig, ConfigProblem, FreshnessFuture, KeyDoc,
    ReplicaFreshness, Sink, SinkError, SinkReport,
};
use cluster::Tombstone;
pub use cluster::tombstone_key;
use script::{Freshness, Layout, ScriptCall};
pub use template::KeyTemplate;

/// Configuration of the `redis_hash` sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisHashConfig {
    /// Redis URL (default: the source's).
    #[serde(default)]
    pub redis: Option<SecretUrl>,
    /// Key template, e.g. `athlete:{aggregateId}`; placeholders are envelope paths.
    pub key: String,
    /// Hash field holding the applied version (default `_version`).
    #[serde(default = "default_version_field")]
    pub version_field: String,
    /// Hash field holding the source's `occurredAt` (default `_occurred_at`).
    #[serde(default = "default_occurred_at_field")]
    pub occurred_at_field: String,
    /// Hash field set to `1` under tombstone `mode: mark` (default `_deleted`).
    #[serde(default = "default_deleted_field")]
    pub deleted_field: String,
    /// Prefix of the keys remembering deleted versions (default `ecst:tombstone:`); on a Redis
    /// Cluster without `{` or `}`.
    #[serde(default = "default_tombstone_prefix")]
    pub tombstone_prefix: String,
    /// Pooled connections (default 4).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Timeout of connecting and of each batch write (default 5s).
    #[serde(default = "default_timeout")]
    pub timeout: ConfigDuration,
}

fn default_version_field() -> String {
    "_version".into()
}
fn default_occurred_at_field() -> String {
    "_occurred_at".into()
}
fn default_deleted_field() -> String {
    "_deleted".into()
}
fn default_tombstone_prefix() -> String {
    "ecst:tombstone:".into()
}
fn default_pool_size() -> u32 {
    4
}
fn default_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(5))
}

impl RedisHashConfig {
    pub(crate) fn check(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if let Err(e) = KeyTemplate::parse(&self.key) {
            problems.push(ConfigProblem::new("key", e));
        }
        for (key, value) in [
            ("version_field", &self.version_field),
            ("occurred_at_field", &self.occurred_at_field),
            ("deleted_field", &self.deleted_field),
        ] {
            if value.is_empty() {
                problems.push(ConfigProblem::new(key, "must not be empty"));
            }
        }
        if self.pool_size == 0 {
            problems.push(ConfigProblem::new("pool_size", "must be at least 1"));
        }
        if self.timeout.0.is_zero() {
            problems.push(ConfigProblem::new("timeout", "must be more than 0ms"));
        }
        if let Some(url) = &self.redis {
            if let Err(e) = check_redis_url(url) {
                problems.push(ConfigProblem::new(
                    "redis",
                    format!("invalid Redis URL {url}: {e}"),
                ));
            }
            if is_cluster_url(url)
                && let Some(problem) = cluster::prefix_problem(&self.tombstone_prefix)
            {
                problems.push(ConfigProblem::new("tombstone_prefix", problem));
            }
        }
        problems
    }

    /// Builds the sink; connections are opened lazily so a worker can start while Redis is down.
    pub fn build(&self, ctx: &BuildContext) -> Result<RedisHashSink, String> {
        let url = self
            .redis
            .clone()
            .unwrap_or_else(|| ctx.source_redis.clone());
        let manager = RedisManager::new(&url, self.timeout.0)
            .map_err(|e| format!("invalid Redis URL {url}: {e}"))?;
        let cluster = manager.is_cluster();
        // The source's URL is known only here, so `check` cannot see this when it is used.
        if cluster && let Some(problem) = cluster::prefix_problem(&self.tombstone_prefix) {
            return Err(format!("tombstone_prefix: {problem}"));
        }
        Ok(RedisHashSink {
            key: KeyTemplate::parse(&self.key)?,
            reporter: format!("redis_hash sink `{}`", ctx.stage),
            freshness_key: self.freshness_key(),
            config: self.clone(),
            url,
            pool: manager.into_pool(self.pool_size),
            cluster,
            delta_script: Script::new(delta::DELTA_SCRIPT),
        })
    }
}

/// The running `redis_hash` sink.
pub struct RedisHashSink {
    config: RedisHashConfig,
    key: KeyTemplate,
    /// The store's URL and this sink's name in reports of failures.
    url: SecretUrl,
    reporter: String,
    pool: RedisPool,
    /// Whether the store is a Redis Cluster: one script per slot, tombstones in their hash's slot.
    cluster: bool,
    /// The patch script (`delta.lua`).
    delta_script: Script,
    /// Where the sink notes its freshness (see [`RedisHashConfig::freshness_key`]).
    freshness_key: String,
}

/// A record the batch script writes, with its keys.
struct Write<'a> {
    record: &'a Record,
    /// Its hash key, in [`Writes::keys`].
    key: Range<usize>,
    tombstone: Tombstone,
}

/// The records of a batch the script writes, their keys rendered into one string.
struct Writes<'a> {
    keys: String,
    records: Vec<Write<'a>>,
}

impl RedisHashConfig {
    /// The hash where the sink records its freshness: `ecst:freshness:<key template>`.
    pub fn freshness_key(&self) -> String {
        format!("ecst:freshness:{}", self.key)
    }
}

impl RedisHashSink {
    /// Records when this batch was applied and its newest `occurredAt`, for `ecst status`,
    /// on a cluster, where the freshness hash has a slot of its own (on one server the batch
    /// script writes it). Best effort: the batch is committed already, and a missed note only
    /// ages the figure.
    async fn note_freshness(&self, newest: Option<time::OffsetDateTime>) {
        let now = time::OffsetDateTime::now_utc();
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&self.freshness_key)
            .arg("replicated_at")
            .arg(ecst_schemas::envelope::format_timestamp(now));
        if let Some(newest) = newest {
            cmd.arg("newest_occurred_at")
                .arg(ecst_schemas::envelope::format_timestamp(newest));
        }
        let Ok(mut conn) = self.pool.get().await else {
            return;
        };
        conn.begin();
        let result =
            tokio::time::timeout(self.config.timeout.0, cmd.query_async::<()>(conn.conn()))
                .await
                .unwrap_or_else(|_| {
                    Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out")))
                });
        conn.settle(&result);
        if let Err(e) = result {
            tracing::debug!(error = %e, "Cannot record the sink's freshness.");
        }
    }

    /// The records of `batch` to write; those whose keys cannot be made are rejected.
    fn writes<'a>(
        &self,
        batch: impl IntoIterator<Item = &'a Record, IntoIter: ExactSizeIterator>,
    ) -> (Writes<'a>, Vec<(usize, String)>) {
        let batch = batch.into_iter();
        let mut rejected = Vec::new();
        let mut writes = Writes {
            keys: String::with_capacity(batch.len() * 32),
            records: Vec::with_capacity(batch.len()),
        };
        for record in batch {
            let start = writes.keys.len();
            let tombstone = self
                .key
                .render_into(&record.event, &mut writes.keys)
                .and_then(|()| Tombstone::of(&writes.keys[start..], self.cluster));
            match tombstone {
                Ok(tombstone) => writes.records.push(Write {
                    record,
                    key: start..writes.keys.len(),
                    tombstone,
                }),
                Err(reason) => {
                    writes.keys.truncate(start);
                    rejected.push((record.entry, reason));
                }
            }
        }
        (writes, rejected)
    }

    /// One call of the batch script over `writes` (of `keys`), which on one server also notes
    /// the sink's `freshness`, as EVALSHA; refused for a record too large for any call.
    fn script_call(
        &self,
        keys: &str,
        writes: &[&Write<'_>],
        freshness: Option<&Freshness<'_>>,
    ) -> Result<ScriptCall, SinkError> {
        let layout = Layout {
            deleted: &self.config.deleted_field,
            version: &self.config.version_field,
            occurred_at: &self.config.occurred_at_field,
            tombstone_prefix: &self.config.tombstone_prefix,
        };
        script::call(&layout, keys, writes, freshness).map_err(|e| SinkError::Refused {
            store: STORE,
            message: e.to_string(),
        })
    }

    async fn eval(&self, call: &ScriptCall) -> Result<ScriptReply, redis::RedisError> {
        let mut conn = self.pool.get().await.map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::Io,
                "no pooled connection",
                describe_run_error(e),
            ))
        })?;
        conn.begin();
        let result = match call.cmd.query_async(conn.conn()).await {
            // Restarts, failovers and SCRIPT FLUSH empty the script cache.
            Err(e) if e.code() == Some("NOSCRIPT") => {
                tracing::info!(
                    sink = "redis_hash",
                    "Script cache was empty (NOSCRIPT); loading the script again."
                );
                match call.load().query_async::<String>(conn.conn()).await {
                    Ok(_) => call.cmd.query_async(conn.conn()).await,
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        conn.settle(&result);
        result
    }

    /// The batch's script calls on a cluster, one per slot group (see [`cluster::by_slot`]).
    fn slot_calls<'w>(&self, writes: &'w Writes<'_>) -> Result<Vec<SlotCall<'w>>, SinkError> {
        let keys = writes.keys.as_str();
        cluster::by_slot(writes.records.iter().map(|w| &keys[w.key.clone()]))
            .into_iter()
            .map(|group| {
                let group: Vec<&Write<'_>> =
                    group.into_iter().map(|i| &writes.records[i]).collect();
                let call = self.script_call(keys, &group, None)?;
                Ok((group, call))
            })
            .collect()
    }

    /// Runs the batch on a cluster: the slot groups' calls all at once on one cluster
    /// connection (which pipelines them to their nodes). The first failure is returned,
    /// a retryable one before a refusal: then the caller retries the whole batch, and the
    /// groups that were applied already come back stale, as the version guard holds per key.
    async fn eval_by_slot(&self, calls: &[SlotCall<'_>]) -> Result<BatchCounts, redis::RedisError> {
        let mut pooled = self.pool.get().await.map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::Io,
                "no pooled connection",
                describe_run_error(e),
            ))
        })?;
        pooled.begin();
        let conn = pooled.conn().clone();
        let results = calls.iter().map(|(_, call)| {
            let mut conn = conn.clone();
            async move { eval_group(&mut conn, call).await }
        });
        let mut totals = (0, 0, Vec::new());
        let mut reloaded = 0;
        let mut failure: Option<redis::RedisError> = None;
        for ((result, noscript), (group, _)) in futures::future::join_all(results)
            .await
            .into_iter()
            .zip(calls)
        {
            reloaded += usize::from(noscript);
            match result {
                Ok((applied, stale, stale_at)) => {
                    totals.0 += applied;
                    totals.1 += stale;
                    totals.2.extend(stale_entries(
                        group,
                        stale_at.as_deref().unwrap_or_default(),
                    ));
                }
                Err(e) => {
                    if failure
                        .as_ref()
                        .is_none_or(|f| refused_by_data(f) && !refused_by_data(&e))
                    {
                        failure = Some(e);
                    }
                }
            }
        }
        if reloaded > 0 {
            tracing::info!(
                sink = "redis_hash",
                groups = reloaded,
                "Script cache of a cluster node was empty (NOSCRIPT); sent the script itself, which loads it there."
            );
        }
        let result = failure.map_or(Ok(totals), Err);
        pooled.settle(&result);
        result
    }

    /// How long a batch write may take: the timeout on one server; on a cluster also the
    /// redirects and slot refresh the cluster client allows for (twice the timeout), after
    /// the pool checkout.
    fn batch_deadline(&self) -> Duration {
        if self.cluster {
            self.config.timeout.0.saturating_mul(3)
        } else {
            self.config.timeout.0
        }
    }
}

/// One slot group's records and their script call.
type SlotCall<'w> = (Vec<&'w Write<'w>>, ScriptCall);

/// One slot group's script call; on NOSCRIPT (a restarted or promoted node, SCRIPT FLUSH) it
/// is sent again as EVAL, which loads it on the node that owns the slot. Also says whether it
/// had to.
async fn eval_group(
    conn: &mut RedisConn,
    call: &ScriptCall,
) -> (Result<ScriptReply, redis::RedisError>, bool) {
    match call.cmd.query_async(&mut *conn).await {
        Err(e) if e.code() == Some("NOSCRIPT") => (call.as_eval().query_async(conn).await, true),
        other => (other, false),
    }
}

/// What the batch script returns: applied, stale, and the stale records' 1-based positions
/// (nil when none was stale).
type ScriptReply = (usize, usize, Option<Vec<usize>>);

/// What a batch's calls add up to: applied, stale, and the stale records' entries.
type BatchCounts = (usize, usize, Vec<usize>);

/// The entries of the records at the script's stale `positions` of a call over `writes`.
fn stale_entries(writes: &[&Write<'_>], positions: &[usize]) -> Vec<usize> {
    positions
        .iter()
        .filter_map(|p| writes.get(p.checked_sub(1)?))
        .map(|w| w.record.entry)
        .collect()
}

/// A short store name for errors.
const STORE: &str = "redis";

impl Sink for RedisHashSink {
    fn check_record(&self, record: &Record) -> Result<(), String> {
        let key = self.key.render(&record.event)?;
        Tombstone::of(&key, self.cluster).map(drop)
    }

    fn replica(&self) -> Option<&dyn Replica> {
        Some(self)
    }

    fn freshness(&self) -> FreshnessFuture<'_> {
        Box::pin(async move {
            let mut conn = self.pool.get().await.ok()?;
            conn.begin();
            let read = tokio::time::timeout(
                self.config.timeout.0,
                redis::cmd("HMGET")
                    .arg(&self.freshness_key)
                    .arg("newest_occurred_at")
                    .arg("replicated_at")
                    .query_async::<Vec<Option<String>>>(conn.conn()),
            )
            .await
            .unwrap_or_else(|_| Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))));
            conn.settle(&read);
            let ms = |text: &Option<String>| {
                let at = ecst_schemas::envelope::parse_timestamp(&serde_json::Value::from(
                    text.as_deref()?,
                ))?;
                i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
            };
            match read.ok()?.as_slice() {
                [newest, replicated] => Some(ReplicaFreshness {
                    newest_occurred_ms: ms(newest),
                    replicated_ms: ms(replicated),
                }),
                _ => None,
            }
        })
    }

    fn apply_batch<'a>(&'a self, batch: &'a [Record]) -> ApplyFuture<'a> {
        Box::pin(async move {
            if !batch.iter().any(is_patch) {
                return self.apply_states(batch).await;
            }
            // Full states and deletes first, then the patches on top of what they left.
            let states: Vec<Record> = batch.iter().filter(|r| !is_patch(r)).cloned().collect();
            let mut report = if states.is_empty() {
                SinkReport::default()
            } else {
                self.apply_states(&states).await?
            };
            let patches = self
                .apply_patches(batch.iter().filter(|r| is_patch(r)))
                .await?;
            report.applied += patches.applied;
            report.stale += patches.stale;
            report.stale_entries.extend(patches.stale_entries);
            report.rejected.extend(patches.rejected);
            report.gaps.extend(patches.gaps);
            Ok(report)
        })
    }
}

/// Whether a record is a patch (for `delta.lua`) rather than a state (for `script.lua`).
fn is_patch(record: &Record) -> bool {
    matches!(record.action, Action::Patch { .. })
}

impl RedisHashSink {
    /// Applies patches, each only where its hash holds exactly its base version, in version
    /// order (so that a batch holding several patches of one aggregate applies them in turn);
    /// on a cluster one call per slot group.
    async fn apply_patches<'a>(
        &self,
        patches: impl Iterator<Item = &'a Record>,
    ) -> Result<SinkReport, SinkError> {
        let patches: Vec<&Record> = patches.collect();
        let (mut writes, rejected) = self.writes(patches);
        writes
            .records
            .sort_by_key(|w| w.record.event.aggregate_version);
        let keys = writes.keys.as_str();
        let groups: Vec<Vec<&Write<'_>>> = if self.cluster {
            cluster::by_slot(writes.records.iter().map(|w| &keys[w.key.clone()]))
                .into_iter()
                .map(|group| group.into_iter().map(|i| &writes.records[i]).collect())
                .collect()
        } else {
            vec![writes.records.iter().collect()]
        };
        let mut report = SinkReport {
            rejected,
            ..SinkReport::default()
        };
        let deadline = self.batch_deadline();
        for group in groups.iter().filter(|g| !g.is_empty()) {
            let reply = match tokio::time::timeout(deadline, self.eval_patches(keys, group)).await {
                Ok(reply) => reply,
                Err(_) => {
                    return Err(SinkError::Unavailable {
                        store: STORE,
                        message: format!(
                            "patch write timed out after {}",
                            ConfigDuration(deadline)
                        ),
                    });
                }
            };
            let (applied, stale_at, gaps_at) = match reply {
                Ok(reply) => reply,
                Err(e) => {
                    let failure = report_failure(&self.reporter, &self.url, &e);
                    if failure.kind.is_configuration() {
                        return Err(SinkError::Unavailable {
                            store: STORE,
                            message: failure.to_string(),
                        });
                    }
                    return Err(classify(e, failure.to_string()));
                }
            };
            report.applied += applied;
            report.stale += stale_at.len();
            report.stale_entries.extend(stale_entries(group, &stale_at));
            report.gaps.extend(stale_entries(group, &gaps_at));
        }
        resolve_failure(&self.reporter, &self.url);
        let newest = writes
            .records
            .iter()
            .filter_map(|w| w.record.event.occurred_at)
            .max();
        if report.applied > 0 {
            self.note_freshness(newest).await;
        }
        Ok(report)
    }

    /// One call of the patch script; on NOSCRIPT sent again as EVAL, which loads it.
    async fn eval_patches(
        &self,
        keys: &str,
        group: &[&Write<'_>],
    ) -> Result<delta::DeltaReply, redis::RedisError> {
        let layout = Layout {
            deleted: &self.config.deleted_field,
            version: &self.config.version_field,
            occurred_at: &self.config.occurred_at_field,
            tombstone_prefix: &self.config.tombstone_prefix,
        };
        let mut cmd = redis::Cmd::new();
        cmd.arg("EVALSHA").arg(self.delta_script.get_hash());
        delta::append(&mut cmd, &layout, keys, group);
        let mut conn = self.pool.get().await.map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::Io,
                "no pooled connection",
                describe_run_error(e),
            ))
        })?;
        conn.begin();
        let result = match cmd.query_async(conn.conn()).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                script::as_eval(&cmd, delta::DELTA_SCRIPT)
                    .query_async(conn.conn())
                    .await
            }
            other => other,
        };
        conn.settle(&result);
        result
    }

    /// Applies full states, deletes and marks with the batch script.
    async fn apply_states(&self, batch: &[Record]) -> Result<SinkReport, SinkError> {
        {
            let (writes, rejected) = self.writes(batch);
            if writes.records.is_empty() {
                return Ok(SinkReport {
                    rejected,
                    ..SinkReport::default()
                });
            }
            let newest = batch.iter().filter_map(|r| r.event.occurred_at).max();
            let deadline = self.batch_deadline();
            let result = if self.cluster {
                let calls = self.slot_calls(&writes)?;
                tokio::time::timeout(deadline, self.eval_by_slot(&calls)).await
            } else {
                let all: Vec<&Write<'_>> = writes.records.iter().collect();
                let freshness = Freshness {
                    key: &self.freshness_key,
                    replicated_at: time::OffsetDateTime::now_utc(),
                    newest_occurred_at: newest,
                };
                let call = self.script_call(&writes.keys, &all, Some(&freshness))?;
                tokio::time::timeout(deadline, self.eval(&call))
                    .await
                    .map(|r| {
                        r.map(|(a, s, at)| {
                            (a, s, stale_entries(&all, at.as_deref().unwrap_or_default()))
                        })
                    })
            };
            let result = match result {
                Ok(result) => result,
                Err(_) => {
                    return Err(SinkError::Unavailable {
                        store: STORE,
                        message: format!(
                            "batch write timed out after {}",
                            ConfigDuration(deadline)
                        ),
                    });
                }
            };
            match result {
                Ok((applied, stale, stale_entries)) => {
                    resolve_failure(&self.reporter, &self.url);
                    if self.cluster {
                        self.note_freshness(newest).await;
                    }
                    Ok(SinkReport {
                        applied,
                        stale,
                        stale_entries,
                        rejected,
                        ..SinkReport::default()
                    })
                }
                Err(e) => {
                    let failure = report_failure(&self.reporter, &self.url, &e);
                    // Credentials and ACLs are not in the data (NOAUTH and WRONGPASS come
                    // back as `Extension` errors): retry the batch and say why.
                    if failure.kind.is_configuration() {
                        return Err(SinkError::Unavailable {
                            store: STORE,
                            message: failure.to_string(),
                        });
                    }
                    Err(classify(e, failure.to_string()))
                }
            }
        }
    }
}

/// What a failed batch script means: a key of another type is the records' own conflict
/// (`WRONGTYPE`); a script error is a refusal of the batch; everything else (out of memory,
/// a failed disk, a busy script, loading, a failover, a broken connection) is the store's
/// state, retried until it passes.
fn classify(e: redis::RedisError, described: String) -> SinkError {
    let message = e.to_string();
    if e.code() == Some("WRONGTYPE") {
        SinkError::Conflict {
            store: STORE,
            message,
        }
    } else if refused_by_data(&e) {
        SinkError::Refused {
            store: STORE,
            message,
        }
    } else {
        SinkError::Unavailable {
            store: STORE,
            message: described,
        }
    }
}

/// Whether a failed script is the records' doing (a conflict or a refusal, see [`classify`])
/// rather than the store's state.
fn refused_by_data(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.code() == Some("WRONGTYPE")
        || (!is_transport_error(e) && e.kind() == ErrorKind::Server(ServerErrorKind::ResponseError))
}

impl ComponentConfig for RedisHashConfig {
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::required(
            "key",
            "key template",
            "hash key per aggregate, e.g. `athlete:{aggregateId}`",
        ),
        KeyDoc::optional(
            "redis",
            "Redis URL",
            "the source's",
            "server of the replica",
        ),
        KeyDoc::optional(
            "version_field",
            "string",
            "_version",
            "hash field with the applied version",
        ),
        KeyDoc::optional(
            "occurred_at_field",
            "string",
            "_occurred_at",
            "hash field with the source's `occurredAt`",
        ),
        KeyDoc::optional(
            "deleted_field",
            "string",
            "_deleted",
            "hash field set to 1 under tombstone `mode: mark`",
        ),
        KeyDoc::optional(
            "tombstone_prefix",
            "string",
            "ecst:tombstone:",
            "prefix of the keys remembering deleted versions",
        ),
        KeyDoc::optional("pool_size", "integer", "4", "pooled connections"),
        KeyDoc::optional(
            "timeout",
            "duration",
            "5s",
            "timeout of connecting and of each batch write",
        ),
    ];

    fn problems(&self) -> Vec<ConfigProblem> {
        self.check()
    }

    fn payload_reads(&self, projected: bool) -> ecst_schemas::PayloadSelection {
        // Unprojected records are written as their whole payload.
        match (projected, KeyTemplate::parse(&self.key)) {
            (true, Ok(template)) => crate::stage::payload_reads_of(template.paths()),
            _ => ecst_schemas::PayloadSelection::All,
        }
    }

    fn payload_paths(&self, _projected: bool) -> Vec<crate::stage::PayloadPath> {
        // Placeholders read the envelope whether or not the record was projected.
        KeyTemplate::parse(&self.key).map_or_else(
            |_| Vec::new(),
            |template| {
                template
                    .paths()
                    .filter_map(|path| crate::stage::PayloadPath::of("key", path))
                    .collect()
            },
        )
    }

    async fn build_component(&self, ctx: &BuildContext) -> Result<BuiltStage, String> {
        Ok(BuiltStage::Sink(std::sync::Arc::new(self.build(ctx)?)))
    }
}

#[cfg(test)]
mod oracle;
#[cfg(test)]
mod tests;

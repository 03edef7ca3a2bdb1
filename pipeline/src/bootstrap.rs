//! Bootstrap from a snapshot, and the retention gap that calls for one.
//!
//! A stream only goes back as far as its retention. A new group, a reset one, or one that fell
//! behind a trim must start from the source's current state: note the stream position, move
//! the group there, page through the snapshot applying every row through the pipeline's own
//! stages and sinks (the version guard makes rows that race live events harmless), then stream
//! from the noted position. Progress is recorded in Redis after every page so an interrupted
//! bootstrap resumes; a lease with expiry makes a second worker wait instead of bootstrapping
//! too.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ecst_operators::redis_pool::{PooledRedis, RedisManager, describe_run_error};

use ecst_operators::postgres_tls::parse_postgres_url;
use ecst_operators::{ConfigDuration, Outcomes, RawEntry, Record, SecretUrl};
use ecst_schemas::EnvelopeKeys;
use ecst_schemas::wire::FIELD_BODY;
use redis::Value as RedisValue;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::PipelineConfig;
use crate::runner::{Batch, Dag, RunError, Shared, Shutdown, backoff, complete};

/// What to do when the group has missed entries that are no longer in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnGap {
    /// Bootstrap again from the snapshot (the default).
    Bootstrap,
    /// Stop the worker with an error.
    Fail,
}

/// The `bootstrap:` section of a pipeline: where the snapshot comes from and when to use it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapConfig {
    /// The NDJSON snapshot endpoint of the entity (`http://athletes:8081/snapshot/athletes`).
    #[serde(default)]
    pub url: Option<String>,
    /// Environment variable with the endpoint's bearer token.
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// Or: the source database...
    #[serde(default)]
    pub postgres: Option<SecretUrl>,
    /// ...and a query returning (id as text, version, payload jsonb[, occurred_at
    /// timestamptz]) ordered by id, with `$1` = after (text, NULL on the first page) and `$2`
    /// = limit.
    #[serde(default)]
    pub query: Option<String>,
    /// Rows per page (default 1000).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Bootstrap when the group does not exist yet (default true).
    #[serde(default = "default_true")]
    pub on_new_group: bool,
    /// `bootstrap` (default) or `fail` when the group missed trimmed entries.
    #[serde(default = "default_on_gap")]
    pub on_gap: OnGap,
    /// How long a bootstrapping worker's lease lasts without renewal (default 30s).
    #[serde(default = "default_lease")]
    pub lease: ConfigDuration,
    /// Bound on each page request (default 30s).
    #[serde(default = "default_timeout")]
    pub timeout: ConfigDuration,
}

fn default_page_size() -> u32 {
    1000
}
fn default_true() -> bool {
    true
}
fn default_on_gap() -> OnGap {
    OnGap::Bootstrap
}
fn default_lease() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}
fn default_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}

impl BootstrapConfig {
    /// Problems as (key, message).
    pub fn check(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        match (&self.url, &self.postgres, &self.query) {
            (Some(url), None, None) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    problems.push(("url", format!("`{url}` is not an http(s) URL")));
                }
            }
            (None, Some(pg), Some(query)) => {
                if let Err(e) = parse_postgres_url(pg.expose()) {
                    problems.push(("postgres", format!("{pg}: {e}")));
                }
                if !(query.contains("$1") && query.contains("$2")) {
                    problems.push((
                        "query",
                        "the query must use $1 (after, text or NULL) and $2 (limit)".into(),
                    ));
                }
            }
            (None, Some(_), None) => problems.push(("query", "`postgres` needs a `query`".into())),
            (None, None, Some(_)) => problems.push(("postgres", "`query` needs `postgres`".into())),
            _ => problems.push((
                "url",
                "give the snapshot endpoint's `url`, or `postgres` and `query`".into(),
            )),
        }
        if self.bearer_token_env.is_some() && self.url.is_none() {
            problems.push(("bearer_token_env", "only applies to `url`".into()));
        }
        if !(1..=10_000).contains(&self.page_size) {
            problems.push(("page_size", "must be between 1 and 10000".into()));
        }
        if self.lease.0 < Duration::from_secs(1) {
            problems.push(("lease", "must be at least 1s".into()));
        }
        problems
    }
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

/// Where the group stands against the stream's retention.
#[derive(Debug, Default)]
pub struct GroupState {
    /// Whether the group exists.
    pub exists: bool,
    /// Why entries were missed, when they were.
    pub gap: Option<String>,
}

/// A Redis reply value as text (bulk or simple string, or an integer).
pub fn bulk(value: Option<&RedisValue>) -> Option<String> {
    match value? {
        RedisValue::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        RedisValue::SimpleString(s) => Some(s.clone()),
        RedisValue::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A Redis map reply (RESP3 map or RESP2 flat pairs) by key.
pub fn as_map(value: RedisValue) -> HashMap<String, RedisValue> {
    let pairs: Vec<(RedisValue, RedisValue)> = match value {
        RedisValue::Map(pairs) => pairs,
        RedisValue::Array(items) => {
            let mut pairs = Vec::new();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, v)| bulk(Some(&k)).map(|k| (k, v)))
        .collect()
}

/// `ms-seq` as a comparable pair.
fn id_pair(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Reads the group's position against the stream's trimming (XINFO STREAM / GROUPS).
pub async fn group_state(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Result<GroupState, redis::RedisError> {
    let info: RedisValue = match redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query_async(conn)
        .await
    {
        Ok(v) => v,
        // No stream: no group either, and nothing missed.
        Err(e) if e.to_string().contains("no such key") => return Ok(GroupState::default()),
        Err(e) => return Err(e),
    };
    let info = as_map(info);
    let groups: RedisValue = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await?;
    let groups: Vec<HashMap<String, RedisValue>> = match groups {
        RedisValue::Array(items) => items.into_iter().map(as_map).collect(),
        _ => Vec::new(),
    };
    let Some(g) = groups
        .iter()
        .find(|g| bulk(g.get("name")).as_deref() == Some(group))
    else {
        return Ok(GroupState::default());
    };
    let last_delivered = bulk(g.get("last-delivered-id")).unwrap_or_else(|| "0-0".into());
    let delivered = id_pair(&last_delivered);
    let count = |key: &str| bulk(info.get(key)).and_then(|n| n.parse::<u64>().ok());
    let length = count("length").unwrap_or(0);
    let added = count("entries-added");
    let entries_read = bulk(g.get("entries-read")).and_then(|n| n.parse::<u64>().ok());
    let first = match info.get("first-entry") {
        Some(RedisValue::Array(entry)) => bulk(entry.first()),
        _ => None,
    };
    let last_generated = bulk(info.get("last-generated-id")).unwrap_or_else(|| "0-0".into());
    // XDEL (and, on later Redis versions, trimming) records the highest id it removed.
    let max_deleted = bulk(info.get("max-deleted-entry-id")).unwrap_or_else(|| "0-0".into());
    // Trimming removes from the head: the group can only have missed entries if the oldest
    // entry left is newer than the last it was given (or none is left).
    let head_passed = match &first {
        Some(first) => id_pair(first) > delivered,
        None => id_pair(&last_generated) > delivered,
    };
    let missed = if id_pair(&max_deleted) > delivered {
        Some(format!("entries up to {max_deleted} were deleted"))
    } else if !head_passed {
        None
    } else if first.is_none() {
        Some(format!("every entry up to {last_generated} was trimmed"))
    } else {
        match (added, entries_read) {
            // Entries added after the group's last read, minus those still in the stream.
            (Some(added), Some(read)) if added.saturating_sub(read) > length => Some(format!(
                "{} entries were trimmed before the group read them",
                added - read - length
            )),
            (Some(_), Some(_)) => None,
            _ => {
                tracing::warn!(
                    stream,
                    group,
                    "Cannot tell whether the group missed trimmed entries: Redis does not know how many it has read (entries-read is unset until it reaches the end of the stream)."
                );
                None
            }
        }
    };
    let gap = missed.map(|why| {
        format!(
            "{why} from stream {stream} (first entry now {}), but group {group} had only read up to {last_delivered}",
            first.unwrap_or_else(|| "none".into())
        )
    });
    Ok(GroupState { exists: true, gap })
}

/// The recorded progress of a bootstrap.
#[derive(Debug, Default, Clone)]
pub(crate) struct Progress {
    pub(crate) running: bool,
    pub(crate) position: String,
    pub(crate) after: Option<String>,
    pub(crate) rows: u64,
    pub(crate) sweep: bool,
    pub(crate) entries_added: Option<u64>,
}

/// The Redis keys of one group's bootstrap: the lease and the progress hash.
pub(crate) struct Keys {
    pub(crate) lease: String,
    pub(crate) progress: String,
}

impl Keys {
    pub(crate) fn new(stream: &str, group: &str) -> Self {
        let lease = format!("ecst:bootstrap:{stream}:{group}");
        Keys {
            progress: format!("{lease}:progress"),
            lease,
        }
    }
}

pub(crate) async fn read_progress(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
) -> Result<Progress, redis::RedisError> {
    let map: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&keys.progress)
        .query_async(conn)
        .await?;
    Ok(Progress {
        running: map.get("state").map(String::as_str) == Some("running"),
        position: map.get("position").cloned().unwrap_or_default(),
        after: map.get("after").cloned().filter(|a| !a.is_empty()),
        rows: map.get("rows").and_then(|r| r.parse().ok()).unwrap_or(0),
        sweep: map.get("sweep").map(String::as_str) == Some("1"),
        entries_added: map.get("entries_added").and_then(|n| n.parse().ok()),
    })
}

/// Takes the lease if free (or already ours); `Err(holder)` if another worker has it.
pub(crate) async fn take_lease(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    me: &str,
    ttl: Duration,
) -> Result<Result<(), String>, redis::RedisError> {
    let script = redis::Script::new(
        r"local holder = redis.call('GET', KEYS[1])
          if holder == false or holder == ARGV[1] then
            redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
            return ''
          end
          return holder",
    );
    let holder: String = script
        .key(&keys.lease)
        .arg(me)
        .arg(ttl.as_millis() as u64)
        .invoke_async(conn)
        .await?;
    Ok(if holder.is_empty() {
        Ok(())
    } else {
        Err(holder)
    })
}

pub(crate) async fn release_lease(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    me: &str,
) -> Result<(), redis::RedisError> {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
          return 0",
    )
    .key(&keys.lease)
    .arg(me)
    .invoke_async::<i64>(conn)
    .await
    .map(|_| ())
}

/// One page source: the HTTP endpoint or a query.
pub(crate) enum SnapshotReader {
    Http {
        client: reqwest::Client,
        url: String,
        token: Option<String>,
    },
    Postgres {
        target: Box<ecst_operators::postgres_tls::PgTarget>,
        query: String,
        client: Option<tokio_postgres::Client>,
    },
}

impl SnapshotReader {
    pub(crate) fn new(config: &BootstrapConfig) -> Result<Self, String> {
        if let Some(url) = &config.url {
            let token = match &config.bearer_token_env {
                None => None,
                Some(var) => Some(std::env::var(var).map_err(|_| {
                    format!("bootstrap.bearer_token_env: the environment variable {var} is not set")
                })?),
            };
            let client = reqwest::Client::builder()
                .timeout(config.timeout.0)
                .connect_timeout(config.timeout.0)
                .build()
                .map_err(|e| format!("bootstrap: cannot build the HTTP client: {e}"))?;
            return Ok(SnapshotReader::Http {
                client,
                url: url.trim_end_matches('/').to_string(),
                token,
            });
        }
        let (Some(pg), Some(query)) = (&config.postgres, &config.query) else {
            return Err("bootstrap: give `url`, or `postgres` and `query`".into());
        };
        let mut target =
            parse_postgres_url(pg.expose()).map_err(|e| format!("bootstrap.postgres {pg}: {e}"))?;
        target.config.connect_timeout(config.timeout.0);
        if target.config.get_application_name().is_none() {
            target.config.application_name("ecst-bootstrap");
        }
        Ok(SnapshotReader::Postgres {
            target: Box::new(target),
            query: query.clone(),
            client: None,
        })
    }

    fn describe(&self) -> String {
        match self {
            SnapshotReader::Http { url, .. } => url.clone(),
            SnapshotReader::Postgres { .. } => "the bootstrap query".into(),
        }
    }

    /// The source's row count, when it tells.
    pub(crate) async fn count(&self) -> Option<u64> {
        let SnapshotReader::Http { client, url, token } = self else {
            return None;
        };
        let mut request = client.get(format!("{url}/count"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let body = request.send().await.ok()?.bytes().await.ok()?;
        serde_json::from_slice::<Value>(&body)
            .ok()?
            .get("count")?
            .as_u64()
    }

    /// One page of NDJSON lines after `after`.
    pub(crate) async fn page(
        &mut self,
        after: Option<&str>,
        limit: u32,
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, String> {
        match self {
            SnapshotReader::Http { client, url, token } => {
                let mut request = client
                    .get(url.as_str())
                    .query(&[("limit", limit.to_string())]);
                if let Some(after) = after {
                    request = request.query(&[("after", after)]);
                }
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let response = request
                    .send()
                    .await
                    .map_err(|e| format!("GET {url}: {e}"))?;
                let status = response.status();
                // A body cut short (the server died mid-page) is an error here, not a page.
                let body = response
                    .bytes()
                    .await
                    .map_err(|e| format!("GET {url}: reading the page: {e}"))?;
                if !status.is_success() {
                    return Err(format!(
                        "GET {url}: {status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(500)]).trim()
                    ));
                }
                Ok(body
                    .split(|b| *b == b'\n')
                    .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
                    .map(<[u8]>::to_vec)
                    .collect())
            }
            SnapshotReader::Postgres {
                target,
                query,
                client,
            } => {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    let (c, connection) =
                        tokio::time::timeout(timeout, target.config.connect(target.tls.clone()))
                            .await
                            .map_err(|_| "connecting to the source timed out".to_string())?
                            .map_err(|e| format!("connecting to the source: {e}"))?;
                    tokio::spawn(connection);
                    *client = Some(c);
                }
                let Some(c) = client.as_ref() else {
                    return Err("no source connection".into());
                };
                let after = after.map(str::to_string);
                let limit = i64::from(limit);
                let rows =
                    tokio::time::timeout(timeout, c.query(query.as_str(), &[&after, &limit]))
                        .await
                        .map_err(|_| "the bootstrap query timed out".to_string())?
                        .map_err(|e| format!("the bootstrap query failed: {e}"))?;
                rows.iter()
                    .map(|row| {
                        let id: Option<String> = row.try_get(0).map_err(|e| e.to_string())?;
                        let version: Option<i64> = row.try_get(1).map_err(|e| e.to_string())?;
                        let payload: Option<Value> = row.try_get(2).map_err(|e| e.to_string())?;
                        let mut line = json!({
                            "aggregateId": id, "aggregateVersion": version, "payload": payload
                        });
                        if row.len() > 3 {
                            let at: Option<time::OffsetDateTime> =
                                row.try_get(3).map_err(|e| e.to_string())?;
                            if let Some(at) = at {
                                line["occurredAt"] = Value::String(
                                    ecst_schemas::envelope::format_timestamp(at),
                                );
                            }
                        }
                        serde_json::to_vec(&line).map_err(|e| e.to_string())
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(|e| {
                        format!("the bootstrap query must return (text id, bigint version, jsonb payload): {e}")
                    })
            }
        }
    }
}

/// Snapshot lines as the records the root stages would have produced, with stand-in entries
/// for dead-letters. Returns the cursor for the next page (the last line's `aggregateId`).
pub(crate) fn page_records(
    lines: Vec<Vec<u8>>,
    outcomes: &mut Outcomes,
) -> Result<(Vec<RawEntry>, Vec<Record>, String), String> {
    let keys = EnvelopeKeys::default();
    let mut entries = Vec::with_capacity(lines.len());
    let mut records = Vec::with_capacity(lines.len());
    let mut cursor = None;
    for (index, line) in lines.into_iter().enumerate() {
        let parsed: Result<Value, String> =
            serde_json::from_slice(&line).map_err(|e| format!("snapshot line is not JSON: {e}"));
        let id = parsed
            .as_ref()
            .ok()
            .and_then(|v| match v.get("aggregateId") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            });
        cursor = id.clone();
        entries.push(RawEntry {
            id: format!("snapshot:{}", id.as_deref().unwrap_or("?")),
            fields: vec![(FIELD_BODY.to_string(), line)],
        });
        match parsed.and_then(|v| {
            keys.read_owned(v)
                .map_err(|e| format!("snapshot line: {e}"))
        }) {
            Ok(envelope) => records.push(Record::new(index, envelope)),
            Err(reason) => outcomes.dead_letter(index, reason),
        }
    }
    let cursor = cursor.ok_or_else(|| {
        "the last line of the page has no aggregateId; the next page cannot be asked for"
            .to_string()
    })?;
    Ok((entries, records, cursor))
}

/// Rows/s, rows done and an ETA, on a terminal as one rewritten line, otherwise as log lines.
pub(crate) struct ProgressReport {
    started: Instant,
    last: Instant,
    total: Option<u64>,
    terminal: bool,
    pipeline: String,
}

impl ProgressReport {
    pub(crate) fn new(pipeline: &str, total: Option<u64>) -> Self {
        ProgressReport {
            started: Instant::now(),
            last: Instant::now(),
            total,
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            pipeline: pipeline.to_string(),
        }
    }

    pub(crate) fn update(&mut self, done_here: u64, done_total: u64, finished: bool) {
        let every = if self.terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if !finished && self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done_here as f64 / secs;
        let eta = self
            .total
            .filter(|_| rate > 0.0)
            .map(|t| t.saturating_sub(done_total) as f64 / rate);
        if self.terminal {
            let bar = self.total.filter(|t| *t > 0).map_or(String::new(), |t| {
                let filled = ((done_total as f64 / t as f64).min(1.0) * 30.0) as usize;
                format!("[{}{}] ", "#".repeat(filled), " ".repeat(30 - filled))
            });
            let eta = eta.map_or(String::new(), |e| format!(", ETA {e:.0}s"));
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\rbootstrap {bar}{done_total}{} rows, {rate:.0} rows/s{eta}   ",
                self.total.map_or(String::new(), |t| format!("/{t}"))
            );
            if finished {
                let _ = writeln!(err);
            }
        } else {
            tracing::info!(pipeline = %self.pipeline, rows = done_total, total = ?self.total, rows_per_sec = rate.round(), eta_seconds = ?eta.map(f64::round), "Bootstrap progress.");
        }
    }
}

type Pooled = bb8::PooledConnection<'static, RedisManager>;

async fn pooled(shared: &Shared) -> Result<Pooled, String> {
    shared.pool.get_owned().await.map_err(describe_run_error)
}

/// Runs a Redis step on a pooled connection, marking the connection broken on failure.
macro_rules! on_redis {
    ($conn:expr, |$c:ident| $call:expr) => {{
        let conn: &mut PooledRedis = $conn;
        conn.begin();
        let result = {
            let $c = conn.conn();
            $call.await
        };
        conn.settle(&result);
        result.map_err(|e: redis::RedisError| e.to_string())
    }};
}

/// The running worker's periodic look for a gap; `Some` when entries were missed.
pub(crate) async fn check_gap(shared: &Shared) -> Option<String> {
    let mut conn = match pooled(shared).await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(pipeline = %shared.pipeline, error = %e, "Cannot check for a retention gap.");
            return None;
        }
    };
    let (stream, group) = (shared.stream.clone(), shared.group.clone());
    match on_redis!(&mut conn, |c| group_state(c, &stream, &group)) {
        Ok(state) => {
            if let Some(gap) = &state.gap {
                shared.stats.retention_gap.store(true, Ordering::Relaxed);
                shared.stats.gaps_detected.fetch_add(1, Ordering::Relaxed);
                tracing::error!(pipeline = %shared.pipeline, stream = %shared.stream, group = %shared.group, gap = %gap, "RETENTION GAP: the group missed entries that are gone from the stream.");
            }
            state.gap
        }
        Err(e) => {
            tracing::warn!(pipeline = %shared.pipeline, error = %e, "Cannot check for a retention gap.");
            None
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
    let mut failures = 0u32;
    let mut last_wait_log: Option<Instant> = None;
    let (stream, group) = (shared.stream.clone(), shared.group.clone());
    loop {
        if shutdown.is_set() {
            return Ok(false);
        }
        let looked = async {
            let mut conn = pooled(shared).await?;
            let state = on_redis!(&mut conn, |c| group_state(c, &stream, &group))?;
            let progress = on_redis!(&mut conn, |c| read_progress(c, &keys))?;
            Ok::<_, String>((conn, state, progress))
        }
        .await;
        let (mut conn, state, progress) = match looked {
            Ok(looked) => looked,
            Err(e) => {
                pause(
                    shared,
                    &mut failures,
                    "Cannot read the group's state",
                    &e,
                    shutdown,
                )
                .await;
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
                    &mut failures,
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
                    &mut failures,
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
            let exists = on_redis!(&mut conn, |c| group_state(c, &stream, &group))
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
                failures = 0;
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

/// Renews a bootstrap lease in the background for as long as it lives.
struct LeaseKeeper {
    lost: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    fn start(shared: Arc<Shared>, keys: &Keys, me: &str, ttl: Duration) -> Self {
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = lost.clone();
        let (lease, me) = (keys.lease.clone(), me.to_string());
        let task = tokio::spawn(async move {
            let keys = Keys {
                lease,
                progress: String::new(),
            };
            loop {
                tokio::time::sleep(ttl / 3).await;
                let Ok(mut conn) = pooled(&shared).await else {
                    continue;
                };
                match on_redis!(&mut conn, |c| take_lease(c, &keys, &me, ttl)) {
                    Ok(Err(_holder)) => {
                        flag.store(true, Ordering::Relaxed);
                        return;
                    }
                    Ok(Ok(())) => {}
                    Err(e) => {
                        tracing::warn!(pipeline = %shared.pipeline, error = %e, "Cannot renew the bootstrap lease.")
                    }
                }
            }
        });
        LeaseKeeper { lost, task }
    }

    fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a bootstrap for `reason` ends by removing rows the snapshot did not produce.
fn sweeps(reason: &Reason) -> bool {
    matches!(reason, Reason::NewGroup | Reason::Gap(_))
}

/// A bootstrap error that retrying cannot fix.
pub(crate) struct Fatal(RunError);

async fn pause(
    shared: &Shared,
    failures: &mut u32,
    what: &str,
    error: &str,
    shutdown: &mut Shutdown,
) {
    let wait = backoff(*failures);
    *failures = failures.saturating_add(1);
    tracing::warn!(pipeline = %shared.pipeline, attempt = *failures, retry_in_ms = wait.as_millis() as u64, error = %error, "{what}; retrying.");
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = shutdown.wait() => {}
    }
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
    let started_ms = crate::metrics::now_ms();
    let me = shared.consumer.clone();
    let (stream, group) = (shared.stream.clone(), shared.group.clone());
    let mut failures = 0u32;
    // Note the position (or take the interrupted bootstrap's) and move the group to it.
    let (position, mut after, mut rows) = loop {
        if shutdown.is_set() {
            return Ok(false);
        }
        let noted = async {
            let mut conn = pooled(shared).await?;
            let (position, entries_added, after, rows) = if reason == Reason::Resume {
                (
                    progress.position.clone(),
                    progress.entries_added,
                    progress.after.clone(),
                    progress.rows,
                )
            } else {
                let (position, entries_added) =
                    on_redis!(&mut conn, |c| last_generated_id(c, &stream))?;
                let now = ecst_schemas::envelope::format_timestamp(time::OffsetDateTime::now_utc());
                let mut pipe = redis::pipe();
                pipe.cmd("DEL").arg(&keys.progress).ignore();
                pipe.cmd("HSET")
                    .arg(&keys.progress)
                    .arg("state")
                    .arg("running")
                    .arg("position")
                    .arg(&position)
                    .arg("entries_added")
                    .arg(entries_added.map_or(String::new(), |n| n.to_string()))
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
                (position, entries_added, None, 0)
            };
            on_redis!(&mut conn, |c| place_group(
                c,
                &stream,
                &group,
                &position,
                entries_added
            ))?;
            Ok::<_, String>((position, after, rows))
        }
        .await;
        match noted {
            Ok(noted) => break noted,
            Err(e) => {
                pause(
                    shared,
                    &mut failures,
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
    let mut expected: Vec<HashSet<String>> = vec![HashSet::new(); dag.sinks().len()];
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
                    &mut failures,
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
                    &mut failures,
                    "A snapshot page cannot be paged past",
                    &e,
                    shutdown,
                )
                .await;
                continue;
            }
        };
        let per_sink = dag.run_decoded(&entries, records, &mut outcomes);
        if sweep {
            for (i, records) in per_sink.iter().enumerate() {
                if let Some(replica) = dag.sinks()[i].1.replica() {
                    expected[i].extend(
                        records
                            .iter()
                            .filter(|r| r.action == ecst_operators::Action::Upsert)
                            .filter_map(|r| replica.key_of(r).ok()),
                    );
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
        failures = 0;
        report.update(done_here, rows, false);
    }
    if sweep && (reason != Reason::Resume || progress.after.is_none()) {
        let sinks = dag.sinks().to_vec();
        let mut found = std::collections::BTreeMap::new();
        loop {
            match crate::reconcile::sweep_orphans(&sinks, &expected, true, started_ms, &mut found)
                .await
            {
                Ok(()) => break,
                Err(e) => {
                    pause(
                        shared,
                        &mut failures,
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
            found.clear();
        }
        for (sink, drift) in &found {
            if drift.orphans > 0 {
                tracing::warn!(pipeline = %shared.pipeline, sink = %sink, removed = drift.orphans, examples = ?drift.examples.get("orphans"), "Removed replica rows the source no longer has (their deletions were missed).");
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
                    &mut failures,
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

/// The stream's last id (`0` if it does not exist), where the group resumes after the
/// snapshot, and how many entries were ever added up to it (Redis 7).
async fn last_generated_id(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Result<(String, Option<u64>), redis::RedisError> {
    match redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query_async::<RedisValue>(conn)
        .await
    {
        Ok(info) => {
            let info = as_map(info);
            Ok((
                bulk(info.get("last-generated-id")).unwrap_or_else(|| "0".into()),
                bulk(info.get("entries-added")).and_then(|n| n.parse().ok()),
            ))
        }
        Err(e) if e.to_string().contains("no such key") => Ok(("0".into(), Some(0))),
        Err(e) => Err(e),
    }
}

/// Creates the group at `position`, or moves it there, telling Redis how many entries that
/// position has read (`ENTRIESREAD`), so that a later trim past it is seen as a gap.
async fn place_group(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
    position: &str,
    entries_read: Option<u64>,
) -> Result<(), redis::RedisError> {
    let mut create = redis::cmd("XGROUP");
    create
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(position)
        .arg("MKSTREAM");
    let mut set = redis::cmd("XGROUP");
    set.arg("SETID").arg(stream).arg(group).arg(position);
    if let Some(n) = entries_read {
        create.arg("ENTRIESREAD").arg(n);
        set.arg("ENTRIESREAD").arg(n);
    }
    match create.query_async::<()>(conn).await {
        Err(e) if e.code() == Some("BUSYGROUP") => set.query_async(conn).await,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lines_become_records_and_bad_lines_dead_letters() {
        let mut outcomes = Outcomes::default();
        let lines = vec![
            br#"{"aggregateId":"a1","aggregateVersion":3,"payload":{"status":"active"}}"#.to_vec(),
            b"not json".to_vec(),
            br#"{"aggregateId":"a3","aggregateVersion":1,"payload":null}"#.to_vec(),
        ];
        let (entries, records, cursor) = page_records(lines, &mut outcomes).unwrap();
        assert_eq!(cursor, "a3");
        assert_eq!(entries.len(), 3);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].event.aggregate_version, 3);
        assert!(records[1].event.is_tombstone());
        assert_eq!(outcomes.dead_letters.len(), 1);
        assert_eq!(outcomes.dead_letters[0].0, 1);
    }

    #[test]
    fn a_page_whose_last_line_has_no_id_stops_paging() {
        let mut outcomes = Outcomes::default();
        let err = page_records(vec![b"{}".to_vec()], &mut outcomes).unwrap_err();
        assert!(err.contains("no aggregateId"), "{err}");
    }

    #[test]
    fn stream_ids_compare_numerically() {
        assert!(id_pair("1700000000000-10") > id_pair("1700000000000-9"));
        assert!(id_pair("10-0") > id_pair("9-5"));
    }
}

//! `redis_hash`: one Redis hash per aggregate, written behind a version guard in one Lua script
//! per batch.

mod template;

use std::time::Duration;

use redis::Script;
use serde::Deserialize;
use serde_json::Value;

use crate::duration::ConfigDuration;
use crate::record::{Action, Record};
use crate::redis_pool::{RedisPool, describe_run_error, redis_pool};
use crate::secret::SecretUrl;
use crate::stage::{ApplyFuture, BuildContext, ConfigProblem, Sink, SinkError, SinkReport};
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
    /// Prefix of the keys remembering deleted versions (default `ecst:tombstone:`).
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
        if let Some(url) = &self.redis
            && let Err(e) = redis::Client::open(url.expose())
        {
            problems.push(ConfigProblem::new(
                "redis",
                format!("invalid Redis URL {url}: {e}"),
            ));
        }
        problems
    }

    /// Builds the sink; connections are opened lazily so a worker can start while Redis is down.
    pub fn build(&self, ctx: &BuildContext) -> Result<RedisHashSink, String> {
        let url = self
            .redis
            .clone()
            .unwrap_or_else(|| ctx.source_redis.clone());
        let pool = redis_pool(&url, self.pool_size, self.timeout.0)
            .map_err(|e| format!("invalid Redis URL {url}: {e}"))?;
        Ok(RedisHashSink {
            key: KeyTemplate::parse(&self.key)?,
            config: self.clone(),
            pool,
            script: Script::new(include_str!("script.lua")),
        })
    }
}

/// The running `redis_hash` sink.
pub struct RedisHashSink {
    config: RedisHashConfig,
    key: KeyTemplate,
    pool: RedisPool,
    script: Script,
}

/// How a JSON value is stored in a hash field: strings as they are, the rest as JSON text.
pub fn hash_value(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

impl RedisHashSink {
    /// Builds the script invocation for a batch; records whose key cannot be rendered are
    /// returned as rejected.
    fn invocation(
        &self,
        batch: &[Record],
    ) -> (redis::ScriptInvocation<'_>, usize, Vec<(usize, String)>) {
        let mut invocation = self.script.prepare_invoke();
        invocation
            .arg(&self.config.version_field)
            .arg(&self.config.occurred_at_field)
            .arg(&self.config.deleted_field);
        let mut rejected = Vec::new();
        let mut count = 0;
        for record in batch {
            let key = match self.key.render(&record.event) {
                Ok(key) => key,
                Err(reason) => {
                    rejected.push((record.entry, reason));
                    continue;
                }
            };
            count += 1;
            invocation.key(&key);
            invocation.key(format!("{}{key}", self.config.tombstone_prefix));
            let (action, keep_ms) = match record.action {
                Action::Upsert => ("u", 0),
                Action::Delete { keep_for } => (
                    "d",
                    u64::try_from(keep_for.as_millis())
                        .unwrap_or(u64::MAX)
                        .max(1),
                ),
                Action::Mark => ("m", 0),
            };
            let occurred = record
                .event
                .occurred_at
                .map(ecst_schemas::envelope::format_timestamp)
                .unwrap_or_default();
            invocation
                .arg(action)
                .arg(record.event.aggregate_version)
                .arg(keep_ms)
                .arg(occurred);
            let pairs: Vec<(&String, String)> = if action == "u" {
                match &record.fields {
                    Some(fields) => fields
                        .iter()
                        .filter_map(|(k, v)| hash_value(v).map(|v| (k, v)))
                        .collect(),
                    None => match &record.event.payload {
                        Some(Value::Object(payload)) => payload
                            .iter()
                            .filter_map(|(k, v)| hash_value(v).map(|v| (k, v)))
                            .collect(),
                        _ => Vec::new(),
                    },
                }
            } else {
                Vec::new()
            };
            invocation.arg(pairs.len());
            for (k, v) in pairs {
                invocation.arg(k).arg(v);
            }
        }
        (invocation, count, rejected)
    }
}

impl Sink for RedisHashSink {
    fn apply_batch<'a>(&'a self, batch: &'a [Record]) -> ApplyFuture<'a> {
        Box::pin(async move {
            let (invocation, count, rejected) = self.invocation(batch);
            if count == 0 {
                return Ok(SinkReport {
                    rejected,
                    ..SinkReport::default()
                });
            }
            let mut conn = self.pool.get().await.map_err(|e| SinkError::Unavailable {
                store: "redis",
                message: describe_run_error(e),
            })?;
            let result: Result<(usize, usize), redis::RedisError> =
                tokio::time::timeout(self.config.timeout.0, invocation.invoke_async(&mut *conn))
                    .await
                    .unwrap_or_else(|_| {
                        Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "batch write timed out",
                        )))
                    });
            match result {
                Ok((applied, stale)) => Ok(SinkReport {
                    applied,
                    stale,
                    rejected,
                }),
                Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                    Err(SinkError::Unavailable {
                        store: "redis",
                        message: e.to_string(),
                    })
                }
                Err(e) => Err(SinkError::Refused {
                    store: "redis",
                    message: e.to_string(),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests;

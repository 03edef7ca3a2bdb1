//! A relay file (`relay.yaml`): where the outbox is, where its rows go, and how.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ecst_operators::postgres_tls::parse_postgres_url;
use ecst_operators::{ConfigDuration, SecretUrl};
use ecst_schemas::partition::check_partitioned_name;
use ecst_schemas::wire::ContentType;
use serde::Deserialize;

use crate::outbox::{OutboxTable, check_stream_name};

/// Body encoding on the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyEncoding {
    /// `application/json` (no `ct` field).
    #[default]
    Json,
    /// `application/msgpack`.
    Msgpack,
}

impl BodyEncoding {
    pub(super) fn content_type(self) -> ContentType {
        match self {
            BodyEncoding::Json => ContentType::Json,
            BodyEncoding::Msgpack => ContentType::MsgPack,
        }
    }
}

/// What happens to a row once its entry is on the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPublish {
    /// Delete it (the default).
    #[default]
    Delete,
    /// Keep it with `published_at` set.
    Mark,
}

/// How far back a stream keeps entries: XADD's `MAXLEN ~` or `MINID ~`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep about this many entries.
    #[serde(default)]
    pub maxlen: Option<u64>,
    /// Keep entries younger than this (by entry id time).
    #[serde(default)]
    pub max_age: Option<ConfigDuration>,
}

/// One stream the relay may publish to: its own retention and partitions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    /// Keep about this many entries (instead of the relay's `retention`).
    #[serde(default)]
    pub maxlen: Option<u64>,
    /// Keep entries younger than this (instead of the relay's `retention`).
    #[serde(default)]
    pub max_age: Option<ConfigDuration>,
    /// Partitions of this stream (instead of the relay's `partitions`).
    #[serde(default)]
    pub partitions: Option<u32>,
}

impl StreamSettings {
    fn retention(&self) -> Retention {
        Retention {
            maxlen: self.maxlen,
            max_age: self.max_age,
        }
    }
}

/// Where the outbox is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxLocation {
    /// Schema (default `public`).
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Table (default `ecst_outbox`).
    #[serde(default = "default_table")]
    pub table: String,
}

impl Default for OutboxLocation {
    fn default() -> Self {
        OutboxLocation {
            schema: default_schema(),
            table: default_table(),
        }
    }
}

/// A relay file (`relay.yaml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Name in logs and in `application_name` (default `ecst-relay`).
    #[serde(default = "default_name")]
    pub name: String,
    /// Postgres URL of the database holding the outbox.
    pub postgres: SecretUrl,
    /// Redis URL (default `redis://127.0.0.1:6379`).
    #[serde(default = "default_redis")]
    pub redis: SecretUrl,
    /// The outbox table.
    #[serde(default)]
    pub outbox: OutboxLocation,
    /// Body encoding (default `json`).
    #[serde(default)]
    pub content_type: BodyEncoding,
    /// Rows per transaction (default 1000).
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Poll this often even without a notification (default 1s).
    #[serde(default = "default_poll_interval")]
    pub poll_interval: ConfigDuration,
    /// `delete` (default) or `mark`.
    #[serde(default)]
    pub on_publish: OnPublish,
    /// Under `mark`, delete published rows older than this (default: keep).
    #[serde(default)]
    pub keep_published_for: Option<ConfigDuration>,
    /// Retention of every stream without its own.
    #[serde(default)]
    pub retention: Option<Retention>,
    /// Partitions of every stream without its own (default 1: the single key); each row goes
    /// to the partition of its `aggregate_id`.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// The streams the relay may publish to, each with optional retention and partitions; rows
    /// for other streams are dead-lettered. Absent: any stream.
    #[serde(default)]
    pub streams: Option<BTreeMap<String, StreamSettings>>,
    /// Bound on every Postgres and Redis call (default 10s).
    #[serde(default = "default_timeout")]
    pub timeout: ConfigDuration,
    /// Check each row against the schema directory `schemas` before publishing it; a row that
    /// does not fit goes to the dead-letter table with the reason (default false).
    #[serde(default)]
    pub validate: bool,
    /// The schema directory, relative to the relay file.
    #[serde(default)]
    pub schemas: Option<PathBuf>,
    /// Claim check: payloads larger than a threshold go to Redis, the event carries a
    /// `payloadRef` (default: off, every payload inline).
    #[serde(default)]
    pub claim_check: Option<ClaimCheckSettings>,
}

/// The relay's claim check: where and how long large payloads are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimCheckSettings {
    /// A payload whose JSON is larger than this many bytes is claim-checked.
    pub over_bytes: usize,
    /// How long a claimed payload lives (default 7d): longer than the stream's retention plus
    /// the longest consumer lag.
    #[serde(default = "default_claim_ttl")]
    pub ttl: ConfigDuration,
    /// Prefix of claim keys (default `ecst:claim:`); the key ends `sha256:<hex>`.
    #[serde(default = "default_claim_prefix")]
    pub prefix: String,
}

fn default_claim_ttl() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(7 * 86_400))
}
fn default_claim_prefix() -> String {
    ecst_schemas::claim::DEFAULT_KEY_PREFIX.into()
}

fn default_schema() -> String {
    "public".into()
}
fn default_table() -> String {
    "ecst_outbox".into()
}
fn default_name() -> String {
    "ecst-relay".into()
}
fn default_redis() -> SecretUrl {
    SecretUrl::new("redis://127.0.0.1:6379")
}
fn default_batch_size() -> u32 {
    1000
}
fn default_poll_interval() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(1))
}
fn default_partitions() -> u32 {
    1
}
fn default_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}

impl RelayConfig {
    /// Every problem `validate` reports, as (key path, message).
    pub fn check(&self) -> Vec<(Vec<String>, String)> {
        let at = |parts: &[&str]| parts.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let mut problems = Vec::new();
        if self.validate && self.schemas.is_none() {
            problems.push((
                at(&["validate"]),
                "validate: true needs `schemas:`, the schema directory to validate against".into(),
            ));
        }
        if let Err(e) = OutboxTable::new(&self.outbox.schema, &self.outbox.table) {
            problems.push((at(&["outbox"]), e.to_string()));
        }
        if let Err(e) = parse_postgres_url(self.postgres.expose()) {
            problems.push((at(&["postgres"]), format!("{}: {e}", self.postgres)));
        }
        if let Err(e) = ecst_operators::redis_pool::check_redis_url(&self.redis) {
            problems.push((
                at(&["redis"]),
                format!("invalid Redis URL {}: {e}", self.redis),
            ));
        }
        if !(1..=10_000).contains(&self.batch_size) {
            problems.push((at(&["batch_size"]), "must be between 1 and 10000".into()));
        }
        if self.poll_interval.0.is_zero() {
            problems.push((at(&["poll_interval"]), "must be more than 0".into()));
        }
        if self.timeout.0 < Duration::from_millis(100) {
            problems.push((at(&["timeout"]), "must be at least 100ms".into()));
        }
        if self.keep_published_for.is_some() && self.on_publish != OnPublish::Mark {
            problems.push((
                at(&["keep_published_for"]),
                "only applies with `on_publish: mark` (deleted rows are not kept)".into(),
            ));
        }
        if let Some(retention) = &self.retention {
            for message in retention.check() {
                problems.push((at(&["retention"]), message));
            }
        }
        if let Some(message) = check_partitions(self.partitions) {
            problems.push((at(&["partitions"]), message));
        }
        if let Some(claim) = &self.claim_check
            && claim.ttl.0 < Duration::from_secs(1)
        {
            problems.push((
                at(&["claim_check", "ttl"]),
                "must be at least 1s (Redis expires whole seconds)".into(),
            ));
        }
        for (stream, settings) in self.streams.iter().flatten() {
            let at = || vec!["streams".to_string(), stream.clone()];
            if let Err(message) = check_stream_name(stream) {
                problems.push((at(), message));
            }
            for message in settings.retention().check() {
                problems.push((at(), message));
            }
            if let Some(message) = settings.partitions.and_then(check_partitions) {
                problems.push((at(), message));
            }
            if self.partitions_for(stream) > 1
                && let Err(message) = check_partitioned_name(stream)
            {
                problems.push((at(), message));
            }
        }
        problems
    }

    pub(super) fn retention_for(&self, stream: &str) -> Option<Retention> {
        match self.streams.as_ref().and_then(|s| s.get(stream)) {
            Some(own) if own.maxlen.is_some() || own.max_age.is_some() => Some(own.retention()),
            _ => self.retention.clone(),
        }
    }

    /// The partitions of `stream`: its own, else the relay's.
    pub fn partitions_for(&self, stream: &str) -> u32 {
        self.streams
            .as_ref()
            .and_then(|s| s.get(stream))
            .and_then(|s| s.partitions)
            .unwrap_or(self.partitions)
    }
}

fn check_partitions(partitions: u32) -> Option<String> {
    (!(1..=1024).contains(&partitions))
        .then(|| format!("partitions must be between 1 and 1024, got {partitions}"))
}

impl Retention {
    fn check(&self) -> Vec<String> {
        match (self.maxlen, &self.max_age) {
            (Some(_), Some(_)) => {
                vec!["give `maxlen` or `max_age`, not both (XADD trims by one of them)".into()]
            }
            (Some(0), None) => vec!["maxlen must be more than 0".into()],
            (None, Some(age)) if age.0.as_millis() == 0 => {
                vec!["max_age must be more than 0".into()]
            }
            _ => Vec::new(),
        }
    }

    /// XADD's trimming arguments for one of `partitions` keys, relative to `now_ms` for
    /// `max_age`; `maxlen` bounds the logical stream, so each partition keeps its share.
    pub(super) fn xadd_args(&self, now_ms: u64, partitions: u32) -> Option<(&'static str, String)> {
        if let Some(n) = self.maxlen {
            return Some((
                "MAXLEN",
                n.div_ceil(u64::from(partitions.max(1))).to_string(),
            ));
        }
        let age = self.max_age.as_ref()?.0.as_millis() as u64;
        Some(("MINID", format!("{}-0", now_ms.saturating_sub(age))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_becomes_xadd_trimming() {
        let by_len = Retention {
            maxlen: Some(1000),
            max_age: None,
        };
        assert_eq!(
            by_len.xadd_args(5_000, 1),
            Some(("MAXLEN", "1000".to_string()))
        );
        assert_eq!(
            by_len.xadd_args(5_000, 3),
            Some(("MAXLEN", "334".to_string()))
        );
        let by_age = Retention {
            maxlen: None,
            max_age: Some(ConfigDuration(Duration::from_secs(2))),
        };
        assert_eq!(
            by_age.xadd_args(5_000, 8),
            Some(("MINID", "3000-0".to_string()))
        );
        assert_eq!(Retention::default().xadd_args(5_000, 1), None);
        let both = Retention {
            maxlen: Some(1),
            max_age: Some(ConfigDuration(Duration::from_secs(1))),
        };
        assert_eq!(both.check().len(), 1);
    }

    #[test]
    fn each_stream_has_its_partitions_and_bad_counts_are_named() {
        let config: RelayConfig = serde_json::from_value(serde_json::json!({
            "postgres": "postgres://postgres@127.0.0.1/postgres",
            "partitions": 4,
            "streams": {
                "orders": {},
                "users": { "partitions": 1 },
                "big": { "partitions": 2000 },
                "br{ace}s": {},
            },
        }))
        .unwrap();
        assert_eq!(config.partitions_for("orders"), 4);
        assert_eq!(config.partitions_for("users"), 1);
        assert_eq!(config.partitions_for("unlisted"), 4);
        let problems = config.check();
        let at = |stream: &str| {
            problems
                .iter()
                .filter(|(path, _)| path == &["streams".to_string(), stream.to_string()])
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
        };
        assert!(at("big")[0].contains("between 1 and 1024"), "{problems:?}");
        assert!(
            at("br{ace}s")[0].contains("must not contain"),
            "{problems:?}"
        );
        assert!(at("orders").is_empty() && at("users").is_empty());
    }

    #[test]
    fn claim_check_settings_default_and_are_checked() {
        let config = |claim: serde_json::Value| {
            serde_json::from_value::<RelayConfig>(serde_json::json!({
                "postgres": "postgres://postgres@127.0.0.1/postgres",
                "claim_check": claim,
            }))
        };
        let on = config(serde_json::json!({"over_bytes": 1_048_576})).unwrap();
        let claim = on.claim_check.as_ref().unwrap();
        assert_eq!(claim.ttl.0, Duration::from_secs(7 * 86_400));
        assert_eq!(claim.prefix, "ecst:claim:");
        assert!(on.check().is_empty(), "{:?}", on.check());
        let short = config(serde_json::json!({"over_bytes": 1, "ttl": "500ms"})).unwrap();
        assert_eq!(
            short.check(),
            vec![(
                vec!["claim_check".to_string(), "ttl".to_string()],
                "must be at least 1s (Redis expires whole seconds)".to_string()
            )]
        );
        let err = config(serde_json::json!({"over": 1})).unwrap_err();
        assert!(err.to_string().contains("unknown field `over`"), "{err}");
    }
}

//! The replica side of `redis_hash`, for reconciliation: comparing records with the stored
//! hashes, listing the stored keys, evicting orphans.

use serde_json::Value;

use super::{RedisHashSink, STORE, cluster, upsert_fields};
use crate::record::Record;
use crate::redis_pool::describe_run_error;
use crate::replica::{Drift, Eviction, KeyPage, Replica, ReplicaFuture, StoredKey};
use crate::stage::SinkError;

/// Deletes a hash only if it is still at the version reconciliation saw, and buries it there
/// unless ARGV[3] (the tombstone's lifetime in ms) is 0.
const EVICT_IF_UNCHANGED: &str =
    "if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[3] ~= '0' then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) end
return 1";

/// How long a tombstone written by reconciliation lasts.
const EVICT_TOMBSTONE_MS: u64 = 7 * 24 * 3600 * 1000;

impl RedisHashSink {
    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, SinkError> {
        let unavailable = |message: String| SinkError::Unavailable {
            store: STORE,
            message,
        };
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|e| unavailable(describe_run_error(e)))?;
        conn.begin();
        let result = tokio::time::timeout(self.config.timeout.0, pipe.query_async(conn.conn()))
            .await
            .map_err(|_| unavailable(format!("timed out after {}", self.config.timeout)))?;
        conn.settle(&result);
        result.map_err(|e| unavailable(e.to_string()))
    }

    /// What an upsert of `record` writes, as the strings Redis holds (metadata aside).
    fn expected_fields(record: &Record) -> Vec<(String, String)> {
        upsert_fields(record)
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null())
            .map(|(name, value)| {
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Bool(b) => b.to_string(),
                    other => other.to_string(),
                };
                (name.clone(), text)
            })
            .collect()
    }
}

impl Replica for RedisHashSink {
    fn key_of(&self, record: &Record) -> Result<String, String> {
        self.key.render(&record.event)
    }

    fn compare<'a>(&'a self, records: &'a [Record]) -> ReplicaFuture<'a, Vec<Option<Drift>>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            let mut asked = Vec::with_capacity(records.len());
            for (i, record) in records.iter().enumerate() {
                if let Ok(key) = self.key.render(&record.event) {
                    pipe.cmd("HGETALL").arg(key);
                    asked.push(i);
                }
            }
            let mut drifts = vec![None; records.len()];
            if asked.is_empty() {
                return Ok(drifts);
            }
            let stored: Vec<std::collections::HashMap<String, String>> = self.query(&pipe).await?;
            for (i, hash) in asked.into_iter().zip(stored) {
                let record = &records[i];
                let version = hash
                    .get(&self.config.version_field)
                    .and_then(|v| v.parse::<u64>().ok());
                drifts[i] = match version {
                    None => Some(Drift::Missing),
                    Some(v) if v < record.event.aggregate_version => {
                        Some(Drift::Stale { stored: v })
                    }
                    Some(v) if v > record.event.aggregate_version => None,
                    Some(_) => {
                        let mut fields: Vec<String> = Self::expected_fields(record)
                            .into_iter()
                            .filter(|(name, text)| hash.get(name) != Some(text))
                            .map(|(name, _)| name)
                            .collect();
                        if hash.get(&self.config.deleted_field).map(String::as_str) == Some("1") {
                            fields.push(self.config.deleted_field.clone());
                        }
                        (!fields.is_empty()).then_some(Drift::Mismatch { fields })
                    }
                };
            }
            Ok(drifts)
        })
    }

    fn scan_keys<'a>(&'a self, cursor: Option<String>) -> ReplicaFuture<'a, KeyPage> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("SCAN")
                .arg(cursor.as_deref().unwrap_or("0"))
                .arg("MATCH")
                .arg(self.key.pattern())
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("hash");
            let ((next, keys),): ((String, Vec<String>),) = self.query(&pipe).await?;
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for key in &keys {
                pipe.cmd("HMGET")
                    .arg(key)
                    .arg(&self.config.version_field)
                    .arg(&self.config.occurred_at_field);
            }
            let fields: Vec<redis::Value> = if keys.is_empty() {
                Vec::new()
            } else {
                self.query(&pipe).await?
            };
            let text = |v: Option<&redis::Value>| match v {
                Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            };
            Ok(KeyPage {
                // Hashes of the pattern without a version field are not replica rows.
                keys: keys
                    .into_iter()
                    .zip(fields)
                    .filter_map(|(key, reply)| {
                        let redis::Value::Array(values) = reply else {
                            return None;
                        };
                        let version = text(values.first())?.parse().ok()?;
                        let touched_ms = text(values.get(1)).and_then(|at| {
                            time::OffsetDateTime::parse(
                                &at,
                                &time::format_description::well_known::Rfc3339,
                            )
                            .ok()
                            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                        });
                        Some(StoredKey {
                            key,
                            version,
                            touched_ms,
                        })
                    })
                    .collect(),
                next: (next != "0").then_some(next),
            })
        })
    }

    fn evict<'a>(&'a self, rows: &'a [(String, u64)], why: Eviction) -> ReplicaFuture<'a, usize> {
        Box::pin(async move {
            if rows.is_empty() {
                return Ok(0);
            }
            let tombstone_ms = match why {
                Eviction::Orphan => EVICT_TOMBSTONE_MS,
                Eviction::Rewrite => 0,
            };
            let mut pipe = redis::pipe();
            for (key, version) in rows {
                // A key without a tombstone in its slot was never written by this sink: apply
                // rejects it.
                let Ok(tombstone) =
                    cluster::tombstone_key(&self.config.tombstone_prefix, key, self.cluster)
                else {
                    continue;
                };
                pipe.cmd("EVAL")
                    .arg(EVICT_IF_UNCHANGED)
                    .arg(2)
                    .arg(key)
                    .arg(tombstone)
                    .arg(&self.config.version_field)
                    .arg(*version)
                    .arg(tombstone_ms);
            }
            if pipe.is_empty() {
                return Ok(0);
            }
            let removed: Vec<usize> = self.query(&pipe).await?;
            Ok(removed.into_iter().sum())
        })
    }
}

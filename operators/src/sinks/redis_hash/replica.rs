//! The replica side of `redis_hash`, for reconciliation: comparing records with the stored
//! hashes, listing the stored keys, evicting orphans.
//!
//! On a Redis Cluster a pipeline may only hold commands of one slot, and `SCAN` lists the keys
//! of one node: commands run as one pipeline per slot, all at once, and keys are listed a
//! master at a time, with a cursor that names the master (by the lowest slot it serves) and
//! its own `SCAN` cursor there.

use std::collections::HashMap;

use redis::Value as RedisValue;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use serde_json::Value;

use super::{RedisHashSink, STORE, cluster};
use crate::duration::ConfigDuration;
use crate::record::Record;
use crate::redis_pool::{RedisConn, RedisManager, describe_run_error};
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

/// Keys `SCAN` is asked to look at per call.
const SCAN_COUNT: usize = 1000;

fn unavailable(message: String) -> SinkError {
    SinkError::Unavailable {
        store: STORE,
        message,
    }
}

impl RedisHashSink {
    /// A pooled connection, or why there is none.
    async fn pooled(&self) -> Result<bb8::PooledConnection<'_, RedisManager>, SinkError> {
        self.pool
            .get()
            .await
            .map_err(|e| unavailable(describe_run_error(e)))
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, SinkError> {
        let mut conn = self.pooled().await?;
        conn.begin();
        let result = tokio::time::timeout(self.config.timeout.0, pipe.query_async(conn.conn()))
            .await
            .map_err(|_| unavailable(format!("timed out after {}", self.config.timeout)))?;
        conn.settle(&result);
        result.map_err(|e| unavailable(e.to_string()))
    }

    /// Runs `cmds`, each touching the slot of the key paired with it, and returns their
    /// replies in order: on one server as one pipeline; on a cluster as one pipeline per slot,
    /// all at once. With `ignore_errors`, an error reply stands in its command's place.
    async fn per_key(
        &self,
        cmds: Vec<(String, redis::Cmd)>,
        ignore_errors: bool,
    ) -> Result<Vec<RedisValue>, SinkError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        if !self.cluster {
            let mut pipe = redis::pipe();
            if ignore_errors {
                pipe.ignore_errors();
            }
            for (_, cmd) in cmds {
                pipe.add_command(cmd);
            }
            return self.query(&pipe).await;
        }
        let groups = cluster::by_slot(cmds.iter().map(|(key, _)| key.as_str()));
        let mut pooled = self.pooled().await?;
        pooled.begin();
        let conn = pooled.conn().clone();
        let calls = groups.iter().map(|group| {
            let mut pipe = redis::pipe();
            if ignore_errors {
                pipe.ignore_errors();
            }
            for &i in group {
                pipe.add_command(cmds[i].1.clone());
            }
            let mut conn = conn.clone();
            async move { pipe.query_async::<Vec<RedisValue>>(&mut conn).await }
        });
        let deadline = self.batch_deadline();
        let replies = tokio::time::timeout(deadline, futures::future::join_all(calls))
            .await
            .map_err(|_| {
                unavailable(format!(
                    "{} timed out after {}",
                    self.url,
                    ConfigDuration(deadline)
                ))
            })?;
        let mut values = vec![RedisValue::Nil; cmds.len()];
        let mut failure = None;
        for (group, reply) in groups.iter().zip(replies) {
            match reply {
                Ok(reply) => {
                    for (&i, value) in group.iter().zip(reply) {
                        values[i] = value;
                    }
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        let result = failure.map_or(Ok(values), Err);
        pooled.settle(&result);
        result.map_err(|e| unavailable(format!("{}: {e}", self.url)))
    }

    /// What an upsert of `record` writes, as the strings Redis holds (metadata aside).
    fn expected_fields(record: &Record) -> Vec<(String, String)> {
        record
            .written_fields()
            .map(|(name, value)| {
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Bool(b) => b.to_string(),
                    other => other.to_string(),
                };
                (name.to_string(), text)
            })
            .collect()
    }

    /// How the stored `hash` differs from `record` (`None`: in sync, or newer).
    fn drift(&self, record: &Record, hash: &HashMap<String, String>) -> Option<Drift> {
        let version = hash
            .get(&self.config.version_field)
            .and_then(|v| v.parse::<u64>().ok());
        match version {
            None => Some(Drift::Missing),
            Some(v) if v < record.event.aggregate_version => Some(Drift::Stale { stored: v }),
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
        }
    }

    /// `SCAN` for hashes of the key pattern: the keys of one page and the cursor of the next.
    /// On one server the cursor is Redis's own; on a cluster it is `<slot>:<cursor>`, the
    /// master that serves `<slot>` (its lowest) and the cursor there, the masters taken in
    /// the order of their lowest slot. A failover or a slot migration during the listing may
    /// skip keys that moved meanwhile: a second run finds them.
    async fn scan(
        &self,
        cursor: Option<String>,
    ) -> Result<(Vec<String>, Option<String>), SinkError> {
        let scan = |at: &str| {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(at)
                .arg("MATCH")
                .arg(self.key.pattern())
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .arg("TYPE")
                .arg("hash");
            cmd
        };
        if !self.cluster {
            let mut pipe = redis::pipe();
            pipe.add_command(scan(cursor.as_deref().unwrap_or("0")));
            let ((next, keys),): ((String, Vec<String>),) = self.query(&pipe).await?;
            return Ok((keys, (next != "0").then_some(next)));
        }
        let mut pooled = self.pooled().await?;
        let RedisConn::Cluster(mut conn) = pooled.conn().clone() else {
            return Err(unavailable(format!("{} is not a Redis Cluster", self.url)));
        };
        pooled.begin();
        let deadline = self.batch_deadline();
        let result = tokio::time::timeout(deadline, async {
            let (slot, at) = match &cursor {
                Some(cursor) => parse_cursor(cursor)?,
                None => match masters(&mut conn).await?.first() {
                    Some(&slot) => (slot, "0".to_string()),
                    None => return Ok((Vec::new(), None)),
                },
            };
            let route = Route::new(slot, SlotAddr::Master);
            let reply = conn
                .route_command(
                    scan(&at),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await?;
            let (at, keys): (String, Vec<String>) = redis::from_redis_value(reply)?;
            let next = if at != "0" {
                Some(format!("{slot}:{at}"))
            } else {
                let masters = masters(&mut conn).await?;
                masters
                    .into_iter()
                    .find(|&lowest| lowest > slot)
                    .map(|lowest| format!("{lowest}:0"))
            };
            Ok((keys, next))
        })
        .await
        .map_err(|_| {
            unavailable(format!(
                "listing keys on {} timed out after {}",
                self.url,
                ConfigDuration(deadline)
            ))
        })?;
        pooled.settle(&result);
        result.map_err(|e| unavailable(format!("listing keys on {}: {e}", self.url)))
    }
}

/// The slot and node cursor of a cluster key-scan cursor, `<slot>:<cursor>`.
fn parse_cursor(cursor: &str) -> Result<(u16, String), redis::RedisError> {
    cursor
        .split_once(':')
        .and_then(|(slot, at)| Some((slot.parse().ok()?, at.to_string())))
        .ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::Client,
                "not a cluster key-scan cursor",
                cursor.to_string(),
            ))
        })
}

/// The lowest slot each master of the cluster serves, in order (`CLUSTER SLOTS`).
async fn masters(conn: &mut ClusterConnection) -> Result<Vec<u16>, redis::RedisError> {
    let ranges: Vec<Vec<RedisValue>> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let mut lowest: HashMap<(String, u16), u16> = HashMap::new();
    for range in ranges {
        // [first slot, last slot, [master host, port, id, ...], replicas...]
        let (Some(first), Some(master)) = (range.first(), range.get(2)) else {
            continue;
        };
        let first: u16 = redis::from_redis_value_ref(first)?;
        let node: Vec<RedisValue> = redis::from_redis_value_ref(master)?;
        let (Some(host), Some(port)) = (node.first(), node.get(1)) else {
            continue;
        };
        let master = (
            redis::from_redis_value_ref(host)?,
            redis::from_redis_value_ref(port)?,
        );
        let slot = lowest.entry(master).or_insert(first);
        *slot = (*slot).min(first);
    }
    let mut slots: Vec<u16> = lowest.into_values().collect();
    slots.sort_unstable();
    Ok(slots)
}

impl Replica for RedisHashSink {
    fn key_of(&self, record: &Record) -> Result<String, String> {
        self.key.render(&record.event)
    }

    fn compare<'a>(&'a self, records: &'a [Record]) -> ReplicaFuture<'a, Vec<Option<Drift>>> {
        Box::pin(async move {
            let mut cmds = Vec::with_capacity(records.len());
            let mut asked = Vec::with_capacity(records.len());
            for (i, record) in records.iter().enumerate() {
                if let Ok(key) = self.key.render(&record.event) {
                    let mut cmd = redis::cmd("HGETALL");
                    cmd.arg(&key);
                    cmds.push((key, cmd));
                    asked.push(i);
                }
            }
            let mut drifts = vec![None; records.len()];
            let stored = self.per_key(cmds, false).await?;
            for (i, reply) in asked.into_iter().zip(stored) {
                let hash: HashMap<String, String> = redis::from_redis_value(reply)
                    .map_err(|e| unavailable(format!("unexpected HGETALL reply: {e}")))?;
                drifts[i] = self.drift(&records[i], &hash);
            }
            Ok(drifts)
        })
    }

    fn scan_keys<'a>(&'a self, cursor: Option<String>) -> ReplicaFuture<'a, KeyPage> {
        Box::pin(async move {
            let (keys, next) = self.scan(cursor).await?;
            let cmds = keys
                .iter()
                .map(|key| {
                    let mut cmd = redis::cmd("HMGET");
                    cmd.arg(key)
                        .arg(&self.config.version_field)
                        .arg(&self.config.occurred_at_field);
                    (key.clone(), cmd)
                })
                .collect();
            let fields = self.per_key(cmds, true).await?;
            let text = |v: Option<&RedisValue>| match v {
                Some(RedisValue::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            };
            Ok(KeyPage {
                // Hashes of the pattern without a version field are not replica rows.
                keys: keys
                    .into_iter()
                    .zip(fields)
                    .filter_map(|(key, reply)| {
                        let RedisValue::Array(values) = reply else {
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
                next,
            })
        })
    }

    fn evict<'a>(&'a self, rows: &'a [(String, u64)], why: Eviction) -> ReplicaFuture<'a, usize> {
        Box::pin(async move {
            let tombstone_ms = match why {
                Eviction::Orphan => EVICT_TOMBSTONE_MS,
                Eviction::Rewrite => 0,
            };
            let mut cmds = Vec::with_capacity(rows.len());
            for (key, version) in rows {
                // A key without a tombstone in its slot was never written by this sink: apply
                // rejects it.
                let Ok(tombstone) =
                    cluster::tombstone_key(&self.config.tombstone_prefix, key, self.cluster)
                else {
                    continue;
                };
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(EVICT_IF_UNCHANGED)
                    .arg(2)
                    .arg(key)
                    .arg(tombstone)
                    .arg(&self.config.version_field)
                    .arg(*version)
                    .arg(tombstone_ms);
                cmds.push((key.clone(), cmd));
            }
            let removed = self.per_key(cmds, false).await?;
            removed.into_iter().try_fold(0, |sum, reply| {
                redis::from_redis_value::<usize>(reply)
                    .map(|n| sum + n)
                    .map_err(|e| unavailable(format!("unexpected eviction reply: {e}")))
            })
        })
    }
}

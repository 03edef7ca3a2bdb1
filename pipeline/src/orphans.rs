//! Finding orphans (replica rows no snapshot row produced) in bounded memory, for the
//! bootstrap's final sweep and for `ecst reconcile`.
//!
//! While the snapshot is paged through, the keys each sink would write are recorded in a
//! temporary Redis set per sink, on the pipeline's source Redis ([`SeenKeys::record`]). The
//! sweep then lists each replica a page at a time and asks, for the whole page in one
//! `MULTI`, which keys any sink's set holds (`SMISMEMBER`, Redis 6.2 or later).
//!
//! Memory bound: the process holds one page at a time (the snapshot page being recorded, or
//! one page of at most 1,000 replica keys being swept), whatever the snapshot's size. The
//! sets live in Redis, about 50 bytes plus the key's length per key per sink, expire an hour
//! after their last use (a run that dies leaves nothing behind for long) and are deleted by
//! [`SeenKeys::discard`]. A set that vanished or changed meanwhile (a Redis restart without
//! persistence, an eviction policy, the TTL) is noticed by its member count, and the sweep
//! refuses rather than take every row for an orphan.

use std::sync::Arc;
use std::time::Duration;

use ecst_operators::redis_pool::{RedisPool, describe_run_error};
use ecst_operators::replica::Eviction;
use ecst_operators::{Sink, SinkError};

/// How long the sets outlive their last use.
const SET_TTL_MS: u64 = 3_600_000;

/// Orphan keys kept per sink as examples.
const EXAMPLES: usize = 5;

/// Why orphans could not be found.
#[derive(Debug, thiserror::Error)]
pub enum OrphanError {
    /// The Redis holding the seen keys failed.
    #[error("recording the snapshot's keys in Redis: {0}")]
    Redis(String),
    /// Some keys were not recorded, or a set was lost: every row could look like an orphan.
    #[error(
        "the snapshot's keys were not all recorded ({0}), so rows the source no longer has cannot be told apart; run `ecst reconcile --repair` to remove them"
    )]
    Incomplete(String),
    /// A replica could not be listed or evicted from.
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// What the sweep found in one sink.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Orphans found (each counted once, though `SCAN` may list a key twice).
    pub orphans: u64,
    /// Orphans removed (with a repair), each buried at its version.
    pub evicted: u64,
    /// A few orphans, as `key (version n)`.
    pub examples: Vec<String>,
}

/// The keys a snapshot produced, per sink, kept in temporary Redis sets.
pub struct SeenKeys {
    pool: RedisPool,
    timeout: Duration,
    /// One set per sink, by sink index.
    sets: Vec<String>,
    /// Per sink, the keys already reported as orphans (`SCAN` may return a key twice).
    reported: Vec<String>,
    /// Members each set should hold, to notice a set lost meanwhile.
    recorded: Vec<u64>,
    /// Why recording failed, if it did.
    incomplete: Option<String>,
}

impl SeenKeys {
    /// Empty sets for `sinks` sinks, named after `run` and a random id, on `pool`'s Redis.
    pub fn new(pool: RedisPool, run: &str, sinks: usize, timeout: Duration) -> SeenKeys {
        // One hash tag: the sets share a slot, so one MULTI can read them all.
        let base = format!("ecst:seen:{{{run}:{}}}", uuid::Uuid::new_v4());
        SeenKeys {
            pool,
            timeout,
            sets: (0..sinks).map(|i| format!("{base}:{i}")).collect(),
            reported: (0..sinks).map(|i| format!("{base}:{i}:reported")).collect(),
            recorded: vec![0; sinks],
            incomplete: None,
        }
    }

    /// Whether every key was recorded, so that a sweep can trust the sets.
    pub fn is_complete(&self) -> bool {
        self.incomplete.is_none()
    }

    /// The name of sink `sink`'s set, for looking at it.
    pub fn set_name(&self, sink: usize) -> Option<&str> {
        self.sets.get(sink).map(String::as_str)
    }

    /// Adds keys sink `sink` would write. A failure leaves the sets incomplete: the sweep
    /// then refuses.
    pub async fn record(&mut self, sink: usize, keys: &[String]) -> Result<(), OrphanError> {
        if keys.is_empty() {
            return Ok(());
        }
        let Some(set) = self.sets.get(sink).cloned() else {
            return Ok(());
        };
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SADD")
            .arg(&set)
            .arg(keys)
            .cmd("PEXPIRE")
            .arg(&set)
            .arg(SET_TTL_MS)
            .ignore()
            .cmd("SCARD")
            .arg(&set);
        let result: Result<(u64, u64), OrphanError> = self.query(&pipe).await;
        let checked = result.and_then(|(added, members)| {
            self.recorded[sink] += added;
            if members == self.recorded[sink] {
                Ok(())
            } else {
                Err(OrphanError::Redis(format!(
                    "set {set} holds {members} keys, {} were recorded",
                    self.recorded[sink]
                )))
            }
        });
        if let Err(e) = &checked {
            self.incomplete.get_or_insert_with(|| e.to_string());
        }
        checked
    }

    /// Lists every replica of `sinks` (indexed as recorded) and finds the rows no sink's set
    /// holds; with `repair`, evicts them while still at the version listed, leaving a
    /// tombstone. Rows written at or after `since_ms` are left alone: a live worker may have
    /// added them after the snapshot passed their place. Returns one [`Swept`] per sink.
    pub async fn sweep(
        &mut self,
        sinks: &[(String, Arc<dyn Sink>)],
        repair: bool,
        since_ms: i64,
    ) -> Result<Vec<Swept>, OrphanError> {
        if let Some(why) = &self.incomplete {
            return Err(OrphanError::Incomplete(why.clone()));
        }
        // A sweep retried after a failure reports (and evicts) afresh.
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(&self.reported).ignore();
        self.query::<()>(&pipe).await?;
        let mut swept = vec![Swept::default(); sinks.len()];
        for (i, (_, sink)) in sinks.iter().enumerate() {
            let Some(replica) = sink.replica() else {
                continue;
            };
            let found = &mut swept[i];
            let mut cursor = None;
            loop {
                let page = replica.scan_keys(cursor).await?;
                let listed: Vec<(String, u64)> = page
                    .keys
                    .into_iter()
                    .filter(|k| k.touched_ms.is_none_or(|t| t < since_ms))
                    .map(|k| (k.key, k.version))
                    .collect();
                let seen = self.seen_anywhere(&listed).await?;
                let orphans: Vec<(String, u64)> = listed
                    .into_iter()
                    .zip(seen)
                    .filter(|(_, seen)| !seen)
                    .map(|(key, _)| key)
                    .collect();
                let orphans = self.first_reports(i, orphans).await?;
                for (key, version) in &orphans {
                    if found.examples.len() < EXAMPLES {
                        found.examples.push(format!("{key} (version {version})"));
                    }
                }
                found.orphans += orphans.len() as u64;
                if repair && !orphans.is_empty() {
                    found.evicted += replica.evict(&orphans, Eviction::Orphan).await? as u64;
                }
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
        }
        Ok(swept)
    }

    /// Deletes the sets (best effort: they expire anyway).
    pub async fn discard(self) {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(&self.sets).arg(&self.reported).ignore();
        if let Err(e) = self.query::<()>(&pipe).await {
            tracing::debug!(error = %e, "Cannot delete the snapshot's key sets; they expire.");
        }
    }

    /// Whether each key is in any sink's set, checking in the same MULTI that no set lost
    /// members.
    async fn seen_anywhere(&mut self, keys: &[(String, u64)]) -> Result<Vec<bool>, OrphanError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for set in &self.sets {
            pipe.cmd("PEXPIRE").arg(set).arg(SET_TTL_MS).ignore();
            pipe.cmd("SCARD").arg(set);
            pipe.cmd("SMISMEMBER").arg(set).arg(&names);
        }
        let replies: Vec<redis::Value> = self.query(&pipe).await?;
        let mut seen = vec![false; keys.len()];
        for (i, pair) in replies.chunks(2).enumerate() {
            let (members, flags): (u64, Vec<bool>) = match pair {
                [members, flags] => (
                    redis::from_redis_value_ref(members).map_err(parse_error)?,
                    redis::from_redis_value_ref(flags).map_err(parse_error)?,
                ),
                _ => return Err(OrphanError::Redis("short MULTI reply".into())),
            };
            if members != self.recorded[i] {
                let why = format!(
                    "set {} holds {members} keys, {} were recorded; was Redis restarted?",
                    self.sets[i], self.recorded[i]
                );
                self.incomplete = Some(why.clone());
                return Err(OrphanError::Incomplete(why));
            }
            for (seen, flag) in seen.iter_mut().zip(flags) {
                *seen |= flag;
            }
        }
        Ok(seen)
    }

    /// The orphans not reported before for sink `sink`.
    async fn first_reports(
        &self,
        sink: usize,
        orphans: Vec<(String, u64)>,
    ) -> Result<Vec<(String, u64)>, OrphanError> {
        if orphans.is_empty() {
            return Ok(orphans);
        }
        let reported = &self.reported[sink];
        let mut pipe = redis::pipe();
        for (key, _) in &orphans {
            pipe.cmd("SADD").arg(reported).arg(key);
        }
        pipe.cmd("PEXPIRE").arg(reported).arg(SET_TTL_MS).ignore();
        let added: Vec<u64> = self.query(&pipe).await?;
        Ok(orphans
            .into_iter()
            .zip(added)
            .filter(|(_, added)| *added == 1)
            .map(|(orphan, _)| orphan)
            .collect())
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, OrphanError> {
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|e| OrphanError::Redis(describe_run_error(e)))?;
        conn.begin();
        let result = tokio::time::timeout(self.timeout, pipe.query_async(conn.conn()))
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no answer in time",
                )))
            });
        conn.settle(&result);
        result.map_err(redis_error)
    }
}

fn redis_error(e: redis::RedisError) -> OrphanError {
    OrphanError::Redis(e.to_string())
}

fn parse_error(e: redis::ParsingError) -> OrphanError {
    OrphanError::Redis(format!("unexpected reply: {e}"))
}

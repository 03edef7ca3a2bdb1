//! The Redis claim store: `SET <prefix>sha256:<hex> <body> EX <ttl>`, read back with
//! pipelined STRLEN + GETRANGE (one key each, so a cluster routes every read to its own slot;
//! GETRANGE bounds what a value larger than its reference costs).

use std::time::Duration;

use ecst_schemas::ClaimRef;
use ecst_schemas::claim::REDIS_STORE;

use super::{ClaimFuture, ClaimRead, ClaimStore, ClaimStoreError};
use crate::redis_pool::{RedisPool, describe_run_error, is_cluster_url};
use crate::secret::SecretUrl;

/// Claim store in Redis (one server or a cluster).
#[derive(Clone)]
pub struct RedisClaimStore {
    pool: RedisPool,
    url: SecretUrl,
    prefix: String,
    ttl: Duration,
    timeout: Duration,
    cluster: bool,
}

impl std::fmt::Debug for RedisClaimStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClaimStore")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RedisClaimStore {
    /// A store over `pool` (whose URL is `url`, one server or `redis+cluster://`), writing
    /// keys `prefix` + `sha256:<hex>` that expire after `ttl`; `timeout` bounds every round trip.
    pub fn new(
        pool: RedisPool,
        url: SecretUrl,
        prefix: impl Into<String>,
        ttl: Duration,
        timeout: Duration,
    ) -> Self {
        RedisClaimStore {
            cluster: is_cluster_url(&url),
            pool,
            url,
            prefix: prefix.into(),
            ttl,
            timeout,
        }
    }

    fn unavailable(&self, message: impl Into<String>) -> ClaimStoreError {
        ClaimStoreError::Unavailable {
            store: format!("redis {}", self.url),
            message: message.into(),
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, ClaimStoreError> {
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|e| self.unavailable(describe_run_error(e)))?;
        conn.begin();
        let result = match tokio::time::timeout(self.timeout, pipe.query_async(conn.conn())).await {
            Ok(result) => result,
            Err(_) => {
                return Err(self.unavailable(format!("no reply within {:?}", self.timeout)));
            }
        };
        conn.settle(&result);
        result.map_err(|e| self.unavailable(e.to_string()))
    }

    /// One STRLEN + GETRANGE per key, concurrently: a cluster refuses a pipeline whose keys
    /// span slots.
    async fn get_each(&self, refs: &[&ClaimRef]) -> Result<Vec<ClaimRead>, ClaimStoreError> {
        let mut pooled = self
            .pool
            .get()
            .await
            .map_err(|e| self.unavailable(describe_run_error(e)))?;
        let conn = pooled.conn().clone();
        let gets = refs.iter().map(|claim| {
            let mut conn = conn.clone();
            async move {
                let mut pipe = redis::pipe();
                push_read(&mut pipe, claim);
                pipe.ignore_errors()
                    .query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut conn)
                    .await
            }
        });
        let results = tokio::time::timeout(self.timeout, futures::future::join_all(gets))
            .await
            .map_err(|_| self.unavailable(format!("no reply within {:?}", self.timeout)))?;
        let mut reads = Vec::with_capacity(refs.len());
        for (claim, result) in refs.iter().zip(results) {
            let replies = result.map_err(|e| self.unavailable(e.to_string()))?;
            reads.push(self.read_of(claim, replies)?);
        }
        Ok(reads)
    }

    /// What one key's STRLEN and GETRANGE replies say.
    fn read_of(
        &self,
        claim: &ClaimRef,
        replies: Vec<redis::RedisResult<redis::Value>>,
    ) -> Result<ClaimRead, ClaimStoreError> {
        let mut replies = replies.into_iter();
        let (Some(len), Some(body)) = (replies.next(), replies.next()) else {
            return Err(self.unavailable("short pipeline reply"));
        };
        let len = match len {
            Ok(value) => redis::from_redis_value::<u64>(value)
                .map_err(|e| self.unavailable(format!("STRLEN reply: {e}")))?,
            Err(e) => return self.key_error(e),
        };
        if len == 0 {
            return Ok(ClaimRead::Missing);
        }
        if len > claim.size {
            return Ok(ClaimRead::Bad(format!(
                "stored value is {len} bytes, the reference says {}",
                claim.size
            )));
        }
        match body {
            Ok(value) => redis::from_redis_value::<Vec<u8>>(value)
                .map(ClaimRead::Found)
                .map_err(|e| self.unavailable(format!("GETRANGE reply: {e}"))),
            Err(e) => self.key_error(e),
        }
    }

    /// A per-key error: the server being unable to answer now is retried, anything else
    /// (WRONGTYPE: the key holds no string) is this claim's own problem.
    fn key_error(&self, e: redis::RedisError) -> Result<ClaimRead, ClaimStoreError> {
        let transient = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || matches!(
                e.code(),
                Some(
                    "LOADING"
                        | "BUSY"
                        | "TRYAGAIN"
                        | "CLUSTERDOWN"
                        | "MASTERDOWN"
                        | "MOVED"
                        | "ASK"
                )
            );
        if transient {
            Err(self.unavailable(e.to_string()))
        } else {
            Ok(ClaimRead::Bad(format!("the store refused the read: {e}")))
        }
    }
}

/// Queues the reads of one claim: its length, then at most one byte more than the reference's
/// size (so a larger value is seen as larger without being read whole). An empty or absent
/// key has length 0: no claim body is empty.
fn push_read(pipe: &mut redis::Pipeline, claim: &ClaimRef) {
    pipe.cmd("STRLEN").arg(&claim.key);
    pipe.cmd("GETRANGE")
        .arg(&claim.key)
        .arg(0)
        .arg(claim.size.min(i64::MAX as u64));
}

impl ClaimStore for RedisClaimStore {
    fn name(&self) -> &'static str {
        REDIS_STORE
    }

    fn put<'a>(&'a self, body: &'a [u8]) -> ClaimFuture<'a, ClaimRef> {
        Box::pin(async move {
            let claim = ClaimRef::redis(&self.prefix, body);
            let mut pipe = redis::pipe();
            // Re-writing an existing body refreshes its TTL: the newest reference decides.
            pipe.cmd("SET")
                .arg(&claim.key)
                .arg(body)
                .arg("EX")
                .arg(self.ttl.as_secs().max(1))
                .ignore();
            self.run::<()>(&pipe).await?;
            Ok(claim)
        })
    }

    fn get_many<'a>(&'a self, refs: &'a [&'a ClaimRef]) -> ClaimFuture<'a, Vec<ClaimRead>> {
        Box::pin(async move {
            // A reference naming another store is not read here (the key may exist in this
            // one by chance); the rest of the batch is.
            let ours: Vec<&ClaimRef> = refs
                .iter()
                .copied()
                .filter(|r| r.store == REDIS_STORE)
                .collect();
            let mut read = if ours.is_empty() {
                Vec::new()
            } else if self.cluster {
                self.get_each(&ours).await?
            } else {
                let mut pipe = redis::pipe();
                for claim in &ours {
                    push_read(&mut pipe, claim);
                }
                pipe.ignore_errors();
                let replies: Vec<redis::RedisResult<redis::Value>> = self.run(&pipe).await?;
                let mut replies = replies.into_iter();
                let mut reads = Vec::with_capacity(ours.len());
                for claim in &ours {
                    let pair: Vec<_> = replies.by_ref().take(2).collect();
                    reads.push(self.read_of(claim, pair)?);
                }
                reads
            }
            .into_iter();
            Ok(refs
                .iter()
                .map(|r| {
                    if r.store == REDIS_STORE {
                        read.next().unwrap_or(ClaimRead::Missing)
                    } else {
                        ClaimRead::Bad(format!(
                            "reference names store `{}`, this store is `{REDIS_STORE}`",
                            r.store
                        ))
                    }
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_pool::redis_pool;

    fn store(prefix: &str) -> RedisClaimStore {
        let url = SecretUrl::new(
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        );
        let pool = redis_pool(&url, 2, Duration::from_secs(2)).unwrap();
        RedisClaimStore::new(
            pool,
            url,
            prefix,
            Duration::from_secs(60),
            Duration::from_secs(2),
        )
    }

    #[tokio::test]
    async fn put_then_get_round_trips_and_misses_are_none() {
        let prefix = format!("test:claim:{}:", uuid::Uuid::new_v4());
        let store = store(&prefix);
        let body = vec![7u8; 300_000];
        let claim = store.put(&body).await.unwrap();
        assert!(claim.key.starts_with(&prefix), "{}", claim.key);
        assert_eq!(claim.validate(), Ok(()));
        let absent = ClaimRef::redis(&prefix, b"never written");
        let got = store.get_many(&[&claim, &absent]).await.unwrap();
        assert_eq!(
            got,
            vec![ClaimRead::Found(body.clone()), ClaimRead::Missing]
        );
        // The key expires: a TTL is set, at most the configured one.
        let mut conn = store.pool.get().await.unwrap();
        let ttl: i64 = redis::cmd("TTL")
            .arg(&claim.key)
            .query_async(conn.conn())
            .await
            .unwrap();
        assert!((1..=60).contains(&ttl), "ttl {ttl}");
        let _: () = redis::cmd("DEL")
            .arg(&claim.key)
            .query_async(conn.conn())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_foreign_store_a_wrong_type_and_an_oversized_value_are_bad_not_unavailable() {
        let prefix = format!("test:claim:{}:", uuid::Uuid::new_v4());
        let store = store(&prefix);
        let good = store.put(br#"{"ok":1}"#).await.unwrap();
        let mut foreign = good.clone();
        foreign.store = "s3".into();
        let hash = ClaimRef::redis(&prefix, b"a hash is stored here");
        let big = ClaimRef::redis(&prefix, b"{}");
        let mut conn = store.pool.get().await.unwrap();
        let _: () = redis::cmd("HSET")
            .arg(&hash.key)
            .arg("f")
            .arg("v")
            .query_async(conn.conn())
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg(&big.key)
            .arg(vec![b'x'; 10_000])
            .query_async(conn.conn())
            .await
            .unwrap();
        let got = store
            .get_many(&[&foreign, &hash, &good, &big])
            .await
            .unwrap();
        assert!(
            matches!(&got[0], ClaimRead::Bad(m) if m.contains("`s3`")),
            "{got:?}"
        );
        assert!(
            matches!(&got[1], ClaimRead::Bad(m) if m.contains("WRONGTYPE")),
            "{got:?}"
        );
        assert_eq!(got[2], ClaimRead::Found(br#"{"ok":1}"#.to_vec()));
        assert_eq!(
            got[3],
            ClaimRead::Bad("stored value is 10000 bytes, the reference says 2".into())
        );
        let _: () = redis::cmd("DEL")
            .arg(&good.key)
            .arg(&hash.key)
            .arg(&big.key)
            .query_async(conn.conn())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_store_that_is_down_is_unavailable_not_missing() {
        // Nothing listens on port 1.
        let url = SecretUrl::new("redis://127.0.0.1:1");
        let pool = redis_pool(&url, 1, Duration::from_millis(300)).unwrap();
        let store = RedisClaimStore::new(
            pool,
            url,
            "x:",
            Duration::from_secs(60),
            Duration::from_millis(300),
        );
        let claim = ClaimRef::redis("x:", b"body");
        let err = store.get_many(&[&claim]).await.unwrap_err();
        assert!(matches!(err, ClaimStoreError::Unavailable { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_cluster_reads_claims_in_every_slot() {
        let url = crate::redis_pool::test_cluster_url();
        let pool = redis_pool(&url, 2, Duration::from_secs(2)).unwrap();
        let prefix = format!("test:claim:{}:", uuid::Uuid::new_v4());
        let store = RedisClaimStore::new(
            pool,
            url,
            prefix.as_str(),
            Duration::from_secs(60),
            Duration::from_secs(2),
        );
        let bodies: Vec<Vec<u8>> = (0..20)
            .map(|i| format!("{{\"n\":{i}}}").into_bytes())
            .collect();
        let mut claims = Vec::new();
        for body in &bodies {
            claims.push(store.put(body).await.unwrap());
        }
        let refs: Vec<&ClaimRef> = claims.iter().collect();
        let got = store.get_many(&refs).await.unwrap();
        let expected: Vec<ClaimRead> = bodies.into_iter().map(ClaimRead::Found).collect();
        assert_eq!(got, expected);
    }
}

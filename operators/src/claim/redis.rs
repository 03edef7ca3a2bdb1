//! The Redis claim store: `SET <prefix>sha256:<hex> <body> EX <ttl>`, read back with
//! pipelined GETs (one key each, so a cluster routes every GET to its own slot).

use std::time::Duration;

use ecst_schemas::ClaimRef;
use ecst_schemas::claim::REDIS_STORE;

use super::{ClaimFuture, ClaimStore, ClaimStoreError};
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

    /// One GET per key, concurrently: a cluster refuses a pipeline whose keys span slots.
    async fn get_each(&self, refs: &[&ClaimRef]) -> Result<Vec<Option<Vec<u8>>>, ClaimStoreError> {
        let mut pooled = self
            .pool
            .get()
            .await
            .map_err(|e| self.unavailable(describe_run_error(e)))?;
        let conn = pooled.conn().clone();
        let gets = refs.iter().map(|claim| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("GET")
                    .arg(&claim.key)
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
            }
        });
        match tokio::time::timeout(self.timeout, futures::future::join_all(gets)).await {
            Ok(results) => results
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.unavailable(e.to_string())),
            Err(_) => Err(self.unavailable(format!("no reply within {:?}", self.timeout))),
        }
    }
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

    fn get_many<'a>(&'a self, refs: &'a [&'a ClaimRef]) -> ClaimFuture<'a, Vec<Option<Vec<u8>>>> {
        Box::pin(async move {
            if let Some(other) = refs.iter().find(|r| r.store != REDIS_STORE) {
                return Err(ClaimStoreError::WrongStore {
                    named: other.store.clone(),
                    this: REDIS_STORE,
                });
            }
            if refs.is_empty() {
                return Ok(Vec::new());
            }
            if self.cluster {
                return self.get_each(refs).await;
            }
            let mut pipe = redis::pipe();
            for claim in refs {
                pipe.cmd("GET").arg(&claim.key);
            }
            self.run(&pipe).await
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
        assert_eq!(got, vec![Some(body.clone()), None]);
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
        let mut other = claim.clone();
        other.store = "s3".into();
        let err = store.get_many(&[&other]).await.unwrap_err();
        assert!(matches!(err, ClaimStoreError::WrongStore { .. }), "{err}");
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
        let expected: Vec<Option<Vec<u8>>> = bodies.into_iter().map(Some).collect();
        assert_eq!(got, expected);
    }
}

//! Every Redis connection ecst opens, to one server or to a Redis Cluster: the URL forms with
//! their TLS options ([`redis_client`], and `redis+cluster://` in `cluster`), the redis crate's
//! connection [`RedisConn`] with a bb8 pool whose every command has a response timeout, the
//! stream reader's own connection ([`ReaderConn`]: [`DirectConn`], [`ClusterReader`]), and the
//! classification of failures ([`RedisFailure`]) that `/readyz` and error messages report.
//!
//! One manager serves both kinds of server, rather than `bb8-redis` for one server and the
//! redis crate's own bb8 manager for a cluster: both of those open connections with fixed
//! timeouts and never report a connection as broken, while ecst's pool gives every command the
//! configured response timeout and drops a connection after a transport failure
//! ([`PooledRedis::begin`] and [`PooledRedis::settle`]).

mod client;
mod cluster;
mod cluster_reader;
mod conn;
mod direct;
mod failure;
pub mod resp;

use std::fmt;
use std::time::Duration;

use redis::{AsyncConnectionConfig, Client, RedisError};

pub use client::{RedisUrlError, redis_client, redis_user};
use cluster::ClusterSeeds;
pub use cluster::{SLOTS, SlotRange, key_slot, slot_ranges};
pub use cluster_reader::ClusterReader;
pub use conn::RedisConn;
pub use direct::{DirectConn, DirectTarget, ReaderConn, ReaderReply};
pub use failure::{FailureKind, RedisFailure, access_problems, report_failure, resolve_failure};
use failure::{latest_connect_failure, note_connect};

use crate::secret::SecretUrl;

/// Pool of Redis connections, to one server or to a cluster.
pub type RedisPool = bb8::Pool<RedisManager>;

/// What a URL names.
#[derive(Clone)]
enum Target {
    /// One server.
    Single(Client),
    /// A cluster, by its seed nodes.
    Cluster(ClusterSeeds),
}

/// Where a stream reader's direct connection goes.
#[derive(Clone)]
enum DirectPlan {
    /// The one server.
    Single(DirectTarget),
    /// The master serving the stream, found from these seeds.
    Cluster(Vec<DirectTarget>),
    /// The redis crate's connection (a URL or TLS files only it reads).
    RedisCrate,
}

/// bb8 manager that opens connections with explicit connect and response timeouts.
#[derive(Clone)]
pub struct RedisManager {
    url: SecretUrl,
    target: Target,
    config_timeout: Duration,
    /// Where a stream reader connects directly, read from the URL (and its TLS files) once.
    direct: std::sync::OnceLock<DirectPlan>,
}

impl fmt::Debug for RedisManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisManager")
            .field("url", &self.url)
            .field("timeout", &self.config_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisManager {
    /// A manager for `url` (one server, or `redis+cluster://`); `timeout` bounds connecting
    /// and every command.
    pub fn new(url: &SecretUrl, timeout: Duration) -> Result<Self, RedisUrlError> {
        let target = match ClusterSeeds::parse(url.expose())? {
            Some(seeds) => {
                // Building checks what the redis crate checks (one user, one TLS mode).
                seeds.client(timeout, timeout).map_err(RedisUrlError::Url)?;
                Target::Cluster(seeds)
            }
            None => Target::Single(redis_client(url)?),
        };
        Ok(RedisManager {
            url: url.clone(),
            target,
            config_timeout: timeout,
            direct: std::sync::OnceLock::new(),
        })
    }

    /// Whether the URL names a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// A pool of at most `size` connections of this manager, built without connecting yet, so
    /// a worker can start while Redis is down.
    pub fn into_pool(self, size: u32) -> RedisPool {
        bb8::Pool::builder()
            .max_size(size.max(1))
            .connection_timeout(self.config_timeout)
            .test_on_check_out(false)
            .build_unchecked(self)
    }

    /// Opens one connection outside the pool (for a dedicated blocking command); on a cluster,
    /// a connection of its own, never shared with another user. Its outcome is recorded for
    /// `/readyz` and pool-timeout messages.
    pub async fn connect_with_timeout(
        &self,
        response_timeout: Duration,
    ) -> Result<RedisConn, RedisError> {
        let result = self.connect_once(response_timeout).await;
        note_connect(&self.url, &result);
        result
    }

    /// Opens the connection of a dedicated stream reader of `key`: a [`DirectConn`] to a single
    /// server, or a [`ClusterReader`] to the master serving `key`, else (a URL only the redis
    /// crate reads) the redis crate's. Its outcome is recorded like
    /// [`RedisManager::connect_with_timeout`]'s.
    pub async fn connect_reader(
        &self,
        response_timeout: Duration,
        key: &str,
    ) -> Result<ReaderConn, RedisError> {
        let plan = self.direct.get_or_init(|| {
            let plan = match &self.target {
                Target::Single(_) => DirectTarget::of(&self.url).map(DirectPlan::Single),
                Target::Cluster(seeds) => seeds.direct_targets().map(DirectPlan::Cluster),
            };
            plan.unwrap_or_else(|| {
                tracing::warn!(
                    redis = %self.url,
                    "the stream reader uses the redis crate's connection: its URL or TLS files \
                     do not make a direct connection (the first connect says why if they are wrong)"
                );
                DirectPlan::RedisCrate
            })
        });
        let result = match plan {
            DirectPlan::Single(target) => {
                DirectConn::connect(target, self.config_timeout, response_timeout)
                    .await
                    .map(ReaderConn::Direct)
            }
            DirectPlan::Cluster(seeds) => {
                ClusterReader::connect(seeds, key, self.config_timeout, response_timeout)
                    .await
                    .map(|reader| ReaderConn::Cluster(Box::new(reader)))
            }
            DirectPlan::RedisCrate => self
                .connect_once(response_timeout)
                .await
                .map(ReaderConn::Client),
        };
        note_connect(&self.url, &result);
        result
    }

    /// Opens one connection for a one-shot command or a probe, without recording its outcome.
    pub async fn connect_once(&self, response_timeout: Duration) -> Result<RedisConn, RedisError> {
        match &self.target {
            Target::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.config_timeout))
                    .set_response_timeout(Some(response_timeout));
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(RedisConn::Single)
            }
            Target::Cluster(seeds) => {
                let client = seeds.client(self.config_timeout, response_timeout)?;
                // Discovery is several round trips (a seed, its slot map, every master), each
                // bounded by the redis crate; this bounds the whole.
                let deadline = self.config_timeout + response_timeout;
                match tokio::time::timeout(deadline, client.get_async_connection()).await {
                    Ok(result) => result.map(RedisConn::Cluster),
                    Err(_) => Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("cluster discovery took more than {deadline:?}"),
                    ))),
                }
            }
        }
    }
}

/// Whether `url` names a Redis Cluster (`redis+cluster://`, `rediss+cluster://`), without
/// checking the rest of it.
pub fn is_cluster_url(url: &SecretUrl) -> bool {
    cluster::is_cluster_scheme(url.expose())
}

/// The seed nodes of a `redis+cluster://` URL as single-node URLs (credentials and options
/// kept); `None` for a single-node URL.
pub fn cluster_seed_urls(url: &SecretUrl) -> Result<Option<Vec<String>>, RedisUrlError> {
    cluster::seed_urls(url.expose())
}

/// Checks a Redis URL (one server or a cluster) and reads its TLS files, without connecting.
pub fn check_redis_url(url: &SecretUrl) -> Result<(), RedisUrlError> {
    RedisManager::new(url, Duration::from_secs(1)).map(drop)
}

/// A pooled connection that its user marks broken after a transport error, so the pool
/// drops it instead of handing it out again.
pub struct PooledRedis {
    conn: RedisConn,
    broken: bool,
}

impl PooledRedis {
    /// The connection, for running commands.
    pub fn conn(&mut self) -> &mut RedisConn {
        &mut self.conn
    }

    /// Marks the connection as owing a reply: if the command is cancelled (timed out) before
    /// [`PooledRedis::settle`], the pool drops it rather than reuse a desynchronised stream.
    pub fn begin(&mut self) {
        self.broken = true;
    }

    /// Records how a command ended: a reply (even an error reply) leaves the connection
    /// usable, a transport failure does not.
    pub fn settle<T>(&mut self, result: &Result<T, RedisError>) {
        self.broken = match result {
            Ok(_) => false,
            Err(e) => is_transport_error(e),
        };
    }
}

/// Whether an error means the connection itself failed (as opposed to an error reply).
pub fn is_transport_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

impl bb8::ManageConnection for RedisManager {
    type Connection = PooledRedis;
    type Error = RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        Ok(PooledRedis {
            conn: self.connect_with_timeout(self.config_timeout).await?,
            broken: false,
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        redis::cmd("PING").query_async::<()>(&mut conn.conn).await
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.broken
    }
}

/// Builds a pool without connecting yet, so a worker can start while Redis is down.
pub fn redis_pool(
    url: &SecretUrl,
    size: u32,
    timeout: Duration,
) -> Result<RedisPool, RedisUrlError> {
    Ok(RedisManager::new(url, timeout)?.into_pool(size))
}

/// Short text for a pool checkout failure: bb8 only says it timed out, so the latest failed
/// connect (which names its server, the cause and what to check) leads.
pub fn describe_run_error(err: bb8::RunError<RedisError>) -> String {
    match err {
        bb8::RunError::User(e) => e.to_string(),
        bb8::RunError::TimedOut => match latest_connect_failure() {
            Some(failure) => format!("{failure} (no connection within the pool's timeout)"),
            None => "no pooled Redis connection within the timeout: every connection is busy or Redis is slow to accept one".to_string(),
        },
    }
}

/// The local test cluster (`scripts/services.sh` starts it): `ECST_CLUSTER_URL`, by default
/// the first three of its six nodes.
#[cfg(test)]
pub(crate) fn test_cluster_url() -> SecretUrl {
    SecretUrl::new(std::env::var("ECST_CLUSTER_URL").unwrap_or_else(|_| {
        "redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".to_string()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pool_timeout_says_why_the_connection_failed() {
        // Nothing listens on port 1.
        let url = SecretUrl::new("redis://app:s3cret@127.0.0.1:1");
        let pool = redis_pool(&url, 1, Duration::from_millis(300)).unwrap();
        let Err(err) = pool.get().await else {
            panic!("connected to port 1");
        };
        let text = describe_run_error(err);
        assert!(
            text.starts_with("connection refused by redis://app:***@127.0.0.1:1: is Redis running there? Check the host and port in the URL"),
            "{text}"
        );
        assert!(!text.contains("s3cret"));
    }

    #[tokio::test]
    async fn a_host_that_does_not_resolve_is_named_as_such() {
        // `.invalid` never resolves (RFC 2606).
        let url = SecretUrl::new("redis://no-such-host.invalid:6379");
        let pool = redis_pool(&url, 1, Duration::from_millis(2000)).unwrap();
        let Err(err) = pool.get().await else {
            panic!("connected to a host that does not exist");
        };
        let text = describe_run_error(err);
        assert!(
            text.starts_with("cannot resolve the host of redis://no-such-host.invalid:6379"),
            "{text}"
        );
        assert!(text.contains("check the host name in the URL"), "{text}");
    }
}

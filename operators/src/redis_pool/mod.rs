//! Every Redis connection ecst opens: the one client constructor with its TLS options
//! ([`redis_client`]), a bb8 pool whose every command has a response timeout, and the
//! classification of failures ([`RedisFailure`]) that `/readyz` and error messages report.

mod client;
mod failure;

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};

pub use client::{RedisUrlError, redis_client, redis_user};
pub use failure::{FailureKind, RedisFailure, access_problems, report_failure, resolve_failure};
use failure::{latest_connect_failure, note_connect};

use crate::secret::SecretUrl;

/// Pool of multiplexed Redis connections.
pub type RedisPool = bb8::Pool<RedisManager>;

/// bb8 manager that opens connections with explicit connect and response timeouts.
#[derive(Debug, Clone)]
pub struct RedisManager {
    url: SecretUrl,
    client: Client,
    config_timeout: Duration,
}

impl RedisManager {
    /// A manager for `url`; `timeout` bounds connecting and every command.
    pub fn new(url: &SecretUrl, timeout: Duration) -> Result<Self, RedisUrlError> {
        Ok(RedisManager {
            url: url.clone(),
            client: redis_client(url)?,
            config_timeout: timeout,
        })
    }

    /// Opens one connection outside the pool (for a dedicated blocking reader).
    pub async fn connect_with_timeout(
        &self,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config_timeout))
            .set_response_timeout(Some(response_timeout));
        let result = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        note_connect(&self.url, &result);
        result
    }
}

/// A pooled connection that its user marks broken after a transport error, so the pool
/// drops it instead of handing it out again.
pub struct PooledRedis {
    conn: MultiplexedConnection,
    broken: bool,
}

impl PooledRedis {
    /// The connection, for running commands.
    pub fn conn(&mut self) -> &mut MultiplexedConnection {
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
    let manager = RedisManager::new(url, timeout)?;
    Ok(bb8::Pool::builder()
        .max_size(size.max(1))
        .connection_timeout(timeout)
        .test_on_check_out(false)
        .build_unchecked(manager))
}

/// Short text for a pool checkout failure: bb8 only says it timed out, so the latest failed
/// connect (which names its server) says why.
pub fn describe_run_error(err: bb8::RunError<RedisError>) -> String {
    match err {
        bb8::RunError::User(e) => e.to_string(),
        bb8::RunError::TimedOut => match latest_connect_failure() {
            Some(failure) => format!("timed out waiting for a pooled connection: {failure}"),
            None => "timed out waiting for a pooled connection".to_string(),
        },
    }
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
            text.starts_with("timed out waiting for a pooled connection: connection refused by redis://app:***@127.0.0.1:1"),
            "{text}"
        );
        assert!(!text.contains("s3cret"));
    }
}

//! A bb8 pool of Redis connections whose every command has a response timeout.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};

use crate::secret::SecretUrl;

/// Pool of multiplexed Redis connections.
pub type RedisPool = bb8::Pool<RedisManager>;

/// bb8 manager that opens connections with explicit connect and response timeouts.
#[derive(Debug, Clone)]
pub struct RedisManager {
    client: Client,
    config_timeout: Duration,
}

impl RedisManager {
    /// A manager for `url`; `timeout` bounds connecting and every command.
    pub fn new(url: &SecretUrl, timeout: Duration) -> Result<Self, RedisError> {
        Ok(RedisManager {
            client: Client::open(url.expose())?,
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
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }
}

impl bb8::ManageConnection for RedisManager {
    type Connection = MultiplexedConnection;
    type Error = RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        self.connect_with_timeout(self.config_timeout).await
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        redis::cmd("PING").query_async::<()>(conn).await
    }

    fn has_broken(&self, _conn: &mut Self::Connection) -> bool {
        false
    }
}

/// Builds a pool without connecting yet, so a worker can start while Redis is down.
pub fn redis_pool(url: &SecretUrl, size: u32, timeout: Duration) -> Result<RedisPool, RedisError> {
    let manager = RedisManager::new(url, timeout)?;
    Ok(bb8::Pool::builder()
        .max_size(size.max(1))
        .connection_timeout(timeout)
        .test_on_check_out(false)
        .build_unchecked(manager))
}

/// Short text for a pool checkout failure.
pub fn describe_run_error(err: bb8::RunError<RedisError>) -> String {
    match err {
        bb8::RunError::User(e) => e.to_string(),
        bb8::RunError::TimedOut => "timed out waiting for a pooled connection".to_string(),
    }
}

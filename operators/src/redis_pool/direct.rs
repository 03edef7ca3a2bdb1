//! A dedicated connection to one Redis server whose replies are handed over as raw RESP
//! bytes, so that a stream reader can parse its batches straight into entries instead of
//! through the redis crate's `Value` trees (about a quarter of a worker's instructions per
//! event went to the redis crate's reply parser and the trees it builds).
//!
//! It speaks RESP2 over TCP or a Unix socket, logs in (`AUTH`) and selects the URL's database.
//! TLS and cluster URLs are not served here: they keep the redis crate's connection.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, ConnectionAddr, RedisError, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::resp::ReplyScan;

/// Bytes asked of the socket at least per read: a batch of 1000 events is about 300 KiB.
const READ_CHUNK: usize = 64 * 1024;

/// What a direct connection is opened to, from a single-server URL.
#[derive(Debug, Clone)]
pub struct DirectTarget {
    address: DirectAddress,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

#[derive(Debug, Clone)]
enum DirectAddress {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl DirectTarget {
    /// The target of a single-server connection, or `None` where only the redis crate's
    /// connection serves (TLS).
    pub fn of(client: &redis::Client) -> Option<Self> {
        let info = client.get_connection_info();
        let address = match info.addr() {
            ConnectionAddr::Tcp(host, port) => DirectAddress::Tcp(host.clone(), *port),
            ConnectionAddr::Unix(path) => DirectAddress::Unix(path.clone()),
            _ => return None,
        };
        let redis = info.redis_settings();
        Some(DirectTarget {
            address,
            username: redis.username().map(str::to_owned),
            password: redis.password().map(str::to_owned),
            db: redis.db(),
        })
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connection that sends one command at a time and returns its reply as RESP bytes.
pub struct DirectConn {
    io: Box<dyn Io>,
    /// Bytes read and not yet handed out; a reply is removed when the next request is sent.
    buffer: Vec<u8>,
    /// Length of the reply handed out last, at the front of `buffer`.
    handed_out: usize,
    request: Vec<u8>,
    response_timeout: Duration,
}

/// The connection of a dedicated stream reader: a direct one where the URL allows it, else
/// the redis crate's.
pub enum ReaderConn {
    /// A direct connection to one server.
    Direct(DirectConn),
    /// The redis crate's connection (TLS, or a cluster).
    Client(super::RedisConn),
}

/// A reply on a reader connection, never a server error (those are `Err`).
#[derive(Debug)]
pub enum ReaderReply<'a> {
    /// One whole RESP reply, as read.
    Resp(&'a [u8]),
    /// A reply the redis crate parsed.
    Value(Value),
}

impl ReaderConn {
    /// Sends `cmd` and reads its reply.
    pub async fn request(&mut self, cmd: &Cmd) -> Result<ReaderReply<'_>, RedisError> {
        match self {
            ReaderConn::Direct(conn) => conn.request(cmd).await.map(ReaderReply::Resp),
            // Only the top of a reply is looked at for an error: `query_async` walks and
            // rebuilds every reply to find nested ones.
            ReaderConn::Client(conn) => match conn.req_packed_command(cmd).await? {
                Value::ServerError(error) => Err(RedisError::from(error)),
                value => Ok(ReaderReply::Value(value)),
            },
        }
    }
}

impl ReaderReply<'_> {
    /// The reply as the redis crate's value, for replies read rarely.
    pub fn into_value(self) -> Result<Value, RedisError> {
        match self {
            ReaderReply::Resp(bytes) => redis::parse_redis_value(bytes),
            ReaderReply::Value(value) => Ok(value),
        }
    }
}

impl DirectConn {
    /// Connects, logs in and selects the database, each step bounded by its timeout.
    pub async fn connect(
        target: &DirectTarget,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self, RedisError> {
        let io: Box<dyn Io> = match &target.address {
            DirectAddress::Tcp(host, port) => {
                let stream = bounded(
                    connect_timeout,
                    "connect",
                    tokio::net::TcpStream::connect((host.as_str(), *port)),
                )
                .await??;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            DirectAddress::Unix(path) => Box::new(
                bounded(
                    connect_timeout,
                    "connect",
                    tokio::net::UnixStream::connect(path),
                )
                .await??,
            ),
        };
        let mut conn = DirectConn {
            io,
            buffer: Vec::with_capacity(READ_CHUNK),
            handed_out: 0,
            request: Vec::new(),
            response_timeout: connect_timeout.max(response_timeout),
        };
        if let Some(password) = &target.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = &target.username {
                auth.arg(username);
            }
            auth.arg(password);
            conn.request(&auth).await?;
        }
        if target.db != 0 {
            conn.request(redis::cmd("SELECT").arg(target.db)).await?;
        }
        conn.response_timeout = response_timeout;
        Ok(conn)
    }

    /// Sends `cmd` and reads its whole reply; a server error comes back as `Err`.
    pub async fn request(&mut self, cmd: &Cmd) -> Result<&[u8], RedisError> {
        self.buffer.drain(..self.handed_out);
        self.handed_out = 0;
        self.request.clear();
        cmd.write_packed_command(&mut self.request);
        let timeout = self.response_timeout;
        let len = bounded(timeout, "reply", self.exchange()).await??;
        self.handed_out = len;
        let reply = &self.buffer[..len];
        if reply.first() == Some(&b'-') {
            return Err(match redis::parse_redis_value(reply)? {
                Value::ServerError(error) => RedisError::from(error),
                other => protocol_error(format!("an error reply read as {other:?}")),
            });
        }
        Ok(reply)
    }

    async fn exchange(&mut self) -> Result<usize, RedisError> {
        self.io.write_all(&self.request).await?;
        let mut scan = ReplyScan::default();
        loop {
            if let Some(len) = scan.advance(&self.buffer).map_err(protocol_error)? {
                return Ok(len);
            }
            if self.buffer.capacity() - self.buffer.len() < READ_CHUNK / 4 {
                self.buffer.reserve(READ_CHUNK);
            }
            if self.io.read_buf(&mut self.buffer).await? == 0 {
                return Err(RedisError::from(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }
}

async fn bounded<F: Future>(limit: Duration, what: &str, future: F) -> io::Result<F::Output> {
    tokio::time::timeout(limit, future).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no {what} from Redis within {limit:?}"),
        )
    })
}

fn protocol_error(detail: String) -> RedisError {
    RedisError::from(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unreadable reply from Redis: {detail}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis_target() -> DirectTarget {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        DirectTarget::of(&redis::Client::open(url).unwrap()).expect("a plain TCP URL")
    }

    #[tokio::test]
    async fn replies_arrive_whole_and_errors_keep_their_code() {
        let timeout = Duration::from_secs(5);
        let mut conn = DirectConn::connect(&redis_target(), timeout, timeout)
            .await
            .unwrap();
        let key = format!("ecst:test:direct:{}", std::process::id());
        let big = "x".repeat(300_000);
        let reply = conn
            .request(redis::cmd("SET").arg(&key).arg(&big))
            .await
            .unwrap();
        assert_eq!(reply, b"+OK\r\n");
        let reply = conn.request(redis::cmd("GET").arg(&key)).await.unwrap();
        assert_eq!(
            redis::parse_redis_value(reply).unwrap(),
            Value::BulkString(big.into_bytes())
        );
        let error = conn
            .request(redis::cmd("XREADGROUP").arg("GROUP").arg("g").arg("c"))
            .await
            .unwrap_err();
        assert!(error.code().is_some(), "{error}");
        // The connection stays usable after an error reply.
        let reply = conn.request(redis::cmd("DEL").arg(&key)).await.unwrap();
        assert_eq!(reply, b":1\r\n");
    }

    #[tokio::test]
    async fn a_wrong_password_is_refused_as_redis_refuses_it() {
        let mut target = redis_target();
        target.username = Some("ecst-no-such-user".into());
        target.password = Some("wrong".into());
        let timeout = Duration::from_secs(5);
        let error = DirectConn::connect(&target, timeout, timeout)
            .await
            .err()
            .expect("refused");
        assert_eq!(error.code(), Some("WRONGPASS"), "{error}");
    }
}

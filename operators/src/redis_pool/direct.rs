//! A dedicated connection to one Redis server whose replies are handed over as raw RESP
//! bytes, so that a stream reader can parse its batches straight into entries instead of
//! through the redis crate's `Value` trees (about a quarter of a worker's instructions per
//! event went to the redis crate's reply parser and the trees it builds).
//!
//! It speaks RESP2 over TCP, TLS (with the URL's `tls_*` files, as the redis crate reads them)
//! or a Unix socket, logs in (`AUTH`) and selects the URL's database. On a cluster,
//! [`ClusterReader`] opens one to the node serving the reader's stream.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{ClientTlsConfig, Cmd, ConnectionAddr, RedisError, TlsCertificates, Value};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::client::{TlsParts, tls_parts};
use super::cluster_reader::ClusterReader;
use super::resp::ReplyScan;
use crate::postgres_tls::EncryptOnly;
use crate::secret::SecretUrl;

/// Room made in the buffer when less than a quarter of it is left: a batch of 500 events is
/// about 170 KiB.
const READ_CHUNK: usize = 64 * 1024;

/// What a direct connection is opened to: a server, its credentials and TLS settings.
#[derive(Clone)]
pub struct DirectTarget {
    address: DirectAddress,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

/// Where a server listens, and for TLS the client settings.
#[derive(Clone)]
enum DirectAddress {
    Tcp(String, u16),
    Tls {
        host: String,
        port: u16,
        config: Arc<ClientConfig>,
    },
    Unix(PathBuf),
}

/// The address only: the credentials stay out of logs.
impl std::fmt::Debug for DirectTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.address)
    }
}

impl std::fmt::Debug for DirectAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirectAddress::Tcp(host, port) => write!(f, "{host}:{port}"),
            DirectAddress::Tls { host, port, .. } => write!(f, "{host}:{port} (TLS)"),
            DirectAddress::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

impl DirectTarget {
    /// The target of a single-server URL, or `None` where only the redis crate's connection
    /// serves (a URL or TLS setting it reads differently, which its connect then reports).
    pub fn of(url: &SecretUrl) -> Option<Self> {
        let TlsParts { url, certificates } = tls_parts(url.expose()).ok()?;
        Self::from_parts(&url, certificates.as_ref())
    }

    /// The target of a single-server URL without `tls_*` options, with the files they named.
    pub(super) fn from_parts(url: &str, certificates: Option<&TlsCertificates>) -> Option<Self> {
        let client = redis::Client::open(url).ok()?;
        let info = client.get_connection_info();
        let address = match info.addr() {
            ConnectionAddr::Tcp(host, port) => DirectAddress::Tcp(host.clone(), *port),
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                ..
            } => DirectAddress::Tls {
                host: host.clone(),
                port: *port,
                config: Arc::new(tls_config(certificates, *insecure)?),
            },
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

    /// The same credentials and TLS settings on another server (a cluster node); `None` for a
    /// Unix socket.
    pub(super) fn at(&self, host: &str, port: u16) -> Option<Self> {
        let address = match &self.address {
            DirectAddress::Tcp(..) => DirectAddress::Tcp(host.to_owned(), port),
            DirectAddress::Tls { config, .. } => DirectAddress::Tls {
                host: host.to_owned(),
                port,
                config: config.clone(),
            },
            DirectAddress::Unix(_) => return None,
        };
        Some(DirectTarget {
            address,
            ..self.clone()
        })
    }

    /// The host name or address, for a TCP target.
    pub(super) fn host(&self) -> Option<&str> {
        match &self.address {
            DirectAddress::Tcp(host, _) | DirectAddress::Tls { host, .. } => Some(host),
            DirectAddress::Unix(_) => None,
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Io for T {}

/// A connection that sends one command at a time and returns its reply as RESP bytes.
pub struct DirectConn {
    io: Box<dyn Io>,
    /// Bytes read and not yet handed out; a reply is removed when the next request is sent.
    buffer: Vec<u8>,
    /// Length of the reply handed out last, at the front of `buffer`.
    handed_out: usize,
    /// A request was sent and its reply not wholly read (a timeout, a dropped future): what
    /// comes next on the connection may be that reply, so it is not used again.
    broken: bool,
    request: Vec<u8>,
    response_timeout: Duration,
}

/// The connection of a dedicated stream reader: a direct one where the URL allows it, else
/// the redis crate's.
pub enum ReaderConn {
    /// A direct connection to one server.
    Direct(DirectConn),
    /// A direct connection to the cluster node serving the reader's stream.
    Cluster(Box<ClusterReader>),
    /// The redis crate's connection (a URL only it reads).
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
    /// Whether a request failed or was abandoned on it, so that it cannot be used.
    pub fn is_broken(&self) -> bool {
        match self {
            ReaderConn::Direct(conn) => conn.is_broken(),
            ReaderConn::Cluster(reader) => reader.is_broken(),
            ReaderConn::Client(_) => false,
        }
    }

    /// Sends `cmd` and reads its reply.
    pub async fn request(&mut self, cmd: &Cmd) -> Result<ReaderReply<'_>, RedisError> {
        match self {
            ReaderConn::Direct(conn) => conn.request(cmd).await.map(ReaderReply::Resp),
            ReaderConn::Cluster(reader) => reader.request(cmd).await.map(ReaderReply::Resp),
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
            DirectAddress::Tcp(host, port) => Box::new(tcp(host, *port, connect_timeout).await?),
            DirectAddress::Tls { host, port, config } => {
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let stream = tcp(host, *port, connect_timeout).await?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                Box::new(
                    bounded(
                        connect_timeout,
                        "TLS handshake",
                        connector.connect(name, stream),
                    )
                    .await??,
                )
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
            broken: false,
            request: Vec::new(),
            response_timeout: connect_timeout.max(response_timeout),
        };
        if let Some(password) = &target.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(username) = &target.username {
                auth.arg(username);
            }
            auth.arg(password);
            match conn.request(&auth).await {
                // Redis before 6 has no users: the password alone, as the redis crate retries.
                Err(e)
                    if target.username.is_some()
                        && e.to_string().contains("wrong number of arguments") =>
                {
                    conn.request(redis::cmd("AUTH").arg(password)).await?;
                }
                result => {
                    result?;
                }
            }
        }
        if target.db != 0 {
            conn.request(redis::cmd("SELECT").arg(target.db)).await?;
        }
        conn.response_timeout = response_timeout;
        Ok(conn)
    }

    /// Sends `cmd` and reads its whole reply; a server error comes back as `Err`.
    pub async fn request(&mut self, cmd: &Cmd) -> Result<&[u8], RedisError> {
        self.send(cmd).await?;
        Ok(self.reply())
    }

    /// Whether a request failed or was abandoned, so that the connection cannot be used.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The reply read by the last [`DirectConn::send`], if it succeeded (else empty).
    pub fn reply(&self) -> &[u8] {
        &self.buffer[..self.handed_out]
    }

    /// Sends `cmd` and reads its whole reply, kept for [`DirectConn::reply`]; a server error
    /// comes back as `Err`. Once a request failed other than by a server error, or was
    /// abandoned, every later one fails.
    pub async fn send(&mut self, cmd: &Cmd) -> Result<(), RedisError> {
        if self.broken {
            return Err(RedisError::from(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the connection lost track of its replies (an earlier request failed)",
            )));
        }
        self.broken = true;
        self.buffer.drain(..self.handed_out);
        self.handed_out = 0;
        self.request.clear();
        cmd.write_packed_command(&mut self.request);
        let timeout = self.response_timeout;
        let len = bounded(timeout, "reply", self.exchange()).await??;
        let reply = &self.buffer[..len];
        if reply.first() == Some(&b'-') {
            let error = match redis::parse_redis_value(reply)? {
                Value::ServerError(error) => RedisError::from(error),
                other => protocol_error(format!("an error reply read as {other:?}")),
            };
            self.buffer.drain(..len);
            self.broken = false;
            return Err(error);
        }
        self.handed_out = len;
        self.broken = false;
        Ok(())
    }

    async fn exchange(&mut self) -> Result<usize, RedisError> {
        self.io.write_all(&self.request).await?;
        // TLS may hold the records back until flushed.
        self.io.flush().await?;
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

async fn tcp(host: &str, port: u16, limit: Duration) -> io::Result<tokio::net::TcpStream> {
    let stream = bounded(
        limit,
        "connect",
        tokio::net::TcpStream::connect((host, port)),
    )
    .await??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The client TLS settings the redis crate makes of the same URL: the `tls_ca` file or else
/// the system's roots, the client certificate, and for `#insecure` no check of the server's
/// certificate (the handshake's signatures are still checked).
fn tls_config(certificates: Option<&TlsCertificates>, insecure: bool) -> Option<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?;
    let builder = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        match certificates.and_then(|c| c.root_cert.as_deref()) {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    roots.add(cert.ok()?).ok()?;
                }
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        builder.with_root_certificates(roots)
    };
    match certificates.and_then(|c| c.client_tls.as_ref()) {
        Some(ClientTlsConfig {
            client_cert,
            client_key,
        }) => {
            let chain = CertificateDer::pem_slice_iter(client_cert)
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let key = PrivateKeyDer::from_pem_slice(client_key).ok()?;
            builder.with_client_auth_cert(chain, key).ok()
        }
        None => Some(builder.with_no_client_auth()),
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
        DirectTarget::of(&SecretUrl::new(url)).expect("a plain TCP URL")
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
    async fn a_reply_that_came_too_late_is_never_read_as_the_next_ones() {
        let mut conn = DirectConn::connect(
            &redis_target(),
            Duration::from_secs(5),
            Duration::from_millis(200),
        )
        .await
        .unwrap();
        let list = format!("ecst:test:direct-late:{}", std::process::id());
        let error = conn
            .request(redis::cmd("BLPOP").arg(&list).arg(1))
            .await
            .unwrap_err();
        assert!(error.is_timeout(), "{error}");
        // BLPOP's nil arrives later; a PING must not take it for its answer.
        let error = conn.request(&redis::cmd("PING")).await.unwrap_err();
        assert!(error.to_string().contains("lost track"), "{error}");
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

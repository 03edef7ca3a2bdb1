//! Every Redis connection ecst opens: the one client constructor (with TLS options), a bb8
//! pool whose every command has a response timeout, and the classification of failures into
//! what an operator must fix (credentials, ACL, certificates) and what passes (a restart).
//!
//! TLS (`rediss://`) verifies the server against the system roots, or against the CA file of
//! `tls_ca`; `tls_cert` and `tls_key` present a client certificate; the redis crate's
//! `#insecure` fragment skips verification.

use std::collections::HashMap;
use std::error::Error as _;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, ErrorKind, RedisError, ServerErrorKind,
    TlsCertificates,
};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::secret::SecretUrl;

/// Pool of multiplexed Redis connections.
pub type RedisPool = bb8::Pool<RedisManager>;

/// The query options ecst reads from a Redis URL (and removes before the redis crate sees it).
const TLS_OPTIONS: [&str; 3] = ["tls_ca", "tls_cert", "tls_key"];

/// A Redis URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RedisUrlError {
    /// The redis crate rejected the URL.
    #[error("{0}")]
    Url(RedisError),
    /// The URL does not parse at all.
    #[error("{0}")]
    Syntax(#[from] url::ParseError),
    /// A `tls_*` query option ecst does not know.
    #[error("unknown option `{0}`: the TLS options are tls_ca, tls_cert and tls_key")]
    UnknownOption(String),
    /// A TLS option on a plain `redis://` URL.
    #[error("`{0}` needs a rediss:// URL (TLS)")]
    NotTls(String),
    /// `tls_cert` without `tls_key` or the reverse.
    #[error("tls_cert and tls_key must be given together")]
    ClientCertPair,
    /// `tls_ca` together with `#insecure`, which would ignore it.
    #[error("tls_ca has no effect with #insecure, which skips certificate verification")]
    InsecureWithCa,
    /// A certificate or key file that cannot be read.
    #[error("{option}={path}: {reason}")]
    File {
        /// The URL option naming the file.
        option: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A PEM file the TLS library cannot use.
    #[error("TLS certificates: {0}")]
    Pem(RedisError),
}

/// Builds the client for `url`, reading its TLS files; the one way ecst makes a Redis client.
pub fn redis_client(url: &SecretUrl) -> Result<Client, RedisUrlError> {
    let mut parsed = url::Url::parse(url.expose())?;
    let mut options: HashMap<String, String> = HashMap::new();
    let mut rest = Vec::new();
    for (key, value) in parsed.query_pairs() {
        if key.starts_with("tls_") {
            if !TLS_OPTIONS.contains(&key.as_ref()) {
                return Err(RedisUrlError::UnknownOption(key.into_owned()));
            }
            options.insert(key.into_owned(), value.into_owned());
        } else {
            rest.push((key.into_owned(), value.into_owned()));
        }
    }
    let tls = matches!(parsed.scheme(), "rediss" | "valkeys");
    if let Some(option) = TLS_OPTIONS.iter().find(|o| options.contains_key(**o)) {
        if !tls {
            return Err(RedisUrlError::NotTls((*option).to_string()));
        }
    } else {
        if tls {
            install_crypto_provider();
        }
        return Client::open(url.expose()).map_err(RedisUrlError::Url);
    }
    if parsed.fragment() == Some("insecure") && options.contains_key("tls_ca") {
        return Err(RedisUrlError::InsecureWithCa);
    }
    if options.contains_key("tls_cert") != options.contains_key("tls_key") {
        return Err(RedisUrlError::ClientCertPair);
    }
    parsed.set_query(None);
    if !rest.is_empty() {
        parsed.query_pairs_mut().extend_pairs(rest);
    }
    let read = |option: &'static str| -> Result<Option<Vec<u8>>, RedisUrlError> {
        options
            .get(option)
            .map(|path| {
                std::fs::read(path).map_err(|e| RedisUrlError::File {
                    option,
                    path: path.clone(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    };
    let (root_cert, client_cert, client_key) =
        (read("tls_ca")?, read("tls_cert")?, read("tls_key")?);
    // A file without certificates would fail every handshake later, with a vaguer message.
    for (option, pem) in [("tls_ca", &root_cert), ("tls_cert", &client_cert)] {
        let Some(pem) = pem else { continue };
        if !CertificateDer::pem_slice_iter(pem).any(|c| c.is_ok()) {
            return Err(RedisUrlError::File {
                option,
                path: options.get(option).cloned().unwrap_or_default(),
                reason: "no PEM certificate in it".to_string(),
            });
        }
    }
    let client_tls = match (client_cert, client_key) {
        (Some(client_cert), Some(client_key)) => Some(ClientTlsConfig {
            client_cert,
            client_key,
        }),
        _ => None,
    };
    let certificates = TlsCertificates {
        client_tls,
        root_cert,
    };
    install_crypto_provider();
    Client::build_with_tls(parsed.as_str(), certificates).map_err(|e| {
        if e.kind() == ErrorKind::Io {
            RedisUrlError::Pem(e)
        } else {
            RedisUrlError::Url(e)
        }
    })
}

/// Makes ring the process's rustls provider (as for Postgres), which the redis crate's TLS
/// uses; a provider installed earlier is kept.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The ACL user a URL logs in as (`default` when it names none).
pub fn redis_user(url: &SecretUrl) -> String {
    url::Url::parse(url.expose())
        .ok()
        .map(|u| u.username().to_string())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// What kind of failure a Redis error is, from `RedisError::kind()` and the error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Nothing listens at the address.
    Refused,
    /// No answer in time.
    Timeout,
    /// Wrong user or password (`WRONGPASS`), or none given (`NOAUTH`).
    Auth,
    /// The ACL forbids the command or key (`NOPERM`).
    NoPerm,
    /// The TLS handshake failed (certificate, CA, or a port that does not speak TLS).
    Tls,
    /// Anything else (a dropped connection, a server error).
    Other,
}

impl FailureKind {
    /// Classifies `e`.
    pub fn of(e: &RedisError) -> Self {
        match (e.kind(), e.code()) {
            (ErrorKind::AuthenticationFailed, _) | (_, Some("WRONGPASS" | "NOAUTH")) => {
                FailureKind::Auth
            }
            (ErrorKind::Server(ServerErrorKind::NoPerm), _) | (_, Some("NOPERM")) => {
                FailureKind::NoPerm
            }
            _ if tls_error(e).is_some() => FailureKind::Tls,
            _ if e.is_connection_refusal() => FailureKind::Refused,
            _ if e.is_timeout() => FailureKind::Timeout,
            _ => FailureKind::Other,
        }
    }

    /// Whether only a change of configuration (credentials, ACL, certificates) can fix it.
    pub fn is_configuration(self) -> bool {
        matches!(
            self,
            FailureKind::Auth | FailureKind::NoPerm | FailureKind::Tls
        )
    }
}

/// The rustls error inside a connect error, if the TLS handshake is what failed.
fn tls_error(e: &RedisError) -> Option<&rustls::Error> {
    let inner = e.source()?;
    let io = match inner.downcast_ref::<std::io::Error>() {
        Some(io) => io,
        None => inner
            .downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>()?
            .downcast_ref::<std::io::Error>()?,
    };
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A classified Redis failure, naming the server (password masked), the user and what to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisFailure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// The server's URL, password masked.
    pub server: String,
    /// The ACL user.
    pub user: String,
    /// What the client or server said.
    pub detail: String,
}

impl RedisFailure {
    /// Classifies `e`, which talking to `url` returned.
    pub fn new(url: &SecretUrl, e: &RedisError) -> Self {
        let kind = FailureKind::of(e);
        let detail = match (kind, tls_error(e)) {
            (FailureKind::Tls, Some(tls)) => tls.to_string(),
            _ => e.to_string(),
        };
        RedisFailure {
            kind,
            server: url.redacted(),
            user: redis_user(url),
            detail,
        }
    }
}

impl fmt::Display for RedisFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let RedisFailure {
            kind,
            server,
            user,
            detail,
        } = self;
        match kind {
            FailureKind::Auth => write!(
                f,
                "authentication failed at {server} as user `{user}` ({detail}): check the user and password in the URL"
            ),
            FailureKind::NoPerm => write!(
                f,
                "user `{user}` at {server} is not permitted: {detail}; grant the command and keys in the server's ACL"
            ),
            FailureKind::Tls => write!(
                f,
                "TLS handshake with {server} failed: {detail}; check that tls_ca names the CA that signed the server's certificate, the client certificate, and that the port speaks TLS"
            ),
            FailureKind::Refused => {
                write!(f, "connection refused by {server}: is Redis running there?")
            }
            FailureKind::Timeout => write!(f, "{server} did not answer in time ({detail})"),
            FailureKind::Other => write!(f, "{server}: {detail}"),
        }
    }
}

/// How long a configuration failure keeps the worker not ready after it was last seen.
const ALARM_TTL: Duration = Duration::from_secs(60);
/// Least time between two log lines about the same configuration failure.
const ALARM_LOG_EVERY: Duration = Duration::from_secs(60);

/// A configuration failure seen while running.
struct Alarm {
    reporter: String,
    failure: RedisFailure,
    seen: Instant,
    logged: Instant,
}

/// Configuration failures by reporter, and the latest connect failure by server. Process-wide
/// because a worker is one process and every pool, reader and sink of it reports here, while
/// `/readyz` and a pool-timeout message must see them all.
struct Registry {
    alarms: Vec<Alarm>,
    connect_failures: Vec<(Instant, RedisFailure)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    alarms: Vec::new(),
    connect_failures: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records a failure `reporter` (e.g. `sink cache`) met; a configuration failure makes the
/// worker not ready and is logged at most once a minute. Returns its classification.
pub fn report_failure(reporter: &str, url: &SecretUrl, e: &RedisError) -> RedisFailure {
    let failure = RedisFailure::new(url, e);
    if !failure.kind.is_configuration() {
        return failure;
    }
    let now = Instant::now();
    let mut registry = registry();
    let alarm = registry
        .alarms
        .iter_mut()
        .find(|a| a.reporter == reporter && a.failure.server == failure.server);
    let log = match alarm {
        Some(alarm) => {
            alarm.seen = now;
            alarm.failure = failure.clone();
            let due = now.duration_since(alarm.logged) >= ALARM_LOG_EVERY;
            if due {
                alarm.logged = now;
            }
            due
        }
        None => {
            registry.alarms.push(Alarm {
                reporter: reporter.to_string(),
                failure: failure.clone(),
                seen: now,
                logged: now,
            });
            true
        }
    };
    drop(registry);
    if log {
        tracing::error!(reporter, reason = %failure, "Redis refuses this worker: a configuration error, not an outage. Retrying, and not ready until it is fixed.");
    }
    failure
}

/// Clears what `reporter` reported about `url`: its last command succeeded.
pub fn resolve_failure(reporter: &str, url: &SecretUrl) {
    let server = url.redacted();
    let mut registry = registry();
    if !registry.alarms.is_empty() {
        registry
            .alarms
            .retain(|a| !(a.reporter == reporter && a.failure.server == server));
    }
}

/// The configuration failures seen within the last minute, for `/readyz`.
pub fn access_problems() -> Vec<String> {
    let now = Instant::now();
    let mut registry = registry();
    registry
        .alarms
        .retain(|a| now.duration_since(a.seen) < ALARM_TTL);
    registry
        .alarms
        .iter()
        .map(|a| format!("{}: {}", a.reporter, a.failure))
        .collect()
}

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
        match &result {
            Ok(_) => {
                resolve_failure("connect", &self.url);
                let server = self.url.redacted();
                registry()
                    .connect_failures
                    .retain(|(_, f)| f.server != server);
            }
            Err(e) => {
                let failure = report_failure("connect", &self.url, e);
                let mut registry = registry();
                registry
                    .connect_failures
                    .retain(|(_, f)| f.server != failure.server);
                registry.connect_failures.push((Instant::now(), failure));
            }
        }
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
        bb8::RunError::TimedOut => {
            let now = Instant::now();
            let registry = registry();
            let latest = registry
                .connect_failures
                .iter()
                .filter(|(at, _)| now.duration_since(*at) < ALARM_TTL)
                .max_by_key(|(at, _)| *at);
            match latest {
                Some((_, failure)) => {
                    format!("timed out waiting for a pooled connection: {failure}")
                }
                None => "timed out waiting for a pooled connection".to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_error(url: &str) -> String {
        match redis_client(&SecretUrl::new(url)) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn tls_options_are_checked_before_connecting() {
        assert_eq!(client_error("rediss://127.0.0.1:6380"), "ok");
        assert_eq!(client_error("rediss://127.0.0.1:6380/#insecure"), "ok");
        assert_eq!(
            client_error("redis://127.0.0.1/?tls_ca=/etc/ca.pem"),
            "`tls_ca` needs a rediss:// URL (TLS)"
        );
        assert_eq!(
            client_error("rediss://127.0.0.1/?tls_cafile=x"),
            "unknown option `tls_cafile`: the TLS options are tls_ca, tls_cert and tls_key"
        );
        assert_eq!(
            client_error("rediss://127.0.0.1/?tls_cert=/etc/c.pem"),
            "tls_cert and tls_key must be given together"
        );
        assert!(
            client_error("rediss://127.0.0.1/?tls_ca=/nonexistent/ca.pem")
                .starts_with("tls_ca=/nonexistent/ca.pem: ")
        );
        let dir = std::env::temp_dir().join(format!("ecst-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let url = format!("rediss://127.0.0.1/?tls_ca={}", not_pem.display());
        assert_eq!(
            client_error(&format!("{url}#insecure")),
            "tls_ca has no effect with #insecure, which skips certificate verification"
        );
        assert_eq!(
            client_error(&url),
            format!("tls_ca={}: no PEM certificate in it", not_pem.display())
        );
    }

    #[test]
    fn the_user_comes_from_the_url() {
        assert_eq!(redis_user(&SecretUrl::new("redis://app:pw@h:1")), "app");
        assert_eq!(redis_user(&SecretUrl::new("redis://:pw@h:1")), "default");
    }

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

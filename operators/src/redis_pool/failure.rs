//! Redis failures classified into what an operator must fix (credentials, ACL, certificates)
//! and what passes (a restart), and the process-wide record of them for `/readyz`.

use std::error::Error as _;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::{ErrorKind, RedisError, ServerErrorKind};

use super::client::redis_user;
use crate::secret::SecretUrl;

/// What kind of failure a Redis error is, from `RedisError::kind()` and the error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Nothing listens at the address.
    Refused,
    /// The host name does not resolve.
    Dns,
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
            // The resolver's error reaches redis-rs as an io error with only this text.
            _ if e.to_string().contains("failed to lookup address") => FailureKind::Dns,
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
            FailureKind::Refused => write!(
                f,
                "connection refused by {server}: is Redis running there? Check the host and port in the URL"
            ),
            FailureKind::Dns => write!(
                f,
                "cannot resolve the host of {server} ({detail}): check the host name in the URL and DNS"
            ),
            FailureKind::Timeout => write!(
                f,
                "{server} did not answer in time ({detail}): check the host, the port and any firewall in between"
            ),
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

/// Records how a connection attempt to `url` ended, for `/readyz` and pool-timeout messages.
pub(crate) fn note_connect<T>(url: &SecretUrl, result: &Result<T, RedisError>) {
    match result {
        Ok(_) => {
            resolve_failure("connect", url);
            let server = url.redacted();
            registry()
                .connect_failures
                .retain(|(_, f)| f.server != server);
        }
        Err(e) => {
            let failure = report_failure("connect", url, e);
            let mut registry = registry();
            registry
                .connect_failures
                .retain(|(_, f)| f.server != failure.server);
            registry.connect_failures.push((Instant::now(), failure));
        }
    }
}

/// The newest connect failure of the last minute, of any server.
pub(crate) fn latest_connect_failure() -> Option<RedisFailure> {
    let now = Instant::now();
    registry()
        .connect_failures
        .iter()
        .filter(|(at, _)| now.duration_since(*at) < ALARM_TTL)
        .max_by_key(|(at, _)| *at)
        .map(|(_, failure)| failure.clone())
}

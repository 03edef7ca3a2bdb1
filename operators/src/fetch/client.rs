//! The HTTP client: one request per chunk of ids, timeout, retries with backoff, circuit
//! breaker and a concurrency limit, counting every attempt in the endpoint's stats.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::breaker::Breaker;
use super::stats::{EndpointStats, FetchOutcome, register};

/// How a [`FetchClient`] talks to its endpoint (its `Debug` never shows the token).
#[derive(Clone)]
pub struct FetchOptions {
    /// The base URL: `{url}/{entity}/{id}` and `{url}/{entity}:batch`.
    pub url: String,
    /// Sent as `Authorization: Bearer …` when set.
    pub token: Option<String>,
    /// Longest one request may take (connecting included).
    pub timeout: Duration,
    /// Retries of a failed request (timeouts, connection errors, 5xx, 429) before giving up.
    pub retries: u32,
    /// First retry delay; doubled each retry up to `backoff_max`.
    pub backoff: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Consecutive failed requests that open the circuit breaker (0: never).
    pub breaker_failures: u32,
    /// How long an open breaker fails requests fast before one trial.
    pub breaker_open_for: Duration,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Ids per `:batch` request.
    pub max_batch: usize,
    /// Largest answer body read, in bytes: a larger one is not held in memory.
    pub max_body_bytes: usize,
}

impl std::fmt::Debug for FetchOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchOptions")
            .field("url", &crate::secret::redact(&self.url))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("concurrency", &self.concurrency)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            url: String::new(),
            token: None,
            timeout: Duration::from_secs(5),
            retries: 3,
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            breaker_failures: 5,
            breaker_open_for: Duration::from_secs(10),
            concurrency: 4,
            max_batch: 100,
            max_body_bytes: 16 * 1024 * 1024,
        }
    }
}

/// What the endpoint said about one id.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum FetchedState {
    /// The entity's current state.
    Found {
        /// `aggregateId`.
        id: String,
        /// `aggregateVersion` of this state.
        version: u64,
        /// The full state.
        payload: Value,
        /// `occurredAt`, when the endpoint sends it.
        occurred_at: Option<String>,
    },
    /// The endpoint has no such entity (404, or absent from a batch answer).
    Missing {
        /// `aggregateId`.
        id: String,
    },
    /// The endpoint answered a row that cannot be used (no version, a payload that is not an
    /// object, an answer that does not parse) or refused this one id (400, 414, 422).
    Invalid {
        /// `aggregateId`.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl FetchedState {
    /// The id the state is about.
    pub fn id(&self) -> &str {
        match self {
            FetchedState::Found { id, .. }
            | FetchedState::Missing { id }
            | FetchedState::Invalid { id, .. } => id,
        }
    }
}

/// Why a fetch failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The endpoint cannot answer now (timeouts, connection errors, 5xx, 429), retries spent.
    #[error("{endpoint} unavailable: {message}")]
    Unavailable {
        /// The endpoint.
        endpoint: String,
        /// The last failure.
        message: String,
    },
    /// The circuit breaker is open: the endpoint kept failing, requests fail fast for a while.
    #[error("{endpoint}: circuit open after repeated failures")]
    CircuitOpen {
        /// The endpoint.
        endpoint: String,
    },
    /// The endpoint refused the request (401, 403, 413, a 400 to a batch …): retrying will
    /// not help until the configuration changes. (A 400, 414 or 422 to one id is that id's
    /// [`FetchedState::Invalid`].)
    #[error("{endpoint} refused the request: HTTP {status}: {message}")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// The body's `error`, or the body.
        message: String,
    },
    /// The client cannot be built (a bad URL, a TLS setup that fails).
    #[error("{0}")]
    Config(String),
}

impl FetchError {
    /// Whether the same request may succeed later without any change (the endpoint is down
    /// or slow, not refusing).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            FetchError::Unavailable { .. } | FetchError::CircuitOpen { .. }
        )
    }
}

/// A row as the endpoint sends it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    aggregate_id: Value,
    #[serde(default)]
    aggregate_version: Option<Value>,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    occurred_at: Option<String>,
}

/// A client of one snapshot endpoint. Cheap to share behind an `Arc`; every clone of the
/// endpoint's URL in the process shares one [`EndpointStats`].
pub struct FetchClient {
    http: reqwest::Client,
    base: String,
    options: FetchOptions,
    breaker: Mutex<Breaker>,
    limit: Semaphore,
    stats: Arc<EndpointStats>,
}

impl std::fmt::Debug for FetchClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchClient")
            .field("endpoint", &self.stats.endpoint)
            .finish_non_exhaustive()
    }
}

/// How one attempt ended, before retries.
enum Attempt {
    Rows(Vec<FetchedState>),
    Retry(FetchOutcome, String),
    Refused(u16, String),
}

impl FetchClient {
    /// A client of `options.url`.
    pub fn new(options: FetchOptions) -> Result<Self, FetchError> {
        let parsed = url::Url::parse(&options.url)
            .map_err(|e| FetchError::Config(format!("url `{}`: {e}", options.url)))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(FetchError::Config(format!(
                "url `{}`: only http and https are supported",
                options.url
            )));
        }
        let mut shown = parsed.clone();
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        shown.set_query(None);
        let endpoint = shown.as_str().trim_end_matches('/').to_string();
        let http = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout)
            .pool_max_idle_per_host(options.concurrency.max(1))
            .build()
            .map_err(|e| FetchError::Config(format!("building the HTTP client: {e}")))?;
        let stats = register(&endpoint);
        Ok(FetchClient {
            http,
            base: options.url.trim_end_matches('/').to_string(),
            breaker: Mutex::new(Breaker::new(
                options.breaker_failures,
                options.breaker_open_for,
            )),
            limit: Semaphore::new(options.concurrency.max(1)),
            stats,
            options,
        })
    }

    /// The endpoint's counters.
    pub fn stats(&self) -> &Arc<EndpointStats> {
        &self.stats
    }

    /// The endpoint (the base URL without credentials or query), as metrics label it.
    pub fn endpoint(&self) -> &str {
        &self.stats.endpoint
    }

    /// The current state of entity `id`.
    pub async fn fetch_one(&self, entity: &str, id: &str) -> Result<FetchedState, FetchError> {
        let mut states = self.fetch_batch(entity, &[id.to_string()]).await?;
        Ok(states
            .pop()
            .unwrap_or(FetchedState::Missing { id: id.into() }))
    }

    /// The current state of every distinct id of `ids`, in first-seen order: requests of at
    /// most `max_batch` ids, at most `concurrency` at once, each retried with backoff.
    pub async fn fetch_batch(
        &self,
        entity: &str,
        ids: &[String],
    ) -> Result<Vec<FetchedState>, FetchError> {
        let mut seen = HashSet::new();
        let distinct: Vec<&String> = ids.iter().filter(|id| seen.insert(id.as_str())).collect();
        let chunks = distinct.chunks(self.options.max_batch.max(1));
        let answers =
            futures::future::join_all(chunks.map(|chunk| self.request_with_retries(entity, chunk)))
                .await;
        let mut states = Vec::with_capacity(distinct.len());
        for answer in answers {
            states.extend(answer?);
        }
        self.stats.add_ids(states.len());
        Ok(states)
    }

    async fn request_with_retries(
        &self,
        entity: &str,
        ids: &[&String],
    ) -> Result<Vec<FetchedState>, FetchError> {
        let mut delay = self.options.backoff;
        let mut attempt = 0;
        loop {
            let failure = match self.request(entity, ids).await? {
                Attempt::Rows(rows) => return Ok(rows),
                Attempt::Refused(status, message) => {
                    return Err(FetchError::Refused {
                        endpoint: self.stats.endpoint.clone(),
                        status,
                        message,
                    });
                }
                Attempt::Retry(_, message) => message,
            };
            if attempt >= self.options.retries {
                return Err(FetchError::Unavailable {
                    endpoint: self.stats.endpoint.clone(),
                    message: failure,
                });
            }
            attempt += 1;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.options.backoff_max);
        }
    }

    /// One attempt, through the breaker and the concurrency limit. `Err` only when the
    /// breaker is open.
    async fn request(&self, entity: &str, ids: &[&String]) -> Result<Attempt, FetchError> {
        let Ok(_permit) = self.limit.acquire().await else {
            return Err(FetchError::Config("the client is closed".into()));
        };
        let admitted = self
            .breaker
            .lock()
            .map(|mut b| {
                let ok = b.admit(Instant::now());
                self.stats.set_breaker(b.state(Instant::now()));
                ok
            })
            .unwrap_or(true);
        if !admitted {
            self.stats.record(FetchOutcome::CircuitOpen, None);
            return Err(FetchError::CircuitOpen {
                endpoint: self.stats.endpoint.clone(),
            });
        }
        let started = Instant::now();
        let attempt = self.send(entity, ids).await;
        let seconds = Some(started.elapsed().as_secs_f64());
        let outcome = match &attempt {
            Attempt::Rows(rows) if rows.len() == 1 && ids.len() == 1 && self.single(ids) => {
                match rows[0] {
                    FetchedState::Missing { .. } => FetchOutcome::NotFound,
                    _ => FetchOutcome::Ok,
                }
            }
            Attempt::Rows(rows)
                if rows
                    .iter()
                    .any(|r| matches!(r, FetchedState::Invalid { .. })) =>
            {
                FetchOutcome::Invalid
            }
            Attempt::Rows(_) => FetchOutcome::Ok,
            Attempt::Retry(outcome, _) => *outcome,
            Attempt::Refused(..) => FetchOutcome::Refused,
        };
        self.stats.record(outcome, seconds);
        if let Ok(mut b) = self.breaker.lock() {
            match &attempt {
                // A refusal is the request's fault, not the endpoint's.
                Attempt::Rows(_) | Attempt::Refused(..) => b.success(),
                Attempt::Retry(..) => b.failure(Instant::now()),
            }
            self.stats.set_breaker(b.state(Instant::now()));
        }
        Ok(attempt)
    }

    /// Whether `ids` go as a single `GET`: one id, not `count` (the snapshot server's count
    /// route) and not `.` or `..` (which a URL path drops, reaching the paging route).
    fn single(&self, ids: &[&String]) -> bool {
        ids.len() == 1 && !matches!(ids[0].as_str(), "count" | "." | "..")
    }

    async fn send(&self, entity: &str, ids: &[&String]) -> Attempt {
        let request = if self.single(ids) {
            let mut url = match url::Url::parse(&self.base) {
                Ok(url) => url,
                Err(e) => return Attempt::Refused(0, format!("bad url: {e}")),
            };
            if let Ok(mut segments) = url.path_segments_mut() {
                segments.pop_if_empty().push(entity).push(ids[0]);
            }
            self.http.get(url)
        } else {
            let body = serde_json::json!({ "ids": ids }).to_string();
            self.http
                .post(format!("{}/{entity}:batch", self.base))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
        };
        let request = match &self.options.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return Attempt::Retry(
                    FetchOutcome::Timeout,
                    format!("no answer within {:?}", self.options.timeout),
                );
            }
            Err(e) => return Attempt::Retry(FetchOutcome::Error, error_chain(&e)),
        };
        let status = response.status();
        let json_array = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let limit = self.options.max_body_bytes;
        let body = match read_capped(response, limit).await {
            Ok(Some(body)) => body,
            Ok(None) => {
                let problem = format!("the answer is over max_body_bytes {limit}");
                if self.single(ids) {
                    return Attempt::Rows(vec![FetchedState::Invalid {
                        id: ids[0].clone(),
                        reason: problem,
                    }]);
                }
                return Attempt::Refused(
                    status.as_u16(),
                    format!("{problem} (raise it or lower batch_size)"),
                );
            }
            Err(e) if e.is_timeout() => {
                return Attempt::Retry(
                    FetchOutcome::Timeout,
                    format!("no answer within {:?}", self.options.timeout),
                );
            }
            Err(e) => return Attempt::Retry(FetchOutcome::Error, error_chain(&e)),
        };
        if status.as_u16() == 404 && self.single(ids) {
            // Only the contract's own "no such id" deletes; an unknown entity, a wrong base
            // URL or a proxy's 404 page is a configuration to fix.
            if error_code(&body).as_deref() == Some("not_found") {
                return Attempt::Rows(vec![FetchedState::Missing { id: ids[0].clone() }]);
            }
            let message = error_message(&body).unwrap_or_else(|| {
                "a 404 without the snapshot contract's {\"code\":\"not_found\"}".into()
            });
            return Attempt::Refused(404, message);
        }
        if status.is_server_error() || status.as_u16() == 429 {
            let message = error_message(&body).unwrap_or_default();
            return Attempt::Retry(
                FetchOutcome::Error,
                format!("HTTP {status} {message}").trim_end().to_string(),
            );
        }
        let message = || {
            error_message(&body).unwrap_or_else(|| {
                String::from_utf8_lossy(&body)
                    .trim()
                    .chars()
                    .take(200)
                    .collect()
            })
        };
        if self.single(ids) && matches!(status.as_u16(), 400 | 414 | 422) {
            // The endpoint refuses this id, not the worker's configuration: the one event
            // is dead-lettered, the worker goes on.
            return Attempt::Rows(vec![FetchedState::Invalid {
                id: ids[0].clone(),
                reason: format!("the endpoint refused this id: HTTP {status}: {}", message()),
            }]);
        }
        if !status.is_success() {
            return Attempt::Refused(status.as_u16(), message());
        }
        let single = self.single(ids);
        let (rows, problem) = parse_rows(&body, json_array, single);
        Attempt::Rows(answer(ids, rows, problem, single))
    }
}

/// The body of `response`, or `None` when it is over `limit` bytes (by its Content-Length,
/// or while streaming: only `limit` bytes are ever held).
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The `error` of a JSON error body.
fn error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.get("error")?.as_str().map(str::to_string)
}

/// The `code` of a JSON error body (`not_found`, `unknown_entity`).
fn error_code(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.get("code")?.as_str().map(str::to_string)
}

/// An error with its sources (reqwest's own message hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// The rows of a body: one object (a single read), a JSON array, or NDJSON read line by
/// line; with the first problem met (a row that does not parse), if any.
fn parse_rows(body: &[u8], json_array: bool, single: bool) -> (Vec<Row>, Option<String>) {
    let whole = |body: &[u8]| -> (Vec<Row>, Option<String>) {
        if single {
            match serde_json::from_slice::<Row>(body) {
                Ok(row) => (vec![row], None),
                Err(e) => (Vec::new(), Some(format!("the answer is not a row: {e}"))),
            }
        } else {
            match serde_json::from_slice::<Vec<Row>>(body) {
                Ok(rows) => (rows, None),
                Err(e) => (Vec::new(), Some(format!("the answer is not rows: {e}"))),
            }
        }
    };
    if single || json_array {
        return whole(body);
    }
    let mut rows = Vec::new();
    let mut problem = None;
    for (n, line) in body.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Row>(line) {
            Ok(row) => rows.push(row),
            Err(e) => {
                problem.get_or_insert_with(|| format!("line {} is not a row: {e}", n + 1));
            }
        }
    }
    (rows, problem)
}

/// One state per id asked, in order: the rows found, `Missing` for the others. A single
/// read's one row is the asked id's whatever text form the endpoint gives its id in (`007`
/// asked, `7` stored). When the answer had a row that does not parse or names an id not
/// asked, an id without a row may be that row: it is `Invalid`, never `Missing` (which
/// would delete it).
fn answer(
    ids: &[&String],
    rows: Vec<Row>,
    mut problem: Option<String>,
    single: bool,
) -> Vec<FetchedState> {
    let asked: HashSet<&str> = ids.iter().map(|id| id.as_str()).collect();
    let mut by_id: HashMap<String, FetchedState> = HashMap::with_capacity(rows.len());
    for row in rows {
        let id = match (single, row.aggregate_id) {
            (true, _) => ids[0].clone(),
            (false, Value::String(s)) => s,
            (false, Value::Number(n)) => n.to_string(),
            (false, other) => {
                problem.get_or_insert_with(|| format!("a row's aggregateId is {other}"));
                continue;
            }
        };
        if !asked.contains(id.as_str()) {
            problem.get_or_insert_with(|| format!("a row answers id `{id}`, which was not asked"));
            continue;
        }
        let state = match (
            row.aggregate_version.as_ref().and_then(Value::as_u64),
            row.payload,
        ) {
            (Some(version), Some(payload @ Value::Object(_))) => FetchedState::Found {
                id: id.clone(),
                version,
                payload,
                occurred_at: row.occurred_at,
            },
            (None, _) => FetchedState::Invalid {
                id: id.clone(),
                reason: format!(
                    "the endpoint's row has no usable aggregateVersion ({})",
                    row.aggregate_version.unwrap_or(Value::Null)
                ),
            },
            (Some(_), _) => FetchedState::Invalid {
                id: id.clone(),
                reason: "the endpoint's row has no payload object".into(),
            },
        };
        by_id.insert(id, state);
    }
    ids.iter()
        .map(|id| {
            by_id.remove(id.as_str()).unwrap_or_else(|| match &problem {
                Some(p) => FetchedState::Invalid {
                    id: (*id).clone(),
                    reason: format!("the endpoint's answer cannot be trusted for this id: {p}"),
                },
                None => FetchedState::Missing { id: (*id).clone() },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::BreakerState;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn answers_one_state_per_id_asked() {
        let asked = ids(&["a", "b", "7"]);
        let refs: Vec<&String> = asked.iter().collect();
        let body = b"{\"aggregateId\":\"a\",\"aggregateVersion\":3,\"payload\":{\"x\":1}}\n{\"aggregateId\":7,\"aggregateVersion\":null,\"payload\":{}}\n{\"aggregateId\":\"zz\",\"aggregateVersion\":1,\"payload\":{}}\n";
        let (rows, problem) = parse_rows(body, false, false);
        let states = answer(&refs, rows, problem, false);
        assert!(matches!(&states[0], FetchedState::Found { id, version: 3, .. } if id == "a"));
        // A row for an id not asked (`zz`): `b` may be it in another text form, so it is
        // not taken as deleted.
        assert!(
            matches!(&states[1], FetchedState::Invalid { id, reason } if id == "b" && reason.contains("`zz`")),
            "{:?}",
            states[1]
        );
        assert!(matches!(&states[2], FetchedState::Invalid { id, .. } if id == "7"));
        let array = br#"[{"aggregateId":"b","aggregateVersion":1,"payload":{"y":2}}]"#;
        let (rows, problem) = parse_rows(array, true, false);
        let states = answer(&refs, rows, problem, false);
        assert!(matches!(&states[1], FetchedState::Found { version: 1, .. }));
        assert_eq!(states[0], FetchedState::Missing { id: "a".into() });
    }

    #[test]
    fn an_answer_that_does_not_parse_is_invalid_not_retried_or_missing() {
        let asked = ids(&["a", "b"]);
        let refs: Vec<&String> = asked.iter().collect();
        let body = b"{\"aggregateId\":\"a\",\"aggregateVersion\":3,\"payload\":{}}\n<html>\n";
        let (rows, problem) = parse_rows(body, false, false);
        let states = answer(&refs, rows, problem, false);
        assert!(matches!(&states[0], FetchedState::Found { version: 3, .. }));
        assert!(
            matches!(&states[1], FetchedState::Invalid { reason, .. } if reason.contains("line 2 is not a row")),
            "{:?}",
            states[1]
        );
        let one = ids(&["x"]);
        let refs: Vec<&String> = one.iter().collect();
        let (rows, problem) = parse_rows(b"<html>not found</html>", false, true);
        let states = answer(&refs, rows, problem, true);
        assert!(
            matches!(&states[0], FetchedState::Invalid { .. }),
            "{states:?}"
        );
        // A single read's one row is the id asked, whatever form the endpoint spells it in.
        let upper = ids(&["0af7c1f2-aaaa-4bbb-8ccc-000000000001"]);
        let refs: Vec<&String> = upper.iter().collect();
        let row = br#"{"aggregateId":"0AF7C1F2-AAAA-4BBB-8CCC-000000000001","aggregateVersion":2,"payload":{}}"#;
        let (rows, problem) = parse_rows(row, false, true);
        let states = answer(&refs, rows, problem, true);
        assert!(
            matches!(&states[0], FetchedState::Found { version: 2, .. }),
            "{states:?}"
        );
    }

    /// An HTTP server answering every request with `status` and `body`, recording request
    /// lines.
    async fn answering(
        status: &'static str,
        body: &'static str,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/snapshot", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                // Read the whole request (head and body) before answering, so the client
                // is never cut off mid-send.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head = loop {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + length || n == 0 {
                            break text;
                        }
                    } else if n == 0 {
                        break text;
                    }
                };
                log.lock()
                    .unwrap()
                    .push(head.lines().next().unwrap_or("").to_string());
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/x-ndjson\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn dot_ids_go_by_batch_and_a_refused_id_is_invalid_not_a_halt() {
        let (url, seen) = answering(
            "200 OK",
            "{\"aggregateId\":\"..\",\"aggregateVersion\":4,\"payload\":{}}\n",
        )
        .await;
        let client = FetchClient::new(FetchOptions {
            url,
            ..FetchOptions::default()
        })
        .unwrap();
        let state = client.fetch_one("athlete", "..").await.unwrap();
        assert!(
            matches!(state, FetchedState::Found { version: 4, .. }),
            "{state:?}"
        );
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            ["POST /snapshot/athlete:batch HTTP/1.1"]
        );
        for status in [
            "400 Bad Request",
            "414 URI Too Long",
            "422 Unprocessable Entity",
        ] {
            let (url, _) = answering(status, "{\"error\":\"bad id\"}").await;
            let client = FetchClient::new(FetchOptions {
                url,
                ..FetchOptions::default()
            })
            .unwrap();
            let state = client.fetch_one("athlete", "x").await.unwrap();
            assert!(
                matches!(&state, FetchedState::Invalid { reason, .. } if reason.contains("bad id")),
                "{status}: {state:?}"
            );
        }
        for (body, refused) in [
            (r#"{"error":"no athlete `x`","code":"not_found"}"#, false),
            (
                r#"{"error":"no entity `athlete`","code":"unknown_entity"}"#,
                true,
            ),
            (r#"{"error":"no entity `x`"}"#, true),
            ("<html>Not Found</html>", true),
        ] {
            let (url, _) = answering("404 Not Found", body).await;
            let client = FetchClient::new(FetchOptions {
                url,
                ..FetchOptions::default()
            })
            .unwrap();
            match client.fetch_one("athlete", "x").await {
                Ok(FetchedState::Missing { .. }) if !refused => {}
                Err(FetchError::Refused { status: 404, .. }) if refused => {}
                other => panic!("{body}: {other:?}"),
            }
        }
        let (url, _) = answering(
            "200 OK",
            "{\"aggregateId\":\"x\",\"aggregateVersion\":1,\"payload\":{\"big\":\"0123456789\"}}",
        )
        .await;
        let client = FetchClient::new(FetchOptions {
            url,
            max_body_bytes: 20,
            ..FetchOptions::default()
        })
        .unwrap();
        let state = client.fetch_one("athlete", "x").await.unwrap();
        assert!(
            matches!(&state, FetchedState::Invalid { reason, .. } if reason.contains("over max_body_bytes 20")),
            "{state:?}"
        );
        let err = client
            .fetch_batch("athlete", &ids(&["x", "y"]))
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Refused { .. }), "{err}");
        let (url, _) = answering("403 Forbidden", "{\"error\":\"no\"}").await;
        let client = FetchClient::new(FetchOptions {
            url,
            ..FetchOptions::default()
        })
        .unwrap();
        let err = client.fetch_one("athlete", "x").await.unwrap_err();
        assert!(
            matches!(err, FetchError::Refused { status: 403, .. }),
            "{err}"
        );
    }

    #[test]
    fn only_http_urls_build() {
        let bad = FetchOptions {
            url: "redis://127.0.0.1".into(),
            ..FetchOptions::default()
        };
        assert!(matches!(FetchClient::new(bad), Err(FetchError::Config(_))));
        let ok = FetchOptions {
            url: "http://user:secret@127.0.0.1:1/snapshot/?x=1".into(),
            ..FetchOptions::default()
        };
        let client = FetchClient::new(ok).unwrap();
        assert_eq!(client.endpoint(), "http://127.0.0.1:1/snapshot");
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_retried_then_unavailable_then_the_circuit_opens() {
        // A port nothing listens on: bind, read the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = FetchClient::new(FetchOptions {
            url: format!("http://127.0.0.1:{port}/snapshot"),
            retries: 1,
            backoff: Duration::from_millis(1),
            breaker_failures: 2,
            breaker_open_for: Duration::from_secs(60),
            ..FetchOptions::default()
        })
        .unwrap();
        let err = client.fetch_one("athlete", "a").await.unwrap_err();
        assert!(matches!(err, FetchError::Unavailable { .. }), "{err}");
        assert!(err.is_retryable());
        let err = client.fetch_one("athlete", "a").await.unwrap_err();
        assert!(matches!(err, FetchError::CircuitOpen { .. }), "{err}");
        assert_eq!(client.stats().breaker(), BreakerState::Open);
        let requests = client.stats().requests();
        assert!(requests.contains(&("error", 2)), "{requests:?}");
        assert!(requests.contains(&("circuit_open", 1)), "{requests:?}");
    }
}

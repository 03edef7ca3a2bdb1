//! `fetch`: the reference + API variant. For thin events (no payload by design), fetch the
//! aggregate's current state from a snapshot-contract endpoint and pass it on at the version
//! the endpoint answered, so that the sinks' guard orders it like any full-state event.
//!
//! One request per chunk of distinct ids of a batch. The endpoint down: the batch is held and
//! retried with backoff (nothing acked, `/readyz` says why). A state older than the event (a
//! lagging read replica): retried until `lag_retry_for`, then dead-lettered naming both
//! versions. 404: a tombstone at the event's version.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ecst_schemas::{Envelope, PayloadSelection};
use serde::Deserialize;

use crate::dead_letter::DeadLetterReason;
use crate::duration::ConfigDuration;
use crate::fetch::{FetchClient, FetchError, FetchOptions, FetchedState};
use crate::record::{Outcomes, RawEntry, Record};
use crate::stage::{
    AsyncStage, BuildContext, BuiltStage, ComponentConfig, ConfigProblem, KeyDoc, ProcessFuture,
};

/// Which events are thin (fetched); the others pass through unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum FetchWhen {
    /// `payload_missing`: events without a payload that are not `deleted: true`.
    Keyword(WhenKeyword),
    /// `{event_type: "athlete.ref.*"}`: events whose `eventType` matches the glob (`*` any
    /// run, `?` one character).
    EventType {
        /// The glob.
        event_type: String,
    },
}

/// The keyword form of `when`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenKeyword {
    /// Events without a payload that are not `deleted: true`.
    PayloadMissing,
}

impl Default for FetchWhen {
    fn default() -> Self {
        FetchWhen::Keyword(WhenKeyword::PayloadMissing)
    }
}

/// Configuration of the `fetch` stage (its `Debug` never shows the token).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchConfig {
    /// Base URL of the endpoint (`{url}/{entity}/{id}`, `{url}/{entity}:batch`).
    pub url: String,
    /// Bearer token (write `${ENV}`; default none).
    #[serde(default)]
    pub token: Option<String>,
    /// Entity name in the URL (default: the event's `aggregateType`).
    #[serde(default)]
    pub entity: Option<String>,
    /// Which events are fetched (default `payload_missing`).
    #[serde(default)]
    pub when: FetchWhen,
    /// Ids per request (default 100).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Largest answer read, in bytes (default 16 MiB).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Requests in flight at once (default 4).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Longest one request may take (default 5s).
    #[serde(default = "default_timeout")]
    pub timeout: ConfigDuration,
    /// Retries of a failed request before the batch waits (default 3).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First retry delay, doubled each time (default 100ms).
    #[serde(default = "default_backoff")]
    pub backoff: ConfigDuration,
    /// Longest retry delay, also while the batch waits for the endpoint (default 5s).
    #[serde(default = "default_backoff_max")]
    pub backoff_max: ConfigDuration,
    /// Consecutive failed requests that open the circuit breaker (default 5, 0: never).
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker fails fast before one trial (default 10s).
    #[serde(default = "default_breaker_open_for")]
    pub breaker_open_for: ConfigDuration,
    /// How long a state older than its event is fetched again before the event is
    /// dead-lettered (default 30s).
    #[serde(default = "default_lag_retry_for")]
    pub lag_retry_for: ConfigDuration,
}

impl std::fmt::Debug for FetchConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchConfig")
            .field("options", &self.options())
            .field("entity", &self.entity)
            .field("when", &self.when)
            .field("lag_retry_for", &self.lag_retry_for)
            .finish_non_exhaustive()
    }
}

fn default_max_body_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_batch_size() -> usize {
    100
}
fn default_concurrency() -> usize {
    4
}
fn default_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(5))
}
fn default_retries() -> u32 {
    3
}
fn default_backoff() -> ConfigDuration {
    ConfigDuration(Duration::from_millis(100))
}
fn default_backoff_max() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(5))
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_open_for() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}
fn default_lag_retry_for() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}

impl FetchConfig {
    fn options(&self) -> FetchOptions {
        FetchOptions {
            url: self.url.clone(),
            token: self.token.clone().filter(|t| !t.is_empty()),
            timeout: self.timeout.0,
            retries: self.retries,
            backoff: self.backoff.0,
            backoff_max: self.backoff_max.0,
            breaker_failures: self.breaker_failures,
            breaker_open_for: self.breaker_open_for.0,
            concurrency: self.concurrency,
            max_batch: self.batch_size,
            max_body_bytes: self.max_body_bytes,
        }
    }

    /// Builds the stage.
    pub fn build(&self) -> Result<Fetch, String> {
        let client = FetchClient::new(self.options()).map_err(|e| e.to_string())?;
        Ok(Fetch {
            client: Arc::new(client),
            entity: self.entity.clone(),
            when: self.when.clone(),
            backoff: self.backoff.0,
            backoff_max: self.backoff_max.0,
            lag_retry_for: self.lag_retry_for.0,
        })
    }
}

/// The running `fetch` stage.
#[derive(Debug)]
pub struct Fetch {
    client: Arc<FetchClient>,
    entity: Option<String>,
    when: FetchWhen,
    backoff: Duration,
    backoff_max: Duration,
    lag_retry_for: Duration,
}

/// Whether `text` matches `glob` (`*` any run, `?` one character).
fn glob_matches(glob: &str, text: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    let (mut gi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == t[ti]) {
            gi += 1;
            ti += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some((gi, ti));
            gi += 1;
        } else if let Some((sg, st)) = star {
            gi = sg + 1;
            ti = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|c| *c == '*')
}

impl Fetch {
    fn is_thin(&self, event: &Envelope) -> bool {
        // A delete carries its own state (none); a payloadRef is a payload not resolved yet
        // (claim_check's), not a missing one.
        if event.deleted {
            return false;
        }
        match &self.when {
            FetchWhen::Keyword(WhenKeyword::PayloadMissing) => {
                event.payload_ref.is_none()
                    && matches!(event.payload, None | Some(serde_json::Value::Null))
            }
            FetchWhen::EventType { event_type } => event
                .event_type
                .as_deref()
                .is_some_and(|t| glob_matches(event_type, t)),
        }
    }

    fn entity_of<'a>(&'a self, event: &'a Envelope) -> Option<&'a str> {
        self.entity.as_deref().or(event.aggregate_type.as_deref())
    }

    /// The states of `ids` of `entity`, waiting (with backoff) while the endpoint cannot
    /// answer. `Err` when it refuses the request: a configuration to fix.
    async fn fetch_until_answered(
        &self,
        entity: &str,
        ids: &[String],
    ) -> Result<Vec<FetchedState>, FetchError> {
        let mut delay = self.backoff;
        loop {
            match self.client.fetch_batch(entity, ids).await {
                Ok(states) => {
                    self.client.stats().set_unavailable(None);
                    return Ok(states);
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(endpoint = %self.client.endpoint(), entity, error = %e, retry_in_ms = delay.as_millis() as u64, "The fetch endpoint cannot answer; the batch waits.");
                    self.client.stats().set_unavailable(Some(e.to_string()));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.backoff_max);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn run(&self, input: Vec<Record>, out: &mut Outcomes) -> Vec<Record> {
        // The newest event version of each thin aggregate, by entity.
        let mut wanted: HashMap<String, HashMap<String, u64>> = HashMap::new();
        for record in &input {
            if !self.is_thin(&record.event) {
                continue;
            }
            let Some(entity) = self.entity_of(&record.event) else {
                continue;
            };
            let newest = wanted
                .entry(entity.to_string())
                .or_default()
                .entry(record.event.aggregate_id.clone())
                .or_insert(0);
            *newest = (*newest).max(record.event.aggregate_version);
        }
        let mut states: HashMap<(String, String), FetchedState> = HashMap::new();
        for (entity, ids) in wanted {
            let mut asked: Vec<String> = ids.keys().cloned().collect();
            asked.sort();
            // The lag bound counts from the endpoint's first answer for these ids: time spent
            // waiting for a down endpoint, or on other entities, is not the replica's lag.
            let mut first_answer: Option<Instant> = None;
            let mut lag_delay = self.backoff;
            loop {
                let answered = match self.fetch_until_answered(&entity, &asked).await {
                    Ok(answered) => answered,
                    Err(e) => {
                        out.halt(format!("fetch: {e}"));
                        return Vec::new();
                    }
                };
                let started = *first_answer.get_or_insert_with(Instant::now);
                let mut lagging = Vec::new();
                for state in answered {
                    let id = state.id().to_string();
                    if let FetchedState::Found { version, .. } = &state
                        && ids.get(&id).is_some_and(|newest| version < newest)
                    {
                        lagging.push(id.clone());
                    }
                    states.insert((entity.clone(), id), state);
                }
                if lagging.is_empty() || started.elapsed() >= self.lag_retry_for {
                    break;
                }
                tracing::debug!(entity = %entity, lagging = lagging.len(), "The endpoint answered states older than their events; fetching them again.");
                tokio::time::sleep(lag_delay).await;
                lag_delay = (lag_delay * 2).min(self.backoff_max);
                asked = lagging;
            }
        }
        let mut kept = Vec::with_capacity(input.len());
        for record in input {
            if !self.is_thin(&record.event) {
                kept.push(record);
                continue;
            }
            let Some(entity) = self.entity_of(&record.event) else {
                out.dead_letter(
                    record.entry,
                    DeadLetterReason::Fetch(
                        "the event has no aggregateType and the stage names no entity".into(),
                    ),
                );
                continue;
            };
            let key = (entity.to_string(), record.event.aggregate_id.clone());
            match states.get(&key) {
                Some(FetchedState::Found {
                    version, payload, ..
                }) => {
                    if *version < record.event.aggregate_version {
                        out.dead_letter(
                            record.entry,
                            DeadLetterReason::Fetch(format!(
                                "the endpoint still answers {entity} `{}` at version {version}, older than the event's {} after {:?}",
                                record.event.aggregate_id,
                                record.event.aggregate_version,
                                self.lag_retry_for
                            )),
                        );
                        continue;
                    }
                    let mut event = Envelope::clone(&record.event);
                    event.aggregate_version = *version;
                    event.payload = Some(payload.clone());
                    event.payload_ref = None;
                    event.deleted = false;
                    kept.push(Record::new(record.entry, event));
                }
                Some(FetchedState::Invalid { reason, .. }) => {
                    out.dead_letter(record.entry, DeadLetterReason::Fetch(reason.clone()));
                }
                // Missing (404): deleted at the event's version. A state the endpoint did not
                // answer at all cannot happen (one per id asked) and is taken the same way.
                _ => {
                    let mut event = Envelope::clone(&record.event);
                    event.payload = None;
                    event.payload_ref = None;
                    event.deleted = true;
                    kept.push(Record::new(record.entry, event));
                }
            }
        }
        kept
    }
}

impl AsyncStage for Fetch {
    fn process<'a>(
        &'a mut self,
        input: Vec<Record>,
        _entries: &'a [RawEntry],
        out: &'a mut Outcomes,
    ) -> ProcessFuture<'a> {
        Box::pin(self.run(input, out))
    }
}

impl ComponentConfig for FetchConfig {
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::required(
            "url",
            "URL",
            "the snapshot endpoint's base (`{url}/{entity}/{id}`, `{url}/{entity}:batch`)",
        ),
        KeyDoc::optional("token", "string", "none", "bearer token (write `${ENV}`)"),
        KeyDoc::optional(
            "entity",
            "string",
            "the event's aggregateType",
            "entity name in the URL",
        ),
        KeyDoc::optional(
            "when",
            "payload_missing | {event_type: glob}",
            "payload_missing",
            "which events are thin and fetched",
        ),
        KeyDoc::optional("batch_size", "integer", "100", "ids per request"),
        KeyDoc::optional(
            "max_body_bytes",
            "integer",
            "16777216",
            "largest answer read; a larger one for one id is dead-lettered, for a batch stops the worker",
        ),
        KeyDoc::optional("concurrency", "integer", "4", "requests in flight at once"),
        KeyDoc::optional("timeout", "duration", "5s", "longest one request may take"),
        KeyDoc::optional(
            "retries",
            "integer",
            "3",
            "retries of a failed request before the batch waits",
        ),
        KeyDoc::optional(
            "backoff",
            "duration",
            "100ms",
            "first retry delay, doubled each time",
        ),
        KeyDoc::optional("backoff_max", "duration", "5s", "longest retry delay"),
        KeyDoc::optional(
            "breaker_failures",
            "integer",
            "5",
            "consecutive failures that open the circuit breaker (0: never)",
        ),
        KeyDoc::optional(
            "breaker_open_for",
            "duration",
            "10s",
            "how long an open breaker fails fast",
        ),
        KeyDoc::optional(
            "lag_retry_for",
            "duration",
            "30s",
            "how long a state older than its event is fetched again before dead-lettering",
        ),
    ];

    fn problems(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if let Err(e) = FetchClient::new(self.options()) {
            problems.push(ConfigProblem::new("url", e.to_string()));
        }
        if self.max_body_bytes == 0 {
            problems.push(ConfigProblem::new("max_body_bytes", "must be at least 1"));
        }
        if self.batch_size == 0 {
            problems.push(ConfigProblem::new("batch_size", "must be at least 1"));
        }
        if self.concurrency == 0 {
            problems.push(ConfigProblem::new("concurrency", "must be at least 1"));
        }
        if self.timeout.0.is_zero() {
            problems.push(ConfigProblem::new("timeout", "must be more than 0"));
        }
        if let FetchWhen::EventType { event_type } = &self.when
            && event_type.is_empty()
        {
            problems.push(ConfigProblem::new("when.event_type", "must not be empty"));
        }
        problems
    }

    fn payload_reads(&self, _projected: bool) -> PayloadSelection {
        PayloadSelection::nothing()
    }

    async fn build_component(&self, _ctx: &BuildContext) -> Result<BuiltStage, String> {
        Ok(BuiltStage::AsyncStage(Box::new(self.build()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecst_schemas::EnvelopeKeys;
    use serde_json::json;

    #[test]
    fn the_token_is_never_printed() {
        let config: FetchConfig =
            serde_json::from_value(json!({"url": "http://x/s", "token": "s3cret"})).unwrap();
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn the_lag_bound_counts_from_the_first_answer_not_from_a_down_endpoint() {
        use std::sync::Mutex;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // 503 for the first 400ms, then version 1 of `a` (the event is at 2) forever.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/snapshot", listener.local_addr().unwrap());
        let answers = Arc::new(Mutex::new(0u32));
        let counted = answers.clone();
        let up_at = Instant::now() + Duration::from_millis(400);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let (status, body) = if Instant::now() < up_at {
                    ("503 Service Unavailable", "{}".to_string())
                } else {
                    *counted.lock().unwrap() += 1;
                    (
                        "200 OK",
                        r#"{"aggregateId":"a","aggregateVersion":1,"payload":{}}"#.to_string(),
                    )
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            }
        });
        let config: FetchConfig = serde_json::from_value(json!({
            "url": url, "entity": "athlete", "lag_retry_for": "300ms", "backoff": "10ms", "backoff_max": "20ms",
            "retries": 0, "breaker_failures": 0
        }))
        .unwrap();
        let stage = config.build().unwrap();
        let event = EnvelopeKeys::default()
            .read(&json!({"aggregateId": "a", "aggregateVersion": 2}))
            .unwrap();
        let mut out = Outcomes::default();
        let kept = stage.run(vec![Record::new(0, event)], &mut out).await;
        assert!(kept.is_empty());
        assert_eq!(
            out.dead_letters.len(),
            1,
            "{:?} {:?}",
            out.halt,
            out.dead_letters
        );
        // The endpoint was down longer than lag_retry_for, yet the lagging state was fetched
        // again after its first answer.
        assert!(*answers.lock().unwrap() >= 2, "{}", answers.lock().unwrap());
    }

    #[test]
    fn globs_match_event_types() {
        assert!(glob_matches("athlete.ref.*", "athlete.ref.updated"));
        assert!(glob_matches("*.updated", "athlete.updated"));
        assert!(glob_matches("a?c", "abc"));
        assert!(!glob_matches("athlete.*", "team.updated"));
        assert!(glob_matches("*", ""));
        assert!(!glob_matches("a*b", "acbx"));
    }

    #[test]
    fn reads_its_yaml_keys_and_picks_thin_events() {
        let config: FetchConfig = serde_json::from_value(json!({
            "url": "http://127.0.0.1:1/snapshot",
            "when": {"event_type": "athlete.ref.*"},
            "lag_retry_for": "2s"
        }))
        .unwrap();
        assert!(config.problems().is_empty());
        assert_eq!(config.lag_retry_for.0, Duration::from_secs(2));
        let keyword: FetchConfig =
            serde_json::from_value(json!({"url": "http://x/s", "when": "payload_missing"}))
                .unwrap();
        assert_eq!(keyword.when, FetchWhen::default());
        assert!(
            serde_json::from_value::<FetchConfig>(json!({"url": "http://x", "wen": 1})).is_err()
        );
        let stage = keyword.build().unwrap();
        let keys = EnvelopeKeys::default();
        let thin = keys
            .read(&json!({"aggregateId": "a", "aggregateVersion": 1}))
            .unwrap();
        let deleted = keys
            .read(&json!({"aggregateId": "a", "aggregateVersion": 1, "deleted": true}))
            .unwrap();
        let full = keys
            .read(&json!({"aggregateId": "a", "aggregateVersion": 1, "payload": {"x": 1}}))
            .unwrap();
        let claimed = keys
            .read(&json!({"aggregateId": "a", "aggregateVersion": 1, "payloadRef": ecst_schemas::ClaimRef::redis("ecst:claim:", b"{}")}))
            .unwrap();
        assert!(stage.is_thin(&thin));
        assert!(!stage.is_thin(&deleted) && !stage.is_thin(&full));
        assert!(
            !stage.is_thin(&claimed),
            "a payloadRef is not a missing payload"
        );
        let by_type: FetchConfig = serde_json::from_value(
            json!({"url": "http://x/s", "when": {"event_type": "athlete.*"}}),
        )
        .unwrap();
        let by_type = by_type.build().unwrap();
        let typed_delete = keys
            .read(&json!({"aggregateId": "a", "aggregateVersion": 2, "eventType": "athlete.deleted", "deleted": true}))
            .unwrap();
        let typed = keys
            .read(
                &json!({"aggregateId": "a", "aggregateVersion": 2, "eventType": "athlete.updated"}),
            )
            .unwrap();
        assert!(by_type.is_thin(&typed));
        assert!(!by_type.is_thin(&typed_delete), "a delete is never fetched");
        let bad: FetchConfig =
            serde_json::from_value(json!({"url": "ftp://x", "batch_size": 0})).unwrap();
        let keys: Vec<String> = bad.problems().into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["url", "batch_size"]);
    }
}

//! `claim_check`: resolves `payloadRef` claim references into payloads, from the claim store,
//! checking each body's size and SHA-256 before it is decoded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ecst_schemas::wire::{BodyLimits, ContentType, decode_body};
use ecst_schemas::{ClaimRef, PayloadSelection};
use serde::Deserialize;
use serde_json::Value;

use crate::claim::{ClaimRead, ClaimStore, RedisClaimStore};
use crate::dead_letter::DeadLetterReason;
use crate::duration::ConfigDuration;
use crate::record::{Outcomes, RawEntry, Record};
use crate::redis_pool::{RedisManager, check_redis_url};
use crate::secret::SecretUrl;
use crate::stage::{
    AsyncStage, BuildContext, BuiltStage, ComponentConfig, ConfigProblem, KeyDoc, ProcessFuture,
};

/// Longest wait between two reads of a claim not found yet (the batch is held meanwhile).
const MAX_MISSING_BACKOFF: Duration = Duration::from_secs(5);

/// The wait after `delay` before the next read of a missing claim.
fn next_missing_delay(delay: Duration) -> Duration {
    delay.saturating_mul(2).min(MAX_MISSING_BACKOFF)
}

/// Longest wait between two reads of a store that is down.
const MAX_UNAVAILABLE_BACKOFF: Duration = Duration::from_secs(5);

/// Configuration of the `claim_check` stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimCheckConfig {
    /// Redis holding the claims; the source's by default.
    #[serde(default)]
    pub redis: Option<SecretUrl>,
    /// Largest claimed body accepted, in bytes (default 16 MiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Deepest JSON nesting accepted in a claimed body (default 64).
    #[serde(default = "default_max_depth")]
    pub max_depth: usize,
    /// Reads of a missing or corrupt claim before the event is dead-lettered (default 5).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Wait before the second read; doubled each time, up to 5s (default 200ms).
    #[serde(default = "default_retry_backoff")]
    pub retry_backoff: ConfigDuration,
    /// Bound of one round trip to the store (default 2s).
    #[serde(default = "default_timeout")]
    pub timeout: ConfigDuration,
    /// Connections to the store (default 4).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
}

fn default_max_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_max_depth() -> usize {
    64
}
fn default_attempts() -> u32 {
    5
}
fn default_retry_backoff() -> ConfigDuration {
    ConfigDuration(Duration::from_millis(200))
}
fn default_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(2))
}
fn default_pool_size() -> u32 {
    4
}

impl ClaimCheckConfig {
    /// Builds the stage over `store`.
    pub fn build_with(&self, store: Arc<dyn ClaimStore>, name: &str) -> ClaimCheck {
        ClaimCheck {
            store,
            reporter: format!("claim_check stage `{name}`"),
            limits: BodyLimits {
                max_bytes: self.max_bytes,
                max_depth: self.max_depth,
            },
            attempts: self.attempts.max(1),
            retry_backoff: self.retry_backoff.0,
        }
    }
}

/// The running `claim_check` stage.
pub struct ClaimCheck {
    store: Arc<dyn ClaimStore>,
    reporter: String,
    limits: BodyLimits,
    attempts: u32,
    retry_backoff: Duration,
}

/// Why one claim is not resolved yet.
enum Unresolved {
    Missing,
    Corrupt(String),
}

impl ClaimCheck {
    /// Reads the bodies of `refs`, waiting out a store that is down (the batch is held, so
    /// nothing is acked meanwhile).
    async fn read(&self, refs: &[&ClaimRef]) -> Vec<ClaimRead> {
        let mut backoff = self.retry_backoff.max(Duration::from_millis(50));
        loop {
            match self.store.get_many(refs).await {
                Ok(bodies) => {
                    crate::claim::set_waiting(&self.reporter, None);
                    return bodies;
                }
                Err(e) => {
                    crate::claim::set_waiting(&self.reporter, Some(e.to_string()));
                    tracing::warn!(stage = %self.reporter, error = %e, retry_in = ?backoff, "Claim store unavailable; holding the batch.");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_UNAVAILABLE_BACKOFF);
                }
            }
        }
    }

    /// The payload a claimed body holds, or why it is not the body the reference names.
    fn payload_of(&self, claim: &ClaimRef, body: &[u8]) -> Result<Value, String> {
        claim.check(body).map_err(|e| e.to_string())?;
        match decode_body(body, ContentType::Json, self.limits).map_err(|e| e.to_string())? {
            Value::Object(map) => Ok(Value::Object(map)),
            other => Err(format!(
                "body must be a JSON object, got {}",
                ecst_schemas::envelope::json_type(&other)
            )),
        }
    }

    async fn resolve(&mut self, input: Vec<Record>, out: &mut Outcomes) -> Vec<Record> {
        let mut slots: Vec<Option<Record>> = input.into_iter().map(Some).collect();
        // Positions still waiting for their claim, and why. A reference to a body over the
        // limit is refused unread: the store is not asked for what would be dropped anyway.
        let mut waiting: Vec<(usize, Unresolved)> = Vec::new();
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(claim) = slot.as_ref().and_then(|r| r.event.payload_ref.as_ref()) else {
                continue;
            };
            if claim.size > self.limits.max_bytes as u64 {
                let reason = DeadLetterReason::ClaimCorrupt {
                    key: claim.key.clone(),
                    problem: format!(
                        "size {} bytes is over max_bytes {}",
                        claim.size, self.limits.max_bytes
                    ),
                };
                if let Some(record) = slot.take() {
                    out.dead_letter(record.entry, reason);
                }
                continue;
            }
            waiting.push((i, Unresolved::Missing));
        }
        let mut delay = self.retry_backoff;
        let mut attempt = 0;
        while !waiting.is_empty() && attempt < self.attempts {
            if attempt > 0 {
                tokio::time::sleep(delay).await;
                delay = next_missing_delay(delay);
            }
            attempt += 1;
            // One read per distinct claim: versions of one body share it.
            let mut keys: HashMap<String, usize> = HashMap::new();
            let mut owned: Vec<ClaimRef> = Vec::new();
            for (i, _) in &waiting {
                if let Some(claim) = slots[*i]
                    .as_ref()
                    .and_then(|r| r.event.payload_ref.as_ref())
                    && !keys.contains_key(&claim.key)
                {
                    keys.insert(claim.key.clone(), owned.len());
                    owned.push(claim.clone());
                }
            }
            let refs: Vec<&ClaimRef> = owned.iter().collect();
            let bodies = self.read(&refs).await;
            let mut payloads: HashMap<usize, Result<Value, String>> = HashMap::new();
            let mut still = Vec::new();
            let mut bad = Vec::new();
            for (i, _) in waiting {
                let Some(claim) = slots[i].as_ref().and_then(|r| r.event.payload_ref.clone())
                else {
                    continue;
                };
                let Some(&at) = keys.get(&claim.key) else {
                    continue;
                };
                let body = match bodies.get(at) {
                    Some(ClaimRead::Found(body)) => body,
                    Some(ClaimRead::Bad(problem)) => {
                        // No retry reads it differently: dead-letter now.
                        bad.push((i, problem.clone()));
                        continue;
                    }
                    _ => {
                        still.push((i, Unresolved::Missing));
                        continue;
                    }
                };
                let payload = payloads
                    .entry(at)
                    .or_insert_with(|| self.payload_of(&claim, body));
                match payload {
                    Ok(payload) => {
                        if let Some(record) = slots[i].as_mut() {
                            let mut event = (*record.event).clone();
                            event.payload = Some(payload.clone());
                            event.payload_ref = None;
                            record.event = Arc::new(event);
                        }
                    }
                    Err(problem) => still.push((i, Unresolved::Corrupt(problem.clone()))),
                }
            }
            waiting = still;
            for (i, problem) in bad {
                if let Some(record) = slots[i].take() {
                    let key = record
                        .event
                        .payload_ref
                        .as_ref()
                        .map(|c| c.key.clone())
                        .unwrap_or_default();
                    let reason = DeadLetterReason::ClaimCorrupt { key, problem };
                    tracing::warn!(stage = %self.reporter, entry = record.entry, reason = %reason, "Claim unreadable; dead-lettering the event.");
                    out.dead_letter(record.entry, reason);
                }
            }
            if !waiting.is_empty() && attempt < self.attempts {
                tracing::info!(stage = %self.reporter, unresolved = waiting.len(), attempt, retry_in = ?delay, "Claims not resolved yet; retrying.");
            }
        }
        for (i, why) in waiting {
            let Some(record) = slots[i].take() else {
                continue;
            };
            let key = record
                .event
                .payload_ref
                .as_ref()
                .map(|c| c.key.clone())
                .unwrap_or_default();
            let reason = match why {
                Unresolved::Missing => DeadLetterReason::ClaimMissing {
                    key,
                    attempts: attempt,
                },
                Unresolved::Corrupt(problem) => DeadLetterReason::ClaimCorrupt { key, problem },
            };
            tracing::warn!(stage = %self.reporter, entry = record.entry, reason = %reason, "Claim not resolved; dead-lettering the event.");
            out.dead_letter(record.entry, reason);
        }
        slots.into_iter().flatten().collect()
    }
}

impl AsyncStage for ClaimCheck {
    fn process<'a>(
        &'a mut self,
        input: Vec<Record>,
        _entries: &'a [RawEntry],
        out: &'a mut Outcomes,
    ) -> ProcessFuture<'a> {
        Box::pin(self.resolve(input, out))
    }
}

impl ComponentConfig for ClaimCheckConfig {
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::optional(
            "redis",
            "Redis URL",
            "the source's",
            "where the claimed payloads are",
        ),
        KeyDoc::optional(
            "max_bytes",
            "integer",
            "16777216",
            "larger claimed bodies are dead-lettered",
        ),
        KeyDoc::optional(
            "max_depth",
            "integer",
            "64",
            "deeper claimed bodies are dead-lettered",
        ),
        KeyDoc::optional(
            "attempts",
            "integer",
            "5",
            "reads of a missing or corrupt claim before it is dead-lettered",
        ),
        KeyDoc::optional(
            "retry_backoff",
            "duration",
            "200ms",
            "wait before the second read, doubled each time up to 5s",
        ),
        KeyDoc::optional(
            "timeout",
            "duration",
            "2s",
            "bound of one round trip to the store",
        ),
        KeyDoc::optional("pool_size", "integer", "4", "connections to the store"),
    ];

    fn problems(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if let Some(url) = &self.redis
            && let Err(e) = check_redis_url(url)
        {
            problems.push(ConfigProblem::new(
                "redis",
                format!("invalid Redis URL {url}: {e}"),
            ));
        }
        if self.attempts == 0 {
            problems.push(ConfigProblem::new("attempts", "must be at least 1"));
        }
        if self.pool_size == 0 {
            problems.push(ConfigProblem::new("pool_size", "must be at least 1"));
        }
        if self.timeout.0.is_zero() {
            problems.push(ConfigProblem::new("timeout", "must be more than 0ms"));
        }
        if self.max_bytes == 0 || self.max_depth == 0 {
            problems.push(ConfigProblem::new(
                "max_bytes",
                "limits must be more than 0",
            ));
        }
        problems
    }

    fn payload_reads(&self, _projected: bool) -> PayloadSelection {
        PayloadSelection::nothing()
    }

    async fn build_component(&self, ctx: &BuildContext) -> Result<BuiltStage, String> {
        let url = self
            .redis
            .clone()
            .unwrap_or_else(|| ctx.source_redis.clone());
        let pool = RedisManager::new(&url, self.timeout.0)
            .map_err(|e| format!("invalid Redis URL {url}: {e}"))?
            .into_pool(self.pool_size);
        // The consumer never writes, so the prefix and TTL are unused here.
        let store = RedisClaimStore::new(
            pool,
            url,
            ecst_schemas::claim::DEFAULT_KEY_PREFIX,
            Duration::from_secs(1),
            self.timeout.0,
        );
        Ok(BuiltStage::AsyncStage(Box::new(
            self.build_with(Arc::new(store), &ctx.stage),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claim::{ClaimFuture, ClaimStoreError};
    use ecst_schemas::EnvelopeKeys;
    use ecst_schemas::claim::DEFAULT_KEY_PREFIX;
    use serde_json::json;
    use std::sync::Mutex;

    /// An in-memory store for the stage's own logic; the Redis store has its own tests
    /// against a real server.
    #[derive(Default)]
    struct MemoryStore {
        bodies: Mutex<HashMap<String, Vec<u8>>>,
        reads: Mutex<u32>,
        /// Bodies the store holds only from this read on (a claim written late).
        late: Mutex<Option<(u32, ClaimRef, Vec<u8>)>>,
    }

    impl ClaimStore for MemoryStore {
        fn name(&self) -> &'static str {
            "redis"
        }
        fn put<'a>(&'a self, body: &'a [u8]) -> ClaimFuture<'a, ClaimRef> {
            Box::pin(async move {
                let claim = ClaimRef::redis(DEFAULT_KEY_PREFIX, body);
                self.bodies
                    .lock()
                    .unwrap()
                    .insert(claim.key.clone(), body.to_vec());
                Ok(claim)
            })
        }
        fn get_many<'a>(&'a self, refs: &'a [&'a ClaimRef]) -> ClaimFuture<'a, Vec<ClaimRead>> {
            Box::pin(async move {
                let reads = {
                    let mut reads = self.reads.lock().unwrap();
                    *reads += 1;
                    *reads
                };
                if let Some((_, claim, body)) = self.late.lock().unwrap().take_if(|l| l.0 <= reads)
                {
                    self.bodies.lock().unwrap().insert(claim.key, body);
                }
                let bodies = self.bodies.lock().unwrap();
                Ok::<_, ClaimStoreError>(
                    refs.iter()
                        .map(|r| match bodies.get(&r.key) {
                            Some(body) if r.store == "redis" => ClaimRead::Found(body.clone()),
                            Some(_) => ClaimRead::Bad(format!("store `{}`", r.store)),
                            None => ClaimRead::Missing,
                        })
                        .collect(),
                )
            })
        }
    }

    fn record(entry: usize, claim: &ClaimRef) -> Record {
        let body =
            json!({"aggregateId": format!("a{entry}"), "aggregateVersion": 1, "payloadRef": claim});
        Record::new(entry, EnvelopeKeys::default().read(&body).unwrap())
    }

    fn config() -> ClaimCheckConfig {
        serde_json::from_value(json!({"attempts": 3, "retry_backoff": "10ms", "max_bytes": 1000}))
            .unwrap()
    }

    #[tokio::test]
    async fn resolves_checks_and_dead_letters_with_the_key() {
        let store = Arc::new(MemoryStore::default());
        let good = store.put(br#"{"name":"Ada"}"#).await.unwrap();
        let corrupt = store.put(br#"{"name":"Bob"}"#).await.unwrap();
        store
            .bodies
            .lock()
            .unwrap()
            .insert(corrupt.key.clone(), br#"{"name":"Eve"}"#.to_vec());
        let missing = ClaimRef::redis(DEFAULT_KEY_PREFIX, br#"{"gone":1}"#);
        let not_object = store.put(b"[1,2]").await.unwrap();
        let too_big = store.put(&[b' '; 1001]).await.unwrap();
        let inline = Record::new(
            4,
            EnvelopeKeys::default()
                .read(&json!({"aggregateId": "i", "aggregateVersion": 1, "payload": {"x": 1}}))
                .unwrap(),
        );
        let mut stage = config().build_with(store.clone(), "claims");
        let mut out = Outcomes::default();
        let input = vec![
            record(0, &good),
            record(1, &corrupt),
            record(2, &missing),
            record(3, &not_object),
            inline,
            record(5, &good),
            record(6, &too_big),
        ];
        let kept = stage.process(input, &[], &mut out).await;
        let entries: Vec<usize> = kept.iter().map(|r| r.entry).collect();
        assert_eq!(entries, vec![0, 4, 5]);
        assert_eq!(kept[0].event.payload, Some(json!({"name": "Ada"})));
        assert_eq!(kept[0].event.payload_ref, None);
        assert_eq!(kept[1].event.payload, Some(json!({"x": 1})));
        // Three attempts, the last two only for what was still unresolved.
        assert_eq!(*store.reads.lock().unwrap(), 3);
        let reasons: HashMap<usize, String> = out
            .dead_letters
            .iter()
            .map(|(i, r)| (*i, r.to_string()))
            .collect();
        assert!(
            reasons[&1].starts_with(&format!("claim `{}` is corrupt: sha256 ", corrupt.key)),
            "{}",
            reasons[&1]
        );
        assert_eq!(
            reasons[&2],
            format!("claim `{}` not found after 3 attempts", missing.key)
        );
        assert_eq!(
            reasons[&6],
            format!(
                "claim `{}` is corrupt: size 1001 bytes is over max_bytes 1000",
                too_big.key
            )
        );
        assert!(
            reasons[&3].ends_with("body must be a JSON object, got an array"),
            "{}",
            reasons[&3]
        );
    }

    #[tokio::test]
    async fn a_claim_the_store_cannot_read_is_dead_lettered_on_the_first_read() {
        let store = Arc::new(MemoryStore::default());
        let mut foreign = store.put(br#"{"x":1}"#).await.unwrap();
        foreign.store = "s3".into();
        let mut stage = config().build_with(store.clone(), "claims");
        let mut out = Outcomes::default();
        let kept = stage
            .process(vec![record(0, &foreign)], &[], &mut out)
            .await;
        assert!(kept.is_empty());
        assert_eq!(*store.reads.lock().unwrap(), 1);
        assert_eq!(
            out.dead_letters[0].1.to_string(),
            format!("claim `{}` is corrupt: store `s3`", foreign.key)
        );
    }

    #[test]
    fn the_wait_for_a_missing_claim_is_capped() {
        let mut delay = Duration::from_secs(1);
        let mut waits = Vec::new();
        for _ in 0..5 {
            waits.push(delay.as_secs());
            delay = next_missing_delay(delay);
        }
        assert_eq!(waits, [1, 2, 4, 5, 5]);
    }

    /// A store that cannot answer while `down` is set.
    struct DownStore {
        down: std::sync::atomic::AtomicBool,
    }

    impl ClaimStore for DownStore {
        fn name(&self) -> &'static str {
            "redis"
        }
        fn put<'a>(&'a self, body: &'a [u8]) -> ClaimFuture<'a, ClaimRef> {
            Box::pin(async move { Ok(ClaimRef::redis(DEFAULT_KEY_PREFIX, body)) })
        }
        fn get_many<'a>(&'a self, refs: &'a [&'a ClaimRef]) -> ClaimFuture<'a, Vec<ClaimRead>> {
            Box::pin(async move {
                if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(ClaimStoreError::Unavailable {
                        store: "redis test".into(),
                        message: "connection refused".into(),
                    });
                }
                Ok(refs.iter().map(|_| ClaimRead::Missing).collect())
            })
        }
    }

    #[tokio::test]
    async fn a_store_that_is_down_is_named_in_the_readiness_reasons_until_it_answers() {
        let store = Arc::new(DownStore {
            down: std::sync::atomic::AtomicBool::new(true),
        });
        let config: ClaimCheckConfig =
            serde_json::from_value(json!({"attempts": 1, "retry_backoff": "10ms"})).unwrap();
        let mut stage = config.build_with(store.clone(), "claims-readyz");
        let claim = ClaimRef::redis(DEFAULT_KEY_PREFIX, b"{}");
        let task = tokio::spawn(async move {
            let mut out = Outcomes::default();
            stage.process(vec![record(0, &claim)], &[], &mut out).await;
            out
        });
        let named = |reasons: Vec<String>| {
            reasons.iter().any(|r| {
                r == "claim_check stage `claims-readyz` waits for its claim store: claim store redis test unavailable: connection refused"
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !named(crate::claim::unavailable_stores()) {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                crate::claim::unavailable_stores()
            );
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        store.down.store(false, std::sync::atomic::Ordering::SeqCst);
        let out = task.await.unwrap();
        assert_eq!(out.dead_letters.len(), 1);
        assert!(!named(crate::claim::unavailable_stores()));
    }

    #[tokio::test]
    async fn a_claim_written_late_is_applied_on_a_later_attempt() {
        let store = Arc::new(MemoryStore::default());
        let body = br#"{"late":true}"#.to_vec();
        let late = ClaimRef::redis(DEFAULT_KEY_PREFIX, &body);
        // Absent on the first two reads, there on the third (the last allowed).
        *store.late.lock().unwrap() = Some((3, late.clone(), body));
        let mut stage = config().build_with(store.clone(), "claims");
        let mut out = Outcomes::default();
        let kept = stage.process(vec![record(0, &late)], &[], &mut out).await;
        assert_eq!(*store.reads.lock().unwrap(), 3);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].event.payload, Some(json!({"late": true})));
        assert!(out.dead_letters.is_empty());
    }

    #[test]
    fn yaml_keys_and_problems() {
        let config: ClaimCheckConfig = serde_json::from_value(json!({})).unwrap();
        assert_eq!(config.attempts, 5);
        assert!(config.problems().is_empty());
        let err = serde_json::from_value::<ClaimCheckConfig>(json!({"atempts": 1})).unwrap_err();
        assert!(err.to_string().contains("unknown field `atempts`"), "{err}");
        let bad: ClaimCheckConfig =
            serde_json::from_value(json!({"attempts": 0, "pool_size": 0})).unwrap();
        let keys: Vec<String> = bad.problems().into_iter().map(|p| p.key).collect();
        assert_eq!(keys, vec!["attempts", "pool_size"]);
    }
}

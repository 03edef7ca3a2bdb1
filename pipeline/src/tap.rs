//! `ecst tap`: what running workers decide about each event, shown live while a tap is
//! attached, and nothing done while none is.
//!
//! The tap keeps the key [`tap_key`] alive (a heartbeat with a few seconds' TTL) holding its
//! [`TapFilter`]. Each worker reads that key once a second ([`watch`]); while it exists, the
//! worker traces batches through the DAG (see [`crate::dag::Trace`]) up to
//! [`EVENTS_PER_SECOND`] events a second, and appends one [`TapLine`] per event to the capped
//! stream [`tap_stream`], which the tap reads. A stream rather than pub/sub: the key and the
//! stream share a hash tag, so on a Redis Cluster both live on one node and every connection
//! ecst already has reaches them, and a tap that is slow to print misses nothing in between
//! reads. While no tap is attached a batch costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ecst_operators::redis_pool::RedisPool;
use serde::{Deserialize, Serialize};

use crate::dag::Trace;
use crate::shutdown::Shutdown;

/// How often a worker looks for a tap.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How long a tap's key outlives its last heartbeat.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(5);
/// Most events a worker publishes to taps per second.
pub const EVENTS_PER_SECOND: u32 = 200;
/// Approximate length the tap stream is capped at.
const TAP_STREAM_MAXLEN: u64 = 1000;
/// How long the tap stream outlives the last line written to it.
const TAP_STREAM_TTL_MS: u64 = 10_000;

/// The key a tap keeps alive while attached to a pipeline.
pub fn tap_key(pipeline: &str) -> String {
    format!("ecst:tap:{{{pipeline}}}")
}

/// The stream workers write their decisions to (same slot as [`tap_key`]).
pub fn tap_stream(pipeline: &str) -> String {
    format!("ecst:tap:{{{pipeline}}}:decisions")
}

/// What a tap wants to see; the workers apply it before counting against their bound.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapFilter {
    /// Only decisions of this stage or sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Only events whose `aggregateId` matches this pattern (`*` matches any text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl TapFilter {
    /// The line with only what the filter keeps, or `None` when it keeps nothing.
    pub fn keep(&self, mut line: TapLine) -> Option<TapLine> {
        if let Some(pattern) = &self.key
            && !line
                .aggregate_id
                .as_deref()
                .is_some_and(|id| glob_matches(pattern, id))
        {
            return None;
        }
        if let Some(stage) = &self.stage {
            line.decisions.retain(|d| &d.stage == stage);
        }
        (!line.decisions.is_empty()).then_some(line)
    }
}

/// One event as a worker saw it: its entry, aggregate and what each stage and sink decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapLine {
    /// The stream key the entry was read from (a partition of a partitioned stream).
    pub stream: String,
    /// The entry id.
    pub id: String,
    /// The worker's consumer name.
    pub consumer: String,
    /// `aggregateType`, when the entry decoded and has one.
    pub aggregate_type: Option<String>,
    /// `aggregateId`, when the entry decoded.
    pub aggregate_id: Option<String>,
    /// `aggregateVersion`, when the entry decoded.
    pub version: Option<u64>,
    /// The decisions, in the order they were taken.
    pub decisions: Vec<TapDecision>,
}

/// What one stage or sink did with the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapDecision {
    /// The stage's or sink's name.
    pub stage: String,
    /// `passed`, `stale`, `coalesced`, `filtered`, `applied`, `stale_at_sink`,
    /// `dead_lettered`, ... (see [`crate::dag::Outcome::as_str`]).
    pub outcome: String,
    /// Why it was dead-lettered, for the outcomes that dead-letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl TapLine {
    /// The line for people: `id  type/id v3  decode passed, cache applied`.
    pub fn to_text(&self) -> String {
        let aggregate = match (&self.aggregate_type, &self.aggregate_id) {
            (Some(t), Some(id)) => format!("{t}/{id}"),
            (None, Some(id)) => id.clone(),
            _ => "(not decoded)".into(),
        };
        let version = self.version.map_or(String::new(), |v| format!(" v{v}"));
        let decisions: Vec<String> = self
            .decisions
            .iter()
            .map(|d| match &d.reason {
                Some(reason) => format!("{} {}: {reason}", d.stage, d.outcome),
                None => format!("{} {}", d.stage, d.outcome),
            })
            .collect();
        format!(
            "{}  {aggregate}{version}  {}",
            self.id,
            decisions.join(", ")
        )
    }
}

/// Whether `text` matches `pattern` whole, `*` matching any run of characters.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A worker's side of the tap: whether one is attached, its filter, and this second's budget.
#[derive(Debug, Default)]
pub struct TapSwitch {
    attached: AtomicBool,
    state: Mutex<TapState>,
}

#[derive(Debug, Default)]
struct TapState {
    filter: TapFilter,
    second: Option<Instant>,
    used: u32,
}

impl TapSwitch {
    /// Whether to trace the next batch: a tap is attached and this second's budget is not
    /// spent. The first test is one relaxed load, all a batch pays while no tap is attached.
    pub fn wants_batch(&self) -> bool {
        if !self.attached.load(Ordering::Relaxed) {
            return false;
        }
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        let now = Instant::now();
        if state
            .second
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1))
        {
            state.second = Some(now);
            state.used = 0;
        }
        state.used < EVENTS_PER_SECOND
    }

    fn set(&self, filter: Option<TapFilter>) {
        if let Ok(mut state) = self.state.lock()
            && let Some(filter) = &filter
        {
            state.filter = filter.clone();
        }
        self.attached.store(filter.is_some(), Ordering::Relaxed);
    }

    /// The lines of a traced batch the tap wants, within this second's budget.
    pub fn lines(
        &self,
        stream: &str,
        consumer: &str,
        ids: &[String],
        trace: &Trace,
    ) -> Vec<TapLine> {
        let Ok(mut state) = self.state.lock() else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        for (entry, id) in ids.iter().enumerate() {
            if state.used >= EVENTS_PER_SECOND {
                break;
            }
            let event = trace.event(entry);
            let decisions: Vec<TapDecision> = trace
                .of_entry(entry)
                .map(|d| TapDecision {
                    stage: d.stage.clone(),
                    outcome: d.outcome.as_str().to_string(),
                    reason: d.outcome.reason().map(str::to_string),
                })
                .collect();
            let line = TapLine {
                stream: stream.to_string(),
                id: id.clone(),
                consumer: consumer.to_string(),
                aggregate_type: event.and_then(|e| e.aggregate_type.clone()),
                aggregate_id: event.map(|e| e.aggregate_id.clone()),
                version: event.map(|e| e.aggregate_version),
                decisions,
            };
            if let Some(line) = state.filter.keep(line) {
                state.used += 1;
                lines.push(line);
            }
        }
        lines
    }
}

/// Looks for a tap of `pipeline` every [`WATCH_EVERY`] until shutdown, switching `switch` on
/// while its key exists. A Redis error counts as no tap: the tap is a view, never a reason to
/// retry or report.
pub async fn watch(
    pool: RedisPool,
    pipeline: String,
    timeout: Duration,
    switch: Arc<TapSwitch>,
    mut shutdown: Shutdown,
) {
    let key = tap_key(&pipeline);
    loop {
        let filter = async {
            let mut conn = pool.get().await.ok()?;
            conn.begin();
            let reply = tokio::time::timeout(
                timeout,
                redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<String>>(conn.conn()),
            )
            .await
            .ok()?;
            conn.settle(&reply);
            let text = reply.ok()??;
            // A filter this worker cannot read still attaches the tap, unfiltered.
            Some(serde_json::from_str(&text).unwrap_or_default())
        }
        .await;
        if filter.is_some() != switch.attached.load(Ordering::Relaxed) {
            tracing::info!(pipeline = %pipeline, attached = filter.is_some(), "A tap attached or detached: publishing decisions while one is attached.");
        }
        switch.set(filter);
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = shutdown.wait() => return,
        }
    }
}

/// Appends `lines` to the tap stream in one round trip, counting their decisions in
/// `published`; a failure only loses the view.
pub async fn publish(
    pool: &RedisPool,
    pipeline: &str,
    timeout: Duration,
    published: &AtomicU64,
    lines: &[TapLine],
) {
    if lines.is_empty() {
        return;
    }
    let stream = tap_stream(pipeline);
    let mut pipe = redis::pipe();
    for line in lines {
        let Ok(json) = serde_json::to_string(line) else {
            continue;
        };
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(TAP_STREAM_MAXLEN)
            .arg("*")
            .arg("line")
            .arg(json)
            .ignore();
    }
    pipe.cmd("PEXPIRE")
        .arg(&stream)
        .arg(TAP_STREAM_TTL_MS)
        .ignore();
    let Ok(mut conn) = pool.get().await else {
        return;
    };
    conn.begin();
    let sent = match tokio::time::timeout(timeout, pipe.query_async::<()>(conn.conn())).await {
        Ok(sent) => sent,
        Err(_) => return,
    };
    conn.settle(&sent);
    match sent {
        Ok(()) => {
            let decisions: usize = lines.iter().map(|l| l.decisions.len()).sum();
            published.fetch_add(decisions as u64, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::debug!(pipeline, error = %e, "Cannot publish decisions to the tap.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, decisions: &[(&str, &str)]) -> TapLine {
        TapLine {
            stream: "s".into(),
            id: "1-0".into(),
            consumer: "c".into(),
            aggregate_type: Some("athlete".into()),
            aggregate_id: Some(id.into()),
            version: Some(3),
            decisions: decisions
                .iter()
                .map(|(stage, outcome)| TapDecision {
                    stage: stage.to_string(),
                    outcome: outcome.to_string(),
                    reason: None,
                })
                .collect(),
        }
    }

    #[test]
    fn filters_keep_matching_keys_and_the_named_stage_only() {
        let l = line("ath-7", &[("decode", "passed"), ("cache", "applied")]);
        assert_eq!(TapFilter::default().keep(l.clone()), Some(l.clone()));
        let by_key = TapFilter {
            key: Some("ath-*".into()),
            stage: None,
        };
        assert!(by_key.keep(l.clone()).is_some());
        let other_key = TapFilter {
            key: Some("x-*".into()),
            stage: None,
        };
        assert_eq!(other_key.keep(l.clone()), None);
        let cache = TapFilter {
            key: None,
            stage: Some("cache".into()),
        };
        let kept = cache.keep(l.clone()).expect("kept");
        assert_eq!(kept.decisions.len(), 1);
        assert_eq!(kept.to_text(), "1-0  athlete/ath-7 v3  cache applied");
        let absent = TapFilter {
            key: None,
            stage: Some("table".into()),
        };
        assert_eq!(absent.keep(l), None);
    }

    #[test]
    fn globs_match_whole_texts() {
        assert!(glob_matches(
            "delivered * times*",
            "delivered 6 times, over 5"
        ));
        assert!(!glob_matches("delivered", "delivered 6 times"));
        assert!(!glob_matches("*bigint", "delivered"));
        assert!(glob_matches("*", ""));
        assert!(!glob_matches("a*a", "a"));
        assert!(glob_matches("a*a", "aa"));
    }

    #[test]
    fn a_detached_switch_traces_nothing_and_an_attached_one_stops_at_its_budget() {
        let switch = TapSwitch::default();
        assert!(!switch.wants_batch());
        switch.set(Some(TapFilter::default()));
        assert!(switch.wants_batch());
        if let Ok(mut state) = switch.state.lock() {
            state.used = EVENTS_PER_SECOND;
        }
        assert!(!switch.wants_batch());
        switch.set(None);
        assert!(!switch.wants_batch());
    }
}

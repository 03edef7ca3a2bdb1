//! Tests against the real Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use ecst_schemas::EnvelopeKeys;
use serde_json::{Value, json};

use super::*;
use crate::stage::BuildContext;

fn redis_url() -> SecretUrl {
    SecretUrl::new(std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()))
}

fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "test:{}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn sink(prefix: &str) -> RedisHashSink {
    let config: RedisHashConfig = serde_json::from_value(json!({
        "key": format!("{prefix}athlete:{{aggregateId}}"),
        "tombstone_prefix": format!("{prefix}tomb:"),
    }))
    .unwrap();
    config
        .build(&BuildContext {
            pipeline: "t".into(),
            stage: "cache".into(),
            source_redis: redis_url(),
        })
        .unwrap()
}

fn record(entry: usize, id: &str, version: u64, payload: Value) -> Record {
    Record::new(
        entry,
        EnvelopeKeys::default()
            .read(
                &json!({"aggregateId": id, "aggregateVersion": version, "payload": payload,
                          "occurredAt": "2026-11-24T10:00:00Z"}),
            )
            .unwrap(),
    )
}

async fn conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url().expose())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn hash(key: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut conn().await)
        .await
        .unwrap()
}

#[tokio::test]
async fn guard_rejects_older_and_equal_versions() {
    let prefix = unique_prefix();
    let sink = sink(&prefix);
    let report = sink
        .apply_batch(&[record(0, "a", 5, json!({"name": "five", "n": 5}))])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (1, 0));
    let report = sink
        .apply_batch(&[
            record(0, "a", 4, json!({"name": "four"})),
            record(1, "a", 5, json!({"name": "again"})),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (0, 2));
    let h = hash(&format!("{prefix}athlete:a")).await;
    assert_eq!(h.get("name").map(String::as_str), Some("five"));
    assert_eq!(h.get("n").map(String::as_str), Some("5"));
    assert_eq!(h.get("_version").map(String::as_str), Some("5"));
    assert_eq!(
        h.get("_occurred_at").map(String::as_str),
        Some("2026-11-24T10:00:00Z")
    );
}

#[tokio::test]
async fn newer_state_replaces_the_whole_entry() {
    let prefix = unique_prefix();
    let sink = sink(&prefix);
    sink.apply_batch(&[record(0, "a", 1, json!({"old": "x", "keep": "1"}))])
        .await
        .unwrap();
    sink.apply_batch(&[record(
        0,
        "a",
        2,
        json!({"keep": "2", "nested": {"k": [1]}}),
    )])
    .await
    .unwrap();
    let h = hash(&format!("{prefix}athlete:a")).await;
    assert_eq!(h.get("old"), None);
    assert_eq!(h.get("nested").map(String::as_str), Some(r#"{"k":[1]}"#));
}

#[tokio::test]
async fn delete_tombstone_blocks_resurrection_until_newer() {
    let prefix = unique_prefix();
    let sink = sink(&prefix);
    let key = format!("{prefix}athlete:a");
    sink.apply_batch(&[record(0, "a", 3, json!({"v": "3"}))])
        .await
        .unwrap();
    sink.apply_batch(&[record(0, "a", 9, Value::Null)])
        .await
        .unwrap();
    assert!(hash(&key).await.is_empty());
    let report = sink
        .apply_batch(&[record(0, "a", 8, json!({"v": "8"}))])
        .await
        .unwrap();
    assert_eq!(report.stale, 1);
    assert!(
        hash(&key).await.is_empty(),
        "a late older update must not resurrect a delete"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{prefix}tomb:{key}"))
        .query_async(&mut conn().await)
        .await
        .unwrap();
    assert!(
        ttl > 6 * 86_400_000,
        "tombstone kept for the default 7d, got {ttl}ms"
    );
    sink.apply_batch(&[record(0, "a", 10, json!({"v": "10"}))])
        .await
        .unwrap();
    assert_eq!(hash(&key).await.get("v").map(String::as_str), Some("10"));
}

#[tokio::test]
async fn mark_mode_keeps_the_entry_flagged() {
    let prefix = unique_prefix();
    let sink = sink(&prefix);
    let key = format!("{prefix}athlete:a");
    sink.apply_batch(&[record(0, "a", 1, json!({"v": "1"}))])
        .await
        .unwrap();
    let mut marked = record(0, "a", 2, Value::Null);
    marked.action = Action::Mark;
    sink.apply_batch(&[marked]).await.unwrap();
    let h = hash(&key).await;
    assert_eq!(h.get("_deleted").map(String::as_str), Some("1"));
    assert_eq!(h.get("_version").map(String::as_str), Some("2"));
    assert_eq!(h.get("v").map(String::as_str), Some("1"));
}

#[tokio::test]
async fn versions_above_two_to_the_53_compare_exactly() {
    let prefix = unique_prefix();
    let sink = sink(&prefix);
    let big = u64::MAX - 1;
    sink.apply_batch(&[record(0, "a", big, json!({"v": "big"}))])
        .await
        .unwrap();
    let report = sink
        .apply_batch(&[record(0, "a", big - 1, json!({"v": "older"}))])
        .await
        .unwrap();
    assert_eq!(report.stale, 1);
    let report = sink
        .apply_batch(&[record(0, "a", big + 1, json!({"v": "newest"}))])
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    assert_eq!(
        hash(&format!("{prefix}athlete:a"))
            .await
            .get("v")
            .map(String::as_str),
        Some("newest")
    );
}

#[tokio::test]
async fn unrenderable_keys_are_rejected_alone() {
    let prefix = unique_prefix();
    let config: RedisHashConfig = serde_json::from_value(
        json!({"key": format!("{prefix}{{payload.region}}:{{aggregateId}}")}),
    )
    .unwrap();
    let sink = config
        .build(&BuildContext {
            pipeline: "t".into(),
            stage: "cache".into(),
            source_redis: redis_url(),
        })
        .unwrap();
    let report = sink
        .apply_batch(&[
            record(0, "a", 1, json!({"region": "eu"})),
            record(1, "b", 1, json!({})),
        ])
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    assert_eq!(
        report.rejected,
        vec![(
            1,
            "key template placeholder `payload.region` is missing in the event".to_string()
        )]
    );
}

#[tokio::test]
async fn unreachable_redis_is_a_retryable_error() {
    let config: RedisHashConfig = serde_json::from_value(json!({
        "key": "x:{aggregateId}", "redis": "redis://127.0.0.1:1", "timeout": "300ms"
    }))
    .unwrap();
    let sink = config
        .build(&BuildContext {
            pipeline: "t".into(),
            stage: "cache".into(),
            source_redis: redis_url(),
        })
        .unwrap();
    let err = sink
        .apply_batch(&[record(0, "a", 1, json!({}))])
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, SinkError::Unavailable { store: "redis", .. }),
        "{err}"
    );
}

/// A record of `count` projected fields `f0..`, each valued `<tag><i>`.
fn wide_record(id: &str, version: u64, count: usize, tag: &str) -> Record {
    let mut record = record(0, id, version, json!({}));
    record.fields = Some(
        (0..count)
            .map(|i| (format!("f{i}"), Value::String(format!("{tag}{i}"))))
            .collect(),
    );
    record
}

#[tokio::test]
async fn twenty_thousand_fields_land_and_stay_guarded() {
    let prefix = unique_prefix();
    let sink = sink(&prefix);
    let key = format!("{prefix}athlete:wide");
    let report = sink
        .apply_batch(&[wide_record("wide", 2, 20_000, "new")])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (1, 0));
    let h = hash(&key).await;
    // 20,000 projected fields plus the version and occurredAt fields.
    assert_eq!(h.len(), 20_002);
    assert_eq!(h.get("f0").map(String::as_str), Some("new0"));
    assert_eq!(h.get("f19999").map(String::as_str), Some("new19999"));
    assert_eq!(h.get("_version").map(String::as_str), Some("2"));

    let report = sink
        .apply_batch(&[wide_record("wide", 1, 20_000, "old")])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (0, 1));
    let h = hash(&key).await;
    assert_eq!(h.len(), 20_002);
    assert_eq!(h.get("f12345").map(String::as_str), Some("new12345"));
    assert_eq!(h.get("_version").map(String::as_str), Some("2"));
}

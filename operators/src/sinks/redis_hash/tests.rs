//! Tests against the real Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use ecst_schemas::EnvelopeKeys;
use serde_json::{Value, json};

use super::*;
use crate::record::{Action, Fields};
use crate::stage::BuildContext;

pub(super) fn redis_url() -> SecretUrl {
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

pub(super) fn sink(prefix: &str) -> RedisHashSink {
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
            payload_reads: Default::default(),
            schemas: None,
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

pub(super) async fn conn() -> redis::aio::MultiplexedConnection {
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
            payload_reads: Default::default(),
            schemas: None,
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
            payload_reads: Default::default(),
            schemas: None,
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

#[tokio::test]
async fn the_batch_script_notes_freshness_and_shrugs_off_a_broken_note() {
    let prefix = unique_prefix();
    let sink = sink(&prefix);
    let before = time::OffsetDateTime::now_utc();
    sink.apply_batch(&[record(0, "a", 1, json!({"v": "1"}))])
        .await
        .unwrap();
    let noted = hash(&sink.freshness_key).await;
    assert_eq!(
        noted.get("newest_occurred_at").map(String::as_str),
        Some("2026-11-24T10:00:00Z")
    );
    let replicated = time::OffsetDateTime::parse(
        &noted["replicated_at"],
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(replicated >= before, "{replicated} < {before}");

    // A key of another type where the note goes fails the note, not the batch.
    let mut conn = conn().await;
    redis::cmd("SET")
        .arg(&sink.freshness_key)
        .arg("x")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let report = sink
        .apply_batch(&[record(0, "a", 2, json!({"v": "2"}))])
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    redis::cmd("DEL")
        .arg(&sink.freshness_key)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
}

/// A record of `count` projected fields `f0..`, each valued `<tag><i>`.
fn wide_record(id: &str, version: u64, count: usize, tag: &str) -> Record {
    let mut record = record(0, id, version, json!({}));
    record.fields = Some(Fields::Map(
        (0..count)
            .map(|i| (format!("f{i}"), Value::String(format!("{tag}{i}"))))
            .collect(),
    ));
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

#[tokio::test]
async fn a_batch_over_several_packs_lands_whole_and_stays_guarded() {
    // Values of 900 KiB: the records' values take three packs (pack.rs), read in turn.
    let prefix = unique_prefix();
    let sink = sink(&prefix);
    let batch: Vec<Record> = (0..5)
        .map(|i| {
            let mut record = record(i, &format!("big{i}"), 3, json!({}));
            let fill = char::from(b'a' + i as u8).to_string();
            record.fields = Some(Fields::Map(
                [
                    ("blob".to_string(), Value::String(fill.repeat(900 << 10))),
                    ("n".to_string(), json!(i)),
                ]
                .into_iter()
                .collect(),
            ));
            record
        })
        .collect();
    let (writes, _) = sink.writes(&batch);
    let all: Vec<&Write<'_>> = writes.records.iter().collect();
    let call = sink.script_call(&writes.keys, &all, None).unwrap();
    // EVALSHA, the sha, the key count, 10 keys, 4 header arguments, then the packs.
    assert_eq!(call.cmd.args_iter().count() - 17, 3);
    let report = sink.apply_batch(&batch).await.unwrap();
    assert_eq!((report.applied, report.stale), (5, 0));
    for i in 0..5u8 {
        let h = hash(&format!("{prefix}athlete:big{i}")).await;
        let blob = h.get("blob").map(String::as_str).unwrap_or_default();
        assert_eq!(blob.len(), 900 << 10, "big{i}");
        assert!(blob.bytes().all(|b| b == b'a' + i), "big{i}");
        assert_eq!(h.get("n").map(String::as_str), Some(i.to_string().as_str()));
        assert_eq!(h.get("_version").map(String::as_str), Some("3"));
    }
    let report = sink.apply_batch(&batch).await.unwrap();
    assert_eq!((report.applied, report.stale), (0, 5));
    assert_eq!(report.stale_entries, [0, 1, 2, 3, 4]);
    // 4.5 MB would otherwise stay in the shared Redis after every run.
    let keys: Vec<String> = (0..5).map(|i| format!("{prefix}athlete:big{i}")).collect();
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn().await)
        .await
        .unwrap();
}

// On a Redis Cluster: the local one of `scripts/services.sh` (`ECST_CLUSTER_URL`).

fn cluster_sink(prefix: &str, key: &str) -> RedisHashSink {
    let config: RedisHashConfig = serde_json::from_value(json!({
        "key": format!("{prefix}{key}"),
        "tombstone_prefix": format!("{prefix}tomb:"),
        "redis": crate::redis_pool::test_cluster_url().expose(),
    }))
    .unwrap();
    assert!(config.check().is_empty());
    config
        .build(&BuildContext {
            pipeline: "t".into(),
            stage: "cache".into(),
            source_redis: redis_url(),
            payload_reads: Default::default(),
            schemas: None,
        })
        .unwrap()
}

async fn cluster_conn() -> RedisConn {
    RedisManager::new(
        &crate::redis_pool::test_cluster_url(),
        Duration::from_secs(5),
    )
    .unwrap()
    .connect_once(Duration::from_secs(5))
    .await
    .unwrap()
}

async fn slot_of(conn: &mut RedisConn, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

/// `count` aggregates `0..count` at `version`, each with a field saying so.
fn versions(count: usize, version: u64) -> Vec<Record> {
    (0..count)
        .map(|i| {
            record(
                i,
                &i.to_string(),
                version,
                json!({"v": version.to_string()}),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_batch_over_many_slots_applies_every_record_on_a_cluster() {
    let prefix = unique_prefix();
    let sink = cluster_sink(&prefix, "athlete:{aggregateId}");
    let mut conn = cluster_conn().await;
    let mut slots = std::collections::HashSet::new();
    for i in 0..300 {
        slots.insert(slot_of(&mut conn, &format!("{prefix}athlete:{i}")).await);
    }
    assert!(slots.len() > 250, "{} slots", slots.len());

    let report = sink.apply_batch(&versions(300, 2)).await.unwrap();
    assert_eq!((report.applied, report.stale), (300, 0));
    let report = sink.apply_batch(&versions(300, 1)).await.unwrap();
    assert_eq!((report.applied, report.stale), (0, 300));
    let report = sink.apply_batch(&versions(300, 2)).await.unwrap();
    assert_eq!((report.applied, report.stale), (0, 300));
    for i in 0..300 {
        let v: Option<String> = redis::cmd("HGET")
            .arg(format!("{prefix}athlete:{i}"))
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(v.as_deref(), Some("2"), "athlete {i}");
    }
    // Two versions of one aggregate in one batch keep their order.
    let report = sink
        .apply_batch(&[
            record(0, "7", 4, json!({"v": "4"})),
            record(1, "8", 3, json!({"v": "3"})),
            record(2, "7", 3, json!({"v": "3"})),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (2, 1));
    // The script names the stale record, for the decision trace.
    assert_eq!(report.stale_entries, [2]);
}

#[tokio::test]
async fn deletes_leave_tombstones_in_the_slot_of_their_hash() {
    for (template, tagged) in [
        ("athlete:{aggregateId}", false),
        ("athlete:{{{aggregateId}}}", true),
    ] {
        let prefix = unique_prefix();
        let sink = cluster_sink(&prefix, template);
        let mut conn = cluster_conn().await;
        let report = sink.apply_batch(&versions(50, 1)).await.unwrap();
        assert_eq!(report.applied, 50);
        let deletes: Vec<Record> = (0..50)
            .map(|i| record(i, &i.to_string(), 2, Value::Null))
            .collect();
        let report = sink.apply_batch(&deletes).await.unwrap();
        assert_eq!(report.applied, 50);
        let report = sink.apply_batch(&versions(50, 1)).await.unwrap();
        assert_eq!(
            report.stale, 50,
            "a late update must not resurrect a delete"
        );
        for delete in &deletes {
            let key = sink.key_of(delete).unwrap();
            // A key without a hash tag is wrapped in one; a tagged key keeps its tag.
            let tombstone = if tagged {
                format!("{prefix}tomb:{key}")
            } else {
                format!("{prefix}tomb:{{{key}}}")
            };
            let exists: bool = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(!exists, "{key}");
            let buried: Option<String> = redis::cmd("GET")
                .arg(&tombstone)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(buried.as_deref(), Some("2"), "{tombstone}");
            assert_eq!(
                slot_of(&mut conn, &key).await,
                slot_of(&mut conn, &tombstone).await
            );
        }
    }
}

#[tokio::test]
async fn noscript_after_script_flush_on_every_master_recovers() {
    let prefix = unique_prefix();
    let sink = cluster_sink(&prefix, "athlete:{aggregateId}");
    let report = sink.apply_batch(&versions(100, 1)).await.unwrap();
    assert_eq!(report.applied, 100);

    let mut conn = cluster_conn().await;
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await
        .unwrap();
    // `<id> <ip:port@cport> <flags> ...`, one line per node.
    let masters: Vec<String> = nodes
        .lines()
        .filter(|line| line.split(' ').nth(2).is_some_and(|f| f.contains("master")))
        .filter_map(|line| line.split(' ').nth(1)?.split('@').next().map(String::from))
        .collect();
    assert_eq!(masters.len(), 3, "{nodes}");
    let mut master_conns = Vec::new();
    for master in &masters {
        let mut master_conn = redis::Client::open(format!("redis://{master}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async::<()>(&mut master_conn)
            .await
            .unwrap();
        master_conns.push(master_conn);
    }

    let report = sink.apply_batch(&versions(100, 2)).await.unwrap();
    assert_eq!((report.applied, report.stale), (100, 0));
    // The script went to every master as EVAL, which cached it there (the script without a
    // header: these records are payloads, named field by field).
    for master_conn in &mut master_conns {
        let cached: Vec<bool> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(script::BatchScript::for_header(0).sha())
            .query_async(master_conn)
            .await
            .unwrap();
        assert_eq!(cached, [true]);
    }
}

/// Every key of a replica spread over the masters of a cluster, page by page.
async fn listed(sink: &RedisHashSink) -> (HashMap<String, u64>, usize) {
    use crate::replica::Replica;
    let mut keys = HashMap::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = sink.scan_keys(cursor).await.unwrap();
        pages += 1;
        for key in page.keys {
            assert!(key.touched_ms.is_some(), "{key:?}");
            keys.insert(key.key, key.version);
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return (keys, pages),
        }
    }
}

#[tokio::test]
async fn a_cluster_replica_is_listed_compared_and_evicted_on_every_master() {
    use crate::replica::{Drift, Eviction, Replica};
    let prefix = unique_prefix();
    let sink = cluster_sink(&prefix, "athlete:{aggregateId}");
    let records = versions(300, 2);
    assert_eq!(sink.apply_batch(&records).await.unwrap().applied, 300);
    let keys: Vec<String> = records.iter().map(|r| sink.key_of(r).unwrap()).collect();

    let (found, pages) = listed(&sink).await;
    assert_eq!(found.len(), 300, "every key, on every master");
    assert!(keys.iter().all(|k| found.get(k) == Some(&2)));
    assert!(pages >= 3, "a page at least per master: {pages}");
    assert_eq!(sink.compare(&records).await.unwrap(), vec![None; 300]);

    let mut conn = cluster_conn().await;
    redis::cmd("DEL")
        .arg(&keys[0])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    redis::cmd("HSET")
        .arg(&keys[1])
        .arg("_version")
        .arg(1)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    redis::cmd("HSET")
        .arg(&keys[2])
        .arg("v")
        .arg("corrupted")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let drifts = sink.compare(&records).await.unwrap();
    assert_eq!(drifts[0], Some(Drift::Missing));
    assert_eq!(drifts[1], Some(Drift::Stale { stored: 1 }));
    assert_eq!(
        drifts[2],
        Some(Drift::Mismatch {
            fields: vec!["v".into()]
        })
    );
    assert!(drifts[3..].iter().all(Option::is_none));

    // Removed only at the version given: the stale one stays, the missing one is not there.
    let rows: Vec<(String, u64)> = keys.iter().map(|k| (k.clone(), 2)).collect();
    assert_eq!(sink.evict(&rows, Eviction::Orphan).await.unwrap(), 298);
    let (found, _) = listed(&sink).await;
    assert_eq!(found, HashMap::from([(keys[1].clone(), 1)]));
    let buried: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}tomb:{{{}}}", keys[5]))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(buried.as_deref(), Some("2"));
    let rewrite = [(keys[1].clone(), 1)];
    assert_eq!(sink.evict(&rewrite, Eviction::Rewrite).await.unwrap(), 1);
    assert!(listed(&sink).await.0.is_empty());
    for key in &keys {
        redis::cmd("DEL")
            .arg(format!("{prefix}tomb:{{{key}}}"))
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
}

#[test]
fn a_tombstone_prefix_with_braces_is_refused_on_a_cluster() {
    let config: RedisHashConfig = serde_json::from_value(json!({
        "key": "athlete:{aggregateId}",
        "tombstone_prefix": "t{x}:",
        "redis": "redis+cluster://127.0.0.1:7001",
    }))
    .unwrap();
    let problems = config.check();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].key, "tombstone_prefix");
    let single: RedisHashConfig = serde_json::from_value(json!({
        "key": "athlete:{aggregateId}",
        "tombstone_prefix": "t{x}:",
    }))
    .unwrap();
    assert!(single.check().is_empty());
    let err = single
        .build(&BuildContext {
            pipeline: "t".into(),
            stage: "cache".into(),
            source_redis: crate::redis_pool::test_cluster_url(),
            payload_reads: Default::default(),
            schemas: None,
        })
        .err()
        .unwrap();
    assert!(
        err.starts_with("tombstone_prefix: `t{x}:` must not contain"),
        "{err}"
    );
}

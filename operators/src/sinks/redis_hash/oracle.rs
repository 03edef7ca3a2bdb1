//! The batch script against the one it replaced (kept in `oracle.lua`, with the arguments it
//! took): random batches go through both, on key prefixes of their own in the real Redis at
//! `REDIS_URL`, and must leave the same hashes and tombstones and report the same counts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ecst_schemas::{Envelope, EnvelopeKeys};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::tests::{redis_url, sink};
use super::*;
use crate::record::{Action, FieldNames, Fields};

const ORACLE: &str = include_str!("oracle.lua");

/// The call of the old script over `writes`, argument for argument as the sink made it.
fn oracle_call(sink: &RedisHashSink, keys: &str, writes: &[&Write<'_>]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(ORACLE).arg(writes.len() * 2);
    for write in writes {
        let key = &keys[write.key.clone()];
        cmd.arg(key)
            .arg(tombstone_key(&sink.config.tombstone_prefix, key, false).unwrap());
    }
    cmd.arg(sink.config.deleted_field.as_str());
    for record in writes.iter().map(|w| w.record) {
        let (action, keep_ms) = match record.action {
            Action::Upsert => ("u", 0),
            Action::Delete { keep_for } => (
                "d",
                u64::try_from(keep_for.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            ),
            Action::Mark => ("m", 0),
            Action::Patch { .. } => panic!("patches go to delta.lua, not the oracle"),
        };
        let occurred = record
            .event
            .occurred_at
            .map(ecst_schemas::envelope::format_timestamp);
        let field_count = if action == "u" {
            record.written_fields().count()
        } else {
            0
        };
        let pairs = 1 + usize::from(occurred.is_some()) + field_count;
        cmd.arg(action).arg(keep_ms).arg(pairs);
        cmd.arg(sink.config.version_field.as_str())
            .arg(record.event.aggregate_version);
        if let Some(occurred) = occurred {
            cmd.arg(sink.config.occurred_at_field.as_str())
                .arg(occurred);
        }
        if action == "u" {
            for (name, value) in record.written_fields() {
                cmd.arg(name);
                match value {
                    Value::String(s) => cmd.arg(s.as_str()),
                    Value::Bool(b) => cmd.arg(if *b { "true" } else { "false" }),
                    other => cmd.arg(other.to_string()),
                };
            }
        }
    }
    cmd
}

/// The fixed sets of upserts: the one most carry, another (a call's header names one set, the
/// first it meets), and one that names the deleted-flag field, which no header names.
const FIXED: [&[&str]; 3] = [
    &["name", "points", "team", "born"],
    &["name", "alias"],
    &["name", "_deleted"],
];
/// Names of fields of the other kinds and of hashes found in place.
const NAMES: [&str; 6] = ["name", "points", "alias", "x", "_deleted", "legacy"];
const VERSIONS: [u64; 11] = [
    1,
    2,
    3,
    9,
    10,
    11,
    (1 << 53) - 1,
    1 << 53,
    (1 << 53) + 1,
    u64::MAX - 1,
    u64::MAX,
];
/// Aggregates per case: few, so that records collide.
const IDS: usize = 4;

#[derive(Debug, Clone)]
enum Kind {
    /// An upsert of the fixed set `FIXED[set]`: a value or none per name (the first ones).
    Fixed {
        set: usize,
        values: Vec<Option<Value>>,
    },
    /// An upsert of a projection with `include`.
    Map(Vec<(usize, Value)>),
    /// An upsert of the payload as it is.
    Payload(Vec<(usize, Value)>),
    Delete {
        keep_ms: u64,
    },
    Mark,
}

#[derive(Debug, Clone)]
struct Spec {
    id: usize,
    version: u64,
    /// Unix seconds and nanoseconds.
    occurred: Option<(i64, u32)>,
    kind: Kind,
}

/// What a key holds before the case: a hash and a tombstone (with a TTL or not).
#[derive(Debug, Clone)]
struct Before {
    hash: Option<Found>,
    tombstone: Option<(u64, bool)>,
}

/// A hash in place: its version field, if any, and fields, some the records do not know.
#[derive(Debug, Clone)]
struct Found {
    version: Option<u64>,
    fields: Vec<(usize, String)>,
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[a-z]{0,4}".prop_map(Value::String),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
        Just(json!({"k": [1, "x"]})),
    ]
}

fn pairs() -> impl Strategy<Value = Vec<(usize, Value)>> {
    prop::collection::vec((0..NAMES.len(), value()), 0..4)
}

fn spec() -> impl Strategy<Value = Spec> {
    let kind = prop_oneof![
        4 => (
            prop::sample::select(&[0, 0, 0, 1, 2][..]),
            prop::collection::vec(prop::option::of(value()), FIXED[0].len()),
        )
            .prop_map(|(set, values)| Kind::Fixed { set, values }),
        1 => pairs().prop_map(Kind::Map),
        1 => pairs().prop_map(Kind::Payload),
        2 => (1u64..1_000_000_000).prop_map(|keep_ms| Kind::Delete { keep_ms }),
        1 => Just(Kind::Mark),
    ];
    (
        0..IDS,
        prop::sample::select(&VERSIONS[..]),
        prop::option::weighted(
            0.8,
            (
                0i64..4_000_000_000,
                prop_oneof![Just(0u32), 0u32..1_000_000_000],
            ),
        ),
        kind,
    )
        .prop_map(|(id, version, occurred, kind)| Spec {
            id,
            version,
            occurred,
            kind,
        })
}

fn before() -> impl Strategy<Value = Before> {
    let hash = (
        prop::option::weighted(0.8, prop::sample::select(&VERSIONS[..])),
        prop::collection::vec((0..NAMES.len(), "[a-z]{1,3}"), 0..4),
    )
        .prop_map(|(version, fields)| Found { version, fields });
    (
        prop::option::weighted(0.5, hash),
        prop::option::weighted(0.4, (prop::sample::select(&VERSIONS[..]), any::<bool>())),
    )
        .prop_map(|(hash, tombstone)| Before { hash, tombstone })
}

fn case() -> impl Strategy<Value = (Vec<Before>, Vec<Vec<Spec>>)> {
    (
        prop::collection::vec(before(), IDS),
        prop::collection::vec(prop::collection::vec(spec(), 1..12), 1..4),
    )
}

/// The two sinks, each on its own prefix, and the fixed sets their records share.
struct Pair {
    new: RedisHashSink,
    old: RedisHashSink,
    fixed: Vec<FieldNames>,
    conn: redis::aio::MultiplexedConnection,
}

fn object(pairs: &[(usize, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(name, value)| (NAMES[*name].to_string(), value.clone()))
        .collect()
}

impl Pair {
    async fn new() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let prefix = |side| {
            format!(
                "test:{}:oracle{}:{side}:",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            )
        };
        Pair {
            new: sink(&prefix("new")),
            old: sink(&prefix("old")),
            fixed: FIXED
                .iter()
                .map(|set| set.iter().map(|n| n.to_string()).collect())
                .collect(),
            conn: redis::Client::open(redis_url().expose())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
        }
    }

    fn record(&self, entry: usize, case: u64, spec: &Spec) -> Record {
        let mut event: Envelope = EnvelopeKeys::default()
            .read(&json!({"aggregateId": format!("{case}-{}", spec.id),
                          "aggregateVersion": spec.version, "payload": {}}))
            .unwrap();
        event.occurred_at = spec.occurred.map(|(seconds, nanos)| {
            OffsetDateTime::from_unix_timestamp(seconds).unwrap()
                + time::Duration::nanoseconds(i64::from(nanos))
        });
        let (action, fields) = match &spec.kind {
            Kind::Fixed { set, values } => {
                let names = &self.fixed[*set];
                let values = values[..names.len()].to_vec();
                let fields = Fields::Fixed {
                    names: Arc::clone(names),
                    values,
                };
                (Action::Upsert, Some(fields))
            }
            Kind::Map(pairs) => (Action::Upsert, Some(Fields::Map(object(pairs)))),
            Kind::Payload(pairs) => {
                event.payload = Some(Value::Object(object(pairs)));
                (Action::Upsert, None)
            }
            Kind::Delete { keep_ms } => (
                Action::Delete {
                    keep_for: Duration::from_millis(*keep_ms),
                },
                None,
            ),
            Kind::Mark => (Action::Mark, None),
        };
        let mut record = Record::new(entry, event);
        record.action = action;
        record.fields = fields;
        record
    }

    /// The hash and tombstone keys of aggregate `id` of `case` on `sink`'s prefix.
    fn keys(sink: &RedisHashSink, case: u64, id: usize) -> (String, String) {
        let key = sink
            .config
            .key
            .replace("{aggregateId}", &format!("{case}-{id}"));
        let tombstone = format!("{}{key}", sink.config.tombstone_prefix);
        (key, tombstone)
    }

    async fn set_up(&self, case: u64, before: &[Before]) {
        for sink in [&self.new, &self.old] {
            let mut pipe = redis::pipe();
            for (id, before) in before.iter().enumerate() {
                let (key, tombstone) = Self::keys(sink, case, id);
                if let Some(Found { version, fields }) = &before.hash {
                    pipe.cmd("HSET").arg(&key).arg("_occurred_at").arg("then");
                    if let Some(version) = version {
                        pipe.arg("_version").arg(*version);
                    }
                    for (name, value) in fields {
                        pipe.arg(NAMES[*name]).arg(value);
                    }
                    pipe.ignore();
                }
                if let Some((version, ttl)) = before.tombstone {
                    pipe.cmd("SET").arg(&tombstone).arg(version);
                    if ttl {
                        pipe.arg("PX").arg(100_000);
                    }
                    pipe.ignore();
                }
            }
            if before
                .iter()
                .any(|b| b.hash.is_some() || b.tombstone.is_some())
            {
                pipe.query_async::<()>(&mut self.conn.clone())
                    .await
                    .unwrap();
            }
        }
    }

    /// Every hash (its fields), tombstone and whether the tombstone expires, of a case.
    async fn state(&self, sink_new: bool, case: u64) -> Vec<Snapshot> {
        let sink = if sink_new { &self.new } else { &self.old };
        let mut pipe = redis::pipe();
        for id in 0..IDS {
            let (key, tombstone) = Self::keys(sink, case, id);
            pipe.cmd("HGETALL").arg(&key);
            pipe.cmd("GET").arg(&tombstone);
            pipe.cmd("PTTL").arg(&tombstone);
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut self.conn.clone()).await.unwrap();
        replies
            .chunks(3)
            .map(|reply| Snapshot {
                hash: redis::from_redis_value_ref(&reply[0]).unwrap(),
                tombstone: redis::from_redis_value_ref(&reply[1]).unwrap(),
                expires: redis::from_redis_value_ref::<i64>(&reply[2]).unwrap() > 0,
            })
            .collect()
    }

    async fn clean_up(&self, case: u64) {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(&self.new.freshness_key);
        for sink in [&self.new, &self.old] {
            for id in 0..IDS {
                let (key, tombstone) = Self::keys(sink, case, id);
                cmd.arg(key).arg(tombstone);
            }
        }
        cmd.query_async::<()>(&mut self.conn.clone()).await.unwrap();
    }

    async fn check(&self, case: u64, before: &[Before], batches: &[Vec<Spec>]) {
        self.set_up(case, before).await;
        for batch in batches {
            let records: Vec<Record> = batch
                .iter()
                .enumerate()
                .map(|(entry, spec)| self.record(entry, case, spec))
                .collect();
            let report = self.new.apply_batch(&records).await.unwrap();
            let (writes, rejected) = self.old.writes(&records);
            assert!(rejected.is_empty());
            let all: Vec<&Write<'_>> = writes.records.iter().collect();
            let counts: (usize, usize) = oracle_call(&self.old, &writes.keys, &all)
                .query_async(&mut self.conn.clone())
                .await
                .unwrap();
            assert_eq!((report.applied, report.stale), counts, "{batch:#?}");
            let newest = records.iter().filter_map(|r| r.event.occurred_at).max();
            if let Some(newest) = newest {
                let noted: Option<String> = redis::cmd("HGET")
                    .arg(&self.new.freshness_key)
                    .arg("newest_occurred_at")
                    .query_async(&mut self.conn.clone())
                    .await
                    .unwrap();
                assert_eq!(
                    noted,
                    Some(ecst_schemas::envelope::format_timestamp(newest))
                );
            }
        }
        let (new, old) = (self.state(true, case).await, self.state(false, case).await);
        self.clean_up(case).await;
        assert_eq!(new, old, "{before:#?}\n{batches:#?}");
    }
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    hash: BTreeMap<String, String>,
    tombstone: Option<String>,
    expires: bool,
}

#[test]
fn the_script_leaves_what_the_old_one_left() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pair = runtime.block_on(Pair::new());
    let cases = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case(), |(before, batches)| {
            let n = cases.fetch_add(1, Ordering::Relaxed);
            runtime.block_on(pair.check(n, &before, &batches));
            Ok(())
        })
        .unwrap();
}

/// An upsert of aggregate `case`-`id` over the fixed set `names`: every third value, from the
/// `absent`th, is missing.
fn fixed_record(names: &FieldNames, case: u64, id: usize, version: u64, absent: usize) -> Record {
    let event = EnvelopeKeys::default()
        .read(
            &json!({"aggregateId": format!("{case}-{id}"), "aggregateVersion": version,
                      "occurredAt": "2026-11-24T10:00:00Z", "payload": {}}),
        )
        .unwrap();
    let mut record = Record::new(id, event);
    let values = (0..names.len())
        .map(|i| (i % 3 != absent).then(|| Value::String(format!("{version}:{i}"))))
        .collect();
    record.fields = Some(Fields::Fixed {
        names: Arc::clone(names),
        values,
    });
    record
}

impl Pair {
    /// Gives aggregate `id` of `case`, on both sides, a field no record writes.
    async fn plant_foreign_field(&self, case: u64, id: usize) {
        for sink in [&self.new, &self.old] {
            let (key, _) = Pair::keys(sink, case, id);
            let _: () = redis::cmd("HSET")
                .arg(key)
                .arg("legacy")
                .arg("x")
                .query_async(&mut self.conn.clone())
                .await
                .unwrap();
        }
    }

    /// Applies `batch` through both scripts and checks that they report the same counts,
    /// which it returns.
    async fn apply_both(&self, batch: &[Record]) -> (usize, usize) {
        let report = self.new.apply_batch(batch).await.unwrap();
        let (writes, _) = self.old.writes(batch);
        let all: Vec<&Write<'_>> = writes.records.iter().collect();
        let counts: (usize, usize) = oracle_call(&self.old, &writes.keys, &all)
            .query_async(&mut self.conn.clone())
            .await
            .unwrap();
        assert_eq!((report.applied, report.stale), counts);
        counts
    }
}

#[tokio::test]
async fn wide_fixed_sets_agree_too() {
    let pair = Pair::new().await;
    // 1,500 names: over the 2,000 values one HSET or HDEL takes.
    let names: FieldNames = (0..1500).map(|i| format!("f{i}")).collect();
    // A new hash, one over it lacking other fields, one with all of them; aggregates 0 to 2
    // in one call, 3 alone.
    for (version, absent) in [(1, 0), (2, 1), (3, usize::MAX)] {
        let batches = [
            (0..3)
                .map(|id| fixed_record(&names, 0, id, version, absent))
                .collect(),
            vec![fixed_record(&names, 0, 3, version, absent)],
        ];
        for batch in batches {
            assert_eq!(pair.apply_both(&batch).await, (batch.len(), 0));
        }
        let (new, old) = (pair.state(true, 0).await, pair.state(false, 0).await);
        let fields = 2 + if absent > 2 { 1500 } else { 1000 };
        assert!(new.iter().all(|key| key.hash.len() == fields));
        assert_eq!(new, old);
    }
    pair.clean_up(0).await;
}

#[tokio::test]
async fn every_header_size_agrees_too() {
    let pair = Pair::new().await;
    // Each size a header can name has a script of its own; one more is named by record.
    for size in 1..=script::HEADER_MAX_NAMES + 1 {
        let case = size as u64;
        let names: FieldNames = (0..size).map(|i| format!("f{i}")).collect();
        // Aggregate 0 holds a field no record writes: the first complete write must drop it.
        pair.plant_foreign_field(case, 0).await;
        // Complete, then lacking every third field from the second, complete again, and the
        // same version once more, which is stale: aggregates 0 to 2 in one call, whose header
        // names the set, 3 alone.
        for (version, absent, fresh) in [
            (1, usize::MAX, true),
            (2, 1, true),
            (3, usize::MAX, true),
            (3, usize::MAX, false),
        ] {
            for ids in [0..3, 3..4] {
                let batch: Vec<Record> = ids
                    .map(|id| fixed_record(&names, case, id, version, absent))
                    .collect();
                let expected = if fresh {
                    (batch.len(), 0)
                } else {
                    (0, batch.len())
                };
                let context = format!("{size} names, version {version}");
                assert_eq!(pair.apply_both(&batch).await, expected, "{context}");
            }
            let (new, old) = (pair.state(true, case).await, pair.state(false, case).await);
            let written = if absent == 1 {
                size - (size + 1) / 3
            } else {
                size
            };
            // Each hash holds the version, occurredAt and the fields written, no more.
            assert!(
                new.iter().all(|key| key.hash.len() == 2 + written),
                "{size} names, version {version}: {new:?}"
            );
            assert_eq!(new, old, "{size} names, version {version}");
        }
        // The header's records among the other kinds, in one call: one without occurredAt, a
        // partial one over a foreign field (so rewritten), a stale partial one, a delete and a
        // mark.
        pair.plant_foreign_field(case, 1).await;
        let mut no_occurred = fixed_record(&names, case, 0, 4, usize::MAX);
        Arc::make_mut(&mut no_occurred.event).occurred_at = None;
        let mut delete = fixed_record(&names, case, 3, 5, usize::MAX);
        delete.action = Action::Delete {
            keep_for: Duration::from_secs(600),
        };
        delete.fields = None;
        let mut mark = fixed_record(&names, case, 0, 6, usize::MAX);
        mark.action = Action::Mark;
        mark.fields = None;
        let mut batch = vec![
            no_occurred,
            fixed_record(&names, case, 1, 4, 1),
            fixed_record(&names, case, 2, 2, 1),
            delete,
            mark,
        ];
        for (entry, record) in batch.iter_mut().enumerate() {
            record.entry = entry;
        }
        assert_eq!(pair.apply_both(&batch).await, (4, 1), "{size} names");
        let (new, old) = (pair.state(true, case).await, pair.state(false, case).await);
        assert_eq!(new, old, "{size} names, the other kinds");
        pair.clean_up(case).await;
    }
}

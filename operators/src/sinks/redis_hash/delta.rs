//! Patches (records of a `delta` stage) and the arguments of their script, `delta.lua`, which
//! applies each only where the hash holds exactly its base version.

use redis::Cmd;

use super::Write;
use super::script::{Layout, timestamp_arg, value_arg};
use crate::record::Action;

/// The patch script.
pub(super) const DELTA_SCRIPT: &str = include_str!("delta.lua");

/// Appends the keys and arguments of one patch call over `writes` (whose keys are rendered in
/// `keys`), in the order given, to `cmd` (which already names the script).
pub(super) fn append(cmd: &mut Cmd, layout: &Layout<'_>, keys: &str, writes: &[&Write<'_>]) {
    let mut scratch = Vec::new();
    cmd.arg(writes.len() * 2);
    for write in writes {
        let key = &keys[write.key.clone()];
        cmd.arg(key);
        scratch.clear();
        write
            .tombstone
            .push_key(&mut scratch, layout.tombstone_prefix, key);
        cmd.arg(scratch.as_slice());
    }
    cmd.arg(layout.version)
        .arg(layout.occurred_at)
        .arg(layout.deleted);
    for write in writes {
        let record = write.record;
        let base = match record.action {
            Action::Patch { base } => base,
            _ => record.event.aggregate_version.saturating_sub(1),
        };
        cmd.arg(record.event.aggregate_version).arg(base);
        match record.event.occurred_at {
            Some(at) => timestamp_arg(cmd, at),
            None => {
                cmd.arg("");
            }
        }
        // The sink's own fields are the script's to write: a patch naming one is not let
        // through to overwrite the version guard.
        let own = |name: &str| {
            name == layout.version || name == layout.occurred_at || name == layout.deleted
        };
        let changed: Vec<_> = record
            .written_fields()
            .filter(|(name, _)| !own(name))
            .collect();
        cmd.arg(changed.len());
        for (name, value) in changed {
            cmd.arg(name);
            value_arg(cmd, value);
        }
        let removed: Vec<&str> = record
            .removed_fields()
            .into_iter()
            .filter(|name| !own(name))
            .collect();
        cmd.arg(removed.len());
        for name in removed {
            cmd.arg(name);
        }
    }
}

/// What the patch script returns: applied, and the 1-based positions of the stale records and
/// of the gaps.
pub(super) type DeltaReply = (usize, Vec<usize>, Vec<usize>);

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::atomic::{AtomicU64, Ordering};

    use ecst_schemas::EnvelopeKeys;
    use serde_json::{Value, json};

    use super::super::tests::{redis_url, sink};
    use crate::record::{Action, Record};
    use crate::stage::Sink;

    fn prefix() -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        format!(
            "test:delta:{}:{}:",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn patch(entry: usize, id: &str, version: u64, base: u64, payload: Value) -> Record {
        let mut record = Record::new(
            entry,
            EnvelopeKeys::default()
                .read(
                    &json!({"aggregateId": id, "aggregateVersion": version, "baseVersion": base,
                    "payload": payload, "occurredAt": "2026-11-24T10:00:00Z"}),
                )
                .unwrap(),
        );
        record.action = Action::Patch { base };
        record
    }

    fn state(entry: usize, id: &str, version: u64, payload: Value) -> Record {
        Record::new(
            entry,
            EnvelopeKeys::default()
                .read(&json!({"aggregateId": id, "aggregateVersion": version, "payload": payload}))
                .unwrap(),
        )
    }

    async fn hash(key: &str) -> HashMap<String, String> {
        let mut conn = redis::Client::open(redis_url().expose())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn a_patch_applies_only_on_its_base_and_reports_stale_and_gaps() {
        let prefix = prefix();
        let sink = sink(&prefix);
        let key = format!("{prefix}athlete:a");
        let report = sink
            .apply_batch(&[state(0, "a", 3, json!({"a": "1", "b": "2", "c": "3"}))])
            .await
            .unwrap();
        assert_eq!(report.applied, 1);
        // Shuffled in the batch: applied in version order, so 4 and then 5 land; 3 is stale.
        let report = sink
            .apply_batch(&[
                patch(0, "a", 5, 4, json!({"a": "9"})),
                patch(1, "a", 3, 2, json!({"a": "old"})),
                patch(2, "a", 4, 3, json!({"b": null, "d": "x"})),
            ])
            .await
            .unwrap();
        assert_eq!((report.applied, report.stale), (2, 1));
        assert_eq!(report.stale_entries, [1]);
        assert!(report.gaps.is_empty());
        let mut expected = fields(&[
            ("a", "9"),
            ("c", "3"),
            ("d", "x"),
            ("_version", "5"),
            ("_occurred_at", "2026-11-24T10:00:00Z"),
        ]);
        assert_eq!(hash(&key).await, expected);
        // A missing version 6: the patch on it is a gap, never applied.
        let report = sink
            .apply_batch(&[patch(7, "a", 7, 6, json!({"a": "7"}))])
            .await
            .unwrap();
        assert_eq!((report.applied, report.stale), (0, 0));
        assert_eq!(report.gaps, [7]);
        assert_eq!(hash(&key).await, expected);
        // A base older than stored with a newer version is a gap too (its diff skips 5).
        let report = sink
            .apply_batch(&[patch(8, "a", 6, 4, json!({"a": "6"}))])
            .await
            .unwrap();
        assert_eq!(report.gaps, [8]);
        // The patch on the stored version goes through; the sink's own fields stay its own.
        let report = sink
            .apply_batch(&[patch(
                9,
                "a",
                6,
                5,
                json!({"a": "6", "_version": "99", "_deleted": null}),
            )])
            .await
            .unwrap();
        assert_eq!(report.applied, 1);
        expected.insert("a".into(), "6".into());
        expected.insert("_version".into(), "6".into());
        assert_eq!(hash(&key).await, expected);
    }

    #[tokio::test]
    async fn patches_start_from_nothing_and_from_a_tombstone() {
        let prefix = prefix();
        let sink = sink(&prefix);
        // An absent entry is version 0.
        let report = sink
            .apply_batch(&[patch(0, "n", 1, 0, json!({"name": "new"}))])
            .await
            .unwrap();
        assert_eq!(report.applied, 1);
        assert_eq!(hash(&format!("{prefix}athlete:n")).await["name"], "new");
        let report = sink
            .apply_batch(&[patch(0, "m", 2, 1, json!({"name": "x"}))])
            .await
            .unwrap();
        assert_eq!(report.gaps, [0]);
        assert!(hash(&format!("{prefix}athlete:m")).await.is_empty());
        // Deleted at 3: the tombstone's version is the stored one, so version 3 is stale and a
        // patch on 3 re-creates the entry from nothing and drops the tombstone.
        sink.apply_batch(&[state(0, "n", 3, Value::Null)])
            .await
            .unwrap();
        let report = sink
            .apply_batch(&[
                patch(0, "n", 3, 2, json!({"name": "late"})),
                patch(1, "n", 4, 3, json!({"city": "Lyon"})),
            ])
            .await
            .unwrap();
        assert_eq!((report.applied, report.stale_entries), (1, vec![0]));
        assert_eq!(
            hash(&format!("{prefix}athlete:n")).await,
            fields(&[
                ("city", "Lyon"),
                ("_version", "4"),
                ("_occurred_at", "2026-11-24T10:00:00Z")
            ])
        );
        let mut conn = redis::Client::open(redis_url().expose())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let tomb: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}tomb:{prefix}athlete:n"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(tomb, None);
    }

    /// A tiny deterministic generator, so that a failing seed can be replayed.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    /// Property: a source's patches delivered shuffled, duplicated and in batches, with the
    /// gaps delivered again (as pending entries are), converge to the source's state, field
    /// by field, and nothing is ever applied over a gap.
    #[tokio::test]
    async fn shuffled_duplicated_patches_converge_to_the_source() {
        for seed in 0..12u64 {
            let prefix = prefix();
            let sink = sink(&prefix);
            let mut rng = Lcg(seed);
            let mut source: BTreeMap<String, String> = BTreeMap::new();
            let mut log = Vec::new();
            for version in 1..=25u64 {
                let mut change = serde_json::Map::new();
                for _ in 0..=rng.below(3) {
                    let field = format!("f{}", rng.below(6));
                    if rng.below(4) == 0 {
                        source.remove(&field);
                        change.insert(field, Value::Null);
                    } else {
                        let value = format!("v{version}-{}", rng.below(100));
                        source.insert(field.clone(), value.clone());
                        change.insert(field, Value::String(value));
                    }
                }
                log.push(patch(0, "p", version, version - 1, Value::Object(change)));
            }
            let mut pending: Vec<Record> = log.clone();
            // Duplicates.
            for _ in 0..5 {
                let i = rng.below(log.len() as u64) as usize;
                pending.push(log[i].clone());
            }
            let mut rounds = 0;
            while !pending.is_empty() {
                rounds += 1;
                assert!(rounds < 200, "seed {seed}: no convergence");
                // Shuffle, then deliver in batches of up to 4; gaps come back.
                for i in (1..pending.len()).rev() {
                    let j = rng.below(i as u64 + 1) as usize;
                    pending.swap(i, j);
                }
                let mut again = Vec::new();
                for chunk in pending.chunks(1 + rng.below(4) as usize) {
                    let batch: Vec<Record> = chunk
                        .iter()
                        .enumerate()
                        .map(|(i, r)| Record {
                            entry: i,
                            ..r.clone()
                        })
                        .collect();
                    let before = hash(&format!("{prefix}athlete:p")).await;
                    let report = sink.apply_batch(&batch).await.unwrap();
                    assert_eq!(
                        report.applied + report.stale + report.gaps.len(),
                        batch.len(),
                        "seed {seed}"
                    );
                    if report.applied == 0 {
                        assert_eq!(hash(&format!("{prefix}athlete:p")).await, before);
                    }
                    again.extend(report.gaps.iter().map(|&e| batch[e].clone()));
                }
                pending = again;
            }
            let mut got = hash(&format!("{prefix}athlete:p")).await;
            assert_eq!(got.remove("_version").as_deref(), Some("25"), "seed {seed}");
            got.remove("_occurred_at");
            let got: BTreeMap<String, String> = got.into_iter().collect();
            assert_eq!(got, source, "seed {seed}");
        }
    }
}

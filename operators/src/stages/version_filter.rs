//! `version_filter`: drops events not newer than seen and coalesces a batch to the newest per
//! aggregate. An optimisation only: the sinks' store-side guard is what makes writes correct.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

use serde::Deserialize;

use crate::record::{DropReason, Outcomes, RawEntry, Record};
use crate::stage::{ConfigProblem, Stage};

/// Configuration of the `version_filter` stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionFilterConfig {
    /// How many aggregates' last versions are remembered (default 100000); the oldest entries
    /// are forgotten first, which only costs a harmless repeated write.
    #[serde(default = "default_max_aggregates")]
    pub max_aggregates: usize,
}

fn default_max_aggregates() -> usize {
    100_000
}

impl Default for VersionFilterConfig {
    fn default() -> Self {
        VersionFilterConfig {
            max_aggregates: default_max_aggregates(),
        }
    }
}

impl VersionFilterConfig {
    pub(crate) fn check(&self) -> Vec<ConfigProblem> {
        if self.max_aggregates == 0 {
            vec![ConfigProblem::new("max_aggregates", "must be at least 1")]
        } else {
            Vec::new()
        }
    }

    /// Builds the stage.
    pub fn build(&self) -> VersionFilter {
        VersionFilter {
            max_aggregates: self.max_aggregates,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

/// The running `version_filter` stage.
#[derive(Debug)]
pub struct VersionFilter {
    max_aggregates: usize,
    seen: HashMap<String, u64>,
    order: VecDeque<String>,
}

fn aggregate_key(record: &Record) -> String {
    match &record.event.aggregate_type {
        Some(t) => format!("{t}\u{1f}{}", record.event.aggregate_id),
        None => record.event.aggregate_id.clone(),
    }
}

impl VersionFilter {
    fn remember(&mut self, key: String, version: u64) {
        match self.seen.entry(key) {
            Entry::Occupied(mut e) => {
                e.insert(version);
            }
            Entry::Vacant(e) => {
                self.order.push_back(e.key().clone());
                e.insert(version);
                while self.seen.len() > self.max_aggregates {
                    match self.order.pop_front() {
                        Some(old) => {
                            self.seen.remove(&old);
                        }
                        None => break,
                    }
                }
            }
        }
    }

    /// Number of aggregates currently remembered.
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }
}

impl Stage for VersionFilter {
    fn process(
        &mut self,
        input: Vec<Record>,
        _entries: &[RawEntry],
        out: &mut Outcomes,
    ) -> Vec<Record> {
        // Newest record per aggregate in this batch; ties keep the first.
        let mut newest: HashMap<String, usize> = HashMap::with_capacity(input.len());
        let keys: Vec<String> = input.iter().map(aggregate_key).collect();
        for (i, key) in keys.iter().enumerate() {
            match newest.entry(key.clone()) {
                Entry::Vacant(e) => {
                    e.insert(i);
                }
                Entry::Occupied(mut e) => {
                    if input[i].event.aggregate_version > input[*e.get()].event.aggregate_version {
                        e.insert(i);
                    }
                }
            }
        }
        let mut kept = Vec::with_capacity(newest.len());
        for (i, (record, key)) in input.into_iter().zip(keys).enumerate() {
            let version = record.event.aggregate_version;
            let is_newest = newest.get(&key) == Some(&i);
            let already = self.seen.get(&key).is_some_and(|seen| *seen >= version);
            if !is_newest || already {
                out.drop_entry(record.entry, DropReason::Stale);
                continue;
            }
            self.remember(key, version);
            kept.push(record);
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecst_schemas::Envelope;
    use proptest::prelude::*;

    fn record(entry: usize, id: &str, version: u64) -> Record {
        Record::new(
            entry,
            Envelope {
                schema_version: None,
                event_id: None,
                event_type: None,
                occurred_at: None,
                aggregate_type: None,
                aggregate_id: id.into(),
                aggregate_version: version,
                payload: Some(serde_json::json!({})),
                deleted: false,
            },
        )
    }

    #[test]
    fn coalesces_a_batch_and_remembers_across_batches() {
        let mut filter = VersionFilterConfig::default().build();
        let mut out = Outcomes::default();
        let batch = vec![
            record(0, "a", 2),
            record(1, "a", 5),
            record(2, "b", 1),
            record(3, "a", 5),
        ];
        let kept = filter.process(batch, &[], &mut out);
        assert_eq!(kept.iter().map(|r| r.entry).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(out.dropped.len(), 2);
        let kept = filter.process(vec![record(0, "a", 4), record(1, "b", 2)], &[], &mut out);
        assert_eq!(kept.iter().map(|r| r.entry).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn memory_is_bounded() {
        let mut filter = VersionFilterConfig { max_aggregates: 10 }.build();
        let mut out = Outcomes::default();
        let batch = (0..100)
            .map(|i| record(i, &format!("agg-{i}"), 1))
            .collect();
        filter.process(batch, &[], &mut out);
        assert_eq!(filter.remembered(), 10);
        // A forgotten aggregate is let through again: a harmless repeat, never a loss.
        assert_eq!(
            filter
                .process(vec![record(0, "agg-0", 1)], &[], &mut out)
                .len(),
            1
        );
    }

    proptest! {
        #[test]
        fn output_holds_exactly_the_newest_unseen_version(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u8..6, 0u64..20), 0..30), 1..6)
        ) {
            let mut filter = VersionFilterConfig::default().build();
            let mut best: HashMap<String, u64> = HashMap::new();
            for batch in batches {
                let records: Vec<Record> = batch.iter().enumerate()
                    .map(|(i, (id, v))| record(i, &id.to_string(), *v)).collect();
                let mut out = Outcomes::default();
                let kept = filter.process(records, &[], &mut out);
                prop_assert_eq!(kept.len() + out.dropped.len(), batch.len());
                let mut ids = std::collections::HashSet::new();
                for r in &kept {
                    prop_assert!(ids.insert(r.event.aggregate_id.clone()), "one record per aggregate");
                    let prev = best.get(&r.event.aggregate_id).copied();
                    prop_assert!(prev.is_none_or(|p| r.event.aggregate_version > p));
                }
                for (id, v) in &batch {
                    let e = best.entry(id.to_string()).or_insert(*v);
                    *e = (*e).max(*v);
                }
                // Every aggregate's newest version so far has been let through at some point.
                for r in &kept {
                    prop_assert_eq!(Some(r.event.aggregate_version), best.get(&r.event.aggregate_id).copied());
                }
            }
        }
    }
}

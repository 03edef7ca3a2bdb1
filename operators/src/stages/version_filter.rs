//! `version_filter`: drops events not newer than seen and coalesces a batch to the newest per
//! aggregate. An optimisation only: the sinks' store-side guard is what makes writes correct.

use std::collections::HashMap;

use serde::Deserialize;

use crate::record::{DropReason, Outcomes, RawEntry, Record};
use crate::stage::{BuildContext, BuiltStage, ComponentConfig, ConfigProblem, KeyDoc, Stage};

/// Configuration of the `version_filter` stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionFilterConfig {
    /// How many aggregates' last versions are remembered (default 100000); those not seen for
    /// longest are forgotten first, which only costs a harmless repeated write.
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
            seen: Vec::new(),
        }
    }
}

/// The running `version_filter` stage.
#[derive(Debug)]
pub struct VersionFilter {
    max_aggregates: usize,
    /// Last version seen per aggregate id, one pair of generations per aggregate type
    /// (streams carry one or a few types, so they are found by a scan without allocating).
    seen: Vec<(Option<String>, Generations)>,
}

/// A map whose keys come from producers: seeded per process (so crafted ids cannot pile up
/// in one bucket), and much cheaper than SipHash for short ids.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Last versions in two generations: lookups see both, writes go to `current`, and when
/// `current` is full the older generation is forgotten whole. Memory stays within the budget
/// without an order queue (the types share it, see `remember`), and an aggregate seen again
/// is carried into the new generation,
/// so the ones forgotten are those not seen for longest.
#[derive(Debug, Default)]
struct Generations {
    current: FastMap<Box<str>, u64>,
    previous: FastMap<Box<str>, u64>,
}

impl Generations {
    fn get(&self, id: &str) -> Option<u64> {
        self.current
            .get(id)
            .or_else(|| self.previous.get(id))
            .copied()
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

type AggregateRef<'a> = (Option<&'a str>, &'a str);

fn aggregate_ref(record: &Record) -> AggregateRef<'_> {
    (
        record.event.aggregate_type.as_deref(),
        record.event.aggregate_id.as_str(),
    )
}

impl VersionFilter {
    fn kind_index(&self, kind: Option<&str>) -> Option<usize> {
        self.seen.iter().position(|(t, _)| t.as_deref() == kind)
    }

    fn last_seen(&self, (kind, id): AggregateRef<'_>) -> Option<u64> {
        let index = self.kind_index(kind)?;
        self.seen[index].1.get(id)
    }

    fn remember(&mut self, (kind, id): AggregateRef<'_>, version: u64) {
        let index = match self.kind_index(kind) {
            Some(index) => index,
            None => {
                self.seen
                    .push((kind.map(str::to_string), Generations::default()));
                self.seen.len() - 1
            }
        };
        if let Some(seen) = self.seen[index].1.current.get_mut(id) {
            *seen = version;
            return;
        }
        // Half the budget per generation, shared by the types in proportion to their use.
        if self.seen[index].1.current.len() >= (self.max_aggregates / 2).max(1) {
            let generations = &mut self.seen[index].1;
            generations.previous = std::mem::take(&mut generations.current);
        }
        let generations = &mut self.seen[index].1;
        generations.previous.remove(id);
        generations.current.insert(id.into(), version);
        // The budget is shared by the types: over it, the largest older generation goes first,
        // and when none is left the largest newer one becomes older.
        while self.remembered() > self.max_aggregates {
            let generations = self.seen.iter_mut().map(|(_, g)| g);
            if let Some(largest) = generations
                .filter(|g| !g.previous.is_empty())
                .max_by_key(|g| g.previous.len())
            {
                largest.previous = FastMap::default();
                continue;
            }
            let Some(largest) = self
                .seen
                .iter_mut()
                .map(|(_, g)| g)
                .max_by_key(|g| g.current.len())
            else {
                break;
            };
            largest.previous = std::mem::take(&mut largest.current);
        }
    }

    /// Number of aggregates currently remembered.
    pub fn remembered(&self) -> usize {
        self.seen.iter().map(|(_, g)| g.len()).sum()
    }
}

impl Stage for VersionFilter {
    fn reset(&mut self) {
        self.seen.clear();
    }

    fn process(
        &mut self,
        input: Vec<Record>,
        _entries: &[RawEntry],
        out: &mut Outcomes,
    ) -> Vec<Record> {
        // Newest record per aggregate in this batch; ties keep the first.
        let mut newest: FastMap<AggregateRef<'_>, usize> =
            FastMap::with_capacity_and_hasher(input.len(), Default::default());
        for (i, record) in input.iter().enumerate() {
            let slot = newest.entry(aggregate_ref(record)).or_insert(i);
            if record.event.aggregate_version > input[*slot].event.aggregate_version {
                *slot = i;
            }
        }
        let mut keep = vec![false; input.len()];
        for (&aggregate, &i) in &newest {
            let version = input[i].event.aggregate_version;
            if self.last_seen(aggregate).is_none_or(|seen| seen < version) {
                keep[i] = true;
            }
        }
        for (i, record) in input.iter().enumerate() {
            if keep[i] {
                self.remember(aggregate_ref(record), record.event.aggregate_version);
            }
        }
        drop(newest);
        let mut kept = Vec::with_capacity(input.len());
        for (record, keep) in input.into_iter().zip(keep) {
            if keep {
                kept.push(record);
            } else {
                out.drop_entry(record.entry, DropReason::Stale);
            }
        }
        kept
    }
}

impl ComponentConfig for VersionFilterConfig {
    const KEYS: &'static [KeyDoc] = &[KeyDoc::optional(
        "max_aggregates",
        "integer",
        "100000",
        "aggregates whose last version is remembered (least recently seen forgotten first)",
    )];

    fn problems(&self) -> Vec<ConfigProblem> {
        self.check()
    }

    fn payload_reads(&self, _projected: bool) -> ecst_schemas::PayloadSelection {
        ecst_schemas::PayloadSelection::nothing()
    }

    async fn build_component(&self, _ctx: &BuildContext) -> Result<BuiltStage, String> {
        Ok(BuiltStage::Stage(Box::new(self.build())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecst_schemas::Envelope;
    use proptest::prelude::*;
    use std::sync::Arc;

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
                base_version: None,
                payload: Some(serde_json::json!({})),
                payload_ref: None,
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
        assert!(filter.remembered() <= 10, "{}", filter.remembered());
        assert!(filter.remembered() >= 5, "{}", filter.remembered());
        // A forgotten aggregate is let through again: a harmless repeat, never a loss.
        assert_eq!(
            filter
                .process(vec![record(0, "agg-0", 1)], &[], &mut out)
                .len(),
            1
        );
    }

    #[test]
    fn the_budget_holds_across_aggregate_types() {
        let mut filter = VersionFilterConfig { max_aggregates: 10 }.build();
        let mut out = Outcomes::default();
        for kind in ["a", "b", "c", "d"] {
            let batch = (0..8)
                .map(|i| {
                    let mut r = record(i, &format!("{kind}-{i}"), 1);
                    Arc::make_mut(&mut r.event).aggregate_type = Some(kind.into());
                    r
                })
                .collect();
            filter.process(batch, &[], &mut out);
            assert!(filter.remembered() <= 10, "{}", filter.remembered());
        }
    }

    #[test]
    fn aggregates_seen_lately_outlive_a_new_generation() {
        let mut filter = VersionFilterConfig { max_aggregates: 10 }.build();
        let mut out = Outcomes::default();
        let batch = |from: usize| {
            (from..from + 5)
                .map(|i| record(i, &format!("agg-{i}"), 1))
                .collect()
        };
        filter.process(batch(0), &[], &mut out);
        filter.process(batch(5), &[], &mut out);
        // agg-0..4 moved to the older generation and are still known.
        assert!(
            filter
                .process(vec![record(0, "agg-0", 1)], &[], &mut out)
                .is_empty()
        );
        filter.process(vec![record(0, "agg-1", 2)], &[], &mut out);
        filter.process(batch(10), &[], &mut out);
        // agg-1 was seen again and carried over; agg-2 was not and is forgotten.
        assert!(
            filter
                .process(vec![record(0, "agg-1", 2)], &[], &mut out)
                .is_empty()
        );
        assert_eq!(
            filter
                .process(vec![record(0, "agg-2", 1)], &[], &mut out)
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

    #[test]
    fn reset_forgets_every_version() {
        let mut filter = VersionFilterConfig::default().build();
        let mut out = Outcomes::default();
        let first = filter.process(vec![record(0, "a", 5)], &[], &mut out);
        assert_eq!(first.len(), 1);
        assert!(
            filter
                .process(vec![record(0, "a", 5)], &[], &mut out)
                .is_empty()
        );
        filter.reset();
        assert_eq!(
            filter.process(vec![record(0, "a", 5)], &[], &mut out).len(),
            1
        );
    }
}

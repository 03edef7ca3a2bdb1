//! `delta`: marks events that carry only their changed fields as patches, with the version
//! each applies on top of. The sinks apply a patch only where the replica holds exactly that
//! base version; anything else is stale (the replica is as new or newer) or a gap (a version
//! in between is missing), which is never patched over.

use serde::Deserialize;

use crate::dead_letter::DeadLetterReason;
use crate::record::{Action, Outcomes, RawEntry, Record};
use crate::stage::{BuildContext, BuiltStage, ComponentConfig, KeyDoc, Stage};

/// Where a patch's base version comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum DeltaBase {
    /// The envelope's `baseVersion`; events without one are full state, written as usual.
    #[default]
    #[serde(rename = "baseVersion")]
    BaseVersion,
    /// Versions are contiguous: every event but a tombstone applies on top of `version - 1`
    /// (version 1 on top of nothing, as an absent entry counts as version 0).
    #[serde(rename = "contiguous")]
    Contiguous,
}

/// Configuration of the `delta` stage.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaConfig {
    /// `baseVersion` (default) or `contiguous`.
    #[serde(default)]
    pub base: DeltaBase,
}

impl DeltaConfig {
    /// Builds the stage.
    pub fn build(&self) -> Delta {
        Delta { base: self.base }
    }
}

/// The running `delta` stage.
#[derive(Debug)]
pub struct Delta {
    base: DeltaBase,
}

impl Delta {
    /// The base version `record` patches, `None` for a full state or a delete.
    fn base_of(&self, record: &Record) -> Result<Option<u64>, String> {
        let event = &record.event;
        if event.is_tombstone() {
            return Ok(None);
        }
        match self.base {
            DeltaBase::BaseVersion => Ok(event.base_version),
            DeltaBase::Contiguous => match event.base_version {
                Some(base) if base + 1 != event.aggregate_version => Err(format!(
                    "baseVersion {base} contradicts contiguous versions (aggregateVersion {})",
                    event.aggregate_version
                )),
                _ => Ok(event.aggregate_version.checked_sub(1)),
            },
        }
    }
}

impl Stage for Delta {
    fn reads_snapshots(&self) -> bool {
        // A snapshot row is the aggregate's full state, whatever `base` says of events.
        false
    }

    fn process(
        &mut self,
        input: Vec<Record>,
        _entries: &[RawEntry],
        out: &mut Outcomes,
    ) -> Vec<Record> {
        let mut kept = Vec::with_capacity(input.len());
        for mut record in input {
            match self.base_of(&record) {
                Ok(Some(base)) => record.action = Action::Patch { base },
                Ok(None) => {}
                Err(message) => {
                    out.dead_letter(record.entry, DeadLetterReason::StageRejected { message });
                    continue;
                }
            }
            kept.push(record);
        }
        kept
    }
}

impl ComponentConfig for DeltaConfig {
    const KEYS: &'static [KeyDoc] = &[KeyDoc::optional(
        "base",
        "baseVersion | contiguous",
        "baseVersion",
        "where a patch's base version comes from (`contiguous`: version - 1)",
    )];

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
    use ecst_schemas::EnvelopeKeys;
    use serde_json::json;

    fn record(entry: usize, body: serde_json::Value) -> Record {
        Record::new(entry, EnvelopeKeys::default().read(&body).unwrap())
    }

    fn run(base: DeltaBase, input: Vec<Record>) -> (Vec<Record>, Outcomes) {
        let mut out = Outcomes::default();
        (
            DeltaConfig { base }.build().process(input, &[], &mut out),
            out,
        )
    }

    #[test]
    fn base_version_marks_events_that_carry_one() {
        let (kept, out) = run(
            DeltaBase::BaseVersion,
            vec![
                record(
                    0,
                    json!({"aggregateId": "a", "aggregateVersion": 5, "baseVersion": 4, "payload": {"x": null}}),
                ),
                record(
                    1,
                    json!({"aggregateId": "a", "aggregateVersion": 6, "payload": {"x": 1}}),
                ),
                record(
                    2,
                    json!({"aggregateId": "a", "aggregateVersion": 7, "baseVersion": 6, "deleted": true}),
                ),
            ],
        );
        assert!(out.dead_letters.is_empty());
        assert_eq!(kept[0].action, Action::Patch { base: 4 });
        assert_eq!(kept[1].action, Action::Upsert);
        assert!(matches!(kept[2].action, Action::Delete { .. }));
    }

    #[test]
    fn contiguous_patches_every_state_on_the_version_before() {
        let (kept, out) = run(
            DeltaBase::Contiguous,
            vec![
                record(
                    0,
                    json!({"aggregateId": "a", "aggregateVersion": 1, "payload": {"x": 1}}),
                ),
                record(
                    1,
                    json!({"aggregateId": "a", "aggregateVersion": 9, "payload": {"x": 2}}),
                ),
                record(
                    2,
                    json!({"aggregateId": "a", "aggregateVersion": 0, "payload": {"x": 3}}),
                ),
                record(
                    3,
                    json!({"aggregateId": "a", "aggregateVersion": 10, "baseVersion": 9, "payload": {}}),
                ),
                record(
                    4,
                    json!({"aggregateId": "a", "aggregateVersion": 12, "baseVersion": 10, "payload": {}}),
                ),
            ],
        );
        let actions: Vec<Action> = kept.iter().map(|r| r.action).collect();
        assert_eq!(
            actions,
            [
                Action::Patch { base: 0 },
                Action::Patch { base: 8 },
                Action::Upsert,
                Action::Patch { base: 9 }
            ]
        );
        assert_eq!(out.dead_letters.len(), 1);
        assert_eq!(out.dead_letters[0].0, 4);
        assert!(
            out.dead_letters[0]
                .1
                .to_string()
                .contains("baseVersion 10 contradicts contiguous versions (aggregateVersion 12)"),
            "{}",
            out.dead_letters[0].1
        );
    }

    #[test]
    fn config_reads_from_json_and_rejects_unknown_keys() {
        let c: DeltaConfig = serde_json::from_value(json!({})).unwrap();
        assert_eq!(c.base, DeltaBase::BaseVersion);
        let c: DeltaConfig = serde_json::from_value(json!({"base": "contiguous"})).unwrap();
        assert_eq!(c.base, DeltaBase::Contiguous);
        assert!(serde_json::from_value::<DeltaConfig>(json!({"base": "previous"})).is_err());
        assert!(serde_json::from_value::<DeltaConfig>(json!({"bsae": "contiguous"})).is_err());
    }
}

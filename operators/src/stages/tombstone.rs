//! `tombstone`: the delete policy for events that carry `deleted: true` or no payload.

use serde::Deserialize;

use crate::duration::ConfigDuration;
use crate::record::{Action, DropReason, Outcomes, RawEntry, Record};
use crate::stage::{BuildContext, BuiltStage, ComponentConfig, KeyDoc, Stage};

/// What happens to a replica entry when its aggregate is deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TombstoneMode {
    /// The entry disappears; its version is remembered for `keep_for` so no older update
    /// can resurrect it.
    #[default]
    Delete,
    /// The entry stays, flagged deleted, at the tombstone's version.
    Mark,
    /// Deletes are dropped (acked, never written).
    Ignore,
}

/// Configuration of the `tombstone` stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TombstoneConfig {
    /// `delete` (default), `mark` or `ignore`.
    #[serde(default)]
    pub mode: TombstoneMode,
    /// How long a delete's version is remembered under `mode: delete` (default 7d).
    #[serde(default = "default_keep_for")]
    pub keep_for: ConfigDuration,
}

fn default_keep_for() -> ConfigDuration {
    ConfigDuration(crate::record::DEFAULT_TOMBSTONE_KEEP_FOR)
}

impl TombstoneConfig {
    /// Builds the stage.
    pub fn build(&self) -> Tombstone {
        Tombstone {
            mode: self.mode,
            keep_for: self.keep_for,
        }
    }
}

/// The running `tombstone` stage.
#[derive(Debug)]
pub struct Tombstone {
    mode: TombstoneMode,
    keep_for: ConfigDuration,
}

impl Stage for Tombstone {
    fn process(
        &mut self,
        input: Vec<Record>,
        _entries: &[RawEntry],
        out: &mut Outcomes,
    ) -> Vec<Record> {
        let mut kept = Vec::with_capacity(input.len());
        for mut record in input {
            if record.event.is_tombstone() {
                record.action = match self.mode {
                    TombstoneMode::Delete => Action::Delete {
                        keep_for: self.keep_for.0,
                    },
                    TombstoneMode::Mark => Action::Mark,
                    TombstoneMode::Ignore => {
                        out.drop_entry(record.entry, DropReason::IgnoredDelete);
                        continue;
                    }
                };
            }
            kept.push(record);
        }
        kept
    }
}

impl ComponentConfig for TombstoneConfig {
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::optional(
            "mode",
            "delete | mark | ignore",
            "delete",
            "what a delete does to the replica",
        ),
        KeyDoc::optional(
            "keep_for",
            "duration",
            "7d",
            "how long a deleted version is remembered under `mode: delete`",
        ),
    ];

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
    use std::time::Duration;

    fn records() -> Vec<Record> {
        let keys = EnvelopeKeys::default();
        vec![
            Record::new(0, keys.read(&json!({"aggregateId": "a", "aggregateVersion": 1, "payload": {"x": 1}})).unwrap()),
            Record::new(1, keys.read(&json!({"aggregateId": "b", "aggregateVersion": 2, "payload": null})).unwrap()),
            Record::new(2, keys.read(&json!({"aggregateId": "c", "aggregateVersion": 3, "payload": {"x": 1}, "deleted": true})).unwrap()),
        ]
    }

    fn run(yaml_mode: TombstoneMode) -> (Vec<Record>, Outcomes) {
        let mut out = Outcomes::default();
        let config = TombstoneConfig {
            mode: yaml_mode,
            keep_for: ConfigDuration::parse("1h").unwrap(),
        };
        (config.build().process(records(), &[], &mut out), out)
    }

    #[test]
    fn each_mode_applies_its_policy() {
        let (kept, _) = run(TombstoneMode::Delete);
        assert_eq!(kept[0].action, Action::Upsert);
        assert_eq!(
            kept[1].action,
            Action::Delete {
                keep_for: Duration::from_secs(3600)
            }
        );
        assert_eq!(
            kept[2].action,
            Action::Delete {
                keep_for: Duration::from_secs(3600)
            }
        );
        let (kept, _) = run(TombstoneMode::Mark);
        assert_eq!(kept[1].action, Action::Mark);
        let (kept, out) = run(TombstoneMode::Ignore);
        assert_eq!(kept.len(), 1);
        assert_eq!(
            out.dropped,
            vec![
                (1, DropReason::IgnoredDelete),
                (2, DropReason::IgnoredDelete)
            ]
        );
    }

    #[test]
    fn config_reads_from_json_and_rejects_unknown_keys() {
        let c: TombstoneConfig = serde_json::from_value(json!({"mode": "mark"})).unwrap();
        assert_eq!(c.mode, TombstoneMode::Mark);
        assert_eq!(c.keep_for.to_string(), "7d");
        assert!(serde_json::from_value::<TombstoneConfig>(json!({"mdoe": "mark"})).is_err());
    }
}

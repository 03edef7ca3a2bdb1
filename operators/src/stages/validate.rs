//! `validate`: checks each payload against the schema of its `(aggregateType, schemaVersion)`
//! in the pipeline's schema directory; an invalid event is dead-lettered with every JSON
//! pointer and failed rule.

use std::sync::Arc;

use ecst_schemas::{Envelope, PayloadSelection, SchemaRegistry};
use serde::Deserialize;

use crate::dead_letter::DeadLetterReason;
use crate::record::{Outcomes, RawEntry, Record};
use crate::stage::{BuildContext, BuiltStage, ComponentConfig, KeyDoc, Stage};

/// What happens to an event whose `(aggregateType, schemaVersion)` has no schema.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnknownVersion {
    /// Dead-lettered with the reason (default).
    #[default]
    DeadLetter,
    /// Passed on unchecked.
    Pass,
    /// The worker stops before acking the batch, naming the entry.
    Fail,
}

/// Configuration of the `validate` stage.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateConfig {
    /// `dead_letter` (default), `pass` or `fail`: what an event of a version (or aggregate
    /// type) the schema directory does not have does.
    #[serde(default)]
    pub on_unknown_version: OnUnknownVersion,
}

impl ValidateConfig {
    /// Builds the stage over the pipeline's schemas.
    pub fn build(&self, schemas: Arc<SchemaRegistry>) -> Validate {
        Validate {
            schemas,
            on_unknown_version: self.on_unknown_version,
        }
    }
}

/// The running `validate` stage.
#[derive(Debug)]
pub struct Validate {
    schemas: Arc<SchemaRegistry>,
    on_unknown_version: OnUnknownVersion,
}

/// What validating one event found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The payload fits its schema (or there is no payload).
    Valid,
    /// The payload breaks its schema: the pointers and rules, joined.
    Invalid(String),
    /// The registry has no schema for the event's `(aggregateType, schemaVersion)`.
    Unknown(String),
}

impl Validate {
    /// Checks one event against the schema of its `(aggregateType, schemaVersion)`.
    pub fn check(&self, event: &Envelope) -> Verdict {
        // A delete may carry the last state (`deleted: true`); it must reach the tombstone
        // stage whatever that state looks like.
        if event.is_tombstone() {
            return Verdict::Valid;
        }
        let Some(payload) = event.payload.as_ref().filter(|p| !p.is_null()) else {
            return Verdict::Valid;
        };
        let Some(aggregate_type) = event.aggregate_type.as_deref() else {
            return Verdict::Unknown(
                "no schema to validate against: the event has no aggregateType".into(),
            );
        };
        // No `schemaVersion` (a snapshot row, say) means the latest, as `upcast` reads it.
        let schema = match event.schema_version {
            Some(version) => u32::try_from(version)
                .ok()
                .and_then(|v| self.schemas.schema(aggregate_type, v)),
            None => self
                .schemas
                .subject(aggregate_type)
                .map(|subject| subject.latest()),
        };
        let Some(schema) = schema else {
            return Verdict::Unknown(match event.schema_version {
                Some(version) => format!(
                    "no schema for aggregateType {aggregate_type:?} schemaVersion {version}"
                ),
                None => format!("no schema for aggregateType {aggregate_type:?}"),
            });
        };
        match schema.violations(payload) {
            None => Verdict::Valid,
            Some(violations) => Verdict::Invalid(format!("schema {}: {violations}", schema.path)),
        }
    }
}

impl Stage for Validate {
    fn process(
        &mut self,
        input: Vec<Record>,
        entries: &[RawEntry],
        out: &mut Outcomes,
    ) -> Vec<Record> {
        let mut kept = Vec::with_capacity(input.len());
        for record in input {
            match self.check(&record.event) {
                Verdict::Valid => kept.push(record),
                Verdict::Invalid(reason) => {
                    out.dead_letter(record.entry, DeadLetterReason::InvalidEvent(reason))
                }
                Verdict::Unknown(reason) => match self.on_unknown_version {
                    OnUnknownVersion::Pass => kept.push(record),
                    OnUnknownVersion::DeadLetter => {
                        out.dead_letter(record.entry, DeadLetterReason::InvalidEvent(reason))
                    }
                    OnUnknownVersion::Fail => {
                        let id = entries
                            .get(record.entry)
                            .map_or("?", |entry| entry.id.as_str());
                        out.halt(format!(
                            "entry {id}: {reason} (validate on_unknown_version: fail)"
                        ));
                        return Vec::new();
                    }
                },
            }
        }
        kept
    }
}

impl ComponentConfig for ValidateConfig {
    const KEYS: &'static [KeyDoc] = &[KeyDoc::optional(
        "on_unknown_version",
        "dead_letter | pass | fail",
        "dead_letter",
        "what an event of a version the schema directory lacks does",
    )];

    fn payload_reads(&self, _projected: bool) -> PayloadSelection {
        // The schema may constrain any member, and `additionalProperties` all of them.
        PayloadSelection::All
    }

    fn needs_schemas(&self) -> bool {
        true
    }

    async fn build_component(&self, ctx: &BuildContext) -> Result<BuiltStage, String> {
        let schemas = ctx.schemas.clone().ok_or(
            "the validate stage needs a schema directory: add `schemas: ./schemas` at the top of the pipeline file",
        )?;
        Ok(BuiltStage::Stage(Box::new(self.build(schemas))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecst_schemas::EnvelopeKeys;
    use serde_json::{Value, json};

    fn registry() -> Arc<SchemaRegistry> {
        let v1 = json!({
            "type": "object",
            "required": ["id", "countryCode"],
            "properties": {
                "id": {"type": "string"},
                "countryCode": {"type": "string", "pattern": "^[A-Z]{2}$"},
                "points": {"type": "integer"},
            },
        });
        let (registry, problems) =
            SchemaRegistry::from_files([("athlete/v1.json".to_string(), v1)]);
        assert_eq!(problems, vec![]);
        Arc::new(registry)
    }

    fn record(entry: usize, version: i64, payload: Value) -> Record {
        let body = json!({
            "aggregateType": "athlete", "schemaVersion": version, "aggregateId": "a",
            "aggregateVersion": entry + 1, "payload": payload,
        });
        Record::new(entry, EnvelopeKeys::default().read(&body).unwrap())
    }

    fn entries(n: usize) -> Vec<RawEntry> {
        (0..n)
            .map(|i| RawEntry {
                id: format!("1-{i}"),
                fields: Vec::new(),
            })
            .collect()
    }

    fn run(policy: &str, input: Vec<Record>) -> (Vec<usize>, Outcomes) {
        let config: ValidateConfig =
            serde_json::from_value(json!({"on_unknown_version": policy})).unwrap();
        let mut stage = config.build(registry());
        let mut out = Outcomes::default();
        let n = input.len();
        let kept = stage.process(input, &entries(n), &mut out);
        (kept.iter().map(|r| r.entry).collect(), out)
    }

    #[test]
    fn dead_letters_invalid_payloads_naming_pointer_and_rule() {
        let (kept, out) = run(
            "dead_letter",
            vec![
                record(0, 1, json!({"id": "a", "countryCode": "GB"})),
                record(1, 1, json!({"id": "a", "countryCode": "gbr"})),
                record(2, 1, json!({"countryCode": "gb", "points": 1.5})),
                record(3, 1, Value::Null),
            ],
        );
        assert_eq!(kept, [0, 3]);
        let reasons: Vec<(usize, String)> = out
            .dead_letters
            .iter()
            .map(|(entry, reason)| (*entry, reason.to_string()))
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    1,
                    r#"schema athlete/v1.json: /countryCode: "gbr" does not match "^[A-Z]{2}$""#.to_string()
                ),
                (
                    2,
                    r#"schema athlete/v1.json: /: "id" is a required property; /countryCode: "gb" does not match "^[A-Z]{2}$"; /points: 1.5 is not of type "integer""#.to_string()
                ),
            ]
        );
        assert!(
            out.dead_letters
                .iter()
                .all(|(_, r)| r.class() == "invalid_event")
        );
    }

    #[test]
    fn bounds_the_errors_named_in_one_reason() {
        let mut properties = serde_json::Map::new();
        let mut payload = serde_json::Map::new();
        for i in 0..12 {
            properties.insert(format!("f{i:02}"), json!({"type": "integer"}));
            payload.insert(format!("f{i:02}"), json!("x"));
        }
        let (registry, _) = SchemaRegistry::from_files([(
            "athlete/v1.json".to_string(),
            json!({"properties": properties}),
        )]);
        let stage = ValidateConfig::default().build(Arc::new(registry));
        let Verdict::Invalid(reason) = stage.check(&record(0, 1, Value::Object(payload)).event)
        else {
            panic!("the payload is invalid");
        };
        assert_eq!(
            reason.matches("is not of type").count(),
            ecst_schemas::registry::MAX_REPORTED_VIOLATIONS
        );
        assert!(reason.ends_with("; and 4 more"), "{reason}");
    }

    #[test]
    fn unknown_versions_follow_the_policy() {
        let input = || {
            vec![
                record(0, 1, json!({"id": "a", "countryCode": "GB"})),
                record(1, 7, json!({"id": "a"})),
            ]
        };
        let (kept, out) = run("dead_letter", input());
        assert_eq!(kept, [0]);
        assert_eq!(
            out.dead_letters[0].1.to_string(),
            r#"no schema for aggregateType "athlete" schemaVersion 7"#
        );
        let (kept, out) = run("pass", input());
        assert_eq!(kept, [0, 1]);
        assert!(out.dead_letters.is_empty() && out.halt.is_none());
        let (kept, out) = run("fail", input());
        assert!(kept.is_empty());
        assert!(out.dead_letters.is_empty());
        assert_eq!(
            out.halt.as_deref(),
            Some(
                r#"entry 1-1: no schema for aggregateType "athlete" schemaVersion 7 (validate on_unknown_version: fail)"#
            )
        );
    }

    #[test]
    fn deletes_pass_whatever_their_payload_and_no_version_means_the_latest() {
        let event = |body: Value| {
            let mut base =
                json!({"aggregateType": "athlete", "aggregateId": "a", "aggregateVersion": 3});
            base.as_object_mut()
                .unwrap()
                .extend(body.as_object().unwrap().clone());
            Record::new(0, EnvelopeKeys::default().read(&base).unwrap())
        };
        let stage = ValidateConfig::default().build(registry());
        let delete = event(json!({"schemaVersion": 1, "deleted": true, "payload": {"id": 1}}));
        assert_eq!(stage.check(&delete.event), Verdict::Valid);
        let unversioned = event(json!({"payload": {"id": "a", "countryCode": "GB"}}));
        assert_eq!(stage.check(&unversioned.event), Verdict::Valid);
        let unversioned_bad = event(json!({"payload": {"id": "a", "countryCode": "gb"}}));
        assert!(matches!(
            stage.check(&unversioned_bad.event),
            Verdict::Invalid(reason) if reason.starts_with("schema athlete/v1.json: /countryCode")
        ));
    }

    #[test]
    fn reads_its_yaml_keys_and_refuses_unknown_ones() {
        let config: ValidateConfig = serde_json::from_value(json!({})).unwrap();
        assert_eq!(config.on_unknown_version, OnUnknownVersion::DeadLetter);
        assert!(
            serde_json::from_value::<ValidateConfig>(json!({"on_unknown_version": "skip"}))
                .is_err()
        );
        assert!(serde_json::from_value::<ValidateConfig>(json!({"strict": true})).is_err());
    }
}

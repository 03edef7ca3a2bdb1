//! The canonical envelope and the mapping that reads foreign shapes into it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// One event as the wire contract defines it: the full new state of one aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Version of the entity's payload schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i64>,
    /// Unique id of the event, for idempotency and tracing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Kind of change, e.g. `athlete.updated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// When the source committed the change.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub occurred_at: Option<OffsetDateTime>,
    /// Entity kind, e.g. `athlete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate_type: Option<String>,
    /// Entity id; also the shard key.
    pub aggregate_id: String,
    /// Monotonic per aggregate: the ordering and idempotency guard.
    pub aggregate_version: u64,
    /// The version a delta applies on top of: the payload is then a patch (a member is a
    /// change, `null` removes the field, an absent member is untouched), not the full state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
    /// Full new state, always a JSON object; `None` is a tombstone.
    #[serde(default)]
    pub payload: Option<Value>,
    /// True for a tombstone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

impl Envelope {
    /// Whether this event deletes the aggregate (`deleted: true` or no payload).
    pub fn is_tombstone(&self) -> bool {
        self.deleted || matches!(self.payload, None | Some(Value::Null))
    }

    /// Looks up a dotted path (`aggregateId`, `payload.address.city`) in the canonical view.
    pub fn lookup(&self, path: &str) -> Option<Value> {
        self.get(&EnvelopePath::parse(path)?)
    }

    /// The value at a parsed path in the canonical view.
    pub fn get(&self, path: &EnvelopePath) -> Option<Value> {
        let scalar_only = |value: Value| path.steps.is_empty().then_some(value);
        match path.root {
            Member::AggregateId => scalar_only(Value::String(self.aggregate_id.clone())),
            Member::AggregateVersion => scalar_only(Value::from(self.aggregate_version)),
            Member::AggregateType => scalar_only(self.aggregate_type.clone().map(Value::String)?),
            Member::EventId => scalar_only(self.event_id.clone().map(Value::String)?),
            Member::EventType => scalar_only(self.event_type.clone().map(Value::String)?),
            Member::SchemaVersion => scalar_only(self.schema_version.map(Value::from)?),
            Member::BaseVersion => scalar_only(self.base_version.map(Value::from)?),
            Member::OccurredAt => scalar_only(Value::String(format_timestamp(self.occurred_at?))),
            Member::Deleted => scalar_only(Value::Bool(self.is_tombstone())),
            Member::Payload => {
                let mut current = self.payload.as_ref()?;
                for step in &path.steps {
                    current = match current {
                        Value::Object(map) => map.get(&step.name)?,
                        Value::Array(items) => items.get(step.index?)?,
                        _ => return None,
                    };
                }
                Some(current.clone())
            }
        }
    }

    /// The canonical JSON view (camelCase keys), as CEL expressions and `lookup` see it.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// A top-level member of the canonical envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    AggregateId,
    AggregateVersion,
    AggregateType,
    EventId,
    EventType,
    SchemaVersion,
    OccurredAt,
    Deleted,
    BaseVersion,
    Payload,
}

/// One step below the payload: an object key, which is also an array index when numeric.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    name: String,
    index: Option<usize>,
}

/// A dotted envelope path (`aggregateId`, `payload.address.city`), parsed once so that
/// looking it up per event neither splits nor compares member names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopePath {
    root: Member,
    steps: Vec<Step>,
}

impl EnvelopePath {
    /// Parses a path; `None` when it does not start with an envelope member.
    pub fn parse(path: &str) -> Option<Self> {
        let mut parts = path.split('.');
        let root = match parts.next()? {
            "aggregateId" => Member::AggregateId,
            "aggregateVersion" => Member::AggregateVersion,
            "aggregateType" => Member::AggregateType,
            "eventId" => Member::EventId,
            "eventType" => Member::EventType,
            "schemaVersion" => Member::SchemaVersion,
            "occurredAt" => Member::OccurredAt,
            "deleted" => Member::Deleted,
            "baseVersion" => Member::BaseVersion,
            "payload" => Member::Payload,
            _ => return None,
        };
        let steps = parts
            .map(|name| Step {
                name: name.to_string(),
                index: name.parse().ok(),
            })
            .collect();
        Some(EnvelopePath { root, steps })
    }

    /// The payload member the path reads (`payload.address.city` reads `address`); `None`
    /// for paths outside the payload and for the whole payload.
    pub fn payload_member(&self) -> Option<&str> {
        match self.root {
            Member::Payload => self.steps.first().map(|s| s.name.as_str()),
            _ => None,
        }
    }

    /// Whether the path is the whole payload.
    pub fn is_whole_payload(&self) -> bool {
        self.root == Member::Payload && self.steps.is_empty()
    }
}

/// Formats a timestamp as RFC 3339 UTC, the wire form of `occurredAt`.
pub fn format_timestamp(ts: OffsetDateTime) -> String {
    ts.checked_to_offset(time::UtcOffset::UTC)
        .and_then(|utc| utc.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Follows a dotted path through nested JSON objects (and array indexes).
pub fn json_path<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    let mut current = root;
    for part in path.split('.') {
        current = match current {
            Value::Object(map) => map.get(part)?,
            Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// Where each envelope member lives in a body: dotted paths, canonical names by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnvelopeKeys {
    /// Path of the schema version.
    pub schema_version: String,
    /// Path of the event id.
    pub event_id: String,
    /// Path of the event type.
    pub event_type: String,
    /// Path of the commit timestamp (RFC 3339, ISO 8601 without offset as UTC, or Unix millis).
    pub occurred_at: String,
    /// Path of the aggregate type.
    pub aggregate_type: String,
    /// Path of the aggregate id (string or integer).
    pub aggregate_id: String,
    /// Path of the aggregate version (non-negative integer).
    pub aggregate_version: String,
    /// Path of the payload (the full state).
    pub payload: String,
    /// Path of the tombstone flag.
    pub deleted: String,
    /// Path of the base version of a delta (non-negative integer, below the aggregate version).
    pub base_version: String,
}

impl Default for EnvelopeKeys {
    fn default() -> Self {
        EnvelopeKeys {
            schema_version: "schemaVersion".into(),
            event_id: "eventId".into(),
            event_type: "eventType".into(),
            occurred_at: "occurredAt".into(),
            aggregate_type: "aggregateType".into(),
            aggregate_id: "aggregateId".into(),
            aggregate_version: "aggregateVersion".into(),
            payload: "payload".into(),
            deleted: "deleted".into(),
            base_version: "baseVersion".into(),
        }
    }
}

/// Why a decoded body is not a valid envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The body is not an object.
    #[error("body is not an object")]
    NotAnObject,
    /// A required key is absent or null.
    #[error("missing {member} (key `{key}`)")]
    Missing {
        /// Envelope member.
        member: &'static str,
        /// Configured key path.
        key: String,
    },
    /// A key holds a value of the wrong kind.
    #[error("{member} (key `{key}`) {problem}, got {got}")]
    Invalid {
        /// Envelope member.
        member: &'static str,
        /// Configured key path.
        key: String,
        /// What is wrong.
        problem: &'static str,
        /// The offending value, shortened.
        got: String,
    },
    /// The payload is neither an object nor null: it cannot be an entity's state.
    #[error("payload (key `{key}`) must be an object or null, got {found}")]
    PayloadNotAnObject {
        /// Configured key path.
        key: String,
        /// The JSON type found, with its article (`an array`).
        found: &'static str,
    },
}

/// The envelope members of one body, found but not yet validated.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Members {
    /// `schemaVersion`.
    pub schema_version: Option<Value>,
    /// `eventId`.
    pub event_id: Option<Value>,
    /// `eventType`.
    pub event_type: Option<Value>,
    /// `occurredAt`.
    pub occurred_at: Option<Value>,
    /// `aggregateType`.
    pub aggregate_type: Option<Value>,
    /// `aggregateId`.
    pub aggregate_id: Option<Value>,
    /// `aggregateVersion`.
    pub aggregate_version: Option<Value>,
    /// `payload`.
    pub payload: Option<Value>,
    /// `deleted`.
    pub deleted: Option<Value>,
    /// `baseVersion`.
    pub base_version: Option<Value>,
}

impl EnvelopeKeys {
    /// Whether this mapping is the canonical one (bodies can then be read without a mapping).
    pub fn is_canonical(&self) -> bool {
        *self == EnvelopeKeys::default()
    }

    /// Reads an envelope out of a decoded body according to this mapping.
    pub fn read(&self, body: &Value) -> Result<Envelope, EnvelopeError> {
        self.read_owned(body.clone())
    }

    /// Like [`EnvelopeKeys::read`], moving the payload out of the body instead of copying it.
    pub fn read_owned(&self, body: Value) -> Result<Envelope, EnvelopeError> {
        if !body.is_object() {
            return Err(EnvelopeError::NotAnObject);
        }
        self.assemble(self.members(body))
    }

    /// Finds each member at its mapped path.
    pub fn members(&self, mut body: Value) -> Members {
        let get = |body: &Value, key: &str| json_path(body, key).cloned();
        let mut members = Members {
            schema_version: get(&body, &self.schema_version),
            event_id: get(&body, &self.event_id),
            event_type: get(&body, &self.event_type),
            occurred_at: get(&body, &self.occurred_at),
            aggregate_type: get(&body, &self.aggregate_type),
            aggregate_id: get(&body, &self.aggregate_id),
            aggregate_version: get(&body, &self.aggregate_version),
            payload: None,
            deleted: get(&body, &self.deleted),
            base_version: get(&body, &self.base_version),
        };
        // Taken last and moved, not copied: other members may live inside the payload.
        members.payload = take_path(&mut body, &self.payload);
        members
    }

    /// Validates members into an envelope; errors name the configured keys.
    pub fn assemble(&self, members: Members) -> Result<Envelope, EnvelopeError> {
        let present = |v: Option<Value>| v.filter(|v| !v.is_null());
        let invalid = |member: &'static str, key: &str, problem: &'static str, got: &Value| {
            EnvelopeError::Invalid {
                member,
                key: key.to_string(),
                problem,
                got: shorten(got),
            }
        };
        let aggregate_id = match present(members.aggregate_id) {
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(other) => {
                return Err(invalid(
                    "aggregateId",
                    &self.aggregate_id,
                    "must be a non-empty string or an integer",
                    &other,
                ));
            }
            None => return Err(missing("aggregateId", &self.aggregate_id)),
        };
        let aggregate_version = match present(members.aggregate_version) {
            Some(Value::Number(n)) if n.is_u64() => n.as_u64().unwrap_or_default(),
            Some(other) => {
                return Err(invalid(
                    "aggregateVersion",
                    &self.aggregate_version,
                    "must be a non-negative integer",
                    &other,
                ));
            }
            None => return Err(missing("aggregateVersion", &self.aggregate_version)),
        };
        let base_version = match present(members.base_version) {
            None => None,
            Some(Value::Number(n)) if n.as_u64().is_some_and(|b| b < aggregate_version) => {
                n.as_u64()
            }
            Some(other) => {
                return Err(invalid(
                    "baseVersion",
                    &self.base_version,
                    "must be a non-negative integer below aggregateVersion",
                    &other,
                ));
            }
        };
        let occurred_at = match present(members.occurred_at) {
            None => None,
            Some(v) => Some(parse_timestamp(&v).ok_or_else(|| {
                invalid(
                    "occurredAt",
                    &self.occurred_at,
                    "must be an RFC 3339 timestamp or Unix milliseconds",
                    &v,
                )
            })?),
        };
        let deleted = match present(members.deleted) {
            None => false,
            Some(Value::Bool(b)) => b,
            Some(other) => {
                return Err(invalid(
                    "deleted",
                    &self.deleted,
                    "must be a boolean",
                    &other,
                ));
            }
        };
        let optional_string =
            |member: &'static str, key: &str, value: Option<Value>| match present(value) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(Value::Number(n)) => Ok(Some(n.to_string())),
                Some(other) => Err(invalid(member, key, "must be a string", &other)),
            };
        let schema_version = match present(members.schema_version) {
            None => None,
            Some(Value::Number(n)) if n.is_i64() => n.as_i64(),
            Some(other) => {
                return Err(invalid(
                    "schemaVersion",
                    &self.schema_version,
                    "must be an integer",
                    &other,
                ));
            }
        };
        // An array or a scalar written as the new state would replace the entity by an empty
        // row: refused here, so it is dead-lettered and the replica keeps its last state.
        let payload = match present(members.payload) {
            None => None,
            Some(Value::Object(map)) => Some(Value::Object(map)),
            Some(other) => {
                return Err(EnvelopeError::PayloadNotAnObject {
                    key: self.payload.clone(),
                    found: json_type(&other),
                });
            }
        };
        Ok(Envelope {
            schema_version,
            event_id: optional_string("eventId", &self.event_id, members.event_id)?,
            event_type: optional_string("eventType", &self.event_type, members.event_type)?,
            occurred_at,
            aggregate_type: optional_string(
                "aggregateType",
                &self.aggregate_type,
                members.aggregate_type,
            )?,
            aggregate_id,
            aggregate_version,
            base_version,
            payload,
            deleted,
        })
    }
}

/// Moves the value at a dotted path out of `root`, leaving null behind.
fn take_path(root: &mut Value, path: &str) -> Option<Value> {
    let mut current = root;
    for part in path.split('.') {
        current = match current {
            Value::Object(map) => map.get_mut(part)?,
            Value::Array(items) => items.get_mut(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current.take())
}

/// The JSON type of a value, with its article, for messages (`an array`, `null`).
pub fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn missing(member: &'static str, key: &str) -> EnvelopeError {
    EnvelopeError::Missing {
        member,
        key: key.to_string(),
    }
}

fn shorten(value: &Value) -> String {
    let text = value.to_string();
    if text.len() <= 64 {
        text
    } else {
        let cut: String = text.chars().take(61).collect();
        format!("{cut}...")
    }
}

/// Parses RFC 3339, ISO 8601 without an offset (taken as UTC, as Python's `isoformat()` writes
/// it), or an integer of Unix milliseconds.
pub fn parse_timestamp(value: &Value) -> Option<OffsetDateTime> {
    // Only instants that exist in UTC (a year-9999 time with a negative offset does not).
    parse_any_offset(value)?.checked_to_offset(time::UtcOffset::UTC)
}

fn parse_any_offset(value: &Value) -> Option<OffsetDateTime> {
    match value {
        Value::String(s) => OffsetDateTime::parse(s, &Rfc3339).ok().or_else(|| {
            let naive = time::PrimitiveDateTime::parse(
                s,
                &time::format_description::well_known::Iso8601::DEFAULT,
            )
            .ok()?;
            Some(naive.assume_utc())
        }),
        Value::Number(n) => {
            let millis = n.as_i64()?;
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_envelope_reads_with_default_keys() {
        let body = json!({
            "schemaVersion": 1, "eventId": "e-1", "eventType": "athlete.updated",
            "occurredAt": "2026-11-24T10:00:00Z", "aggregateType": "athlete",
            "aggregateId": "ath-1", "aggregateVersion": 7,
            "payload": {"displayName": "Ada", "status": "active"}
        });
        let env = EnvelopeKeys::default().read(&body).unwrap();
        assert_eq!(env.aggregate_id, "ath-1");
        assert_eq!(env.aggregate_version, 7);
        assert!(!env.is_tombstone());
        assert_eq!(env.lookup("payload.displayName"), Some(json!("Ada")));
        assert_eq!(
            env.lookup("occurredAt"),
            Some(json!("2026-11-24T10:00:00Z"))
        );
        // The serialized form is the same wire shape.
        let back: Envelope = serde_json::from_value(env.to_value()).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn seed_python_shape_reads_with_a_mapping() {
        let keys = EnvelopeKeys {
            event_id: "event_id".into(),
            event_type: "event_type".into(),
            aggregate_id: "customer_id".into(),
            aggregate_version: "version".into(),
            occurred_at: "timestamp".into(),
            deleted: "is_deleted".into(),
            ..EnvelopeKeys::default()
        };
        let body = json!({"event_id": "evt-3", "event_type": "CUSTOMER_UPDATED", "customer_id": "C-001",
            "payload": null, "timestamp": "2024-05-01T12:00:00.123456", "version": 3, "is_deleted": true});
        let env = keys.read(&body).unwrap();
        assert_eq!(env.aggregate_id, "C-001");
        assert!(env.is_tombstone());
        assert_eq!(env.occurred_at.unwrap().unix_timestamp(), 1_714_564_800);
    }

    #[test]
    fn invalid_versions_are_named() {
        let keys = EnvelopeKeys::default();
        for bad in [json!(-1), json!(1.5), json!("7")] {
            let err = keys
                .read(&json!({"aggregateId": "a", "aggregateVersion": bad}))
                .unwrap_err();
            assert!(
                err.to_string().starts_with(
                    "aggregateVersion (key `aggregateVersion`) must be a non-negative integer"
                ),
                "{err}"
            );
        }
        let err = keys.read(&json!({"aggregateId": "a"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing aggregateVersion (key `aggregateVersion`)"
        );
        assert_eq!(
            keys.read(&json!([1])).unwrap_err(),
            EnvelopeError::NotAnObject
        );
    }

    #[test]
    fn timestamps_outside_utc_range_are_invalid_not_a_panic() {
        let err = EnvelopeKeys::default()
            .read(&json!({"aggregateId": "a", "aggregateVersion": 1, "occurredAt": "9999-12-31T23:30:00-01:00"}))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("occurredAt (key `occurredAt`) must be"),
            "{err}"
        );
    }

    #[test]
    fn integer_ids_and_unix_millis_are_accepted() {
        let env = EnvelopeKeys::default()
            .read(&json!({"aggregateId": 42, "aggregateVersion": 0, "occurredAt": 1_700_000_000_000i64, "payload": {}}))
            .unwrap();
        assert_eq!(env.aggregate_id, "42");
        assert_eq!(env.occurred_at.unwrap().unix_timestamp(), 1_700_000_000);
    }

    #[test]
    fn a_payload_must_be_an_object_or_null() {
        let keys = EnvelopeKeys::default();
        for (payload, found) in [
            (json!([1, 2]), "an array"),
            (json!("state"), "a string"),
            (json!(3), "a number"),
            (json!(true), "a boolean"),
        ] {
            for deleted in [false, true] {
                let err = keys
                    .read(&json!({"aggregateId": "a", "aggregateVersion": 2, "payload": payload, "deleted": deleted}))
                    .unwrap_err();
                assert_eq!(
                    err.to_string(),
                    format!("payload (key `payload`) must be an object or null, got {found}")
                );
            }
        }
        // A mapped payload key is named as configured.
        let mapped = EnvelopeKeys {
            payload: "data".into(),
            ..EnvelopeKeys::default()
        };
        let err = mapped
            .read(&json!({"aggregateId": "a", "aggregateVersion": 2, "data": []}))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "payload (key `data`) must be an object or null, got an array"
        );
        // Null, absent and objects are fine; null and absent are tombstones.
        for body in [
            json!({"aggregateId": "a", "aggregateVersion": 2, "payload": null}),
            json!({"aggregateId": "a", "aggregateVersion": 2, "deleted": true}),
        ] {
            assert!(keys.read(&body).unwrap().is_tombstone());
        }
        let env = keys
            .read(&json!({"aggregateId": "a", "aggregateVersion": 2, "payload": {}}))
            .unwrap();
        assert!(!env.is_tombstone());
    }

    #[test]
    fn a_base_version_reads_with_default_and_mapped_keys() {
        let keys = EnvelopeKeys::default();
        let env = keys
            .read(&json!({"aggregateId": "a", "aggregateVersion": 5, "baseVersion": 4, "payload": {"name": null}}))
            .unwrap();
        assert_eq!(env.base_version, Some(4));
        assert_eq!(env.lookup("baseVersion"), Some(json!(4)));
        let back: Envelope = serde_json::from_value(env.to_value()).unwrap();
        assert_eq!(back, env);
        // Absent: a full-state event, and the canonical form does not grow a key.
        let full = keys
            .read(&json!({"aggregateId": "a", "aggregateVersion": 5, "payload": {}}))
            .unwrap();
        assert_eq!(full.base_version, None);
        assert!(
            !full
                .to_value()
                .as_object()
                .unwrap()
                .contains_key("baseVersion")
        );
        let mapped = EnvelopeKeys {
            aggregate_version: "version".into(),
            base_version: "meta.previous_version".into(),
            ..EnvelopeKeys::default()
        };
        let env = mapped
            .read(&json!({"aggregateId": "a", "version": 9, "meta": {"previous_version": 7}, "payload": {}}))
            .unwrap();
        assert_eq!(env.base_version, Some(7));
        for bad in [json!(-1), json!("4"), json!(1.5), json!(9), json!(10)] {
            let err = mapped
                .read(&json!({"aggregateId": "a", "version": 9, "meta": {"previous_version": bad}}))
                .unwrap_err();
            assert!(
                err.to_string().starts_with(
                    "baseVersion (key `meta.previous_version`) must be a non-negative integer below aggregateVersion"
                ),
                "{err}"
            );
        }
    }
}

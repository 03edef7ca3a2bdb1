//! Decoding only the payload members a pipeline reads: the others are skipped by the parser
//! instead of being built into values and dropped again.

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::envelope::Members;

/// Which top-level payload members a decode keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PayloadSelection {
    /// Every member (something reads the payload whole).
    #[default]
    All,
    /// Only these members.
    Only(BTreeSet<String>),
}

impl PayloadSelection {
    /// No member at all (the payload is still decoded as an object, empty, or as null).
    pub fn nothing() -> Self {
        PayloadSelection::Only(BTreeSet::new())
    }

    /// These members.
    pub fn only<I: IntoIterator<Item = S>, S: Into<String>>(members: I) -> Self {
        PayloadSelection::Only(members.into_iter().map(Into::into).collect())
    }

    /// What either selection keeps.
    pub fn union(self, other: PayloadSelection) -> Self {
        match (self, other) {
            (PayloadSelection::Only(mut a), PayloadSelection::Only(b)) => {
                a.extend(b);
                PayloadSelection::Only(a)
            }
            _ => PayloadSelection::All,
        }
    }

    fn keeps(&self, member: &str) -> bool {
        match self {
            PayloadSelection::All => true,
            PayloadSelection::Only(members) => members.contains(member),
        }
    }
}

/// Reads a body's envelope members, keeping only the selected payload members.
pub(crate) struct MembersSeed<'s> {
    pub(crate) payload: &'s PayloadSelection,
}

impl<'de> DeserializeSeed<'de> for MembersSeed<'_> {
    type Value = Members;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Members, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MembersSeed<'_> {
    type Value = Members;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event envelope (an object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
        let mut members = Members::default();
        while let Some(key) = map.next_key::<MemberKey>()? {
            let slot = match key {
                MemberKey::Payload => {
                    if members.payload.is_some() {
                        return Err(de::Error::duplicate_field("payload"));
                    }
                    members.payload = Some(map.next_value_seed(PayloadSeed {
                        selection: self.payload,
                    })?);
                    continue;
                }
                MemberKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                MemberKey::SchemaVersion => &mut members.schema_version,
                MemberKey::EventId => &mut members.event_id,
                MemberKey::EventType => &mut members.event_type,
                MemberKey::OccurredAt => &mut members.occurred_at,
                MemberKey::AggregateType => &mut members.aggregate_type,
                MemberKey::AggregateId => &mut members.aggregate_id,
                MemberKey::AggregateVersion => &mut members.aggregate_version,
                MemberKey::Deleted => &mut members.deleted,
                MemberKey::BaseVersion => &mut members.base_version,
                MemberKey::PayloadRef => &mut members.payload_ref,
            };
            if slot.is_some() {
                return Err(de::Error::duplicate_field(key.name()));
            }
            *slot = Some(map.next_value()?);
        }
        Ok(members)
    }
}

/// A top-level key of a body.
#[derive(Clone, Copy)]
enum MemberKey {
    SchemaVersion,
    EventId,
    EventType,
    OccurredAt,
    AggregateType,
    AggregateId,
    AggregateVersion,
    Payload,
    Deleted,
    BaseVersion,
    PayloadRef,
    Other,
}

impl MemberKey {
    fn of(name: &[u8]) -> Self {
        match name {
            b"schemaVersion" => MemberKey::SchemaVersion,
            b"eventId" => MemberKey::EventId,
            b"eventType" => MemberKey::EventType,
            b"occurredAt" => MemberKey::OccurredAt,
            b"aggregateType" => MemberKey::AggregateType,
            b"aggregateId" => MemberKey::AggregateId,
            b"aggregateVersion" => MemberKey::AggregateVersion,
            b"payload" => MemberKey::Payload,
            b"deleted" => MemberKey::Deleted,
            b"baseVersion" => MemberKey::BaseVersion,
            b"payloadRef" => MemberKey::PayloadRef,
            _ => MemberKey::Other,
        }
    }

    fn name(self) -> &'static str {
        match self {
            MemberKey::SchemaVersion => "schemaVersion",
            MemberKey::EventId => "eventId",
            MemberKey::EventType => "eventType",
            MemberKey::OccurredAt => "occurredAt",
            MemberKey::AggregateType => "aggregateType",
            MemberKey::AggregateId => "aggregateId",
            MemberKey::AggregateVersion => "aggregateVersion",
            MemberKey::Payload => "payload",
            MemberKey::Deleted => "deleted",
            MemberKey::BaseVersion => "baseVersion",
            MemberKey::PayloadRef => "payloadRef",
            MemberKey::Other => "",
        }
    }
}

impl<'de> de::Deserialize<'de> for MemberKey {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_identifier(MemberKeyVisitor)
    }
}

struct MemberKeyVisitor;

impl Visitor<'_> for MemberKeyVisitor {
    type Value = MemberKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<MemberKey, E> {
        Ok(MemberKey::of(name.as_bytes()))
    }

    fn visit_bytes<E: de::Error>(self, name: &[u8]) -> Result<MemberKey, E> {
        Ok(MemberKey::of(name))
    }

    // MessagePack maps may have keys of any type; those are never envelope members.
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<MemberKey, E> {
        Ok(MemberKey::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<MemberKey, E> {
        Ok(MemberKey::Other)
    }
}

/// The payload as a value: an object keeps only the selected members; anything else is kept
/// whole, so that a payload of the wrong type is still reported as what it is.
struct PayloadSeed<'s> {
    selection: &'s PayloadSelection,
}

impl<'de> DeserializeSeed<'de> for PayloadSeed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        match self.selection {
            PayloadSelection::All => de::Deserialize::deserialize(deserializer),
            PayloadSelection::Only(_) => deserializer.deserialize_any(self),
        }
    }
}

impl<'de> Visitor<'de> for PayloadSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a payload")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut kept = Map::new();
        while let Some(name) = map.next_key_seed(SelectedName {
            selection: self.selection,
        })? {
            match name {
                Some(name) => {
                    let value: Value = map.next_value()?;
                    kept.insert(name, value);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(kept))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_string()))
    }

    // As serde_json's own `Value` does, so a selection never changes what is accepted.
    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Value, E> {
        Err(de::Error::invalid_type(de::Unexpected::Bytes(b), &self))
    }
}

/// A payload member's name: `Some` when selected, `None` when it is to be skipped.
struct SelectedName<'s> {
    selection: &'s PayloadSelection,
}

impl<'de> DeserializeSeed<'de> for SelectedName<'_> {
    type Value = Option<String>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Option<String>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for SelectedName<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Option<String>, E> {
        Ok(self.selection.keeps(name).then(|| name.to_string()))
    }

    fn visit_bytes<E: de::Error>(self, name: &[u8]) -> Result<Option<String>, E> {
        match std::str::from_utf8(name) {
            Ok(name) => self.visit_str(name),
            Err(_) => Err(de::Error::invalid_value(
                de::Unexpected::Bytes(name),
                &"a UTF-8 member name",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{BodyLimits, ContentType, decode_members, encode_body};
    use serde_json::json;

    fn body() -> Value {
        json!({"aggregateId": "a-1", "aggregateVersion": 4, "occurredAt": "2026-11-24T10:00:00Z",
               "extra": {"deep": [1, 2]},
               "payload": {"name": "Ada", "status": "active", "address": {"city": "London"}, "n": null}})
    }

    #[test]
    fn only_selected_payload_members_are_kept_in_json_and_msgpack() {
        let selection = PayloadSelection::only(["name", "address", "n"]);
        for ct in [ContentType::Json, ContentType::MsgPack] {
            let bytes = encode_body(&body(), ct).unwrap();
            let members = decode_members(&bytes, ct, BodyLimits::default(), &selection).unwrap();
            assert_eq!(
                members.payload,
                Some(json!({"name": "Ada", "address": {"city": "London"}, "n": null}))
            );
            assert_eq!(members.aggregate_id, Some(json!("a-1")));
            assert_eq!(members.aggregate_version, Some(json!(4)));
            let all =
                decode_members(&bytes, ct, BodyLimits::default(), &PayloadSelection::All).unwrap();
            assert_eq!(all.payload, body().get("payload").cloned());
        }
    }

    #[test]
    fn a_payload_that_is_not_an_object_is_kept_as_it_is() {
        let selection = PayloadSelection::nothing();
        for payload in [
            json!([1, "x"]),
            json!("text"),
            json!(3),
            json!(true),
            json!(null),
        ] {
            let text = json!({"aggregateId": "a", "aggregateVersion": 1, "payload": payload});
            let bytes = serde_json::to_vec(&text).unwrap();
            let members =
                decode_members(&bytes, ContentType::Json, BodyLimits::default(), &selection)
                    .unwrap();
            assert_eq!(members.payload, Some(payload));
        }
    }

    #[test]
    fn duplicate_members_are_refused_as_before() {
        let bytes = br#"{"aggregateId": "a", "aggregateId": "b", "aggregateVersion": 1}"#;
        for selection in [PayloadSelection::All, PayloadSelection::nothing()] {
            let err = decode_members(bytes, ContentType::Json, BodyLimits::default(), &selection)
                .unwrap_err();
            assert!(
                err.to_string().contains("duplicate field `aggregateId`"),
                "{err}"
            );
        }
    }

    #[test]
    fn union_keeps_what_either_keeps() {
        let a = PayloadSelection::only(["x"]);
        assert_eq!(
            a.clone().union(PayloadSelection::only(["y"])),
            PayloadSelection::only(["x", "y"])
        );
        assert_eq!(a.union(PayloadSelection::All), PayloadSelection::All);
    }
}

//! What flows between stages, and what a batch reports besides its records.

use std::sync::Arc;
use std::time::Duration;

use ecst_schemas::Envelope;

use crate::dead_letter::DeadLetterReason;
use serde_json::{Map, Value};

/// One stream entry as read: its id and raw fields, kept for dead-lettering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    /// Stream entry id (`1700000000000-0`).
    pub id: String,
    /// Field/value pairs in stream order; values are raw bytes.
    pub fields: Vec<(String, Vec<u8>)>,
}

impl RawEntry {
    /// The value of a field, if present.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// What a sink does with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Replace the replica entry with the record's fields.
    Upsert,
    /// Remove the replica entry and remember the version for `keep_for`.
    Delete {
        /// How long the tombstone's version is remembered.
        keep_for: Duration,
    },
    /// Keep the replica entry, flagged deleted at the tombstone's version.
    Mark,
    /// Apply the record's fields as a patch (a value changes a field, a null removes it, an
    /// absent field is untouched), only where the replica holds exactly version `base`.
    Patch {
        /// The version the patch applies on top of.
        base: u64,
    },
}

/// Default retention of a delete's version when no `tombstone` stage sets one.
pub const DEFAULT_TOMBSTONE_KEEP_FOR: Duration = Duration::from_secs(7 * 86_400);

/// One decoded event on its way to the sinks.
#[derive(Debug, Clone)]
pub struct Record {
    /// Index of the source entry in the batch (its ack handle).
    pub entry: usize,
    /// The decoded event, shared between branches.
    pub event: Arc<Envelope>,
    /// Projected fields; `None` until a `project` stage ran (sinks then write the payload).
    pub fields: Option<Fields>,
    /// What sinks do with it.
    pub action: Action,
}

impl Record {
    /// A fresh record for a decoded event; tombstones default to `Delete`.
    pub fn new(entry: usize, event: Envelope) -> Self {
        let action = if event.is_tombstone() {
            Action::Delete {
                keep_for: DEFAULT_TOMBSTONE_KEEP_FOR,
            }
        } else {
            Action::Upsert
        };
        Record {
            entry,
            event: Arc::new(event),
            fields: None,
            action,
        }
    }
}

impl Record {
    /// The non-null fields an upsert writes: the projected ones, or the payload's members when
    /// nothing was projected.
    pub fn written_fields(&self) -> impl Iterator<Item = (&str, &Value)> {
        let (fields, payload) = match (&self.fields, &self.event.payload) {
            (Some(fields), _) => (Some(fields), None),
            (None, Some(Value::Object(payload))) => (None, Some(payload)),
            _ => (None, None),
        };
        let fields = fields.into_iter().flat_map(Fields::iter);
        let payload = payload
            .into_iter()
            .flatten()
            .filter(|(_, value)| !value.is_null())
            .map(|(name, value)| (name.as_str(), value));
        fields.chain(payload)
    }

    /// The fields a patch removes: the projected ones set to null, or the payload's null
    /// members when nothing was projected.
    pub fn removed_fields(&self) -> Vec<&str> {
        match (&self.fields, &self.event.payload) {
            (Some(fields), _) => fields.nulls().collect(),
            (None, Some(Value::Object(payload))) => payload
                .iter()
                .filter(|(_, value)| value.is_null())
                .map(|(name, _)| name.as_str())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The value an upsert writes to `name`, if any (null counts as none).
    pub fn written_field(&self, name: &str) -> Option<&Value> {
        match (&self.fields, &self.event.payload) {
            (Some(fields), _) => fields.get(name),
            (None, Some(Value::Object(payload))) => payload.get(name).filter(|v| !v.is_null()),
            _ => None,
        }
    }
}

/// The names of the fields a `project` stage writes, shared by every record it emits.
pub type FieldNames = Arc<[String]>;

/// The replica fields of a record, as a `project` stage made them.
#[derive(Debug, Clone, PartialEq)]
pub enum Fields {
    /// The same names for every record of the stage (a projection without `include`): one
    /// value per name, `None` where the event has none, so the replica has no such field.
    Fixed {
        /// The stage's field names.
        names: FieldNames,
        /// One value per name.
        values: Vec<Option<Value>>,
    },
    /// Names that vary by event (a projection with `include`); null values are not written.
    Map(Map<String, Value>),
}

impl Fields {
    /// No fields at all (deletes carry none).
    pub fn none() -> Self {
        Fields::Map(Map::new())
    }

    /// The non-null fields, by name.
    pub fn iter(&self) -> FieldsIter<'_> {
        match self {
            Fields::Fixed { names, values } => FieldsIter::Fixed(names.iter().zip(values.iter())),
            Fields::Map(map) => FieldsIter::Map(map.iter()),
        }
    }

    /// The value of field `name`, if it has a non-null one.
    pub fn get(&self, name: &str) -> Option<&Value> {
        match self {
            Fields::Fixed { names, values } => names
                .iter()
                .position(|n| n == name)
                .and_then(|i| values.get(i)?.as_ref())
                .filter(|v| !v.is_null()),
            Fields::Map(map) => map.get(name).filter(|v| !v.is_null()),
        }
    }

    /// The fields set to an explicit null (a patch removes them; an upsert does not write them).
    pub fn nulls(&self) -> impl Iterator<Item = &str> {
        let (fixed, map) = match self {
            Fields::Fixed { names, values } => (Some(names.iter().zip(values)), None),
            Fields::Map(map) => (None, Some(map.iter())),
        };
        let fixed = fixed
            .into_iter()
            .flatten()
            .filter(|(_, value)| matches!(value, Some(Value::Null)))
            .map(|(name, _)| name.as_str());
        let map = map
            .into_iter()
            .flatten()
            .filter(|(_, value)| value.is_null())
            .map(|(name, _)| name.as_str());
        fixed.chain(map)
    }

    /// The shared names of a fixed field set.
    pub fn fixed_names(&self) -> Option<&FieldNames> {
        match self {
            Fields::Fixed { names, .. } => Some(names),
            Fields::Map(_) => None,
        }
    }
}

/// The non-null fields of [`Fields`], by name.
#[derive(Debug)]
pub enum FieldsIter<'a> {
    /// Over a fixed set.
    Fixed(std::iter::Zip<std::slice::Iter<'a, String>, std::slice::Iter<'a, Option<Value>>>),
    /// Over a map.
    Map(serde_json::map::Iter<'a>),
}

impl<'a> Iterator for FieldsIter<'a> {
    type Item = (&'a str, &'a Value);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self {
                FieldsIter::Fixed(it) => {
                    if let (name, Some(value)) = it.next()?
                        && !value.is_null()
                    {
                        return Some((name.as_str(), value));
                    }
                }
                FieldsIter::Map(it) => {
                    let (name, value) = it.next()?;
                    if !value.is_null() {
                        return Some((name.as_str(), value));
                    }
                }
            }
        }
    }
}

/// Why an event was deliberately not written (it is still acked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not newer than a version already seen.
    Stale,
    /// A `where:` expression did not match.
    Filtered,
    /// A delete under `tombstone` `mode: ignore`.
    IgnoredDelete,
}

impl DropReason {
    /// Stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Stale => "stale",
            DropReason::Filtered => "filtered",
            DropReason::IgnoredDelete => "ignored_delete",
        }
    }
}

/// Side results of processing one batch: dead letters and deliberate drops.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Entries to dead-letter, by batch index, with the reason.
    pub dead_letters: Vec<(usize, DeadLetterReason)>,
    /// Entries dropped on purpose, by batch index.
    pub dropped: Vec<(usize, DropReason)>,
    /// Why the worker must stop before acking this batch (a stage met an entry it may
    /// neither pass nor dead-letter).
    pub halt: Option<String>,
}

impl Outcomes {
    /// Records that entry `entry` must go to the dead-letter stream.
    pub fn dead_letter(&mut self, entry: usize, reason: DeadLetterReason) {
        self.dead_letters.push((entry, reason));
    }

    /// Stops the worker before this batch is acked, saying why (the first reason wins).
    pub fn halt(&mut self, reason: String) {
        self.halt.get_or_insert(reason);
    }

    /// Records that entry `entry` was dropped on purpose.
    pub fn drop_entry(&mut self, entry: usize, reason: DropReason) {
        self.dropped.push((entry, reason));
    }
}

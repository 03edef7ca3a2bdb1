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
    pub fields: Option<Map<String, Value>>,
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
}

impl Outcomes {
    /// Records that entry `entry` must go to the dead-letter stream.
    pub fn dead_letter(&mut self, entry: usize, reason: DeadLetterReason) {
        self.dead_letters.push((entry, reason));
    }

    /// Records that entry `entry` was dropped on purpose.
    pub fn drop_entry(&mut self, entry: usize, reason: DropReason) {
        self.dropped.push((entry, reason));
    }
}

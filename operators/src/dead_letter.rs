//! Why an entry went to the dead-letter stream: a closed set of reasons, each with a stable
//! class that metrics label by, and a message for the person who reads the dead letter.

use std::fmt;

/// Why an entry was dead-lettered instead of applied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The entry is not a valid event (undecodable body, missing or malformed envelope key,
    /// a payload that is not an object, a payload its schema refuses).
    InvalidEvent(String),
    /// A stage refused the event's data (a `where:` expression that cannot be evaluated).
    StageRejected {
        /// What is wrong with the event.
        message: String,
    },
    /// A sink cannot write the record (a value that does not convert to its column type, a
    /// key that cannot be rendered). Checked for every sink of the pipeline before any of
    /// them applies, so that no replica takes a record another one refuses.
    SinkRejected {
        /// The sink's stage name.
        sink: String,
        /// What the sink said.
        message: String,
    },
    /// The store itself refused the record (a CHECK constraint, a foreign key) after other
    /// sinks of a fan-out may already have applied it.
    StoreRefused {
        /// The sink whose store refused.
        sink: String,
        /// What the store said.
        message: String,
        /// The sinks that did apply the record: their replicas now hold it, this one does not.
        applied_by: Vec<String>,
    },
    /// The entry was delivered more often than `max_deliveries`.
    MaxDeliveries {
        /// How often it was delivered.
        count: u64,
        /// The configured limit.
        max: u64,
    },
    /// The entry was trimmed from the stream while pending, before it was applied.
    Trimmed,
    /// A snapshot row (bootstrap, reconcile) is not a valid row.
    InvalidSnapshotRow(String),
    /// The `fetch` stage could not get a usable state for a thin event: the endpoint kept
    /// answering a version older than the event's, or a row it cannot use.
    Fetch(String),
}

impl DeadLetterReason {
    /// Every class, as the `reason` label of `ecst_events_dead_lettered_total` (documented in
    /// the README and used by the alert rules: a new class is a documented change).
    pub const CLASSES: &'static [&'static str] = &[
        "invalid_event",
        "sink_rejected",
        "max_deliveries",
        "trimmed",
        "snapshot",
        "fetch",
    ];

    /// The stable, bounded label of the reason's kind (`invalid_event`, `sink_rejected`, ...).
    pub fn class(&self) -> &'static str {
        match self {
            DeadLetterReason::InvalidEvent(_) | DeadLetterReason::StageRejected { .. } => {
                "invalid_event"
            }
            DeadLetterReason::SinkRejected { .. } | DeadLetterReason::StoreRefused { .. } => {
                "sink_rejected"
            }
            DeadLetterReason::MaxDeliveries { .. } => "max_deliveries",
            DeadLetterReason::Trimmed => "trimmed",
            DeadLetterReason::InvalidSnapshotRow(_) => "snapshot",
            DeadLetterReason::Fetch(_) => "fetch",
        }
    }

    /// Whether some replicas of a fan-out hold the record and others do not.
    pub fn is_divergent(&self) -> bool {
        matches!(self, DeadLetterReason::StoreRefused { applied_by, .. } if !applied_by.is_empty())
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadLetterReason::InvalidEvent(message) => f.write_str(message),
            DeadLetterReason::StageRejected { message } => f.write_str(message),
            DeadLetterReason::SinkRejected { sink, message } => {
                write!(f, "sink `{sink}`: {message}")
            }
            DeadLetterReason::StoreRefused {
                sink,
                message,
                applied_by,
            } => {
                write!(f, "sink `{sink}`: refused by the store: {message}")?;
                if !applied_by.is_empty() {
                    let names: Vec<String> = applied_by.iter().map(|s| format!("`{s}`")).collect();
                    write!(
                        f,
                        "; the replicas DIVERGE: already applied by sink {}",
                        names.join(", ")
                    )?;
                }
                Ok(())
            }
            DeadLetterReason::MaxDeliveries { count, max } => {
                write!(f, "delivered {count} times, over max_deliveries {max}")
            }
            DeadLetterReason::Trimmed => f.write_str("trimmed before applied"),
            DeadLetterReason::InvalidSnapshotRow(message) => f.write_str(message),
            DeadLetterReason::Fetch(message) => write!(f, "fetch: {message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_a_listed_class_and_a_readable_message() {
        let reasons = [
            DeadLetterReason::InvalidEvent("body is not JSON: expected value".into()),
            DeadLetterReason::StageRejected {
                message: "where: no such key: status".into(),
            },
            DeadLetterReason::SinkRejected {
                sink: "table".into(),
                message: "column `points`: cannot write \"twelve\" as bigint".into(),
            },
            DeadLetterReason::StoreRefused {
                sink: "table".into(),
                message: "violates check constraint".into(),
                applied_by: vec!["cache".into()],
            },
            DeadLetterReason::MaxDeliveries { count: 6, max: 5 },
            DeadLetterReason::Trimmed,
            DeadLetterReason::InvalidSnapshotRow("snapshot line is not JSON".into()),
            DeadLetterReason::Fetch("the endpoint answered version 3, the event is 5".into()),
        ];
        for reason in &reasons {
            assert!(
                DeadLetterReason::CLASSES.contains(&reason.class()),
                "{reason:?}"
            );
        }
        let classes: std::collections::HashSet<_> = reasons.iter().map(|r| r.class()).collect();
        assert_eq!(
            classes.len(),
            DeadLetterReason::CLASSES.len(),
            "every class is used"
        );
        assert_eq!(
            reasons[2].to_string(),
            "sink `table`: column `points`: cannot write \"twelve\" as bigint"
        );
        assert_eq!(
            reasons[3].to_string(),
            "sink `table`: refused by the store: violates check constraint; the replicas DIVERGE: already applied by sink `cache`"
        );
        assert!(reasons[3].is_divergent());
        assert!(!reasons[2].is_divergent());
        assert_eq!(
            reasons[4].to_string(),
            "delivered 6 times, over max_deliveries 5"
        );
    }
}

//! A batch planned for the statements: its records converted to cells, each key coalesced to
//! its newest version, and the key buckets it writes.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::Value;
use time::OffsetDateTime;

use super::config::{KeyColumn, PgType};
use super::locks;
use super::sql::StagedKind;
use super::values::{Cell, convert, convert_key_text};
use crate::record::{Action, FieldNames, Fields, Record};
use crate::stage::SinkReport;

/// What a planned row does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Write {
    /// A guarded upsert.
    Upsert,
    /// A guarded delete, remembered for this many milliseconds.
    Delete {
        /// The tombstone's retention.
        keep_ms: i64,
    },
    /// A guarded mark as deleted.
    Mark,
}

/// One record to write, converted.
#[derive(Debug)]
pub(super) struct Row<'a> {
    /// The record's entry in the batch.
    pub(super) entry: usize,
    /// What it does.
    pub(super) write: Write,
    /// The key columns' cells.
    pub(super) key: Vec<Cell<'a>>,
    /// The aggregate version.
    pub(super) version: i64,
    /// The event's `occurredAt`.
    pub(super) updated: Option<OffsetDateTime>,
    /// The value columns' cells (upserts only).
    pub(super) values: Vec<Cell<'a>>,
}

/// The rows of a batch, newest per key, in batch order, and the key buckets they write.
#[derive(Debug, Default)]
pub(super) struct Plan<'a> {
    /// The rows.
    pub(super) rows: Vec<Row<'a>>,
    /// The rows as the binary `COPY` of the staged table reads them.
    pub(super) copy: Vec<u8>,
    /// Rows per kind: upserts, deletes, marks.
    pub(super) counts: [usize; 3],
    /// The key buckets written, ascending.
    pub(super) buckets: Vec<i32>,
}

/// The binary `COPY` signature, flags and header extension length.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

impl Plan<'_> {
    /// Rows written, of every kind.
    pub(super) fn len(&self) -> usize {
        self.counts.iter().sum()
    }

    /// Rows of one kind.
    pub(super) fn count(&self, kind: StagedKind) -> usize {
        self.counts[kind as usize]
    }
}

impl Row<'_> {
    /// The staged kind of the row.
    pub(super) fn kind(&self) -> StagedKind {
        match self.write {
            Write::Upsert => StagedKind::Upsert,
            Write::Delete { .. } => StagedKind::Delete,
            Write::Mark => StagedKind::Mark,
        }
    }

    /// Appends the row as the staged table reads it: keys, kind, version, updated, keep_ms,
    /// values (NULL but for upserts).
    fn write_copy(&self, out: &mut Vec<u8>, value_columns: usize) -> Result<(), String> {
        let fields = i16::try_from(self.key.len() + 4 + value_columns)
            .map_err(|_| "too many columns for one row".to_string())?;
        out.extend_from_slice(&fields.to_be_bytes());
        for cell in &self.key {
            cell.write_copy_field(out)?;
        }
        out.extend_from_slice(&2i32.to_be_bytes());
        out.extend_from_slice(&(self.kind() as i16).to_be_bytes());
        Cell::Bigint(Some(self.version)).write_copy_field(out)?;
        Cell::Timestamptz(self.updated).write_copy_field(out)?;
        let keep_ms = match self.write {
            Write::Delete { keep_ms } => Some(keep_ms),
            Write::Upsert | Write::Mark => None,
        };
        Cell::Bigint(keep_ms).write_copy_field(out)?;
        match self.write {
            Write::Upsert => {
                for cell in &self.values {
                    cell.write_copy_field(out)?;
                }
            }
            Write::Delete { .. } | Write::Mark => {
                for _ in 0..value_columns {
                    out.extend_from_slice(&(-1i32).to_be_bytes());
                }
            }
        }
        Ok(())
    }
}

/// The columns a sink writes and where their values come from.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// Key columns.
    pub(super) keys: Vec<KeyColumn>,
    /// Value columns: name, type, source field.
    pub(super) values: Vec<(String, PgType, String)>,
}

/// Where each value column's field sits in a fixed field set: found once per set of names,
/// which a `project` stage shares between all its records.
struct FieldIndex {
    names: Option<FieldNames>,
    at: Vec<Option<usize>>,
}

impl Layout {
    /// The key columns' cells, or why the record has no usable key.
    pub(super) fn key_cells<'r>(&self, record: &'r Record) -> Result<Vec<Cell<'r>>, String> {
        let mut cells = Vec::with_capacity(self.keys.len());
        for key in &self.keys {
            let cell = if key.from == "aggregateId" {
                convert_key_text(&record.event.aggregate_id, key.pg_type)
            } else {
                match record.event.lookup(&key.from) {
                    None | Some(Value::Null) => {
                        return Err(format!(
                            "key column `{}`: `{}` is missing in the event",
                            key.column, key.from
                        ));
                    }
                    Some(value) => convert(Some(&value), key.pg_type).map(Cell::into_owned),
                }
            };
            cells.push(cell.map_err(|e| format!("key column `{}`: {e}", key.column))?);
        }
        Ok(cells)
    }

    /// The value columns' cells of an upsert, or the first that does not fit.
    pub(super) fn value_cells<'r>(&self, record: &'r Record) -> Result<Vec<Cell<'r>>, String> {
        self.values
            .iter()
            .map(|(column, t, from)| {
                convert(record.written_field(from), *t)
                    .map_err(|e| format!("column `{column}`: {e}"))
            })
            .collect()
    }

    fn indexed_value_cells<'r>(
        &self,
        index: &mut FieldIndex,
        record: &'r Record,
    ) -> Result<Vec<Cell<'r>>, String> {
        let Some(Fields::Fixed { names, values }) = &record.fields else {
            return self.value_cells(record);
        };
        if !index.names.as_ref().is_some_and(|n| Arc::ptr_eq(n, names)) {
            index.at = self
                .values
                .iter()
                .map(|(_, _, from)| names.iter().position(|n| n == from))
                .collect();
            index.names = Some(names.clone());
        }
        self.values
            .iter()
            .zip(&index.at)
            .map(|((column, t, _), at)| {
                let value = at.and_then(|i| values.get(i)).and_then(Option::as_ref);
                convert(value, *t).map_err(|e| format!("column `{column}`: {e}"))
            })
            .collect()
    }

    /// Plans a batch: records that cannot be written are rejected in `report`, and older
    /// versions of a key in the batch count as stale.
    pub(super) fn plan<'r>(&self, batch: &'r [Record], report: &mut SinkReport) -> Plan<'r> {
        let mut keyed: Vec<Option<Vec<Cell<'r>>>> = Vec::with_capacity(batch.len());
        for record in batch {
            match self.key_cells(record) {
                Ok(cells) => keyed.push(Some(cells)),
                Err(reason) => {
                    keyed.push(None);
                    report.rejected.push((record.entry, reason));
                }
            }
        }
        let mut newest: HashMap<&[Cell<'r>], usize> = HashMap::with_capacity(batch.len());
        for (i, key) in keyed.iter().enumerate() {
            let Some(key) = key else { continue };
            match newest.entry(key.as_slice()) {
                Entry::Vacant(slot) => {
                    slot.insert(i);
                }
                Entry::Occupied(mut slot) => {
                    report.stale += 1;
                    let version = |j: usize| batch[j].event.aggregate_version;
                    if version(*slot.get()) < version(i) {
                        slot.insert(i);
                    }
                }
            }
        }
        // In batch order, so that rows and rejections do not depend on hash order.
        let mut order: Vec<usize> = newest.into_values().collect();
        order.sort_unstable();
        let mut index = FieldIndex {
            names: None,
            at: Vec::new(),
        };
        let mut plan = Plan {
            copy: COPY_HEADER.to_vec(),
            ..Plan::default()
        };
        let mut buckets = BTreeSet::new();
        for i in order {
            let (Some(Some(key)), record) = (keyed.get_mut(i).map(Option::take), &batch[i]) else {
                continue;
            };
            let Ok(version) = i64::try_from(record.event.aggregate_version) else {
                report.rejected.push((record.entry, too_new(record)));
                continue;
            };
            let (write, values) = match record.action {
                Action::Upsert => match self.indexed_value_cells(&mut index, record) {
                    Ok(values) => (Write::Upsert, values),
                    Err(reason) => {
                        report.rejected.push((record.entry, reason));
                        continue;
                    }
                },
                Action::Delete { keep_for } => (
                    Write::Delete {
                        keep_ms: i64::try_from(keep_for.as_millis()).unwrap_or(i64::MAX),
                    },
                    Vec::new(),
                ),
                Action::Mark => (Write::Mark, Vec::new()),
            };
            let row = Row {
                entry: record.entry,
                write,
                key,
                version,
                updated: record.event.occurred_at,
                values,
            };
            let start = plan.copy.len();
            if let Err(reason) = row.write_copy(&mut plan.copy, self.values.len()) {
                plan.copy.truncate(start);
                report.rejected.push((record.entry, reason));
                continue;
            }
            buckets.insert(locks::bucket_of(&row.key));
            plan.counts[row.kind() as usize] += 1;
            plan.rows.push(row);
        }
        plan.copy.extend_from_slice(&(-1i16).to_be_bytes());
        plan.buckets = buckets.into_iter().collect();
        plan
    }
}

/// Why a record's version cannot be written.
pub(super) fn too_new(record: &Record) -> String {
    format!(
        "aggregateVersion {} does not fit the bigint version column",
        record.event.aggregate_version
    )
}

//! A batch planned for the statements: its records converted to cells, each key coalesced to
//! its newest version, and the key buckets it writes.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::Value;
use tokio_postgres::types::ToSql;

use super::config::{KeyColumn, PgType};
use super::locks;
use super::patch::PatchRow;
use super::values::{Cell, Column, convert, convert_key_text};
use crate::record::{Action, FieldNames, Fields, Record};
use crate::stage::SinkReport;

/// Rows of one kind of write, as typed column arrays.
#[derive(Debug)]
pub(super) struct Rows<'a> {
    /// The rows' entries in the batch.
    pub(super) entries: Vec<usize>,
    /// One array per column.
    pub(super) columns: Vec<Column<'a>>,
}

impl<'a> Rows<'a> {
    /// No rows, for columns of these types.
    pub(super) fn new(types: impl Iterator<Item = PgType>) -> Self {
        Rows {
            entries: Vec::new(),
            columns: types.map(Column::new).collect(),
        }
    }

    /// Appends a row: one cell per column, in column order.
    pub(super) fn push(&mut self, entry: usize, cells: impl IntoIterator<Item = Cell<'a>>) {
        self.entries.push(entry);
        for (column, cell) in self.columns.iter_mut().zip(cells) {
            column.push(cell);
        }
    }

    /// The arrays to bind, in column order.
    pub(super) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.columns.iter().map(Column::as_param).collect()
    }
}

/// A batch split into the three statements' rows, newest per key, in batch order, the patches
/// in version order, and the key buckets they write.
#[derive(Debug)]
pub(super) struct Plan<'a> {
    /// Guarded upserts: keys, version, updated_at, value columns.
    pub(super) upserts: Rows<'a>,
    /// Guarded deletes: keys, version, keep_for in milliseconds.
    pub(super) deletes: Rows<'a>,
    /// Guarded marks: keys, version, updated_at.
    pub(super) marks: Rows<'a>,
    /// Patches, every one (a patch is not coalesced: each builds on the one before), in
    /// version order, applied after the rows above.
    pub(super) patches: Vec<PatchRow<'a>>,
    /// The key buckets written, ascending.
    pub(super) buckets: Vec<i32>,
}

impl Plan<'_> {
    /// Rows of every kind but patches.
    pub(super) fn len(&self) -> usize {
        self.upserts.entries.len() + self.deletes.entries.len() + self.marks.entries.len()
    }

    /// Whether nothing is to be written.
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0 && self.patches.is_empty()
    }
}

/// A patch's changed value columns (index, type, cell) and removed ones (index).
pub(super) type PatchCells<'r> = (Vec<(usize, PgType, Cell<'r>)>, Vec<usize>);

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

    /// A patch's changed value columns (index, type, cell) and removed ones (index), or the
    /// first changed value that does not fit. Columns the patch does not name are untouched.
    pub(super) fn patch_cells<'r>(&self, record: &'r Record) -> Result<PatchCells<'r>, String> {
        let removed_names = record.removed_fields();
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        for (i, (column, t, from)) in self.values.iter().enumerate() {
            if let Some(value) = record.written_field(from) {
                let cell =
                    convert(Some(value), *t).map_err(|e| format!("column `{column}`: {e}"))?;
                changed.push((i, *t, cell));
            } else if removed_names.contains(&from.as_str()) {
                removed.push(i);
            }
        }
        Ok((changed, removed))
    }

    /// As `value_cells`, finding where a fixed field set holds each column's field once per
    /// set of names rather than once per record.
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
        let mut patches = Vec::new();
        for (i, key) in keyed.iter().enumerate() {
            let Some(key) = key else { continue };
            if matches!(batch[i].action, Action::Patch { .. }) {
                patches.push(i);
                continue;
            }
            match newest.entry(key.as_slice()) {
                Entry::Vacant(slot) => {
                    slot.insert(i);
                }
                Entry::Occupied(mut slot) => {
                    report.stale += 1;
                    let version = |j: usize| batch[j].event.aggregate_version;
                    let older = if version(*slot.get()) < version(i) {
                        slot.insert(i)
                    } else {
                        i
                    };
                    report.stale_entries.push(batch[older].entry);
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
        let key_types = || self.keys.iter().map(|k| k.pg_type);
        let mut plan = Plan {
            upserts: Rows::new(
                key_types()
                    .chain([PgType::Bigint, PgType::Timestamptz])
                    .chain(self.values.iter().map(|v| v.1)),
            ),
            deletes: Rows::new(key_types().chain([PgType::Bigint, PgType::Bigint])),
            marks: Rows::new(key_types().chain([PgType::Bigint, PgType::Timestamptz])),
            patches: Vec::new(),
            buckets: Vec::new(),
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
            let bucket = locks::bucket_of(&key);
            let version = Cell::Bigint(Some(version));
            let updated = Cell::Timestamptz(record.event.occurred_at);
            match record.action {
                Action::Upsert => match self.indexed_value_cells(&mut index, record) {
                    Ok(values) => {
                        let meta = [version, updated];
                        plan.upserts
                            .push(record.entry, key.into_iter().chain(meta).chain(values));
                    }
                    Err(reason) => {
                        report.rejected.push((record.entry, reason));
                        continue;
                    }
                },
                Action::Delete { keep_for } => {
                    let keep_ms = i64::try_from(keep_for.as_millis()).unwrap_or(i64::MAX);
                    let meta = [version, Cell::Bigint(Some(keep_ms))];
                    plan.deletes.push(record.entry, key.into_iter().chain(meta));
                }
                Action::Mark => {
                    plan.marks
                        .push(record.entry, key.into_iter().chain([version, updated]));
                }
                // Planned below, in version order.
                Action::Patch { .. } => continue,
            }
            buckets.insert(bucket);
        }
        // Stable: patches of one version keep their batch order.
        patches.sort_by_key(|&i| batch[i].event.aggregate_version);
        for i in patches {
            let (Some(Some(key)), record) = (keyed.get_mut(i).map(Option::take), &batch[i]) else {
                continue;
            };
            let Action::Patch { base } = record.action else {
                continue;
            };
            let version = record.event.aggregate_version;
            let (Ok(v), Ok(b)) = (i64::try_from(version), i64::try_from(base)) else {
                report.rejected.push((record.entry, too_new(record)));
                continue;
            };
            let (changed, removed) = match self.patch_cells(record) {
                Ok(cells) => cells,
                Err(reason) => {
                    report.rejected.push((record.entry, reason));
                    continue;
                }
            };
            buckets.insert(locks::bucket_of(&key));
            let meta = [
                Cell::Bigint(Some(v)),
                Cell::Bigint(Some(b)),
                Cell::Timestamptz(record.event.occurred_at),
            ];
            plan.patches.push(PatchRow::new(
                record.entry,
                version,
                key,
                key_types(),
                meta,
                changed,
                removed,
            ));
        }
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

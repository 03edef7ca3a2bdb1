//! Patches (records of a `delta` stage): one guarded statement each, which applies the patch
//! only where the row holds exactly its base version (or, for an absent row, where the base is
//! the tombstone's version or 0), and otherwise reads the stored version so that the sink can
//! tell a stale patch from a gap. Same semantics as the Redis sink's `delta.lua`.

use tokio_postgres::Transaction;
use tokio_postgres::types::ToSql;

use super::config::{PgType, PostgresConfig, quote};
use super::sql::{array_type, select_cast};
use super::values::{Cell, Column};

/// One planned patch, its values bound as one-element arrays (the sink's one way of binding).
#[derive(Debug)]
pub(super) struct PatchRow<'a> {
    /// The record's entry in the batch.
    pub(super) entry: usize,
    /// The patch's version (it is applied in version order).
    pub(super) version: u64,
    /// Keys, version, base, updated_at, then the changed columns' values.
    pub(super) params: Vec<Column<'a>>,
    /// Value columns the patch changes (indexes into the sink's value columns).
    pub(super) changed: Vec<usize>,
    /// Value columns the patch removes: set to NULL.
    pub(super) removed: Vec<usize>,
}

impl<'a> PatchRow<'a> {
    /// A patch row; `changed` pairs a value column's index with its cell.
    pub(super) fn new(
        entry: usize,
        version: u64,
        keys: Vec<Cell<'a>>,
        key_types: impl Iterator<Item = PgType>,
        meta: [Cell<'a>; 3],
        changed: Vec<(usize, PgType, Cell<'a>)>,
        removed: Vec<usize>,
    ) -> Self {
        let one = |t: PgType, cell: Cell<'a>| {
            let mut column = Column::new(t);
            column.push(cell);
            column
        };
        let [v, base, updated] = meta;
        let mut params: Vec<Column<'a>> = key_types.zip(keys).map(|(t, c)| one(t, c)).collect();
        params.push(one(PgType::Bigint, v));
        params.push(one(PgType::Bigint, base));
        params.push(one(PgType::Timestamptz, updated));
        let mut columns = Vec::with_capacity(changed.len());
        for (column, t, cell) in changed {
            params.push(one(t, cell));
            columns.push(column);
        }
        PatchRow {
            entry,
            version,
            params,
            changed: columns,
            removed,
        }
    }
}

/// What became of one patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PatchOutcome {
    /// Written.
    Applied,
    /// The replica holds its version or a newer one.
    Stale,
    /// The replica is older than its base: a version is missing.
    Gap,
}

/// Builds a patch's statement from the sink's quoted identifiers.
#[derive(Debug, Clone)]
pub(super) struct PatchSql {
    table: String,
    tombstones: String,
    /// Key columns: quoted name and type.
    keys: Vec<(String, PgType)>,
    /// Value columns: quoted name and type.
    values: Vec<(String, PgType)>,
    version: String,
    updated: String,
    replicated: String,
    deleted: String,
}

impl PatchSql {
    /// From a checked config.
    pub(super) fn new(c: &PostgresConfig) -> Self {
        PatchSql {
            table: format!("{}.{}", quote(&c.schema), quote(&c.table)),
            tombstones: format!("{}.{}", quote(&c.schema), quote(&c.tombstone_table())),
            keys: c
                .key
                .columns()
                .iter()
                .map(|k| (quote(&k.column), k.pg_type))
                .collect(),
            values: c
                .value_columns()
                .into_iter()
                .map(|(name, t, _)| (quote(&name), t))
                .collect(),
            version: quote(&c.version_column),
            updated: quote(&c.updated_at_column),
            replicated: quote(&c.replicated_at_column),
            deleted: quote(&c.deleted_at_column),
        }
    }

    /// The statement of a patch changing `changed` and removing `removed` (value column
    /// indexes). It returns the rows written (0 or 1) and the version stored before it (the
    /// row's, else the tombstone's, else 0); every part sees the same snapshot.
    pub(super) fn statement(&self, changed: &[usize], removed: &[usize]) -> String {
        let param = |n: usize, t: PgType| format!("(${n}::{})[1]{}", array_type(t), select_cast(t));
        let k = self.keys.len();
        let (v, base, updated) = (
            param(k + 1, PgType::Bigint),
            param(k + 2, PgType::Bigint),
            param(k + 3, PgType::Timestamptz),
        );
        let key_match = |alias: &str| {
            self.keys
                .iter()
                .enumerate()
                .map(|(i, (col, t))| format!("{alias}.{col} = {}", param(i + 1, *t)))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let changed: Vec<(&str, String)> = changed
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let (name, t) = self.values.get(*c)?;
                Some((name.as_str(), param(k + 4 + i, *t)))
            })
            .collect();
        let (version, upd, repl, del) = (
            &self.version,
            &self.updated,
            &self.replicated,
            &self.deleted,
        );
        let mut sets: Vec<String> = changed.iter().map(|(n, p)| format!("{n} = {p}")).collect();
        sets.extend(
            removed
                .iter()
                .filter_map(|c| self.values.get(*c))
                .map(|(n, _)| format!("{n} = NULL")),
        );
        sets.extend([
            format!("{version} = {v}"),
            format!("{upd} = {updated}"),
            format!("{repl} = now()"),
            format!("{del} = NULL"),
        ]);
        let mut insert_cols: Vec<&str> = self.keys.iter().map(|(c, _)| c.as_str()).collect();
        insert_cols.extend([version.as_str(), upd, repl]);
        insert_cols.extend(changed.iter().map(|(n, _)| *n));
        let mut insert_vals: Vec<String> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, (_, t))| param(i + 1, *t))
            .collect();
        insert_vals.extend([v.clone(), updated.clone(), "now()".into()]);
        insert_vals.extend(changed.iter().map(|(_, p)| p.clone()));
        let (table, tombstones) = (&self.table, &self.tombstones);
        let (row, tomb) = (key_match("t"), key_match("tb"));
        format!(
            "WITH u AS (UPDATE {table} t SET {} WHERE {row} AND t.{version} = {base} RETURNING 1), \
             ins AS (INSERT INTO {table} ({}) SELECT {} \
               WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {row}) \
               AND COALESCE((SELECT tb.source_version FROM {tombstones} tb WHERE {tomb}), 0) = {base} RETURNING 1) \
             SELECT (SELECT count(*) FROM u) + (SELECT count(*) FROM ins), \
               COALESCE((SELECT t.{version} FROM {table} t WHERE {row}), \
                        (SELECT tb.source_version FROM {tombstones} tb WHERE {tomb}), 0)",
            sets.join(", "),
            insert_cols.join(", "),
            insert_vals.join(", "),
        )
    }

    /// Applies one patch inside the batch's transaction (whose key locks it holds).
    pub(super) async fn apply(
        &self,
        tx: &Transaction<'_>,
        patch: &PatchRow<'_>,
    ) -> Result<PatchOutcome, tokio_postgres::Error> {
        let sql = self.statement(&patch.changed, &patch.removed);
        let params: Vec<&(dyn ToSql + Sync)> = patch.params.iter().map(Column::as_param).collect();
        let row = tx.query_one(&sql, &params).await?;
        let written: i64 = row.try_get(0)?;
        let stored: i64 = row.try_get(1)?;
        let version = i64::try_from(patch.version).unwrap_or(i64::MAX);
        Ok(if written > 0 {
            PatchOutcome::Applied
        } else if stored >= version {
            PatchOutcome::Stale
        } else {
            PatchOutcome::Gap
        })
    }
}

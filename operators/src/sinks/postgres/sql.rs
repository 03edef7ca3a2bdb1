//! The SQL the sink runs, built once from validated, quoted identifiers. Event data is only
//! ever bound as array parameters.

use super::config::{PgType, PostgresConfig, quote};
use super::locks::ECST_CLASS;

/// Array parameter type of a column type (numeric travels as text and is cast in SQL, so a
/// value is validated before the statement and never fails it).
pub(super) fn array_type(t: PgType) -> &'static str {
    match t {
        PgType::Text | PgType::Numeric => "text[]",
        PgType::Bigint => "int8[]",
        PgType::Integer => "int4[]",
        PgType::Boolean => "bool[]",
        PgType::Timestamptz => "timestamptz[]",
        PgType::Jsonb => "jsonb[]",
        PgType::Uuid => "uuid[]",
    }
}

pub(super) fn select_cast(t: PgType) -> &'static str {
    match t {
        PgType::Numeric => "::numeric",
        _ => "",
    }
}

/// Every statement of one sink.
#[derive(Debug, Clone)]
pub(super) struct Statements {
    /// Creates the table if absent.
    pub(super) create_table: String,
    /// Creates the tombstone table if absent.
    pub(super) create_tombstones: String,
    /// Guarded multi-row upsert: keys, version, updated_at, value columns.
    pub(super) upsert: String,
    /// Guarded delete plus tombstone: keys, version, keep_for_ms; returns rows applied.
    pub(super) delete: String,
    /// Guarded mark as deleted: keys, version, updated_at.
    pub(super) mark: String,
    /// Removes expired tombstones.
    pub(super) purge: String,
    /// Takes the table's lock exclusively, waiting for every batch in flight: $1 the table's
    /// key.
    pub(super) lock_table: String,
    /// Takes the table's lock in shared mode, as every batch does: $1 the table's key.
    pub(super) share_table: String,
    /// Takes the key buckets' locks in ascending order: $1 the table's key, $2 the buckets.
    pub(super) lock_buckets: String,
    /// Reads the columns of a table: $1 schema, $2 table.
    pub(super) columns: String,
    /// Whether a unique index covers exactly the key columns: $1 schema, $2 table, $3 names.
    pub(super) unique_key: String,
}

impl Statements {
    /// Builds the statements; identifiers must have passed `PostgresConfig::check`.
    pub(super) fn new(c: &PostgresConfig) -> Self {
        let table = format!("{}.{}", quote(&c.schema), quote(&c.table));
        let tombstones = format!("{}.{}", quote(&c.schema), quote(&c.tombstone_table()));
        let keys = c.key.columns();
        let values = c.value_columns();
        let (version, updated, replicated, deleted) = (
            quote(&c.version_column),
            quote(&c.updated_at_column),
            quote(&c.replicated_at_column),
            quote(&c.deleted_at_column),
        );
        let key_list = keys
            .iter()
            .map(|k| quote(&k.column))
            .collect::<Vec<_>>()
            .join(", ");
        let key_join = |left: &str, right: &str| {
            keys.iter()
                .map(|k| format!("{left}.{col} = {right}.{col}", col = quote(&k.column)))
                .collect::<Vec<_>>()
                .join(" AND ")
        };

        let mut column_defs: Vec<String> = keys
            .iter()
            .map(|k| format!("{} {} NOT NULL", quote(&k.column), k.pg_type.sql()))
            .collect();
        column_defs.push(format!("{version} bigint NOT NULL"));
        column_defs.push(format!("{updated} timestamptz"));
        column_defs.push(format!("{replicated} timestamptz NOT NULL DEFAULT now()"));
        column_defs.push(format!("{deleted} timestamptz"));
        column_defs.extend(
            values
                .iter()
                .map(|(name, t, _)| format!("{} {}", quote(name), t.sql())),
        );
        let create_table = format!(
            "CREATE TABLE IF NOT EXISTS {table} ({}, PRIMARY KEY ({key_list}))",
            column_defs.join(", ")
        );
        let tomb_keys: Vec<String> = keys
            .iter()
            .map(|k| format!("{} {} NOT NULL", quote(&k.column), k.pg_type.sql()))
            .collect();
        let create_tombstones = format!(
            "CREATE TABLE IF NOT EXISTS {tombstones} ({}, source_version bigint NOT NULL, deleted_at timestamptz NOT NULL, expires_at timestamptz NOT NULL, PRIMARY KEY ({key_list}))",
            tomb_keys.join(", ")
        );

        let mut insert_cols = vec![
            key_list.clone(),
            version.clone(),
            updated.clone(),
            replicated.clone(),
            deleted.clone(),
        ];
        insert_cols.extend(values.iter().map(|(name, _, _)| quote(name)));
        let key_select: Vec<String> = keys
            .iter()
            .map(|k| format!("i.{}", quote(&k.column)))
            .collect();
        let mut select_cols = key_select.clone();
        select_cols.extend([
            "i.\"__ecst_version\"".into(),
            "i.\"__ecst_updated\"".into(),
            "now()".into(),
            "NULL".into(),
        ]);
        select_cols.extend(
            values
                .iter()
                .map(|(name, t, _)| format!("i.{}{}", quote(name), select_cast(*t))),
        );
        let mut updates = vec![
            format!("{version} = excluded.{version}"),
            format!("{updated} = excluded.{updated}"),
            format!("{replicated} = excluded.{replicated}"),
            format!("{deleted} = NULL"),
        ];
        updates.extend(
            values
                .iter()
                .map(|(name, _, _)| format!("{q} = excluded.{q}", q = quote(name))),
        );

        // UNNEST of the array parameters: keys first, then the metadata, then (upserts) the
        // value columns.
        let unnest = |meta: [(&str, &str); 2], with_values: bool| {
            let mut aliases: Vec<String> = keys.iter().map(|k| quote(&k.column)).collect();
            let mut types: Vec<&str> = keys.iter().map(|k| array_type(k.pg_type)).collect();
            for (alias, t) in meta {
                aliases.push(format!("\"{alias}\""));
                types.push(t);
            }
            if with_values {
                for (name, t, _) in &values {
                    aliases.push(quote(name));
                    types.push(array_type(*t));
                }
            }
            let params: Vec<String> = types
                .iter()
                .enumerate()
                .map(|(i, t)| format!("${}::{t}", i + 1))
                .collect();
            format!("UNNEST({}) AS i({})", params.join(", "), aliases.join(", "))
        };
        let version_updated = [
            ("__ecst_version", "int8[]"),
            ("__ecst_updated", "timestamptz[]"),
        ];
        let upsert = format!(
            "INSERT INTO {table} AS t ({}) SELECT {} FROM {} \
             WHERE NOT EXISTS (SELECT 1 FROM {tombstones} tb WHERE {} AND tb.source_version >= i.\"__ecst_version\") \
             ON CONFLICT ({key_list}) DO UPDATE SET {} WHERE t.{version} < excluded.{version}",
            insert_cols.join(", "),
            select_cols.join(", "),
            unnest(version_updated, true),
            key_join("tb", "i"),
            updates.join(", "),
        );
        // All parts of one statement see the same snapshot: a delete applies (removes the row
        // and records its version) only where no row at that version or newer exists.
        let delete = format!(
            "WITH i AS (SELECT * FROM {}), \
             gone AS (DELETE FROM {table} t USING i WHERE {} AND t.{version} < i.\"__ecst_version\" RETURNING 1), \
             tomb AS (INSERT INTO {tombstones} AS tb ({key_list}, source_version, deleted_at, expires_at) \
               SELECT {}, i.\"__ecst_version\", now(), now() + i.\"__ecst_keep_ms\" * interval '1 millisecond' FROM i \
               WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {} AND t.{version} >= i.\"__ecst_version\") \
               ON CONFLICT ({key_list}) DO UPDATE SET source_version = excluded.source_version, deleted_at = excluded.deleted_at, expires_at = excluded.expires_at \
               WHERE tb.source_version < excluded.source_version RETURNING 1) \
             SELECT (SELECT count(*) FROM tomb)",
            unnest(
                [("__ecst_version", "int8[]"), ("__ecst_keep_ms", "int8[]")],
                false
            ),
            key_join("t", "i"),
            key_select.join(", "),
            key_join("t", "i"),
        );
        let mark = format!(
            "INSERT INTO {table} AS t ({key_list}, {version}, {updated}, {replicated}, {deleted}) \
             SELECT {}, i.\"__ecst_version\", i.\"__ecst_updated\", now(), now() FROM {} \
             WHERE NOT EXISTS (SELECT 1 FROM {tombstones} tb WHERE {} AND tb.source_version >= i.\"__ecst_version\") \
             ON CONFLICT ({key_list}) DO UPDATE SET {version} = excluded.{version}, {updated} = excluded.{updated}, \
             {replicated} = excluded.{replicated}, {deleted} = excluded.{deleted} WHERE t.{version} < excluded.{version}",
            key_select.join(", "),
            unnest(version_updated, false),
            key_join("tb", "i"),
        );

        Statements {
            create_table,
            create_tombstones,
            upsert,
            delete,
            mark,
            purge: format!("DELETE FROM {tombstones} WHERE expires_at < now()"),
            // Which locks and why: see `locks`.
            lock_table: format!("SELECT pg_advisory_xact_lock({ECST_CLASS}, $1::int4)"),
            share_table: format!("SELECT pg_advisory_xact_lock_shared({ECST_CLASS}, $1::int4)"),
            // Postgres evaluates a volatile select list after the sort, so the locks are taken
            // in bucket order.
            lock_buckets: "SELECT pg_advisory_xact_lock($1::int4, b) FROM unnest($2::int4[]) AS b ORDER BY b".into(),
            columns: "SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2".into(),
            unique_key: "SELECT EXISTS (SELECT 1 FROM pg_index ix JOIN pg_class c ON c.oid = ix.indrelid \
                JOIN pg_namespace n ON n.oid = c.relnamespace \
                WHERE n.nspname = $1 AND c.relname = $2 AND ix.indisunique \
                AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a \
                     WHERE a.attrelid = c.oid AND a.attnum = ANY(ix.indkey)) = (SELECT array_agg(x ORDER BY x) FROM unnest($3::text[]) x))"
                .into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn event_data_is_never_sql_text() {
        let config: PostgresConfig = serde_json::from_value(json!({
            "url": "postgres://localhost/db", "table": "athlete_replica", "key": "athlete_id",
            "columns": {"display_name": "text", "score": "numeric"}
        }))
        .unwrap();
        let s = Statements::new(&config);
        assert!(
            s.upsert.contains(
                "UNNEST($1::text[], $2::int8[], $3::timestamptz[], $4::text[], $5::text[])"
            ),
            "{}",
            s.upsert
        );
        assert!(s.upsert.contains("i.\"score\"::numeric"));
        assert!(
            s.upsert
                .contains("WHERE t.\"source_version\" < excluded.\"source_version\"")
        );
        assert!(
            s.create_table
                .starts_with("CREATE TABLE IF NOT EXISTS \"public\".\"athlete_replica\"")
        );
        assert!(
            s.delete
                .contains("\"public\".\"athlete_replica_tombstones\"")
        );
    }
}

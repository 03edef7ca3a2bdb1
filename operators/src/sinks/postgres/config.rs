//! Configuration of the `postgres` sink.

use std::time::Duration;

use serde::Deserialize;

use crate::duration::ConfigDuration;
use crate::secret::SecretUrl;
use crate::stage::ConfigProblem;

/// A column type the sink can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PgType {
    /// `text`
    Text,
    /// `bigint`
    Bigint,
    /// `integer`
    Integer,
    /// `numeric`
    Numeric,
    /// `boolean`
    Boolean,
    /// `timestamptz`
    Timestamptz,
    /// `jsonb`
    Jsonb,
    /// `uuid`
    Uuid,
}

impl PgType {
    /// The SQL name.
    pub fn sql(self) -> &'static str {
        match self {
            PgType::Text => "text",
            PgType::Bigint => "bigint",
            PgType::Integer => "integer",
            PgType::Numeric => "numeric",
            PgType::Boolean => "boolean",
            PgType::Timestamptz => "timestamptz",
            PgType::Jsonb => "jsonb",
            PgType::Uuid => "uuid",
        }
    }

    /// `information_schema.columns.data_type` values this type can write into.
    pub fn compatible_data_types(self) -> &'static [&'static str] {
        match self {
            PgType::Text => &["text", "character varying"],
            PgType::Bigint => &["bigint"],
            PgType::Integer => &["integer"],
            PgType::Numeric => &["numeric"],
            PgType::Boolean => &["boolean"],
            PgType::Timestamptz => &["timestamp with time zone"],
            PgType::Jsonb => &["jsonb"],
            PgType::Uuid => &["uuid"],
        }
    }
}

/// A column: its type, and the projected field it is filled from (default: its own name).
#[derive(Debug, Clone)]
pub enum ColumnSpec {
    /// Just the type: filled from the field of the same name.
    Type(PgType),
    /// Type and source field.
    Full(FullColumn),
}

// By hand rather than `untagged`, whose only error is "data did not match any variant": a
// wrong type names the allowed ones, a wrong key of the long form names the right keys.
impl<'de> Deserialize<'de> for ColumnSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SpecVisitor;
        impl<'de> serde::de::Visitor<'de> for SpecVisitor {
            type Value = ColumnSpec;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a column type or `{ type, from }`")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<ColumnSpec, E> {
                PgType::deserialize(serde::de::value::StrDeserializer::<E>::new(value))
                    .map(ColumnSpec::Type)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ColumnSpec, A::Error> {
                FullColumn::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ColumnSpec::Full)
            }
        }
        deserializer.deserialize_any(SpecVisitor)
    }
}

/// Long form of a column.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullColumn {
    /// Column type.
    #[serde(rename = "type")]
    pub pg_type: PgType,
    /// Projected field it is filled from.
    #[serde(default)]
    pub from: Option<String>,
}

/// A key column: where its value comes from in the envelope.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyColumn {
    /// Column name.
    pub column: String,
    /// Envelope path of the value (default `aggregateId`).
    #[serde(default = "default_key_from")]
    pub from: String,
    /// Column type (default `text`).
    #[serde(default = "default_key_type", rename = "type")]
    pub pg_type: PgType,
}

fn default_key_from() -> String {
    "aggregateId".into()
}
fn default_key_type() -> PgType {
    PgType::Text
}

/// `key:` as a column name, one key column, or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum KeySpec {
    /// A column filled from `aggregateId` as text.
    Column(String),
    /// One key column.
    One(KeyColumn),
    /// A composite key.
    Many(Vec<KeyColumn>),
}

impl KeySpec {
    /// The key columns.
    pub fn columns(&self) -> Vec<KeyColumn> {
        match self {
            KeySpec::Column(name) => vec![KeyColumn {
                column: name.clone(),
                from: default_key_from(),
                pg_type: PgType::Text,
            }],
            KeySpec::One(c) => vec![c.clone()],
            KeySpec::Many(cs) => cs.clone(),
        }
    }
}

/// Configuration of the `postgres` sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL (`${DATABASE_URL}`).
    pub url: SecretUrl,
    /// Schema (default `public`).
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Table.
    pub table: String,
    /// Key column(s) (default: `aggregate_id` from `aggregateId`, text).
    #[serde(default = "default_key")]
    pub key: KeySpec,
    /// Replicated columns: name to type (or `{ type, from }`).
    #[serde(default)]
    pub columns: std::collections::BTreeMap<String, ColumnSpec>,
    /// Column with the applied version (default `source_version`, bigint).
    #[serde(default = "default_version_column")]
    pub version_column: String,
    /// Column with the source's `occurredAt` (default `source_updated_at`).
    #[serde(default = "default_updated_at_column")]
    pub updated_at_column: String,
    /// Column the sink sets to the commit time (default `replicated_at`).
    #[serde(default = "default_replicated_at_column")]
    pub replicated_at_column: String,
    /// Column set under tombstone `mode: mark` and cleared by a newer upsert (default `deleted_at`).
    #[serde(default = "default_deleted_at_column")]
    pub deleted_at_column: String,
    /// Table remembering deleted versions (default `<table>_tombstones`, same schema).
    #[serde(default)]
    pub tombstone_table: Option<String>,
    /// Create the table and tombstone table when absent (default false: check them).
    #[serde(default)]
    pub create: bool,
    /// Pooled connections (default 4).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Timeout of connecting and of each batch transaction (default 10s).
    #[serde(default = "default_timeout")]
    pub timeout: ConfigDuration,
    /// How often expired tombstones are purged (default 1m).
    #[serde(default = "default_purge_every")]
    pub purge_every: ConfigDuration,
}

fn default_schema() -> String {
    "public".into()
}
fn default_key() -> KeySpec {
    KeySpec::Column("aggregate_id".into())
}
fn default_version_column() -> String {
    "source_version".into()
}
fn default_updated_at_column() -> String {
    "source_updated_at".into()
}
fn default_replicated_at_column() -> String {
    "replicated_at".into()
}
fn default_deleted_at_column() -> String {
    "deleted_at".into()
}
fn default_pool_size() -> u32 {
    4
}
fn default_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}
fn default_purge_every() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(60))
}

/// Whether a configured name is a plain SQL identifier (it is quoted anyway).
pub fn valid_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

/// Quotes an identifier for SQL text.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PostgresConfig {
    /// The tombstone table's name.
    pub fn tombstone_table(&self) -> String {
        self.tombstone_table
            .clone()
            .unwrap_or_else(|| format!("{}_tombstones", self.table))
    }

    /// Replicated columns as (name, type, source field), in name order.
    pub fn value_columns(&self) -> Vec<(String, PgType, String)> {
        self.columns
            .iter()
            .map(|(name, spec)| match spec {
                ColumnSpec::Type(t) => (name.clone(), *t, name.clone()),
                ColumnSpec::Full(f) => (
                    name.clone(),
                    f.pg_type,
                    f.from.clone().unwrap_or_else(|| name.clone()),
                ),
            })
            .collect()
    }

    pub(crate) fn check(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut ident = |key: String, name: &str| {
            if !valid_identifier(name) {
                problems.push(ConfigProblem::new(
                    key,
                    format!("{name:?} is not a valid identifier (letters, digits and _, not starting with a digit, at most 63)"),
                ));
            }
        };
        ident("schema".into(), &self.schema);
        ident("table".into(), &self.table);
        match &self.tombstone_table {
            Some(name) => ident("tombstone_table".into(), name),
            None if valid_identifier(&self.table) && !valid_identifier(&self.tombstone_table()) => {
                ident("table".into(), &self.tombstone_table())
            }
            None => {}
        }
        ident("version_column".into(), &self.version_column);
        ident("updated_at_column".into(), &self.updated_at_column);
        ident("replicated_at_column".into(), &self.replicated_at_column);
        ident("deleted_at_column".into(), &self.deleted_at_column);
        let keys = self.key.columns();
        for k in &keys {
            ident("key".into(), &k.column);
        }
        for name in self.columns.keys() {
            ident(format!("columns.{name}"), name);
        }
        if keys.is_empty() {
            problems.push(ConfigProblem::new("key", "needs at least one key column"));
        }
        let mut names: Vec<&str> = keys.iter().map(|k| k.column.as_str()).collect();
        names.extend(self.columns.keys().map(String::as_str));
        names.extend([
            self.version_column.as_str(),
            self.updated_at_column.as_str(),
            self.replicated_at_column.as_str(),
            self.deleted_at_column.as_str(),
        ]);
        let mut seen = std::collections::HashSet::new();
        for name in names {
            if !seen.insert(name) {
                problems.push(ConfigProblem::new(
                    "columns",
                    format!("column `{name}` is named twice"),
                ));
            }
        }
        if let Err(e) = crate::postgres_tls::parse_postgres_url(self.url.expose()) {
            problems.push(ConfigProblem::new(
                "url",
                format!("Postgres URL {}: {e}", self.url),
            ));
        }
        for k in &keys {
            if !matches!(
                k.pg_type,
                PgType::Text | PgType::Bigint | PgType::Integer | PgType::Uuid
            ) {
                problems.push(ConfigProblem::new(
                    "key",
                    format!(
                        "key column `{}` is {}; keys may be text, bigint, integer or uuid",
                        k.column,
                        k.pg_type.sql()
                    ),
                ));
            }
        }
        if self.pool_size == 0 {
            problems.push(ConfigProblem::new("pool_size", "must be at least 1"));
        }
        if self.purge_every.0.is_zero() {
            problems.push(ConfigProblem::new("purge_every", "must be more than 0ms"));
        }
        if self.timeout.0.is_zero() {
            problems.push(ConfigProblem::new("timeout", "must be more than 0ms"));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identifiers_from_config_are_checked() {
        let config: PostgresConfig = serde_json::from_value(json!({
            "url": "postgres://u:pw@localhost/db", "table": "x; drop table y", "key": "id",
            "columns": {"ok_name": "text", "bad-name": "bigint"}
        }))
        .unwrap();
        let problems = config.check();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"table"), "{problems:?}");
        assert!(keys.contains(&"columns.bad-name"), "{problems:?}");
        assert!(problems[0].message.contains("not a valid identifier"));
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn short_and_long_forms_read() {
        let config: PostgresConfig = serde_json::from_value(json!({
            "url": "postgres://localhost/db", "table": "athlete_replica",
            "key": {"column": "athlete_id"},
            "columns": {"display_name": "text", "points": {"type": "bigint", "from": "score"}}
        }))
        .unwrap();
        assert!(config.check().is_empty(), "{:?}", config.check());
        assert_eq!(config.key.columns()[0].from, "aggregateId");
        assert_eq!(
            config.value_columns()[1],
            ("points".to_string(), PgType::Bigint, "score".to_string())
        );
        assert_eq!(config.tombstone_table(), "athlete_replica_tombstones");
        assert!(
            serde_json::from_value::<PostgresConfig>(
                json!({"url": "x", "table": "t", "tabel": "u"})
            )
            .is_err()
        );
    }
}

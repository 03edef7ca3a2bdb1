//! The transactional outbox: its table, and the call a Rust producer makes to write to it in
//! the same transaction as the entity.
//!
//! Publishing to a stream right after a database write loses events (the commit succeeds and
//! the publish fails) or invents them (the publish succeeds and the commit rolls back). The
//! outbox row commits or rolls back with the entity; `ecst relay` publishes it afterwards.
//! The row names the logical stream: on a partitioned stream the relay sends it to the
//! partition of its `aggregate_id` (never empty, so every row has one).
//!
//! ```no_run
//! # async fn update_status(
//! #     client: &mut tokio_postgres::Client, id: &str, status: &str,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use ecst_pipeline::outbox::{OutboxEvent, OutboxTable};
//!
//! let outbox = OutboxTable::default();
//! let tx = client.transaction().await?;
//! let row = tx
//!     .query_one(
//!         "UPDATE athletes SET status = $2, version = version + 1, updated_at = now()
//!          WHERE id = $1
//!          RETURNING version, jsonb_build_object(
//!              'athleteId', id, 'displayName', display_name, 'countryCode', country_code,
//!              'weightClass', weight_class, 'status', status, 'updatedAt', updated_at)",
//!         &[&id, &status],
//!     )
//!     .await?;
//! let version: i64 = row.get(0);
//! let state: serde_json::Value = row.get(1);
//! let event = OutboxEvent::new("athletes.athlete-updated.v1", "athlete", id, version, "athlete.updated")
//!     .payload(state);
//! outbox.enqueue(&tx, &event).await?;
//! tx.commit().await?; // the athlete and its event, or neither
//! # Ok(()) }
//! ```

use serde_json::{Map, Value};
use time::OffsetDateTime;
use tokio_postgres::Transaction;
use uuid::Uuid;

use ecst_operators::sinks::postgres::config::{quote, valid_identifier};

const DDL_TEMPLATE: &str = include_str!("outbox.sql");

/// The outbox schema version the DDL creates and the relay expects.
pub const OUTBOX_SCHEMA_VERSION: u32 = 1;

/// Columns the relay reads; the check at start names any that is missing.
pub const OUTBOX_COLUMNS: &[&str] = &[
    "id",
    "stream",
    "aggregate_type",
    "aggregate_id",
    "aggregate_version",
    "event_type",
    "event_id",
    "schema_version",
    "occurred_at",
    "payload",
    "headers",
    "created_at",
    "published_at",
];

/// Where the outbox lives: a schema and a table, both plain identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxTable {
    schema: String,
    table: String,
}

impl Default for OutboxTable {
    fn default() -> Self {
        OutboxTable {
            schema: "public".into(),
            table: "ecst_outbox".into(),
        }
    }
}

/// An outbox or event that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// A schema or table name that is not a plain identifier.
    #[error("`{0}` is not a plain SQL identifier (letters, digits, `_`; at most 63 bytes)")]
    Identifier(String),
    /// An event that would be refused downstream.
    #[error("invalid outbox event: {0}")]
    Event(String),
    /// From Postgres.
    #[error("writing to the outbox: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

impl OutboxTable {
    /// An outbox at `schema.table`.
    pub fn new(schema: &str, table: &str) -> Result<Self, OutboxError> {
        for name in [schema, table] {
            // The derived names (`<table>_dead_letters`, `<table>_notify`, ...) must fit too.
            if !valid_identifier(name) || name.len() > 48 {
                return Err(OutboxError::Identifier(name.to_string()));
            }
        }
        Ok(OutboxTable {
            schema: schema.into(),
            table: table.into(),
        })
    }

    /// The table's unqualified name.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The schema's name.
    pub fn schema_name(&self) -> &str {
        &self.schema
    }

    fn qualified(&self, name: &str) -> String {
        format!("{}.{}", quote(&self.schema), quote(name))
    }

    /// `"schema"."table"`.
    pub fn sql_name(&self) -> String {
        self.qualified(&self.table)
    }

    /// `"schema"."table_dead_letters"`, where unpublishable rows go.
    pub fn dead_letters_sql_name(&self) -> String {
        self.qualified(&format!("{}_dead_letters", self.table))
    }

    /// The LISTEN/NOTIFY channel: the table's name.
    pub fn channel(&self) -> &str {
        &self.table
    }

    /// The DDL that creates this outbox, its dead-letter table and its NOTIFY trigger.
    pub fn ddl(&self) -> String {
        DDL_TEMPLATE
            .replace("{table}", &self.sql_name())
            .replace("{dead_letters}", &self.dead_letters_sql_name())
            .replace(
                "{unpublished_index}",
                &quote(&format!("{}_unpublished", self.table)),
            )
            .replace(
                "{notify_function}",
                &self.qualified(&format!("{}_notify", self.table)),
            )
            .replace(
                "{notify_trigger}",
                &quote(&format!("{}_notify", self.table)),
            )
            .replace("{channel_literal}", &format!("'{}'", self.channel()))
    }

    /// Inserts `event` in the caller's transaction; returns the row's id.
    pub async fn enqueue(
        &self,
        tx: &Transaction<'_>,
        event: &OutboxEvent,
    ) -> Result<i64, OutboxError> {
        event.check()?;
        let sql = format!(
            "INSERT INTO {} (stream, aggregate_type, aggregate_id, aggregate_version, event_type,
                             event_id, schema_version, occurred_at, payload, headers)
             VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8, now()), $9, $10)
             RETURNING id",
            self.sql_name()
        );
        let headers = Value::Object(event.headers.clone());
        let row = tx
            .query_one(
                &sql,
                &[
                    &event.stream,
                    &event.aggregate_type,
                    &event.aggregate_id,
                    &event.aggregate_version,
                    &event.event_type,
                    &event.event_id,
                    &event.schema_version,
                    &event.occurred_at,
                    &event.payload,
                    &headers,
                ],
            )
            .await?;
        Ok(row.try_get(0)?)
    }
}

/// One event for the outbox: the entity's full new state (or its deletion).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    /// Redis stream key.
    pub stream: String,
    /// The entity kind, e.g. `athlete`.
    pub aggregate_type: String,
    /// The entity's id.
    pub aggregate_id: String,
    /// Monotonic per aggregate; consumers keep the highest.
    pub aggregate_version: i64,
    /// e.g. `athlete.updated`.
    pub event_type: String,
    /// Unique id (a new v4 by default).
    pub event_id: Uuid,
    /// Version of the payload's schema (default 1).
    pub schema_version: i32,
    /// When the change happened (default: the transaction's `now()`).
    pub occurred_at: Option<OffsetDateTime>,
    /// The full new state; `None` is a deletion.
    pub payload: Option<Value>,
    /// Headers carried to the stream entry (`traceparent`, `tracestate`).
    pub headers: Map<String, Value>,
}

impl OutboxEvent {
    /// An event without payload (a deletion until [`OutboxEvent::payload`] is called).
    pub fn new(
        stream: impl Into<String>,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        aggregate_version: i64,
        event_type: impl Into<String>,
    ) -> Self {
        OutboxEvent {
            stream: stream.into(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            aggregate_version,
            event_type: event_type.into(),
            event_id: Uuid::new_v4(),
            schema_version: 1,
            occurred_at: None,
            payload: None,
            headers: Map::new(),
        }
    }

    /// Sets the full new state.
    pub fn payload(mut self, state: Value) -> Self {
        self.payload = Some(state);
        self
    }

    /// Sets when the change happened.
    pub fn occurred_at(mut self, at: OffsetDateTime) -> Self {
        self.occurred_at = Some(at);
        self
    }

    /// Carries the producer's W3C trace context to the stream entry.
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.headers
            .insert("traceparent".into(), Value::String(traceparent.into()));
        self
    }

    /// Refuses what the relay would dead-letter, so the producer hears it first.
    fn check(&self) -> Result<(), OutboxError> {
        if let Err(reason) = check_stream_name(&self.stream) {
            return Err(OutboxError::Event(reason));
        }
        if self.aggregate_id.is_empty() {
            return Err(OutboxError::Event("aggregate_id is empty".into()));
        }
        if self.aggregate_version < 0 {
            return Err(OutboxError::Event(format!(
                "aggregate_version {} is negative",
                self.aggregate_version
            )));
        }
        if let Some(payload) = &self.payload
            && !(payload.is_object() || payload.is_null())
        {
            return Err(OutboxError::Event(
                "payload must be a JSON object (or absent for a deletion)".into(),
            ));
        }
        Ok(())
    }
}

/// Why a stream name is refused, if it is.
pub fn check_stream_name(stream: &str) -> Result<(), String> {
    if stream.is_empty() {
        return Err("stream name is empty".into());
    }
    if stream.len() > 256 {
        return Err(format!(
            "stream name is {} bytes (at most 256)",
            stream.len()
        ));
    }
    if stream.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "stream name {stream:?} contains whitespace or control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_quotes_every_name_and_leaves_no_placeholder() {
        let ddl = OutboxTable::new("app", "outbox").unwrap().ddl();
        assert!(ddl.contains("CREATE TABLE IF NOT EXISTS \"app\".\"outbox\" ("));
        assert!(ddl.contains("\"app\".\"outbox_dead_letters\""));
        assert!(ddl.contains("pg_notify('outbox', '')"));
        for placeholder in [
            "{table}",
            "{dead_letters}",
            "{unpublished_index}",
            "{notify_function}",
            "{notify_trigger}",
            "{channel_literal}",
        ] {
            assert!(!ddl.contains(placeholder), "{placeholder} left in:\n{ddl}");
        }
    }

    #[test]
    fn names_that_are_not_identifiers_are_refused() {
        assert!(OutboxTable::new("public", "x; drop table y").is_err());
        assert!(OutboxTable::new("public", "o'utbox").is_err());
        assert!(OutboxTable::new("public", &"x".repeat(49)).is_err());
    }

    #[test]
    fn events_the_relay_would_dead_letter_are_refused_up_front() {
        let event = OutboxEvent::new("athletes", "athlete", "a1", 1, "athlete.updated");
        assert!(event.check().is_ok());
        let bad = OutboxEvent {
            aggregate_version: -1,
            ..event.clone()
        };
        assert!(bad.check().unwrap_err().to_string().contains("negative"));
        let bad = event.clone().payload(Value::Array(vec![]));
        assert!(bad.check().unwrap_err().to_string().contains("JSON object"));
        let bad = OutboxEvent {
            stream: "two words".into(),
            ..event
        };
        assert!(bad.check().unwrap_err().to_string().contains("whitespace"));
    }

    /// Against the real Postgres at `DATABASE_URL`.
    #[tokio::test]
    async fn enqueue_commits_and_rolls_back_with_the_transaction() {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let target = ecst_operators::postgres_tls::parse_postgres_url(&url).unwrap();
        let (mut client, connection) = target.config.connect(target.tls).await.unwrap();
        tokio::spawn(connection);
        let table = format!("unit_outbox_{}", std::process::id());
        let outbox = OutboxTable::new("public", &table).unwrap();
        client
            .batch_execute(&format!(
                "SET client_min_messages = warning; {}",
                outbox.ddl()
            ))
            .await
            .unwrap();

        let tx = client.transaction().await.unwrap();
        let rolled_back = OutboxEvent::new("athletes", "athlete", "ath-9", 1, "athlete.updated")
            .payload(serde_json::json!({"status": "active"}));
        outbox.enqueue(&tx, &rolled_back).await.unwrap();
        tx.rollback().await.unwrap();

        let tx = client.transaction().await.unwrap();
        let at = time::macros::datetime!(2026-11-24 10:00:00 UTC);
        let event = OutboxEvent::new("athletes", "athlete", "ath-9", 2, "athlete.updated")
            .payload(serde_json::json!({"status": "retired"}))
            .occurred_at(at)
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let id = outbox.enqueue(&tx, &event).await.unwrap();
        let bad = OutboxEvent::new("", "athlete", "ath-9", 3, "athlete.updated");
        assert!(outbox.enqueue(&tx, &bad).await.is_err());
        tx.commit().await.unwrap();

        let rows = client
            .query(
                &format!(
                    "SELECT id, aggregate_version, event_id, occurred_at, payload, headers FROM {}",
                    outbox.sql_name()
                ),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            rows.len(),
            1,
            "the rolled-back event must not be in the outbox"
        );
        let row = &rows[0];
        assert_eq!(row.get::<_, i64>(0), id);
        assert_eq!(row.get::<_, i64>(1), 2);
        assert_eq!(row.get::<_, Uuid>(2), event.event_id);
        assert_eq!(row.get::<_, OffsetDateTime>(3), at);
        assert_eq!(
            row.get::<_, Value>(4),
            serde_json::json!({"status": "retired"})
        );
        assert_eq!(
            row.get::<_, Value>(5)["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        client
            .batch_execute(&format!(
                "DROP TABLE {}, {}; DROP FUNCTION {}_notify()",
                outbox.sql_name(),
                outbox.dead_letters_sql_name(),
                table
            ))
            .await
            .unwrap();
    }
}

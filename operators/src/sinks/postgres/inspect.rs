//! The read-only check `ecst validate --connect` makes of a `postgres` sink: the table is
//! there with the columns and unique key the sink writes (or the user may create it), the
//! tombstone table is there or creatable, and the user may read and write both.

use tokio_postgres::Client;

use super::config::PostgresConfig;
use super::sql::Statements;
use super::{SchemaError, table_problems};
use crate::postgres_tls::parse_postgres_url;

/// Privileges the sink uses on its table and its tombstone table.
const TABLE_PRIVILEGES: [&str; 4] = ["SELECT", "INSERT", "UPDATE", "DELETE"];

impl PostgresConfig {
    /// Connects as the sink would and checks, without changing anything, that it can write its
    /// tables: `Ok` with what is in the way (empty when nothing is), `Err` when Postgres
    /// cannot be reached or asked.
    pub async fn inspect(&self) -> Result<Vec<String>, String> {
        let target = parse_postgres_url(self.url.expose()).map_err(|e| e.to_string())?;
        let mut pg = target.config;
        pg.connect_timeout(self.timeout.0);
        let (client, connection) = tokio::time::timeout(self.timeout.0, pg.connect(target.tls))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout.0))?
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let checked = tokio::time::timeout(self.timeout.0, problems(&client, self))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout.0)));
        drop(client);
        let _ = driver.await;
        checked
    }
}

async fn problems(client: &Client, config: &PostgresConfig) -> Result<Vec<String>, String> {
    let failed = |e: tokio_postgres::Error| e.to_string();
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .map_err(failed)?
        .get(0);
    let statements = Statements::new(config);
    let exists = |table: String| async move {
        client
            .query_one(
                "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
                &[&config.schema, &table],
            )
            .await
            .map(|row| row.get::<_, bool>(0))
            .map_err(failed)
    };
    let may_create = async || -> Result<bool, String> {
        client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) \
                 AND has_schema_privilege($1, 'CREATE')",
                &[&config.schema],
            )
            .await
            .map(|row| row.get::<_, bool>(0))
            .map_err(failed)
    };
    let missing_privileges = async |table: &str| -> Result<Vec<&'static str>, String> {
        let qualified = format!(
            "{}.{}",
            super::config::quote(&config.schema),
            super::config::quote(table)
        );
        let mut missing = Vec::new();
        for privilege in TABLE_PRIVILEGES {
            let granted: bool = client
                .query_one(
                    "SELECT has_table_privilege($1, $2)",
                    &[&qualified, &privilege],
                )
                .await
                .map_err(failed)?
                .get(0);
            if !granted {
                missing.push(privilege);
            }
        }
        Ok(missing)
    };

    let mut problems = Vec::new();
    let schema = &config.schema;
    let table = format!("{schema}.{}", config.table);
    if config.create && !exists(config.table.clone()).await? {
        if !may_create().await? {
            problems.push(format!(
                "table {table} does not exist and user `{user}` may not create it (`create: true` needs CREATE on schema {schema})"
            ));
        }
    } else {
        problems.extend(table_problems(client, config, &statements).await.map_err(
            |e| match e {
                SchemaError::Mismatch(m) | SchemaError::Unavailable(m) => m,
            },
        )?);
        if exists(config.table.clone()).await? {
            let missing = missing_privileges(&config.table).await?;
            if !missing.is_empty() {
                problems.push(format!(
                    "user `{user}` lacks {} on table {table}",
                    missing.join(", ")
                ));
            }
        }
    }
    let tombstones = config.tombstone_table();
    if exists(tombstones.clone()).await? {
        let missing = missing_privileges(&tombstones).await?;
        if !missing.is_empty() {
            problems.push(format!(
                "user `{user}` lacks {} on tombstone table {schema}.{tombstones}",
                missing.join(", ")
            ));
        }
    } else if !may_create().await? {
        problems.push(format!(
            "tombstone table {schema}.{tombstones} does not exist and user `{user}` may not create it (needs CREATE on schema {schema})"
        ));
    }
    Ok(problems)
}

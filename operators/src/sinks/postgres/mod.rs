//! `postgres`: one row per aggregate, written behind a version guard in one transaction per
//! batch, with deleted versions kept in a tombstone table.

pub mod config;
mod inspect;
mod locks;
mod patch;
mod plan;
mod replica;
mod sql;
mod values;

use std::collections::HashMap;
use std::sync::Arc;

use bb8_postgres::PostgresConnectionManager;
use tokio::sync::OnceCell;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

use crate::postgres_tls::{PgTls, parse_postgres_url};

use crate::record::{Action, Record};
use crate::stage::{
    ApplyFuture, BuildContext, BuiltStage, ComponentConfig, ConfigProblem, FreshnessFuture, KeyDoc,
    ReplicaFreshness, Sink, SinkError, SinkReport,
};
pub use config::{PgType, PostgresConfig};
use patch::{PatchOutcome, PatchSql};
use plan::{Layout, Plan};
use sql::Statements;

const STORE: &str = "postgres";

/// Why the table cannot be used; the worker refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The table or a column is missing or of an incompatible type.
    #[error("{0}")]
    Mismatch(String),
    /// Postgres could not be asked.
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
}

async fn ensure_schema(
    client: &Client,
    config: &PostgresConfig,
    statements: &Statements,
) -> Result<(), SchemaError> {
    let unavailable = |e: tokio_postgres::Error| SchemaError::Unavailable(e.to_string());
    // ecst's own bookkeeping is created even when the table is the user's. On every start but
    // the first, `IF NOT EXISTS` answers with an "already exists, skipping" NOTICE, which the
    // client would log: not news, so notices are off for these statements.
    let create_table = if config.create {
        statements.create_table.as_str()
    } else {
        ""
    };
    client
        .batch_execute(&format!(
            "SET client_min_messages = warning; {create_table}; {}; RESET client_min_messages",
            statements.create_tombstones
        ))
        .await
        .map_err(unavailable)?;
    let problems = table_problems(client, config, statements).await?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SchemaError::Mismatch(problems.join("; ")))
    }
}

/// What keeps the sink from writing `config`'s table as it is: a missing table, missing or
/// mistyped columns, no unique key on the key columns. Reads only.
async fn table_problems(
    client: &Client,
    config: &PostgresConfig,
    statements: &Statements,
) -> Result<Vec<String>, SchemaError> {
    let unavailable = |e: tokio_postgres::Error| SchemaError::Unavailable(e.to_string());
    let rows = client
        .query(&statements.columns, &[&config.schema, &config.table])
        .await
        .map_err(unavailable)?;
    let table = format!("{}.{}", config.schema, config.table);
    if rows.is_empty() {
        return Ok(vec![format!(
            "table {table} does not exist (create it, or set `create: true`)"
        )]);
    }
    let present: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut needed: Vec<(String, PgType)> = config
        .key
        .columns()
        .into_iter()
        .map(|k| (k.column, k.pg_type))
        .collect();
    needed.push((config.version_column.clone(), PgType::Bigint));
    needed.push((config.updated_at_column.clone(), PgType::Timestamptz));
    needed.push((config.replicated_at_column.clone(), PgType::Timestamptz));
    needed.push((config.deleted_at_column.clone(), PgType::Timestamptz));
    needed.extend(
        config
            .value_columns()
            .into_iter()
            .map(|(name, t, _)| (name, t)),
    );
    let mut problems = Vec::new();
    for (column, t) in needed {
        match present.get(&column) {
            None => problems.push(format!(
                "table {table} has no column `{column}` ({} expected)",
                t.sql()
            )),
            Some(actual) if !t.compatible_data_types().contains(&actual.as_str()) => {
                problems.push(format!(
                    "column `{column}` of {table} is {actual}, but the sink writes {}",
                    t.sql()
                ))
            }
            Some(_) => {}
        }
    }
    let key_names: Vec<String> = config.key.columns().into_iter().map(|k| k.column).collect();
    let unique: bool = client
        .query_one(
            &statements.unique_key,
            &[&config.schema, &config.table, &key_names],
        )
        .await
        .map_err(unavailable)?
        .get(0);
    if !unique {
        problems.push(format!(
            "table {table} needs a primary key or unique index on exactly ({})",
            key_names.join(", ")
        ));
    }
    Ok(problems)
}

/// A pooled client with the sink's statements prepared on it once.
pub struct PgConnection {
    client: Client,
    lock_table: Statement,
    share_table: Statement,
    lock_buckets: Statement,
    upsert: Statement,
    delete: Statement,
    mark: Statement,
    broken: bool,
}

/// bb8 manager: bb8-postgres connections, with the schema ensured once and the statements
/// prepared on each new connection.
pub struct PgManager {
    inner: PostgresConnectionManager<PgTls>,
    config: PostgresConfig,
    statements: Arc<Statements>,
    schema_ready: OnceCell<()>,
}

/// A connection or preparation failure.
#[derive(Debug, thiserror::Error)]
pub enum PgConnectError {
    /// From the driver.
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// From the schema check.
    #[error(transparent)]
    Schema(#[from] SchemaError),
}

impl bb8::ManageConnection for PgManager {
    type Connection = PgConnection;
    type Error = PgConnectError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        tokio::time::timeout(self.config.timeout.0, self.connect_and_prepare())
            .await
            .unwrap_or_else(|_| {
                Err(SchemaError::Unavailable("connecting and preparing timed out".into()).into())
            })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        conn.client.simple_query("").await?;
        Ok(())
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.broken || conn.client.is_closed()
    }
}

impl PgManager {
    async fn connect_and_prepare(&self) -> Result<PgConnection, PgConnectError> {
        let client = bb8::ManageConnection::connect(&self.inner).await?;
        self.schema_ready
            .get_or_try_init(|| ensure_schema(&client, &self.config, &self.statements))
            .await?;
        Ok(PgConnection {
            lock_table: client.prepare(&self.statements.lock_table).await?,
            share_table: client.prepare(&self.statements.share_table).await?,
            lock_buckets: client.prepare(&self.statements.lock_buckets).await?,
            upsert: client.prepare(&self.statements.upsert).await?,
            delete: client.prepare(&self.statements.delete).await?,
            mark: client.prepare(&self.statements.mark).await?,
            client,
            broken: false,
        })
    }
}

/// The running `postgres` sink.
pub struct PostgresSink {
    config: PostgresConfig,
    lock_key: i32,
    layout: Layout,
    patch_sql: PatchSql,
    pool: bb8::Pool<PgManager>,
    purge: tokio::task::JoinHandle<()>,
}

impl Drop for PostgresSink {
    fn drop(&mut self) {
        self.purge.abort();
    }
}

impl PostgresConfig {
    /// Builds the sink: checks (or creates) the table now when Postgres answers, so that a
    /// wrong table refuses to start; connects lazily otherwise.
    pub async fn build(&self, ctx: &BuildContext) -> Result<PostgresSink, String> {
        let target = parse_postgres_url(self.url.expose())
            .map_err(|e| format!("Postgres URL {}: {e}", self.url))?;
        let mut pg = target.config;
        if pg.get_application_name().is_none() {
            pg.application_name(format!("ecst/{}/{}", ctx.pipeline, ctx.stage));
        }
        pg.connect_timeout(self.timeout.0);
        let statements = Arc::new(Statements::new(self));
        let manager = PgManager {
            inner: PostgresConnectionManager::new(pg.clone(), target.tls.clone()),
            config: self.clone(),
            statements: statements.clone(),
            schema_ready: OnceCell::new(),
        };
        match tokio::time::timeout(self.timeout.0, pg.connect(target.tls)).await {
            Ok(Ok((client, connection))) => {
                let driver = tokio::spawn(connection);
                let checked =
                    tokio::time::timeout(self.timeout.0, ensure_schema(&client, self, &statements))
                        .await
                        .unwrap_or_else(|_| {
                            Err(SchemaError::Unavailable(
                                "checking the table timed out".into(),
                            ))
                        });
                drop(client);
                let _ = driver.await;
                match checked {
                    Ok(()) => {
                        let _ = manager.schema_ready.set(());
                    }
                    Err(SchemaError::Mismatch(message)) => return Err(message),
                    Err(SchemaError::Unavailable(message)) => {
                        tracing::warn!(stage = %ctx.stage, error = %message, "Cannot check the Postgres table yet; will check on first connection.");
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(stage = %ctx.stage, url = %self.url, error = %e, "Postgres does not answer yet; the sink will retry.")
            }
            Err(_) => {
                tracing::warn!(stage = %ctx.stage, url = %self.url, "Postgres did not answer within the timeout; the sink will retry.")
            }
        }
        // No ping on checkout (a round trip per batch): a connection that broke is dropped by
        // `has_broken`, and a batch that fails on one is retried.
        let pool = bb8::Pool::builder()
            .max_size(self.pool_size)
            .connection_timeout(self.timeout.0)
            .test_on_check_out(false)
            .build_unchecked(manager);
        let purge = tokio::spawn(purge_tombstones(
            pool.clone(),
            statements.purge.clone(),
            self.purge_every.0,
        ));
        Ok(PostgresSink {
            lock_key: locks::table_key(&self.schema, &self.table),
            layout: Layout {
                keys: self.key.columns(),
                values: self.value_columns(),
            },
            patch_sql: PatchSql::new(self),
            config: self.clone(),
            pool,
            purge,
        })
    }
}

async fn purge_tombstones(pool: bb8::Pool<PgManager>, sql: String, every: std::time::Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        match pool.get().await {
            Ok(conn) => match tokio::time::timeout(
                every.max(std::time::Duration::from_secs(10)),
                conn.client.execute(&sql, &[]),
            )
            .await
            {
                Ok(Ok(n)) if n > 0 => tracing::debug!(purged = n, "Purged expired tombstones."),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "Purging expired tombstones failed."),
                Err(_) => tracing::warn!("Purging expired tombstones timed out."),
            },
            Err(e) => tracing::debug!(error = %e, "No connection to purge tombstones."),
        }
    }
}

fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        let c = code.code();
        c.starts_with("22") || c.starts_with("23")
    })
}

fn classify(e: tokio_postgres::Error) -> SinkError {
    let retryable = e.is_closed()
        || e.code().is_none()
        || matches!(
            e.code(),
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || c.code().starts_with("08")
                // Insufficient resources: out of memory, of disk, of lock table space (a
                // batch holds up to 1024 key locks), of connections; none is the record's fault.
                || c.code().starts_with("53")
        );
    let message = match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    if retryable {
        SinkError::Unavailable {
            store: STORE,
            message,
        }
    } else {
        SinkError::Refused {
            store: STORE,
            message,
        }
    }
}

impl PostgresSink {
    async fn connection(&self) -> Result<bb8::PooledConnection<'_, PgManager>, SinkError> {
        self.pool.get().await.map_err(|e| SinkError::Unavailable {
            store: STORE,
            message: match e {
                bb8::RunError::User(e) => e.to_string(),
                bb8::RunError::TimedOut => "timed out waiting for a pooled connection".into(),
            },
        })
    }

    /// Runs a plan in one transaction; returns the rows applied (patches aside) and what
    /// became of each patch, by entry.
    async fn execute(
        &self,
        conn: &mut PgConnection,
        plan: &Plan<'_>,
    ) -> Result<(u64, Vec<(usize, PatchOutcome)>), tokio_postgres::Error> {
        let PgConnection {
            client,
            share_table,
            lock_buckets,
            upsert,
            delete,
            mark,
            ..
        } = conn;
        let tx = client.transaction().await?;
        // Batches that write a key bucket are applied one at a time (across all workers), so
        // a late update never slips past an uncommitted delete; see `locks`. Each statement
        // below snapshots after these locks are granted.
        let table_lock = async {
            tx.execute(&*share_table, &[&self.lock_key])
                .await
                .map(|_| 0)
        };
        let bucket_locks = async {
            tx.execute(&*lock_buckets, &[&self.lock_key, &plan.buckets])
                .await
                .map(|_| 0)
        };
        let (upsert_params, delete_params, mark_params) = (
            plan.upserts.params(),
            plan.deletes.params(),
            plan.marks.params(),
        );
        // Issued together, in this order, so the client pipelines them: one round trip.
        let upserts = async {
            match plan.upserts.entries.is_empty() {
                true => Ok(0),
                false => tx.execute(&*upsert, &upsert_params).await,
            }
        };
        let deletes = async {
            match plan.deletes.entries.is_empty() {
                true => Ok(0),
                false => tx
                    .query_one(&*delete, &delete_params)
                    .await
                    .map(|row| u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)),
            }
        };
        let marks = async {
            match plan.marks.entries.is_empty() {
                true => Ok(0),
                false => tx.execute(&*mark, &mark_params).await,
            }
        };
        let (_, _, u, d, m) = tokio::try_join!(table_lock, bucket_locks, upserts, deletes, marks)?;
        // Patches on top of what the rows above left, in version order, one statement each:
        // each reads what the one before wrote.
        let mut patches = Vec::with_capacity(plan.patches.len());
        for patch in &plan.patches {
            patches.push((patch.entry, self.patch_sql.apply(&tx, patch).await?));
        }
        tx.commit().await?;
        Ok((u + d + m, patches))
    }

    async fn apply(&self, batch: &[Record]) -> Result<SinkReport, SinkError> {
        let mut report = SinkReport::default();
        let plan = self.layout.plan(batch, &mut report);
        let rows = plan.len();
        if plan.is_empty() {
            return Ok(report);
        }
        let mut conn = self.connection().await?;
        // Marked broken until the transaction answers: a timed-out one leaves the pool.
        conn.broken = true;
        let result =
            tokio::time::timeout(self.config.timeout.0, self.execute(&mut conn, &plan)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => {
                return Err(SinkError::Unavailable {
                    store: STORE,
                    message: format!("batch transaction timed out after {}", self.config.timeout),
                });
            }
        };
        match result {
            Ok((applied, patches)) => {
                conn.broken = false;
                report.applied += usize::try_from(applied).unwrap_or(usize::MAX);
                report.stale += rows - usize::try_from(applied).unwrap_or(rows).min(rows);
                for (entry, outcome) in patches {
                    count_patch(&mut report, entry, outcome);
                }
                Ok(report)
            }
            Err(e) if is_data_error(&e) => {
                conn.broken = false;
                drop(conn);
                // Something in the batch breaks a constraint the sink cannot check itself:
                // find it by applying each record alone.
                self.apply_one_by_one(batch, report).await
            }
            Err(e) => {
                conn.broken = e.is_closed() || e.code().is_none();
                Err(classify(e))
            }
        }
    }

    async fn apply_one_by_one(
        &self,
        batch: &[Record],
        mut report: SinkReport,
    ) -> Result<SinkReport, SinkError> {
        let rejected: std::collections::HashSet<usize> =
            report.rejected.iter().map(|(e, _)| *e).collect();
        let mut conn = self.connection().await?;
        report.stale = 0;
        report.stale_entries.clear();
        // In version order: a delta patch applied before the one it builds on would gap.
        let mut ordered: Vec<&Record> = batch
            .iter()
            .filter(|r| !rejected.contains(&r.entry))
            .collect();
        ordered.sort_by_key(|r| r.event.aggregate_version);
        for record in ordered {
            let mut single = SinkReport::default();
            let plan = self.layout.plan(std::slice::from_ref(record), &mut single);
            if !single.rejected.is_empty() {
                report.rejected.extend(single.rejected);
                continue;
            }
            conn.broken = true;
            let result =
                tokio::time::timeout(self.config.timeout.0, self.execute(&mut conn, &plan))
                    .await
                    .map_err(|_| SinkError::Unavailable {
                        store: STORE,
                        message: format!("row transaction timed out after {}", self.config.timeout),
                    })?;
            conn.broken = false;
            match result {
                Ok((_, patches)) if !patches.is_empty() => {
                    for (entry, outcome) in patches {
                        count_patch(&mut report, entry, outcome);
                    }
                }
                Ok((1, _)) => report.applied += 1,
                Ok(_) => {
                    report.stale += 1;
                    report.stale_entries.push(record.entry);
                }
                Err(e) if is_data_error(&e) => {
                    let reason = e
                        .as_db_error()
                        .map_or_else(|| e.to_string(), |db| db.message().to_string());
                    report.refused.push((record.entry, reason));
                }
                Err(e) => {
                    conn.broken = e.is_closed() || e.code().is_none();
                    return Err(classify(e));
                }
            }
        }
        Ok(report)
    }
}

/// Counts one patch's outcome in a report.
fn count_patch(report: &mut SinkReport, entry: usize, outcome: PatchOutcome) {
    match outcome {
        PatchOutcome::Applied => report.applied += 1,
        PatchOutcome::Stale => {
            report.stale += 1;
            report.stale_entries.push(entry);
        }
        PatchOutcome::Gap => report.gaps.push(entry),
    }
}

impl Sink for PostgresSink {
    fn check_record(&self, record: &Record) -> Result<(), String> {
        self.layout.key_cells(record)?;
        if i64::try_from(record.event.aggregate_version).is_err() {
            return Err(plan::too_new(record));
        }
        match record.action {
            Action::Upsert => {
                self.layout.value_cells(record)?;
            }
            Action::Patch { .. } => {
                self.layout.patch_cells(record)?;
            }
            Action::Delete { .. } | Action::Mark => {}
        }
        Ok(())
    }

    fn replica(&self) -> Option<&dyn crate::replica::Replica> {
        Some(self)
    }

    fn apply_batch<'a>(&'a self, batch: &'a [Record]) -> ApplyFuture<'a> {
        Box::pin(self.apply(batch))
    }

    fn freshness(&self) -> FreshnessFuture<'_> {
        Box::pin(async move {
            let c = &self.config;
            // The table is the record: the newest source timestamp and apply in its rows.
            let sql = format!(
                "SELECT (EXTRACT(EPOCH FROM max({u})) * 1000)::int8, \
                        (EXTRACT(EPOCH FROM max({r})) * 1000)::int8 FROM {s}.{t}",
                u = config::quote(&c.updated_at_column),
                r = config::quote(&c.replicated_at_column),
                s = config::quote(&c.schema),
                t = config::quote(&c.table),
            );
            // Two full-table max()es: bounded by the server too (a statement a timed-out
            // client dropped would otherwise run on and hold the connection), and the
            // connection leaves the pool unless the read answered.
            let limited = format!(
                "BEGIN READ ONLY; SET LOCAL statement_timeout = {}",
                c.timeout.0.as_millis().max(1)
            );
            let mut conn = self.connection().await.ok()?;
            conn.broken = true;
            let read = async {
                conn.client.batch_execute(&limited).await.ok()?;
                let row = conn.client.query_one(&sql, &[]).await.ok();
                conn.client.batch_execute("COMMIT").await.ok()?;
                row
            };
            let row = tokio::time::timeout(c.timeout.0, read).await.ok()??;
            conn.broken = false;
            Some(ReplicaFreshness {
                newest_occurred_ms: row.try_get(0).ok().flatten(),
                replicated_ms: row.try_get(1).ok().flatten(),
            })
        })
    }
}

impl ComponentConfig for PostgresConfig {
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::required(
            "url",
            "Postgres URL",
            "the replica's database (`${DATABASE_URL}`)",
        ),
        KeyDoc::required("table", "identifier", "the replica table"),
        KeyDoc::optional("schema", "identifier", "public", "schema of the table"),
        KeyDoc::optional(
            "key",
            "column, { column, from, type } or a list of them",
            "aggregate_id",
            "key column(s) and where their values come from",
        ),
        KeyDoc::optional(
            "columns",
            "map of column to type (or { type, from })",
            "{}",
            "replicated columns: text, bigint, integer, numeric, boolean, timestamptz, jsonb, uuid",
        ),
        KeyDoc::optional(
            "version_column",
            "identifier",
            "source_version",
            "column with the applied version (bigint)",
        ),
        KeyDoc::optional(
            "updated_at_column",
            "identifier",
            "source_updated_at",
            "column with the source's `occurredAt`",
        ),
        KeyDoc::optional(
            "replicated_at_column",
            "identifier",
            "replicated_at",
            "column set to the commit time",
        ),
        KeyDoc::optional(
            "deleted_at_column",
            "identifier",
            "deleted_at",
            "column set under tombstone `mode: mark`",
        ),
        KeyDoc::optional(
            "tombstone_table",
            "identifier",
            "<table>_tombstones",
            "table remembering deleted versions",
        ),
        KeyDoc::optional(
            "create",
            "boolean",
            "false",
            "create the table when absent (otherwise check it)",
        ),
        KeyDoc::optional("pool_size", "integer", "4", "pooled connections"),
        KeyDoc::optional(
            "timeout",
            "duration",
            "10s",
            "timeout of connecting and of each batch transaction",
        ),
        KeyDoc::optional(
            "purge_every",
            "duration",
            "1m",
            "how often expired tombstones are purged",
        ),
    ];

    fn problems(&self) -> Vec<ConfigProblem> {
        self.check()
    }

    fn payload_reads(&self, projected: bool) -> ecst_schemas::PayloadSelection {
        // Unprojected records fill their columns from payload members of the same names.
        if !projected {
            return ecst_schemas::PayloadSelection::All;
        }
        let keys = self.key.columns();
        crate::stage::payload_reads_of(keys.iter().map(|k| k.from.as_str()))
    }

    fn payload_paths(&self, _projected: bool) -> Vec<crate::stage::PayloadPath> {
        // Key columns read the envelope whether or not the record was projected.
        let columns = self.key.columns();
        let many = matches!(self.key, config::KeySpec::Many(_));
        columns
            .iter()
            .enumerate()
            .filter_map(|(i, column)| {
                let key = if many {
                    format!("key.{i}.from")
                } else {
                    "key.from".to_string()
                };
                crate::stage::PayloadPath::of(key, &column.from)
            })
            .collect()
    }

    async fn build_component(&self, ctx: &BuildContext) -> Result<BuiltStage, String> {
        Ok(BuiltStage::Sink(Arc::new(self.build(ctx).await?)))
    }
}

#[cfg(test)]
mod tests;

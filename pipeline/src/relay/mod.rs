//! `ecst relay`: publishes outbox rows to Redis Streams, at least once, in id order.
//!
//! One batch is one Postgres transaction: claim the oldest unpublished rows with
//! `FOR UPDATE SKIP LOCKED`, XADD them in one pipeline, then delete (or mark) them and commit.
//! A crash between XADD and COMMIT publishes the rows again on restart; consumers absorb the
//! duplicate. There is no cursor: a row whose transaction commits late, behind higher ids, is
//! simply the oldest unpublished row on a later pass.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ecst_operators::postgres_tls::parse_postgres_url;
use ecst_operators::redis_pool::{RedisConn, RedisManager, is_transport_error};
use ecst_operators::sinks::postgres::config::quote;
use ecst_schemas::partition::{
    Partitioning, check_partitioned_name, partition_of, partition_stream,
};
use ecst_schemas::wire::{
    BodyLimits, ContentType, FIELD_BODY, FIELD_CONTENT_TYPE, FIELD_TRACEPARENT, encode_body,
};
use ecst_schemas::{Envelope, SchemaRegistry};
use futures::StreamExt;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, Row, Statement};

mod config;

pub use config::{
    BodyEncoding, ClaimCheckSettings, OnPublish, OutboxLocation, RelayConfig, Retention,
    StreamSettings,
};

use crate::outbox::{OUTBOX_COLUMNS, OutboxTable, check_stream_name};
use crate::partitioning::{PartitioningError, ensure_partitioning};
use crate::retry::{Backoff, sleep_or_shutdown};
use crate::shutdown::Shutdown;

/// Counters a relay keeps while it runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows published and removed from the outbox (or marked).
    pub published: AtomicU64,
    /// Rows moved to the dead-letter table.
    pub dead_lettered: AtomicU64,
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Batches that failed and were retried.
    pub retries: AtomicU64,
}

/// A relay that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A URL or name that cannot be used.
    #[error("{0}")]
    Config(String),
    /// The outbox table is missing or lacks columns; retrying would not help.
    #[error("{0}")]
    Schema(String),
    /// A stream's recorded partitioning differs from the relay's; nothing was published.
    #[error(transparent)]
    Partitioning(PartitioningError),
}

/// Why one batch did not commit.
#[derive(Debug)]
enum BatchError {
    Postgres(String),
    Redis {
        message: String,
        transport: bool,
    },
    /// The connection failed during COMMIT: it may or may not have committed.
    CommitUnknown {
        txid: i64,
        message: String,
    },
    /// A stream's partitioning is not the relay's; the batch rolled back.
    Partitioning(PartitioningError),
}

/// The Redis connection, and the streams whose partitioning was checked on it.
struct RedisLink {
    conn: RedisConn,
    checked: HashSet<String>,
}

/// A claimed row turned into a stream entry, or the reason it cannot be.
struct Claimed {
    id: i64,
    entry: Result<Entry, String>,
}

struct Entry {
    /// The logical stream.
    stream: String,
    /// The stream key the entry goes to: the stream's partition of the row's aggregate.
    key: String,
    body: Vec<u8>,
    traceparent: Option<String>,
    /// The claim-checked payload, stored before the entry is added: its key and JSON.
    claim: Option<(String, Vec<u8>)>,
}

struct Session {
    client: Client,
    notified: Arc<Notify>,
    driver: tokio::task::JoinHandle<()>,
    txid: Statement,
    claim: Statement,
    finish: Statement,
    dead_letter: Statement,
    remove: Statement,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

struct Relay<'a> {
    config: &'a RelayConfig,
    outbox: OutboxTable,
    pg: tokio_postgres::Config,
    tls: ecst_operators::postgres_tls::PgTls,
    redis: RedisManager,
    ct: ContentType,
    limits: BodyLimits,
    stats: Arc<RelayStats>,
    /// What rows are checked against under `validate: true`.
    schemas: Option<SchemaRegistry>,
}

/// Runs the relay until `shutdown` fires; the batch in flight finishes first.
pub async fn run(
    config: &RelayConfig,
    mut shutdown: Shutdown,
    stats: Arc<RelayStats>,
) -> Result<(), RelayError> {
    let outbox = OutboxTable::new(&config.outbox.schema, &config.outbox.table)
        .map_err(|e| RelayError::Config(e.to_string()))?;
    let target = parse_postgres_url(config.postgres.expose())
        .map_err(|e| RelayError::Config(format!("postgres {}: {e}", config.postgres)))?;
    let mut pg = target.config;
    if pg.get_application_name().is_none() {
        pg.application_name(format!("ecst-relay/{}", config.name));
    }
    pg.connect_timeout(config.timeout.0);
    let redis = RedisManager::new(&config.redis, config.timeout.0)
        .map_err(|e| RelayError::Config(format!("redis {}: {e}", config.redis)))?;
    let schemas = match (&config.schemas, config.validate) {
        (Some(dir), true) => Some(
            crate::schema_dir::load(dir)
                .map_err(|errors| RelayError::Config(errors.to_string()))?,
        ),
        _ => None,
    };
    let relay = Relay {
        config,
        outbox,
        pg,
        tls: target.tls,
        redis,
        ct: config.content_type.content_type(),
        limits: BodyLimits::default(),
        stats,
        schemas,
    };
    relay.run(&mut shutdown).await
}

impl Relay<'_> {
    async fn run(&self, shutdown: &mut Shutdown) -> Result<(), RelayError> {
        let mut session: Option<Session> = None;
        let mut conn: Option<RedisLink> = None;
        let mut unresolved: Option<i64> = None;
        let mut backoff = Backoff::new();
        let mut last_prune = Instant::now();
        tracing::info!(relay = %self.config.name, outbox = %self.outbox.sql_name(), "Relay started.");
        while !shutdown.is_set() {
            let step = self.step(&mut session, &mut conn, &mut unresolved).await;
            let full = match step {
                Ok(claimed) => {
                    backoff.reset();
                    claimed >= self.config.batch_size as usize
                }
                Err(Step::Fatal(e)) => return Err(e),
                Err(Step::Retry(message)) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    let wait = backoff.next_delay();
                    tracing::warn!(relay = %self.config.name, attempt = backoff.failures(), retry_in_ms = wait.as_millis() as u64, error = %message, "Relay batch failed; the rows stay in the outbox, retrying.");
                    sleep_or_shutdown(wait, shutdown).await;
                    continue;
                }
            };
            if let (Some(keep), Some(s)) = (&self.config.keep_published_for, &session)
                && last_prune.elapsed() >= Duration::from_secs(60)
            {
                last_prune = Instant::now();
                self.prune(s, keep.0).await;
            }
            if full {
                continue;
            }
            let Some(s) = &session else { continue };
            // A notification is only a hint: the poll covers those lost while disconnected.
            tokio::select! {
                _ = s.notified.notified() => {}
                _ = tokio::time::sleep(self.config.poll_interval.0) => {}
                _ = shutdown.wait() => {}
            }
        }
        tracing::info!(relay = %self.config.name, published = self.stats.published.load(Ordering::Relaxed), "Relay stopped.");
        Ok(())
    }

    /// One pass: reconnect what is missing, resolve an ambiguous commit, relay one batch.
    async fn step(
        &self,
        session: &mut Option<Session>,
        conn: &mut Option<RedisLink>,
        unresolved: &mut Option<i64>,
    ) -> Result<usize, Step> {
        if session.as_ref().is_none_or(|s| s.client.is_closed()) {
            *session = None;
            *session = Some(self.open_session().await?);
        }
        let Some(s) = session.as_ref() else {
            return Err(Step::Retry("no Postgres session".into()));
        };
        if let Some(txid) = unresolved.take() {
            self.resolve(s, txid).await;
        }
        if conn.is_none() {
            let mut link = RedisLink {
                conn: self
                    .redis
                    .connect_with_timeout(self.config.timeout.0)
                    .await
                    .map_err(|e| Step::Retry(format!("cannot connect to Redis: {e}")))?,
                checked: HashSet::new(),
            };
            // The streams the relay names are checked up front, even with an empty outbox.
            let named: Vec<&String> = self
                .config
                .streams
                .iter()
                .flatten()
                .map(|(s, _)| s)
                .collect();
            match self.check_partitioning(&mut link, named).await {
                Ok(()) => *conn = Some(link),
                Err(e) if e.is_retryable() => return Err(Step::Retry(format!("Redis: {e}"))),
                Err(e) => return Err(Step::Fatal(RelayError::Partitioning(e))),
            }
        }
        let Some(c) = conn.as_mut() else {
            return Err(Step::Retry("no Redis connection".into()));
        };
        match self.relay_batch(s, c).await {
            Ok(claimed) => Ok(claimed),
            Err(BatchError::Postgres(message)) => {
                *session = None;
                Err(Step::Retry(format!("Postgres: {message}")))
            }
            Err(BatchError::Redis { message, transport }) => {
                if transport {
                    *conn = None;
                }
                Err(Step::Retry(format!("Redis: {message}")))
            }
            Err(BatchError::Partitioning(e)) if !e.is_retryable() => {
                Err(Step::Fatal(RelayError::Partitioning(e)))
            }
            Err(BatchError::Partitioning(e)) => {
                *conn = None;
                Err(Step::Retry(format!("Redis: {e}")))
            }
            Err(BatchError::CommitUnknown { txid, message }) => {
                *session = None;
                *unresolved = Some(txid);
                Err(Step::Retry(format!(
                    "the connection failed during COMMIT ({message}); its outcome is checked on reconnect"
                )))
            }
        }
    }

    async fn open_session(&self) -> Result<Session, Step> {
        let timeout = self.config.timeout.0;
        let (client, mut connection) = within(timeout, self.pg.connect(self.tls.clone()))
            .await
            .map_err(|e| Step::Retry(format!("cannot connect to Postgres: {e}")))?;
        let notified = Arc::new(Notify::new());
        let wake = notified.clone();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "Postgres connection closed.");
                        break;
                    }
                }
            }
            // Wake the loop so that it notices the closed connection now.
            wake.notify_one();
        });
        // LISTEN before the first claim, so no commit falls between the two unseen.
        within(
            timeout,
            client.batch_execute(&format!("LISTEN {}", quote(self.outbox.channel()))),
        )
        .await
        .map_err(|e| Step::Retry(format!("LISTEN failed: {e}")))?;
        self.check_schema(&client).await?;
        let t = self.outbox.sql_name();
        let columns = OUTBOX_COLUMNS.join(", ");
        let prepare = |sql: String| {
            let client = &client;
            async move {
                within(timeout, client.prepare(&sql))
                    .await
                    .map_err(|e| Step::Retry(format!("preparing the relay's statements: {e}")))
            }
        };
        let txid = prepare("SELECT txid_current()".into()).await?;
        let claim = prepare(format!(
            "SELECT id, stream, aggregate_type, aggregate_id, aggregate_version, event_type,
                    event_id::text, schema_version, occurred_at, payload, headers
             FROM {t} WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .await?;
        let finish = prepare(match self.config.on_publish {
            OnPublish::Delete => format!("DELETE FROM {t} WHERE id = ANY($1::bigint[])"),
            OnPublish::Mark => {
                format!("UPDATE {t} SET published_at = now() WHERE id = ANY($1::bigint[])")
            }
        })
        .await?;
        let dead_letter = prepare(format!(
            "INSERT INTO {dl} ({columns}, error)
             SELECT {selected}, e.error
             FROM {t} o JOIN unnest($1::bigint[], $2::text[]) AS e(id, error) ON o.id = e.id",
            dl = self.outbox.dead_letters_sql_name(),
            selected = OUTBOX_COLUMNS
                .iter()
                .map(|c| format!("o.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
        ))
        .await?;
        let remove = prepare(format!("DELETE FROM {t} WHERE id = ANY($1::bigint[])")).await?;
        tracing::info!(relay = %self.config.name, channel = %self.outbox.channel(), "Connected to Postgres; listening for outbox notifications.");
        Ok(Session {
            client,
            notified,
            driver,
            txid,
            claim,
            finish,
            dead_letter,
            remove,
        })
    }

    /// Refuses to run against a table that is not an outbox, naming what is missing or of
    /// the wrong type (reading it would fail on every row).
    async fn check_schema(&self, client: &Client) -> Result<(), Step> {
        let rows = within(
            self.config.timeout.0,
            client.query(
                "SELECT table_name::text, column_name::text, data_type::text,
                        is_nullable::text = 'YES'
                 FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name IN ($2, $3)",
                &[
                    &self.outbox.schema_name(),
                    &self.outbox.table_name(),
                    &format!("{}_dead_letters", self.outbox.table_name()),
                ],
            ),
        )
        .await
        .map_err(|e| Step::Retry(format!("checking the outbox table: {e}")))?;
        // (table, column, type, nullable); information_schema never has NULLs there.
        let columns: Vec<(String, String, String, bool)> = rows
            .iter()
            .filter_map(|r| {
                Some((
                    r.try_get(0).ok()?,
                    r.try_get(1).ok()?,
                    r.try_get(2).ok()?,
                    r.try_get(3).ok()?,
                ))
            })
            .collect();
        let find = |table: &str, column: &str| {
            columns
                .iter()
                .find(|(t, c, _, _)| t == table && c == column)
        };
        let type_of = |table: &str, column: &str| find(table, column).map(|c| c.2.clone());
        let dead_letters = format!("{}_dead_letters", self.outbox.table_name());
        let schema = self.outbox.schema_name();
        let mut problems = Vec::new();
        for table in [self.outbox.table_name(), dead_letters.as_str()] {
            if OUTBOX_COLUMNS.iter().all(|c| type_of(table, c).is_none()) {
                problems.push(format!("table {schema}.{table} does not exist"));
                continue;
            }
            for column in OUTBOX_COLUMNS {
                let wanted = outbox_column_type(column);
                match type_of(table, column) {
                    None => problems.push(format!("table {schema}.{table} lacks column {column}")),
                    Some(t) if !wanted.contains(&t.as_str()) => problems.push(format!(
                        "column {schema}.{table}.{column} is {t}, expected {}",
                        wanted[0]
                    )),
                    Some(_) => {}
                }
            }
        }
        // Rows are claimed, published and removed by id.
        if find(self.outbox.table_name(), "id").is_some_and(|c| c.3) {
            problems.push(format!(
                "column {schema}.{}.id allows NULL; it must be NOT NULL",
                self.outbox.table_name()
            ));
        }
        if type_of(&dead_letters, "stream").is_some() && type_of(&dead_letters, "error").is_none() {
            problems.push(format!("table {schema}.{dead_letters} lacks column error"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Step::Fatal(RelayError::Schema(format!(
                "{}; create the outbox with `ecst outbox install` or `ecst outbox ddl | psql`",
                problems.join("; ")
            ))))
        }
    }

    /// Checks (once per connection) that each stream's recorded partitioning is the relay's,
    /// recording it for a partitioned stream that has none.
    async fn check_partitioning<'s>(
        &self,
        link: &mut RedisLink,
        streams: impl IntoIterator<Item = &'s String>,
    ) -> Result<(), PartitioningError> {
        for stream in streams {
            if link.checked.contains(stream) {
                continue;
            }
            let wanted = Partitioning::new(self.config.partitions_for(stream));
            ensure_partitioning(&mut link.conn, stream, &wanted, "relay").await?;
            link.checked.insert(stream.clone());
        }
        Ok(())
    }

    async fn relay_batch(&self, s: &Session, link: &mut RedisLink) -> Result<usize, BatchError> {
        let timeout = self.config.timeout.0;
        let pg = |e: String| BatchError::Postgres(e);
        within(timeout, s.client.batch_execute("BEGIN"))
            .await
            .map_err(pg)?;
        let txid: i64 = within(timeout, s.client.query_one(&s.txid, &[]))
            .await
            .map_err(pg)?
            .try_get(0)
            .map_err(|e| pg(e.to_string()))?;
        let limit = i64::from(self.config.batch_size);
        let rows = within(timeout, s.client.query(&s.claim, &[&limit]))
            .await
            .map_err(pg)?;
        if rows.is_empty() {
            within(timeout, s.client.batch_execute("COMMIT"))
                .await
                .map_err(pg)?;
            return Ok(0);
        }
        let Some(mut claimed) = rows
            .iter()
            .map(|row| self.encode(row))
            .collect::<Option<Vec<Claimed>>>()
        else {
            let _ = within(timeout, s.client.batch_execute("ROLLBACK")).await;
            return Err(BatchError::Postgres(
                "an outbox row has a NULL id (the column must be NOT NULL)".into(),
            ));
        };
        // Each traced row gets a producer span, child of the span that wrote the row; the
        // entry carries this span's context on, so the consumer's span is its child. The spans
        // end with the transaction.
        let _publish_spans = self.trace_publishes(&mut claimed);
        // Before any XADD: a refused stream publishes nothing of the batch.
        let streams: Vec<&String> = claimed
            .iter()
            .filter_map(|c| c.entry.as_ref().ok().map(|e| &e.stream))
            .collect();
        if let Err(e) = self.check_partitioning(link, streams).await {
            let _ = within(timeout, s.client.batch_execute("ROLLBACK")).await;
            return Err(BatchError::Partitioning(e));
        }
        if let Err(e) = self.store_claims(&mut link.conn, &claimed).await {
            let _ = within(timeout, s.client.batch_execute("ROLLBACK")).await;
            return Err(e);
        }
        let outcome = match self.publish(&mut link.conn, &claimed).await {
            Ok(outcome) => outcome,
            Err(e) => {
                let _ = within(timeout, s.client.batch_execute("ROLLBACK")).await;
                return Err(e);
            }
        };
        if !outcome.dead.is_empty() {
            let (ids, errors): (Vec<i64>, Vec<String>) = outcome.dead.iter().cloned().unzip();
            within(timeout, s.client.execute(&s.dead_letter, &[&ids, &errors]))
                .await
                .map_err(pg)?;
            within(timeout, s.client.execute(&s.remove, &[&ids]))
                .await
                .map_err(pg)?;
        }
        within(timeout, s.client.execute(&s.finish, &[&outcome.published]))
            .await
            .map_err(pg)?;
        match tokio::time::timeout(timeout, s.client.batch_execute("COMMIT")).await {
            Ok(Ok(())) => {}
            // The server answered: it did not commit.
            Ok(Err(e)) if e.code().is_some() => return Err(BatchError::Postgres(e.to_string())),
            Ok(Err(e)) => {
                return Err(BatchError::CommitUnknown {
                    txid,
                    message: e.to_string(),
                });
            }
            Err(_) => {
                return Err(BatchError::CommitUnknown {
                    txid,
                    message: format!("no answer within {timeout:?}"),
                });
            }
        }
        for (id, reason) in &outcome.dead {
            tracing::error!(relay = %self.config.name, outbox_id = id, reason = %reason, "Outbox row cannot be published; moved to the dead-letter table.");
        }
        self.stats
            .published
            .fetch_add(outcome.published.len() as u64, Ordering::Relaxed);
        self.stats
            .dead_lettered
            .fetch_add(outcome.dead.len() as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        Ok(rows.len())
    }

    fn trace_publishes(&self, claimed: &mut [Claimed]) -> Vec<tracing::Span> {
        if !crate::telemetry::exporting() {
            return Vec::new();
        }
        let mut spans = Vec::new();
        for c in claimed.iter_mut() {
            let Ok(entry) = &mut c.entry else { continue };
            let Some(traceparent) = entry.traceparent.clone() else {
                continue;
            };
            let span = tracing::info_span!(
                parent: None,
                "ecst.relay.publish",
                otel.kind = "producer",
                messaging.system = "redis",
                messaging.operation.type = "publish",
                messaging.destination.name = %entry.stream,
                ecst.outbox.id = c.id,
                ecst.relay = %self.config.name,
            );
            if crate::telemetry::adopt(&span, &traceparent) {
                if let Some(own) = crate::telemetry::traceparent_of(&span) {
                    entry.traceparent = Some(own);
                }
                spans.push(span);
            }
        }
        spans
    }

    /// Stores the batch's claim-checked payloads (`SET key body EX ttl`) before any XADD, so no
    /// consumer reads a reference to a body not yet stored.
    async fn store_claims(
        &self,
        conn: &mut RedisConn,
        claimed: &[Claimed],
    ) -> Result<(), BatchError> {
        let Some(settings) = &self.config.claim_check else {
            return Ok(());
        };
        let ttl = settings.ttl.0.as_secs().max(1);
        let claims = claimed
            .iter()
            .filter_map(|c| c.entry.as_ref().ok()?.claim.as_ref());
        // One pipeline on a single server; a cluster routes each single-key SET on its own.
        let per_key = matches!(conn, RedisConn::Cluster(_));
        let mut pipe = redis::pipe();
        for (key, body) in claims {
            pipe.cmd("SET")
                .arg(key)
                .arg(body)
                .arg("EX")
                .arg(ttl)
                .ignore();
            if per_key {
                self.run_claims(conn, &pipe).await?;
                pipe = redis::pipe();
            }
        }
        if !pipe.is_empty() {
            self.run_claims(conn, &pipe).await?;
        }
        Ok(())
    }

    async fn run_claims(
        &self,
        conn: &mut RedisConn,
        pipe: &redis::Pipeline,
    ) -> Result<(), BatchError> {
        pipe.query_async::<()>(conn)
            .await
            .map_err(|e| BatchError::Redis {
                transport: is_transport_error(&e),
                message: format!("storing claim-checked payloads: {e}"),
            })
    }

    /// XADDs every encodable row (in one pipeline, or one per stream key on a cluster); per-row
    /// refusals become dead letters.
    async fn publish(
        &self,
        conn: &mut RedisConn,
        claimed: &[Claimed],
    ) -> Result<Published, BatchError> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // A cluster pipeline must stay within one slot: one pipeline per stream key there
        // (each keeps its rows' order), one for the whole batch on a single server.
        let per_key = matches!(conn, RedisConn::Cluster(_));
        let mut groups: Vec<(redis::Pipeline, Vec<(i64, &str)>)> = Vec::new();
        let mut group_of: HashMap<&str, usize> = HashMap::new();
        let mut out = Published::default();
        for c in claimed {
            match &c.entry {
                Err(reason) => out.dead.push((c.id, reason.clone())),
                Ok(entry) => {
                    let group_key = if per_key { entry.key.as_str() } else { "" };
                    let g = *group_of.entry(group_key).or_insert_with(|| {
                        let mut pipe = redis::pipe();
                        pipe.ignore_errors();
                        groups.push((pipe, Vec::new()));
                        groups.len() - 1
                    });
                    let (pipe, sent) = &mut groups[g];
                    let cmd = pipe.cmd("XADD").arg(&entry.key);
                    let partitions = self.config.partitions_for(&entry.stream);
                    if let Some((strategy, threshold)) = self
                        .config
                        .retention_for(&entry.stream)
                        .and_then(|r| r.xadd_args(now_ms, partitions))
                    {
                        cmd.arg(strategy).arg("~").arg(threshold);
                    }
                    cmd.arg("*").arg(FIELD_BODY).arg(&entry.body);
                    if self.ct != ContentType::Json {
                        cmd.arg(FIELD_CONTENT_TYPE).arg(self.ct.as_str());
                    }
                    if let Some(tp) = &entry.traceparent {
                        cmd.arg(FIELD_TRACEPARENT).arg(tp);
                    }
                    sent.push((c.id, entry.key.as_str()));
                }
            }
        }
        for (pipe, sent) in groups {
            let replies: Vec<redis::Value> =
                pipe.query_async(conn)
                    .await
                    .map_err(|e| BatchError::Redis {
                        transport: is_transport_error(&e),
                        message: e.to_string(),
                    })?;
            for ((id, key), reply) in sent.into_iter().zip(replies) {
                match reply {
                    redis::Value::ServerError(e) if e.code() == "WRONGTYPE" => out.dead.push((
                        id,
                        format!("Redis refused XADD: the key `{key}` is not a stream ({e})"),
                    )),
                    // Anything else (OOM, READONLY, LOADING) is the server's state, not the row's.
                    redis::Value::ServerError(e) => {
                        return Err(BatchError::Redis {
                            message: format!("XADD refused: {e}"),
                            transport: false,
                        });
                    }
                    _ => out.published.push(id),
                }
            }
        }
        Ok(out)
    }

    /// Builds a row's stream entry, or says why the row cannot be published; `None` for a
    /// row without an id (the schema check makes `id` NOT NULL, so only a changed table).
    fn encode(&self, row: &Row) -> Option<Claimed> {
        let id: i64 = column(row, "id").ok()?;
        Some(Claimed {
            id,
            entry: self.entry(id, row),
        })
    }

    fn entry(&self, id: i64, row: &Row) -> Result<Entry, String> {
        let stream: String = column(row, "stream")?;
        check_stream_name(&stream)?;
        if let Some(allowed) = &self.config.streams
            && !allowed.contains_key(&stream)
        {
            return Err(format!(
                "stream {stream:?} is not among the relay's `streams`"
            ));
        }
        let aggregate_id: String = column(row, "aggregate_id")?;
        let partitions = self.config.partitions_for(&stream);
        if aggregate_id.is_empty() {
            return Err(if partitions > 1 {
                "aggregate_id is empty: the row has no partition".into()
            } else {
                "aggregate_id is empty".into()
            });
        }
        if partitions > 1 {
            check_partitioned_name(&stream)?;
        }
        let key = partition_stream(&stream, partition_of(&aggregate_id, partitions), partitions);
        let version: i64 = column(row, "aggregate_version")?;
        let aggregate_version = u64::try_from(version)
            .map_err(|_| format!("aggregate_version {version} is negative"))?;
        let payload: Option<Value> = row
            .try_get("payload")
            .map_err(|e| format!("column payload cannot be read: {e}"))?;
        let payload = match payload {
            None | Some(Value::Null) => None,
            Some(Value::Object(state)) => Some(Value::Object(state)),
            Some(other) => {
                return Err(format!(
                    "payload must be a JSON object or NULL, got {}",
                    ecst_schemas::envelope::json_type(&other)
                ));
            }
        };
        let deleted = payload.is_none();
        let occurred_at: OffsetDateTime = column(row, "occurred_at")?;
        let mut envelope = Envelope {
            schema_version: Some(i64::from(column::<i32>(row, "schema_version")?)),
            event_id: Some(column(row, "event_id")?),
            event_type: Some(column(row, "event_type")?),
            occurred_at: Some(occurred_at),
            aggregate_type: Some(column(row, "aggregate_type")?),
            aggregate_id,
            aggregate_version,
            base_version: None,
            payload,
            payload_ref: None,
            deleted,
        };
        if let Some(schemas) = &self.schemas {
            schemas.check_event(&stream, &envelope)?;
        }
        let mut claim = None;
        if let Some(settings) = &self.config.claim_check
            && let Some(payload) = &envelope.payload
        {
            let json = serde_json::to_vec(payload)
                .map_err(|e| format!("cannot encode the payload: {e}"))?;
            if json.len() > settings.over_bytes {
                let reference = ecst_schemas::ClaimRef::redis(&settings.prefix, &json);
                claim = Some((reference.key.clone(), json));
                envelope.payload = None;
                envelope.payload_ref = Some(reference);
            }
        }
        let body =
            encode_body(&envelope, self.ct).map_err(|e| format!("cannot encode the event: {e}"))?;
        if body.len() > self.limits.max_bytes {
            return Err(format!(
                "encoded event is {} bytes; consumers accept at most {}",
                body.len(),
                self.limits.max_bytes
            ));
        }
        // Headers only carry trace context: NULL (or not an object) means none.
        let headers: Option<Value> = row
            .try_get("headers")
            .map_err(|e| format!("column headers cannot be read: {e}"))?;
        let traceparent = match headers.as_ref().and_then(|h| h.get("traceparent")) {
            Some(Value::String(tp)) if valid_traceparent(tp) => Some(tp.clone()),
            Some(other) => {
                tracing::warn!(relay = %self.config.name, outbox_id = id, traceparent = %other, "Ignoring a malformed traceparent header.");
                None
            }
            None => None,
        };
        Ok(Entry {
            stream,
            key,
            body,
            traceparent,
            claim,
        })
    }

    /// Finds out whether a transaction whose COMMIT lost its connection committed.
    async fn resolve(&self, s: &Session, txid: i64) {
        let deadline = Instant::now() + self.config.timeout.0.max(Duration::from_secs(5));
        loop {
            let status = within(
                self.config.timeout.0,
                s.client.query_one("SELECT txid_status($1)::text", &[&txid]),
            )
            .await
            .and_then(|row| {
                row.try_get::<_, Option<String>>(0)
                    .map_err(|e| e.to_string())
            });
            match status.as_ref().map(|s| s.as_deref()) {
                Ok(Some("committed")) => {
                    tracing::warn!(relay = %self.config.name, txid, "The interrupted COMMIT did commit: its rows are published and gone from the outbox.");
                    return;
                }
                Ok(None) => {
                    tracing::warn!(relay = %self.config.name, txid, "The interrupted COMMIT's outcome is too old for Postgres to tell; if it did not commit, its rows are published again (consumers ignore the duplicates).");
                    return;
                }
                Ok(Some("aborted")) => {
                    tracing::warn!(relay = %self.config.name, txid, "The interrupted COMMIT did not commit: its rows stay in the outbox and are published again (consumers ignore the duplicates).");
                    return;
                }
                // Still "in progress": the server has not noticed the lost connection yet.
                Ok(Some(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Some(state)) => {
                    tracing::error!(relay = %self.config.name, txid, state, "The interrupted COMMIT's outcome is still unknown; if it did not commit its rows are published again.");
                    return;
                }
                Err(e) => {
                    tracing::error!(relay = %self.config.name, txid, error = %e, "Cannot check the interrupted COMMIT's outcome; if it did not commit its rows are published again.");
                    return;
                }
            }
        }
    }

    async fn prune(&self, s: &Session, keep: Duration) {
        let sql = format!(
            "DELETE FROM {} WHERE published_at < now() - make_interval(secs => $1::float8)",
            self.outbox.sql_name()
        );
        match within(
            self.config.timeout.0,
            s.client.execute(&sql, &[&keep.as_secs_f64()]),
        )
        .await
        {
            Ok(n) if n > 0 => {
                tracing::info!(relay = %self.config.name, rows = n, "Deleted published outbox rows past keep_published_for.")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(relay = %self.config.name, error = %e, "Pruning published outbox rows failed; will try again.")
            }
        }
    }
}

/// The types (as `information_schema` names them) the relay reads each column as.
fn outbox_column_type(column: &str) -> &'static [&'static str] {
    match column {
        "id" | "aggregate_version" => &["bigint"],
        "schema_version" => &["integer"],
        "event_id" => &["uuid"],
        "occurred_at" | "created_at" | "published_at" => &["timestamp with time zone"],
        "payload" | "headers" => &["jsonb"],
        _ => &["text", "character varying"],
    }
}

enum Step {
    Retry(String),
    Fatal(RelayError),
}

#[derive(Default)]
struct Published {
    published: Vec<i64>,
    dead: Vec<(i64, String)>,
}

async fn within<T, E: std::fmt::Display>(
    timeout: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Reads a column that must hold a value; the error names it (it becomes the dead letter's
/// reason).
fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    name: &str,
) -> Result<T, String> {
    match row.try_get::<_, Option<T>>(name) {
        Ok(Some(value)) => Ok(value),
        Ok(None) => Err(format!("column {name} is NULL")),
        Err(e) => Err(format!("column {name} cannot be read: {e}")),
    }
}

/// `00-<32 hex>-<16 hex>-<2 hex>`, W3C Trace Context version 00.
fn valid_traceparent(tp: &str) -> bool {
    let parts: Vec<&str> = tp.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "0".repeat(32)
        && parts[2] != "0".repeat(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_checked_not_trusted() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent("00-xyz-00f067aa0ba902b7-01"));
        assert!(!valid_traceparent(""));
    }
}

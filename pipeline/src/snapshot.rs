//! `ecst snapshot serve`: the current state of an entity, from the source database, as NDJSON
//! paged by id — what a new or reset consumer bootstraps from.
//!
//! `GET /snapshot/{entity}?after=<id>&limit=<n>` answers lines
//! `{"aggregateId": …, "aggregateVersion": …, "payload": {…}}` ordered by id, at most `limit`
//! of them, after the id `after` (exclusive). The next page starts after the last line's
//! `aggregateId`; an empty page is the end. Rows are streamed from Postgres as they come, never
//! held as a whole page.
//!
//! Single-entity reads, for consumers of thin events (the `fetch` stage) and gap repair:
//! `GET /snapshot/{entity}/{id}` answers one row as a JSON object, or 404; `POST
//! /snapshot/{entity}:batch` with `{"ids": [...]}` (at most `max_batch_ids`, 413 beyond)
//! answers the rows found as NDJSON, in no particular order (an id absent is missing). The id
//! `count` is taken by the count route: read it through `:batch`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bb8_postgres::PostgresConnectionManager;
use ecst_operators::postgres_tls::{PgTls, parse_postgres_url};
use ecst_operators::sinks::postgres::config::{quote, valid_identifier};
use ecst_operators::{ConfigDuration, SecretUrl};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_postgres::types::ToSql;

use crate::shutdown::Shutdown;

type PgPool = bb8::Pool<PostgresConnectionManager<PgTls>>;

/// A snapshot server file (`snapshot.yaml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Address to listen on (default `127.0.0.1:8081`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Postgres URL of the source database.
    pub postgres: SecretUrl,
    /// Environment variable holding the bearer token clients must send (default: no auth).
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// Lines per page when the request gives no `limit` (default 1000).
    #[serde(default = "default_limit")]
    pub default_limit: u32,
    /// Largest `limit` accepted (default 10000).
    #[serde(default = "default_max_limit")]
    pub max_limit: u32,
    /// Pooled connections (default 4).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Most ids one `POST {entity}:batch` may ask for (default 1000).
    #[serde(default = "default_max_batch_ids")]
    pub max_batch_ids: u32,
    /// Connect timeout and the longest a page may take (default 30s).
    #[serde(default = "default_timeout")]
    pub timeout: ConfigDuration,
    /// Entities served, by the name in the URL.
    pub entities: BTreeMap<String, EntityConfig>,
}

/// One entity: a table and its columns, or a query.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityConfig {
    /// Schema of `table` (default `public`).
    #[serde(default = "default_schema")]
    pub schema: String,
    /// The entity's table.
    #[serde(default)]
    pub table: Option<String>,
    /// Id column: unique, ordered; also `aggregateId` (default `id`).
    #[serde(default = "default_id")]
    pub id: String,
    /// Version column, `aggregateVersion` (default `version`).
    #[serde(default = "default_version")]
    pub version: String,
    /// `timestamptz` column sent as `occurredAt` (default: none).
    #[serde(default)]
    pub occurred_at: Option<String>,
    /// Payload keys and the columns they come from (default: every column, by name).
    #[serde(default)]
    pub payload: Option<BTreeMap<String, String>>,
    /// Instead of `table`: a query returning (aggregate id as text, version as bigint,
    /// payload as jsonb) ordered by id, taking `$1` = `after` (text, NULL on the first page)
    /// and `$2` = `limit` (bigint). Alias the text id (`id::text AS aggregate_id`): a bare
    /// `ORDER BY id` would sort by the text.
    #[serde(default)]
    pub query: Option<String>,
    /// With `query`: a query returning the same columns for the ids in `$1` (a text array),
    /// for single-entity reads (without it, a `query` entity answers them with 501).
    #[serde(default)]
    pub query_by_ids: Option<String>,
}

fn default_listen() -> String {
    "127.0.0.1:8081".into()
}
fn default_limit() -> u32 {
    1000
}
fn default_max_limit() -> u32 {
    10_000
}
fn default_max_batch_ids() -> u32 {
    1000
}
fn default_pool_size() -> u32 {
    4
}
fn default_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}
fn default_schema() -> String {
    "public".into()
}
fn default_id() -> String {
    "id".into()
}
fn default_version() -> String {
    "version".into()
}

impl SnapshotConfig {
    /// Every problem `validate` reports, as (key path, message).
    pub fn check(&self) -> Vec<(Vec<String>, String)> {
        let mut problems = Vec::new();
        let at = |parts: &[&str]| parts.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        if self.listen.parse::<SocketAddr>().is_err() {
            problems.push((
                at(&["listen"]),
                format!("`{}` is not host:port (e.g. 127.0.0.1:8081)", self.listen),
            ));
        }
        if let Err(e) = parse_postgres_url(self.postgres.expose()) {
            problems.push((at(&["postgres"]), format!("{}: {e}", self.postgres)));
        }
        if self.max_limit == 0 || self.default_limit == 0 || self.default_limit > self.max_limit {
            problems.push((
                at(&["default_limit"]),
                "default_limit and max_limit must be more than 0, default_limit at most max_limit"
                    .into(),
            ));
        }
        if self.max_batch_ids == 0 {
            problems.push((at(&["max_batch_ids"]), "must be more than 0".into()));
        }
        if self.pool_size == 0 {
            problems.push((at(&["pool_size"]), "must be more than 0".into()));
        }
        if self.entities.is_empty() {
            problems.push((at(&["entities"]), "serve at least one entity".into()));
        }
        for (name, entity) in &self.entities {
            let key = |k: &str| vec!["entities".to_string(), name.clone(), k.to_string()];
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                || name.is_empty()
            {
                problems.push((
                    vec!["entities".into(), name.clone()],
                    "entity names are letters, digits, `_`, `-` or `.` (they are URL path segments)".into(),
                ));
            }
            match (&entity.table, &entity.query) {
                (Some(_), Some(_)) => {
                    problems.push((key("query"), "give `table` or `query`, not both".into()))
                }
                (None, None) => problems.push((
                    vec!["entities".into(), name.clone()],
                    "give `table` (with `id`, `version`, `payload`) or `query`".into(),
                )),
                (None, Some(q)) => {
                    if !(q.contains("$1") && q.contains("$2")) {
                        problems.push((
                            key("query"),
                            "the query must use $1 (after, text or NULL) and $2 (limit)".into(),
                        ));
                    }
                    if let Some(q) = &entity.query_by_ids
                        && !q.contains("$1")
                    {
                        problems.push((
                            key("query_by_ids"),
                            "the query must use $1 (the ids, a text array)".into(),
                        ));
                    }
                }
                (Some(table), None) => {
                    if entity.query_by_ids.is_some() {
                        problems.push((
                            key("query_by_ids"),
                            "goes with `query`; a `table` entity reads by id itself".into(),
                        ));
                    }
                    let mut names = vec![
                        ("schema", entity.schema.as_str()),
                        ("table", table.as_str()),
                        ("id", entity.id.as_str()),
                        ("version", entity.version.as_str()),
                    ];
                    if let Some(column) = &entity.occurred_at {
                        names.push(("occurred_at", column.as_str()));
                    }
                    for column in entity.payload.iter().flat_map(|p| p.values()) {
                        names.push(("payload", column.as_str()));
                    }
                    for (k, n) in names {
                        if !valid_identifier(n) {
                            problems.push((key(k), format!("`{n}` is not a plain SQL identifier")));
                        }
                    }
                }
            }
        }
        problems
    }
}

/// A snapshot server that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Bad settings or environment.
    #[error("{0}")]
    Config(String),
    /// A table or column the config names is missing.
    #[error("{0}")]
    Schema(String),
    /// Cannot listen or serve.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The statements one entity is served with.
struct Entity {
    first_page: String,
    next_page: String,
    count: Option<String>,
    /// The rows of the ids in `$1` (text array), for single-entity reads.
    by_ids: Option<String>,
    /// The id column's type, for checking `after` before it reaches SQL.
    id_type: Option<String>,
}

struct App {
    pool: PgPool,
    tls: PgTls,
    entities: BTreeMap<String, Entity>,
    token: Option<String>,
    default_limit: u32,
    max_limit: u32,
    max_batch_ids: u32,
    timeout: Duration,
}

/// Serves until `shutdown` fires; requests in progress finish first.
pub async fn serve(config: &SnapshotConfig, mut shutdown: Shutdown) -> Result<(), SnapshotError> {
    let app = Arc::new(build(config).await?);
    let addr: SocketAddr = config.listen.parse().map_err(|_| {
        SnapshotError::Config(format!("listen: `{}` is not host:port", config.listen))
    })?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, entities = ?app.entities.keys().collect::<Vec<_>>(), "Snapshot server listening.");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await?;
    Ok(())
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        // `{entity}:batch` is one path segment: the POST of the page route takes it.
        .route("/snapshot/{entity}", get(page).post(batch))
        .route("/snapshot/{entity}/count", get(count))
        .route("/snapshot/{entity}/{id}", get(one))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(app)
}

async fn build(config: &SnapshotConfig) -> Result<App, SnapshotError> {
    let token = match &config.bearer_token_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(token) if !token.is_empty() => Some(token),
            _ => {
                return Err(SnapshotError::Config(format!(
                    "bearer_token_env: the environment variable {var} is not set (or empty)"
                )));
            }
        },
    };
    let target = parse_postgres_url(config.postgres.expose())
        .map_err(|e| SnapshotError::Config(format!("postgres {}: {e}", config.postgres)))?;
    let mut pg = target.config;
    if pg.get_application_name().is_none() {
        pg.application_name("ecst-snapshot");
    }
    pg.connect_timeout(config.timeout.0);
    let pool = bb8::Pool::builder()
        .max_size(config.pool_size)
        .connection_timeout(config.timeout.0)
        .build_unchecked(PostgresConnectionManager::new(pg, target.tls.clone()));
    let conn = pool.get().await.map_err(|e| {
        SnapshotError::Config(format!(
            "cannot connect to Postgres {}: {e}",
            config.postgres
        ))
    })?;
    let mut entities = BTreeMap::new();
    for (name, entity) in &config.entities {
        entities.insert(name.clone(), prepare_entity(&conn, name, entity).await?);
    }
    drop(conn);
    Ok(App {
        pool,
        tls: target.tls,
        entities,
        token,
        default_limit: config.default_limit,
        max_limit: config.max_limit,
        max_batch_ids: config.max_batch_ids,
        timeout: config.timeout.0,
    })
}

/// Checks the entity's table and columns now, so a typo refuses to start instead of
/// failing every request.
async fn prepare_entity(
    client: &tokio_postgres::Client,
    name: &str,
    entity: &EntityConfig,
) -> Result<Entity, SnapshotError> {
    let Some(table) = &entity.table else {
        let query = entity.query.clone().unwrap_or_default();
        client.prepare(&query).await.map_err(|e| {
            SnapshotError::Schema(format!(
                "entities.{name}.query does not prepare: {}",
                db_message(&e)
            ))
        })?;
        if let Some(by_ids) = &entity.query_by_ids {
            client.prepare(by_ids).await.map_err(|e| {
                SnapshotError::Schema(format!(
                    "entities.{name}.query_by_ids does not prepare: {}",
                    db_message(&e)
                ))
            })?;
        }
        return Ok(Entity {
            first_page: query.clone(),
            next_page: query,
            count: None,
            by_ids: entity.query_by_ids.clone(),
            id_type: None,
        });
    };
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&entity.schema, table],
        )
        .await
        .map_err(|e| SnapshotError::Schema(format!("entities.{name}: {}", db_message(&e))))?;
    if rows.is_empty() {
        return Err(SnapshotError::Schema(format!(
            "entities.{name}.table: table {}.{table} does not exist",
            entity.schema
        )));
    }
    let columns: BTreeMap<String, String> = rows
        .iter()
        .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
        .collect();
    let mut wanted = vec![("id", &entity.id), ("version", &entity.version)];
    if let Some(column) = &entity.occurred_at {
        wanted.push(("occurred_at", column));
    }
    for column in entity.payload.iter().flat_map(|p| p.values()) {
        wanted.push(("payload", column));
    }
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(_, c)| !columns.contains_key(c.as_str()))
        .map(|(k, c)| format!("{k} column `{c}`"))
        .collect();
    if !missing.is_empty() {
        return Err(SnapshotError::Schema(format!(
            "entities.{name}: table {}.{table} has no {}",
            entity.schema,
            missing.join(", ")
        )));
    }
    let qualified = format!("{}.{}", quote(&entity.schema), quote(table));
    let id = quote(&entity.id);
    let id_type = columns.get(&entity.id).cloned().unwrap_or_default();
    let payload = match &entity.payload {
        None => "to_jsonb(t)".to_string(),
        Some(map) => {
            let pairs: Vec<String> = map
                .iter()
                .map(|(key, column)| format!("'{}', t.{}", key.replace('\'', "''"), quote(column)))
                .collect();
            format!("jsonb_build_object({})", pairs.join(", "))
        }
    };
    let occurred_at = entity
        .occurred_at
        .as_ref()
        .map_or(String::new(), |c| format!(", t.{}::timestamptz", quote(c)));
    let select = format!(
        "SELECT t.{id}::text, t.{version}::bigint, {payload}{occurred_at} FROM {qualified} t",
        version = quote(&entity.version)
    );
    // Two statements rather than `$1 IS NULL OR id > $1`, which defeats the id index.
    Ok(Entity {
        first_page: format!("{select} WHERE $1::text IS NULL ORDER BY t.{id} LIMIT $2"),
        next_page: format!("{select} WHERE t.{id} > $1::text::{id_type} ORDER BY t.{id} LIMIT $2"),
        count: Some(format!("SELECT count(*) FROM {qualified}")),
        by_ids: Some(format!(
            "{select} WHERE t.{id} = ANY($1::text[]::{id_type}[])"
        )),
        id_type: Some(id_type),
    })
}

#[derive(Deserialize)]
struct PageQuery {
    after: Option<String>,
    limit: Option<String>,
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    problem_coded(status, None, message)
}

/// A 404 body: `code` tells a client `not_found` (no such id: the entity was deleted) from
/// `unknown_entity` (a configuration to fix), which a proxy's or another server's 404 is not.
fn not_found(code: &'static str, message: impl Into<String>) -> Response {
    problem_coded(StatusCode::NOT_FOUND, Some(code), message)
}

fn problem_coded(status: StatusCode, code: Option<&str>, message: impl Into<String>) -> Response {
    let body = match code {
        Some(code) => json!({"error": message.into(), "code": code}),
        None => json!({"error": message.into()}),
    };
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let Some(expected) = &app.token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare in time independent of where the first difference is.
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Whether `after` fits the id column, so that a bad cursor is a 400 and not a SQL error.
fn check_after(after: &str, id_type: Option<&str>) -> Result<(), String> {
    let fits = match id_type {
        Some("bigint") => after.parse::<i64>().is_ok(),
        Some("integer") => after.parse::<i32>().is_ok(),
        Some("smallint") => after.parse::<i16>().is_ok(),
        Some("uuid") => uuid::Uuid::parse_str(after).is_ok(),
        _ => true,
    };
    if fits {
        Ok(())
    } else {
        Err(format!(
            "after={after:?} is not a valid {} id",
            id_type.unwrap_or("entity")
        ))
    }
}

async fn page(
    State(app): State<Arc<App>>,
    Path(entity_name): Path<String>,
    Query(query): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&app, &headers) {
        return problem(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    }
    let Some(entity) = app.entities.get(&entity_name) else {
        return not_found("unknown_entity", format!("no entity `{entity_name}`"));
    };
    let limit = match query.limit.as_deref().map(str::parse::<u32>) {
        None => app.default_limit,
        Some(Ok(n)) if (1..=app.max_limit).contains(&n) => n,
        _ => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("limit must be a whole number from 1 to {}", app.max_limit),
            );
        }
    };
    if let Some(after) = &query.after
        && let Err(message) = check_after(after, entity.id_type.as_deref())
    {
        return problem(StatusCode::BAD_REQUEST, message);
    }
    let conn = match app.pool.get_owned().await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(error = %e, "Snapshot request: no Postgres connection.");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the source database is unavailable",
            );
        }
    };
    let sql = if query.after.is_some() {
        &entity.next_page
    } else {
        &entity.first_page
    };
    let limit = i64::from(limit);
    let params: [&(dyn ToSql + Sync); 2] = [&query.after, &limit];
    // The whole page, however slow the client, holds the connection at most this long.
    let deadline = tokio::time::Instant::now() + app.timeout;
    let rows = match tokio::time::timeout_at(deadline, conn.query_raw(sql.as_str(), params)).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => return query_failed(&entity_name, &e),
        Err(_) => return timed_out(&app, &conn),
    };
    let mut rows = Box::pin(rows);
    // The first row decides the status: an error before any line is still a clean answer.
    let first = match tokio::time::timeout_at(deadline, rows.next()).await {
        Ok(Some(Err(e))) => return query_failed(&entity_name, &e),
        Ok(first) => first,
        Err(_) => return timed_out(&app, &conn),
    };
    let body = match first {
        // An exhausted RowStream must not be polled again.
        None => Body::empty(),
        Some(first) => {
            // Rows are read by a task that hands chunks over a small channel: a client that
            // stops reading cannot keep the connection past the deadline.
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
            let mut chunks = Box::pin(ndjson(
                futures::stream::iter([first]).chain(rows.fuse()),
                conn,
                entity_name.clone(),
            ));
            let entity = entity_name.clone();
            tokio::spawn(async move {
                loop {
                    let chunk = match tokio::time::timeout_at(deadline, chunks.next()).await {
                        Ok(Some(chunk)) => chunk,
                        Ok(None) => return,
                        Err(_) => Err(std::io::Error::other("page deadline passed")),
                    };
                    let failed = chunk.is_err();
                    let sent = tokio::time::timeout_at(deadline, tx.send(chunk)).await;
                    if failed || !matches!(sent, Ok(Ok(()))) {
                        tracing::warn!(entity = %entity, "Snapshot page cut short: the deadline passed or the client went away.");
                        return;
                    }
                }
            });
            Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|chunk| (chunk, rx))
            }))
        }
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .unwrap_or_else(|_| {
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot build the response",
            )
        })
}

/// A query past its deadline: cancelled on the server, so that the pooled connection is not
/// handed to the next request still busy.
fn timed_out(app: &App, conn: &tokio_postgres::Client) -> Response {
    let token = conn.cancel_token();
    let tls = app.tls.clone();
    tokio::spawn(async move {
        let _ = token.cancel_query(tls).await;
    });
    problem(
        StatusCode::GATEWAY_TIMEOUT,
        "the source database did not answer in time",
    )
}

fn query_failed(entity: &str, e: &tokio_postgres::Error) -> Response {
    // SQLSTATE class 22 (data exception): the cursor did not fit the query's types.
    if e.code().is_some_and(|c| c.code().starts_with("22")) {
        return problem(
            StatusCode::BAD_REQUEST,
            format!("invalid after: {}", db_message(e)),
        );
    }
    tracing::warn!(entity, error = %db_message(e), "Snapshot query failed.");
    problem(StatusCode::SERVICE_UNAVAILABLE, "the snapshot query failed")
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// Rows to NDJSON in chunks of about 64 KiB; `conn` is held until the last row.
fn ndjson<S>(
    rows: S,
    conn: bb8::PooledConnection<'static, PostgresConnectionManager<PgTls>>,
    entity: String,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send
where
    S: Stream<Item = Result<tokio_postgres::Row, tokio_postgres::Error>> + Send + Unpin + 'static,
{
    futures::stream::unfold((rows, Some(conn)), move |(mut rows, conn)| {
        let entity = entity.clone();
        async move {
            conn.as_ref()?;
            let mut chunk = Vec::with_capacity(64 * 1024);
            while chunk.len() < 60 * 1024 {
                match rows.next().await {
                    Some(Ok(row)) => {
                        if let Err(e) = write_line(&mut chunk, &row, &entity) {
                            return Some((Err(e), (rows, None)));
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %db_message(&e), "Snapshot stream failed mid-page; the response is cut short.");
                        return Some((Err(std::io::Error::other(e)), (rows, None)));
                    }
                    None => {
                        return if chunk.is_empty() {
                            None
                        } else {
                            Some((Ok(Bytes::from(chunk)), (rows, None)))
                        };
                    }
                }
            }
            Some((Ok(Bytes::from(chunk)), (rows, conn)))
        }
    })
}

/// One row as an NDJSON line. A row with a NULL id is skipped with a warning: it cannot be
/// named nor paged past. A NULL version is passed on as `null`, so that the consumer
/// dead-letters the row under its id (its version guard cannot apply it).
fn write_line(
    out: &mut Vec<u8>,
    row: &tokio_postgres::Row,
    entity: &str,
) -> Result<(), std::io::Error> {
    let id: Option<String> = row.try_get(0).map_err(std::io::Error::other)?;
    let version: Option<i64> = row.try_get(1).map_err(std::io::Error::other)?;
    let Some(id) = id else {
        tracing::warn!(entity, "Snapshot row with a NULL id left out of the page.");
        return Ok(());
    };
    if version.is_none() {
        tracing::warn!(entity, id = %id, "Snapshot row with a NULL version; consumers dead-letter it.");
    }
    let payload: Option<Value> = row.try_get(2).map_err(std::io::Error::other)?;
    let mut line = json!({"aggregateId": id, "aggregateVersion": version, "payload": payload});
    if row.len() > 3 {
        let at: Option<time::OffsetDateTime> = row.try_get(3).map_err(std::io::Error::other)?;
        if let Some(at) = at {
            line["occurredAt"] = Value::String(ecst_schemas::envelope::format_timestamp(at));
        }
    }
    serde_json::to_writer(&mut *out, &line).map_err(std::io::Error::other)?;
    out.push(b'\n');
    Ok(())
}

async fn count(
    State(app): State<Arc<App>>,
    Path(entity_name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&app, &headers) {
        return problem(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    }
    let Some(entity) = app.entities.get(&entity_name) else {
        return not_found("unknown_entity", format!("no entity `{entity_name}`"));
    };
    let Some(sql) = &entity.count else {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            format!("{}\n", json!({"count": null})),
        )
            .into_response();
    };
    let conn = match app.pool.get().await {
        Ok(conn) => conn,
        Err(_) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the source database is unavailable",
            );
        }
    };
    match tokio::time::timeout(app.timeout, conn.query_one(sql.as_str(), &[])).await {
        Err(_) => timed_out(&app, &conn),
        Ok(Ok(row)) => (
            [(header::CONTENT_TYPE, "application/json")],
            format!("{}\n", json!({"count": row.try_get::<_, i64>(0).ok()})),
        )
            .into_response(),
        Ok(Err(e)) => query_failed(&entity_name, &e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    ids: Vec<String>,
}

/// `GET /snapshot/{entity}/{id}`: one row as a JSON object, or 404.
async fn one(
    State(app): State<Arc<App>>,
    Path((entity_name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let rows = match rows_by_ids(&app, &entity_name, vec![id.clone()], &headers).await {
        Ok(rows) => rows,
        Err(response) => return response,
    };
    match rows.first() {
        None => not_found("not_found", format!("no {entity_name} `{id}`")),
        Some(line) => (
            [(header::CONTENT_TYPE, "application/json")],
            Bytes::from(line.clone()),
        )
            .into_response(),
    }
}

/// `POST /snapshot/{entity}:batch`: the rows of the ids asked for, as NDJSON.
async fn batch(
    State(app): State<Arc<App>>,
    Path(segment): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(entity_name) = segment.strip_suffix(":batch") else {
        return problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST /snapshot/{entity}:batch reads by ids; the page route is GET",
        );
    };
    if !authorized(&app, &headers) {
        return problem(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    }
    let request: BatchRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("the body must be {{\"ids\": [\"…\"]}}: {e}"),
            );
        }
    };
    if request.ids.len() > app.max_batch_ids as usize {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} ids asked, at most {} per request",
                request.ids.len(),
                app.max_batch_ids
            ),
        );
    }
    let rows = match rows_by_ids(&app, entity_name, request.ids, &headers).await {
        Ok(rows) => rows,
        Err(response) => return response,
    };
    let mut body = Vec::with_capacity(rows.iter().map(|l| l.len() + 1).sum());
    for line in rows {
        body.extend_from_slice(&line);
        body.push(b'\n');
    }
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Bytes::from(body),
    )
        .into_response()
}

/// The rows of `ids`, each one JSON line without its newline. Ids that cannot be the entity's
/// (`abc` for a bigint id) are simply not found.
async fn rows_by_ids(
    app: &App,
    entity_name: &str,
    ids: Vec<String>,
    headers: &HeaderMap,
) -> Result<Vec<Vec<u8>>, Response> {
    if !authorized(app, headers) {
        return Err(problem(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required",
        ));
    }
    let Some(entity) = app.entities.get(entity_name) else {
        return Err(not_found(
            "unknown_entity",
            format!("no entity `{entity_name}`"),
        ));
    };
    let Some(sql) = &entity.by_ids else {
        return Err(problem(
            StatusCode::NOT_IMPLEMENTED,
            format!("entity `{entity_name}` is a query without query_by_ids"),
        ));
    };
    let ids: Vec<String> = ids
        .into_iter()
        .filter(|id| check_after(id, entity.id_type.as_deref()).is_ok())
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let conn = match app.pool.get().await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(error = %e, "Snapshot request: no Postgres connection.");
            return Err(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the source database is unavailable",
            ));
        }
    };
    let rows = match tokio::time::timeout(app.timeout, conn.query(sql.as_str(), &[&ids])).await {
        Err(_) => return Err(timed_out(app, &conn)),
        Ok(Err(e)) => return Err(query_failed(entity_name, &e)),
        Ok(Ok(rows)) => rows,
    };
    let mut lines = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut line = Vec::new();
        if let Err(e) = write_line(&mut line, row, entity_name) {
            tracing::warn!(entity = entity_name, error = %e, "Snapshot row cannot be written.");
            return Err(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "a row cannot be written",
            ));
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if !line.is_empty() {
            lines.push(line);
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_checked_against_the_id_type() {
        assert!(check_after("42", Some("bigint")).is_ok());
        assert!(check_after("4x2", Some("bigint")).is_err());
        assert!(check_after("99999999999", Some("integer")).is_err());
        assert!(check_after("not-a-uuid", Some("uuid")).is_err());
        assert!(check_after("anything", Some("text")).is_ok());
    }
}

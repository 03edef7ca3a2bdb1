//! `ecst bench relay`: outbox rows to stream entries per second, and how long an inserted row
//! takes to reach the stream when the relay is idle, next to the ceilings of its two halves
//! measured in the same run.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use ecst_operators::redis_pool::{RedisConn, RedisManager};
use ecst_operators::{ConfigDuration, SecretUrl};
use ecst_pipeline::outbox::OutboxTable;
use ecst_pipeline::relay::{self, OutboxLocation, RelayConfig, RelayStats};
use ecst_pipeline::shutdown::Shutdown;
use serde_json::json;

#[derive(Args)]
pub(crate) struct RelayBenchArgs {
    /// Redis URL.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    redis: String,
    /// Postgres URL of the database that gets the benchmark's outbox tables (loopback,
    /// without TLS, by default).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
        hide_env_values = true
    )]
    database: String,
    /// Outbox rows to relay.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(i64).range(1..))]
    rows: i64,
    /// Rows per relay transaction.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// Idle wake-ups to time.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    wakeups: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

const STREAM: &str = "ecst.bench.relay";
const TABLE: &str = "ecst_bench_outbox";
const CEILING_TABLE: &str = "ecst_bench_outbox_ceiling";

async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let target = ecst_operators::postgres_tls::parse_postgres_url(url)?;
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(10), target.config.connect(target.tls))
            .await
            .context("Postgres did not answer within 10s")?
            .context("cannot connect to Postgres")?;
    tokio::spawn(connection);
    Ok(client)
}

async fn redis_connect(url: &str) -> anyhow::Result<RedisConn> {
    RedisManager::new(&ecst_operators::SecretUrl::new(url), Duration::from_secs(5))
        .context("invalid Redis URL")?
        .connect_once(Duration::from_secs(30))
        .await
        .context("cannot connect to Redis")
}

/// Drops and recreates an outbox table filled with `rows` athlete-sized events.
async fn fill(pg: &tokio_postgres::Client, table: &str, rows: i64) -> anyhow::Result<()> {
    let outbox = OutboxTable::new("public", table)?;
    pg.batch_execute(&format!(
        "SET client_min_messages = warning;
         DROP TABLE IF EXISTS {t}, {dl};
         {ddl}",
        t = outbox.sql_name(),
        dl = outbox.dead_letters_sql_name(),
        ddl = outbox.ddl()
    ))
    .await
    .context("creating the benchmark outbox")?;
    pg.execute(
        &format!(
            "INSERT INTO {t} (stream, aggregate_type, aggregate_id, aggregate_version, event_type, payload, headers)
             SELECT $1, 'athlete', 'athlete-' || (g % 10000), g, 'athlete.updated',
                    jsonb_build_object('athleteId', 'athlete-' || (g % 10000),
                                       'displayName', 'Athlete number ' || g,
                                       'countryCode', 'GB', 'weightClass', 'lightweight',
                                       'status', 'active', 'updatedAt', now()),
                    jsonb_build_object('traceparent',
                        '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')
             FROM generate_series(1, $2::bigint) g",
            t = outbox.sql_name()
        ),
        &[&STREAM, &rows],
    )
    .await
    .context("filling the benchmark outbox")?;
    pg.batch_execute(&format!("VACUUM ANALYZE {}", outbox.sql_name()))
        .await?;
    Ok(())
}

/// The Postgres half alone: claim a batch with SKIP LOCKED, delete it, commit. Rows/s.
async fn postgres_ceiling(
    pg: &tokio_postgres::Client,
    rows: i64,
    batch: u32,
) -> anyhow::Result<f64> {
    fill(pg, CEILING_TABLE, rows).await?;
    let claim = pg
        .prepare(&format!(
            "SELECT id, stream, aggregate_type, aggregate_id, aggregate_version, event_type,
                    event_id::text, schema_version, occurred_at, payload, headers
             FROM {CEILING_TABLE} WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .await?;
    let delete = pg
        .prepare(&format!(
            "DELETE FROM {CEILING_TABLE} WHERE id = ANY($1::bigint[])"
        ))
        .await?;
    let started = Instant::now();
    let mut done = 0i64;
    loop {
        pg.batch_execute("BEGIN").await?;
        let claimed = pg.query(&claim, &[&i64::from(batch)]).await?;
        let ids: Vec<i64> = claimed.iter().map(|r| r.get(0)).collect();
        pg.execute(&delete, &[&ids]).await?;
        pg.batch_execute("COMMIT").await?;
        done += ids.len() as i64;
        if ids.is_empty() {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    pg.batch_execute(&format!(
        "DROP TABLE {CEILING_TABLE}, {CEILING_TABLE}_dead_letters"
    ))
    .await?;
    if done != rows {
        bail!("the Postgres ceiling claimed {done} of {rows} rows");
    }
    Ok(rows as f64 / secs)
}

/// The Redis half alone: the same bodies XADDed in pipelines of `batch`. Rows/s.
async fn redis_ceiling(conn: &mut RedisConn, rows: i64, batch: u32) -> anyhow::Result<f64> {
    let stream = format!("{STREAM}.ceiling");
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 1, "eventId": "5f0c3c52-3b2e-4a43-9d0a-6b7b1f1f0c11",
        "eventType": "athlete.updated", "occurredAt": "2026-11-24T10:00:00.123456Z",
        "aggregateType": "athlete", "aggregateId": "athlete-1234", "aggregateVersion": 123456,
        "payload": {"athleteId": "athlete-1234", "displayName": "Athlete number 123456",
                    "countryCode": "GB", "weightClass": "lightweight", "status": "active",
                    "updatedAt": "2026-11-24T10:00:00.123456+00:00"}
    }))?;
    let _: () = redis::cmd("DEL").arg(&stream).query_async(conn).await?;
    let started = Instant::now();
    let mut left = rows;
    while left > 0 {
        let n = left.min(i64::from(batch));
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("v")
                .arg(&body)
                .arg("traceparent")
                .arg("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
        left -= n;
    }
    let secs = started.elapsed().as_secs_f64();
    let _: () = redis::cmd("DEL").arg(&stream).query_async(conn).await?;
    Ok(rows as f64 / secs)
}

fn relay_config(args: &RelayBenchArgs, poll: Duration) -> RelayConfig {
    RelayConfig {
        name: "bench".into(),
        postgres: SecretUrl::new(args.database.clone()),
        redis: SecretUrl::new(args.redis.clone()),
        outbox: OutboxLocation {
            schema: "public".into(),
            table: TABLE.into(),
        },
        content_type: relay::BodyEncoding::Json,
        batch_size: args.batch_size,
        poll_interval: ConfigDuration(poll),
        on_publish: relay::OnPublish::Delete,
        keep_published_for: None,
        retention: None,
        partitions: 1,
        streams: None,
        timeout: ConfigDuration(Duration::from_secs(30)),
        validate: false,
        schemas: None,
        claim_check: None,
    }
}

async fn count(pg: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(pg
        .query_one(&format!("SELECT count(*) FROM {TABLE}"), &[])
        .await?
        .get(0))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) async fn bench_relay(args: RelayBenchArgs) -> anyhow::Result<ExitCode> {
    let pg = pg_connect(&args.database).await?;
    let mut conn = redis_connect(&args.redis).await?;
    let rows = args.rows;
    eprintln!("measuring the ceilings ({rows} rows each) ...");
    let redis_ceiling = redis_ceiling(&mut conn, rows, args.batch_size).await?;
    let pg_ceiling = postgres_ceiling(&pg, rows, args.batch_size).await?;
    // The relay does both halves one after the other for every batch.
    let ceiling = 1.0 / (1.0 / redis_ceiling + 1.0 / pg_ceiling);

    eprintln!("relaying {rows} rows ...");
    fill(&pg, TABLE, rows).await?;
    let _: () = redis::cmd("DEL").arg(STREAM).query_async(&mut conn).await?;
    let (stop, shutdown) = Shutdown::new();
    let stats = Arc::new(RelayStats::default());
    let config = relay_config(&args, Duration::from_secs(1));
    let started = Instant::now();
    let task = {
        let stats = stats.clone();
        tokio::spawn(async move { relay::run(&config, shutdown, stats).await })
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while stats.published.load(Ordering::Relaxed) < rows as u64 {
        if task.is_finished() || Instant::now() > deadline {
            bail!(
                "the relay stopped or stalled after {} rows",
                stats.published.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    task.await??;
    let throughput = rows as f64 / secs;
    let xlen: i64 = redis::cmd("XLEN")
        .arg(STREAM)
        .query_async(&mut conn)
        .await?;
    let left = count(&pg).await?;
    if xlen != rows || left != 0 {
        bail!("after relaying: {xlen} entries on the stream, {left} rows left in the outbox");
    }

    eprintln!("timing {} idle wake-ups ...", args.wakeups);
    // A poll a minute away: what is timed is the NOTIFY path.
    let (stop, shutdown) = Shutdown::new();
    let config = relay_config(&args, Duration::from_secs(60));
    let stats = Arc::new(RelayStats::default());
    let task = {
        let stats = stats.clone();
        tokio::spawn(async move { relay::run(&config, shutdown, stats).await })
    };
    let mut reader = redis_connect(&args.redis).await?;
    let mut last_id: String = "$".into();
    let mut wakeups_ms = Vec::new();
    let insert = format!(
        "INSERT INTO {TABLE} (stream, aggregate_type, aggregate_id, aggregate_version, event_type, payload)
         VALUES ($1, 'athlete', 'wake', $2, 'athlete.updated', '{{}}')"
    );
    for i in 0..args.wakeups {
        // Idle: the relay has published everything and waits.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t0 = Instant::now();
        pg.execute(&insert, &[&STREAM, &i64::from(i)]).await?;
        let reply: redis::streams::StreamReadReply = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(5000)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(&last_id)
            .query_async(&mut reader)
            .await?;
        let Some(entry) = reply.keys.first().and_then(|k| k.ids.last()) else {
            bail!("wake-up {i}: the row did not reach the stream within 5s");
        };
        wakeups_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        last_id = entry.id.clone();
    }
    let _ = stop.send(true);
    task.await??;
    wakeups_ms.sort_by(|a, b| a.total_cmp(b));

    let _: () = redis::cmd("DEL").arg(STREAM).query_async(&mut conn).await?;
    let outbox = OutboxTable::new("public", TABLE)?;
    pg.batch_execute(&format!(
        "DROP TABLE {}, {}",
        outbox.sql_name(),
        outbox.dead_letters_sql_name()
    ))
    .await?;

    let report = json!({
        "rows": rows,
        "batch_size": args.batch_size,
        "seconds": secs,
        "rows_per_sec": throughput.round(),
        "redis_ceiling_rows_per_sec": redis_ceiling.round(),
        "postgres_ceiling_rows_per_sec": pg_ceiling.round(),
        "ceiling_rows_per_sec": ceiling.round(),
        "ratio": (throughput / ceiling * 1000.0).round() / 1000.0,
        "wakeups": wakeups_ms.len(),
        "wakeup_p50_ms": (percentile(&wakeups_ms, 0.50) * 10.0).round() / 10.0,
        "wakeup_p99_ms": (percentile(&wakeups_ms, 0.99) * 10.0).round() / 10.0,
        "wakeup_max_ms": (wakeups_ms[wakeups_ms.len() - 1] * 10.0).round() / 10.0,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "relay                 {:>10.0} rows/s ({rows} rows in {secs:.2}s, batches of {})",
            throughput, args.batch_size
        );
        println!(
            "ceiling               {:>10.0} rows/s (XADD alone {:.0}, claim+delete alone {:.0})",
            ceiling, redis_ceiling, pg_ceiling
        );
        println!("ratio                 {:>10.3}", throughput / ceiling);
        println!(
            "idle wake-up          p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} inserts)",
            percentile(&wakeups_ms, 0.50),
            percentile(&wakeups_ms, 0.99),
            wakeups_ms[wakeups_ms.len() - 1],
            wakeups_ms.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

//! `ecst status`: a pipeline's consumer group and its replicas' freshness at a glance.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ecst_operators::postgres_tls::parse_postgres_url;
use ecst_operators::redis_pool::{RedisConn, RedisManager};
use ecst_operators::sinks::postgres::config::quote;
use ecst_operators::{SecretUrl, StageConfig};
use ecst_pipeline::bootstrap::{group_state, stream_info};
use ecst_pipeline::commit::divergence_key;
use ecst_pipeline::config::{self, PipelineConfig};
use ecst_pipeline::lease::partition_lease_key;
use ecst_pipeline::redis_reply::{as_map, bulk};
use ecst_schemas::partition::partition_stream;
use redis::Value as RedisValue;
use serde_json::{Value, json};
use time::OffsetDateTime;

#[derive(Args)]
pub(crate) struct StatusArgs {
    /// Pipeline file.
    pipeline: PathBuf,
    /// Every group on the stream, not only the pipeline's.
    #[arg(long)]
    all: bool,
    /// Refresh every `--interval` like `top`, until Ctrl-C.
    #[arg(long)]
    watch: bool,
    /// Seconds between refreshes with `--watch`.
    #[arg(long, default_value_t = 2)]
    interval: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Connects to `url`; errors name the server with its password masked.
async fn redis_conn(url: &SecretUrl) -> anyhow::Result<RedisConn> {
    RedisManager::new(url, Duration::from_secs(5))
        .with_context(|| format!("invalid Redis URL {url}"))?
        .connect_once(Duration::from_secs(5))
        .await
        .with_context(|| format!("cannot connect to Redis at {url}"))
}

fn number(map: &HashMap<String, RedisValue>, key: &str) -> Value {
    bulk(map.get(key))
        .and_then(|n| n.parse::<i64>().ok())
        .map_or(Value::Null, Value::from)
}

fn seconds_since(at: Option<OffsetDateTime>, now: OffsetDateTime) -> Value {
    at.map_or(Value::Null, |at| {
        json!(((now - at).as_seconds_f64() * 1000.0).round() / 1000.0)
    })
}

async fn groups(
    conn: &mut RedisConn,
    config: &PipelineConfig,
    all: bool,
) -> anyhow::Result<Vec<Value>> {
    let stream = &config.source.stream;
    if stream_info(conn, stream)
        .await
        .context("XINFO STREAM")?
        .is_none()
    {
        return Ok(Vec::new());
    }
    let reply: RedisValue = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .context("XINFO GROUPS")?;
    let groups: Vec<HashMap<String, RedisValue>> = match reply {
        RedisValue::Array(items) => items.into_iter().map(as_map).collect(),
        _ => Vec::new(),
    };
    let (seconds, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await?;
    let now_ms = seconds * 1000 + micros / 1000;
    let mut out = Vec::new();
    for g in groups {
        let name = bulk(g.get("name")).unwrap_or_default();
        if !all && name != config.source.group {
            continue;
        }
        let consumers: RedisValue = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream)
            .arg(&name)
            .query_async(conn)
            .await
            .context("XINFO CONSUMERS")?;
        let last_delivered_ms = bulk(g.get("last-delivered-id"))
            .and_then(|id| id.split('-').next().and_then(|ms| ms.parse::<i64>().ok()))
            .unwrap_or(0);
        let consumers: Vec<Value> = match consumers {
            RedisValue::Array(items) => items
                .into_iter()
                .map(as_map)
                .map(|c| {
                    let idle_ms = number(&c, "idle").as_i64();
                    json!({
                        "name": bulk(c.get("name")),
                        "pending": number(&c, "pending"),
                        "idle_seconds": idle_ms.map(|ms| ms as f64 / 1000.0),
                        "stale": is_stale(&c, stale_after(config), now_ms, last_delivered_ms),
                    })
                })
                .collect(),
            _ => Vec::new(),
        };
        let oldest: RedisValue = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&name)
            .arg("-")
            .arg("+")
            .arg(1)
            .query_async(conn)
            .await
            .context("XPENDING")?;
        let oldest_idle = oldest_idle_seconds(oldest);
        let state = group_state(conn, stream, &name)
            .await
            .context("XINFO STREAM")?;
        let divergent: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(divergence_key(stream, &name))
            .query_async(conn)
            .await
            .context("HGETALL")?;
        let last_delivered = bulk(g.get("last-delivered-id")).unwrap_or_else(|| "0-0".into());
        let (lag, lag_counted) = match number(&g, "lag") {
            // Redis forgets a group's entries-read when it reloads the stream from its AOF or
            // RDB, and cannot tell the lag until the group reads to the end again: count it.
            Value::Null => (counted_lag(conn, stream, &last_delivered).await?, true),
            reported => (reported, false),
        };
        out.push(json!({
            "group": name,
            "lag": lag,
            "lag_counted": lag_counted,
            "pending": number(&g, "pending"),
            "oldest_pending_idle_seconds": oldest_idle,
            "last_delivered_id": bulk(g.get("last-delivered-id")),
            "entries_read": number(&g, "entries-read"),
            "retention_gap": state.gap,
            "fanout_divergent": divergent,
            "consumers": consumers,
        }));
    }
    Ok(out)
}

/// How long a consumer with nothing pending must be idle to be shown as stale: far longer
/// than any live worker goes without reading (it reads at least every `claim_idle`).
fn stale_after(config: &PipelineConfig) -> Duration {
    config.source.claim_idle.0 * 10
}

/// Whether a consumer (an `XINFO CONSUMERS` entry) looks left behind: nothing pending and idle
/// longer than `stale_after`. Since Redis 7.2 (which added `inactive`) `idle` counts from the
/// consumer's last read of any kind, so a live worker is never idle long. Before, it counts from
/// the last read that returned entries, so a live worker on a quiet stream looks idle too: the
/// consumer is stale only if the group kept being served for `stale_after` after it was seen.
fn is_stale(
    consumer: &HashMap<String, RedisValue>,
    stale_after: Duration,
    now_ms: i64,
    last_delivered_ms: i64,
) -> bool {
    let stale_after_ms = stale_after.as_millis() as i64;
    let (Some(pending), Some(idle_ms)) = (
        number(consumer, "pending").as_i64(),
        number(consumer, "idle").as_i64(),
    ) else {
        return false;
    };
    let served_since = last_delivered_ms - (now_ms - idle_ms);
    pending == 0
        && idle_ms > stale_after_ms
        && (consumer.contains_key("inactive") || served_since > stale_after_ms)
}

/// Most entries `status` reads to count a lag Redis cannot tell.
const LAG_COUNT_LIMIT: usize = 10_000;

/// The entries after `last_delivered`, counted by reading their ids (at most
/// [`LAG_COUNT_LIMIT`]; a longer tail is shown as `">10000"`).
async fn counted_lag(
    conn: &mut RedisConn,
    stream: &str,
    last_delivered: &str,
) -> anyhow::Result<Value> {
    let after: RedisValue = redis::cmd("XRANGE")
        .arg(stream)
        .arg(format!("({last_delivered}"))
        .arg("+")
        .arg("COUNT")
        .arg(LAG_COUNT_LIMIT + 1)
        .query_async(conn)
        .await
        .context("XRANGE")?;
    let n = match after {
        RedisValue::Array(entries) => entries.len(),
        _ => 0,
    };
    Ok(if n > LAG_COUNT_LIMIT {
        json!(format!(">{LAG_COUNT_LIMIT}"))
    } else {
        json!(n)
    })
}

async fn sink_freshness(config: &PipelineConfig, source_conn: &mut RedisConn) -> Vec<Value> {
    let now = OffsetDateTime::now_utc();
    let mut out = Vec::new();
    for stage in &config.stages {
        match &stage.config {
            StageConfig::RedisHash(c) => {
                let key = c.freshness_key();
                let read = async {
                    let mut own;
                    let conn = match &c.redis {
                        Some(url) => {
                            own = redis_conn(url).await?;
                            &mut own
                        }
                        None => &mut *source_conn,
                    };
                    let map: HashMap<String, String> = redis::cmd("HGETALL")
                        .arg(&key)
                        .query_async(conn)
                        .await
                        .context("HGETALL")?;
                    anyhow::Ok(map)
                }
                .await;
                let parse = |v: Option<&String>| {
                    v.and_then(|s| {
                        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                };
                match read {
                    Ok(map) => {
                        let newest = parse(map.get("newest_occurred_at"));
                        let replicated = parse(map.get("replicated_at"));
                        out.push(json!({
                            "sink": stage.name, "type": "redis_hash", "from": key,
                            "source_age_seconds": seconds_since(newest, now),
                            "replicated_age_seconds": seconds_since(replicated, now),
                            "apply_lag_seconds": match (newest, replicated) {
                                (Some(n), Some(r)) => json!(((r - n).as_seconds_f64() * 1000.0).round() / 1000.0),
                                _ => Value::Null,
                            },
                        }));
                    }
                    Err(e) => out.push(json!({"sink": stage.name, "type": "redis_hash", "error": format!("{e:#}")})),
                }
            }
            StageConfig::Postgres(c) => {
                let table = format!("{}.{}", quote(&c.schema), quote(&c.table));
                let sql = format!(
                    "SELECT EXTRACT(EPOCH FROM (now() - max({u})))::float8,
                            EXTRACT(EPOCH FROM (now() - max({r})))::float8,
                            EXTRACT(EPOCH FROM (max({r}) - max({u})))::float8,
                            count(*)
                     FROM {table}",
                    u = quote(&c.updated_at_column),
                    r = quote(&c.replicated_at_column),
                );
                let read = async {
                    let target = parse_postgres_url(c.url.expose())?;
                    let (client, connection) = tokio::time::timeout(
                        Duration::from_secs(5),
                        target.config.connect(target.tls),
                    )
                    .await
                    .context("Postgres did not answer within 5s")??;
                    tokio::spawn(connection);
                    let row =
                        tokio::time::timeout(Duration::from_secs(10), client.query_one(&sql, &[]))
                            .await
                            .context("the freshness query timed out")??;
                    anyhow::Ok(row)
                }
                .await;
                let round = |v: Option<f64>| {
                    v.map_or(Value::Null, |v| json!((v * 1000.0).round() / 1000.0))
                };
                match read {
                    Ok(row) => out.push(json!({
                        "sink": stage.name, "type": "postgres", "from": format!("{}.{}", c.schema, c.table),
                        "source_age_seconds": round(row.get(0)),
                        "replicated_age_seconds": round(row.get(1)),
                        "apply_lag_seconds": round(row.get(2)),
                        "rows": row.get::<_, i64>(3),
                    })),
                    Err(e) => out.push(json!({"sink": stage.name, "type": "postgres", "error": format!("{}: {e:#}", c.url)})),
                }
            }
            _ => {}
        }
    }
    out
}

/// One row per partition: its key, length, lease owner and the group's figures on it.
async fn partitions(
    conn: &mut ecst_operators::redis_pool::RedisConn,
    config: &PipelineConfig,
) -> anyhow::Result<Vec<Value>> {
    let source = &config.source;
    let (seconds, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await?;
    let now_ms = seconds * 1000 + micros / 1000;
    let mut rows = Vec::new();
    for p in 0..source.partitions {
        let key = partition_stream(&source.stream, p, source.partitions);
        let length: i64 = redis::cmd("XLEN").arg(&key).query_async(conn).await?;
        let lease: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(partition_lease_key(&source.stream, &source.group, p))
            .query_async(conn)
            .await
            .context("HGETALL")?;
        let expires = lease
            .get("expires_ms")
            .and_then(|e| e.parse::<i64>().ok())
            .unwrap_or(0);
        let owner = lease
            .get("owner")
            .filter(|o| !o.is_empty() && expires > now_ms)
            .cloned();
        let mut row = json!({
            "partition": p,
            "stream": key,
            "length": length,
            "owner": owner,
            "generation": lease.get("generation").and_then(|g| g.parse::<u64>().ok()),
            "lag": Value::Null,
            "pending": Value::Null,
            "oldest_pending_idle_seconds": Value::Null,
            "last_delivered_id": Value::Null,
            "retention_gap": Value::Null,
            "fanout_divergent": {},
        });
        let exists: bool = redis::cmd("EXISTS").arg(&key).query_async(conn).await?;
        if exists {
            let reply: RedisValue = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&key)
                .query_async(conn)
                .await
                .context("XINFO GROUPS")?;
            let group = match reply {
                RedisValue::Array(items) => items
                    .into_iter()
                    .map(as_map)
                    .find(|g| bulk(g.get("name")).as_deref() == Some(source.group.as_str())),
                _ => None,
            };
            if let Some(g) = group {
                let oldest: RedisValue = redis::cmd("XPENDING")
                    .arg(&key)
                    .arg(&source.group)
                    .arg("-")
                    .arg("+")
                    .arg(1)
                    .query_async(conn)
                    .await
                    .context("XPENDING")?;
                row["lag"] = number(&g, "lag");
                row["pending"] = number(&g, "pending");
                row["last_delivered_id"] = json!(bulk(g.get("last-delivered-id")));
                row["oldest_pending_idle_seconds"] = json!(oldest_idle_seconds(oldest));
                let state = group_state(conn, &key, &source.group)
                    .await
                    .context("XINFO STREAM")?;
                row["retention_gap"] = json!(state.gap);
                let divergent: HashMap<String, u64> = redis::cmd("HGETALL")
                    .arg(divergence_key(&key, &source.group))
                    .query_async(conn)
                    .await
                    .context("HGETALL")?;
                row["fanout_divergent"] = json!(divergent);
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

fn oldest_idle_seconds(oldest: RedisValue) -> Option<f64> {
    match oldest {
        RedisValue::Array(entries) => match entries.first() {
            Some(RedisValue::Array(fields)) => bulk(fields.get(2))
                .and_then(|n| n.parse::<f64>().ok())
                .map(|ms| ms / 1000.0),
            _ => None,
        },
        _ => None,
    }
}

async fn snapshot(config: &PipelineConfig, all: bool) -> anyhow::Result<Value> {
    let mut conn = redis_conn(&config.source.redis).await?;
    let stream = &config.source.stream;
    let dlq = config.source.dead_letter_stream();
    if config.source.partitions > 1 {
        let partitions = partitions(&mut conn, config).await?;
        let length: i64 = partitions.iter().filter_map(|p| p["length"].as_i64()).sum();
        let mut exists = false;
        for p in &partitions {
            let key = p["stream"].as_str().unwrap_or_default();
            exists |= redis::cmd("EXISTS")
                .arg(key)
                .query_async::<bool>(&mut conn)
                .await?;
        }
        let dlq_length: i64 = redis::cmd("XLEN").arg(&dlq).query_async(&mut conn).await?;
        return Ok(json!({
            "pipeline": config.name,
            "stream": stream,
            "exists": exists,
            "length": length,
            "dead_letter_stream": dlq,
            "dead_letters": dlq_length,
            "group": config.source.group,
            "partitions": partitions,
            "groups": [],
            "sinks": sink_freshness(config, &mut conn).await,
        }));
    }
    let length: i64 = redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut conn)
        .await?;
    let exists: bool = redis::cmd("EXISTS")
        .arg(stream)
        .query_async(&mut conn)
        .await?;
    let dlq_length: i64 = redis::cmd("XLEN").arg(&dlq).query_async(&mut conn).await?;
    Ok(json!({
        "pipeline": config.name,
        "stream": stream,
        "exists": exists,
        "length": length,
        "dead_letter_stream": dlq,
        "dead_letters": dlq_length,
        "groups": groups(&mut conn, config, all).await?,
        "sinks": sink_freshness(config, &mut conn).await,
    }))
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn render(report: &Value, colour: bool) -> String {
    let paint = |text: String, bad: bool| {
        if colour && bad {
            format!("\x1b[31m{text}\x1b[0m")
        } else {
            text
        }
    };
    let mut out = format!(
        "pipeline {}  stream {} ({} entries)  dead letters {}\n",
        show(&report["pipeline"]),
        show(&report["stream"]),
        show(&report["length"]),
        paint(
            format!(
                "{} in {}",
                show(&report["dead_letters"]),
                show(&report["dead_letter_stream"])
            ),
            report["dead_letters"].as_i64().unwrap_or(0) > 0
        ),
    );
    if let Some(partitions) = report["partitions"].as_array() {
        out.push_str(&format!(
            "\ngroup {}\n{:>9} {:<28} {:>6} {:>8} {:>8} {:>12} {:>22}\n",
            show(&report["group"]),
            "partition",
            "owner",
            "gen",
            "lag",
            "pending",
            "oldest idle",
            "last delivered"
        ));
        for p in partitions {
            out.push_str(&format!(
                "{:>9} {:<28} {:>6} {:>8} {:>8} {:>12} {:>22}\n",
                show(&p["partition"]),
                paint(
                    p["owner"].as_str().unwrap_or("(none)").to_string(),
                    p["owner"].is_null()
                ),
                show(&p["generation"]),
                show(&p["lag"]),
                show(&p["pending"]),
                p["oldest_pending_idle_seconds"]
                    .as_f64()
                    .map_or("-".into(), |s| format!("{s:.1}s")),
                show(&p["last_delivered_id"]),
            ));
            if !p["retention_gap"].is_null() {
                out.push_str(&paint(
                    format!("  GAP: {}\n", show(&p["retention_gap"])),
                    true,
                ));
            }
            for (sink, count) in p["fanout_divergent"].as_object().into_iter().flatten() {
                out.push_str(&paint(
                    format!(
                        "  FAN-OUT DIVERGENCE: the store of sink {sink} refused {} record(s) that other sinks applied; see the dead letters\n",
                        show(count)
                    ),
                    true,
                ));
            }
        }
    }
    if report.get("partitions").is_none() {
        out.push_str(&format!(
            "\n{:<32} {:>8} {:>8} {:>12} {:>22}  {}\n",
            "group / consumer", "lag", "pending", "oldest idle", "last delivered", "retention"
        ));
    }
    for g in report["groups"].as_array().into_iter().flatten() {
        let gap = &g["retention_gap"];
        out.push_str(&format!(
            "{:<32} {:>8} {:>8} {:>12} {:>22}  {}\n",
            show(&g["group"]),
            if g["lag_counted"] == Value::Bool(true) {
                format!("{}*", show(&g["lag"]))
            } else {
                show(&g["lag"])
            },
            show(&g["pending"]),
            g["oldest_pending_idle_seconds"]
                .as_f64()
                .map_or("-".into(), |s| format!("{s:.1}s")),
            show(&g["last_delivered_id"]),
            paint(
                if gap.is_null() {
                    "ok".into()
                } else {
                    format!("GAP: {}", show(gap))
                },
                !gap.is_null()
            ),
        ));
        for (sink, count) in g["fanout_divergent"].as_object().into_iter().flatten() {
            out.push_str(&paint(
                format!(
                    "  FAN-OUT DIVERGENCE: the store of sink {sink} refused {} record(s) that other sinks applied; see the dead letters\n",
                    show(count)
                ),
                true,
            ));
        }
        for c in g["consumers"].as_array().into_iter().flatten() {
            let stale = c["stale"] == Value::Bool(true);
            out.push_str(&format!(
                "  {:<30} {:>8} {:>8} {:>12}{}\n",
                show(&c["name"]),
                "",
                show(&c["pending"]),
                c["idle_seconds"]
                    .as_f64()
                    .map_or("-".into(), |s| format!("idle {s:.1}s")),
                if stale {
                    paint(
                        "  stale: nothing pending, long idle (XGROUP DELCONSUMER removes it)"
                            .into(),
                        true,
                    )
                } else {
                    String::new()
                },
            ));
        }
    }
    out.push_str(&format!(
        "\n{:<20} {:<10} {:>14} {:>16} {:>12}\n",
        "sink", "type", "source age", "replicated age", "apply lag"
    ));
    for s in report["sinks"].as_array().into_iter().flatten() {
        if let Some(error) = s.get("error") {
            out.push_str(&format!(
                "{:<20} {:<10} {}\n",
                show(&s["sink"]),
                show(&s["type"]),
                paint(format!("error: {}", show(error)), true)
            ));
            continue;
        }
        let secs = |v: &Value| v.as_f64().map_or("-".into(), |s| format!("{s:.1}s"));
        out.push_str(&format!(
            "{:<20} {:<10} {:>14} {:>16} {:>12}\n",
            show(&s["sink"]),
            show(&s["type"]),
            secs(&s["source_age_seconds"]),
            secs(&s["replicated_age_seconds"]),
            secs(&s["apply_lag_seconds"]),
        ));
    }
    out
}

pub(crate) async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let config = match config::load(&args.pipeline) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(1));
        }
    };
    let terminal = std::io::stdout().is_terminal();
    loop {
        let report = snapshot(&config, args.all).await?;
        if report["exists"] == Value::Bool(false) {
            if args.json {
                println!("{report}");
            }
            eprintln!(
                "error: stream `{}` does not exist on {}: nothing was published to it and no worker has run on it yet, or the pipeline names another stream",
                config.source.stream, config.source.redis
            );
            return Ok(ExitCode::from(1));
        }
        if args.json {
            println!("{report}");
        } else {
            if args.watch && terminal {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render(&report, terminal));
        }
        if !args.watch {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(args.interval.max(1))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

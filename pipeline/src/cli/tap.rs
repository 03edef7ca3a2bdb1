//! `ecst tap`: attach to a pipeline's running workers and print what they decide about each
//! event, without reading from (or touching) the consumer group.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ecst_operators::redis_pool::RedisConn;
use ecst_pipeline::config;
use ecst_pipeline::redis_reply::parse_entries;
use ecst_pipeline::tap::{HEARTBEAT_TTL, TapFilter, TapLine, WATCH_EVERY, tap_key, tap_stream};

use super::dlq::connect;

#[derive(Args)]
pub(crate) struct TapArgs {
    /// Pipeline file.
    pipeline: PathBuf,
    /// Only decisions of this stage or sink.
    #[arg(long, value_name = "NAME")]
    stage: Option<String>,
    /// Only events whose aggregateId matches this pattern (`*` matches any text).
    #[arg(long, value_name = "PATTERN")]
    key: Option<String>,
    /// Exit after this many events.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
}

/// Keeps the tap's key alive with its filter.
async fn heartbeat(conn: &mut RedisConn, key: &str, filter: &str) -> anyhow::Result<()> {
    redis::cmd("SET")
        .arg(key)
        .arg(filter)
        .arg("PX")
        .arg(HEARTBEAT_TTL.as_millis() as u64)
        .query_async::<()>(conn)
        .await
        .with_context(|| format!("SET {key}"))
}

/// Runs `ecst tap` until Ctrl-C or `--limit` events.
pub(crate) async fn tap(args: TapArgs) -> anyhow::Result<ExitCode> {
    let config = match config::load(&args.pipeline) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(1));
        }
    };
    if let Some(stage) = &args.stage
        && !config.stages.iter().any(|s| &s.name == stage)
    {
        let names: Vec<&str> = config.stages.iter().map(|s| s.name.as_str()).collect();
        eprintln!(
            "error: {}: no stage `{stage}` (stages: {})",
            args.pipeline.display(),
            names.join(", ")
        );
        return Ok(ExitCode::from(2));
    }
    let source = &config.source;
    let filter = TapFilter {
        stage: args.stage.clone(),
        key: args.key.clone(),
    };
    let filter_json = serde_json::to_string(&filter)?;
    let key = tap_key(&config.name);
    let stream = tap_stream(&config.name);
    // The heartbeat and the reads on one connection each: a blocking XREAD would hold up
    // the heartbeat behind it.
    let mut beat = connect(&source.redis, source.timeout.0).await?;
    let mut read = connect(&source.redis, source.timeout.0 + Duration::from_secs(2)).await?;
    // Lines written before this tap attached belong to an earlier one.
    let mut last_id: String = {
        let reply: redis::Value = redis::cmd("XREVRANGE")
            .arg(&stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut read)
            .await
            .with_context(|| format!("XREVRANGE {stream}"))?;
        parse_entries(reply)
            .ok()
            .and_then(|e| e.into_iter().next())
            .map_or_else(|| "0-0".to_string(), |e| e.id)
    };
    heartbeat(&mut beat, &key, &filter_json).await?;
    let terminal = std::io::stdout().is_terminal();
    if terminal {
        eprintln!(
            "Tapping pipeline {} on {} (workers look once a second; Ctrl-C to stop).",
            config.name, source.redis
        );
    }
    let mut shown = 0u64;
    let mut last_beat = Instant::now();
    let mut stdout = std::io::stdout();
    // One signal future for the whole loop: a Ctrl-C that arrives during the heartbeat or
    // while printing is kept for the next poll instead of being dropped with a new future.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let result: anyhow::Result<()> = async {
        loop {
            if last_beat.elapsed() >= WATCH_EVERY {
                heartbeat(&mut beat, &key, &filter_json).await?;
                last_beat = Instant::now();
            }
            let mut xread = redis::cmd("XREAD");
            xread
                .arg("COUNT")
                .arg(500)
                .arg("BLOCK")
                .arg(WATCH_EVERY.as_millis() as u64)
                .arg("STREAMS")
                .arg(&stream)
                .arg(&last_id);
            let read_once = xread.query_async::<redis::Value>(&mut read);
            let reply = tokio::select! {
                reply = read_once => reply.with_context(|| format!("XREAD {stream}"))?,
                _ = &mut ctrl_c => return Ok(()),
            };
            let entries = match reply {
                redis::Value::Array(streams) => streams
                    .into_iter()
                    .filter_map(|s| match s {
                        redis::Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                        _ => None,
                    })
                    .collect(),
                redis::Value::Map(streams) => streams.into_iter().map(|(_, v)| v).collect(),
                _ => Vec::new(),
            };
            for list in entries {
                for entry in parse_entries(list).map_err(|e| anyhow::anyhow!("XREAD: {e}"))? {
                    last_id = entry.id.clone();
                    let Some(line) = entry
                        .field("line")
                        .and_then(|l| serde_json::from_slice::<TapLine>(l).ok())
                    else {
                        continue;
                    };
                    // Workers filter by the latest tap's filter; a second tap may differ.
                    let Some(line) = filter.keep(line) else {
                        continue;
                    };
                    if terminal {
                        writeln!(stdout, "{}", line.to_text())?;
                    } else {
                        writeln!(stdout, "{}", serde_json::to_string(&line)?)?;
                    }
                    stdout.flush()?;
                    shown += 1;
                    if args.limit.is_some_and(|limit| shown >= limit) {
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    // Detach at once rather than when the heartbeat runs out.
    let _: Result<i64, _> = redis::cmd("DEL").arg(&key).query_async(&mut beat).await;
    result?;
    Ok(ExitCode::SUCCESS)
}

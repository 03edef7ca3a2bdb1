//! `ecst publish`: NDJSON events into a stream in the wire format.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ecst_operators::SecretUrl;
use ecst_pipeline::partitioning::{PartitioningError, ensure_partitioning};
use ecst_schemas::EnvelopeKeys;
use ecst_schemas::partition::{Partitioning, partition_of, partition_stream};
use ecst_schemas::wire::{ContentType, FIELD_BODY, FIELD_CONTENT_TYPE, encode_body};

/// Body encoding on the stream.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Encoding {
    Json,
    Msgpack,
}

#[derive(Args)]
pub(crate) struct PublishArgs {
    /// Stream to XADD to.
    #[arg(long)]
    stream: String,
    /// Redis URL.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    redis: String,
    /// NDJSON file, one event per line; `-` for standard input.
    #[arg(long, default_value = "-")]
    file: PathBuf,
    /// Body encoding (`ct` is set to match).
    #[arg(long, value_enum, default_value_t = Encoding::Json)]
    encoding: Encoding,
    /// Publish each line as it is (a foreign shape), checking only that it is a JSON object.
    #[arg(long)]
    raw: bool,
    /// Trim the stream to about this many entries (XADD MAXLEN ~; with partitions, each
    /// partition keeps its share).
    #[arg(long)]
    maxlen: Option<u64>,
    /// Partitions of the stream: each event goes to the partition of its aggregateId. Must
    /// match the partitioning recorded for the stream.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    partitions: u32,
    /// Schema directory: refuse events whose payload does not fit the schema of their
    /// version, or whose aggregateId is not the stream's partition key.
    #[arg(long, conflicts_with = "raw")]
    schemas: Option<PathBuf>,
}

pub(crate) async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let schemas = match &args.schemas {
        None => None,
        Some(dir) => match ecst_pipeline::schema_dir::load(dir) {
            Ok(registry) if registry.stream(&args.stream).is_some() => Some(registry),
            Ok(_) => {
                eprintln!(
                    "{}: no stream file streams/{}.yaml",
                    dir.display(),
                    args.stream
                );
                return Ok(ExitCode::from(1));
            }
            Err(errors) => {
                eprintln!("{errors}");
                return Ok(ExitCode::from(1));
            }
        },
    };
    let reader: Box<dyn BufRead> = if args.file.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&args.file)
                .with_context(|| format!("cannot open {}", args.file.display()))?,
        ))
    };
    let ct = match args.encoding {
        Encoding::Json => ContentType::Json,
        Encoding::Msgpack => ContentType::MsgPack,
    };
    let mut conn = ecst_operators::redis_pool::RedisManager::new(
        &ecst_operators::SecretUrl::new(args.redis.as_str()),
        Duration::from_secs(5),
    )
    .context("invalid Redis URL")?
    .connect_once(Duration::from_secs(10))
    .await
    .context("cannot connect to Redis")?;
    let partitions = args.partitions;
    match ensure_partitioning(
        &mut conn,
        &args.stream,
        &Partitioning::new(partitions),
        "producer",
    )
    .await
    {
        Ok(()) => {}
        Err(e @ PartitioningError::Redis { .. }) => {
            return Err(e)
                .with_context(|| format!("Redis {}", SecretUrl::new(args.redis.as_str())));
        }
        Err(e) => return Err(e.into()),
    }
    // MAXLEN bounds the logical stream: each partition keeps its share.
    let maxlen = args.maxlen.map(|n| n.div_ceil(u64::from(partitions)));
    let keys = EnvelopeKeys::default();
    let label = args.file.display().to_string();
    let (mut published, mut bad) = (0u64, 0u64);
    // One pipeline per partition: a Redis Cluster takes a pipeline only within one slot, and
    // each partition keeps its lines' order.
    let mut pipes: Vec<redis::Pipeline> = (0..partitions).map(|_| redis::pipe()).collect();
    let mut queued = 0;
    for (number, line) in reader.lines().enumerate() {
        let number = number + 1;
        let line = line.with_context(|| format!("{label}: cannot read line {number}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("{label}:{number}: not JSON: {e}");
                bad += 1;
                continue;
            }
        };
        let (body, aggregate_id) = if args.raw {
            if !value.is_object() {
                eprintln!("{label}:{number}: not a JSON object");
                bad += 1;
                continue;
            }
            let id = if partitions > 1 {
                match raw_aggregate_id(&value) {
                    Some(id) => id,
                    None => {
                        eprintln!(
                            "{label}:{number}: no aggregateId (a non-empty string or an integer) to choose the partition by"
                        );
                        bad += 1;
                        continue;
                    }
                }
            } else {
                String::new()
            };
            (encode_body(&value, ct)?, id)
        } else {
            match keys.read(&value) {
                Ok(envelope) => {
                    if let Some(Err(reason)) = schemas
                        .as_ref()
                        .map(|registry| registry.check_event(&args.stream, &envelope))
                    {
                        eprintln!("{label}:{number}: {reason}");
                        bad += 1;
                        continue;
                    }
                    (encode_body(&envelope, ct)?, envelope.aggregate_id)
                }
                Err(e) => {
                    eprintln!("{label}:{number}: {e}");
                    bad += 1;
                    continue;
                }
            }
        };
        let partition = partition_of(&aggregate_id, partitions);
        let key = partition_stream(&args.stream, partition, partitions);
        let Some(pipe) = pipes.get_mut(partition as usize) else {
            continue;
        };
        let cmd = pipe.cmd("XADD").arg(key);
        if let Some(maxlen) = maxlen {
            cmd.arg("MAXLEN").arg("~").arg(maxlen);
        }
        cmd.arg("*").arg(FIELD_BODY).arg(body);
        if !matches!(ct, ContentType::Json) {
            cmd.arg(FIELD_CONTENT_TYPE).arg(ct.as_str());
        }
        cmd.ignore();
        queued += 1;
        if queued == 1000 {
            flush(&mut conn, &mut pipes, &mut published).await?;
            queued = 0;
        }
    }
    if queued > 0 {
        flush(&mut conn, &mut pipes, &mut published).await?;
    }
    eprintln!(
        "published {published} events to {}{}; {bad} bad lines skipped",
        args.stream,
        if partitions > 1 {
            format!(" ({})", Partitioning::new(partitions))
        } else {
            String::new()
        }
    );
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The aggregateId of a line published as it is, read as the envelope reads it.
fn raw_aggregate_id(value: &serde_json::Value) -> Option<String> {
    match value.get("aggregateId")? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// Sends every partition's queued XADDs, counting what was sent, and empties the pipelines.
async fn flush(
    conn: &mut ecst_operators::redis_pool::RedisConn,
    pipes: &mut [redis::Pipeline],
    published: &mut u64,
) -> anyhow::Result<()> {
    for pipe in pipes.iter_mut().filter(|p| !p.is_empty()) {
        pipe.query_async::<()>(conn).await.with_context(|| {
            format!(
                "XADD failed after {published} events were published; publishing the file again publishes those again (consumers' version guard makes the copies stale)"
            )
        })?;
        *published += pipe.len() as u64;
        *pipe = redis::pipe();
    }
    Ok(())
}

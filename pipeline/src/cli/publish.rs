//! `ecst publish`: NDJSON events into a stream in the wire format.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ecst_operators::SecretUrl;
use ecst_operators::claim::{ClaimStore, RedisClaimStore};
use ecst_pipeline::partitioning::{PartitioningError, ensure_partitioning};
use ecst_schemas::EnvelopeKeys;
use ecst_schemas::partition::{Partitioning, partition_of, partition_stream};
use ecst_schemas::registry::SchemaRegistry;
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
    /// All or nothing: check every line first and publish none if any is bad (the file is
    /// held in memory). Without it, the good lines are published and bad ones reported.
    #[arg(long)]
    strict: bool,
    /// Schema directory: refuse events whose payload does not fit the schema of their
    /// version, or whose aggregateId is not the stream's partition key.
    #[arg(long, conflicts_with = "raw")]
    schemas: Option<PathBuf>,
    /// Claim check: a payload larger than this many bytes (as JSON) is stored in Redis under
    /// `ecst:claim:sha256:<hex>` and the event carries a `payloadRef` to it instead.
    #[arg(long, value_name = "BYTES", conflicts_with = "raw")]
    claim_check_over: Option<usize>,
    /// How long claimed payloads live (`7d`, `12h`): longer than the stream's retention plus
    /// the longest consumer lag, or consumers dead-letter the events whose claim expired.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_ttl)]
    claim_ttl: Duration,
    /// Prefix of claim keys (the key ends `sha256:<hex>` after it).
    #[arg(long, default_value = ecst_schemas::claim::DEFAULT_KEY_PREFIX)]
    claim_prefix: String,
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = ecst_operators::ConfigDuration::parse(text)?.0;
    if ttl < Duration::from_secs(1) {
        return Err("must be at least 1s (Redis expires whole seconds)".into());
    }
    Ok(ttl)
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
    let claims = match args.claim_check_over {
        None => None,
        Some(over) => {
            let url = SecretUrl::new(args.redis.as_str());
            let pool = ecst_operators::redis_pool::redis_pool(&url, 1, Duration::from_secs(10))
                .context("invalid Redis URL")?;
            let store = RedisClaimStore::new(
                pool,
                url,
                args.claim_prefix.as_str(),
                args.claim_ttl,
                Duration::from_secs(30),
            );
            Some((over, store))
        }
    };
    let keys = EnvelopeKeys::default();
    let checked = schemas
        .as_ref()
        .map(|registry| (registry, args.stream.as_str()));
    let label = args.file.display().to_string();
    let (mut published, mut bad) = (0u64, 0u64);
    // One pipeline per partition: a Redis Cluster takes a pipeline only within one slot, and
    // each partition keeps its lines' order.
    let mut pipes: Vec<redis::Pipeline> = (0..partitions).map(|_| redis::pipe()).collect();
    // Lines wait here: all of them with --strict (nothing is published if one is bad),
    // 1000 at a time otherwise.
    let mut held: Vec<(u32, Vec<u8>)> = Vec::new();
    for (number, line) in reader.lines().enumerate() {
        let number = number + 1;
        let line = line.with_context(|| format!("{label}: cannot read line {number}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let claim_over = claims.as_ref().map(|(over, store)| (*over, store));
        let encoded = match parse_line(&line, &keys, args.raw, &checked) {
            Ok(Line::Envelope(mut envelope)) => {
                if let Some((over, store)) = claim_over {
                    claim_check(&mut envelope, over, store)
                        .await
                        .with_context(|| {
                            format!("{label}:{number}: cannot store the claimed payload")
                        })?;
                }
                encode_line(Line::Envelope(envelope), ct, partitions)
            }
            Ok(raw) => encode_line(raw, ct, partitions),
            Err(problem) => Err(problem),
        };
        let (partition, body) = match encoded {
            Ok(encoded) => encoded,
            Err(problem) => {
                eprintln!("{label}:{number}: {problem}");
                bad += 1;
                continue;
            }
        };
        held.push((partition, body));
        if !args.strict && held.len() == 1000 {
            for (partition, body) in held.drain(..) {
                queue(
                    &mut pipes,
                    &args.stream,
                    partition,
                    partitions,
                    maxlen,
                    ct,
                    &body,
                );
            }
            flush(&mut conn, &mut pipes, &mut published).await?;
        }
    }
    if args.strict && bad > 0 {
        eprintln!(
            "{bad} bad lines: nothing published to {} (--strict)",
            args.stream
        );
        return Ok(ExitCode::from(1));
    }
    for chunk in held.chunks(1000) {
        for (partition, body) in chunk {
            queue(
                &mut pipes,
                &args.stream,
                *partition,
                partitions,
                maxlen,
                ct,
                body,
            );
        }
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

/// One NDJSON line, read.
enum Line {
    /// A canonical event.
    Envelope(Box<ecst_schemas::Envelope>),
    /// A line published as it is (`--raw`), with its aggregateId when partitioned.
    Raw(serde_json::Value, String),
}

/// Reads and checks one NDJSON line, or says why it cannot be published.
fn parse_line(
    line: &str,
    keys: &EnvelopeKeys,
    raw: bool,
    schemas: &Option<(&SchemaRegistry, &str)>,
) -> Result<Line, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    if raw {
        if !value.is_object() {
            return Err("not a JSON object".into());
        }
        let id = raw_aggregate_id(&value).unwrap_or_default();
        return Ok(Line::Raw(value, id));
    }
    let envelope = keys.read_owned(value).map_err(|e| e.to_string())?;
    if let Some((registry, stream)) = schemas {
        registry.check_event(stream, &envelope)?;
    }
    Ok(Line::Envelope(Box::new(envelope)))
}

/// A line as the body to publish and its partition.
fn encode_line(line: Line, ct: ContentType, partitions: u32) -> Result<(u32, Vec<u8>), String> {
    let (body, aggregate_id) = match line {
        Line::Raw(value, id) => {
            if partitions > 1 && id.is_empty() {
                return Err(
                    "no aggregateId (a non-empty string or an integer) to choose the partition by"
                        .into(),
                );
            }
            (encode_body(&value, ct), id)
        }
        Line::Envelope(envelope) => (encode_body(&*envelope, ct), envelope.aggregate_id),
    };
    let body = body.map_err(|e| format!("cannot encode: {e}"))?;
    Ok((partition_of(&aggregate_id, partitions), body))
}

/// Stores the payload in the claim store and replaces it by a reference when its JSON is
/// larger than `over` bytes. The claim is written before the event, so a consumer never
/// reads a reference to a body not yet stored.
async fn claim_check(
    envelope: &mut ecst_schemas::Envelope,
    over: usize,
    store: &RedisClaimStore,
) -> anyhow::Result<()> {
    let Some(payload) = envelope.payload.as_ref().filter(|p| p.is_object()) else {
        return Ok(());
    };
    let body = serde_json::to_vec(payload)?;
    if body.len() <= over {
        return Ok(());
    }
    let claim = store.put(&body).await?;
    envelope.payload = None;
    envelope.payload_ref = Some(claim);
    Ok(())
}

/// Adds the XADD of `body` to its partition's pipeline.
fn queue(
    pipes: &mut [redis::Pipeline],
    stream: &str,
    partition: u32,
    partitions: u32,
    maxlen: Option<u64>,
    ct: ContentType,
    body: &[u8],
) {
    let key = partition_stream(stream, partition, partitions);
    let Some(pipe) = pipes.get_mut(partition as usize) else {
        return;
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

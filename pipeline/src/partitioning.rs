//! A stream's partitioning, recorded once in Redis and checked by every producer and worker.
//!
//! The first producer or worker of a partitioned stream records its partitioning (count, hash,
//! hashed key) in the hash `ecst:partitioning:<stream>`; everyone after compares theirs with it
//! and refuses to run on a difference. Events routed by another count land in other partitions
//! than the workers read, and the version guard cannot order two partitions against each other:
//! changing the partitioning is a new stream version, never an edit in place.
//!
//! A single-key stream (1 partition) records nothing, so it stays exactly as before partitions
//! existed; a producer or worker that wants partitions refuses a stream that has no record but
//! already holds entries under the plain key.

use std::time::Duration;

use ecst_schemas::partition::{Partitioning, check_partitioned_name, partitioning_key};
use redis::aio::ConnectionLike;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Bound on each Redis call of the check, whatever the connection's own timeouts.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Records the wanted partitioning when there is none and returns what is recorded (after
/// the write), or nothing when absent and `ARGV[6]` says not to record. One key, one slot: it
/// runs on a cluster as on a single node.
const RECORD_OR_READ: &str = r"
local fields = {'partitions', 'hash', 'key', 'recorded_at', 'recorded_by'}
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HMGET', KEYS[1], unpack(fields))
end
if ARGV[6] ~= '1' then
  return {}
end
redis.call('HSET', KEYS[1], fields[1], ARGV[1], fields[2], ARGV[2], fields[3], ARGV[3],
           fields[4], ARGV[4], fields[5], ARGV[5])
return {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]}
";

/// Why a producer or worker must not use a stream with its partitioning.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PartitioningError {
    /// The recorded partitioning differs from the wanted one.
    #[error(transparent)]
    Mismatch(Box<Mismatch>),
    /// The stream has entries under its plain key and no recorded partitioning.
    #[error(
        "stream `{stream}` is a single-key stream ({entries} entries under the key `{stream}`, no recorded partitioning), but this {role} uses {wanted}: partitioning an existing stream is a new stream version — publish to a new stream (e.g. `{next}`), point the pipelines at it and bootstrap them from the snapshot; nothing was written",
        next = next_version(stream)
    )]
    SingleKey {
        /// The logical stream.
        stream: String,
        /// Entries under the plain key.
        entries: u64,
        /// What the caller uses.
        wanted: Partitioning,
        /// The caller.
        role: String,
    },
    /// The stream's name cannot be partitioned.
    #[error("stream `{stream}`: {reason}; nothing was written")]
    InvalidName {
        /// The logical stream.
        stream: String,
        /// Why.
        reason: String,
    },
    /// The record exists but is not a partitioning ecst wrote.
    #[error(
        "the partitioning of stream `{stream}` recorded under `{key}` cannot be read ({problem}); look at it with HGETALL {key} and delete it only if no producer or worker uses the stream; nothing was written"
    )]
    Unreadable {
        /// The logical stream.
        stream: String,
        /// The record's key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Redis did not answer the check (retrying may help).
    #[error("checking the partitioning of stream `{stream}` in Redis failed: {message}")]
    Redis {
        /// The logical stream.
        stream: String,
        /// Redis's error, or the timeout.
        message: String,
        /// Whether the connection itself failed (reconnect before retrying).
        transport: bool,
    },
}

/// A stream recorded with one partitioning, used with another.
#[derive(Debug, thiserror::Error)]
#[error(
    "stream `{stream}` is recorded as {recorded} (by {recorded_by}, {recorded_at}), but this {role} uses {wanted}: changing the partition count or key is a new stream version — publish to a new stream (e.g. `{next}`), point the pipelines at it and bootstrap them from the snapshot; nothing was written",
    next = next_version(stream)
)]
pub struct Mismatch {
    /// The logical stream.
    pub stream: String,
    /// What Redis holds.
    pub recorded: Partitioning,
    /// Who recorded it.
    pub recorded_by: String,
    /// When it was recorded (RFC 3339).
    pub recorded_at: String,
    /// What the caller uses.
    pub wanted: Partitioning,
    /// The caller: `producer`, `relay`, `worker`.
    pub role: String,
}

impl PartitioningError {
    /// Whether retrying the check can succeed (Redis failed), as opposed to a refusal.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PartitioningError::Redis { .. })
    }
}

/// The name to suggest for the stream's next version: `orders.v1` -> `orders.v2`, `orders`
/// -> `orders.v2`.
fn next_version(stream: &str) -> String {
    if let Some((base, version)) = stream.rsplit_once(".v")
        && let Ok(n) = version.parse::<u64>()
    {
        return format!("{base}.v{}", n.saturating_add(1));
    }
    format!("{stream}.v2")
}

/// Checks `wanted` against the partitioning recorded for `stream`, recording it first when
/// none is and `wanted` has more than one partition; `role` names the caller in the error.
pub async fn ensure_partitioning(
    conn: &mut impl ConnectionLike,
    stream: &str,
    wanted: &Partitioning,
    role: &str,
) -> Result<(), PartitioningError> {
    let partitioned = wanted.partitions > 1;
    if partitioned && let Err(reason) = check_partitioned_name(stream) {
        return Err(PartitioningError::InvalidName {
            stream: stream.to_string(),
            reason,
        });
    }
    let redis_error = |e: redis::RedisError| PartitioningError::Redis {
        stream: stream.to_string(),
        transport: ecst_operators::redis_pool::is_transport_error(&e),
        message: e.to_string(),
    };
    // A separate command before the script: the plain key lives in another slot. A
    // single-key producer racing this check is not seen; it also records nothing to see.
    let single_key_entries = if partitioned {
        let reply = bounded(stream, redis::cmd("XLEN").arg(stream).query_async(conn)).await?;
        match reply {
            Ok(n) => n,
            // The plain key holds something else: no stream entries to strand.
            Err(e) if e.code() == Some("WRONGTYPE") => 0,
            Err(e) => return Err(redis_error(e)),
        }
    } else {
        0
    };
    let key = partitioning_key(stream);
    let record = partitioned && single_key_entries == 0;
    let now = OffsetDateTime::now_utc();
    let recorded_at = now
        .replace_nanosecond(0)
        .unwrap_or(now)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "unknown time".into());
    let reply: Result<Vec<Option<String>>, redis::RedisError> = bounded(
        stream,
        redis::Script::new(RECORD_OR_READ)
            .key(&key)
            .arg(wanted.partitions)
            .arg(&wanted.hash)
            .arg(&wanted.key)
            .arg(recorded_at)
            .arg(recorder(role))
            .arg(if record { "1" } else { "0" })
            .invoke_async(conn),
    )
    .await?;
    let reply = match reply {
        Ok(reply) => reply,
        // A single-key user whose ACL predates partitions keeps working; it is told how to
        // let the check run.
        Err(e) if !partitioned && e.code() == Some("NOPERM") => {
            tracing::warn!(stream, key = %key, role, error = %e, "Cannot read the stream's recorded partitioning (the ACL refuses it), so a stream that was partitioned since would not be noticed; grant read on `ecst:partitioning:*` and EVAL/EVALSHA.");
            return Ok(());
        }
        Err(e) if e.code() == Some("WRONGTYPE") => {
            return Err(PartitioningError::Unreadable {
                stream: stream.to_string(),
                key: key.clone(),
                problem: "the key is not a hash".into(),
            });
        }
        Err(e) => return Err(redis_error(e)),
    };
    if reply.is_empty() {
        return if partitioned {
            Err(PartitioningError::SingleKey {
                stream: stream.to_string(),
                entries: single_key_entries,
                wanted: wanted.clone(),
                role: role.to_string(),
            })
        } else {
            Ok(())
        };
    }
    let unreadable = |problem: String| PartitioningError::Unreadable {
        stream: stream.to_string(),
        key: key.clone(),
        problem,
    };
    let field = |i: usize, name: &str| {
        reply
            .get(i)
            .cloned()
            .flatten()
            .ok_or_else(|| unreadable(format!("field `{name}` is missing")))
    };
    let count = field(0, "partitions")?;
    let recorded = Partitioning {
        partitions: count
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| unreadable(format!("`partitions` is {count:?}, not a count")))?,
        hash: field(1, "hash")?,
        key: field(2, "key")?,
    };
    if &recorded == wanted {
        return Ok(());
    }
    Err(PartitioningError::Mismatch(Box::new(Mismatch {
        stream: stream.to_string(),
        recorded,
        recorded_by: field(4, "recorded_by").unwrap_or_else(|_| "an unknown writer".into()),
        recorded_at: field(3, "recorded_at").unwrap_or_else(|_| "an unknown time".into()),
        wanted: wanted.clone(),
        role: role.to_string(),
    })))
}

/// One Redis call bounded by [`CALL_TIMEOUT`]; the outer error is the timeout.
async fn bounded<T>(
    stream: &str,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<redis::RedisResult<T>, PartitioningError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| PartitioningError::Redis {
            stream: stream.to_string(),
            message: format!("no answer within {CALL_TIMEOUT:?}"),
            transport: true,
        })
}

/// Who records a partitioning: the role, the ecst version and the process.
fn recorder(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "an unknown host".into());
    format!(
        "{role} pid {} on {host} (ecst {})",
        std::process::id(),
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::AsyncCommands;

    async fn conn() -> redis::aio::MultiplexedConnection {
        let url =
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
        redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("a Redis server on REDIS_URL")
    }

    fn unique(label: &str) -> String {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        format!(
            "unit:partitioning:{label}:{}:{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }

    async fn cleanup(c: &mut redis::aio::MultiplexedConnection, stream: &str) {
        let _: () = c.del(&[stream, &partitioning_key(stream)]).await.unwrap();
    }

    #[tokio::test]
    async fn one_partition_records_nothing() {
        let mut c = conn().await;
        let stream = unique("single");
        ensure_partitioning(&mut c, &stream, &Partitioning::new(1), "producer")
            .await
            .unwrap();
        let exists: bool = c.exists(partitioning_key(&stream)).await.unwrap();
        assert!(!exists, "a single-key stream must stay unrecorded");
    }

    #[tokio::test]
    async fn the_first_partitioned_user_records_and_the_same_partitioning_passes() {
        let mut c = conn().await;
        let stream = unique("record");
        let eight = Partitioning::new(8);
        ensure_partitioning(&mut c, &stream, &eight, "producer")
            .await
            .unwrap();
        let record: std::collections::HashMap<String, String> =
            c.hgetall(partitioning_key(&stream)).await.unwrap();
        assert_eq!(record["partitions"], "8");
        assert_eq!(record["hash"], "fnv1a_32");
        assert_eq!(record["key"], "aggregateId");
        assert!(record["recorded_by"].starts_with("producer pid "));
        assert!(OffsetDateTime::parse(&record["recorded_at"], &Rfc3339).is_ok());
        ensure_partitioning(&mut c, &stream, &eight, "worker")
            .await
            .unwrap();
        // The first record stays: the worker did not overwrite it.
        let by: String = c
            .hget(partitioning_key(&stream), "recorded_by")
            .await
            .unwrap();
        assert!(by.starts_with("producer"));
        cleanup(&mut c, &stream).await;
    }

    #[tokio::test]
    async fn another_count_or_key_is_refused_naming_both() {
        let mut c = conn().await;
        let stream = unique("mismatch");
        ensure_partitioning(&mut c, &stream, &Partitioning::new(8), "producer")
            .await
            .unwrap();
        let err = ensure_partitioning(&mut c, &stream, &Partitioning::new(4), "producer")
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, PartitioningError::Mismatch(_)));
        assert!(!err.is_retryable());
        assert!(
            message.contains(&format!(
                "stream `{stream}` is recorded as 8 partitions by fnv1a_32(aggregateId)"
            )),
            "{message}"
        );
        assert!(
            message.contains("but this producer uses 4 partitions by fnv1a_32(aggregateId)"),
            "{message}"
        );
        assert!(message.contains("new stream version"), "{message}");
        assert!(message.contains("nothing was written"), "{message}");
        // One partition against a partitioned stream is a mismatch too.
        let err = ensure_partitioning(&mut c, &stream, &Partitioning::new(1), "worker")
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("but this worker uses 1 partition by"),
            "{err}"
        );
        let other_key = Partitioning {
            key: "customerId".into(),
            ..Partitioning::new(8)
        };
        let err = ensure_partitioning(&mut c, &stream, &other_key, "relay")
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("this relay uses 8 partitions by fnv1a_32(customerId)"),
            "{err}"
        );
        cleanup(&mut c, &stream).await;
    }

    #[tokio::test]
    async fn a_single_key_stream_with_entries_is_not_partitioned_in_place() {
        let mut c = conn().await;
        let stream = unique("was-single");
        let _: String = c.xadd(&stream, "*", &[("v", "{}")]).await.unwrap();
        ensure_partitioning(&mut c, &stream, &Partitioning::new(1), "producer")
            .await
            .unwrap();
        let err = ensure_partitioning(&mut c, &stream, &Partitioning::new(4), "producer")
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            PartitioningError::SingleKey { entries: 1, .. }
        ));
        assert!(err.to_string().contains("new stream version"), "{err}");
        let exists: bool = c.exists(partitioning_key(&stream)).await.unwrap();
        assert!(!exists, "a refused check records nothing");
        cleanup(&mut c, &stream).await;
    }

    #[tokio::test]
    async fn a_damaged_record_is_named_not_trusted() {
        let mut c = conn().await;
        let stream = unique("damaged");
        let _: () = c
            .hset(partitioning_key(&stream), "partitions", "eight")
            .await
            .unwrap();
        let err = ensure_partitioning(&mut c, &stream, &Partitioning::new(8), "worker")
            .await
            .unwrap_err();
        assert!(matches!(err, PartitioningError::Unreadable { .. }), "{err}");
        assert!(err.to_string().contains(&partitioning_key(&stream)));
        let _: () = c.del(partitioning_key(&stream)).await.unwrap();
        let _: () = c.set(partitioning_key(&stream), "8").await.unwrap();
        let err = ensure_partitioning(&mut c, &stream, &Partitioning::new(8), "worker")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a hash"), "{err}");
        cleanup(&mut c, &stream).await;
    }

    #[tokio::test]
    async fn concurrent_first_users_agree_on_one_record() {
        let stream = unique("race");
        let mut tasks = Vec::new();
        for n in [4, 8, 4, 8, 4, 8] {
            let stream = stream.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = conn().await;
                ensure_partitioning(&mut c, &stream, &Partitioning::new(n), "producer")
                    .await
                    .map(|()| n)
            }));
        }
        let mut winners = std::collections::HashSet::new();
        for task in tasks {
            if let Ok(n) = task.await.unwrap() {
                winners.insert(n);
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "exactly one partitioning wins: {winners:?}"
        );
        let mut c = conn().await;
        cleanup(&mut c, &stream).await;
    }

    #[test]
    fn the_next_version_is_suggested() {
        assert_eq!(next_version("orders"), "orders.v2");
        assert_eq!(
            next_version("athletes.athlete-updated.v1"),
            "athletes.athlete-updated.v2"
        );
        assert_eq!(next_version("a.very"), "a.very.v2");
    }

    #[tokio::test]
    async fn a_name_with_braces_is_refused() {
        let mut c = conn().await;
        let err = ensure_partitioning(&mut c, "or{ders}", &Partitioning::new(4), "producer").await;
        assert!(matches!(err, Err(PartitioningError::InvalidName { .. })));
    }
}

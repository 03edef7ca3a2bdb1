//! The start-time check that every Redis a worker talks to accepts its credentials and the
//! commands it will send on the keys it will touch, so that a wrong password or a narrow ACL
//! stops the start with the server, user and refused command named, instead of retrying
//! forever behind a generic timeout.
//!
//! Each probe is a real command on the real key that has no effect: it either fails the ACL
//! check (`NOPERM`, checked by Redis before the command runs) or stops at an argument Redis
//! rejects before touching data (`BLOCK -1`, `MAXLEN -1`, an unknown script sha). A server
//! that does not answer is not an error here: the worker starts and retries as before.

use std::time::Duration;

use ecst_operators::redis_pool::{
    RedisConn, RedisFailure, RedisManager, is_cluster_url, is_transport_error,
};
use ecst_operators::sinks::redis_hash::{KeyTemplate, RedisHashConfig, tombstone_key};
use ecst_operators::{SecretUrl, StageConfig};
use ecst_schemas::Envelope;

use crate::config::PipelineConfig;

/// A Redis server refused the worker's credentials, certificates or one of its commands.
#[derive(Debug, thiserror::Error)]
#[error("{probe} was refused: {failure}")]
pub struct PreflightError {
    /// What was tried, e.g. "EVALSHA on key `athlete:x` (redis_hash sink `cache`)".
    pub probe: String,
    /// What the server said, classified.
    pub failure: RedisFailure,
}

/// The aggregate id the probes render sink keys with.
const PROBE_ID: &str = "ecst-preflight";

/// A sha no script has: EVALSHA of it answers NOSCRIPT when permitted, NOPERM when not.
const UNKNOWN_SHA: &str = "0000000000000000000000000000000000000000";

/// One probe: a description and the command.
struct Probe {
    what: String,
    cmd: redis::Cmd,
}

/// Checks the source's and every `redis_hash` sink's server; `Err` for an authentication,
/// TLS or ACL refusal, `Ok` otherwise (also when a server is down: the worker retries).
pub async fn check_redis_access(config: &PipelineConfig) -> Result<(), PreflightError> {
    let source = &config.source;
    let mut servers: Vec<(SecretUrl, String, Vec<Probe>)> = vec![(
        source.redis.clone(),
        "the source".into(),
        source_probes(config),
    )];
    for stage in &config.stages {
        if let StageConfig::RedisHash(sink) = &stage.config {
            let url = sink.redis.clone().unwrap_or_else(|| source.redis.clone());
            let who = format!("redis_hash sink `{}`", stage.name);
            let probe = evalsha_probe(sink, is_cluster_url(&url), &who);
            match servers.iter_mut().find(|(u, _, _)| *u == url) {
                Some((_, _, probes)) => probes.push(probe),
                None => servers.push((url, who, vec![probe])),
            }
        }
    }
    for (url, who, probes) in servers {
        check_server(&url, &who, probes, source.timeout.0).await?;
    }
    Ok(())
}

/// A consumer group no pipeline uses, for probes that must not touch the real one.
const PROBE_GROUP: &str = "ecst-preflight-probe-no-such-group";

/// The source's commands: read, ack, claim, and dead-letter (a script that acks and adds),
/// on the stream, dead-letter and divergence keys.
fn source_probes(config: &PipelineConfig) -> Vec<Probe> {
    let source = &config.source;
    // A partitioned stream's keys all match what its first partition's key matches in an ACL
    // pattern such as `~orders*`.
    let first_key = ecst_schemas::partition::partition_stream(&source.stream, 0, source.partitions);
    let stream = first_key.as_str();
    let mut read = redis::cmd("XREADGROUP");
    read.arg("GROUP")
        .arg(&source.group)
        .arg(source.consumer_name())
        .arg("BLOCK")
        .arg(-1)
        .arg("STREAMS")
        .arg(stream)
        .arg(">");
    let mut ack = redis::cmd("XACK");
    ack.arg(stream).arg(&source.group).arg("0-0");
    let dead_letter = source.dead_letter_stream();
    let mut add = redis::cmd("XADD");
    add.arg(&dead_letter)
        .arg("NOMKSTREAM")
        .arg("MAXLEN")
        .arg(-1)
        .arg("*")
        .arg("probe")
        .arg("1");
    // On a group that does not exist: Redis checks the ACL first and then answers NOGROUP.
    // On the real group even a claim that takes nothing would drop deleted entries from the
    // pending list, and with them their `trimmed before applied` dead letters.
    let mut claim = redis::cmd("XAUTOCLAIM");
    claim
        .arg(stream)
        .arg(PROBE_GROUP)
        .arg(source.consumer_name())
        .arg(0)
        .arg("0-0")
        .arg("COUNT")
        .arg(1);
    let divergence = crate::commit::divergence_key(stream, &source.group);
    let mut script = redis::cmd("EVAL");
    script.arg("return 0");
    // On a cluster the three keys live in different slots and no script spans them: dead
    // letters are then plain XADD + XACK (probed below), so EVAL is checked on one key.
    let script_what = if ecst_operators::redis_pool::is_cluster_url(&source.redis) {
        script.arg(1).arg(stream);
        format!("EVAL on key `{stream}` (the source)")
    } else {
        script.arg(3).arg(stream).arg(&dead_letter).arg(&divergence);
        format!(
            "EVAL on keys `{stream}`, `{dead_letter}` and `{divergence}` (dead letters are acked and added in one script)"
        )
    };
    let mut probes = vec![
        Probe {
            what: format!("XREADGROUP on stream `{stream}` (the source)"),
            cmd: read,
        },
        Probe {
            what: format!("XAUTOCLAIM on stream `{stream}` (the source)"),
            cmd: claim,
        },
        Probe {
            what: script_what,
            cmd: script,
        },
        Probe {
            what: format!("XACK on stream `{stream}` (the source)"),
            cmd: ack,
        },
        Probe {
            what: format!("XADD on dead-letter stream `{dead_letter}` (the source)"),
            cmd: add,
        },
    ];
    // A partitioned worker also runs scripts on its group's lease and membership keys and on
    // the stream's partitioning record.
    if source.partitions > 1 {
        for key in [
            crate::lease::partition_lease_key(&source.stream, &source.group, 0),
            crate::lease::members_key(&source.stream, &source.group),
            ecst_schemas::partition::partitioning_key(&source.stream),
        ] {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg("return 0").arg(1).arg(&key);
            probes.push(Probe {
                what: format!("EVAL on key `{key}` (partition leases and the partitioning record)"),
                cmd,
            });
        }
    }
    probes
}

/// EVALSHA of an unknown script over the keys a record would touch (when the key template
/// renders from the aggregate id alone; otherwise over no keys, which checks the command).
/// The sink's batch script on a hash, its tombstone and, on one server, the freshness record
/// it writes in the same call (on a cluster that is a separate, best-effort command).
fn evalsha_probe(sink: &RedisHashConfig, cluster: bool, who: &str) -> Probe {
    let (key_template, tombstone_prefix) = (sink.key.as_str(), sink.tombstone_prefix.as_str());
    let probe_event = Envelope {
        schema_version: None,
        event_id: None,
        event_type: None,
        occurred_at: None,
        aggregate_type: None,
        aggregate_id: PROBE_ID.to_string(),
        aggregate_version: 0,
        payload: None,
        deleted: false,
    };
    let key = KeyTemplate::parse(key_template)
        .and_then(|template| template.render(&probe_event))
        .ok();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(UNKNOWN_SHA);
    let what = match key {
        Some(key) => {
            // A key with no tombstone in its slot is refused record by record; probe the plain one.
            let tombstone = tombstone_key(tombstone_prefix, &key, cluster)
                .unwrap_or_else(|_| format!("{tombstone_prefix}{key}"));
            if cluster {
                cmd.arg(2).arg(&key).arg(&tombstone);
                format!("EVALSHA on keys `{key}` and `{tombstone}` ({who})")
            } else {
                let freshness = sink.freshness_key();
                cmd.arg(3).arg(&key).arg(&tombstone).arg(&freshness);
                format!("EVALSHA on keys `{key}`, `{tombstone}` and `{freshness}` ({who})")
            }
        }
        None if cluster => {
            cmd.arg(0);
            format!("EVALSHA ({who})")
        }
        None => {
            let freshness = sink.freshness_key();
            cmd.arg(1).arg(&freshness);
            format!("EVALSHA on key `{freshness}` ({who})")
        }
    };
    Probe { what, cmd }
}

async fn check_server(
    url: &SecretUrl,
    who: &str,
    probes: Vec<Probe>,
    timeout: Duration,
) -> Result<(), PreflightError> {
    let Some(mut conn) = connect(url, who, timeout).await? else {
        return Ok(());
    };
    for probe in probes {
        match probe.cmd.query_async::<redis::Value>(&mut conn).await {
            Ok(_) => {}
            Err(e) => {
                let failure = RedisFailure::new(url, &e);
                if failure.kind.is_configuration() {
                    return Err(PreflightError {
                        probe: probe.what,
                        failure,
                    });
                }
                // The expected refusals of the harmless arguments, or an outage.
                if is_transport_error(&e) {
                    tracing::warn!(server = %url, error = %failure, "Cannot finish checking Redis access at start; the worker starts and retries.");
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Connects as the worker will; `None` when the server is not reachable now.
async fn connect(
    url: &SecretUrl,
    who: &str,
    timeout: Duration,
) -> Result<Option<RedisConn>, PreflightError> {
    let refused = |failure: RedisFailure| PreflightError {
        probe: format!("connecting to {who}"),
        failure,
    };
    // An invalid URL is reported by `validate` and by the pool that follows.
    let Ok(manager) = RedisManager::new(url, timeout) else {
        return Ok(None);
    };
    match manager.connect_once(timeout).await {
        Ok(conn) => Ok(Some(conn)),
        Err(e) => {
            let failure = RedisFailure::new(url, &e);
            if failure.kind.is_configuration() {
                return Err(refused(failure));
            }
            tracing::warn!(server = %url, error = %failure, "Cannot check Redis access at start; the worker starts and retries.");
            Ok(None)
        }
    }
}

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
    FailureKind, RedisConn, RedisFailure, RedisManager, is_cluster_url, is_transport_error,
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

/// The probes of one server, each with the stage it is for, and who uses the server.
struct Server {
    url: SecretUrl,
    who: String,
    probes: Vec<(String, Probe)>,
}

/// Every server the pipeline's source and `redis_hash` sinks talk to, with the probes of the
/// commands each sends; with `thorough`, also those a start need not wait for (group
/// creation, the group's watch, script loading, the bootstrap's read-back of replicas).
fn servers(config: &PipelineConfig, thorough: bool) -> Vec<Server> {
    let source = &config.source;
    let mut source_probes = source_probes(config);
    if thorough {
        source_probes.extend(source_extra_probes(config));
    }
    let mut servers = vec![Server {
        url: source.redis.clone(),
        who: "the source".into(),
        probes: source_probes
            .into_iter()
            .map(|probe| ("source".to_string(), probe))
            .collect(),
    }];
    for stage in &config.stages {
        if let StageConfig::RedisHash(sink) = &stage.config {
            let url = sink.redis.clone().unwrap_or_else(|| source.redis.clone());
            let who = format!("redis_hash sink `{}`", stage.name);
            let cluster = is_cluster_url(&url);
            let mut probes = vec![evalsha_probe(sink, cluster, &who)];
            if thorough {
                probes.extend(script_probes(sink, cluster, &who));
                probes.extend(sink_extra_probes(sink, &who, config.bootstrap.is_some()));
            }
            let probes: Vec<(String, Probe)> = probes
                .into_iter()
                .map(|probe| (format!("stage {}", stage.name), probe))
                .collect();
            match servers.iter_mut().find(|s| s.url == url) {
                Some(server) => server.probes.extend(probes),
                None => servers.push(Server { url, who, probes }),
            }
        }
    }
    servers
}

/// Checks the source's and every `redis_hash` sink's server; `Err` for an authentication,
/// TLS or ACL refusal, `Ok` otherwise (also when a server is down: the worker retries).
pub async fn check_redis_access(config: &PipelineConfig) -> Result<(), PreflightError> {
    for server in servers(config, false) {
        let probes = server.probes.into_iter().map(|(_, probe)| probe).collect();
        check_server(&server.url, &server.who, probes, config.source.timeout.0).await?;
    }
    Ok(())
}

/// One command `ecst validate --connect` tried on a Redis server, and what came of it.
#[derive(Debug)]
pub struct AccessCheck {
    /// `source` or `stage <name>`.
    pub stage: String,
    /// The server, password masked.
    pub server: String,
    /// What was tried, e.g. "EVALSHA on keys `a`, `b` (redis_hash sink `cache`)".
    pub probe: String,
    /// `Err` with the reason when the server refused it or could not be asked.
    pub outcome: Result<(), RedisFailure>,
}

/// Tries every command the worker (and its bootstrap) will send, on the keys it will touch,
/// as the configured users, and reports each: unlike the start's check, an unreachable
/// server is a failure here, and the check goes on past the first refusal.
pub async fn check_redis_access_all(config: &PipelineConfig) -> Vec<AccessCheck> {
    let timeout = config.source.timeout.0;
    let mut checks = Vec::new();
    for server in servers(config, true) {
        let shown = server.url.redacted();
        let fail_all = |failure: RedisFailure, probes: Vec<(String, Probe)>| {
            probes
                .into_iter()
                .map(|(stage, probe)| AccessCheck {
                    stage,
                    server: shown.clone(),
                    probe: probe.what,
                    outcome: Err(failure.clone()),
                })
                .collect::<Vec<_>>()
        };
        let manager = match RedisManager::new(&server.url, timeout) {
            Ok(manager) => manager,
            Err(e) => {
                let failure = RedisFailure {
                    kind: FailureKind::Other,
                    server: shown.clone(),
                    user: ecst_operators::redis_pool::redis_user(&server.url),
                    detail: e.to_string(),
                };
                checks.extend(fail_all(failure, server.probes));
                continue;
            }
        };
        let mut conn = match manager.connect_once(timeout).await {
            Ok(conn) => conn,
            Err(e) => {
                checks.extend(fail_all(RedisFailure::new(&server.url, &e), server.probes));
                continue;
            }
        };
        for (stage, probe) in server.probes {
            let outcome = match probe.cmd.query_async::<redis::Value>(&mut conn).await {
                Err(e) if is_transport_error(&e) || FailureKind::of(&e).is_configuration() => {
                    Err(RedisFailure::new(&server.url, &e))
                }
                // The expected refusals of the harmless arguments.
                _ => Ok(()),
            };
            checks.push(AccessCheck {
                stage,
                server: shown.clone(),
                probe: probe.what,
                outcome,
            });
        }
    }
    checks
}

/// Commands of the source besides those a start checks: creating the group, the group's
/// watch (XINFO, XPENDING) and loading scripts.
fn source_extra_probes(config: &PipelineConfig) -> Vec<Probe> {
    let source = &config.source;
    let first_key = ecst_schemas::partition::partition_stream(&source.stream, 0, source.partitions);
    let stream = first_key.as_str();
    // An id Redis rejects after the ACL check, so no group is created.
    let mut create = redis::cmd("XGROUP");
    create
        .arg("CREATE")
        .arg(stream)
        .arg(PROBE_GROUP)
        .arg("not-an-id")
        .arg("MKSTREAM");
    let mut info = redis::cmd("XINFO");
    info.arg("GROUPS").arg(stream);
    let mut pending = redis::cmd("XPENDING");
    pending.arg(stream).arg(PROBE_GROUP);
    // Not an integer: refused after the ACL check.
    let divergence = crate::commit::divergence_key(stream, &source.group);
    let mut hincrby = redis::cmd("HINCRBY");
    hincrby.arg(&divergence).arg("probe").arg("not-a-number");
    vec![
        Probe {
            what: format!("XGROUP CREATE on stream `{stream}` (the source)"),
            cmd: create,
        },
        Probe {
            what: format!("XINFO GROUPS on stream `{stream}` (the source)"),
            cmd: info,
        },
        Probe {
            what: format!("XPENDING on stream `{stream}` (the source)"),
            cmd: pending,
        },
        script_load_probe("the source"),
        Probe {
            what: format!("HINCRBY on key `{divergence}` (the source, in its dead-letter script)"),
            cmd: hincrby,
        },
    ]
}

/// The commands a sink's batch script runs inside Redis, which Redis checks against the ACL
/// only when the script runs: each on its own key, in a form that changes nothing (an odd
/// field/value count for HSET, a zero expiry for SET; DEL of the probe aggregate's key,
/// which no record has).
fn script_probes(sink: &RedisHashConfig, cluster: bool, who: &str) -> Vec<Probe> {
    let Some(key) = probe_key(sink) else {
        return Vec::new();
    };
    let tombstone = tombstone_key(&sink.tombstone_prefix, &key, cluster)
        .unwrap_or_else(|_| format!("{}{key}", sink.tombstone_prefix));
    let in_script = format!("{who}, in its batch script");
    let probe = |name: &str, key: &str, args: &[&str], who: &str| {
        let mut cmd = redis::cmd(name);
        cmd.arg(key);
        for arg in args {
            cmd.arg(*arg);
        }
        Probe {
            what: format!("{name} on key `{key}` ({who})"),
            cmd,
        }
    };
    // The freshness record is written by the script on one server, by a command of its own
    // on a cluster.
    let freshness_writer = if cluster { who } else { &in_script };
    vec![
        probe("HGET", &key, &[&sink.version_field], &in_script),
        probe("HLEN", &key, &[], &in_script),
        probe("HSET", &key, &["probe", "1", "odd"], &in_script),
        probe("DEL", &key, &[], &in_script),
        probe("GET", &tombstone, &[], &in_script),
        probe("SET", &tombstone, &["0", "PX", "0"], &in_script),
        probe("DEL", &tombstone, &[], &in_script),
        probe(
            "HSET",
            &sink.freshness_key(),
            &["probe", "1", "odd"],
            freshness_writer,
        ),
    ]
}

/// `SCRIPT LOAD` of a script that does nothing: what the client sends when a server does
/// not know a script yet.
fn script_load_probe(who: &str) -> Probe {
    let mut cmd = redis::cmd("SCRIPT");
    cmd.arg("LOAD").arg("return 0");
    Probe {
        what: format!("SCRIPT LOAD ({who})"),
        cmd,
    }
}

/// A sink's commands besides its batch script: loading the script and, with a bootstrap,
/// reading the replica back (SCAN for orphans, HGETALL).
fn sink_extra_probes(sink: &RedisHashConfig, who: &str, bootstrap: bool) -> Vec<Probe> {
    let mut probes = vec![script_load_probe(who)];
    if bootstrap {
        let key = probe_key(sink).unwrap_or_else(|| PROBE_ID.to_string());
        let mut read = redis::cmd("HGETALL");
        read.arg(&key);
        probes.push(Probe {
            what: format!("HGETALL on key `{key}` ({who}, the bootstrap reads the replica back)"),
            cmd: read,
        });
        let mut scan = redis::cmd("SCAN");
        scan.arg(0).arg("COUNT").arg(1);
        probes.push(Probe {
            what: format!("SCAN ({who}, the bootstrap looks for orphaned keys)"),
            cmd: scan,
        });
    }
    probes
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
    let tombstone_prefix = sink.tombstone_prefix.as_str();
    let key = probe_key(sink);
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

/// The key a record of aggregate [`PROBE_ID`] would have, when the key template renders from
/// the aggregate id alone.
fn probe_key(sink: &RedisHashConfig) -> Option<String> {
    let probe_event = Envelope {
        schema_version: None,
        event_id: None,
        event_type: None,
        occurred_at: None,
        aggregate_type: None,
        aggregate_id: PROBE_ID.to_string(),
        aggregate_version: 0,
        base_version: None,
        payload: None,
        payload_ref: None,
        deleted: false,
    };
    KeyTemplate::parse(&sink.key)
        .and_then(|template| template.render(&probe_event))
        .ok()
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

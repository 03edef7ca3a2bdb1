//! The Redis `ecst bench` writes to and measures: one server, or the masters of a Redis Cluster
//! (`redis+cluster://host:port,...`), each key's commands sent to the master serving its slot.
//!
//! The bench talks to every master itself rather than through a cluster client: it reads each
//! master's CPU time, scans each master's keys, and pipelines each master's share of a batch
//! concurrently, none of which a cluster client exposes.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use ecst_operators::SecretUrl;
use ecst_operators::redis_pool::{key_slot, slot_ranges};
use futures::future::try_join_all;
use redis::Value;
use redis::aio::MultiplexedConnection;

/// Slots of a Redis Cluster, as an index bound.
const SLOTS: usize = ecst_operators::redis_pool::SLOTS as usize;

/// Commands per pipeline.
const PIPELINE: usize = 1000;

/// A cluster URL's seeds as single-node URLs with the same credentials and options; `None`
/// for a single-node URL.
fn seed_urls(url: &str) -> anyhow::Result<Option<Vec<String>>> {
    ecst_operators::redis_pool::cluster_seed_urls(&SecretUrl::new(url))
        .with_context(|| format!("invalid cluster URL {}", SecretUrl::new(url)))
}

/// `url` with its host and port replaced by `host:port`.
fn with_host(url: &str, host: &str, port: i64) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
    format!("{scheme}://{userinfo}{host}:{port}{tail}")
}

/// The host part of a single-node URL.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let hostport = authority.rsplit('@').next().unwrap_or(authority);
    hostport.rsplit_once(':').map_or(hostport, |(host, _)| host)
}

async fn connect_node(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    let secret = SecretUrl::new(url);
    ecst_operators::redis_pool::redis_client(&secret)
        .with_context(|| format!("invalid Redis URL {secret}"))?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("cannot connect to Redis at {secret}"))
}

/// A cluster's masters and which of them serves each slot.
#[derive(Debug)]
struct SlotTable {
    /// (host, port) of each master.
    masters: Vec<(String, i64)>,
    /// Each slot's index in `masters`.
    owner: Vec<usize>,
}

/// The slot table of a CLUSTER SLOTS reply from the node reached at `seed_host`.
fn parse_slots(reply: &Value, seed_host: &str) -> anyhow::Result<SlotTable> {
    let mut masters: Vec<(String, i64)> = Vec::new();
    let mut owner = vec![usize::MAX; SLOTS];
    for range in slot_ranges(reply, seed_host).map_err(anyhow::Error::msg)? {
        let master = (range.host, i64::from(range.port));
        let index = match masters.iter().position(|m| *m == master) {
            Some(i) => i,
            None => {
                masters.push(master);
                masters.len() - 1
            }
        };
        for slot in owner
            .iter_mut()
            .take(usize::from(range.last) + 1)
            .skip(usize::from(range.first))
        {
            *slot = index;
        }
    }
    if let Some(slot) = owner.iter().position(|&o| o == usize::MAX) {
        bail!("slot {slot} has no master (is the cluster's state ok? redis-cli cluster info)");
    }
    Ok(SlotTable { masters, owner })
}

/// One Redis server, or every master of a cluster with the slot table.
pub(crate) struct Target {
    /// Each master's `host:port` and connection.
    masters: Vec<(String, MultiplexedConnection)>,
    /// Each slot's index in `masters` (empty for one server: it serves every key).
    owner: Vec<usize>,
}

impl Target {
    /// Connects to the server, or to a seed of the cluster and then to each of its masters.
    pub(crate) async fn connect(url: &str) -> anyhow::Result<Target> {
        let Some(seeds) = seed_urls(url)? else {
            let conn = connect_node(url).await?;
            let name = SecretUrl::new(url).redacted();
            return Ok(Target {
                masters: vec![(name, conn)],
                owner: Vec::new(),
            });
        };
        let mut last_error = None;
        for seed in &seeds {
            let reply = match connect_node(seed).await {
                Ok(mut conn) => redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<Value>(&mut conn)
                    .await
                    .with_context(|| format!("CLUSTER SLOTS on {}", SecretUrl::new(seed))),
                Err(e) => Err(e),
            };
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            let table = parse_slots(&reply, host_of(seed))
                .with_context(|| format!("the cluster of {}", SecretUrl::new(seed)))?;
            let mut masters = Vec::with_capacity(table.masters.len());
            for (host, port) in table.masters {
                let conn = connect_node(&with_host(seed, &host, port)).await?;
                masters.push((format!("{host}:{port}"), conn));
            }
            return Ok(Target {
                masters,
                owner: table.owner,
            });
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no seed in {}", SecretUrl::new(url))))
    }

    /// `host:port` of each master (the redacted URL for one server).
    pub(crate) fn master_names(&self) -> Vec<String> {
        self.masters.iter().map(|(name, _)| name.clone()).collect()
    }

    fn master_of(&self, key: &[u8]) -> usize {
        if self.owner.is_empty() {
            0
        } else {
            self.owner[usize::from(key_slot(key))]
        }
    }

    /// A connection to the master serving `key`.
    pub(crate) fn conn_for(&self, key: &str) -> MultiplexedConnection {
        self.masters[self.master_of(key.as_bytes())].1.clone()
    }

    /// Each master's share of `cmds` (each with the key it touches) as pipelines of
    /// [`PIPELINE`] commands whose replies are dropped, in the given order.
    pub(crate) fn route(
        &self,
        cmds: impl IntoIterator<Item = (String, redis::Cmd)>,
    ) -> Vec<Vec<redis::Pipeline>> {
        let mut routed: Vec<Vec<redis::Pipeline>> = vec![Vec::new(); self.masters.len()];
        for (key, cmd) in cmds {
            let pipes = &mut routed[self.master_of(key.as_bytes())];
            if pipes.last().is_none_or(|p| p.len() >= PIPELINE) {
                pipes.push(redis::pipe());
            }
            if let Some(pipe) = pipes.last_mut() {
                pipe.add_command(cmd).ignore();
            }
        }
        routed
    }

    /// Runs routed pipelines, the masters concurrently, each master's in order.
    pub(crate) async fn run(&self, routed: &[Vec<redis::Pipeline>]) -> anyhow::Result<()> {
        try_join_all(
            self.masters
                .iter()
                .zip(routed)
                .map(|((name, conn), pipes)| {
                    let mut conn = conn.clone();
                    async move {
                        for pipe in pipes {
                            pipe.query_async::<()>(&mut conn)
                                .await
                                .with_context(|| format!("Redis {name}"))?;
                        }
                        anyhow::Ok(())
                    }
                }),
        )
        .await?;
        Ok(())
    }

    /// Runs `cmds`, each on the master serving its key, and drops the replies.
    pub(crate) async fn exec(
        &self,
        cmds: impl IntoIterator<Item = (String, redis::Cmd)>,
    ) -> anyhow::Result<()> {
        self.run(&self.route(cmds)).await
    }

    /// Runs `cmds`, each on the master serving its key, and returns the replies in order.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        cmds: impl IntoIterator<Item = (String, redis::Cmd)>,
    ) -> anyhow::Result<Vec<T>> {
        let mut groups: Vec<Vec<(usize, redis::Cmd)>> = vec![Vec::new(); self.masters.len()];
        let mut count = 0;
        for (key, cmd) in cmds {
            groups[self.master_of(key.as_bytes())].push((count, cmd));
            count += 1;
        }
        let replies = try_join_all(
            self.masters
                .iter()
                .zip(groups)
                .map(|((name, conn), group)| {
                    let mut conn = conn.clone();
                    async move {
                        let mut out = Vec::with_capacity(group.len());
                        for chunk in group.chunks(PIPELINE) {
                            let mut pipe = redis::pipe();
                            for (_, cmd) in chunk {
                                pipe.add_command(cmd.clone());
                            }
                            let values: Vec<Value> = pipe
                                .query_async(&mut conn)
                                .await
                                .with_context(|| format!("Redis {name}"))?;
                            out.extend(chunk.iter().map(|(i, _)| *i).zip(values));
                        }
                        anyhow::Ok(out)
                    }
                }),
        )
        .await?;
        let mut ordered: Vec<Option<Value>> = vec![None; count];
        for (i, value) in replies.into_iter().flatten() {
            ordered[i] = Some(value);
        }
        ordered
            .into_iter()
            .map(|value| {
                let value = value.context("Redis sent fewer replies than commands")?;
                redis::from_redis_value(value).context("an unexpected reply")
            })
            .collect()
    }

    /// Runs `cmd` on every master.
    pub(crate) async fn on_every_master(&self, cmd: &redis::Cmd) -> anyhow::Result<Vec<Value>> {
        try_join_all(self.masters.iter().map(|(name, conn)| {
            let mut conn = conn.clone();
            async move {
                cmd.query_async::<Value>(&mut conn)
                    .await
                    .with_context(|| format!("Redis {name}"))
            }
        }))
        .await
    }

    /// CPU seconds (system + user) each master has used since it started.
    pub(crate) async fn cpu_seconds(&self) -> anyhow::Result<Vec<f64>> {
        let replies = self.on_every_master(redis::cmd("INFO").arg("cpu")).await?;
        replies
            .into_iter()
            .zip(&self.masters)
            .map(|(reply, (name, _))| {
                let text: String = redis::from_redis_value(reply)
                    .with_context(|| format!("INFO cpu of {name}"))?;
                let field = |key: &str| -> anyhow::Result<f64> {
                    text.lines()
                        .find_map(|line| line.trim().strip_prefix(key)?.strip_prefix(':'))
                        .and_then(|v| v.parse().ok())
                        .with_context(|| format!("INFO cpu of {name} has no {key}"))
                };
                Ok(field("used_cpu_sys")? + field("used_cpu_user")?)
            })
            .collect()
    }

    /// Calls and microseconds per command (`INFO commandstats`), summed over the masters:
    /// commands a script runs count under their own names too, and in the script's time.
    pub(crate) async fn command_stats(&self) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
        let replies = self
            .on_every_master(redis::cmd("INFO").arg("commandstats"))
            .await?;
        let mut stats = BTreeMap::new();
        for (reply, (name, _)) in replies.into_iter().zip(&self.masters) {
            let text: String = redis::from_redis_value(reply)
                .with_context(|| format!("INFO commandstats of {name}"))?;
            for (command, calls, usec) in text.lines().filter_map(parse_command_stat) {
                let sum = stats.entry(command.to_string()).or_insert((0, 0));
                sum.0 += calls;
                sum.1 += usec;
            }
        }
        Ok(stats)
    }

    /// Unlinks every key matching `pattern` on every master.
    pub(crate) async fn unlink_matching(&self, pattern: &str) -> anyhow::Result<()> {
        try_join_all(self.masters.iter().map(|(name, conn)| {
            let mut conn = conn.clone();
            async move {
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(10_000)
                        .query_async(&mut conn)
                        .await
                        .with_context(|| format!("SCAN on Redis {name}"))?;
                    // One key per UNLINK: a cluster refuses keys of several slots in one.
                    for chunk in keys.chunks(PIPELINE) {
                        let mut pipe = redis::pipe();
                        for key in chunk {
                            pipe.cmd("UNLINK").arg(key).ignore();
                        }
                        pipe.query_async::<()>(&mut conn)
                            .await
                            .with_context(|| format!("UNLINK on Redis {name}"))?;
                    }
                    cursor = next;
                    if cursor == 0 {
                        return anyhow::Ok(());
                    }
                }
            }
        }))
        .await?;
        Ok(())
    }
}

/// A line of `INFO commandstats`, `cmdstat_hget:calls=5,usec=12,...`: the command (a
/// subcommand as `config|get`), its calls and microseconds.
fn parse_command_stat(line: &str) -> Option<(&str, u64, u64)> {
    let (command, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
    let field = |key: &str| {
        fields
            .split(',')
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    };
    Some((command, field("calls")?, field("usec")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_stats_lines_give_calls_and_microseconds() {
        assert_eq!(
            parse_command_stat(
                "cmdstat_xreadgroup:calls=106,usec=160042,usec_per_call=1509.83,rejected_calls=0,failed_calls=0\r"
            ),
            Some(("xreadgroup", 106, 160042))
        );
        assert_eq!(
            parse_command_stat("cmdstat_config|get:calls=2,usec=31,usec_per_call=15.50"),
            Some(("config|get", 2, 31))
        );
        assert_eq!(parse_command_stat("# Commandstats"), None);
        assert_eq!(parse_command_stat("cmdstat_hget:calls=x,usec=1"), None);
    }

    #[test]
    fn cluster_urls_become_one_url_per_seed() {
        assert_eq!(seed_urls("redis://127.0.0.1:6379").unwrap(), None);
        assert_eq!(
            seed_urls("redis+cluster://u:p@h1:7001,h2:7002/?protocol=resp3").unwrap(),
            Some(vec![
                "redis://u:p@h1:7001/?protocol=resp3".to_string(),
                "redis://u:p@h2:7002/?protocol=resp3".to_string(),
            ])
        );
        assert_eq!(
            seed_urls("rediss+cluster://h1:7001#insecure").unwrap(),
            Some(vec!["rediss://h1:7001#insecure".to_string()])
        );
        assert!(seed_urls("redis+cluster://").is_err());
        assert_eq!(
            with_host("rediss://u:p@h1:7001/?tls_ca=ca.crt", "10.0.0.2", 7003),
            "rediss://u:p@10.0.0.2:7003/?tls_ca=ca.crt"
        );
        assert_eq!(host_of("redis://u:p@h1:7001/"), "h1");
    }

    /// Against the local cluster scripts/services.sh starts: every key lands on (and is read
    /// from) the master serving it, or Redis would answer MOVED.
    #[tokio::test]
    async fn commands_reach_the_master_of_their_key() {
        let url = std::env::var("ECST_CLUSTER_URL").unwrap_or_else(|_| {
            "redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".to_string()
        });
        let target = Target::connect(&url)
            .await
            .expect("the local cluster answers (scripts/services.sh starts it)");
        assert!(
            target.master_names().len() >= 2,
            "{:?}",
            target.master_names()
        );
        let prefix = format!("ecst:bench-target-test:{}:", std::process::id());
        let keys: Vec<String> = (0..300).map(|i| format!("{prefix}{i}")).collect();
        let set = |key: &String| {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key).arg(key);
            (key.clone(), cmd)
        };
        target.exec(keys.iter().map(set)).await.expect("SET");
        let got: Vec<String> = target
            .query(keys.iter().map(|key| {
                let mut cmd = redis::cmd("GET");
                cmd.arg(key);
                (key.clone(), cmd)
            }))
            .await
            .expect("GET");
        assert_eq!(got, keys);
        assert_eq!(
            target.cpu_seconds().await.expect("INFO cpu").len(),
            target.master_names().len()
        );
        target
            .unlink_matching(&format!("{prefix}*"))
            .await
            .expect("UNLINK");
        let left: Vec<Option<String>> = target
            .query(keys.iter().map(|key| {
                let mut cmd = redis::cmd("GET");
                cmd.arg(key);
                (key.clone(), cmd)
            }))
            .await
            .expect("GET");
        assert!(left.iter().all(Option::is_none));
    }

    #[test]
    fn cluster_slots_give_each_slot_its_master() {
        let node = |host: &str, port| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |from, to, host, port| {
            Value::Array(vec![
                Value::Int(from),
                Value::Int(to),
                node(host, port),
                node("replica", 1),
            ])
        };
        let reply = Value::Array(vec![
            range(0, 5460, "", 7001),
            range(5461, 10922, "10.0.0.2", 7002),
            range(10923, 16383, "", 7001),
        ]);
        let table = parse_slots(&reply, "seed").unwrap();
        assert_eq!(
            table.masters,
            vec![("seed".to_string(), 7001), ("10.0.0.2".to_string(), 7002)]
        );
        assert_eq!(
            (table.owner[0], table.owner[5461], table.owner[16383]),
            (0, 1, 0)
        );
        let partial = Value::Array(vec![range(0, 100, "", 7001)]);
        assert!(parse_slots(&partial, "seed").is_err());
    }
}

//! `ecst bench --workers M`: M `ecst run --drain` processes of one consumer group, as a
//! deployment runs them, and the moment they have drained every partition.
//!
//! Drained is read from Redis (every partition's group has read all its entries and has none
//! pending), not from the workers, so it means the same however the workers divide the work.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use redis::Value;
use tokio::process::{Child, Command};

use super::bench_target::Target;

/// How often the partitions' groups are polled while the workers drain.
const POLL: Duration = Duration::from_millis(20);

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, fixed at 100 by the Linux ABI).
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system) of this process, and of its children that have exited and been
/// waited for, from `/proc/self/stat`; `None` where that cannot be read (not Linux).
pub(crate) fn cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last `)`.
    let fields: Vec<f64> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    match fields.as_slice() {
        [utime, stime, cutime, cstime] => {
            Some(((utime + stime) / USER_HZ, (cutime + cstime) / USER_HZ))
        }
        _ => None,
    }
}

/// Running worker processes and their log files.
pub(crate) struct Workers {
    children: Vec<(Child, PathBuf)>,
}

/// The last lines of a worker's log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Workers {
    /// Starts `count` `ecst run <pipeline> --drain` processes (consumers `bench-0`...) with
    /// `env`, each logging into `dir/worker-<i>.log`.
    pub(crate) fn spawn(
        pipeline: &Path,
        env: &[(&str, String)],
        count: u32,
        dir: &Path,
    ) -> anyhow::Result<Workers> {
        let exe = std::env::current_exe().context("cannot find the ecst binary to run workers")?;
        let mut children = Vec::new();
        for i in 0..count {
            let log = dir.join(format!("worker-{i}.log"));
            let file = std::fs::File::create(&log)
                .with_context(|| format!("cannot create {}", log.display()))?;
            let child = Command::new(&exe)
                .arg("run")
                .arg(pipeline)
                .args(["--drain", "--metrics-addr", "off", "--consumer"])
                .arg(format!("bench-{i}"))
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(file)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {}", exe.display()))?;
            children.push((child, log));
        }
        Ok(Workers { children })
    }

    /// Waits until every partition's `group` has read its expected entries with none pending;
    /// fails if every worker exited first or `limit` passes.
    pub(crate) async fn wait_drained(
        &mut self,
        target: &Target,
        group: &str,
        partitions: &[(String, u64)],
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if drained(target, group, partitions).await? {
                return Ok(());
            }
            let mut running = 0;
            for (child, log) in &mut self.children {
                match child.try_wait().context("cannot check a worker")? {
                    None => running += 1,
                    Some(status) if !status.success() => {
                        bail!("a worker exited with {status}:\n{}", log_tail(log))
                    }
                    Some(_) => {}
                }
            }
            if running == 0 {
                bail!(
                    "every worker exited before the partitions were drained; last worker log:\n{}",
                    self.children
                        .last()
                        .map(|(_, log)| log_tail(log))
                        .unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("the workers did not drain the stream within {limit:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The highest peak RSS of the running workers (`VmHWM`), if any can be read.
    pub(crate) fn peak_rss_mb(&self) -> Option<f64> {
        self.children
            .iter()
            .filter_map(|(child, _)| {
                let status =
                    std::fs::read_to_string(format!("/proc/{}/status", child.id()?)).ok()?;
                let kb: f64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?;
                Some(kb / 1024.0)
            })
            .reduce(f64::max)
    }

    /// Waits for every worker to exit by itself (they run with `--drain`); kills those still
    /// running after `limit`.
    pub(crate) async fn finish(mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        for (child, log) in &mut self.children {
            match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(status) => {
                    let status = status.context("cannot wait for a worker")?;
                    if !status.success() {
                        bail!("a worker exited with {status}:\n{}", log_tail(log));
                    }
                }
                Err(_) => {
                    let _ = child.kill().await;
                    bail!(
                        "a worker did not exit within {limit:?} of the stream being drained:\n{}",
                        log_tail(log)
                    );
                }
            }
        }
        Ok(())
    }
}

/// Whether `group` has read `expected` entries of every partition key and has none pending.
async fn drained(
    target: &Target,
    group: &str,
    partitions: &[(String, u64)],
) -> anyhow::Result<bool> {
    for (key, expected) in partitions {
        let reply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(key)
            .query_async::<Vec<Value>>(&mut target.conn_for(key))
            .await;
        // Until a worker creates the group (with MKSTREAM, so the key exists anyway), there is
        // nothing to read yet.
        let Ok(groups) = reply else {
            return Ok(false);
        };
        let Some(info) = groups.into_iter().find_map(|g| {
            let fields: std::collections::HashMap<String, Value> =
                redis::from_redis_value(g).ok()?;
            let name: String = redis::from_redis_value(fields.get("name")?.clone()).ok()?;
            (name == group).then_some(fields)
        }) else {
            return Ok(false);
        };
        let number = |field: &str| -> u64 {
            info.get(field)
                .and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok())
                .unwrap_or(0)
        };
        if number("entries-read") < *expected || number("pending") > 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

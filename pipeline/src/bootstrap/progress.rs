//! A bootstrap's recorded progress (so an interrupted one resumes) and its report to a person:
//! a bar on a terminal, a log line every few seconds otherwise.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use super::lease::Keys;

/// The recorded progress of a bootstrap.
#[derive(Debug, Default, Clone)]
pub(crate) struct Progress {
    pub(crate) running: bool,
    pub(crate) position: String,
    pub(crate) after: Option<String>,
    pub(crate) rows: u64,
    pub(crate) sweep: bool,
    /// Per stream key, space-separated like `position`; empty where Redis did not say.
    pub(crate) entries_added: String,
}

impl Progress {
    /// The noted position and entries-added count of each of `streams` stream keys; `None`
    /// when the record does not hold one position per key (the partition count changed, or
    /// the record was damaged).
    pub(crate) fn positions(&self, streams: usize) -> Option<Vec<(String, Option<u64>)>> {
        let positions: Vec<&str> = self.position.split(' ').collect();
        if positions.len() != streams || positions.iter().any(|p| p.is_empty()) {
            return None;
        }
        let mut added = self.entries_added.split(' ');
        Some(
            positions
                .into_iter()
                .map(|position| {
                    let added = added.next().and_then(|n| n.parse().ok());
                    (position.to_string(), added)
                })
                .collect(),
        )
    }
}

pub(crate) async fn read_progress(
    conn: &mut ecst_operators::redis_pool::RedisConn,
    keys: &Keys,
) -> Result<Progress, redis::RedisError> {
    let map: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&keys.progress)
        .query_async(conn)
        .await?;
    Ok(Progress {
        running: map.get("state").map(String::as_str) == Some("running"),
        position: map.get("position").cloned().unwrap_or_default(),
        after: map.get("after").cloned().filter(|a| !a.is_empty()),
        rows: map.get("rows").and_then(|r| r.parse().ok()).unwrap_or(0),
        sweep: map.get("sweep").map(String::as_str) == Some("1"),
        entries_added: map.get("entries_added").cloned().unwrap_or_default(),
    })
}

/// Rows/s, rows done and an ETA, on a terminal as one rewritten line, otherwise as log lines.
pub(crate) struct ProgressReport {
    started: Instant,
    last: Instant,
    total: Option<u64>,
    terminal: bool,
    pipeline: String,
}

impl ProgressReport {
    pub(crate) fn new(pipeline: &str, total: Option<u64>) -> Self {
        ProgressReport {
            started: Instant::now(),
            last: Instant::now(),
            total,
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            pipeline: pipeline.to_string(),
        }
    }

    pub(crate) fn update(&mut self, done_here: u64, done_total: u64, finished: bool) {
        let every = if self.terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if !finished && self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done_here as f64 / secs;
        let eta = self
            .total
            .filter(|_| rate > 0.0)
            .map(|t| t.saturating_sub(done_total) as f64 / rate);
        if self.terminal {
            let bar = self.total.filter(|t| *t > 0).map_or(String::new(), |t| {
                let filled = ((done_total as f64 / t as f64).min(1.0) * 30.0) as usize;
                format!("[{}{}] ", "#".repeat(filled), " ".repeat(30 - filled))
            });
            let eta = eta.map_or(String::new(), |e| format!(", ETA {e:.0}s"));
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\rbootstrap {bar}{done_total}{} rows, {rate:.0} rows/s{eta}   ",
                self.total.map_or(String::new(), |t| format!("/{t}"))
            );
            if finished {
                let _ = writeln!(err);
            }
        } else {
            tracing::info!(pipeline = %self.pipeline, rows = done_total, total = ?self.total, rows_per_sec = rate.round(), eta_seconds = ?eta.map(f64::round), "Bootstrap progress.");
        }
    }
}

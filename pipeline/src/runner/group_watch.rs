//! The consumer group's lag, pending count and oldest pending entry (of the whole stream, or of
//! one partition), refreshed for the metrics.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::commit::Shared;
use crate::redis_reply::{as_map, bulk};
use crate::stats::{GROUP_REFRESH, now_ms};

/// Reads the group's lag, pending count and oldest pending idle time into `stats.group`,
/// every [`GROUP_REFRESH`].
pub(super) async fn watch_group(shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(GROUP_REFRESH);
    loop {
        ticker.tick().await;
        let Ok(mut conn) = shared.pool.get().await else {
            continue;
        };
        let mut pipe = redis::pipe();
        pipe.cmd("XINFO").arg("GROUPS").arg(&shared.stream);
        pipe.cmd("XPENDING")
            .arg(&shared.stream)
            .arg(&shared.group)
            .arg("-")
            .arg("+")
            .arg(1);
        conn.begin();
        let result = tokio::time::timeout(
            shared.timeout,
            pipe.query_async::<(redis::Value, redis::Value)>(conn.conn()),
        )
        .await
        .unwrap_or_else(|_| Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))));
        conn.settle(&result);
        let Ok((groups, oldest)) = result else {
            continue;
        };
        let groups = match groups {
            redis::Value::Array(items) => items.into_iter().map(as_map).collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        let Some(g) = groups
            .iter()
            .find(|g| bulk(g.get("name")).as_deref() == Some(shared.group.as_str()))
        else {
            continue;
        };
        let number = |key: &str| bulk(g.get(key)).and_then(|n| n.parse::<i64>().ok());
        let partition = shared.partition.map(|p| shared.stats.partition(p));
        let stats = partition.as_ref().map_or(&shared.stats.group, |p| &p.group);
        stats
            .lag
            .store(number("lag").unwrap_or(-1), Ordering::Relaxed);
        stats
            .pending
            .store(number("pending").unwrap_or(0), Ordering::Relaxed);
        let idle = match oldest {
            redis::Value::Array(entries) => match entries.first() {
                Some(redis::Value::Array(fields)) => {
                    bulk(fields.get(2)).and_then(|n| n.parse::<i64>().ok())
                }
                _ => None,
            },
            _ => None,
        };
        stats
            .oldest_pending_idle_ms
            .store(idle.unwrap_or(0), Ordering::Relaxed);
        stats.refreshed_ms.store(now_ms(), Ordering::Relaxed);
    }
}

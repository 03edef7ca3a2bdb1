//! Where a group stands against the stream's retention: whether it missed trimmed or deleted
//! entries (a retention gap), and placing it at a noted position.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use redis::Value as RedisValue;

use super::pooled;
use crate::commit::Shared;
use crate::redis_reply::{as_map, bulk, parse_id};

/// Where the group stands against the stream's retention.
#[derive(Debug, Default)]
pub struct GroupState {
    /// Whether the group exists.
    pub exists: bool,
    /// Why entries were missed, when they were.
    pub gap: Option<String>,
}

/// `XINFO STREAM` as a map, or `None` when the stream does not exist. Asks `TYPE` first
/// rather than reading the text of XINFO's error (which has no code of its own).
pub async fn stream_info(
    conn: &mut ecst_operators::redis_pool::RedisConn,
    stream: &str,
) -> Result<Option<HashMap<String, RedisValue>>, redis::RedisError> {
    let kind: String = redis::cmd("TYPE").arg(stream).query_async(conn).await?;
    if kind == "none" {
        return Ok(None);
    }
    let info: RedisValue = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query_async(conn)
        .await?;
    Ok(Some(as_map(info)))
}

/// Reads the group's position against the stream's trimming (XINFO STREAM / GROUPS).
pub async fn group_state(
    conn: &mut ecst_operators::redis_pool::RedisConn,
    stream: &str,
    group: &str,
) -> Result<GroupState, redis::RedisError> {
    let Some(info) = stream_info(conn, stream).await? else {
        // No stream: no group either, and nothing missed.
        return Ok(GroupState::default());
    };
    let groups: RedisValue = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await?;
    let groups: Vec<HashMap<String, RedisValue>> = match groups {
        RedisValue::Array(items) => items.into_iter().map(as_map).collect(),
        _ => Vec::new(),
    };
    let Some(g) = groups
        .iter()
        .find(|g| bulk(g.get("name")).as_deref() == Some(group))
    else {
        return Ok(GroupState::default());
    };
    let last_delivered = bulk(g.get("last-delivered-id")).unwrap_or_else(|| "0-0".into());
    let delivered = parse_id(&last_delivered);
    let count = |key: &str| bulk(info.get(key)).and_then(|n| n.parse::<u64>().ok());
    let length = count("length").unwrap_or(0);
    let added = count("entries-added");
    let entries_read = bulk(g.get("entries-read")).and_then(|n| n.parse::<u64>().ok());
    let first = match info.get("first-entry") {
        Some(RedisValue::Array(entry)) => bulk(entry.first()),
        _ => None,
    };
    let last_generated = bulk(info.get("last-generated-id")).unwrap_or_else(|| "0-0".into());
    // XDEL (and, on later Redis versions, trimming) records the highest id it removed.
    let max_deleted = bulk(info.get("max-deleted-entry-id")).unwrap_or_else(|| "0-0".into());
    // Trimming removes from the head: the group can only have missed entries if the oldest
    // entry left is newer than the last it was given (or none is left).
    let head_passed = match &first {
        Some(first) => parse_id(first) > delivered,
        None => parse_id(&last_generated) > delivered,
    };
    let missed = if parse_id(&max_deleted) > delivered {
        Some(format!("entries up to {max_deleted} were deleted"))
    } else if !head_passed {
        None
    } else if first.is_none() {
        Some(format!("every entry up to {last_generated} was trimmed"))
    } else {
        match (added, entries_read) {
            // Entries added after the group's last read, minus those still in the stream.
            (Some(added), Some(read)) if added.saturating_sub(read) > length => Some(format!(
                "{} entries were trimmed before the group read them",
                added - read - length
            )),
            (Some(_), Some(_)) => None,
            _ => {
                tracing::warn!(
                    stream,
                    group,
                    "Cannot tell whether the group missed trimmed entries: Redis does not know how many it has read (entries-read is unset until it reaches the end of the stream)."
                );
                None
            }
        }
    };
    let gap = missed.map(|why| {
        format!(
            "{why} from stream {stream} (first entry now {}), but group {group} had only read up to {last_delivered}",
            first.unwrap_or_else(|| "none".into())
        )
    });
    Ok(GroupState { exists: true, gap })
}

/// The running worker's periodic look for a gap; `Some` when entries were missed.
pub(crate) async fn check_gap(shared: &Shared) -> Option<String> {
    let mut conn = match pooled(shared).await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(pipeline = %shared.pipeline, error = %e, "Cannot check for a retention gap.");
            return None;
        }
    };
    let (stream, group) = (shared.stream.clone(), shared.group.clone());
    match on_redis!(&mut conn, |c| group_state(c, &stream, &group)) {
        Ok(state) => {
            if let Some(gap) = &state.gap {
                shared.stats.retention_gap.store(true, Ordering::Relaxed);
                shared.stats.gaps_detected.fetch_add(1, Ordering::Relaxed);
                tracing::error!(pipeline = %shared.pipeline, stream = %shared.stream, group = %shared.group, gap = %gap, "RETENTION GAP: the group missed entries that are gone from the stream.");
            }
            state.gap
        }
        Err(e) => {
            tracing::warn!(pipeline = %shared.pipeline, error = %e, "Cannot check for a retention gap.");
            None
        }
    }
}

/// The stream's last id (`0` if it does not exist), where the group resumes after the
/// snapshot, and how many entries were ever added up to it (Redis 7).
pub(super) async fn last_generated_id(
    conn: &mut ecst_operators::redis_pool::RedisConn,
    stream: &str,
) -> Result<(String, Option<u64>), redis::RedisError> {
    Ok(match stream_info(conn, stream).await? {
        Some(info) => (
            bulk(info.get("last-generated-id")).unwrap_or_else(|| "0".into()),
            bulk(info.get("entries-added")).and_then(|n| n.parse().ok()),
        ),
        None => ("0".into(), Some(0)),
    })
}

/// Creates the group at `position`, or moves it there, telling Redis how many entries that
/// position has read (`ENTRIESREAD`), so that a later trim past it is seen as a gap.
pub(super) async fn place_group(
    conn: &mut ecst_operators::redis_pool::RedisConn,
    stream: &str,
    group: &str,
    position: &str,
    entries_read: Option<u64>,
) -> Result<(), redis::RedisError> {
    let mut create = redis::cmd("XGROUP");
    create
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(position)
        .arg("MKSTREAM");
    let mut set = redis::cmd("XGROUP");
    set.arg("SETID").arg(stream).arg(group).arg(position);
    if let Some(n) = entries_read {
        create.arg("ENTRIESREAD").arg(n);
        set.arg("ENTRIESREAD").arg(n);
    }
    match create.query_async::<()>(conn).await {
        Err(e) if e.code() == Some("BUSYGROUP") => set.query_async(conn).await,
        other => other,
    }
}

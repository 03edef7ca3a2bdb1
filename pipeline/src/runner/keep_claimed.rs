//! Keeps the entries of batches still being applied claimed by this worker: their idle time
//! is reset without counting a delivery, so that a long sink outage neither lets another
//! worker (or this one's own claim) take them nor pushes them over `max_deliveries`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ecst_operators::redis_pool::describe_run_error;

use crate::commit::Shared;
use crate::redis_reply::StreamId;

/// The ids of the entries of batches read and not yet acked, with when they were read. Keyed
/// by the parsed id with a fast seeded hash: every entry goes in and out once.
pub(super) type InFlightIds = HashMap<StreamId, Instant, foldhash::fast::RandomState>;

/// Ids reset per script call.
const CHUNK: usize = 1000;

/// For each id still pending at this consumer, `XCLAIM ... 0 id JUSTID`: idle time back to 0,
/// delivery count unchanged. An id another consumer holds by now is left to it, and so is one
/// trimmed from the stream (XCLAIM would drop it from the group unreported, and its batch
/// would then not dead-letter it as trimmed).
/// KEYS: stream; ARGV: group, consumer, ids...
const KEEP_CLAIMED: &str = "local kept = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2]
    and #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept";

/// Every `every`, resets the idle time of the entries in `in_flight` (the ids of batches read
/// and not yet acked, with when they were read) that have been in flight that long, until
/// aborted. A healthy worker acks well within `every` and sends nothing.
pub(super) async fn keep_claimed(
    shared: Arc<Shared>,
    in_flight: Arc<Mutex<InFlightIds>>,
    every: Duration,
) {
    let script = redis::Script::new(KEEP_CLAIMED);
    loop {
        tokio::time::sleep(every).await;
        let ids: Vec<String> = match in_flight.lock() {
            Ok(ids) => ids
                .iter()
                .filter(|(_, read)| read.elapsed() >= every)
                .map(|((ms, seq), _)| format!("{ms}-{seq}"))
                .collect(),
            Err(_) => return,
        };
        for chunk in ids.chunks(CHUNK) {
            let mut conn = match shared.pool.get().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(pipeline = %shared.pipeline, error = %describe_run_error(e), "Cannot keep in-flight entries claimed; another worker may claim them after claim_idle.");
                    break;
                }
            };
            let mut invocation = script.key(&shared.stream);
            invocation
                .arg(&shared.group)
                .arg(&shared.consumer)
                .arg(chunk);
            conn.begin();
            let result =
                tokio::time::timeout(shared.timeout, invocation.invoke_async::<i64>(conn.conn()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out")))
                    });
            conn.settle(&result);
            if let Err(e) = result {
                tracing::warn!(pipeline = %shared.pipeline, error = %e, "Cannot keep in-flight entries claimed; another worker may claim them after claim_idle.");
                break;
            }
        }
    }
}

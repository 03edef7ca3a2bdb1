//! The bootstrap lease: one worker of a group bootstraps while the others wait, renewed in the
//! background and given up on expiry, so a dead worker's bootstrap is taken over.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::pooled;
use crate::commit::Shared;

/// The Redis keys of one group's bootstrap: the lease and the progress hash.
pub(crate) struct Keys {
    pub(crate) lease: String,
    pub(crate) progress: String,
}

impl Keys {
    pub(crate) fn new(stream: &str, group: &str) -> Self {
        let lease = format!("ecst:bootstrap:{stream}:{group}");
        Keys {
            progress: format!("{lease}:progress"),
            lease,
        }
    }
}

/// Takes the lease if free (or already ours); `Err(holder)` if another worker has it.
pub(crate) async fn take_lease(
    conn: &mut ecst_operators::redis_pool::RedisConn,
    keys: &Keys,
    me: &str,
    ttl: Duration,
) -> Result<Result<(), String>, redis::RedisError> {
    let script = redis::Script::new(
        r"local holder = redis.call('GET', KEYS[1])
          if holder == false or holder == ARGV[1] then
            redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
            return ''
          end
          return holder",
    );
    let holder: String = script
        .key(&keys.lease)
        .arg(me)
        .arg(ttl.as_millis() as u64)
        .invoke_async(conn)
        .await?;
    Ok(if holder.is_empty() {
        Ok(())
    } else {
        Err(holder)
    })
}

pub(crate) async fn release_lease(
    conn: &mut ecst_operators::redis_pool::RedisConn,
    keys: &Keys,
    me: &str,
) -> Result<(), redis::RedisError> {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
          return 0",
    )
    .key(&keys.lease)
    .arg(me)
    .invoke_async::<i64>(conn)
    .await
    .map(|_| ())
}

/// Renews a bootstrap lease in the background for as long as it lives.
pub(super) struct LeaseKeeper {
    lost: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    pub(super) fn start(shared: Arc<Shared>, keys: &Keys, me: &str, ttl: Duration) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        let (lease, me) = (keys.lease.clone(), me.to_string());
        let task = tokio::spawn(async move {
            let keys = Keys {
                lease,
                progress: String::new(),
            };
            loop {
                tokio::time::sleep(ttl / 3).await;
                let Ok(mut conn) = pooled(&shared).await else {
                    continue;
                };
                match on_redis!(&mut conn, |c| take_lease(c, &keys, &me, ttl)) {
                    Ok(Err(_holder)) => {
                        flag.store(true, Ordering::Relaxed);
                        return;
                    }
                    Ok(Ok(())) => {}
                    Err(e) => {
                        tracing::warn!(pipeline = %shared.pipeline, error = %e, "Cannot renew the bootstrap lease.")
                    }
                }
            }
        });
        LeaseKeeper { lost, task }
    }

    pub(super) fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

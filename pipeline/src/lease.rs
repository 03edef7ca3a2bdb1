//! Partition leases: which worker of a group reads which partition of a partitioned stream.
//!
//! Every worker of a group heartbeats into a membership set; each computes its fair share of
//! the partitions from the live members (as even as the counts allow), takes free or expired
//! partition leases up to that share and gives back the ones above it. A lease carries a
//! fencing generation that grows on every change of owner: a worker whose renewal finds another
//! owner or generation has lost the partition and stops reading it at once.
//!
//! Each command touches one key (so this works on a Redis Cluster), and expiry is judged by
//! the Redis server's clock (`TIME`), never by the workers'.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{RedisError, Script};

/// Heartbeat: drop expired members, (re)register or remove this one, list the live ones.
/// KEYS: members; ARGV: member, lease ms, `1` to join / `0` to leave.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return redis.call('ZRANGE', KEYS[1], 0, -1)";

/// Takes a partition if it is free, expired or already ours. KEYS: lease; ARGV: owner, lease ms.
/// Returns `{1, previous owner, generation}` or `{0, owner, generation}`.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_ms') or '0')
local generation = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
if owner ~= '' and owner ~= ARGV[1] and expires > now then
  return {0, owner, generation}
end
if owner ~= ARGV[1] then
  generation = redis.call('HINCRBY', KEYS[1], 'generation', 1)
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'expires_ms', now + tonumber(ARGV[2]))
return {1, owner, generation}";

/// Extends our lease if it is still ours at our generation. KEYS: lease; ARGV: owner,
/// generation, lease ms. Returns 1, or 0 when fenced off.
const RENEW: &str = r"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1]
  or redis.call('HGET', KEYS[1], 'generation') ~= ARGV[2] then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'expires_ms', now + tonumber(ARGV[3]))
return 1";

/// Gives the partition back (keeping the generation). KEYS: lease; ARGV: owner, generation.
const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1]
  and redis.call('HGET', KEYS[1], 'generation') == ARGV[2] then
  redis.call('HSET', KEYS[1], 'owner', '', 'expires_ms', 0)
  return 1
end
return 0";

/// The keys of one group's partition leases on one stream.
#[derive(Debug, Clone)]
pub(crate) struct PartitionLeases {
    members: String,
    lease_prefix: String,
    me: String,
    lease: Duration,
}

/// A partition this worker took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Taken {
    /// The fencing generation of this ownership.
    pub(crate) generation: u64,
    /// Who had it before (empty: nobody, or it was released).
    pub(crate) previous: String,
}

impl PartitionLeases {
    /// The leases of `group` on `stream`, held as `me` for `lease` at a time.
    pub(crate) fn new(stream: &str, group: &str, me: &str, lease: Duration) -> Self {
        PartitionLeases {
            members: members_key(stream, group),
            lease_prefix: partition_lease_key(stream, group, ""),
            me: me.to_string(),
            lease,
        }
    }

    /// The name this worker holds leases and membership under.
    pub(crate) fn owner(&self) -> &str {
        &self.me
    }

    /// The key of partition `p`'s lease.
    pub(crate) fn lease_key(&self, partition: u32) -> String {
        format!("{}{partition}", self.lease_prefix)
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX)
    }

    /// Renews this worker's membership; returns the live members, sorted.
    pub(crate) async fn heartbeat(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> Result<Vec<String>, RedisError> {
        let mut members: Vec<String> = Script::new(HEARTBEAT)
            .key(&self.members)
            .arg(&self.me)
            .arg(self.lease_ms())
            .arg("1")
            .invoke_async(conn)
            .await?;
        members.sort();
        Ok(members)
    }

    /// Leaves the group's membership (a clean shutdown), so the others rebalance at once.
    pub(crate) async fn leave(&self, conn: &mut impl ConnectionLike) -> Result<(), RedisError> {
        Script::new(HEARTBEAT)
            .key(&self.members)
            .arg(&self.me)
            .arg(self.lease_ms())
            .arg("0")
            .invoke_async::<Vec<String>>(conn)
            .await
            .map(drop)
    }

    /// Takes partition `p` if free or expired: `Ok(Some)` when taken, `Ok(None)` when another
    /// live worker holds it.
    pub(crate) async fn acquire(
        &self,
        conn: &mut impl ConnectionLike,
        partition: u32,
    ) -> Result<Option<Taken>, RedisError> {
        let (taken, previous, generation): (i64, String, u64) = Script::new(ACQUIRE)
            .key(self.lease_key(partition))
            .arg(&self.me)
            .arg(self.lease_ms())
            .invoke_async(conn)
            .await?;
        Ok((taken == 1).then_some(Taken {
            generation,
            previous,
        }))
    }

    /// Extends the lease of `p` held at `generation`; `false` when another worker took it.
    pub(crate) async fn renew(
        &self,
        conn: &mut impl ConnectionLike,
        partition: u32,
        generation: u64,
    ) -> Result<bool, RedisError> {
        let renewed: i64 = Script::new(RENEW)
            .key(self.lease_key(partition))
            .arg(&self.me)
            .arg(generation)
            .arg(self.lease_ms())
            .invoke_async(conn)
            .await?;
        Ok(renewed == 1)
    }

    /// Gives `p` back, if still ours at `generation`.
    pub(crate) async fn release(
        &self,
        conn: &mut impl ConnectionLike,
        partition: u32,
        generation: u64,
    ) -> Result<(), RedisError> {
        Script::new(RELEASE)
            .key(self.lease_key(partition))
            .arg(&self.me)
            .arg(generation)
            .invoke_async::<i64>(conn)
            .await
            .map(drop)
    }
}

/// The hash holding the lease of partition `partition` of `group` on `stream`: fields `owner`
/// (empty when free), `generation` and `expires_ms` (Redis server time).
pub fn partition_lease_key(stream: &str, group: &str, partition: impl std::fmt::Display) -> String {
    format!("ecst:lease:{stream}:{group}:{partition}")
}

/// The sorted set of the live workers of `group` on `stream`, scored by expiry.
pub fn members_key(stream: &str, group: &str) -> String {
    format!("ecst:members:{stream}:{group}")
}

/// How many of `partitions` the member at `index` of `members` live members should hold: an
/// even split, the first `partitions % members` members taking one more.
pub(crate) fn fair_share(partitions: u32, members: usize, index: usize) -> u32 {
    let members = u32::try_from(members.max(1)).unwrap_or(u32::MAX);
    let index = u32::try_from(index).unwrap_or(u32::MAX);
    partitions / members + u32::from(index < partitions % members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_even_and_add_up() {
        for partitions in 1..=17 {
            for members in 1..=6 {
                let shares: Vec<u32> = (0..members)
                    .map(|i| fair_share(partitions, members, i))
                    .collect();
                assert_eq!(shares.iter().sum::<u32>(), partitions);
                let (min, max) = (shares.iter().min(), shares.iter().max());
                assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{shares:?}");
            }
        }
    }

    async fn conn() -> redis::aio::MultiplexedConnection {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    fn unique(name: &str) -> String {
        format!("lease-test-{name}-{}", uuid::Uuid::new_v4())
    }

    #[tokio::test]
    async fn a_held_lease_is_refused_then_taken_over_with_a_new_generation_once_expired() {
        let mut conn = conn().await;
        let stream = unique("takeover");
        let short = Duration::from_millis(300);
        let a = PartitionLeases::new(&stream, "g", "worker-a", short);
        let b = PartitionLeases::new(&stream, "g", "worker-b", short);
        let first = a.acquire(&mut conn, 3).await.unwrap().expect("free");
        assert_eq!(first.previous, "");
        assert_eq!(b.acquire(&mut conn, 3).await.unwrap(), None);
        // Expiry is judged by Redis's clock: poll until b gets it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let second = loop {
            if let Some(taken) = b.acquire(&mut conn, 3).await.unwrap() {
                break taken;
            }
            assert!(std::time::Instant::now() < deadline, "never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(second.previous, "worker-a");
        assert_eq!(second.generation, first.generation + 1);
        // a is fenced: its renewal and its release change nothing.
        assert!(!a.renew(&mut conn, 3, first.generation).await.unwrap());
        a.release(&mut conn, 3, first.generation).await.unwrap();
        assert!(b.renew(&mut conn, 3, second.generation).await.unwrap());
        b.release(&mut conn, 3, second.generation).await.unwrap();
        let third = a.acquire(&mut conn, 3).await.unwrap().expect("released");
        assert_eq!(third.previous, "");
        assert_eq!(third.generation, second.generation + 1);
        let _: () = redis::cmd("DEL")
            .arg(a.lease_key(3))
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn members_expire_and_leave() {
        let mut conn = conn().await;
        let stream = unique("members");
        let a = PartitionLeases::new(&stream, "g", "a", Duration::from_secs(30));
        let b = PartitionLeases::new(&stream, "g", "b", Duration::from_millis(200));
        b.heartbeat(&mut conn).await.unwrap();
        assert_eq!(a.heartbeat(&mut conn).await.unwrap(), vec!["a", "b"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while a.heartbeat(&mut conn).await.unwrap() != vec!["a"] {
            assert!(std::time::Instant::now() < deadline, "b never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a.leave(&mut conn).await.unwrap();
        assert_eq!(b.heartbeat(&mut conn).await.unwrap(), vec!["b"]);
        let _: () = redis::cmd("DEL")
            .arg(members_key(&stream, "g"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

//! A stream reader's direct connection on a Redis Cluster: to the master serving its stream's
//! slot, found from the seeds' `CLUSTER SLOTS` (the command the redis crate's cluster client
//! sends, so no ACL needs more), following `MOVED` to the new owner and `ASK` (with `ASKING`)
//! during a slot migration, as the redis crate does for the commands it routes.

use std::time::Duration;

use redis::{Cmd, RedisError};

use super::cluster::{key_slot, slot_ranges};
use super::direct::{DirectConn, DirectTarget};

/// A direct connection to the cluster node that serves one key.
pub struct ClusterReader {
    /// The connection to the node serving the key.
    conn: DirectConn,
    /// That node.
    node: DirectTarget,
    /// The importing node's connection while a migration answers `ASK`, by its address.
    asking: Option<(String, DirectConn)>,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl ClusterReader {
    /// Connects to the master serving `key`, asking the seeds in turn where that is, all within
    /// one connect and one response timeout; the last failure when no seed leads to it.
    pub async fn connect(
        seeds: &[DirectTarget],
        key: &str,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self, RedisError> {
        let deadline = connect_timeout + response_timeout;
        let mut failure = None;
        let discovery = async {
            let slot = key_slot(key.as_bytes());
            for seed in seeds {
                let found = async {
                    let node = master_of(seed, slot, connect_timeout, response_timeout).await?;
                    let conn =
                        DirectConn::connect(&node, connect_timeout, response_timeout).await?;
                    Ok::<_, RedisError>((node, conn))
                };
                match found.await {
                    Ok((node, conn)) => {
                        return Ok(ClusterReader {
                            conn,
                            node,
                            asking: None,
                            connect_timeout,
                            response_timeout,
                        });
                    }
                    Err(e) => failure = Some(e),
                }
            }
            Err(failure
                .take()
                .unwrap_or_else(|| cluster_error("the cluster URL names no seed".into())))
        };
        let result = tokio::time::timeout(deadline, discovery).await;
        result.unwrap_or_else(|_| {
            let last = failure.map_or(String::new(), |e| format!(" (last failure: {e})"));
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("finding the master of `{key}` took more than {deadline:?}{last}"),
            )))
        })
    }

    /// Whether a request failed or was abandoned on the node's connection.
    pub fn is_broken(&self) -> bool {
        self.conn.is_broken()
    }

    /// Sends `cmd` to the node serving its key, following one `MOVED` or `ASK`.
    pub async fn request(&mut self, cmd: &Cmd) -> Result<&[u8], RedisError> {
        let error = match self.conn.send(cmd).await {
            Ok(()) => return Ok(self.conn.reply()),
            Err(error) => error,
        };
        let Some((address, _slot)) = error.redirect_node() else {
            return Err(error);
        };
        let address = address.to_owned();
        let target = node_at(&self.node, &address)?;
        if error.code() == Some("MOVED") {
            self.conn = self.open(&target).await?;
            self.node = target;
            self.asking = None;
            self.conn.send(cmd).await?;
            return Ok(self.conn.reply());
        }
        // ASK: this one command goes to the importing node, announced by ASKING; its
        // connection is kept for the next ones until the migration ends.
        let (_, conn) = match self.asking.take() {
            Some((at, conn)) if at == address && !conn.is_broken() => {
                self.asking.insert((at, conn))
            }
            _ => {
                let conn = self.open(&target).await?;
                self.asking.insert((address, conn))
            }
        };
        let sent = async {
            conn.send(&redis::cmd("ASKING")).await?;
            conn.send(cmd).await
        }
        .await;
        if let Err(e) = sent {
            self.asking = None;
            return Err(e);
        }
        // Still there: only a failed send drops it.
        Ok(self
            .asking
            .as_ref()
            .map_or(&[][..], |(_, conn)| conn.reply()))
    }

    async fn open(&self, target: &DirectTarget) -> Result<DirectConn, RedisError> {
        DirectConn::connect(target, self.connect_timeout, self.response_timeout).await
    }
}

/// The master serving `slot`, as `seed` sees the slot map.
async fn master_of(
    seed: &DirectTarget,
    slot: u16,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<DirectTarget, RedisError> {
    let mut conn = DirectConn::connect(seed, connect_timeout, response_timeout).await?;
    let reply = redis::parse_redis_value(conn.request(redis::cmd("CLUSTER").arg("SLOTS")).await?)?;
    let seed_host = seed.host().unwrap_or_default();
    let range = slot_ranges(&reply, seed_host)
        .map_err(cluster_error)?
        .into_iter()
        .find(|range| (range.first..=range.last).contains(&slot))
        .ok_or_else(|| {
            cluster_error(format!(
                "no master with a known address serves slot {slot} (redis-cli cluster info)"
            ))
        })?;
    seed.at(&range.host, range.port)
        .ok_or_else(|| cluster_error("a cluster seed is a Unix socket".into()))
}

/// The target at a redirect's `host:port`.
fn node_at(node: &DirectTarget, address: &str) -> Result<DirectTarget, RedisError> {
    let bad = || cluster_error(format!("a redirect to `{address}`"));
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    let host = if host.is_empty() {
        node.host().unwrap_or_default()
    } else {
        host
    };
    node.at(host, port).ok_or_else(bad)
}

fn cluster_error(detail: String) -> RedisError {
    RedisError::from(std::io::Error::other(format!("Redis Cluster: {detail}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_pool::test_cluster_url;
    use crate::redis_pool::{RedisManager, cluster::ClusterSeeds};

    fn seeds() -> Vec<DirectTarget> {
        ClusterSeeds::parse(test_cluster_url().expose())
            .unwrap()
            .expect("a cluster URL")
            .direct_targets()
            .expect("plain TCP seeds")
    }

    #[tokio::test]
    async fn reads_go_to_the_master_of_the_key_and_follow_a_moved() {
        let timeout = Duration::from_secs(5);
        let key = format!("ecst:test:cluster-reader:{}", std::process::id());
        let manager = RedisManager::new(&test_cluster_url(), timeout).unwrap();
        let mut client = manager.connect_once(timeout).await.unwrap();
        redis::cmd("SET")
            .arg(&key)
            .arg("here")
            .exec_async(&mut client)
            .await
            .unwrap();
        let mut reader = ClusterReader::connect(&seeds(), &key, timeout, timeout)
            .await
            .unwrap();
        let get = redis::cmd("GET").arg(&key).clone();
        assert_eq!(reader.request(&get).await.unwrap(), b"$4\r\nhere\r\n");
        // Pointed at a node that does not serve the key, the reader follows its MOVED.
        let serving = format!("{:?}", reader.node);
        let other = seeds()
            .into_iter()
            .find(|seed| format!("{seed:?}") != serving)
            .expect("another node");
        reader.conn = DirectConn::connect(&other, timeout, timeout).await.unwrap();
        reader.node = other;
        assert_eq!(reader.request(&get).await.unwrap(), b"$4\r\nhere\r\n");
        redis::cmd("DEL")
            .arg(&key)
            .exec_async(&mut client)
            .await
            .unwrap();
    }
}

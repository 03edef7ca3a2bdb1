//! A stream reader's direct connection on a Redis Cluster: to the master serving its stream's
//! slot, found from the seeds (`CLUSTER KEYSLOT`, `CLUSTER SLOTS`), following `MOVED` to the
//! new owner and `ASK` (with `ASKING`) during a slot migration, as the redis crate's cluster
//! connection does for the commands it routes.

use std::time::Duration;

use redis::{Cmd, RedisError, Value};

use super::direct::{DirectConn, DirectTarget};

/// A direct connection to the cluster node that serves one key.
pub struct ClusterReader {
    conn: DirectConn,
    node: DirectTarget,
    /// The importing node's connection while a migration answers `ASK`, by its address.
    asking: Option<(String, DirectConn)>,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl ClusterReader {
    /// Connects to the master serving `key`, asking each seed in turn where that is; the last
    /// seed's failure when none answers.
    pub async fn connect(
        seeds: &[DirectTarget],
        key: &str,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self, RedisError> {
        let mut failure = None;
        for seed in seeds {
            match master_of(seed, key, connect_timeout, response_timeout).await {
                Ok(node) => {
                    return Ok(ClusterReader {
                        conn: DirectConn::connect(&node, connect_timeout, response_timeout).await?,
                        node,
                        asking: None,
                        connect_timeout,
                        response_timeout,
                    });
                }
                Err(e) => failure = Some(e),
            }
        }
        Err(failure.unwrap_or_else(|| cluster_error("the cluster URL names no seed".into())))
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
            Some((at, conn)) if at == address => self.asking.insert((at, conn)),
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

/// The master serving `key`, as `seed` sees the slot map.
async fn master_of(
    seed: &DirectTarget,
    key: &str,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<DirectTarget, RedisError> {
    let mut conn = DirectConn::connect(seed, connect_timeout, response_timeout).await?;
    let slot = match redis::parse_redis_value(
        conn.request(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await?,
    )? {
        Value::Int(slot) => slot,
        other => return Err(cluster_error(format!("CLUSTER KEYSLOT answered {other:?}"))),
    };
    let slots = redis::parse_redis_value(conn.request(redis::cmd("CLUSTER").arg("SLOTS")).await?)?;
    let Value::Array(ranges) = slots else {
        return Err(cluster_error(format!("CLUSTER SLOTS answered {slots:?}")));
    };
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        if !(*first..=*last).contains(&slot) {
            continue;
        }
        let host = match master.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            _ => String::new(),
        };
        let port = match master.get(1) {
            Some(Value::Int(port)) => u16::try_from(*port).ok(),
            _ => None,
        };
        let Some(port) = port else {
            return Err(cluster_error(format!(
                "CLUSTER SLOTS gives no port for slot {slot}"
            )));
        };
        // A node that does not know its own address is reached where it was asked.
        let host = if host.is_empty() || host == "?" {
            seed.host().unwrap_or_default().to_owned()
        } else {
            host
        };
        return seed
            .at(&host, port)
            .ok_or_else(|| cluster_error("a cluster seed is a Unix socket".into()));
    }
    Err(cluster_error(format!(
        "no node serves slot {slot} (key `{key}`): the cluster is not fully covered"
    )))
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

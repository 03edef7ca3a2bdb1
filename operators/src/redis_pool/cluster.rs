//! The cluster URL form, `redis+cluster://[user:pass@]host1:7001,host2:7002[/?options][#insecure]`
//! (`rediss+cluster://` for TLS): the seed nodes from which the client learns the cluster's
//! slots. The user, password, query options and TLS options apply to every node.

use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::{RedisError, TlsCertificates};

use super::client::{RedisUrlError, TlsParts, UrlParts, tls_parts};
use super::direct::DirectTarget;

/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16-CCITT (XMODEM), Redis Cluster's key hash.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &byte| {
        (0..8).fold(crc ^ (u16::from(byte) << 8), |crc, _| {
            if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            }
        })
    })
}

/// The cluster slot of `key`: the hash of its hash tag (what lies between the first `{` and
/// the next `}`, when not empty), else of the whole key.
pub fn key_slot(key: &[u8]) -> u16 {
    let tag = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let len = rest.iter().position(|&b| b == b'}')?;
        (len > 0).then(|| &rest[..len])
    });
    crc16(tag.unwrap_or(key)) % SLOTS
}

/// A range of slots and the master serving it, from `CLUSTER SLOTS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    /// First slot of the range.
    pub first: u16,
    /// Last slot of the range (included).
    pub last: u16,
    /// The master's host, as clients reach it.
    pub host: String,
    /// The master's port.
    pub port: u16,
}

/// The ranges of a `CLUSTER SLOTS` reply from the node reached at `answering_host`, each with
/// its master: an empty or nil host or a wildcard address means the answering node's host (as
/// the redis crate reads it), and a range whose master's address is unknown (`?`) is left out
/// (the redis crate would fall back to a replica, which only answers `MOVED`).
pub fn slot_ranges(reply: &redis::Value, answering_host: &str) -> Result<Vec<SlotRange>, String> {
    use redis::Value;
    let Value::Array(ranges) = reply else {
        return Err(format!("CLUSTER SLOTS answered {reply:?}"));
    };
    let mut read = Vec::with_capacity(ranges.len());
    for range in ranges {
        let unexpected = || format!("CLUSTER SLOTS: an unexpected range {range:?}");
        let Value::Array(fields) = range else {
            return Err(unexpected());
        };
        let [
            Value::Int(first),
            Value::Int(last),
            Value::Array(master),
            ..,
        ] = fields.as_slice()
        else {
            return Err(unexpected());
        };
        let [host, Value::Int(port), ..] = master.as_slice() else {
            return Err(format!(
                "CLUSTER SLOTS: a range without its master: {range:?}"
            ));
        };
        let host = match host {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            _ => String::new(),
        };
        let host = match host.as_str() {
            "?" => continue,
            "" | "0.0.0.0" | "::" => answering_host.to_owned(),
            _ => host,
        };
        let slot = |n: &i64| u16::try_from(*n).ok().filter(|n| *n < SLOTS);
        let (Some(first), Some(last), Ok(port)) = (slot(first), slot(last), u16::try_from(*port))
        else {
            return Err(unexpected());
        };
        read.push(SlotRange {
            first,
            last,
            host,
            port,
        });
    }
    Ok(read)
}

/// The cluster schemes and the node scheme each stands for.
const SCHEMES: [(&str, &str); 2] = [("redis+cluster", "redis"), ("rediss+cluster", "rediss")];

/// The node scheme a cluster scheme stands for; `None` for any other scheme.
fn node_scheme(scheme: &str) -> Option<&'static str> {
    SCHEMES
        .iter()
        .find(|(cluster, _)| scheme.eq_ignore_ascii_case(cluster))
        .map(|(_, node)| *node)
}

/// Whether `url` has a cluster scheme.
pub(super) fn is_cluster_scheme(url: &str) -> bool {
    UrlParts::split(url).is_some_and(|parts| node_scheme(parts.scheme).is_some())
}

/// The seed nodes of a cluster URL as single-node URLs, each with the credentials and options
/// they share; `None` when `url` is not a cluster URL.
pub(super) fn seed_urls(url: &str) -> Result<Option<Vec<String>>, RedisUrlError> {
    let Some(parts) = UrlParts::split(url) else {
        return Ok(None);
    };
    let Some(scheme) = node_scheme(parts.scheme) else {
        return Ok(None);
    };
    let userinfo = match parts.userinfo {
        "" => String::new(),
        userinfo => format!("{userinfo}@"),
    };
    parts
        .hosts
        .split(',')
        .map(|host| match host.trim() {
            "" => Err(RedisUrlError::EmptySeed),
            host => Ok(format!("{scheme}://{userinfo}{host}{}", parts.rest)),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The seed nodes of a cluster URL, each a single-node URL with the options they share.
#[derive(Clone)]
pub(super) struct ClusterSeeds {
    nodes: Vec<String>,
    certificates: Option<TlsCertificates>,
}

impl ClusterSeeds {
    /// The seeds of `url`, or `None` when it is not a cluster URL.
    pub(super) fn parse(url: &str) -> Result<Option<ClusterSeeds>, RedisUrlError> {
        let Some(seeds) = seed_urls(url)? else {
            return Ok(None);
        };
        let mut nodes = Vec::new();
        let mut certificates = None;
        for node in seeds {
            // Every node has the same options, so the files read for the last one serve all.
            let TlsParts {
                url,
                certificates: read,
            } = tls_parts(&node)?;
            nodes.push(url);
            certificates = read;
        }
        Ok(Some(ClusterSeeds {
            nodes,
            certificates,
        }))
    }

    /// The seeds as targets of direct connections; `None` where one is a URL only the redis
    /// crate reads.
    pub(super) fn direct_targets(&self) -> Option<Vec<DirectTarget>> {
        self.nodes
            .iter()
            .map(|node| DirectTarget::from_parts(node, self.certificates.as_ref()))
            .collect()
    }

    /// A client whose every attempt on a node has `response_timeout`. A whole request gets
    /// twice that, so that a slow first attempt still leaves a full timeout for the MOVED/ASK
    /// redirect or the slot refresh that follows it.
    pub(super) fn client(
        &self,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<ClusterClient, RedisError> {
        let mut builder = ClusterClient::builder(self.nodes.iter().map(String::as_str))
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            .overall_response_timeout(Some(response_timeout.saturating_mul(2)));
        if let Some(certificates) = &self.certificates {
            builder = builder.certs(certificates.clone());
        }
        builder.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // From the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag does not count: the whole key is hashed.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        // A partition key hashes by its own tag, so partitions spread over slots.
        assert_eq!(key_slot(b"orders:{orders:3}"), key_slot(b"orders:3"));
    }
    use crate::redis_pool::{redis_client, redis_user, test_cluster_url as cluster_url};
    use crate::secret::SecretUrl;

    fn seeds(url: &str) -> Vec<String> {
        match ClusterSeeds::parse(url) {
            Ok(Some(seeds)) => seeds.nodes,
            Ok(None) => vec!["not a cluster URL".to_string()],
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn slot_ranges_read_hosts_as_the_redis_crate_does() {
        use redis::Value;
        let range = |first: i64, last: i64, host: Value| {
            Value::Array(vec![
                Value::Int(first),
                Value::Int(last),
                Value::Array(vec![host, Value::Int(7001)]),
            ])
        };
        let bulk = |host: &str| Value::BulkString(host.as_bytes().to_vec());
        let reply = Value::Array(vec![
            range(0, 99, bulk("10.0.0.2")),
            range(100, 199, bulk("")),
            range(200, 299, Value::Nil),
            range(300, 399, bulk("0.0.0.0")),
            range(400, 499, bulk("::")),
            range(500, 599, bulk("?")),
        ]);
        let hosts: Vec<(u16, String)> = slot_ranges(&reply, "seed")
            .unwrap()
            .into_iter()
            .map(|r| (r.first, r.host))
            .collect();
        let expected = [
            (0, "10.0.0.2"),
            (100, "seed"),
            (200, "seed"),
            (300, "seed"),
            (400, "seed"),
        ];
        assert_eq!(
            hosts,
            expected
                .map(|(slot, host)| (slot, host.to_string()))
                .to_vec()
        );
        assert!(slot_ranges(&Value::Array(vec![range(0, 16384, bulk("a"))]), "seed").is_err());
        assert!(slot_ranges(&Value::Int(1), "seed").is_err());
    }

    #[test]
    fn a_cluster_url_lists_its_seed_nodes() {
        assert_eq!(
            seeds("redis+cluster://127.0.0.1:7001,127.0.0.1:7002,[::1]:7003"),
            [
                "redis://127.0.0.1:7001",
                "redis://127.0.0.1:7002",
                "redis://[::1]:7003"
            ]
        );
        assert_eq!(seeds("redis://127.0.0.1:7001"), ["not a cluster URL"]);
        assert_eq!(
            seeds("redis+cluster://127.0.0.1:7001,,127.0.0.1:7002"),
            [
                "a cluster URL lists its seed nodes as host:port separated by commas, without empty entries"
            ]
        );
    }

    #[test]
    fn the_user_password_and_options_apply_to_every_seed() {
        assert_eq!(
            seeds("redis+cluster://app:s3cret@a:7001,b:7002/?protocol=resp3"),
            [
                "redis://app:s3cret@a:7001/?protocol=resp3",
                "redis://app:s3cret@b:7002/?protocol=resp3"
            ]
        );
        let url = SecretUrl::new("redis+cluster://app:s3cret@a:7001,b:7002");
        assert_eq!(redis_user(&url), "app");
        assert_eq!(url.redacted(), "redis+cluster://app:***@a:7001,b:7002");
        assert_eq!(
            SecretUrl::new("rediss+cluster://:s3cret@a:7001,b:7002/#insecure").redacted(),
            "rediss+cluster://:***@a:7001,b:7002/#insecure"
        );
        let client = ClusterSeeds::parse(url.expose())
            .unwrap()
            .unwrap()
            .client(Duration::from_secs(1), Duration::from_secs(1));
        assert!(client.is_ok());
    }

    #[test]
    fn tls_options_are_read_once_for_all_seeds() {
        assert_eq!(
            seeds("rediss+cluster://a:7001,b:7002/#insecure"),
            ["rediss://a:7001/#insecure", "rediss://b:7002/#insecure"]
        );
        assert_eq!(
            seeds("redis+cluster://a:7001,b:7002/?tls_ca=/etc/ca.pem"),
            ["`tls_ca` needs a rediss:// URL (TLS)"]
        );
        assert!(
            seeds("rediss+cluster://a:7001,b:7002/?tls_ca=/nonexistent/ca.pem")[0]
                .starts_with("tls_ca=/nonexistent/ca.pem: ")
        );
        let Ok(Some(seeds)) = ClusterSeeds::parse("rediss+cluster://a:7001,b:7002/#insecure")
        else {
            panic!("not parsed");
        };
        assert!(seeds.certificates.is_none());
    }

    #[test]
    fn a_host_list_without_cluster_says_how_to_write_it() {
        let error = |url: &str| match redis_client(&SecretUrl::new(url)) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        assert_eq!(
            error("redis://app:s3cret@a:7001,b:7002"),
            "a redis:// URL names one server; for a Redis Cluster list its seed nodes as redis+cluster://app:***@a:7001,b:7002"
        );
        assert_eq!(
            error("rediss://a:7001,b:7002/#insecure"),
            "a redis:// URL names one server; for a Redis Cluster list its seed nodes as rediss+cluster://a:7001,b:7002/#insecure"
        );
        assert_eq!(error("redis://a:7001"), "ok");
    }

    fn unique_prefix(test: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        format!("ecst-test:{test}:{}:{nanos}", std::process::id())
    }

    #[tokio::test]
    async fn keys_in_every_slot_range_work_through_the_pool_and_a_dedicated_connection() {
        use crate::redis_pool::{RedisConn, RedisManager, redis_pool};
        let url = cluster_url();
        let timeout = Duration::from_secs(5);
        let manager = RedisManager::new(&url, timeout).unwrap();
        assert!(manager.is_cluster());
        let prefix = unique_prefix("conn");
        let keys: Vec<String> = (0..32).map(|i| format!("{prefix}:{i}")).collect();

        let pool = redis_pool(&url, 2, timeout).unwrap();
        let mut pooled = pool.get().await.unwrap();
        let mut slots = Vec::new();
        for key in &keys {
            pooled.begin();
            let result = redis::cmd("SET")
                .arg(key)
                .arg(format!("value of {key}"))
                .query_async::<()>(pooled.conn())
                .await;
            pooled.settle(&result);
            result.unwrap();
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(pooled.conn())
                .await
                .unwrap();
            slots.push(slot);
        }
        // The three masters of the test cluster own 0-5460, 5461-10922 and 10923-16383.
        for range in [0..5461, 5461..10923, 10923..16384] {
            assert!(slots.iter().any(|s| range.contains(s)), "{slots:?}");
        }
        drop(pooled);

        let mut dedicated = manager.connect_with_timeout(timeout).await.unwrap();
        assert!(matches!(dedicated, RedisConn::Cluster(_)));
        for key in &keys {
            let value: String = redis::cmd("GET")
                .arg(key)
                .query_async(&mut dedicated)
                .await
                .unwrap();
            assert_eq!(value, format!("value of {key}"));
        }
        for key in &keys {
            redis::cmd("DEL")
                .arg(key)
                .query_async::<()>(&mut dedicated)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_blocking_read_on_its_own_cluster_connection_gets_what_the_pool_adds() {
        use crate::redis_pool::{RedisManager, redis_pool};
        let url = cluster_url();
        let timeout = Duration::from_secs(5);
        let stream = unique_prefix("conn-stream");
        let pool = redis_pool(&url, 1, timeout).unwrap();
        let mut writer = pool.get().await.unwrap();
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg("g")
            .arg("$")
            .arg("MKSTREAM")
            .query_async::<()>(writer.conn())
            .await
            .unwrap();
        // A response timeout longer than the BLOCK, as the source's reader has.
        let manager = RedisManager::new(&url, timeout).unwrap();
        let mut reader = manager
            .connect_with_timeout(Duration::from_secs(15))
            .await
            .unwrap();
        let read = |block_ms: u64| {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg("g")
                .arg("c")
                .arg("COUNT")
                .arg(10)
                .arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS")
                .arg(&stream)
                .arg(">");
            cmd
        };
        let nothing: redis::Value = read(200).query_async(&mut reader).await.unwrap();
        assert_eq!(nothing, redis::Value::Nil);

        let blocked = tokio::spawn({
            let cmd = read(10_000);
            async move {
                cmd.query_async::<redis::streams::StreamReadReply>(&mut reader)
                    .await
            }
        });
        let id: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("field")
            .arg("value")
            .query_async(writer.conn())
            .await
            .unwrap();
        let reply = blocked.await.unwrap().unwrap();
        let entries = &reply.keys[0].ids;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, id);
        redis::cmd("DEL")
            .arg(&stream)
            .query_async::<()>(writer.conn())
            .await
            .unwrap();
    }
}

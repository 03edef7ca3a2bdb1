//! A Redis Cluster of the test's own, for tests that kill a master or move a slot: `masters`
//! masters with `replicas_per_master` replicas each, every node a [`PrivateRedis`] on a free
//! port, nothing persisted.
//!
//! The cluster is formed by hand (CLUSTER ADDSLOTSRANGE, MEET, REPLICATE) rather than with
//! `redis-cli --cluster create`, which waits in whole seconds: a 3+3 cluster is ready in well
//! under a second, and which replica follows which master is known.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use redis::Commands;

use super::PrivateRedis;

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// How long a node may not answer before it is suspected; failover takes about this plus one
/// second. Shorter would fail over sooner, but a node starved of CPU on a busy machine for that
/// long would be failed over too.
const NODE_TIMEOUT_MS: u32 = 2000;

/// Keys moved per MIGRATE while a slot migrates.
const MIGRATE_BATCH: usize = 100;

/// A Redis Cluster of the test's own; its nodes are killed and their directories removed on
/// drop.
pub struct PrivateCluster {
    /// Masters first (in slot order), then the replicas of master 0, of master 1, ...
    nodes: Vec<PrivateRedis>,
    /// The slots each killed master served when it was killed, for [`Self::wait_failover`].
    killed_slots: HashMap<u16, Vec<RangeInclusive<u16>>>,
}

/// One line of CLUSTER NODES: one node as another node sees it.
#[derive(Debug)]
struct NodeView {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// The master's id, for a replica.
    master: Option<String>,
    slots: Vec<RangeInclusive<u16>>,
}

impl NodeView {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn serves(&self, slot: u16) -> bool {
        self.has_flag("master") && self.slots.iter().any(|r| r.contains(&slot))
    }
}

/// Parses CLUSTER NODES: `<id> <ip:port@bus> <flags> <master|-> <ping> <pong> <epoch> <link>
/// <slot|from-to|[migrating]>...`.
fn parse_nodes(text: &str) -> Vec<NodeView> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert!(fields.len() >= 8, "a CLUSTER NODES line: {line}");
            let addr = fields[1].split(['@', ',']).next().unwrap_or_default();
            let port = addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("a port in CLUSTER NODES line: {line}"));
            let slots = fields[8..]
                .iter()
                // `[slot->-id]` / `[slot-<-id]` mark a migration in progress, not ownership.
                .filter(|s| !s.starts_with('['))
                .map(|s| {
                    let (from, to) = s.split_once('-').unwrap_or((s, s));
                    let parse = |n: &str| -> u16 {
                        n.parse()
                            .unwrap_or_else(|_| panic!("a slot in CLUSTER NODES line: {line}"))
                    };
                    parse(from)..=parse(to)
                })
                .collect();
            NodeView {
                id: fields[0].to_string(),
                port,
                flags: fields[2].split(',').map(str::to_string).collect(),
                master: (fields[3] != "-").then(|| fields[3].to_string()),
                slots,
            }
        })
        .collect()
}

/// The `field:value` lines of an INFO-style reply.
fn info_fields(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.trim().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The cluster bus port of a node on `port` (set explicitly: the default, port + 10000, can
/// exceed 65535 for the ports a private server picks). A clash with another listener makes
/// the node fail to start with "Address already in use", and [`PrivateRedis`] picks again.
fn bus_port(port: u16) -> u16 {
    port - 10_000
}

/// A connection to one node with `timeout` on connect, reads and writes.
fn node_conn(port: u16, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_connection_with_timeout(timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    Ok(conn)
}

/// Runs `cmd` on the node on `port`, with 5s timeouts.
fn try_query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    cmd.query(&mut node_conn(port, Duration::from_secs(5))?)
}

fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> T {
    try_query(port, cmd).unwrap_or_else(|e| panic!("{cmd:?} on 127.0.0.1:{port}: {e}"))
}

/// `CLUSTER <args>`.
fn cluster_cmd(args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg(args);
    cmd
}

impl PrivateCluster {
    /// Starts `masters` masters (3 or more, for a failover to win a majority) with
    /// `replicas_per_master` replicas each, and waits until every node sees every slot served
    /// and every replica in sync with its master.
    pub fn start(masters: usize, replicas_per_master: usize) -> PrivateCluster {
        assert!(
            (1..=usize::from(SLOTS)).contains(&masters),
            "1 to {SLOTS} masters"
        );
        let total = masters * (1 + replicas_per_master);
        let nodes = (0..total)
            .map(|_| {
                PrivateRedis::start_with(|port| {
                    [
                        "--appendonly",
                        "no",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        &bus_port(port).to_string(),
                        "--cluster-node-timeout",
                        &NODE_TIMEOUT_MS.to_string(),
                        // A replica may always take over, however long its master was away:
                        // tests kill masters on purpose.
                        "--cluster-replica-validity-factor",
                        "0",
                        // A replica's first full sync starts at once, not after the default
                        // 5s wait for more replicas to share it.
                        "--repl-diskless-sync-delay",
                        "0",
                    ]
                    .map(str::to_string)
                    .to_vec()
                })
            })
            .collect();
        let cluster = PrivateCluster {
            nodes,
            killed_slots: HashMap::new(),
        };
        let ports = cluster.node_ports();
        let ids: Vec<String> = ports
            .iter()
            .map(|&p| query(p, &cluster_cmd(&["MYID"])))
            .collect();
        // Distinct epochs up front, as redis-cli does, so no two masters start in a tie.
        for (i, &port) in ports.iter().enumerate() {
            let _: () = query(
                port,
                &cluster_cmd(&["SET-CONFIG-EPOCH", &(i + 1).to_string()]),
            );
        }
        for (i, &port) in ports[..masters].iter().enumerate() {
            let first = i * usize::from(SLOTS) / masters;
            let last = (i + 1) * usize::from(SLOTS) / masters - 1;
            let _: () = query(
                port,
                &cluster_cmd(&["ADDSLOTSRANGE", &first.to_string(), &last.to_string()]),
            );
        }
        for &port in &ports[1..] {
            let _: () = query(
                port,
                &cluster_cmd(&[
                    "MEET",
                    "127.0.0.1",
                    &ports[0].to_string(),
                    &bus_port(ports[0]).to_string(),
                ]),
            );
        }
        let replicas: Vec<(u16, usize)> = ports[masters..]
            .iter()
            .enumerate()
            .map(|(r, &port)| (port, r / replicas_per_master.max(1)))
            .collect();
        cluster.poll(
            Duration::from_secs(30),
            "every node to know every other",
            || {
                ports.iter().all(|&p| {
                    let known = try_query::<String>(p, &cluster_cmd(&["NODES"]))
                        .map(|text| parse_nodes(&text))
                        .unwrap_or_default();
                    known.len() == total && known.iter().all(|n| !n.has_flag("handshake"))
                })
            },
        );
        for &(port, master) in &replicas {
            let _: () = query(port, &cluster_cmd(&["REPLICATE", &ids[master]]));
        }
        cluster.poll(
            Duration::from_secs(30),
            "the cluster to settle (all slots served, every replica in sync, seen by all)",
            || {
                let views_agree = ports.iter().all(|&p| {
                    cluster.node_settled(p, total)
                        && try_query::<String>(p, &cluster_cmd(&["NODES"]))
                            .map(|text| {
                                let view = parse_nodes(&text);
                                replicas.iter().all(|&(port, master)| {
                                    view.iter().any(|n| {
                                        n.port == port
                                            && n.has_flag("slave")
                                            && n.master.as_deref() == Some(&ids[master])
                                    })
                                })
                            })
                            .unwrap_or(false)
                });
                views_agree
                    && replicas.iter().all(|&(port, _)| {
                        try_query::<String>(port, redis::cmd("INFO").arg("replication"))
                            .map(|text| {
                                info_fields(&text)
                                    .get("master_link_status")
                                    .map(String::as_str)
                                    == Some("up")
                            })
                            .unwrap_or(false)
                    })
            },
        );
        cluster
    }

    /// `redis+cluster://127.0.0.1:<port>,...`: every node as a seed, so a client finds the
    /// cluster whichever nodes a test kills.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .node_ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The ports of all nodes, running or killed: the masters first (in slot order, as
    /// started), then the replicas.
    pub fn node_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(PrivateRedis::port).collect()
    }

    /// A connection (5s timeouts) to the node on `port`; key commands answer MOVED or ASK for
    /// keys it does not serve.
    pub fn conn(&self, port: u16) -> redis::Connection {
        node_conn(port, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to the cluster node 127.0.0.1:{port}: {e}"))
    }

    /// The slot of `key` (CLUSTER KEYSLOT, so hash tags count as Redis counts them).
    pub fn key_slot(&self, key: &str) -> u16 {
        query(self.live_port(), &cluster_cmd(&["KEYSLOT", key]))
    }

    /// The port of the master serving `slot`, as a running node sees it.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        self.view()
            .iter()
            .find(|n| n.serves(slot) && !n.has_flag("fail"))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// The port of a replica of the master on `master_port`.
    pub fn replica_of(&self, master_port: u16) -> u16 {
        let view = self.view();
        let master = view
            .iter()
            .find(|n| n.port == master_port)
            .unwrap_or_else(|| panic!("no node on port {master_port} in the cluster"));
        view.iter()
            .find(|n| n.has_flag("slave") && n.master.as_deref() == Some(master.id.as_str()))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("the node on port {master_port} has no replica"))
    }

    /// SIGKILLs the node on `port`; what it had not yet replicated is lost, as in a real crash.
    pub fn kill_9(&mut self, port: u16) {
        let slots = self
            .view()
            .into_iter()
            .find(|n| n.port == port && n.has_flag("master"))
            .map(|n| n.slots)
            .unwrap_or_default();
        self.killed_slots.insert(port, slots);
        self.node_mut(port).kill_9();
    }

    /// Waits until the slots the killed master on `old_master_port` served are served by a
    /// promoted replica, as every running node sees it, with `cluster_state:ok`; returns the
    /// new master's port.
    pub fn wait_failover(&self, old_master_port: u16) -> u16 {
        let slots = self
            .killed_slots
            .get(&old_master_port)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| panic!("no master on port {old_master_port} was killed"));
        let first = *slots[0].start();
        let live = self.live_ports();
        let mut new_master = None;
        self.poll(
            Duration::from_secs(30),
            &format!("a replica to take over the slots of 127.0.0.1:{old_master_port}"),
            || {
                let owners: Option<Vec<u16>> = live
                    .iter()
                    .map(|&p| {
                        if !self.node_settled(p, self.nodes.len()) {
                            return None;
                        }
                        let view =
                            parse_nodes(&try_query::<String>(p, &cluster_cmd(&["NODES"])).ok()?);
                        let owner = view.iter().find(|n| n.serves(first))?;
                        let all = slots.iter().all(|r| r.clone().all(|s| owner.serves(s)));
                        (all && owner.port != old_master_port && !owner.has_flag("fail"))
                            .then_some(owner.port)
                    })
                    .collect();
                // Every running node names the same new master.
                new_master = owners
                    .filter(|o| o.windows(2).all(|w| w[0] == w[1]))
                    .and_then(|o| o.first().copied());
                new_master.is_some()
            },
        );
        new_master.unwrap_or_else(|| unreachable!("poll returned, so a new master was seen"))
    }

    /// Moves `slot` with its keys to the master on `to_port` the way Redis Cluster does it
    /// live: IMPORTING/MIGRATING, MIGRATE of the keys in batches (clients meanwhile get ASK
    /// for keys already moved), then SETSLOT NODE on every master; waits until every running
    /// node sees the new owner.
    pub fn migrate_slot(&self, slot: u16, to_port: u16) {
        if self.master_of_slot(slot) == to_port {
            return;
        }
        self.move_slot_keys(slot, to_port);
        self.assign_slot(slot, to_port);
    }

    /// The first half of [`PrivateCluster::migrate_slot`]: the slot is IMPORTING on `to_port`
    /// and MIGRATING on its owner, and every key of it has moved, so that its owner answers
    /// ASK for each of them until [`PrivateCluster::assign_slot`].
    pub fn move_slot_keys(&self, slot: u16, to_port: u16) {
        let from_port = self.master_of_slot(slot);
        let view = self.view();
        let id_of = |port: u16| -> String {
            view.iter()
                .find(|n| n.port == port && n.has_flag("master"))
                .map(|n| n.id.clone())
                .unwrap_or_else(|| panic!("no master on port {port}"))
        };
        let (from_id, to_id) = (id_of(from_port), id_of(to_port));
        let slot_arg = slot.to_string();
        let _: () = query(
            to_port,
            &cluster_cmd(&["SETSLOT", &slot_arg, "IMPORTING", &from_id]),
        );
        let _: () = query(
            from_port,
            &cluster_cmd(&["SETSLOT", &slot_arg, "MIGRATING", &to_id]),
        );
        // A big key (a stream) takes a while to DUMP and RESTORE.
        let mut from = node_conn(from_port, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{from_port}: {e}"));
        loop {
            let keys: Vec<String> = cluster_cmd(&["GETKEYSINSLOT", &slot_arg])
                .arg(MIGRATE_BATCH)
                .query(&mut from)
                .unwrap_or_else(|e| panic!("GETKEYSINSLOT {slot} on 127.0.0.1:{from_port}: {e}"));
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg(&["127.0.0.1", &to_port.to_string(), "", "0", "30000", "KEYS"])
                .arg(&keys)
                .query(&mut from)
                .unwrap_or_else(|e| {
                    panic!("MIGRATE of slot {slot} from {from_port} to {to_port}: {e}")
                });
        }
    }

    /// The second half of [`PrivateCluster::migrate_slot`]: SETSLOT NODE on every master;
    /// waits until every running node sees the new owner.
    pub fn assign_slot(&self, slot: u16, to_port: u16) {
        let from_port = self.master_of_slot(slot);
        let view = self.view();
        let to_id = view
            .iter()
            .find(|n| n.port == to_port && n.has_flag("master"))
            .map(|n| n.id.clone())
            .unwrap_or_else(|| panic!("no master on port {to_port}"));
        let slot_arg = slot.to_string();
        // The new owner first, then the old, then the rest, as Redis's docs order it, so that
        // no moment has both or neither claim the slot.
        let mut masters: Vec<u16> = vec![to_port, from_port];
        masters.extend(
            view.iter()
                .filter(|n| n.has_flag("master") && !n.has_flag("fail"))
                .map(|n| n.port)
                .filter(|p| *p != to_port && *p != from_port && self.is_running(*p)),
        );
        for port in masters {
            let _: () = query(port, &cluster_cmd(&["SETSLOT", &slot_arg, "NODE", &to_id]));
        }
        let live = self.live_ports();
        self.poll(
            Duration::from_secs(30),
            &format!("every node to see slot {slot} on 127.0.0.1:{to_port}"),
            || {
                live.iter().all(|&p| {
                    try_query::<String>(p, &cluster_cmd(&["NODES"]))
                        .map(|text| {
                            parse_nodes(&text)
                                .iter()
                                .any(|n| n.port == to_port && n.serves(slot))
                        })
                        .unwrap_or(false)
                })
            },
        );
    }

    fn node_mut(&mut self, port: u16) -> &mut PrivateRedis {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no node on port {port} in the cluster"))
    }

    fn is_running(&self, port: u16) -> bool {
        self.nodes
            .iter()
            .any(|n| n.port() == port && n.pid().is_some())
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.pid().is_some())
            .map(PrivateRedis::port)
            .collect()
    }

    /// A running node's port.
    fn live_port(&self) -> u16 {
        *self
            .live_ports()
            .first()
            .expect("a running node in the cluster")
    }

    /// The cluster as the first running node that answers sees it.
    fn view(&self) -> Vec<NodeView> {
        self.live_ports()
            .iter()
            .find_map(|&p| try_query::<String>(p, &cluster_cmd(&["NODES"])).ok())
            .map(|text| parse_nodes(&text))
            .expect("a running node answers CLUSTER NODES")
    }

    /// The node on `port` reports `cluster_state:ok`, every slot served and `total` nodes.
    fn node_settled(&self, port: u16, total: usize) -> bool {
        try_query::<String>(port, &cluster_cmd(&["INFO"]))
            .map(|text| {
                let info = info_fields(&text);
                let field = |k: &str| info.get(k).map(String::as_str);
                field("cluster_state") == Some("ok")
                    && field("cluster_slots_ok") == Some(&SLOTS.to_string())
                    && field("cluster_known_nodes") == Some(&total.to_string())
            })
            .unwrap_or(false)
    }

    /// Polls `check` until it holds; after `limit`, panics with what every running node sees.
    fn poll(&self, limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !check() {
            if Instant::now() > deadline {
                let views: Vec<String> = self
                    .live_ports()
                    .iter()
                    .map(|&p| {
                        let nodes = try_query::<String>(p, &cluster_cmd(&["NODES"]))
                            .unwrap_or_else(|e| e.to_string());
                        let info = try_query::<String>(p, &cluster_cmd(&["INFO"]))
                            .unwrap_or_else(|e| e.to_string());
                        format!("-- 127.0.0.1:{p}\n{nodes}{info}")
                    })
                    .collect();
                panic!(
                    "timed out after {limit:?} waiting for {what}; the nodes see:\n{}",
                    views.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Runs `cmd` for a key on `port`, following MOVED to the node that serves the key.
fn on_owner<T: redis::FromRedisValue>(
    cluster: &PrivateCluster,
    mut port: u16,
    cmd: &redis::Cmd,
) -> T {
    for _ in 0..3 {
        match cmd.query(&mut cluster.conn(port)) {
            Ok(value) => return value,
            Err(e) => {
                let (addr, _) = e
                    .redirect_node()
                    .unwrap_or_else(|| panic!("{cmd:?} on 127.0.0.1:{port}: {e}"));
                port = addr
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("a port in the redirect {e}"));
            }
        }
    }
    panic!("{cmd:?}: more than 3 redirects");
}

#[test]
fn cluster_fixture_migrates_a_slot_and_fails_over() {
    let started = Instant::now();
    // By the path the other tests use.
    let mut cluster = crate::servers::PrivateCluster::start(3, 1);
    eprintln!("a 3+3 private cluster was ready in {:?}", started.elapsed());
    let ports = cluster.node_ports();
    assert_eq!(ports.len(), 6);

    // Every seed of the URL is a node of a healthy cluster.
    let url = cluster.url();
    let seeds = url
        .strip_prefix("redis+cluster://")
        .expect("a redis+cluster:// URL");
    for seed in seeds.split(',') {
        let port: u16 = seed
            .strip_prefix("127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("a loopback seed in {url}"));
        assert!(ports.contains(&port), "{seed} of {url} is a node");
        assert!(cluster.node_settled(port, ports.len()), "{seed} is settled");
    }

    // Keys all over the slot space, and 250 in one slot (more than one MIGRATE batch).
    let spread: Vec<String> = (0..100).map(|i| format!("spread:{i}")).collect();
    let tagged: Vec<String> = (0..250).map(|i| format!("{{moved}}:{i}")).collect();
    for key in spread.iter().chain(&tagged) {
        let _: () = on_owner(&cluster, ports[0], redis::cmd("SET").arg(key).arg(key));
    }
    let slot = cluster.key_slot(&tagged[0]);
    assert!(tagged.iter().all(|k| cluster.key_slot(k) == slot));

    let from = cluster.master_of_slot(slot);
    let to = *ports[..3]
        .iter()
        .find(|&&p| p != from)
        .expect("another master");
    cluster.migrate_slot(slot, to);
    assert_eq!(cluster.master_of_slot(slot), to);
    let moved = cluster.conn(from).get::<_, String>(&tagged[0]);
    let err = moved.expect_err("the old owner no longer serves the slot");
    assert_eq!(
        err.redirect_node(),
        Some((format!("127.0.0.1:{to}").as_str(), slot)),
        "{err}"
    );
    let count: usize = query(from, &cluster_cmd(&["COUNTKEYSINSLOT", &slot.to_string()]));
    assert_eq!(count, 0, "nothing left behind on the old owner");
    let mut on_to = cluster.conn(to);
    for key in &tagged {
        assert_eq!(on_to.get::<_, String>(key).expect("GET"), *key);
    }

    // Once the replica has everything (WAIT after a write of our own: replication is in
    // order), kill the new owner: its replica takes over the slot with its keys.
    let replica = cluster.replica_of(to);
    let _: () = on_to.set("{moved}:sentinel", "x").expect("SET");
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut on_to)
        .expect("WAIT");
    assert_eq!(acked, 1, "the replica of 127.0.0.1:{to} caught up");
    cluster.kill_9(to);
    let failed_over = Instant::now();
    let promoted = cluster.wait_failover(to);
    eprintln!("failover took {:?}", failed_over.elapsed());
    assert_eq!(promoted, replica);
    assert_eq!(cluster.master_of_slot(slot), replica);
    let live = *ports.iter().find(|&&p| p != to).expect("a running node");
    for key in spread.iter().chain(&tagged) {
        let value: String = on_owner(&cluster, live, redis::cmd("GET").arg(key));
        assert_eq!(value, *key);
    }
}

//! Partitioned streams on a real Redis Cluster: workers share the partitions, one dies, one
//! joins, a master fails over, a slot migrates, and the replica comes out exact.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ecst_schemas::partition::{partition_of, partition_stream};
use serde_json::Value;

use crate::common::*;
use crate::servers::PrivateCluster;

const PARTITIONS: u32 = 8;

/// A partitioned athletes pipeline reading `source`; its replica goes to `sink` (default the
/// source), keys tagged or not.
fn pipeline(stream: &str, prefix: &str, source: &str, sink: Option<&str>, tagged: bool) -> String {
    let key = if tagged {
        format!("{prefix}athlete:{{{{{{aggregateId}}}}}}")
    } else {
        format!("{prefix}athlete:{{aggregateId}}")
    };
    let sink_redis = sink.map_or(String::new(), |s| format!("    redis: \"{s}\"\n"));
    format!(
        r#"name: athletes
source:
  redis: "{source}"
  stream: "{stream}"
  group: replica
  block: 100ms
  claim_every: 200ms
  partitions: {PARTITIONS}
  lease: 1s
  batch_size: 50
stages:
  decode: {{ type: decode }}
  latest: {{ type: version_filter, input: decode }}
  deletes: {{ type: tombstone, input: latest, mode: delete, keep_for: 1h }}
  athlete:
    type: project
    input: deletes
    fields:
      display_name: payload.displayName
  cache:
    type: redis_hash
    input: athlete
{sink_redis}    key: "{key}"
    tombstone_prefix: "{prefix}tombstone:"
"#
    )
}

fn workload(
    aggregates: usize,
    versions: u64,
    seed: u64,
) -> (Vec<Value>, HashMap<String, Option<String>>) {
    shuffled_workload("c", aggregates, versions, seed)
}

/// XADDs each event to its partition.
fn publish_routed(conn: &mut impl redis::ConnectionLike, stream: &str, events: &[Value]) {
    for e in events {
        let id = e["aggregateId"].as_str().expect("aggregateId");
        let key = partition_stream(stream, partition_of(id, PARTITIONS), PARTITIONS);
        let _: String = redis::cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("v")
            .arg(e.to_string())
            .query(conn)
            .expect("XADD");
    }
}

fn replica_key(prefix: &str, id: &str, tagged: bool) -> String {
    if tagged {
        format!("{prefix}athlete:{{{id}}}")
    } else {
        format!("{prefix}athlete:{id}")
    }
}

fn differences(
    conn: &mut impl redis::ConnectionLike,
    prefix: &str,
    tagged: bool,
    expected: &HashMap<String, Option<String>>,
) -> Vec<String> {
    let mut wrong = Vec::new();
    for (id, name) in expected {
        let got: Option<String> = redis::cmd("HGET")
            .arg(replica_key(prefix, id, tagged))
            .arg("display_name")
            .query(conn)
            .unwrap_or(Some("<unreadable>".into()));
        if got != *name {
            wrong.push(format!("{id}: expected {name:?}, got {got:?}"));
        }
    }
    wrong.sort();
    wrong.truncate(5);
    wrong
}

/// How many aggregates the replica already has in their final state.
fn matching(
    conn: &mut impl redis::ConnectionLike,
    prefix: &str,
    tagged: bool,
    expected: &HashMap<String, Option<String>>,
) -> usize {
    expected
        .iter()
        .filter(|(id, name)| {
            let got: Option<String> = redis::cmd("HGET")
                .arg(replica_key(prefix, id, tagged))
                .arg("display_name")
                .query(conn)
                .unwrap_or(None);
            name.is_some() && got == **name
        })
        .count()
}

fn pending(conn: &mut impl redis::ConnectionLike, stream: &str) -> Option<i64> {
    pending_in_partitions(conn, stream, "replica", PARTITIONS)
}

/// Waits until the replica (read through `replica`) is exact and nothing is pending in the
/// source (read through `source`).
fn converge(
    source: &mut impl redis::ConnectionLike,
    replica: &mut impl redis::ConnectionLike,
    workers: &[&Worker],
    stream: &str,
    prefix: &str,
    tagged: bool,
    expected: &HashMap<String, Option<String>>,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let wrong = differences(replica, prefix, tagged, expected);
        let left = pending(source, stream);
        if wrong.is_empty() && left == Some(0) {
            return;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = workers.iter().map(|w| w.log()).collect();
            panic!(
                "not converged: {wrong:?}, pending {left:?}\nlogs:\n{}",
                logs.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn taken(worker: &Worker) -> usize {
    worker
        .log()
        .lines()
        .filter(|l| l.contains("Took partition"))
        .count()
}

/// The slot of `key`, the master serving it and another of the three masters.
fn slot_and_masters(private: &PrivateCluster, key: &str) -> (u16, u16, u16) {
    let slot = private.key_slot(key);
    let from = private.master_of_slot(slot);
    let to = private
        .node_ports()
        .into_iter()
        .take(3)
        .find(|p| *p != from)
        .expect("another master");
    (slot, from, to)
}

fn dead_letter_count(conn: &mut impl redis::ConnectionLike, stream: &str) -> i64 {
    redis::cmd("XLEN")
        .arg(format!("{stream}.dlq"))
        .query(conn)
        .expect("XLEN")
}

#[test]
fn on_a_cluster_two_workers_share_eight_partitions_and_a_killed_ones_move_to_the_survivor() {
    let url = cluster_url();
    let mut conn = cluster(&url);
    let stream = unique("cl-share");
    let prefix = format!("{stream}:");
    let file = pipeline_file("cl-share", &pipeline(&stream, &prefix, &url, None, false));
    let mut victim = Worker::start(&file, &[]);
    let survivor = Worker::start(&file, &[]);
    wait_for_worker(&victim, Duration::from_secs(30), "an even split", || {
        taken(&victim) >= 4 && taken(&survivor) >= 4
    });
    let (events, expected) = workload(300, 4, 21);
    let (first, second) = events.split_at(events.len() / 2);
    publish_routed(&mut conn, &stream, first);
    // Poison in two partitions: dead-lettered once each, into the one dead-letter stream.
    for p in [2, 5] {
        let _: String = redis::cmd("XADD")
            .arg(partition_stream(&stream, p, PARTITIONS))
            .arg("*")
            .arg("v")
            .arg("{not json")
            .query(&mut conn)
            .expect("XADD");
    }
    wait_until(Duration::from_secs(30), "some of it applied", || {
        matching(&mut conn, &prefix, false, &expected) >= 40
    });
    // Counted from the kill: what the survivor took at start does not count.
    let before = taken(&survivor);
    victim.kill_9();
    let killed = Instant::now();
    publish_routed(&mut conn, &stream, second);
    wait_for_worker(
        &survivor,
        Duration::from_secs(30),
        "the victim's 4 partitions",
        || taken(&survivor) >= before + 4,
    );
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "the takeover took {:?}",
        killed.elapsed()
    );
    converge(
        &mut conn,
        &mut cluster(&url),
        &[&survivor],
        &stream,
        &prefix,
        false,
        &expected,
    );
    wait_for_worker(
        &survivor,
        Duration::from_secs(30),
        "two dead letters",
        || dead_letter_count(&mut conn, &stream) >= 2,
    );
    let (status, log) = survivor.terminate();
    assert!(status.success(), "{log}");
    // On a cluster a dead letter is added, then acked: a kill between the two may repeat
    // it, never lose it.
    let dead = dead_letter_count(&mut conn, &stream);
    assert!((2..=4).contains(&dead), "{dead} dead letters");
}

#[test]
fn on_a_cluster_a_third_worker_joining_gets_its_share_with_tagged_keys() {
    let url = cluster_url();
    let mut conn = cluster(&url);
    let stream = unique("cl-join");
    let prefix = format!("{stream}:");
    let file = pipeline_file("cl-join", &pipeline(&stream, &prefix, &url, None, true));
    let first = Worker::start(&file, &[]);
    let second = Worker::start(&file, &[]);
    let (events, expected) = workload(400, 3, 22);
    let (early, late) = events.split_at(events.len() / 3);
    publish_routed(&mut conn, &stream, early);
    let third = Worker::start(&file, &[]);
    publish_routed(&mut conn, &stream, late);
    wait_for_worker(
        &third,
        Duration::from_secs(30),
        "the joiner's share",
        || taken(&third) >= 2,
    );
    converge(
        &mut conn,
        &mut cluster(&url),
        &[&first, &second, &third],
        &stream,
        &prefix,
        true,
        &expected,
    );
    // A deleted aggregate's tombstone shares its hash's slot.
    let slot = |conn: &mut redis::cluster::ClusterConnection, key: &str| -> i64 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(conn)
            .expect("KEYSLOT")
    };
    let hash_key = replica_key(&prefix, "c0", true);
    let tombstone = format!("{prefix}tombstone:{hash_key}");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&tombstone)
        .query(&mut conn)
        .expect("EXISTS");
    assert_eq!(exists, 1, "no tombstone {tombstone} for the deleted c0");
    assert_eq!(slot(&mut conn, &tombstone), slot(&mut conn, &hash_key));
    for w in [first, second, third] {
        let (status, log) = w.terminate();
        assert!(status.success(), "{log}");
    }
}

#[test]
fn a_master_killed_mid_stream_fails_over_and_nothing_acked_is_lost() {
    // The source on a cluster of the test's own; the replica on the shared single Redis, so
    // what the failover can lose is the stream's side only (see the README's failover note).
    let mut private = PrivateCluster::start(3, 1);
    let url = private.url();
    let mut conn = cluster(&url);
    let mut replica = redis();
    let stream = unique("cl-failover");
    let prefix = format!("{stream}:");
    let file = pipeline_file(
        "cl-failover",
        &pipeline(&stream, &prefix, &url, Some(&redis_url()), false),
    );
    let (events, expected) = workload(400, 4, 23);
    publish_routed(&mut conn, &stream, &events);
    // Every XADD reached a replica: a failover cannot take an event back from the producer.
    for port in private.node_ports().into_iter().take(3) {
        let _: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(5000)
            .query(&mut private.conn(port))
            .expect("WAIT");
    }
    let first = Worker::start(&file, &[]);
    let second = Worker::start(&file, &[]);
    wait_until(Duration::from_secs(30), "the drain under way", || {
        matching(&mut replica, &prefix, false, &expected) >= 40
    });
    let slot = private.key_slot(&partition_stream(&stream, 0, PARTITIONS));
    let master = private.master_of_slot(slot);
    private.kill_9(master);
    let promoted = private.wait_failover(master);
    assert_ne!(promoted, master);
    // A client connected before the failover may still route to the dead master.
    let mut conn = cluster(&url);
    converge(
        &mut conn,
        &mut replica,
        &[&first, &second],
        &stream,
        &prefix,
        false,
        &expected,
    );
    let wrong = differences(&mut replica, &prefix, false, &expected);
    assert!(wrong.is_empty(), "{wrong:?}");
    for w in [first, second] {
        let (status, log) = w.terminate();
        assert!(status.success(), "{log}");
    }
    cleanup(&mut replica, &stream);
}

/// A private 3-master cluster, a tagged pipeline of a fresh stream on it, and a workload of
/// which the first half is published: the set-up of the slot migration tests.
struct HalfPublished {
    private: PrivateCluster,
    url: String,
    conn: redis::cluster::ClusterConnection,
    stream: String,
    prefix: String,
    file: std::path::PathBuf,
    second_half: Vec<Value>,
    expected: HashMap<String, Option<String>>,
}

impl HalfPublished {
    fn start(label: &str, aggregates: usize, versions: u64, seed: u64) -> Self {
        let private = PrivateCluster::start(3, 0);
        let url = private.url();
        let mut conn = cluster(&url);
        let stream = unique(label);
        let prefix = format!("{stream}:");
        let file = pipeline_file(label, &pipeline(&stream, &prefix, &url, None, true));
        let (mut events, expected) = workload(aggregates, versions, seed);
        let second_half = events.split_off(events.len() / 2);
        publish_routed(&mut conn, &stream, &events);
        HalfPublished {
            private,
            url,
            conn,
            stream,
            prefix,
            file,
            second_half,
            expected,
        }
    }

    /// Publishes the second half, then waits until `worker` has the replica exact.
    fn finish_and_converge(&mut self, worker: &Worker) {
        publish_routed(&mut self.conn, &self.stream, &self.second_half);
        converge(
            &mut self.conn,
            &mut cluster(&self.url),
            &[worker],
            &self.stream,
            &self.prefix,
            true,
            &self.expected,
        );
    }
}

#[test]
fn a_stream_slot_migrating_during_a_drain_loses_nothing() {
    let mut case = HalfPublished::start("cl-migrate", 400, 5, 24);
    let worker = Worker::start(&case.file, &[]);
    wait_for_worker(&worker, Duration::from_secs(30), "all partitions", || {
        taken(&worker) >= PARTITIONS as usize
    });
    // Move the slot of partition 3's stream to another master while the worker reads it:
    // a burst for partition 3 just before, so it has entries unread or pending when it moves.
    let key = partition_stream(&case.stream, 3, PARTITIONS);
    let burst: Vec<Value> = case
        .second_half
        .iter()
        .filter(|e| partition_of(e["aggregateId"].as_str().unwrap_or(""), PARTITIONS) == 3)
        .cloned()
        .collect();
    assert!(!burst.is_empty());
    publish_routed(&mut case.conn, &case.stream, &burst);
    let (slot, _, to) = slot_and_masters(&case.private, &key);
    case.private.migrate_slot(slot, to);
    assert_eq!(case.private.master_of_slot(slot), to);
    case.finish_and_converge(&worker);
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn a_stream_whose_slot_is_half_migrated_is_read_through_ask() {
    let mut case = HalfPublished::start("cl-ask", 300, 4, 25);
    // Partition 3's stream moves to another master, but the slot is not handed over: its old
    // owner answers ASK for the stream while the worker reads it.
    let key = partition_stream(&case.stream, 3, PARTITIONS);
    let (slot, from, to) = slot_and_masters(&case.private, &key);
    case.private.move_slot_keys(slot, to);
    let worker = Worker::start(&case.file, &[]);
    case.finish_and_converge(&worker);
    assert_eq!(case.private.master_of_slot(slot), from, "still migrating");
    case.private.assign_slot(slot, to);
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
}

//! Partitioned streams on one Redis: workers share the partitions by lease, rebalance when one
//! joins or dies, and the replica comes out exact.

use std::collections::HashMap;
use std::time::Duration;

use ecst_schemas::partition::{partition_of, partition_stream};
use serde_json::Value;

use crate::common::*;

const PARTITIONS: u32 = 8;

/// A partitioned athletes pipeline with a short lease, so rebalancing shows within seconds.
fn partitioned_pipeline(stream: &str, prefix: &str) -> String {
    athletes_pipeline(
        stream,
        prefix,
        &format!("  partitions: {PARTITIONS}\n  lease: 1s\n  batch_size: 50"),
    )
}

fn workload(
    aggregates: usize,
    versions: u64,
    seed: u64,
) -> (Vec<Value>, HashMap<String, Option<String>>) {
    shuffled_workload("a", aggregates, versions, seed)
}

/// XADDs each event to its partition, as every producer must.
fn publish_partitioned(conn: &mut redis::Connection, stream: &str, events: &[Value]) {
    let mut by_partition: HashMap<u32, Vec<Value>> = HashMap::new();
    for e in events {
        let id = e["aggregateId"].as_str().expect("aggregateId");
        by_partition
            .entry(partition_of(id, PARTITIONS))
            .or_default()
            .push(e.clone());
    }
    for (p, events) in by_partition {
        publish(conn, &partition_stream(stream, p, PARTITIONS), &events);
    }
}

fn replica_matches(
    conn: &mut redis::Connection,
    prefix: &str,
    expected: &HashMap<String, Option<String>>,
) -> Result<(), String> {
    for (id, name) in expected {
        let h = hash(conn, &format!("{prefix}athlete:{id}"));
        let got = h.get("display_name");
        if got != name.as_ref() {
            return Err(format!("{id}: expected {name:?}, replica has {h:?}"));
        }
    }
    Ok(())
}

fn pending_everywhere(conn: &mut redis::Connection, stream: &str) -> Option<i64> {
    pending_in_partitions(conn, stream, "replica", PARTITIONS)
}

fn partitions_taken(log: &str) -> usize {
    log.lines().filter(|l| l.contains("Took partition")).count()
}

fn cleanup_partitioned(conn: &mut redis::Connection, stream: &str) {
    cleanup(conn, stream);
    let _: i64 = redis::cmd("DEL")
        .arg(format!("ecst:members:{stream}:replica"))
        .query(conn)
        .expect("DEL");
    for p in 0..PARTITIONS {
        let _: i64 = redis::cmd("DEL")
            .arg(format!("ecst:lease:{stream}:replica:{p}"))
            .query(conn)
            .expect("DEL");
    }
}

/// Waits until the replica is exact and nothing is pending in any partition.
fn converge(
    conn: &mut redis::Connection,
    workers: &[&Worker],
    stream: &str,
    prefix: &str,
    expected: &HashMap<String, Option<String>>,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let exact = replica_matches(conn, prefix, expected);
        let pending = pending_everywhere(conn, stream);
        if exact.is_ok() && pending == Some(0) {
            return;
        }
        if std::time::Instant::now() >= deadline {
            let logs: Vec<String> = workers.iter().map(|w| w.log()).collect();
            panic!(
                "not converged: {exact:?}, pending {pending:?}\nlogs:\n{}",
                logs.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_workers_share_eight_partitions_and_the_replica_is_exact() {
    let mut conn = redis();
    let stream = unique("part-share");
    let prefix = format!("{stream}:");
    let file = pipeline_file("part-share", &partitioned_pipeline(&stream, &prefix));
    let (events, expected) = workload(400, 4, 11);
    publish_partitioned(&mut conn, &stream, &events);
    // Poison in two partitions: dead-lettered to the one dead-letter stream of the stream.
    publish(
        &mut conn,
        &partition_stream(&stream, 1, PARTITIONS),
        &[Value::String("{not json".into())],
    );
    let _: String = redis::cmd("XADD")
        .arg(partition_stream(&stream, 6, PARTITIONS))
        .arg("*")
        .arg("v")
        .arg("{\"aggregateId\": ")
        .query(&mut conn)
        .expect("XADD");
    let first = Worker::start(&file, &[]);
    let second = Worker::start(&file, &[]);
    converge(&mut conn, &[&first, &second], &stream, &prefix, &expected);
    wait_until(
        Duration::from_secs(30),
        "both poison entries dead-lettered",
        || dead_letters(&mut conn, &format!("{stream}.dlq")).len() == 2,
    );
    // Both workers took part: 8 partitions over 2 live members is 4 each.
    wait_for_worker(&first, Duration::from_secs(30), "an even split", || {
        partitions_taken(&first.log()) >= 4 && partitions_taken(&second.log()) >= 4
    });
    // `ecst status` shows every partition with its owner: both workers, four each.
    let mut cmd = ecst();
    cmd.arg("status").arg(&file).arg("--json");
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let rows = report["partitions"].as_array().expect("partitions");
    assert_eq!(rows.len(), PARTITIONS as usize);
    let mut owners: HashMap<String, usize> = HashMap::new();
    for row in rows {
        assert_eq!(row["pending"], 0, "{row}");
        assert_eq!(row["lag"], 0, "{row}");
        assert!(row["retention_gap"].is_null(), "{row}");
        *owners
            .entry(row["owner"].as_str().expect("owned").to_string())
            .or_default() += 1;
    }
    assert_eq!(owners.values().copied().collect::<Vec<_>>(), vec![4, 4]);
    assert_eq!(report["dead_letters"], 2);
    let (status, log) = first.terminate();
    assert!(status.success(), "{log}");
    let (status, log) = second.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(pending_everywhere(&mut conn, &stream), Some(0));
    cleanup_partitioned(&mut conn, &stream);
}

#[test]
fn a_killed_workers_partitions_move_to_the_survivor_within_the_lease() {
    let mut conn = redis();
    let stream = unique("part-kill");
    let prefix = format!("{stream}:");
    let file = pipeline_file("part-kill", &partitioned_pipeline(&stream, &prefix));
    let mut victim = Worker::start(&file, &[]);
    let survivor = Worker::start(&file, &[]);
    wait_for_worker(
        &victim,
        Duration::from_secs(30),
        "the victim holds partitions",
        || partitions_taken(&victim.log()) >= 4,
    );
    let (events, expected) = workload(300, 5, 12);
    let (first_half, second_half) = events.split_at(events.len() / 2);
    publish_partitioned(&mut conn, &stream, first_half);
    // Killed mid-stream, with batches of its partitions possibly in flight.
    let keys: Vec<String> = (0..300).map(|a| format!("{prefix}athlete:a{a}")).collect();
    wait_until(
        Duration::from_secs(30),
        "the workers applied something",
        || {
            redis::cmd("EXISTS")
                .arg(&keys)
                .query::<i64>(&mut conn)
                .unwrap_or(0)
                > 20
        },
    );
    // Counted from the kill: what the survivor took at start (and maybe gave back) does not
    // count.
    let before = partitions_taken(&survivor.log());
    victim.kill_9();
    let killed_at = std::time::Instant::now();
    publish_partitioned(&mut conn, &stream, second_half);
    wait_for_worker(
        &survivor,
        Duration::from_secs(30),
        "the victim's 4 partitions",
        || partitions_taken(&survivor.log()) >= before + 4,
    );
    // Lease 1s, renewed every third of it: the takeover happens within a few leases.
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "takeover took {:?}",
        killed_at.elapsed()
    );
    converge(&mut conn, &[&survivor], &stream, &prefix, &expected);
    let (status, log) = survivor.terminate();
    assert!(status.success(), "{log}");
    cleanup_partitioned(&mut conn, &stream);
}

#[test]
fn a_third_worker_joining_mid_stream_gets_its_share_and_nothing_is_lost() {
    let mut conn = redis();
    let stream = unique("part-join");
    let prefix = format!("{stream}:");
    let file = pipeline_file("part-join", &partitioned_pipeline(&stream, &prefix));
    let first = Worker::start(&file, &[]);
    let second = Worker::start(&file, &[]);
    let (events, expected) = workload(600, 4, 13);
    let chunks: Vec<&[Value]> = events.chunks(events.len() / 4 + 1).collect();
    publish_partitioned(&mut conn, &stream, chunks[0]);
    let third = Worker::start(&file, &[]);
    for chunk in &chunks[1..] {
        publish_partitioned(&mut conn, &stream, chunk);
        std::thread::yield_now();
    }
    // 8 partitions over 3 members: 3, 3 and 2.
    wait_for_worker(
        &third,
        Duration::from_secs(30),
        "the joiner's share",
        || partitions_taken(&third.log()) >= 2,
    );
    let gave_back = |w: &Worker| w.log().contains("Gave partition");
    wait_until(Duration::from_secs(30), "a rebalance", || {
        gave_back(&first) || gave_back(&second)
    });
    converge(
        &mut conn,
        &[&first, &second, &third],
        &stream,
        &prefix,
        &expected,
    );
    for w in [first, second, third] {
        let (status, log) = w.terminate();
        assert!(status.success(), "{log}");
    }
    // No lease or membership is left behind by clean shutdowns.
    let members: i64 = redis::cmd("ZCARD")
        .arg(format!("ecst:members:{stream}:replica"))
        .query(&mut conn)
        .expect("ZCARD");
    assert_eq!(members, 0);
    cleanup_partitioned(&mut conn, &stream);
}

#[test]
fn a_partitioned_group_bootstraps_once_with_a_position_on_every_partition() {
    use crate::bootstrap::{Source, http_bootstrap, ids, snapshot_server};
    let mut conn = redis();
    let source = Source::create("part_boot", 5_000);
    let stream = unique("part-boot");
    let prefix = format!("{stream}:");
    // Old history on the partitions: older than the snapshot, it must not win.
    let stale: Vec<Value> = ids(1..300).iter().map(|id| event(id, 1, "old")).collect();
    publish_partitioned(&mut conn, &stream, &stale);
    let (server, port) = snapshot_server(&source);
    let mut yaml = partitioned_pipeline(&stream, &prefix);
    yaml.push_str(&format!("bootstrap:\n{}", http_bootstrap(port, "")));
    let file = pipeline_file("part-boot", &yaml);
    let first = Worker::start(&file, &[]);
    let second = Worker::start(&file, &[]);
    wait_until(Duration::from_secs(30), "a bootstrap to start", || {
        first.log().contains("Bootstrap starting") || second.log().contains("Bootstrap starting")
    });
    // Live changes race the snapshot, on every partition.
    for chunk in ids(1..5_001).chunks(1_000) {
        let picked: Vec<String> = chunk.iter().step_by(9).cloned().collect();
        publish_partitioned(&mut conn, &stream, &source.update(&picked));
    }
    wait_until(
        Duration::from_secs(90),
        "the replica to equal the source",
        || {
            source.differences(&mut conn, &prefix).is_empty()
                && pending_everywhere(&mut conn, &stream) == Some(0)
        },
    );
    let progress: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("ecst:bootstrap:{stream}:replica:progress"))
        .query(&mut conn)
        .expect("HGETALL");
    assert_eq!(progress["state"], "done");
    assert_eq!(
        progress["position"].split(' ').count(),
        PARTITIONS as usize,
        "{progress:?}"
    );
    let (status, first_log) = first.terminate();
    assert!(status.success(), "{first_log}");
    let (status, second_log) = second.terminate();
    assert!(status.success(), "{second_log}");
    let bootstraps = [&first_log, &second_log]
        .iter()
        .filter(|log| log.contains("Bootstrap starting"))
        .count();
    assert_eq!(bootstraps, 1, "{first_log}\n----\n{second_log}");
    let (status, log) = server.terminate();
    assert!(status.success(), "{log}");
    source.drop();
    cleanup_partitioned(&mut conn, &stream);
    let _: i64 = redis::cmd("DEL")
        .arg(format!("ecst:bootstrap:{stream}:replica:progress"))
        .query(&mut conn)
        .expect("DEL");
}

#[test]
fn drain_exits_once_every_partition_is_read_and_acked() {
    let mut conn = redis();
    let stream = unique("part-drain");
    let prefix = format!("{stream}:");
    let file = pipeline_file("part-drain", &partitioned_pipeline(&stream, &prefix));
    let (events, expected) = workload(200, 3, 14);
    publish_partitioned(&mut conn, &stream, &events);
    let out = drain(&file);
    assert!(stderr_of(&out).contains("Drained"), "{}", stderr_of(&out));
    replica_matches(&mut conn, &prefix, &expected).expect("exact replica");
    assert_eq!(pending_everywhere(&mut conn, &stream), Some(0));
    cleanup_partitioned(&mut conn, &stream);
}

#[test]
fn a_retention_gap_on_one_partition_is_healed_by_one_bootstrap() {
    use crate::bootstrap::{Source, http_bootstrap, ids, snapshot_server};
    let mut conn = redis();
    let source = Source::create("part_gap", 2_000);
    let stream = unique("part-gap");
    let prefix = format!("{stream}:");
    let (server, port) = snapshot_server(&source);
    let mut yaml = partitioned_pipeline(&stream, &prefix);
    yaml.push_str(&format!("bootstrap:\n{}", http_bootstrap(port, "")));
    let file = pipeline_file("part-gap", &yaml);
    let worker = Worker::start(&file, &[]);
    wait_until(Duration::from_secs(60), "the first bootstrap", || {
        source.differences(&mut conn, &prefix).is_empty()
    });
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");

    // While no worker runs: changes and deletions, published to their partitions, and one
    // partition trimmed before anyone read it.
    let changed = source.update(&ids(1..301));
    publish_partitioned(&mut conn, &stream, &changed);
    let gone = source.pg.query(
        &format!(
            "DELETE FROM {} WHERE id = ANY($1) RETURNING id, version",
            source.table
        ),
        &[&ids(1_500..1_550)],
    );
    let deletes: Vec<Value> = gone
        .iter()
        .map(|r| delete(&r.get::<_, String>(0), r.get::<_, i64>(1) as u64 + 1))
        .collect();
    publish_partitioned(&mut conn, &stream, &deletes);
    let trimmed = partition_stream(&stream, 3, PARTITIONS);
    let _: i64 = redis::cmd("XTRIM")
        .arg(&trimmed)
        .arg("MAXLEN")
        .arg(0)
        .query(&mut conn)
        .expect("XTRIM");
    assert!(!source.differences(&mut conn, &prefix).is_empty());

    let worker = Worker::start(&file, &[]);
    wait_for_worker(&worker, Duration::from_secs(60), "the gap healed", || {
        source.differences(&mut conn, &prefix).is_empty()
            && pending_everywhere(&mut conn, &stream) == Some(0)
    });
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("RETENTION GAP"), "{log}");
    assert!(log.contains(&format!("from stream {trimmed}")), "{log}");
    assert_eq!(
        log.matches("Bootstrap starting").count(),
        1,
        "one bootstrap for the whole stream:\n{log}"
    );
    let (status, log) = server.terminate();
    assert!(status.success(), "{log}");
    source.drop();
    cleanup_partitioned(&mut conn, &stream);
    let _: i64 = redis::cmd("DEL")
        .arg(format!("ecst:bootstrap:{stream}:replica:progress"))
        .query(&mut conn)
        .expect("DEL");
}

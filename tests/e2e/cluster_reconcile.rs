//! `ecst reconcile` and the bootstrap's orphan sweep against a `redis_hash` replica on the
//! local Redis Cluster (`ECST_CLUSTER_URL`): keys on every master are listed, compared and
//! repaired, as `reconcile.rs` checks on one server.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use redis::Commands;
use redis::cluster::ClusterConnection;
use serde_json::Value;

use crate::bootstrap::Source;
use crate::common::*;

/// A connection to the local cluster.
fn cluster() -> ClusterConnection {
    crate::common::cluster(&cluster_url())
}

/// The masters, as `host:port`, by the lowest slot each serves.
fn masters(conn: &mut ClusterConnection) -> BTreeMap<u16, String> {
    let ranges: Vec<(u16, u16, (String, u16))> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query::<Vec<Vec<redis::Value>>>(conn)
        .expect("CLUSTER SLOTS")
        .into_iter()
        .map(|range| {
            let node: Vec<redis::Value> = redis::from_redis_value_ref(&range[2]).expect("node");
            (
                redis::from_redis_value_ref(&range[0]).expect("first slot"),
                redis::from_redis_value_ref(&range[1]).expect("last slot"),
                (
                    redis::from_redis_value_ref(&node[0]).expect("host"),
                    redis::from_redis_value_ref(&node[1]).expect("port"),
                ),
            )
        })
        .collect();
    let mut lowest: BTreeMap<String, u16> = BTreeMap::new();
    for (first, _, (host, port)) in ranges {
        let slot = lowest.entry(format!("{host}:{port}")).or_insert(first);
        *slot = (*slot).min(first);
    }
    lowest
        .into_iter()
        .map(|(node, slot)| (slot, node))
        .collect()
}

/// The master serving `key`.
fn master_of(conn: &mut ClusterConnection, key: &str) -> String {
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(conn)
        .expect("KEYSLOT");
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query(conn)
        .expect("CLUSTER SLOTS");
    for range in ranges {
        let first: u16 = redis::from_redis_value_ref(&range[0]).expect("first slot");
        let last: u16 = redis::from_redis_value_ref(&range[1]).expect("last slot");
        if (first..=last).contains(&slot) {
            let node: Vec<redis::Value> = redis::from_redis_value_ref(&range[2]).expect("node");
            let host: String = redis::from_redis_value_ref(&node[0]).expect("host");
            let port: u16 = redis::from_redis_value_ref(&node[1]).expect("port");
            return format!("{host}:{port}");
        }
    }
    panic!("no master serves slot {slot}");
}

/// Keys matching `pattern` on every master.
fn keys_everywhere(conn: &mut ClusterConnection, pattern: &str) -> HashSet<String> {
    let mut keys = HashSet::new();
    for node in masters(conn).into_values() {
        let mut master = redis::Client::open(format!("redis://{node}"))
            .expect("node URL")
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("a master answers");
        let found: Vec<String> = master
            .scan_match::<_, String>(pattern)
            .expect("SCAN")
            .collect::<Result<_, _>>()
            .expect("SCAN");
        keys.extend(found);
    }
    keys
}

/// Ids whose replica hash differs from the source (first few), or a count that does not
/// match; empty when the replica equals the source.
fn differences(source: &Source, conn: &mut ClusterConnection, prefix: &str) -> Vec<String> {
    let rows = source.rows();
    let mut ids: Vec<&String> = rows.keys().collect();
    ids.sort();
    let mut wrong: Vec<String> = ids
        .iter()
        .filter(|id| {
            let (version, name) = &rows[**id];
            let (got_version, got_name): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(format!("{prefix}athlete:{id}"))
                .arg("_version")
                .arg("display_name")
                .query(conn)
                .expect("HMGET");
            got_version.as_deref() != Some(&version.to_string())
                || got_name.as_deref() != Some(name)
        })
        .map(|id| (*id).clone())
        .take(5)
        .collect();
    let keys = keys_everywhere(conn, &format!("{prefix}athlete:*"));
    if keys.len() != rows.len() {
        wrong.push(format!(
            "{} replica keys for {} source rows",
            keys.len(),
            rows.len()
        ));
    }
    wrong
}

/// Removes what a passing test wrote under `stream` on every master.
fn cleanup_cluster(conn: &mut ClusterConnection, stream: &str) {
    for pattern in [format!("{stream}*"), format!("ecst:*{stream}*")] {
        for key in keys_everywhere(conn, &pattern) {
            let _: i64 = conn.unlink(&key).expect("UNLINK");
        }
    }
}

fn reconcile(pipeline: &std::path::Path, extra: &[&str]) -> (i32, Value) {
    let mut cmd = ecst();
    cmd.arg("reconcile").arg(pipeline).arg("--json").args(extra);
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    let code = out.status.code().expect("exit code");
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr:\n{}", stderr_of(&out)));
    (code, report)
}

fn counts(report: &Value, sink: &str) -> [u64; 5] {
    let s = &report["sinks"][sink];
    ["missing", "stale", "mismatched", "orphans", "repaired"].map(|k| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("{sink}.{k} in {report}"))
    })
}

/// A pipeline reading `stream` on the cluster, bootstrapped from `source`, with a
/// `redis_hash` replica on the cluster too.
fn cluster_pipeline(source: &Source, stream: &str, prefix: &str) -> std::path::PathBuf {
    let query = format!(
        "SELECT id, version, jsonb_build_object('displayName', display_name, 'status', status) FROM {} WHERE ($1::text IS NULL OR id > $1) ORDER BY id LIMIT $2",
        source.table
    );
    let yaml = format!(
        r#"name: cluster-reconcile
source:
  redis: "{cluster}"
  stream: "{stream}"
  group: replica
  block: 100ms
stages:
  decode: {{ type: decode }}
  athlete:
    type: project
    input: decode
    fields: {{ display_name: payload.displayName, status: payload.status }}
  cache:
    type: redis_hash
    input: athlete
    key: "{prefix}athlete:{{aggregateId}}"
    tombstone_prefix: "{prefix}tombstone:"
bootstrap:
  postgres: "{db}"
  query: "{query}"
  page_size: 300
"#,
        cluster = cluster_url(),
        db = database_url()
    );
    pipeline_file("cluster-reconcile", &yaml)
}

/// The first id `zz-<label>-<n>` whose replica key lives on `master`.
fn id_on(conn: &mut ClusterConnection, prefix: &str, label: &str, master: &str) -> String {
    (0..1000)
        .map(|n| format!("zz-{label}-{n}"))
        .find(|id| master_of(conn, &format!("{prefix}athlete:{id}")) == master)
        .unwrap_or_else(|| panic!("no id of the replica on {master}"))
}

#[test]
fn cluster_reconcile_finds_drift_on_every_master_and_repair_fixes_it() {
    let mut conn = cluster();
    let source = Source::create("creconcile", 1_000);
    let stream = unique("cluster-reconcile");
    let prefix = format!("{stream}:");
    let pipeline = cluster_pipeline(&source, &stream, &prefix);
    // A new group bootstraps the replica, then the drain ends.
    drain(&pipeline);
    let (code, report) = reconcile(&pipeline, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["source_rows"], 1_000);
    assert_eq!(counts(&report, "cache"), [0; 5]);
    assert!(differences(&source, &mut conn, &prefix).is_empty());

    // Drift, by hand: a deleted hash, a stale version, a corrupted field, and an orphan on
    // the master listed last.
    let key = |id: &str| format!("{prefix}athlete:{id}");
    let last_master = masters(&mut conn).into_values().last().expect("a master");
    let orphan = id_on(&mut conn, &prefix, "orphan", &last_master);
    let _: () = conn.del(key("a000010")).expect("DEL");
    let _: () = conn.hset(key("a000020"), "_version", 1).expect("HSET");
    let _: () = conn
        .hset(key("a000030"), "display_name", "corrupted")
        .expect("HSET");
    let _: () = conn
        .hset_multiple(
            key(&orphan),
            &[("_version", "4"), ("display_name", "ghost")],
        )
        .expect("HSET");
    let drifted: HashSet<String> = ["a000010", "a000020", "a000030", orphan.as_str()]
        .iter()
        .map(|id| master_of(&mut conn, &key(id)))
        .collect();
    assert!(drifted.len() > 1, "drift on one master only: {drifted:?}");

    let (code, report) = reconcile(&pipeline, &[]);
    assert_eq!(code, 1, "drift must fail the exit code: {report}");
    assert_eq!(counts(&report, "cache"), [1, 1, 1, 1, 0], "{report}");
    assert_eq!(
        report["sinks"]["cache"]["examples"]["mismatched"][0],
        Value::String(format!("{} (display_name)", key("a000030")))
    );
    assert_eq!(
        report["sinks"]["cache"]["examples"]["orphans"][0],
        Value::String(format!("{} (version 4)", key(&orphan)))
    );

    let (code, report) = reconcile(&pipeline, &["--repair"]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(counts(&report, "cache")[4], 4, "{report}");

    let (code, report) = reconcile(&pipeline, &[]);
    assert_eq!(code, 0, "after --repair: {report}");
    assert_eq!(counts(&report, "cache"), [0; 5]);
    let wrong = differences(&source, &mut conn, &prefix);
    assert!(wrong.is_empty(), "{wrong:?}");
    // The tombstone shares its hash's slot: the key wrapped in a hash tag.
    let buried: Option<String> = conn
        .get(format!("{prefix}tombstone:{{{}}}", key(&orphan)))
        .expect("GET");
    assert_eq!(
        buried.as_deref(),
        Some("4"),
        "an evicted orphan leaves a tombstone at its version"
    );

    source.drop();
    cleanup_cluster(&mut conn, &stream);
}

#[test]
fn cluster_bootstrap_sweep_removes_orphans_on_every_master() {
    let mut conn = cluster();
    let source = Source::create("csweep", 200);
    let stream = unique("cluster-sweep");
    let prefix = format!("{stream}:");
    let pipeline = cluster_pipeline(&source, &stream, &prefix);
    let key = |id: &str| format!("{prefix}athlete:{id}");
    // Rows the source does not have (their deletions were missed), one on each master.
    let nodes: Vec<String> = masters(&mut conn).into_values().collect();
    assert!(nodes.len() > 1, "{nodes:?}");
    let orphans: Vec<String> = nodes
        .iter()
        .map(|node| id_on(&mut conn, &prefix, "ghost", node))
        .collect();
    for id in &orphans {
        let _: () = conn
            .hset_multiple(key(id), &[("_version", "7"), ("display_name", "ghost")])
            .expect("HSET");
    }

    // A new group bootstraps: its sweep removes them.
    let out = drain(&pipeline);
    let log = stderr_of(&out);
    assert!(
        log.contains("Removed replica rows the source no longer has"),
        "{log}"
    );
    let wrong = differences(&source, &mut conn, &prefix);
    assert!(wrong.is_empty(), "{wrong:?}");
    for id in &orphans {
        let buried: Option<String> = conn
            .get(format!("{prefix}tombstone:{{{}}}", key(id)))
            .expect("GET");
        assert_eq!(buried.as_deref(), Some("7"), "{id} buried at its version");
    }
    let (code, report) = reconcile(&pipeline, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(counts(&report, "cache"), [0; 5]);

    source.drop();
    cleanup_cluster(&mut conn, &stream);
}

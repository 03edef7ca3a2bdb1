//! One stream, several replicas (Redis and Postgres), acked only when all committed.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

/// A stream, a key prefix and a table named after it, for tests that fan out.
pub(crate) struct Fanout {
    pub(crate) stream: String,
    pub(crate) prefix: String,
    pub(crate) table: String,
}

impl Fanout {
    pub(crate) fn new(label: &str) -> Fanout {
        let stream = unique(label);
        let table = format!(
            "e2e_{}",
            stream.replace([':', '-'], "_").trim_start_matches("e2e_")
        );
        Fanout {
            prefix: format!("{stream}:"),
            table: table.chars().take(50).collect(),
            stream,
        }
    }

    fn yaml(&self, database_url: &str, source_extra: &str) -> String {
        let (stream, prefix, table) = (&self.stream, &self.prefix, &self.table);
        format!(
            r#"name: fanout
source:
  stream: "{stream}"
  group: replica
  block: 100ms
  claim_every: 200ms
{source_extra}
stages:
  decode: {{ type: decode }}
  latest: {{ type: version_filter, input: decode }}
  deletes: {{ type: tombstone, input: latest, mode: delete, keep_for: 1h }}
  card:
    type: project
    input: deletes
    fields: {{ display_name: payload.displayName, status: payload.status }}
  row:
    type: project
    input: deletes
    fields: {{ display_name: payload.displayName, status: payload.status, points: payload.points }}
  active:
    type: project
    input: deletes
    where: 'payload.status == "active"'
    unmatched: delete
    fields: {{ display_name: payload.displayName }}
  cache:
    type: redis_hash
    input: card
    key: "{prefix}athlete:{{aggregateId}}"
  table:
    type: postgres
    input: row
    url: "{database_url}"
    table: {table}
    key: athlete_id
    create: true
    timeout: 2s
    columns: {{ display_name: text, status: text, points: bigint }}
  active_cache:
    type: redis_hash
    input: active
    key: "{prefix}active:{{aggregateId}}"
"#
        )
    }

    fn row(&self, pg: &postgres_client::Client, id: &str) -> Option<(i64, String, String)> {
        pg.query(
            &format!(
                "SELECT source_version, display_name, status FROM {} WHERE athlete_id = $1",
                self.table
            ),
            &[&id],
        )
        .first()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
    }

    /// Rows in the table; 0 until the worker has created it.
    fn count(&self, pg: &postgres_client::Client) -> i64 {
        pg.try_query(&format!("SELECT count(*) FROM {}", self.table))
            .map(|rows| rows[0].get(0))
            .unwrap_or(0)
    }

    pub(crate) fn finish(&self, conn: &mut redis::Connection, pg: &postgres_client::Client) {
        pg.execute(&format!(
            "DROP TABLE IF EXISTS {t}; DROP TABLE IF EXISTS {t}_tombstones",
            t = self.table
        ));
        cleanup(conn, &self.stream);
    }
}

fn athlete(id: &str, version: u64, status: &str) -> Value {
    json!({"aggregateType": "athlete", "aggregateId": id, "aggregateVersion": version,
           "occurredAt": "2026-11-24T10:00:00Z",
           "payload": {"displayName": format!("{id} v{version}"), "status": status, "points": version * 10}})
}

#[test]
fn one_stream_feeds_a_cache_a_table_and_a_filtered_view() {
    let mut conn = redis();
    let pg = postgres();
    let f = Fanout::new("fanout");
    publish(
        &mut conn,
        &f.stream,
        &[
            athlete("a", 1, "active"),
            athlete("a", 3, "retired"),
            athlete("a", 2, "active"),
            athlete("a", 3, "retired"),
            athlete("b", 1, "active"),
            athlete("c", 1, "active"),
            delete("c", 2),
            athlete("c", 1, "active"),
        ],
    );
    drain(&pipeline_file("fanout", &f.yaml(&database_url(), "")));

    let card = hash(&mut conn, &format!("{}athlete:a", f.prefix));
    assert_eq!(card.get("status").map(String::as_str), Some("retired"));
    assert_eq!(f.row(&pg, "a"), Some((3, "a v3".into(), "retired".into())));
    assert_eq!(f.row(&pg, "b"), Some((1, "b v1".into(), "active".into())));
    assert_eq!(f.row(&pg, "c"), None, "deleted at version 2");
    assert!(hash(&mut conn, &format!("{}athlete:c", f.prefix)).is_empty());
    // The view of active athletes: a retired, so it left; b stays.
    assert!(
        hash(&mut conn, &format!("{}active:a", f.prefix)).is_empty(),
        "a retired athlete left the active view"
    );
    assert_eq!(
        hash(&mut conn, &format!("{}active:b", f.prefix))
            .get("display_name")
            .map(String::as_str),
        Some("b v1")
    );
    assert_eq!(group_pending(&mut conn, &f.stream, "replica"), 0);
    f.finish(&mut conn, &pg);
}

#[test]
fn postgres_cut_mid_stream_acks_nothing_past_it_and_both_replicas_converge() {
    let mut conn = redis();
    let pg = postgres();
    let f = Fanout::new("pgcut");
    let proxy = Proxy::start("127.0.0.1:5432");
    let url = database_url().replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port), 1);
    assert_ne!(
        url,
        database_url(),
        "DATABASE_URL must point at 127.0.0.1:5432 for the proxy"
    );
    let worker = Worker::start(
        &pipeline_file("pgcut", &f.yaml(&url, "  batch_size: 50")),
        &[],
    );

    let first: Vec<Value> = (0..200)
        .map(|i| athlete(&format!("p{i}"), 1, "active"))
        .collect();
    publish(&mut conn, &f.stream, &first);
    wait_until(
        Duration::from_secs(60),
        "the first events in Postgres",
        || f.count(&pg) == 200,
    );
    wait_until(Duration::from_secs(30), "the first events acked", || {
        group_pending(&mut conn, &f.stream, "replica") == 0
    });

    proxy.cut();
    let second: Vec<Value> = (0..200)
        .map(|i| athlete(&format!("p{i}"), 2, "retired"))
        .collect();
    publish(&mut conn, &f.stream, &second);
    wait_until(Duration::from_secs(60), "the worker to hit the cut", || {
        worker
            .log()
            .contains("Sink failed to apply a batch; nothing acked, retrying.")
    });
    // Redis took its share, but nothing past the failure is acked while Postgres is away.
    wait_until(
        Duration::from_secs(30),
        "the entries read past the cut",
        || entries_read(&mut conn, &f.stream, "replica") > 200,
    );
    let (pending, read) = pending_and_read(&mut conn, &f.stream, "replica");
    assert!(
        pending > 0,
        "entries read while Postgres is cut must stay pending"
    );
    assert_eq!(
        pending,
        read - 200,
        "only the entries past the cut are pending"
    );
    assert!(f.row(&pg, "p0").is_some_and(|r| r.0 == 1));

    proxy.restore();
    wait_until(Duration::from_secs(60), "Postgres to catch up", || {
        pg.query(
            &format!("SELECT count(*) FROM {} WHERE source_version = 2", f.table),
            &[],
        )[0]
        .get::<_, i64>(0)
            == 200
    });
    wait_until(Duration::from_secs(30), "everything acked", || {
        group_pending(&mut conn, &f.stream, "replica") == 0
    });
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("Sink recovered; batch committed."), "{log}");
    for i in 0..200 {
        let id = format!("p{i}");
        assert_eq!(f.row(&pg, &id).map(|r| r.2), Some("retired".to_string()));
        assert_eq!(
            hash(&mut conn, &format!("{}athlete:{id}", f.prefix))
                .get("_version")
                .map(String::as_str),
            Some("2")
        );
        assert!(hash(&mut conn, &format!("{}active:{id}", f.prefix)).is_empty());
    }
    f.finish(&mut conn, &pg);
}

/// The bound the README documents for a worker whose sink is down: reading stops at
/// `in_flight` batches, so memory stays flat however long the stream grows.
const RSS_BOUND_MIB: f64 = 64.0;

#[test]
fn a_failing_sink_stops_the_reader_and_memory_stays_bounded() {
    let mut conn = redis();
    let pg = postgres();
    let f = Fanout::new("backpressure");
    let proxy = Proxy::start("127.0.0.1:5432");
    let url = database_url().replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port), 1);
    // Create the table first so the worker starts cleanly, then cut the link.
    drain(&pipeline_file("backpressure-init", &f.yaml(&url, "")));
    proxy.cut();
    let worker = Worker::start(
        &pipeline_file(
            "backpressure",
            &f.yaml(&url, "  batch_size: 100\n  in_flight: 2"),
        ),
        &[],
    );
    let events: Vec<Value> = (0..30_000)
        .map(|i| athlete(&format!("m{}", i % 5000), 1 + i / 5000, "active"))
        .collect();
    publish(&mut conn, &f.stream, &events);
    wait_until(Duration::from_secs(60), "several retries", || {
        worker.log().matches("Sink failed to apply a batch").count() >= 4
    });
    let read = entries_read(&mut conn, &f.stream, "replica");
    assert!(
        read <= 200,
        "read {read} entries with the sink down; in_flight 2 x batch_size 100 allows 200"
    );
    let rss = rss_mib(worker.child.id());
    assert!(
        rss > 0.0 && rss < RSS_BOUND_MIB,
        "worker RSS {rss:.1} MiB with the sink down (bound {RSS_BOUND_MIB} MiB)"
    );
    proxy.restore();
    wait_until(Duration::from_secs(120), "the backlog to drain", || {
        group_pending(&mut conn, &f.stream, "replica") == 0
            && entries_read(&mut conn, &f.stream, "replica") == 30_000
    });
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(f.count(&pg), 5000);
    assert_eq!(
        pg.query(&format!("SELECT min(source_version) FROM {}", f.table), &[])[0]
            .get::<_, Option<i64>>(0),
        Some(6)
    );
    f.finish(&mut conn, &pg);
}

#[test]
fn two_workers_writing_one_table_agree() {
    let mut conn = redis();
    let pg = postgres();
    let f = Fanout::new("pgshared");
    let mut events = Vec::new();
    for v in 1..=10u64 {
        for a in 0..200 {
            events.push(athlete(
                &format!("w{a}"),
                v,
                if v % 2 == 0 { "active" } else { "retired" },
            ));
        }
    }
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    events.shuffle(&mut rand::rngs::StdRng::seed_from_u64(5));
    publish(&mut conn, &f.stream, &events);
    let file = pipeline_file("pgshared", &f.yaml(&database_url(), "  batch_size: 40"));
    let spawn = |name: &str| {
        let mut cmd = ecst();
        cmd.arg("run")
            .arg(&file)
            .arg("--drain")
            .arg("--consumer")
            .arg(name);
        std::thread::spawn(move || run_with_deadline(cmd, Duration::from_secs(120)))
    };
    let (a, b) = (spawn("one"), spawn("two"));
    for out in [a.join().expect("one"), b.join().expect("two")] {
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    assert_eq!(f.count(&pg), 200);
    let stale: i64 = pg.query(
        &format!(
            "SELECT count(*) FROM {} WHERE source_version <> 10 OR status <> 'active'",
            f.table
        ),
        &[],
    )[0]
    .get(0);
    assert_eq!(stale, 0);
    f.finish(&mut conn, &pg);
}

#[test]
fn the_seed_shape_replicates_into_postgres() {
    let mut conn = redis();
    let pg = postgres();
    let stream = unique("seedpg");
    let table = format!("e2e_seed_{}", std::process::id());
    pg.execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_tombstones"
    ));
    for (v, tier) in [(0, "premium"), (2, "platinum"), (1, "gold")] {
        let body = json!({"event_id": format!("evt-{v}"), "event_type": "CUSTOMER_UPDATED", "customer_id": "C-001",
            "payload": {"customer_id": "C-001", "name": "Alice Johnson", "email": "alice@example.com", "tier": tier, "loyalty_points": v * 100},
            "timestamp": "2024-05-01T12:00:00.123456", "version": v});
        redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("data")
            .arg(body.to_string())
            .query::<String>(&mut conn)
            .expect("XADD");
    }
    let yaml = format!(
        r#"name: orders-customers
source: {{ stream: "{stream}", group: order-service, block: 100ms }}
stages:
  decode:
    type: decode
    field: data
    envelope: {{ aggregate_id: customer_id, aggregate_version: version, occurred_at: timestamp, deleted: is_deleted, event_id: event_id }}
  replica:
    type: postgres
    input: decode
    url: "{}"
    table: {table}
    key: customer_id
    create: true
    columns: {{ name: text, email: text, tier: text, loyalty_points: integer }}
"#,
        database_url()
    );
    drain(&pipeline_file("seedpg", &yaml));
    let rows = pg.query(&format!("SELECT tier, loyalty_points, source_version, source_updated_at IS NOT NULL FROM {table}"), &[]);
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].get::<_, String>(0),
            rows[0].get::<_, i32>(1),
            rows[0].get::<_, i64>(2),
            rows[0].get::<_, bool>(3)
        ),
        ("platinum".to_string(), 200, 2, true)
    );
    pg.execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_tombstones"
    ));
    cleanup(&mut conn, &stream);
}

#[test]
fn entries_held_through_a_long_sink_outage_are_not_claimed_into_the_dead_letters() {
    let mut conn = redis();
    let pg = postgres();
    let f = Fanout::new("outage-claims");
    let proxy = Proxy::start("127.0.0.1:5432");
    let url = database_url().replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port), 1);
    // Claims are due after 300 ms idle and 3 deliveries make a dead letter: an outage of a
    // few seconds is many times claim_idle.
    let pipeline = pipeline_file(
        "outage-claims",
        &f.yaml(
            &url,
            "  batch_size: 20\n  in_flight: 16\n  claim_idle: 300ms\n  max_deliveries: 3",
        ),
    );
    let first = Worker::start(&pipeline, &["--consumer", "first"]);
    let second = Worker::start(&pipeline, &["--consumer", "second"]);
    wait_until(Duration::from_secs(60), "the table to exist", || {
        pg.try_query(&format!("SELECT 1 FROM {}", f.table)).is_ok()
    });

    proxy.cut();
    let events: Vec<Value> = (0..100)
        .map(|i| athlete(&format!("o{i}"), 1, "active"))
        .collect();
    publish(&mut conn, &f.stream, &events);
    // A batch backs off 100, 200, 400, 800, 1600 ms: its sixth failure comes over 3 s into
    // the outage, ten times claim_idle.
    wait_until(
        Duration::from_secs(60),
        "a batch's sixth failed apply",
        || first.log().contains("attempt=6") || second.log().contains("attempt=6"),
    );
    proxy.restore();
    wait_until(Duration::from_secs(60), "every event in Postgres", || {
        f.count(&pg) == 100
    });
    wait_until(Duration::from_secs(30), "everything acked", || {
        group_pending(&mut conn, &f.stream, "replica") == 0
    });
    let dead = dead_letters(&mut conn, &format!("{}.dlq", f.stream));
    assert!(
        dead.is_empty(),
        "good entries were claimed over max_deliveries during the outage: {dead:?}"
    );
    for worker in [first, second] {
        let (status, log) = worker.terminate();
        assert!(status.success(), "{log}");
    }
    f.finish(&mut conn, &pg);
}

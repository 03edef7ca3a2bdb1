//! Orphan detection in bounded memory (`ecst_pipeline::orphans`): the keys a snapshot
//! produced are kept in Redis sets, and a Redis and a Postgres replica of several pages each
//! are swept against them.

use std::sync::Arc;
use std::time::Duration;

use ecst_operators::sinks::postgres::PostgresConfig;
use ecst_operators::sinks::redis_hash::RedisHashConfig;
use ecst_operators::stage::BuildContext;
use ecst_operators::{SecretUrl, Sink};
use ecst_pipeline::orphans::{OrphanError, SeenKeys};
use redis::Commands;

use crate::common::*;

/// Rows in each replica: more than two pages (1,000 keys) each.
const ROWS: usize = 2_500;
/// Rows the "snapshot" produced; the rest are orphans.
const SEEN: usize = 2_100;

fn id(n: usize) -> String {
    format!("a{n:06}")
}

/// The replica hashes under `prefix` (SCAN may list one twice).
fn replica_hashes(conn: &mut redis::Connection, prefix: &str) -> std::collections::HashSet<String> {
    conn.scan_match::<_, String>(format!("{prefix}athlete:*"))
        .expect("SCAN")
        .collect::<Result<_, _>>()
        .expect("SCAN")
}

#[test]
fn orphans_are_found_exactly_across_pages_of_a_redis_and_a_postgres_replica() {
    let mut conn = redis();
    let pg = postgres();
    let prefix = format!("{}:", unique("orphans"));
    let table = format!(
        "e2e_orphans_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ctx = |stage: &str| BuildContext {
        pipeline: "orphans".into(),
        stage: stage.into(),
        source_redis: SecretUrl::new(redis_url()),
        payload_reads: Default::default(),
        schemas: None,
    };
    let cache: RedisHashConfig = serde_json::from_value(serde_json::json!({
        "key": format!("{prefix}athlete:{{aggregateId}}"),
        "tombstone_prefix": format!("{prefix}tombstone:"),
    }))
    .expect("redis_hash config");
    let replica_table: PostgresConfig = serde_json::from_value(serde_json::json!({
        "url": database_url(),
        "table": table,
        "key": "athlete_id",
        "create": true,
        "columns": { "display_name": "text" },
    }))
    .expect("postgres config");
    let sinks: Vec<(String, Arc<dyn Sink>)> = runtime.block_on(async {
        let cache = cache.build(&ctx("cache")).expect("redis_hash sink");
        let table = replica_table
            .build(&ctx("table"))
            .await
            .expect("postgres sink");
        // The first connection creates the table.
        table
            .replica()
            .expect("replica")
            .scan_keys(None)
            .await
            .expect("table created");
        vec![
            ("cache".to_string(), Arc::new(cache) as Arc<dyn Sink>),
            ("table".to_string(), Arc::new(table) as Arc<dyn Sink>),
        ]
    });

    let key = |n: usize| format!("{prefix}athlete:{}", id(n));
    let mut pipe = redis::pipe();
    for n in 1..=ROWS {
        pipe.hset_multiple(key(n), &[("_version", "3"), ("display_name", "x")])
            .ignore();
    }
    let _: () = pipe.query(&mut conn).expect("HSET");
    pg.execute(&format!(
        "INSERT INTO {table} (athlete_id, source_version, display_name)
         SELECT 'a' || lpad(g::text, 6, '0'), 3, 'x' FROM generate_series(1, {ROWS}) g"
    ));

    // The pool's reaper needs the runtime.
    let pool = runtime
        .block_on(async {
            ecst_operators::redis_pool::redis_pool(
                &SecretUrl::new(redis_url()),
                2,
                Duration::from_secs(5),
            )
        })
        .expect("pool");
    let mut seen = SeenKeys::new(pool, "orphans-test", sinks.len(), Duration::from_secs(5));
    let since_ms = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        + 60_000) as i64;
    runtime.block_on(async {
        // Snapshot pages of 300 keys, the first one twice (a page applied again on retry).
        let pages: Vec<Vec<usize>> = (1..=SEEN)
            .collect::<Vec<_>>()
            .chunks(300)
            .map(<[usize]>::to_vec)
            .collect();
        for page in pages.iter().take(1).chain(&pages) {
            let cache_keys: Vec<String> = page.iter().map(|&n| key(n)).collect();
            let table_keys: Vec<String> = page.iter().map(|&n| id(n)).collect();
            seen.record(0, &cache_keys).await.expect("record");
            seen.record(1, &table_keys).await.expect("record");
        }
        // A key another sink of the pipeline writes is that sink's, not an orphan here.
        seen.record(1, &[key(ROWS)]).await.expect("record");
    });

    let found = runtime
        .block_on(seen.sweep(&sinks, false, since_ms))
        .expect("sweep");
    assert_eq!(found[0].orphans, (ROWS - SEEN - 1) as u64, "{:?}", found[0]);
    assert_eq!(found[1].orphans, (ROWS - SEEN) as u64, "{:?}", found[1]);
    assert_eq!(found[0].evicted + found[1].evicted, 0, "no repair asked");
    assert_eq!(
        found[1].examples[0],
        format!("{} (version 3)", id(SEEN + 1))
    );
    assert_eq!(found[1].examples.len(), 5);

    let found = runtime
        .block_on(seen.sweep(&sinks, true, since_ms))
        .expect("sweep");
    assert_eq!(found[0].evicted, (ROWS - SEEN - 1) as u64, "{:?}", found[0]);
    assert_eq!(found[1].evicted, (ROWS - SEEN) as u64, "{:?}", found[1]);
    let left = replica_hashes(&mut conn, &prefix);
    assert_eq!(left.len(), SEEN + 1);
    let buried: Option<String> = conn
        .get(format!("{prefix}tombstone:{}", key(SEEN + 1)))
        .expect("GET");
    assert_eq!(buried.as_deref(), Some("3"), "an evicted orphan is buried");
    let rows = pg.query(
        &format!("SELECT count(*), max(athlete_id) FROM {table}"),
        &[],
    );
    assert_eq!(rows[0].get::<_, i64>(0), SEEN as i64);
    assert_eq!(rows[0].get::<_, String>(1), id(SEEN));

    // A set lost meanwhile (a Redis restart without persistence) must not make every row an
    // orphan: the sweep refuses.
    let cache_set = seen.set_name(0).expect("set").to_string();
    let _: () = conn.del(&cache_set).expect("DEL");
    let refused = runtime.block_on(seen.sweep(&sinks, true, since_ms));
    assert!(
        matches!(refused, Err(OrphanError::Incomplete(_))),
        "{refused:?}"
    );
    assert!(!seen.is_complete());
    let left = replica_hashes(&mut conn, &prefix);
    assert_eq!(left.len(), SEEN + 1, "nothing evicted");

    let table_set = seen.set_name(1).expect("set").to_string();
    runtime.block_on(seen.discard());
    let exists: i64 = conn.exists(&table_set).expect("EXISTS");
    assert_eq!(exists, 0, "the sets are deleted at the end");

    drop(sinks);
    pg.execute(&format!("DROP TABLE {table}, {table}_tombstones"));
    cleanup(&mut conn, &prefix);
}

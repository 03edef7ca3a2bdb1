//! Tests against the real Postgres at `DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ecst_schemas::EnvelopeKeys;
use serde_json::{Value, json};
use tokio_postgres::NoTls;

use super::*;
use crate::secret::SecretUrl;

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn unique_table() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "ecst_test_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn client() -> Client {
    let (client, connection) = tokio_postgres::connect(&database_url(), NoTls)
        .await
        .expect("Postgres on DATABASE_URL");
    tokio::spawn(connection);
    client
}

fn ctx(stage: &str) -> BuildContext {
    BuildContext {
        pipeline: "test".into(),
        stage: stage.into(),
        source_redis: SecretUrl::new("redis://127.0.0.1:6379"),
        payload_reads: Default::default(),
    }
}

fn config(table: &str, create: bool) -> PostgresConfig {
    serde_json::from_value(json!({
        "url": database_url(), "table": table, "key": "athlete_id", "create": create,
        "columns": {"display_name": "text", "points": "bigint", "born": "timestamptz", "tags": "jsonb"}
    }))
    .unwrap()
}

fn record(entry: usize, id: &str, version: u64, payload: Value) -> Record {
    let mut r = Record::new(
        entry,
        EnvelopeKeys::default()
            .read(
                &json!({"aggregateId": id, "aggregateVersion": version, "payload": payload,
                          "occurredAt": "2026-11-24T10:00:00Z"}),
            )
            .unwrap(),
    );
    if let Some(Value::Object(fields)) = &r.event.payload {
        r.fields = Some(crate::Fields::Map(fields.clone()));
    }
    r
}

async fn row(client: &Client, table: &str, id: &str) -> Option<(i64, Option<String>, Option<i64>)> {
    client
        .query_opt(
            &format!(
                "SELECT source_version, display_name, points FROM {table} WHERE athlete_id = $1"
            ),
            &[&id],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

async fn drop_tables(client: &Client, table: &str) {
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_tombstones"
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn guard_keeps_the_newest_version_under_duplicates_and_reordering() {
    let table = unique_table();
    let sink = config(&table, true).build(&ctx("table")).await.unwrap();
    let report = sink
        .apply_batch(&[
            record(0, "a", 3, json!({"display_name": "three", "points": 3})),
            record(1, "a", 5, json!({"display_name": "five", "points": 5})),
            record(2, "a", 5, json!({"display_name": "five again"})),
            record(3, "b", 1, json!({"display_name": "b1", "tags": ["x"]})),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (2, 2));
    let report = sink
        .apply_batch(&[record(0, "a", 4, json!({"display_name": "four"}))])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (0, 1));
    let c = client().await;
    assert_eq!(
        row(&c, &table, "a").await,
        Some((5, Some("five".into()), Some(5)))
    );
    let updated: Option<time::OffsetDateTime> = c
        .query_one(
            &format!("SELECT source_updated_at FROM {table} WHERE athlete_id = 'a'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(updated.map(|t| t.unix_timestamp()), Some(1_795_514_400));
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn delete_then_late_update_stays_deleted() {
    let table = unique_table();
    let sink = config(&table, true).build(&ctx("table")).await.unwrap();
    sink.apply_batch(&[record(0, "a", 3, json!({"display_name": "three"}))])
        .await
        .unwrap();
    let report = sink
        .apply_batch(&[record(0, "a", 9, Value::Null)])
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    let c = client().await;
    assert_eq!(row(&c, &table, "a").await, None);
    let report = sink
        .apply_batch(&[record(0, "a", 8, json!({"display_name": "eight"}))])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (0, 1));
    assert_eq!(
        row(&c, &table, "a").await,
        None,
        "a late older update resurrected a delete"
    );
    sink.apply_batch(&[record(0, "a", 10, json!({"display_name": "ten"}))])
        .await
        .unwrap();
    assert_eq!(row(&c, &table, "a").await.map(|r| r.0), Some(10));
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn mark_keeps_the_row_flagged_at_the_tombstones_version() {
    let table = unique_table();
    let sink = config(&table, true).build(&ctx("table")).await.unwrap();
    sink.apply_batch(&[record(0, "a", 1, json!({"display_name": "one"}))])
        .await
        .unwrap();
    let mut marked = record(0, "a", 2, Value::Null);
    marked.action = Action::Mark;
    sink.apply_batch(&[marked]).await.unwrap();
    let c = client().await;
    let r = c
        .query_one(&format!("SELECT source_version, display_name, deleted_at IS NOT NULL FROM {table} WHERE athlete_id = 'a'"), &[])
        .await
        .unwrap();
    assert_eq!(
        (
            r.get::<_, i64>(0),
            r.get::<_, Option<String>>(1),
            r.get::<_, bool>(2)
        ),
        (2, Some("one".into()), true)
    );
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn values_that_do_not_fit_are_rejected_alone_and_the_rest_commits() {
    let table = unique_table();
    let sink = config(&table, true).build(&ctx("table")).await.unwrap();
    let report = sink
        .apply_batch(&[
            record(0, "a", 1, json!({"display_name": "ok", "points": "12"})),
            record(
                1,
                "b",
                1,
                json!({"display_name": "bad", "points": "twelve"}),
            ),
            record(2, "c", 1, json!({"born": "last tuesday"})),
        ])
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    assert_eq!(
        report.rejected,
        vec![
            (
                1,
                "column `points`: cannot write \"twelve\" as bigint".to_string()
            ),
            (
                2,
                "column `born`: cannot write \"last tuesday\" as timestamptz".to_string()
            ),
        ]
    );
    let c = client().await;
    assert_eq!(
        row(&c, &table, "a").await,
        Some((1, Some("ok".into()), Some(12)))
    );
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn a_constraint_the_sink_cannot_see_rejects_only_its_row() {
    let table = unique_table();
    let c = client().await;
    c.batch_execute(&format!(
        "CREATE TABLE {table} (athlete_id text PRIMARY KEY, source_version bigint NOT NULL, source_updated_at timestamptz, \
         replicated_at timestamptz NOT NULL, deleted_at timestamptz, display_name text CHECK (display_name <> 'forbidden'), \
         points bigint, born timestamptz, tags jsonb)"
    ))
    .await
    .unwrap();
    let sink = config(&table, false).build(&ctx("table")).await.unwrap();
    let report = sink
        .apply_batch(&[
            record(0, "a", 1, json!({"display_name": "fine"})),
            record(1, "b", 1, json!({"display_name": "forbidden"})),
        ])
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(report.refused.len(), 1);
    assert_eq!(report.refused[0].0, 1);
    assert!(
        report.refused[0].1.contains("check constraint"),
        "{:?}",
        report.refused
    );
    assert!(row(&c, &table, "a").await.is_some());
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn create_false_refuses_a_table_missing_a_column() {
    let table = unique_table();
    let c = client().await;
    c.batch_execute(&format!(
        "CREATE TABLE {table} (athlete_id text PRIMARY KEY, source_version bigint NOT NULL, source_updated_at timestamptz, \
         replicated_at timestamptz NOT NULL, deleted_at timestamptz, display_name text, points text, born timestamptz)"
    ))
    .await
    .unwrap();
    let err = config(&table, false)
        .build(&ctx("table"))
        .await
        .err()
        .expect("refused");
    assert!(
        err.contains("has no column `tags` (jsonb expected)"),
        "{err}"
    );
    assert!(err.contains("column `points` of public."), "{err}");
    assert!(err.contains("is text, but the sink writes bigint"), "{err}");
    drop_tables(&c, &table).await;
    let err = config(&table, false)
        .build(&ctx("table"))
        .await
        .err()
        .expect("refused");
    assert!(err.contains("does not exist"), "{err}");
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn terminated_backends_fail_one_attempt_and_the_next_succeeds() {
    let table = unique_table();
    let mut cfg = config(&table, true);
    cfg.url = SecretUrl::new(format!("{}?application_name={table}", database_url()));
    let sink = cfg.build(&ctx("table")).await.unwrap();
    sink.apply_batch(&[record(0, "a", 1, json!({"display_name": "one"}))])
        .await
        .unwrap();
    let c = client().await;
    c.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        &[&table],
    )
    .await
    .unwrap();
    let mut outcome = None;
    for _ in 0..5 {
        match sink
            .apply_batch(&[record(0, "a", 2, json!({"display_name": "two"}))])
            .await
        {
            Ok(report) => {
                outcome = Some(report);
                break;
            }
            Err(e) => assert!(matches!(e, SinkError::Unavailable { .. }), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(outcome.map(|r| r.applied), Some(1));
    assert_eq!(row(&c, &table, "a").await.map(|r| r.0), Some(2));
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn expired_tombstones_are_purged() {
    let table = unique_table();
    let mut cfg = config(&table, true);
    cfg.purge_every = crate::duration::ConfigDuration(Duration::from_millis(100));
    let sink = cfg.build(&ctx("table")).await.unwrap();
    let mut delete = record(0, "a", 2, Value::Null);
    delete.action = Action::Delete {
        keep_for: Duration::from_millis(1),
    };
    sink.apply_batch(&[delete]).await.unwrap();
    let c = client().await;
    let count = format!("SELECT count(*) FROM {table}_tombstones");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = c.query_one(&count, &[]).await.unwrap().get(0);
        if n == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tombstone never purged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(sink);
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn a_delete_and_an_older_update_in_concurrent_batches_never_resurrect() {
    let table = unique_table();
    let sink = Arc::new(config(&table, true).build(&ctx("table")).await.unwrap());
    let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    let seed: Vec<Record> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| record(i, k, 8, json!({"display_name": "eight"})))
        .collect();
    sink.apply_batch(&seed).await.unwrap();
    for round in 0..10u64 {
        let base = 10 + round * 3;
        let deletes: Vec<Record> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| record(i, k, base, Value::Null))
            .collect();
        let late: Vec<Record> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| record(i, k, base - 1, json!({"display_name": "late"})))
            .collect();
        let (a, b) = (sink.clone(), sink.clone());
        let (ra, rb) = tokio::join!(
            tokio::spawn(async move { a.apply_batch(&deletes).await.map(|r| r.applied) }),
            tokio::spawn(async move { b.apply_batch(&late).await.map(|r| r.applied) }),
        );
        ra.unwrap().unwrap();
        rb.unwrap().unwrap();
        let c = client().await;
        let alive: i64 = c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            alive, 0,
            "round {round}: late updates resurrected {alive} deleted rows"
        );
        // Bring them back at a newer version for the next round.
        let reborn: Vec<Record> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| record(i, k, base + 1, json!({"display_name": "again"})))
            .collect();
        sink.apply_batch(&reborn).await.unwrap();
    }
    drop_tables(&client().await, &table).await;
}

/// The advisory locks on `table`'s key buckets: (backend pid, bucket, granted).
async fn bucket_locks(c: &Client, table: &str) -> Vec<(i32, i64, bool)> {
    let table_key = i64::from(locks::table_key("public", table) as u32);
    c.query(
        "SELECT pid, objid::int8, granted FROM pg_locks
         WHERE locktype = 'advisory' AND objsubid = 2 AND classid::int8 = $1",
        &[&table_key],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Backends holding `table`'s own lock in shared mode.
async fn table_sharers(c: &Client, table: &str) -> usize {
    let table_key = i64::from(locks::table_key("public", table) as u32);
    c.query(
        "SELECT pid FROM pg_locks
         WHERE locktype = 'advisory' AND objsubid = 2 AND granted AND mode = 'ShareLock'
           AND classid::int8 = $1 AND objid::int8 = $2",
        &[&i64::from(locks::ECST_CLASS as u32), &table_key],
    )
    .await
    .unwrap()
    .len()
}

/// Polls `pg_locks` until `done` holds for `table`'s bucket locks, or fails after 10 s.
async fn wait_for_locks(
    c: &Client,
    table: &str,
    what: &str,
    done: impl Fn(&[(i32, i64, bool)]) -> bool,
) -> Vec<(i32, i64, bool)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let held = bucket_locks(c, table).await;
        if done(&held) {
            return held;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn batches_on_different_key_buckets_write_at_once_and_on_one_key_in_turn() {
    let table = unique_table();
    let sink = Arc::new(config(&table, true).build(&ctx("table")).await.unwrap());
    let bucket = |id: &str| i64::from(locks::bucket_of(&[Cell::Text(Some(id.into()))]));
    let a = "a".to_string();
    let b = (0..)
        .map(|i| format!("b{i}"))
        .find(|k| bucket(k) != bucket(&a))
        .unwrap();
    let name = |v: u64| json!({"display_name": format!("v{v}")});
    sink.apply_batch(&[record(0, &a, 1, name(1)), record(1, &b, 1, name(1))])
        .await
        .unwrap();

    // Holds both rows, so that each batch below stays open, its locks taken, until released.
    let blocker = client().await;
    blocker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM {table} WHERE athlete_id IN ('{a}', '{b}') FOR UPDATE"
        ))
        .await
        .unwrap();
    let write = |id: &str, version: u64| {
        let (sink, batch) = (sink.clone(), vec![record(0, id, version, name(version))]);
        tokio::spawn(async move { sink.apply_batch(&batch).await.map(|r| r.applied) })
    };
    let first = write(&a, 2);
    let second = write(&b, 2);
    let observer = client().await;
    let held = wait_for_locks(&observer, &table, "both batches' bucket locks", |held| {
        let granted = |k: i64| held.iter().find(|l| l.1 == k && l.2).map(|l| l.0);
        matches!((granted(bucket(&a)), granted(bucket(&b))), (Some(x), Some(y)) if x != y)
    })
    .await;
    assert!(
        held.iter().all(|l| l.2),
        "nothing waits on disjoint keys: {held:?}"
    );
    assert_eq!(
        table_sharers(&observer, &table).await,
        2,
        "both batches hold the table's lock, shared"
    );

    // The same key as the first batch: it waits for the first to commit.
    let third = write(&a, 3);
    let holder = held.iter().find(|l| l.1 == bucket(&a)).unwrap().0;
    wait_for_locks(&observer, &table, "the third batch to wait", |held| {
        held.iter()
            .any(|l| l.1 == bucket(&a) && !l.2 && l.0 != holder)
    })
    .await;
    assert!(!third.is_finished());

    blocker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(second.await.unwrap().unwrap(), 1);
    assert_eq!(third.await.unwrap().unwrap(), 1);
    let c = client().await;
    assert_eq!(
        row(&c, &table, &a).await.map(|r| (r.0, r.1)),
        Some((3, Some("v3".into())))
    );
    assert_eq!(row(&c, &table, &b).await.map(|r| r.0), Some(2));
    assert!(bucket_locks(&c, &table).await.is_empty());
    drop(sink);
    drop_tables(&c, &table).await;
}

fn with_option(url: &str, option: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{option}")
}

#[tokio::test]
async fn sslmode_require_replicates_over_tls() {
    let table = unique_table();
    let mut config = config(&table, true);
    config.url = SecretUrl::new(with_option(&database_url(), "sslmode=require"));
    let sink = config.build(&ctx(&table)).await.unwrap();
    let report = sink
        .apply_batch(&[record(0, "a", 1, json!({"display_name": "tls"}))])
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    let c = client().await;
    let encrypted: Vec<bool> = c
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = $1",
            &[&format!("ecst/test/{table}")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !encrypted.is_empty(),
        "the sink's connection is not in pg_stat_activity"
    );
    assert!(
        encrypted.iter().all(|ssl| *ssl),
        "a sink connection is not encrypted"
    );
    assert_eq!(row(&c, &table, "a").await.map(|r| r.0), Some(1));
    drop_tables(&c, &table).await;
}

//! Tests against the real Postgres at `DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ecst_schemas::EnvelopeKeys;
use serde_json::{Value, json};
use tokio_postgres::NoTls;

use super::*;
use crate::record::FieldNames;
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
        schemas: None,
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

/// The replica table with a CHECK the sink cannot know of: Postgres refuses a `display_name`
/// of `forbidden`.
async fn create_table_refusing_forbidden(c: &Client, table: &str) {
    c.batch_execute(&format!(
        "CREATE TABLE {table} (athlete_id text PRIMARY KEY, source_version bigint NOT NULL, source_updated_at timestamptz, \
         replicated_at timestamptz NOT NULL, deleted_at timestamptz, display_name text CHECK (display_name <> 'forbidden'), \
         points bigint, born timestamptz, tags jsonb)"
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn a_constraint_the_sink_cannot_see_rejects_only_its_row() {
    let table = unique_table();
    let c = client().await;
    create_table_refusing_forbidden(&c, &table).await;
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
    let bucket = |id: &str| i64::from(locks::bucket_of(&[values::Cell::Text(Some(id.into()))]));
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

fn typed_config(table: &str) -> PostgresConfig {
    serde_json::from_value(json!({
        "url": database_url(), "table": table, "key": "id", "create": true,
        "columns": {
            "t": "text", "b": "bigint", "i": "integer", "n": "numeric", "f": "boolean",
            "at": "timestamptz", "j": "jsonb", "u": "uuid"
        }
    }))
    .unwrap()
}

/// Every value column of `typed_config`'s table, as Postgres prints it (NULL as None).
async fn typed_row(c: &Client, table: &str, id: &str) -> Option<Vec<Option<String>>> {
    c.query_opt(
        &format!(
            "SELECT t, b::text, i::text, n::text, f::text, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), j::text, u::text \
             FROM {table} WHERE id = $1"
        ),
        &[&id],
    )
    .await
    .unwrap()
    .map(|r| (0..8).map(|i| r.get(i)).collect())
}

#[tokio::test]
async fn every_column_type_is_written_as_its_type_and_missing_values_are_null() {
    let table = unique_table();
    let sink = typed_config(&table).build(&ctx("table")).await.unwrap();
    let full = json!({
        "t": "Zoë \"quoted\"\ttab", "b": 9_007_199_254_740_993i64, "i": "-7",
        "n": "12345678901234567890.123456789", "f": true, "at": "2026-11-24T10:00:00.123456Z",
        "j": {"a": [1, "x", null]}, "u": "6F9619FF-8B86-D011-B42D-00CF4FC964FF"
    });
    let report = sink
        .apply_batch(&[
            record(0, "full", 1, full),
            record(1, "empty", 1, json!({})),
            record(
                2,
                "nulls",
                1,
                json!({"t": null, "j": null, "n": 1.5, "b": "-12"}),
            ),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (3, 0), "{report:?}");
    let c = client().await;
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        typed_row(&c, &table, "full").await,
        Some(vec![
            some("Zoë \"quoted\"\ttab"),
            some("9007199254740993"),
            some("-7"),
            some("12345678901234567890.123456789"),
            some("true"),
            some("2026-11-24 10:00:00.123456"),
            some("{\"a\": [1, \"x\", null]}"),
            some("6f9619ff-8b86-d011-b42d-00cf4fc964ff"),
        ])
    );
    assert_eq!(typed_row(&c, &table, "empty").await, Some(vec![None; 8]));
    assert_eq!(
        typed_row(&c, &table, "nulls").await,
        Some(vec![
            None,
            some("-12"),
            None,
            some("1.5"),
            None,
            None,
            None,
            None
        ])
    );
    // A newer version without the fields clears them.
    let report = sink
        .apply_batch(&[record(0, "full", 2, json!({"f": false}))])
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    assert_eq!(
        typed_row(&c, &table, "full").await,
        Some(vec![
            None,
            None,
            None,
            None,
            some("false"),
            None,
            None,
            None
        ])
    );
    drop_tables(&c, &table).await;
}

/// A record whose fields a `project` stage without `include` made.
fn fixed(entry: usize, id: &str, version: u64, names: &FieldNames, values: &[Value]) -> Record {
    let mut r = record(entry, id, version, json!({}));
    r.fields = Some(crate::Fields::Fixed {
        names: names.clone(),
        values: values
            .iter()
            .map(|v| Some(v.clone()).filter(|v| !v.is_null()))
            .collect(),
    });
    r
}

#[tokio::test]
async fn fixed_field_sets_are_read_by_their_own_names() {
    let table = unique_table();
    let sink = config(&table, true).build(&ctx("table")).await.unwrap();
    let one: FieldNames = vec!["display_name".to_string(), "points".to_string()].into();
    let other: FieldNames = vec!["points".to_string(), "tags".to_string()].into();
    let report = sink
        .apply_batch(&[
            fixed(0, "a", 1, &one, &[json!("a"), json!(1)]),
            fixed(1, "b", 1, &other, &[json!(2), json!(["t"])]),
            fixed(2, "c", 1, &one, &[Value::Null, json!(3)]),
            record(3, "d", 1, json!({"display_name": "d", "points": 4})),
            fixed(4, "e", 1, &one, &[json!("e"), json!("five")]),
        ])
        .await
        .unwrap();
    assert_eq!(report.applied, 4, "{report:?}");
    assert_eq!(
        report.rejected,
        vec![(
            4,
            "column `points`: cannot write \"five\" as bigint".to_string()
        )]
    );
    let c = client().await;
    assert_eq!(
        row(&c, &table, "a").await,
        Some((1, Some("a".into()), Some(1)))
    );
    assert_eq!(row(&c, &table, "b").await, Some((1, None, Some(2))));
    assert_eq!(row(&c, &table, "c").await, Some((1, None, Some(3))));
    assert_eq!(
        row(&c, &table, "d").await,
        Some((1, Some("d".into()), Some(4)))
    );
    let tags: Option<Value> = c
        .query_one(
            &format!("SELECT tags FROM {table} WHERE athlete_id = 'b'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tags, Some(json!(["t"])));
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn versions_beyond_bigint_are_rejected_and_the_largest_bigint_applies() {
    let table = unique_table();
    let sink = config(&table, true).build(&ctx("table")).await.unwrap();
    let largest = i64::MAX as u64;
    let report = sink
        .apply_batch(&[
            record(0, "a", largest, json!({"display_name": "max"})),
            record(1, "b", 5, json!({"display_name": "five"})),
            record(2, "b", largest + 1, json!({"display_name": "too new"})),
            record(3, "c", u64::MAX, Value::Null),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (1, 1), "{report:?}");
    assert_eq!(
        report.rejected,
        vec![
            (
                2,
                "aggregateVersion 9223372036854775808 does not fit the bigint version column"
                    .to_string()
            ),
            (
                3,
                "aggregateVersion 18446744073709551615 does not fit the bigint version column"
                    .to_string()
            ),
        ]
    );
    let c = client().await;
    assert_eq!(
        row(&c, &table, "a").await,
        Some((i64::MAX, Some("max".into()), None))
    );
    assert_eq!(row(&c, &table, "b").await, None);
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn a_batch_coalesces_each_key_to_its_newest_version_and_deletes_win_in_order() {
    let table = unique_table();
    let sink = config(&table, true).build(&ctx("table")).await.unwrap();
    let name = |s: &str| json!({ "display_name": s });
    let report = sink
        .apply_batch(&[
            record(0, "a", 3, name("a3")),
            record(1, "a", 7, name("a7")),
            record(2, "a", 5, name("a5")),
            // The same version again: the first one seen stays.
            record(3, "a", 7, name("a7 again")),
            record(4, "b", 2, name("b2")),
            record(5, "b", 4, Value::Null),
            record(6, "b", 6, name("b6")),
            record(7, "c", 2, name("c2")),
            record(8, "c", 3, Value::Null),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (3, 6), "{report:?}");
    // The older versions of a key in the batch are named, for the decision trace.
    let mut named = report.stale_entries.clone();
    named.sort_unstable();
    assert_eq!(named, [0, 2, 3, 4, 5, 7], "{report:?}");
    let c = client().await;
    assert_eq!(
        row(&c, &table, "a").await.map(|r| r.1),
        Some(Some("a7".into()))
    );
    assert_eq!(
        row(&c, &table, "b").await.map(|r| r.1),
        Some(Some("b6".into()))
    );
    assert_eq!(row(&c, &table, "c").await, None);
    let tombstones: Vec<(String, i64)> = c
        .query(
            &format!("SELECT athlete_id, source_version FROM {table}_tombstones ORDER BY 1"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(tombstones, vec![("c".to_string(), 3)]);
    // The tombstone holds against a late update, and a replayed delete is stale.
    let report = sink
        .apply_batch(&[
            record(0, "c", 2, name("late")),
            record(1, "c", 3, Value::Null),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (0, 2), "{report:?}");
    assert_eq!(row(&c, &table, "c").await, None);
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn rows_postgres_refuses_are_isolated_and_the_rest_commits() {
    let table = unique_table();
    let c = client().await;
    create_table_refusing_forbidden(&c, &table).await;
    let sink = config(&table, false).build(&ctx("table")).await.unwrap();
    sink.apply_batch(&[record(0, "old", 5, json!({"display_name": "old"}))])
        .await
        .unwrap();
    let report = sink
        .apply_batch(&[
            record(0, "a", 1, json!({"display_name": "fine"})),
            record(1, "b", 1, json!({"display_name": "forbidden"})),
            record(2, "c", 1, json!({"display_name": "nul \u{0}"})),
            record(3, "d", 1, json!({"tags": {"k": "nul \u{0}"}})),
            record(4, "old", 4, json!({"display_name": "stale"})),
            record(5, "e", 1, Value::Null),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (2, 1), "{report:?}");
    let refused: Vec<usize> = report.refused.iter().map(|r| r.0).collect();
    assert_eq!(refused, vec![1, 2, 3], "{:?}", report.refused);
    assert!(
        report.refused[0].1.contains("check constraint"),
        "{:?}",
        report.refused
    );
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert!(row(&c, &table, "a").await.is_some());
    assert_eq!(
        row(&c, &table, "old").await.map(|r| r.1),
        Some(Some("old".into()))
    );
    for refused in ["b", "c", "d"] {
        assert_eq!(row(&c, &table, refused).await, None);
    }
    // The next batch on the same connections starts clean.
    let report = sink
        .apply_batch(&[record(0, "f", 1, json!({"display_name": "next"}))])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (1, 0), "{report:?}");
    let count: i64 = c
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 3);
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn typed_and_composite_keys_coalesce_by_value() {
    let table = unique_table();
    let config: PostgresConfig = serde_json::from_value(json!({
        "url": database_url(), "table": table, "create": true,
        "key": [
            {"column": "tenant", "from": "payload.tenant", "type": "integer"},
            {"column": "id", "from": "aggregateId", "type": "uuid"}
        ],
        "columns": {"label": "text"}
    }))
    .unwrap();
    let sink = config.build(&ctx("table")).await.unwrap();
    let id = "6f9619ff-8b86-d011-b42d-00cf4fc964ff";
    let report = sink
        .apply_batch(&[
            record(0, id, 1, json!({"tenant": 1, "label": "one"})),
            record(
                1,
                &id.to_uppercase(),
                2,
                json!({"tenant": "1", "label": "two"}),
            ),
            record(2, id, 1, json!({"tenant": 2, "label": "other tenant"})),
            record(3, "not-a-uuid", 1, json!({"tenant": 1})),
            record(4, id, 1, json!({"label": "no tenant"})),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (2, 1), "{report:?}");
    let rejected: Vec<usize> = report.rejected.iter().map(|r| r.0).collect();
    assert_eq!(rejected, vec![3, 4], "{:?}", report.rejected);
    assert_eq!(
        report.rejected[1].1,
        "key column `tenant`: `payload.tenant` is missing in the event"
    );
    let c = client().await;
    let rows: Vec<(i32, String, i64, String)> = c
        .query(
            &format!("SELECT tenant, id::text, source_version, label FROM {table} ORDER BY tenant"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (1, id.to_string(), 2, "two".to_string()),
            (2, id.to_string(), 1, "other tenant".to_string())
        ]
    );
    drop_tables(&c, &table).await;
}

fn patch(entry: usize, id: &str, version: u64, base: u64, payload: Value) -> Record {
    let mut r = record(entry, id, version, payload);
    r.action = Action::Patch { base };
    r
}

/// The row's version, display_name, points and tags (jsonb as text).
async fn patched_row(
    c: &Client,
    table: &str,
    id: &str,
) -> Option<(i64, Option<String>, Option<i64>, Option<String>)> {
    c.query_opt(
        &format!(
            "SELECT source_version, display_name, points, tags::text FROM {table} WHERE athlete_id = $1"
        ),
        &[&id],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
}

#[tokio::test]
async fn patches_apply_on_their_base_in_version_order_and_leave_untouched_columns() {
    let table = unique_table();
    let sink = config(&table, true).build(&ctx("table")).await.unwrap();
    let c = client().await;
    // A full state and, in the same batch, a chain of patches on it, shuffled: the state
    // first, then the patches in version order; the one at 3 is older than the state.
    let report = sink
        .apply_batch(&[
            patch(0, "a", 6, 5, json!({"points": 6})),
            record(
                1,
                "a",
                4,
                json!({"display_name": "four", "points": 4, "tags": ["x"]}),
            ),
            patch(2, "a", 5, 4, json!({"display_name": null, "tags": ["y"]})),
            patch(3, "a", 3, 2, json!({"display_name": "three"})),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (3, 1), "{report:?}");
    assert_eq!(report.stale_entries, [3]);
    assert!(report.gaps.is_empty());
    // display_name removed at 5, tags changed at 5, points changed at 6: each column as the
    // last patch naming it left it.
    assert_eq!(
        patched_row(&c, &table, "a").await,
        Some((6, None, Some(6), Some("[\"y\"]".into())))
    );
    // A duplicate is stale.
    let report = sink
        .apply_batch(&[patch(0, "a", 6, 5, json!({"points": 60}))])
        .await
        .unwrap();
    assert_eq!(
        (report.applied, report.stale, report.stale_entries),
        (0, 1, vec![0])
    );
    // Version 7 missing: the patch on it is a gap and the row is unchanged; so is a patch
    // whose base is older than the row (its diff skips a version).
    let report = sink
        .apply_batch(&[
            patch(0, "a", 8, 7, json!({"points": 8})),
            patch(1, "a", 7, 5, json!({"points": 7})),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (0, 0));
    assert_eq!(report.gaps, [1, 0]);
    assert_eq!(
        patched_row(&c, &table, "a").await,
        Some((6, None, Some(6), Some("[\"y\"]".into())))
    );
    // The bookkeeping columns move as an upsert moves them.
    let report = sink
        .apply_batch(&[patch(0, "a", 7, 6, json!({"display_name": "seven"}))])
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    let (version, deleted, updated): (
        i64,
        Option<time::OffsetDateTime>,
        Option<time::OffsetDateTime>,
    ) = {
        let r = c
            .query_one(
                &format!("SELECT source_version, deleted_at, source_updated_at FROM {table} WHERE athlete_id = 'a'"),
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((version, deleted), (7, None));
    assert_eq!(updated.map(|t| t.unix_timestamp()), Some(1_795_514_400));
    assert_eq!(
        patched_row(&c, &table, "a").await,
        Some((7, Some("seven".into()), Some(6), Some("[\"y\"]".into())))
    );
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn patches_start_from_nothing_and_from_a_tombstone_only_on_its_version() {
    let table = unique_table();
    let sink = config(&table, true).build(&ctx("table")).await.unwrap();
    let c = client().await;
    // An absent row without a tombstone is version 0.
    let report = sink
        .apply_batch(&[
            patch(0, "n", 1, 0, json!({"display_name": "new"})),
            patch(1, "m", 2, 1, json!({"display_name": "gap"})),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.gaps.clone()), (1, vec![1]));
    assert_eq!(
        patched_row(&c, &table, "n").await,
        Some((1, Some("new".into()), None, None))
    );
    assert_eq!(patched_row(&c, &table, "m").await, None);
    // Deleted at 3: version 3 is stale, a patch on 2 is stale, one on 4 with base 3
    // re-creates the row from nothing, and one skipping the delete is a gap.
    sink.apply_batch(&[record(0, "n", 3, Value::Null)])
        .await
        .unwrap();
    let report = sink
        .apply_batch(&[patch(0, "n", 5, 2, json!({"points": 5}))])
        .await
        .unwrap();
    assert_eq!(report.gaps, [0]);
    assert_eq!(patched_row(&c, &table, "n").await, None);
    let report = sink
        .apply_batch(&[
            patch(0, "n", 3, 2, json!({"display_name": "late"})),
            patch(1, "n", 4, 3, json!({"points": 4})),
        ])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale_entries), (1, vec![0]));
    assert_eq!(
        patched_row(&c, &table, "n").await,
        Some((4, None, Some(4), None))
    );
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn a_patch_value_that_does_not_fit_is_rejected_alone() {
    let table = unique_table();
    let sink = config(&table, true).build(&ctx("table")).await.unwrap();
    let c = client().await;
    let bad = patch(1, "b", 1, 0, json!({"points": "many"}));
    assert_eq!(
        sink.check_record(&bad).unwrap_err(),
        "column `points`: cannot write \"many\" as bigint"
    );
    let report = sink
        .apply_batch(&[patch(0, "a", 1, 0, json!({"points": 1})), bad])
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].0, 1);
    assert_eq!(patched_row(&c, &table, "b").await, None);
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn a_patch_postgres_refuses_is_isolated_and_the_other_patches_apply_and_report() {
    let table = unique_table();
    let c = client().await;
    create_table_refusing_forbidden(&c, &table).await;
    let sink = config(&table, false).build(&ctx("table")).await.unwrap();
    sink.apply_batch(&[record(
        0,
        "a",
        1,
        json!({"display_name": "one", "points": 1}),
    )])
    .await
    .unwrap();
    // The refused patch fails the batch's transaction: the batch is applied record by record,
    // and the others still apply, come back stale or wait on their gap.
    let report = sink
        .apply_batch(&[
            patch(0, "a", 2, 1, json!({"points": 2})),
            patch(1, "b", 1, 0, json!({"display_name": "forbidden"})),
            patch(2, "a", 1, 0, json!({"points": 0})),
            patch(3, "a", 9, 8, json!({"points": 9})),
        ])
        .await
        .unwrap();
    assert_eq!(report.applied, 1, "{report:?}");
    assert_eq!((report.stale, report.stale_entries), (1, vec![2]));
    assert_eq!(report.gaps, [3]);
    assert_eq!(report.refused.len(), 1);
    assert_eq!(report.refused[0].0, 1);
    assert!(
        report.refused[0].1.contains("check constraint"),
        "{:?}",
        report.refused
    );
    assert_eq!(
        row(&c, &table, "a").await,
        Some((2, Some("one".into()), Some(2)))
    );
    assert_eq!(row(&c, &table, "b").await, None);
    drop_tables(&c, &table).await;
}

#[tokio::test]
async fn a_patch_on_a_marked_row_clears_the_mark() {
    let table = unique_table();
    let sink = config(&table, true).build(&ctx("table")).await.unwrap();
    let c = client().await;
    let mut mark = record(0, "a", 2, Value::Null);
    mark.action = Action::Mark;
    sink.apply_batch(&[record(0, "a", 1, json!({"display_name": "one"}))])
        .await
        .unwrap();
    sink.apply_batch(&[mark]).await.unwrap();
    let deleted_at = || async {
        c.query_one(
            &format!("SELECT deleted_at FROM {table} WHERE athlete_id = 'a'"),
            &[],
        )
        .await
        .unwrap()
        .get::<_, Option<time::OffsetDateTime>>(0)
    };
    assert!(deleted_at().await.is_some());
    let report = sink
        .apply_batch(&[patch(0, "a", 3, 2, json!({"points": 3}))])
        .await
        .unwrap();
    assert_eq!(report.applied, 1, "{report:?}");
    assert_eq!(deleted_at().await, None);
    assert_eq!(
        row(&c, &table, "a").await,
        Some((3, Some("one".into()), Some(3)))
    );
    drop_tables(&c, &table).await;
}

//! The `postgres` replica read back: compared with the source in SQL, over the same typed
//! arrays the upsert binds, so that values are compared as the column types see them.

use super::config::quote;
use super::plan::Rows;
use super::sql::{array_type, select_cast};
use super::values::Cell;
use super::{PgType, PostgresSink, STORE, classify};
use crate::error::SinkError;
use crate::record::{Action, Record};
use crate::replica::{Drift, Eviction, KeyPage, Replica, ReplicaFuture, StoredKey};

/// How long a tombstone written by reconciliation lasts.
const EVICT_TOMBSTONE: &str = "7 days";

impl PostgresSink {
    fn table_sql(&self) -> String {
        format!(
            "{}.{}",
            quote(&self.config.schema),
            quote(&self.config.table)
        )
    }

    /// Reconciliation reads keys back as text, so it needs exactly one key column.
    fn single_key(&self) -> Result<&super::config::KeyColumn, SinkError> {
        match self.layout.keys.as_slice() {
            [key] => Ok(key),
            _ => Err(SinkError::Refused {
                store: STORE,
                message: "reconciliation supports tables with a single key column".into(),
            }),
        }
    }
}

impl Replica for PostgresSink {
    fn key_of(&self, record: &Record) -> Result<String, String> {
        let [key] = self.layout.keys.as_slice() else {
            return Err("reconciliation supports tables with a single key column".into());
        };
        match record.event.lookup(&key.from) {
            Some(serde_json::Value::String(s)) if key.pg_type == PgType::Uuid => {
                uuid::Uuid::parse_str(&s)
                    .map(|u| u.to_string())
                    .map_err(|e| e.to_string())
            }
            Some(serde_json::Value::String(s)) => Ok(s),
            Some(serde_json::Value::Null) | None => Err(format!("`{}` is missing", key.from)),
            Some(other) => Ok(other.to_string()),
        }
    }

    fn compare<'a>(&'a self, records: &'a [Record]) -> ReplicaFuture<'a, Vec<Option<Drift>>> {
        Box::pin(async move {
            let key = self.single_key()?;
            let mut rows = Rows::new(
                [key.pg_type, PgType::Bigint]
                    .into_iter()
                    .chain(self.layout.values.iter().map(|v| v.1)),
            );
            for (i, record) in records.iter().enumerate() {
                if record.action != Action::Upsert {
                    continue;
                }
                let (Ok(key), Ok(values), Ok(version)) = (
                    self.layout.key_cells(record),
                    self.layout.value_cells(record),
                    i64::try_from(record.event.aggregate_version),
                ) else {
                    continue;
                };
                let version = Cell::Bigint(Some(version));
                rows.push(i, key.into_iter().chain([version]).chain(values));
            }
            let mut drifts = vec![None; records.len()];
            if rows.entries.is_empty() {
                return Ok(drifts);
            }
            let mut n = 0;
            let mut param = |t: PgType| {
                n += 1;
                format!("${n}::{}", array_type(t))
            };
            let mut params = vec![param(key.pg_type), param(PgType::Bigint)];
            params.extend(self.layout.values.iter().map(|(_, t, _)| param(*t)));
            let mut aliases = vec!["k".to_string(), "v".to_string()];
            aliases.extend((0..self.layout.values.len()).map(|i| format!("c{i}")));
            let mut same: Vec<String> = self
                .layout
                .values
                .iter()
                .enumerate()
                .map(|(i, (name, t, _))| {
                    format!(
                        "(t.{} IS NOT DISTINCT FROM e.c{i}{})",
                        quote(name),
                        select_cast(*t)
                    )
                })
                .collect();
            same.push(format!(
                "(t.{} IS NULL)",
                quote(&self.config.deleted_at_column)
            ));
            let sql = format!(
                "SELECT e.ord::int8, t.{version}, ARRAY[{same}]::bool[]
                 FROM UNNEST({params}) WITH ORDINALITY AS e({aliases}, ord)
                 LEFT JOIN {table} t ON t.{key} = e.k",
                version = quote(&self.config.version_column),
                same = same.join(", "),
                params = params.join(", "),
                aliases = aliases.join(", "),
                table = self.table_sql(),
                key = quote(&key.column),
            );
            let conn = self.connection().await?;
            let result = tokio::time::timeout(
                self.config.timeout.0,
                conn.client.query(&sql, &rows.params()),
            )
            .await
            .map_err(|_| SinkError::Unavailable {
                store: STORE,
                message: "comparing with the replica timed out".into(),
            })?
            .map_err(classify)?;
            let mut names: Vec<String> = self.layout.values.iter().map(|v| v.0.clone()).collect();
            names.push(self.config.deleted_at_column.clone());
            for row in result {
                let ord: i64 = row.get(0);
                let Some(&i) = usize::try_from(ord - 1)
                    .ok()
                    .and_then(|o| rows.entries.get(o))
                else {
                    continue;
                };
                let stored: Option<i64> = row.get(1);
                let wanted = records[i].event.aggregate_version;
                drifts[i] = match stored.map(|v| u64::try_from(v).unwrap_or(0)) {
                    None => Some(Drift::Missing),
                    Some(v) if v < wanted => Some(Drift::Stale { stored: v }),
                    Some(v) if v > wanted => None,
                    Some(_) => {
                        let same: Vec<bool> = row.get(2);
                        let fields: Vec<String> = names
                            .iter()
                            .zip(same)
                            .filter(|(_, same)| !same)
                            .map(|(name, _)| name.clone())
                            .collect();
                        (!fields.is_empty()).then_some(Drift::Mismatch { fields })
                    }
                };
            }
            Ok(drifts)
        })
    }

    fn scan_keys<'a>(&'a self, cursor: Option<String>) -> ReplicaFuture<'a, KeyPage> {
        Box::pin(async move {
            let key = self.single_key()?;
            let select = format!(
                "SELECT t.{k}::text, t.{v}, (EXTRACT(EPOCH FROM t.{r}) * 1000)::int8 FROM {table} t",
                k = quote(&key.column),
                v = quote(&self.config.version_column),
                r = quote(&self.config.replicated_at_column),
                table = self.table_sql()
            );
            let sql = match &cursor {
                None => format!(
                    "{select} WHERE $1::text IS NULL ORDER BY t.{k} LIMIT 1000",
                    k = quote(&key.column)
                ),
                Some(_) => format!(
                    "{select} WHERE t.{k} > $1::text::{ty} ORDER BY t.{k} LIMIT 1000",
                    k = quote(&key.column),
                    ty = key.pg_type.sql()
                ),
            };
            let conn = self.connection().await?;
            let rows =
                tokio::time::timeout(self.config.timeout.0, conn.client.query(&sql, &[&cursor]))
                    .await
                    .map_err(|_| SinkError::Unavailable {
                        store: STORE,
                        message: "listing the replica's keys timed out".into(),
                    })?
                    .map_err(classify)?;
            let keys: Vec<StoredKey> = rows
                .iter()
                .map(|r| StoredKey {
                    key: r.get(0),
                    version: u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                    touched_ms: r.get(2),
                })
                .collect();
            let next = (keys.len() == 1000).then(|| keys[keys.len() - 1].key.clone());
            Ok(KeyPage { keys, next })
        })
    }

    fn evict<'a>(&'a self, rows: &'a [(String, u64)], why: Eviction) -> ReplicaFuture<'a, usize> {
        Box::pin(async move {
            let key = self.single_key()?;
            if rows.is_empty() {
                return Ok(0);
            }
            let (names, versions): (Vec<&str>, Vec<i64>) = rows
                .iter()
                .filter_map(|(name, v)| Some((name.as_str(), i64::try_from(*v).ok()?)))
                .unzip();
            let k = quote(&key.column);
            // Only while the row is still at the version seen: a newer one stays.
            let unchanged = format!(
                "DELETE FROM {table} t USING UNNEST($1::text[], $2::int8[]) AS e(k, v)
                 WHERE t.{k} = e.k::{ty} AND t.{v} = e.v
                 RETURNING t.{k} AS k, t.{v} AS v",
                table = self.table_sql(),
                ty = key.pg_type.sql(),
                v = quote(&self.config.version_column),
            );
            let tombstones = format!(
                "{}.{}",
                quote(&self.config.schema),
                quote(&self.config.tombstone_table())
            );
            let sql = match why {
                Eviction::Rewrite => {
                    format!("WITH unchanged AS ({unchanged}) SELECT count(*) FROM unchanged")
                }
                Eviction::Orphan => format!(
                    "WITH unchanged AS ({unchanged}),
                          buried AS (
                            INSERT INTO {tombstones} AS b ({k}, source_version, deleted_at, expires_at)
                            SELECT k, v, now(), now() + interval '{EVICT_TOMBSTONE}' FROM unchanged
                            ON CONFLICT ({k}) DO UPDATE
                              SET source_version = GREATEST(b.source_version, EXCLUDED.source_version),
                                  expires_at = EXCLUDED.expires_at
                            )
                     SELECT count(*) FROM unchanged"
                ),
            };
            let mut conn = self.connection().await?;
            // Marked broken until the transaction answers: a timed-out one leaves the pool.
            conn.broken = true;
            let super::PgConnection {
                client, lock_table, ..
            } = &mut *conn;
            let removed = tokio::time::timeout(self.config.timeout.0, async {
                let tx = client.transaction().await?;
                // The table's lock, exclusively: every batch holds it shared, so the DELETE's
                // snapshot is taken after every batch in flight committed, and it compares
                // with the newest version a live worker wrote.
                tx.execute(&*lock_table, &[&self.lock_key]).await?;
                let row = tx.query_one(&sql, &[&names, &versions]).await?;
                tx.commit().await?;
                row.try_get::<_, i64>(0)
            })
            .await
            .map_err(|_| SinkError::Unavailable {
                store: STORE,
                message: "evicting rows timed out".into(),
            })?
            .map_err(classify)?;
            conn.broken = false;
            Ok(usize::try_from(removed).unwrap_or(0))
        })
    }
}

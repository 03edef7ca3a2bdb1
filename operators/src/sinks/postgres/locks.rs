//! The advisory locks a batch takes, so that a late update never slips past an uncommitted
//! delete of the same key, while batches on different keys of one table write at once.
//!
//! Without them, a late update racing a delete in another transaction reads "no tombstone"
//! from its snapshot, waits on the row the delete removes, then inserts it again:
//! resurrection. So every batch's transaction first takes, in this order:
//!
//! 1. the table's lock `(1701016436, table)` in *shared* mode. Only a reconciliation repair
//!    takes it exclusively (and so waits for, then holds off, every batch); ecst before key
//!    buckets took it exclusively for every batch, so during a rolling upgrade old and new
//!    workers still exclude each other;
//! 2. the exclusive lock `(table, bucket)` of every key bucket the batch writes, in ascending
//!    order (two batches never wait on each other in a cycle), in one statement.
//!
//! The statements that follow snapshot after the locks are granted, so each sees every batch
//! that wrote its keys' buckets and committed before it. `table` is FNV-1a of `schema.table`;
//! a key's bucket is `fnv1a_32(key text) mod 1024`, the partition hash of
//! [`ecst_schemas::partition`]: with the key filled from `aggregateId` and 2^k partitions
//! (k ≤ 10), keys of different partitions never share a bucket, so workers that own different
//! partitions never wait on each other. A batch holds at most 1024 bucket locks per table.

use ecst_schemas::partition::fnv1a_32;

use super::values::Cell;

/// The first key of the table lock: "ecst" in ASCII, apart from applications' own locks.
pub(super) const ECST_CLASS: i32 = 1_701_016_436;

/// How many buckets a table's keys are spread over.
pub(super) const KEY_BUCKETS: u32 = 1024;

/// Separates the columns of a composite key in its hashed text.
const KEY_SEPARATOR: u8 = 0x1f;

/// The table's key in its locks: FNV-1a of `schema.table`, as a signed 32-bit integer.
pub(super) fn table_key(schema: &str, table: &str) -> i32 {
    i32::from_ne_bytes(fnv1a_32(format!("{schema}.{table}").as_bytes()).to_ne_bytes())
}

/// The bucket (`0..KEY_BUCKETS`) of a key, given its key columns' cells.
pub(super) fn bucket_of(key: &[Cell]) -> i32 {
    let hash = match key {
        // The common key, hashed in place.
        [Cell::Text(Some(s))] => fnv1a_32(s.as_bytes()),
        _ => {
            let mut text = Vec::new();
            for (i, cell) in key.iter().enumerate() {
                if i > 0 {
                    text.push(KEY_SEPARATOR);
                }
                match cell {
                    Cell::Text(Some(s)) => text.extend_from_slice(s.as_bytes()),
                    Cell::Bigint(Some(n)) => text.extend_from_slice(n.to_string().as_bytes()),
                    Cell::Integer(Some(n)) => text.extend_from_slice(n.to_string().as_bytes()),
                    // Lowercase and hyphenated, as Postgres prints a uuid.
                    Cell::Uuid(Some(u)) => text.extend_from_slice(u.to_string().as_bytes()),
                    // Key columns are never null and never of another type (the config
                    // refuses it); any stable text would do.
                    other => text.extend_from_slice(format!("{other:?}").as_bytes()),
                }
            }
            fnv1a_32(&text)
        }
    };
    // Below 1024, so the cast is exact.
    (hash % KEY_BUCKETS) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecst_schemas::partition::partition_of;

    #[test]
    fn the_table_key_is_fnv1a_of_schema_dot_table() {
        // fnv1a_32("public.athlete_replica"): pg_locks shows classid 3606090974.
        assert_eq!(table_key("public", "athlete_replica") as u32, 3_606_090_974);
        assert_ne!(
            table_key("public", "athlete_replica"),
            table_key("other", "athlete_replica")
        );
    }

    #[test]
    fn a_key_hashes_as_its_text() {
        let text = |s: &str| Cell::Text(Some(s.to_string().into()));
        // FNV-1a 32 of "athlete-1" is 0x0d22bb12 (220379922); mod 1024 = 786.
        assert_eq!(fnv1a_32(b"athlete-1"), 0x0d22_bb12);
        assert_eq!(bucket_of(&[text("athlete-1")]), 786);
        assert_eq!(
            bucket_of(&[Cell::Bigint(Some(42))]),
            bucket_of(&[text("42")])
        );
        assert_eq!(
            bucket_of(&[Cell::Integer(Some(-7))]),
            bucket_of(&[text("-7")])
        );
        let id = "6F9619FF-8B86-D011-B42D-00CF4FC964FF";
        assert_eq!(
            bucket_of(&[Cell::Uuid(Some(uuid::Uuid::parse_str(id).unwrap()))]),
            bucket_of(&[text(&id.to_lowercase())])
        );
        let composite = [text("a"), Cell::Bigint(Some(1))];
        assert_eq!(
            bucket_of(&composite),
            (fnv1a_32(b"a\x1f1") % KEY_BUCKETS) as i32
        );
        assert!((0..1024).contains(&bucket_of(&composite)));
    }

    #[test]
    fn keys_of_different_partitions_never_share_a_bucket() {
        for partitions in [2, 8, 64, 1024] {
            let mut owner = vec![None; KEY_BUCKETS as usize];
            for i in 0..20_000 {
                let id = format!("ath-{i}");
                let bucket = bucket_of(&[Cell::Text(Some(id.as_str().into()))]) as usize;
                let partition = partition_of(&id, partitions);
                assert_eq!(
                    *owner[bucket].get_or_insert(partition),
                    partition,
                    "{partitions} partitions: bucket {bucket} holds keys of two partitions"
                );
            }
        }
    }
}

//! Reading a replica back, for reconciliation against its source.

use std::future::Future;
use std::pin::Pin;

use crate::error::SinkError;
use crate::record::Record;

/// A boxed future of the replica calls.
pub type ReplicaFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SinkError>> + Send + 'a>>;

/// How a replica row differs from the source's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// The source has it, the replica does not.
    Missing,
    /// The replica holds an older version.
    Stale {
        /// The replica's version.
        stored: u64,
    },
    /// Same version, different content.
    Mismatch {
        /// The fields (columns) that differ.
        fields: Vec<String>,
    },
}

/// A key a replica holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// The key.
    pub key: String,
    /// Its stored version.
    pub version: u64,
    /// When it was last written (Postgres `replicated_at`) or, where the store keeps no such
    /// time, the `occurredAt` it was written with; Unix ms.
    pub touched_ms: Option<i64>,
}

/// One page of the keys a replica holds, with their versions.
#[derive(Debug, Default)]
pub struct KeyPage {
    /// The keys of this page.
    pub keys: Vec<StoredKey>,
    /// Where the next page starts; `None` after the last.
    pub next: Option<String>,
}

/// A sink whose replica can be read back and corrected.
pub trait Replica: Send + Sync {
    /// The key a record is stored under, as [`Replica::scan_keys`] lists it.
    fn key_of(&self, record: &Record) -> Result<String, String>;

    /// For each upsert record: how the replica differs from it (`None`: in sync, or newer).
    fn compare<'a>(&'a self, records: &'a [Record]) -> ReplicaFuture<'a, Vec<Option<Drift>>>;

    /// A page of the keys the replica holds; start with `None`.
    fn scan_keys<'a>(&'a self, cursor: Option<String>) -> ReplicaFuture<'a, KeyPage>;

    /// Removes each row only while it is still at the version given (checked and removed in
    /// one step in the store), so that a newer version a live worker wrote meanwhile always
    /// stays. Returns the rows removed.
    fn evict<'a>(&'a self, rows: &'a [(String, u64)], why: Eviction) -> ReplicaFuture<'a, usize>;
}

/// Why rows are evicted, which decides whether a tombstone is left at their version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// No source row produced it: buried at its version, so that an older event still in
    /// flight cannot bring it back.
    Orphan,
    /// Corrupted at the source's version, and about to be written again from the source
    /// through the guarded write: no tombstone, which would refuse that write.
    Rewrite,
}

//! Claim stores: where producers put payloads too large for the stream, and where the
//! `claim_check` stage reads them back. A store is a trait so that an HTTP/S3-style store can
//! sit next to the Redis one ([`RedisClaimStore`]).
//!
//! Bodies are content-addressed (`...sha256:<hex>`): writing the same body twice writes one
//! key, and a reference can be checked against what it names. Stored bodies are removed by
//! their TTL only; the TTL must outlive the stream's retention plus the longest consumer lag.

mod redis;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};

use ecst_schemas::ClaimRef;

pub use self::redis::RedisClaimStore;

/// Why a claim store could not answer (the store is down or slow; the caller retries).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimStoreError {
    /// The store did not answer, or answered with an error.
    #[error("claim store {store} unavailable: {message}")]
    Unavailable {
        /// The store's name and address (no secrets).
        store: String,
        /// What went wrong.
        message: String,
    },
}

/// What a store holds under one reference.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimRead {
    /// The stored body (at most one byte longer than the reference's size, so a larger value
    /// is seen as larger without being read whole).
    Found(Vec<u8>),
    /// Nothing under the key (yet).
    Missing,
    /// The key cannot hold this body, whatever the retries (a value of another type, a
    /// reference naming another store); the claim is corrupt.
    Bad(String),
}

/// Future returned by a [`ClaimStore`] call.
pub type ClaimFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ClaimStoreError>> + Send + 'a>>;

/// A store of claim-checked bodies.
pub trait ClaimStore: Send + Sync {
    /// The store name references carry (`redis`).
    fn name(&self) -> &'static str;

    /// Stores `body` under its content address and returns the reference to publish.
    fn put<'a>(&'a self, body: &'a [u8]) -> ClaimFuture<'a, ClaimRef>;

    /// Reads what `refs` name, in order, in one round trip where the store allows. An error
    /// means the store could not answer at all; a problem with one key is that key's
    /// [`ClaimRead::Bad`].
    fn get_many<'a>(&'a self, refs: &'a [&'a ClaimRef]) -> ClaimFuture<'a, Vec<ClaimRead>>;
}

fn waiting() -> &'static Mutex<BTreeMap<String, String>> {
    static WAITING: OnceLock<Mutex<BTreeMap<String, String>>> = OnceLock::new();
    WAITING.get_or_init(Mutex::default)
}

/// Marks `stage` as holding its batch for a claim store that cannot answer (with why), or
/// as not waiting any more.
pub(crate) fn set_waiting(stage: &str, why: Option<String>) {
    if let Ok(mut all) = waiting().lock() {
        match why {
            Some(why) => all.insert(stage.to_string(), why),
            None => all.remove(stage),
        };
    }
}

/// `<stage> waits for its claim store: <why>` for each stage holding a batch for one (the
/// `/readyz` reasons).
pub fn unavailable_stores() -> Vec<String> {
    waiting()
        .lock()
        .map(|all| {
            all.iter()
                .map(|(stage, why)| format!("{stage} waits for its claim store: {why}"))
                .collect()
        })
        .unwrap_or_default()
}

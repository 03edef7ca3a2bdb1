//! The errors of the operators crate: a sink's batch that failed, a stage that did not build.

/// A batch-level sink failure; the batch is retried and nothing is acked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// No connection could be had or the connection broke.
    #[error("{store} unavailable: {message}")]
    Unavailable {
        /// `redis` or `postgres`.
        store: &'static str,
        /// What the client said.
        message: String,
    },
    /// The store holds something that conflicts with a record of the batch (a key of another
    /// type where the replica's key should be): applying the records one at a time finds it.
    #[error("{store} refused a record of the batch: {message}")]
    Conflict {
        /// `redis` or `postgres`.
        store: &'static str,
        /// What the store said.
        message: String,
    },
    /// The store answered with an error for the whole batch.
    #[error("{store} refused the batch: {message}")]
    Refused {
        /// `redis` or `postgres`.
        store: &'static str,
        /// What the store said.
        message: String,
    },
}

/// A stage failed to build.
#[derive(Debug, thiserror::Error)]
#[error("stage `{stage}`: {message}")]
pub struct BuildError {
    /// Stage name.
    pub stage: String,
    /// What went wrong.
    pub message: String,
}

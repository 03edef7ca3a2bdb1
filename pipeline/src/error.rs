//! The errors a worker run ends with.

/// A run ended badly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A stage failed to build.
    #[error(transparent)]
    Build(#[from] ecst_operators::BuildError),
    /// The configuration cannot run (e.g. an invalid Redis URL).
    #[error("{0}")]
    Config(String),
    /// Shutdown came before the bootstrap finished.
    #[error("the bootstrap was interrupted; its progress is kept and the next start resumes it")]
    BootstrapInterrupted,
    /// The group missed entries that are gone from the stream.
    #[error(
        "retention gap: {0}. The replica has missed events. Configure `bootstrap:` (with on_gap: bootstrap) or run `ecst bootstrap`; to accept the loss instead, move the group past it with XGROUP SETID."
    )]
    RetentionGap(String),
    /// The stream's recorded partitioning differs from the pipeline's.
    #[error(transparent)]
    Partitioning(#[from] crate::partitioning::PartitioningError),
    /// Redis refused the worker's credentials, certificates or commands at start.
    #[error(transparent)]
    Access(#[from] crate::preflight::PreflightError),
    /// A stage met an entry it may neither pass nor dead-letter; that batch is not acked.
    #[error("stopped: {0}")]
    Halted(String),
    /// Batches were still uncommitted when the shutdown timeout ran out.
    #[error(
        "{0} batch(es) were not committed within the shutdown timeout; their entries stay pending and will be redelivered"
    )]
    Abandoned(usize),
}

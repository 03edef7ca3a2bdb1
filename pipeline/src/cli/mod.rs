//! Subcommands that live at the binary's edge.

pub(crate) mod bench;
pub(crate) mod bench_relay;
pub(crate) mod bench_stages;
pub(crate) mod bench_target;
pub(crate) mod bench_workers;
pub(crate) mod bench_workload;
pub(crate) mod connect;
pub(crate) mod dlq;
pub(crate) mod docs;
pub(crate) mod init;
pub(crate) mod publish;
pub(crate) mod schema;
pub(crate) mod stages;
pub(crate) mod status;
pub(crate) mod tap;
pub(crate) mod test;

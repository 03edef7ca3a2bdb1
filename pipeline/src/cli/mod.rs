//! Subcommands that live at the binary's edge.

pub(crate) mod bench;
pub(crate) mod bench_relay;
pub(crate) mod bench_stages;
pub(crate) mod bench_target;
pub(crate) mod bench_workers;
pub(crate) mod publish;
pub(crate) mod status;

//! Subcommands that live at the binary's edge.

pub(crate) mod bench;
pub(crate) mod publish;

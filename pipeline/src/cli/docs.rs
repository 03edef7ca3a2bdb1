//! `ecst completions SHELL` and `ecst man`: shell completion scripts and roff man pages,
//! generated from the command line's own definition so they never drift from it.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

/// Prints the completion script of `shell` for `command`.
pub(crate) fn completions(shell: clap_complete::Shell, mut command: clap::Command) -> ExitCode {
    let name = command.get_name().to_string();
    clap_complete::generate(shell, &mut command, name, &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// Prints the man page of `command`, or writes one page per (sub)command into `out`.
pub(crate) fn man(command: clap::Command, out: Option<&Path>) -> anyhow::Result<ExitCode> {
    match out {
        None => match clap_mangen::Man::new(command).render(&mut std::io::stdout()) {
            // `ecst man | head` is not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            written => written.context("writing the man page")?,
        },
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(command, dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            eprintln!("man pages written to {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! What a new user meets in the first hour: the scripts, the errors of a first run, the
//! leftovers of restarts.

use std::time::Duration;

use crate::common::*;

/// The repository's root (the e2e binary is built from `pipeline/`).
fn repo_file(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_scripts_show_cargos_progress_and_the_readme_says_what_a_build_needs() {
    for script in ["scripts/demo.sh", "scripts/test.sh"] {
        let text = repo_file(script);
        let quiet: Vec<&str> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("cargo") || l.contains(" cargo "))
            .filter(|l| l.contains("--quiet") || l.split_whitespace().any(|w| w == "-q"))
            .map(str::trim)
            .collect();
        assert!(
            quiet.is_empty(),
            "{script} hides cargo's progress: {quiet:?}"
        );
    }
    let readme = repo_file("README.md");
    for needed in [
        "Rust toolchain of at least",
        "8 GB",
        "10 minutes",
        "cargo install --locked --path pipeline",
    ] {
        assert!(readme.contains(needed), "README lacks {needed:?}");
    }
}

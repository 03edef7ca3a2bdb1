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

#[test]
fn an_unreachable_redis_is_named_with_the_cause_and_what_to_check_from_the_runner() {
    let stream = unique("first-hour-refused");
    // Nothing listens on port 1; the pipeline has no `bootstrap:`.
    let yaml = athletes_pipeline(&stream, "fh:", "  timeout: 1s\n").replace(
        "source:\n",
        "source:\n  redis: redis://app:s3cret@127.0.0.1:1\n",
    );
    let file = pipeline_file("first-hour-refused", &yaml);
    let worker = Worker::start(&file, &[]);
    let expected = "connection refused by redis://app:***@127.0.0.1:1: is Redis running there? Check the host and port in the URL";
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the group read's failure",
        || {
            worker.log().lines().any(|l| {
                l.contains("Cannot read the consumer group from Redis") && l.contains(expected)
            })
        },
    );
    let (_, log) = worker.terminate();
    assert!(!log.contains("ecst_pipeline::bootstrap"), "{log}");
    assert!(
        !log.contains("timed out waiting for a pooled connection"),
        "{log}"
    );
    assert!(!log.contains("s3cret"), "{log}");
}

#[test]
fn a_second_worker_on_a_taken_metrics_port_is_told_which_flag_picks_another() {
    let mut conn = redis();
    let stream = unique("first-hour-metrics");
    let file = pipeline_file("first-hour-metrics", &athletes_pipeline(&stream, "fh:", ""));
    // The first worker takes an ephemeral port and logs the address it bound.
    let first = Worker::start(&file, &["--metrics-addr", "127.0.0.1:0"]);
    let port = first.listen_port("Metrics on /metrics");
    let mut second = ecst();
    second
        .arg("run")
        .arg(&file)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")]);
    let out = run_with_deadline(second, Duration::from_secs(30));
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: cannot serve /metrics: 127.0.0.1:{port} is already in use (another ecst worker on this host?): pass --metrics-addr"
        )) && stderr.contains("127.0.0.1:0 for any free port"),
        "{stderr}"
    );
    let (status, log) = first.terminate();
    assert!(status.success(), "{log}");
    cleanup(&mut conn, &stream);
}

#[test]
fn status_on_a_stream_that_does_not_exist_says_so_and_exits_1() {
    let stream = unique("first-hour-nostream");
    let file = pipeline_file(
        "first-hour-nostream",
        &athletes_pipeline(&stream, "fh:", ""),
    );
    let mut cmd = ecst();
    cmd.arg("status").arg(&file);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: stream `{stream}` does not exist on redis://127.0.0.1:6379"
        )),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "no table for a stream that is not there"
    );
}

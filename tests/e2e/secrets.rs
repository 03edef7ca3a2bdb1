//! Passwords never reach the output: every command, in a failing configuration whose
//! connection strings carry a distinctive secret, in text and JSON log formats. Each case also
//! requires the redacted form (or the failure) to appear, so that it cannot pass by printing
//! nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::*;

const SECRET: &str = "Zz9secretQ";
const FORMATS: [&str; 2] = ["text", "json"];

/// A libpq key=value DSN with a quoted password, on a port where nothing listens.
fn dsn(extra: &str) -> String {
    format!("host=127.0.0.1 port=1 user=postgres password='{SECRET} x' {extra}")
}

/// A Postgres URL with the password in the query string, on a port where nothing listens.
fn query_url(extra: &str) -> String {
    format!("postgres://postgres@127.0.0.1:1/postgres?password={SECRET}&{extra}")
}

fn ecst_in(format: &str) -> Command {
    let mut cmd = ecst();
    cmd.args(["--log-format", format]);
    cmd
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts that `text` holds every `shown` string and not the secret.
fn assert_redacted(what: &str, text: &str, shown: &[&str]) {
    assert!(
        !text.contains(SECRET),
        "{what}: the password is printed:\n{text}"
    );
    for s in shown {
        assert!(
            text.contains(s),
            "{what}: expected {s:?} in the output:\n{text}"
        );
    }
}

/// Runs one command to completion; asserts its exit code and what it shows.
fn check(what: &str, cmd: Command, code: i32, shown: &[&str]) {
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(code), "{what}:\n{text}");
    assert_redacted(what, &text, shown);
}

fn pipeline(label: &str, stream: &str, source_extra: &str, rest: &str) -> PathBuf {
    pipeline_file(
        label,
        &format!(
            "name: secrets\nsource:\n  stream: \"{stream}\"\n  group: g\n  block: 100ms\n{source_extra}{rest}"
        ),
    )
}

fn sink_stages(url: &str) -> String {
    format!(
        "stages:\n  decode: {{ type: decode }}\n  table: {{ type: postgres, input: decode, url: \"{url}\", table: secrets_replica, key: id }}\n"
    )
}

fn file_in(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

#[test]
fn invalid_connection_strings_are_reported_without_their_password() {
    let stream = unique("secrets-invalid");
    let bad_dsn = dsn("sslmode=bogus");
    let bad_url = query_url("sslmode=bogus");
    let file = pipeline(
        "secrets-invalid",
        &stream,
        "",
        &format!(
            "bootstrap:\n  postgres: \"{bad_url}\"\n  query: \"SELECT 1 WHERE $1::text IS NULL LIMIT $2\"\n{}",
            sink_stages(&bad_dsn)
        ),
    );
    let dir = file.parent().expect("dir").to_path_buf();
    let relay = file_in(
        &dir,
        "relay.yaml",
        &format!(
            "name: r\npostgres: \"{bad_dsn}\"\nredis: \"redis://:{SECRET}@127.0.0.1:1\"\noutbox: {{ table: secrets_outbox }}\n"
        ),
    );
    let snapshot = file_in(
        &dir,
        "snapshot.yaml",
        &format!(
            "listen: 127.0.0.1:1\npostgres: \"{bad_url}\"\nentities:\n  athletes:\n    table: t\n"
        ),
    );
    // A Redis URL the client cannot parse (port out of range) still shows who was meant.
    let bad_redis = pipeline(
        "secrets-invalid-redis",
        &stream,
        &format!("  redis: \"redis://app:{SECRET}@127.0.0.1:99999/0\"\n"),
        "stages:\n  decode: { type: decode }\n  cache: { type: redis_hash, input: decode, key: \"k:{aggregateId}\" }\n",
    );
    let dsn_shown = "password=***";
    let url_shown = "?password=***&sslmode=bogus";
    for format in FORMATS {
        for (command, args, shown) in [
            ("validate", vec!["validate"], vec![dsn_shown, url_shown]),
            (
                "run --drain",
                vec!["run", "--drain"],
                vec![dsn_shown, url_shown],
            ),
            ("bootstrap", vec!["bootstrap"], vec![dsn_shown, url_shown]),
            ("status", vec!["status"], vec![dsn_shown, url_shown]),
        ] {
            let mut cmd = ecst_in(format);
            cmd.args(&args[..1]).arg(&file).args(&args[1..]);
            check(&format!("{command} ({format})"), cmd, 1, &shown);
        }
        let mut cmd = ecst_in(format);
        cmd.arg("reconcile").arg(&file);
        check(&format!("reconcile ({format})"), cmd, 2, &[dsn_shown]);
        for (command, path) in [("validate", &relay), ("relay", &relay)] {
            let mut cmd = ecst_in(format);
            cmd.arg(command).arg(path);
            check(&format!("{command} relay ({format})"), cmd, 1, &[dsn_shown]);
        }
        for args in [&["validate"][..], &["snapshot", "serve"][..]] {
            let mut cmd = ecst_in(format);
            cmd.args(args).arg(&snapshot);
            check(&format!("{args:?} ({format})"), cmd, 1, &[url_shown]);
        }
        let mut cmd = ecst_in(format);
        cmd.arg("validate").arg(&bad_redis);
        check(
            &format!("validate redis ({format})"),
            cmd,
            1,
            &["redis://app:***@127.0.0.1:99999/0"],
        );
    }
}

#[test]
fn unreachable_servers_are_reported_without_their_password() {
    let mut conn = redis();
    let sink_shown = "postgres://postgres@127.0.0.1:1/postgres?password=***&connect_timeout=2";
    for format in FORMATS {
        // A stream per format: the bootstrap below leaves an interrupted bootstrap behind.
        let stream = unique("secrets-down");
        let file = pipeline(
            "secrets-down",
            &stream,
            "",
            &format!(
                "bootstrap:\n  postgres: \"{}\"\n  query: \"SELECT 1 WHERE $1::text IS NULL LIMIT $2\"\n  on_new_group: false\n{}",
                dsn("sslmode=disable connect_timeout=2"),
                sink_stages(&query_url("connect_timeout=2"))
            ),
        );
        let dead_redis = pipeline(
            "secrets-down-redis",
            &stream,
            &format!("  redis: \"redis://:{SECRET}@127.0.0.1:1\"\n"),
            "stages:\n  decode: { type: decode }\n  cache: { type: redis_hash, input: decode, key: \"k:{aggregateId}\" }\n",
        );
        // The source stream is reachable and empty: the run drains, having warned about its sink.
        let mut cmd = ecst_in(format);
        cmd.arg("run").arg(&file).arg("--drain");
        check(&format!("run --drain ({format})"), cmd, 0, &[sink_shown]);

        let mut cmd = ecst_in(format);
        cmd.arg("reconcile").arg(&file);
        check(
            &format!("reconcile ({format})"),
            cmd,
            2,
            &[sink_shown, "connecting to the source"],
        );

        let mut cmd = ecst_in(format);
        cmd.arg("status").arg(&file);
        check(&format!("status ({format})"), cmd, 0, &[sink_shown]);

        let mut cmd = ecst_in(format);
        cmd.arg("status").arg(&dead_redis);
        check(
            &format!("status redis ({format})"),
            cmd,
            1,
            &["cannot connect to Redis at redis://:***@127.0.0.1:1"],
        );

        // Commands that retry until stopped: stopped once they have reported the failure.
        let mut cmd = ecst_in(format);
        cmd.arg("bootstrap").arg(&file);
        let worker = Worker::spawn(cmd);
        wait_for_worker(&worker, Duration::from_secs(30), "a failed page", || {
            worker.log().contains("connecting to the source")
        });
        let (status, log) = worker.terminate();
        assert_eq!(status.code(), Some(1), "bootstrap ({format}):\n{log}");
        assert_redacted(&format!("bootstrap ({format})"), &log, &[sink_shown]);

        // A snapshot endpoint with credentials in its URL, down.
        let http = pipeline(
            "secrets-http",
            &stream,
            "",
            &format!(
                "bootstrap:\n  url: \"http://reader:{SECRET}@127.0.0.1:1/snapshot/athletes\"\n  timeout: 1s\n  on_new_group: false\n{}",
                sink_stages(&query_url("connect_timeout=2"))
            ),
        );
        let mut cmd = ecst_in(format);
        cmd.arg("bootstrap").arg(&http);
        let worker = Worker::spawn(cmd);
        wait_for_worker(&worker, Duration::from_secs(30), "a failed page", || {
            worker.log().contains("Fetching a snapshot page failed")
        });
        let (status, log) = worker.terminate();
        assert_eq!(status.code(), Some(1), "bootstrap http ({format}):\n{log}");
        assert_redacted(
            &format!("bootstrap http ({format})"),
            &log,
            &["http://reader:***@127.0.0.1:1/snapshot/athletes"],
        );

        let mut cmd = ecst_in(format);
        cmd.arg("run").arg(&dead_redis);
        let worker = Worker::spawn(cmd);
        wait_for_worker(&worker, Duration::from_secs(30), "a failed read", || {
            worker
                .log()
                .contains("Cannot read the consumer group from Redis")
        });
        let (status, log) = worker.terminate();
        assert_eq!(status.code(), Some(0), "run redis ({format}):\n{log}");
        assert_redacted(&format!("run redis ({format})"), &log, &[]);
        cleanup(&mut conn, &stream);
    }
}

#[test]
fn relay_and_snapshot_server_failures_do_not_print_the_password() {
    let dir = pipeline_file("secrets-relay", "")
        .parent()
        .expect("dir")
        .to_path_buf();
    let relay = file_in(
        &dir,
        "relay.yaml",
        &format!(
            "name: r\npostgres: \"{}\"\nredis: \"redis://:{SECRET}@127.0.0.1:1\"\noutbox: {{ table: secrets_outbox }}\npoll_interval: 100ms\ntimeout: 2s\n",
            dsn("connect_timeout=2")
        ),
    );
    let snapshot = file_in(
        &dir,
        "snapshot.yaml",
        &format!(
            "listen: 127.0.0.1:1\npostgres: \"{}\"\ntimeout: 1s\nentities:\n  athletes:\n    table: t\n",
            query_url("connect_timeout=1")
        ),
    );
    for format in FORMATS {
        let mut cmd = ecst_in(format);
        cmd.args(["snapshot", "serve"]).arg(&snapshot);
        check(
            &format!("snapshot serve ({format})"),
            cmd,
            1,
            &[
                "cannot connect to Postgres postgres://postgres@127.0.0.1:1/postgres?password=***&connect_timeout=1",
            ],
        );

        let mut cmd = ecst_in(format);
        cmd.arg("relay").arg(&relay);
        let worker = Worker::spawn(cmd);
        wait_for_worker(&worker, Duration::from_secs(30), "a failed batch", || {
            worker.log().contains("cannot connect to Postgres")
        });
        let (status, log) = worker.terminate();
        assert_eq!(status.code(), Some(0), "relay ({format}):\n{log}");
        assert_redacted(&format!("relay ({format})"), &log, &[]);
    }
}

#[test]
fn a_yaml_alias_bomb_is_refused_in_little_memory() {
    let mut text = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for pair in names.windows(2) {
        let refs = vec![format!("*{}", pair[0]); 9].join(",");
        text.push_str(&format!("{}: &{} [{refs}]\n", pair[1], pair[1]));
    }
    let file = pipeline_file("bomb", &text);
    // Under a 1 GiB address-space cap: the expansion the bomb asks for (10^9 nodes) would die
    // of a failed allocation (abort, not exit 1) long before it finished.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"ulimit -v 1048576 && exec "$0" validate "$1""#)
        .arg(env!("CARGO_BIN_EXE_ecst"))
        .arg(&file);
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "{}:5:7: anchors and aliases copy more than 100000 nodes (an alias bomb?)\n1 error\n",
            file.display()
        )
    );
}

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

/// `XINFO CONSUMERS` names; none while the stream or group does not exist yet.
fn consumers(conn: &mut redis::Connection, stream: &str, group: &str) -> Vec<String> {
    let reply: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query(conn)
        .unwrap_or_default();
    reply
        .into_iter()
        .filter_map(|c| {
            c.get("name")
                .and_then(|n| redis::from_redis_value(n.clone()).ok())
        })
        .collect()
}

#[test]
fn a_clean_stop_with_nothing_pending_leaves_the_group_and_status_marks_stale_consumers() {
    let mut conn = redis();
    let stream = unique("first-hour-consumers");
    let prefix = format!("{stream}:");
    // A short claim_idle makes a consumer stale after 10 x 200ms of idleness.
    let file = pipeline_file(
        "first-hour-consumers",
        &athletes_pipeline(&stream, &prefix, "  claim_idle: 200ms\n"),
    );
    publish(&mut conn, &stream, &[event("a", 1, "Ann")]);
    // A consumer left behind by an old crash: nothing pending, idle.
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", &stream, "replica", "0"])
        .query(&mut conn)
        .expect("XGROUP CREATE");
    let _: i64 = redis::cmd("XGROUP")
        .arg(&["CREATECONSUMER", &stream, "replica", "crashed-long-ago"])
        .query(&mut conn)
        .expect("XGROUP CREATECONSUMER");

    let worker = Worker::start(&file, &["--consumer", "live-worker"]);
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the event applied",
        || hash(&mut conn, &format!("{prefix}athlete:a")).contains_key("_version"),
    );
    let status = || {
        let mut cmd = ecst();
        cmd.arg("status").arg(&file).arg("--json");
        let out = run_with_deadline(cmd, Duration::from_secs(30));
        assert!(out.status.success(), "{}", stderr_of(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        report["groups"][0]["consumers"]
            .as_array()
            .expect("consumers")
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap_or("").to_string(),
                    c["stale"] == true,
                )
            })
            .collect::<std::collections::HashMap<_, _>>()
    };
    // The group keeps being served while the crashed consumer stays idle (before Redis 7.2,
    // that is how status tells a dead consumer from a live one on a quiet stream).
    let mut version = 1;
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the crashed consumer stale",
        || {
            version += 1;
            publish(&mut conn, &stream, &[event("a", version, "Ann")]);
            status().get("crashed-long-ago") == Some(&true)
        },
    );
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the last event applied",
        || {
            hash(&mut conn, &format!("{prefix}athlete:a")).get("_version")
                == Some(&version.to_string())
        },
    );
    assert_eq!(
        status().get("live-worker"),
        Some(&false),
        "a live worker is not stale"
    );
    let mut text = ecst();
    text.arg("status").arg(&file);
    let table = String::from_utf8_lossy(&run_with_deadline(text, Duration::from_secs(30)).stdout)
        .into_owned();
    let line = table
        .lines()
        .find(|l| l.contains("crashed-long-ago"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains("stale: nothing pending, long idle"),
        "{table}"
    );

    let (code, log) = worker.terminate();
    assert!(code.success(), "{log}");
    assert!(
        log.contains("Left the group: nothing was pending at this consumer."),
        "{log}"
    );
    assert_eq!(
        consumers(&mut conn, &stream, "replica"),
        ["crashed-long-ago"]
    );
    cleanup(&mut conn, &stream);
}

#[test]
fn a_stop_with_entries_pending_at_the_consumer_keeps_it_in_the_group() {
    let mut conn = redis();
    let stream = unique("first-hour-keep");
    let prefix = format!("{stream}:");
    let file = pipeline_file("first-hour-keep", &athletes_pipeline(&stream, &prefix, ""));
    let worker = Worker::start(&file, &["--consumer", "busy-worker"]);
    wait_for_worker(&worker, Duration::from_secs(30), "the group", || {
        consumers(&mut conn, &stream, "replica") == ["busy-worker"]
    });
    // An entry delivered to the worker's name and not acknowledged, as a batch still being
    // applied is. In one transaction, so the worker's own blocked read cannot take it first.
    let _: redis::Value = redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("v")
        .arg(event("b", 1, "Bo").to_string())
        .cmd("XREADGROUP")
        .arg(&[
            "GROUP",
            "replica",
            "busy-worker",
            "COUNT",
            "1",
            "STREAMS",
            &stream,
            ">",
        ])
        .query(&mut conn)
        .expect("XADD + XREADGROUP");
    let (code, log) = worker.terminate();
    assert!(code.success(), "{log}");
    assert!(
        log.contains("Staying in the group: entries are pending at this consumer."),
        "{log}"
    );
    assert_eq!(consumers(&mut conn, &stream, "replica"), ["busy-worker"]);
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 1);
    cleanup(&mut conn, &stream);
}

#[test]
fn a_restarted_worker_reports_the_replicas_age_before_any_new_event() {
    let mut conn = redis();
    let stream = unique("first-hour-age");
    let prefix = format!("{stream}:");
    let file = pipeline_file("first-hour-age", &athletes_pipeline(&stream, &prefix, ""));
    let an_hour_ago = (time::OffsetDateTime::now_utc() - Duration::from_secs(3600))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("timestamp");
    let mut e = event("a", 1, "Ann");
    e["occurredAt"] = serde_json::json!(an_hour_ago);
    publish(&mut conn, &stream, &[e]);
    drain(&file);

    // The restarted worker has applied nothing yet: the age comes from the replica's record.
    let worker = Worker::start(&file, &["--metrics-addr", "127.0.0.1:0"]);
    let port = worker.listen_port("Metrics on /metrics");
    let gauge = r#"ecst_source_age_seconds{pipeline="athletes",sink="cache"} "#;
    let mut age = f64::NAN;
    wait_for_worker(&worker, Duration::from_secs(30), "a source age", || {
        let (_, body) = http_get(port, "/metrics");
        age = body
            .lines()
            .find_map(|l| l.strip_prefix(gauge))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        age.is_finite()
    });
    assert!((3600.0..3900.0).contains(&age), "source age {age}");
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    let _: i64 = redis::cmd("DEL")
        .arg(format!("ecst:freshness:{prefix}athlete:{{aggregateId}}"))
        .query(&mut conn)
        .expect("DEL");
    cleanup(&mut conn, &stream);
}

/// `ecst validate` on `yaml`: its exit code and its errors, the file's path replaced by FILE.
fn validate(yaml: &str) -> (Option<i32>, String) {
    let file = pipeline_file("first-hour-validate", yaml);
    let mut cmd = ecst();
    cmd.arg("validate").arg(&file);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    let text = stderr_of(&out).replace(&file.display().to_string(), "FILE");
    (out.status.code(), text)
}

#[test]
fn a_bad_column_type_lists_the_allowed_ones_and_a_misspelt_key_gets_a_did_you_mean() {
    let (code, errors) = validate(
        r#"name: athletes
sorce: {}
source:
  stream: athletes
  group: replica
  claim_idel: 1s
stages:
  decode: { type: decode }
  latest: { type: version_fliter, input: decode }
  table:
    type: postgres
    input: decode
    url: postgres://postgres@127.0.0.1/postgres
    table: athletes
    columns:
      name: varchar
  other:
    type: postgres
    input: decode
    url: postgres://postgres@127.0.0.1/postgres
    table: athletes
    columns:
      name: { type: text, form: displayName }
  cache: { type: redis_hash, input: decode, key: "a:{aggregateId}", tombstone_prefx: "t:" }
"#,
    );
    assert_eq!(code, Some(1), "{errors}");
    for expected in [
        "FILE:2:1: sorce: unknown key `sorce` (expected name, source, stages, bootstrap, schemas, tests); did you mean `source`?",
        "source.claim_idel: unknown field `claim_idel`, expected one of",
        "; did you mean `claim_idle`?",
        "stages.latest.type: unknown stage type `version_fliter` (expected one of",
        "; did you mean `version_filter`?",
        "stages.table.columns.name: unknown variant `varchar`, expected one of `text`, `bigint`, `integer`, `numeric`, `boolean`, `timestamptz`, `jsonb`, `uuid`",
        "unknown field `form`, expected `type` or `from`; did you mean `from`?",
        "stages.cache.tombstone_prefx: unknown field `tombstone_prefx`",
        "; did you mean `tombstone_prefix`?",
    ] {
        assert!(errors.contains(expected), "{expected:?} not in:\n{errors}");
    }
    assert!(!errors.contains("untagged enum"), "{errors}");
}

#[test]
fn publish_strict_publishes_nothing_when_a_line_is_bad_and_still_names_the_line() {
    let mut conn = redis();
    let stream = unique("first-hour-publish");
    let dir = pipeline_file("first-hour-publish", "")
        .parent()
        .expect("dir")
        .to_path_buf();
    let file = dir.join("events.ndjson");
    let good = |id: &str| event(id, 1, "x").to_string();
    std::fs::write(&file, format!("{}\nnot json\n{}\n", good("a"), good("b"))).expect("write");
    let publish = |strict: bool| {
        let mut cmd = ecst();
        cmd.args(["publish", "--stream", &stream, "--file"])
            .arg(&file);
        if strict {
            cmd.arg("--strict");
        }
        let out = run_with_deadline(cmd, Duration::from_secs(30));
        (out.status.code(), stderr_of(&out))
    };
    let xlen = |conn: &mut redis::Connection| -> i64 {
        redis::cmd("XLEN").arg(&stream).query(conn).expect("XLEN")
    };
    let line_report = format!("{}:2: not JSON", file.display());

    let (code, stderr) = publish(true);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&line_report), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "1 bad lines: nothing published to {stream} (--strict)"
        )),
        "{stderr}"
    );
    assert_eq!(xlen(&mut conn), 0);

    // Without --strict the good lines go out and the exit status still reports the bad one.
    let (code, stderr) = publish(false);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&line_report), "{stderr}");
    assert_eq!(xlen(&mut conn), 2);

    std::fs::write(&file, format!("{}\n{}\n", good("c"), good("d"))).expect("write");
    let (code, stderr) = publish(true);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(xlen(&mut conn), 4);
    cleanup(&mut conn, &stream);
}

#[test]
fn text_log_lines_leave_the_spans_fields_out_unless_asked() {
    let mut conn = redis();
    let stream = unique("first-hour-spans");
    let file = pipeline_file("first-hour-spans", &athletes_pipeline(&stream, "fh:", ""));
    let mut dead_lettered_line = |spans: bool| {
        let _: String = redis::cmd("XADD")
            .arg(&[&stream, "*", "v", "not json"])
            .query(&mut conn)
            .expect("XADD");
        let mut cmd = ecst();
        cmd.arg("run").arg(&file).arg("--drain");
        if spans {
            cmd.env("ECST_LOG_SPANS", "1");
        }
        let out = run_with_deadline(cmd, Duration::from_secs(60));
        let log = stderr_of(&out);
        assert!(out.status.success(), "{log}");
        log.lines()
            .find(|l| l.contains("Entry dead-lettered."))
            .unwrap_or_else(|| panic!("no dead-letter line in:\n{log}"))
            .to_string()
    };
    let line = dead_lettered_line(false);
    let (_, rest) = line.split_once(' ').expect("a timestamp first");
    assert!(
        rest.starts_with(" WARN ecst_pipeline::commit: Entry dead-lettered. pipeline=athletes"),
        "{line}"
    );
    assert!(
        !line.contains("ecst.batch{") && !line.contains("messaging."),
        "{line}"
    );
    let line = dead_lettered_line(true);
    assert!(
        line.contains("ecst.batch{"),
        "ECST_LOG_SPANS=1 keeps them: {line}"
    );
    cleanup(&mut conn, &stream);
}

#[test]
fn create_true_starts_quietly_when_the_table_exists() {
    let mut conn = redis();
    let pg = postgres();
    let stream = unique("first-hour-create");
    let table = format!("e2e_fh_create_{}", std::process::id());
    pg.execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_tombstones"
    ));
    let yaml = format!(
        r#"name: athletes
source: {{ stream: "{stream}", group: replica, block: 100ms }}
stages:
  decode: {{ type: decode }}
  table:
    type: postgres
    input: decode
    url: "{}"
    table: {table}
    create: true
    columns: {{ displayName: text }}
"#,
        database_url()
    );
    let file = pipeline_file("first-hour-create", &yaml);
    publish(&mut conn, &stream, &[event("a", 1, "Ann")]);
    drain(&file);
    // The second start finds both tables there.
    publish(&mut conn, &stream, &[event("a", 2, "Ann 2")]);
    let log = stderr_of(&drain(&file));
    assert!(!log.contains("already exists"), "{log}");
    assert!(!log.contains("NOTICE"), "{log}");
    let rows = pg.query(&format!("SELECT source_version FROM {table}"), &[]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i64>(0), 2);
    pg.execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_tombstones"
    ));
    cleanup(&mut conn, &stream);
}

#[test]
fn ecst_alone_is_a_usage_error_and_ecst_help_is_not() {
    let out = run_with_deadline(ecst(), Duration::from_secs(30));
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("Usage: ecst [OPTIONS] <COMMAND>"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    let mut help = ecst();
    help.arg("--help");
    let out = run_with_deadline(help, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: ecst [OPTIONS] <COMMAND>"));
}

#[test]
fn a_restarted_worker_reports_a_postgres_replicas_age_from_its_table() {
    let mut conn = redis();
    let pg = postgres();
    let stream = unique("first-hour-pg-age");
    let table = format!("e2e_fh_age_{}", std::process::id());
    pg.execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_tombstones"
    ));
    let yaml = format!(
        r#"name: athletes
source: {{ stream: "{stream}", group: replica, block: 100ms }}
stages:
  decode: {{ type: decode }}
  table:
    type: postgres
    input: decode
    url: "{}"
    table: {table}
    create: true
    columns: {{ displayName: text }}
"#,
        database_url()
    );
    let file = pipeline_file("first-hour-pg-age", &yaml);
    let two_hours_ago = (time::OffsetDateTime::now_utc() - Duration::from_secs(7200))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("timestamp");
    let mut e = event("a", 1, "Ann");
    e["occurredAt"] = serde_json::json!(two_hours_ago);
    publish(&mut conn, &stream, &[e]);
    drain(&file);

    let worker = Worker::start(&file, &["--metrics-addr", "127.0.0.1:0"]);
    let port = worker.listen_port("Metrics on /metrics");
    let gauge = |name: &str| {
        let (_, body) = http_get(port, "/metrics");
        let prefix = format!(r#"{name}{{pipeline="athletes",sink="table"}} "#);
        body.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    wait_for_worker(&worker, Duration::from_secs(30), "a source age", || {
        gauge("ecst_source_age_seconds").is_finite()
    });
    let age = gauge("ecst_source_age_seconds");
    assert!((7200.0..7500.0).contains(&age), "source age {age}");
    let replicated = gauge("ecst_replicated_age_seconds");
    assert!(
        (0.0..300.0).contains(&replicated),
        "replicated age {replicated}"
    );
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    pg.execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_tombstones"
    ));
    cleanup(&mut conn, &stream);
}

//! Metrics and probes of a running worker, over real HTTP.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::common::*;

fn scrape(port: u16) -> HashMap<String, f64> {
    let body = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
        .and_then(|r| r.text())
        .unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[test]
fn metrics_report_freshness_counts_and_group_state() {
    let mut conn = redis();
    let stream = unique("observe");
    let prefix = format!("{stream}:");
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("now");
    let mut events: Vec<serde_json::Value> = (0..50)
        .map(|i| {
            let mut e = event(&format!("m{}", i % 10), (i / 10 + 1) as u64, "x");
            e["occurredAt"] = json!(now);
            e
        })
        .collect();
    events.push(json!("not an envelope"));
    publish(&mut conn, &stream, &events);
    let pipeline = pipeline_file("observe", &athletes_pipeline(&stream, &prefix, ""));
    let worker = Worker::start(&pipeline, &["--metrics-addr", "127.0.0.1:0"]);
    let port = worker.listen_port("Metrics on /metrics");
    let p = "pipeline=\"athletes\"";
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "all entries acked",
        || scrape(port).get(&format!("ecst_events_acked_total{{{p}}}")) == Some(&51.0),
    );
    let m = scrape(port);
    let get = |name: &str| {
        *m.get(name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", m.keys().collect::<Vec<_>>()))
    };
    assert_eq!(get(&format!("ecst_events_read_total{{{p}}}")), 51.0);
    assert_eq!(
        get(&format!(
            "ecst_events_dead_lettered_total{{{p},reason=\"invalid_event\"}}"
        )),
        1.0
    );
    let applied = get(&format!("ecst_events_applied_total{{{p},sink=\"cache\"}}"));
    let stale = get(&format!("ecst_events_stale_total{{{p},sink=\"cache\"}}"))
        + get(&format!("ecst_events_skipped_stale_total{{{p}}}"));
    assert_eq!(
        applied + stale,
        50.0,
        "every valid event is applied or stale"
    );
    // Versions of one aggregate in one batch coalesce to the newest: at least one write each.
    assert!((10.0..=50.0).contains(&applied), "applied {applied}");
    let source_age = get(&format!("ecst_source_age_seconds{{{p},sink=\"cache\"}}"));
    assert!((0.0..60.0).contains(&source_age), "source age {source_age}");
    let replicated_age = get(&format!(
        "ecst_replicated_age_seconds{{{p},sink=\"cache\"}}"
    ));
    assert!(
        (0.0..60.0).contains(&replicated_age),
        "replicated age {replicated_age}"
    );
    let lag_count = get(&format!(
        "ecst_apply_lag_seconds_count{{{p},sink=\"cache\"}}"
    ));
    assert!(
        lag_count >= applied,
        "apply lag observed {lag_count} times for {applied} writes"
    );
    assert!(
        get(&format!(
            "ecst_stage_duration_seconds_count{{{p},stage=\"decode\"}}"
        )) >= 1.0
    );
    wait_for_worker(
        &worker,
        Duration::from_secs(20),
        "the group refreshed",
        || scrape(port).get(&format!("ecst_group_pending{{{p}}}")) == Some(&0.0),
    );
    assert!(
        m.keys()
            .all(|k| !k.contains("m1\"") && !k.contains("aggregate")),
        "aggregate ids must never be labels"
    );
    assert_eq!(http_get(port, "/healthz").0, 200);
    assert_eq!(http_get(port, "/readyz"), (200, "ready\n".to_string()));
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    cleanup(&mut conn, &stream);
}

#[test]
fn readyz_fails_while_a_sink_is_down_and_recovers() {
    let mut conn = redis();
    let stream = unique("observe-ready");
    let prefix = format!("{stream}:");
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let proxy = Proxy::start(&upstream);
    let yaml = athletes_pipeline(&stream, &prefix, "").replace(
        "    type: redis_hash\n",
        &format!(
            "    type: redis_hash\n    redis: redis://127.0.0.1:{}\n    timeout: 1s\n",
            proxy.port
        ),
    );
    let pipeline = pipeline_file("observe", &yaml);
    let worker = Worker::start(&pipeline, &["--metrics-addr", "127.0.0.1:0"]);
    let port = worker.listen_port("Metrics on /metrics");
    wait_for_worker(&worker, Duration::from_secs(20), "ready", || {
        http_get(port, "/readyz").0 == 200
    });
    proxy.cut();
    publish(&mut conn, &stream, &[event("r1", 1, "x")]);
    wait_for_worker(&worker, Duration::from_secs(30), "not ready", || {
        http_get(port, "/readyz") == (503, "not ready: sink cache is failing\n".to_string())
    });
    assert_eq!(http_get(port, "/healthz").0, 200, "the process is up");
    let failing = scrape(port)["ecst_sink_failing{pipeline=\"athletes\",sink=\"cache\"}"];
    assert_eq!(failing, 1.0);
    proxy.restore();
    wait_for_worker(&worker, Duration::from_secs(30), "ready again", || {
        http_get(port, "/readyz").0 == 200
    });
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    cleanup(&mut conn, &stream);
}

#[test]
fn status_shows_the_group_dead_letters_and_freshness_of_each_replica() {
    let mut conn = redis();
    let stream = unique("status");
    let prefix = format!("{stream}:");
    let table = format!("e2e_status_{}", std::process::id());
    let yaml = athletes_pipeline(&stream, &prefix, "")
        + &format!(
            "  table:\n    type: postgres\n    input: athlete\n    url: \"{}\"\n    table: {table}\n    key: athlete_id\n    create: true\n    columns: {{ display_name: text }}\n",
            database_url()
        );
    let pipeline = pipeline_file("status", &yaml);
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("now");
    let mut events: Vec<serde_json::Value> = (1..=5)
        .map(|v| {
            let mut e = event("s1", v, "s");
            e["occurredAt"] = json!(now);
            e
        })
        .collect();
    events.push(json!({"not": "an envelope"}));
    publish(&mut conn, &stream, &events);
    drain(&pipeline);

    let mut cmd = ecst();
    cmd.arg("status").arg(&pipeline).arg("--json");
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["length"], 6);
    assert_eq!(report["dead_letters"], 1);
    let group = &report["groups"][0];
    assert_eq!(group["group"], "replica");
    assert_eq!(group["pending"], 0);
    assert_eq!(group["lag"], 0);
    assert!(group["retention_gap"].is_null());
    let sinks = report["sinks"].as_array().expect("sinks");
    assert_eq!(sinks.len(), 2, "{report}");
    for sink in sinks {
        let age = sink["source_age_seconds"]
            .as_f64()
            .unwrap_or_else(|| panic!("{sink}"));
        assert!((0.0..60.0).contains(&age), "{sink}");
        assert!(sink["replicated_age_seconds"].as_f64().is_some(), "{sink}");
    }

    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("other-service")
        .arg("0")
        .query(&mut conn)
        .expect("XGROUP CREATE");
    let mut cmd = ecst();
    cmd.arg("status").arg(&pipeline).args(["--all", "--json"]);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let groups: Vec<&str> = all["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["group"].as_str())
        .collect();
    assert_eq!(groups.len(), 2, "--all lists every group: {groups:?}");
    let other = all["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["group"] == "other-service"))
        .expect("other group");
    assert_eq!(
        other["lag"], 6,
        "a group that read nothing lags by the whole stream"
    );

    let mut cmd = ecst();
    cmd.arg("status").arg(&pipeline);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("group / consumer") && text.contains("replica") && text.contains("postgres"),
        "{text}"
    );
    assert!(!text.contains("\x1b["), "no colours when not on a terminal");
    postgres().execute(&format!("DROP TABLE {table}, {table}_tombstones"));
    cleanup(&mut conn, &stream);
}

#[test]
fn a_taken_metrics_port_fails_the_start_and_says_so() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let stream = unique("observe-port");
    let pipeline = pipeline_file(
        "observe",
        &athletes_pipeline(&stream, &format!("{stream}:"), ""),
    );
    let mut cmd = ecst();
    cmd.arg("run")
        .arg(&pipeline)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")]);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!(
            "cannot serve /metrics: 127.0.0.1:{port} is already in use"
        )),
        "{err}"
    );
    drop(taken);
}

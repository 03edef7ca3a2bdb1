//! `ecst tap` attached to a running worker: the decisions of a known workload, and nothing
//! published once it detached.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// The `ecst_tap_decisions_published_total` of the worker serving metrics on `port`.
fn published(port: u16) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics");
    body.lines().find_map(|l| {
        l.strip_prefix("ecst_tap_decisions_published_total")
            .and_then(|rest| rest.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
    })
}

/// `(entry id, stage, outcome)` of every decision in the tap's NDJSON lines.
fn decisions(lines: &[Value]) -> Vec<(String, String, String)> {
    lines
        .iter()
        .flat_map(|l| {
            let id = l["id"].as_str().unwrap_or_default().to_string();
            l["decisions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |d| {
                    (
                        id.clone(),
                        d["stage"].as_str().unwrap_or_default().to_string(),
                        d["outcome"].as_str().unwrap_or_default().to_string(),
                    )
                })
        })
        .collect()
}

#[test]
fn a_tap_sees_a_workers_decisions_and_detaching_stops_the_publishing() {
    let mut conn = redis();
    let stream = unique("tap");
    let prefix = format!("{stream}:");
    let yaml = athletes_pipeline(&stream, &prefix, "").replace(
        "name: athletes",
        &format!("name: tap-{}", std::process::id()),
    );
    let file = pipeline_file("tap", &yaml);
    let worker = Worker::start(&file, &[]);
    let port = worker.listen_port("Metrics on /metrics");
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the worker to read",
        || published(port) == Some(0.0),
    );

    let mut tap = ecst();
    tap.arg("tap")
        .arg(&file)
        .arg("--limit")
        .arg("3")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut tap = tap.spawn().expect("spawn ecst tap");
    let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
    let reader = {
        let lines = lines.clone();
        let stdout = tap.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).expect("NDJSON when piped");
                lines.lock().expect("lines").push(value);
            }
        })
    };
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the worker to see the tap",
        || worker.log().contains("attached=true"),
    );

    let count = |n: usize| {
        let lines = lines.clone();
        move || lines.lock().map(|l| l.len() >= n).unwrap_or(false)
    };
    let newer = publish(&mut conn, &stream, &[event("a", 2, "Ada")]);
    wait_for_worker(&worker, Duration::from_secs(30), "the first line", count(1));
    let older = publish(&mut conn, &stream, &[event("a", 1, "Old")]);
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the second line",
        count(2),
    );
    let poison: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("v")
        .arg("not json")
        .query(&mut conn)
        .expect("XADD");
    let status = tap.wait().expect("the tap exits after --limit 3");
    reader.join().expect("reader");
    assert!(status.success(), "tap: {status:?}");

    let lines = lines.lock().expect("lines").clone();
    let seen = decisions(&lines);
    let want = |id: &str, stage: &str, outcome: &str| {
        assert!(
            seen.contains(&(id.to_string(), stage.to_string(), outcome.to_string())),
            "no `{stage} {outcome}` for {id} in {lines:#?}"
        );
    };
    want(&newer[0], "latest", "passed");
    want(&newer[0], "cache", "applied");
    want(&older[0], "latest", "stale");
    want(&poison, "decode", "dead_lettered");
    assert_eq!(lines[0]["aggregate_id"], "a");
    assert_eq!(lines[0]["version"], 2);
    let dead = dead_letters(&mut conn, &format!("{stream}.dlq"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["source_id"], poison);
    assert_eq!(
        lines[2]["decisions"][0]["reason"].as_str(),
        Some(dead[0]["error"].as_str()),
        "{lines:#?}"
    );
    assert!(
        !seen
            .iter()
            .any(|(id, stage, _)| id == &older[0] && stage == "cache"),
        "a stale event reached the sink: {lines:#?}"
    );

    // Detached: the worker notices within a second and publishes nothing more.
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the worker to see the tap go",
        || worker.log().contains("attached=false"),
    );
    let before = published(port).expect("the counter");
    assert!(before >= 8.0, "{before}");
    publish(
        &mut conn,
        &stream,
        &[event("b", 1, "Bea"), event("a", 3, "Ada 3")],
    );
    wait_for_worker(&worker, Duration::from_secs(30), "b to be applied", || {
        hash(&mut conn, &format!("{prefix}athlete:b")).get("display_name")
            == Some(&"Bea".to_string())
            && hash(&mut conn, &format!("{prefix}athlete:a")).get("_version")
                == Some(&"3".to_string())
    });
    assert_eq!(published(port), Some(before));
    let (status, log) = worker.terminate();
    assert!(status.success(), "{log}");
    cleanup(&mut conn, &stream);
}

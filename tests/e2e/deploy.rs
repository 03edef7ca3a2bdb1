//! deploy/ cannot run here (no container engine): these tests keep it honest instead. Every
//! file parses, every example file it mounts exists and validates, every metric an alert or a
//! panel uses is one the worker exports, and the ports agree with the binary's defaults.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ecst_pipeline::config::yaml::{self, Node};
use serde_json::Value;

use crate::common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_file(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let node: Node = yaml::parse(&text).unwrap_or_else(|e| panic!("{path}: {}", e.message));
    node.to_json()
}

/// A mapping with its `<<` merge keys applied.
fn merged(value: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(base) = value.get("<<")
        && let Value::Object(base) = merged(base)
    {
        out.extend(base);
    }
    for (k, v) in value.as_object().into_iter().flatten() {
        if k != "<<" {
            let v = if v.is_object() { merged(v) } else { v.clone() };
            out.insert(k.clone(), v);
        }
    }
    Value::Object(out)
}

/// Every metric family the worker exports.
fn exported() -> BTreeSet<String> {
    ecst_pipeline::metrics::render("p", &Arc::new(ecst_pipeline::stats::Stats::default()))
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The `ecst_*` metric names an expression uses, without histogram suffixes.
fn used(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("ecst_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(family.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn alert_rules_use_exported_metrics_and_say_what_to_check() {
    let metrics = exported();
    let rules = yaml_file("deploy/prometheus/alerts.yaml");
    let rules = rules["groups"][0]["rules"].as_array().expect("rules");
    let names: Vec<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for wanted in [
        "EcstReplicaStale",
        "EcstApplyLagHigh",
        "EcstGroupLagGrowing",
        "EcstDeadLettersGrowing",
        "EcstRetentionGap",
        "EcstWorkerNotReady",
    ] {
        assert!(names.contains(&wanted), "no {wanted} in {names:?}");
    }
    for rule in rules {
        let expr = rule["expr"].as_str().expect("expr");
        for metric in used(expr) {
            assert!(
                metrics.contains(&metric),
                "{}: {metric} is not exported",
                rule["alert"]
            );
        }
        assert!(["page", "warn"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")));
        assert!(
            rule["annotations"]["summary"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        );
        assert!(
            rule["annotations"]["description"]
                .as_str()
                .is_some_and(|s| s.len() > 80),
            "{}: the description must say what to check",
            rule["alert"]
        );
    }
}

#[test]
fn the_dashboard_uses_exported_metrics() {
    let metrics = exported();
    let text = std::fs::read_to_string(repo().join("deploy/grafana/dashboards/ecst.json"))
        .expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6);
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            for metric in used(target["expr"].as_str().expect("expr")) {
                assert!(
                    metrics.contains(&metric),
                    "{}: {metric} is not exported",
                    panel["title"]
                );
            }
        }
    }
}

#[test]
fn compose_mounts_existing_examples_and_scrapes_the_metrics_port() {
    let compose = yaml_file("deploy/compose.yaml");
    let services = compose["services"].as_object().expect("services");
    for wanted in [
        "redis",
        "postgres",
        "jaeger",
        "prometheus",
        "grafana",
        "relay",
        "snapshot",
        "worker-1",
        "worker-2",
    ] {
        assert!(services.contains_key(wanted), "no service {wanted}");
    }
    let mut checked = 0;
    for (name, service) in services {
        let service = merged(service);
        for arg in service["command"].as_array().into_iter().flatten() {
            let Some(file) = arg.as_str().and_then(|a| a.strip_prefix("/etc/ecst/")) else {
                continue;
            };
            let path = repo().join("examples").join(file);
            assert!(
                path.exists(),
                "{name} runs {file}, which examples/ does not have"
            );
            let mut cmd = ecst();
            cmd.arg("validate")
                .arg(&path)
                .env("DATABASE_URL", database_url());
            let out = run_with_deadline(cmd, Duration::from_secs(30));
            assert!(out.status.success(), "{name}: {}", stderr_of(&out));
            checked += 1;
        }
        if name.starts_with("worker") {
            assert_eq!(
                service["environment"]["ECST_METRICS_ADDR"], "0.0.0.0:9464",
                "{name}"
            );
        }
    }
    assert!(checked >= 4, "only {checked} example files checked");
    let prometheus = yaml_file("deploy/prometheus/prometheus.yml");
    let targets = &prometheus["scrape_configs"][0]["static_configs"][0]["targets"];
    assert_eq!(
        targets,
        &serde_json::json!(["worker-1:9464", "worker-2:9464"])
    );
    assert!(repo().join("deploy/postgres/01-athletes.sql").exists());

    let mut cmd = ecst();
    cmd.args(["run", "--help"]);
    let help = String::from_utf8_lossy(&run_with_deadline(cmd, Duration::from_secs(10)).stdout)
        .into_owned();
    assert!(
        help.contains("127.0.0.1:9464"),
        "the binary's default metrics port moved: {help}"
    );
}

#[test]
fn the_k8s_deployment_probes_the_worker_and_its_pipeline_validates() {
    let deployment = yaml_file("deploy/k8s/deployment.yaml");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["ports"][0]["containerPort"], 9464);
    let env = container["env"].as_array().expect("env");
    assert!(env.iter().any(|e| e["name"] == "ECST_CONSUMER"
        && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"));
    let config_map = yaml_file("deploy/k8s/configmap.yaml");
    let pipeline = config_map["data"]["pipeline.yaml"]
        .as_str()
        .expect("pipeline.yaml");
    let secret = yaml_file("deploy/k8s/secret.yaml");
    let loaded = ecst_pipeline::config::load_str(
        Path::new("deploy/k8s/configmap.yaml#pipeline.yaml"),
        pipeline,
        &|name| secret["stringData"][name].as_str().map(str::to_string),
    );
    assert!(
        loaded.is_ok(),
        "{}",
        loaded.err().map(|e| e.to_string()).unwrap_or_default()
    );
    let service = yaml_file("deploy/k8s/service.yaml");
    assert_eq!(service["spec"]["ports"][0]["port"], 9464);
}

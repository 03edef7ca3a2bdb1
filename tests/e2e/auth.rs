//! Wrong passwords and narrow ACLs are configuration errors: the start fails with exit
//! status 2 naming the server (password masked), the user and the refused command; when they
//! appear while running, `/readyz` says so.

use std::time::Duration;

use crate::common::*;
use crate::servers::PrivateRedis;

/// A server with an admin password and a user `app` (password `app-secret`) that may run
/// everything but `extra_rule` takes away.
fn server(extra_rule: &str) -> PrivateRedis {
    let rule = extra_rule.to_string();
    PrivateRedis::start_with(move |port| {
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--requirepass",
            "admin-secret",
            // redis-server reads the words after `--user` as one ACL rule line.
            "--user",
            "app",
            "on",
            ">app-secret",
            "~*",
            "&*",
            "+@all",
        ]
        .map(String::from)
        .to_vec();
        args.extend(rule.split_whitespace().map(String::from));
        args
    })
}

fn admin(server: &PrivateRedis) -> redis::Connection {
    redis::Client::open(format!("redis://:admin-secret@127.0.0.1:{}", server.port()))
        .expect("url")
        .get_connection_with_timeout(Duration::from_secs(5))
        .expect("admin connection")
}

fn pipeline(stream: &str, url: &str) -> std::path::PathBuf {
    let yaml = athletes_pipeline(stream, "auth:", &format!("  redis: \"{url}\"\n"));
    pipeline_file("auth", &yaml)
}

/// `ecst run` on `url`; its exit status and stderr, within 30 s.
fn run(stream: &str, url: &str) -> (Option<i32>, String) {
    let mut cmd = ecst();
    cmd.arg("run").arg(pipeline(stream, url));
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    (out.status.code(), stderr_of(&out))
}

#[test]
fn a_wrong_password_stops_the_start_with_exit_2_naming_the_server() {
    let server = server("");
    let (code, stderr) = run(
        &unique("auth-wrong"),
        &format!("redis://app:not-the-password@127.0.0.1:{}", server.port()),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("authentication failed"), "{stderr}");
    assert!(
        stderr.contains(&format!("redis://app:***@127.0.0.1:{}", server.port())),
        "names the server with the password masked: {stderr}"
    );
    assert!(stderr.contains("user `app`"), "{stderr}");
    assert!(!stderr.contains("not-the-password"), "{stderr}");
}

#[test]
fn an_acl_without_evalsha_stops_the_start_with_exit_2_naming_the_command() {
    let server = server("-evalsha");
    let (code, stderr) = run(
        &unique("auth-acl"),
        &format!("redis://app:app-secret@127.0.0.1:{}", server.port()),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("EVALSHA"), "{stderr}");
    assert!(stderr.contains("redis_hash sink `cache`"), "{stderr}");
    assert!(stderr.contains("user `app`"), "{stderr}");
    assert!(!stderr.contains("app-secret"), "{stderr}");
}

#[test]
fn an_acl_without_the_stream_key_stops_the_start_naming_the_key() {
    // `app` may touch only the replica's keys, not the stream.
    let server = server("resetkeys ~auth:*");
    let stream = unique("auth-key");
    let (code, stderr) = run(
        &stream,
        &format!("redis://app:app-secret@127.0.0.1:{}", server.port()),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("XREADGROUP on stream `{stream}`")),
        "{stderr}"
    );
}

#[test]
fn the_right_password_runs() {
    let server = server("");
    let stream = unique("auth-right");
    let mut conn = admin(&server);
    publish(&mut conn, &stream, &[event("r", 1, "Rae")]);
    drain(&pipeline(
        &stream,
        &format!("redis://app:app-secret@127.0.0.1:{}", server.port()),
    ));
    assert_eq!(
        hash(&mut conn, "auth:athlete:r")
            .get("display_name")
            .map(String::as_str),
        Some("Rae")
    );
}

/// The metrics port a worker started with `--metrics-addr 127.0.0.1:0` logged.
/// A worker of user `app` on `server`, once it applied the stream's first event (aggregate
/// `id`) and is ready: the worker, an admin connection, and its metrics port.
fn ready_worker(server: &PrivateRedis, stream: &str, id: &str) -> (Worker, redis::Connection, u16) {
    let mut conn = admin(server);
    publish(&mut conn, stream, &[event(id, 1, "first")]);
    let worker = Worker::start(
        &pipeline(
            stream,
            &format!("redis://app:app-secret@127.0.0.1:{}", server.port()),
        ),
        &["--metrics-addr", "127.0.0.1:0"],
    );
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the first event applied",
        || hash(&mut conn, &format!("auth:athlete:{id}")).contains_key("display_name"),
    );
    let port = worker.listen_port("Metrics on /metrics");
    wait_for_worker(&worker, Duration::from_secs(30), "ready", || {
        http_get(port, "/readyz").0 == 200
    });
    (worker, conn, port)
}

#[test]
fn an_acl_narrowed_while_running_makes_readyz_fail_with_the_reason_until_fixed() {
    let server = server("");
    let stream = unique("auth-live");
    let (worker, mut conn, port) = ready_worker(&server, &stream, "l");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("app")
        .arg("-evalsha")
        .query(&mut conn)
        .expect("ACL SETUSER");
    publish(&mut conn, &stream, &[event("l", 2, "Lee 2")]);
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "not ready, with the reason",
        || {
            let (code, body) = http_get(port, "/readyz");
            code == 503
                && body.contains("redis_hash sink `cache`")
                && body.contains("not permitted")
                && body.contains("evalsha")
        },
    );
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("app")
        .arg("+evalsha")
        .query(&mut conn)
        .expect("ACL SETUSER");
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the retried batch applied",
        || {
            hash(&mut conn, "auth:athlete:l")
                .get("_version")
                .map(String::as_str)
                == Some("2")
        },
    );
    wait_for_worker(&worker, Duration::from_secs(30), "ready again", || {
        http_get(port, "/readyz").0 == 200
    });
    let (status, log) = worker.terminate();
    assert!(status.success(), "{status:?}\n{log}");
    assert_eq!(
        log.matches("Redis refuses this worker").count(),
        1,
        "logged once (a minute): {log}"
    );
    assert!(!log.contains("app-secret"), "{log}");
}

#[test]
fn a_password_changed_while_running_makes_readyz_say_authentication_failed() {
    let server = server("");
    let stream = unique("auth-rotated");
    let (worker, mut conn, port) = ready_worker(&server, &stream, "p");
    let acl = |conn: &mut redis::Connection, args: &[&str]| {
        let _: redis::Value = redis::cmd("ACL").arg(args).query(conn).expect("ACL");
    };
    // The password is rotated and the worker's connections are cut: it must reconnect.
    acl(
        &mut conn,
        &["SETUSER", "app", "resetpass", ">rotated-secret"],
    );
    let _: redis::Value = redis::cmd("CLIENT")
        .arg(&["KILL", "USER", "app"])
        .query(&mut conn)
        .expect("CLIENT KILL");
    publish(&mut conn, &stream, &[event("p", 2, "Pat 2")]);
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "not ready: authentication",
        || {
            let (code, body) = http_get(port, "/readyz");
            code == 503
                && body.contains(&format!(
                    "authentication failed at redis://app:***@127.0.0.1:{} as user `app`",
                    server.port()
                ))
        },
    );
    acl(&mut conn, &["SETUSER", "app", ">app-secret"]);
    wait_for_worker(
        &worker,
        Duration::from_secs(30),
        "the second event applied",
        || {
            hash(&mut conn, "auth:athlete:p")
                .get("_version")
                .map(String::as_str)
                == Some("2")
        },
    );
    wait_for_worker(&worker, Duration::from_secs(30), "ready again", || {
        http_get(port, "/readyz").0 == 200
    });
    let (status, log) = worker.terminate();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        !log.contains("app-secret") && !log.contains("rotated-secret"),
        "{log}"
    );
}

#[test]
fn a_partitioned_worker_whose_acl_misses_the_lease_keys_stops_the_start_naming_them() {
    // `app` may touch the stream's partitions, the replica and the dead letters, but not the
    // partition leases.
    let server = server(
        "resetkeys ~e2e:* ~auth:* ~ecst:fanout-divergent:* ~ecst:freshness:* ~ecst:partitioning:* ~ecst:members:*",
    );
    let stream = unique("auth-lease");
    let yaml = athletes_pipeline(
        &stream,
        "auth:",
        &format!(
            "  redis: \"redis://app:app-secret@127.0.0.1:{}\"\n  partitions: 4\n",
            server.port()
        ),
    );
    let mut cmd = ecst();
    cmd.arg("run").arg(pipeline_file("auth-lease", &yaml));
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("EVAL on key `ecst:lease:{stream}:replica:0`")),
        "{stderr}"
    );
    assert!(!stderr.contains("app-secret"), "{stderr}");
}

#[test]
fn an_acl_without_the_freshness_record_stops_the_start_naming_its_key() {
    // On one server the sink's batch script writes the freshness record in the same call, so
    // the record's key is one the ACL must allow, like the hashes and their tombstones.
    let server = server(
        "resetkeys ~e2e:* ~auth:* ~ecst:fanout-divergent:* ~ecst:partitioning:* ~ecst:members:*",
    );
    let (code, stderr) = run(
        &unique("auth-freshness"),
        &format!("redis://app:app-secret@127.0.0.1:{}", server.port()),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("`ecst:freshness:auth:athlete:{aggregateId}`"),
        "{stderr}"
    );
    assert!(stderr.contains("redis_hash sink `cache`"), "{stderr}");
}

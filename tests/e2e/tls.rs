//! Redis over TLS (`rediss://`): a private `redis-server --tls-port` with a CA and
//! certificates this test makes at run time.

use std::path::PathBuf;
use std::time::Duration;

use ecst_operators::SecretUrl;
use ecst_operators::redis_pool::redis_client;

use crate::common::*;
use crate::servers::{PrivateRedis, make_ca, make_cert};

/// A TLS-only server whose certificate is signed by `ca.crt` and that requires a client
/// certificate signed by it; `certs` also holds `client.crt`/`client.key` and a second,
/// unrelated CA, `other.crt`.
struct TlsServer {
    redis: PrivateRedis,
    certs: PathBuf,
}

fn tls_server() -> TlsServer {
    let certs = std::env::temp_dir().join(unique("tls-certs").replace(':', "_"));
    std::fs::create_dir_all(&certs).expect("cert dir");
    make_ca(&certs, "ca");
    make_ca(&certs, "other");
    make_cert(&certs, "ca", "server", "serverAuth");
    make_cert(&certs, "ca", "client", "clientAuth");
    let file = |name: &str| certs.join(name).display().to_string();
    let (crt, key, ca) = (file("server.crt"), file("server.key"), file("ca.crt"));
    let redis = PrivateRedis::start_with(move |port| {
        [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &crt,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "yes",
        ]
        .map(String::from)
        .to_vec()
    });
    TlsServer { redis, certs }
}

impl TlsServer {
    fn file(&self, name: &str) -> String {
        self.certs.join(name).display().to_string()
    }

    /// `rediss://` to the server trusting the CA file `ca`, with the client certificate.
    fn url(&self, ca: &str) -> String {
        format!(
            "rediss://127.0.0.1:{}/?tls_ca={}&tls_cert={}&tls_key={}",
            self.redis.port(),
            self.file(ca),
            self.file("client.crt"),
            self.file("client.key")
        )
    }
}

fn connect(url: &str) -> redis::Connection {
    redis_client(&SecretUrl::new(url))
        .expect("a valid rediss URL")
        .get_connection_with_timeout(Duration::from_secs(5))
        .expect("a TLS connection with the test CA and client certificate")
}

fn pipeline(stream: &str, url: &str) -> PathBuf {
    let yaml = athletes_pipeline(stream, "tls:", &format!("  redis: \"{url}\"\n"));
    pipeline_file("tls", &yaml)
}

#[test]
fn a_rediss_pipeline_with_its_ca_and_client_certificate_replicates() {
    let server = tls_server();
    let url = server.url("ca.crt");
    let mut conn = connect(&url);
    let stream = unique("tls");
    publish(
        &mut conn,
        &stream,
        &[
            event("a", 1, "Ann"),
            event("b", 1, "Bo"),
            event("a", 2, "Anna"),
        ],
    );
    drain(&pipeline(&stream, &url));
    let a = hash(&mut conn, "tls:athlete:a");
    assert_eq!(a.get("display_name").map(String::as_str), Some("Anna"));
    assert_eq!(a.get("_version").map(String::as_str), Some("2"));
    assert_eq!(
        hash(&mut conn, "tls:athlete:b")
            .get("display_name")
            .map(String::as_str),
        Some("Bo")
    );
    assert_eq!(group_pending(&mut conn, &stream, "replica"), 0);
}

#[test]
fn a_server_certificate_from_another_ca_is_refused_with_exit_status_2() {
    let server = tls_server();
    let mut cmd = ecst();
    cmd.arg("run")
        .arg(pipeline(&unique("tls-wrong-ca"), &server.url("other.crt")));
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(
        stderr.contains(&format!("rediss://127.0.0.1:{}", server.redis.port())),
        "names the server: {stderr}"
    );
}

#[test]
fn insecure_skips_verification_but_still_speaks_tls() {
    let server = tls_server();
    let insecure = format!(
        "rediss://127.0.0.1:{}/?tls_cert={}&tls_key={}#insecure",
        server.redis.port(),
        server.file("client.crt"),
        server.file("client.key")
    );
    let stream = unique("tls-insecure");
    publish(
        &mut connect(&server.url("ca.crt")),
        &stream,
        &[event("i", 1, "Ida")],
    );
    drain(&pipeline(&stream, &insecure));
    let mut conn = connect(&server.url("ca.crt"));
    assert_eq!(
        hash(&mut conn, "tls:athlete:i")
            .get("display_name")
            .map(String::as_str),
        Some("Ida")
    );
}

#[test]
fn validate_explains_bad_tls_options() {
    let yaml = r#"name: tls-options
source:
  redis: "rediss://127.0.0.1:6390/?tls_ca=/nonexistent/ca.pem"
  stream: s
  group: g
stages:
  decode: { type: decode }
  plain:
    type: redis_hash
    input: decode
    redis: "redis://127.0.0.1:6379/?tls_ca=/etc/ca.pem"
    key: "a:{aggregateId}"
  typo:
    type: redis_hash
    input: decode
    redis: "rediss://127.0.0.1:6390/?tls_certificate=/etc/c.pem"
    key: "b:{aggregateId}"
"#;
    let path = pipeline_file("tls-validate", yaml);
    let mut cmd = ecst();
    cmd.arg("validate").arg(&path);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("tls_ca=/nonexistent/ca.pem") && stderr.contains("No such file"),
        "{stderr}"
    );
    assert!(
        stderr.contains("`tls_ca` needs a rediss:// URL"),
        "{stderr}"
    );
    assert!(
        stderr.contains("unknown option `tls_certificate`"),
        "{stderr}"
    );
}

//! A private `redis-server` for tests that reconfigure a server (TLS, passwords, ACL users):
//! on a random port of its own, retried when the port is taken, killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::unique;

/// A running private `redis-server`.
pub struct PrivateRedis {
    pub port: u16,
    child: Child,
}

/// A port in 20000-60000 that differs per call and per process.
fn random_port() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mixed = nanos ^ std::process::id().wrapping_mul(2_654_435_761);
    20_000 + (mixed % 40_000) as u16
}

impl PrivateRedis {
    /// Starts `redis-server` with the arguments `args(port)` returns (so that TLS servers can
    /// put the port on `--tls-port` and set `--port 0`), in a fresh directory, and waits until
    /// it accepts connections. A port already in use is retried with another.
    pub fn start(label: &str, args: impl Fn(u16) -> Vec<String>) -> PrivateRedis {
        let dir = std::env::temp_dir().join(unique(label).replace(':', "_"));
        std::fs::create_dir_all(&dir).expect("temp dir for redis-server");
        for _ in 0..10 {
            let port = random_port();
            let log = dir.join(format!("redis-{port}.log"));
            let mut child = Command::new("redis-server")
                .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(&dir)
                .arg("--logfile")
                .arg(&log)
                .args(args(port))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed (scripts/services.sh installs it)");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("Ready to accept connections") {
                    return PrivateRedis { port, child };
                }
                if let Some(status) = child.try_wait().expect("try_wait") {
                    assert!(
                        text.contains("Address already in use"),
                        "redis-server exited with {status}:\n{text}"
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not start within 20s:\n{text}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("no free port for redis-server after 10 tries");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `openssl` with `args` in `dir`; panics with its output if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a CA `<name>.crt`/`<name>.key` in `dir`.
pub fn make_ca(dir: &Path, name: &str) {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=ecst test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &key,
            "-out",
            &crt,
        ],
    );
}

/// Makes `<name>.crt`/`<name>.key` in `dir`, signed by the CA `ca`, for 127.0.0.1 and
/// localhost, usable as a server (`serverAuth`) or client (`clientAuth`) certificate.
pub fn make_cert(dir: &Path, ca: &str, name: &str, usage: &str) {
    let (crt, key, csr, ext) = (
        format!("{name}.crt"),
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    std::fs::write(
        dir.join(&ext),
        format!(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
        ),
    )
    .expect("write extensions");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    );
}

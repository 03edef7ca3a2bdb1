//! Private servers for tests that kill, pause, flush or restart one: a `redis-server`, a Redis
//! Cluster ([`PrivateCluster`]) and a Postgres cluster of the test's own, on ports of their
//! own, never the shared ones.
//!
//! Ports are picked at random in 20000-60000 and the server itself binds them; a server that
//! finds its port taken says so in its log and is started again on another, so no port is
//! ever probed, released and reused by number.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::common::unique;

mod cluster;
pub use cluster::PrivateCluster;

const PORT_ATTEMPTS: usize = 20;

fn random_port() -> u16 {
    rand::rng().random_range(20_000..60_000)
}

/// A fresh directory under the system temp dir.
fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(label).replace(':', "_"));
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

/// The part of a log file written after `offset` bytes (empty if it does not exist yet).
fn log_since(path: &Path, offset: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default()).into_owned()
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Sends a signal by name (`KILL`, `STOP`, `CONT`) to a process.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed: {status:?}");
}

/// How a start attempt ended.
enum Started {
    Ready,
    PortTaken,
}

/// A `redis-server` of the test's own, persisted in a directory of its own.
pub struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    /// The arguments after `--port <port>`, given the port (a TLS server moves it to
    /// `--tls-port` and sets `--port 0`).
    args: Box<dyn Fn(u16) -> Vec<String>>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts a server with `extra_args` (e.g. `["--appendonly", "yes"]`) on a free port.
    pub fn start(extra_args: &[&str]) -> PrivateRedis {
        let extra: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
        PrivateRedis::start_with(move |_| extra.clone())
    }

    /// Starts a server with the arguments `args(port)` returns, on a free port.
    pub fn start_with(args: impl Fn(u16) -> Vec<String> + 'static) -> PrivateRedis {
        let mut redis = PrivateRedis {
            port: 0,
            dir: temp_dir("redis"),
            args: Box::new(args),
            child: None,
        };
        for _ in 0..PORT_ATTEMPTS {
            redis.port = random_port();
            if let Started::Ready = redis.spawn() {
                return redis;
            }
        }
        panic!("no free port for redis-server after {PORT_ATTEMPTS} attempts");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    fn spawn(&mut self) -> Started {
        let log = self.log_path();
        let offset = file_len(&log);
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args((self.args)(self.port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services.sh installs it)");
        // Our own log saying it is ready proves that this server, not another one, holds the
        // port (a PING could be answered by whoever else bound it).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = log_since(&log, offset);
            if let Some(status) = child.try_wait().expect("try_wait redis-server") {
                if text.contains("Address already in use") {
                    return Started::PortTaken;
                }
                panic!(
                    "redis-server on port {} exited with {status:?}:\n{text}",
                    self.port
                );
            }
            if text.contains("Ready to accept connections") {
                self.child = Some(child);
                return Started::Ready;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-server on port {} not ready within 30s:\n{text}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port the server listens on (its TLS port for a TLS server).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection with 5s timeouts.
    pub fn conn(&self) -> redis::Connection {
        let conn = redis::Client::open(self.url())
            .expect("a valid URL")
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the private redis-server");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        conn.set_write_timeout(Some(Duration::from_secs(5)))
            .expect("write timeout");
        conn
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the server and reaps it; what it acknowledged is only kept if it was persisted
    /// (start it with `--appendonly yes --appendfsync always` for that).
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL redis-server");
            child.wait().expect("reap redis-server");
        }
    }

    /// Starts the server again on the same port and directory (killing it first if it runs).
    pub fn restart(&mut self) {
        self.kill_9();
        match self.spawn() {
            Started::Ready => {}
            Started::PortTaken => panic!(
                "port {} was taken while redis-server was down:\n{}",
                self.port,
                log_since(&self.log_path(), 0)
            ),
        }
    }

    /// SIGSTOPs the server: connections stay open and nothing answers.
    pub fn pause(&self) {
        signal(self.pid().expect("redis-server runs"), "STOP");
    }

    /// SIGCONTs a paused server.
    pub fn resume(&self) {
        signal(self.pid().expect("redis-server runs"), "CONT");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // A stopped process only dies of SIGKILL, but resuming keeps the exit orderly.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(pid.to_string())
                .status();
        }
        self.kill_9();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A Postgres cluster of the test's own (initdb with trust auth), run as the `postgres` OS
/// user, listening on 127.0.0.1 and a socket in its own directory.
pub struct PrivatePostgres {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    running: bool,
}

/// The newest `/usr/lib/postgresql/<version>/bin`.
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed under /usr/lib/postgresql (scripts/services.sh)")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("a PostgreSQL server under /usr/lib/postgresql/*/bin")
}

/// Runs a PostgreSQL program as the `postgres` user (initdb and postgres refuse root).
fn as_postgres(bin: &Path, program: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).arg(bin.join(program));
    cmd.stdin(Stdio::null());
    cmd
}

impl PrivatePostgres {
    /// Creates and starts a cluster on a free port.
    pub fn start() -> PrivatePostgres {
        let bin = postgres_bin();
        let dir = temp_dir("pg");
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("run chown");
        assert!(chown.success(), "chown postgres {}", dir.display());
        let mut pg = PrivatePostgres {
            port: 0,
            dir,
            bin,
            running: false,
        };
        let out = as_postgres(&pg.bin, "initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(pg.data())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for _ in 0..PORT_ATTEMPTS {
            pg.port = random_port();
            if let Started::Ready = pg.pg_ctl_start() {
                return pg;
            }
        }
        panic!("no free port for Postgres after {PORT_ATTEMPTS} attempts");
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn pg_ctl_start(&mut self) -> Started {
        let log = self.log_path();
        let offset = file_len(&log);
        // pg_ctl -w waits for this cluster's own postmaster.pid to say it is ready, so a
        // server of someone else's on the port can never be mistaken for ours.
        let out = as_postgres(&self.bin, "pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={}",
                self.port,
                self.dir.display()
            ))
            .arg("start")
            .output()
            .expect("run pg_ctl start");
        if out.status.success() {
            self.running = true;
            return Started::Ready;
        }
        let text = log_since(&log, offset);
        if text.contains("Address already in use") {
            return Started::PortTaken;
        }
        panic!(
            "pg_ctl start on port {} failed ({:?}): {}{}\nlog:\n{text}",
            self.port,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`): no checkpoint, and
    /// recovery from the WAL on the next start.
    pub fn stop_immediate(&mut self) {
        let out = as_postgres(&self.bin, "pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.data())
            .arg("stop")
            .output()
            .expect("run pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = false;
    }

    /// Starts a stopped server again on the same port.
    pub fn start_again(&mut self) {
        match self.pg_ctl_start() {
            Started::Ready => {}
            Started::PortTaken => panic!(
                "port {} was taken while Postgres was down:\n{}",
                self.port,
                log_since(&self.log_path(), 0)
            ),
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = as_postgres(&self.bin, "pg_ctl")
                .args(["-w", "-m", "immediate", "-D"])
                .arg(self.data())
                .arg("stop")
                .output();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
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

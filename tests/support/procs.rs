//! Real processes for the drills: `stevedore` roles started from the test's
//! own binary, and private instances of Redis and Postgres that a drill may
//! restart or wipe without disturbing the shared services other tests use.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A free loopback port (bound then released; the tiny race is acceptable
/// in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub async fn wait_port(port: u16, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} did not open within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process whose output goes to a log file in the drill's directory.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(
        program: &str,
        args: &[&str],
        env: &[(&str, String)],
        dir: &Path,
        name: &str,
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// A `stevedore` role.
    pub fn stevedore(args: &[&str], env: &[(&str, String)], dir: &Path, name: &str) -> Self {
        Self::spawn(env!("CARGO_BIN_EXE_stevedore"), args, env, dir, name)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap_or_else(|e| panic!("{sig} to {}: {e}", self.name));
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit, failing after `secs`.
    pub async fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit within {secs}s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A redis-server of the drill's own, keeping nothing on disk.
pub struct PrivateRedis {
    pub port: u16,
    proc: Option<Proc>,
    dir: PathBuf,
    /// The certificate, key and CA files when it speaks only TLS.
    tls: Option<[PathBuf; 3]>,
}

impl PrivateRedis {
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, None).await
    }

    /// A server that speaks only TLS (`--port 0`), with the given
    /// certificate, key and CA files, asking clients for no certificate.
    pub async fn start_tls(dir: &Path, cert: &Path, key: &Path, ca: &Path) -> Self {
        Self::start_with(dir, Some([cert.to_owned(), key.to_owned(), ca.to_owned()])).await
    }

    async fn start_with(dir: &Path, tls: Option<[PathBuf; 3]>) -> Self {
        let mut r = Self {
            port: free_port(),
            proc: None,
            dir: dir.to_owned(),
            tls,
        };
        r.up().await;
        r
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    async fn up(&mut self) {
        let port = self.port.to_string();
        let mut args: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .map(String::from)
            .to_vec();
        match &self.tls {
            None => args.extend(["--port".into(), port]),
            Some([cert, key, ca]) => {
                let path = |p: &PathBuf| p.display().to_string();
                args.extend([
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    port,
                    "--tls-cert-file".into(),
                    path(cert),
                    "--tls-key-file".into(),
                    path(key),
                    "--tls-ca-cert-file".into(),
                    path(ca),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ]);
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.proc = Some(Proc::spawn("redis-server", &args, &[], &self.dir, "redis"));
        wait_port(self.port, 20).await;
    }

    /// Kills the server and starts an empty one on the same port.
    pub async fn restart_empty(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(Signal::SIGKILL);
            p.wait_exit(10).await;
        }
        self.up().await;
    }
}

/// A throwaway Postgres cluster (initdb + pg_ctl in a temp dir). Postgres
/// refuses to run as root, so the cluster belongs to the `postgres` user.
pub struct PrivatePostgres {
    pub port: u16,
    data: PathBuf,
    log: PathBuf,
    /// Server options besides the port, socket and listen address.
    extra: &'static str,
}

/// Runs `program ARGS PATH` (chmod, chown), failing the test if it fails.
fn run_on_file(program: &str, args: &[&str], path: &Path) {
    let ok = Command::new(program)
        .args(args)
        .arg(path)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(ok.success(), "{program} {args:?} {}", path.display());
}

fn as_postgres(args: &[&str]) {
    let status = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("runuser");
    assert!(status.success(), "{args:?} failed");
}

impl PrivatePostgres {
    pub async fn start(dir: &Path) -> Self {
        let pg = Self::init(dir, "");
        pg.up().await;
        pg
    }

    /// A cluster that takes TCP logins over TLS only (`hostssl` in
    /// pg_hba.conf), so a client that fell back to plain TCP is refused,
    /// with the given server certificate and key (PEM).
    pub async fn start_tls(dir: &Path, cert_pem: &str, key_pem: &str) -> Self {
        let pg = Self::init(dir, "-c ssl=on");
        let cert = pg.data.join("server.crt");
        let key = pg.data.join("server.key");
        std::fs::write(&cert, cert_pem).expect("server.crt");
        std::fs::write(&key, key_pem).expect("server.key");
        std::fs::write(
            pg.data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .expect("pg_hba.conf");
        // Postgres refuses a key others may read.
        run_on_file("chmod", &["600"], &key);
        for f in [&cert, &key] {
            run_on_file("chown", &["postgres:postgres"], f);
        }
        pg.up().await;
        pg
    }

    fn init(dir: &Path, extra: &'static str) -> Self {
        let root = dir.join("pg");
        std::fs::create_dir_all(&root).expect("pg dir");
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&root)
            .status()
            .expect("chown");
        assert!(ok.success());
        let data = root.join("data");
        let data_s = data.to_str().expect("utf-8 path");
        as_postgres(&[
            "initdb",
            "-D",
            data_s,
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        Self {
            port: free_port(),
            log: root.join("postgres.log"),
            data,
            extra,
        }
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    async fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 {}",
            self.port,
            self.data.display(),
            self.extra,
        );
        as_postgres(&[
            "pg_ctl",
            "-D",
            self.data.to_str().expect("path"),
            "-o",
            &opts,
            "-l",
            self.log.to_str().expect("path"),
            "-w",
            "start",
        ]);
        wait_port(self.port, 30).await;
    }

    pub async fn stop(&self) {
        as_postgres(&[
            "pg_ctl",
            "-D",
            self.data.to_str().expect("path"),
            "-m",
            "fast",
            "-w",
            "stop",
        ]);
    }

    pub async fn start_again(&self) {
        self.up().await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", "pg_ctl", "-D"])
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A RabbitMQ node of the drill's own (own node name, ports, config and
/// data dir), which the drill may stop and start without touching the
/// shared node. rabbitmq-server drops to the `rabbitmq` user, so its
/// directory belongs to that user.
pub struct PrivateRabbit {
    pub port: u16,
    node: String,
    /// Speaks only TLS (`amqps://`).
    tls: bool,
    _proc: Proc,
}

impl PrivateRabbit {
    pub async fn start(dir: &Path) -> Self {
        let port = free_port();
        let conf = format!("listeners.tcp.local = 127.0.0.1:{port}\n");
        Self::start_with(dir, port, &conf, &[], false).await
    }

    /// A node that speaks only TLS (no plain listener), with the given
    /// certificate, key and CA files, asking clients for no certificate.
    pub async fn start_tls(dir: &Path, cert: &Path, key: &Path, ca: &Path) -> Self {
        let port = free_port();
        let base = dir.join("rabbit");
        let p = |f: &str| base.join(f).display().to_string();
        let conf = format!(
            "listeners.tcp = none\n\
             listeners.ssl.default = 127.0.0.1:{port}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_none\n\
             ssl_options.fail_if_no_peer_cert = false\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key"),
        );
        let files = [(ca, "ca.pem"), (cert, "server.pem"), (key, "server.key")];
        Self::start_with(dir, port, &conf, &files, true).await
    }

    /// Starts a node listening on `port` with `conf`, after copying
    /// `files` (source, name) into its directory, where the `rabbitmq`
    /// user can read them.
    async fn start_with(
        dir: &Path,
        port: u16,
        conf: &str,
        files: &[(&Path, &str)],
        tls: bool,
    ) -> Self {
        let node = format!("sdt{port}@localhost");
        let base = dir.join("rabbit");
        std::fs::create_dir_all(base.join("mnesia")).expect("rabbit dirs");
        std::fs::create_dir_all(base.join("log")).expect("rabbit dirs");
        std::fs::write(base.join("enabled_plugins"), "[].\n").expect("plugins file");
        for (from, name) in files {
            std::fs::copy(from, base.join(name)).expect("copy into the node's directory");
        }
        // Own config and env files: the system ones pin the shared node's
        // name and port 5672.
        std::fs::write(base.join("rabbitmq.conf"), conf).expect("conf");
        std::fs::write(base.join("rabbitmq-env.conf"), "").expect("env file");
        let traversable = Command::new("chmod")
            .arg("755")
            .arg(dir)
            .status()
            .expect("chmod");
        let owned = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&base)
            .status()
            .expect("chown");
        assert!(traversable.success() && owned.success());
        let p = |f: &str| base.join(f).display().to_string();
        let env = [
            ("RABBITMQ_NODENAME", node.clone()),
            ("RABBITMQ_NODE_PORT", port.to_string()),
            ("RABBITMQ_DIST_PORT", free_port().to_string()),
            ("RABBITMQ_MNESIA_BASE", p("mnesia")),
            ("RABBITMQ_LOG_BASE", p("log")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins")),
            ("RABBITMQ_CONFIG_FILE", p("rabbitmq.conf")),
            ("RABBITMQ_CONF_ENV_FILE", p("rabbitmq-env.conf")),
            ("RABBITMQ_FEATURE_FLAGS_FILE", p("mnesia/feature_flags")),
            ("RABBITMQ_PID_FILE", p("pid")),
        ];
        let proc = Proc::spawn("rabbitmq-server", &[], &env, dir, "rabbitmq");
        wait_port(port, 90).await;
        Self {
            port,
            node,
            tls,
            _proc: proc,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        format!("{scheme}://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn ctl(&self, args: &[&str]) {
        let ok = Command::new("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmqctl");
        assert!(ok.success(), "rabbitmqctl {args:?}");
    }

    pub fn stop_app(&self) {
        self.ctl(&["stop_app"]);
    }

    pub async fn start_app(&self) {
        self.ctl(&["start_app"]);
        wait_port(self.port, 60).await;
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// What a finished `stevedore` command left: its exit and both streams.
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `stevedore ARGS` to its end (within 60 s) as typed in a terminal,
/// with `env` on top of the test's environment and warnings-only logs.
pub async fn run_stevedore(args: &[&str], env: &[(&str, String)]) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_stevedore"));
    cmd.args(args)
        .stdin(Stdio::null())
        .env("STEVEDORE_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("stevedore {args:?} did not finish within 60s"))
        .expect("run stevedore");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

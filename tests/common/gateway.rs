//! `Gateway`: runs the `tollgate` binary for one test.
//!
//! The YAML given to [`Gateway::start`] may use these placeholders:
//! `{{PROXY_ADDR}}` and `{{ADMIN_ADDR}}` (free `127.0.0.1:<port>` addresses picked
//! here) and `{{DATA_DIR}}` (an empty directory inside the test's temp dir), plus
//! any `{{NAME}}` passed in `vars` to [`Gateway::start_with`]. A placeholder left
//! unsubstituted is a panic, so typos show up at once.
//!
//! Everything lives in a fresh directory under `std::env::temp_dir()`:
//! `config.yaml`, `data/`, `stdout.log`, `stderr.log` (appended across restarts,
//! with a marker line per start). The directory is removed on drop unless the
//! test is panicking or `TOLLGATE_TEST_KEEP` is set; when panicking, the path and
//! the end of the log are printed to stderr.
//!
//! Blocking vs async: [`Gateway::start`] and [`Gateway::restart`] block the calling
//! thread while they poll `/healthz` (std sockets, up to [`READY_TIMEOUT`]). Inside a
//! `#[tokio::test]` that is fine as long as the gateway does not need anything on
//! the test's own runtime (e.g. a `MockProvider`) to become healthy; otherwise use
//! [`Gateway::start_async`] / [`Gateway::restart_async`].

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long `start`/`restart` wait for `GET /healthz` to answer 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A running `tollgate` process. Killed (SIGKILL) on drop.
pub struct Gateway {
    bin: PathBuf,
    dir: PathBuf,
    data_dir: PathBuf,
    config_path: PathBuf,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    child: Option<Child>,
    starts: usize,
    log_reported: bool,
}

impl Gateway {
    /// The `tollgate` binary Cargo built for this integration test. Panics when
    /// the code is not compiled as an integration test of the tollgate crate.
    pub fn binary() -> PathBuf {
        match option_env!("CARGO_BIN_EXE_tollgate") {
            Some(path) => PathBuf::from(path),
            None => panic!(
                "CARGO_BIN_EXE_tollgate is not set: Gateway::start only works in integration \
                 tests of the tollgate crate (use Gateway::start_binary elsewhere)"
            ),
        }
    }

    /// Writes the config, spawns `tollgate --config <file>` and waits (blocking)
    /// until `/healthz` answers 200 and the proxy port accepts connections.
    /// Panics with the process log on failure.
    pub fn start(config_yaml: &str) -> Gateway {
        Self::start_with(config_yaml, &[])
    }

    /// [`Gateway::start`] with extra `{{NAME}}` → value substitutions.
    pub fn start_with(config_yaml: &str, vars: &[(&str, &str)]) -> Gateway {
        Self::start_binary(Self::binary(), config_yaml, vars)
    }

    /// [`Gateway::start_with`] for any binary that takes `--config FILE`.
    pub fn start_binary(
        bin: impl Into<PathBuf>,
        config_yaml: &str,
        vars: &[(&str, &str)],
    ) -> Gateway {
        let mut gateway = Self::spawn(bin, config_yaml, vars);
        gateway.wait_ready();
        gateway
    }

    /// Like [`Gateway::start`], but waits without blocking the async runtime.
    pub async fn start_async(config_yaml: &str) -> Gateway {
        Self::start_with_async(config_yaml, &[]).await
    }

    /// Like [`Gateway::start_with`], but waits without blocking the async runtime.
    pub async fn start_with_async(config_yaml: &str, vars: &[(&str, &str)]) -> Gateway {
        let mut gateway = Self::spawn(Self::binary(), config_yaml, vars);
        gateway.wait_ready_async().await;
        gateway
    }

    /// Prepares the directory, picks ports, writes the config and spawns the
    /// process without waiting for it to become ready.
    pub fn spawn(bin: impl Into<PathBuf>, config_yaml: &str, vars: &[(&str, &str)]) -> Gateway {
        super::clear_of_midnight();
        let dir = unique_dir();
        let data_dir = dir.join("data");
        fs::create_dir_all(&data_dir)
            .unwrap_or_else(|e| panic!("creating {} failed: {e}", data_dir.display()));
        let [proxy_addr, admin_addr] = free_addrs();
        let mut gateway = Gateway {
            bin: bin.into(),
            config_path: dir.join("config.yaml"),
            dir,
            data_dir,
            proxy_addr,
            admin_addr,
            child: None,
            starts: 0,
            log_reported: false,
        };
        gateway.set_config(config_yaml, vars);
        gateway.spawn_child();
        gateway
    }

    /// Rewrites `config.yaml` (same placeholders, same ports and data dir). Takes
    /// effect at the next [`Gateway::restart`], or whenever the gateway reloads.
    pub fn set_config(&mut self, config_yaml: &str, vars: &[(&str, &str)]) {
        let mut text = config_yaml
            .replace("{{PROXY_ADDR}}", &self.proxy_addr.to_string())
            .replace("{{ADMIN_ADDR}}", &self.admin_addr.to_string())
            .replace("{{DATA_DIR}}", &self.data_dir.display().to_string());
        for (name, value) in vars {
            text = text.replace(&format!("{{{{{name}}}}}"), value);
        }
        if let Some(pos) = text.find("{{") {
            let end = text[pos..].find("}}").map_or(text.len(), |e| pos + e + 2);
            panic!(
                "gateway config still contains the placeholder {:?} after substitution \
                 (known: PROXY_ADDR, ADMIN_ADDR, DATA_DIR and vars {:?})",
                &text[pos..end.min(pos + 60)],
                vars.iter().map(|(n, _)| *n).collect::<Vec<_>>()
            );
        }
        fs::write(&self.config_path, text)
            .unwrap_or_else(|e| panic!("writing {} failed: {e}", self.config_path.display()));
    }

    fn spawn_child(&mut self) {
        let open = |name: &str| {
            let path = self.dir.join(name);
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("opening {} failed: {e}", path.display()));
            let _ = writeln!(file, "==== tollgate start #{} ====", self.starts + 1);
            file
        };
        let stdout = open("stdout.log");
        let stderr = open("stderr.log");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config_path)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            cmd.env("RUST_BACKTRACE", "1");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {} failed: {e}", self.bin.display()));
        self.child = Some(child);
        self.starts += 1;
    }

    /// Blocks until ready or [`READY_TIMEOUT`] passes (then panics with the log).
    pub fn wait_ready(&mut self) {
        self.wait_ready_within(READY_TIMEOUT);
    }

    /// Blocks until `/healthz` on the admin address answers 200 and the proxy
    /// address accepts TCP connections. Panics with the log if the process exits
    /// or `timeout` passes.
    pub fn wait_ready_within(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last: String;
        loop {
            self.check_running("while waiting for /healthz");
            match probe_health_blocking(self.admin_addr) {
                Ok(()) => break,
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "GET /healthz on {} did not answer 200 within {timeout:?} (last attempt: {last})",
                    self.admin_addr
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        loop {
            self.check_running("while waiting for the proxy port");
            match TcpStream::connect_timeout(&self.proxy_addr, Duration::from_millis(500)) {
                Ok(_) => return,
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "/healthz is up but the proxy address {} refuses connections after {timeout:?} ({last})",
                    self.proxy_addr
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Async version of [`Gateway::wait_ready`].
    pub async fn wait_ready_async(&mut self) {
        self.wait_ready_within_async(READY_TIMEOUT).await;
    }

    /// Async version of [`Gateway::wait_ready_within`].
    pub async fn wait_ready_within_async(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last: String;
        loop {
            self.check_running("while waiting for /healthz");
            match super::client::try_request_with_timeout(
                self.admin_addr,
                "GET",
                "/healthz",
                &[("connection", "close")],
                b"",
                Duration::from_secs(1),
            )
            .await
            {
                Ok(resp) if resp.status == 200 => break,
                Ok(resp) => last = format!("HTTP {}", resp.status),
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "GET /healthz on {} did not answer 200 within {timeout:?} (last attempt: {last})",
                    self.admin_addr
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        loop {
            self.check_running("while waiting for the proxy port");
            let connect = tokio::net::TcpStream::connect(self.proxy_addr);
            match tokio::time::timeout(Duration::from_millis(500), connect).await {
                Ok(Ok(_)) => return,
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "connect timed out".to_string(),
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "/healthz is up but the proxy address {} refuses connections after {timeout:?} ({last})",
                    self.proxy_addr
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Kills the process and starts it again with the same config file, ports
    /// and data directory; blocks until ready.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_child();
        self.wait_ready();
    }

    /// Async version of [`Gateway::restart`].
    pub async fn restart_async(&mut self) {
        self.stop();
        self.spawn_child();
        self.wait_ready_async().await;
    }

    /// SIGKILLs the process and reaps it. Returns its exit status (None if it
    /// was not running under this handle).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// Sends a signal (`"TERM"`, `"INT"`) via the `kill` command and returns at once;
    /// false if there is no process or it could not be sent.
    pub fn signal(&self, name: &str) -> bool {
        let Some(child) = &self.child else {
            return false;
        };
        Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Whether the process exits (and is reaped) within `within`; it is left running if not.
    pub async fn exits_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.is_running() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Sends SIGTERM, waits up to `grace` for the process to exit, then SIGKILLs it.
    /// Returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let sent = self.signal("TERM");
        let mut child = self.child.take()?;
        if sent {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id, while running under this handle.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// `http://127.0.0.1:<proxy port>`.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy_addr)
    }

    /// `http://127.0.0.1:<admin port>`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// The test's temp directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory substituted for `{{DATA_DIR}}`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// How many times the process was spawned (1 after start, +1 per restart).
    pub fn starts(&self) -> usize {
        self.starts
    }

    /// Everything the process wrote so far, stdout then stderr.
    pub fn log(&self) -> String {
        let read = |name: &str| match fs::read(self.dir.join(name)) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cannot read {name}: {e}>"),
        };
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            read("stdout.log"),
            read("stderr.log")
        )
    }

    fn check_running(&mut self, when: &str) {
        let exited = match &mut self.child {
            None => Some("the process is not running (stopped)".to_string()),
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(format!("tollgate exited with {status}")),
                Ok(None) => None,
                Err(e) => Some(format!("cannot check the tollgate process: {e}")),
            },
        };
        if let Some(reason) = exited {
            self.fail(&format!("{reason} {when}"));
        }
    }

    fn fail(&mut self, message: &str) -> ! {
        self.log_reported = true;
        panic!(
            "{message}\nbinary: {}\nconfig: {}\n{}",
            self.bin.display(),
            self.config_path.display(),
            self.log()
        );
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
        let keep = std::env::var_os("TOLLGATE_TEST_KEEP").is_some();
        if std::thread::panicking() {
            if self.log_reported {
                eprintln!("gateway test dir kept: {}", self.dir.display());
            } else {
                let log = self.log();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(200)..].join("\n");
                eprintln!(
                    "gateway test dir kept: {}\n--- last 200 log lines ---\n{tail}",
                    self.dir.display()
                );
            }
        } else if keep {
            eprintln!("gateway test dir kept: {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn unique_dir() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "tollgate-test-{}-{}-{nanos}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::SeqCst)
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {} failed: {e}", dir.display()));
    dir
}

/// Distinct free loopback addresses: all listeners are held until every port is
/// known, then released. (Another process could grab a port before tollgate
/// binds it; that race is accepted.)
fn free_addrs<const N: usize>() -> [SocketAddr; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 to find a free port"))
        .collect();
    std::array::from_fn(|i| {
        listeners[i]
            .local_addr()
            .expect("local_addr of a port-probe listener")
    })
}

/// One blocking `GET /healthz`; Ok only for status 200.
fn probe_health_blocking(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    let limit = Some(Duration::from_secs(1));
    stream
        .set_read_timeout(limit)
        .and_then(|_| stream.set_write_timeout(limit))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    stream
        .write_all(
            format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut piece = [0u8; 1024];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 8192 {
        match stream.read(&mut piece) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&piece[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let status_line = text.lines().next().unwrap_or("");
    match status_line.split(' ').nth(1) {
        Some("200") => Ok(()),
        _ => Err(format!("status line {status_line:?}")),
    }
}

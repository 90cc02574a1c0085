//! Shared by the end-to-end tests: a child process killed on drop, the controller binary when
//! it has been built, and the member's local API.

#![allow(dead_code, reason = "each test file uses part of the helpers")]
#![allow(unreachable_pub, reason = "shared by the test files, not exported")]

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The member binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_gkm-member");

/// A child process, killed when dropped.
pub struct Running(Option<Child>);

impl Running {
    /// Spawns `cmd` with its output piped.
    pub fn spawn(cmd: &mut Command) -> Self {
        Running(Some(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        ))
    }

    /// Spawns `cmd` with stdout and stderr appended to `log` (a file, so that a verbose child
    /// never blocks on a full pipe).
    pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Self {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        Running(Some(cmd.stdout(out).stderr(err).spawn().expect("spawn")))
    }

    /// If the child has exited: its status, and its stderr when it was piped.
    pub fn exit_report(&mut self) -> Option<String> {
        let child = self.0.as_mut()?;
        let status = child.try_wait().ok()??;
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        Some(format!("{status}; stderr: {stderr}"))
    }

    /// The child's stderr, once (when spawned with its output piped).
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.0.as_mut()?.stderr.take()
    }

    /// Sends signal `sig` (a name, as `kill` takes it).
    pub fn signal(&self, sig: &str) {
        let id = self.0.as_ref().unwrap().id();
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(id.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits at most `limit` for the exit and returns the output.
    pub fn wait(mut self, limit: Duration) -> Output {
        let mut child = self.0.take().unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < limit,
                "process did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The controller binary next to this test's. If it has not been built the test fails saying
/// how to build it, unless `GKM_SKIP_SERVER_TESTS` is set (then `None`: skipped, with a note).
pub fn server_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("gkm-server");
    if !path.exists() {
        // A test that cannot run must not pass: only an explicit choice skips it.
        assert!(
            std::env::var_os("GKM_SKIP_SERVER_TESTS").is_some(),
            "target/debug/gkm-server is not built: run `cargo build -p gkm-server` (or `cargo \
             test --workspace`), or set GKM_SKIP_SERVER_TESTS=1 to skip the tests that need it"
        );
        eprintln!("skipped (GKM_SKIP_SERVER_TESTS): target/debug/gkm-server is not built");
    }
    path.exists().then_some(path)
}

/// The member's answer to `{"op":"current"}`, once it has a key.
pub fn current(socket: &Path) -> Option<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"{\"op\":\"current\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    v["epoch"].is_u64().then_some(v)
}

/// Polls `done` every 100 ms until it holds; panics with `what` after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every socket reports a key, all with the same epoch and KCV.
pub fn converged(sockets: &[&Path], limit: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let answers: Vec<_> = sockets.iter().map(|s| current(s)).collect();
        if let Some(Some(first)) = answers.first()
            && answers.iter().all(|a| {
                a.as_ref()
                    .is_some_and(|a| a["epoch"] == first["epoch"] && a["kcv"] == first["kcv"])
            })
        {
            return first.clone();
        }
        assert!(
            start.elapsed() < limit,
            "members did not converge: {answers:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A controller's and its members' directories and ports on loopback.
pub struct Lab {
    /// The directory holding every state directory (`srv` for the controller).
    pub dir: PathBuf,
    /// The controller binary.
    pub server: PathBuf,
    /// The controller's public key, hex.
    pub key: String,
    /// The controller's TCP port.
    pub tcp: u16,
    /// The multicast port.
    pub mcast: u16,
}

impl Lab {
    /// Runs `gkmctl ARGS` against the lab's controller; its stdout, after asserting success.
    pub fn gkmctl(&self, args: &[&str]) -> String {
        let out = Command::new(self.server.with_file_name("gkmctl"))
            .arg("--socket")
            .arg(self.dir.join("srv").join("control.sock"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "gkmctl {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// A fresh directory with an initialized controller state directory; `offset` separates the
    /// ports of tests that run at once. The ports (20000-29999) lie below the kernel's ephemeral
    /// range (32768-60999), where a connection or UDP socket of any process could hold them.
    pub fn new(tag: &str, server: &Path, offset: u16) -> Lab {
        let dir = std::env::temp_dir().join(format!("gkm-member-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = 20_000 + u16::try_from(std::process::id() % 1000).unwrap() * 10 + offset;
        let (tcp, mcast) = (base, base + 1);
        let init = Command::new(server)
            .args(["init", "--state-dir"])
            .arg(dir.join("srv"))
            .output()
            .unwrap();
        assert!(init.status.success(), "{init:?}");
        let key = String::from_utf8(init.stdout).unwrap();
        let key = key.lines().next().unwrap().trim().to_owned();
        let config_path = dir.join("srv").join("gkm-server.toml");
        let config = std::fs::read_to_string(&config_path)
            .unwrap()
            .replace("47700", &tcp.to_string())
            .replace("47701", &mcast.to_string());
        std::fs::write(&config_path, config).unwrap();
        Lab {
            dir,
            server: server.to_path_buf(),
            key,
            tcp,
            mcast,
        }
    }

    fn spawn(cmd: &mut Command, log: Option<&Path>) -> Running {
        match log {
            Some(log) => Running::spawn_logged(cmd, log),
            None => Running::spawn(cmd),
        }
    }

    /// Starts the controller (output to `log`, or piped) and waits until it listens.
    pub fn controller(&self, log: Option<&Path>) -> Running {
        let srv = self.dir.join("srv");
        let mut cmd = Command::new(&self.server);
        cmd.args(["run", "--state-dir"])
            .arg(&srv)
            .arg("--config")
            .arg(srv.join("gkm-server.toml"));
        if log.is_some() {
            cmd.env("RUST_LOG", "trace");
        }
        let mut controller = Lab::spawn(&mut cmd, log);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.tcp)).is_err() {
            if let Some(report) = controller.exit_report() {
                panic!("the controller exited: {report} (log: {log:?})");
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "controller did not listen on {} (log: {log:?})",
                self.tcp
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        controller
    }

    /// Starts member `name` (state directory `dir/name`) with `extra` arguments, logging at
    /// trace level to `log` if given, else at info level to a pipe.
    pub fn member(&self, name: &str, extra: &[&str], log: Option<&Path>) -> Running {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--group", "demo", "--controller-key", &self.key])
            .args(["--controller", &format!("127.0.0.1:{}", self.tcp)])
            .args(["--multicast", &format!("239.255.77.1:{}", self.mcast)])
            .args(extra)
            .arg("--state-dir")
            .arg(self.dir.join(name))
            .env("RUST_LOG", if log.is_some() { "trace" } else { "info" });
        Lab::spawn(&mut cmd, log)
    }
}

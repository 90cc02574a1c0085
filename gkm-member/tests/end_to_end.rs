//! End to end on loopback with the real controller, when its binary has been built
//! (`cargo build -p gkm-server`); skipped with a note otherwise. Two members, one on multicast
//! and one on fan-out, converge on the same key; a member killed with SIGKILL resumes from its
//! membership file without registering again; SIGTERM makes both leave and exit 0.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gkm-member");

struct Running(Option<Child>);

impl Running {
    fn spawn(cmd: &mut Command) -> Self {
        Running(Some(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        ))
    }

    fn signal(&self, sig: &str) {
        let id = self.0.as_ref().unwrap().id();
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(id.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait(mut self, limit: Duration) -> Output {
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

fn server_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("gkm-server");
    path.exists().then_some(path)
}

fn current(socket: &Path) -> Option<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"{\"op\":\"current\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    v["epoch"].is_u64().then_some(v)
}

/// Waits until every socket reports a key, all with the same epoch and KCV.
fn converged(sockets: &[&Path], limit: Duration) -> serde_json::Value {
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

/// Runs this binary with `args` as uid/gid 65534 (nobody), or says why it cannot.
fn as_nobody(args: &[&str]) -> Result<Output, String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&root.stdout).trim() != "0" {
        return Err("not root".into());
    }
    let run = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
            .args(args)
            .output()
            .map_err(|e| format!("setpriv: {e}"))
    };
    match run(&["--version"]) {
        Ok(out) if out.status.success() => run(args),
        _ => Err(format!("uid 65534 cannot run {BIN}")),
    }
}

/// The API's second line of defence: with the socket opened to everyone (mode 0666, directory
/// 0755), another uid still gets only a refusal.
fn another_uid_is_refused_by_the_api(state: &Path, socket: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let old = std::fs::metadata(state).unwrap().permissions();
    mode(state, 0o755);
    mode(socket, 0o666);
    let out = as_nobody(&["send", "--api-socket", socket.to_str().unwrap(), "hi"]);
    std::fs::set_permissions(state, old).unwrap();
    mode(socket, 0o600);
    match out {
        Err(why) => eprintln!("uid check not exercised: {why}"),
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "another uid was served: {err}");
            assert!(err.contains("refused: this API serves uid 0 only"), "{err}");
        }
    }
    assert!(current(socket).is_some(), "the owner is still served");
}

#[test]
fn members_follow_the_real_controller() {
    let Some(server) = server_binary() else {
        eprintln!("skipped: target/debug/gkm-server is not built (cargo build -p gkm-server)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("gkm-member-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let base = 40_000 + u16::try_from(std::process::id() % 1000).unwrap() * 10;
    let (tcp, mcast) = (base, base + 1);

    let init = Command::new(&server)
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
    let controller = Running::spawn(
        Command::new(&server)
            .args(["run", "--state-dir"])
            .arg(dir.join("srv"))
            .arg("--config")
            .arg(&config_path),
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", tcp)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "controller did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let member = |name: &str, extra: &[&str]| {
        Running::spawn(
            Command::new(BIN)
                .args(["run", "--group", "demo", "--controller-key", &key])
                .args(["--controller", &format!("127.0.0.1:{tcp}")])
                .args(["--multicast", &format!("239.255.77.1:{mcast}")])
                .args(extra)
                .arg("--state-dir")
                .arg(dir.join(name))
                .env("RUST_LOG", "info"),
        )
    };
    let a = member("a", &[]);
    let b = member("b", &["--no-multicast"]);
    let (sa, sb) = (dir.join("a/api.sock"), dir.join("b/api.sock"));
    converged(&[&sa, &sb], Duration::from_secs(15));
    another_uid_is_refused_by_the_api(&dir.join("a"), &sa);

    // Crash b; restart it: it resumes from its membership file, without registering.
    b.signal("KILL");
    drop(b.wait(Duration::from_secs(5)));
    assert!(dir.join("b/membership").exists());
    let b = member("b", &["--no-multicast"]);
    let after = converged(&[&sa, &sb], Duration::from_secs(15));

    a.signal("TERM");
    let out_a = a.wait(Duration::from_secs(10));
    assert_eq!(out_a.status.code(), Some(0));
    // b sees a's departure as a rekey.
    let start = Instant::now();
    while current(&sb).map(|v| v["epoch"].clone()) == Some(after["epoch"].clone()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no rekey after a left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.signal("TERM");
    let out_b = b.wait(Duration::from_secs(10));
    assert_eq!(out_b.status.code(), Some(0));
    let log_b = String::from_utf8_lossy(&out_b.stderr);
    assert!(log_b.contains("resuming membership"), "{log_b}");
    assert!(!log_b.contains("registering with controller"), "{log_b}");
    assert!(String::from_utf8_lossy(&out_b.stdout).contains("kcv"));
    controller.signal("TERM");
    drop(controller.wait(Duration::from_secs(10)));
    let _ = std::fs::remove_dir_all(&dir);
}

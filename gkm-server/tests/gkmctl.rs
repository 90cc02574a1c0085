//! gkmctl's output and exit codes against a real daemon: 0 done, 1 refused (with the daemon's
//! advice), 2 no daemon.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use support::free_port;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SERVER: &str = env!("CARGO_BIN_EXE_gkm-server");
const GKMCTL: &str = env!("CARGO_BIN_EXE_gkmctl");

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Daemon {
    fn start(tag: &str) -> Daemon {
        let dir = std::env::temp_dir().join(format!("gkm-ctl-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("gkm-server.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{}\"\n[[group]]\nname = \"demo\"\n\
                 multicast = \"239.255.79.1:{}\"\n",
                free_port(),
                free_port()
            ),
        )
        .unwrap();
        let child = Command::new(SERVER)
            .args(["run", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let daemon = Daemon { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(daemon.socket()).is_err() {
            assert!(Instant::now() < deadline, "gkm-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("state").join("control.sock")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        gkmctl(&self.socket(), args)
    }
}

fn gkmctl(socket: &PathBuf, args: &[&str]) -> Output {
    Command::new(GKMCTL)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn commands_print_tables_and_json() {
    let d = Daemon::start("ok");
    let out = d.ctl(&["status"]);
    assert_eq!(out.status.code(), Some(0));
    let status = text(&out.stdout);
    assert!(
        status.starts_with("groups     1\nstandby    0\nmembers    0\npublic_key "),
        "{status}"
    );

    let groups = text(&d.ctl(&["groups"]).stdout);
    let mut lines = groups.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        [
            "NAME", "ID", "ROLE", "TERM", "LEADER", "EPOCH", "MEMBERS", "DEGREE", "HEIGHT",
            "PENDING"
        ]
    );
    assert!(lines.next().unwrap().starts_with("demo "));

    assert_eq!(
        text(&d.ctl(&["members", "demo"]).stdout).lines().last(),
        Some("(none)")
    );

    let json: serde_json::Value =
        serde_json::from_slice(&d.ctl(&["--json", "groups"]).stdout).unwrap();
    assert_eq!(json[0]["name"], "demo");
    // Global flags go after the command too, as operators type them (kubectl, ip).
    let after = Command::new(GKMCTL)
        .args(["groups", "--json", "--socket"])
        .arg(d.socket())
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(json[0]["name"], "demo", "{after:?}");

    let out = d.ctl(&["policy", "demo", "--set", "repeats=3"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().eq(["repeats", "3"]))
    );
    // Scripts get an object with typed values, the flag after the command.
    let policy: serde_json::Value =
        serde_json::from_slice(&d.ctl(&["policy", "demo", "--json"]).stdout).unwrap();
    assert_eq!(policy["repeats"], 3, "{policy}");
    assert_eq!(policy["degree"], 4);
    assert_eq!(policy["one_way"], true);
    assert_eq!(policy["enrollment"]["mode"], "open");
    assert!(policy["heartbeat_interval_ms"].is_u64());
    assert_eq!(policy["kem"], serde_json::json!(["x-wing"]));
    let out = d.ctl(&["policy", "demo", "--set", "kem=x25519,x-wing"]);
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().eq(["kem", "x-wing,", "x25519"])),
        "{}",
        text(&out.stdout)
    );

    let out = d.ctl(&["rekey", "demo"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "rekeyed demo\n");

    let dot = text(&d.ctl(&["tree", "demo", "--dot"]).stdout);
    assert!(dot.contains("digraph"), "{dot}");
    let keys = text(&d.ctl(&["keys", "demo"]).stdout);
    assert!(keys.starts_with("members by KEM: "), "{keys}");
    assert!(
        keys.lines().nth(1).is_some_and(|l| l.starts_with("NODE")),
        "{keys}"
    );
    let stats = text(&d.ctl(&["stats", "demo"]).stdout);
    assert!(
        stats
            .lines()
            .any(|l| l.split_whitespace().eq(["rekeys", "1"])),
        "{stats}"
    );
}

#[test]
fn refusals_exit_1_with_the_daemons_advice() {
    let d = Daemon::start("refuse");
    let out = d.ctl(&["members", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "gkmctl: unknown group \"nope\"; `gkmctl groups` lists them\n"
    );
    let out = d.ctl(&["evict", "demo", "99"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("has no member 99; `gkmctl members demo` lists them"));
    let out = d.ctl(&["policy", "demo", "--set", "bogus=1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("unknown or read-only policy key \"bogus\""));
    let out = d.ctl(&["policy", "demo", "--set", "novalue"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is not key=value"));
    assert!(out.stdout.is_empty());
}

/// The control socket's second line of defence: with its mode opened to everyone, another uid
/// is still refused, with advice; the owner is still served.
#[test]
fn another_uid_is_refused_even_when_the_socket_mode_lets_it_in() {
    use std::os::unix::fs::PermissionsExt;
    if !rustix::process::geteuid().is_root() {
        println!("skipped: not root (needs a second uid)");
        return;
    }
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", GKMCTL])
            .args(args)
            .output()
    };
    if !as_nobody(&["--version"]).is_ok_and(|o| o.status.success()) {
        println!("skipped: uid 65534 cannot run {GKMCTL} (setpriv missing or path not readable)");
        return;
    }
    let d = Daemon::start("uid");
    let mode = |path: PathBuf, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    mode(d.dir.clone(), 0o755);
    mode(d.dir.join("state"), 0o711);
    mode(d.socket(), 0o666);
    let out = as_nobody(&["--socket", d.socket().to_str().unwrap(), "status"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("refused: this control socket serves uid 0 only; run gkmctl as that user"),
        "{err}"
    );
    assert!(d.ctl(&["status"]).status.success());
}

#[test]
fn no_daemon_exits_2_and_names_the_socket() {
    let socket = std::env::temp_dir().join(format!("gkm-ctl-none-{}.sock", std::process::id()));
    let out = gkmctl(&socket, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("is gkm-server running?"), "{err}");
    assert!(err.contains(&socket.display().to_string()), "{err}");
}

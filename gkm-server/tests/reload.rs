//! The daemon under systemd: it says READY=1 and STOPPING=1 on `$NOTIFY_SOCKET` (sd_notify), and
//! SIGHUP reloads the groups' policies from its config file: the settings that may change at run
//! time change and are logged, what needs a restart is logged as such, and a bad file changes
//! nothing. Its logs are JSON lines (`--log-format json`).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use support::Server;

/// The next message systemd would get.
fn notified(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Waits (at most 10 s) until the daemon's log has `needle`; the log.
fn log_shows(setup: &Server, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(setup.dir.join("server.log")).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn notifies_systemd_and_reloads_policy_on_sighup() {
    let setup = Server::new("reload", "batch_interval_ms = 100\nrepeats = 2");
    let notify_path = setup.dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut cmd = setup.command();
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .args(["--log-format", "json"]);
    let daemon = setup
        .try_spawn(cmd, &setup.dir.join("server.log"))
        .unwrap_or_else(|(status, log)| panic!("gkm-server exited early ({status}): {log}"));
    assert_eq!(notified(&notify), "READY=1");
    let policy = setup.ctl_json(&["policy", "demo"]);
    assert_eq!(
        (
            policy["batch_interval_ms"].as_u64(),
            policy["repeats"].as_u64()
        ),
        (Some(100), Some(2))
    );

    // Runtime settings change; the tree's degree needs a restart and stays.
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let edited = text
        .replace("batch_interval_ms = 100", "batch_interval_ms = 250")
        .replace(
            "repeats = 2",
            "repeats = 3\ndegree = 8\nkem = [\"x25519\", \"x-wing\"]",
        );
    std::fs::write(&setup.config, &edited).unwrap();
    daemon.signal("HUP");
    let log = log_shows(&setup, "3 setting(s) changed");
    assert!(log.contains("degree"), "{log}");
    let policy = setup.ctl_json(&["policy", "demo"]);
    assert_eq!(policy["batch_interval_ms"], 250, "{policy}");
    assert_eq!(policy["repeats"], 3, "{policy}");
    assert_eq!(policy["degree"], 4, "{policy}");
    assert_eq!(
        policy["kem"],
        serde_json::json!(["x-wing", "x25519"]),
        "{policy}"
    );

    // A bad file is refused whole: the good change beside the bad value is not applied.
    std::fs::write(
        &setup.config,
        edited.replace("repeats = 3", "repeats = 1").replace(
            "batch_interval_ms = 250",
            "batch_interval_ms = 250\nmtu = 10",
        ),
    )
    .unwrap();
    daemon.signal("HUP");
    let log = log_shows(&setup, "refused");
    assert!(log.contains("mtu"), "{log}");
    let policy = setup.ctl_json(&["policy", "demo"]);
    assert_eq!(policy["repeats"], 3, "{policy}");

    daemon.signal("TERM");
    assert_eq!(notified(&notify), "STOPPING=1");
    let out = daemon.wait(Duration::from_secs(20));
    assert!(out.status.success(), "{out:?}");

    // --log-format json: every line an object a log pipeline reads.
    let log = std::fs::read_to_string(setup.dir.join("server.log")).unwrap();
    let mut changed = 0;
    for line in log.lines() {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(
            entry["level"].is_string() && entry["timestamp"].is_string(),
            "{line}"
        );
        if entry["fields"]["message"] == "SIGHUP: policy changed" {
            assert_eq!(entry["fields"]["group"], "demo", "{line}");
            changed += 1;
        }
    }
    assert_eq!(changed, 3, "{log}");
}

//! End to end on loopback with the real controller, when its binary has been built
//! (`cargo build -p gkm-server`); skipped with a note otherwise. Two members, one on multicast
//! and one on fan-out, converge on the same key; a member killed with SIGKILL resumes from its
//! membership file without registering again; SIGTERM makes both leave and exit 0.

mod common;

use std::time::{Duration, Instant};

use common::{Lab, converged, current, server_binary};

#[test]
fn members_follow_the_real_controller() {
    let Some(server) = server_binary() else {
        eprintln!("skipped: target/debug/gkm-server is not built (cargo build -p gkm-server)");
        return;
    };
    let lab = Lab::new("e2e", &server, 0);
    let dir = lab.dir.clone();
    let controller = lab.controller(None);
    let member = |name: &str, extra: &[&str]| lab.member(name, extra, None);
    let a = member("a", &[]);
    let b = member("b", &["--no-multicast"]);
    let (sa, sb) = (dir.join("a/api.sock"), dir.join("b/api.sock"));
    converged(&[&sa, &sb], Duration::from_secs(15));

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

//! `gkm-server run` serves the config in its state directory (GKM-V040): what `init` wrote and
//! the operator edited, not the defaults; a config it cannot serve stops it with the file, line
//! and key; `check-config` says what would be served.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Running, SERVER, Server, new_member, register};

/// The state directory's config with `edit` applied to its text.
fn edit_config(setup: &Server, edit: impl FnOnce(String) -> String) {
    let path = setup.state.join("gkm-server.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
}

/// What `init` wrote, restricted, on this test's ports and multicast address.
fn restricted(setup: &Server, text: &str) -> String {
    text.replace(
        "listen = \"127.0.0.1:47700\"",
        &format!("listen = \"127.0.0.1:{}\"", setup.port),
    )
    .replace(
        "multicast = \"239.255.77.1:47701\"",
        &format!("multicast = \"{}:{}\"", setup.maddr, setup.mport),
    )
    .replace("# enrollment = \"open\"", "enrollment = \"restricted\"")
}

/// `gkm-server ARGS --state-dir STATE`, no --config.
fn server(setup: &Server, args: &[&str]) -> Command {
    let mut cmd = Command::new(SERVER);
    cmd.args(args).arg("--state-dir").arg(&setup.state);
    cmd
}

#[test]
fn v040_run_serves_the_config_in_its_state_directory() {
    let setup = Server::new("state-config", "");
    setup.init(&[]);
    edit_config(&setup, |text| restricted(&setup, &text));

    let check = server(&setup, &["check-config"]).output().unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        said.contains(&format!("127.0.0.1:{}", setup.port)),
        "{said}"
    );
    assert!(said.contains("enrollment      restricted"), "{said}");

    let log = setup.dir.join("server.log");
    let err = std::fs::File::create(&log).unwrap();
    let _daemon = Running::spawn(server(&setup, &["run"]).stdout(Stdio::null()).stderr(err));
    let member_at = |port| {
        let mut member = new_member(7, setup.public_key());
        register(port, &mut member)
    };
    // Served on the edited port (the default port has no one listening, or another test's
    // daemon); a stranger is refused: enrollment is restricted as the file says.
    let mut refused = false;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", setup.port)).is_ok() {
            refused = member_at(setup.port).is_none();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        refused,
        "an unlisted member was admitted or nothing listened: {text}"
    );
    assert!(!text.contains("enrollment is open"), "{text}");
}

#[test]
fn v040_a_config_with_an_unknown_key_stops_the_daemon_naming_file_line_and_key() {
    let setup = Server::new("bad-config", "");
    setup.init(&[]);
    edit_config(&setup, |text| {
        restricted(&setup, &text).replace("ttl = 1\n", "ttl = 1\nenrolment = \"open\"\n")
    });
    let path = setup.state.join("gkm-server.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("enrolment"))
        .unwrap();
    for args in [&["run"][..], &["check-config"][..]] {
        let out = Running::spawn(&mut server(&setup, args)).wait(Duration::from_secs(20));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} accepted the config: {said}"
        );
        assert!(said.contains(&path.display().to_string()), "{said}");
        assert!(said.contains(&format!("line {line}")), "{said}");
        assert!(said.contains("enrolment"), "{said}");
    }
    assert!(
        !setup.state.join("control.sock").exists(),
        "the daemon served"
    );
}

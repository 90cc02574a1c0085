//! End to end on loopback with the real controller, when its binary has been built
//! (`cargo build -p gkm-server`); without it the tests fail saying so, unless
//! `GKM_SKIP_SERVER_TESTS=1`. Two members, one on multicast
//! and one on fan-out, converge on the same key; a member killed with SIGKILL resumes from its
//! membership file without registering again; SIGTERM makes both leave and exit 0. A real rekey
//! moves the send key after the activation delay and drops the old key after the deactivation
//! delay, each announced on `watch` (GKM-V055).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{BIN, Lab, Running, converged, current, server_binary, wait_for};

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
    wait_for(Duration::from_secs(10), "a rekey after a left", || {
        current(&sb).map(|v| v["epoch"].clone()) != Some(after["epoch"].clone())
    });
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

#[test]
fn an_evicted_daemon_says_it_was_evicted_and_registers_again() {
    let Some(server) = server_binary() else {
        return;
    };
    let lab = Lab::new("evicted", &server, 2);
    let controller = lab.controller(None);
    let a = lab.member("a", &[], None);
    let socket = lab.dir.join("a/api.sock");
    let joined = converged(&[&socket], Duration::from_secs(15));
    let id = joined["member"].as_u64().unwrap();
    lab.gkmctl(&["evict", "demo", &id.to_string()]);
    // It notices (heartbeat ahead, then a refused resync) and comes back as a new member.
    wait_for(Duration::from_secs(15), "back after its eviction", || {
        current(&socket).and_then(|v| v["member"].as_u64()) != Some(id)
    });
    a.signal("TERM");
    let out = a.wait(Duration::from_secs(10));
    let log = String::from_utf8_lossy(&out.stderr);
    let told = format!(
        "membership ended: the controller says \"member {id} was evicted by an operator at epoch"
    );
    assert!(log.contains(&told), "{log}");
    controller.signal("TERM");
    drop(controller.wait(Duration::from_secs(10)));
    let _ = std::fs::remove_dir_all(&lab.dir);
}

/// A controller whose group takes X25519 keys only: a member with its default X-Wing key exits
/// at once saying what to do, and, run again with `--kem x25519` in the same state directory,
/// joins with a new key.
#[test]
fn a_member_told_its_kem_is_not_taken_says_so_and_joins_with_the_one_taken() {
    let Some(server) = server_binary() else {
        return;
    };
    let lab = Lab::new("kem", &server, 8);
    let config_path = lab.dir.join("srv").join("gkm-server.toml");
    let config = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace("# kem = \"x-wing\"", "kem = \"x25519\"");
    assert!(
        config.contains("\nkem = \"x25519\""),
        "the default config names kem"
    );
    std::fs::write(&config_path, config).unwrap();
    let controller = lab.controller(None);
    let refused = lab.member("a", &[], None).wait(Duration::from_secs(15));
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let log = String::from_utf8_lossy(&refused.stderr);
    assert!(
        log.contains("does not take this member's x-wing key")
            && log.contains("accepts: x25519")
            && log.contains("--kem x25519"),
        "{log}"
    );
    let member = lab.member("a", &["--kem", "x25519"], None);
    let socket = lab.dir.join("a/api.sock");
    converged(&[&socket], Duration::from_secs(15));
    let members = lab.gkmctl(&["--json", "members", "demo"]);
    let rows: serde_json::Value = serde_json::from_str(&members).unwrap();
    assert_eq!(rows[0]["kem"], "x25519", "{members}");
    member.signal("TERM");
    drop(member.wait(Duration::from_secs(10)));
    controller.signal("TERM");
    drop(controller.wait(Duration::from_secs(10)));
    let _ = std::fs::remove_dir_all(&lab.dir);
}

/// `gkm-member run` for group "other" of `lab`, with `extra` arguments.
fn other_member(lab: &Lab, name: &str, extra: &[&str]) -> Running {
    Running::spawn(
        Command::new(BIN)
            .args(["run", "--group", "other", "--controller-key", &lab.key])
            .args(["--controller", &format!("127.0.0.1:{}", lab.tcp)])
            .args(["--fanout-after-ms", "1500", "--renew-ms", "600000"])
            .args(extra)
            .arg("--state-dir")
            .arg(lab.dir.join(name)),
    )
}

#[test]
fn members_listen_where_the_controller_says_unless_told_otherwise() {
    let Some(server) = server_binary() else {
        return;
    };
    let lab = Lab::new("rekey-address", &server, 4);
    // Group "demo" heartbeats often on the default address; "other" multicasts elsewhere.
    let config = lab.dir.join("srv/gkm-server.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace(
        "# heartbeat_interval_ms = 2000",
        "heartbeat_interval_ms = 200",
    );
    text.push_str(&format!(
        "\n[[group]]\nname = \"other\"\nmulticast = \"239.255.77.3:{}\"\ninterface = \"127.0.0.1\"\nheartbeat_interval_ms = 200\n",
        lab.mcast
    ));
    std::fs::write(&config, text).unwrap();
    let controller = lab.controller(None);
    // p is not told an address: the welcome names the group's. o is told demo's, and keeps it:
    // it hears no rekey of its group there and falls back to fan-out (demo's heartbeats do not
    // count).
    let p = other_member(&lab, "p", &[]);
    let demo_address = format!("239.255.77.1:{}", lab.mcast);
    let o = other_member(&lab, "o", &["--multicast", &demo_address]);
    let sockets = [lab.dir.join("p/api.sock"), lab.dir.join("o/api.sock")];
    converged(&[&sockets[0], &sockets[1]], Duration::from_secs(15));
    for _ in 0..3 {
        lab.gkmctl(&["rekey", "other"]);
    }
    let groups: serde_json::Value =
        serde_json::from_str(&lab.gkmctl(&["--json", "groups"])).unwrap();
    let epoch = groups
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "other")
        .unwrap()["epoch"]
        .as_u64()
        .unwrap();
    wait_for(Duration::from_secs(10), &format!("epoch {epoch}"), || {
        sockets
            .iter()
            .all(|s| current(s).and_then(|v| v["epoch"].as_u64()) >= Some(epoch))
    });
    let log = |member: Running| {
        member.signal("TERM");
        String::from_utf8_lossy(&member.wait(Duration::from_secs(10)).stderr).into_owned()
    };
    let (p, o) = (log(p), log(o));
    let told = format!(
        "multicasts this group's rekeys to 239.255.77.3:{}",
        lab.mcast
    );
    assert!(p.contains(&format!("{told}: listening there")), "{p}");
    assert!(!p.contains("switching to unicast fan-out"), "{p}");
    assert!(
        o.contains(&format!("{told}; staying on {demo_address}")),
        "{o}"
    );
    assert!(o.contains("switching to unicast fan-out"), "{o}");
    controller.signal("TERM");
    drop(controller.wait(Duration::from_secs(10)));
    let _ = std::fs::remove_dir_all(&lab.dir);
}

/// The member's `watch` stream: one JSON value per line, each read within 10 s.
struct Watch(BufReader<UnixStream>);

impl Watch {
    fn open(socket: &Path) -> Watch {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(b"{\"op\":\"watch\"}\n").unwrap();
        Watch(BufReader::new(stream))
    }

    fn next(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.0
            .read_line(&mut line)
            .expect("a watch line within 10 s");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }
}

/// The member's answer to one request.
fn ask(socket: &Path, request: &str) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

#[test]
fn v055_a_real_rekey_moves_senders_after_the_activation_delay_and_drops_the_old_key() {
    let Some(server) = server_binary() else {
        return;
    };
    let lab = Lab::new("delays", &server, 6);
    let controller = lab.controller(None);
    let delays = ["--activation-ms", "1000", "--deactivation-ms", "3000"];
    let a = lab.member("a", &delays, None);
    let socket = lab.dir.join("a/api.sock");
    converged(&[&socket], Duration::from_secs(15));
    let mut watch = Watch::open(&socket);
    let first = watch.next();
    let old = first["epoch"].as_u64().unwrap();
    let reserve = r#"{"op":"reserve","count":1}"#;

    lab.gkmctl(&["rekey", "demo"]);
    // The rekey's line: the new key to accept at once, the old one to send with for 1 s more
    // and to accept for 3 s.
    let rekeyed = (0..10)
        .map(|_| watch.next())
        .find(|v| v["epoch"].as_u64() > Some(old))
        .expect("a line with the new epoch");
    let at = Instant::now();
    assert_eq!(rekeyed["send_epoch"].as_u64(), Some(old), "{rekeyed}");
    assert_eq!(
        rekeyed["accept"][1]["epoch"].as_u64(),
        Some(old),
        "{rekeyed}"
    );
    let drop_in = rekeyed["accept"][1]["drop_in_ms"].as_u64().unwrap();
    assert!((2_000..=3_000).contains(&drop_in), "{rekeyed}");
    let early = ask(&socket, reserve);
    if at.elapsed() < Duration::from_millis(800) {
        assert_eq!(early["epoch"].as_u64(), Some(old), "{early}");
    }
    let new = rekeyed["epoch"].as_u64().unwrap();

    let activated = watch.next();
    assert_eq!(activated["send_epoch"].as_u64(), Some(new), "{activated}");
    assert!(
        at.elapsed() >= Duration::from_millis(900),
        "{:?}",
        at.elapsed()
    );
    assert_eq!(ask(&socket, reserve)["epoch"].as_u64(), Some(new));
    let dropped = watch.next();
    assert_eq!(dropped["accept"].as_array().unwrap().len(), 1, "{dropped}");
    assert_eq!(
        dropped["accept"][0]["epoch"].as_u64(),
        Some(new),
        "{dropped}"
    );
    assert!(
        at.elapsed() >= Duration::from_millis(1_900),
        "{:?}",
        at.elapsed()
    );

    a.signal("TERM");
    assert_eq!(a.wait(Duration::from_secs(10)).status.code(), Some(0));
    controller.signal("TERM");
    drop(controller.wait(Duration::from_secs(10)));
    let _ = std::fs::remove_dir_all(&lab.dir);
}

//! The `gkm-member` binary as a process, on loopback only: `init` file modes, the daemon's API
//! before admission and its clean exit on SIGTERM, `send`/`recv` through a fake API, and, when
//! the controller binary has been built (`target/debug/gkm-server`), an end-to-end run.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{BIN, Running};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gkm-member-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A port for this test run: distinct per call, varied per process, below the kernel's ephemeral
/// range (10000-19999, apart from the end-to-end tests' 20000-29999).
fn port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 10_000 + u16::try_from(std::process::id() % 500).unwrap() * 20;
    base + NEXT.fetch_add(1, Ordering::Relaxed)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_makes_private_key_files_and_refuses_to_overwrite() {
    let dir = temp_dir("init").join("state");
    let out = Command::new(BIN)
        .args(["init", "--state-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let public = String::from_utf8(out.stdout).unwrap();
    assert_eq!(public.trim().len(), 64);
    assert!(public.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("identity.key")), 0o600);
    assert_eq!(mode(&dir.join("hpke.key")), 0o600);
    assert_eq!(
        std::fs::metadata(dir.join("identity.key")).unwrap().len(),
        32
    );
    let before = std::fs::read(dir.join("identity.key")).unwrap();

    let again = Command::new(BIN)
        .args(["init", "--state-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(dir.join("identity.key")).unwrap(), before);
}

fn wait_for(path: &Path, limit: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < limit, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ask(socket: &Path, request: &[u8]) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// A valid Ed25519 public key nobody holds the secret of (the basepoint's encoding would do as
/// well; this one is the RFC 8032 test 1 public key).
const SOME_CONTROLLER_KEY: &str =
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

#[test]
fn daemon_serves_its_api_before_admission_and_exits_cleanly_on_sigterm() {
    let dir = temp_dir("daemon");
    let state = dir.join("state");
    // A corrupt membership file: logged, and the member registers anew.
    let init = Command::new(BIN)
        .args(["init", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(init.status.success());
    std::fs::write(state.join("membership"), b"corrupt").unwrap();
    let dead_controller = format!("127.0.0.1:{}", port());
    let multicast = format!("239.255.77.1:{}", port());
    let daemon = Running::spawn(
        Command::new(BIN)
            .args([
                "run",
                "--group",
                "g",
                "--controller-key",
                SOME_CONTROLLER_KEY,
            ])
            .args(["--controller", &dead_controller, "--multicast", &multicast])
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", "info"),
    );
    let socket = state.join("api.sock");
    wait_for(&socket, Duration::from_secs(10));
    assert_eq!(mode(&socket), 0o600);
    let v = ask(&socket, b"{\"op\":\"current\"}\n");
    assert!(v["error"].as_str().unwrap().contains("not admitted"), "{v}");
    let v = ask(&socket, b"}}}{{{\n");
    assert!(v["error"].is_string(), "{v}");
    daemon.signal("TERM");
    let out = daemon.wait(Duration::from_secs(10));
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(
        log.contains("unusable") && log.contains("registering anew"),
        "{log}"
    );
    assert!(!state.join("membership").exists());
}

#[test]
fn daemon_refuses_a_bad_controller_key_with_advice() {
    let dir = temp_dir("badkey");
    let out = Command::new(BIN)
        .args(["run", "--group", "g", "--controller-key", "zz"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("64 hex digits"), "{err}");
}

/// A stand-in for `gkm-member run`'s API: answers every `current` with a fixed key.
fn fake_api(socket: &Path, epoch: u64, key_byte: u8) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let answer = format!(
                "{{\"group\":42,\"member\":21474836489,\"epoch\":{epoch},\"traffic_key\":\"{}\",\"kcv\":\"0000000000000000\"}}\n",
                hex::encode([key_byte; 32])
            );
            let _ = (&stream).write_all(answer.as_bytes());
        }
    })
}

#[test]
fn send_and_recv_round_trip_through_a_fake_api() {
    let dir = temp_dir("data");
    let socket = dir.join("api.sock");
    let _api = fake_api(&socket, 9, 0x5a);
    let data = format!("239.255.77.2:{}", port());
    let recv = Running::spawn(
        Command::new(BIN)
            .args([
                "recv",
                "--count",
                "2",
                "--timeout-ms",
                "10000",
                "--data",
                &data,
            ])
            .arg("--api-socket")
            .arg(&socket),
    );
    // Wait until recv has joined the group (it says so on stderr).
    let mut recv = recv;
    let mut stderr = BufReader::new(recv.take_stderr().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "{line}");

    // Garbage on the data group is counted, not fatal.
    let raw = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket2::SockRef::from(&raw)
        .set_multicast_if_v4(&std::net::Ipv4Addr::LOCALHOST)
        .unwrap();
    raw.send_to(b"not a frame", &data).unwrap();

    for message in ["first message", "second message"] {
        let out = Command::new(BIN)
            .args(["send", "--data", &data, "--api-socket"])
            .arg(&socket)
            .arg(message)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("epoch 9, sender 5"),
            "sender is the leaf, the member id's high 32 bits: {err}"
        );
    }
    let out = recv.wait(Duration::from_secs(15));
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(out.status.success(), "{rest}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "first message\nsecond message\n"
    );
    assert!(rest.contains("undecryptable: 1"), "{rest}");
}

#[test]
fn recv_without_a_member_says_what_to_do() {
    let dir = temp_dir("noapi");
    let out = Command::new(BIN)
        .args(["recv", "--count", "1", "--timeout-ms", "100"])
        .args(["--data", &format!("239.255.77.2:{}", port())])
        .arg("--api-socket")
        .arg(dir.join("missing.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gkm-member run"), "{err}");
}

#[test]
fn a_save_delay_past_a_day_is_refused_with_its_range() {
    let out = Command::new(BIN)
        .args([
            "run",
            "--group",
            "demo",
            "--controller-key",
            &"00".repeat(32),
        ])
        .args(["--save-after-ms", "18446744073709551615"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--save-after-ms"), "{err}");
    assert!(err.contains("86400000"), "{err}");
}

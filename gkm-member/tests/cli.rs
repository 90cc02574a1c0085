//! The `gkm-member` binary as a process, on loopback only: `init` file modes, the daemon's API
//! before admission and its clean exit on SIGTERM, `send`/`recv` through a fake API (`recv`
//! following its `watch` and refusing a dropped key, GKM-V055), and, when
//! the controller binary has been built (`target/debug/gkm-server`), an end-to-end run.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, Command};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lkh_tree::{Epoch, GroupId, TrafficKey};
use wire::Codec;

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
    assert_eq!(mode(&dir.join("hpke-x-wing.key")), 0o600);
    assert!(
        !dir.join("hpke.key").exists(),
        "an X25519 key only with --kem x25519"
    );
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

/// A `current`/`watch` line of member 21474836489 (leaf 5) of group 42: `accept` lists
/// (epoch, key byte, drop_in_ms), newest first.
fn keys_line(accept: &[(u64, u8, Option<u64>)], send_epoch: u64) -> String {
    let entries: Vec<String> = accept
        .iter()
        .map(|(epoch, byte, drop_in)| {
            let drop_in = drop_in.map(|ms| format!(",\"drop_in_ms\":{ms}"));
            format!(
                "{{\"epoch\":{epoch},\"traffic_key\":\"{}\",\"kcv\":\"0000000000000000\"{}}}",
                hex::encode([*byte; 32]),
                drop_in.unwrap_or_default()
            )
        })
        .collect();
    let (epoch, byte, _) = accept[0];
    format!(
        "{{\"group\":42,\"member\":21474836489,\"epoch\":{epoch},\"traffic_key\":\"{}\",\
         \"kcv\":\"0000000000000000\",\"sender\":5,\"send_epoch\":{send_epoch},\
         \"activate_in_ms\":0,\"accept\":[{}]}}\n",
        hex::encode([byte; 32]),
        entries.join(",")
    )
}

/// What the fake agent serves: the `current` lines set so far (a watch gets each), the send key
/// (epoch, key byte) and the next sequence number.
struct Served {
    lines: Vec<String>,
    send: (u64, u8),
    next_seq: u64,
}

/// A stand-in for `gkm-member run`'s API, for 20 s: `current` answers the last line set,
/// `watch` that line and each one set later, `reserve` one number at a time from 0 up.
struct FakeAgent(Arc<Mutex<Served>>);

impl FakeAgent {
    fn start(socket: &Path, epoch: u64, key_byte: u8) -> Self {
        let served = Arc::new(Mutex::new(Served {
            lines: vec![keys_line(&[(epoch, key_byte, None)], epoch)],
            send: (epoch, key_byte),
            next_seq: 0,
        }));
        let listener = UnixListener::bind(socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::clone(&served);
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let served = Arc::clone(&shared);
                std::thread::spawn(move || FakeAgent::connection(&stream, &served));
            }
        });
        FakeAgent(served)
    }

    /// A new key setting: watchers get `line`, reservations `send`.
    fn set(&self, line: String, send: (u64, u8)) {
        let mut served = self.0.lock().unwrap();
        served.lines.push(line);
        served.send = send;
    }

    fn connection(stream: &UnixStream, served: &Mutex<Served>) {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut request = String::new();
        if BufReader::new(stream).read_line(&mut request).is_err() {
            return;
        }
        let mut writer = stream;
        if request.contains("reserve") {
            let answer = {
                let mut s = served.lock().unwrap();
                s.next_seq += 1;
                format!(
                    "{{\"group\":42,\"member\":21474836489,\"epoch\":{},\"traffic_key\":\"{}\",\
                     \"kcv\":\"0000000000000000\",\"sender\":5,\"first\":{},\"count\":1}}\n",
                    s.send.0,
                    hex::encode([s.send.1; 32]),
                    s.next_seq - 1
                )
            };
            let _ = writer.write_all(answer.as_bytes());
            return;
        }
        let watch = request.contains("watch");
        let mut sent = if watch {
            0
        } else {
            served.lock().unwrap().lines.len() - 1
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            let lines: Vec<String> = served.lock().unwrap().lines[sent..].to_vec();
            for line in &lines {
                if writer.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
            sent += lines.len();
            if !watch {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `recv` on the data group `data` through the API at `socket`, with `args`; its stderr, read
/// up to the line saying it listens.
fn start_recv(socket: &Path, data: &str, args: &[&str]) -> (Running, BufReader<ChildStderr>) {
    let mut recv = Running::spawn(
        Command::new(BIN)
            .arg("recv")
            .args(args)
            .args(["--data", data])
            .arg("--api-socket")
            .arg(socket),
    );
    let stderr = BufReader::new(recv.take_stderr().unwrap());
    let mut stderr = stderr;
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "{line}");
    (recv, stderr)
}

/// Reads `stderr` up to a line containing `what`.
fn read_until(stderr: &mut BufReader<ChildStderr>, what: &str) {
    for _ in 0..100 {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "no line with {what:?}"
        );
        if line.contains(what) {
            return;
        }
    }
    panic!("no line with {what:?} in 100");
}

/// A UDP socket that sends to multicast groups on loopback.
fn multicast_sender() -> std::net::UdpSocket {
    let raw = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket2::SockRef::from(&raw)
        .set_multicast_if_v4(&std::net::Ipv4Addr::LOCALHOST)
        .unwrap();
    raw
}

#[test]
fn send_and_recv_round_trip_through_a_fake_api() {
    let dir = temp_dir("data");
    let socket = dir.join("api.sock");
    let _api = FakeAgent::start(&socket, 9, 0x5a);
    let data = format!("239.255.77.2:{}", port());
    let (recv, mut stderr) = start_recv(&socket, &data, &["--count", "2", "--timeout-ms", "10000"]);

    // Garbage on the data group is counted, not fatal.
    multicast_sender().send_to(b"not a frame", &data).unwrap();

    for (seq, message) in ["first message", "second message"].iter().enumerate() {
        let out = Command::new(BIN)
            .args(["send", "--data", &data, "--api-socket"])
            .arg(&socket)
            .arg(message)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("epoch 9, sender 5, seq {seq}")),
            "sender and sequence number as the member reserved them: {err}"
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
fn v055_recv_follows_the_members_watch_and_refuses_a_dropped_key() {
    let dir = temp_dir("watch");
    let socket = dir.join("api.sock");
    let agent = FakeAgent::start(&socket, 9, 0x09);
    let data = format!("239.255.77.2:{}", port());
    let (recv, mut stderr) = start_recv(&socket, &data, &["--count", "2", "--timeout-ms", "15000"]);
    read_until(&mut stderr, "accepting epochs 9");
    // A member evicted by the rekey to epoch 10 keeps epoch 9's key.
    let frame = |epoch: u64, byte: u8, seq: u64, text: &str| {
        let key = TrafficKey::from_bytes([byte; 32]);
        wire::data::seal(&key, GroupId(42), Epoch(epoch), 99, seq, text.as_bytes()).to_bytes()
    };
    let raw = multicast_sender();
    // The rekey: the member accepts epoch 9's key 1.5 s longer. recv learns it by watch alone.
    agent.set(
        keys_line(&[(10, 0x10, None), (9, 0x09, Some(1_500))], 9),
        (9, 0x09),
    );
    let changed = Instant::now();
    read_until(&mut stderr, "accepting epochs 10, 9");
    raw.send_to(&frame(9, 0x09, 1, "old key, within the delay"), &data)
        .unwrap();
    std::thread::sleep(Duration::from_millis(2_000).saturating_sub(changed.elapsed()));
    raw.send_to(&frame(9, 0x09, 2, "old key, after the delay"), &data)
        .unwrap();
    raw.send_to(&frame(10, 0x10, 1, "new key"), &data).unwrap();
    let out = recv.wait(Duration::from_secs(20));
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(out.status.success(), "{rest}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "old key, within the delay\nnew key\n"
    );
    assert!(rest.contains("retired: 1"), "{rest}");
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

#[test]
fn key_delays_that_cannot_be_served_are_refused_with_what_to_pass() {
    for (activation, deactivation, says) in [
        ("500", "500", "must be longer than the activation delay"),
        ("60001", "600000", "longer than the 60000 ms allowed"),
        ("250", "600001", "longer than the 600000 ms allowed"),
    ] {
        let out = Command::new(BIN)
            .args([
                "run",
                "--group",
                "demo",
                "--controller-key",
                &"00".repeat(32),
            ])
            .args([
                "--activation-ms",
                activation,
                "--deactivation-ms",
                deactivation,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
        assert!(err.contains("pass --activation-ms up to 60000"), "{err}");
    }
}

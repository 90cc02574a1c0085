//! The gkm-server binary end to end on loopback: init, run, a real member registering over TCP
//! and following rekeys by multicast, garbage input, the state-directory lock, crash and restart.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use support::{free_port, now_ms, temp_dir};

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::{SigningKey, VerifyingKey};
use gkm_member::{Member, MemberConfig, MemberEvent};
use lkh_tree::GroupId;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::{HpkeSecret, MemberId};

const SERVER: &str = env!("CARGO_BIN_EXE_gkm-server");
const GKMCTL: &str = env!("CARGO_BIN_EXE_gkmctl");
static NEXT: AtomicU32 = AtomicU32::new(0);

struct Setup {
    dir: PathBuf,
    state: PathBuf,
    config: PathBuf,
    port: u16,
    mport: u16,
    maddr: Ipv4Addr,
    metrics: u16,
}

fn setup(tag: &str) -> Setup {
    let dir = temp_dir(tag);
    let port = free_port();
    let mport = free_port();
    let metrics = free_port();
    let n = u8::try_from(NEXT.fetch_add(1, Ordering::SeqCst) % 200).unwrap();
    let maddr = Ipv4Addr::new(239, 255, 78, 10 + n);
    let config = dir.join("gkm-server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nmetrics = \"127.0.0.1:{metrics}\"\n\n[[group]]\nname = \"demo\"\n\
             multicast = \"{maddr}:{mport}\"\ninterface = \"127.0.0.1\"\nrepeats = 1\n\
             heartbeat_interval_ms = 500\n"
        ),
    )
    .unwrap();
    Setup {
        state: dir.join("state"),
        dir,
        config,
        port,
        mport,
        maddr,
        metrics,
    }
}

/// A running daemon, killed when dropped.
struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Setup {
    fn socket(&self) -> PathBuf {
        self.state.join("control.sock")
    }

    fn spawn(&self) -> Child {
        Command::new(SERVER)
            .args(["run", "--config"])
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Starts the daemon and waits (at most 10 s) until its control socket answers.
    fn start(&self) -> Daemon {
        let mut daemon = Daemon {
            child: self.spawn(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if UnixStream::connect(self.socket()).is_ok() {
                return daemon;
            }
            if let Some(status) = daemon.child.try_wait().unwrap() {
                let mut err = String::new();
                daemon
                    .child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("gkm-server exited early ({status}): {err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("gkm-server did not open its control socket within 10 s");
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(GKMCTL)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        assert!(
            out.status.success(),
            "gkmctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn epoch(&self) -> u64 {
        self.ctl_json(&["groups"])[0]["epoch"].as_u64().unwrap()
    }

    fn public_key(&self) -> VerifyingKey {
        let hex = self.ctl_json(&["status"])["public_key"]
            .as_str()
            .unwrap()
            .to_owned();
        let bytes: [u8; 32] = hex::decode(hex).unwrap().try_into().unwrap();
        VerifyingKey::from_bytes(&bytes).unwrap()
    }

    /// One request over TCP: frame, send, read the reply frame.
    fn request(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut frame = u32::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
        frame.extend_from_slice(bytes);
        s.write_all(&frame).unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).unwrap();
        assert!(reply.len() >= 4, "no reply frame");
        let len = usize::try_from(u32::from_be_bytes(reply[..4].try_into().unwrap())).unwrap();
        assert_eq!(len, reply.len() - 4);
        reply.split_off(4)
    }

    fn multicast_receiver(&self) -> UdpSocket {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, self.mport)).unwrap();
        socket
            .join_multicast_v4(&self.maddr, &Ipv4Addr::LOCALHOST)
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        socket
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Registers a fresh in-process member over TCP; returns it once welcomed.
fn join(setup: &Setup, seed: u64) -> (Member<ChaCha20Rng>, MemberId) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut identity = [0u8; 32];
    rng.fill_bytes(&mut identity);
    let hpke = HpkeSecret::generate(&mut rng);
    let config = MemberConfig::new(GroupId::from_name("demo"), setup.public_key());
    let mut member = Member::new(
        config,
        SigningKey::from_bytes(&identity),
        hpke,
        rng,
        now_ms(),
    );
    let request = member.poll_request().expect("a registration request");
    let reply = setup.request(&request);
    member.handle_reply(now_ms(), &reply);
    while let Some(event) = member.poll_event() {
        if let MemberEvent::Joined { member: id, .. } = event {
            return (member, id);
        }
    }
    panic!("no welcome: reply of {} bytes", reply.len());
}

/// Feeds multicast datagrams to `member` until its epoch reaches `epoch` (at most 5 s).
fn follow(member: &mut Member<ChaCha20Rng>, socket: &UdpSocket, epoch: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < deadline {
        if member.traffic_key().is_some_and(|(e, _)| e.0 >= epoch) {
            return;
        }
        if let Ok(n) = socket.recv(&mut buf) {
            member.handle_datagram(now_ms(), &buf[..n]);
        }
    }
    panic!(
        "member stuck at epoch {:?}, wanted {epoch}; stats {:?}",
        member.traffic_key().map(|(e, _)| e),
        member.stats()
    );
}

/// The identity key `join` gives the member made from `seed`.
fn identity(seed: u64) -> SigningKey {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut identity = [0u8; 32];
    rng.fill_bytes(&mut identity);
    SigningKey::from_bytes(&identity)
}

#[test]
fn init_creates_private_keys_and_prints_the_public_key() {
    let dir = temp_dir("init");
    let state = dir.join("state");
    let out = Command::new(SERVER)
        .args(["init", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap();
    assert_eq!(key.trim().len(), 64);
    assert!(key.trim().chars().all(|c| c.is_ascii_hexdigit()));
    for file in ["controller.key", "storage.key"] {
        let meta = std::fs::metadata(state.join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
        assert_eq!(meta.len(), 32);
    }
    let dir_mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    assert!(state.join("gkm-server.toml").exists());
    // A second init refuses to overwrite.
    let again = Command::new(SERVER)
        .args(["init", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn members_join_over_tcp_and_follow_an_eviction_by_multicast() {
    let setup = setup("evict");
    let _daemon = setup.start();
    let socket = setup.multicast_receiver();
    let (mut first, first_id) = join(&setup, 1);
    let (_second, second_id) = join(&setup, 2);
    assert_ne!(first_id, second_id);
    let epoch = setup.epoch();
    follow(&mut first, &socket, epoch);

    let out = setup.ctl(&["evict", "demo", &second_id.0.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = setup.epoch();
    assert!(after > epoch);
    follow(&mut first, &socket, after);
    let members = setup.ctl_json(&["members", "demo"]);
    assert_eq!(members.as_array().unwrap().len(), 1);
    assert_eq!(members[0]["id"].as_u64(), Some(first_id.0));

    let audit = std::fs::read_to_string(setup.state.join("audit.jsonl")).unwrap();
    assert!(audit.lines().any(|l| l.contains("\"evicted\"")), "{audit}");
    for line in audit.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
}

#[test]
fn garbage_gets_errors_and_the_daemon_keeps_serving() {
    let setup = setup("garbage");
    let _daemon = setup.start();
    // A well-framed request that is not a message: an error message back.
    let reply = setup.request(b"\xffnot a gkm message");
    assert!(!reply.is_empty());
    // Bad frame lengths (0 and > 64 KiB) and a truncated frame: closed without a reply.
    for frame in [&[0u8, 0, 0, 0][..], &[0, 1, 0, 1], &[0, 0, 0, 9, 1]] {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, setup.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(frame).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    // Garbage on UDP (a subscription that is not one).
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    udp.send_to(b"junk", (Ipv4Addr::LOCALHOST, setup.port))
        .unwrap();
    // Garbage on the control socket: error lines, then a valid request still answered.
    let mut c = UnixStream::connect(setup.socket()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"garbage\n{\"cmd\":\"nope\"}\n{\"cmd\":\"status\"}\n")
        .unwrap();
    let mut lines = Vec::new();
    let mut reader = std::io::BufReader::new(c);
    for _ in 0..3 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        lines.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    assert_eq!(lines[0]["ok"], false);
    assert_eq!(lines[1]["ok"], false);
    assert_eq!(lines[2]["ok"], true);
    // An over-long line: an error, connection closed.
    let mut c = UnixStream::connect(setup.socket()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(&vec![b'x'; 70_000]);
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    assert!(answer.contains("longer than"), "{answer}");
    // Still serving: a member joins.
    let (_m, _) = join(&setup, 9);
    assert_eq!(setup.ctl_json(&["status"])["members"], 1);
}

#[test]
fn a_second_daemon_on_the_same_state_dir_fails_clearly() {
    let setup = setup("lock");
    let _daemon = setup.start();
    let mut second = setup.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "second daemon kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("is in use by another gkm-server; stop it or pass --state-dir"),
        "{err}"
    );
    // The first still serves.
    assert!(setup.ctl(&["status"]).status.success());
}

#[test]
fn after_kill_9_the_restarted_controller_continues_with_a_higher_epoch() {
    let setup = setup("restart");
    let daemon = setup.start();
    let (_m, id) = join(&setup, 3);
    let before = setup.epoch();
    assert!(before >= 1);
    drop(daemon); // SIGKILL
    let _daemon = setup.start();
    let after = setup.epoch();
    assert!(
        after > before,
        "epoch {after} after restart, {before} before"
    );
    let members = setup.ctl_json(&["members", "demo"]);
    assert_eq!(members[0]["id"].as_u64(), Some(id.0));
}

#[test]
fn a_daemon_restarted_twice_continues_from_its_saved_deltas() {
    let setup = setup("deltas");
    let daemon = setup.start();
    // The first rekey saves the group in full; the later ones (second join, eviction, each
    // restart's rekey) save deltas on top of it.
    let (_a, a) = join(&setup, 6);
    let (_b, b) = join(&setup, 7);
    let (_c, c) = join(&setup, 8);
    let joined = setup.epoch();
    let out = setup.ctl(&["evict", "demo", &b.0.to_string()]);
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup.epoch() == joined && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut epoch = setup.epoch();
    assert!(epoch > joined, "the eviction was rekeyed");
    drop(daemon); // SIGKILL
    for _ in 0..2 {
        let daemon = setup.start();
        let after = setup.epoch();
        assert!(after > epoch, "epoch {after} after restart, {epoch} before");
        epoch = after;
        let members = setup.ctl_json(&["members", "demo"]);
        let mut ids: Vec<u64> = members
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        ids.sort_unstable();
        let mut want = vec![a.0, c.0];
        want.sort_unstable();
        assert_eq!(ids, want, "the evicted member stays gone");
        drop(daemon);
    }
}

#[test]
fn state_sealed_under_another_storage_key_stops_the_daemon_with_the_file_named() {
    let setup = setup("tamper");
    let daemon = setup.start();
    let (_m, _) = join(&setup, 4);
    drop(daemon);
    // Another storage key: the sealed group state no longer authenticates.
    let key = setup.state.join("storage.key");
    let mut bytes = std::fs::read(&key).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&key, &bytes).unwrap();
    let mut child = setup.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("gkm-server served a state it cannot authenticate");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("state.redb") && err.contains("does not authenticate"),
        "{err}"
    );
}

#[test]
fn a_subscribed_member_gets_datagrams_by_unicast_fan_out() {
    let setup = setup("fanout");
    let _daemon = setup.start();
    let (mut member, id) = join(&setup, 5);
    let epoch = setup.epoch();
    let request = wire::ResyncRequest {
        group: GroupId::from_name("demo"),
        member: id,
        epoch: lkh_tree::Epoch(epoch),
        timestamp_ms: now_ms(),
        nonce: [7; wire::NONCE_LEN],
    };
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    udp.send_to(
        &wire::sign(&request, &identity(5)),
        (Ipv4Addr::LOCALHOST, setup.port),
    )
    .unwrap();
    // Heartbeats (every 500 ms) arrive once the subscription is in.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65_536];
    let first = loop {
        assert!(Instant::now() < deadline, "no fan-out datagram");
        if let Ok((n, from)) = udp.recv_from(&mut buf) {
            break (n, from);
        }
    };
    assert_eq!(first.1.port(), setup.port);
    member.handle_datagram(now_ms(), &buf[..first.0]);
    assert!(setup.ctl(&["rekey", "demo"]).status.success());
    follow(&mut member, &udp, epoch + 1);
}

#[test]
fn metrics_are_served_as_prometheus_text() {
    let setup = setup("metrics");
    let _daemon = setup.start();
    let (_m, _) = join(&setup, 6);
    // Refusals by reason: one that names no group, one that names the group.
    setup.request(b"not a request");
    let stranger = wire::RegistrationRequest {
        group: GroupId(u64::MAX),
        identity: identity(7).verifying_key().to_bytes(),
        hpke_key: HpkeSecret::generate(&mut ChaCha20Rng::seed_from_u64(7))
            .public_key()
            .unwrap(),
        timestamp_ms: now_ms(),
        nonce: [7; 16],
        token: Vec::new(),
    };
    setup.request(&wire::sign(&stranger, &identity(7)));
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, setup.metrics)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");
    assert!(text.contains("gkm_members{group=\"demo\"} 1"), "{text}");
    assert!(
        text.contains("gkm_registrations_total{group=\"demo\"} 1"),
        "{text}"
    );
    for reason in ["malformed", "unknown_group"] {
        let line = format!("gkm_requests_rejected_total{{reason=\"{reason}\"}} 1");
        assert!(text.contains(&line), "{line} missing: {text}");
    }
}

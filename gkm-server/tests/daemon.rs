//! The gkm-server binary end to end on loopback: init, run, a real member registering over TCP
//! and following rekeys by multicast, garbage input, the state-directory lock, crash and restart.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use support::{SERVER, Server, member_keys, new_member, now_ms, register, request, temp_dir};

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use gkm_member::Member;
use lkh_tree::GroupId;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use wire::{HpkeSecret, MemberId};

/// The daemon these tests run: group "demo", one copy per rekey, heartbeats every 500 ms.
fn setup(tag: &str) -> Server {
    Server::new(tag, "repeats = 1\nheartbeat_interval_ms = 500")
}

/// `gkm-server run` on `setup`, its output piped, not waited for.
fn spawn(setup: &Server) -> Child {
    setup
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Registers a fresh in-process member over TCP; returns it once welcomed.
fn join(setup: &Server, seed: u64) -> (Member<ChaCha20Rng>, MemberId) {
    let mut member = new_member(seed, setup.public_key());
    let id = register(setup.port, &mut member).expect("a welcome");
    (member, id)
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
    member_keys(seed).0
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
    // The welcome names the group's multicast address, as the config has it.
    let configured = SocketAddr::from((setup.maddr, setup.mport));
    assert_eq!(first.rekey_address(), Some(configured));
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
    let reply = request(setup.port, b"\xffnot a gkm message").unwrap();
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
    let mut second = spawn(&setup);
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
    // Its first act is a rekey; the control socket may answer before that rekey is durable.
    let mut after = setup.epoch();
    for _ in 0..100 {
        if after > before {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        after = setup.epoch();
    }
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
        // Its first act is a rekey; the control socket may answer before that rekey is durable.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut after = setup.epoch();
        while after <= epoch && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            after = setup.epoch();
        }
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
    let mut child = spawn(&setup);
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
    let (mut member, _) = join(&setup, 5);
    let epoch = setup.epoch();
    // The member's own state machine subscribes: it asks, echoes the cookie, and is confirmed.
    member.use_fanout(now_ms());
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = vec![0u8; 65_536];
    let mut kinds = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    // Heartbeats (every 500 ms) arrive once the address is confirmed.
    while !kinds.contains(&wire::MessageType::Heartbeat) {
        assert!(Instant::now() < deadline, "no fan-out datagram: {kinds:?}");
        member.handle_timeout(now_ms());
        while let Some(bytes) = member.poll_datagram() {
            udp.send_to(&bytes, (Ipv4Addr::LOCALHOST, setup.port))
                .unwrap();
        }
        if let Ok((n, from)) = udp.recv_from(&mut buf) {
            assert_eq!(from.port(), setup.port);
            kinds.push(wire::MessageType::peek(&buf[..n]).unwrap());
            member.handle_datagram(now_ms(), &buf[..n]);
        }
    }
    assert_eq!(kinds[0], wire::MessageType::CookieReply, "{kinds:?}");
    assert!(setup.ctl(&["rekey", "demo"]).status.success());
    follow(&mut member, &udp, epoch + 1);
}

#[test]
fn metrics_are_served_as_prometheus_text() {
    let setup = Server::new(
        "metrics",
        "repeats = 1\n\n[[group]]\nname = \"other\"\nmulticast = \"239.255.82.9:9\"\n\
         interface = \"127.0.0.1\"",
    );
    let _daemon = setup.start();
    let (_m, _) = join(&setup, 6);
    // Refusals by reason: one that names no group, one that names the group.
    request(setup.port, b"not a request").unwrap();
    let stranger = wire::RegistrationRequest {
        group: GroupId(u64::MAX),
        identity: identity(7).verifying_key().to_bytes(),
        hpke_key: HpkeSecret::generate(wire::Kem::XWing, &mut ChaCha20Rng::seed_from_u64(7))
            .public_key()
            .unwrap(),
        timestamp_ms: now_ms(),
        nonce: [7; 16],
        token: Vec::new(),
    };
    request(setup.port, &wire::sign(&stranger, &identity(7))).unwrap();
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
    assert!(text.contains("gkm_members{group=\"other\"} 0"), "{text}");
    // OpenMetrics (prometheus-client): a counter family `gkm_NAME` has samples `gkm_NAME_total`.
    assert!(text.contains("# TYPE gkm_rekeys counter\n"), "{text}");
    assert!(text.contains("# TYPE gkm_members gauge\n"), "{text}");
    assert!(
        text.contains("Content-Type: application/openmetrics-text"),
        "{text}"
    );
    // Each family once, HELP and TYPE first, then all its samples together (both groups').
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    assert!(body.ends_with("# EOF\n"), "{body}");
    let mut families = Vec::new();
    for line in body.lines().filter(|l| *l != "# EOF") {
        if let Some(family) = line.strip_prefix("# TYPE ") {
            families.push(family.split(' ').next().unwrap());
        } else if !line.starts_with("# HELP ") {
            let sample = line.split(['{', ' ']).next().unwrap();
            let name = sample.strip_suffix("_total").unwrap_or(sample);
            assert_eq!(
                Some(&name),
                families.last(),
                "{line} outside its family: {body}"
            );
        }
    }
    let mut once = families.clone();
    once.sort_unstable();
    once.dedup();
    assert_eq!(once.len(), families.len(), "a family twice: {families:?}");
}

#[test]
fn more_members_than_the_old_connection_cap_wait_for_one_batch_and_all_get_welcomes() {
    // A connection stays open until its batch is rekeyed; with a fixed cap of 256 the rest were
    // refused, so a long batch interval capped registrations at 256 per batch.
    const MEMBERS: u64 = 300;
    let setup = Server::new("connections", "repeats = 1\nbatch_interval_ms = 4000");
    let _daemon = setup.start();
    let key = setup.public_key();
    let members: Vec<_> = (0..MEMBERS)
        .map(|seed| {
            let mut member = new_member(100 + seed, key);
            let bytes = member.poll_request().unwrap();
            (member, bytes)
        })
        .collect();
    let port = setup.port;
    let threads: Vec<_> = members
        .into_iter()
        .map(|(mut member, bytes)| {
            std::thread::spawn(move || {
                let reply = request(port, &bytes).ok()?;
                member.handle_reply(now_ms(), &reply);
                std::iter::from_fn(|| member.poll_event()).find_map(|event| match event {
                    gkm_member::MemberEvent::Joined { epoch, .. } => Some(epoch.0),
                    _ => None,
                })
            })
        })
        .collect();
    let epochs: Vec<Option<u64>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let welcomed = epochs.iter().flatten().count();
    assert_eq!(welcomed, epochs.len(), "welcomed {welcomed} of {MEMBERS}");
    assert!(
        epochs.iter().all(|e| *e == Some(1)),
        "one batch admits them all: {epochs:?}"
    );
}

/// With batching, `gkmctl evict` answers once the batch's rekey is durable and sent, not when the
/// eviction is queued: "rekeyed" is then true (before, it answered at once, and a controller
/// deposed or stopped before the batch left the operator believing in an eviction that never
/// happened).
#[test]
fn an_eviction_with_batching_is_answered_once_its_batch_is_rekeyed() {
    let setup = Server::new("batched-evict", "repeats = 1\nbatch_interval_ms = 1500");
    let _daemon = setup.start();
    // A registration waits for its batch too: register in the background.
    let port = setup.port;
    let key = setup.public_key();
    let joined = std::thread::spawn(move || {
        let mut member = new_member(31, key);
        register(port, &mut member)
    });
    let id = joined.join().unwrap().expect("a welcome");
    let before = setup.epoch();
    let asked = Instant::now();
    let out = setup.ctl(&["evict", "demo", &id.0.to_string()]);
    let took = asked.elapsed();
    assert!(out.status.success(), "{out:?}");
    assert!(
        took >= Duration::from_millis(1_000),
        "answered after {took:?}, before the batch was due"
    );
    assert!(setup.epoch() > before, "the eviction's rekey is done");
    let members = setup.ctl_json(&["members", "demo"]);
    assert_eq!(members.as_array().map(Vec::len), Some(0), "{members}");
}

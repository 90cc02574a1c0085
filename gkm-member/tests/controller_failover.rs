//! The member daemon with several controllers (`--controller A --controller B`), against fake
//! controllers on loopback TCP that record what reaches them: a controller that does not lead
//! the group (status 421, naming the leader) sends the member to the leader it names when that
//! is a configured controller, and only then; a controller that refuses connections is passed
//! over for the next. A member resuming its membership keeps it: its requests at the new
//! controller are resyncs, never registrations.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "the binary's modules are compiled into this test; not every item is used"
)]

#[path = "../src/bin/gkm-member/storage_key.rs"]
mod storage_key;
#[path = "../src/bin/gkm-member/store.rs"]
mod store;

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lkh_tree::{Batch, GroupId, KeyTree, MemberPath, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use wire::{Codec, ErrorMessage, Kem, MemberId, MessageType, ResyncRequest, Status};

/// A valid Ed25519 public key nobody holds the secret of (RFC 8032 test 1): no welcome or rekey
/// can verify, which these tests do not need.
const SOME_CONTROLLER_KEY: &str =
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
const GROUP: &str = "demo";
const MEMBER: MemberId = MemberId(5 << 32 | 7);
/// How long anything may take here.
const LIMIT: Duration = Duration::from_secs(15);

/// A request as a fake controller received it.
#[derive(Clone)]
struct Received {
    at: Instant,
    bytes: Vec<u8>,
}

impl Received {
    fn kind(&self) -> MessageType {
        MessageType::peek(&self.bytes).unwrap()
    }
}

/// A fake controller: accepts connections on loopback, records each request frame and answers
/// every one with the same error message.
struct Fake {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Fake {
    fn start(status: Status, reason: impl Fn() -> String + Send + 'static) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        // Runs until the test process ends (nothing connects after the daemon is gone).
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let Some(bytes) = read_frame(&mut stream) else {
                    continue;
                };
                let at = Instant::now();
                log.lock().unwrap().push(Received { at, bytes });
                let answer = ErrorMessage {
                    group: GroupId::from_name(GROUP),
                    status,
                    reason: reason(),
                }
                .to_bytes();
                let len = u32::try_from(answer.len()).unwrap().to_be_bytes();
                let _ = stream.write_all(&len);
                let _ = stream.write_all(&answer);
            }
        });
        Fake { addr, received }
    }

    /// A controller that does not lead the group and names `leader`.
    fn not_leader(leader: Arc<Mutex<String>>) -> Fake {
        Fake::start(Status::NotLeader, move || leader.lock().unwrap().clone())
    }

    /// The leader, busy: it answers 503, so the member stays with it and asks again later.
    fn busy_leader() -> Fake {
        Fake::start(Status::Unavailable, || "busy".into())
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until a request arrived; the first.
    fn first(&self) -> Received {
        common::wait_for(LIMIT, &format!("a request at {}", self.addr), || {
            !self.received().is_empty()
        });
        self.received()[0].clone()
    }
}

fn read_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).ok()?;
    let len = usize::try_from(u32::from_be_bytes(prefix)).ok()?;
    if !(1..=65_536).contains(&len) {
        return None;
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

/// An address on loopback where nothing listens (bound, then released).
fn refusing() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("gkm-member-failover-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A member's path in a small tree of the group.
fn a_path() -> MemberPath {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut tree =
        KeyTree::new(GroupId::from_name(GROUP), TreeConfig::default(), &mut rng).unwrap();
    let batch = Batch {
        leaves: vec![],
        joins: 5,
    };
    tree.rekey(&batch, &mut rng).unwrap().joiners[2]
        .path
        .clone()
}

/// A state directory holding a membership the daemon resumes (its sequence file vouches for
/// the keys); the member's identity key.
fn resumable(state: &Path) -> ed25519_dalek::VerifyingKey {
    let dir = store::StateDir::new(state);
    let identity = dir.init(Kem::XWing).unwrap();
    dir.save_membership(GroupId::from_name(GROUP), MEMBER, &a_path(), Kem::XWing)
        .unwrap();
    dir.save_sequence(0).unwrap();
    identity
}

/// The member daemon for group "demo" asking `controllers` in order.
fn daemon(state: &Path, controllers: &[SocketAddr], offset: u32) -> common::Running {
    let multicast = format!(
        "239.255.77.1:{}",
        40_000 + (std::process::id() % 1_000) * 4 + offset
    );
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.args([
        "run",
        "--group",
        GROUP,
        "--controller-key",
        SOME_CONTROLLER_KEY,
    ]);
    for c in controllers {
        cmd.args(["--controller", &c.to_string()]);
    }
    cmd.args(["--multicast", &multicast, "--renew-ms", "600000"])
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "info");
    common::Running::spawn(&mut cmd)
}

/// Stops the daemon (SIGTERM) and returns its log.
fn stop(member: common::Running) -> String {
    member.signal("TERM");
    let out = member.wait(LIMIT);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_standby_naming_a_configured_leader_sends_the_resuming_member_there_without_registering() {
    let dir = temp_dir("named");
    let state = dir.join("member");
    let identity = resumable(&state);
    let leader = Fake::busy_leader();
    let standby = Fake::not_leader(Arc::new(Mutex::new(leader.addr.to_string())));

    let member = daemon(&state, &[standby.addr, leader.addr], 0);
    let asked = standby.first();
    let followed = leader.first();
    // Both are resyncs of the stored membership: the member never registers again.
    for request in [&asked, &followed] {
        assert_eq!(request.kind(), MessageType::ResyncRequest);
        let resync: wire::Verified<ResyncRequest> = wire::open(&request.bytes, &identity).unwrap();
        assert_eq!(resync.message().member, MEMBER);
    }
    // Promptly (50-200 ms after the 421), not after the back-off of a refusal (2 s and more).
    let gap = followed.at.duration_since(asked.at);
    assert!(
        gap < Duration::from_millis(1_500),
        "asked the leader {gap:?} later"
    );
    // It stays with the leader (which answers 503: asked again there, after 2-3 s).
    std::thread::sleep(Duration::from_millis(3_500));
    assert_eq!(standby.received().len(), 1, "the standby is asked no more");
    assert!(leader.received().len() >= 2, "the leader is asked again");
    assert!(
        leader
            .received()
            .iter()
            .all(|r| r.kind() == MessageType::ResyncRequest),
        "no registration"
    );

    let log = stop(member);
    eprintln!("LOG<<{log}>>");
    let said = format!(
        "controller {} does not lead group demo; asking {}",
        standby.addr, leader.addr
    );
    assert!(log.contains(&said), "{log}");
    // The leave at SIGTERM goes to the current controller too.
    assert_eq!(
        leader.received().last().map(Received::kind),
        Some(MessageType::Leave),
        "{log}"
    );
    assert_eq!(standby.received().len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_leader_named_outside_the_configured_controllers_is_not_followed() {
    let dir = temp_dir("unlisted");
    let state = dir.join("member");
    // Listening, but not a --controller: a forged 421 must not redirect the member there.
    let stranger = Fake::busy_leader();
    let next = Fake::busy_leader();
    let standby = Fake::not_leader(Arc::new(Mutex::new(stranger.addr.to_string())));

    let member = daemon(&state, &[standby.addr, next.addr], 1);
    let asked = standby.first();
    assert_eq!(asked.kind(), MessageType::RegistrationRequest);
    let followed = next.first();
    assert_eq!(followed.kind(), MessageType::RegistrationRequest);
    assert!(followed.at.duration_since(asked.at) < Duration::from_millis(1_500));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        stranger.received().is_empty(),
        "nothing reached the named stranger"
    );

    let log = stop(member);
    eprintln!("LOG<<{log}>>");
    assert!(
        log.contains(&format!(
            "controller {} names {} as the leader of group demo, which is not one of the \
             --controller addresses",
            standby.addr, stranger.addr
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "controller {} does not lead group demo; asking {}",
            standby.addr, next.addr
        )),
        "{log}"
    );
    assert!(stranger.received().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_controller_refusing_connections_is_passed_over_for_the_next() {
    let dir = temp_dir("refused");
    let state = dir.join("member");
    let identity = resumable(&state);
    let dead = refusing();
    let leader = Fake::busy_leader();

    let started = Instant::now();
    let member = daemon(&state, &[dead, leader.addr], 2);
    let followed = leader.first();
    assert_eq!(followed.kind(), MessageType::ResyncRequest);
    let resync: wire::Verified<ResyncRequest> = wire::open(&followed.bytes, &identity).unwrap();
    assert_eq!(
        resync.message().member,
        MEMBER,
        "the stored membership, kept"
    );
    // Refused at once, then asked again promptly: before the member's own retry (2 s).
    let took = followed.at.duration_since(started);
    assert!(
        took < Duration::from_millis(2_000),
        "reached the next after {took:?}"
    );

    let log = stop(member);
    eprintln!("LOG<<{log}>>");
    assert!(
        log.contains(&format!(
            "controller {dead} cannot be reached for group demo; asking {}",
            leader.addr
        )),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

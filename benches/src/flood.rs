//! A registration flood against a real `gkm-server` on loopback, and one legitimate member
//! registering through it (GKM-V034; the `flood` binary and the `flood` test).
//!
//! Attackers, each kind on its own threads, until [`Flood::stop`]:
//! - garbage: well-framed random bytes (the controller answers `Malformed`);
//! - oversize: a frame header announcing 1 MiB (closed unread);
//! - unknown keys: valid, signed registrations from fresh identities not on the group's allow
//!   list (`Unauthorized`);
//! - bad signatures: the allowed identity's request with its signature altered (`BadSignature`);
//! - replays: a captured valid request sent again (`Replayed`);
//! - forged resyncs: resync requests naming the legitimate member, signed by other keys
//!   (answered as naming no member, counted as `BadSignature`; their signature is checked off
//!   the controller's thread, GKM-V058);
//! - forged fan-out subscriptions naming the legitimate member, by UDP, from one thread as fast
//!   as it can send (their signatures too are checked off the controller's thread);
//! - slowloris: connections opened and held without sending a byte, reopened when closed.
//!
//! Attackers connect from 127.0.0.2 (any 127/8 address is loopback); the legitimate member from
//! 127.0.0.1.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{SigningKey, VerifyingKey};
use lkh_tree::GroupId;
use lkh_tree::{Epoch, Kcv};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use wire::{
    HpkePublicKey, HpkeSecret, Kem, MemberId, MessageType, RegistrationRequest, ResyncRequest,
    SealedPath, open, sign,
};

/// Where attackers connect from.
pub const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the legitimate member waits before retrying a failed attempt.
const RETRY: Duration = Duration::from_millis(200);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The controller under test.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// Its request address.
    pub addr: SocketAddr,
    /// The group.
    pub group: GroupId,
    /// Its public key.
    pub controller: VerifyingKey,
}

/// A member identity: the key that signs its requests and the HPKE key welcomes are sealed to.
pub struct Identity {
    /// Ed25519 identity.
    pub signing: SigningKey,
    /// X-Wing public key.
    pub hpke_key: HpkePublicKey,
}

impl Identity {
    /// The identity made from `seed`.
    pub fn from_seed(seed: u64) -> Identity {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        let hpke_key = HpkeSecret::generate(Kem::XWing, &mut rng)
            .public_key()
            .expect("an X-Wing secret has a public key");
        Identity {
            signing: SigningKey::from_bytes(&key),
            hpke_key,
        }
    }

    /// The identity key, hex (as the config's allow list takes it).
    pub fn public_hex(&self) -> String {
        hex::encode(self.signing.verifying_key().to_bytes())
    }

    /// A fresh signed registration request and its nonce.
    pub fn registration(&self, group: GroupId, rng: &mut ChaCha20Rng) -> (Vec<u8>, [u8; 16]) {
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        let request = RegistrationRequest {
            group,
            identity: self.signing.verifying_key().to_bytes(),
            hpke_key: self.hpke_key.clone(),
            timestamp_ms: now_ms(),
            nonce,
            token: Vec::new(),
        };
        (sign(&request, &self.signing), nonce)
    }
}

/// A TCP connection from `from` (port chosen by the kernel) to `to`.
fn connect(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SockAddr::from(SocketAddr::from((from, 0))))?;
    socket.connect_timeout(&SockAddr::from(to), REQUEST_TIMEOUT)?;
    Ok(socket.into())
}

/// One request: `payload` sent after a length header of `announced` bytes; the reply frame, or
/// `None` when the controller closed without one.
pub fn exchange(
    from: Ipv4Addr,
    to: SocketAddr,
    announced: u32,
    payload: &[u8],
) -> std::io::Result<Option<Vec<u8>>> {
    let mut stream = connect(from, to)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut frame = announced.to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    stream.write_all(&frame)?;
    let mut head = [0u8; 4];
    match stream.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(head).min(1 << 16);
    let mut reply = vec![0u8; usize::try_from(len).unwrap_or(0)];
    stream.read_exact(&mut reply)?;
    Ok(Some(reply))
}

/// `payload` as one frame.
fn framed(from: Ipv4Addr, to: SocketAddr, payload: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
    exchange(
        from,
        to,
        u32::try_from(payload.len()).unwrap_or(u32::MAX),
        payload,
    )
}

/// Registers `identity` once, retrying every 200 ms after a failed attempt, for at most
/// `limit`: the time to an authentic welcome answering the last request sent.
pub fn register(
    target: &Target,
    identity: &Identity,
    rng: &mut ChaCha20Rng,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let (request, nonce) = identity.registration(target.group, rng);
        if let Ok(Some(reply)) = framed(Ipv4Addr::LOCALHOST, target.addr, &request)
            && matches!(MessageType::peek(&reply), Ok(MessageType::Welcome))
            && open::<SealedPath>(&reply, &target.controller)
                .is_ok_and(|s| s.message().request_nonce == nonce)
        {
            return Some(started.elapsed());
        }
        std::thread::sleep(RETRY);
    }
    None
}

/// Registers `identity` once and returns the member id its welcome names.
fn member_id(target: &Target, identity: &Identity, rng: &mut ChaCha20Rng) -> Option<MemberId> {
    let (request, nonce) = identity.registration(target.group, rng);
    let reply = framed(Ipv4Addr::LOCALHOST, target.addr, &request).ok()??;
    let sealed = open::<SealedPath>(&reply, &target.controller).ok()?;
    (sealed.message().request_nonce == nonce).then_some(sealed.message().member)
}

/// What the attackers did.
#[derive(Clone, Debug, Default)]
pub struct Sent {
    /// Requests (or held connections) per attack kind.
    pub requests: Vec<(&'static str, u64)>,
    /// Replies received (every kind but slowloris expects one, oversize none).
    pub replies: u64,
    /// Connections the controller closed without a reply.
    pub closed: u64,
    /// Connections that failed (refused, reset, timed out).
    pub failed: u64,
}

/// A running flood; [`Flood::stop`] ends it.
pub struct Flood {
    stop: Arc<AtomicBool>,
    threads: Vec<(&'static str, JoinHandle<Sent>)>,
}

/// The attack kinds, each a function making one request's frame from a generator.
type MakeFrame = Box<dyn FnMut(&mut ChaCha20Rng) -> (u32, Vec<u8>) + Send>;

fn attack(
    kind: &str,
    target: &Target,
    allowed: &Identity,
    replay: &[u8],
    member: MemberId,
) -> MakeFrame {
    let group = target.group;
    let hpke_key = Identity::from_seed(0).hpke_key;
    match kind {
        "forged resync" => Box::new(move |rng| {
            let stranger = SigningKey::from_bytes(&{
                let mut seed = [0u8; 32];
                rng.fill_bytes(&mut seed);
                seed
            });
            let mut nonce = [0u8; 16];
            rng.fill_bytes(&mut nonce);
            let request = ResyncRequest {
                group,
                member,
                epoch: Epoch(0),
                kcv: Kcv([0; lkh_tree::KCV_LEN]),
                timestamp_ms: now_ms(),
                nonce,
                hpke_key: hpke_key.clone(),
            };
            let bytes = sign(&request, &stranger);
            (u32::try_from(bytes.len()).unwrap_or(0), bytes)
        }),
        "garbage" => Box::new(|rng| {
            let mut bytes = vec![0u8; 1 + usize::try_from(rng.next_u32() % 200).unwrap_or(0)];
            rng.fill_bytes(&mut bytes);
            (u32::try_from(bytes.len()).unwrap_or(0), bytes)
        }),
        "oversize" => Box::new(|_| (1 << 20, vec![0u8; 1024])),
        "unknown key" => Box::new(move |rng| {
            let stranger = Identity::from_seed(rng.next_u64());
            let (bytes, _) = stranger.registration(group, rng);
            (u32::try_from(bytes.len()).unwrap_or(0), bytes)
        }),
        "bad signature" => {
            let signing = allowed.signing.clone();
            let hpke_key = allowed.hpke_key.clone();
            Box::new(move |rng| {
                let me = Identity {
                    signing: signing.clone(),
                    hpke_key: hpke_key.clone(),
                };
                let (mut bytes, _) = me.registration(group, rng);
                if let Some(last) = bytes.last_mut() {
                    *last ^= 1;
                }
                (u32::try_from(bytes.len()).unwrap_or(0), bytes)
            })
        }
        _ => {
            let replay = replay.to_vec();
            Box::new(move |_| (u32::try_from(replay.len()).unwrap_or(0), replay.clone()))
        }
    }
}

/// Sends frames made by `make` one connection after another until `stop`.
fn requester(target: SocketAddr, mut make: MakeFrame, seed: u64, stop: &AtomicBool) -> Sent {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut sent = Sent::default();
    let mut count = 0;
    while !stop.load(Ordering::Relaxed) {
        let (announced, payload) = make(&mut rng);
        count += 1;
        match exchange(ATTACKER, target, announced, &payload) {
            Ok(Some(_)) => sent.replies += 1,
            Ok(None) => sent.closed += 1,
            Err(_) => sent.failed += 1,
        }
    }
    sent.requests.push(("", count));
    sent
}

/// Whether the controller has not closed `stream` (nonblocking).
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte) {
        Ok(n) => n > 0,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

/// Holds up to `connections` silent connections open, reopening those the controller closes.
fn slowloris(target: SocketAddr, connections: usize, stop: &AtomicBool) -> Sent {
    let mut held: Vec<TcpStream> = Vec::new();
    let mut sent = Sent::default();
    let mut opened = 0;
    while !stop.load(Ordering::Relaxed) {
        let before = held.len();
        held.retain(still_open);
        sent.closed += u64::try_from(before - held.len()).unwrap_or(0);
        while held.len() < connections && !stop.load(Ordering::Relaxed) {
            match connect(ATTACKER, target).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(s) => {
                    held.push(s);
                    opened += 1;
                }
                Err(_) => {
                    sent.failed += 1;
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    sent.requests.push(("", opened));
    sent
}

/// Sends forged fan-out subscriptions naming `member` by UDP, as fast as one thread can, from a
/// pool of 4,096 signed by strangers (made before the flood, so the attacker spends nothing on
/// signing): each costs a controller an Ed25519 verification, on its own thread before GKM-V058.
fn forged_subscriptions(target: &Target, member: MemberId, stop: &AtomicBool) -> Sent {
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let pool: Vec<Vec<u8>> = (0..4_096)
        .map(|_| {
            let mut seed = [0u8; 32];
            rng.fill_bytes(&mut seed);
            let mut nonce = [0u8; 16];
            rng.fill_bytes(&mut nonce);
            let request = wire::Subscribe {
                group: target.group,
                member,
                timestamp_ms: now_ms(),
                nonce,
                cookie: None,
            };
            sign(&request, &SigningKey::from_bytes(&seed))
        })
        .collect();
    let mut sent = Sent::default();
    let Ok(socket) = UdpSocket::bind((ATTACKER, 0)) else {
        sent.failed += 1;
        return sent;
    };
    let mut count = 0_u64;
    while !stop.load(Ordering::Relaxed) {
        for datagram in &pool {
            if socket.send_to(datagram, target.addr).is_err() {
                sent.failed += 1;
            }
            count += 1;
        }
    }
    sent.requests.push(("", count));
    sent
}

/// The attack kinds that send requests.
pub const KINDS: [&str; 6] = [
    "garbage",
    "oversize",
    "unknown key",
    "bad signature",
    "replay",
    "forged resync",
];

impl Flood {
    /// Starts `threads_per_kind` threads of each request-sending kind and one slowloris thread
    /// holding `connections` silent connections. `allowed` is the allow-listed identity (its
    /// requests with bad signatures); `replay` a valid request already sent; `member` the member
    /// id forged resyncs name.
    pub fn start(
        target: Target,
        allowed: &Identity,
        replay: &[u8],
        member: MemberId,
        threads_per_kind: usize,
        connections: usize,
    ) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut seed = 1_000;
        for kind in KINDS {
            for _ in 0..threads_per_kind {
                let make = attack(kind, &target, allowed, replay, member);
                let stop = stop.clone();
                seed += 1;
                threads.push((
                    kind,
                    std::thread::spawn(move || requester(target.addr, make, seed, &stop)),
                ));
            }
        }
        let stop3 = stop.clone();
        threads.push((
            "forged subscription",
            std::thread::spawn(move || forged_subscriptions(&target, member, &stop3)),
        ));
        let stop2 = stop.clone();
        threads.push((
            "slowloris",
            std::thread::spawn(move || slowloris(target.addr, connections, &stop2)),
        ));
        Flood { stop, threads }
    }

    /// Stops every attacker; what they sent, per kind.
    pub fn stop(self) -> Sent {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Sent::default();
        for (kind, handle) in self.threads {
            let Ok(sent) = handle.join() else { continue };
            let n: u64 = sent.requests.iter().map(|(_, n)| n).sum();
            match total.requests.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, count)) => *count += n,
                None => total.requests.push((kind, n)),
            }
            total.replies += sent.replies;
            total.closed += sent.closed;
            total.failed += sent.failed;
        }
        total
    }
}

/// The `p`-th percentile (0..=100) of `samples`, by nearest rank.
pub fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or_default()
}

/// Resident set size and its peak (VmRSS, VmHWM) of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A `gkm-server` started for a flood, killed when dropped: group "demo" on loopback, its
/// enrollment restricted to one identity.
pub struct Controller {
    child: Child,
    dir: PathBuf,
    gkmctl: PathBuf,
    /// Where and whom to send requests.
    pub target: Target,
}

/// A port free on 127.0.0.1 for TCP and UDP right now.
fn free_port() -> std::io::Result<u16> {
    for _ in 0..50 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        if UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free port"))
}

impl Controller {
    /// Starts `gkm-server` from `bin_dir` (where `gkmctl` is too) with `allowed` on the allow
    /// list; returns once its control socket answers (at most 20 s).
    pub fn start(bin_dir: &Path, allowed: &Identity) -> std::io::Result<Controller> {
        let dir =
            std::env::temp_dir().join(format!("gkm-flood-{}-{}", std::process::id(), now_ms()));
        std::fs::create_dir_all(&dir)?;
        let (port, mport) = (free_port()?, free_port()?);
        let config = dir.join("gkm-server.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\n[[group]]\nname = \"demo\"\n\
                 multicast = \"239.255.98.1:{mport}\"\ninterface = \"127.0.0.1\"\n\
                 heartbeat_interval_ms = 1000\nenrollment = \"restricted\"\nallowed = [\"{}\"]\n",
                allowed.public_hex()
            ),
        )?;
        let state = dir.join("state");
        let init = Command::new(bin_dir.join("gkm-server"))
            .args(["init", "--state-dir"])
            .arg(&state)
            .stderr(Stdio::null())
            .output()?;
        let key: [u8; 32] = hex::decode(String::from_utf8_lossy(&init.stdout).trim())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| std::io::Error::other("gkm-server init printed no key"))?;
        let controller = VerifyingKey::from_bytes(&key).map_err(std::io::Error::other)?;
        let child = Command::new(bin_dir.join("gkm-server"))
            .args(["run", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let this = Controller {
            child,
            gkmctl: bin_dir.join("gkmctl"),
            target: Target {
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                group: GroupId::from_name("demo"),
                controller,
            },
            dir,
        };
        let started = Instant::now();
        while UnixStream::connect(this.dir.join("state/control.sock")).is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                return Err(std::io::Error::other("gkm-server did not start in 20 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(this)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the daemon still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `gkmctl --json ARGS`.
    fn ctl(&self, args: &[&str]) -> std::io::Result<serde_json::Value> {
        let out = Command::new(&self.gkmctl)
            .arg("--socket")
            .arg(self.dir.join("state/control.sock"))
            .arg("--json")
            .args(args)
            .output()?;
        serde_json::from_slice(&out.stdout).map_err(std::io::Error::other)
    }

    /// Registrations accepted in group "demo" (`gkmctl stats demo`) and requests refused by
    /// reason in the whole controller (`gkmctl status`).
    pub fn stats(&self) -> std::io::Result<(u64, BTreeMap<String, u64>)> {
        let registrations = self.ctl(&["stats", "demo"])?["registrations"]
            .as_u64()
            .unwrap_or(0);
        let rejects = self.ctl(&["status"])?["rejects"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        Ok((registrations, rejects))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The outcome of [`measure`].
#[derive(Debug)]
pub struct Report {
    /// The legitimate member's registration times with no flood.
    pub idle: Vec<Duration>,
    /// Its registration times during the flood.
    pub flood: Vec<Duration>,
    /// Its registrations that got no welcome within the limit during the flood.
    pub missed: usize,
    /// The daemon's (VmRSS, VmHWM) in KiB before the flood.
    pub rss_before: (u64, u64),
    /// The highest VmRSS seen during the flood, KiB.
    pub rss_during: u64,
    /// (VmRSS, VmHWM) a second after the flood.
    pub rss_after: (u64, u64),
    /// Requests refused, by reason, as the daemon counts them.
    pub rejects: BTreeMap<String, u64>,
    /// Registrations the daemon accepted.
    pub registrations: u64,
    /// What the attackers sent.
    pub sent: Sent,
    /// Whether the daemon still ran at the end.
    pub alive: bool,
}

/// `idle_runs` registrations of `allowed` with no load, then `duration` of flood (`threads`
/// per attack kind, `connections` silent ones) with `allowed` registering again and again.
pub fn measure(
    controller: &mut Controller,
    allowed: &Identity,
    duration: Duration,
    threads: usize,
    connections: usize,
    idle_runs: usize,
) -> Report {
    let target = controller.target;
    let limit = Duration::from_secs(10);
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let idle: Vec<Duration> = (0..idle_runs)
        .filter_map(|_| register(&target, allowed, &mut rng, limit))
        .collect();
    let member = member_id(&target, allowed, &mut rng).unwrap_or(MemberId(0));
    let (replay, _) = allowed.registration(target.group, &mut rng);
    let _ = framed(Ipv4Addr::LOCALHOST, target.addr, &replay);
    let pid = controller.pid();
    let rss_before = rss_kib(pid).unwrap_or_default();
    let flood = Flood::start(target, allowed, &replay, member, threads, connections);
    let (mut during, mut missed, mut rss_during) = (Vec::new(), 0, 0);
    let started = Instant::now();
    while started.elapsed() < duration {
        match register(&target, allowed, &mut rng, limit) {
            Some(t) => during.push(t),
            None => missed += 1,
        }
        rss_during = rss_during.max(rss_kib(pid).map_or(0, |r| r.0));
    }
    let sent = flood.stop();
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = rss_kib(pid).unwrap_or_default();
    let (registrations, rejects) = controller.stats().unwrap_or_default();
    Report {
        idle,
        flood: during,
        missed,
        rss_before,
        rss_during,
        rss_after,
        rejects,
        registrations,
        sent,
        alive: controller.alive(),
    }
}

//! Helpers shared by the integration tests that run the real daemons on loopback: temp
//! directories, free ports, child processes killed on drop, and a controller with its own
//! config, state directory and control socket.

#![allow(dead_code, reason = "each test crate uses a part of the helpers")]

pub(crate) mod netns;
pub(crate) mod postgres;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::{SigningKey, VerifyingKey};
use gkm_member::{Member, MemberConfig, MemberEvent};
use lkh_tree::GroupId;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use socket2::{Domain, Protocol, Socket, Type};
use wire::{HpkeSecret, MemberId};

/// The controller daemon.
pub(crate) const SERVER: &str = env!("CARGO_BIN_EXE_gkm-server");
/// The operator's client.
pub(crate) const GKMCTL: &str = env!("CARGO_BIN_EXE_gkmctl");

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty temp directory for one test.
pub(crate) fn temp_dir(tag: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("gkm-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A port free for both TCP and UDP on 127.0.0.1 right now.
pub(crate) fn free_port() -> u16 {
    for _ in 0..50 {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

/// The `gkm-member` binary beside this test's target directory, when it has been built
/// (`cargo test --workspace` builds it; `cargo build -p gkm-member` otherwise).
pub(crate) fn member_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("gkm-member");
    path.exists().then_some(path)
}

/// A child process, killed (SIGKILL) and reaped when dropped.
pub(crate) struct Running(Option<Child>);

impl Running {
    /// Spawns `cmd` with stdout and stderr piped to files in `log_dir` named after `tag`.
    pub(crate) fn spawn_logged(cmd: &mut Command, log_dir: &Path, tag: &str) -> Running {
        let out = std::fs::File::create(log_dir.join(format!("{tag}.out"))).unwrap();
        let err = std::fs::File::create(log_dir.join(format!("{tag}.err"))).unwrap();
        Running(Some(cmd.stdout(out).stderr(err).spawn().expect("spawn")))
    }

    /// Spawns `cmd` with stdout and stderr piped.
    pub(crate) fn spawn(cmd: &mut Command) -> Running {
        Running(Some(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        ))
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    /// Sends `sig` (a name `kill` knows: TERM, KILL, ...).
    pub(crate) fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} {}", self.pid());
    }

    /// SIGKILL, and wait until the process is gone.
    pub(crate) fn kill(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process has exited.
    pub(crate) fn exited(&mut self) -> bool {
        self.0
            .as_mut()
            .is_none_or(|c| c.try_wait().unwrap().is_some())
    }

    /// Waits (at most `limit`) for the process to exit; its status and piped output.
    pub(crate) fn wait(mut self, limit: Duration) -> Output {
        let mut child = self.0.take().unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > limit {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "process did not exit within {limit:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A controller's files and addresses: one group "demo" on a multicast address of its own.
pub(crate) struct Server {
    /// The test's directory (removed on drop).
    pub(crate) dir: PathBuf,
    /// The state directory.
    pub(crate) state: PathBuf,
    /// The config file.
    pub(crate) config: PathBuf,
    /// TCP requests and UDP subscriptions.
    pub(crate) port: u16,
    /// The multicast port.
    pub(crate) mport: u16,
    /// The multicast address.
    pub(crate) maddr: Ipv4Addr,
    /// The Prometheus endpoint's port.
    pub(crate) metrics: u16,
}

impl Server {
    /// A config for group "demo" with `group_settings` (TOML lines) added to its table.
    pub(crate) fn new(tag: &str, group_settings: &str) -> Server {
        let dir = temp_dir(tag);
        let (port, mport, metrics) = (free_port(), free_port(), free_port());
        let n = u8::try_from(NEXT.fetch_add(1, Ordering::SeqCst) % 200).unwrap();
        let maddr = Ipv4Addr::new(239, 255, 81, 10 + n);
        let config = dir.join("gkm-server.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nmetrics = \"127.0.0.1:{metrics}\"\n\n\
                 [[group]]\nname = \"demo\"\nmulticast = \"{maddr}:{mport}\"\n\
                 interface = \"127.0.0.1\"\n{group_settings}\n"
            ),
        )
        .unwrap();
        Server {
            state: dir.join("state"),
            dir,
            config,
            port,
            mport,
            maddr,
            metrics,
        }
    }

    /// `gkm-server init --state-dir STATE ARGS`; panics unless it succeeds.
    pub(crate) fn init(&self, args: &[&std::ffi::OsStr]) {
        let out = Command::new(SERVER)
            .args(["init", "--state-dir"])
            .arg(&self.state)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The control socket.
    pub(crate) fn socket(&self) -> PathBuf {
        self.state.join("control.sock")
    }

    /// `gkm-server run` on this config and state directory, output piped.
    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new(SERVER);
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state);
        cmd
    }

    /// Starts the daemon and waits (at most 20 s) until its control socket answers. Its stderr
    /// goes to `DIR/server.log` (appended), which a panic quotes if the daemon exits first.
    pub(crate) fn start(&self) -> Running {
        self.try_start(&self.dir.join("server.log"))
            .unwrap_or_else(|(status, log)| panic!("gkm-server exited early ({status}): {log}"))
    }

    /// Starts the daemon with stderr appended to `log`; once its control socket answers, the
    /// daemon, or if it exits first (or within 20 s neither happens), its status and log.
    pub(crate) fn try_start(&self, log: &Path) -> Result<Running, (String, String)> {
        self.try_spawn(self.command(), log)
    }

    /// Starts `cmd` (this setup's `gkm-server run`, with more arguments or environment) as
    /// [`Server::try_start`] does.
    pub(crate) fn try_spawn(
        &self,
        mut cmd: Command,
        log: &Path,
    ) -> Result<Running, (String, String)> {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut daemon = Running(Some(
            cmd.stdout(Stdio::null())
                .stderr(err)
                .spawn()
                .expect("spawn gkm-server"),
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(self.socket()).is_ok() {
                return Ok(daemon);
            }
            if let Some(status) = daemon.0.as_mut().unwrap().try_wait().unwrap() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                return Err((status.to_string(), text));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon.kill();
        Err((
            "no control socket within 20 s".into(),
            std::fs::read_to_string(log).unwrap_or_default(),
        ))
    }

    /// Runs gkmctl against this daemon.
    pub(crate) fn ctl(&self, args: &[&str]) -> Output {
        Command::new(GKMCTL)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `gkmctl --json ARGS`; panics unless it succeeds.
    pub(crate) fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
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

    /// The group's current epoch.
    pub(crate) fn epoch(&self) -> u64 {
        self.ctl_json(&["groups"])[0]["epoch"].as_u64().unwrap()
    }

    /// A socket receiving the group's multicast datagrams (reads time out at 200 ms).
    pub(crate) fn multicast_receiver(&self) -> UdpSocket {
        multicast_receiver(
            SocketAddrV4::new(self.maddr, self.mport),
            Duration::from_millis(200),
        )
    }

    /// The controller's public key, hex.
    pub(crate) fn public_key_hex(&self) -> String {
        self.ctl_json(&["status"])["public_key"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The controller's public key.
    pub(crate) fn public_key(&self) -> VerifyingKey {
        let bytes: [u8; 32] = hex::decode(self.public_key_hex())
            .unwrap()
            .try_into()
            .unwrap();
        VerifyingKey::from_bytes(&bytes).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One request over TCP to `port`: frame, send, read the reply frame (at most 10 s).
pub(crate) fn request(port: u16, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut frame = u32::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(bytes);
    s.write_all(&frame)?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    let len = reply
        .first_chunk::<4>()
        .map(|l| usize::try_from(u32::from_be_bytes(*l)).unwrap())
        .ok_or_else(|| std::io::Error::other("no reply frame"))?;
    if len != reply.len() - 4 {
        return Err(std::io::Error::other("reply frame length mismatch"));
    }
    Ok(reply.split_off(4))
}

/// The identity key, HPKE key and generator of the in-process member made from `seed`.
pub(crate) fn member_keys(seed: u64) -> (SigningKey, HpkeSecret, ChaCha20Rng) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut identity = [0u8; 32];
    rng.fill_bytes(&mut identity);
    let hpke = HpkeSecret::generate(wire::Kem::XWing, &mut rng);
    (SigningKey::from_bytes(&identity), hpke, rng)
}

/// A member's settings for group "demo" of the controller with key `controller`.
pub(crate) fn member_config(controller: VerifyingKey) -> MemberConfig {
    MemberConfig::new(GroupId::from_name("demo"), controller)
}

/// A fresh in-process member of group "demo" whose keys come from `seed`.
pub(crate) fn new_member(seed: u64, controller: VerifyingKey) -> Member<ChaCha20Rng> {
    let (identity, hpke, rng) = member_keys(seed);
    Member::new(member_config(controller), identity, hpke, rng, now_ms())
}

/// Sends `member`'s queued registration request; its member id once welcomed.
pub(crate) fn register(port: u16, member: &mut Member<ChaCha20Rng>) -> Option<MemberId> {
    let bytes = member.poll_request()?;
    let reply = request(port, &bytes).ok()?;
    member.handle_reply(now_ms(), &reply);
    while let Some(event) = member.poll_event() {
        if let MemberEvent::Joined { member: id, .. } = event {
            return Some(id);
        }
    }
    None
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A member agent's answer to `{"op":"current"}` on its API socket `api`, once it holds a key
/// (reads time out after `timeout`).
pub(crate) fn api_current(api: &Path, timeout: Duration) -> Option<serde_json::Value> {
    let mut stream = UnixStream::connect(api).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.write_all(b"{\"op\":\"current\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    v["epoch"].is_u64().then_some(v)
}

/// A socket that receives the datagrams sent to `group` (bound to it, joined on loopback, with a
/// large receive buffer; other sockets may bind the same group), reads time out after `timeout`.
pub(crate) fn multicast_receiver(group: SocketAddrV4, timeout: Duration) -> UdpSocket {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.set_reuse_port(true).unwrap();
    let _ = socket.set_recv_buffer_size(8 << 20);
    socket.bind(&SocketAddr::V4(group).into()).unwrap();
    socket
        .join_multicast_v4(group.ip(), &Ipv4Addr::LOCALHOST)
        .unwrap();
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(timeout)).unwrap();
    socket
}

/// A group of `members` members as the controller stores it: a tree built by one rekey (seeded
/// `seed`) and a record per member leaf, each lease ending at `lease_until`.
pub(crate) fn stored_group(
    group: GroupId,
    members: usize,
    seed: u64,
    lease_until: gkm_server::Timestamp,
) -> gkm_server::GroupState {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let config = lkh_tree::TreeConfig::default();
    let mut tree = lkh_tree::KeyTree::new(group, config, &mut rng).unwrap();
    let batch = lkh_tree::Batch {
        leaves: vec![],
        joins: members,
    };
    tree.rekey(&batch, &mut rng).unwrap();
    let records = tree
        .members()
        .map(|leaf| gkm_server::MemberRecord {
            id: wire::MemberId((u64::from(leaf.0) << 32) | 1),
            identity: [u8::try_from(leaf.0 % 256).unwrap(); 32],
            hpke: gkm_server::HpkeDigest {
                kem: wire::Kem::XWing,
                digest: [1; 32],
            },
            leaf,
            joined: 1,
            lease_until,
        })
        .collect();
    gkm_server::GroupState {
        tree: tree.snapshot(),
        members: records,
        enrollment: Default::default(),
        signing: Vec::new(),
    }
}

/// One request over TCP to `addr`, as [`request`] does (reply read for at most `timeout`).
pub(crate) fn request_to(
    addr: SocketAddr,
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(timeout))?;
    let mut frame = u32::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(bytes);
    s.write_all(&frame)?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    let len = reply
        .first_chunk::<4>()
        .map(|l| usize::try_from(u32::from_be_bytes(*l)).unwrap())
        .ok_or_else(|| std::io::Error::other("no reply frame"))?;
    if len != reply.len() - 4 {
        return Err(std::io::Error::other("reply frame length mismatch"));
    }
    Ok(reply.split_off(4))
}

/// Drives an in-process member over TCP as the member daemon does with several controllers:
/// sends its requests to the controller asked now, follows [`MemberEvent::NotLeader`] (the named
/// leader when it is one of `controllers`, else the next) and a controller that does not answer
/// (the next), fires its timers, until `done` accepts one of its events (returned) or `limit`
/// passes (`Err` with every event seen).
pub(crate) fn drive_member(
    member: &mut Member<ChaCha20Rng>,
    controllers: &mut gkm_member::controllers::Controllers,
    limit: Duration,
    mut done: impl FnMut(&MemberEvent) -> bool,
) -> Result<MemberEvent, Vec<MemberEvent>> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let mut sent = false;
        if let Some(bytes) = member.poll_request() {
            sent = true;
            match request_to(controllers.current(), &bytes, Duration::from_secs(10)) {
                Ok(reply) => member.handle_reply(now_ms(), &reply),
                Err(_) => {
                    member.handle_unreachable(now_ms());
                    if controllers.advance().is_some() {
                        member.controller_changed(now_ms());
                    }
                }
            }
        }
        while let Some(event) = member.poll_event() {
            if let MemberEvent::NotLeader { leader, .. } = &event
                && controllers.not_leader(*leader).is_some()
            {
                member.controller_changed(now_ms());
            }
            if done(&event) {
                return Ok(event);
            }
            seen.push(event);
        }
        if Instant::now() >= deadline {
            return Err(seen);
        }
        if !sent {
            let now = now_ms();
            let wait = member
                .poll_timeout()
                .map_or(50, |t| t.saturating_sub(now).clamp(1, 50));
            std::thread::sleep(Duration::from_millis(wait));
            member.handle_timeout(now_ms());
        }
    }
}

//! High availability end to end (issue 14 §6): three real `gkm-server` daemons on one private
//! PostgreSQL the test starts (`support::postgres`), real `gkm-member` daemons given all three
//! controllers, and a capture socket on the group's multicast address that records every
//! datagram of the run.
//!
//! - `ha_leader_killed_repeatedly_…`: membership churn (in-process members registering and
//!   leaving over TCP, following `NotLeader`) while the current leader is killed (`kill -9`) at
//!   random moments and right after a rekey appears on the wire, then restarted. Every round the
//!   member daemons converge on the new leader's first epoch; failover times are printed.
//! - `ha_a_zombie_leader_…`: the leader is stopped (SIGSTOP) for three leases with requests and a
//!   command queued at it; a standby takes over; once continued, the old leader rekeys nothing.
//! - `ha_database_restart_mid_run`: PostgreSQL restarted under running controllers and members.
//!
//! Throughout, the capture asserts the fencing promise: no epoch carried by two rekeys (two
//! salts) or announced with two key check values, and no wrap (epoch, target node, wrapping node)
//! sent with two ciphertexts; and no member daemon loses its membership (same member id
//! throughout, never told its membership ended).
//!
//! Knobs: `GKM_HA_KILLS` (default 50), `GKM_HA_OPS` (membership operations, default 1,000),
//! `GKM_HA_MEMBERS` (member daemons of the kill test, default 20), `GKM_HA_SMALL_MEMBERS` (of the
//! other two tests, default 6), `GKM_HA_LEASE_MS` (default 1,000), `GKM_HA_SEED`.
//! `GKM_SKIP_POSTGRES=1` skips the tests where PostgreSQL is not installed; without it they
//! fail saying what to install.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use gkm_member::controllers::Controllers;
use gkm_member::{Member, MemberConfig, MemberEvent};
use lkh_tree::GroupId;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use socket2::{Domain, Protocol, Socket, Type};
use support::postgres::PgServer;
use support::{
    GKMCTL, Running, Server, drive_member, member_binary, member_keys, multicast_receiver, now_ms,
};
use wire::{AuthenticRekey, Heartbeat, MessageType};

const MARK: &[u8] = b"GKM-HA-MARK";
/// Settings of the group on every controller: two sends of each datagram, small datagrams (a
/// rekey spans several), 50 ms batches, a heartbeat every 200 ms.
const GROUP_SETTINGS: &str = "repeats = 2\nrepeat_spacing_ms = 20\nmtu = 576\n\
                              batch_interval_ms = 50\nheartbeat_interval_ms = 200\n";
/// How long one membership operation may take, redirects and failovers included. A member
/// redirected through failovers spends its prompt retries (three rounds of the controllers) while
/// the standbys still name the dead leader, then backs off as after refusals: up to 48 s between
/// requests (`gkm_member`'s retry delay, 2 s doubled four times plus half at random).
const OPERATION_LIMIT: Duration = Duration::from_secs(180);

/// The three tests share two cores: one at a time, so that leases and failover times measure
/// the daemons, not the other tests.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn group() -> GroupId {
    GroupId::from_name("demo")
}

/// `q` quantile of sorted `values`.
fn quantile(sorted: &[u128], q: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------------------------
// The capture.

/// What the capture socket saw on the group's multicast address.
#[derive(Default)]
struct Wire {
    /// (epoch, target node, wrapping node) → ciphertext.
    wraps: HashMap<(u64, u32, u32), [u8; lkh_tree::WRAPPED_LEN]>,
    /// epoch → the rekey's salt (one rekey per epoch).
    salts: BTreeMap<u64, Vec<u8>>,
    /// epoch → key check value (heartbeats).
    kcv: BTreeMap<u64, [u8; 8]>,
    /// epoch → when its first datagram arrived.
    first_seen: BTreeMap<u64, Instant>,
    rekey_datagrams: u64,
    wraps_seen: u64,
    heartbeats: u64,
    /// Heartbeats of an epoch below one already on the wire (a deposed leader's, harmless).
    stale_heartbeats: u64,
    max_epoch: u64,
    marks: HashMap<u32, u64>,
    unauthentic: u64,
    violations: Vec<String>,
}

impl Wire {
    fn datagram(&mut self, bytes: &[u8], controller: &VerifyingKey) {
        if let Some(id) = bytes.strip_prefix(MARK) {
            let id = u32::from_be_bytes(id.try_into().unwrap());
            self.marks.insert(id, self.max_epoch);
            return;
        }
        match MessageType::peek(bytes) {
            Ok(MessageType::Rekey) => self.rekey(bytes, controller),
            Ok(MessageType::Heartbeat) => self.heartbeat(bytes, controller),
            _ => self.unauthentic += 1,
        }
    }

    fn rekey(&mut self, bytes: &[u8], controller: &VerifyingKey) {
        let Ok(rekey) = AuthenticRekey::verify(bytes, controller) else {
            self.unauthentic += 1;
            return;
        };
        let d = rekey.datagram();
        let epoch = d.epoch.0;
        self.rekey_datagrams += 1;
        self.first_seen.entry(epoch).or_insert_with(Instant::now);
        self.max_epoch = self.max_epoch.max(epoch);
        let salt = d.salt.0.to_vec();
        let first = self.salts.entry(epoch).or_insert_with(|| salt.clone());
        if *first != salt {
            self.violations
                .push(format!("epoch {epoch} sent by two rekeys (two salts)"));
        }
        for w in d.wraps() {
            self.wraps_seen += 1;
            let id = (epoch, w.target.0, w.wrapping.0);
            let first = *self.wraps.entry(id).or_insert(w.ciphertext);
            if first != w.ciphertext {
                self.violations.push(format!(
                    "epoch {epoch} target {} wrapping {} sent with two ciphertexts",
                    w.target.0, w.wrapping.0
                ));
            }
        }
    }

    fn heartbeat(&mut self, bytes: &[u8], controller: &VerifyingKey) {
        let Ok(beat) = wire::open::<Heartbeat>(bytes, controller) else {
            self.unauthentic += 1;
            return;
        };
        let (epoch, kcv) = (beat.message().epoch.0, beat.message().kcv.0);
        self.heartbeats += 1;
        if epoch < self.max_epoch {
            self.stale_heartbeats += 1;
        }
        self.first_seen.entry(epoch).or_insert_with(Instant::now);
        self.max_epoch = self.max_epoch.max(epoch);
        if *self.kcv.entry(epoch).or_insert(kcv) != kcv {
            self.violations
                .push(format!("epoch {epoch} announced with two key check values"));
        }
    }

    /// The lowest epoch above `epoch` seen, and when it was first seen.
    fn first_above(&self, epoch: u64) -> Option<(u64, Instant)> {
        self.first_seen
            .range(epoch + 1..)
            .next()
            .map(|(e, at)| (*e, *at))
    }
}

/// A thread recording every datagram sent to the group; stopped and joined on drop.
struct Capture {
    wire: Arc<Mutex<Wire>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    sender: Socket,
    group: SocketAddrV4,
    next_mark: u32,
}

impl Capture {
    fn start(group: SocketAddrV4, controller: VerifyingKey) -> Capture {
        let socket = multicast_receiver(group, Duration::from_millis(50));
        let wire = Arc::new(Mutex::new(Wire::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (wire, stop) = (wire.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        wire.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .datagram(&buf[..n], &controller);
                    }
                }
            })
        };
        let sender = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        sender.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
        sender.set_multicast_loop_v4(true).unwrap();
        Capture {
            wire,
            stop,
            thread: Some(thread),
            sender,
            group,
            next_mark: 0,
        }
    }

    fn wire(&self) -> MutexGuard<'_, Wire> {
        self.wire
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The highest epoch on the wire before this call: a marker sent to the group after
    /// everything before it (loopback delivers in order) comes back through the capture.
    fn max_epoch_so_far(&mut self) -> u64 {
        self.next_mark += 1;
        let id = self.next_mark;
        let mut mark = MARK.to_vec();
        mark.extend_from_slice(&id.to_be_bytes());
        self.sender
            .send_to(&mark, &SocketAddr::V4(self.group).into())
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(epoch) = self.wire().marks.get(&id) {
                return *epoch;
            }
            assert!(Instant::now() < deadline, "capture marker {id} not seen");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits (at most `limit`) for an epoch above `epoch` on the wire: it and when it came.
    fn wait_above(&self, epoch: u64, limit: Duration) -> Option<(u64, Instant)> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self.wire().first_above(epoch) {
                return Some(found);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The controllers.

/// Three (or more) controllers of group "demo" on one PostgreSQL database, sharing their keys
/// and the group's multicast address, each with its own state directory and request port.
struct Cluster {
    /// Declared first: the controllers are killed before their directories go.
    running: Vec<Option<Running>>,
    nodes: Vec<Server>,
    key_hex: String,
    public: VerifyingKey,
    group: SocketAddrV4,
    lease: Duration,
    sql: Option<postgres::Client>,
    url: String,
    /// Declared last: dropped after the controllers.
    pg: PgServer,
}

impl Cluster {
    /// Starts PostgreSQL and `n` controllers; `None` when PostgreSQL is missing and
    /// `GKM_SKIP_POSTGRES=1`.
    fn start(tag: &str, n: usize) -> Option<Cluster> {
        let pg = PgServer::start(tag)?;
        let lease = Duration::from_millis(knob("GKM_HA_LEASE_MS", 1_000));
        let nodes: Vec<Server> = (0..n)
            .map(|i| Server::new(&format!("{tag}-c{i}"), ""))
            .collect();
        let init = Command::new(support::SERVER)
            .args(["init", "--state-dir"])
            .arg(&nodes[0].state)
            .output()
            .unwrap();
        assert!(init.status.success(), "{init:?}");
        let key_hex = String::from_utf8(init.stdout).unwrap().trim().to_owned();
        let public: [u8; 32] = hex::decode(&key_hex).unwrap().try_into().unwrap();
        for node in &nodes[1..] {
            std::fs::create_dir_all(&node.state).unwrap();
            std::fs::set_permissions(&node.state, std::fs::Permissions::from_mode(0o700)).unwrap();
            for file in ["controller.key", "storage.key"] {
                std::fs::copy(nodes[0].state.join(file), node.state.join(file)).unwrap();
            }
        }
        let group = SocketAddrV4::new(nodes[0].maddr, nodes[0].mport);
        let url = pg.url();
        for node in &nodes {
            std::fs::write(
                &node.config,
                format!(
                    "listen = \"127.0.0.1:{}\"\n\n[storage]\nbackend = \"postgres\"\n\
                     url = \"{url}\"\nlease_ms = {}\n\n[[group]]\nname = \"demo\"\n\
                     multicast = \"{group}\"\ninterface = \"127.0.0.1\"\n{GROUP_SETTINGS}",
                    node.port,
                    lease.as_millis()
                ),
            )
            .unwrap();
        }
        let mut cluster = Cluster {
            running: (0..n).map(|_| None).collect(),
            nodes,
            key_hex,
            public: VerifyingKey::from_bytes(&public).unwrap(),
            group,
            lease,
            sql: None,
            url,
            pg,
        };
        for i in 0..n {
            cluster.start_node(i);
        }
        Some(cluster)
    }

    fn start_node(&mut self, i: usize) {
        let node = &self.nodes[i];
        let log = node.dir.join("server.log");
        let mut cmd = node.command();
        cmd.env("RUST_LOG", "info");
        let running = node.try_spawn(cmd, &log).unwrap_or_else(|(status, log)| {
            panic!("controller {i} exited early ({status}): {log}")
        });
        self.running[i] = Some(running);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut running) = self.running[i].take() {
            running.kill();
        }
    }

    fn running(&mut self, i: usize) -> Option<&Running> {
        if self.running[i].as_mut().is_some_and(Running::exited) {
            panic!("controller {i} exited by itself:\n{}", self.log_tail(i, 40));
        }
        self.running[i].as_ref()
    }

    /// Every controller's request address, in order.
    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes
            .iter()
            .map(|n| SocketAddr::from((Ipv4Addr::LOCALHOST, n.port)))
            .collect()
    }

    /// The group's lease as the database holds it: the controller it names (by address), its
    /// term, and whether it is live.
    fn lease_row(&mut self) -> Option<(Option<usize>, u64, bool)> {
        if self.sql.is_none() {
            self.sql = postgres::Client::connect(&self.url, postgres::NoTls).ok();
        }
        let client = self.sql.as_mut()?;
        let id = i64::from_be_bytes(group().0.to_be_bytes());
        let row = match client.query_opt(
            "SELECT address, term, expires > clock_timestamp() FROM gkm_leases \
             WHERE group_id = $1",
            &[&id],
        ) {
            Ok(row) => row?,
            Err(_) => {
                self.sql = None;
                return None;
            }
        };
        let address: String = row.get(0);
        let term: i64 = row.get(1);
        let live: bool = row.get(2);
        let index = self.addrs().iter().position(|a| a.to_string() == address);
        Some((index, u64::try_from(term).unwrap(), live))
    }

    /// The controller leading the group now and its term: its lease is live, it runs, and it
    /// serves the group (`gkmctl groups` lists it). (Its audit log's "leading" line is not
    /// used: the daemon writes it to the file only with the next controller event.)
    fn leader(&mut self) -> Option<(usize, u64)> {
        let (Some(i), term, true) = self.lease_row()? else {
            return None;
        };
        self.running(i)?;
        self.epoch(i)?;
        Some((i, term))
    }

    fn wait_leader(&mut self, limit: Duration) -> (usize, u64) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self.leader() {
                return found;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no leader within {limit:?}; lease {:?}\n{}",
                    self.lease_row(),
                    self.all_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Controller `i`'s audit events, in order (a line cut by a kill is skipped).
    fn audit(&self, i: usize) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.nodes[i].state.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The audit events controller `i` logged on stderr (`INFO audit: {...}`), in order: the
    /// log has each at once, the audit file only once the daemon flushes it.
    fn logged_events(&self, i: usize) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.nodes[i].dir.join("server.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once("audit: ").map(|(_, json)| json))
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect()
    }

    /// The group's row in controller `i`'s `gkmctl --json groups` (`None` from a dead one).
    fn group_row(&self, i: usize) -> Option<serde_json::Value> {
        let out = self.nodes[i].ctl(&["--json", "groups"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.iter().find(|g| g["name"] == "demo").cloned()
    }

    /// The group's epoch as controller `i` serves it (`None` on a standby or a dead one).
    fn epoch(&self, i: usize) -> Option<u64> {
        let row = self.group_row(i).filter(|g| g["role"] == "leader")?;
        row["epoch"].as_u64()
    }

    /// Controller `i`'s warm copy of the group, as a standby: its epoch and how long ago it
    /// matched the committed log.
    fn warm_copy(&self, i: usize) -> Option<(u64, u64)> {
        let row = self.group_row(i).filter(|g| g["role"] == "standby")?;
        Some((row["epoch"].as_u64()?, row["synced_ms_ago"].as_u64()?))
    }

    fn log_tail(&self, i: usize, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.nodes[i].dir.join("server.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn all_logs(&self) -> String {
        (0..self.nodes.len())
            .map(|i| {
                format!(
                    "--- controller {i} (port {}) log:\n{}\n--- audit (leadership):\n{}",
                    self.nodes[i].port,
                    self.log_tail(i, 30),
                    self.leadership(i)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Controller `i`'s leadership events and the rekeys around them, one line each.
    fn leadership(&self, i: usize) -> String {
        self.audit(i)
            .iter()
            .filter(|e| {
                matches!(
                    e["event"].as_str(),
                    Some("leading" | "deposed" | "rekeyed" | "store_failed")
                )
            })
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

// ---------------------------------------------------------------------------------------------
// The member daemons.

/// What a member daemon's API last said.
#[derive(Clone, Debug, Default)]
struct View {
    epoch: u64,
    kcv: String,
    member: u64,
    /// Every member id it reported.
    ids: BTreeSet<u64>,
}

/// `gkm-member run` daemons given every controller, each watched through its API (`watch`).
struct Members {
    views: Arc<Mutex<Vec<Option<View>>>>,
    /// epoch → the key check values members reported for it.
    reported: Arc<Mutex<BTreeMap<u64, BTreeSet<String>>>>,
    stop: Arc<AtomicBool>,
    watchers: Vec<JoinHandle<()>>,
    logs: PathBuf,
    procs: Vec<Running>,
}

impl Members {
    fn start(cluster: &Cluster, n: usize, dir: &Path, rng: &mut ChaCha20Rng) -> Members {
        let Some(bin) = member_binary() else {
            panic!("gkm-member is not built next to the tests (cargo build -p gkm-member)");
        };
        let logs = dir.join("member-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let views = Arc::new(Mutex::new(vec![None; n]));
        let reported = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut procs = Vec::new();
        let mut watchers = Vec::new();
        let addrs = cluster.addrs();
        for i in 0..n {
            let state = dir.join(format!("member-{i}"));
            let mut cmd = Command::new(&bin);
            cmd.args([
                "run",
                "--group",
                "demo",
                "--controller-key",
                &cluster.key_hex,
            ]);
            // Each starts at another controller: some are redirected from the first request.
            let first = usize::try_from(rng.next_u32()).unwrap() % addrs.len();
            for k in 0..addrs.len() {
                cmd.args([
                    "--controller",
                    &addrs[(first + k) % addrs.len()].to_string(),
                ]);
            }
            cmd.args(["--multicast", &cluster.group.to_string()])
                .arg("--state-dir")
                .arg(&state)
                .env("RUST_LOG", "info");
            procs.push(Running::spawn_logged(&mut cmd, &logs, &format!("m{i}")));
            let (views, reported, stop) = (views.clone(), reported.clone(), stop.clone());
            let api = state.join("api.sock");
            watchers.push(std::thread::spawn(move || {
                watch(&api, i, &views, &reported, &stop);
            }));
        }
        Members {
            views,
            reported,
            stop,
            watchers,
            logs,
            procs,
        }
    }

    fn views(&self) -> Vec<Option<View>> {
        self.views.lock().unwrap().clone()
    }

    /// Waits until every member holds a key; their member ids.
    fn wait_admitted(&self, limit: Duration) -> Vec<u64> {
        let deadline = Instant::now() + limit;
        loop {
            let views = self.views();
            if views.iter().all(Option::is_some) {
                return views.iter().map(|v| v.as_ref().unwrap().member).collect();
            }
            assert!(
                Instant::now() < deadline,
                "members not admitted within {limit:?}: {views:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every member holds epoch `epoch` or later; when that was seen.
    fn wait_at_least(&self, epoch: u64, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if self
                .views()
                .iter()
                .all(|v| v.as_ref().is_some_and(|v| v.epoch >= epoch))
            {
                return Some(Instant::now());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Members whose membership changed (another member id than `ids`), or that ever reported
    /// two ids.
    fn lost(&self, ids: &[u64]) -> Vec<String> {
        self.views()
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let v = v.as_ref()?;
                (v.member != ids[i] || v.ids.len() != 1)
                    .then(|| format!("member daemon {i}: admitted as {}, now {v:?}", ids[i]))
            })
            .collect()
    }

    /// Times the member daemons' logs say the controller ended their membership.
    fn memberships_ended(&self) -> usize {
        (0..self.procs.len())
            .map(|i| {
                std::fs::read_to_string(self.logs.join(format!("m{i}.err")))
                    .unwrap_or_default()
                    .matches("membership ended")
                    .count()
            })
            .sum()
    }

    /// Every epoch two members reported with two key check values, or with another one than
    /// the wire's heartbeats.
    fn kcv_conflicts(&self, wire: &Wire) -> Vec<String> {
        let reported = self.reported.lock().unwrap();
        let mut out = Vec::new();
        for (epoch, kcvs) in reported.iter() {
            if kcvs.len() > 1 {
                out.push(format!("members hold epoch {epoch} with keys {kcvs:?}"));
            }
            if let Some(beat) = wire.kcv.get(epoch)
                && kcvs.iter().any(|k| *k != hex::encode(beat))
            {
                out.push(format!(
                    "members hold epoch {epoch} with {kcvs:?}, heartbeats say {}",
                    hex::encode(beat)
                ));
            }
        }
        out
    }

    /// Waits until every member holds `epoch` with the key the heartbeats announce.
    fn wait_exactly(&self, epoch: u64, capture: &Capture, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let kcv = capture.wire().kcv.get(&epoch).map(hex::encode);
            if let Some(kcv) = kcv
                && self
                    .views()
                    .iter()
                    .all(|v| v.as_ref().is_some_and(|v| v.epoch == epoch && v.kcv == kcv))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.watchers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Follows member daemon `i` through `{"op":"watch"}` on its API socket (reconnecting while it
/// starts) until `stop`.
fn watch(
    api: &Path,
    i: usize,
    views: &Mutex<Vec<Option<View>>>,
    reported: &Mutex<BTreeMap<u64, BTreeSet<String>>>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::SeqCst) {
        let Ok(mut stream) = UnixStream::connect(api) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if stream.write_all(b"{\"op\":\"watch\"}\n").is_err() {
            continue;
        }
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        let mut keyless = false;
        while !stop.load(Ordering::SeqCst) {
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) if line.ends_with(b"\n") => {
                    let v: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
                    line.clear();
                    let (Some(epoch), Some(kcv), Some(member)) =
                        (v["epoch"].as_u64(), v["kcv"].as_str(), v["member"].as_u64())
                    else {
                        // No key yet: the watch says nothing until one comes; ask again.
                        keyless = true;
                        break;
                    };
                    reported
                        .lock()
                        .unwrap()
                        .entry(epoch)
                        .or_default()
                        .insert(kcv.to_owned());
                    let mut views = views.lock().unwrap();
                    let view = views[i].get_or_insert_with(View::default);
                    view.epoch = epoch;
                    view.kcv = kcv.to_owned();
                    view.member = member;
                    view.ids.insert(member);
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        if keyless {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Membership churn: in-process members over TCP.

/// In-process members joining and leaving, each request sent to the controller the member
/// asks now and redirected as `gkm-member` does.
struct Churn {
    addrs: Vec<SocketAddr>,
    public: VerifyingKey,
    target: usize,
    /// Operations that may have started by now (paced by the test).
    allowed: AtomicUsize,
    started: AtomicUsize,
    done: AtomicUsize,
    joins: AtomicUsize,
    leaves: AtomicUsize,
    refused_leaves: AtomicUsize,
    failures: Mutex<Vec<String>>,
    /// How long each operation took, in milliseconds.
    took: Mutex<Vec<u128>>,
    pool: Mutex<Vec<(Member<ChaCha20Rng>, Controllers)>>,
    seeds: AtomicU64,
}

/// In-process members kept between these bounds.
const MIN_POOL: usize = 4;
const MAX_POOL: usize = 30;

impl Churn {
    fn new(cluster: &Cluster, target: usize, seed: u64) -> Churn {
        Churn {
            addrs: cluster.addrs(),
            public: cluster.public,
            target,
            allowed: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            joins: AtomicUsize::new(0),
            leaves: AtomicUsize::new(0),
            refused_leaves: AtomicUsize::new(0),
            failures: Mutex::new(Vec::new()),
            took: Mutex::new(Vec::new()),
            pool: Mutex::new(Vec::new()),
            seeds: AtomicU64::new(seed << 20),
        }
    }

    /// A fresh member and the controllers it asks, starting at controller `first`.
    fn fresh(&self, first: usize) -> (Member<ChaCha20Rng>, Controllers) {
        let (identity, hpke, rng) = member_keys(self.seeds.fetch_add(1, Ordering::SeqCst));
        let mut config = MemberConfig::new(group(), self.public);
        config.controllers = self.addrs.len();
        let member = Member::new(config, identity, hpke, rng, now_ms());
        let n = self.addrs.len();
        let order = (0..n).map(|k| self.addrs[(first + k) % n]);
        (member, Controllers::new(order).unwrap())
    }

    /// Registers a fresh member (starting at controller `first`); it once admitted.
    fn join(&self, first: usize) -> Result<(Member<ChaCha20Rng>, Controllers), String> {
        let (mut member, mut controllers) = self.fresh(first);
        match drive_member(&mut member, &mut controllers, OPERATION_LIMIT, |e| {
            matches!(e, MemberEvent::Joined { .. })
        }) {
            Ok(_) => Ok((member, controllers)),
            Err(events) => Err(format!(
                "a registration was not admitted within {OPERATION_LIMIT:?}: {events:?}"
            )),
        }
    }

    /// Leaves with `member`; whether the controller acknowledged it (rather than refused it).
    fn leave(
        mut member: Member<ChaCha20Rng>,
        mut controllers: Controllers,
    ) -> Result<bool, String> {
        member.leave(now_ms());
        match drive_member(&mut member, &mut controllers, OPERATION_LIMIT, |e| {
            matches!(e, MemberEvent::Left { .. })
        }) {
            Ok(MemberEvent::Left { refused }) => Ok(refused.is_none()),
            Ok(_) => unreachable!(),
            Err(events) => Err(format!(
                "a leave was not answered within {OPERATION_LIMIT:?}: {events:?}"
            )),
        }
    }

    fn operation(&self, rng: &mut ChaCha20Rng) {
        let leaving = {
            let mut pool = self.pool.lock().unwrap();
            let leave = pool.len() > MIN_POOL
                && (pool.len() >= MAX_POOL || rng.next_u32().is_multiple_of(2));
            leave.then(|| {
                let i = usize::try_from(rng.next_u32()).unwrap() % pool.len();
                pool.swap_remove(i)
            })
        };
        let outcome = match leaving {
            Some((member, controllers)) => Churn::leave(member, controllers).map(|acked| {
                self.leaves.fetch_add(1, Ordering::SeqCst);
                if !acked {
                    self.refused_leaves.fetch_add(1, Ordering::SeqCst);
                }
            }),
            None => {
                let first = usize::try_from(rng.next_u32()).unwrap() % self.addrs.len();
                self.join(first).map(|joined| {
                    self.joins.fetch_add(1, Ordering::SeqCst);
                    self.pool.lock().unwrap().push(joined);
                })
            }
        };
        if let Err(e) = outcome {
            self.failures.lock().unwrap().push(e);
        }
    }

    /// A worker: operations while the test allows them, until the target.
    fn work(self: &Arc<Self>, seed: u64) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        loop {
            let n = self.started.load(Ordering::SeqCst);
            if n >= self.target {
                return;
            }
            if n >= self.allowed.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            if self
                .started
                .compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue;
            }
            let began = Instant::now();
            self.operation(&mut rng);
            self.took.lock().unwrap().push(began.elapsed().as_millis());
            self.done.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(rng.next_u64() % 30));
        }
    }

    fn spawn(self: &Arc<Self>, workers: u64, seed: u64) -> Vec<JoinHandle<()>> {
        (0..workers)
            .map(|w| {
                let churn = self.clone();
                std::thread::spawn(move || churn.work(seed ^ (w + 1)))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn ha_leader_killed_repeatedly_members_converge_and_no_epoch_is_sent_twice() {
    let _serial = serial();
    let kills = usize::try_from(knob("GKM_HA_KILLS", 50).max(1)).unwrap();
    let operations = usize::try_from(knob("GKM_HA_OPS", 1_000)).unwrap();
    let n_members = usize::try_from(knob("GKM_HA_MEMBERS", 20)).unwrap();
    let seed = knob("GKM_HA_SEED", 2026);
    let Some(mut cluster) = Cluster::start("ha-kill", 3) else {
        return;
    };
    let started = Instant::now();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut capture = Capture::start(cluster.group, cluster.public);
    cluster.wait_leader(Duration::from_secs(20));
    let members = Members::start(&cluster, n_members, &cluster.nodes[0].dir, &mut rng);
    let ids = members.wait_admitted(Duration::from_secs(60));
    eprintln!(
        "ha kill run: seed {seed}, {kills} kills, {operations} operations, {n_members} member \
         daemons, lease {:?}; members admitted after {:.1} s",
        cluster.lease,
        started.elapsed().as_secs_f64()
    );
    let churn = Arc::new(Churn::new(&cluster, operations, seed));
    let workers = churn.spawn(4, seed);

    let (mut to_wire, mut to_members) = (Vec::new(), Vec::new());
    let mut after_rekey = 0;
    for round in 0..kills {
        churn
            .allowed
            .store(operations * (round + 1) / kills, Ordering::SeqCst);
        let (leader, term) = cluster.wait_leader(Duration::from_secs(20));
        if rng.next_u32().is_multiple_of(2) {
            // At a random moment within a lease.
            let ms = rng.next_u64() % u64::try_from(cluster.lease.as_millis()).unwrap();
            std::thread::sleep(Duration::from_millis(ms));
        } else {
            // As soon as a rekey datagram appears on the wire (the leader may still be sending
            // the rest of it, its repeats and its welcomes).
            let seen = capture.wire().rekey_datagrams;
            let deadline = Instant::now() + Duration::from_secs(3);
            while capture.wire().rekey_datagrams == seen && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(200));
            }
            after_rekey += 1;
        }
        let killed_at = Instant::now();
        cluster.kill(leader);
        let before = capture.max_epoch_so_far();
        let Some((epoch, on_wire)) = capture.wait_above(before, Duration::from_secs(20)) else {
            panic!(
                "round {round}: no rekey above epoch {before} within 20 s of killing controller \
                 {leader} (term {term}); lease {:?}\n{}",
                cluster.lease_row(),
                cluster.all_logs()
            );
        };
        let Some(held) = members.wait_at_least(epoch, Duration::from_secs(20)) else {
            panic!(
                "round {round}: member daemons did not reach epoch {epoch} within 20 s of it on \
                 the wire: {:#?}\n{}",
                members.views(),
                cluster.all_logs()
            );
        };
        to_wire.push(on_wire.saturating_duration_since(killed_at));
        to_members.push(held.saturating_duration_since(killed_at));
        let lost = members.lost(&ids);
        assert!(
            lost.is_empty(),
            "round {round}: {lost:#?}\n{}",
            evidence(&cluster, &members, &ids)
        );
        cluster.start_node(leader);
    }
    churn.allowed.store(operations, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let churned = started.elapsed();

    // Settled: every member daemon holds the leader's epoch, with the key the heartbeats name.
    let deadline = Instant::now() + Duration::from_secs(30);
    let final_epoch = loop {
        let (leader, _) = cluster.wait_leader(Duration::from_secs(20));
        if let Some(epoch) = cluster.epoch(leader)
            && members.wait_exactly(epoch, &capture, Duration::from_secs(2))
        {
            break epoch;
        }
        assert!(
            Instant::now() < deadline,
            "members did not converge on the leader's epoch: {:#?}\n{}",
            members.views(),
            cluster.all_logs()
        );
    };
    let _ = capture.max_epoch_so_far();

    // The standbys hold warm copies of the group, at the committed epoch within a lease.
    let (leader, _) = cluster.wait_leader(Duration::from_secs(20));
    for i in (0..cluster.nodes.len()).filter(|&i| i != leader) {
        let deadline = Instant::now() + cluster.lease * 4;
        loop {
            let copy = cluster.warm_copy(i);
            let committed = cluster.epoch(leader);
            if let (Some((epoch, synced)), Some(committed)) = (copy, committed)
                && epoch == committed
                && u128::from(synced) <= cluster.lease.as_millis()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "standby {i} holds no warm copy at the leader's epoch {committed:?}: {copy:?}\n{}",
                cluster.all_logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let wire = capture.wire();
    let mut wire_ms: Vec<u128> = to_wire.iter().map(Duration::as_millis).collect();
    let mut member_ms: Vec<u128> = to_members.iter().map(Duration::as_millis).collect();
    wire_ms.sort_unstable();
    member_ms.sort_unstable();
    let failures = churn.failures.lock().unwrap().clone();
    let mut took = churn.took.lock().unwrap().clone();
    took.sort_unstable();
    eprintln!(
        "ha kill run: {kills} kills ({after_rekey} right after a rekey datagram) in {:.1} s; \
         {} operations ({} joins, {} leaves of which {} refused, {} failed); final epoch \
         {final_epoch}; {} rekey datagrams, {} epochs, {} wraps checked ({} distinct), {} \
         heartbeats ({} of an epoch below one already sent), {} unauthentic",
        churned.as_secs_f64(),
        churn.done.load(Ordering::SeqCst),
        churn.joins.load(Ordering::SeqCst),
        churn.leaves.load(Ordering::SeqCst),
        churn.refused_leaves.load(Ordering::SeqCst),
        failures.len(),
        wire.rekey_datagrams,
        wire.salts.len(),
        wire.wraps_seen,
        wire.wraps.len(),
        wire.heartbeats,
        wire.stale_heartbeats,
        wire.unauthentic,
    );
    eprintln!(
        "ha failover (lease {} ms, {kills} kills): kill -> first rekey of the new leader on the \
         wire p50 {} ms p99 {} ms max {} ms; kill -> every member daemon holds it p50 {} ms \
         p99 {} ms max {} ms",
        cluster.lease.as_millis(),
        quantile(&wire_ms, 0.5),
        quantile(&wire_ms, 0.99),
        wire_ms.last().unwrap(),
        quantile(&member_ms, 0.5),
        quantile(&member_ms, 0.99),
        member_ms.last().unwrap(),
    );
    eprintln!(
        "ha kill run: membership operation (request to answer, redirects included) p50 {} ms \
         p99 {} ms max {} ms",
        quantile(&took, 0.5),
        quantile(&took, 0.99),
        took.last().copied().unwrap_or(0)
    );
    // Every finding at once: the wire's (safety), then the members'.
    let mut problems = wire.violations.clone();
    problems.extend(members.kcv_conflicts(&wire));
    problems.extend(
        failures
            .iter()
            .map(|f| format!("membership operation: {f}")),
    );
    let lost = members.lost(&ids);
    let ended = members.memberships_ended();
    problems.extend(lost.iter().cloned());
    if ended > 0 {
        problems.push(format!(
            "member daemons were told {ended} times that their membership ended"
        ));
    }
    assert!(
        problems.is_empty(),
        "{problems:#?}\ncontrollers: {:?}, lease {:?}\n{}",
        cluster.addrs(),
        cluster.lease_row(),
        if lost.is_empty() && ended == 0 {
            cluster.all_logs()
        } else {
            evidence(&cluster, &members, &ids)
        }
    );
    assert_eq!(churn.done.load(Ordering::SeqCst), operations);
    assert!(wire.heartbeats > 0 && wire.wraps_seen > 0 && wire.unauthentic == 0);
}

/// For a member daemon that lost its membership: its log, and what every controller's audit
/// log and stderr say of its member ids.
fn evidence(cluster: &Cluster, members: &Members, ids: &[u64]) -> String {
    let mut out = String::new();
    for (i, view) in members.views().iter().enumerate() {
        let Some(view) = view else { continue };
        if view.ids.len() < 2 && view.member == ids[i] {
            continue;
        }
        let log =
            std::fs::read_to_string(members.logs.join(format!("m{i}.err"))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
        out += &format!(
            "=== member daemon {i} log (last 40 lines):\n{}\n",
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
        for c in 0..cluster.nodes.len() {
            for id in &view.ids {
                let needle = format!("\"member\":{id}");
                let text = std::fs::read_to_string(cluster.nodes[c].state.join("audit.jsonl"))
                    .unwrap_or_default();
                for line in text.lines().filter(|l| l.contains(&needle)) {
                    out += &format!("controller {c} audit: {line}\n");
                }
                let text = std::fs::read_to_string(cluster.nodes[c].dir.join("server.log"))
                    .unwrap_or_default();
                for line in text.lines().filter(|l| l.contains(&id.to_string())) {
                    out += &format!("controller {c} log: {line}\n");
                }
            }
        }
    }
    out + &cluster.all_logs()
}

/// A background `gkmctl` call (it blocks while the controller is stopped).
fn ctl_in_background(socket: PathBuf, args: &[&str]) -> JoinHandle<Output> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    std::thread::spawn(move || {
        Command::new(GKMCTL)
            .arg("--socket")
            .arg(&socket)
            .args(&args)
            .output()
            .unwrap()
    })
}

/// Waits for `thread` at most `limit`.
fn join_within<T>(thread: JoinHandle<T>, limit: Duration, what: &str) -> T {
    let deadline = Instant::now() + limit;
    while !thread.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what} did not finish within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    thread.join().unwrap()
}

#[test]
fn ha_a_zombie_leader_sends_nothing_of_a_new_epoch() {
    let _serial = serial();
    let n_members = usize::try_from(knob("GKM_HA_SMALL_MEMBERS", 6)).unwrap();
    let Some(mut cluster) = Cluster::start("ha-zombie", 3) else {
        return;
    };
    let mut rng = ChaCha20Rng::seed_from_u64(knob("GKM_HA_SEED", 2026));
    let mut capture = Capture::start(cluster.group, cluster.public);
    let (old, term) = cluster.wait_leader(Duration::from_secs(20));
    let members = Members::start(&cluster, n_members, &cluster.nodes[0].dir, &mut rng);
    let ids = members.wait_admitted(Duration::from_secs(60));
    let churn = Arc::new(Churn::new(&cluster, 0, 7));
    let (victim, victim_controllers) = churn.join(old).unwrap();
    let victim_id = victim.membership().unwrap().0.0;

    let before = capture.max_epoch_so_far();
    let stopped_at = Instant::now();
    cluster.running(old).unwrap().signal("STOP");
    // Work queued at the stopped leader: a registration (its connection waits in the listen
    // backlog) and an eviction (on the control socket). Once it continues, both would make a
    // rekey; neither may go out.
    let joiner = {
        let churn = churn.clone();
        std::thread::spawn(move || churn.join(old))
    };
    let evict = ctl_in_background(
        cluster.nodes[old].socket(),
        &["evict", "demo", &victim_id.to_string()],
    );
    std::thread::sleep((cluster.lease * 3).saturating_sub(stopped_at.elapsed()));

    // A standby took over and rekeyed, while the old leader was stopped.
    let (new, new_term) = cluster
        .leader()
        .unwrap_or_else(|| panic!("no leader after 3 leases\n{}", cluster.all_logs()));
    assert_ne!(new, old, "the stopped controller still leads");
    assert!(new_term > term, "term {new_term} after {term}");
    let Some((takeover, _)) = capture.wire().first_above(before) else {
        panic!(
            "no rekey above epoch {before} while the leader was stopped\n{}",
            cluster.all_logs()
        );
    };
    let rekeyed = cluster
        .audit(new)
        .iter()
        .any(|e| e["event"] == "rekeyed" && e["epoch"].as_u64() >= Some(takeover));
    assert!(
        rekeyed,
        "the new leader's audit shows no rekey to {takeover}"
    );
    let (behind_new, behind_old) = (cluster.audit(new).len(), cluster.audit(old).len());

    let logged_before = cluster.logged_events(old);
    let continued_at = Instant::now();
    cluster.running(old).unwrap().signal("CONT");
    let evicted = join_within(evict, Duration::from_secs(20), "gkmctl evict");
    // It finds out it was deposed (its log says so), and rekeys nothing.
    let deadline = continued_at + cluster.lease * 5;
    while Instant::now() < deadline
        && !cluster.logged_events(old)[logged_before.len()..]
            .iter()
            .any(|e| e["event"] == "deposed")
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    let after: Vec<serde_json::Value> = cluster.audit(old)[behind_old..].to_vec();
    let logged_after: Vec<serde_json::Value> =
        cluster.logged_events(old)[logged_before.len()..].to_vec();
    assert!(
        after
            .iter()
            .chain(&logged_after)
            .all(|e| e["event"] != "rekeyed"),
        "the old leader rekeyed after SIGCONT: {after:#?} {logged_after:#?}"
    );
    assert!(
        logged_after.iter().any(|e| e["event"] == "deposed"),
        "the old leader did not say it was deposed: {logged_after:#?}\n{}",
        cluster.log_tail(old, 30)
    );
    let (leader, _) = cluster.wait_leader(Duration::from_secs(10));
    assert_eq!(
        leader,
        new,
        "leadership moved again\n{}",
        cluster.all_logs()
    );

    // The queued registration found the new leader; the member the deposed leader was asked to
    // evict is still a member there.
    let joined = join_within(joiner, OPERATION_LIMIT * 2, "the queued registration");
    let (joined, _) = joined.unwrap_or_else(|e| panic!("{e}\n{}", cluster.all_logs()));
    let listed = cluster.nodes[new].ctl_json(&["members", "demo"]);
    let listed: BTreeSet<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_u64())
        .collect();
    assert!(
        listed.contains(&victim_id),
        "{victim_id} evicted: {listed:?}"
    );
    assert!(listed.contains(&joined.membership().unwrap().0.0));

    // Members converge on the new leader's epoch; nothing of the wire conflicts.
    let epoch = cluster.epoch(new).unwrap();
    assert!(
        members.wait_exactly(epoch, &capture, Duration::from_secs(15)),
        "members did not converge on epoch {epoch}: {:#?}",
        members.views()
    );
    let _ = capture.max_epoch_so_far();
    let wire = capture.wire();
    eprintln!(
        "ha zombie: stopped {:?}; takeover epoch {takeover} (term {term} -> {new_term}); old \
         leader after SIGCONT: {after:?}; new leader's audit since: {} events; {} heartbeats \
         of an epoch below one already sent",
        continued_at.duration_since(stopped_at),
        cluster.audit(new).len() - behind_new,
        wire.stale_heartbeats
    );
    assert!(wire.violations.is_empty(), "{:#?}", wire.violations);
    let conflicts = members.kcv_conflicts(&wire);
    assert!(conflicts.is_empty(), "{conflicts:#?}");
    let lost = members.lost(&ids);
    assert!(lost.is_empty(), "{lost:#?}");
    assert_eq!(members.memberships_ended(), 0);
    drop(wire);
    assert!(Churn::leave(victim, victim_controllers).unwrap());

    // What the operator was told, last: both of these fail on the daemon as it is (see the
    // report of this test's commit).
    let mut told = Vec::new();
    if evicted.status.success() {
        told.push(format!(
            "gkmctl evict at the deposed leader answered success ({:?}), yet member {victim_id} \
             was never evicted: the new leader lists it",
            String::from_utf8_lossy(&evicted.stdout).trim()
        ));
    }
    if !after.iter().any(|e| e["event"] == "deposed") {
        told.push(format!(
            "the old leader's audit.jsonl has no \"deposed\" line after SIGCONT (its log has \
             it: {:?}); lines since: {after:?}",
            logged_after
                .iter()
                .filter(|e| e["event"] == "deposed")
                .collect::<Vec<_>>()
        ));
    }
    assert!(
        told.is_empty(),
        "{told:#?}\nold leader's log:\n{}",
        cluster.log_tail(old, 40)
    );
}

#[test]
fn ha_database_restart_mid_run() {
    let _serial = serial();
    let n_members = usize::try_from(knob("GKM_HA_SMALL_MEMBERS", 6)).unwrap();
    let Some(mut cluster) = Cluster::start("ha-dbrestart", 3) else {
        return;
    };
    let mut rng = ChaCha20Rng::seed_from_u64(knob("GKM_HA_SEED", 2026));
    let mut capture = Capture::start(cluster.group, cluster.public);
    let (leader, term) = cluster.wait_leader(Duration::from_secs(20));
    let members = Members::start(&cluster, n_members, &cluster.nodes[0].dir, &mut rng);
    let ids = members.wait_admitted(Duration::from_secs(60));
    let churn = Arc::new(Churn::new(&cluster, 0, 11));
    let (leaver, leaver_controllers) = churn.join(leader).unwrap();
    let epoch = cluster.epoch(leader).unwrap();
    assert!(members.wait_exactly(epoch, &capture, Duration::from_secs(15)));

    let before = capture.max_epoch_so_far();
    cluster.pg.stop();
    let down_at = Instant::now();
    // Changes while the database is down: a registration and a leave, each retried by its
    // member until a leader answers.
    let joiner = {
        let churn = churn.clone();
        std::thread::spawn(move || churn.join(leader))
    };
    let leave = std::thread::spawn(move || Churn::leave(leaver, leaver_controllers));
    std::thread::sleep(cluster.lease * 3);
    let while_down = capture.max_epoch_so_far();
    assert_eq!(
        while_down,
        before,
        "a rekey went out while the database was down\n{}",
        cluster.all_logs()
    );
    let down_for = down_at.elapsed();
    let up_at = Instant::now();
    cluster.pg.start_again();

    let Some((back, on_wire)) = capture.wait_above(before, Duration::from_secs(30)) else {
        panic!(
            "no rekey within 30 s of the database's return\n{}",
            cluster.all_logs()
        );
    };
    let Some(held) = members.wait_at_least(back, Duration::from_secs(20)) else {
        panic!("members did not reach epoch {back}: {:#?}", members.views());
    };
    let joined = join_within(joiner, OPERATION_LIMIT * 2, "the registration")
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.all_logs()));
    let left = join_within(leave, OPERATION_LIMIT * 2, "the leave")
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.all_logs()));
    let (now_leader, now_term) = cluster.wait_leader(Duration::from_secs(10));
    let listed = cluster.nodes[now_leader].ctl_json(&["members", "demo"]);
    let listed: BTreeSet<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_u64())
        .collect();
    assert!(listed.contains(&joined.0.membership().unwrap().0.0));
    for id in &ids {
        assert!(
            listed.contains(id),
            "member daemon {id} is gone: {listed:?}"
        );
    }
    let epoch = cluster.epoch(now_leader).unwrap();
    assert!(
        members.wait_exactly(epoch, &capture, Duration::from_secs(15)),
        "members did not converge on epoch {epoch}: {:#?}",
        members.views()
    );
    let _ = capture.max_epoch_so_far();
    let wire = capture.wire();
    eprintln!(
        "ha database restart: down {:.1} s with nothing sent above epoch {before}; back: first \
         rekey (epoch {back}) {} ms after the restart began, every member holds it {} ms after; leader \
         {leader} term {term} -> {now_leader} term {now_term}; leave acknowledged: {left}",
        down_for.as_secs_f64(),
        on_wire.saturating_duration_since(up_at).as_millis(),
        held.saturating_duration_since(up_at).as_millis(),
    );
    assert!(wire.violations.is_empty(), "{:#?}", wire.violations);
    let conflicts = members.kcv_conflicts(&wire);
    assert!(conflicts.is_empty(), "{conflicts:#?}");
    let lost = members.lost(&ids);
    assert!(lost.is_empty(), "{lost:#?}");
    assert_eq!(members.memberships_ended(), 0);
}

//! GKM-V030..V032: `kill -9` of the real controller at random (seeded) moments while real member
//! daemons join, leave and are evicted on loopback. A capture socket on the multicast group
//! records every rekey datagram and heartbeat; across all restarts no wrap (epoch, target,
//! wrapping node and version) is ever sent with two ciphertexts, epochs never go backwards, every
//! restarted controller is above every epoch sent before the kill, and at the end the members
//! converge without having registered again because of a crash.
//!
//! `GKM_SOAK_KILLS=N` sets the number of kills (default 50; the operations grow to 20 per kill
//! when that is more than 1,000); `GKM_CRASH_SEED=S` replays another schedule.
//! `scripts/soak.sh KILLS` runs this test in release mode with more kills.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use socket2::{Domain, Protocol, Socket, Type};
use support::{Running, Server, api_current, member_binary, multicast_receiver};
use wire::{AuthenticRekey, Heartbeat, MessageType};

const DEFAULT_KILLS: usize = 50;
const OPERATIONS: usize = 1_000;
/// Member state directories (identities) the operations draw from.
const SLOTS: usize = 32;
/// Running members are kept between these bounds.
const MIN_ALIVE: usize = 14;
const MAX_ALIVE: usize = 22;
const MARK: &[u8] = b"GKM-TEST-MARK";

/// A wrap's (key, nonce) identity: epoch, target node, wrapping node, and whether the wrapping
/// key is the one set in that epoch (its version is the epoch) or the one held before.
type WrapId = (u64, u32, u32, bool);

/// What the capture socket saw on the group's multicast address.
#[derive(Default)]
struct Wire {
    wraps: HashMap<WrapId, [u8; lkh_tree::WRAPPED_LEN]>,
    wraps_seen: u64,
    rekey_datagrams: u64,
    heartbeats: u64,
    last_rekey_epoch: u64,
    last_beat_epoch: u64,
    max_epoch: u64,
    kcv: BTreeMap<u64, [u8; 8]>,
    /// Per epoch: the datagram count it announced and the indices seen.
    parts: BTreeMap<u64, (u16, BTreeSet<u16>)>,
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
        if epoch < self.last_rekey_epoch {
            self.violations.push(format!(
                "rekey epoch went back from {} to {epoch}",
                self.last_rekey_epoch
            ));
        }
        self.last_rekey_epoch = epoch;
        self.max_epoch = self.max_epoch.max(epoch);
        let part = self
            .parts
            .entry(epoch)
            .or_insert((d.count, BTreeSet::new()));
        if part.0 != d.count {
            self.violations.push(format!(
                "epoch {epoch} announced {} and {} datagrams",
                part.0, d.count
            ));
        }
        part.1.insert(d.index);
        for w in d.wraps() {
            self.wraps_seen += 1;
            let id = (epoch, w.target.0, w.wrapping.0, w.under_new);
            let first = *self.wraps.entry(id).or_insert(w.ciphertext);
            if first != w.ciphertext {
                self.violations.push(format!(
                    "(key, nonce) reuse: epoch {epoch} target {} wrapping {} (new: {}) sent with \
                     two ciphertexts",
                    w.target.0, w.wrapping.0, w.under_new
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
        if epoch < self.last_beat_epoch {
            self.violations.push(format!(
                "heartbeat epoch went back from {} to {epoch}",
                self.last_beat_epoch
            ));
        }
        self.last_beat_epoch = epoch;
        self.max_epoch = self.max_epoch.max(epoch);
        if *self.kcv.entry(epoch).or_insert(kcv) != kcv {
            self.violations
                .push(format!("epoch {epoch} announced with two traffic keys"));
        }
    }

    /// Epochs seen on the wire with some of their datagrams missing.
    fn incomplete(&self) -> usize {
        self.parts
            .values()
            .filter(|(count, seen)| seen.len() != usize::from(*count))
            .count()
    }
}

/// A thread recording every datagram sent to the group; stopped and joined on drop.
struct Capture {
    wire: Arc<Mutex<Wire>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    sender: Socket,
    group: SocketAddr,
    next_mark: u32,
}

impl Capture {
    fn start(server: &Server, controller: VerifyingKey) -> Capture {
        let group = SocketAddrV4::new(server.maddr, server.mport);
        let socket = multicast_receiver(group, Duration::from_millis(50));
        let wire = Arc::new(Mutex::new(Wire::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (wire, stop) = (wire.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        wire.lock().unwrap().datagram(&buf[..n], &controller);
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
            group: SocketAddr::V4(group),
            next_mark: 0,
        }
    }

    /// The highest epoch seen on the wire before this call: a marker sent to the group after
    /// everything before it (loopback delivers in order) comes back through the capture.
    fn max_epoch_so_far(&mut self) -> u64 {
        self.next_mark += 1;
        let id = self.next_mark;
        let mut mark = MARK.to_vec();
        mark.extend_from_slice(&id.to_be_bytes());
        self.sender.send_to(&mark, &self.group.into()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(epoch) = self.wire.lock().unwrap().marks.get(&id) {
                return *epoch;
            }
            assert!(Instant::now() < deadline, "capture marker {id} not seen");
            std::thread::sleep(Duration::from_millis(5));
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

/// One member identity (a state directory) and the daemon currently running on it.
struct Slot {
    dir: PathBuf,
    identity: String,
    running: Option<Running>,
    /// SIGTERMed, leaving.
    stopping: Option<Running>,
    starts: u32,
    evicted: Vec<u64>,
    /// Controller kills while this member was registering (a welcome may be lost with them).
    kills_while_registering: u32,
}

impl Slot {
    fn api(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// The member's answer to `{"op":"current"}` when it holds a key.
    fn current(&self) -> Option<serde_json::Value> {
        api_current(&self.api(), Duration::from_secs(5))
    }

    /// Running and not (or no longer) holding a membership the controller gave it.
    fn registering(&self) -> bool {
        self.running.is_some()
            && self
                .current()
                .is_none_or(|v| self.evicted.contains(&v["member"].as_u64().unwrap()))
    }

    /// Reaps a leaving daemon once it exited; true when the slot is free to start again.
    fn free(&mut self) -> bool {
        if self.stopping.as_mut().is_some_and(Running::exited) {
            self.stopping = None;
        }
        self.running.is_none() && self.stopping.is_none()
    }
}

/// The run's knobs, from the environment.
struct Plan {
    kills: usize,
    operations: usize,
    seed: u64,
}

impl Plan {
    fn from_env() -> Plan {
        let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let kills = number("GKM_SOAK_KILLS").map_or(DEFAULT_KILLS, |k| {
            usize::try_from(k).unwrap_or(DEFAULT_KILLS).max(1)
        });
        Plan {
            kills,
            operations: OPERATIONS.max(kills * 20),
            seed: number("GKM_CRASH_SEED").unwrap_or(2026),
        }
    }

    /// The operation indices after which the controller is killed: `kills` distinct ones.
    fn kill_points(&self, rng: &mut ChaCha20Rng) -> BTreeSet<usize> {
        let mut points = BTreeSet::new();
        while points.len() < self.kills {
            points.insert(usize::try_from(rng.next_u64() % self.operations as u64).unwrap());
        }
        points
    }
}

struct Run {
    server: Server,
    member_bin: PathBuf,
    key: String,
    slots: Vec<Slot>,
    logs: PathBuf,
    rng: ChaCha20Rng,
    evictions: u32,
    joins: u32,
    leaves: u32,
}

impl Run {
    fn spawn_member(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.starts += 1;
        let mut cmd = Command::new(&self.member_bin);
        cmd.args(["run", "--group", "demo", "--controller-key", &self.key])
            .args(["--controller", &format!("127.0.0.1:{}", self.server.port)])
            .args([
                "--multicast",
                &format!("{}:{}", self.server.maddr, self.server.mport),
            ])
            .arg("--state-dir")
            .arg(&slot.dir)
            .env("RUST_LOG", "info");
        let tag = format!("m{i}-{}", slot.starts);
        slot.running = Some(Running::spawn_logged(&mut cmd, &self.logs, &tag));
        self.joins += 1;
    }

    fn pick(&mut self, candidates: &[usize]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let n = u64::try_from(candidates.len()).unwrap();
        Some(candidates[usize::try_from(self.rng.next_u64() % n).unwrap()])
    }

    /// One membership operation: a join, a leave (SIGTERM) or an eviction (gkmctl).
    fn operation(&mut self) {
        let alive: Vec<usize> = (0..SLOTS)
            .filter(|&i| self.slots[i].running.is_some())
            .collect();
        let free: Vec<usize> = (0..SLOTS).filter(|&i| self.slots[i].free()).collect();
        let roll = self.rng.next_u32() % 100;
        let join = alive.len() < MIN_ALIVE || (alive.len() < MAX_ALIVE && roll < 40);
        if join && let Some(i) = self.pick(&free) {
            self.spawn_member(i);
        } else if alive.len() > MIN_ALIVE && roll < 70 {
            let i = self.pick(&alive).unwrap();
            let running = self.slots[i].running.take().unwrap();
            running.signal("TERM");
            self.slots[i].stopping = Some(running);
            self.leaves += 1;
        } else {
            self.evict(&alive);
        }
    }

    /// Evicts a random running member the controller lists (by its identity key).
    fn evict(&mut self, alive: &[usize]) {
        let listed = self.server.ctl_json(&["members", "demo"]);
        let mut targets = Vec::new();
        for m in listed.as_array().unwrap() {
            let (id, identity) = (m["id"].as_u64().unwrap(), m["identity"].as_str().unwrap());
            if let Some(&i) = alive.iter().find(|&&i| self.slots[i].identity == identity)
                && !self.slots[i].evicted.contains(&id)
            {
                targets.push((i, id));
            }
        }
        if targets.is_empty() {
            return;
        }
        let n = u64::try_from(targets.len()).unwrap();
        let (i, id) = targets[usize::try_from(self.rng.next_u64() % n).unwrap()];
        if self
            .server
            .ctl(&["evict", "demo", &id.to_string()])
            .status
            .success()
        {
            self.slots[i].evicted.push(id);
            self.evictions += 1;
        }
    }
}

/// Every `admitted` audit event's identity key, counted; and the lines that did not parse (a
/// line cut by a kill).
fn admissions(audit: &Path) -> (HashMap<String, u32>, usize) {
    let text = std::fs::read_to_string(audit).unwrap();
    let mut counts = HashMap::new();
    let mut torn = 0;
    for line in text.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) if v["event"] == "admitted" => {
                *counts
                    .entry(v["identity"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
            Ok(_) => {}
            Err(_) => torn += 1,
        }
    }
    (counts, torn)
}

/// Times a member's logs say the controller ended its membership (it then registers again).
fn memberships_ended(logs: &Path, slot: usize) -> u32 {
    let mut ended = 0;
    for entry in std::fs::read_dir(logs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with(&format!("m{slot}-")) && name.ends_with(".err") {
            let text = std::fs::read_to_string(&path).unwrap();
            ended += u32::try_from(text.matches("membership ended").count()).unwrap();
        }
    }
    ended
}

#[test]
fn v030_v032_kill_9_during_churn_never_reuses_a_nonce_nor_goes_back_an_epoch() {
    let Some(member_bin) = member_binary() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "gkm-member is not built next to the tests"
        );
        eprintln!("skipped: target/*/gkm-member is not built (cargo build -p gkm-member)");
        return;
    };
    let plan = Plan::from_env();
    let started = Instant::now();
    let mut rng = ChaCha20Rng::seed_from_u64(plan.seed);
    let kill_points = plan.kill_points(&mut rng);
    let server = Server::new(
        "crash",
        "repeats = 1\nbatch_interval_ms = 40\nheartbeat_interval_ms = 150\nmtu = 576\n",
    );
    let mut controller = server.start();
    let key = server.public_key_hex();
    let mut capture = Capture::start(&server, server.public_key());
    let logs = server.dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let slots = (0..SLOTS)
        .map(|i| {
            let dir = server.dir.join(format!("member-{i}"));
            let out = Command::new(&member_bin)
                .args(["init", "--state-dir"])
                .arg(&dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            Slot {
                dir,
                identity: String::from_utf8(out.stdout).unwrap().trim().to_owned(),
                running: None,
                stopping: None,
                starts: 0,
                evicted: Vec::new(),
                kills_while_registering: 0,
            }
        })
        .collect();
    let mut run = Run {
        server,
        member_bin,
        key,
        slots,
        logs,
        rng,
        evictions: 0,
        joins: 0,
        leaves: 0,
    };
    eprintln!(
        "crash run: seed {}, {} operations, {} kills",
        plan.seed, plan.operations, plan.kills
    );

    let mut restarts = Vec::new();
    let mut on_send = 0;
    for op in 0..plan.operations {
        let sent_before = capture.wire.lock().unwrap().last_rekey_epoch;
        run.operation();
        if !kill_points.contains(&op) {
            std::thread::sleep(Duration::from_millis(20 + run.rng.next_u64() % 60));
            continue;
        }
        for slot in &mut run.slots {
            if slot.registering() {
                slot.kills_while_registering += 1;
            }
        }
        if run.rng.next_u32().is_multiple_of(2) {
            // At a random moment up to two batch intervals after the operation.
            std::thread::sleep(Duration::from_millis(run.rng.next_u64() % 80));
        } else {
            // Or as soon as the operation's rekey is on the wire, while the controller may
            // still be sending its datagrams and welcomes.
            let deadline = Instant::now() + Duration::from_millis(500);
            while capture.wire.lock().unwrap().last_rekey_epoch == sent_before
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            on_send += 1;
        }
        controller.kill();
        let before = capture.max_epoch_so_far();
        let restart = Instant::now();
        controller = run.server.start();
        // The restarted controller rekeys at once, above everything persisted (and so above
        // everything sent: nothing leaves before it is persisted).
        let after = loop {
            let epoch = run.server.epoch();
            if epoch > before || restart.elapsed() > Duration::from_secs(10) {
                break epoch;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        restarts.push(restart.elapsed());
        assert!(
            after > before,
            "kill {}: restarted at epoch {after}, but epoch {before} was on the wire before; \
             wire checks: {:#?}",
            restarts.len(),
            capture.wire.lock().unwrap().violations
        );
    }
    let churn = started.elapsed();

    // Leaving members finish; the rest converge on the controller's epoch and key.
    let deadline = Instant::now() + Duration::from_secs(60);
    for slot in &mut run.slots {
        while !slot.free() && slot.running.is_none() {
            assert!(Instant::now() < deadline, "a member did not leave");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let final_epoch = loop {
        let epoch = run.server.epoch();
        let kcv = capture.wire.lock().unwrap().kcv.get(&epoch).copied();
        let answers: Vec<_> = run
            .slots
            .iter()
            .filter(|s| s.running.is_some())
            .map(Slot::current)
            .collect();
        let all = answers.iter().all(|a| {
            a.as_ref().is_some_and(|a| {
                a["epoch"] == epoch && kcv.is_some_and(|k| a["kcv"] == hex::encode(k))
            })
        });
        if all {
            break epoch;
        }
        assert!(
            Instant::now() < deadline,
            "members did not converge on epoch {epoch}: {answers:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(controller);
    let elapsed = started.elapsed();

    // No member re-registered because of a kill: only fresh starts, evictions, and welcomes a
    // kill may have cut off.
    let (admitted, torn) = admissions(&run.server.state.join("audit.jsonl"));
    let (mut extra, mut ended_total) = (0, 0);
    for (i, slot) in run.slots.iter().enumerate() {
        let got = admitted.get(&slot.identity).copied().unwrap_or(0);
        let evicted = u32::try_from(slot.evicted.len()).unwrap();
        let bound = slot.starts + evicted + slot.kills_while_registering;
        assert!(
            got <= bound,
            "member {i} admitted {got} times: {} starts, {evicted} evictions, {} kills while \
             it registered",
            slot.starts,
            slot.kills_while_registering
        );
        extra += got.saturating_sub(slot.starts + evicted);
        let ended = memberships_ended(&run.logs, i);
        ended_total += ended;
        assert!(
            ended <= evicted,
            "member {i}: the controller ended its membership {ended} times, evicted {evicted}"
        );
    }

    let wire = capture.wire.lock().unwrap();
    let mut restart_ms: Vec<u128> = restarts.iter().map(Duration::as_millis).collect();
    restart_ms.sort_unstable();
    eprintln!(
        "crash run: {} kills ({on_send} as a rekey went out), {} operations ({} joins, {} leaves, {} evictions) in {:.1} s \
         (churn {:.1} s); final epoch {final_epoch}; restart median {} ms; {} rekey datagrams, \
         {} wraps checked ({} distinct), {} heartbeats, {} epochs with datagrams missing on the \
         wire, {} unauthentic; {} admissions ({} after a kill cut a welcome), {ended_total} \
         memberships ended by evictions, {torn} torn audit lines",
        restarts.len(),
        plan.operations,
        run.joins,
        run.leaves,
        run.evictions,
        elapsed.as_secs_f64(),
        churn.as_secs_f64(),
        restart_ms[restart_ms.len() / 2],
        wire.rekey_datagrams,
        wire.wraps_seen,
        wire.wraps.len(),
        wire.heartbeats,
        wire.incomplete(),
        wire.unauthentic,
        admitted.values().sum::<u32>(),
        extra,
    );
    assert!(wire.violations.is_empty(), "{:#?}", wire.violations);
    // Evicted members notice (the logs are read right).
    assert!(run.evictions == 0 || ended_total > 0);
    assert_eq!(restarts.len(), plan.kills);
    assert!(wire.wraps_seen > 0 && wire.heartbeats > 0);
}

//! Multi-host tests: a controller host, a relay host and member hosts, each in its own network
//! namespace, joined by veth pairs to a bridge in a switch namespace, with real multicast across
//! the bridge. Every namespace is created by the test and deleted when it ends (also on panic).
//!
//! Impairments (this machine's kernel has no `netem` qdisc, DESIGN.md §9):
//! - loss: nftables on each member host's input (`numgen random` for random loss, `numgen inc`
//!   for a burst pattern), counted by nftables itself;
//! - delay, reordering and duplication: the relay host receives the controller's multicast group
//!   and re-sends every datagram to the members' group after a random delay (so datagrams
//!   overtake each other), some of them twice.
//!
//! Each scenario runs `GKM_NETNS_OPS` (default 1,000) joins, leaves and evictions of real
//! `gkm-member` processes against a real `gkm-server`, in rounds; after every round every running
//! member must hold the controller's current epoch and traffic key within the resync bound.
//! Each scenario prints one row of the loss/resync table; `GKM_NETNS_REPEATS="1 2 3"` runs every
//! loss pattern with each repeat count and `GKM_NETNS_SPACING_MS` sets the time between copies
//! (`scripts/netns-table.sh`).
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables); without them every test fails saying what
//! is missing, unless `GKM_SKIP_NETNS=1` (which CI does not set: `.ci/run` installs both and
//! runs as root).

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss,
    reason = "counts and milliseconds of a bounded test run"
)]

mod support;

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use socket2::{Domain, Protocol, Socket, Type};
use support::netns::{Host, Lab, nft, run, v6_address};

const SERVER: &str = env!("CARGO_BIN_EXE_gkm-server");
const GKMCTL: &str = env!("CARGO_BIN_EXE_gkmctl");

/// The controller's group address and the members' (relayed) one.
const CONTROLLER_GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 1), 47_701);
const MEMBER_GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 78, 1), 47_711);
/// The IPv6 group: site-local scope, members receive it straight from the controller.
const V6_GROUP: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0xff15, 0, 0, 0, 0, 0, 0x77, 1), 47_721, 0, 0);
const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const RELAY_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const MEMBER_HOSTS: usize = 8;
const MEMBERS_PER_HOST: usize = 5;
/// How long a round may take to converge: heartbeats every 250 ms, so a member that lost a
/// rekey and the next heartbeats still resyncs well within this.
const RESYNC_BOUND: Duration = Duration::from_secs(20);
/// The controller's default time between the copies of a datagram.
const DEFAULT_SPACING_MS: u64 = 100;
/// Bound on waiting for a process to start or stop.
const PROCESS_BOUND: Duration = Duration::from_secs(10);

/// Scenarios run one at a time: each one loads both cores with ~45 processes.
static SERIAL: Mutex<()> = Mutex::new(());

/// The member agent, built next to the controller by `cargo test --workspace`.
fn member_binary() -> PathBuf {
    Path::new(SERVER).with_file_name("gkm-member")
}

/// Why the environment cannot run these tests, if it cannot.
fn missing_prerequisite() -> Option<String> {
    support::netns::missing_prerequisite(&member_binary())
}

/// The controller's request address, seen from a member host.
fn controller_addr(family: Family) -> String {
    match family {
        Family::V4 => format!("{CONTROLLER_IP}:47700"),
        Family::V6 => format!("[{}]:47700", v6_address(1)),
    }
}

/// Which IP version a lab runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// The hosts, their namespaces and the switch.
struct Net {
    controller: Host,
    relay: Host,
    members: Vec<Host>,
    _lab: Lab,
}

impl Net {
    fn build() -> Net {
        let mut lab = Lab::new();
        let controller = lab.attach("c", CONTROLLER_IP);
        let relay = lab.attach("r", RELAY_IP);
        let members = (0..MEMBER_HOSTS)
            .map(|i| lab.attach(&format!("m{i}"), Ipv4Addr::new(10, 77, 0, 10 + i as u8)))
            .collect();
        Net {
            controller,
            relay,
            members,
            _lab: lab,
        }
    }
}

/// How member hosts lose datagrams.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// Each datagram independently with this percentage.
    Random(u32),
    /// `burst` consecutive datagrams of every `period`.
    Burst { burst: u32, period: u32 },
    /// Every datagram: the network silently drops multicast.
    Blackhole,
    /// The link drops everything for `down_ms` of every `period_ms` (host phases staggered).
    Outage { down_ms: u64, period_ms: u64 },
}

impl Loss {
    fn label(self) -> String {
        match self {
            Loss::Random(p) => format!("{p}% random"),
            Loss::Burst { burst, period } => {
                format!("bursts of {burst} in {period}")
            }
            Loss::Blackhole => "all multicast".into(),
            Loss::Outage { down_ms, period_ms } => {
                format!("outages of {down_ms} ms every {period_ms} ms")
            }
        }
    }

    /// The nftables rule that drops, on the members' group port.
    fn rule(self) -> String {
        let port = MEMBER_GROUP.port();
        let test = match self {
            Loss::Random(0) => return String::new(),
            Loss::Outage { .. } => return "        udp dport @down counter drop\n".into(),
            Loss::Random(p) => format!("numgen random mod 100 < {p}"),
            Loss::Burst { burst, period } => format!("numgen inc mod {period} < {burst}"),
            Loss::Blackhole => String::new(),
        };
        format!("        udp dport {port} {test} counter drop\n")
    }

    /// Installs the rule on a host, with counters of what arrived and what was dropped.
    fn install(self, host: &Host) {
        let port = MEMBER_GROUP.port();
        nft(
            &host.ns,
            &format!(
                "table inet gkmloss {{\n    set down {{ type inet_service; }}\n    chain input {{\n        type filter hook input priority 0; policy accept;\n        udp dport {port} counter\n{}    }}\n}}\n",
                self.rule()
            ),
        );
    }

    /// Datagrams that reached the host's input and datagrams it dropped, from its counters.
    fn counters(host: &Host) -> (u64, u64) {
        let listing = run(
            "ip",
            &[
                "netns", "exec", &host.ns, "nft", "list", "table", "inet", "gkmloss",
            ],
        );
        let packets: Vec<u64> = listing
            .lines()
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let at = words.iter().position(|w| *w == "packets")?;
                words.get(at + 1)?.parse().ok()
            })
            .collect();
        (
            packets.first().copied().unwrap_or(0),
            packets.get(1).copied().unwrap_or(0),
        )
    }
}

/// Takes the member hosts' links down and up on the schedule of a [`Loss::Outage`], each host
/// with its own phase, by adding the members' port to the host's `down` set and removing it.
struct Outages {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Outages {
    fn start(net: &Net, down_ms: u64, period_ms: u64) -> Outages {
        let stop = Arc::new(AtomicBool::new(false));
        let hosts: Vec<String> = net.members.iter().map(|h| h.ns.clone()).collect();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut down = vec![false; hosts.len()];
            while !stop2.load(Ordering::SeqCst) {
                let now = start.elapsed().as_millis() as u64;
                for (i, host) in hosts.iter().enumerate() {
                    let phase = period_ms * i as u64 / hosts.len() as u64;
                    let should = (now + phase) % period_ms < down_ms;
                    if should != down[i] {
                        let verb = if should { "add" } else { "delete" };
                        nft(
                            host,
                            &format!(
                                "{verb} element inet gkmloss down {{ {} }}\n",
                                MEMBER_GROUP.port()
                            ),
                        );
                        down[i] = should;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Outages {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Outages {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the relay did.
#[derive(Default)]
struct RelayStats {
    received: AtomicU64,
    sent: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

/// The relay host: controller group in, members' group out, each datagram delayed by a random
/// 1–30 ms (so later ones overtake earlier ones) and 3% of them sent twice.
struct Relay {
    stop: Arc<AtomicBool>,
    stats: Arc<RelayStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A datagram waiting in the relay: ordered by due time, earliest first.
struct Held {
    due: Instant,
    seq: u64,
    bytes: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due && self.seq == other.seq
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

impl Relay {
    fn start(host: &Host, seed: u64) -> Relay {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(RelayStats::default());
        let netns = File::open(format!("/var/run/netns/{}", host.ns)).unwrap();
        let ip = host.ip;
        let (stop2, stats2) = (stop.clone(), stats.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // Only this thread moves into the relay host's namespace.
            rustix::thread::move_into_link_name_space(
                netns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            let (input, output) = relay_sockets(ip);
            ready_tx.send(()).unwrap();
            relay_loop(&input, &output, &stop2, &stats2, seed);
        });
        ready_rx
            .recv_timeout(PROCESS_BOUND)
            .expect("the relay did not start");
        Relay {
            stop,
            stats,
            thread: Some(thread),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn relay_sockets(ip: Ipv4Addr) -> (UdpSocket, UdpSocket) {
    let input = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    input.set_reuse_address(true).unwrap();
    input
        .bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CONTROLLER_GROUP.port()).into())
        .unwrap();
    input.join_multicast_v4(CONTROLLER_GROUP.ip(), &ip).unwrap();
    input
        .set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let output = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    output.set_multicast_if_v4(&ip).unwrap();
    output.set_multicast_loop_v4(false).unwrap();
    output.set_multicast_ttl_v4(1).unwrap();
    output.bind(&SocketAddrV4::new(ip, 0).into()).unwrap();
    (input.into(), output.into())
}

fn relay_loop(
    input: &UdpSocket,
    output: &UdpSocket,
    stop: &AtomicBool,
    stats: &RelayStats,
    seed: u64,
) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut held = BinaryHeap::new();
    let mut buf = vec![0u8; 65_536];
    let mut seq = 0u64;
    let mut last_sent = None;
    while !stop.load(Ordering::SeqCst) {
        if let Ok(n) = input.recv(&mut buf) {
            stats.received.fetch_add(1, Ordering::Relaxed);
            let copies = if rng.next_u32() % 100 < 3 { 2 } else { 1 };
            stats.duplicated.fetch_add(copies - 1, Ordering::Relaxed);
            for _ in 0..copies {
                let delay = Duration::from_millis(1 + u64::from(rng.next_u32() % 30));
                held.push(Held {
                    due: Instant::now() + delay,
                    seq,
                    bytes: buf[..n].to_vec(),
                });
            }
            seq += 1;
        }
        while held.peek().is_some_and(|h: &Held| h.due <= Instant::now()) {
            let h = held.pop().unwrap();
            if last_sent.is_some_and(|last| h.seq < last) {
                stats.reordered.fetch_add(1, Ordering::Relaxed);
            }
            last_sent = Some(last_sent.map_or(h.seq, |last: u64| last.max(h.seq)));
            if output.send_to(&h.bytes, MEMBER_GROUP).is_ok() {
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    fn terminate(mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < PROCESS_BOUND {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

/// The controller host's daemon and its control socket.
struct Controller {
    state: PathBuf,
    _process: Process,
}

impl Controller {
    fn start(net: &Net, dir: &Path, plan: &Plan) -> (Controller, String) {
        let state = dir.join("controller");
        let init = run(SERVER, &["init", "--state-dir", state.to_str().unwrap()]);
        let key = init
            .split(|c: char| !c.is_ascii_hexdigit())
            .find(|w| w.len() == 64)
            .expect("init prints the public key")
            .to_owned();
        let (group, interface) = match plan.family {
            Family::V4 => (CONTROLLER_GROUP.to_string(), net.controller.ip.to_string()),
            Family::V6 => (V6_GROUP.to_string(), net.controller.ifindex.to_string()),
        };
        let config = dir.join("gkm-server.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{}\"\n[[group]]\nname = \"demo\"\n\
                 multicast = \"{group}\"\nttl = 1\ninterface = \"{interface}\"\nloop = false\n\
                 fanout = {}\nbatch_interval_ms = 100\nheartbeat_interval_ms = 250\n\
                 lease_ms = 600000\nrepeats = {}\nrepeat_spacing_ms = {}\n",
                controller_addr(plan.family),
                plan.fanout,
                plan.repeats,
                plan.spacing_ms
            ),
        )
        .unwrap();
        let log = File::create(dir.join("controller.log")).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.controller.ns,
                SERVER,
                "run",
                "--config",
            ])
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let controller = Controller {
            state,
            _process: Process(child),
        };
        let start = Instant::now();
        while UnixStream::connect(controller.state.join("control.sock")).is_err() {
            assert!(
                start.elapsed() < PROCESS_BOUND,
                "gkm-server did not start: see {}",
                dir.join("controller.log").display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (controller, key)
    }

    fn ctl(&self, args: &[&str]) -> serde_json::Value {
        let socket = self.state.join("control.sock");
        let mut all = vec!["--socket", socket.to_str().unwrap(), "--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&run(GKMCTL, &all)).unwrap()
    }

    /// The group's epoch and changes waiting for a batch.
    fn epoch(&self) -> (u64, u64) {
        let g = &self.ctl(&["groups"])[0];
        (g["epoch"].as_u64().unwrap(), g["pending"].as_u64().unwrap())
    }

    fn members(&self) -> BTreeSet<u64> {
        self.ctl(&["members", "demo"])
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect()
    }

    /// Admissions and departures by reason, from the audit log.
    fn audit(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        let file = File::open(self.state.join("audit.jsonl")).unwrap();
        for line in BufReader::new(file).lines() {
            let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            let key = match v["event"].as_str().unwrap() {
                "departed" => v["reason"].as_str().unwrap().to_owned(),
                other => other.to_owned(),
            };
            *counts.entry(key).or_default() += 1;
        }
        counts
    }
}

/// What a member's local API reports.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Current {
    member: u64,
    epoch: u64,
    kcv: String,
    resyncs: u64,
}

fn current(api: &Path) -> Option<Current> {
    let v = support::api_current(api, Duration::from_secs(2))?;
    Some(Current {
        member: v["member"].as_u64()?,
        epoch: v["epoch"].as_u64()?,
        kcv: v["kcv"].as_str()?.to_owned(),
        resyncs: v["resyncs"].as_u64()?,
    })
}

/// One member agent: a state directory on a member host, running or not.
struct Slot {
    host: usize,
    dir: PathBuf,
    running: Option<Process>,
    /// The most resyncs the current run reported.
    resyncs: u64,
}

impl Slot {
    fn api(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn start(&mut self, net: &Net, key: &str, plan: &Plan) {
        let host = &net.members[self.host];
        let (group, interface) = match plan.family {
            Family::V4 => (
                MEMBER_GROUP.to_string(),
                ["--interface".into(), host.ip.to_string()],
            ),
            Family::V6 => (
                V6_GROUP.to_string(),
                ["--interface-v6".into(), host.ifindex.to_string()],
            ),
        };
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &host.ns])
            .arg(member_binary())
            .args([
                "run",
                "--controller",
                &controller_addr(plan.family),
                "--group",
                "demo",
                "--controller-key",
                key,
                "--multicast",
                &group,
                &interface[0],
                &interface[1],
                "--renew-ms",
                "300000",
                "--fanout-after-ms",
                if plan.fanout { "1500" } else { "0" },
                "--state-dir",
            ])
            .arg(&self.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.running = Some(Process(child));
        self.resyncs = 0;
    }

    /// Stops the agent with SIGTERM (it leaves); returns this run's resync count.
    fn stop(&mut self) -> u64 {
        if let Some(c) = current(&self.api()) {
            self.resyncs = self.resyncs.max(c.resyncs);
        }
        let process = self.running.take().expect("running");
        assert!(
            process.terminate(),
            "gkm-member did not leave cleanly: see {}",
            self.dir.with_extension("log").display()
        );
        self.resyncs
    }
}

/// One scenario's results: a row of the table.
struct Row {
    family: Family,
    spacing_ms: u64,
    fanout: bool,
    loss: Loss,
    repeats: u32,
    ops: u64,
    audit: BTreeMap<String, u64>,
    rounds: usize,
    epochs: u64,
    runs: usize,
    runs_resynced: usize,
    resyncs: u64,
    arrived: u64,
    dropped: u64,
    relay: [u64; 4],
    converge_ms: Vec<u64>,
    /// Member agents that ran, and those whose log says they switched to fan-out.
    agents: usize,
    fell_back: usize,
}

impl Row {
    fn print(&mut self) {
        self.converge_ms.sort_unstable();
        let p =
            |q: f64| self.converge_ms[((self.converge_ms.len() - 1) as f64 * q).round() as usize];
        println!(
            "netns row: {:?}{} loss={} repeats={} spacing_ms={} ops={} (joins {} leaves {} evictions {}) rounds={} epochs={} \
             member_runs={} needed_resync={} ({:.1}%) resyncs={} measured_loss={:.1}% ({} of {}) \
             relay received={} sent={} duplicated={} reordered={} converge_ms p50={} p99={} max={} \
             switched_to_fanout={}/{}",
            self.family,
            if self.fanout { "+fanout" } else { "" },
            self.loss.label(),
            self.repeats,
            self.spacing_ms,
            self.ops,
            self.audit.get("admitted").copied().unwrap_or(0),
            self.audit.get("left").copied().unwrap_or(0),
            self.audit.get("evicted").copied().unwrap_or(0),
            self.rounds,
            self.epochs,
            self.runs,
            self.runs_resynced,
            100.0 * self.runs_resynced as f64 / self.runs.max(1) as f64,
            self.resyncs,
            100.0 * self.dropped as f64 / self.arrived.max(1) as f64,
            self.dropped,
            self.arrived,
            self.relay[0],
            self.relay[1],
            self.relay[2],
            self.relay[3],
            p(0.5),
            p(0.99),
            p(1.0),
            self.fell_back,
            self.agents,
        );
    }
}

/// Waits until every running member holds the controller's epoch and key under a membership the
/// controller knows, with nothing pending; returns how long it took.
fn converge(controller: &Controller, slots: &mut [Slot]) -> Duration {
    let start = Instant::now();
    loop {
        let (epoch, pending) = controller.epoch();
        let members = controller.members();
        let answers: Vec<Option<Current>> = slots
            .iter()
            .filter(|s| s.running.is_some())
            .map(|s| current(&s.api()))
            .collect();
        let first = answers.first().cloned().flatten();
        let done = pending == 0
            && answers.iter().all(|a| {
                a.as_ref().is_some_and(|a| {
                    a.epoch == epoch
                        && members.contains(&a.member)
                        && first.as_ref().is_some_and(|f| f.kcv == a.kcv)
                })
            });
        for (slot, answer) in slots
            .iter_mut()
            .filter(|s| s.running.is_some())
            .zip(&answers)
        {
            if let Some(a) = answer {
                slot.resyncs = slot.resyncs.max(a.resyncs);
            }
        }
        if done {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < RESYNC_BOUND,
            "members did not converge to epoch {epoch} within {RESYNC_BOUND:?}: {answers:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn ops_target() -> u64 {
    std::env::var("GKM_NETNS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

/// Time between copies for the loss-pattern scenarios (`GKM_NETNS_SPACING_MS`, default the
/// controller's default).
fn spacing() -> u64 {
    std::env::var("GKM_NETNS_SPACING_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SPACING_MS)
}

fn repeat_counts() -> Vec<u32> {
    std::env::var("GKM_NETNS_REPEATS")
        .ok()
        .map(|v| {
            v.split_whitespace()
                .filter_map(|r| r.parse().ok())
                .collect()
        })
        .filter(|v: &Vec<u32>| !v.is_empty())
        .unwrap_or_else(|| vec![2])
}

/// One scenario: build the hosts, run the operations, return the table row.
fn scenario(plan: &Plan) -> Row {
    let Plan {
        loss,
        repeats,
        family,
        ops: target,
        seed,
        ..
    } = *plan;
    let net = Net::build();
    let dir = std::env::temp_dir().join(format!("{}-run", net.members[0].ns));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for host in &net.members {
        loss.install(host);
    }
    let outages = match loss {
        Loss::Outage { down_ms, period_ms } => Some(Outages::start(&net, down_ms, period_ms)),
        _ => None,
    };
    // Over IPv6 the members receive the controller's group directly.
    let relay = (family == Family::V4).then(|| Relay::start(&net.relay, seed));
    let (controller, key) = Controller::start(&net, &dir, plan);
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut slots: Vec<Slot> = (0..MEMBER_HOSTS * MEMBERS_PER_HOST)
        .map(|i| Slot {
            host: i % MEMBER_HOSTS,
            dir: dir.join(format!("member{i}")),
            running: None,
            resyncs: 0,
        })
        .collect();
    let mut runs = Vec::new();
    for slot in slots
        .iter_mut()
        .take(MEMBER_HOSTS * MEMBERS_PER_HOST * 3 / 4)
    {
        slot.start(&net, &key, plan);
    }
    converge(&controller, &mut slots);
    let first_epoch = controller.epoch().0;
    let base = controller.audit();
    let ops = |audit: &BTreeMap<String, u64>| {
        ["admitted", "left", "evicted"]
            .iter()
            .map(|k| audit.get(*k).copied().unwrap_or(0) - base.get(*k).copied().unwrap_or(0))
            .sum::<u64>()
    };
    let mut converge_ms = Vec::new();
    let mut rounds = 0;
    while ops(&controller.audit()) < target {
        rounds += 1;
        assert!(rounds <= 1_000, "no progress towards {target} operations");
        let running: Vec<usize> = (0..slots.len())
            .filter(|&i| slots[i].running.is_some())
            .collect();
        let stopped: Vec<usize> = (0..slots.len())
            .filter(|&i| slots[i].running.is_none())
            .collect();
        let pick = |rng: &mut ChaCha20Rng, from: &[usize], n: usize| -> Vec<usize> {
            let mut from = from.to_vec();
            let mut out = Vec::new();
            while out.len() < n && !from.is_empty() {
                out.push(from.swap_remove(rng.next_u32() as usize % from.len()));
            }
            out
        };
        let evict = pick(&mut rng, &running, 6);
        let leave: Vec<usize> = pick(
            &mut rng,
            &running
                .iter()
                .copied()
                .filter(|i| !evict.contains(i))
                .collect::<Vec<_>>(),
            5,
        );
        let join = pick(&mut rng, &stopped, 5);
        for &i in &evict {
            let id = current(&slots[i].api())
                .expect("a converged member answers")
                .member;
            controller.ctl(&["evict", "demo", &id.to_string()]);
        }
        for &i in &leave {
            runs.push(slots[i].stop());
        }
        for &i in &join {
            slots[i].start(&net, &key, plan);
        }
        converge_ms.push(converge(&controller, &mut slots).as_millis() as u64);
    }
    let audit = controller.audit();
    let epochs = controller.epoch().0 - first_epoch;
    for slot in &mut slots {
        if slot.running.is_some() {
            runs.push(slot.stop());
        }
    }
    let (mut arrived, mut dropped) = (0, 0);
    for host in &net.members {
        let (a, d) = Loss::counters(host);
        arrived += a;
        dropped += d;
    }
    let relay_stats = |read: fn(&RelayStats) -> &AtomicU64| {
        relay
            .as_ref()
            .map_or(0, |r| read(&r.stats).load(Ordering::Relaxed))
    };
    let row = Row {
        family,
        spacing_ms: plan.spacing_ms,
        fanout: plan.fanout,
        loss,
        repeats,
        ops: ops(&audit),
        audit: audit
            .iter()
            .map(|(k, v)| (k.clone(), v - base.get(k).copied().unwrap_or(0)))
            .collect(),
        rounds,
        epochs,
        runs: runs.len(),
        runs_resynced: runs.iter().filter(|r| **r > 0).count(),
        resyncs: runs.iter().sum(),
        arrived,
        dropped,
        relay: [
            relay_stats(|r| &r.received),
            relay_stats(|r| &r.sent),
            relay_stats(|r| &r.duplicated),
            relay_stats(|r| &r.reordered),
        ],
        converge_ms,
        agents: slots.iter().filter(|s| s.dir.exists()).count(),
        fell_back: slots
            .iter()
            .filter(|s| {
                std::fs::read_to_string(s.dir.with_extension("log"))
                    .is_ok_and(|log| log.contains("switching to unicast fan-out"))
            })
            .count(),
    };
    drop(controller);
    drop(outages);
    drop(relay);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    row
}

/// One scenario's settings.
#[derive(Clone, Copy)]
struct Plan {
    loss: Loss,
    repeats: u32,
    family: Family,
    /// Whether the controller serves unicast fan-out and members fall back to it.
    fanout: bool,
    /// Time between the copies of a rekey datagram.
    spacing_ms: u64,
    /// Joins, leaves and evictions to run.
    ops: u64,
    seed: u64,
}

/// Runs a scenario and checks what every row must show.
fn check(plan: &Plan) -> Row {
    let mut row = scenario(plan);
    row.print();
    assert!(row.ops >= plan.ops, "only {} operations ran", row.ops);
    assert!(row.epochs > 0);
    assert!(row.audit.get("evicted").copied().unwrap_or(0) > 0);
    assert!(row.audit.get("left").copied().unwrap_or(0) > 0);
    assert!(
        row.relay[1] >= row.relay[0],
        "the relay lost datagrams itself"
    );
    match plan.loss {
        Loss::Random(0) => assert_eq!(row.dropped, 0),
        _ => assert!(row.dropped > 0, "the loss rule dropped nothing"),
    }
    if plan.fanout && matches!(plan.loss, Loss::Blackhole) {
        assert_eq!(row.fell_back, row.agents, "every agent switched to fan-out");
    } else {
        assert_eq!(row.fell_back, 0, "no agent left working multicast");
    }
    row
}

/// The lock that runs scenarios one at a time. A machine that cannot run them fails the test,
/// saying what is missing (before, the scenarios passed in no time without running), unless
/// `GKM_SKIP_NETNS` is set (`None`, the reason printed).
fn prepared() -> Option<std::sync::MutexGuard<'static, ()>> {
    if let Some(why) = missing_prerequisite() {
        assert!(
            std::env::var_os("GKM_SKIP_NETNS").is_some(),
            "cannot run the network-namespace tests: {why}; run them as root with iproute2 and \
             nftables, or set GKM_SKIP_NETNS=1 to skip them"
        );
        println!("skipped (GKM_SKIP_NETNS): {why}");
        return None;
    }
    Some(
        SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

/// Runs one loss pattern with each configured repeat count.
fn loss_pattern(loss: Loss, seed: u64) {
    let Some(_serial) = prepared() else { return };
    for repeats in repeat_counts() {
        check(&Plan {
            loss,
            repeats,
            family: Family::V4,
            fanout: false,
            spacing_ms: spacing(),
            ops: ops_target(),
            seed: seed + u64::from(repeats),
        });
    }
}

#[test]
fn ipv6_multicast_across_hosts() {
    let Some(_serial) = prepared() else { return };
    check(&Plan {
        loss: Loss::Random(0),
        repeats: 1,
        family: Family::V6,
        fanout: false,
        spacing_ms: DEFAULT_SPACING_MS,
        ops: 100,
        seed: 600,
    });
}

#[test]
fn members_fall_back_to_fanout_when_multicast_is_blackholed() {
    let Some(_serial) = prepared() else { return };
    check(&Plan {
        loss: Loss::Blackhole,
        repeats: 1,
        family: Family::V4,
        fanout: true,
        spacing_ms: DEFAULT_SPACING_MS,
        ops: 100,
        seed: 700,
    });
}

#[test]
fn no_loss_with_delay_reordering_and_duplication() {
    loss_pattern(Loss::Random(0), 100);
}

#[test]
fn five_percent_random_loss() {
    loss_pattern(Loss::Random(5), 200);
}

#[test]
fn twenty_percent_random_loss() {
    loss_pattern(Loss::Random(20), 300);
}

#[test]
fn burst_loss() {
    loss_pattern(
        Loss::Burst {
            burst: 8,
            period: 40,
        },
        400,
    );
}

#[test]
fn spaced_repeats_survive_link_outages_that_take_back_to_back_copies() {
    let Some(_serial) = prepared() else { return };
    let loss = Loss::Outage {
        down_ms: 150,
        period_ms: 1_000,
    };
    let shares: Vec<f64> = [0, 200]
        .into_iter()
        .map(|spacing_ms| {
            let row = check(&Plan {
                loss,
                repeats: 2,
                family: Family::V4,
                fanout: false,
                spacing_ms,
                ops: ops_target(),
                seed: 800,
            });
            row.runs_resynced as f64 / row.runs as f64
        })
        .collect();
    assert!(
        shares[1] < shares[0] / 2.0,
        "copies 200 ms apart should outlive 150 ms outages far better than back-to-back \
         copies: resync shares {shares:?}"
    );
}

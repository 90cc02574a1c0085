//! `gkm-demo`: the README's main job. Starts a controller and 50 member agents as real processes
//! on this machine (multicast on the loopback interface), runs evictions, leaves, joins and batch
//! rekeys, prints per-epoch progress and ends with a verdict it checked: every current member
//! holds the controller's traffic key, and no departed member decrypts group messages sent after
//! it left. Exits 0 only if that holds. No root, no configuration: everything lives in a fresh
//! temporary directory, removed at the end (kept, with the logs, when the verdict fails, or
//! when `GKM_DEMO_KEEP` is set).
//!
//! It runs the binaries next to its own executable: `cargo build --release --bins` first.
//!
//! `gkm-demo --members N --evict-latency K` instead measures, K times, the time from an eviction
//! command to the last of N members holding the new key (each member's local API `watch`
//! stream reports the change) and prints the median and the 99th percentile.
//!
//! `--postgres URL` keeps the controller's state in PostgreSQL (`[storage] backend =
//! "postgres"`, a connection string such as `host=/tmp/pg user=gkm dbname=gkm`) instead of its
//! redb file; give it an empty database: the demo's group is made anew.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Parser;
use gkm_server::cli::DemoCli;
use lkh_tree::{Epoch, GroupId, TrafficKey};
use serde_json::{Value, json};

const GROUP: &str = "demo";
const ROUNDS: usize = 4;
const SETTLE: Duration = Duration::from_secs(30);

/// A member agent process.
struct Agent {
    child: Child,
    dir: PathBuf,
}

/// A departed member's last key.
struct Departed {
    epoch: Epoch,
    key: TrafficKey,
}

struct Demo {
    bins: PathBuf,
    root: PathBuf,
    controller: Child,
    controller_key: String,
    listen: String,
    multicast: String,
    agents: Vec<Agent>,
    departed: Vec<Departed>,
    tokens_used: usize,
}

fn main() {
    match run() {
        Ok(true) => std::process::exit(0),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("gkm-demo: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run() -> Result<bool> {
    let cli = DemoCli::parse();
    let members = usize::try_from(cli.members)?;
    let latency_rounds = cli.evict_latency.map(usize::try_from).transpose()?;
    let postgres = cli.postgres;
    let mut demo = Demo::start(members, postgres.as_deref())?;
    // From here on every path ends in `stop`, which ends every process the demo started.
    let admitted = (0..members)
        .try_for_each(|_| demo.spawn_member())
        .and_then(|()| demo.settle("admit"));
    let verdict = match (admitted, latency_rounds) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(rounds)) => demo.evict_latency(rounds).map(|()| true),
        (Ok(()), None) => demo.churn().and_then(|()| demo.verdict()),
    };
    demo.stop(matches!(verdict, Ok(true)));
    verdict
}

fn free_port() -> Result<u16> {
    for _ in 0..50 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port found")
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// One JSON request on a Unix socket, one JSON line back.
fn ask(socket: &Path, request: &Value) -> Result<Value> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(stream, "{request}")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("bad reply {line:?}"))
}

/// Finds the first object in `value` that has `key` and, if given, `name == want`.
fn find<'a>(value: &'a Value, key: &str, want: Option<&str>) -> Option<&'a Value> {
    match value {
        Value::Object(map) => {
            let name_ok = want.is_none_or(|w| map.get("name").and_then(Value::as_str) == Some(w));
            if let Some(v) = map.get(key).filter(|_| name_ok) {
                return Some(v);
            }
            map.values().find_map(|v| find(v, key, want))
        }
        Value::Array(items) => items.iter().find_map(|v| find(v, key, want)),
        _ => None,
    }
}

/// Follows every member's `watch` stream until each reports `target` (each bounded by
/// [`SETTLE`]), all on one thread: a current-thread runtime with one task per stream, so the
/// measuring side wakes as little as it can while the members work. Sends on `ready` once every
/// stream is subscribed, so the caller starts the clock after every watcher is in place. Returns,
/// per socket, when its line arrived.
fn watch_all(
    sockets: Vec<PathBuf>,
    target: u64,
    ready: &std::sync::mpsc::Sender<()>,
) -> Vec<Option<Instant>> {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        let _ = ready.send(());
        return vec![None; sockets.len()];
    };
    runtime.block_on(async move {
        let mut readers = Vec::with_capacity(sockets.len());
        for socket in &sockets {
            readers.push(subscribe(socket).await);
        }
        let _ = ready.send(());
        let tasks: Vec<_> = readers
            .into_iter()
            .map(|reader| {
                tokio::spawn(async move {
                    let reader = reader?;
                    tokio::time::timeout(SETTLE, until_epoch(reader, target))
                        .await
                        .ok()
                        .flatten()
                })
            })
            .collect();
        let mut seen = Vec::with_capacity(tasks.len());
        for task in tasks {
            seen.push(task.await.ok().flatten());
        }
        seen
    })
}

type WatchReader = tokio::io::BufReader<tokio::net::UnixStream>;

/// Connects to a member's API and asks to watch; returns once the first (current) line is read.
async fn subscribe(socket: &Path) -> Option<WatchReader> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    let request = format!("{}\n", json!({"op": "watch"}));
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut reader = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    let read = tokio::time::timeout(SETTLE, reader.read_line(&mut line)).await;
    matches!(read, Ok(Ok(n)) if n > 0).then_some(reader)
}

/// Reads watch lines until one reports `target` or later; when that line arrived.
async fn until_epoch(mut reader: WatchReader, target: u64) -> Option<Instant> {
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let at = Instant::now();
        let epoch = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v.get("epoch")?.as_u64());
        if epoch.is_some_and(|e| e >= target) {
            return Some(at);
        }
    }
}

fn key_from_hex(hex: &str) -> Option<TrafficKey> {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    Some(TrafficKey::from_bytes(bytes.try_into().ok()?))
}

impl Demo {
    fn start(members: usize, postgres: Option<&str>) -> Result<Demo> {
        let bins = std::env::current_exe()?
            .parent()
            .context("no directory for the executable")?
            .to_path_buf();
        for bin in ["gkm-server", "gkm-member"] {
            if !bins.join(bin).exists() {
                bail!(
                    "{} is missing: run `cargo build --release --bins` first",
                    bins.join(bin).display()
                );
            }
        }
        let root = std::env::temp_dir().join(format!(
            "gkm-demo-{}-{}",
            std::process::id(),
            now_ns() % 1_000_000
        ));
        std::fs::create_dir_all(&root)?;
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let octets = u8::try_from(now_ns() % 250).unwrap_or(0) + 1;
        let multicast = format!("239.255.{}.{}:{}", 100 + octets % 100, octets, free_port()?);
        let tokens: Vec<String> = (0..members + 200)
            .map(|i| format!("\"demo-token-{i}\""))
            .collect();
        let storage = postgres.map_or_else(String::new, |url| {
            format!("[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\n\n")
        });
        let config = format!(
            "listen = \"{listen}\"\n\n{storage}[[group]]\nname = \"{GROUP}\"\n\
             multicast = \"{multicast}\"\nheartbeat_interval_ms = 500\nbatch_interval_ms = 0\n\
             enrollment = \"restricted\"\ntokens = [{}]\n",
            tokens.join(", ")
        );
        std::fs::write(root.join("gkm-server.toml"), config)?;
        let state = root.join("controller");
        let init = Command::new(bins.join("gkm-server"))
            .args(["init", "--state-dir"])
            .arg(&state)
            .output()?;
        if !init.status.success() {
            bail!(
                "gkm-server init failed: {}",
                String::from_utf8_lossy(&init.stderr)
            );
        }
        let controller_key = String::from_utf8_lossy(&init.stdout)
            .split_whitespace()
            .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
            .context("gkm-server init printed no public key")?
            .to_owned();
        let log = std::fs::File::create(root.join("controller.log"))?;
        let controller = Command::new(bins.join("gkm-server"))
            .args(["run", "--config"])
            .arg(root.join("gkm-server.toml"))
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut demo = Demo {
            bins,
            root,
            controller,
            controller_key,
            listen,
            multicast,
            agents: Vec::new(),
            departed: Vec::new(),
            tokens_used: 0,
        };
        demo.wait_for(|d| Ok(d.control().exists()), "the control socket")?;
        println!(
            "controller {} up; group {GROUP} on {}",
            demo.listen, demo.multicast
        );
        Ok(demo)
    }

    fn control(&self) -> PathBuf {
        self.root.join("controller").join("control.sock")
    }

    fn spawn_member(&mut self) -> Result<()> {
        let i = self.tokens_used;
        self.tokens_used += 1;
        let dir = self.root.join(format!("member-{i}"));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("member.log"))?;
        let child = Command::new(self.bins.join("gkm-member"))
            .args(["run", "--controller", &self.listen, "--group", GROUP])
            .args([
                "--controller-key",
                &self.controller_key,
                "--multicast",
                &self.multicast,
            ])
            .arg("--token-file")
            .arg(token_file(&dir, i)?)
            .arg("--state-dir")
            .arg(&dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.agents.push(Agent { child, dir });
        Ok(())
    }

    fn wait_for(
        &mut self,
        mut done: impl FnMut(&mut Demo) -> Result<bool>,
        what: &str,
    ) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < SETTLE {
            if done(self)? {
                return Ok(());
            }
            if let Ok(Some(status)) = self.controller.try_wait() {
                let log =
                    std::fs::read_to_string(self.root.join("controller.log")).unwrap_or_default();
                bail!(
                    "the controller exited ({status}) while the demo waited for {what}:\n{}",
                    log.trim_end()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "timed out after {:?} waiting for {what}; logs in {}",
            SETTLE,
            self.root.display()
        )
    }

    /// The controller's epoch of the group.
    fn epoch(&self) -> Result<u64> {
        let reply = ask(&self.control(), &json!({"cmd": "groups"}))?;
        find(&reply, "epoch", Some(GROUP))
            .and_then(Value::as_u64)
            .with_context(|| format!("no epoch in {reply}"))
    }

    /// A member's current key line from its local API.
    fn current(agent: &Agent) -> Option<Value> {
        let reply = ask(&agent.dir.join("api.sock"), &json!({"op": "current"})).ok()?;
        reply.get("traffic_key").is_some().then_some(reply)
    }

    /// Waits until every agent holds the controller's epoch and one shared key; prints a line.
    fn settle(&mut self, change: &str) -> Result<()> {
        self.wait_for(
            |d| {
                let epoch = d.epoch()?;
                let keys: Vec<Option<(u64, String)>> = d
                    .agents
                    .iter()
                    .map(|a| {
                        let v = Demo::current(a)?;
                        Some((
                            v.get("epoch")?.as_u64()?,
                            v.get("traffic_key")?.as_str()?.to_owned(),
                        ))
                    })
                    .collect();
                let first = keys.first().cloned().flatten();
                Ok(keys
                    .iter()
                    .all(|k| k.as_ref().is_some_and(|(e, _)| *e == epoch))
                    && keys.iter().all(|k| *k == first))
            },
            "every member to hold the new key",
        )?;
        println!(
            "epoch {:>4}  {:<26} members {:>3}  all converged",
            self.epoch()?,
            change,
            self.agents.len()
        );
        Ok(())
    }

    /// Records a member's last key and takes it out of the live set.
    fn depart(&mut self, index: usize) -> Result<Agent> {
        let agent = self.agents.swap_remove(index);
        let current = Demo::current(&agent).context("a departing member has no key")?;
        let epoch = Epoch(current.get("epoch").and_then(Value::as_u64).unwrap_or(0));
        let key = current
            .get("traffic_key")
            .and_then(Value::as_str)
            .and_then(key_from_hex)
            .context("bad key in the member API")?;
        self.departed.push(Departed { epoch, key });
        Ok(agent)
    }

    fn evict(&mut self, index: usize) -> Result<()> {
        let (agent, member) = self.evict_prepare(index)?;
        self.evict_send(agent, member)
    }

    /// Records the victim's last key and member id (before any clock starts).
    fn evict_prepare(&mut self, index: usize) -> Result<(Agent, u64)> {
        let member = self
            .agents
            .get(index)
            .and_then(Demo::current)
            .and_then(|v| v.get("member")?.as_u64())
            .context("no member id")?;
        Ok((self.depart(index)?, member))
    }

    /// The eviction command itself; then the victim's process is stopped.
    fn evict_send(&mut self, mut agent: Agent, member: u64) -> Result<()> {
        let reply = ask(
            &self.control(),
            &json!({"cmd": "evict", "group": GROUP, "member": member}),
        )?;
        if reply.get("ok") != Some(&Value::Bool(true)) {
            bail!("evict refused: {reply}");
        }
        // The evicted agent would try to register again; its token is spent, so it is refused.
        let _ = agent.child.kill();
        let _ = agent.child.wait();
        Ok(())
    }

    fn leave(&mut self, index: usize) -> Result<()> {
        let mut agent = self.depart(index)?;
        let pid = agent.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let _ = agent.child.wait();
        Ok(())
    }

    fn set_batch(&self, ms: u64) -> Result<()> {
        let set = format!("batch_interval_ms={ms}");
        let reply = ask(
            &self.control(),
            &json!({"cmd": "policy", "group": GROUP, "set": set}),
        )?;
        if reply.get("ok") != Some(&Value::Bool(true)) {
            bail!("policy refused: {reply}");
        }
        Ok(())
    }

    fn churn(&mut self) -> Result<()> {
        for round in 0..ROUNDS {
            let n = self.agents.len();
            self.evict((round * 7) % n)?;
            self.settle("evict 1")?;
            self.leave((round * 11) % (n - 1))?;
            self.settle("leave 1")?;
            self.spawn_member()?;
            self.spawn_member()?;
            self.settle("join 2")?;
            self.set_batch(1_000)?;
            // Departures first, among members that hold a key; then as many joins. (Joiners
            // spawned between departures could be picked to depart before they were admitted:
            // `--members 8` failed so.)
            let out = 4.min(self.agents.len() - 1);
            for k in 0..out - 1 {
                let n = self.agents.len();
                self.leave((round * 5 + k * 13) % n)?;
            }
            self.evict(round % self.agents.len())?;
            for _ in 0..out {
                self.spawn_member()?;
            }
            self.set_batch(0)?;
            self.settle(&format!("batch -{out} +{out}"))?;
        }
        Ok(())
    }

    /// Evicts a member `rounds` times and measures when the last other member holds the key.
    fn evict_latency(&mut self, rounds: usize) -> Result<()> {
        let mut samples = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let target = self.epoch()? + 1;
            let victim = 1 + round % (self.agents.len() - 1);
            let sockets: Vec<PathBuf> = (0..self.agents.len())
                .filter(|i| *i != victim)
                .map(|i| self.agents[i].dir.join("api.sock"))
                .collect();
            let (ready_tx, ready) = std::sync::mpsc::channel();
            let watcher = std::thread::spawn(move || watch_all(sockets, target, &ready_tx));
            ready
                .recv_timeout(SETTLE)
                .context("the watchers did not subscribe")?;
            let (agent, member) = self.evict_prepare(victim)?;
            let started = Instant::now();
            self.evict_send(agent, member)?;
            let acked = started.elapsed();
            let seen = watcher
                .join()
                .map_err(|_| anyhow::anyhow!("the watcher thread panicked"))?;
            let mut last = Duration::ZERO;
            for (i, at) in seen.into_iter().enumerate() {
                let at = at.with_context(|| format!("member {i} never saw epoch {target}"))?;
                last = last.max(at.saturating_duration_since(started));
            }
            samples.push(last);
            println!(
                "eviction {round:>3}: controller acknowledged after {:.2} ms; last of {} members holds epoch {target} after {:.2} ms",
                acked.as_secs_f64() * 1e3,
                self.agents.len(),
                last.as_secs_f64() * 1e3
            );
        }
        samples.sort();
        // Nearest rank: the sample at index ceil(q·len) − 1.
        let pick = |percent: usize| samples[(samples.len() * percent).div_ceil(100).max(1) - 1];
        println!(
            "evict -> last of {} members holding the new key: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} evictions)",
            self.agents.len(),
            pick(50).as_secs_f64() * 1e3,
            pick(99).as_secs_f64() * 1e3,
            pick(100).as_secs_f64() * 1e3,
            samples.len()
        );
        Ok(())
    }

    fn verdict(&mut self) -> Result<bool> {
        let epoch = self.epoch()?;
        let lines: Vec<Value> = self.agents.iter().filter_map(Demo::current).collect();
        let first = lines.first().and_then(|v| v.get("traffic_key")).cloned();
        let holding = lines
            .iter()
            .filter(|v| {
                v.get("epoch").and_then(Value::as_u64) == Some(epoch)
                    && v.get("traffic_key") == first.as_ref()
            })
            .count();
        let key = first
            .as_ref()
            .and_then(Value::as_str)
            .and_then(key_from_hex)
            .context("no current key")?;
        let group = GroupId::from_name(GROUP);
        let mut tried = 0;
        let mut read = 0;
        for (seq, gone) in self.departed.iter().enumerate() {
            let frame = wire::data::seal(
                &key,
                group,
                Epoch(epoch),
                7,
                seq as u64,
                b"sent after you left",
            );
            tried += 1;
            let stale = gone.epoch < Epoch(epoch);
            if !stale || wire::data::open(&gone.key, &frame).is_ok() {
                read += 1;
            }
        }
        let holds = holding == self.agents.len() && read == 0 && tried > 0;
        println!(
            "verdict: {}: {holding}/{} current members hold the controller's traffic key of epoch {epoch}; \
             {} departed members (left or evicted) decrypted {read} of {tried} group messages sent after they left",
            if holds { "PASS" } else { "FAIL" },
            self.agents.len(),
            self.departed.len(),
        );
        Ok(holds)
    }

    fn stop(&mut self, clean: bool) {
        for agent in &mut self.agents {
            let _ = Command::new("kill")
                .args(["-TERM", &agent.child.id().to_string()])
                .status();
        }
        for agent in &mut self.agents {
            let _ = agent.child.wait();
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.controller.id().to_string()])
            .status();
        let _ = self.controller.wait();
        if clean && std::env::var_os("GKM_DEMO_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        } else {
            eprintln!("logs kept in {}", self.root.display());
        }
    }
}

/// Writes member `i`'s enrollment token to a file of its own (0600) in `dir`.
fn token_file(dir: &std::path::Path, i: usize) -> Result<std::path::PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("token");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?
        .write_all(format!("demo-token-{i}\n").as_bytes())?;
    Ok(path)
}

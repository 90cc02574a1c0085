//! `sustained [MEMBERS] [BATCHES] [CHANGES_PER_BATCH]`: sustained membership changes through the
//! real controller, persisted to the real disk store and signed, one batch per (virtual) second.
//!
//! A `Controller` (the library, seeded RNG, two workers) is restored with MEMBERS members
//! (default 2^20) from a `DiskStore` in a temporary directory, with `batch_interval_ms = 1000`.
//! Each batch gathers CHANGES_PER_BATCH changes (default 100,000): half evictions of restored
//! members, half joins from real signed registration requests (built before the timed region),
//! then the virtual clock moves one second and `handle_timeout` rekeys: tree and wraps, the
//! write-ahead save, packing and signing, welcome sealing. As in the daemon, `verify_request`
//! (signature check and the welcome's HPKE encapsulation) runs on two threads and
//! `handle_inbound` on the controller's.
//!
//! Two rates, each the median over the batches of changes / wall time:
//! (a) the rekey pipeline: tree + wraps, then persistence alongside packing + signing, until the
//!     rekey is durable and signed (no per-join registration crypto: request verification and
//!     welcome sealing are left out);
//! (b) everything: (a) plus `verify_request` on two threads, `handle_inbound`, the evictions'
//!     commands and the welcome sealing.
//!
//! With `SUSTAINED_PG_URL` set (a connection string, e.g. `host=/tmp/pg user=gkm dbname=gkm`),
//! the store is PostgreSQL (`PgStore`, its lease claimed for the run) instead of the redb file.
//!
//! `cargo run --release -p gkm-benches --bin sustained -- 1048576 10 100000`

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use gkm_benches::{config, full_tree, member_records, rng};
use gkm_server::{
    Command, CompactionFailure, ConnId, Controller, DiskStore, Event, GroupDelta, GroupPolicy,
    GroupState, Inbound, PgConfig, PgStore, Store, StoreDriver, StoreError, Timestamp, Transmit,
    verify_request,
};
use lkh_tree::GroupId;
use rand_core::Rng;
use wire::{HpkeSecret, Kem, RegistrationRequest, sign};

const START: u64 = 1_800_000_000_000;

/// The store measured: the redb file (default), or PostgreSQL when `SUSTAINED_PG_URL` names a
/// database (for example `host=/tmp/pg user=gkm dbname=gkm`).
enum Backend {
    Disk(DiskStore),
    Postgres(Box<PgStore>),
}

impl Backend {
    fn store(&mut self) -> &mut (dyn Store + Send) {
        match self {
            Backend::Disk(disk) => disk,
            Backend::Postgres(pg) => pg.as_mut(),
        }
    }

    /// Sealed bytes written (the redb store counts them).
    fn bytes_written(&self) -> u64 {
        match self {
            Backend::Disk(disk) => disk.bytes_written(),
            Backend::Postgres(_) => 0,
        }
    }
}

/// The store, shared so the benchmark can read how much it wrote, and the time its saves took
/// by the profiler's clock.
#[derive(Clone)]
struct Shared(Arc<Mutex<Backend>>, Arc<Mutex<Duration>>, fn() -> Duration);

impl Shared {
    /// `save` on the store, its time added up.
    fn timed<T>(&self, save: impl FnOnce(&mut (dyn Store + Send)) -> T) -> T {
        let started = (self.2)();
        let done = save(self.0.lock().expect("store").store());
        *self.1.lock().expect("timer") += (self.2)().saturating_sub(started);
        done
    }

    /// The time spent saving since the last call.
    fn take_time(&self) -> Duration {
        std::mem::take(&mut self.1.lock().expect("timer"))
    }
}

impl Store for Shared {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.timed(|s| s.save(state))
    }
    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        self.timed(|s| s.save_delta(delta))
    }
    fn save_delta_and_compact(
        &mut self,
        delta: &GroupDelta,
        state: GroupState,
    ) -> Result<(), StoreError> {
        self.timed(|s| s.save_delta_and_compact(delta, state))
    }
    fn take_compaction_failure(&mut self) -> Option<CompactionFailure> {
        self.0
            .lock()
            .expect("store")
            .store()
            .take_compaction_failure()
    }
    fn compacting(&mut self) -> bool {
        self.0.lock().expect("store").store().compacting()
    }
}

/// One batch's measurements.
#[derive(Clone, Copy, Default)]
struct Batch {
    changes: usize,
    requests: Duration,
    evictions: Duration,
    tree: Duration,
    /// Building the save's records (before the save and the packing).
    records: Duration,
    persist: Duration,
    pack: Duration,
    sign: Duration,
    ready: Duration,
    welcomes: Duration,
    rekey: Duration,
    written: u64,
    datagrams: usize,
    datagram_bytes: usize,
    welcomed: usize,
    /// `verify_request` of the batch's requests, on two threads.
    verify: Duration,
}

impl Batch {
    /// The rekey until durable and signed (the save overlaps packing and signing).
    fn pipeline(&self) -> Duration {
        self.ready
    }
    fn everything(&self) -> Duration {
        self.verify + self.requests + self.evictions + self.rekey
    }
}

/// `verify_request` of every request, on two threads as the daemon's workers run it.
fn verify_all(built: Vec<Vec<u8>>, seed: u64) -> Vec<Inbound> {
    let mut first = built;
    let second = first.split_off(first.len() / 2);
    let verify = |part: Vec<Vec<u8>>, seed: u64| {
        let mut r = rng(seed);
        part.into_iter()
            .map(|bytes| verify_request(bytes, &mut r))
            .collect::<Vec<_>>()
    };
    std::thread::scope(|scope| {
        let other = scope.spawn(|| verify(second, seed ^ 1));
        let mut out = verify(first, seed);
        out.extend(other.join().expect("a verifier thread"));
        out
    })
}

/// `count` signed registration requests of fresh identities, stamped `at_ms`, on two threads.
fn requests(group: GroupId, count: usize, seed: u64, at_ms: u64) -> Vec<Vec<u8>> {
    let hpke = HpkeSecret::generate(Kem::XWing, &mut rng(seed))
        .public_key()
        .expect("a valid key");
    let half = count / 2;
    let make = move |from: usize, to: usize| {
        let mut r = rng(seed ^ ((from as u64) << 1));
        (from..to)
            .map(|_| {
                let mut key = [0u8; 32];
                r.fill_bytes(&mut key);
                let identity = SigningKey::from_bytes(&key);
                let mut nonce = [0u8; 16];
                r.fill_bytes(&mut nonce);
                let request = RegistrationRequest {
                    group,
                    identity: identity.verifying_key().to_bytes(),
                    hpke_key: hpke.clone(),
                    timestamp_ms: at_ms,
                    nonce,
                    token: Vec::new(),
                };
                sign(&request, &identity)
            })
            .collect::<Vec<_>>()
    };
    let other_half = make.clone();
    let other = std::thread::spawn(move || other_half(half, count));
    let mut out = make(0, half);
    out.extend(other.join().expect("request builder"));
    out
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Monotonic wall time since the first reading.
fn wall() -> Duration {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// CPU time of this process, all threads (user + system), at the kernel's 10 ms tick.
fn cpu() -> Duration {
    Duration::from_secs_f64(gkm_benches::cpu_seconds("self"))
}

/// The machine's 1-, 5- and 15-minute load averages (other processes share the cores).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1 << 20);
    let batches: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let changes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let dir: PathBuf = std::env::temp_dir().join(format!("gkm-sustained-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("state.redb");

    let started = Instant::now();
    let fx = full_tree(n, config(4, false), 11);
    let snapshot = fx.tree.snapshot();
    let group = snapshot.group;
    let members = member_records(&fx.tree, snapshot.epoch.0, [9; 32]);
    drop(fx);
    let mut evictable: Vec<u64> = members.iter().map(|m| m.id.0).collect();
    gkm_benches::shuffle(&mut evictable, 5);
    let state = GroupState {
        tree: snapshot,
        members,
        enrollment: Default::default(),
        signing: Vec::new(),
    };
    let mut backend = match std::env::var("SUSTAINED_PG_URL") {
        Ok(url) => {
            let config = PgConfig {
                url,
                password_file: None,
            };
            let (mut pg, _) =
                PgStore::open(&config, &[7; 32], "sustained", "-").expect("PostgreSQL store");
            pg.claim(group, Duration::from_secs(3_600))
                .expect("claim")
                .expect("the group's lease is free");
            println!("store: PostgreSQL");
            Backend::Postgres(Box::new(pg))
        }
        Err(_) => {
            println!("store: redb ({})", path.display());
            Backend::Disk(DiskStore::open(&path, &[7; 32]).expect("store").0)
        }
    };
    let saved = Instant::now();
    backend.store().save(&state).expect("first save");
    let save_time = saved.elapsed();
    let state_file = std::fs::metadata(&path).map_or(0, |m| m.len());
    println!(
        "{n} members restored in {:.1} s; full save {:.0} ms, {} bytes written, state file {:.1} MB",
        started.elapsed().as_secs_f64(),
        ms(save_time),
        backend.bytes_written(),
        state_file as f64 / 1e6
    );
    let disk = backend;
    let cpu_clock = std::env::var("SUSTAINED_CLOCK").is_ok_and(|c| c == "cpu");
    let clock: fn() -> Duration = if cpu_clock { cpu } else { wall };
    let store = Shared(Arc::new(Mutex::new(disk)), Arc::default(), clock);

    let mut policy = GroupPolicy::new("bench", group);
    policy.tree = config(4, false);
    policy.batch_interval_ms = 1_000;
    policy.heartbeat_interval_ms = 1_000;
    policy.lease_ms = 1 << 40;
    policy.freshness_window_ms = 60_000;
    let mut controller = StoreDriver::new(
        Controller::new(
            SigningKey::from_bytes(&[1; 32]),
            rng(2),
            vec![policy],
            vec![state],
            Timestamp(START),
        )
        .expect("a valid state"),
        Box::new(store.clone()),
    );
    controller.set_workers(2);
    controller.set_profiler(clock);
    println!(
        "phase times by {}",
        if cpu_clock {
            "process CPU time (all threads; phases that overlap count each other's time)"
        } else {
            "wall time (set SUSTAINED_CLOCK=cpu for CPU time)"
        }
    );
    let mut now = START;
    // The restored group rekeys at once (untimed).
    controller.handle_timeout(Timestamp(now));
    while controller.poll_transmit().is_some() {}
    while controller.poll_event().is_some() {}

    let mut results = Vec::new();
    let mut conn = 0u64;
    for b in 0..batches {
        let joins = changes / 2;
        let leaves = changes - joins;
        let built = requests(group, joins, 1_000 + b as u64, now);
        let mut m = Batch {
            changes,
            ..Batch::default()
        };
        let t = clock();
        let inbound = verify_all(built, 5_000 + b as u64);
        m.verify = clock().saturating_sub(t);
        assert!(
            inbound
                .iter()
                .all(|i| matches!(i, Inbound::Registration(_)))
        );
        let t = clock();
        for _ in 0..leaves {
            let Some(member) = evictable.pop() else { break };
            controller
                .handle_command(Timestamp(now), Command::Evict("bench".into(), member))
                .expect("a member");
        }
        m.evictions = clock().saturating_sub(t);
        let t = clock();
        for request in inbound {
            conn += 1;
            controller.handle_inbound(ConnId(conn), Timestamp(now), request);
        }
        m.requests = clock().saturating_sub(t);
        let before = store.0.lock().expect("store").bytes_written();
        store.take_time();
        now += 1_000;
        let t = clock();
        controller.handle_timeout(Timestamp(now));
        m.rekey = clock().saturating_sub(t);
        m.written = store.0.lock().expect("store").bytes_written() - before;
        let profile = controller.last_rekey_profile().expect("a profile");
        (m.tree, m.pack, m.sign, m.welcomes) =
            (profile.tree, profile.pack, profile.sign, profile.welcomes);
        m.persist = store.take_time();
        m.records = profile.records;
        // Durable and signed, as before persistence became an output: the commit (departures
        // recorded, events, datagrams queued) is counted with the welcomes.
        m.ready = profile.ready;
        m.welcomes += profile.commit;
        while let Some(t) = controller.poll_transmit() {
            if let Transmit::Reply { bytes, .. } = t
                && matches!(
                    wire::MessageType::peek(&bytes),
                    Ok(wire::MessageType::Welcome)
                )
            {
                m.welcomed += 1;
            }
        }
        while let Some(event) = controller.poll_event() {
            if let Event::Rekeyed {
                datagrams, bytes, ..
            } = event
            {
                (m.datagrams, m.datagram_bytes) = (datagrams, bytes);
            }
        }
        println!(
            "batch {b}: {} changes ({} welcomed), {} datagrams ({:.1} MB, each sent twice); tree+wrap {:.0} ms, records {:.0} ms, then persist {:.0} ms ({:.1} MB) alongside pack {:.0} ms + sign {:.0} ms: ready after {:.0} ms; welcomes {:.0} ms; requests {:.0} ms, evictions {:.0} ms; (a) {:.0}/s (b) {:.0}/s",
            m.changes,
            m.welcomed,
            m.datagrams,
            m.datagram_bytes as f64 / 1e6,
            ms(m.tree),
            ms(m.records),
            ms(m.persist),
            m.written as f64 / 1e6,
            ms(m.pack),
            ms(m.sign),
            ms(m.ready),
            ms(m.welcomes),
            ms(m.requests),
            ms(m.evictions),
            m.changes as f64 / m.pipeline().as_secs_f64(),
            m.changes as f64 / m.everything().as_secs_f64(),
        );
        results.push(m);
    }
    let state_file = std::fs::metadata(&path).map_or(0, |m| m.len());
    drop(controller);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    let med = |f: fn(&Batch) -> f64| median(results.iter().map(f).collect());
    let mean =
        |f: fn(&Batch) -> f64| results.iter().map(f).sum::<f64>() / results.len().max(1) as f64;
    println!(
        "--- {n} members, {changes} changes per 1 s batch, {batches} batches, 2 workers; load average {}",
        load_average()
    );
    println!(
        "median per batch: tree+wrap {:.0} ms, persist {:.0} ms, pack {:.0} ms, sign {:.0} ms, ready (tree, then save alongside pack+sign) {:.0} ms, welcomes {:.0} ms, request handling {:.0} ms, evictions {:.0} ms",
        med(|m| ms(m.tree)),
        med(|m| ms(m.persist)),
        med(|m| ms(m.pack)),
        med(|m| ms(m.sign)),
        med(|m| ms(m.ready)),
        med(|m| ms(m.welcomes)),
        med(|m| ms(m.requests)),
        med(|m| ms(m.evictions)),
    );
    println!(
        "verify_request (signature, HPKE encapsulation) on two threads: median {:.0} ms",
        med(|m| ms(m.verify))
    );
    println!(
        "bytes written per batch: median {:.1} MB, mean {:.1} MB (compaction included); state file {:.1} MB at the end",
        med(|m| m.written as f64 / 1e6),
        mean(|m| m.written as f64 / 1e6),
        state_file as f64 / 1e6
    );
    println!(
        "(a) rekey pipeline (tree, wrap, persist, pack, sign): median {:.0} changes/s, mean-time rate {:.0}/s",
        med(|m| m.changes as f64 / m.pipeline().as_secs_f64()),
        changes as f64 / (mean(|m| m.pipeline().as_secs_f64())),
    );
    println!(
        "(b) everything (+ verify_request, handle_inbound, evictions, welcome sealing): median {:.0} changes/s, mean-time rate {:.0}/s",
        med(|m| m.changes as f64 / m.everything().as_secs_f64()),
        changes as f64 / (mean(|m| m.everything().as_secs_f64())),
    );
}

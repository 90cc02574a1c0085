//! A restored backup of the state file (GKM-V041, GKM-V042): the daemon refuses a state older
//! than its epoch floor and says what to do; told to serve it anyway, it resets the group first,
//! under an epoch above every one sent before. Across the whole run no wrap key and nonce repeat
//! on the wire, and a member evicted after the backup opens nothing with the keys it kept.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::attack::{Keys, Loot};
use ed25519_dalek::VerifyingKey;
use gkm_member::Member;
use lkh_tree::GroupId;
use rand_chacha::ChaCha20Rng;
use support::{Running, Server, new_member, register};
use wire::{AuthenticRekey, MemberId, RekeyDatagram};

/// Every multicast datagram of the group, captured on a thread until dropped.
struct Capture {
    datagrams: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    fn start(socket: UdpSocket) -> Capture {
        let datagrams = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, done) = (datagrams.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            // Bounded: the test stops it, and reads time out at 200 ms; ten minutes at most.
            let deadline = Instant::now() + Duration::from_secs(600);
            while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Ok(n) = socket.recv(&mut buf) {
                    out.lock().unwrap().push(buf[..n].to_vec());
                }
            }
        });
        Capture {
            datagrams,
            stop,
            thread: Some(thread),
        }
    }

    /// The authentic rekey datagrams captured so far.
    fn rekeys(&self, controller: &VerifyingKey) -> Vec<RekeyDatagram> {
        self.datagrams
            .lock()
            .unwrap()
            .iter()
            .filter_map(|b| AuthenticRekey::verify(b, controller).ok())
            .map(|r| r.datagram().clone())
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits (at most 10 s) until the group's epoch is at least `epoch`; returns it.
fn wait_epoch(setup: &Server, epoch: u64) -> u64 {
    let start = Instant::now();
    loop {
        let now = setup.epoch();
        if now >= epoch {
            return now;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "stuck at epoch {now}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A member registered over TCP, and its id.
fn join(setup: &Server, key: VerifyingKey, seed: u64) -> (Member<ChaCha20Rng>, MemberId) {
    let mut member = new_member(seed, key);
    let id = register(setup.port, &mut member).expect("a welcome");
    (member, id)
}

fn evict(setup: &Server, member: MemberId) {
    let out = setup.ctl(&["evict", "demo", &member.0.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGTERM, and wait for the daemon to exit.
fn stop(daemon: Running) {
    daemon.signal("TERM");
    let out = daemon.wait(Duration::from_secs(20));
    assert!(out.status.success(), "the daemon did not stop cleanly");
}

/// Every path key `member` holds.
fn keys_of(member: &Member<ChaCha20Rng>) -> Keys {
    let (_, path) = member.membership().expect("a member");
    path.keys()
        .iter()
        .map(|k| ((k.node.0, k.version.0), *k.key.as_bytes()))
        .collect()
}

#[test]
fn v041_v042_a_restored_backup_is_refused_or_reset_and_reuses_no_nonce() {
    let setup = Server::new("rollback", "repeats = 1\nheartbeat_interval_ms = 500");
    let capture = Capture::start(setup.multicast_receiver());
    let database = setup.state.join("state.redb");
    let backup = setup.dir.join("state.redb.backup");

    // First timeline: three members; a backup is taken with the daemon stopped.
    let daemon = setup.start();
    let key = setup.public_key();
    let (_a, _) = join(&setup, key, 1);
    let (_c, c) = join(&setup, key, 3);
    let (thief, b) = join(&setup, key, 2);
    let at_backup = wait_epoch(&setup, 3);
    stop(daemon);
    std::fs::copy(&database, &backup).unwrap();

    // Then b is evicted (keeping its keys), others come and go.
    let daemon = setup.start();
    let stolen = keys_of(&thief);
    evict(&setup, b);
    let evicted_at = wait_epoch(&setup, at_backup + 1);
    let (d, _) = join(&setup, key, 4);
    evict(&setup, c);
    let reached = wait_epoch(&setup, evicted_at + 2);
    stop(daemon);

    // The backup is restored over the newer state file: refused, saying what to do.
    std::fs::copy(&backup, &database).unwrap();
    let log = setup.dir.join("refused.log");
    let refused = setup
        .try_start(&log)
        .err()
        .expect("the daemon served a state older than its epoch floor");
    assert!(refused.1.contains("older copy"), "{}", refused.1);
    assert!(refused.1.contains("--allow-rollback"), "{}", refused.1);
    assert!(
        refused.1.contains(&format!("reached epoch {reached}")),
        "{}",
        refused.1
    );

    // Served with --allow-rollback: reset first, above every epoch sent.
    let mut cmd = setup.command();
    cmd.arg("--allow-rollback");
    let _daemon = setup
        .try_spawn(cmd, &setup.dir.join("server.log"))
        .unwrap_or_else(|(status, log)| panic!("--allow-rollback: {status}: {log}"));
    let reset_at = wait_epoch(&setup, reached + 1);
    let members = setup.ctl_json(&["members", "demo"]);
    assert_eq!(members.as_array().map(Vec::len), Some(0), "{members}");
    let (_e, _) = join(&setup, key, 5);
    let (_f, f) = join(&setup, key, 6);
    evict(&setup, f);
    let last = wait_epoch(&setup, reset_at + 3);

    // Give the capture the last datagrams.
    std::thread::sleep(Duration::from_millis(400));
    let rekeys = capture.rekeys(&key);
    let epochs: BTreeSet<u64> = rekeys.iter().map(|d| d.epoch.0).collect();
    assert!(
        epochs.contains(&last) && epochs.contains(&evicted_at),
        "{epochs:?}"
    );

    // No epoch goes out twice, nor under two salts; no two rekeys share a salt. A wrap's key is
    // derived from the wrapping key and the salt, its nonce from the epoch and target: with
    // these, no (key, nonce) pair repeats.
    let mut salts: BTreeMap<u64, [u8; 16]> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for d in &rekeys {
        let first = *salts.entry(d.epoch.0).or_insert(d.salt.0);
        assert_eq!(
            first, d.salt.0,
            "epoch {} went out under two salts",
            d.epoch.0
        );
        for w in d.wraps() {
            let instance = (d.salt.0, d.epoch.0, w.target.0, w.wrapping.0, w.under_new);
            seen.insert((instance, w.ciphertext));
        }
    }
    let distinct: BTreeSet<[u8; 16]> = salts.values().copied().collect();
    assert_eq!(distinct.len(), salts.len(), "two rekeys share a salt");
    let instances: BTreeSet<_> = seen.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        instances.len(),
        seen.len(),
        "one wrap instance with two ciphertexts"
    );
    assert!(reset_at > reached, "the reset reused an epoch number");

    // The evicted member's kept keys open nothing from its eviction on, restore included.
    let mut loot = Loot::new(GroupId::from_name("demo"), &stolen);
    loot.attack(&rekeys);
    let late: Vec<_> = loot
        .opened
        .iter()
        .filter(|(_, e)| *e >= evicted_at)
        .collect();
    assert!(late.is_empty(), "the evicted member opened {late:?}");
    // The same attack with the keys of d, a member when c was evicted, opens that rekey: the
    // captures and the attack are complete.
    let mut control = Loot::new(GroupId::from_name("demo"), &keys_of(&d));
    control.attack(&rekeys);
    assert!(
        control.opened.iter().any(|(_, e)| *e == reached),
        "d opened nothing of epoch {reached}: {:?}",
        control.opened
    );
}

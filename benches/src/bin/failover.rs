//! `failover [MEMBERS] [ROUNDS]`: from a leader's death to its successor's first rekey in a
//! member's hands, with the real controllers and the PostgreSQL store (issue 14 §7), sans-I/O.
//!
//! Needs a database: `FAILOVER_PG_URL` (a connection string, e.g. `host=/tmp/pg user=gkm
//! dbname=gkm`; the tables are the daemon's, made by `PgStore::open`). A group of MEMBERS members
//! (default 2^17) is saved by leader A, which then makes a few rekeys (evictions) so that the
//! log holds deltas, and is dropped without releasing its lease ("killed"). Per round, the new
//! leader B, a warm standby as the daemon's standbys are (its `Follower` followed the committed
//! log through A's rekeys), is timed through:
//! 1. claim: the lease taken (the wait for the dead leader's lease to run out is the lease
//!    setting, one lease at most, added to the total as configured, not slept);
//! 2. catch-up: `Follower::take`, the rows committed since its last look read and applied (what
//!    a cold standby would load instead is timed apart, off the total: "cold load");
//! 3. restore: `Controller::new` from it (the key tree rebuilt);
//! 4. rekey: its first rekey, staged, saved under its term, signed: the datagrams on the wire;
//! 5. member: one member applying it (verify, unwrap); members apply in parallel.
//!
//! B then plays A for the next round. Prints each round and p50/p99 of the total.
//!
//! `FAILOVER_PG_URL=… cargo run --release -p gkm-benches --bin failover -- 131072 7`

use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use gkm_benches::{config, full_tree, member_records, rng};
use gkm_member::{Member, MemberConfig};
use gkm_server::{
    Command, Controller, GroupPolicy, GroupState, PgConfig, PgStore, Store, StoreDriver, Timestamp,
    Transmit,
};
use lkh_tree::GroupId;
use wire::{HpkeSecret, Kem, MemberId};

const START: u64 = 1_800_000_000_000;
/// The lease the daemon's HA tests and defaults use (`lease_ms`): the longest a dead leader's
/// lease can still run.
const LEASE: Duration = Duration::from_secs(3);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn policy(group: GroupId) -> GroupPolicy {
    let mut policy = GroupPolicy::new("bench", group);
    policy.tree = config(4, false);
    policy.lease_ms = 1 << 40;
    policy
}

/// A store holding the group's lease, as a leader's does.
fn leader(url: &str, group: GroupId, name: &str) -> PgStore {
    let config = PgConfig {
        url: url.to_owned(),
        password_file: None,
    };
    let (mut store, _) = PgStore::open(&config, &[7; 32], name, "-").expect("PostgreSQL store");
    // Long enough for the first full save at 2^20 (a few seconds); claimed again at LEASE.
    store
        .claim(group, Duration::from_secs(600))
        .expect("claim")
        .expect("lease free");
    store
}

fn main() {
    let Ok(url) = std::env::var("FAILOVER_PG_URL") else {
        eprintln!("failover needs FAILOVER_PG_URL (a PostgreSQL connection string)");
        std::process::exit(2);
    };
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1 << 17);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);

    let fx = full_tree(n, config(4, false), 11);
    let snapshot = fx.tree.snapshot();
    let group = snapshot.group;
    let members = member_records(&fx.tree, snapshot.epoch.0, [9; 32]);
    // The member that measures: it holds its path from before each failover.
    let watched = members[members.len() / 2].clone();
    drop(fx);
    let state = GroupState {
        tree: snapshot,
        members,
        enrollment: Default::default(),
        signing: Vec::new(),
    };
    let signer = SigningKey::from_bytes(&[1; 32]);
    // A: the first leader. It saves the group and makes a few evictions (deltas in the log).
    let mut a = leader(&url, group, "leader-0");
    a.save(&state).expect("first save");
    let controller = Controller::new(
        signer.clone(),
        rng(2),
        vec![policy(group)],
        vec![state],
        Timestamp(START),
    )
    .expect("a valid state");
    // From here on A holds a lease of LEASE, as a daemon does (renewed by its store thread).
    a.claim(group, LEASE).expect("claim").expect("still ours");
    // The leader's lease keeper: a connection of its own sharing the store's leases, as the
    // daemon's lease thread.
    let mut keeper = a.connect_another().expect("a second connection");
    let mut driver = StoreDriver::new(controller, Box::new(a));
    let mut now = START;
    driver.handle_timeout(Timestamp(now));
    println!(
        "{n} members, lease {} ms (the dead leader's lease runs out within it: added, not slept)",
        LEASE.as_millis()
    );
    // Times what a cold standby would load at takeover, off the total.
    let mut observer = PgStore::open(
        &PgConfig {
            url: url.clone(),
            password_file: None,
        },
        &[7; 32],
        "observer",
        "-",
    )
    .expect("PostgreSQL store")
    .0;
    let mut totals = Vec::new();
    for round in 0..rounds {
        // B stands by: its store open and its follower holding a copy, as a daemon's standby
        // does from its start. (A's lease thread renews meanwhile.)
        keeper
            .renew(group)
            .expect("renew")
            .expect("the lease is still ours");
        let mut b = PgStore::open(
            &PgConfig {
                url: url.clone(),
                password_file: None,
            },
            &[7; 32],
            &format!("leader-{}", round + 1),
            "-",
        )
        .expect("PostgreSQL store")
        .0;
        let mut follower = b.follower().expect("a follower");
        follower.follow(group).expect("follow").expect("saved");
        keeper
            .renew(group)
            .expect("renew")
            .expect("the lease is still ours");
        for k in 0..3usize {
            let state = driver.group_state(group).expect("served");
            let victim = state.members[(k * 7_919 + round) % state.members.len()].id;
            if victim == watched.id {
                continue;
            }
            now += 10;
            driver
                .handle_command(Timestamp(now), Command::Evict("bench".into(), victim.0))
                .expect("a member");
            driver.handle_timeout(Timestamp(now));
            // The follower looks three times a lease; here after each rekey but the last.
            if k < 2 {
                follower.follow(group).expect("follow");
            }
        }
        while driver.poll_transmit().is_some() {}
        let tree = driver.tree(group).expect("served");
        let path = tree.member_path(watched.leaf).expect("the watched member");
        let mut member = Member::resume(
            MemberConfig::new(group, signer.verifying_key()),
            SigningKey::from_bytes(&[3; 32]),
            HpkeSecret::generate(Kem::XWing, &mut rng(4)),
            rng(5),
            MemberId(watched.id.0),
            path,
            now,
        );
        let held = member.traffic_key().expect("a member").0;
        // A dies: dropped with its lease held (it ran out before B claims, in this model).
        drop(driver);
        std::thread::sleep(LEASE);
        let t0 = Instant::now();
        let claimed_at = Instant::now();
        b.claim(group, LEASE)
            .expect("claim")
            .expect("the dead lease ran out");
        let claim = claimed_at.elapsed();
        let caught_up_at = Instant::now();
        let state = follower.take(group).expect("catch up").expect("a state");
        let catch_up = caught_up_at.elapsed();
        let restored_at = Instant::now();
        let controller = Controller::new(
            signer.clone(),
            rng(20 + round as u64),
            vec![policy(group)],
            vec![state],
            Timestamp(now),
        )
        .expect("a valid state");
        let restore = restored_at.elapsed();
        // The daemon's store thread renews the lease while the controller thread restores.
        b.renew(group)
            .expect("renew")
            .expect("the lease is still ours");
        keeper = b.connect_another().expect("a second connection");
        let rekeyed_at = Instant::now();
        driver = StoreDriver::new(controller, Box::new(b));
        driver.handle_timeout(Timestamp(now));
        let mut datagrams = Vec::new();
        while let Some(t) = driver.poll_transmit() {
            if let Transmit::Multicast { bytes, .. } = t {
                datagrams.push(bytes);
            }
        }
        let rekey = rekeyed_at.elapsed();
        let applied_at = Instant::now();
        for bytes in &datagrams {
            member.handle_datagram(now, bytes);
        }
        let apply = applied_at.elapsed();
        let total = LEASE + t0.elapsed() + apply;
        let got = member.traffic_key().expect("still a member").0;
        assert!(got > held, "the member holds the new leader's epoch");
        let cold_at = Instant::now();
        observer.load_group(group).expect("load").expect("a state");
        let cold = cold_at.elapsed();
        println!(
            "round {round}: claim {:.1} ms, catch-up {:.1} ms (cold load {:.0} ms), restore {:.0} \
             ms, first rekey {:.1} ms ({} datagrams), member {:.2} ms; with the lease: {:.0} ms \
             (epoch {} → {})",
            ms(claim),
            ms(catch_up),
            ms(cold),
            ms(restore),
            ms(rekey),
            datagrams.len(),
            ms(apply),
            ms(total),
            held.0,
            got.0
        );
        totals.push(total);
    }
    totals.sort();
    // Nearest rank: the p-th of `totals`, sorted.
    let at = |percent: usize| totals[(totals.len() - 1) * percent / 100];
    println!(
        "--- {n} members, {rounds} failovers: leader dead → new leader's first rekey in a \
         member's hands: p50 {:.0} ms, p99 {:.0} ms (of which the lease {} ms)",
        ms(at(50)),
        ms(at(99)),
        LEASE.as_millis()
    );
}

//! Faults of the real controller on loopback.
//!
//! GKM-V033: a state file with a flipped bit or cut short is refused with a clear error that
//! names the file and says what to do, or (where redb does not notice, e.g. a flip in free space)
//! served exactly as it was: same epoch, members and key versions, and members holding the old
//! keys follow its first rekey. Never a panic, never a different state. `GKM_FAULT_FLIPS=N` sets
//! the number of flips spread over the file (default 160, plus 40 in its first 512 bytes).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use std::net::{SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use gkm_member::Member;
use lkh_tree::MemberPath;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use serde_json::Value;
use support::{Server, member_config, member_keys, multicast_receiver, new_member, now_ms};
use wire::MemberId;

const DEFAULT_FLIPS: usize = 160;
const HEADER_FLIPS: usize = 40;

/// What a controller serves, as gkmctl shows it (lease times left out: they tick).
#[derive(Debug, PartialEq, Eq)]
struct Served {
    epoch: u64,
    members: Vec<Value>,
    keys: Vec<Value>,
}

fn served(server: &Server) -> Served {
    let pick = |list: Value, fields: &[&str]| -> Vec<Value> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|v| Value::Array(fields.iter().map(|f| v[*f].clone()).collect()))
            .collect()
    };
    Served {
        epoch: server.epoch(),
        members: pick(
            server.ctl_json(&["members", "demo"]),
            &["id", "identity", "leaf", "joined"],
        ),
        keys: pick(
            server.ctl_json(&["keys", "demo"])["keys"].clone(),
            &["node", "version", "holders"],
        ),
    }
}

/// Feeds group datagrams to `members` until each is at `epoch` or later (at most `limit`).
fn follow(members: &mut [Member<ChaCha20Rng>], socket: &UdpSocket, epoch: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < deadline {
        let at = |m: &Member<ChaCha20Rng>| m.traffic_key().map_or(0, |(e, _)| e.0);
        if members.iter().all(|m| at(m) >= epoch) {
            return;
        }
        if let Ok(n) = socket.recv(&mut buf) {
            for m in members.iter_mut() {
                m.handle_datagram(now_ms(), &buf[..n]);
            }
        }
    }
}

/// Members of the stored state: their seeds, ids and paths (the keys they held at the stop).
type Held = Vec<(u64, MemberId, MemberPath)>;

fn resume(server: &Server, held: &Held) -> Vec<Member<ChaCha20Rng>> {
    let key = server.public_key();
    held.iter()
        .map(|(seed, id, path)| {
            let (identity, hpke, rng) = member_keys(*seed);
            Member::resume(
                member_config(key),
                identity,
                hpke,
                rng,
                *id,
                path.clone(),
                now_ms(),
            )
        })
        .collect()
}

/// A state with four joins, two operator rekeys and an eviction, stopped by SIGTERM; returns
/// the members still in it with the keys they hold.
fn make_state(server: &Server) -> Held {
    let daemon = server.start();
    let group = SocketAddrV4::new(server.maddr, server.mport);
    let socket = multicast_receiver(group, Duration::from_millis(100));
    let key = server.public_key();
    let mut members = Vec::new();
    let mut ids = Vec::new();
    for seed in 1..=4 {
        let mut m = new_member(seed, key);
        ids.push(support::register(server.port, &mut m).expect("welcome"));
        members.push(m);
    }
    for _ in 0..2 {
        assert!(server.ctl(&["rekey", "demo"]).status.success());
    }
    assert!(
        server
            .ctl(&["evict", "demo", &ids[3].0.to_string()])
            .status
            .success()
    );
    members.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server
        .ctl_json(&["members", "demo"])
        .as_array()
        .unwrap()
        .len()
        != 3
    {
        assert!(Instant::now() < deadline, "eviction not applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    let epoch = server.epoch();
    follow(&mut members, &socket, epoch, Duration::from_secs(10));
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(10)).status.success());
    members
        .iter()
        .zip(1..)
        .map(|(m, seed)| {
            let (id, path) = m.membership().unwrap();
            assert_eq!(path.epoch().0, epoch, "member {seed} did not follow");
            (seed, id, path.clone())
        })
        .collect()
}

enum Outcome {
    Refused,
    Served(Served),
}

/// Starts the daemon on `bytes` as its state file: a refusal must be clear; a state served must
/// be one the held members can follow (their keys are the stored ones).
fn start_on(server: &Server, bytes: &[u8], held: &Held, label: &str) -> Outcome {
    let file = server.state.join("state.redb");
    std::fs::write(&file, bytes).unwrap();
    // Each case is a state file as its controller last left it: the epoch floor raised by an
    // earlier case's restart would refuse it as an older copy (GKM-V042, tested apart).
    for floor in ["epoch-floor.0", "epoch-floor.1"] {
        let _ = std::fs::remove_file(server.state.join(floor));
    }
    let log = server.dir.join("case.log");
    let _ = std::fs::remove_file(&log);
    let group = SocketAddrV4::new(server.maddr, server.mport);
    let socket = multicast_receiver(group, Duration::from_millis(50));
    match server.try_start(&log) {
        Err((status, log)) => {
            assert!(!log.contains("panicked"), "{label}: panic: {log}");
            assert!(!status.ends_with("status: 0"), "{label}: exit 0: {log}");
            assert!(
                log.contains(&file.display().to_string())
                    && (log.contains("restore it from a backup") || log.contains("move it away")),
                "{label}: the error does not name the state file and what to do ({status}): {log}"
            );
            Outcome::Refused
        }
        Ok(daemon) => {
            // The first rekey after a restart is made under the stored keys: the held members
            // follow it only if those are the keys the daemon serves.
            let mut members = resume(server, held);
            let stored = held[0].2.epoch().0;
            follow(&mut members, &socket, stored + 1, Duration::from_secs(5));
            let got = served(server);
            for m in &members {
                assert_eq!(
                    m.traffic_key().map(|(e, _)| e.0),
                    Some(got.epoch),
                    "{label}: a member holding the stored keys cannot follow the served state"
                );
            }
            drop(daemon);
            let log = std::fs::read_to_string(server.dir.join("case.log")).unwrap_or_default();
            assert!(!log.contains("panicked"), "{label}: panic: {log}");
            Outcome::Served(got)
        }
    }
}

#[test]
fn v033_a_flipped_or_cut_state_file_is_refused_clearly_or_served_unchanged() {
    let server = Server::new("state-faults", "heartbeat_interval_ms = 200\n");
    let held = make_state(&server);
    let pristine = std::fs::read(server.state.join("state.redb")).unwrap();
    let Outcome::Served(expected) = start_on(&server, &pristine, &held, "pristine") else {
        panic!("the untouched state was refused");
    };
    let flips = std::env::var("GKM_FAULT_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_FLIPS);
    let len = pristine.len();
    let mut rng = ChaCha20Rng::seed_from_u64(33);
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // Flips spread over the whole file (one in each of `flips` equal strata), and a denser set
    // in the header, where redb keeps its commit slots.
    let stratum = len.div_ceil(flips.max(1));
    let mut positions: Vec<usize> = (0..flips)
        .map(|k| k * stratum + usize::try_from(rng.next_u64() % stratum as u64).unwrap())
        .filter(|&p| p < len)
        .collect();
    positions.extend(
        (0..HEADER_FLIPS).map(|_| usize::try_from(rng.next_u64() % 512.min(len) as u64).unwrap()),
    );
    for pos in positions {
        let bit = rng.next_u32() % 8;
        let mut bytes = pristine.clone();
        bytes[pos] ^= 1 << bit;
        cases.push((format!("flip of bit {bit} at byte {pos}"), bytes));
    }
    for cut in [
        0,
        1,
        64,
        512,
        4096,
        len / 2,
        len.saturating_sub(4096),
        len - 1,
    ] {
        cases.push((
            format!("cut to {cut} of {len} bytes"),
            pristine[..cut.min(len)].to_vec(),
        ));
    }

    let started = Instant::now();
    let (mut refused, mut tolerated) = (Vec::new(), Vec::new());
    for (label, bytes) in &cases {
        match start_on(&server, bytes, &held, label) {
            Outcome::Refused => refused.push(label.clone()),
            Outcome::Served(got) => {
                assert_eq!(got, expected, "{label}: served a different state");
                tolerated.push(label.clone());
            }
        }
    }
    let cuts_refused = refused.iter().filter(|l| l.starts_with("cut")).count();
    eprintln!(
        "state faults: file {len} bytes; {} cases in {:.1} s: {} refused ({cuts_refused} of them \
         cuts), {} served unchanged",
        cases.len(),
        started.elapsed().as_secs_f64(),
        refused.len(),
        tolerated.len()
    );
    let header = |list: &[String]| {
        list.iter()
            .filter(|l| {
                l.split(' ')
                    .next_back()
                    .and_then(|p| p.parse::<usize>().ok())
                    < Some(512)
            })
            .count()
    };
    eprintln!(
        "  in the first 512 bytes: {} refused, {} served unchanged",
        header(&refused),
        header(&tolerated)
    );
    assert!(
        refused.iter().any(|l| l.starts_with("flip")),
        "no flip was noticed at all"
    );
}

//! `registrations [N] [CONNECTIONS]`: registrations per second over loopback TCP against a real
//! `gkm-server` (run it from `target/release`, next to this binary), next to what the
//! registration's own crypto alone allows, measured in the same run: verifying the request's
//! Ed25519 signature, sealing the path keys with HPKE and signing the welcome.
//!
//! Fairness: the crypto is measured on 2 threads just before and just after the daemon run and
//! the ratio taken to their mean, so load from other processes weighs on both alike. The client
//! runs on the same cores as the daemon, as the crypto baseline does not, so the CPU time of the
//! daemon and of this client (connect, write, read, close) is printed too, and the CPU per
//! registration next to the crypto's. The client keeps CONNECTIONS registrations in flight:
//! with 20 ms batches each connection completes at most one per batch, so few connections
//! measure the batch interval, not the daemon (16 connections cap it at 800/s); the default of
//! 200 stays under the daemon's 256 concurrent connections.
//!
//! `cargo build --release --bins && target/release/registrations 6000 200`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use gkm_benches::rng;
use lkh_tree::{Batch, GroupId, KeyTree, MemberPath, TreeConfig};
use rand_core::Rng;
use wire::{
    HpkeSecret, MemberId, RegistrationRequest, SealedFor, SealedKind, open_with, seal_path, sign,
    verifying_key,
};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

fn request(seed: u64, group: GroupId) -> (Vec<u8>, HpkeSecret) {
    let mut r = rng(seed);
    let mut key = [0u8; 32];
    r.fill_bytes(&mut key);
    let identity = SigningKey::from_bytes(&key);
    let hpke = HpkeSecret::generate(&mut r);
    let mut nonce = [0u8; 16];
    r.fill_bytes(&mut nonce);
    let request = RegistrationRequest {
        group,
        identity: identity.verifying_key().to_bytes(),
        hpke_key: hpke.public_key().expect("a valid key"),
        timestamp_ms: now_ms(),
        nonce,
        token: Vec::new(),
    };
    (sign(&request, &identity), hpke)
}

/// CPU seconds (user + system, all threads) a process has used so far, from `/proc/PID/stat`.
fn cpu_seconds(pid: &str) -> f64 {
    // Linux reports these in USER_HZ, 100 per second on every architecture it runs on.
    const TICKS: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after its closing parenthesis;
    // utime and stime are fields 14 and 15, so the 12th and 13th from there.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / TICKS
}

fn exchange(addr: &str, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    stream.write_all(&len.to_be_bytes())?;
    stream.write_all(bytes)?;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head)?;
    let mut reply = vec![0u8; u32::from_be_bytes(head).min(1 << 16) as usize];
    stream.read_exact(&mut reply)?;
    Ok(reply)
}

/// Crypto alone: verify the request, seal a path, sign the welcome; registrations per second
/// on `threads` threads, and the CPU seconds that took.
/// A member's path in a tree of `members`, to seal.
fn sample_path(members: usize) -> Arc<MemberPath> {
    let mut r = rng(7);
    let mut tree =
        KeyTree::new(GroupId::from_name("demo"), TreeConfig::default(), &mut r).expect("tree");
    let batch = Batch {
        leaves: vec![],
        joins: members,
    };
    let joined = tree.rekey(&batch, &mut r).expect("joins");
    Arc::new(joined.joiners[members / 2].path.clone())
}

/// HPKE seals of a path per second on one thread, alone: one per request's key.
fn seal_rate(requests: &[Vec<u8>]) -> f64 {
    let path = sample_path(requests.len());
    let keys: Vec<[u8; 32]> = requests
        .iter()
        .map(|bytes| {
            open_with::<RegistrationRequest>(bytes, |q| verifying_key(&q.identity))
                .expect("valid")
                .into_message()
                .hpke_key
        })
        .collect();
    let mut r = rng(9);
    let started = Instant::now();
    for recipient in keys {
        let to = SealedFor {
            kind: SealedKind::Welcome,
            member: MemberId(1),
            request_nonce: [0; 16],
            recipient,
        };
        std::hint::black_box(seal_path(&path, &to, &mut r).expect("seals"));
    }
    requests.len() as f64 / started.elapsed().as_secs_f64()
}

fn crypto_rate(requests: &[Vec<u8>], threads: usize) -> (f64, f64) {
    let path = sample_path(requests.len());
    let signer = Arc::new(SigningKey::from_bytes(&[3; 32]));
    let cpu = cpu_seconds("self");
    let started = Instant::now();
    let chunks: Vec<Vec<Vec<u8>>> = requests
        .chunks(requests.len().div_ceil(threads))
        .map(<[_]>::to_vec)
        .collect();
    let handles: Vec<_> = chunks
        .into_iter()
        .enumerate()
        .map(|(t, chunk)| {
            let (path, signer) = (path.clone(), signer.clone());
            std::thread::spawn(move || {
                let mut r = rng(100 + t as u64);
                for bytes in chunk {
                    let request =
                        open_with::<RegistrationRequest>(&bytes, |q| verifying_key(&q.identity))
                            .expect("valid")
                            .into_message();
                    let to = SealedFor {
                        kind: SealedKind::Welcome,
                        member: MemberId(1),
                        request_nonce: request.nonce,
                        recipient: request.hpke_key,
                    };
                    let sealed = seal_path(&path, &to, &mut r).expect("seals");
                    std::hint::black_box(sign(&sealed, &signer));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    let rate = requests.len() as f64 / started.elapsed().as_secs_f64();
    (rate, cpu_seconds("self") - cpu)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(6000);
    let conns: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let bin = std::env::current_exe()
        .expect("exe")
        .with_file_name("gkm-server");
    assert!(
        bin.exists(),
        "build gkm-server first: cargo build --release --bins"
    );
    let dir: PathBuf =
        std::env::temp_dir().join(format!("gkm-registrations-{}", std::process::id()));
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("gkm-server.toml"),
        format!("listen = \"{addr}\"\n[[group]]\nname = \"demo\"\nmulticast = \"239.255.99.9:{}\"\nbatch_interval_ms = 20\nheartbeat_interval_ms = 1000\nlease_ms = 600000\n", port + 1),
    )
    .expect("config");
    let state = dir.join("state");
    Command::new(&bin)
        .args(["init", "--state-dir"])
        .arg(&state)
        .stdout(Stdio::null())
        .status()
        .expect("init");
    let mut server = Command::new(&bin)
        .args(["run", "--config"])
        .arg(dir.join("gkm-server.toml"))
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("server");
    let up = Instant::now();
    while TcpStream::connect(&addr).is_err() && up.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let group = GroupId::from_name("demo");
    let requests: Arc<Vec<Vec<u8>>> =
        Arc::new((0..n as u64).map(|i| request(i, group).0).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let welcomed = Arc::new(AtomicUsize::new(0));
    let (before, crypto_cpu) = crypto_rate(&requests, 2);
    let server_pid = server.id().to_string();
    let (server_cpu0, client_cpu0) = (cpu_seconds(&server_pid), cpu_seconds("self"));
    let started = Instant::now();
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let (requests, next, welcomed, addr) = (
                requests.clone(),
                next.clone(),
                welcomed.clone(),
                addr.clone(),
            );
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(bytes) = requests.get(i) else { break };
                    let welcome = exchange(&addr, bytes).is_ok_and(|reply| {
                        matches!(
                            wire::MessageType::peek(&reply),
                            Ok(wire::MessageType::Welcome)
                        )
                    });
                    if welcome {
                        welcomed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client");
    }
    let elapsed = started.elapsed();
    let server_cpu = cpu_seconds(&server_pid) - server_cpu0;
    let client_cpu = cpu_seconds("self") - client_cpu0;
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let ok = welcomed.load(Ordering::Relaxed);
    let rate = ok as f64 / elapsed.as_secs_f64();
    let (after, _) = crypto_rate(&requests, 2);
    let (one, _) = crypto_rate(&requests, 1);
    let seals = seal_rate(&requests);
    let two = f64::midpoint(before, after);
    println!(
        "registrations over loopback TCP: {ok}/{n} welcomed in {:.2} s = {rate:.0} per second ({conns} client connections at a time, 20 ms batches)",
        elapsed.as_secs_f64()
    );
    println!(
        "registration crypto alone (verify request + HPKE seal + sign welcome): {before:.0}/s before and {after:.0}/s after on 2 threads, {one:.0}/s on 1 thread"
    );
    println!("HPKE seal of a path alone: {seals:.0}/s on 1 thread");
    println!(
        "ratio to 2-thread crypto (mean of before and after): {:.2}",
        rate / two
    );
    let per = |seconds: f64, count: usize| 1e6 * seconds / count.max(1) as f64;
    println!(
        "CPU: daemon {server_cpu:.2} s, client {client_cpu:.2} s ({:.2} of 2 cores busy); per registration: daemon {:.0} us + client {:.0} us against {:.0} us of crypto alone (CPU ratio {:.2})",
        (server_cpu + client_cpu) / elapsed.as_secs_f64(),
        per(server_cpu, ok),
        per(client_cpu, ok),
        per(crypto_cpu, n),
        crypto_cpu / n.max(1) as f64 / ((server_cpu + client_cpu) / ok.max(1) as f64)
    );
}

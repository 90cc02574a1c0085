//! `registrations [N] [CONNECTIONS] [BATCH_MS]`: registrations per second over loopback TCP
//! against a real `gkm-server` (run it from `target/release`, next to this binary), each next to
//! what the registration's own crypto alone allows on 2 threads, measured in the same run. For
//! each KEM of the members' HPKE keys (X-Wing, then X25519; the group takes both), two runs of N
//! registrations each, on one daemon; then X-Wing's rates as a share of X25519's, and the bytes
//! of a request and a welcome under each:
//!
//! 1. **Bare client** against **the controller's half** of the crypto (verify the request's
//!    Ed25519 signature, seal the path keys with HPKE, sign the welcome). The requests are signed
//!    before the run and a reply counts when it is a welcome, so the client does no crypto; its
//!    TCP work still runs on the same 2 cores.
//! 2. **Member client** against **the whole registration**: each registration is a real
//!    `gkm_member::Member` (keys made beforehand, as `gkm-member init` does) that signs its
//!    request when it sends it, and verifies and opens its welcome; it counts once the member has
//!    joined. Its baseline is the same member code with the controller's half in between, no
//!    sockets: every signature made and verified, the HPKE seal and its open.
//!
//! Fairness: each baseline is measured on 2 threads just before and just after its run, and the
//! ratio taken to their mean, so load from other processes weighs on both alike. The CPU time of
//! the daemon and of the client is printed too, per registration, next to the crypto's, and the
//! TCP segments both ends sent per registration (`OutSegs` of the host, so the machine should be
//! otherwise quiet). The client is event-driven (tokio, 2 workers), as member agents are, and
//! keeps CONNECTIONS registrations in flight, each on its own connection; the group rekeys every
//! BATCH_MS (0 is immediate rekeying: each batch holds what arrived while the previous one was
//! made). A registration storm is what batching is for: the defaults are 1,000 connections and
//! 50 ms.
//!
//! `cargo build --release --bins && target/release/registrations 6000 1000 50`

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::{SigningKey, VerifyingKey};
use gkm_benches::flood::now_ms;
use gkm_benches::{cpu_seconds, rng, tcp_segments_sent};
use gkm_member::{Member, MemberConfig, MemberEvent};
use lkh_tree::{Batch, GroupId, KeyTree, MemberPath, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wire::{
    HpkePublicKey, HpkeSecret, Kem, MemberId, RegistrationRequest, SealedFor, SealedKind,
    SealedPath, Verified, open_path, open_with, seal_path, sign, verifying_key,
};

/// A group's rekey address, as the daemon's welcomes name one (the same length on the wire).
const REKEY_ADDRESS: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(239, 255, 99, 9), 9));

/// A member's keys, made before it registers (`gkm-member init`).
struct Keys {
    identity: SigningKey,
    hpke: HpkeSecret,
    seed: u64,
}

fn keys(kem: Kem, seed: u64) -> Keys {
    let mut r = rng(seed);
    let mut key = [0u8; 32];
    r.fill_bytes(&mut key);
    Keys {
        identity: SigningKey::from_bytes(&key),
        hpke: HpkeSecret::generate(kem, &mut r),
        seed,
    }
}

/// A member of group "demo" that has just made (and signed) its registration request.
fn member(keys: &Keys, controller: VerifyingKey) -> (Member<ChaCha20Rng>, Vec<u8>) {
    let config = MemberConfig::new(GroupId::from_name("demo"), controller);
    let mut member = Member::new(
        config,
        keys.identity.clone(),
        keys.hpke.clone(),
        rng(keys.seed),
        now_ms(),
    );
    let request = member.poll_request().expect("a registration request");
    (member, request)
}

/// Hands `reply` to `member`; whether it verified, opened and joined.
fn joined(member: &mut Member<ChaCha20Rng>, reply: &[u8]) -> bool {
    member.handle_reply(now_ms(), reply);
    std::iter::from_fn(|| member.poll_event()).any(|e| matches!(e, MemberEvent::Joined { .. }))
}

/// One request on its own connection, as a member sends it: one frame out, one frame back (at
/// most 10 s).
async fn exchange(addr: &str, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend_from_slice(bytes);
        stream.write_all(&frame).await?;
        // The daemon closes the connection after its reply.
        let mut reply = Vec::with_capacity(2_048);
        stream.read_to_end(&mut reply).await?;
        let len = reply
            .first_chunk::<4>()
            .map(|head| u32::from_be_bytes(*head) as usize);
        if len != Some(reply.len().saturating_sub(4)) {
            return Err(std::io::Error::other("not one reply frame"));
        }
        reply.drain(..4);
        Ok(reply)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// A member's path in a tree of `members`, to seal.
fn sample_path(members: usize) -> MemberPath {
    let mut r = rng(7);
    let mut tree =
        KeyTree::new(GroupId::from_name("demo"), TreeConfig::default(), &mut r).expect("tree");
    let batch = Batch {
        leaves: vec![],
        joins: members,
    };
    let joined = tree.rekey(&batch, &mut r).expect("joins");
    joined.joiners[members / 2].path.clone()
}

/// The controller's half of a registration's crypto: verify the request, seal `path` to its
/// HPKE key, sign the welcome.
fn controller_half(
    request: &[u8],
    path: &MemberPath,
    signer: &SigningKey,
    r: &mut ChaCha20Rng,
) -> Vec<u8> {
    let request = open_with::<RegistrationRequest>(request, |q| verifying_key(&q.identity))
        .expect("valid")
        .into_message();
    let to = SealedFor {
        kind: SealedKind::Welcome,
        member: MemberId(1),
        request_nonce: request.nonce,
        rekey_address: Some(REKEY_ADDRESS),
    };
    sign(
        &seal_path(path, &to, &request.hpke_key, r).expect("seals"),
        signer,
    )
}

/// Runs `work` once per item of `items` on `threads` threads; items per second and the CPU
/// seconds that took.
fn on_threads<T: Sync>(
    items: &[T],
    threads: usize,
    work: impl Fn(&T, &mut ChaCha20Rng) + Sync,
) -> (f64, f64) {
    let cpu = cpu_seconds("self");
    let started = Instant::now();
    std::thread::scope(|scope| {
        for (t, chunk) in items
            .chunks(items.len().div_ceil(threads).max(1))
            .enumerate()
        {
            let work = &work;
            scope.spawn(move || {
                let mut r = rng(100 + t as u64);
                for item in chunk {
                    work(item, &mut r);
                }
            });
        }
    });
    let rate = items.len() as f64 / started.elapsed().as_secs_f64();
    (rate, cpu_seconds("self") - cpu)
}

/// HPKE seals and opens of a path per second on one thread, alone: one seal per request's key,
/// and the open of each by its member.
fn seal_and_open_rates(members: &[Keys], path: &MemberPath) -> (f64, f64) {
    let to = SealedFor {
        kind: SealedKind::Welcome,
        member: MemberId(1),
        request_nonce: [0; 16],
        rekey_address: Some(REKEY_ADDRESS),
    };
    let recipients: Vec<HpkePublicKey> = members
        .iter()
        .map(|k| k.hpke.public_key().expect("a valid key"))
        .collect();
    let (seals, _) = on_threads(&recipients, 1, |recipient, r| {
        std::hint::black_box(seal_path(path, &to, recipient, r).expect("seals"));
    });
    let mut r = rng(5);
    let signer = SigningKey::from_bytes(&[3; 32]);
    let sealed: Vec<(Verified<SealedPath>, &HpkeSecret)> = members
        .iter()
        .zip(&recipients)
        .map(|(k, recipient)| {
            let sealed = seal_path(path, &to, recipient, &mut r).expect("seals");
            let signed = sign(&sealed, &signer);
            let verified = wire::open(&signed, &signer.verifying_key()).expect("verifies");
            (verified, &k.hpke)
        })
        .collect();
    let (opens, _) = on_threads(&sealed, 1, |(sealed, secret), _| {
        std::hint::black_box(open_path(sealed, secret).expect("opens"));
    });
    (seals, opens)
}

/// A daemon run: registrations completed, wall time, the CPU seconds of the daemon and of this
/// client, and the TCP segments sent meanwhile (both ends, loopback).
struct Run {
    ok: usize,
    elapsed: Duration,
    server_cpu: f64,
    client_cpu: f64,
    segments: u64,
}

/// Keeps `conns` registrations in flight, as tasks on a 2-worker tokio runtime, until `register`
/// has run for each of `0..n`; `register(i)` is true when registration `i` succeeded.
fn run_clients<R, F>(server: &str, n: usize, conns: usize, register: R) -> Run
where
    R: Fn(usize) -> F + Send + Sync + 'static,
    F: Future<Output = bool> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()
        .expect("a runtime");
    let register = Arc::new(register);
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let (server_cpu0, client_cpu0) = (cpu_seconds(server), cpu_seconds("self"));
    let segments0 = tcp_segments_sent();
    let started = Instant::now();
    runtime.block_on(async {
        let clients: Vec<_> = (0..conns)
            .map(|_| {
                let (register, next, ok) = (register.clone(), next.clone(), ok.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        if register(i).await {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for client in clients {
            client.await.expect("a client task");
        }
    });
    Run {
        ok: ok.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        server_cpu: cpu_seconds(server) - server_cpu0,
        client_cpu: cpu_seconds("self") - client_cpu0,
        segments: tcp_segments_sent().saturating_sub(segments0),
    }
}

/// Prints a run next to its baseline (before and after, items per second, and its CPU seconds).
fn report(
    what: &str,
    baseline: &str,
    run: &Run,
    n: usize,
    (before, after, crypto_cpu): (f64, f64, f64),
) {
    let rate = run.ok as f64 / run.elapsed.as_secs_f64();
    let per = |seconds: f64, count: usize| 1e6 * seconds / count.max(1) as f64;
    println!(
        "{what}: {}/{n} in {:.2} s = {rate:.0} per second",
        run.ok,
        run.elapsed.as_secs_f64()
    );
    println!("  {baseline} alone: {before:.0}/s before and {after:.0}/s after on 2 threads");
    println!(
        "  ratio to it (mean of before and after): {:.2}",
        rate / f64::midpoint(before, after)
    );
    println!(
        "  CPU: daemon {:.2} s, client {:.2} s ({:.2} of 2 cores busy); per registration: daemon {:.0} us + client {:.0} us against {:.0} us of crypto alone",
        run.server_cpu,
        run.client_cpu,
        (run.server_cpu + run.client_cpu) / run.elapsed.as_secs_f64(),
        per(run.server_cpu, run.ok),
        per(run.client_cpu, run.ok),
        per(crypto_cpu, n),
    );
    println!(
        "  TCP segments sent, both ends: {:.1} per registration",
        run.segments as f64 / run.ok.max(1) as f64
    );
}

/// Starts `gkm-server` in `dir` on `addr` (group "demo", batches every `batch_ms`); its process
/// and public key.
fn start_server(
    bin: &Path,
    dir: &Path,
    (addr, port): (&str, u16),
    batch_ms: u64,
) -> (Child, VerifyingKey) {
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(
        dir.join("gkm-server.toml"),
        format!("listen = \"{addr}\"\n[[group]]\nname = \"demo\"\nmulticast = \"239.255.99.9:{}\"\nbatch_interval_ms = {batch_ms}\nkem = [\"x-wing\", \"x25519\"]\nheartbeat_interval_ms = 1000\nlease_ms = 600000\n", port + 1),
    )
    .expect("config");
    let state = dir.join("state");
    let init = Command::new(bin)
        .args(["init", "--state-dir"])
        .arg(&state)
        .output()
        .expect("init");
    let key: [u8; 32] = hex::decode(String::from_utf8_lossy(&init.stdout).trim())
        .ok()
        .and_then(|k| k.try_into().ok())
        .expect("init prints the controller's key");
    let server = Command::new(bin)
        .args(["run", "--config"])
        .arg(dir.join("gkm-server.toml"))
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("server");
    let up = Instant::now();
    while TcpStream::connect(addr).is_err() && up.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, VerifyingKey::from_bytes(&key).expect("a key"))
}

/// The server and the path and key its welcomes are measured against.
struct Setup {
    pid: String,
    addr: Arc<str>,
    controller: VerifyingKey,
    path: MemberPath,
    n: usize,
    conns: usize,
}

/// What one KEM's runs measured.
struct KemRuns {
    bare: f64,
    member: f64,
    request_bytes: usize,
    welcome_bytes: usize,
}

/// Both runs for members with `kem` keys; prints them and returns their rates and sizes.
fn runs_for(kem: Kem, s: &Setup, seed: u64) -> KemRuns {
    let (n, conns, path) = (s.n, s.conns, &s.path);
    let signer = SigningKey::from_bytes(&[3; 32]);
    // 1. Bare client, controller's half.
    let group = GroupId::from_name("demo");
    let requests: Vec<Vec<u8>> = (0..n as u64)
        .map(|i| {
            let k = keys(kem, seed | i);
            let mut nonce = [0u8; 16];
            rng(seed | i).fill_bytes(&mut nonce);
            let request = RegistrationRequest {
                group,
                identity: k.identity.verifying_key().to_bytes(),
                hpke_key: k.hpke.public_key().expect("a valid key"),
                timestamp_ms: now_ms(),
                nonce,
                token: Vec::new(),
            };
            sign(&request, &k.identity)
        })
        .collect();
    let half = |request: &Vec<u8>, r: &mut ChaCha20Rng| {
        std::hint::black_box(controller_half(request, path, &signer, r));
    };
    let (before, cpu) = on_threads(&requests, 2, half);
    let requests = Arc::new(requests);
    let bare = {
        let (requests, addr) = (requests.clone(), s.addr.clone());
        run_clients(&s.pid, n, conns, move |i| {
            let (requests, addr) = (requests.clone(), addr.clone());
            async move {
                exchange(&addr, &requests[i]).await.is_ok_and(|reply| {
                    matches!(
                        wire::MessageType::peek(&reply),
                        Ok(wire::MessageType::Welcome)
                    )
                })
            }
        })
    };
    let (after, _) = on_threads(&requests, 2, half);

    // 2. Member client, the whole registration.
    let members: Vec<Keys> = (0..n as u64)
        .map(|i| keys(kem, seed | 1 << 32 | i))
        .collect();
    let own_key = signer.verifying_key();
    let whole = |k: &Keys, r: &mut ChaCha20Rng| {
        let (mut m, request) = member(k, own_key);
        let welcome = controller_half(&request, path, &signer, r);
        assert!(joined(&mut m, &welcome), "the member joins");
    };
    let (whole_before, whole_cpu) = on_threads(&members, 2, whole);
    let members = Arc::new(members);
    let controller = s.controller;
    let full = {
        let (members, addr) = (members.clone(), s.addr.clone());
        run_clients(&s.pid, n, conns, move |i| {
            let (members, addr) = (members.clone(), addr.clone());
            async move {
                let (mut m, request) = member(&members[i], controller);
                let reply = exchange(&addr, &request).await;
                reply.is_ok_and(|reply| joined(&mut m, &reply))
            }
        })
    };
    let (whole_after, _) = on_threads(&members, 2, whole);

    let (one, _) = on_threads(&requests, 1, half);
    let (seals, opens) = seal_and_open_rates(&members, path);
    let request_bytes = requests.first().map_or(0, Vec::len);
    let welcome_bytes = controller_half(&requests[0], path, &signer, &mut rng(9)).len();
    println!("== {kem} member keys");
    println!(
        "{conns} client connections at a time; controller's half of the crypto on 1 thread: {one:.0}/s; HPKE on 1 thread: seal of a path {seals:.0}/s, open {opens:.0}/s; signed request {request_bytes} B, signed welcome {welcome_bytes} B"
    );
    report(
        "1. bare client (requests signed beforehand, a welcome counts)",
        "the controller's half (verify request + HPKE seal + sign welcome)",
        &bare,
        n,
        (before, after, cpu),
    );
    report(
        "2. member client (signs its request, verifies and opens its welcome)",
        "the whole registration's crypto (sign + verify request, HPKE seal, sign + verify welcome, HPKE open)",
        &full,
        n,
        (whole_before, whole_after, whole_cpu),
    );
    let rate = |run: &Run| run.ok as f64 / run.elapsed.as_secs_f64();
    KemRuns {
        bare: rate(&bare),
        member: rate(&full),
        request_bytes,
        welcome_bytes,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(6000)
        .max(1);
    let conns: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let batch_ms: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
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
    let (mut server, controller) = start_server(&bin, &dir, (&addr, port), batch_ms);
    println!("{conns} client connections at a time, batches every {batch_ms} ms");
    let setup = Setup {
        pid: server.id().to_string(),
        addr: addr.into(),
        controller,
        path: sample_path(n),
        n,
        conns,
    };
    let x_wing = runs_for(Kem::XWing, &setup, 0);
    let x25519 = runs_for(Kem::X25519, &setup, 1 << 40);
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "== x-wing against x25519: bare client {:.0}%, member client {:.0}% of the rate; request {} B against {} B, welcome {} B against {} B",
        100.0 * x_wing.bare / x25519.bare,
        100.0 * x_wing.member / x25519.member,
        x_wing.request_bytes,
        x25519.request_bytes,
        x_wing.welcome_bytes,
        x25519.welcome_bytes,
    );
}

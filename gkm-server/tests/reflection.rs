//! Reflection through fan-out subscriptions, measured (GKM-V050): in a network namespace of its
//! own, a registered member's fresh, signed subscriptions are sent from a raw socket with a
//! spoofed source (the victim's address), once in each form an attacker has (the version 2
//! `Subscribe`, and a resync request as version 1 subscribed with), and from 50 ports of its own
//! (echoing any cookie that comes back); the controller rekeys every second and heartbeats every
//! 200 ms for 20 s. The test counts the bytes that reach the victim per byte of spoofed request,
//! and the attacker's ports that get the group's datagrams, and prints both: at most 1 byte per
//! byte, at most one address per member.
//!
//! Needs root and `ip` (iproute2); elsewhere it fails saying so, unless `GKM_SKIP_NETNS=1`.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use support::{Running, member_keys, now_ms, temp_dir};

const CONTROLLER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const VICTIM: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 66), 9_999);
const ATTACKER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 7);
const PORT: u16 = 47_700;

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("gkmr{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        for addr in [CONTROLLER, *VICTIM.ip(), ATTACKER] {
            ns.exec(&["ip", "addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        }
        ns
    }

    fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.0];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Moves the calling thread into this namespace.
    fn enter(&self) {
        let fd = File::open(format!("/var/run/netns/{}", self.0)).unwrap();
        rustix::thread::move_into_link_name_space(
            fd.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {args:?}");
}

/// Why this machine cannot run the test, if it cannot.
fn missing() -> Option<&'static str> {
    if !rustix::process::geteuid().is_root() {
        return Some("root (network namespaces and raw sockets)");
    }
    let ip = Command::new("ip").arg("-V").output();
    (!ip.is_ok_and(|o| o.status.success())).then_some("iproute2 (`apt-get install iproute2`)")
}

/// An IPv4 UDP packet from `from` to `to` carrying `payload` (checksums left to the kernel and
/// zero: optional for UDP over IPv4).
fn spoofed(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + 8 + payload.len()).unwrap();
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&from.ip().octets());
    p.extend_from_slice(&to.ip().octets());
    p.extend_from_slice(&from.port().to_be_bytes());
    p.extend_from_slice(&to.port().to_be_bytes());
    p.extend_from_slice(&(total - 20).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

#[test]
fn v050_spoofed_subscriptions_reflect_less_than_they_cost() {
    if let Some(what) = missing() {
        if std::env::var_os("GKM_SKIP_NETNS").is_some() {
            println!("skipped (GKM_SKIP_NETNS): needs {what}");
            return;
        }
        panic!("this test needs {what}; set GKM_SKIP_NETNS=1 to skip it");
    }
    let ns = Netns::new();
    let dir = temp_dir("reflection");
    let config = dir.join("gkm-server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{CONTROLLER}:{PORT}\"\n[[group]]\nname = \"demo\"\n\
             multicast = \"239.255.79.1:47701\"\ninterface = \"{CONTROLLER}\"\n\
             heartbeat_interval_ms = 200\nrepeats = 2\nfanout = true\n"
        ),
    )
    .unwrap();
    let state = dir.join("state");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0, support::SERVER, "run", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(&state);
    let _daemon = Running::spawn_logged(&mut cmd, &dir, "server");
    ns.enter();
    let controller = SocketAddrV4::new(CONTROLLER, PORT);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(controller).is_err() {
        assert!(Instant::now() < deadline, "the controller did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A registered member: the attacker (or anyone, under open enrollment).
    let key = std::fs::read(state.join("controller.key")).unwrap();
    let signer = ed25519_dalek::SigningKey::from_bytes(&key.try_into().unwrap());
    let (identity, hpke, rng) = member_keys(40);
    let config =
        gkm_member::MemberConfig::new(lkh_tree::GroupId::from_name("demo"), signer.verifying_key());
    let hpke_key = hpke.public_key().unwrap();
    let mut member = gkm_member::Member::new(config, identity.clone(), hpke, rng, now_ms());
    let request = member.poll_request().unwrap();
    let reply = framed_request(controller, &request);
    member.handle_reply(now_ms(), &reply);
    let (id, path) = member.membership().expect("admitted");
    let (id, epoch) = (id, path.epoch());

    let victim = UdpSocket::bind(VICTIM).unwrap();
    victim.set_nonblocking(true).unwrap();
    let group = lkh_tree::GroupId::from_name("demo");
    let subscribe = |nonce: [u8; 16], cookie| {
        let request = wire::Subscribe {
            group,
            member: id,
            timestamp_ms: now_ms(),
            nonce,
            cookie,
        };
        wire::sign(&request, &identity)
    };
    let resync = |nonce: [u8; 16]| {
        let request = wire::ResyncRequest {
            group,
            member: id,
            epoch,
            kcv: lkh_tree::Kcv([0; lkh_tree::KCV_LEN]),
            timestamp_ms: now_ms(),
            nonce,
            hpke_key: hpke_key.clone(),
        };
        wire::sign(&request, &identity)
    };
    // One spoofed request of each form, from the victim's address.
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP)).unwrap();
    raw.set_header_included_v4(true).unwrap();
    let mut spoofed_bytes = 0;
    for payload in [subscribe([1; 16], None), resync([2; 16])] {
        let packet = spoofed(VICTIM, controller, &payload);
        raw.send_to(&packet, &SocketAddr::V4(controller).into())
            .unwrap();
        spoofed_bytes += packet.len();
    }
    // From 50 ports of the attacker's own, each form; a cookie that comes back is echoed.
    let own: Vec<UdpSocket> = (0..50)
        .map(|_| UdpSocket::bind((ATTACKER, 0)).unwrap())
        .collect();
    for (i, socket) in own.iter().enumerate() {
        socket.set_nonblocking(true).unwrap();
        let tag = u8::try_from(i).unwrap();
        socket
            .send_to(
                &subscribe([3, tag, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], None),
                controller,
            )
            .unwrap();
        socket
            .send_to(
                &resync([4, tag, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                controller,
            )
            .unwrap();
    }
    // Twenty seconds of rekeys (one a second) and heartbeats (every 200 ms), counted per address.
    let mut victim_bytes = 0;
    let mut fed = vec![0usize; own.len()];
    let mut buf = [0u8; 65_536];
    let start = Instant::now();
    let mut next_rekey = start;
    while start.elapsed() < Duration::from_secs(20) {
        while let Ok(n) = victim.recv(&mut buf) {
            victim_bytes += n + 28;
        }
        for (i, socket) in own.iter().enumerate() {
            while let Ok(n) = socket.recv(&mut buf) {
                let got = &buf[..n];
                if wire::MessageType::peek(got) == Ok(wire::MessageType::CookieReply) {
                    let reply = <wire::CookieReply as wire::Codec>::decode_exact(got).unwrap();
                    let tag = u8::try_from(i).unwrap();
                    let echo = subscribe(
                        [5, tag, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                        Some(reply.cookie),
                    );
                    socket.send_to(&echo, controller).unwrap();
                } else {
                    fed[i] += 1;
                }
            }
        }
        if Instant::now() >= next_rekey {
            next_rekey += Duration::from_secs(1);
            let out = Command::new(support::GKMCTL)
                .arg("--socket")
                .arg(state.join("control.sock"))
                .args(["rekey", "demo"])
                .output()
                .unwrap();
            assert!(out.status.success());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ratio = victim_bytes as f64 / spoofed_bytes as f64;
    let fed_ports = fed.iter().filter(|&&n| n > 0).count();
    println!(
        "reflection: {spoofed_bytes} B of spoofed requests (IP and UDP headers included); the \
         victim received {victim_bytes} B in 20 s: {ratio:.3} B per B; of the attacker's 50 \
         ports, {fed_ports} received the group's datagrams"
    );
    assert!(ratio <= 1.0, "amplification {ratio:.2}");
    assert!(fed_ports <= 1, "{fed_ports} addresses fed for one member");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One framed request over TCP and its framed reply.
fn framed_request(to: SocketAddrV4, bytes: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut frame = u32::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(bytes);
    s.write_all(&frame).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    reply.split_off(4)
}

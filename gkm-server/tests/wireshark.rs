//! The Wireshark dissector (`contrib/wireshark/gkm.lua`) against what the current code sends.
//!
//! A controller and 40 members run in memory (joins, evictions, heartbeats); every multicast
//! datagram, request and reply they exchanged, and a group data frame and an error message, are
//! written to a pcap file as IPv4 packets (datagrams as UDP to the default ports, requests and
//! replies as TCP frames of a 4-byte length and the message). `tshark -X lua_script:gkm.lua -T
//! json` decodes it, and every message's decoded fields (type, group, epoch, wrap count, the
//! target node of every item, whether a signature is there) are checked against the message as
//! the Rust codec reads it. A wire change that the dissector does not follow fails here.
//!
//! Needs `tshark` (Debian: `apt-get install tshark`; `.ci/run` installs it). Without it the test
//! fails saying so, unless `GKM_SKIP_TSHARK=1`, which CI does not set.

#![allow(
    clippy::cast_possible_truncation,
    reason = "packet lengths and counts of a small test capture"
)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{GROUP, Run, policy};
use serde_json::Value;
use wire::{Codec, ErrorMessage, MessageType, RekeyDatagram, Status};

const CONTROLLER: [u8; 4] = [10, 0, 0, 1];
const MULTICAST: [u8; 4] = [239, 255, 77, 1];

/// One message and the packet that carries it.
struct Sent {
    bytes: Vec<u8>,
    tcp: bool,
}

#[test]
fn the_dissector_decodes_every_message_as_the_code_wrote_it() {
    if !tshark_ready() {
        return;
    }
    let mut run = Run::new(policy(true), 40);
    for victim in [3, 17, 30] {
        run.evict(victim);
    }
    let interval = policy(true).heartbeat_interval_ms;
    run.advance(interval + 100, 100);
    let mut sent: Vec<Sent> = Vec::new();
    sent.extend(run.multicast.iter().map(|b| Sent {
        bytes: b.clone(),
        tcp: false,
    }));
    sent.extend(run.requests.iter().map(|(_, b)| Sent {
        bytes: b.clone(),
        tcp: true,
    }));
    sent.extend(run.replies.iter().map(|(_, b)| Sent {
        bytes: b.clone(),
        tcp: true,
    }));
    let (epoch, key) = run.agents[0].member.traffic_key().expect("a member");
    let frame = wire::data::seal(&key, GROUP, epoch, 9, 1, b"hello, group");
    sent.push(Sent {
        bytes: frame.to_bytes(),
        tcp: false,
    });
    sent.extend(x25519_registration());
    sent.push(Sent {
        bytes: ErrorMessage {
            group: GROUP,
            status: Status::RateLimited,
            reason: "slow down".into(),
        }
        .to_bytes(),
        tcp: true,
    });
    let kinds: std::collections::BTreeSet<u8> = sent.iter().map(|s| s.bytes[3]).collect();
    assert!(
        kinds.len() >= 6,
        "the run should exercise most message types: {kinds:?}"
    );

    let pcap = std::env::temp_dir().join(format!("gkm-wireshark-{}.pcap", std::process::id()));
    std::fs::write(&pcap, pcap_of(&sent)).expect("write the capture");
    let decoded = tshark(&pcap);
    assert_eq!(
        decoded.len(),
        sent.len(),
        "one gkm message per packet decoded"
    );
    for (i, (s, d)) in sent.iter().zip(&decoded).enumerate() {
        check(i, &s.bytes, d);
    }
    // What a hostile sender would send: each message cut 5 bytes short (as a datagram). The
    // dissector flags it malformed and never fails on a range (a Lua error fails `tshark`).
    let cut: Vec<Sent> = sent
        .iter()
        .filter(|s| !matches!(s.bytes[3], 10 | 11))
        .map(|s| Sent {
            bytes: s.bytes[..s.bytes.len() - 5].to_vec(),
            tcp: false,
        })
        .collect();
    std::fs::write(&pcap, pcap_of(&cut)).expect("write the capture");
    let cut_decoded = tshark(&pcap);
    assert_eq!(cut_decoded.len(), cut.len());
    for (i, d) in cut_decoded.iter().enumerate() {
        assert!(
            d.contains_key("gkm.malformed"),
            "cut message {i} not flagged: {d:?}"
        );
    }
    let _ = std::fs::remove_file(&pcap);
    println!(
        "{} messages decoded by the dissector as written",
        sent.len()
    );
}

/// The sample capture from a real run (`contrib/wireshark/samples/demo-8-members.pcap`: `tshark
/// -i lo` around `GKM_DEMO_KEEP=1 gkm-demo --members 8`, cut to the demo's ports and to packets
/// with a payload) against what
/// its controller logged (`….audit.jsonl`, the `rekeyed` audit lines of that run): every epoch's
/// datagrams, their bytes and wraps, as the dissector reads them; every message decoded, none
/// malformed.
#[test]
fn the_sample_capture_decodes_as_its_controller_logged() {
    if !tshark_ready() {
        return;
    }
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/wireshark/samples");
    let pcap = samples.join("demo-8-members.pcap");
    let fields = [
        "frame.number",
        "gkm.type",
        "gkm.epoch",
        "gkm.index",
        "gkm.wrap_count",
        "udp.length",
        "gkm.malformed",
    ];
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/wireshark/gkm.lua");
    let mut command = Command::new("tshark");
    command
        .arg("-X")
        .arg(format!("lua_script:{}", script.display()))
        .args(["-n", "-r"])
        .arg(&pcap)
        .args(["-T", "fields", "-E", "separator=;", "-E", "aggregator=,"]);
    for f in fields {
        command.args(["-e", f]);
    }
    let out = command.output().expect("tshark runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    // epoch → (index → (bytes, wraps))
    let mut seen: std::collections::BTreeMap<u64, std::collections::BTreeMap<u64, (u64, u64)>> =
        Default::default();
    let mut packets = 0;
    for line in text.lines() {
        packets += 1;
        let cols: Vec<&str> = line.split(';').collect();
        assert!(
            !cols[1].is_empty(),
            "packet {} is not decoded as gkm",
            cols[0]
        );
        assert!(cols[6].is_empty(), "packet {} is malformed", cols[0]);
        if cols[1] == "3" {
            let n = |c: &str| c.parse::<u64>().expect("a number");
            seen.entry(n(cols[2]))
                .or_default()
                .insert(n(cols[3]), (n(cols[5]) - 8, n(cols[4])));
        }
    }
    assert!(packets > 100, "only {packets} packets in the sample");
    let audit = std::fs::read_to_string(samples.join("demo-8-members.audit.jsonl"))
        .expect("the sample's audit log");
    let mut epochs = 0;
    for line in audit.lines() {
        let event: Value = serde_json::from_str(line).expect("an audit line");
        let epoch = event["epoch"].as_u64().expect("epoch");
        let datagrams = seen
            .get(&epoch)
            .unwrap_or_else(|| panic!("epoch {epoch} is not in the capture"));
        assert_eq!(
            Some(datagrams.len() as u64),
            event["datagrams"].as_u64(),
            "epoch {epoch}"
        );
        let bytes: u64 = datagrams.values().map(|(b, _)| b).sum();
        assert_eq!(Some(bytes), event["bytes"].as_u64(), "epoch {epoch}: bytes");
        if datagrams.len() == 1 {
            let wraps: u64 = datagrams.values().map(|(_, w)| w).sum();
            assert_eq!(
                Some(wraps),
                event["encryptions"].as_u64(),
                "epoch {epoch}: wraps"
            );
        }
        epochs += 1;
    }
    assert!(epochs > 30, "only {epochs} epochs logged");
}

/// Whether tshark is here; without it the test fails saying what to install, unless
/// `GKM_SKIP_TSHARK` is set (then it is skipped, and says so).
fn tshark_ready() -> bool {
    let found = Command::new("tshark")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("GKM_SKIP_TSHARK").is_some(),
            "cannot run the dissector test: `tshark` not found (apt-get install tshark), or set \
             GKM_SKIP_TSHARK=1 to skip it"
        );
        println!("skipped (GKM_SKIP_TSHARK): tshark not found");
    }
    found
}

/// The fields of each packet's gkm layer, by field name, every value of each.
type Fields = std::collections::BTreeMap<String, Vec<String>>;

fn tshark(pcap: &Path) -> Vec<Fields> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/wireshark/gkm.lua");
    let out = Command::new("tshark")
        .arg("-X")
        .arg(format!("lua_script:{}", script.display()))
        .args(["-n", "--no-duplicate-keys", "-T", "json", "-r"])
        .arg(pcap)
        .output()
        .expect("tshark runs");
    assert!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.to_lowercase().contains("lua"),
        "the dissector reported an error: {stderr}"
    );
    let packets: Value = serde_json::from_slice(&out.stdout).expect("tshark's JSON");
    packets
        .as_array()
        .expect("an array of packets")
        .iter()
        .map(|p| {
            let mut fields = Fields::new();
            collect(&p["_source"]["layers"]["gkm"], &mut fields);
            fields
        })
        .collect()
}

/// Every `gkm.*` field under `value`, however deep (items sit in subtrees).
fn collect(value: &Value, out: &mut Fields) {
    let Some(object) = value.as_object() else {
        return;
    };
    for (key, v) in object {
        if key.starts_with("gkm.") && !key.ends_with("_tree") {
            let entry = out.entry(key.clone()).or_default();
            match v {
                Value::String(s) => entry.push(s.clone()),
                Value::Array(items) => {
                    entry.extend(items.iter().filter_map(|i| i.as_str().map(str::to_owned)));
                }
                _ => {}
            }
        }
        if v.is_object() {
            collect(v, out);
        }
        if let Value::Array(items) = v {
            for item in items {
                collect(item, out);
            }
        }
    }
}

fn one(fields: &Fields, name: &str) -> Option<String> {
    fields.get(name).and_then(|v| v.first().cloned())
}

/// Checks the dissector's view of message `i` against the codec's: type, group, signature;
/// for rekeys the epoch, check value, covers, wrap count, and every item's opener and target.
fn check(i: usize, bytes: &[u8], d: &Fields) {
    let ty = MessageType::peek(bytes).expect("a message of this version") as u8;
    assert_eq!(
        one(d, "gkm.type"),
        Some(ty.to_string()),
        "message {i}: {d:?}"
    );
    assert_eq!(one(d, "gkm.version"), Some(wire::VERSION.to_string()));
    assert_eq!(
        one(d, "gkm.group"),
        Some(GROUP.0.to_string()),
        "message {i}"
    );
    assert!(
        !d.contains_key("gkm.malformed"),
        "message {i} flagged malformed"
    );
    let signed = matches!(ty, 1..=7);
    assert_eq!(
        d.contains_key("gkm.signature"),
        signed,
        "message {i} (type {ty}): signature"
    );
    match MessageType::peek(bytes) {
        Ok(MessageType::Rekey) => {
            let datagram =
                wire::decode_signed::<RekeyDatagram>(bytes).expect("the code's own datagram");
            let r = datagram.message();
            assert_eq!(one(d, "gkm.epoch"), Some(r.epoch.0.to_string()));
            assert_eq!(
                one(d, "gkm.wrap_count"),
                Some(r.wraps().count().to_string()),
                "message {i}"
            );
            let targets: Vec<String> = r
                .items
                .iter()
                .filter_map(|item| match item {
                    wire::Item::Wrap(w) => Some(w.target.0.to_string()),
                    wire::Item::Link(l) => Some(l.parent.0.to_string()),
                    wire::Item::Advance(_) => None,
                })
                .collect();
            assert_eq!(
                d.get("gkm.item.target").cloned().unwrap_or_default(),
                targets,
                "message {i}: target nodes"
            );
            let openers: Vec<String> = r
                .items
                .iter()
                .map(|item| match item {
                    wire::Item::Wrap(w) => w.wrapping.0.to_string(),
                    wire::Item::Link(l) => l.child.0.to_string(),
                    wire::Item::Advance(n) => n.0.to_string(),
                })
                .collect();
            assert_eq!(
                d.get("gkm.item.opener").cloned().unwrap_or_default(),
                openers,
                "message {i}: opener nodes"
            );
            let covers: Vec<String> = r.covers.iter().map(|c| c.0.to_string()).collect();
            assert_eq!(d.get("gkm.cover").cloned().unwrap_or_default(), covers);
            assert_eq!(
                one(d, "gkm.kcv").map(|k| k.replace(':', "")),
                Some(hex(&r.kcv.0))
            );
        }
        Ok(MessageType::Heartbeat) => {
            let beat = wire::Heartbeat::decode(&mut wire::Reader::new(bytes)).expect("heartbeat");
            assert_eq!(one(d, "gkm.epoch"), Some(beat.epoch.0.to_string()));
        }
        Ok(MessageType::Welcome | MessageType::ResyncResponse) => {
            let sealed =
                wire::SealedPath::decode(&mut wire::Reader::new(bytes)).expect("sealed path");
            assert_eq!(one(d, "gkm.member"), Some(sealed.member.0.to_string()));
            assert_eq!(one(d, "gkm.epoch"), Some(sealed.epoch.0.to_string()));
            assert_eq!(one(d, "gkm.kem"), Some(kem_id(sealed.kem)), "message {i}");
        }
        Ok(MessageType::RegistrationRequest) => {
            let request = wire::decode_signed::<wire::RegistrationRequest>(bytes)
                .expect("registration")
                .message()
                .clone();
            let kem = request.hpke_key.kem();
            assert_eq!(one(d, "gkm.kem"), Some(kem_id(kem)), "message {i}");
            let key = one(d, "gkm.hpke_key").map(|k| k.replace(':', ""));
            assert_eq!(key, Some(hex(request.hpke_key.as_bytes())), "message {i}");
        }
        Ok(MessageType::ResyncRequest) => {
            let request = wire::decode_signed::<wire::ResyncRequest>(bytes)
                .expect("resync request")
                .message()
                .clone();
            let kem = request.hpke_key.kem();
            assert_eq!(one(d, "gkm.kem"), Some(kem_id(kem)), "message {i}");
        }
        Ok(MessageType::Data) => {
            assert_eq!(one(d, "gkm.sender"), Some("9".into()));
            assert!(d.contains_key("gkm.ciphertext"));
        }
        Ok(MessageType::Error) => {
            assert_eq!(one(d, "gkm.status"), Some("429".into()));
            assert_eq!(one(d, "gkm.reason"), Some("slow down".into()));
        }
        _ => {}
    }
}

/// A member's registration with an X25519 key, and its welcome sealed under X25519 (the run's
/// members hold X-Wing keys, the default).
fn x25519_registration() -> [Sent; 2] {
    use rand_core::SeedableRng;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(25519);
    let identity = ed25519_dalek::SigningKey::from_bytes(&[0x25; 32]);
    let hpke = wire::HpkeSecret::generate(wire::Kem::X25519, &mut rng);
    let request = wire::RegistrationRequest {
        group: GROUP,
        identity: identity.verifying_key().to_bytes(),
        hpke_key: hpke.public_key().expect("a key"),
        timestamp_ms: 1_800_000_000_000,
        nonce: [5; 16],
        token: Vec::new(),
    };
    let mut tree =
        lkh_tree::KeyTree::new(GROUP, lkh_tree::TreeConfig::default(), &mut rng).expect("tree");
    let batch = lkh_tree::Batch {
        leaves: vec![],
        joins: 3,
    };
    let path = tree.rekey(&batch, &mut rng).expect("joins").joiners[2]
        .path
        .clone();
    let to = wire::SealedFor {
        kind: wire::SealedKind::Welcome,
        member: wire::MemberId(3),
        request_nonce: request.nonce,
        rekey_address: None,
    };
    let sealed = wire::seal_path(&path, &to, &request.hpke_key, &mut rng).expect("seals");
    let controller = ed25519_dalek::SigningKey::from_bytes(&[0x26; 32]);
    [
        Sent {
            bytes: wire::sign(&request, &identity),
            tcp: true,
        },
        Sent {
            bytes: wire::sign(&sealed, &controller),
            tcp: true,
        },
    ]
}

/// The dissector's text for a KEM identifier (`0x647a`).
fn kem_id(kem: wire::Kem) -> String {
    format!("{:#06x}", kem.id())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A pcap file (link type raw IPv4) of the messages: datagrams as UDP from the controller to
/// the group (data frames to the data port), requests and replies as TCP frames between a member
/// and the controller, one message per segment, sequence numbers in order.
fn pcap_of(sent: &[Sent]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    for word in [0u32, 0, 65_535, 101] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    let (mut up, mut down) = (1u32, 1u32);
    for (i, s) in sent.iter().enumerate() {
        let packet = if s.tcp {
            let from_member = matches!(s.bytes[3], 1 | 5 | 7);
            let mut payload = (s.bytes.len() as u32).to_be_bytes().to_vec();
            payload.extend_from_slice(&s.bytes);
            let seq = if from_member { &mut up } else { &mut down };
            let segment = tcp(from_member, *seq, &payload);
            *seq = seq.wrapping_add(payload.len() as u32);
            let member = [10, 0, 0, 2];
            if from_member {
                ipv4(member, CONTROLLER, 6, &segment)
            } else {
                ipv4(CONTROLLER, member, 6, &segment)
            }
        } else {
            let port = if s.bytes[3] == 9 { 47_702 } else { 47_701 };
            ipv4(CONTROLLER, MULTICAST, 17, &udp(40_000, port, &s.bytes))
        };
        for word in [
            1_800_000_000u32,
            i as u32,
            packet.len() as u32,
            packet.len() as u32,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&packet);
    }
    out
}

fn udp(src: u16, dst: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&src.to_be_bytes());
    out.extend_from_slice(&dst.to_be_bytes());
    out.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    out
}

fn tcp(from_member: bool, seq: u32, payload: &[u8]) -> Vec<u8> {
    let (src, dst) = if from_member {
        (50_000u16, 47_700u16)
    } else {
        (47_700, 50_000)
    };
    let mut out = Vec::with_capacity(20 + payload.len());
    out.extend_from_slice(&src.to_be_bytes());
    out.extend_from_slice(&dst.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&[5 << 4, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}

fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut header = [0u8; 20];
    header[0] = 0x45;
    header[2..4].copy_from_slice(&total.to_be_bytes());
    header[6] = 0x40;
    header[8] = 64;
    header[9] = protocol;
    header[12..16].copy_from_slice(&src);
    header[16..20].copy_from_slice(&dst);
    let sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !((folded & 0xffff) + (folded >> 16)) as u16;
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    let mut out = header.to_vec();
    out.extend_from_slice(payload);
    out
}

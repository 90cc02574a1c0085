//! The KEMs of members' HPKE keys: the group's policy says which it takes (X-Wing by default),
//! registrations and resyncs under another are refused and told which it takes, members present
//! their key in resyncs and the controller keeps only its digest, and the operator sees the
//! members per KEM. Controller and members are the sans-I/O state machines, in memory.

#![allow(clippy::cast_possible_truncation, reason = "small test indices")]

use ed25519_dalek::SigningKey;
use gkm_member::{Member, MemberConfig, MemberEvent};
use gkm_server::{
    Command, ConnId, Controller, GroupPolicy, MemoryStore, Reject, Response, StoreDriver,
    Timestamp, Transmit,
};
use lkh_tree::GroupId;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use wire::{
    Codec, ErrorMessage, HpkePublicKey, HpkeSecret, Kem, MessageType, RegistrationRequest,
    ResyncRequest, Status, sign,
};

const GROUP: GroupId = GroupId(7);
const START: u64 = 1_800_000_000_000;

struct Net {
    controller: StoreDriver<ChaCha20Rng>,
    members: Vec<Member<ChaCha20Rng>>,
    /// Each member's identity and HPKE public key, as it registered.
    keys: Vec<(SigningKey, HpkePublicKey)>,
    events: Vec<Vec<MemberEvent>>,
    /// The error messages each member's connection got.
    errors: Vec<Vec<ErrorMessage>>,
    now: u64,
    signer: SigningKey,
}

impl Net {
    fn new(kems: &[Kem]) -> Net {
        let signer = SigningKey::from_bytes(&[42; 32]);
        let mut policy = GroupPolicy::new("demo", GROUP);
        policy.kems = kems.to_vec();
        let controller = Controller::new(
            signer.clone(),
            ChaCha20Rng::seed_from_u64(1),
            vec![policy],
            vec![],
            Timestamp(START),
        )
        .unwrap();
        Net {
            controller: StoreDriver::new(controller, Box::new(MemoryStore::default())),
            members: Vec::new(),
            keys: Vec::new(),
            events: Vec::new(),
            errors: Vec::new(),
            now: START,
            signer,
        }
    }

    /// A member registering with a key of `kem`; its index.
    fn join(&mut self, kem: Kem) -> usize {
        let i = self.members.len();
        let mut rng = ChaCha20Rng::seed_from_u64(100 + i as u64);
        let identity = SigningKey::from_bytes(&[i as u8 + 1; 32]);
        let hpke = HpkeSecret::generate(kem, &mut rng);
        self.keys
            .push((identity.clone(), hpke.public_key().unwrap()));
        let config = MemberConfig::new(GROUP, self.signer.verifying_key());
        self.members
            .push(Member::new(config, identity, hpke, rng, self.now));
        self.events.push(Vec::new());
        self.errors.push(Vec::new());
        self.pump();
        i
    }

    fn pump(&mut self) {
        for _ in 0..1_000 {
            let mut moved = false;
            for i in 0..self.members.len() {
                while let Some(request) = self.members[i].poll_request() {
                    moved = true;
                    self.request(i, &request);
                }
            }
            if self
                .controller
                .poll_timeout()
                .is_some_and(|t| t.0 <= self.now)
            {
                self.controller.handle_timeout(Timestamp(self.now));
            }
            while let Some(t) = self.controller.poll_transmit() {
                moved = true;
                match t {
                    Transmit::Multicast { bytes, .. } => {
                        for m in &mut self.members {
                            m.handle_datagram(self.now, &bytes);
                        }
                    }
                    Transmit::Reply { conn, bytes } => {
                        let i = conn.0 as usize;
                        if MessageType::peek(&bytes) == Ok(MessageType::Error) {
                            self.errors[i].push(ErrorMessage::decode_exact(&bytes).unwrap());
                        }
                        self.members[i].handle_reply(self.now, &bytes);
                    }
                }
            }
            for (i, m) in self.members.iter_mut().enumerate() {
                while let Some(e) = m.poll_event() {
                    self.events[i].push(e);
                }
            }
            while self.controller.poll_event().is_some() {}
            if !moved {
                return;
            }
        }
        panic!("the network did not settle");
    }

    fn request(&mut self, i: usize, bytes: &[u8]) {
        self.controller
            .handle_request(ConnId(i as u64), Timestamp(self.now), bytes);
    }

    fn joined(&self, i: usize) -> bool {
        self.events[i]
            .iter()
            .any(|e| matches!(e, MemberEvent::Joined { .. }))
    }

    fn command(&mut self, command: Command) -> Response {
        self.controller
            .handle_command(Timestamp(self.now), command)
            .unwrap()
    }

    fn rejects(&mut self, reason: Reject) -> u64 {
        let Response::Stats(stats) = self.command(Command::Stats("demo".into())) else {
            panic!("stats");
        };
        stats.rejects.get(&reason).copied().unwrap_or(0)
    }

    /// Member `i`'s resync request presenting `key`, at its current epoch with a wrong check
    /// value (so that a path, not a renewal, is the answer).
    fn resync(&self, i: usize, key: &HpkePublicKey, nonce: u8) -> Vec<u8> {
        let (member, path) = self.members[i].membership().unwrap();
        let request = ResyncRequest {
            group: GROUP,
            member,
            epoch: path.epoch(),
            kcv: lkh_tree::Kcv([0; lkh_tree::KCV_LEN]),
            timestamp_ms: self.now,
            nonce: [nonce; 16],
            hpke_key: key.clone(),
        };
        sign(&request, &self.keys[i].0)
    }
}

/// GKM-V071: under the default policy an X25519 registration is refused, told which KEMs the
/// group takes, and changes nothing; the member stops and says so instead of retrying.
#[test]
fn v071_the_default_takes_x_wing_and_refuses_x25519_saying_what_it_takes() {
    let mut net = Net::new(&GroupPolicy::new("demo", GROUP).kems);
    let quantum_safe = net.join(Kem::XWing);
    assert!(net.joined(quantum_safe));
    let epoch = net.controller.traffic_key(GROUP).unwrap().0;
    let classical = net.join(Kem::X25519);
    assert!(!net.joined(classical));
    let told = &net.errors[classical];
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].status, Status::KemNotAccepted);
    assert_eq!(told[0].reason, "accepts: x-wing");
    assert!(
        net.events[classical].iter().any(|e| matches!(
            e,
            MemberEvent::KemNotAccepted { ours: Kem::X25519, reason } if reason == "accepts: x-wing"
        )),
        "{:?}",
        net.events[classical]
    );
    assert_eq!(net.rejects(Reject::KemNotAccepted), 1);
    assert_eq!(
        net.controller.traffic_key(GROUP).unwrap().0,
        epoch,
        "no rekey"
    );
    let Response::Members(members) = net.command(Command::Members("demo".into())) else {
        panic!("members");
    };
    assert_eq!(members.len(), 1);
    // The stopped member asks nothing more, however long it waits.
    net.now += 600_000;
    net.members[classical].handle_timeout(net.now);
    assert!(net.members[classical].poll_request().is_none());
}

/// A group taking both KEMs: members of each join, the roster and the inventory say which KEM
/// each holds, and a resync is sealed under the member's own KEM.
#[test]
fn a_group_taking_both_serves_each_member_under_its_own_kem() {
    let mut net = Net::new(&[Kem::XWing, Kem::X25519]);
    let a = net.join(Kem::XWing);
    let b = net.join(Kem::X25519);
    let c = net.join(Kem::X25519);
    assert!(net.joined(a) && net.joined(b) && net.joined(c));
    let Response::Members(members) = net.command(Command::Members("demo".into())) else {
        panic!("members");
    };
    let mut kems: Vec<&str> = members.iter().map(|m| m.kem.as_str()).collect();
    kems.sort_unstable();
    assert_eq!(kems, ["x-wing", "x25519", "x25519"]);
    let Response::Keys(inventory) = net.command(Command::Keys("demo".into())) else {
        panic!("keys");
    };
    assert_eq!(inventory.members_by_kem["x-wing"], 1);
    assert_eq!(inventory.members_by_kem["x25519"], 2);

    for i in [a, b] {
        let key = net.keys[i].1.clone();
        let request = net.resync(i, &key, 9 + i as u8);
        net.request(i, &request);
        let Some(Transmit::Reply { bytes, .. }) = net.controller.poll_transmit() else {
            panic!("a reply");
        };
        let sealed = wire::open::<wire::SealedPath>(&bytes, &net.signer.verifying_key())
            .unwrap_or_else(|_| panic!("{:?}", ErrorMessage::decode_exact(&bytes)))
            .into_message();
        assert_eq!(sealed.kind, wire::SealedKind::Resync);
        assert_eq!(sealed.kem, key.kem());
        assert_eq!(sealed.encapped.len(), key.kem().encapped_len());
    }
}

/// GKM-V072: a resync presenting a key other than the one the member registered with is
/// refused and changes nothing; with its own key the member is answered.
#[test]
fn v072_a_resync_with_another_key_is_refused() {
    let mut net = Net::new(&[Kem::XWing]);
    let a = net.join(Kem::XWing);
    let other = HpkeSecret::generate(Kem::XWing, &mut ChaCha20Rng::seed_from_u64(77))
        .public_key()
        .unwrap();
    let request = net.resync(a, &other, 3);
    net.request(a, &request);
    let Some(Transmit::Reply { bytes, .. }) = net.controller.poll_transmit() else {
        panic!("a reply");
    };
    let refused = ErrorMessage::decode_exact(&bytes).unwrap();
    assert_eq!(refused.status, Status::Malformed);
    assert!(
        refused.reason.contains("register again"),
        "{}",
        refused.reason
    );
    assert_eq!(net.rejects(Reject::WrongHpkeKey), 1);
    let own = net.keys[a].1.clone();
    let request = net.resync(a, &own, 4);
    net.request(a, &request);
    let Some(Transmit::Reply { bytes, .. }) = net.controller.poll_transmit() else {
        panic!("a reply");
    };
    assert_eq!(MessageType::peek(&bytes), Ok(MessageType::ResyncResponse));
}

/// A downgrade the policy forbids: a member registered with X-Wing that registers again with an
/// X25519 key is refused, and keeps its X-Wing membership.
#[test]
fn a_member_cannot_downgrade_to_a_kem_the_policy_forbids() {
    let mut net = Net::new(&[Kem::XWing]);
    let a = net.join(Kem::XWing);
    let (member, _) = net.members[a].membership().unwrap();
    let (identity, _) = net.keys[a].clone();
    let classical = HpkeSecret::generate(Kem::X25519, &mut ChaCha20Rng::seed_from_u64(5));
    let request = RegistrationRequest {
        group: GROUP,
        identity: identity.verifying_key().to_bytes(),
        hpke_key: classical.public_key().unwrap(),
        timestamp_ms: net.now,
        nonce: [8; 16],
        token: Vec::new(),
    };
    net.request(a, &sign(&request, &identity));
    let Some(Transmit::Reply { bytes, .. }) = net.controller.poll_transmit() else {
        panic!("a reply");
    };
    assert_eq!(
        ErrorMessage::decode_exact(&bytes).unwrap().status,
        Status::KemNotAccepted
    );
    net.now += 5_000;
    net.controller.handle_timeout(Timestamp(net.now));
    net.pump();
    let Response::Members(members) = net.command(Command::Members("demo".into())) else {
        panic!("members");
    };
    assert_eq!(members.len(), 1);
    assert_eq!(
        (members[0].id, members[0].kem.as_str()),
        (member.0, "x-wing")
    );
}

/// Tightening the policy at run time: an X25519 member is still renewed (nothing is sealed),
/// but a resync that needs its path sealed is refused until it registers with an X-Wing key.
#[test]
fn a_tightened_policy_seals_nothing_more_under_the_kem_it_dropped() {
    let mut net = Net::new(&[Kem::XWing, Kem::X25519]);
    let b = net.join(Kem::X25519);
    assert!(net.joined(b));
    net.command(Command::Policy(
        "demo".into(),
        Some(("kem".into(), "x-wing".into())),
    ));
    let key = net.keys[b].1.clone();
    let request = net.resync(b, &key, 11);
    net.request(b, &request);
    let Some(Transmit::Reply { bytes, .. }) = net.controller.poll_transmit() else {
        panic!("a reply");
    };
    let refused = ErrorMessage::decode_exact(&bytes).unwrap();
    assert_eq!(
        (refused.status, refused.reason.as_str()),
        (Status::KemNotAccepted, "accepts: x-wing")
    );
}

//! The checks behind the fuzz targets that drive the agents' state machines: the controller's
//! request handling ([`Controller::handle_request`], [`Controller::handle_subscription`]), the control
//! socket's JSON requests, and the member's multicast and reply handling
//! ([`Member::handle_datagram`], [`Member::handle_reply`]). Shared with the corpus replay test
//! `gkm-server/tests/fuzz_corpus.rs`, which includes this file with `#[path]`.
//!
//! Each check starts from the same deterministic state (a controller with [`MEMBERS`] members,
//! restored from a snapshot, and member 0 resumed from its keys), feeds it one input, and panics
//! only on a real bug: a panic inside the agent, a request left without a reply, or a refused
//! input that changed the group's epoch, its membership or the member's keys.
//!
//! Inputs start with a selector byte: 0 feeds the rest as is; any other value treats the rest
//! as an unsigned message body and signs it first (as a member's identity for requests, as the
//! controller for multicast and replies), so that the fuzzer gets past the signature checks it
//! cannot forge.
//!
//! Uses only crates that `gkm-server` has (as dependencies or dev-dependencies).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::OnceLock;

use ed25519_dalek::SigningKey;
use gkm_member::{Member, MemberConfig};
use gkm_server::control::{MAX_LINE, Reply, Request};
use gkm_server::{
    Command, ConnId, Controller, GroupPolicy, GroupState, MemoryStore, Response, Store,
    StoreDriver, Subscription, Timestamp, Transmit,
};
use lkh_tree::{Epoch, GroupId, MemberPath};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use wire::{
    Codec, ErrorMessage, Heartbeat, HpkeSecret, LeaveRequest, MemberId, MessageType,
    RegistrationRequest, RekeyDatagram, ResyncRequest, SealedPath, Subscribe, sign,
};

/// Every agent target, by the name of its directory under `fuzz/corpus/` and of its binary.
pub const TARGETS: &[&str] = &[
    "controller_request",
    "controller_subscribe",
    "control_json",
    "member_multicast",
    "member_reply",
];

/// Runs the check of `target` on `data`. `None` for an unknown target; otherwise whether the
/// input was accepted (a request answered without refusal, a rekey applied, a reply taken).
pub fn run(target: &str, data: &[u8]) -> Option<bool> {
    Some(match target {
        "controller_request" => controller_request(data),
        "controller_subscribe" => controller_subscribe(data),
        "control_json" => control_json(data),
        "member_multicast" => member_multicast(data),
        "member_reply" => member_reply(data),
        _ => return None,
    })
}

/// The fixture's group, by name and id.
pub const GROUP_NAME: &str = "fuzz";
/// The fixture's group id.
pub const GROUP: GroupId = GroupId(11);
/// The controller's clock during every check (and every request's timestamp in the corpus).
pub const NOW: u64 = 1_800_000_000_000;
/// Members of the fixture group.
pub const MEMBERS: usize = 6;
/// The connection every fuzzed request arrives on.
pub const CONN: ConnId = ConnId(99);
const SIGNER_SEED: [u8; 32] = [0x6b; 32];
const RESUMED_RNG: u64 = 0x6d65_6d62;

fn policy() -> GroupPolicy {
    GroupPolicy::new(GROUP_NAME, GROUP)
}

/// The identity key of fixture member `i` (members are 0..[`MEMBERS`]; others are strangers).
pub fn identity(i: usize) -> SigningKey {
    let mut seed = [0x20u8; 32];
    seed[0] = u8::try_from(i).unwrap_or(u8::MAX);
    SigningKey::from_bytes(&seed)
}

/// Member `i`'s HPKE secret key (X-Wing, the default KEM).
pub fn hpke(i: usize) -> HpkeSecret {
    HpkeSecret::generate(
        wire::Kem::XWing,
        &mut ChaCha20Rng::seed_from_u64(0x6870_6b65 + i as u64),
    )
}

/// The group of [`MEMBERS`] members every check starts from, and member 0's keys.
pub struct Agents {
    /// The group as the controller persisted it.
    pub state: GroupState,
    /// Member 0's id and keys.
    pub member: (MemberId, MemberPath),
    /// Member ids, in registration order.
    pub ids: Vec<MemberId>,
    /// Member 0's identity key and HPKE secret (made once: key generation is slow under ASan).
    keys: (SigningKey, [u8; 32]),
}

impl Agents {
    /// The fixture, built once by registering [`MEMBERS`] members with a fresh controller.
    pub fn get() -> &'static Agents {
        static AGENTS: OnceLock<Agents> = OnceLock::new();
        AGENTS.get_or_init(Agents::build)
    }

    fn build() -> Agents {
        let mut controller = new_controller(Vec::new());
        let mut members: Vec<Member<ChaCha20Rng>> = (0..MEMBERS)
            .map(|i| {
                let rng = ChaCha20Rng::seed_from_u64(i as u64);
                Member::new(member_config(), identity(i), hpke(i), rng, NOW)
            })
            .collect();
        for _ in 0..100 {
            let mut moved = false;
            for (i, m) in members.iter_mut().enumerate() {
                while let Some(request) = m.poll_request() {
                    moved = true;
                    controller.handle_request(ConnId(i as u64), Timestamp(NOW), &request);
                }
            }
            if controller.poll_timeout().is_some_and(|t| t.0 <= NOW) {
                controller.handle_timeout(Timestamp(NOW));
            }
            while let Some(t) = controller.poll_transmit() {
                moved = true;
                match t {
                    Transmit::Multicast { bytes, .. } => {
                        members
                            .iter_mut()
                            .for_each(|m| m.handle_datagram(NOW, &bytes));
                    }
                    Transmit::Reply { conn, bytes } => {
                        if let Some(m) = usize::try_from(conn.0)
                            .ok()
                            .and_then(|i| members.get_mut(i))
                        {
                            m.handle_reply(NOW, &bytes);
                        }
                    }
                }
            }
            if !moved {
                break;
            }
        }
        let ids = members
            .iter()
            .map(|m| m.membership().expect("every fixture member is admitted").0)
            .collect();
        let (id, path) = members[0].membership().expect("member 0 is admitted");
        Agents {
            state: controller.group_state(GROUP).expect("the fixture group"),
            member: (id, path.clone()),
            ids,
            keys: (identity(0), *hpke(0).as_bytes()),
        }
    }

    /// A controller restored from the fixture state (its restart rekey still pending: the first
    /// timeout makes it).
    pub fn controller(&self) -> StoreDriver<ChaCha20Rng> {
        new_controller(vec![self.state.clone()])
    }

    /// Member 0 resumed from its keys (one epoch behind [`Agents::controller`]), with its resync
    /// request taken from its queue and returned.
    pub fn member(&self) -> (Member<ChaCha20Rng>, Vec<u8>) {
        let (id, path) = &self.member;
        let rng = ChaCha20Rng::seed_from_u64(RESUMED_RNG);
        let (identity, hpke) = (
            self.keys.0.clone(),
            HpkeSecret::from_bytes(wire::Kem::XWing, self.keys.1),
        );
        let mut member =
            Member::resume(member_config(), identity, hpke, rng, *id, path.clone(), NOW);
        let resync = member.poll_request().unwrap_or_default();
        (member, resync)
    }

    /// Every multicast datagram the controller sends in its restart rekey, the heartbeat a
    /// heartbeat interval later (none follows a rekey at once: it carries the epoch itself), and
    /// its reply to member 0's resync after them (for the corpus).
    pub fn captures(&self) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut controller = new_controller(vec![self.state.clone()]);
        controller.handle_timeout(Timestamp(NOW));
        let mut multicast = Vec::new();
        while let Some(t) = controller.poll_transmit() {
            if let Transmit::Multicast { bytes, .. } = t {
                multicast.push(bytes);
            }
        }
        controller.handle_timeout(Timestamp(NOW + policy().heartbeat_interval_ms));
        while let Some(t) = controller.poll_transmit() {
            if let Transmit::Multicast { bytes, .. } = t
                && wire::MessageType::peek(&bytes) == Ok(wire::MessageType::Heartbeat)
            {
                multicast.push(bytes);
            }
        }
        let (_, resync) = self.member();
        controller.handle_request(CONN, Timestamp(NOW), &resync);
        (
            multicast,
            replies(&mut controller)
                .into_iter()
                .next()
                .unwrap_or_default(),
        )
    }
}

fn member_config() -> MemberConfig {
    MemberConfig::new(GROUP, SigningKey::from_bytes(&SIGNER_SEED).verifying_key())
}

fn new_controller(restored: Vec<GroupState>) -> StoreDriver<ChaCha20Rng> {
    // The store holds what the controller is restored from, as a daemon's store does: the
    // controller saves its next rekey as a delta to it.
    let mut store = MemoryStore::default();
    for state in &restored {
        store.save(state).expect("a memory store saves");
    }
    StoreDriver::new(
        Controller::new(
            SigningKey::from_bytes(&SIGNER_SEED),
            ChaCha20Rng::seed_from_u64(0x6374_726c),
            vec![policy()],
            restored,
            Timestamp(NOW),
        )
        .expect("the fixture policy is valid"),
        Box::new(store),
    )
}

/// Every reply queued for [`CONN`].
fn replies(controller: &mut StoreDriver<ChaCha20Rng>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(t) = controller.poll_transmit() {
        if let Transmit::Reply { conn, bytes } = t
            && conn == CONN
        {
            out.push(bytes);
        }
    }
    out
}

/// The group's epoch and member ids: what a refused input must leave unchanged.
fn group_view(controller: &mut StoreDriver<ChaCha20Rng>) -> (Epoch, Vec<u64>) {
    let epoch = controller.traffic_key(GROUP).map_or(Epoch(0), |(e, _)| e);
    let ids = match controller.handle_command(Timestamp(NOW), Command::Members(GROUP_NAME.into())) {
        Ok(Response::Members(list)) => list.iter().map(|m| m.id).collect(),
        _ => Vec::new(),
    };
    (epoch, ids)
}

/// Decodes `body` as the unsigned message its header names and signs it with `key`; `None` if
/// it is not one of the kinds in `kinds`.
fn signed_body(body: &[u8], key: &SigningKey, kinds: &[MessageType]) -> Option<Vec<u8>> {
    let kind = MessageType::peek(body).ok().filter(|k| kinds.contains(k))?;
    match kind {
        MessageType::RegistrationRequest => RegistrationRequest::decode_exact(body)
            .ok()
            .map(|m| sign(&m, key)),
        MessageType::ResyncRequest => ResyncRequest::decode_exact(body)
            .ok()
            .map(|m| sign(&m, key)),
        MessageType::Leave => LeaveRequest::decode_exact(body).ok().map(|m| sign(&m, key)),
        MessageType::Subscribe => Subscribe::decode_exact(body).ok().map(|m| sign(&m, key)),
        MessageType::Heartbeat => Heartbeat::decode_exact(body).ok().map(|m| sign(&m, key)),
        MessageType::Rekey => RekeyDatagram::decode_exact(body).ok().map(|m| m.sign(key)),
        MessageType::Welcome | MessageType::ResyncResponse => {
            SealedPath::decode_exact(body).ok().map(|m| sign(&m, key))
        }
        _ => None,
    }
}

/// The input as the agent receives it: raw (selector 0), or signed by `signer(selector)`.
fn input(data: &[u8], signer: impl Fn(u8) -> SigningKey, kinds: &[MessageType]) -> Option<Vec<u8>> {
    match data.split_first() {
        None => Some(Vec::new()),
        Some((0, rest)) => Some(rest.to_vec()),
        Some((&selector, rest)) => signed_body(rest, &signer(selector), kinds),
    }
}

const REQUESTS: &[MessageType] = &[
    MessageType::RegistrationRequest,
    MessageType::ResyncRequest,
    MessageType::Leave,
];

fn member_signer(selector: u8) -> SigningKey {
    identity(usize::from(selector) % MEMBERS)
}

fn controller_signer(_: u8) -> SigningKey {
    SigningKey::from_bytes(&SIGNER_SEED)
}

/// `Controller::handle_request` on a controller with members. Every request is answered on its
/// connection (a join after the timeout that rekeys it in); a refused one (an error reply with a
/// non-zero code) changes neither the epoch nor the membership. Whether it was answered without
/// refusal.
pub fn controller_request(data: &[u8]) -> bool {
    let Some(bytes) = input(data, member_signer, REQUESTS) else {
        return false;
    };
    let agents = Agents::get();
    let mut controller = agents.controller();
    let before = group_view(&mut controller);
    controller.handle_request(CONN, Timestamp(NOW), &bytes);
    let mut answers = replies(&mut controller);
    if answers.is_empty() {
        // A join is answered by the rekey that admits it, which the next timeout makes.
        controller.handle_timeout(Timestamp(NOW));
        answers = replies(&mut controller);
    }
    assert!(!answers.is_empty(), "a request got no reply");
    let refused = answers.iter().any(|a| {
        MessageType::peek(a) == Ok(MessageType::Error) && ErrorMessage::decode_exact(a).is_ok()
    });
    if refused {
        assert_eq!(
            group_view(&mut controller),
            before,
            "a refused request changed the group"
        );
    }
    !refused
}

/// Where the fuzzed fan-out subscriptions come from.
pub const FROM: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 9), 4_000));

const SUBSCRIPTIONS: &[MessageType] = &[MessageType::Subscribe, MessageType::ResyncRequest];

/// `Controller::handle_subscription` (fan-out subscriptions) from [`FROM`]: queues nothing and
/// changes no group; a cookie goes back smaller than the request; an address is confirmed only
/// for a current member, and nothing else is. Whether it was accepted.
pub fn controller_subscribe(data: &[u8]) -> bool {
    let Some(bytes) = input(data, member_signer, SUBSCRIPTIONS) else {
        return false;
    };
    let agents = Agents::get();
    let mut controller = agents.controller();
    let before = group_view(&mut controller);
    let outcome = controller.handle_subscription(Timestamp(NOW), FROM, &bytes);
    assert!(
        controller.poll_transmit().is_none(),
        "a subscription queued something"
    );
    assert_eq!(
        group_view(&mut controller),
        before,
        "a subscription changed the group"
    );
    let confirmed = controller.fanout_addresses(GROUP, Timestamp(NOW));
    match &outcome {
        Ok(Subscription::Cookie(reply)) => {
            assert!(
                reply.len() < bytes.len(),
                "a cookie larger than its request"
            );
            assert!(
                confirmed.is_empty(),
                "an address confirmed without a cookie"
            );
        }
        Ok(Subscription::Confirmed { group, member }) => {
            assert_eq!(*group, GROUP);
            assert!(before.1.contains(&member.0), "a non-member subscribed");
            assert_eq!(confirmed, vec![FROM]);
        }
        Err(_) => assert!(
            confirmed.is_empty(),
            "a refused subscription confirmed an address"
        ),
    }
    outcome.is_ok()
}

/// A cookie the fixture controller sends to [`FROM`] for `member`'s subscription `request`
/// (signed), for the corpus.
pub fn cookie_for(request: &[u8]) -> Option<wire::Cookie> {
    let mut controller = Agents::get().controller();
    match controller.handle_subscription(Timestamp(NOW), FROM, request) {
        Ok(Subscription::Cookie(reply)) => wire::CookieReply::decode_exact(&reply)
            .ok()
            .map(|r| r.cookie),
        _ => None,
    }
}

/// One control-socket line: parse, re-encode (must parse back equal), run on a controller with
/// members, encode the reply. Whether the command was carried out.
pub fn control_json(data: &[u8]) -> bool {
    if data.len() > MAX_LINE {
        return false;
    }
    let Ok(request) = serde_json::from_slice::<Request>(data) else {
        return false;
    };
    let line = serde_json::to_string(&request).expect("a parsed request encodes");
    let again: Request = serde_json::from_str(&line).expect("an encoded request parses");
    assert_eq!(again, request, "a request does not survive a round trip");
    let Ok(command) = request.into_command() else {
        return false;
    };
    let mut controller = Agents::get().controller();
    let reply = Reply::from_outcome(controller.handle_command(Timestamp(NOW), command));
    serde_json::to_string(&reply).expect("a reply encodes");
    reply.ok
}

/// Member 0's epoch, traffic key bytes and applied count: what a refused input leaves alone.
fn member_view(member: &Member<ChaCha20Rng>) -> (Option<(Epoch, [u8; 32])>, u64, u64) {
    let key = member.traffic_key().map(|(e, k)| (e, *k.as_bytes()));
    (key, member.stats().applied, member.stats().resyncs)
}

/// `Member::handle_datagram` (rekeys and heartbeats) on a member one epoch behind. Keys change
/// only with an applied rekey. Whether a rekey applied.
pub fn member_multicast(data: &[u8]) -> bool {
    let kinds = [MessageType::Rekey, MessageType::Heartbeat];
    let Some(bytes) = input(data, controller_signer, &kinds) else {
        return false;
    };
    let (mut member, _) = Agents::get().member();
    let before = member_view(&member);
    member.handle_datagram(NOW, &bytes);
    let after = member_view(&member);
    let applied = after.1 > before.1;
    if !applied {
        assert_eq!(after, before, "a refused datagram changed the member");
    }
    applied
}

/// `Member::handle_reply` on a member waiting for its resync. Keys change only with a taken
/// resync. Whether the reply was taken.
pub fn member_reply(data: &[u8]) -> bool {
    let kinds = [MessageType::Welcome, MessageType::ResyncResponse];
    let Some(bytes) = input(data, controller_signer, &kinds) else {
        return false;
    };
    let (mut member, _) = Agents::get().member();
    let before = member_view(&member);
    member.handle_reply(NOW, &bytes);
    let after = member_view(&member);
    let taken = after.2 > before.2;
    // Error replies are unsigned by design (they come on the member's own connection and carry
    // no keys): a 404 makes the member drop its keys and register again.
    let error = MessageType::peek(&bytes) == Ok(MessageType::Error);
    if !taken && !error {
        assert_eq!(after, before, "a refused reply changed the member");
    }
    taken
}

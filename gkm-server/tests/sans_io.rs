//! The controller and members as sans-I/O state machines, wired together in memory on a virtual
//! clock: registration, churn, eviction, lease expiry, loss with resync, controller restart.

#![allow(clippy::cast_possible_truncation, reason = "small test indices")]
use ed25519_dalek::SigningKey;
use gkm_member::{Member, MemberConfig, MemberEvent};
use gkm_server::{
    BanTarget, Command, ConnId, Controller, Event, GroupDelta, GroupPolicy, GroupState, Inbound,
    MemoryStore, Reject, Response, Store, StoreDriver, StoreError, Subscription, Timestamp,
    TokenRule, Transmit, token_digest, verify_request,
};
use lkh_tree::{GroupId, Kcv};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::{HpkeSecret, ResyncRequest};

const GROUP: GroupId = GroupId(1);
const START: u64 = 1_800_000_000_000;

/// A generator for `verify_request` (its draws make welcome encapsulations only).
fn rng() -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(9)
}

/// A store the test can read back after the controller is dropped.
#[derive(Clone, Default)]
struct Shared(std::sync::Arc<std::sync::Mutex<MemoryStore>>);

impl Store for Shared {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.0.lock().unwrap().save(state)
    }
    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        self.0.lock().unwrap().save_delta(delta)
    }
}

struct Net {
    controller: StoreDriver<ChaCha20Rng>,
    members: Vec<Member<ChaCha20Rng>>,
    events: Vec<Vec<MemberEvent>>,
    now: u64,
    loss: f64,
    rng: ChaCha20Rng,
    store: Shared,
    signer: SigningKey,
    seeds: u64,
}

fn policy() -> GroupPolicy {
    let mut p = GroupPolicy::new("demo", GROUP);
    p.heartbeat_interval_ms = 1_000;
    p.lease_ms = 30_000;
    p
}

impl Net {
    fn new(n: usize, loss: f64) -> Net {
        let signer = SigningKey::from_bytes(&[42; 32]);
        let store = Shared::default();
        let controller = StoreDriver::new(
            Controller::new(
                signer.clone(),
                ChaCha20Rng::seed_from_u64(1),
                vec![policy()],
                vec![],
                Timestamp(START),
            )
            .unwrap(),
            Box::new(store.clone()),
        );
        let mut net = Net {
            controller,
            members: Vec::new(),
            events: Vec::new(),
            now: START,
            loss,
            rng: ChaCha20Rng::seed_from_u64(2),
            store,
            signer,
            seeds: 1000,
        };
        for _ in 0..n {
            net.add_member();
        }
        net.pump();
        net
    }

    fn add_member(&mut self) -> usize {
        let i = self.members.len();
        self.seeds += 1;
        let mut rng = ChaCha20Rng::seed_from_u64(self.seeds);
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let identity = SigningKey::from_bytes(&seed);
        let hpke = HpkeSecret::generate(wire::Kem::XWing, &mut rng);
        let mut config = MemberConfig::new(GROUP, self.signer.verifying_key());
        config.renew_interval_ms = 10_000;
        self.members
            .push(Member::new(config, identity, hpke, rng, self.now));
        self.events.push(Vec::new());
        i
    }

    fn lost(&mut self) -> bool {
        (self.rng.next_u64() as f64 / u64::MAX as f64) < self.loss
    }

    /// Moves requests, replies and datagrams until nothing is left (bounded).
    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for i in 0..self.members.len() {
                while let Some(request) = self.members[i].poll_request() {
                    moved = true;
                    self.controller
                        .handle_request(ConnId(i as u64), Timestamp(self.now), &request);
                }
            }
            // As the daemon does: what arrived is handled, then the due timers fire.
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
                        for i in 0..self.members.len() {
                            if !self.lost() {
                                self.members[i].handle_datagram(self.now, &bytes);
                            }
                        }
                    }
                    Transmit::Reply { conn, bytes } => {
                        self.members[conn.0 as usize].handle_reply(self.now, &bytes);
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
        panic!("the network did not settle (livelock)");
    }

    /// Advances the virtual clock in steps of `step` ms, firing timers.
    fn advance(&mut self, total: u64, step: u64) {
        let end = self.now + total;
        while self.now < end {
            self.now = (self.now + step).min(end);
            self.controller.handle_timeout(Timestamp(self.now));
            for m in &mut self.members {
                m.handle_timeout(self.now);
            }
            self.pump();
        }
    }

    /// A new controller restored from what the old one saved (its generator seeded `seed`).
    fn restart(&mut self, seed: u64) {
        let saved: Vec<GroupState> = self.store.0.lock().unwrap().states();
        self.controller = StoreDriver::new(
            Controller::new(
                self.signer.clone(),
                ChaCha20Rng::seed_from_u64(seed),
                vec![policy()],
                saved,
                Timestamp(self.now),
            )
            .unwrap(),
            Box::new(self.store.clone()),
        );
    }

    fn command(&mut self, command: Command) -> Response {
        self.controller
            .handle_command(Timestamp(self.now), command)
            .unwrap()
    }

    /// Members (by index) whose traffic key is the controller's.
    fn converged(&self) -> Vec<usize> {
        let (epoch, key) = self.controller.traffic_key(GROUP).unwrap();
        (0..self.members.len())
            .filter(|&i| {
                self.members[i]
                    .traffic_key()
                    .is_some_and(|(e, k)| e == epoch && k.as_bytes() == key.as_bytes())
            })
            .collect()
    }

    fn member_id(&self, i: usize) -> u64 {
        self.members[i].membership().unwrap().0.0
    }
}

#[test]
fn sixty_members_register_and_converge_through_churn() {
    let mut net = Net::new(60, 0.0);
    assert_eq!(net.converged().len(), 60);
    for round in 0..20 {
        let i = (round * 7) % 60;
        let id = net.member_id(i);
        if round % 2 == 0 {
            net.command(Command::Evict("demo".into(), id));
        } else {
            net.members[i].leave(net.now);
            net.pump();
            // The departed member's slot gets a new member.
            let k = net.add_member();
            net.members.swap(i, k);
            net.members.pop();
            net.events.swap(i, k);
            net.events.pop();
        }
        // An evicted member registers again within the rejoin spread (5 s).
        net.advance(8_000, 500);
        assert_eq!(net.converged().len(), 60, "round {round}");
    }
}

#[test]
fn an_evicted_member_loses_the_key_and_says_so() {
    let mut net = Net::new(10, 0.0);
    let victim = 3;
    let id = net.member_id(victim);
    let before = net.members[victim].traffic_key().unwrap().0;
    net.command(Command::Evict("demo".into(), id));
    net.controller.handle_timeout(Timestamp(net.now));
    // Right after the rekey the victim still holds only the old epoch.
    let (epoch, key) = net.controller.traffic_key(GROUP).unwrap();
    assert!(epoch > before);
    let held = net.members[victim].traffic_key().unwrap();
    assert_ne!(held.1.as_bytes(), key.as_bytes());
    // The heartbeat tells it it is behind; the resync says it is no longer a member, and why.
    net.advance(3_000, 250);
    let told = format!(
        "member {} was evicted by an operator at epoch {}",
        id, epoch.0
    );
    assert!(
        net.events[victim].contains(&MemberEvent::MembershipEnded { reason: told }),
        "{:?}",
        net.events[victim]
    );
    // Anyone else naming it is told no more than that it is not a member.
    let forged = ResyncRequest {
        group: GROUP,
        member: wire::MemberId(id),
        epoch: before,
        kcv: lkh_tree::Kcv([0; lkh_tree::KCV_LEN]),
        timestamp_ms: net.now,
        nonce: [9; 16],
        hpke_key: hpke_of(0),
    };
    let forged = wire::sign(&forged, &SigningKey::from_bytes(&[77; 32]));
    net.controller
        .handle_request(ConnId(0), Timestamp(net.now), &forged);
    assert_eq!(
        reply_error(&mut net.controller, net.now),
        Some((404, "NotAMember".to_owned()))
    );
    // It re-registers (open enrollment) and converges again as a new member.
    assert_eq!(net.converged().len(), 10);
    assert_ne!(net.member_id(victim), id);
}

#[test]
fn v043_a_reset_excludes_every_member_at_once_and_they_register_again() {
    let mut net = Net::new(10, 0.0);
    let ids: Vec<u64> = (0..10).map(|i| net.member_id(i)).collect();
    let before = net.controller.traffic_key(GROUP).unwrap().0;
    net.command(Command::Reset("demo".into()));
    // One rekey, made at once: no member is left and none holds the new traffic key.
    let (epoch, key) = net.controller.traffic_key(GROUP).unwrap();
    assert_eq!(epoch, before.next().unwrap());
    let Response::Members(left) = net.command(Command::Members("demo".into())) else {
        panic!("members");
    };
    assert!(left.is_empty(), "{left:?}");
    net.pump();
    for member in &net.members {
        let held = member.traffic_key().map(|(_, k)| *k.as_bytes());
        assert_ne!(
            held,
            Some(*key.as_bytes()),
            "a member kept a key through the reset"
        );
    }
    // Each is told why when it asks, and registers again (open enrollment) as a new member,
    // within the rejoin spread (5 s).
    net.advance(10_000, 250);
    for (i, id) in ids.iter().enumerate() {
        let told = format!(
            "member {id} was excluded when an operator reset the group at epoch {}",
            epoch.0
        );
        assert!(
            net.events[i].contains(&MemberEvent::MembershipEnded { reason: told }),
            "{:?}",
            net.events[i]
        );
    }
    assert_eq!(net.converged().len(), 10);
    for (i, id) in ids.iter().enumerate() {
        assert_ne!(net.member_id(i), *id);
    }
}

#[test]
fn members_that_lose_datagrams_resync_and_converge() {
    let mut net = Net::new(50, 0.0);
    net.loss = 0.3;
    for round in 0..10 {
        let id = net.member_id(round * 3);
        net.command(Command::Evict("demo".into(), id));
        net.advance(3_000, 250);
    }
    net.loss = 0.0;
    net.advance(3_000, 250);
    assert_eq!(net.converged().len(), 50);
    let resyncs: u64 = net.members.iter().map(|m| m.stats().resyncs).sum();
    assert!(resyncs > 0, "with 30% loss some members must have resynced");
}

#[test]
fn leases_expire_without_renewal() {
    let mut net = Net::new(5, 0.0);
    // Member 0 goes silent: replace it with one that never runs its timers.
    let silent = 0;
    let mut steps = 0;
    while steps < 80 {
        net.now += 500;
        net.controller.handle_timeout(Timestamp(net.now));
        for (i, m) in net.members.iter_mut().enumerate() {
            if i != silent {
                m.handle_timeout(net.now);
            }
        }
        net.pump();
        steps += 1;
    }
    let Response::Groups(groups) = net.command(Command::Groups) else {
        panic!()
    };
    assert_eq!(groups[0].members, 4, "the silent member's lease ran out");
    // Awake again, it is told why its membership ended, and registers again.
    net.advance(3_000, 250);
    let told = |e: &MemberEvent| matches!(e, MemberEvent::MembershipEnded { reason } if reason.contains("let its lease run out"));
    assert!(
        net.events[silent].iter().any(told),
        "{:?}",
        net.events[silent]
    );
    assert_eq!(net.converged().len(), 5);
}

#[test]
fn a_restarted_controller_continues_above_its_last_epoch() {
    let mut net = Net::new(20, 0.0);
    net.command(Command::Rekey("demo".into()));
    let (epoch_before, _) = net.controller.traffic_key(GROUP).unwrap();
    net.restart(99);
    net.advance(3_000, 250);
    let (epoch_after, _) = net.controller.traffic_key(GROUP).unwrap();
    assert!(epoch_after > epoch_before);
    assert_eq!(
        net.converged().len(),
        20,
        "members keep working without registering again"
    );
    assert!(net.events.iter().all(|e| {
        !e.iter()
            .any(|e| matches!(e, MemberEvent::MembershipEnded { .. }))
    }));
}

#[test]
fn bad_requests_are_refused_counted_and_change_nothing() {
    let mut net = Net::new(5, 0.0);
    let (epoch, _) = net.controller.traffic_key(GROUP).unwrap();
    let garbage: [&[u8]; 3] = [b"", b"GK\x01\x01garbage", &[0xff; 300]];
    for bytes in garbage {
        net.controller
            .handle_request(ConnId(0), Timestamp(net.now), bytes);
    }
    while let Some(t) = net.controller.poll_transmit() {
        assert!(matches!(t, Transmit::Reply { .. }));
    }
    assert_eq!(net.controller.traffic_key(GROUP).unwrap().0, epoch);
    let Response::Groups(groups) = net.command(Command::Groups) else {
        panic!()
    };
    assert_eq!(groups[0].members, 5);
    assert!(
        net.controller
            .handle_command(Timestamp(net.now), Command::Members("nope".into()))
            .is_err()
    );
    assert!(
        net.controller
            .handle_command(Timestamp(net.now), Command::Evict("demo".into(), 999))
            .is_err()
    );
}

fn registration(identity: &SigningKey, nonce: [u8; 16], at: u64, token: &[u8]) -> Vec<u8> {
    let hpke = HpkeSecret::generate(wire::Kem::XWing, &mut ChaCha20Rng::seed_from_u64(at));
    let request = wire::RegistrationRequest {
        group: GROUP,
        identity: identity.verifying_key().to_bytes(),
        hpke_key: hpke.public_key().unwrap(),
        timestamp_ms: at,
        nonce,
        token: token.to_vec(),
    };
    wire::sign(&request, identity)
}

/// A policy whose group admits the keys `allowed` and the single-use `tokens` (with their rules).
fn restricted_policy(allowed: &[&SigningKey], tokens: &[(&[u8], TokenRule)]) -> GroupPolicy {
    let mut policy = policy();
    policy.enrollment = gkm_server::Enrollment::Restricted {
        allowed: allowed
            .iter()
            .map(|k| k.verifying_key().to_bytes())
            .collect(),
        tokens: tokens
            .iter()
            .map(|(t, rule)| (token_digest(t), *rule))
            .collect(),
    };
    policy
}

/// A controller at `at` serving `policy`, continued from what `store` holds, as the daemon starts
/// (the policy from the config, the state from the store).
fn started(policy: &GroupPolicy, store: &Shared, at: u64) -> StoreDriver<ChaCha20Rng> {
    let states = store.0.lock().unwrap().states();
    StoreDriver::new(
        Controller::new(
            SigningKey::from_bytes(&[42; 32]),
            ChaCha20Rng::seed_from_u64(at),
            vec![policy.clone()],
            states,
            Timestamp(at),
        )
        .unwrap(),
        Box::new(store.clone()),
    )
}

/// A controller at `START` whose group admits the keys `allowed` and the single-use `tokens`.
fn restricted(allowed: &[&SigningKey], tokens: &[&[u8]]) -> StoreDriver<ChaCha20Rng> {
    let tokens: Vec<(&[u8], TokenRule)> =
        tokens.iter().map(|t| (*t, TokenRule::default())).collect();
    started(
        &restricted_policy(allowed, &tokens),
        &Shared::default(),
        START,
    )
}

#[test]
fn v048_a_spent_token_stays_spent_across_restarts_and_tokens_expire_and_bind() {
    let (a, b, c) = (
        SigningKey::from_bytes(&[21; 32]),
        SigningKey::from_bytes(&[22; 32]),
        SigningKey::from_bytes(&[23; 32]),
    );
    let late = TokenRule {
        expires: Some(Timestamp(START + 5_000)),
        identity: None,
    };
    let bound = TokenRule {
        expires: None,
        identity: Some(c.verifying_key().to_bytes()),
    };
    let policy = restricted_policy(
        &[],
        &[
            (b"tok-1", TokenRule::default()),
            (b"tok-late", late),
            (b"tok-c", bound),
        ],
    );
    let store = Shared::default();
    let mut controller = started(&policy, &store, START);
    let join = |c: &mut StoreDriver<ChaCha20Rng>, who: &SigningKey, at: u64, token: &[u8]| {
        request_code(c, at, &registration(who, [at as u8; 16], at, token))
    };
    assert_eq!(join(&mut controller, &a, START + 1, b"tok-1"), None);
    // The same config after a restart lists tok-1 again: spent is state, not policy.
    let mut controller = started(&policy, &store, START + 10);
    assert_eq!(join(&mut controller, &b, START + 11, b"tok-1"), Some(403));
    let mut controller = started(&policy, &store, START + 20);
    assert_eq!(join(&mut controller, &b, START + 21, b"tok-1"), Some(403));
    // Bound to c: refused to b (and not spent by the refusal), taken by c.
    assert_eq!(join(&mut controller, &b, START + 22, b"tok-c"), Some(403));
    assert_eq!(join(&mut controller, &c, START + 23, b"tok-c"), None);
    // Past its expiry: refused.
    assert_eq!(
        join(&mut controller, &b, START + 6_000, b"tok-late"),
        Some(403)
    );
}

#[test]
fn v049_a_ban_keeps_an_identity_out_across_restarts_under_every_enrollment_mode() {
    let (a, x) = (
        SigningKey::from_bytes(&[31; 32]),
        SigningKey::from_bytes(&[32; 32]),
    );
    let x_hex = hex_of(&x);
    let open = policy();
    let store = Shared::default();
    let mut controller = started(&open, &store, START);
    let join = |c: &mut StoreDriver<ChaCha20Rng>, who: &SigningKey, at: u64| {
        request_code(c, at, &registration(who, [at as u8; 16], at, b""))
    };
    let command = |c: &mut StoreDriver<ChaCha20Rng>, at: u64, command: Command| {
        let done = c.handle_command(Timestamp(at), command);
        c.handle_timeout(Timestamp(at));
        while c.poll_transmit().is_some() {}
        done
    };
    assert_eq!(join(&mut controller, &a, START + 1), None);
    let Ok(Response::Members(members)) =
        command(&mut controller, START + 2, Command::Members("demo".into()))
    else {
        panic!("members");
    };
    let banned = Command::Ban("demo".into(), BanTarget::Member(members[0].id));
    command(&mut controller, START + 3, banned).unwrap();
    let banned = Command::Ban(
        "demo".into(),
        BanTarget::Identity(x.verifying_key().to_bytes()),
    );
    command(&mut controller, START + 4, banned).unwrap();
    // Evicted, and refused under open enrollment, before and after restarts.
    assert_eq!(controller.traffic_key(GROUP).map(|_| ()), Some(()));
    let Ok(Response::Members(members)) =
        command(&mut controller, START + 5, Command::Members("demo".into()))
    else {
        panic!("members");
    };
    assert!(members.is_empty(), "{members:?}");
    assert_eq!(join(&mut controller, &a, START + 6), Some(403));
    assert_eq!(join(&mut controller, &x, START + 7), Some(403));
    let mut controller = started(&open, &store, START + 10);
    assert_eq!(join(&mut controller, &a, START + 11), Some(403));
    assert_eq!(join(&mut controller, &x, START + 12), Some(403));
    let Ok(Response::Bans(bans)) =
        command(&mut controller, START + 13, Command::Bans("demo".into()))
    else {
        panic!("bans");
    };
    assert_eq!(bans.len(), 2);
    assert!(bans.contains(&x_hex), "{bans:?}");
    // Lifted, durably.
    let unban = Command::Unban("demo".into(), x.verifying_key().to_bytes());
    command(&mut controller, START + 14, unban).unwrap();
    let mut controller = started(&open, &store, START + 20);
    assert_eq!(join(&mut controller, &x, START + 21), None);
    assert_eq!(join(&mut controller, &a, START + 22), Some(403));
    let again = Command::Unban("demo".into(), x.verifying_key().to_bytes());
    assert!(
        command(&mut controller, START + 23, again).is_err(),
        "not banned"
    );
}

fn hex_of(key: &SigningKey) -> String {
    key.verifying_key()
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `controller` handles `request` on connection 0 at `at`; the code of its reply, as
/// [`reply_code`] reads it (`None`: welcomed).
fn request_code(controller: &mut StoreDriver<ChaCha20Rng>, at: u64, request: &[u8]) -> Option<u16> {
    controller.handle_request(ConnId(0), Timestamp(at), request);
    reply_code(controller, at)
}

/// The error code of the controller's next reply, or None for a welcome. A refusal is answered
/// at once; a join when the timers due at `now` fire (its rekey).
fn reply_code(controller: &mut StoreDriver<ChaCha20Rng>, now: u64) -> Option<u16> {
    reply_error(controller, now).map(|(code, _)| code)
}

/// [`reply_code`] with the reason the error gives.
fn reply_error(controller: &mut StoreDriver<ChaCha20Rng>, now: u64) -> Option<(u16, String)> {
    for fire in [false, true] {
        if fire {
            controller.handle_timeout(Timestamp(now));
        }
        while let Some(t) = controller.poll_transmit() {
            if let Transmit::Reply { bytes, .. } = t {
                return match wire::MessageType::peek(&bytes).unwrap() {
                    wire::MessageType::Error => {
                        let error =
                            <wire::ErrorMessage as wire::Codec>::decode_exact(&bytes).unwrap();
                        Some((error.status.code(), error.reason))
                    }
                    _ => None,
                };
            }
        }
    }
    panic!("no reply");
}

#[test]
fn v018_v019_replayed_and_stale_registrations_are_refused() {
    let mut net = Net::new(0, 0.0);
    let identity = SigningKey::from_bytes(&[7; 32]);
    let request = registration(&identity, [1; 16], net.now, b"");
    assert_eq!(
        request_code(&mut net.controller, net.now, &request),
        None,
        "the first one is welcomed"
    );
    let (epoch, _) = net.controller.traffic_key(GROUP).unwrap();
    assert_eq!(
        request_code(&mut net.controller, net.now + 10, &request),
        Some(409),
        "a replay is refused"
    );
    let old = registration(&identity, [2; 16], net.now - 120_000, b"");
    assert_eq!(
        request_code(&mut net.controller, net.now, &old),
        Some(409),
        "a stale request is refused"
    );
    assert_eq!(
        net.controller.traffic_key(GROUP).unwrap().0,
        epoch,
        "no churn from either"
    );
}

#[test]
fn v020_restricted_groups_admit_listed_keys_and_single_use_tokens_only() {
    let listed = SigningKey::from_bytes(&[8; 32]);
    let now = START;
    let mut controller = restricted(&[&listed], &[b"one-time"]);
    let stranger = SigningKey::from_bytes(&[9; 32]);
    type Case<'a> = (&'a SigningKey, [u8; 16], &'a [u8], Option<u16>);
    let cases: [Case<'_>; 4] = [
        (&stranger, [1; 16], b"", Some(403)),
        (&listed, [2; 16], b"", None),
        (&stranger, [3; 16], b"one-time", None),
        (
            &SigningKey::from_bytes(&[10; 32]),
            [4; 16],
            b"one-time",
            Some(403),
        ),
    ];
    for (who, nonce, token, expected) in cases {
        controller.handle_request(
            ConnId(0),
            Timestamp(now),
            &registration(who, nonce, now, token),
        );
        assert_eq!(reply_code(&mut controller, now), expected);
    }
}

#[test]
fn three_hundred_changes_in_batches_and_every_member_converges_every_epoch() {
    let mut net = Net::new(60, 0.05);
    net.command(Command::Policy(
        "demo".into(),
        Some(("batch_interval_ms".into(), "500".into())),
    ));
    let mut changes = 0;
    for round in 0..30 {
        for k in 0..5 {
            let i = (round * 13 + k * 7) % net.members.len();
            if k % 2 == 0 {
                let id = net.member_id(i);
                net.command(Command::Evict("demo".into(), id));
                // The evicted member's agent is replaced by a new one.
                net.members[i].leave(net.now);
            } else {
                net.members[i].leave(net.now);
            }
            net.pump();
            let fresh = net.add_member();
            net.members.swap(i, fresh);
            net.members.pop();
            net.events.swap(i, fresh);
            net.events.pop();
            changes += 2;
        }
        net.advance(3_000, 250);
        assert_eq!(net.converged().len(), 60, "round {round}");
    }
    assert!(changes >= 300);
    let Response::Stats(stats) = net.command(Command::Stats("demo".into())) else {
        panic!()
    };
    assert!(
        stats.rekeys < 30 * 10,
        "changes were batched: {} rekeys",
        stats.rekeys
    );
}

/// The rekey datagrams the controller queues at `at`, after firing its timers.
fn rekeys_sent(controller: &mut StoreDriver<ChaCha20Rng>, at: u64) -> Vec<Vec<u8>> {
    controller.handle_timeout(Timestamp(at));
    let mut out = Vec::new();
    while let Some(t) = controller.poll_transmit() {
        if let Transmit::Multicast { bytes, .. } = t
            && wire::MessageType::peek(&bytes) == Ok(wire::MessageType::Rekey)
        {
            out.push(bytes);
        }
    }
    out
}

#[test]
fn repeat_sends_are_spaced_as_the_policy_says() {
    for spacing in [0u64, 100] {
        let mut net = Net::new(5, 0.0);
        let c = &mut net.controller;
        // Past the copies of the joins' rekeys.
        let t0 = net.now + 1_000;
        rekeys_sent(c, t0);
        for (key, value) in [("repeats", 3), ("repeat_spacing_ms", spacing)] {
            c.handle_command(
                Timestamp(t0),
                Command::Policy("demo".into(), Some((key.into(), value.to_string()))),
            )
            .unwrap();
        }
        c.handle_command(Timestamp(t0), Command::Rekey("demo".into()))
            .unwrap();
        let first = rekeys_sent(c, t0);
        assert!(!first.is_empty());
        let later: Vec<Vec<Vec<u8>>> = [99, 100, 199, 200, 1_000]
            .iter()
            .map(|dt| rekeys_sent(c, t0 + dt))
            .collect();
        if spacing == 0 {
            let n = first.len() / 3;
            assert_eq!(first.len(), 3 * n, "three copies at once");
            assert_eq!(first[..n], first[n..2 * n]);
            assert!(later.iter().all(Vec::is_empty), "nothing afterwards");
        } else {
            assert!(later[0].is_empty(), "no copy before the spacing");
            assert_eq!(later[1], first, "the second copy after 100 ms");
            assert!(later[2].is_empty());
            assert_eq!(later[3], first, "the third copy after 200 ms");
            assert!(later[4].is_empty(), "three copies in all");
        }
    }
}

/// The controller's view in brief: groups (epoch, members, pending changes) and the members
/// (id, identity, leaf, epoch joined; not the lease left, which the clock changes).
fn snapshot(net: &mut Net) -> (Response, Vec<(u64, String, u32, u64)>) {
    let Response::Members(members) = net.command(Command::Members("demo".into())) else {
        panic!("no member list")
    };
    let members = members
        .into_iter()
        .map(|m| (m.id, m.identity, m.leaf, m.joined))
        .collect();
    (net.command(Command::Groups), members)
}

#[test]
fn only_verified_registrations_reach_the_join_logic_and_bad_signatures_change_nothing() {
    let mut net = Net::new(3, 0.0);
    let before = snapshot(&mut net);
    let identity = SigningKey::from_bytes(&[11; 32]);
    let good = registration(&identity, [5; 16], net.now, b"");
    let mut bad_signature = good.clone();
    *bad_signature.last_mut().unwrap() ^= 1;
    let mut other_key = good.clone();
    // The HPKE key (after the 12-byte header, the 32-byte identity and the 2-byte KEM): a
    // substituted key, same signature.
    other_key[12 + 32 + 2] ^= 1;
    for forged in [bad_signature, other_key] {
        let inbound = verify_request(forged, &mut rng());
        assert_eq!(inbound, Inbound::Refused(Reject::BadSignature));
        net.controller
            .handle_inbound(ConnId(0), Timestamp(net.now), inbound);
        assert_eq!(reply_code(&mut net.controller, net.now), Some(401));
        let events: Vec<Event> = std::iter::from_fn(|| net.controller.poll_event()).collect();
        assert_eq!(
            events,
            vec![Event::Rejected {
                reason: Reject::BadSignature,
                at: net.now
            }],
            "counted as a rejection, nothing else"
        );
        net.advance(2_000, 100);
        assert_eq!(snapshot(&mut net), before, "no state changed");
    }
    // The same request, signature intact, is admitted: the refusals above were for the forgery.
    let Inbound::Registration(verified) = verify_request(good.clone(), &mut rng()) else {
        panic!("a well-signed registration did not verify")
    };
    assert_eq!(
        verified.request().identity,
        identity.verifying_key().to_bytes()
    );
    net.controller.handle_inbound(
        ConnId(0),
        Timestamp(net.now),
        Inbound::Registration(verified),
    );
    assert_eq!(reply_code(&mut net.controller, net.now), None, "welcomed");
    // Replayed through the split path too: refused, no churn.
    let (epoch, _) = net.controller.traffic_key(GROUP).unwrap();
    net.controller.handle_inbound(
        ConnId(0),
        Timestamp(net.now + 5),
        verify_request(good, &mut rng()),
    );
    assert_eq!(reply_code(&mut net.controller, net.now), Some(409));
    assert_eq!(net.controller.traffic_key(GROUP).unwrap().0, epoch);
}

#[test]
fn v046_a_forged_request_naming_a_current_member_is_answered_as_one_naming_nobody() {
    let mut net = Net::new(3, 0.0);
    let before = snapshot(&mut net);
    let (epoch, _) = net.controller.traffic_key(GROUP).unwrap();
    let forger = SigningKey::from_bytes(&[77; 32]);
    let mut answers = Vec::new();
    for (i, member) in [net.member_id(1), 999_999].into_iter().enumerate() {
        let forged = ResyncRequest {
            group: GROUP,
            member: wire::MemberId(member),
            epoch,
            kcv: lkh_tree::Kcv([0; lkh_tree::KCV_LEN]),
            timestamp_ms: net.now,
            nonce: [i as u8 + 1; 16],
            hpke_key: hpke_of(0),
        };
        let forged = wire::sign(&forged, &forger);
        net.controller
            .handle_request(ConnId(0), Timestamp(net.now), &forged);
        answers.push(reply_error(&mut net.controller, net.now));
    }
    assert_eq!(answers[0], Some((404, "NotAMember".to_owned())));
    assert_eq!(
        answers[0], answers[1],
        "the answer tells which member ids are in use"
    );
    // The operator still sees the forgery for what it is.
    let Response::Status { rejects, .. } = net.command(Command::Status) else {
        panic!("status");
    };
    assert_eq!(rejects.get(&Reject::BadSignature), Some(&1), "{rejects:?}");
    assert_eq!(rejects.get(&Reject::NotAMember), Some(&1), "{rejects:?}");
    assert_eq!(snapshot(&mut net), before, "no state changed");
}

/// The identity key of `Net`'s member `i` (its generator is seeded 1001 + i).
fn identity_of(i: u64) -> SigningKey {
    let mut seed = [0u8; 32];
    ChaCha20Rng::seed_from_u64(1001 + i).fill_bytes(&mut seed);
    SigningKey::from_bytes(&seed)
}

/// Member `i`'s HPKE public key, as `Net::add_member` drew it.
fn hpke_of(i: u64) -> wire::HpkePublicKey {
    let mut rng = ChaCha20Rng::seed_from_u64(1001 + i);
    rng.fill_bytes(&mut [0u8; 32]);
    HpkeSecret::generate(wire::Kem::XWing, &mut rng)
        .public_key()
        .unwrap()
}

#[test]
fn v047_a_resync_at_the_current_epoch_with_other_keys_gets_the_path_not_a_renewal() {
    let mut net = Net::new(3, 0.0);
    let (epoch, traffic) = net.controller.traffic_key(GROUP).unwrap();
    let member = wire::MemberId(net.member_id(0));
    let ask = |net: &mut Net, kcv: Kcv, nonce: u8| {
        let request = ResyncRequest {
            group: GROUP,
            member,
            epoch,
            kcv,
            timestamp_ms: net.now,
            nonce: [nonce; 16],
            hpke_key: hpke_of(0),
        };
        let bytes = wire::sign(&request, &identity_of(0));
        net.controller
            .handle_request(ConnId(0), Timestamp(net.now), &bytes);
        std::iter::from_fn(|| net.controller.poll_transmit()).find_map(|t| match t {
            Transmit::Reply { bytes, .. } => Some(wire::MessageType::peek(&bytes).unwrap()),
            Transmit::Multicast { .. } => None,
        })
    };
    // Holding this epoch's keys: renewed (an acknowledgement, no path).
    let renewed = ask(&mut net, traffic.check_value(), 1);
    assert_eq!(renewed, Some(wire::MessageType::Ack));
    // The same epoch number with other keys (before: "lease renewed" by the epoch alone).
    let other = ask(&mut net, Kcv([0xee; lkh_tree::KCV_LEN]), 2);
    assert_eq!(other, Some(wire::MessageType::ResyncResponse));
}

#[test]
fn v052_a_refused_registration_leaves_no_nonce_behind() {
    // Refused strangers fill no memory of the controller's: their nonces are not recorded (the
    // same nonce, now from a listed identity, is taken; before, it was refused as replayed).
    let listed = SigningKey::from_bytes(&[8; 32]);
    let stranger = SigningKey::from_bytes(&[9; 32]);
    let mut controller = restricted(&[&listed], &[]);
    let nonce = [77; 16];
    let refused = registration(&stranger, nonce, START, b"");
    assert_eq!(request_code(&mut controller, START, &refused), Some(403));
    let listed_request = registration(&listed, nonce, START, b"");
    assert_eq!(request_code(&mut controller, START, &listed_request), None);
    // An admitted registration's nonce is recorded: its replay is refused.
    assert_eq!(
        request_code(&mut controller, START + 1, &listed_request),
        Some(409)
    );
}

#[test]
fn v052_a_member_gets_one_resync_path_per_epoch_and_interval() {
    let mut net = Net::new(2, 0.0);
    let member = wire::MemberId(net.member_id(0));
    let behind = |nonce: u8, at: u64| {
        let request = ResyncRequest {
            group: GROUP,
            member,
            epoch: lkh_tree::Epoch(0),
            kcv: Kcv([0; lkh_tree::KCV_LEN]),
            timestamp_ms: at,
            nonce: [nonce; 16],
            hpke_key: hpke_of(0),
        };
        wire::sign(&request, &identity_of(0))
    };
    let now = net.now;
    let kind = |net: &mut Net, at: u64, bytes: &[u8]| {
        net.controller
            .handle_request(ConnId(0), Timestamp(at), bytes);
        std::iter::from_fn(|| net.controller.poll_transmit()).find_map(|t| match t {
            Transmit::Reply { bytes, .. } => Some(bytes),
            Transmit::Multicast { .. } => None,
        })
    };
    let first = kind(&mut net, now, &behind(1, now)).unwrap();
    assert_eq!(
        wire::MessageType::peek(&first),
        Ok(wire::MessageType::ResyncResponse)
    );
    // Again at once (each path is an HPKE seal): refused, 429.
    let again = kind(&mut net, now + 10, &behind(2, now + 10)).unwrap();
    let refused = <wire::ErrorMessage as wire::Codec>::decode_exact(&again).unwrap();
    assert_eq!(refused.status, wire::Status::RateLimited);
    // A new epoch since its last path: sent at once (it lost two rekeys in a row).
    net.controller
        .handle_command(Timestamp(now + 20), Command::Rekey("demo".into()))
        .unwrap();
    let moved = kind(&mut net, now + 30, &behind(4, now + 30)).unwrap();
    assert_eq!(
        wire::MessageType::peek(&moved),
        Ok(wire::MessageType::ResyncResponse)
    );
    let later = now + 30 + gkm_server::RESYNC_INTERVAL_MS;
    let third = kind(&mut net, later, &behind(3, later)).unwrap();
    // (After the interval, a path of the same epoch again.)
    assert_eq!(
        wire::MessageType::peek(&third),
        Ok(wire::MessageType::ResyncResponse)
    );
}

#[test]
fn v050_fan_out_goes_only_to_an_address_that_echoed_its_cookie_one_per_member() {
    let mut net = Net::new(12, 0.0);
    let now = Timestamp(net.now);
    let ids: Vec<wire::MemberId> = (0..12).map(|i| wire::MemberId(net.member_id(i))).collect();
    let ask = |i: usize, nonce: u8, cookie: Option<wire::Cookie>, at: Timestamp| {
        let request = wire::Subscribe {
            group: GROUP,
            member: ids[i],
            timestamp_ms: at.0,
            nonce: [nonce; 16],
            cookie,
        };
        wire::sign(&request, &identity_of(i as u64))
    };
    let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    let (a, b, c) = (
        at("192.0.2.1:5000"),
        at("192.0.2.2:5000"),
        at("192.0.2.3:6000"),
    );
    let cookie_of = |outcome: Result<Subscription, Reject>| match outcome {
        Ok(Subscription::Cookie(reply)) => {
            <wire::CookieReply as wire::Codec>::decode_exact(&reply)
                .unwrap()
                .cookie
        }
        other => panic!("no cookie: {other:?}"),
    };
    // Asked from a: a cookie for a, smaller than the request; a gets nothing else.
    let request = ask(0, 1, None, now);
    let outcome = net.controller.handle_subscription(now, a, &request);
    let Ok(Subscription::Cookie(reply)) = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        reply.len() * 2 < request.len(),
        "{} vs {}",
        reply.len(),
        request.len()
    );
    let cookie = cookie_of(outcome);
    assert!(net.controller.fanout_addresses(GROUP, now).is_empty());
    // a's cookie echoed from b (a spoofer naming b): refused; from a: a is confirmed.
    let from_b = net
        .controller
        .handle_subscription(now, b, &ask(0, 2, Some(cookie), now));
    assert_eq!(from_b, Err(Reject::BadCookie));
    assert!(net.controller.fanout_addresses(GROUP, now).is_empty());
    // Another member cannot use it either, nor can it be replayed.
    let other = net
        .controller
        .handle_subscription(now, a, &ask(1, 3, Some(cookie), now));
    assert_eq!(other, Err(Reject::BadCookie));
    let confirm = ask(0, 4, Some(cookie), now);
    let confirmed = net.controller.handle_subscription(now, a, &confirm);
    assert_eq!(
        confirmed,
        Ok(Subscription::Confirmed {
            group: GROUP,
            member: ids[0]
        })
    );
    assert_eq!(net.controller.fanout_addresses(GROUP, now), vec![a]);
    assert_eq!(
        net.controller.handle_subscription(now, a, &confirm),
        Err(Reject::Replayed)
    );
    // One cookie per member a second.
    let again = net
        .controller
        .handle_subscription(now, c, &ask(0, 5, None, now));
    assert_eq!(again, Err(Reject::RateLimited));
    // A new confirmed address replaces the old: one address per member.
    let later = Timestamp(now.0 + 1_500);
    let cookie = cookie_of(
        net.controller
            .handle_subscription(later, c, &ask(0, 6, None, later)),
    );
    let moved = net
        .controller
        .handle_subscription(later, c, &ask(0, 7, Some(cookie), later));
    assert!(moved.is_ok(), "{moved:?}");
    assert_eq!(net.controller.fanout_addresses(GROUP, later), vec![c]);
    // One source gets SOURCE_BUDGET cookies a second, whatever the members.
    let source = at("198.51.100.7:7000");
    let granted = (1..12)
        .filter(|&i| {
            let outcome = net.controller.handle_subscription(
                later,
                source,
                &ask(i, 100 + i as u8, None, later),
            );
            outcome.is_ok()
        })
        .count();
    assert_eq!(granted, gkm_server::SOURCE_BUDGET as usize);
    // A departed member's address is dropped.
    net.command(Command::Evict("demo".into(), ids[0].0));
    net.controller.handle_timeout(Timestamp(net.now));
    assert!(net.controller.fanout_addresses(GROUP, later).is_empty());
}

#[test]
fn v051_only_verified_datagrams_keep_a_member_off_fan_out() {
    let mut net = Net::new(2, 0.0);
    let (epoch, traffic) = net.members[0].traffic_key().unwrap();
    // Forged heartbeats that look in step (the member's epoch and check value), every 200 ms,
    // and nothing real (the controller's multicast is lost): the member still moves to fan-out
    // when its silence runs out. Before, any datagram with the group's header reset the timer.
    let forged = wire::Heartbeat {
        group: GROUP,
        epoch,
        kcv: traffic.check_value(),
        timestamp_ms: net.now,
    };
    let forged = wire::sign(&forged, &SigningKey::from_bytes(&[66; 32]));
    let start = net.now;
    let after = net.members[0].config().fanout_after_ms.unwrap();
    let mut switched = None;
    for step in 1..=(2 * after / 200) {
        let now = start + step * 200;
        net.members[0].handle_datagram(now, &forged);
        net.members[0].handle_timeout(now);
        if std::iter::from_fn(|| net.members[0].poll_event())
            .any(|e| e == MemberEvent::FanoutStarted)
        {
            switched = Some(now - start);
            break;
        }
    }
    let switched = switched.expect("forged heartbeats kept the member on multicast");
    assert!(switched <= after + 200, "switched after {switched} ms");
    assert!(net.members[0].on_fanout());
    // On fan-out it subscribes: a signed subscription for the controller's UDP port.
    net.members[0].handle_timeout(start + switched);
    let datagram = net.members[0].poll_datagram().expect("a subscription");
    assert_eq!(
        wire::MessageType::peek(&datagram),
        Ok(wire::MessageType::Subscribe)
    );
}

#[test]
fn member_signed_and_unexpected_requests_are_left_to_the_controller_or_refused() {
    let heartbeat = wire::Heartbeat {
        group: GROUP,
        epoch: lkh_tree::Epoch(1),
        kcv: lkh_tree::Kcv([0; lkh_tree::KCV_LEN]),
        timestamp_ms: START,
    };
    let signed = wire::sign(&heartbeat, &SigningKey::from_bytes(&[1; 32]));
    assert_eq!(
        verify_request(signed, &mut rng()),
        Inbound::Refused(Reject::UnexpectedMessage)
    );
    assert_eq!(
        verify_request(b"GK\x01".to_vec(), &mut rng()),
        Inbound::Refused(Reject::Malformed)
    );
    let leave = wire::LeaveRequest {
        group: GROUP,
        member: wire::MemberId(3),
        timestamp_ms: START,
        nonce: [0; 16],
    };
    let bytes = wire::sign(&leave, &SigningKey::from_bytes(&[1; 32]));
    assert!(matches!(
        verify_request(bytes, &mut rng()),
        Inbound::MemberSigned(_)
    ));
}

#[test]
fn v038_a_registration_captured_before_a_restart_is_refused_after_it() {
    let mut net = Net::new(3, 0.0);
    let identity = SigningKey::from_bytes(&[9; 32]);
    let request = registration(&identity, [3; 16], net.now, b"");
    assert_eq!(
        request_code(&mut net.controller, net.now, &request),
        None,
        "welcomed"
    );
    net.advance(1_000, 250);
    net.restart(77);
    net.advance(1_000, 250);
    let before = snapshot(&mut net);
    let (epoch, _) = net.controller.traffic_key(GROUP).unwrap();
    // Within the freshness window, but made before the restart: its nonce is forgotten.
    assert_eq!(
        request_code(&mut net.controller, net.now, &request),
        Some(409),
        "refused as stale"
    );
    net.advance(1_000, 250);
    assert_eq!(net.controller.traffic_key(GROUP).unwrap().0, epoch);
    assert_eq!(snapshot(&mut net), before, "nothing changed");
    // A request made after the restart is taken.
    let fresh = registration(&identity, [4; 16], net.now, b"");
    assert_eq!(
        request_code(&mut net.controller, net.now, &fresh),
        None,
        "a fresh one is welcomed"
    );
}

#[test]
fn a_burst_of_changes_handled_before_the_timers_fire_is_one_rekey() {
    let mut net = Net::new(4, 0.0);
    let (epoch, _) = net.controller.traffic_key(GROUP).unwrap();
    for k in 0..3u8 {
        let identity = SigningKey::from_bytes(&[20 + k; 32]);
        let request = registration(&identity, [k; 16], net.now, b"");
        net.controller
            .handle_request(ConnId(100), Timestamp(net.now), &request);
    }
    let victim = net.member_id(0);
    net.command(Command::Evict("demo".into(), victim));
    assert_eq!(
        net.controller.traffic_key(GROUP).unwrap().0,
        epoch,
        "nothing is rekeyed inside handle_*"
    );
    assert_eq!(
        net.controller.poll_timeout(),
        Some(Timestamp(net.now)),
        "the rekey is due at once"
    );
    net.controller.handle_timeout(Timestamp(net.now));
    assert_eq!(net.controller.traffic_key(GROUP).unwrap().0.0, epoch.0 + 1);
    let welcomes = std::iter::from_fn(|| net.controller.poll_transmit())
        .filter(|t| {
            matches!(t, Transmit::Reply { bytes, .. }
                if wire::MessageType::peek(bytes) == Ok(wire::MessageType::Welcome))
        })
        .count();
    assert_eq!(welcomes, 3, "the one rekey admitted all three");
    let events: Vec<Event> = std::iter::from_fn(|| net.controller.poll_event()).collect();
    assert!(events.contains(&Event::Departed {
        group: GROUP.0,
        member: victim,
        reason: gkm_server::DepartReason::Evicted,
        epoch: epoch.0 + 1,
        at: net.now,
    }));
}

#[test]
fn a_member_registering_again_with_its_keys_gets_its_path_and_nobody_is_rekeyed() {
    let mut net = Net::new(2, 0.0);
    let identity = SigningKey::from_bytes(&[30; 32]);
    // `registration` derives the HPKE key from the timestamp: same time, same key.
    let first = registration(&identity, [1; 16], net.now, b"");
    assert_eq!(request_code(&mut net.controller, net.now, &first), None);
    while net.controller.poll_event().is_some() {}
    let (epoch, _) = net.controller.traffic_key(GROUP).unwrap();
    // Its welcome was lost, so it asks again with the same keys.
    let again = registration(&identity, [2; 16], net.now, b"");
    assert_eq!(
        request_code(&mut net.controller, net.now, &again),
        None,
        "welcomed"
    );
    assert_eq!(net.controller.traffic_key(GROUP).unwrap().0, epoch);
    assert!(
        net.controller.poll_timeout().is_some_and(|t| t.0 > net.now),
        "no rekey is pending"
    );
    let events: Vec<Event> = std::iter::from_fn(|| net.controller.poll_event()).collect();
    assert!(
        matches!(events.as_slice(), [Event::Rewelcomed { epoch: e, .. }] if *e == epoch.0),
        "{events:?}"
    );
    // With a new HPKE key it lost its keys: a new leaf, and the old one departs.
    let lost = registration(&identity, [3; 16], net.now + 1, b"");
    assert_eq!(request_code(&mut net.controller, net.now + 1, &lost), None);
    assert_eq!(net.controller.traffic_key(GROUP).unwrap().0.0, epoch.0 + 1);
    let events: Vec<Event> = std::iter::from_fn(|| net.controller.poll_event()).collect();
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Departed {
            reason: gkm_server::DepartReason::Replaced,
            ..
        }
    )));
}

#[test]
fn a_member_whose_eviction_is_pending_must_be_authorized_to_register_again() {
    let now = START;
    let mut controller = restricted(&[], &[b"once"]);
    let identity = SigningKey::from_bytes(&[31; 32]);
    let request = registration(&identity, [1; 16], now, b"once");
    assert_eq!(
        request_code(&mut controller, now, &request),
        None,
        "admitted"
    );
    let Ok(Response::Members(members)) =
        controller.handle_command(Timestamp(now), Command::Members("demo".into()))
    else {
        panic!("no member list")
    };
    let set = Some(("batch_interval_ms".to_owned(), "1000".to_owned()));
    controller
        .handle_command(Timestamp(now), Command::Policy("demo".into(), set))
        .unwrap();
    controller
        .handle_command(Timestamp(now), Command::Evict("demo".into(), members[0].id))
        .unwrap();
    // Same identity, same keys, while the eviction waits for its batch: the token is spent.
    let again = registration(&identity, [2; 16], now, b"once");
    assert_eq!(request_code(&mut controller, now, &again), Some(403));
}

#[test]
fn unanswered_and_refused_requests_back_off_with_jitter_and_an_answer_resets_the_backoff() {
    let signer = SigningKey::from_bytes(&[42; 32]);
    let mut config = MemberConfig::new(GROUP, signer.verifying_key());
    config.retry_ms = 1_000;
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let hpke = HpkeSecret::generate(wire::Kem::XWing, &mut rng);
    let identity = SigningKey::from_bytes(&[32; 32]);
    let mut member = Member::new(config, identity, hpke, rng, START);
    assert!(member.poll_request().is_some());
    let mut now = START;
    let mut gaps = Vec::new();
    for _ in 0..8 {
        let due = member.poll_timeout().unwrap();
        gaps.push(due - now);
        now = due;
        member.handle_timeout(now);
        assert!(member.poll_request().is_some(), "asked again");
    }
    let base = |k: usize| 1_000u64 << k.min(4);
    for (k, gap) in gaps.iter().enumerate() {
        assert!(
            (base(k)..=base(k) * 3 / 2).contains(gap),
            "retry {k} after {gap} ms"
        );
    }
    assert!(
        gaps.iter().enumerate().any(|(k, gap)| *gap != base(k)),
        "jittered: {gaps:?}"
    );
    let refusal = wire::ErrorMessage {
        group: GROUP,
        status: wire::Status::Unavailable,
        reason: "busy".into(),
    };
    member.handle_reply(now, &wire::Codec::to_bytes(&refusal));
    let gap = member.poll_timeout().unwrap() - now;
    assert!((1_000..=1_500).contains(&gap), "after an answer: {gap} ms");
    // Refused again and again, it asks less and less often, and says when it asks next.
    for k in 1..7 {
        now = member.poll_timeout().unwrap();
        member.handle_timeout(now);
        assert!(member.poll_request().is_some());
        member.handle_reply(now, &wire::Codec::to_bytes(&refusal));
        let gap = member.poll_timeout().unwrap() - now;
        assert!(
            (base(k)..=base(k) * 3 / 2).contains(&gap),
            "refusal {k}: {gap} ms"
        );
        let said = std::iter::from_fn(|| member.poll_event()).last();
        assert!(
            matches!(said, Some(MemberEvent::Refused { retry_in_ms, .. }) if retry_in_ms == gap),
            "{said:?}"
        );
    }
}

#[test]
fn a_retry_while_the_first_request_waits_for_its_batch_replaces_it() {
    let mut net = Net::new(2, 0.0);
    let set = Some(("batch_interval_ms".to_owned(), "1000".to_owned()));
    net.command(Command::Policy("demo".into(), set));
    let (epoch, _) = net.controller.traffic_key(GROUP).unwrap();
    let identity = SigningKey::from_bytes(&[33; 32]);
    for (conn, nonce) in [(100, [1; 16]), (101, [2; 16])] {
        let request = registration(&identity, nonce, net.now, b"");
        net.controller
            .handle_request(ConnId(conn), Timestamp(net.now), &request);
    }
    net.controller.handle_timeout(Timestamp(net.now + 1_000));
    assert_eq!(net.controller.traffic_key(GROUP).unwrap().0.0, epoch.0 + 1);
    let welcomed: Vec<u64> = std::iter::from_fn(|| net.controller.poll_transmit())
        .filter_map(|t| match t {
            Transmit::Reply { conn, bytes }
                if wire::MessageType::peek(&bytes) == Ok(wire::MessageType::Welcome) =>
            {
                Some(conn.0)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        welcomed,
        vec![101],
        "one join, answered on the newer request"
    );
    let Response::Members(members) = net.command(Command::Members("demo".into())) else {
        panic!("no member list")
    };
    assert_eq!(members.len(), 3);
}

/// GKM-V056: a member of a group its controller no longer has is told so with its own status
/// (410, not the 404 of a departed member) and stops, instead of registering again forever.
#[test]
fn v056_a_member_of_a_removed_group_is_told_and_stops_asking() {
    let mut net = Net::new(3, 0.0);
    // The controller starts again without the group (an operator removed it from the config).
    net.controller = StoreDriver::new(
        Controller::new(
            net.signer.clone(),
            ChaCha20Rng::seed_from_u64(5),
            vec![GroupPolicy::new("other", GroupId(2))],
            vec![],
            Timestamp(net.now),
        )
        .unwrap(),
        Box::new(MemoryStore::default()),
    );
    for m in &mut net.members {
        m.check_in(net.now);
    }
    net.advance(5_000, 250);
    for (i, events) in net.events.iter().enumerate() {
        assert!(
            events
                .iter()
                .any(|e| matches!(e, MemberEvent::GroupUnknown { .. })),
            "member {i}: {events:?}"
        );
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, MemberEvent::MembershipEnded { .. })),
            "member {i} took it for a departure"
        );
    }
    // Stopped: nothing more is asked, however long one waits.
    for m in &mut net.members {
        assert!(m.poll_request().is_none());
        m.handle_timeout(net.now + 3_600_000);
        assert!(m.poll_request().is_none(), "a stopped member asked again");
        assert!(m.traffic_key().is_none());
    }
}

/// GKM-V056: a renewal is acknowledged by an `Ack` naming the member, the request's nonce and
/// the epoch (before: an error message with code 0); an acknowledgement of another request is
/// dropped and changes nothing.
#[test]
fn v056_a_renewal_is_acknowledged_by_an_ack_of_its_own_request() {
    let mut net = Net::new(2, 0.0);
    let id = net.member_id(0);
    net.members[0].check_in(net.now);
    net.advance(3_000, 250);
    let request = loop {
        net.members[0].handle_timeout(net.now);
        if let Some(r) = net.members[0].poll_request() {
            break r;
        }
        net.now += 1_000;
    };
    net.controller
        .handle_request(ConnId(0), Timestamp(net.now), &request);
    let reply = std::iter::from_fn(|| net.controller.poll_transmit())
        .find_map(|t| match t {
            Transmit::Reply { bytes, .. } => Some(bytes),
            Transmit::Multicast { .. } => None,
        })
        .unwrap();
    let ack = <wire::Ack as wire::Codec>::decode_exact(&reply).unwrap();
    assert_eq!(ack.member, wire::MemberId(id));
    assert_eq!(ack.acked, wire::Acked::LeaseRenewed);
    assert_eq!(ack.epoch, net.controller.traffic_key(GROUP).unwrap().0);
    // Another request's acknowledgement is dropped: the member still waits for its own.
    let mut other = ack.clone();
    other.request_nonce = [0xee; 16];
    let dropped = net.members[0].stats().dropped.values().sum::<u64>();
    net.members[0].handle_reply(net.now, &wire::Codec::to_bytes(&other));
    assert_eq!(
        net.members[0].stats().dropped.values().sum::<u64>(),
        dropped + 1
    );
    net.members[0].handle_reply(net.now, &reply);
    // Renewed: heartbeats keep arriving and the member asks nothing until its renewal interval
    // (10 s); an unanswered request would be asked again within about a second.
    let start = net.now;
    while net.now < start + 8_000 {
        net.now += 250;
        net.controller.handle_timeout(Timestamp(net.now));
        while let Some(t) = net.controller.poll_transmit() {
            if let Transmit::Multicast { bytes, .. } = t {
                net.members[0].handle_datagram(net.now, &bytes);
            }
        }
        net.members[0].handle_timeout(net.now);
        assert!(
            net.members[0].poll_request().is_none(),
            "asked again {} ms after the acknowledgement",
            net.now - start
        );
    }
}

/// GKM-V058: a member-signed request checked off the controller's thread (the controller names
/// the key, `MemberSigned::check` verifies under it) is not verified again on the controller's
/// thread: forged requests naming a real member cost it a lookup, not a signature check; they
/// are still refused as naming no member and counted as bad signatures, and genuine ones go
/// through.
#[test]
fn v058_member_signatures_checked_off_the_controller_thread_are_not_verified_again() {
    let mut net = Net::new(3, 0.0);
    let id = net.member_id(0);
    let (epoch, key) = net.controller.traffic_key(GROUP).unwrap();
    let stranger = SigningKey::from_bytes(&[77; 32]);
    let checked = |net: &Net, bytes: Vec<u8>| {
        let gkm_server::Inbound::MemberSigned(signed) = verify_request(bytes, &mut rng()) else {
            panic!("a resync is member-signed");
        };
        let identity = net.controller.signer_of(&signed);
        gkm_server::Inbound::MemberSigned(signed.check(identity))
    };
    let before = net.controller.signatures_verified();
    for k in 0..50_u8 {
        let forged = ResyncRequest {
            group: GROUP,
            member: wire::MemberId(id),
            epoch,
            kcv: key.check_value(),
            timestamp_ms: net.now,
            nonce: [k; 16],
            hpke_key: hpke_of(0),
        };
        let inbound = checked(&net, wire::sign(&forged, &stranger));
        net.controller
            .handle_inbound(ConnId(100), Timestamp(net.now), inbound);
        let Some(Transmit::Reply { bytes, .. }) = net.controller.poll_transmit() else {
            panic!("a forged request is answered");
        };
        let error = <wire::ErrorMessage as wire::Codec>::decode_exact(&bytes).unwrap();
        assert_eq!(error.status, wire::Status::NotAMember);
    }
    assert_eq!(net.controller.signatures_verified(), before);
    let Response::Status { rejects, .. } = net.command(Command::Status) else {
        panic!("status");
    };
    assert_eq!(rejects.get(&Reject::BadSignature), Some(&50));
    // The member's own request, checked the same way, is acknowledged; none verified here.
    let genuine = ResyncRequest {
        group: GROUP,
        member: wire::MemberId(id),
        epoch,
        kcv: key.check_value(),
        timestamp_ms: net.now,
        nonce: [200; 16],
        hpke_key: hpke_of(0),
    };
    // Member 0's identity key, as `Net::add_member` drew it.
    let mut seed = [0u8; 32];
    ChaCha20Rng::seed_from_u64(1001).fill_bytes(&mut seed);
    let inbound = checked(&net, wire::sign(&genuine, &SigningKey::from_bytes(&seed)));
    net.controller
        .handle_inbound(ConnId(101), Timestamp(net.now), inbound);
    let Some(Transmit::Reply { bytes: reply, .. }) = net.controller.poll_transmit() else {
        panic!("a genuine request is answered");
    };
    assert!(<wire::Ack as wire::Codec>::decode_exact(&reply).is_ok());
    assert_eq!(net.controller.signatures_verified(), before);
}

/// GKM-V058: forged fan-out subscriptions are admitted for a signature check (off the
/// controller's thread) only within their source's budget (8 a second) or with a cookie that is
/// this controller's for their address; the rest are dropped without one. An admitted forgery is
/// refused; the member's own subscription still gets its cookie.
#[test]
fn v058_subscriptions_are_admitted_for_a_signature_check_within_their_sources_budget() {
    let mut net = Net::new(2, 0.0);
    let id = net.member_id(0);
    let from: std::net::SocketAddr = "192.0.2.9:4000".parse().unwrap();
    let stranger = SigningKey::from_bytes(&[55; 32]);
    let forged = |k: u8, cookie: Option<wire::Cookie>, now: u64| {
        let request = wire::Subscribe {
            group: GROUP,
            member: wire::MemberId(id),
            timestamp_ms: now,
            nonce: [k; 16],
            cookie,
        };
        gkm_server::MemberSigned::subscription(wire::sign(&request, &stranger))
    };
    let now = Timestamp(net.now);
    let admitted = (0..100_u8)
        .filter(|&k| {
            let mut signed = forged(k, None, now.0);
            net.controller
                .admit_subscription(now, from, &mut signed)
                .is_some()
        })
        .count();
    assert_eq!(admitted, 8, "the source's budget in a second");
    let cookie = wire::Cookie {
        issued_ms: now.0,
        mac: [0; 16],
    };
    let later = Timestamp(net.now + 1_000);
    let mut bad_cookie = forged(200, Some(cookie), later.0);
    assert!(
        net.controller
            .admit_subscription(later, from, &mut bad_cookie)
            .is_none(),
        "a cookie not this controller's admits nothing"
    );
    // An admitted forgery, checked off the thread, is refused; nothing verified on it.
    let mut signed = forged(201, None, later.0);
    let identity = net.controller.admit_subscription(later, from, &mut signed);
    assert!(identity.is_some());
    let before = net.controller.signatures_verified();
    let outcome = net
        .controller
        .handle_checked_subscription(later, from, signed.check(identity));
    assert!(outcome.is_err(), "{outcome:?}");
    assert_eq!(net.controller.signatures_verified(), before);
}

/// Evicts member `victim` and returns the rekey's datagrams (nothing delivered yet).
fn eviction_datagrams(net: &mut Net, victim: usize) -> Vec<Vec<u8>> {
    let id = net.member_id(victim);
    net.command(Command::Evict("demo".into(), id));
    rekeys_sent(&mut net.controller, net.now)
}

/// Issue 15 (resync storms): a member that missed epoch E and hears E+1 holds E+1; when E's
/// repeat arrives it applies both, in order, and asks for no resync. Once the hold (the resync
/// grace) has run out, a late copy of E no longer brings E+1 back: the member resyncs.
#[test]
fn a_member_that_missed_an_epoch_holds_the_next_until_the_repeat_arrives() {
    for late in [false, true] {
        let mut net = Net::new(8, 0.0);
        assert_eq!(net.converged().len(), 8);
        let first = eviction_datagrams(&mut net, 7);
        let second = eviction_datagrams(&mut net, 6);
        assert!(!first.is_empty() && !second.is_empty());
        let now = net.now;
        // Member 0 hears the second rekey first (the first one's copy was lost)...
        for bytes in &second {
            net.members[0].handle_datagram(now, bytes);
        }
        let before = net.members[0].traffic_key().unwrap().0;
        // ... then the first one's repeat, in time or after the hold ran out.
        let at = if late {
            let after = now + MemberConfig::new(GROUP, net.signer.verifying_key()).resync_grace_ms;
            net.members[0].handle_timeout(after);
            after
        } else {
            now + 100
        };
        for bytes in &first {
            net.members[0].handle_datagram(at, bytes);
        }
        let (epoch, key) = net.members[0].traffic_key().unwrap();
        let (current, want) = net.controller.traffic_key(GROUP).unwrap();
        let asked = net.members[0].poll_request();
        if late {
            assert!(epoch < current, "the held rekey ran out");
            let asked = asked.expect("a resync");
            assert_eq!(
                wire::MessageType::peek(&asked),
                Ok(wire::MessageType::ResyncRequest)
            );
        } else {
            assert!(epoch > before, "both applied");
            assert_eq!((epoch, key.as_bytes()), (current, want.as_bytes()));
            assert!(asked.is_none(), "no resync asked for");
            assert_eq!(net.members[0].stats().resyncs, 0);
        }
    }
}

/// Issue 15 (resync storms): a lease renewal that races a rekey (the member's epoch is the one
/// before, the rekey's copies are still being sent) is acknowledged instead of answered with a
/// sealed path; the datagram then brings the member up. A renewal from a member that missed an
/// epoch whose copies are all sent gets the path.
#[test]
fn a_renewal_racing_a_rekey_is_acknowledged_and_one_long_behind_gets_the_path() {
    for racing in [true, false] {
        let mut net = Net::new(6, 0.0);
        // The members renew every 10 s from their admission at START.
        let renewal_at = START + 10_000;
        net.advance(if racing { 9_950 } else { 9_000 }, 50);
        let rekey = eviction_datagrams(&mut net, 5);
        net.now = renewal_at;
        net.members[0].handle_timeout(renewal_at);
        let renewal = net.members[0].poll_request().expect("a renewal");
        net.controller
            .handle_request(ConnId(0), Timestamp(renewal_at), &renewal);
        let mut replies = Vec::new();
        while let Some(t) = net.controller.poll_transmit() {
            if let Transmit::Reply { conn, bytes } = t
                && conn == ConnId(0)
            {
                replies.push(bytes);
            }
        }
        assert_eq!(replies.len(), 1);
        let kind = wire::MessageType::peek(&replies[0]).unwrap();
        net.members[0].handle_reply(renewal_at, &replies[0]);
        if racing {
            assert_eq!(kind, wire::MessageType::Ack, "acknowledged");
            for bytes in &rekey {
                net.members[0].handle_datagram(renewal_at + 20, bytes);
            }
            assert_eq!(net.members[0].stats().resyncs, 0);
        } else {
            assert_eq!(kind, wire::MessageType::ResyncResponse, "the path");
            assert_eq!(net.members[0].stats().resyncs, 1);
        }
        assert!(net.converged().contains(&0), "racing {racing}");
    }
}

/// Issue 15: a member drops the datagrams of the next epoch that serve other members before
/// checking their signatures, so it checks one signature per rekey however many datagrams the
/// rekey takes.
#[test]
fn each_member_checks_one_signature_per_rekey() {
    // 1,024 members: a one-way eviction (15 wraps) takes two datagrams at the smallest MTU.
    let mut net = Net::new(1_024, 0.0);
    net.command(Command::Policy(
        "demo".into(),
        Some(("mtu".into(), "576".into())),
    ));
    let victims = [63, 40, 17];
    let before: Vec<(u64, u64)> = net
        .members
        .iter()
        .map(|m| (m.stats().verified, m.stats().applied))
        .collect();
    let mut most = 0;
    for victim in victims {
        let rekey = eviction_datagrams(&mut net, victim);
        most = most.max(rekey.len());
        for bytes in &rekey {
            for m in &mut net.members {
                m.handle_datagram(net.now, bytes);
            }
        }
        net.pump();
    }
    assert!(most >= 2, "a rekey of several datagrams ({most})");
    for (i, m) in net.members.iter().enumerate() {
        if victims.contains(&i) {
            continue;
        }
        let (verified, applied) = (
            m.stats().verified - before[i].0,
            m.stats().applied - before[i].1,
        );
        assert_eq!(applied, victims.len() as u64, "member {i}");
        assert_eq!(verified, applied, "member {i}: one signature per rekey");
    }
    assert_eq!(net.converged().len(), 1_024 - victims.len());
}

/// Issue 15: a datagram of another wire version (a controller of another release) is dropped
/// without touching the member's keys, and the member says so once, with the version.
#[test]
fn a_datagram_of_another_wire_version_is_dropped_and_told_once() {
    let mut net = Net::new(8, 0.0);
    let rekey = eviction_datagrams(&mut net, 7);
    let mut old = rekey[0].clone();
    old[2] = wire::VERSION - 1;
    let member = &mut net.members[0];
    while member.poll_event().is_some() {}
    let before = member.traffic_key().expect("a member").0;
    for _ in 0..3 {
        member.handle_datagram(net.now, &old);
    }
    let told: Vec<MemberEvent> = std::iter::from_fn(|| member.poll_event()).collect();
    assert!(
        matches!(told.as_slice(), [MemberEvent::OtherWireVersion { version }] if *version == wire::VERSION - 1),
        "{told:?}"
    );
    assert_eq!(member.stats().dropped.get("other wire version"), Some(&3));
    assert_eq!(member.traffic_key().expect("a member").0, before);
    // The datagram of this version still applies.
    member.handle_datagram(net.now, &rekey[0]);
    assert!(member.traffic_key().expect("a member").0 > before);
}

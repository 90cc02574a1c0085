//! # gkm-member: the member agent
//!
//! [`Member`] is a group member's protocol logic as a sans-I/O state machine: it registers, applies
//! verified rekeys, notices when it fell behind and resyncs, renews its lease, re-registers when
//! its membership ended, and leaves. It never touches a socket, a clock or the OS random source.
//!
//! ```text
//! driver loop:  reply to a request ──► handle_reply(now, bytes)
//!               no reply (refused,  ──► handle_unreachable(now)  (the driver asks the next
//!                 reset, timed out)                                controller from now on)
//!               multicast datagram ──► handle_datagram(now, bytes)
//!               timer fired        ──► handle_timeout(now)
//!               then drain         ◄── poll_request()   (bytes to send to the controller)
//!                                  ◄── poll_event()     (joined, key changed, evicted, ...)
//!               sleep until        ◄── poll_timeout()
//! ```
//!
//! Every datagram goes raw → authentic (Ed25519 under the controller's key) → fresh (the next
//! epoch of its group) → applied; anything else is counted and dropped and changes nothing. The
//! controller's key starts as the one pinned and follows the group's signed announcements
//! ([`signing_keys::SigningKeys`]); a member that cannot verify what its group sends asks for
//! the chain of announcements, and stops when the controller no longer keeps the link from its
//! key ([`MemberEvent::SigningKeyUnknown`]).
//!
//! With several controllers (high availability), one leads each group and the others answer
//! [`Status::NotLeader`]; the member keeps its membership and keys, says so
//! ([`MemberEvent::NotLeader`]) and asks again promptly, and its driver asks the leader or the
//! next controller ([`controllers::Controllers`]). A controller that does not answer at all is
//! reported by the driver ([`Member::handle_unreachable`]) and handled the same way.
//!
//! [`data_keys::KeySchedule`] is the agent's other decision, also without I/O: which traffic key
//! its applications send with and which they accept around a rekey (activation and deactivation
//! delays).
//!
//! What it does not do: sockets, files, the local API socket (see the binary).

#![forbid(unsafe_code)]

pub mod catch_up;
pub mod cli;
pub mod controllers;
pub mod data_keys;
pub mod signing_keys;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use ed25519_dalek::{SigningKey, VerifyingKey};
use lkh_tree::{Epoch, GroupId, Kcv, MemberPath, TrafficKey};
use rand_core::CryptoRng;
use wire::{
    Ack, Acked, AuthenticRekey, Cookie, CookieReply, ErrorMessage, FreshRekey, Heartbeat, HeldPath,
    HpkePublicKey, HpkeSecret, Kem, KeyChain, KeyChainRequest, LeaveRequest, MemberId, MessageType,
    NONCE_LEN, RegistrationRequest, RekeyDatagram, ResyncRequest, SealedKind, SealedPath, Status,
    Subscribe, WireError, open_path, sign,
};

use signing_keys::{NotTaken, SigningKeys};

/// Milliseconds since the Unix epoch, as the driver's clock reads them.
pub type Millis = u64;

/// A member redirected ([`Status::NotLeader`], or a controller its driver could not reach)
/// retries promptly until every controller it knows ([`MemberConfig::controllers`]) redirected
/// it this many times in a row; from then on it backs off as after any refusal, so that a
/// cluster without a leader is not hammered.
pub const REDIRECT_ROUNDS: u32 = 3;

/// A member's fixed parameters.
#[derive(Clone, Debug)]
pub struct MemberConfig {
    /// The group to join.
    pub group: GroupId,
    /// The controller's Ed25519 public key as the operator pinned it (the group's signing keys
    /// are followed from it).
    pub controller: VerifyingKey,
    /// An enrollment token, if the group needs one.
    pub token: Vec<u8>,
    /// How often to renew the lease.
    pub renew_interval_ms: u64,
    /// How long to wait for a missed rekey before asking for a resync.
    pub resync_grace_ms: u64,
    /// How long to wait for a reply before asking again; each unanswered request doubles it (up
    /// to 16 times), and so does each refusal in a row, with up to half of it again added at
    /// random so that members refused together do not retry together.
    pub retry_ms: u64,
    /// A member told that its membership ended registers again after a random delay of up to
    /// this long, so that the members of a group reset at once do not all register at once.
    pub rejoin_spread_ms: u64,
    /// Once admitted, how long without a verified rekey or heartbeat before the member asks the
    /// controller for unicast fan-out (on multicast: a network that silently drops it), or for
    /// the current keys (on fan-out). `None`: never.
    pub fanout_after_ms: Option<u64>,
    /// How many controllers the driver can ask (`--controller`, repeatable): the budget of
    /// prompt retries after redirects is [`REDIRECT_ROUNDS`] times this.
    pub controllers: usize,
    /// A request redirected (a controller that does not lead the group, or one that cannot be
    /// reached) is asked again after this plus up to three times this at random, within the
    /// budget of prompt retries.
    pub redirect_ms: u64,
}

impl MemberConfig {
    /// Defaults: renew every 20 s, resync after 300 ms behind, retry after 2 s, register again
    /// within 5 s of a membership's end, fan-out after 10 s without a verified datagram; one
    /// controller; a redirected request asked again within 50–200 ms.
    pub fn new(group: GroupId, controller: VerifyingKey) -> Self {
        MemberConfig {
            group,
            controller,
            token: Vec::new(),
            renew_interval_ms: 20_000,
            resync_grace_ms: 300,
            retry_ms: 2_000,
            rejoin_spread_ms: 5_000,
            fanout_after_ms: Some(10_000),
            controllers: 1,
            redirect_ms: 50,
        }
    }
}

/// What happened, for the driver and local applications.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    /// Admitted (or re-admitted) to the group.
    Joined {
        /// The member's id.
        member: MemberId,
        /// Epoch of the keys received.
        epoch: Epoch,
        /// Check value of the traffic key.
        kcv: Kcv,
    },
    /// The traffic key changed (a rekey was applied, or a resync received).
    KeyChanged {
        /// The new epoch.
        epoch: Epoch,
        /// Check value of the new traffic key.
        kcv: Kcv,
    },
    /// The controller says this member is no longer a member (evicted, expired, left, replaced
    /// or excluded by a reset of the group); the member registers again after a random delay of
    /// up to [`MemberConfig::rejoin_spread_ms`].
    MembershipEnded {
        /// What the controller said: how and at which epoch the membership ended, when the
        /// controller still remembers it. Network text: print it escaped.
        reason: String,
    },
    /// The group's signing key was replaced: an announcement signed by the key the member held
    /// (multicast, or a link of the chain it asked for) named the new key. The driver persists
    /// [`Member::signing_keys`].
    SigningKeyChanged {
        /// The new key's number in the group's chain.
        key_id: u32,
        /// The first epoch it signs.
        from_epoch: Epoch,
    },
    /// The controller keeps no chain of announcements from the key this member holds (the key
    /// was replaced more often than it keeps, or the member was given a key that was never the
    /// group's): the member stops and asks nothing more (a daemon exits, telling its operator
    /// to give it the controller's current key). Unsigned, like every error message, and taken
    /// only in answer to the member's own chain request.
    SigningKeyUnknown {
        /// What the controller said (network text: print it escaped).
        reason: String,
    },
    /// Nothing verified arrived by multicast for [`MemberConfig::fanout_after_ms`]: the member
    /// now asks the controller for unicast fan-out (its datagrams come from
    /// [`Member::poll_datagram`], to the controller's UDP port; the driver feeds what comes back
    /// to [`Member::handle_datagram`]).
    FanoutStarted,
    /// A datagram or reply of another gkm wire version arrived (told once): the controller
    /// runs another release. Unauthenticated, like any header.
    OtherWireVersion {
        /// The version it named.
        version: u8,
    },
    /// The controller has no such group (removed, or never configured): the member stops and
    /// asks nothing more (a daemon exits, telling its operator to check the group).
    GroupUnknown {
        /// What the controller said (network text: print it escaped).
        reason: String,
    },
    /// The group does not take keys of this member's KEM ([`Status::KemNotAccepted`]): the
    /// member stops and asks nothing more (a daemon exits, telling its operator to run it with
    /// a KEM the group takes, or to have the group take this one). Unsigned, like every error
    /// message: a forged one stops a member, as dropping its traffic would.
    KemNotAccepted {
        /// The KEM of this member's key.
        ours: Kem,
        /// What the controller said (`accepts: x25519`; network text: print it escaped).
        reason: String,
    },
    /// The controller asked does not lead the group ([`Status::NotLeader`]). The member keeps
    /// its membership and keys and asks again in `retry_in_ms`; the driver should ask `leader`
    /// if it is a controller it was configured with, else the next one
    /// ([`controllers::Controllers::not_leader`]). Unsigned, like every error message: at worst
    /// a forged one delays a request.
    NotLeader {
        /// The leader's request address, as the controller named it (`None`: it named none, or
        /// nothing that parses as `ip:port`).
        leader: Option<SocketAddr>,
        /// When the member asks again, in milliseconds.
        retry_in_ms: u64,
    },
    /// The leave is over and the member does nothing more: the controller acknowledged it
    /// (`refused` is `None`), or refused it (its status and reason, network text: print it
    /// escaped; the lease then runs out on its own).
    Left {
        /// The refusal, if the controller refused the leave.
        refused: Option<(Status, String)>,
    },
    /// The controller refused a request.
    Refused {
        /// Why.
        status: Status,
        /// The reason given (network text: print it escaped).
        reason: String,
        /// When the member asks again, in milliseconds.
        retry_in_ms: u64,
    },
}

/// Counters of what the member received and refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberStats {
    /// Rekeys applied.
    pub applied: u64,
    /// Rekey datagrams whose signature was checked (one per rekey when nothing is lost: those of
    /// the next epoch that serve other members are dropped before the check).
    pub verified: u64,
    /// Resyncs received.
    pub resyncs: u64,
    /// Datagrams refused, by reason.
    pub dropped: BTreeMap<&'static str, u64>,
}

pub use catch_up::HELD_REKEYS;
use catch_up::{CatchUp, Hold};

enum State {
    /// Waiting for a welcome to the request with this nonce.
    Registering { nonce: [u8; NONCE_LEN] },
    /// A member with keys.
    Active { member: MemberId, path: HeldPath },
    /// A membership ended; registers again at `retry_at`.
    Ended,
    /// Leaving: waiting for the acknowledgement of the leave request with this nonce (asked
    /// again only when redirected).
    Leaving {
        member: MemberId,
        nonce: [u8; NONCE_LEN],
    },
    /// Left; does nothing more.
    Left,
    /// The controller has no such group; does nothing more.
    Stopped,
}

/// How the group's datagrams reach the member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    /// By multicast.
    Multicast,
    /// By unicast from the controller: subscribed (again) at `subscribe_at`; `awaiting` while a
    /// cookie was asked for and none came back yet (one reply is taken per request).
    Fanout {
        subscribe_at: Millis,
        awaiting: bool,
    },
}

/// A group member.
pub struct Member<R> {
    config: MemberConfig,
    identity: SigningKey,
    hpke: HpkeSecret,
    /// Its public key, presented in registration and resync requests (`None` if the secret
    /// bytes are unusable: the member then asks nothing).
    hpke_public: Option<HpkePublicKey>,
    rng: R,
    state: State,
    /// Nonce of an outstanding resync or renewal.
    outstanding: Option<[u8; NONCE_LEN]>,
    requests: VecDeque<Vec<u8>>,
    events: VecDeque<MemberEvent>,
    /// When to resend the registration or a resync.
    retry_at: Option<Millis>,
    /// Multicast, or unicast fan-out.
    delivery: Delivery,
    /// When a rekey or heartbeat last verified (the silence timer counts only those).
    heard_at: Millis,
    /// Datagrams for the controller's UDP port (fan-out subscriptions).
    datagrams: VecDeque<Vec<u8>>,
    /// Requests in a row that got no answer (the retry backoff).
    unanswered: u32,
    /// Requests in a row that were refused (their retries back off too).
    refused: u32,
    /// Requests in a row that were redirected (not the leader, or unreachable).
    redirects: u32,
    /// The leader the last `NotLeader` named: a different one is progress (a new leader was
    /// elected), and the prompt retries start over.
    named_leader: Option<SocketAddr>,
    /// When to ask for a resync because we are behind, and the rekeys of later epochs held
    /// while a missed one may still arrive (at most [`HELD_REKEYS`]).
    catch_up: CatchUp<Vec<u8>>,
    renew_at: Option<Millis>,
    /// Where the controller said the group's rekeys are multicast.
    rekey_address: Option<SocketAddr>,
    /// Whether [`MemberEvent::OtherWireVersion`] was told already (once per member).
    told_version: bool,
    /// The controller's signing keys: the one verified with, the one before.
    keys: SigningKeys,
    /// The outstanding chain request's nonce, when it was asked, and the wait before another.
    chain: ChainAsk,
    /// A welcome or resync response that did not verify under the member's key, kept until the
    /// chain it asked for is walked (then handled again).
    unverified_reply: Option<Vec<u8>>,
    stats: MemberStats,
}

/// The member's chain requests. A message of its group that fails its signature check only
/// sets `doubt`; the chain is asked for in place of the next request the member's timers make,
/// at most one outstanding, and no sooner than `retry_ms` after the last (doubled by each answer
/// that brought no new key): forged datagrams never make a member send anything of their own.
#[derive(Clone, Copy, Debug, Default)]
struct ChainAsk {
    doubt: bool,
    nonce: Option<[u8; NONCE_LEN]>,
    asked_at: Option<Millis>,
    fruitless: u32,
}

impl<R: CryptoRng> Member<R> {
    /// A member that registers now.
    pub fn new(
        config: MemberConfig,
        identity: SigningKey,
        hpke: HpkeSecret,
        rng: R,
        now: Millis,
    ) -> Self {
        let mut member = Self::idle(config, identity, hpke, rng);
        member.register(now);
        member
    }

    /// A member resuming a membership it held before a restart (its keys from its own store);
    /// it asks for a resync at once in case it missed rekeys while down.
    pub fn resume(
        config: MemberConfig,
        identity: SigningKey,
        hpke: HpkeSecret,
        rng: R,
        member: MemberId,
        path: MemberPath,
        now: Millis,
    ) -> Self {
        let mut this = Self::idle(config, identity, hpke, rng);
        // Its own store: as trusted as its identity key.
        let path = HeldPath::trusted(path);
        this.state = State::Active { member, path };
        this.heard_at = now;
        this.send_resync(now);
        this
    }

    fn idle(config: MemberConfig, identity: SigningKey, hpke: HpkeSecret, rng: R) -> Self {
        let hpke_public = hpke.public_key().ok();
        let grace_ms = config.resync_grace_ms;
        let keys = SigningKeys::pinned(config.controller);
        Member {
            config,
            identity,
            hpke,
            hpke_public,
            rng,
            state: State::Left,
            outstanding: None,
            requests: VecDeque::new(),
            events: VecDeque::new(),
            retry_at: None,
            delivery: Delivery::Multicast,
            heard_at: 0,
            datagrams: VecDeque::new(),
            unanswered: 0,
            refused: 0,
            redirects: 0,
            named_leader: None,
            catch_up: CatchUp::new(grace_ms),
            renew_at: None,
            rekey_address: None,
            told_version: false,
            keys,
            chain: ChainAsk::default(),
            unverified_reply: None,
            stats: MemberStats::default(),
        }
    }

    /// The current epoch and traffic key, once admitted.
    pub fn traffic_key(&self) -> Option<(Epoch, TrafficKey)> {
        match &self.state {
            State::Active { path, .. } => Some((path.epoch(), path.traffic_key()?)),
            _ => None,
        }
    }

    /// The KEM of the member's HPKE key (a membership is bound to that key: persist it with the
    /// membership).
    pub fn kem(&self) -> Kem {
        self.hpke.kem()
    }

    /// The member's id and keys, for the driver to persist across restarts.
    pub fn membership(&self) -> Option<(MemberId, &MemberPath)> {
        match &self.state {
            State::Active { member, path } => Some((*member, path)),
            _ => None,
        }
    }

    /// Where the controller multicasts the group's rekeys, as its last welcome or resync response
    /// that named an address said (authenticated with it); `None` until one did.
    pub fn rekey_address(&self) -> Option<SocketAddr> {
        self.rekey_address
    }

    /// The member's parameters.
    pub fn config(&self) -> &MemberConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> &MemberStats {
        &self.stats
    }

    /// The controller's signing keys as the member follows them, for the driver to persist after
    /// [`MemberEvent::SigningKeyChanged`].
    pub fn signing_keys(&self) -> &SigningKeys {
        &self.keys
    }

    /// Continues from signing keys the member persisted before a restart; ignored (returns
    /// false) when they start from another key than the one now pinned (the operator gave a new
    /// key: the member starts over from it).
    pub fn restore_signing_keys(&mut self, keys: SigningKeys) -> bool {
        let same_start = keys.pinned_key() == &self.config.controller;
        if same_start {
            self.keys = keys;
        }
        same_start
    }

    /// The next request to send to the controller (each on its own connection; its reply goes
    /// to [`Member::handle_reply`]).
    pub fn poll_request(&mut self) -> Option<Vec<u8>> {
        self.requests.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<MemberEvent> {
        self.events.pop_front()
    }

    /// The next datagram for the controller's UDP port (a fan-out subscription), sent from
    /// the socket that receives the fan-out.
    pub fn poll_datagram(&mut self) -> Option<Vec<u8>> {
        self.datagrams.pop_front()
    }

    /// Whether the member receives by unicast fan-out.
    pub fn on_fanout(&self) -> bool {
        matches!(self.delivery, Delivery::Fanout { .. })
    }

    /// Receive by unicast fan-out from now on (the driver could not join the multicast group,
    /// or was told not to). The member subscribes once admitted, and renews its subscription.
    pub fn use_fanout(&mut self, now: Millis) {
        if !self.on_fanout() {
            self.delivery = Delivery::Fanout {
                subscribe_at: now,
                awaiting: false,
            };
            self.heard_at = now;
        }
    }

    /// The earliest time [`Member::handle_timeout`] has work (timers wait while a chain request
    /// does).
    pub fn poll_timeout(&self) -> Option<Millis> {
        let requests = self.request_timers_at().map(|at| match self.chain.nonce {
            Some(_) => at.max(self.chain_deadline()),
            None => at,
        });
        [requests, self.channel_timers_at()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The earliest of the timers that send requests: retries, resyncs, renewals.
    fn request_timers_at(&self) -> Option<Millis> {
        [self.retry_at, self.catch_up.poll_timeout(), self.renew_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// The earliest of the timers of the rekey channel: silence, fan-out subscriptions (they
    /// send datagrams, not requests).
    fn channel_timers_at(&self) -> Option<Millis> {
        let subscribe_at = match self.delivery {
            Delivery::Fanout { subscribe_at, .. } => Some(subscribe_at),
            Delivery::Multicast => None,
        };
        [subscribe_at, self.silence_at()]
            .into_iter()
            .flatten()
            .min()
    }

    /// When silence on the rekey channel makes the member act, if it is admitted.
    fn silence_at(&self) -> Option<Millis> {
        let after = self.config.fanout_after_ms?;
        matches!(self.state, State::Active { .. }).then(|| self.heard_at.saturating_add(after))
    }

    /// Silence: on multicast, fan-out from now on; on fan-out, ask for the current keys (a
    /// member the controller no longer knows learns so, and registers again).
    fn silent(&mut self, now: Millis) {
        self.heard_at = now;
        if let Delivery::Fanout { awaiting, .. } = self.delivery {
            // Perhaps the confirmation was lost: subscribe again now, and resync meanwhile.
            self.delivery = Delivery::Fanout {
                subscribe_at: now,
                awaiting,
            };
            self.behind(now);
        } else {
            self.use_fanout(now);
            self.events.push_back(MemberEvent::FanoutStarted);
        }
    }

    /// Sends a fan-out subscription when one is due: without a cookie, asking for one.
    fn subscribe_when_due(&mut self, now: Millis) {
        let Delivery::Fanout { subscribe_at, .. } = self.delivery else {
            return;
        };
        if subscribe_at > now {
            return;
        }
        // Asked again after `retry_ms` unless a cookie comes back (then after the renewal
        // period): the request or its cookie may be lost, or the controller may have refused a
        // second cookie within a second.
        let admitted = matches!(self.state, State::Active { .. });
        self.delivery = Delivery::Fanout {
            subscribe_at: now + self.config.retry_ms,
            awaiting: admitted,
        };
        if admitted {
            self.send_subscription(now, None);
        }
    }

    fn send_subscription(&mut self, now: Millis, cookie: Option<Cookie>) {
        let State::Active { member, .. } = &self.state else {
            return;
        };
        let request = Subscribe {
            group: self.config.group,
            member: *member,
            timestamp_ms: now,
            nonce: self.nonce(),
            cookie,
        };
        self.datagrams.push_back(sign(&request, &self.identity));
    }

    /// A cookie from the controller, in answer to a subscription: echoed, signed, once.
    fn cookie(&mut self, now: Millis, bytes: &[u8]) {
        let Delivery::Fanout { awaiting: true, .. } = self.delivery else {
            return self.drop_datagram("unexpected cookie");
        };
        let Ok(reply) = <CookieReply as wire::Codec>::decode_exact(bytes) else {
            return self.drop_datagram("malformed cookie");
        };
        let ours = matches!(&self.state, State::Active { member, .. }
            if *member == reply.member && reply.group == self.config.group);
        if !ours {
            return self.drop_datagram("unexpected cookie");
        }
        self.delivery = Delivery::Fanout {
            subscribe_at: now + self.config.renew_interval_ms,
            awaiting: false,
        };
        self.send_subscription(now, Some(reply.cookie));
    }

    /// Leaves the group: a member queues a signed leave request and drops its keys; nothing
    /// more is asked, except the leave again when a controller redirects it (see
    /// [`Member::leaving`]). Its acknowledgement or refusal ends the leave with a
    /// [`MemberEvent::Left`].
    pub fn leave(&mut self, now: Millis) {
        self.outstanding = None;
        self.retry_at = None;
        self.catch_up.caught_up();
        self.renew_at = None;
        match self.state {
            State::Active { member, .. } => self.send_leave(now, member),
            State::Leaving { .. } => {}
            _ => self.state = State::Left,
        }
    }

    /// Whether a leave waits for its acknowledgement (the driver of a leaving member keeps
    /// sending [`Member::poll_request`] and feeding replies and timeouts while this holds, as
    /// long as it cares to wait).
    pub fn leaving(&self) -> bool {
        matches!(self.state, State::Leaving { .. })
    }

    /// The driver could not deliver the outstanding request or got no reply to it (connection
    /// refused or reset, or no answer in time: a controller that died) and asks the next
    /// controller from now on: the member asks again promptly, within the same budget as after
    /// [`Status::NotLeader`], then with the usual back-off. Does nothing when no request waits
    /// for a reply.
    pub fn handle_unreachable(&mut self, now: Millis) {
        if !self.awaiting_reply() {
            return;
        }
        self.unanswered = 0;
        self.redirect(now);
    }

    /// The driver asks another controller from now on: a member on fan-out subscribes with it
    /// at once (a controller that no longer leads the group sends it nothing).
    pub fn controller_changed(&mut self, now: Millis) {
        if self.on_fanout() {
            self.delivery = Delivery::Fanout {
                subscribe_at: now,
                awaiting: false,
            };
        }
    }

    /// The rekey channel has been silent for longer than heartbeats allow: asks the controller for
    /// the current path keys (a resync, after the usual grace). A member that is no longer one
    /// learns it from the answer and registers again. Does nothing unless admitted.
    pub fn check_in(&mut self, now: Millis) {
        if matches!(self.state, State::Active { .. }) {
            self.behind(now);
        }
    }

    /// Timers: registration retries, resyncs when behind, lease renewals; a chain request in
    /// place of the first of them when the member doubts its signing key.
    pub fn handle_timeout(&mut self, now: Millis) {
        let due = [self.request_timers_at(), self.channel_timers_at()]
            .into_iter()
            .flatten()
            .any(|t| t <= now);
        let asked = !self.chain_pending(now) && due && self.ask_chain_if_doubted(now);
        if self.silence_at().is_some_and(|t| t <= now) {
            self.silent(now);
        }
        self.subscribe_when_due(now);
        // The member's driver keeps one request in flight: the others wait for the chain's.
        if asked || self.chain_pending(now) {
            return;
        }
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            self.unanswered = self.unanswered.saturating_add(1);
            match self.state {
                State::Registering { .. } | State::Ended => self.register(now),
                State::Active { .. } => self.send_resync(now),
                State::Leaving { member, .. } => self.send_leave(now, member),
                State::Left | State::Stopped => {}
            }
        }
        if self.catch_up.handle_timeout(now) {
            self.send_resync(now);
        }
        if self.renew_at.is_some_and(|t| t <= now) {
            self.renew_at = None;
            self.send_resync(now);
        }
    }

    /// A multicast datagram: a rekey or a heartbeat.
    pub fn handle_datagram(&mut self, now: Millis, bytes: &[u8]) {
        match MessageType::peek(bytes) {
            Ok(MessageType::Rekey) => {
                self.rekey(now, bytes);
                self.apply_held(now);
            }
            Ok(MessageType::Heartbeat) => self.heartbeat(now, bytes),
            Ok(MessageType::KeyAnnouncement) => self.announcement(now, bytes),
            Ok(MessageType::CookieReply) => self.cookie(now, bytes),
            Err(wire::DecodeError::BadVersion(version)) => self.other_version(version),
            _ => self.drop_datagram("not a rekey or heartbeat"),
        }
    }

    /// A message of another wire version: dropped, and told once (a controller of another
    /// release, most likely; the header is not authenticated, so nothing else follows from it).
    fn other_version(&mut self, version: u8) {
        self.drop_datagram("other wire version");
        if !self.told_version {
            self.told_version = true;
            self.events
                .push_back(MemberEvent::OtherWireVersion { version });
        }
    }

    /// The reply to a request: a welcome, a resync response, an acknowledgement or an error
    /// message.
    pub fn handle_reply(&mut self, now: Millis, bytes: &[u8]) {
        self.unanswered = 0;
        match MessageType::peek(bytes) {
            Ok(MessageType::Welcome | MessageType::ResyncResponse) => self.sealed(now, bytes),
            Ok(MessageType::Ack) => self.acknowledged(now, bytes),
            Ok(MessageType::KeyChain) => self.key_chain(now, bytes),
            Ok(MessageType::Error) => self.error(now, bytes),
            Err(wire::DecodeError::BadVersion(version)) => self.other_version(version),
            _ => self.drop_datagram("malformed reply"),
        }
    }

    fn rekey(&mut self, now: Millis, bytes: &[u8]) {
        // Repeats of an epoch already applied are dropped before the signature check: dropping
        // changes nothing, so an unverified header may decide it.
        let repeat = matches!(
            (RekeyDatagram::peek_epoch(bytes), &self.state),
            (Some((group, epoch)), State::Active { path, .. })
                if group == path.group() && epoch <= path.epoch()
        );
        if repeat {
            return self.drop_datagram("stale or replayed");
        }
        // So are the datagrams of the next epoch that serve other members: each member checks
        // one signature per rekey, its own datagram's (issue 15). One decode serves both.
        let unverified = match wire::decode_signed::<RekeyDatagram>(bytes) {
            Ok(u) => u,
            Err(_) => return self.drop_datagram("malformed"),
        };
        let for_others = matches!(
            &self.state,
            State::Active { path, .. }
                if unverified.message().group == path.group()
                    && path.epoch().next() == Some(unverified.message().epoch)
                    && !unverified.message().serves(path)
        );
        if for_others {
            return self.drop_datagram("for other members");
        }
        self.stats.verified += 1;
        let ours = unverified.message().group == self.config.group;
        let key = *self.key_for(unverified.message().epoch);
        let authentic = match AuthenticRekey::check(unverified, &key) {
            Ok(a) => a,
            Err(WireError::BadSignature) => return self.bad_signature(ours, "bad signature"),
            Err(_) => return self.drop_datagram("malformed"),
        };
        if authentic.datagram().group == self.config.group {
            self.heard_at = now;
        }
        let State::Active { path, .. } = &mut self.state else {
            return;
        };
        let outcome = authentic.fresh(path).and_then(FreshRekey::apply);
        match outcome {
            Ok(applied) => {
                self.stats.applied += 1;
                self.catch_up.caught_up();
                self.events.push_back(MemberEvent::KeyChanged {
                    epoch: applied.epoch,
                    kcv: applied.kcv,
                });
            }
            Err(WireError::Stale { .. }) => self.drop_datagram("stale or replayed"),
            Err(WireError::NotForMe) => self.drop_datagram("for other members"),
            Err(WireError::WrongGroup { .. }) => self.drop_datagram("other group"),
            Err(WireError::Gap { .. }) => {
                let epoch = authentic.datagram().epoch;
                self.hold(now, epoch, bytes);
                self.behind(now);
            }
            Err(_) => {
                self.drop_datagram("inconsistent");
                self.behind(now);
            }
        }
    }

    /// Holds a verified rekey of a later epoch than the next one, for as long as a resync is
    /// put off ([`MemberConfig::resync_grace_ms`], longer than the controller's repeats take):
    /// when the missed epoch arrives, the held ones are applied in order and no resync is
    /// needed. Bounded by [`HELD_REKEYS`]; a copy of one already held is dropped.
    fn hold(&mut self, now: Millis, epoch: Epoch, bytes: &[u8]) {
        match self.catch_up.hold(now, epoch, bytes.to_vec()) {
            Hold::Held => {}
            Hold::Duplicate => self.drop_datagram("held already"),
            Hold::HeldDroppingOldest => self.drop_datagram("missed an epoch"),
        }
    }

    /// Applies the held rekeys that follow the member's epoch, in order; gives up those that
    /// are stale or whose time ran out.
    fn apply_held(&mut self, now: Millis) {
        for _ in 0..HELD_REKEYS {
            let State::Active { path, .. } = &self.state else {
                self.catch_up.clear_held();
                return;
            };
            let Some(bytes) = self.catch_up.next_held(now, path.epoch()) else {
                return;
            };
            self.rekey(now, &bytes);
        }
    }

    fn heartbeat(&mut self, now: Millis, bytes: &[u8]) {
        let State::Active { path, .. } = &self.state else {
            return;
        };
        let (group, mine) = (path.group(), path.epoch());
        let kcv = path.traffic_key().map(|k| k.check_value());
        let in_step = |beat: &Heartbeat| {
            beat.group != group || catch_up::in_step(mine, kcv, beat.epoch, beat.kcv)
        };
        // A heartbeat that asks for nothing is dropped before its signature check (dropping
        // changes nothing), unless half the silence allowed has passed: only a verified one
        // tells the member that its rekey channel works. One that would make it resync must be
        // authentic.
        let unverified = <Heartbeat as wire::Codec>::decode(&mut wire::Reader::new(bytes));
        let half_silent = self
            .config
            .fanout_after_ms
            .is_some_and(|after| now >= self.heard_at.saturating_add(after / 2));
        if unverified.as_ref().is_ok_and(in_step) && !half_silent {
            return;
        }
        let Ok(unverified) = wire::decode_signed::<Heartbeat>(bytes) else {
            return self.drop_datagram("bad heartbeat");
        };
        let ours = unverified.message().group == group;
        let key = *self.key_for(unverified.message().epoch);
        let Ok(beat) = unverified.verify(&key) else {
            return self.bad_signature(ours, "bad heartbeat");
        };
        if beat.message().group == group {
            self.heard_at = now;
        }
        if !in_step(beat.message()) {
            self.behind(now);
        }
    }

    /// Schedules a resync unless one is already scheduled or outstanding ([`CatchUp::behind`]).
    fn behind(&mut self, now: Millis) {
        self.catch_up.behind(now, self.outstanding.is_some());
    }

    fn sealed(&mut self, now: Millis, bytes: &[u8]) {
        let Ok(unverified) = wire::decode_signed::<SealedPath>(bytes) else {
            return self.drop_datagram("bad sealed path");
        };
        let key = *self.key_for(unverified.message().epoch);
        let Ok(verified) = unverified.verify(&key) else {
            // Perhaps signed by a key the member has not followed yet: kept (one) until the
            // chain it asks for is walked.
            self.unverified_reply = Some(bytes.to_vec());
            return self.bad_signature(true, "bad sealed path");
        };
        let sealed = verified.message();
        let expected = match (&self.state, sealed.kind) {
            (State::Registering { nonce }, SealedKind::Welcome) => Some(*nonce),
            (State::Active { .. }, SealedKind::Resync) => self.outstanding,
            _ => None,
        };
        if sealed.group != self.config.group || expected != Some(sealed.request_nonce) {
            return self.drop_datagram("unexpected sealed path");
        }
        let Ok(path) = open_path(&verified, &self.hpke) else {
            return self.drop_datagram("sealed path does not open");
        };
        if sealed.rekey_address.is_some() {
            self.rekey_address = sealed.rekey_address;
        }
        // Nothing new: an older path, or the keys already held. A path of the member's own epoch
        // with other keys replaces them (the controller's are the keys of that epoch).
        let nothing_new = matches!(&self.state, State::Active { path: current, .. }
            if path.epoch() < current.epoch()
                || (path.epoch() == current.epoch() && kcv_of(&path) == kcv_of(current)));
        if nothing_new {
            // The request is answered (and the lease renewed with it): no retry, the next
            // renewal a period from now.
            self.outstanding = None;
            self.retry_at = None;
            self.renew_at = Some(now + self.config.renew_interval_ms);
            return;
        }
        let Some(kcv) = path.traffic_key().map(|k| k.check_value()) else {
            return;
        };
        let epoch = path.epoch();
        let event = match sealed.kind {
            SealedKind::Welcome => MemberEvent::Joined {
                member: sealed.member,
                epoch,
                kcv,
            },
            SealedKind::Resync => {
                self.stats.resyncs += 1;
                MemberEvent::KeyChanged { epoch, kcv }
            }
        };
        if matches!(sealed.kind, SealedKind::Welcome) {
            // Admitted: the silence timer starts, and a fan-out member subscribes at once.
            self.heard_at = now;
            if let Delivery::Fanout { awaiting, .. } = self.delivery {
                self.delivery = Delivery::Fanout {
                    subscribe_at: now,
                    awaiting,
                };
            }
        }
        self.state = State::Active {
            member: sealed.member,
            path,
        };
        self.outstanding = None;
        self.retry_at = None;
        self.refused = 0;
        self.redirects = 0;
        self.catch_up.caught_up();
        self.renew_at = Some(now + self.config.renew_interval_ms);
        self.events.push_back(event);
        self.apply_held(now);
    }

    /// An acknowledgement of this member's outstanding renewal: the lease runs on.
    fn acknowledged(&mut self, now: Millis, bytes: &[u8]) {
        let Ok(ack) = <Ack as wire::Codec>::decode_exact(bytes) else {
            return self.drop_datagram("malformed acknowledgement");
        };
        let left = matches!(self.state, State::Leaving { member, nonce }
            if member == ack.member && nonce == ack.request_nonce);
        if left && ack.group == self.config.group && ack.acked == Acked::Left {
            self.state = State::Left;
            self.retry_at = None;
            self.redirects = 0;
            self.events.push_back(MemberEvent::Left { refused: None });
            return;
        }
        let ours = matches!(self.state, State::Active { member, .. } if member == ack.member);
        if ack.group != self.config.group
            || !ours
            || self.outstanding != Some(ack.request_nonce)
            || ack.acked != Acked::LeaseRenewed
        {
            return self.drop_datagram("unexpected acknowledgement");
        }
        self.outstanding = None;
        self.refused = 0;
        self.redirects = 0;
        self.retry_at = None;
        self.renew_at = Some(now + self.config.renew_interval_ms);
        // Renewed while a rekey was on its way (the controller names its epoch): the datagrams
        // should come; if they do not within the grace, the member resyncs.
        if let State::Active { path, .. } = &self.state
            && ack.epoch > path.epoch()
        {
            self.behind(now);
        }
    }

    fn error(&mut self, now: Millis, bytes: &[u8]) {
        let Ok(message) = <ErrorMessage as wire::Codec>::decode_exact(bytes) else {
            return self.drop_datagram("malformed error");
        };
        if message.status == Status::NotLeader && message.group == self.config.group {
            return self.not_leader(now, &message.reason);
        }
        self.redirects = 0;
        let awaited = self.awaiting_reply();
        if matches!(self.state, State::Leaving { .. }) {
            self.state = State::Left;
            self.retry_at = None;
            self.events.push_back(MemberEvent::Left {
                refused: Some((message.status, message.reason)),
            });
            return;
        }
        self.outstanding = None;
        match message.status {
            Status::NotAMember if matches!(self.state, State::Active { .. }) => {
                self.refused = 0;
                self.events.push_back(MemberEvent::MembershipEnded {
                    reason: message.reason,
                });
                let spread = self.config.rejoin_spread_ms.saturating_add(1);
                self.state = State::Ended;
                self.retry_at = Some(now + self.rng.next_u64() % spread);
                self.renew_at = None;
                self.catch_up.caught_up();
            }
            Status::UnknownGroup if message.group == self.config.group => {
                self.events.push_back(MemberEvent::GroupUnknown {
                    reason: message.reason,
                });
                self.stop();
            }
            Status::SigningKeyUnknown
                if message.group == self.config.group && self.chain.nonce.is_some() =>
            {
                self.events.push_back(MemberEvent::SigningKeyUnknown {
                    reason: message.reason,
                });
                self.stop();
            }
            Status::KemNotAccepted if message.group == self.config.group && awaited => {
                self.events.push_back(MemberEvent::KemNotAccepted {
                    ours: self.hpke.kem(),
                    reason: message.reason,
                });
                self.stop();
            }
            status => {
                let retry_in_ms = self.retry_delay();
                self.refused = self.refused.saturating_add(1);
                self.events.push_back(MemberEvent::Refused {
                    status,
                    reason: message.reason,
                    retry_in_ms,
                });
                self.retry_at = Some(now + retry_in_ms);
            }
        }
    }

    /// Asks nothing more: the controller said no request of this member can succeed.
    fn stop(&mut self) {
        self.state = State::Stopped;
        self.retry_at = None;
        self.renew_at = None;
        self.catch_up.caught_up();
    }

    /// The controller asked does not lead the group. Unsigned, so nothing changes but when the
    /// outstanding request is asked again (with a fresh nonce): membership, keys, the
    /// outstanding resync's nonce all stay. Dropped when no request waits for a reply.
    fn not_leader(&mut self, now: Millis, reason: &str) {
        if !self.awaiting_reply() {
            return self.drop_datagram("unexpected not-leader");
        }
        let leader = reason.trim().parse::<SocketAddr>().ok();
        // A newly named leader: the cluster moved on (a failover), so the prompt retries start
        // over instead of backing off as from a cluster with no leader.
        if leader.is_some() && leader != self.named_leader {
            self.named_leader = leader;
            self.redirects = 0;
            self.refused = 0;
        }
        let retry_in_ms = self.redirect(now);
        self.events.push_back(MemberEvent::NotLeader {
            leader,
            retry_in_ms,
        });
    }

    /// Whether a request waits for its reply: a registration, a resync or renewal, a leave.
    fn awaiting_reply(&self) -> bool {
        match self.state {
            State::Registering { .. } | State::Leaving { .. } => true,
            State::Active { .. } => self.outstanding.is_some(),
            State::Ended | State::Left | State::Stopped => false,
        }
    }

    /// Schedules asking again after a redirect: promptly (`redirect_ms` to four times that)
    /// while fewer than [`REDIRECT_ROUNDS`] redirects per known controller came in a row, else
    /// after the back-off of a refusal. The delay, in milliseconds.
    fn redirect(&mut self, now: Millis) -> u64 {
        let controllers = u32::try_from(self.config.controllers.max(1)).unwrap_or(u32::MAX);
        let delay = if self.redirects < controllers.saturating_mul(REDIRECT_ROUNDS) {
            let base = self.config.redirect_ms;
            let spread = base.saturating_mul(3).saturating_add(1);
            base.saturating_add(self.rng.next_u64() % spread)
        } else {
            let delay = self.retry_delay();
            self.refused = self.refused.saturating_add(1);
            delay
        };
        self.redirects = self.redirects.saturating_add(1);
        self.retry_at = Some(now.saturating_add(delay));
        delay
    }

    fn send_leave(&mut self, now: Millis, member: MemberId) {
        let nonce = self.nonce();
        let request = LeaveRequest {
            group: self.config.group,
            member,
            timestamp_ms: now,
            nonce,
        };
        self.requests.push_back(sign(&request, &self.identity));
        self.state = State::Leaving { member, nonce };
    }

    fn register(&mut self, now: Millis) {
        let Some(hpke_key) = self.hpke_public.clone() else {
            return;
        };
        let nonce = self.nonce();
        let request = RegistrationRequest {
            group: self.config.group,
            identity: self.identity.verifying_key().to_bytes(),
            hpke_key,
            timestamp_ms: now,
            nonce,
            token: self.config.token.clone(),
        };
        self.requests.push_back(sign(&request, &self.identity));
        self.state = State::Registering { nonce };
        self.retry_at = Some(now + self.retry_delay());
        self.renew_at = None;
        self.catch_up.caught_up();
    }

    fn send_resync(&mut self, now: Millis) {
        let State::Active { member, path } = &self.state else {
            return;
        };
        let (member, epoch, kcv) = (*member, path.epoch(), kcv_of(path));
        let Some(hpke_key) = self.hpke_public.clone() else {
            return;
        };
        let nonce = self.nonce();
        let request = ResyncRequest {
            group: self.config.group,
            member,
            epoch,
            kcv,
            timestamp_ms: now,
            nonce,
            hpke_key,
        };
        self.requests.push_back(sign(&request, &self.identity));
        self.outstanding = Some(nonce);
        self.retry_at = Some(now + self.retry_delay());
    }

    /// The wait before asking again: `retry_ms` doubled per unanswered request in a row, or per
    /// refusal in a row before this one (at most 16 times), plus up to half of that at random.
    fn retry_delay(&mut self) -> u64 {
        let doublings = self.unanswered.max(self.refused).min(4);
        let base = self.config.retry_ms.saturating_mul(1 << doublings);
        let spread = base / 2;
        base.saturating_add(self.rng.next_u64() % spread.saturating_add(1))
    }

    fn nonce(&mut self) -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill_bytes(&mut nonce);
        nonce
    }

    /// The key that verifies a message of the member's group at `epoch` (the previous key for
    /// older epochs during its grace).
    fn key_for(&self, epoch: Epoch) -> &VerifyingKey {
        let held = match &self.state {
            State::Active { path, .. } => path.epoch(),
            _ => Epoch(0),
        };
        self.keys.for_epoch(epoch, held)
    }

    /// A message that did not verify: dropped; if it names the member's group, perhaps the
    /// group's key was replaced and the announcement missed: the member doubts its key, and asks
    /// for the chain in place of the next request its own timers make ([`ChainAsk`]). Never at
    /// once: unauthenticated bytes make no member send anything (a forged multicast datagram
    /// must not make a million members ask the controller).
    fn bad_signature(&mut self, ours: bool, reason: &'static str) {
        self.drop_datagram(reason);
        if ours {
            self.chain.doubt = true;
        }
    }

    /// Whether a chain request waits for its answer (for at most `retry_ms`): the member's other
    /// requests wait too, since its driver keeps one request in flight.
    fn chain_pending(&self, now: Millis) -> bool {
        self.chain.nonce.is_some() && now < self.chain_deadline()
    }

    fn chain_deadline(&self) -> Millis {
        self.chain
            .asked_at
            .map_or(0, |at| at.saturating_add(self.config.retry_ms))
    }

    /// Asks for the chain if the member doubts its key and no chain was asked for within the
    /// wait (`retry_ms`, doubled by each answer that brought nothing new, up to 16 times);
    /// whether it asked.
    fn ask_chain_if_doubted(&mut self, now: Millis) -> bool {
        if !self.chain.doubt || matches!(self.state, State::Left | State::Stopped) {
            return false;
        }
        let wait = self
            .config
            .retry_ms
            .saturating_mul(1 << self.chain.fruitless.min(4));
        if self
            .chain
            .asked_at
            .is_some_and(|at| now < at.saturating_add(wait))
        {
            return false;
        }
        self.chain.doubt = false;
        let nonce = self.nonce();
        let request = KeyChainRequest {
            group: self.config.group,
            known_key: self.keys.current().to_bytes(),
            nonce,
        };
        self.requests.push_back(wire::Codec::to_bytes(&request));
        self.chain.nonce = Some(nonce);
        self.chain.asked_at = Some(now);
        true
    }

    /// A multicast announcement of the group's next signing key.
    fn announcement(&mut self, now: Millis, bytes: &[u8]) {
        match self.keys.take(self.config.group, bytes) {
            Ok(switched) => self.switched(now, switched),
            Err(NotTaken::Malformed) => self.drop_datagram("malformed announcement"),
            Err(NotTaken::OtherGroup) => self.drop_datagram("other group"),
            Err(NotTaken::Stale) => self.drop_datagram("stale announcement"),
            Err(NotTaken::BadSignature { key_id }) => {
                // A later link than the next (the member missed one): ask for the chain.
                let later = self.keys.current_id().is_none_or(|id| key_id > id);
                self.bad_signature(later, "bad announcement");
            }
        }
    }

    /// The answer to the member's chain request: its links walked from the key the member holds.
    fn key_chain(&mut self, now: Millis, bytes: &[u8]) {
        let Ok(chain) = <KeyChain as wire::Codec>::decode_exact(bytes) else {
            return self.drop_datagram("malformed key chain");
        };
        if chain.group != self.config.group || self.chain.nonce != Some(chain.request_nonce) {
            return self.drop_datagram("unexpected key chain");
        }
        self.chain.nonce = None;
        let links = chain
            .announcements
            .iter()
            .map(<[u8; wire::ANNOUNCEMENT_LEN]>::as_slice);
        match self.keys.walk(self.config.group, links) {
            Some(switched) => self.switched(now, switched),
            None => self.chain.fruitless = self.chain.fruitless.saturating_add(1),
        }
    }

    /// The member verifies with a new key from now on: told, and a reply kept because it did
    /// not verify is handled again.
    fn switched(&mut self, now: Millis, switched: signing_keys::Switched) {
        self.chain.fruitless = 0;
        self.events.push_back(MemberEvent::SigningKeyChanged {
            key_id: switched.key_id,
            from_epoch: switched.from_epoch,
        });
        if let Some(reply) = self.unverified_reply.take() {
            self.sealed(now, &reply);
        }
    }

    fn drop_datagram(&mut self, reason: &'static str) {
        *self.stats.dropped.entry(reason).or_default() += 1;
    }
}

/// The check value of the traffic key `path` leads to, as a resync request carries it (zero for
/// a path without a root key, which [`wire::PathKeys`] never decodes).
pub fn kcv_of(path: &MemberPath) -> Kcv {
    path.traffic_key()
        .map_or(Kcv([0; lkh_tree::KCV_LEN]), |k| k.check_value())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lkh_tree::{Batch, KeyTree, TreeConfig};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;
    use wire::{Codec, Verified, open};

    const GROUP: GroupId = GroupId(7);
    const ID: MemberId = MemberId(3);
    const START: Millis = 1_000_000;
    const LEADER: &str = "10.0.0.2:47700";

    fn identity() -> SigningKey {
        SigningKey::from_bytes(&[9; 32])
    }

    fn config(controllers: usize) -> MemberConfig {
        let controller = SigningKey::from_bytes(&[42; 32]).verifying_key();
        let mut config = MemberConfig::new(GROUP, controller);
        config.controllers = controllers;
        // No silence timer: the tests follow the request timers alone.
        config.fanout_after_ms = None;
        config
    }

    /// A resync answered with the keys the member holds (it caught up by multicast meanwhile):
    /// the request is done and the lease renewed, so nothing is asked until the next renewal.
    #[test]
    fn a_resync_answered_with_the_keys_held_asks_again_only_at_the_next_renewal() {
        let (mut member, request) = active(1);
        let resync = open::<ResyncRequest>(&request, &identity().verifying_key())
            .unwrap()
            .into_message();
        let path = member.membership().unwrap().1.clone();
        let to = wire::SealedFor {
            kind: SealedKind::Resync,
            member: ID,
            request_nonce: resync.nonce,
            rekey_address: None,
        };
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let sealed = wire::seal_path(&path, &to, &resync.hpke_key, &mut rng).unwrap();
        let reply = sign(&sealed, &SigningKey::from_bytes(&[42; 32]));
        member.handle_reply(START + 10, &reply);
        assert!(member.poll_event().is_none(), "nothing new");
        let renew = member.config().renew_interval_ms;
        member.handle_timeout(START + renew);
        assert!(
            member.poll_request().is_none(),
            "no retry of an answered request"
        );
        member.handle_timeout(START + 10 + renew);
        assert!(member.poll_request().is_some(), "the renewal");
    }

    /// A member holding keys (resumed from its store), its resync request drained.
    fn active(controllers: usize) -> (Member<ChaCha20Rng>, Vec<u8>) {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut tree = KeyTree::new(GROUP, TreeConfig::default(), &mut rng).unwrap();
        let batch = Batch {
            leaves: vec![],
            joins: 4,
        };
        let path = tree.rekey(&batch, &mut rng).unwrap().joiners[1]
            .path
            .clone();
        let hpke = HpkeSecret::generate(Kem::XWing, &mut rng);
        let mut member =
            Member::resume(config(controllers), identity(), hpke, rng, ID, path, START);
        let request = member.poll_request().unwrap();
        (member, request)
    }

    /// A member that registers now, its registration drained.
    fn registering(controllers: usize) -> Member<ChaCha20Rng> {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let hpke = HpkeSecret::generate(Kem::XWing, &mut rng);
        let mut member = Member::new(config(controllers), identity(), hpke, rng, START);
        assert_eq!(
            kind(&member.poll_request().unwrap()),
            MessageType::RegistrationRequest
        );
        member
    }

    fn not_leader(reason: &str) -> Vec<u8> {
        ErrorMessage {
            group: GROUP,
            status: Status::NotLeader,
            reason: reason.into(),
        }
        .to_bytes()
    }

    fn kind(bytes: &[u8]) -> MessageType {
        MessageType::peek(bytes).unwrap()
    }

    fn resync(bytes: &[u8]) -> ResyncRequest {
        let verified: Verified<ResyncRequest> = open(bytes, &identity().verifying_key()).unwrap();
        verified.message().clone()
    }

    fn events(member: &mut Member<ChaCha20Rng>) -> Vec<MemberEvent> {
        std::iter::from_fn(|| member.poll_event()).collect()
    }

    /// The member's id, epoch and traffic key check value.
    fn held(member: &Member<ChaCha20Rng>) -> (MemberId, Epoch, Kcv) {
        let (id, path) = member.membership().unwrap();
        (id, path.epoch(), kcv_of(path))
    }

    /// Fires the member's next timer; the delay to it and what it asked.
    fn next_request(member: &mut Member<ChaCha20Rng>, now: &mut Millis) -> (u64, Vec<u8>) {
        let due = member.poll_timeout().unwrap();
        let gap = due - *now;
        *now = due;
        member.handle_timeout(due);
        (gap, member.poll_request().expect("a request"))
    }

    #[test]
    fn not_leader_keeps_membership_and_keys_and_resyncs_promptly() {
        let (mut member, first) = active(2);
        let before = held(&member);
        let asked = resync(&first);
        member.handle_reply(START + 5, &not_leader(LEADER));
        let said = events(&mut member);
        let [
            MemberEvent::NotLeader {
                leader,
                retry_in_ms,
            },
        ] = said.as_slice()
        else {
            panic!("{said:?}");
        };
        assert_eq!(*leader, Some(LEADER.parse().unwrap()));
        assert!((50..=200).contains(retry_in_ms), "{retry_in_ms} ms");
        assert_eq!(held(&member), before, "keys and membership kept");
        assert_eq!(member.traffic_key().map(|(e, _)| e), Some(before.1));
        assert!(
            member.poll_request().is_none(),
            "nothing asked before the delay"
        );

        let mut now = START + 5;
        let (gap, again) = next_request(&mut member, &mut now);
        assert_eq!(gap, *retry_in_ms);
        let again = resync(&again);
        assert_eq!(
            (again.member, again.epoch),
            (ID, before.1),
            "a resync, not a registration"
        );
        assert_ne!(again.nonce, asked.nonce, "asked afresh");
        assert_eq!(held(&member), before);
    }

    #[test]
    fn not_leader_names_the_leader_only_when_the_reason_is_an_address() {
        let mut member = registering(3);
        let mut now = START;
        for (reason, leader) in [
            ("", None),
            ("leader unknown", None),
            ("[::1]:47700", Some("[::1]:47700")),
            (" 10.0.0.2:47700\n", Some(LEADER)),
            ("10.0.0.2", None),
        ] {
            member.handle_reply(now, &not_leader(reason));
            let said = events(&mut member);
            assert!(
                matches!(said.as_slice(), [MemberEvent::NotLeader { leader: l, .. }]
                    if *l == leader.map(|a| a.parse().unwrap())),
                "{reason:?}: {said:?}"
            );
            let (gap, again) = next_request(&mut member, &mut now);
            assert!((50..=200).contains(&gap), "{reason:?}: {gap} ms");
            assert_eq!(kind(&again), MessageType::RegistrationRequest);
        }
    }

    #[test]
    fn redirects_back_off_once_every_controller_redirected_three_times() {
        let (mut member, _) = active(2);
        let mut now = START;
        let mut gaps = Vec::new();
        for _ in 0..10 {
            member.handle_reply(now, &not_leader(LEADER));
            let said = events(&mut member);
            let Some(MemberEvent::NotLeader { retry_in_ms, .. }) = said.last() else {
                panic!("{said:?}");
            };
            let (gap, again) = next_request(&mut member, &mut now);
            assert_eq!(gap, *retry_in_ms);
            assert_eq!(kind(&again), MessageType::ResyncRequest);
            gaps.push(gap);
        }
        let prompt = 2 * REDIRECT_ROUNDS as usize;
        assert!(
            gaps[..prompt].iter().all(|g| (50..=200).contains(g)),
            "{gaps:?}"
        );
        // Then the back-off of refusals: 2 s, 4 s, 8 s, ... with up to half again at random.
        for (k, gap) in gaps[prompt..].iter().enumerate() {
            let base = 2_000u64 << k.min(4);
            assert!(
                (base..=base * 3 / 2).contains(gap),
                "back-off {k}: {gaps:?}"
            );
        }
        // An answer from the leader resets the budget.
        let outstanding = member.outstanding.unwrap();
        let ack = Ack {
            group: GROUP,
            member: ID,
            acked: Acked::LeaseRenewed,
            request_nonce: outstanding,
            epoch: held(&member).1,
        };
        member.handle_reply(now, &ack.to_bytes());
        assert_eq!(member.outstanding, None);
        let (_, renewal) = next_request(&mut member, &mut now);
        assert_eq!(kind(&renewal), MessageType::ResyncRequest);
        member.handle_reply(now, &not_leader(""));
        let (gap, _) = next_request(&mut member, &mut now);
        assert!((50..=200).contains(&gap), "prompt again: {gap} ms");
    }

    #[test]
    fn forged_not_leaders_change_no_keys_and_only_delay_a_request() {
        let (mut member, _) = active(1);
        let before = held(&member);
        let mut now = START;
        // One after another, answering every request: the member only ever asks again for a
        // resync, as the same member, and never waits longer than the longest back-off.
        for _ in 0..20 {
            member.handle_reply(now, &not_leader("192.0.2.66:47700"));
            assert_eq!(held(&member), before);
            let (gap, again) = next_request(&mut member, &mut now);
            assert!(gap <= 32_000 * 3 / 2, "{gap} ms");
            let again = resync(&again);
            assert_eq!((again.member, again.epoch), (ID, before.1));
        }
        assert!(
            !events(&mut member)
                .iter()
                .any(|e| !matches!(e, MemberEvent::NotLeader { .. })),
            "nothing but the redirects said"
        );
        assert_eq!(member.stats().dropped.values().sum::<u64>(), 0);

        // One with no request outstanding (nothing asked it): dropped, nothing scheduled.
        let ack = Ack {
            group: GroupId(7),
            member: ID,
            acked: Acked::LeaseRenewed,
            request_nonce: member.outstanding.unwrap(),
            epoch: before.1,
        };
        member.handle_reply(now, &ack.to_bytes());
        let timer = member.poll_timeout();
        member.handle_reply(now, &not_leader(LEADER));
        assert!(events(&mut member).is_empty());
        assert!(member.poll_request().is_none());
        assert_eq!(member.poll_timeout(), timer, "the renewal keeps its time");
        assert_eq!(
            member.stats().dropped.get("unexpected not-leader"),
            Some(&1)
        );
        assert_eq!(held(&member), before);

        // A NotLeader for another group is an ordinary refusal: backed off, keys kept.
        let (mut member, _) = active(1);
        let other = ErrorMessage {
            group: GroupId(8),
            status: Status::NotLeader,
            reason: LEADER.into(),
        };
        member.handle_reply(START, &other.to_bytes());
        assert!(matches!(
            events(&mut member).as_slice(),
            [MemberEvent::Refused { .. }]
        ));
        assert!(member.poll_timeout().unwrap() >= START + 2_000);
        assert_eq!(held(&member), before);
    }

    #[test]
    fn an_unreachable_controller_is_asked_past_promptly_within_the_same_budget() {
        let (mut member, _) = active(2);
        let before = held(&member);
        let mut now = START;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            member.handle_unreachable(now);
            let (gap, again) = next_request(&mut member, &mut now);
            assert_eq!(resync(&again).member, ID);
            gaps.push(gap);
        }
        assert!(gaps[..6].iter().all(|g| (50..=200).contains(g)), "{gaps:?}");
        assert!((2_000..=3_000).contains(&gaps[6]), "{gaps:?}");
        assert!((4_000..=6_000).contains(&gaps[7]), "{gaps:?}");
        assert_eq!(held(&member), before);
        assert!(
            events(&mut member).is_empty(),
            "the driver knows; nothing to say"
        );

        // Nothing outstanding: nothing to ask again.
        let mut idle = registering(1);
        idle.leave(START);
        assert!(idle.poll_request().is_none());
        idle.handle_unreachable(START);
        assert_eq!(idle.poll_timeout(), None);
    }

    #[test]
    fn a_redirected_leave_is_sent_again_and_ends_with_its_acknowledgement_or_refusal() {
        let (mut member, _) = active(2);
        member.leave(START);
        assert!(member.leaving());
        assert!(member.membership().is_none(), "keys dropped at once");
        let first = member.poll_request().unwrap();
        assert_eq!(kind(&first), MessageType::Leave);
        member.handle_reply(START, &not_leader(LEADER));
        assert!(matches!(
            events(&mut member).as_slice(),
            [MemberEvent::NotLeader { .. }]
        ));
        let mut now = START;
        let (gap, again) = next_request(&mut member, &mut now);
        assert!((50..=200).contains(&gap));
        let verified: Verified<LeaveRequest> = open(&again, &identity().verifying_key()).unwrap();
        let again = verified.message().clone();
        assert_eq!(again.member, ID);
        // An acknowledgement of the first request does not end it; of this one, it does.
        let first: Verified<LeaveRequest> = open(&first, &identity().verifying_key()).unwrap();
        let ack = |nonce| Ack {
            group: GROUP,
            member: ID,
            acked: Acked::Left,
            request_nonce: nonce,
            epoch: Epoch(1),
        };
        member.handle_reply(now, &ack(first.message().nonce).to_bytes());
        assert!(member.leaving());
        member.handle_reply(now, &ack(again.nonce).to_bytes());
        assert!(!member.leaving());
        assert_eq!(events(&mut member), [MemberEvent::Left { refused: None }]);
        assert_eq!(member.poll_timeout(), None);

        // Refused: over too, with the reason.
        let (mut member, _) = active(1);
        member.leave(START);
        assert_eq!(kind(&member.poll_request().unwrap()), MessageType::Leave);
        let refusal = ErrorMessage {
            group: GROUP,
            status: Status::NotAMember,
            reason: "gone".into(),
        };
        member.handle_reply(START, &refusal.to_bytes());
        assert_eq!(
            events(&mut member),
            [MemberEvent::Left {
                refused: Some((Status::NotAMember, "gone".into()))
            }]
        );
        assert!(!member.leaving() && member.poll_request().is_none());
    }

    #[test]
    fn a_fanout_member_subscribes_with_a_new_controller_at_once() {
        let (mut member, _) = active(2);
        member.use_fanout(START);
        member.handle_timeout(START);
        assert!(member.poll_datagram().is_some(), "subscribed");
        let later = START + 100;
        assert!(member.poll_timeout().unwrap() > later);
        member.controller_changed(later);
        assert_eq!(member.poll_timeout(), Some(later));
        member.handle_timeout(later);
        assert_eq!(
            kind(&member.poll_datagram().unwrap()),
            MessageType::Subscribe,
            "subscribed again"
        );
    }
}

//! # gkm-member: the member agent
//!
//! [`Member`] is a group member's protocol logic as a sans-I/O state machine: it registers, applies
//! verified rekeys, notices when it fell behind and resyncs, renews its lease, re-registers when
//! its membership ended, and leaves. It never touches a socket, a clock or the OS random source.
//!
//! ```text
//! driver loop:  reply to a request ──► handle_reply(now, bytes)
//!               multicast datagram ──► handle_datagram(now, bytes)
//!               timer fired        ──► handle_timeout(now)
//!               then drain         ◄── poll_request()   (bytes to send to the controller)
//!                                  ◄── poll_event()     (joined, key changed, evicted, ...)
//!               sleep until        ◄── poll_timeout()
//! ```
//!
//! Every datagram goes raw → authentic (Ed25519 under the pinned controller key) → fresh (the
//! next epoch of its group) → applied; anything else is counted and dropped and changes nothing.
//!
//! [`data_keys::KeySchedule`] is the agent's other decision, also without I/O: which traffic key
//! its applications send with and which they accept around a rekey (activation and deactivation
//! delays).
//!
//! What it does not do: sockets, files, the local API socket (see the binary).

#![forbid(unsafe_code)]

pub mod data_keys;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use ed25519_dalek::{SigningKey, VerifyingKey};
use lkh_tree::{Epoch, GroupId, Kcv, MemberPath, TrafficKey};
use rand_core::CryptoRng;
use wire::{
    Ack, Acked, AuthenticRekey, Cookie, CookieReply, ErrorMessage, FreshRekey, Heartbeat, HeldPath,
    HpkeSecret, LeaveRequest, MemberId, MessageType, NONCE_LEN, RegistrationRequest, RekeyDatagram,
    ResyncRequest, SealedKind, SealedPath, Status, Subscribe, WireError, open, open_path, sign,
};

/// Milliseconds since the Unix epoch, as the driver's clock reads them.
pub type Millis = u64;

/// A member's fixed parameters.
#[derive(Clone, Debug)]
pub struct MemberConfig {
    /// The group to join.
    pub group: GroupId,
    /// The controller's pinned Ed25519 public key.
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
}

impl MemberConfig {
    /// Defaults: renew every 20 s, resync after 300 ms behind, retry after 2 s, register again
    /// within 5 s of a membership's end, fan-out after 10 s without a verified datagram.
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
    /// Nothing verified arrived by multicast for [`MemberConfig::fanout_after_ms`]: the member
    /// now asks the controller for unicast fan-out (its datagrams come from
    /// [`Member::poll_datagram`], to the controller's UDP port; the driver feeds what comes back
    /// to [`Member::handle_datagram`]).
    FanoutStarted,
    /// The controller has no such group (removed, or never configured): the member stops and
    /// asks nothing more (a daemon exits, telling its operator to check the group).
    GroupUnknown {
        /// What the controller said (network text: print it escaped).
        reason: String,
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
    /// Resyncs received.
    pub resyncs: u64,
    /// Datagrams refused, by reason.
    pub dropped: BTreeMap<&'static str, u64>,
}

enum State {
    /// Waiting for a welcome to the request with this nonce.
    Registering { nonce: [u8; NONCE_LEN] },
    /// A member with keys.
    Active { member: MemberId, path: HeldPath },
    /// A membership ended; registers again at `retry_at`.
    Ended,
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
    /// When to ask for a resync because we are behind.
    resync_at: Option<Millis>,
    renew_at: Option<Millis>,
    /// Where the controller said the group's rekeys are multicast.
    rekey_address: Option<SocketAddr>,
    stats: MemberStats,
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
        Member {
            config,
            identity,
            hpke,
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
            resync_at: None,
            renew_at: None,
            rekey_address: None,
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

    /// The earliest time [`Member::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let subscribe_at = match self.delivery {
            Delivery::Fanout { subscribe_at, .. } => Some(subscribe_at),
            Delivery::Multicast => None,
        };
        [
            self.retry_at,
            self.resync_at,
            self.renew_at,
            subscribe_at,
            self.silence_at(),
        ]
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

    /// Leaves the group: queues a signed leave request; the member does nothing more.
    pub fn leave(&mut self, now: Millis) {
        if let State::Active { member, .. } = self.state {
            let request = LeaveRequest {
                group: self.config.group,
                member,
                timestamp_ms: now,
                nonce: self.nonce(),
            };
            self.requests.push_back(sign(&request, &self.identity));
        }
        self.state = State::Left;
        self.retry_at = None;
        self.resync_at = None;
        self.renew_at = None;
    }

    /// The rekey channel has been silent for longer than heartbeats allow: asks the controller for
    /// the current path keys (a resync, after the usual grace). A member that is no longer one
    /// learns it from the answer and registers again. Does nothing unless admitted.
    pub fn check_in(&mut self, now: Millis) {
        if matches!(self.state, State::Active { .. }) {
            self.behind(now);
        }
    }

    /// Timers: registration retries, resyncs when behind, lease renewals.
    pub fn handle_timeout(&mut self, now: Millis) {
        if self.silence_at().is_some_and(|t| t <= now) {
            self.silent(now);
        }
        self.subscribe_when_due(now);
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            self.unanswered = self.unanswered.saturating_add(1);
            match self.state {
                State::Registering { .. } | State::Ended => self.register(now),
                State::Active { .. } => self.send_resync(now),
                State::Left | State::Stopped => {}
            }
        }
        if self.resync_at.is_some_and(|t| t <= now) {
            self.resync_at = None;
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
            Ok(MessageType::Rekey) => self.rekey(now, bytes),
            Ok(MessageType::Heartbeat) => self.heartbeat(now, bytes),
            Ok(MessageType::CookieReply) => self.cookie(now, bytes),
            _ => self.drop_datagram("not a rekey or heartbeat"),
        }
    }

    /// The reply to a request: a welcome, a resync response, an acknowledgement or an error
    /// message.
    pub fn handle_reply(&mut self, now: Millis, bytes: &[u8]) {
        self.unanswered = 0;
        match MessageType::peek(bytes) {
            Ok(MessageType::Welcome | MessageType::ResyncResponse) => self.sealed(now, bytes),
            Ok(MessageType::Ack) => self.acknowledged(now, bytes),
            Ok(MessageType::Error) => self.error(now, bytes),
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
        let authentic = match AuthenticRekey::verify(bytes, &self.config.controller) {
            Ok(a) => a,
            Err(WireError::BadSignature) => return self.drop_datagram("bad signature"),
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
                self.resync_at = None;
                self.events.push_back(MemberEvent::KeyChanged {
                    epoch: applied.epoch,
                    kcv: applied.kcv,
                });
            }
            Err(WireError::Stale { .. }) => self.drop_datagram("stale or replayed"),
            Err(WireError::NotForMe) => self.drop_datagram("for other members"),
            Err(WireError::WrongGroup { .. }) => self.drop_datagram("other group"),
            Err(WireError::Gap { .. }) => {
                self.drop_datagram("missed an epoch");
                self.behind(now);
            }
            Err(_) => {
                self.drop_datagram("inconsistent");
                self.behind(now);
            }
        }
    }

    fn heartbeat(&mut self, now: Millis, bytes: &[u8]) {
        let State::Active { path, .. } = &self.state else {
            return;
        };
        let (group, mine) = (path.group(), path.epoch());
        let kcv = path.traffic_key().map(|k| k.check_value());
        let in_step = |beat: &Heartbeat| {
            beat.group != group
                || beat.epoch < mine
                || (beat.epoch == mine && Some(beat.kcv) == kcv)
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
        let Ok(beat) = open::<Heartbeat>(bytes, &self.config.controller) else {
            return self.drop_datagram("bad heartbeat");
        };
        if beat.message().group == group {
            self.heard_at = now;
        }
        if !in_step(beat.message()) {
            self.behind(now);
        }
    }

    /// Schedules a resync unless one is already scheduled or outstanding.
    fn behind(&mut self, now: Millis) {
        if self.resync_at.is_none() && self.outstanding.is_none() {
            self.resync_at = Some(now + self.config.resync_grace_ms);
        }
    }

    fn sealed(&mut self, now: Millis, bytes: &[u8]) {
        let Ok(verified) = open::<SealedPath>(bytes, &self.config.controller) else {
            return self.drop_datagram("bad sealed path");
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
            self.outstanding = None;
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
        self.resync_at = None;
        self.renew_at = Some(now + self.config.renew_interval_ms);
        self.events.push_back(event);
    }

    /// An acknowledgement of this member's outstanding renewal: the lease runs on.
    fn acknowledged(&mut self, now: Millis, bytes: &[u8]) {
        let Ok(ack) = <Ack as wire::Codec>::decode_exact(bytes) else {
            return self.drop_datagram("malformed acknowledgement");
        };
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
        self.retry_at = None;
        self.renew_at = Some(now + self.config.renew_interval_ms);
    }

    fn error(&mut self, now: Millis, bytes: &[u8]) {
        let Ok(message) = <ErrorMessage as wire::Codec>::decode_exact(bytes) else {
            return self.drop_datagram("malformed error");
        };
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
                self.resync_at = None;
            }
            Status::UnknownGroup if message.group == self.config.group => {
                self.events.push_back(MemberEvent::GroupUnknown {
                    reason: message.reason,
                });
                self.state = State::Stopped;
                self.retry_at = None;
                self.renew_at = None;
                self.resync_at = None;
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

    fn register(&mut self, now: Millis) {
        let nonce = self.nonce();
        let Ok(hpke_key) = self.hpke.public_key() else {
            return;
        };
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
        self.resync_at = None;
    }

    fn send_resync(&mut self, now: Millis) {
        let State::Active { member, path } = &self.state else {
            return;
        };
        let (member, epoch, kcv) = (*member, path.epoch(), kcv_of(path));
        let nonce = self.nonce();
        let request = ResyncRequest {
            group: self.config.group,
            member,
            epoch,
            kcv,
            timestamp_ms: now,
            nonce,
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

//! Admission: a request's checks (signature, freshness, replay, authorization, membership)
//! and what it is answered: registrations, resyncs and renewals, leaves, fan-out subscriptions.

use super::*;

/// A refused request: why (counted by reason), the group it named, the reason the requester is
/// given (the same, unless telling would reveal something), and what it is told when there is
/// more to say than that reason's name.
pub(super) struct Refusal {
    pub(super) reason: Reject,
    pub(super) group: GroupId,
    pub(super) answered: Reject,
    pub(super) told: Option<String>,
}

impl From<(Reject, GroupId)> for Refusal {
    fn from((reason, group): (Reject, GroupId)) -> Self {
        Refusal {
            reason,
            group,
            answered: reason,
            told: None,
        }
    }
}

/// A registration request whose Ed25519 signature verified under the identity key it carries,
/// with the HPKE encapsulation its welcome will be sealed with (so its key is known usable).
///
/// Only [`verify_request`] makes one (the fields are private), and the controller's join logic
/// takes nothing else, so bytes whose signature was not checked cannot reach it:
///
/// ```compile_fail
/// # fn forge(request: wire::RegistrationRequest) -> gkm_server::VerifiedRegistration {
/// gkm_server::VerifiedRegistration { request, encapsulation: todo!() }
/// # }
/// ```
#[derive(Debug)]
pub struct VerifiedRegistration {
    request: RegistrationRequest,
    encapsulation: Encapsulation,
}

impl VerifiedRegistration {
    /// The request.
    pub fn request(&self) -> &RegistrationRequest {
        &self.request
    }
}

/// Equal when the requests are (the encapsulations are random and secret).
impl PartialEq for VerifiedRegistration {
    fn eq(&self, other: &Self) -> bool {
        self.request == other.request
    }
}

/// A resync, leave or fan-out subscription, decoded enough to know its kind. It is signed by a
/// member's identity key, which only the controller's state holds: either the controller
/// verifies it against the member's record ([`Controller::handle_inbound`]), or a driver checks
/// it off the controller's thread first: [`Controller::signer_of`] names the key (a lookup),
/// [`MemberSigned::check`] verifies the signature under it (on any thread), and the controller
/// then only compares keys (GKM-V058).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSigned {
    kind: MessageType,
    bytes: Vec<u8>,
    checked: Option<Checked>,
    /// A subscription whose cheap checks [`Controller::admit_subscription`] passed (its source's
    /// budget spent for it), so they are not made again.
    admitted: bool,
}

/// What [`MemberSigned::check`] found, under which identity key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Checked {
    /// The signature verified: the message, trusted as far as that key is the member's.
    Valid { identity: [u8; 32], message: Opened },
    /// It did not.
    Invalid { identity: [u8; 32] },
}

/// A member-signed message whose signature verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Opened {
    Resync(ResyncRequest),
    Leave(LeaveRequest),
    Subscribe(Subscribe),
}

/// The member-signed messages.
pub(super) trait MemberMessage: Codec + Sized {
    /// The group and member it names.
    fn names(&self) -> (GroupId, MemberId);
    /// It, from a checked message of its kind.
    fn take(opened: Opened) -> Option<Self>;
    /// It, as a checked message.
    fn wrap(self) -> Opened;
}

impl MemberMessage for ResyncRequest {
    fn names(&self) -> (GroupId, MemberId) {
        (self.group, self.member)
    }
    fn take(opened: Opened) -> Option<Self> {
        match opened {
            Opened::Resync(r) => Some(r),
            _ => None,
        }
    }
    fn wrap(self) -> Opened {
        Opened::Resync(self)
    }
}

impl MemberMessage for LeaveRequest {
    fn names(&self) -> (GroupId, MemberId) {
        (self.group, self.member)
    }
    fn take(opened: Opened) -> Option<Self> {
        match opened {
            Opened::Leave(r) => Some(r),
            _ => None,
        }
    }
    fn wrap(self) -> Opened {
        Opened::Leave(self)
    }
}

impl MemberMessage for Subscribe {
    fn names(&self) -> (GroupId, MemberId) {
        (self.group, self.member)
    }
    fn take(opened: Opened) -> Option<Self> {
        match opened {
            Opened::Subscribe(r) => Some(r),
            _ => None,
        }
    }
    fn wrap(self) -> Opened {
        Opened::Subscribe(self)
    }
}

impl MemberSigned {
    /// A fan-out subscription datagram, to check off the controller's thread before
    /// [`Controller::handle_checked_subscription`].
    pub fn subscription(bytes: Vec<u8>) -> MemberSigned {
        MemberSigned {
            kind: MessageType::Subscribe,
            bytes,
            checked: None,
            admitted: false,
        }
    }

    /// The group and member it names (not yet trusted), if it decodes.
    pub(super) fn names(&self) -> Option<(GroupId, MemberId)> {
        match self.kind {
            MessageType::ResyncRequest => self.decoded::<ResyncRequest>().map(|m| m.names()),
            MessageType::Leave => self.decoded::<LeaveRequest>().map(|m| m.names()),
            MessageType::Subscribe => self.decoded::<Subscribe>().map(|m| m.names()),
            _ => None,
        }
    }

    /// The message, decoded but not verified, if it is of kind `T`.
    pub(super) fn decoded<T: MemberMessage>(&self) -> Option<T> {
        T::decode(&mut wire::Reader::new(&self.bytes)).ok()
    }

    /// Verifies the signature under `identity`, the key [`Controller::signer_of`] named: one
    /// Ed25519 verification, on any thread. Without a key nothing is checked; the controller
    /// then answers as for any request naming no member.
    pub fn check(mut self, identity: Option<[u8; 32]>) -> MemberSigned {
        let Some(identity) = identity else {
            return self;
        };
        let opened = match self.kind {
            MessageType::ResyncRequest => Self::open::<ResyncRequest>(&self.bytes, &identity),
            MessageType::Leave => Self::open::<LeaveRequest>(&self.bytes, &identity),
            MessageType::Subscribe => Self::open::<Subscribe>(&self.bytes, &identity),
            _ => None,
        };
        self.checked = Some(match opened {
            Some(message) => Checked::Valid { identity, message },
            None => Checked::Invalid { identity },
        });
        self
    }

    pub(super) fn open<T: MemberMessage>(bytes: &[u8], identity: &[u8; 32]) -> Option<Opened> {
        open_with::<T>(bytes, |_| verifying_key(identity))
            .ok()
            .map(|v| v.into_message().wrap())
    }
}

/// What [`verify_request`] makes of a request's bytes.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    /// A registration whose signature verified (boxed: it holds the welcome's HPKE context).
    Registration(Box<VerifiedRegistration>),
    /// A resync or leave, verified by the controller against the member's record.
    MemberSigned(MemberSigned),
    /// A request for the group's chain of signing-key announcements (unsigned: the answer is
    /// public, and each link in it is signed).
    KeyChain(KeyChainRequest),
    /// Refused before any state was consulted: malformed, a bad signature, or a kind a
    /// controller does not accept.
    Refused(Reject),
}

/// The checks of a request that need no controller state, as a function of the bytes and an
/// RNG: it decodes a registration request and verifies its Ed25519 signature under the identity
/// key it names, before anything in it is used; then it makes the HPKE encapsulation of the
/// welcome to the request's key (refusing a key no welcome can be sealed to, GKM-V037). That is
/// one signature verification and the welcome's X25519 work, on any thread, many at once; the
/// controller then checks freshness, replay and authorization ([`Controller::handle_inbound`])
/// and seals the welcome with a symmetric key only. Resync and leave requests are passed
/// through as [`Inbound::MemberSigned`]: their key is in the controller's state.
///
/// ```
/// use gkm_server::{Inbound, Reject, verify_request};
/// use rand_core::SeedableRng;
/// let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
/// // Bytes that are not a signed request never become a verified registration.
/// let inbound = verify_request(b"not a request".to_vec(), &mut rng);
/// assert_eq!(inbound, Inbound::Refused(Reject::Malformed));
/// # let _: Option<wire::RegistrationRequest> = None;
/// ```
pub fn verify_request<R: CryptoRng + ?Sized>(bytes: Vec<u8>, rng: &mut R) -> Inbound {
    match MessageType::peek(&bytes) {
        Ok(MessageType::RegistrationRequest) => {
            let request =
                match open_with::<RegistrationRequest>(&bytes, |r| verifying_key(&r.identity)) {
                    Ok(verified) => verified.into_message(),
                    Err(error) => return Inbound::Refused(wire_reject(&error)),
                };
            match Encapsulation::new(&request.hpke_key, request.group, rng) {
                Ok(encapsulation) => Inbound::Registration(Box::new(VerifiedRegistration {
                    request,
                    encapsulation,
                })),
                Err(_) => Inbound::Refused(Reject::Malformed),
            }
        }
        Ok(MessageType::KeyChainRequest) => match KeyChainRequest::decode_exact(&bytes) {
            Ok(request) => Inbound::KeyChain(request),
            Err(_) => Inbound::Refused(Reject::Malformed),
        },
        Ok(kind @ (MessageType::ResyncRequest | MessageType::Leave)) => {
            Inbound::MemberSigned(MemberSigned {
                kind,
                bytes,
                checked: None,
                admitted: false,
            })
        }
        Ok(_) => Inbound::Refused(Reject::UnexpectedMessage),
        Err(_) => Inbound::Refused(Reject::Malformed),
    }
}

/// Requests of one group held while its save is outstanding.
pub(super) const MAX_DEFERRED: usize = 4_096;

impl Inbound {
    /// The group it names, unverified.
    pub(super) fn group(&self) -> Option<GroupId> {
        match self {
            Inbound::Registration(r) => Some(r.request.group),
            Inbound::MemberSigned(signed) => signed.names().map(|(gid, _)| gid),
            Inbound::KeyChain(request) => Some(request.group),
            Inbound::Refused(_) => None,
        }
    }
}

pub(super) fn wire_reject(error: &WireError) -> Reject {
    match error {
        WireError::BadSignature => Reject::BadSignature,
        _ => Reject::Malformed,
    }
}

impl<R: CryptoRng> Controller<R> {
    /// A request from a member's connection: registration, resync (also renews the lease) or
    /// leave. The reply, if any, comes out of [`Controller::poll_transmit`]. The same as
    /// [`Controller::handle_inbound`] of [`verify_request`]`(bytes)`; a driver that wants the
    /// signature checks off the controller's thread calls those two itself.
    pub fn handle_request(&mut self, conn: ConnId, now: Timestamp, bytes: &[u8]) {
        let inbound = verify_request(bytes.to_vec(), &mut self.rng);
        self.handle_inbound(conn, now, inbound);
    }

    /// A request after [`verify_request`]: the checks that need the controller's state
    /// (freshness, replay, authorization, membership; a member-signed request's signature) and
    /// then the request itself. The reply, if any, comes out of [`Controller::poll_transmit`].
    pub fn handle_inbound(&mut self, conn: ConnId, now: Timestamp, inbound: Inbound) {
        // A group another controller leads: the member is sent there.
        if let Some(gid) = inbound.group()
            && let Some(leader) = self.standby.get(&gid).map(|s| s.leader)
        {
            let refusal = Refusal {
                reason: Reject::NotLeader,
                group: gid,
                answered: Reject::NotLeader,
                told: Some(leader.map_or_else(String::new, |a| a.to_string())),
            };
            return self.reject(conn, now, refusal);
        }
        // While a rekey of the group is staged, its tree and roster are not to be read: the
        // request waits for the save's outcome (bounded; past that, the member tries again).
        if let Some(g) = inbound.group().and_then(|gid| self.groups.get_mut(&gid))
            && g.persisting.is_some()
        {
            if g.deferred.len() < MAX_DEFERRED {
                g.deferred.push_back((conn, inbound));
                return;
            }
            let gid = g.policy.id;
            return self.reject(conn, now, (Reject::Busy, gid).into());
        }
        let outcome = match inbound {
            Inbound::Registration(request) => {
                self.register(conn, now, *request).map_err(Refusal::from)
            }
            Inbound::MemberSigned(signed) => match signed.kind {
                MessageType::ResyncRequest => self.resync(conn, now, signed),
                MessageType::Leave => self.leave(conn, now, signed),
                _ => Err((Reject::UnexpectedMessage, GroupId(0)).into()),
            },
            Inbound::KeyChain(request) => self.key_chain(conn, &request),
            Inbound::Refused(reason) => Err((reason, GroupId(0)).into()),
        };
        if let Err(refusal) = outcome {
            self.reject(conn, now, refusal);
        }
    }

    /// A fan-out subscription datagram ([`wire::Subscribe`]) from `from`, where multicast does
    /// not reach a member. Signed by a current member and fresh, without a cookie it is answered
    /// with one, sent to `from` (smaller than the request; at most one per member a second and
    /// [`crate::SOURCE_BUDGET`] per source address a second); echoing a valid cookie from `from`, it
    /// makes `from` the member's one fan-out address ([`Controller::fanout_addresses`]).
    /// Refusals change nothing and are answered with nothing.
    pub fn handle_subscription(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Result<Subscription, Reject> {
        self.handle_checked_subscription(now, from, MemberSigned::subscription(bytes.to_vec()))
    }

    /// As [`Controller::handle_subscription`], for a subscription the driver checked with
    /// [`MemberSigned::check`] off the controller's thread (or not: then it is verified here).
    pub fn handle_checked_subscription(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        signed: MemberSigned,
    ) -> Result<Subscription, Reject> {
        if signed.kind != MessageType::Subscribe {
            return Err(Reject::UnexpectedMessage);
        }
        let admitted = signed.admitted;
        let request = self
            .member_request::<Subscribe>(signed)
            .map_err(|refusal| refusal.reason)?;
        let (gid, member) = (request.group, request.member);
        let g = self.groups.get_mut(&gid).ok_or(Reject::UnknownGroup)?;
        if !g.policy.fanout {
            return Err(Reject::UnexpectedMessage);
        }
        g.check_fresh(now, request.timestamp_ms, request.nonce)?;
        match request.cookie {
            Some(cookie) => {
                if !self.cookies.valid(gid, member, from, &cookie, now) {
                    return Err(Reject::BadCookie);
                }
                g.subscribers.confirm(member, from, now);
                Ok(Subscription::Confirmed { group: gid, member })
            }
            None => {
                if !g.subscribers.may_send_cookie(member, now)
                    || !(admitted || self.cookies.spend(from.ip(), now))
                {
                    return Err(Reject::RateLimited);
                }
                let cookie = Cookie {
                    issued_ms: now.0,
                    mac: self.cookies.mac(gid, member, from, now.0),
                };
                let reply = CookieReply {
                    group: gid,
                    member,
                    cookie,
                };
                Ok(Subscription::Cookie(reply.to_bytes()))
            }
        }
    }

    /// The requests that waited for group `id`'s save.
    pub(super) fn handle_deferred(&mut self, id: GroupId, now: Timestamp) {
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        for (conn, inbound) in std::mem::take(&mut g.deferred) {
            self.handle_inbound(conn, now, inbound);
        }
    }

    /// A positive reply to a request that needed no keys.
    pub(super) fn ack(&mut self, conn: ConnId, ack: &Ack) {
        self.transmits.push_back(Transmit::Reply {
            conn,
            bytes: ack.to_bytes(),
        });
    }

    /// The group a request names, once its timestamp and nonce are fresh.
    pub(super) fn fresh_group(
        &mut self,
        gid: GroupId,
        now: Timestamp,
        at_ms: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<&mut Group, (Reject, GroupId)> {
        let g = self
            .groups
            .get_mut(&gid)
            .ok_or((Reject::UnknownGroup, gid))?;
        g.check_fresh(now, at_ms, nonce).map_err(|r| (r, gid))?;
        Ok(g)
    }

    pub(super) fn reject(&mut self, conn: ConnId, now: Timestamp, refusal: Refusal) {
        let Refusal {
            reason,
            group,
            answered,
            told,
        } = refusal;
        *self.rejects.entry(reason).or_default() += 1;
        if let Some(g) = self.groups.get_mut(&group) {
            *g.stats.rejects.entry(reason).or_default() += 1;
        }
        self.events.push_back(Event::Rejected { reason, at: now.0 });
        let message = ErrorMessage {
            group,
            status: answered.status(),
            reason: told.unwrap_or_else(|| match answered {
                Reject::UnknownGroup => format!("this controller has no group with id {}", group.0),
                Reject::KemNotAccepted => self.groups.get(&group).map_or_else(
                    || "KemNotAccepted".to_owned(),
                    |g| format!("accepts: {}", kem_names(&g.policy.kems)),
                ),
                other => format!("{other:?}"),
            }),
        };
        self.transmits.push_back(Transmit::Reply {
            conn,
            bytes: message.to_bytes(),
        });
    }

    /// The join logic: takes only a [`VerifiedRegistration`], so nothing here reads a request
    /// whose signature was not checked.
    pub(super) fn register(
        &mut self,
        conn: ConnId,
        now: Timestamp,
        request: VerifiedRegistration,
    ) -> Result<(), (Reject, GroupId)> {
        let VerifiedRegistration {
            request,
            encapsulation,
        } = request;
        let gid = request.group;
        // The nonce is recorded only once the registration is authorized: refused strangers
        // fill no memory of the controller's.
        let g = self
            .groups
            .get_mut(&gid)
            .ok_or((Reject::UnknownGroup, gid))?;
        g.check_window(now, request.timestamp_ms, request.nonce)
            .map_err(|r| (r, gid))?;
        let hpke = HpkeDigest::of_recipient(&encapsulation);
        if !g.policy.kems.contains(&hpke.kem) {
            return Err((Reject::KemNotAccepted, gid));
        }
        let join = PendingJoin {
            conn,
            identity: request.identity,
            nonce: request.nonce,
            encapsulation,
        };
        // A retry while the first request waits for its batch replaces it (its token is spent).
        let Some(join) = g.joins.replace(join) else {
            g.remember(now, request.nonce);
            return Ok(());
        };
        // A current member registering again was authorized before. With the same HPKE key it
        // is a retry whose welcome it missed: it gets its current path, and nobody else is
        // rekeyed. With a new key it lost its keys: a new leaf, and the old one departs. Anyone
        // else, a member whose departure is pending included, must be authorized now.
        match g.members.by_identity(&request.identity) {
            Some(old) if !g.departures.contains_key(&old) => {
                let same_key = g.members.get(old).is_some_and(|r| r.hpke == hpke);
                if same_key {
                    g.remember(now, request.nonce);
                    return self.rewelcome(now, gid, old, join);
                }
                g.departures.insert(old, DepartReason::Replaced);
            }
            _ => g
                .gate
                .authorize(&g.policy.enrollment, &request, now)
                .map_err(|r| (r, gid))?,
        }
        g.remember(now, request.nonce);
        g.joins.push(join);
        g.schedule(now);
        Ok(())
    }

    pub(super) fn resync(
        &mut self,
        conn: ConnId,
        now: Timestamp,
        signed: MemberSigned,
    ) -> Result<(), Refusal> {
        let request = self.member_request::<ResyncRequest>(signed)?;
        let gid = request.group;
        let g = self.fresh_group(gid, now, request.timestamp_ms, request.nonce)?;
        let record = g
            .members
            .get(request.member)
            .ok_or((Reject::NotAMember, gid))?;
        if !record.hpke.matches(&request.hpke_key) {
            return Err(Refusal {
                told: Some(
                    "this HPKE key is not the one the member registered with: register again"
                        .into(),
                ),
                ..(Reject::WrongHpkeKey, gid).into()
            });
        }
        g.members.renew(request.member, now.plus(g.policy.lease_ms));
        // Renewed only if the member holds this epoch's keys: the same epoch number with other
        // keys (a controller that went back) is answered with the path.
        let epoch = g.tree.epoch();
        let current = g.kcv();
        let held = request.epoch == epoch && request.kcv == current;
        if held || g.in_flight(request.epoch, request.kcv, now) {
            let ack = Ack {
                group: gid,
                member: request.member,
                acked: Acked::LeaseRenewed,
                request_nonce: request.nonce,
                epoch,
            };
            self.ack(conn, &ack);
            return Ok(());
        }
        // A path costs an HPKE seal: one per member per RESYNC_INTERVAL_MS, unless the epoch
        // moved since its last (a member that lost two rekeys in a row is not held back).
        if !g.resynced.allow_in(request.member, now, epoch.0) {
            return Err((Reject::RateLimited, gid).into());
        }
        // A path is sealed only under a KEM the policy takes now (it may have been tightened
        // since the member registered): the member registers again with a key it takes.
        if !g.policy.kems.contains(&record.hpke.kem) {
            return Err((Reject::KemNotAccepted, gid).into());
        }
        g.stats.resyncs += 1;
        let to = SealedFor {
            kind: SealedKind::Resync,
            member: request.member,
            request_nonce: request.nonce,
            rekey_address: g.policy.rekey_address,
        };
        let encapsulation = Encapsulation::new(&request.hpke_key, gid, &mut self.rng)
            .map_err(|_| (Reject::Malformed, gid))?;
        Ok(self.reply_path(conn, gid, record.leaf, &to, encapsulation)?)
    }

    /// A current member's registration with the keys it has: a welcome with its current path,
    /// and its lease renewed. No rekey: it could already read everything up to now.
    pub(super) fn rewelcome(
        &mut self,
        now: Timestamp,
        gid: GroupId,
        member: MemberId,
        join: PendingJoin,
    ) -> Result<(), (Reject, GroupId)> {
        let g = self
            .group_mut(gid)
            .map_err(|_| (Reject::UnknownGroup, gid))?;
        let leaf = g.members.get(member).ok_or((Reject::NotAMember, gid))?.leaf;
        let epoch = g.tree.epoch();
        let to = join.welcome_for(member, g.policy.rekey_address);
        self.reply_path(join.conn, gid, leaf, &to, join.encapsulation)?;
        let g = self
            .group_mut(gid)
            .map_err(|_| (Reject::UnknownGroup, gid))?;
        g.members.renew(member, now.plus(g.policy.lease_ms));
        g.stats.registrations += 1;
        self.events.push_back(Event::Rewelcomed {
            group: gid.0,
            member: member.0,
            epoch: epoch.0,
            at: now.0,
        });
        Ok(())
    }

    /// Seals the current path of `leaf` to `to` and queues it, signed, as the reply on `conn`.
    pub(super) fn reply_path(
        &mut self,
        conn: ConnId,
        gid: GroupId,
        leaf: NodeId,
        to: &SealedFor,
        encapsulation: Encapsulation,
    ) -> Result<(), (Reject, GroupId)> {
        let g = self.groups.get(&gid).ok_or((Reject::UnknownGroup, gid))?;
        let path = g.tree.member_path(leaf).ok_or((Reject::NotAMember, gid))?;
        let sealed =
            seal_path_with(&path, to, encapsulation).map_err(|_| (Reject::Malformed, gid))?;
        let bytes = sign(&sealed, g.signing.signer(&self.signer));
        self.transmits.push_back(Transmit::Reply { conn, bytes });
        Ok(())
    }

    /// Answers a chain request with the announcements that lead from the key it names; a key
    /// the kept chain does not reach is refused ([`Reject::SigningKeyUnknown`]: the member must
    /// be given the current key).
    fn key_chain(&mut self, conn: ConnId, request: &KeyChainRequest) -> Result<(), Refusal> {
        let gid = request.group;
        let g = self.groups.get(&gid).ok_or((Reject::UnknownGroup, gid))?;
        let own = self.signer.verifying_key().to_bytes();
        let Some(announcements) = g.signing.links_after(&request.known_key, &own) else {
            let current = hex(&g.signing.signer(&self.signer).verifying_key().to_bytes());
            return Err(Refusal {
                reason: Reject::SigningKeyUnknown,
                group: gid,
                answered: Reject::SigningKeyUnknown,
                told: Some(format!(
                    "the group's signing key is {current} (key {}); the key this member holds \
                     is not in the chain kept: give it the current key (--controller-key)",
                    g.signing.current_id()
                )),
            });
        };
        let chain = KeyChain {
            group: gid,
            request_nonce: request.nonce,
            announcements,
        };
        self.transmits.push_back(Transmit::Reply {
            conn,
            bytes: chain.to_bytes(),
        });
        Ok(())
    }

    pub(super) fn leave(
        &mut self,
        conn: ConnId,
        now: Timestamp,
        signed: MemberSigned,
    ) -> Result<(), Refusal> {
        let request = self.member_request::<LeaveRequest>(signed)?;
        let gid = request.group;
        let g = self.fresh_group(gid, now, request.timestamp_ms, request.nonce)?;
        g.departures.insert(request.member, DepartReason::Left);
        g.schedule(now);
        let ack = Ack {
            group: gid,
            member: request.member,
            acked: Acked::Left,
            request_nonce: request.nonce,
            epoch: g.tree.epoch(),
        };
        self.ack(conn, &ack);
        Ok(())
    }

    /// The cheap checks of a fan-out subscription, made before its signature is verified (off
    /// the controller's thread): the group takes fan-out, an echoed cookie is this controller's
    /// for the source address, a request for a cookie fits its source's budget (8 a second,
    /// spent here). Then the identity key to verify it under, as [`Controller::signer_of`].
    /// `None`: drop it unverified. A flood of forged subscriptions thus costs at most the
    /// source budget in signature checks per source (a spoofed source can spend another's
    /// budget, as it could before).
    pub fn admit_subscription(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        signed: &mut MemberSigned,
    ) -> Option<[u8; 32]> {
        let request = signed.decoded::<Subscribe>()?;
        let (gid, member) = request.names();
        let g = self.groups.get(&gid)?;
        if !g.policy.fanout {
            return None;
        }
        match request.cookie {
            Some(cookie) => self.cookies.valid(gid, member, from, &cookie, now),
            None => self.cookies.spend(from.ip(), now),
        }
        .then_some(())?;
        signed.admitted = true;
        self.signer(gid, member).map(|(identity, _)| identity)
    }

    /// Member signatures (resync, leave, subscription) verified on the controller's own thread
    /// so far: those no driver checked beforehand with [`MemberSigned::check`]. The daemon's stay
    /// at zero (GKM-V058).
    pub fn signatures_verified(&self) -> u64 {
        self.signatures_verified.get()
    }

    /// The identity key a member-signed message must be signed with: the named member's, or,
    /// for a member departed lately, the one it had (it alone may learn why it left). `None` for
    /// a message that does not decode or names no such member. A lookup, for a driver that
    /// verifies signatures off the controller's thread ([`MemberSigned::check`]).
    pub fn signer_of(&self, signed: &MemberSigned) -> Option<[u8; 32]> {
        let (gid, member) = signed.names()?;
        self.signer(gid, member).map(|(identity, _)| identity)
    }

    /// The identity key `member` of `gid` signs with, and its departure if it departed lately.
    pub(super) fn signer(
        &self,
        gid: GroupId,
        member: MemberId,
    ) -> Option<([u8; 32], Option<Departure>)> {
        let group = self.groups.get(&gid)?;
        if let Some(record) = group.members.get(member) {
            return Some((record.identity, None));
        }
        let departure = group.departed.get(member)?;
        Some((departure.identity, Some(*departure)))
    }

    /// Decodes a request signed by a member's identity key and verifies it against the record
    /// (or takes the verdict of [`MemberSigned::check`], made under the key the record holds).
    /// A request from a recently departed member, verified against the identity it had, is
    /// refused with the reason its membership ended, which it alone can learn.
    pub(super) fn member_request<T: MemberMessage>(
        &self,
        signed: MemberSigned,
    ) -> Result<T, Refusal> {
        let MemberSigned { bytes, checked, .. } = signed;
        // Whom it names, not yet trusted: for the key to check it under and for the answer.
        let Some((gid, member)) = T::decode(&mut wire::Reader::new(&bytes))
            .ok()
            .map(|m| m.names())
        else {
            return Err((Reject::Malformed, GroupId(0)).into());
        };
        let Some(group) = self.groups.get(&gid) else {
            return Err((Reject::UnknownGroup, gid).into());
        };
        let current = group.members.contains(member);
        // Not signed by a current or lately departed member: say so (a departed member
        // re-registers), and change nothing. The signature cannot be checked without a key.
        let Some((identity, departure)) = self.signer(gid, member) else {
            return Err((Reject::NotAMember, gid).into());
        };
        let opened = match checked {
            // Checked off the controller's thread under this very key: the verdict stands.
            Some(Checked::Valid {
                identity: key,
                message,
            }) if key == identity => T::take(message).ok_or(WireError::BadSignature),
            Some(Checked::Invalid { identity: key }) if key == identity => {
                Err(WireError::BadSignature)
            }
            _ => {
                let verified = self.signatures_verified.get();
                self.signatures_verified.set(verified.saturating_add(1));
                open_with::<T>(&bytes, |_| verifying_key(&identity))
                    .map(wire::Verified::into_message)
            }
        };
        match opened {
            Ok(_) if let Some(d) = departure => Err(Refusal {
                reason: Reject::NotAMember,
                group: gid,
                answered: Reject::NotAMember,
                told: Some(d.reason.told(member, d.epoch)),
            }),
            Ok(message) => Ok(message),
            // A bad signature naming a current member is counted as one, but answered as a
            // stranger is: a different answer would tell anyone which member ids are in use.
            Err(e) if current => Err(Refusal {
                reason: wire_reject(&e),
                group: gid,
                answered: Reject::NotAMember,
                told: None,
            }),
            Err(_) => Err((Reject::NotAMember, gid).into()),
        }
    }

    /// Answers a registration that waited for its batch with a refusal.
    pub(super) fn refuse_join(
        &mut self,
        conn: ConnId,
        group: GroupId,
        reject: Reject,
        reason: String,
    ) {
        let bytes = ErrorMessage {
            group,
            status: reject.status(),
            reason,
        }
        .to_bytes();
        self.transmits.push_back(Transmit::Reply { conn, bytes });
    }
}

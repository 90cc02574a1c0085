//! The controller state machine. See the crate docs for the call order.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use lkh_tree::{Batch, Epoch, GroupId, KeyTree, MemberPath, NodeId, TreeError, dot};
use rand_core::CryptoRng;
use serde::Serialize;
use thiserror::Error;
use wire::{
    Ack, Acked, Codec, Cookie, CookieReply, Encapsulation, ErrorMessage, Heartbeat, LeaveRequest,
    MemberId, MessageType, NONCE_LEN, RegistrationRequest, RekeyDatagram, ResyncRequest, SealedFor,
    SealedKind, Status, Subscribe, WireError, open_with, pack, seal_path_with, sign, verifying_key,
};
use zeroize::Zeroize;

use crate::fanout::{Cookies, RateLimit, Subscribers};
use crate::gate::Gate;
use crate::policy::{ConnId, Enrollment, GroupPolicy, MAX_REPEAT_SPACING_MS, Timestamp};
use crate::roster::{Departed, Departure, RECENT_DEPARTURES, Roster};
use crate::store::{GroupDelta, GroupState, MemberRecord, Store, StoreError};

/// Bytes to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// One datagram to a group's multicast address (or, in fan-out mode, to every member).
    Multicast {
        /// The group.
        group: GroupId,
        /// The signed datagram.
        bytes: Vec<u8>,
    },
    /// The reply to one request connection.
    Reply {
        /// The connection.
        conn: ConnId,
        /// The reply.
        bytes: Vec<u8>,
    },
}

/// The least time between two paths of one epoch sent to one member by resync (each an HPKE
/// seal).
pub const RESYNC_INTERVAL_MS: u64 = 200;

/// What became of an accepted fan-out subscription ([`Controller::handle_subscription`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subscription {
    /// Send these bytes (a [`wire::CookieReply`]) to the subscription's source address.
    Cookie(Vec<u8>),
    /// The source address is now the member's fan-out address.
    Confirmed {
        /// The group.
        group: GroupId,
        /// The member.
        member: MemberId,
    },
}

/// Why a membership ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DepartReason {
    /// The member left.
    Left,
    /// An operator evicted it.
    Evicted,
    /// Its lease ran out.
    Expired,
    /// It registered again with a new HPKE key, having lost its keys (its old leaf is replaced).
    Replaced,
    /// An operator reset the group: every member was excluded at once and registers again.
    Reset,
}

impl DepartReason {
    /// What member `member` is told when it asks after its membership ended at `epoch`.
    fn told(self, member: MemberId, epoch: Epoch) -> String {
        let how = match self {
            DepartReason::Left => "left the group",
            DepartReason::Evicted => "was evicted by an operator",
            DepartReason::Expired => "let its lease run out",
            DepartReason::Replaced => "was replaced by a registration with a new HPKE key",
            DepartReason::Reset => "was excluded when an operator reset the group",
        };
        format!("member {} {how} at epoch {}", member.0, epoch.0)
    }
}

/// A refused request: why (counted by reason), the group it named, the reason the requester is
/// given (the same, unless telling would reveal something), and what it is told when there is
/// more to say than that reason's name.
struct Refusal {
    reason: Reject,
    group: GroupId,
    answered: Reject,
    told: Option<String>,
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

/// Why a request was refused; counted per reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reject {
    /// Not a well-formed message.
    Malformed,
    /// The signature does not verify.
    BadSignature,
    /// No such group.
    UnknownGroup,
    /// The identity is not allowed and holds no valid token.
    Unauthorized,
    /// The timestamp is outside the freshness window.
    StaleRequest,
    /// The nonce was seen before.
    Replayed,
    /// The sender is not (or no longer) a member.
    NotAMember,
    /// A message kind a controller does not accept.
    UnexpectedMessage,
    /// The group is full.
    GroupFull,
    /// A fan-out subscription echoed a cookie that is not this controller's for its address.
    BadCookie,
    /// Too many fan-out cookies asked for by this member or from this address.
    RateLimited,
}

impl Reject {
    /// The reason's name in snake case, as in JSON answers and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::BadSignature => "bad_signature",
            Reject::UnknownGroup => "unknown_group",
            Reject::Unauthorized => "unauthorized",
            Reject::StaleRequest => "stale_request",
            Reject::Replayed => "replayed",
            Reject::NotAMember => "not_a_member",
            Reject::UnexpectedMessage => "unexpected_message",
            Reject::GroupFull => "group_full",
            Reject::BadCookie => "bad_cookie",
            Reject::RateLimited => "rate_limited",
        }
    }

    /// The status sent to the member.
    pub fn status(self) -> Status {
        match self {
            Reject::Malformed => Status::Malformed,
            Reject::BadSignature => Status::BadSignature,
            Reject::Unauthorized | Reject::BadCookie => Status::Unauthorized,
            Reject::UnknownGroup => Status::UnknownGroup,
            Reject::NotAMember => Status::NotAMember,
            Reject::UnexpectedMessage => Status::UnexpectedMessage,
            Reject::StaleRequest | Reject::Replayed => Status::Stale,
            Reject::GroupFull => Status::GroupFull,
            Reject::RateLimited => Status::RateLimited,
        }
    }
}

/// Audit events: who, when, which epoch. Never key material.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A member was admitted.
    Admitted {
        /// Group.
        group: u64,
        /// Member id.
        member: u64,
        /// Identity key, hex.
        identity: String,
        /// Epoch it joined in.
        epoch: u64,
        /// When.
        at: u64,
    },
    /// A current member registered again with the keys it holds (a retry whose welcome it
    /// missed): it was sent its current path; nothing was rekeyed.
    Rewelcomed {
        /// Group.
        group: u64,
        /// Member id.
        member: u64,
        /// The current epoch.
        epoch: u64,
        /// When.
        at: u64,
    },
    /// A membership ended.
    Departed {
        /// Group.
        group: u64,
        /// Member id.
        member: u64,
        /// Why.
        reason: DepartReason,
        /// Epoch of the rekey that shut it out.
        epoch: u64,
        /// When.
        at: u64,
    },
    /// An identity was banned from a group.
    Banned {
        /// Group.
        group: u64,
        /// Identity key, hex.
        identity: String,
        /// When.
        at: u64,
    },
    /// A ban was lifted.
    Unbanned {
        /// Group.
        group: u64,
        /// Identity key, hex.
        identity: String,
        /// When.
        at: u64,
    },
    /// An operator reset a group: every member is excluded by its next rekey (made at once).
    Reset {
        /// Group.
        group: u64,
        /// Members excluded.
        members: usize,
        /// When.
        at: u64,
    },
    /// A rekey was persisted and queued.
    Rekeyed {
        /// Group.
        group: u64,
        /// The new epoch.
        epoch: u64,
        /// Joins, departures.
        joins: usize,
        /// Departures.
        departures: usize,
        /// Encryptions.
        encryptions: usize,
        /// Distinct datagrams (before repeats).
        datagrams: usize,
        /// Bytes of those datagrams.
        bytes: usize,
        /// When.
        at: u64,
    },
    /// A request was refused.
    Rejected {
        /// Why.
        reason: Reject,
        /// When.
        at: u64,
    },
    /// The store failed: the rekey was not sent.
    StoreFailed {
        /// Group.
        group: u64,
        /// The epoch that was not sent.
        epoch: u64,
        /// The store's message.
        error: String,
    },
    /// Compacting the stored state failed. Nothing was lost: the store still holds the last full
    /// state and every delta since, and the next compaction is tried once as many records again
    /// were saved.
    CompactionFailed {
        /// Group.
        group: u64,
        /// The epoch of the state that was being written.
        epoch: u64,
        /// The store's message.
        error: String,
    },
}

/// Counters per group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Rekeys done.
    pub rekeys: u64,
    /// Encryptions made.
    pub encryptions: u64,
    /// Datagrams sent (repeats included).
    pub datagrams: u64,
    /// Bytes sent in datagrams (repeats included).
    pub bytes: u64,
    /// Registrations accepted.
    pub registrations: u64,
    /// Resyncs answered with keys.
    pub resyncs: u64,
    /// Heartbeats sent.
    pub heartbeats: u64,
    /// Requests refused, by reason.
    pub rejects: BTreeMap<Reject, u64>,
}

/// An operator's command (from the control socket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// The controller's state in brief.
    Status,
    /// Every group.
    Groups,
    /// A group's members.
    Members(String),
    /// End a membership now (rekeyed in the next batch).
    Evict(String, u64),
    /// Rekey a group now.
    Rekey(String),
    /// Show a group's policy, or change one setting.
    Policy(String, Option<(String, String)>),
    /// The key inventory of a group (never key material).
    Keys(String),
    /// The tree in DOT.
    Tree(String),
    /// A group's counters.
    Stats(String),
    /// Exclude every member of a group at once: every key new (members register again).
    Reset(String),
    /// Keep an identity out of a group under every enrollment mode, across restarts; the member
    /// named, or a current member with the identity, is evicted.
    Ban(String, BanTarget),
    /// Lift the ban of an identity.
    Unban(String, [u8; 32]),
    /// A group's banned identities.
    Bans(String),
}

/// Whom a ban names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BanTarget {
    /// A current member, by id: its identity is banned and it is evicted.
    Member(u64),
    /// An identity key.
    Identity([u8; 32]),
}

/// Why a command failed.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandError {
    /// No such group.
    #[error("unknown group {0:?}; `gkmctl groups` lists them")]
    UnknownGroup(String),
    /// No such member.
    #[error("group {group:?} has no member {member}; `gkmctl members {group}` lists them")]
    UnknownMember {
        /// The group.
        group: String,
        /// The member id.
        member: u64,
    },
    /// An unknown policy key or a bad value.
    #[error("{0}")]
    BadPolicy(String),
    /// The change holds in memory but the store failed; it is saved with the group's next save.
    #[error("done, but not yet durable ({0}); it is saved with the group's next rekey")]
    NotSaved(String),
    /// The identity was not banned.
    #[error("{0} is not banned in group {1:?}; `gkmctl bans {1}` lists the bans")]
    NotBanned(String, String),
    /// The rekey that makes the change could not be saved: nothing of it went out, and it is
    /// tried again every second (GKM-V053).
    #[error(
        "not yet: the rekey could not be saved ({0}); nothing of it went out, the controller \
         tries again every second, and until it succeeds the members (an evicted one too) keep \
         the current key; free the state disk or fix the store"
    )]
    RekeyNotSaved(String),
}

/// A group in brief.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    /// Name.
    pub name: String,
    /// Id.
    pub id: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Members.
    pub members: usize,
    /// Tree degree.
    pub degree: u8,
    /// Tree height.
    pub height: usize,
    /// Changes waiting for the next batch.
    pub pending: usize,
}

/// A member in brief.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberInfo {
    /// Member id.
    pub id: u64,
    /// Identity key, hex.
    pub identity: String,
    /// Leaf node.
    pub leaf: u32,
    /// Epoch it joined in.
    pub joined: u64,
    /// Milliseconds of lease left.
    pub lease_left_ms: u64,
}

/// One key of the inventory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// Node.
    pub node: u32,
    /// Version (the epoch it was set in).
    pub version: u64,
    /// Epochs since it was set.
    pub age_epochs: u64,
    /// Milliseconds since it was set, when known.
    pub age_ms: Option<u64>,
    /// When it must change at the latest (the next periodic refresh of the root), if any.
    pub expires_in_ms: Option<u64>,
    /// Members holding it.
    pub holders: usize,
}

/// A command's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum Response {
    /// Done.
    Ok,
    /// Status.
    Status {
        /// Groups served.
        groups: usize,
        /// Members in all groups.
        members: usize,
        /// The controller's public key, hex.
        public_key: String,
        /// Requests refused, by reason: in every group, and before any group could be named
        /// (malformed requests, registrations whose signature does not verify).
        rejects: BTreeMap<Reject, u64>,
    },
    /// Groups.
    Groups(Vec<GroupInfo>),
    /// Members.
    Members(Vec<MemberInfo>),
    /// Policy settings as (key, value).
    Policy(Vec<(String, String)>),
    /// Key inventory.
    Keys(Vec<KeyInfo>),
    /// DOT text.
    Tree(String),
    /// Counters.
    Stats(Stats),
    /// Banned identities, hex.
    Bans(Vec<String>),
}

/// The time each phase of one rekey took, by the profiler's clock (see
/// [`Controller::set_profiler`]; with a CPU clock, phases that overlap count each other's time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RekeyProfile {
    /// The tree's rekey (marking, new keys, wraps) and the roster's update.
    pub tree: Duration,
    /// Making the changes durable (the store's save; with workers, on its own thread while the
    /// datagrams are packed and signed).
    pub persist: Duration,
    /// Packing the datagrams.
    pub pack: Duration,
    /// Signing them (on the workers), and waiting for the save if it took longer.
    pub sign: Duration,
    /// From the start of the rekey until its changes were durable and its datagrams signed.
    pub ready: Duration,
    /// Sealing and signing the joiners' welcomes.
    pub welcomes: Duration,
}

/// What one rekey writes to the store.
enum Save {
    /// The whole state.
    Full(GroupState),
    /// The changes since the last save.
    Delta(GroupDelta),
    /// The changes since the last save, and then the state they lead to in place of what the
    /// store holds (compaction).
    Compact(GroupDelta),
}

impl Save {
    /// Writes the save (for [`Save::Compact`], with the state that `tree` and `members` hold);
    /// returns its result and the time it was durable by `clock`.
    fn write(
        &self,
        store: &mut (dyn Store + Send),
        clock: Option<fn() -> Duration>,
        (tree, members, gate): (&KeyTree, &Roster, &Gate),
    ) -> (Result<(), StoreError>, Option<Duration>) {
        let result = match self {
            Save::Full(state) => store.save(state),
            Save::Delta(delta) => store.save_delta(delta),
            Save::Compact(delta) => {
                store.save_delta_and_compact(delta, group_state(tree, members, gate))
            }
        };
        (result, clock.map(|now| now()))
    }
}

/// The durable state of a group whose tree, roster and gate these are.
fn group_state(tree: &KeyTree, members: &Roster, gate: &Gate) -> GroupState {
    GroupState {
        tree: tree.snapshot(),
        members: members.records().collect(),
        enrollment: gate.records().clone(),
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
enum Checked {
    /// The signature verified: the message, trusted as far as that key is the member's.
    Valid { identity: [u8; 32], message: Opened },
    /// It did not.
    Invalid { identity: [u8; 32] },
}

/// A member-signed message whose signature verified.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Opened {
    Resync(ResyncRequest),
    Leave(LeaveRequest),
    Subscribe(Subscribe),
}

/// The member-signed messages.
trait MemberMessage: Codec + Sized {
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
    fn names(&self) -> Option<(GroupId, MemberId)> {
        match self.kind {
            MessageType::ResyncRequest => self.decoded::<ResyncRequest>().map(|m| m.names()),
            MessageType::Leave => self.decoded::<LeaveRequest>().map(|m| m.names()),
            MessageType::Subscribe => self.decoded::<Subscribe>().map(|m| m.names()),
            _ => None,
        }
    }

    /// The message, decoded but not verified, if it is of kind `T`.
    fn decoded<T: MemberMessage>(&self) -> Option<T> {
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

    fn open<T: MemberMessage>(bytes: &[u8], identity: &[u8; 32]) -> Option<Opened> {
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

/// One welcome to seal: its encapsulation, what it names, the keys.
type WelcomeJob<'a> = (Encapsulation, SealedFor, &'a MemberPath);

struct PendingJoin {
    conn: ConnId,
    identity: [u8; 32],
    nonce: [u8; NONCE_LEN],
    encapsulation: Encapsulation,
}

/// The joins waiting for a group's next rekey, in arrival order, found by identity in constant
/// time (a batch may hold hundreds of thousands).
#[derive(Default)]
struct PendingJoins {
    list: Vec<PendingJoin>,
    by_identity: HashMap<[u8; 32], usize>,
}

impl PendingJoins {
    /// Puts `join` in place of a pending join of the same identity; hands it back if there is
    /// none.
    fn replace(&mut self, join: PendingJoin) -> Option<PendingJoin> {
        match self.by_identity.get(&join.identity) {
            Some(&at) => {
                if let Some(pending) = self.list.get_mut(at) {
                    *pending = join;
                }
                None
            }
            None => Some(join),
        }
    }

    fn push(&mut self, join: PendingJoin) {
        self.by_identity.insert(join.identity, self.list.len());
        self.list.push(join);
    }

    fn len(&self) -> usize {
        self.list.len()
    }

    /// All of them, leaving none.
    fn take(&mut self) -> Vec<PendingJoin> {
        self.by_identity.clear();
        std::mem::take(&mut self.list)
    }
}

struct Group {
    policy: GroupPolicy,
    tree: KeyTree,
    members: Roster,
    /// Spent tokens and bans.
    gate: Gate,
    /// Confirmed fan-out addresses.
    subscribers: Subscribers,
    /// When each member was last sent its path by resync.
    resynced: RateLimit,
    next_lease_scan: Timestamp,
    joins: PendingJoins,
    departures: BTreeMap<MemberId, DepartReason>,
    /// The latest departures, to tell a departed member why.
    departed: Departed,
    batch_due: Option<Timestamp>,
    next_heartbeat: Timestamp,
    next_refresh: Option<Timestamp>,
    nonces: SeenNonces,
    epoch_times: BTreeMap<u64, Timestamp>,
    /// Repeat sends waiting for their time, earliest first.
    spaced: VecDeque<(Timestamp, Vec<u8>)>,
    /// After a restart: requests made before it are refused (their nonces were not kept).
    fresh_since: Option<Timestamp>,
    stats: Stats,
    /// Whether the store holds this group's state (so a delta can be applied to it).
    saved: bool,
    /// Records written as deltas since the last full state (save or compaction).
    logged: usize,
    /// Why the last rekey's save failed, until one succeeds.
    save_failure: Option<String>,
}

/// The controller: every group's tree, members and timers.
pub struct Controller<R> {
    signer: SigningKey,
    rng: R,
    store: Box<dyn Store + Send>,
    groups: BTreeMap<GroupId, Group>,
    names: BTreeMap<String, GroupId>,
    cookies: Cookies,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    workers: usize,
    rejects: BTreeMap<Reject, u64>,
    profiler: Option<fn() -> Duration>,
    profile: Option<RekeyProfile>,
    /// Member signatures verified on the controller's own thread.
    signatures_verified: std::cell::Cell<u64>,
}

impl<R: CryptoRng> Controller<R> {
    /// A controller serving `groups` (new, or continued from `restored` states).
    pub fn new(
        signer: SigningKey,
        mut rng: R,
        store: Box<dyn Store + Send>,
        groups: Vec<GroupPolicy>,
        restored: Vec<GroupState>,
        now: Timestamp,
    ) -> Result<Self, TreeError> {
        let mut by_id: HashMap<GroupId, GroupState> =
            restored.into_iter().map(|s| (s.tree.group, s)).collect();
        let mut out = BTreeMap::new();
        let mut names = BTreeMap::new();
        for policy in groups {
            let group = match by_id.remove(&policy.id) {
                Some(state) => Group::restore(policy, &state, now)?,
                None => Group::new(policy, &mut rng, now)?,
            };
            names.insert(group.policy.name.clone(), group.policy.id);
            out.insert(group.policy.id, group);
        }
        let mut cookie_key = [0u8; 32];
        rng.fill_bytes(&mut cookie_key);
        let cookies = Cookies::new(cookie_key);
        cookie_key.zeroize();
        Ok(Controller {
            signer,
            rng,
            store,
            groups: out,
            names,
            cookies,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            workers: 1,
            rejects: BTreeMap::new(),
            signatures_verified: std::cell::Cell::new(0),
            profiler: None,
            profile: None,
        })
    }

    /// Lets the controller seal a batch's welcomes and sign its datagrams on up to `workers`
    /// threads (default 1), and, with more than one, run the store's save on a thread of its own
    /// while the datagrams are packed and signed (nothing is queued before the save returns). The
    /// driver passes the machine's parallelism. The tree's key wraps are sealed on as many.
    pub fn set_workers(&mut self, workers: usize) {
        self.workers = workers.max(1);
    }

    /// Lets the controller time the phases of each rekey with `clock`, a reading as time since
    /// any fixed origin that the driver passes: monotonic wall time, or the process's CPU time
    /// (benchmarks only). See [`Controller::last_rekey_profile`].
    pub fn set_profiler(&mut self, clock: fn() -> Duration) {
        self.profiler = Some(clock);
    }

    /// How long the phases of the last rekey took, once a profiler is set.
    pub fn last_rekey_profile(&self) -> Option<RekeyProfile> {
        self.profile
    }

    /// The controller's public key, which members pin.
    pub fn public_key(&self) -> [u8; 32] {
        self.signer.verifying_key().to_bytes()
    }

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
        let outcome = match inbound {
            Inbound::Registration(request) => {
                self.register(conn, now, *request).map_err(Refusal::from)
            }
            Inbound::MemberSigned(signed) => match signed.kind {
                MessageType::ResyncRequest => self.resync(conn, now, signed),
                MessageType::Leave => self.leave(conn, now, signed),
                _ => Err((Reject::UnexpectedMessage, GroupId(0)).into()),
            },
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

    /// Where group `id`'s datagrams go by unicast besides multicast: the confirmed fan-out
    /// address of each member that renewed its subscription within its lease.
    pub fn fanout_addresses(&mut self, id: GroupId, now: Timestamp) -> Vec<SocketAddr> {
        self.groups.get_mut(&id).map_or_else(Vec::new, |g| {
            let lease = g.policy.lease_ms;
            g.subscribers.addresses(now, lease)
        })
    }

    /// Fires due batches, repeat sends, heartbeats, lease expiries and refreshes.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for id in ids {
            self.send_due_repeats(id, now);
            self.expire_leases(id, now);
            let Some(group) = self.groups.get(&id) else {
                continue;
            };
            let batch_due = group.batch_due.is_some_and(|t| t <= now);
            let refresh_due = group.next_refresh.is_some_and(|t| t <= now);
            if batch_due || refresh_due {
                self.rekey(id, now);
            }
            if self
                .groups
                .get(&id)
                .is_some_and(|g| g.next_heartbeat <= now)
            {
                self.heartbeat(id, now);
            }
        }
    }

    /// Queues the repeat sends of `id` that are due.
    fn send_due_repeats(&mut self, id: GroupId, now: Timestamp) {
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        while g.spaced.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, bytes)) = g.spaced.pop_front() {
                self.transmits
                    .push_back(Transmit::Multicast { group: id, bytes });
            }
        }
    }

    /// The earliest time [`Controller::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.groups
            .values()
            .flat_map(|g| {
                [
                    g.batch_due,
                    Some(g.next_heartbeat),
                    g.next_refresh,
                    Some(g.next_lease_scan),
                    g.spaced.front().map(|(due, _)| *due),
                ]
            })
            .flatten()
            .min()
    }

    /// The groups with a batch scheduled (due at or before [`Controller::poll_timeout`]'s
    /// answer for them). A registration for one of these joins that batch whenever it is handled
    /// before the batch is due, so a driver that handles its input before firing timers may hold
    /// such registrations until then.
    pub fn batching(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.groups
            .iter()
            .filter(|(_, g)| g.batch_due.is_some())
            .map(|(id, _)| *id)
    }

    /// The next thing to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next audit event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// An operator's command.
    pub fn handle_command(
        &mut self,
        now: Timestamp,
        command: Command,
    ) -> Result<Response, CommandError> {
        match command {
            Command::Status => Ok(Response::Status {
                groups: self.groups.len(),
                members: self.groups.values().map(|g| g.members.len()).sum(),
                public_key: hex(&self.public_key()),
                rejects: self.rejects.clone(),
            }),
            Command::Groups => Ok(Response::Groups(
                self.groups.values().map(Group::info).collect(),
            )),
            Command::Members(name) => {
                let g = self.group(&name)?;
                let mut list: Vec<MemberInfo> = g.members.records().map(|m| m.info(now)).collect();
                list.sort_by_key(|m| m.id);
                Ok(Response::Members(list))
            }
            Command::Evict(name, member) => {
                let id = self.group_id(&name)?;
                let g = self.group_mut(id)?;
                if !g.members.contains(MemberId(member)) {
                    return Err(CommandError::UnknownMember {
                        group: name,
                        member,
                    });
                }
                g.departures.insert(MemberId(member), DepartReason::Evicted);
                g.schedule(now);
                Ok(Response::Ok)
            }
            Command::Rekey(name) => {
                let id = self.group_id(&name)?;
                self.rekey(id, now);
                Ok(Response::Ok)
            }
            Command::Policy(name, change) => {
                let id = self.group_id(&name)?;
                let g = self.group_mut(id)?;
                if let Some((key, value)) = change {
                    g.set_policy(&key, &value, now)?;
                }
                Ok(Response::Policy(g.policy_list()))
            }
            Command::Keys(name) => Ok(Response::Keys(self.group(&name)?.inventory(now))),
            Command::Tree(name) => Ok(Response::Tree(dot::tree_dot(&self.group(&name)?.tree))),
            Command::Stats(name) => Ok(Response::Stats(self.group(&name)?.stats.clone())),
            Command::Reset(name) => {
                let id = self.group_id(&name)?;
                self.reset(id, now, None);
                Ok(Response::Ok)
            }
            Command::Ban(name, target) => self.ban(now, &name, target),
            Command::Unban(name, identity) => {
                let id = self.group_id(&name)?;
                if !self.group_mut(id)?.gate.unban(identity) {
                    return Err(CommandError::NotBanned(hex(&identity), name));
                }
                self.events.push_back(Event::Unbanned {
                    group: id.0,
                    identity: hex(&identity),
                    at: now.0,
                });
                self.save_now(id)?;
                Ok(Response::Ok)
            }
            Command::Bans(name) => {
                let banned = &self.group(&name)?.gate.records().banned;
                Ok(Response::Bans(banned.iter().map(|i| hex(i)).collect()))
            }
        }
    }

    /// Bans an identity (`gkmctl ban`, `gkmctl evict --ban`): durable with the eviction's rekey
    /// when a member is evicted, else saved at once.
    fn ban(
        &mut self,
        now: Timestamp,
        name: &str,
        target: BanTarget,
    ) -> Result<Response, CommandError> {
        let id = self.group_id(name)?;
        let g = self.group_mut(id)?;
        let (identity, member) = match target {
            BanTarget::Member(member) => {
                let record =
                    g.members
                        .get(MemberId(member))
                        .ok_or_else(|| CommandError::UnknownMember {
                            group: name.to_owned(),
                            member,
                        })?;
                (record.identity, Some(record.id))
            }
            BanTarget::Identity(identity) => (identity, g.members.by_identity(&identity)),
        };
        g.gate.ban(identity);
        self.events.push_back(Event::Banned {
            group: id.0,
            identity: hex(&identity),
            at: now.0,
        });
        match member {
            Some(member) => {
                let g = self.group_mut(id)?;
                g.departures.insert(member, DepartReason::Evicted);
                g.schedule(now);
            }
            None => self.save_now(id)?,
        }
        Ok(Response::Ok)
    }

    /// Saves what changed in group `id` now, outside a rekey (a ban or its lifting).
    fn save_now(&mut self, id: GroupId) -> Result<(), CommandError> {
        let compacting = self.store.compacting();
        let g = self
            .groups
            .get_mut(&id)
            .ok_or_else(|| CommandError::UnknownGroup(id.to_string()))?;
        let save = g.take_save(compacting);
        let (saved, _) = save.write(self.store.as_mut(), None, (&g.tree, &g.members, &g.gate));
        g.saved = saved.is_ok();
        saved.map_err(|e| CommandError::NotSaved(e.to_string()))
    }

    /// Excludes every member of group `id` at once, as RFC 9838 does when a key server is
    /// suspected compromised: one rekey in which every member departs (reason
    /// [`DepartReason::Reset`]), so every key is new and no one holds any; members that ask are
    /// told, and register again. With `above`, the reset's epoch is numbered above it (the epoch
    /// floor of a group restored from an older copy of its state). Returns whether the group
    /// exists.
    pub fn reset(&mut self, id: GroupId, now: Timestamp, above: Option<Epoch>) -> bool {
        let Some(g) = self.groups.get_mut(&id) else {
            return false;
        };
        if let Some(above) = above {
            g.tree.skip_epoch_to(above);
        }
        let everyone: Vec<MemberId> = g.members.records().map(|r| r.id).collect();
        for member in everyone {
            g.departures.insert(member, DepartReason::Reset);
        }
        self.events.push_back(Event::Reset {
            group: id.0,
            members: g.departures.len(),
            at: now.0,
        });
        self.rekey(id, now);
        true
    }

    /// The current state of a group, as the store holds it (for tests and the daemon).
    pub fn group_state(&self, group: GroupId) -> Option<GroupState> {
        self.groups.get(&group).map(Group::state)
    }

    /// A group's key tree, read-only (for simulators that model receivers by subtree).
    pub fn tree(&self, group: GroupId) -> Option<&KeyTree> {
        self.groups.get(&group).map(|g| &g.tree)
    }

    /// Bytes a group's tree and member roster hold in memory, for memory reports.
    pub fn memory_bytes(&self, group: GroupId) -> Option<usize> {
        let g = self.groups.get(&group)?;
        Some(g.tree.memory_bytes() + g.members.memory_bytes())
    }

    /// The current epoch and traffic key of a group (for checks in tests and the demo).
    pub fn traffic_key(&self, group: GroupId) -> Option<(Epoch, lkh_tree::TrafficKey)> {
        let g = self.groups.get(&group)?;
        let epoch = g.tree.epoch();
        Some((epoch, g.tree.root_key().traffic_key(group, epoch)))
    }

    fn group(&self, name: &str) -> Result<&Group, CommandError> {
        self.names
            .get(name)
            .and_then(|id| self.groups.get(id))
            .ok_or_else(|| CommandError::UnknownGroup(name.to_owned()))
    }

    fn group_id(&self, name: &str) -> Result<GroupId, CommandError> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| CommandError::UnknownGroup(name.to_owned()))
    }

    fn group_mut(&mut self, id: GroupId) -> Result<&mut Group, CommandError> {
        self.groups
            .get_mut(&id)
            .ok_or_else(|| CommandError::UnknownGroup(id.to_string()))
    }

    /// A positive reply to a request that needed no keys.
    fn ack(&mut self, conn: ConnId, ack: &Ack) {
        self.transmits.push_back(Transmit::Reply {
            conn,
            bytes: ack.to_bytes(),
        });
    }

    /// The group a request names, once its timestamp and nonce are fresh.
    fn fresh_group(
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

    fn reject(&mut self, conn: ConnId, now: Timestamp, refusal: Refusal) {
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
    fn register(
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
                let same_key = g
                    .members
                    .get(old)
                    .is_some_and(|r| r.hpke_key == request.hpke_key);
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

    fn resync(
        &mut self,
        conn: ConnId,
        now: Timestamp,
        signed: MemberSigned,
    ) -> Result<(), Refusal> {
        let request = self.member_request::<ResyncRequest>(signed)?;
        let gid = request.group;
        let g = self.fresh_group(gid, now, request.timestamp_ms, request.nonce)?;
        if !g.members.renew(request.member, now.plus(g.policy.lease_ms)) {
            return Err((Reject::NotAMember, gid).into());
        }
        let record = g
            .members
            .get(request.member)
            .ok_or((Reject::NotAMember, gid))?;
        // Renewed only if the member holds this epoch's keys: the same epoch number with other
        // keys (a controller that went back) is answered with the path.
        let epoch = g.tree.epoch();
        let current = g.tree.root_key().traffic_key(gid, epoch).check_value();
        if request.epoch == epoch && request.kcv == current {
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
        g.stats.resyncs += 1;
        let to = SealedFor {
            kind: SealedKind::Resync,
            member: request.member,
            request_nonce: request.nonce,
            recipient: record.hpke_key,
            rekey_address: g.policy.rekey_address,
        };
        let encapsulation = Encapsulation::new(&record.hpke_key, gid, &mut self.rng)
            .map_err(|_| (Reject::Malformed, gid))?;
        Ok(self.reply_path(conn, gid, record.leaf, &to, encapsulation)?)
    }

    /// A current member's registration with the keys it has: a welcome with its current path,
    /// and its lease renewed. No rekey: it could already read everything up to now.
    fn rewelcome(
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
        let to = SealedFor {
            kind: SealedKind::Welcome,
            member,
            request_nonce: join.nonce,
            recipient: *join.encapsulation.recipient(),
            rekey_address: g.policy.rekey_address,
        };
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
    fn reply_path(
        &mut self,
        conn: ConnId,
        gid: GroupId,
        leaf: NodeId,
        to: &SealedFor,
        encapsulation: Encapsulation,
    ) -> Result<(), (Reject, GroupId)> {
        let g = self
            .group_mut(gid)
            .map_err(|_| (Reject::UnknownGroup, gid))?;
        let path = g.tree.member_path(leaf).ok_or((Reject::NotAMember, gid))?;
        let sealed =
            seal_path_with(&path, to, encapsulation).map_err(|_| (Reject::Malformed, gid))?;
        let bytes = sign(&sealed, &self.signer);
        self.transmits.push_back(Transmit::Reply { conn, bytes });
        Ok(())
    }

    fn leave(&mut self, conn: ConnId, now: Timestamp, signed: MemberSigned) -> Result<(), Refusal> {
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

    /// Why group `name`'s last rekey could not be saved, while its batch waits to be tried
    /// again; `None` once a save succeeded. A driver tells an operator whose eviction or rekey
    /// is not yet done.
    pub fn save_failure(&self, name: &str) -> Option<String> {
        let id = self.names.get(name)?;
        self.groups.get(id)?.save_failure.clone()
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
    fn signer(&self, gid: GroupId, member: MemberId) -> Option<([u8; 32], Option<Departure>)> {
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
    fn member_request<T: MemberMessage>(&self, signed: MemberSigned) -> Result<T, Refusal> {
        let MemberSigned { bytes, checked, .. } = signed;
        let mut named = (GroupId(0), None);
        let mut departed = None;
        let mut verdict = None;
        let opened = open_with::<T>(&bytes, |message| {
            let (gid, member) = message.names();
            named.0 = gid;
            let group = self.groups.get(&gid);
            named.1 = group.map(|g| g.members.contains(member));
            let (identity, departure) = self.signer(gid, member).ok_or(WireError::BadSignature)?;
            departed = departure.map(|d| (member, d));
            // Checked off the controller's thread under this very key: the verdict stands, and
            // the signature is not verified again.
            verdict = match checked {
                Some(Checked::Valid {
                    identity: key,
                    message,
                }) if key == identity => Some(T::take(message).ok_or(WireError::BadSignature)),
                Some(Checked::Invalid { identity: key }) if key == identity => {
                    Some(Err(WireError::BadSignature))
                }
                _ => None,
            };
            if verdict.is_some() {
                return Err(WireError::Decode(wire::DecodeError::Invalid(
                    "checked before",
                )));
            }
            let verified = self.signatures_verified.get();
            self.signatures_verified.set(verified.saturating_add(1));
            verifying_key(&identity)
        });
        let opened = match verdict {
            Some(result) => result,
            None => opened.map(wire::Verified::into_message),
        };
        match (opened, named) {
            (Ok(_), (gid, _)) if let Some((member, d)) = departed => Err(Refusal {
                reason: Reject::NotAMember,
                group: gid,
                answered: Reject::NotAMember,
                told: Some(d.reason.told(member, d.epoch)),
            }),
            (Ok(v), _) => Ok(v),
            (Err(_), (gid, None)) => Err((Reject::UnknownGroup, gid).into()),
            // Not signed by a current member: say so (a departed member re-registers), and
            // change nothing. The signature cannot be checked without a member's key.
            (Err(_), (gid, Some(false))) => Err((Reject::NotAMember, gid).into()),
            // A bad signature naming a current member is counted as one, but answered as a
            // stranger is: a different answer would tell anyone which member ids are in use.
            (Err(e), (gid, Some(true))) => Err(Refusal {
                reason: wire_reject(&e),
                group: gid,
                answered: Reject::NotAMember,
                told: None,
            }),
        }
    }

    fn expire_leases(&mut self, id: GroupId, now: Timestamp) {
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        if g.next_lease_scan > now {
            return;
        }
        // Leases are checked a few times per lease period, not per member: a lease ends at most a
        // quarter period late, and no timer is kept per member.
        g.next_lease_scan = now.plus((g.policy.lease_ms / 4).max(1));
        let expired: Vec<MemberId> = g
            .members
            .expired(now)
            .into_iter()
            .filter(|m| !g.departures.contains_key(m))
            .collect();
        for member in expired {
            g.departures.insert(member, DepartReason::Expired);
            g.schedule(now);
        }
    }

    /// Answers a registration that waited for its batch with a refusal.
    fn refuse_join(&mut self, conn: ConnId, group: GroupId, reject: Reject, reason: String) {
        let bytes = ErrorMessage {
            group,
            status: reject.status(),
            reason,
        }
        .to_bytes();
        self.transmits.push_back(Transmit::Reply { conn, bytes });
    }

    /// One rekey of group `id`: the pending batch, or a refresh.
    fn rekey(&mut self, id: GroupId, now: Timestamp) {
        let started = self.profiler.map(|now| now());
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        let departures = std::mem::take(&mut g.departures);
        let leaves: Vec<NodeId> = departures
            .keys()
            .filter_map(|m| g.members.get(*m).map(|r| r.leaf))
            .collect();
        let room = (NodeId::LIMIT as usize / 2).saturating_sub(g.tree.len());
        // A registration that waited for this batch while its identity was banned is refused.
        let (banned, mut joins): (Vec<_>, Vec<_>) = g
            .joins
            .take()
            .into_iter()
            .partition(|join| g.gate.banned(&join.identity));
        for refused in banned {
            self.refuse_join(
                refused.conn,
                id,
                Reject::Unauthorized,
                "Unauthorized".into(),
            );
        }
        if joins.len() > room {
            for refused in joins.split_off(room) {
                self.refuse_join(refused.conn, id, Reject::GroupFull, "group full".into());
            }
        }
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        g.batch_due = None;
        let batch = Batch {
            leaves,
            joins: joins.len(),
        };
        // Staged: until the save succeeds, the tree's changes can be undone (GKM-V053).
        g.tree.stage();
        let rekey = match g
            .tree
            .rekey_with_workers(&batch, &mut self.rng, self.workers)
        {
            Ok(rekey) => rekey,
            Err(error) => {
                // Nothing changed: the departures wait for the next batch, the joiners hear why.
                if g.tree.abort().is_err() {
                    self.tree_lost(id);
                    return;
                }
                g.departures = departures;
                let reason = format!("rekey refused: {error}");
                for join in joins {
                    self.refuse_join(join.conn, id, Reject::GroupFull, reason.clone());
                }
                return;
            }
        };
        let epoch = rekey.epoch;
        // The roster changes with the tree, and is saved with it; nothing else changes (no
        // event, no reply, no address forgotten) until the save has succeeded.
        let removed: Vec<MemberRecord> = departures
            .keys()
            .filter_map(|member| g.members.remove(*member))
            .collect();
        let lease_until = now.plus(g.policy.lease_ms);
        let admitted: Vec<MemberId> = joins
            .iter()
            .zip(&rekey.joiners)
            .map(|(join, joiner)| {
                let recipient = *join.encapsulation.recipient();
                g.members
                    .insert(joiner.leaf, join.identity, recipient, epoch.0, lease_until)
            })
            .collect();
        let clock = self.profiler;
        let tree_done = clock.map(|now| now());
        // Write-ahead: the changes are durable before anything encrypted under them is queued.
        // With workers, a large rekey's save runs while its datagrams are packed and signed; for
        // a small one, the thread would cost more CPU than the signing it overlaps.
        // A compaction's snapshot of the state is taken on the same thread, while the datagrams
        // are signed.
        let save = g.take_save(self.store.compacting());
        let (mtu, tree, members) = (g.policy.mtu, &g.tree, &g.members);
        let parts = (tree, members, &g.gate);
        let (signer, workers, store) = (&self.signer, self.workers, self.store.as_mut());
        let pack_and_sign = || {
            let packed = pack_rekey(&rekey, tree, mtu);
            let packed_at = clock.map(|now| now());
            (sign_all(&packed, signer, workers), packed_at)
        };
        let overlap = workers > 1 && rekey.encryptions.len() >= OVERLAP_SAVE_MIN;
        let ((saved, persisted), (datagrams, packed)) = if overlap {
            std::thread::scope(|scope| {
                let writer = scope.spawn(|| save.write(store, clock, parts));
                let signed = pack_and_sign();
                let saved = writer.join().unwrap_or_else(|_| {
                    (Err(StoreError::Backend("the store panicked".into())), None)
                });
                (saved, signed)
            })
        } else {
            let saved = save.write(store, clock, parts);
            (saved, pack_and_sign())
        };
        let signed = clock.map(|now| now());
        drop(save);
        while let Some(failure) = self.store.take_compaction_failure() {
            self.events.push_back(Event::CompactionFailed {
                group: failure.group.0,
                epoch: failure.epoch.0,
                error: failure.error.to_string(),
            });
        }
        if let Err(error) = saved {
            self.store_failed(id, epoch, &error);
            let Some(g) = self.groups.get_mut(&id) else {
                return;
            };
            g.save_failure = Some(error.to_string());
            // Exactly as before: the epoch's keys and datagrams are dropped unsent, the roster
            // and the tree go back, and the batch is tried again after a pause.
            drop(datagrams);
            for member in admitted {
                g.members.remove(member);
            }
            for r in removed {
                g.members
                    .insert(r.leaf, r.identity, r.hpke_key, r.joined, r.lease_until);
            }
            let _ = g.members.take_changes();
            g.saved = false;
            if g.tree.abort().is_err() {
                self.tree_lost(id);
                return;
            }
            g.departures = departures;
            for join in joins {
                g.joins.push(join);
            }
            g.batch_due = Some(now.plus(SAVE_RETRY_MS));
            return;
        }
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        g.tree.commit();
        g.saved = true;
        g.save_failure = None;
        // Only the last RECENT_DEPARTURES of a batch would be remembered: skip recording the
        // rest (a batch of 100,000 departures at 2^20 members).
        let unrecorded = removed.len().saturating_sub(RECENT_DEPARTURES);
        for (i, record) in removed.iter().enumerate() {
            let member = record.id;
            let reason = departures
                .get(&member)
                .copied()
                .unwrap_or(DepartReason::Left);
            g.subscribers.remove(member);
            g.resynced.remove(member);
            if i >= unrecorded {
                let departure = Departure {
                    identity: record.identity,
                    reason,
                    epoch,
                };
                g.departed.record(member, departure);
            }
            self.events.push_back(Event::Departed {
                group: id.0,
                member: member.0,
                reason,
                epoch: epoch.0,
                at: now.0,
            });
        }
        let joined = joins.len();
        let mut welcomes = Vec::with_capacity(joined);
        let mut replies_to = Vec::with_capacity(joined);
        for ((join, joiner), member) in joins.into_iter().zip(&rekey.joiners).zip(admitted) {
            let to = SealedFor {
                kind: SealedKind::Welcome,
                member,
                request_nonce: join.nonce,
                recipient: *join.encapsulation.recipient(),
                rekey_address: g.policy.rekey_address,
            };
            welcomes.push((join.encapsulation, to, &joiner.path));
            replies_to.push((join.conn, member, join.identity));
        }
        g.epoch_times.insert(epoch.0, now);
        g.next_refresh =
            (g.policy.refresh_interval_ms > 0).then(|| now.plus(g.policy.refresh_interval_ms));
        let bytes: usize = datagrams.iter().map(Vec::len).sum();
        let repeats = usize::from(g.policy.repeats.max(1));
        g.stats.rekeys += 1;
        g.stats.encryptions += rekey.encryptions.len() as u64;
        g.stats.datagrams += (datagrams.len() * repeats) as u64;
        g.stats.bytes += (bytes * repeats) as u64;
        g.stats.registrations += replies_to.len() as u64;
        let spacing = g.policy.repeat_spacing_ms;
        for copy in 0..repeats as u64 {
            for d in &datagrams {
                if copy == 0 || spacing == 0 {
                    self.transmits.push_back(Transmit::Multicast {
                        group: id,
                        bytes: d.clone(),
                    });
                } else {
                    let due = now.plus(spacing.saturating_mul(copy));
                    let at = g.spaced.partition_point(|(t, _)| *t <= due);
                    g.spaced.insert(at, (due, d.clone()));
                }
            }
        }
        let replies = self.seal_welcomes(id, welcomes);
        if let (
            Some(now),
            Some(start),
            Some(tree_done),
            Some(persisted),
            Some(packed),
            Some(signed),
        ) = (clock, started, tree_done, persisted, packed, signed)
        {
            self.profile = Some(RekeyProfile {
                tree: tree_done.saturating_sub(start),
                persist: persisted.saturating_sub(tree_done),
                pack: packed.saturating_sub(tree_done),
                sign: signed.saturating_sub(packed),
                ready: signed.saturating_sub(start),
                welcomes: now().saturating_sub(signed),
            });
        }
        for ((conn, member, identity), reply) in replies_to.into_iter().zip(replies) {
            self.transmits
                .push_back(Transmit::Reply { conn, bytes: reply });
            self.events.push_back(Event::Admitted {
                group: id.0,
                member: member.0,
                identity: hex(&identity),
                epoch: epoch.0,
                at: now.0,
            });
        }
        self.events.push_back(Event::Rekeyed {
            group: id.0,
            epoch: epoch.0,
            joins: joined,
            departures: removed.len(),
            encryptions: rekey.encryptions.len(),
            datagrams: datagrams.len(),
            bytes,
            at: now.0,
        });
        self.heartbeat(id, now);
    }

    /// Seals and signs the welcomes of one rekey, on up to `workers` threads. The X25519 work was
    /// done when each registration was verified; what is left is an AEAD seal and a signature.
    fn seal_welcomes(&self, group: GroupId, welcomes: Vec<WelcomeJob<'_>>) -> Vec<Vec<u8>> {
        let signer = &self.signer;
        let seal = |(encapsulation, to, path): WelcomeJob<'_>| match seal_path_with(
            path,
            &to,
            encapsulation,
        ) {
            Ok(sealed) => sign(&sealed, signer),
            Err(_) => ErrorMessage {
                group,
                status: Reject::Malformed.status(),
                reason: "unusable HPKE key".into(),
            }
            .to_bytes(),
        };
        on_workers(welcomes, self.workers, seal)
    }

    /// A staged tree that could not be put back (never expected: the abort rebuilds a tree the
    /// controller itself built): the group is dropped from memory, so that nothing of the unsaved
    /// epoch is served; a restart loads its last durable state.
    fn tree_lost(&mut self, id: GroupId) {
        if let Some(g) = self.groups.remove(&id) {
            self.events.push_back(Event::StoreFailed {
                group: id.0,
                epoch: g.tree.epoch().0,
                error: "the group's unsaved rekey could not be undone; the group is unloaded \
                        until the controller restarts from its store"
                    .into(),
            });
        }
    }

    fn store_failed(&mut self, id: GroupId, epoch: Epoch, error: &StoreError) {
        self.events.push_back(Event::StoreFailed {
            group: id.0,
            epoch: epoch.0,
            error: error.to_string(),
        });
    }

    fn heartbeat(&mut self, id: GroupId, now: Timestamp) {
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        let epoch = g.tree.epoch();
        let kcv = g.tree.root_key().traffic_key(id, epoch).check_value();
        let beat = Heartbeat {
            group: id,
            epoch,
            kcv,
            timestamp_ms: now.0,
        };
        g.next_heartbeat = now.plus(g.policy.heartbeat_interval_ms.max(1));
        g.stats.heartbeats += 1;
        self.transmits.push_back(Transmit::Multicast {
            group: id,
            bytes: sign(&beat, &self.signer),
        });
    }
}

/// How long a batch whose save failed waits before it is tried again.
const SAVE_RETRY_MS: u64 = 1_000;

/// Encryptions in a rekey from which its save runs on a thread of its own while the datagrams are
/// packed and signed (about 40 encryptions fill a datagram, and a signature takes about 20 µs).
const OVERLAP_SAVE_MIN: usize = 512;

/// Packs a rekey into datagrams: at the MTU, or at the largest datagram if a node's items do not
/// fit in it.
fn pack_rekey(rekey: &lkh_tree::Rekey, tree: &KeyTree, mtu: usize) -> Vec<RekeyDatagram> {
    pack(rekey, tree, mtu)
        .or_else(|_| pack(rekey, tree, wire::MAX_DATAGRAM))
        .unwrap_or_default()
}

/// Signs datagrams on up to `workers` threads; the result keeps their order.
fn sign_all(datagrams: &[RekeyDatagram], signer: &SigningKey, workers: usize) -> Vec<Vec<u8>> {
    on_workers(datagrams.iter().collect(), workers, |d| d.sign(signer))
}

/// Items a thread of [`on_workers`] takes at a time: about 1.5 ms of signatures or welcomes
/// (20–25 µs each), more than a thread costs to start and join.
const WORKER_CHUNK: usize = 64;

/// `work` done on every item on up to `workers` threads (the calling thread is one); the
/// results keep the items' order. Threads take [`WORKER_CHUNK`] items at a time from a shared
/// queue rather than a fixed share, so a thread slowed by the save running beside it, or by the
/// host, leaves the rest to the others. A worker's panic is resumed here.
fn on_workers<T: Send, U: Send>(
    items: Vec<T>,
    workers: usize,
    work: impl Fn(T) -> U + Sync,
) -> Vec<U> {
    if workers <= 1 || items.len() <= WORKER_CHUNK {
        return items.into_iter().map(work).collect();
    }
    let mut chunks = Vec::with_capacity(items.len().div_ceil(WORKER_CHUNK));
    let mut items = items.into_iter();
    loop {
        let chunk: Vec<T> = items.by_ref().take(WORKER_CHUNK).collect();
        if chunk.is_empty() {
            break;
        }
        chunks.push((chunks.len(), chunk));
    }
    let queue = Mutex::new(chunks.into_iter());
    let take = || {
        let mut done = Vec::new();
        // The guard moves into the closure and is dropped there: the lock is not held while
        // the chunk is worked on.
        while let Some((at, chunk)) = queue.lock().ok().and_then(|mut q| q.next()) {
            done.push((at, chunk.into_iter().map(&work).collect::<Vec<U>>()));
        }
        done
    };
    let mut done = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..workers).map(|_| scope.spawn(take)).collect();
        let mut done = take();
        for helper in helpers {
            match helper.join() {
                Ok(part) => done.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        done
    });
    done.sort_unstable_by_key(|(at, _)| *at);
    done.into_iter().flat_map(|(_, part)| part).collect()
}

/// Request nonces seen within the last `keep_ms`, forgotten oldest first (so a request costs
/// the same however many are remembered).
#[derive(Default)]
struct SeenNonces {
    seen: HashSet<[u8; NONCE_LEN]>,
    order: VecDeque<(Timestamp, [u8; NONCE_LEN])>,
}

impl SeenNonces {
    /// Whether `nonce` is remembered (it may be older than the window until the next insert).
    fn contains(&self, nonce: &[u8; NONCE_LEN]) -> bool {
        self.seen.contains(nonce)
    }

    /// Records `nonce` at `now`; false if it was seen within the last `keep_ms`.
    fn insert(&mut self, nonce: [u8; NONCE_LEN], now: Timestamp, keep_ms: u64) -> bool {
        while let Some(&(at, old)) = self.order.front() {
            if at.0.saturating_add(keep_ms) > now.0 {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
        if !self.seen.insert(nonce) {
            return false;
        }
        self.order.push_back((now, nonce));
        true
    }
}

fn wire_reject(error: &WireError) -> Reject {
    match error {
        WireError::BadSignature => Reject::BadSignature,
        _ => Reject::Malformed,
    }
}

/// Lower-case hex of public (never secret) bytes.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Group {
    fn new<R: CryptoRng>(
        policy: GroupPolicy,
        rng: &mut R,
        now: Timestamp,
    ) -> Result<Self, TreeError> {
        let tree = KeyTree::new(policy.id, policy.tree, rng)?;
        Ok(Self::with_tree(
            policy,
            tree,
            Vec::new(),
            Gate::default(),
            now,
        ))
    }

    fn restore(policy: GroupPolicy, state: &GroupState, now: Timestamp) -> Result<Self, TreeError> {
        let tree = KeyTree::restore(&state.tree)?;
        let gate = Gate::new(state.enrollment.clone());
        let mut group = Self::with_tree(policy, tree, state.members.clone(), gate, now);
        group.saved = true;
        // A restarted controller rekeys at once: its first epoch is above every persisted one,
        // and members that missed the crash window resync from the heartbeat.
        group.batch_due = Some(now);
        // The nonces seen before the restart are gone: a request made before it could be
        // replayed within the freshness window, so only requests made since are taken.
        group.fresh_since = Some(now);
        Ok(group)
    }

    fn with_tree(
        policy: GroupPolicy,
        mut tree: KeyTree,
        members: Vec<MemberRecord>,
        gate: Gate,
        now: Timestamp,
    ) -> Self {
        tree.track_changes();
        Group {
            next_lease_scan: now.plus(policy.lease_ms / 4),
            next_refresh: (policy.refresh_interval_ms > 0)
                .then(|| now.plus(policy.refresh_interval_ms)),
            policy,
            tree,
            members: Roster::new(members),
            gate,
            subscribers: Subscribers::default(),
            resynced: RateLimit::new(RESYNC_INTERVAL_MS),
            joins: PendingJoins::default(),
            departures: BTreeMap::new(),
            departed: Departed::default(),
            batch_due: None,
            next_heartbeat: now,
            nonces: SeenNonces::default(),
            epoch_times: BTreeMap::new(),
            spaced: VecDeque::new(),
            fresh_since: None,
            stats: Stats::default(),
            saved: false,
            logged: 0,
            save_failure: None,
        }
    }

    /// What makes the changes since the last save durable: the whole state when the store holds
    /// none of this group (first save, or the last save failed), else a delta, which asks for a
    /// compaction once the deltas since the last full state (or compaction) hold about as many
    /// records as the state, so the stored log stays within about twice the state. While the
    /// store is `compacting` (another group, or a slow disk), the compaction is asked for at a
    /// later rekey instead. Clears the record of changes.
    fn take_save(&mut self, compacting: bool) -> Save {
        let (members, removed_members) = self.members.take_changes();
        let delta = GroupDelta {
            group: self.policy.id,
            config: self.tree.config(),
            epoch: self.tree.epoch(),
            tree: self.tree.take_changes(),
            members,
            removed_members,
            enrollment: self.gate.take_changes(),
        };
        if !self.saved {
            self.logged = 0;
            return Save::Full(self.state());
        }
        self.logged = self.logged.saturating_add(delta.records());
        // A state holds each member's record and at most two nodes per member.
        if self.logged > self.members.len().saturating_mul(3).max(64) && !compacting {
            self.logged = 0;
            Save::Compact(delta)
        } else {
            Save::Delta(delta)
        }
    }

    fn state(&self) -> GroupState {
        group_state(&self.tree, &self.members, &self.gate)
    }

    fn schedule(&mut self, now: Timestamp) {
        let due = now.plus(self.policy.batch_interval_ms);
        self.batch_due = Some(self.batch_due.map_or(due, |t| t.min(due)));
    }

    fn check_fresh(
        &mut self,
        now: Timestamp,
        at_ms: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<(), Reject> {
        self.check_window(now, at_ms, nonce)?;
        self.remember(now, nonce);
        Ok(())
    }

    /// Whether a request made at `at_ms` with `nonce` is fresh: within the window, made since a
    /// restart, its nonce not seen. Records nothing.
    fn check_window(
        &self,
        now: Timestamp,
        at_ms: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<(), Reject> {
        let window = self.policy.freshness_window_ms;
        if at_ms.abs_diff(now.0) > window || self.fresh_since.is_some_and(|t| at_ms < t.0) {
            return Err(Reject::StaleRequest);
        }
        if self.nonces.contains(&nonce) {
            return Err(Reject::Replayed);
        }
        Ok(())
    }

    /// Records `nonce`, seen at `now`.
    fn remember(&mut self, now: Timestamp, nonce: [u8; NONCE_LEN]) {
        self.nonces
            .insert(nonce, now, 2 * self.policy.freshness_window_ms);
    }

    fn info(&self) -> GroupInfo {
        GroupInfo {
            name: self.policy.name.clone(),
            id: self.policy.id.0,
            epoch: self.tree.epoch().0,
            members: self.members.len(),
            degree: self.policy.tree.degree,
            height: self.tree.height(),
            pending: self.joins.len() + self.departures.len(),
        }
    }

    fn policy_list(&self) -> Vec<(String, String)> {
        let p = &self.policy;
        let enrollment = match &p.enrollment {
            Enrollment::Open => "open".to_owned(),
            Enrollment::Restricted { allowed, tokens } => {
                format!(
                    "restricted ({} keys, {} tokens)",
                    allowed.len(),
                    tokens.len()
                )
            }
        };
        [
            ("degree", p.tree.degree.to_string()),
            ("strategy", format!("{:?}", p.tree.strategy).to_lowercase()),
            ("hash_forward_joins", p.tree.hash_forward_joins.to_string()),
            ("one_way", p.tree.one_way.to_string()),
            ("batch_interval_ms", p.batch_interval_ms.to_string()),
            ("heartbeat_interval_ms", p.heartbeat_interval_ms.to_string()),
            ("lease_ms", p.lease_ms.to_string()),
            ("refresh_interval_ms", p.refresh_interval_ms.to_string()),
            ("repeats", p.repeats.to_string()),
            ("repeat_spacing_ms", p.repeat_spacing_ms.to_string()),
            ("mtu", p.mtu.to_string()),
            ("freshness_window_ms", p.freshness_window_ms.to_string()),
            ("enrollment", enrollment),
            (
                "rekey_address",
                p.rekey_address.map_or("-".to_owned(), |a| a.to_string()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    fn set_policy(&mut self, key: &str, value: &str, now: Timestamp) -> Result<(), CommandError> {
        let number = || {
            value.parse::<u64>().map_err(|_| {
                CommandError::BadPolicy(format!("{key} takes a whole number, not {value:?}"))
            })
        };
        let p = &mut self.policy;
        match key {
            "batch_interval_ms" => p.batch_interval_ms = number()?,
            "heartbeat_interval_ms" => p.heartbeat_interval_ms = number()?.max(1),
            "lease_ms" => p.lease_ms = number()?.max(1),
            "refresh_interval_ms" => {
                p.refresh_interval_ms = number()?;
                self.next_refresh =
                    (p.refresh_interval_ms > 0).then(|| now.plus(p.refresh_interval_ms));
            }
            "repeats" => {
                p.repeats = u8::try_from(number()?)
                    .ok()
                    .filter(|r| (1..=10).contains(r))
                    .ok_or_else(|| CommandError::BadPolicy("repeats is 1..=10".into()))?;
            }
            "repeat_spacing_ms" => {
                let spacing = number()?;
                if spacing > MAX_REPEAT_SPACING_MS {
                    return Err(CommandError::BadPolicy(format!(
                        "repeat_spacing_ms is 0..={MAX_REPEAT_SPACING_MS}"
                    )));
                }
                p.repeat_spacing_ms = spacing;
            }
            "mtu" => {
                let mtu = usize::try_from(number()?).unwrap_or(usize::MAX);
                if !(576..=wire::MAX_DATAGRAM).contains(&mtu) {
                    return Err(CommandError::BadPolicy(format!(
                        "mtu is 576..={}",
                        wire::MAX_DATAGRAM
                    )));
                }
                p.mtu = mtu;
            }
            "freshness_window_ms" => p.freshness_window_ms = number()?.max(1_000),
            other => {
                return Err(CommandError::BadPolicy(format!(
                    "unknown or read-only policy key {other:?}; settable: batch_interval_ms, \
                     heartbeat_interval_ms, lease_ms, refresh_interval_ms, repeats, \
                     repeat_spacing_ms, mtu, freshness_window_ms"
                )));
            }
        }
        Ok(())
    }

    fn inventory(&self, now: Timestamp) -> Vec<KeyInfo> {
        let epoch = self.tree.epoch().0;
        let mut holders: HashMap<NodeId, usize> = HashMap::new();
        for record in self.members.records() {
            let mut node = Some(record.leaf);
            while let Some(n) = node {
                *holders.entry(n).or_default() += 1;
                node = self.tree.parent(n);
            }
        }
        let refresh_left = self.next_refresh.map(|t| t.0.saturating_sub(now.0));
        let mut out: Vec<KeyInfo> = self
            .tree
            .nodes()
            .filter_map(|node| {
                let version = self.tree.version(node)?.0;
                Some(KeyInfo {
                    node: node.0,
                    version,
                    age_epochs: epoch.saturating_sub(version),
                    age_ms: self
                        .epoch_times
                        .get(&version)
                        .map(|t| now.0.saturating_sub(t.0)),
                    expires_in_ms: if node == NodeId::ROOT {
                        refresh_left
                    } else {
                        None
                    },
                    holders: holders.get(&node).copied().unwrap_or(0),
                })
            })
            .collect();
        out.sort_by_key(|k| k.node);
        out
    }
}

impl MemberRecord {
    fn info(&self, now: Timestamp) -> MemberInfo {
        MemberInfo {
            id: self.id.0,
            identity: hex(&self.identity),
            leaf: self.leaf.0,
            joined: self.joined,
            lease_left_ms: self.lease_until.0.saturating_sub(now.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn signing_on_workers_keeps_the_datagrams_in_order() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut tree = KeyTree::new(GroupId(7), lkh_tree::TreeConfig::default(), &mut rng).unwrap();
        let grow = |joins| Batch {
            leaves: Vec::new(),
            joins,
        };
        tree.rekey(&grow(4_096), &mut rng).unwrap();
        let rekey = tree.rekey(&grow(2_048), &mut rng).unwrap();
        let datagrams = pack_rekey(&rekey, &tree, 576);
        assert!(datagrams.len() > 3 * 64, "{} datagrams", datagrams.len());
        let signer = SigningKey::from_bytes(&[9; 32]);
        let alone = sign_all(&datagrams, &signer, 1);
        assert_eq!(alone.len(), datagrams.len());
        for workers in [2, 3, 8] {
            assert!(
                sign_all(&datagrams, &signer, workers) == alone,
                "{workers} workers"
            );
        }
    }
}

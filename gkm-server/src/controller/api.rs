//! What the controller takes and gives: transmits, events, commands and their answers, refusals.

use super::*;
pub use crate::reject::Reject;
pub use crate::roster::DepartReason;

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
    /// The group's signing key was replaced (`gkmctl signing-key rotate`): the announcement,
    /// signed by the key before, went out with the rekey of `from_epoch`, the first the new key
    /// signs.
    SigningKeyRotated {
        /// Group.
        group: u64,
        /// The new key's number in the group's chain.
        key_id: u32,
        /// The new public key, hex.
        key: String,
        /// The first epoch it signs.
        from_epoch: u64,
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
    /// This controller leads the group from now on (high availability: it took the group's
    /// lease); its first rekey is above every persisted epoch.
    Leading {
        /// Group.
        group: u64,
        /// The lease's term.
        term: u64,
        /// When.
        at: u64,
    },
    /// This controller no longer leads the group: its lease ran out or another controller took
    /// it (a save refused as deposed, or a renewal that failed). Nothing of the group is sent
    /// from now on.
    Deposed {
        /// Group.
        group: u64,
        /// The term it held.
        term: u64,
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
    /// Replace a group's signing key: made now, announced signed by the current key, used from
    /// the rekey that goes out with it.
    RotateSigningKey(String),
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
    /// Another controller leads the group (high availability).
    #[error(
        "group {group:?} is led by another controller{}; ask it (gkmctl --socket of that \
         controller's state directory)",
        leader.as_ref().map_or_else(String::new, |a| format!(" at {a}"))
    )]
    NotLeader {
        /// The group.
        group: String,
        /// The leader's request address, when known.
        leader: Option<String>,
    },
    /// A save of the controller's is outstanding (driver's business: it holds commands until
    /// [`Controller::persisting`] says none is).
    #[error("the controller is saving; try again in a moment")]
    Busy,
}

/// What a command asks the store for, so that its answer can say whether that went through
/// ([`Command::saving`], [`Controller::settle`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saving {
    /// The group.
    pub group: String,
    /// A rekey (an eviction, a rekey, a reset, a member's ban), or a change alone (a ban of an
    /// identity, a ban lifted).
    pub rekey: bool,
}

impl Command {
    /// What this command asks the store for, if anything.
    pub fn saving(&self) -> Option<Saving> {
        let (group, rekey) = match self {
            Command::Evict(group, _)
            | Command::Rekey(group)
            | Command::RotateSigningKey(group)
            | Command::Reset(group)
            | Command::Ban(group, BanTarget::Member(_)) => (group, true),
            Command::Ban(group, BanTarget::Identity(_)) | Command::Unban(group, _) => {
                (group, false)
            }
            _ => return None,
        };
        Some(Saving {
            group: group.clone(),
            rekey,
        })
    }
}

/// A group's signing key, as `gkmctl status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SigningKeyInfo {
    /// Group name.
    pub group: String,
    /// The key's number in the group's chain (0: the controller's own, `public_key`).
    pub key_id: u32,
    /// The public key, hex.
    pub key: String,
    /// Seconds since it was made (`None` for key 0, made outside the controller).
    pub age_s: Option<u64>,
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
    /// `leader` (this controller serves the group) or `standby` (another controller leads it;
    /// then `epoch` and `members` are those of its warm copy, zero before it holds one, and the
    /// other counts zero).
    pub role: Role,
    /// The lease's term (high availability), when this controller leads the group.
    pub term: Option<u64>,
    /// Where the leader answers, on a standby, when known.
    pub leader: Option<String>,
    /// On a standby holding a warm copy: the epochs the copy trailed the committed log by when
    /// it last caught up.
    pub behind: Option<u64>,
    /// On a standby holding a warm copy: milliseconds since the copy last matched the
    /// committed log (it catches up three times a lease; a number growing past that says it
    /// cannot read the database).
    pub synced_ms_ago: Option<u64>,
}

/// What this controller is to a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// It serves the group.
    Leader,
    /// Another controller leads the group.
    Standby,
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
    /// The KEM of its HPKE key: `x-wing` or `x25519`.
    pub kem: String,
}

/// A group's key inventory (`gkmctl keys`): its members counted by the KEM of their HPKE key,
/// and its tree's keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyInventory {
    /// Members per KEM name (`x-wing`, `x25519`), every KEM listed.
    pub members_by_kem: BTreeMap<String, usize>,
    /// The tree's keys, by node.
    pub keys: Vec<KeyInfo>,
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

/// A group's policy as `gkmctl policy` shows it: every setting, with its typed value (numbers as
/// numbers, switches as booleans), under the names the config file and `--set` use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyInfo {
    /// Children per internal node.
    pub degree: u8,
    /// `group`, `key` or `user`.
    pub strategy: String,
    /// LKH+ joins.
    pub hash_forward_joins: bool,
    /// One-way path updates on leaves.
    pub one_way: bool,
    /// How long changes are gathered before one rekey.
    pub batch_interval_ms: u64,
    /// Heartbeat period.
    pub heartbeat_interval_ms: u64,
    /// How long a membership lasts without renewal.
    pub lease_ms: u64,
    /// Rekey with no change after this long (0: never).
    pub refresh_interval_ms: u64,
    /// Sends per datagram.
    pub repeats: u8,
    /// Time between the sends of a datagram.
    pub repeat_spacing_ms: u64,
    /// Largest datagram.
    pub mtu: usize,
    /// How far a request's timestamp may be from the controller's clock.
    pub freshness_window_ms: u64,
    /// Who may register.
    pub enrollment: EnrollmentInfo,
    /// Where rekeys are multicast, as told to members (`null`: not told).
    pub rekey_address: Option<String>,
    /// Whether members may subscribe to unicast fan-out.
    pub fanout: bool,
    /// The KEMs of the HPKE keys the group takes (`x-wing`, `x25519`).
    pub kem: Vec<String>,
}

/// Who may register, as [`PolicyInfo`] shows it (counts, never the keys or tokens themselves).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum EnrollmentInfo {
    /// Anyone.
    Open,
    /// Listed identity keys and enrollment tokens.
    Restricted {
        /// Identity keys allowed.
        keys: usize,
        /// Enrollment tokens configured.
        tokens: usize,
    },
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
        /// Groups this controller stands by for (another controller leads them).
        standby: usize,
        /// The signing key of each group it leads.
        signing_keys: Vec<SigningKeyInfo>,
    },
    /// Groups.
    Groups(Vec<GroupInfo>),
    /// Members.
    Members(Vec<MemberInfo>),
    /// A group's policy, every setting with its typed value.
    Policy(PolicyInfo),
    /// Key inventory.
    Keys(KeyInventory),
    /// DOT text.
    Tree(String),
    /// Counters.
    Stats(Stats),
    /// Banned identities, hex.
    Bans(Vec<String>),
}

/// The time each phase of one rekey took, by the profiler's clock (see
/// [`Controller::set_profiler`]). The save is the driver's: it times it itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RekeyProfile {
    /// The tree's rekey (marking, new keys, wraps) and the roster's update.
    pub tree: Duration,
    /// Building the save's records (the delta, or the whole state).
    pub records: Duration,
    /// Packing the datagrams.
    pub pack: Duration,
    /// Signing them (on the workers).
    pub sign: Duration,
    /// From the start of the rekey until its save was reported durable and its datagrams
    /// signed (the save runs beside the packing and signing when the driver overlaps them).
    pub ready: Duration,
    /// Committing once the save was reported: the departures recorded, the events made, the
    /// datagrams queued (the welcomes apart).
    pub commit: Duration,
    /// Sealing and signing the joiners' welcomes.
    pub welcomes: Duration,
}

//! Group policy and the small value types the controller's API uses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use lkh_tree::{GroupId, TreeConfig};
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as the driver's clock reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// This time plus `ms` milliseconds (saturating).
    pub fn plus(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
}

/// A request connection, numbered by the driver; replies name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Who may register. Banned identities (`gkmctl ban`) are refused under either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enrollment {
    /// Anyone who can sign a fresh request (for local demos and tests; the daemon warns).
    Open,
    /// Only listed identity keys, or holders of a single-use token.
    Restricted {
        /// Allowed Ed25519 identity keys.
        allowed: BTreeSet<[u8; 32]>,
        /// Single-use enrollment tokens, by digest ([`crate::token_digest`]), with their
        /// conditions. A token is spent for good once used (the spent list is durable state).
        tokens: BTreeMap<[u8; 32], TokenRule>,
    },
}

/// The conditions of one single-use enrollment token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenRule {
    /// Refused from this time on (`None`: never expires).
    pub expires: Option<Timestamp>,
    /// Only this identity key may spend it (`None`: anyone).
    pub identity: Option<[u8; 32]>,
}

/// The longest time between two sends of a rekey datagram.
pub const MAX_REPEAT_SPACING_MS: u64 = 10_000;

/// One group's policy. Every field has a sane default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupPolicy {
    /// The group's name, for people.
    pub name: String,
    /// The group's id on the wire.
    pub id: GroupId,
    /// Tree degree, strategy, hash-forward joins, one-way updates.
    pub tree: TreeConfig,
    /// How long changes are gathered before one rekey; 0 rekeys at once.
    pub batch_interval_ms: u64,
    /// Heartbeat period.
    pub heartbeat_interval_ms: u64,
    /// How long a membership lasts without renewal.
    pub lease_ms: u64,
    /// Rekey with no membership change after this long (0: never).
    pub refresh_interval_ms: u64,
    /// How many times each rekey datagram is sent.
    pub repeats: u8,
    /// Time between the sends of a datagram (0: back to back; at most
    /// [`MAX_REPEAT_SPACING_MS`]). Spaced copies survive a loss burst shorter than the spacing;
    /// back-to-back copies share its fate. Keep it below the heartbeat interval: a member that
    /// sees a heartbeat ahead of it before the copy arrives resyncs.
    pub repeat_spacing_ms: u64,
    /// Largest datagram.
    pub mtu: usize,
    /// How far a request's timestamp may be from the controller's clock.
    pub freshness_window_ms: u64,
    /// Who may register.
    pub enrollment: Enrollment,
    /// Where the group's rekeys and heartbeats are multicast, told to members in their welcomes
    /// and resync responses so that they need not be configured with it (`None`: not told).
    pub rekey_address: Option<SocketAddr>,
    /// Whether members that multicast does not reach may subscribe to unicast fan-out (each to
    /// one address it proved it receives at).
    pub fanout: bool,
}

impl GroupPolicy {
    /// The defaults for a group called `name` with id `id`: degree 4, group-oriented rekeying with
    /// one-way leaves, immediate rekeying, heartbeats every 2 s, leases of 60 s, no periodic
    /// refresh, 2 sends per datagram 100 ms apart, MTU 1200, requests within 60 s, open enrollment.
    pub fn new(name: &str, id: GroupId) -> Self {
        GroupPolicy {
            name: name.to_owned(),
            id,
            tree: TreeConfig {
                one_way: true,
                ..TreeConfig::default()
            },
            batch_interval_ms: 0,
            heartbeat_interval_ms: 2_000,
            lease_ms: 60_000,
            refresh_interval_ms: 0,
            repeats: 2,
            repeat_spacing_ms: 100,
            mtu: wire::DEFAULT_MTU,
            freshness_window_ms: 60_000,
            enrollment: Enrollment::Open,
            rekey_address: None,
            fanout: true,
        }
    }
}

//! Group policy and the small value types the controller's API uses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use lkh_tree::{GroupId, Strategy, TreeConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use wire::Kem;

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
    /// The KEMs of the HPKE keys the group seals paths to, in [`Kem::ALL`] order, never empty:
    /// X-Wing alone by default (a welcome recorded today stays closed to a quantum computer
    /// later); X25519 for members that cannot afford X-Wing's 1,216-byte key. A registration
    /// under another KEM is refused, and so is a resync of a member registered under one.
    pub kems: Vec<Kem>,
}

/// `x-wing, x25519`: the names of `kems`, for people.
pub(crate) fn kem_names(kems: &[Kem]) -> String {
    kems.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

impl GroupPolicy {
    /// The defaults for a group called `name` with id `id`: degree 4, group-oriented rekeying with
    /// one-way leaves, immediate rekeying, heartbeats every 2 s, leases of 60 s, no periodic
    /// refresh, 2 sends per datagram 100 ms apart, MTU 1200, requests within 60 s, open enrollment,
    /// X-Wing keys only.
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
            kems: vec![Kem::XWing],
        }
    }
}

/// A policy setting refused by [`GroupPolicy::set`]: which, and what it takes.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{key}: {takes}, not {value:?}")]
pub struct PolicyError {
    /// The setting.
    pub key: String,
    /// The value given.
    pub value: String,
    /// What the setting takes.
    pub takes: String,
}

impl GroupPolicy {
    /// The settings an operator may change while the group runs (`gkmctl policy --set`); the
    /// tree's shape (`degree`, `strategy`, `hash_forward_joins`, `one_way`) is fixed when the
    /// group is created, and enrollment comes from the config.
    pub const RUNTIME_KEYS: [&'static str; 9] = [
        "batch_interval_ms",
        "heartbeat_interval_ms",
        "lease_ms",
        "refresh_interval_ms",
        "repeats",
        "repeat_spacing_ms",
        "mtu",
        "freshness_window_ms",
        "kem",
    ];

    /// Sets one setting from its text, checked against its bounds: the one check the config file
    /// and `gkmctl policy --set` share. Nothing changes on error.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), PolicyError> {
        let refuse = |takes: &str| PolicyError {
            key: key.to_owned(),
            value: value.to_owned(),
            takes: takes.to_owned(),
        };
        let within = |low: u64, high: u64, takes: &str| {
            value
                .parse::<u64>()
                .ok()
                .filter(|v| (low..=high).contains(v))
                .ok_or_else(|| refuse(takes))
        };
        let flag = || value.parse::<bool>().map_err(|_| refuse("true or false"));
        let max_datagram = wire::MAX_DATAGRAM as u64;
        match key {
            "degree" => {
                let degree = within(2, 64, "2..=64")?;
                self.tree.degree = u8::try_from(degree).map_err(|_| refuse("2..=64"))?;
            }
            "strategy" => {
                self.tree.strategy = match value {
                    "group" => Strategy::Group,
                    "key" => Strategy::Key,
                    "user" => Strategy::User,
                    _ => return Err(refuse("group, key or user")),
                }
            }
            "hash_forward_joins" => self.tree.hash_forward_joins = flag()?,
            "one_way" => self.tree.one_way = flag()?,
            "batch_interval_ms" => {
                self.batch_interval_ms = within(0, u64::MAX, "a whole number of ms")?;
            }
            "heartbeat_interval_ms" => {
                self.heartbeat_interval_ms = within(1, u64::MAX, "at least 1 ms")?;
            }
            "lease_ms" => self.lease_ms = within(1, u64::MAX, "at least 1 ms")?,
            "refresh_interval_ms" => {
                self.refresh_interval_ms = within(0, u64::MAX, "a whole number of ms (0: never)")?;
            }
            "repeats" => {
                let repeats = within(1, 10, "1..=10")?;
                self.repeats = u8::try_from(repeats).map_err(|_| refuse("1..=10"))?;
            }
            "repeat_spacing_ms" => {
                let takes = format!("0..={MAX_REPEAT_SPACING_MS} ms");
                self.repeat_spacing_ms = within(0, MAX_REPEAT_SPACING_MS, &takes)?;
            }
            "mtu" => {
                let takes = format!("576..={max_datagram} bytes");
                let mtu = within(576, max_datagram, &takes)?;
                self.mtu = usize::try_from(mtu).map_err(|_| refuse(&takes))?;
            }
            "freshness_window_ms" => {
                self.freshness_window_ms = within(1_000, u64::MAX, "at least 1000 ms")?;
            }
            "kem" => self.kems = kems(value).ok_or_else(|| refuse(KEM_TAKES))?,
            _ => {
                return Err(refuse(
                    "unknown setting; settable: degree, strategy, hash_forward_joins, one_way, \
                     batch_interval_ms, heartbeat_interval_ms, lease_ms, refresh_interval_ms, \
                     repeats, repeat_spacing_ms, mtu, freshness_window_ms, kem",
                ));
            }
        }
        Ok(())
    }
}

const KEM_TAKES: &str = "x-wing, x25519, or both separated by a comma";

/// The KEMs of a `kem` setting (`x-wing`, `x25519`, `x-wing,x25519`), in [`Kem::ALL`] order;
/// `None` for an unknown name or none at all.
fn kems(value: &str) -> Option<Vec<Kem>> {
    let named = value
        .split(',')
        .map(|name| Kem::from_name(name.trim()))
        .collect::<Option<Vec<Kem>>>()?;
    let kems: Vec<Kem> = Kem::ALL.into_iter().filter(|k| named.contains(k)).collect();
    (!kems.is_empty()).then_some(kems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_check_for_every_setting_and_nothing_changes_when_it_refuses() {
        let mut p = GroupPolicy::new("g", GroupId(1));
        let defaults = p.clone();
        for (key, value) in [
            ("degree", "1"),
            ("degree", "65"),
            ("strategy", "tree"),
            ("one_way", "yes"),
            ("heartbeat_interval_ms", "0"),
            ("lease_ms", "0"),
            ("repeats", "0"),
            ("repeats", "11"),
            ("repeat_spacing_ms", "10001"),
            ("mtu", "575"),
            ("mtu", "70000"),
            ("freshness_window_ms", "999"),
            ("kem", "kyber"),
            ("kem", ""),
            ("kem", "x-wing,rsa"),
            ("batch_interval_ms", "-1"),
            ("colour", "blue"),
        ] {
            let refused = p.set(key, value).expect_err(key);
            assert_eq!((refused.key.as_str(), refused.value.as_str()), (key, value));
            assert_eq!(p, defaults, "{key} = {value} changed the policy");
        }
        for (key, value) in [
            ("degree", "64"),
            ("strategy", "user"),
            ("one_way", "false"),
            ("heartbeat_interval_ms", "1"),
            ("repeats", "10"),
            ("repeat_spacing_ms", "10000"),
            ("mtu", "576"),
            ("freshness_window_ms", "1000"),
            ("refresh_interval_ms", "0"),
        ] {
            p.set(key, value).expect(key);
        }
        assert_eq!((p.tree.degree, p.repeats, p.mtu), (64, 10, 576));
        assert_eq!(p.tree.strategy, Strategy::User);
        assert_eq!(defaults.kems, [Kem::XWing]);
        p.set("kem", "x25519, x-wing").unwrap();
        assert_eq!(p.kems, [Kem::XWing, Kem::X25519]);
        assert_eq!(kem_names(&p.kems), "x-wing, x25519");
        p.set("kem", "x25519").unwrap();
        assert_eq!(p.kems, [Kem::X25519]);
    }
}

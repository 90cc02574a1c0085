//! Fan-out subscriptions at the controller: return routability before anything is sent to an
//! address. A [`wire::Subscribe`] without a cookie is answered, at its source address, with a
//! cookie (a MAC over group, member, address and time under a key of this controller's; no
//! state is kept per cookie) smaller than the request; only a signed subscription echoing a
//! valid cookie from the address it was sent to makes that address the member's one fan-out
//! address, replacing any other. Cookies are limited per member and per source address, and a
//! member's address is dropped when it departs or stops renewing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use lkh_tree::GroupId;
use wire::{COOKIE_LEN, Cookie, MemberId};
use zeroize::Zeroizing;

use crate::policy::Timestamp;

/// How long a cookie may be echoed after it was issued.
pub const COOKIE_LIFETIME_MS: u64 = 120_000;
/// The least time between two cookies for one member.
pub const COOKIE_INTERVAL_MS: u64 = 1_000;
/// Cookies per source address per second.
pub const SOURCE_BUDGET: u32 = 8;
/// Source addresses counted per second; past this, new ones get no cookie until the next second.
const MAX_SOURCES: usize = 65_536;

/// The cookie key and the per-source budget (controller-wide).
pub(crate) struct Cookies {
    key: Zeroizing<[u8; 32]>,
    second: u64,
    sent: HashMap<IpAddr, u32>,
}

impl Cookies {
    /// Cookies under `key` (random, drawn at start).
    pub(crate) fn new(key: [u8; 32]) -> Self {
        Cookies {
            key: Zeroizing::new(key),
            second: 0,
            sent: HashMap::new(),
        }
    }

    /// The cookie for `member` of `group` at `from`, issued at `issued_ms`.
    pub(crate) fn mac(
        &self,
        group: GroupId,
        member: MemberId,
        from: SocketAddr,
        issued_ms: u64,
    ) -> [u8; COOKIE_LEN] {
        let mut input = Vec::with_capacity(8 + 8 + 8 + 16 + 2);
        input.extend_from_slice(&group.0.to_be_bytes());
        input.extend_from_slice(&member.0.to_be_bytes());
        input.extend_from_slice(&issued_ms.to_be_bytes());
        let ip = match from.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        input.extend_from_slice(&ip.octets());
        input.extend_from_slice(&from.port().to_be_bytes());
        let hash = blake3::keyed_hash(&self.key, &input);
        let mut mac = [0u8; COOKIE_LEN];
        mac.copy_from_slice(&hash.as_bytes()[..COOKIE_LEN]);
        mac
    }

    /// Whether `cookie`, echoed by `member` of `group` from `from`, is one this controller sent
    /// there within [`COOKIE_LIFETIME_MS`] (compared in constant time).
    pub(crate) fn valid(
        &self,
        group: GroupId,
        member: MemberId,
        from: SocketAddr,
        cookie: &Cookie,
        now: Timestamp,
    ) -> bool {
        let fresh = cookie.issued_ms <= now.0
            && now.0.saturating_sub(cookie.issued_ms) <= COOKIE_LIFETIME_MS;
        let expected = self.mac(group, member, from, cookie.issued_ms);
        let differ = expected
            .iter()
            .zip(cookie.mac)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        fresh & (differ == 0)
    }

    /// Counts a cookie to `from` now; false when its source has had its budget this second.
    pub(crate) fn spend(&mut self, from: IpAddr, now: Timestamp) -> bool {
        let second = now.0 / 1_000;
        if second != self.second {
            self.second = second;
            self.sent.clear();
        }
        if !self.sent.contains_key(&from) && self.sent.len() >= MAX_SOURCES {
            return false;
        }
        let sent = self.sent.entry(from).or_default();
        *sent += 1;
        *sent <= SOURCE_BUDGET
    }
}

/// At most one thing per member per interval (a cookie, a resync path), or per `round` (a
/// resync path for an epoch the member was not yet sent).
pub(crate) struct RateLimit {
    interval_ms: u64,
    last: HashMap<MemberId, (Timestamp, u64)>,
}

impl RateLimit {
    /// One per member per `interval_ms`.
    pub(crate) fn new(interval_ms: u64) -> Self {
        RateLimit {
            interval_ms,
            last: HashMap::new(),
        }
    }

    /// Whether `member` may have one now; records it if so.
    pub(crate) fn allow(&mut self, member: MemberId, now: Timestamp) -> bool {
        self.allow_in(member, now, 0)
    }

    /// Whether `member` may have one now in `round` (any number that only grows, such as an
    /// epoch): a round it had none in yet is always allowed. Records it if so.
    pub(crate) fn allow_in(&mut self, member: MemberId, now: Timestamp, round: u64) -> bool {
        if self.last.len() >= 4_096 && !self.last.contains_key(&member) {
            let interval = self.interval_ms;
            self.last.retain(|_, (at, _)| at.plus(interval) > now);
        }
        match self.last.get(&member) {
            Some((at, seen)) if at.plus(self.interval_ms) > now && *seen >= round => false,
            _ => {
                self.last.insert(member, (now, round));
                true
            }
        }
    }

    /// Forgets `member`.
    pub(crate) fn remove(&mut self, member: MemberId) {
        self.last.remove(&member);
    }
}

/// One group's confirmed fan-out addresses, one per member.
pub(crate) struct Subscribers {
    confirmed: HashMap<MemberId, (SocketAddr, Timestamp)>,
    cookie_sent: RateLimit,
}

impl Default for Subscribers {
    fn default() -> Self {
        Subscribers {
            confirmed: HashMap::new(),
            cookie_sent: RateLimit::new(COOKIE_INTERVAL_MS),
        }
    }
}

impl Subscribers {
    /// Whether `member` may be sent a cookie now (one per [`COOKIE_INTERVAL_MS`]); records it.
    pub(crate) fn may_send_cookie(&mut self, member: MemberId, now: Timestamp) -> bool {
        self.cookie_sent.allow(member, now)
    }

    /// `from` is now `member`'s fan-out address (replacing any other).
    pub(crate) fn confirm(&mut self, member: MemberId, from: SocketAddr, now: Timestamp) {
        self.confirmed.insert(member, (from, now));
    }

    /// `member` departed.
    pub(crate) fn remove(&mut self, member: MemberId) {
        self.confirmed.remove(&member);
        self.cookie_sent.remove(member);
    }

    /// The addresses confirmed within `lease_ms` (older ones are dropped).
    pub(crate) fn addresses(&mut self, now: Timestamp, lease_ms: u64) -> Vec<SocketAddr> {
        self.confirmed.retain(|_, (_, at)| at.plus(lease_ms) > now);
        self.confirmed.values().map(|(to, _)| *to).collect()
    }
}

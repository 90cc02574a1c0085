//! Which controller a member's driver asks. With high availability several controllers serve a
//! group and one of them leads it; the others answer [`wire::Status::NotLeader`], naming the
//! leader when they know it. [`Controllers`] holds the addresses the operator configured
//! (`--controller`, repeatable) and the one asked now. It follows a named leader only when the
//! operator configured that address: an error message is unsigned, so a forged one must not
//! send the member (and its requests, which name it) to a host of the forger's choosing.
//! Performs no I/O.

use std::net::SocketAddr;

/// The configured controllers and the one the member asks now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Controllers {
    addrs: Vec<SocketAddr>,
    /// One of `addrs`.
    current: SocketAddr,
}

impl Controllers {
    /// The controllers in the order given (repeats dropped), asking the first; `None` when
    /// there are none.
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Option<Self> {
        let mut unique: Vec<SocketAddr> = Vec::new();
        for addr in addrs {
            if !unique.contains(&addr) {
                unique.push(addr);
            }
        }
        let current = *unique.first()?;
        Some(Controllers {
            addrs: unique,
            current,
        })
    }

    /// The controller asked now.
    pub fn current(&self) -> SocketAddr {
        self.current
    }

    /// Every configured controller, in order.
    pub fn all(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Whether `addr` is a configured controller.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.addrs.contains(&addr)
    }

    /// The controller asked now does not lead the group and names `leader` (when it knows one):
    /// ask `leader` if it is a configured controller other than the current one, else the next
    /// configured one. The controller asked from now on, if it changed.
    pub fn not_leader(&mut self, leader: Option<SocketAddr>) -> Option<SocketAddr> {
        match leader {
            Some(leader) if leader != self.current && self.contains(leader) => {
                self.current = leader;
                Some(leader)
            }
            _ => self.advance(),
        }
    }

    /// The controller asked now did not answer (connection refused, reset or timed out): ask
    /// the next configured one. The controller asked from now on, if it changed (it does not
    /// when only one is configured).
    pub fn advance(&mut self) -> Option<SocketAddr> {
        if self.addrs.len() < 2 {
            return None;
        }
        let current = self.current;
        let next = self
            .addrs
            .iter()
            .cycle()
            .skip_while(|a| **a != current)
            .nth(1)
            .copied()?;
        self.current = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn three() -> Controllers {
        Controllers::new(
            ["10.0.0.1:47700", "10.0.0.2:47700", "[::1]:47700"]
                .into_iter()
                .map(addr),
        )
        .unwrap()
    }

    #[test]
    fn none_configured_is_refused_and_repeats_are_dropped() {
        assert!(Controllers::new([]).is_none());
        let c = Controllers::new([addr("10.0.0.1:1"), addr("10.0.0.1:1")]).unwrap();
        assert_eq!(c.all(), &[addr("10.0.0.1:1")]);
        assert_eq!(c.current(), addr("10.0.0.1:1"));
    }

    #[test]
    fn a_named_leader_is_followed_only_when_configured() {
        let mut c = three();
        assert_eq!(
            c.not_leader(Some(addr("[::1]:47700"))),
            Some(addr("[::1]:47700"))
        );
        assert_eq!(c.current(), addr("[::1]:47700"));
        // An address nobody configured (a forged or misconfigured answer): the next one.
        assert_eq!(
            c.not_leader(Some(addr("192.0.2.66:47700"))),
            Some(addr("10.0.0.1:47700"))
        );
        // None named, or itself named: the next one.
        assert_eq!(c.not_leader(None), Some(addr("10.0.0.2:47700")));
        assert_eq!(
            c.not_leader(Some(addr("10.0.0.2:47700"))),
            Some(addr("[::1]:47700"))
        );
    }

    #[test]
    fn next_cycles_and_a_single_controller_stays() {
        let mut c = three();
        let seen: Vec<_> = (0..4).filter_map(|_| c.advance()).collect();
        assert_eq!(
            seen,
            [
                "10.0.0.2:47700",
                "[::1]:47700",
                "10.0.0.1:47700",
                "10.0.0.2:47700"
            ]
            .map(addr)
        );
        let mut one = Controllers::new([addr("10.0.0.1:47700")]).unwrap();
        assert_eq!(one.advance(), None);
        assert_eq!(one.not_leader(Some(addr("10.0.0.9:47700"))), None);
        assert_eq!(one.current(), addr("10.0.0.1:47700"));
    }
}

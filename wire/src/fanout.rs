//! Fan-out subscriptions: unicast delivery of a group's datagrams to a member that multicast
//! does not reach, with return routability first (as WireGuard's cookie under load). The
//! controller sends a member's group datagrams to an address only after the member, signing,
//! echoed a cookie that the controller sent to that address; the cookie is smaller than the
//! request that asked for it, so a spoofed source gets less than the spoofer sent.
//!
//! ```text
//! member ── Subscribe (signed, no cookie) ──────────► controller
//! member ◄── CookieReply (44 bytes, unsigned) ─────── controller    to the request's source
//! member ── Subscribe (signed, echoing the cookie) ─► controller    address confirmed
//! ```
//!
//! The cookie is a MAC under a key only the controller holds, over the group, the member, the
//! source address and the time it was issued; the controller keeps no state per cookie.

use lkh_tree::GroupId;

use crate::codec::{Codec, DecodeError, Reader};
use crate::message::{Header, MemberId, MessageType, NONCE_LEN};

/// Length of a cookie's MAC.
pub const COOKIE_LEN: usize = 16;

/// A cookie: when it was issued, and the controller's MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cookie {
    /// Milliseconds since the Unix epoch, by the controller's clock.
    pub issued_ms: u64,
    /// MAC over group, member, source address and `issued_ms`.
    pub mac: [u8; COOKIE_LEN],
}

/// Member → controller, UDP: send me the group's datagrams here. Signed by the member's identity
/// key; fresh by timestamp and nonce. Without a cookie it asks for one; with one it confirms the
/// address the cookie was sent to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    /// The group.
    pub group: GroupId,
    /// The member's id.
    pub member: MemberId,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// A random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The cookie echoed, if the controller sent one.
    pub cookie: Option<Cookie>,
}

impl Codec for Subscribe {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, MessageType::Subscribe, self.group);
        out.extend_from_slice(&self.member.0.to_be_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        match &self.cookie {
            None => out.push(0),
            Some(cookie) => {
                out.push(1);
                out.extend_from_slice(&cookie.issued_ms.to_be_bytes());
                out.extend_from_slice(&cookie.mac);
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::Subscribe)?;
        let member = MemberId(r.u64("member id")?);
        let timestamp_ms = r.u64("timestamp")?;
        let nonce = r.array("nonce")?;
        let cookie = match r.u8("cookie flag")? {
            0 => None,
            1 => Some(Cookie {
                issued_ms: r.u64("cookie time")?,
                mac: r.array("cookie")?,
            }),
            _ => return Err(DecodeError::Invalid("cookie flag")),
        };
        Ok(Subscribe {
            group,
            member,
            timestamp_ms,
            nonce,
            cookie,
        })
    }
}

/// Controller → the source address of a [`Subscribe`] without a cookie: the cookie to echo.
/// Unsigned (it authorizes nothing by itself) and smaller than the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CookieReply {
    /// The group.
    pub group: GroupId,
    /// The member the cookie is for.
    pub member: MemberId,
    /// The cookie.
    pub cookie: Cookie,
}

impl Codec for CookieReply {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, MessageType::CookieReply, self.group);
        out.extend_from_slice(&self.member.0.to_be_bytes());
        out.extend_from_slice(&self.cookie.issued_ms.to_be_bytes());
        out.extend_from_slice(&self.cookie.mac);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::CookieReply)?;
        let member = MemberId(r.u64("member id")?);
        let cookie = Cookie {
            issued_ms: r.u64("cookie time")?,
            mac: r.array("cookie")?,
        };
        Ok(CookieReply {
            group,
            member,
            cookie,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::signed::sign;

    #[test]
    fn a_cookie_reply_is_smaller_than_the_request_that_asks_for_it() {
        let request = Subscribe {
            group: GroupId(1),
            member: MemberId(2),
            timestamp_ms: 3,
            nonce: [4; NONCE_LEN],
            cookie: None,
        };
        let signed = sign(&request, &SigningKey::from_bytes(&[5; 32]));
        let reply = CookieReply {
            group: GroupId(1),
            member: MemberId(2),
            cookie: Cookie {
                issued_ms: 6,
                mac: [7; COOKIE_LEN],
            },
        }
        .to_bytes();
        assert_eq!(reply.len(), 44);
        assert!(
            reply.len() * 2 < signed.len(),
            "{} vs {}",
            reply.len(),
            signed.len()
        );
        assert_eq!(
            CookieReply::decode_exact(&reply).unwrap().member,
            MemberId(2)
        );
        let echoed = Subscribe {
            cookie: Some(Cookie {
                issued_ms: 6,
                mac: [7; COOKIE_LEN],
            }),
            ..request
        };
        assert_eq!(Subscribe::decode_exact(&echoed.to_bytes()).unwrap(), echoed);
    }
}

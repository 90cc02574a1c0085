//! Why the controller refuses a request: counted per reason, answered with a [`wire::Status`].

use serde::Serialize;
use wire::Status;

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
    /// Too many requests waiting for the group's outstanding save; the member tries again.
    Busy,
    /// This controller does not lead the group (a standby, or deposed): the member asks the
    /// leader, whose address the answer names when known.
    NotLeader,
    /// The group's policy does not accept the KEM of the member's HPKE key (`kem` setting): a
    /// registration, or a resync of a member registered under a KEM the policy no longer takes.
    KemNotAccepted,
    /// A resync request presented an HPKE key other than the one the member registered with.
    WrongHpkeKey,
    /// A chain request named a signing key the group's kept announcements do not lead from.
    SigningKeyUnknown,
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
            Reject::Busy => "busy",
            Reject::NotLeader => "not_leader",
            Reject::KemNotAccepted => "kem_not_accepted",
            Reject::WrongHpkeKey => "wrong_hpke_key",
            Reject::SigningKeyUnknown => "signing_key_unknown",
        }
    }

    /// The status sent to the member.
    pub fn status(self) -> Status {
        match self {
            Reject::Malformed | Reject::WrongHpkeKey => Status::Malformed,
            Reject::BadSignature => Status::BadSignature,
            Reject::Unauthorized | Reject::BadCookie => Status::Unauthorized,
            Reject::UnknownGroup => Status::UnknownGroup,
            Reject::NotAMember => Status::NotAMember,
            Reject::UnexpectedMessage => Status::UnexpectedMessage,
            Reject::StaleRequest | Reject::Replayed => Status::Stale,
            Reject::GroupFull => Status::GroupFull,
            Reject::RateLimited => Status::RateLimited,
            Reject::Busy => Status::Unavailable,
            Reject::NotLeader => Status::NotLeader,
            Reject::KemNotAccepted => Status::KemNotAccepted,
            Reject::SigningKeyUnknown => Status::SigningKeyUnknown,
        }
    }
}

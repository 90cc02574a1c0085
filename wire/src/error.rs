//! Errors: malformed input ([`DecodeError`]) and valid messages the protocol refuses now.

use lkh_tree::{ApplyError, Epoch, GroupId};
use thiserror::Error;

use crate::codec::DecodeError;

/// Why a message was refused. None of these changes any state.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The bytes are not a well-formed message.
    #[error("malformed message: {0}")]
    Decode(#[from] DecodeError),
    /// The signature does not verify under the expected key.
    #[error("signature does not verify")]
    BadSignature,
    /// The message is for another group.
    #[error("message for group {got}, expected {expected}")]
    WrongGroup {
        /// The group expected.
        expected: GroupId,
        /// The group in the message.
        got: GroupId,
    },
    /// The message is not newer than what the receiver holds (a replay or a duplicate).
    #[error("epoch {got} is not newer than the current epoch {current}")]
    Stale {
        /// The receiver's epoch.
        current: Epoch,
        /// The message's epoch.
        got: Epoch,
    },
    /// The message is more than one epoch ahead: the receiver missed a rekey and must resync.
    #[error("epoch {got} skips epochs after {current}; resync")]
    Gap {
        /// The receiver's epoch.
        current: Epoch,
        /// The message's epoch.
        got: Epoch,
    },
    /// The datagram is valid but holds nothing for this member (another datagram of the same
    /// epoch does).
    #[error("datagram does not serve this member")]
    NotForMe,
    /// The keys in a fresh, authentic datagram do not fit the member's path.
    #[error("rekey does not apply: {0}")]
    Apply(#[from] ApplyError),
    /// A group data frame failed to authenticate.
    #[error("data frame does not authenticate")]
    BadFrame,
    /// The packer cannot fit one member's needs into one datagram of this MTU.
    #[error("MTU {0} is too small for one member's path")]
    MtuTooSmall(usize),
}

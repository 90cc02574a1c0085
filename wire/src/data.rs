//! Group data frames: ChaCha20-Poly1305 under the epoch's traffic key. The nonce is
//! `sender (4) ‖ seq (8)`, unique per traffic key as long as each sender never repeats a sequence
//! number within an epoch; the associated data is the frame's header fields.

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use lkh_tree::{Epoch, GroupId, TrafficKey};

use crate::error::WireError;
use crate::message::{DataFrame, MAX_PAYLOAD};

fn nonce(sender: u32, seq: u64) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&sender.to_be_bytes());
    nonce[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::from(nonce)
}

/// Encrypts `payload` (at most 65,000 bytes; longer input is cut there) into a frame.
pub fn seal(
    key: &TrafficKey,
    group: GroupId,
    epoch: Epoch,
    sender: u32,
    seq: u64,
    payload: &[u8],
) -> DataFrame {
    let payload = payload.get(..MAX_PAYLOAD).unwrap_or(payload);
    let mut frame = DataFrame {
        group,
        epoch,
        sender,
        seq,
        ciphertext: Vec::new(),
    };
    let mut body = payload.to_vec();
    let cipher = ChaCha20Poly1305::new(&(*key.as_bytes()).into());
    let tag = cipher
        .encrypt_inout_detached(
            &nonce(sender, seq),
            &frame.associated_data(),
            body.as_mut_slice().into(),
        )
        .unwrap_or_default();
    body.extend_from_slice(&tag);
    frame.ciphertext = body;
    frame
}

/// Decrypts a frame; the caller checks group, epoch and replay of (sender, seq).
pub fn open(key: &TrafficKey, frame: &DataFrame) -> Result<Vec<u8>, WireError> {
    let split = frame
        .ciphertext
        .len()
        .checked_sub(16)
        .ok_or(WireError::BadFrame)?;
    let (body, tag) = frame.ciphertext.split_at(split);
    let tag = Tag::try_from(tag).map_err(|_| WireError::BadFrame)?;
    let mut plain = body.to_vec();
    let cipher = ChaCha20Poly1305::new(&(*key.as_bytes()).into());
    cipher
        .decrypt_inout_detached(
            &nonce(frame.sender, frame.seq),
            &frame.associated_data(),
            plain.as_mut_slice().into(),
            &tag,
        )
        .map_err(|_| WireError::BadFrame)?;
    Ok(plain)
}

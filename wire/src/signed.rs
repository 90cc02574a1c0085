//! Ed25519 (RFC 8032) signatures over a context label and a message body, checked with
//! `verify_strict`. A signed message is its body followed by the 64-byte signature; the
//! signature covers `"gkm v1 signed message\0" ‖ body`, and the body's type byte keeps one
//! message kind from standing in for another.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::codec::{Codec, DecodeError, Reader};
use crate::error::WireError;

/// Length of a signature.
pub const SIGNATURE_LEN: usize = 64;
const LABEL: &[u8] = b"gkm v1 signed message\0";

/// A message whose signature was checked. Only [`open`] makes one.
#[derive(Debug)]
pub struct Verified<T>(T);

impl<T> Verified<T> {
    /// The message.
    pub fn message(&self) -> &T {
        &self.0
    }

    /// A message taken as verified, for tests of what follows verification.
    #[cfg(test)]
    pub(crate) fn assume(message: T) -> Self {
        Verified(message)
    }

    /// Takes the message out.
    pub fn into_message(self) -> T {
        self.0
    }
}

fn signed_input(body: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(LABEL.len() + body.len());
    input.extend_from_slice(LABEL);
    input.extend_from_slice(body);
    input
}

/// Encodes and signs a message: `body ‖ signature`. The body is encoded after the label in one
/// buffer, signed there, and the label is then dropped, so the body is written once.
pub fn sign<T: Codec>(message: &T, key: &SigningKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(LABEL.len() + 1280);
    out.extend_from_slice(LABEL);
    message.encode(&mut out);
    let signature = key.sign(&out);
    out.drain(..LABEL.len());
    out.extend_from_slice(&signature.to_bytes());
    out
}

/// Decodes a signed message, checks that nothing trails the signature, and verifies it under
/// `key`. Decoding is bounded; the signature is checked before anything is returned.
pub fn open<T: Codec>(bytes: &[u8], key: &VerifyingKey) -> Result<Verified<T>, WireError> {
    open_with(bytes, |_| Ok(*key))
}

/// As [`open`], with the key chosen from the decoded (not yet trusted) message, e.g. the
/// identity key a registration request carries.
pub fn open_with<T: Codec>(
    bytes: &[u8],
    key_for: impl FnOnce(&T) -> Result<VerifyingKey, WireError>,
) -> Result<Verified<T>, WireError> {
    let unverified = decode::<T>(bytes)?;
    let key = key_for(&unverified.message)?;
    unverified.verify(&key)
}

/// A signed message decoded but not yet verified: its fields may be read to decide whether a
/// signature check is worth making, and trusted for nothing else. [`Unverified::verify`] is the
/// only way on.
#[derive(Debug)]
pub struct Unverified<'a, T> {
    message: T,
    body: &'a [u8],
    signature: [u8; SIGNATURE_LEN],
}

impl<T> Unverified<'_, T> {
    /// The message, unverified.
    pub fn message(&self) -> &T {
        &self.message
    }

    /// Checks the signature over the bytes the message was decoded from.
    pub fn verify(self, key: &VerifyingKey) -> Result<Verified<T>, WireError> {
        key.verify_strict(
            &signed_input(self.body),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| WireError::BadSignature)?;
        Ok(Verified(self.message))
    }
}

/// Decodes a signed message (bounded) and checks that nothing trails the signature; the
/// signature is not checked yet.
pub fn decode<T: Codec>(bytes: &[u8]) -> Result<Unverified<'_, T>, WireError> {
    let mut reader = Reader::new(bytes);
    let message = T::decode(&mut reader)?;
    let body_len = bytes.len() - reader.remaining();
    let signature: [u8; SIGNATURE_LEN] = reader.array("signature")?;
    reader.finish()?;
    let body = bytes
        .get(..body_len)
        .ok_or(DecodeError::Truncated("body"))?;
    Ok(Unverified {
        message,
        body,
        signature,
    })
}

/// The Ed25519 public key in `bytes`, or an error naming it invalid.
pub fn verifying_key(bytes: &[u8; 32]) -> Result<VerifyingKey, WireError> {
    VerifyingKey::from_bytes(bytes)
        .map_err(|_| WireError::Decode(DecodeError::Invalid("Ed25519 public key")))
}

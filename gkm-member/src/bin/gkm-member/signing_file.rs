//! `DIR/controller-keys`: the controller's signing keys as the member follows them (public
//! keys only), written when an announcement switched it, read at start. It continues only from
//! the key the operator pins now: given another `--controller-key`, the member starts over from
//! that one.
//!
//! ```text
//! "GKMK" 1 ‖ pinned [32] ‖ current [32] ‖ has id u8 ‖ id u32
//!          ‖ has previous u8 ‖ previous [32] ‖ from epoch u64 ‖ grace u32      (119 bytes)
//! ```

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ed25519_dalek::VerifyingKey;
use gkm_member::signing_keys::{Previous, SigningKeys};
use lkh_tree::Epoch;

use crate::store::StateDir;

const MAGIC: &[u8; 4] = b"GKMK";
const NAME: &str = "controller-keys";

/// Where the keys are kept in `dir`.
pub(crate) fn path(dir: &StateDir) -> PathBuf {
    dir.file(NAME)
}

/// Writes `keys` atomically and durably.
pub(crate) fn save(dir: &StateDir, keys: &SigningKeys) -> Result<()> {
    dir.write_atomic(&path(dir), &encode(keys), true)
}

/// The stored keys, `None` if there are none; an error if the file is unreadable or damaged.
pub(crate) fn load(dir: &StateDir) -> Result<Option<SigningKeys>> {
    let path = path(dir);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let mut bytes = Vec::new();
    file.take(LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    decode(&bytes)
        .map(Some)
        .with_context(|| format!("{} is damaged", path.display()))
}
const VERSION: u8 = 1;
/// The file's length.
pub(crate) const LEN: usize = 4 + 1 + 32 + 32 + 1 + 4 + 1 + 32 + 8 + 4;

/// The file's bytes for `keys`.
pub(crate) fn encode(keys: &SigningKeys) -> Vec<u8> {
    let (pinned, current, id, previous) = keys.parts();
    let mut out = Vec::with_capacity(LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(pinned.as_bytes());
    out.extend_from_slice(current.as_bytes());
    out.push(u8::from(id.is_some()));
    out.extend_from_slice(&id.unwrap_or(0).to_be_bytes());
    out.push(u8::from(previous.is_some()));
    let p = previous.map_or(([0; 32], 0, 0), |p| {
        (p.key.to_bytes(), p.from_epoch.0, p.grace_epochs)
    });
    out.extend_from_slice(&p.0);
    out.extend_from_slice(&p.1.to_be_bytes());
    out.extend_from_slice(&p.2.to_be_bytes());
    out
}

/// The keys in `bytes`; refuses another length, magic or version, and keys that are not
/// Ed25519 points.
pub(crate) fn decode(bytes: &[u8]) -> Result<SigningKeys> {
    let Ok(bytes) = <&[u8; LEN]>::try_from(bytes) else {
        bail!("{} bytes, not {LEN}", bytes.len());
    };
    let mut r = Fields(bytes.as_slice());
    if r.take::<4>() != *MAGIC || r.take::<1>() != [VERSION] {
        bail!("not a controller-keys file of version {VERSION}");
    }
    let pinned = key(r.take())?;
    let current = key(r.take())?;
    let has_id = r.flag()?;
    let id = u32::from_be_bytes(r.take());
    let has_previous = r.flag()?;
    let previous_key = r.take::<32>();
    let from_epoch = Epoch(u64::from_be_bytes(r.take()));
    let grace_epochs = u32::from_be_bytes(r.take());
    let previous = match has_previous {
        true => Some(Previous {
            key: key(previous_key)?,
            from_epoch,
            grace_epochs,
        }),
        false => None,
    };
    Ok(SigningKeys::restore(
        pinned,
        current,
        has_id.then_some(id),
        previous,
    ))
}

fn key(bytes: [u8; 32]) -> Result<VerifyingKey> {
    VerifyingKey::from_bytes(&bytes).map_err(|_| anyhow::anyhow!("a key is not an Ed25519 key"))
}

/// Fixed-size fields read in order from a buffer of the file's length.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some((head, rest)) = self.0.split_first_chunk::<N>() {
            out = *head;
            self.0 = rest;
        }
        out
    }

    fn flag(&mut self) -> Result<bool> {
        match self.take::<1>() {
            [0] => Ok(false),
            [1] => Ok(true),
            [other] => bail!("flag byte {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use lkh_tree::GroupId;
    use wire::{KeyAnnouncement, sign};

    use super::*;

    #[test]
    fn keys_round_trip_before_and_after_a_switch_and_damage_is_refused() {
        let old = SigningKey::from_bytes(&[1; 32]);
        let mut keys = SigningKeys::pinned(old.verifying_key());
        assert_eq!(decode(&encode(&keys)).unwrap(), keys);
        let announcement = KeyAnnouncement {
            group: GroupId(1),
            key_id: 1,
            from_epoch: Epoch(5),
            grace_epochs: 16,
            issued_ms: 0,
            key: SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes(),
        };
        keys.take(GroupId(1), &sign(&announcement, &old)).unwrap();
        let bytes = encode(&keys);
        assert_eq!(bytes.len(), LEN);
        assert_eq!(decode(&bytes).unwrap(), keys);
        assert!(decode(&bytes[..LEN - 1]).is_err());
        let mut bad_flag = bytes.clone();
        bad_flag[4 + 1 + 64] = 2;
        assert!(decode(&bad_flag).is_err());
        let mut bad_magic = bytes;
        bad_magic[0] = b'X';
        assert!(decode(&bad_magic).is_err());
    }
}

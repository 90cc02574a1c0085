//! The member's storage key (`DIR/storage.key`): 32 bytes from the OS CSPRNG that seal the
//! membership file with ChaCha20-Poly1305, and the files of its rotation.
//!
//! A rotation writes the new key to `storage.key.next` (0600, fsynced with its directory),
//! re-seals the membership under it (a durable atomic rewrite), then overwrites `storage.key`
//! with zeros, renames `storage.key.next` over it and fsyncs the directory. At every point exactly
//! one of the two keys opens the membership; [`settle`] keeps that one when a rotation was cut
//! short. Destroying a file is best effort: its bytes are overwritten and fsynced before it goes,
//! but a journaling file system or an SSD may keep older copies of its blocks.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use zeroize::Zeroizing;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// A storage key. `Debug` prints nothing of it; zeroized on drop.
pub(crate) struct StorageKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageKey(***)")
    }
}

/// Whether a key opens the sealed file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fit {
    /// It authenticates under the key.
    Opens,
    /// It does not.
    Refused,
    /// Nothing is sealed (no file, or a plaintext one): any key opens it.
    Empty,
}

/// How a rotation cut short was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// No rotation was cut short.
    Nothing,
    /// The file was still sealed under the old key: the new one was destroyed.
    RolledBack,
    /// It was sealed under the new key (or held nothing sealed): the new key replaced the old.
    Finished,
}

impl StorageKey {
    /// A new key from the OS CSPRNG.
    pub(crate) fn generate() -> Result<StorageKey> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut_slice())
            .map_err(|e| anyhow::anyhow!("the OS random source failed: {e}"))?;
        Ok(StorageKey(key))
    }

    /// The key in `path`, refusing a file others may read or not of 32 bytes.
    pub(crate) fn read(path: &Path) -> Result<StorageKey> {
        read_private_key(path)
            .with_context(|| format!("cannot use {}", path.display()))
            .map(StorageKey)
    }

    /// Writes the key to a new file `path` (0600), fsynced with its directory.
    pub(crate) fn write_new(&self, path: &Path) -> Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.write_all(self.0.as_slice())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))?;
        sync_dir(path)
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(&(*self.0).into())
    }

    /// `aad` ‖ nonce (12, random) ‖ ciphertext ‖ tag (16), `aad` authenticated.
    pub(crate) fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| anyhow::anyhow!("the OS random source failed: {e}"))?;
        let mut body = Zeroizing::new(plain.to_vec());
        let tag = self
            .cipher()
            .encrypt_inout_detached(&Nonce::from(nonce), aad, body.as_mut_slice().into())
            .map_err(|_| anyhow::anyhow!("too long to seal"))?;
        let mut out = Vec::with_capacity(aad.len() + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(aad);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// The plaintext of `sealed` (as [`StorageKey::seal`] made it, `aad` stripped), `None`
    /// unless it authenticates.
    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let rest = sealed.strip_prefix(aad)?;
        let (nonce, rest) = rest.split_first_chunk::<NONCE_LEN>()?;
        let (body, tag) = rest.split_at(rest.len().checked_sub(TAG_LEN)?);
        let tag = Tag::try_from(tag).ok()?;
        let mut plain = Zeroizing::new(body.to_vec());
        self.cipher()
            .decrypt_inout_detached(&Nonce::from(*nonce), aad, plain.as_mut_slice().into(), &tag)
            .ok()?;
        Some(plain)
    }
}

/// `KEY.next`: where a rotation writes the new key beside `KEY`.
pub(crate) fn next_path(key: &Path) -> PathBuf {
    let mut name = key.file_name().unwrap_or_default().to_os_string();
    name.push(".next");
    key.with_file_name(name)
}

/// Settles a rotation cut short, when `KEY.next` exists: keeps the key `fit` says opens the
/// sealed file (the new one when nothing is sealed) and destroys the other; an error when
/// neither does. A `KEY.next` that is not a whole key (torn while written) opens nothing.
pub(crate) fn settle(key: &Path, fit: impl Fn(&StorageKey) -> Result<Fit>) -> Result<Settled> {
    let next = next_path(key);
    if !next.exists() {
        return Ok(Settled::Nothing);
    }
    let fit_of = |path: &Path| StorageKey::read(path).ok().map(|k| fit(&k)).transpose();
    match (fit_of(key)?, fit_of(&next)?) {
        (Some(Fit::Opens), _) | (Some(Fit::Empty), None) => {
            destroy(&next)?;
            Ok(Settled::RolledBack)
        }
        (_, Some(Fit::Opens | Fit::Empty)) => {
            install(&next, key)?;
            Ok(Settled::Finished)
        }
        _ => bail!(
            "neither {} nor {} opens the membership file: restore the key it was sealed under, \
             or delete the membership file to register anew",
            key.display(),
            next.display()
        ),
    }
}

/// Overwrites `old` with zeros (fsynced), renames `new` over it, fsyncs the directory.
pub(crate) fn install(new: &Path, old: &Path) -> Result<()> {
    overwrite(old)?;
    fs::rename(new, old)
        .with_context(|| format!("cannot rename {} to {}", new.display(), old.display()))?;
    sync_dir(old)
}

/// Overwrites `path` with zeros (fsynced), then removes it and fsyncs the directory.
fn destroy(path: &Path) -> Result<()> {
    overwrite(path)?;
    fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
    sync_dir(path)
}

/// Overwrites the bytes of `path` in place with zeros and fsyncs them (a missing file is left).
fn overwrite(path: &Path) -> Result<()> {
    let mut file = match OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(0).max(32);
    file.write_all(&vec![0u8; len])
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot overwrite {}", path.display()))
}

/// Fsyncs the directory holding `path`.
fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// `path` opened for reading, refused when others may read it (a key or token file).
pub(crate) fn open_private(path: &Path) -> Result<File> {
    let file = File::open(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} may be read by others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        );
    }
    Ok(file)
}

/// The 32 bytes of the key file `path` (the member's identity, HPKE and storage keys),
/// refusing a file others may read or not of 32 bytes.
pub(crate) fn read_private_key(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let mut file = open_private(path)?;
    let mut bytes = Zeroizing::new(Vec::new());
    (&mut file).take(33).read_to_end(&mut bytes)?;
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        bail!("{} is not a 32-byte key file", path.display());
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

//! The member's state directory: its identity and HPKE keys (made once by `init`), its storage
//! key, its membership (member id and path keys, sealed under the storage key, rewritten
//! atomically after key changes) and the high-water mark of its data-frame sequence numbers
//! (rewritten atomically and fsynced before numbers below it are handed out).
//!
//! ```text
//! DIR/              mode 0700
//!   identity.key    32-byte Ed25519 seed, mode 0600
//!   hpke-x-wing.key 32-byte X-Wing secret (the seed of its key pair), mode 0600
//!   hpke.key        32-byte X25519 secret, mode 0600
//!   storage.key     32 random bytes sealing the membership, mode 0600 (made by `init`, or on
//!                   first use when missing); storage.key.next only while a rotation runs
//!   membership      "GKMM" 3 ‖ nonce (12) ‖ ChaCha20-Poly1305(a version 2 file) ‖ tag (16),
//!                   the 5 header bytes authenticated, mode 0600. Version 2 (plaintext):
//!                   "GKMM" 2 ‖ group u64 ‖ member u64 ‖ epoch u64 ‖ KEM u16 ‖ PathKeys; version
//!                   1, without the KEM, was made under the X25519 key. Versions 1 and 2 are
//!                   still read, and written sealed at the next write.
//!   sequence        "GKMQ" 1 ‖ mark u64 ‖ !mark u64, mode 0600
//!   controller-keys the controller's signing keys as followed (signing_file.rs), mode 0600
//!   api.sock        the local API (mode 0600)
//! ```

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ed25519_dalek::{SigningKey, VerifyingKey};
use lkh_tree::{Epoch, GroupId, MemberPath};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use tracing::{info, warn};
use wire::{HpkeSecret, Kem, MemberId, PathKeys};
use zeroize::Zeroizing;

use crate::storage_key::{Fit, Settled, StorageKey, install, next_path, settle};

const MEMBERSHIP_MAGIC: &[u8; 4] = b"GKMM";
const MEMBERSHIP_VERSION: u8 = 2;
/// The sealed membership file's header, authenticated as the associated data.
const SEALED_HEADER: &[u8; 5] = b"GKMM\x03";
/// Version 1: no KEM (the X25519 key's).
const MEMBERSHIP_V1: u8 = 1;
const MEMBERSHIP_HEADER: usize = 4 + 1 + 8 + 8 + 8;
/// Larger membership files are refused unread.
const MAX_MEMBERSHIP: u64 = 64 * 1024;
const SEQUENCE_MAGIC: &[u8; 4] = b"GKMQ";
const SEQUENCE_VERSION: u8 = 1;
/// The sequence file's length: magic, version, the mark and its complement.
const SEQUENCE_LEN: usize = 4 + 1 + 8 + 8;

/// A ChaCha20 generator seeded from the OS CSPRNG.
pub(crate) fn os_rng() -> Result<ChaCha20Rng> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut_slice())
        .map_err(|e| anyhow::anyhow!("the OS random source failed: {e}"))?;
    Ok(ChaCha20Rng::from_seed(*seed))
}

/// The member's state directory.
pub(crate) struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The directory at `dir` (not checked yet).
    pub(crate) fn new(dir: &Path) -> Self {
        StateDir {
            dir: dir.to_path_buf(),
        }
    }

    fn identity_path(&self) -> PathBuf {
        self.dir.join("identity.key")
    }

    fn hpke_path(&self, kem: Kem) -> PathBuf {
        match kem {
            Kem::X25519 => self.dir.join("hpke.key"),
            Kem::XWing => self.dir.join("hpke-x-wing.key"),
        }
    }

    /// Path of the storage key.
    pub(crate) fn storage_key_path(&self) -> PathBuf {
        self.dir.join("storage.key")
    }

    /// Path of the membership file.
    pub(crate) fn membership_path(&self) -> PathBuf {
        self.dir.join("membership")
    }

    /// Path of the sequence file (the high-water mark of data-frame sequence numbers).
    pub(crate) fn sequence_path(&self) -> PathBuf {
        self.dir.join("sequence")
    }

    /// The default API socket path.
    /// A file of the directory.
    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub(crate) fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// Whether `init` ran here.
    pub(crate) fn initialized(&self) -> bool {
        self.identity_path().exists()
    }

    /// Creates the directory (0700), the identity key and the HPKE key of `kem` (0600); refuses
    /// to overwrite either. Returns the identity public key.
    pub(crate) fn init(&self, kem: Kem) -> Result<VerifyingKey> {
        for path in [self.identity_path(), self.hpke_path(kem)] {
            if path.exists() {
                bail!(
                    "{} already exists; this state directory is initialized (use it as is, or \
                     pass another --state-dir)",
                    path.display()
                );
            }
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create state directory {}", self.dir.display()))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot chmod 700 {}", self.dir.display()))?;
        let mut rng = os_rng()?;
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut_slice())
            .map_err(|e| anyhow::anyhow!("the OS random source failed: {e}"))?;
        let identity = SigningKey::from_bytes(&seed);
        let hpke = HpkeSecret::generate(kem, &mut rng);
        write_new(&self.identity_path(), seed.as_slice())?;
        write_new(&self.hpke_path(kem), hpke.as_bytes())?;
        self.storage_key()?;
        Ok(identity.verifying_key())
    }

    /// The storage key, once a rotation cut short is settled (logged); made (0600) when
    /// missing.
    pub(crate) fn storage_key(&self) -> Result<StorageKey> {
        let path = self.storage_key_path();
        match settle(&path, |key| self.fit(key))? {
            Settled::Nothing => {}
            Settled::RolledBack => warn!(
                "a rotation of {} was cut short before the membership was re-sealed: rolled \
                 back (the new key destroyed)",
                path.display()
            ),
            Settled::Finished => warn!(
                "a rotation of {} was cut short after the membership was re-sealed: finished \
                 (the old key destroyed)",
                path.display()
            ),
        }
        if !path.exists() {
            StorageKey::generate()?.write_new(&path)?;
            info!(
                "made a storage key for the membership file: {}",
                path.display()
            );
        }
        StorageKey::read(&path).with_context(|| {
            format!(
                "cannot use the storage key {}; restore it, or delete it with the membership \
                 file to register anew",
                path.display()
            )
        })
    }

    /// Whether `key` opens the membership file.
    fn fit(&self, key: &StorageKey) -> Result<Fit> {
        Ok(match self.read_membership()? {
            Some(bytes) if bytes.starts_with(SEALED_HEADER) => {
                if key.open(SEALED_HEADER, &bytes).is_some() {
                    Fit::Opens
                } else {
                    Fit::Refused
                }
            }
            _ => Fit::Empty,
        })
    }

    /// `gkm-member rotate-storage-key`: the membership re-sealed under a new storage key and the
    /// old key destroyed (see `storage_key.rs`); refused while a member answers on `api`, and,
    /// changing nothing, when the membership does not authenticate. Says whether there was a
    /// membership to re-seal (a member stopped cleanly has left its group and deleted it).
    pub(crate) fn rotate_storage_key(&self, api: &Path) -> Result<bool> {
        if UnixStream::connect(api).is_ok() {
            bail!(
                "stop gkm-member first: a member answers on {} for this state directory \
                 (systemctl stop gkm-member@…), then rotate again",
                api.display()
            );
        }
        if !self.initialized() {
            bail!(
                "{} holds no member (no identity.key); pass the right --state-dir",
                self.dir.display()
            );
        }
        let path = self.storage_key_path();
        let old = self.storage_key()?;
        let plain = match self.read_membership()? {
            Some(bytes) => Some(self.plaintext(&old, &bytes)?),
            None => None,
        };
        let new = StorageKey::generate()?;
        let next = next_path(&path);
        new.write_new(&next)?;
        if let Some(plain) = &plain {
            let sealed = new.seal(SEALED_HEADER, plain)?;
            self.write_atomic(&self.membership_path(), &sealed, true)?;
        }
        install(&next, &path)?;
        Ok(plain.is_some())
    }

    /// The membership file's bytes, `None` if there is none.
    fn read_membership(&self) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let path = self.membership_path();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let mut bytes = Zeroizing::new(Vec::new());
        file.take(MAX_MEMBERSHIP + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Some(bytes))
    }

    /// A membership file's plaintext (a version 1 or 2 file): opened under `key` if sealed
    /// ([`Unauthentic`] if it does not authenticate), else as it is (said in the log).
    fn plaintext(&self, key: &StorageKey, bytes: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let path = self.membership_path();
        if bytes.starts_with(SEALED_HEADER) {
            return key
                .open(SEALED_HEADER, bytes)
                .ok_or_else(|| Unauthentic(path).into());
        }
        let version =
            plain_version(bytes).with_context(|| format!("{} is unusable", path.display()))?;
        info!(
            "{} is a plaintext membership file (version {version}); it is sealed under \
             storage.key at its next write",
            path.display()
        );
        Ok(Zeroizing::new(bytes.to_vec()))
    }

    /// Reads the identity key and the HPKE key of `kem`, making the latter (0600) if this
    /// directory has none yet (a member moving to another KEM); says whether it made it.
    pub(crate) fn load_keys(&self, kem: Kem) -> Result<(SigningKey, HpkeSecret, bool)> {
        let seed = read_key(&self.identity_path())?;
        let path = self.hpke_path(kem);
        let made = !path.exists();
        if made {
            let hpke = HpkeSecret::generate(kem, &mut os_rng()?);
            write_new(&path, hpke.as_bytes())?;
        }
        let hpke = read_key(&path)?;
        Ok((
            SigningKey::from_bytes(&seed),
            HpkeSecret::from_bytes(kem, *hpke),
            made,
        ))
    }

    /// Writes the membership atomically (temporary file of mode 0600, rename), without fsync:
    /// it runs on every key change, and losing the newest copy in a power cut only means the
    /// restarted member resyncs from an older epoch (or registers anew if the file is torn).
    pub(crate) fn save_membership(
        &self,
        group: GroupId,
        member: MemberId,
        path: &MemberPath,
        kem: Kem,
    ) -> Result<()> {
        let plain = encode_membership(group, member, path, kem);
        let sealed = self.storage_key()?.seal(SEALED_HEADER, &plain)?;
        self.write_atomic(&self.membership_path(), &sealed, false)
    }

    /// Writes the sequence high-water mark atomically and durably: temporary file of mode 0600,
    /// fsync, rename, fsync of the directory. Numbers below `mark` may be handed out once this
    /// returned.
    pub(crate) fn save_sequence(&self, mark: u64) -> Result<()> {
        let mut bytes = Vec::with_capacity(SEQUENCE_LEN);
        bytes.extend_from_slice(SEQUENCE_MAGIC);
        bytes.push(SEQUENCE_VERSION);
        bytes.extend_from_slice(&mark.to_be_bytes());
        bytes.extend_from_slice(&(!mark).to_be_bytes());
        self.write_atomic(&self.sequence_path(), &bytes, true)
    }

    /// The stored high-water mark, `None` if there is no sequence file; an error if it is
    /// unreadable or damaged.
    pub(crate) fn load_sequence(&self) -> Result<Option<u64>> {
        let path = self.sequence_path();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let mut bytes = Vec::new();
        file.take(SEQUENCE_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {}", path.display()))?;
        decode_sequence(&bytes)
            .map(Some)
            .with_context(|| format!("{} is damaged", path.display()))
    }

    /// Writes `bytes` to `target` through a temporary file of mode 0600 and a rename; with
    /// `durable`, the file is fsynced before the rename and the directory after it.
    pub(crate) fn write_atomic(&self, target: &Path, bytes: &[u8], durable: bool) -> Result<()> {
        let mut name = target.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        let temp = self.dir.join(name);
        let _ = fs::remove_file(&temp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .with_context(|| format!("cannot create {}", temp.display()))?;
        file.write_all(bytes)
            .and_then(|()| if durable { file.sync_all() } else { Ok(()) })
            .with_context(|| format!("cannot write {}", temp.display()))?;
        fs::rename(&temp, target)
            .with_context(|| format!("cannot rename {} to {}", temp.display(), target.display()))?;
        if durable {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("cannot sync directory {}", self.dir.display()))?;
        }
        Ok(())
    }

    /// The stored membership for `group` and the KEM of the key it was made with, `None` if
    /// there is none; an error if the file is unreadable, corrupt or for another group, and
    /// [`Unauthentic`] if it is sealed but does not authenticate under the storage key.
    pub(crate) fn load_membership(&self, group: GroupId) -> Result<Option<Membership>> {
        let key = self.storage_key()?;
        let Some(bytes) = self.read_membership()? else {
            return Ok(None);
        };
        let plain = self.plaintext(&key, &bytes)?;
        decode_membership(group, &plain)
            .map(Some)
            .with_context(|| format!("{} is unusable", self.membership_path().display()))
    }

    /// Deletes the membership file (after leaving, or when it is corrupt).
    pub(crate) fn remove_membership(&self) {
        let _ = fs::remove_file(self.membership_path());
    }
}

/// A membership file sealed under the storage key that does not authenticate under it: altered,
/// or sealed under another key. It is left as it is.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} does not authenticate under storage.key (altered, or sealed under another key)",
    .0.display()
)]
pub(crate) struct Unauthentic(PathBuf);

/// The version of a plaintext membership file (1 or 2), once it decodes for the group its
/// header names.
fn plain_version(bytes: &[u8]) -> Result<u8> {
    let (Some(&version), Some(group)) = (bytes.get(4), bytes.get(5..13)) else {
        bail!("truncated header");
    };
    let group = GroupId(u64::from_be_bytes(group.try_into()?));
    decode_membership(group, bytes)?;
    Ok(version)
}

/// The mark a sequence file holds; refuses another length, magic or version, and a mark whose
/// complement does not match.
pub(crate) fn decode_sequence(bytes: &[u8]) -> Result<u64> {
    let Ok(bytes) = <&[u8; SEQUENCE_LEN]>::try_from(bytes) else {
        bail!("{} bytes, not {SEQUENCE_LEN}", bytes.len());
    };
    let (head, numbers) = bytes.split_at(5);
    if head[..4] != *SEQUENCE_MAGIC || head[4] != SEQUENCE_VERSION {
        bail!("not a gkm sequence file (version {SEQUENCE_VERSION})");
    }
    let (mark, check) = numbers.split_at(8);
    let mark = u64::from_be_bytes(mark.try_into()?);
    if u64::from_be_bytes(check.try_into()?) != !mark {
        bail!("its check does not match");
    }
    Ok(mark)
}

/// A stored membership: the member's id, its path keys, and the KEM of the HPKE key it was
/// made with (its resyncs must present that key).
pub(crate) type Membership = (MemberId, MemberPath, Kem);

/// The membership file's bytes, zeroized on drop.
pub(crate) fn encode_membership(
    group: GroupId,
    member: MemberId,
    path: &MemberPath,
    kem: Kem,
) -> Zeroizing<Vec<u8>> {
    let keys = PathKeys::encode(path);
    let mut out = Zeroizing::new(Vec::with_capacity(MEMBERSHIP_HEADER + 2 + keys.len()));
    out.extend_from_slice(MEMBERSHIP_MAGIC);
    out.push(MEMBERSHIP_VERSION);
    out.extend_from_slice(&group.0.to_be_bytes());
    out.extend_from_slice(&member.0.to_be_bytes());
    out.extend_from_slice(&path.epoch().0.to_be_bytes());
    out.extend_from_slice(&kem.id().to_be_bytes());
    out.extend_from_slice(&keys);
    out
}

/// Parses a membership file; refuses another group, a bad header, an unknown KEM or an
/// inconsistent path.
pub(crate) fn decode_membership(group: GroupId, bytes: &[u8]) -> Result<Membership> {
    if bytes.len() as u64 > MAX_MEMBERSHIP {
        bail!("longer than {MAX_MEMBERSHIP} bytes");
    }
    let Some((header, keys)) = bytes.split_at_checked(MEMBERSHIP_HEADER) else {
        bail!("truncated header");
    };
    let (magic, rest) = header.split_at(4);
    let (version, rest) = rest.split_at(1);
    if magic != MEMBERSHIP_MAGIC || !matches!(version, [MEMBERSHIP_V1 | MEMBERSHIP_VERSION]) {
        bail!("not a gkm membership file (version {MEMBERSHIP_V1} or {MEMBERSHIP_VERSION})");
    }
    let (kem, keys) = if version == [MEMBERSHIP_V1] {
        (Kem::X25519, keys)
    } else {
        let Some((id, keys)) = keys.split_first_chunk::<2>() else {
            bail!("truncated header");
        };
        let id = u16::from_be_bytes(*id);
        let kem = Kem::from_id(id).with_context(|| format!("unknown KEM {id:#06x}"))?;
        (kem, keys)
    };
    let field = |i: usize| -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&rest[i * 8..i * 8 + 8]);
        u64::from_be_bytes(b)
    };
    let (stored_group, member, epoch) = (GroupId(field(0)), MemberId(field(1)), Epoch(field(2)));
    if stored_group != group {
        bail!("it is for group {stored_group}, not {group}");
    }
    let path =
        PathKeys::decode(group, epoch, keys).map_err(|e| anyhow::anyhow!("path keys: {e}"))?;
    Ok((member, path, kem))
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Opens a secret file, refusing one that others may read.
fn read_key(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    crate::storage_key::read_private_key(path).with_context(|| {
        format!(
            "cannot use {}; run `gkm-member init` or pass the right --state-dir",
            path.display()
        )
    })
}

/// The enrollment token in `path`: its first line, at most [`wire::MAX_TOKEN`] bytes. Refused
/// when others may read the file.
pub(crate) fn read_token(path: &Path) -> Result<String> {
    let mut file = crate::storage_key::open_private(path)
        .with_context(|| format!("cannot use token file {}", path.display()))?;
    let mut text = Zeroizing::new(String::new());
    (&mut file)
        .take(4 * wire::MAX_TOKEN as u64)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim();
    if token.is_empty() || token.len() > wire::MAX_TOKEN {
        bail!(
            "token file {}: the first line must hold a token of 1 to {} bytes",
            path.display(),
            wire::MAX_TOKEN
        );
    }
    Ok(token.to_owned())
}

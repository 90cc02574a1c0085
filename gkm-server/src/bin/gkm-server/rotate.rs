//! `gkm-server rotate-storage-key`: the stored state re-sealed under a new storage key and the
//! old key destroyed, so that every copy of the state sealed under the old key (backups, a disk
//! taken away) can no longer be opened: crypto-shredding.
//!
//! The protocol keeps exactly one key that opens the state at every point a process may die:
//!
//! 1. A rotation cut short before is settled first ([`recover`]).
//! 2. The store is opened under the current key (every row checked) and held: a redb file by
//!    its lock (a daemon starting meanwhile is refused), PostgreSQL by `STATE_DIR/lock` and,
//!    during the transaction, table locks.
//! 3. A new key from the OS CSPRNG is written to `KEY.next` (mode 0600, file and directory
//!    fsynced).
//! 4. Every head and row is re-sealed under the new key in one transaction, committed durably.
//!    Until the commit the state opens under `KEY` only; from it, under `KEY.next` only.
//! 5. `KEY`'s bytes are overwritten with zeros and fsynced, `KEY.next` is renamed over it and the
//!    directory fsynced.
//!
//! When `KEY.next` exists, the next `rotate-storage-key` or `run` keeps the key the state opens
//! under: `KEY` (the transaction never committed: `KEY.next` is destroyed, rolled back) or
//! `KEY.next` (it committed: renamed over `KEY`, finished), and logs which. A store that holds no
//! group opens under any key: the new one is kept. With `--new-key-file FILE` (a key from
//! `GKM_STORAGE_KEY` or a systemd credential, which gkm-server does not write), `FILE` plays
//! `KEY.next` and step 5 is the operator's: the command says what to do.
//!
//! Destroying a file is best effort: its bytes are overwritten and fsynced before it is removed,
//! but a journaling file system or an SSD's flash translation layer may keep older copies of the
//! blocks. The strong guarantee comes from keeping the key on a medium you control (a systemd
//! encrypted credential, a TPM-sealed or removable volume).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use gkm_server::{DiskStore, KeyFit, PgConfig, PgStore, Resealed, StoreError};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::config::{Backend, Config};
use crate::state::{KeySource, STORAGE_KEY_ENV, StateDir, read_key, write_new};

/// Where the group states are kept, to ask which key opens them.
pub(crate) enum Stored {
    /// The redb file.
    Disk(PathBuf),
    /// PostgreSQL.
    Pg(PgConfig),
}

impl Stored {
    fn of(dir: &StateDir, config: &Config) -> Stored {
        match config.storage.backend {
            Backend::Redb => Stored::Disk(dir.database()),
            Backend::Postgres => Stored::Pg(config.storage.pg()),
        }
    }

    /// Whether `key` opens the stored state.
    fn fit(&self, key: &[u8; 32]) -> Result<KeyFit> {
        let fit = match self {
            Stored::Disk(path) => DiskStore::key_fit(path, key),
            Stored::Pg(pg) => PgStore::key_fit(pg, key),
        };
        fit.map_err(|e| self.explain(e))
    }

    /// The store opened under `old` (every row checked) and, for redb, held until dropped: no
    /// daemon starts on the file meanwhile.
    fn hold(&self, old: &[u8; 32]) -> Result<Held<'_>> {
        match self {
            Stored::Disk(path) => match DiskStore::open(path, old) {
                Ok((store, _)) => Ok(Held::Disk(store)),
                Err(e) => Err(self.explain(e)),
            },
            Stored::Pg(pg) => Ok(Held::Pg(pg)),
        }
    }

    /// A store error with what to do next.
    fn explain(&self, error: StoreError) -> anyhow::Error {
        let advice = match (&error, self) {
            (StoreError::InUse, Stored::Disk(path)) => format!(
                "stop gkm-server first: {} is held by another process (a running gkm-server, or \
                 a rotation of its key)",
                path.display()
            ),
            (StoreError::LeaseLive { .. }, _) => "stop gkm-server first: stop every controller \
                 sharing the database, then rotate on one of them and give every controller the \
                 new key (RFC-notes/ha.md)"
                .to_owned(),
            (StoreError::Corrupt(_), _) => "the stored state does not open under the storage \
                 key: give the key it was sealed under (--storage-key-file, GKM_STORAGE_KEY), or \
                 restore the state from a backup"
                .to_owned(),
            _ => "cannot reach the stored state: check the state directory or [storage] url"
                .to_owned(),
        };
        anyhow::Error::new(error).context(advice)
    }
}

/// A store held for a rotation.
enum Held<'a> {
    Disk(DiskStore),
    Pg(&'a PgConfig),
}

impl Held<'_> {
    /// Re-seals the state from `old` to `new` in one transaction.
    fn reseal(&mut self, stored: &Stored, old: &[u8; 32], new: &[u8; 32]) -> Result<Resealed> {
        let resealed = match self {
            Held::Disk(store) => store.reseal(new),
            Held::Pg(pg) => PgStore::reseal(pg, old, new),
        };
        resealed.map_err(|e| stored.explain(e))
    }
}

/// How a rotation cut short was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// No rotation was cut short.
    Nothing,
    /// The state was still under the old key: the new one was destroyed.
    RolledBack,
    /// The state was under the new key: it replaced the old one.
    Finished,
}

/// `KEY.next`: where a rotation writes the new key beside `KEY`.
pub(crate) fn next_key_path(key: &Path) -> PathBuf {
    let mut name = key.file_name().unwrap_or_default().to_os_string();
    name.push(".next");
    key.with_file_name(name)
}

/// Settles a rotation cut short, when `KEY.next` exists: keeps the key `stored` opens under and
/// destroys the other (see the module docs); logs which.
pub(crate) fn recover(key: &Path, stored: &Stored) -> Result<Settled> {
    let next = next_key_path(key);
    if !next.exists() {
        return Ok(Settled::Nothing);
    }
    match settle(key, &next, stored)? {
        Settled::RolledBack => {
            destroy(&next)?;
            warn!(
                "a rotation of the storage key was cut short before the state was re-sealed: \
                 rolled back ({} destroyed, {} kept)",
                next.display(),
                key.display()
            );
            Ok(Settled::RolledBack)
        }
        _ => {
            install(&next, key)?;
            warn!(
                "a rotation of the storage key was cut short after the state was re-sealed: \
                 finished ({} replaced the old key, which was destroyed)",
                key.display()
            );
            Ok(Settled::Finished)
        }
    }
}

/// Which of `old` and `new` to keep: the one `stored` opens under (the new one when the store is
/// empty); an error when neither does.
fn settle(old: &Path, new: &Path, stored: &Stored) -> Result<Settled> {
    let fit = |path: &Path| -> Result<Option<KeyFit>> {
        // A file that is not a whole key (torn while written) opens nothing.
        read_key(path).ok().map(|key| stored.fit(&key)).transpose()
    };
    match (fit(old)?, fit(new)?) {
        (Some(KeyFit::Opens), _) => Ok(Settled::RolledBack),
        (_, Some(KeyFit::Opens | KeyFit::Empty)) => Ok(Settled::Finished),
        (Some(KeyFit::Empty), None) => Ok(Settled::RolledBack),
        _ => bail!(
            "neither {} nor {} opens the stored state: restore the key it was sealed under, or \
             the state from a backup",
            old.display(),
            new.display()
        ),
    }
}

/// Where the new key goes.
enum Target {
    /// `KEY.next`, then renamed over `KEY` (the old key destroyed).
    InPlace(PathBuf),
    /// A new file the operator moves into place; the old key stays where it is.
    Handover(PathBuf),
}

/// `gkm-server rotate-storage-key`: see the module docs.
pub(crate) fn rotate(dir: &StateDir, config: &Config, new_key_file: Option<&Path>) -> Result<()> {
    let stored = Stored::of(dir, config);
    let target = target(dir, new_key_file)?;
    if let Stored::Pg(_) = stored {
        dir.lock()?;
    }
    if let Target::InPlace(key) = &target {
        recover(key, &stored)?;
    }
    let old = dir.read_storage_key()?;
    let next = match &target {
        Target::InPlace(key) => next_key_path(key),
        Target::Handover(file) => file.clone(),
    };
    if let Target::Handover(file) = &target
        && file.exists()
        && settle_handover(file, &stored)? == Settled::Finished
    {
        return handover_advice(dir, file);
    }
    // A redb file stays locked until the key is installed: a daemon starting meanwhile would
    // otherwise settle the rotation in the middle.
    let mut held = stored.hold(&old)?;
    let new = new_key()?;
    write_durably(&next, new.as_slice())?;
    let resealed = match held.reseal(&stored, &old, &new) {
        Ok(resealed) => resealed,
        Err(error) => {
            // Refused or failed (a live lease, a lost connection): keep the key the state opens
            // under now, as the next start would; if that cannot be told, the next start does.
            drop(held);
            let _ = abandon(&target, &next, &stored);
            return Err(error);
        }
    };
    info!(
        groups = resealed.groups,
        rows = resealed.rows,
        dropped = resealed.dropped,
        "the state is re-sealed under the new storage key"
    );
    finish(dir, &target, &next, resealed)?;
    drop(held);
    Ok(())
}

/// After the commit: the new key installed in place of the old (destroyed), or the operator
/// told what to do with it.
fn finish(dir: &StateDir, target: &Target, next: &Path, resealed: Resealed) -> Result<()> {
    match target {
        Target::InPlace(key) => {
            install(next, key)?;
            eprintln!(
                "re-sealed {} groups ({} rows) under a new storage key in {}; the old key was \
                 destroyed",
                resealed.groups,
                resealed.rows,
                key.display()
            );
            Ok(())
        }
        Target::Handover(file) => handover_advice(dir, file),
    }
}

/// After a refused or failed re-sealing: destroys the new key `next` if the state is still
/// sealed under the old one (if that cannot be told, the next start settles it).
fn abandon(target: &Target, next: &Path, stored: &Stored) -> Result<()> {
    let key = match target {
        Target::InPlace(key) => key,
        Target::Handover(_) => return settle_handover(next, stored).map(|_| ()),
    };
    if settle(key, next, stored)? == Settled::RolledBack {
        destroy(next)?;
    }
    Ok(())
}

/// Where this rotation writes the new key; refuses a key source gkm-server does not write
/// unless `--new-key-file` was given.
fn target(dir: &StateDir, new_key_file: Option<&Path>) -> Result<Target> {
    match (dir.storage_key(), new_key_file) {
        (_, Some(file)) => Ok(Target::Handover(file.to_owned())),
        (KeySource::File(key), None) => Ok(Target::InPlace(key)),
        (KeySource::Env, None) => bail!(
            "the storage key comes from {STORAGE_KEY_ENV}, which gkm-server cannot replace: \
             pass --new-key-file FILE (a new file, on a private medium) to write the new key \
             there, then set {STORAGE_KEY_ENV} to its hex and destroy the file"
        ),
        (KeySource::Credential(path), None) => bail!(
            "the storage key comes from the systemd credential {}, which gkm-server cannot \
             replace: pass --new-key-file FILE to write the new key there, then encrypt it as \
             the service's credential (systemd-creds encrypt FILE …) and destroy FILE",
            path.display()
        ),
    }
}

/// A `--new-key-file` left by an earlier run: [`Settled::Finished`] if the state is sealed under
/// it already, else (the earlier run was cut short before re-sealing) it is destroyed.
fn settle_handover(file: &Path, stored: &Stored) -> Result<Settled> {
    let fit = read_key(file)
        .ok()
        .map(|key| stored.fit(&key))
        .transpose()?;
    if fit == Some(KeyFit::Opens) {
        return Ok(Settled::Finished);
    }
    destroy(file)?;
    warn!(
        "{} holds a key the state is not sealed under (a rotation cut short or refused): \
         destroyed",
        file.display()
    );
    Ok(Settled::RolledBack)
}

/// What the operator does after a rotation to `--new-key-file`.
fn handover_advice(dir: &StateDir, file: &Path) -> Result<()> {
    let old = match dir.storage_key() {
        KeySource::Env => format!("set {STORAGE_KEY_ENV} to the new key's hex (xxd -p -c 32 FILE)"),
        KeySource::Credential(path) | KeySource::File(path) => format!(
            "replace {} with it (systemd-creds encrypt, or move it into place)",
            path.display()
        ),
    };
    eprintln!(
        "the state is re-sealed under the key in {}; the old key no longer opens it. Next: {old}; \
         destroy every copy of the old key; start gkm-server; then destroy {} (shred -u)",
        file.display(),
        file.display()
    );
    Ok(())
}

/// 32 bytes from the OS CSPRNG.
fn new_key() -> Result<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(key.as_mut_slice()).context("the OS random source failed")?;
    Ok(key)
}

/// Creates `path` (0600) holding `bytes`, fsyncs it and its directory.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    write_new(path, bytes)?;
    sync_dir(path)
}

/// Overwrites `old` with zeros (fsynced), renames `new` over it, fsyncs the directory.
fn install(new: &Path, old: &Path) -> Result<()> {
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
    let len = file.metadata()?.len().max(32);
    let zeros = vec![0u8; usize::try_from(len).unwrap_or(32)];
    file.write_all(&zeros)
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

//! The state directory: key files, the config, and the store of group states
//! ([`gkm_server::DiskStore`] in `state.redb`, sealed under `storage.key`).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;
use gkm_server::{DiskStore, GroupState, StoreError};
use zeroize::Zeroizing;

/// The files of a state directory.
pub(crate) struct StateDir {
    pub(crate) dir: PathBuf,
}

impl StateDir {
    pub(crate) fn new(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_owned(),
        }
    }
    pub(crate) fn controller_key(&self) -> PathBuf {
        self.dir.join("controller.key")
    }
    pub(crate) fn storage_key(&self) -> PathBuf {
        self.dir.join("storage.key")
    }
    pub(crate) fn config(&self) -> PathBuf {
        self.dir.join("gkm-server.toml")
    }
    pub(crate) fn database(&self) -> PathBuf {
        self.dir.join("state.redb")
    }
    pub(crate) fn audit(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }
    pub(crate) fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// Whether both keys exist.
    pub(crate) fn initialized(&self) -> bool {
        self.controller_key().exists() && self.storage_key().exists()
    }

    /// Creates the directory (0700), both keys (0600) and a default config; returns the
    /// controller's public key. Refuses to overwrite a key.
    pub(crate) fn init(&self, default_config: &str) -> Result<[u8; 32]> {
        for key in [self.controller_key(), self.storage_key()] {
            if key.exists() {
                bail!(
                    "{} already exists; refusing to overwrite a key (delete it only to retire \
                     this controller and shred its stored groups, or pass another --state-dir)",
                    key.display()
                );
            }
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create state directory {}", self.dir.display()))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set mode 0700 on {}", self.dir.display()))?;
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut_slice()).context("the OS random source failed")?;
        write_new(&self.controller_key(), seed.as_slice())?;
        let public = SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        let mut storage = Zeroizing::new([0u8; 32]);
        getrandom::fill(storage.as_mut_slice()).context("the OS random source failed")?;
        write_new(&self.storage_key(), storage.as_slice())?;
        if !self.config().exists() {
            fs::write(self.config(), default_config)
                .with_context(|| format!("cannot write {}", self.config().display()))?;
        }
        Ok(public)
    }

    /// The controller's signing key.
    pub(crate) fn signer(&self) -> Result<SigningKey> {
        let seed = read_key(&self.controller_key())?;
        Ok(SigningKey::from_bytes(&seed))
    }

    /// Opens the store and loads every group; errors name the file and say what to do.
    pub(crate) fn open_store(&self) -> Result<(DiskStore, Vec<GroupState>)> {
        let key = read_key(&self.storage_key())?;
        let path = self.database();
        match DiskStore::open(&path, &key) {
            Ok(opened) => Ok(opened),
            Err(StoreError::InUse) => bail!(
                "state directory {} is in use by another gkm-server; stop it or pass --state-dir",
                self.dir.display()
            ),
            Err(e @ StoreError::Corrupt(_)) => Err(e).with_context(|| {
                format!(
                    "state file {} is corrupt or was tampered with; refusing to serve (restore it \
                     from a backup, or move it away to start every group afresh)",
                    path.display()
                )
            }),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "cannot open state file {} (corrupt? restore it from a backup)",
                    path.display()
                )
            }),
        }
    }
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

fn read_key(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let bytes = Zeroizing::new(fs::read(path).with_context(|| {
        format!(
            "cannot read {}; run `gkm-server init` first",
            path.display()
        )
    })?);
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        bail!("{} is not a 32-byte key file", path.display());
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

//! The state directory: key files, the config, and the store of group states
//! ([`gkm_server::DiskStore`] in `state.redb`, sealed under `storage.key`).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;
use gkm_server::{
    Behind, DiskStore, EpochFloor, FloorError, FlooredStore, GroupState, PgStore, StoreError,
};
use tracing::info;

use crate::config::Config;
use crate::rotate::Stored;
use lkh_tree::{Epoch, GroupId};
use zeroize::Zeroizing;

/// The environment variable that may hold the storage key (64 hex digits).
pub(crate) const STORAGE_KEY_ENV: &str = "GKM_STORAGE_KEY";

/// Where the storage key comes from.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// A file gkm-server may replace: `--storage-key-file` or `STATE_DIR/storage.key`.
    File(PathBuf),
    /// A systemd credential (`$CREDENTIALS_DIRECTORY/storage.key`), read-only to the service.
    Credential(PathBuf),
    /// [`STORAGE_KEY_ENV`].
    Env,
}

/// The files of a state directory.
pub(crate) struct StateDir {
    pub(crate) dir: PathBuf,
    /// `--storage-key-file`, if given.
    storage_key_file: Option<PathBuf>,
    /// `--control-socket`, if given.
    control_socket: Option<PathBuf>,
}

impl StateDir {
    pub(crate) fn new(dir: &Path, storage_key_file: Option<&Path>) -> StateDir {
        StateDir {
            dir: dir.to_owned(),
            storage_key_file: storage_key_file.map(Path::to_owned),
            control_socket: None,
        }
    }
    /// The control socket at `path` instead of `STATE_DIR/control.sock`.
    pub(crate) fn with_control(mut self, path: Option<PathBuf>) -> StateDir {
        self.control_socket = path;
        self
    }
    /// The controller's signing key: `$CREDENTIALS_DIRECTORY/controller.key` when systemd's
    /// `LoadCredential=` gives one, else `STATE_DIR/controller.key`.
    pub(crate) fn controller_key(&self) -> PathBuf {
        credential("controller.key").unwrap_or_else(|| self.dir.join("controller.key"))
    }
    /// Where the storage key comes from, the first that applies: `--storage-key-file`,
    /// `GKM_STORAGE_KEY`, `$CREDENTIALS_DIRECTORY/storage.key` (systemd's `LoadCredential=`),
    /// `STATE_DIR/storage.key`. Kept apart from the state it seals, a stolen state directory
    /// reveals no key.
    pub(crate) fn storage_key(&self) -> KeySource {
        if let Some(path) = &self.storage_key_file {
            return KeySource::File(path.clone());
        }
        if std::env::var_os(STORAGE_KEY_ENV).is_some() {
            return KeySource::Env;
        }
        if let Some(credential) = credential("storage.key") {
            return KeySource::Credential(credential);
        }
        KeySource::File(self.dir.join("storage.key"))
    }
    pub(crate) fn config(&self) -> PathBuf {
        self.dir.join("gkm-server.toml")
    }
    pub(crate) fn database(&self) -> PathBuf {
        self.dir.join("state.redb")
    }
    /// The epoch floor (`epoch-floor.0` and `epoch-floor.1`).
    pub(crate) fn floor(&self) -> PathBuf {
        self.dir.join("epoch-floor")
    }
    pub(crate) fn audit(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }
    pub(crate) fn control(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.dir.join("control.sock"))
    }

    /// Creates the directory (0700), the controller key (0600), the storage key (0600) where it
    /// is to be read from a file that does not exist yet, and a default config (0600: it may
    /// hold enrollment tokens); returns the controller's public key. Refuses to overwrite the
    /// controller key; a storage key given from elsewhere is used as it is.
    pub(crate) fn init(&self, default_config: &str) -> Result<[u8; 32]> {
        if self.controller_key().exists() {
            bail!(
                "{} already exists; refusing to overwrite a key (delete it only to retire this \
                 controller, or pass another --state-dir)",
                self.controller_key().display()
            );
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
        if let KeySource::File(path) = self.storage_key()
            && !path.exists()
        {
            let mut storage = Zeroizing::new([0u8; 32]);
            getrandom::fill(storage.as_mut_slice()).context("the OS random source failed")?;
            write_new(&path, storage.as_slice())?;
        }
        self.read_storage_key()?;
        if !self.config().exists() {
            write_new(&self.config(), default_config.as_bytes())?;
        }
        Ok(public)
    }

    /// The controller's signing key.
    pub(crate) fn signer(&self) -> Result<SigningKey> {
        let seed = read_key(&self.controller_key())?;
        Ok(SigningKey::from_bytes(&seed))
    }

    /// Opens the store, loads every group and checks them against the epoch floor; errors name
    /// the file and say what to do. With `allow_rollback`, groups older than the floor are
    /// loaded and returned as behind it: the caller must reset them before serving anything.
    pub(crate) fn open_store(&self, allow_rollback: bool) -> Result<Opened> {
        let (store, states) = self.open_database()?;
        // A file made by an older release has the umask's mode: it is ours, tighten it.
        fs::set_permissions(self.database(), fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot set mode 0600 on {}", self.database().display()))?;
        let floor = EpochFloor::open(&self.floor()).map_err(anyhow::Error::new)?;
        let behind = floor.behind(&states);
        let unstored = floor.unstored(&states);
        if !behind.is_empty() && !allow_rollback {
            return Err(anyhow::Error::new(FloorError::RolledBack(behind))).with_context(|| {
                format!(
                    "state file {} is an older copy than this controller served (a restored \
                     backup?); serving it would bring back members evicted since and reuse \
                     epoch numbers. Restore the newest copy, or pass --allow-rollback to serve \
                     it with every such group reset at once (every member registers again)",
                    self.database().display()
                )
            });
        }
        Ok(Opened {
            store: FlooredStore::new(store, floor),
            states,
            behind,
            unstored,
        })
    }

    /// Connects to PostgreSQL (`[storage] backend = "postgres"`), brings its schema up to date
    /// and checks every stored group; takes the state directory's lock (`STATE_DIR/lock`: its
    /// control socket and audit log are this process's). Errors say what to check.
    pub(crate) fn open_postgres(&self, config: &Config) -> Result<crate::cluster::Connected> {
        self.lock()?;
        let storage = &config.storage;
        let pg = storage.pg();
        let address = storage.advertise.unwrap_or(config.listen);
        if address.ip().is_unspecified() {
            bail!(
                "listen = {} names no address members can reach: set [storage] advertise to the \
                 address members reach this controller at",
                config.listen
            );
        }
        self.finish_rotation(&Stored::Pg(pg.clone()))?;
        let key = self.read_storage_key()?;
        let holder = crate::cluster::holder_name();
        // The driver runs its own small runtime, which cannot start on a tokio thread: open the
        // store on a thread of its own (it then lives on the store thread).
        let opened = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let (keeper, states) = PgStore::open(&pg, &key, &holder, &address.to_string())?;
                    let connected = crate::cluster::Connected {
                        saver: keeper.connect_another()?,
                        follower: keeper.follower()?,
                        keeper,
                    };
                    Ok((connected, states))
                })
                .join()
        })
        .map_err(|_| anyhow::anyhow!("opening the PostgreSQL store panicked"))?;
        match opened {
            Ok((connected, states)) => {
                info!(
                    holder,
                    groups = states.len(),
                    "PostgreSQL store open: standing by until leases are claimed"
                );
                Ok(connected)
            }
            Err(e @ StoreError::Corrupt(_)) => Err(e).context(
                "the group states in PostgreSQL are corrupt, were tampered with, or are sealed \
                 under another storage key (every controller needs the same storage.key); \
                 refusing to serve",
            ),
            Err(e) => Err(e).context(
                "cannot use the PostgreSQL store: check that the server runs and that [storage] \
                 url (and password_file or PGPASSWORD) reach it",
            ),
        }
    }

    /// Takes the state directory's lock (`STATE_DIR/lock`) until the process ends: its control
    /// socket and audit log are this process's (the PostgreSQL store, whose rows others share,
    /// and a rotation of its key).
    pub(crate) fn lock(&self) -> Result<()> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join("lock"))
            .with_context(|| format!("cannot open {}", self.dir.join("lock").display()))?;
        if lock.try_lock().is_err() {
            bail!(
                "state directory {} is in use by another gkm-server; stop it or pass --state-dir",
                self.dir.display()
            );
        }
        // Held until the process ends.
        std::mem::forget(lock);
        Ok(())
    }

    /// Finishes or rolls back a rotation of the storage key cut short (see `rotate.rs`), when
    /// the key is a file gkm-server replaces.
    fn finish_rotation(&self, stored: &Stored) -> Result<()> {
        match self.storage_key() {
            KeySource::File(path) => crate::rotate::recover(&path, stored).map(|_| ()),
            KeySource::Credential(_) | KeySource::Env => Ok(()),
        }
    }

    /// The storage key, from where [`StateDir::storage_key`] says.
    pub(crate) fn read_storage_key(&self) -> Result<Zeroizing<[u8; 32]>> {
        match self.storage_key() {
            KeySource::File(path) | KeySource::Credential(path) => read_key(&path),
            KeySource::Env => {
                let hex = Zeroizing::new(std::env::var(STORAGE_KEY_ENV).unwrap_or_default());
                let mut key = Zeroizing::new([0u8; 32]);
                hex::decode_to_slice(hex.trim(), key.as_mut_slice()).map_err(|_| {
                    anyhow::anyhow!("{STORAGE_KEY_ENV} is set but is not 64 hex digits")
                })?;
                Ok(key)
            }
        }
    }

    /// Opens the redb store under the storage key, once a rotation cut short is settled.
    pub(crate) fn open_database(&self) -> Result<(DiskStore, Vec<GroupState>)> {
        self.finish_rotation(&Stored::Disk(self.database()))?;
        let key = self.read_storage_key()?;
        let path = self.database();
        match DiskStore::open(&path, &key) {
            Ok(opened) => Ok(opened),
            Err(StoreError::InUse) => bail!(
                "state directory {} is in use by another gkm-server; stop it or pass --state-dir",
                self.dir.display()
            ),
            Err(e @ StoreError::Corrupt(_)) => Err(e).with_context(|| {
                format!(
                    "state file {} is corrupt, was tampered with, or is sealed under another \
                     storage key (after `rotate-storage-key --new-key-file`, give the daemon the \
                     new key); refusing to serve (restore it from a backup, or move it away to \
                     start every group afresh)",
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

/// What [`StateDir::open_store`] loaded.
pub(crate) struct Opened {
    /// The store, raising the epoch floor after every save.
    pub(crate) store: FlooredStore<DiskStore>,
    /// Every stored group.
    pub(crate) states: Vec<GroupState>,
    /// Groups loaded although older than the floor (`--allow-rollback`): reset them first.
    pub(crate) behind: Vec<Behind>,
    /// Groups with a floor but no stored state: start them above their floor.
    pub(crate) unstored: Vec<(GroupId, Epoch)>,
}

/// Creates `path` (mode 0600, refusing an existing file) holding `bytes`, fsynced.
pub(crate) fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
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

/// A systemd credential's file (`LoadCredential=NAME:…`), if the service was given one.
fn credential(name: &str) -> Option<PathBuf> {
    let path = Path::new(&std::env::var_os("CREDENTIALS_DIRECTORY")?).join(name);
    path.exists().then_some(path)
}

/// Reads a 32-byte key file, refusing one that others may read.
pub(crate) fn read_key(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let mut file = fs::File::open(path).with_context(|| {
        format!(
            "cannot read {}; run `gkm-server init` first (the storage key may also come from \
             --storage-key-file, {STORAGE_KEY_ENV} or $CREDENTIALS_DIRECTORY/storage.key, the \
             controller key from $CREDENTIALS_DIRECTORY/controller.key)",
            path.display()
        )
    })?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} may be read by others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        );
    }
    let mut bytes = Zeroizing::new(Vec::new());
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, 33), &mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        bail!("{} is not a 32-byte key file", path.display());
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

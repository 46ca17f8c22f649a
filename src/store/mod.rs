//! Where secrets live: refresh tokens and Argon2id password hashes, always sealed with the
//! master key before they leave the process. [`Store`] is the one seam the rest of the program
//! talks to; a [`Backend`] (today the encrypted file, `file.rs`) is what it talks through, so
//! another engine is one more file here.

pub mod file;
pub mod key;
pub mod os_keyring;
pub mod password;
pub mod peers;
pub mod redis;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::account::AccountKey;
use crate::config::{StoreConfig, StoreKind};
use crate::secret::Secret;

const KEY_FILE: &str = "master.key";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{0}")]
    Key(String),
    #[error("{path} cannot be decrypted with this master key (wrong key, or the file is damaged)")]
    Decrypt { path: PathBuf },
    #[error("{path} is not a store file of this program")]
    Format { path: PathBuf },
    #[error("{0}")]
    Other(String),
    /// A shared store that cannot be reached now: temporary, not the client's fault.
    #[error("{0}")]
    Unavailable(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Everything the store holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoreData {
    #[serde(default)]
    pub accounts: BTreeMap<AccountKey, AccountSecrets>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccountSecrets {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// Unix seconds when the refresh token was obtained (its age matters: Testing-mode tokens die after 7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_obtained_at: Option<i64>,
    /// Unix seconds when Google said the grant ends (`refresh_token_expires_in`), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_expires_at: Option<i64>,
    #[serde(default)]
    pub passwords: Vec<PasswordEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PasswordEntry {
    pub label: String,
    /// Argon2id PHC string; never the password.
    pub hash: String,
    pub created_at: i64,
}

impl StoreData {
    pub fn account(&self, key: &AccountKey) -> Option<&AccountSecrets> {
        self.accounts.get(key)
    }

    pub fn account_mut(&mut self, key: &AccountKey) -> &mut AccountSecrets {
        self.accounts.entry(key.clone()).or_default()
    }
}

/// Identifies one version of the stored data, to notice another process's write cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    a: u64,
    b: i128,
    c: u64,
}

impl Stamp {
    /// Any three numbers that together change whenever the data does.
    pub(crate) fn new(a: u64, b: i128, c: u64) -> Stamp {
        Stamp { a, b, c }
    }
}

/// A change to apply to the newest data under the backend's write lock.
pub type Change<'a> = &'a mut dyn FnMut(&mut StoreData) -> Result<(), StoreError>;

/// One place secrets can live. Every backend seals secrets with the master key before they
/// leave the process, serializes concurrent writers, and lets readers notice changes cheaply.
pub trait Backend: Send + Sync {
    /// For messages: where the secrets are.
    fn describe(&self) -> String;
    /// The current version, or None if nothing was written yet. Cheap: called on every login.
    fn stamp(&self) -> Result<Option<Stamp>, StoreError>;
    /// The newest data (empty if nothing was written yet), with its stamp.
    fn load(&self) -> Result<(StoreData, Option<Stamp>), StoreError>;
    /// Apply `change` to the newest data, atomically with respect to every other writer (an
    /// optimistic backend applies it again to newer data when another writer came first).
    fn update(&self, change: Change<'_>) -> Result<(), StoreError>;
}

/// The store as the program sees it, whatever the backend.
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    backend: Arc<dyn Backend>,
    peers: Option<peers::Peers>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend.describe())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Open (creating on first use) the configured store, with the key from its source.
    pub fn open(dir: &Path, config: &StoreConfig) -> Result<Store, StoreError> {
        ensure_private_dir(dir)?;
        let key = key::MasterKey::from_bytes(master_key(dir, config)?);
        if let StoreKind::Redis { url, prefix } = &config.kind {
            let backend = redis::RedisBackend::open(url.expose(), prefix, key)?;
            let peers = backend.peers();
            let mut store = Store::with_backend(dir, Arc::new(backend));
            store.peers = Some(peers);
            return Ok(store);
        }
        let backend = file::FileBackend::new(dir, key);
        Ok(Store::with_backend(dir, Arc::new(backend)))
    }

    /// A store file at `path`, sealed with the configured store's master key (`store copy`).
    pub fn file_at(path: &Path, dir: &Path, config: &StoreConfig) -> Result<Store, StoreError> {
        ensure_private_dir(dir)?;
        let key = key::MasterKey::from_bytes(master_key(dir, config)?);
        let backend = file::FileBackend::at(path, key);
        Ok(Store::with_backend(dir, Arc::new(backend)))
    }

    /// A store on the given backend; `dir` is the state dir (status files, locks of commands).
    pub fn with_backend(dir: &Path, backend: Arc<dyn Backend>) -> Store {
        Store {
            dir: dir.to_path_buf(),
            backend,
            peers: None,
        }
    }

    /// What processes on a shared store coordinate through (None for a store of one machine).
    pub fn peers(&self) -> Option<&peers::Peers> {
        self.peers.as_ref()
    }

    /// Whether both are the same open store (not merely equal settings).
    pub fn same_as(&self, other: &Store) -> bool {
        Arc::ptr_eq(&self.backend, &other.backend)
    }

    /// For messages: where the secrets are.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current version, or None if nothing was written yet.
    pub fn stamp(&self) -> Result<Option<Stamp>, StoreError> {
        self.backend.stamp()
    }

    /// The newest data (empty if nothing was written yet), with its stamp.
    pub fn load(&self) -> Result<(StoreData, Option<Stamp>), StoreError> {
        self.backend.load()
    }

    /// Apply `change` to the newest data and write it back, atomically for every writer. A
    /// shared backend applies it again to newer data when another writer came first, so it
    /// must depend on nothing but the data; the result of the write that landed is returned.
    pub fn update<T>(
        &self,
        mut change: impl FnMut(&mut StoreData) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut out = None;
        self.backend.update(&mut |data| {
            out = Some(change(data)?);
            Ok(())
        })?;
        out.ok_or_else(|| StoreError::Other("store change was not applied".into()))
    }
}

/// The configured store's master key, from its source (created on first use where it may be).
fn master_key(
    dir: &Path,
    config: &StoreConfig,
) -> Result<zeroize::Zeroizing<[u8; 32]>, StoreError> {
    match (&config.key_file, &config.kind) {
        (Some(path), _) => key::read_key_file(path),
        (None, StoreKind::File) => key::load_or_create_key_file(&dir.join(KEY_FILE)),
        (None, StoreKind::Keyring) => {
            // Under the store lock: two processes creating the key at once must agree.
            let _lock = file::lock_dir(dir)?;
            os_keyring::load_or_create(dir)
        }
        (None, StoreKind::Redis { .. }) => Err(StoreError::Key(
            "[store] kind = \"redis\" needs key_file: every process sharing the store must use the same master key".into(),
        )),
    }
}

/// Write `bytes` to `path` so that a reader sees either the old or the new file, never a mix:
/// a 0600 temp file in the same folder, fsync, rename over, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{file_name}.{}.{:x}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The state dir, created 0700 if missing. An existing one that another user could write to is
/// refused, as ssh's StrictModes does: whoever can write there can swap the store or the key.
fn ensure_private_dir(dir: &Path) -> Result<(), StoreError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => check_dir_strict(dir, &m),
        Ok(_) => Err(StoreError::Other(format!(
            "state_dir {} exists and is not a folder",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
        }
        Err(e) => Err(io_err(dir)(e)),
    }
}

fn check_dir_strict(dir: &Path, meta: &fs::Metadata) -> Result<(), StoreError> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(StoreError::Other(format!(
            "state_dir {dir} can be written by group or others (mode {mode:o}); run `chmod 700 {dir}`",
            dir = dir.display()
        )));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(StoreError::Other(format!(
            "state_dir {dir} belongs to user id {owner}, not to this user ({me}); run `chown {me} {dir}` or use a state_dir of your own",
            dir = dir.display(),
            owner = meta.uid()
        )));
    }
    Ok(())
}

fn check_private(path: &Path, meta: &fs::Metadata) -> Result<(), StoreError> {
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::file::STORE_FILE;
    use super::*;

    fn file_store(dir: &Path) -> Store {
        Store::open(
            dir,
            &StoreConfig {
                kind: StoreKind::File,
                key_file: None,
            },
        )
        .unwrap()
    }

    #[test]
    fn round_trips_and_never_writes_secrets_in_clear() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let store = file_store(&dir);
        store
            .update(|d| {
                d.account_mut(&AccountKey::new("Alice@Gmail.com"))
                    .refresh_token = Some("1//refresh-secret".into());
                Ok(())
            })
            .unwrap();
        let (data, stamp) = file_store(&dir).load().unwrap();
        assert!(stamp.is_some());
        assert_eq!(
            data.account(&AccountKey::new("alice@gmail.com"))
                .unwrap()
                .refresh_token
                .as_ref()
                .unwrap()
                .expose(),
            "1//refresh-secret"
        );
        let raw = fs::read(dir.join(STORE_FILE)).unwrap();
        assert!(!raw.windows(14).any(|w| w == b"refresh-secret"));
        for name in [STORE_FILE, KEY_FILE] {
            let mode = fs::metadata(dir.join(name)).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
        }
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn refuses_a_world_readable_key() {
        let tmp = tempfile::tempdir().unwrap();
        let store = file_store(tmp.path());
        drop(store);
        fs::set_permissions(tmp.path().join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = Store::open(
            tmp.path(),
            &StoreConfig {
                kind: StoreKind::File,
                key_file: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, StoreError::Permissions { .. }), "{err}");
    }

    #[test]
    fn wrong_key_is_reported_not_treated_as_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let store = file_store(tmp.path());
        store
            .update(|d| {
                d.account_mut(&AccountKey::new("a@x.com"));
                Ok(())
            })
            .unwrap();
        fs::remove_file(tmp.path().join(KEY_FILE)).unwrap();
        let err = file_store(tmp.path()).load().unwrap_err();
        assert!(matches!(err, StoreError::Decrypt { .. }), "{err}");
    }

    #[test]
    fn stamp_changes_when_another_writer_replaces_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let a = file_store(tmp.path());
        let b = file_store(tmp.path());
        assert_eq!(a.stamp().unwrap(), None);
        b.update(|d| {
            d.account_mut(&AccountKey::new("a@x.com"));
            Ok(())
        })
        .unwrap();
        let s1 = a.stamp().unwrap();
        b.update(|d| {
            d.account_mut(&AccountKey::new("b@x.com"));
            Ok(())
        })
        .unwrap();
        assert_ne!(a.stamp().unwrap(), s1);
        assert_eq!(a.load().unwrap().0.accounts.len(), 2);
    }

    #[test]
    fn concurrent_updates_lose_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        file_store(&dir);
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    file_store(&dir)
                        .update(|d| {
                            d.account_mut(&AccountKey::new(&format!("user{i}@x.com")));
                            Ok(())
                        })
                        .unwrap()
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(file_store(&dir).load().unwrap().0.accounts.len(), 16);
    }

    #[test]
    fn refuses_a_state_dir_others_can_write() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = Store::open(
            &dir,
            &StoreConfig {
                kind: StoreKind::File,
                key_file: None,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("can be written by group or others"), "{err}");
        assert!(
            err.contains(&format!("chmod 700 {}", dir.display())),
            "{err}"
        );
        assert!(!dir.join(KEY_FILE).exists(), "nothing is written into it");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        file_store(&dir);
    }
}

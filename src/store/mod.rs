//! The secret store: one AEAD-encrypted file (`store.enc`, XChaCha20-Poly1305) in the state
//! directory holding refresh tokens and Argon2id password hashes, with its key in `master.key`,
//! a configured key file, or the OS keyring. Writers take an exclusive lock on `store.lock`,
//! re-read, change and replace the file atomically (temp file, fsync, rename), so concurrent
//! processes never lose an update and a writer killed midway leaves the old file; readers notice
//! a replaced file by its metadata and reload.

pub mod os_keyring;
pub mod password;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::{normalize_email, StoreConfig, StoreKind};
use crate::secret::Secret;

const MAGIC: &[u8; 8] = b"XO2PST01";
const NONCE_LEN: usize = 24;
const STORE_FILE: &str = "store.enc";
const LOCK_FILE: &str = "store.lock";
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
    pub accounts: BTreeMap<String, AccountSecrets>,
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
    pub fn account(&self, email: &str) -> Option<&AccountSecrets> {
        self.accounts.get(&normalize_email(email))
    }

    pub fn account_mut(&mut self, email: &str) -> &mut AccountSecrets {
        self.accounts.entry(normalize_email(email)).or_default()
    }
}

/// Identifies one version of the store file, to notice another process's write cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

pub struct Store {
    dir: PathBuf,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Open (creating on first use) the store in `dir` with the key from the configured source.
    pub fn open(dir: &Path, config: &StoreConfig) -> Result<Store, StoreError> {
        ensure_private_dir(dir)?;
        let key = match (&config.key_file, config.kind) {
            (Some(path), _) => read_key_file(path)?,
            (None, StoreKind::File) => load_or_create_key_file(&dir.join(KEY_FILE))?,
            (None, StoreKind::Keyring) => {
                // Under the store lock: two processes creating the key at once must agree.
                let _lock = lock_dir(dir)?;
                os_keyring::load_or_create(dir)?
            }
        };
        Ok(Store {
            dir: dir.to_path_buf(),
            key,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn store_path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    /// The current file's identity, or None if nothing was written yet.
    pub fn stamp(&self) -> Result<Option<Stamp>, StoreError> {
        let path = self.store_path();
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(Stamp {
                ino: m.ino(),
                mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
                len: m.len(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Read and decrypt the store (empty if it does not exist yet), with the stamp it had.
    pub fn load(&self) -> Result<(StoreData, Option<Stamp>), StoreError> {
        let path = self.store_path();
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((StoreData::default(), None))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let meta = file.metadata().map_err(io_err(&path))?;
        check_private(&path, &meta)?;
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes).map_err(io_err(&path))?;
        let stamp = Stamp {
            ino: meta.ino(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            len: meta.len(),
        };
        Ok((self.decrypt(&path, &bytes)?, Some(stamp)))
    }

    /// Apply `change` to the newest store under an exclusive lock and write it back atomically.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut StoreData) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _lock = lock_dir(&self.dir)?;
        self.remove_stale_temp_files();
        let (mut data, _) = self.load()?;
        let out = change(&mut data)?;
        self.write(&data)?;
        // The lock is released when `lock` is dropped (also if anything above failed).
        Ok(out)
    }

    /// Temp files of writers that were killed before their rename. Only the lock holder
    /// writes, so with the lock held every such file is stale.
    fn remove_stale_temp_files(&self) {
        let prefix = format!(".{STORE_FILE}.");
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    fn write(&self, data: &StoreData) -> Result<(), StoreError> {
        let path = self.store_path();
        let plain = Zeroizing::new(
            serde_json::to_vec(data)
                .map_err(|e| StoreError::Other(format!("encoding store: {e}")))?,
        );
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let cipher = XChaCha20Poly1305::new(self.key.as_ref().into());
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: MAGIC,
                },
            )
            .map_err(|_| StoreError::Other("encryption failed".into()))?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        write_atomic(&path, &out)
    }

    fn decrypt(&self, path: &Path, bytes: &[u8]) -> Result<StoreData, StoreError> {
        if bytes.len() < MAGIC.len() + NONCE_LEN || &bytes[..MAGIC.len()] != MAGIC {
            return Err(StoreError::Format {
                path: path.to_path_buf(),
            });
        }
        let nonce = &bytes[MAGIC.len()..MAGIC.len() + NONCE_LEN];
        let cipher = XChaCha20Poly1305::new(self.key.as_ref().into());
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: &bytes[MAGIC.len() + NONCE_LEN..],
                        aad: MAGIC,
                    },
                )
                .map_err(|_| StoreError::Decrypt {
                    path: path.to_path_buf(),
                })?,
        );
        serde_json::from_slice(&plain).map_err(|_| StoreError::Format {
            path: path.to_path_buf(),
        })
    }
}

/// The exclusive lock on the store's folder, held until the returned file is dropped (also
/// when the process dies: it is an flock).
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let lock_path = dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    Ok(lock)
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

fn ensure_private_dir(dir: &Path) -> Result<(), StoreError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
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

fn parse_key(path: &Path, bytes: &[u8]) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let text = std::str::from_utf8(bytes).unwrap_or("").trim();
    let mut key = Zeroizing::new([0u8; 32]);
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).unwrap_or("00");
            key[i] = u8::from_str_radix(hex, 16).unwrap_or(0);
        }
        Ok(key)
    } else if bytes.len() == 32 {
        key.copy_from_slice(bytes);
        Ok(key)
    } else {
        Err(StoreError::Key(format!(
            "{} is not a master key (expected 64 hex characters)",
            path.display()
        )))
    }
}

fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let meta = f.metadata().map_err(io_err(path))?;
    check_private(path, &meta)?;
    let mut bytes = Zeroizing::new(Vec::new());
    f.read_to_end(&mut bytes).map_err(io_err(path))?;
    parse_key(path, &bytes)
}

fn load_or_create_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    match read_key_file(path) {
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(key.as_mut());
    let hex: Zeroizing<String> = Zeroizing::new(key.iter().map(|b| format!("{b:02x}")).collect());
    // create_new: if another process won the race, use its key instead of ours.
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(format!("{}\n", hex.as_str()).as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(io_err(path))?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key_file(path),
        Err(e) => Err(io_err(path)(e)),
    }
}

#[cfg(test)]
mod tests {
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
                d.account_mut("Alice@Gmail.com").refresh_token = Some("1//refresh-secret".into());
                Ok(())
            })
            .unwrap();
        let (data, stamp) = file_store(&dir).load().unwrap();
        assert!(stamp.is_some());
        assert_eq!(
            data.account("alice@gmail.com")
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
                d.account_mut("a@x.com");
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
            d.account_mut("a@x.com");
            Ok(())
        })
        .unwrap();
        let s1 = a.stamp().unwrap();
        b.update(|d| {
            d.account_mut("b@x.com");
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
                            d.account_mut(&format!("user{i}@x.com"));
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
}

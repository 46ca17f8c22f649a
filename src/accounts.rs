//! Accounts as the running proxy sees them: the configured emails, their secrets from the
//! store (re-read whenever another process replaced the store file, so `password remove` or
//! `import` take effect without a restart) and local password checks with a memory cache, so a
//! client that logs in again with the same password does not pay for Argon2 again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};

use crate::config::{normalize_email, Config};
use crate::secret::Secret;
use crate::store::{password, Stamp, Store, StoreData, StoreError};

/// Why a local login did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAuthError {
    /// Unknown user or wrong password (deliberately not told apart).
    BadCredentials,
    /// The store could not be read: not the client's fault.
    Store(String),
}

const CACHE_LIMIT: usize = 4096;

struct Snapshot {
    stamp: Option<Stamp>,
    data: Arc<StoreData>,
}

pub struct Accounts {
    /// Normalized email → the email as configured.
    configured: HashMap<String, String>,
    store: Store,
    snapshot: RwLock<Snapshot>,
    /// Digest of (account, password) → the hash it matched. Entries only count while that hash
    /// is still in the store, so a removed password stops working at once.
    verified: Mutex<HashMap<[u8; 32], String>>,
    cache_key: [u8; 32],
    /// Verified against for unknown users, so they cost the same time as known ones.
    decoy_hash: String,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("configured", &self.configured.len())
            .finish_non_exhaustive()
    }
}

impl Accounts {
    pub fn new(config: &Config, store: Store) -> Result<Accounts, StoreError> {
        let (data, stamp) = store.load()?;
        let decoy_hash = password::hash(&password::generate()).map_err(StoreError::Other)?;
        Ok(Accounts {
            configured: config
                .accounts
                .iter()
                .map(|a| (a.key(), a.email.clone()))
                .collect(),
            store,
            snapshot: RwLock::new(Snapshot {
                stamp,
                data: Arc::new(data),
            }),
            verified: Mutex::new(HashMap::new()),
            cache_key: rand::random(),
            decoy_hash,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configured spelling of an account, if it is configured.
    pub fn configured_email(&self, username: &str) -> Option<&str> {
        self.configured
            .get(&normalize_email(username))
            .map(String::as_str)
    }

    /// The store as it is now (reloaded if another process wrote it since the last look).
    pub fn current(&self) -> Result<Arc<StoreData>, StoreError> {
        let stamp = self.store.stamp()?;
        {
            let snap = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
            if snap.stamp == stamp {
                return Ok(snap.data.clone());
            }
        }
        let (data, stamp) = self.store.load()?;
        let data = Arc::new(data);
        let mut snap = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        *snap = Snapshot {
            stamp,
            data: data.clone(),
        };
        Ok(data)
    }

    pub fn refresh_token(&self, email: &str) -> Result<Option<Secret>, StoreError> {
        Ok(self
            .current()?
            .account(email)
            .and_then(|a| a.refresh_token.clone()))
    }

    /// Check a local login. Returns the account's normalized email.
    pub async fn verify(
        self: &Arc<Self>,
        username: &str,
        password: &Secret,
    ) -> Result<String, LocalAuthError> {
        let key = normalize_email(username);
        let data = self
            .current()
            .map_err(|e| LocalAuthError::Store(e.to_string()))?;
        let hashes: Vec<String> = if self.configured.contains_key(&key) {
            data.account(&key)
                .map(|a| a.passwords.iter().map(|p| p.hash.clone()).collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let digest = self.digest(&key, password);
        {
            let cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = cache.get(&digest) {
                if hashes.contains(h) {
                    return Ok(key);
                }
            }
        }
        let pw = password.clone();
        let decoy = self.decoy_hash.clone();
        let matched = tokio::task::spawn_blocking(move || {
            if hashes.is_empty() {
                let _ = password::verify(pw.expose().as_bytes(), &decoy);
                return None;
            }
            hashes
                .into_iter()
                .find(|h| password::verify(pw.expose().as_bytes(), h))
        })
        .await
        .map_err(|e| LocalAuthError::Store(format!("password check failed: {e}")))?;
        match matched {
            Some(hash) => {
                let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
                cache.insert(digest, hash);
                Ok(key)
            }
            None => Err(LocalAuthError::BadCredentials),
        }
    }

    fn digest(&self, key: &str, password: &Secret) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update(key.as_bytes());
        h.update([0]);
        h.update(password.expose().as_bytes());
        h.finalize().into()
    }
}

/// Unix time now, in seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `password add`: a new password for `email` under `label`; returns it (to print once).
pub fn add_password(store: &Store, email: &str, label: &str) -> Result<Secret, StoreError> {
    let pw = password::generate();
    let hash = password::hash(&pw).map_err(StoreError::Other)?;
    store.update(|data| {
        let account = data.account_mut(email);
        if account.passwords.iter().any(|p| p.label == label) {
            return Err(StoreError::Other(format!(
                "{email} already has a password labelled {label:?}; remove it first or pick another --label"
            )));
        }
        account.passwords.push(crate::store::PasswordEntry {
            label: label.to_string(),
            hash,
            created_at: now_unix(),
        });
        Ok(())
    })?;
    Ok(pw)
}

/// `password remove`: true if a password with that label existed.
pub fn remove_password(store: &Store, email: &str, label: &str) -> Result<bool, StoreError> {
    store.update(|data| {
        let account = data.account_mut(email);
        let before = account.passwords.len();
        account.passwords.retain(|p| p.label != label);
        Ok(account.passwords.len() != before)
    })
}

/// Store a refresh token for `email` (from `import` or `login`).
pub fn save_refresh_token(store: &Store, email: &str, token: &Secret) -> Result<(), StoreError> {
    store.update(|data| {
        let account = data.account_mut(email);
        account.refresh_token = Some(token.clone());
        account.refresh_token_obtained_at = Some(now_unix());
        Ok(())
    })
}

/// Replace a rotated refresh token without resetting its age unless it really changed.
pub fn rotate_refresh_token(store: &Store, email: &str, token: &Secret) -> Result<(), StoreError> {
    store.update(|data| {
        let account = data.account_mut(email);
        if account.refresh_token.as_ref() != Some(token) {
            account.refresh_token = Some(token.clone());
            account.refresh_token_obtained_at = Some(now_unix());
        }
        Ok(())
    })
}

//! The registry: the configured accounts and their secrets, the one place both password checks
//! and token management read. It owns the config's accounts, keyed by [`AccountKey`], and a view
//! of the store that is re-read whenever another process changed it, so `password remove` or
//! `import` take effect in a running proxy without a restart. Writes go through the store seam.

pub mod grant;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::account::AccountKey;
use crate::clock::now_unix;
use crate::config::{AccountConfig, Config};
use crate::secret::Secret;
use crate::store::{password, PasswordEntry, Stamp, Store, StoreData, StoreError};

struct Snapshot {
    stamp: Option<Stamp>,
    data: Arc<StoreData>,
}

pub struct Registry {
    accounts: HashMap<AccountKey, AccountConfig>,
    store: Store,
    snapshot: RwLock<Snapshot>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Registry({} accounts, {:?})",
            self.accounts.len(),
            self.store
        )
    }
}

impl Registry {
    pub fn new(config: &Config, store: Store) -> Result<Registry, StoreError> {
        let (data, stamp) = store.load()?;
        Ok(Registry {
            accounts: config
                .accounts
                .iter()
                .map(|a| (a.key(), a.clone()))
                .collect(),
            store,
            snapshot: RwLock::new(Snapshot {
                stamp,
                data: Arc::new(data),
            }),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configured account a client's username names, if any.
    pub fn lookup(&self, username: &str) -> Option<&AccountConfig> {
        self.accounts.get(&AccountKey::new(username))
    }

    pub fn account(&self, key: &AccountKey) -> Option<&AccountConfig> {
        self.accounts.get(key)
    }

    pub fn is_configured(&self, key: &AccountKey) -> bool {
        self.accounts.contains_key(key)
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

    pub fn refresh_token(&self, key: &AccountKey) -> Result<Option<Secret>, StoreError> {
        Ok(self
            .current()?
            .account(key)
            .and_then(|a| a.refresh_token.clone()))
    }
}

/// `password add`: a new password for the account under `label`; returns it (to print once).
/// Each password of an account names a different hash, so a check is one Argon2 run.
pub fn add_password(store: &Store, key: &AccountKey, label: &str) -> Result<Secret, StoreError> {
    store.update(|data| {
        let account = data.account_mut(key);
        if account.passwords.iter().any(|p| p.label == label) {
            return Err(StoreError::Other(format!(
                "{key} already has a password labelled {label:?}; remove it first or pick another --label"
            )));
        }
        let taken: Vec<String> = account
            .passwords
            .iter()
            .filter_map(|p| password::hash_id(&p.hash))
            .collect();
        let (pw, hash) = loop {
            let (pw, hash) = password::generate().map_err(StoreError::Other)?;
            if !password::hash_id(&hash).is_some_and(|id| taken.contains(&id)) {
                break (pw, hash);
            }
        };
        account.passwords.push(PasswordEntry {
            label: label.to_string(),
            hash,
            created_at: now_unix(),
        });
        Ok(pw)
    })
}

/// `password remove`: true if a password with that label existed.
pub fn remove_password(store: &Store, key: &AccountKey, label: &str) -> Result<bool, StoreError> {
    store.update(|data| {
        let account = data.account_mut(key);
        let before = account.passwords.len();
        account.passwords.retain(|p| p.label != label);
        Ok(account.passwords.len() != before)
    })
}

/// Store a refresh token for the account (from `import` or `login`).
pub fn save_refresh_token(
    store: &Store,
    key: &AccountKey,
    token: &Secret,
) -> Result<(), StoreError> {
    save_grant(store, key, token, None)
}

/// Store a refresh token with the end Google announced for it, if any.
pub fn save_grant(
    store: &Store,
    key: &AccountKey,
    token: &Secret,
    expires_in: Option<std::time::Duration>,
) -> Result<(), StoreError> {
    let now = now_unix();
    store.update(|data| {
        let account = data.account_mut(key);
        account.refresh_token = Some(token.clone());
        account.refresh_token_obtained_at = Some(now);
        account.refresh_token_expires_at = expires_in.map(|d| now + d.as_secs() as i64);
        Ok(())
    })
}

/// Replace a rotated refresh token without resetting its age unless it really changed.
pub fn rotate_refresh_token(
    store: &Store,
    key: &AccountKey,
    token: &Secret,
) -> Result<(), StoreError> {
    store.update(|data| {
        let account = data.account_mut(key);
        if account.refresh_token.as_ref() != Some(token) {
            account.refresh_token = Some(token.clone());
            account.refresh_token_obtained_at = Some(now_unix());
            account.refresh_token_expires_at = None;
        }
        Ok(())
    })
}

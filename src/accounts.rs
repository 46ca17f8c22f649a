//! Local password checks: a client's username and app password against the hashes the registry
//! holds, with a memory cache, so a client that logs in again with the same password does not pay
//! for Argon2 again. A removed password stops working at once: cache hits count only while their
//! hash is still in the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::account::AccountKey;
use crate::registry::Registry;
use crate::secret::Secret;
use crate::store::{password, StoreError};

/// Why a local login did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAuthError {
    /// Unknown user or wrong password (deliberately not told apart).
    BadCredentials,
    /// The store could not be read: not the client's fault.
    Store(String),
}

const CACHE_LIMIT: usize = 4096;

pub struct Accounts {
    registry: Arc<Registry>,
    /// Digest of (account, password) → the hash it matched. Entries only count while that hash
    /// is still in the store, so a removed password stops working at once.
    verified: Mutex<HashMap<[u8; 32], String>>,
    /// Checks in progress, by the same digest: a client reconnecting many times at once with
    /// a password not yet cached waits for one Argon2 run instead of starting its own.
    in_flight: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    /// Argon2 runs at once (each takes ~19 MiB and a core): bounded so a flood of distinct
    /// passwords costs queueing, not memory.
    hashing: tokio::sync::Semaphore,
    /// Argon2 runs so far (for tests and diagnostics).
    hash_runs: std::sync::atomic::AtomicU64,
    cache_key: [u8; 32],
    /// Verified against for unknown users, so they cost the same time as known ones.
    decoy_hash: String,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl Accounts {
    pub fn new(registry: Arc<Registry>) -> Result<Accounts, StoreError> {
        let decoy_hash = password::hash(&password::generate()).map_err(StoreError::Other)?;
        Ok(Accounts {
            registry,
            verified: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            hashing: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            ),
            hash_runs: Default::default(),
            cache_key: rand::random(),
            decoy_hash,
        })
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Check a local login. Returns the account it logged in to.
    pub async fn verify(
        self: &Arc<Self>,
        username: &str,
        password: &Secret,
    ) -> Result<AccountKey, LocalAuthError> {
        let key = AccountKey::new(username);
        let data = self
            .registry
            .current()
            .map_err(|e| LocalAuthError::Store(e.to_string()))?;
        let hashes: Vec<String> = if self.registry.is_configured(&key) {
            data.account(&key)
                .map(|a| a.passwords.iter().map(|p| p.hash.clone()).collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let digest = self.digest(&key, password);
        if self.cached(&digest, &hashes) {
            return Ok(key);
        }
        let flight = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest)
            .or_default()
            .clone();
        let result = {
            let _same_password = flight.lock().await;
            if self.cached(&digest, &hashes) {
                Ok(key)
            } else {
                self.check(&key, password, hashes, digest).await
            }
        };
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        // The last one out removes the entry (the map holds one reference).
        if Arc::strong_count(&flight) <= 2 {
            in_flight.remove(&digest);
        }
        result
    }

    /// How many Argon2 checks ran (cache misses).
    pub fn hash_runs(&self) -> u64 {
        self.hash_runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether this digest was verified before against a hash the account still has.
    fn cached(&self, digest: &[u8; 32], hashes: &[String]) -> bool {
        let cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(digest).is_some_and(|h| hashes.contains(h))
    }

    /// Run Argon2 (bounded in parallel) and remember a match.
    async fn check(
        &self,
        key: &AccountKey,
        password: &Secret,
        hashes: Vec<String>,
        digest: [u8; 32],
    ) -> Result<AccountKey, LocalAuthError> {
        let _permit = self
            .hashing
            .acquire()
            .await
            .map_err(|e| LocalAuthError::Store(format!("password check failed: {e}")))?;
        self.hash_runs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
                Ok(key.clone())
            }
            None => Err(LocalAuthError::BadCredentials),
        }
    }

    fn digest(&self, key: &AccountKey, password: &Secret) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update(key.as_str().as_bytes());
        h.update([0]);
        h.update(password.expose().as_bytes());
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_logins_with_a_new_password_share_one_argon2_run() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config::parse(
            "state_dir = \"state\"\n[[account]]\nemail = \"alice@x.com\"\n",
            &tmp.path().join("config.toml"),
        )
        .unwrap();
        let store = crate::store::Store::open(&config.state_dir, &config.store).unwrap();
        let alice = AccountKey::new("alice@x.com");
        let pw = crate::registry::add_password(&store, &alice, "laptop").unwrap();
        let registry = Arc::new(Registry::new(&config, store).unwrap());
        let accounts = Arc::new(Accounts::new(registry).unwrap());
        let logins: Vec<_> = (0..20)
            .map(|_| {
                let (a, pw) = (accounts.clone(), pw.clone());
                tokio::spawn(async move { a.verify("Alice@x.com", &pw).await })
            })
            .collect();
        for l in logins {
            assert_eq!(l.await.unwrap(), Ok(alice.clone()));
        }
        assert_eq!(accounts.hash_runs(), 1);
        // Wrong passwords are never cached: each costs a check.
        let wrong = Secret::new("wrong");
        assert_eq!(
            accounts.verify("alice@x.com", &wrong).await,
            Err(LocalAuthError::BadCredentials)
        );
        assert_eq!(
            accounts.verify("alice@x.com", &wrong).await,
            Err(LocalAuthError::BadCredentials)
        );
        assert_eq!(accounts.hash_runs(), 3);
        assert!(accounts.in_flight.lock().unwrap().is_empty());
    }
}

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
    /// A shared store is unreachable; its outage is logged where it is noticed, once.
    Unavailable(String),
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
    /// Argon2 runs, on a fixed set of workers whose memory is reused.
    checker: Arc<password::Checker>,
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
        let (_, decoy_hash) = password::generate().map_err(StoreError::Other)?;
        Ok(Accounts {
            registry,
            verified: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            checker: Arc::new(password::Checker::new()),
            cache_key: rand::random(),
            decoy_hash,
        })
    }

    /// Check a local login. Returns the account it logged in to.
    pub async fn verify(
        self: &Arc<Self>,
        username: &str,
        password: &Secret,
    ) -> Result<AccountKey, LocalAuthError> {
        let key = AccountKey::new(username);
        let data = self.registry.current().map_err(|e| match e {
            StoreError::Unavailable(why) => LocalAuthError::Unavailable(why),
            other => LocalAuthError::Store(other.to_string()),
        })?;
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
                self.check(&key, password, &hashes, digest).await
            }
        };
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        // The last one out removes the entry (the map holds one reference).
        if Arc::strong_count(&flight) <= 2 {
            in_flight.remove(&digest);
        }
        result
    }

    /// The same checks against a reloaded config's registry: the Argon2 workers, the cache of
    /// verified passwords and the decoy carry over (a cached entry still counts only while its
    /// hash is in the store).
    pub fn reconfigured(&self, registry: Arc<Registry>) -> Accounts {
        let verified = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Accounts {
            registry,
            verified: Mutex::new(verified),
            in_flight: Mutex::new(HashMap::new()),
            checker: self.checker.clone(),
            cache_key: self.cache_key,
            decoy_hash: self.decoy_hash.clone(),
        }
    }

    /// The Argon2 workers, for other password checks (the admin login).
    pub fn checker(&self) -> Arc<password::Checker> {
        self.checker.clone()
    }

    /// How many Argon2 checks ran (cache misses).
    pub fn hash_runs(&self) -> u64 {
        self.checker.runs()
    }

    /// Whether this digest was verified before against a hash the account still has.
    fn cached(&self, digest: &[u8; 32], hashes: &[String]) -> bool {
        let cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(digest).is_some_and(|h| hashes.contains(h))
    }

    /// Run Argon2 once against the hash the password names (a decoy if none fits) and
    /// remember a match. Only a password of the older format may need more than one run.
    async fn check(
        &self,
        key: &AccountKey,
        password: &Secret,
        hashes: &[String],
        digest: [u8; 32],
    ) -> Result<AccountKey, LocalAuthError> {
        let candidates = password::candidates(password.expose(), hashes);
        let store_error = |e: String| LocalAuthError::Store(format!("password check failed: {e}"));
        if candidates.is_empty() {
            self.checker
                .verify(password, &self.decoy_hash)
                .await
                .map_err(store_error)?;
            return Err(LocalAuthError::BadCredentials);
        }
        for hash in candidates {
            if self
                .checker
                .verify(password, hash)
                .await
                .map_err(store_error)?
            {
                let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
                cache.insert(digest, hash.clone());
                return Ok(key.clone());
            }
        }
        Err(LocalAuthError::BadCredentials)
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
    use crate::registry::add_password;

    /// A checker over these accounts with this many passwords each; the passwords in order.
    fn checker(accounts: &[(&str, usize)]) -> (tempfile::TempDir, Arc<Accounts>, Vec<Secret>) {
        let tmp = tempfile::tempdir().unwrap();
        let text: String = accounts
            .iter()
            .map(|(email, _)| format!("[[account]]\nemail = \"{email}\"\n"))
            .collect();
        let config = Config::parse(
            &format!("state_dir = \"state\"\n{text}"),
            &tmp.path().join("config.toml"),
        )
        .unwrap();
        let store = crate::store::Store::open(&config.state_dir, &config.store).unwrap();
        let mut issued = Vec::new();
        for (email, n) in accounts {
            for i in 0..*n {
                let key = AccountKey::new(email);
                issued.push(add_password(&store, &key, &format!("l{i}")).unwrap());
            }
        }
        let registry = Arc::new(Registry::new(&config, store).unwrap());
        (tmp, Arc::new(Accounts::new(registry).unwrap()), issued)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_logins_with_a_new_password_share_one_argon2_run() {
        let alice = AccountKey::new("alice@x.com");
        let (_tmp, accounts, issued) = checker(&[("alice@x.com", 1)]);
        let pw = issued[0].clone();
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

    #[tokio::test(flavor = "multi_thread")]
    async fn a_wrong_password_costs_one_argon2_run_whatever_the_number_of_passwords() {
        let (_tmp, accounts, issued) = checker(&[
            ("p0@x.com", 0),
            ("p1@x.com", 1),
            ("p2@x.com", 2),
            ("p5@x.com", 5),
        ]);
        let (other, _) = password::generate().unwrap();
        // A wrong password of the current format naming an existing hash, and the last
        // characters of a real password swapped.
        let mut near = issued[3].expose().to_string();
        near.replace_range(10.., &other.expose()[10..]);
        let wrongs = [Secret::new("wrong"), other, Secret::new(near)];
        for user in [
            "p0@x.com",
            "p1@x.com",
            "p2@x.com",
            "p5@x.com",
            "stranger@x.com",
        ] {
            for wrong in &wrongs {
                let before = accounts.hash_runs();
                assert_eq!(
                    accounts.verify(user, wrong).await,
                    Err(LocalAuthError::BadCredentials)
                );
                assert_eq!(accounts.hash_runs() - before, 1, "{user}");
            }
        }
        for (i, pw) in issued.iter().enumerate() {
            let before = accounts.hash_runs();
            assert!(
                accounts.verify("p5@x.com", pw).await.is_ok() == (i >= 3),
                "{i}"
            );
            assert_eq!(accounts.hash_runs() - before, 1);
        }
    }
}

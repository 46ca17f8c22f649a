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
    /// Checks in progress, by the same digest: a client reconnecting many times at once with
    /// a password not yet cached waits for one Argon2 run instead of starting its own.
    in_flight: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    /// Argon2 runs, on a fixed set of workers whose memory is reused.
    checker: password::Checker,
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
        let (_, decoy_hash) = password::generate().map_err(StoreError::Other)?;
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
            in_flight: Mutex::new(HashMap::new()),
            checker: password::Checker::new(),
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
        key: &str,
        password: &Secret,
        hashes: &[String],
        digest: [u8; 32],
    ) -> Result<String, LocalAuthError> {
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
                return Ok(key.to_string());
            }
        }
        Err(LocalAuthError::BadCredentials)
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
    store.update(|data| {
        let account = data.account_mut(email);
        if account.passwords.iter().any(|p| p.label == label) {
            return Err(StoreError::Other(format!(
                "{email} already has a password labelled {label:?}; remove it first or pick another --label"
            )));
        }
        let taken: Vec<String> = account
            .passwords
            .iter()
            .filter_map(|p| password::hash_id(&p.hash))
            .collect();
        // Each password of an account names a different hash.
        let (pw, hash) = loop {
            let (pw, hash) = password::generate().map_err(StoreError::Other)?;
            if !password::hash_id(&hash).is_some_and(|id| taken.contains(&id)) {
                break (pw, hash);
            }
        };
        account.passwords.push(crate::store::PasswordEntry {
            label: label.to_string(),
            hash,
            created_at: now_unix(),
        });
        Ok(pw)
    })
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
    save_grant(store, email, token, None)
}

/// Store a refresh token with the end Google announced for it, if any.
pub fn save_grant(
    store: &Store,
    email: &str,
    token: &Secret,
    expires_in: Option<std::time::Duration>,
) -> Result<(), StoreError> {
    let now = now_unix();
    store.update(|data| {
        let account = data.account_mut(email);
        account.refresh_token = Some(token.clone());
        account.refresh_token_obtained_at = Some(now);
        account.refresh_token_expires_at = expires_in.map(|d| now + d.as_secs() as i64);
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
            account.refresh_token_expires_at = None;
        }
        Ok(())
    })
}

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

/// A refresh token refused at about 7 days old most likely met Google's limit for apps in
/// Testing.
pub fn looks_like_testing_expiry(obtained_at: i64, now: i64) -> bool {
    let age = now - obtained_at;
    (6 * DAY + 12 * HOUR..=8 * DAY).contains(&age)
}

/// What to do about a refresh token that will soon stop working, if anything: Google announced
/// its end and that is within a day, or it is in its seventh day (apps in Testing get 7 days).
pub fn refresh_token_attention(
    email: &str,
    obtained_at: Option<i64>,
    expires_at: Option<i64>,
    now: i64,
) -> Option<String> {
    if let Some(end) = expires_at {
        return if end <= now {
            Some(format!(
                "Google ended this grant at {}; run `xoauth2-proxy login {email}`",
                format_time(end)
            ))
        } else if end - now < DAY {
            Some(format!(
                "Google ends this grant at {} (in {}); run `xoauth2-proxy login {email}` before then",
                format_time(end),
                format_age(end - now)
            ))
        } else {
            None
        };
    }
    let obtained_at = obtained_at?;
    let age = now - obtained_at;
    (6 * DAY..7 * DAY).contains(&age).then(|| {
        format!(
            "the refresh token is {} old: if the Google Cloud project is External and in Testing, Google ends it at 7 days ({}); publish the app (Google Auth Platform > Audience > Publish app) or run `xoauth2-proxy login {email}` before then",
            format_age(age),
            format_time(obtained_at + 7 * DAY)
        )
    })
}

/// `2026-01-01 12:00:00 UTC`
pub fn format_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// `6 d 3 h`, `5 h 12 min`, `42 min`, `30 s`
pub fn format_age(secs: i64) -> String {
    let secs = secs.max(0);
    if secs >= DAY {
        format!("{} d {} h", secs / DAY, secs % DAY / HOUR)
    } else if secs >= HOUR {
        format!("{} h {} min", secs / HOUR, secs % HOUR / 60)
    } else if secs >= 60 {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// How an account gets its access tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// A stored refresh token from `login` or `import`.
    Authorized,
    ServiceAccount,
    /// Nothing yet: `login` is needed.
    Missing,
}

impl CredentialKind {
    pub fn words(self) -> &'static str {
        match self {
            CredentialKind::Authorized => "authorized",
            CredentialKind::ServiceAccount => "service account",
            CredentialKind::Missing => "missing",
        }
    }
}

/// One row of `accounts`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccountReport {
    pub email: String,
    pub credential: CredentialKind,
    /// Unix seconds; only known from a running `serve`.
    pub access_token_expires_at: Option<i64>,
    /// The access token's state in words (`in 42 min`, `not cached: serve is not running`).
    pub access_token: String,
    pub refresh_token_obtained_at: Option<i64>,
    pub refresh_token_age_secs: Option<i64>,
    pub refresh_token_expires_at: Option<i64>,
    pub passwords: usize,
    /// What to do, most urgent first; empty when all is well.
    pub attention: Vec<String>,
}

/// The `accounts` rows: config, store and (if `serve` runs) its token status, as of `now`.
pub fn report(
    config: &Config,
    data: &StoreData,
    serve: Option<&crate::oauth::status::Status>,
    now: i64,
) -> Vec<AccountReport> {
    config
        .accounts
        .iter()
        .map(|a| {
            let key = a.key();
            let secrets = data.account(&key);
            let mut attention = Vec::new();
            let credential = if let Some(path) = &a.service_account_key {
                if let Err(e) = crate::oauth::service_account::ServiceAccount::load(path) {
                    attention.push(e);
                }
                CredentialKind::ServiceAccount
            } else if secrets.is_some_and(|s| s.refresh_token.is_some()) {
                CredentialKind::Authorized
            } else {
                attention.push(format!(
                    "not authorized yet: run `xoauth2-proxy login {}`",
                    a.email
                ));
                CredentialKind::Missing
            };
            if credential != CredentialKind::ServiceAccount {
                if let Err(e) = config.oauth_client(a) {
                    attention.push(e);
                }
            }
            let live = serve.and_then(|s| s.accounts.get(&key));
            let expires = live.and_then(|l| l.access_token_expires_at);
            let access_token = match (serve, expires) {
                (None, _) => "not cached: serve is not running".to_string(),
                (Some(s), None) => format!("none yet in serve (pid {})", s.pid),
                (Some(_), Some(at)) if at <= now => "expired (serve refreshes on next use)".into(),
                (Some(_), Some(at)) => format!("in {}", format_age(at - now)),
            };
            if let Some(error) = live.and_then(|l| l.last_error.as_ref()) {
                attention.push(format!(
                    "the running proxy's last token request failed: {error}"
                ));
            }
            let obtained = secrets.and_then(|s| s.refresh_token_obtained_at);
            let rt_expires = secrets.and_then(|s| s.refresh_token_expires_at);
            if credential == CredentialKind::Authorized {
                attention.extend(refresh_token_attention(&a.email, obtained, rt_expires, now));
            }
            let passwords = secrets.map(|s| s.passwords.len()).unwrap_or(0);
            if passwords == 0 {
                attention.push(format!(
                    "no app password yet: run `xoauth2-proxy password add {}`",
                    a.email
                ));
            }
            AccountReport {
                email: a.email.clone(),
                credential,
                access_token_expires_at: expires,
                access_token,
                refresh_token_obtained_at: obtained
                    .filter(|_| credential == CredentialKind::Authorized),
                refresh_token_age_secs: obtained
                    .filter(|_| credential == CredentialKind::Authorized)
                    .map(|o| (now - o).max(0)),
                refresh_token_expires_at: rt_expires
                    .filter(|_| credential == CredentialKind::Authorized),
                passwords,
                attention,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_logins_with_a_new_password_share_one_argon2_run() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config::parse(
            "state_dir = \"state\"\n[[account]]\nemail = \"alice@x.com\"\n",
            &tmp.path().join("config.toml"),
        )
        .unwrap();
        let store = crate::store::Store::open(&config.state_dir, &config.store).unwrap();
        let pw = add_password(&store, "alice@x.com", "laptop").unwrap();
        let accounts = Arc::new(Accounts::new(&config, store).unwrap());
        let logins: Vec<_> = (0..20)
            .map(|_| {
                let (a, pw) = (accounts.clone(), pw.clone());
                tokio::spawn(async move { a.verify("Alice@x.com", &pw).await })
            })
            .collect();
        for l in logins {
            assert_eq!(l.await.unwrap(), Ok("alice@x.com".to_string()));
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
        let tmp = tempfile::tempdir().unwrap();
        let config = Config::parse(
            "state_dir = \"state\"\n[[account]]\nemail = \"p0@x.com\"\n[[account]]\nemail = \"p1@x.com\"\n[[account]]\nemail = \"p2@x.com\"\n[[account]]\nemail = \"p5@x.com\"\n",
            &tmp.path().join("config.toml"),
        )
        .unwrap();
        let store = crate::store::Store::open(&config.state_dir, &config.store).unwrap();
        let mut issued = Vec::new();
        for (email, n) in [("p1@x.com", 1), ("p2@x.com", 2), ("p5@x.com", 5)] {
            for i in 0..n {
                issued.push(add_password(&store, email, &format!("l{i}")).unwrap());
            }
        }
        let accounts = Arc::new(Accounts::new(&config, store).unwrap());
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

    const NOW: i64 = 1_767_225_600;

    #[test]
    fn a_token_in_its_seventh_day_warns_about_the_testing_limit() {
        assert_eq!(
            refresh_token_attention("a@x.com", Some(NOW - 5 * DAY), None, NOW),
            None
        );
        let text =
            refresh_token_attention("a@x.com", Some(NOW - 6 * DAY - 3 * HOUR), None, NOW).unwrap();
        assert!(text.contains("6 d 3 h old"), "{text}");
        assert!(text.contains("Publish app"), "{text}");
        assert!(text.contains("xoauth2-proxy login a@x.com"), "{text}");
        // Older than 7 days and still working: a published app, nothing to say.
        assert_eq!(
            refresh_token_attention("a@x.com", Some(NOW - 30 * DAY), None, NOW),
            None
        );
    }

    #[test]
    fn an_announced_end_is_reported_a_day_ahead() {
        assert_eq!(
            refresh_token_attention("a@x.com", Some(NOW), Some(NOW + 2 * DAY), NOW),
            None
        );
        let soon =
            refresh_token_attention("a@x.com", Some(NOW), Some(NOW + 5 * HOUR), NOW).unwrap();
        assert!(soon.contains("in 5 h 0 min"), "{soon}");
        let past = refresh_token_attention("a@x.com", Some(NOW), Some(NOW - 1), NOW).unwrap();
        assert!(past.contains("ended"), "{past}");
    }

    #[test]
    fn refused_week_old_token_is_recognised_as_the_testing_limit() {
        assert!(looks_like_testing_expiry(NOW - 7 * DAY, NOW));
        assert!(!looks_like_testing_expiry(NOW - 2 * DAY, NOW));
        assert!(!looks_like_testing_expiry(NOW - 60 * DAY, NOW));
    }

    #[test]
    fn report_rows_say_what_each_account_needs() {
        let config = Config::parse(
            "state_dir = \"s\"\n[providers.google]\nclient_id = \"id\"\nclient_secret = \"sec\"\n[[account]]\nemail = \"Alice@x.com\"\n[[account]]\nemail = \"bob@x.com\"\n[[account]]\nemail = \"svc@x.com\"\nservice_account_key = \"missing.json\"\n",
            Path::new("/nonexistent/config.toml"),
        )
        .unwrap();
        let mut data = StoreData::default();
        let alice = data.account_mut("alice@x.com");
        alice.refresh_token = Some("1//r".into());
        alice.refresh_token_obtained_at = Some(NOW - 2 * DAY);
        alice.passwords.push(crate::store::PasswordEntry {
            label: "laptop".into(),
            hash: "h".into(),
            created_at: NOW,
        });
        let mut status = crate::oauth::status::Status {
            pid: 7,
            updated_at: NOW,
            ..Default::default()
        };
        status.accounts.insert(
            "alice@x.com".into(),
            crate::oauth::status::AccountStatus {
                access_token_expires_at: Some(NOW + 42 * 60),
                ..Default::default()
            },
        );
        let rows = report(&config, &data, Some(&status), NOW);
        assert_eq!(rows[0].email, "Alice@x.com");
        assert_eq!(rows[0].credential, CredentialKind::Authorized);
        assert_eq!(rows[0].access_token, "in 42 min");
        assert_eq!(rows[0].refresh_token_age_secs, Some(2 * DAY));
        assert_eq!(rows[0].passwords, 1);
        assert!(rows[0].attention.is_empty(), "{:?}", rows[0].attention);
        assert_eq!(rows[1].credential, CredentialKind::Missing);
        assert!(rows[1].attention[0].contains("xoauth2-proxy login bob@x.com"));
        assert!(rows[1].access_token.contains("none yet"));
        assert_eq!(rows[2].credential, CredentialKind::ServiceAccount);
        assert!(rows[2].attention[0].contains("cannot read the service account key"));
        let offline = report(&config, &data, None, NOW);
        assert_eq!(offline[0].access_token, "not cached: serve is not running");
        let json = serde_json::to_value(&offline).unwrap();
        assert_eq!(json[2]["credential"], "service_account");
    }
}

//! The token manager: per account, a cached access token with its wall-clock expiry, refreshed
//! ahead of expiry with single-flight (concurrent logins share one token request), and kept
//! fresh in the background for accounts in use. A dead grant is remembered as permanent until
//! the store holds a different refresh token; temporary failures are remembered briefly so a
//! down endpoint is not hammered. Accounts with a service account key mint JWTs instead.

pub mod flow;
pub mod google;
pub mod service_account;
pub mod status;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::account::AccountKey;
use crate::clock::now_unix;
use crate::config::{Config, OAuthClient};
use crate::registry::{grant, Registry};
use crate::secret::Secret;
use google::GrantError;
use service_account::ServiceAccount;

/// A usable access token.
#[derive(Debug)]
pub struct AccessToken {
    pub token: Secret,
    pub expires_at: SystemTime,
    obtained_at: SystemTime,
}

impl AccessToken {
    /// The margin before expiry inside which a login refreshes first: 5 minutes, or a quarter
    /// of the lifetime for short-lived tokens.
    fn margin(&self) -> Duration {
        let lifetime = self
            .expires_at
            .duration_since(self.obtained_at)
            .unwrap_or_default();
        (lifetime / 4).min(Duration::from_secs(300))
    }

    /// Fresh enough to start a login with.
    fn is_fresh(&self, now: SystemTime) -> bool {
        now + self.margin() < self.expires_at
    }

    /// When the background refresher replaces it: twice the login margin before expiry, so
    /// logins keep finding a fresh token, but never sooner than `min_age` after it was issued
    /// (an endpoint that hands out very short tokens must not be asked in a loop).
    fn background_due(&self, min_age: Duration) -> SystemTime {
        let ahead = self
            .expires_at
            .checked_sub(self.margin() * 2)
            .unwrap_or(self.obtained_at);
        ahead.max(self.obtained_at + min_age)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// No usable authorization: never authorized, or the refresh token is dead.
    NotAuthorized { email: String, detail: String },
    /// The OAuth client setup is wrong; the admin must fix config or console.
    Misconfigured { email: String, detail: String },
    /// Try again later.
    Temporary { email: String, detail: String },
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::NotAuthorized { email, detail }
            | TokenError::Misconfigured { email, detail }
            | TokenError::Temporary { email, detail } => write!(f, "{email}: {detail}"),
        }
    }
}

impl TokenError {
    /// The error with what a person should do about it, for the command line.
    pub fn with_advice(&self) -> String {
        match self {
            TokenError::NotAuthorized { email, detail } => {
                format!("{detail}; run `xoauth2-proxy login {email}`")
            }
            TokenError::Misconfigured { detail, .. } => detail.clone(),
            TokenError::Temporary { detail, .. } => {
                format!("{detail}; check the network or try again later")
            }
        }
    }
}

/// What the last failed refresh said, so the next login does not ask again in vain.
#[derive(Debug)]
enum Failure {
    /// Permanent for this refresh token: retried once the store holds another one, or (for
    /// service accounts, whose fix happens in a console) after `until`.
    Permanent {
        error: TokenError,
        refresh_token: Option<Secret>,
        until: Option<Instant>,
    },
    Temporary {
        error: TokenError,
        until: Instant,
    },
}

/// Where an account's access tokens come from.
enum Source {
    /// A stored refresh token and this OAuth client (or why there is none).
    RefreshToken(Result<OAuthClient, String>),
    /// A service account key (or why it is unusable: read again at the next attempt, so a
    /// fixed key file needs no restart), with the scope and token endpoint.
    ServiceAccount {
        path: PathBuf,
        key: Mutex<Result<Arc<ServiceAccount>, String>>,
        scope: String,
        token_url: String,
    },
}

#[derive(Default)]
struct Background {
    /// The last login that asked for a token: the account counts as in use for a while after.
    last_used: Option<Instant>,
    /// No background attempt before this (set while one runs and after a failure).
    not_before: Option<Instant>,
    /// The last refresh-token age warning, to repeat it at most twice a day.
    warned_at: Option<Instant>,
}

struct AccountTokens {
    email: String,
    source: Source,
    cached: Mutex<Option<Arc<AccessToken>>>,
    /// Held while refreshing: the single flight.
    gate: tokio::sync::Mutex<Option<Failure>>,
    requests: AtomicU64,
    background: Mutex<Background>,
    status: Mutex<status::AccountStatus>,
}

struct Shared {
    http: reqwest::Client,
    registry: Arc<Registry>,
    tokens: HashMap<AccountKey, Arc<AccountTokens>>,
    /// Where `serve` publishes token expiry for `accounts`; None for one-off commands.
    status_dir: Option<PathBuf>,
    status_write: Mutex<()>,
    /// Woken when a token is cached, so the refresher recomputes its schedule.
    wake: tokio::sync::Notify,
    min_background_age_ms: AtomicU64,
}

pub struct TokenManager {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("accounts", &self.shared.tokens.len())
            .finish_non_exhaustive()
    }
}

/// After a temporary failure, logins in this window get the same answer without a request.
const TEMPORARY_HOLD: Duration = Duration::from_secs(1);
/// A service account's refusal is fixed in a console, not in the store: ask again after this.
const SERVICE_ACCOUNT_HOLD: Duration = Duration::from_secs(60);
/// An account counts as in use this long after its last login.
const IN_USE: Duration = Duration::from_secs(12 * 3600);
/// Background refreshes of one account are at least this far apart.
const MIN_BACKGROUND_AGE: Duration = Duration::from_secs(60);
/// After a failed background refresh, wait this long before the next one.
const BACKGROUND_RETRY: Duration = Duration::from_secs(30);
/// The refresher looks at least this often (for age warnings and missed wake-ups).
const REFRESHER_TICK: Duration = Duration::from_secs(60);
/// Repeat a refresh-token age warning at most this often.
const WARN_EVERY: Duration = Duration::from_secs(12 * 3600);

impl TokenManager {
    /// The manager of a running proxy: publishes token expiry in the state dir's status file.
    pub fn new(config: &Config, registry: Arc<Registry>) -> Result<TokenManager, String> {
        Self::build(config, registry, Some(config.state_dir.clone()))
    }

    /// For one-off commands (`check`): tokens it gets are not the running proxy's, so it
    /// publishes nothing.
    pub fn detached(config: &Config, registry: Arc<Registry>) -> Result<TokenManager, String> {
        Self::build(config, registry, None)
    }

    fn build(
        config: &Config,
        registry: Arc<Registry>,
        status_dir: Option<PathBuf>,
    ) -> Result<TokenManager, String> {
        let tokens = config
            .accounts
            .iter()
            .map(|a| {
                let source = match &a.service_account_key {
                    Some(path) => Source::ServiceAccount {
                        path: path.clone(),
                        key: Mutex::new(ServiceAccount::load(path).map(Arc::new)),
                        scope: config.google.scope.clone(),
                        token_url: config.google.token_url.clone(),
                    },
                    None => Source::RefreshToken(config.oauth_client(a)),
                };
                (
                    a.key(),
                    Arc::new(AccountTokens {
                        email: a.email.clone(),
                        source,
                        cached: Mutex::new(None),
                        gate: tokio::sync::Mutex::new(None),
                        requests: Default::default(),
                        background: Mutex::new(Background::default()),
                        status: Mutex::new(Default::default()),
                    }),
                )
            })
            .collect();
        Ok(TokenManager {
            shared: Arc::new(Shared {
                http: google::http_client()?,
                registry,
                tokens,
                status_dir,
                status_write: Mutex::new(()),
                wake: tokio::sync::Notify::new(),
                min_background_age_ms: AtomicU64::new(MIN_BACKGROUND_AGE.as_millis() as u64),
            }),
        })
    }

    /// Number of token requests made for an account (for `accounts` and tests).
    pub fn requests_made(&self, email: &str) -> u64 {
        self.shared
            .tokens
            .get(&AccountKey::new(email))
            .map(|t| t.requests.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// How soon after issue the background refresher may replace a token (default one minute;
    /// tests shorten it).
    pub fn set_min_background_age(&self, age: Duration) {
        self.shared
            .min_background_age_ms
            .store(age.as_millis() as u64, Ordering::Relaxed);
        self.shared.wake.notify_one();
    }

    /// A fresh access token for the account, refreshing if needed.
    pub async fn get(&self, key: &AccountKey) -> Result<Arc<AccessToken>, TokenError> {
        let Some(acct) = self.shared.tokens.get(key) else {
            return Err(TokenError::Misconfigured {
                email: key.to_string(),
                detail: "not a configured account".into(),
            });
        };
        lock(&acct.background).last_used = Some(Instant::now());
        if let Some(t) = acct.fresh() {
            return Ok(t);
        }
        let mut gate = acct.gate.lock().await;
        // Whoever held the gate before us may have refreshed already.
        if let Some(t) = acct.fresh() {
            return Ok(t);
        }
        self.shared.refresh_locked(key, acct, &mut gate).await
    }

    /// The upstream rejected `token`: forget it so the next `get` refreshes.
    pub fn invalidate(&self, key: &AccountKey, token: &Arc<AccessToken>) {
        if let Some(acct) = self.shared.tokens.get(key) {
            let mut cached = lock(&acct.cached);
            if cached.as_ref().is_some_and(|c| Arc::ptr_eq(c, token)) {
                *cached = None;
            }
        }
    }

    /// Keep the tokens of accounts in use fresh until `cancel`, so logins do not wait on the
    /// token endpoint; also warn about refresh tokens near Google's 7-day Testing limit.
    pub fn spawn_refresher(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        for acct in shared.tokens.values() {
            let unusable = match &acct.source {
                Source::RefreshToken(Err(why)) => Some(why.clone()),
                Source::ServiceAccount { key, .. } => lock(key).as_ref().err().cloned(),
                _ => None,
            };
            if let Some(why) = unusable {
                tracing::warn!(account = %acct.email, "this account cannot get tokens: {why}");
            }
        }
        shared.publish_status();
        tokio::spawn(async move {
            loop {
                let next = shared.background_pass();
                tokio::select! {
                    _ = tokio::time::sleep_until(next.into()) => {}
                    _ = shared.wake.notified() => {}
                    _ = cancel.cancelled() => return,
                }
            }
        })
    }
}

impl Shared {
    /// Refresh with the gate held: honour remembered failures, ask the endpoint, remember the
    /// outcome.
    async fn refresh_locked(
        &self,
        key: &AccountKey,
        acct: &AccountTokens,
        gate: &mut Option<Failure>,
    ) -> Result<Arc<AccessToken>, TokenError> {
        let refresh_token = match &acct.source {
            Source::RefreshToken(_) => {
                self.registry
                    .refresh_token(key)
                    .map_err(|e| TokenError::Temporary {
                        email: acct.email.clone(),
                        detail: format!("cannot read the secret store: {e}"),
                    })?
            }
            Source::ServiceAccount { .. } => None,
        };
        match &*gate {
            Some(Failure::Permanent {
                error,
                refresh_token: failed,
                until,
            }) if *failed == refresh_token && until.is_none_or(|u| Instant::now() < u) => {
                return Err(error.clone())
            }
            Some(Failure::Temporary { error, until }) if Instant::now() < *until => {
                return Err(error.clone())
            }
            _ => {}
        }
        let result = self.refresh(key, acct, refresh_token.clone()).await;
        {
            let mut st = lock(&acct.status);
            st.last_refresh_at = Some(now_unix());
            match &result {
                Ok(token) => {
                    st.access_token_expires_at = Some(unix(token.expires_at));
                    st.last_error = None;
                }
                Err((error, _)) => st.last_error = Some(error.with_advice()),
            }
        }
        self.publish_status();
        match result {
            Ok(token) => {
                *gate = None;
                self.wake.notify_one();
                Ok(token)
            }
            Err((error, retry_after)) => {
                *gate = Some(match &error {
                    TokenError::Temporary { .. } => Failure::Temporary {
                        error: error.clone(),
                        until: Instant::now() + retry_after.unwrap_or(TEMPORARY_HOLD),
                    },
                    _ => Failure::Permanent {
                        error: error.clone(),
                        until: match acct.source {
                            Source::ServiceAccount { .. } => {
                                Some(Instant::now() + SERVICE_ACCOUNT_HOLD)
                            }
                            Source::RefreshToken(_) => None,
                        },
                        refresh_token,
                    },
                });
                Err(error)
            }
        }
    }

    async fn refresh(
        &self,
        key: &AccountKey,
        acct: &AccountTokens,
        refresh_token: Option<Secret>,
    ) -> Result<Arc<AccessToken>, (TokenError, Option<Duration>)> {
        let email = acct.email.clone();
        let misconfigured = |detail: &String| {
            (
                TokenError::Misconfigured {
                    email: email.clone(),
                    detail: detail.clone(),
                },
                None,
            )
        };
        let started = SystemTime::now();
        let (granted, wanted_scope) = match &acct.source {
            Source::RefreshToken(client) => {
                let client = client.as_ref().map_err(misconfigured)?;
                let Some(refresh_token) = &refresh_token else {
                    return Err((
                        TokenError::NotAuthorized {
                            email: email.clone(),
                            detail: "not authorized yet".into(),
                        },
                        None,
                    ));
                };
                acct.requests.fetch_add(1, Ordering::Relaxed);
                let granted = google::refresh(&self.http, client, refresh_token).await;
                (granted, client.scope.as_str())
            }
            Source::ServiceAccount {
                path,
                key,
                scope,
                token_url,
            } => {
                let sa = {
                    let mut key = lock(key);
                    if key.is_err() {
                        *key = ServiceAccount::load(path).map(Arc::new);
                    }
                    key.clone().map_err(|e| misconfigured(&e))?
                };
                acct.requests.fetch_add(1, Ordering::Relaxed);
                let granted = sa.fetch(&self.http, &email, scope, token_url).await;
                (granted, scope.as_str())
            }
        };
        let granted = granted.map_err(|e| {
            let retry_after = match &e {
                GrantError::Temporary { retry_after, .. } => *retry_after,
                _ => None,
            };
            let error = match e {
                GrantError::Revoked(detail) => TokenError::NotAuthorized {
                    detail: format!("{detail}{}", self.testing_limit_hint(key)),
                    email: email.clone(),
                },
                GrantError::Client(detail) => TokenError::Misconfigured {
                    email: email.clone(),
                    detail,
                },
                GrantError::Temporary { detail, .. } => TokenError::Temporary {
                    email: email.clone(),
                    detail,
                },
            };
            tracing::warn!(account = %email, error = %error, "token refresh failed");
            (error, retry_after)
        })?;
        if let Some(scope) = &granted.scope {
            if !scope.split_whitespace().any(|s| s == wanted_scope) {
                let error = TokenError::NotAuthorized {
                    email: email.clone(),
                    detail: format!(
                        "the authorization does not include {wanted_scope} (granted: {scope}); authorize again and allow access to Gmail"
                    ),
                };
                tracing::warn!(account = %email, error = %error, "token refresh failed");
                return Err((error, None));
            }
        }
        // A rotated refresh token is saved before the new access token is used: if saving
        // fails we would lose the only valid grant.
        if let (Some(rotated), Some(old)) = (&granted.refresh_token, &refresh_token) {
            if rotated != old {
                crate::registry::rotate_refresh_token(self.registry.store(), key, rotated)
                    .map_err(|e| {
                        (
                            TokenError::Temporary {
                                email: email.clone(),
                                detail: format!("cannot save the rotated refresh token: {e}"),
                            },
                            None,
                        )
                    })?;
            }
        }
        let token = Arc::new(AccessToken {
            token: granted.access_token,
            expires_at: started + granted.expires_in,
            obtained_at: started,
        });
        tracing::info!(account = %email, expires_in = granted.expires_in.as_secs(), "access token refreshed");
        *lock(&acct.cached) = Some(token.clone());
        Ok(token)
    }

    /// For a refused refresh token about a week old: say it is probably Google's Testing limit.
    fn testing_limit_hint(&self, key: &AccountKey) -> String {
        let obtained = self
            .registry
            .current()
            .ok()
            .and_then(|d| d.account(key).and_then(|a| a.refresh_token_obtained_at));
        match obtained {
            Some(at) if grant::looks_like_testing_expiry(at, now_unix()) => {
                "; it was issued about 7 days ago, which is when Google ends grants of apps in Testing: publish the app (Google Auth Platform > Audience > Publish app) so new grants last".into()
            }
            _ => String::new(),
        }
    }

    /// One look at every account: start the background refreshes that are due, warn about old
    /// refresh tokens, and return when to look again.
    fn background_pass(self: &Arc<Self>) -> Instant {
        let now = Instant::now();
        let wall = SystemTime::now();
        let min_age = Duration::from_millis(self.min_background_age_ms.load(Ordering::Relaxed));
        let mut next = now + REFRESHER_TICK;
        let data = self.registry.current().ok();
        for (key, acct) in &self.tokens {
            if let Some(data) = &data {
                self.warn_about_age(key, acct, data, now);
            }
            let Some(token) = lock(&acct.cached).clone() else {
                continue;
            };
            let mut bg = lock(&acct.background);
            if bg.last_used.is_none_or(|u| now.duration_since(u) >= IN_USE) {
                continue;
            }
            let due_wall = token.background_due(min_age);
            let mut due = now + due_wall.duration_since(wall).unwrap_or_default();
            if let Some(not_before) = bg.not_before {
                due = due.max(not_before);
            }
            if due > now {
                next = next.min(due);
                continue;
            }
            bg.not_before = Some(now + BACKGROUND_RETRY);
            drop(bg);
            let shared = self.clone();
            let key = key.clone();
            let acct = acct.clone();
            tokio::spawn(async move { shared.refresh_ahead(&key, &acct, token).await });
        }
        next
    }

    async fn refresh_ahead(&self, key: &AccountKey, acct: &AccountTokens, seen: Arc<AccessToken>) {
        let mut gate = acct.gate.lock().await;
        let current = lock(&acct.cached).clone();
        if !current.is_some_and(|c| Arc::ptr_eq(&c, &seen)) {
            // A login refreshed (or dropped) it meanwhile.
            return;
        }
        tracing::debug!(account = %acct.email, "refreshing the access token ahead of expiry");
        if self.refresh_locked(key, acct, &mut gate).await.is_ok() {
            lock(&acct.background).not_before = None;
        }
    }

    fn warn_about_age(
        &self,
        key: &AccountKey,
        acct: &AccountTokens,
        data: &crate::store::StoreData,
        now: Instant,
    ) {
        let Some(secrets) = data.account(key) else {
            return;
        };
        if secrets.refresh_token.is_none() || matches!(acct.source, Source::ServiceAccount { .. }) {
            return;
        }
        let Some(text) = grant::refresh_token_attention(
            &acct.email,
            secrets.refresh_token_obtained_at,
            secrets.refresh_token_expires_at,
            now_unix(),
        ) else {
            return;
        };
        let mut bg = lock(&acct.background);
        if bg
            .warned_at
            .is_some_and(|w| now.duration_since(w) < WARN_EVERY)
        {
            return;
        }
        bg.warned_at = Some(now);
        tracing::warn!(account = %acct.email, "{text}");
    }

    /// Publish what this process knows about its tokens (only for `serve`).
    fn publish_status(&self) {
        let Some(dir) = &self.status_dir else {
            return;
        };
        let _serial = lock(&self.status_write);
        let snapshot = status::Status {
            pid: std::process::id(),
            updated_at: now_unix(),
            accounts: self
                .tokens
                .iter()
                .map(|(k, a)| (k.to_string(), lock(&a.status).clone()))
                .collect(),
        };
        status::write(dir, &snapshot);
    }
}

impl AccountTokens {
    fn fresh(&self) -> Option<Arc<AccessToken>> {
        lock(&self.cached)
            .as_ref()
            .filter(|t| t.is_fresh(SystemTime::now()))
            .cloned()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `import`: check a refresh token with one refresh; returns the verified grant.
pub async fn verify_refresh_token(
    client: &OAuthClient,
    refresh_token: &Secret,
) -> Result<google::Granted, GrantError> {
    let http = google::http_client().map_err(|detail| GrantError::Temporary {
        detail,
        retry_after: None,
    })?;
    google::refresh(&http, client, refresh_token).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(lifetime_secs: u64) -> AccessToken {
        let obtained_at = UNIX_EPOCH + Duration::from_secs(1_000_000);
        AccessToken {
            token: Secret::new("t"),
            expires_at: obtained_at + Duration::from_secs(lifetime_secs),
            obtained_at,
        }
    }

    #[test]
    fn an_hour_token_is_refreshed_in_the_background_ten_minutes_before_logins_would() {
        let t = token(3600);
        let start = t.obtained_at;
        assert!(t.is_fresh(start + Duration::from_secs(3600 - 301)));
        assert!(!t.is_fresh(start + Duration::from_secs(3600 - 300)));
        assert_eq!(
            t.background_due(MIN_BACKGROUND_AGE),
            start + Duration::from_secs(3600 - 600)
        );
    }

    #[test]
    fn very_short_tokens_are_not_refreshed_in_the_background_in_a_loop() {
        let t = token(2);
        assert_eq!(
            t.background_due(MIN_BACKGROUND_AGE),
            t.obtained_at + MIN_BACKGROUND_AGE
        );
        let t = token(0);
        assert_eq!(
            t.background_due(MIN_BACKGROUND_AGE),
            t.obtained_at + MIN_BACKGROUND_AGE
        );
    }

    #[test]
    fn advice_says_what_to_run() {
        let e = TokenError::NotAuthorized {
            email: "a@x.com".into(),
            detail: "not authorized yet".into(),
        };
        assert_eq!(
            e.with_advice(),
            "not authorized yet; run `xoauth2-proxy login a@x.com`"
        );
    }
}

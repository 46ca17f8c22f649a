//! The token manager: per account one `State` (Empty, Pending, Active, Failed) under one lock,
//! with explicit transitions. A login that finds no fresh token leads a single refresh that
//! every concurrent login waits for; accounts in use are refreshed ahead of expiry in the
//! background. A dead grant stays `Failed` until the store holds a different refresh token;
//! a temporary failure briefly, so a down endpoint is not hammered. Accounts with a service
//! account key mint JWTs instead of using a refresh token.

pub mod device;
pub mod flow;
pub mod service_account;
pub mod status;
pub mod token_endpoint;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::account::AccountKey;
use crate::clock::now_unix;
use crate::config::{Config, OAuthClient};
use crate::provider::{self, Provider};
use crate::registry::{grant, Registry};
use crate::secret::Secret;
use crate::store::peers::{Peers, SharedToken};
use service_account::ServiceAccount;
use token_endpoint::{GrantError, Granted};

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
    /// No refresh token in the store: `login` was never run for this account.
    NeverAuthorized { email: String },
    /// The grant is dead (revoked, expired, or without the mail scope): authorize again.
    Revoked { email: String, detail: String },
    /// The OAuth client or account setup is wrong; the admin must fix config or console.
    Misconfigured { email: String, detail: String },
    /// Try again later, not before `retry_after` when the endpoint said so.
    Temporary {
        email: String,
        detail: String,
        retry_after: Option<Duration>,
    },
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.email(), self.detail())
    }
}

impl TokenError {
    pub fn email(&self) -> &str {
        match self {
            TokenError::NeverAuthorized { email }
            | TokenError::Revoked { email, .. }
            | TokenError::Misconfigured { email, .. }
            | TokenError::Temporary { email, .. } => email,
        }
    }

    /// What went wrong, without the account.
    pub fn detail(&self) -> &str {
        match self {
            TokenError::NeverAuthorized { .. } => "not authorized yet",
            TokenError::Revoked { detail, .. }
            | TokenError::Misconfigured { detail, .. }
            | TokenError::Temporary { detail, .. } => detail,
        }
    }

    /// The error with what a person should do about it, for the command line.
    pub fn with_advice(&self) -> String {
        let detail = self.detail();
        match self {
            TokenError::NeverAuthorized { email } | TokenError::Revoked { email, .. } => {
                format!("{detail}; run `xoauth2-proxy login {email}`")
            }
            TokenError::Misconfigured { .. } => detail.to_string(),
            TokenError::Temporary { .. } => {
                format!("{detail}; check the network or try again later")
            }
        }
    }

    fn from_grant(email: &str, e: GrantError) -> TokenError {
        let email = email.to_string();
        match e {
            GrantError::Revoked(detail) => TokenError::Revoked { email, detail },
            GrantError::Client(detail) => TokenError::Misconfigured { email, detail },
            GrantError::Temporary {
                detail,
                retry_after,
            } => TokenError::Temporary {
                email,
                detail,
                retry_after,
            },
        }
    }
}

/// One account's token state. Transitions: a caller that finds no fresh token moves it to
/// `Pending` and refreshes (every other caller waits for that one outcome); the outcome moves
/// it to `Active` or `Failed`; an upstream rejecting the token moves `Active` to `Empty`.
enum State {
    Empty,
    /// A refresh is under way; `previous` is restored should its caller give up midway.
    Pending {
        flight: u64,
        done: watch::Receiver<Option<Outcome>>,
        previous: Box<State>,
    },
    Active(Arc<AccessToken>),
    Failed {
        failure: Failed,
        /// The last token obtained, for the status and the background schedule.
        last: Option<Arc<AccessToken>>,
    },
}

type Outcome = Result<Arc<AccessToken>, TokenError>;

/// What the last failed refresh said, so the next login does not ask again in vain.
enum Failed {
    /// The same answer until `until`.
    Temporary { error: TokenError, until: Instant },
    /// Permanent for this refresh token: asked again once the store holds another one, or
    /// (service accounts, whose fix happens in a console) after `until`.
    Revoked {
        error: TokenError,
        refresh_token: Option<Secret>,
        until: Option<Instant>,
    },
}

impl Failed {
    /// The remembered error, if it still answers for `refresh_token` at `now`.
    fn holds(&self, refresh_token: &Option<Secret>, now: Instant) -> Option<&TokenError> {
        match self {
            Failed::Temporary { error, until } => (now < *until).then_some(error),
            Failed::Revoked {
                error,
                refresh_token: failed,
                until,
            } => (failed == refresh_token && until.is_none_or(|u| now < u)).then_some(error),
        }
    }

    fn error(&self) -> &TokenError {
        match self {
            Failed::Temporary { error, .. } | Failed::Revoked { error, .. } => error,
        }
    }
}

impl State {
    /// The newest token this state knows, fresh or not.
    fn last_token(&self) -> Option<&Arc<AccessToken>> {
        match self {
            State::Empty => None,
            State::Pending { previous, .. } => previous.last_token(),
            State::Active(t) => Some(t),
            State::Failed { last, .. } => last.as_ref(),
        }
    }

    fn status(&self, last_refresh_at: Option<i64>) -> status::AccountStatus {
        let error = match self {
            State::Pending { previous, .. } => return previous.status(last_refresh_at),
            State::Failed { failure, .. } => Some(failure.error().with_advice()),
            State::Empty | State::Active(_) => None,
        };
        status::AccountStatus {
            access_token_expires_at: self.last_token().map(|t| unix(t.expires_at)),
            last_refresh_at,
            last_error: error,
        }
    }
}

/// The background schedule of one account.
#[derive(Default)]
struct Schedule {
    /// The last login that asked for a token: the account counts as in use for a while after.
    last_used: Option<Instant>,
    /// No background attempt before this (set while one runs and after a failure).
    not_before: Option<Instant>,
    /// The last refresh-token age warning, to repeat it at most twice a day.
    warned_at: Option<Instant>,
}

/// Everything that changes about one account's tokens, under one lock.
struct Slot {
    state: State,
    schedule: Schedule,
    /// Unix seconds of the last token request, whatever its outcome.
    last_refresh_at: Option<i64>,
}

/// What a caller does next, decided under the slot's lock.
enum Next {
    Done(Outcome),
    Wait(watch::Receiver<Option<Outcome>>),
    Lead(Flight),
}

/// The right (and duty) to refresh: its outcome ends `Pending`; dropped unfinished (the login
/// gave up), it restores the state before.
struct Flight {
    acct: Arc<AccountTokens>,
    id: u64,
    done: Option<watch::Sender<Option<Outcome>>>,
}

impl Flight {
    fn finish(mut self, next: State, outcome: &Outcome) {
        let mut slot = lock(&self.acct.slot);
        if matches!(slot.state, State::Pending { flight, .. } if flight == self.id) {
            slot.state = next;
        }
        slot.last_refresh_at = Some(now_unix());
        drop(slot);
        if let Some(done) = self.done.take() {
            done.send_replace(Some(outcome.clone()));
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if self.done.is_none() {
            return;
        }
        let mut slot = lock(&self.acct.slot);
        if let State::Pending { flight, .. } = &slot.state {
            if *flight == self.id {
                let State::Pending { previous, .. } =
                    std::mem::replace(&mut slot.state, State::Empty)
                else {
                    return;
                };
                slot.state = *previous;
            }
        }
    }
}

/// Where an account's access tokens come from.
enum Source {
    /// A stored refresh token and this OAuth client (or why there is none).
    RefreshToken(Result<OAuthClient, String>),
    /// Client credentials (Microsoft app-only): no user, no refresh token; one token serves
    /// every mailbox of the tenant.
    ClientCredentials(Result<OAuthClient, String>),
    /// A service account key (or why it is unusable: read again at the next attempt, so a
    /// fixed key file needs no restart), with the scope and token endpoint.
    ServiceAccount {
        path: PathBuf,
        key: Mutex<Result<Arc<ServiceAccount>, String>>,
        scope: String,
        token_url: String,
    },
}

impl Source {
    /// Whether a reloaded config gives an account the same token source, so its cached state
    /// is still good. Clients compare by everything they print plus the secret they redact.
    fn same_as(&self, other: &Source) -> bool {
        match (self, other) {
            (Source::RefreshToken(Ok(a)), Source::RefreshToken(Ok(b)))
            | (Source::ClientCredentials(Ok(a)), Source::ClientCredentials(Ok(b))) => {
                format!("{a:?}") == format!("{b:?}")
                    && a.client_secret.as_ref().map(Secret::expose)
                        == b.client_secret.as_ref().map(Secret::expose)
            }
            (
                Source::ServiceAccount {
                    path,
                    scope,
                    token_url,
                    ..
                },
                Source::ServiceAccount {
                    path: p,
                    scope: s,
                    token_url: t,
                    ..
                },
            ) => path == p && scope == s && token_url == t,
            _ => false,
        }
    }
}

struct AccountTokens {
    key: AccountKey,
    email: String,
    source: Source,
    slot: Mutex<Slot>,
    requests: AtomicU64,
    /// The last token an upstream rejected: on a shared store it may still be there (its
    /// removal is under way) and must not be taken for a fresh one.
    rejected: Mutex<Option<Secret>>,
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
    flights: AtomicU64,
    /// Per provider, why its token endpoint did not answer the last request (None: it did).
    endpoints: Mutex<HashMap<&'static str, Option<String>>>,
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
/// How long one process may hold an account's refresh lock on a shared store: a holder that
/// dies delays the others by at most this.
const REFRESH_LOCK_TTL: Duration = Duration::from_secs(10);
/// How often a process waiting for another's refresh looks for the token it stores.
const PEER_POLL: Duration = Duration::from_millis(50);
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

    /// The manager for a reloaded config: accounts whose token source did not change keep
    /// their state (a cached token, a refresh in flight, a known dead grant), so a reload
    /// costs no token requests; added or changed accounts start empty.
    pub fn reconfigured(
        &self,
        config: &Config,
        registry: Arc<Registry>,
    ) -> Result<TokenManager, String> {
        let old = &self.shared;
        let kept = |key: &AccountKey, source: &Source| {
            old.tokens
                .get(key)
                .filter(|acct| acct.source.same_as(source))
                .cloned()
        };
        let manager = Self::build_with(config, registry, old.status_dir.clone(), kept)?;
        let age = old.min_background_age_ms.load(Ordering::Relaxed);
        let shared = &manager.shared;
        shared.min_background_age_ms.store(age, Ordering::Relaxed);
        // Slots kept from the old manager may hold its flights: ids must stay unique.
        let next_flight = old.flights.load(Ordering::Relaxed) + (1 << 32);
        shared.flights.store(next_flight, Ordering::Relaxed);
        Ok(manager)
    }

    fn build(
        config: &Config,
        registry: Arc<Registry>,
        status_dir: Option<PathBuf>,
    ) -> Result<TokenManager, String> {
        Self::build_with(config, registry, status_dir, |_, _| None)
    }

    /// One `AccountTokens` per configured account: `kept` may hand back an existing one for
    /// the same key and source.
    fn build_with(
        config: &Config,
        registry: Arc<Registry>,
        status_dir: Option<PathBuf>,
        kept: impl Fn(&AccountKey, &Source) -> Option<Arc<AccountTokens>>,
    ) -> Result<TokenManager, String> {
        let tokens = account_tokens(config, kept);
        Ok(TokenManager {
            shared: Arc::new(Shared {
                http: token_endpoint::http_client()?,
                registry,
                tokens,
                status_dir,
                status_write: Mutex::new(()),
                wake: tokio::sync::Notify::new(),
                min_background_age_ms: AtomicU64::new(MIN_BACKGROUND_AGE.as_millis() as u64),
                flights: AtomicU64::new(0),
                endpoints: Mutex::new(HashMap::new()),
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

    /// Providers whose token endpoint did not answer its last request, with why.
    pub fn unanswered_endpoints(&self) -> Vec<String> {
        lock(&self.shared.endpoints)
            .iter()
            .filter_map(|(provider, problem)| {
                problem.as_ref().map(|p| {
                    format!("the {provider} token endpoint did not answer its last request: {p}")
                })
            })
            .collect()
    }

    /// What this process knows about its tokens now: expiry and last errors, nothing secret.
    pub fn status(&self) -> status::Status {
        self.shared.snapshot()
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
        lock(&acct.slot).schedule.last_used = Some(Instant::now());
        loop {
            let next = match acct.without_store() {
                Some(next) => next,
                None => {
                    let refresh_token = self.shared.refresh_token(acct)?;
                    acct.next(&refresh_token, &self.shared.flights)
                }
            };
            match next {
                Next::Done(outcome) => return outcome,
                Next::Lead(flight) => return self.shared.fly(flight, Want::Login).await,
                // A leader that gave up leaves no outcome: look again (and maybe lead).
                Next::Wait(mut done) => {
                    if let Ok(outcome) = done.wait_for(Option::is_some).await {
                        if let Some(outcome) = outcome.as_ref() {
                            return outcome.clone();
                        }
                    }
                }
            }
        }
    }

    /// The upstream rejected `token`: forget it so the next `get` refreshes.
    pub fn invalidate(&self, key: &AccountKey, token: &Arc<AccessToken>) {
        if let Some(acct) = self.shared.tokens.get(key) {
            let mut slot = lock(&acct.slot);
            if matches!(&slot.state, State::Active(t) if Arc::ptr_eq(t, token)) {
                slot.state = State::Empty;
            }
            drop(slot);
            *lock(&acct.rejected) = Some(token.token.clone());
            let peers = self.shared.registry.store().peers().cloned();
            if let (Some(peers), Ok(rt)) = (peers, tokio::runtime::Handle::try_current()) {
                let (key, token) = (key.clone(), token.token.clone());
                rt.spawn(async move { peers.drop_token(&key, &token).await });
            }
        }
    }

    /// Keep the tokens of accounts in use fresh until `cancel`, so logins do not wait on the
    /// token endpoint; also warn about refresh tokens near Google's 7-day Testing limit.
    pub fn spawn_refresher(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        for acct in shared.tokens.values() {
            let unusable = match &acct.source {
                Source::RefreshToken(Err(why)) | Source::ClientCredentials(Err(why)) => {
                    Some(why.clone())
                }
                Source::ServiceAccount { key, .. } => lock(key).as_ref().err().cloned(),
                _ => None,
            };
            if let Some(why) = unusable {
                tracing::warn!(account = %acct.email, "this account cannot get tokens: {why}");
            }
            if let Source::ServiceAccount { path, .. } = &acct.source {
                if let Some(why) = ServiceAccount::exposure(path) {
                    tracing::warn!(account = %acct.email, "{why}");
                }
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

impl AccountTokens {
    fn new(
        account: &crate::config::AccountConfig,
        source: Source,
        email: String,
    ) -> Arc<AccountTokens> {
        Arc::new(AccountTokens {
            key: account.key(),
            email,
            source,
            slot: Mutex::new(Slot {
                state: State::Empty,
                schedule: Schedule::default(),
                last_refresh_at: None,
            }),
            requests: Default::default(),
            rejected: Mutex::new(None),
        })
    }

    /// Whose tokens these are (service accounts are Google's).
    fn provider(&self) -> &'static dyn Provider {
        match &self.source {
            Source::RefreshToken(Ok(client)) | Source::ClientCredentials(Ok(client)) => {
                client.provider
            }
            _ => provider::default_provider(),
        }
    }

    /// The decisions that need no look at the store: a fresh token, or a refresh to wait for.
    fn without_store(&self) -> Option<Next> {
        match &lock(&self.slot).state {
            State::Active(t) if t.is_fresh(SystemTime::now()) => Some(Next::Done(Ok(t.clone()))),
            State::Pending { done, .. } if done.has_changed().is_ok() => {
                Some(Next::Wait(done.clone()))
            }
            _ => None,
        }
    }

    /// Decide with the store's refresh token in hand; leading moves the state to `Pending`.
    fn next(self: &Arc<Self>, refresh_token: &Option<Secret>, flights: &AtomicU64) -> Next {
        let mut slot = lock(&self.slot);
        match &slot.state {
            State::Active(t) if t.is_fresh(SystemTime::now()) => return Next::Done(Ok(t.clone())),
            // A leader that vanished without restoring the state is replaced.
            State::Pending { done, .. } if done.has_changed().is_ok() => {
                return Next::Wait(done.clone())
            }
            State::Failed { failure, .. } => {
                if let Some(error) = failure.holds(refresh_token, Instant::now()) {
                    return Next::Done(Err(error.clone()));
                }
            }
            State::Empty | State::Active(_) | State::Pending { .. } => {}
        }
        Next::Lead(self.take_off(&mut slot, flights))
    }

    fn take_off(self: &Arc<Self>, slot: &mut Slot, flights: &AtomicU64) -> Flight {
        let id = flights.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let previous = std::mem::replace(&mut slot.state, State::Empty);
        slot.state = State::Pending {
            flight: id,
            done: rx,
            previous: Box::new(previous),
        };
        Flight {
            acct: self.clone(),
            id,
            done: Some(tx),
        }
    }
}

impl Shared {
    fn refresh_token(&self, acct: &AccountTokens) -> Result<Option<Secret>, TokenError> {
        match &acct.source {
            Source::RefreshToken(_) => {
                self.registry
                    .refresh_token(&acct.key)
                    .map_err(|e| TokenError::Temporary {
                        email: acct.email.clone(),
                        detail: format!("cannot read the secret store: {e}"),
                        retry_after: None,
                    })
            }
            Source::ServiceAccount { .. } | Source::ClientCredentials(_) => Ok(None),
        }
    }

    /// Refresh as the flight's leader and move the state to the outcome.
    async fn fly(&self, flight: Flight, want: Want) -> Outcome {
        let acct = flight.acct.clone();
        let refresh_token = match self.refresh_token(&acct) {
            Ok(t) => t,
            Err(e) => {
                let next = self.failed_state(&acct, &e, None);
                let outcome = Err(e);
                flight.finish(next, &outcome);
                return outcome;
            }
        };
        let started = Instant::now();
        let (outcome, asked) = match self.registry.store().peers() {
            Some(peers) => self.refresh_shared(&acct, peers, &want).await,
            None => (self.refresh(&acct, refresh_token.clone()).await, true),
        };
        let result = match &outcome {
            _ if !asked => None,
            Ok(_) => Some("ok"),
            // Nothing to refresh with: no request was made.
            Err(TokenError::NeverAuthorized { .. }) => None,
            Err(TokenError::Revoked { .. }) => Some("revoked"),
            Err(TokenError::Misconfigured { .. }) => Some("misconfigured"),
            Err(TokenError::Temporary { .. }) => Some("temporary"),
        };
        if let Some(result) = result {
            crate::metrics::token_refresh(result, started.elapsed().as_secs_f64());
            self.note_endpoint(&acct, &outcome);
        }
        let next = match &outcome {
            Ok(token) => State::Active(token.clone()),
            Err(e) => self.failed_state(&acct, e, refresh_token),
        };
        flight.finish(next, &outcome);
        self.publish_status();
        if outcome.is_ok() {
            self.wake.notify_one();
        }
        outcome
    }

    /// Refresh with the processes sharing the store: take a token one of them stored, else
    /// take the account's lock and refresh for all. Returns the outcome and whether this
    /// process asked the token endpoint.
    async fn refresh_shared(
        &self,
        acct: &AccountTokens,
        peers: &Peers,
        want: &Want,
    ) -> (Outcome, bool) {
        // A holder that died is replaced after the lock's TTL; waiting twice that is enough.
        let deadline = Instant::now() + REFRESH_LOCK_TTL * 2;
        loop {
            match self.peers_token(acct, peers, want).await {
                Ok(Some(token)) => return (Ok(token), false),
                Ok(None) => {}
                Err(e) => return (Err(e), false),
            }
            match peers.try_lock(&acct.key, REFRESH_LOCK_TTL).await {
                Ok(Some(held)) => {
                    let out = self.refresh_locked(acct, peers, want).await;
                    peers.unlock(held).await;
                    return out;
                }
                Ok(None) if Instant::now() < deadline => tokio::time::sleep(PEER_POLL).await,
                Ok(None) => {
                    let error = TokenError::Temporary {
                        email: acct.email.clone(),
                        detail: "another proxy is refreshing the access token".into(),
                        retry_after: None,
                    };
                    return (Err(error), false);
                }
                Err(e) => return (Err(store_unavailable(acct, e)), false),
            }
        }
    }

    async fn refresh_locked(
        &self,
        acct: &AccountTokens,
        peers: &Peers,
        want: &Want,
    ) -> (Outcome, bool) {
        // Another process may have stored a token between the look and the lock.
        match self.peers_token(acct, peers, want).await {
            Ok(Some(token)) => return (Ok(token), false),
            Ok(None) => {}
            Err(e) => return (Err(e), false),
        }
        let refresh_token = match self.refresh_token(acct) {
            Ok(t) => t,
            Err(e) => return (Err(e), false),
        };
        let outcome = self.refresh(acct, refresh_token).await;
        if let Ok(t) = &outcome {
            let stored = SharedToken {
                token: t.token.clone(),
                obtained_at: t.obtained_at,
                expires_at: t.expires_at,
            };
            if let Err(e) = peers.put_token(&acct.key, &stored).await {
                tracing::warn!(account = %acct.email, error = %e, "cannot share the new access token");
            }
        }
        (outcome, true)
    }

    /// The token another process stored, if it serves what is wanted.
    async fn peers_token(
        &self,
        acct: &AccountTokens,
        peers: &Peers,
        want: &Want,
    ) -> Result<Option<Arc<AccessToken>>, TokenError> {
        let stored = peers
            .token(&acct.key)
            .await
            .map_err(|e| store_unavailable(acct, e))?;
        let token = stored.map(|t| AccessToken {
            token: t.token,
            expires_at: t.expires_at,
            obtained_at: t.obtained_at,
        });
        let rejected = lock(&acct.rejected).clone();
        Ok(token
            .filter(|t| want.accepts(t) && rejected.as_ref() != Some(&t.token))
            .map(Arc::new))
    }

    /// Remember whether the provider's token endpoint answered this request, for `/readyz`.
    fn note_endpoint(&self, acct: &AccountTokens, outcome: &Outcome) {
        let provider = acct.provider().id();
        let problem = match outcome {
            Err(TokenError::Temporary { detail, .. }) => Some(detail.clone()),
            _ => None,
        };
        lock(&self.endpoints).insert(provider, problem);
    }

    fn failed_state(
        &self,
        acct: &AccountTokens,
        error: &TokenError,
        refresh_token: Option<Secret>,
    ) -> State {
        let now = Instant::now();
        let failure = match error {
            TokenError::Temporary { retry_after, .. } => Failed::Temporary {
                error: error.clone(),
                until: now + retry_after.unwrap_or(TEMPORARY_HOLD),
            },
            _ => Failed::Revoked {
                error: error.clone(),
                refresh_token,
                until: match acct.source {
                    Source::ServiceAccount { .. } | Source::ClientCredentials(_) => {
                        Some(now + SERVICE_ACCOUNT_HOLD)
                    }
                    Source::RefreshToken(_) => None,
                },
            },
        };
        let last = match &lock(&acct.slot).state {
            State::Pending { previous, .. } => previous.last_token().cloned(),
            other => other.last_token().cloned(),
        };
        State::Failed { failure, last }
    }

    async fn refresh(
        &self,
        acct: &AccountTokens,
        refresh_token: Option<Secret>,
    ) -> Result<Arc<AccessToken>, TokenError> {
        let email = acct.email.as_str();
        let started = SystemTime::now();
        let (granted, wanted_scope) = self.grant(acct, &refresh_token).await?;
        let granted = granted.map_err(|e| {
            let e = match e {
                GrantError::Revoked(detail) => {
                    GrantError::Revoked(format!("{detail}{}", self.revoked_hint(acct)))
                }
                other => other,
            };
            let error = TokenError::from_grant(email, e);
            tracing::warn!(account = %email, error = %error, "token refresh failed");
            error
        })?;
        check_scope(email, &granted, wanted_scope, acct.provider().words().mail)?;
        self.save_rotated(acct, &granted, &refresh_token)?;
        let token = Arc::new(AccessToken {
            token: granted.access_token,
            expires_at: started + granted.expires_in,
            obtained_at: started,
        });
        tracing::info!(account = %email, expires_in = granted.expires_in.as_secs(), "access token refreshed");
        Ok(token)
    }

    /// Ask the token endpoint for this account's source; returns the answer and the scope
    /// the token must carry.
    async fn grant<'a>(
        &self,
        acct: &'a AccountTokens,
        refresh_token: &Option<Secret>,
    ) -> Result<(Result<Granted, GrantError>, &'a str), TokenError> {
        let email = acct.email.as_str();
        let misconfigured = |detail: &String| TokenError::Misconfigured {
            email: email.to_string(),
            detail: detail.clone(),
        };
        match &acct.source {
            Source::RefreshToken(client) => {
                let client = client.as_ref().map_err(misconfigured)?;
                let Some(refresh_token) = refresh_token else {
                    return Err(TokenError::NeverAuthorized {
                        email: email.to_string(),
                    });
                };
                acct.requests.fetch_add(1, Ordering::Relaxed);
                let provider = client.provider;
                let granted = token_endpoint::refresh(&self.http, client, refresh_token, |r| {
                    provider.refresh_refusal(r)
                })
                .await;
                Ok((granted, client.scope.as_str()))
            }
            Source::ClientCredentials(client) => {
                let client = client.as_ref().map_err(misconfigured)?;
                acct.requests.fetch_add(1, Ordering::Relaxed);
                Ok((client_credentials(&self.http, client).await, ""))
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
                let granted = sa.fetch(&self.http, email, scope, token_url).await;
                Ok((granted, scope.as_str()))
            }
        }
    }

    /// A rotated refresh token is saved before the new access token is used: if saving
    /// fails we would lose the only valid grant.
    fn save_rotated(
        &self,
        acct: &AccountTokens,
        granted: &Granted,
        old: &Option<Secret>,
    ) -> Result<(), TokenError> {
        let (Some(rotated), Some(old)) = (&granted.refresh_token, old) else {
            return Ok(());
        };
        if rotated == old {
            return Ok(());
        }
        crate::registry::rotate_refresh_token(self.registry.store(), &acct.key, rotated).map_err(
            |e| TokenError::Temporary {
                email: acct.email.clone(),
                detail: format!("cannot save the rotated refresh token: {e}"),
                retry_after: None,
            },
        )
    }

    /// What the provider can tell about why a refresh token of this age was refused.
    fn revoked_hint(&self, acct: &AccountTokens) -> String {
        let obtained = self.registry.current().ok().and_then(|d| {
            d.account(&acct.key)
                .and_then(|a| a.refresh_token_obtained_at)
        });
        obtained
            .and_then(|at| acct.provider().revoked_hint(at, now_unix()))
            .map(|hint| format!("; {hint}"))
            .unwrap_or_default()
    }

    /// One look at every account: start the background refreshes that are due, warn about old
    /// refresh tokens, and return when to look again.
    fn background_pass(self: &Arc<Self>) -> Instant {
        let now = Instant::now();
        let min_age = Duration::from_millis(self.min_background_age_ms.load(Ordering::Relaxed));
        let mut next = now + REFRESHER_TICK;
        let data = self.registry.current().ok();
        for acct in self.tokens.values() {
            if let Some(data) = &data {
                self.warn_about_age(acct, data, now);
            }
            match acct.background_due(now, min_age) {
                Ok(token) => {
                    let shared = self.clone();
                    let acct = acct.clone();
                    tokio::spawn(async move { shared.refresh_ahead(acct, token).await });
                }
                Err(Some(due)) => next = next.min(due),
                Err(None) => {}
            }
        }
        next
    }

    async fn refresh_ahead(&self, acct: Arc<AccountTokens>, seen: Arc<AccessToken>) {
        let Ok(refresh_token) = self.refresh_token(&acct) else {
            return;
        };
        let flight = {
            let mut slot = lock(&acct.slot);
            // A login refreshed (or dropped) it meanwhile, one is refreshing now, or the last
            // refusal still answers for this refresh token.
            let due = match &slot.state {
                State::Active(t) => Arc::ptr_eq(t, &seen),
                State::Failed { last, failure } => {
                    last.as_ref().is_some_and(|t| Arc::ptr_eq(t, &seen))
                        && failure.holds(&refresh_token, Instant::now()).is_none()
                }
                State::Empty | State::Pending { .. } => false,
            };
            if !due {
                return;
            }
            acct.take_off(&mut slot, &self.flights)
        };
        tracing::debug!(account = %acct.email, "refreshing the access token ahead of expiry");
        let min_age = Duration::from_millis(self.min_background_age_ms.load(Ordering::Relaxed));
        if self.fly(flight, Want::Ahead(min_age)).await.is_ok() {
            lock(&acct.slot).schedule.not_before = None;
        }
    }

    fn warn_about_age(&self, acct: &AccountTokens, data: &crate::store::StoreData, now: Instant) {
        let Some(secrets) = data.account(&acct.key) else {
            return;
        };
        let google = acct.provider().id() == provider::default_provider().id();
        if secrets.refresh_token.is_none()
            || !matches!(acct.source, Source::RefreshToken(_))
            || !google
        {
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
        let mut slot = lock(&acct.slot);
        let schedule = &mut slot.schedule;
        if schedule
            .warned_at
            .is_some_and(|w| now.duration_since(w) < WARN_EVERY)
        {
            return;
        }
        schedule.warned_at = Some(now);
        tracing::warn!(account = %acct.email, "{text}");
    }

    /// Publish what this process knows about its tokens (only for `serve`).
    fn publish_status(&self) {
        let Some(dir) = &self.status_dir else {
            return;
        };
        let _serial = lock(&self.status_write);
        status::write(dir, &self.snapshot());
    }

    /// What this process knows about its tokens now (nothing secret).
    fn snapshot(&self) -> status::Status {
        status::Status {
            pid: std::process::id(),
            updated_at: now_unix(),
            accounts: self
                .tokens
                .iter()
                .map(|(k, a)| {
                    let slot = lock(&a.slot);
                    (k.to_string(), slot.state.status(slot.last_refresh_at))
                })
                .collect(),
        }
    }
}

impl AccountTokens {
    /// The token the background refresher should replace now, or when to look again (None:
    /// nothing to do for this account).
    fn background_due(
        &self,
        now: Instant,
        min_age: Duration,
    ) -> Result<Arc<AccessToken>, Option<Instant>> {
        let wall = SystemTime::now();
        let mut slot = lock(&self.slot);
        let token = match &slot.state {
            State::Active(t) => t.clone(),
            State::Failed { last: Some(t), .. } => t.clone(),
            _ => return Err(None),
        };
        let schedule = &mut slot.schedule;
        if schedule
            .last_used
            .is_none_or(|u| now.duration_since(u) >= IN_USE)
        {
            return Err(None);
        }
        let mut due = now
            + token
                .background_due(min_age)
                .duration_since(wall)
                .unwrap_or_default();
        if let Some(not_before) = schedule.not_before {
            due = due.max(not_before);
        }
        if due > now {
            return Err(Some(due));
        }
        schedule.not_before = Some(now + BACKGROUND_RETRY);
        Ok(token)
    }
}

/// Each configured account's token state; app-only accounts of one app in one tenant share
/// one token (and its state).
/// `kept` may hand back an existing one for the same key and source (a reload).
fn account_tokens(
    config: &Config,
    kept: impl Fn(&AccountKey, &Source) -> Option<Arc<AccountTokens>>,
) -> HashMap<AccountKey, Arc<AccountTokens>> {
    let mut tokens = HashMap::new();
    let mut app_tokens: HashMap<(String, String), Arc<AccountTokens>> = HashMap::new();
    for a in &config.accounts {
        let (source, email) = match &a.service_account_key {
            Some(path) => (
                Source::ServiceAccount {
                    path: path.clone(),
                    key: Mutex::new(ServiceAccount::load(path).map(Arc::new)),
                    scope: config.google.scope.clone(),
                    token_url: config.google.token_url.clone(),
                },
                a.email.clone(),
            ),
            None if a.app_only => {
                let client = config.oauth_client(a);
                let shared_by = client
                    .as_ref()
                    .map(|c| (c.token_url.clone(), c.client_id.clone()))
                    .ok();
                if let Some(acct) = shared_by.as_ref().and_then(|k| app_tokens.get(k)) {
                    tokens.insert(a.key(), acct.clone());
                    continue;
                }
                let source = Source::ClientCredentials(client);
                let acct = kept(&a.key(), &source).unwrap_or_else(|| {
                    AccountTokens::new(a, source, format!("app-only ({})", config.microsoft.tenant))
                });
                if let Some(k) = shared_by {
                    app_tokens.insert(k, acct.clone());
                }
                tokens.insert(a.key(), acct);
                continue;
            }
            None => (
                Source::RefreshToken(config.oauth_client(a)),
                a.email.clone(),
            ),
        };
        let acct = kept(&a.key(), &source).unwrap_or_else(|| AccountTokens::new(a, source, email));
        tokens.insert(a.key(), acct);
    }
    tokens
}

/// The grant must carry the mail scope, or logins would fail upstream with a token that
/// refreshes fine.
fn check_scope(email: &str, granted: &Granted, wanted: &str, mail: &str) -> Result<(), TokenError> {
    match &granted.scope {
        Some(scope) if !crate::config::scope_covered(wanted, scope) => {
            let error = TokenError::Revoked {
                email: email.to_string(),
                detail: format!(
                    "the authorization does not include {wanted} (granted: {scope}); authorize again and allow access to {mail}"
                ),
            };
            tracing::warn!(account = %email, error = %error, "token refresh failed");
            Err(error)
        }
        _ => Ok(()),
    }
}

/// What a refresh is for: a login needs a fresh token; a refresh ahead of expiry needs one
/// not yet due for that.
enum Want {
    Login,
    Ahead(Duration),
}

impl Want {
    fn accepts(&self, token: &AccessToken) -> bool {
        let now = SystemTime::now();
        match self {
            Want::Login => token.is_fresh(now),
            Want::Ahead(min_age) => now < token.background_due(*min_age),
        }
    }
}

/// A shared store that did not answer: the reply names no address (the outage itself is
/// logged once, where it is noticed).
fn store_unavailable(acct: &AccountTokens, e: impl std::fmt::Display) -> TokenError {
    tracing::debug!(account = %acct.email, error = %e, "shared store");
    TokenError::Temporary {
        email: acct.email.clone(),
        detail: "the proxy's shared store is unreachable".into(),
        retry_after: None,
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

/// The client credentials grant (RFC 6749 §4.4) with the client's scope.
async fn client_credentials(
    http: &reqwest::Client,
    client: &OAuthClient,
) -> Result<Granted, GrantError> {
    let Some(secret) = &client.client_secret else {
        return Err(GrantError::Client(
            "client credentials need a client_secret".into(),
        ));
    };
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", client.client_id.as_str()),
        ("client_secret", secret.expose()),
        ("scope", client.scope.as_str()),
    ];
    let provider = client.provider;
    token_endpoint::token_request(http, &client.token_url, &form)
        .await
        .map_err(|e| e.into_grant_error(|r| provider.refresh_refusal(r)))
}

/// `import`: check a refresh token with one refresh; returns the verified grant.
pub async fn verify_refresh_token(
    client: &OAuthClient,
    refresh_token: &Secret,
) -> Result<Granted, GrantError> {
    let http = token_endpoint::http_client().map_err(|detail| GrantError::Temporary {
        detail,
        retry_after: None,
    })?;
    let provider = client.provider;
    token_endpoint::refresh(&http, client, refresh_token, |r| {
        provider.refresh_refusal(r)
    })
    .await
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
        let e = TokenError::NeverAuthorized {
            email: "a@x.com".into(),
        };
        assert_eq!(
            e.with_advice(),
            "not authorized yet; run `xoauth2-proxy login a@x.com`"
        );
    }
}

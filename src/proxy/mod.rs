//! The running proxy: what all connections share ([`App`]), the listening side (`server`), one
//! connection driver for every protocol (`session` with a dialect each), the upstream side, and
//! the splice with its buffer pool. `serve` takes already-bound listeners and a shutdown future,
//! so tests run the real thing on port 0.

mod imap;
pub mod login;
mod origin;
mod pool;
mod pop3;
mod reload;
mod server;
mod session;
mod smtp;
mod splice;
pub mod stream;
pub mod throttle;
pub mod upstream;

pub use server::{bind, raise_fd_limit, serve, BoundListener, Server};
pub(crate) use server::{refuse_busy, tune};
pub use splice::splice;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::account::AccountKey;
use crate::accounts::Accounts;
use crate::config::{AccountConfig, Config, ListenerConfig};
use crate::oauth::TokenManager;
use crate::registry::Registry;
use crate::store::peers::{Lease, Peers};
use crate::store::Store;
use login::Failure;

/// Everything shared by all connections.
pub struct App {
    pub config: Config,
    /// The configured accounts and their secrets.
    pub registry: Arc<Registry>,
    /// Local password checks.
    pub accounts: Arc<Accounts>,
    pub tokens: TokenManager,
    /// Kept across config reloads, like the IMAP slots: a reload must not forgive guessers.
    pub throttle: Arc<throttle::Throttle>,
    /// Per account, a pause before the next upstream login that a server asked for; kept
    /// across reloads.
    pub backoff: Arc<upstream::Backoff>,
    /// Per account, the upstream IMAP sessions it may still open.
    imap_slots: Arc<ImapSlots>,
    /// Recent logins and open sessions, for the status page; kept across reloads.
    pub activity: Arc<crate::activity::Activity>,
}

type ImapSlots = std::sync::Mutex<std::collections::HashMap<AccountKey, Arc<Semaphore>>>;

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl App {
    pub fn new(config: Config) -> Result<Arc<App>, String> {
        let store = Store::open(&config.state_dir, &config.store).map_err(|e| e.to_string())?;
        let registry = Arc::new(Registry::new(&config, store).map_err(|e| e.to_string())?);
        let accounts = Arc::new(Accounts::new(registry.clone()).map_err(|e| e.to_string())?);
        let tokens = TokenManager::new(&config, registry.clone())?;
        Ok(Arc::new(App {
            config,
            registry,
            accounts,
            tokens,
            throttle: Default::default(),
            backoff: Default::default(),
            imap_slots: Default::default(),
            activity: Default::default(),
        }))
    }

    /// The next generation for a reloaded config. What protects users outlives the reload:
    /// brute-force counts, the per-account IMAP caps (unless the cap itself changed), cached
    /// tokens of unchanged accounts, verified passwords. Open sessions keep the generation
    /// they started with.
    pub fn reconfigured(&self, config: Config) -> Result<Arc<App>, String> {
        // The same store stays open: on Redis its connections, change listener and the leases
        // of open sessions (renewed by the server) carry over.
        let store =
            if config.store == self.config.store && config.state_dir == self.config.state_dir {
                self.registry.store().clone()
            } else {
                Store::open(&config.state_dir, &config.store).map_err(|e| e.to_string())?
            };
        let registry = Arc::new(Registry::new(&config, store).map_err(|e| e.to_string())?);
        let accounts = Arc::new(self.accounts.reconfigured(registry.clone()));
        let tokens = self.tokens.reconfigured(&config, registry.clone())?;
        let same_cap = config.limits.imap_connections_per_account
            == self.config.limits.imap_connections_per_account;
        Ok(Arc::new(App {
            registry,
            accounts,
            tokens,
            throttle: self.throttle.clone(),
            backoff: self.backoff.clone(),
            activity: self.activity.clone(),
            imap_slots: if same_cap {
                self.imap_slots.clone()
            } else {
                Default::default()
            },
            config,
        }))
    }

    /// Reserve one of the account's upstream IMAP sessions, waiting briefly if none is free.
    /// On a shared store the sessions of every proxy count.
    pub async fn imap_slot(&self, account: &AccountConfig) -> Result<ImapSlot, Failure> {
        let limits = &self.config.limits;
        let cap = limits.imap_sessions(account.provider);
        let full = || Failure::TooManySessions {
            email: account.email.clone(),
            limit: cap,
        };
        let key = account.key();
        if let Some(peers) = self.registry.store().peers() {
            return leased_slot(peers, &key, cap, limits)
                .await?
                .ok_or_else(full);
        }
        let slots = self
            .imap_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(cap)))
            .clone();
        match tokio::time::timeout(limits.imap_slot_wait, slots.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(ImapSlot {
                _permit: Some(permit),
                _lease: None,
            }),
            _ => Err(full()),
        }
    }
}

/// A leased slot from the shared count, polling until `imap_slot_wait` has passed.
async fn leased_slot(
    peers: &Peers,
    key: &AccountKey,
    cap: usize,
    limits: &crate::config::Limits,
) -> Result<Option<ImapSlot>, Failure> {
    let deadline = tokio::time::Instant::now() + limits.imap_slot_wait;
    loop {
        let lease = peers.try_lease(key, cap).await.map_err(|e| {
            tracing::debug!(error = %e, "cannot count the account's IMAP sessions");
            login::store_unreachable()
        })?;
        if let Some(lease) = lease {
            return Ok(Some(ImapSlot {
                _permit: None,
                _lease: Some(lease),
            }));
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        tokio::time::sleep_until(deadline.min(now + SLOT_POLL)).await;
    }
}

/// How often a login waiting for a shared IMAP slot looks again.
const SLOT_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// One of an account's upstream IMAP sessions, held while the session lasts.
pub struct ImapSlot {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    _lease: Option<Lease>,
}

/// One listener's settings and TLS material, shared by its connections.
pub struct ListenerCtx {
    pub config: ListenerConfig,
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    pub upstream_tls: Arc<rustls::ClientConfig>,
    pub upstream_capabilities: KnownCapabilities,
}

/// What the listener's upstream offered at its last login (SMTP EHLO extensions, POP3 CAPA
/// lines), so that answers before login promise what holds without connecting for strangers.
#[derive(Default)]
pub struct KnownCapabilities(std::sync::Mutex<Option<Arc<[String]>>>);

impl KnownCapabilities {
    pub fn get(&self) -> Option<Arc<[String]>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, lines: Vec<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(lines.into());
    }
}

/// One client connection's context.
pub struct Conn {
    pub app: Arc<App>,
    pub ctx: Arc<ListenerCtx>,
    pub peer: SocketAddr,
}

//! The running proxy: what all connections share ([`App`]), the listening side (`server`), one
//! connection driver for every protocol (`session` with a dialect each), the upstream side, and
//! the splice with its buffer pool. `serve` takes already-bound listeners and a shutdown future,
//! so tests run the real thing on port 0.

mod imap;
pub mod login;
mod origin;
mod pool;
mod pop3;
mod server;
mod session;
mod smtp;
mod splice;
pub mod stream;
pub mod throttle;
pub mod upstream;

pub use server::{bind, raise_fd_limit, serve, BoundListener};
pub(crate) use server::{refuse_busy, tune};
pub use splice::splice;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::account::AccountKey;
use crate::accounts::Accounts;
use crate::config::{Config, ListenerConfig};
use crate::oauth::TokenManager;
use crate::registry::Registry;
use crate::store::Store;

/// Everything shared by all connections.
pub struct App {
    pub config: Config,
    /// The configured accounts and their secrets.
    pub registry: Arc<Registry>,
    /// Local password checks.
    pub accounts: Arc<Accounts>,
    pub tokens: TokenManager,
    pub throttle: throttle::Throttle,
    /// Per account, a pause before the next upstream login that a server asked for.
    pub backoff: upstream::Backoff,
    /// Per account, the upstream IMAP sessions it may still open.
    imap_slots: std::sync::Mutex<std::collections::HashMap<AccountKey, Arc<Semaphore>>>,
}

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
        }))
    }

    /// Reserve one of the account's upstream IMAP sessions, if it has one left.
    pub fn imap_slot(&self, key: &AccountKey) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let limit = self.config.limits.imap_connections_per_account;
        let slots = self
            .imap_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(limit)))
            .clone();
        slots.try_acquire_owned().ok()
    }
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

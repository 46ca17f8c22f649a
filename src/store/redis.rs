//! The shared backend: one Redis (or Valkey) that every proxy process and CLI command of a
//! deployment talks to. Redis holds only ciphertext (sealed with the master key) and key names.
//!
//! Layout under the configured prefix `P`:
//! - `P:store`: the sealed [`StoreData`]; `P:version`: its version, bumped by every write, which
//!   is a compare-and-set (a Lua script) so concurrent writers never lose an update;
//! - `P:changed`: the channel every write publishes on; each process's listener bumps its
//!   generation on a message (and after every reconnect), which is what [`Backend::stamp`]
//!   returns, so the check on every login is a memory read;
//! - `P:token:ACCOUNT`, `P:lock:ACCOUNT`, `P:imap:ACCOUNT`, `P:fail:…`: see [`Peers`].
//!
//! The sync [`Backend`] calls run on a small runtime of the backend's own thread, so they work
//! from command-line code and from inside the proxy's runtime alike.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::AsyncCommands;
use futures_util::StreamExt;
use zeroize::Zeroizing;

use super::key::{MasterKey, Unsealed};
use super::peers::Peers;
use super::{Backend, Change, Stamp, StoreData, StoreError};

const STORE_MAGIC: &[u8; 8] = b"XO2PRS01";
/// How long one Redis round trip may take before the store counts as unreachable.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnect backoff of the change listener.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the listener checks that Redis still answers.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// Concurrent writers retry their compare-and-set at most this often before giving up.
const CAS_TRIES: usize = 100;

/// Set the data only if the version is still the one it was read at; bump and announce it.
const CAS_LUA: &str = r"
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3], v)
return 1";
static CAS: LazyLock<::redis::Script> = LazyLock::new(|| ::redis::Script::new(CAS_LUA));

/// What the backend and [`Peers`] both use: the connection, the key and the names.
pub(crate) struct Inner {
    pub(crate) key: MasterKey,
    pub(crate) prefix: String,
    client: ::redis::Client,
    /// The connection of the backend's own thread (sync calls, the listener's probe).
    conn: ConnectionManager,
    /// Bumped on every change notice and reconnect of the listener.
    generation: AtomicU64,
    /// Whether the change listener is subscribed (false while Redis is unreachable).
    up: AtomicBool,
    /// Why Redis is unreachable, while it is.
    outage: Mutex<Option<String>>,
    where_: String,
}

impl Inner {
    pub(crate) fn name(&self, what: &str) -> String {
        format!("{}:{what}", self.prefix)
    }

    /// Why the store cannot be used now, if it cannot.
    pub(crate) fn outage(&self) -> Option<String> {
        if self.up.load(Ordering::Acquire) {
            return None;
        }
        let why = lock(&self.outage).clone();
        Some(why.unwrap_or_else(|| "not connected yet".into()))
    }

    pub(crate) fn unavailable(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("{}: {e}", self.where_))
    }

    /// One Redis operation with a bound on its wait.
    pub(crate) async fn op<T>(
        &self,
        fut: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(OP_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(e)),
            Err(_) => Err(self.unavailable("no answer in time")),
        }
    }

    /// A new connection, driven by the runtime this is called on.
    pub(crate) async fn connect(&self) -> Result<ConnectionManager, StoreError> {
        let made = self
            .client
            .get_connection_manager_with_config(manager_config());
        self.op(made).await
    }

    fn set_up(&self, up: bool, why: Option<String>) {
        let was = self.up.swap(up, Ordering::AcqRel);
        *lock(&self.outage) = why.clone();
        match (was, up) {
            (true, false) => tracing::warn!(
                store = %self.where_,
                error = %why.unwrap_or_default(),
                "the Redis store is unreachable: new logins get a temporary failure until it is back"
            ),
            (false, true) => tracing::info!(store = %self.where_, "the Redis store is reachable"),
            _ => {}
        }
    }
}

/// The Redis backend: the sync face of [`Inner`] for the store seam.
pub struct RedisBackend {
    inner: Arc<Inner>,
    worker: Worker,
}

/// A thread running a small runtime for the sync calls and the change listener; stopped
/// (and the listener with it) when the backend is dropped.
struct Worker {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Worker {
    fn start() -> Result<Worker, StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Other(format!("cannot start the Redis client: {e}")))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("redis-store".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                })
            })
            .map_err(|e| StoreError::Other(format!("cannot start the Redis client: {e}")))?;
        Ok(Worker {
            handle,
            stop: Some(stop),
        })
    }

    /// Run `fut` on the worker and wait for it (from sync code, inside a runtime or not).
    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(OP_TIMEOUT * 2).map_err(|_| {
            StoreError::Unavailable("the Redis client did not answer in time".into())
        })?
    }
}

impl RedisBackend {
    /// Connect, subscribe to change notices, and keep listening (reconnecting) until dropped.
    pub fn open(url: &str, prefix: &str, key: MasterKey) -> Result<RedisBackend, StoreError> {
        // rediss:// needs a process-wide rustls provider; the program's own TLS names its own.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let where_ = redacted(url);
        let client = ::redis::Client::open(url)
            .map_err(|e| StoreError::Other(format!("[store] url {where_}: {e}")))?;
        let worker = Worker::start()?;
        let (c, w) = (client.clone(), where_.clone());
        let conn = worker.block(async move {
            tokio::time::timeout(
                OP_TIMEOUT,
                c.get_connection_manager_with_config(manager_config()),
            )
            .await
            .map_err(|_| StoreError::Unavailable(format!("{w}: no answer in time")))?
            .map_err(|e| StoreError::Unavailable(format!("{w}: {e}")))
        })?;
        let inner = Arc::new(Inner {
            key,
            prefix: prefix.to_string(),
            client: client.clone(),
            conn,
            generation: AtomicU64::new(0),
            up: AtomicBool::new(false),
            outage: Mutex::new(None),
            where_,
        });
        let (subscribed, ready) = tokio::sync::oneshot::channel();
        worker
            .handle
            .spawn(listen(client, inner.clone(), subscribed));
        let _ =
            worker.block(async move { ready.await.map_err(|_| StoreError::Other(String::new())) });
        if let Some(why) = inner.outage() {
            return Err(StoreError::Unavailable(format!("{}: {why}", inner.where_)));
        }
        Ok(RedisBackend { inner, worker })
    }

    /// Access tokens, refresh locks and leased counts on the same Redis.
    pub fn peers(&self) -> Peers {
        Peers::new(self.inner.clone())
    }

    async fn read(inner: Arc<Inner>) -> Result<(Option<Vec<u8>>, String), StoreError> {
        let mut conn = inner.conn.clone();
        let keys = [inner.name("store"), inner.name("version")];
        let (data, version): (Option<Vec<u8>>, Option<String>) = inner.op(conn.mget(&keys)).await?;
        Ok((data, version.unwrap_or_default()))
    }

    fn decode(&self, sealed: Option<Vec<u8>>) -> Result<StoreData, StoreError> {
        let Some(sealed) = sealed else {
            return Ok(StoreData::default());
        };
        let what = || self.inner.where_.clone().into();
        let plain = self
            .inner
            .key
            .open(STORE_MAGIC, &sealed)
            .map_err(|e| match e {
                Unsealed::Format => StoreError::Format { path: what() },
                Unsealed::Decrypt => StoreError::Decrypt { path: what() },
            })?;
        serde_json::from_slice(&plain).map_err(|_| StoreError::Format { path: what() })
    }

    fn stamp_now(&self) -> Stamp {
        Stamp::new(self.inner.generation.load(Ordering::Acquire), 0, 0)
    }

    /// Write `sealed` if the version is still `version`; false if another writer came first.
    fn compare_and_set(&self, version: String, sealed: Vec<u8>) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        self.worker.block(async move {
            let mut conn = inner.conn.clone();
            let mut call = CAS.prepare_invoke();
            call.key(inner.name("store"))
                .key(inner.name("version"))
                .arg(version)
                .arg(sealed)
                .arg(inner.name("changed"));
            let done: i64 = inner.op(call.invoke_async(&mut conn)).await?;
            Ok(done == 1)
        })
    }
}

impl Backend for RedisBackend {
    fn describe(&self) -> String {
        format!("the Redis store at {}", self.inner.where_)
    }

    fn stamp(&self) -> Result<Option<Stamp>, StoreError> {
        match self.inner.outage() {
            Some(why) => Err(self.inner.unavailable(why)),
            None => Ok(Some(self.stamp_now())),
        }
    }

    fn load(&self) -> Result<(StoreData, Option<Stamp>), StoreError> {
        // The stamp is taken before the read: a change landing meanwhile bumps it again.
        let stamp = self.stamp_now();
        let (sealed, _) = self.worker.block(Self::read(self.inner.clone()))?;
        Ok((self.decode(sealed)?, Some(stamp)))
    }

    fn update(&self, change: Change<'_>) -> Result<(), StoreError> {
        for _ in 0..CAS_TRIES {
            let (sealed, version) = self.worker.block(Self::read(self.inner.clone()))?;
            let mut data = self.decode(sealed)?;
            change(&mut data)?;
            let plain = Zeroizing::new(
                serde_json::to_vec(&data)
                    .map_err(|e| StoreError::Other(format!("encoding store: {e}")))?,
            );
            let sealed = self.inner.key.seal(STORE_MAGIC, &plain)?;
            if self.compare_and_set(version, sealed)? {
                // This process sees its own write at once, whatever the notice's delay.
                self.inner.generation.fetch_add(1, Ordering::AcqRel);
                return Ok(());
            }
        }
        Err(StoreError::Other(format!(
            "{}: too many concurrent writers; try again",
            self.inner.where_
        )))
    }
}

/// Keep subscribed to change notices: bump the generation on each, and after every
/// (re)subscription, since notices sent while disconnected are lost.
async fn listen(
    client: ::redis::Client,
    inner: Arc<Inner>,
    subscribed: tokio::sync::oneshot::Sender<()>,
) {
    let mut subscribed = Some(subscribed);
    let mut backoff = BACKOFF_MIN;
    loop {
        let channel = inner.name("changed");
        let connected = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        };
        let why = match tokio::time::timeout(OP_TIMEOUT, connected).await {
            Ok(Ok(pubsub)) => {
                inner.generation.fetch_add(1, Ordering::AcqRel);
                inner.set_up(true, None);
                backoff = BACKOFF_MIN;
                if let Some(s) = subscribed.take() {
                    let _ = s.send(());
                }
                follow(&inner, pubsub.into_on_message()).await
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer in time".to_string(),
        };
        inner.set_up(false, Some(why));
        if let Some(s) = subscribed.take() {
            let _ = s.send(());
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Bump the generation on every notice until the subscription ends, or Redis stops answering
/// (a partition leaves the subscription's socket open and silent); returns why it ended.
async fn follow(inner: &Inner, mut messages: ::redis::aio::PubSubStream) -> String {
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(_) => {
                    inner.generation.fetch_add(1, Ordering::AcqRel);
                }
                None => return "the connection was closed".into(),
            },
            _ = probe.tick() => {
                let mut conn = inner.conn.clone();
                let ping = ::redis::cmd("PING");
                if let Err(e) = inner.op(ping.query_async::<()>(&mut conn)).await {
                    return e.to_string();
                }
            }
        }
    }
}

/// Every connection's bounds: an unreachable Redis is noticed within seconds, and the manager
/// reconnects by itself.
fn manager_config() -> ::redis::aio::ConnectionManagerConfig {
    ::redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(OP_TIMEOUT))
        .set_response_timeout(Some(OP_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
}

/// The URL without its password, for messages.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(an unparsable URL)".into(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

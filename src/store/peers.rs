//! What the proxies on one Redis share besides the store's data, so that they act as one:
//! - `P:token:ACCOUNT`: the account's access token, sealed, expiring with the token;
//! - `P:lock:ACCOUNT`: the right to refresh it (SET NX PX, released by compare-and-delete), so
//!   one process asks the token endpoint while the others wait for the token it stores;
//! - `P:imap:ACCOUNT`: the account's upstream IMAP sessions, a sorted set of session ids
//!   scored by lease end; each process renews its own, so a killed one's lapse by themselves;
//! - `P:fail:WHAT`: failed-login counts, for the brute-force throttle.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::ConnectionManager;
use ::redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::redis::Inner;
use super::StoreError;
use crate::account::AccountKey;
use crate::secret::Secret;

const TOKEN_MAGIC: &[u8; 8] = b"XO2PAT01";
/// A lease on an IMAP session slot lasts this long unless renewed.
pub const LEASE: Duration = Duration::from_secs(30);
/// Leases are renewed this often (several renewals fit in one lease).
pub const RENEW_EVERY: Duration = Duration::from_secs(10);

/// Delete the key only if it still holds this holder's value.
const COMPARE_AND_DELETE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// Drop lapsed leases, then take one if fewer than the cap are held.
const TAKE_LEASE_LUA: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1";

/// Extend the leases of sessions still open here; one that lapsed (Redis was unreachable
/// longer than a lease) is added back, since its session still counts at Gmail.
const RENEW_LEASES_LUA: &str = r"
local t = redis.call('TIME')
local until_ = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], until_, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return 1";

// Each script is hashed once: it is sent by its SHA1, and loaded only when Redis lacks it.
static COMPARE_AND_DELETE: LazyLock<Script> = LazyLock::new(|| Script::new(COMPARE_AND_DELETE_LUA));
static TAKE_LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(TAKE_LEASE_LUA));
static RENEW_LEASES: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LEASES_LUA));

/// An access token as stored: bound to its account, so a swapped record is refused.
#[derive(Serialize, Deserialize)]
struct TokenRecord {
    account: String,
    token: Secret,
    /// Unix milliseconds.
    obtained_at: u64,
    expires_at: u64,
}

/// An access token another process (or this one) stored.
#[derive(Debug, Clone)]
pub struct SharedToken {
    pub token: Secret,
    pub obtained_at: SystemTime,
    pub expires_at: SystemTime,
}

/// Cross-process coordination on the Redis store; cheap to clone.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Inner>,
    /// This process's connection for coordination, made on first use by the runtime that
    /// uses it (the proxy's), so a login's round trip needs no hop through another thread.
    conn: Arc<tokio::sync::OnceCell<ConnectionManager>>,
    /// Lease ids this process holds, per sorted-set key, for the renewer.
    leases: Arc<Mutex<HashSet<(String, String)>>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Peers(redis)")
    }
}

/// The right to refresh one account's token; give it back with [`Peers::unlock`]. If the
/// holder dies, the lock lapses after its TTL.
#[derive(Debug)]
pub struct RefreshLock {
    key: String,
    holder: String,
}

/// One leased IMAP session slot; released when dropped (or, if the process dies, when the
/// lease lapses).
pub struct Lease {
    peers: Peers,
    set: String,
    id: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let peers = self.peers.clone();
        let entry = (std::mem::take(&mut self.set), std::mem::take(&mut self.id));
        lock(&peers.leases).remove(&entry);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let Ok(mut conn) = peers.conn().await else {
                return;
            };
            let _: Result<i64, _> = peers.inner.op(conn.zrem(&entry.0, &entry.1)).await;
        });
    }
}

impl Peers {
    pub(crate) fn new(inner: Arc<Inner>) -> Peers {
        Peers {
            inner,
            conn: Default::default(),
            leases: Default::default(),
        }
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        let conn = self.conn.get_or_try_init(|| self.inner.connect()).await?;
        Ok(conn.clone())
    }

    /// Why Redis cannot be used now, if it cannot (for `/readyz`).
    pub fn outage(&self) -> Option<String> {
        self.inner.outage()
    }

    /// The stored access token of the account, if there is a live one.
    pub async fn token(&self, account: &AccountKey) -> Result<Option<SharedToken>, StoreError> {
        let mut conn = self.conn().await?;
        let name = self.inner.name(&format!("token:{account}"));
        let sealed: Option<Vec<u8>> = self.inner.op(conn.get(&name)).await?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        // A record that does not open or names another account is ignored: the next
        // refresh overwrites it.
        let Ok(plain) = self.inner.key.open(TOKEN_MAGIC, &sealed) else {
            return Ok(None);
        };
        let Ok(record) = serde_json::from_slice::<TokenRecord>(&plain) else {
            return Ok(None);
        };
        if record.account != account.as_str() {
            return Ok(None);
        }
        Ok(Some(SharedToken {
            token: record.token,
            obtained_at: from_millis(record.obtained_at),
            expires_at: from_millis(record.expires_at),
        }))
    }

    /// Store the account's access token until it expires.
    pub async fn put_token(&self, account: &AccountKey, t: &SharedToken) -> Result<(), StoreError> {
        let ttl = t
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if ttl.is_zero() {
            return Ok(());
        }
        let record = TokenRecord {
            account: account.to_string(),
            token: t.token.clone(),
            obtained_at: millis(t.obtained_at),
            expires_at: millis(t.expires_at),
        };
        let plain = Zeroizing::new(
            serde_json::to_vec(&record).map_err(|e| StoreError::Other(e.to_string()))?,
        );
        let sealed = self.inner.key.seal(TOKEN_MAGIC, &plain)?;
        let mut conn = self.conn().await?;
        let name = self.inner.name(&format!("token:{account}"));
        let ms = ttl.as_millis().max(1) as u64;
        self.inner.op(conn.pset_ex(&name, sealed, ms)).await
    }

    /// Forget the account's stored token if it is still `token` (an upstream refused it).
    pub async fn drop_token(&self, account: &AccountKey, token: &Secret) {
        if let Ok(Some(stored)) = self.token(account).await {
            if &stored.token == token {
                let Ok(mut conn) = self.conn().await else {
                    return;
                };
                let name = self.inner.name(&format!("token:{account}"));
                let _: Result<i64, _> = self.inner.op(conn.del(&name)).await;
            }
        }
    }

    /// Take the account's refresh lock for `ttl`, if no one holds it.
    pub async fn try_lock(
        &self,
        account: &AccountKey,
        ttl: Duration,
    ) -> Result<Option<RefreshLock>, StoreError> {
        let key = self.inner.name(&format!("lock:{account}"));
        let holder = format!("{:032x}", rand::random::<u128>());
        let mut conn = self.conn().await?;
        let opts = ::redis::SetOptions::default()
            .conditional_set(::redis::ExistenceCheck::NX)
            .with_expiration(::redis::SetExpiry::PX(ttl.as_millis() as u64));
        let taken: Option<String> = self.inner.op(conn.set_options(&key, &holder, opts)).await?;
        Ok(taken.map(|_| RefreshLock { key, holder }))
    }

    /// Give the lock back, unless it lapsed and someone else holds it now.
    pub async fn unlock(&self, lock: RefreshLock) {
        let Ok(mut conn) = self.conn().await else {
            return;
        };
        let mut call = COMPARE_AND_DELETE.prepare_invoke();
        call.key(&lock.key).arg(&lock.holder);
        let _: Result<i64, _> = self.inner.op(call.invoke_async(&mut conn)).await;
    }

    /// A lease on one of the account's `cap` IMAP session slots, if one is free.
    pub async fn try_lease(
        &self,
        account: &AccountKey,
        cap: usize,
    ) -> Result<Option<Lease>, StoreError> {
        let set = self.inner.name(&format!("imap:{account}"));
        let id = format!("{:032x}", rand::random::<u128>());
        let mut conn = self.conn().await?;
        let mut call = TAKE_LEASE.prepare_invoke();
        call.key(&set)
            .arg(cap)
            .arg(&id)
            .arg(LEASE.as_millis() as u64);
        let taken: i64 = self.inner.op(call.invoke_async(&mut conn)).await?;
        if taken != 1 {
            return Ok(None);
        }
        lock(&self.leases).insert((set.clone(), id.clone()));
        Ok(Some(Lease {
            peers: self.clone(),
            set,
            id,
        }))
    }

    /// Renew every lease this process holds, until the process ends.
    pub async fn renew_leases_forever(self) {
        let mut tick = tokio::time::interval(RENEW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.renew_leases().await;
        }
    }

    async fn renew_leases(&self) {
        let held: Vec<(String, String)> = lock(&self.leases).iter().cloned().collect();
        let mut by_set: std::collections::HashMap<String, Vec<String>> = Default::default();
        for (set, id) in held {
            by_set.entry(set).or_default().push(id);
        }
        for (set, ids) in by_set {
            let Ok(mut conn) = self.conn().await else {
                return;
            };
            let mut call = RENEW_LEASES.prepare_invoke();
            call.key(&set).arg(LEASE.as_millis() as u64).arg(&ids);
            let _: Result<i64, _> = self.inner.op(call.invoke_async(&mut conn)).await;
            // A session that ended while this ran may have been added back after its own
            // removal: remove it again.
            let ended: Vec<&String> = {
                let held = lock(&self.leases);
                ids.iter()
                    .filter(|id| !held.contains(&(set.clone(), (*id).clone())))
                    .collect()
            };
            if !ended.is_empty() {
                let _: Result<i64, _> = self.inner.op(conn.zrem(&set, ended)).await;
            }
        }
    }

    /// Count one failed login under `what` (kept for `window`); returns the count so far.
    pub async fn count_failure(&self, what: &str, window: Duration) -> Result<u64, StoreError> {
        let key = self.inner.name(&format!("fail:{what}"));
        let mut conn = self.conn().await?;
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .incr(&key, 1u64)
            .pexpire(&key, window.as_millis() as i64)
            .ignore();
        let (n,): (u64,) = self.inner.op(pipe.query_async(&mut conn)).await?;
        Ok(n)
    }

    /// Forget the failures counted under `what` (a successful login).
    pub async fn clear_failures(&self, what: &str) {
        let key = self.inner.name(&format!("fail:{what}"));
        let Ok(mut conn) = self.conn().await else {
            return;
        };
        let _: Result<i64, _> = self.inner.op(conn.del(&key)).await;
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

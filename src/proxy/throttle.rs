//! Brute-force throttling of local logins. Failures are counted per source address and per
//! account. A source with repeated failures has its logins serialized and delayed (growing,
//! capped); a failed attempt on an account that keeps failing is answered late. A correct
//! login is never delayed by the account's count, so the owner logging in from elsewhere is not
//! slowed by someone guessing. Counts fade after a quiet period. Each burst is logged once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failures allowed before any delay (typos happen).
const FREE_FAILURES: u32 = 3;
const BASE_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(15);
/// A key with no failure for this long starts over.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Bound on tracked keys; the oldest are dropped beyond it.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Source(IpAddr),
    Account(String),
}

struct Entry {
    failures: u32,
    last_failure: Instant,
    /// Serializes a penalized source's attempts so parallel connections do not multiply its rate.
    gate: Arc<tokio::sync::Mutex<()>>,
    logged: bool,
}

#[derive(Default)]
pub struct Throttle {
    entries: Mutex<HashMap<Key, Entry>>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle").finish_non_exhaustive()
    }
}

/// Held while a penalized source's attempt runs.
pub struct Permit {
    _guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

pub fn delay_for(failures: u32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES).min(16);
    (BASE_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
}

impl Throttle {
    fn failures(&self, key: &Key) -> (u32, Option<Arc<tokio::sync::Mutex<()>>>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some(e) if e.last_failure.elapsed() < FORGET_AFTER => {
                (e.failures, Some(e.gate.clone()))
            }
            Some(_) => {
                entries.remove(key);
                (0, None)
            }
            None => (0, None),
        }
    }

    /// Before checking a login from `source`: wait out its penalty, one attempt at a time.
    pub async fn admit(&self, source: IpAddr) -> Permit {
        let (failures, gate) = self.failures(&Key::Source(source));
        let delay = delay_for(failures);
        match gate {
            Some(gate) if !delay.is_zero() => {
                let guard = gate.lock_owned().await;
                tokio::time::sleep(delay).await;
                Permit {
                    _guard: Some(guard),
                }
            }
            _ => Permit { _guard: None },
        }
    }

    /// A login failed: count it, and wait the account's penalty before the reply goes out.
    pub async fn failed(&self, source: IpAddr, account: &str) {
        let account_failures = {
            let now = Instant::now();
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if entries.len() >= MAX_KEYS {
                entries.retain(|_, e| now.duration_since(e.last_failure) < FORGET_AFTER);
                if entries.len() >= MAX_KEYS {
                    entries.clear();
                }
            }
            let mut bump = |key: Key| {
                let e = entries.entry(key.clone()).or_insert_with(|| Entry {
                    failures: 0,
                    last_failure: now,
                    gate: Arc::new(tokio::sync::Mutex::new(())),
                    logged: false,
                });
                if now.duration_since(e.last_failure) >= FORGET_AFTER {
                    e.failures = 0;
                    e.logged = false;
                }
                e.failures = e.failures.saturating_add(1);
                e.last_failure = now;
                if e.failures >= FREE_FAILURES && !e.logged {
                    e.logged = true;
                    match &key {
                        Key::Source(ip) => {
                            tracing::warn!(source = %ip, failures = e.failures, "repeated failed logins from this address: slowing it down")
                        }
                        Key::Account(a) => {
                            tracing::warn!(account = %a, failures = e.failures, "repeated failed logins for this account: slowing failures down")
                        }
                    }
                }
                e.failures
            };
            bump(Key::Source(source));
            bump(Key::Account(account.to_string()))
        };
        let delay = delay_for(account_failures);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// A login succeeded: the source is trusted again.
    pub fn succeeded(&self, source: IpAddr) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&Key::Source(source));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_grows_after_a_few_free_failures_and_is_capped() {
        assert_eq!(delay_for(0), Duration::ZERO);
        assert_eq!(delay_for(2), Duration::ZERO);
        assert_eq!(delay_for(3), BASE_DELAY);
        assert_eq!(delay_for(4), BASE_DELAY * 2);
        assert_eq!(delay_for(1000), MAX_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_guessing_source_waits_and_another_source_does_not() {
        let t = Throttle::default();
        let bad: IpAddr = "192.0.2.1".parse().unwrap();
        let good: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..6 {
            t.failed(bad, "alice@gmail.com").await;
        }
        let start = tokio::time::Instant::now();
        let _p = t.admit(good).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        let start = tokio::time::Instant::now();
        let _p = t.admit(bad).await;
        assert_eq!(start.elapsed(), delay_for(6));
        t.succeeded(bad);
        let start = tokio::time::Instant::now();
        let _p2 = t.admit(bad).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}

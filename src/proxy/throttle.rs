//! Brute-force throttling of local logins. A password is checked at once, so a correct one is
//! never queued behind anybody's wrong ones; what waits is the answer to a wrong one. Failures
//! count per source address (IPv6 per /64) and per configured account; the answers to one key's
//! failures go out one after another, each a growing (capped) delay after the previous, so
//! parallel connections do not multiply a guesser's rate. Unknown usernames count against the
//! source only and are never stored. Counts fade after a quiet period, swept on a schedule;
//! the table of sources is bounded, the oldest dropped first. Each burst is logged once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::peers::Peers;

/// Failures allowed before any delay (typos happen).
const FREE_FAILURES: u32 = 3;
const BASE_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(15);
/// A key with no failure for this long starts over.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// How often faded keys are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Sources tracked at most (about 64 bytes each); beyond, the one whose last failure is oldest
/// makes room, so the penalties of active guessers stay.
const MAX_SOURCES: usize = 65_536;

/// The delay before answering the `failures`-th failure in a row.
pub fn delay_for(failures: u32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES).min(16);
    (BASE_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
}

/// Where logins come from, as counted: an IPv6 host usually owns its whole /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Source(IpAddr);

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => Source(IpAddr::V6((u128::from(v6) & (!0u128 << 64)).into())),
            },
            v4 => Source(v4),
        }
    }
}

struct Entry {
    failures: u32,
    last_failure: Instant,
    /// When the answer to the latest failure goes out; the next one goes after it.
    answer_at: Instant,
    logged: bool,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            failures: 0,
            last_failure: now,
            answer_at: now,
            logged: false,
        }
    }

    /// Count a failure; when its answer may go out, and whether this starts a logged burst.
    fn bump(&mut self, now: Instant) -> (Instant, bool) {
        if now.duration_since(self.last_failure) >= FORGET_AFTER {
            *self = Entry::new(now);
        }
        self.failures = self.failures.saturating_add(1);
        self.last_failure = now;
        let first_slow = self.failures >= FREE_FAILURES && !self.logged;
        self.logged |= first_slow;
        (
            self.answer_at.max(now) + delay_for(self.failures),
            first_slow,
        )
    }

    fn fresh(&self, now: Instant) -> bool {
        now.duration_since(self.last_failure) < FORGET_AFTER
    }
}

struct Table {
    sources: HashMap<Source, Entry>,
    /// Configured accounts only (normalized email), so bounded by the config.
    accounts: HashMap<String, Entry>,
    last_sweep: Instant,
}

impl Table {
    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        self.sources.retain(|_, e| e.fresh(now));
        self.accounts.retain(|_, e| e.fresh(now));
    }

    fn source(&mut self, source: Source, now: Instant) -> &mut Entry {
        if self.sources.len() >= MAX_SOURCES && !self.sources.contains_key(&source) {
            let oldest = self
                .sources
                .iter()
                .min_by_key(|(_, e)| e.last_failure)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.sources.remove(&oldest);
            }
        }
        self.sources
            .entry(source)
            .or_insert_with(|| Entry::new(now))
    }
}

pub struct Throttle {
    table: Mutex<Table>,
    /// Connections per source that have not logged in yet.
    pending: Arc<Mutex<HashMap<Source, usize>>>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            table: Mutex::new(Table {
                sources: HashMap::new(),
                accounts: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            pending: Default::default(),
        }
    }
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle").finish_non_exhaustive()
    }
}

/// A connection from a source counted as logging in, until dropped.
pub struct Pending {
    source: Source,
    counts: Arc<Mutex<HashMap<Source, usize>>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

impl Throttle {
    /// A connection from `source` starts logging in; `None` when `cap` of its connections
    /// already are.
    pub fn enter(&self, source: IpAddr, cap: usize) -> Option<Pending> {
        let source = Source::of(source);
        let mut counts = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(source).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Pending {
            source,
            counts: self.pending.clone(),
        })
    }

    /// A login failed: count it against the source and, if it named a configured account
    /// (its normalized email), that account; wait until its answer may go out.
    /// On a shared store (`peers`) it is also counted with the other proxies', so spreading
    /// guesses over replicas gains nothing: the answer waits for whichever count says longer.
    /// An unreachable store leaves the local count alone in charge.
    /// Returns whether the answer was held back (the source or account is being slowed down).
    pub async fn failed(
        &self,
        source: IpAddr,
        account: Option<&str>,
        peers: Option<&Peers>,
    ) -> bool {
        let now = Instant::now();
        let mut at = self.schedule(source, account, now);
        if let Some(peers) = peers {
            let mut keys = vec![format!("src:{}", Source::of(source).0)];
            keys.extend(account.map(|a| format!("acct:{a}")));
            let mut most = 0;
            for key in keys {
                if let Ok(n) = peers.count_failure(&key, FORGET_AFTER).await {
                    most = most.max(n);
                }
            }
            at = at.max(now + delay_for(u32::try_from(most).unwrap_or(u32::MAX)));
        }
        tokio::time::sleep_until(at).await;
        at > now
    }

    fn schedule(&self, ip: IpAddr, account: Option<&str>, now: Instant) -> Instant {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.sweep(now);
        let source = Source::of(ip);
        let (mut at, first_slow) = table.source(source, now).bump(now);
        if first_slow {
            tracing::warn!(source = %source.0, "repeated failed logins from this address: slowing it down");
        }
        if let Some(account) = account {
            let entry = table
                .accounts
                .entry(account.to_string())
                .or_insert_with(|| Entry::new(now));
            let (account_at, first_slow) = entry.bump(now);
            if first_slow {
                tracing::warn!(%account, "repeated failed logins for this account: slowing failures down");
            }
            at = at.max(account_at);
            entry.answer_at = at;
        }
        table.source(source, now).answer_at = at;
        at
    }

    /// A login succeeded: the source is trusted again.
    pub fn succeeded(&self, source: IpAddr) {
        self.succeeded_among(source, None)
    }

    /// As [`Throttle::succeeded`], and the shared count of the source is cleared too (only when
    /// it was slowed here, so a good login costs no Redis round trip).
    pub fn succeeded_among(&self, source: IpAddr, peers: Option<&Peers>) {
        let was_counted = {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            table.sources.remove(&Source::of(source)).is_some()
        };
        let (Some(peers), true) = (peers, was_counted) else {
            return;
        };
        let (peers, key) = (peers.clone(), format!("src:{}", Source::of(source).0));
        tokio::spawn(async move { peers.clear_failures(&key).await });
    }

    /// Sources whose wrong answers are being slowed down now (for metrics).
    pub fn slowed_sources(&self) -> usize {
        let now = Instant::now();
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table
            .sources
            .values()
            .filter(|e| e.fresh(now) && !delay_for(e.failures).is_zero())
            .count()
    }

    /// Sources tracked now (for tests and diagnostics).
    pub fn sources(&self) -> usize {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: Option<&str> = Some("alice@gmail.com");

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_sources_being_slowed_down_count_as_throttled() {
        let t = Throttle::default();
        let now = Instant::now();
        for _ in 0..FREE_FAILURES - 1 {
            t.schedule(ip("192.0.2.1"), None, now);
        }
        assert_eq!(t.slowed_sources(), 0);
        t.schedule(ip("192.0.2.1"), None, now);
        t.schedule(ip("192.0.2.2"), None, now);
        assert_eq!(t.slowed_sources(), 1);
        t.succeeded(ip("192.0.2.1"));
        assert_eq!(t.slowed_sources(), 0);
    }

    #[test]
    fn delay_grows_after_a_few_free_failures_and_is_capped() {
        assert_eq!(delay_for(0), Duration::ZERO);
        assert_eq!(delay_for(2), Duration::ZERO);
        assert_eq!(delay_for(3), BASE_DELAY);
        assert_eq!(delay_for(4), BASE_DELAY * 2);
        assert_eq!(delay_for(1000), MAX_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_failures_from_one_source_are_answered_one_after_another() {
        let t = Throttle::default();
        let now = Instant::now();
        let mut expected = now;
        for n in 1..=8 {
            expected = expected.max(now) + delay_for(n);
            assert_eq!(t.schedule(ip("192.0.2.1"), None, now), expected);
        }
        // Another source is not slowed; the account only by its own count.
        assert_eq!(t.schedule(ip("192.0.2.2"), ALICE, now), now);
        t.succeeded(ip("192.0.2.1"));
        assert_eq!(t.schedule(ip("192.0.2.1"), None, now), now);
    }

    #[tokio::test(start_paused = true)]
    async fn an_account_failing_from_many_sources_is_answered_late() {
        let t = Throttle::default();
        let now = Instant::now();
        let mut last = now;
        for i in 0..6 {
            last = t.schedule(ip(&format!("192.0.2.{i}")), ALICE, now);
        }
        assert!(last - now >= delay_for(6), "{:?}", last - now);
        assert_eq!(t.schedule(ip("192.0.2.99"), None, now), now);
    }

    #[tokio::test(start_paused = true)]
    async fn faded_sources_are_swept_and_the_table_is_bounded() {
        let t = Throttle::default();
        let start = Instant::now();
        t.schedule(ip("2001:db8::1"), None, start);
        t.schedule(ip("2001:db8::2"), None, start);
        assert_eq!(t.sources(), 1, "one /64 is one source");
        let later = start + FORGET_AFTER + SWEEP_EVERY;
        t.schedule(ip("192.0.2.1"), None, later);
        assert_eq!(t.sources(), 1, "the faded source was swept");
        for i in 0..MAX_SOURCES as u32 + 10 {
            t.schedule(
                IpAddr::V4(i.into()),
                None,
                later + Duration::from_millis(i.into()),
            );
        }
        assert_eq!(t.sources(), MAX_SOURCES);
    }

    #[test]
    fn each_source_has_a_bounded_number_of_connections_logging_in() {
        let t = Throttle::default();
        let held: Vec<_> = (0..3).filter_map(|_| t.enter(ip("192.0.2.1"), 3)).collect();
        assert_eq!(held.len(), 3);
        assert!(t.enter(ip("192.0.2.1"), 3).is_none());
        assert!(t.enter(ip("192.0.2.2"), 3).is_some());
        drop(held);
        assert!(t.enter(ip("192.0.2.1"), 3).is_some());
        assert!(t.pending.lock().unwrap().len() <= 1);
    }
}

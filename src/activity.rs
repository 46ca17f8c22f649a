//! What the status page shows of the traffic: the last logins and failures, and the sessions
//! open per account and protocol. The core records here through two small calls (like
//! `metrics`); the admin listener only reads. Nothing secret is kept: a username that names
//! no account is kept only as the digest the log shows.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::account::AccountKey;
use crate::clock::{format_time, now_unix};
use crate::protocol::Protocol;

/// How many logins and failures the page lists.
pub const RECENT: usize = 100;

/// One login attempt, as the page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    /// Unix seconds.
    pub at: i64,
    /// `2026-01-01 12:00:00 UTC`
    pub time: String,
    /// The account as configured, or `unknown user <digest>`.
    pub user: String,
    pub protocol: &'static str,
    pub peer: String,
    /// `ok`, `wrong_password`, or why it failed (the metrics' result names).
    pub result: &'static str,
}

#[derive(Default)]
pub struct Activity {
    recent: Mutex<VecDeque<Event>>,
    open: Mutex<HashMap<(AccountKey, &'static str), usize>>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity").finish_non_exhaustive()
    }
}

impl Activity {
    /// A login attempt ended with `result`.
    pub fn login(&self, user: String, protocol: Protocol, peer: String, result: &'static str) {
        let at = now_unix();
        let event = Event {
            at,
            time: format_time(at),
            user,
            protocol: protocol.name(),
            peer,
            result,
        };
        let mut recent = lock(&self.recent);
        if recent.len() >= RECENT {
            recent.pop_back();
        }
        recent.push_front(event);
    }

    /// The last logins and failures, newest first.
    pub fn recent(&self) -> Vec<Event> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// A logged-in session of `account` over `protocol`: open until the guard drops.
    pub fn session(self: &Arc<Self>, account: AccountKey, protocol: Protocol) -> OpenSession {
        let key = (account, protocol.name());
        *lock(&self.open).entry(key.clone()).or_insert(0) += 1;
        OpenSession {
            activity: self.clone(),
            key,
        }
    }

    /// Open sessions: account (normalized email) → protocol → count; only non-zero counts.
    pub fn open_sessions(&self) -> BTreeMap<String, BTreeMap<&'static str, usize>> {
        let mut out: BTreeMap<String, BTreeMap<&'static str, usize>> = BTreeMap::new();
        for ((account, protocol), n) in lock(&self.open).iter() {
            out.entry(account.as_str().to_string())
                .or_default()
                .insert(protocol, *n);
        }
        out
    }
}

/// Counts one open session until dropped.
pub struct OpenSession {
    activity: Arc<Activity>,
    key: (AccountKey, &'static str),
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        let mut open = lock(&self.activity.open);
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_hundred_attempts_newest_first() {
        let a = Activity::default();
        for i in 0..RECENT + 5 {
            a.login(
                format!("user{i}"),
                Protocol::Imap,
                "192.0.2.1:1".into(),
                "ok",
            );
        }
        let recent = a.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].user, format!("user{}", RECENT + 4));
        assert_eq!(recent[RECENT - 1].user, "user5");
    }

    #[test]
    fn sessions_count_per_account_and_protocol_while_open() {
        let a = Arc::new(Activity::default());
        let alice = AccountKey::new("Alice@Gmail.com");
        let one = a.session(alice.clone(), Protocol::Imap);
        let two = a.session(alice.clone(), Protocol::Imap);
        let pop = a.session(alice, Protocol::Pop3);
        assert_eq!(a.open_sessions()["alice@gmail.com"]["imap"], 2);
        drop((one, pop));
        let open = a.open_sessions();
        assert_eq!(open["alice@gmail.com"]["imap"], 1);
        assert!(!open["alice@gmail.com"].contains_key("pop3"));
        drop(two);
        assert!(a.open_sessions().is_empty());
    }
}

//! Exchange Online behaviour for the fake mail servers (protocol-facts §4.1, §4.6, §4.7, §7.4):
//! switched on per fake, it changes the greetings, the one-line IMAP failure without an error
//! challenge, throttling replies, SMTP AUTH disabled for the tenant, and mailbox permissions
//! (a shared mailbox opened with a delegate's token, an app-only token for granted mailboxes).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::conn::lock;
use super::google::GoogleHandle;

#[derive(Default)]
pub struct Exchange {
    on: AtomicBool,
    /// IMAP: the next logins are answered "throttled" with these backoffs (ms), in turn.
    throttle: Mutex<VecDeque<u64>>,
    /// SMTP: `535 5.7.139` for every AUTH.
    smtp_auth_disabled: AtomicBool,
    /// mailbox → who else may open it (delegates, or the app principal).
    permissions: Mutex<HashMap<String, HashSet<String>>>,
    /// When each login command arrived.
    logins: Mutex<Vec<Instant>>,
}

impl Exchange {
    pub fn set_on(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// The next IMAP logins are refused as throttled, asking for these backoffs.
    pub fn throttle_next(&self, backoffs_ms: &[u64]) {
        lock(&self.throttle).extend(backoffs_ms);
    }

    pub(super) fn take_throttle(&self) -> Option<u64> {
        lock(&self.throttle).pop_front()
    }

    pub fn set_smtp_auth_disabled(&self, on: bool) {
        self.smtp_auth_disabled.store(on, Ordering::SeqCst);
    }

    pub(super) fn smtp_auth_disabled(&self) -> bool {
        self.smtp_auth_disabled.load(Ordering::SeqCst)
    }

    /// `Add-MailboxPermission -Identity mailbox -User who -AccessRights FullAccess`.
    pub fn grant_mailbox(&self, mailbox: &str, who: &str) {
        lock(&self.permissions)
            .entry(mailbox.to_ascii_lowercase())
            .or_default()
            .insert(who.to_ascii_lowercase());
    }

    /// When each login (AUTHENTICATE / AUTH) arrived, in order.
    pub fn login_times(&self) -> Vec<Instant> {
        lock(&self.logins).clone()
    }

    pub(super) fn note_login(&self) {
        lock(&self.logins).push(Instant::now());
    }

    /// Whether `token` opens `user`'s mailbox: its own token, or one of someone it granted.
    pub(super) fn may_open(&self, google: &GoogleHandle, user: &str, token: &str) -> bool {
        let Some(owner) = google.token_owner(token) else {
            return false;
        };
        owner.eq_ignore_ascii_case(user)
            || lock(&self.permissions)
                .get(&user.to_ascii_lowercase())
                .is_some_and(|who| who.contains(&owner.to_ascii_lowercase()))
    }
}

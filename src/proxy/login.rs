//! The part of a login every protocol shares: check the local password and get an access token.
//! Failures are [`Failure`] classes, which the protocol sessions render as replies.

use std::sync::Arc;

use crate::accounts::LocalAuthError;
use crate::config::AccountConfig;
use crate::oauth::{AccessToken, TokenError};
pub use crate::protocol::failure::Failure;
use crate::protocol::Credentials;

use super::Conn;

impl From<TokenError> for Failure {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::NeverAuthorized { email } => Failure::NeverAuthorized { email },
            TokenError::Revoked { email, detail } => Failure::Revoked { email, detail },
            TokenError::Misconfigured { email, detail } => Failure::Misconfigured { email, detail },
            TokenError::Temporary { detail, .. } => Failure::Temporary { detail },
        }
    }
}

/// Check the local password: the account it opens, or why not. Wrong passwords, throttled
/// answers and store trouble are counted here; a right password is counted by the caller
/// once it knows whether the account's session cap let it through (`ok` or `limit`).
/// The password is checked at once; only the answer to a wrong one waits (see `throttle`).
pub async fn check<'c>(
    conn: &'c Conn,
    credentials: &Credentials,
) -> Result<&'c AccountConfig, Failure> {
    let app = &conn.app;
    let source = conn.peer.ip();
    let verified = app
        .accounts
        .verify(&credentials.username, &credentials.password)
        .await;
    let protocol = conn.ctx.config.protocol;
    let key = match verified {
        Ok(key) => {
            app.throttle
                .succeeded_among(source, app.registry.store().peers());
            key
        }
        Err(LocalAuthError::BadCredentials) => {
            let account = app.registry.lookup(&credentials.username);
            tracing::info!(
                user = %loggable_user(account.map(|a| a.email.as_str()), &credentials.username),
                peer = %conn.peer,
                "login refused: wrong username or password"
            );
            let key = account.map(|a| a.key());
            let peers = app.registry.store().peers();
            let held = app
                .throttle
                .failed(source, key.as_ref().map(|k| k.as_str()), peers)
                .await;
            let result = if held { "throttled" } else { "wrong_password" };
            crate::metrics::local_login(protocol, result);
            return Err(Failure::BadCredentials);
        }
        Err(LocalAuthError::Store(detail)) => {
            crate::metrics::local_login(protocol, "error");
            tracing::error!(error = %detail, "cannot check password");
            return Err(Failure::Temporary { detail });
        }
        Err(LocalAuthError::Unavailable(detail)) => {
            crate::metrics::local_login(protocol, "error");
            // The outage itself is logged once, where it is noticed; not once per login.
            tracing::debug!(error = %detail, "cannot check password");
            return Err(store_unreachable());
        }
    };
    // A verified password belongs to a configured account; anything else is a bug.
    app.registry.account(&key).ok_or(Failure::BadCredentials)
}

/// An access token for an account whose password was right.
pub async fn token(conn: &Conn, account: &AccountConfig) -> Result<Arc<AccessToken>, Failure> {
    conn.app.tokens.get(&account.key()).await.map_err(|e| {
        tracing::warn!(account = %account.email, peer = %conn.peer, error = %e, "login failed: no access token");
        Failure::from(e)
    })
}

/// A login attempt ended with `result`, for the status page's recent events.
pub(crate) fn record(conn: &Conn, username: &str, result: &'static str) {
    let account = conn.app.registry.lookup(username);
    let user = loggable_user(account.map(|a| a.email.as_str()), username);
    let protocol = conn.ctx.config.protocol;
    (conn.app.activity).login(user, protocol, conn.peer.to_string(), result);
}

/// The answer when a shared store cannot be reached; its address stays out of client replies.
pub(crate) fn store_unreachable() -> Failure {
    Failure::Temporary {
        detail: "the proxy's shared store is unreachable".into(),
    }
}

/// A username for a log line: a configured account as configured; anything else only as a
/// short digest, since it may be a password typed into the wrong field (and its text is the
/// client's, able to forge log lines).
fn loggable_user(configured: Option<&str>, username: &str) -> String {
    use sha2::Digest;
    match configured {
        Some(email) => email.to_string(),
        None => {
            let digest = sha2::Sha256::digest(username.as_bytes());
            let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
            format!("unknown user {hex}")
        }
    }
}

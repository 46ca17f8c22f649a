//! The part of a login every protocol shares: check the local password and get an access token.
//! Failures are [`Failure`] classes, which the protocol sessions render as replies.

use std::sync::Arc;

use crate::accounts::LocalAuthError;
use crate::oauth::{AccessToken, TokenError};
pub use crate::protocol::failure::Failure;
use crate::protocol::Credentials;

use super::Conn;

impl From<TokenError> for Failure {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::NotAuthorized { email, detail } => Failure::NotAuthorized { email, detail },
            TokenError::Misconfigured { email, detail } => Failure::Misconfigured { email, detail },
            TokenError::Temporary { detail, .. } => Failure::Temporary { detail },
        }
    }
}

/// Check the local password and get a token. Returns the account's configured email.
pub async fn authorize(
    conn: &Conn,
    credentials: &Credentials,
) -> Result<(String, Arc<AccessToken>), Failure> {
    let app = &conn.app;
    let source = conn.peer.ip();
    let permit = app.throttle.admit(source).await;
    let verified = app
        .accounts
        .verify(&credentials.username, &credentials.password)
        .await;
    drop(permit);
    let key = match verified {
        Ok(key) => {
            app.throttle.succeeded(source);
            key
        }
        Err(LocalAuthError::BadCredentials) => {
            tracing::info!(
                user = %printable(&credentials.username),
                peer = %conn.peer,
                "login refused: wrong username or password"
            );
            app.throttle
                .failed(
                    source,
                    crate::account::AccountKey::new(&credentials.username).as_str(),
                )
                .await;
            return Err(Failure::BadCredentials);
        }
        Err(LocalAuthError::Store(detail)) => {
            tracing::error!(error = %detail, "cannot check password");
            return Err(Failure::Temporary { detail });
        }
    };
    let email = app
        .registry
        .account(&key)
        .map_or_else(|| key.to_string(), |a| a.email.clone());
    let token = app.tokens.get(&key).await.map_err(|e| {
        tracing::warn!(account = %email, peer = %conn.peer, error = %e, "login failed: no access token");
        Failure::from(e)
    })?;
    Ok((email, token))
}

/// A username for a log line: printable, bounded.
fn printable(s: &str) -> String {
    s.chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

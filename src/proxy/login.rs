//! The part of a login every protocol shares: check the local password, get an access token,
//! and the classes of failure the protocols turn into their own replies.

use std::sync::Arc;

use crate::accounts::LocalAuthError;
use crate::oauth::provider::Words;
use crate::oauth::{AccessToken, TokenError};
use crate::protocol::Credentials;

use super::Conn;

/// Why a client's login failed, in the classes the interface promises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Unknown user or wrong password: answered locally.
    BadCredentials,
    /// The account was never authorized (no refresh token stored).
    NeverAuthorized { email: String },
    /// The account's grant was revoked or expired: it must be authorized again.
    Revoked { email: String, detail: String },
    /// The OAuth client setup is broken; the proxy's admin must act.
    Misconfigured { email: String, detail: String },
    /// Token endpoint or upstream unreachable: try again later.
    Temporary { detail: String },
    /// Upstream refused a freshly refreshed token.
    TokenRejected { email: String, detail: String },
    /// Upstream refused for another reason (an [ALERT], a connection limit): its own words.
    UpstreamRefused { line: String },
    /// The account already has as many upstream sessions as the provider allows.
    TooManySessions { email: String, limit: usize },
}

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

impl Failure {
    /// What to tell a person about this failure, protocol-neutral, in the default provider's
    /// words (the only provider today).
    pub fn describe(&self) -> String {
        self.describe_for(crate::oauth::provider::default_provider().words())
    }

    /// What to tell a person, naming the account's provider and mail service.
    pub fn describe_for(&self, words: &Words) -> String {
        let Words { provider, mail } = words;
        match self {
            Failure::BadCredentials => {
                "Invalid username or password (use the account's email and a local app password from `xoauth2-proxy password add`)".into()
            }
            Failure::NeverAuthorized { email } => format!(
                "{email} is not authorized with {provider} yet; run `xoauth2-proxy login {email}` on the proxy host"
            ),
            Failure::Revoked { email, .. } => format!(
                "{provider} authorization for {email} has expired or was revoked; run `xoauth2-proxy login {email}` on the proxy host"
            ),
            Failure::Misconfigured { email, detail } => {
                format!("xoauth2-proxy cannot get a token for {email}: {detail}")
            }
            Failure::Temporary { detail } => {
                format!("{mail} cannot be reached right now ({detail}); try again later")
            }
            Failure::TokenRejected { email, detail } => format!(
                "{mail} rejected the OAuth token for {email} ({detail}); if this persists run `xoauth2-proxy login {email}`"
            ),
            Failure::UpstreamRefused { line } => line.clone(),
            Failure::TooManySessions { email, limit } => format!(
                "{email} already has {limit} open sessions, {mail}'s limit; close a mail client or wait"
            ),
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
                    &crate::config::normalize_email(&credentials.username),
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
        .accounts
        .configured_email(&key)
        .unwrap_or(&key)
        .to_string();
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

//! The token manager: per account, a cached access token with its wall-clock expiry, refreshed
//! ahead of expiry with single-flight (concurrent logins share one token request). A dead
//! refresh token is remembered as permanent until the store holds a different one; temporary
//! failures are remembered briefly so a down endpoint is not hammered.

pub mod google;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::accounts::Accounts;
use crate::config::{Config, OAuthClient};
use crate::secret::Secret;
use google::GrantError;

/// A usable access token.
#[derive(Debug)]
pub struct AccessToken {
    pub token: Secret,
    pub expires_at: SystemTime,
    obtained_at: SystemTime,
}

impl AccessToken {
    /// Fresh enough to start a login with: not within the refresh margin of its expiry. The
    /// margin is 5 minutes, or a quarter of the lifetime for short-lived tokens.
    fn is_fresh(&self, now: SystemTime) -> bool {
        let lifetime = self
            .expires_at
            .duration_since(self.obtained_at)
            .unwrap_or_default();
        let margin = (lifetime / 4).min(Duration::from_secs(300));
        now + margin < self.expires_at
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// No usable authorization: never authorized, or the refresh token is dead.
    NotAuthorized { email: String, detail: String },
    /// The OAuth client setup is wrong; the admin must fix config or console.
    Misconfigured { email: String, detail: String },
    /// Try again later.
    Temporary { email: String, detail: String },
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::NotAuthorized { email, detail }
            | TokenError::Misconfigured { email, detail }
            | TokenError::Temporary { email, detail } => write!(f, "{email}: {detail}"),
        }
    }
}

/// What the last failed refresh said, so the next login does not ask again in vain.
#[derive(Debug)]
enum Failure {
    /// Permanent for this refresh token: retried only once the store holds another one.
    Permanent {
        error: TokenError,
        refresh_token: Option<Secret>,
    },
    Temporary {
        error: TokenError,
        until: Instant,
    },
}

struct AccountTokens {
    email: String,
    client: Result<OAuthClient, String>,
    cached: Mutex<Option<Arc<AccessToken>>>,
    /// Held while refreshing: the single flight.
    gate: tokio::sync::Mutex<Option<Failure>>,
    requests: std::sync::atomic::AtomicU64,
}

pub struct TokenManager {
    http: reqwest::Client,
    accounts: Arc<Accounts>,
    tokens: HashMap<String, Arc<AccountTokens>>,
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("accounts", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

/// After a temporary failure, logins in this window get the same answer without a request.
const TEMPORARY_HOLD: Duration = Duration::from_secs(1);

impl TokenManager {
    pub fn new(config: &Config, accounts: Arc<Accounts>) -> Result<TokenManager, String> {
        let tokens = config
            .accounts
            .iter()
            .map(|a| {
                (
                    a.key(),
                    Arc::new(AccountTokens {
                        email: a.email.clone(),
                        client: config.oauth_client(a),
                        cached: Mutex::new(None),
                        gate: tokio::sync::Mutex::new(None),
                        requests: Default::default(),
                    }),
                )
            })
            .collect();
        Ok(TokenManager {
            http: google::http_client()?,
            accounts,
            tokens,
        })
    }

    /// Number of token requests made for an account (for `accounts` and tests).
    pub fn requests_made(&self, email: &str) -> u64 {
        self.tokens
            .get(&crate::config::normalize_email(email))
            .map(|t| t.requests.load(std::sync::atomic::Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// A fresh access token for `email` (normalized), refreshing if needed.
    pub async fn get(&self, email: &str) -> Result<Arc<AccessToken>, TokenError> {
        let Some(acct) = self.tokens.get(email) else {
            return Err(TokenError::Misconfigured {
                email: email.to_string(),
                detail: "not a configured account".into(),
            });
        };
        if let Some(t) = acct.fresh() {
            return Ok(t);
        }
        let mut gate = acct.gate.lock().await;
        // Whoever held the gate before us may have refreshed already.
        if let Some(t) = acct.fresh() {
            return Ok(t);
        }
        let refresh_token =
            self.accounts
                .refresh_token(email)
                .map_err(|e| TokenError::Temporary {
                    email: acct.email.clone(),
                    detail: format!("cannot read the secret store: {e}"),
                })?;
        match &*gate {
            Some(Failure::Permanent {
                error,
                refresh_token: failed,
            }) if *failed == refresh_token => return Err(error.clone()),
            Some(Failure::Temporary { error, until }) if Instant::now() < *until => {
                return Err(error.clone())
            }
            _ => {}
        }
        let result = self.refresh(acct, refresh_token.clone()).await;
        match result {
            Ok(token) => {
                *gate = None;
                Ok(token)
            }
            Err((error, retry_after)) => {
                *gate = Some(match &error {
                    TokenError::Temporary { .. } => Failure::Temporary {
                        error: error.clone(),
                        until: Instant::now() + retry_after.unwrap_or(TEMPORARY_HOLD),
                    },
                    _ => Failure::Permanent {
                        error: error.clone(),
                        refresh_token,
                    },
                });
                Err(error)
            }
        }
    }

    /// The upstream rejected `token`: forget it so the next `get` refreshes.
    pub fn invalidate(&self, email: &str, token: &Arc<AccessToken>) {
        if let Some(acct) = self.tokens.get(email) {
            let mut cached = acct.cached.lock().unwrap_or_else(|e| e.into_inner());
            if cached.as_ref().is_some_and(|c| Arc::ptr_eq(c, token)) {
                *cached = None;
            }
        }
    }

    async fn refresh(
        &self,
        acct: &AccountTokens,
        refresh_token: Option<Secret>,
    ) -> Result<Arc<AccessToken>, (TokenError, Option<Duration>)> {
        let email = acct.email.clone();
        let client = acct.client.as_ref().map_err(|detail| {
            (
                TokenError::Misconfigured {
                    email: email.clone(),
                    detail: detail.clone(),
                },
                None,
            )
        })?;
        let Some(refresh_token) = refresh_token else {
            return Err((
                TokenError::NotAuthorized {
                    email: email.clone(),
                    detail: "not authorized yet".into(),
                },
                None,
            ));
        };
        acct.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = SystemTime::now();
        let granted = google::refresh(&self.http, client, &refresh_token)
            .await
            .map_err(|e| {
                let retry_after = match &e {
                    GrantError::Temporary { retry_after, .. } => *retry_after,
                    _ => None,
                };
                let error = match e {
                    GrantError::Revoked(detail) => TokenError::NotAuthorized {
                        email: email.clone(),
                        detail,
                    },
                    GrantError::Client(detail) => TokenError::Misconfigured {
                        email: email.clone(),
                        detail,
                    },
                    GrantError::Temporary { detail, .. } => TokenError::Temporary {
                        email: email.clone(),
                        detail,
                    },
                };
                tracing::warn!(account = %email, error = %error, "token refresh failed");
                (error, retry_after)
            })?;
        if let Some(scope) = &granted.scope {
            if !scope.split_whitespace().any(|s| s == client.scope) {
                let error = TokenError::NotAuthorized {
                    email: email.clone(),
                    detail: format!(
                        "the authorization does not include {} (granted: {scope}); authorize again and allow access to Gmail",
                        client.scope
                    ),
                };
                tracing::warn!(account = %email, error = %error, "token refresh failed");
                return Err((error, None));
            }
        }
        // A rotated refresh token is saved before the new access token is used: if saving
        // fails we would lose the only valid grant.
        if let Some(rotated) = &granted.refresh_token {
            if *rotated != refresh_token {
                crate::accounts::rotate_refresh_token(self.accounts.store(), &email, rotated)
                    .map_err(|e| {
                        (
                            TokenError::Temporary {
                                email: email.clone(),
                                detail: format!("cannot save the rotated refresh token: {e}"),
                            },
                            None,
                        )
                    })?;
            }
        }
        let token = Arc::new(AccessToken {
            token: granted.access_token,
            expires_at: started + granted.expires_in,
            obtained_at: started,
        });
        tracing::info!(account = %email, expires_in = granted.expires_in.as_secs(), "access token refreshed");
        *acct.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        Ok(token)
    }
}

impl AccountTokens {
    fn fresh(&self) -> Option<Arc<AccessToken>> {
        let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .as_ref()
            .filter(|t| t.is_fresh(SystemTime::now()))
            .cloned()
    }
}

/// `import`: check a refresh token with one refresh; returns the verified grant's expiry.
pub async fn verify_refresh_token(
    client: &OAuthClient,
    refresh_token: &Secret,
) -> Result<google::Granted, GrantError> {
    let http = google::http_client().map_err(|detail| GrantError::Temporary {
        detail,
        retry_after: None,
    })?;
    google::refresh(&http, client, refresh_token).await
}

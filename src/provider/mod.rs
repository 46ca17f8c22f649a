//! The provider seam: what differs between OAuth mail providers sits behind `Provider`:
//! endpoints, scopes per protocol, default upstream hosts, and what the provider's refusals
//! mean with the fix.
//! Google (google.rs) and Microsoft (microsoft.rs) implement it. Another provider is one more
//! file implementing this trait, a line in `by_name`, and its `[providers.NAME]` section in the
//! config.

use std::time::Duration;

pub use crate::protocol::{Protocol, Words};

pub mod google;
pub mod microsoft;

/// Default OAuth endpoints (the config may override each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub auth_url: &'static str,
    pub token_url: &'static str,
    /// RFC 8628 device authorization, where the provider offers it for mail scopes.
    pub device_url: Option<&'static str>,
}

/// What a refused token request means, once a provider has read the refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantError {
    /// The grant is dead (`invalid_grant`): the account must be authorized again.
    Revoked(String),
    /// The OAuth client or its setup is wrong; an admin must fix the config or the console.
    Client(String),
    /// Network trouble, 5xx, 429, garbage: try again later (not before `retry_after`).
    Temporary {
        detail: String,
        retry_after: Option<Duration>,
    },
}

impl std::fmt::Display for GrantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrantError::Revoked(d) | GrantError::Client(d) => f.write_str(d),
            GrantError::Temporary { detail, .. } => f.write_str(detail),
        }
    }
}

/// A token-endpoint answer that names an OAuth error (RFC 6749 §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
    pub description: Option<String>,
}

impl Refusal {
    /// ` (description)` or nothing, for messages.
    pub fn description_suffix(&self) -> String {
        self.description
            .as_deref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default()
    }
}

/// What an upstream server's refusal of a login means beyond the protocol's own classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamVerdict {
    /// The server asks to wait this long before the account's next login.
    Throttled(Duration),
    /// A server-side setting blocks every login: `reply` is a complete reply line for the
    /// client, `fix` what an admin must do (for the log).
    Blocked { reply: String, fix: String },
}

pub trait Provider: std::fmt::Debug + Send + Sync + 'static {
    /// The config section name: `[providers.google]`.
    fn id(&self) -> &'static str;
    fn words(&self) -> &'static Words;
    fn endpoints(&self) -> Endpoints;
    /// The scope a token must carry to log in with `protocol`.
    fn scope(&self, protocol: Protocol) -> &'static str;
    /// The scopes a login asks for: enough for every protocol (one token serves them all).
    fn login_scopes(&self) -> Vec<&'static str> {
        let mut scopes = Vec::new();
        for p in [Protocol::Imap, Protocol::Smtp, Protocol::Pop3] {
            if !scopes.contains(&self.scope(p)) {
                scopes.push(self.scope(p));
            }
        }
        scopes
    }
    /// Where a listener without `upstream` connects: `HOST:PORT`.
    fn default_upstream(&self, protocol: Protocol) -> &'static str;
    /// Where a listener without `upstream` connects for this account (hosts may differ
    /// between consumer and business accounts).
    fn default_upstream_for(&self, protocol: Protocol, email: &str) -> &'static str {
        let _ = email;
        self.default_upstream(protocol)
    }
    /// Whether the default upstream speaks plaintext first and needs STARTTLS.
    fn default_upstream_starttls(&self, protocol: Protocol) -> bool {
        let _ = protocol;
        false
    }
    /// How many IMAP sessions one account may have open at the provider at once (Gmail: 15).
    fn imap_sessions(&self) -> usize {
        15
    }
    /// Whether a refresh request repeats the scopes (Microsoft's v2.0 endpoint wants them).
    fn scope_on_refresh(&self) -> bool {
        false
    }
    /// The host of `login`'s loopback redirect address (the listener is on 127.0.0.1 either
    /// way): what the provider matches against the registered redirect.
    fn loopback_host(&self) -> &'static str {
        "127.0.0.1"
    }
    /// How to register an OAuth client for `login`, for messages.
    fn console_steps(&self) -> &'static str;
    /// Extra parameters of the authorization URL (consent and offline access).
    fn authorization_params(&self) -> &'static [(&'static str, &'static str)];
    /// What a refusal of a refresh token means, with the fix.
    fn refresh_refusal(&self, r: &Refusal) -> GrantError;
    /// What a refusal of an authorization code means, with the fix.
    fn code_refusal(&self, r: &Refusal, redirect_uri: &str) -> GrantError;
    /// What an upstream refusal (`line`, for IMAP the text after the tag) of a login as
    /// `user` means, when the provider's servers say more than "wrong token".
    fn upstream_refusal(
        &self,
        protocol: Protocol,
        line: &str,
        user: &str,
    ) -> Option<UpstreamVerdict> {
        let _ = (protocol, line, user);
        None
    }
    /// A likely reason a refresh token issued at `obtained_at` (unix seconds) was refused.
    fn revoked_hint(&self, obtained_at: i64, now: i64) -> Option<&'static str> {
        let _ = (obtained_at, now);
        None
    }
}

/// The provider a config section names.
pub fn by_name(id: &str) -> Option<&'static dyn Provider> {
    match id {
        "google" => Some(&google::Google),
        "microsoft" => Some(&microsoft::Microsoft),
        _ => None,
    }
}

/// The provider of accounts that name none.
pub fn default_provider() -> &'static dyn Provider {
    &google::Google
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Failure;

    #[test]
    fn client_replies_name_the_accounts_provider_and_mail_service() {
        let other = Words {
            provider: "Microsoft",
            mail: "Outlook",
        };
        let never = Failure::NeverAuthorized {
            email: "bob@contoso.com".into(),
        };
        assert!(never
            .describe(&other)
            .contains("not authorized with Microsoft yet"));
        let down = Failure::Temporary {
            detail: "timed out".into(),
        };
        assert!(down
            .describe(&other)
            .starts_with("Outlook cannot be reached"));
        assert!(down
            .describe(google::Google.words())
            .starts_with("Gmail cannot be reached"));
        assert_eq!(by_name("google").map(|p| p.id()), Some("google"));
        assert_eq!(by_name("microsoft").map(|p| p.id()), Some("microsoft"));
        assert!(by_name("yahoo").is_none());
    }

    #[test]
    fn google_asks_one_scope_for_every_protocol_and_knows_gmail_hosts() {
        let google = default_provider();
        assert_eq!(google.login_scopes(), ["https://mail.google.com/"]);
        assert_eq!(
            google.default_upstream(Protocol::Smtp),
            "smtp.gmail.com:465"
        );
        assert_eq!(
            google.endpoints().token_url,
            "https://oauth2.googleapis.com/token"
        );
    }
}

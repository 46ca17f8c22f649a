//! Why a client's login failed, in the classes the interface promises. Each protocol's client
//! session renders a class as its own reply (`login_failed`), so the transcript tests see every
//! byte a client can receive.

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

/// The names a provider's messages use, so client replies say whose service failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Words {
    /// Who issues the authorization: "Google".
    pub provider: &'static str,
    /// The mail service: "Gmail".
    pub mail: &'static str,
}

impl Failure {
    /// What to tell a person about this failure, protocol-neutral, naming the account's
    /// provider and mail service.
    pub fn describe(&self, words: &Words) -> String {
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

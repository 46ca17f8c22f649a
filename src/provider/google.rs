//! Google as an OAuth mail provider: its endpoints, the Gmail scope and hosts, and what its
//! token endpoint's refusals mean, each with the console step that fixes it.

use super::{Endpoints, GrantError, Protocol, Provider, Refusal, Words};

pub const AUTH_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
pub const TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// Google serves it, but refuses the Gmail scope on it (protocol facts §3.8).
pub const DEVICE_URL: &str = "https://oauth2.googleapis.com/device/code";
pub const GMAIL_SCOPE: &str = "https://mail.google.com/";

pub const CONSOLE_CLIENT: &str = "in Google Cloud console open Google Auth Platform > Clients > Create client, choose Application type \"Desktop app\", and put its client_id and client_secret in [providers.google]";

const WORDS: Words = Words {
    provider: "Google",
    mail: "Gmail",
};

#[derive(Debug, Clone, Copy)]
pub struct Google;

impl Provider for Google {
    fn id(&self) -> &'static str {
        "google"
    }

    fn words(&self) -> &'static Words {
        &WORDS
    }

    fn endpoints(&self) -> Endpoints {
        Endpoints {
            auth_url: AUTH_URL,
            token_url: TOKEN_URL,
            device_url: Some(DEVICE_URL),
        }
    }

    fn scope(&self, _: Protocol) -> &'static str {
        GMAIL_SCOPE
    }

    fn default_upstream(&self, protocol: Protocol) -> &'static str {
        match protocol {
            Protocol::Imap => "imap.gmail.com:993",
            Protocol::Smtp => "smtp.gmail.com:465",
            Protocol::Pop3 => "pop.gmail.com:995",
        }
    }

    fn authorization_params(&self) -> &'static [(&'static str, &'static str)] {
        // Without prompt=consent a re-authorization may come back without a refresh token.
        &[("access_type", "offline"), ("prompt", "consent")]
    }

    fn refresh_refusal(&self, r: &Refusal) -> GrantError {
        refresh_refusal(r)
    }

    fn code_refusal(&self, r: &Refusal, redirect_uri: &str) -> GrantError {
        let description = r.description_suffix();
        match r.code.as_str() {
            "invalid_grant" => GrantError::Revoked(format!(
                "invalid_grant{description}: the code expired (codes live a few minutes), was already used, or the PKCE check failed; run login again and finish it within a few minutes"
            )),
            "redirect_uri_mismatch" => GrantError::Client(format!(
                "redirect_uri_mismatch{description}: Google does not accept {redirect_uri} for this client, which means it is not a Desktop app client; {CONSOLE_CLIENT}"
            )),
            "invalid_client" | "unauthorized_client" => GrantError::Client(format!(
                "{}{description}: client_id or client_secret is wrong, or the client was deleted; {CONSOLE_CLIENT}",
                r.code
            )),
            _ => common_refusal(r),
        }
    }

    fn console_steps(&self) -> &'static str {
        "in Google Cloud console create a project; under Google Auth Platform set Branding, Audience (External, and add the account under Test users, or publish the app), Data Access (add https://mail.google.com/), then Clients > Create client > Desktop app; put its client_id and client_secret in [providers.google]"
    }

    fn revoked_hint(&self, obtained_at: i64, now: i64) -> Option<&'static str> {
        looks_like_testing_expiry(obtained_at, now).then_some(
            "it was issued about 7 days ago, which is when Google ends grants of apps in Testing: publish the app (Google Auth Platform > Audience > Publish app) so new grants last",
        )
    }
}

/// What the refresh grant's refusals mean and what to do about them.
pub fn refresh_refusal(r: &Refusal) -> GrantError {
    let code = r.code.as_str();
    let description = r.description_suffix();
    match code {
        "invalid_grant" => GrantError::Revoked(format!(
            "Google refused the refresh token: invalid_grant{description}; it was revoked, expired (7 days for apps in Testing, 6 months unused, password change) or issued to another client"
        )),
        "unauthorized_client" => GrantError::Client(format!(
            "Google says the OAuth client may not use this grant: unauthorized_client{description}; the refresh token belongs to another client_id: run `xoauth2-proxy login` again with the configured client"
        )),
        _ => common_refusal(r),
    }
}

/// Refusals that mean the same whatever the grant.
pub fn common_refusal(r: &Refusal) -> GrantError {
    let code = r.code.as_str();
    let description = r.description_suffix();
    match code {
        "invalid_client" | "deleted_client" | "disabled_client" => GrantError::Client(format!(
            "Google refused the OAuth client: {code}{description}; check client_id and client_secret in [providers.google] against the Desktop app client in Google Cloud console (Google Auth Platform > Clients)"
        )),
        "admin_policy_enforced" | "org_internal" | "access_denied" => GrantError::Client(format!(
            "Google refused access: {code}{description}; a Workspace admin must allow this app, or the app is Internal and the account is outside the organization"
        )),
        "invalid_scope" => GrantError::Client(format!(
            "Google refused the scope: invalid_scope{description}; the scope must be https://mail.google.com/"
        )),
        "invalid_grant" => GrantError::Revoked(format!("Google refused the grant: invalid_grant{description}")),
        other => GrantError::Client(format!(
            "token endpoint refused the request: {other}{description}"
        )),
    }
}

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

/// A refresh token refused at about 7 days old most likely met Google's limit for apps in
/// Testing.
pub fn looks_like_testing_expiry(obtained_at: i64, now: i64) -> bool {
    let age = now - obtained_at;
    (6 * DAY + 12 * HOUR..=8 * DAY).contains(&age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_week_old_refresh_token_is_explained_as_the_testing_limit() {
        let day = 24 * 3600;
        let now = 1_767_225_600;
        let hint = Google.revoked_hint(now - 7 * day, now).unwrap();
        assert!(hint.contains("apps in Testing"), "{hint}");
        assert_eq!(Google.revoked_hint(now - day, now), None);
        assert_eq!(Google.revoked_hint(now - 30 * day, now), None);
    }

    const NOW: i64 = 1_767_225_600;

    #[test]
    fn refused_week_old_token_is_recognised_as_the_testing_limit() {
        assert!(looks_like_testing_expiry(NOW - 7 * DAY, NOW));
        assert!(!looks_like_testing_expiry(NOW - 2 * DAY, NOW));
        assert!(!looks_like_testing_expiry(NOW - 60 * DAY, NOW));
    }
}

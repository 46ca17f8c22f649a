//! Microsoft 365 (Exchange Online) and Outlook.com as an OAuth mail provider: the identity
//! platform's endpoints (a tenant in the path), the Exchange scopes and hosts, and what its
//! AADSTS refusals mean, each with the step in Entra or Exchange that fixes it.

use std::time::Duration;

use super::{Endpoints, GrantError, Protocol, Provider, Refusal, UpstreamVerdict, Words};

/// `{tenant}` is replaced by `[providers.microsoft] tenant` (default `common`).
pub const AUTH_URL: &str = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize";
pub const TOKEN_URL: &str = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token";
pub const DEVICE_URL: &str = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode";
pub const DEFAULT_TENANT: &str = "common";

pub const IMAP_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";
pub const POP_SCOPE: &str = "https://outlook.office.com/POP.AccessAsUser.All";
pub const SMTP_SCOPE: &str = "https://outlook.office.com/SMTP.Send";
/// Without it Microsoft issues no refresh token.
pub const OFFLINE_SCOPE: &str = "offline_access";
/// Client credentials (app-only): the Exchange Online application permissions granted.
pub const APP_ONLY_SCOPE: &str = "https://outlook.office365.com/.default";

/// The longest throttling backoff believed (a server's number is a stranger's).
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);

/// Where an admin fixes the app registration.
pub const ENTRA_APP: &str = "in the Microsoft Entra admin center open App registrations > your app";

const WORDS: Words = Words {
    provider: "Microsoft",
    mail: "Outlook",
};

/// Consumer domains, whose SMTP submission host differs from Microsoft 365's.
const CONSUMER_DOMAINS: &[&str] = &[
    "outlook.com",
    "hotmail.com",
    "live.com",
    "msn.com",
    "passport.com",
];

#[derive(Debug, Clone, Copy)]
pub struct Microsoft;

impl Provider for Microsoft {
    fn id(&self) -> &'static str {
        "microsoft"
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

    fn scope(&self, protocol: Protocol) -> &'static str {
        match protocol {
            Protocol::Imap => IMAP_SCOPE,
            Protocol::Smtp => SMTP_SCOPE,
            Protocol::Pop3 => POP_SCOPE,
        }
    }

    fn login_scopes(&self) -> Vec<&'static str> {
        vec![IMAP_SCOPE, POP_SCOPE, SMTP_SCOPE, OFFLINE_SCOPE]
    }

    fn default_upstream(&self, protocol: Protocol) -> &'static str {
        match protocol {
            Protocol::Imap => "outlook.office365.com:993",
            Protocol::Smtp => "smtp.office365.com:587",
            Protocol::Pop3 => "outlook.office365.com:995",
        }
    }

    fn default_upstream_for(&self, protocol: Protocol, email: &str) -> &'static str {
        if protocol == Protocol::Smtp && is_consumer(email) {
            return "smtp-mail.outlook.com:587";
        }
        self.default_upstream(protocol)
    }

    fn default_upstream_starttls(&self, protocol: Protocol) -> bool {
        // Exchange offers no implicit-TLS submission port.
        protocol == Protocol::Smtp
    }

    fn authorization_params(&self) -> &'static [(&'static str, &'static str)] {
        // select_account: a browser signed in to another Microsoft account would otherwise
        // consent as that one.
        &[("prompt", "select_account")]
    }

    fn imap_sessions(&self) -> usize {
        // Exchange Online's reported limit per mailbox (protocol-facts §4.1).
        20
    }

    fn loopback_host(&self) -> &'static str {
        // Entra ignores the port of a registered http://localhost, but 127.0.0.1 would have
        // to be registered on its own (through the manifest).
        "localhost"
    }

    fn scope_on_refresh(&self) -> bool {
        // The v2.0 endpoint wants the scopes again on every refresh.
        true
    }

    fn refresh_refusal(&self, r: &Refusal) -> GrantError {
        refusal(r)
    }

    fn code_refusal(&self, r: &Refusal, redirect_uri: &str) -> GrantError {
        match (r.code.as_str(), aadsts(r)) {
            ("invalid_grant", None) => GrantError::Revoked(format!(
                "invalid_grant{}: the code expired, was already used, or the PKCE check failed; run login again and finish it within a few minutes",
                r.description_suffix()
            )),
            ("invalid_request", Some(50011)) => GrantError::Client(format!(
                "AADSTS50011: Microsoft does not accept the redirect {redirect_uri}; {ENTRA_APP} > Authentication > Add a platform > Mobile and desktop applications, and add http://localhost"
            )),
            _ => refusal(r),
        }
    }

    fn upstream_refusal(
        &self,
        protocol: Protocol,
        line: &str,
        user: &str,
    ) -> Option<UpstreamVerdict> {
        match protocol {
            Protocol::Imap => throttled(line).map(UpstreamVerdict::Throttled),
            Protocol::Smtp if line.contains("5.7.139") => {
                let fix = format!("an Exchange admin must enable SMTP AUTH for the mailbox: Set-CASMailbox -Identity {user} -SmtpClientAuthenticationDisabled $false (or for the tenant: Set-TransportConfig -SmtpClientAuthenticationDisabled $false)");
                Some(UpstreamVerdict::Blocked {
                    reply: format!(
                        "535 5.7.139 SMTP AUTH is disabled for {user} at Microsoft; {fix}"
                    ),
                    fix,
                })
            }
            _ => None,
        }
    }

    fn console_steps(&self) -> &'static str {
        "in the Microsoft Entra admin center open App registrations > New registration; add the platform \"Mobile and desktop applications\" with http://localhost, under API permissions add IMAP.AccessAsUser.All, POP.AccessAsUser.All and SMTP.Send (Office 365 Exchange Online) and grant admin consent; put its Application (client) ID in [providers.microsoft] client_id and the Directory (tenant) ID in tenant"
    }
}

/// `NO Request is throttled. Suggested Backoff Time: N milliseconds` → N ms (§4.7).
pub fn throttled(line: &str) -> Option<Duration> {
    let rest = line.split_once("Request is throttled.")?.1;
    let number = rest.split_once("Suggested Backoff Time:")?.1.trim_start();
    let digits: String = number
        .chars()
        .take_while(char::is_ascii_digit)
        .take(9)
        .collect();
    let ms: u64 = digits.parse().ok()?;
    Some(Duration::from_millis(ms).min(MAX_BACKOFF))
}

/// Outlook.com and Hotmail addresses: personal Microsoft accounts.
pub fn is_consumer(email: &str) -> bool {
    email
        .rsplit_once('@')
        .map(|(_, domain)| {
            let domain = domain.to_ascii_lowercase();
            CONSUMER_DOMAINS
                .iter()
                .any(|d| domain == *d || domain.strip_prefix(d).is_some_and(|r| r.starts_with('.')))
        })
        .unwrap_or(false)
}

/// The AADSTS number in a refusal's description (`AADSTS70043: The refresh token has expired`).
pub fn aadsts(r: &Refusal) -> Option<u32> {
    let text = r.description.as_deref()?;
    let at = text.find("AADSTS")? + "AADSTS".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .take(9)
        .collect();
    digits.parse().ok()
}

/// What a refusal of the identity platform means and what fixes it (protocol facts §4.7).
pub fn refusal(r: &Refusal) -> GrantError {
    let code = r.code.as_str();
    let said = first_line(r);
    match aadsts(r) {
        Some(70043 | 700082 | 700084) => GrantError::Revoked(format!(
            "{said}: the refresh token expired (Conditional Access sign-in frequency or 90 days unused); authorize again"
        )),
        Some(50076 | 50079 | 50078) => GrantError::Revoked(format!(
            "{said}: the tenant now requires multi-factor authentication; sign in again interactively"
        )),
        Some(7000222 | 7000215) => GrantError::Client(format!(
            "{said}: the client secret expired or is wrong; {ENTRA_APP} > Certificates & secrets > New client secret, and put it in [providers.microsoft] client_secret"
        )),
        Some(65001) => GrantError::Client(format!(
            "{said}: consent is missing; a tenant admin must grant admin consent ({ENTRA_APP} > API permissions > Grant admin consent), or the user must consent with `xoauth2-proxy login`"
        )),
        Some(700016) => GrantError::Client(format!(
            "{said}: the app is not known in this tenant; check client_id and tenant in [providers.microsoft] against the app registration's Overview page"
        )),
        Some(7000218) => GrantError::Client(format!(
            "{said}: public client flows are off for this app; {ENTRA_APP} > Authentication > Advanced settings > Allow public client flows = Yes (needed for --device)"
        )),
        _ => match code {
            "invalid_grant" => GrantError::Revoked(format!(
                "Microsoft refused the refresh token: {said}; it was revoked or expired"
            )),
            "temporarily_unavailable" => GrantError::Temporary {
                detail: format!("Microsoft's token endpoint is temporarily unavailable: {said}"),
                retry_after: None,
            },
            "invalid_client" | "unauthorized_client" => GrantError::Client(format!(
                "Microsoft refused the OAuth client: {said}; check client_id, client_secret and tenant in [providers.microsoft] ({ENTRA_APP})"
            )),
            "invalid_scope" => GrantError::Client(format!(
                "Microsoft refused the scope: {said}; the app needs the Office 365 Exchange Online permissions IMAP.AccessAsUser.All, POP.AccessAsUser.All and SMTP.Send"
            )),
            _ => GrantError::Client(format!("token endpoint refused the request: {said}")),
        },
    }
}

/// `code (first line of the description)`: Microsoft appends trace and correlation ids.
fn first_line(r: &Refusal) -> String {
    let description = r
        .description
        .as_deref()
        .and_then(|d| d.lines().next())
        .map(|d| d.chars().take(300).collect::<String>());
    match description {
        Some(d) => format!("{} ({d})", r.code),
        None => r.code.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: &str, description: &str) -> GrantError {
        refusal(&Refusal {
            status: 400,
            code: code.into(),
            description: Some(description.into()),
        })
    }

    #[test]
    fn aadsts_errors_fall_in_the_three_classes_with_their_fix() {
        let cases = [
            (
                "invalid_grant",
                "AADSTS70043: The refresh token has expired due to inactivity.\r\nTrace ID: 1",
                "revoked",
                "authorize again",
            ),
            (
                "invalid_grant",
                "AADSTS700082: The refresh token has expired",
                "revoked",
                "authorize again",
            ),
            (
                "invalid_grant",
                "AADSTS50076: Due to a configuration change",
                "revoked",
                "multi-factor",
            ),
            (
                "invalid_client",
                "AADSTS7000222: The provided client secret keys are expired.",
                "client",
                "New client secret",
            ),
            (
                "invalid_grant",
                "AADSTS65001: The user or administrator has not consented",
                "client",
                "Grant admin consent",
            ),
            (
                "unauthorized_client",
                "AADSTS700016: Application with identifier 'x' was not found",
                "client",
                "tenant",
            ),
            (
                "invalid_client",
                "AADSTS7000218: The request body must contain client_assertion",
                "client",
                "Allow public client flows",
            ),
            (
                "temporarily_unavailable",
                "AADSTS90033: A transient error has occurred",
                "temporary",
                "temporarily",
            ),
        ];
        for (code, description, class, fix) in cases {
            let e = refused(code, description);
            let got = match &e {
                GrantError::Revoked(_) => "revoked",
                GrantError::Client(_) => "client",
                GrantError::Temporary { .. } => "temporary",
            };
            assert_eq!(got, class, "{description}");
            assert!(e.to_string().contains(fix), "{description}: {e}");
            assert!(!e.to_string().contains("Trace ID"), "{e}");
        }
    }

    #[test]
    fn outlook_com_accounts_submit_mail_to_the_consumer_host() {
        let ms = Microsoft;
        assert_eq!(
            ms.default_upstream_for(Protocol::Smtp, "bob@Hotmail.com"),
            "smtp-mail.outlook.com:587"
        );
        assert_eq!(
            ms.default_upstream_for(Protocol::Smtp, "bob@contoso.com"),
            "smtp.office365.com:587"
        );
        assert_eq!(
            ms.default_upstream_for(Protocol::Imap, "bob@outlook.com"),
            "outlook.office365.com:993"
        );
        assert!(is_consumer("a@outlook.com.br"));
        assert!(is_consumer("a@live.com"));
        assert!(!is_consumer("a@notoutlook.com"));
        assert!(ms.default_upstream_starttls(Protocol::Smtp));
        assert!(!ms.default_upstream_starttls(Protocol::Imap));
    }

    #[test]
    fn throttling_and_disabled_smtp_auth_are_recognised() {
        let ms = Microsoft;
        let line = "NO Request is throttled. Suggested Backoff Time: 1500 milliseconds";
        assert_eq!(
            ms.upstream_refusal(Protocol::Imap, line, "bob@contoso.com"),
            Some(UpstreamVerdict::Throttled(Duration::from_millis(1500)))
        );
        let absurd = "NO Request is throttled. Suggested Backoff Time: 999999999 milliseconds";
        assert_eq!(throttled(absurd), Some(MAX_BACKOFF));
        assert_eq!(
            ms.upstream_refusal(Protocol::Imap, "NO AUTHENTICATE failed.", "b@c.com"),
            None
        );
        let smtp = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.";
        let Some(UpstreamVerdict::Blocked { reply, fix }) =
            ms.upstream_refusal(Protocol::Smtp, smtp, "bob@contoso.com")
        else {
            panic!("not recognised");
        };
        assert!(reply.starts_with("535 5.7.139 "), "{reply}");
        for text in [&reply, &fix] {
            assert!(text.contains("Set-CASMailbox -Identity bob@contoso.com -SmtpClientAuthenticationDisabled $false"), "{text}");
        }
        assert_eq!(
            ms.upstream_refusal(
                Protocol::Smtp,
                "535 5.7.3 Authentication unsuccessful",
                "b@c.com"
            ),
            None
        );
    }

    #[test]
    fn one_consent_asks_for_every_mail_protocol_and_offline_access() {
        assert_eq!(
            Microsoft.login_scopes(),
            [IMAP_SCOPE, POP_SCOPE, SMTP_SCOPE, OFFLINE_SCOPE]
        );
    }
}

//! The `accounts` report: one row per configured account from the config, the store and, when
//! `serve` runs, its published token status. Nothing secret is in a row.

use crate::clock::format_age;
use crate::config::Config;
use crate::registry::grant::refresh_token_attention;
use crate::store::StoreData;

/// How an account gets its access tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// A stored refresh token from `login` or `import`.
    Authorized,
    ServiceAccount,
    /// Microsoft client credentials: the app's secret, no login.
    AppOnly,
    /// Nothing yet: `login` is needed.
    Missing,
}

impl CredentialKind {
    pub fn words(self) -> &'static str {
        match self {
            CredentialKind::Authorized => "authorized",
            CredentialKind::ServiceAccount => "service account",
            CredentialKind::AppOnly => "app-only",
            CredentialKind::Missing => "missing",
        }
    }
}

/// One row of `accounts`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccountReport {
    pub email: String,
    pub credential: CredentialKind,
    /// Unix seconds; only known from a running `serve`.
    pub access_token_expires_at: Option<i64>,
    /// The access token's state in words (`in 42 min`, `not cached: serve is not running`).
    pub access_token: String,
    pub refresh_token_obtained_at: Option<i64>,
    pub refresh_token_age_secs: Option<i64>,
    pub refresh_token_expires_at: Option<i64>,
    pub passwords: usize,
    /// The app passwords' labels and creation times (never a password or its hash).
    pub password_labels: Vec<PasswordLabel>,
    /// What to do, most urgent first; empty when all is well.
    pub attention: Vec<String>,
}

/// One app password as the report shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PasswordLabel {
    pub label: String,
    pub created_at: i64,
}

/// The `accounts` rows: config, store and (if `serve` runs) its token status, as of `now`.
pub fn report(
    config: &Config,
    data: &StoreData,
    serve: Option<&crate::oauth::status::Status>,
    now: i64,
) -> Vec<AccountReport> {
    config
        .accounts
        .iter()
        .map(|a| {
            let key = a.key();
            let secrets = data.account(&key);
            let mut attention = Vec::new();
            let credential = if let Some(path) = &a.service_account_key {
                if let Err(e) = crate::oauth::service_account::ServiceAccount::load(path) {
                    attention.push(e);
                }
                attention.extend(crate::oauth::service_account::ServiceAccount::exposure(
                    path,
                ));
                CredentialKind::ServiceAccount
            } else if a.app_only {
                CredentialKind::AppOnly
            } else if secrets.is_some_and(|s| s.refresh_token.is_some()) {
                CredentialKind::Authorized
            } else {
                attention.push(format!(
                    "not authorized yet: run `xoauth2-proxy login {}`",
                    a.email
                ));
                CredentialKind::Missing
            };
            if credential != CredentialKind::ServiceAccount {
                if let Err(e) = config.oauth_client(a) {
                    attention.push(e);
                }
            }
            let live = serve.and_then(|s| s.accounts.get(key.as_str()));
            let expires = live.and_then(|l| l.access_token_expires_at);
            let access_token = match (serve, expires) {
                (None, _) => "not cached: serve is not running".to_string(),
                (Some(s), None) => format!("none yet in serve (pid {})", s.pid),
                (Some(_), Some(at)) if at <= now => "expired (serve refreshes on next use)".into(),
                (Some(_), Some(at)) => format!("in {}", format_age(at - now)),
            };
            if let Some(error) = live.and_then(|l| l.last_error.as_ref()) {
                attention.push(format!(
                    "the running proxy's last token request failed: {error}"
                ));
            }
            let obtained = secrets.and_then(|s| s.refresh_token_obtained_at);
            let rt_expires = secrets.and_then(|s| s.refresh_token_expires_at);
            // The 7-day and announced-end warnings are about Google's grants.
            if credential == CredentialKind::Authorized && a.provider.id() == "google" {
                attention.extend(refresh_token_attention(&a.email, obtained, rt_expires, now));
            }
            let passwords = secrets.map(|s| s.passwords.len()).unwrap_or(0);
            if passwords == 0 {
                attention.push(format!(
                    "no app password yet: run `xoauth2-proxy password add {}`",
                    a.email
                ));
            }
            AccountReport {
                email: a.email.clone(),
                credential,
                access_token_expires_at: expires,
                access_token,
                refresh_token_obtained_at: obtained
                    .filter(|_| credential == CredentialKind::Authorized),
                refresh_token_age_secs: obtained
                    .filter(|_| credential == CredentialKind::Authorized)
                    .map(|o| (now - o).max(0)),
                refresh_token_expires_at: rt_expires
                    .filter(|_| credential == CredentialKind::Authorized),
                passwords,
                password_labels: secrets
                    .map(|s| {
                        s.passwords
                            .iter()
                            .map(|p| PasswordLabel {
                                label: p.label.clone(),
                                created_at: p.created_at,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                attention,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const NOW: i64 = 1_767_225_600;
    const DAY: i64 = 86_400;

    #[test]
    fn report_rows_say_what_each_account_needs() {
        let config = Config::parse(
            "state_dir = \"s\"\n[providers.google]\nclient_id = \"id\"\nclient_secret = \"sec\"\n[[account]]\nemail = \"Alice@x.com\"\n[[account]]\nemail = \"bob@x.com\"\n[[account]]\nemail = \"svc@x.com\"\nservice_account_key = \"missing.json\"\n",
            Path::new("/nonexistent/config.toml"),
        )
        .unwrap();
        let mut data = StoreData::default();
        let alice = data.account_mut(&crate::account::AccountKey::new("alice@x.com"));
        alice.refresh_token = Some("1//r".into());
        alice.refresh_token_obtained_at = Some(NOW - 2 * DAY);
        alice.passwords.push(crate::store::PasswordEntry {
            label: "laptop".into(),
            hash: "h".into(),
            created_at: NOW,
        });
        let mut status = crate::oauth::status::Status {
            pid: 7,
            updated_at: NOW,
            ..Default::default()
        };
        status.accounts.insert(
            "alice@x.com".into(),
            crate::oauth::status::AccountStatus {
                access_token_expires_at: Some(NOW + 42 * 60),
                ..Default::default()
            },
        );
        let rows = report(&config, &data, Some(&status), NOW);
        assert_eq!(rows[0].email, "Alice@x.com");
        assert_eq!(rows[0].credential, CredentialKind::Authorized);
        assert_eq!(rows[0].access_token, "in 42 min");
        assert_eq!(rows[0].refresh_token_age_secs, Some(2 * DAY));
        assert_eq!(rows[0].passwords, 1);
        assert_eq!(rows[0].password_labels[0].label, "laptop");
        assert!(rows[0].attention.is_empty(), "{:?}", rows[0].attention);
        assert_eq!(rows[1].credential, CredentialKind::Missing);
        assert!(rows[1].attention[0].contains("xoauth2-proxy login bob@x.com"));
        assert!(rows[1].access_token.contains("none yet"));
        assert_eq!(rows[2].credential, CredentialKind::ServiceAccount);
        assert!(rows[2].attention[0].contains("cannot read the service account key"));
        let offline = report(&config, &data, None, NOW);
        assert_eq!(offline[0].access_token, "not cached: serve is not running");
        let json = serde_json::to_value(&offline).unwrap();
        assert_eq!(json[2]["credential"], "service_account");
    }
}

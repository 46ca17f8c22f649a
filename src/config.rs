//! The TOML config: parsed with unknown keys refused (toml reports the key and its line),
//! then validated and turned into typed values with every path resolved against the config
//! file's folder and every default filled in.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::oauth::google;
use crate::oauth::provider::{self, Provider};
use crate::secret::Secret;

pub const GOOGLE_AUTH_URL: &str = google::AUTH_URL;
pub const GOOGLE_TOKEN_URL: &str = google::TOKEN_URL;
pub const GMAIL_SCOPE: &str = google::GMAIL_SCOPE;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("no config file given: pass -c FILE, set XOAUTH2_PROXY_CONFIG, or create {0}")]
    NoDefault(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Imap,
    Smtp,
    Pop3,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Smtp => "smtp",
            Protocol::Pop3 => "pop3",
        }
    }

    /// Where a listener without `upstream` connects: the default provider's host.
    pub fn default_upstream(self) -> &'static str {
        provider::default_provider().default_upstream(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LocalTls {
    #[default]
    None,
    Starttls,
    Implicit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    #[default]
    Implicit,
    Starttls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    File,
    Keyring,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    #[serde(default)]
    store: RawStore,
    tls: Option<RawTls>,
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    providers: RawProviders,
    #[serde(default)]
    account: Vec<RawAccount>,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default)]
    kind: StoreKind,
    key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    protocol: Protocol,
    bind: String,
    #[serde(default)]
    local_tls: LocalTls,
    upstream: Option<String>,
    #[serde(default)]
    upstream_tls: UpstreamTls,
    upstream_ca: Option<PathBuf>,
    #[serde(default)]
    allow_plaintext_remote: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProviders {
    google: Option<RawGoogle>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGoogle {
    client_id: Option<String>,
    client_secret: Option<Secret>,
    auth_url: Option<String>,
    token_url: Option<String>,
    scope: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    email: String,
    client_id: Option<String>,
    client_secret: Option<Secret>,
    service_account_key: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    preauth_timeout_secs: Option<u64>,
    upstream_timeout_secs: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    imap_connections_per_account: Option<usize>,
}

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub state_dir: PathBuf,
    pub store: StoreConfig,
    pub tls: Option<TlsFiles>,
    pub listeners: Vec<ListenerConfig>,
    pub google: GoogleConfig,
    pub accounts: Vec<AccountConfig>,
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// A master key file outside the state dir (containers, systemd credentials).
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub protocol: Protocol,
    pub bind: SocketAddr,
    pub local_tls: LocalTls,
    pub upstream_host: String,
    pub upstream_port: u16,
    pub upstream_tls: UpstreamTls,
    pub upstream_ca: Option<PathBuf>,
}

impl ListenerConfig {
    pub fn upstream(&self) -> String {
        format!("{}:{}", self.upstream_host, self.upstream_port)
    }
}

#[derive(Debug, Clone)]
pub struct GoogleConfig {
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub auth_url: String,
    pub token_url: String,
    pub scope: String,
}

#[derive(Debug, Clone)]
pub struct AccountConfig {
    /// As written in the config; compare with `key()`.
    pub email: String,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub service_account_key: Option<PathBuf>,
}

impl AccountConfig {
    /// The case-insensitive identity used for lookups and in the store.
    pub fn key(&self) -> String {
        normalize_email(&self.email)
    }
}

pub fn normalize_email(email: &str) -> String {
    email.trim().to_ascii_lowercase()
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub preauth_timeout: Duration,
    pub upstream_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Gmail allows 15 simultaneous IMAP connections per account; more are refused here.
    pub imap_connections_per_account: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            preauth_timeout: Duration::from_secs(60),
            upstream_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            imap_connections_per_account: 15,
        }
    }
}

/// `-c FILE`, else `$XOAUTH2_PROXY_CONFIG`, else the XDG config location.
pub fn resolve_path(explicit: Option<&Path>) -> Result<PathBuf, ConfigError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("XOAUTH2_PROXY_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".config"),
            None => {
                return Err(ConfigError::NoDefault(
                    "~/.config/xoauth2-proxy/config.toml".into(),
                ))
            }
        },
    };
    Ok(base.join("xoauth2-proxy").join("config.toml"))
}

fn default_state_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("XDG_STATE_HOME").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p).join("xoauth2-proxy"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/xoauth2-proxy"))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parse config text as if it were read from `path` (relative paths resolve against its folder).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: one_line_toml_error(&e),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        let state_dir = match &raw.state_dir {
            Some(p) => resolve(p),
            None => default_state_dir().ok_or_else(|| {
                invalid("state_dir is not set and neither XDG_STATE_HOME nor HOME is".into())
            })?,
        };

        let tls = raw.tls.as_ref().map(|t| TlsFiles {
            cert: resolve(&t.cert),
            key: resolve(&t.key),
        });

        let mut listeners = Vec::new();
        let mut binds = HashSet::new();
        for (i, l) in raw.listener.iter().enumerate() {
            let which = format!("listener #{} ({} on {})", i + 1, l.protocol.name(), l.bind);
            let bind: SocketAddr = l.bind.parse().map_err(|_| {
                invalid(format!(
                    "{which}: bind must be IP:PORT such as 127.0.0.1:1143 or [::1]:1143"
                ))
            })?;
            // Port 0 (tests, `check`) asks the OS for a fresh port each time: no clash.
            if bind.port() != 0 && !binds.insert(bind) {
                return Err(invalid(format!(
                    "{which}: another listener already binds {bind}"
                )));
            }
            if l.local_tls != LocalTls::None && tls.is_none() {
                return Err(invalid(format!(
                    "{which}: local_tls = {:?} needs a [tls] section with cert and key (run `xoauth2-proxy cert` to make them)",
                    l.local_tls
                )
                .replace("Starttls", "\"starttls\"")
                .replace("Implicit", "\"implicit\"")));
            }
            if l.local_tls == LocalTls::None
                && !bind.ip().is_loopback()
                && !l.allow_plaintext_remote
            {
                return Err(invalid(format!(
                    "{which}: local_tls = \"none\" on a non-loopback address would send passwords in clear; use local_tls = \"starttls\" or \"implicit\", or set allow_plaintext_remote = true"
                )));
            }
            let upstream = l
                .upstream
                .clone()
                .unwrap_or_else(|| l.protocol.default_upstream().to_string());
            let (host, port) = split_host_port(&upstream).ok_or_else(|| {
                invalid(format!(
                    "{which}: upstream must be HOST:PORT, got {upstream:?}"
                ))
            })?;
            listeners.push(ListenerConfig {
                protocol: l.protocol,
                bind,
                local_tls: l.local_tls,
                upstream_host: host,
                upstream_port: port,
                upstream_tls: l.upstream_tls,
                upstream_ca: l.upstream_ca.as_deref().map(resolve),
            });
        }

        let g = raw.providers.google.unwrap_or_default();
        let google = GoogleConfig {
            client_id: g.client_id.filter(|s| !s.trim().is_empty()),
            client_secret: g.client_secret.filter(|s| !s.is_empty()),
            auth_url: g.auth_url.unwrap_or_else(|| GOOGLE_AUTH_URL.to_string()),
            token_url: g.token_url.unwrap_or_else(|| GOOGLE_TOKEN_URL.to_string()),
            scope: g.scope.unwrap_or_else(|| GMAIL_SCOPE.to_string()),
        };
        for (key, url) in [
            ("auth_url", &google.auth_url),
            ("token_url", &google.token_url),
        ] {
            check_endpoint_url(url)
                .map_err(|m| invalid(format!("[providers.google] {key} = {url:?}: {m}")))?;
        }

        let mut accounts = Vec::new();
        let mut emails = HashSet::new();
        for a in &raw.account {
            let email = a.email.trim().to_string();
            if !is_plausible_email(&email) {
                return Err(invalid(format!(
                    "[[account]] email = {:?} is not an email address",
                    a.email
                )));
            }
            if !emails.insert(normalize_email(&email)) {
                return Err(invalid(format!("[[account]] {email} is listed twice")));
            }
            accounts.push(AccountConfig {
                email,
                client_id: a.client_id.clone().filter(|s| !s.trim().is_empty()),
                client_secret: a.client_secret.clone().filter(|s| !s.is_empty()),
                service_account_key: a.service_account_key.as_deref().map(resolve),
            });
        }

        let d = Limits::default();
        let limits = Limits {
            max_connections: raw
                .limits
                .max_connections
                .unwrap_or(d.max_connections)
                .max(1),
            preauth_timeout: raw
                .limits
                .preauth_timeout_secs
                .map(Duration::from_secs)
                .unwrap_or(d.preauth_timeout),
            upstream_timeout: raw
                .limits
                .upstream_timeout_secs
                .map(Duration::from_secs)
                .unwrap_or(d.upstream_timeout),
            shutdown_grace: raw
                .limits
                .shutdown_grace_secs
                .map(Duration::from_secs)
                .unwrap_or(d.shutdown_grace),
            imap_connections_per_account: raw
                .limits
                .imap_connections_per_account
                .unwrap_or(d.imap_connections_per_account)
                .max(1),
        };

        Ok(Config {
            path: path.to_path_buf(),
            state_dir,
            store: StoreConfig {
                kind: raw.store.kind,
                key_file: raw.store.key_file.as_deref().map(resolve),
            },
            tls,
            listeners,
            google,
            accounts,
            limits,
        })
    }

    pub fn account(&self, email: &str) -> Option<&AccountConfig> {
        let key = normalize_email(email);
        self.accounts.iter().find(|a| a.key() == key)
    }

    /// The OAuth client an account uses: its own keys, else `[providers.google]`.
    pub fn oauth_client(&self, account: &AccountConfig) -> Result<OAuthClient, String> {
        let client_id = account
            .client_id
            .clone()
            .or_else(|| self.google.client_id.clone())
            .ok_or_else(|| {
                format!(
                    "no OAuth client for {}: set client_id and client_secret in [providers.google] (a Google Cloud \"Desktop app\" OAuth client)",
                    account.email
                )
            })?;
        let client_secret = account
            .client_secret
            .clone()
            .or_else(|| self.google.client_secret.clone());
        Ok(OAuthClient {
            provider: &google::Google,
            client_id,
            client_secret,
            auth_url: self.google.auth_url.clone(),
            token_url: self.google.token_url.clone(),
            scope: self.google.scope.clone(),
        })
    }
}

/// Everything needed to talk to the token endpoint for one account.
#[derive(Debug, Clone)]
pub struct OAuthClient {
    /// Whose endpoints these are: it gives refusals their meaning.
    pub provider: &'static dyn Provider,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub auth_url: String,
    pub token_url: String,
    pub scope: String,
}

fn one_line_toml_error(e: &toml::de::Error) -> String {
    // toml's message is "TOML parse error at line L, column C\n | ...\n | ^\n<reason>"; keep the
    // location and the reason, drop the source excerpt.
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let head = lines.next().unwrap_or_default().to_string();
    let reason = text
        .lines()
        .map(str::trim)
        .rfind(|l| {
            !l.is_empty() && !l.starts_with('|') && !l.starts_with(|c: char| c.is_ascii_digit())
        })
        .unwrap_or_default();
    if reason == head || reason.is_empty() {
        head
    } else {
        format!(
            "{}: {}",
            head.trim_start_matches("TOML parse error at "),
            reason
        )
    }
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.trim().rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host.to_string(), port))
}

fn check_endpoint_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match parsed.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err("http:// is only allowed for a loopback host; use https://".into())
            }
        }
        other => Err(format!("unsupported scheme {other}://")),
    }
}

fn is_plausible_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/xo/config.toml"))
    }

    #[test]
    fn minimal_config_gets_gmail_defaults_and_relative_paths() {
        let c = parse(
            r#"
state_dir = "state"
[tls]
cert = "../certs/c.pem"
key = "/abs/k.pem"
[[listener]]
protocol = "imap"
bind = "127.0.0.1:1143"
upstream_ca = "ca.pem"
[[listener]]
protocol = "smtp"
bind = "127.0.0.1:1587"
[[account]]
email = "Alice@Gmail.com"
"#,
        )
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/etc/xo/state"));
        let tls = c.tls.clone().unwrap();
        assert_eq!(tls.cert, PathBuf::from("/etc/xo/../certs/c.pem"));
        assert_eq!(tls.key, PathBuf::from("/abs/k.pem"));
        assert_eq!(c.listeners[0].upstream(), "imap.gmail.com:993");
        assert_eq!(c.listeners[0].upstream_tls, UpstreamTls::Implicit);
        assert_eq!(
            c.listeners[0].upstream_ca,
            Some(PathBuf::from("/etc/xo/ca.pem"))
        );
        assert_eq!(c.listeners[1].upstream(), "smtp.gmail.com:465");
        assert_eq!(c.google.token_url, GOOGLE_TOKEN_URL);
        assert_eq!(c.google.scope, "https://mail.google.com/");
        assert!(c.account("alice@gmail.com").is_some());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse("state_dir = \"s\"\n\n[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:1\"\nport = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 6"), "{err}");
        assert!(err.contains("port"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn plaintext_on_a_remote_bind_is_refused_unless_allowed() {
        let base =
            "state_dir = \"s\"\n[[listener]]\nprotocol = \"imap\"\nbind = \"0.0.0.0:1143\"\n";
        let err = parse(base).unwrap_err().to_string();
        assert!(err.contains("allow_plaintext_remote"), "{err}");
        assert!(parse(&format!("{base}allow_plaintext_remote = true\n")).is_ok());
    }

    #[test]
    fn local_tls_without_certificate_is_refused() {
        let err = parse("state_dir = \"s\"\n[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:1\"\nlocal_tls = \"implicit\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("[tls]"), "{err}");
    }

    #[test]
    fn http_token_url_only_on_loopback() {
        let ok =
            "state_dir = \"s\"\n[providers.google]\ntoken_url = \"http://127.0.0.1:9/token\"\n";
        assert!(parse(ok).is_ok());
        let bad =
            "state_dir = \"s\"\n[providers.google]\ntoken_url = \"http://example.com/token\"\n";
        assert!(parse(bad).unwrap_err().to_string().contains("loopback"));
    }

    #[test]
    fn duplicate_accounts_and_binds_are_refused() {
        let dup = "state_dir = \"s\"\n[[account]]\nemail = \"a@x.com\"\n[[account]]\nemail = \"A@x.com\"\n";
        assert!(parse(dup).unwrap_err().to_string().contains("twice"));
        let binds = "state_dir = \"s\"\n[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:1\"\n[[listener]]\nprotocol = \"pop3\"\nbind = \"127.0.0.1:1\"\n";
        assert!(parse(binds)
            .unwrap_err()
            .to_string()
            .contains("already binds"));
    }

    #[test]
    fn account_client_overrides_provider_client() {
        let c = parse("state_dir = \"s\"\n[providers.google]\nclient_id = \"g\"\nclient_secret = \"gs\"\n[[account]]\nemail = \"a@x.com\"\nclient_id = \"own\"\n[[account]]\nemail = \"b@x.com\"\n").unwrap();
        assert_eq!(c.oauth_client(&c.accounts[0]).unwrap().client_id, "own");
        assert_eq!(c.oauth_client(&c.accounts[1]).unwrap().client_id, "g");
    }
}

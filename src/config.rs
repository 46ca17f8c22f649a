//! The TOML config: parsed with unknown keys refused (toml reports the key and its line),
//! then validated and turned into typed values with every path resolved against the config
//! file's folder and every default filled in.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::account::AccountKey;
pub use crate::protocol::Protocol;
use crate::provider::{self, google, microsoft, Provider};
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
enum RawStoreKind {
    #[default]
    File,
    Keyring,
    Redis,
}

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreKind {
    /// `store.enc` in the state dir.
    #[default]
    File,
    /// The file, with its key in the OS keyring.
    Keyring,
    /// A Redis shared by every process of a deployment; the URL may hold a password.
    Redis { url: Secret, prefix: String },
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
    admin: Option<RawAdmin>,
    #[serde(default)]
    log_format: LogFormat,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    bind: String,
    #[serde(default)]
    account_labels: bool,
    password_hash: Option<Secret>,
    #[serde(default)]
    hosts: Vec<String>,
}

/// How `serve` writes its log lines on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people and journald.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The admin listener: metrics and health probes over HTTP.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// Per-account gauges carry an `account` label (opt-in: emails in the metrics store).
    pub account_labels: bool,
    /// Argon2 PHC hash of the admin password: set, the listener serves HTTPS with Basic auth
    /// (and may bind a non-loopback address).
    pub password_hash: Option<Secret>,
    /// Host names browsers may use to reach it, besides loopback names and the bind address.
    pub hosts: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default)]
    kind: RawStoreKind,
    key_file: Option<PathBuf>,
    url: Option<Secret>,
    prefix: Option<String>,
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
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProviders {
    google: Option<RawGoogle>,
    microsoft: Option<RawMicrosoft>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMicrosoft {
    client_id: Option<String>,
    client_secret: Option<Secret>,
    tenant: Option<String>,
    auth_url: Option<String>,
    token_url: Option<String>,
    device_url: Option<String>,
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
    provider: Option<String>,
    #[serde(default)]
    app_only: bool,
    mailbox: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    preauth_timeout_secs: Option<u64>,
    upstream_timeout_secs: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    imap_connections_per_account: Option<usize>,
    max_pending_per_source: Option<usize>,
    imap_slot_wait_ms: Option<u64>,
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
    pub microsoft: MicrosoftConfig,
    pub accounts: Vec<AccountConfig>,
    pub limits: Limits,
    /// Off when `[admin]` is absent.
    pub admin: Option<AdminConfig>,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, PartialEq)]
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

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub protocol: Protocol,
    pub bind: SocketAddr,
    pub local_tls: LocalTls,
    pub upstream_host: String,
    pub upstream_port: u16,
    pub upstream_tls: UpstreamTls,
    pub upstream_ca: Option<PathBuf>,
    /// Every connection starts with a PROXY protocol header (v1 or v2) naming the real client.
    pub proxy_protocol: bool,
    /// The only peers whose PROXY headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// No `upstream` was given: each login goes to its account's provider's host (the
    /// `upstream_*` fields then name the default provider's, for messages).
    pub upstream_routed: bool,
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

/// `[providers.microsoft]`, with `{tenant}` already put into the endpoints.
#[derive(Debug, Clone)]
pub struct MicrosoftConfig {
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub tenant: String,
    pub auth_url: String,
    pub token_url: String,
    pub device_url: String,
}

#[derive(Debug, Clone)]
pub struct AccountConfig {
    /// As written in the config; compare with `key()`.
    pub email: String,
    /// The email normalized, made once here.
    key: AccountKey,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub service_account_key: Option<PathBuf>,
    /// Whose account this is (`provider = "microsoft"`; default Google).
    pub provider: &'static dyn Provider,
    /// Microsoft client credentials: no user, no refresh token (`app_only = true`).
    pub app_only: bool,
    /// Log in upstream as this mailbox with the account's token (a shared mailbox).
    pub mailbox: Option<String>,
}

impl AccountConfig {
    /// The case-insensitive identity used for lookups and in the store.
    pub fn key(&self) -> AccountKey {
        self.key.clone()
    }

    /// The mailbox upstream logs in as: XOAUTH2's `user=`.
    pub fn login_user(&self) -> &str {
        self.mailbox.as_deref().unwrap_or(&self.email)
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub preauth_timeout: Duration,
    pub upstream_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Simultaneous upstream IMAP sessions per account; more are refused here. None: the
    /// provider's own limit (Gmail 15, Exchange Online 20).
    pub imap_connections_per_account: Option<usize>,
    /// Connections from one address (IPv6: one /64) that may be logging in at once.
    pub max_pending_per_source: usize,
    /// How long a login that finds the account's IMAP sessions all taken waits for one to end:
    /// a client that logs out and straight back in must not be refused for the release's lag.
    pub imap_slot_wait: Duration,
}

impl Limits {
    /// The IMAP sessions an account of `provider` may have open upstream at once.
    pub fn imap_sessions(&self, provider: &dyn Provider) -> usize {
        self.imap_connections_per_account
            .unwrap_or_else(|| provider.imap_sessions())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            preauth_timeout: Duration::from_secs(60),
            upstream_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            imap_connections_per_account: None,
            max_pending_per_source: 64,
            imap_slot_wait: Duration::from_secs(2),
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
        let cx = Context::new(path);
        let state_dir = match &raw.state_dir {
            Some(p) => cx.resolve(p),
            None => default_state_dir().ok_or_else(|| {
                cx.invalid("state_dir is not set and neither XDG_STATE_HOME nor HOME is".into())
            })?,
        };
        let tls = raw.tls.as_ref().map(|t| TlsFiles {
            cert: cx.resolve(&t.cert),
            key: cx.resolve(&t.key),
        });
        Ok(Config {
            path: path.to_path_buf(),
            state_dir,
            store: store(&raw.store, &cx)?,
            listeners: listeners(&raw.listener, tls.is_some(), &cx)?,
            tls,
            accounts: accounts(&raw.account, &raw.providers, &cx)?,
            google: google(raw.providers.google.unwrap_or_default(), &cx)?,
            microsoft: microsoft(raw.providers.microsoft.unwrap_or_default(), &cx)?,
            limits: limits(&raw.limits, &cx)?,
            admin: raw
                .admin
                .as_ref()
                .map(|a| admin(a, raw.tls.is_some(), &cx))
                .transpose()?,
            log_format: raw.log_format,
        })
    }

    pub fn account(&self, email: &str) -> Option<&AccountConfig> {
        let key = AccountKey::new(email);
        self.accounts.iter().find(|a| a.key() == key)
    }

    /// The OAuth client an account uses: its own keys, else its provider's section.
    pub fn oauth_client(&self, account: &AccountConfig) -> Result<OAuthClient, String> {
        if account.provider.id() == microsoft::Microsoft.id() {
            return self.microsoft_client(account);
        }
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

impl Config {
    fn microsoft_client(&self, account: &AccountConfig) -> Result<OAuthClient, String> {
        let ms = &self.microsoft;
        let client_id = account
            .client_id
            .clone()
            .or_else(|| ms.client_id.clone())
            .ok_or_else(|| {
                format!(
                    "no OAuth client for {}: set client_id in [providers.microsoft] (an Entra app registration)",
                    account.email
                )
            })?;
        let scope = if account.app_only {
            microsoft::APP_ONLY_SCOPE.to_string()
        } else {
            microsoft::Microsoft.login_scopes().join(" ")
        };
        Ok(OAuthClient {
            provider: &microsoft::Microsoft,
            client_id,
            client_secret: account
                .client_secret
                .clone()
                .or_else(|| ms.client_secret.clone()),
            auth_url: ms.auth_url.clone(),
            token_url: ms.token_url.clone(),
            scope,
        })
    }

    /// The device authorization endpoint for an account's provider, if it offers one.
    pub fn device_url(&self, account: &AccountConfig) -> Option<String> {
        match account.provider.id() {
            "microsoft" => Some(self.microsoft.device_url.clone()),
            _ => account.provider.endpoints().device_url.map(str::to_string),
        }
    }
}

/// Whether a grant's `scope` covers every scope asked for (offline_access is no scope of a
/// token, so providers do not echo it).
pub fn scope_covered(wanted: &str, granted: &str) -> bool {
    wanted
        .split_whitespace()
        .filter(|w| *w != microsoft::OFFLINE_SCOPE)
        .all(|w| granted.split_whitespace().any(|g| g == w))
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

/// Where the config came from: for error messages and relative paths.
struct Context {
    path: PathBuf,
    base: PathBuf,
}

impl Context {
    fn new(path: &Path) -> Context {
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        Context {
            path: path.to_path_buf(),
            base,
        }
    }

    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            message,
        }
    }

    /// A path from the config, relative to the config file's folder.
    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

fn listeners(
    raw: &[RawListener],
    have_tls: bool,
    cx: &Context,
) -> Result<Vec<ListenerConfig>, ConfigError> {
    let mut listeners = Vec::new();
    let mut binds = HashSet::new();
    for (i, l) in raw.iter().enumerate() {
        let which = format!("listener #{} ({} on {})", i + 1, l.protocol.name(), l.bind);
        let bind: SocketAddr = l.bind.parse().map_err(|_| {
            cx.invalid(format!(
                "{which}: bind must be IP:PORT such as 127.0.0.1:1143 or [::1]:1143"
            ))
        })?;
        // Port 0 (tests, `check`) asks the OS for a fresh port each time: no clash.
        if bind.port() != 0 && !binds.insert(bind) {
            return Err(cx.invalid(format!("{which}: another listener already binds {bind}")));
        }
        if l.local_tls != LocalTls::None && !have_tls {
            return Err(cx.invalid(format!(
                    "{which}: local_tls = {:?} needs a [tls] section with cert and key (run `xoauth2-proxy cert` to make them)",
                    l.local_tls
                )
                .replace("Starttls", "\"starttls\"")
                .replace("Implicit", "\"implicit\"")));
        }
        if l.local_tls == LocalTls::None && !bind.ip().is_loopback() && !l.allow_plaintext_remote {
            return Err(cx.invalid(format!(
                    "{which}: local_tls = \"none\" on a non-loopback address would send passwords in clear; use local_tls = \"starttls\" or \"implicit\", or set allow_plaintext_remote = true"
                )));
        }
        let upstream_routed = l.upstream.is_none();
        let upstream = l.upstream.clone().unwrap_or_else(|| {
            provider::default_provider()
                .default_upstream(l.protocol)
                .to_string()
        });
        let (host, port) = split_host_port(&upstream).ok_or_else(|| {
            cx.invalid(format!(
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
            upstream_ca: l.upstream_ca.as_deref().map(|p| cx.resolve(p)),
            proxy_protocol: l.proxy_protocol,
            trusted_proxies: trusted_proxies(l, &which, cx)?,
            upstream_routed,
        });
    }

    Ok(listeners)
}

/// A listener's `trusted_proxies`: CIDRs (a bare address is one host). Required with
/// `proxy_protocol`, since believing anyone's header would let any client pick its address.
fn trusted_proxies(
    l: &RawListener,
    which: &str,
    cx: &Context,
) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let nets = l
        .trusted_proxies
        .iter()
        .map(|t| {
            t.parse::<ipnet::IpNet>()
                .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    cx.invalid(format!(
                        "{which}: trusted_proxies entry {t:?} is not an address or CIDR such as 10.0.0.0/8"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if l.proxy_protocol && nets.is_empty() {
        return Err(cx.invalid(format!(
            "{which}: proxy_protocol = true needs trusted_proxies, the balancers' addresses (e.g. [\"127.0.0.1/32\"])"
        )));
    }
    Ok(nets)
}

fn admin(raw: &RawAdmin, have_tls: bool, cx: &Context) -> Result<AdminConfig, ConfigError> {
    let bind: SocketAddr = raw.bind.parse().map_err(|_| {
        cx.invalid(format!(
            "[admin] bind = {:?} must be IP:PORT such as 127.0.0.1:8025",
            raw.bind
        ))
    })?;
    let password_hash = raw.password_hash.clone().filter(|h| !h.is_empty());
    if let Some(hash) = &password_hash {
        if !is_argon2(hash.expose()) {
            return Err(cx.invalid(
                "[admin] password_hash is not an Argon2 hash; `xoauth2-proxy admin-password` prints one".into(),
            ));
        }
        if !have_tls {
            return Err(cx.invalid(
                "[admin] password_hash needs a [tls] section with cert and key: the admin listener then serves HTTPS, so the password never crosses the network in clear".into(),
            ));
        }
    }
    // Metrics, probes and the page name accounts and can authorize them: not for the network
    // without a login over TLS.
    if !bind.ip().is_loopback() && password_hash.is_none() {
        return Err(cx.invalid(format!(
            "[admin] bind = {bind}: without a login the admin listener serves loopback addresses only (127.0.0.1, ::1); for remote access set [admin] password_hash (`xoauth2-proxy admin-password` prints one) and a [tls] cert and key, or reach it through an SSH tunnel"
        )));
    }
    Ok(AdminConfig {
        bind,
        account_labels: raw.account_labels,
        password_hash,
        hosts: raw
            .hosts
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect(),
    })
}

/// Whether `phc` is an Argon2 PHC string (`$argon2id$v=19$m=...`).
fn is_argon2(phc: &str) -> bool {
    argon2::password_hash::PasswordHash::new(phc)
        .is_ok_and(|h| h.algorithm.as_str().starts_with("argon2"))
}

fn google(g: RawGoogle, cx: &Context) -> Result<GoogleConfig, ConfigError> {
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
            .map_err(|m| cx.invalid(format!("[providers.google] {key} = {url:?}: {m}")))?;
    }

    Ok(google)
}

fn microsoft(m: RawMicrosoft, cx: &Context) -> Result<MicrosoftConfig, ConfigError> {
    let tenant = m
        .tenant
        .map(|t| t.trim().to_string())
        .unwrap_or_else(|| microsoft::DEFAULT_TENANT.to_string());
    // The tenant goes into URL paths: a GUID, a domain, or common/organizations/consumers.
    if tenant.is_empty()
        || !tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(cx.invalid(format!(
            "[providers.microsoft] tenant = {tenant:?} must be common, organizations, consumers, a tenant ID (GUID) or a domain such as contoso.onmicrosoft.com"
        )));
    }
    let endpoint = |given: Option<String>, default: &str| {
        given
            .unwrap_or_else(|| default.to_string())
            .replace("{tenant}", &tenant)
    };
    let ms = MicrosoftConfig {
        client_id: m.client_id.filter(|s| !s.trim().is_empty()),
        client_secret: m.client_secret.filter(|s| !s.is_empty()),
        auth_url: endpoint(m.auth_url, microsoft::AUTH_URL),
        token_url: endpoint(m.token_url, microsoft::TOKEN_URL),
        device_url: endpoint(m.device_url, microsoft::DEVICE_URL),
        tenant,
    };
    for (key, url) in [
        ("auth_url", &ms.auth_url),
        ("token_url", &ms.token_url),
        ("device_url", &ms.device_url),
    ] {
        check_endpoint_url(url)
            .map_err(|m| cx.invalid(format!("[providers.microsoft] {key} = {url:?}: {m}")))?;
    }
    Ok(ms)
}

/// An account's `provider`, `app_only` and `mailbox`, checked against each other.
fn account_provider(
    a: &RawAccount,
    email: &str,
    providers: &RawProviders,
    cx: &Context,
) -> Result<&'static dyn Provider, ConfigError> {
    let provider = match a.provider.as_deref() {
        None => provider::default_provider(),
        Some(name) => provider::by_name(name.trim()).ok_or_else(|| {
            cx.invalid(format!(
                "[[account]] {email}: provider = {name:?} is not known; use \"google\" or \"microsoft\""
            ))
        })?,
    };
    let is_microsoft = provider.id() == microsoft::Microsoft.id();
    let refuse = |what: &str| Err(cx.invalid(format!("[[account]] {email}: {what}")));
    if !is_microsoft && (a.app_only || a.mailbox.is_some()) {
        return refuse(
            "app_only and mailbox are for Microsoft accounts; add provider = \"microsoft\"",
        );
    }
    if is_microsoft && a.service_account_key.is_some() {
        return refuse("service_account_key is for Google Workspace; a Microsoft account uses app_only = true for client credentials");
    }
    if let Some(mailbox) = &a.mailbox {
        if !is_plausible_email(mailbox.trim()) {
            return refuse(&format!("mailbox = {mailbox:?} is not an email address"));
        }
    }
    if a.app_only {
        let ms = providers.microsoft.as_ref();
        let has_secret = a.client_secret.as_ref().is_some_and(|s| !s.is_empty())
            || ms
                .and_then(|m| m.client_secret.as_ref())
                .is_some_and(|s| !s.is_empty());
        if !has_secret {
            return refuse("app_only = true needs a client_secret (in [providers.microsoft] or on the account): client credentials are a confidential client's grant");
        }
        let tenant = ms.and_then(|m| m.tenant.as_deref()).unwrap_or("common");
        if ["common", "organizations", "consumers"].contains(&tenant.trim()) {
            return refuse(&format!("app_only = true needs [providers.microsoft] tenant set to the tenant ID or domain, not {tenant:?}: client credentials are issued by one tenant"));
        }
    }
    Ok(provider)
}

fn accounts(
    raw: &[RawAccount],
    providers: &RawProviders,
    cx: &Context,
) -> Result<Vec<AccountConfig>, ConfigError> {
    let mut accounts = Vec::new();
    let mut emails = HashSet::new();
    for a in raw {
        let email = a.email.trim().to_string();
        if !is_plausible_email(&email) {
            return Err(cx.invalid(format!(
                "[[account]] email = {:?} is not an email address",
                a.email
            )));
        }
        if !emails.insert(AccountKey::new(&email)) {
            return Err(cx.invalid(format!("[[account]] {email} is listed twice")));
        }
        let provider = account_provider(a, &email, providers, cx)?;
        accounts.push(AccountConfig {
            key: AccountKey::new(&email),
            email,
            client_id: a.client_id.clone().filter(|s| !s.trim().is_empty()),
            client_secret: a.client_secret.clone().filter(|s| !s.is_empty()),
            service_account_key: a.service_account_key.as_deref().map(|p| cx.resolve(p)),
            provider,
            app_only: a.app_only,
            mailbox: a.mailbox.as_deref().map(|m| m.trim().to_string()),
        });
    }

    Ok(accounts)
}

fn store(raw: &RawStore, cx: &Context) -> Result<StoreConfig, ConfigError> {
    let kind = match raw.kind {
        RawStoreKind::File => StoreKind::File,
        RawStoreKind::Keyring => StoreKind::Keyring,
        RawStoreKind::Redis => {
            let url = raw.url.clone().ok_or_else(|| {
                cx.invalid(
                    "[store] kind = \"redis\" needs url (redis://HOST:PORT/DB or rediss://...)"
                        .into(),
                )
            })?;
            if !["redis://", "rediss://"]
                .iter()
                .any(|s| url.expose().starts_with(s))
            {
                return Err(cx.invalid("[store] url must start with redis:// or rediss://".into()));
            }
            if raw.key_file.is_none() {
                return Err(cx.invalid(
                    "[store] kind = \"redis\" needs key_file: every process sharing the store must use the same master key".into(),
                ));
            }
            let prefix = raw.prefix.clone().unwrap_or_else(|| "xoauth2-proxy".into());
            StoreKind::Redis { url, prefix }
        }
    };
    if !matches!(kind, StoreKind::Redis { .. }) && (raw.url.is_some() || raw.prefix.is_some()) {
        return Err(cx.invalid("[store] url and prefix are for kind = \"redis\"".into()));
    }
    Ok(StoreConfig {
        kind,
        key_file: raw.key_file.as_deref().map(|p| cx.resolve(p)),
    })
}

/// A `*_secs` key as a duration, or the default.
fn secs_or(secs: Option<u64>, default: Duration) -> Duration {
    secs.map_or(default, Duration::from_secs)
}

fn limits(raw: &RawLimits, cx: &Context) -> Result<Limits, ConfigError> {
    // Zero would close every connection before its greeting: surely not what was meant.
    if raw.preauth_timeout_secs == Some(0) {
        return Err(cx.invalid(
            "[limits] preauth_timeout_secs = 0 would close every connection at once; use at least 1 (the default is 60)".into(),
        ));
    }
    let d = Limits::default();
    let limits = Limits {
        max_connections: raw.max_connections.unwrap_or(d.max_connections).max(1),
        preauth_timeout: secs_or(raw.preauth_timeout_secs, d.preauth_timeout),
        upstream_timeout: secs_or(raw.upstream_timeout_secs, d.upstream_timeout),
        shutdown_grace: secs_or(raw.shutdown_grace_secs, d.shutdown_grace),
        imap_connections_per_account: raw.imap_connections_per_account.map(|n| n.max(1)),
        max_pending_per_source: raw
            .max_pending_per_source
            .unwrap_or(d.max_pending_per_source)
            .max(1),
        imap_slot_wait: raw
            .imap_slot_wait_ms
            .map_or(d.imap_slot_wait, Duration::from_millis),
    };
    Ok(limits)
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
    fn a_redis_store_needs_a_url_and_a_shared_key_file_and_hides_its_password() {
        let base = "state_dir = \"s\"\n[store]\nkind = \"redis\"\n";
        let c = parse(&format!(
            "{base}url = \"redis://app:hunter2@10.0.0.5:6379/0\"\nkey_file = \"k\"\n[limits]\nimap_slot_wait_ms = 500\n"
        ))
        .unwrap();
        let StoreKind::Redis { url, prefix } = &c.store.kind else {
            panic!("{:?}", c.store.kind);
        };
        assert_eq!(url.expose(), "redis://app:hunter2@10.0.0.5:6379/0");
        assert_eq!(prefix, "xoauth2-proxy");
        assert_eq!(c.store.key_file, Some(PathBuf::from("/etc/xo/k")));
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.limits.imap_slot_wait, Duration::from_millis(500));
        assert_eq!(Limits::default().imap_slot_wait, Duration::from_secs(2));
        for (text, says) in [
            (format!("{base}key_file = \"k\"\n"), "needs url"),
            (format!("{base}url = \"redis://h\"\n"), "needs key_file"),
            (
                format!("{base}url = \"http://h\"\nkey_file = \"k\"\n"),
                "redis://",
            ),
            (
                "[store]\nurl = \"redis://h\"\n".to_string(),
                "for kind = \"redis\"",
            ),
        ] {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
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
    fn proxy_protocol_needs_trusted_proxies_written_as_cidrs() {
        let listener =
            "[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:1143\"\nproxy_protocol = true\n";
        let err = parse(listener).unwrap_err().to_string();
        assert!(err.contains("needs trusted_proxies"), "{err}");
        let err = parse(&format!("{listener}trusted_proxies = [\"10.0.0.0/33\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"10.0.0.0/33\" is not an address or CIDR"),
            "{err}"
        );
        let c = parse(&format!(
            "{listener}trusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\", \"::1\"]\n"
        ))
        .unwrap();
        let nets = &c.listeners[0].trusted_proxies;
        assert!(nets[0].contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
        assert!(nets[1].contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap()));
        assert!(!nets[1].contains(&"127.0.0.2".parse::<std::net::IpAddr>().unwrap()));
        assert!(c.listeners[0].proxy_protocol);
    }

    #[test]
    fn admin_listener_is_off_by_default_and_loopback_only() {
        let c = parse("").unwrap();
        assert!(c.admin.is_none());
        assert_eq!(c.log_format, LogFormat::Text);
        let c = parse("log_format = \"json\"\n[admin]\nbind = \"127.0.0.1:8025\"\n").unwrap();
        let admin = c.admin.unwrap();
        assert_eq!(admin.bind, "127.0.0.1:8025".parse().unwrap());
        assert!(!admin.account_labels, "account labels are opt-in");
        assert_eq!(c.log_format, LogFormat::Json);
        let err = parse("[admin]\nbind = \"0.0.0.0:8025\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("loopback addresses only"), "{err}");
        let err = parse("[admin]\nbind = \"0.0.0.0:8025\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a [tls] section"), "{err}");
        let err = parse("[admin]\nbind = \"127.0.0.1:8025\"\npassword_hash = \"hunter2\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin-password"), "{err}");
        let remote = parse("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[admin]\nbind = \"0.0.0.0:8025\"\nhosts = [\"Proxy.Example.com\"]\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI\"\n")
            .unwrap()
            .admin
            .unwrap();
        assert!(remote.password_hash.is_some());
        assert_eq!(remote.hosts, ["proxy.example.com"]);
        assert!(
            !format!("{remote:?}").contains("argon2id"),
            "redacted in Debug"
        );
        let err = parse("log_format = \"xml\"\n").unwrap_err().to_string();
        assert!(err.contains("log_format") || err.contains("xml"), "{err}");
    }

    #[test]
    fn a_zero_preauth_timeout_is_refused() {
        let err = parse("[limits]\npreauth_timeout_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("preauth_timeout_secs = 0"), "{err}");
        let ok = parse("[limits]\npreauth_timeout_secs = 1\nmax_pending_per_source = 5\n").unwrap();
        assert_eq!(ok.limits.max_pending_per_source, 5);
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
    fn each_provider_caps_imap_sessions_at_its_own_limit_unless_the_config_sets_one() {
        let text = "state_dir = \"s\"\n[providers.microsoft]\nclient_id = \"app\"\n[[account]]\nemail = \"bob@contoso.com\"\nprovider = \"microsoft\"\n[[account]]\nemail = \"a@gmail.com\"\n";
        let c = parse(text).unwrap();
        let (bob, alice) = (c.accounts[0].provider, c.accounts[1].provider);
        assert_eq!(c.limits.imap_sessions(alice), 15);
        assert_eq!(c.limits.imap_sessions(bob), 20);
        let c = parse(&format!(
            "{text}[limits]\nimap_connections_per_account = 4\n"
        ))
        .unwrap();
        assert_eq!(c.limits.imap_sessions(alice), 4);
        assert_eq!(c.limits.imap_sessions(bob), 4);
    }

    #[test]
    fn microsoft_endpoints_carry_the_tenant_and_one_consent_covers_every_protocol() {
        let c = parse("state_dir = \"s\"\n[providers.microsoft]\nclient_id = \"app\"\ntenant = \"contoso.onmicrosoft.com\"\n[[account]]\nemail = \"bob@contoso.com\"\nprovider = \"microsoft\"\nmailbox = \"shared@contoso.com\"\n[[account]]\nemail = \"a@gmail.com\"\n").unwrap();
        assert_eq!(
            c.microsoft.token_url,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        let bob = &c.accounts[0];
        assert_eq!(bob.provider.id(), "microsoft");
        assert_eq!(bob.login_user(), "shared@contoso.com");
        let client = c.oauth_client(bob).unwrap();
        assert_eq!(client.client_id, "app");
        assert_eq!(client.scope, "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/POP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access");
        // protocol-facts §7.4: the shared mailbox in user=, the delegate's token.
        let token = Secret::new("EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA");
        assert_eq!(
            crate::protocol::sasl::xoauth2(bob.login_user(), &token).expose(),
            "dXNlcj1zaGFyZWRAY29udG9zby5jb20BYXV0aD1CZWFyZXIgRXdCQUFsM0JBQVVGRnBVQW83SjNWZTBiakxCV1pXQ2NsUkMzRW9BQQEB"
        );
        assert_eq!(c.accounts[1].provider.id(), "google");
        assert_eq!(c.accounts[1].login_user(), "a@gmail.com");
        let defaults = parse("[providers.microsoft]\nclient_id = \"x\"\n").unwrap();
        assert!(defaults
            .microsoft
            .auth_url
            .contains("/common/oauth2/v2.0/authorize"));
    }

    #[test]
    fn microsoft_account_settings_that_cannot_work_are_refused_in_words() {
        let account = |extra: &str| {
            parse(&format!("[providers.microsoft]\nclient_id = \"x\"\n[[account]]\nemail = \"b@contoso.com\"\n{extra}"))
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        assert!(account("provider = \"yahoo\"\n").contains("provider = \"yahoo\" is not known"));
        assert!(account("app_only = true\n").contains("Microsoft accounts"));
        assert!(account("mailbox = \"s@contoso.com\"\n").contains("Microsoft accounts"));
        assert!(account("provider = \"microsoft\"\napp_only = true\n")
            .contains("needs a client_secret"));
        assert!(
            account("provider = \"microsoft\"\napp_only = true\nclient_secret = \"s\"\n")
                .contains("tenant")
        );
        assert!(account("provider = \"microsoft\"\nmailbox = \"nope\"\n")
            .contains("not an email address"));
        assert!(
            account("provider = \"microsoft\"\nservice_account_key = \"k.json\"\n")
                .contains("app_only")
        );
        let bad_tenant = parse("[providers.microsoft]\ntenant = \"a/b\"\n")
            .unwrap_err()
            .to_string();
        assert!(bad_tenant.contains("tenant"), "{bad_tenant}");
        let http = parse("[providers.microsoft]\ntoken_url = \"http://example.com/{tenant}/t\"\n")
            .unwrap_err()
            .to_string();
        assert!(http.contains("loopback"), "{http}");
        assert!(parse("[providers.microsoft]\nclient_secret = \"s\"\ntenant = \"contoso.com\"\n[[account]]\nemail = \"b@contoso.com\"\nprovider = \"microsoft\"\napp_only = true\n").is_ok());
    }

    #[test]
    fn account_client_overrides_provider_client() {
        let c = parse("state_dir = \"s\"\n[providers.google]\nclient_id = \"g\"\nclient_secret = \"gs\"\n[[account]]\nemail = \"a@x.com\"\nclient_id = \"own\"\n[[account]]\nemail = \"b@x.com\"\n").unwrap();
        assert_eq!(c.oauth_client(&c.accounts[0]).unwrap().client_id, "own");
        assert_eq!(c.oauth_client(&c.accounts[1]).unwrap().client_id, "g");
    }
}

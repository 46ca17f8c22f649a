//! Starts the real proxy (`proxy::bind` + `proxy::serve`, in-process, port 0) against the
//! fakes in `support`, with a config file and state dir of its own.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::oneshot;
use xoauth2_proxy::config::Config;
use xoauth2_proxy::proxy::{self, App};
use xoauth2_proxy::store::Store;

use crate::support::{FakeGoogle, TestPki, CLIENT_ID, CLIENT_SECRET};

pub struct ListenerSpec {
    pub protocol: &'static str,
    pub local_tls: &'static str,
    pub upstream: SocketAddr,
    pub upstream_tls: &'static str,
}

impl ListenerSpec {
    pub fn new(protocol: &'static str, upstream: SocketAddr) -> ListenerSpec {
        ListenerSpec {
            protocol,
            local_tls: "none",
            upstream,
            upstream_tls: "implicit",
        }
    }

    pub fn local_tls(mut self, mode: &'static str) -> Self {
        self.local_tls = mode;
        self
    }

    pub fn upstream_tls(mut self, mode: &'static str) -> Self {
        self.upstream_tls = mode;
        self
    }
}

pub struct Proxy {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub config: Config,
    pub app: Arc<App>,
    /// Bound address of each listener, in config order.
    pub addrs: Vec<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The config text for these listeners and accounts (state dir and certificates in `dir`).
/// The `[limits]` the tests use unless they say otherwise.
pub const TEST_LIMITS: &str =
    "upstream_timeout_secs = 10\npreauth_timeout_secs = 30\nshutdown_grace_secs = 2\n";

pub fn config_text(
    google: &FakeGoogle,
    pki: &TestPki,
    listeners: &[ListenerSpec],
    accounts: &[&str],
) -> String {
    config_text_with_limits(google, pki, listeners, accounts, TEST_LIMITS)
}

pub fn config_text_with_limits(
    google: &FakeGoogle,
    pki: &TestPki,
    listeners: &[ListenerSpec],
    accounts: &[&str],
    limits: &str,
) -> String {
    let mut text = format!(
        "state_dir = \"state\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[providers.google]\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\ntoken_url = \"{}\"\nauth_url = \"{}\"\n\n[limits]\n{limits}",
        pki.cert_pem_path.display(),
        pki.key_pem_path.display(),
        google.token_url,
        google.auth_url,
    );
    for l in listeners {
        text.push_str(&format!(
            "\n[[listener]]\nprotocol = \"{}\"\nbind = \"127.0.0.1:0\"\nlocal_tls = \"{}\"\nupstream = \"{}\"\nupstream_tls = \"{}\"\nupstream_ca = \"{}\"\n",
            l.protocol,
            l.local_tls,
            l.upstream,
            l.upstream_tls,
            pki.ca_pem_path.display()
        ));
    }
    for a in accounts {
        text.push_str(&format!("\n[[account]]\nemail = \"{a}\"\n"));
    }
    text
}

impl Proxy {
    pub async fn start(
        google: &FakeGoogle,
        pki: &TestPki,
        listeners: &[ListenerSpec],
        accounts: &[&str],
    ) -> Proxy {
        Proxy::start_with_limits(google, pki, listeners, accounts, TEST_LIMITS).await
    }

    /// As `start`, with this text as the `[limits]` table.
    pub async fn start_with_limits(
        google: &FakeGoogle,
        pki: &TestPki,
        listeners: &[ListenerSpec],
        accounts: &[&str],
        limits: &str,
    ) -> Proxy {
        let text = config_text_with_limits(google, pki, listeners, accounts, limits);
        Proxy::start_with_config(&text).await
    }

    /// Start from complete config text.
    pub async fn start_with_config(text: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, text).unwrap();
        let config = Config::load(&config_path).unwrap();
        let bound = proxy::bind(&config).await.unwrap();
        let addrs = bound.iter().map(|l| l.local_addr()).collect();
        let app = App::new(config.clone()).unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(proxy::serve(app.clone(), bound, async {
            let _ = rx.await;
        }));
        Proxy {
            dir,
            config_path,
            config,
            app,
            addrs,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A second handle on the store, as another process (`password add`, `import`) would open it.
    pub fn store(&self) -> Store {
        Store::open(&self.config.state_dir, &self.config.store).unwrap()
    }

    /// Authorize `email` with a refresh token the fake Google knows, and give it a password.
    pub fn authorize(&self, google: &FakeGoogle, email: &str) -> String {
        let refresh = format!("1//refresh-{email}");
        google.add_refresh_token(&refresh, email);
        xoauth2_proxy::registry::save_refresh_token(
            &self.store(),
            &xoauth2_proxy::account::AccountKey::new(email),
            &xoauth2_proxy::secret::Secret::from(refresh.as_str()),
        )
        .unwrap();
        self.add_password(email, "test")
    }

    pub fn add_password(&self, email: &str, label: &str) -> String {
        xoauth2_proxy::registry::add_password(
            &self.store(),
            &xoauth2_proxy::account::AccountKey::new(email),
            label,
        )
        .unwrap()
        .expose()
        .to_string()
    }

    /// Stop accepting and wait for `serve` to return.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

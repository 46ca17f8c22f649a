//! `check`: one line per check, `ok` or `FAIL` with what to do. The config parses, the store
//! opens, every account gets a fresh access token, and every listener's upstream answers with a
//! greeting over TLS (implicit, or after STARTTLS/STLS).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use xoauth2_proxy::clock::format_age;
use xoauth2_proxy::config::{Config, ListenerConfig, Protocol, StoreKind, UpstreamTls};
use xoauth2_proxy::oauth::TokenManager;
use xoauth2_proxy::protocol::{imap, pop3, smtp, Failure, UpOutcome};
use xoauth2_proxy::proxy::stream::Stream;
use xoauth2_proxy::proxy::{upstream, KnownCapabilities, ListenerCtx};
use xoauth2_proxy::registry::Registry;
use xoauth2_proxy::secret::Secret;
use xoauth2_proxy::store::Store;

const TOKEN_WAIT: Duration = Duration::from_secs(30);
const UPSTREAM_WAIT: Duration = Duration::from_secs(15);

/// Run every check, printing a line for each; returns (checks, failures).
pub async fn run(path: &Path) -> (usize, usize) {
    let mut report = Report::default();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            report.fail("config", e.to_string());
            return report.counts();
        }
    };
    report.ok(
        "config",
        format!(
            "{} ({} listener(s), {} account(s))",
            config.path.display(),
            config.listeners.len(),
            config.accounts.len()
        ),
    );
    let store = match Store::open(&config.state_dir, &config.store) {
        Ok(s) => {
            let key = match (&config.store.key_file, &config.store.kind) {
                (Some(p), _) => format!("key file {}", p.display()),
                (None, StoreKind::File) => "key in master.key".into(),
                (None, StoreKind::Keyring) => "key in the OS keyring".into(),
                (None, StoreKind::Redis { .. }) => "no key".into(),
            };
            match s.load() {
                Ok(_) => {
                    let place = match &config.store.kind {
                        StoreKind::Redis { .. } => s.describe(),
                        _ => config.state_dir.display().to_string(),
                    };
                    report.ok("store", format!("{place} ({key})"));
                    Some(s)
                }
                Err(e) => {
                    report.fail("store", e.to_string());
                    None
                }
            }
        }
        Err(e) => {
            report.fail("store", e.to_string());
            None
        }
    };
    if let Some(store) = store {
        check_accounts(&config, store, &mut report).await;
    }
    for l in &config.listeners {
        for target in targets(&config, l) {
            check_listener(l, &target, &mut report).await;
        }
    }
    report.counts()
}

/// Every upstream a listener's logins may go to: its `upstream`, or each provider's host
/// its accounts use.
fn targets(config: &Config, l: &ListenerConfig) -> Vec<upstream::Target> {
    let mut targets = vec![];
    for a in config.accounts.iter().filter(|_| l.upstream_routed) {
        let t = upstream::target_for(l, Some(a));
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    if targets.is_empty() {
        targets.push(upstream::target_for(l, None));
    }
    targets
}

async fn check_listener(l: &ListenerConfig, target: &upstream::Target, report: &mut Report) {
    {
        let name = format!("listener {} {} -> {target}", l.protocol.name(), l.bind);
        match tokio::time::timeout(UPSTREAM_WAIT + Duration::from_secs(1), probe(l, target)).await {
            Ok(Ok(greeting)) => report.ok(&name, greeting),
            Ok(Err(e)) => report.fail(&name, e),
            Err(_) => report.fail(
                &name,
                format!(
                    "no greeting within {} s; check upstream and upstream_tls",
                    UPSTREAM_WAIT.as_secs()
                ),
            ),
        }
    }
}

async fn check_accounts(config: &Config, store: Store, report: &mut Report) {
    if config.accounts.is_empty() {
        return;
    }
    let registry = match Registry::new(config, store) {
        Ok(r) => Arc::new(r),
        Err(e) => return report.fail("store", e.to_string()),
    };
    let tokens = match TokenManager::detached(config, registry) {
        Ok(t) => t,
        Err(e) => return report.fail("token endpoint", e),
    };
    for a in &config.accounts {
        let name = format!("account {}", a.email);
        match tokio::time::timeout(TOKEN_WAIT, tokens.get(&a.key())).await {
            Ok(Ok(token)) => {
                let left = token
                    .expires_at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                let how = if a.service_account_key.is_some() {
                    "service account"
                } else if a.app_only {
                    "app's client credentials"
                } else {
                    "refresh token"
                };
                report.ok(
                    &name,
                    format!(
                        "fresh access token from the {how}, valid for {}",
                        format_age(left.as_secs() as i64)
                    ),
                );
            }
            Ok(Err(e)) => report.fail(&name, e.with_advice()),
            Err(_) => report.fail(
                &name,
                format!(
                    "the token endpoint did not answer within {} s; check the network",
                    TOKEN_WAIT.as_secs()
                ),
            ),
        }
    }
}

#[derive(Default)]
struct Report {
    total: usize,
    failed: usize,
}

impl Report {
    fn ok(&mut self, what: &str, detail: String) {
        self.total += 1;
        println!("ok    {what}: {detail}");
    }

    fn fail(&mut self, what: &str, detail: String) {
        self.total += 1;
        self.failed += 1;
        println!("FAIL  {what}: {detail}");
    }

    fn counts(&self) -> (usize, usize) {
        (self.total, self.failed)
    }
}

/// Reach the listener's upstream with the connection code and protocol machines `serve` uses,
/// up to where a login would begin (TLS or STARTTLS included), and say what it answered.
async fn probe(l: &ListenerConfig, target: &upstream::Target) -> Result<String, String> {
    let upstream_tls = xoauth2_proxy::tls::client_config(l.upstream_ca.as_deref())?;
    let ctx = ListenerCtx {
        config: l.clone(),
        server_tls: None,
        upstream_tls,
        upstream_capabilities: KnownCapabilities::default(),
    };
    let deadline = Instant::now() + UPSTREAM_WAIT;
    let starttls = target.tls == UpstreamTls::Starttls;
    let how = if starttls { "STARTTLS" } else { "TLS" };
    let failed = |f: Failure| match f {
        Failure::Temporary { detail } => {
            format!("{detail} (check upstream, upstream_tls and upstream_ca)")
        }
        other => format!("{other:?}"),
    };
    let stream = upstream::connect(&ctx, target, deadline)
        .await
        .map_err(failed)?;
    let (mut stream, outcome) = match l.protocol {
        Protocol::Imap => {
            let mut m = imap::UpstreamLogin::probe(starttls);
            upstream::exchange(&ctx, target, stream, &mut m, deadline).await
        }
        Protocol::Smtp => {
            let mut m = smtp::UpstreamHello::new("localhost", starttls, true);
            upstream::exchange(&ctx, target, stream, &mut m, deadline).await
        }
        Protocol::Pop3 => {
            let mut m = pop3::UpstreamPop::new(
                pop3::Goal::Capa,
                Secret::new(String::new()),
                starttls,
                true,
            );
            upstream::exchange(&ctx, target, stream, &mut m, deadline).await
        }
    }
    .map_err(failed)?;
    let answer = match outcome {
        UpOutcome::Success { relay, .. } => relay,
        UpOutcome::Failed(why) => {
            return Err(format!("{why}: is this a {} server?", l.protocol.name()))
        }
        UpOutcome::Rejected { line, .. } => return Err(printable(&line)),
    };
    quit(&mut stream, l.protocol).await;
    let first = String::from_utf8_lossy(&answer);
    let first = first.lines().next().unwrap_or_default().to_string();
    Ok(match l.protocol {
        Protocol::Imap => format!("{how}, greeting {}", printable(&first)),
        Protocol::Smtp => format!("{how}, greeting and EHLO answered: {}", printable(&first)),
        Protocol::Pop3 => format!("{how}, greeting and CAPA answered: {}", printable(&first)),
    })
}

async fn quit(s: &mut Stream, protocol: Protocol) {
    let bye: &[u8] = match protocol {
        Protocol::Imap => b"x9 LOGOUT\r\n",
        Protocol::Smtp | Protocol::Pop3 => b"QUIT\r\n",
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = s.write_all(bye).await;
        let _ = s.shutdown().await;
    })
    .await;
}

fn printable(s: &str) -> String {
    s.chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

//! Connecting to the upstream server and driving a protocol's upstream login machine over it,
//! including the one refresh-and-retry after the provider rejects a token. Where a login goes
//! is decided per login: a listener's `upstream`, or else the account's provider's host.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::login::Failure;
use super::stream::Stream;
use super::{Conn, ListenerCtx};
use crate::account::AccountKey;
use crate::config::{AccountConfig, ListenerConfig, UpstreamTls};
use crate::oauth::AccessToken;
use crate::protocol::sasl::xoauth2;
use crate::protocol::{UpAction, UpOutcome, UpstreamMachine};
use crate::provider::UpstreamVerdict;
use crate::secret::Secret;

/// A logged-in upstream connection.
pub struct Upstream {
    pub stream: Stream,
    /// The server's success answer, for the client.
    pub relay: Vec<u8>,
    /// Bytes the server sent after it.
    pub leftover: Vec<u8>,
    /// Held for the session's life where the provider limits concurrent sessions.
    pub slot: Option<super::ImapSlot>,
}

fn temporary(detail: String) -> Failure {
    Failure::Temporary { detail }
}

/// Where one login goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl ListenerCtx {
    /// The upstream for a login to `account` (see [`target_for`]).
    pub fn target(&self, account: Option<&AccountConfig>) -> Target {
        target_for(&self.config, account)
    }
}

/// The upstream for a login to `account` on a listener: its `upstream` when it names one,
/// else the account's provider's host for this protocol (None: the default provider's).
pub fn target_for(cfg: &ListenerConfig, account: Option<&AccountConfig>) -> Target {
    {
        let listener = Target {
            host: cfg.upstream_host.clone(),
            port: cfg.upstream_port,
            tls: cfg.upstream_tls,
        };
        let Some(account) = account.filter(|_| cfg.upstream_routed) else {
            return listener;
        };
        let provider = account.provider;
        let host_port = provider.default_upstream_for(cfg.protocol, &account.email);
        let Some((host, port)) = host_port
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse().ok()?)))
        else {
            return listener;
        };
        let tls = if provider.default_upstream_starttls(cfg.protocol) {
            UpstreamTls::Starttls
        } else {
            cfg.upstream_tls
        };
        Target {
            host: host.to_string(),
            port,
            tls,
        }
    }
}

/// TCP (and for implicit TLS, the handshake) to the login's upstream.
pub async fn connect(
    ctx: &ListenerCtx,
    target: &Target,
    deadline: Instant,
) -> Result<Stream, Failure> {
    let tcp = timeout_at(
        deadline,
        TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| temporary(format!("connecting to {target} timed out")))?
    .map_err(|e| temporary(format!("cannot connect to {target}: {e}")))?;
    super::tune(&tcp);
    match target.tls {
        UpstreamTls::Implicit => timeout_at(
            deadline,
            Stream::connect_tls(tcp, ctx.upstream_tls.clone(), &target.host),
        )
        .await
        .map_err(|_| temporary(format!("TLS handshake with {target} timed out")))?
        .map_err(|e| temporary(format!("TLS with {target} failed: {e}"))),
        UpstreamTls::Starttls => Ok(Stream::Plain(tcp)),
    }
}

/// Run `machine` over `stream` until it reports an outcome.
pub async fn exchange<M: UpstreamMachine>(
    ctx: &ListenerCtx,
    target: &Target,
    mut stream: Stream,
    machine: &mut M,
    deadline: Instant,
) -> Result<(Stream, UpOutcome), Failure> {
    let wait = deadline.saturating_duration_since(Instant::now());
    let mut buf = vec![0u8; 8192];
    loop {
        while let Some(action) = machine.next_action() {
            match action {
                UpAction::Send(bytes) => {
                    timeout_at(deadline, stream.write_all(bytes.expose()))
                        .await
                        .map_err(|_| temporary(format!("{target} stopped responding")))?
                        .map_err(|e| temporary(format!("connection to {target} failed: {e}")))?;
                }
                UpAction::StartTls => {
                    stream = timeout_at(
                        deadline,
                        stream.upgrade_client(ctx.upstream_tls.clone(), &target.host),
                    )
                    .await
                    .map_err(|_| temporary(format!("STARTTLS with {target} timed out")))?
                    .map_err(|e| temporary(format!("STARTTLS with {target} failed: {e}")))?;
                    machine.tls_established();
                }
                UpAction::Done(outcome) => return Ok((stream, outcome)),
            }
        }
        let n = timeout_at(deadline, stream.read(&mut buf))
            .await
            .map_err(|_| temporary(format!("{target} did not answer within {}s", secs(wait))))?
            .map_err(|e| temporary(format!("connection to {target} failed: {e}")))?;
        if n == 0 {
            return Err(temporary(format!("{target} closed the connection")));
        }
        machine.feed(&buf[..n]);
    }
}

/// Connect and log in upstream as the account with `token`.
pub async fn login<M: UpstreamMachine>(
    conn: &Conn,
    account: &AccountConfig,
    token: Arc<AccessToken>,
    make: impl FnOnce(Secret) -> M,
) -> Result<Upstream, Failure> {
    let deadline = Instant::now() + conn.app.config.limits.upstream_timeout;
    let target = conn.ctx.target(Some(account));
    let stream = connect(&conn.ctx, &target, deadline).await?;
    authenticate(conn, &target, stream, account, token, make, deadline).await
}

/// Log in on an open upstream connection; on a token rejection, refresh once and retry on the
/// same connection.
pub async fn authenticate<M: UpstreamMachine>(
    conn: &Conn,
    target: &Target,
    mut stream: Stream,
    account: &AccountConfig,
    mut token: Arc<AccessToken>,
    make: impl FnOnce(Secret) -> M,
    deadline: Instant,
) -> Result<Upstream, Failure> {
    let app = &conn.app;
    let (key, email) = (account.key(), account.email.as_str());
    let mut machine = make(xoauth2(account.login_user(), &token.token));
    let mut retried = false;
    loop {
        let (s, outcome) = exchange(&conn.ctx, target, stream, &mut machine, deadline).await?;
        stream = s;
        match outcome {
            UpOutcome::Success { relay, leftover } => {
                return Ok(Upstream {
                    stream,
                    relay,
                    leftover,
                    slot: None,
                })
            }
            UpOutcome::Rejected {
                challenge,
                line,
                token_rejected,
            } => {
                let shown = crate::protocol::imap::printable(line.trim_end().as_bytes());
                let protocol = conn.ctx.config.protocol;
                let user = account.login_user();
                if let Some(v) = account.provider.upstream_refusal(protocol, &line, user) {
                    return Err(judged(conn, account, target, v));
                }
                if !token_rejected {
                    tracing::warn!(account = %email, upstream = %target, reply = %shown, "upstream refused login");
                    return Err(Failure::UpstreamRefused { line });
                }
                let detail = challenge.as_ref().map(|c| c.describe()).unwrap_or(shown);
                if retried {
                    tracing::warn!(account = %email, upstream = %target, %detail, "upstream rejected a freshly refreshed token");
                    return Err(Failure::TokenRejected {
                        email: email.to_string(),
                        detail,
                    });
                }
                tracing::info!(account = %email, upstream = %target, %detail, "upstream rejected the access token; refreshing once");
                retried = true;
                app.tokens.invalidate(&key, &token);
                token = app.tokens.get(&key).await.map_err(Failure::from)?;
                machine.retry(xoauth2(account.login_user(), &token.token));
            }
            UpOutcome::Failed(why) => {
                tracing::warn!(account = %email, upstream = %target, %why, "upstream login failed");
                return Err(temporary(format!("{target}: {why}")));
            }
        }
    }
}

/// A refusal the provider explained: remember a throttle's pause, relay a blocked login's fix.
fn judged(conn: &Conn, account: &AccountConfig, target: &Target, v: UpstreamVerdict) -> Failure {
    let email = account.email.as_str();
    match v {
        UpstreamVerdict::Throttled(wait) => {
            conn.app.backoff.hold(&account.key(), wait);
            let ms = wait.as_millis();
            tracing::warn!(account = %email, upstream = %target, backoff_ms = ms as u64, "upstream throttles logins; waiting before the next one");
            temporary(format!(
                "{target} throttles logins of {email} and asks to wait {ms} ms"
            ))
        }
        UpstreamVerdict::Blocked { reply, fix } => {
            tracing::warn!(account = %email, upstream = %target, %fix, "upstream refused login");
            Failure::UpstreamRefused { line: reply }
        }
    }
}

/// Per account, the earliest next upstream login a server asked for (throttling).
#[derive(Default)]
pub struct Backoff(std::sync::Mutex<std::collections::HashMap<AccountKey, Instant>>);

impl Backoff {
    pub fn hold(&self, key: &AccountKey, wait: Duration) {
        let until = Instant::now() + wait;
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let at = map.entry(key.clone()).or_insert(until);
        *at = (*at).max(until);
    }

    /// Wait out the account's pause, if it ends within `limit`; else say how long is left.
    pub async fn honour(&self, key: &AccountKey, limit: Duration) -> Result<(), Failure> {
        let until = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(key) {
                Some(at) if *at > Instant::now() => *at,
                Some(_) => {
                    map.remove(key);
                    return Ok(());
                }
                None => return Ok(()),
            }
        };
        let left = until.saturating_duration_since(Instant::now());
        if left > limit {
            return Err(temporary(format!(
                "the server asked to pause logins of {key} for {} s more",
                left.as_secs()
            )));
        }
        tokio::time::sleep_until(until).await;
        Ok(())
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_listener_without_upstream_sends_each_login_to_its_accounts_provider() {
        let text = "state_dir = \"s\"\n[[listener]]\nprotocol = \"smtp\"\nbind = \"127.0.0.1:1587\"\n[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:1143\"\nupstream = \"127.0.0.1:993\"\n[[account]]\nemail = \"a@gmail.com\"\n[[account]]\nemail = \"b@contoso.com\"\nprovider = \"microsoft\"\n[[account]]\nemail = \"c@hotmail.com\"\nprovider = \"microsoft\"\n";
        let c = Config::parse(text, std::path::Path::new("/x/c.toml")).unwrap();
        let (smtp, imap) = (&c.listeners[0], &c.listeners[1]);
        let at = |l, i: usize| target_for(l, Some(&c.accounts[i]));
        assert_eq!(at(smtp, 0).to_string(), "smtp.gmail.com:465");
        assert_eq!(at(smtp, 0).tls, UpstreamTls::Implicit);
        assert_eq!(at(smtp, 1).to_string(), "smtp.office365.com:587");
        assert_eq!(at(smtp, 1).tls, UpstreamTls::Starttls);
        assert_eq!(at(smtp, 2).to_string(), "smtp-mail.outlook.com:587");
        // An explicit upstream applies to every login.
        for i in 0..3 {
            assert_eq!(at(imap, i).to_string(), "127.0.0.1:993");
        }
    }
}

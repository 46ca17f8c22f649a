//! Connecting to the upstream server and driving a protocol's upstream login machine over it,
//! including the one refresh-and-retry after Gmail rejects a token.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::login::Failure;
use super::stream::Stream;
use super::{Conn, ListenerCtx};
use crate::config::{AccountConfig, UpstreamTls};
use crate::oauth::AccessToken;
use crate::protocol::sasl::xoauth2;
use crate::protocol::{UpAction, UpOutcome, UpstreamMachine};
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

/// TCP (and for implicit TLS, the handshake) to the listener's upstream.
pub async fn connect(ctx: &ListenerCtx, deadline: Instant) -> Result<Stream, Failure> {
    let cfg = &ctx.config;
    let target = cfg.upstream();
    let tcp = timeout_at(
        deadline,
        TcpStream::connect((cfg.upstream_host.as_str(), cfg.upstream_port)),
    )
    .await
    .map_err(|_| temporary(format!("connecting to {target} timed out")))?
    .map_err(|e| temporary(format!("cannot connect to {target}: {e}")))?;
    super::tune(&tcp);
    match cfg.upstream_tls {
        UpstreamTls::Implicit => timeout_at(
            deadline,
            Stream::connect_tls(tcp, ctx.upstream_tls.clone(), &cfg.upstream_host),
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
    mut stream: Stream,
    machine: &mut M,
    deadline: Instant,
) -> Result<(Stream, UpOutcome), Failure> {
    let target = ctx.config.upstream();
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
                        stream.upgrade_client(ctx.upstream_tls.clone(), &ctx.config.upstream_host),
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
    let stream = connect(&conn.ctx, deadline).await?;
    authenticate(conn, stream, account, token, make, deadline).await
}

/// Log in on an open upstream connection; on a token rejection, refresh once and retry on the
/// same connection.
pub async fn authenticate<M: UpstreamMachine>(
    conn: &Conn,
    mut stream: Stream,
    account: &AccountConfig,
    mut token: Arc<AccessToken>,
    make: impl FnOnce(Secret) -> M,
    deadline: Instant,
) -> Result<Upstream, Failure> {
    let app = &conn.app;
    let (key, email) = (account.key(), account.email.as_str());
    let target = conn.ctx.config.upstream();
    let mut machine = make(xoauth2(email, &token.token));
    let mut retried = false;
    loop {
        let (s, outcome) = exchange(&conn.ctx, stream, &mut machine, deadline).await?;
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
                machine.retry(xoauth2(email, &token.token));
            }
            UpOutcome::Failed(why) => {
                tracing::warn!(account = %email, upstream = %target, %why, "upstream login failed");
                return Err(temporary(format!("{target}: {why}")));
            }
        }
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

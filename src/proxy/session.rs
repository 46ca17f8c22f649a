//! The connection driver all protocols share: greet, run the client session machine until it
//! has credentials, check them, log in upstream, then splice. Nothing reaches upstream before
//! the local password check. What differs per protocol is a [`Dialect`].

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use super::login::{self, Failure};
use super::stream::Stream;
use super::upstream::Upstream;
use super::{splice, Conn};
use crate::config::{AccountConfig, LocalTls};
use crate::oauth::AccessToken;
use crate::protocol::{ClientAction, ClientSession, Credentials};

/// What a protocol adds to the shared driver.
pub(crate) trait Dialect: Send {
    type Session: ClientSession + Sync;

    /// A session for a new client; `starttls_offered` when the listener does local STARTTLS,
    /// `login_allowed` false while a remote client has not started TLS on such a listener.
    fn session(&self, conn: &Conn, starttls_offered: bool, login_allowed: bool) -> Self::Session;

    /// Sent before closing a client that did not log in within the time limit.
    const TIMEOUT_LINE: &'static [u8];

    /// Sent to clients still logging in when the proxy shuts down.
    const SHUTDOWN_LINE: &'static [u8];

    /// Connect and log in upstream as `email` with `token`, once the local password check has
    /// passed; `session` holds what upstream needs from the client's commands (IMAP's tag,
    /// SMTP's EHLO domain).
    fn login(
        &self,
        conn: &Conn,
        session: &Self::Session,
        account: &AccountConfig,
        token: Arc<AccessToken>,
    ) -> impl Future<Output = Result<Upstream, Failure>> + Send;
}

pub(crate) async fn run<D: Dialect>(
    dialect: D,
    conn: Conn,
    tcp: TcpStream,
    cancel: CancellationToken,
) {
    let cap = conn.app.config.limits.max_pending_per_source;
    let Some(logging_in) = conn.app.throttle.enter(conn.peer.ip(), cap) else {
        tracing::warn!(peer = %conn.peer, "too many connections logging in from this address; refusing connection");
        crate::metrics::connection_refused(conn.ctx.config.protocol, "source_cap");
        super::refuse_busy(conn.ctx.config.protocol, tcp).await;
        return;
    };
    // Boxed: the login phase's state (client session machine, read buffer, upstream connect
    // and handshake) is large and short-lived; inline it would size every session's task for
    // the session's whole life, while an idle spliced session needs only the splice.
    let logged_in = Box::pin(log_in(dialect, &conn, tcp, cancel)).await;
    drop(logging_in);
    let Some((email, client, up, pending)) = logged_in else {
        return;
    };
    complete(&conn, &email, client, up, pending).await
}

/// Greet and run the client session machine until a login succeeds upstream; `None` when the
/// client leaves, times out or the proxy shuts down first. One deadline from connect covers
/// every step, the login itself and failed attempts included.
async fn log_in<D: Dialect>(
    dialect: D,
    conn: &Conn,
    tcp: TcpStream,
    cancel: CancellationToken,
) -> Option<(String, Stream, Upstream, Vec<u8>)> {
    let deadline = Instant::now() + conn.app.config.limits.preauth_timeout;
    let local_tls = conn.ctx.config.local_tls;
    let mut client = open_client(conn, tcp, deadline).await?;
    let starttls = local_tls == LocalTls::Starttls;
    let mut session = dialect.session(conn, starttls, !starttls || conn.peer.ip().is_loopback());
    if client.write_all(&session.greeting()).await.is_err() {
        return None;
    }
    // Reads carry the client's LOGIN line or SASL blob: wiped when the login phase ends.
    let mut buf = zeroize::Zeroizing::new(vec![0u8; 4096]);
    loop {
        while let Some(action) = session.next_action() {
            match action {
                ClientAction::Send(bytes) => {
                    if timeout_at(deadline, client.write_all(&bytes))
                        .await
                        .map_or(true, |r| r.is_err())
                    {
                        return None;
                    }
                }
                ClientAction::Close => {
                    let _ = timeout_at(deadline, client.shutdown()).await;
                    return None;
                }
                ClientAction::StartTls => {
                    let tls = conn.ctx.server_tls.clone()?;
                    client = match timeout_at(deadline, client.upgrade_server(tls)).await {
                        Ok(Ok(s)) => s,
                        _ => {
                            tracing::debug!(peer = %conn.peer, "STARTTLS handshake with client failed");
                            return None;
                        }
                    };
                    session.tls_established();
                }
                ClientAction::Login { credentials } => {
                    // The account's provider names whose service failed, in replies and
                    // metrics; an unknown username gets the default provider's words.
                    let provider = conn
                        .app
                        .registry
                        .lookup(&credentials.username)
                        .map_or_else(crate::provider::default_provider, |a| a.provider);
                    let attempt = attempt(&dialect, conn, &session, &credentials);
                    let result = timeout_at(deadline, attempt).await;
                    if let Ok(outcome) = &result {
                        let failure = outcome.as_ref().err();
                        let protocol = conn.ctx.config.protocol;
                        crate::metrics::upstream_login(protocol, provider.id(), failure);
                    }
                    let outcome = match &result {
                        Ok(outcome) => crate::metrics::login_result(outcome.as_ref().err()),
                        Err(_) => "timed_out",
                    };
                    login::record(conn, &credentials.username, outcome);
                    match result {
                        Err(_) => return timed_out::<D, _>(&mut client).await,
                        Ok(Ok((email, up))) => {
                            let pending = session.into_pending_input();
                            return Some((email, client, up, pending));
                        }
                        Ok(Err(failure)) => session.login_failed(&failure, provider.words()),
                    }
                }
            }
        }
        let read = tokio::select! {
            r = timeout_at(deadline, client.read(&mut buf)) => r,
            _ = cancel.cancelled() => {
                let _ = timeout_at(deadline, client.write_all(D::SHUTDOWN_LINE)).await;
                return None;
            }
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => session.feed(&buf[..n]),
            Err(_) => return timed_out::<D, _>(&mut client).await,
        }
    }
}

/// One login: the local password, a token, any pause upstream asked for, the upstream login.
async fn attempt<D: Dialect>(
    dialect: &D,
    conn: &Conn,
    session: &D::Session,
    credentials: &Credentials,
) -> Result<(String, Upstream), Failure> {
    let account = login::check(conn, credentials).await?;
    let up = async {
        let token = login::token(conn, account).await?;
        let limit = conn.app.config.limits.upstream_timeout;
        conn.app.backoff.honour(&account.key(), limit).await?;
        dialect.login(conn, session, account, token).await
    }
    .await;
    let full = matches!(up, Err(Failure::TooManySessions { .. }));
    let result = if full { "limit" } else { "ok" };
    crate::metrics::local_login(conn.ctx.config.protocol, result);
    Ok((account.email.clone(), up?))
}

/// The pre-auth deadline passed: say so (briefly) and close.
async fn timed_out<D: Dialect, T>(client: &mut Stream) -> Option<T> {
    let grace = Instant::now() + std::time::Duration::from_secs(2);
    let _ = timeout_at(grace, client.write_all(D::TIMEOUT_LINE)).await;
    None
}

/// The client connection as the listener wants it: implicit TLS accepted, or plain.
async fn open_client(conn: &Conn, tcp: TcpStream, deadline: Instant) -> Option<Stream> {
    if conn.ctx.config.local_tls != LocalTls::Implicit {
        return Some(Stream::Plain(tcp));
    }
    let tls = conn.ctx.server_tls.clone()?;
    match timeout_at(deadline, Stream::accept_tls(tcp, tls)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(peer = %conn.peer, error = %e, "TLS handshake with client failed");
            None
        }
        Err(_) => None,
    }
}

/// Logged in: give the client upstream's answer, forward what the client pipelined after its
/// login, then splice until both sides are done.
async fn complete(
    conn: &Conn,
    email: &str,
    mut client: Stream,
    mut up: Upstream,
    pending: Vec<u8>,
) {
    let peer = conn.peer;
    tracing::info!(account = %email, %peer, protocol = conn.ctx.config.protocol.name(), "logged in");
    if client.write_all(&up.relay).await.is_err()
        || client.write_all(&up.leftover).await.is_err()
        || up.stream.write_all(&pending).await.is_err()
    {
        return;
    }
    drop(pending);
    let _slot = up.slot.take();
    let protocol = conn.ctx.config.protocol;
    let _open = (conn.app.activity).session(crate::account::AccountKey::new(email), protocol);
    match splice(client, up.stream).await {
        Ok((to_up, to_client)) => {
            crate::metrics::spliced(conn.ctx.config.protocol, to_up, to_client);
            tracing::debug!(account = %email, %peer, to_up, to_client, "session ended")
        }
        Err(e) => {
            tracing::debug!(account = %email, %peer, error = %e, "session ended with an error")
        }
    }
}

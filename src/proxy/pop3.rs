//! POP3 connection driver: local greeting, CAPA from upstream (rewritten), USER/PASS or
//! AUTH PLAIN locally, upstream two-step AUTH XOAUTH2, then splice.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use super::login::{self, Failure};
use super::stream::Stream;
use super::upstream::{self, exchange};
use super::{complete, open_client, read_client, upgrade_client, ClientRead, Conn};
use crate::config::{LocalTls, UpstreamTls};
use crate::protocol::pop3::{Action, ClientSession, Goal, SessionOptions, UpstreamPop};
use crate::protocol::UpOutcome;
use crate::secret::Secret;

fn reply(failure: &Failure) -> Vec<u8> {
    let code = match failure {
        Failure::BadCredentials | Failure::NotAuthorized { .. } | Failure::TokenRejected { .. } => {
            "-ERR [AUTH]"
        }
        Failure::Misconfigured { .. } => "-ERR [SYS/PERM]",
        Failure::Temporary { .. } => "-ERR [SYS/TEMP]",
        Failure::UpstreamRefused { line } => {
            let mut bytes = line.trim_end().as_bytes().to_vec();
            bytes.extend_from_slice(b"\r\n");
            return bytes;
        }
    };
    let text: String = failure
        .describe()
        .chars()
        .filter(|c| !c.is_control())
        .take(480)
        .collect();
    format!("{code} {text}\r\n").into_bytes()
}

/// Upstream's CAPA list, keeping the connection for the login that usually follows.
async fn capa(conn: &Conn, stream: Option<Stream>) -> Result<(Stream, Vec<String>), Failure> {
    let deadline = Instant::now() + conn.app.config.limits.upstream_timeout;
    let fresh = stream.is_none();
    let stream = match stream {
        Some(s) => s,
        None => upstream::connect(conn, deadline).await?,
    };
    let starttls = fresh && conn.ctx.config.upstream_tls == UpstreamTls::Starttls;
    let mut machine = UpstreamPop::new(Goal::Capa, Secret::default(), starttls, fresh);
    match exchange(conn, stream, &mut machine, deadline).await? {
        (s, UpOutcome::Success { relay, .. }) => Ok((s, UpstreamPop::lines(&relay))),
        (_, other) => Err(Failure::Temporary {
            detail: format!("{}: CAPA failed: {other:?}", conn.ctx.config.upstream()),
        }),
    }
}

pub async fn handle(conn: Conn, tcp: TcpStream, cancel: CancellationToken) {
    let limits = conn.app.config.limits.clone();
    let mut deadline = Instant::now() + limits.preauth_timeout;
    let local_tls = conn.ctx.config.local_tls;
    let Some(mut client) = open_client(&conn, tcp, deadline).await else {
        return;
    };
    let mut session = ClientSession::new(SessionOptions {
        starttls_offered: local_tls == LocalTls::Starttls,
        login_allowed: local_tls != LocalTls::Starttls || conn.peer.ip().is_loopback(),
    });
    if client.write_all(&session.greeting()).await.is_err() {
        return;
    }
    let mut up: Option<Stream> = None;
    let mut buf = vec![0u8; 4096];
    loop {
        while let Some(action) = session.next_action() {
            match action {
                Action::Send(bytes) => {
                    if timeout_at(deadline, client.write_all(&bytes))
                        .await
                        .map_or(true, |r| r.is_err())
                    {
                        return;
                    }
                }
                Action::Close => {
                    let _ = timeout_at(deadline, client.shutdown()).await;
                    return;
                }
                Action::StartTls => {
                    let Some(c) = upgrade_client(&conn, client, deadline).await else {
                        return;
                    };
                    client = c;
                    session.tls_established();
                }
                Action::Capa => match capa(&conn, up.take()).await {
                    Ok((s, lines)) => {
                        up = Some(s);
                        session.capa_result(Some(lines));
                    }
                    Err(f) => {
                        tracing::debug!(peer = %conn.peer, error = %f.describe(), "answering CAPA locally");
                        session.capa_result(None);
                    }
                },
                Action::Login { credentials } => {
                    let result = async {
                        let (email, token) = login::authorize(&conn, &credentials).await?;
                        let deadline = Instant::now() + limits.upstream_timeout;
                        let fresh = up.is_none();
                        let stream = match up.take() {
                            Some(s) => s,
                            None => upstream::connect(&conn, deadline).await?,
                        };
                        let starttls =
                            fresh && conn.ctx.config.upstream_tls == UpstreamTls::Starttls;
                        let logged_in = upstream::authenticate(
                            &conn,
                            stream,
                            &email,
                            token,
                            |xo| UpstreamPop::new(Goal::Auth, xo, starttls, fresh),
                            deadline,
                        )
                        .await?;
                        Ok::<_, Failure>((email, logged_in))
                    }
                    .await;
                    match result {
                        Ok((email, upstream)) => {
                            let pending = session.into_pending_input();
                            return complete(&conn, &email, client, upstream, pending).await;
                        }
                        Err(failure) => {
                            session.login_rejected(reply(&failure));
                            deadline = Instant::now() + limits.preauth_timeout;
                        }
                    }
                }
            }
        }
        match read_client(&mut client, &mut buf, deadline, &cancel).await {
            ClientRead::Data(n) => session.feed(&buf[..n]),
            ClientRead::Closed => return,
            ClientRead::TimedOut => {
                let _ = client
                    .write_all(b"-ERR [SYS/TEMP] No login within the time limit\r\n")
                    .await;
                return;
            }
            ClientRead::Shutdown => {
                let _ = client
                    .write_all(b"-ERR [SYS/TEMP] xoauth2-proxy is shutting down\r\n")
                    .await;
                return;
            }
        }
    }
}

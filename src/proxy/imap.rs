//! IMAP connection driver: runs the client-side session machine until it has credentials, logs
//! in upstream, relays the server's answer and any held pipelined commands, then splices.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use super::login::{self, Failure};
use super::{complete, open_client, read_client, upgrade_client, upstream, ClientRead, Conn};
use crate::config::{LocalTls, UpstreamTls};
use crate::protocol::imap::{Action, ClientSession, Limits, SessionOptions, UpstreamLogin};

fn reply(tag: &str, failure: &Failure) -> Vec<u8> {
    let text = failure.describe();
    let line = match failure {
        Failure::BadCredentials | Failure::NotAuthorized { .. } | Failure::TokenRejected { .. } => {
            format!("{tag} NO [AUTHENTICATIONFAILED] {text}")
        }
        Failure::Misconfigured { .. } => format!("{tag} NO [CONTACTADMIN] {text}"),
        Failure::Temporary { .. } => format!("{tag} NO [UNAVAILABLE] {text}"),
        // The server's own words (NO [ALERT] ...), already a complete response after the tag.
        Failure::UpstreamRefused { line } => format!("{tag} {line}"),
    };
    let mut bytes = line.into_bytes();
    bytes.retain(|&b| b != b'\r' && b != b'\n');
    bytes.extend_from_slice(b"\r\n");
    bytes
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
        limits: Limits::default(),
    });
    if client.write_all(&session.greeting()).await.is_err() {
        return;
    }
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
                Action::Login { tag, credentials } => {
                    let result = async {
                        let (email, token) = login::authorize(&conn, &credentials).await?;
                        let starttls = conn.ctx.config.upstream_tls == UpstreamTls::Starttls;
                        let up = upstream::login(&conn, &email, token, |xo| {
                            UpstreamLogin::new(&tag, xo, starttls)
                        })
                        .await?;
                        Ok::<_, Failure>((email, up))
                    }
                    .await;
                    match result {
                        Ok((email, up)) => {
                            let pending = session.into_pending_input();
                            return complete(&conn, &email, client, up, pending).await;
                        }
                        Err(failure) => {
                            session.login_rejected(reply(&tag, &failure));
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
                    .write_all(b"* BYE Autologout; no login within the time limit\r\n")
                    .await;
                return;
            }
            ClientRead::Shutdown => {
                let _ = client
                    .write_all(b"* BYE [UNAVAILABLE] xoauth2-proxy is shutting down\r\n")
                    .await;
                return;
            }
        }
    }
}

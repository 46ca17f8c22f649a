//! SMTP connection driver: local banner, EHLO answered from upstream's (rewritten), local
//! AUTH PLAIN/LOGIN, upstream two-step AUTH XOAUTH2, then splice. The upstream connection is
//! opened at the client's first EHLO so its extensions can be promised to the client.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use super::login::{self, Failure};
use super::stream::Stream;
use super::upstream::{self, exchange};
use super::{complete, open_client, read_client, upgrade_client, ClientRead, Conn};
use crate::config::{LocalTls, UpstreamTls};
use crate::protocol::smtp::{Action, ClientSession, SessionOptions, UpstreamAuth, UpstreamHello};
use crate::protocol::UpOutcome;

/// Reply lines stay under RFC 5321's 512 octets.
fn one_line(code: &str, text: &str) -> Vec<u8> {
    let text: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(500 - code.len())
        .collect();
    format!("{code} {text}\r\n").into_bytes()
}

fn reply(failure: &Failure) -> Vec<u8> {
    let text = failure.describe();
    match failure {
        Failure::BadCredentials | Failure::NotAuthorized { .. } | Failure::TokenRejected { .. } => {
            one_line("535 5.7.8", &text)
        }
        Failure::Misconfigured { .. } | Failure::Temporary { .. } => one_line("454 4.7.0", &text),
        // The server's own reply (e.g. 454 4.7.0 Too many login attempts), verbatim.
        Failure::UpstreamRefused { line } => {
            let mut bytes = line.clone().into_bytes();
            if !bytes.ends_with(b"\r\n") {
                bytes.extend_from_slice(b"\r\n");
            }
            bytes
        }
    }
}

/// Greet upstream (connecting if `stream` is None) with EHLO `domain`; returns the connection
/// and upstream's EHLO lines.
async fn hello(
    conn: &Conn,
    stream: Option<Stream>,
    domain: &str,
) -> Result<(Stream, Vec<String>), Failure> {
    let deadline = Instant::now() + conn.app.config.limits.upstream_timeout;
    let fresh = stream.is_none();
    let stream = match stream {
        Some(s) => s,
        None => upstream::connect(conn, deadline).await?,
    };
    let starttls = fresh && conn.ctx.config.upstream_tls == UpstreamTls::Starttls;
    let mut machine = UpstreamHello::new(domain, starttls, fresh);
    match exchange(conn, stream, &mut machine, deadline).await? {
        (s, UpOutcome::Success { relay, .. }) => Ok((s, UpstreamHello::lines(&relay))),
        (_, UpOutcome::Failed(why)) => Err(Failure::Temporary {
            detail: format!("{}: {why}", conn.ctx.config.upstream()),
        }),
        (_, UpOutcome::Rejected { line, .. }) => Err(Failure::Temporary {
            detail: format!("{}: {}", conn.ctx.config.upstream(), line.trim_end()),
        }),
    }
}

pub async fn handle(conn: Conn, tcp: TcpStream, cancel: CancellationToken) {
    let peer = conn.peer;
    let limits = conn.app.config.limits.clone();
    let mut deadline = Instant::now() + limits.preauth_timeout;
    let local_tls = conn.ctx.config.local_tls;
    let Some(mut client) = open_client(&conn, tcp, deadline).await else {
        return;
    };
    let mut session = ClientSession::new(SessionOptions {
        starttls_offered: local_tls == LocalTls::Starttls,
        login_allowed: local_tls != LocalTls::Starttls || peer.ip().is_loopback(),
    });
    if client.write_all(&session.greeting()).await.is_err() {
        return;
    }
    let mut up: Option<Stream> = None;
    let mut domain = String::from("localhost");
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
                Action::Hello { domain: d } => {
                    domain = d;
                    match hello(&conn, up.take(), &domain).await {
                        Ok((s, lines)) => {
                            up = Some(s);
                            session.hello_result(Ok(lines));
                        }
                        Err(f) => {
                            tracing::warn!(%peer, error = %f.describe(), "cannot greet upstream");
                            let line = one_line("421 4.4.2", &f.describe());
                            session.hello_result(Err(String::from_utf8_lossy(&line)
                                .trim_end()
                                .to_string()));
                        }
                    }
                }
                Action::Login { credentials } => {
                    let result = async {
                        let (email, token) = login::authorize(&conn, &credentials).await?;
                        let stream = match up.take() {
                            Some(s) => s,
                            // A failed AUTH cost the previous connection: greet again quietly.
                            None => hello(&conn, None, &domain).await?.0,
                        };
                        let deadline = Instant::now() + limits.upstream_timeout;
                        let logged_in = upstream::authenticate(
                            &conn,
                            stream,
                            &email,
                            token,
                            UpstreamAuth::new,
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
                    .write_all(b"421 4.4.2 Timeout: no login within the time limit\r\n")
                    .await;
                return;
            }
            ClientRead::Shutdown => {
                let _ = client
                    .write_all(b"421 4.3.2 xoauth2-proxy is shutting down\r\n")
                    .await;
                return;
            }
        }
    }
}

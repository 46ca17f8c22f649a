//! SMTP dialect: the EHLO answer comes from upstream (rewritten), so the upstream connection
//! is opened at the client's first EHLO and kept for the two-step AUTH XOAUTH2 that follows.

use std::sync::Arc;

use tokio::time::Instant;

use super::login::Failure;
use super::session::Dialect;
use super::stream::Stream;
use super::upstream::{self, exchange, Upstream};
use super::Conn;
use crate::config::UpstreamTls;
use crate::oauth::AccessToken;
use crate::protocol::smtp::{ClientSession, SessionOptions, UpstreamAuth, UpstreamHello};
use crate::protocol::{Query, UpOutcome};

pub struct Smtp {
    /// The upstream connection an EHLO opened.
    up: Option<Stream>,
    /// The client's last EHLO argument, to greet upstream again after a failed AUTH.
    domain: String,
}

impl Default for Smtp {
    fn default() -> Self {
        Smtp {
            up: None,
            domain: "localhost".into(),
        }
    }
}

/// Reply lines stay under RFC 5321's 512 octets.
fn one_line(code: &str, text: &str) -> Vec<u8> {
    let text: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(500 - code.len())
        .collect();
    format!("{code} {text}\r\n").into_bytes()
}

impl Smtp {
    /// Greet upstream with EHLO (connecting first if there is no connection yet); returns
    /// upstream's EHLO lines.
    async fn hello(&mut self, conn: &Conn) -> Result<Vec<String>, Failure> {
        let deadline = Instant::now() + conn.app.config.limits.upstream_timeout;
        let fresh = self.up.is_none();
        let stream = match self.up.take() {
            Some(s) => s,
            None => upstream::connect(conn, deadline).await?,
        };
        let starttls = fresh && conn.ctx.config.upstream_tls == UpstreamTls::Starttls;
        let mut machine = UpstreamHello::new(&self.domain, starttls, fresh);
        let temporary = |why: String| Failure::Temporary {
            detail: format!("{}: {why}", conn.ctx.config.upstream()),
        };
        match exchange(conn, stream, &mut machine, deadline).await? {
            (s, UpOutcome::Success { relay, .. }) => {
                self.up = Some(s);
                Ok(UpstreamHello::lines(&relay))
            }
            (_, UpOutcome::Failed(why)) => Err(temporary(why)),
            (_, UpOutcome::Rejected { line, .. }) => Err(temporary(line.trim_end().to_string())),
        }
    }
}

impl Dialect for Smtp {
    type Session = ClientSession;

    fn session(&self, starttls_offered: bool, login_allowed: bool) -> ClientSession {
        ClientSession::new(SessionOptions {
            starttls_offered,
            login_allowed,
        })
    }

    fn failure_reply(&self, _tag: &str, failure: &Failure) -> Vec<u8> {
        let text = failure.describe();
        match failure {
            Failure::BadCredentials
            | Failure::NeverAuthorized { .. }
            | Failure::Revoked { .. }
            | Failure::TokenRejected { .. } => one_line("535 5.7.8", &text),
            Failure::Misconfigured { .. }
            | Failure::Temporary { .. }
            | Failure::TooManySessions { .. } => one_line("454 4.7.0", &text),
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

    fn timeout_line(&self) -> &'static [u8] {
        b"421 4.4.2 Timeout: no login within the time limit\r\n"
    }

    fn shutdown_line(&self) -> &'static [u8] {
        b"421 4.3.2 xoauth2-proxy is shutting down\r\n"
    }

    async fn query(&mut self, conn: &Conn, session: &mut ClientSession, query: Query) {
        let Query::Hello { domain } = query else {
            return;
        };
        self.domain = domain;
        match self.hello(conn).await {
            Ok(lines) => session.hello_result(Ok(lines)),
            Err(f) => {
                tracing::warn!(peer = %conn.peer, error = %f.describe(), "cannot greet upstream");
                let line = one_line("421 4.4.2", &f.describe());
                session.hello_result(Err(String::from_utf8_lossy(&line).trim_end().to_string()));
            }
        }
    }

    async fn login(
        &mut self,
        conn: &Conn,
        _tag: &str,
        email: &str,
        token: Arc<AccessToken>,
    ) -> Result<Upstream, Failure> {
        if self.up.is_none() {
            // A failed AUTH cost the previous connection: greet again quietly.
            self.hello(conn).await?;
        }
        let stream = self.up.take().ok_or_else(|| Failure::Temporary {
            detail: "no upstream connection".into(),
        })?;
        let deadline = Instant::now() + conn.app.config.limits.upstream_timeout;
        upstream::authenticate(conn, stream, email, token, UpstreamAuth::new, deadline).await
    }
}

//! POP3 dialect: CAPA is answered from upstream's list (rewritten), keeping the connection for
//! the two-step AUTH XOAUTH2 that usually follows.

use std::sync::Arc;

use tokio::time::Instant;

use super::login::Failure;
use super::session::Dialect;
use super::stream::Stream;
use super::upstream::{self, exchange, Upstream};
use super::Conn;
use crate::config::UpstreamTls;
use crate::oauth::AccessToken;
use crate::protocol::pop3::{ClientSession, Goal, SessionOptions, UpstreamPop};
use crate::protocol::{Query, UpOutcome};
use crate::secret::Secret;

#[derive(Default)]
pub struct Pop3 {
    /// The upstream connection a CAPA opened.
    up: Option<Stream>,
}

impl Pop3 {
    /// The connection to use (the kept one, or a new one) and whether it is new.
    async fn stream(&mut self, conn: &Conn, deadline: Instant) -> Result<(Stream, bool), Failure> {
        match self.up.take() {
            Some(s) => Ok((s, false)),
            None => Ok((upstream::connect(conn, deadline).await?, true)),
        }
    }
}

impl Dialect for Pop3 {
    type Session = ClientSession;

    fn session(&self, starttls_offered: bool, login_allowed: bool) -> ClientSession {
        ClientSession::new(SessionOptions {
            starttls_offered,
            login_allowed,
        })
    }

    fn failure_reply(&self, _tag: &str, failure: &Failure) -> Vec<u8> {
        let code = match failure {
            Failure::BadCredentials
            | Failure::NeverAuthorized { .. }
            | Failure::Revoked { .. }
            | Failure::TokenRejected { .. } => "-ERR [AUTH]",
            Failure::Misconfigured { .. } => "-ERR [SYS/PERM]",
            Failure::Temporary { .. } => "-ERR [SYS/TEMP]",
            Failure::TooManySessions { .. } => "-ERR [IN-USE]",
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

    fn timeout_line(&self) -> &'static [u8] {
        b"-ERR [SYS/TEMP] No login within the time limit\r\n"
    }

    fn shutdown_line(&self) -> &'static [u8] {
        b"-ERR [SYS/TEMP] xoauth2-proxy is shutting down\r\n"
    }

    async fn query(&mut self, conn: &Conn, session: &mut ClientSession, query: Query) {
        if query != Query::Capa {
            return;
        }
        let deadline = Instant::now() + conn.app.config.limits.upstream_timeout;
        let result = async {
            let (stream, fresh) = self.stream(conn, deadline).await?;
            let starttls = fresh && conn.ctx.config.upstream_tls == UpstreamTls::Starttls;
            let mut machine = UpstreamPop::new(Goal::Capa, Secret::default(), starttls, fresh);
            match exchange(conn, stream, &mut machine, deadline).await? {
                (s, UpOutcome::Success { relay, .. }) => Ok((s, UpstreamPop::lines(&relay))),
                (_, other) => Err(Failure::Temporary {
                    detail: format!("{}: CAPA failed: {other:?}", conn.ctx.config.upstream()),
                }),
            }
        }
        .await;
        match result {
            Ok((s, lines)) => {
                self.up = Some(s);
                session.capa_result(Some(lines));
            }
            Err(f) => {
                tracing::debug!(peer = %conn.peer, error = %f.describe(), "answering CAPA locally");
                session.capa_result(None);
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
        let deadline = Instant::now() + conn.app.config.limits.upstream_timeout;
        let (stream, fresh) = self.stream(conn, deadline).await?;
        let starttls = fresh && conn.ctx.config.upstream_tls == UpstreamTls::Starttls;
        upstream::authenticate(
            conn,
            stream,
            email,
            token,
            |xo| UpstreamPop::new(Goal::Auth, xo, starttls, fresh),
            deadline,
        )
        .await
    }
}

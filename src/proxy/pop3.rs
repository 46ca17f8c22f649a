//! POP3 dialect: CAPA is answered by the session from what upstream is known to offer; only
//! after the local password check does the proxy connect and run the two-step AUTH XOAUTH2,
//! asking upstream's CAPA first on the listener's first login so later answers are upstream's.

use std::sync::Arc;

use tokio::time::Instant;

use super::login::Failure;
use super::session::Dialect;
use super::stream::Stream;
use super::upstream::{self, exchange, Target, Upstream};
use super::Conn;
use crate::config::{AccountConfig, UpstreamTls};
use crate::oauth::AccessToken;
use crate::protocol::pop3::{ClientSession, Goal, SessionOptions, UpstreamPop};
use crate::protocol::UpOutcome;
use crate::secret::Secret;

pub struct Pop3;

/// A new upstream connection for the login, and whether its greeting (and STLS) is still to
/// come. When the listener has not seen upstream's CAPA yet, it is asked for on the way.
async fn connect(
    conn: &Conn,
    target: &Target,
    deadline: Instant,
) -> Result<(Stream, bool), Failure> {
    let stream = upstream::connect(&conn.ctx, target, deadline).await?;
    let known = &conn.ctx.upstream_capabilities;
    if known.get().is_some() {
        return Ok((stream, true));
    }
    let starttls = target.tls == UpstreamTls::Starttls;
    let mut machine = UpstreamPop::new(Goal::Capa, Secret::default(), starttls, true);
    match exchange(&conn.ctx, target, stream, &mut machine, deadline).await? {
        (s, UpOutcome::Success { relay, .. }) => {
            known.set(UpstreamPop::lines(&relay));
            Ok((s, false))
        }
        // A server without CAPA: log in on a connection in a known state.
        (_, other) => {
            tracing::debug!(peer = %conn.peer, outcome = ?other, "upstream CAPA failed");
            Ok((upstream::connect(&conn.ctx, target, deadline).await?, true))
        }
    }
}

impl Dialect for Pop3 {
    type Session = ClientSession;

    fn session(&self, conn: &Conn, starttls_offered: bool, login_allowed: bool) -> ClientSession {
        ClientSession::new(SessionOptions {
            starttls_offered,
            login_allowed,
            upstream_capa: conn.ctx.upstream_capabilities.get(),
        })
    }

    const TIMEOUT_LINE: &'static [u8] = b"-ERR [SYS/TEMP] No login within the time limit\r\n";

    const SHUTDOWN_LINE: &'static [u8] = b"-ERR [SYS/TEMP] xoauth2-proxy is shutting down\r\n";

    async fn login(
        &self,
        conn: &Conn,
        _session: &ClientSession,
        account: &AccountConfig,
        token: Arc<AccessToken>,
    ) -> Result<Upstream, Failure> {
        let deadline = Instant::now() + conn.app.config.limits.upstream_timeout;
        let target = conn.ctx.target(Some(account));
        let (stream, fresh) = connect(conn, &target, deadline).await?;
        let starttls = fresh && target.tls == UpstreamTls::Starttls;
        upstream::authenticate(
            conn,
            &target,
            stream,
            account,
            token,
            |xo| UpstreamPop::new(Goal::Auth, xo, starttls, fresh),
            deadline,
        )
        .await
    }
}

//! SMTP dialect: EHLO is answered by the session from what upstream is known to offer; only
//! after the local password check does the proxy connect, greet upstream with the client's
//! validated EHLO domain, remember upstream's extensions for the listener, and run the
//! two-step AUTH XOAUTH2.

use std::sync::Arc;

use tokio::time::Instant;

use super::login::Failure;
use super::session::Dialect;
use super::stream::Stream;
use super::upstream::{self, exchange, Target, Upstream};
use super::Conn;
use crate::config::{AccountConfig, UpstreamTls};
use crate::oauth::AccessToken;
use crate::protocol::smtp::{ClientSession, SessionOptions, UpstreamAuth, UpstreamHello};
use crate::protocol::UpOutcome;

pub struct Smtp;

/// What upstream is greeted with if the client somehow never said (AUTH needs EHLO first).
const FALLBACK_DOMAIN: &str = "localhost";

/// Greet upstream on a new connection (banner, EHLO, STARTTLS and EHLO again when
/// configured) and note its extensions for the listener's next EHLO answers.
async fn hello(
    conn: &Conn,
    target: &Target,
    domain: &str,
    deadline: Instant,
) -> Result<Stream, Failure> {
    let stream = upstream::connect(&conn.ctx, target, deadline).await?;
    let starttls = target.tls == UpstreamTls::Starttls;
    let mut machine = UpstreamHello::new(domain, starttls, true);
    let temporary = |why: String| Failure::Temporary {
        detail: format!("{target}: {why}"),
    };
    match exchange(&conn.ctx, target, stream, &mut machine, deadline).await? {
        (s, UpOutcome::Success { relay, .. }) => {
            let lines = UpstreamHello::lines(&relay);
            conn.ctx
                .upstream_capabilities
                .set(lines.into_iter().skip(1).collect());
            Ok(s)
        }
        (_, UpOutcome::Failed(why)) => Err(temporary(why)),
        (_, UpOutcome::Rejected { line, .. }) => Err(temporary(line.trim_end().to_string())),
    }
}

impl Dialect for Smtp {
    type Session = ClientSession;

    fn session(&self, conn: &Conn, starttls_offered: bool, login_allowed: bool) -> ClientSession {
        ClientSession::new(SessionOptions {
            starttls_offered,
            login_allowed,
            upstream_extensions: conn.ctx.upstream_capabilities.get(),
        })
    }

    const TIMEOUT_LINE: &'static [u8] = b"421 4.4.2 Timeout: no login within the time limit\r\n";

    const SHUTDOWN_LINE: &'static [u8] = b"421 4.3.2 xoauth2-proxy is shutting down\r\n";

    async fn login(
        &self,
        conn: &Conn,
        session: &ClientSession,
        account: &AccountConfig,
        token: Arc<AccessToken>,
    ) -> Result<Upstream, Failure> {
        let deadline = Instant::now() + conn.app.config.limits.upstream_timeout;
        let domain = session.hello_domain().unwrap_or(FALLBACK_DOMAIN);
        let target = conn.ctx.target(Some(account));
        let stream = hello(conn, &target, domain, deadline).await?;
        let make = UpstreamAuth::new;
        upstream::authenticate(conn, &target, stream, account, token, make, deadline).await
    }
}

//! IMAP dialect: upstream login on a new connection, reusing the client's tag so the server's
//! answer can be relayed verbatim.

use std::sync::Arc;

use super::login::Failure;
use super::session::Dialect;
use super::upstream::{self, Upstream};
use super::Conn;
use crate::config::{AccountConfig, UpstreamTls};
use crate::oauth::AccessToken;
use crate::protocol::imap::{ClientSession, Limits, SessionOptions, UpstreamLogin};

pub struct Imap;

/// Only if the session had no login in progress, which the driver never asks for.
const FALLBACK_TAG: &str = "A0001";

impl Dialect for Imap {
    type Session = ClientSession;

    fn session(&self, _conn: &Conn, starttls_offered: bool, login_allowed: bool) -> ClientSession {
        ClientSession::new(SessionOptions {
            starttls_offered,
            login_allowed,
            limits: Limits::default(),
        })
    }

    const TIMEOUT_LINE: &'static [u8] = b"* BYE Autologout; no login within the time limit\r\n";

    const SHUTDOWN_LINE: &'static [u8] = b"* BYE [UNAVAILABLE] xoauth2-proxy is shutting down\r\n";

    async fn login(
        &self,
        conn: &Conn,
        session: &ClientSession,
        account: &AccountConfig,
        token: Arc<AccessToken>,
    ) -> Result<Upstream, Failure> {
        let slot = conn.app.imap_slot(account).await?;
        let starttls = conn.ctx.target(Some(account)).tls == UpstreamTls::Starttls;
        let tag = session.login_tag().unwrap_or(FALLBACK_TAG);
        let mut up = upstream::login(conn, account, token, |xo| {
            UpstreamLogin::new(tag, xo, starttls)
        })
        .await?;
        up.slot = Some(slot);
        Ok(up)
    }
}

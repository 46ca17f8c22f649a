//! IMAP dialect: replies tagged with the client's tag; upstream login on a new connection,
//! reusing the client's tag so the server's answer can be relayed verbatim.

use std::sync::Arc;

use super::login::Failure;
use super::session::Dialect;
use super::upstream::{self, Upstream};
use super::Conn;
use crate::config::UpstreamTls;
use crate::oauth::AccessToken;
use crate::protocol::imap::{ClientSession, Limits, SessionOptions, UpstreamLogin};
use crate::protocol::Query;

pub struct Imap;

impl Dialect for Imap {
    type Session = ClientSession;

    fn session(&self, starttls_offered: bool, login_allowed: bool) -> ClientSession {
        ClientSession::new(SessionOptions {
            starttls_offered,
            login_allowed,
            limits: Limits::default(),
        })
    }

    fn failure_reply(&self, tag: &str, failure: &Failure) -> Vec<u8> {
        let text = failure.describe();
        let line = match failure {
            Failure::BadCredentials
            | Failure::NeverAuthorized { .. }
            | Failure::Revoked { .. }
            | Failure::TokenRejected { .. } => {
                format!("{tag} NO [AUTHENTICATIONFAILED] {text}")
            }
            Failure::Misconfigured { .. } => format!("{tag} NO [CONTACTADMIN] {text}"),
            Failure::Temporary { .. } => format!("{tag} NO [UNAVAILABLE] {text}"),
            Failure::TooManySessions { .. } => format!("{tag} NO [LIMIT] {text}"),
            // The server's own words (NO [ALERT] ...), already a complete response after the tag.
            Failure::UpstreamRefused { line } => format!("{tag} {line}"),
        };
        let mut bytes = line.into_bytes();
        bytes.retain(|&b| b != b'\r' && b != b'\n');
        bytes.extend_from_slice(b"\r\n");
        bytes
    }

    fn timeout_line(&self) -> &'static [u8] {
        b"* BYE Autologout; no login within the time limit\r\n"
    }

    fn shutdown_line(&self) -> &'static [u8] {
        b"* BYE [UNAVAILABLE] xoauth2-proxy is shutting down\r\n"
    }

    async fn query(&mut self, _conn: &Conn, _session: &mut ClientSession, _query: Query) {
        // The IMAP session answers everything before login itself.
    }

    async fn login(
        &mut self,
        conn: &Conn,
        tag: &str,
        email: &str,
        token: Arc<AccessToken>,
    ) -> Result<Upstream, Failure> {
        let slot = conn
            .app
            .imap_slot(email)
            .ok_or_else(|| Failure::TooManySessions {
                email: email.to_string(),
                limit: conn.app.config.limits.imap_connections_per_account,
            })?;
        let starttls = conn.ctx.config.upstream_tls == UpstreamTls::Starttls;
        let mut up = upstream::login(conn, email, token, |xo| {
            UpstreamLogin::new(tag, xo, starttls)
        })
        .await?;
        up.slot = Some(slot);
        Ok(up)
    }
}

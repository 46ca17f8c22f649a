//! Sans-I/O protocol code: the authentication phases of IMAP, SMTP and POP3 as state machines
//! that take bytes in and hand back actions, plus the SASL pieces they share.

pub mod imap;
pub mod pop3;
pub mod sasl;
pub mod smtp;

use crate::secret::SensitiveBytes;
use sasl::ErrorChallenge;

/// What the client asked to log in with, once its credentials are complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: crate::secret::Secret,
}

/// Find the end of the first line (index just past `\n`) at or after `from`.
pub(crate) fn find_line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| from + i + 1)
}

/// A line without its trailing CRLF (or bare LF).
pub(crate) fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// What a client-side session asks its driver to do.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientAction {
    /// Write these bytes to the client.
    Send(Vec<u8>),
    /// Start TLS on the client connection now (the go-ahead was sent), then call
    /// `tls_established`.
    StartTls,
    /// The client gave credentials: verify them and log in upstream, then call
    /// `login_rejected` or `into_pending_input`. Bytes fed meanwhile are held, not interpreted.
    /// `tag` is the IMAP command tag (empty for SMTP and POP3).
    Login {
        tag: String,
        credentials: Credentials,
    },
    /// Close the connection (after sending what was queued).
    Close,
}

/// What the driver must do next for the upstream side.
#[derive(Debug, PartialEq, Eq)]
pub enum UpAction {
    /// Write these bytes upstream (may carry the token).
    Send(SensitiveBytes),
    /// Start TLS on the upstream connection now, then call `tls_established`.
    StartTls,
    /// The exchange is over.
    Done(UpOutcome),
}

#[derive(Debug, PartialEq, Eq)]
pub enum UpOutcome {
    /// Logged in. `relay` is the server's answer (untagged lines and the tagged OK) for the
    /// client, verbatim; `leftover` is anything the server sent after it.
    Success { relay: Vec<u8>, leftover: Vec<u8> },
    /// The server refused the login. `challenge` is the decoded XOAUTH2 error challenge if
    /// there was one; `line` is the server's final response (for IMAP, the text after the tag);
    /// `token_rejected` says the refusal is about the token (worth one refresh and retry), not
    /// something else such as an [ALERT] or a connection limit.
    Rejected {
        challenge: Option<ErrorChallenge>,
        line: String,
        token_rejected: bool,
    },
    /// The server misbehaved or hung up (greeting not OK, BYE, STARTTLS refused, garbage).
    Failed(String),
}

/// The upstream half of a protocol's authentication phase, driven by `proxy::upstream`.
pub trait UpstreamMachine: Send {
    fn feed(&mut self, bytes: &[u8]);
    fn next_action(&mut self) -> Option<UpAction>;
    /// TLS is up after an `UpAction::StartTls`.
    fn tls_established(&mut self);
    /// After `UpOutcome::Rejected`, authenticate again on the same connection with a new token.
    fn retry(&mut self, xoauth2: crate::secret::Secret);
}

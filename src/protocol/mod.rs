//! Sans-I/O protocol code: the authentication phases of IMAP, SMTP and POP3 as state machines
//! that take bytes in and hand back actions, plus the SASL pieces they share.

use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

use crate::secret::SensitiveBytes;

pub mod failure;
pub mod proxy_header;
pub mod sasl;
pub use failure::{Failure, Words};
use sasl::ErrorChallenge;

/// The mail protocols the proxy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Imap,
    Smtp,
    Pop3,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Smtp => "smtp",
            Protocol::Pop3 => "pop3",
        }
    }
}

/// What the client asked to log in with, once its credentials are complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: crate::secret::Secret,
}

/// What a client sent before login, not yet consumed: read as lines of bounded length (and,
/// for IMAP literals, counted octets). Bytes may be a password, so none is left behind in
/// memory once consumed, moved or dropped.
#[derive(Default)]
pub(crate) struct Input {
    buf: Vec<u8>,
    /// Where to resume the search for a line end: no byte is scanned twice.
    scan_from: usize,
}

/// A line longer than the limit; the session cannot resynchronise and closes.
pub(crate) struct LineTooLong;

impl Input {
    pub fn push(&mut self, bytes: &[u8]) {
        extend_wiping(&mut self.buf, bytes);
    }

    /// The next complete line (with its line end), None if it has not all arrived.
    pub fn line(&mut self, max: usize) -> Result<Option<Vec<u8>>, LineTooLong> {
        match find_line_end(&self.buf, self.scan_from) {
            Some(end) if end <= max => {
                self.scan_from = 0;
                Ok(Some(self.consume(end)))
            }
            Some(_) => Err(LineTooLong),
            None if self.buf.len() > max => Err(LineTooLong),
            None => {
                self.scan_from = self.buf.len();
                Ok(None)
            }
        }
    }

    /// Exactly `n` octets, once they have arrived.
    pub fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        if self.buf.len() < n {
            return None;
        }
        self.scan_from = 0;
        Some(self.consume(n))
    }

    /// The first `n` bytes; the rest moves to the front, and the tail it leaves is wiped.
    fn consume(&mut self, n: usize) -> Vec<u8> {
        let head = self.buf[..n].to_vec();
        let rest = self.buf.len() - n;
        self.buf.copy_within(n.., 0);
        self.buf[rest..].zeroize();
        self.buf.truncate(rest);
        head
    }

    /// Up to `n` bytes from the start, not consumed.
    pub fn peek(&self, n: usize) -> &[u8] {
        &self.buf[..n.min(self.buf.len())]
    }

    pub fn clear(&mut self) {
        self.buf.zeroize();
        self.scan_from = 0;
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn into_inner(mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

/// Append `bytes`, growing into a new allocation by hand so that the old one is wiped, not
/// just freed with a copy of what may be a password in it.
pub(crate) fn extend_wiping(buf: &mut Vec<u8>, bytes: &[u8]) {
    let needed = buf.len() + bytes.len();
    if needed > buf.capacity() {
        let mut grown = Vec::with_capacity(needed.max(2 * buf.capacity()));
        grown.extend_from_slice(buf);
        buf.zeroize();
        *buf = grown;
    }
    buf.extend_from_slice(bytes);
}

/// What every client session keeps besides its protocol state: unread input, the actions
/// queued for the driver, and whether the connection is being closed.
#[derive(Default)]
pub(crate) struct Core {
    pub input: Input,
    pub out: std::collections::VecDeque<ClientAction>,
    pub closed: bool,
}

/// A client session as [`Core::next_action`] drives it.
pub(crate) trait SessionMachine {
    fn core(&mut self) -> &mut Core;
    /// Waiting for the driver (a login, a TLS handshake): input is held, not read.
    fn waiting(&self) -> bool;
    /// Interpret the next unit of input; false when nothing more can be done now.
    fn step(&mut self) -> bool;
}

impl Core {
    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.closed {
            self.input.push(bytes);
        }
    }

    pub fn send(&mut self, text: impl Into<Vec<u8>>) {
        self.out.push_back(ClientAction::Send(text.into()));
    }

    /// Send `line` and close; nothing the client sent afterwards is read.
    pub fn close_with(&mut self, line: &str) {
        self.send(format!("{line}\r\n"));
        self.out.push_back(ClientAction::Close);
        self.closed = true;
        self.input.clear();
    }

    /// The next line, or None (more input needed, or too long: then `too_long` closes). Wiped
    /// when dropped: it may be a LOGIN command or a SASL response.
    pub fn line(&mut self, max: usize, too_long: &str) -> Option<Zeroizing<Vec<u8>>> {
        match self.input.line(max) {
            Ok(line) => line.map(Zeroizing::new),
            Err(LineTooLong) => {
                self.close_with(too_long);
                None
            }
        }
    }

    /// Queued actions first, then as much input as the session can interpret now.
    pub fn next_action<S: SessionMachine>(session: &mut S) -> Option<ClientAction> {
        loop {
            if let Some(a) = session.core().out.pop_front() {
                return Some(a);
            }
            if session.core().closed || session.waiting() {
                return None;
            }
            if !session.step() && session.core().out.is_empty() {
                return None;
            }
        }
    }
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
    /// `login_failed` or `into_pending_input`. Bytes fed meanwhile are held, not interpreted.
    Login { credentials: Credentials },
    /// Close the connection (after sending what was queued).
    Close,
}

/// The client half of a protocol's authentication phase, driven by `proxy`.
pub trait ClientSession: Send {
    /// The first bytes to send the client.
    fn greeting(&self) -> Vec<u8>;
    fn feed(&mut self, bytes: &[u8]);
    fn next_action(&mut self) -> Option<ClientAction>;
    /// TLS is up after a `ClientAction::StartTls`.
    fn tls_established(&mut self);
    /// The login failed: queue the protocol's reply for this class of failure, in the words
    /// of the account's provider.
    fn login_failed(&mut self, failure: &Failure, words: &Words);
    /// The login succeeded: what the client sent after its login command, for upstream.
    fn into_pending_input(self) -> Vec<u8>;
}

/// Implements [`ClientSession`] for a session type through its inherent methods of the same names.
macro_rules! impl_client_session {
    ($t:ty) => {
        impl $crate::protocol::ClientSession for $t {
            fn greeting(&self) -> Vec<u8> {
                <$t>::greeting(self)
            }
            fn feed(&mut self, bytes: &[u8]) {
                <$t>::feed(self, bytes)
            }
            fn next_action(&mut self) -> Option<$crate::protocol::ClientAction> {
                <$t>::next_action(self)
            }
            fn tls_established(&mut self) {
                <$t>::tls_established(self)
            }
            fn login_failed(
                &mut self,
                failure: &$crate::protocol::Failure,
                words: &$crate::protocol::failure::Words,
            ) {
                <$t>::login_failed(self, failure, words)
            }
            fn into_pending_input(self) -> Vec<u8> {
                <$t>::into_pending_input(self)
            }
        }
    };
}
pub(crate) use impl_client_session;

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

pub mod imap;
pub mod pop3;
pub mod smtp;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumed_lines_leave_no_copy_behind_in_the_buffer() {
        let mut input = Input::default();
        input.push(b"a1 LOGIN alice hunter2-secret\r\nn\r\n");
        let held = input.buf.len();
        let line = input.line(100).ok().flatten();
        assert_eq!(
            line.as_deref(),
            Some(&b"a1 LOGIN alice hunter2-secret\r\n"[..])
        );
        // SAFETY: these `held` bytes were initialised by the push; truncating keeps them
        // allocated, which is what is looked at here.
        let memory = unsafe { std::slice::from_raw_parts(input.buf.as_ptr(), held) };
        assert_eq!(&memory[..3], b"n\r\n");
        assert!(memory[3..].iter().all(|&b| b == 0));
    }
}

/// Helpers for the transcript tests of every protocol.
#[cfg(test)]
pub(crate) mod testkit {
    use super::{ClientAction, ClientSession, Failure, UpAction, UpstreamMachine};

    /// Feed `input` and collect actions until the session needs more.
    pub fn run<S: ClientSession>(s: &mut S, input: &[u8]) -> Vec<ClientAction> {
        s.feed(input);
        std::iter::from_fn(|| s.next_action()).collect()
    }

    /// Everything the actions send to the client, as text.
    pub fn sent(actions: &[ClientAction]) -> String {
        actions
            .iter()
            .filter_map(|a| match a {
                ClientAction::Send(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect()
    }

    /// Feed server bytes to an upstream machine and collect its actions.
    pub fn up_run<M: UpstreamMachine>(m: &mut M, input: &[u8]) -> Vec<UpAction> {
        m.feed(input);
        std::iter::from_fn(|| m.next_action()).collect()
    }

    /// Google's words, as the transcript tests expect them.
    pub const WORDS: super::Words = super::Words {
        provider: "Google",
        mail: "Gmail",
    };

    /// One failure of each class, as the driver hands them to a session; `refusal` is what
    /// upstream said when it refused the login.
    pub fn every_failure(refusal: &str) -> [Failure; 8] {
        let email = || "alice@gmail.com".to_string();
        [
            Failure::BadCredentials,
            Failure::NeverAuthorized { email: email() },
            Failure::Revoked {
                email: email(),
                detail: "invalid_grant: Token has been expired or revoked.".into(),
            },
            Failure::Misconfigured {
                email: email(),
                detail: "invalid_client: The OAuth client was not found.".into(),
            },
            Failure::Temporary {
                detail: "token endpoint returned 503".into(),
            },
            Failure::TokenRejected {
                email: email(),
                detail: "status 400, required scope https://mail.google.com/".into(),
            },
            Failure::UpstreamRefused {
                line: refusal.into(),
            },
            Failure::TooManySessions {
                email: email(),
                limit: 15,
            },
        ]
    }

    /// Everything the actions send upstream, as text.
    pub fn up_sent(actions: &[UpAction]) -> String {
        actions
            .iter()
            .filter_map(|a| match a {
                UpAction::Send(b) => Some(String::from_utf8_lossy(b.expose()).into_owned()),
                _ => None,
            })
            .collect()
    }
}

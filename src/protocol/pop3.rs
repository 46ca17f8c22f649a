//! POP3 authorization state, sans-I/O.
//!
//! [`ClientSession`] is the proxy as a POP3 server until `PASS` or `AUTH PLAIN` gives it
//! credentials (CAPA is answered locally from the list upstream is known to offer, rewritten:
//! a stranger's CAPA reaches nothing upstream). [`UpstreamPop`] greets upstream (optionally
//! STLS) and either fetches its CAPA or runs the two-step `AUTH XOAUTH2` (POP3 commands are
//! limited to 255 octets, so never inline).

use std::collections::VecDeque;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::sasl::{self, ErrorChallenge, SaslError};
use super::{
    trim_eol, Core, Credentials, Failure, Input, LineTooLong, SessionMachine, UpAction, UpOutcome,
    UpstreamMachine, Words,
};
use crate::secret::{Secret, SensitiveBytes};

pub const MAX_LINE: usize = 4096;

pub use super::ClientAction as Action;

/// Gmail's CAPA list (protocol-facts §1.4), promised until a login has shown what the
/// listener's upstream really offers.
pub const GMAIL_CAPA: [&str; 8] = [
    "USER",
    "RESP-CODES",
    "EXPIRE 0",
    "LOGIN-DELAY 300",
    "TOP",
    "UIDL",
    "X-GOOGLE-RICO",
    "SASL PLAIN XOAUTH2 OAUTHBEARER",
];

#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    pub starttls_offered: bool,
    pub login_allowed: bool,
    /// Upstream's capability lines as last seen; None: Gmail's.
    pub upstream_capa: Option<Arc<[String]>>,
}

enum State {
    Command,
    AuthPlain,
    Authenticating,
    TlsPending,
}

pub struct ClientSession {
    opts: SessionOptions,
    state: State,
    /// From USER, waiting for PASS.
    user: Option<String>,
    core: Core,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("buffered", &self.core.input.len())
            .finish_non_exhaustive()
    }
}

super::impl_client_session!(ClientSession);

impl ClientSession {
    pub fn new(opts: SessionOptions) -> Self {
        ClientSession {
            opts,
            state: State::Command,
            user: None,
            core: Core::default(),
        }
    }

    /// No `<timestamp@host>`: the proxy cannot do APOP, so clients must not try it.
    pub fn greeting(&self) -> Vec<u8> {
        b"+OK xoauth2-proxy POP3 ready\r\n".to_vec()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.core.feed(bytes);
    }

    pub fn next_action(&mut self) -> Option<Action> {
        Core::next_action(self)
    }

    /// Answered here, not by upstream: nobody reaches upstream before a password check.
    fn capa(&mut self) {
        let starttls = self.opts.starttls_offered;
        let lines = match &self.opts.upstream_capa {
            Some(known) => rewrite_capa(known, starttls),
            None => rewrite_capa(&GMAIL_CAPA, starttls),
        };
        let mut text = String::from("+OK Capability list follows\r\n");
        for l in lines {
            text.push_str(&l);
            text.push_str("\r\n");
        }
        text.push_str(".\r\n");
        self.core.send(text);
    }

    /// The login failed: `-ERR` with the RFC 3206 response code for the failure's class, or
    /// upstream's own refusal.
    pub fn login_failed(&mut self, failure: &Failure, words: &Words) {
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
                return self.refused(bytes);
            }
        };
        let text: String = failure
            .describe(words)
            .chars()
            .filter(|c| !c.is_control())
            .take(480)
            .collect();
        self.refused(format!("{code} {text}\r\n").into_bytes());
    }

    fn refused(&mut self, reply: Vec<u8>) {
        self.core.send(reply);
        self.user = None;
        self.state = State::Command;
    }

    pub fn into_pending_input(self) -> Vec<u8> {
        self.core.input.into_inner()
    }

    pub fn tls_established(&mut self) {
        self.opts.starttls_offered = false;
        self.opts.login_allowed = true;
        self.user = None;
        self.core.input.clear();
        self.state = State::Command;
    }
}

impl SessionMachine for ClientSession {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn waiting(&self) -> bool {
        matches!(self.state, State::Authenticating | State::TlsPending)
    }

    fn step(&mut self) -> bool {
        let Some(line) = self.core.line(MAX_LINE, "-ERR Line too long") else {
            return false;
        };
        let text = trim_eol(&line);
        match std::mem::replace(&mut self.state, State::Command) {
            State::AuthPlain => {
                if text == b"*" {
                    self.core.send("-ERR Authentication cancelled\r\n");
                } else {
                    match sasl::decode_b64(text).and_then(|m| sasl::decode_plain(&m)) {
                        Ok(c) => self.login(c),
                        Err(e) => self.sasl_error(e),
                    }
                }
            }
            _ => self.command(text),
        }
        true
    }
}

impl ClientSession {
    fn command(&mut self, text: &[u8]) {
        // An owned copy either way, so that it is wiped: the line may carry a password.
        let text = Zeroizing::new(String::from_utf8_lossy(text).into_owned());
        let (verb, arg) = match text.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a),
            None => (text.to_ascii_uppercase(), ""),
        };
        match verb.as_str() {
            "CAPA" => self.capa(),
            "USER" => {
                let user = arg.trim();
                if user.is_empty() {
                    self.core.send("-ERR USER needs a name\r\n");
                } else if !self.login_allowed() {
                } else {
                    self.user = Some(user.to_string());
                    self.core.send("+OK send PASS\r\n");
                }
            }
            // RFC 1939: the rest of the line is the password, spaces included.
            "PASS" => match self.user.take() {
                None => self.core.send("-ERR Send USER first\r\n"),
                Some(_) if !self.login_allowed() => {}
                Some(_) if arg.is_empty() => self.sasl_error(SaslError::Empty),
                Some(username) => self.login(Credentials {
                    username,
                    password: Secret::new(arg.to_string()),
                }),
            },
            "AUTH" => self.auth(arg.trim()),
            "APOP" => self.core.send(
                "-ERR APOP is not supported by xoauth2-proxy; use USER/PASS or AUTH PLAIN\r\n",
            ),
            "STLS" => {
                if self.opts.starttls_offered {
                    self.core.send("+OK Begin TLS negotiation\r\n");
                    self.core.out.push_back(Action::StartTls);
                    self.core.input.clear();
                    self.state = State::TlsPending;
                } else {
                    self.core
                        .send("-ERR STLS is not available on this connection\r\n");
                }
            }
            "QUIT" => self.core.close_with("+OK xoauth2-proxy signing off"),
            _ => self
                .core
                .send("-ERR Log in first with USER/PASS or AUTH PLAIN\r\n"),
        }
    }

    fn login_allowed(&mut self) -> bool {
        if !self.opts.login_allowed {
            self.core.send("-ERR [AUTH] Use STLS before logging in; passwords are not accepted in clear from remote hosts\r\n");
        }
        self.opts.login_allowed
    }

    fn auth(&mut self, arg: &str) {
        if arg.is_empty() {
            // Pre-RFC 5034 clients list mechanisms this way.
            return self.core.send("+OK\r\nPLAIN\r\n.\r\n");
        }
        if !self.login_allowed() {
            return;
        }
        let (mech, initial) = match arg.split_once(' ') {
            Some((m, ir)) => (m.to_ascii_uppercase(), Some(ir.trim())),
            None => (arg.to_ascii_uppercase(), None),
        };
        match (mech.as_str(), initial) {
            ("PLAIN", None) => {
                self.core.send("+ \r\n");
                self.state = State::AuthPlain;
            }
            ("PLAIN", Some(ir)) => {
                match sasl::decode_b64(ir.as_bytes()).and_then(|m| sasl::decode_plain(&m)) {
                    Ok(c) => self.login(c),
                    Err(e) => self.sasl_error(e),
                }
            }
            _ => self
                .core
                .send("-ERR Unsupported authentication mechanism; use PLAIN\r\n"),
        }
    }

    fn login(&mut self, credentials: Credentials) {
        self.core.out.push_back(Action::Login { credentials });
        self.state = State::Authenticating;
    }

    fn sasl_error(&mut self, e: SaslError) {
        let text = match e {
            SaslError::BadBase64 => "-ERR Cannot decode the SASL response (invalid base64)",
            SaslError::Empty => "-ERR [AUTH] Empty credentials",
            SaslError::Malformed => "-ERR [AUTH] Malformed PLAIN credentials",
            SaslError::AuthzidMismatch => "-ERR [AUTH] Logging in as another user is not supported",
        };
        self.core.send(format!("{text}\r\n"));
    }
}

/// The CAPA list for the client: upstream's capabilities with USER and `SASL PLAIN` as the
/// ways to log in, STLS only where the proxy offers it.
pub fn rewrite_capa<S: AsRef<str>>(upstream: &[S], starttls_offered: bool) -> Vec<String> {
    let mut out = vec!["USER".to_string()];
    let mut sasl_added = false;
    for cap in upstream.iter().map(AsRef::as_ref) {
        let keyword = cap.split(' ').next().unwrap_or("").to_ascii_uppercase();
        match keyword.as_str() {
            "USER" | "STLS" | "" => {}
            "SASL" => {
                if !sasl_added {
                    out.push("SASL PLAIN".into());
                    sasl_added = true;
                }
            }
            _ => out.push(cap.to_string()),
        }
    }
    if !sasl_added {
        out.push("SASL PLAIN".into());
    }
    if !out.iter().any(|c| c.eq_ignore_ascii_case("RESP-CODES")) {
        out.push("RESP-CODES".into());
    }
    if starttls_offered {
        out.push("STLS".into());
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    Capa,
    Auth,
}

#[derive(Debug)]
enum UpState {
    Greeting,
    Stls,
    TlsPending,
    CapaStatus,
    CapaLines,
    AuthPrompt,
    AuthResult,
    AfterChallenge(ErrorChallenge),
    Done,
}

/// Upstream POP3: greeting, optional STLS, then CAPA or `AUTH XOAUTH2`.
pub struct UpstreamPop {
    goal: Goal,
    xoauth2: Secret,
    starttls: bool,
    state: UpState,
    capa: Vec<String>,
    buf: Input,
    out: VecDeque<UpAction>,
}

impl std::fmt::Debug for UpstreamPop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPop")
            .field("goal", &self.goal)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

const UP_MAX_LINE: usize = 64 * 1024;
const MAX_CAPA_LINES: usize = 64;
const MAX_CAPA_LINE: usize = 256;

impl UpstreamPop {
    /// `fresh`: a new connection whose greeting is still to be read (and STLS done if
    /// `starttls`); otherwise the connection is ready for commands.
    pub fn new(goal: Goal, xoauth2: Secret, starttls: bool, fresh: bool) -> Self {
        let mut m = UpstreamPop {
            goal,
            xoauth2,
            starttls,
            state: UpState::Greeting,
            capa: Vec::new(),
            buf: Input::default(),
            out: VecDeque::new(),
        };
        if !fresh {
            m.begin();
        }
        m
    }

    fn begin(&mut self) {
        let (line, next): (&[u8], _) = match self.goal {
            Goal::Capa => (b"CAPA\r\n", UpState::CapaStatus),
            Goal::Auth => (b"AUTH XOAUTH2\r\n", UpState::AuthPrompt),
        };
        self.out
            .push_back(UpAction::Send(SensitiveBytes::new(line.to_vec())));
        self.state = next;
    }

    fn done(&mut self, outcome: UpOutcome) {
        self.out.push_back(UpAction::Done(outcome));
        self.state = UpState::Done;
    }

    /// The capability lines of a successful CAPA outcome's relay.
    pub fn lines(relay: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(relay)
            .split('\n')
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn on_line(&mut self, line: Vec<u8>) {
        let text = trim_eol(&line);
        let ok = text.starts_with(b"+OK");
        let shown = || super::imap::printable(text);
        match std::mem::replace(&mut self.state, UpState::Done) {
            UpState::Greeting if ok => {
                if self.starttls {
                    self.out
                        .push_back(UpAction::Send(SensitiveBytes::new(b"STLS\r\n".to_vec())));
                    self.state = UpState::Stls;
                } else {
                    self.begin();
                }
            }
            UpState::Stls if ok => {
                self.out.push_back(UpAction::StartTls);
                self.state = UpState::TlsPending;
            }
            UpState::CapaStatus if ok => self.state = UpState::CapaLines,
            UpState::CapaLines => {
                if text == b"." {
                    let relay = self.capa.join("\n").into_bytes();
                    let leftover = std::mem::take(&mut self.buf).into_inner();
                    self.done(UpOutcome::Success { relay, leftover });
                } else {
                    let t = text.strip_prefix(b".").unwrap_or(text);
                    // Real capability lines are short; keep a sane list whatever is sent.
                    if self.capa.len() < MAX_CAPA_LINES && t.len() <= MAX_CAPA_LINE {
                        self.capa.push(String::from_utf8_lossy(t).into_owned());
                    }
                    self.state = UpState::CapaLines;
                }
            }
            UpState::AuthPrompt if text.starts_with(b"+ ") || text == b"+" => {
                let l = format!("{}\r\n", self.xoauth2.expose());
                self.out
                    .push_back(UpAction::Send(SensitiveBytes::new(l.into_bytes())));
                self.state = UpState::AuthResult;
            }
            UpState::AuthResult if ok => {
                let leftover = std::mem::take(&mut self.buf).into_inner();
                self.done(UpOutcome::Success {
                    relay: line,
                    leftover,
                });
            }
            UpState::AuthResult if text.starts_with(b"+") => {
                let payload = text[1..].strip_prefix(b" ").unwrap_or(&text[1..]);
                let challenge = ErrorChallenge::parse(payload);
                self.out
                    .push_back(UpAction::Send(SensitiveBytes::new(b"\r\n".to_vec())));
                self.state = UpState::AfterChallenge(challenge);
            }
            UpState::AuthResult => self.done(UpOutcome::Rejected {
                challenge: None,
                line: String::from_utf8_lossy(&line).into_owned(),
                token_rejected: !is_not_a_token_problem(text),
            }),
            UpState::AfterChallenge(challenge) => self.done(UpOutcome::Rejected {
                challenge: Some(challenge),
                line: String::from_utf8_lossy(&line).into_owned(),
                token_rejected: true,
            }),
            UpState::AuthPrompt => self.done(UpOutcome::Rejected {
                challenge: None,
                line: String::from_utf8_lossy(&line).into_owned(),
                token_rejected: false,
            }),
            UpState::Greeting => self.done(UpOutcome::Failed(format!(
                "unexpected greeting: {}",
                shown()
            ))),
            UpState::Stls => self.done(UpOutcome::Failed(format!("STLS refused: {}", shown()))),
            UpState::CapaStatus => {
                self.done(UpOutcome::Failed(format!("CAPA refused: {}", shown())))
            }
            UpState::TlsPending | UpState::Done => {}
        }
    }
}

/// `-ERR [SYS/TEMP]`, `[IN-USE]`, `[LOGIN-DELAY]`: refusals that a new token will not fix.
fn is_not_a_token_problem(text: &[u8]) -> bool {
    let t = String::from_utf8_lossy(text).to_ascii_uppercase();
    ["[SYS/", "[IN-USE]", "[LOGIN-DELAY]"]
        .iter()
        .any(|c| t.contains(c))
}

impl UpstreamMachine for UpstreamPop {
    fn feed(&mut self, bytes: &[u8]) {
        self.buf.push(bytes);
    }

    fn next_action(&mut self) -> Option<UpAction> {
        loop {
            if let Some(a) = self.out.pop_front() {
                return Some(a);
            }
            if matches!(self.state, UpState::Done | UpState::TlsPending) {
                return None;
            }
            match self.buf.line(UP_MAX_LINE) {
                Ok(Some(line)) => self.on_line(line),
                Ok(None) => return None,
                Err(LineTooLong) => {
                    self.done(UpOutcome::Failed("server sent an over-long line".into()))
                }
            }
        }
    }

    fn tls_established(&mut self) {
        self.buf.clear();
        self.begin();
    }

    fn retry(&mut self, xoauth2: Secret) {
        self.xoauth2 = xoauth2;
        self.goal = Goal::Auth;
        self.begin();
    }
}

#[cfg(test)]
mod tests;

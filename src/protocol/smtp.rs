//! SMTP submission authentication phase, sans-I/O.
//!
//! [`ClientSession`] is the proxy as an SMTP server towards the client until `AUTH` gives it
//! credentials. EHLO is answered locally with the extensions upstream is known to offer
//! (rewritten so what the client is promised holds after authentication): a stranger's EHLO
//! reaches nothing upstream. [`UpstreamHello`] greets upstream once the password is checked
//! (banner, EHLO, STARTTLS, EHLO again) and [`UpstreamAuth`] runs the two-step `AUTH XOAUTH2`.

use std::collections::VecDeque;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::sasl::{self, ErrorChallenge, SaslError};
use super::{
    find_line_end, trim_eol, Core, Credentials, Failure, SessionMachine, UpAction, UpOutcome,
    UpstreamMachine, Words,
};
use crate::secret::{Secret, SensitiveBytes};

/// RFC 4954 §4 asks for room for long SASL lines; commands are 512 octets but be lenient.
pub const MAX_LINE: usize = 4096;

pub use super::ClientAction as Action;

/// Gmail's EHLO extensions once TLS is up (protocol-facts §1.3), promised until a login has
/// shown what the listener's upstream really offers.
pub const GMAIL_EXTENSIONS: [&str; 7] = [
    "SIZE 35882577",
    "8BITMIME",
    "AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH",
    "ENHANCEDSTATUSCODES",
    "PIPELINING",
    "CHUNKING",
    "SMTPUTF8",
];

/// The first line of the proxy's own EHLO answer (upstream's names the client's address as
/// upstream saw it, which is the proxy's).
const HELLO_LINE: &str = "localhost at your service";

/// RFC 5321 §4.5.3.1.2: the longest domain.
const MAX_DOMAIN: usize = 255;

#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    pub starttls_offered: bool,
    pub login_allowed: bool,
    /// Upstream's EHLO extensions (without its first line) as last seen; None: Gmail's.
    pub upstream_extensions: Option<Arc<[String]>>,
}

enum State {
    Command,
    AuthPlain,
    AuthLoginUser,
    AuthLoginPassword { username: String },
    Authenticating,
    TlsPending,
}

pub struct ClientSession {
    opts: SessionOptions,
    state: State,
    /// The client's validated EHLO/HELO argument, once it has greeted.
    domain: Option<String>,
    core: Core,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("state", &self.state)
            .field("buffered", &self.core.input.len())
            .finish()
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // AuthLoginPassword holds a username only, but keep Debug uniform and short.
        let name = match self {
            State::Command => "command",
            State::AuthPlain => "auth-plain",
            State::AuthLoginUser => "auth-login-user",
            State::AuthLoginPassword { .. } => "auth-login-password",
            State::Authenticating => "authenticating",
            State::TlsPending => "tls-pending",
        };
        f.write_str(name)
    }
}

super::impl_client_session!(ClientSession);

impl ClientSession {
    pub fn new(opts: SessionOptions) -> Self {
        ClientSession {
            opts,
            state: State::Command,
            domain: None,
            core: Core::default(),
        }
    }

    pub fn greeting(&self) -> Vec<u8> {
        b"220 localhost ESMTP xoauth2-proxy ready\r\n".to_vec()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.core.feed(bytes);
    }

    pub fn next_action(&mut self) -> Option<Action> {
        Core::next_action(self)
    }

    /// The client's EHLO/HELO argument, checked to be a domain or address literal: what to
    /// greet upstream with.
    pub fn hello_domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// The login failed: 535 when the client's credentials or token are at fault, 454 when
    /// trying again later may help, upstream's own reply when it refused.
    pub fn login_failed(&mut self, failure: &Failure, words: &Words) {
        let text = failure.describe(words);
        let reply = match failure {
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
        };
        self.core.send(reply);
        self.state = State::Command;
    }

    /// Held bytes the client sent after AUTH, to forward upstream after the 235.
    pub fn into_pending_input(self) -> Vec<u8> {
        self.core.input.into_inner()
    }

    pub fn tls_established(&mut self) {
        // RFC 3207 §4.2: back to the post-greeting state; the client must EHLO again.
        self.opts.starttls_offered = false;
        self.opts.login_allowed = true;
        self.domain = None;
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
        let Some(line) = self.core.line(MAX_LINE, "500 5.5.6 Line too long") else {
            return false;
        };
        let text = trim_eol(&line);
        match std::mem::replace(&mut self.state, State::Command) {
            State::AuthPlain => match sasl_line(text) {
                SaslLine::Cancel => self.core.send("501 5.7.0 Authentication cancelled\r\n"),
                SaslLine::Data(Err(e)) => self.sasl_error(e),
                SaslLine::Data(Ok(bytes)) => self.plain(&bytes),
            },
            State::AuthLoginUser => match sasl_line(text) {
                SaslLine::Cancel => self.core.send("501 5.7.0 Authentication cancelled\r\n"),
                SaslLine::Data(Err(e)) => self.sasl_error(e),
                SaslLine::Data(Ok(user)) => self.login_username(&user),
            },
            State::AuthLoginPassword { username } => match sasl_line(text) {
                SaslLine::Cancel => self.core.send("501 5.7.0 Authentication cancelled\r\n"),
                SaslLine::Data(Err(e)) => self.sasl_error(e),
                SaslLine::Data(Ok(pw)) if pw.is_empty() => self.sasl_error(SaslError::Empty),
                SaslLine::Data(Ok(pw)) => self.login(Credentials {
                    username,
                    password: Secret::new(String::from_utf8_lossy(&pw).into_owned()),
                }),
            },
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
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim()),
            None => (text.to_ascii_uppercase(), ""),
        };
        match verb.as_str() {
            "EHLO" | "HELO" => self.hello(&verb, arg),
            "STARTTLS" => {
                if !arg.is_empty() {
                    self.core.send("501 5.5.4 STARTTLS takes no parameters\r\n");
                } else if self.opts.starttls_offered {
                    self.core.send("220 2.0.0 Ready to start TLS\r\n");
                    self.core.out.push_back(Action::StartTls);
                    self.core.input.clear();
                    self.state = State::TlsPending;
                } else {
                    self.core
                        .send("502 5.5.1 STARTTLS is not available on this connection\r\n");
                }
            }
            "AUTH" => self.auth(arg),
            "NOOP" => self.core.send("250 2.0.0 OK\r\n"),
            "RSET" => self.core.send("250 2.0.0 OK\r\n"),
            "QUIT" => self.core.close_with("221 2.0.0 Bye"),
            "VRFY" => self
                .core
                .send("252 2.1.5 Cannot verify the user; try sending anyway\r\n"),
            "HELP" => self
                .core
                .send("214 2.0.0 xoauth2-proxy: EHLO, AUTH PLAIN or LOGIN, then send mail\r\n"),
            "MAIL" | "RCPT" | "DATA" | "BDAT" => self.core.send(
                "530 5.7.0 Authentication required: log in with AUTH PLAIN or AUTH LOGIN first\r\n",
            ),
            _ => self.core.send("502 5.5.1 Unrecognized command\r\n"),
        }
    }

    /// Answered here, not by upstream: nobody reaches upstream before a password check.
    fn hello(&mut self, verb: &str, arg: &str) {
        if arg.is_empty() {
            return self
                .core
                .send(format!("501 5.5.4 {verb} needs a domain or address\r\n"));
        }
        if !valid_hello_argument(arg) {
            return self.core.send(format!(
                "501 5.5.4 {verb} needs a domain name or an address literal such as [127.0.0.1]\r\n"
            ));
        }
        self.domain = Some(arg.to_string());
        let starttls = self.opts.starttls_offered;
        let reply = match (verb, &self.opts.upstream_extensions) {
            ("HELO", _) => format!("250 {HELLO_LINE}\r\n"),
            (_, Some(known)) => ehlo_reply(HELLO_LINE, known, starttls),
            (_, None) => ehlo_reply(HELLO_LINE, &GMAIL_EXTENSIONS, starttls),
        };
        self.core.send(reply);
    }

    fn auth(&mut self, arg: &str) {
        if self.domain.is_none() {
            return self.core.send("503 5.5.1 Send EHLO first\r\n");
        }
        if !self.opts.login_allowed {
            return self
                .core
                .send("530 5.7.0 Must issue a STARTTLS command first\r\n");
        }
        let (mech, initial) = match arg.split_once(' ') {
            Some((m, ir)) => (m.to_ascii_uppercase(), Some(ir.trim())),
            None => (arg.to_ascii_uppercase(), None),
        };
        match (mech.as_str(), initial) {
            ("PLAIN", None) => {
                self.core.send("334 \r\n");
                self.state = State::AuthPlain;
            }
            ("PLAIN", Some(ir)) => match sasl::decode_b64(ir.as_bytes()) {
                Ok(bytes) => self.plain(&bytes),
                Err(e) => self.sasl_error(e),
            },
            ("LOGIN", None) => {
                self.core.send("334 VXNlcm5hbWU6\r\n");
                self.state = State::AuthLoginUser;
            }
            ("LOGIN", Some(ir)) => match sasl::decode_b64(ir.as_bytes()) {
                Ok(user) => self.login_username(&user),
                Err(e) => self.sasl_error(e),
            },
            ("", _) => self.core.send("501 5.5.4 AUTH needs a mechanism\r\n"),
            _ => self
                .core
                .send("504 5.5.4 Unrecognized authentication type; use PLAIN or LOGIN\r\n"),
        }
    }

    fn plain(&mut self, message: &[u8]) {
        match sasl::decode_plain(message) {
            Ok(c) => self.login(c),
            Err(e) => self.sasl_error(e),
        }
    }

    fn login_username(&mut self, user: &[u8]) {
        if user.is_empty() {
            return self.sasl_error(SaslError::Empty);
        }
        self.core.send("334 UGFzc3dvcmQ6\r\n");
        self.state = State::AuthLoginPassword {
            username: String::from_utf8_lossy(user).into_owned(),
        };
    }

    fn login(&mut self, credentials: Credentials) {
        self.core.out.push_back(Action::Login { credentials });
        self.state = State::Authenticating;
    }

    fn sasl_error(&mut self, e: SaslError) {
        let text = match e {
            SaslError::BadBase64 => "501 5.5.2 Cannot decode the SASL response (invalid base64)",
            SaslError::Empty | SaslError::Malformed => {
                "535 5.7.8 Authentication credentials invalid"
            }
            SaslError::AuthzidMismatch => "535 5.7.8 Sending as another user is not supported",
        };
        self.core.send(format!("{text}\r\n"));
    }
}

enum SaslLine {
    Cancel,
    Data(Result<Zeroizing<Vec<u8>>, SaslError>),
}

fn sasl_line(text: &[u8]) -> SaslLine {
    if text == b"*" {
        SaslLine::Cancel
    } else {
        SaslLine::Data(sasl::decode_b64(text))
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

/// RFC 5321 §4.1.1.1 `Domain / address-literal`, at most 255 octets. Underscores are tolerated
/// inside labels: Windows machine names carry them and mail clients send those as they are.
pub fn valid_hello_argument(arg: &str) -> bool {
    if arg.len() > MAX_DOMAIN {
        return false;
    }
    match arg.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        Some(literal) => valid_address_literal(literal),
        None => arg.split('.').all(|label| valid_label(label, b"-_")),
    }
}

/// `sub-domain` (and `Ldh-str` with `inner` = `-`): letters and digits at both ends.
fn valid_label(label: &str, inner: &[u8]) -> bool {
    let b = label.as_bytes();
    let let_dig = |c: &u8| c.is_ascii_alphanumeric();
    b.len() <= 63
        && b.first().is_some_and(let_dig)
        && b.last().is_some_and(let_dig)
        && b.iter().all(|c| let_dig(c) || inner.contains(c))
}

/// What goes between `[` and `]`: IPv4, `IPv6:` and an IPv6 address, or `tag:content`.
fn valid_address_literal(inner: &str) -> bool {
    let snum = |n: &str| (1..=3).contains(&n.len()) && n.parse::<u8>().is_ok();
    let v4: Vec<&str> = inner.split('.').collect();
    if v4.len() == 4 && v4.iter().all(|n| snum(n)) {
        return true;
    }
    let Some((tag, content)) = inner.split_once(':') else {
        return false;
    };
    if tag.eq_ignore_ascii_case("IPv6") {
        return content.parse::<std::net::Ipv6Addr>().is_ok();
    }
    // General-address-literal: dcontent is printable ASCII but `[`, `\` and `]`.
    valid_label(tag, b"-")
        && !content.is_empty()
        && content
            .bytes()
            .all(|c| (33..=90).contains(&c) || (94..=126).contains(&c))
}

/// The EHLO answer for the client: upstream's first line and extensions, with AUTH replaced
/// by what the proxy accepts and STARTTLS only where the proxy offers it.
pub fn rewrite_ehlo<S: AsRef<str>>(upstream: &[S], starttls_offered: bool) -> String {
    let first = upstream.first().map_or("localhost", AsRef::as_ref);
    ehlo_reply(first, upstream.get(1..).unwrap_or(&[]), starttls_offered)
}

fn ehlo_reply<S: AsRef<str>>(first: &str, extensions: &[S], starttls_offered: bool) -> String {
    let mut lines: Vec<&str> = vec![first];
    let mut auth_added = false;
    for ext in extensions.iter().map(AsRef::as_ref) {
        let keyword = ext
            .split([' ', '='])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match keyword.as_str() {
            "STARTTLS" => {}
            "AUTH" => {
                if !auth_added {
                    lines.push("AUTH PLAIN LOGIN");
                    auth_added = true;
                }
            }
            _ => lines.push(ext),
        }
    }
    if !auth_added {
        lines.push("AUTH PLAIN LOGIN");
    }
    if starttls_offered {
        lines.push("STARTTLS");
    }
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}\r\n", if i == last { ' ' } else { '-' }))
        .collect()
}

/// One complete SMTP reply: its code and the text of each line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
    pub raw: Vec<u8>,
}

impl Reply {
    /// The last line as `code text`, for messages.
    pub fn summary(&self) -> String {
        format!(
            "{} {}",
            self.code,
            self.lines.last().map(String::as_str).unwrap_or("")
        )
    }
}

const UP_MAX_REPLY: usize = 64 * 1024;

/// Server bytes read as SMTP replies. Remembers how far a multi-line reply was parsed, so a
/// reply that trickles in is read once, not again from its start on every read.
#[derive(Default)]
pub struct ReplyReader {
    buf: Vec<u8>,
    /// End of the lines already parsed into `lines`.
    pos: usize,
    lines: Vec<String>,
}

impl ReplyReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Forget everything (after a STARTTLS, plaintext leftovers must not be used).
    pub fn clear(&mut self) {
        *self = ReplyReader::default();
    }

    /// What is left after the last complete reply.
    pub fn take_rest(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.pos);
        self.clear();
        rest
    }

    /// The next complete (possibly multi-line) reply. Err: garbage or too large.
    pub fn take(&mut self) -> Result<Option<Reply>, String> {
        loop {
            let Some(end) = find_line_end(&self.buf, self.pos).filter(|&end| end <= UP_MAX_REPLY)
            else {
                if self.buf.len() > UP_MAX_REPLY {
                    return Err("server sent an over-long reply".into());
                }
                return Ok(None);
            };
            let line = trim_eol(&self.buf[self.pos..end]);
            if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
                return Err(format!(
                    "unexpected reply: {}",
                    super::imap::printable(line)
                ));
            }
            let code: u16 = std::str::from_utf8(&line[..3])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let more = line.get(3) == Some(&b'-');
            let text = line.get(4..).unwrap_or(b"");
            self.lines.push(String::from_utf8_lossy(text).into_owned());
            self.pos = end;
            if !more {
                let raw: Vec<u8> = self.buf.drain(..self.pos).collect();
                self.pos = 0;
                let lines = std::mem::take(&mut self.lines);
                return Ok(Some(Reply { code, lines, raw }));
            }
        }
    }
}

/// Take one complete reply from the start of `buf` (stateless form of [`ReplyReader::take`]).
pub fn take_reply(buf: &mut Vec<u8>) -> Result<Option<Reply>, String> {
    let mut reader = ReplyReader {
        buf: std::mem::take(buf),
        ..ReplyReader::default()
    };
    let result = reader.take();
    *buf = reader.buf;
    result
}

#[derive(Debug)]
enum HelloState {
    Banner,
    FirstEhlo,
    StartTls,
    TlsPending,
    Ehlo,
    Done,
}

/// Upstream greeting: banner (first time), EHLO, STARTTLS + EHLO again when configured.
/// Succeeds with the EHLO reply lines in `relay` (text lines joined by `\n`).
pub struct UpstreamHello {
    domain: String,
    starttls: bool,
    state: HelloState,
    buf: ReplyReader,
    out: VecDeque<UpAction>,
}

impl UpstreamHello {
    /// `connected_fresh`: the banner is still to be read.
    pub fn new(domain: &str, starttls: bool, connected_fresh: bool) -> Self {
        let mut h = UpstreamHello {
            domain: domain.to_string(),
            starttls,
            state: HelloState::Banner,
            buf: ReplyReader::default(),
            out: VecDeque::new(),
        };
        if !connected_fresh {
            h.ehlo(HelloState::Ehlo);
        }
        h
    }

    fn ehlo(&mut self, next: HelloState) {
        let line = format!("EHLO {}\r\n", self.domain);
        self.out
            .push_back(UpAction::Send(SensitiveBytes::new(line.into_bytes())));
        self.state = next;
    }

    fn fail(&mut self, why: String) {
        self.out.push_back(UpAction::Done(UpOutcome::Failed(why)));
        self.state = HelloState::Done;
    }

    /// The EHLO lines from a successful outcome's relay.
    pub fn lines(relay: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(relay)
            .split('\n')
            .map(str::to_string)
            .collect()
    }
}

impl UpstreamMachine for UpstreamHello {
    fn feed(&mut self, bytes: &[u8]) {
        self.buf.push(bytes);
    }

    fn next_action(&mut self) -> Option<UpAction> {
        loop {
            if let Some(a) = self.out.pop_front() {
                return Some(a);
            }
            if matches!(self.state, HelloState::Done | HelloState::TlsPending) {
                return None;
            }
            let reply = match self.buf.take() {
                Ok(Some(r)) => r,
                Ok(None) => return None,
                Err(e) => {
                    self.fail(e);
                    continue;
                }
            };
            match self.state {
                HelloState::Banner if reply.code == 220 => self.ehlo(HelloState::FirstEhlo),
                HelloState::FirstEhlo if reply.code == 250 && self.starttls => {
                    self.out.push_back(UpAction::Send(SensitiveBytes::new(
                        b"STARTTLS\r\n".to_vec(),
                    )));
                    self.state = HelloState::StartTls;
                }
                HelloState::StartTls if reply.code == 220 => {
                    self.out.push_back(UpAction::StartTls);
                    self.state = HelloState::TlsPending;
                }
                HelloState::FirstEhlo | HelloState::Ehlo if reply.code == 250 => {
                    self.out.push_back(UpAction::Done(UpOutcome::Success {
                        relay: reply.lines.join("\n").into_bytes(),
                        leftover: self.buf.take_rest(),
                    }));
                    self.state = HelloState::Done;
                }
                _ => {
                    let what = match self.state {
                        HelloState::Banner => "greeting",
                        HelloState::StartTls => "STARTTLS",
                        _ => "EHLO",
                    };
                    self.fail(format!(
                        "{what} refused: {}",
                        super::imap::printable(reply.summary().as_bytes())
                    ));
                }
            }
        }
    }

    fn tls_established(&mut self) {
        self.buf.clear();
        self.ehlo(HelloState::Ehlo);
    }

    fn retry(&mut self, _xoauth2: Secret) {}
}

#[derive(Debug)]
enum AuthState {
    Prompt,
    Result,
    AfterChallenge(ErrorChallenge),
    Done,
}

/// Upstream `AUTH XOAUTH2`, always two-step (inline responses over 512 octets are refused).
pub struct UpstreamAuth {
    xoauth2: Secret,
    state: AuthState,
    buf: ReplyReader,
    out: VecDeque<UpAction>,
}

impl std::fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamAuth")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl UpstreamAuth {
    pub fn new(xoauth2: Secret) -> Self {
        let mut a = UpstreamAuth {
            xoauth2,
            state: AuthState::Prompt,
            buf: ReplyReader::default(),
            out: VecDeque::new(),
        };
        a.start();
        a
    }

    fn start(&mut self) {
        self.out.push_back(UpAction::Send(SensitiveBytes::new(
            b"AUTH XOAUTH2\r\n".to_vec(),
        )));
        self.state = AuthState::Prompt;
    }

    fn done(&mut self, outcome: UpOutcome) {
        self.out.push_back(UpAction::Done(outcome));
        self.state = AuthState::Done;
    }
}

impl UpstreamMachine for UpstreamAuth {
    fn feed(&mut self, bytes: &[u8]) {
        self.buf.push(bytes);
    }

    fn next_action(&mut self) -> Option<UpAction> {
        loop {
            if let Some(a) = self.out.pop_front() {
                return Some(a);
            }
            if matches!(self.state, AuthState::Done) {
                return None;
            }
            let reply = match self.buf.take() {
                Ok(Some(r)) => r,
                Ok(None) => return None,
                Err(e) => {
                    self.done(UpOutcome::Failed(e));
                    continue;
                }
            };
            let rejected = |challenge, reply: &Reply| UpOutcome::Rejected {
                challenge,
                line: String::from_utf8_lossy(&reply.raw).into_owned(),
                token_rejected: reply.code == 535,
            };
            match std::mem::replace(&mut self.state, AuthState::Done) {
                AuthState::Prompt if reply.code == 334 => {
                    let line = format!("{}\r\n", self.xoauth2.expose());
                    self.out
                        .push_back(UpAction::Send(SensitiveBytes::new(line.into_bytes())));
                    self.state = AuthState::Result;
                }
                AuthState::Result if reply.code == 334 => {
                    let payload = reply.lines.first().map(String::as_str).unwrap_or("");
                    let challenge = ErrorChallenge::parse(payload.as_bytes());
                    self.out
                        .push_back(UpAction::Send(SensitiveBytes::new(b"\r\n".to_vec())));
                    self.state = AuthState::AfterChallenge(challenge);
                }
                AuthState::Result if reply.code == 235 => {
                    let leftover = self.buf.take_rest();
                    self.done(UpOutcome::Success {
                        relay: reply.raw,
                        leftover,
                    });
                }
                AuthState::AfterChallenge(challenge) => {
                    let mut outcome = rejected(Some(challenge), &reply);
                    if let UpOutcome::Rejected { token_rejected, .. } = &mut outcome {
                        // After an error challenge the refusal is about the token whatever the code.
                        *token_rejected = reply.code >= 500;
                    }
                    self.done(outcome);
                }
                _ => {
                    let outcome = rejected(None, &reply);
                    self.done(outcome);
                }
            }
        }
    }

    fn tls_established(&mut self) {}

    fn retry(&mut self, xoauth2: Secret) {
        self.xoauth2 = xoauth2;
        self.start();
    }
}

#[cfg(test)]
mod tests;

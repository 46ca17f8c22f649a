//! IMAP authentication phase, sans-I/O.
//!
//! [`ClientSession`] is the proxy acting as an IMAP server towards a legacy client until it has
//! credentials; [`UpstreamLogin`] is the proxy acting as an IMAP client towards Gmail until
//! `AUTHENTICATE XOAUTH2` has an answer. Neither does I/O: feed bytes in, take actions out.
//! After a successful login nothing here runs: the driver splices the two connections.

use std::collections::VecDeque;

use nom::branch::alt;
use nom::bytes::complete::{tag, take, take_while1};
use nom::character::complete::digit1;
use nom::combinator::{all_consuming, map, map_res, opt};
use nom::sequence::{delimited, preceded, terminated};
use nom::{IResult, Parser};
use zeroize::Zeroizing;

use super::sasl::{self, ErrorChallenge, SaslError};
use super::{
    extend_wiping, trim_eol, Core, Credentials, Failure, Input, LineTooLong, SessionMachine,
    UpAction, UpOutcome, Words,
};
use crate::secret::{Secret, SensitiveBytes};

pub use super::ClientAction as Action;

/// Bounds on what a client may send before it has logged in.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest line (also a SASL response line).
    pub max_line: usize,
    /// Largest literal announced with `{n}` / `{n+}`.
    pub max_literal: usize,
    /// Largest command including its literals.
    pub max_command: usize,
    /// Longest line, and largest command, for an `ID` only: RFC 2971 allows 30 pairs of
    /// 30-octet names and 1024-octet values, about 31 KiB quoted and up to twice that with
    /// every octet escaped.
    pub max_id_command: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: 8 * 1024,
            max_literal: 8 * 1024,
            max_command: 16 * 1024,
            max_id_command: 64 * 1024,
        }
    }
}

/// How far into a command to look for `tag ID (`: longer tags get no larger bound.
const ID_PREFIX_SCAN: usize = 100;

#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    /// Local STARTTLS is configured and TLS is not active yet.
    pub starttls_offered: bool,
    /// Whether LOGIN/AUTHENTICATE are accepted now (false: plaintext to a non-loopback peer
    /// on a STARTTLS listener, until STARTTLS).
    pub login_allowed: bool,
    pub limits: Limits,
}

#[derive(Debug)]
enum State {
    Command,
    SaslPlain {
        tag: String,
    },
    SaslLoginUser {
        tag: String,
    },
    SaslLoginPassword {
        tag: String,
        username: String,
    },
    /// The driver is logging in for the command tagged `tag`.
    Authenticating {
        tag: String,
    },
    TlsPending,
}

pub struct ClientSession {
    opts: SessionOptions,
    state: State,
    core: Core,
    /// The command assembled so far (lines and literals); may hold a password.
    command: Zeroizing<Vec<u8>>,
    literal_left: Option<usize>,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Buffers may hold passwords: show only the state and sizes.
        f.debug_struct("ClientSession")
            .field("state", &self.state_name())
            .field("buffered", &self.core.input.len())
            .finish()
    }
}

const PROXY_NAME: &str = "xoauth2-proxy";

super::impl_client_session!(ClientSession);

impl ClientSession {
    pub fn new(opts: SessionOptions) -> Self {
        ClientSession {
            opts,
            state: State::Command,
            core: Core::default(),
            command: Zeroizing::new(Vec::new()),
            literal_left: None,
        }
    }

    fn state_name(&self) -> &'static str {
        if self.core.closed {
            return "closed";
        }
        match self.state {
            State::Command => "command",
            State::SaslPlain { .. } => "sasl-plain",
            State::SaslLoginUser { .. } => "sasl-login-user",
            State::SaslLoginPassword { .. } => "sasl-login-password",
            State::Authenticating { .. } => "authenticating",
            State::TlsPending => "tls-pending",
        }
    }

    pub fn capabilities(&self) -> String {
        let mut caps = String::from("IMAP4rev1 SASL-IR ID AUTH=PLAIN AUTH=LOGIN");
        if self.opts.starttls_offered {
            caps.push_str(" STARTTLS");
        }
        caps
    }

    /// The untagged greeting to send first.
    pub fn greeting(&self) -> Vec<u8> {
        format!(
            "* OK [CAPABILITY {}] {PROXY_NAME} ready\r\n",
            self.capabilities()
        )
        .into_bytes()
    }

    /// Bytes received from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.core.feed(bytes);
    }

    /// The next thing to do, or None when more input (or a driver callback) is needed.
    pub fn next_action(&mut self) -> Option<Action> {
        Core::next_action(self)
    }

    /// The tag of the login command the driver is working on, which upstream reuses so its
    /// tagged answer can be relayed verbatim.
    pub fn login_tag(&self) -> Option<&str> {
        match &self.state {
            State::Authenticating { tag } => Some(tag),
            _ => None,
        }
    }

    /// The login failed: answer its command with the failure's response code and words.
    pub fn login_failed(&mut self, failure: &Failure, words: &Words) {
        let tag = self.login_tag().unwrap_or("*");
        let text = failure.describe(words);
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
        self.core.send(bytes);
        self.state = State::Command;
    }

    /// Upstream login succeeded: the session ends here. Returns what the client sent after its
    /// login command (pipelined commands), to forward upstream unchanged.
    pub fn into_pending_input(self) -> Vec<u8> {
        self.core.input.into_inner()
    }

    /// TLS is up on the client connection. Anything the client sent in plaintext after
    /// STARTTLS was already dropped (it could be an injection).
    pub fn tls_established(&mut self) {
        self.opts.starttls_offered = false;
        self.opts.login_allowed = true;
        self.core.input.clear();
        self.state = State::Command;
    }

    fn take_line(&mut self) -> Option<Zeroizing<Vec<u8>>> {
        let limit = self.line_limit();
        self.core.line(limit, "* BYE [TOOBIG] Line too long")
    }

    /// An `ID` command may be longer than any other; nothing else gets its bound, and it is
    /// looked for only when the usual bound would be exceeded.
    fn line_limit(&self) -> usize {
        let limits = self.opts.limits;
        let beyond = self.core.input.len() > limits.max_line;
        let head = if self.command.is_empty() {
            self.core.input.peek(ID_PREFIX_SCAN)
        } else {
            &self.command
        };
        if matches!(self.state, State::Command) && beyond && is_id_command(head) {
            limits.max_id_command
        } else {
            limits.max_line
        }
    }

    fn command_limit(&self) -> usize {
        if is_id_command(&self.command) {
            self.opts.limits.max_id_command
        } else {
            self.opts.limits.max_command
        }
    }
}

impl SessionMachine for ClientSession {
    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn waiting(&self) -> bool {
        matches!(self.state, State::Authenticating { .. } | State::TlsPending)
    }

    /// Advance by one unit of input. Returns false when nothing more can be done now.
    fn step(&mut self) -> bool {
        if matches!(self.state, State::Command) {
            return self.step_command();
        }
        // In a SASL exchange the next line is a response, not a command.
        let Some(line) = self.take_line() else {
            return false;
        };
        let response = sasl_response(&line);
        let tag = match &self.state {
            State::SaslPlain { tag }
            | State::SaslLoginUser { tag }
            | State::SaslLoginPassword { tag, .. } => tag.clone(),
            _ => return false,
        };
        let state = std::mem::replace(&mut self.state, State::Command);
        let bytes = match response {
            SaslLine::Cancel => {
                self.core
                    .send(format!("{tag} BAD AUTHENTICATE cancelled\r\n"));
                return true;
            }
            SaslLine::Data(Err(e)) => {
                self.sasl_error(&tag, e);
                return true;
            }
            SaslLine::Data(Ok(bytes)) => bytes,
        };
        match state {
            State::SaslPlain { .. } => self.plain(tag, &bytes),
            State::SaslLoginUser { .. } => self.login_username(tag, &bytes),
            State::SaslLoginPassword { username, .. } => {
                if bytes.is_empty() {
                    self.sasl_error(&tag, SaslError::Empty)
                } else {
                    let password = Secret::new(String::from_utf8_lossy(&bytes).into_owned());
                    self.login(tag, username, password)
                }
            }
            _ => {}
        }
        true
    }
}

impl ClientSession {
    fn step_command(&mut self) -> bool {
        if let Some(n) = self.literal_left {
            let Some(octets) = self.core.input.take(n).map(Zeroizing::new) else {
                return false;
            };
            extend_wiping(&mut self.command, &octets);
            self.literal_left = None;
            return true;
        }
        let Some(line) = self.take_line() else {
            return false;
        };
        extend_wiping(&mut self.command, &line);
        let max_command = self.command_limit();
        if self.command.len() > max_command {
            self.command.clear();
            self.core.close_with("* BYE [TOOBIG] Command too long");
            return false;
        }
        if let Some((n, sync)) = literal_announcement(trim_eol(&line)) {
            if n > self.opts.limits.max_literal as u64
                || self.command.len() as u64 + n > max_command as u64
            {
                let tag = command_tag(&self.command).unwrap_or("*").to_string();
                self.command.clear();
                if sync {
                    // The client waits for our continuation, so refusing keeps us in sync.
                    self.core
                        .send(format!("{tag} BAD [TOOBIG] Literal too large\r\n"));
                } else {
                    // The octets are already on their way; we cannot tell them from commands.
                    self.core.close_with("* BYE [TOOBIG] Literal too large");
                    return false;
                }
                return true;
            }
            self.literal_left = Some(n as usize);
            if sync {
                self.core.send("+ Ready for literal data\r\n");
            }
            return true;
        }
        let command = std::mem::take(&mut self.command);
        self.execute(&command);
        true
    }

    fn execute(&mut self, raw: &[u8]) {
        let (tag, cmd) = match parse_command(raw) {
            Ok(parsed) => parsed,
            Err(ParseError {
                tag: Some(tag),
                message,
            }) => {
                return self.core.send(format!("{tag} BAD {message}\r\n"));
            }
            Err(ParseError { tag: None, message }) => {
                return self.core.send(format!("* BAD {message}\r\n"));
            }
        };
        match cmd {
            Command::Capability => self.core.send(format!(
                "* CAPABILITY {}\r\n{tag} OK CAPABILITY completed\r\n",
                self.capabilities()
            )),
            Command::Noop => self.core.send(format!("{tag} OK NOOP completed\r\n")),
            Command::Logout => {
                self.core.send(format!("* BYE {PROXY_NAME} logging out\r\n{tag} OK LOGOUT completed\r\n"));
                self.core.out.push_back(Action::Close);
                self.core.closed = true;
                self.core.input.clear();
            }
            Command::Id => self.core.send(format!(
                "* ID (\"name\" \"{PROXY_NAME}\" \"version\" \"{}\")\r\n{tag} OK ID completed\r\n",
                env!("CARGO_PKG_VERSION")
            )),
            Command::StartTls => {
                if self.opts.starttls_offered {
                    self.core.send(format!("{tag} OK Begin TLS negotiation now\r\n"));
                    self.core.out.push_back(Action::StartTls);
                    self.core.input.clear();
                    self.state = State::TlsPending;
                } else {
                    self.core.send(format!("{tag} BAD STARTTLS is not available on this connection\r\n"));
                }
            }
            Command::Login { username, password } => {
                if !self.login_allowed(&tag) {
                    return;
                }
                if username.is_empty() || password.is_empty() {
                    return self.sasl_error(&tag, SaslError::Empty);
                }
                self.login(
                    tag,
                    String::from_utf8_lossy(&username).into_owned(),
                    Secret::new(String::from_utf8_lossy(&password).into_owned()),
                );
            }
            Command::Authenticate { mechanism, initial } => {
                if !self.login_allowed(&tag) {
                    return;
                }
                match (mechanism.as_str(), initial) {
                    ("PLAIN", None) => {
                        self.core.send("+ \r\n");
                        self.state = State::SaslPlain { tag };
                    }
                    ("PLAIN", Some(ir)) => match sasl::decode_b64(&ir) {
                        Ok(bytes) => self.plain(tag, &bytes),
                        Err(e) => self.sasl_error(&tag, e),
                    },
                    ("LOGIN", None) => {
                        self.core.send("+ VXNlcm5hbWU6\r\n");
                        self.state = State::SaslLoginUser { tag };
                    }
                    ("LOGIN", Some(ir)) => match sasl::decode_b64(&ir) {
                        Ok(user) => self.login_username(tag, &user),
                        Err(e) => self.sasl_error(&tag, e),
                    },
                    _ => self.core.send(format!(
                        "{tag} NO Unsupported authentication mechanism {mechanism}; use PLAIN or LOGIN\r\n"
                    )),
                }
            }
            Command::Other(name) => self.core.send(format!(
                "{tag} BAD {name} is not valid before login; log in with LOGIN or AUTHENTICATE PLAIN\r\n"
            )),
        }
    }

    fn login_allowed(&mut self, tag: &str) -> bool {
        if !self.opts.login_allowed {
            self.core.send(format!(
                "{tag} NO [PRIVACYREQUIRED] Use STARTTLS before logging in; passwords are not accepted in clear from remote hosts\r\n"
            ));
        }
        self.opts.login_allowed
    }

    fn plain(&mut self, tag: String, message: &[u8]) {
        match sasl::decode_plain(message) {
            Ok(c) => self.login(tag, c.username, c.password),
            Err(e) => self.sasl_error(&tag, e),
        }
    }

    fn login_username(&mut self, tag: String, user: &[u8]) {
        if user.is_empty() {
            return self.sasl_error(&tag, SaslError::Empty);
        }
        self.core.send("+ UGFzc3dvcmQ6\r\n");
        self.state = State::SaslLoginPassword {
            tag,
            username: String::from_utf8_lossy(user).into_owned(),
        };
    }

    fn login(&mut self, tag: String, username: String, password: Secret) {
        self.core.out.push_back(Action::Login {
            credentials: Credentials { username, password },
        });
        self.state = State::Authenticating { tag };
    }

    fn sasl_error(&mut self, tag: &str, e: SaslError) {
        let text = match e {
            SaslError::BadBase64 => "BAD Invalid base64 in SASL response",
            SaslError::Empty => "NO [AUTHENTICATIONFAILED] Empty credentials",
            SaslError::Malformed => "NO [AUTHENTICATIONFAILED] Malformed PLAIN credentials",
            SaslError::AuthzidMismatch => {
                "NO [AUTHORIZATIONFAILED] Logging in as another user is not supported"
            }
        };
        self.core.send(format!("{tag} {text}\r\n"));
    }
}

enum SaslLine {
    Cancel,
    Data(Result<Zeroizing<Vec<u8>>, SaslError>),
}

fn sasl_response(line: &[u8]) -> SaslLine {
    let line = trim_eol(line);
    if line == b"*" {
        SaslLine::Cancel
    } else {
        SaslLine::Data(sasl::decode_b64(line))
    }
}

/// `{n}` or `{n+}` at the end of a line: the size and whether it is synchronising.
fn literal_announcement(line: &[u8]) -> Option<(u64, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    // A literal is a whole argument (or the first of a list, as in `ID ({4}`): `pw{3}` is an
    // atom-ish word with braces, not a literal, and must not make us wait for (and swallow)
    // octets of the next command.
    if open == 0 || !matches!(inner[open - 1], b' ' | b'(') {
        return None;
    }
    let spec = &inner[open + 1..];
    let (digits, sync) = match spec.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (spec, true),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits)
        .ok()?
        .parse()
        .ok()
        .map(|n| (n, sync))
}

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Capability,
    Noop,
    Logout,
    Id,
    StartTls,
    Login {
        username: Vec<u8>,
        password: Zeroizing<Vec<u8>>,
    },
    Authenticate {
        mechanism: String,
        initial: Option<Vec<u8>>,
    },
    Other(String),
}

#[derive(Debug)]
struct ParseError {
    tag: Option<String>,
    message: &'static str,
}

fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !b"(){%*\"\\]".contains(&b)
}

fn is_astring_char(b: u8) -> bool {
    is_atom_char(b) || b == b']'
}

fn is_tag_char(b: u8) -> bool {
    is_astring_char(b) && b != b'+'
}

/// `tag SP "ID" SP "("`: the start of an ID command with parameters.
fn is_id_command(raw: &[u8]) -> bool {
    let raw = &raw[..raw.len().min(ID_PREFIX_SCAN)];
    let tag_len = raw.iter().take_while(|&&b| is_tag_char(b)).count();
    let rest = &raw[tag_len..];
    tag_len > 0 && rest.len() >= 5 && rest[..5].eq_ignore_ascii_case(b" ID (")
}

fn command_tag(raw: &[u8]) -> Option<&str> {
    let end = raw
        .iter()
        .position(|&b| !is_tag_char(b))
        .unwrap_or(raw.len());
    if end == 0 {
        return None;
    }
    std::str::from_utf8(&raw[..end]).ok()
}

fn crlf(i: &[u8]) -> IResult<&[u8], ()> {
    map((opt(tag(&b"\r"[..])), tag(&b"\n"[..])), |_| ()).parse(i)
}

fn sp(i: &[u8]) -> IResult<&[u8], ()> {
    map(tag(&b" "[..]), |_| ()).parse(i)
}

/// `{n}` / `{n+}` CRLF followed by exactly n octets.
fn literal(i: &[u8]) -> IResult<&[u8], Vec<u8>> {
    let (i, n) = delimited(
        tag(&b"{"[..]),
        terminated(
            map_res(digit1, |d: &[u8]| {
                std::str::from_utf8(d)
                    .map_err(|_| ())
                    .and_then(|s| s.parse::<usize>().map_err(|_| ()))
            }),
            opt(tag(&b"+"[..])),
        ),
        tag(&b"}"[..]),
    )
    .parse(i)?;
    let (i, _) = crlf(i)?;
    map(take(n), |b: &[u8]| b.to_vec()).parse(i)
}

/// RFC 3501 quoted string with `\"` and `\\` escapes; raw 8-bit octets are tolerated (clients
/// send UTF-8 passwords in quotes), CR and LF are not.
fn quoted(i: &[u8]) -> IResult<&[u8], Vec<u8>> {
    let (mut rest, _) = tag(&b"\""[..]).parse(i)?;
    // Sized once: growing would leave copies of a quoted password behind.
    let mut out = Vec::with_capacity(rest.len());
    loop {
        match rest.first() {
            Some(b'"') => return Ok((&rest[1..], out)),
            Some(b'\\') => match rest.get(1) {
                Some(&c @ (b'"' | b'\\')) => {
                    out.push(c);
                    rest = &rest[2..];
                }
                _ => {
                    return Err(nom::Err::Error(nom::error::Error::new(
                        rest,
                        nom::error::ErrorKind::Escaped,
                    )))
                }
            },
            Some(&c) if c != b'\r' && c != b'\n' && c != 0 => {
                out.push(c);
                rest = &rest[1..];
            }
            _ => {
                return Err(nom::Err::Error(nom::error::Error::new(
                    rest,
                    nom::error::ErrorKind::Char,
                )))
            }
        }
    }
}

fn astring(i: &[u8]) -> IResult<&[u8], Vec<u8>> {
    alt((
        literal,
        quoted,
        map(take_while1(is_astring_char), |b: &[u8]| b.to_vec()),
    ))
    .parse(i)
}

fn is_b64_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'='
}

fn login_args(i: &[u8]) -> IResult<&[u8], Command> {
    map(
        all_consuming(terminated(
            (preceded(sp, astring), preceded(sp, astring)),
            crlf,
        )),
        |(username, password)| Command::Login {
            username,
            password: Zeroizing::new(password),
        },
    )
    .parse(i)
}

fn authenticate_args(i: &[u8]) -> IResult<&[u8], Command> {
    map(
        all_consuming(terminated(
            (
                preceded(sp, take_while1(is_atom_char)),
                opt(preceded(sp, take_while1(is_b64_char))),
            ),
            crlf,
        )),
        |(mech, ir): (&[u8], Option<&[u8]>)| Command::Authenticate {
            mechanism: String::from_utf8_lossy(mech).to_ascii_uppercase(),
            initial: ir.map(<[u8]>::to_vec),
        },
    )
    .parse(i)
}

fn no_args(i: &[u8]) -> IResult<&[u8], ()> {
    all_consuming(crlf).parse(i)
}

/// Parse one complete command (with its literals inline) into its tag and meaning.
fn parse_command(raw: &[u8]) -> Result<(String, Command), ParseError> {
    let head: IResult<&[u8], (&[u8], &[u8])> = (
        terminated(take_while1(is_tag_char), sp),
        take_while1(is_atom_char),
    )
        .parse(raw);
    let Ok((rest, (tag_bytes, name))) = head else {
        let tag = command_tag(raw)
            .filter(|t| raw.get(t.len()) == Some(&b' '))
            .map(str::to_string);
        return Err(ParseError {
            tag,
            message: "Invalid command syntax",
        });
    };
    let tag = String::from_utf8_lossy(tag_bytes).into_owned();
    let name = String::from_utf8_lossy(name).to_ascii_uppercase();
    let bad = |message| ParseError {
        tag: Some(tag.clone()),
        message,
    };
    let simple = |c: Command| {
        no_args(rest)
            .map(|_| c)
            .map_err(|_| bad("Unexpected arguments"))
    };
    let cmd = match name.as_str() {
        "CAPABILITY" => simple(Command::Capability)?,
        "NOOP" => simple(Command::Noop)?,
        "LOGOUT" => simple(Command::Logout)?,
        "STARTTLS" => simple(Command::StartTls)?,
        // The client's ID parameters are informational (RFC 2971): answer locally whatever they are.
        "ID" => Command::Id,
        "LOGIN" => {
            login_args(rest)
                .map_err(|_| bad("Invalid LOGIN arguments: expected LOGIN user password"))?
                .1
        }
        "AUTHENTICATE" => {
            authenticate_args(rest)
                .map_err(|_| bad("Invalid AUTHENTICATE arguments: expected AUTHENTICATE mechanism [initial-response]"))?
                .1
        }
        _ => Command::Other(name.chars().take(32).collect()),
    };
    Ok((tag, cmd))
}

// ---------------------------------------------------------------------------------------------
// Upstream side

#[derive(Debug)]
enum UpState {
    Greeting,
    StartTlsReply,
    TlsPending,
    AuthReply {
        sent_ir: bool,
        token_sent: bool,
        challenge: Option<ErrorChallenge>,
    },
    Done,
}

/// Upstream: greeting, optional STARTTLS, `AUTHENTICATE XOAUTH2`, error challenge answered
/// with an empty line, then the tagged result.
pub struct UpstreamLogin {
    tag: String,
    xoauth2: Secret,
    starttls: bool,
    /// Stop where the login would begin (`check`): the outcome relays the greeting.
    probe: bool,
    greeting: Vec<u8>,
    sasl_ir: bool,
    state: UpState,
    buf: Input,
    untagged: Vec<u8>,
    out: VecDeque<UpAction>,
}

const UP_MAX_LINE: usize = 64 * 1024;
const UP_MAX_UNTAGGED: usize = 256 * 1024;

impl std::fmt::Debug for UpstreamLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamLogin")
            .field("tag", &self.tag)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl super::UpstreamMachine for UpstreamLogin {
    fn feed(&mut self, bytes: &[u8]) {
        UpstreamLogin::feed(self, bytes)
    }
    fn next_action(&mut self) -> Option<UpAction> {
        UpstreamLogin::next_action(self)
    }
    fn tls_established(&mut self) {
        UpstreamLogin::tls_established(self)
    }
    fn retry(&mut self, xoauth2: Secret) {
        UpstreamLogin::retry(self, xoauth2)
    }
}

impl UpstreamLogin {
    /// `tag` is the client's tag (so the server's tagged answer can be relayed verbatim);
    /// `xoauth2` the base64 initial response.
    pub fn new(tag: &str, xoauth2: Secret, starttls: bool) -> Self {
        UpstreamLogin {
            tag: tag.to_string(),
            xoauth2,
            starttls,
            probe: false,
            greeting: Vec::new(),
            sasl_ir: true,
            state: UpState::Greeting,
            buf: Input::default(),
            untagged: Vec::new(),
            out: VecDeque::new(),
        }
    }

    /// The same exchange up to the point where a login would start (greeting, STARTTLS):
    /// `check` reaches every upstream with the machine `serve` uses. Succeeds with the greeting.
    pub fn probe(starttls: bool) -> Self {
        UpstreamLogin {
            probe: true,
            ..UpstreamLogin::new("P1", Secret::new(String::new()), starttls)
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.push(bytes);
    }

    pub fn tls_established(&mut self) {
        self.buf.clear();
        self.authenticate();
    }

    /// After `Rejected`, try again on the same connection with a new token.
    pub fn retry(&mut self, xoauth2: Secret) {
        self.xoauth2 = xoauth2;
        self.untagged.clear();
        self.authenticate();
    }

    fn authenticate(&mut self) {
        if self.probe {
            let relay = std::mem::take(&mut self.greeting);
            return self.done(UpOutcome::Success {
                relay,
                leftover: Vec::new(),
            });
        }
        let line = if self.sasl_ir {
            format!(
                "{} AUTHENTICATE XOAUTH2 {}\r\n",
                self.tag,
                self.xoauth2.expose()
            )
        } else {
            format!("{} AUTHENTICATE XOAUTH2\r\n", self.tag)
        };
        self.out
            .push_back(UpAction::Send(SensitiveBytes::new(line.into_bytes())));
        self.state = UpState::AuthReply {
            sent_ir: self.sasl_ir,
            token_sent: self.sasl_ir,
            challenge: None,
        };
    }

    fn done(&mut self, outcome: UpOutcome) {
        self.out.push_back(UpAction::Done(outcome));
        self.state = UpState::Done;
    }

    pub fn next_action(&mut self) -> Option<UpAction> {
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

    fn on_line(&mut self, line: Vec<u8>) {
        let text = trim_eol(&line);
        match &mut self.state {
            UpState::Greeting => {
                if starts_with_ci(text, b"* OK") {
                    self.greeting = line.clone();
                    if let Some(caps) = bracket_capabilities(text) {
                        self.sasl_ir = caps.iter().any(|c| c.eq_ignore_ascii_case("SASL-IR"));
                    }
                    if self.starttls {
                        self.out.push_back(UpAction::Send(SensitiveBytes::new(
                            b"P0 STARTTLS\r\n".to_vec(),
                        )));
                        self.state = UpState::StartTlsReply;
                    } else {
                        self.authenticate();
                    }
                } else {
                    let shown = printable(text);
                    self.done(UpOutcome::Failed(format!("unexpected greeting: {shown}")));
                }
            }
            UpState::StartTlsReply => {
                if text.starts_with(b"* ") {
                    return;
                }
                if starts_with_ci(text, b"P0 OK") {
                    self.out.push_back(UpAction::StartTls);
                    self.state = UpState::TlsPending;
                } else {
                    let shown = printable(text);
                    self.done(UpOutcome::Failed(format!("STARTTLS refused: {shown}")));
                }
            }
            UpState::AuthReply {
                sent_ir,
                token_sent,
                challenge,
            } => {
                if text.starts_with(b"+") {
                    if !*token_sent && !*sent_ir {
                        // Server-first prompt for the no-IR form: now send the token.
                        *token_sent = true;
                        let l = format!("{}\r\n", self.xoauth2.expose());
                        self.out
                            .push_back(UpAction::Send(SensitiveBytes::new(l.into_bytes())));
                    } else {
                        // XOAUTH2 error challenge: an empty response is mandatory, then the
                        // server sends the tagged failure.
                        let payload = text[1..].strip_prefix(b" ").unwrap_or(&text[1..]);
                        *challenge = Some(ErrorChallenge::parse(payload));
                        self.out
                            .push_back(UpAction::Send(SensitiveBytes::new(b"\r\n".to_vec())));
                    }
                    return;
                }
                if text.starts_with(b"* ") {
                    if starts_with_ci(text, b"* BYE") {
                        let shown = printable(text);
                        self.done(UpOutcome::Failed(format!("server closed: {shown}")));
                        return;
                    }
                    if self.untagged.len() + line.len() > UP_MAX_UNTAGGED {
                        self.done(UpOutcome::Failed("server sent too much data".into()));
                        return;
                    }
                    self.untagged.extend_from_slice(&line);
                    return;
                }
                let tag = self.tag.as_bytes();
                if text.len() > tag.len() && text.starts_with(tag) && text[tag.len()] == b' ' {
                    let rest = &text[tag.len() + 1..];
                    if starts_with_ci(rest, b"OK") {
                        let mut relay = std::mem::take(&mut self.untagged);
                        relay.extend_from_slice(&line);
                        let leftover = std::mem::take(&mut self.buf).into_inner();
                        self.done(UpOutcome::Success { relay, leftover });
                    } else {
                        let challenge = challenge.take();
                        let line = String::from_utf8_lossy(rest).into_owned();
                        let code = response_code(&line);
                        let token_rejected = challenge.is_some()
                            || code.is_none()
                            || code.is_some_and(|c| c.eq_ignore_ascii_case("AUTHENTICATIONFAILED"));
                        self.done(UpOutcome::Rejected {
                            challenge,
                            line,
                            token_rejected,
                        });
                    }
                    return;
                }
                let shown = printable(text);
                self.done(UpOutcome::Failed(format!("unexpected response: {shown}")));
            }
            UpState::TlsPending | UpState::Done => {}
        }
    }
}

fn starts_with_ci(text: &[u8], prefix: &[u8]) -> bool {
    text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// The words of a `[CAPABILITY ...]` response code, if the line has one.
fn bracket_capabilities(line: &[u8]) -> Option<Vec<String>> {
    let text = String::from_utf8_lossy(line);
    let start = text.find("[CAPABILITY ")? + "[CAPABILITY ".len();
    let end = text[start..].find(']')? + start;
    Some(
        text[start..end]
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

/// A server line for a log or error message: printable ASCII only, bounded.
pub(crate) fn printable(text: &[u8]) -> String {
    text.iter()
        .take(200)
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

/// Response code of a tagged line's text (`NO [ALERT] ...` → `ALERT`).
pub fn response_code(line: &str) -> Option<&str> {
    let after = line.split_once(' ')?.1.trim_start();
    let inner = after.strip_prefix('[')?;
    let end = inner.find(']')?;
    inner[..end].split_whitespace().next()
}

#[cfg(test)]
mod tests;

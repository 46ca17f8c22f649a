//! Fake Gmail IMAP server (protocol-facts §1.2, §7.1).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::conn::{
    bind_loopback, lock, random_id, spawn_server, Conn, Line, ServerStats, ServerTask, Stream,
};
use super::google::{FakeGoogle, GoogleHandle};
use super::pki::TestPki;
use super::XOAUTH2_ERROR_CHALLENGE;

/// Longest accepted command line (an XOAUTH2 IR with a 2 KiB token is ~3.1 KiB).
pub const MAX_LINE: usize = 64 * 1024;
/// Longest accepted client literal inside a command.
pub const MAX_LITERAL: usize = 64 * 1024;

pub const PRE_AUTH_CAPABILITY: &str = "IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 XYZZY SASL-IR AUTH=XOAUTH2 AUTH=PLAIN AUTH=PLAIN-CLIENTTOKEN AUTH=OAUTHBEARER";
pub const PRE_TLS_CAPABILITY: &str = "IMAP4rev1 STARTTLS LOGINDISABLED";
pub const POST_AUTH_CAPABILITY: &str = "IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 UIDPLUS COMPRESS=DEFLATE ENABLE MOVE CONDSTORE ESEARCH UTF8=ACCEPT LIST-EXTENDED LIST-STATUS LITERAL- SPECIAL-USE APPENDLIMIT=35651584";
pub const APP_PASSWORD_ALERT: &str = "NO [ALERT] Application-specific password required: https://support.google.com/accounts/answer/185833 (Failure)";
const FLAGS_LINE: &str =
    "* FLAGS (\\Answered \\Flagged \\Draft \\Deleted \\Seen $NotPhishing $Phishing)";

/// How the fake expects TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    /// TLS from the first byte (like imap.gmail.com:993).
    Implicit,
    /// Plaintext greeting, `STARTTLS` required before authentication.
    StartTls,
}

struct Shared {
    stats: Arc<ServerStats>,
    google: GoogleHandle,
    acceptor: TlsAcceptor,
    tls: UpstreamTls,
    mailboxes: Mutex<HashMap<String, Vec<Arc<Vec<u8>>>>>,
    extra_untagged: AtomicBool,
    exchange: super::exchange::Exchange,
}

impl Shared {
    fn violation(&self, v: String) {
        lock(&self.stats.violations).push(format!("IMAP: {v}"));
    }
}

pub struct FakeImap {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _task: ServerTask,
}

impl FakeImap {
    pub async fn start(google: &FakeGoogle, pki: &TestPki, tls: UpstreamTls) -> FakeImap {
        let shared = Arc::new(Shared {
            stats: Arc::default(),
            google: google.shared(),
            acceptor: TlsAcceptor::from(pki.server_config()),
            tls,
            mailboxes: Mutex::new(HashMap::new()),
            extra_untagged: AtomicBool::new(false),
            exchange: Default::default(),
        });
        let (listener, addr) = bind_loopback().await;
        let s = shared.clone();
        let task = spawn_server(listener, move |tcp, peer| handle_conn(s.clone(), tcp, peer));
        FakeImap {
            addr,
            shared,
            _task: task,
        }
    }

    /// Appends a message (raw RFC 5322 bytes) to that user's INBOX. Sessions see messages
    /// added before their SELECT.
    pub fn add_message(&self, email: &str, raw: &[u8]) {
        lock(&self.shared.mailboxes)
            .entry(email.to_ascii_lowercase())
            .or_default()
            .push(Arc::new(raw.to_vec()));
    }

    pub fn message_count(&self, email: &str) -> usize {
        lock(&self.shared.mailboxes)
            .get(&email.to_ascii_lowercase())
            .map_or(0, Vec::len)
    }

    /// Exchange Online behaviour instead of Gmail's (off by default).
    pub fn exchange(&self) -> &super::exchange::Exchange {
        &self.shared.exchange
    }

    /// Gmail quirk: send `* OK Gimap ready for requests from 127.0.0.1 <id>` between
    /// `AUTHENTICATE XOAUTH2` (no IR) and `+ `.
    pub fn set_extra_untagged_before_continuation(&self, on: bool) {
        self.shared.extra_untagged.store(on, Ordering::SeqCst);
    }
}

async fn handle_conn(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _open = shared.stats.open();
    let conn = match shared.tls {
        UpstreamTls::Implicit => match Conn::accept_tls(tcp, &shared.acceptor).await {
            Ok(c) => c,
            Err(_) => return,
        },
        UpstreamTls::StartTls => Conn::new(Stream::Plain(tcp)),
    };
    let mut session = Session {
        shared,
        conn: Some(conn),
        id: random_id(12),
        peer_ip: peer.ip().to_string(),
        user: None,
        selected: None,
    };
    let _ = session.run().await;
    if let Some(conn) = session.conn.as_mut() {
        conn.shutdown().await;
    }
}

struct Selected {
    messages: Vec<Arc<Vec<u8>>>,
    read_only: bool,
    seen: HashSet<usize>,
}

struct Session {
    shared: Arc<Shared>,
    conn: Option<Conn>,
    id: String,
    peer_ip: String,
    user: Option<String>,
    selected: Option<Selected>,
}

/// What the command loop does next.
enum Flow {
    Continue,
    Close,
}

type Io<T> = std::io::Result<T>;

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed")
}

impl Session {
    fn conn(&mut self) -> Io<&mut Conn> {
        self.conn.as_mut().ok_or_else(closed)
    }

    async fn send(&mut self, text: &str) -> Io<()> {
        self.conn()?.send(text.as_bytes()).await
    }

    fn tls_active(&self) -> bool {
        self.conn.as_ref().is_some_and(Conn::is_tls)
    }

    async fn run(&mut self) -> Io<()> {
        let greeting = if self.shared.exchange.is_on() {
            format!(
                "* OK The Microsoft Exchange IMAP4 service is ready. [{}]\r\n",
                self.id
            )
        } else {
            format!(
                "* OK Gimap ready for requests from {} {}\r\n",
                self.peer_ip, self.id
            )
        };
        self.send(&greeting).await?;
        loop {
            let line = match self.read_command().await? {
                Ok(l) => l,
                Err(msg) => {
                    self.send(&format!("* BAD [CLIENTBUG] {msg}\r\n")).await?;
                    return Ok(());
                }
            };
            match self.dispatch(&line).await? {
                Flow::Continue => {}
                Flow::Close => return Ok(()),
            }
        }
    }

    /// Reads a command line, resolving literals (`{n}` with a `+ go ahead` continuation,
    /// `{n+}` without) into quoted strings so the rest of the parser sees one line.
    async fn read_command(&mut self) -> Io<Result<Vec<u8>, &'static str>> {
        let mut logical = Vec::new();
        loop {
            let line = match self.conn()?.read_line(MAX_LINE).await {
                Line::Text(l) => l,
                Line::Eof => return Err(closed()),
                Line::TooLong => return Ok(Err("Line too long")),
            };
            match trailing_literal(&line) {
                Some((prefix_len, n, sync)) => {
                    if n > MAX_LITERAL || logical.len() + line.len() + n > MAX_LINE * 2 {
                        return Ok(Err("Literal too long"));
                    }
                    logical.extend_from_slice(&line[..prefix_len]);
                    if sync {
                        self.send("+ go ahead\r\n").await?;
                    }
                    let bytes = self.conn()?.read_exact_bytes(n).await.ok_or_else(closed)?;
                    logical.push(b'"');
                    for b in bytes {
                        if b == b'"' || b == b'\\' {
                            logical.push(b'\\');
                        }
                        logical.push(b);
                    }
                    logical.push(b'"');
                }
                None => {
                    logical.extend_from_slice(&line);
                    return Ok(Ok(logical));
                }
            }
        }
    }

    async fn dispatch(&mut self, line: &[u8]) -> Io<Flow> {
        if line.is_empty() {
            self.shared
                .violation("empty line received in command state".to_string());
            self.send("* BAD [CLIENTBUG] Invalid tag\r\n").await?;
            return Ok(Flow::Continue);
        }
        let text = String::from_utf8_lossy(line).into_owned();
        let (tag, rest) = match text.split_once(' ') {
            Some((t, r)) => (t.to_string(), r.to_string()),
            None => (text.clone(), String::new()),
        };
        if tag.is_empty()
            || tag == "*"
            || tag == "+"
            || tag
                .bytes()
                .any(|b| b <= b' ' || b >= 0x7f || b"(){%\"\\".contains(&b))
        {
            self.send("* BAD [CLIENTBUG] Invalid tag\r\n").await?;
            return Ok(Flow::Continue);
        }
        let (command, args) = match rest.split_once(' ') {
            Some((c, a)) => (c.to_ascii_uppercase(), a.to_string()),
            None => (rest.to_ascii_uppercase(), String::new()),
        };
        if command.is_empty() {
            self.send(&format!("{tag} BAD Missing command\r\n")).await?;
            return Ok(Flow::Continue);
        }
        let pre_tls = self.shared.tls == UpstreamTls::StartTls && !self.tls_active();

        match command.as_str() {
            "LOGOUT" => {
                self.send(&format!(
                    "* BYE LOGOUT Requested\r\n{tag} OK 73 good day (Success)\r\n"
                ))
                .await?;
                return Ok(Flow::Close);
            }
            "NOOP" => {
                self.send(&format!("{tag} OK Success\r\n")).await?;
                return Ok(Flow::Continue);
            }
            "ID" => {
                let resp = format!(
                    "* ID (\"name\" \"GImap\" \"vendor\" \"Google, Inc.\" \"support-url\" \"http://support.google.com/mail\" \"remote-host\" \"{}\")\r\n{tag} OK Success\r\n",
                    self.peer_ip
                );
                self.send(&resp).await?;
                return Ok(Flow::Continue);
            }
            "CAPABILITY" => {
                let caps = if self.user.is_some() {
                    POST_AUTH_CAPABILITY
                } else if pre_tls {
                    PRE_TLS_CAPABILITY
                } else {
                    PRE_AUTH_CAPABILITY
                };
                let tail = if self.user.is_some() {
                    "Success".to_string()
                } else {
                    format!("Thats all she wrote! {}", self.id)
                };
                self.send(&format!("* CAPABILITY {caps}\r\n{tag} OK {tail}\r\n"))
                    .await?;
                return Ok(Flow::Continue);
            }
            "STARTTLS" if pre_tls => {
                return self.starttls(&tag).await;
            }
            _ => {}
        }

        if self.user.is_none() {
            return match command.as_str() {
                "AUTHENTICATE" => {
                    if pre_tls {
                        self.shared
                            .violation("AUTHENTICATE before STARTTLS".to_string());
                        self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
                        self.send(&format!(
                            "{tag} NO [PRIVACYREQUIRED] Must issue a STARTTLS command first (Failure)\r\n"
                        ))
                        .await?;
                        return Ok(Flow::Continue);
                    }
                    self.authenticate(&tag, &args).await
                }
                "LOGIN" => {
                    self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
                    if pre_tls {
                        self.shared.violation("LOGIN before STARTTLS".to_string());
                        self.send(&format!(
                            "{tag} NO [PRIVACYREQUIRED] LOGIN disabled, issue STARTTLS first (Failure)\r\n"
                        ))
                        .await?;
                    } else {
                        self.send(&format!("{tag} {APP_PASSWORD_ALERT}\r\n"))
                            .await?;
                    }
                    Ok(Flow::Continue)
                }
                _ => {
                    self.send(&format!("{tag} BAD Unknown command\r\n")).await?;
                    Ok(Flow::Continue)
                }
            };
        }
        self.authenticated_command(&tag, &command, &args).await
    }

    async fn starttls(&mut self, tag: &str) -> Io<Flow> {
        let pending = self.conn()?.buffered().len();
        if pending > 0 {
            self.shared.violation(format!(
                "{pending} bytes sent after STARTTLS before the TLS handshake"
            ));
        }
        self.send(&format!("{tag} OK Begin TLS negotiation now\r\n"))
            .await?;
        let conn = self.conn.take().ok_or_else(closed)?;
        match conn.start_tls(&self.shared.acceptor).await {
            Ok(c) => {
                self.conn = Some(c);
                Ok(Flow::Continue)
            }
            Err(_) => Ok(Flow::Close),
        }
    }

    /// Records lines the peer sent ahead of the AUTHENTICATE result (after an optional
    /// delay that lets them arrive).
    async fn note_pipelined(&mut self) -> Io<()> {
        let stats = self.shared.stats.clone();
        stats.note_pipelined(self.conn()?).await;
        Ok(())
    }

    /// Exchange's answers (§4.6, §4.7): one line either way, no error challenge.
    async fn exchange_authenticate(&mut self, tag: &str, response: &str) -> Io<Flow> {
        let exchange = &self.shared.exchange;
        exchange.note_login();
        if let Some(ms) = exchange.take_throttle() {
            self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
            let line = format!(
                "{tag} NO Request is throttled. Suggested Backoff Time: {ms} milliseconds\r\n"
            );
            return self.send(&line).await.map(|_| Flow::Continue);
        }
        let credentials = parse_xoauth2(response);
        let user = credentials
            .as_ref()
            .filter(|(user, token)| exchange.may_open(&self.shared.google, user, token));
        self.note_pipelined().await?;
        let Some((user, _)) = user else {
            self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
            return self
                .send(&format!("{tag} NO AUTHENTICATE failed.\r\n"))
                .await
                .map(|_| Flow::Continue);
        };
        self.shared.stats.successful.fetch_add(1, Ordering::SeqCst);
        self.user = Some(user.clone());
        self.send(&format!("{tag} OK AUTHENTICATE completed.\r\n"))
            .await
            .map(|_| Flow::Continue)
    }

    async fn authenticate(&mut self, tag: &str, args: &str) -> Io<Flow> {
        let parts: Vec<&str> = args.split(' ').filter(|s| !s.is_empty()).collect();
        let Some(mechanism) = parts.first() else {
            self.send(&format!("{tag} BAD Missing mechanism\r\n"))
                .await?;
            return Ok(Flow::Continue);
        };
        if parts.len() > 2 {
            self.send(&format!("{tag} BAD Could not parse command\r\n"))
                .await?;
            return Ok(Flow::Continue);
        }
        if !mechanism.eq_ignore_ascii_case("XOAUTH2") {
            self.shared.violation(format!(
                "unexpected SASL mechanism {}",
                mechanism.to_ascii_uppercase()
            ));
            self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
            self.send(&format!(
                "{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n"
            ))
            .await?;
            return Ok(Flow::Continue);
        }
        let response: String = match parts.get(1) {
            Some(ir) => ir.to_string(),
            None => {
                if self.shared.extra_untagged.load(Ordering::SeqCst) {
                    let extra = format!(
                        "* OK Gimap ready for requests from {} {}\r\n",
                        self.peer_ip, self.id
                    );
                    self.send(&extra).await?;
                }
                self.send("+ \r\n").await?;
                match self.conn()?.read_line(MAX_LINE).await {
                    Line::Text(l) => String::from_utf8_lossy(&l).into_owned(),
                    Line::Eof => return Ok(Flow::Close),
                    Line::TooLong => {
                        self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
                        self.send(&format!("{tag} BAD Line too long\r\n")).await?;
                        return Ok(Flow::Continue);
                    }
                }
            }
        };
        if response == "*" {
            self.note_pipelined().await?;
            self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
            self.send(&format!("{tag} BAD AUTHENTICATE cancelled\r\n"))
                .await?;
            return Ok(Flow::Continue);
        }
        if self.shared.exchange.is_on() {
            return self.exchange_authenticate(tag, &response).await;
        }
        let credentials = parse_xoauth2(&response);
        if credentials.is_none() {
            self.shared
                .violation("malformed XOAUTH2 initial response".to_string());
        }
        let valid = credentials
            .as_ref()
            .is_some_and(|(email, token)| self.shared.google.check_access_token(token, email));
        if let (true, Some((email, _))) = (valid, credentials) {
            self.note_pipelined().await?;
            self.shared.stats.successful.fetch_add(1, Ordering::SeqCst);
            let resp = format!(
                "* CAPABILITY {POST_AUTH_CAPABILITY}\r\n{tag} OK {email} authenticated (Success)\r\n"
            );
            self.user = Some(email);
            self.send(&resp).await?;
            return Ok(Flow::Continue);
        }
        // Gmail's error path: a challenge the client must answer with an empty line.
        self.send(&format!("+ {XOAUTH2_ERROR_CHALLENGE}\r\n"))
            .await?;
        let answer = match self.conn()?.read_line(MAX_LINE).await {
            Line::Text(l) => l,
            Line::Eof => return Ok(Flow::Close),
            Line::TooLong => b"<too long>".to_vec(),
        };
        self.note_pipelined().await?;
        self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
        if answer.is_empty() {
            self.send(&format!(
                "{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n"
            ))
            .await?;
        } else if answer == b"*" {
            self.send(&format!("{tag} BAD AUTHENTICATE cancelled\r\n"))
                .await?;
        } else {
            let shown = redact(&String::from_utf8_lossy(&answer));
            self.shared.violation(format!(
                "non-empty line ({} bytes) received where the empty SASL response to the error challenge was required",
                answer.len()
            ));
            lock(&self.shared.stats.before_auth).push(shown);
            self.send(&format!("{tag} BAD Invalid SASL response\r\n"))
                .await?;
        }
        Ok(Flow::Continue)
    }

    async fn authenticated_command(&mut self, tag: &str, command: &str, args: &str) -> Io<Flow> {
        let ok = format!("{tag} OK Success\r\n");
        match command {
            "AUTHENTICATE" | "LOGIN" => {
                self.send(&format!("{tag} BAD Already authenticated\r\n"))
                    .await?;
            }
            "SELECT" | "EXAMINE" => {
                let mailbox = parse_astrings(args.as_bytes())
                    .and_then(|a| a.into_iter().next())
                    .map(|m| String::from_utf8_lossy(&m).into_owned());
                let Some(mailbox) = mailbox else {
                    self.send(&format!("{tag} BAD Could not parse command\r\n"))
                        .await?;
                    return Ok(Flow::Continue);
                };
                if !mailbox.eq_ignore_ascii_case("INBOX") {
                    self.selected = None;
                    self.send(&format!(
                        "{tag} NO [NONEXISTENT] Unknown Mailbox: {mailbox} (Failure)\r\n"
                    ))
                    .await?;
                    return Ok(Flow::Continue);
                }
                let user = self.user.clone().unwrap_or_default().to_ascii_lowercase();
                let messages = lock(&self.shared.mailboxes)
                    .get(&user)
                    .cloned()
                    .unwrap_or_default();
                let read_only = command == "EXAMINE";
                let n = messages.len();
                let resp = format!(
                    "{FLAGS_LINE}\r\n\
                     * OK [PERMANENTFLAGS (\\Answered \\Flagged \\Draft \\Deleted \\Seen $NotPhishing $Phishing \\*)] Flags permitted.\r\n\
                     * OK [UIDVALIDITY 1] UIDs valid.\r\n\
                     * {n} EXISTS\r\n\
                     * 0 RECENT\r\n\
                     * OK [UIDNEXT {}] Predicted next UID.\r\n\
                     * OK [HIGHESTMODSEQ 1000]\r\n\
                     {tag} OK [{}] INBOX selected. (Success)\r\n",
                    n + 1,
                    if read_only { "READ-ONLY" } else { "READ-WRITE" }
                );
                self.selected = Some(Selected {
                    messages,
                    read_only,
                    seen: HashSet::new(),
                });
                self.send(&resp).await?;
            }
            "LIST" | "XLIST" | "LSUB" => {
                let args = parse_astrings(args.as_bytes()).unwrap_or_default();
                let pattern = args.get(1).cloned().unwrap_or_default();
                let resp = if pattern.is_empty() {
                    format!("* {command} (\\Noselect) \"/\" \"\"\r\n{ok}")
                } else {
                    format!("* {command} (\\HasNoChildren) \"/\" \"INBOX\"\r\n{ok}")
                };
                self.send(&resp).await?;
            }
            "STATUS" => {
                let user = self.user.clone().unwrap_or_default().to_ascii_lowercase();
                let n = lock(&self.shared.mailboxes).get(&user).map_or(0, Vec::len);
                let parsed = parse_astrings(args.as_bytes()).unwrap_or_default();
                let is_inbox = parsed
                    .first()
                    .is_some_and(|m| m.eq_ignore_ascii_case(b"INBOX"));
                if !is_inbox {
                    self.send(&format!(
                        "{tag} NO [NONEXISTENT] Unknown Mailbox (Failure)\r\n"
                    ))
                    .await?;
                    return Ok(Flow::Continue);
                }
                let items = parsed
                    .get(1)
                    .map(|i| String::from_utf8_lossy(i).to_ascii_uppercase())
                    .unwrap_or_default();
                let mut out = Vec::new();
                for item in items
                    .trim_matches(|c| c == '(' || c == ')')
                    .split_whitespace()
                {
                    let value = match item {
                        "MESSAGES" => n,
                        "UIDNEXT" => n + 1,
                        "UIDVALIDITY" => 1,
                        "UNSEEN" | "RECENT" => 0,
                        _ => continue,
                    };
                    out.push(format!("{item} {value}"));
                }
                self.send(&format!("* STATUS \"INBOX\" ({})\r\n{ok}", out.join(" ")))
                    .await?;
            }
            "NAMESPACE" => {
                self.send(&format!("* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n{ok}"))
                    .await?;
            }
            "ENABLE" => {
                self.send(&format!("* ENABLED\r\n{ok}")).await?;
            }
            "IDLE" => {
                self.send("+ idling\r\n").await?;
                match self.conn()?.read_line(MAX_LINE).await {
                    Line::Text(l) if l.eq_ignore_ascii_case(b"DONE") => {
                        self.send(&format!("{tag} OK IDLE terminated (Success)\r\n"))
                            .await?;
                    }
                    Line::Text(_) | Line::TooLong => {
                        self.shared
                            .violation("IDLE ended by something other than DONE".to_string());
                        self.send(&format!("{tag} BAD Could not parse command\r\n"))
                            .await?;
                    }
                    Line::Eof => return Ok(Flow::Close),
                }
            }
            "CHECK" | "EXPUNGE" => {
                self.send(&ok).await?;
            }
            "CLOSE" | "UNSELECT" => {
                if self.selected.take().is_some() {
                    self.send(&format!(
                        "{tag} OK Returned to authenticated state. (Success)\r\n"
                    ))
                    .await?;
                } else {
                    self.send(&format!("{tag} BAD No mailbox selected\r\n"))
                        .await?;
                }
            }
            "FETCH" | "SEARCH" => {
                self.selected_command(tag, command, args, false).await?;
            }
            "UID" => {
                let (sub, rest) = match args.split_once(' ') {
                    Some((s, r)) => (s.to_ascii_uppercase(), r.to_string()),
                    None => (args.to_ascii_uppercase(), String::new()),
                };
                if sub == "FETCH" || sub == "SEARCH" {
                    self.selected_command(tag, &sub, &rest, true).await?;
                } else {
                    self.send(&format!("{tag} BAD Unknown command\r\n")).await?;
                }
            }
            _ => {
                self.send(&format!("{tag} BAD Unknown command\r\n")).await?;
            }
        }
        Ok(Flow::Continue)
    }

    async fn selected_command(
        &mut self,
        tag: &str,
        command: &str,
        args: &str,
        uid: bool,
    ) -> Io<()> {
        let result = match self.selected.as_mut() {
            None => Err("No mailbox selected"),
            Some(selected) if command == "SEARCH" => search_response(selected, args),
            Some(selected) => fetch_response(selected, args, uid),
        };
        match result {
            Ok(parts) => {
                let conn = self.conn()?;
                for part in parts {
                    conn.write(&part).await?;
                }
                conn.send(format!("{tag} OK Success\r\n").as_bytes()).await
            }
            Err(msg) => self.send(&format!("{tag} BAD {msg}\r\n")).await,
        }
    }
}

fn search_response(selected: &Selected, args: &str) -> Result<Vec<Vec<u8>>, &'static str> {
    if !args.trim().eq_ignore_ascii_case("ALL") {
        return Err("Could not parse command");
    }
    let mut line = String::from("* SEARCH");
    for i in 1..=selected.messages.len() {
        line.push_str(&format!(" {i}"));
    }
    line.push_str("\r\n");
    Ok(vec![line.into_bytes()])
}

/// Untagged FETCH responses, one buffer per message.
fn fetch_response(
    selected: &mut Selected,
    args: &str,
    uid: bool,
) -> Result<Vec<Vec<u8>>, &'static str> {
    const PARSE: &str = "Could not parse command";
    let (set, items) = args.split_once(' ').ok_or(PARSE)?;
    let numbers = parse_seqset(set, selected.messages.len(), uid).ok_or(PARSE)?;
    let mut items = parse_fetch_items(items).ok_or(PARSE)?;
    if uid && !items.contains(&FetchItem::Uid) {
        items.insert(0, FetchItem::Uid);
    }
    let mut out = Vec::with_capacity(numbers.len());
    for n in numbers {
        let index = n - 1;
        let Some(raw) = selected.messages.get(index).cloned() else {
            continue;
        };
        let mut parts: Vec<u8> = format!("* {n} FETCH (").into_bytes();
        let mut newly_seen = false;
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                parts.push(b' ');
            }
            match item {
                FetchItem::Uid => parts.extend_from_slice(format!("UID {n}").as_bytes()),
                FetchItem::Flags => {
                    let flags = if selected.seen.contains(&index) {
                        "(\\Seen)"
                    } else {
                        "()"
                    };
                    parts.extend_from_slice(format!("FLAGS {flags}").as_bytes());
                }
                FetchItem::Size => {
                    parts.extend_from_slice(format!("RFC822.SIZE {}", raw.len()).as_bytes())
                }
                FetchItem::InternalDate => {
                    parts.extend_from_slice(b"INTERNALDATE \"01-Jan-2024 00:00:00 +0000\"")
                }
                FetchItem::Body {
                    name,
                    section,
                    peek,
                    partial,
                } => {
                    let content = section.extract(&raw);
                    let (content, label) = match partial {
                        Some((start, len)) => {
                            let s = (*start).min(content.len());
                            let e = s.saturating_add(*len).min(content.len());
                            (&content[s..e], format!("{name}<{start}>"))
                        }
                        None => (content, name.clone()),
                    };
                    parts
                        .extend_from_slice(format!("{label} {{{}}}\r\n", content.len()).as_bytes());
                    parts.extend_from_slice(content);
                    if !peek && !selected.read_only && selected.seen.insert(index) {
                        newly_seen = true;
                    }
                }
            }
        }
        if newly_seen && !items.contains(&FetchItem::Flags) {
            parts.extend_from_slice(b" FLAGS (\\Seen)");
        }
        parts.extend_from_slice(b")\r\n");
        out.push(parts);
    }
    Ok(out)
}

/// `{n}` / `{n+}` at the end of a line: (length of the line before it, n, synchronising).
fn trailing_literal(line: &[u8]) -> Option<(usize, usize, bool)> {
    if line.last() != Some(&b'}') {
        return None;
    }
    let open = line.iter().rposition(|&b| b == b'{')?;
    let inner = &line[open + 1..line.len() - 1];
    let (digits, sync) = match inner.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (inner, true),
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((open, n, sync))
}

/// Splits IMAP arguments: atoms, quoted strings (with `\` escapes) and parenthesised
/// lists (kept raw, parentheses included).
fn parse_astrings(s: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b' ' => i += 1,
            b'"' => {
                let mut v = Vec::new();
                i += 1;
                loop {
                    match s.get(i)? {
                        b'\\' => {
                            v.push(*s.get(i + 1)?);
                            i += 2;
                        }
                        b'"' => {
                            i += 1;
                            break;
                        }
                        b => {
                            v.push(*b);
                            i += 1;
                        }
                    }
                }
                out.push(v);
            }
            b'(' => {
                let start = i;
                let mut depth = 0usize;
                loop {
                    match s.get(i)? {
                        b'(' => depth += 1,
                        b')' => {
                            depth -= 1;
                            if depth == 0 {
                                i += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
                out.push(s[start..i].to_vec());
            }
            _ => {
                let start = i;
                while i < s.len() && s[i] != b' ' {
                    i += 1;
                }
                out.push(s[start..i].to_vec());
            }
        }
    }
    Some(out)
}

/// Decodes an XOAUTH2 client response strictly: standard base64 with padding of
/// `user=EMAIL\x01auth=Bearer TOKEN\x01\x01`.
pub fn parse_xoauth2(b64: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let rest = text.strip_prefix("user=")?;
    let (user, rest) = rest.split_once('\x01')?;
    let rest = rest.strip_prefix("auth=Bearer ")?;
    let token = rest.strip_suffix("\x01\x01")?;
    if user.is_empty()
        || token.is_empty()
        || token.contains(['\x01', ' '])
        || user.contains(['\x01', ' '])
    {
        return None;
    }
    Some((user.to_string(), token.to_string()))
}

/// Replaces anything that looks like a credential in a recorded line.
pub fn redact(line: &str) -> String {
    use base64::Engine as _;
    line.split(' ')
        .map(|word| {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(word)
                .ok()
                .map(|d| String::from_utf8_lossy(&d).into_owned())
                .unwrap_or_default();
            if word.contains("ya29.") || decoded.contains("auth=Bearer") || decoded.contains('\0') {
                "<redacted>"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Message numbers (1-based, ascending, unique) selected by a sequence set. For sequence
/// numbers every number must exist; for UIDs (== sequence numbers here) missing ones are
/// ignored.
fn parse_seqset(set: &str, count: usize, uid: bool) -> Option<Vec<usize>> {
    let mut chosen = std::collections::BTreeSet::new();
    let num = |s: &str| -> Option<usize> {
        if s == "*" {
            if count == 0 && !uid {
                None
            } else {
                Some(count)
            }
        } else {
            let n: usize = s.parse().ok()?;
            if n == 0 {
                None
            } else {
                Some(n)
            }
        }
    };
    for part in set.split(',') {
        let (a, b) = match part.split_once(':') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(part)?;
                (n, n)
            }
        };
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        if !uid && hi > count {
            return None;
        }
        for n in lo.max(1)..=hi.min(count) {
            chosen.insert(n);
        }
    }
    Some(chosen.into_iter().collect())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Section {
    Full,
    Header,
    Text,
}

impl Section {
    fn extract<'a>(&self, raw: &'a [u8]) -> &'a [u8] {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
            .unwrap_or(raw.len());
        match self {
            Section::Full => raw,
            Section::Header => &raw[..split],
            Section::Text => &raw[split..],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FetchItem {
    Uid,
    Flags,
    Size,
    InternalDate,
    Body {
        /// Name used in the response, e.g. `BODY[]`, `RFC822`.
        name: String,
        section: Section,
        peek: bool,
        partial: Option<(usize, usize)>,
    },
}

fn parse_fetch_items(spec: &str) -> Option<Vec<FetchItem>> {
    let spec = spec.trim();
    let inner = match spec.strip_prefix('(') {
        Some(rest) => rest.strip_suffix(')')?,
        None => spec,
    };
    // Split on spaces outside brackets.
    let mut words = Vec::new();
    let mut depth = 0i32;
    let mut current = String::new();
    for c in inner.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ => {}
        }
        if c == ' ' && depth == 0 {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    if words.is_empty() {
        return None;
    }
    let mut items = Vec::new();
    for word in words {
        let upper = word.to_ascii_uppercase();
        match upper.as_str() {
            "UID" => items.push(FetchItem::Uid),
            "FLAGS" => items.push(FetchItem::Flags),
            "RFC822.SIZE" => items.push(FetchItem::Size),
            "INTERNALDATE" => items.push(FetchItem::InternalDate),
            "FAST" => {
                items.push(FetchItem::Flags);
                items.push(FetchItem::InternalDate);
                items.push(FetchItem::Size);
            }
            "RFC822" | "RFC822.HEADER" | "RFC822.TEXT" => {
                let section = match upper.as_str() {
                    "RFC822" => Section::Full,
                    "RFC822.HEADER" => Section::Header,
                    _ => Section::Text,
                };
                items.push(FetchItem::Body {
                    name: upper.clone(),
                    peek: upper == "RFC822.HEADER",
                    section,
                    partial: None,
                });
            }
            _ => {
                let (peek, rest) = if let Some(r) = upper.strip_prefix("BODY.PEEK[") {
                    (true, r)
                } else if let Some(r) = upper.strip_prefix("BODY[") {
                    (false, r)
                } else {
                    return None;
                };
                let (section_name, after) = rest.split_once(']')?;
                let section = match section_name {
                    "" => Section::Full,
                    "HEADER" => Section::Header,
                    "TEXT" => Section::Text,
                    _ => return None,
                };
                let partial = if after.is_empty() {
                    None
                } else {
                    let p = after.strip_prefix('<')?.strip_suffix('>')?;
                    let (start, len) = p.split_once('.')?;
                    Some((start.parse().ok()?, len.parse().ok()?))
                };
                items.push(FetchItem::Body {
                    name: format!("BODY[{section_name}]"),
                    section,
                    peek,
                    partial,
                });
            }
        }
    }
    Some(items)
}

impl std::ops::Deref for FakeImap {
    type Target = ServerStats;

    fn deref(&self) -> &ServerStats {
        &self.shared.stats
    }
}

//! Fake Gmail POP3 server (protocol-facts §1.4, §7.3).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::conn::{
    bind_loopback, lock, random_id, spawn_server, Conn, Line, ServerStats, ServerTask, Stream,
};
use super::google::{FakeGoogle, GoogleHandle};
use super::imap::{parse_xoauth2, redact};
use super::pki::TestPki;
use super::XOAUTH2_ERROR_CHALLENGE;

/// Longest accepted line (RFC 2449 says 255 for commands, but Gmail takes a one-line
/// `AUTH XOAUTH2 <ir>`, and SASL responses are longer).
pub const MAX_LINE: usize = 16 * 1024;

pub const CAPA: &str = "+OK Capability list follows\r\nUSER\r\nRESP-CODES\r\nEXPIRE 0\r\nLOGIN-DELAY 300\r\nTOP\r\nUIDL\r\nX-GOOGLE-RICO\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\n";
pub const APP_PASSWORD_ERR: &str = "-ERR [AUTH] Application-specific password required: https://support.google.com/accounts/answer/185833";

/// How the fake expects TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopTls {
    /// TLS from the first byte (pop.gmail.com:995).
    Implicit,
    /// Plaintext greeting, `STLS` required before authentication.
    Stls,
}

#[derive(Clone)]
struct PopMessage {
    uid: String,
    raw: Arc<Vec<u8>>,
}

struct Shared {
    stats: Arc<ServerStats>,
    google: GoogleHandle,
    acceptor: TlsAcceptor,
    tls: PopTls,
    mailboxes: Mutex<HashMap<String, Vec<PopMessage>>>,
    next_uid: AtomicU64,
    exchange: super::exchange::Exchange,
}

impl Shared {
    fn violation(&self, v: String) {
        lock(&self.stats.violations).push(format!("POP3: {v}"));
    }
}

pub struct FakePop3 {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _task: ServerTask,
}

impl FakePop3 {
    pub async fn start(google: &FakeGoogle, pki: &TestPki, tls: PopTls) -> FakePop3 {
        let shared = Arc::new(Shared {
            stats: Arc::default(),
            google: google.shared(),
            acceptor: TlsAcceptor::from(pki.server_config()),
            tls,
            mailboxes: Mutex::new(HashMap::new()),
            next_uid: AtomicU64::new(0x18c5_f2a3_b4d5_0000),
            exchange: Default::default(),
        });
        let (listener, addr) = bind_loopback().await;
        let s = shared.clone();
        let task = spawn_server(listener, move |tcp, peer| handle_conn(s.clone(), tcp, peer));
        FakePop3 {
            addr,
            shared,
            _task: task,
        }
    }

    /// Exchange Online behaviour instead of Gmail's (off by default).
    pub fn exchange(&self) -> &super::exchange::Exchange {
        &self.shared.exchange
    }

    /// Appends a message (raw RFC 5322 bytes with CRLF) to that user's maildrop. Sessions
    /// see messages added before they authenticated.
    pub fn add_message(&self, email: &str, raw: &[u8]) {
        let uid = format!(
            "GmailId{:x}",
            self.shared.next_uid.fetch_add(1, Ordering::SeqCst)
        );
        lock(&self.shared.mailboxes)
            .entry(email.to_ascii_lowercase())
            .or_default()
            .push(PopMessage {
                uid,
                raw: Arc::new(raw.to_vec()),
            });
    }

    /// Messages in the maildrop (DELE + QUIT removes them).
    pub fn message_count(&self, email: &str) -> usize {
        lock(&self.shared.mailboxes)
            .get(&email.to_ascii_lowercase())
            .map_or(0, Vec::len)
    }
}

async fn handle_conn(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _open = shared.stats.open();
    let conn = match shared.tls {
        PopTls::Implicit => match Conn::accept_tls(tcp, &shared.acceptor).await {
            Ok(c) => c,
            Err(_) => return,
        },
        PopTls::Stls => Conn::new(Stream::Plain(tcp)),
    };
    let mut session = Session {
        shared,
        conn: Some(conn),
        id: random_id(16),
        peer_ip: peer.ip().to_string(),
        pending_user: false,
        user: None,
        maildrop: Vec::new(),
        deleted: Vec::new(),
    };
    let _ = session.run().await;
    if let Some(conn) = session.conn.as_mut() {
        conn.shutdown().await;
    }
}

struct Session {
    shared: Arc<Shared>,
    conn: Option<Conn>,
    id: String,
    peer_ip: String,
    pending_user: bool,
    user: Option<String>,
    maildrop: Vec<PopMessage>,
    deleted: Vec<bool>,
}

enum Flow {
    Continue,
    Close,
}

type Io<T> = std::io::Result<T>;

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed")
}

/// Byte-stuffs `content` as a POP3 multi-line body, always ending in CRLF, and appends the
/// terminating `.` line.
fn stuff_into(out: &mut Vec<u8>, content: &[u8]) {
    out.reserve(content.len() + content.len() / 64 + 8);
    let mut at_line_start = true;
    let mut rest = content;
    while !rest.is_empty() {
        if at_line_start && rest[0] == b'.' {
            out.push(b'.');
        }
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                out.extend_from_slice(&rest[..=i]);
                rest = &rest[i + 1..];
                at_line_start = true;
            }
            None => {
                out.extend_from_slice(rest);
                rest = &[];
                at_line_start = false;
            }
        }
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

impl Session {
    fn conn(&mut self) -> Io<&mut Conn> {
        self.conn.as_mut().ok_or_else(closed)
    }

    async fn reply(&mut self, text: &str) -> Io<()> {
        self.conn()?.send(format!("{text}\r\n").as_bytes()).await
    }

    fn tls_active(&self) -> bool {
        self.conn.as_ref().is_some_and(Conn::is_tls)
    }

    async fn run(&mut self) -> Io<()> {
        let greeting = format!(
            "+OK Gpop ready for requests from {} {}",
            self.peer_ip, self.id
        );
        self.reply(&greeting).await?;
        loop {
            let line = match self.conn()?.read_line(MAX_LINE).await {
                Line::Text(l) => l,
                Line::Eof => return Ok(()),
                Line::TooLong => {
                    self.reply("-ERR line too long").await?;
                    return Ok(());
                }
            };
            match self.command(&String::from_utf8_lossy(&line)).await? {
                Flow::Continue => {}
                Flow::Close => return Ok(()),
            }
        }
    }

    async fn command(&mut self, line: &str) -> Io<Flow> {
        let (verb, args) = match line.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.to_string()),
            None => (line.to_ascii_uppercase(), String::new()),
        };
        let pre_tls = self.shared.tls == PopTls::Stls && !self.tls_active();
        match verb.as_str() {
            "" => {
                self.shared
                    .violation("empty line received in command state".to_string());
                self.reply("-ERR bad command").await?;
            }
            "CAPA" => {
                let stls = if pre_tls { "STLS\r\n" } else { "" };
                let text = format!("{CAPA}{stls}.\r\n");
                self.conn()?.send(text.as_bytes()).await?;
            }
            "QUIT" => {
                if let Some(user) = self.user.clone() {
                    let gone: Vec<String> = self
                        .maildrop
                        .iter()
                        .zip(&self.deleted)
                        .filter(|(_, d)| **d)
                        .map(|(m, _)| m.uid.clone())
                        .collect();
                    if !gone.is_empty() {
                        if let Some(mb) = lock(&self.shared.mailboxes).get_mut(&user) {
                            mb.retain(|m| !gone.contains(&m.uid));
                        }
                    }
                }
                self.reply("+OK Farewell.").await?;
                return Ok(Flow::Close);
            }
            "STLS" if pre_tls && self.user.is_none() => {
                let pending = self.conn()?.buffered().len();
                if pending > 0 {
                    self.shared.violation(format!(
                        "{pending} bytes sent after STLS before the TLS handshake"
                    ));
                }
                self.reply("+OK Begin TLS negotiation").await?;
                let conn = self.conn.take().ok_or_else(closed)?;
                match conn.start_tls(&self.shared.acceptor).await {
                    Ok(c) => self.conn = Some(c),
                    Err(_) => return Ok(Flow::Close),
                }
            }
            "AUTH" | "USER" | "PASS" if self.user.is_none() && pre_tls => {
                self.shared.violation(format!("{verb} before STLS"));
                if verb == "AUTH" || verb == "PASS" {
                    self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
                }
                self.reply("-ERR [SYS/PERM] STLS required").await?;
            }
            "AUTH" if self.user.is_none() => return self.auth(&args).await,
            "USER" if self.user.is_none() => {
                self.pending_user = true;
                self.reply("+OK send PASS").await?;
            }
            "PASS" if self.user.is_none() => {
                if !self.pending_user {
                    self.reply("-ERR [AUTH] USER first").await?;
                } else {
                    self.pending_user = false;
                    self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
                    self.reply(APP_PASSWORD_ERR).await?;
                }
            }
            _ if self.user.is_some() => return self.transaction(&verb, &args).await,
            _ => self.reply("-ERR bad command").await?,
        }
        Ok(Flow::Continue)
    }

    async fn note_pipelined(&mut self) -> Io<()> {
        let stats = self.shared.stats.clone();
        stats.note_pipelined(self.conn()?).await;
        Ok(())
    }

    async fn auth(&mut self, args: &str) -> Io<Flow> {
        let mut parts = args.split_whitespace();
        let Some(mechanism) = parts.next().map(str::to_ascii_uppercase) else {
            self.conn()?
                .send(b"+OK\r\nPLAIN\r\nXOAUTH2\r\nOAUTHBEARER\r\n.\r\n")
                .await?;
            return Ok(Flow::Continue);
        };
        let ir = parts.next().map(str::to_string);
        if parts.next().is_some() {
            self.reply("-ERR bad command").await?;
            return Ok(Flow::Continue);
        }
        if self.shared.exchange.is_on() && ir.is_some() {
            // Exchange documents only the two-line AUTH and closes on the one-line form.
            self.shared
                .violation("one-line AUTH XOAUTH2 sent to Exchange".to_string());
            self.reply("-ERR Protocol error. Connection is closed. 10")
                .await?;
            return Ok(Flow::Close);
        }
        if mechanism != "XOAUTH2" {
            self.shared
                .violation(format!("unexpected AUTH mechanism {mechanism}"));
            self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
            self.reply("-ERR [AUTH] Invalid credentials.").await?;
            return Ok(Flow::Continue);
        }
        let response = match ir {
            Some(ir) => ir,
            None => {
                self.reply("+ ").await?;
                match self.conn()?.read_line(MAX_LINE).await {
                    Line::Text(l) => String::from_utf8_lossy(&l).into_owned(),
                    Line::Eof => return Ok(Flow::Close),
                    Line::TooLong => {
                        self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
                        self.reply("-ERR line too long").await?;
                        return Ok(Flow::Close);
                    }
                }
            }
        };
        if response == "*" {
            self.note_pipelined().await?;
            self.reply("-ERR [AUTH] Authentication cancelled.").await?;
            return Ok(Flow::Continue);
        }
        let credentials = parse_xoauth2(&response);
        if credentials.is_none() {
            self.shared
                .violation("malformed XOAUTH2 initial response".to_string());
        }
        let exchange = &self.shared.exchange;
        let valid = credentials.as_ref().is_some_and(|(email, token)| {
            if exchange.is_on() {
                exchange.may_open(&self.shared.google, email, token)
            } else {
                self.shared.google.check_access_token(token, email)
            }
        });
        if exchange.is_on() && !valid {
            self.note_pipelined().await?;
            self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
            self.reply("-ERR Authentication failure: unknown user name or bad password.")
                .await?;
            return Ok(Flow::Continue);
        }
        if let (true, Some((email, _))) = (valid, credentials) {
            self.note_pipelined().await?;
            self.shared.stats.successful.fetch_add(1, Ordering::SeqCst);
            let key = email.to_ascii_lowercase();
            self.maildrop = lock(&self.shared.mailboxes)
                .get(&key)
                .cloned()
                .unwrap_or_default();
            self.deleted = vec![false; self.maildrop.len()];
            self.user = Some(key);
            if self.shared.exchange.is_on() {
                self.reply("+OK User successfully authenticated.").await?;
            } else {
                self.reply("+OK Welcome.").await?;
            }
            return Ok(Flow::Continue);
        }
        self.reply(&format!("+ {XOAUTH2_ERROR_CHALLENGE}")).await?;
        let answer = match self.conn()?.read_line(MAX_LINE).await {
            Line::Text(l) => l,
            Line::Eof => return Ok(Flow::Close),
            Line::TooLong => b"<too long>".to_vec(),
        };
        self.note_pipelined().await?;
        self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
        if answer.is_empty() {
            self.reply("-ERR [AUTH] Invalid credentials.").await?;
        } else if answer == b"*" {
            self.reply("-ERR [AUTH] Authentication cancelled.").await?;
        } else {
            self.shared.violation(format!(
                "non-empty line ({} bytes) received where the empty SASL response to the error challenge was required",
                answer.len()
            ));
            lock(&self.shared.stats.before_auth).push(redact(&String::from_utf8_lossy(&answer)));
            self.reply("-ERR [AUTH] Invalid credentials.").await?;
        }
        Ok(Flow::Continue)
    }

    /// Index of message `arg` (1-based) if it exists and is not deleted.
    fn message_index(&self, arg: &str) -> Option<usize> {
        let n: usize = arg.trim().parse().ok()?;
        let i = n.checked_sub(1)?;
        (i < self.maildrop.len() && !self.deleted[i]).then_some(i)
    }

    async fn transaction(&mut self, verb: &str, args: &str) -> Io<Flow> {
        let args: Vec<&str> = args.split_whitespace().collect();
        match verb {
            "STAT" => {
                let (count, size) = self
                    .maildrop
                    .iter()
                    .zip(&self.deleted)
                    .filter(|(_, d)| !**d)
                    .fold((0, 0), |(c, s), (m, _)| (c + 1, s + m.raw.len()));
                self.reply(&format!("+OK {count} {size}")).await?;
            }
            "LIST" | "UIDL" => {
                let value = |m: &PopMessage| {
                    if verb == "LIST" {
                        m.raw.len().to_string()
                    } else {
                        m.uid.clone()
                    }
                };
                if let Some(arg) = args.first() {
                    match self.message_index(arg) {
                        Some(i) => {
                            let v = value(&self.maildrop[i]);
                            self.reply(&format!("+OK {} {v}", i + 1)).await?;
                        }
                        None => self.reply("-ERR no such message").await?,
                    }
                } else {
                    let mut text = String::from("+OK\r\n");
                    for (i, m) in self.maildrop.iter().enumerate() {
                        if !self.deleted[i] {
                            text.push_str(&format!("{} {}\r\n", i + 1, value(m)));
                        }
                    }
                    text.push_str(".\r\n");
                    self.conn()?.send(text.as_bytes()).await?;
                }
            }
            "RETR" | "TOP" => {
                let index = args.first().and_then(|a| self.message_index(a));
                let lines: Option<usize> = if verb == "TOP" {
                    match args.get(1).and_then(|a| a.parse().ok()) {
                        Some(k) => Some(k),
                        None => {
                            self.reply("-ERR bad command").await?;
                            return Ok(Flow::Continue);
                        }
                    }
                } else {
                    None
                };
                let Some(i) = index else {
                    self.reply("-ERR no such message").await?;
                    return Ok(Flow::Continue);
                };
                let raw = self.maildrop[i].raw.clone();
                let content: &[u8] = match lines {
                    None => &raw,
                    Some(k) => {
                        let header_end = raw
                            .windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .map_or(raw.len(), |p| p + 4);
                        let mut end = header_end;
                        for _ in 0..k {
                            if end >= raw.len() {
                                break;
                            }
                            end = raw[end..]
                                .iter()
                                .position(|&b| b == b'\n')
                                .map_or(raw.len(), |p| end + p + 1);
                        }
                        &raw[..end]
                    }
                };
                let mut out = if verb == "RETR" {
                    b"+OK message follows\r\n".to_vec()
                } else {
                    b"+OK\r\n".to_vec()
                };
                stuff_into(&mut out, content);
                self.conn()?.send(&out).await?;
            }
            "DELE" => match args.first().and_then(|a| self.message_index(a)) {
                Some(i) => {
                    self.deleted[i] = true;
                    self.reply("+OK marked for deletion").await?;
                }
                None => self.reply("-ERR no such message").await?,
            },
            "RSET" => {
                self.deleted.iter_mut().for_each(|d| *d = false);
                self.reply("+OK").await?;
            }
            "NOOP" => self.reply("+OK").await?,
            _ => self.reply("-ERR bad command").await?,
        }
        Ok(Flow::Continue)
    }
}

impl std::ops::Deref for FakePop3 {
    type Target = ServerStats;

    fn deref(&self) -> &ServerStats {
        &self.shared.stats
    }
}

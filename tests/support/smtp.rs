//! Fake Gmail SMTP submission server (protocol-facts §1.3, §7.2).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Longest accepted command line.
pub const MAX_COMMAND_LINE: usize = 4096;
/// Longest accepted SASL response line (after `334 `).
pub const MAX_SASL_LINE: usize = 16 * 1024;
/// Longest inline AUTH initial response Gmail accepts (longer gets 555).
pub const MAX_INLINE_IR: usize = 500;
/// Message size cap (larger messages are read and refused with 552).
pub const MAX_MESSAGE: usize = 40 * 1024 * 1024;
/// The SIZE Gmail advertises.
pub const ADVERTISED_SIZE: usize = 35_882_577;

/// How the fake expects TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpMode {
    /// TLS from the first byte (smtp.gmail.com:465).
    Implicit,
    /// Plaintext banner, STARTTLS required before AUTH/MAIL (smtp.gmail.com:587).
    StartTls,
}

/// A message accepted by the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The XOAUTH2 `user=` of the session.
    pub auth_user: String,
    /// Reverse path without angle brackets (empty for `<>`).
    pub mail_from: String,
    /// Forward paths without angle brackets, in order.
    pub rcpt_to: Vec<String>,
    /// DATA: dot-unstuffed lines up to (not including) the terminating `.` line, so a
    /// message that ends with CRLF is byte-identical to what the client submitted. BDAT:
    /// the chunks concatenated.
    pub data: Vec<u8>,
}

struct Shared {
    stats: Arc<ServerStats>,
    google: GoogleHandle,
    acceptor: TlsAcceptor,
    mode: SmtpMode,
    messages: Mutex<Vec<ReceivedMessage>>,
    close_mid_data: Mutex<Option<usize>>,
    exchange: super::exchange::Exchange,
}

impl Shared {
    fn violation(&self, v: String) {
        lock(&self.stats.violations).push(format!("SMTP: {v}"));
    }
}

pub struct FakeSmtp {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _task: ServerTask,
}

impl FakeSmtp {
    pub async fn start(google: &FakeGoogle, pki: &TestPki, mode: SmtpMode) -> FakeSmtp {
        let shared = Arc::new(Shared {
            stats: Arc::default(),
            google: google.shared(),
            acceptor: TlsAcceptor::from(pki.server_config()),
            mode,
            messages: Mutex::new(Vec::new()),
            close_mid_data: Mutex::new(None),
            exchange: Default::default(),
        });
        let (listener, addr) = bind_loopback().await;
        let s = shared.clone();
        let task = spawn_server(listener, move |tcp, peer| handle_conn(s.clone(), tcp, peer));
        FakeSmtp {
            addr,
            shared,
            _task: task,
        }
    }

    /// Exchange Online behaviour instead of Gmail's (off by default).
    pub fn exchange(&self) -> &super::exchange::Exchange {
        &self.shared.exchange
    }

    /// Messages accepted so far, in order.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        lock(&self.shared.messages).clone()
    }

    /// Drop the connection (no reply, no TLS close_notify) once this many bytes of message
    /// content (DATA or BDAT) have been received. `None` (default) disables.
    pub fn set_close_mid_data(&self, after_bytes: Option<usize>) {
        *lock(&self.shared.close_mid_data) = after_bytes;
    }
}

async fn handle_conn(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _open = shared.stats.open();
    let conn = match shared.mode {
        SmtpMode::Implicit => match Conn::accept_tls(tcp, &shared.acceptor).await {
            Ok(c) => c,
            Err(_) => return,
        },
        SmtpMode::StartTls => Conn::new(Stream::Plain(tcp)),
    };
    let mut session = Session {
        shared,
        conn: Some(conn),
        id: format!(
            "{}-{}sm{}.{}",
            random_id(13),
            random_id(13),
            random_id(8),
            random_id(3)
        ),
        peer_ip: peer.ip().to_string(),
        greeted: false,
        user: None,
        mail_from: None,
        rcpts: Vec::new(),
        bdat: None,
        data_received: 0,
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
    greeted: bool,
    user: Option<String>,
    mail_from: Option<String>,
    rcpts: Vec<String>,
    /// BDAT chunks received so far (and whether the message got too big).
    bdat: Option<(Vec<u8>, bool)>,
    /// Message bytes received in the current transaction (for close-mid-data).
    data_received: usize,
}

enum Flow {
    Continue,
    Close,
    /// Drop the connection abruptly (no reply, no close_notify).
    Drop,
}

enum Content {
    /// The message and whether it exceeded [`MAX_MESSAGE`].
    Done(Vec<u8>, bool),
    Eof,
    Drop,
}

type Io<T> = std::io::Result<T>;

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed")
}

/// Path inside `<...>` after `FROM:`/`TO:`, and the parameters after it.
fn parse_path<'a>(args: &'a str, keyword: &str) -> Option<(String, Vec<&'a str>)> {
    let rest = args
        .get(..keyword.len())
        .filter(|k| k.eq_ignore_ascii_case(keyword))
        .map(|_| &args[keyword.len()..])?;
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('<')?;
    let close = rest.find('>')?;
    let path = &rest[..close];
    let params = rest[close + 1..].split_whitespace().collect();
    if path.contains(['<', ' ']) {
        return None;
    }
    Some((path.to_string(), params))
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

    fn reset_transaction(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
        self.bdat = None;
        self.data_received = 0;
    }

    async fn run(&mut self) -> Io<()> {
        let banner = format!("220 smtp.gmail.com ESMTP {} - gsmtp", self.id);
        self.reply(&banner).await?;
        loop {
            let line = match self.conn()?.read_line(MAX_COMMAND_LINE).await {
                Line::Text(l) => l,
                Line::Eof => return Ok(()),
                Line::TooLong => {
                    let id = self.id.clone();
                    self.reply(&format!(
                        "555-5.5.2 Syntax error, command line too long. For more information, go to\r\n555 5.5.2  https://support.google.com/a/answer/3221692 {id} - gsmtp"
                    ))
                    .await?;
                    return Ok(());
                }
            };
            match self.command(&String::from_utf8_lossy(&line)).await? {
                Flow::Continue => {}
                Flow::Close => return Ok(()),
                Flow::Drop => {
                    self.conn = None;
                    return Ok(());
                }
            }
        }
    }

    async fn command(&mut self, line: &str) -> Io<Flow> {
        let id = self.id.clone();
        let (verb, args) = match line.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_string()),
            None => (line.to_ascii_uppercase(), String::new()),
        };
        let pre_tls = self.shared.mode == SmtpMode::StartTls && !self.tls_active();
        if pre_tls && matches!(verb.as_str(), "AUTH" | "MAIL" | "RCPT" | "DATA" | "BDAT") {
            self.shared.violation(format!("{verb} before STARTTLS"));
            self.reply(&format!(
                "530 5.7.0 Must issue a STARTTLS command first. {id} - gsmtp"
            ))
            .await?;
            if verb == "BDAT" {
                return self.discard_bdat(&args).await;
            }
            return Ok(Flow::Continue);
        }
        match verb.as_str() {
            "" => {
                self.shared
                    .violation("empty line received in command state".to_string());
                self.reply(&format!("555 5.5.2 Syntax error. {id} - gsmtp"))
                    .await?;
            }
            "EHLO" => {
                if args.is_empty() {
                    self.reply(&format!(
                        "501 5.5.4 Empty HELO/EHLO argument not allowed. {id} - gsmtp"
                    ))
                    .await?;
                    return Ok(Flow::Continue);
                }
                self.reset_transaction();
                self.greeted = true;
                let middle = if self.tls_active() {
                    "250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH"
                } else {
                    "250-STARTTLS"
                };
                let text = format!(
                    "250-smtp.gmail.com at your service, [{}]\r\n250-SIZE {ADVERTISED_SIZE}\r\n250-8BITMIME\r\n{middle}\r\n250-ENHANCEDSTATUSCODES\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SMTPUTF8",
                    self.peer_ip
                );
                self.reply(&text).await?;
            }
            "HELO" => {
                self.reset_transaction();
                self.greeted = true;
                self.reply("250 smtp.gmail.com at your service").await?;
            }
            "STARTTLS" => {
                if !pre_tls {
                    self.reply(&format!("502 5.5.1 Unrecognized command. {id} - gsmtp"))
                        .await?;
                    return Ok(Flow::Continue);
                }
                let pending = self.conn()?.buffered().len();
                if pending > 0 {
                    self.shared.violation(format!(
                        "{pending} bytes sent after STARTTLS before the TLS handshake"
                    ));
                }
                self.reply("220 2.0.0 Ready to start TLS").await?;
                let conn = self.conn.take().ok_or_else(closed)?;
                match conn.start_tls(&self.shared.acceptor).await {
                    Ok(c) => self.conn = Some(c),
                    Err(_) => return Ok(Flow::Close),
                }
                self.greeted = false;
                self.reset_transaction();
            }
            "AUTH" => return self.auth(&args).await,
            "MAIL" => {
                if !self.greeted {
                    self.shared.violation("MAIL before EHLO/HELO".to_string());
                    self.reply(&format!("503 5.5.1 EHLO/HELO first. {id} - gsmtp"))
                        .await?;
                    return Ok(Flow::Continue);
                }
                if self.user.is_none() {
                    self.reply(&format!(
                        "530-5.7.0 Authentication Required. For more information, go to\r\n530 5.7.0  https://support.google.com/mail/?p=WantAuthError {id} - gsmtp"
                    ))
                    .await?;
                    return Ok(Flow::Continue);
                }
                if self.mail_from.is_some() {
                    self.reply(&format!("503 5.5.1 Nested MAIL command. {id} - gsmtp"))
                        .await?;
                    return Ok(Flow::Continue);
                }
                let Some((path, params)) = parse_path(&args, "FROM:") else {
                    self.reply(&format!("555 5.5.2 Syntax error. {id} - gsmtp"))
                        .await?;
                    return Ok(Flow::Continue);
                };
                for p in params {
                    let upper = p.to_ascii_uppercase();
                    if let Some(size) = upper.strip_prefix("SIZE=") {
                        match size.parse::<usize>() {
                            Ok(n) if n > ADVERTISED_SIZE => {
                                self.reply(&format!(
                                    "552 5.3.4 Message size exceeds fixed limit {id} - gsmtp"
                                ))
                                .await?;
                                return Ok(Flow::Continue);
                            }
                            Ok(_) => {}
                            Err(_) => {
                                self.reply(&format!("555 5.5.2 Syntax error. {id} - gsmtp"))
                                    .await?;
                                return Ok(Flow::Continue);
                            }
                        }
                    } else if !matches!(upper.as_str(), "BODY=8BITMIME" | "BODY=7BIT" | "SMTPUTF8")
                    {
                        self.reply(&format!("555 5.5.4 Unsupported option: {p} {id} - gsmtp"))
                            .await?;
                        return Ok(Flow::Continue);
                    }
                }
                self.mail_from = Some(path);
                self.reply(&format!("250 2.1.0 OK {id} - gsmtp")).await?;
            }
            "RCPT" => {
                if self.mail_from.is_none() {
                    self.reply(&format!("503 5.5.1 MAIL first. {id} - gsmtp"))
                        .await?;
                    return Ok(Flow::Continue);
                }
                match parse_path(&args, "TO:") {
                    Some((path, _)) if !path.is_empty() => {
                        self.rcpts.push(path);
                        self.reply(&format!("250 2.1.5 OK {id} - gsmtp")).await?;
                    }
                    _ => {
                        self.reply(&format!("555 5.5.2 Syntax error. {id} - gsmtp"))
                            .await?;
                    }
                }
            }
            "DATA" => {
                if self.mail_from.is_none() {
                    self.reply(&format!("503 5.5.1 MAIL first. {id} - gsmtp"))
                        .await?;
                    return Ok(Flow::Continue);
                }
                if self.rcpts.is_empty() || self.bdat.is_some() {
                    self.reply(&format!("503 5.5.1 RCPT first. {id} - gsmtp"))
                        .await?;
                    return Ok(Flow::Continue);
                }
                self.reply(&format!("354  Go ahead {id} - gsmtp")).await?;
                match self.read_dot_data().await? {
                    Content::Done(data, too_big) => return self.deliver(data, too_big).await,
                    Content::Eof => return Ok(Flow::Close),
                    Content::Drop => return Ok(Flow::Drop),
                }
            }
            "BDAT" => return self.bdat(&args).await,
            "RSET" => {
                self.reset_transaction();
                self.reply(&format!("250 2.1.5 Flushed {id} - gsmtp"))
                    .await?;
            }
            "NOOP" => {
                self.reply(&format!("250 2.0.0 OK {id} - gsmtp")).await?;
            }
            "QUIT" => {
                self.reply(&format!("221 2.0.0 closing connection {id} - gsmtp"))
                    .await?;
                return Ok(Flow::Close);
            }
            "VRFY" => {
                self.reply(&format!(
                    "252 2.1.5 Send some mail, I'll try my best {id} - gsmtp"
                ))
                .await?;
            }
            "HELP" => {
                self.reply(&format!(
                    "214 2.0.0  https://www.google.com/search?btnI&q=RFC+5321 {id} - gsmtp"
                ))
                .await?;
            }
            _ => {
                self.reply(&format!("502 5.5.1 Unrecognized command. {id} - gsmtp"))
                    .await?;
            }
        }
        Ok(Flow::Continue)
    }

    async fn note_pipelined(&mut self) -> Io<()> {
        let stats = self.shared.stats.clone();
        stats.note_pipelined(self.conn()?).await;
        Ok(())
    }

    async fn bad_credentials(&mut self) -> Io<()> {
        let id = self.id.clone();
        self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
        self.reply(&format!(
            "535-5.7.8 Username and Password not accepted. For more information, go to\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials {id} - gsmtp"
        ))
        .await
    }

    /// Exchange's answers (§4.6): no error challenge; 5.7.139 when SMTP AUTH is off.
    async fn exchange_auth(&mut self, credentials: Option<(String, String)>) -> Io<Flow> {
        let exchange = &self.shared.exchange;
        exchange.note_login();
        let user =
            credentials.filter(|(user, token)| exchange.may_open(&self.shared.google, user, token));
        let disabled = exchange.smtp_auth_disabled();
        self.note_pipelined().await?;
        let reply = match user {
            _ if disabled => "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [AM0PR01CA0001.eurprd01.prod.exchangelabs.com]",
            None => "535 5.7.3 Authentication unsuccessful [AM0PR01CA0001.eurprd01.prod.exchangelabs.com]",
            Some((user, _)) => {
                self.user = Some(user);
                self.shared.stats.successful.fetch_add(1, Ordering::SeqCst);
                self.reply("235 2.7.0 Authentication successful").await?;
                return Ok(Flow::Continue);
            }
        };
        self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
        self.reply(reply).await?;
        Ok(Flow::Continue)
    }

    async fn auth(&mut self, args: &str) -> Io<Flow> {
        let id = self.id.clone();
        if !self.greeted {
            self.shared.violation("AUTH before EHLO".to_string());
            self.reply(&format!("503 5.5.1 EHLO/HELO first. {id} - gsmtp"))
                .await?;
            return Ok(Flow::Continue);
        }
        if self.user.is_some() {
            self.reply(&format!("503 5.5.1 Already authenticated. {id} - gsmtp"))
                .await?;
            return Ok(Flow::Continue);
        }
        let mut parts = args.split_whitespace();
        let mechanism = parts.next().unwrap_or("").to_ascii_uppercase();
        let ir = parts.next().map(str::to_string);
        if parts.next().is_some() || mechanism.is_empty() {
            self.reply(&format!("501 5.5.2 Syntax error. {id} - gsmtp"))
                .await?;
            return Ok(Flow::Continue);
        }
        if mechanism != "XOAUTH2" {
            self.shared
                .violation(format!("unexpected AUTH mechanism {mechanism}"));
            self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
            self.reply(&format!(
                "504 5.7.4 Unrecognized authentication type. {id} - gsmtp"
            ))
            .await?;
            return Ok(Flow::Continue);
        }
        let response = match ir {
            Some(ir) if ir.len() > MAX_INLINE_IR => {
                self.shared.violation(format!(
                    "inline XOAUTH2 initial response of {} octets (Gmail refuses > {MAX_INLINE_IR}; use the two-step form)",
                    ir.len()
                ));
                self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
                self.reply(&format!(
                    "555-5.5.2 Syntax error, command line too long. For more information, go to\r\n555 5.5.2  https://support.google.com/a/answer/3221692 {id} - gsmtp"
                ))
                .await?;
                return Ok(Flow::Continue);
            }
            Some(ir) => ir,
            None => {
                self.reply("334 ").await?;
                match self.conn()?.read_line(MAX_SASL_LINE).await {
                    Line::Text(l) => String::from_utf8_lossy(&l).into_owned(),
                    Line::Eof => return Ok(Flow::Close),
                    Line::TooLong => {
                        self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
                        self.reply(&format!("500 5.5.2 Line too long. {id} - gsmtp"))
                            .await?;
                        return Ok(Flow::Close);
                    }
                }
            }
        };
        if response == "*" {
            self.note_pipelined().await?;
            self.reply(&format!("501 5.7.0 Authentication cancelled. {id} - gsmtp"))
                .await?;
            return Ok(Flow::Continue);
        }
        let credentials = parse_xoauth2(&response);
        if credentials.is_none() {
            self.shared
                .violation("malformed XOAUTH2 initial response".to_string());
        }
        if self.shared.exchange.is_on() {
            return self.exchange_auth(credentials).await;
        }
        let valid = credentials
            .as_ref()
            .is_some_and(|(email, token)| self.shared.google.check_access_token(token, email));
        if let (true, Some((email, _))) = (valid, credentials) {
            self.note_pipelined().await?;
            self.shared.stats.successful.fetch_add(1, Ordering::SeqCst);
            self.user = Some(email);
            self.reply("235 2.7.0 Accepted").await?;
            return Ok(Flow::Continue);
        }
        self.reply(&format!("334 {XOAUTH2_ERROR_CHALLENGE}"))
            .await?;
        let answer = match self.conn()?.read_line(MAX_SASL_LINE).await {
            Line::Text(l) => l,
            Line::Eof => return Ok(Flow::Close),
            Line::TooLong => b"<too long>".to_vec(),
        };
        self.note_pipelined().await?;
        if answer.is_empty() {
            self.bad_credentials().await?;
        } else if answer == b"*" {
            self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
            self.reply(&format!("501 5.7.0 Authentication cancelled. {id} - gsmtp"))
                .await?;
        } else {
            self.shared.violation(format!(
                "non-empty line ({} bytes) received where the empty SASL response to the error challenge was required",
                answer.len()
            ));
            lock(&self.shared.stats.before_auth).push(redact(&String::from_utf8_lossy(&answer)));
            self.shared.stats.failed.fetch_add(1, Ordering::SeqCst);
            self.reply(&format!("501 5.5.2 Cannot Decode response {id} - gsmtp"))
                .await?;
        }
        Ok(Flow::Continue)
    }

    fn close_limit(&self) -> Option<usize> {
        *lock(&self.shared.close_mid_data)
    }

    /// Reads dot-terminated DATA content without awaiting per line: complete lines are
    /// processed straight from the buffer.
    async fn read_dot_data(&mut self) -> Io<Content> {
        let limit = self.close_limit();
        let conn = self.conn.as_mut().ok_or_else(closed)?;
        let mut out = Vec::new();
        let mut too_big = false;
        let mut received = conn.buffered().len();
        if limit.is_some_and(|l| received >= l) {
            return Ok(Content::Drop);
        }
        loop {
            loop {
                let data = conn.buffered();
                let Some(i) = data.iter().position(|&b| b == b'\n') else {
                    break;
                };
                let line = &data[..=i];
                if line == b".\r\n" || line == b".\n" {
                    conn.consume(i + 1);
                    return Ok(Content::Done(out, too_big));
                }
                let content = line.strip_prefix(b".").unwrap_or(line);
                if out.len() + content.len() > MAX_MESSAGE {
                    too_big = true;
                } else {
                    out.extend_from_slice(content);
                }
                conn.consume(i + 1);
            }
            if conn.buffered().len() > MAX_MESSAGE {
                too_big = true;
                let n = conn.buffered().len();
                conn.consume(n);
            }
            match conn.fill().await {
                Ok(0) | Err(_) => return Ok(Content::Eof),
                Ok(n) => {
                    received += n;
                    if limit.is_some_and(|l| received >= l) {
                        return Ok(Content::Drop);
                    }
                }
            }
        }
    }

    /// Reads exactly `n` chunk bytes, appending them to the BDAT buffer (if any).
    async fn read_chunk(&mut self, n: usize) -> Io<Content> {
        let limit = self.close_limit();
        let mut remaining = n;
        let mut chunk = Vec::with_capacity(n.min(MAX_MESSAGE));
        let mut too_big = false;
        while remaining > 0 {
            let conn = self.conn.as_mut().ok_or_else(closed)?;
            if conn.buffered().is_empty() {
                match conn.fill().await {
                    Ok(0) | Err(_) => return Ok(Content::Eof),
                    Ok(_) => {}
                }
            }
            let take = remaining.min(conn.buffered().len());
            if chunk.len() + take > MAX_MESSAGE {
                too_big = true;
            } else {
                chunk.extend_from_slice(&conn.buffered()[..take]);
            }
            conn.consume(take);
            remaining -= take;
            self.data_received += take;
            if limit.is_some_and(|l| self.data_received >= l) {
                return Ok(Content::Drop);
            }
        }
        Ok(Content::Done(chunk, too_big))
    }

    /// Reads and throws away a BDAT chunk that is refused (keeps the stream in sync).
    async fn discard_bdat(&mut self, args: &str) -> Io<Flow> {
        let n = args
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<usize>().ok());
        let Some(n) = n else {
            return Ok(Flow::Close);
        };
        match self.read_chunk(n).await? {
            Content::Done(..) => Ok(Flow::Continue),
            Content::Eof => Ok(Flow::Close),
            Content::Drop => Ok(Flow::Drop),
        }
    }

    async fn bdat(&mut self, args: &str) -> Io<Flow> {
        let id = self.id.clone();
        let mut parts = args.split_whitespace();
        let size = parts.next().and_then(|s| s.parse::<usize>().ok());
        let last = match parts.next() {
            None => false,
            Some(l) if l.eq_ignore_ascii_case("LAST") => true,
            Some(_) => {
                self.reply(&format!("501 5.5.4 Syntax error in BDAT. {id} - gsmtp"))
                    .await?;
                return Ok(Flow::Close);
            }
        };
        let Some(size) = size else {
            self.reply(&format!("501 5.5.4 Syntax error in BDAT. {id} - gsmtp"))
                .await?;
            return Ok(Flow::Close);
        };
        if self.mail_from.is_none() || self.rcpts.is_empty() {
            let flow = self.discard_bdat(args).await?;
            if matches!(flow, Flow::Continue) {
                self.reply(&format!("503 5.5.1 RCPT first. {id} - gsmtp"))
                    .await?;
            }
            return Ok(flow);
        }
        let chunk = match self.read_chunk(size).await? {
            Content::Done(c, too_big) => (c, too_big),
            Content::Eof => return Ok(Flow::Close),
            Content::Drop => return Ok(Flow::Drop),
        };
        let (buf, too_big) = self.bdat.get_or_insert_with(|| (Vec::new(), false));
        if chunk.1 || buf.len() + chunk.0.len() > MAX_MESSAGE {
            *too_big = true;
        } else {
            buf.extend_from_slice(&chunk.0);
        }
        if last {
            let (data, too_big) = self.bdat.take().unwrap_or_default();
            return self.deliver(data, too_big).await;
        }
        self.reply(&format!("250 2.0.0 {size} bytes received {id} - gsmtp"))
            .await?;
        Ok(Flow::Continue)
    }

    async fn deliver(&mut self, data: Vec<u8>, too_big: bool) -> Io<Flow> {
        let id = self.id.clone();
        if too_big {
            self.reset_transaction();
            self.reply(&format!(
                "552-5.3.4 Your message exceeded Google's message size limits. For more information, go to\r\n552 5.3.4  https://support.google.com/mail/?p=MaxSizeError {id} - gsmtp"
            ))
            .await?;
            return Ok(Flow::Continue);
        }
        let message = ReceivedMessage {
            auth_user: self.user.clone().unwrap_or_default(),
            mail_from: self.mail_from.clone().unwrap_or_default(),
            rcpt_to: self.rcpts.clone(),
            data,
        };
        lock(&self.shared.messages).push(message);
        self.reset_transaction();
        self.reply(&format!("250 2.0.0 OK  {id} - gsmtp")).await?;
        Ok(Flow::Continue)
    }
}

impl std::ops::Deref for FakeSmtp {
    type Target = ServerStats;

    fn deref(&self) -> &ServerStats {
        &self.shared.stats
    }
}

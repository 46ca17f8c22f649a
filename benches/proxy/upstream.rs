//! A minimal implicit-TLS mail server standing in for Gmail: just enough IMAP (AUTHENTICATE
//! XOAUTH2, FETCH, NOOP, LOGOUT), SMTP (EHLO, AUTH XOAUTH2, MAIL/RCPT/DATA, QUIT) and POP3
//! (CAPA, AUTH XOAUTH2, STAT, RETR, QUIT) to log in and move one large message either way.
//! It serves a shared, pre-built message and sinks DATA without looking at it, so it is never
//! the bottleneck; tokens are checked against the fake Google like Gmail would.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::support::conn::{spawn_server, ServerTask};
use crate::support::GoogleHandle;

/// The message every FETCH and RETR returns: CRLF lines of 76 base64 characters (no line
/// starts with a dot, so POP3 needs no stuffing).
/// Size of the small message IMAP `FETCH 2` returns.
pub const SMALL_MESSAGE: usize = 4096;

pub fn make_message(size: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(size + 80);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while out.len() + 78 <= size.max(78) {
        for _ in 0..76 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(ALPHABET[(x % 64) as usize]);
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// What the upstream shares between connections.
struct Shared {
    google: GoogleHandle,
    message: Arc<Vec<u8>>,
    /// Octets of SMTP DATA received (the upload counter).
    sunk: Arc<AtomicU64>,
}

pub struct Upstream {
    pub imap: SocketAddr,
    pub smtp: SocketAddr,
    pub pop3: SocketAddr,
    /// Octets of SMTP DATA received so far.
    pub sunk: Arc<AtomicU64>,
    _tasks: Vec<ServerTask>,
}

#[derive(Clone, Copy)]
enum Proto {
    Imap,
    Smtp,
    Pop3,
}

impl Upstream {
    pub async fn start(
        tls: Arc<rustls::ServerConfig>,
        google: GoogleHandle,
        message: Arc<Vec<u8>>,
    ) -> io::Result<Upstream> {
        let sunk = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared {
            google,
            message,
            sunk: sunk.clone(),
        });
        let acceptor = TlsAcceptor::from(tls);
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for proto in [Proto::Imap, Proto::Smtp, Proto::Pop3] {
            let (listener, addr) = bind_loopback()?;
            let shared = shared.clone();
            let acceptor = acceptor.clone();
            tasks.push(spawn_server(listener, move |tcp, _| {
                let shared = shared.clone();
                let acceptor = acceptor.clone();
                async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut conn = Conn::new(tls);
                    let _ = match proto {
                        Proto::Imap => imap(&mut conn, &shared).await,
                        Proto::Smtp => smtp(&mut conn, &shared).await,
                        Proto::Pop3 => pop3(&mut conn, &shared).await,
                    };
                }
            }));
            addrs.push(addr);
        }
        Ok(Upstream {
            imap: addrs[0],
            smtp: addrs[1],
            pop3: addrs[2],
            sunk,
            _tasks: tasks,
        })
    }
}

/// 127.0.0.1 on a free port, with a listen queue deep enough for a thousand connections
/// arriving at once (the standard library's 128 would drop some).
pub fn bind_loopback() -> io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let listener = socket.listen(4096)?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// A buffered server connection. The buffer starts small (most sessions only log in and
/// idle) and grows for bulk reads.
struct Conn {
    io: TlsStream<TcpStream>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

const SMALL: usize = 1024;
const BULK: usize = 64 * 1024;

impl Conn {
    fn new(io: TlsStream<TcpStream>) -> Conn {
        Conn {
            io,
            buf: vec![0; SMALL],
            start: 0,
            end: 0,
        }
    }

    /// One line without its CRLF; `None` at EOF.
    async fn line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(i) = self.buf[self.start..self.end]
                .iter()
                .position(|&b| b == b'\n')
            {
                let raw = &self.buf[self.start..self.start + i];
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                let line = String::from_utf8_lossy(raw).into_owned();
                self.start += i + 1;
                return Ok(Some(line));
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                if self.buf.len() >= BULK {
                    return Err(io::Error::other("line too long"));
                }
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.io.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Ok(None);
            }
            self.end += n;
        }
    }

    /// Swallow SMTP DATA up to and including `CRLF.CRLF`, counting it. The client sends
    /// nothing more before the reply, so the terminator always ends a read: only the last
    /// five octets need looking at.
    async fn sink_data(&mut self, sunk: &AtomicU64) -> io::Result<()> {
        const END: &[u8] = b"\r\n.\r\n";
        fn remember(tail: &mut Vec<u8>, bytes: &[u8]) {
            tail.extend_from_slice(&bytes[bytes.len().saturating_sub(END.len())..]);
            let excess = tail.len().saturating_sub(END.len());
            tail.drain(..excess);
        }
        let mut tail = Vec::with_capacity(2 * END.len());
        remember(&mut tail, &self.buf[self.start..self.end]);
        sunk.fetch_add((self.end - self.start) as u64, Ordering::Relaxed);
        self.start = 0;
        self.end = 0;
        if self.buf.len() < BULK {
            self.buf.resize(BULK, 0);
        }
        while !tail.ends_with(END) {
            let n = self.io.read(&mut self.buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            sunk.fetch_add(n as u64, Ordering::Relaxed);
            remember(&mut tail, &self.buf[..n]);
        }
        Ok(())
    }

    /// Write and flush (TLS may hold records back until flushed).
    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }
}

/// Whether the base64 XOAUTH2 initial response carries a live token for its user.
fn xoauth2_ok(google: &GoogleHandle, b64: &str) -> bool {
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return false;
    };
    let text = String::from_utf8_lossy(&raw);
    let mut user = None;
    let mut token = None;
    for part in text.split('\x01') {
        if let Some(u) = part.strip_prefix("user=") {
            user = Some(u);
        } else if let Some(t) = part.strip_prefix("auth=Bearer ") {
            token = Some(t);
        }
    }
    matches!((user, token), (Some(u), Some(t)) if google.check_access_token(t, u))
}

async fn imap(conn: &mut Conn, shared: &Shared) -> io::Result<()> {
    conn.send(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] bench upstream ready\r\n")
        .await?;
    let mut authed = false;
    while let Some(line) = conn.line().await? {
        let mut words = line.splitn(3, ' ');
        let tag = words.next().unwrap_or("*").to_string();
        let cmd = words.next().unwrap_or("").to_ascii_uppercase();
        let rest = words.next().unwrap_or("");
        let reply = match cmd.as_str() {
            "AUTHENTICATE" => {
                let ir = rest.split_once(' ').map(|(_, ir)| ir).unwrap_or("");
                authed = xoauth2_ok(&shared.google, ir);
                if authed {
                    format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE] Success\r\n")
                } else {
                    format!("{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n")
                }
            }
            "FETCH" if authed => {
                // Message 2 is a small one (the soak's login-fetch-logout cycles).
                let body = if rest.starts_with("2 ") {
                    &shared.message[..shared.message.len().min(SMALL_MESSAGE)]
                } else {
                    &shared.message[..]
                };
                let n = if rest.starts_with("2 ") { 2 } else { 1 };
                let head = format!("* {n} FETCH (BODY[] {{{}}}\r\n", body.len());
                conn.send(head.as_bytes()).await?;
                conn.send(body).await?;
                format!(")\r\n{tag} OK Success\r\n")
            }
            "NOOP" => format!("{tag} OK Success\r\n"),
            "LOGOUT" => {
                let bye = format!("* BYE LOGOUT Requested\r\n{tag} OK 73 good day (Success)\r\n");
                conn.send(bye.as_bytes()).await?;
                return conn.io.shutdown().await;
            }
            _ => format!("{tag} BAD Unknown command\r\n"),
        };
        conn.send(reply.as_bytes()).await?;
    }
    Ok(())
}

async fn smtp(conn: &mut Conn, shared: &Shared) -> io::Result<()> {
    conn.send(b"220 bench upstream ESMTP ready\r\n").await?;
    let mut authed = false;
    while let Some(line) = conn.line().await? {
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            b"250-bench upstream at your service\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n250-AUTH XOAUTH2\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n"
        } else if upper.starts_with("AUTH XOAUTH2") {
            let ir = match line.get("AUTH XOAUTH2 ".len()..) {
                Some(ir) if !ir.trim().is_empty() => ir.to_string(),
                _ => {
                    conn.send(b"334 \r\n").await?;
                    conn.line().await?.unwrap_or_default()
                }
            };
            authed = xoauth2_ok(&shared.google, &ir);
            if authed {
                b"235 2.7.0 Accepted\r\n"
            } else {
                b"535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 BadCredentials\r\n"
            }
        } else if !authed && (upper.starts_with("MAIL") || upper.starts_with("DATA")) {
            b"530 5.7.0 Authentication Required\r\n"
        } else if upper.starts_with("MAIL")
            || upper.starts_with("RCPT")
            || upper.starts_with("RSET")
            || upper.starts_with("NOOP")
        {
            b"250 2.1.0 OK\r\n"
        } else if upper.starts_with("DATA") {
            conn.send(b"354 Go ahead\r\n").await?;
            conn.sink_data(&shared.sunk).await?;
            b"250 2.0.0 OK queued\r\n"
        } else if upper.starts_with("QUIT") {
            conn.send(b"221 2.0.0 closing connection\r\n").await?;
            return conn.io.shutdown().await;
        } else {
            b"502 5.5.1 Unrecognized command\r\n"
        };
        conn.send(reply).await?;
    }
    Ok(())
}

async fn pop3(conn: &mut Conn, shared: &Shared) -> io::Result<()> {
    conn.send(b"+OK bench upstream POP3 ready\r\n").await?;
    let mut authed = false;
    while let Some(line) = conn.line().await? {
        let upper = line.to_ascii_uppercase();
        let reply: Vec<u8> = if upper.starts_with("CAPA") {
            b"+OK Capability list follows\r\nUSER\r\nRESP-CODES\r\nEXPIRE 0\r\nLOGIN-DELAY 300\r\nTOP\r\nUIDL\r\nX-GOOGLE-RICO\r\nSASL PLAIN XOAUTH2\r\n.\r\n".to_vec()
        } else if upper.starts_with("AUTH XOAUTH2") {
            let ir = match line.get("AUTH XOAUTH2 ".len()..) {
                Some(ir) if !ir.trim().is_empty() => ir.to_string(),
                _ => {
                    conn.send(b"+ \r\n").await?;
                    conn.line().await?.unwrap_or_default()
                }
            };
            authed = xoauth2_ok(&shared.google, &ir);
            if authed {
                b"+OK Welcome.\r\n".to_vec()
            } else {
                b"-ERR [AUTH] Username and password not accepted.\r\n".to_vec()
            }
        } else if !authed {
            b"-ERR [AUTH] Log in first\r\n".to_vec()
        } else if upper.starts_with("STAT") {
            format!("+OK 1 {}\r\n", shared.message.len()).into_bytes()
        } else if upper.starts_with("RETR") {
            let head = format!("+OK {} octets follow.\r\n", shared.message.len());
            conn.send(head.as_bytes()).await?;
            conn.send(&shared.message).await?;
            b".\r\n".to_vec()
        } else if upper.starts_with("NOOP") {
            b"+OK\r\n".to_vec()
        } else if upper.starts_with("QUIT") {
            conn.send(b"+OK Farewell.\r\n").await?;
            return conn.io.shutdown().await;
        } else {
            b"-ERR Unknown command\r\n".to_vec()
        };
        conn.send(&reply).await?;
    }
    Ok(())
}

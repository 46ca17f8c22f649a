//! The benchmark's mail client: logs in directly to the upstream over TLS with XOAUTH2, or to
//! the proxy over plaintext loopback with the local app password, then runs one protocol's bulk
//! transfer (IMAP FETCH, SMTP DATA, POP3 RETR) in a loop.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Imap,
    Smtp,
    Pop3,
}

impl Proto {
    pub const ALL: [Proto; 3] = [Proto::Imap, Proto::Smtp, Proto::Pop3];

    pub fn transfer(self) -> &'static str {
        match self {
            Proto::Imap => "IMAP FETCH",
            Proto::Smtp => "SMTP DATA",
            Proto::Pop3 => "POP3 RETR",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Proto::Imap => "imap_fetch",
            Proto::Smtp => "smtp_data",
            Proto::Pop3 => "pop3_retr",
        }
    }
}

/// How a client reaches the mailbox.
#[derive(Clone)]
pub enum Route {
    /// TLS to the upstream, XOAUTH2 with this access token.
    Direct {
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        token: String,
    },
    /// Plaintext to the proxy, the local app password.
    Proxied { addr: SocketAddr, password: String },
}

/// A connection with a read buffer; `cap` bounds one read (small for the many idle sessions).
pub struct Client {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Client {
    pub async fn connect(route: &Route, cap: usize) -> io::Result<Client> {
        let addr = match route {
            Route::Direct { addr, .. } | Route::Proxied { addr, .. } => *addr,
        };
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = match route {
            Route::Direct { tls, .. } => {
                let name = ServerName::from(addr.ip());
                let tls = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await?;
                Box::new(tls)
            }
            Route::Proxied { .. } => Box::new(tcp),
        };
        Ok(Client {
            io,
            buf: vec![0; cap],
            start: 0,
            end: 0,
        })
    }

    /// Write and flush (TLS may hold records back until flushed).
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// One line without CRLF.
    pub async fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf[self.start..self.end]
                .iter()
                .position(|&b| b == b'\n')
            {
                let raw = &self.buf[self.start..self.start + i];
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                let line = String::from_utf8_lossy(raw).into_owned();
                self.start += i + 1;
                return Ok(line);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                let grown = (self.buf.len() * 2).max(256);
                if grown > 1 << 20 {
                    return Err(io::Error::other("line too long"));
                }
                self.buf.resize(grown, 0);
            }
            let n = self.io.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.end += n;
        }
    }

    /// Lines until one starts with `prefix`; returns that one.
    pub async fn until(&mut self, prefix: &str) -> io::Result<String> {
        loop {
            let line = self.line().await?;
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
    }

    /// An SMTP reply (multi-line joined); returns its last line.
    pub async fn smtp_reply(&mut self) -> io::Result<String> {
        loop {
            let line = self.line().await?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(line);
            }
        }
    }

    /// Read and drop exactly `n` octets, adding them to `counter` as they arrive.
    pub async fn discard(&mut self, n: u64, counter: &AtomicU64) -> io::Result<()> {
        let buffered = ((self.end - self.start) as u64).min(n);
        self.start += buffered as usize;
        counter.fetch_add(buffered, Ordering::Relaxed);
        let mut left = n - buffered;
        while left > 0 {
            let got = self.io.read(&mut self.buf).await?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let used = (got as u64).min(left);
            counter.fetch_add(used, Ordering::Relaxed);
            left -= used;
            self.start = used as usize;
            self.end = got;
        }
        Ok(())
    }
}

fn expect(line: &str, ok: bool) -> io::Result<()> {
    if ok {
        Ok(())
    } else {
        Err(io::Error::other(format!("unexpected reply: {line}")))
    }
}

pub fn xoauth2(email: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("user={email}\x01auth=Bearer {token}\x01\x01"))
}

/// Connect and log in (within 30 s); returns the logged-in connection.
pub async fn login(proto: Proto, route: &Route, email: &str, cap: usize) -> io::Result<Client> {
    tokio::time::timeout(Duration::from_secs(30), login_now(proto, route, email, cap))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "login took over 30 s"))?
}

async fn login_now(proto: Proto, route: &Route, email: &str, cap: usize) -> io::Result<Client> {
    let mut c = Client::connect(route, cap).await?;
    match proto {
        Proto::Imap => {
            let greeting = c.line().await?;
            expect(&greeting, greeting.starts_with("* OK"))?;
            let cmd = match route {
                Route::Direct { token, .. } => {
                    format!("a1 AUTHENTICATE XOAUTH2 {}\r\n", xoauth2(email, token))
                }
                Route::Proxied { password, .. } => format!("a1 LOGIN {email} {password}\r\n"),
            };
            c.send(cmd.as_bytes()).await?;
            let done = c.until("a1 ").await?;
            expect(&done, done.starts_with("a1 OK"))?;
        }
        Proto::Smtp => {
            let greeting = c.smtp_reply().await?;
            expect(&greeting, greeting.starts_with("220"))?;
            c.send(b"EHLO bench.local\r\n").await?;
            let ehlo = c.smtp_reply().await?;
            expect(&ehlo, ehlo.starts_with("250"))?;
            let cmd = match route {
                Route::Direct { token, .. } => {
                    format!("AUTH XOAUTH2 {}\r\n", xoauth2(email, token))
                }
                Route::Proxied { password, .. } => {
                    let plain = base64::engine::general_purpose::STANDARD
                        .encode(format!("\0{email}\0{password}"));
                    format!("AUTH PLAIN {plain}\r\n")
                }
            };
            c.send(cmd.as_bytes()).await?;
            let done = c.smtp_reply().await?;
            expect(&done, done.starts_with("235"))?;
        }
        Proto::Pop3 => {
            let greeting = c.line().await?;
            expect(&greeting, greeting.starts_with("+OK"))?;
            match route {
                Route::Direct { token, .. } => {
                    let cmd = format!("AUTH XOAUTH2 {}\r\n", xoauth2(email, token));
                    c.send(cmd.as_bytes()).await?;
                }
                Route::Proxied { password, .. } => {
                    c.send(format!("USER {email}\r\n").as_bytes()).await?;
                    let user = c.line().await?;
                    expect(&user, user.starts_with("+OK"))?;
                    c.send(format!("PASS {password}\r\n").as_bytes()).await?;
                }
            }
            let done = c.line().await?;
            expect(&done, done.starts_with("+OK"))?;
        }
    }
    Ok(c)
}

/// Move the message again and again until the task is dropped. Downloads count into
/// `counter` as they arrive; uploads are counted by the upstream's sink.
pub async fn transfer(
    proto: Proto,
    mut c: Client,
    message: Arc<Vec<u8>>,
    counter: Arc<AtomicU64>,
) -> io::Result<()> {
    let size = message.len() as u64;
    let mut n: u64 = 0;
    loop {
        n += 1;
        match proto {
            Proto::Imap => {
                let tag = format!("f{n}");
                c.send(format!("{tag} FETCH 1 BODY[]\r\n").as_bytes())
                    .await?;
                let head = c.line().await?;
                expect(&head, head.ends_with(&format!("{{{size}}}")))?;
                c.discard(size, &counter).await?;
                let close = c.line().await?;
                expect(&close, close == ")")?;
                let done = c.line().await?;
                expect(&done, done.starts_with(&format!("{tag} OK")))?;
            }
            Proto::Pop3 => {
                c.send(b"RETR 1\r\n").await?;
                let head = c.line().await?;
                expect(&head, head.starts_with("+OK"))?;
                c.discard(size, &counter).await?;
                let dot = c.line().await?;
                expect(&dot, dot == ".")?;
            }
            Proto::Smtp => {
                c.send(b"MAIL FROM:<bench@example.com>\r\n").await?;
                let r = c.smtp_reply().await?;
                expect(&r, r.starts_with("250"))?;
                c.send(b"RCPT TO:<sink@example.com>\r\n").await?;
                let r = c.smtp_reply().await?;
                expect(&r, r.starts_with("250"))?;
                c.send(b"DATA\r\n").await?;
                let r = c.smtp_reply().await?;
                expect(&r, r.starts_with("354"))?;
                c.send(&message).await?;
                c.send(b".\r\n").await?;
                let r = c.smtp_reply().await?;
                expect(&r, r.starts_with("250"))?;
            }
        }
    }
}

//! Plumbing shared by the fake servers: a buffered, optionally TLS, connection with
//! line/byte readers that never await per byte, the accept loop that stops on drop, and
//! small helpers (poison-tolerant locking, random ids).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::Rng as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// Size of one socket read.
pub const READ_CHUNK: usize = 64 * 1024;
/// Time allowed for a server-side TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Locks a mutex, ignoring poisoning (a panicking test thread must not cascade).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Random lowercase alphanumeric id (session ids in greetings and replies).
pub fn random_id(len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

/// Random URL-safe string (access / refresh tokens, authorization codes).
pub fn random_urlsafe(len: usize) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

/// A TCP stream, before or after a server-side TLS handshake.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Result of reading one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The line without its terminating LF and an optional CR before it.
    Text(Vec<u8>),
    /// The peer closed (or the socket failed); any partial line is dropped.
    Eof,
    /// The line exceeded the limit (it has been discarded from the buffer as far as received).
    TooLong,
}

/// A buffered server-side connection.
pub struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    pos: usize,
}

impl Conn {
    pub fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
        }
    }

    /// Accepts TLS on a fresh TCP connection (implicit TLS).
    pub async fn accept_tls(tcp: TcpStream, acceptor: &TlsAcceptor) -> io::Result<Conn> {
        let tls = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(Conn::new(Stream::Tls(Box::new(tls))))
    }

    /// Upgrades a plaintext connection after STARTTLS / STLS. Bytes that were buffered but
    /// not consumed are discarded (callers inspect [`Conn::buffered`] first).
    pub async fn start_tls(self, acceptor: &TlsAcceptor) -> io::Result<Conn> {
        match self.stream {
            Stream::Plain(tcp) => Conn::accept_tls(tcp, acceptor).await,
            Stream::Tls(_) => Err(io::Error::other("already TLS")),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Marks `n` buffered bytes as consumed.
    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Reads more bytes from the socket into the buffer. `Ok(0)` means EOF.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(READ_CHUNK);
        self.stream.read_buf(&mut self.buf).await
    }

    /// Waits up to `wait` for more bytes (used to observe pipelined data). Returns whether
    /// anything arrived.
    pub async fn fill_within(&mut self, wait: Duration) -> bool {
        matches!(
            tokio::time::timeout(wait, self.fill()).await,
            Ok(Ok(n)) if n > 0
        )
    }

    /// Complete lines (without CRLF) currently buffered, without consuming them.
    pub fn peek_lines(&self) -> Vec<String> {
        let data = self.buffered();
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(i) = data[start..].iter().position(|&b| b == b'\n') {
            let mut line = &data[start..start + i];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            out.push(String::from_utf8_lossy(line).into_owned());
            start += i + 1;
        }
        out
    }

    /// Reads one line of at most `max` octets (excluding the line ending).
    pub async fn read_line(&mut self, max: usize) -> Line {
        loop {
            let data = &self.buf[self.pos..];
            if let Some(i) = data.iter().position(|&b| b == b'\n') {
                let mut end = i;
                if end > 0 && data[end - 1] == b'\r' {
                    end -= 1;
                }
                if end > max {
                    self.consume(i + 1);
                    return Line::TooLong;
                }
                let line = data[..end].to_vec();
                self.consume(i + 1);
                return Line::Text(line);
            }
            if data.len() > max + 1 {
                let n = data.len();
                self.consume(n);
                return Line::TooLong;
            }
            match self.fill().await {
                Ok(0) | Err(_) => return Line::Eof,
                Ok(_) => {}
            }
        }
    }

    /// Reads exactly `n` bytes. `None` on EOF.
    pub async fn read_exact_bytes(&mut self, n: usize) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(n.min(64 * 1024 * 1024));
        while out.len() < n {
            if self.buffered().is_empty() {
                match self.fill().await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
            let take = (n - out.len()).min(self.buffered().len());
            out.extend_from_slice(&self.buffered()[..take]);
            self.consume(take);
        }
        Some(out)
    }

    /// Writes all bytes and flushes.
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data).await?;
        self.stream.flush().await
    }

    /// Writes all bytes without flushing (follow with [`Conn::send`] or [`Conn::flush`]).
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data).await
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.stream.flush().await
    }

    /// Best-effort orderly close (TLS close_notify, then FIN), then a short lingering drain
    /// of whatever the peer still sends, so that unread input does not turn the close into
    /// a reset that could destroy our last reply before the peer reads it.
    pub async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.stream.shutdown()).await;
        self.buf.clear();
        self.pos = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        let mut drained = 0usize;
        while drained < 4 * 1024 * 1024 {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.fill()).await {
                Ok(Ok(n)) if n > 0 => {
                    drained += n;
                    self.buf.clear();
                }
                _ => break,
            }
        }
    }
}

/// A spawned server task that is aborted (with all its connection tasks) on drop.
pub struct ServerTask(JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds 127.0.0.1:0.
pub async fn bind_loopback() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr");
    (listener, addr)
}

/// Runs an accept loop; each connection is handled in its own task owned by the loop, so
/// aborting the loop (dropping the returned [`ServerTask`]) ends every connection too.
pub fn spawn_server<F, Fut>(listener: TcpListener, handler: F) -> ServerTask
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handler = Arc::new(handler);
    ServerTask(tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        tasks.spawn(handler(stream, peer));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
    }))
}

/// What every fake mail server counts and records, with the accessors tests use (each fake
/// derefs to its `ServerStats`).
#[derive(Default)]
pub struct ServerStats {
    pub successful: AtomicUsize,
    pub failed: AtomicUsize,
    pub connections: AtomicUsize,
    pub active: AtomicUsize,
    pub violations: Mutex<Vec<String>>,
    pub before_auth: Mutex<Vec<String>>,
    pub auth_delay: Mutex<Duration>,
}

impl ServerStats {
    pub fn successful_logins(&self) -> usize {
        self.successful.load(Ordering::SeqCst)
    }

    /// Failed authentications (counted when the final failure reply is sent).
    pub fn failed_logins(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    pub fn protocol_violations(&self) -> Vec<String> {
        lock(&self.violations).clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Lines that had arrived (beyond what the SASL exchange needed) when an authentication
    /// result was about to be sent. Credentials are redacted.
    pub fn received_before_auth_result(&self) -> Vec<String> {
        lock(&self.before_auth).clone()
    }

    /// Wait this long before answering each authentication, so a test can prove that
    /// commands pipelined after the login are held back by the proxy.
    pub fn set_auth_delay(&self, d: Duration) {
        *lock(&self.auth_delay) = d;
    }

    /// Before answering an authentication: wait the configured delay while reading, then
    /// record (redacted) any lines the client has already sent after it.
    pub async fn note_pipelined(&self, conn: &mut Conn) {
        let delay = *lock(&self.auth_delay);
        if !delay.is_zero() {
            let deadline = tokio::time::Instant::now() + delay;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() || !conn.fill_within(left).await {
                    break;
                }
            }
        }
        let lines = conn.peek_lines();
        if !lines.is_empty() {
            lock(&self.before_auth).extend(lines.iter().map(|l| super::imap::redact(l)));
        }
    }

    /// Count a new connection as open until the returned guard is dropped.
    pub fn open(self: &Arc<Self>) -> ActiveGuard {
        self.connections.fetch_add(1, Ordering::SeqCst);
        self.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(self.clone())
    }
}

pub struct ActiveGuard(Arc<ServerStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

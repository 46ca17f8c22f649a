//! One stream type for every connection the proxy holds: plain TCP, or TLS as server (towards
//! clients) or as client (towards upstream). STARTTLS upgrades consume the plain stream.
//! Also the splice's moving parts: a pump per direction and the buffers it borrows.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum Stream {
    Plain(TcpStream),
    ServerTls(Box<tokio_rustls::server::TlsStream<ReadAhead>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<ReadAhead>>),
}

impl Stream {
    pub async fn accept_tls(
        tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> io::Result<Stream> {
        let tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(ReadAhead::new(tcp))
            .await?;
        Ok(Stream::ServerTls(Box::new(tls)))
    }

    pub async fn connect_tls(
        tcp: TcpStream,
        config: Arc<rustls::ClientConfig>,
        host: &str,
    ) -> io::Result<Stream> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid server name {host:?}"),
            )
        })?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, ReadAhead::new(tcp))
            .await?;
        Ok(Stream::ClientTls(Box::new(tls)))
    }

    /// Upgrade a plain stream after a STARTTLS exchange, as the server side.
    pub async fn upgrade_server(self, config: Arc<rustls::ServerConfig>) -> io::Result<Stream> {
        match self {
            Stream::Plain(tcp) => Stream::accept_tls(tcp, config).await,
            _ => Err(io::Error::other("TLS is already active")),
        }
    }

    /// Upgrade a plain stream after a STARTTLS exchange, as the client side.
    pub async fn upgrade_client(
        self,
        config: Arc<rustls::ClientConfig>,
        host: &str,
    ) -> io::Result<Stream> {
        match self {
            Stream::Plain(tcp) => Stream::connect_tls(tcp, config, host).await,
            _ => Err(io::Error::other("TLS is already active")),
        }
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ServerTls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s).poll_read(cx, buf),
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
            Stream::ServerTls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::ServerTls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::ClientTls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::ServerTls(s) => Pin::new(s).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ServerTls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ClientTls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The TCP stream under a TLS session. rustls asks for a few KiB per read, so a bulk transfer
/// would be a `recv` per record or less; this reads up to a splice buffer at once and hands it
/// out from there. The buffer is borrowed from the pool only while it holds unread bytes.
pub struct ReadAhead {
    io: TcpStream,
    buf: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
}

impl ReadAhead {
    fn new(io: TcpStream) -> ReadAhead {
        ReadAhead {
            io,
            buf: None,
            pos: 0,
            end: 0,
        }
    }

    fn release(&mut self) {
        if let Some(buf) = self.buf.take() {
            pool::give(buf);
        }
        self.pos = 0;
        self.end = 0;
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.release();
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.pos == me.end {
            if out.remaining() >= pool::BUF {
                return Pin::new(&mut me.io).poll_read(cx, out);
            }
            let buf = me.buf.get_or_insert_with(pool::take);
            let mut rb = ReadBuf::new(buf);
            let read = Pin::new(&mut me.io).poll_read(cx, &mut rb);
            let filled = rb.filled().len();
            match read {
                Poll::Ready(Ok(())) if filled > 0 => me.end = filled,
                other => {
                    me.release();
                    return other;
                }
            }
        }
        if let Some(buf) = &me.buf {
            let n = out.remaining().min(me.end - me.pos);
            out.put_slice(&buf[me.pos..me.pos + n]);
            me.pos += n;
        }
        if me.pos == me.end {
            me.release();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// One direction of a splice: reads from one stream, writes to the other, with a buffer that
/// is borrowed from a per-thread pool only while bytes are in flight, so an idle session holds
/// none and a busy one allocates nothing per read.
pub(crate) struct Pump {
    buf: Option<Box<[u8]>>,
    /// Bytes `buf[pos..end]` are read and not yet written.
    pos: usize,
    end: usize,
    /// The source ended (0-byte read) or failed; what was read before is still written.
    ended: Option<io::Result<()>>,
    /// Written since the destination was last flushed.
    unflushed: bool,
    /// Bytes written to the destination.
    pub total: u64,
}

impl Pump {
    pub(crate) fn new() -> Pump {
        Pump {
            buf: None,
            pos: 0,
            end: 0,
            ended: None,
            unflushed: false,
            total: 0,
        }
    }

    /// Copy until the source ends: `Ready(Ok)` once everything read is written and flushed
    /// (the destination is not shut down: that is the caller's policy), `Ready(Err)` on a
    /// failure of either side.
    pub(crate) fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Stream,
        dst: &mut Stream,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(buf) = &self.buf {
                while self.pos < self.end {
                    let n = ready!(Pin::new(&mut *dst).poll_write(cx, &buf[self.pos..self.end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.pos += n;
                    self.total += n as u64;
                    self.unflushed = true;
                }
            }
            if self.ended.is_some() {
                self.release();
                if self.unflushed {
                    ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                    self.unflushed = false;
                }
                return Poll::Ready(self.ended.take().unwrap_or(Ok(())));
            }
            // Gather what is available now (several TLS records, or one large socket read)
            // so the destination gets few large writes.
            let buf = self.buf.get_or_insert_with(pool::take);
            self.pos = 0;
            self.end = 0;
            while self.end < buf.len() {
                let mut rb = ReadBuf::new(&mut buf[self.end..]);
                match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                        self.ended = Some(Ok(()));
                        break;
                    }
                    Poll::Ready(Ok(())) => self.end += rb.filled().len(),
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Poll::Ready(Err(e)) => {
                        self.ended = Some(Err(e));
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if self.end == 0 && self.ended.is_none() {
                // Nothing to move: hand the buffer back and push out what the destination
                // still holds (TLS records) while waiting.
                self.release();
                if self.unflushed {
                    ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                    self.unflushed = false;
                }
                return Poll::Pending;
            }
        }
    }

    fn release(&mut self) {
        if let Some(buf) = self.buf.take() {
            pool::give(buf);
        }
        self.pos = 0;
        self.end = 0;
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.release();
    }
}

/// Splice buffers, kept per thread so taking one needs no lock.
mod pool {
    use std::cell::RefCell;

    pub(super) const BUF: usize = super::super::SPLICE_BUF;
    /// Buffers a thread keeps for reuse (at most 4 MiB); beyond that they are freed.
    const KEEP: usize = 16;

    thread_local! {
        static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn take() -> Box<[u8]> {
        FREE.with(|f| f.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUF].into_boxed_slice())
    }

    pub(super) fn give(buf: Box<[u8]>) {
        FREE.with(|f| {
            let mut free = f.borrow_mut();
            if free.len() < KEEP {
                free.push(buf);
            }
        });
    }
}

//! One stream type for every connection the proxy holds: plain TCP, or TLS as server (towards
//! clients) or as client (towards upstream). STARTTLS upgrades consume the plain stream.
//! TLS reads go through a read-ahead that borrows splice buffers from the pool.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::pool;

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

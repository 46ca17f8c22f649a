//! After authentication: the splice. Nothing is parsed; both directions run in one task.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool;
use super::stream::Stream;

/// After authentication: copy bytes both ways, nothing parsed. The server ending its side
/// ends the session (the client is closed too, so nothing holds Gmail's connection slot); the
/// client ending its side is passed on as a half-close while the server's last words still
/// reach the client. Returns (bytes to upstream, bytes to client).
///
/// Both directions run in this one task with the streams owned here (no split, no lock); each
/// direction borrows a buffer only while bytes are in flight, so idle sessions hold none.
pub async fn splice(mut client: Stream, mut upstream: Stream) -> std::io::Result<(u64, u64)> {
    let mut up = Pump::new();
    let mut down = Pump::new();
    // The client's side ended and was passed on as a half-close.
    let (mut up_done, mut up_shut) = (false, false);
    // The server's side ended (with its result), and the client is being shut down.
    let mut server_ended: Option<std::io::Result<()>> = None;
    std::future::poll_fn(|cx| {
        if server_ended.is_none() {
            match down.poll_copy(cx, &mut upstream, &mut client) {
                Poll::Ready(r) => server_ended = Some(r),
                Poll::Pending => {}
            }
        }
        if let Some(result) = &mut server_ended {
            // Close the client too; its shutdown failing changes nothing.
            let _ = std::task::ready!(std::pin::Pin::new(&mut client).poll_shutdown(cx));
            return Poll::Ready(std::mem::replace(result, Ok(())));
        }
        if !up_done {
            if let Poll::Ready(r) = up.poll_copy(cx, &mut client, &mut upstream) {
                r?;
                up_done = true;
            }
        }
        if up_done && !up_shut {
            std::task::ready!(std::pin::Pin::new(&mut upstream).poll_shutdown(cx))?;
            up_shut = true;
        }
        Poll::Pending
    })
    .await?;
    Ok((up.total, down.total))
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

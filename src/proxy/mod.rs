//! The running proxy: binds listeners, accepts connections under a global cap, hands each to
//! its protocol driver, and shuts down gracefully. `serve` takes already-bound listeners and a
//! shutdown future, so tests run the real thing on port 0.

mod imap;
pub mod login;
mod pop3;
mod session;
mod smtp;
pub mod stream;
pub mod throttle;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accounts::Accounts;
use crate::config::{Config, ListenerConfig, LocalTls, Protocol};
use crate::oauth::TokenManager;
use crate::store::Store;

/// Everything shared by all connections.
pub struct App {
    pub config: Config,
    pub accounts: Arc<Accounts>,
    pub tokens: TokenManager,
    pub throttle: throttle::Throttle,
    /// Per account, the upstream IMAP sessions it may still open.
    imap_slots: std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl App {
    pub fn new(config: Config) -> Result<Arc<App>, String> {
        let store = Store::open(&config.state_dir, &config.store).map_err(|e| e.to_string())?;
        let accounts = Arc::new(Accounts::new(&config, store).map_err(|e| e.to_string())?);
        let tokens = TokenManager::new(&config, accounts.clone())?;
        Ok(Arc::new(App {
            config,
            accounts,
            tokens,
            throttle: Default::default(),
            imap_slots: Default::default(),
        }))
    }

    /// Reserve one of `email`'s upstream IMAP sessions, if it has one left.
    pub fn imap_slot(&self, email: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let limit = self.config.limits.imap_connections_per_account;
        let slots = self
            .imap_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(crate::config::normalize_email(email))
            .or_insert_with(|| Arc::new(Semaphore::new(limit)))
            .clone();
        slots.try_acquire_owned().ok()
    }
}

/// One listener's settings and TLS material, shared by its connections.
pub struct ListenerCtx {
    pub config: ListenerConfig,
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    pub upstream_tls: Arc<rustls::ClientConfig>,
    pub upstream_capabilities: KnownCapabilities,
}

/// What the listener's upstream offered at its last login (SMTP EHLO extensions, POP3 CAPA
/// lines), so that answers before login promise what holds without connecting for strangers.
#[derive(Default)]
pub struct KnownCapabilities(std::sync::Mutex<Option<Arc<[String]>>>);

impl KnownCapabilities {
    pub fn get(&self) -> Option<Arc<[String]>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, lines: Vec<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(lines.into());
    }
}

pub struct BoundListener {
    ctx: Arc<ListenerCtx>,
    tcp: TcpListener,
}

impl BoundListener {
    pub fn local_addr(&self) -> SocketAddr {
        self.tcp.local_addr().unwrap_or(self.ctx.config.bind)
    }

    pub fn protocol(&self) -> Protocol {
        self.ctx.config.protocol
    }
}

/// Bind every configured listener, or fail with a one-line reason naming the listener.
pub async fn bind(config: &Config) -> Result<Vec<BoundListener>, String> {
    let server_tls = match &config.tls {
        Some(t)
            if config
                .listeners
                .iter()
                .any(|l| l.local_tls != LocalTls::None) =>
        {
            Some(crate::tls::server_config(&t.cert, &t.key)?)
        }
        _ => None,
    };
    let mut out = Vec::new();
    for l in &config.listeners {
        let upstream_tls = crate::tls::client_config(l.upstream_ca.as_deref())
            .map_err(|e| format!("{} listener on {}: {e}", l.protocol.name(), l.bind))?;
        let tcp = listen(l.bind).map_err(|e| {
            format!(
                "{} listener: cannot bind {}: {e}",
                l.protocol.name(),
                l.bind
            )
        })?;
        out.push(BoundListener {
            ctx: Arc::new(ListenerCtx {
                config: l.clone(),
                server_tls: server_tls.clone(),
                upstream_tls,
                upstream_capabilities: KnownCapabilities::default(),
            }),
            tcp,
        });
    }
    Ok(out)
}

/// A listening socket whose accept queue holds a burst of clients (the standard library's
/// 128 would silently drop the rest of a thousand arriving at once; the kernel caps this at
/// `net.core.somaxconn`).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

const LISTEN_BACKLOG: u32 = 4096;

/// Raise the soft limit on open descriptors to the hard limit: each proxied session holds two
/// sockets, and the usual soft default of 1024 would cap the proxy at about 500 sessions.
/// Returns the limit in force.
pub fn raise_fd_limit() -> std::io::Result<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim = raised;
        }
    }
    Ok(lim.rlim_cur)
}

/// Run until `shutdown` resolves, then stop accepting, give open sessions the grace period,
/// and return.
pub async fn serve(
    app: Arc<App>,
    listeners: Vec<BoundListener>,
    shutdown: impl Future<Output = ()>,
) {
    match raise_fd_limit() {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    let cancel = CancellationToken::new();
    app.tokens.spawn_refresher(cancel.clone());
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(app.config.limits.max_connections));
    for l in listeners {
        tracing::info!(
            protocol = l.protocol().name(),
            bind = %l.local_addr(),
            upstream = %l.ctx.config.upstream(),
            "listening"
        );
        tracker.spawn(accept_loop(
            app.clone(),
            l,
            cancel.clone(),
            tracker.clone(),
            permits.clone(),
        ));
    }
    shutdown.await;
    cancel.cancel();
    tracker.close();
    let grace = app.config.limits.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new connections"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::info!(
            open = tracker.len(),
            "grace period over; closing remaining sessions"
        );
    }
}

async fn accept_loop(
    app: Arc<App>,
    listener: BoundListener,
    cancel: CancellationToken,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.tcp.accept() => r,
            _ = cancel.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tune(&tcp);
        let ctx = listener.ctx.clone();
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let app = app.clone();
                let cancel = cancel.clone();
                tracker.spawn(async move {
                    handle(app, ctx, tcp, peer, cancel).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tracing::warn!(%peer, "connection limit reached; refusing connection");
                tracker.spawn(refuse_busy(ctx.config.protocol, tcp));
            }
        }
    }
}

async fn handle(
    app: Arc<App>,
    ctx: Arc<ListenerCtx>,
    tcp: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let conn = Conn { app, ctx, peer };
    match conn.ctx.config.protocol {
        Protocol::Imap => session::run(imap::Imap, conn, tcp, cancel).await,
        Protocol::Smtp => session::run(smtp::Smtp, conn, tcp, cancel).await,
        Protocol::Pop3 => session::run(pop3::Pop3, conn, tcp, cancel).await,
    }
}

async fn refuse_busy(protocol: Protocol, mut tcp: TcpStream) {
    let line: &[u8] = match protocol {
        Protocol::Imap => {
            b"* BYE [UNAVAILABLE] Too many connections to xoauth2-proxy, try again later\r\n"
        }
        Protocol::Smtp => b"421 4.7.0 Too many connections to xoauth2-proxy, try again later\r\n",
        Protocol::Pop3 => {
            b"-ERR [SYS/TEMP] Too many connections to xoauth2-proxy, try again later\r\n"
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), tcp.write_all(line)).await;
}

/// Every proxied socket: no Nagle delay on small protocol lines, and TCP keepalive so a peer
/// that vanished without closing (laptop lid, NAT timeout) does not hold a session forever
/// while idle IMAP sessions (IDLE) are never cut by the proxy itself.
pub(crate) fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(300))
        .with_interval(Duration::from_secs(60))
        .with_retries(5);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}

/// One client connection's context.
pub struct Conn {
    pub app: Arc<App>,
    pub ctx: Arc<ListenerCtx>,
    pub peer: SocketAddr,
}

/// After authentication: copy bytes both ways, nothing parsed. The server ending its side
/// ends the session (the client is closed too, so nothing holds Gmail's connection slot); the
/// client ending its side is passed on as a half-close while the server's last words still
/// reach the client. Returns (bytes to upstream, bytes to client).
///
/// Both directions run in this one task with the streams owned here (no split, no lock); each
/// direction borrows a buffer only while bytes are in flight, so idle sessions hold none.
pub async fn splice(
    mut client: stream::Stream,
    mut upstream: stream::Stream,
) -> std::io::Result<(u64, u64)> {
    use std::task::Poll;
    use tokio::io::AsyncWrite;
    let mut up = stream::Pump::new();
    let mut down = stream::Pump::new();
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

/// Bytes one splice direction moves per batch (see `stream::Pump`), and the size of a TLS
/// read-ahead. Large batches mean few syscalls and few wake-ups: going from 16 KiB to 256 KiB
/// took the proxy's CPU per GB spliced down by about a third. Buffers are held only while bytes
/// are in flight.
const SPLICE_BUF: usize = 256 * 1024;

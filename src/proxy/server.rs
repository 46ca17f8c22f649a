//! The listening side: binds listeners, accepts connections under a global cap, hands each to
//! its protocol driver, and shuts down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{imap, pop3, session, smtp, App, Conn, KnownCapabilities, ListenerCtx};
use crate::config::{Config, ListenerConfig, LocalTls, Protocol};

pub struct BoundListener {
    pub(super) ctx: Arc<ListenerCtx>,
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
    let server_tls = server_tls(config)?;
    config
        .listeners
        .iter()
        .map(|l| bind_one(l, server_tls.clone()))
        .collect()
}

/// The certificate for local TLS, when any listener needs it (read afresh at each reload, so
/// a renewed certificate is picked up by SIGHUP).
pub(crate) fn server_tls(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    match &config.tls {
        Some(t)
            if config
                .listeners
                .iter()
                .any(|l| l.local_tls != LocalTls::None) =>
        {
            Ok(Some(crate::tls::server_config(&t.cert, &t.key)?))
        }
        _ => Ok(None),
    }
}

/// A listener's context: its settings and TLS material.
pub(crate) fn context(
    l: &ListenerConfig,
    server_tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<ListenerCtx, String> {
    let upstream_tls = crate::tls::client_config(l.upstream_ca.as_deref())
        .map_err(|e| format!("{} listener on {}: {e}", l.protocol.name(), l.bind))?;
    Ok(ListenerCtx {
        config: l.clone(),
        server_tls,
        upstream_tls,
        upstream_capabilities: KnownCapabilities::default(),
    })
}

pub(crate) fn bind_one(
    l: &ListenerConfig,
    server_tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<BoundListener, String> {
    let ctx = context(l, server_tls)?;
    let tcp = listen(l.bind).map_err(|e| {
        format!(
            "{} listener: cannot bind {}: {e}",
            l.protocol.name(),
            l.bind
        )
    })?;
    Ok(BoundListener {
        ctx: Arc::new(ctx),
        tcp,
    })
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
    let server = Server::start(app, listeners);
    shutdown.await;
    server.stop().await;
}

/// The running proxy: the current generation of settings ([`App`]) and the listeners. A
/// config reload swaps both; a connection keeps the generation it was accepted under.
pub struct Server {
    pub(super) app: RwLock<Arc<App>>,
    pub(super) listeners: tokio::sync::Mutex<Vec<Listening>>,
    /// The listeners' protocols and bound addresses, for readers that must not wait.
    pub(super) bound: RwLock<Vec<(Protocol, SocketAddr)>>,
    /// Shutdown of everything; each listener and token refresher has a child token.
    pub(super) cancel: CancellationToken,
    pub(super) refresher: Mutex<CancellationToken>,
    pub(super) tracker: TaskTracker,
    /// The global connection cap, resized by reloads.
    pub(super) permits: Arc<Semaphore>,
    pub(super) capacity: Arc<Mutex<Capacity>>,
}

/// How many permits the connection cap has, and the wait for permits to retire after it
/// shrank below the connections open.
pub(super) struct Capacity {
    pub(super) permits: usize,
    pub(super) shrinking: CancellationToken,
}

/// One listener's accept loop.
pub(super) struct Listening {
    /// As configured (a port 0 stays 0): what a reloaded config is matched against.
    pub(super) config: ListenerConfig,
    pub(super) addr: SocketAddr,
    pub(super) ctx: Arc<RwLock<Arc<ListenerCtx>>>,
    pub(super) stop: CancellationToken,
    pub(super) task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Start accepting on `listeners` and refreshing tokens.
    pub fn start(app: Arc<App>, listeners: Vec<BoundListener>) -> Arc<Server> {
        match raise_fd_limit() {
            Ok(limit) => tracing::debug!(limit, "open file limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
        }
        let cancel = CancellationToken::new();
        let refresher = cancel.child_token();
        app.tokens.spawn_refresher(refresher.clone());
        if let Some(peers) = app.registry.store().peers() {
            // Until the process ends: its sessions' leases lapse only when it is gone.
            tokio::spawn(peers.clone().renew_leases_forever());
        }
        let max = app.config.limits.max_connections;
        let server = Arc::new(Server {
            app: RwLock::new(app),
            listeners: Default::default(),
            bound: Default::default(),
            cancel,
            refresher: Mutex::new(refresher),
            tracker: TaskTracker::new(),
            permits: Arc::new(Semaphore::new(max)),
            capacity: Arc::new(Mutex::new(Capacity {
                permits: max,
                shrinking: CancellationToken::new(),
            })),
        });
        let running: Vec<_> = listeners.into_iter().map(|l| server.run(l)).collect();
        server.publish(&running);
        if let Ok(mut slot) = server.listeners.try_lock() {
            *slot = running;
        }
        server
    }

    /// The settings new connections get.
    pub fn app(&self) -> Arc<App> {
        read(&self.app).clone()
    }

    /// The listeners accepting now, as (protocol, bound address).
    pub fn listening(&self) -> Vec<(Protocol, SocketAddr)> {
        read(&self.bound).clone()
    }

    pub(super) fn publish(&self, running: &[Listening]) {
        *write(&self.bound) = running
            .iter()
            .map(|l| (l.config.protocol, l.addr))
            .collect();
    }

    /// Stop accepting, give open sessions the grace period of the current config, return.
    pub async fn stop(&self) {
        self.cancel.cancel();
        for l in self.listeners.lock().await.drain(..) {
            let _ = l.task.await;
        }
        self.tracker.close();
        let grace = self.app().config.limits.shutdown_grace;
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: no new connections"
        );
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = self.tracker.len(),
                "grace period over; closing remaining sessions"
            );
        }
    }

    pub(super) fn run(self: &Arc<Self>, l: BoundListener) -> Listening {
        let addr = l.local_addr();
        tracing::info!(
            protocol = l.protocol().name(),
            bind = %addr,
            upstream = %l.ctx.config.upstream(),
            "listening"
        );
        let ctx = Arc::new(RwLock::new(l.ctx.clone()));
        let stop = self.cancel.child_token();
        let task = self
            .tracker
            .spawn(self.clone().accept_loop(l.tcp, ctx.clone(), stop.clone()));
        Listening {
            config: l.ctx.config.clone(),
            addr,
            ctx,
            stop,
            task,
        }
    }

    async fn accept_loop(
        self: Arc<Self>,
        tcp: TcpListener,
        ctx: Arc<RwLock<Arc<ListenerCtx>>>,
        stop: CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                r = tcp.accept() => r,
                _ = stop.cancelled() => return,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            tune(&stream);
            let ctx = read(&ctx).clone();
            self.admit(ctx, stream, peer);
        }
    }

    /// A new connection, under the global cap, with the current settings.
    fn admit(&self, ctx: Arc<ListenerCtx>, tcp: TcpStream, peer: SocketAddr) {
        let protocol = ctx.config.protocol;
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; refusing connection");
            crate::metrics::connection_refused(protocol, "connection_limit");
            self.tracker.spawn(refuse_busy(protocol, tcp));
            return;
        };
        let app = self.app();
        let cancel = self.cancel.clone();
        let active = crate::metrics::connection_opened(protocol);
        self.tracker.spawn(async move {
            let _active = active;
            handle(app, ctx, tcp, peer, cancel).await;
            drop(permit);
        });
    }
}

pub(super) fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

async fn handle(
    app: Arc<App>,
    ctx: Arc<ListenerCtx>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let peer = match super::origin::client_address(&ctx.config, &mut tcp, peer).await {
        Ok(client) => client,
        Err(why) => {
            tracing::warn!(listener = %ctx.config.bind, "connection refused: {why}");
            crate::metrics::connection_refused(ctx.config.protocol, "proxy_header");
            return;
        }
    };
    let conn = Conn { app, ctx, peer };
    match conn.ctx.config.protocol {
        Protocol::Imap => session::run(imap::Imap, conn, tcp, cancel).await,
        Protocol::Smtp => session::run(smtp::Smtp, conn, tcp, cancel).await,
        Protocol::Pop3 => session::run(pop3::Pop3, conn, tcp, cancel).await,
    }
}

pub(crate) async fn refuse_busy(protocol: Protocol, mut tcp: TcpStream) {
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

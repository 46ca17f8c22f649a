//! The listening side: binds listeners, accepts connections under a global cap, hands each to
//! its protocol driver, and shuts down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{imap, pop3, session, smtp, App, Conn, KnownCapabilities, ListenerCtx};
use crate::config::{Config, LocalTls, Protocol};

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
    if let Some(peers) = app.registry.store().peers() {
        // Until the process ends: its sessions' leases lapse only when it is gone.
        tokio::spawn(peers.clone().renew_leases_forever());
    }
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
                let active = crate::metrics::connection_opened(ctx.config.protocol);
                tracker.spawn(async move {
                    let _active = active;
                    handle(app, ctx, tcp, peer, cancel).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tracing::warn!(%peer, "connection limit reached; refusing connection");
                crate::metrics::connection_refused(ctx.config.protocol, "connection_limit");
                tracker.spawn(refuse_busy(ctx.config.protocol, tcp));
            }
        }
    }
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

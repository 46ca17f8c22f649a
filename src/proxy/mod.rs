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
        let tcp = TcpListener::bind(l.bind).await.map_err(|e| {
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
            }),
            tcp,
        });
    }
    Ok(out)
}

/// Run until `shutdown` resolves, then stop accepting, give open sessions the grace period,
/// and return.
pub async fn serve(
    app: Arc<App>,
    listeners: Vec<BoundListener>,
    shutdown: impl Future<Output = ()>,
) {
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
        Protocol::Smtp => session::run(smtp::Smtp::default(), conn, tcp, cancel).await,
        Protocol::Pop3 => session::run(pop3::Pop3::default(), conn, tcp, cancel).await,
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
pub async fn splice(
    client: stream::Stream,
    upstream: stream::Stream,
) -> std::io::Result<(u64, u64)> {
    use tokio::io::{AsyncWriteExt, BufReader};
    let (client_read, mut client_write) = tokio::io::split(client);
    let (upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let mut client_read = BufReader::with_capacity(SPLICE_BUF, client_read);
    let mut upstream_read = BufReader::with_capacity(SPLICE_BUF, upstream_read);
    let to_upstream = async {
        let n = tokio::io::copy_buf(&mut client_read, &mut upstream_write).await?;
        upstream_write.shutdown().await?;
        Ok::<u64, std::io::Error>(n)
    };
    let to_client = async {
        let n = tokio::io::copy_buf(&mut upstream_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        n
    };
    tokio::pin!(to_upstream, to_client);
    tokio::select! {
        down = &mut to_client => Ok((0, down?)),
        up = &mut to_upstream => {
            let up = up?;
            let down = to_client.await?;
            Ok((up, down))
        }
    }
}

const SPLICE_BUF: usize = 16 * 1024;

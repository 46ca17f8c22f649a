//! The running proxy: binds listeners, accepts connections under a global cap, hands each to
//! its protocol driver, and shuts down gracefully. `serve` takes already-bound listeners and a
//! shutdown future, so tests run the real thing on port 0.

mod imap;
pub mod login;
mod pop3;
mod smtp;
pub mod stream;
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
        }))
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
        let _ = tcp.set_nodelay(true);
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
        Protocol::Imap => imap::handle(conn, tcp, cancel).await,
        Protocol::Smtp => smtp::handle(conn, tcp, cancel).await,
        Protocol::Pop3 => pop3::handle(conn, tcp, cancel).await,
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

/// One client connection's context.
pub struct Conn {
    pub app: Arc<App>,
    pub ctx: Arc<ListenerCtx>,
    pub peer: SocketAddr,
}

/// After authentication: copy bytes both ways until both sides are done, nothing parsed.
pub async fn splice(
    mut client: stream::Stream,
    mut upstream: stream::Stream,
) -> std::io::Result<(u64, u64)> {
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, SPLICE_BUF, SPLICE_BUF)
        .await
}

const SPLICE_BUF: usize = 16 * 1024;

/// The client connection as the listener wants it: implicit TLS accepted, or plain.
async fn open_client(
    conn: &Conn,
    tcp: TcpStream,
    deadline: tokio::time::Instant,
) -> Option<stream::Stream> {
    if conn.ctx.config.local_tls != LocalTls::Implicit {
        return Some(stream::Stream::Plain(tcp));
    }
    let tls = conn.ctx.server_tls.clone()?;
    match tokio::time::timeout_at(deadline, stream::Stream::accept_tls(tcp, tls)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(peer = %conn.peer, error = %e, "TLS handshake with client failed");
            None
        }
        Err(_) => None,
    }
}

/// Upgrade the client connection after a local STARTTLS/STLS go-ahead.
async fn upgrade_client(
    conn: &Conn,
    client: stream::Stream,
    deadline: tokio::time::Instant,
) -> Option<stream::Stream> {
    let tls = conn.ctx.server_tls.clone()?;
    match tokio::time::timeout_at(deadline, client.upgrade_server(tls)).await {
        Ok(Ok(s)) => Some(s),
        _ => {
            tracing::debug!(peer = %conn.peer, "STARTTLS handshake with client failed");
            None
        }
    }
}

/// What waiting for the client produced.
enum ClientRead {
    Data(usize),
    Closed,
    TimedOut,
    Shutdown,
}

async fn read_client(
    client: &mut stream::Stream,
    buf: &mut [u8],
    deadline: tokio::time::Instant,
    cancel: &CancellationToken,
) -> ClientRead {
    use tokio::io::AsyncReadExt;
    tokio::select! {
        r = tokio::time::timeout_at(deadline, client.read(buf)) => match r {
            Ok(Ok(0)) | Ok(Err(_)) => ClientRead::Closed,
            Ok(Ok(n)) => ClientRead::Data(n),
            Err(_) => ClientRead::TimedOut,
        },
        _ = cancel.cancelled() => ClientRead::Shutdown,
    }
}

/// Logged in: give the client upstream's answer, forward what the client pipelined after its
/// login, then splice until both sides are done.
async fn complete(
    conn: &Conn,
    email: &str,
    mut client: stream::Stream,
    mut up: upstream::Upstream,
    pending: Vec<u8>,
) {
    let peer = conn.peer;
    tracing::info!(account = %email, %peer, protocol = conn.ctx.config.protocol.name(), "logged in");
    if client.write_all(&up.relay).await.is_err()
        || client.write_all(&up.leftover).await.is_err()
        || up.stream.write_all(&pending).await.is_err()
    {
        return;
    }
    drop(pending);
    match splice(client, up.stream).await {
        Ok((to_up, to_client)) => {
            tracing::debug!(account = %email, %peer, to_up, to_client, "session ended")
        }
        Err(e) => {
            tracing::debug!(account = %email, %peer, error = %e, "session ended with an error")
        }
    }
}

//! Who may use the admin listener. On loopback without a password: anyone on this machine,
//! with requests addressed to a loopback name only (so a web page elsewhere can't reach it by
//! pointing its own DNS name at 127.0.0.1). With `[admin] password_hash`: HTTPS with the
//! `[tls]` certificate and Basic auth, checked with Argon2 on the mail logins' workers and
//! slowed by the same brute-force throttle; the names in `[admin] hosts` are accepted too.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::proxy::stream::Stream;
use crate::proxy::throttle::Throttle;
use crate::secret::Secret;
use crate::store::password::Checker;

/// A TLS handshake that takes longer is dropped: a stranger controls its pace.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; more connections wait in the kernel's queue.
const MAX_HANDSHAKES: usize = 64;
/// What the throttle counts failed admin logins against, besides the source address (not
/// an email address, so never an account's key).
const THROTTLE_KEY: &str = "admin login";

/// The admin listener's connections: plain, or TLS handshakes done off the accept path.
pub enum Incoming {
    Plain(TcpListener),
    Tls {
        done: mpsc::Receiver<(Stream, SocketAddr)>,
        addr: SocketAddr,
    },
}

impl Incoming {
    pub fn new(tcp: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> Incoming {
        let Some(tls) = tls else {
            return Incoming::Plain(tcp);
        };
        let addr = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, done) = mpsc::channel(MAX_HANDSHAKES);
        tokio::spawn(handshakes(tcp, tls, tx));
        Incoming::Tls { done, addr }
    }
}

async fn handshakes(
    tcp: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    done: mpsc::Sender<(Stream, SocketAddr)>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = done.closed() => return,
        };
        let (tls, done) = (tls.clone(), done.clone());
        tokio::spawn(async move {
            let shaken = tokio::time::timeout(HANDSHAKE_TIMEOUT, Stream::accept_tls(stream, tls));
            if let Ok(Ok(stream)) = shaken.await {
                let _ = done.send((stream, peer)).await;
            }
            drop(slot);
        });
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Stream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Stream, SocketAddr) {
        match self {
            Incoming::Plain(tcp) => loop {
                match TcpListener::accept(tcp).await {
                    Ok((stream, peer)) => return (Stream::Plain(stream), peer),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            },
            Incoming::Tls { done, .. } => match done.recv().await {
                Some(accepted) => accepted,
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Incoming::Plain(tcp) => tcp.local_addr(),
            Incoming::Tls { addr, .. } => Ok(*addr),
        }
    }
}

/// The client's address, for the throttle.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Incoming>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Incoming>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// Host names a request may be addressed to: loopback names, the bind address, `hosts`.
pub fn host_allowed(host: &str, bind: SocketAddr, hosts: &[String]) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let ip = name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .ok();
    name.eq_ignore_ascii_case("localhost")
        || ip.is_some_and(|ip| ip.is_loopback() || ip == bind.ip())
        || hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Refuse requests addressed to a name this listener doesn't answer to (DNS rebinding).
pub async fn check_host(
    State(allowed): State<Arc<(SocketAddr, Vec<String>)>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_allowed(host, allowed.0, &allowed.1) {
        let text = "use a loopback address or a name in [admin] hosts\n";
        return (StatusCode::MISDIRECTED_REQUEST, text).into_response();
    }
    next.run(request).await
}

/// The admin password check: its hash, the Argon2 workers and the throttle mail logins use,
/// and the last accepted `Authorization` header (as a keyed digest), so that a browser's
/// repeated requests cost one Argon2 run, not one each.
pub struct Login {
    pub hash: Secret,
    pub checker: Arc<Checker>,
    pub throttle: Arc<Throttle>,
    cache_key: [u8; 32],
    accepted: Mutex<Option<[u8; 32]>>,
}

impl Login {
    pub fn new(hash: Secret, checker: Arc<Checker>, throttle: Arc<Throttle>) -> Login {
        Login {
            hash,
            checker,
            throttle,
            cache_key: rand::random(),
            accepted: Mutex::new(None),
        }
    }

    fn digest(&self, authorization: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.cache_key);
        h.update(authorization);
        h.finalize().into()
    }

    /// Whether the request's `Authorization: Basic` carries the admin password (any user).
    async fn admits(&self, authorization: &[u8], peer: SocketAddr) -> bool {
        use subtle::ConstantTimeEq;
        let digest = self.digest(authorization);
        let known = *self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        if known.is_some_and(|k| bool::from(k.ct_eq(&digest))) {
            return true;
        }
        let Some(password) = basic_password(authorization) else {
            return false;
        };
        let ok = self
            .checker
            .verify(&password, self.hash.expose())
            .await
            .unwrap_or(false);
        if ok {
            self.throttle.succeeded(peer.ip());
            *self.accepted.lock().unwrap_or_else(|e| e.into_inner()) = Some(digest);
        } else {
            tracing::info!(%peer, "admin login refused: wrong password");
            self.throttle
                .failed(peer.ip(), Some(THROTTLE_KEY), None)
                .await;
        }
        ok
    }
}

/// The password of `Basic base64(user:password)`; the user is not checked.
fn basic_password(authorization: &[u8]) -> Option<Secret> {
    use base64::Engine as _;
    let text = std::str::from_utf8(authorization).ok()?;
    let (scheme, encoded) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") || encoded.len() > 1024 {
        return None;
    }
    let decoded = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?,
    );
    let text = std::str::from_utf8(&decoded).ok()?;
    let (_, password) = text.split_once(':')?;
    Some(Secret::new(password.to_string()))
}

/// With a password configured, every route but `/livez` needs it.
pub async fn require_login(
    State(login): State<Option<Arc<Login>>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    let Some(login) = login else {
        return next.run(request).await;
    };
    if request.uri().path() == "/livez" {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec());
    match authorization {
        Some(a) if login.admits(&a, peer).await => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Basic realm=\"xoauth2-proxy admin\", charset=\"UTF-8\"",
            )],
            "the admin password is required\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_loopback_names_the_bind_address_and_the_configured_names() {
        let bind: SocketAddr = "192.0.2.7:8025".parse().unwrap();
        let hosts = vec!["proxy.example.com".to_string()];
        for ok in [
            "localhost:8025",
            "127.0.0.1:8025",
            "[::1]:8025",
            "192.0.2.7:8025",
            "Proxy.Example.com",
            "proxy.example.com:8025",
        ] {
            assert!(host_allowed(ok, bind, &hosts), "{ok}");
        }
        for bad in [
            "attacker.example:8025",
            "192.0.2.8",
            "",
            "proxy.example.com.evil",
        ] {
            assert!(!host_allowed(bad, bind, &hosts), "{bad}");
        }
    }

    #[test]
    fn basic_credentials_give_the_password_and_nothing_malformed_does() {
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD.encode("admin:pa:ss");
        let password = basic_password(format!("Basic {encoded}").as_bytes()).unwrap();
        assert_eq!(password.expose(), "pa:ss");
        for bad in ["Bearer abc", "Basic !!!", "Basic", "Basic YWRtaW4="] {
            assert!(basic_password(bad.as_bytes()).is_none(), "{bad}");
        }
    }
}

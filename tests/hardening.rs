//! Faults and hostile input, end to end: a misbehaving token endpoint or upstream gives the
//! client a clear temporary failure and never a hang; hostile clients are bounded and timed
//! out; password guessing is slowed and never reaches Google or Gmail; connection limits hold.

mod harness;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{config_text_with_limits, ListenerSpec, Proxy, TEST_LIMITS};
use support::{FakeGoogle, FakeImap, TestClient, TestPki, UpstreamTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const ALICE: &str = "alice@gmail.com";

/// What a scripted server does with each connection.
#[derive(Clone, Copy)]
enum Script {
    /// Token endpoint: answer every request with this raw HTTP response.
    Http(&'static str),
    /// Read, never answer.
    Hang,
    /// Reset the connection at once.
    Reset,
    /// TLS handshake, then the given bytes, then reset.
    TlsThenReset(&'static [u8]),
    /// TLS handshake, then nothing at all.
    TlsStall,
    /// TLS handshake, then an endless line.
    TlsEndless,
}

struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn scripted(script: Script, tls: Option<Arc<rustls::ServerConfig>>) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let tls = tls.clone();
            tokio::spawn(async move {
                match script {
                    Script::Http(response) => loop {
                        let mut buf = vec![0u8; 65536];
                        let mut got = Vec::new();
                        // Read one request: head, then Content-Length bytes.
                        let done = loop {
                            let Ok(n) = tcp.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            got.extend_from_slice(&buf[..n]);
                            if let Some(head_end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head =
                                    String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
                                let len: usize = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .and_then(|v| v.trim().parse().ok())
                                    .unwrap_or(0);
                                if got.len() >= head_end + 4 + len {
                                    break true;
                                }
                            }
                        };
                        if done && tcp.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    },
                    Script::Hang => {
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = tcp.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                        }
                    }
                    Script::Reset => {
                        let _ = tcp.set_zero_linger();
                    }
                    Script::TlsThenReset(bytes) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.unwrap());
                        let Ok(mut s) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let _ = s.write_all(bytes).await;
                        let _ = s.flush().await;
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf).await;
                        let (tcp, _) = s.into_inner();
                        let _ = tcp.set_zero_linger();
                    }
                    Script::TlsStall => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.unwrap());
                        let Ok(mut s) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                        }
                    }
                    Script::TlsEndless => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.unwrap());
                        let Ok(mut s) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let chunk = vec![b'a'; 16384];
                        for _ in 0..4096 {
                            if s.write_all(&chunk).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Scripted {
        addr,
        connections,
        task,
    }
}

/// Connect, read the greeting, LOGIN; the tagged (or first) reply line and how long it took.
async fn login(addr: SocketAddr, password: &str) -> (String, Duration) {
    let mut c = TestClient::connect(addr).await;
    c.timeout = Duration::from_secs(40);
    c.read_line().await;
    let start = Instant::now();
    c.send_line(&format!("a1 LOGIN {ALICE} {password}")).await;
    let (line, _) = c.read_imap_tagged("a1").await;
    (line, start.elapsed())
}

/// A proxy whose token endpoint is `token_url`, in front of `upstream`.
async fn proxy_with_token_url(
    pki: &TestPki,
    google: &FakeGoogle,
    upstream: SocketAddr,
    token_url: &str,
) -> Proxy {
    let text = config_text_with_limits(
        google,
        pki,
        &[ListenerSpec::new("imap", upstream)],
        &[ALICE],
        TEST_LIMITS,
    )
    .replace(&google.token_url, token_url);
    Proxy::start_with_config(&text).await
}

#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_faults_are_temporary_failures_without_hammering() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let cases: Vec<(&str, Script)> = vec![
        ("HTTP 500", Script::Http("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\noops!")),
        ("HTTP 429 with Retry-After", Script::Http("HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\nContent-Length: 2\r\n\r\n{}")),
        ("garbage", Script::Http("this is not HTTP at all\r\n\r\n")),
        ("200 with garbage body", Script::Http("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n<html>!!!")),
        ("reset", Script::Reset),
    ];
    for (what, script) in cases {
        let endpoint = scripted(script, None).await;
        let url = format!("http://{}/token", endpoint.addr);
        let proxy = proxy_with_token_url(&pki, &google, imap.addr, &url).await;
        let pw = proxy.authorize(&google, ALICE);
        let (line, _) = login(proxy.addrs[0], &pw).await;
        assert!(line.starts_with("a1 NO [UNAVAILABLE]"), "{what}: {line}");
        assert!(
            !line.contains("GOCSPX") && !line.contains("1//"),
            "{what}: {line}"
        );
        if what.starts_with("HTTP 429") {
            // Retry-After is honoured: the next login does not ask again.
            let before = endpoint.connections.load(Ordering::SeqCst);
            let (line, _) = login(proxy.addrs[0], &pw).await;
            assert!(line.starts_with("a1 NO [UNAVAILABLE]"), "{line}");
            assert_eq!(
                endpoint.connections.load(Ordering::SeqCst),
                before,
                "no request within Retry-After"
            );
        }
    }
    // Unreachable: nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy =
        proxy_with_token_url(&pki, &google, imap.addr, &format!("http://{dead}/token")).await;
    let pw = proxy.authorize(&google, ALICE);
    let (line, _) = login(proxy.addrs[0], &pw).await;
    assert!(line.starts_with("a1 NO [UNAVAILABLE]"), "{line}");
    assert_eq!(imap.connections(), 0, "no upstream attempt without a token");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_that_never_answers_times_out() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let endpoint = scripted(Script::Hang, None).await;
    let proxy = proxy_with_token_url(
        &pki,
        &google,
        imap.addr,
        &format!("http://{}/token", endpoint.addr),
    )
    .await;
    let pw = proxy.authorize(&google, ALICE);
    let (line, took) = login(proxy.addrs[0], &pw).await;
    assert!(line.starts_with("a1 NO [UNAVAILABLE]"), "{line}");
    assert!(took < Duration::from_secs(35), "bounded wait: {took:?}");
}

/// A proxy with a working token endpoint in front of a scripted upstream.
async fn proxy_before(
    upstream: SocketAddr,
    google: &FakeGoogle,
    pki: &TestPki,
    limits: &str,
) -> (Proxy, String) {
    let proxy = Proxy::start_with_limits(
        google,
        pki,
        &[ListenerSpec::new("imap", upstream)],
        &[ALICE],
        limits,
    )
    .await;
    let pw = proxy.authorize(google, ALICE);
    (proxy, pw)
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_faults_are_temporary_failures_and_never_hang() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let limits = "upstream_timeout_secs = 2\npreauth_timeout_secs = 30\nshutdown_grace_secs = 1\n";
    let cases: Vec<(&str, Script)> = vec![
        ("reset before TLS", Script::Reset),
        (
            "reset during greeting",
            Script::TlsThenReset(b"* OK Gimap re"),
        ),
        (
            "reset during authentication",
            Script::TlsThenReset(b"* OK Gimap ready\r\n"),
        ),
        ("stalled greeting", Script::TlsStall),
        ("endless line", Script::TlsEndless),
    ];
    for (what, script) in cases {
        let up = scripted(script, Some(pki.server_config())).await;
        let (proxy, pw) = proxy_before(up.addr, &google, &pki, limits).await;
        let (line, took) = login(proxy.addrs[0], &pw).await;
        assert!(line.starts_with("a1 NO [UNAVAILABLE]"), "{what}: {line}");
        assert!(took < Duration::from_secs(10), "{what}: took {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_certificate_that_does_not_verify_is_refused() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let stranger = TestPki::new();
    let imap = FakeImap::start(&google, &stranger, UpstreamTls::Implicit).await;
    // The proxy trusts `pki`'s CA only; the server's certificate is from another CA.
    let (proxy, pw) = proxy_before(imap.addr, &google, &pki, TEST_LIMITS).await;
    let (line, _) = login(proxy.addrs[0], &pw).await;
    assert!(line.starts_with("a1 NO [UNAVAILABLE]"), "{line}");
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    assert_eq!(
        imap.successful_logins() + imap.failed_logins(),
        0,
        "no login over an unverified connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_reset_mid_session_closes_the_client_promptly() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let (proxy, pw) = proxy_before(imap.addr, &google, &pki, TEST_LIMITS).await;
    let mut c = TestClient::connect(proxy.addrs[0]).await;
    c.read_line().await;
    c.send_line(&format!("a1 LOGIN {ALICE} {pw}")).await;
    assert!(c.read_imap_tagged("a1").await.0.starts_with("a1 OK"));
    drop(imap); // the fake Gmail goes away with every open connection
    c.timeout = Duration::from_secs(5);
    c.expect_eof().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_clients_are_bounded_and_timed_out() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let limits = "upstream_timeout_secs = 5\npreauth_timeout_secs = 2\nshutdown_grace_secs = 1\nmax_connections = 3\n";
    let (proxy, _pw) = proxy_before(imap.addr, &google, &pki, limits).await;
    let addr = proxy.addrs[0];

    // A 2 GB literal announcement is refused at once.
    let mut c = TestClient::connect(addr).await;
    c.read_line().await;
    c.send_line("a LOGIN alice {2147483648}").await;
    assert_eq!(c.read_line().await, "a BAD [TOOBIG] Literal too large");

    // Disconnecting mid-literal frees the connection slot (three times, with a cap of three).
    for _ in 0..3 {
        let mut c = TestClient::connect(addr).await;
        c.read_line().await;
        c.send("a LOGIN {10}\r\n").await;
        assert!(c.read_line().await.starts_with("+ "));
        c.send("abc").await;
        c.shutdown().await;
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // One byte every half second before login: closed at the pre-auth timeout (2 s here).
    let slow = TcpStream::connect(addr).await.unwrap();
    let (mut rx, mut tx) = slow.into_split();
    let start = Instant::now();
    let dribble = tokio::spawn(async move {
        for b in b"a1 LOGIN alice@gmail.com xxxxxxxxxxxxxxxx" {
            if tx.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => panic!("not closed: {}", String::from_utf8_lossy(&seen)),
        }
    }
    let closed_after = start.elapsed();
    dribble.abort();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("* BYE Autologout"), "{text}");
    assert!(
        closed_after >= Duration::from_millis(1500) && closed_after < Duration::from_secs(6),
        "closed after {closed_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_cap_is_answered_with_a_clear_message() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let limits = "upstream_timeout_secs = 5\npreauth_timeout_secs = 30\nshutdown_grace_secs = 1\nmax_connections = 2\n";
    let (proxy, _pw) = proxy_before(imap.addr, &google, &pki, limits).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TestClient::connect(proxy.addrs[0]).await;
        assert!(c.read_line().await.starts_with("* OK"));
        held.push(c);
    }
    let mut third = TestClient::connect(proxy.addrs[0]).await;
    let line = third.read_line().await;
    assert!(
        line.starts_with("* BYE [UNAVAILABLE] Too many connections"),
        "{line}"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = TestClient::connect(proxy.addrs[0]).await;
    assert!(again.read_line().await.starts_with("* OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn gmail_per_account_imap_limit_is_enforced_by_the_proxy() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let limits = format!("{TEST_LIMITS}imap_connections_per_account = 2\n");
    let (proxy, pw) = proxy_before(imap.addr, &google, &pki, &limits).await;
    let mut sessions = Vec::new();
    for i in 0..2 {
        let mut c = TestClient::connect(proxy.addrs[0]).await;
        c.read_line().await;
        c.send_line(&format!("s{i} LOGIN {ALICE} {pw}")).await;
        assert!(c
            .read_imap_tagged(&format!("s{i}"))
            .await
            .0
            .starts_with(&format!("s{i} OK")));
        sessions.push(c);
    }
    let (line, _) = login(proxy.addrs[0], &pw).await;
    assert!(line.starts_with("a1 NO [LIMIT]"), "{line}");
    assert!(line.contains("2 open sessions"), "{line}");
    assert_eq!(imap.connections(), 2, "the third never went upstream");
    // Closing one frees its place.
    let mut first = sessions.remove(0);
    first.send_line("z LOGOUT").await;
    first.expect_eof().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (line, _) = login(proxy.addrs[0], &pw).await;
    assert!(line.starts_with("a1 OK"), "{line}");
}

async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

async fn raw_login(tcp: &mut TcpStream, tag: &str, password: &str) -> String {
    raw_login_as(tcp, tag, ALICE, password).await
}

/// LOGIN as `user`; the tagged reply line (the test fails if the proxy closes first).
async fn raw_login_as(tcp: &mut TcpStream, tag: &str, user: &str, password: &str) -> String {
    tcp.write_all(format!("{tag} LOGIN {user} {password}\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(line) = text.lines().find(|l| l.starts_with(&format!("{tag} "))) {
            return line.to_string();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn password_guessing_slows_down_and_never_reaches_google_or_gmail() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let (proxy, pw) = proxy_before(imap.addr, &google, &pki, TEST_LIMITS).await;
    let addr = proxy.addrs[0];
    // Guessing from 127.0.0.3 over several connections in parallel.
    let guessers: Vec<_> = (0..2)
        .map(|g| {
            tokio::spawn(async move {
                let mut tcp = connect_from("127.0.0.3", addr).await;
                let mut greeting = [0u8; 512];
                let _ = tcp.read(&mut greeting).await.unwrap();
                let mut last = Duration::ZERO;
                for i in 0..3 {
                    let start = Instant::now();
                    let line =
                        raw_login(&mut tcp, &format!("g{g}x{i}"), &format!("guess-{g}-{i}")).await;
                    assert!(line.contains("NO [AUTHENTICATIONFAILED]"), "{line}");
                    last = start.elapsed();
                }
                last
            })
        })
        .collect();
    // Meanwhile the owner logs in from 127.0.0.2 with the right password: not slowed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut owner = connect_from("127.0.0.2", addr).await;
    let mut greeting = [0u8; 512];
    let _ = owner.read(&mut greeting).await.unwrap();
    let start = Instant::now();
    let line = raw_login(&mut owner, "o1", &pw).await;
    let owner_took = start.elapsed();
    assert!(line.starts_with("o1 OK"), "{line}");
    let mut slowest = Duration::ZERO;
    for g in guessers {
        slowest = slowest.max(g.await.unwrap());
    }
    // Six failures from one source: its later guesses wait, the owner did not.
    assert!(
        slowest >= Duration::from_millis(800),
        "guesses were slowed: {slowest:?}"
    );
    assert!(
        owner_took < slowest,
        "owner {owner_took:?} vs guesser {slowest:?}"
    );
    // Nothing of the guessing reached Google or Gmail: one token request and one upstream
    // connection, both for the owner's login.
    assert_eq!(google.token_requests(), 1);
    assert_eq!(imap.connections(), 1);
}

/// Everything the proxy sends until it closes the connection (at most `within`).
async fn read_until_closed(tcp: &mut TcpStream, within: Duration) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(within, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("not closed: {}", String::from_utf8_lossy(&got)),
        }
    }
}

/// Connected from `source` and greeted.
async fn greeted_from(source: &str, addr: SocketAddr) -> TcpStream {
    let mut tcp = connect_from(source, addr).await;
    let mut greeting = [0u8; 512];
    let n = tcp.read(&mut greeting).await.unwrap();
    assert!(greeting[..n].starts_with(b"* OK"), "{:?}", &greeting[..n]);
    tcp
}

#[tokio::test(flavor = "multi_thread")]
async fn the_owner_logs_in_at_once_while_a_guesser_on_the_same_address_waits() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let limits = "upstream_timeout_secs = 5\npreauth_timeout_secs = 10\nshutdown_grace_secs = 1\n";
    let (proxy, pw) = proxy_before(imap.addr, &google, &pki, limits).await;
    let addr = proxy.addrs[0];
    // Ten wrong logins in a row, then four in parallel, all from the owner's address; only
    // the free first answers are waited for.
    let mut guessers = Vec::new();
    for i in 0..14 {
        let mut tcp = greeted_from("127.0.0.9", addr).await;
        if i < 2 {
            let line = raw_login(&mut tcp, &format!("g{i}"), &format!("wrong-{i}")).await;
            assert!(line.contains("NO [AUTHENTICATIONFAILED]"), "{line}");
        } else {
            let line = format!("g{i} LOGIN {ALICE} wrong-{i}\r\n");
            tcp.write_all(line.as_bytes()).await.unwrap();
        }
        guessers.push(tcp);
    }
    let checked = Instant::now();
    while proxy.app.accounts.hash_runs() < 14 {
        assert!(
            checked.elapsed() < Duration::from_secs(10),
            "guesses not checked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut owner = greeted_from("127.0.0.9", addr).await;
    let start = Instant::now();
    let line = raw_login(&mut owner, "o1", &pw).await;
    let owner_took = start.elapsed();
    assert!(line.starts_with("o1 OK"), "{line}");
    assert!(
        owner_took < Duration::from_secs(3),
        "the owner waited {owner_took:?}"
    );
    // The guessers' answers went out late or their connections ran out of time; none got in.
    for mut tcp in guessers {
        let text = read_until_closed(&mut tcp, Duration::from_secs(15)).await;
        assert!(!text.contains(" OK"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_logins_do_not_extend_the_preauth_deadline() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let limits = "upstream_timeout_secs = 5\npreauth_timeout_secs = 3\nshutdown_grace_secs = 1\n";
    let (proxy, _pw) = proxy_before(imap.addr, &google, &pki, limits).await;
    let tcp = greeted_from("127.0.0.10", proxy.addrs[0]).await;
    let start = Instant::now();
    let (mut rx, mut tx) = tcp.into_split();
    let guessing = tokio::spawn(async move {
        for i in 0..10 {
            let line = format!("g{i} LOGIN nobody@example.com wrong-{i}\r\n");
            if tx.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(9), rx.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("still open: {}", String::from_utf8_lossy(&got)),
        }
    }
    let closed_after = start.elapsed();
    guessing.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("NO [AUTHENTICATIONFAILED]"), "{text}");
    assert!(text.contains("* BYE Autologout"), "{text}");
    assert!(
        closed_after >= Duration::from_millis(2500) && closed_after < Duration::from_secs(6),
        "closed after {closed_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_stuck_upstream_is_closed_at_the_preauth_deadline() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let up = scripted(Script::TlsStall, Some(pki.server_config())).await;
    let limits = "upstream_timeout_secs = 30\npreauth_timeout_secs = 2\nshutdown_grace_secs = 1\n";
    let (proxy, pw) = proxy_before(up.addr, &google, &pki, limits).await;
    let mut tcp = greeted_from("127.0.0.13", proxy.addrs[0]).await;
    let start = Instant::now();
    let line = format!("a1 LOGIN {ALICE} {pw}\r\n");
    tcp.write_all(line.as_bytes()).await.unwrap();
    let text = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(text.contains("* BYE Autologout"), "{text}");
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_address_has_a_bounded_number_of_connections_logging_in() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let limits = format!("{TEST_LIMITS}max_pending_per_source = 3\n");
    let (proxy, pw) = proxy_before(imap.addr, &google, &pki, &limits).await;
    let addr = proxy.addrs[0];
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(greeted_from("127.0.0.11", addr).await);
    }
    let mut refused = connect_from("127.0.0.11", addr).await;
    let text = read_until_closed(&mut refused, Duration::from_secs(5)).await;
    assert!(
        text.starts_with("* BYE [UNAVAILABLE] Too many connections"),
        "{text}"
    );
    // Another address is not affected.
    greeted_from("127.0.0.12", addr).await;
    // Once one of them has logged in, its place is free again.
    let line = raw_login(&mut waiting[0], "a1", &pw).await;
    assert!(line.starts_with("a1 OK"), "{line}");
    greeted_from("127.0.0.11", addr).await;
}

/// Wrong answers one source gets within `window`, from `parallel` connections at a time
/// (each a new connection per attempt, logging in as an unknown user).
async fn wrong_answers_within(
    addr: SocketAddr,
    source: &'static str,
    parallel: usize,
    window: Duration,
) -> usize {
    let start = Instant::now();
    let answered = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..parallel)
        .map(|p| {
            let answered = answered.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let mut tcp = greeted_from(source, addr).await;
                    let user = format!("nobody-{p}-{i}@example.com");
                    let login = raw_login_as(&mut tcp, "g", &user, "wrong");
                    let Ok(line) = tokio::time::timeout_at((start + window).into(), login).await
                    else {
                        return;
                    };
                    assert!(line.contains("NO [AUTHENTICATIONFAILED]"), "{line}");
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    answered.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread")]
async fn guessing_stays_slow_sequentially_and_in_parallel() {
    use xoauth2_proxy::proxy::throttle::delay_for;
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let (proxy, _pw) = proxy_before(imap.addr, &google, &pki, TEST_LIMITS).await;
    let addr = proxy.addrs[0];
    let window = Duration::from_secs(12);
    // The most answers the schedule allows in the window: the n-th wrong answer goes out
    // no sooner than the sum of the first n delays after the first.
    let mut total = Duration::ZERO;
    let bound = (1..)
        .take_while(|&n| {
            total += delay_for(n);
            total <= window
        })
        .count();
    let (sequential, parallel) = tokio::join!(
        wrong_answers_within(addr, "127.0.1.1", 1, window),
        wrong_answers_within(addr, "127.0.1.2", 16, window),
    );
    let per_minute = |n: usize| n as f64 * 60.0 / window.as_secs_f64();
    eprintln!(
        "wrong answers per minute from one source: sequential {:.0}, 16 in parallel {:.0} (schedule allows {:.0})",
        per_minute(sequential),
        per_minute(parallel),
        per_minute(bound)
    );
    assert!(sequential >= 2, "the free failures are answered at once");
    assert!(sequential <= bound, "{sequential} > {bound}");
    assert!(parallel <= bound, "{parallel} > {bound}");
}

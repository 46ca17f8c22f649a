//! Listeners behind an L4 balancer: `proxy_protocol = true` takes HAProxy's PROXY header (v1 and
//! v2) before the client's first byte, only from `trusted_proxies`, and consumes nothing of the
//! client's own protocol (implicit TLS starts right after the header).

mod harness;
mod support;

use harness::{ListenerSpec, Proxy};
use support::{FakeGoogle, FakeImap, TestClient, TestPki, UpstreamTls};

const ALICE: &str = "alice@gmail.com";

struct World {
    _google: FakeGoogle,
    pki: TestPki,
    _imap: FakeImap,
    proxy: Proxy,
    password: String,
}

async fn world(local_tls: &'static str, trusted: &str) -> World {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let text = harness::config_text(
        &google,
        &pki,
        &[ListenerSpec::new("imap", imap.addr).local_tls(local_tls)],
        &[ALICE],
    )
    .replace(
        "upstream_tls = \"implicit\"\n",
        &format!("upstream_tls = \"implicit\"\nproxy_protocol = true\ntrusted_proxies = [\"{trusted}\"]\n"),
    );
    let proxy = Proxy::start_with_config(&text).await;
    let password = proxy.authorize(&google, ALICE);
    World {
        _google: google,
        pki,
        _imap: imap,
        proxy,
        password,
    }
}

fn v2_header(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&993u16.to_be_bytes());
    h
}

async fn log_in(c: &mut TestClient, password: &str) {
    assert!(c.read_line().await.starts_with("* OK"));
    c.send_line(&format!("a1 LOGIN {ALICE} {password}")).await;
    let (tagged, _) = c.read_imap_tagged("a1").await;
    assert!(tagged.starts_with("a1 OK"), "{tagged}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_1_header_is_read_and_the_session_works() {
    let w = world("none", "127.0.0.1/32").await;
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.send(b"PROXY TCP4 192.0.2.9 127.0.0.1 51000 143\r\n")
        .await;
    log_in(&mut c, &w.password).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn implicit_tls_starts_right_after_a_version_2_header() {
    let w = world("implicit", "127.0.0.0/8").await;
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    // The header and the ClientHello arrive back to back: the header must not eat TLS bytes.
    c.send(v2_header([192, 0, 2, 9], 51000)).await;
    c.start_tls(w.pki.client_config()).await;
    log_in(&mut c, &w.password).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_outside_trusted_proxies_is_refused() {
    let w = world("none", "192.0.2.0/24").await;
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.send(b"PROXY TCP4 192.0.2.9 127.0.0.1 51000 143\r\n")
        .await;
    c.expect_eof().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_without_a_header_is_refused() {
    let w = world("none", "127.0.0.1/32").await;
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.send(b"a1 LOGIN alice@gmail.com password\r\n").await;
    c.expect_eof().await;
}

/// A wrong login over a fresh connection that claims `client` in its PROXY header; how long
/// its answer took.
async fn wrong_login_from(w: &World, client: &str) -> std::time::Duration {
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.send(format!("PROXY TCP4 {client} 127.0.0.1 51000 143\r\n"))
        .await;
    assert!(c.read_line().await.starts_with("* OK"));
    let start = std::time::Instant::now();
    c.send_line("a1 LOGIN stranger@example.org wrong").await;
    let (tagged, _) = c.read_imap_tagged("a1").await;
    assert!(tagged.starts_with("a1 NO"), "{tagged}");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_throttle_counts_the_address_in_the_header_not_the_balancer() {
    let w = world("none", "127.0.0.1/32").await;
    // One client behind the balancer guesses until its answers are slowed down...
    for _ in 0..6 {
        wrong_login_from(&w, "192.0.2.1").await;
    }
    let guesser = wrong_login_from(&w, "192.0.2.1").await;
    assert!(
        guesser >= std::time::Duration::from_millis(500),
        "the guesser's answer came after {guesser:?}"
    );
    // ...while another client behind the same balancer is answered at once.
    let other = wrong_login_from(&w, "192.0.2.2").await;
    assert!(
        other < guesser / 2,
        "another client waited {other:?} (the guesser {guesser:?})"
    );
}

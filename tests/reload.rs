//! SIGHUP makes the real `serve` re-read its config: accounts, listeners and limits added,
//! removed or changed take effect, open sessions survive, and a broken config is logged and
//! ignored.

mod cmd;
mod harness;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use harness::ListenerSpec;
use support::{FakeGoogle, FakeImap, FakePop3, PopTls, TestClient, TestPki, UpstreamTls};
use xoauth2_proxy::account::AccountKey;

const ALICE: &str = "alice@gmail.com";
const BOB: &str = "bob@gmail.com";

/// Authorize `email` with the fake Google and give it a password, in the store `serve` reads.
fn authorize(dir: &cmd::ConfigDir, google: &FakeGoogle, email: &str) -> String {
    let key = AccountKey::new(email);
    let refresh = format!("1//reload-{email}");
    google.add_refresh_token(&refresh, email);
    xoauth2_proxy::registry::save_refresh_token(&dir.store(), &key, &refresh.as_str().into())
        .unwrap();
    let password = xoauth2_proxy::registry::add_password(&dir.store(), &key, "reload").unwrap();
    password.expose().to_string()
}

/// USER/PASS on a POP3 listener: the proxy's answer to PASS.
async fn pop3_login(addr: SocketAddr, email: &str, password: &str) -> String {
    let mut c = TestClient::connect(addr).await;
    let greeting = c.read_line().await;
    if !greeting.starts_with("+OK") {
        return greeting;
    }
    c.send_line(&format!("USER {email}")).await;
    c.read_line().await;
    c.send_line(&format!("PASS {password}")).await;
    c.read_line().await
}

/// Rewrite the config file and send SIGHUP; wait for the `n`-th line that says how it went.
async fn reload(serve: &cmd::Running, dir: &cmd::ConfigDir, text: &str, marker: &str, n: usize) {
    std::fs::write(&dir.path, text).unwrap();
    serve.signal(libc::SIGHUP);
    serve.logged_times(marker, n).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_adds_and_removes_accounts_listeners_and_limits_and_keeps_open_sessions() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let pop = FakePop3::start(&google, &pki, PopTls::Implicit).await;
    let imap_only = harness::config_text(
        &google,
        &pki,
        &[ListenerSpec::new("imap", imap.addr)],
        &[ALICE],
    );
    let dir = cmd::ConfigDir::from_text(&imap_only);
    let alice = authorize(&dir, &google, ALICE);
    let bob = authorize(&dir, &google, BOB);
    let path = dir.path.display().to_string();
    let serve = cmd::Running::start(&["serve".into(), "-c".into(), path], &[]);
    let imap_addr = serve.logged_bind("listening").await;

    // A session that stays open through every reload.
    let mut open = TestClient::connect(imap_addr).await;
    open.read_line().await;
    open.send_line(&format!("a1 LOGIN {ALICE} {alice}")).await;
    assert!(open.read_imap_tagged("a1").await.0.starts_with("a1 OK"));
    // Bob is not configured yet.
    let mut c = TestClient::connect(imap_addr).await;
    c.read_line().await;
    c.send_line(&format!("b1 LOGIN {BOB} {bob}")).await;
    assert!(c.read_imap_tagged("b1").await.0.starts_with("b1 NO"));
    drop(c);

    // Add Bob and a POP3 listener.
    let both = harness::config_text(
        &google,
        &pki,
        &[
            ListenerSpec::new("imap", imap.addr),
            ListenerSpec::new("pop3", pop.addr),
        ],
        &[ALICE, BOB],
    );
    reload(&serve, &dir, &both, "config reloaded", 1).await;
    let text = serve.stderr();
    let pop_addr = cmd::bind_in_log(text.lines(), &["listening", "pop3"]).expect(&text);
    assert!(
        text.contains("2 accounts; listeners: 1 kept, 1 added, 0 closed"),
        "{text}"
    );
    assert!(pop3_login(pop_addr, BOB, &bob).await.starts_with("+OK"));

    // Remove the IMAP listener and allow one connection in all.
    let pop_only = harness::config_text_with_limits(
        &google,
        &pki,
        &[ListenerSpec::new("pop3", pop.addr)],
        &[ALICE, BOB],
        &format!("{}max_connections = 1\n", harness::TEST_LIMITS),
    );
    reload(&serve, &dir, &pop_only, "config reloaded", 2).await;
    assert!(
        tokio::net::TcpStream::connect(imap_addr).await.is_err(),
        "the removed listener's port is closed"
    );
    open.send_line("a2 SELECT INBOX").await;
    assert!(open.read_imap_tagged("a2").await.0.starts_with("a2 OK"));
    // The open session holds the one connection allowed now.
    let refused = pop3_login(pop_addr, BOB, &bob).await;
    assert!(refused.contains("Too many connections"), "{refused}");
    open.send_line("a3 LOGOUT").await;
    open.expect_eof().await;

    // A config that does not parse: logged, and the running one stays.
    let broken = pop_only.replace("[[listener]]", "[[listener]]\nport = 3");
    reload(&serve, &dir, &broken, "config not reloaded", 1).await;
    assert!(serve.stderr().contains("port"), "{}", serve.stderr());
    // The IMAP session's connection slot frees when its task ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = pop3_login(pop_addr, BOB, &bob).await;
        if answer.starts_with("+OK") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tokio::net::TcpStream::connect(imap_addr).await.is_err());
}

/// An IMAP login and SELECT: how many messages the upstream behind `addr` has for Alice.
async fn inbox_size(addr: SocketAddr, password: &str) -> String {
    let mut c = TestClient::connect(addr).await;
    c.read_line().await;
    c.send_line(&format!("a1 LOGIN {ALICE} {password}")).await;
    assert!(c.read_imap_tagged("a1").await.0.starts_with("a1 OK"));
    c.send_line("a2 SELECT INBOX").await;
    let (_, body) = c.read_imap_tagged("a2").await;
    let text = String::from_utf8_lossy(&body).into_owned();
    text.lines()
        .find(|l| l.ends_with(" EXISTS"))
        .unwrap_or_default()
        .to_string()
}

/// A listener whose address stays keeps its socket and takes its new settings for new
/// connections; a reload that cannot bind a new port changes nothing at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_address_takes_new_settings_and_an_unbindable_port_changes_nothing() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let empty = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let full = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    full.add_message(ALICE, b"Subject: hi\r\n\r\nhello\r\n");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fixed = |upstream: SocketAddr| {
        harness::config_text(
            &google,
            &pki,
            &[ListenerSpec::new("imap", upstream)],
            &[ALICE],
        )
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
    };
    let dir = cmd::ConfigDir::from_text(&fixed(empty.addr));
    let password = authorize(&dir, &google, ALICE);
    let config = dir.config();
    let bound = xoauth2_proxy::proxy::bind(&config).await.unwrap();
    let app = xoauth2_proxy::proxy::App::new(config).unwrap();
    let server = xoauth2_proxy::proxy::Server::start(app, bound);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(inbox_size(addr, &password).await, "* 0 EXISTS");

    std::fs::write(&dir.path, fixed(full.addr)).unwrap();
    let summary = server.reload_file(&dir.path).await.unwrap();
    assert!(summary.contains("1 kept, 0 added, 0 closed"), "{summary}");
    assert_eq!(inbox_size(addr, &password).await, "* 1 EXISTS");

    // A second listener on a port someone else holds: refused, and the first stays as it was.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let two = fixed(empty.addr)
        + &format!(
            "\n[[listener]]\nprotocol = \"pop3\"\nbind = \"{busy}\"\nupstream = \"127.0.0.1:9\"\n"
        );
    std::fs::write(&dir.path, two).unwrap();
    let err = server.reload_file(&dir.path).await.unwrap_err();
    assert!(err.contains(&format!("cannot bind {busy}")), "{err}");
    assert_eq!(server.listening().len(), 1);
    assert_eq!(inbox_size(addr, &password).await, "* 1 EXISTS");
    server.stop().await;
}

//! IMAP end to end: a client logs in to the real proxy over real sockets (plain, STARTTLS,
//! implicit TLS) with a local app password, and reaches the fake Gmail IMAP server, which
//! checks the XOAUTH2 token with the fake Google token endpoint.

mod harness;
mod support;

use std::time::Duration;

use futures::TryStreamExt;
use harness::{ListenerSpec, Proxy};
use support::{FakeGoogle, FakeImap, TestClient, TestPki, UpstreamTls};

const ALICE: &str = "alice@gmail.com";

const MESSAGE: &[u8] = b"From: Bob <bob@example.org>\r\nTo: alice@gmail.com\r\nSubject: hello \xc3\xa9\r\n\r\nLine one\r\n.starts with a dot\r\n\r\n{5}\r\nnot a literal\r\n";

struct World {
    google: FakeGoogle,
    pki: TestPki,
    imap: FakeImap,
    proxy: Proxy,
    password: String,
}

async fn world_with(
    upstream_tls: UpstreamTls,
    specs: impl FnOnce(std::net::SocketAddr) -> Vec<ListenerSpec>,
) -> World {
    world_with_limits(upstream_tls, specs, harness::TEST_LIMITS).await
}

async fn world_with_limits(
    upstream_tls: UpstreamTls,
    specs: impl FnOnce(std::net::SocketAddr) -> Vec<ListenerSpec>,
    limits: &str,
) -> World {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, upstream_tls).await;
    imap.add_message(ALICE, MESSAGE);
    let accounts = [ALICE, "carol@gmail.com"];
    let proxy = Proxy::start_with_limits(&google, &pki, &specs(imap.addr), &accounts, limits).await;
    let password = proxy.authorize(&google, ALICE);
    World {
        google,
        pki,
        imap,
        proxy,
        password,
    }
}

async fn world() -> World {
    world_with(UpstreamTls::Implicit, |up| {
        vec![ListenerSpec::new("imap", up)]
    })
    .await
}

async fn connect(w: &World) -> TestClient {
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    let greeting = c.read_line().await;
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1"),
        "{greeting}"
    );
    c
}

/// After a login, prove the session is Gmail's: SELECT and FETCH through the splice.
async fn fetch_first_message(c: &mut TestClient) -> Vec<u8> {
    c.send_line("s1 SELECT INBOX").await;
    let (tagged, _) = c.read_imap_tagged("s1").await;
    assert!(tagged.starts_with("s1 OK"), "{tagged}");
    c.send_line("f1 FETCH 1 BODY[]").await;
    let (tagged, raw) = c.read_imap_tagged("f1").await;
    assert!(tagged.starts_with("f1 OK"), "{tagged}");
    let text = String::from_utf8_lossy(&raw);
    let start = raw.windows(3).position(|w| w == b"}\r\n").expect("literal") + 3;
    let len: usize = text[text.find('{').unwrap() + 1..text.find('}').unwrap()]
        .parse()
        .unwrap();
    raw[start..start + len].to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_client_library_fetches_a_message_byte_identical() {
    let w = world().await;
    let tcp = tokio::net::TcpStream::connect(w.proxy.addrs[0])
        .await
        .unwrap();
    let mut client = async_imap::Client::new(tcp);
    client.read_response().await.unwrap().unwrap();
    let mut session = client
        .login(ALICE, &w.password)
        .await
        .map_err(|(e, _)| e)
        .expect("login through the proxy");
    let mailbox = session.select("INBOX").await.unwrap();
    assert_eq!(mailbox.exists, 1);
    let messages: Vec<_> = session
        .fetch("1", "BODY[]")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(messages[0].body().unwrap(), MESSAGE);
    session.logout().await.unwrap();
    assert_eq!(w.imap.successful_logins(), 1);
    assert!(
        w.imap.protocol_violations().is_empty(),
        "{:?}",
        w.imap.protocol_violations()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_login_form_reaches_upstream_as_xoauth2() {
    let w = world().await;
    let pw = w.password.clone();
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let plain = b64(&format!("\0{ALICE}\0{pw}"));
    let plain_z = b64(&format!("{ALICE}\0{ALICE}\0{pw}"));
    // (what the client sends, continuation lines it must get before each next part)
    let forms: Vec<Vec<(String, Option<&str>)>> = vec![
        vec![(format!("a LOGIN {ALICE} {pw}\r\n"), None)],
        vec![(format!("a LOGIN \"{ALICE}\" \"{pw}\"\r\n"), None)],
        vec![(format!("a login ALICE@GMAIL.COM {pw}\r\n"), None)],
        vec![
            (format!("a LOGIN {{{}}}\r\n", ALICE.len()), Some("+ ")),
            (format!("{ALICE} {{{}}}\r\n", pw.len()), Some("+ ")),
            (format!("{pw}\r\n"), None),
        ],
        vec![(
            format!("a LOGIN {ALICE} {{{}+}}\r\n{pw}\r\n", pw.len()),
            None,
        )],
        vec![(format!("a AUTHENTICATE PLAIN {plain}\r\n"), None)],
        vec![(format!("a AUTHENTICATE PLAIN {plain_z}\r\n"), None)],
        vec![
            ("a AUTHENTICATE PLAIN\r\n".to_string(), Some("+ ")),
            (format!("{plain}\r\n"), None),
        ],
        vec![
            (
                "a AUTHENTICATE LOGIN\r\n".to_string(),
                Some("+ VXNlcm5hbWU6"),
            ),
            (format!("{}\r\n", b64(ALICE)), Some("+ UGFzc3dvcmQ6")),
            (format!("{}\r\n", b64(&pw)), None),
        ],
        vec![
            (
                format!("a AUTHENTICATE LOGIN {}\r\n", b64(ALICE)),
                Some("+ UGFzc3dvcmQ6"),
            ),
            (format!("{}\r\n", b64(&pw)), None),
        ],
    ];
    for (i, form) in forms.iter().enumerate() {
        let mut c = connect(&w).await;
        for (bytes, expect) in form {
            c.send(bytes).await;
            if let Some(prefix) = expect {
                let line = c.read_line().await;
                assert!(line.starts_with(prefix), "form {i}: {line}");
            }
        }
        let (tagged, _) = c.read_imap_tagged("a").await;
        assert!(tagged.starts_with("a OK"), "form {i}: {tagged}");
        assert_eq!(fetch_first_message(&mut c).await, MESSAGE, "form {i}");
    }
    assert_eq!(w.imap.successful_logins(), forms.len());
    // The token was fetched once and reused for every login.
    assert_eq!(w.google.token_requests(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_and_unknown_user_are_refused_locally() {
    let w = world().await;
    let mut c = connect(&w).await;
    c.send_line(&format!("a1 LOGIN {ALICE} not-the-password"))
        .await;
    let line = c.read_line().await;
    assert!(
        line.starts_with("a1 NO [AUTHENTICATIONFAILED] Invalid username or password"),
        "{line}"
    );
    c.send_line(&format!("a2 LOGIN mallory@gmail.com {}", w.password))
        .await;
    let line = c.read_line().await;
    assert!(line.starts_with("a2 NO [AUTHENTICATIONFAILED]"), "{line}");
    // A configured account without a password yet.
    c.send_line("a3 LOGIN carol@gmail.com anything").await;
    let line = c.read_line().await;
    assert!(line.starts_with("a3 NO [AUTHENTICATIONFAILED]"), "{line}");
    // The connection stays usable: a correct login now works.
    c.send_line(&format!("a4 LOGIN {ALICE} {}", w.password))
        .await;
    let (tagged, _) = c.read_imap_tagged("a4").await;
    assert!(tagged.starts_with("a4 OK"), "{tagged}");
    // Nothing of the failed attempts went upstream or to Google.
    assert_eq!(w.imap.connections(), 1);
    assert_eq!(w.google.token_requests(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_refresh_token_tells_the_user_to_authorize_again() {
    let w = world().await;
    w.google
        .revoke_refresh_token(&format!("1//refresh-{ALICE}"));
    let mut c = connect(&w).await;
    c.send_line(&format!("a1 LOGIN {ALICE} {}", w.password))
        .await;
    let line = c.read_line().await;
    assert!(line.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{line}");
    assert!(
        line.contains(&format!("xoauth2-proxy login {ALICE}")),
        "{line}"
    );
    assert_eq!(w.imap.connections(), 0);
    // Permanent: a second login does not ask Google again until the store changes.
    c.send_line(&format!("a2 LOGIN {ALICE} {}", w.password))
        .await;
    let line = c.read_line().await;
    assert!(line.starts_with("a2 NO [AUTHENTICATIONFAILED]"), "{line}");
    assert_eq!(w.google.token_requests(), 1);
    // Re-authorizing (a new refresh token in the store) is picked up without a restart.
    let fresh = "1//a-new-grant";
    w.google.add_refresh_token(fresh, ALICE);
    xoauth2_proxy::registry::save_refresh_token(
        &w.proxy.store(),
        &xoauth2_proxy::account::AccountKey::new(ALICE),
        &fresh.into(),
    )
    .unwrap();
    c.send_line(&format!("a3 LOGIN {ALICE} {}", w.password))
        .await;
    let (tagged, _) = c.read_imap_tagged("a3").await;
    assert!(tagged.starts_with("a3 OK"), "{tagged}");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_down_is_a_temporary_failure() {
    let w = world().await;
    w.google.set_down(true);
    let mut c = connect(&w).await;
    c.send_line(&format!("a1 LOGIN {ALICE} {}", w.password))
        .await;
    let line = c.read_line().await;
    assert!(line.starts_with("a1 NO [UNAVAILABLE]"), "{line}");
    assert!(line.contains("try again later"), "{line}");
    assert_eq!(w.imap.connections(), 0);
    // It recovers by itself once Google answers again.
    w.google.set_down(false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.send_line(&format!("a2 LOGIN {ALICE} {}", w.password))
        .await;
    let (tagged, _) = c.read_imap_tagged("a2").await;
    assert!(tagged.starts_with("a2 OK"), "{tagged}");
}

#[tokio::test(flavor = "multi_thread")]
async fn never_authorized_account_is_told_to_run_login_and_google_is_not_asked() {
    let w = world().await;
    let carol = "carol@gmail.com";
    let pw = w.proxy.add_password(carol, "phone");
    let mut c = connect(&w).await;
    c.send_line(&format!("a1 LOGIN {carol} {pw}")).await;
    let line = c.read_line().await;
    assert!(line.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{line}");
    assert!(line.contains("is not authorized with Google yet"), "{line}");
    assert!(
        line.contains(&format!("xoauth2-proxy login {carol}")),
        "{line}"
    );
    assert_eq!(w.google.token_requests(), 0);
    assert_eq!(w.imap.connections(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_redirect_is_not_followed_and_is_reported_as_a_setup_problem() {
    let w = world().await;
    let elsewhere = FakeGoogle::start().await;
    w.google.set_token_redirect(Some(&elsewhere.token_url));
    let mut c = connect(&w).await;
    c.send_line(&format!("a1 LOGIN {ALICE} {}", w.password))
        .await;
    let line = c.read_line().await;
    assert!(line.starts_with("a1 NO [CONTACTADMIN]"), "{line}");
    assert!(line.contains("redirect"), "{line}");
    assert!(line.contains("token_url"), "{line}");
    assert_eq!(w.google.token_requests(), 1);
    assert_eq!(
        elsewhere.token_requests(),
        0,
        "the secrets were not re-sent to the redirect target"
    );
    assert_eq!(w.imap.connections(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn absurd_token_lifetime_from_the_endpoint_is_clamped_and_logins_work() {
    let w = world().await;
    w.google.set_expires_in(u64::MAX);
    for tag in ["a1", "a2"] {
        let mut c = connect(&w).await;
        c.send_line(&format!("{tag} LOGIN {ALICE} {}", w.password))
            .await;
        let (tagged, _) = c.read_imap_tagged(tag).await;
        assert!(tagged.starts_with(&format!("{tag} OK")), "{tagged}");
    }
    assert_eq!(w.google.token_requests(), 1, "the clamped token is reused");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_that_gives_up_during_a_refresh_does_not_wedge_the_account() {
    let w = world().await;
    w.google.set_delay(Duration::from_secs(2));
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        w.proxy
            .app
            .tokens
            .get(&xoauth2_proxy::account::AccountKey::new(ALICE)),
    )
    .await;
    assert!(gave_up.is_err(), "the refresh was still under way");
    w.google.set_delay(Duration::ZERO);
    let mut c = connect(&w).await;
    c.send_line(&format!("a1 LOGIN {ALICE} {}", w.password))
        .await;
    let (tagged, _) = tokio::time::timeout(Duration::from_secs(10), c.read_imap_tagged("a1"))
        .await
        .expect("the login is answered");
    assert!(tagged.starts_with("a1 OK"), "{tagged}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_unreachable_is_a_temporary_failure() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(&google, &pki, &[ListenerSpec::new("imap", dead)], &[ALICE]).await;
    let pw = proxy.authorize(&google, ALICE);
    let mut c = TestClient::connect(proxy.addrs[0]).await;
    c.read_line().await;
    c.send_line(&format!("a1 LOGIN {ALICE} {pw}")).await;
    let line = c.read_line().await;
    assert!(line.starts_with("a1 NO [UNAVAILABLE]"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_access_token_is_refreshed_once_for_a_hundred_parallel_logins() {
    // Above Gmail's 15 sessions per account and the 64 connections per address logging in,
    // which the proxy otherwise enforces.
    let limits = format!(
        "{}imap_connections_per_account = 200\nmax_pending_per_source = 200\n",
        harness::TEST_LIMITS
    );
    let w = world_with_limits(
        UpstreamTls::Implicit,
        |up| vec![ListenerSpec::new("imap", up)],
        &limits,
    )
    .await;
    w.google.set_expires_in(2);
    let mut c = connect(&w).await;
    c.send_line(&format!("a LOGIN {ALICE} {}", w.password))
        .await;
    assert!(c.read_imap_tagged("a").await.0.starts_with("a OK"));
    assert_eq!(w.google.token_requests(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    w.google.set_expires_in(3599);
    w.google.set_delay(Duration::from_millis(300));
    let addr = w.proxy.addrs[0];
    let pw = w.password.clone();
    let logins: Vec<_> = (0..100)
        .map(|i| {
            let pw = pw.clone();
            tokio::spawn(async move {
                let mut c = TestClient::connect(addr).await;
                c.read_line().await;
                c.send_line(&format!("p{i} LOGIN {ALICE} {pw}")).await;
                c.read_imap_tagged(&format!("p{i}")).await.0
            })
        })
        .collect();
    for (i, l) in logins.into_iter().enumerate() {
        let tagged = l.await.unwrap();
        assert!(tagged.starts_with(&format!("p{i} OK")), "{tagged}");
    }
    assert_eq!(
        w.google.token_requests(),
        2,
        "exactly one refresh for 100 logins"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_token_is_answered_refreshed_and_retried() {
    let w = world().await;
    let mut c = connect(&w).await;
    c.send_line(&format!("a1 LOGIN {ALICE} {}", w.password))
        .await;
    assert!(c.read_imap_tagged("a1").await.0.starts_with("a1 OK"));
    // Gmail stops accepting the cached (not yet expired) token.
    w.google.invalidate_access_tokens();
    let mut c = connect(&w).await;
    c.send_line(&format!("a2 LOGIN {ALICE} {}", w.password))
        .await;
    let (tagged, _) = c.read_imap_tagged("a2").await;
    assert!(tagged.starts_with("a2 OK"), "{tagged}");
    assert_eq!(fetch_first_message(&mut c).await, MESSAGE);
    assert_eq!(w.google.token_requests(), 2);
    assert_eq!(w.imap.failed_logins(), 1);
    assert!(
        w.imap.protocol_violations().is_empty(),
        "{:?}",
        w.imap.protocol_violations()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_rejected_even_after_refresh_is_reported_in_words() {
    let w = world().await;
    // Every token Google issues for alice is refused by Gmail: pretend the grant is for carol.
    w.google
        .revoke_refresh_token(&format!("1//refresh-{ALICE}"));
    let rt = "1//belongs-to-carol";
    w.google.add_refresh_token(rt, "carol@gmail.com");
    xoauth2_proxy::registry::save_refresh_token(
        &w.proxy.store(),
        &xoauth2_proxy::account::AccountKey::new(ALICE),
        &rt.into(),
    )
    .unwrap();
    let mut c = connect(&w).await;
    c.send_line(&format!("a1 LOGIN {ALICE} {}", w.password))
        .await;
    let line = c.read_line().await;
    assert!(
        line.starts_with("a1 NO [AUTHENTICATIONFAILED] Gmail rejected the OAuth token"),
        "{line}"
    );
    assert!(line.contains("status 400"), "decoded challenge: {line}");
    assert_eq!(
        w.google.token_requests(),
        2,
        "one refresh and one retry, no loop"
    );
    assert!(
        w.imap.protocol_violations().is_empty(),
        "{:?}",
        w.imap.protocol_violations()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_pipelined_after_login_wait_for_the_upstream_answer() {
    let w = world().await;
    w.imap.set_auth_delay(Duration::from_millis(200));
    let mut c = connect(&w).await;
    c.send(format!(
        "a7 LOGIN {ALICE} {}\r\na8 SELECT INBOX\r\na9 FETCH 1 BODY[]\r\n",
        w.password
    ))
    .await;
    let (tagged, _) = c.read_imap_tagged("a7").await;
    assert!(tagged.starts_with("a7 OK"), "{tagged}");
    let (tagged, _) = c.read_imap_tagged("a8").await;
    assert!(tagged.starts_with("a8 OK"), "{tagged}");
    let (tagged, raw) = c.read_imap_tagged("a9").await;
    assert!(tagged.starts_with("a9 OK"), "{tagged}");
    assert!(raw.windows(MESSAGE.len()).any(|win| win == MESSAGE));
    assert!(
        w.imap.received_before_auth_result().is_empty(),
        "{:?}",
        w.imap.received_before_auth_result()
    );
    assert!(
        w.imap.protocol_violations().is_empty(),
        "{:?}",
        w.imap.protocol_violations()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn local_starttls_then_login() {
    let w = world_with(UpstreamTls::Implicit, |up| {
        vec![ListenerSpec::new("imap", up).local_tls("starttls")]
    })
    .await;
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    let greeting = c.read_line().await;
    assert!(greeting.contains("STARTTLS"), "{greeting}");
    c.send_line("t1 STARTTLS").await;
    assert_eq!(c.read_line().await, "t1 OK Begin TLS negotiation now");
    c.start_tls(w.pki.client_config()).await;
    c.send_line("t2 CAPABILITY").await;
    let lines = c.read_imap_lines("t2").await;
    assert!(!lines[0].contains("STARTTLS"), "{lines:?}");
    c.send_line(&format!("t3 LOGIN {ALICE} {}", w.password))
        .await;
    assert!(c.read_imap_tagged("t3").await.0.starts_with("t3 OK"));
    assert_eq!(fetch_first_message(&mut c).await, MESSAGE);
}

#[tokio::test(flavor = "multi_thread")]
async fn local_implicit_tls_and_upstream_starttls() {
    let w = world_with(UpstreamTls::StartTls, |up| {
        vec![ListenerSpec::new("imap", up)
            .local_tls("implicit")
            .upstream_tls("starttls")]
    })
    .await;
    let mut c = TestClient::connect_tls(w.proxy.addrs[0], w.pki.client_config()).await;
    assert!(c.read_line().await.starts_with("* OK"));
    c.send_line(&format!("a1 LOGIN {ALICE} {}", w.password))
        .await;
    let (tagged, _) = c.read_imap_tagged("a1").await;
    assert!(tagged.starts_with("a1 OK"), "{tagged}");
    assert_eq!(fetch_first_message(&mut c).await, MESSAGE);
    assert!(
        w.imap.protocol_violations().is_empty(),
        "{:?}",
        w.imap.protocol_violations()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gmail_untagged_line_before_continuation_is_tolerated() {
    let w = world().await;
    w.imap.set_extra_untagged_before_continuation(true);
    w.google.invalidate_access_tokens();
    let mut c = connect(&w).await;
    c.send_line(&format!("a1 LOGIN {ALICE} {}", w.password))
        .await;
    assert!(c.read_imap_tagged("a1").await.0.starts_with("a1 OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn removed_password_stops_working_without_a_restart() {
    let w = world().await;
    let second = w.proxy.add_password(ALICE, "phone");
    let mut c = connect(&w).await;
    c.send_line(&format!("a1 LOGIN {ALICE} {second}")).await;
    assert!(c.read_imap_tagged("a1").await.0.starts_with("a1 OK"));
    assert!(xoauth2_proxy::registry::remove_password(
        &w.proxy.store(),
        &xoauth2_proxy::account::AccountKey::new(ALICE),
        "phone"
    )
    .unwrap());
    let mut c = connect(&w).await;
    c.send_line(&format!("a2 LOGIN {ALICE} {second}")).await;
    let line = c.read_line().await;
    assert!(line.starts_with("a2 NO [AUTHENTICATIONFAILED]"), "{line}");
    // The other password still works.
    c.send_line(&format!("a3 LOGIN {ALICE} {}", w.password))
        .await;
    assert!(c.read_imap_tagged("a3").await.0.starts_with("a3 OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn logout_before_login_and_shutdown_say_goodbye() {
    let mut w = world().await;
    let mut c = connect(&w).await;
    c.send_line("l1 LOGOUT").await;
    assert_eq!(c.read_line().await, "* BYE xoauth2-proxy logging out");
    assert_eq!(c.read_line().await, "l1 OK LOGOUT completed");
    c.expect_eof().await;
    let mut waiting = connect(&w).await;
    w.proxy.stop().await;
    let line = waiting.read_line().await;
    assert!(line.starts_with("* BYE [UNAVAILABLE]"), "{line}");
    assert!(tokio::net::TcpStream::connect(w.proxy.addrs[0])
        .await
        .is_err());
}

//! Microsoft 365 accounts end to end: the real proxy logs in to fake Exchange IMAP, SMTP and
//! POP3 servers with tokens from the fake Microsoft identity platform (tenant in the path,
//! rotating refresh tokens, AADSTS refusals), next to a Gmail account on the same listeners.

mod harness;
mod support;

use std::time::Duration;

use harness::{ListenerSpec, Proxy};
use support::microsoft::APP_PRINCIPAL;
use support::UpstreamTls;
use support::{FakeGoogle, FakeImap, FakePop3, FakeSmtp, PopTls, SmtpMode, TestClient, TestPki};
use xoauth2_proxy::account::AccountKey;
use xoauth2_proxy::secret::Secret;

const TENANT: &str = "contoso.onmicrosoft.com";
const BOB: &str = "bob@contoso.com";
const SHARED: &str = "shared@contoso.com";
const ALICE: &str = "alice@gmail.com";
const ROBOT1: &str = "robot1@contoso.com";
const ROBOT2: &str = "robot2@contoso.com";

struct World {
    google: FakeGoogle,
    imap: FakeImap,
    smtp: FakeSmtp,
    pop: FakePop3,
    proxy: Proxy,
    /// Local app passwords by account.
    passwords: std::collections::HashMap<&'static str, String>,
    _pki: TestPki,
}

/// IMAP, SMTP (587 STARTTLS) and POP3 listeners in front of fake Exchange servers; Bob is a
/// Microsoft user with a delegated shared mailbox account, the robots app-only, Alice Gmail.
async fn world() -> World {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let smtp = FakeSmtp::start(&google, &pki, SmtpMode::StartTls).await;
    let pop = FakePop3::start(&google, &pki, PopTls::Implicit).await;
    for exchange in [imap.exchange(), smtp.exchange(), pop.exchange()] {
        exchange.set_on(true);
    }
    let listeners = [
        ListenerSpec::new("imap", imap.addr),
        ListenerSpec::new("smtp", smtp.addr).upstream_tls("starttls"),
        ListenerSpec::new("pop3", pop.addr),
    ];
    let mut text = harness::config_text(&google, &pki, &listeners, &[ALICE]);
    text.push_str(&google.ms_provider_section(TENANT));
    for (email, extra) in [
        (BOB, ""),
        (
            "bob-shared@contoso.com",
            "mailbox = \"shared@contoso.com\"\n",
        ),
        (ROBOT1, "app_only = true\n"),
        (ROBOT2, "app_only = true\n"),
    ] {
        text.push_str(&format!(
            "\n[[account]]\nemail = \"{email}\"\nprovider = \"microsoft\"\n{extra}"
        ));
    }
    let proxy = Proxy::start_with_config(&text).await;
    let mut passwords = std::collections::HashMap::new();
    passwords.insert(ALICE, proxy.authorize(&google, ALICE));
    for (email, refresh) in [(BOB, "M.R3_bob"), ("bob-shared@contoso.com", "M.R3_bob2")] {
        google.add_ms_refresh_token(refresh, BOB);
        save_refresh_token(&proxy, email, refresh);
    }
    for email in ["bob-shared@contoso.com", ROBOT1, ROBOT2, BOB] {
        passwords.insert(email, proxy.add_password(email, "test"));
    }
    World {
        google,
        imap,
        smtp,
        pop,
        proxy,
        passwords,
        _pki: pki,
    }
}

fn save_refresh_token(proxy: &Proxy, email: &str, token: &str) {
    xoauth2_proxy::registry::save_refresh_token(
        &proxy.store(),
        &AccountKey::new(email),
        &Secret::from(token),
    )
    .unwrap();
}

fn stored_refresh_token(proxy: &Proxy, email: &str) -> String {
    let (data, _) = proxy.store().load().unwrap();
    let account = data.account(&AccountKey::new(email)).unwrap();
    account.refresh_token.clone().unwrap().expose().to_string()
}

/// `LOGIN` on the IMAP listener; the tagged answer.
async fn imap_login(w: &World, email: &str) -> String {
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.read_line().await;
    let password = &w.passwords[email];
    c.send_line(&format!("a1 LOGIN {email} {password}")).await;
    let (tagged, _) = c.read_imap_tagged("a1").await;
    tagged
}

#[tokio::test(flavor = "multi_thread")]
async fn one_imap_listener_serves_a_microsoft_and_a_gmail_account_each_with_its_own_tokens() {
    let w = world().await;
    assert_eq!(imap_login(&w, BOB).await, "a1 OK AUTHENTICATE completed.");
    assert_eq!(imap_login(&w, ALICE).await, "a1 OK AUTHENTICATE completed.");
    // Bob's token came from his tenant's endpoint, Alice's from Google's.
    assert!(w.google.ms_tenants().iter().all(|t| t == TENANT));
    assert_eq!(w.google.ms_tenants().len(), 1);
    assert_eq!(w.google.token_requests(), 1, "one Google refresh");
    // Microsoft rotated Bob's refresh token: the new one is stored and works.
    let stored = stored_refresh_token(&w.proxy, BOB);
    assert_ne!(stored, "M.R3_bob");
    assert!(w.google.refresh_token_is_live(&stored));
    assert!(
        w.imap.protocol_violations().is_empty(),
        "{:?}",
        w.imap.protocol_violations()
    );
}

/// A logged-in IMAP session of `email`, held open.
async fn imap_session(w: &World, email: &str) -> TestClient {
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.read_line().await;
    let password = &w.passwords[email];
    c.send_line(&format!("s LOGIN {email} {password}")).await;
    let (tagged, _) = c.read_imap_tagged("s").await;
    assert!(tagged.starts_with("s OK"), "{email}: {tagged}");
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn a_microsoft_mailbox_gets_exchanges_twenty_imap_sessions_and_gmail_keeps_fifteen() {
    let w = world().await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(imap_session(&w, BOB).await);
    }
    let refused = imap_login(&w, BOB).await;
    assert!(refused.starts_with("a1 NO [LIMIT]"), "{refused}");
    assert!(refused.contains("20 open sessions"), "{refused}");
    for _ in 0..15 {
        held.push(imap_session(&w, ALICE).await);
    }
    let refused = imap_login(&w, ALICE).await;
    assert!(refused.starts_with("a1 NO [LIMIT]"), "{refused}");
    assert!(refused.contains("15 open sessions"), "{refused}");
}

#[tokio::test(flavor = "multi_thread")]
async fn exchange_refusing_a_token_with_one_line_gets_one_refresh_and_one_retry() {
    let w = world().await;
    assert_eq!(imap_login(&w, BOB).await, "a1 OK AUTHENTICATE completed.");
    w.google.invalidate_access_tokens();
    assert_eq!(imap_login(&w, BOB).await, "a1 OK AUTHENTICATE completed.");
    assert_eq!(w.imap.failed_logins(), 1);
    assert_eq!(
        w.google.ms_tenants().len(),
        2,
        "refreshed once after the refusal"
    );
    // A mailbox the token does not open: one retry, then an authentication failure.
    let tagged = imap_login(&w, "bob-shared@contoso.com").await;
    assert!(
        tagged.starts_with("a1 NO [AUTHENTICATIONFAILED] Outlook rejected the OAuth token"),
        "{tagged}"
    );
    assert_eq!(w.imap.failed_logins(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_mailbox_is_opened_with_the_delegates_token() {
    let w = world().await;
    w.imap.exchange().grant_mailbox(SHARED, BOB);
    w.imap
        .add_message(SHARED, b"Subject: for the team\r\n\r\nhi\r\n");
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.read_line().await;
    let password = &w.passwords["bob-shared@contoso.com"];
    c.send_line(&format!("a1 LOGIN bob-shared@contoso.com {password}"))
        .await;
    assert_eq!(
        c.read_imap_tagged("a1").await.0,
        "a1 OK AUTHENTICATE completed."
    );
    c.send_line("s1 SELECT INBOX").await;
    let lines = c.read_imap_lines("s1").await;
    assert!(lines.iter().any(|l| l == "* 1 EXISTS"), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn throttled_imap_login_is_temporary_and_the_next_login_waits_the_backoff() {
    let w = world().await;
    w.imap.exchange().throttle_next(&[1500]);
    let tagged = imap_login(&w, BOB).await;
    assert!(tagged.starts_with("a1 NO [UNAVAILABLE] "), "{tagged}");
    assert!(tagged.contains("1500 ms"), "{tagged}");
    assert_eq!(imap_login(&w, BOB).await, "a1 OK AUTHENTICATE completed.");
    let times = w.imap.exchange().login_times();
    assert_eq!(times.len(), 2);
    assert!(
        times[1] - times[0] >= Duration::from_millis(1500),
        "the next upstream login came {:?} after the throttled one",
        times[1] - times[0]
    );
}

async fn smtp_auth(w: &World, email: &str) -> (u16, Vec<String>) {
    use base64::Engine;
    let mut c = TestClient::connect(w.proxy.addrs[1]).await;
    c.read_smtp_reply().await;
    c.send_line("EHLO client.example").await;
    c.read_smtp_reply().await;
    let plain = format!("\0{email}\0{}", w.passwords[email]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(plain);
    c.send_line(&format!("AUTH PLAIN {b64}")).await;
    c.read_smtp_reply().await
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_submission_logs_in_after_starttls_and_disabled_smtp_auth_names_the_fix() {
    let w = world().await;
    assert_eq!(smtp_auth(&w, BOB).await.0, 235);
    w.smtp.exchange().set_smtp_auth_disabled(true);
    let (code, lines) = smtp_auth(&w, BOB).await;
    assert_eq!(code, 535);
    let reply = lines.join("\n");
    assert!(reply.contains("5.7.139"), "{reply}");
    assert!(
        reply.contains(
            "Set-CASMailbox -Identity bob@contoso.com -SmtpClientAuthenticationDisabled $false"
        ),
        "{reply}"
    );
    assert!(
        w.smtp.protocol_violations().is_empty(),
        "{:?}",
        w.smtp.protocol_violations()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pop3_login_uses_the_two_line_auth_exchange_requires() {
    let w = world().await;
    let mut c = TestClient::connect(w.proxy.addrs[2]).await;
    c.read_line().await;
    c.send_line(&format!("USER {BOB}")).await;
    c.read_line().await;
    c.send_line(&format!("PASS {}", w.passwords[BOB])).await;
    assert_eq!(c.read_line().await, "+OK User successfully authenticated.");
    assert!(
        w.pop.protocol_violations().is_empty(),
        "{:?}",
        w.pop.protocol_violations()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn app_only_mailboxes_of_a_tenant_share_one_client_credentials_token() {
    let w = world().await;
    for robot in [ROBOT1, ROBOT2] {
        w.imap.exchange().grant_mailbox(robot, APP_PRINCIPAL);
    }
    assert_eq!(
        imap_login(&w, ROBOT1).await,
        "a1 OK AUTHENTICATE completed."
    );
    assert_eq!(
        imap_login(&w, ROBOT2).await,
        "a1 OK AUTHENTICATE completed."
    );
    assert_eq!(
        w.google.ms_tenants(),
        [TENANT],
        "one token request for both mailboxes"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shared_app_only_token_is_renewed_before_it_expires_without_a_login() {
    let w = world().await;
    w.imap.exchange().grant_mailbox(ROBOT1, APP_PRINCIPAL);
    w.imap.exchange().grant_mailbox(ROBOT2, APP_PRINCIPAL);
    w.google.set_expires_in(4);
    w.proxy
        .app
        .tokens
        .set_min_background_age(Duration::from_millis(500));
    assert_eq!(
        imap_login(&w, ROBOT1).await,
        "a1 OK AUTHENTICATE completed."
    );
    assert_eq!(w.google.ms_tenants().len(), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while w.google.ms_tenants().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "not renewed in the background"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The renewed token serves the tenant's other mailbox too.
    w.google.set_expires_in(3599);
    assert_eq!(
        imap_login(&w, ROBOT2).await,
        "a1 OK AUTHENTICATE completed."
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn aadsts_refusals_reach_the_client_in_their_class_with_the_fix() {
    let w = world().await;
    w.google.set_ms_refusal(Some((
        400,
        "invalid_grant",
        "AADSTS70043: The refresh token has expired or is invalid due to sign-in frequency checks by conditional access.",
    )));
    let tagged = imap_login(&w, BOB).await;
    assert!(
        tagged.starts_with(
            "a1 NO [AUTHENTICATIONFAILED] Microsoft authorization for bob@contoso.com has expired"
        ),
        "{tagged}"
    );
    assert!(
        tagged.contains("xoauth2-proxy login bob@contoso.com"),
        "{tagged}"
    );
    w.google.set_ms_refusal(Some((
        401,
        "invalid_client",
        "AADSTS7000222: The provided client secret keys for app are expired.",
    )));
    let tagged = imap_login(&w, ROBOT1).await;
    assert!(tagged.starts_with("a1 NO [CONTACTADMIN] "), "{tagged}");
    assert!(tagged.contains("New client secret"), "{tagged}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_rotations_each_store_the_newest_refresh_token_before_it_is_used() {
    let w = world().await;
    // Stricter than Microsoft: each refresh kills the token it was given, so a rotation
    // that was not stored would end access at the next refresh.
    w.google.set_ms_strict_rotation(true);
    let key = AccountKey::new(BOB);
    let mut previous = stored_refresh_token(&w.proxy, BOB);
    for i in 0..200 {
        let token = w
            .proxy
            .app
            .tokens
            .get(&key)
            .await
            .unwrap_or_else(|e| panic!("refresh {i}: {e}"));
        let stored = stored_refresh_token(&w.proxy, BOB);
        assert_ne!(stored, previous, "refresh {i} rotated the token");
        assert!(w.google.refresh_token_is_live(&stored), "refresh {i}");
        assert!(!w.google.refresh_token_is_live(&previous), "refresh {i}");
        previous = stored;
        w.proxy.app.tokens.invalidate(&key, &token);
    }
    assert_eq!(w.google.successful_refreshes(), 200);
    assert_eq!(imap_login(&w, BOB).await, "a1 OK AUTHENTICATE completed.");
}

//! Drives the test fakes in `tests/support/` directly over real sockets (no proxy), so that
//! end-to-end tests can trust them.

mod support;

use std::time::Duration;

use support::{
    xoauth2_response, FakeGoogle, FakeImap, FakePop3, FakeSmtp, PopTls, SmtpMode, TestClient,
    TestPki, UpstreamTls, CLIENT_ID, CLIENT_SECRET, XOAUTH2_ERROR_CHALLENGE,
};

const ALICE: &str = "alice@gmail.com";
const ALICE_REFRESH: &str = "1//0g-alice-refresh";

fn refresh_body(refresh_token: &str, client_id: &str, client_secret: &str) -> String {
    use support::http::form_encode;
    format!(
        "grant_type=refresh_token&refresh_token={}&client_id={}&client_secret={}",
        form_encode(refresh_token),
        form_encode(client_id),
        form_encode(client_secret)
    )
}

async fn refresh(google: &FakeGoogle, refresh_token: &str) -> support::client::HttpResponse {
    let mut c = TestClient::connect(google.addr).await;
    c.http_post_form(
        "/token",
        &refresh_body(refresh_token, CLIENT_ID, CLIENT_SECRET),
        &[],
    )
    .await
}

// ---------------------------------------------------------------------------------------
// Token endpoint
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn token_refresh_returns_a_bearer_token_valid_for_that_account_only() {
    let google = FakeGoogle::start().await;
    google.add_refresh_token(ALICE_REFRESH, ALICE);
    let resp = refresh(&google, ALICE_REFRESH).await;
    assert_eq!(resp.status, 200);
    assert!(resp
        .header("Content-Type")
        .unwrap()
        .starts_with("application/json"));
    let json = resp.json();
    let token = json["access_token"].as_str().unwrap();
    assert!(token.starts_with("ya29."));
    assert!(token.len() >= 45);
    assert_eq!(json["expires_in"], 3599);
    assert_eq!(json["scope"], "https://mail.google.com/");
    assert_eq!(json["token_type"], "Bearer");
    assert!(json.get("refresh_token").is_none());
    assert!(google.check_access_token(token, ALICE));
    assert!(google.check_access_token(token, "ALICE@Gmail.com"));
    assert!(!google.check_access_token(token, "bob@gmail.com"));
    assert!(!google.check_access_token("ya29.made-up", ALICE));
    assert_eq!(google.token_requests(), 1);

    google.invalidate_access_tokens();
    assert!(!google.check_access_token(token, ALICE));
}

#[tokio::test(flavor = "multi_thread")]
async fn token_refresh_honours_set_expires_in_and_expiry_is_real() {
    let google = FakeGoogle::start().await;
    google.add_refresh_token(ALICE_REFRESH, ALICE);
    google.set_expires_in(1);
    let json = refresh(&google, ALICE_REFRESH).await.json();
    assert_eq!(json["expires_in"], 1);
    let token = json["access_token"].as_str().unwrap().to_string();
    assert!(google.check_access_token(&token, ALICE));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!google.check_access_token(&token, ALICE));

    let minted = google.mint_access_token(ALICE, Duration::from_secs(60));
    assert!(google.check_access_token(&minted, ALICE));
}

#[tokio::test(flavor = "multi_thread")]
async fn token_refresh_with_revoked_or_unknown_token_is_invalid_grant() {
    let google = FakeGoogle::start().await;
    google.add_refresh_token(ALICE_REFRESH, ALICE);
    google.revoke_refresh_token(ALICE_REFRESH);
    for rt in [ALICE_REFRESH, "1//unknown"] {
        let resp = refresh(&google, rt).await;
        assert_eq!(resp.status, 400);
        assert_eq!(
            resp.json(),
            serde_json::json!({"error":"invalid_grant","error_description":"Token has been expired or revoked."})
        );
    }
    assert_eq!(google.token_requests(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_down_answers_503_with_non_json_body_and_counts_requests() {
    let google = FakeGoogle::start().await;
    google.add_refresh_token(ALICE_REFRESH, ALICE);
    google.set_down(true);
    let resp = refresh(&google, ALICE_REFRESH).await;
    assert_eq!(resp.status, 503);
    assert!(serde_json::from_slice::<serde_json::Value>(&resp.body).is_err());
    google.set_down(false);
    assert_eq!(refresh(&google, ALICE_REFRESH).await.status, 200);
    assert_eq!(google.token_requests(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_rejects_wrong_client_credentials_with_401_invalid_client() {
    let google = FakeGoogle::start().await;
    google.add_refresh_token(ALICE_REFRESH, ALICE);
    let mut c = TestClient::connect(google.addr).await;
    let resp = c
        .http_post_form(
            "/token",
            &refresh_body(ALICE_REFRESH, CLIENT_ID, "wrong"),
            &[],
        )
        .await;
    assert_eq!(resp.status, 401);
    assert_eq!(
        resp.json(),
        serde_json::json!({"error":"invalid_client","error_description":"The OAuth client was not found."})
    );
    let resp = c
        .http_post_form(
            "/token",
            &refresh_body(
                ALICE_REFRESH,
                "other.apps.googleusercontent.com",
                CLIENT_SECRET,
            ),
            &[],
        )
        .await;
    assert_eq!(resp.status, 401);
    // Unknown grant type (valid client).
    let body = format!("grant_type=password&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}");
    let resp = c.http_post_form("/token", &body, &[]).await;
    assert_eq!(resp.status, 400);
    assert_eq!(
        resp.json(),
        serde_json::json!({"error":"unsupported_grant_type"})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_accepts_http_basic_client_authentication() {
    use base64::Engine as _;
    let google = FakeGoogle::start().await;
    google.add_refresh_token(ALICE_REFRESH, ALICE);
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    let mut c = TestClient::connect(google.addr).await;
    let body = format!(
        "grant_type=refresh_token&refresh_token={}",
        support::http::form_encode(ALICE_REFRESH)
    );
    let resp = c
        .http_post_form(
            "/token",
            &body,
            &[("Authorization", &format!("Basic {basic}"))],
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
}

#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_keeps_the_connection_alive_between_requests() {
    let google = FakeGoogle::start().await;
    google.add_refresh_token(ALICE_REFRESH, ALICE);
    let mut c = TestClient::connect(google.addr).await;
    let body = refresh_body(ALICE_REFRESH, CLIENT_ID, CLIENT_SECRET);
    let first = c.http_post_form("/token", &body, &[]).await;
    let second = c.http_post_form("/token", &body, &[]).await;
    assert_eq!((first.status, second.status), (200, 200));
    assert_ne!(first.json()["access_token"], second.json()["access_token"]);
    // Two pipelined requests in one write are answered in order, then Connection: close.
    let req = |close: bool| {
        format!(
            "POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
    };
    c.send(format!("{}{}", req(false), req(true))).await;
    assert_eq!(c.read_http_response().await.status, 200);
    let last = c.read_http_response().await;
    assert_eq!(last.status, 200);
    assert_eq!(last.header("Connection"), Some("close"));
    c.expect_eof().await;
    assert_eq!(google.token_requests(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_delay_makes_concurrent_requests_overlap() {
    let google = FakeGoogle::start().await;
    google.add_refresh_token(ALICE_REFRESH, ALICE);
    google.set_delay(Duration::from_millis(400));
    let start = std::time::Instant::now();
    let (a, b) = tokio::join!(
        refresh(&google, ALICE_REFRESH),
        refresh(&google, ALICE_REFRESH)
    );
    assert_eq!((a.status, b.status), (200, 200));
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(400), "{took:?}");
    // Served one after the other they would take at least 800 ms.
    assert!(
        took < Duration::from_millis(800),
        "requests did not overlap: {took:?}"
    );
    assert_eq!(google.token_requests(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_rejects_oversized_requests() {
    let google = FakeGoogle::start().await;
    let mut c = TestClient::connect(google.addr).await;
    let body = "a".repeat(70 * 1024);
    let resp = c.http_post_form("/token", &body, &[]).await;
    assert_eq!(resp.status, 413);
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_code_flow_with_pkce_issues_a_working_refresh_token() {
    use base64::Engine as _;
    use sha2::Digest as _;
    use support::http::form_encode;
    let google = FakeGoogle::start().await;
    let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    let redirect = "http://127.0.0.1:53682/";
    let query = format!(
        "client_id={}&redirect_uri={}&response_type=code&scope={}&code_challenge={challenge}&code_challenge_method=S256&state=xyz&login_hint={}&access_type=offline&prompt=consent",
        form_encode(CLIENT_ID),
        form_encode(redirect),
        form_encode("https://mail.google.com/"),
        form_encode(ALICE)
    );
    let mut c = TestClient::connect(google.addr).await;
    c.send(format!(
        "GET /o/oauth2/v2/auth?{query} HTTP/1.1\r\nHost: x\r\n\r\n"
    ))
    .await;
    let resp = c.read_http_response().await;
    assert_eq!(resp.status, 302);
    let location = resp.header("Location").unwrap().to_string();
    assert!(location.starts_with("http://127.0.0.1:53682/?state=xyz&code="));
    let code_enc = location
        .split("code=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let code = support::http::form_decode(code_enc.as_bytes());
    assert_eq!(google.authorization_requests()[0]["login_hint"], ALICE);

    let body = format!(
        "grant_type=authorization_code&code={}&client_id={}&client_secret={}&redirect_uri={}&code_verifier={verifier}",
        form_encode(&code),
        form_encode(CLIENT_ID),
        form_encode(CLIENT_SECRET),
        form_encode(redirect)
    );
    let resp = c.http_post_form("/token", &body, &[]).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let json = resp.json();
    let rt = json["refresh_token"].as_str().unwrap();
    assert!(google.check_access_token(json["access_token"].as_str().unwrap(), ALICE));
    assert_eq!(
        google.issued_refresh_tokens(),
        vec![(ALICE.to_string(), rt.to_string())]
    );
    // The code is single-use.
    assert_eq!(c.http_post_form("/token", &body, &[]).await.status, 400);
    // The refresh token works.
    assert_eq!(refresh(&google, rt).await.status, 200);
}

// ---------------------------------------------------------------------------------------
// IMAP
// ---------------------------------------------------------------------------------------

struct ImapWorld {
    pki: TestPki,
    google: FakeGoogle,
    imap: FakeImap,
}

async fn imap_world(tls: UpstreamTls) -> ImapWorld {
    let pki = TestPki::new();
    let google = FakeGoogle::start().await;
    let imap = FakeImap::start(&google, &pki, tls).await;
    ImapWorld { pki, google, imap }
}

async fn imap_connect_tls(w: &ImapWorld) -> TestClient {
    let mut c = TestClient::connect_tls(w.imap.addr, w.pki.client_config()).await;
    let greeting = c.read_line().await;
    assert!(
        greeting.starts_with("* OK Gimap ready for requests from 127.0.0.1 "),
        "{greeting}"
    );
    c
}

const MESSAGE: &[u8] = b"From: Bob <bob@example.org>\r\nTo: alice@gmail.com\r\nSubject: hi\r\n\r\nHello Alice.\r\n.leading dot\r\n\r\n{5}\r\nend\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn imap_implicit_tls_capability_then_xoauth2_with_initial_response_succeeds() {
    let w = imap_world(UpstreamTls::Implicit).await;
    let mut c = imap_connect_tls(&w).await;
    c.send_line("a1 CAPABILITY").await;
    let lines = c.read_imap_lines("a1").await;
    assert_eq!(lines[0], "* CAPABILITY IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 XYZZY SASL-IR AUTH=XOAUTH2 AUTH=PLAIN AUTH=PLAIN-CLIENTTOKEN AUTH=OAUTHBEARER");
    assert!(lines[1].starts_with("a1 OK Thats all she wrote! "));

    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    c.send_line(&format!(
        "a2 AUTHENTICATE XOAUTH2 {}",
        xoauth2_response(ALICE, &token)
    ))
    .await;
    let lines = c.read_imap_lines("a2").await;
    assert_eq!(lines, vec![
        "* CAPABILITY IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 UIDPLUS COMPRESS=DEFLATE ENABLE MOVE CONDSTORE ESEARCH UTF8=ACCEPT LIST-EXTENDED LIST-STATUS LITERAL- SPECIAL-USE APPENDLIMIT=35651584".to_string(),
        "a2 OK alice@gmail.com authenticated (Success)".to_string(),
    ]);
    c.send_line("a3 LOGOUT").await;
    assert_eq!(
        c.read_imap_lines("a3").await,
        vec!["* BYE LOGOUT Requested", "a3 OK 73 good day (Success)"]
    );
    c.expect_eof().await;
    assert_eq!(w.imap.successful_logins(), 1);
    assert_eq!(w.imap.failed_logins(), 0);
    assert_eq!(w.imap.connections(), 1);
    assert!(w.imap.protocol_violations().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_bad_token_gets_challenge_and_empty_line_gets_authenticationfailed() {
    let w = imap_world(UpstreamTls::Implicit).await;
    let mut c = imap_connect_tls(&w).await;
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    w.google.invalidate_access_tokens();
    c.send_line(&format!(
        "a1 AUTHENTICATE XOAUTH2 {}",
        xoauth2_response(ALICE, &token)
    ))
    .await;
    assert_eq!(c.read_line().await, format!("+ {XOAUTH2_ERROR_CHALLENGE}"));
    c.send_line("").await;
    assert_eq!(
        c.read_line().await,
        "a1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
    );
    // A token for another account is rejected too, and the connection stays usable.
    let bob_token = w
        .google
        .mint_access_token("bob@gmail.com", Duration::from_secs(600));
    c.send_line(&format!(
        "a2 AUTHENTICATE XOAUTH2 {}",
        xoauth2_response(ALICE, &bob_token)
    ))
    .await;
    assert_eq!(c.read_line().await, format!("+ {XOAUTH2_ERROR_CHALLENGE}"));
    c.send_line("*").await;
    assert!(c.read_line().await.starts_with("a2 BAD "));
    // Retry with a good token on the same connection.
    let good = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    c.send_line(&format!(
        "a3 AUTHENTICATE XOAUTH2 {}",
        xoauth2_response(ALICE, &good)
    ))
    .await;
    let lines = c.read_imap_lines("a3").await;
    assert_eq!(lines[1], "a3 OK alice@gmail.com authenticated (Success)");
    assert_eq!(w.imap.failed_logins(), 2);
    assert_eq!(w.imap.successful_logins(), 1);
    assert!(w.imap.protocol_violations().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_non_empty_answer_to_the_error_challenge_is_a_protocol_violation() {
    let w = imap_world(UpstreamTls::Implicit).await;
    let mut c = imap_connect_tls(&w).await;
    c.send_line(&format!(
        "a1 AUTHENTICATE XOAUTH2 {}",
        xoauth2_response(ALICE, "ya29.bogus")
    ))
    .await;
    assert_eq!(c.read_line().await, format!("+ {XOAUTH2_ERROR_CHALLENGE}"));
    c.send_line("a2 SELECT INBOX").await;
    assert!(c.read_line().await.starts_with("a1 BAD"));
    let v = w.imap.protocol_violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("non-empty"), "{v:?}");
    assert_eq!(
        w.imap.received_before_auth_result(),
        vec!["a2 SELECT INBOX"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_two_step_authenticate_with_gmail_extra_untagged_line() {
    let w = imap_world(UpstreamTls::Implicit).await;
    w.imap.set_extra_untagged_before_continuation(true);
    let mut c = imap_connect_tls(&w).await;
    c.send_line("a1 AUTHENTICATE XOAUTH2").await;
    assert!(c
        .read_line()
        .await
        .starts_with("* OK Gimap ready for requests from 127.0.0.1 "));
    assert_eq!(c.read_line().await, "+ ");
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    c.send_line(&xoauth2_response(ALICE, &token)).await;
    let lines = c.read_imap_lines("a1").await;
    assert_eq!(
        lines.last().unwrap(),
        "a1 OK alice@gmail.com authenticated (Success)"
    );
    assert_eq!(w.imap.successful_logins(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_login_is_refused_with_the_app_password_alert() {
    let w = imap_world(UpstreamTls::Implicit).await;
    let mut c = imap_connect_tls(&w).await;
    c.send_line("a1 LOGIN alice@gmail.com {6}").await;
    assert_eq!(c.read_line().await, "+ go ahead");
    c.send_line("secret").await;
    assert_eq!(c.read_line().await, "a1 NO [ALERT] Application-specific password required: https://support.google.com/accounts/answer/185833 (Failure)");
    c.send_line("a2 SELECT INBOX").await;
    assert!(c.read_line().await.starts_with("a2 BAD"));
    assert_eq!(w.imap.failed_logins(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_starttls_mode_requires_tls_before_authenticate() {
    let w = imap_world(UpstreamTls::StartTls).await;
    let mut c = TestClient::connect(w.imap.addr).await;
    assert!(c.read_line().await.starts_with("* OK Gimap ready"));
    c.send_line("a1 CAPABILITY").await;
    let lines = c.read_imap_lines("a1").await;
    assert_eq!(lines[0], "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED");
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    c.send_line(&format!(
        "a2 AUTHENTICATE XOAUTH2 {}",
        xoauth2_response(ALICE, &token)
    ))
    .await;
    assert!(c.read_line().await.starts_with("a2 NO "));
    assert_eq!(w.imap.protocol_violations().len(), 1);

    c.send_line("a3 STARTTLS").await;
    assert_eq!(c.read_line().await, "a3 OK Begin TLS negotiation now");
    c.start_tls(w.pki.client_config()).await;
    c.send_line("a4 CAPABILITY").await;
    let lines = c.read_imap_lines("a4").await;
    assert!(lines[0].contains("AUTH=XOAUTH2"), "{lines:?}");
    c.send_line(&format!(
        "a5 AUTHENTICATE XOAUTH2 {}",
        xoauth2_response(ALICE, &token)
    ))
    .await;
    let lines = c.read_imap_lines("a5").await;
    assert_eq!(lines[1], "a5 OK alice@gmail.com authenticated (Success)");
    assert_eq!(w.imap.protocol_violations().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_commands_pipelined_behind_starttls_are_a_violation() {
    let w = imap_world(UpstreamTls::StartTls).await;
    let mut c = TestClient::connect(w.imap.addr).await;
    c.read_line().await;
    c.send("a1 STARTTLS\r\na2 CAPABILITY\r\n").await;
    assert_eq!(c.read_line().await, "a1 OK Begin TLS negotiation now");
    // Give the server a moment to record before we check.
    let v = w.imap.protocol_violations();
    assert_eq!(v.len(), 1, "{v:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_select_and_fetch_return_the_exact_message_bytes() {
    let w = imap_world(UpstreamTls::Implicit).await;
    w.imap.add_message(ALICE, MESSAGE);
    w.imap.add_message(ALICE, b"Subject: two\r\n\r\nsecond\r\n");
    w.imap
        .add_message("bob@gmail.com", b"Subject: bob's\r\n\r\nnot alice's\r\n");
    let mut c = imap_connect_tls(&w).await;
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    c.send_line(&format!(
        "a1 AUTHENTICATE XOAUTH2 {}",
        xoauth2_response(ALICE, &token)
    ))
    .await;
    c.read_imap_lines("a1").await;

    c.send_line("a2 SELECT INBOX").await;
    let lines = c.read_imap_lines("a2").await;
    assert!(lines.contains(&"* 2 EXISTS".to_string()), "{lines:?}");
    assert!(lines.contains(&"* 0 RECENT".to_string()), "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("* OK [UIDVALIDITY 1]")));
    assert!(lines.iter().any(|l| l.starts_with("* OK [UIDNEXT 3]")));
    assert!(lines.iter().any(|l| l.starts_with("* FLAGS (")));
    assert_eq!(
        lines.last().unwrap(),
        "a2 OK [READ-WRITE] INBOX selected. (Success)"
    );

    c.send_line("a3 FETCH 1 BODY.PEEK[]").await;
    let (tagged, raw) = c.read_imap_tagged("a3").await;
    assert_eq!(tagged, "a3 OK Success");
    let mut expected = format!("* 1 FETCH (BODY[] {{{}}}\r\n", MESSAGE.len()).into_bytes();
    expected.extend_from_slice(MESSAGE);
    expected.extend_from_slice(b")\r\n");
    assert_eq!(raw, expected);

    c.send_line("a4 UID FETCH 1:* (RFC822.SIZE FLAGS)").await;
    let lines = c.read_imap_lines("a4").await;
    assert_eq!(
        lines,
        vec![
            format!("* 1 FETCH (UID 1 RFC822.SIZE {} FLAGS ())", MESSAGE.len()),
            "* 2 FETCH (UID 2 RFC822.SIZE 24 FLAGS ())".to_string(),
            "a4 OK Success".to_string(),
        ]
    );

    c.send_line("a5 FETCH 2,1 (UID RFC822)").await;
    let (_, raw) = c.read_imap_tagged("a5").await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with(&format!(
        "* 1 FETCH (UID 1 RFC822 {{{}}}\r\n",
        MESSAGE.len()
    )));
    assert!(text.contains(
        "* 2 FETCH (UID 2 RFC822 {24}\r\nSubject: two\r\n\r\nsecond\r\n FLAGS (\\Seen))"
    ));

    c.send_line("a6 FETCH 3 BODY[]").await;
    assert!(c.read_line().await.starts_with("a6 BAD"));
    c.send_line("a7 EXAMINE INBOX").await;
    let lines = c.read_imap_lines("a7").await;
    assert_eq!(
        lines.last().unwrap(),
        "a7 OK [READ-ONLY] INBOX selected. (Success)"
    );
    c.send_line("a8 LIST \"\" *").await;
    let lines = c.read_imap_lines("a8").await;
    assert_eq!(
        lines,
        vec!["* LIST (\\HasNoChildren) \"/\" \"INBOX\"", "a8 OK Success"]
    );
    c.send_line("a9 FROB").await;
    assert_eq!(c.read_line().await, "a9 BAD Unknown command");
    assert!(w.imap.protocol_violations().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_records_commands_pipelined_behind_authenticate() {
    let w = imap_world(UpstreamTls::Implicit).await;
    w.imap.set_auth_delay(Duration::from_millis(50));
    let mut c = imap_connect_tls(&w).await;
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    c.send(format!(
        "a1 AUTHENTICATE XOAUTH2 {}\r\na2 SELECT INBOX\r\n",
        xoauth2_response(ALICE, &token)
    ))
    .await;
    c.read_imap_lines("a1").await;
    let lines = c.read_imap_lines("a2").await;
    assert_eq!(
        lines.last().unwrap(),
        "a2 OK [READ-WRITE] INBOX selected. (Success)"
    );
    assert_eq!(
        w.imap.received_before_auth_result(),
        vec!["a2 SELECT INBOX"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_serves_many_concurrent_connections_and_stops_when_dropped() {
    let w = imap_world(UpstreamTls::Implicit).await;
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let cfg = w.pki.client_config();
        let addr = w.imap.addr;
        let ir = xoauth2_response(ALICE, &token);
        tasks.push(tokio::spawn(async move {
            let mut c = TestClient::connect_tls(addr, cfg).await;
            c.read_line().await;
            c.send_line(&format!("t{i} AUTHENTICATE XOAUTH2 {ir}"))
                .await;
            c.read_imap_lines(&format!("t{i}")).await.pop().unwrap()
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().contains("authenticated (Success)"));
    }
    assert_eq!(w.imap.connections(), 8);
    assert_eq!(w.imap.successful_logins(), 8);

    let addr = w.imap.addr;
    let mut open = TestClient::connect_tls(addr, w.pki.client_config()).await;
    open.read_line().await;
    drop(w.imap);
    open.expect_eof().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_survives_garbage_without_panicking() {
    let w = imap_world(UpstreamTls::Implicit).await;
    let mut c = imap_connect_tls(&w).await;
    c.send("\r\n* FOO\r\na1\r\na2 AUTHENTICATE\r\na3 AUTHENTICATE XOAUTH2 !!!notbase64\r\n")
        .await;
    assert!(c.read_line().await.starts_with("* BAD"));
    assert!(c.read_line().await.starts_with("* BAD"));
    assert!(c.read_line().await.starts_with("a1 BAD"));
    assert!(c.read_line().await.starts_with("a2 BAD"));
    assert_eq!(c.read_line().await, format!("+ {XOAUTH2_ERROR_CHALLENGE}"));
    c.send_line("").await;
    assert!(c
        .read_line()
        .await
        .starts_with("a3 NO [AUTHENTICATIONFAILED]"));
    c.send(vec![b'x'; 70 * 1024]).await;
    assert!(c.read_line().await.starts_with("* BAD"));
    c.expect_eof().await;
    let v = w.imap.protocol_violations();
    assert!(v.iter().any(|s| s.contains("malformed XOAUTH2")), "{v:?}");
    assert!(v.iter().any(|s| s.contains("empty line")), "{v:?}");
}

// ---------------------------------------------------------------------------------------
// SMTP
// ---------------------------------------------------------------------------------------

struct SmtpWorld {
    pki: TestPki,
    google: FakeGoogle,
    smtp: FakeSmtp,
}

async fn smtp_world(mode: SmtpMode) -> SmtpWorld {
    let pki = TestPki::new();
    let google = FakeGoogle::start().await;
    let smtp = FakeSmtp::start(&google, &pki, mode).await;
    SmtpWorld { pki, google, smtp }
}

const EHLO_AFTER_TLS: [&str; 8] = [
    "250-smtp.gmail.com at your service, [127.0.0.1]",
    "250-SIZE 35882577",
    "250-8BITMIME",
    "250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH",
    "250-ENHANCEDSTATUSCODES",
    "250-PIPELINING",
    "250-CHUNKING",
    "250 SMTPUTF8",
];

/// Implicit-TLS connection, EHLO'd and authenticated (two-step XOAUTH2) as alice.
async fn smtp_logged_in(w: &SmtpWorld) -> TestClient {
    let mut c = TestClient::connect_tls(w.smtp.addr, w.pki.client_config()).await;
    let (code, banner) = c.read_smtp_reply().await;
    assert_eq!(code, 220);
    assert!(banner[0].starts_with("220 smtp.gmail.com ESMTP ") && banner[0].ends_with(" - gsmtp"));
    c.send_line("EHLO client.example").await;
    assert_eq!(c.read_smtp_reply().await.1, EHLO_AFTER_TLS);
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    c.send_line("AUTH XOAUTH2").await;
    assert_eq!(c.read_line().await, "334 ");
    c.send_line(&xoauth2_response(ALICE, &token)).await;
    assert_eq!(c.read_line().await, "235 2.7.0 Accepted");
    c
}

/// Dot-stuffs a message that ends with CRLF and appends the terminator.
fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 1024);
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

const DOTTY: &[u8] = b"From: alice@gmail.com\r\nTo: bob@example.org\r\nSubject: dots\r\n\r\n.\r\n..\r\n.leading\r\nmiddle . dot\r\n\r\n.\r\nlast line\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn smtp_starttls_mode_needs_starttls_and_a_fresh_ehlo_before_two_step_xoauth2() {
    let w = smtp_world(SmtpMode::StartTls).await;
    let mut c = TestClient::connect(w.smtp.addr).await;
    assert_eq!(c.read_smtp_reply().await.0, 220);
    c.send_line("EHLO client.example").await;
    let (code, lines) = c.read_smtp_reply().await;
    assert_eq!(code, 250);
    assert_eq!(
        lines,
        vec![
            "250-smtp.gmail.com at your service, [127.0.0.1]",
            "250-SIZE 35882577",
            "250-8BITMIME",
            "250-STARTTLS",
            "250-ENHANCEDSTATUSCODES",
            "250-PIPELINING",
            "250-CHUNKING",
            "250 SMTPUTF8",
        ]
    );
    c.send_line("STARTTLS").await;
    assert_eq!(c.read_line().await, "220 2.0.0 Ready to start TLS");
    c.start_tls(w.pki.client_config()).await;
    c.send_line("EHLO client.example").await;
    assert_eq!(c.read_smtp_reply().await.1, EHLO_AFTER_TLS);
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    c.send_line("AUTH XOAUTH2").await;
    assert_eq!(c.read_line().await, "334 ");
    c.send_line(&xoauth2_response(ALICE, &token)).await;
    assert_eq!(c.read_line().await, "235 2.7.0 Accepted");
    c.send_line("QUIT").await;
    assert!(c
        .read_line()
        .await
        .starts_with("221 2.0.0 closing connection "));
    c.expect_eof().await;
    assert_eq!(w.smtp.successful_logins(), 1);
    assert!(w.smtp.protocol_violations().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_auth_or_mail_before_starttls_and_auth_without_re_ehlo_are_violations() {
    let w = smtp_world(SmtpMode::StartTls).await;
    let mut c = TestClient::connect(w.smtp.addr).await;
    c.read_smtp_reply().await;
    c.send_line("EHLO client.example").await;
    c.read_smtp_reply().await;
    c.send_line("AUTH XOAUTH2").await;
    let (code, lines) = c.read_smtp_reply().await;
    assert_eq!(code, 530);
    assert!(lines[0].starts_with("530 5.7.0 Must issue a STARTTLS command first. "));
    c.send_line("MAIL FROM:<alice@gmail.com>").await;
    assert_eq!(c.read_smtp_reply().await.0, 530);
    c.send_line("STARTTLS").await;
    c.read_line().await;
    c.start_tls(w.pki.client_config()).await;
    c.send_line("AUTH XOAUTH2").await;
    assert_eq!(c.read_smtp_reply().await.0, 503);
    let v = w.smtp.protocol_violations();
    assert_eq!(v.len(), 3, "{v:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_data_with_dot_stuffed_lines_round_trips_byte_exact() {
    let w = smtp_world(SmtpMode::Implicit).await;
    let mut c = smtp_logged_in(&w).await;
    c.send_line("MAIL FROM:<alice@gmail.com> SIZE=1000 BODY=8BITMIME SMTPUTF8")
        .await;
    assert!(c.read_line().await.starts_with("250 2.1.0 OK "));
    c.send_line("RCPT TO:<bob@example.org>").await;
    assert!(c.read_line().await.starts_with("250 2.1.5 OK "));
    c.send_line("RCPT TO:<carol@example.org>").await;
    assert!(c.read_line().await.starts_with("250 2.1.5 OK "));
    c.send_line("DATA").await;
    let go = c.read_line().await;
    assert!(
        go.starts_with("354  Go ahead ") && go.ends_with(" - gsmtp"),
        "{go}"
    );
    c.send(dot_stuff(DOTTY)).await;
    let ok = c.read_line().await;
    assert!(
        ok.starts_with("250 2.0.0 OK  ") && ok.ends_with(" - gsmtp"),
        "{ok}"
    );
    let msgs = w.smtp.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].auth_user, ALICE);
    assert_eq!(msgs[0].mail_from, "alice@gmail.com");
    assert_eq!(
        msgs[0].rcpt_to,
        vec!["bob@example.org", "carol@example.org"]
    );
    assert_eq!(msgs[0].data, DOTTY);
    assert!(w.smtp.protocol_violations().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_bdat_chunks_are_concatenated() {
    let w = smtp_world(SmtpMode::Implicit).await;
    let mut c = smtp_logged_in(&w).await;
    c.send_line("MAIL FROM:<alice@gmail.com>").await;
    c.read_line().await;
    c.send_line("RCPT TO:<bob@example.org>").await;
    c.read_line().await;
    let (a, b) = DOTTY.split_at(30);
    c.send(format!("BDAT {}\r\n", a.len())).await;
    c.send(a).await;
    assert!(c.read_line().await.starts_with("250 "));
    let mut last = format!("BDAT {} LAST\r\n", b.len()).into_bytes();
    last.extend_from_slice(b);
    c.send(last).await;
    assert!(c.read_line().await.starts_with("250 2.0.0 OK"));
    let msgs = w.smtp.messages();
    assert_eq!(msgs[0].data, DOTTY);
    assert_eq!(msgs[0].rcpt_to, vec!["bob@example.org"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_pipelined_envelope_is_answered_in_order() {
    let w = smtp_world(SmtpMode::Implicit).await;
    let mut c = smtp_logged_in(&w).await;
    c.send("MAIL FROM:<alice@gmail.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        .await;
    assert!(c.read_line().await.starts_with("250 2.1.0"));
    assert!(c.read_line().await.starts_with("250 2.1.5"));
    assert!(c.read_line().await.starts_with("354"));
    c.send("Subject: x\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\n")
        .await;
    assert!(c.read_line().await.starts_with("250 2.0.0 OK"));
    assert!(c.read_line().await.starts_with("250 2.1.5 Flushed"));
    assert!(c.read_line().await.starts_with("250 2.0.0 OK"));
    assert_eq!(w.smtp.messages()[0].data, b"Subject: x\r\n\r\nbody\r\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_bad_token_gets_334_challenge_and_empty_line_gets_535() {
    let w = smtp_world(SmtpMode::Implicit).await;
    let mut c = TestClient::connect_tls(w.smtp.addr, w.pki.client_config()).await;
    c.read_smtp_reply().await;
    c.send_line("EHLO x").await;
    c.read_smtp_reply().await;
    c.send_line("AUTH XOAUTH2").await;
    assert_eq!(c.read_line().await, "334 ");
    c.send_line(&xoauth2_response(ALICE, "ya29.expired")).await;
    assert_eq!(
        c.read_line().await,
        format!("334 {XOAUTH2_ERROR_CHALLENGE}")
    );
    c.send_line("").await;
    let (code, lines) = c.read_smtp_reply().await;
    assert_eq!(code, 535);
    assert_eq!(
        lines[0],
        "535-5.7.8 Username and Password not accepted. For more information, go to"
    );
    assert!(lines[1].starts_with("535 5.7.8  https://support.google.com/mail/?p=BadCredentials "));
    // A non-empty answer to the challenge is a violation and gets 501.
    c.send_line("AUTH XOAUTH2").await;
    c.read_line().await;
    c.send_line(&xoauth2_response(ALICE, "ya29.expired")).await;
    c.read_line().await;
    c.send_line("MAIL FROM:<alice@gmail.com>").await;
    assert_eq!(c.read_smtp_reply().await.0, 501);
    // MAIL before AUTH.
    c.send_line("MAIL FROM:<alice@gmail.com>").await;
    let (code, lines) = c.read_smtp_reply().await;
    assert_eq!(code, 530);
    assert_eq!(
        lines[0],
        "530-5.7.0 Authentication Required. For more information, go to"
    );
    assert_eq!(w.smtp.failed_logins(), 2);
    let v = w.smtp.protocol_violations();
    assert_eq!(v.len(), 1, "{v:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_long_inline_initial_response_is_refused_with_555() {
    let w = smtp_world(SmtpMode::Implicit).await;
    let mut c = TestClient::connect_tls(w.smtp.addr, w.pki.client_config()).await;
    c.read_smtp_reply().await;
    c.send_line("EHLO x").await;
    c.read_smtp_reply().await;
    let long_token = format!("ya29.{}", "a".repeat(600));
    c.send_line(&format!(
        "AUTH XOAUTH2 {}",
        xoauth2_response(ALICE, &long_token)
    ))
    .await;
    let (code, lines) = c.read_smtp_reply().await;
    assert_eq!(code, 555);
    assert!(lines[0].starts_with("555-5.5.2 Syntax error, command line too long"));
    // A short inline IR with a valid token is accepted.
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(60));
    c.send_line(&format!("AUTH XOAUTH2 {}", xoauth2_response(ALICE, &token)))
        .await;
    assert_eq!(c.read_line().await, "235 2.7.0 Accepted");
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_close_mid_data_drops_the_connection_without_a_reply() {
    let w = smtp_world(SmtpMode::Implicit).await;
    w.smtp.set_close_mid_data(Some(10));
    let mut c = smtp_logged_in(&w).await;
    c.send("MAIL FROM:<alice@gmail.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        c.read_line().await;
    }
    c.send(dot_stuff(DOTTY)).await;
    assert_eq!(c.try_read_line().await, None);
    assert!(w.smtp.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_accepts_a_25_mb_message_quickly() {
    let w = smtp_world(SmtpMode::Implicit).await;
    let mut message = b"Subject: big\r\n\r\n".to_vec();
    let line = b".0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    while message.len() < 25 * 1024 * 1024 {
        message.extend_from_slice(line);
    }
    let wire = dot_stuff(&message);
    let mut c = smtp_logged_in(&w).await;
    c.send("MAIL FROM:<alice@gmail.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        c.read_line().await;
    }
    let start = std::time::Instant::now();
    c.send(&wire).await;
    assert!(c.read_line().await.starts_with("250 2.0.0 OK"));
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "25 MB DATA took {took:?}");
    let msgs = w.smtp.messages();
    assert!(msgs[0].data == message, "25 MB message differs");
}

// ---------------------------------------------------------------------------------------
// POP3
// ---------------------------------------------------------------------------------------

struct PopWorld {
    pki: TestPki,
    google: FakeGoogle,
    pop: FakePop3,
}

async fn pop_world(tls: PopTls) -> PopWorld {
    let pki = TestPki::new();
    let google = FakeGoogle::start().await;
    let pop = FakePop3::start(&google, &pki, tls).await;
    PopWorld { pki, google, pop }
}

const CAPA_LINES: &str = "USER\r\nRESP-CODES\r\nEXPIRE 0\r\nLOGIN-DELAY 300\r\nTOP\r\nUIDL\r\nX-GOOGLE-RICO\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\n";

async fn pop_logged_in(w: &PopWorld) -> TestClient {
    let mut c = TestClient::connect_tls(w.pop.addr, w.pki.client_config()).await;
    assert!(c
        .read_line()
        .await
        .starts_with("+OK Gpop ready for requests from 127.0.0.1 "));
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    c.send_line("AUTH XOAUTH2").await;
    assert_eq!(c.read_line().await, "+ ");
    c.send_line(&xoauth2_response(ALICE, &token)).await;
    assert_eq!(c.read_line().await, "+OK Welcome.");
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn pop3_implicit_capa_two_step_xoauth2_and_retr_is_byte_exact_with_dot_lines() {
    let w = pop_world(PopTls::Implicit).await;
    w.pop.add_message(ALICE, DOTTY);
    w.pop
        .add_message(ALICE, b"Subject: no final newline\r\n\r\n.x");
    let mut c = TestClient::connect_tls(w.pop.addr, w.pki.client_config()).await;
    c.read_line().await;
    c.send_line("CAPA").await;
    assert_eq!(c.read_line().await, "+OK Capability list follows");
    assert_eq!(c.read_pop_multiline().await, CAPA_LINES.as_bytes());
    drop(c);

    let mut c = pop_logged_in(&w).await;
    c.send_line("STAT").await;
    assert_eq!(c.read_line().await, format!("+OK 2 {}", DOTTY.len() + 31));
    c.send_line("RETR 1").await;
    assert!(c.read_line().await.starts_with("+OK"));
    assert_eq!(c.read_pop_multiline().await, DOTTY);
    c.send_line("RETR 2").await;
    assert!(c.read_line().await.starts_with("+OK"));
    assert_eq!(
        c.read_pop_multiline().await,
        b"Subject: no final newline\r\n\r\n.x\r\n"
    );
    c.send_line("QUIT").await;
    assert_eq!(c.read_line().await, "+OK Farewell.");
    c.expect_eof().await;
    assert_eq!(w.pop.successful_logins(), 1);
    assert!(w.pop.protocol_violations().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn pop3_one_line_auth_is_accepted_too() {
    let w = pop_world(PopTls::Implicit).await;
    let mut c = TestClient::connect_tls(w.pop.addr, w.pki.client_config()).await;
    c.read_line().await;
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    c.send_line(&format!("AUTH XOAUTH2 {}", xoauth2_response(ALICE, &token)))
        .await;
    assert_eq!(c.read_line().await, "+OK Welcome.");
}

#[tokio::test(flavor = "multi_thread")]
async fn pop3_stls_mode_advertises_stls_and_requires_it_before_auth() {
    let w = pop_world(PopTls::Stls).await;
    let mut c = TestClient::connect(w.pop.addr).await;
    assert!(c.read_line().await.starts_with("+OK Gpop ready"));
    c.send_line("CAPA").await;
    c.read_line().await;
    assert_eq!(
        c.read_pop_multiline().await,
        format!("{CAPA_LINES}STLS\r\n").as_bytes()
    );
    c.send_line("AUTH XOAUTH2").await;
    assert!(c.read_line().await.starts_with("-ERR"));
    assert_eq!(w.pop.protocol_violations().len(), 1);
    c.send_line("STLS").await;
    assert_eq!(c.read_line().await, "+OK Begin TLS negotiation");
    c.start_tls(w.pki.client_config()).await;
    c.send_line("CAPA").await;
    c.read_line().await;
    assert_eq!(c.read_pop_multiline().await, CAPA_LINES.as_bytes());
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    c.send_line("AUTH XOAUTH2").await;
    assert_eq!(c.read_line().await, "+ ");
    c.send_line(&xoauth2_response(ALICE, &token)).await;
    assert_eq!(c.read_line().await, "+OK Welcome.");
    assert_eq!(w.pop.protocol_violations().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn pop3_bad_token_gets_challenge_and_empty_line_gets_err_auth() {
    let w = pop_world(PopTls::Implicit).await;
    let mut c = TestClient::connect_tls(w.pop.addr, w.pki.client_config()).await;
    c.read_line().await;
    c.send_line("AUTH XOAUTH2").await;
    assert_eq!(c.read_line().await, "+ ");
    c.send_line(&xoauth2_response(ALICE, "ya29.nope")).await;
    assert_eq!(c.read_line().await, format!("+ {XOAUTH2_ERROR_CHALLENGE}"));
    c.send_line("").await;
    assert_eq!(c.read_line().await, "-ERR [AUTH] Invalid credentials.");
    c.send_line("USER alice@gmail.com").await;
    assert_eq!(c.read_line().await, "+OK send PASS");
    c.send_line("PASS hunter2").await;
    assert_eq!(
        c.read_line().await,
        "-ERR [AUTH] Application-specific password required: https://support.google.com/accounts/answer/185833"
    );
    c.send_line("STAT").await;
    assert!(c.read_line().await.starts_with("-ERR"));
    assert_eq!(w.pop.failed_logins(), 2);
    assert!(w.pop.protocol_violations().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn pop3_list_uidl_top_dele_and_quit_commits_deletions() {
    let w = pop_world(PopTls::Implicit).await;
    w.pop.add_message(ALICE, DOTTY);
    w.pop
        .add_message(ALICE, b"Subject: two\r\n\r\nl1\r\nl2\r\n");
    let mut c = pop_logged_in(&w).await;
    c.send_line("LIST").await;
    assert_eq!(c.read_line().await, "+OK");
    assert_eq!(
        c.read_pop_multiline().await,
        format!("1 {}\r\n2 24\r\n", DOTTY.len()).as_bytes()
    );
    c.send_line("LIST 2").await;
    assert_eq!(c.read_line().await, "+OK 2 24");
    c.send_line("UIDL").await;
    c.read_line().await;
    let uidl = String::from_utf8(c.read_pop_multiline().await).unwrap();
    let uids: Vec<&str> = uidl.lines().map(|l| l.split(' ').nth(1).unwrap()).collect();
    assert_eq!(uids.len(), 2);
    assert_ne!(uids[0], uids[1]);
    c.send_line("TOP 2 1").await;
    c.read_line().await;
    assert_eq!(c.read_pop_multiline().await, b"Subject: two\r\n\r\nl1\r\n");
    c.send_line("DELE 1").await;
    assert!(c.read_line().await.starts_with("+OK"));
    c.send_line("RETR 1").await;
    assert!(c.read_line().await.starts_with("-ERR"));
    c.send_line("STAT").await;
    assert_eq!(c.read_line().await, "+OK 1 24");
    c.send_line("QUIT").await;
    assert_eq!(c.read_line().await, "+OK Farewell.");
    assert_eq!(w.pop.message_count(ALICE), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn pop3_serves_a_20_mb_message_quickly() {
    let w = pop_world(PopTls::Implicit).await;
    let mut message = b"Subject: big\r\n\r\n".to_vec();
    let line = b".0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    while message.len() < 20 * 1024 * 1024 {
        message.extend_from_slice(line);
    }
    w.pop.add_message(ALICE, &message);
    let mut c = pop_logged_in(&w).await;
    let start = std::time::Instant::now();
    c.send_line("RETR 1").await;
    assert!(c.read_line().await.starts_with("+OK"));
    let got = c.read_pop_multiline().await;
    let took = start.elapsed();
    assert!(got == message, "20 MB message differs");
    assert!(took < Duration::from_secs(5), "20 MB RETR took {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn imap_fake_is_understood_by_the_async_imap_client() {
    struct XOAuth2(String);
    impl async_imap::Authenticator for XOAuth2 {
        type Response = String;
        fn process(&mut self, _challenge: &[u8]) -> String {
            self.0.clone()
        }
    }
    let w = imap_world(UpstreamTls::Implicit).await;
    w.imap.add_message(ALICE, MESSAGE);
    let tcp = tokio::net::TcpStream::connect(w.imap.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(w.pki.client_config())
        .connect(name, tcp)
        .await
        .unwrap();
    let mut client = async_imap::Client::new(tls);
    client.read_response().await.unwrap().unwrap();
    let token = w.google.mint_access_token(ALICE, Duration::from_secs(600));
    let raw = format!("user={ALICE}\x01auth=Bearer {token}\x01\x01");
    let mut session = client
        .authenticate("XOAUTH2", XOAuth2(raw))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let mailbox = session.select("INBOX").await.unwrap();
    assert_eq!(mailbox.exists, 1);
    assert_eq!(mailbox.uid_next, Some(2));
    assert_eq!(mailbox.uid_validity, Some(1));
    session.noop().await.unwrap();
    session.logout().await.unwrap();
    assert_eq!(w.imap.successful_logins(), 1);
    assert!(w.imap.protocol_violations().is_empty());
}

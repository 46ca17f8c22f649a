//! Drives the test fakes in `tests/support/` directly over real sockets (no proxy), so that
//! end-to-end tests can trust them.

mod support;

use std::time::Duration;

use support::{
    xoauth2_response, FakeGoogle, FakeImap, TestClient, TestPki, UpstreamTls, CLIENT_ID,
    CLIENT_SECRET, XOAUTH2_ERROR_CHALLENGE,
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
    google.set_delay(Duration::from_millis(300));
    let start = std::time::Instant::now();
    let (a, b) = tokio::join!(
        refresh(&google, ALICE_REFRESH),
        refresh(&google, ALICE_REFRESH)
    );
    assert_eq!((a.status, b.status), (200, 200));
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(
        took < Duration::from_millis(550),
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

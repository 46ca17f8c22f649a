//! `login` end to end, without a real browser: the real binary prints the authorization
//! address, the test plays the browser against the fake Google (whose consent page redirects
//! straight back with a code) or pastes the redirect address on standard input, as a user on a
//! headless server would.

mod cmd;
mod support;

use std::collections::HashMap;
use std::time::Duration;

use cmd::{ConfigDir, Running};
use support::FakeGoogle;
use xoauth2_proxy::oauth::device;

const ALICE: &str = "alice@gmail.com";
const WAIT: Duration = Duration::from_secs(30);

const REST: &str = "[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:1143\"\n\n[[listener]]\nprotocol = \"smtp\"\nbind = \"127.0.0.1:1587\"\n\n[[account]]\nemail = \"alice@gmail.com\"\n";

fn start_login(cfg: &ConfigDir, extra: &[&str], envs: &[(&str, &str)]) -> Running {
    let mut args = vec!["login", ALICE];
    args.extend_from_slice(extra);
    Running::start(&cfg.args(&args), envs)
}

/// The authorization address the command printed.
async fn printed_url(google: &FakeGoogle, login: &mut Running) -> String {
    login.line_starting_with(&google.auth_url, WAIT).await
}

/// Where the fake consent page sends the browser.
async fn redirect_target(url: &str) -> String {
    let response = cmd::browser(false).get(url).send().await.unwrap();
    assert_eq!(
        response.status().as_u16(),
        302,
        "{:?}",
        response.text().await
    );
    response
        .headers()
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

fn query(url: &str) -> HashMap<String, String> {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_login_stores_a_verified_refresh_token_and_says_what_to_do_next() {
    let google = FakeGoogle::start().await;
    let cfg = ConfigDir::new(&google, REST);
    let mut login = start_login(&cfg, &["--no-browser"], &[]);
    let url = printed_url(&google, &mut login).await;
    // The browser: Google's page redirects to the loopback listener, which answers.
    let page = cmd::open(&url).await;
    assert_eq!(page.status().as_u16(), 200);
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("Authorization received"));
    let out = login.finish(WAIT).await;
    assert!(out.ok(), "{out:?}");

    let issued = google.issued_refresh_tokens();
    assert_eq!(issued.len(), 1);
    assert_eq!(
        cfg.refresh_token(ALICE).as_deref(),
        Some(issued[0].1.as_str())
    );
    assert_eq!(
        google.successful_refreshes(),
        1,
        "verified with one refresh"
    );
    // What Google was asked for.
    let asked = &google.authorization_requests()[0];
    assert_eq!(asked["code_challenge_method"], "S256");
    assert_eq!(asked["code_challenge"].len(), 43);
    assert_eq!(asked["access_type"], "offline");
    assert_eq!(asked["prompt"], "consent");
    assert_eq!(asked["login_hint"], ALICE);
    assert_eq!(asked["scope"], "https://mail.google.com/");
    assert!(asked["state"].len() >= 32);
    assert!(asked["redirect_uri"].starts_with("http://127.0.0.1:"));
    // What to do next, with this config.
    let c = format!("-c {}", cfg.path.display());
    assert!(
        out.stdout
            .contains(&format!("xoauth2-proxy password add {ALICE} {c}")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("username  alice@gmail.com"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("IMAP  server 127.0.0.1  port 1143"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("SMTP  server 127.0.0.1  port 1587"),
        "{}",
        out.stdout
    );
    // Nothing secret on the terminal.
    assert!(!out.stdout.contains(&issued[0].1) && !out.stderr.contains(&issued[0].1));
}

#[tokio::test(flavor = "multi_thread")]
async fn headless_login_accepts_the_pasted_redirect_address_and_survives_a_missing_browser() {
    let google = FakeGoogle::start().await;
    let cfg = ConfigDir::new(&google, REST);
    // No --no-browser: opening one fails, which must not matter.
    let mut login = start_login(&cfg, &[], &[("BROWSER", "/nonexistent/browser")]);
    let url = printed_url(&google, &mut login).await;
    // The user opened the address on another device; its browser could not load 127.0.0.1.
    let target = redirect_target(&url).await;
    login.paste("not-a-url with spaces");
    login.paste(&target);
    let out = login.finish(WAIT).await;
    assert!(out.ok(), "{out:?}");
    assert!(
        out.stdout.contains("No browser opened here"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("not an address or a code"),
        "{}",
        out.stderr
    );
    assert_eq!(
        cfg.refresh_token(ALICE).as_deref(),
        Some(google.issued_refresh_tokens()[0].1.as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn headless_login_accepts_just_the_code() {
    let google = FakeGoogle::start().await;
    let cfg = ConfigDir::new(&google, REST);
    let mut login = start_login(&cfg, &["--no-browser"], &[]);
    let url = printed_url(&google, &mut login).await;
    let code = query(&redirect_target(&url).await)["code"].clone();
    login.paste(&code);
    let out = login.finish(WAIT).await;
    assert!(out.ok(), "{out:?}");
    assert!(cfg.refresh_token(ALICE).is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_carrying_another_state_gets_an_error_page_and_the_login_waits_for_the_right_one()
{
    let google = FakeGoogle::start().await;
    let cfg = ConfigDir::new(&google, REST);
    let mut login = start_login(&cfg, &["--no-browser"], &[]);
    let url = printed_url(&google, &mut login).await;
    let target = redirect_target(&url).await;
    let state = query(&target)["state"].clone();
    let forged = target.replace(&format!("state={state}"), "state=someone-elses");
    assert_ne!(forged, target);
    for _ in 0..3 {
        let page = cmd::open(&forged).await;
        assert_eq!(page.status().as_u16(), 400);
        assert!(page.text().await.unwrap().contains("still waiting"));
    }
    assert_eq!(
        google.token_requests(),
        0,
        "a forged code is never exchanged"
    );
    let page = cmd::open(&target).await;
    assert_eq!(page.status().as_u16(), 200);
    let out = login.finish(WAIT).await;
    assert!(out.ok(), "{out:?}");
    assert_eq!(
        cfg.refresh_token(ALICE).as_deref(),
        Some(google.issued_refresh_tokens()[0].1.as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_past_the_cap_are_closed_and_the_login_still_completes() {
    use tokio::io::AsyncReadExt;
    let google = FakeGoogle::start().await;
    let cfg = ConfigDir::new(&google, REST);
    let mut login = start_login(&cfg, &["--no-browser"], &[]);
    let url = printed_url(&google, &mut login).await;
    let target = redirect_target(&url).await;
    let listener = url::Url::parse(&target).unwrap();
    let addr = format!("127.0.0.1:{}", listener.port().unwrap());
    // Connections that send nothing, as a local process would open to tie the listener up.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // Generous bound: a refused connection is closed at once, a held one stays open for
    // the listener's 10 s read limit.
    let reads = idle.iter_mut().map(|tcp| async move {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut byte)).await,
            Ok(Ok(0))
        )
    });
    let closed = futures::future::join_all(reads)
        .await
        .into_iter()
        .filter(|c| *c)
        .count();
    assert_eq!(closed, 20 - 8, "eight held, the rest closed unread");
    drop(idle);
    // The listener frees their places as it notices them closed: the browser retries.
    let mut page = None;
    for _ in 0..50 {
        if let Ok(p) = cmd::browser(true).get(&target).send().await {
            page = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        page.expect("the listener answers again").status().as_u16(),
        200
    );
    let out = login.finish(WAIT).await;
    assert!(out.ok(), "{out:?}");
    assert!(cfg.refresh_token(ALICE).is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn declined_consent_is_explained_with_the_fix() {
    let google = FakeGoogle::start().await;
    google.set_consent_denied(true);
    let cfg = ConfigDir::new(&google, REST);
    let mut login = start_login(&cfg, &["--no-browser"], &[]);
    let url = printed_url(&google, &mut login).await;
    let page = cmd::open(&url).await;
    assert_eq!(page.status().as_u16(), 400);
    assert!(page.text().await.unwrap().contains("access_denied"));
    let out = login.finish(WAIT).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("access_denied"), "{}", out.stderr);
    assert!(out.stderr.contains("Test users"), "{}", out.stderr);
    assert_eq!(cfg.refresh_token(ALICE), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn login_gives_up_after_its_time_limit_with_a_clear_message() {
    let google = FakeGoogle::start().await;
    let cfg = ConfigDir::new(&google, REST);
    let started = std::time::Instant::now();
    let login = start_login(&cfg, &["--no-browser", "--timeout", "1"], &[]);
    let out = login.finish(WAIT).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        out.stderr.contains("no answer from Google within 1 s"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("paste here"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_client_secret_is_explained_with_the_console_step() {
    let google = FakeGoogle::start().await;
    let cfg = ConfigDir::with_secret(&google, "GOCSPX-wrong", REST);
    let mut login = start_login(&cfg, &["--no-browser"], &[]);
    let url = printed_url(&google, &mut login).await;
    cmd::open(&url).await;
    let out = login.finish(WAIT).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("invalid_client"), "{}", out.stderr);
    assert!(
        out.stderr.contains("Google Auth Platform > Clients"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("GOCSPX-wrong"));
}

#[tokio::test(flavor = "multi_thread")]
async fn login_without_an_oauth_client_says_how_to_make_one() {
    let google = FakeGoogle::start().await;
    let cfg = ConfigDir::from_text(&format!(
        "state_dir = \"state\"\n[providers.google]\ntoken_url = \"{}\"\n{REST}",
        google.token_url
    ));
    let out = cmd::run(cfg.args(&["login", ALICE, "--no-browser"]), None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("Desktop app"), "{}", out.stderr);
    assert!(out.stderr.contains("Test users"), "{}", out.stderr);
}

/// The OAuth client the fake knows, as the config would give it.
fn fake_client(google: &FakeGoogle) -> xoauth2_proxy::config::OAuthClient {
    xoauth2_proxy::config::OAuthClient {
        provider: xoauth2_proxy::provider::default_provider(),
        client_id: support::CLIENT_ID.into(),
        client_secret: Some(support::CLIENT_SECRET.into()),
        auth_url: google.auth_url.clone(),
        token_url: google.token_url.clone(),
        scope: support::google::SCOPE.into(),
    }
}

/// Run the device grant against the fake with `script` as its answers to the polls; returns
/// the outcome and the waits asked for between polls.
async fn device_grant(
    script: &[&str],
) -> (
    Result<xoauth2_proxy::oauth::token_endpoint::Granted, device::DeviceError>,
    Vec<u64>,
    usize,
) {
    let google = FakeGoogle::start().await;
    google.set_device_script(script);
    let client = fake_client(&google);
    let http = xoauth2_proxy::oauth::token_endpoint::http_client().unwrap();
    let code = device::start(
        &http,
        &client,
        &google.device_url(),
        &[support::google::SCOPE],
    )
    .await
    .unwrap();
    assert_eq!(code.user_code, "WDJB-MJHT");
    assert_eq!(code.verification_uri, "https://example.com/device");
    let waits = std::sync::Mutex::new(Vec::new());
    let outcome = device::poll(&http, &client, &code, |d| {
        waits.lock().unwrap().push(d.as_secs());
        std::future::ready(())
    })
    .await;
    let waits = waits.into_inner().unwrap();
    (outcome, waits, google.device_polls())
}

#[tokio::test(flavor = "multi_thread")]
async fn device_grant_polls_at_the_interval_and_five_seconds_slower_after_slow_down() {
    let (outcome, waits, polls) = device_grant(&[
        "authorization_pending",
        "slow_down",
        "authorization_pending",
        "ok",
    ])
    .await;
    let granted = outcome.unwrap();
    assert!(granted.access_token.expose().starts_with("ya29."));
    assert!(granted.refresh_token.is_some());
    assert_eq!(waits, [5, 10, 10]);
    assert_eq!(polls, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn device_grant_final_refusals_are_explained() {
    for (answer, expect) in [
        ("authorization_declined", "declined"),
        ("access_denied", "declined"),
        ("expired_token", "WDJB-MJHT expired"),
        (
            "bad_verification_code",
            "does not recognise the device code",
        ),
        ("invalid_client", "Google Auth Platform > Clients"),
    ] {
        let (outcome, _, polls) = device_grant(&["authorization_pending", answer]).await;
        let text = outcome.unwrap_err().to_string();
        assert!(text.contains(expect), "{answer}: {text}");
        assert_eq!(polls, 2, "{answer}: no poll after a final answer");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn device_grant_for_an_unknown_client_is_refused_before_any_poll() {
    let google = FakeGoogle::start().await;
    let mut client = fake_client(&google);
    client.client_id = "someone-else".into();
    let http = xoauth2_proxy::oauth::token_endpoint::http_client().unwrap();
    let err = device::start(
        &http,
        &client,
        &google.device_url(),
        &[support::google::SCOPE],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, xoauth2_proxy::oauth::token_endpoint::GrantError::Client(t) if t.contains("invalid_client")),
        "{err:?}"
    );
    assert_eq!(google.device_polls(), 0);
}

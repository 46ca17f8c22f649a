//! The admin listener of the real binary: `/metrics` counts scripted traffic in Prometheus text
//! that `promtool check metrics` accepts, `/livez` answers, and `/readyz` turns 503 with a
//! reason when the store can't be read.

mod cmd;
mod harness;
mod support;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use harness::ListenerSpec;
use support::{FakeGoogle, FakeImap, TestClient, TestPki, UpstreamTls};
use xoauth2_proxy::account::AccountKey;

const ALICE: &str = "alice@gmail.com";
const CAROL: &str = "carol@gmail.com";

/// `name{labels}` → value, from Prometheus text.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

async fn get(url: &str) -> (u16, String) {
    let r = cmd::browser(false).get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn post(url: &str, form: &[(&str, &str)]) -> (u16, String) {
    let r = cmd::browser(false)
        .post(url)
        .form(form)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn imap_login_ok(addr: std::net::SocketAddr, email: &str, password: &str) -> bool {
    let mut c = TestClient::connect(addr).await;
    c.read_line().await;
    c.send_line(&format!("p1 LOGIN {email} {password}")).await;
    c.read_imap_tagged("p1").await.0.starts_with("p1 OK")
}

/// "Add password" on the page shows a password once, which then logs in; "Remove" revokes it.
/// Forms without this page's CSRF token, and requests to a non-loopback host name, are refused.
async fn passwords_are_added_and_removed_from_the_page(base: &str, imap: std::net::SocketAddr) {
    let (_, html) = get(&format!("{base}/")).await;
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF token in the page")
        .to_string();
    let add = format!("{base}/passwords/add");
    let (status, _) = post(
        &add,
        &[("csrf", "forged"), ("account", ALICE), ("label", "web")],
    )
    .await;
    assert_eq!(status, 403);
    let (status, page) = post(
        &add,
        &[("csrf", &csrf), ("account", ALICE), ("label", "web")],
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let password = page
        .split("<code id=\"password\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .expect("the new password on the page")
        .to_string();
    assert!(imap_login_ok(imap, ALICE, &password).await);
    let (status, _) = post(
        &format!("{base}/passwords/remove"),
        &[("csrf", &csrf), ("account", ALICE), ("label", "web")],
    )
    .await;
    assert_eq!(status, 303);
    assert!(!imap_login_ok(imap, ALICE, &password).await);
    // DNS rebinding: the same listener, reached under another name.
    let r = cmd::browser(false)
        .get(format!("{base}/"))
        .header("host", "attacker.example:8025")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 421);
}

/// The status page: both accounts, every value escaped, and a policy that allows nothing but
/// this listener's own script and style.
async fn status_page_shows_accounts_escaped_under_a_strict_policy(base: &str) {
    let r = cmd::browser(false)
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    let html = r.text().await.unwrap();
    assert!(html.contains(ALICE) && html.contains(CAROL), "{html}");
    assert!(html.contains("&lt;b&gt;desk&lt;/b&gt;"), "{html}");
    assert!(!html.contains("<b>desk"), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external assets: {html}"
    );
    let (status, js) = get(&format!("{base}/app.js")).await;
    assert_eq!(status, 200);
    assert!(js.contains("data-expires"), "{js}");
}

/// `promtool check metrics` on the text, where promtool is installed (CI installs it and sets
/// XOAUTH2_PROXY_REQUIRE_PROMTOOL so that a missing promtool fails instead of skipping).
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("XOAUTH2_PROXY_REQUIRE_PROMTOOL").is_none(),
                "promtool is required but cannot run: {e}"
            );
            eprintln!("promtool not installed: skipping its check");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_scripted_traffic_and_probes_report_the_store() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    imap.add_message(ALICE, b"Subject: hi\r\n\r\nhello\r\n");
    let text = harness::config_text(
        &google,
        &pki,
        &[ListenerSpec::new("imap", imap.addr)],
        &[ALICE, CAROL],
    ) + "\n[admin]\nbind = \"127.0.0.1:0\"\naccount_labels = true\n";
    // One upstream IMAP session per account, so that a second one meets the cap.
    let text = text.replacen(
        "[limits]\n",
        "[limits]\nimap_connections_per_account = 1\nimap_slot_wait_ms = 100\n",
        1,
    );
    assert!(text.contains("imap_connections_per_account = 1"), "{text}");
    let dir = cmd::ConfigDir::from_text(&text);
    let alice = AccountKey::new(ALICE);
    google.add_refresh_token("1//admin", ALICE);
    xoauth2_proxy::registry::save_refresh_token(&dir.store(), &alice, &"1//admin".into()).unwrap();
    let password = xoauth2_proxy::registry::add_password(&dir.store(), &alice, "metrics").unwrap();
    let carol = AccountKey::new(CAROL);
    google.add_refresh_token("1//carol", CAROL);
    xoauth2_proxy::registry::save_refresh_token(&dir.store(), &carol, &"1//carol".into()).unwrap();
    let carol_password =
        xoauth2_proxy::registry::add_password(&dir.store(), &carol, "metrics").unwrap();
    xoauth2_proxy::registry::add_password(&dir.store(), &carol, "<b>desk</b>").unwrap();
    let path = dir.path.display().to_string();
    let serve = cmd::Running::start(&["serve".into(), "-c".into(), path], &[]);
    let imap_addr = serve.logged_bind("listening").await;
    let admin = serve.logged_bind("admin listener").await;
    let base = format!("http://{admin}");

    assert_eq!(get(&format!("{base}/livez")).await.0, 200);
    status_page_shows_accounts_escaped_under_a_strict_policy(&base).await;
    let (status, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["ready"],
        true
    );

    // One session that logs in and reads, one wrong password.
    let mut c = TestClient::connect(imap_addr).await;
    c.read_line().await;
    c.send_line(&format!("a1 LOGIN {ALICE} {}", password.expose()))
        .await;
    assert!(c.read_imap_tagged("a1").await.0.starts_with("a1 OK"));
    c.send_line("a2 SELECT INBOX").await;
    assert!(c.read_imap_tagged("a2").await.0.starts_with("a2 OK"));
    c.send_line("a3 LOGOUT").await;
    c.expect_eof().await;
    let mut c = TestClient::connect(imap_addr).await;
    c.read_line().await;
    c.send_line(&format!("b1 LOGIN {ALICE} wrong")).await;
    assert!(c.read_imap_tagged("b1").await.0.starts_with("b1 NO"));
    drop(c);

    // Sessions end asynchronously: wait until none is active.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (status, text) = get(&format!("{base}/metrics")).await;
        assert_eq!(status, 200);
        let s = samples(&text);
        if s.get("xoauth2_proxy_connections_active{protocol=\"imap\"}") == Some(&0.0) {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let s = samples(&metrics);
    assert_eq!(
        s["xoauth2_proxy_connections_accepted_total{protocol=\"imap\"}"], 2.0,
        "{metrics}"
    );
    let to_client =
        s["xoauth2_proxy_spliced_bytes_total{protocol=\"imap\",direction=\"to_client\"}"];
    let to_upstream =
        s["xoauth2_proxy_spliced_bytes_total{protocol=\"imap\",direction=\"to_upstream\"}"];
    // Up: exactly what the client sent after its login; down: SELECT's answer, BYE, LOGOUT's OK.
    assert_eq!(
        to_upstream,
        ("a2 SELECT INBOX\r\n".len() + "a3 LOGOUT\r\n".len()) as f64,
        "{metrics}"
    );
    assert!(to_client > 40.0, "{metrics}");
    assert_eq!(
        s[&format!(
            "xoauth2_proxy_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )],
        1.0
    );
    for (sample, want) in [
        ("xoauth2_proxy_local_logins_total{protocol=\"imap\",result=\"ok\"}", 1.0),
        ("xoauth2_proxy_local_logins_total{protocol=\"imap\",result=\"wrong_password\"}", 1.0),
        ("xoauth2_proxy_upstream_logins_total{protocol=\"imap\",provider=\"google\",result=\"ok\"}", 1.0),
        ("xoauth2_proxy_token_refreshes_total{result=\"ok\"}", 1.0),
        ("xoauth2_proxy_token_refresh_duration_seconds_count", 1.0),
        // One wrong password is forgiven: nobody is being slowed down.
        ("xoauth2_proxy_throttled_sources", 0.0),
    ] {
        assert_eq!(s.get(sample), Some(&want), "{sample} in\n{metrics}");
    }
    // The token fetched for the login, and the refresh token stored just now.
    let expiry = s["xoauth2_proxy_access_token_expiry_seconds{account=\"alice@gmail.com\"}"];
    assert!(expiry > 60.0 && expiry <= 3600.0, "{metrics}");
    assert_eq!(s["xoauth2_proxy_access_token_expiry_min_seconds"], expiry);
    let age = s["xoauth2_proxy_refresh_token_age_seconds{account=\"alice@gmail.com\"}"];
    assert!((0.0..60.0).contains(&age), "{metrics}");
    assert!(!metrics.contains(&password.expose().to_string()));
    promtool_accepts(&metrics);

    // Two more wrong passwords from this address: now it is being slowed down.
    for tag in ["c1", "c2"] {
        let mut c = TestClient::connect(imap_addr).await;
        c.read_line().await;
        c.send_line(&format!("{tag} LOGIN {ALICE} wrong")).await;
        assert!(c
            .read_imap_tagged(tag)
            .await
            .0
            .starts_with(&format!("{tag} NO")));
    }
    let (_, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(
        samples(&text).get("xoauth2_proxy_throttled_sources"),
        Some(&1.0),
        "{text}"
    );

    // Alice logged in while another session of hers holds the only upstream slot.
    let mut holder = TestClient::connect(imap_addr).await;
    holder.read_line().await;
    holder
        .send_line(&format!("d1 LOGIN {ALICE} {}", password.expose()))
        .await;
    assert!(holder.read_imap_tagged("d1").await.0.starts_with("d1 OK"));
    let mut c = TestClient::connect(imap_addr).await;
    c.read_line().await;
    c.send_line(&format!("e1 LOGIN {ALICE} {}", password.expose()))
        .await;
    assert!(c
        .read_imap_tagged("e1")
        .await
        .0
        .starts_with("e1 NO [LIMIT]"));
    let (_, text) = get(&format!("{base}/metrics")).await;
    let s = samples(&text);
    for (sample, want) in [
        // Alice's right password made her address trusted again.
        ("xoauth2_proxy_throttled_sources", 0.0),
        // The first two wrong answers go out at once; the third waited.
        ("xoauth2_proxy_local_logins_total{protocol=\"imap\",result=\"wrong_password\"}", 2.0),
        ("xoauth2_proxy_local_logins_total{protocol=\"imap\",result=\"throttled\"}", 1.0),
        ("xoauth2_proxy_local_logins_total{protocol=\"imap\",result=\"ok\"}", 2.0),
        ("xoauth2_proxy_local_logins_total{protocol=\"imap\",result=\"limit\"}", 1.0),
        // The refused one never reached the upstream.
        ("xoauth2_proxy_upstream_logins_total{protocol=\"imap\",provider=\"google\",result=\"ok\"}", 2.0),
    ] {
        assert_eq!(s.get(sample), Some(&want), "{sample} in\n{text}");
    }
    drop(holder);

    // A store nobody may read any more: not ready, and the reason says so.
    let store_file = dir.state_dir().join("store.enc");
    std::fs::set_permissions(&store_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the store cannot be read"), "{body}");
    std::fs::set_permissions(&store_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(get(&format!("{base}/readyz")).await.0, 200);

    // Google's token endpoint stops answering: the next refresh fails, and readiness says so
    // until a request is answered again.
    let carol_login = |tag: &'static str| {
        let pw = carol_password.expose().to_string();
        async move {
            let mut c = TestClient::connect(imap_addr).await;
            c.read_line().await;
            c.send_line(&format!("{tag} LOGIN {CAROL} {pw}")).await;
            c.read_imap_tagged(tag).await.0
        }
    };
    google.set_down(true);
    assert!(carol_login("d1").await.starts_with("d1 NO [UNAVAILABLE]"));
    let (status, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("the google token endpoint did not answer"),
        "{body}"
    );
    google.set_down(false);
    // Past the proxy's short hold on a temporary failure, the next login asks again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(carol_login("d2").await.starts_with("d2 OK"));
    assert_eq!(get(&format!("{base}/readyz")).await.0, 200);

    passwords_are_added_and_removed_from_the_page(&base, imap_addr).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_log_format_writes_one_object_per_line() {
    let text = "log_format = \"json\"\nstate_dir = \"state\"\n[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:0\"\n";
    let dir = cmd::ConfigDir::from_text(text);
    let path = dir.path.display().to_string();
    let serve = cmd::Running::start(&["serve".into(), "-c".into(), path], &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let line = loop {
        if let Some(l) = serve.stderr().lines().find(|l| l.contains("listening")) {
            break l.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "{}", serve.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let event: serde_json::Value = serde_json::from_str(&line).expect(&line);
    assert_eq!(event["level"], "INFO", "{line}");
    assert_eq!(event["message"], "listening", "{line}");
    assert_eq!(event["protocol"], "imap", "{line}");
    assert!(
        event["bind"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn authorize_on_the_page_goes_through_consent_and_the_account_then_logs_in() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let text = harness::config_text(
        &google,
        &pki,
        &[ListenerSpec::new("imap", imap.addr)],
        &[CAROL],
    ) + "\n[admin]\nbind = \"127.0.0.1:0\"\n";
    let dir = cmd::ConfigDir::from_text(&text);
    let carol = AccountKey::new(CAROL);
    let password = xoauth2_proxy::registry::add_password(&dir.store(), &carol, "mail").unwrap();
    let path = dir.path.display().to_string();
    let serve = cmd::Running::start(&["serve".into(), "-c".into(), path], &[]);
    let imap_addr = serve.logged_bind("listening").await;
    let base = format!("http://{}", serve.logged_bind("admin listener").await);
    let login = || {
        let pw = password.expose().to_string();
        async move {
            let mut c = TestClient::connect(imap_addr).await;
            c.read_line().await;
            c.send_line(&format!("a1 LOGIN {CAROL} {pw}")).await;
            c.read_imap_tagged("a1").await.0
        }
    };
    let before = login().await;
    assert!(
        before.contains("not authorized with Google yet"),
        "{before}"
    );

    let (_, html) = get(&format!("{base}/")).await;
    assert!(html.contains(">Authorize</button>"), "{html}");
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    // The browser: the page's form, Google's (simulated) consent, and back to this listener.
    let page = cmd::browser(true)
        .post(format!("{base}/authorize"))
        .form(&[("csrf", csrf.as_str()), ("account", CAROL)])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("id=\"authorized\""), "{page}");
    assert!(login().await.starts_with("a1 OK"));
    let (_, html) = get(&format!("{base}/")).await;
    assert!(html.contains(">Re-authorize</button>"), "{html}");
    // A callback nobody started is refused.
    let (status, body) = get(&format!("{base}/?state=forged&code=stolen")).await;
    assert_eq!(status, 400);
    assert!(body.contains("unknown or has expired"), "{body}");
}

/// `/live.json`, which the page polls, and the page itself: sessions open per account and
/// protocol, and the last logins and failures (an unknown user only as its digest), newest
/// first, with nothing secret.
#[tokio::test(flavor = "multi_thread")]
async fn status_page_lists_recent_logins_and_open_sessions() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let text = harness::config_text(
        &google,
        &pki,
        &[ListenerSpec::new("imap", imap.addr)],
        &[ALICE, CAROL],
    ) + "\n[admin]\nbind = \"127.0.0.1:0\"\n";
    let dir = cmd::ConfigDir::from_text(&text);
    let alice = AccountKey::new(ALICE);
    google.add_refresh_token("1//live", ALICE);
    xoauth2_proxy::registry::save_refresh_token(&dir.store(), &alice, &"1//live".into()).unwrap();
    let password = xoauth2_proxy::registry::add_password(&dir.store(), &alice, "live").unwrap();
    let path = dir.path.display().to_string();
    let serve = cmd::Running::start(&["serve".into(), "-c".into(), path], &[]);
    let imap_addr = serve.logged_bind("listening").await;
    let base = format!("http://{}", serve.logged_bind("admin listener").await);

    let mut open = TestClient::connect(imap_addr).await;
    open.read_line().await;
    open.send_line(&format!("a1 LOGIN {ALICE} {}", password.expose()))
        .await;
    assert!(open.read_imap_tagged("a1").await.0.starts_with("a1 OK"));
    for (tag, user, pw) in [
        ("b1", ALICE, "wrong-secret"),
        ("c1", "mallory@x.com", "guess"),
    ] {
        let mut c = TestClient::connect(imap_addr).await;
        c.read_line().await;
        c.send_line(&format!("{tag} LOGIN {user} {pw}")).await;
        assert!(c
            .read_imap_tagged(tag)
            .await
            .0
            .starts_with(&format!("{tag} NO")));
    }

    let (status, body) = get(&format!("{base}/live.json")).await;
    assert_eq!(status, 200, "{body}");
    let live: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(live["sessions"][ALICE]["imap"], 1, "{body}");
    let events = live["events"].as_array().unwrap();
    let summary: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["user"].as_str().unwrap().to_string(),
                e["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(summary.len(), 3, "{body}");
    assert_eq!(
        summary[1],
        (ALICE.to_string(), "wrong_password".to_string())
    );
    assert_eq!(summary[2], (ALICE.to_string(), "ok".to_string()));
    assert!(summary[0].0.starts_with("unknown user "), "{body}");
    assert_eq!(summary[0].1, "wrong_password");
    for e in events {
        assert_eq!(e["protocol"], "imap");
        assert!(e["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
    }
    for secret in [password.expose(), "wrong-secret", "guess", "mallory"] {
        assert!(!body.contains(secret), "{secret} in {body}");
    }
    let (_, html) = get(&format!("{base}/")).await;
    assert!(
        html.contains("data-sessions=\"alice@gmail.com\">imap 1<"),
        "{html}"
    );
    assert!(
        html.contains("data-sessions=\"carol@gmail.com\">none<"),
        "{html}"
    );
    assert!(html.contains("<td>wrong_password</td>"), "{html}");

    // The session ends: the count goes back to none.
    open.send_line("a2 LOGOUT").await;
    open.expect_eof().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = get(&format!("{base}/live.json")).await;
        let live: serde_json::Value = serde_json::from_str(&body).unwrap();
        if live["sessions"].as_object().is_some_and(|s| s.is_empty()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTPS client that trusts the test CA, with Basic auth when `password` is given.
async fn https_get(
    pki: &TestPki,
    url: &str,
    password: Option<&str>,
    host: Option<&str>,
) -> reqwest::Response {
    let tls = xoauth2_proxy::tls::client_config(Some(&pki.ca_pem_path)).unwrap();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut request = client.get(url);
    if let Some(pw) = password {
        request = request.basic_auth("admin", Some(pw));
    }
    if let Some(host) = host {
        request = request.header("host", host);
    }
    request.send().await.unwrap()
}

/// `admin-password` prints a hash; with it and `[tls]`, the admin listener may bind every
/// address and then serves HTTPS only, behind Basic auth that the brute-force throttle slows
/// down, answering the host names in `[admin] hosts`.
#[tokio::test(flavor = "multi_thread")]
async fn remote_admin_serves_https_behind_the_admin_password() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let hashed = cmd::run(
        vec!["admin-password".into()],
        Some("admin secret 1\n".into()),
    )
    .await;
    assert!(hashed.ok(), "{hashed:?}");
    let hash = hashed.stdout.trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hashed.stdout.contains("admin secret 1"));
    let text = harness::config_text(
        &google,
        &pki,
        &[ListenerSpec::new("imap", imap.addr)],
        &[ALICE],
    ) + &format!(
        "\n[admin]\nbind = \"0.0.0.0:0\"\nhosts = [\"proxy.example.com\"]\npassword_hash = \"{hash}\"\n"
    );
    let dir = cmd::ConfigDir::from_text(&text);
    let path = dir.path.display().to_string();
    let serve = cmd::Running::start(&["serve".into(), "-c".into(), path], &[]);
    let port = serve.logged_bind("admin listener").await.port();
    let base = format!("https://127.0.0.1:{port}");

    let r = https_get(&pki, &format!("{base}/"), None, None).await;
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic "));
    assert_eq!(
        https_get(&pki, &format!("{base}/livez"), None, None)
            .await
            .status()
            .as_u16(),
        200,
        "the liveness probe needs no password"
    );
    for _ in 0..3 {
        let r = https_get(&pki, &format!("{base}/metrics"), Some("guess"), None).await;
        assert_eq!(r.status().as_u16(), 401);
    }
    let log = serve
        .logged_times("repeated failed logins from this address", 1)
        .await;
    assert!(
        !log.contains("guess") && !log.contains("admin secret"),
        "{log}"
    );

    let r = https_get(&pki, &format!("{base}/"), Some("admin secret 1"), None).await;
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains(ALICE));
    let named = Some("proxy.example.com:443");
    let r = https_get(
        &pki,
        &format!("{base}/readyz"),
        Some("admin secret 1"),
        named,
    )
    .await;
    assert_eq!(r.status().as_u16(), 200);
    let elsewhere = Some("attacker.example");
    let r = https_get(&pki, &format!("{base}/"), Some("admin secret 1"), elsewhere).await;
    assert_eq!(r.status().as_u16(), 421);
    // Plain HTTP gets no page.
    let plain = cmd::browser(false)
        .get(format!("http://127.0.0.1:{port}/"))
        .basic_auth("admin", Some("admin secret 1"))
        .timeout(Duration::from_secs(15))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
}

/// Start the config's admin listener with CAROL unauthorized; returns the running serve, the
/// IMAP address, the admin base URL, the page's CSRF token and Carol's password.
async fn admin_with_unauthorized_carol(
    google: &FakeGoogle,
    pki: &TestPki,
    imap: &FakeImap,
    admin: &str,
) -> (
    cmd::ConfigDir,
    cmd::Running,
    std::net::SocketAddr,
    String,
    String,
    String,
) {
    let text = harness::config_text(
        google,
        pki,
        &[ListenerSpec::new("imap", imap.addr)],
        &[CAROL],
    ) + admin;
    let dir = cmd::ConfigDir::from_text(&text);
    let carol = AccountKey::new(CAROL);
    let password = xoauth2_proxy::registry::add_password(&dir.store(), &carol, "mail").unwrap();
    let path = dir.path.display().to_string();
    let serve = cmd::Running::start(&["serve".into(), "-c".into(), path], &[]);
    let imap_addr = serve.logged_bind("listening").await;
    let admin = serve.logged_bind("admin listener:").await;
    let base = format!("http://{admin}");
    let (_, html) = get(&format!("{base}/")).await;
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    let password = password.expose().to_string();
    (dir, serve, imap_addr, base, csrf, password)
}

/// A remote browser can't load the 127.0.0.1 address consent sends it to: the person pastes
/// that address into the page's form, which finishes the authorization (state checked, PKCE).
#[tokio::test(flavor = "multi_thread")]
async fn a_pasted_redirect_address_finishes_an_authorization_started_on_the_page() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let admin = "\n[admin]\nbind = \"127.0.0.1:0\"\n";
    let (_dir, _serve, imap_addr, base, csrf, password) =
        admin_with_unauthorized_carol(&google, &pki, &imap, admin).await;
    let (_, html) = get(&format!("{base}/")).await;
    assert!(html.contains("action=\"/authorize/finish\""), "{html}");

    // The browser: the page's form, then consent, which sends it back to an address that
    // (on another device) would not load; nobody follows that last redirect.
    let consent = cmd::browser(false)
        .post(format!("{base}/authorize"))
        .form(&[("csrf", csrf.as_str()), ("account", CAROL)])
        .send()
        .await
        .unwrap();
    let consent_url = consent.headers()["location"].to_str().unwrap().to_string();
    let back = cmd::browser(false).get(&consent_url).send().await.unwrap();
    let redirected = back.headers()["location"].to_str().unwrap().to_string();
    assert!(redirected.contains("code="), "{redirected}");

    let finish = format!("{base}/authorize/finish");
    let forged = redirected.replace("state=", "state=x");
    let (status, page) = post(&finish, &[("csrf", &csrf), ("redirect", &forged)]).await;
    assert_eq!(status, 400, "{page}");
    let (status, _) = post(&finish, &[("csrf", "forged"), ("redirect", &redirected)]).await;
    assert_eq!(status, 403);
    let (status, page) = post(&finish, &[("csrf", &csrf), ("redirect", "hello")]).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("Paste the whole address"), "{page}");
    let (status, page) = post(&finish, &[("csrf", &csrf), ("redirect", &redirected)]).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("id=\"authorized\""), "{page}");
    assert!(imap_login_ok(imap_addr, CAROL, &password).await);
    // Used once: the same address again finds no authorization waiting.
    let (status, _) = post(&finish, &[("csrf", &csrf), ("redirect", &redirected)]).await;
    assert_eq!(status, 400);
}

/// An admin listener on [::1] can't receive redirects to 127.0.0.1 itself: a loopback
/// callback listener of its own does, and the authorization completes in the browser.
#[tokio::test(flavor = "multi_thread")]
async fn an_admin_listener_on_ipv6_loopback_still_receives_the_consent_redirect() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let admin = "\n[admin]\nbind = \"[::1]:0\"\n";
    let (_dir, serve, imap_addr, base, csrf, password) =
        admin_with_unauthorized_carol(&google, &pki, &imap, admin).await;
    assert!(base.starts_with("http://[::1]:"), "{base}");
    let callback = serve
        .logged_bind("authorization redirects arrive here")
        .await;
    assert!(
        callback.ip().is_loopback() && callback.is_ipv4(),
        "{callback}"
    );
    let page = cmd::browser(true)
        .post(format!("{base}/authorize"))
        .form(&[("csrf", csrf.as_str()), ("account", CAROL)])
        .send()
        .await
        .unwrap();
    assert_eq!(page.url().port(), Some(callback.port()));
    let page = page.text().await.unwrap();
    assert!(page.contains("id=\"authorized\""), "{page}");
    assert!(imap_login_ok(imap_addr, CAROL, &password).await);
}

//! Getting and keeping credentials: service accounts (JWT bearer, verified by the fake Google),
//! `accounts` and `check`, background refresh, and the store shared between a running `serve`
//! and other processes (parallel writers, writers killed midway, `login` taking effect at once).

mod cmd;
mod harness;
mod support;

use std::time::Duration;

use cmd::ConfigDir;
use harness::{config_text, ListenerSpec, Proxy};
use support::{
    FakeGoogle, FakeImap, FakePop3, FakeSmtp, PopTls, SmtpMode, TestClient, TestPki, UpstreamTls,
};
use xoauth2_proxy::oauth::service_account::ServiceAccount;

const ALICE: &str = "alice@gmail.com";
const BOB: &str = "bob@gmail.com";
const SVC: &str = "carol@corp.example";
const SA_EMAIL: &str = "mail-proxy@test-project.iam.gserviceaccount.com";

/// IMAP LOGIN through the proxy; the tagged answer.
async fn imap_login(addr: std::net::SocketAddr, email: &str, password: &str) -> String {
    let mut c = TestClient::connect(addr).await;
    c.read_line().await;
    c.send_line(&format!("a LOGIN {email} {password}")).await;
    c.read_imap_tagged("a").await.0
}

fn config_args(proxy: &Proxy, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    v.push("-c".into());
    v.push(proxy.config_path.display().to_string());
    v
}

/// A proxy with one IMAP listener and a service account mailbox (plus `others`).
async fn proxy_with_service_account(
    google: &FakeGoogle,
    pki: &TestPki,
    imap: &FakeImap,
    others: &[&str],
) -> (Proxy, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let (key_path, public) = cmd::service_account_key(keys.path(), SA_EMAIL);
    google.add_service_account(SA_EMAIL, &public);
    let mut text = config_text(google, pki, &[ListenerSpec::new("imap", imap.addr)], others);
    text.push_str(&format!(
        "\n[[account]]\nemail = \"{SVC}\"\nservice_account_key = \"{}\"\n",
        key_path.display()
    ));
    (Proxy::start_with_config(&text).await, keys)
}

#[tokio::test(flavor = "multi_thread")]
async fn service_account_mailbox_logs_in_with_a_token_from_a_signed_jwt() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let (proxy, _keys) = proxy_with_service_account(&google, &pki, &imap, &[]).await;
    let pw = proxy.add_password(SVC, "laptop");
    let tagged = imap_login(proxy.addrs[0], SVC, &pw).await;
    assert!(tagged.starts_with("a OK"), "{tagged}");
    let claims = google.accepted_jwt_claims();
    assert_eq!(claims.len(), 1);
    let c = &claims[0];
    assert_eq!(c["iss"], SA_EMAIL);
    assert_eq!(c["sub"], SVC);
    assert_eq!(c["scope"], "https://mail.google.com/");
    assert_eq!(c["aud"], google.token_url.as_str());
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
    // Cached like any token: a second login asks Google nothing.
    let tagged = imap_login(proxy.addrs[0], SVC, &pw).await;
    assert!(tagged.starts_with("a OK"), "{tagged}");
    assert_eq!(google.token_requests(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn fake_google_refuses_expired_wrong_audience_and_foreign_signed_assertions() {
    let google = FakeGoogle::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (path, public) = cmd::service_account_key(keys.path(), SA_EMAIL);
    google.add_service_account(SA_EMAIL, &public);
    let sa = ServiceAccount::load(&path).unwrap();
    let (other_path, _) = cmd::service_account_key(&keys.path().join(".."), "x@y.z");
    let mut other = std::fs::read_to_string(&other_path).unwrap();
    other = other.replace("x@y.z", SA_EMAIL);
    std::fs::write(&other_path, other).unwrap();
    let impostor = ServiceAccount::load(&other_path).unwrap();
    let scope = "https://mail.google.com/";
    let now = std::time::SystemTime::now();
    let post = |assertion: String| {
        let url = google.token_url.clone();
        async move {
            let r = cmd::browser(false)
                .post(url)
                .form(&[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", assertion.as_str()),
                ])
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let expired = sa
        .assertion(
            SVC,
            scope,
            &google.token_url,
            now - Duration::from_secs(7200),
        )
        .unwrap();
    let (status, body) = post(expired.expose().to_string()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("short-lived"));

    let wrong_aud = sa
        .assertion(SVC, scope, "https://oauth2.googleapis.com/token", now)
        .unwrap();
    let (status, body) = post(wrong_aud.expose().to_string()).await;
    assert_eq!(status, 400);
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("audience"));

    let forged = impostor
        .assertion(SVC, scope, &google.token_url, now)
        .unwrap();
    let (status, body) = post(forged.expose().to_string()).await;
    assert_eq!(status, 400);
    assert_eq!(body["error_description"], "Invalid JWT Signature.");

    let good = sa.assertion(SVC, scope, &google.token_url, now).unwrap();
    let (status, body) = post(good.expose().to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].as_str().unwrap().starts_with("ya29."));
    assert!(body.get("refresh_token").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_domain_wide_delegation_is_explained_with_the_admin_console_step() {
    let google = FakeGoogle::start().await;
    google.set_delegation_granted(false);
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let (proxy, _keys) = proxy_with_service_account(&google, &pki, &imap, &[]).await;
    // A mail client sees a failure in words…
    let pw = proxy.add_password(SVC, "laptop");
    let tagged = imap_login(proxy.addrs[0], SVC, &pw).await;
    assert!(tagged.starts_with("a NO"), "{tagged}");
    // …and `check` says what the admin must do.
    let out = cmd::run(config_args(&proxy, &["check"]), None).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains(&format!("account {SVC}")))
        .unwrap_or_default()
        .to_string();
    assert!(line.starts_with("FAIL"), "{}", out.stdout);
    assert!(line.contains("unauthorized_client"), "{line}");
    assert!(line.contains("Manage domain-wide delegation"), "{line}");
    assert!(
        line.contains("109876543210987654321"),
        "numeric client ID: {line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_shows_credential_expiry_age_passwords_and_what_to_do() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let (proxy, _keys) = proxy_with_service_account(&google, &pki, &imap, &[ALICE, BOB]).await;
    let pw = proxy.authorize(&google, ALICE);
    // serve got a token for alice: `accounts` in another process shows its expiry.
    assert!(imap_login(proxy.addrs[0], ALICE, &pw)
        .await
        .starts_with("a OK"));

    let out = cmd::run(config_args(&proxy, &["accounts", "--json"]), None).await;
    assert!(out.ok(), "{out:?}");
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let row = |email: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["email"] == email)
            .unwrap()
            .clone()
    };
    let alice = row(ALICE);
    assert_eq!(alice["credential"], "authorized");
    assert_eq!(alice["passwords"], 1);
    assert!(alice["refresh_token_age_secs"].as_i64().unwrap() < 60);
    let left =
        alice["access_token_expires_at"].as_i64().unwrap() - xoauth2_proxy::clock::now_unix();
    assert!((3000..=3600).contains(&left), "{alice}");
    assert_eq!(alice["attention"], serde_json::json!([]));
    let bob = row(BOB);
    assert_eq!(bob["credential"], "missing");
    assert!(bob["attention"][0]
        .as_str()
        .unwrap()
        .contains("xoauth2-proxy login bob@gmail.com"));
    let svc = row(SVC);
    assert_eq!(svc["credential"], "service_account");
    assert!(svc["refresh_token_age_secs"].is_null());

    let table = cmd::run(config_args(&proxy, &["accounts"]), None).await;
    assert!(table.ok(), "{table:?}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(lines[0].starts_with("EMAIL"), "{}", table.stdout);
    assert_eq!(lines.len(), 4, "{}", table.stdout);
    assert!(table.stdout.contains("service account"));
    // Nothing secret in either form.
    let rt = format!("1//refresh-{ALICE}");
    assert!(!out.stdout.contains(&rt) && !table.stdout.contains(&rt));
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_every_account_and_upstream_and_fails_when_one_does() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let smtp = FakeSmtp::start(&google, &pki, SmtpMode::StartTls).await;
    let pop = FakePop3::start(&google, &pki, PopTls::Stls).await;
    let listeners = [
        ListenerSpec::new("imap", imap.addr),
        ListenerSpec::new("smtp", smtp.addr).upstream_tls("starttls"),
        ListenerSpec::new("pop3", pop.addr).upstream_tls("starttls"),
    ];
    // `check` binds nothing; distinct ports only because the config refuses duplicates.
    let mut text = config_text(&google, &pki, &listeners, &[ALICE, BOB]);
    for port in 1..=3 {
        text = text.replacen(
            "bind = \"127.0.0.1:0\"",
            &format!("bind = \"127.0.0.1:{port}\""),
            1,
        );
    }
    let cfg = ConfigDir::from_text(&text);
    let authorize = |email: &str| {
        let rt = format!("1//refresh-{email}");
        google.add_refresh_token(&rt, email);
        xoauth2_proxy::registry::save_refresh_token(
            &cfg.store(),
            &xoauth2_proxy::account::AccountKey::new(email),
            &rt.as_str().into(),
        )
        .unwrap();
    };
    authorize(ALICE);
    let out = cmd::run(cfg.args(&["check"]), None).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let find = |prefix: &str| {
        out.stdout
            .lines()
            .find(|l| l.contains(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in\n{}", out.stdout))
            .to_string()
    };
    assert!(find("config").starts_with("ok"));
    assert!(find("store").starts_with("ok"));
    assert!(find(&format!("account {ALICE}")).starts_with("ok"));
    let bob = find(&format!("account {BOB}"));
    assert!(bob.starts_with("FAIL"), "{bob}");
    assert!(bob.contains("xoauth2-proxy login bob@gmail.com"), "{bob}");
    for (protocol, how) in [("imap", "TLS"), ("smtp", "STARTTLS"), ("pop3", "STARTTLS")] {
        let line = find(&format!("listener {protocol}"));
        assert!(line.starts_with("ok"), "{line}");
        assert!(line.contains(&format!("{how}, greeting")), "{line}");
    }
    assert!(
        out.stderr.contains("1 of 7 checks failed"),
        "{}",
        out.stderr
    );

    // Once bob is authorized too, everything passes.
    authorize(BOB);
    let out = cmd::run(cfg.args(&["check"]), None).await;
    assert!(out.ok(), "{out:?}");
    assert!(
        out.stdout.contains("All 7 checks passed."),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_fails_on_an_upstream_that_does_not_speak_tls() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::StartTls).await;
    // Configured as implicit TLS, but the server greets in plain text.
    let proxy = Proxy::start(&google, &pki, &[ListenerSpec::new("imap", imap.addr)], &[]).await;
    let out = cmd::run(config_args(&proxy, &["check"]), None).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("listener imap"))
        .unwrap();
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(line.contains("upstream_tls"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_of_an_account_in_use_are_refreshed_before_they_expire() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let proxy = Proxy::start(
        &google,
        &pki,
        &[ListenerSpec::new("imap", imap.addr)],
        &[ALICE],
    )
    .await;
    let pw = proxy.authorize(&google, ALICE);
    proxy
        .app
        .tokens
        .set_min_background_age(Duration::from_secs(1));
    google.set_expires_in(8);
    assert!(imap_login(proxy.addrs[0], ALICE, &pw)
        .await
        .starts_with("a OK"));
    assert_eq!(google.token_requests(), 1);
    // With an 8 s token, the background refresh is due 4 s before expiry; no login asks.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while google.token_requests() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no background refresh"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refreshed_at = std::time::Instant::now();
    // A login now finds the new token: no request of its own.
    assert!(imap_login(proxy.addrs[0], ALICE, &pw)
        .await
        .starts_with("a OK"));
    if refreshed_at.elapsed() < Duration::from_secs(2) {
        assert_eq!(google.token_requests(), 2);
    }
    // An account nobody logs in to is left alone.
    google.set_expires_in(3599);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_parallel_password_adds_while_serve_runs_lose_nothing() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let proxy = Proxy::start(
        &google,
        &pki,
        &[ListenerSpec::new("imap", imap.addr)],
        &[ALICE],
    )
    .await;
    proxy.authorize(&google, ALICE);
    let runs: Vec<_> = (0..50)
        .map(|i| {
            let args = config_args(
                &proxy,
                &["password", "add", ALICE, "--label", &format!("client-{i}")],
            );
            tokio::task::spawn_blocking(move || cmd::run_blocking(&args, None, &[]))
        })
        .collect();
    let mut passwords = Vec::new();
    for run in runs {
        let out = run.await.unwrap();
        assert!(out.ok(), "{out:?}");
        passwords.push(out.stdout.lines().last().unwrap().to_string());
    }
    let (data, _) = proxy.store().load().unwrap();
    let labels: std::collections::HashSet<_> = data
        .account(&xoauth2_proxy::account::AccountKey::new(ALICE))
        .unwrap()
        .passwords
        .iter()
        .map(|p| p.label.clone())
        .collect();
    assert_eq!(labels.len(), 51, "the harness's one and fifty new ones");
    // The running serve accepts them at once, without a restart.
    for pw in [&passwords[0], &passwords[25], &passwords[49]] {
        let tagged = imap_login(proxy.addrs[0], ALICE, pw).await;
        assert!(tagged.starts_with("a OK"), "{tagged}");
    }
    // And a removed one stops working at once.
    let out = cmd::run(
        config_args(&proxy, &["password", "remove", ALICE, "client-0"]),
        None,
    )
    .await;
    assert!(out.ok(), "{out:?}");
    assert!(imap_login(proxy.addrs[0], ALICE, &passwords[0])
        .await
        .starts_with("a NO"));
}

#[tokio::test(flavor = "multi_thread")]
async fn writers_killed_midway_leave_a_loadable_store() {
    let google = FakeGoogle::start().await;
    let cfg = ConfigDir::new(&google, "[[account]]\nemail = \"alice@gmail.com\"\n");
    let first = cmd::run(
        cfg.args(&["password", "add", ALICE, "--label", "first"]),
        None,
    )
    .await;
    assert!(first.ok(), "{first:?}");
    let mut survivors = vec!["first".to_string()];
    for i in 0..40u64 {
        let label = format!("k{i}");
        let args = cfg.args(&["password", "add", ALICE, "--label", &label]);
        let mut child = cmd::command(&args, &[]).spawn().unwrap();
        // Kill at a different moment each time: before, during and after the write.
        std::thread::sleep(Duration::from_millis((i * 7) % 90));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.success() {
            survivors.push(label);
        }
        // Every intermediate state is a store the next process can read.
        let (data, _) = cfg
            .store()
            .load()
            .unwrap_or_else(|e| panic!("after kill {i}: {e}"));
        let labels: Vec<_> = data
            .account(&xoauth2_proxy::account::AccountKey::new(ALICE))
            .map(|a| a.passwords.iter().map(|p| p.label.clone()).collect())
            .unwrap_or_default();
        for s in &survivors {
            assert!(labels.contains(s), "{s} lost after kill {i}");
        }
    }
    // What a writer killed between creating its temp file and the rename leaves behind.
    std::fs::write(
        cfg.state_dir().join(".store.enc.4242.dead.tmp"),
        b"XO2PST01 half",
    )
    .unwrap();
    assert!(cfg.store().load().is_ok());
    // A later writer succeeds and clears what killed writers left behind.
    let last = cmd::run(
        cfg.args(&["password", "add", ALICE, "--label", "last"]),
        None,
    )
    .await;
    assert!(last.ok(), "{last:?}");
    let leftovers: Vec<_> = std::fs::read_dir(cfg.state_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn login_while_serve_runs_takes_effect_at_once() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let proxy = Proxy::start(
        &google,
        &pki,
        &[ListenerSpec::new("imap", imap.addr)],
        &[ALICE],
    )
    .await;
    let pw = proxy.add_password(ALICE, "laptop");
    let tagged = imap_login(proxy.addrs[0], ALICE, &pw).await;
    assert!(tagged.starts_with("a NO"), "not authorized yet: {tagged}");
    let mut login =
        cmd::Running::start(&config_args(&proxy, &["login", ALICE, "--no-browser"]), &[]);
    let url = login
        .line_starting_with(&google.auth_url, Duration::from_secs(30))
        .await;
    cmd::open(&url).await;
    let out = login.finish(Duration::from_secs(30)).await;
    assert!(out.ok(), "{out:?}");
    let tagged = imap_login(proxy.addrs[0], ALICE, &pw).await;
    assert!(tagged.starts_with("a OK"), "{tagged}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_refresh_token_is_saved_and_used_from_then_on() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    let proxy = Proxy::start(
        &google,
        &pki,
        &[ListenerSpec::new("imap", imap.addr)],
        &[ALICE],
    )
    .await;
    let pw = proxy.authorize(&google, ALICE);
    let original = format!("1//refresh-{ALICE}");
    google.set_rotate_refresh_tokens(true);
    assert!(imap_login(proxy.addrs[0], ALICE, &pw)
        .await
        .starts_with("a OK"));
    let stored = |proxy: &Proxy| {
        let (data, _) = proxy.store().load().unwrap();
        data.account(&xoauth2_proxy::account::AccountKey::new(ALICE))
            .and_then(|a| a.refresh_token.as_ref())
            .map(|t| t.expose().to_string())
            .unwrap()
    };
    let first = stored(&proxy);
    assert_ne!(first, original);
    assert!(!google.refresh_token_is_live(&original));
    assert!(google.refresh_token_is_live(&first));
    // The next refresh (the cached token was refused upstream) uses the saved one.
    google.invalidate_access_tokens();
    assert!(imap_login(proxy.addrs[0], ALICE, &pw)
        .await
        .starts_with("a OK"));
    assert_ne!(stored(&proxy), first);
    assert_eq!(google.successful_refreshes(), 2);
}

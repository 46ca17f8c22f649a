//! The real binary with Microsoft accounts: `login --device` against the fake identity
//! platform, `check` and `accounts` naming the fix for AADSTS refusals, and rotating refresh
//! tokens that survive `kill -9` at any point.

mod cmd;
mod harness;
mod support;

use std::time::{Duration, Instant};

use rand::Rng;
use support::FakeGoogle;

const TENANT: &str = "contoso.onmicrosoft.com";
const BOB: &str = "bob@contoso.com";

fn config(google: &FakeGoogle, accounts: &[&str]) -> cmd::ConfigDir {
    let mut text = format!(
        "state_dir = \"state\"\n\n{}",
        google.ms_provider_section(TENANT)
    );
    for a in accounts {
        text.push_str(&format!(
            "\n[[account]]\nemail = \"{a}\"\nprovider = \"microsoft\"\n"
        ));
    }
    cmd::ConfigDir::from_text(&text)
}

#[tokio::test(flavor = "multi_thread")]
async fn device_login_shows_the_code_slows_down_when_asked_and_stores_the_grant() {
    let google = FakeGoogle::start().await;
    google.set_device_interval(1);
    google.set_device_script(&["authorization_pending", "slow_down", "ok"]);
    google.set_consent_email(Some(BOB));
    let dir = config(&google, &[BOB]);
    let started = Instant::now();
    let out = cmd::run(dir.args(&["login", BOB, "--device"]), None).await;
    assert!(out.ok(), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("https://microsoft.com/devicelogin"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("MSFT-CODE9"), "{}", out.stdout);
    assert_eq!(google.device_polls(), 3);
    // 1 s, 1 s, then 1 + 5 s after slow_down (RFC 8628 §3.5).
    assert!(
        started.elapsed() >= Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );
    let stored = dir.refresh_token(BOB).expect("refresh token stored");
    assert!(google.refresh_token_is_live(&stored));
    assert!(google.ms_tenants().iter().all(|t| t == TENANT));
}

#[tokio::test(flavor = "multi_thread")]
async fn device_login_explains_a_declined_or_expired_code_and_stores_nothing() {
    let google = FakeGoogle::start().await;
    google.set_device_interval(1);
    for (answer, words) in [
        ("authorization_declined", "declined"),
        ("expired_token", "expired"),
        ("bad_verification_code", "bad_verification_code"),
    ] {
        google.set_device_script(&[answer]);
        let dir = config(&google, &[BOB]);
        let out = cmd::run(dir.args(&["login", BOB, "--device"]), None).await;
        assert!(!out.ok());
        assert!(out.stderr.contains(words), "{answer}: {}", out.stderr);
        assert_eq!(dir.refresh_token(BOB), None, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_during_a_device_login_stores_nothing() {
    let google = FakeGoogle::start().await;
    google.set_device_interval(1);
    google.set_device_script(&["authorization_pending"]);
    let dir = config(&google, &[BOB]);
    let mut login = cmd::Running::start(&dir.args(&["login", BOB, "--device"]), &[]);
    login
        .line_starting_with("    MSFT-CODE9", Duration::from_secs(20))
        .await;
    login.interrupt();
    let out = login.finish(Duration::from_secs(20)).await;
    assert!(!out.ok());
    assert!(
        out.stderr.contains("interrupted; nothing was stored"),
        "{}",
        out.stderr
    );
    assert_eq!(dir.refresh_token(BOB), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn device_login_for_a_google_account_points_to_no_browser() {
    let google = FakeGoogle::start().await;
    let base = std::fs::read_to_string(config(&google, &[]).path).unwrap();
    let dir = cmd::ConfigDir::from_text(&format!(
        "{base}\n[[account]]\nemail = \"alice@gmail.com\"\n"
    ));
    let out = cmd::run(dir.args(&["login", "alice@gmail.com", "--device"]), None).await;
    assert!(!out.ok());
    assert!(
        out.stderr.contains("does not allow the Gmail scope"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--no-browser"), "{}", out.stderr);
    assert_eq!(google.device_polls(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn check_and_accounts_name_the_fix_for_an_aadsts_refusal() {
    let google = FakeGoogle::start().await;
    let dir = config(&google, &[BOB]);
    let bob = xoauth2_proxy::account::AccountKey::new(BOB);
    google.add_ms_refresh_token("M.R3_bob", BOB);
    let authorize = |store| {
        xoauth2_proxy::registry::save_refresh_token(&store, &bob, &"M.R3_bob".into()).unwrap()
    };
    authorize(dir.store());
    google.set_ms_refusal(Some((
        400,
        "invalid_grant",
        "AADSTS65001: The user or administrator has not consented to use the application.",
    )));
    let out = cmd::run(dir.args(&["check"]), None).await;
    assert!(!out.ok());
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains(BOB))
        .unwrap_or_default();
    assert!(line.starts_with("FAIL"), "{}", out.stdout);
    assert!(line.contains("Grant admin consent"), "{line}");
    // A running proxy publishes its last refusal; `accounts` shows it with the fix.
    let proxy =
        harness::Proxy::start_with_config(&std::fs::read_to_string(&dir.path).unwrap()).await;
    authorize(proxy.store());
    let _ = proxy.app.tokens.get(&bob).await;
    let out = cmd::run(
        vec![
            "accounts".into(),
            "--json".into(),
            "-c".into(),
            proxy.config_path.display().to_string(),
        ],
        None,
    )
    .await;
    assert!(out.ok(), "{}", out.stderr);
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let bob = rows
        .as_array()
        .and_then(|r| r.iter().find(|r| r["email"] == BOB))
        .cloned()
        .unwrap_or_default();
    let attention = bob["attention"].to_string();
    assert!(attention.contains("Grant admin consent"), "{attention}");
}

/// A `check` run refreshes every account, rotating each refresh token; killed with SIGKILL at
/// a random point, it must leave a readable store whose refresh tokens all still work.
#[tokio::test(flavor = "multi_thread")]
async fn refresh_tokens_survive_twenty_kill_9s_at_random_points() {
    let google = FakeGoogle::start().await;
    google.set_delay(Duration::from_millis(15));
    let accounts: Vec<String> = (0..6).map(|i| format!("user{i}@contoso.com")).collect();
    let names: Vec<&str> = accounts.iter().map(String::as_str).collect();
    let dir = config(&google, &names);
    for a in &accounts {
        let token = format!("M.R3_first_{a}");
        google.add_ms_refresh_token(&token, a);
        xoauth2_proxy::registry::save_refresh_token(
            &dir.store(),
            &xoauth2_proxy::account::AccountKey::new(a),
            &token.as_str().into(),
        )
        .unwrap();
    }
    let args = dir.args(&["check"]);
    for run in 0..20 {
        let delay = Duration::from_millis(rand::thread_rng().gen_range(0..400));
        let args = args.clone();
        let status = tokio::task::spawn_blocking(move || {
            let mut child = cmd::command(&args, &[]).spawn().unwrap();
            std::thread::sleep(delay);
            let _ = child.kill();
            child.wait().unwrap()
        })
        .await
        .unwrap();
        for a in &accounts {
            let stored = dir.refresh_token(a).unwrap_or_default();
            assert!(
                google.refresh_token_is_live(&stored),
                "run {run} (killed after {delay:?}, {status}): the stored refresh token of {a} does not work"
            );
        }
    }
    let rotated = accounts
        .iter()
        .filter(|a| {
            dir.refresh_token(a)
                .is_some_and(|t| !t.starts_with("M.R3_first_"))
        })
        .count();
    assert!(
        google.successful_refreshes() > 0 && rotated > 0,
        "no run got as far as a rotation"
    );
    let out = cmd::run(args, None).await;
    assert!(
        out.ok(),
        "after the kills every account still refreshes:\n{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_login_asks_one_consent_for_every_protocol_with_pkce_and_stores_the_newest_token() {
    let google = FakeGoogle::start().await;
    let dir = config(&google, &[BOB]);
    let mut login = cmd::Running::start(&dir.args(&["login", BOB, "--no-browser"]), &[]);
    let prefix = format!("{}/{TENANT}/oauth2/v2.0/authorize?", google.base_url);
    let url = login
        .line_starting_with(&prefix, Duration::from_secs(30))
        .await;
    assert!(url.starts_with(&prefix), "the tenant is in the path: {url}");
    let page = cmd::open(&url).await;
    assert_eq!(page.status().as_u16(), 200);
    let out = login.finish(Duration::from_secs(30)).await;
    assert!(out.ok(), "{out:?}");
    assert!(out.stdout.contains("for Outlook"), "{}", out.stdout);
    let asked = &google.authorization_requests()[0];
    let scopes: Vec<&str> = asked["scope"].split(' ').collect();
    assert_eq!(
        scopes,
        [
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://outlook.office.com/POP.AccessAsUser.All",
            "https://outlook.office.com/SMTP.Send",
            "offline_access"
        ]
    );
    assert_eq!(asked["code_challenge_method"], "S256");
    assert_eq!(asked["login_hint"], BOB);
    // Entra matches a registered http://localhost on any port (127.0.0.1 would need its own).
    assert!(
        asked["redirect_uri"].starts_with("http://localhost:"),
        "{asked:?}"
    );
    // The code exchange and the verifying refresh both rotated: the newest token is stored.
    assert_eq!(google.successful_refreshes(), 1);
    let stored = dir.refresh_token(BOB).expect("stored");
    assert!(google.refresh_token_is_live(&stored));
    google.set_ms_strict_rotation(true);
    let check = cmd::run(dir.args(&["check"]), None).await;
    assert!(check.ok(), "{}", check.stdout);
}

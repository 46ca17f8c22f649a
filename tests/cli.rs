//! The real binary: `serve` exit codes and graceful shutdown, `password` and `import`, and
//! a trace-level run whose logs must not contain any secret.

mod harness;
mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{config_text, ListenerSpec};
use support::{FakeGoogle, FakeImap, TestClient, TestPki, UpstreamTls, CLIENT_SECRET};

const BIN: &str = env!("CARGO_BIN_EXE_xoauth2-proxy");
const ALICE: &str = "alice@gmail.com";

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn run(args: &[&str], config: &Path, stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("-c")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let config = xoauth2_proxy::config::Config::load(&path).unwrap();
    assert_eq!(config.listeners.len(), 3);
    assert_eq!(config.accounts[0].email, "alice@gmail.com");
}

#[test]
fn serve_refuses_a_bad_config_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "state_dir = \"s\"\n[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:0\"\nlocal_tsl = \"none\"\n",
    );
    let (code, _, stderr) = run(&["serve"], &cfg, None);
    assert_eq!(code, 1);
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("local_tsl") && lines[0].contains("line 5"),
        "{stderr}"
    );
}

#[test]
fn serve_reports_a_port_in_use_and_a_missing_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = write_config(
        dir.path(),
        &format!(
            "state_dir = \"s\"\n[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:{port}\"\n"
        ),
    );
    let (code, _, stderr) = run(&["serve"], &cfg, None);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot bind") && stderr.contains(&port.to_string()),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let cfg = write_config(
        dir.path(),
        "state_dir = \"s\"\n[tls]\ncert = \"missing.pem\"\nkey = \"missing-key.pem\"\n[[listener]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:0\"\nlocal_tls = \"implicit\"\n",
    );
    let (code, _, stderr) = run(&["serve"], &cfg, None);
    assert_eq!(code, 1);
    assert!(stderr.contains("missing.pem"), "{stderr}");
}

#[test]
fn password_add_prints_it_once_and_list_and_remove_never_show_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!("state_dir = \"state\"\n[[account]]\nemail = \"{ALICE}\"\n"),
    );
    let (code, stdout, stderr) = run(&["password", "add", ALICE, "--label", "phone"], &cfg, None);
    assert_eq!(code, 0, "{stderr}");
    let password = stdout.lines().last().unwrap().to_string();
    assert!(password.len() >= 20 && !password.contains(' '), "{stdout}");
    let (code, _, stderr) = run(&["password", "add", ALICE, "--label", "phone"], &cfg, None);
    assert_eq!(code, 1, "duplicate label refused");
    assert!(stderr.contains("phone"), "{stderr}");
    let (code, stdout, _) = run(&["password", "list", ALICE], &cfg, None);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("phone\tcreated "), "{stdout}");
    assert!(!stdout.contains(&password));
    // Nothing on disk holds the password in clear.
    for entry in std::fs::read_dir(dir.path().join("state")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes
            .windows(password.len())
            .any(|w| w == password.as_bytes()));
    }
    let (code, stdout, _) = run(&["password", "remove", ALICE, "phone"], &cfg, None);
    assert_eq!(code, 0, "{stdout}");
    let (code, _, stderr) = run(&["password", "remove", ALICE, "phone"], &cfg, None);
    assert_eq!(code, 1);
    assert!(stderr.contains("no password labelled"), "{stderr}");
    let (code, _, stderr) = run(&["password", "add", "bob@gmail.com"], &cfg, None);
    assert_eq!(code, 1);
    assert!(stderr.contains("not an [[account]]"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn import_stores_a_working_refresh_token_and_refuses_a_rejected_one() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &config_text(&google, &pki, &[], &[ALICE]));
    google.add_refresh_token("1//good", ALICE);
    let cfg2 = cfg.clone();
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run(
            &["import", ALICE, "--refresh-token-stdin"],
            &cfg2,
            Some("1//good\n"),
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("Stored the refresh token"), "{stdout}");
    assert_eq!(google.token_requests(), 1);
    let cfg2 = cfg.clone();
    let (code, _, stderr) = tokio::task::spawn_blocking(move || {
        run(
            &["import", ALICE, "--refresh-token-stdin"],
            &cfg2,
            Some("1//bad\n"),
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 1);
    assert!(
        stderr.contains("invalid_grant") && stderr.contains("not stored"),
        "{stderr}"
    );
    // The good token is still the stored one.
    let config = xoauth2_proxy::config::Config::load(&cfg).unwrap();
    let store = xoauth2_proxy::store::Store::open(&config.state_dir, &config.store).unwrap();
    let data = store.load().unwrap().0;
    assert_eq!(
        data.account(ALICE)
            .unwrap()
            .refresh_token
            .as_ref()
            .unwrap()
            .expose(),
        "1//good"
    );
}

/// A running `serve` whose stderr is collected.
struct Served {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Served {
    fn start(config: &Path) -> Served {
        let mut child = Command::new(BIN)
            .args(["serve", "-c"])
            .arg(config)
            .env("RUST_LOG", "trace")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Served { child, log }
    }

    /// The bound address of the first listener, from the "listening" log line.
    fn wait_listening(&self) -> std::net::SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(addr) = self.log.lock().unwrap().iter().find_map(|l| {
                l.contains("listening")
                    .then(|| {
                        l.split("bind=")
                            .nth(1)?
                            .split_whitespace()
                            .next()?
                            .parse()
                            .ok()
                    })
                    .flatten()
            }) {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not start: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) -> i32 {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn trace_logs_of_logins_and_failures_hold_no_secret_and_sigterm_exits_zero() {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let imap = FakeImap::start(&google, &pki, UpstreamTls::Implicit).await;
    imap.add_message(ALICE, b"Subject: hi\r\n\r\nhello\r\n");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &config_text(
            &google,
            &pki,
            &[ListenerSpec::new("imap", imap.addr)],
            &[ALICE],
        ),
    );
    let refresh = "1//0gREFRESH-secret-token";
    google.add_refresh_token(refresh, ALICE);
    let cfg2 = cfg.clone();
    let password = tokio::task::spawn_blocking(move || {
        let (code, _, e) = run(
            &["import", ALICE, "--refresh-token-stdin"],
            &cfg2,
            Some(refresh),
        );
        assert_eq!(code, 0, "{e}");
        let (code, out, e) = run(&["password", "add", ALICE], &cfg2, None);
        assert_eq!(code, 0, "{e}");
        out.lines().last().unwrap().to_string()
    })
    .await
    .unwrap();

    let mut served = Served::start(&cfg);
    let addr = tokio::task::block_in_place(|| served.wait_listening());
    let plain = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("\0{ALICE}\0{password}"))
    };
    // A wrong password, a good LOGIN, an AUTHENTICATE PLAIN after the token was rejected
    // upstream (challenge, refresh, retry), and a session that fetches mail.
    let mut c = TestClient::connect(addr).await;
    c.read_line().await;
    c.send_line(&format!("a0 LOGIN {ALICE} wrong-{password}"))
        .await;
    assert!(c.read_line().await.starts_with("a0 NO"));
    c.send_line(&format!("a1 LOGIN {ALICE} {password}")).await;
    assert!(c.read_imap_tagged("a1").await.0.starts_with("a1 OK"));
    c.send_line("a2 SELECT INBOX").await;
    assert!(c.read_imap_tagged("a2").await.0.starts_with("a2 OK"));
    google.invalidate_access_tokens();
    let mut c = TestClient::connect(addr).await;
    c.read_line().await;
    c.send_line(&format!("b1 AUTHENTICATE PLAIN {plain}")).await;
    assert!(c.read_imap_tagged("b1").await.0.starts_with("b1 OK"));
    google.revoke_refresh_token(refresh);
    google.invalidate_access_tokens();
    let mut c = TestClient::connect(addr).await;
    c.read_line().await;
    c.send_line(&format!("c1 LOGIN {ALICE} {password}")).await;
    assert!(c
        .read_line()
        .await
        .starts_with("c1 NO [AUTHENTICATIONFAILED]"));
    let mut waiting = TestClient::connect(addr).await;
    waiting.read_line().await;

    let code = tokio::task::block_in_place(|| served.terminate());
    assert_eq!(code, 0, "SIGTERM exits 0");
    let log = served.log.lock().unwrap().join("\n");
    assert!(
        log.contains("logged in"),
        "trace logs were collected: {log}"
    );
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace level was on"
    );
    for secret in [
        password.as_str(),
        refresh,
        plain.as_str(),
        CLIENT_SECRET,
        "ya29.",                        // every access token the fake issues
        "dXNlcj1hbGljZUBnbWFpbC5jb20B", // the start of any XOAUTH2 string for alice
    ] {
        assert!(
            !log.contains(secret),
            "secret {secret:?} appears in the log"
        );
    }
}

//! SMTP end to end: real SMTP clients (Python's smtplib, and a raw socket for BDAT and
//! failure paths) submit through the real proxy to the fake Gmail submission server, which
//! must receive every message byte for byte.

mod harness;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{ListenerSpec, Proxy};
use support::{FakeGoogle, FakeSmtp, SmtpMode, TestClient, TestPki};

const ALICE: &str = "alice@gmail.com";

struct World {
    google: FakeGoogle,
    pki: TestPki,
    smtp: FakeSmtp,
    proxy: Proxy,
    password: String,
}

async fn world(mode: SmtpMode, local_tls: &'static str) -> World {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let upstream_tls = match mode {
        SmtpMode::Implicit => "implicit",
        SmtpMode::StartTls => "starttls",
    };
    let smtp = FakeSmtp::start(&google, &pki, mode).await;
    let proxy = Proxy::start(
        &google,
        &pki,
        &[ListenerSpec::new("smtp", smtp.addr)
            .local_tls(local_tls)
            .upstream_tls(upstream_tls)],
        &[ALICE],
    )
    .await;
    let password = proxy.authorize(&google, ALICE);
    World {
        google,
        pki,
        smtp,
        proxy,
        password,
    }
}

/// Run tests/clients/smtp_send.py; returns its per-session result lines.
fn smtplib_send(w: &World, mode: &str, sessions: usize, files: &[PathBuf]) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/smtp_send.py");
    let addr = w.proxy.addrs[0];
    let out = std::process::Command::new("python3")
        .arg(script)
        .args([
            "127.0.0.1".to_string(),
            addr.port().to_string(),
            ALICE.to_string(),
            w.password.clone(),
            mode.to_string(),
            w.pki.ca_pem_path.display().to_string(),
            sessions.to_string(),
        ])
        .args(files)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "smtplib failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_string).collect()
}

/// The message corpus of issue 3: 8-bit and SMTPUTF8 headers, dot lines, a bare 998-octet
/// line, CRLFs straddling 16 KiB buffer boundaries, and a 25 MB attachment.
fn corpus(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut messages: Vec<Vec<u8>> = Vec::new();
    messages.push(
        b"From: alice@gmail.com\r\nTo: bob@example.org\r\nSubject: plain\r\n\r\nHello.\r\n"
            .to_vec(),
    );
    messages.push(
        "From: Ålice <alice@gmail.com>\r\nTo: Bøb <bob@example.org>\r\nSubject: 8-bit ünïcödé ✓\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße, 你好, 🙂\r\n"
            .as_bytes()
            .to_vec(),
    );
    messages.push(
        b"From: alice@gmail.com\r\nTo: bob@example.org\r\nSubject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\n...three\r\n. \r\nend\r\n".to_vec(),
    );
    let mut long =
        b"From: alice@gmail.com\r\nTo: bob@example.org\r\nSubject: long line\r\n\r\n".to_vec();
    long.extend(std::iter::repeat_n(b'x', 998));
    long.extend_from_slice(b"\r\n");
    messages.push(long);
    // Put a CRLF exactly across every 16 KiB boundary, and "\r\n.\r\n"-looking dot lines near them.
    let mut boundary =
        b"From: alice@gmail.com\r\nTo: bob@example.org\r\nSubject: boundaries\r\n\r\n".to_vec();
    for k in 1..=8usize {
        let target = k * 16 * 1024 - 1;
        while boundary.len() < target - 2 {
            let room = target - 2 - boundary.len();
            let n = room.min(70);
            boundary.extend(std::iter::repeat_n(b'b', n));
            if boundary.len() < target - 2 {
                boundary.extend_from_slice(b"\r\n");
            }
        }
        boundary.extend_from_slice(b"..\r\n.x\r\n");
    }
    boundary.extend_from_slice(b"tail\r\n");
    messages.push(boundary);
    let mut big = b"From: alice@gmail.com\r\nTo: bob@example.org\r\nSubject: 25 MB\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n".to_vec();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u32 = 12345;
    while big.len() < 25 * 1024 * 1024 {
        for _ in 0..76 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            big.push(alphabet[(x >> 16) as usize % 64]);
        }
        big.extend_from_slice(b"\r\n");
    }
    big.extend_from_slice(b"--b--\r\n");
    messages.push(big);
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let p = dir.join(format!("{i}.eml"));
            std::fs::write(&p, &m).unwrap();
            (p, m)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn smtplib_corpus_arrives_byte_identical_over_implicit_tls_upstream() {
    let w = world(SmtpMode::Implicit, "none").await;
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path());
    let files: Vec<PathBuf> = corpus.iter().map(|(p, _)| p.clone()).collect();
    let w = tokio::task::spawn_blocking(move || {
        let lines = smtplib_send(&w, "plain", 1, &files);
        assert_eq!(lines, vec![format!("ok {}", files.len())]);
        w
    })
    .await
    .unwrap();
    let got = w.smtp.messages();
    assert_eq!(got.len(), corpus.len());
    for ((_, sent), received) in corpus.iter().zip(&got) {
        assert_eq!(received.auth_user, ALICE);
        assert_eq!(received.rcpt_to, vec!["bob@example.org".to_string()]);
        assert!(
            received.data == *sent,
            "message of {} bytes differs",
            sent.len()
        );
    }
    assert!(
        w.smtp.protocol_violations().is_empty(),
        "{:?}",
        w.smtp.protocol_violations()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_messages_in_one_session_and_over_twenty_parallel_sessions_via_587() {
    let w = world(SmtpMode::StartTls, "starttls").await;
    let dir = tempfile::tempdir().unwrap();
    let small: Vec<PathBuf> = (0..200)
        .map(|i| {
            let p = dir.path().join(format!("m{i}.eml"));
            std::fs::write(
                &p,
                format!("From: alice@gmail.com\r\nTo: bob@example.org\r\nSubject: n{i}\r\n\r\nbody {i}\r\n.\r\n"),
            )
            .unwrap();
            p
        })
        .collect();
    let w = tokio::task::spawn_blocking(move || {
        assert_eq!(smtplib_send(&w, "starttls", 1, &small), vec!["ok 200"]);
        let ten: Vec<PathBuf> = small[..10].to_vec();
        let lines = smtplib_send(&w, "starttls", 20, &ten);
        assert_eq!(lines.len(), 20);
        assert!(lines.iter().all(|l| l == "ok 10"), "{lines:?}");
        w
    })
    .await
    .unwrap();
    let got = w.smtp.messages();
    assert_eq!(got.len(), 400);
    for (i, message) in got.iter().take(200).enumerate() {
        let want = format!("From: alice@gmail.com\r\nTo: bob@example.org\r\nSubject: n{i}\r\n\r\nbody {i}\r\n.\r\n");
        assert_eq!(message.data, want.as_bytes());
    }
    // One token request served all 21 sessions.
    assert_eq!(w.google.token_requests(), 1);
    assert!(
        w.smtp.protocol_violations().is_empty(),
        "{:?}",
        w.smtp.protocol_violations()
    );
}

async fn ehlo(c: &mut TestClient) -> Vec<String> {
    c.send_line("EHLO client.example").await;
    let (code, lines) = c.read_smtp_reply().await;
    assert_eq!(code, 250, "{lines:?}");
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn ehlo_promises_upstream_extensions_and_bdat_passes_through() {
    let w = world(SmtpMode::StartTls, "implicit").await;
    let mut c = TestClient::connect_tls(w.proxy.addrs[0], w.pki.client_config()).await;
    assert!(c.read_line().await.starts_with("220 "));
    let lines = ehlo(&mut c).await;
    assert_eq!(
        lines,
        vec![
            "250-localhost at your service",
            "250-SIZE 35882577",
            "250-8BITMIME",
            "250-AUTH PLAIN LOGIN",
            "250-ENHANCEDSTATUSCODES",
            "250-PIPELINING",
            "250-CHUNKING",
            "250 SMTPUTF8",
        ]
    );
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    c.send_line(&format!("AUTH LOGIN {}", b64(ALICE))).await;
    assert_eq!(c.read_line().await, "334 UGFzc3dvcmQ6");
    c.send_line(&b64(&w.password)).await;
    assert_eq!(c.read_line().await, "235 2.7.0 Accepted");
    // CHUNKING after authentication: the proxy no longer parses anything.
    c.send(b"MAIL FROM:<alice@gmail.com>\r\nRCPT TO:<bob@example.org>\r\nBDAT 5\r\nHello")
        .await;
    assert_eq!(c.read_smtp_reply().await.0, 250);
    assert_eq!(c.read_smtp_reply().await.0, 250);
    assert_eq!(c.read_smtp_reply().await.0, 250);
    c.send(b"BDAT 8 LAST\r\n world\r\n").await;
    assert_eq!(c.read_smtp_reply().await.0, 250);
    c.send_line("QUIT").await;
    assert_eq!(c.read_smtp_reply().await.0, 221);
    assert_eq!(w.smtp.messages()[0].data, b"Hello world\r\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn envelope_pipelined_after_auth_plain_waits_for_235() {
    let w = world(SmtpMode::Implicit, "none").await;
    w.smtp.set_auth_delay(Duration::from_millis(200));
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.read_line().await;
    ehlo(&mut c).await;
    let plain = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("\0{ALICE}\0{}", w.password))
    };
    c.send(format!(
        "AUTH PLAIN {plain}\r\nMAIL FROM:<alice@gmail.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
    ))
    .await;
    assert_eq!(c.read_line().await, "235 2.7.0 Accepted");
    assert_eq!(c.read_smtp_reply().await.0, 250);
    assert_eq!(c.read_smtp_reply().await.0, 250);
    assert_eq!(c.read_smtp_reply().await.0, 354);
    c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n").await;
    assert_eq!(c.read_smtp_reply().await.0, 250);
    assert!(
        w.smtp.received_before_auth_result().is_empty(),
        "{:?}",
        w.smtp.received_before_auth_result()
    );
    assert!(
        w.smtp.protocol_violations().is_empty(),
        "{:?}",
        w.smtp.protocol_violations()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn strangers_ehlo_reaches_nothing_upstream_and_a_login_connects_once() {
    let w = world(SmtpMode::StartTls, "none").await;
    for _ in 0..21 {
        let mut c = TestClient::connect(w.proxy.addrs[0]).await;
        assert!(c.read_line().await.starts_with("220 "));
        ehlo(&mut c).await;
        c.send_line("HELO client.example").await;
        assert_eq!(c.read_line().await, "250 localhost at your service");
        c.send_line("EHLO bad\x1bname").await;
        assert_eq!(c.read_smtp_reply().await.0, 501);
        c.send_line("QUIT").await;
        assert_eq!(c.read_smtp_reply().await.0, 221);
    }
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.read_line().await;
    ehlo(&mut c).await;
    assert_eq!(auth_plain(&mut c, ALICE, "wrong").await.0, 535);
    assert_eq!(
        w.smtp.connections(),
        0,
        "nothing went upstream before a password check"
    );
    assert_eq!(auth_plain(&mut c, ALICE, &w.password).await.0, 235);
    assert_eq!(w.smtp.connections(), 1);
    assert!(
        w.smtp.protocol_violations().is_empty(),
        "{:?}",
        w.smtp.protocol_violations()
    );
}

async fn auth_plain(c: &mut TestClient, user: &str, password: &str) -> (u16, Vec<String>) {
    let plain = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
    };
    c.send_line(&format!("AUTH PLAIN {plain}")).await;
    c.read_smtp_reply().await
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_is_535_and_never_reaches_upstream_auth() {
    let w = world(SmtpMode::Implicit, "none").await;
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.read_line().await;
    ehlo(&mut c).await;
    let (code, lines) = auth_plain(&mut c, ALICE, "wrong").await;
    assert_eq!(code, 535, "{lines:?}");
    assert!(lines[0].starts_with("535 5.7.8 "), "{lines:?}");
    let (code, _) = auth_plain(&mut c, "nobody@gmail.com", &w.password).await;
    assert_eq!(code, 535);
    assert_eq!(w.smtp.successful_logins() + w.smtp.failed_logins(), 0);
    assert_eq!(w.google.token_requests(), 0);
    // Then the right password works on the same connection.
    let (code, _) = auth_plain(&mut c, ALICE, &w.password).await;
    assert_eq!(code, 235);
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_token_is_535_with_the_command_to_run_and_endpoint_down_is_454() {
    let w = world(SmtpMode::Implicit, "none").await;
    w.google.set_down(true);
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.read_line().await;
    ehlo(&mut c).await;
    let (code, lines) = auth_plain(&mut c, ALICE, &w.password).await;
    assert_eq!(code, 454, "{lines:?}");
    assert!(lines[0].starts_with("454 4.7.0 "), "{lines:?}");
    w.google.set_down(false);
    w.google
        .revoke_refresh_token(&format!("1//refresh-{ALICE}"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, lines) = auth_plain(&mut c, ALICE, &w.password).await;
    assert_eq!(code, 535, "{lines:?}");
    assert!(
        lines[0].contains(&format!("xoauth2-proxy login {ALICE}")),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l.len() <= 512));
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_token_is_refreshed_and_auth_retried_on_the_same_connection() {
    let w = world(SmtpMode::StartTls, "none").await;
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.read_line().await;
    ehlo(&mut c).await;
    assert_eq!(auth_plain(&mut c, ALICE, &w.password).await.0, 235);
    w.google.invalidate_access_tokens();
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.read_line().await;
    ehlo(&mut c).await;
    assert_eq!(auth_plain(&mut c, ALICE, &w.password).await.0, 235);
    assert_eq!(w.google.token_requests(), 2);
    assert_eq!(w.smtp.failed_logins(), 1);
    assert!(
        w.smtp.protocol_violations().is_empty(),
        "{:?}",
        w.smtp.protocol_violations()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_closing_mid_data_never_yields_a_false_250() {
    let w = world(SmtpMode::Implicit, "none").await;
    w.smtp.set_close_mid_data(Some(1000));
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    c.read_line().await;
    ehlo(&mut c).await;
    assert_eq!(auth_plain(&mut c, ALICE, &w.password).await.0, 235);
    c.send_line("MAIL FROM:<alice@gmail.com>").await;
    assert_eq!(c.read_smtp_reply().await.0, 250);
    c.send_line("RCPT TO:<bob@example.org>").await;
    assert_eq!(c.read_smtp_reply().await.0, 250);
    c.send_line("DATA").await;
    assert_eq!(c.read_smtp_reply().await.0, 354);
    let mut body = vec![b'a'; 5000];
    body.extend_from_slice(b"\r\n.\r\n");
    c.send(&body).await;
    // The client must see the connection end (or an error), never a 250.
    match c.try_read_line().await {
        None => {}
        Some(line) => assert!(!line.starts_with("250"), "false success: {line}"),
    }
    assert!(w.smtp.messages().is_empty());
}

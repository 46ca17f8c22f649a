//! POP3 end to end: Python's poplib (and a raw socket for the grammar and failure paths)
//! read the fake Gmail maildrop through the real proxy, every message byte-identical.

mod harness;
mod support;

use std::path::Path;
use std::time::Duration;

use harness::{ListenerSpec, Proxy};
use support::{FakeGoogle, FakePop3, PopTls, TestClient, TestPki};

const ALICE: &str = "alice@gmail.com";

struct World {
    google: FakeGoogle,
    pki: TestPki,
    pop: FakePop3,
    proxy: Proxy,
    password: String,
    messages: Vec<Vec<u8>>,
}

fn maildrop() -> Vec<Vec<u8>> {
    let mut messages = vec![
        b"From: bob@example.org\r\nTo: alice@gmail.com\r\nSubject: one\r\n\r\nHello.\r\n".to_vec(),
        b"From: bob@example.org\r\nSubject: dots\r\n\r\n.\r\n..\r\n.leading\r\n".to_vec(),
    ];
    let mut big = b"From: bob@example.org\r\nSubject: 20 MB\r\n\r\n".to_vec();
    let mut x: u32 = 7;
    while big.len() < 20 * 1024 * 1024 {
        for _ in 0..76 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            big.push(b'A' + (x >> 16) as u8 % 26);
        }
        big.extend_from_slice(b"\r\n");
    }
    messages.push(big);
    messages
}

async fn world(tls: PopTls, local_tls: &'static str) -> World {
    let google = FakeGoogle::start().await;
    let pki = TestPki::new();
    let upstream_tls = match tls {
        PopTls::Implicit => "implicit",
        PopTls::Stls => "starttls",
    };
    let pop = FakePop3::start(&google, &pki, tls).await;
    let messages = maildrop();
    for m in &messages {
        pop.add_message(ALICE, m);
    }
    let proxy = Proxy::start(
        &google,
        &pki,
        &[ListenerSpec::new("pop3", pop.addr)
            .local_tls(local_tls)
            .upstream_tls(upstream_tls)],
        &[ALICE],
    )
    .await;
    let password = proxy.authorize(&google, ALICE);
    World {
        google,
        pki,
        pop,
        proxy,
        password,
        messages,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn poplib_retrieves_every_message_byte_identical() {
    for (tls, local, mode) in [
        (PopTls::Implicit, "none", "plain"),
        (PopTls::Stls, "starttls", "stls"),
        (PopTls::Implicit, "implicit", "ssl"),
    ] {
        let w = world(tls, local).await;
        let out = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/pop3_fetch.py");
        let args = vec![
            script.display().to_string(),
            "127.0.0.1".into(),
            w.proxy.addrs[0].port().to_string(),
            ALICE.into(),
            w.password.clone(),
            mode.into(),
            w.pki.ca_pem_path.display().to_string(),
            out.path().display().to_string(),
        ];
        let result = tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .args(args)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert!(result.status.success(), "{mode}: {stdout}");
        assert_eq!(stdout.trim(), format!("ok {}", w.messages.len()), "{mode}");
        for (i, m) in w.messages.iter().enumerate() {
            let got = std::fs::read(out.path().join(format!("{}.eml", i + 1))).unwrap();
            assert!(
                got == *m,
                "{mode}: message {} differs ({} vs {} bytes)",
                i + 1,
                got.len(),
                m.len()
            );
        }
        assert!(
            w.pop.protocol_violations().is_empty(),
            "{mode}: {:?}",
            w.pop.protocol_violations()
        );
    }
}

async fn greet(w: &World) -> TestClient {
    let mut c = TestClient::connect(w.proxy.addrs[0]).await;
    assert_eq!(c.read_line().await, "+OK xoauth2-proxy POP3 ready");
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn capa_keeps_gmail_capabilities_and_auth_plain_forms_work() {
    let w = world(PopTls::Implicit, "none").await;
    let mut c = greet(&w).await;
    c.send_line("CAPA").await;
    assert!(c.read_line().await.starts_with("+OK"));
    let capa = String::from_utf8(c.read_pop_multiline().await).unwrap();
    assert_eq!(
        capa,
        "USER\r\nRESP-CODES\r\nEXPIRE 0\r\nLOGIN-DELAY 300\r\nTOP\r\nUIDL\r\nX-GOOGLE-RICO\r\nSASL PLAIN\r\n"
    );
    c.send_line("AUTH").await;
    assert_eq!(c.read_line().await, "+OK");
    assert_eq!(c.read_pop_multiline().await, b"PLAIN\r\n");
    c.send_line("APOP alice@gmail.com c4c9334bac560ecc979e58001b3e22fb")
        .await;
    assert!(c
        .read_line()
        .await
        .starts_with("-ERR APOP is not supported"));
    let plain = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("\0{ALICE}\0{}", w.password))
    };
    c.send_line("AUTH PLAIN").await;
    assert_eq!(c.read_line().await, "+ ");
    c.send_line(&plain).await;
    assert_eq!(c.read_line().await, "+OK Welcome.");
    c.send_line("STAT").await;
    assert!(c.read_line().await.starts_with("+OK 3 "));
    // The same connection served CAPA and the login: one upstream connection.
    assert_eq!(w.pop.connections(), 1);

    let mut c = greet(&w).await;
    c.send(format!("AUTH PLAIN {plain}\r\nLIST\r\n")).await;
    assert_eq!(c.read_line().await, "+OK Welcome.");
    assert!(c.read_line().await.starts_with("+OK"));
    assert_eq!(
        c.read_pop_multiline().await.split(|&b| b == b'\n').count(),
        4
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn strangers_capa_reaches_nothing_upstream() {
    let w = world(PopTls::Stls, "none").await;
    for _ in 0..21 {
        let mut c = greet(&w).await;
        c.send_line("CAPA").await;
        assert_eq!(c.read_line().await, "+OK Capability list follows");
        let capa = String::from_utf8(c.read_pop_multiline().await).unwrap();
        assert!(
            capa.starts_with("USER\r\n") && capa.contains("SASL PLAIN\r\n"),
            "{capa}"
        );
        c.send_line("QUIT").await;
        assert!(c.read_line().await.starts_with("+OK"));
    }
    let mut c = greet(&w).await;
    c.send_line(&format!("USER {ALICE}")).await;
    c.read_line().await;
    c.send_line("PASS wrong").await;
    assert!(c.read_line().await.starts_with("-ERR [AUTH] "));
    assert_eq!(
        w.pop.connections(),
        0,
        "nothing went upstream before a password check"
    );
    c.send_line(&format!("USER {ALICE}")).await;
    c.read_line().await;
    c.send_line(&format!("PASS {}", w.password)).await;
    assert_eq!(c.read_line().await, "+OK Welcome.");
    assert_eq!(w.pop.connections(), 1);
    assert!(
        w.pop.protocol_violations().is_empty(),
        "{:?}",
        w.pop.protocol_violations()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_are_auth_or_sys_temp_as_the_interface_says() {
    let w = world(PopTls::Implicit, "none").await;
    let mut c = greet(&w).await;
    c.send_line(&format!("USER {ALICE}")).await;
    assert_eq!(c.read_line().await, "+OK send PASS");
    c.send_line("PASS wrong").await;
    let line = c.read_line().await;
    assert!(line.starts_with("-ERR [AUTH] "), "{line}");
    assert_eq!(w.pop.connections(), 0, "nothing went upstream");
    w.google.set_down(true);
    c.send_line(&format!("USER {ALICE}")).await;
    c.read_line().await;
    c.send_line(&format!("PASS {}", w.password)).await;
    let line = c.read_line().await;
    assert!(line.starts_with("-ERR [SYS/TEMP] "), "{line}");
    w.google.set_down(false);
    w.google
        .revoke_refresh_token(&format!("1//refresh-{ALICE}"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.send_line(&format!("USER {ALICE}")).await;
    c.read_line().await;
    c.send_line(&format!("PASS {}", w.password)).await;
    let line = c.read_line().await;
    assert!(line.starts_with("-ERR [AUTH] "), "{line}");
    assert!(line.contains("xoauth2-proxy login"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_token_is_refreshed_and_retried() {
    let w = world(PopTls::Stls, "none").await;
    let mut c = greet(&w).await;
    c.send_line(&format!("USER {ALICE}")).await;
    c.read_line().await;
    c.send_line(&format!("PASS {}", w.password)).await;
    assert_eq!(c.read_line().await, "+OK Welcome.");
    c.send_line("QUIT").await;
    c.read_line().await;
    w.google.invalidate_access_tokens();
    let mut c = greet(&w).await;
    c.send_line(&format!("USER {ALICE}")).await;
    c.read_line().await;
    c.send_line(&format!("PASS {}", w.password)).await;
    assert_eq!(c.read_line().await, "+OK Welcome.");
    assert_eq!(w.google.token_requests(), 2);
    assert_eq!(w.pop.failed_logins(), 1);
    assert!(
        w.pop.protocol_violations().is_empty(),
        "{:?}",
        w.pop.protocol_violations()
    );
}

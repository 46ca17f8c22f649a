//! Byte-exact transcripts for SMTP (protocol-facts.md §7.2), without sockets.

use super::*;
use crate::protocol::testkit::{every_failure, run, sent, up_run, up_sent, WORDS};

const XO: &str = "dXNlcj1hbGljZUBnbWFpbC5jb20BYXV0aD1CZWFyZXIgeWEyOS5hMEFmQl9FWEFNUExFAQE=";
const PL: &str = "AGFsaWNlQGdtYWlsLmNvbQBsb2NhbC1zZWNyZXQ=";
const ERR: &str = "eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==";

fn gmail_ehlo_after_tls() -> Vec<String> {
    std::iter::once("smtp.gmail.com at your service, [203.0.113.7]")
        .chain(GMAIL_EXTENSIONS)
        .map(|s| s.to_string())
        .collect()
}

fn session(starttls: bool) -> ClientSession {
    ClientSession::new(SessionOptions {
        starttls_offered: starttls,
        login_allowed: true,
        upstream_extensions: None,
    })
}

/// The reply to EHLO before any login has shown upstream's extensions: Gmail's, rewritten.
const EHLO_REPLY: &str = "250-localhost at your service\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n";

fn login_of(actions: &[Action]) -> Option<(String, String)> {
    actions.iter().find_map(|a| match a {
        Action::Login { credentials, .. } => Some((
            credentials.username.clone(),
            credentials.password.expose().to_string(),
        )),
        _ => None,
    })
}

fn alice() -> Option<(String, String)> {
    Some(("alice@gmail.com".into(), "local-secret".into()))
}

/// A session that has been through EHLO.
fn greeted(starttls: bool) -> ClientSession {
    let mut s = session(starttls);
    let out = run(&mut s, b"EHLO client.example\r\n");
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(s.hello_domain(), Some("client.example"));
    s
}

#[test]
fn s1_ehlo_is_answered_locally_with_gmails_extensions_offering_plain_and_login() {
    let mut s = session(false);
    assert_eq!(sent(&run(&mut s, b"EHLO client.example\r\n")), EHLO_REPLY);
}

#[test]
fn ehlo_promises_the_extensions_upstream_showed_at_the_last_login() {
    let mut s = ClientSession::new(SessionOptions {
        starttls_offered: false,
        login_allowed: true,
        upstream_extensions: Some(gmail_ehlo_after_tls()[1..4].to_vec().into()),
    });
    assert_eq!(
        sent(&run(&mut s, b"EHLO client.example\r\n")),
        "250-localhost at your service\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n"
    );
}

#[test]
fn ehlo_and_helo_take_a_domain_or_an_address_literal() {
    for good in [
        "client.example",
        "laptop",
        "my-host.example.org",
        "DESKTOP_1A2B",
        "[127.0.0.1]",
        "[IPv6:2001:db8::1]",
        "[ipv6:::1]",
        "[x-tag:some.content]",
    ] {
        let mut s = session(false);
        let line = format!("EHLO {good}\r\n");
        assert_eq!(sent(&run(&mut s, line.as_bytes())), EHLO_REPLY, "{good}");
        assert_eq!(s.hello_domain(), Some(good));
    }
}

#[test]
fn ehlo_with_control_bytes_or_an_overlong_name_is_501_and_not_remembered() {
    let long_label = format!("{}.example", "a".repeat(64));
    let long_name = ["abcdefghi."; 26].concat() + "com";
    assert_eq!(long_name.len(), 263);
    let bad: Vec<Vec<u8>> = vec![
        b"client\rexample".to_vec(),
        b"client\0.example".to_vec(),
        b"client\x1b[31m.example".to_vec(),
        b"client.example\x1b".to_vec(),
        b"two words".to_vec(),
        b"-leading.example".to_vec(),
        b"trailing-.example".to_vec(),
        b"double..dot".to_vec(),
        b"dot.".to_vec(),
        b"[256.0.0.1]".to_vec(),
        b"[1.2.3]".to_vec(),
        b"[IPv6:not-an-address]".to_vec(),
        b"[127.0.0.1".to_vec(),
        b"caf\xc3\xa9.example".to_vec(),
        long_label.into_bytes(),
        long_name.into_bytes(),
    ];
    for verb in ["EHLO", "HELO"] {
        for arg in &bad {
            let mut s = session(false);
            let line = [verb.as_bytes(), b" ", arg, b"\r\n"].concat();
            assert_eq!(
                sent(&run(&mut s, &line)),
                format!("501 5.5.4 {verb} needs a domain name or an address literal such as [127.0.0.1]\r\n"),
                "{}",
                String::from_utf8_lossy(arg)
            );
            assert_eq!(s.hello_domain(), None);
            assert_eq!(
                sent(&run(&mut s, b"AUTH PLAIN\r\n")),
                "503 5.5.1 Send EHLO first\r\n"
            );
        }
    }
}

#[test]
fn ehlo_before_tls_drops_upstream_starttls_and_adds_ours_when_offered() {
    let pre_tls: Vec<String> = [
        "smtp.gmail.com at your service",
        "SIZE 35882577",
        "STARTTLS",
        "PIPELINING",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(
        rewrite_ehlo(&pre_tls, true),
        "250-smtp.gmail.com at your service\r\n250-SIZE 35882577\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n"
    );
    assert!(!rewrite_ehlo(&pre_tls, false).contains("STARTTLS"));
}

#[test]
fn helo_gets_a_single_line() {
    let mut s = session(false);
    let out = run(&mut s, b"HELO old.client\r\n");
    assert_eq!(sent(&out), "250 localhost at your service\r\n");
    assert_eq!(s.hello_domain(), Some("old.client"));
}

#[test]
fn s1_auth_plain_inline() {
    let mut s = greeted(false);
    let out = run(&mut s, format!("AUTH PLAIN {PL}\r\n").as_bytes());
    assert_eq!(login_of(&out), alice());
}

#[test]
fn s2_auth_plain_without_initial_response() {
    let mut s = greeted(false);
    let out = run(&mut s, b"AUTH PLAIN\r\n");
    assert_eq!(sent(&out), "334 \r\n");
    let out = run(&mut s, format!("{PL}\r\n").as_bytes());
    assert_eq!(login_of(&out), alice());
}

#[test]
fn s3_auth_plain_empty_and_s4_cancel() {
    let mut s = greeted(false);
    let out = run(&mut s, b"AUTH PLAIN =\r\n");
    assert_eq!(
        sent(&out),
        "535 5.7.8 Authentication credentials invalid\r\n"
    );
    let out = run(&mut s, b"AUTH PLAIN\r\n");
    assert_eq!(sent(&out), "334 \r\n");
    let out = run(&mut s, b"*\r\n");
    assert_eq!(sent(&out), "501 5.7.0 Authentication cancelled\r\n");
}

#[test]
fn s5_auth_login_both_variants() {
    let mut s = greeted(false);
    assert_eq!(
        sent(&run(&mut s, b"AUTH LOGIN\r\n")),
        "334 VXNlcm5hbWU6\r\n"
    );
    assert_eq!(
        sent(&run(&mut s, b"YWxpY2VAZ21haWwuY29t\r\n")),
        "334 UGFzc3dvcmQ6\r\n"
    );
    assert_eq!(login_of(&run(&mut s, b"bG9jYWwtc2VjcmV0\r\n")), alice());

    let mut s = greeted(false);
    assert_eq!(
        sent(&run(&mut s, b"AUTH LOGIN YWxpY2VAZ21haWwuY29t\r\n")),
        "334 UGFzc3dvcmQ6\r\n"
    );
    assert_eq!(login_of(&run(&mut s, b"bG9jYWwtc2VjcmV0\r\n")), alice());

    let mut s = greeted(false);
    run(&mut s, b"AUTH LOGIN\r\n");
    assert_eq!(
        sent(&run(&mut s, b"*\r\n")),
        "501 5.7.0 Authentication cancelled\r\n"
    );
}

#[test]
fn s7_envelope_pipelined_after_auth_is_held() {
    let mut s = greeted(false);
    let out = run(
        &mut s,
        format!("AUTH PLAIN {PL}\r\nMAIL FROM:<alice@gmail.com>\r\nRCPT TO:<bob@example.org>\r\n")
            .as_bytes(),
    );
    assert_eq!(login_of(&out), alice());
    assert_eq!(out.len(), 1);
    assert_eq!(
        s.into_pending_input(),
        b"MAIL FROM:<alice@gmail.com>\r\nRCPT TO:<bob@example.org>\r\n".to_vec()
    );
}

#[test]
fn commands_before_authentication_are_answered_locally() {
    let mut s = session(false);
    assert_eq!(
        sent(&run(&mut s, b"AUTH PLAIN\r\n")),
        "503 5.5.1 Send EHLO first\r\n"
    );
    let mut s = greeted(false);
    assert!(sent(&run(&mut s, b"MAIL FROM:<a@b>\r\n")).starts_with("530 5.7.0"));
    assert_eq!(sent(&run(&mut s, b"NOOP\r\n")), "250 2.0.0 OK\r\n");
    assert_eq!(sent(&run(&mut s, b"RSET\r\n")), "250 2.0.0 OK\r\n");
    assert!(sent(&run(&mut s, b"AUTH XOAUTH2 abc\r\n")).starts_with("504 5.5.4"));
    assert!(sent(&run(&mut s, b"FOO\r\n")).starts_with("502 5.5.1"));
    assert!(sent(&run(&mut s, b"AUTH PLAIN !!!\r\n")).starts_with("501 5.5.2"));
    let out = run(&mut s, b"QUIT\r\n");
    assert_eq!(sent(&out), "221 2.0.0 Bye\r\n");
    assert_eq!(out.last(), Some(&Action::Close));
}

#[test]
fn local_starttls_resets_the_session_and_drops_injected_plaintext() {
    let mut s = greeted(true);
    let out = run(
        &mut s,
        format!("STARTTLS\r\nAUTH PLAIN {PL}\r\n").as_bytes(),
    );
    assert_eq!(
        out,
        vec![
            Action::Send(b"220 2.0.0 Ready to start TLS\r\n".to_vec()),
            Action::StartTls
        ]
    );
    s.tls_established();
    assert!(run(&mut s, b"").is_empty());
    // EHLO is needed again after TLS.
    assert_eq!(
        sent(&run(&mut s, b"AUTH PLAIN\r\n")),
        "503 5.5.1 Send EHLO first\r\n"
    );
    assert_eq!(sent(&run(&mut s, b"EHLO c\r\n")), EHLO_REPLY);
}

#[test]
fn plaintext_auth_from_a_remote_peer_needs_starttls_first() {
    let mut s = ClientSession::new(SessionOptions {
        starttls_offered: true,
        login_allowed: false,
        upstream_extensions: None,
    });
    assert!(sent(&run(&mut s, b"EHLO c\r\n")).ends_with("250 STARTTLS\r\n"));
    assert_eq!(
        sent(&run(&mut s, format!("AUTH PLAIN {PL}\r\n").as_bytes())),
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
}

#[test]
fn every_failure_class_is_535_or_454_or_upstreams_own_reply() {
    let expected = [
        "535 5.7.8 Invalid username or password (use the account's email and a local app password from `xoauth2-proxy password add`)\r\n",
        "535 5.7.8 alice@gmail.com is not authorized with Google yet; run `xoauth2-proxy login alice@gmail.com` on the proxy host\r\n",
        "535 5.7.8 Google authorization for alice@gmail.com has expired or was revoked; run `xoauth2-proxy login alice@gmail.com` on the proxy host\r\n",
        "454 4.7.0 xoauth2-proxy cannot get a token for alice@gmail.com: invalid_client: The OAuth client was not found.\r\n",
        "454 4.7.0 Gmail cannot be reached right now (token endpoint returned 503); try again later\r\n",
        "535 5.7.8 Gmail rejected the OAuth token for alice@gmail.com (status 400, required scope https://mail.google.com/); if this persists run `xoauth2-proxy login alice@gmail.com`\r\n",
        "454-4.7.0 Too many login attempts, please try again later.\r\n454 4.7.0 id - gsmtp\r\n",
        "454 4.7.0 alice@gmail.com already has 15 open sessions, Gmail's limit; close a mail client or wait\r\n",
    ];
    let refusal =
        "454-4.7.0 Too many login attempts, please try again later.\r\n454 4.7.0 id - gsmtp\r\n";
    for (failure, want) in every_failure(refusal).iter().zip(expected) {
        let mut s = greeted(false);
        run(&mut s, format!("AUTH PLAIN {PL}\r\n").as_bytes());
        s.login_failed(failure, &WORDS);
        assert_eq!(sent(&run(&mut s, b"")), want, "{failure:?}");
        // The session takes commands again.
        assert_eq!(sent(&run(&mut s, b"NOOP\r\n")), "250 2.0.0 OK\r\n");
    }
}

#[test]
fn failure_replies_stay_one_line_within_512_octets() {
    let mut s = greeted(false);
    run(&mut s, format!("AUTH PLAIN {PL}\r\n").as_bytes());
    s.login_failed(
        &Failure::Temporary {
            detail: format!("a\r\nb{}", "x".repeat(600)),
        },
        &WORDS,
    );
    let reply = sent(&run(&mut s, b""));
    assert!(reply.len() <= 512, "{}", reply.len());
    assert!(reply.starts_with("454 4.7.0 Gmail cannot be reached right now (abxxx"));
    assert!(reply.ends_with("xxx\r\n"));
    assert_eq!(reply.matches("\r\n").count(), 1);
}

#[test]
fn over_long_line_closes() {
    let mut s = session(false);
    let out = run(&mut s, &vec![b'x'; MAX_LINE + 10]);
    assert_eq!(sent(&out), "500 5.5.6 Line too long\r\n");
    assert_eq!(out.last(), Some(&Action::Close));
}

// ---- upstream ----

#[test]
fn s1_upstream_587_does_ehlo_starttls_and_ehlo_again() {
    let mut h = UpstreamHello::new("client.example", true, true);
    let out = up_run(&mut h, b"220 smtp.gmail.com ESMTP abc - gsmtp\r\n");
    assert_eq!(up_sent(&out), "EHLO client.example\r\n");
    let out = up_run(
        &mut h,
        b"250-smtp.gmail.com at your service, [203.0.113.7]\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n",
    );
    assert_eq!(up_sent(&out), "STARTTLS\r\n");
    let out = up_run(&mut h, b"220 2.0.0 Ready to start TLS\r\n");
    assert_eq!(out, vec![UpAction::StartTls]);
    h.tls_established();
    let out: Vec<_> = std::iter::from_fn(|| h.next_action()).collect();
    assert_eq!(up_sent(&out), "EHLO client.example\r\n");
    let after: String = gmail_ehlo_after_tls()
        .iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}\r\n", if i == 7 { ' ' } else { '-' }))
        .collect();
    let out = up_run(&mut h, after.as_bytes());
    let [UpAction::Done(UpOutcome::Success { relay, .. })] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(UpstreamHello::lines(relay), gmail_ehlo_after_tls());
}

#[test]
fn s9_upstream_465_needs_no_starttls() {
    let mut h = UpstreamHello::new("c", false, true);
    assert_eq!(up_sent(&up_run(&mut h, b"220 hi\r\n")), "EHLO c\r\n");
    let out = up_run(&mut h, b"250-smtp.gmail.com\r\n250 AUTH XOAUTH2\r\n");
    assert!(matches!(
        &out[..],
        [UpAction::Done(UpOutcome::Success { .. })]
    ));
    // A later EHLO on the same connection skips the banner.
    let mut h = UpstreamHello::new("c", false, false);
    let out: Vec<_> = std::iter::from_fn(|| h.next_action()).collect();
    assert_eq!(up_sent(&out), "EHLO c\r\n");
}

#[test]
fn upstream_banner_refusal_fails() {
    let mut h = UpstreamHello::new("c", false, true);
    let out = up_run(&mut h, b"421 4.7.0 Try again later\r\n");
    assert!(matches!(&out[..], [UpAction::Done(UpOutcome::Failed(m))] if m.contains("421")));
}

#[test]
fn s1_upstream_auth_is_always_two_step() {
    let mut a = UpstreamAuth::new(Secret::new(XO));
    let out: Vec<_> = std::iter::from_fn(|| a.next_action()).collect();
    assert_eq!(up_sent(&out), "AUTH XOAUTH2\r\n");
    let out = up_run(&mut a, b"334 \r\n");
    assert_eq!(up_sent(&out), format!("{XO}\r\n"));
    let out = up_run(&mut a, b"235 2.7.0 Accepted\r\n");
    assert_eq!(
        out,
        vec![UpAction::Done(UpOutcome::Success {
            relay: b"235 2.7.0 Accepted\r\n".to_vec(),
            leftover: vec![]
        })]
    );
}

#[test]
fn s6_upstream_error_challenge_answered_with_empty_line() {
    let mut a = UpstreamAuth::new(Secret::new(XO));
    let _ = std::iter::from_fn(|| a.next_action()).count();
    up_run(&mut a, b"334 \r\n");
    let out = up_run(&mut a, format!("334 {ERR}\r\n").as_bytes());
    assert_eq!(up_sent(&out), "\r\n");
    let out = up_run(&mut a, b"535-5.7.8 Username and Password not accepted. For more information, go to\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials abc - gsmtp\r\n");
    let [UpAction::Done(UpOutcome::Rejected {
        challenge: Some(c),
        token_rejected: true,
        ..
    })] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(c.status.as_deref(), Some("400"));
    a.retry(Secret::new("NEW"));
    let out: Vec<_> = std::iter::from_fn(|| a.next_action()).collect();
    assert_eq!(up_sent(&out), "AUTH XOAUTH2\r\n");
}

#[test]
fn upstream_throttling_is_not_a_token_problem() {
    let mut a = UpstreamAuth::new(Secret::new(XO));
    let _ = std::iter::from_fn(|| a.next_action()).count();
    let out = up_run(
        &mut a,
        b"454 4.7.0 Too many login attempts, please try again later. abc - gsmtp\r\n",
    );
    let [UpAction::Done(UpOutcome::Rejected {
        token_rejected: false,
        line,
        ..
    })] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert!(line.starts_with("454 4.7.0 Too many login attempts"));
}

#[test]
fn replies_are_parsed_across_split_reads() {
    let mut buf = b"250-a\r\n250".to_vec();
    assert_eq!(take_reply(&mut buf), Ok(None));
    buf.extend_from_slice(b" b\r\nrest");
    let r = take_reply(&mut buf).unwrap().unwrap();
    assert_eq!(r.code, 250);
    assert_eq!(r.lines, vec!["a", "b"]);
    assert_eq!(buf, b"rest");
    assert!(take_reply(&mut b"garbage\r\n".to_vec()).is_err());
}

//! Byte-exact transcripts for POP3 (protocol-facts.md §7.3), without sockets.

use super::*;
use crate::protocol::testkit::{every_failure, run, sent, up_run, up_sent, WORDS};

const XO: &str = "dXNlcj1hbGljZUBnbWFpbC5jb20BYXV0aD1CZWFyZXIgeWEyOS5hMEFmQl9FWEFNUExFAQE=";
const PL: &str = "AGFsaWNlQGdtYWlsLmNvbQBsb2NhbC1zZWNyZXQ=";
const ERR: &str = "eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==";

fn session(starttls: bool) -> ClientSession {
    ClientSession::new(SessionOptions {
        starttls_offered: starttls,
        login_allowed: true,
        upstream_capa: None,
    })
}

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

fn gmail_capa() -> Vec<String> {
    GMAIL_CAPA.iter().map(|s| s.to_string()).collect()
}

#[test]
fn greeting_has_no_apop_timestamp() {
    let g = String::from_utf8(session(false).greeting()).unwrap();
    assert_eq!(g, "+OK xoauth2-proxy POP3 ready\r\n");
    assert!(!g.contains('<'));
}

#[test]
fn p1_capa_is_answered_locally_with_gmails_list_advertising_user_and_sasl_plain() {
    let mut s = session(false);
    assert_eq!(
        sent(&run(&mut s, b"CAPA\r\n")),
        "+OK Capability list follows\r\nUSER\r\nRESP-CODES\r\nEXPIRE 0\r\nLOGIN-DELAY 300\r\nTOP\r\nUIDL\r\nX-GOOGLE-RICO\r\nSASL PLAIN\r\n.\r\n"
    );
}

#[test]
fn capa_promises_what_upstream_showed_at_the_last_login_and_local_stls() {
    let mut s = ClientSession::new(SessionOptions {
        starttls_offered: true,
        login_allowed: true,
        upstream_capa: Some(vec!["TOP".to_string(), "STLS".to_string()].into()),
    });
    assert_eq!(
        sent(&run(&mut s, b"CAPA\r\n")),
        "+OK Capability list follows\r\nUSER\r\nTOP\r\nSASL PLAIN\r\nRESP-CODES\r\nSTLS\r\n.\r\n"
    );
    assert_eq!(
        rewrite_capa(&gmail_capa(), false),
        rewrite_capa(&GMAIL_CAPA, false)
    );
}

#[test]
fn every_failure_class_is_answered_with_its_response_code() {
    let expected = [
        "-ERR [AUTH] Invalid username or password (use the account's email and a local app password from `xoauth2-proxy password add`)\r\n",
        "-ERR [AUTH] alice@gmail.com is not authorized with Google yet; run `xoauth2-proxy login alice@gmail.com` on the proxy host\r\n",
        "-ERR [AUTH] Google authorization for alice@gmail.com has expired or was revoked; run `xoauth2-proxy login alice@gmail.com` on the proxy host\r\n",
        "-ERR [SYS/PERM] xoauth2-proxy cannot get a token for alice@gmail.com: invalid_client: The OAuth client was not found.\r\n",
        "-ERR [SYS/TEMP] Gmail cannot be reached right now (token endpoint returned 503); try again later\r\n",
        "-ERR [AUTH] Gmail rejected the OAuth token for alice@gmail.com (status 400, required scope https://mail.google.com/); if this persists run `xoauth2-proxy login alice@gmail.com`\r\n",
        "-ERR [IN-USE] Mailbox in use by another session.\r\n",
        "-ERR [IN-USE] alice@gmail.com already has 15 open sessions, Gmail's limit; close a mail client or wait\r\n",
    ];
    let refusal = "-ERR [IN-USE] Mailbox in use by another session.\r\n";
    for (failure, want) in every_failure(refusal).iter().zip(expected) {
        let mut s = session(false);
        run(&mut s, b"USER alice@gmail.com\r\nPASS local-secret\r\n");
        s.login_failed(failure, &WORDS);
        assert_eq!(sent(&run(&mut s, b"")), want, "{failure:?}");
        // USER is needed again.
        assert_eq!(
            sent(&run(&mut s, b"PASS x\r\n")),
            "-ERR Send USER first\r\n"
        );
    }
}

#[test]
fn p1_user_pass() {
    let mut s = session(false);
    assert_eq!(
        sent(&run(&mut s, b"USER alice@gmail.com\r\n")),
        "+OK send PASS\r\n"
    );
    assert_eq!(login_of(&run(&mut s, b"PASS local-secret\r\n")), alice());
}

#[test]
fn pass_keeps_spaces_in_the_password_and_needs_user_first() {
    let mut s = session(false);
    assert_eq!(
        sent(&run(&mut s, b"PASS x\r\n")),
        "-ERR Send USER first\r\n"
    );
    run(&mut s, b"USER alice@gmail.com\r\n");
    let (_, pw) = login_of(&run(&mut s, b"PASS pass with spaces \r\n")).unwrap();
    assert_eq!(pw, "pass with spaces ");
}

#[test]
fn p2_auth_plain_with_and_without_initial_response_and_cancel() {
    let mut s = session(false);
    assert_eq!(
        login_of(&run(&mut s, format!("AUTH PLAIN {PL}\r\n").as_bytes())),
        alice()
    );
    let mut s = session(false);
    assert_eq!(sent(&run(&mut s, b"AUTH PLAIN\r\n")), "+ \r\n");
    assert_eq!(
        login_of(&run(&mut s, format!("{PL}\r\n").as_bytes())),
        alice()
    );
    let mut s = session(false);
    run(&mut s, b"AUTH PLAIN\r\n");
    assert_eq!(
        sent(&run(&mut s, b"*\r\n")),
        "-ERR Authentication cancelled\r\n"
    );
    assert!(sent(&run(&mut s, b"AUTH PLAIN =\r\n")).starts_with("-ERR [AUTH]"));
}

#[test]
fn p4_bare_auth_lists_mechanisms_and_apop_is_refused() {
    let mut s = session(false);
    assert_eq!(sent(&run(&mut s, b"AUTH\r\n")), "+OK\r\nPLAIN\r\n.\r\n");
    assert!(
        sent(&run(&mut s, b"APOP alice@gmail.com 0123456789abcdef\r\n"))
            .starts_with("-ERR APOP is not supported")
    );
    assert!(sent(&run(&mut s, b"AUTH XOAUTH2\r\n")).starts_with("-ERR Unsupported"));
    assert!(sent(&run(&mut s, b"STAT\r\n")).starts_with("-ERR Log in first"));
    let out = run(&mut s, b"QUIT\r\n");
    assert_eq!(out.last(), Some(&Action::Close));
}

#[test]
fn commands_pipelined_after_pass_are_held() {
    let mut s = session(false);
    let out = run(
        &mut s,
        b"USER alice@gmail.com\r\nPASS local-secret\r\nSTAT\r\nLIST\r\n",
    );
    assert_eq!(login_of(&out), alice());
    assert_eq!(s.into_pending_input(), b"STAT\r\nLIST\r\n".to_vec());
}

#[test]
fn stls_drops_injected_plaintext() {
    let mut s = session(true);
    let out = run(&mut s, b"STLS\r\nUSER mallory\r\n");
    assert_eq!(
        out,
        vec![
            Action::Send(b"+OK Begin TLS negotiation\r\n".to_vec()),
            Action::StartTls
        ]
    );
    s.tls_established();
    assert!(run(&mut s, b"").is_empty());
    assert!(sent(&run(&mut s, b"STLS\r\n")).starts_with("-ERR"));
}

#[test]
fn p1_upstream_auth_is_two_step() {
    let mut m = UpstreamPop::new(Goal::Auth, Secret::new(XO), false, true);
    let out = up_run(
        &mut m,
        b"+OK Gpop ready for requests from 203.0.113.7 x1\r\n",
    );
    assert_eq!(up_sent(&out), "AUTH XOAUTH2\r\n");
    let out = up_run(&mut m, b"+ \r\n");
    assert_eq!(up_sent(&out), format!("{XO}\r\n"));
    let out = up_run(&mut m, b"+OK Welcome.\r\n");
    assert_eq!(
        out,
        vec![UpAction::Done(UpOutcome::Success {
            relay: b"+OK Welcome.\r\n".to_vec(),
            leftover: vec![]
        })]
    );
}

#[test]
fn p3_upstream_error_challenge_is_answered() {
    let mut m = UpstreamPop::new(Goal::Auth, Secret::new(XO), false, false);
    let out: Vec<_> = std::iter::from_fn(|| m.next_action()).collect();
    assert_eq!(up_sent(&out), "AUTH XOAUTH2\r\n");
    up_run(&mut m, b"+ \r\n");
    let out = up_run(&mut m, format!("+ {ERR}\r\n").as_bytes());
    assert_eq!(up_sent(&out), "\r\n");
    let out = up_run(&mut m, b"-ERR [AUTH] Invalid credentials.\r\n");
    let [UpAction::Done(UpOutcome::Rejected {
        challenge: Some(c),
        token_rejected: true,
        ..
    })] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(c.status.as_deref(), Some("400"));
}

#[test]
fn upstream_stls_then_capa() {
    let mut m = UpstreamPop::new(Goal::Capa, Secret::default(), true, true);
    assert_eq!(up_sent(&up_run(&mut m, b"+OK hi\r\n")), "STLS\r\n");
    assert_eq!(
        up_run(&mut m, b"+OK Begin TLS negotiation\r\n"),
        vec![UpAction::StartTls]
    );
    m.tls_established();
    let out: Vec<_> = std::iter::from_fn(|| m.next_action()).collect();
    assert_eq!(up_sent(&out), "CAPA\r\n");
    let out = up_run(
        &mut m,
        b"+OK Capability list follows\r\nUSER\r\nTOP\r\n.\r\n",
    );
    let [UpAction::Done(UpOutcome::Success { relay, .. })] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(UpstreamPop::lines(relay), vec!["USER", "TOP"]);
}

#[test]
fn upstream_in_use_is_not_a_token_problem() {
    let mut m = UpstreamPop::new(Goal::Auth, Secret::new(XO), false, false);
    let _ = std::iter::from_fn(|| m.next_action()).count();
    up_run(&mut m, b"+ \r\n");
    let out = up_run(&mut m, b"-ERR [IN-USE] Mailbox locked\r\n");
    assert!(matches!(
        &out[..],
        [UpAction::Done(UpOutcome::Rejected {
            token_rejected: false,
            ..
        })]
    ));
}

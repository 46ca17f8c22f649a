//! Byte-exact transcripts for the IMAP authentication phase (protocol-facts.md §7.1) and the
//! grammar corners of LOGIN/AUTHENTICATE, run against the state machines without sockets.

use super::*;
use crate::protocol::testkit::{every_failure, run, sent, up_run, up_sent, WORDS};

const XO: &str = "dXNlcj1hbGljZUBnbWFpbC5jb20BYXV0aD1CZWFyZXIgeWEyOS5hMEFmQl9FWEFNUExFAQE=";
const PL: &str = "AGFsaWNlQGdtYWlsLmNvbQBsb2NhbC1zZWNyZXQ=";
const PLZ: &str = "YWxpY2VAZ21haWwuY29tAGFsaWNlQGdtYWlsLmNvbQBsb2NhbC1zZWNyZXQ=";
const ERR: &str = "eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==";

fn session() -> ClientSession {
    ClientSession::new(SessionOptions {
        starttls_offered: false,
        login_allowed: true,
        limits: Limits::default(),
    })
}

/// The login the actions ask for, with the tag the session holds for it.
fn login_of(s: &ClientSession, actions: &[Action]) -> Option<(String, String, String)> {
    actions.iter().find_map(|a| match a {
        Action::Login { credentials } => Some((
            s.login_tag()?.to_string(),
            credentials.username.clone(),
            credentials.password.expose().to_string(),
        )),
        _ => None,
    })
}

fn alice(tag: &str) -> Option<(String, String, String)> {
    Some((tag.into(), "alice@gmail.com".into(), "local-secret".into()))
}

#[test]
fn greeting_and_capability_advertise_what_works_through_the_proxy() {
    let mut s = session();
    let greeting = String::from_utf8(s.greeting()).unwrap();
    assert_eq!(
        greeting,
        "* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN AUTH=LOGIN] xoauth2-proxy ready\r\n"
    );
    let out = run(&mut s, b"a1 CAPABILITY\r\n");
    assert_eq!(
        sent(&out),
        "* CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN AUTH=LOGIN\r\na1 OK CAPABILITY completed\r\n"
    );
    assert!(!sent(&out).contains("LOGINDISABLED"));
    assert!(!sent(&out).contains("XOAUTH2"));
}

#[test]
fn starttls_is_advertised_only_when_offered_and_drops_plaintext_after_it() {
    let mut s = ClientSession::new(SessionOptions {
        starttls_offered: true,
        login_allowed: true,
        limits: Limits::default(),
    });
    assert!(String::from_utf8(s.greeting())
        .unwrap()
        .contains(" STARTTLS]"));
    // A command injected in the same packet as STARTTLS must not survive the upgrade.
    let out = run(
        &mut s,
        b"t1 STARTTLS\r\nt2 LOGIN alice@gmail.com local-secret\r\n",
    );
    assert_eq!(
        out,
        vec![
            Action::Send(b"t1 OK Begin TLS negotiation now\r\n".to_vec()),
            Action::StartTls
        ]
    );
    s.tls_established();
    assert!(run(&mut s, b"").is_empty());
    let out = run(&mut s, b"t3 CAPABILITY\r\n");
    assert!(!sent(&out).contains("STARTTLS"));
    let out = run(&mut s, b"t4 STARTTLS\r\n");
    assert_eq!(
        sent(&out),
        "t4 BAD STARTTLS is not available on this connection\r\n"
    );
}

#[test]
fn login_before_starttls_from_a_remote_peer_is_refused() {
    let mut s = ClientSession::new(SessionOptions {
        starttls_offered: true,
        login_allowed: false,
        limits: Limits::default(),
    });
    let out = run(&mut s, b"a LOGIN alice@gmail.com local-secret\r\n");
    assert!(
        sent(&out).starts_with("a NO [PRIVACYREQUIRED]"),
        "{}",
        sent(&out)
    );
    assert_eq!(login_of(&s, &out), None);
}

#[test]
fn i1_login_with_atom_and_quoted_arguments() {
    let mut s = session();
    let out = run(&mut s, b"a2 LOGIN alice@gmail.com \"local-secret\"\r\n");
    assert_eq!(out.len(), 1);
    assert_eq!(login_of(&s, &out), alice("a2"));
}

#[test]
fn i2_login_quoted_escapes_are_unescaped() {
    let mut s = session();
    let out = run(&mut s, b"a3 LOGIN alice@gmail.com \"pa ss\\\"w\\\\d\"\r\n");
    let (_, _, pw) = login_of(&s, &out).unwrap();
    assert_eq!(pw, "pa ss\"w\\d");
    assert_eq!(pw.len(), 9);
}

#[test]
fn i3_login_with_synchronising_literals_gets_continuations() {
    let mut s = session();
    let out = run(&mut s, b"a4 LOGIN {15}\r\n");
    assert_eq!(sent(&out), "+ Ready for literal data\r\n");
    let out = run(&mut s, b"alice@gmail.com {12}\r\n");
    assert_eq!(sent(&out), "+ Ready for literal data\r\n");
    let out = run(&mut s, b"local-secret\r\n");
    assert_eq!(login_of(&s, &out), alice("a4"));
}

#[test]
fn literal_octets_may_contain_spaces_quotes_and_line_breaks() {
    let mut s = session();
    let out = run(&mut s, b"x LOGIN \"alice@gmail.com\" {7}\r\na \"b\r\nc\r\n");
    let (_, _, pw) = login_of(&s, &out).unwrap();
    assert_eq!(pw, "a \"b\r\nc");
}

#[test]
fn i4_login_with_non_synchronising_literal_sends_no_continuation() {
    let mut s = session();
    let out = run(
        &mut s,
        b"a5 LOGIN alice@gmail.com {12+}\r\nlocal-secret\r\n",
    );
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(login_of(&s, &out), alice("a5"));
}

#[test]
fn input_split_at_every_byte_gives_the_same_result() {
    let input = b"a4 LOGIN {15}\r\nalice@gmail.com {12+}\r\nlocal-secret\r\n";
    let mut s = session();
    let mut all = Vec::new();
    for b in input.iter() {
        all.extend(run(&mut s, std::slice::from_ref(b)));
    }
    assert_eq!(login_of(&s, &all), alice("a4"));
    assert_eq!(sent(&all), "+ Ready for literal data\r\n");
}

#[test]
fn i5_authenticate_plain_with_initial_response() {
    let mut s = session();
    let out = run(&mut s, format!("b1 AUTHENTICATE PLAIN {PL}\r\n").as_bytes());
    assert_eq!(login_of(&s, &out), alice("b1"));
}

#[test]
fn authenticate_plain_with_matching_authzid_is_accepted() {
    let mut s = session();
    let out = run(
        &mut s,
        format!("b9 authenticate plain {PLZ}\r\n").as_bytes(),
    );
    assert_eq!(login_of(&s, &out), alice("b9"));
}

#[test]
fn i6_authenticate_plain_without_initial_response() {
    let mut s = session();
    let out = run(&mut s, b"b2 AUTHENTICATE PLAIN\r\n");
    assert_eq!(out, vec![Action::Send(b"+ \r\n".to_vec())]);
    let out = run(&mut s, format!("{PL}\r\n").as_bytes());
    assert_eq!(login_of(&s, &out), alice("b2"));
}

#[test]
fn i7_authenticate_cancelled_with_star() {
    let mut s = session();
    run(&mut s, b"b3 AUTHENTICATE PLAIN\r\n");
    let out = run(&mut s, b"*\r\n");
    assert_eq!(sent(&out), "b3 BAD AUTHENTICATE cancelled\r\n");
    // Back in command state.
    let out = run(&mut s, b"b4 NOOP\r\n");
    assert_eq!(sent(&out), "b4 OK NOOP completed\r\n");
}

#[test]
fn i8_authenticate_plain_with_empty_initial_response() {
    let mut s = session();
    let out = run(&mut s, b"b4 AUTHENTICATE PLAIN =\r\n");
    assert_eq!(
        sent(&out),
        "b4 NO [AUTHENTICATIONFAILED] Empty credentials\r\n"
    );
}

#[test]
fn authenticate_plain_with_bad_base64_or_foreign_authzid_fails_clearly() {
    let mut s = session();
    let out = run(&mut s, b"c1 AUTHENTICATE PLAIN AGFs=aWNl\r\n");
    assert_eq!(sent(&out), "c1 BAD Invalid base64 in SASL response\r\n");
    // authzid bob, authcid alice
    let out = run(&mut s, b"c2 AUTHENTICATE PLAIN Ym9iAGFsaWNlAHB3\r\n");
    assert!(sent(&out).starts_with("c2 NO [AUTHORIZATIONFAILED]"));
}

#[test]
fn authenticate_login_prompts_for_username_then_password() {
    let mut s = session();
    let out = run(&mut s, b"d1 AUTHENTICATE LOGIN\r\n");
    assert_eq!(sent(&out), "+ VXNlcm5hbWU6\r\n");
    let out = run(&mut s, b"YWxpY2VAZ21haWwuY29t\r\n");
    assert_eq!(sent(&out), "+ UGFzc3dvcmQ6\r\n");
    let out = run(&mut s, b"bG9jYWwtc2VjcmV0\r\n");
    assert_eq!(login_of(&s, &out), alice("d1"));

    let mut s = session();
    let out = run(&mut s, b"d2 AUTHENTICATE LOGIN YWxpY2VAZ21haWwuY29t\r\n");
    assert_eq!(sent(&out), "+ UGFzc3dvcmQ6\r\n");
    let out = run(&mut s, b"bG9jYWwtc2VjcmV0\r\n");
    assert_eq!(login_of(&s, &out), alice("d2"));
}

#[test]
fn unsupported_mechanism_is_refused() {
    let mut s = session();
    let out = run(
        &mut s,
        format!("e1 AUTHENTICATE XOAUTH2 {XO}\r\n").as_bytes(),
    );
    assert_eq!(
        sent(&out),
        "e1 NO Unsupported authentication mechanism XOAUTH2; use PLAIN or LOGIN\r\n"
    );
}

#[test]
fn i10_commands_pipelined_after_login_are_held_for_upstream() {
    let mut s = session();
    let out = run(
        &mut s,
        b"a7 LOGIN alice@gmail.com local-secret\r\na8 SELECT INBOX\r\n",
    );
    assert_eq!(out.len(), 1);
    assert_eq!(login_of(&s, &out), alice("a7"));
    // More bytes while authenticating are held too, uninterpreted.
    assert!(run(&mut s, b"a9 FETCH 1 BODY[]\r\n").is_empty());
    assert_eq!(
        s.into_pending_input(),
        b"a8 SELECT INBOX\r\na9 FETCH 1 BODY[]\r\n".to_vec()
    );
}

#[test]
fn failed_login_resumes_with_the_next_pipelined_command() {
    let mut s = session();
    let out = run(&mut s, b"a1 LOGIN alice@gmail.com wrong\r\na2 NOOP\r\n");
    assert!(login_of(&s, &out).is_some());
    s.login_failed(&Failure::BadCredentials, &WORDS);
    assert_eq!(s.login_tag(), None);
    let out: Vec<_> = std::iter::from_fn(|| s.next_action()).collect();
    assert_eq!(
        sent(&out),
        "a1 NO [AUTHENTICATIONFAILED] Invalid username or password (use the account's email and a local app password from `xoauth2-proxy password add`)\r\na2 OK NOOP completed\r\n"
    );
}

#[test]
fn every_failure_class_is_answered_with_its_response_code_under_the_login_tag() {
    let expected = [
        "x7 NO [AUTHENTICATIONFAILED] Invalid username or password (use the account's email and a local app password from `xoauth2-proxy password add`)\r\n",
        "x7 NO [AUTHENTICATIONFAILED] alice@gmail.com is not authorized with Google yet; run `xoauth2-proxy login alice@gmail.com` on the proxy host\r\n",
        "x7 NO [AUTHENTICATIONFAILED] Google authorization for alice@gmail.com has expired or was revoked; run `xoauth2-proxy login alice@gmail.com` on the proxy host\r\n",
        "x7 NO [CONTACTADMIN] xoauth2-proxy cannot get a token for alice@gmail.com: invalid_client: The OAuth client was not found.\r\n",
        "x7 NO [UNAVAILABLE] Gmail cannot be reached right now (token endpoint returned 503); try again later\r\n",
        "x7 NO [AUTHENTICATIONFAILED] Gmail rejected the OAuth token for alice@gmail.com (status 400, required scope https://mail.google.com/); if this persists run `xoauth2-proxy login alice@gmail.com`\r\n",
        "x7 NO [ALERT] Too many simultaneous connections. (Failure)\r\n",
        "x7 NO [LIMIT] alice@gmail.com already has 15 open sessions, Gmail's limit; close a mail client or wait\r\n",
    ];
    let refusal = "NO [ALERT] Too many simultaneous connections. (Failure)\r\n";
    for (failure, want) in every_failure(refusal).iter().zip(expected) {
        let mut s = session();
        run(&mut s, format!("x7 AUTHENTICATE PLAIN {PL}\r\n").as_bytes());
        s.login_failed(failure, &WORDS);
        assert_eq!(sent(&run(&mut s, b"")), want, "{failure:?}");
    }
}

#[test]
fn id_noop_logout_and_unknown_commands() {
    let mut s = session();
    let out = run(&mut s, b"i1 ID (\"name\" \"Thunderbird\")\r\n");
    assert!(sent(&out).starts_with("* ID (\"name\" \"xoauth2-proxy\""));
    assert!(sent(&out).ends_with("i1 OK ID completed\r\n"));
    let out = run(&mut s, b"i2 ID NIL\r\n");
    assert!(sent(&out).ends_with("i2 OK ID completed\r\n"));
    let out = run(&mut s, b"s1 SELECT INBOX\r\n");
    assert!(sent(&out).starts_with("s1 BAD SELECT is not valid before login"));
    let out = run(&mut s, b"garbage\r\n");
    assert_eq!(sent(&out), "* BAD Invalid command syntax\r\n");
    let out = run(&mut s, b"x1 LOGIN onlyuser\r\n");
    assert!(sent(&out).starts_with("x1 BAD Invalid LOGIN arguments"));
    let out = run(&mut s, b"l1 LOGOUT\r\n");
    assert_eq!(
        out,
        vec![
            Action::Send(b"* BYE xoauth2-proxy logging out\r\nl1 OK LOGOUT completed\r\n".to_vec()),
            Action::Close
        ]
    );
    assert!(run(&mut s, b"n NOOP\r\n").is_empty());
}

/// RFC 2971's largest ID: 30 pairs of 30-octet names and 1024-octet values.
fn largest_id(tag: &str) -> String {
    let value = "v".repeat(1024);
    let pairs: Vec<String> = (0..30)
        .map(|i| format!("\"{i:0>30}\" \"{value}\""))
        .collect();
    format!("{tag} ID ({})\r\n", pairs.join(" "))
}

#[test]
fn an_id_as_large_as_rfc_2971_allows_is_answered_before_login() {
    let id = largest_id("a1");
    assert_eq!(id.len(), 31_807 + 2);
    let mut s = session();
    let out = run(&mut s, format!("{id}a2 NOOP\r\n").as_bytes());
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sent(&out),
        format!("* ID (\"name\" \"xoauth2-proxy\" \"version\" \"{version}\")\r\na1 OK ID completed\r\na2 OK NOOP completed\r\n")
    );
}

#[test]
fn an_id_list_may_open_with_a_literal() {
    let mut s = session();
    let out = run(&mut s, b"a1 ID ({4}\r\n");
    assert_eq!(sent(&out), "+ Ready for literal data\r\n");
    let out = run(&mut s, b"name \"mutt\")\r\n");
    assert!(sent(&out).ends_with("a1 OK ID completed\r\n"));
}

#[test]
fn a_line_as_long_as_the_largest_id_is_still_too_long_for_anything_else() {
    let id = largest_id("a1");
    for other in [
        id.replace(" ID (", " LOGIN ("),
        id.replace("a1 ID", "a1 NOOP"),
    ] {
        let mut s = session();
        let out = run(&mut s, other.as_bytes());
        assert_eq!(sent(&out), "* BYE [TOOBIG] Line too long\r\n");
        assert_eq!(out.last(), Some(&Action::Close));
    }
}

#[test]
fn oversized_literals_and_lines_are_refused() {
    let mut s = session();
    let out = run(&mut s, b"a LOGIN alice {2147483648}\r\n");
    assert_eq!(sent(&out), "a BAD [TOOBIG] Literal too large\r\n");
    // Still usable afterwards.
    let out = run(&mut s, b"b NOOP\r\n");
    assert_eq!(sent(&out), "b OK NOOP completed\r\n");
    // A non-synchronising one cannot be skipped safely: close.
    let out = run(&mut s, b"c LOGIN alice {99999999+}\r\n");
    assert_eq!(out.last(), Some(&Action::Close));
    let mut s = session();
    let out = run(&mut s, &vec![b'a'; 9000]);
    assert_eq!(sent(&out), "* BYE [TOOBIG] Line too long\r\n");
    assert_eq!(out.last(), Some(&Action::Close));
}

#[test]
fn debug_output_of_a_session_never_contains_the_password() {
    let mut s = session();
    s.feed(b"a LOGIN alice@gmail.com local-secret\r\n");
    let actions: Vec<_> = std::iter::from_fn(|| s.next_action()).collect();
    let dump = format!("{s:?} {actions:?}");
    assert!(!dump.contains("local-secret"), "{dump}");
}

// ---- upstream side ----

#[test]
fn i1_upstream_success_relays_untagged_capability_and_tagged_ok() {
    let mut u = UpstreamLogin::new("a2", Secret::new(XO), false);
    let out = up_run(
        &mut u,
        b"* OK Gimap ready for requests from 203.0.113.7 x1mb2\r\n",
    );
    assert_eq!(up_sent(&out), format!("a2 AUTHENTICATE XOAUTH2 {XO}\r\n"));
    let reply = "* CAPABILITY IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 UIDPLUS COMPRESS=DEFLATE ENABLE MOVE CONDSTORE ESEARCH UTF8=ACCEPT LIST-EXTENDED LIST-STATUS LITERAL- SPECIAL-USE APPENDLIMIT=35651584\r\na2 OK alice@gmail.com authenticated (Success)\r\n";
    let out = up_run(&mut u, reply.as_bytes());
    assert_eq!(
        out,
        vec![UpAction::Done(UpOutcome::Success {
            relay: reply.as_bytes().to_vec(),
            leftover: vec![]
        })]
    );
}

#[test]
fn i9_upstream_error_challenge_is_answered_with_an_empty_line() {
    let mut u = UpstreamLogin::new("a6", Secret::new(XO), false);
    up_run(&mut u, b"* OK Gimap ready\r\n");
    let out = up_run(&mut u, format!("+ {ERR}\r\n").as_bytes());
    assert_eq!(up_sent(&out), "\r\n");
    let out = up_run(
        &mut u,
        b"a6 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n",
    );
    let [UpAction::Done(UpOutcome::Rejected {
        challenge,
        line,
        token_rejected: true,
    })] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(
        line,
        "NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
    );
    assert_eq!(challenge.as_ref().unwrap().status.as_deref(), Some("400"));
    assert_eq!(response_code(line), Some("AUTHENTICATIONFAILED"));
    // Retry on the same connection with a fresh token.
    u.retry(Secret::new("TOKEN2"));
    let out: Vec<_> = std::iter::from_fn(|| u.next_action()).collect();
    assert_eq!(up_sent(&out), "a6 AUTHENTICATE XOAUTH2 TOKEN2\r\n");
}

#[test]
fn upstream_without_sasl_ir_gets_the_two_step_form_and_untagged_noise_is_tolerated() {
    let mut u = UpstreamLogin::new("a1", Secret::new(XO), false);
    let out = up_run(
        &mut u,
        b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready\r\n",
    );
    assert_eq!(up_sent(&out), "a1 AUTHENTICATE XOAUTH2\r\n");
    let out = up_run(
        &mut u,
        b"* OK Gimap ready for requests from 127.0.0.1 x\r\n+ \r\n",
    );
    assert_eq!(up_sent(&out), format!("{XO}\r\n"));
    let out = up_run(&mut u, b"a1 OK done\r\n* 1 EXISTS\r\n");
    let [UpAction::Done(UpOutcome::Success { relay, leftover })] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(
        relay,
        b"* OK Gimap ready for requests from 127.0.0.1 x\r\na1 OK done\r\n"
    );
    assert_eq!(leftover, b"* 1 EXISTS\r\n");
}

#[test]
fn upstream_starttls_comes_before_authenticate() {
    let mut u = UpstreamLogin::new("a1", Secret::new(XO), true);
    let out = up_run(
        &mut u,
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n",
    );
    assert_eq!(up_sent(&out), "P0 STARTTLS\r\n");
    let out = up_run(&mut u, b"P0 OK Begin TLS negotiation now\r\n");
    assert_eq!(out, vec![UpAction::StartTls]);
    u.tls_established();
    let out: Vec<_> = std::iter::from_fn(|| u.next_action()).collect();
    // The pre-TLS capability list lacked SASL-IR, so the two-step form is used.
    assert_eq!(up_sent(&out), "a1 AUTHENTICATE XOAUTH2\r\n");
}

#[test]
fn a_probe_stops_where_the_login_would_start_and_relays_the_greeting() {
    let mut u = UpstreamLogin::probe(true);
    let out = up_run(&mut u, b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n");
    assert_eq!(up_sent(&out), "P0 STARTTLS\r\n");
    assert_eq!(up_run(&mut u, b"P0 OK go\r\n"), vec![UpAction::StartTls]);
    u.tls_established();
    let out: Vec<_> = std::iter::from_fn(|| u.next_action()).collect();
    assert_eq!(
        out,
        vec![UpAction::Done(UpOutcome::Success {
            relay: b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n".to_vec(),
            leftover: Vec::new(),
        })]
    );
    // Gmail's PREAUTH is not a greeting serve can log in after; neither can check.
    let mut u = UpstreamLogin::probe(false);
    let out = up_run(&mut u, b"* PREAUTH welcome\r\n");
    assert!(matches!(&out[..], [UpAction::Done(UpOutcome::Failed(m))] if m.contains("PREAUTH")));
}

#[test]
fn upstream_bye_and_bad_greeting_are_failures() {
    let mut u = UpstreamLogin::new("a1", Secret::new(XO), false);
    let out = up_run(&mut u, b"* BYE Too many connections\r\n");
    assert!(matches!(&out[..], [UpAction::Done(UpOutcome::Failed(m))] if m.contains("Too many")));
    let mut u = UpstreamLogin::new("a1", Secret::new(XO), false);
    up_run(&mut u, b"* OK hi\r\n");
    let out = up_run(&mut u, b"* BYE going away\r\n");
    assert!(matches!(&out[..], [UpAction::Done(UpOutcome::Failed(_))]));
}

#[test]
fn upstream_alert_is_reported_as_rejection_with_its_code() {
    let mut u = UpstreamLogin::new("a1", Secret::new(XO), false);
    up_run(&mut u, b"* OK hi\r\n");
    let out = up_run(
        &mut u,
        b"a1 NO [ALERT] Too many simultaneous connections. (Failure)\r\n",
    );
    let [UpAction::Done(UpOutcome::Rejected {
        challenge: None,
        line,
        token_rejected: false,
    })] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(response_code(line), Some("ALERT"));
}

#[test]
fn upstream_debug_output_hides_the_token() {
    let mut u = UpstreamLogin::new("a1", Secret::new(XO), false);
    let out = up_run(&mut u, b"* OK hi\r\n");
    let dump = format!("{u:?} {out:?}");
    assert!(!dump.contains(XO), "{dump}");
}

//! Property tests for the sans-I/O authentication phases (issue 8). Any bytes, cut anywhere:
//! no panic, buffers within their limits, and the same actions as the same bytes in one piece.
//! Generated LOGIN / AUTHENTICATE commands give the credentials imap-codec reads from the same
//! bytes; where the proxy is deliberately more lenient than IMAP4rev1, a test says so.
//!
//! The model driver (`fuzz/src/harness.rs`) is shared with the cargo-fuzz targets.

#[path = "../fuzz/src/harness.rs"]
mod harness;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use harness::*;
use imap_codec::decode::{CommandDecodeError, Decoder};
use imap_codec::imap_types::command::CommandBody;
use imap_codec::{AuthenticateDataCodec, CommandCodec};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::ValueTree;
use xoauth2_proxy::protocol::imap::{Limits, UpstreamLogin};
use xoauth2_proxy::protocol::pop3::{self, Goal, UpstreamPop};
use xoauth2_proxy::protocol::sasl::decode_plain;
use xoauth2_proxy::protocol::smtp::{self, UpstreamAuth, UpstreamHello};
use xoauth2_proxy::protocol::{ClientAction, Credentials, UpAction, UpOutcome};
use xoauth2_proxy::secret::Secret;

#[global_allocator]
static METER: Meter = Meter;

const PL: &str = "AGFsaWNlQGdtYWlsLmNvbQBsb2NhbC1zZWNyZXQ=";
const PLZ: &str = "YWxpY2VAZ21haWwuY29tAGFsaWNlQGdtYWlsLmNvbQBsb2NhbC1zZWNyZXQ=";
const ERR: &str = "eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==";
const B64_USER: &str = "YWxpY2VAZ21haWwuY29t";
const B64_PASS: &str = "bG9jYWwtc2VjcmV0";

/// Enough cases to find the shallow things on every `cargo test`; the fuzzers go deep.
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        ..ProptestConfig::default()
    }
}

/// What streams for one side of one protocol are made of: lines of a command (or reply) word
/// and arguments, loose words, odd bytes and literal announcements. Arbitrary, but close
/// enough to the grammar to reach the login paths.
struct Grammar {
    /// What a stream may start with.
    openings: &'static [&'static [u8]],
    heads: &'static [&'static str],
    args: &'static [&'static [u8]],
    words: &'static [&'static [u8]],
}

fn stream(g: &'static Grammar) -> impl Strategy<Value = Vec<u8>> {
    let eol = prop_oneof![12 => Just("\r\n"), 1 => Just("\n"), 1 => Just("")];
    let args = prop_oneof![
        2 => Just(Vec::new()),
        2 => vec(select(g.args), 1..2),
        2 => vec(select(g.args), 2..3),
        1 => vec(select(g.args), 3..5),
    ];
    let line = (select(g.heads), args, eol).prop_map(|(head, args, eol)| {
        let mut line = head.as_bytes().to_vec();
        for (i, arg) in args.iter().enumerate() {
            if i > 0 || !head.is_empty() {
                line.push(b' ');
            }
            line.extend_from_slice(arg);
        }
        line.extend_from_slice(eol.as_bytes());
        line
    });
    let piece = prop_oneof![
        12 => line,
        2 => select(g.words).prop_map(<[u8]>::to_vec),
        1 => vec(any::<u8>(), 0..8),
        1 => (0u64..48, any::<bool>()).prop_map(|(n, sync)| {
            format!("{{{n}{}}}\r\n", if sync { "" } else { "+" }).into_bytes()
        }),
    ];
    (select(g.openings), vec(piece, 0..24))
        .prop_map(|(opening, pieces)| [opening.to_vec(), pieces.concat()].concat())
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..600)
}

fn repeat(piece: &[u8], n: usize) -> Vec<u8> {
    piece.repeat(n)
}

// ---------------------------------------------------------------------------------------------
// Client sessions: arbitrary and adversarial streams

const IMAP: &Grammar = &Grammar {
    openings: &[b""],
    heads: &[
        "a1 LOGIN",
        "a2 login",
        "a3 LoGiN",
        "b1 AUTHENTICATE",
        "b2 authenticate",
        "b3 AUTHENTICATE PLAIN",
        "b4 AUTHENTICATE LOGIN",
        "a4 LOGIN alice@gmail.com",
        "c1 CAPABILITY",
        "n1 NOOP",
        "s1 STARTTLS",
        "l1 LOGOUT",
        "i1 ID",
        "x1 SELECT",
        "",
        "",
        "*",
    ],
    args: &[
        b"alice@gmail.com",
        b"local-secret",
        b"\"local-secret\"",
        b"\"pa ss\\\"w\\\\d\"",
        b"{12}\r\nlocal-secret",
        b"{12+}\r\nlocal-secret",
        b"{15}\r\nalice@gmail.com",
        b"{0}\r\n",
        b"\"\"",
        b"PLAIN",
        b"LOGIN",
        b"plain",
        b"XOAUTH2",
        PL.as_bytes(),
        PLZ.as_bytes(),
        B64_USER.as_bytes(),
        B64_PASS.as_bytes(),
        b"=",
        b"*",
        b"(\"name\" \"x\")",
        b"{5}",
        b"{99999999999+}",
        b"\xc3\xa4\xff",
        b"INBOX",
    ],
    words: IMAP_WORDS,
};

const IMAP_WORDS: &[&[u8]] = &[
    b"a1 ",
    b"a2 ",
    b"* ",
    b"LOGIN ",
    b"login ",
    b"LoGiN",
    b"AUTHENTICATE ",
    b"PLAIN",
    b"plain ",
    b"LOGIN",
    b"XOAUTH2 ",
    b"alice@gmail.com",
    b"local-secret",
    b" ",
    b" ",
    b"\"",
    b"\\",
    b"\"pa ss\\\"w\\\\d\"",
    b"\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"{",
    b"}",
    b"+",
    b"{12}\r\n",
    b"{15+}\r\n",
    b"{4294967296}\r\n",
    b"{99999999999999999999+}\r\n",
    b"*",
    b"=",
    PL.as_bytes(),
    PLZ.as_bytes(),
    B64_USER.as_bytes(),
    B64_PASS.as_bytes(),
    b"CAPABILITY",
    b"STARTTLS",
    b"NOOP",
    b"LOGOUT",
    b"ID (\"name\" \"x\")",
    b"\0",
    b"\xff\xfe",
    b"a3 LOGIN alice@gmail.com local-secret\r\n",
    b"b1 AUTHENTICATE PLAIN ",
];

const SMTP: &Grammar = &Grammar {
    openings: &[b"", b"EHLO client.example\r\n", b"EHLO client.example\r\n"],
    heads: &[
        "EHLO",
        "EHLO client.example",
        "HELO x",
        "AUTH",
        "AUTH PLAIN",
        "AUTH PLAIN AGFsaWNlQGdtYWlsLmNvbQBsb2NhbC1zZWNyZXQ=",
        "auth login",
        "auth login YWxpY2VAZ21haWwuY29t",
        "STARTTLS",
        "MAIL",
        "NOOP",
        "RSET",
        "",
        "",
        "",
    ],
    args: &[
        b"client.example",
        b"PLAIN",
        b"LOGIN",
        b"plain",
        b"XOAUTH2",
        PL.as_bytes(),
        PLZ.as_bytes(),
        B64_USER.as_bytes(),
        B64_PASS.as_bytes(),
        b"=",
        b"*",
        b"FROM:<alice@gmail.com>",
        b"\xc3\xa4\xff",
        b"",
    ],
    words: SMTP_WORDS,
};

const SMTP_WORDS: &[&[u8]] = &[
    b"EHLO client.example\r\n",
    b"HELO x\r\n",
    b"EHLO",
    b"AUTH ",
    b"auth ",
    b"PLAIN",
    b"LOGIN",
    b"CRAM-MD5",
    b" ",
    b"\r\n",
    b"\r\n",
    b"\n",
    b"*",
    b"=",
    PL.as_bytes(),
    PLZ.as_bytes(),
    B64_USER.as_bytes(),
    B64_PASS.as_bytes(),
    b"STARTTLS\r\n",
    b"STARTTLS now\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"\0",
    b"\xc3\xa9\xff",
];

const POP3: &Grammar = &Grammar {
    openings: &[b""],
    heads: &[
        "USER",
        "USER alice@gmail.com",
        "PASS",
        "pass",
        "AUTH",
        "AUTH PLAIN",
        "AUTH PLAIN AGFsaWNlQGdtYWlsLmNvbQBsb2NhbC1zZWNyZXQ=",
        "PASS local-secret",
        "CAPA",
        "STLS",
        "APOP",
        "",
        "",
    ],
    args: &[
        b"alice@gmail.com",
        b"local-secret",
        b"local secret",
        b"PLAIN",
        b"plain",
        b"XOAUTH2",
        PL.as_bytes(),
        PLZ.as_bytes(),
        b"=",
        b"*",
        b"\xc3\xa4\xff",
        b"",
    ],
    words: POP3_WORDS,
};

const POP3_WORDS: &[&[u8]] = &[
    b"USER ",
    b"user ",
    b"PASS ",
    b"alice@gmail.com",
    b"local secret",
    b"AUTH",
    b"AUTH ",
    b"PLAIN",
    b"XOAUTH2",
    b" ",
    b"\r\n",
    b"\r\n",
    b"\n",
    b"*",
    b"=",
    PL.as_bytes(),
    PLZ.as_bytes(),
    b"CAPA\r\n",
    b"STLS\r\n",
    b"APOP a b\r\n",
    b"QUIT\r\n",
    b"\0",
    b"\xff",
];

fn imap(opts: u8) -> impl Fn() -> Imap {
    let limits = if opts & 4 != 0 {
        SMALL_IMAP_LIMITS
    } else {
        Limits::default()
    };
    move || Imap::new(opts & 1 != 0, opts & 2 != 0, limits)
}

fn smtp(opts: u8) -> impl Fn() -> smtp::ClientSession {
    move || {
        smtp::ClientSession::new(smtp::SessionOptions {
            starttls_offered: opts & 1 != 0,
            login_allowed: opts & 2 != 0,
            upstream_extensions: None,
        })
    }
}

fn pop3(opts: u8) -> impl Fn() -> pop3::ClientSession {
    move || {
        pop3::ClientSession::new(pop3::SessionOptions {
            starttls_offered: opts & 1 != 0,
            login_allowed: opts & 2 != 0,
            upstream_capa: None,
        })
    }
}

/// Streams that go for the limits: huge and overflowing literal counts, endless lines, lines
/// of exactly the limit and one more, floods of line ends and NULs.
fn imap_adversarial() -> Vec<Vec<u8>> {
    let d = Limits::default();
    let line_of = |len: usize| [repeat(b"x", len - 2), b"\r\n".to_vec()].concat();
    let mut out = vec![
        b"a LOGIN {4294967296}\r\n".to_vec(),
        b"a LOGIN alice {4294967296+}\r\nlocal-secret\r\n".to_vec(),
        b"a LOGIN alice {18446744073709551615}\r\n".to_vec(),
        b"a LOGIN alice {18446744073709551616+}\r\nx\r\n".to_vec(),
        b"a LOGIN alice {99999999999999999999999999}\r\n".to_vec(),
        b"a LOGIN alice {8192+}\r\n".to_vec(),
        b"a LOGIN alice {40+}\r\n".to_vec(),
        b"a LOGIN {0}\r\n {0}\r\n\r\n".to_vec(),
        repeat(b"a LOGIN {5}\r\n", 2000),
        repeat(b"x", 100_000),
        repeat(b"\r\n", 5_000),
        repeat(b"\n", 5_000),
        repeat(b"\0", 20_000),
        repeat(b"b AUTHENTICATE PLAIN\r\n", 500),
        [b"c AUTHENTICATE PLAIN\r\n".to_vec(), repeat(b"A", 9000)].concat(),
        line_of(d.max_line),
        line_of(d.max_line + 1),
        line_of(SMALL_IMAP_LIMITS.max_line),
        line_of(SMALL_IMAP_LIMITS.max_line + 1),
        [
            format!("a LOGIN alice {{{}}}\r\n", d.max_literal).into_bytes(),
            repeat(b"p", d.max_literal),
            b"\r\n".to_vec(),
        ]
        .concat(),
    ];
    // A command of literals up to and past the command limit.
    let mut long = b"a LOGIN".to_vec();
    for _ in 0..5 {
        long.extend_from_slice(b" {4000+}\r\n");
        long.extend(repeat(b"q", 4000));
    }
    long.extend_from_slice(b"\r\n");
    out.push(long);
    out
}

fn line_protocol_adversarial(max_line: usize, auth: &[u8]) -> Vec<Vec<u8>> {
    let line_of = |prefix: &[u8], len: usize| {
        [
            prefix.to_vec(),
            repeat(b"A", len - prefix.len() - 2),
            b"\r\n".to_vec(),
        ]
        .concat()
    };
    vec![
        repeat(b"x", 100_000),
        repeat(b"\r\n", 5_000),
        repeat(b"\n", 5_000),
        repeat(b"\0", 20_000),
        line_of(b"NOOP ", max_line),
        line_of(b"NOOP ", max_line + 1),
        line_of(auth, max_line),
        line_of(auth, max_line + 1),
        [auth.to_vec(), b"\r\n".to_vec(), repeat(b"A", 2 * max_line)].concat(),
        repeat(b"AUTH PLAIN\r\n*\r\n", 1000),
    ]
}

fn smtp_adversarial() -> Vec<Vec<u8>> {
    let mut out = line_protocol_adversarial(smtp::MAX_LINE, b"AUTH PLAIN ");
    out.push(repeat(b"EHLO x\r\n", 2000));
    out.push([b"EHLO x\r\n".to_vec(), line_of_b64(smtp::MAX_LINE)].concat());
    out
}

fn pop3_adversarial() -> Vec<Vec<u8>> {
    let mut out = line_protocol_adversarial(pop3::MAX_LINE, b"AUTH PLAIN ");
    out.push(repeat(b"USER alice\r\n", 2000));
    out.push(
        [
            b"USER alice\r\nPASS ".to_vec(),
            repeat(b"p", pop3::MAX_LINE - 7),
            b"\r\n".to_vec(),
        ]
        .concat(),
    );
    out
}

/// `AUTH PLAIN <b64>` filling a line of exactly `len` octets (padded with spaces before the
/// initial response, which the session tolerates).
fn line_of_b64(len: usize) -> Vec<u8> {
    let room = len - b"AUTH PLAIN \r\n".len();
    let message = [b"\0alice\0".to_vec(), repeat(b"p", room / 4 * 3 - 7)].concat();
    let pad = " ".repeat(room % 4);
    format!("AUTH PLAIN {pad}{}\r\n", STANDARD.encode(message)).into_bytes()
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn imap_client_word_streams_act_the_same_however_split(
        s in stream(IMAP), shape: u8, choices: u8, opts: u8,
    ) {
        check_client(imap(opts), &s, shape, choices);
    }

    #[test]
    fn imap_client_arbitrary_bytes_act_the_same_however_split(
        s in bytes(), shape: u8, choices: u8, opts: u8,
    ) {
        check_client(imap(opts), &s, shape, choices);
    }

    #[test]
    fn smtp_client_word_streams_act_the_same_however_split(
        s in stream(SMTP), shape: u8, choices: u8, opts: u8,
    ) {
        check_client(smtp(opts), &s, shape, choices);
    }

    #[test]
    fn smtp_client_arbitrary_bytes_act_the_same_however_split(
        s in bytes(), shape: u8, choices: u8, opts: u8,
    ) {
        check_client(smtp(opts), &s, shape, choices);
    }

    #[test]
    fn pop3_client_word_streams_act_the_same_however_split(
        s in stream(POP3), shape: u8, choices: u8, opts: u8,
    ) {
        check_client(pop3(opts), &s, shape, choices);
    }

    #[test]
    fn pop3_client_arbitrary_bytes_act_the_same_however_split(
        s in bytes(), shape: u8, choices: u8, opts: u8,
    ) {
        check_client(pop3(opts), &s, shape, choices);
    }
}

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn imap_client_adversarial_streams_stay_bounded(
        s in select(imap_adversarial()), shape: u8, choices: u8, opts: u8,
    ) {
        check_client(imap(opts), &s, shape, choices);
    }

    #[test]
    fn smtp_client_adversarial_streams_stay_bounded(
        s in select(smtp_adversarial()), shape: u8, choices: u8, opts: u8,
    ) {
        check_client(smtp(opts), &s, shape, choices);
    }

    #[test]
    fn pop3_client_adversarial_streams_stay_bounded(
        s in select(pop3_adversarial()), shape: u8, choices: u8, opts: u8,
    ) {
        check_client(pop3(opts), &s, shape, choices);
    }
}

/// The share of generated client streams that get as far as a login: a guard against
/// generators that only ever produce syntax errors.
fn login_share<S: Client>(g: &'static Grammar, make: impl Fn() -> S) -> f64 {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = stream(g);
    let logins = (0..200)
        .filter(|_| {
            let s = strategy.new_tree(&mut runner).expect("a stream").current();
            // Queries answered, logins accepted (which ends the run).
            let events = drive_client(make(), &[&s], 0xff);
            events
                .iter()
                .any(|e| matches!(e, Event::Action(ClientAction::Login { .. })))
        })
        .count();
    logins as f64 / 200.0
}

#[test]
fn generated_streams_reach_the_login_paths() {
    for (name, share) in [
        ("IMAP", login_share(IMAP, imap(2))),
        ("SMTP", login_share(SMTP, smtp(2))),
        ("POP3", login_share(POP3, pop3(2))),
    ] {
        assert!(share >= 0.08, "only {share} of {name} streams log in");
        eprintln!("{name}: {share} of streams log in");
    }
}

// ---------------------------------------------------------------------------------------------
// STARTTLS: what arrives in the same read as the command never counts

fn sent(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Action(ClientAction::Send(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn imap_bytes_behind_starttls_are_dropped(
        junk in bytes(), after in stream(IMAP), choices: u8,
    ) {
        let run = |first: &[u8]| drive_client(imap(1)(), &[first, &after[..]], choices);
        let clean = run(b"t1 STARTTLS\r\n");
        prop_assert_eq!(run(&[&b"t1 STARTTLS\r\n"[..], &junk].concat()), clean);
    }

    #[test]
    fn smtp_bytes_behind_starttls_are_dropped(
        junk in bytes(), after in stream(SMTP), choices: u8,
    ) {
        let run = |first: &[u8]| drive_client(smtp(1)(), &[first, &after[..]], choices);
        let clean = run(b"STARTTLS\r\n");
        prop_assert_eq!(run(&[&b"STARTTLS\r\n"[..], &junk].concat()), clean);
    }

    #[test]
    fn pop3_bytes_behind_stls_are_dropped(
        junk in bytes(), after in stream(POP3), choices: u8,
    ) {
        let run = |first: &[u8]| drive_client(pop3(1)(), &[first, &after[..]], choices);
        let clean = run(b"STLS\r\n");
        prop_assert_eq!(run(&[&b"STLS\r\n"[..], &junk].concat()), clean);
    }
}

#[test]
fn lines_of_exactly_the_limit_are_read_and_one_more_closes() {
    let d = Limits::default();
    let noop = |len: usize| [b"n NOOP".to_vec(), repeat(b" ", len - 8), b"\r\n".to_vec()].concat();
    // A NOOP padded with spaces is a syntax error, but it is read as one line.
    let at = drive_client(imap(2)(), &[&noop(d.max_line)], 0);
    assert_eq!(sent(&at), "n BAD Unexpected arguments\r\n");
    let over = drive_client(imap(2)(), &[&noop(d.max_line + 1)], 0);
    assert_eq!(sent(&over), "* BYE [TOOBIG] Line too long\r\n");

    let line = line_of_b64(smtp::MAX_LINE);
    assert_eq!(line.len(), smtp::MAX_LINE);
    let at = drive_client(smtp(2)(), &[b"EHLO x\r\n", &line], 1);
    assert!(at.iter().any(
        |e| matches!(e, Event::Action(ClientAction::Login { credentials, .. })
        if credentials.username == "alice")
    ));
    let over = [b" ".to_vec(), line].concat();
    let over = drive_client(smtp(2)(), &[b"EHLO x\r\n", &over], 1);
    assert!(sent(&over).ends_with("500 5.5.6 Line too long\r\n"));

    let pass = |len: usize| [b"PASS ".to_vec(), repeat(b"p", len - 7), b"\r\n".to_vec()].concat();
    let at = drive_client(pop3(2)(), &[b"USER alice\r\n", &pass(pop3::MAX_LINE)], 1);
    assert!(
        matches!(&at[1], Event::Action(ClientAction::Login { credentials, .. })
        if credentials.password.expose().len() == pop3::MAX_LINE - 7)
    );
    let over = drive_client(
        pop3(2)(),
        &[b"USER alice\r\n", &pass(pop3::MAX_LINE + 1)],
        1,
    );
    assert_eq!(sent(&over), "+OK send PASS\r\n-ERR Line too long\r\n");
}

// ---------------------------------------------------------------------------------------------
// Upstream machines

const IMAP_SERVER: &Grammar = &Grammar {
    openings: &[b"", b"* OK [CAPABILITY IMAP4rev1 SASL-IR] ready\r\n"],
    heads: &[
        "* OK",
        "* OK",
        "* CAPABILITY",
        "+",
        "+",
        "a1 OK",
        "a1 NO",
        "a1 BAD",
        "P0 OK",
        "P0 NO",
        "* BYE",
        "* 1 EXISTS",
        "x OK",
        "A00001 NO",
        "",
    ],
    args: &[
        b"[CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2]",
        b"[CAPABILITY IMAP4rev1]",
        b"[AUTHENTICATIONFAILED]",
        b"[ALERT]",
        b"[UNAVAILABLE]",
        b"IMAP4rev1 STARTTLS",
        ERR.as_bytes(),
        b"Invalid credentials (Failure)",
        b"ready",
        b"",
    ],
    words: IMAP_SERVER_WORDS,
};

const IMAP_SERVER_WORDS: &[&[u8]] = &[
    b"* OK ",
    b"* OK Gimap ready\r\n",
    b"[CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2]",
    b"[CAPABILITY IMAP4rev1]",
    b"* CAPABILITY IMAP4rev1 STARTTLS\r\n",
    b"+ ",
    b"+\r\n",
    ERR.as_bytes(),
    b"a1 OK alice@gmail.com authenticated (Success)\r\n",
    b"a1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n",
    b"a1 NO [ALERT] Please log in via your web browser\r\n",
    b"a1 BAD x\r\n",
    b"a1 ",
    b"P0 OK Begin TLS\r\n",
    b"P0 NO\r\n",
    b"* BYE bye\r\n",
    b"* 1 EXISTS\r\n",
    b"\r\n",
    b"\n",
    b" ",
];

const SMTP_SERVER: &Grammar = &Grammar {
    openings: &[b"", b"220 smtp.gmail.com ESMTP\r\n"],
    heads: &[
        "220", "220-", "250", "250-", "250-", "334", "235", "535", "535-", "454", "501", "12", "",
    ],
    args: &[
        b"smtp.gmail.com ESMTP",
        b"2.0.0 Ready to start TLS",
        b"SIZE 35882577",
        b"STARTTLS",
        b"AUTH LOGIN PLAIN XOAUTH2",
        ERR.as_bytes(),
        b"2.7.0 Accepted",
        b"5.7.8 Username and Password not accepted.",
        b"",
    ],
    words: SMTP_SERVER_WORDS,
};

const SMTP_SERVER_WORDS: &[&[u8]] = &[
    b"220 smtp.gmail.com ESMTP\r\n",
    b"220 ",
    b"250-smtp.gmail.com at your service\r\n",
    b"250-",
    b"250 ",
    b"SIZE 35882577\r\n",
    b"STARTTLS\r\n",
    b"AUTH LOGIN PLAIN XOAUTH2\r\n",
    b"250 SMTPUTF8\r\n",
    b"334 \r\n",
    b"334 ",
    ERR.as_bytes(),
    b"235 2.7.0 Accepted\r\n",
    b"535-5.7.8 Username and Password not accepted.\r\n",
    b"535 5.7.8 https://support.google.com/mail/?p=BadCredentials\r\n",
    b"454 4.7.0 Try again later\r\n",
    b"220 2.0.0 Ready to start TLS\r\n",
    b"\r\n",
    b"\n",
    b"12",
    b"xyz",
];

const POP3_SERVER: &Grammar = &Grammar {
    openings: &[b"", b"+OK Gpop ready\r\n"],
    heads: &[
        "+OK", "+OK", "+", "+", "-ERR", "-ERR", ".", "..x", "USER", "SASL", "", "",
    ],
    args: &[
        b"Gpop ready",
        b"Capability list follows",
        b"Welcome.",
        b"[AUTH] Invalid credentials.",
        b"[SYS/TEMP] try later",
        b"[IN-USE]",
        b"[LOGIN-DELAY]",
        b"PLAIN XOAUTH2",
        ERR.as_bytes(),
        b"",
    ],
    words: POP3_SERVER_WORDS,
};

const POP3_SERVER_WORDS: &[&[u8]] = &[
    b"+OK Gpop ready\r\n",
    b"+OK ",
    b"+ \r\n",
    b"+\r\n",
    b"+ ",
    ERR.as_bytes(),
    b"+OK Welcome.\r\n",
    b"-ERR [AUTH] Invalid credentials.\r\n",
    b"-ERR [SYS/TEMP] try later\r\n",
    b"-ERR [IN-USE] locked\r\n",
    b"+OK Capability list follows\r\n",
    b"USER\r\n",
    b"SASL PLAIN XOAUTH2\r\n",
    b".\r\n",
    b"..x\r\n",
    b"\r\n",
    b"\n",
    b"-ERR",
];

fn imap_up(opts: u8) -> impl Fn() -> UpstreamLogin {
    let tag = ["a1", "P0", "x", "A00001"][usize::from(opts >> 1 & 3)];
    move || UpstreamLogin::new(tag, Secret::new(TOKEN), opts & 1 != 0)
}

fn smtp_up(s: &[u8], shape: u8, choices: u8, opts: u8) {
    let (starttls, fresh) = (opts & 2 != 0, opts & 4 != 0);
    if opts & 1 == 0 {
        let make = || UpstreamHello::new("client.example", starttls, fresh);
        check_upstream(make, s, shape, choices, SMTP_UP);
    } else {
        let make = || UpstreamAuth::new(Secret::new(TOKEN));
        check_upstream(make, s, shape, choices, SMTP_UP);
    }
}

fn pop3_up(opts: u8) -> impl Fn() -> UpstreamPop {
    let goal = if opts & 1 == 0 {
        Goal::Capa
    } else {
        Goal::Auth
    };
    move || UpstreamPop::new(goal, Secret::new(TOKEN), opts & 2 != 0, opts & 4 != 0)
}

/// Servers that go for the limits: endless lines, one line past the limit in one piece,
/// floods of untagged lines, continuation lines and capabilities.
fn server_adversarial(greeting: &[u8], line: &[u8], flood: &[u8]) -> Vec<Vec<u8>> {
    vec![
        repeat(b"a", 200_000),
        [
            greeting.to_vec(),
            line.to_vec(),
            repeat(b"a", 100_000),
            b"\r\n".to_vec(),
        ]
        .concat(),
        [greeting.to_vec(), repeat(flood, 400_000 / flood.len())].concat(),
        [greeting.to_vec(), repeat(b"\r\n", 20_000)].concat(),
        repeat(b"\0", 20_000),
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn imap_upstream_word_streams_act_the_same_however_split(
        s in stream(IMAP_SERVER), shape: u8, choices: u8, opts: u8,
    ) {
        check_upstream(imap_up(opts), &s, shape, choices, IMAP_UP);
    }

    #[test]
    fn imap_upstream_arbitrary_bytes_act_the_same_however_split(
        s in bytes(), shape: u8, choices: u8, opts: u8,
    ) {
        check_upstream(imap_up(opts), &s, shape, choices, IMAP_UP);
    }

    #[test]
    fn smtp_upstream_word_streams_act_the_same_however_split(
        s in stream(SMTP_SERVER), shape: u8, choices: u8, opts: u8,
    ) {
        smtp_up(&s, shape, choices, opts);
    }

    #[test]
    fn smtp_upstream_arbitrary_bytes_act_the_same_however_split(
        s in bytes(), shape: u8, choices: u8, opts: u8,
    ) {
        smtp_up(&s, shape, choices, opts);
    }

    #[test]
    fn pop3_upstream_word_streams_act_the_same_however_split(
        s in stream(POP3_SERVER), shape: u8, choices: u8, opts: u8,
    ) {
        check_upstream(pop3_up(opts), &s, shape, choices, POP3_UP);
    }

    #[test]
    fn pop3_upstream_arbitrary_bytes_act_the_same_however_split(
        s in bytes(), shape: u8, choices: u8, opts: u8,
    ) {
        check_upstream(pop3_up(opts), &s, shape, choices, POP3_UP);
    }
}

proptest! {
    #![proptest_config(cases(48))]

    #[test]
    fn imap_upstream_adversarial_servers_stay_bounded(
        s in select(server_adversarial(b"* OK ready\r\n", b"* ", b"* 1 EXISTS\r\n")),
        shape: u8, choices: u8, opts: u8,
    ) {
        check_upstream(imap_up(opts & !1), &s, shape, choices, IMAP_UP);
    }

    #[test]
    fn smtp_upstream_adversarial_servers_stay_bounded(
        s in select(server_adversarial(b"220 ready\r\n", b"250 ", b"250-SIZE 1\r\n")),
        shape: u8, choices: u8, opts: u8,
    ) {
        smtp_up(&s, shape, choices, opts | 4);
    }

    #[test]
    fn pop3_upstream_adversarial_servers_stay_bounded(
        s in select(server_adversarial(b"+OK ready\r\n+OK caps\r\n", b"-ERR ", b"CAP\r\n")),
        shape: u8, choices: u8, opts: u8,
    ) {
        check_upstream(pop3_up(opts | 4), &s, shape, choices, POP3_UP);
    }
}

#[test]
fn an_smtp_reply_past_the_limit_fails_however_it_arrives() {
    // Found by the properties above: the limit was checked only while the line end had not
    // arrived, so one read holding a whole 100 KB line passed it.
    let reply = [&b"250 "[..], &repeat(b"a", 100_000), b"\r\n"].concat();
    for read in [reply.len(), 8192, 1000] {
        let machine = UpstreamHello::new("client.example", false, false);
        let reads: Vec<&[u8]> = reply.chunks(read).collect();
        let events = drive_upstream(machine, &reads, 0, SMTP_UP);
        let failed = match events.last() {
            Some(UpEvent::Action(UpAction::Done(UpOutcome::Failed(why)))) => {
                why.contains("over-long")
            }
            _ => false,
        };
        assert!(failed, "{events:?}");
    }
    assert!(smtp::take_reply(&mut reply.clone()).is_err());
}

// ---------------------------------------------------------------------------------------------
// IMAP LOGIN / AUTHENTICATE against imap-codec

/// ASTRING-CHAR: CHAR minus atom-specials, plus "]".
fn astring_chars() -> Vec<u8> {
    (0x21u8..0x7f)
        .filter(|b| !b"(){%*\"\\".contains(b))
        .collect()
}

fn tag() -> impl Strategy<Value = Vec<u8>> {
    let chars: Vec<u8> = astring_chars().into_iter().filter(|&b| b != b'+').collect();
    vec(select(chars), 1..8)
}

/// `word` with each letter's case from `mask`.
fn cased(word: &str, mask: u32) -> Vec<u8> {
    word.bytes()
        .enumerate()
        .map(|(i, b)| {
            if mask >> (i % 32) & 1 == 1 {
                b.to_ascii_lowercase()
            } else {
                b
            }
        })
        .collect()
}

fn quote(value: &[u8]) -> Vec<u8> {
    let mut out = vec![b'"'];
    for &b in value {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

fn literal(value: &[u8], sync: bool) -> Vec<u8> {
    let plus = if sync { "" } else { "+" };
    [
        format!("{{{}{plus}}}\r\n", value.len()).into_bytes(),
        value.to_vec(),
    ]
    .concat()
}

/// An astring valid in IMAP4rev1 and to the proxy: its value, its encoding, and whether the
/// encoding is a synchronising literal (the proxy answers those with a continuation).
fn astring() -> impl Strategy<Value = (Vec<u8>, Vec<u8>, bool)> {
    // TEXT-CHAR: 7-bit, no NUL, CR or LF.
    let text_char = (1u8..0x80).prop_filter("TEXT-CHAR", |b| *b != b'\r' && *b != b'\n');
    prop_oneof![
        vec(select(astring_chars()), 1..16).prop_map(|v| (v.clone(), v, false)),
        vec(text_char, 0..16).prop_map(|v| (v.clone(), quote(&v), false)),
        // CHAR8 without NUL; any octets, UTF-8 or not.
        (vec(1u8..=255, 0..20), any::<bool>()).prop_map(|(v, sync)| {
            let enc = literal(&v, sync);
            (v, enc, sync)
        }),
    ]
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn login_action(user: &[u8], pass: &[u8]) -> ClientAction {
    ClientAction::Login {
        credentials: Credentials {
            username: lossy(user),
            password: Secret::new(lossy(pass)),
        },
    }
}

const CONTINUE: &[u8] = b"+ Ready for literal data\r\n";

/// The proxy's actions for `input` cut by `shape`, logins refused, without the continuation
/// requests for synchronising literals (and how many there were).
fn imap_answers(input: &[u8], shape: u8) -> (Vec<ClientAction>, usize) {
    let events = drive_client(imap(2)(), &chunks(input, shape), 0);
    let mut continuations = 0;
    let mut actions = Vec::new();
    for e in events {
        match e {
            Event::Action(ClientAction::Send(b)) if b == CONTINUE => continuations += 1,
            Event::Action(a) => actions.push(a),
            Event::Pending(_) | Event::End { .. } => {}
        }
    }
    (actions, continuations)
}

/// A tagged or untagged BAD or NO.
fn bad_or_no(a: Option<&ClientAction>) -> bool {
    matches!(a, Some(ClientAction::Send(b))
        if b.windows(5).any(|w| w == b" BAD ") || b.windows(4).any(|w| w == b" NO "))
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn login_commands_give_the_credentials_imap_codec_reads(
        tag in tag(), mask: u32, user in astring(), pass in astring(), shape: u8,
    ) {
        let (u, u_enc, u_sync) = user;
        let (p, p_enc, p_sync) = pass;
        let login = cased("LOGIN", mask);
        let cmd = [&tag[..], b" ", &login, b" ", &u_enc, b" ", &p_enc, b"\r\n"].concat();

        let (rest, command) = CommandCodec::default().decode(&cmd).expect("imap-codec parses it");
        prop_assert!(rest.is_empty());
        prop_assert_eq!(command.tag.inner().as_bytes(), &tag[..]);
        let CommandBody::Login { username, password } = command.body else {
            panic!("imap-codec read {:?}", command.body);
        };
        prop_assert_eq!(username.as_ref(), &u[..]);
        prop_assert_eq!(password.declassify().as_ref(), &p[..]);

        let (actions, continuations) = imap_answers(&cmd, shape);
        prop_assert_eq!(continuations, usize::from(u_sync) + usize::from(p_sync));
        let expected = if u.is_empty() || p.is_empty() {
            let t = lossy(&tag);
            let reply = format!("{t} NO [AUTHENTICATIONFAILED] Empty credentials\r\n");
            ClientAction::Send(reply.into())
        } else {
            login_action(&u, &p)
        };
        prop_assert_eq!(actions.first(), Some(&expected));
    }

    #[test]
    fn authenticate_commands_give_what_imap_codec_reads(
        tag in tag(), kw_mask: u32, mech_mask: u32,
        mech in select(vec!["PLAIN", "LOGIN", "XOAUTH2", "CRAM-MD5", "X.Y_Z-1"]),
        ir in 0u8..3,
        user in vec(1u8..=255, 1..20), pass in vec(1u8..=255, 1..20), authzid: bool,
        shape: u8,
    ) {
        let b64 = |b: &[u8]| STANDARD.encode(b).into_bytes();
        let message = [if authzid { &user[..] } else { b"" }, b"\0", &user, b"\0", &pass].concat();
        let (first, lines): (Option<Vec<u8>>, Vec<Vec<u8>>) = match (mech, ir) {
            (_, 2) => (Some(b"=".to_vec()), vec![]),
            ("LOGIN", 1) => (Some(b64(&user)), vec![b64(&pass)]),
            ("LOGIN", _) => (None, vec![b64(&user), b64(&pass)]),
            ("PLAIN", 0) => (None, vec![b64(&message)]),
            (_, 0) => (None, vec![]),
            (_, _) => (Some(b64(&message)), vec![]),
        };
        let (keyword, name) = (cased("AUTHENTICATE", kw_mask), cased(mech, mech_mask));
        let mut line1 = [&tag[..], b" ", &keyword, b" ", &name].concat();
        if let Some(ir) = &first {
            line1.extend_from_slice(b" ");
            line1.extend_from_slice(ir);
        }
        line1.extend_from_slice(b"\r\n");

        // imap-codec: the command, then each response line.
        let (rest, command) = CommandCodec::default().decode(&line1).expect("imap-codec parses it");
        prop_assert!(rest.is_empty());
        let CommandBody::Authenticate { mechanism, initial_response } = command.body else {
            panic!("imap-codec read {:?}", command.body);
        };
        prop_assert_eq!(mechanism.to_string().to_ascii_uppercase(), mech);
        let mut data: Vec<Vec<u8>> =
            initial_response.map(|r| r.declassify().to_vec()).into_iter().collect();
        for line in &lines {
            let line = [&line[..], b"\r\n"].concat();
            let (rest, d) =
                AuthenticateDataCodec::default().decode(&line).expect("imap-codec reads it");
            prop_assert!(rest.is_empty());
            data.push(d.0.declassify().clone());
        }

        let responses: Vec<u8> = lines.iter().flat_map(|l| [&l[..], b"\r\n"].concat()).collect();
        let input = [line1, responses].concat();
        let (actions, _) = imap_answers(&input, shape);
        let t = lossy(&tag);
        let is_continuation =
            |a: &&ClientAction| matches!(a, ClientAction::Send(b) if b.starts_with(b"+ "));
        let result = actions.iter().find(|a| !is_continuation(a));
        match (mech, ir) {
            ("PLAIN" | "LOGIN", 2) => {
                prop_assert_eq!(&data, &vec![Vec::<u8>::new()]);
                let expected = format!("{t} NO [AUTHENTICATIONFAILED] Empty credentials\r\n");
                prop_assert_eq!(result, Some(&ClientAction::Send(expected.into())));
            }
            ("PLAIN", _) => {
                prop_assert_eq!(data.len(), 1);
                let theirs = decode_plain(&data[0]).expect("a valid PLAIN message");
                prop_assert_eq!(theirs.username, lossy(&user));
                prop_assert_eq!(result, Some(&login_action(&user, &pass)));
            }
            ("LOGIN", _) => {
                prop_assert_eq!(&data, &vec![user.clone(), pass.clone()]);
                prop_assert_eq!(result, Some(&login_action(&user, &pass)));
            }
            _ => {
                let name = lossy(&name).to_ascii_uppercase();
                let expected = format!(
                    "{t} NO Unsupported authentication mechanism {name}; use PLAIN or LOGIN\r\n"
                );
                prop_assert_eq!(result, Some(&ClientAction::Send(expected.into_bytes())));
            }
        }
    }

    /// Near-misses as well as valid arguments: bad escapes, unterminated quotes, literal
    /// counts too small or too large, stray specials. Where imap-codec reads a LOGIN, the proxy
    /// logs in with the same credentials; where it refuses, so does the proxy; where it wants
    /// more bytes, the proxy waits.
    #[test]
    fn login_near_misses_are_judged_like_imap_codec(
        tag in tag(), mask: u32,
        args in vec((select(vec![" ", " ", " ", "", "  "]), near_miss()), 0..4),
        shape: u8,
    ) {
        let mut cmd = [&tag[..], b" ", &cased("LOGIN", mask)].concat();
        for (sep, piece) in &args {
            cmd.extend_from_slice(sep.as_bytes());
            cmd.extend_from_slice(piece);
        }
        cmd.extend_from_slice(b"\r\n");

        let (actions, _) = imap_answers(&cmd, shape);
        let ours = actions.first();
        match CommandCodec::default().decode(&cmd) {
            Ok((_, command)) => {
                let CommandBody::Login { username, password } = command.body else {
                    panic!("imap-codec read {:?}", command.body);
                };
                let (u, p) = (username.as_ref(), password.declassify().as_ref());
                if u.is_empty() || p.is_empty() {
                    prop_assert!(bad_or_no(ours), "{:?}", ours);
                } else {
                    prop_assert_eq!(ours, Some(&login_action(u, p)));
                }
            }
            Err(CommandDecodeError::Failed) => {
                if ours.is_none() {
                    // Known difference: a line ending in {n} is a literal announcement to the
                    // proxy even where the grammar allows no literal (see below).
                    let shown = String::from_utf8_lossy(&cmd);
                    prop_assert!(ends_in_literal_announcement(&cmd), "{:?}", shown);
                } else if matches!(ours, Some(ClientAction::Login { .. })) {
                    // Known difference: a bare LF ends a line. With CRLF in its place
                    // imap-codec reads the same login.
                    let events = drive_client(imap(2)(), &[&cmd], 0xff);
                    let Some(Event::Pending(rest)) = events.last() else {
                        panic!("an accepted login hands over the rest: {events:?}");
                    };
                    let first = &cmd[..cmd.len() - rest.len()];
                    prop_assert!(first.ends_with(b"\n"));
                    let relaxed = [&first[..first.len() - 1], b"\r\n"].concat();
                    let Ok((_, command)) = CommandCodec::default().decode(&relaxed) else {
                        panic!("imap-codec refuses {:?}", String::from_utf8_lossy(&relaxed));
                    };
                    let CommandBody::Login { username, password } = command.body else {
                        panic!("imap-codec read {:?}", command.body);
                    };
                    let (u, p) = (username.as_ref(), password.declassify().as_ref());
                    let theirs = login_action(u, p);
                    prop_assert_eq!(ours, Some(&theirs));
                } else {
                    prop_assert!(bad_or_no(ours), "{:?}", ours);
                }
            }
            Err(CommandDecodeError::Incomplete | CommandDecodeError::LiteralFound { .. }) => {
                prop_assert_eq!(ours, None);
            }
        }
    }

    /// The initial response is strict base64 to both: accepted and refused alike.
    #[test]
    fn initial_responses_are_base64_to_both(ir in "[A-Za-z0-9+/=]{1,16}", shape: u8) {
        let cmd = format!("a AUTHENTICATE PLAIN {ir}\r\n").into_bytes();
        let (actions, _) = imap_answers(&cmd, shape);
        let ours = actions.first();
        match CommandCodec::default().decode(&cmd) {
            Ok((_, command)) => {
                let CommandBody::Authenticate { initial_response: Some(data), .. } = command.body
                else {
                    panic!("imap-codec read {:?}", command.body);
                };
                let agrees = match (decode_plain(data.declassify()), ours) {
                    (Ok(c), Some(ClientAction::Login { credentials, .. })) => *credentials == c,
                    (Err(_), Some(ClientAction::Send(b))) => b.starts_with(b"a NO "),
                    _ => false,
                };
                prop_assert!(agrees, "{:?}", ours);
            }
            Err(_) => {
                let expected = b"a BAD Invalid base64 in SASL response\r\n".to_vec();
                prop_assert_eq!(ours, Some(&ClientAction::Send(expected)));
            }
        }
    }
}

const STRAYS: &[&[u8]] = &[
    b"{", b"}", b"{}", b"{x}", b"{5", b"(", b")", b"%", b"*", b"]", b"\\", b"\"", b"+",
];

fn near_miss() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => astring().prop_map(|(_, enc, _)| enc),
        1 => Just(b"\"a\\b\"".to_vec()),
        1 => Just(b"\"unterminated".to_vec()),
        1 => Just(b"\"\"".to_vec()),
        1 => (vec(1u8..=255, 0..8), 0usize..12, any::<bool>()).prop_map(|(v, n, sync)| {
            let plus = if sync { "" } else { "+" };
            [format!("{{{n}{plus}}}\r\n").into_bytes(), v].concat()
        }),
        1 => select(STRAYS).prop_map(<[u8]>::to_vec),
    ]
}

/// Whether some line of `cmd` (before its CRLF) ends in `{n}` or `{n+}`.
fn ends_in_literal_announcement(cmd: &[u8]) -> bool {
    cmd.split(|&b| b == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(inner) = line.strip_suffix(b"}") else {
            return false;
        };
        let Some(open) = inner.iter().rposition(|&b| b == b'{') else {
            return false;
        };
        // As the proxy reads it: a literal is a whole argument or opens a list (`ID ({4}`).
        if open == 0 || !matches!(inner[open - 1], b' ' | b'(') {
            return false;
        }
        let spec = &inner[open + 1..];
        let digits = spec.strip_suffix(b"+").unwrap_or(spec);
        !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
    })
}

// Where the proxy deliberately accepts more than IMAP4rev1 (as imap-codec reads it), pinned so
// a change is a decision.

fn codec_fails(cmd: &[u8]) -> bool {
    matches!(
        CommandCodec::default().decode(cmd),
        Err(CommandDecodeError::Failed)
    )
}

#[test]
fn raw_utf8_in_a_quoted_password_is_accepted_though_imap4rev1_forbids_it() {
    // Clients send UTF-8 passwords in quotes whatever the RFC says (protocol-facts §2.1).
    let cmd = "a LOGIN alice \"pässwörd\"\r\n".as_bytes();
    assert!(codec_fails(cmd));
    let (actions, _) = imap_answers(cmd, 7);
    assert_eq!(actions[0], login_action(b"alice", "pässwörd".as_bytes()));
}

#[test]
fn nul_inside_a_literal_is_passed_on_though_char8_excludes_it() {
    let cmd = b"a LOGIN alice {3+}\r\na\0b\r\n";
    assert!(codec_fails(cmd));
    let (actions, _) = imap_answers(cmd, 7);
    assert_eq!(actions[0], login_action(b"alice", b"a\0b"));
}

#[test]
fn a_bare_lf_ends_a_line() {
    let cmd = b"a LOGIN alice local-secret\n";
    assert!(codec_fails(cmd));
    let (actions, _) = imap_answers(cmd, 7);
    assert_eq!(actions[0], login_action(b"alice", b"local-secret"));
}

#[test]
fn a_count_glued_to_a_word_is_not_a_literal() {
    // `{` cannot be part of an atom: like imap-codec, the proxy refuses the line at once
    // instead of waiting for (and swallowing) octets of the client's next command.
    let cmd = b"a LOGIN alice pw{3}\r\n";
    assert!(codec_fails(cmd));
    let (actions, continuations) = imap_answers(cmd, 7);
    assert_eq!(continuations, 0);
    assert_eq!(
        actions[0],
        ClientAction::Send(
            b"a BAD Invalid LOGIN arguments: expected LOGIN user password\r\n".to_vec()
        )
    );
}

#[test]
fn an_empty_initial_response_must_be_sent_as_equals() {
    // RFC 4959 §3: a zero-length initial response is `=`. imap-codec also reads an empty
    // base64 string after the space; the proxy refuses it as a syntax error.
    let cmd = b"a AUTHENTICATE PLAIN \r\n";
    assert!(!codec_fails(cmd));
    let (actions, _) = imap_answers(cmd, 7);
    assert!(bad_or_no(actions.first()));
}

// ---------------------------------------------------------------------------------------------
// IMAP ID up to RFC 2971's limits

/// A string's value and its encoding.
type Encoded = (Vec<u8>, Vec<u8>);

/// An ID string (quoted or literal) of `len` octets.
fn id_string(len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Encoded> {
    let text_char = (1u8..0x80).prop_filter("TEXT-CHAR", |b| *b != b'\r' && *b != b'\n');
    (vec(text_char, len), 0u8..4).prop_map(|(v, form)| {
        let enc = match form {
            0 => literal(&v, true),
            1 => literal(&v, false),
            _ => quote(&v),
        };
        (v, enc)
    })
}

/// RFC 2971: at most 30 pairs, names of at most 30 octets, values of at most 1024 or NIL.
fn id_pairs() -> impl Strategy<Value = Vec<(Encoded, Option<Encoded>)>> {
    vec(
        (
            id_string(1..=30),
            proptest::option::weighted(0.9, id_string(0..=1024)),
        ),
        0..=30,
    )
}

proptest! {
    #![proptest_config(cases(48))]

    #[test]
    fn id_commands_within_rfc_2971_limits_are_answered_however_split(
        tag in tag(), mask: u32, pairs in id_pairs(), shape: u8,
    ) {
        let mut cmd = [&tag[..], b" ", &cased("ID", mask), b" ("].concat();
        for (i, ((name, name_enc), value)) in pairs.iter().enumerate() {
            // Each string is one imap-codec reads back as its value (it has no ID command).
            let value_enc = value.as_ref().map_or(&b"NIL"[..], |(_, enc)| enc);
            if let Some((v, enc)) = value.as_ref().filter(|(v, _)| !v.is_empty()) {
                let login = [b"t LOGIN ", &name_enc[..], b" ", enc, b"\r\n"].concat();
                let (_, command) = CommandCodec::default().decode(&login).expect("strings parse");
                let CommandBody::Login { username, password } = command.body else {
                    panic!("imap-codec read {:?}", command.body);
                };
                prop_assert_eq!(username.as_ref(), &name[..]);
                prop_assert_eq!(password.declassify().as_ref(), &v[..]);
            }
            if i > 0 {
                cmd.push(b' ');
            }
            cmd.extend_from_slice(&[&name_enc[..], b" ", value_enc].concat());
        }
        cmd.extend_from_slice(b")\r\nn NOOP\r\n");
        let events = drive_client(imap(2)(), &chunks(&cmd, shape), 0);
        let replies = sent(&events).replace("+ Ready for literal data\r\n", "");
        let t = lossy(&tag);
        let version = env!("CARGO_PKG_VERSION");
        prop_assert_eq!(
            replies,
            format!("* ID (\"name\" \"xoauth2-proxy\" \"version\" \"{version}\")\r\n{t} OK ID completed\r\nn OK NOOP completed\r\n")
        );
    }
}

#[test]
fn only_an_id_gets_the_larger_line_bound() {
    let d = Limits::default();
    let long = "v".repeat(d.max_line);
    for cmd in [
        format!("a LOGIN alice \"{long}\"\r\n"),
        format!("a NOOP (\"{long}\")\r\n"),
        format!("a IDX (\"{long}\")\r\n"),
        format!("a ID \"{long}\"\r\n"),
    ] {
        let events = drive_client(imap(2)(), &[cmd.as_bytes()], 0);
        assert_eq!(
            sent(&events),
            "* BYE [TOOBIG] Line too long\r\n",
            "{}",
            &cmd[..12]
        );
    }
    let over = format!("a ID (\"{}\")\r\n", "v".repeat(d.max_id_command));
    let events = drive_client(imap(2)(), &[over.as_bytes()], 0);
    assert_eq!(sent(&events), "* BYE [TOOBIG] Line too long\r\n");
}

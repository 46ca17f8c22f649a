//! SMTP upstream: the greeting/EHLO/STARTTLS machine and the AUTH XOAUTH2 machine fed
//! arbitrary server bytes, plus the reply reader and the EHLO rewrite on their own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::protocol::smtp::{rewrite_ehlo, take_reply, UpstreamAuth, UpstreamHello};
use xoauth2_proxy::secret::Secret;
use xoauth2_proxy_fuzz::harness::{check_upstream, SMTP_UP, TOKEN};
use xoauth2_proxy_fuzz::steer;

fuzz_target!(|data: &[u8]| {
    let Some(([shape, choices, opts], stream)) = steer(data) else {
        return;
    };
    let (starttls, fresh) = (opts & 2 != 0, opts & 4 != 0);
    if opts & 1 == 0 {
        let make = || UpstreamHello::new("client.example", starttls, fresh);
        check_upstream(make, stream, shape, choices, SMTP_UP);
    } else {
        let make = || UpstreamAuth::new(Secret::new(TOKEN));
        check_upstream(make, stream, shape, choices, SMTP_UP);
    }

    // Replies straight from the buffer: each bounded, each consuming what it returns.
    let mut buf = stream.to_vec();
    while let Ok(Some(reply)) = take_reply(&mut buf) {
        assert!(!reply.raw.is_empty() && reply.raw.len() <= SMTP_UP.relay);
        assert!(reply.code <= 999 && !reply.lines.is_empty());
    }

    // Whatever upstream advertises, the client is offered exactly our AUTH and our STARTTLS.
    // (Relayed lines never hold a CR: the reply reader strips line ends.)
    let mut lines = UpstreamHello::lines(stream);
    lines.retain(|l| !l.contains('\r'));
    let offered = opts & 8 != 0;
    let ehlo = rewrite_ehlo(&lines, offered);
    let out: Vec<&str> = ehlo.split_terminator("\r\n").collect();
    let (last, init) = out.split_last().expect("an EHLO reply has a line");
    assert!(init.iter().all(|l| l.starts_with("250-")) && last.starts_with("250 "));
    // The first line is upstream's greeting text, kept as it is.
    let exts = || out.iter().skip(1).map(|l| &l[4..]);
    assert_eq!(exts().filter(|e| *e == "AUTH PLAIN LOGIN").count(), 1);
    let starttls = exts()
        .filter(|e| e.eq_ignore_ascii_case("STARTTLS"))
        .count();
    assert_eq!(starttls, usize::from(offered));
});

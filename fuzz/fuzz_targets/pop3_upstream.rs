//! POP3 upstream (greeting, STLS, CAPA or AUTH XOAUTH2) fed arbitrary server bytes, plus the
//! CAPA rewrite on its own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::protocol::pop3::{rewrite_capa, Goal, UpstreamPop};
use xoauth2_proxy::secret::Secret;
use xoauth2_proxy_fuzz::harness::{check_upstream, POP3_UP, TOKEN};
use xoauth2_proxy_fuzz::steer;

fuzz_target!(|data: &[u8]| {
    let Some(([shape, choices, opts], stream)) = steer(data) else {
        return;
    };
    let goal = if opts & 1 == 0 {
        Goal::Capa
    } else {
        Goal::Auth
    };
    let (starttls, fresh) = (opts & 2 != 0, opts & 4 != 0);
    let make = || UpstreamPop::new(goal, Secret::new(TOKEN), starttls, fresh);
    check_upstream(make, stream, shape, choices, POP3_UP);

    let lines = UpstreamPop::lines(stream);
    let offered = opts & 8 != 0;
    let capa = rewrite_capa(&lines, offered);
    assert_eq!(capa.iter().filter(|c| *c == "SASL PLAIN").count(), 1);
    let stls = capa
        .iter()
        .filter(|c| c.eq_ignore_ascii_case("STLS"))
        .count();
    assert_eq!(stls, usize::from(offered));
    assert!(capa.iter().all(|c| !c.is_empty()));
});

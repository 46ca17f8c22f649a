//! The POP3 client session (USER/PASS, AUTH PLAIN, CAPA, STLS) over arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::protocol::pop3::{ClientSession, SessionOptions};
use xoauth2_proxy_fuzz::harness::check_client;
use xoauth2_proxy_fuzz::steer;

fuzz_target!(|data: &[u8]| {
    let Some(([shape, choices, opts], stream)) = steer(data) else {
        return;
    };
    let make = || {
        ClientSession::new(SessionOptions {
            starttls_offered: opts & 1 != 0,
            login_allowed: opts & 2 != 0,
            upstream_capa: None,
        })
    };
    check_client(make, stream, shape, choices);
});

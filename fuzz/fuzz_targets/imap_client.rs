//! The IMAP client session (LOGIN, AUTHENTICATE, literals, STARTTLS) over arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::protocol::imap::Limits;
use xoauth2_proxy_fuzz::harness::{check_client, Imap, SMALL_IMAP_LIMITS};
use xoauth2_proxy_fuzz::steer;

fuzz_target!(|data: &[u8]| {
    let Some(([shape, choices, opts], stream)) = steer(data) else {
        return;
    };
    let limits = if opts & 4 != 0 {
        SMALL_IMAP_LIMITS
    } else {
        Limits::default()
    };
    let make = || Imap::new(opts & 1 != 0, opts & 2 != 0, limits);
    check_client(make, stream, shape, choices);
});

//! The IMAP upstream login (greeting, STARTTLS, AUTHENTICATE XOAUTH2, error challenge) fed
//! arbitrary server bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::protocol::imap::{response_code, UpstreamLogin};
use xoauth2_proxy::secret::Secret;
use xoauth2_proxy_fuzz::harness::{check_upstream, IMAP_UP, TOKEN};
use xoauth2_proxy_fuzz::steer;

fuzz_target!(|data: &[u8]| {
    let Some(([shape, choices, opts], stream)) = steer(data) else {
        return;
    };
    // "P0" is also the tag the machine uses for its own STARTTLS.
    let tag = ["a1", "P0", "x", "A00001"][usize::from(opts >> 1 & 3)];
    let make = || UpstreamLogin::new(tag, Secret::new(TOKEN), opts & 1 != 0);
    check_upstream(make, stream, shape, choices, IMAP_UP);

    let text = String::from_utf8_lossy(stream);
    if let Some(code) = response_code(&text) {
        assert!(!code.is_empty() && !code.contains([' ', ']']), "{code:?}");
    }
});

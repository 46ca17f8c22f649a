//! In-process fakes of Google's OAuth token endpoint and Gmail's IMAP, SMTP and POP3
//! servers, for end-to-end tests of the proxy.
//!
//! Everything listens on 127.0.0.1 with an OS-assigned port, uses real TCP sockets and real
//! TLS (rustls + aws-lc-rs, certificates from [`TestPki`]). Every server stops when its handle
//! is dropped. Nothing here prints anything; recorded violations never contain tokens.
//!
//! Use from an integration test with `mod support;`.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod conn;
pub mod exchange;
pub mod google;
pub mod http;
pub mod imap;
pub mod microsoft;
pub mod pki;
pub mod pop3;
pub mod redis;
pub mod smtp;
pub mod storm;

pub use client::TestClient;
pub use google::{FakeGoogle, GoogleHandle, CLIENT_ID, CLIENT_SECRET};
pub use imap::{FakeImap, UpstreamTls};
pub use pki::TestPki;
pub use pop3::{FakePop3, PopTls};
pub use smtp::{FakeSmtp, ReceivedMessage, SmtpMode};

/// The Gmail XOAUTH2 error challenge (base64 of
/// `{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}`).
pub const XOAUTH2_ERROR_CHALLENGE: &str =
    "eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==";

/// base64 of `user=EMAIL\x01auth=Bearer TOKEN\x01\x01` (the XOAUTH2 initial client response).
pub fn xoauth2_response(email: &str, token: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(format!("user={email}\x01auth=Bearer {token}\x01\x01"))
}

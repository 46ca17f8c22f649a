//! The SASL decoders clients and servers reach: strict base64, PLAIN, the XOAUTH2 error
//! challenge, and the XOAUTH2 encoder's round trip.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use xoauth2_proxy::protocol::sasl::{decode_b64, decode_plain, xoauth2, ErrorChallenge, SaslError};
use xoauth2_proxy::secret::Secret;

fn plain_checks(message: &[u8]) {
    match decode_plain(message) {
        Ok(c) => {
            let fields: Vec<&[u8]> = message.split(|&b| b == 0).collect();
            assert_eq!(
                fields.len(),
                3,
                "accepted a PLAIN message without exactly two NULs"
            );
            assert!(!c.username.is_empty() && !c.password.is_empty());
            assert_eq!(c.username, String::from_utf8_lossy(fields[1]));
            assert_eq!(c.password.expose(), String::from_utf8_lossy(fields[2]));
        }
        Err(SaslError::Empty) => assert!(message.is_empty()),
        Err(SaslError::BadBase64) => panic!("decode_plain does not decode base64"),
        Err(SaslError::Malformed | SaslError::AuthzidMismatch) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // decode_b64 ignores one line end.
    let trimmed = data.strip_suffix(b"\n").unwrap_or(data);
    let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
    match decode_b64(data) {
        // Strict: only the canonical encoding of some bytes is accepted.
        Ok(bytes) if trimmed == b"=" => assert!(bytes.is_empty()),
        Ok(bytes) => {
            assert_eq!(STANDARD.encode(&*bytes).as_bytes(), trimmed);
            plain_checks(&bytes);
        }
        Err(e) => assert_eq!(e, SaslError::BadBase64),
    }
    plain_checks(data);

    let challenge = ErrorChallenge::parse(data);
    assert!(!challenge.describe().is_empty());

    // The XOAUTH2 string decodes back to its parts for any user and token without ^A.
    let text = String::from_utf8_lossy(data);
    let (user, token) = text.split_once('\n').unwrap_or((&text, "tok"));
    if !user.contains('\x01') && !token.contains('\x01') {
        let xo = xoauth2(user, &Secret::new(token));
        let raw = decode_b64(xo.expose().as_bytes()).expect("our own base64 decodes");
        assert_eq!(
            *raw,
            format!("user={user}\x01auth=Bearer {token}\x01\x01").into_bytes()
        );
    }
});

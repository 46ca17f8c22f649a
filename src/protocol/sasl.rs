//! SASL pieces shared by all protocols: PLAIN and LOGIN decoding (what clients send us),
//! XOAUTH2 encoding (what we send upstream) and decoding of the XOAUTH2 error challenge.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use zeroize::Zeroizing;

use super::Credentials;
use crate::secret::Secret;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslError {
    /// The response was not valid base64 (illegal characters, bad padding).
    BadBase64,
    /// `=` or an empty PLAIN message.
    Empty,
    /// Structurally wrong PLAIN message (wrong number of fields, empty user or password).
    Malformed,
    /// An authorization identity different from the user: acting as someone else.
    AuthzidMismatch,
}

/// Strict base64 (standard alphabet, padding required where due). `=` alone means empty.
/// Wiped when dropped: it is usually a PLAIN message or a password.
pub fn decode_b64(input: &[u8]) -> Result<Zeroizing<Vec<u8>>, SaslError> {
    let input = super::trim_eol(input);
    if input == b"=" {
        return Ok(Zeroizing::default());
    }
    STANDARD
        .decode(input)
        .map(Zeroizing::new)
        .map_err(|_| SaslError::BadBase64)
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`.
pub fn decode_plain(message: &[u8]) -> Result<Credentials, SaslError> {
    if message.is_empty() {
        return Err(SaslError::Empty);
    }
    let mut parts = message.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    if authcid.is_empty() || passwd.is_empty() {
        return Err(SaslError::Malformed);
    }
    let username = String::from_utf8_lossy(authcid).into_owned();
    if !authzid.is_empty() && !String::from_utf8_lossy(authzid).eq_ignore_ascii_case(&username) {
        return Err(SaslError::AuthzidMismatch);
    }
    Ok(Credentials {
        username,
        password: Secret::new(String::from_utf8_lossy(passwd).into_owned()),
    })
}

/// Base64 of `user=EMAIL^Aauth=Bearer TOKEN^A^A` (Google's XOAUTH2 initial response).
pub fn xoauth2(user: &str, token: &Secret) -> Secret {
    let raw = zeroize::Zeroizing::new(format!(
        "user={user}\x01auth=Bearer {}\x01\x01",
        token.expose()
    ));
    Secret::new(STANDARD.encode(raw.as_bytes()))
}

/// The JSON a server sends as an XOAUTH2 failure challenge, decoded for people to read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorChallenge {
    pub status: Option<String>,
    pub scope: Option<String>,
}

impl ErrorChallenge {
    /// Decode `+ <b64 JSON>` payload text. Unknown shapes give an empty challenge, never an error:
    /// the challenge only feeds messages.
    pub fn parse(b64: &[u8]) -> ErrorChallenge {
        let Ok(json) = decode_b64(b64) else {
            return ErrorChallenge::default();
        };
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&json) else {
            return ErrorChallenge::default();
        };
        let field = |k: &str| {
            value.get(k).and_then(|v| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
        };
        ErrorChallenge {
            status: field("status"),
            scope: field("scope"),
        }
    }

    /// "status 400, scope https://mail.google.com/" style summary.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.status {
            parts.push(format!("status {s}"));
        }
        if let Some(s) = &self.scope {
            parts.push(format!("required scope {s}"));
        }
        if parts.is_empty() {
            "no details".into()
        } else {
            parts.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoauth2_matches_protocol_facts_vectors() {
        let xo = xoauth2("alice@gmail.com", &Secret::new("ya29.a0AfB_EXAMPLE"));
        assert_eq!(
            xo.expose(),
            "dXNlcj1hbGljZUBnbWFpbC5jb20BYXV0aD1CZWFyZXIgeWEyOS5hMEFmQl9FWEFNUExFAQE="
        );
        let google = xoauth2(
            "someuser@example.com",
            &Secret::new("ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"),
        );
        assert_eq!(google.expose(), "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ==");
        let ms = xoauth2(
            "test@contoso.onmicrosoft.com",
            &Secret::new("EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA"),
        );
        assert_eq!(ms.expose(), "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0NjbFJDM0VvQUEBAQ==");
    }

    #[test]
    fn plain_decodes_with_and_without_authzid() {
        let c = decode_plain(&decode_b64(b"AGFsaWNlQGdtYWlsLmNvbQBsb2NhbC1zZWNyZXQ=").unwrap())
            .unwrap();
        assert_eq!(c.username, "alice@gmail.com");
        assert_eq!(c.password.expose(), "local-secret");
        let z = decode_plain(
            &decode_b64(b"YWxpY2VAZ21haWwuY29tAGFsaWNlQGdtYWlsLmNvbQBsb2NhbC1zZWNyZXQ=").unwrap(),
        )
        .unwrap();
        assert_eq!(z, c);
    }

    #[test]
    fn plain_rejects_empty_malformed_and_foreign_authzid() {
        assert!(decode_b64(b"=").unwrap().is_empty());
        assert_eq!(decode_plain(b""), Err(SaslError::Empty));
        assert_eq!(decode_plain(b"\0user"), Err(SaslError::Malformed));
        assert_eq!(decode_plain(b"\0\0pw"), Err(SaslError::Malformed));
        assert_eq!(decode_plain(b"\0u\0"), Err(SaslError::Malformed));
        assert_eq!(decode_plain(b"\0u\0p\0x"), Err(SaslError::Malformed));
        assert_eq!(decode_plain(b"bob\0u\0p"), Err(SaslError::AuthzidMismatch));
        assert_eq!(decode_b64(b"AGFs=aWNl"), Err(SaslError::BadBase64));
        assert_eq!(decode_b64(b"not base64!"), Err(SaslError::BadBase64));
    }

    #[test]
    fn gmail_and_dovecot_error_challenges_decode_to_words() {
        let gmail = ErrorChallenge::parse(b"eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==");
        assert_eq!(gmail.status.as_deref(), Some("400"));
        assert_eq!(gmail.scope.as_deref(), Some("https://mail.google.com/"));
        assert_eq!(
            gmail.describe(),
            "status 400, required scope https://mail.google.com/"
        );
        let dovecot = ErrorChallenge::parse(
            b"eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=",
        );
        assert_eq!(dovecot.status.as_deref(), Some("401"));
        assert_eq!(ErrorChallenge::parse(b"!!"), ErrorChallenge::default());
    }
}

//! Workspace service accounts with domain-wide delegation: no login and no refresh token. The
//! proxy signs a short JWT (RS256, `sub` = the mailbox) with the key from the account's JSON
//! key file and trades it for an access token (JWT bearer grant, RFC 7523), again before expiry.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::Deserialize;

use super::token_endpoint::{self, GrantError, Granted, Refusal};
use crate::provider::google;
use crate::secret::Secret;

pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Google refuses assertions that live longer than an hour.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

/// A service account key, loaded from Google's JSON key file.
pub struct ServiceAccount {
    pub path: PathBuf,
    /// `client_email`: the JWT's issuer.
    pub client_email: String,
    /// The numeric client ID an admin enters for domain-wide delegation.
    pub client_id: Option<String>,
    key_id: Option<String>,
    key: RsaKeyPair,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("path", &self.path)
            .field("client_email", &self.client_email)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: Option<String>,
    client_id: Option<String>,
    private_key_id: Option<String>,
    private_key: Option<Secret>,
}

const HOW_TO_GET_A_KEY: &str = "download a JSON key in Google Cloud console: IAM & Admin > Service accounts > the account > Keys > Add key > JSON";

impl ServiceAccount {
    /// Read and check a JSON key file.
    /// What is wrong with who may read the key file, if anything: the key signs tokens for
    /// every mailbox of the Workspace domain.
    pub fn exposure(path: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let mode = std::fs::metadata(path).ok()?.mode() & 0o777;
        (mode & 0o077 != 0).then(|| {
            format!(
                "the service account key {} can be read by group or others (mode {mode:o}): it signs tokens for every mailbox of the domain; run `chmod 600 {}`",
                path.display(),
                path.display()
            )
        })
    }

    pub fn load(path: &Path) -> Result<ServiceAccount, String> {
        let text = Secret::new(std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the service account key {}: {e}",
                path.display()
            )
        })?);
        let file: KeyFile = serde_json::from_str(text.expose()).map_err(|_| {
            format!(
                "{} is not a JSON key file; {HOW_TO_GET_A_KEY}",
                path.display()
            )
        })?;
        if file.kind.as_deref() != Some("service_account") {
            return Err(format!(
                "{} is not a service account key (\"type\" is {:?}, not \"service_account\"); {HOW_TO_GET_A_KEY}",
                path.display(),
                file.kind.unwrap_or_default()
            ));
        }
        let client_email = file
            .client_email
            .filter(|e| e.contains('@'))
            .ok_or_else(|| format!("{} has no client_email; {HOW_TO_GET_A_KEY}", path.display()))?;
        let pem = file
            .private_key
            .ok_or_else(|| format!("{} has no private_key; {HOW_TO_GET_A_KEY}", path.display()))?;
        let key = Self::parse_key(pem.expose()).map_err(|why| {
            format!(
                "the private_key in {} is unusable ({why}); {HOW_TO_GET_A_KEY}",
                path.display()
            )
        })?;
        Ok(ServiceAccount {
            path: path.to_path_buf(),
            client_email,
            client_id: file.client_id.filter(|c| !c.is_empty()),
            key_id: file.private_key_id.filter(|k| !k.is_empty()),
            key,
        })
    }

    fn parse_key(pem: &str) -> Result<RsaKeyPair, String> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| "not a PEM \"PRIVATE KEY\" (PKCS#8)".to_string())?;
        RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| format!("not an RSA key of 2048 bits or more: {e}"))
    }

    /// A signed assertion that lets `subject` be impersonated for `scope` at `audience`.
    pub fn assertion(
        &self,
        subject: &str,
        scope: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<Secret, String> {
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the system clock is before 1970".to_string())?
            .as_secs();
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = serde_json::Value::String(kid.clone());
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "sub": subject,
            "scope": scope,
            "aud": audience,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME.as_secs(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| format!("signing with the key in {} failed", self.path.display()))?;
        Ok(Secret::new(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        )))
    }

    /// Trade a fresh assertion for an access token for `subject`.
    pub async fn fetch(
        &self,
        http: &reqwest::Client,
        subject: &str,
        scope: &str,
        token_url: &str,
    ) -> Result<Granted, GrantError> {
        let assertion = self
            .assertion(subject, scope, token_url, SystemTime::now())
            .map_err(GrantError::Client)?;
        let form = [
            ("grant_type", JWT_BEARER),
            ("assertion", assertion.expose()),
        ];
        token_endpoint::token_request(http, token_url, &form)
            .await
            .map_err(|e| e.into_grant_error(|r| self.refusal(r, subject, scope)))
    }

    /// What Google's refusals of an assertion mean, with the console step that fixes each.
    fn refusal(&self, r: &Refusal, subject: &str, scope: &str) -> GrantError {
        let description = r.description_suffix();
        let client_id = self
            .client_id
            .as_deref()
            .unwrap_or("(the client_id in the key file)");
        let delegation = format!(
            "domain-wide delegation is not granted for this service account and scope: in the Google Workspace Admin console open Security > Access and data control > API controls > Manage domain-wide delegation > Add new, enter client ID {client_id} (the number, not {}) and the scope {scope}; it can take up to 24 hours to apply",
            self.client_email
        );
        match r.code.as_str() {
            "unauthorized_client" | "access_denied" => GrantError::Client(format!(
                "Google refused the service account {}: {}{description}; {delegation}",
                self.client_email, r.code
            )),
            "invalid_grant" => GrantError::Client(format!(
                "Google refused the service account {} for {subject}: invalid_grant{description}; check that {subject} is a user of the Workspace domain that granted delegation, that the key in {} was not deleted, and that this machine's clock is right; otherwise {delegation}",
                self.client_email,
                self.path.display()
            )),
            _ => google::common_refusal(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{KeyPair, UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};

    fn pem(der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap());
            out.push('\n');
        }
        out.push_str("-----END PRIVATE KEY-----\n");
        out
    }

    fn key_file(dir: &Path) -> (PathBuf, Vec<u8>) {
        let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&key).unwrap();
        let json = serde_json::json!({
            "type": "service_account",
            "client_email": "proxy@project.iam.gserviceaccount.com",
            "client_id": "1234567890",
            "private_key_id": "kid-1",
            "private_key": pem(der.as_ref()),
        });
        let path = dir.join("sa.json");
        std::fs::write(&path, json.to_string()).unwrap();
        (path, key.public_key().as_ref().to_vec())
    }

    #[test]
    fn assertion_is_rs256_signed_with_the_claims_google_wants() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, public) = key_file(tmp.path());
        let sa = ServiceAccount::load(&path).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let jwt = sa
            .assertion(
                "alice@corp.example",
                "https://mail.google.com/",
                "https://oauth2.googleapis.com/token",
                now,
            )
            .unwrap();
        let parts: Vec<&str> = jwt.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["kid"], "kid-1");
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["iss"], "proxy@project.iam.gserviceaccount.com");
        assert_eq!(claims["sub"], "alice@corp.example");
        assert_eq!(claims["scope"], "https://mail.google.com/");
        assert_eq!(claims["aud"], "https://oauth2.googleapis.com/token");
        assert_eq!(claims["iat"], 1_767_225_600u64);
        assert_eq!(claims["exp"], 1_767_229_200u64);
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public)
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .expect("signature verifies with the public half");
    }

    #[test]
    fn unusable_key_files_say_how_to_get_a_good_one() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("k.json");
        for (content, expect) in [
            ("not json", "not a JSON key file"),
            (r#"{"type":"authorized_user"}"#, "not a service account key"),
            (
                r#"{"type":"service_account","client_email":"a@b.c","private_key":"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}"#,
                "unusable",
            ),
        ] {
            std::fs::write(&path, content).unwrap();
            let err = ServiceAccount::load(&path).unwrap_err();
            assert!(err.contains(expect), "{err}");
            assert!(err.contains("Add key > JSON"), "{err}");
        }
        let err = ServiceAccount::load(&tmp.path().join("missing.json")).unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn refusals_name_the_delegation_step_and_the_numeric_client_id() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, _) = key_file(tmp.path());
        let sa = ServiceAccount::load(&path).unwrap();
        let r = Refusal {
            status: 401,
            code: "unauthorized_client".into(),
            description: Some("Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.".into()),
        };
        let client_error =
            |r: &Refusal| match sa.refusal(r, "alice@corp.example", "https://mail.google.com/") {
                GrantError::Client(text) => text,
                other => panic!("not a client error: {other:?}"),
            };
        let text = client_error(&r);
        assert!(text.contains("Manage domain-wide delegation"), "{text}");
        assert!(text.contains("1234567890"), "{text}");
        let r = Refusal {
            status: 400,
            code: "invalid_grant".into(),
            description: Some("Invalid email or User ID".into()),
        };
        let text = client_error(&r);
        assert!(text.contains("alice@corp.example is a user"), "{text}");
    }

    #[test]
    fn a_key_file_others_can_read_is_reported_with_the_chmod() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sa.json");
        std::fs::write(&path, "{}").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(ServiceAccount::exposure(&path), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = ServiceAccount::exposure(&path).unwrap();
        assert!(text.contains("mode 644"), "{text}");
        assert!(
            text.contains(&format!("chmod 600 {}", path.display())),
            "{text}"
        );
    }
}

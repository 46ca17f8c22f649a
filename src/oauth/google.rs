//! Google's token endpoint over HTTP: one request function shared by every grant (refresh,
//! authorization code, JWT bearer), with every outcome classified as a token, a refusal (someone
//! must act: re-authorize, fix the client; each grant words it) or temporary (retry later).

use std::time::Duration;

use serde::Deserialize;

use crate::config::OAuthClient;
use crate::secret::Secret;

/// A successful token response.
#[derive(Debug, PartialEq, Eq)]
pub struct Granted {
    pub access_token: Secret,
    pub expires_in: Duration,
    pub refresh_token: Option<Secret>,
    /// Only for grants that end by themselves (time-based access, some Testing-mode apps).
    pub refresh_token_expires_in: Option<Duration>,
    pub scope: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantError {
    /// The grant is dead (`invalid_grant`): the account must be authorized again.
    Revoked(String),
    /// The OAuth client or its setup is wrong; an admin must fix the config or the console.
    Client(String),
    /// Network trouble, 5xx, 429, garbage: try again later (not before `retry_after`).
    Temporary {
        detail: String,
        retry_after: Option<Duration>,
    },
}

impl std::fmt::Display for GrantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrantError::Revoked(d) | GrantError::Client(d) => f.write_str(d),
            GrantError::Temporary { detail, .. } => f.write_str(detail),
        }
    }
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: Option<Secret>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<Secret>,
    refresh_token_expires_in: Option<serde_json::Value>,
    scope: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

pub fn http_client() -> Result<reqwest::Client, String> {
    let tls = crate::tls::client_config(None)?;
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
        .user_agent(concat!("xoauth2-proxy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build HTTP client: {e}"))
}

/// The refresh_token grant.
pub async fn refresh(
    http: &reqwest::Client,
    client: &OAuthClient,
    refresh_token: &Secret,
) -> Result<Granted, GrantError> {
    let mut form: Vec<(&str, &str)> = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token.expose()),
        ("client_id", &client.client_id),
    ];
    if let Some(s) = &client.client_secret {
        form.push(("client_secret", s.expose()));
    }
    token_request(http, &client.token_url, &form)
        .await
        .map_err(|e| e.into_grant_error(refresh_refusal))
}

/// What the refresh grant's refusals mean and what to do about them.
fn refresh_refusal(r: &Refusal) -> GrantError {
    let code = r.code.as_str();
    let description = r.description_suffix();
    match code {
        "invalid_grant" => GrantError::Revoked(format!(
            "Google refused the refresh token: invalid_grant{description}; it was revoked, expired (7 days for apps in Testing, 6 months unused, password change) or issued to another client"
        )),
        "unauthorized_client" => GrantError::Client(format!(
            "Google says the OAuth client may not use this grant: unauthorized_client{description}; the refresh token belongs to another client_id: run `xoauth2-proxy login` again with the configured client"
        )),
        _ => common_refusal(r),
    }
}

/// Refusals that mean the same whatever the grant.
pub fn common_refusal(r: &Refusal) -> GrantError {
    let code = r.code.as_str();
    let description = r.description_suffix();
    match code {
        "invalid_client" | "deleted_client" | "disabled_client" => GrantError::Client(format!(
            "Google refused the OAuth client: {code}{description}; check client_id and client_secret in [providers.google] against the Desktop app client in Google Cloud console (Google Auth Platform > Clients)"
        )),
        "admin_policy_enforced" | "org_internal" | "access_denied" => GrantError::Client(format!(
            "Google refused access: {code}{description}; a Workspace admin must allow this app, or the app is Internal and the account is outside the organization"
        )),
        "invalid_scope" => GrantError::Client(format!(
            "Google refused the scope: invalid_scope{description}; the scope must be https://mail.google.com/"
        )),
        "invalid_grant" => GrantError::Revoked(format!("Google refused the grant: invalid_grant{description}")),
        other => GrantError::Client(format!(
            "token endpoint refused the request: {other}{description}"
        )),
    }
}

/// A token-endpoint answer that names an OAuth error (RFC 6749 §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
    pub description: Option<String>,
}

impl Refusal {
    /// ` (description)` or nothing, for messages.
    pub fn description_suffix(&self) -> String {
        self.description
            .as_deref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default()
    }
}

/// Why a token request did not produce a token, before a grant gives it meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The endpoint answered with an OAuth error code.
    Refused(Refusal),
    /// Network trouble, 5xx, 429, garbage: try again later (not before `retry_after`).
    Temporary {
        detail: String,
        retry_after: Option<Duration>,
    },
}

impl RequestError {
    /// Give a refusal its meaning for one grant; temporary failures stay temporary.
    pub fn into_grant_error(self, meaning: impl FnOnce(&Refusal) -> GrantError) -> GrantError {
        match self {
            RequestError::Refused(r) => meaning(&r),
            RequestError::Temporary {
                detail,
                retry_after,
            } => GrantError::Temporary {
                detail,
                retry_after,
            },
        }
    }
}

/// POST a form to the token endpoint and sort the answer into a token, a refusal, or a
/// temporary failure.
pub async fn token_request(
    http: &reqwest::Client,
    token_url: &str,
    form: &[(&str, &str)],
) -> Result<Granted, RequestError> {
    let response =
        http.post(token_url)
            .form(form)
            .send()
            .await
            .map_err(|e| RequestError::Temporary {
                detail: format!("token endpoint unreachable ({})", describe_reqwest(&e)),
                retry_after: None,
            })?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(3600)));
    let bytes = response
        .bytes()
        .await
        .map_err(|e| RequestError::Temporary {
            detail: format!(
                "token endpoint connection failed ({})",
                describe_reqwest(&e)
            ),
            retry_after: None,
        })?;
    let body: Option<TokenBody> = serde_json::from_slice(&bytes).ok();
    classify(status.as_u16(), retry_after, body)
}

fn classify(
    status: u16,
    retry_after: Option<Duration>,
    body: Option<TokenBody>,
) -> Result<Granted, RequestError> {
    let temporary = |detail: String| RequestError::Temporary {
        detail,
        retry_after,
    };
    if status == 429 || status >= 500 {
        return Err(temporary(format!("token endpoint answered HTTP {status}")));
    }
    let Some(body) = body else {
        return Err(temporary(format!(
            "token endpoint answered HTTP {status} with a body that is not JSON"
        )));
    };
    if status == 200 {
        let Some(access_token) = body.access_token.filter(|t| !t.is_empty()) else {
            return Err(temporary(
                "token endpoint answered without an access_token".into(),
            ));
        };
        let secs = seconds(&body.expires_in).unwrap_or(3600);
        return Ok(Granted {
            access_token,
            expires_in: Duration::from_secs(secs),
            refresh_token: body.refresh_token.filter(|t| !t.is_empty()),
            refresh_token_expires_in: seconds(&body.refresh_token_expires_in)
                .map(Duration::from_secs),
            scope: body.scope,
        });
    }
    match body.error.filter(|c| !c.is_empty()) {
        Some(code) => Err(RequestError::Refused(Refusal {
            status,
            code,
            description: body.error_description.filter(|d| !d.is_empty()),
        })),
        None => Err(temporary(format!(
            "token endpoint answered HTTP {status} without an error code"
        ))),
    }
}

fn seconds(value: &Option<serde_json::Value>) -> Option<u64> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    // reqwest's Display includes the URL, which is not secret; the source chain says why.
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Option<TokenBody> {
        serde_json::from_str(json).ok()
    }

    /// As the refresh grant sees an answer.
    fn refresh_outcome(
        status: u16,
        retry: Option<Duration>,
        json: Option<&str>,
    ) -> Result<Granted, GrantError> {
        classify(status, retry, json.and_then(body))
            .map_err(|e| e.into_grant_error(refresh_refusal))
    }

    #[test]
    fn outcomes_are_classified_permanent_or_temporary() {
        let ok = refresh_outcome(200, None, Some(r#"{"access_token":"ya29.x","expires_in":3599,"scope":"https://mail.google.com/","token_type":"Bearer"}"#)).unwrap();
        assert_eq!(ok.expires_in, Duration::from_secs(3599));
        assert!(ok.refresh_token.is_none());
        assert!(ok.refresh_token_expires_in.is_none());
        assert!(matches!(
            refresh_outcome(400, None, Some(r#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#)),
            Err(GrantError::Revoked(d)) if d.contains("Token has been expired or revoked.")
        ));
        assert!(matches!(
            refresh_outcome(401, None, Some(r#"{"error":"invalid_client"}"#)),
            Err(GrantError::Client(d)) if d.contains("Google Auth Platform > Clients")
        ));
        assert!(matches!(
            refresh_outcome(503, None, None),
            Err(GrantError::Temporary { .. })
        ));
        assert_eq!(
            refresh_outcome(429, Some(Duration::from_secs(7)), None),
            Err(GrantError::Temporary {
                detail: "token endpoint answered HTTP 429".into(),
                retry_after: Some(Duration::from_secs(7))
            })
        );
        assert!(matches!(
            refresh_outcome(200, None, None),
            Err(GrantError::Temporary { .. })
        ));
        assert!(matches!(
            refresh_outcome(200, None, Some("{}")),
            Err(GrantError::Temporary { .. })
        ));
        assert!(matches!(
            refresh_outcome(400, None, Some(r#"{"error":""}"#)),
            Err(GrantError::Temporary { .. })
        ));
    }

    #[test]
    fn refresh_token_lifetime_is_read_when_google_sends_it() {
        let ok = refresh_outcome(200, None, Some(r#"{"access_token":"ya29.x","expires_in":"3599","refresh_token":"1//r","refresh_token_expires_in":604799}"#)).unwrap();
        assert_eq!(ok.expires_in, Duration::from_secs(3599));
        assert_eq!(
            ok.refresh_token_expires_in,
            Some(Duration::from_secs(604799))
        );
        assert_eq!(ok.refresh_token.unwrap().expose(), "1//r");
    }

    #[test]
    fn a_refusal_keeps_its_code_and_description() {
        assert_eq!(
            classify(
                400,
                None,
                body(r#"{"error":"redirect_uri_mismatch","error_description":"Bad Request"}"#)
            ),
            Err(RequestError::Refused(Refusal {
                status: 400,
                code: "redirect_uri_mismatch".into(),
                description: Some("Bad Request".into())
            }))
        );
    }
}

//! Google's token endpoint over HTTP: the refresh_token grant, with every outcome classified as
//! permanent (someone must act: re-authorize, fix the client) or temporary (retry later).

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
    token_request(http, &client.token_url, &form).await
}

/// POST a form to the token endpoint and classify the answer.
pub async fn token_request(
    http: &reqwest::Client,
    token_url: &str,
    form: &[(&str, &str)],
) -> Result<Granted, GrantError> {
    let response =
        http.post(token_url)
            .form(form)
            .send()
            .await
            .map_err(|e| GrantError::Temporary {
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
    let bytes = response.bytes().await.map_err(|e| GrantError::Temporary {
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
) -> Result<Granted, GrantError> {
    let temporary = |detail: String| GrantError::Temporary {
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
        let secs = match &body.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        }
        .unwrap_or(3600);
        return Ok(Granted {
            access_token,
            expires_in: Duration::from_secs(secs),
            refresh_token: body.refresh_token.filter(|t| !t.is_empty()),
            scope: body.scope,
        });
    }
    let code = body.error.unwrap_or_default();
    let description = body
        .error_description
        .map(|d| format!(" ({d})"))
        .unwrap_or_default();
    Err(match code.as_str() {
        "invalid_grant" => GrantError::Revoked(format!(
            "Google refused the refresh token: invalid_grant{description}; it was revoked, expired (7 days for apps in Testing, 6 months unused, password change) or issued to another client"
        )),
        "invalid_client" | "deleted_client" | "disabled_client" => GrantError::Client(format!(
            "Google refused the OAuth client: {code}{description}; check client_id and client_secret in [providers.google] against the Desktop app client in Google Cloud console (Google Auth Platform > Clients)"
        )),
        "unauthorized_client" => GrantError::Client(format!(
            "Google says the OAuth client may not use this grant: unauthorized_client{description}; the refresh token belongs to another client_id, or (service accounts) domain-wide delegation is not set up for this client ID and scope"
        )),
        "admin_policy_enforced" | "org_internal" | "access_denied" => GrantError::Client(format!(
            "Google refused access: {code}{description}; a Workspace admin must allow this app, or the app is Internal and the account is outside the organization"
        )),
        "invalid_scope" => GrantError::Client(format!(
            "Google refused the scope: invalid_scope{description}; the scope must be https://mail.google.com/"
        )),
        "" => GrantError::Temporary {
            detail: format!("token endpoint answered HTTP {status} without an error code"),
            retry_after,
        },
        other => GrantError::Client(format!("token endpoint refused the request: {other}{description}")),
    })
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

    #[test]
    fn outcomes_are_classified_permanent_or_temporary() {
        let ok = classify(200, None, body(r#"{"access_token":"ya29.x","expires_in":3599,"scope":"https://mail.google.com/","token_type":"Bearer"}"#)).unwrap();
        assert_eq!(ok.expires_in, Duration::from_secs(3599));
        assert!(ok.refresh_token.is_none());
        assert!(matches!(
            classify(400, None, body(r#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#)),
            Err(GrantError::Revoked(d)) if d.contains("Token has been expired or revoked.")
        ));
        assert!(matches!(
            classify(401, None, body(r#"{"error":"invalid_client"}"#)),
            Err(GrantError::Client(_))
        ));
        assert!(matches!(
            classify(503, None, None),
            Err(GrantError::Temporary { .. })
        ));
        assert_eq!(
            classify(429, Some(Duration::from_secs(7)), None),
            Err(GrantError::Temporary {
                detail: "token endpoint answered HTTP 429".into(),
                retry_after: Some(Duration::from_secs(7))
            })
        );
        assert!(matches!(
            classify(200, None, None),
            Err(GrantError::Temporary { .. })
        ));
        assert!(matches!(
            classify(200, None, body("{}")),
            Err(GrantError::Temporary { .. })
        ));
    }
}

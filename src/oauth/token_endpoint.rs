//! Any provider's token endpoint over HTTP (RFC 6749). The oauth2 crate builds the requests
//! (refresh, authorization code with PKCE, device code); they travel through `Sender`, a reqwest
//! client that follows no redirect and keeps each raw answer, so `classify` sorts the status,
//! Retry-After and body into a token, a refusal (a provider gives it meaning) or a temporary
//! failure, whatever oauth2 made of them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use oauth2::basic::BasicClient;
use oauth2::{
    AsyncHttpClient, AuthType, AuthUrl, ClientId, ClientSecret, EndpointNotSet, EndpointSet,
    HttpRequest, HttpResponse, RefreshToken, RequestTokenError, TokenUrl,
};
use serde::Deserialize;

use crate::config::OAuthClient;
use crate::secret::{Secret, SensitiveBytes};

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

/// Longest access-token life believed: a token said to live longer is refreshed after this
/// anyway, and an absurd `expires_in` (u64::MAX) must not overflow a clock.
pub const MAX_ACCESS_TOKEN_LIFE: Duration = Duration::from_secs(24 * 3600);
/// Longest refresh-token life believed, for the same reason.
pub const MAX_REFRESH_TOKEN_LIFE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A token endpoint's answer is a few KiB; more is not read.
const MAX_BODY: usize = 64 * 1024;

pub use crate::provider::{GrantError, Refusal};

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

/// The HTTP client for token endpoints. It follows no redirect: a redirected POST would carry
/// the client secret and the refresh token to wherever the `Location` points.
pub fn http_client() -> Result<reqwest::Client, String> {
    let tls = crate::tls::client_config(None)?;
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
        .user_agent(concat!("xoauth2-proxy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build HTTP client: {e}"))
}

/// The oauth2 client for one account's OAuth client, with the authorization and token
/// endpoints set. Credentials go in the form body, as Google's and Microsoft's docs show.
pub type Oauth2Client =
    BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

pub fn oauth2_client(client: &OAuthClient) -> Result<Oauth2Client, String> {
    let auth = AuthUrl::new(client.auth_url.clone())
        .map_err(|e| format!("auth_url {:?} is not a URL: {e}", client.auth_url))?;
    let token = TokenUrl::new(client.token_url.clone())
        .map_err(|e| format!("token_url {:?} is not a URL: {e}", client.token_url))?;
    let mut c = BasicClient::new(ClientId::new(client.client_id.clone()))
        .set_auth_uri(auth)
        .set_token_uri(token)
        .set_auth_type(AuthType::RequestBody);
    if let Some(s) = &client.client_secret {
        c = c.set_client_secret(ClientSecret::new(s.expose().to_string()));
    }
    Ok(c)
}

/// The raw answer to one request.
struct Raw {
    status: u16,
    retry_after: Option<Duration>,
    location: Option<String>,
    body: SensitiveBytes,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SendError(String);

/// oauth2's HTTP client: sends with reqwest and keeps the last raw answer for `classify`.
pub struct Sender<'a> {
    http: &'a reqwest::Client,
    last: Mutex<Option<Raw>>,
}

impl<'a> Sender<'a> {
    pub fn new(http: &'a reqwest::Client) -> Sender<'a> {
        Sender {
            http,
            last: Mutex::new(None),
        }
    }

    /// Sort the last answer; `sent` is what oauth2 reported, for when nothing came back.
    pub fn outcome<T, E>(
        &self,
        sent: Result<T, RequestTokenError<SendError, E>>,
    ) -> Result<Granted, RequestError>
    where
        E: oauth2::ErrorResponse + 'static,
    {
        let raw = self.last.lock().unwrap_or_else(|e| e.into_inner()).take();
        match (raw, sent) {
            (_, Err(RequestTokenError::Request(e))) => Err(RequestError::Temporary {
                detail: e.0,
                retry_after: None,
            }),
            (Some(raw), _) => raw.sort(),
            (None, Err(e)) => Err(RequestError::Temporary {
                detail: format!("token request not sent: {e}"),
                retry_after: None,
            }),
            (None, Ok(_)) => Err(RequestError::Temporary {
                detail: "token endpoint gave no answer".into(),
                retry_after: None,
            }),
        }
    }

    async fn send(&self, request: HttpRequest) -> Result<HttpResponse, SendError> {
        let request = reqwest::Request::try_from(request)
            .map_err(|e| SendError(format!("token request not sent ({e})")))?;
        let mut response = self.http.execute(request).await.map_err(|e| {
            SendError(format!(
                "token endpoint unreachable ({})",
                describe_reqwest(&e)
            ))
        })?;
        let status = response.status();
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        let retry_after = header(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(3600)));
        let location = header(reqwest::header::LOCATION);
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_BODY => {
                    body.extend_from_slice(&chunk)
                }
                Ok(Some(_)) => {
                    return Err(SendError(format!(
                        "token endpoint answered HTTP {status} with more than {MAX_BODY} bytes"
                    )))
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(SendError(format!(
                        "token endpoint connection failed ({})",
                        describe_reqwest(&e)
                    )))
                }
            }
        }
        let mut answer = HttpResponse::new(body.clone());
        *answer.status_mut() = status;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Raw {
            status: status.as_u16(),
            retry_after,
            location,
            body: SensitiveBytes::new(body),
        });
        Ok(answer)
    }
}

impl<'c> AsyncHttpClient<'c> for Sender<'_> {
    type Error = SendError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, SendError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

impl Raw {
    fn sort(self) -> Result<Granted, RequestError> {
        if (300..400).contains(&self.status) {
            return Err(RequestError::Redirected {
                status: self.status,
                location: self.location,
            });
        }
        let body: Option<TokenBody> = serde_json::from_slice(self.body.expose()).ok();
        classify(self.status, self.retry_after, body)
    }
}

/// The refresh_token grant; `meaning` says what a refusal means for this provider.
pub async fn refresh(
    http: &reqwest::Client,
    client: &OAuthClient,
    refresh_token: &Secret,
    meaning: impl FnOnce(&Refusal) -> GrantError,
) -> Result<Granted, GrantError> {
    let oauth = oauth2_client(client).map_err(GrantError::Client)?;
    let sender = Sender::new(http);
    let token = RefreshToken::new(refresh_token.expose().to_string());
    let mut request = oauth.exchange_refresh_token(&token);
    if client.provider.scope_on_refresh() {
        request = request.add_scopes(
            client
                .scope
                .split_whitespace()
                .map(|s| oauth2::Scope::new(s.to_string())),
        );
    }
    let sent = request.request_async(&sender).await;
    sender
        .outcome(sent)
        .map_err(|e| e.into_grant_error(meaning))
}

/// Why a token request did not produce a token, before a grant gives it meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The endpoint answered with an OAuth error code.
    Refused(Refusal),
    /// The endpoint answered with a redirect, which is not followed (it would re-send the
    /// secrets): token_url is wrong.
    Redirected {
        status: u16,
        location: Option<String>,
    },
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
            RequestError::Redirected { status, location } => GrantError::Client(format!(
                "token endpoint answered HTTP {status} with a redirect to {}, which is not followed (it would re-send the client secret and the refresh token); set token_url to the endpoint itself",
                location.as_deref().unwrap_or("nowhere")
            )),
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

/// POST a form to the token endpoint (for grants oauth2 does not build, such as the JWT
/// bearer grant) and sort the answer like any other.
pub async fn token_request(
    http: &reqwest::Client,
    token_url: &str,
    form: &[(&str, &str)],
) -> Result<Granted, RequestError> {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let request = oauth2::http::Request::builder()
        .method(oauth2::http::Method::POST)
        .uri(token_url)
        .header(
            oauth2::http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(oauth2::http::header::ACCEPT, "application/json")
        .body(body.into_bytes())
        .map_err(|e| RequestError::Temporary {
            detail: format!("token request not sent ({e})"),
            retry_after: None,
        })?;
    let sender = Sender::new(http);
    let sent = sender
        .send(request)
        .await
        .map_err(RequestTokenError::<_, oauth2::basic::BasicErrorResponse>::Request);
    sender.outcome(sent)
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
            expires_in: Duration::from_secs(secs).min(MAX_ACCESS_TOKEN_LIFE),
            refresh_token: body.refresh_token.filter(|t| !t.is_empty()),
            refresh_token_expires_in: seconds(&body.refresh_token_expires_in)
                .map(|s| Duration::from_secs(s).min(MAX_REFRESH_TOKEN_LIFE)),
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
    use crate::provider::google::refresh_refusal;

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

    #[test]
    fn absurd_lifetimes_are_clamped_instead_of_overflowing_a_clock() {
        let ok = refresh_outcome(200, None, Some(r#"{"access_token":"ya29.x","expires_in":18446744073709551615,"refresh_token_expires_in":18446744073709551615}"#)).unwrap();
        assert_eq!(ok.expires_in, MAX_ACCESS_TOKEN_LIFE);
        assert_eq!(ok.refresh_token_expires_in, Some(MAX_REFRESH_TOKEN_LIFE));
        assert!(std::time::SystemTime::now()
            .checked_add(ok.expires_in)
            .is_some());
    }

    #[test]
    fn a_redirect_is_a_client_error_that_names_where_it_pointed() {
        let raw = Raw {
            status: 302,
            retry_after: None,
            location: Some("http://127.0.0.1:9/elsewhere".into()),
            body: SensitiveBytes::new(b"{}".to_vec()),
        };
        let err = raw.sort().unwrap_err();
        assert!(matches!(err, RequestError::Redirected { status: 302, .. }));
        let GrantError::Client(text) = err.into_grant_error(refresh_refusal) else {
            panic!("not a client error");
        };
        assert!(text.contains("http://127.0.0.1:9/elsewhere"), "{text}");
        assert!(text.contains("not followed"), "{text}");
    }
}

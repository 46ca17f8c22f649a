//! Fake Google OAuth 2.0 endpoints: token (refresh_token, authorization_code and JWT bearer
//! grants), authorization (consent is simulated: it redirects straight back with a code) and
//! revoke. JWT bearer assertions are verified like Google does: RS256 signature with the
//! registered service account's public key, `aud`, `iat`/`exp` (at most an hour), scope, `sub`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;
use sha2::Digest as _;

use super::conn::{bind_loopback, lock, random_urlsafe, spawn_server, ServerTask};
use super::http::{form_decode, form_encode, parse_form, serve_connection, Request, Response};

pub const CLIENT_ID: &str = "test-client-id.apps.googleusercontent.com";
pub const CLIENT_SECRET: &str = "GOCSPX-test-client-secret";
/// The only scope the fake grants.
pub const SCOPE: &str = "https://mail.google.com/";
/// Default `expires_in` of issued access tokens.
pub const DEFAULT_EXPIRES_IN: u64 = 3599;

pub(super) struct RefreshEntry {
    pub(super) email: String,
    pub(super) revoked: bool,
}

pub(super) struct AccessEntry {
    email: String,
    expires_at: Instant,
}

pub(super) struct PendingCode {
    pub(super) email: String,
    pub(super) client_id: String,
    pub(super) redirect_uri: String,
    pub(super) code_challenge: Option<String>,
    pub(super) code_challenge_method: String,
}

pub(super) struct Inner {
    pub(super) refresh: HashMap<String, RefreshEntry>,
    pub(super) access: HashMap<String, AccessEntry>,
    pub(super) codes: HashMap<String, PendingCode>,
    pub(super) expires_in: u64,
    pub(super) down: bool,
    pub(super) delay: Duration,
    pub(super) consent_email: Option<String>,
    pub(super) consent_denied: bool,
    pub(super) authorization_requests: Vec<Vec<(String, String)>>,
    pub(super) issued_refresh_tokens: Vec<(String, String)>,
    /// client_email → PKCS#1 RSAPublicKey DER.
    pub(super) service_accounts: HashMap<String, Vec<u8>>,
    pub(super) delegation_granted: bool,
    /// Claims of every accepted JWT bearer assertion.
    pub(super) jwt_claims: Vec<serde_json::Value>,
    /// The `aud` assertions must carry: this fake's token URL.
    pub(super) audience: String,
    /// Every refresh answers with a new refresh token and revokes the one it was given.
    pub(super) rotate_refresh_tokens: bool,
    /// When set, POST /token answers 302 to this address instead.
    pub(super) token_redirect: Option<String>,
    /// Device grant polls answer these error codes in turn ("ok" issues a token); the last
    /// one repeats.
    pub(super) device_script: Vec<String>,
    pub(super) device_polls: usize,
    /// Microsoft: the tenant of every request to the identity endpoints, in order.
    pub(super) ms_tenants: Vec<String>,
    /// Microsoft: refresh answers revoke the refresh token they were given (stricter than
    /// Microsoft, which keeps it valid), so only the newest one works.
    pub(super) ms_strict_rotation: bool,
    /// Microsoft: when set, refresh and client-credential grants answer this refusal.
    pub(super) ms_refusal: Option<(u16, String, String)>,
    /// `interval` of issued device codes (seconds).
    pub(super) device_interval: u64,
}

pub struct GoogleState {
    pub(super) inner: Mutex<Inner>,
    token_requests: AtomicUsize,
    pub(super) refresh_grants_ok: AtomicUsize,
}

/// Cheap clonable handle to the fake's token state (what the mail fakes use).
#[derive(Clone)]
pub struct GoogleHandle(pub(super) Arc<GoogleState>);

impl GoogleHandle {
    /// True if `token` was issued by this fake, is unexpired, has not been invalidated, and
    /// was issued for `email` (case-insensitive).
    pub fn check_access_token(&self, token: &str, email: &str) -> bool {
        let inner = lock(&self.0.inner);
        match inner.access.get(token) {
            Some(entry) => {
                entry.email.eq_ignore_ascii_case(email) && Instant::now() < entry.expires_at
            }
            None => false,
        }
    }

    /// Whose unexpired access token this is, if this fake issued it.
    pub fn token_owner(&self, token: &str) -> Option<String> {
        let inner = lock(&self.0.inner);
        inner
            .access
            .get(token)
            .filter(|e| Instant::now() < e.expires_at)
            .map(|e| e.email.clone())
    }

    pub(super) fn mint(&self, inner: &mut Inner, email: &str, ttl: Duration) -> String {
        let token = format!("ya29.a0{}", random_urlsafe(120));
        let now = Instant::now();
        // An absurd expires_in (u64::MAX, for tests of the proxy's clamp) means "for good".
        let expires_at = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 24 * 3600));
        inner.access.insert(
            token.clone(),
            AccessEntry {
                email: email.to_string(),
                expires_at,
            },
        );
        token
    }
}

pub struct FakeGoogle {
    /// `http://127.0.0.1:PORT/token`
    pub token_url: String,
    /// `http://127.0.0.1:PORT`
    pub base_url: String,
    /// `http://127.0.0.1:PORT/o/oauth2/v2/auth` (also served at `/auth`)
    pub auth_url: String,
    /// `http://127.0.0.1:PORT/revoke`
    pub revoke_url: String,
    pub addr: SocketAddr,
    state: GoogleHandle,
    _task: ServerTask,
}

impl FakeGoogle {
    pub async fn start() -> FakeGoogle {
        let state = GoogleHandle(Arc::new(GoogleState {
            inner: Mutex::new(Inner {
                refresh: HashMap::new(),
                access: HashMap::new(),
                codes: HashMap::new(),
                expires_in: DEFAULT_EXPIRES_IN,
                down: false,
                delay: Duration::ZERO,
                consent_email: None,
                consent_denied: false,
                authorization_requests: Vec::new(),
                issued_refresh_tokens: Vec::new(),
                service_accounts: HashMap::new(),
                delegation_granted: true,
                jwt_claims: Vec::new(),
                audience: String::new(),
                rotate_refresh_tokens: false,
                token_redirect: None,
                device_script: vec!["authorization_pending".into()],
                device_polls: 0,
                ms_tenants: Vec::new(),
                ms_strict_rotation: false,
                ms_refusal: None,
                device_interval: 5,
            }),
            token_requests: AtomicUsize::new(0),
            refresh_grants_ok: AtomicUsize::new(0),
        }));
        let (listener, addr) = bind_loopback().await;
        let handler_state = state.clone();
        let task = spawn_server(listener, move |tcp, _peer| {
            let state = handler_state.clone();
            async move {
                serve_connection(tcp, move |req| {
                    let state = state.clone();
                    async move { handle(&state, req).await }
                })
                .await
            }
        });
        let base_url = format!("http://{addr}");
        lock(&state.0.inner).audience = format!("{base_url}/token");
        FakeGoogle {
            token_url: format!("{base_url}/token"),
            auth_url: format!("{base_url}/o/oauth2/v2/auth"),
            revoke_url: format!("{base_url}/revoke"),
            base_url,
            addr,
            state,
            _task: task,
        }
    }

    /// Registers a refresh token belonging to `email`.
    pub fn add_refresh_token(&self, refresh_token: &str, email: &str) {
        lock(&self.state.0.inner).refresh.insert(
            refresh_token.to_string(),
            RefreshEntry {
                email: email.to_string(),
                revoked: false,
            },
        );
    }

    /// Later refreshes with this token get 400 `invalid_grant`.
    pub fn revoke_refresh_token(&self, refresh_token: &str) {
        if let Some(e) = lock(&self.state.0.inner).refresh.get_mut(refresh_token) {
            e.revoked = true;
        }
    }

    /// `expires_in` for tokens issued from now on (default 3599). Tokens are really valid at
    /// the mail fakes for exactly that many seconds.
    pub fn set_expires_in(&self, secs: u64) {
        lock(&self.state.0.inner).expires_in = secs;
    }

    /// When down, every request gets HTTP 503 with an HTML body.
    pub fn set_down(&self, down: bool) {
        lock(&self.state.0.inner).down = down;
    }

    /// Delay before answering each POST /token.
    pub fn set_delay(&self, d: Duration) {
        lock(&self.state.0.inner).delay = d;
    }

    /// Number of POST /token requests received (any outcome).
    pub fn token_requests(&self) -> usize {
        self.state.0.token_requests.load(Ordering::SeqCst)
    }

    /// Number of successful `refresh_token` grants.
    pub fn successful_refreshes(&self) -> usize {
        self.state.0.refresh_grants_ok.load(Ordering::SeqCst)
    }

    /// Issues a valid access token directly.
    pub fn mint_access_token(&self, email: &str, ttl: Duration) -> String {
        let mut inner = lock(&self.state.0.inner);
        self.state.mint(&mut inner, email, ttl)
    }

    /// Every access token issued so far stops being valid.
    pub fn invalidate_access_tokens(&self) {
        lock(&self.state.0.inner).access.clear();
    }

    pub fn check_access_token(&self, token: &str, email: &str) -> bool {
        self.state.check_access_token(token, email)
    }

    pub fn shared(&self) -> GoogleHandle {
        self.state.clone()
    }

    /// Which account the simulated user picks on the consent page (default: the request's
    /// `login_hint`).
    pub fn set_consent_email(&self, email: Option<&str>) {
        lock(&self.state.0.inner).consent_email = email.map(str::to_string);
    }

    /// When set, the consent page redirects back with `error=access_denied`.
    pub fn set_consent_denied(&self, denied: bool) {
        lock(&self.state.0.inner).consent_denied = denied;
    }

    /// Query parameters of every GET to the authorization endpoint, in order.
    pub fn authorization_requests(&self) -> Vec<HashMap<String, String>> {
        lock(&self.state.0.inner)
            .authorization_requests
            .iter()
            .map(|params| params.iter().cloned().collect())
            .collect()
    }

    /// `(email, refresh_token)` for every refresh token issued by an authorization-code
    /// exchange, in order.
    pub fn issued_refresh_tokens(&self) -> Vec<(String, String)> {
        lock(&self.state.0.inner).issued_refresh_tokens.clone()
    }

    /// Registers a service account: JWT bearer assertions with `iss` = `client_email` are
    /// verified with `public_key_der` (PKCS#1 RSAPublicKey, as aws-lc-rs gives it).
    pub fn add_service_account(&self, client_email: &str, public_key_der: &[u8]) {
        lock(&self.state.0.inner)
            .service_accounts
            .insert(client_email.to_string(), public_key_der.to_vec());
    }

    /// When false, valid assertions get 401 `unauthorized_client`, as when a Workspace admin
    /// has not granted domain-wide delegation for the client ID and scope (default true).
    pub fn set_delegation_granted(&self, granted: bool) {
        lock(&self.state.0.inner).delegation_granted = granted;
    }

    /// When set, every successful refresh returns a new refresh token and revokes the old one
    /// (refresh token rotation, RFC 6749 §6), so a client that does not save it loses access.
    pub fn set_rotate_refresh_tokens(&self, on: bool) {
        lock(&self.state.0.inner).rotate_refresh_tokens = on;
    }

    /// Claims of every accepted JWT bearer assertion, in order.
    pub fn accepted_jwt_claims(&self) -> Vec<serde_json::Value> {
        lock(&self.state.0.inner).jwt_claims.clone()
    }

    /// When set, every POST /token is answered with a 302 redirect to `location`.
    pub fn set_token_redirect(&self, location: Option<&str>) {
        lock(&self.state.0.inner).token_redirect = location.map(str::to_string);
    }

    /// What device-grant polls answer, in turn: OAuth error codes such as
    /// `authorization_pending` or `slow_down`, or `ok` for a token. The last one repeats.
    pub fn set_device_script(&self, script: &[&str]) {
        let mut inner = lock(&self.state.0.inner);
        inner.device_script = script.iter().map(|s| s.to_string()).collect();
        inner.device_polls = 0;
    }

    /// Number of device-grant polls received.
    pub fn device_polls(&self) -> usize {
        lock(&self.state.0.inner).device_polls
    }

    /// `http://127.0.0.1:PORT/device/code`
    pub fn device_url(&self) -> String {
        format!("{}/device/code", self.base_url)
    }

    /// Whether this refresh token is known and not revoked.
    pub fn refresh_token_is_live(&self, refresh_token: &str) -> bool {
        lock(&self.state.0.inner)
            .refresh
            .get(refresh_token)
            .is_some_and(|e| !e.revoked)
    }
}

pub(super) fn oauth_error(status: u16, error: &str, description: Option<&str>) -> Response {
    match description {
        Some(d) => Response::json(status, &json!({"error": error, "error_description": d})),
        None => Response::json(status, &json!({"error": error})),
    }
}

fn invalid_client() -> Response {
    oauth_error(
        401,
        "invalid_client",
        Some("The OAuth client was not found."),
    )
}

fn invalid_grant_revoked() -> Response {
    oauth_error(
        400,
        "invalid_grant",
        Some("Token has been expired or revoked."),
    )
}

async fn handle(state: &GoogleHandle, req: Request) -> Response {
    let is_token = req.method == "POST" && req.path == "/token";
    if is_token {
        state.0.token_requests.fetch_add(1, Ordering::SeqCst);
    }
    let (down, delay) = {
        let inner = lock(&state.0.inner);
        (inner.down, inner.delay)
    };
    if is_token && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if down {
        return Response::html(
            503,
            "<!DOCTYPE html><html><head><title>Error 503 (Service Unavailable)</title></head>\
             <body><p><b>503.</b> That's an error.</p></body></html>",
        );
    }
    if let Some((tenant, endpoint)) = super::microsoft::route(&req.path) {
        return super::microsoft::handle(state, &req, tenant, endpoint);
    }
    let redirect = lock(&state.0.inner).token_redirect.clone();
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/token") if redirect.is_some() => {
            Response::redirect(redirect.as_deref().unwrap_or_default())
        }
        ("POST", "/token") => token(state, &req),
        ("POST", "/device/code") => device_code(state, &req),
        ("GET", "/auth") | ("GET", "/o/oauth2/v2/auth") | ("GET", "/o/oauth2/auth") => {
            authorize(state, &req)
        }
        ("POST", "/revoke") | ("POST", "/o/oauth2/revoke") => revoke(state, &req),
        (_, "/token") => oauth_error(405, "invalid_request", Some("Method not allowed")),
        _ => Response::html(404, "<html><body>404. That's an error.</body></html>"),
    }
}

/// Form parameters, rejecting duplicates (RFC 6749 §3.2).
pub(super) fn unique_params(
    pairs: Vec<(String, String)>,
) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    for (k, v) in pairs {
        if map.contains_key(&k) {
            return Err(k);
        }
        map.insert(k, v);
    }
    Ok(map)
}

/// Client credentials from `Authorization: Basic` (RFC 6749 §2.3.1, url-encoded parts) or
/// from the body. `Err` when they conflict or are malformed.
pub(super) fn client_credentials(
    req: &Request,
    params: &HashMap<String, String>,
) -> Result<(Option<String>, Option<String>), ()> {
    let body_id = params.get("client_id").cloned();
    let body_secret = params.get("client_secret").cloned();
    let Some(auth) = req.header("Authorization") else {
        return Ok((body_id, body_secret));
    };
    let (scheme, value) = auth.split_once(' ').ok_or(())?;
    if !scheme.eq_ignore_ascii_case("Basic") {
        return Err(());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| ())?;
    let colon = decoded.iter().position(|&b| b == b':').ok_or(())?;
    let id = form_decode(&decoded[..colon]);
    let secret = form_decode(&decoded[colon + 1..]);
    if body_secret.is_some() || body_id.as_ref().is_some_and(|b| *b != id) {
        return Err(());
    }
    Ok((Some(id), Some(secret)))
}

fn token(state: &GoogleHandle, req: &Request) -> Response {
    let content_type = req.header("Content-Type").unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return oauth_error(400, "invalid_request", Some("Invalid content type"));
    }
    let params = match unique_params(parse_form(&req.body)) {
        Ok(p) => p,
        Err(dup) => {
            return oauth_error(
                400,
                "invalid_request",
                Some(&format!("Duplicate parameter: {dup}")),
            )
        }
    };
    let Some(grant_type) = params.get("grant_type").cloned() else {
        return oauth_error(
            400,
            "invalid_request",
            Some("Missing required parameter: grant_type"),
        );
    };
    // The JWT bearer grant authenticates with the assertion's signature, not client credentials.
    if grant_type == JWT_BEARER {
        return jwt_bearer_grant(state, &params);
    }
    match client_credentials(req, &params) {
        Ok((Some(id), Some(secret))) if id == CLIENT_ID && secret == CLIENT_SECRET => {}
        _ => return invalid_client(),
    }
    match grant_type.as_str() {
        DEVICE_GRANT => device_grant(state, &params),
        "refresh_token" => refresh_grant(state, &params),
        "authorization_code" => code_grant(state, &params),
        _ => oauth_error(400, "unsupported_grant_type", None),
    }
}

fn refresh_grant(state: &GoogleHandle, params: &HashMap<String, String>) -> Response {
    let Some(refresh_token) = params.get("refresh_token") else {
        return oauth_error(
            400,
            "invalid_request",
            Some("Missing required parameter: refresh_token"),
        );
    };
    let mut inner = lock(&state.0.inner);
    let email = match inner.refresh.get(refresh_token) {
        Some(e) if !e.revoked => e.email.clone(),
        _ => return invalid_grant_revoked(),
    };
    let expires_in = inner.expires_in;
    let access = state.mint(&mut inner, &email, Duration::from_secs(expires_in));
    let rotated = inner.rotate_refresh_tokens.then(|| {
        let new = format!("1//0g{}", random_urlsafe(98));
        if let Some(old) = inner.refresh.get_mut(refresh_token) {
            old.revoked = true;
        }
        inner.refresh.insert(
            new.clone(),
            RefreshEntry {
                email: email.clone(),
                revoked: false,
            },
        );
        new
    });
    drop(inner);
    state.0.refresh_grants_ok.fetch_add(1, Ordering::SeqCst);
    let mut body = json!({
        "access_token": access,
        "expires_in": expires_in,
        "scope": SCOPE,
        "token_type": "Bearer",
    });
    if let Some(new) = rotated {
        body["refresh_token"] = json!(new);
    }
    Response::json(200, &body)
}

fn code_grant(state: &GoogleHandle, params: &HashMap<String, String>) -> Response {
    let Some(code) = params.get("code") else {
        return oauth_error(
            400,
            "invalid_request",
            Some("Missing required parameter: code"),
        );
    };
    let mut inner = lock(&state.0.inner);
    // Codes are single use, whatever the outcome.
    let Some(pending) = inner.codes.remove(code) else {
        return oauth_error(400, "invalid_grant", Some("Malformed auth code."));
    };
    if params
        .get("client_id")
        .is_some_and(|c| *c != pending.client_id)
    {
        return oauth_error(400, "invalid_grant", Some("Bad Request"));
    }
    if params.get("redirect_uri") != Some(&pending.redirect_uri) {
        return oauth_error(400, "redirect_uri_mismatch", Some("Bad Request"));
    }
    if let Err(refused) = check_pkce(&pending, params) {
        return refused;
    }
    let refresh_token = format!("1//0g{}", random_urlsafe(98));
    inner.refresh.insert(
        refresh_token.clone(),
        RefreshEntry {
            email: pending.email.clone(),
            revoked: false,
        },
    );
    inner
        .issued_refresh_tokens
        .push((pending.email.clone(), refresh_token.clone()));
    let expires_in = inner.expires_in;
    let access = state.mint(&mut inner, &pending.email, Duration::from_secs(expires_in));
    Response::json(
        200,
        &json!({
            "access_token": access,
            "expires_in": expires_in,
            "refresh_token": refresh_token,
            "scope": SCOPE,
            "token_type": "Bearer",
        }),
    )
}

/// RFC 7636: the verifier must match the challenge the authorization request carried.
pub(super) fn check_pkce(
    pending: &PendingCode,
    params: &HashMap<String, String>,
) -> Result<(), Response> {
    let Some(challenge) = &pending.code_challenge else {
        return Ok(());
    };
    let Some(verifier) = params.get("code_verifier") else {
        return Err(oauth_error(
            400,
            "invalid_grant",
            Some("Missing code verifier."),
        ));
    };
    let computed = if pending.code_challenge_method.eq_ignore_ascii_case("S256") {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.as_bytes()))
    } else {
        verifier.clone()
    };
    if computed != *challenge {
        return Err(oauth_error(
            400,
            "invalid_grant",
            Some("Invalid code verifier."),
        ));
    }
    Ok(())
}

pub(super) fn is_loopback_redirect(uri: &str) -> bool {
    ["http://127.0.0.1", "http://localhost", "http://[::1]"]
        .iter()
        .any(|prefix| {
            uri.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/', '?']))
        })
}

fn authorize(state: &GoogleHandle, req: &Request) -> Response {
    let pairs = parse_form(req.query.as_bytes());
    let mut inner = lock(&state.0.inner);
    inner.authorization_requests.push(pairs.clone());
    let params: HashMap<String, String> = pairs.into_iter().collect();
    if params.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return Response::html(
            401,
            "<html><body>Error 401: invalid_client. The OAuth client was not found.</body></html>",
        );
    }
    let Some(redirect_uri) = params
        .get("redirect_uri")
        .filter(|r| is_loopback_redirect(r))
    else {
        return Response::html(
            400,
            "<html><body>Error 400: redirect_uri_mismatch</body></html>",
        );
    };
    if params.get("response_type").map(String::as_str) != Some("code") {
        return Response::html(
            400,
            "<html><body>Error 400: invalid_request (response_type)</body></html>",
        );
    }
    let scope_ok = params
        .get("scope")
        .is_some_and(|s| s.split(' ').any(|x| x == SCOPE));
    if !scope_ok {
        return Response::html(400, "<html><body>Error 400: invalid_scope</body></html>");
    }
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    let state_param = params
        .get("state")
        .map(|s| format!("state={}&", form_encode(s)))
        .unwrap_or_default();
    if inner.consent_denied {
        return Response::redirect(&format!(
            "{redirect_uri}{sep}{state_param}error=access_denied"
        ));
    }
    let Some(email) = inner
        .consent_email
        .clone()
        .or_else(|| params.get("login_hint").cloned())
    else {
        return Response::html(
            400,
            "<html><body>fake Google: no account chosen (set_consent_email or login_hint)</body></html>",
        );
    };
    let code = format!("4/0A{}", random_urlsafe(70));
    inner.codes.insert(
        code.clone(),
        PendingCode {
            email,
            client_id: CLIENT_ID.to_string(),
            redirect_uri: redirect_uri.clone(),
            code_challenge: params.get("code_challenge").cloned(),
            code_challenge_method: params
                .get("code_challenge_method")
                .cloned()
                .unwrap_or_else(|| "plain".to_string()),
        },
    );
    Response::redirect(&format!(
        "{redirect_uri}{sep}{state_param}code={}&scope={}",
        form_encode(&code),
        form_encode(SCOPE)
    ))
}

fn revoke(state: &GoogleHandle, req: &Request) -> Response {
    let mut params: HashMap<String, String> =
        parse_form(req.query.as_bytes()).into_iter().collect();
    params.extend(parse_form(&req.body));
    let Some(token) = params.get("token") else {
        return oauth_error(
            400,
            "invalid_request",
            Some("Missing required parameter: token"),
        );
    };
    let mut inner = lock(&state.0.inner);
    if let Some(e) = inner.refresh.get_mut(token) {
        e.revoked = true;
        return Response::json(200, &json!({}));
    }
    if inner.access.remove(token).is_some() {
        return Response::json(200, &json!({}));
    }
    oauth_error(400, "invalid_token", Some("Bad Request"))
}

pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

fn invalid_jwt(description: &str) -> Response {
    oauth_error(400, "invalid_grant", Some(description))
}

/// RFC 7523 as Google does it for service accounts with domain-wide delegation.
fn jwt_bearer_grant(state: &GoogleHandle, params: &HashMap<String, String>) -> Response {
    let Some(assertion) = params.get("assertion") else {
        return oauth_error(
            400,
            "invalid_request",
            Some("Missing required parameter: assertion"),
        );
    };
    let parts: Vec<&str> = assertion.split('.').collect();
    if parts.len() != 3 {
        return invalid_jwt("Invalid JWT: not a JWS compact serialization.");
    }
    let decode = |part: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .ok()
    };
    let json =
        |part: &str| -> Option<serde_json::Value> { serde_json::from_slice(&decode(part)?).ok() };
    let (Some(header), Some(claims), Some(signature)) =
        (json(parts[0]), json(parts[1]), decode(parts[2]))
    else {
        return invalid_jwt("Invalid JWT: cannot decode.");
    };
    if header["alg"] != "RS256" {
        return invalid_jwt("Invalid JWT: alg must be RS256.");
    }
    let mut inner = lock(&state.0.inner);
    let Some(public_key) = claims["iss"]
        .as_str()
        .and_then(|iss| inner.service_accounts.get(iss))
    else {
        return invalid_jwt("Invalid grant: account not found");
    };
    let signed = format!("{}.{}", parts[0], parts[1]);
    if aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        public_key,
    )
    .verify(signed.as_bytes(), &signature)
    .is_err()
    {
        return invalid_jwt("Invalid JWT Signature.");
    }
    if claims["aud"].as_str() != Some(inner.audience.as_str()) {
        return invalid_jwt(&format!(
            "Invalid JWT: Failed audience check. The right audience is {}",
            inner.audience
        ));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let timeframe_ok = match (claims["iat"].as_i64(), claims["exp"].as_i64()) {
        (Some(iat), Some(exp)) => iat <= now + 300 && exp > now && exp > iat && exp - iat <= 3600,
        _ => false,
    };
    if !timeframe_ok {
        return invalid_jwt("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.");
    }
    let scope_ok = claims["scope"]
        .as_str()
        .is_some_and(|s| s.split(' ').any(|x| x == SCOPE));
    if !scope_ok {
        return oauth_error(
            400,
            "invalid_scope",
            Some("Invalid OAuth scope or ID token audience provided."),
        );
    }
    let Some(subject) = claims["sub"]
        .as_str()
        .filter(|s| s.contains('@'))
        .map(str::to_string)
    else {
        return invalid_jwt("Invalid email or User ID");
    };
    if !inner.delegation_granted {
        return oauth_error(
            401,
            "unauthorized_client",
            Some("Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested."),
        );
    }
    inner.jwt_claims.push(claims.clone());
    let expires_in = inner.expires_in;
    let access = state.mint(&mut inner, &subject, Duration::from_secs(expires_in));
    Response::json(
        200,
        &json!({
            "access_token": access,
            "expires_in": expires_in,
            "token_type": "Bearer",
        }),
    )
}

pub const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
const DEVICE_CODE: &str = "fake-device-code";

/// RFC 8628 §3.2: a device code, the code the user types, where, and how often to poll.
fn device_code(state: &GoogleHandle, req: &Request) -> Response {
    let params = parse_form(&req.body);
    if !params
        .iter()
        .any(|(k, v)| k == "client_id" && v == CLIENT_ID)
    {
        return invalid_client();
    }
    Response::json(
        200,
        &json!({
            "device_code": DEVICE_CODE,
            "user_code": "WDJB-MJHT",
            "verification_uri": "https://example.com/device",
            "expires_in": 900,
            "interval": lock(&state.0.inner).device_interval,
        }),
    )
}

impl Inner {
    /// The scripted answer to the next device-code poll (the last one repeats).
    pub(super) fn next_device_answer(&mut self) -> String {
        let step = self
            .device_polls
            .min(self.device_script.len().saturating_sub(1));
        self.device_polls += 1;
        self.device_script.get(step).cloned().unwrap_or_default()
    }
}

/// RFC 8628 §3.5: the next scripted answer to a poll.
fn device_grant(state: &GoogleHandle, params: &HashMap<String, String>) -> Response {
    if params.get("device_code").map(String::as_str) != Some(DEVICE_CODE) {
        return oauth_error(400, "bad_verification_code", None);
    }
    let mut inner = lock(&state.0.inner);
    let answer = inner.next_device_answer();
    if answer != "ok" {
        return oauth_error(400, &answer, None);
    }
    let expires_in = inner.expires_in;
    let access = state.mint(
        &mut inner,
        "device@example.com",
        Duration::from_secs(expires_in),
    );
    Response::json(
        200,
        &json!({
            "access_token": access,
            "expires_in": expires_in,
            "refresh_token": format!("1//0g{}", random_urlsafe(98)),
            "scope": SCOPE,
            "token_type": "Bearer",
        }),
    )
}

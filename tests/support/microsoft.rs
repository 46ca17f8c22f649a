//! Fake Microsoft identity platform (protocol-facts §4.2–§4.5, §4.7), served by the same
//! server as the fake Google under `/{tenant}/oauth2/v2.0/{authorize,token,devicecode}`, so
//! the mail fakes accept tokens from either. Refresh answers always rotate the refresh token;
//! the old one stays valid, as at Microsoft, unless strict rotation is on. Refusals carry
//! AADSTS codes in `error_description`, as Microsoft's do.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use super::conn::{lock, random_urlsafe};
use super::google::{
    check_pkce, client_credentials, is_loopback_redirect, oauth_error, unique_params, FakeGoogle,
    GoogleHandle, Inner, PendingCode, RefreshEntry, DEVICE_GRANT,
};
use super::http::{form_encode, parse_form, Request, Response};

/// The Entra app registration the fake knows (a public client; app-only uses the secret).
pub const MS_CLIENT_ID: &str = "00000000-0000-4000-8000-00000000c11e";
pub const MS_CLIENT_SECRET: &str = "ms~test~client~secret";
pub const IMAP_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";
pub const POP_SCOPE: &str = "https://outlook.office.com/POP.AccessAsUser.All";
pub const SMTP_SCOPE: &str = "https://outlook.office.com/SMTP.Send";
pub const APP_ONLY_SCOPE: &str = "https://outlook.office365.com/.default";
/// Who an app-only token is issued to (the mail fakes check mailbox permissions for it).
pub const APP_PRINCIPAL: &str = "app:00000000-0000-4000-8000-00000000c11e";
const DEVICE_CODE: &str = "ms-fake-device-code";

/// `(tenant, endpoint)` of a path on the fake identity platform.
pub fn route(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (tenant, rest) = rest.split_once('/')?;
    let endpoint = rest.strip_prefix("oauth2/v2.0/")?;
    (!tenant.is_empty()).then_some((tenant, endpoint))
}

impl FakeGoogle {
    /// An identity endpoint URL with `{tenant}` left for the proxy's config to fill in.
    pub fn ms_url(&self, endpoint: &str) -> String {
        format!("{}/{{tenant}}/oauth2/v2.0/{endpoint}", self.base_url)
    }

    /// `[providers.microsoft]` for this fake (public client with a secret, for app-only too).
    pub fn ms_provider_section(&self, tenant: &str) -> String {
        format!(
            "[providers.microsoft]\nclient_id = \"{MS_CLIENT_ID}\"\nclient_secret = \"{MS_CLIENT_SECRET}\"\ntenant = \"{tenant}\"\nauth_url = \"{}\"\ntoken_url = \"{}\"\ndevice_url = \"{}\"\n",
            self.ms_url("authorize"),
            self.ms_url("token"),
            self.ms_url("devicecode"),
        )
    }

    /// The tenant in the path of every identity request so far.
    pub fn ms_tenants(&self) -> Vec<String> {
        lock(&self.shared().0.inner).ms_tenants.clone()
    }

    /// Refreshes revoke the refresh token they were given: only the newest one works.
    pub fn set_ms_strict_rotation(&self, on: bool) {
        lock(&self.shared().0.inner).ms_strict_rotation = on;
    }

    /// Refresh and client-credential grants answer `error` with this AADSTS description.
    pub fn set_ms_refusal(&self, refusal: Option<(u16, &str, &str)>) {
        lock(&self.shared().0.inner).ms_refusal =
            refusal.map(|(s, e, d)| (s, e.to_string(), d.to_string()));
    }

    /// `interval` of device codes issued from now on.
    pub fn set_device_interval(&self, secs: u64) {
        lock(&self.shared().0.inner).device_interval = secs;
    }

    /// Registers a Microsoft refresh token for `email`.
    pub fn add_ms_refresh_token(&self, refresh_token: &str, email: &str) {
        self.add_refresh_token(refresh_token, email);
    }
}

pub fn handle(state: &GoogleHandle, req: &Request, tenant: &str, endpoint: &str) -> Response {
    lock(&state.0.inner).ms_tenants.push(tenant.to_string());
    match (req.method.as_str(), endpoint) {
        ("GET", "authorize") => authorize(state, req),
        ("POST", "token") => token(state, req),
        ("POST", "devicecode") => device_code(state, req),
        _ => aadsts(
            404,
            "invalid_request",
            "AADSTS900561: The endpoint only accepts POST requests.",
        ),
    }
}

fn aadsts(status: u16, error: &str, description: &str) -> Response {
    let described = format!("{description}\r\nTrace ID: 0000\r\nCorrelation ID: 0000\r\nTimestamp: 2026-12-01 00:00:00Z");
    oauth_error(status, error, Some(&described))
}

fn user_scopes() -> String {
    [IMAP_SCOPE, POP_SCOPE, SMTP_SCOPE].join(" ")
}

fn token(state: &GoogleHandle, req: &Request) -> Response {
    let params = match unique_params(parse_form(&req.body)) {
        Ok(p) => p,
        Err(dup) => {
            return aadsts(
                400,
                "invalid_request",
                &format!("AADSTS90015: duplicate {dup}"),
            )
        }
    };
    let (id, secret) = client_credentials(req, &params).unwrap_or((None, None));
    if id.as_deref() != Some(MS_CLIENT_ID) {
        return aadsts(
            400,
            "unauthorized_client",
            "AADSTS700016: Application with identifier was not found in the directory.",
        );
    }
    if secret.as_deref().is_some_and(|s| s != MS_CLIENT_SECRET) {
        return aadsts(
            401,
            "invalid_client",
            "AADSTS7000215: Invalid client secret provided.",
        );
    }
    let refusal = lock(&state.0.inner).ms_refusal.clone();
    match params.get("grant_type").map(String::as_str) {
        Some("refresh_token" | "client_credentials") if refusal.is_some() => {
            let (status, error, description) = refusal.unwrap_or_default();
            aadsts(status, &error, &description)
        }
        Some("refresh_token") => refresh_grant(state, &params),
        Some("authorization_code") => code_grant(state, &params),
        Some("client_credentials") => app_grant(state, &params, secret.is_some()),
        Some(DEVICE_GRANT) => device_grant(state, &params),
        _ => aadsts(
            400,
            "unsupported_grant_type",
            "AADSTS70003: unsupported grant type",
        ),
    }
}

/// A user token for `email`, with a new refresh token (Microsoft rotates on every use).
fn issue(state: &GoogleHandle, inner: &mut Inner, email: &str) -> Response {
    let refresh = format!("M.C5_{}", random_urlsafe(120));
    inner.refresh.insert(
        refresh.clone(),
        RefreshEntry {
            email: email.to_string(),
            revoked: false,
        },
    );
    let expires_in = inner.expires_in;
    let access = state.mint(inner, email, Duration::from_secs(expires_in));
    Response::json(
        200,
        &json!({
            "token_type": "Bearer",
            "scope": user_scopes(),
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "access_token": access,
            "refresh_token": refresh,
        }),
    )
}

fn refresh_grant(state: &GoogleHandle, params: &HashMap<String, String>) -> Response {
    let scope_ok = params
        .get("scope")
        .is_some_and(|s| s.split(' ').any(|x| x == IMAP_SCOPE));
    if !scope_ok {
        return aadsts(
            400,
            "invalid_request",
            "AADSTS90014: The required field 'scope' is missing from the credential.",
        );
    }
    let given = params.get("refresh_token").cloned().unwrap_or_default();
    let mut inner = lock(&state.0.inner);
    let email = match inner.refresh.get(&given) {
        Some(e) if !e.revoked => e.email.clone(),
        _ => {
            return aadsts(
                400,
                "invalid_grant",
                "AADSTS70000: The provided value for the 'refresh_token' is not valid.",
            )
        }
    };
    if inner.ms_strict_rotation {
        if let Some(old) = inner.refresh.get_mut(&given) {
            old.revoked = true;
        }
    }
    let answer = issue(state, &mut inner, &email);
    drop(inner);
    state
        .0
        .refresh_grants_ok
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    answer
}

fn code_grant(state: &GoogleHandle, params: &HashMap<String, String>) -> Response {
    let code = params.get("code").cloned().unwrap_or_default();
    let mut inner = lock(&state.0.inner);
    let Some(pending) = inner.codes.remove(&code) else {
        return aadsts(
            400,
            "invalid_grant",
            "AADSTS70008: The provided authorization code or refresh token has expired.",
        );
    };
    if params.get("redirect_uri") != Some(&pending.redirect_uri) {
        return aadsts(
            400,
            "invalid_request",
            "AADSTS50011: The redirect URI specified in the request does not match.",
        );
    }
    if let Err(refused) = check_pkce(&pending, params) {
        return refused;
    }
    let email = pending.email.clone();
    issue(state, &mut inner, &email)
}

fn app_grant(state: &GoogleHandle, params: &HashMap<String, String>, has_secret: bool) -> Response {
    if !has_secret {
        return aadsts(401, "invalid_client", "AADSTS7000218: The request body must contain the following parameter: 'client_assertion' or 'client_secret'.");
    }
    if params.get("scope").map(String::as_str) != Some(APP_ONLY_SCOPE) {
        return aadsts(400, "invalid_scope", "AADSTS1002012: The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed.");
    }
    let mut inner = lock(&state.0.inner);
    let expires_in = inner.expires_in;
    let access = state.mint(&mut inner, APP_PRINCIPAL, Duration::from_secs(expires_in));
    Response::json(
        200,
        &json!({"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": expires_in, "access_token": access}),
    )
}

fn authorize(state: &GoogleHandle, req: &Request) -> Response {
    let pairs = parse_form(req.query.as_bytes());
    let mut inner = lock(&state.0.inner);
    inner.authorization_requests.push(pairs.clone());
    let params: HashMap<String, String> = pairs.into_iter().collect();
    if params.get("client_id").map(String::as_str) != Some(MS_CLIENT_ID) {
        return Response::html(
            400,
            "<html><body>AADSTS700016: Application not found</body></html>",
        );
    }
    let Some(redirect_uri) = params
        .get("redirect_uri")
        .filter(|r| is_loopback_redirect(r))
    else {
        return Response::html(
            400,
            "<html><body>AADSTS50011: redirect URI mismatch</body></html>",
        );
    };
    let scopes: Vec<&str> = params
        .get("scope")
        .map_or(Vec::new(), |s| s.split(' ').collect());
    if ![IMAP_SCOPE, POP_SCOPE, SMTP_SCOPE, "offline_access"]
        .iter()
        .all(|w| scopes.contains(w))
    {
        return Response::html(400, "<html><body>AADSTS70011: invalid scope</body></html>");
    }
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    let state_param = params
        .get("state")
        .map(|s| format!("state={}&", form_encode(s)))
        .unwrap_or_default();
    if inner.consent_denied {
        return Response::redirect(&format!(
            "{redirect_uri}{sep}{state_param}error=access_denied&error_description={}",
            form_encode("AADSTS65004: User declined to consent to access the app.")
        ));
    }
    let Some(email) = inner
        .consent_email
        .clone()
        .or_else(|| params.get("login_hint").cloned())
    else {
        return Response::html(400, "<html><body>no account chosen</body></html>");
    };
    let code = format!("M.C5_code_{}", random_urlsafe(60));
    inner.codes.insert(
        code.clone(),
        PendingCode {
            email,
            client_id: MS_CLIENT_ID.to_string(),
            redirect_uri: redirect_uri.clone(),
            code_challenge: params.get("code_challenge").cloned(),
            code_challenge_method: params
                .get("code_challenge_method")
                .cloned()
                .unwrap_or_else(|| "plain".to_string()),
        },
    );
    Response::redirect(&format!(
        "{redirect_uri}{sep}{state_param}code={}",
        form_encode(&code)
    ))
}

/// §4.7: no `verification_uri_complete`; a `message` for people.
fn device_code(state: &GoogleHandle, req: &Request) -> Response {
    let params: HashMap<String, String> = parse_form(&req.body).into_iter().collect();
    if params.get("client_id").map(String::as_str) != Some(MS_CLIENT_ID) {
        return aadsts(
            400,
            "unauthorized_client",
            "AADSTS700016: Application not found.",
        );
    }
    if !params
        .get("scope")
        .is_some_and(|s| s.split(' ').any(|x| x == "offline_access"))
    {
        return aadsts(400, "invalid_scope", "AADSTS70011: offline_access missing");
    }
    let interval = lock(&state.0.inner).device_interval;
    Response::json(
        200,
        &json!({
            "device_code": DEVICE_CODE,
            "user_code": "MSFT-CODE9",
            "verification_uri": "https://microsoft.com/devicelogin",
            "expires_in": 900,
            "interval": interval,
            "message": "To sign in, use a web browser to open the page https://microsoft.com/devicelogin and enter the code MSFT-CODE9 to authenticate.",
        }),
    )
}

/// RFC 8628 §3.5 with the fake's script; "ok" signs in the consent account.
fn device_grant(state: &GoogleHandle, params: &HashMap<String, String>) -> Response {
    if params.get("device_code").map(String::as_str) != Some(DEVICE_CODE) {
        return aadsts(
            400,
            "bad_verification_code",
            "AADSTS70019: Verification code expired.",
        );
    }
    let mut inner = lock(&state.0.inner);
    let answer = inner.next_device_answer();
    if answer != "ok" {
        return aadsts(400, &answer, &format!("AADSTS70016: {answer}"));
    }
    let email = inner
        .consent_email
        .clone()
        .unwrap_or_else(|| "device@contoso.com".into());
    issue(state, &mut inner, &email)
}

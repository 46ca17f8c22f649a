//! The admin listener (`[admin] bind`, loopback only): Prometheus metrics and health probes for
//! the ops team's existing tools. It observes the core through read-only views (the registry's
//! store, the bound listeners) and never reaches into a session.
//!
//! - `GET /`: the status page for people (`page.rs`).
//! - `GET /metrics`: Prometheus text exposition, names prefixed `xoauth2_proxy_`.
//! - `GET /livez`: 200 while the process serves.
//! - `GET /readyz`: 200 when every listener is bound, the store is readable and each provider's
//!   token endpoint answered its last request; 503 with a JSON reason otherwise.

pub mod access;
mod page;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::registry::Registry;

/// The OAuth client an account authorizes with, or why it has none.
pub type ClientFor = dyn Fn(&crate::config::AccountConfig) -> Result<crate::config::OAuthClient, String>
    + Send
    + Sync;

/// What the probes look at.
/// Each reads the running proxy's current config (SIGHUP may replace it).
pub struct Views {
    /// The configured accounts and the store.
    pub registry: Box<dyn Fn() -> Arc<Registry> + Send + Sync>,
    /// The protocol listeners `serve` bound, as (protocol, address).
    pub listeners: Box<dyn Fn() -> Vec<(&'static str, SocketAddr)> + Send + Sync>,
    /// How many listeners the config asks for.
    pub configured_listeners: Box<dyn Fn() -> usize + Send + Sync>,
    /// How many client addresses the brute-force throttle is slowing down now.
    pub throttled_sources: Box<dyn Fn() -> usize + Send + Sync>,
    /// Per account: (email, access-token expiry, refresh-token issue time), unix seconds.
    pub token_times: Box<dyn Fn() -> Vec<crate::metrics::TokenTimes> + Send + Sync>,
    /// Whether per-account gauges name the account.
    pub account_labels: bool,
    /// Providers whose token endpoint did not answer its last request, with why.
    pub token_endpoints: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// The `accounts` report as of now.
    pub accounts: Box<dyn Fn() -> Vec<crate::report::AccountReport> + Send + Sync>,
    /// The OAuth client an account authorizes with.
    pub oauth_client: Box<ClientFor>,
    /// Origins of the providers' consent pages (`https://accounts.google.com`).
    pub consent_origins: Vec<String>,
    /// Recent logins and open sessions.
    pub activity: Arc<crate::activity::Activity>,
    /// The admin password check, when `[admin] password_hash` is set.
    pub login: Option<Arc<access::Login>>,
}

/// The routes' state: the views, this process's CSRF token for the page's forms, and the
/// authorizations started from the page, by their `state`.
struct Admin {
    views: Views,
    csrf: String,
    port: u16,
    pending: std::sync::Mutex<HashMap<String, Pending>>,
}

/// An authorization started from the page, waiting for the browser to come back.
struct Pending {
    attempt: crate::oauth::flow::Attempt,
    key: crate::account::AccountKey,
    started: std::time::Instant,
}

/// How long a started authorization waits for the browser, and how many may wait at once.
const AUTHORIZE_WAIT: std::time::Duration = std::time::Duration::from_secs(15 * 60);
const MAX_PENDING: usize = 32;

pub struct AdminListener {
    tcp: TcpListener,
    /// HTTPS with the `[tls]` certificate, when a password protects the listener.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Host names requests may be addressed to, besides loopback names and the bind address.
    hosts: Vec<String>,
}

impl AdminListener {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.local_addr().ok()
    }
}

/// Bind `[admin] bind`, if configured; a one-line reason when it can't be.
pub async fn bind(config: &Config) -> Result<Option<AdminListener>, String> {
    let Some(admin) = &config.admin else {
        return Ok(None);
    };
    let tls = match (&admin.password_hash, &config.tls) {
        (Some(_), Some(files)) => Some(
            crate::tls::server_config(&files.cert, &files.key)
                .map_err(|e| format!("admin listener: {e}"))?,
        ),
        _ => None,
    };
    let tcp = TcpListener::bind(admin.bind)
        .await
        .map_err(|e| format!("admin listener: cannot bind {}: {e}", admin.bind))?;
    Ok(Some(AdminListener {
        tcp,
        tls,
        hosts: admin.hosts.clone(),
    }))
}

/// Serve the admin routes until `cancel`.
pub async fn serve(listener: AdminListener, views: Views, cancel: CancellationToken) {
    crate::metrics::handle();
    let Some(addr) = listener.local_addr() else {
        tracing::error!("admin listener: its socket has no address");
        return;
    };
    let scheme = if listener.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(bind = %addr, %scheme, "admin listener: /metrics /livez /readyz");
    let csrf: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let csp: Arc<str> = page::csp(&views.consent_origins).into();
    let login = views.login.clone();
    let callback = callback_listener(addr, listener.tls.is_some()).await;
    let port = callback
        .as_ref()
        .and_then(|c| c.local_addr().ok())
        .map_or(addr.port(), |a| a.port());
    let state = Arc::new(Admin {
        views,
        csrf,
        port,
        pending: Default::default(),
    });
    let hosts = Arc::new((addr, listener.hosts));
    if let Some(callback) = callback {
        let app = Router::new()
            .route("/", get(callback_page))
            .with_state(state.clone());
        let app = protected(app, &csp, hosts.clone());
        let stop = cancel.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(callback, app)
                .with_graceful_shutdown(stop)
                .await;
        });
    }
    let app = routes()
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            login,
            access::require_login,
        ));
    let app = protected(app, &csp, hosts);
    let incoming = access::Incoming::new(listener.tcp, listener.tls);
    let result = axum::serve(
        incoming,
        app.into_make_service_with_connect_info::<access::Peer>(),
    )
    .with_graceful_shutdown(async move { cancel.cancelled().await })
    .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin listener stopped");
    }
}

/// Every response carries the strict headers; requests to other host names are refused.
fn protected(app: Router, csp: &Arc<str>, hosts: Arc<(SocketAddr, Vec<String>)>) -> Router {
    let csp = csp.clone();
    app.layer(axum::middleware::map_response(move |response| {
        let csp = csp.clone();
        async move { secure_headers(response, &csp) }
    }))
    .layer(axum::middleware::from_fn_with_state(
        hosts,
        access::check_host,
    ))
}

/// Providers send the browser back to `http://127.0.0.1:PORT/`. When this listener can't
/// receive that itself (HTTPS, or bound to [::1] or another address), a plain loopback
/// listener of its own takes the redirects; it answers nothing else.
async fn callback_listener(bind: SocketAddr, tls: bool) -> Option<TcpListener> {
    let reachable = match bind.ip() {
        std::net::IpAddr::V4(ip) => ip == std::net::Ipv4Addr::LOCALHOST || ip.is_unspecified(),
        std::net::IpAddr::V6(_) => false,
    };
    if reachable && !tls {
        return None;
    }
    match crate::oauth::flow::bind_loopback().await {
        Ok(l) => {
            if let Ok(at) = l.local_addr() {
                tracing::info!(bind = %at, "admin listener: authorization redirects arrive here");
            }
            Some(l)
        }
        Err(e) => {
            tracing::warn!(error = %e, "admin listener: cannot listen on 127.0.0.1 for authorization redirects; paste the redirected address on the status page instead");
            None
        }
    }
}

/// The loopback callback listener's one page.
async fn callback_page(
    State(admin): State<Arc<Admin>>,
    axum::extract::Query(params): axum::extract::Query<Vec<(String, String)>>,
) -> axum::response::Response {
    if params.iter().any(|(k, _)| k == "state") {
        return authorized(&admin, &params).await;
    }
    let text = "This address only receives authorizations started from the status page.";
    problem(StatusCode::NOT_FOUND, text)
}

fn routes() -> Router<Arc<Admin>> {
    Router::new()
        .route("/", get(status_page))
        .route("/passwords/add", axum::routing::post(add_password))
        .route("/passwords/remove", axum::routing::post(remove_password))
        .route("/authorize", axum::routing::post(authorize))
        .route(
            "/authorize/finish",
            axum::routing::post(finish_authorization),
        )
        .route(
            "/app.js",
            get(|| asset("text/javascript; charset=utf-8", page::SCRIPT)),
        )
        .route(
            "/app.css",
            get(|| asset("text/css; charset=utf-8", page::STYLE)),
        )
        // Browsers ask for it; an empty answer keeps their consoles clean.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/live.json", get(live_json))
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
}

/// Every response: the strict CSP, no sniffing, no referrer, no framing.
fn secure_headers(mut response: axum::response::Response, csp: &str) -> axum::response::Response {
    let headers = response.headers_mut();
    if let Ok(value) = header::HeaderValue::from_str(csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, value);
    }
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, header::HeaderValue::from_static(value));
    }
    response
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, content_type)], body)
}

async fn status_page(
    State(admin): State<Arc<Admin>>,
    axum::extract::Query(params): axum::extract::Query<Vec<(String, String)>>,
) -> axum::response::Response {
    // The provider sends the browser back here (the redirect address is this listener's).
    if params.iter().any(|(k, _)| k == "state") {
        return authorized(&admin, &params).await;
    }
    let rows = (admin.views.accounts)();
    let html = page::render(
        &rows,
        &live(&admin.views),
        crate::clock::now_unix(),
        &admin.csrf,
    );
    axum::response::Html(html).into_response()
}

/// What the page updates every few seconds without a reload.
fn live(views: &Views) -> page::Live {
    page::Live {
        sessions: views.activity.open_sessions(),
        events: views.activity.recent(),
        listeners: (views.listeners)()
            .iter()
            .map(|(protocol, addr)| format!("{protocol} on {addr}"))
            .collect(),
    }
}

async fn live_json(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(live(&admin.views)),
    )
}

fn problem(status: StatusCode, text: &str) -> axum::response::Response {
    (status, axum::response::Html(page::problem(text))).into_response()
}

/// Why an action stopped: its status and the words the page shows.
struct Problem(StatusCode, String);

impl IntoResponse for Problem {
    fn into_response(self) -> axum::response::Response {
        problem(self.0, &self.1)
    }
}

/// "Authorize" / "Re-authorize": send the browser to the provider's consent page, with PKCE
/// and a state this listener remembers; the provider sends it back to `/`.
async fn authorize(
    State(admin): State<Arc<Admin>>,
    axum::Form(form): axum::Form<PasswordForm>,
) -> axum::response::Response {
    let account = match checked(&admin, &form) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let client = match (admin.views.oauth_client)(&account) {
        Ok(c) => c,
        Err(e) => return problem(StatusCode::CONFLICT, &e),
    };
    let attempt = crate::oauth::flow::Attempt::new(&account.email, client, admin.port);
    let url = match attempt.authorization_url() {
        Ok(u) => u,
        Err(e) => return problem(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let mut pending = admin.pending.lock().unwrap_or_else(|e| e.into_inner());
    pending.retain(|_, p| p.started.elapsed() < AUTHORIZE_WAIT);
    if pending.len() >= MAX_PENDING {
        let text = "Too many authorizations are waiting for their browser; finish or abandon one and try again.";
        return problem(StatusCode::TOO_MANY_REQUESTS, text);
    }
    pending.insert(
        attempt.state.clone(),
        Pending {
            attempt,
            key: account.key(),
            started: std::time::Instant::now(),
        },
    );
    tracing::info!(account = %account.email, "authorization started from the status page");
    axum::response::Redirect::to(&url).into_response()
}

/// The browser came back from the provider: exchange the code and store the grant.
async fn authorized(admin: &Admin, params: &[(String, String)]) -> axum::response::Response {
    let state = params
        .iter()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let waiting = admin
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(state)
        .filter(|p| p.started.elapsed() < AUTHORIZE_WAIT);
    let Some(waiting) = waiting else {
        let text =
            "This authorization is unknown or has expired; start it again from the status page.";
        return problem(StatusCode::BAD_REQUEST, text);
    };
    let attempt = &waiting.attempt;
    let code = match crate::oauth::flow::code_from_redirect(attempt, params) {
        Some(Ok(code)) => code,
        Some(Err(e)) => return problem(StatusCode::BAD_REQUEST, &e.to_string()),
        None => {
            return problem(
                StatusCode::BAD_REQUEST,
                "The provider sent neither a code nor an error.",
            )
        }
    };
    let granted = match crate::oauth::flow::finish(attempt, &code).await {
        Ok(g) => g,
        Err(e) => return problem(StatusCode::BAD_GATEWAY, &e.to_string()),
    };
    let key = waiting.key.clone();
    let saved = store_write(admin, move |store| {
        crate::registry::save_grant(
            store,
            &key,
            &granted.refresh_token,
            granted.refresh_token_expires_in,
        )
    })
    .await;
    match saved {
        Ok(Ok(())) => {
            tracing::info!(account = %attempt.email, "authorized from the status page");
            axum::response::Html(page::authorized(&attempt.email)).into_response()
        }
        Ok(Err(e)) => problem(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(died) => died.into_response(),
    }
}

/// The paste form's fields: the CSRF token and the address the browser ended at.
#[derive(serde::Deserialize)]
struct FinishForm {
    csrf: String,
    redirect: String,
}

/// The browser could not reach the redirect address (it is not on this machine): the person
/// pasted that address, whose state names the authorization to finish.
async fn finish_authorization(
    State(admin): State<Arc<Admin>>,
    axum::Form(form): axum::Form<FinishForm>,
) -> axum::response::Response {
    if let Err(e) = csrf_ok(&admin, &form.csrf) {
        return e.into_response();
    }
    let pasted = form.redirect.trim();
    let params = match crate::oauth::flow::pasted_query(pasted) {
        _ if pasted.len() > 8192 => Err("That address is too long to be a redirect.".to_string()),
        Some(Ok(params)) if params.iter().any(|(k, _)| k == "state") => Ok(params),
        Some(Err(why)) => Err(format!("{why}.")),
        _ => Err("Paste the whole address the browser ended at after you allowed access; it starts with http://127.0.0.1: and has state= and code= in it.".into()),
    };
    match params {
        Ok(params) => authorized(&admin, &params).await,
        Err(why) => problem(StatusCode::BAD_REQUEST, &why),
    }
}

/// A form's fields: the CSRF token, the account, the password label.
#[derive(serde::Deserialize)]
struct PasswordForm {
    csrf: String,
    account: String,
    #[serde(default)]
    label: String,
}

/// The account a form names, if the CSRF token is this process's and the account configured.
fn checked(admin: &Admin, form: &PasswordForm) -> Result<crate::config::AccountConfig, Problem> {
    csrf_ok(admin, &form.csrf)?;
    let registry = (admin.views.registry)();
    registry.lookup(&form.account).cloned().ok_or_else(|| {
        let text = format!("{} is not a configured account.", form.account);
        Problem(StatusCode::NOT_FOUND, text)
    })
}

/// Whether a form carries this process's CSRF token.
fn csrf_ok(admin: &Admin, token: &str) -> Result<(), Problem> {
    use subtle::ConstantTimeEq;
    if bool::from(token.as_bytes().ct_eq(admin.csrf.as_bytes())) {
        return Ok(());
    }
    let text = "This form is out of date or did not come from the status page; reload the page and try again.";
    Err(Problem(StatusCode::FORBIDDEN, text.into()))
}

/// A store write off the async threads; a task that died is a 500 page.
async fn store_write<T: Send + 'static>(
    admin: &Admin,
    write: impl FnOnce(&crate::store::Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<Result<T, crate::store::StoreError>, Problem> {
    let store = (admin.views.registry)().store().clone();
    tokio::task::spawn_blocking(move || write(&store))
        .await
        .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn add_password(
    State(admin): State<Arc<Admin>>,
    axum::Form(form): axum::Form<PasswordForm>,
) -> axum::response::Response {
    let account = match checked(&admin, &form) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let label = form.label.trim();
    if label.is_empty() || label.chars().count() > 64 || label.chars().any(char::is_control) {
        let text = "A label is 1 to 64 characters, such as laptop or scanner.";
        return problem(StatusCode::BAD_REQUEST, text);
    }
    let (key, label_owned) = (account.key(), label.to_string());
    let added = store_write(&admin, move |store| {
        crate::registry::add_password(store, &key, &label_owned)
    })
    .await;
    match added {
        Ok(Ok(password)) => {
            tracing::info!(account = %account.email, %label, "app password added from the status page");
            let html = page::new_password(&account.email, label, password.expose());
            (
                [(header::CACHE_CONTROL, "no-store")],
                axum::response::Html(html),
            )
                .into_response()
        }
        // Most likely a label the account already has.
        Ok(Err(e)) => problem(StatusCode::CONFLICT, &e.to_string()),
        Err(died) => died.into_response(),
    }
}

async fn remove_password(
    State(admin): State<Arc<Admin>>,
    axum::Form(form): axum::Form<PasswordForm>,
) -> axum::response::Response {
    let account = match checked(&admin, &form) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let (key, label) = (account.key(), form.label.clone());
    let removed = store_write(&admin, move |store| {
        crate::registry::remove_password(store, &key, &label)
    })
    .await;
    match removed {
        Ok(Ok(true)) => {
            tracing::info!(account = %account.email, label = %form.label, "app password removed from the status page");
            axum::response::Redirect::to("/").into_response()
        }
        Ok(Ok(false)) => {
            let text = format!(
                "{} has no password labelled {:?}.",
                account.email, form.label
            );
            problem(StatusCode::NOT_FOUND, &text)
        }
        Ok(Err(e)) => problem(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(died) => died.into_response(),
    }
}

async fn metrics(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    let views = &admin.views;
    crate::metrics::throttled_sources((views.throttled_sources)());
    let times = (views.token_times)();
    crate::metrics::token_times(&times, crate::clock::now_unix(), views.account_labels);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
}

async fn readyz(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    let views = &admin.views;
    let mut problems = Vec::new();
    let (bound, configured) = ((views.listeners)(), (views.configured_listeners)());
    if bound.len() < configured {
        problems.push(format!(
            "{} of {configured} listeners are bound",
            bound.len()
        ));
    }
    problems.extend((views.token_endpoints)());
    // A real read, not the registry's cached view: the probe is about the store now.
    let registry = (views.registry)();
    match tokio::task::spawn_blocking(move || registry.store().load().map(|_| ())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("the store cannot be read: {e}")),
        Err(e) => problems.push(format!("the store check failed: {e}")),
    }
    let listeners: Vec<_> = bound
        .iter()
        .map(|(protocol, addr)| serde_json::json!({"protocol": protocol, "bind": addr.to_string()}))
        .collect();
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({
            "ready": problems.is_empty(),
            "problems": problems,
            "listeners": listeners,
        })),
    )
}

//! `login`: the installed-app flow (Google's and Microsoft's are the same shape). Authorization code + PKCE (S256) with a random `state`,
//! redirected to a loopback listener on 127.0.0.1 (RFC 8252); a user without a browser on this
//! machine pastes the address the browser ended at instead. Then the code exchange, the checks
//! (refresh token present, Gmail scope granted) and one refresh to prove the grant works. The
//! oauth2 crate builds the authorization URL and the token requests.

use std::time::Duration;

use std::sync::Arc;

use oauth2::{
    AuthorizationCode, CsrfToken, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::token_endpoint::{self, GrantError, Granted, Sender};
use crate::config::OAuthClient;
use crate::provider::google::CONSOLE_CLIENT;
use crate::provider::Provider;
use crate::secret::Secret;

/// Browser requests answered at once; more connections are closed unread, so a local process
/// cannot tie up the listener (the redirect comes on one connection, a browser opens a few).
const MAX_BROWSER_CONNECTIONS: usize = 8;

/// RFC 7636 PKCE: a random verifier and its S256 challenge.
pub struct Pkce {
    verifier: Secret,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> Pkce {
        // 48 random bytes: a 64-character verifier (RFC 7636 §4.1 allows 43–128).
        let (_, verifier) = PkceCodeChallenge::new_random_sha256_len(48);
        Pkce::from_verifier(Secret::new(verifier.into_secret()))
    }

    pub fn from_verifier(verifier: Secret) -> Pkce {
        let challenge = s256(&verifier).as_str().to_string();
        Pkce {
            verifier,
            challenge,
        }
    }

    pub fn verifier(&self) -> &Secret {
        &self.verifier
    }
}

fn s256(verifier: &Secret) -> PkceCodeChallenge {
    PkceCodeChallenge::from_code_verifier_sha256(&PkceCodeVerifier::new(
        verifier.expose().to_string(),
    ))
}

impl Default for Pkce {
    fn default() -> Self {
        Pkce::new()
    }
}

/// One authorization attempt: what the authorization URL carries and the redirect must match.
pub struct Attempt {
    pub email: String,
    pub client: OAuthClient,
    /// `http://127.0.0.1:PORT` (Microsoft: `http://localhost:PORT`)
    pub redirect_uri: String,
    pub state: String,
    pub pkce: Pkce,
}

impl Attempt {
    pub fn new(email: &str, client: OAuthClient, port: u16) -> Attempt {
        Attempt {
            email: email.to_string(),
            redirect_uri: format!("http://{}:{port}", client.provider.loopback_host()),
            client,
            state: random_token(32),
            pkce: Pkce::new(),
        }
    }

    /// The address the user opens: Google's consent screen for this attempt.
    pub fn authorization_url(&self) -> Result<String, String> {
        let oauth = self.oauth2_client()?;
        let challenge = s256(self.pkce.verifier());
        let state = self.state.clone();
        let mut request = oauth
            .authorize_url(move || CsrfToken::new(state))
            .add_scopes(
                self.client
                    .scope
                    .split_whitespace()
                    .map(|s| Scope::new(s.to_string())),
            )
            .set_pkce_challenge(challenge)
            .add_extra_param("login_hint", &self.email);
        for (name, value) in self.client.provider.authorization_params() {
            request = request.add_extra_param(*name, *value);
        }
        Ok(request.url().0.into())
    }

    fn oauth2_client(&self) -> Result<token_endpoint::Oauth2Client, String> {
        let redirect = RedirectUrl::new(self.redirect_uri.clone())
            .map_err(|e| format!("redirect address {:?}: {e}", self.redirect_uri))?;
        Ok(token_endpoint::oauth2_client(&self.client)?.set_redirect_uri(redirect))
    }

    fn error(&self, kind: ErrorKind) -> LoginError {
        self.judge().error(kind)
    }

    fn judge(&self) -> Judge {
        Judge {
            email: self.email.clone(),
            state: self.state.clone(),
            provider: self.client.provider,
        }
    }
}

/// What deciding a redirect needs from an attempt (no secrets).
#[derive(Clone)]
struct Judge {
    email: String,
    state: String,
    provider: &'static dyn Provider,
}

impl Judge {
    fn error(&self, kind: ErrorKind) -> LoginError {
        LoginError {
            email: self.email.clone(),
            kind,
            provider: self.provider,
        }
    }
}

/// A finished login: the refresh token to store and the grant that proved it works.
#[derive(Debug)]
pub struct Authorized {
    pub refresh_token: Secret,
    /// When Google said the grant ends, if it did.
    pub refresh_token_expires_in: Option<Duration>,
    /// The verifying refresh's access token lifetime.
    pub access_token_expires_in: Duration,
}

#[derive(Debug)]
pub struct LoginError {
    pub email: String,
    pub kind: ErrorKind,
    /// Whose consent page and token endpoint answered.
    pub provider: &'static dyn Provider,
}

#[derive(Debug)]
pub enum ErrorKind {
    /// Google sent the browser back with `error=...`.
    Denied {
        code: String,
        description: Option<String>,
    },
    /// The redirect's `state` is not this attempt's.
    StateMismatch,
    TimedOut(Duration),
    Listen(String),
    /// The code exchange failed.
    Exchange(GrantError),
    NoRefreshToken,
    ScopeMissing {
        wanted: String,
        granted: String,
    },
    /// The new refresh token did not work on first use.
    Verify(GrantError),
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let email = &self.email;
        let again = format!("xoauth2-proxy login {email}");
        if self.provider.id() != crate::provider::google::Google.id() {
            return self.fmt_other(f);
        }
        match &self.kind {
            ErrorKind::Denied { code, description } => {
                let said = description
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default();
                match code.as_str() {
                    "access_denied" => write!(
                        f,
                        "Google reports access_denied{said}: the consent screen was declined, or {email} may not use this app. Run `{again}` again and choose Allow (with the Gmail box ticked). If Google said the app is blocked or not verified for this account, add {email} as a test user: Google Auth Platform > Audience > Test users > Add users"
                    ),
                    "admin_policy_enforced" => write!(
                        f,
                        "Google reports admin_policy_enforced{said}: a Workspace admin blocks this app or the Gmail scope for {email}; the admin must trust the app's client ID (Admin console > Security > Access and data control > API controls > Manage third-party app access), then run `{again}`"
                    ),
                    "org_internal" => write!(
                        f,
                        "Google reports org_internal{said}: the app is Internal to another organization; set its audience to External (Google Auth Platform > Audience) or use an account of that organization, then run `{again}`"
                    ),
                    "invalid_client" | "deleted_client" | "disabled_client" | "unauthorized_client" => write!(
                        f,
                        "Google reports {code}{said}: the OAuth client in the config is unknown, deleted or disabled; {CONSOLE_CLIENT}, then run `{again}`"
                    ),
                    "redirect_uri_mismatch" => write!(
                        f,
                        "Google reports redirect_uri_mismatch{said}: the OAuth client is not a Desktop app client, so Google does not accept the loopback address; {CONSOLE_CLIENT}, then run `{again}`"
                    ),
                    _ => write!(
                        f,
                        "Google reports {code}{said} instead of an authorization code; run `{again}` again"
                    ),
                }
            }
            ErrorKind::StateMismatch => write!(
                f,
                "the redirect carries a different state than this login sent: it belongs to another (older) login attempt, or it was forged. Nothing was stored; run `{again}` again and use the newest address"
            ),
            ErrorKind::TimedOut(d) => write!(
                f,
                "no answer from Google within {} s; nothing was stored. Run `{again}` again (--timeout SECS gives more time). Without a browser on this machine: open the address on any device, sign in, and paste here the address the browser ends at (it starts with http://127.0.0.1:)",
                d.as_secs()
            ),
            ErrorKind::Listen(e) => write!(
                f,
                "cannot listen on 127.0.0.1 for Google's redirect: {e}"
            ),
            ErrorKind::Exchange(e) => write!(
                f,
                "Google did not accept the authorization code: {e}"
            ),
            ErrorKind::NoRefreshToken => write!(
                f,
                "Google issued an access token but no refresh token, so access could not be kept. This happens when the OAuth client is not a Desktop app client or Google skipped the consent screen. Use a Desktop app client ({CONSOLE_CLIENT}), remove the app's access at https://myaccount.google.com/permissions, then run `{again}`"
            ),
            ErrorKind::ScopeMissing { wanted, granted } => write!(
                f,
                "the consent did not include Gmail access ({wanted}; granted: {granted}). Run `{again}` again and tick \"Read, compose, send and permanently delete all your email from Gmail\"; if it is not offered, add {wanted} under Google Auth Platform > Data Access"
            ),
            ErrorKind::Verify(e) => write!(
                f,
                "Google issued a refresh token but refused it on first use: {e}"
            ),
        }
    }
}

impl LoginError {
    /// The texts for providers other than Google, whose console steps are its own.
    fn fmt_other(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let email = &self.email;
        let again = format!("xoauth2-proxy login {email}");
        let who = self.provider.words().provider;
        let steps = self.provider.console_steps();
        match &self.kind {
            ErrorKind::Denied { code, description } => {
                let refusal = crate::provider::Refusal {
                    status: 400,
                    code: code.clone(),
                    description: description.clone(),
                };
                let meaning = self.provider.code_refusal(&refusal, "http://localhost");
                write!(f, "{who} refused the authorization: {meaning}; then run `{again}`")
            }
            ErrorKind::StateMismatch => write!(
                f,
                "the redirect carries a different state than this login sent: it belongs to another (older) login attempt, or it was forged. Nothing was stored; run `{again}` again and use the newest address"
            ),
            ErrorKind::TimedOut(d) => write!(
                f,
                "no answer from {who} within {} s; nothing was stored. Run `{again}` again (--timeout SECS gives more time), or `{again} --device` to sign in on another device",
                d.as_secs()
            ),
            ErrorKind::Listen(e) => write!(f, "cannot listen on 127.0.0.1 for {who}'s redirect: {e}"),
            ErrorKind::Exchange(e) => write!(f, "{who} did not accept the authorization code: {e}"),
            ErrorKind::NoRefreshToken => write!(
                f,
                "{who} issued an access token but no refresh token, so access could not be kept: the consent must include offline_access. Run `{again}` again; if it repeats, {steps}"
            ),
            ErrorKind::ScopeMissing { wanted, granted } => write!(
                f,
                "the consent did not include every mail permission ({wanted}; granted: {granted}); {steps}, then run `{again}`"
            ),
            ErrorKind::Verify(e) => write!(
                f,
                "{who} issued a refresh token but refused it on first use: {e}"
            ),
        }
    }
}

impl std::error::Error for LoginError {}

/// Listen for Google's redirect on 127.0.0.1, on a port the OS picks.
pub async fn bind_loopback() -> std::io::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", 0)).await
}

/// Run the attempt to its end: wait for the code from the browser (`listener`) or from a
/// pasted line (`pasted`), at most `timeout`; exchange it; check and verify the grant.
/// `notice` receives hints for the user about pasted lines that were not usable.
pub async fn complete(
    attempt: &Attempt,
    listener: TcpListener,
    pasted: mpsc::Receiver<String>,
    timeout: Duration,
    notice: &(dyn Fn(&str) + Sync),
) -> Result<Authorized, LoginError> {
    let code = wait_for_code(attempt, listener, pasted, timeout, notice).await?;
    finish(attempt, &code).await
}

/// The code a redirect to this attempt's address carries (`None`: the request was no
/// redirect at all), checked against the attempt's state.
pub fn code_from_redirect(
    attempt: &Attempt,
    params: &[(String, String)],
) -> Option<Result<Secret, LoginError>> {
    evaluate(&attempt.judge(), params)
}

/// Exchange the code, check the grant, and prove the refresh token with one refresh.
pub async fn finish(attempt: &Attempt, code: &Secret) -> Result<Authorized, LoginError> {
    let http = token_endpoint::http_client().map_err(|e| {
        attempt.error(ErrorKind::Exchange(GrantError::Temporary {
            detail: e,
            retry_after: None,
        }))
    })?;
    let granted = exchange(&http, attempt, code).await?;
    let Some(refresh_token) = granted.refresh_token.clone() else {
        return Err(attempt.error(ErrorKind::NoRefreshToken));
    };
    check_scope(attempt, &granted)?;
    let provider = attempt.client.provider;
    let verified = token_endpoint::refresh(&http, &attempt.client, &refresh_token, |r| {
        provider.refresh_refusal(r)
    })
    .await
    .map_err(|e| attempt.error(ErrorKind::Verify(e)))?;
    check_scope(attempt, &verified)?;
    Ok(Authorized {
        // Should the verifying refresh rotate the token, the new one is the one that lives.
        refresh_token: verified.refresh_token.unwrap_or(refresh_token),
        refresh_token_expires_in: granted.refresh_token_expires_in,
        access_token_expires_in: verified.expires_in,
    })
}

fn check_scope(attempt: &Attempt, granted: &Granted) -> Result<(), LoginError> {
    let wanted = &attempt.client.scope;
    match &granted.scope {
        Some(scope) if !crate::config::scope_covered(wanted, scope) => {
            Err(attempt.error(ErrorKind::ScopeMissing {
                wanted: wanted.clone(),
                granted: scope.clone(),
            }))
        }
        _ => Ok(()),
    }
}

/// The authorization_code grant with the PKCE verifier.
async fn exchange(
    http: &reqwest::Client,
    attempt: &Attempt,
    code: &Secret,
) -> Result<Granted, LoginError> {
    let oauth = attempt
        .oauth2_client()
        .map_err(|e| attempt.error(ErrorKind::Exchange(GrantError::Client(e))))?;
    let sender = Sender::new(http);
    let sent = oauth
        .exchange_code(AuthorizationCode::new(code.expose().to_string()))
        .set_pkce_verifier(PkceCodeVerifier::new(
            attempt.pkce.verifier().expose().to_string(),
        ))
        .request_async(&sender)
        .await;
    let provider = attempt.client.provider;
    sender
        .outcome(sent)
        .map_err(|e| e.into_grant_error(|r| provider.code_refusal(r, &attempt.redirect_uri)))
        .map_err(|e| attempt.error(ErrorKind::Exchange(e)))
}

/// What a redirect's query parameters decide, if anything.
fn evaluate(attempt: &Judge, params: &[(String, String)]) -> Option<Result<Secret, LoginError>> {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let code = get("code").filter(|c| !c.is_empty());
    let error = get("error").filter(|c| !c.is_empty());
    if code.is_none() && error.is_none() {
        return None;
    }
    if get("state") != Some(attempt.state.as_str()) {
        return Some(Err(attempt.error(ErrorKind::StateMismatch)));
    }
    if let Some(error) = error {
        return Some(Err(attempt.error(ErrorKind::Denied {
            code: error.to_string(),
            description: get("error_description").map(str::to_string),
        })));
    }
    code.map(|c| Ok(Secret::new(c)))
}

/// What a pasted line is.
enum Pasted {
    /// Decides the attempt (a code, or an error/state problem).
    Decided(Result<Secret, LoginError>),
    /// Not usable; tell the user why.
    Unusable(String),
}

/// The query parameters of a pasted redirect address, or of its query alone: `None` when the
/// text is neither, an error when it looks like an address but is not a complete one.
pub fn pasted_query(line: &str) -> Option<Result<Vec<(String, String)>, String>> {
    let text = pasted_text(line);
    let query = if text.contains("://") {
        match url::Url::parse(text) {
            Ok(url) => url.query().unwrap_or("").to_string(),
            Err(_) => {
                return Some(Err(
                    "that is not a complete address; copy the whole address bar".into(),
                ))
            }
        }
    } else if text.starts_with('?') || text.contains("code=") || text.contains("error=") {
        text.rsplit('?').next().unwrap_or(text).to_string()
    } else {
        return None;
    };
    Some(Ok(url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()))
}

/// A pasted line without the quotes or brackets some copies carry.
fn pasted_text(line: &str) -> &str {
    line.trim()
        .trim_matches(|c| c == '"' || c == '\'' || c == '<' || c == '>')
}

fn parse_pasted(attempt: &Attempt, line: &str) -> Pasted {
    let text = pasted_text(line);
    match pasted_query(text) {
        Some(Err(why)) => Pasted::Unusable(why),
        Some(Ok(params)) => match evaluate(&attempt.judge(), &params) {
            Some(decided) => Pasted::Decided(decided),
            None => Pasted::Unusable(
                "that address has no code= in it; paste the address the browser ended at after you allowed access (it starts with the redirect address this login printed)".into(),
            ),
        },
        // A bare code (some users copy just that). Its state cannot be checked, but the user
        // typed it here themselves, and it is useless without this attempt's PKCE verifier.
        None if !text.is_empty()
            && text.len() <= 2048
            && !text.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Pasted::Decided(Ok(Secret::new(text)))
        }
        None => Pasted::Unusable(
            "not an address or a code; paste the address the browser ended at".into(),
        ),
    }
}

async fn wait_for_code(
    attempt: &Attempt,
    listener: TcpListener,
    mut pasted: mpsc::Receiver<String>,
    timeout: Duration,
    notice: &(dyn Fn(&str) + Sync),
) -> Result<Secret, LoginError> {
    let (tx, mut from_browser) = mpsc::channel::<Result<Secret, LoginError>>(4);
    let judge = Arc::new(attempt.judge());
    let room = Arc::new(Semaphore::new(MAX_BROWSER_CONNECTIONS));
    let accepting = AbortOnDrop(tokio::spawn(async move {
        // Each browser request gets its own task, so a stalled one does not block the next.
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = room.clone().try_acquire_owned() else {
                continue;
            };
            let tx = tx.clone();
            let judge = judge.clone();
            tokio::spawn(async move {
                if let Some(decided) = answer_browser(tcp, &judge).await {
                    let _ = tx.send(decided).await;
                }
                drop(permit);
            });
        }
    }));
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut stdin_open = true;
    let result = loop {
        tokio::select! {
            Some(decided) = from_browser.recv() => break decided,
            line = pasted.recv(), if stdin_open => match line {
                None => stdin_open = false,
                Some(line) if line.trim().is_empty() => {}
                Some(line) => match parse_pasted(attempt, &line) {
                    Pasted::Decided(decided) => break decided,
                    Pasted::Unusable(why) => notice(&why),
                },
            },
            _ = &mut deadline => break Err(attempt.error(ErrorKind::TimedOut(timeout))),
        }
    };
    drop(accepting);
    result
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Read one request from the browser, answer it with a small page, and return what it decided.
/// A request with another attempt's `state` (stale or forged) gets an error page and decides
/// nothing: the right redirect may still come.
async fn answer_browser(mut tcp: TcpStream, attempt: &Judge) -> Option<Result<Secret, LoginError>> {
    let mut buf = Vec::with_capacity(2048);
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 2048];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    })
    .await;
    if !matches!(read, Ok(true)) {
        return None;
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let params: Vec<(String, String)> = match url::Url::parse(&format!("http://127.0.0.1{target}"))
    {
        Ok(url) if method == "GET" && target.starts_with('/') => url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
        _ => Vec::new(),
    };
    let decided = evaluate(attempt, &params);
    let (status, title, text) = page(&decided, attempt);
    let decided =
        decided.filter(|d| !matches!(d, Err(e) if matches!(e.kind, ErrorKind::StateMismatch)));
    let body = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title}</title></head><body><h1>{title}</h1><p>{}</p></body></html>",
        html_escape(&text)
    );
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = tcp.write_all(response.as_bytes()).await;
        let _ = tcp.shutdown().await;
    })
    .await;
    decided
}

/// The page a browser request gets: status, title and text.
fn page(
    decided: &Option<Result<Secret, LoginError>>,
    attempt: &Judge,
) -> (&'static str, &'static str, String) {
    match decided {
        None => (
            "404 Not Found",
            "xoauth2-proxy",
            format!(
                "This address is xoauth2-proxy's login listener; it waits for {} to send the browser back here.",
                attempt.provider.words().provider
            ),
        ),
        Some(Ok(_)) => (
            "200 OK",
            "Authorization received",
            format!(
                "xoauth2-proxy received the authorization for {}. You can close this tab; the terminal shows how it ends.",
                attempt.email
            ),
        ),
        Some(Err(e)) if matches!(e.kind, ErrorKind::StateMismatch) => (
            "400 Bad Request",
            "Not this login's address",
            "This address carries another login attempt's state: it is an older attempt's, or forged, and nothing was done with it. The login in the terminal is still waiting: use the newest address it printed.".to_string(),
        ),
        Some(Err(e)) => ("400 Bad Request", "Authorization failed", e.to_string()),
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt() -> Attempt {
        Attempt::new(
            "alice@gmail.com",
            OAuthClient {
                provider: &crate::provider::google::Google,
                client_id: "id.apps.googleusercontent.com".into(),
                client_secret: Some("s".into()),
                auth_url: "https://accounts.google.com/o/oauth2/v2/auth".into(),
                token_url: "https://oauth2.googleapis.com/token".into(),
                scope: "https://mail.google.com/".into(),
            },
            53682,
        )
    }

    #[test]
    fn pkce_challenge_matches_the_rfc_7636_vector() {
        let p = Pkce::from_verifier("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into());
        assert_eq!(p.challenge, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        let fresh = Pkce::new();
        assert_eq!(fresh.verifier().expose().len(), 64);
        assert_ne!(fresh.verifier().expose(), Pkce::new().verifier().expose());
    }

    #[test]
    fn authorization_url_asks_for_offline_consent_with_pkce_and_state() {
        let a = attempt();
        let url = url::Url::parse(&a.authorization_url().unwrap()).unwrap();
        assert_eq!(url.host_str(), Some("accounts.google.com"));
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["client_id"], "id.apps.googleusercontent.com");
        assert_eq!(q["redirect_uri"], "http://127.0.0.1:53682");
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["scope"], "https://mail.google.com/");
        assert_eq!(q["code_challenge"], a.pkce.challenge);
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["state"], a.state);
        assert_eq!(q["login_hint"], "alice@gmail.com");
        assert_eq!(q["access_type"], "offline");
        assert_eq!(q["prompt"], "consent");
        assert!(!q.contains_key("client_secret"));
        assert!(!url.as_str().contains(a.pkce.verifier().expose()));
    }

    #[test]
    fn pasted_redirect_address_or_bare_code_is_accepted() {
        let a = attempt();
        let line = format!(
            "http://127.0.0.1:53682/?state={}&code=4/0AQSTgQ&scope=https://mail.google.com/",
            a.state
        );
        match parse_pasted(&a, &line) {
            Pasted::Decided(Ok(code)) => assert_eq!(code.expose(), "4/0AQSTgQ"),
            _ => panic!("not accepted"),
        }
        match parse_pasted(&a, "  4/0AQSTgQ-bare  ") {
            Pasted::Decided(Ok(code)) => assert_eq!(code.expose(), "4/0AQSTgQ-bare"),
            _ => panic!("bare code not accepted"),
        }
        match parse_pasted(&a, &format!("?code=abc&state={}", a.state)) {
            Pasted::Decided(Ok(code)) => assert_eq!(code.expose(), "abc"),
            _ => panic!("query not accepted"),
        }
    }

    #[test]
    fn pasted_address_with_another_state_or_an_error_is_refused_in_words() {
        let a = attempt();
        match parse_pasted(&a, "http://127.0.0.1:53682/?state=old&code=4/0A") {
            Pasted::Decided(Err(e)) => {
                assert!(matches!(e.kind, ErrorKind::StateMismatch));
                assert!(e.to_string().contains("another (older) login attempt"));
            }
            _ => panic!("wrong state accepted"),
        }
        let denied = format!(
            "http://127.0.0.1:53682/?state={}&error=access_denied",
            a.state
        );
        match parse_pasted(&a, &denied) {
            Pasted::Decided(Err(e)) => {
                let text = e.to_string();
                assert!(text.contains("access_denied"), "{text}");
                assert!(text.contains("Test users"), "{text}");
            }
            _ => panic!("error not reported"),
        }
        assert!(matches!(
            parse_pasted(&a, "http://127.0.0.1:53682/favicon.ico"),
            Pasted::Unusable(_)
        ));
        assert!(matches!(parse_pasted(&a, "two words"), Pasted::Unusable(_)));
    }

    #[test]
    fn every_explained_error_names_its_fix() {
        let a = attempt();
        for (code, fix) in [
            ("redirect_uri_mismatch", "Desktop app"),
            ("invalid_client", "Google Auth Platform > Clients"),
            ("admin_policy_enforced", "Admin console"),
            ("org_internal", "Audience"),
        ] {
            let text = a
                .error(ErrorKind::Denied {
                    code: code.into(),
                    description: None,
                })
                .to_string();
            assert!(text.contains(fix), "{code}: {text}");
        }
        let text = a.error(ErrorKind::NoRefreshToken).to_string();
        assert!(text.contains("myaccount.google.com/permissions"), "{text}");
        let text = crate::provider::Provider::code_refusal(
            &crate::provider::google::Google,
            &super::super::token_endpoint::Refusal {
                status: 400,
                code: "redirect_uri_mismatch".into(),
                description: None,
            },
            "http://127.0.0.1:1",
        )
        .to_string();
        assert!(text.contains("Desktop app"), "{text}");
    }
}

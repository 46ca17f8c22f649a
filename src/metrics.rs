//! Prometheus metrics, all named `xoauth2_proxy_*`. The core records what happens through the
//! small functions here (no handles threaded through sessions); the admin listener renders the
//! classic text exposition that Prometheus and `promtool check metrics` read. Labels are
//! protocols, directions and results, never a secret, and never an account unless the admin
//! opts in.

use std::sync::OnceLock;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::protocol::{Failure, Protocol};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Token requests take tens of milliseconds to seconds.
const REFRESH_BUCKETS: [f64; 10] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The process's metrics, installed on first use (one recorder per process; every proxy a test
/// starts in-process shares it). None if another recorder was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&REFRESH_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            gauge!("xoauth2_proxy_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Some(handle)
        })
        .as_ref()
}

/// The exposition text for `/metrics`.
pub fn render() -> String {
    handle().map(|h| h.render()).unwrap_or_default()
}

fn describe() {
    describe_gauge!(
        "xoauth2_proxy_build_info",
        "Always 1; the version label says which build is running."
    );
    describe_counter!(
        "xoauth2_proxy_connections_accepted_total",
        "Client connections accepted, by protocol."
    );
    describe_gauge!(
        "xoauth2_proxy_connections_active",
        "Client connections open now, by protocol."
    );
    describe_counter!(
        "xoauth2_proxy_connections_refused_total",
        "Client connections refused before a session (connection cap, PROXY header), by protocol and reason."
    );
    describe_gauge!(
        "xoauth2_proxy_access_token_expiry_seconds",
        "Seconds until the cached access token expires (with [admin] account_labels = true, per account)."
    );
    describe_gauge!(
        "xoauth2_proxy_refresh_token_age_seconds",
        "Age of the stored refresh token (with [admin] account_labels = true, per account)."
    );
    describe_gauge!(
        "xoauth2_proxy_access_token_expiry_min_seconds",
        "The soonest any cached access token expires, in seconds."
    );
    describe_gauge!(
        "xoauth2_proxy_refresh_token_age_max_seconds",
        "The oldest stored refresh token's age, in seconds (Google's Testing apps lose theirs at 7 days)."
    );
    describe_gauge!(
        "xoauth2_proxy_throttled_sources",
        "Client addresses whose wrong answers the brute-force throttle is slowing down now."
    );
    describe_counter!(
        "xoauth2_proxy_local_logins_total",
        "Local password checks, by protocol and result (ok, wrong_password, error)."
    );
    describe_counter!(
        "xoauth2_proxy_upstream_logins_total",
        "Logins to the provider after a good local password, by protocol, provider and result (ok, limit, not_authorized, rejected, refused, misconfigured, temporary)."
    );
    describe_counter!(
        "xoauth2_proxy_token_refreshes_total",
        "Token endpoint requests, by result (ok, revoked, misconfigured, temporary)."
    );
    describe_histogram!(
        "xoauth2_proxy_token_refresh_duration_seconds",
        "How long token endpoint requests took."
    );
    describe_counter!(
        "xoauth2_proxy_spliced_bytes_total",
        "Bytes passed through logged-in sessions, by protocol and direction (to_upstream, to_client)."
    );
}

/// A client connection was accepted: counted, and active until the guard drops.
pub fn connection_opened(protocol: Protocol) -> ActiveConnection {
    handle();
    counter!("xoauth2_proxy_connections_accepted_total", "protocol" => protocol.name())
        .increment(1);
    gauge!("xoauth2_proxy_connections_active", "protocol" => protocol.name()).increment(1.0);
    ActiveConnection(protocol)
}

/// Marks a connection active for as long as it lives.
pub struct ActiveConnection(Protocol);

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        gauge!("xoauth2_proxy_connections_active", "protocol" => self.0.name()).decrement(1.0);
    }
}

/// A connection was refused before its session began.
pub fn connection_refused(protocol: Protocol, reason: &'static str) {
    handle();
    counter!("xoauth2_proxy_connections_refused_total", "protocol" => protocol.name(), "reason" => reason)
        .increment(1);
}

/// A logged-in session ended having moved these bytes.
pub fn spliced(protocol: Protocol, to_upstream: u64, to_client: u64) {
    handle();
    counter!("xoauth2_proxy_spliced_bytes_total", "protocol" => protocol.name(), "direction" => "to_upstream")
        .increment(to_upstream);
    counter!("xoauth2_proxy_spliced_bytes_total", "protocol" => protocol.name(), "direction" => "to_client")
        .increment(to_client);
}

/// A local password check ended: `ok`, `wrong_password` or `error` (the store).
pub fn local_login(protocol: Protocol, result: &'static str) {
    handle();
    counter!("xoauth2_proxy_local_logins_total", "protocol" => protocol.name(), "result" => result)
        .increment(1);
}

/// A login that passed the local check ended upstream: `None` is success.
pub fn upstream_login(protocol: Protocol, provider: &'static str, failure: Option<&Failure>) {
    // Counted as local logins: the upstream was never asked.
    if matches!(
        failure,
        Some(Failure::BadCredentials | Failure::TooManySessions { .. })
    ) {
        return;
    }
    handle();
    counter!("xoauth2_proxy_upstream_logins_total", "protocol" => protocol.name(), "provider" => provider, "result" => login_result(failure))
        .increment(1);
}

/// The result name of a login attempt: `ok`, `wrong_password`, or the upstream failure class.
pub fn login_result(failure: Option<&Failure>) -> &'static str {
    match failure {
        None => "ok",
        Some(Failure::BadCredentials) => "wrong_password",
        Some(Failure::TooManySessions { .. }) => "limit",
        Some(Failure::NeverAuthorized { .. } | Failure::Revoked { .. }) => "not_authorized",
        Some(Failure::TokenRejected { .. }) => "rejected",
        Some(Failure::UpstreamRefused { .. }) => "refused",
        Some(Failure::Misconfigured { .. }) => "misconfigured",
        Some(Failure::Temporary { .. }) => "temporary",
    }
}

/// A token request ended with `result` after `seconds`.
pub fn token_refresh(result: &'static str, seconds: f64) {
    handle();
    counter!("xoauth2_proxy_token_refreshes_total", "result" => result).increment(1);
    histogram!("xoauth2_proxy_token_refresh_duration_seconds").record(seconds);
}

/// The throttle's count of addresses being slowed down, as of now.
pub fn throttled_sources(n: usize) {
    handle();
    gauge!("xoauth2_proxy_throttled_sources").set(n as f64);
}

/// One account's token times, unix seconds.
#[derive(Debug, Clone)]
pub struct TokenTimes {
    pub account: String,
    pub access_token_expires_at: Option<i64>,
    pub refresh_token_obtained_at: Option<i64>,
}

/// The per-account gauges as of `now`: labelled by account only when the admin opted in;
/// the soonest expiry and the oldest refresh token always.
pub fn token_times(times: &[TokenTimes], now: i64, account_labels: bool) {
    handle();
    let expiry = |t: &TokenTimes| t.access_token_expires_at.map(|at| (at - now) as f64);
    let age = |t: &TokenTimes| t.refresh_token_obtained_at.map(|at| (now - at) as f64);
    if account_labels {
        for t in times {
            let account = t.account.clone();
            if let Some(v) = expiry(t) {
                gauge!("xoauth2_proxy_access_token_expiry_seconds", "account" => account.clone())
                    .set(v);
            }
            if let Some(v) = age(t) {
                gauge!("xoauth2_proxy_refresh_token_age_seconds", "account" => account).set(v);
            }
        }
    }
    if let Some(min) = times.iter().filter_map(expiry).reduce(f64::min) {
        gauge!("xoauth2_proxy_access_token_expiry_min_seconds").set(min);
    }
    if let Some(max) = times.iter().filter_map(age).reduce(f64::max) {
        gauge!("xoauth2_proxy_refresh_token_age_max_seconds").set(max);
    }
}

//! `cargo bench --bench proxy`: the proxy's cost in throughput, login latency, bursts, idle
//! memory, token refreshes and CPU, measured in one run against a direct TLS connection to the
//! same upstream. Starts a minimal TLS mail upstream and the fake Google token endpoint in this
//! process, and the real `xoauth2-proxy serve` binary as a child process; prints a table (and
//! with `--json` the same numbers as JSON on stdout, the table then going to stderr).
//!
//! Options (after `--`): `--json`; `--quick` (fewer samples, shorter windows); `--secs S`
//! (throughput window, 1); `--rounds N` (throughput runs per route, best kept, 3); `--soak N`
//! (login-fetch-logout cycles through the proxy, with its memory and descriptors before and
//! after; 0 = skip, the default; 100000 for the hardening soak); `--samples N`
//! (login latency samples per route, 400); `--sessions N` (idle sessions, 10000, capped by the
//! descriptor limit); `--burst N` (1000); `--storm N` (1000); `--wrong N` (wrong-password
//! storm: logins with a wrong password, 16 at once, each from its own 127.x.y.z address, with
//! the proxy's memory before, at peak and after; 1000); `--message-mib N` (8); for
//! profiling `--only idle|burst|latency|redis|throughput|storm|wrong|soak`, `--transfer
//! imap_fetch|smtp_data|pop3_retr` and `--streams 1|16`. `XOAUTH2_PROXY_BIN=path` runs another
//! build of the proxy. Row 2b runs a second proxy on a private redis-server (`[store] kind =
//! "redis"`) when one is installed. Everything listens on 127.0.0.1 and every wait is bounded;
//! a watchdog ends the run after 15 minutes.

#[path = "../../tests/support/mod.rs"]
mod support;

mod client;
mod redis_store;
mod sys;
mod upstream;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::task::JoinSet;

use client::{login, transfer, Client, Proto, Route};
use support::{FakeGoogle, TestPki, CLIENT_ID, CLIENT_SECRET};
use upstream::Upstream;

const BENCH_USER: &str = "bench@example.com";
const STORM_USER: &str = "storm@example.com";
const PROXY_BIN: &str = env!("CARGO_BIN_EXE_xoauth2-proxy");
/// The whole run is abandoned (and the proxy killed) after this long.
const WATCHDOG: Duration = Duration::from_secs(15 * 60);

/// The running proxy's pid, for the watchdog.
static PROXY_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

struct Opts {
    json: bool,
    secs: f64,
    warmup: f64,
    rounds: usize,
    samples: usize,
    sessions: usize,
    burst: usize,
    storm: usize,
    wrong: usize,
    soak: usize,
    message_mib: usize,
    /// Run only this phase (for profiling).
    only: Option<String>,
    /// Throughput: only this transfer (imap_fetch, smtp_data, pop3_retr) / stream count.
    transfer: Option<String>,
    streams: Option<usize>,
}

impl Opts {
    fn parse() -> Result<Opts, String> {
        let mut o = Opts {
            json: false,
            secs: 1.0,
            warmup: 0.3,
            rounds: 3,
            samples: 400,
            sessions: 10_000,
            burst: 1000,
            storm: 1000,
            wrong: 1000,
            soak: 0,
            message_mib: 8,
            only: None,
            transfer: None,
            streams: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut num = |name: &str| -> Result<f64, String> {
                args.next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|v| *v > 0.0)
                    .ok_or(format!("{name} needs a positive number"))
            };
            match a.as_str() {
                "--bench" => {}
                "--json" => o.json = true,
                "--only" => o.only = args.next(),
                "--transfer" => o.transfer = args.next(),
                "--streams" => o.streams = Some(num("--streams")? as usize),
                "--quick" => {
                    o.secs = 0.5;
                    o.rounds = 1;
                    o.samples = 100;
                    o.sessions = 2000;
                }
                "--secs" => o.secs = num("--secs")?,
                "--rounds" => o.rounds = num("--rounds")? as usize,
                "--samples" => o.samples = num("--samples")? as usize,
                "--sessions" => o.sessions = num("--sessions")? as usize,
                "--burst" => o.burst = num("--burst")? as usize,
                "--storm" => o.storm = num("--storm")? as usize,
                "--wrong" => o.wrong = num("--wrong")? as usize,
                "--soak" => o.soak = num("--soak")? as usize,
                "--message-mib" => o.message_mib = num("--message-mib")? as usize,
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(o)
    }
}

fn progress(what: &str) {
    eprintln!("bench: {what}");
}

fn main() {
    let opts = match Opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}\nusage: cargo bench --bench proxy -- [--json] [--quick] [--secs S] [--rounds N] [--samples N] [--sessions N] [--burst N] [--storm N] [--wrong N] [--soak N] [--message-mib N] [--only idle|burst|latency|redis|throughput|storm|wrong|soak] [--transfer imap_fetch|smtp_data|pop3_retr] [--streams 1|16]");
            std::process::exit(2);
        }
    };
    let nofile = sys::raise_nofile_limit();
    std::thread::spawn(|| {
        std::thread::sleep(WATCHDOG);
        let pid = PROXY_PID.load(Ordering::Relaxed);
        if pid != 0 {
            // SAFETY: signalling our own child by its pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        eprintln!("bench: gave up after {} s", WATCHDOG.as_secs());
        std::process::exit(1);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = match runtime.block_on(run(&opts, nofile)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench: failed: {e}");
            std::process::exit(1);
        }
    };
    let table = render(&report);
    if opts.json {
        eprint!("{table}");
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{table}");
    }
}

/// The proxy binary running as a child process with a config of its own.
struct ProxyProcess {
    child: Child,
    imap: SocketAddr,
    smtp: SocketAddr,
    pop3: SocketAddr,
    log: PathBuf,
}

impl ProxyProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn start(dir: &Path, config: &Path, addrs: [SocketAddr; 3]) -> Result<ProxyProcess, String> {
        let log = dir.join("proxy.log");
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        // XOAUTH2_PROXY_BIN runs another build (to compare before/after a change).
        let bin = std::env::var_os("XOAUTH2_PROXY_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(PROXY_BIN));
        let child = Command::new(&bin)
            .args(["serve", "-c"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        PROXY_PID.store(child.id(), Ordering::Relaxed);
        Ok(ProxyProcess {
            child,
            imap: addrs[0],
            smtp: addrs[1],
            pop3: addrs[2],
            log,
        })
    }

    /// Wait until the IMAP listener greets.
    async fn ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(format!("proxy exited ({status}):\n{log}"));
            }
            let route = Route::Proxied {
                addr: self.imap,
                password: String::new(),
            };
            if let Ok(Ok(mut c)) =
                tokio::time::timeout(Duration::from_secs(1), Client::connect(&route, 256)).await
            {
                if c.line().await.is_ok_and(|l| l.starts_with("* OK")) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("proxy did not start listening within 20 s".into())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        PROXY_PID.store(0, Ordering::Relaxed);
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Loopback ports free right now (held together so they differ).
fn free_ports() -> Result<[SocketAddr; 3], String> {
    let l: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    let a: Vec<SocketAddr> = l
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    Ok([a[0], a[1], a[2]])
}

fn config_text(
    google: &FakeGoogle,
    pki: &TestPki,
    up: &Upstream,
    addrs: [SocketAddr; 3],
) -> String {
    let mut text = format!(
        "state_dir = \"state\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[providers.google]\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\ntoken_url = \"{}\"\nauth_url = \"{}\"\n\n[limits]\nmax_connections = 20000\nimap_connections_per_account = 20000\nmax_pending_per_source = 20000\npreauth_timeout_secs = 60\nupstream_timeout_secs = 30\nshutdown_grace_secs = 1\n",
        pki.cert_pem_path.display(),
        pki.key_pem_path.display(),
        google.token_url,
        google.auth_url,
    );
    for (proto, bind, upstream) in [
        ("imap", addrs[0], up.imap),
        ("smtp", addrs[1], up.smtp),
        ("pop3", addrs[2], up.pop3),
    ] {
        text.push_str(&format!(
            "\n[[listener]]\nprotocol = \"{proto}\"\nbind = \"{bind}\"\nlocal_tls = \"none\"\nupstream = \"{upstream}\"\nupstream_tls = \"implicit\"\nupstream_ca = \"{}\"\n",
            pki.ca_pem_path.display()
        ));
    }
    for user in [BENCH_USER, STORM_USER] {
        text.push_str(&format!("\n[[account]]\nemail = \"{user}\"\n"));
    }
    text
}

/// Store a refresh token the fake knows and a fresh app password for `user`; returns it.
fn authorize(config: &Path, google: &FakeGoogle, user: &str) -> Result<String, String> {
    use xoauth2_proxy::secret::Secret;
    let config = xoauth2_proxy::config::Config::load(config).map_err(|e| e.to_string())?;
    let store = xoauth2_proxy::store::Store::open(&config.state_dir, &config.store)
        .map_err(|e| e.to_string())?;
    let refresh = format!("1//bench-refresh-{user}");
    google.add_refresh_token(&refresh, user);
    xoauth2_proxy::registry::save_refresh_token(
        &store,
        &xoauth2_proxy::account::AccountKey::new(user),
        &Secret::from(refresh.as_str()),
    )
    .map_err(|e| e.to_string())?;
    let pw = xoauth2_proxy::registry::add_password(
        &store,
        &xoauth2_proxy::account::AccountKey::new(user),
        "bench",
    )
    .map_err(|e| e.to_string())?;
    Ok(pw.expose().to_string())
}

/// Everything the phases share.
struct Env {
    google: FakeGoogle,
    upstream: Upstream,
    proxy: ProxyProcess,
    client_tls: Arc<rustls::ClientConfig>,
    message: Arc<Vec<u8>>,
    password: String,
    storm_password: String,
    token: String,
}

impl Env {
    fn route(&self, proto: Proto, proxied: bool) -> Route {
        let (up, local) = match proto {
            Proto::Imap => (self.upstream.imap, self.proxy.imap),
            Proto::Smtp => (self.upstream.smtp, self.proxy.smtp),
            Proto::Pop3 => (self.upstream.pop3, self.proxy.pop3),
        };
        if proxied {
            Route::Proxied {
                addr: local,
                password: self.password.clone(),
            }
        } else {
            Route::Direct {
                addr: up,
                tls: self.client_tls.clone(),
                token: self.token.clone(),
            }
        }
    }
}

async fn run(opts: &Opts, nofile: u64) -> Result<Value, String> {
    let started = Instant::now();
    let pki = TestPki::new();
    let google = FakeGoogle::start().await;
    let message = Arc::new(upstream::make_message(opts.message_mib << 20));
    let upstream = Upstream::start(pki.server_config(), google.shared(), message.clone())
        .await
        .map_err(|e| format!("cannot start the upstream: {e}"))?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let addrs = free_ports()?;
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(&google, &pki, &upstream, addrs))
        .map_err(|e| e.to_string())?;
    let password = authorize(&config, &google, BENCH_USER)?;
    let storm_password = authorize(&config, &google, STORM_USER)?;
    let mut proxy = ProxyProcess::start(dir.path(), &config, addrs)?;
    proxy.ready().await?;
    let token = google.mint_access_token(BENCH_USER, Duration::from_secs(6 * 3600));
    let env = Env {
        google,
        upstream,
        proxy,
        client_tls: pki.client_config(),
        message,
        password,
        storm_password,
        token,
    };
    // Warm the proxy's password cache and token for the bench account.
    for proto in Proto::ALL {
        login(proto, &env.route(proto, true), BENCH_USER, 1024)
            .await
            .map_err(|e| format!("warm-up login ({proto:?}) through the proxy failed: {e}"))?;
        login(proto, &env.route(proto, false), BENCH_USER, 1024)
            .await
            .map_err(|e| format!("warm-up direct login ({proto:?}) failed: {e}"))?;
    }

    // Idle sessions first, while the proxy's heap holds nothing from bulk transfers.
    let want = |phase: &str| opts.only.as_deref().is_none_or(|o| o == phase);
    let idle = if want("idle") {
        phase_idle(&env, opts.sessions, nofile).await?
    } else {
        Value::Null
    };
    let burst = if want("burst") {
        phase_burst(&env, opts.burst).await?
    } else {
        Value::Null
    };
    let latency = if want("latency") {
        phase_latency(&env, opts.samples).await?
    } else {
        Value::Null
    };
    let redis = if want("redis") {
        redis_store::phase(&env, &pki, opts.samples).await?
    } else {
        Value::Null
    };
    let (throughput, cpu) = if want("throughput") {
        phase_throughput(&env, opts).await?
    } else {
        (Value::Null, Value::Null)
    };
    let storm = if want("storm") {
        phase_storm(&env, opts.storm).await?
    } else {
        Value::Null
    };
    let wrong = if opts.wrong > 0 && want("wrong") {
        phase_wrong_passwords(&env, opts.wrong).await?
    } else {
        Value::Null
    };
    let soak = if opts.soak > 0 && want("soak") {
        phase_soak(&env, opts.soak).await?
    } else {
        Value::Null
    };
    let log_lines = std::fs::read_to_string(&env.proxy.log)
        .map(|l| {
            l.lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .count()
        })
        .unwrap_or(0);
    Ok(json!({
        "machine": {
            "cpus": sys::cpus(),
            "nofile_limit": nofile,
        },
        "settings": {
            "message_bytes": env.message.len(),
            "throughput_window_secs": opts.secs,
            "throughput_rounds": opts.rounds,
        },
        "throughput": throughput,
        "login_latency": latency,
        "redis_store_latency": redis,
        "burst": burst,
        "idle_sessions": idle,
        "refresh_storm": storm,
        "wrong_password_storm": wrong,
        "soak": soak,
        "cpu": cpu,
        "proxy_warnings_logged": log_lines,
        "bench_secs": round(started.elapsed().as_secs_f64(), 1),
    }))
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

fn ms(d: Duration) -> f64 {
    round(d.as_secs_f64() * 1000.0, 3)
}

/// Nearest-rank percentile of sorted `v`.
fn percentile(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// 1 + 6: throughput and proxy CPU per GB

/// One measured window of one run.
struct Window {
    bytes: u64,
    secs: f64,
    /// CPU the proxy process used in the window (zero for direct runs).
    proxy_cpu: Duration,
    /// CPU this process (client and upstream) used in the window.
    bench_cpu: Duration,
}

async fn throughput_once(
    env: &Env,
    proto: Proto,
    proxied: bool,
    streams: usize,
    warmup: Duration,
    window: Duration,
) -> Result<Window, String> {
    let route = env.route(proto, proxied);
    let mut clients = Vec::with_capacity(streams);
    for _ in 0..streams {
        clients.push(
            login(proto, &route, BENCH_USER, 64 * 1024)
                .await
                .map_err(|e| format!("{} login failed: {e}", proto.transfer()))?,
        );
    }
    let counter = match proto {
        Proto::Smtp => env.upstream.sunk.clone(),
        _ => Arc::new(AtomicU64::new(0)),
    };
    let mut tasks = JoinSet::new();
    for c in clients {
        tasks.spawn(transfer(proto, c, env.message.clone(), counter.clone()));
    }
    tokio::time::sleep(warmup).await;
    let pid = env.proxy.pid();
    let (b0, t0, c0) = (
        counter.load(Ordering::Relaxed),
        Instant::now(),
        sys::cpu_time(pid).unwrap_or_default(),
    );
    let me0 = sys::cpu_time(std::process::id()).unwrap_or_default();
    tokio::time::sleep(window).await;
    let (b1, t1, c1) = (
        counter.load(Ordering::Relaxed),
        Instant::now(),
        sys::cpu_time(pid).unwrap_or_default(),
    );
    let me1 = sys::cpu_time(std::process::id()).unwrap_or_default();
    let mut failure = None;
    if let Some(Ok(Err(e))) = tasks.try_join_next() {
        failure = Some(e);
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(e) = failure {
        return Err(format!(
            "{} ({}) failed mid-run: {e}",
            proto.transfer(),
            if proxied { "proxied" } else { "direct" }
        ));
    }
    // Let the torn-down sessions finish before the next run.
    tokio::time::sleep(Duration::from_millis(150)).await;
    Ok(Window {
        bytes: b1 - b0,
        secs: (t1 - t0).as_secs_f64(),
        proxy_cpu: if proxied {
            c1.saturating_sub(c0)
        } else {
            Duration::ZERO
        },
        bench_cpu: me1.saturating_sub(me0),
    })
}

/// CPU and bytes summed over a row's runs of one route.
#[derive(Default)]
struct Tally {
    best_mb_s: f64,
    bytes: u64,
    bench_cpu: Duration,
    proxy_cpu: Duration,
    runs: Vec<f64>,
}

impl Tally {
    fn add(&mut self, w: &Window) {
        let mbs = w.bytes as f64 / w.secs / 1e6;
        self.best_mb_s = self.best_mb_s.max(mbs);
        self.runs.push(round(mbs, 1));
        self.bytes += w.bytes;
        self.bench_cpu += w.bench_cpu;
        self.proxy_cpu += w.proxy_cpu;
    }

    fn per_gb(&self, cpu: Duration) -> f64 {
        round(cpu.as_secs_f64() / (self.bytes as f64 / 1e9).max(1e-9), 3)
    }
}

async fn phase_throughput(env: &Env, opts: &Opts) -> Result<(Value, Value), String> {
    let warmup = Duration::from_secs_f64(opts.warmup);
    let window = Duration::from_secs_f64(opts.secs);
    let mut rows = Vec::new();
    let mut all_proxied = Tally::default();
    let mut all_direct = Tally::default();
    for proto in Proto::ALL {
        if opts.transfer.as_deref().is_some_and(|t| t != proto.key()) {
            continue;
        }
        for streams in [1usize, 16] {
            if opts.streams.is_some_and(|s| s != streams) {
                continue;
            }
            progress(&format!(
                "throughput: {} x{streams}, {} round(s)",
                proto.transfer(),
                opts.rounds
            ));
            let (mut direct, mut proxied) = (Tally::default(), Tally::default());
            for round in 0..opts.rounds.max(1) {
                // Alternate which goes first so a neighbour's load hits both alike.
                let order = if round % 2 == 0 {
                    [false, true]
                } else {
                    [true, false]
                };
                for via_proxy in order {
                    let w = throughput_once(env, proto, via_proxy, streams, warmup, window).await?;
                    if via_proxy {
                        proxied.add(&w);
                        all_proxied.add(&w);
                    } else {
                        direct.add(&w);
                        all_direct.add(&w);
                    }
                }
            }
            rows.push(json!({
                "transfer": proto.key(),
                "streams": streams,
                "direct_mb_s": round(direct.best_mb_s, 1),
                "proxied_mb_s": round(proxied.best_mb_s, 1),
                "ratio": round(proxied.best_mb_s / direct.best_mb_s.max(f64::MIN_POSITIVE), 3),
                "direct_runs_mb_s": direct.runs,
                "proxied_runs_mb_s": proxied.runs,
                "direct_client_upstream_cpu_s_per_gb": direct.per_gb(direct.bench_cpu),
                "proxied_client_upstream_cpu_s_per_gb": proxied.per_gb(proxied.bench_cpu),
                "proxy_cpu_s_per_gb": proxied.per_gb(proxied.proxy_cpu),
            }));
        }
    }
    let cpu_json = json!({
        "proxy_cpu_secs": round(all_proxied.proxy_cpu.as_secs_f64(), 2),
        "gb_spliced": round(all_proxied.bytes as f64 / 1e9, 2),
        "proxy_cpu_s_per_gb": all_proxied.per_gb(all_proxied.proxy_cpu),
        "direct_client_upstream_cpu_s_per_gb": all_direct.per_gb(all_direct.bench_cpu),
        "proxied_client_upstream_cpu_s_per_gb": all_proxied.per_gb(all_proxied.bench_cpu),
        "cpu_bound_ratio_ceiling": round(
            all_direct.per_gb(all_direct.bench_cpu)
                / (all_proxied.per_gb(all_proxied.bench_cpu)
                    + all_proxied.per_gb(all_proxied.proxy_cpu))
                .max(1e-9),
            3
        ),
    });
    Ok((Value::Array(rows), cpu_json))
}

// ---------------------------------------------------------------------------------------------
// 2: login latency

async fn phase_latency(env: &Env, samples: usize) -> Result<Value, String> {
    progress(&format!("login latency: {samples} samples per route"));
    let direct_route = env.route(Proto::Imap, false);
    let proxied_route = env.route(Proto::Imap, true);
    let mut direct = Vec::with_capacity(samples);
    let mut proxied = Vec::with_capacity(samples);
    let once = |route: Route| async move {
        let t = Instant::now();
        let c = login(Proto::Imap, &route, BENCH_USER, 1024)
            .await
            .map_err(|e| format!("login failed: {e}"))?;
        let took = t.elapsed();
        drop(c);
        Ok::<Duration, String>(took)
    };
    for _ in 0..20 {
        once(direct_route.clone()).await?;
        once(proxied_route.clone()).await?;
    }
    for i in 0..samples {
        if i % 2 == 0 {
            direct.push(once(direct_route.clone()).await?);
            proxied.push(once(proxied_route.clone()).await?);
        } else {
            proxied.push(once(proxied_route.clone()).await?);
            direct.push(once(direct_route.clone()).await?);
        }
    }
    direct.sort();
    proxied.sort();
    let (d50, d99) = (percentile(&direct, 50.0), percentile(&direct, 99.0));
    let (p50, p99) = (percentile(&proxied, 50.0), percentile(&proxied, 99.0));
    let diff = |a: Duration, b: Duration| round((a.as_secs_f64() - b.as_secs_f64()) * 1e3, 3);
    Ok(json!({
        "samples": samples,
        "direct_p50_ms": ms(d50),
        "direct_p99_ms": ms(d99),
        "proxied_p50_ms": ms(p50),
        "proxied_p99_ms": ms(p99),
        "overhead_p50_ms": diff(p50, d50),
        "overhead_p99_ms": diff(p99, d99),
    }))
}

// ---------------------------------------------------------------------------------------------
// 3: burst of connections

async fn phase_burst(env: &Env, n: usize) -> Result<Value, String> {
    progress(&format!("burst: {n} clients at once"));
    let route = Route::Proxied {
        addr: env.proxy.imap,
        password: String::new(),
    };
    let (go, wait) = tokio::sync::watch::channel(None::<Instant>);
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let route = route.clone();
        let mut wait = wait.clone();
        tasks.spawn(async move {
            let start = match wait.wait_for(|v| v.is_some()).await {
                Ok(v) => v.unwrap_or_else(Instant::now),
                Err(_) => return None,
            };
            let greeted = tokio::time::timeout(Duration::from_secs(10), async {
                let mut c = Client::connect(&route, 256).await.ok()?;
                let line = c.line().await.ok()?;
                line.starts_with("* OK").then_some(c)
            })
            .await
            .ok()
            .flatten()?;
            Some((start.elapsed(), greeted))
        });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = go.send(Some(Instant::now()));
    let mut times = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some((t, c))) = r {
            times.push(t);
            held.push(c);
        }
    }
    drop(held);
    times.sort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(json!({
        "clients": n,
        "greeted": times.len(),
        "all_greeted_ms": ms(times.last().copied().unwrap_or_default()),
        "p50_ms": ms(percentile(&times, 50.0)),
        "p99_ms": ms(percentile(&times, 99.0)),
    }))
}

// ---------------------------------------------------------------------------------------------
// 4: idle authenticated sessions

async fn phase_idle(env: &Env, requested: usize, nofile: u64) -> Result<Value, String> {
    // Each session is two descriptors in the proxy (client, upstream) and two here (client,
    // upstream's side); leave room for everything else.
    let fit = (nofile.saturating_sub(100) / 2) as usize;
    let n = requested.min(fit);
    progress(&format!(
        "idle sessions: {n} authenticated IMAP sessions{}",
        if n < requested {
            format!(" ({requested} requested; the descriptor limit {nofile} fits {fit})")
        } else {
            String::new()
        }
    ));
    let pid = env.proxy.pid();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = sys::rss_kib(pid).unwrap_or(0);
    let fds0 = sys::open_fds(pid).unwrap_or(0);
    let route = env.route(Proto::Imap, true);
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let sessions = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..32 {
        let (route, next, failures, sessions) = (
            route.clone(),
            next.clone(),
            failures.clone(),
            sessions.clone(),
        );
        workers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                if failures.load(Ordering::Relaxed) > 50 {
                    return;
                }
                match tokio::time::timeout(
                    Duration::from_secs(30),
                    login(Proto::Imap, &route, BENCH_USER, 256),
                )
                .await
                {
                    Ok(Ok(c)) => sessions.lock().unwrap_or_else(|e| e.into_inner()).push(c),
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let login_secs = started.elapsed().as_secs_f64();
    let held = sessions.lock().unwrap_or_else(|e| e.into_inner()).len();
    // Let the sessions settle into their idle state.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = sys::rss_kib(pid).unwrap_or(0);
    let fds1 = sys::open_fds(pid).unwrap_or(0);
    progress(&format!(
        "idle sessions: {held} held ({} failed) after {login_secs:.1} s; closing",
        failures.load(Ordering::Relaxed)
    ));
    drop(std::mem::take(
        &mut *sessions.lock().unwrap_or_else(|e| e.into_inner()),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && sys::open_fds(pid).unwrap_or(0) > fds0 + 8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let per = |total: f64| round(total / held.max(1) as f64, 2);
    Ok(json!({
        "requested": requested,
        "sessions": held,
        "failed": failures.load(Ordering::Relaxed),
        "logins_per_sec": round(held as f64 / login_secs, 0),
        "proxy_rss_before_kib": rss0,
        "proxy_rss_after_kib": rss1,
        "proxy_rss_kib_per_session": per(rss1.saturating_sub(rss0) as f64),
        "proxy_fds": fds1,
        "proxy_fds_per_session": per(fds1.saturating_sub(fds0) as f64),
    }))
}

// ---------------------------------------------------------------------------------------------
// 5: refresh storm

async fn phase_storm(env: &Env, n: usize) -> Result<Value, String> {
    progress(&format!("refresh storm: {n} logins with an expired token"));
    let route = Route::Proxied {
        addr: env.proxy.imap,
        password: env.storm_password.clone(),
    };
    // One login gets the account a token that expires in 2 s (and warms its password).
    env.google.set_expires_in(2);
    let primed = login(Proto::Imap, &route, STORM_USER, 1024).await;
    env.google.set_expires_in(3599);
    drop(primed.map_err(|e| format!("storm account login failed: {e}"))?);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = env.google.token_requests();

    let (go, wait) = tokio::sync::watch::channel(false);
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let route = route.clone();
        let mut wait = wait.clone();
        let password = env.storm_password.clone();
        tasks.spawn(async move {
            let mut c = tokio::time::timeout(Duration::from_secs(10), async {
                let mut c = Client::connect(&route, 512).await.ok()?;
                c.line().await.ok()?;
                Some(c)
            })
            .await
            .ok()
            .flatten()?;
            wait.wait_for(|v| *v).await.ok()?;
            c.send(format!("s1 LOGIN {STORM_USER} {password}\r\n").as_bytes())
                .await
                .ok()?;
            let done = tokio::time::timeout(Duration::from_secs(30), c.until("s1 "))
                .await
                .ok()?
                .ok()?;
            Some((done.starts_with("s1 OK"), c))
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let _ = go.send(true);
    let mut ok = 0;
    let mut held = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some((success, c))) = r {
            ok += usize::from(success);
            held.push(c);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    drop(held);
    Ok(json!({
        "logins": n,
        "succeeded": ok,
        "token_requests": env.google.token_requests() - before,
        "secs": round(secs, 2),
    }))
}

// ---------------------------------------------------------------------------------------------
// 7: wrong-password storm

/// The proxy's RSS after it has been idle a moment: the lowest of a few samples (KiB).
async fn idle_rss_kib(pid: u32) -> u64 {
    let mut lowest = u64::MAX;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        lowest = lowest.min(sys::rss_kib(pid).unwrap_or(0));
    }
    lowest
}

async fn phase_wrong_passwords(env: &Env, n: usize) -> Result<Value, String> {
    const PARALLEL: usize = 16;
    progress(&format!(
        "wrong-password storm: {n} wrong logins, {PARALLEL} at once"
    ));
    let pid = env.proxy.pid();
    let rss0 = idle_rss_kib(pid).await;
    let addr = env.proxy.imap;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for k in 0..PARALLEL {
        tasks.spawn(async move {
            let mut refused = 0;
            for i in (k..n).step_by(PARALLEL) {
                // Unknown users count against their source only, and each has its own.
                let user = format!("nobody-{i}@example.com");
                let source = support::storm::source(30, i);
                let line = support::storm::imap_login_from(addr, source, user.as_bytes()).await?;
                refused += usize::from(line.starts_with("a1 NO"));
            }
            Ok::<usize, String>(refused)
        });
    }
    let mut peak = rss0;
    let mut refused = 0;
    while !tasks.is_empty() {
        peak = peak.max(sys::rss_kib(pid).unwrap_or(0));
        let next = tokio::time::timeout(Duration::from_millis(50), tasks.join_next());
        if let Ok(Some(r)) = next.await {
            refused += r.map_err(|e| e.to_string())??;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let rss1 = idle_rss_kib(pid).await;
    Ok(json!({
        "logins": n,
        "parallel": PARALLEL,
        "refused": refused,
        "secs": round(secs, 2),
        "proxy_rss_before_kib": rss0,
        "proxy_rss_peak_kib": peak,
        "proxy_rss_after_kib": rss1,
    }))
}

// ---------------------------------------------------------------------------------------------
// the table

// ---------------------------------------------------------------------------------------------
// soak: many short sessions; the proxy must give back what they used

/// One IMAP session through the proxy: log in, fetch the small message, log out.
async fn soak_cycle(route: &Route) -> Result<(), String> {
    let mut c = login(Proto::Imap, route, BENCH_USER, 8192)
        .await
        .map_err(|e| format!("login: {e}"))?;
    let step = async {
        c.send(b"f FETCH 2 BODY[]\r\n").await?;
        let done = c.until("f ").await?;
        if !done.starts_with("f OK") {
            return Err(std::io::Error::other(format!("fetch: {done}")));
        }
        c.send(b"l LOGOUT\r\n").await?;
        let bye = c.until("l ").await?;
        if !bye.starts_with("l OK") {
            return Err(std::io::Error::other(format!("logout: {bye}")));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), step)
        .await
        .map_err(|_| "cycle took over 30 s".to_string())?
        .map_err(|e| e.to_string())
}

async fn phase_soak(env: &Env, n: usize) -> Result<Value, String> {
    progress(&format!(
        "soak: {n} login-fetch-logout cycles through the proxy"
    ));
    let pid = env.proxy.pid();
    let route = env.route(Proto::Imap, true);
    // Warm up first: allocator pools, the password cache and the token are then in place, so
    // "before" is the steady state the proxy must return to.
    for _ in 0..200 {
        soak_cycle(&route).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = sys::rss_kib(pid).unwrap_or(0);
    let fds0 = sys::open_fds(pid).unwrap_or(0);
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..16 {
        let (route, next, failures, first_error) = (
            route.clone(),
            next.clone(),
            failures.clone(),
            first_error.clone(),
        );
        workers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                if failures.load(Ordering::Relaxed) > 100 {
                    return;
                }
                if let Err(e) = soak_cycle(&route).await {
                    failures.fetch_add(1, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                }
            }
        });
    }
    let mut peak_rss = 0;
    while !workers.is_empty() {
        tokio::select! {
            _ = workers.join_next() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                peak_rss = peak_rss.max(sys::rss_kib(pid).unwrap_or(0));
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // Closed sessions finish in the proxy shortly after the client sees LOGOUT's OK.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && sys::open_fds(pid).unwrap_or(0) > fds0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = sys::rss_kib(pid).unwrap_or(0);
    let fds1 = sys::open_fds(pid).unwrap_or(0);
    let failed = failures.load(Ordering::Relaxed);
    if let Some(e) = first_error.lock().unwrap_or_else(|e| e.into_inner()).take() {
        progress(&format!("soak: first failure: {e}"));
    }
    Ok(json!({
        "cycles": n,
        "failed": failed,
        "cycles_per_sec": round(n as f64 / secs, 0),
        "proxy_rss_before_kib": rss0,
        "proxy_rss_peak_kib": peak_rss.max(rss1),
        "proxy_rss_after_kib": rss1,
        "proxy_fds_before": fds0,
        "proxy_fds_after": fds1,
    }))
}

fn render(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let met = |ok: bool| if ok { "yes" } else { "NO" };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "xoauth2-proxy benchmark: {} CPUs; message {:.1} MiB; throughput = best of {} runs of {} s per route (MB = 10^6 bytes)",
        u(&r["machine"]["cpus"]),
        f(&r["settings"]["message_bytes"]) / 1048576.0,
        u(&r["settings"]["throughput_rounds"]),
        f(&r["settings"]["throughput_window_secs"]),
    );
    let head = |out: &mut String, title: &str, a: &str, b: &str, c: &str| {
        let _ = writeln!(
            out,
            "\n{title:<36} {a:>10} {b:>10} {c:>9}  {:<9} met",
            "target"
        );
    };
    if let Some(rows) = r["throughput"].as_array() {
        head(
            &mut out,
            "1. throughput (MB/s)",
            "direct",
            "proxied",
            "ratio",
        );
        for row in rows {
            let streams = u(&row["streams"]);
            let label = format!(
                "   {}, {streams} stream{}",
                match row["transfer"].as_str() {
                    Some("imap_fetch") => "IMAP FETCH",
                    Some("smtp_data") => "SMTP DATA",
                    Some("pop3_retr") => "POP3 RETR",
                    _ => "?",
                },
                if streams == 1 { "" } else { "s" }
            );
            let ratio = f(&row["ratio"]);
            let _ = writeln!(
                out,
                "{label:<36} {:>10.0} {:>10.0} {ratio:>9.2}  {:<9} {}",
                f(&row["direct_mb_s"]),
                f(&row["proxied_mb_s"]),
                ">= 0.90",
                met(ratio >= 0.90)
            );
        }
    }
    let l = &r["login_latency"];
    if !l.is_null() {
        head(
            &mut out,
            "2. IMAP login, connect to tagged OK",
            "direct",
            "proxied",
            "overhead",
        );
        for (p, limit) in [("p50", 0.5), ("p99", 2.0)] {
            let over = f(&l[format!("overhead_{p}_ms")]);
            let _ = writeln!(
                out,
                "{:<36} {:>10.3} {:>10.3} {over:>9.3}  {:<9} {}",
                format!("   {p} (ms, {} logins each)", u(&l["samples"])),
                f(&l[format!("direct_{p}_ms")]),
                f(&l[format!("proxied_{p}_ms")]),
                format!("<= {limit}"),
                met(over <= limit)
            );
        }
    }
    redis_store::render(&mut out, &r["redis_store_latency"]);
    let line = |out: &mut String, label: &str, result: String, target: &str, ok: Option<bool>| {
        let text = format!(
            "{label:<36} {result:>31}  {target:<9} {}",
            ok.map(met).unwrap_or("")
        );
        let _ = writeln!(out, "{}", text.trim_end());
    };
    let b = &r["burst"];
    if !b.is_null() {
        let _ = writeln!(out);
        line(
            &mut out,
            &format!("3. burst: {} clients connect at once", u(&b["clients"])),
            format!("{} greeted", u(&b["greeted"])),
            &format!("{}", u(&b["clients"])),
            Some(u(&b["greeted"]) == u(&b["clients"])),
        );
        line(
            &mut out,
            "   time to greeting p50 / p99 / last",
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                f(&b["p50_ms"]),
                f(&b["p99_ms"]),
                f(&b["all_greeted_ms"])
            ),
            "",
            None,
        );
    }
    let i = &r["idle_sessions"];
    if !i.is_null() {
        let per = f(&i["proxy_rss_kib_per_session"]);
        line(
            &mut out,
            &format!("4. idle IMAP sessions: {} held", u(&i["sessions"])),
            format!("{per:.1} KiB proxy RSS / session"),
            "<= 64 KiB",
            Some(per <= 64.0 && u(&i["sessions"]) > 0),
        );
        line(
            &mut out,
            "   proxy RSS before / after",
            format!(
                "{:.1} / {:.1} MiB",
                f(&i["proxy_rss_before_kib"]) / 1024.0,
                f(&i["proxy_rss_after_kib"]) / 1024.0
            ),
            "",
            None,
        );
        line(
            &mut out,
            "   proxy open descriptors",
            format!(
                "{} ({:.2} / session)",
                u(&i["proxy_fds"]),
                f(&i["proxy_fds_per_session"])
            ),
            "",
            None,
        );
        if u(&i["sessions"]) < u(&i["requested"]) {
            let _ = writeln!(
                out,
                "   ({} requested: RLIMIT_NOFILE is {} here and each session is 2 descriptors in the proxy)",
                u(&i["requested"]),
                u(&r["machine"]["nofile_limit"])
            );
        }
    }
    let s = &r["refresh_storm"];
    if !s.is_null() {
        line(
            &mut out,
            &format!(
                "5. refresh storm: {} logins, expired token",
                u(&s["logins"])
            ),
            format!(
                "{} token request{}",
                u(&s["token_requests"]),
                if u(&s["token_requests"]) == 1 {
                    ""
                } else {
                    "s"
                }
            ),
            "1",
            Some(u(&s["token_requests"]) == 1 && u(&s["succeeded"]) == u(&s["logins"])),
        );
        line(
            &mut out,
            "   logged in / time for all",
            format!("{} / {:.2} s", u(&s["succeeded"]), f(&s["secs"])),
            "",
            None,
        );
    }
    let c = &r["cpu"];
    if !c.is_null() {
        line(
            &mut out,
            "6. proxy CPU per GB spliced",
            format!(
                "{:.3} s ({:.1} s / {:.1} GB)",
                f(&c["proxy_cpu_s_per_gb"]),
                f(&c["proxy_cpu_secs"]),
                f(&c["gb_spliced"])
            ),
            "",
            None,
        );
        line(
            &mut out,
            "   client+upstream CPU per GB",
            format!(
                "direct {:.3} s, proxied {:.3} s",
                f(&c["direct_client_upstream_cpu_s_per_gb"]),
                f(&c["proxied_client_upstream_cpu_s_per_gb"])
            ),
            "",
            None,
        );
        // With every core busy, throughput is CPU per byte: this is the best ratio possible.
        line(
            &mut out,
            "   ratio ceiling when CPU-bound",
            format!("{:.2}", f(&c["cpu_bound_ratio_ceiling"])),
            "",
            None,
        );
    }
    let w = &r["wrong_password_storm"];
    if !w.is_null() {
        line(
            &mut out,
            &format!(
                "7. wrong-password storm: {} logins, {} at once",
                u(&w["logins"]),
                u(&w["parallel"])
            ),
            format!("{} refused in {:.1} s", u(&w["refused"]), f(&w["secs"])),
            "all",
            Some(u(&w["refused"]) == u(&w["logins"])),
        );
        // The Argon2 workers' memory is the only growth allowed, and it is given back.
        let grew = f(&w["proxy_rss_peak_kib"]) - f(&w["proxy_rss_before_kib"]);
        let back = f(&w["proxy_rss_after_kib"]) <= f(&w["proxy_rss_before_kib"]) + 8.0 * 1024.0;
        line(
            &mut out,
            "   proxy RSS before / peak / after",
            format!(
                "{:.1} / {:.1} / {:.1} MiB",
                f(&w["proxy_rss_before_kib"]) / 1024.0,
                f(&w["proxy_rss_peak_kib"]) / 1024.0,
                f(&w["proxy_rss_after_kib"]) / 1024.0
            ),
            "+64, back",
            Some(grew <= 64.0 * 1024.0 && back),
        );
    }
    let k = &r["soak"];
    if !k.is_null() {
        // Back to the starting level: memory within 10 % (allocator noise), descriptors equal.
        let rss_back = f(&k["proxy_rss_after_kib"]) <= f(&k["proxy_rss_before_kib"]) * 1.1;
        let fds_back = u(&k["proxy_fds_after"]) <= u(&k["proxy_fds_before"]);
        line(
            &mut out,
            &format!("8. soak: {} login-fetch-logout cycles", u(&k["cycles"])),
            format!(
                "{} failed, {:.0} cycles/s",
                u(&k["failed"]),
                f(&k["cycles_per_sec"])
            ),
            "",
            Some(u(&k["failed"]) == 0),
        );
        line(
            &mut out,
            "   proxy RSS before / peak / after",
            format!(
                "{:.1} / {:.1} / {:.1} MiB",
                f(&k["proxy_rss_before_kib"]) / 1024.0,
                f(&k["proxy_rss_peak_kib"]) / 1024.0,
                f(&k["proxy_rss_after_kib"]) / 1024.0
            ),
            "back",
            Some(rss_back),
        );
        line(
            &mut out,
            "   proxy open descriptors before / after",
            format!(
                "{} / {}",
                u(&k["proxy_fds_before"]),
                u(&k["proxy_fds_after"])
            ),
            "back",
            Some(fds_back),
        );
    }
    let _ = writeln!(
        out,
        "\nbench took {:.0} s; the proxy logged {} warning(s)",
        f(&r["bench_secs"]),
        u(&r["proxy_warnings_logged"])
    );
    out
}

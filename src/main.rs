//! Command line: parses arguments, calls into the library, maps errors to exit codes
//! (0 success, 1 failure with a one-line reason on stderr, 2 usage).

mod check;

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use xoauth2_proxy::clock::{format_age, format_time, now_unix};
use xoauth2_proxy::config::{self, Config, LocalTls};
use xoauth2_proxy::oauth::{device, flow};
use xoauth2_proxy::registry;
use xoauth2_proxy::report;
use xoauth2_proxy::secret::Secret;
use xoauth2_proxy::store::Store;

#[derive(Parser)]
#[command(
    name = "xoauth2-proxy",
    version,
    about = "Lets password-only mail clients use Gmail and Microsoft 365 through OAuth 2.0 (XOAUTH2)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file (default: $XOAUTH2_PROXY_CONFIG, then ~/.config/xoauth2-proxy/config.toml)
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in the foreground (logs on stderr; RUST_LOG sets the level)
    Serve {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Authorize an account in a browser (authorization code + PKCE, loopback redirect), or
    /// with a code typed on another device (--device), and store its refresh token
    Login {
        email: String,
        #[command(flatten)]
        config: ConfigArg,
        /// Do not try to open a browser; open the printed address yourself (on any device)
        #[arg(long)]
        no_browser: bool,
        /// Give up after this many seconds without an answer
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        timeout: u64,
        /// Sign in on any device with a short code (RFC 8628 device grant; Microsoft only)
        #[arg(long)]
        device: bool,
    },
    /// Store a refresh token obtained elsewhere, after checking it with one refresh
    Import {
        email: String,
        #[command(flatten)]
        config: ConfigArg,
        /// Read the refresh token from one line of standard input
        #[arg(long, required = true)]
        refresh_token_stdin: bool,
    },
    /// Manage local app passwords
    Password {
        #[command(subcommand)]
        command: PasswordCommand,
    },
    /// One row per configured account: credential, token expiry and age, passwords, what to do
    Accounts {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON (an array of objects) instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Validate the config, get a fresh token for every account, reach every upstream
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Write a self-signed certificate and key for localhost to the paths in [tls]
    Cert {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Read a password (prompted, or one line of standard input) and print its Argon2 hash
    /// for [admin] password_hash
    AdminPassword,
    /// Move the secrets between the configured store (e.g. Redis) and a store file
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy every account's secrets into, or out of, the configured store; the file is sealed
    /// with the configured store's master key, and the target must hold no accounts yet
    Copy {
        #[command(flatten)]
        config: ConfigArg,
        /// Write the configured store's secrets to this new store file
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "from",
            required_unless_present = "from"
        )]
        to: Option<PathBuf>,
        /// Read a store file (such as state_dir/store.enc) into the configured store
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PasswordCommand {
    /// Generate a password for EMAIL, print it once, store only its hash
    Add {
        email: String,
        #[command(flatten)]
        config: ConfigArg,
        /// A name for the client that will use it
        #[arg(long, default_value = "default")]
        label: String,
    },
    /// List the labels and creation times of EMAIL's passwords
    List {
        email: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke the password labelled LABEL (also in a running serve)
    Remove {
        email: String,
        label: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // serve logs its work; one-off commands print their own words and log only trouble
    // (`check` not even that: its lines already say what failed).
    let default_level = match cli.command {
        Command::Serve { .. } => "info",
        Command::Check { .. } => "error",
        _ => "warn",
    };
    let _ = LOG_LEVEL.set(default_level);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xoauth2-proxy: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The default log level of the running command (RUST_LOG overrides it).
static LOG_LEVEL: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Log lines on stderr, as the config's `log_format` asks; set up once, by the first `load`.
fn start_logging(format: config::LogFormat) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(LOG_LEVEL.get().copied().unwrap_or("warn"))
        });
        let fmt = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter);
        match format {
            config::LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
            config::LogFormat::Json => fmt.json().flatten_event(true).init(),
        }
    });
}

fn load(arg: &ConfigArg) -> Result<Config, String> {
    let path = config::resolve_path(arg.config.as_deref()).map_err(|e| e.to_string())?;
    let config = Config::load(&path).map_err(|e| e.to_string())?;
    start_logging(config.log_format);
    Ok(config)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))
}

fn open_store(config: &Config) -> Result<Store, String> {
    Store::open(&config.state_dir, &config.store).map_err(|e| e.to_string())
}

/// The account as configured, or a clear error listing what is.
fn account<'a>(config: &'a Config, email: &str) -> Result<&'a config::AccountConfig, String> {
    config.account(email).ok_or_else(|| {
        format!(
            "{email} is not an [[account]] in {}; add it there first",
            config.path.display()
        )
    })
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Import { email, config, .. } => import(&config, &email),
        Command::Login {
            email,
            config,
            no_browser,
            timeout,
            device,
        } => {
            let how = if device {
                How::Device
            } else {
                How::Browser {
                    open: !no_browser,
                    timeout: Duration::from_secs(timeout.max(1)),
                }
            };
            login_command(&config, &email, how)
        }
        Command::Accounts { config, json } => accounts_command(&config, json),
        Command::Check { config } => check_command(&config),
        Command::Password { command } => match command {
            PasswordCommand::Add {
                email,
                config,
                label,
            } => password_add(&config, &email, &label),
            PasswordCommand::List { email, config } => password_list(&config, &email),
            PasswordCommand::Remove {
                email,
                label,
                config,
            } => password_remove(&config, &email, &label),
        },
        Command::Cert { config } => cert(&config),
        Command::AdminPassword => admin_password(),
        Command::Store {
            command: StoreCommand::Copy { config, to, from },
        } => store_copy(&config, to, from),
    }
}

/// `admin-password`: the hash on stdout, alone, so scripts can take it.
fn admin_password() -> Result<(), String> {
    let password = if std::io::stdin().is_terminal() {
        let first = prompt_hidden("Admin password: ")?;
        if prompt_hidden("Same password again: ")?.expose() != first.expose() {
            return Err("the two passwords differ; nothing printed".into());
        }
        first
    } else {
        read_secret_line()?
    };
    if password.expose().chars().count() < 8 {
        return Err("use at least 8 characters for the admin password".into());
    }
    let hash = xoauth2_proxy::store::password::hash(&password)?;
    eprintln!("Put this in the config as [admin] password_hash (with a [tls] section for HTTPS):");
    println!("{hash}");
    Ok(())
}

/// One line of standard input as a secret, without its line end.
fn read_secret_line() -> Result<Secret, String> {
    let mut line = zeroize::Zeroizing::new(String::new());
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read standard input: {e}"))?;
    Ok(Secret::new(line.trim_end_matches(['\r', '\n']).to_string()))
}

/// Ask on the terminal with echo off, so the password is not shown.
fn prompt_hidden(prompt: &str) -> Result<Secret, String> {
    eprint!("{prompt}");
    let fd = libc::STDIN_FILENO;
    // SAFETY: tcgetattr/tcsetattr only read and write the termios struct passed by pointer.
    let saved = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        (libc::tcgetattr(fd, &mut t) == 0).then_some(t)
    };
    if let Some(mut quiet) = saved {
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: as above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let line = read_secret_line();
    if let Some(t) = saved {
        // SAFETY: as above; restores the settings read before.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
    }
    eprintln!();
    line
}

fn store_copy(arg: &ConfigArg, to: Option<PathBuf>, from: Option<PathBuf>) -> Result<(), String> {
    let config = load(arg)?;
    let configured = open_store(&config)?;
    let (file, into_file) = match (to, from) {
        (Some(path), None) => (path, true),
        (None, Some(path)) => (path, false),
        _ => return Err("give one of --to FILE and --from FILE".into()),
    };
    let at = Store::file_at(&file, &config.state_dir, &config.store).map_err(|e| e.to_string())?;
    let (source, target) = if into_file {
        (&configured, &at)
    } else {
        (&at, &configured)
    };
    let (data, stamp) = source.load().map_err(|e| e.to_string())?;
    if !into_file && stamp.is_none() {
        return Err(format!("{} does not exist", file.display()));
    }
    let copied = data.accounts.len();
    target
        .update(|held| {
            if !held.accounts.is_empty() {
                return Err(xoauth2_proxy::store::StoreError::Other(format!(
                    "the target already holds {} account(s); copy only into an empty store",
                    held.accounts.len()
                )));
            }
            *held = data.clone();
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    let (what, whence) = if into_file {
        ("to", "from the configured store")
    } else {
        ("from", "into the configured store")
    };
    println!(
        "Copied {copied} account(s) {whence} {what} {}.",
        file.display()
    );
    Ok(())
}

fn serve(arg: &ConfigArg) -> Result<(), String> {
    let config = load(arg)?;
    if config.listeners.is_empty() {
        return Err(format!(
            "{}: no [[listener]] configured",
            config.path.display()
        ));
    }
    runtime()?.block_on(async {
        let listeners = xoauth2_proxy::proxy::bind(&config).await?;
        let admin = xoauth2_proxy::admin::bind(&config).await?;
        let path = config.path.clone();
        let app = xoauth2_proxy::proxy::App::new(config)?;
        let server = xoauth2_proxy::proxy::Server::start(app, listeners);
        let stop_admin = tokio_util::sync::CancellationToken::new();
        if let Some(admin) = admin {
            tokio::spawn(xoauth2_proxy::admin::serve(
                admin,
                admin_views(&server),
                stop_admin.clone(),
            ));
        }
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = reload_on_hangup(&server, &path) => {}
        }
        server.stop().await;
        stop_admin.cancel();
        Ok(())
    })
}

/// SIGHUP: re-read the config file; a bad one is logged and the running config stays.
async fn reload_on_hangup(server: &std::sync::Arc<xoauth2_proxy::proxy::Server>, path: &Path) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: config reload is off");
            return std::future::pending().await;
        }
    };
    while hangups.recv().await.is_some() {
        tracing::info!(config = %path.display(), "SIGHUP: reloading the config");
        match server.reload_file(path).await {
            Ok(summary) => tracing::info!("config reloaded: {summary}"),
            Err(e) => tracing::error!("config not reloaded, the running one stays in force: {e}"),
        }
    }
    std::future::pending().await
}

/// What the admin listener sees of the running proxy: always its current config.
fn admin_views(
    server: &std::sync::Arc<xoauth2_proxy::proxy::Server>,
) -> xoauth2_proxy::admin::Views {
    let app = server.app();
    let current = |server: &std::sync::Arc<xoauth2_proxy::proxy::Server>| {
        let server = server.clone();
        move || server.app()
    };
    xoauth2_proxy::admin::Views {
        registry: {
            let app = current(server);
            Box::new(move || app().registry.clone())
        },
        listeners: {
            let server = server.clone();
            Box::new(move || {
                server
                    .listening()
                    .into_iter()
                    .map(|(protocol, addr)| (protocol.name(), addr))
                    .collect()
            })
        },
        configured_listeners: {
            let app = current(server);
            Box::new(move || app().config.listeners.len())
        },
        throttled_sources: {
            let app = current(server);
            Box::new(move || app().throttle.slowed_sources())
        },
        token_times: {
            let app = current(server);
            Box::new(move || token_times(&app()))
        },
        account_labels: app.config.admin.as_ref().is_some_and(|a| a.account_labels),
        token_endpoints: {
            let app = current(server);
            Box::new(move || app().tokens.unanswered_endpoints())
        },
        accounts: {
            let app = current(server);
            Box::new(move || account_rows(&app()))
        },
        oauth_client: {
            let app = current(server);
            Box::new(move |account| app().config.oauth_client(account))
        },
        consent_origins: consent_origins(&app.config),
        activity: app.activity.clone(),
        login: admin_login(&app),
    }
}

/// The admin password check, when `[admin] password_hash` is set: on the mail logins' Argon2
/// workers and brute-force throttle (both outlive config reloads).
fn admin_login(
    app: &xoauth2_proxy::proxy::App,
) -> Option<std::sync::Arc<xoauth2_proxy::admin::access::Login>> {
    let hash = app.config.admin.as_ref()?.password_hash.clone()?;
    Some(std::sync::Arc::new(
        xoauth2_proxy::admin::access::Login::new(
            hash,
            app.accounts.checker(),
            app.throttle.clone(),
        ),
    ))
}

fn import(arg: &ConfigArg, email: &str) -> Result<(), String> {
    let config = load(arg)?;
    let acct = account(&config, email)?;
    if acct.app_only {
        return Err(format!(
            "{} is app_only: it uses the app's client secret, not a refresh token",
            acct.email
        ));
    }
    let client = config.oauth_client(acct)?;
    let token = read_refresh_token()?;
    let store = open_store(&config)?;
    runtime()?.block_on(async {
        let granted = xoauth2_proxy::oauth::verify_refresh_token(&client, &token)
            .await
            .map_err(|e| format!("refresh token for {} not stored: {e}", acct.email))?;
        let stored = granted.refresh_token.as_ref().unwrap_or(&token);
        registry::save_grant(
            &store,
            &acct.key(),
            stored,
            granted.refresh_token_expires_in,
        )
        .map_err(|e| e.to_string())?;
        println!(
            "Stored the refresh token for {} (checked: {} issued an access token valid for {} s).",
            acct.email,
            acct.provider.words().provider,
            granted.expires_in.as_secs()
        );
        Ok(())
    })
}

/// One line of standard input, the refresh token `import` stores.
fn read_refresh_token() -> Result<Secret, String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read standard input: {e}"))?;
    let token = Secret::new(line.trim().to_string());
    zeroize::Zeroize::zeroize(&mut line);
    if token.is_empty() {
        return Err("no refresh token on standard input".into());
    }
    Ok(token)
}

/// How `login` gets the user's consent.
enum How {
    /// The loopback redirect (or a pasted address), opening a browser if `open`.
    Browser { open: bool, timeout: Duration },
    /// The device grant: a code typed on any device.
    Device,
}

fn login_command(arg: &ConfigArg, email: &str, how: How) -> Result<(), String> {
    let config = load(arg)?;
    let acct = account(&config, email)?;
    if acct.app_only {
        return Err(format!(
            "{} is app_only: the proxy gets its tokens with the app's client secret and needs no login; `xoauth2-proxy check{}` shows whether it works",
            acct.email,
            config_hint(arg, &config)
        ));
    }
    if matches!(how, How::Device) && acct.provider.id() == "google" {
        return Err(format!(
            "Google does not allow the Gmail scope on the device flow (it answers invalid_scope); run `xoauth2-proxy login {}{} --no-browser` instead: open the printed address on any device and paste back the address the browser ends at",
            acct.email,
            config_hint(arg, &config)
        ));
    }
    if let Some(key) = &acct.service_account_key {
        return Err(format!(
            "{} uses a service account key ({}), which needs no login; `xoauth2-proxy check{}` shows whether it works",
            acct.email,
            key.display(),
            config_hint(arg, &config)
        ));
    }
    let client = config
        .oauth_client(acct)
        .map_err(|e| format!("{e}. To make one: {}", acct.provider.console_steps()))?;
    let store = open_store(&config)?;
    let login = Login {
        config: &config,
        config_arg: arg,
        acct,
        client,
        store: &store,
    };
    runtime()?.block_on(async {
        match how {
            How::Browser { open, timeout } => login.browser(open, timeout).await,
            How::Device => login.device().await,
        }
    })
}

fn accounts_command(arg: &ConfigArg, json: bool) -> Result<(), String> {
    let config = load(arg)?;
    let (data, _) = open_store(&config)?.load().map_err(|e| e.to_string())?;
    let serve = xoauth2_proxy::oauth::status::read_live(&config.state_dir);
    let rows = report::report(&config, &data, serve.as_ref(), now_unix());
    if json {
        let text =
            serde_json::to_string_pretty(&rows).map_err(|e| format!("cannot encode JSON: {e}"))?;
        println!("{text}");
    } else if rows.is_empty() {
        println!("No [[account]] in {}.", config.path.display());
    } else {
        print_accounts_table(&rows);
    }
    Ok(())
}

fn check_command(arg: &ConfigArg) -> Result<(), String> {
    let path = config::resolve_path(arg.config.as_deref()).map_err(|e| e.to_string())?;
    start_logging(config::LogFormat::Text);
    let (total, failed) = runtime()?.block_on(check::run(&path));
    if failed == 0 {
        println!("All {total} checks passed.");
        Ok(())
    } else {
        Err(format!("{failed} of {total} checks failed"))
    }
}

fn password_add(arg: &ConfigArg, email: &str, label: &str) -> Result<(), String> {
    let config = load(arg)?;
    let acct = account(&config, email)?;
    let label = label.trim();
    if label.is_empty() || label.chars().any(char::is_control) {
        return Err("--label must be a non-empty name".into());
    }
    let store = open_store(&config)?;
    let pw = registry::add_password(&store, &acct.key(), label).map_err(|e| e.to_string())?;
    println!(
        "New app password for {} (label {label:?}). It is shown only this once; use it as the password in your mail client:",
        acct.email
    );
    println!("{}", pw.expose());
    Ok(())
}

fn password_list(arg: &ConfigArg, email: &str) -> Result<(), String> {
    let config = load(arg)?;
    let acct = account(&config, email)?;
    let (data, _) = open_store(&config)?.load().map_err(|e| e.to_string())?;
    let entries = data
        .account(&acct.key())
        .map(|a| a.passwords.clone())
        .unwrap_or_default();
    if entries.is_empty() {
        println!(
            "{} has no app passwords; add one with `xoauth2-proxy password add {}`",
            acct.email, acct.email
        );
    }
    for p in entries {
        println!("{}\tcreated {}", p.label, format_time(p.created_at));
    }
    Ok(())
}

fn password_remove(arg: &ConfigArg, email: &str, label: &str) -> Result<(), String> {
    let config = load(arg)?;
    let acct = account(&config, email)?;
    let store = open_store(&config)?;
    if registry::remove_password(&store, &acct.key(), label).map_err(|e| e.to_string())? {
        println!("Removed the password {label:?} of {}.", acct.email);
        Ok(())
    } else {
        Err(format!("{} has no password labelled {label:?}", acct.email))
    }
}

fn cert(arg: &ConfigArg) -> Result<(), String> {
    let config = load(arg)?;
    let tls = config.tls.as_ref().ok_or_else(|| {
        format!(
            "{}: add a [tls] section with cert and key paths first",
            config.path.display()
        )
    })?;
    xoauth2_proxy::tls::write_self_signed(&tls.cert, &tls.key)?;
    println!(
        "Wrote a self-signed certificate for localhost, 127.0.0.1 and ::1:\n  certificate {}\n  key         {} (0600)",
        tls.cert.display(),
        tls.key.display()
    );
    Ok(())
}

/// The origins of the consent pages the status page's forms may lead to: each provider's
/// that a configured account uses.
fn consent_origins(config: &Config) -> Vec<String> {
    let mut origins = vec![&config.google.auth_url];
    if config
        .accounts
        .iter()
        .any(|a| a.provider.id() == "microsoft")
    {
        origins.push(&config.microsoft.auth_url);
    }
    origins
        .into_iter()
        .filter_map(|u| url::Url::parse(u).ok())
        .map(|u| u.origin().ascii_serialization())
        .collect()
}

/// The `accounts` report of the running proxy, for the status page.
fn account_rows(app: &xoauth2_proxy::proxy::App) -> Vec<report::AccountReport> {
    let data = app.registry.current().unwrap_or_default();
    let status = app.tokens.status();
    report::report(&app.config, &data, Some(&status), now_unix())
}

/// Each account's token times for the admin listener's gauges.
fn token_times(app: &xoauth2_proxy::proxy::App) -> Vec<xoauth2_proxy::metrics::TokenTimes> {
    let live = app.tokens.status();
    let stored = app.registry.current().ok();
    app.config
        .accounts
        .iter()
        .map(|a| xoauth2_proxy::metrics::TokenTimes {
            account: a.email.clone(),
            access_token_expires_at: live
                .accounts
                .get(a.key().as_str())
                .and_then(|s| s.access_token_expires_at),
            refresh_token_obtained_at: stored
                .as_ref()
                .and_then(|d| d.account(&a.key()))
                .and_then(|s| s.refresh_token_obtained_at),
        })
        .collect()
}

/// ` -c PATH` for commands printed as advice, when the user named the config explicitly.
fn config_hint(arg: &ConfigArg, config: &Config) -> String {
    if arg.config.is_none() {
        return String::new();
    }
    let path = config.path.display().to_string();
    if path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@".contains(c))
    {
        format!(" -c {path}")
    } else {
        format!(" -c '{}'", path.replace('\'', "'\\''"))
    }
}

/// One `login` run: the account, its OAuth client, and where the grant goes.
struct Login<'a> {
    config: &'a Config,
    config_arg: &'a ConfigArg,
    acct: &'a config::AccountConfig,
    client: config::OAuthClient,
    store: &'a Store,
}

impl Login<'_> {
    fn who(&self) -> &'static str {
        self.acct.provider.words().provider
    }

    async fn browser(&self, open: bool, timeout: Duration) -> Result<(), String> {
        let (acct, who) = (self.acct, self.who());
        let cannot_listen =
            |e: std::io::Error| format!("cannot listen on 127.0.0.1 for {who}'s redirect: {e}");
        let listener = flow::bind_loopback().await.map_err(cannot_listen)?;
        let port = listener.local_addr().map_err(cannot_listen)?.port();
        let attempt = flow::Attempt::new(&acct.email, self.client.clone(), port);
        let url = attempt.authorization_url()?;
        println!(
            "To authorize {} for {}, open this address in a browser, sign in as {} and allow access:\n",
            acct.email,
            acct.provider.words().mail,
            acct.email
        );
        println!("{url}\n");
        if open {
            match open_browser(&url) {
                Ok(how) => println!("(Asked {how} to open it.)"),
                Err(why) => println!("(No browser opened here: {why}.)"),
            }
        }
        println!(
            "Waiting up to {} for {who} to send the browser back to {}/ ...",
            format_age(timeout.as_secs() as i64),
            attempt.redirect_uri
        );
        println!(
            "No browser on this machine? Open the address on any device. After you allow access, that browser tries to load an {}/ page and fails; copy that page's whole address from the address bar, paste it here and press Enter.",
            attempt.redirect_uri
        );
        let _ = std::io::stdout().flush();
        let pasted = read_stdin_lines();
        let notice = |m: &str| {
            eprintln!("xoauth2-proxy: {m}");
        };
        let authorized = flow::complete(&attempt, listener, pasted, timeout, &notice)
            .await
            .map_err(|e| e.to_string())?;
        self.save(
            &authorized.refresh_token,
            authorized.refresh_token_expires_in,
            authorized.access_token_expires_in,
        )
    }

    /// RFC 8628: print where to go and the code, poll until the user finishes. Nothing is
    /// stored before the grant is complete, so an interrupted run leaves the store as it was.
    async fn device(&self) -> Result<(), String> {
        let (acct, who, client) = (self.acct, self.who(), &self.client);
        let device_url = self.config.device_url(acct).ok_or_else(|| {
            format!(
                "{who} offers no device sign-in; run `xoauth2-proxy login {}` without --device",
                acct.email
            )
        })?;
        let http = xoauth2_proxy::oauth::token_endpoint::http_client()?;
        let scopes: Vec<&str> = client.scope.split_whitespace().collect();
        let code = device::start(&http, client, &device_url, &scopes)
            .await
            .map_err(|e| format!("{who} did not start the device sign-in: {e}"))?;
        // Listening before the code is shown: an interrupt from then on is answered in words.
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(|e| format!("cannot watch for Ctrl-C: {e}"))?;
        println!(
            "To authorize {} for {}, open {} on any device, enter the code\n\n    {}\n\nand sign in as {}. Waiting up to {} (checking every {} s; Ctrl-C stops, storing nothing) ...",
            acct.email,
            acct.provider.words().mail,
            code.verification_uri,
            code.user_code,
            acct.email,
            format_age(code.expires_in.as_secs() as i64),
            code.interval.as_secs()
        );
        let _ = std::io::stdout().flush();
        let granted = tokio::select! {
            r = device::poll(&http, client, &code, tokio::time::sleep) => r.map_err(|e| e.to_string())?,
            _ = interrupt.recv() => {
                return Err(format!("interrupted; nothing was stored for {}", acct.email));
            }
        };
        let Some(refresh_token) = granted.refresh_token else {
            return Err(format!("{who} issued an access token but no refresh token, so access could not be kept: the consent must include offline_access. Nothing was stored"));
        };
        if let Some(scope) = granted
            .scope
            .as_deref()
            .filter(|s| !config::scope_covered(&client.scope, s))
        {
            return Err(format!("the consent did not include every mail permission ({}; granted: {scope}); {}. Nothing was stored", client.scope, acct.provider.console_steps()));
        }
        self.save(
            &refresh_token,
            granted.refresh_token_expires_in,
            granted.expires_in,
        )
    }

    fn save(
        &self,
        refresh_token: &Secret,
        ends_in: Option<Duration>,
        access_token_expires_in: Duration,
    ) -> Result<(), String> {
        let (acct, who, store) = (self.acct, self.who(), self.store);
        registry::save_grant(store, &acct.key(), refresh_token, ends_in).map_err(|e| {
            format!(
                "{who} authorized {}, but storing the refresh token failed: {e}",
                acct.email
            )
        })?;
        let passwords = store
            .load()
            .ok()
            .and_then(|(d, _)| d.account(&acct.key()).map(|a| a.passwords.len()))
            .unwrap_or(0);
        println!();
        println!(
            "Authorized {}: {who} issued a refresh token (access token valid for {}), stored in {}.",
            acct.email,
            format_age(access_token_expires_in.as_secs() as i64),
            store.dir().display()
        );
        if let Some(ends) = ends_in {
            println!(
                "{who} says this grant ends in {}; run login again before then.",
                format_age(ends.as_secs() as i64)
            );
        }
        print!(
            "{}",
            next_steps(self.config, self.config_arg, acct, passwords)
        );
        Ok(())
    }
}

/// What to do after `login`: a password, the client settings, and serve.
fn next_steps(
    config: &Config,
    config_arg: &ConfigArg,
    acct: &config::AccountConfig,
    passwords: usize,
) -> String {
    let c = config_hint(config_arg, config);
    let email = &acct.email;
    let mut out = String::from("\nNext:\n");
    if passwords == 0 {
        out.push_str(&format!(
            "  1. Make an app password for your mail client (shown once):\n       xoauth2-proxy password add {email}{c} --label laptop\n"
        ));
    } else {
        out.push_str(&format!(
            "  1. {email} already has {passwords} app password(s); they keep working. One more per client:\n       xoauth2-proxy password add {email}{c} --label NAME\n"
        ));
    }
    out.push_str(&format!(
        "  2. In the mail client:\n       username  {email}\n       password  the app password from step 1\n"
    ));
    if config.listeners.is_empty() {
        out.push_str(&format!(
            "       (no [[listener]] in {} yet: add one for imap and smtp)\n",
            config.path.display()
        ));
    }
    for l in &config.listeners {
        let host = if l.bind.ip().is_unspecified() {
            "this machine's name or address".to_string()
        } else {
            l.bind.ip().to_string()
        };
        let security = match l.local_tls {
            LocalTls::None => "none (plain text; stays on this machine)",
            LocalTls::Starttls => "STARTTLS (trust the certificate from `xoauth2-proxy cert`)",
            LocalTls::Implicit => "SSL/TLS (trust the certificate from `xoauth2-proxy cert`)",
        };
        out.push_str(&format!(
            "       {:<5} server {host}  port {}  security {security}\n",
            l.protocol.name().to_uppercase(),
            l.bind.port()
        ));
    }
    out.push_str(&format!(
        "  3. Run `xoauth2-proxy serve{c}` if it is not running; a running one uses the new authorization at once.\n"
    ));
    out
}

/// Lines typed or pasted on standard input, read on a thread of their own (reading a terminal
/// blocks); the channel closes at end of input.
fn read_stdin_lines() -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) => {
                    if tx.blocking_send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    rx
}

/// Ask the desktop to open `url`; never waits for the browser. Returns what was asked.
fn open_browser(url: &str) -> Result<String, String> {
    use std::process::{Command, Stdio};
    let mut command = match std::env::var("BROWSER")
        .ok()
        .filter(|b| !b.trim().is_empty())
    {
        Some(browser) => {
            let mut c = Command::new(browser.trim());
            c.arg(url);
            c
        }
        None if cfg!(target_os = "macos") => {
            let mut c = Command::new("open");
            c.arg(url);
            c
        }
        None if cfg!(windows) => {
            let mut c = Command::new("rundll32");
            c.arg("url.dll,FileProtocolHandler").arg(url);
            c
        }
        None => {
            if std::env::var_os("DISPLAY").is_none()
                && std::env::var_os("WAYLAND_DISPLAY").is_none()
            {
                return Err("no graphical session (DISPLAY and WAYLAND_DISPLAY are unset)".into());
            }
            let mut c = Command::new("xdg-open");
            c.arg(url);
            c
        }
    };
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    // Reap it whenever it ends, without waiting for it here.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(program)
}

fn print_accounts_table(rows: &[report::AccountReport]) {
    let now = now_unix();
    let table: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.email.clone(),
                r.credential.words().to_string(),
                r.access_token.clone(),
                match r.refresh_token_obtained_at {
                    Some(at) => format!("{} (since {})", format_age(now - at), format_time(at)),
                    None => "-".into(),
                },
                r.passwords.to_string(),
                if r.attention.is_empty() {
                    "-".into()
                } else {
                    r.attention.join("; also ")
                },
            ]
        })
        .collect();
    let header = [
        "EMAIL",
        "CREDENTIAL",
        "ACCESS TOKEN EXPIRES",
        "REFRESH TOKEN AGE",
        "PASSWORDS",
        "NEEDS",
    ];
    let mut widths = header.map(str::len);
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == 5 {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header);
    for row in &table {
        line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]);
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

//! Command line: parses arguments, calls into the library, maps errors to exit codes
//! (0 success, 1 failure with a one-line reason on stderr, 2 usage).

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xoauth2_proxy::accounts;
use xoauth2_proxy::config::{self, Config};
use xoauth2_proxy::secret::Secret;
use xoauth2_proxy::store::Store;

#[derive(Parser)]
#[command(
    name = "xoauth2-proxy",
    version,
    about = "Lets password-only mail clients use Gmail through OAuth 2.0 (XOAUTH2)"
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
    /// Write a self-signed certificate and key for localhost to the paths in [tls]
    Cert {
        #[command(flatten)]
        config: ConfigArg,
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xoauth2-proxy: {message}");
            ExitCode::FAILURE
        }
    }
}

fn load(arg: &ConfigArg) -> Result<Config, String> {
    let path = config::resolve_path(arg.config.as_deref()).map_err(|e| e.to_string())?;
    Config::load(&path).map_err(|e| e.to_string())
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
        Command::Serve { config } => {
            let config = load(&config)?;
            if config.listeners.is_empty() {
                return Err(format!(
                    "{}: no [[listener]] configured",
                    config.path.display()
                ));
            }
            runtime()?.block_on(async {
                let listeners = xoauth2_proxy::proxy::bind(&config).await?;
                let app = xoauth2_proxy::proxy::App::new(config)?;
                xoauth2_proxy::proxy::serve(app, listeners, shutdown_signal()).await;
                Ok(())
            })
        }
        Command::Import { email, config, .. } => {
            let config = load(&config)?;
            let acct = account(&config, &email)?;
            let client = config.oauth_client(acct)?;
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| format!("cannot read standard input: {e}"))?;
            let token = Secret::new(line.trim().to_string());
            drop(line);
            if token.is_empty() {
                return Err("no refresh token on standard input".into());
            }
            let store = open_store(&config)?;
            runtime()?.block_on(async {
                let granted = xoauth2_proxy::oauth::verify_refresh_token(&client, &token)
                    .await
                    .map_err(|e| format!("refresh token for {} not stored: {e}", acct.email))?;
                let stored = granted.refresh_token.as_ref().unwrap_or(&token);
                accounts::save_refresh_token(&store, &acct.email, stored).map_err(|e| e.to_string())?;
                println!(
                    "Stored the refresh token for {} (checked: Google issued an access token valid for {} s).",
                    acct.email,
                    granted.expires_in.as_secs()
                );
                Ok(())
            })
        }
        Command::Password { command } => match command {
            PasswordCommand::Add {
                email,
                config,
                label,
            } => {
                let config = load(&config)?;
                let acct = account(&config, &email)?;
                let label = label.trim();
                if label.is_empty() || label.chars().any(char::is_control) {
                    return Err("--label must be a non-empty name".into());
                }
                let store = open_store(&config)?;
                let pw = accounts::add_password(&store, &acct.email, label)
                    .map_err(|e| e.to_string())?;
                println!(
                    "New app password for {} (label {label:?}). It is shown only this once; use it as the password in your mail client:",
                    acct.email
                );
                println!("{}", pw.expose());
                Ok(())
            }
            PasswordCommand::List { email, config } => {
                let config = load(&config)?;
                let acct = account(&config, &email)?;
                let (data, _) = open_store(&config)?.load().map_err(|e| e.to_string())?;
                let entries = data
                    .account(&acct.email)
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
            PasswordCommand::Remove {
                email,
                label,
                config,
            } => {
                let config = load(&config)?;
                let acct = account(&config, &email)?;
                let store = open_store(&config)?;
                if accounts::remove_password(&store, &acct.email, &label)
                    .map_err(|e| e.to_string())?
                {
                    println!("Removed the password {label:?} of {}.", acct.email);
                    Ok(())
                } else {
                    Err(format!("{} has no password labelled {label:?}", acct.email))
                }
            }
        },
        Command::Cert { config } => {
            let config = load(&config)?;
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
    }
}

fn format_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| unix.to_string())
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

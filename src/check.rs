//! `check`: one line per check, `ok` or `FAIL` with what to do. The config parses, the store
//! opens, every account gets a fresh access token, and every listener's upstream answers with a
//! greeting over TLS (implicit, or after STARTTLS/STLS).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xoauth2_proxy::clock::format_age;
use xoauth2_proxy::config::{Config, ListenerConfig, Protocol, StoreKind, UpstreamTls};
use xoauth2_proxy::oauth::TokenManager;
use xoauth2_proxy::proxy::stream::Stream;
use xoauth2_proxy::registry::Registry;
use xoauth2_proxy::store::Store;

const TOKEN_WAIT: Duration = Duration::from_secs(30);
const UPSTREAM_WAIT: Duration = Duration::from_secs(15);

/// Run every check, printing a line for each; returns (checks, failures).
pub async fn run(path: &Path) -> (usize, usize) {
    let mut report = Report::default();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            report.fail("config", e.to_string());
            return report.counts();
        }
    };
    report.ok(
        "config",
        format!(
            "{} ({} listener(s), {} account(s))",
            config.path.display(),
            config.listeners.len(),
            config.accounts.len()
        ),
    );
    let store = match Store::open(&config.state_dir, &config.store) {
        Ok(s) => {
            let key = match (&config.store.key_file, config.store.kind) {
                (Some(p), _) => format!("key file {}", p.display()),
                (None, StoreKind::File) => "key in master.key".into(),
                (None, StoreKind::Keyring) => "key in the OS keyring".into(),
            };
            match s.load() {
                Ok(_) => {
                    report.ok("store", format!("{} ({key})", config.state_dir.display()));
                    Some(s)
                }
                Err(e) => {
                    report.fail("store", e.to_string());
                    None
                }
            }
        }
        Err(e) => {
            report.fail("store", e.to_string());
            None
        }
    };
    if let Some(store) = store {
        check_accounts(&config, store, &mut report).await;
    }
    for l in &config.listeners {
        let name = format!(
            "listener {} {} -> {}",
            l.protocol.name(),
            l.bind,
            l.upstream()
        );
        match tokio::time::timeout(UPSTREAM_WAIT, probe(l)).await {
            Ok(Ok(greeting)) => report.ok(&name, greeting),
            Ok(Err(e)) => report.fail(&name, e),
            Err(_) => report.fail(
                &name,
                format!(
                    "no greeting within {} s; check upstream and upstream_tls",
                    UPSTREAM_WAIT.as_secs()
                ),
            ),
        }
    }
    report.counts()
}

async fn check_accounts(config: &Config, store: Store, report: &mut Report) {
    if config.accounts.is_empty() {
        return;
    }
    let registry = match Registry::new(config, store) {
        Ok(r) => Arc::new(r),
        Err(e) => return report.fail("store", e.to_string()),
    };
    let tokens = match TokenManager::detached(config, registry) {
        Ok(t) => t,
        Err(e) => return report.fail("token endpoint", e),
    };
    for a in &config.accounts {
        let name = format!("account {}", a.email);
        match tokio::time::timeout(TOKEN_WAIT, tokens.get(&a.key())).await {
            Ok(Ok(token)) => {
                let left = token
                    .expires_at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                let how = if a.service_account_key.is_some() {
                    "service account"
                } else {
                    "refresh token"
                };
                report.ok(
                    &name,
                    format!(
                        "fresh access token from the {how}, valid for {}",
                        format_age(left.as_secs() as i64)
                    ),
                );
            }
            Ok(Err(e)) => report.fail(&name, e.with_advice()),
            Err(_) => report.fail(
                &name,
                format!(
                    "the token endpoint did not answer within {} s; check the network",
                    TOKEN_WAIT.as_secs()
                ),
            ),
        }
    }
}

#[derive(Default)]
struct Report {
    total: usize,
    failed: usize,
}

impl Report {
    fn ok(&mut self, what: &str, detail: String) {
        self.total += 1;
        println!("ok    {what}: {detail}");
    }

    fn fail(&mut self, what: &str, detail: String) {
        self.total += 1;
        self.failed += 1;
        println!("FAIL  {what}: {detail}");
    }

    fn counts(&self) -> (usize, usize) {
        (self.total, self.failed)
    }
}

/// Connect to the listener's upstream the way `serve` does and return its greeting.
async fn probe(l: &ListenerConfig) -> Result<String, String> {
    let target = l.upstream();
    let tls = xoauth2_proxy::tls::client_config(l.upstream_ca.as_deref())?;
    let tcp = TcpStream::connect((l.upstream_host.as_str(), l.upstream_port))
        .await
        .map_err(|e| format!("cannot connect to {target}: {e}"))?;
    let tls_failed = |e: std::io::Error| {
        format!("TLS with {target} failed: {e} (check upstream_tls, upstream and upstream_ca)")
    };
    match l.upstream_tls {
        UpstreamTls::Implicit => {
            let mut s = Stream::connect_tls(tcp, tls, &l.upstream_host)
                .await
                .map_err(tls_failed)?;
            let greeting = greeting(&mut s, l.protocol).await?;
            quit(&mut s, l.protocol).await;
            Ok(format!("TLS, greeting {}", printable(&greeting)))
        }
        UpstreamTls::Starttls => {
            let mut s = Stream::Plain(tcp);
            let greeting = greeting(&mut s, l.protocol).await?;
            match l.protocol {
                Protocol::Imap => {
                    send(&mut s, b"x1 STARTTLS\r\n").await?;
                    let reply = loop {
                        let line = read_line(&mut s).await?;
                        if line.starts_with("x1 ") {
                            break line;
                        }
                    };
                    expect(&reply, "x1 OK", "STARTTLS")?;
                }
                Protocol::Smtp => {
                    send(&mut s, b"EHLO localhost\r\n").await?;
                    expect(&smtp_reply(&mut s).await?, "250", "EHLO")?;
                    send(&mut s, b"STARTTLS\r\n").await?;
                    expect(&smtp_reply(&mut s).await?, "220", "STARTTLS")?;
                }
                Protocol::Pop3 => {
                    send(&mut s, b"STLS\r\n").await?;
                    expect(&read_line(&mut s).await?, "+OK", "STLS")?;
                }
            }
            let mut s = s
                .upgrade_client(tls, &l.upstream_host)
                .await
                .map_err(tls_failed)?;
            if l.protocol == Protocol::Smtp {
                send(&mut s, b"EHLO localhost\r\n").await?;
                expect(&smtp_reply(&mut s).await?, "250", "EHLO after STARTTLS")?;
            }
            quit(&mut s, l.protocol).await;
            Ok(format!("STARTTLS, greeting {}", printable(&greeting)))
        }
    }
}

async fn greeting(s: &mut Stream, protocol: Protocol) -> Result<String, String> {
    let (line, ok) = match protocol {
        Protocol::Imap => {
            let line = read_line(s).await?;
            let ok = line.starts_with("* OK") || line.starts_with("* PREAUTH");
            (line, ok)
        }
        Protocol::Smtp => {
            let line = smtp_reply(s).await?;
            let ok = line.starts_with("220");
            (line, ok)
        }
        Protocol::Pop3 => {
            let line = read_line(s).await?;
            let ok = line.starts_with("+OK");
            (line, ok)
        }
    };
    if ok {
        Ok(line)
    } else {
        Err(format!(
            "unexpected greeting {:?}: is this a {} server?",
            printable(&line),
            protocol.name()
        ))
    }
}

async fn quit(s: &mut Stream, protocol: Protocol) {
    let bye: &[u8] = match protocol {
        Protocol::Imap => b"x9 LOGOUT\r\n",
        Protocol::Smtp | Protocol::Pop3 => b"QUIT\r\n",
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = s.write_all(bye).await;
        let _ = s.shutdown().await;
    })
    .await;
}

fn expect(line: &str, prefix: &str, step: &str) -> Result<(), String> {
    if line.starts_with(prefix) {
        Ok(())
    } else {
        Err(format!("{step} refused: {}", printable(line)))
    }
}

async fn send(s: &mut Stream, bytes: &[u8]) -> Result<(), String> {
    s.write_all(bytes)
        .await
        .map_err(|e| format!("connection failed: {e}"))
}

/// One line, without its line end (at most 4 KiB).
async fn read_line(s: &mut Stream) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        match s.read(&mut byte).await {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("connection failed: {e}")),
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// An SMTP reply's last line (continuation lines have `-` after the code).
async fn smtp_reply(s: &mut Stream) -> Result<String, String> {
    loop {
        let line = read_line(s).await?;
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(line);
        }
    }
}

fn printable(s: &str) -> String {
    s.chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

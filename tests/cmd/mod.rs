//! Running the real `xoauth2-proxy` binary from tests: one-shot commands, and long-running
//! ones (`login`) whose output is read line by line while the test plays the browser.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::support::{FakeGoogle, CLIENT_ID, CLIENT_SECRET};

pub const BIN: &str = env!("CARGO_BIN_EXE_xoauth2-proxy");

/// `serve -c CONFIG` with `RUST_LOG=level`, its stderr collected line by line as it comes.
pub fn serve_logging(config: &Path, level: &str) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(config)
        .env("RUST_LOG", level)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    (child, log)
}

/// A finished command.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
}

/// A config dir with `config.toml` (state in `state/`) that uses the fake Google.
pub struct ConfigDir {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl ConfigDir {
    /// `[providers.google]` pointing at `google`, then `rest` (listeners, accounts).
    pub fn new(google: &FakeGoogle, rest: &str) -> ConfigDir {
        Self::with_secret(google, CLIENT_SECRET, rest)
    }

    pub fn with_secret(google: &FakeGoogle, client_secret: &str, rest: &str) -> ConfigDir {
        let text = format!(
            "state_dir = \"state\"\n\n[providers.google]\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{client_secret}\"\ntoken_url = \"{}\"\nauth_url = \"{}\"\n\n{rest}",
            google.token_url, google.auth_url
        );
        Self::from_text(&text)
    }

    pub fn from_text(text: &str) -> ConfigDir {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        ConfigDir { dir, path }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn config(&self) -> xoauth2_proxy::config::Config {
        xoauth2_proxy::config::Config::load(&self.path).unwrap()
    }

    pub fn store(&self) -> xoauth2_proxy::store::Store {
        let c = self.config();
        xoauth2_proxy::store::Store::open(&c.state_dir, &c.store).unwrap()
    }

    pub fn refresh_token(&self, email: &str) -> Option<String> {
        let (data, _) = self.store().load().unwrap();
        data.account(&xoauth2_proxy::account::AccountKey::new(email))
            .and_then(|a| a.refresh_token.as_ref())
            .map(|t| t.expose().to_string())
    }

    /// `args` followed by `-c CONFIG`.
    pub fn args<'a>(&'a self, args: &[&'a str]) -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.push("-c".into());
        v.push(self.path.display().to_string());
        v
    }
}

/// Run to completion (on a blocking thread, so the fakes on the runtime keep serving).
pub async fn run(args: Vec<String>, stdin: Option<String>) -> Output {
    tokio::task::spawn_blocking(move || run_blocking(&args, stdin.as_deref(), &[]))
        .await
        .unwrap()
}

pub fn run_blocking(args: &[String], stdin: Option<&str>, envs: &[(&str, &str)]) -> Output {
    let mut child = command(args, envs).spawn().expect("start xoauth2-proxy");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let _ = pipe.write_all(input.as_bytes());
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn command(args: &[String], envs: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("XOAUTH2_PROXY_CONFIG")
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        c.env(k, v);
    }
    c
}

/// The address after `bind=` on the first log line that contains every marker.
pub fn bind_in_log<'a>(
    mut lines: impl Iterator<Item = &'a str>,
    markers: &[&str],
) -> Option<std::net::SocketAddr> {
    lines.find_map(|l| {
        markers
            .iter()
            .all(|m| l.contains(m))
            .then(|| {
                l.split("bind=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .flatten()
    })
}

/// A command that keeps running while the test interacts with it.
pub struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    pub fn start(args: &[String], envs: &[(&str, &str)]) -> Running {
        let mut child = command(args, envs).spawn().expect("start xoauth2-proxy");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let all = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                all.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        let mut err = child.stderr.take().unwrap();
        let all = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Running {
            child,
            stdin,
            lines,
            stdout,
            stderr,
        }
    }

    /// The first stdout line starting with `prefix`, within `wait`.
    pub async fn line_starting_with(&mut self, prefix: &str, wait: Duration) -> String {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let next = tokio::task::block_in_place(|| self.lines.recv_timeout(left));
            match next {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(_) => panic!(
                    "no line starting with {prefix:?}; stdout:\n{}\nstderr:\n{}",
                    self.stdout.lock().unwrap(),
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    /// What it wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The address after `bind=` on the first stderr line that contains `marker`, within 20 s.
    pub async fn logged_bind(&self, marker: &str) -> std::net::SocketAddr {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.stderr();
            if let Some(addr) = bind_in_log(text.lines(), &[marker]) {
                return addr;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {marker:?} line; stderr:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Send it a signal (SIGHUP to reload).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill only sends a signal to the child this test started.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(sent, 0, "kill failed");
    }

    /// Wait until stderr has `n` lines containing `marker` (20 s at most); returns stderr.
    pub async fn logged_times(&self, marker: &str, n: usize) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.stderr();
            if text.lines().filter(|l| l.contains(marker)).count() >= n {
                return text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not {n} {marker:?} lines; stderr:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Send it SIGINT, as Ctrl-C in a terminal does.
    pub fn interrupt(&self) {
        self.signal(libc::SIGINT);
    }

    /// Type a line on its standard input.
    pub fn paste(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Wait for it to end (killing it after `wait`).
    pub async fn finish(mut self, wait: Duration) -> Output {
        let deadline = std::time::Instant::now() + wait;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "still running after {wait:?}; stdout:\n{}\nstderr:\n{}",
                    self.stdout.lock().unwrap(),
                    self.stderr.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Let the reader threads drain the pipes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stdout = self.stdout.lock().unwrap().clone();
        let stderr = self.stderr.lock().unwrap().clone();
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PEM of a PKCS#8 DER private key.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A fresh RSA-2048 service account key file in `dir`, as Google's console downloads it.
/// Returns its path and the public key (PKCS#1 DER) for the fake Google.
pub fn service_account_key(dir: &Path, client_email: &str) -> (PathBuf, Vec<u8>) {
    use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
    use aws_lc_rs::signature::KeyPair;
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der: Pkcs8V1Der = key.as_der().unwrap();
    let json = serde_json::json!({
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "0123456789abcdef",
        "private_key": pem("PRIVATE KEY", der.as_ref()),
        "client_email": client_email,
        "client_id": "109876543210987654321",
        "token_uri": "https://oauth2.googleapis.com/token",
    });
    let path = dir.join(format!("{}.json", client_email.replace('@', "_")));
    std::fs::write(&path, json.to_string()).unwrap();
    (path, key.public_key().as_ref().to_vec())
}

/// An HTTP client for playing the browser (`follow`: follow redirects like one).
pub fn browser(follow: bool) -> reqwest::Client {
    let tls = xoauth2_proxy::tls::client_config(None).unwrap();
    let policy = if follow {
        reqwest::redirect::Policy::limited(5)
    } else {
        reqwest::redirect::Policy::none()
    };
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .redirect(policy)
        .build()
        .unwrap()
}

/// GET `url` as a browser would (following redirects).
pub async fn open(url: &str) -> reqwest::Response {
    browser(true).get(url).send().await.unwrap()
}

//! A small line-oriented test client (plain TCP, implicit TLS or STARTTLS upgrade) for
//! driving the fakes, or the proxy, from tests. Every read has a timeout and panics on
//! failure, which is what a test wants.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Default time a single read may take before the test fails.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

pub struct TestClient {
    stream: Option<ClientStream>,
    buf: Vec<u8>,
    pub timeout: Duration,
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

async fn tls_connect(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    tokio::time::timeout(
        CLIENT_TIMEOUT,
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("TLS handshake timed out")
    .expect("TLS handshake failed")
}

impl TestClient {
    pub async fn connect(addr: SocketAddr) -> TestClient {
        let tcp = tokio::time::timeout(CLIENT_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        let _ = tcp.set_nodelay(true);
        TestClient {
            stream: Some(ClientStream::Plain(tcp)),
            buf: Vec::new(),
            timeout: CLIENT_TIMEOUT,
        }
    }

    /// Implicit TLS, verifying the server as `localhost`.
    pub async fn connect_tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> TestClient {
        let mut c = TestClient::connect(addr).await;
        c.start_tls(config).await;
        c
    }

    /// Upgrades to TLS (after STARTTLS/STLS was accepted), verifying `localhost`.
    pub async fn start_tls(&mut self, config: Arc<rustls::ClientConfig>) {
        self.start_tls_with_name(config, "localhost").await;
    }

    pub async fn start_tls_with_name(&mut self, config: Arc<rustls::ClientConfig>, name: &str) {
        assert!(
            self.buf.is_empty(),
            "unread plaintext before TLS upgrade: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        match self.stream.take() {
            Some(ClientStream::Plain(tcp)) => {
                self.stream = Some(ClientStream::Tls(Box::new(
                    tls_connect(tcp, config, name).await,
                )));
            }
            _ => panic!("start_tls on a TLS or closed stream"),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Some(ClientStream::Tls(_)))
    }

    pub async fn send(&mut self, data: impl AsRef<[u8]>) {
        let data = data.as_ref();
        let fut = async {
            match self.stream.as_mut().expect("stream closed") {
                ClientStream::Plain(s) => {
                    s.write_all(data).await?;
                    s.flush().await
                }
                ClientStream::Tls(s) => {
                    s.write_all(data).await?;
                    s.flush().await
                }
            }
        };
        tokio::time::timeout(CLIENT_TIMEOUT, fut)
            .await
            .expect("write timed out")
            .expect("write failed");
    }

    /// Sends `line` followed by CRLF.
    pub async fn send_line(&mut self, line: &str) {
        let mut data = line.as_bytes().to_vec();
        data.extend_from_slice(b"\r\n");
        self.send(data).await;
    }

    /// Reads more data; returns 0 on EOF.
    async fn fill(&mut self) -> usize {
        let mut chunk = vec![0u8; 64 * 1024];
        let timeout = self.timeout;
        let fut = async {
            match self.stream.as_mut() {
                None => Ok(0),
                Some(ClientStream::Plain(s)) => s.read(&mut chunk).await,
                Some(ClientStream::Tls(s)) => s.read(&mut chunk).await,
            }
        };
        let n = match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) if is_eofish(&e) => 0,
            Ok(Err(e)) => panic!("read failed: {e}"),
            Err(_) => panic!(
                "read timed out; unread buffer: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        };
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Next line without CRLF, or `None` at EOF.
    pub async fn try_read_line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// Next line without CRLF; panics at EOF.
    pub async fn read_line(&mut self) -> String {
        self.try_read_line()
            .await
            .expect("connection closed while reading a line")
    }

    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if self.fill().await == 0 {
                panic!("connection closed after {} of {n} bytes", self.buf.len());
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Asserts the peer closes the connection (EOF) within the timeout, discarding data.
    pub async fn expect_eof(&mut self) {
        self.buf.clear();
        while self.fill().await > 0 {
            self.buf.clear();
        }
    }

    /// Raw bytes already received but not yet read.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// IMAP: reads lines (and the literals they announce) up to and including the tagged
    /// line for `tag`. Returns the tagged line and the raw bytes of everything before it.
    pub async fn read_imap_tagged(&mut self, tag: &str) -> (String, Vec<u8>) {
        let mut raw = Vec::new();
        let prefix = format!("{tag} ");
        loop {
            let line = self.read_line().await;
            if line.starts_with(&prefix) {
                return (line, raw);
            }
            raw.extend_from_slice(line.as_bytes());
            raw.extend_from_slice(b"\r\n");
            if let Some(n) = imap_literal_len(&line) {
                let lit = self.read_exact(n).await;
                raw.extend_from_slice(&lit);
            }
        }
    }

    /// IMAP: the untagged/continuation lines and tagged line of a command, as text (for
    /// responses without literals).
    pub async fn read_imap_lines(&mut self, tag: &str) -> Vec<String> {
        let prefix = format!("{tag} ");
        let mut lines = Vec::new();
        loop {
            let line = self.read_line().await;
            let done = line.starts_with(&prefix);
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// SMTP: a (possibly multi-line) reply: the code and the full lines.
    pub async fn read_smtp_reply(&mut self) -> (u16, Vec<String>) {
        let mut lines = Vec::new();
        loop {
            let line = self.read_line().await;
            let last = line.as_bytes().get(3) != Some(&b'-');
            let code = line.get(..3).and_then(|c| c.parse::<u16>().ok());
            lines.push(line);
            if last {
                let code = code.unwrap_or_else(|| panic!("bad SMTP reply {lines:?}"));
                return (code, lines);
            }
        }
    }

    /// POP3: body of a multi-line response (after the status line), dot-unstuffed, up to
    /// the terminating `.` line (excluded). Lines keep their CRLF.
    pub async fn read_pop_multiline(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let i = loop {
                if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                    break i;
                }
                if self.fill().await == 0 {
                    panic!("connection closed inside a multi-line response");
                }
            };
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            if line == b".\r\n" {
                return out;
            }
            match line.strip_prefix(b".") {
                Some(rest) => out.extend_from_slice(rest),
                None => out.extend_from_slice(&line),
            }
        }
    }

    /// HTTP/1.1: reads one response (Content-Length bodies, or to EOF without one).
    pub async fn read_http_response(&mut self) -> HttpResponse {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.fill().await == 0 {
                panic!("connection closed inside HTTP response head");
            }
        };
        let head: Vec<u8> = self.buf.drain(..head_end).collect();
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_string(), v.trim().to_string()))
            .collect();
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("Content-Length"))
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let body = match length {
            Some(n) => self.read_exact(n).await,
            None => {
                while self.fill().await > 0 {}
                std::mem::take(&mut self.buf)
            }
        };
        HttpResponse {
            status,
            headers,
            body,
        }
    }

    /// Sends an HTTP/1.1 form POST on this (keep-alive) connection and reads the response.
    pub async fn http_post_form(
        &mut self,
        path: &str,
        body: &str,
        extra_headers: &[(&str, &str)],
    ) -> HttpResponse {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (n, v) in extra_headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        self.send(req).await;
        self.read_http_response().await
    }

    /// Closes the write side (TLS close_notify + FIN).
    pub async fn shutdown(&mut self) {
        let _ = match self.stream.as_mut() {
            Some(ClientStream::Plain(s)) => s.shutdown().await,
            Some(ClientStream::Tls(s)) => s.shutdown().await,
            None => Ok(()),
        };
    }
}

fn is_eofish(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// `{n}` at the end of an IMAP response line.
pub fn imap_literal_len(line: &str) -> Option<usize> {
    let inner = line.strip_suffix('}')?;
    let open = inner.rfind('{')?;
    inner[open + 1..].parse().ok()
}

//! A deliberately small HTTP/1.1 server: keep-alive, Content-Length bodies, `Expect:
//! 100-continue`, bounded request size and header read time. No chunked request bodies
//! (answered with 501 and closed).

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpStream;

use super::conn::{Conn, Stream};

/// Maximum size of request head + body.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Time allowed from the first byte of a request to the end of its body.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle keep-alive connection is kept open.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Request target as sent (`/token?x=y`).
    pub target: String,
    /// Path part of the target.
    pub path: String,
    /// Query part of the target (without `?`), possibly empty.
    pub query: String,
    /// `(name, value)`; names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".to_string(), content_type.to_string())],
            body: body.into(),
        }
    }

    /// JSON body with Google's content type and no-cache headers.
    pub fn json(status: u16, body: &serde_json::Value) -> Response {
        let mut r = Response::new(status, "application/json; charset=utf-8", body.to_string());
        r.headers.push((
            "Cache-Control".to_string(),
            "no-cache, no-store, max-age=0, must-revalidate".to_string(),
        ));
        r.headers
            .push(("Pragma".to_string(), "no-cache".to_string()));
        r
    }

    pub fn text(status: u16, body: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", body)
    }

    pub fn html(status: u16, body: &str) -> Response {
        Response::new(status, "text/html; charset=utf-8", body)
    }

    pub fn redirect(location: &str) -> Response {
        let mut r = Response::html(
            302,
            "<HTML><HEAD><TITLE>Moved Temporarily</TITLE></HEAD><BODY>Moved</BODY></HTML>",
        );
        r.headers
            .push(("Location".to_string(), location.to_string()));
        r
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

fn serialize(resp: &Response, close: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status)).into_bytes();
    for (n, v) in &resp.headers {
        out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n", resp.body.len()).as_bytes());
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&resp.body);
    out
}

/// Why a request could not be read.
enum ReadError {
    /// Peer went away; nothing to answer.
    Closed,
    /// Answer with this status and close.
    Status(u16),
}

struct Head {
    method: String,
    target: String,
    http10: bool,
    headers: Vec<(String, String)>,
}

fn find_head_end(data: &[u8]) -> Option<usize> {
    data.windows(4).position(|w| w == b"\r\n\r\n")
}

fn parse_head(raw: &[u8]) -> Result<Head, u16> {
    let text = std::str::from_utf8(raw).map_err(|_| 400u16)?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().ok_or(400u16)?;
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(400),
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(505),
    };
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line.split_once(':').ok_or(400u16)?;
        if name.is_empty() || name.contains(' ') || name.contains('\t') {
            return Err(400);
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        http10,
        headers,
    })
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Reads one request (the first byte is already buffered). Returns the request and whether
/// the connection should close after answering.
async fn read_request(conn: &mut Conn) -> Result<(Request, bool), ReadError> {
    let head_len = loop {
        if let Some(i) = find_head_end(conn.buffered()) {
            break i + 4;
        }
        if conn.buffered().len() > MAX_REQUEST {
            return Err(ReadError::Status(431));
        }
        match conn.fill().await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(_) => {}
        }
    };
    let head = parse_head(&conn.buffered()[..head_len]).map_err(ReadError::Status)?;
    conn.consume(head_len);

    if header(&head.headers, "Transfer-Encoding").is_some() {
        return Err(ReadError::Status(501));
    }
    let lengths: Vec<&str> = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Content-Length"))
        .map(|(_, v)| v.as_str())
        .collect();
    let content_length = match lengths.as_slice() {
        [] => 0,
        [one] => one.parse::<usize>().map_err(|_| ReadError::Status(400))?,
        _ => return Err(ReadError::Status(400)),
    };
    if head_len + content_length > MAX_REQUEST {
        return Err(ReadError::Status(413));
    }
    if content_length > 0 && has_token(&head.headers, "Expect", "100-continue") {
        conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| ReadError::Closed)?;
    }
    let body = conn
        .read_exact_bytes(content_length)
        .await
        .ok_or(ReadError::Closed)?;

    let close = if head.http10 {
        !has_token(&head.headers, "Connection", "keep-alive")
    } else {
        has_token(&head.headers, "Connection", "close")
    };
    let (path, query) = match head.target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (head.target.clone(), String::new()),
    };
    Ok((
        Request {
            method: head.method,
            target: head.target,
            path,
            query,
            headers: head.headers,
            body,
        },
        close,
    ))
}

/// Serves requests on one connection until the peer closes, asks to close, errs, or idles
/// out.
pub async fn serve_connection<H, Fut>(tcp: TcpStream, handler: H)
where
    H: Fn(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let mut conn = Conn::new(Stream::Plain(tcp));
    loop {
        if conn.buffered().is_empty() {
            match tokio::time::timeout(IDLE_TIMEOUT, conn.fill()).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
        let (request, close) =
            match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut conn)).await {
                Ok(Ok(r)) => r,
                Ok(Err(ReadError::Closed)) => return,
                Ok(Err(ReadError::Status(status))) => {
                    let resp = Response::text(status, reason(status));
                    let _ = conn.send(&serialize(&resp, true)).await;
                    conn.shutdown().await;
                    return;
                }
                Err(_) => {
                    let resp = Response::text(408, reason(408));
                    let _ = conn.send(&serialize(&resp, true)).await;
                    conn.shutdown().await;
                    return;
                }
            };
        let response = handler(request).await;
        if conn.send(&serialize(&response, close)).await.is_err() {
            return;
        }
        if close {
            conn.shutdown().await;
            return;
        }
    }
}

/// Decodes `application/x-www-form-urlencoded` (also used for query strings).
pub fn parse_form(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &[][..]),
            };
            (form_decode(k), form_decode(v))
        })
        .collect()
}

/// Percent-decodes one form component (`+` is a space; malformed escapes are kept as-is).
pub fn form_decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(s[i + 1]), hex(s[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes a form component (unreserved characters kept, space as `%20`).
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

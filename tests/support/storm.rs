//! Wrong logins from many source addresses, for tests and the benchmark that watch the
//! proxy's memory under a storm of them. All of 127.0.0.0/8 is this host on Linux, so each
//! login can come from an address of its own and meet no per-source delay.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// The `i`-th source address of the 127.`net`.0.0/16 block.
pub fn source(net: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, net, (i / 250 % 256) as u8, (i % 250 + 1) as u8)
}

async fn read_line(tcp: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut line = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), tcp.read_until(b'\n', &mut line));
    match read.await {
        Ok(Ok(n)) if n > 0 => Ok(String::from_utf8_lossy(&line).into_owned()),
        Ok(Ok(_)) => Err("closed".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 60 s".into()),
    }
}

/// An IMAP LOGIN with `username` sent as a literal (any bytes, up to the proxy's 8 KiB) and a
/// wrong password, from `source`; the tagged answer.
pub async fn imap_login_from(
    addr: SocketAddr,
    source: Ipv4Addr,
    username: &[u8],
) -> Result<String, String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind((source, 0).into())
        .map_err(|e| format!("bind {source}: {e}"))?;
    let tcp = socket.connect(addr).await.map_err(|e| e.to_string())?;
    let mut tcp = BufReader::new(tcp);
    let io = |e: std::io::Error| e.to_string();
    read_line(&mut tcp).await?;
    let command = format!("a1 LOGIN {{{}}}\r\n", username.len());
    tcp.get_mut()
        .write_all(command.as_bytes())
        .await
        .map_err(io)?;
    let go_on = read_line(&mut tcp).await?;
    if !go_on.starts_with("+ ") {
        return Err(format!("literal refused: {go_on}"));
    }
    tcp.get_mut().write_all(username).await.map_err(io)?;
    tcp.get_mut()
        .write_all(b" wrong-password\r\n")
        .await
        .map_err(io)?;
    loop {
        let line = read_line(&mut tcp).await?;
        if line.starts_with("a1 ") {
            return Ok(line);
        }
    }
}

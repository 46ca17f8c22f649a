//! Where a connection really comes from. Behind an L4 balancer every connection's peer is the
//! balancer; on a listener with `proxy_protocol = true` the balancer's PROXY header (v1 or v2)
//! names the client, and the throttle, the logs and the limits use that address. Headers are
//! believed only from `trusted_proxies`; anyone else is refused before a byte is read.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ListenerConfig;
use crate::protocol::proxy_header::{self, Origin, Version, PREFIX_LEN, V1_MAX};

/// A balancer sends its header at once; a peer that doesn't is not one.
const HEADER_WAIT: Duration = Duration::from_secs(5);

/// The client's address for a new connection from `peer`: `peer` itself, or the one its PROXY
/// header names. Err with a reason to log when the connection must be closed.
pub async fn client_address(
    config: &ListenerConfig,
    tcp: &mut TcpStream,
    peer: SocketAddr,
) -> Result<SocketAddr, String> {
    if !config.proxy_protocol {
        return Ok(peer);
    }
    if !config
        .trusted_proxies
        .iter()
        .any(|n| n.contains(&peer.ip()))
    {
        return Err(format!(
            "{peer} is not in trusted_proxies, and this listener takes only connections that start with a PROXY header from one"
        ));
    }
    let origin = tokio::time::timeout(HEADER_WAIT, read_header(tcp))
        .await
        .map_err(|_| {
            format!(
                "no PROXY header from {peer} within {} s",
                HEADER_WAIT.as_secs()
            )
        })?
        .map_err(|e| format!("bad PROXY header from {peer}: {e}"))?;
    Ok(match origin {
        Origin::Client(addr) => addr,
        Origin::Local => peer,
    })
}

/// Exactly the header's bytes: nothing of the client's own protocol is consumed.
async fn read_header(tcp: &mut TcpStream) -> Result<Origin, String> {
    let io = |e: std::io::Error| e.to_string();
    let mut prefix = [0u8; PREFIX_LEN];
    tcp.read_exact(&mut prefix).await.map_err(io)?;
    match proxy_header::version(&prefix).map_err(|e| e.0.to_string())? {
        Version::V1 => {
            let mut line = prefix.to_vec();
            // One byte at a time up to 107: the line's end is the header's end.
            while !line.ends_with(b"\r\n") {
                if line.len() >= V1_MAX {
                    return Err("version 1 header longer than 107 bytes".into());
                }
                line.push(tcp.read_u8().await.map_err(io)?);
            }
            proxy_header::parse_v1(&line).map_err(|e| e.0.to_string())
        }
        Version::V2 => {
            let mut head = [0u8; 16];
            head[..PREFIX_LEN].copy_from_slice(&prefix);
            tcp.read_exact(&mut head[PREFIX_LEN..]).await.map_err(io)?;
            let len = proxy_header::v2_body_len(&head).map_err(|e| e.0.to_string())?;
            let mut body = vec![0u8; len];
            tcp.read_exact(&mut body).await.map_err(io)?;
            proxy_header::parse_v2(&head, &body).map_err(|e| e.0.to_string())
        }
    }
}

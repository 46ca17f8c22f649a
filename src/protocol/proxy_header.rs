//! The PROXY protocol header (HAProxy's spec, versions 1 and 2) that an L4 balancer puts before
//! the client's first byte, so the proxy learns the client's real address. Sans-I/O: the reader
//! takes the first 8 bytes to tell the versions apart, then exactly the header's length, so not
//! one byte of the client's own protocol (a TLS ClientHello may follow at once) is consumed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Version 2's fixed 12-byte signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Bytes to read first: enough to tell the versions apart, fewer than either header.
pub const PREFIX_LEN: usize = 8;
/// A version 1 header is at most 107 bytes with its CRLF.
pub const V1_MAX: usize = 107;
/// Bound on a version 2 header's address block (addresses plus TLVs): HAProxy's largest
/// address family needs 216; TLVs beyond a small budget are refused rather than buffered.
pub const V2_MAX_BODY: usize = 512;

/// What the header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client's address as the balancer saw it.
    Client(SocketAddr),
    /// The balancer speaks for itself (health checks: v2 LOCAL, v1 UNKNOWN, or a non-IP
    /// family): keep the connection's own peer address.
    Local,
}

/// Why a header was refused; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

/// Which version the first [`PREFIX_LEN`] bytes start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

pub fn version(prefix: &[u8]) -> Result<Version, Invalid> {
    if prefix.starts_with(b"PROXY ") {
        Ok(Version::V1)
    } else if prefix.len() >= PREFIX_LEN && prefix[..PREFIX_LEN] == V2_SIGNATURE[..PREFIX_LEN] {
        Ok(Version::V2)
    } else {
        Err(Invalid("no PROXY protocol header"))
    }
}

/// A whole version 1 line, CRLF included: `PROXY TCP4 1.2.3.4 5.6.7.8 1234 143\r\n`.
pub fn parse_v1(line: &[u8]) -> Result<Origin, Invalid> {
    let text = line
        .strip_suffix(b"\r\n")
        .and_then(|l| std::str::from_utf8(l).ok())
        .ok_or(Invalid("version 1 header without CRLF or not ASCII"))?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(Invalid("version 1 header does not start with PROXY"));
    }
    let family = parts.next().ok_or(Invalid("version 1 header too short"))?;
    if family == "UNKNOWN" {
        return Ok(Origin::Local);
    }
    let fields: Vec<&str> = parts.collect();
    let [src, _dst, sport, _dport] = fields[..] else {
        return Err(Invalid("version 1 header needs 4 address fields"));
    };
    let ip: IpAddr = match family {
        "TCP4" => src.parse::<Ipv4Addr>().map(IpAddr::V4),
        "TCP6" => src.parse::<Ipv6Addr>().map(IpAddr::V6),
        _ => return Err(Invalid("version 1 family is not TCP4, TCP6 or UNKNOWN")),
    }
    .map_err(|_| Invalid("version 1 source address does not parse"))?;
    // Ports are decimal without leading zeros or signs; u16 parsing alone would take "+1".
    if sport.is_empty() || !sport.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Invalid("version 1 source port does not parse"));
    }
    let port: u16 = sport
        .parse()
        .map_err(|_| Invalid("version 1 source port does not parse"))?;
    Ok(Origin::Client(SocketAddr::new(ip, port)))
}

/// The length of the address block that follows a version 2 header's first 16 bytes.
pub fn v2_body_len(head: &[u8; 16]) -> Result<usize, Invalid> {
    if head[..12] != V2_SIGNATURE {
        return Err(Invalid("version 2 signature mismatch"));
    }
    if head[12] >> 4 != 2 {
        return Err(Invalid("version 2 header with another version number"));
    }
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    if len > V2_MAX_BODY {
        return Err(Invalid("version 2 header too long"));
    }
    Ok(len)
}

/// A version 2 header: its first 16 bytes and the address block (TLVs are skipped).
pub fn parse_v2(head: &[u8; 16], body: &[u8]) -> Result<Origin, Invalid> {
    v2_body_len(head)?;
    match head[12] & 0x0f {
        0x0 => return Ok(Origin::Local),
        0x1 => {}
        _ => return Err(Invalid("version 2 command is neither LOCAL nor PROXY")),
    }
    let short = || Invalid("version 2 address block too short for its family");
    match head[13] >> 4 {
        // AF_INET: src(4) dst(4) sport(2) dport(2)
        0x1 => {
            let b = body.get(..12).ok_or_else(short)?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = u16::from_be_bytes([b[8], b[9]]);
            Ok(Origin::Client(SocketAddr::new(ip.into(), port)))
        }
        // AF_INET6: src(16) dst(16) sport(2) dport(2)
        0x2 => {
            let b = body.get(..36).ok_or_else(short)?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[..16]);
            let port = u16::from_be_bytes([b[32], b[33]]);
            Ok(Origin::Client(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                port,
            )))
        }
        // AF_UNSPEC, AF_UNIX: no IP address to learn.
        _ => Ok(Origin::Local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> ([u8; 16], Vec<u8>) {
        let mut head = [0u8; 16];
        head[..12].copy_from_slice(&V2_SIGNATURE);
        head[12] = 0x20 | command;
        head[13] = family;
        head[14..].copy_from_slice(&(body.len() as u16).to_be_bytes());
        (head, body.to_vec())
    }

    #[test]
    fn version_1_tcp4_and_tcp6_give_the_client_address() {
        assert_eq!(version(b"PROXY TC").unwrap(), Version::V1);
        assert_eq!(
            parse_v1(b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 143\r\n").unwrap(),
            Origin::Client("192.0.2.7:51000".parse().unwrap())
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 993\r\n").unwrap(),
            Origin::Client("[2001:db8::7]:51000".parse().unwrap())
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n").unwrap(), Origin::Local);
    }

    #[test]
    fn version_1_garbage_is_refused() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 143\n"[..],
            b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 143\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 70000 143\r\n",
            b"PROXY TCP4 2001:db8::7 198.51.100.1 1 143\r\n",
            b"PROXY TCP5 192.0.2.7 198.51.100.1 1 143\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2 3\r\n",
            b"PROXY TCP4 \xff 198.51.100.1 1 2\r\n",
        ] {
            assert!(parse_v1(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(version(b"a1 LOGIN").is_err());
    }

    #[test]
    fn version_2_proxy_command_gives_the_client_address() {
        let mut body = vec![192, 0, 2, 7, 198, 51, 100, 1];
        body.extend_from_slice(&51000u16.to_be_bytes());
        body.extend_from_slice(&143u16.to_be_bytes());
        // A TLV after the addresses (PP2_TYPE_NOOP) is skipped.
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0x00]);
        let (head, body) = v2(0x1, 0x11, &body);
        assert_eq!(version(&head[..PREFIX_LEN]).unwrap(), Version::V2);
        assert_eq!(v2_body_len(&head).unwrap(), body.len());
        assert_eq!(
            parse_v2(&head, &body).unwrap(),
            Origin::Client("192.0.2.7:51000".parse().unwrap())
        );
        let mut six = vec![0u8; 36];
        six[..16].copy_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        six[32..34].copy_from_slice(&993u16.to_be_bytes());
        let (head, body) = v2(0x1, 0x21, &six);
        assert_eq!(
            parse_v2(&head, &body).unwrap(),
            Origin::Client("[2001:db8::7]:993".parse().unwrap())
        );
    }

    #[test]
    fn version_2_local_and_unspec_keep_the_peer_and_bad_headers_are_refused() {
        let (head, body) = v2(0x0, 0x00, &[]);
        assert_eq!(parse_v2(&head, &body).unwrap(), Origin::Local);
        let (head, body) = v2(0x1, 0x00, &[]);
        assert_eq!(parse_v2(&head, &body).unwrap(), Origin::Local);
        let (head, body) = v2(0x1, 0x11, &[1, 2, 3]);
        assert!(parse_v2(&head, &body).is_err());
        let (mut head, body) = v2(0x1, 0x11, &[0; 12]);
        head[12] = 0x11;
        assert!(parse_v2(&head, &body).is_err());
        let (head, _) = v2(0x1, 0x11, &vec![0; V2_MAX_BODY + 1]);
        assert!(v2_body_len(&head).is_err());
        let (mut head, _) = v2(0x1, 0x11, &[0; 12]);
        head[3] = b'X';
        assert!(v2_body_len(&head).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_parsed_or_refused_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..700)) {
            let _ = version(&bytes);
            let _ = parse_v1(&bytes);
            if bytes.len() >= 16 {
                let mut head = [0u8; 16];
                head.copy_from_slice(&bytes[..16]);
                head[..12].copy_from_slice(&V2_SIGNATURE);
                let _ = v2_body_len(&head);
                let _ = parse_v2(&head, &bytes[16..]);
            }
        }

        #[test]
        fn generated_headers_name_their_client(a in proptest::num::u32::ANY, port in proptest::num::u16::ANY, six in proptest::num::u128::ANY) {
            let v4 = SocketAddr::new(Ipv4Addr::from(a).into(), port);
            let line = format!("PROXY TCP4 {} 127.0.0.1 {port} 143\r\n", v4.ip());
            proptest::prop_assert!(line.len() <= V1_MAX);
            proptest::prop_assert_eq!(parse_v1(line.as_bytes()).unwrap(), Origin::Client(v4));
            let v6 = SocketAddr::new(Ipv6Addr::from(six).into(), port);
            let line = format!("PROXY TCP6 {} ::1 {port} 993\r\n", v6.ip());
            proptest::prop_assert!(line.len() <= V1_MAX);
            proptest::prop_assert_eq!(parse_v1(line.as_bytes()).unwrap(), Origin::Client(v6));
            let mut body = a.to_be_bytes().to_vec();
            body.extend_from_slice(&[127, 0, 0, 1]);
            body.extend_from_slice(&port.to_be_bytes());
            body.extend_from_slice(&143u16.to_be_bytes());
            let (head, body) = v2(0x1, 0x11, &body);
            proptest::prop_assert_eq!(parse_v2(&head, &body).unwrap(), Origin::Client(v4));
        }
    }
}

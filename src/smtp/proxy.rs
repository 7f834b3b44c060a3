//! The PROXY protocol header (HAProxy's `doc/proxy-protocol.txt`, versions 1 and 2) that a load
//! balancer listed in `smtp.proxy_from` sends before anything else, naming the real client.
//!
//! [`parse`] is a pure function over the octets received so far: it says whether they hold a whole
//! header (and how long it is, so what follows stays with the SMTP stream), need more, or cannot be
//! one. [`read_header`] reads from a stream until it has one; the deadline, and what happens to a
//! connection without a valid header, are the server's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest version 1 header, CRLF included (proxy-protocol.txt 2.1: "107 characters").
pub const V1_MAX_LEN: usize = 107;
/// Longest version 2 header we take, TLVs included. The format allows 16 + 65535 octets; HAProxy's
/// TLVs (ALPN, authority, SSL details, unique ID) fit well inside this, as in nginx's limit.
pub const V2_MAX_LEN: usize = 4096;
/// The version 2 signature (proxy-protocol.txt 2.2), chosen never to start a text protocol's line.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version and command, family and transport, length (proxy-protocol.txt 2.2).
const V2_FIXED_LEN: usize = 16;
const V1_PREFIX: &[u8] = b"PROXY ";

/// What a complete header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A relayed connection from `client` to `server` (v1 TCP4/TCP6, v2 PROXY over INET/INET6).
    Proxied { client: SocketAddr, server: SocketAddr },
    /// The proxy speaks for itself (v2 LOCAL, such as a health check) or does not know the client
    /// (v1 UNKNOWN, v2 AF_UNSPEC): proxy-protocol.txt has the receiver use the real connection's
    /// addresses then.
    Local,
}

/// How far [`parse`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The octets so far are the beginning of a header; read more.
    Incomplete,
    /// A whole header of `length` octets; anything after it belongs to the SMTP stream.
    Complete { header: ProxyHeader, length: usize },
}

/// Why the octets received cannot be a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol header (neither \"PROXY \" nor the version 2 signature)")]
    NotProxy,
    #[error("version 1 header longer than {V1_MAX_LEN} octets without CRLF")]
    V1TooLong,
    #[error("version 1 header: {0}")]
    V1Malformed(&'static str),
    #[error("version 2 header: unknown version {0:#x}")]
    V2Version(u8),
    #[error("version 2 header: unknown command {0:#x}")]
    V2Command(u8),
    #[error("version 2 header: unsupported address family and transport {0:#04x}")]
    V2Family(u8),
    #[error("version 2 header: address block of {0} octets is too short for its family")]
    V2ShortAddress(usize),
    #[error("version 2 header of {0} octets is longer than the {V2_MAX_LEN} taken")]
    V2TooLong(usize),
}

/// Why [`read_header`] found no header.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed before a whole PROXY protocol header")]
    Closed,
    #[error("read error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Invalid(#[from] ProxyError),
}

/// Reads until `reader` has sent a whole header, however it is split across reads. Returns it with
/// the octets that came after it in the same reads: they are the client's, and belong to the SMTP
/// stream. What is kept stays bounded: [`parse`] fails once a header would pass its length limit.
pub async fn read_header<R: AsyncRead + Unpin>(reader: &mut R) -> Result<(ProxyHeader, Vec<u8>), ReadError> {
    let mut received = Vec::with_capacity(V1_MAX_LEN);
    let mut chunk = [0u8; 512];
    loop {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        received.extend_from_slice(&chunk[..n]);
        if let Parsed::Complete { header, length } = parse(&received)? {
            return Ok((header, received.split_off(length)));
        }
    }
}

/// Reads a PROXY header of either version from the start of `input`.
pub fn parse(input: &[u8]) -> Result<Parsed, ProxyError> {
    if starts_like(input, V1_PREFIX) {
        return if input.len() < V1_PREFIX.len() { Ok(Parsed::Incomplete) } else { parse_v1(input) };
    }
    if starts_like(input, V2_SIGNATURE) {
        return if input.len() < V2_FIXED_LEN { Ok(Parsed::Incomplete) } else { parse_v2(input) };
    }
    Err(ProxyError::NotProxy)
}

/// Does `input` begin with `prefix`, or is it (so far) a beginning of `prefix`?
fn starts_like(input: &[u8], prefix: &[u8]) -> bool {
    let n = input.len().min(prefix.len());
    input[..n] == prefix[..n]
}

/// Version 1 (proxy-protocol.txt 2.1): `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n`, single spaces,
/// or `PROXY UNKNOWN` with anything up to the CRLF.
fn parse_v1(input: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &input[..input.len().min(V1_MAX_LEN)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if input.len() >= V1_MAX_LEN { Err(ProxyError::V1TooLong) } else { Ok(Parsed::Incomplete) };
    };
    let Some(line) = window[..lf].strip_suffix(b"\r") else {
        return Err(ProxyError::V1Malformed("line ends in a bare LF, not CRLF"));
    };
    let length = lf + 1;
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1Malformed("not ASCII"))?;
    let mut fields = line.split(' ');
    fields.next(); // "PROXY", checked by the caller.
    let header = match fields.next() {
        // The rest of an UNKNOWN line is to be ignored (2.1).
        Some("UNKNOWN") => return Ok(Parsed::Complete { header: ProxyHeader::Local, length }),
        Some("TCP4") => v1_addresses(&mut fields, true)?,
        Some("TCP6") => v1_addresses(&mut fields, false)?,
        _ => return Err(ProxyError::V1Malformed("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    if fields.next().is_some() {
        return Err(ProxyError::V1Malformed("more fields than source, destination and ports"));
    }
    Ok(Parsed::Complete { header, length })
}

/// The four fields after TCP4 or TCP6: source and destination address, source and destination port.
fn v1_addresses<'a>(fields: &mut impl Iterator<Item = &'a str>, ipv4: bool) -> Result<ProxyHeader, ProxyError> {
    let mut next = |missing| fields.next().ok_or(ProxyError::V1Malformed(missing));
    let (source, destination) = (next("no source address")?, next("no destination address")?);
    let (source_port, destination_port) = (next("no source port")?, next("no destination port")?);
    let address = |text: &str| -> Result<IpAddr, ProxyError> {
        let parsed =
            if ipv4 { text.parse::<Ipv4Addr>().map(IpAddr::V4) } else { text.parse::<Ipv6Addr>().map(IpAddr::V6) };
        parsed.map_err(|_| ProxyError::V1Malformed(if ipv4 { "bad IPv4 address" } else { "bad IPv6 address" }))
    };
    let (client, server) = (address(source)?, address(destination)?);
    Ok(ProxyHeader::Proxied {
        client: SocketAddr::new(client, v1_port(source_port)?),
        server: SocketAddr::new(server, v1_port(destination_port)?),
    })
}

/// A port: 0 to 65535 in decimal, digits only (2.1 gives no sign and no leading zeros).
fn v1_port(text: &str) -> Result<u16, ProxyError> {
    let bad = ProxyError::V1Malformed("bad port");
    let canonical =
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && (text == "0" || !text.starts_with('0'));
    if !canonical {
        return Err(bad);
    }
    text.parse().map_err(|_| bad)
}

/// Version 2 (proxy-protocol.txt 2.2): the signature, version 2 and a command, the address family
/// and transport, the length of what follows, then the addresses and optional TLVs (skipped).
fn parse_v2(input: &[u8]) -> Result<Parsed, ProxyError> {
    let version_command = input[12];
    if version_command >> 4 != 2 {
        return Err(ProxyError::V2Version(version_command >> 4));
    }
    let family_transport = input[13];
    let rest = usize::from(u16::from_be_bytes([input[14], input[15]]));
    let length = V2_FIXED_LEN + rest;
    if length > V2_MAX_LEN {
        return Err(ProxyError::V2TooLong(length));
    }
    let command = version_command & 0x0f;
    if command > 1 {
        return Err(ProxyError::V2Command(command));
    }
    if input.len() < length {
        return Ok(Parsed::Incomplete);
    }
    let header = if command == 0 {
        // LOCAL: the proxy's own connection (health checks); "the receiver must accept this
        // connection as valid and must use the real connection endpoints and discard the protocol
        // block including the family which is ignored".
        ProxyHeader::Local
    } else {
        v2_addresses(family_transport, &input[V2_FIXED_LEN..length])?
    };
    Ok(Parsed::Complete { header, length })
}

/// The address block of a v2 PROXY command. Only TCP over IPv4 or IPv6 names a client an SMTP
/// session can have; AF_UNSPEC means the proxy does not know it (the receiver may then use the real
/// endpoints, 2.2); UDP and UNIX sockets are refused.
fn v2_addresses(family_transport: u8, block: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let short = || ProxyError::V2ShortAddress(block.len());
    match family_transport {
        0x00 => Ok(ProxyHeader::Local),
        // AF_INET, STREAM: source and destination address (4 octets each), then the two ports.
        0x11 => {
            let a: &[u8; 12] = block.get(..12).and_then(|b| b.try_into().ok()).ok_or_else(short)?;
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]));
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            Ok(ProxyHeader::Proxied {
                client: SocketAddr::new(ip(0), port(8)),
                server: SocketAddr::new(ip(4), port(10)),
            })
        }
        // AF_INET6, STREAM: 16 octets each, then the two ports.
        0x21 => {
            let a: &[u8; 36] = block.get(..36).and_then(|b| b.try_into().ok()).ok_or_else(short)?;
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            Ok(ProxyHeader::Proxied {
                client: SocketAddr::new(ip(0), port(32)),
                server: SocketAddr::new(ip(16), port(34)),
            })
        }
        other => Err(ProxyError::V2Family(other)),
    }
}

#[cfg(test)]
mod tests;

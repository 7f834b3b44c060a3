//! A minimal HTTPS GET for MTA-STS policies (RFC 8461 3.3): HTTP/1.1 over tokio-rustls with
//! `Connection: close`, the server certificate verified for the host name, no redirects, a
//! `text/plain` body of at most 64 KiB (sent with Content-Length, chunked, or up to the close),
//! all within one timeout. A full HTTP client would bring a dozen crates for this one request.

use rustls_pki_types::ServerName;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// RFC 8461 3.3: senders may limit the policy's size; 64 KiB is plenty for a few `mx` lines.
pub const MAX_BODY: usize = 64 * 1024;
/// The status line and header fields.
const MAX_HEAD: usize = 16 * 1024;

/// Why a policy could not be fetched; the text is logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

/// Fetches over HTTPS with verified certificates.
pub struct Fetcher {
    /// Verifies against the Web PKI roots and `delivery.tls_ca_file`.
    pub connector: TlsConnector,
    /// 443, or the test's port (`delivery.mta_sts_port`).
    pub port: u16,
    /// For the whole request: connect, handshake, request and response.
    pub timeout: Duration,
}

impl Fetcher {
    /// A fetcher with the verified TLS configuration of `settings`.
    pub fn new(settings: &super::ClientSettings, delivery: &crate::config::DeliveryConfig) -> Fetcher {
        Fetcher {
            connector: settings.verified.clone(),
            port: delivery.mta_sts_port,
            // RFC 8461 3.3 leaves the timeout to the sender; a minute, or less when SMTP commands
            // themselves may take less.
            timeout: delivery.command_timeout.0.min(Duration::from_secs(60)),
        }
    }

    /// GETs `path` from `host`, trying its addresses in turn; returns the body.
    pub async fn get(&self, host: &str, addrs: &[IpAddr], path: &str) -> Result<Vec<u8>, FetchError> {
        let mut last = FetchError(format!("{host} has no address"));
        for ip in addrs {
            let addr = SocketAddr::new(*ip, self.port);
            match tokio::time::timeout(self.timeout, self.get_from(host, addr, path)).await {
                Ok(Ok(body)) => return Ok(body),
                Ok(Err(e)) => last = FetchError(format!("https://{host}{path} ({addr}): {e}")),
                Err(_) => last = FetchError(format!("https://{host}{path} ({addr}): timed out")),
            }
        }
        Err(last)
    }

    async fn get_from(&self, host: &str, addr: SocketAddr, path: &str) -> Result<Vec<u8>, FetchError> {
        let io = |e: std::io::Error| FetchError(e.to_string());
        let name = ServerName::try_from(host.to_string()).map_err(|e| FetchError(e.to_string()))?;
        let tcp = TcpStream::connect(addr).await.map_err(io)?;
        let mut tls = self.connector.connect(name, tcp).await.map_err(|e| FetchError(format!("TLS: {e}")))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bartleby\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(request.as_bytes()).await.map_err(io)?;
        tls.flush().await.map_err(io)?;
        let mut response = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        // Head, body and chunk framing; anything longer is refused rather than buffered.
        let limit = MAX_HEAD + MAX_BODY + MAX_BODY / 4;
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
                // A server that closes without TLS close_notify: what was read is judged by its
                // framing (a Content-Length or the last chunk), which `parse_response` checks.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(io(e)),
            }
            if response.len() > limit {
                return Err(FetchError(format!("the response is larger than {limit} octets")));
            }
        }
        parse_response(&response)
    }
}

/// Checks a whole HTTP/1.1 response and returns its body: status 200 (redirects are not followed,
/// section 3.3), `Content-Type: text/plain`, at most [`MAX_BODY`] octets, framed by
/// Content-Length, chunked transfer coding or the end of the connection.
pub fn parse_response(response: &[u8]) -> Result<Vec<u8>, FetchError> {
    let bad = |problem: String| Err(FetchError(problem));
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return bad("no complete response head".into());
    };
    if end > MAX_HEAD {
        return bad("the response head is too large".into());
    }
    let head = std::str::from_utf8(&response[..end]).map_err(|_| FetchError("the response head is not text".into()))?;
    let body = &response[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let mut words = status.splitn(3, ' ');
    let (version, code) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") {
        return bad(format!("not an HTTP/1 response: {status:?}"));
    }
    if code != "200" {
        return bad(format!("HTTP status {status:?} (redirects are not followed)"));
    }
    let (mut content_type, mut length, mut chunked) = (None, None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return bad(format!("bad header line {line:?}"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => content_type = Some(value.to_ascii_lowercase()),
            "content-length" => {
                let n = value.parse::<usize>().map_err(|_| FetchError(format!("bad Content-Length {value:?}")))?;
                if length.replace(n).is_some_and(|old| old != n) {
                    return bad("conflicting Content-Length fields".into());
                }
            }
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    // Section 3.3: the policy is text/plain (parameters such as charset allowed).
    let media_type = content_type.as_deref().map(|t| t.split(';').next().unwrap_or("").trim().to_string());
    if media_type.as_deref() != Some("text/plain") {
        return bad(format!("Content-Type {content_type:?}, expected text/plain"));
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        if n > MAX_BODY {
            return bad(format!("the policy has {n} octets, more than {MAX_BODY}"));
        }
        match body.get(..n) {
            Some(body) => body.to_vec(),
            None => return bad(format!("the body ended after {} of {n} octets", body.len())),
        }
    } else {
        body.to_vec()
    };
    if body.len() > MAX_BODY {
        return bad(format!("the policy is larger than {MAX_BODY} octets"));
    }
    Ok(body)
}

/// Decodes chunked transfer coding (RFC 9112 7.1), which must end with the last chunk.
fn dechunk(mut input: &[u8]) -> Result<Vec<u8>, FetchError> {
    let bad = |problem: &str| Err(FetchError(format!("chunked body: {problem}")));
    let mut body = Vec::new();
    loop {
        let Some(eol) = input.windows(2).position(|w| w == b"\r\n") else { return bad("cut short") };
        let line = std::str::from_utf8(&input[..eol]).map_err(|_| FetchError("chunked body: bad size line".into()))?;
        let hex = line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(hex, 16) else { return bad("bad chunk size") };
        input = &input[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return bad("larger than the policy limit");
        }
        let (Some(chunk), Some(b"\r\n")) = (input.get(..size), input.get(size..size + 2)) else {
            return bad("cut short");
        };
        body.extend_from_slice(chunk);
        input = &input[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "version: STSv1\r\nmode: enforce\r\nmx: a.test\r\nmax_age: 60\r\n";

    #[test]
    fn content_length_and_close_delimited() {
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{POLICY}",
            POLICY.len()
        );
        assert_eq!(parse_response(response.as_bytes()).unwrap(), POLICY.as_bytes());
        let response = format!("HTTP/1.0 200 OK\r\ncontent-type: TEXT/PLAIN\r\n\r\n{POLICY}");
        assert_eq!(parse_response(response.as_bytes()).unwrap(), POLICY.as_bytes());
    }

    #[test]
    fn chunked() {
        let response = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nversi\r\n3;ext=1\r\non:\r\n0\r\n\r\n";
        assert_eq!(parse_response(response.as_bytes()).unwrap(), b"version:");
        let cut = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nversi\r\n";
        assert!(parse_response(cut.as_bytes()).is_err(), "no last chunk");
        let bad_size = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(parse_response(bad_size.as_bytes()).is_err());
        let huge =
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\n";
        assert!(parse_response(huge.as_bytes()).is_err());
    }

    #[test]
    fn refusals() {
        for bad in [
            "".to_string(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n".to_string(),
            "HTTP/1.1 301 Moved\r\nLocation: https://elsewhere/\r\nContent-Type: text/plain\r\n\r\n".to_string(),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n\r\n".to_string(),
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n{POLICY}"),
            format!("HTTP/1.1 200 OK\r\n\r\n{POLICY}"),
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 999\r\n\r\n{POLICY}"),
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: x\r\n\r\n{POLICY}"),
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{POLICY}"
            ),
            format!("SMTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n{POLICY}"),
            format!("HTTP/1.1 200 OK\r\nbroken header\r\n\r\n{POLICY}"),
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n{}", "x".repeat(MAX_BODY + 1)),
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1),
        ] {
            assert!(parse_response(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}

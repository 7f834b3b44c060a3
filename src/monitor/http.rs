//! A minimal HTTP/1.1 client (RFC 9112) for webhooks and HTTP checks: one request per connection
//! (`Connection: close`), `http://` over TCP and `https://` over rustls with the Web PKI roots.
//! Only the status line of the answer matters; the rest is read and dropped.

use super::MonitorError;
use rustls_pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most of the answer we read: the status line is at the start.
const MAX_ANSWER: u64 = 64 * 1024;

/// The parts of an `http://` or `https://` URL a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Url {
    /// Parses `scheme://host[:port][/path]`; IPv6 literals in brackets. No user info.
    pub fn parse(url: &str) -> Result<Url, MonitorError> {
        let bad = || MonitorError::Http(format!("{url:?} is not an http:// or https:// URL"));
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad());
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let path = if path.starts_with('?') { format!("/{path}") } else { path };
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = after.strip_prefix(':').map(str::parse).transpose().map_err(|_| bad())?;
            (host.to_string(), port.unwrap_or(default_port))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host.to_string(), port.parse().map_err(|_| bad())?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || authority.contains('@') || path.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(Url { tls, host, port, path })
    }

    /// The Host header value (RFC 9112 3.2).
    fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == if self.tls { 443 } else { 80 } { host } else { format!("{host}:{}", self.port) }
    }
}

/// Sends one request and returns the status code; the whole exchange is bounded by `timeout`.
pub async fn request(
    method: &str,
    url: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> Result<u16, MonitorError> {
    let url = Url::parse(url)?;
    match tokio::time::timeout(timeout, exchange(method, &url, body)).await {
        Ok(result) => result,
        Err(_) => Err(MonitorError::Http(format!("{method} {}: timed out after {timeout:?}", url.authority()))),
    }
}

async fn exchange(method: &str, url: &Url, body: Option<(&str, &[u8])>) -> Result<u16, MonitorError> {
    let fail = |what: String| MonitorError::Http(format!("{method} {}{}: {what}", url.authority(), url.path));
    let tcp = TcpStream::connect((url.host.as_str(), url.port)).await.map_err(|e| fail(format!("connect: {e}")))?;
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bartleby/{}\r\nConnection: close\r\n",
        url.path,
        url.authority(),
        env!("CARGO_PKG_VERSION")
    );
    let mut request = Vec::new();
    if let Some((content_type, bytes)) = body {
        head += &format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n", bytes.len());
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(bytes);
    } else {
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    let answer = if url.tls {
        let name = ServerName::try_from(url.host.clone()).map_err(|e| fail(format!("bad TLS name: {e}")))?;
        let tls = tls_connector().map_err(&fail)?.connect(name, tcp).await.map_err(|e| fail(format!("TLS: {e}")))?;
        send_and_read(tls, &request).await
    } else {
        send_and_read(tcp, &request).await
    }
    .map_err(|e| fail(e.to_string()))?;
    status_of(&answer).ok_or_else(|| fail("no HTTP status line in the answer".into()))
}

async fn send_and_read<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(request).await?;
    stream.flush().await?;
    let mut answer = Vec::new();
    // A server may reset the connection after its answer; what was read still counts.
    let read = (&mut stream).take(MAX_ANSWER).read_to_end(&mut answer).await;
    if answer.is_empty() {
        read?;
    }
    Ok(answer)
}

/// `HTTP/1.1 204 No Content` -> 204.
fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/"))?;
    words.next()?.parse().ok().filter(|code| (100..600).contains(code))
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://127.0.0.1:8080/hook?x=1").unwrap();
        assert_eq!(u, Url { tls: false, host: "127.0.0.1".into(), port: 8080, path: "/hook?x=1".into() });
        assert_eq!(u.authority(), "127.0.0.1:8080");
        let u = Url::parse("https://hooks.example.net").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str(), u.authority().as_str()), (true, 443, "/", "hooks.example.net"));
        let u = Url::parse("http://[::1]:9/x").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.authority().as_str()), ("::1", 9, "[::1]:9"));
        for bad in ["ftp://x/", "http://", "http://user@host/", "http://h:port/", "http://h/a b"] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 204 No Content\r\n\r\n"), Some(204));
        assert_eq!(status_of(b"HTTP/1.0 500 oops\r\n"), Some(500));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b""), None);
    }
}

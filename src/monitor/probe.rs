//! Probes: is a relayed domain's primary answering? The next hops are resolved as delivery
//! resolves them (static route, or MX with the backup-MX rule) and tried in order, like delivery
//! does (RFC 5321 5.1), with a greeting, EHLO and QUIT; the first that answers makes the
//! destination up. Other services (`[[monitor.check]]`) get a TCP connect, an HTTP GET or an SMTP
//! greeting.

use super::http;
use crate::config::{CheckConfig, CheckKind, Route};
use crate::deliver::{ClientSettings, Deliverer, NextHop, Session, TlsMode};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// A next hop (or the checked service) answered as it should.
    pub up: bool,
    /// The host that answered (for a domain), or the target.
    pub host: Option<String>,
    /// Time until the answer, for the host that answered.
    pub latency: Option<Duration>,
    /// Why it is down (the last host's error).
    pub error: Option<String>,
}

impl ProbeResult {
    fn up(host: String, started: Instant) -> ProbeResult {
        ProbeResult { up: true, host: Some(host), latency: Some(started.elapsed()), error: None }
    }

    fn down(host: Option<String>, error: String) -> ProbeResult {
        ProbeResult { up: false, host, latency: None, error: Some(error) }
    }
}

/// Probes `domain`'s next hops: greeting, EHLO, QUIT, in plain text (STARTTLS is delivery's
/// business; a probe only asks whether the server is there and speaking SMTP).
pub async fn probe_domain(deliverer: &Deliverer, settings: &ClientSettings, domain: &str) -> ProbeResult {
    let hops = match deliverer.next_hops(domain).await {
        Ok(hops) => hops,
        Err(e) => return ProbeResult::down(None, e.to_string()),
    };
    probe_hops(&hops, settings).await
}

/// Tries `hops` in order until one answers.
pub async fn probe_hops(hops: &[NextHop], settings: &ClientSettings) -> ProbeResult {
    let mut last = ProbeResult::down(None, "no next hop".into());
    for hop in hops {
        let started = Instant::now();
        match Session::open(hop, settings, TlsMode::Disabled).await {
            Ok(session) => {
                let result = ProbeResult::up(format!("{}[{}]", hop.host, hop.addr), started);
                session.quit().await;
                return result;
            }
            Err(e) => last = ProbeResult::down(Some(format!("{}[{}]", hop.host, hop.addr)), e.to_string()),
        }
    }
    last
}

/// Runs one `[[monitor.check]]`, bounded by its timeout.
pub async fn run_check(check: &CheckConfig) -> ProbeResult {
    let started = Instant::now();
    let target = check.target.clone();
    let outcome = match check.kind {
        CheckKind::Http => http::request("GET", &check.target, None, check.timeout.0)
            .await
            .map_err(|e| e.to_string())
            .and_then(|status| {
                if status == check.expect_status {
                    Ok(())
                } else {
                    Err(format!("GET {}: HTTP status {status}, expected {}", check.target, check.expect_status))
                }
            }),
        CheckKind::Tcp | CheckKind::Smtp => {
            match tokio::time::timeout(check.timeout.0, tcp_check(&check.target, check.kind == CheckKind::Smtp)).await {
                Ok(result) => result,
                Err(_) => Err(format!("{}: no answer within {}", check.target, check.timeout)),
            }
        }
    };
    match outcome {
        Ok(()) => ProbeResult::up(target, started),
        Err(error) => ProbeResult::down(Some(target), error),
    }
}

/// TCP connect; with `smtp`, also a 220 greeting (RFC 5321 4.2), then QUIT.
async fn tcp_check(target: &str, smtp: bool) -> Result<(), String> {
    let route: Route = target.parse()?;
    let mut tcp =
        TcpStream::connect((route.host.as_str(), route.port)).await.map_err(|e| format!("{target}: connect: {e}"))?;
    if !smtp {
        return Ok(());
    }
    // A hostile or broken service must not make us buffer without end: 16 KiB of greeting at most.
    let mut reader = BufReader::new((&mut tcp).take(16 * 1024));
    // A multiline greeting ends with the line whose fourth octet is a space (RFC 5321 4.2.1).
    let greeting = loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).await.map_err(|e| format!("{target}: greeting: {e}"))?;
        if n == 0 {
            return Err(format!("{target}: closed before greeting"));
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            break line.trim_end().to_string();
        }
    };
    let _ = tcp.write_all(b"QUIT\r\n").await;
    if greeting.starts_with("220") { Ok(()) } else { Err(format!("{target}: greeting {greeting:?}")) }
}

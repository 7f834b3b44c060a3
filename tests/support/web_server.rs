//! An in-process admin page for HTTP tests: a real spool in a temporary directory, a real
//! scheduler, `web::serve` on 127.0.0.1:0, and a small HTTP/1.1 client (with a cookie jar and an
//! optional source address) that needs no extra crates.
#![allow(dead_code)]

use bartleby::config::Config;
use bartleby::deliver::Deliverer;
use bartleby::metrics::Metrics;
use bartleby::schedule::Scheduler;
use bartleby::spool::{Envelope, Queue, Recipient, Spool, now_micros};
use bartleby::web::{self, WebState};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Every request of a test gives up after this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

pub struct TestWeb {
    pub addr: SocketAddr,
    pub spool: Arc<dyn Queue>,
    pub state: WebState,
    pub dir: tempfile::TempDir,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), web::WebError>>,
    scheduler: JoinHandle<()>,
}

/// A port nothing listens on (bound, then released), so deliveries fail fast and stay on loopback.
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

impl TestWeb {
    /// Starts with `[web]` keys from `web_toml` (lines after the `[web]` header).
    pub async fn start(web_toml: &str) -> TestWeb {
        Self::start_with_spool(web_toml, tempfile::tempdir().expect("tempdir")).await
    }

    /// Like [`TestWeb::start`], on a spool directory the test has already filled.
    pub async fn start_with_spool(web_toml: &str, dir: tempfile::TempDir) -> TestWeb {
        let toml = format!(
            "hostname = \"backup.example.test\"\n[relay]\ndomains = [\"example.test\", \"other.test\"]\n\
             [queue]\ndir = \"{}\"\nmin_free = 0\nfirst_retry = \"1h\"\n[routes]\n\"example.test\" = \"127.0.0.1:{}\"\n\
             \"other.test\" = \"127.0.0.1:{}\"\n[web]\n{web_toml}\n",
            dir.path().join("spool").display(),
            closed_port(),
            closed_port(),
        );
        let config = Arc::new(Config::parse(&toml, "test.toml").expect("test config"));
        let (spool, _) = Spool::open(&config.queue.dir).expect("spool");
        let spool: Arc<dyn Queue> = Arc::new(spool);
        let deliverer = Arc::new(Deliverer::new(Arc::clone(&config)).expect("deliverer"));
        let (scheduler, handle) = Scheduler::new(Arc::clone(&config), Arc::clone(&spool), deliverer);
        let (shutdown, stop) = watch::channel(false);
        let scheduler = tokio::spawn(scheduler.run(stop.clone()));
        let metrics = Arc::new(Metrics::default());
        let state = WebState::new(Arc::clone(&config), Arc::clone(&spool), handle, metrics);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(web::serve(state.clone(), listener, stop));
        TestWeb { addr, spool, state, dir, shutdown, server, scheduler }
    }

    /// Queues a message with a Subject; it is not due for an hour, so nothing tries to deliver it.
    pub fn queue(&self, sender: &str, recipients: &[&str], subject: &str) -> String {
        let id = self.spool.new_id();
        let mut incoming = std::sync::Arc::clone(&self.spool).incoming(&id).expect("incoming");
        let body = format!("From: {sender}\r\nSubject: {subject}\r\nMessage-ID: <{id}@t>\r\n\r\nHello.\r\n");
        incoming.write(body.as_bytes()).expect("write");
        let rcpts = recipients.iter().map(|r| Recipient::new(r.to_string())).collect();
        let mut envelope = Envelope::new(id.clone(), sender.to_string(), rcpts);
        envelope.next_attempt = now_micros() + 3_600_000_000;
        incoming.commit(envelope).expect("commit");
        id
    }

    pub fn client(&self) -> Client {
        Client { addr: self.addr, cookie: None, source: None, host: None }
    }

    /// Stops the server and the scheduler and waits for both.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await.expect("web server stops");
        let _ = tokio::time::timeout(Duration::from_secs(10), self.scheduler).await.expect("scheduler stops");
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The value of the hidden `csrf` field in a page.
    pub fn csrf(&self) -> String {
        let at = self.body.find("name=\"csrf\" value=\"").expect("page has a CSRF field") + 19;
        self.body[at..at + 64].to_string()
    }
}

/// A tiny HTTP/1.1 client: one connection per request, keeps the session cookie.
pub struct Client {
    pub addr: SocketAddr,
    pub cookie: Option<String>,
    /// Source address to connect from (e.g. 127.0.0.9), for allowlist tests.
    pub source: Option<IpAddr>,
    /// The Host header to send instead of the server's address (`Some("")`: none at all), for
    /// the DNS rebinding tests.
    pub host: Option<String>,
}

impl Client {
    pub async fn get(&mut self, path: &str) -> Reply {
        self.request("GET", path, &[], "").await
    }

    /// A same-origin form POST, as a browser sends it.
    pub async fn post_form(&mut self, path: &str, body: &str) -> Reply {
        self.request("POST", path, &[("Content-Type", "application/x-www-form-urlencoded")], body).await
    }

    pub async fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, path, headers, body))
            .await
            .unwrap_or_else(|_| panic!("{method} {path} timed out"))
    }

    async fn exchange(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(source) = self.source {
            socket.bind(SocketAddr::new(source, 0)).expect("bind source address");
        }
        let mut stream = socket.connect(self.addr).await.expect("connect");
        let host = self.host.clone().unwrap_or_else(|| self.addr.to_string());
        let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !host.is_empty() {
            request += &format!("Host: {host}\r\n");
        }
        if let Some(cookie) = &self.cookie {
            request += &format!("Cookie: bartleby_session={cookie}\r\n");
        }
        for (name, value) in headers {
            request += &format!("{name}: {value}\r\n");
        }
        request += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        let reply = parse(&raw);
        if let Some(set) = reply.header("set-cookie")
            && let Some(value) = set.strip_prefix("bartleby_session=")
        {
            self.cookie = Some(value.split(';').next().unwrap_or_default().to_string());
        }
        reply
    }
}

fn parse(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Reply { status, headers, body }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out += &rest[..size];
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

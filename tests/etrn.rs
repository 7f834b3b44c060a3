//! ETRN (RFC 1985) against the real daemon: clients in `smtp.etrn_allow` see ETRN in EHLO and can
//! start a queue run for a relay domain (250, then 251 once nothing waits; 459 for other domains;
//! 458 for queue names); other clients get neither the keyword nor the service.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/monitor_peers.rs"]
mod monitor_peers;

use daemon::{Daemon, free_port, send_raw};
use monitor_peers::SmtpSink;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::block_in_place;

/// An SMTP client connected from `from` (a loopback address).
struct Client {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl Client {
    async fn connect(from: [u8; 4], to: SocketAddr) -> Client {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        let (read, write) = socket.connect(to).await.unwrap().into_split();
        let mut client = Client { read: BufReader::new(read), write };
        assert!(client.reply().await.starts_with("220"));
        client
    }

    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            assert!(self.read.read_line(&mut line).await.unwrap() > 0, "connection closed after {all:?}");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn say(&mut self, command: &str) -> String {
        self.write.write_all(format!("{command}\r\n").as_bytes()).await.unwrap();
        self.reply().await
    }
}

fn config(dir: &Path, smtp: SocketAddr, primary: u16) -> String {
    format!(
        r#"hostname = "backup.example.test"

[smtp]
listen = ["{smtp}"]
etrn_allow = ["127.0.0.1/32"]

[relay]
domains = ["example.test", "sub.example.test", "other.test"]

[routes]
"example.test" = "127.0.0.1:{primary}"
"sub.example.test" = "127.0.0.1:{primary}"
"other.test" = "127.0.0.1:{primary}"

[queue]
dir = "{}"
min_free = 0
first_retry = "1h"
retry_interval = "1h"

[monitor]
probe_interval = "0s"
"#,
        dir.join("spool").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etrn_for_allowed_and_denied_clients() {
    tokio::time::timeout(Duration::from_secs(90), scenario()).await.expect("test finished in time");
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let primary = free_port("127.0.0.1");
    let smtp: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().unwrap();
    let mut daemon = block_in_place(|| Daemon::start_with(dir.path(), &config(dir.path(), smtp, primary), smtp));
    // Queued while the primary is down; the next retry is an hour away and probes are off.
    let reply =
        block_in_place(|| send_raw(smtp, "a@sender.test", &["bob@example.test"], b"Subject: etrn\r\n\r\nhi\r\n"))
            .unwrap();
    assert!(reply.starts_with("250"), "{reply}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while block_in_place(|| daemon.queue())[0]["last_error"].is_null() {
        assert!(Instant::now() < deadline, "the first attempt did not fail");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A client that is not allowed: no keyword, no service.
    let mut stranger = Client::connect([127, 0, 0, 2], smtp).await;
    let ehlo = stranger.say("EHLO stranger.test").await;
    assert!(!ehlo.contains("ETRN"), "{ehlo}");
    let refused = stranger.say("ETRN example.test").await;
    assert!(refused.starts_with("550 5.7.1"), "{refused}");
    stranger.say("QUIT").await;

    let sink = SmtpSink::start(SocketAddr::from(([127, 0, 0, 1], primary))).await;
    let mut site = Client::connect([127, 0, 0, 1], smtp).await;
    let early = site.say("ETRN example.test").await;
    assert!(early.starts_with("503"), "ETRN before EHLO: {early}");
    let ehlo = site.say("EHLO site.example.test").await;
    assert!(ehlo.contains("250-ETRN\r\n") || ehlo.contains("250 ETRN\r\n"), "{ehlo}");
    assert!(site.say("ETRN").await.starts_with("501"));
    let not_ours = site.say("ETRN elsewhere.test").await;
    assert!(not_ours.starts_with("459 4.7.1 Node elsewhere.test not allowed"), "{not_ours}");
    let queue = site.say("ETRN #outbound").await;
    assert!(queue.starts_with("458 "), "{queue}");
    let nothing = site.say("ETRN other.test").await;
    assert!(nothing.starts_with("251 2.0.0 OK, no messages waiting for node other.test"), "{nothing}");
    let started = site.say("ETRN example.test").await;
    assert!(started.starts_with("250 2.0.0 OK, queuing for node example.test started"), "{started}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.messages().is_empty() {
        assert!(Instant::now() < deadline, "ETRN did not start delivery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sink.messages()[0].data.contains("Subject: etrn"));
    // Once delivered, nothing waits any more, also for @example.test (the domain and subdomains).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !block_in_place(|| daemon.queue()).is_empty() {
        assert!(Instant::now() < deadline, "the queue did not empty");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = site.say("ETRN @example.test").await;
    assert!(again.starts_with("251 2.0.0 OK, no messages waiting for node @example.test"), "{again}");
    site.say("QUIT").await;
    assert!(block_in_place(|| daemon.stop()).success());
}

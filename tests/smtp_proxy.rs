//! The PROXY protocol behind a real HAProxy (Debian's `haproxy`): HAProxy in TCP mode on its own
//! loopback address relays swaks, sending from another loopback address, to the real daemon with
//! `send-proxy` (v1) and `send-proxy-v2`; the queued message's Received header, the log and the
//! per-IP session limit name the client behind HAProxy, never HAProxy. Direct connections show the
//! other side: from an address in `smtp.proxy_from` a header is required, from anywhere else a
//! PROXY line is only a bad command.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/peers.rs"]
mod peers;

use daemon::{Daemon, free_port};
use peers::{ChildGuard, run_bounded, swaks};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// HAProxy's address: listens here and connects to bartleby from here (`source`).
const HAPROXY: [u8; 4] = [127, 0, 0, 31];
/// The clients behind HAProxy.
const CLIENT: [u8; 4] = [127, 0, 0, 77];
const OTHER_CLIENT: [u8; 4] = [127, 0, 0, 78];
/// A load balancer that talks to bartleby directly in the tests of headers sent by hand.
const BALANCER: [u8; 4] = [127, 0, 0, 33];

/// Every read in these tests gives up after this long.
const READ_LIMIT: Duration = Duration::from_secs(15);

/// A daemon relaying example.test to a primary that is never there, so messages stay queued, with
/// `smtp` (TOML lines) added to its `[smtp]` table.
fn start_daemon(dir: &Path, smtp: &str) -> Daemon {
    Daemon::start_on_free_port(dir, |listen| {
        format!(
            r#"hostname = "backup.example.test"

[smtp]
listen = ["{listen}"]
sender_auth = false
{smtp}

[relay]
domains = ["example.test"]

[routes]
"example.test" = "127.0.0.1:1"

[dns]
nameservers = ["127.0.0.1:1"]

[queue]
dir = "{}"
min_free = 0
first_retry = "1h"
retry_interval = "1h"

[web]
listen = "127.0.0.1:{}"

[monitor]
probe_interval = "0s"
"#,
            dir.join("spool").display(),
            free_port("127.0.0.1")
        )
    })
}

/// HAProxy in the foreground (`-db`) with two TCP frontends on [`HAPROXY`]: one relays to
/// `bartleby` with `send-proxy`, the other with `send-proxy-v2`. Killed on drop.
struct HaProxy {
    _process: ChildGuard,
    v1: SocketAddrV4,
    v2: SocketAddrV4,
    log: std::path::PathBuf,
}

impl HaProxy {
    fn start(dir: &Path, bartleby: SocketAddr) -> HaProxy {
        let ip = HAPROXY.into();
        let v1 = SocketAddrV4::new(ip, free_port("127.0.0.31"));
        let v2 = SocketAddrV4::new(ip, free_port("127.0.0.31"));
        let config = format!(
            "global\n    maxconn 100\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\n\
             frontend smtp_v1\n    bind {v1}\n    default_backend bartleby_v1\n\n\
             backend bartleby_v1\n    source 127.0.0.31\n    server bartleby {bartleby} send-proxy\n\n\
             frontend smtp_v2\n    bind {v2}\n    default_backend bartleby_v2\n\n\
             backend bartleby_v2\n    source 127.0.0.31\n    server bartleby {bartleby} send-proxy-v2\n"
        );
        let config_path = dir.join("haproxy.cfg");
        std::fs::write(&config_path, config).expect("write haproxy.cfg");
        let checked =
            run_bounded(Command::new("haproxy").arg("-c").arg("-f").arg(&config_path), READ_LIMIT).expect("haproxy -c");
        assert!(checked.status.success(), "haproxy -c: {}", String::from_utf8_lossy(&checked.stderr));
        let log = dir.join("haproxy.log");
        let output = std::fs::File::create(&log).expect("haproxy log");
        let process = ChildGuard::spawn(
            Command::new("haproxy")
                .arg("-f")
                .arg(&config_path)
                .arg("-db")
                .stdout(Stdio::from(output.try_clone().expect("log")))
                .stderr(Stdio::from(output)),
            "haproxy",
        )
        .expect("start haproxy");
        let haproxy = HaProxy { _process: process, v1, v2, log };
        haproxy.wait_listening();
        haproxy
    }

    /// Both frontends accept connections (HAProxy binds them before it serves).
    fn wait_listening(&self) {
        let deadline = Instant::now() + READ_LIMIT;
        for frontend in [self.v1, self.v2] {
            while std::net::TcpStream::connect_timeout(&frontend.into(), Duration::from_millis(500)).is_err() {
                assert!(Instant::now() < deadline, "haproxy not listening on {frontend}:\n{}", self.log());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An SMTP client connected from a loopback address of its own.
struct Client {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl Client {
    async fn connect(from: [u8; 4], to: SocketAddr) -> Client {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::from((from, 0))).expect("bind the client's address");
        let stream = tokio::time::timeout(READ_LIMIT, socket.connect(to)).await.expect("connect in time");
        let (read, write) = stream.expect("connect").into_split();
        Client { read: BufReader::new(read), write }
    }

    /// One whole reply; panics if the connection closes first.
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(READ_LIMIT, self.read.read_line(&mut line)).await.expect("reply in time");
            assert!(n.expect("read") > 0, "connection closed after {all:?}");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("write");
    }

    async fn say(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// The server closed the connection: nothing more to read.
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(tokio::time::timeout(READ_LIMIT, self.read.read_to_end(&mut rest)).await, Ok(Ok(0)))
    }
}

/// Sends one message with swaks from `from` through `server`; returns its queue ID.
fn swaks_from(server: SocketAddrV4, from: [u8; 4], subject: &str) -> String {
    let local = std::net::Ipv4Addr::from(from).to_string();
    let header = format!("Subject: {subject}");
    let transcript =
        swaks(server, "a@sender.test", "alice@example.test", &["--local-interface", &local, "--header", &header])
            .unwrap_or_else(|err| panic!("swaks through {server}: {err}"));
    let queued = transcript.lines().find(|line| line.contains("queued as")).unwrap_or_else(|| panic!("{transcript}"));
    daemon::queued_id(queued.trim_start_matches(['<', '~', '-', ' '])).unwrap_or_else(|| panic!("{queued}"))
}

/// The first line of the message's first header: our Received header.
fn our_received(daemon: &Daemon, id: &str) -> String {
    let bodies = daemon.exported_bodies();
    let body = bodies.get(id).unwrap_or_else(|| panic!("{id} not queued"));
    let text = String::from_utf8_lossy(body);
    let end = text.find("\r\n\r\n").unwrap_or(text.len());
    text[..end].split("\r\nReceived:").next().unwrap_or_default().replace("\r\n", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_v1_and_v2_name_the_client_behind_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = start_daemon(dir.path(), "proxy_from = [\"127.0.0.31/32\"]\nmax_sessions_per_ip = 2");
    let haproxy = HaProxy::start(dir.path(), daemon.smtp);

    for (frontend, client, version) in [(haproxy.v1, CLIENT, "v1"), (haproxy.v2, OTHER_CLIENT, "v2")] {
        let id = tokio::task::block_in_place(|| swaks_from(frontend, client, version));
        let received = tokio::task::block_in_place(|| our_received(&daemon, &id));
        let client_ip = std::net::Ipv4Addr::from(client);
        assert!(received.contains(&format!("([{client_ip}])")), "{version}: {received}");
        assert!(!received.contains("127.0.0.31"), "{version}: {received}");
        let log = daemon.log();
        assert!(log.contains(&format!("client={client_ip} proxy=127.0.0.31:")), "{version}:\n{log}");
        assert!(log.contains(&format!("client={client_ip} queue_id={id}")), "{version}:\n{log}");
    }

    // smtp.max_sessions_per_ip counts the client behind HAProxy, not HAProxy.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut client = Client::connect(CLIENT, haproxy.v2.into()).await;
        assert!(client.reply().await.starts_with("220 "));
        open.push(client);
    }
    let mut third = Client::connect(CLIENT, haproxy.v2.into()).await;
    let refused = third.reply().await;
    assert!(refused.starts_with("421 4.7.0"), "{refused}");
    let mut other = Client::connect(OTHER_CLIENT, haproxy.v1.into()).await;
    assert!(other.reply().await.starts_with("220 "), "another client behind the same HAProxy");
    assert!(other.say("QUIT").await.starts_with("221"));
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains("too many connections from this address") && l.contains("client=127.0.0.77")),
        "{log}"
    );
    drop(open);
    assert!(!haproxy.log().contains("ALERT"), "{}", haproxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_is_required_from_proxy_from_and_never_trusted_from_elsewhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = start_daemon(dir.path(), "proxy_from = [\"127.0.0.33/32\"]");

    // From a balancer's address without a header: 421 once it has had its time, no greeting.
    let started = Instant::now();
    let mut silent = Client::connect(BALANCER, daemon.smtp).await;
    let reply = silent.reply().await;
    assert!(reply.starts_with("421 4.3.0 backup.example.test"), "{reply}");
    assert!(started.elapsed() >= Duration::from_secs(4), "421 only after the header's time");
    assert!(silent.closed().await);
    // From a balancer's address with SMTP in place of a header: the same, at once.
    let mut smtp_first = Client::connect(BALANCER, daemon.smtp).await;
    smtp_first.send(b"EHLO client.test\r\n").await;
    assert!(smtp_first.reply().await.starts_with("421 4.3.0"));
    let log = daemon.log();
    assert!(log.contains("proxy=127.0.0.33:") && log.contains("no PROXY protocol header within 5s"), "{log}");
    assert!(log.contains("no PROXY protocol header (neither"), "{log}");

    // A v1 header sent by hand, split in two, with EHLO right behind it: the client is the header's.
    let mut proxied = Client::connect(BALANCER, daemon.smtp).await;
    proxied.send(b"PROXY TCP4 192.0.2.77 ").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxied.send(b"127.0.0.1 40000 25\r\n").await;
    assert!(proxied.reply().await.starts_with("220 "));
    assert!(proxied.say("EHLO client.test").await.starts_with("250"));
    assert!(proxied.say("QUIT").await.starts_with("221"));
    assert!(daemon.log().contains("client=192.0.2.77 helo=client.test"), "{}", daemon.log());

    // v2 LOCAL (a health check): the balancer speaks for itself.
    let mut local = Client::connect(BALANCER, daemon.smtp).await;
    local.send(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00").await;
    assert!(local.reply().await.starts_with("220 "));
    assert!(local.say("QUIT").await.starts_with("221"));
    assert!(daemon.log().contains("client=127.0.0.33 proxy=127.0.0.33:"), "{}", daemon.log());

    // Anyone else speaks plain SMTP, and a PROXY line from them is a bad command, not a header.
    let mut direct = Client::connect([127, 0, 0, 1], daemon.smtp).await;
    assert!(direct.reply().await.starts_with("220 "));
    let reply = direct.say("PROXY TCP4 192.0.2.99 127.0.0.1 40000 25").await;
    assert!(reply.starts_with("500 5.5.2 command unrecognized"), "{reply}");
    assert!(direct.say("EHLO client.test").await.starts_with("250"));
    assert!(direct.say("QUIT").await.starts_with("221"));
    let log = daemon.log();
    assert!(log.contains("client=127.0.0.1 helo=client.test") && !log.contains("192.0.2.99"), "{log}");
}

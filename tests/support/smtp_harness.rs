//! Runs `smtp::serve` in-process on 127.0.0.1:0 with a real spool in a temporary directory, and
//! runs real SMTP clients (swaks, Python's smtplib) against it as bounded subprocesses.
#![allow(dead_code)]

use bartleby::config::Config;
use bartleby::smtp::{self, ServerContext};
use bartleby::spool::Queue as _;
use bartleby::spool::{Envelope, Spool};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Every subprocess is killed after this long.
pub const CLIENT_TIMEOUT: &str = "30";

/// A running server.
pub struct Harness {
    /// Holds the spool and test files; removed on drop.
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub spool: Arc<Spool>,
    pub config: Arc<Config>,
    /// How many times `on_queued` was called.
    pub queued: Arc<AtomicUsize>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// A configuration for tests: hostname mx.test, relay domain example.test, no free-space floor.
pub fn test_config(spool_dir: &Path) -> Config {
    let mut config = Config::demo();
    config.hostname = "mx.test".into();
    config.relay.domains = vec!["example.test".into()];
    config.queue.dir = spool_dir.to_path_buf();
    config.queue.min_free = 0;
    config
}

impl Harness {
    /// Starts a server with the test configuration changed by `tweak`; its spool is in a new temp dir.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool_dir = dir.path().join("spool");
        Harness::start_in(dir, &spool_dir, tweak).await
    }

    /// Starts a server whose spool lives at `spool_dir`.
    pub async fn start_in(dir: tempfile::TempDir, spool_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Harness {
        let mut config = test_config(spool_dir);
        tweak(&mut config);
        let config = Arc::new(config);
        let (spool, _) = Spool::open(spool_dir).expect("spool");
        let spool = Arc::new(spool);
        let queued = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&queued);
        let on_queued = Box::new(move |_: &Envelope| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let context = Arc::new(ServerContext::new(
            Arc::clone(&config),
            Arc::clone(&spool) as Arc<dyn bartleby::spool::Queue>,
            on_queued,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (shutdown, receiver) = watch::channel(false);
        let task = tokio::spawn(smtp::serve(context, vec![listener], receiver));
        Harness { dir, addr, spool, config, queued, shutdown, task: Some(task) }
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }

    /// Signals shutdown and waits (bounded) for `serve` to return.
    pub async fn stop(mut self) -> std::io::Result<()> {
        self.shutdown().await
    }

    /// Like `stop`, keeping the spool directory for inspection.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.shutdown.send_replace(true);
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("serve returned in time").expect("joined")
    }

    /// The stored body of the only queued message.
    pub fn only_body(&self) -> (Envelope, Vec<u8>) {
        let list = self.spool.list();
        assert_eq!(list.len(), 1, "exactly one message queued: {list:?}");
        let body = self.spool.read_body(&list[0].id).expect("body");
        (list[0].clone(), body)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The body without our Received header (the first header, with its continuation lines).
pub fn strip_received(body: &[u8]) -> &[u8] {
    assert!(body.starts_with(b"Received: "), "body starts with our Received header");
    let mut pos = 0;
    loop {
        let end = body[pos..].windows(2).position(|w| w == b"\r\n").expect("header line ends") + pos + 2;
        pos = end;
        if body.get(pos) != Some(&b'\t') {
            return &body[pos..];
        }
    }
}

/// Writes a self-signed certificate for mx.test and localhost, and its key; returns their paths.
pub fn make_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["mx.test".to_string(), "localhost".to_string()]).expect("certificate");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    (cert_path, key_path)
}

/// Runs a client under `timeout` on a blocking thread, so the in-process server keeps running.
pub async fn run(program: &str, args: &[String]) -> Output {
    let mut command = Command::new("timeout");
    command.arg("-k").arg("5").arg(CLIENT_TIMEOUT).arg(program).args(args);
    let output = tokio::task::spawn_blocking(move || command.output()).await.expect("joined").expect("spawn client");
    eprintln!(
        "--- {program} exit {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs swaks against the harness with the given extra arguments.
pub async fn swaks(harness: &Harness, extra: &[&str]) -> Output {
    let mut args: Vec<String> = ["--server", "127.0.0.1", "--port", &harness.port(), "--helo", "client.test"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    run("swaks", &args).await
}

/// Runs a Python script with `PORT` as its first argument and `extra` after it.
pub async fn python(harness: &Harness, script: &str, extra: &[&str]) -> Output {
    let mut args = vec!["-c".to_string(), script.to_string(), harness.port()];
    args.extend(extra.iter().map(|s| s.to_string()));
    run("python3", &args).await
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Reads one whole (possibly multi-line) reply; panics if the connection closes first.
pub async fn read_reply<S: tokio::io::AsyncRead + Unpin>(reader: &mut tokio::io::BufReader<S>) -> String {
    use tokio::io::AsyncBufReadExt;
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(n > 0, "connection closed after {text:?}");
        text.push_str(&line);
        if line.as_bytes().get(3) == Some(&b' ') {
            return text;
        }
    }
}

/// A raw SMTP client.
pub struct Client {
    pub stream: BufReader<TcpStream>,
}

impl Client {
    pub async fn connect(harness: &Harness) -> Client {
        Client { stream: BufReader::new(TcpStream::connect(harness.addr).await.expect("connect")) }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).await.expect("write");
    }

    /// One whole reply; panics if the connection closes first.
    pub async fn reply(&mut self) -> String {
        read_reply(&mut self.stream).await
    }

    /// True when the server closed the connection (EOF) within a few seconds.
    pub async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(tokio::time::timeout(Duration::from_secs(5), self.stream.read_to_end(&mut rest)).await, Ok(Ok(0)))
    }

    /// Greeting, EHLO, MAIL, RCPT and DATA up to the 354.
    pub async fn start_data(&mut self) {
        assert!(self.reply().await.starts_with("220 "));
        self.send(b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n").await;
        for code in ["250", "250", "250", "354"] {
            let reply = self.reply().await;
            assert!(reply.lines().last().is_some_and(|l| l.starts_with(code)), "{reply}");
        }
    }
}

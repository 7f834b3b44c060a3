//! A scriptable, fault-injecting SMTP server on 127.0.0.1:0 standing in for the primary MX.
//! It records every command line and every message (raw DATA bytes and the unstuffed body, or
//! the octets of BDAT chunks, RFC 3030, which it takes whether or not CHUNKING is in the script),
//! and the address each connection came from.
//! Dropping the `FakePrimary` stops the listener and every connection it serves.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// What STARTTLS does.
#[derive(Clone, Default)]
pub enum Starttls {
    /// Not offered in EHLO.
    #[default]
    NotOffered,
    /// Offered, but the command gets `454 4.7.0 TLS not available`.
    Refuse,
    /// Offered and accepted with this server configuration.
    Accept(Arc<rustls::ServerConfig>),
}

/// Where the server stops answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// Accepts the connection but never greets.
    Greeting,
    /// Reads the message and never gives the final reply.
    AfterData,
}

/// How the fake primary behaves.
#[derive(Clone)]
pub struct Script {
    /// The greeting line(s), with CRLF added.
    pub greeting: String,
    /// EHLO keywords after the first line (STARTTLS is added per `starttls`).
    pub capabilities: Vec<String>,
    /// A reply that replaces the whole EHLO answer (e.g. `502 5.5.1 unknown`), to force HELO.
    pub ehlo_reply: Option<String>,
    pub starttls: Starttls,
    /// Replies to RCPT by address (lower case); others get `250 2.1.5 Ok`.
    pub rcpt_replies: HashMap<String, String>,
    /// Final replies after DATA, one per message in arrival order; then `250 2.0.0 Ok: queued`.
    pub final_replies: VecDeque<String>,
    /// Close the connection after the message's final dot, without a reply.
    pub drop_after_data: bool,
    pub stall: Option<Stall>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: "220 primary.example.test ESMTP fake".into(),
            capabilities: vec!["PIPELINING".into(), "8BITMIME".into(), "SIZE 10485760".into()],
            ehlo_reply: None,
            starttls: Starttls::NotOffered,
            rcpt_replies: HashMap::new(),
            final_replies: VecDeque::new(),
            drop_after_data: false,
            stall: None,
        }
    }
}

/// One message the fake primary received.
#[derive(Clone, Debug)]
pub struct Received {
    /// The connection it came on (0, 1, ...).
    pub connection: usize,
    /// The whole MAIL command line, without CRLF.
    pub mail: String,
    /// The RCPT command lines that were accepted, without CRLF.
    pub rcpts: Vec<String>,
    /// DATA exactly as on the wire, up to and including the final `.` CRLF.
    pub raw: Vec<u8>,
    /// The message with dot-stuffing removed and without the final `.` CRLF.
    pub body: Vec<u8>,
    /// Was the connection encrypted?
    pub tls: bool,
    /// The final reply the fake primary gave (None: it dropped or stalled instead).
    pub reply: Option<String>,
    /// The BDAT command lines that carried the message, in order; empty when it came with DATA.
    pub bdat: Vec<String>,
}

/// What the fake primary saw.
#[derive(Default, Debug)]
pub struct Recorded {
    /// (connection, command line without CRLF), in order.
    pub commands: Vec<(usize, String)>,
    pub messages: Vec<Received>,
    pub connections: usize,
    /// The client address of each connection, in order.
    pub peers: Vec<SocketAddr>,
}

pub struct FakePrimary {
    pub addr: SocketAddr,
    recorded: Arc<Mutex<Recorded>>,
    task: JoinHandle<()>,
}

impl Drop for FakePrimary {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

impl FakePrimary {
    /// Starts listening on 127.0.0.1:0 with `script`.
    pub async fn start(script: Script) -> FakePrimary {
        FakePrimary::start_at("127.0.0.1:0".parse().expect("literal"), script).await
    }

    /// Starts listening on `addr` (a primary that comes back on its known address).
    pub async fn start_at(addr: SocketAddr, script: Script) -> FakePrimary {
        let listener = TcpListener::bind(addr).await.expect("bind fake primary");
        let addr = listener.local_addr().expect("local addr");
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let script = Arc::new(Mutex::new(script));
        let state = recorded.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((tcp, peer)) = listener.accept().await {
                let number = {
                    let mut rec = state.lock().unwrap();
                    rec.peers.push(peer);
                    rec.connections += 1;
                    rec.connections - 1
                };
                let conn = Connection { number, script: script.clone(), state: state.clone(), tls: false };
                connections.spawn(conn.run(tcp));
            }
        });
        FakePrimary { addr, recorded, task }
    }

    /// A snapshot of what was received so far.
    pub fn messages(&self) -> Vec<Received> {
        self.recorded.lock().unwrap().messages.clone()
    }

    /// Command lines received, all connections, in order.
    pub fn commands(&self) -> Vec<String> {
        self.recorded.lock().unwrap().commands.iter().map(|(_, c)| c.clone()).collect()
    }

    pub fn connections(&self) -> usize {
        self.recorded.lock().unwrap().connections
    }

    /// The address each connection came from, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.recorded.lock().unwrap().peers.clone()
    }
}

struct Connection {
    number: usize,
    script: Arc<Mutex<Script>>,
    state: Arc<Mutex<Recorded>>,
    tls: bool,
}

enum Flow {
    Close,
    StartTls,
}

/// A transaction in progress.
#[derive(Default)]
struct Transaction {
    mail: Option<String>,
    rcpts: Vec<String>,
    /// BDAT lines and octets so far (RFC 3030).
    bdat: Vec<String>,
    chunks: Vec<u8>,
}

impl Connection {
    async fn run(mut self, tcp: tokio::net::TcpStream) {
        let script = self.script.lock().unwrap().clone();
        let mut io = BufReader::new(tcp);
        if script.stall == Some(Stall::Greeting) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        if io.write_all(format!("{}\r\n", script.greeting).as_bytes()).await.is_err()
            || !script.greeting.starts_with('2')
        {
            return;
        }
        if let Ok(Flow::StartTls) = self.serve(&mut io).await {
            let Starttls::Accept(config) = script.starttls else { return };
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let Ok(tls) = acceptor.accept(io.into_inner()).await else { return };
            self.tls = true;
            let mut io = BufReader::new(tls);
            let _ = self.serve(&mut io).await;
        }
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&mut self, io: &mut BufReader<S>) -> std::io::Result<Flow> {
        let mut tx = Transaction::default();
        loop {
            let mut line = String::new();
            if io.read_line(&mut line).await? == 0 {
                return Ok(Flow::Close);
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            self.state.lock().unwrap().commands.push((self.number, line.clone()));
            let verb = line.split([' ', ':']).next().unwrap_or("").to_ascii_uppercase();
            let reply = match verb.as_str() {
                "EHLO" => self.ehlo(),
                "HELO" => "250 primary.example.test".to_string(),
                "STARTTLS" => match self.script().starttls {
                    Starttls::Accept(_) if !self.tls => {
                        io.write_all(b"220 2.0.0 Ready to start TLS\r\n").await?;
                        return Ok(Flow::StartTls);
                    }
                    _ => "454 4.7.0 TLS not available".to_string(),
                },
                "MAIL" => {
                    tx = Transaction { mail: Some(line.clone()), ..Transaction::default() };
                    "250 2.1.0 Ok".to_string()
                }
                "RCPT" => self.rcpt(&line, &mut tx),
                "DATA" if tx.rcpts.is_empty() => "554 5.5.1 Error: no valid recipients".to_string(),
                "DATA" => {
                    io.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                    match self.data(io, std::mem::take(&mut tx)).await? {
                        Some(reply) => reply,
                        None => return Ok(Flow::Close),
                    }
                }
                "BDAT" => match self.bdat(io, &line, &mut tx).await? {
                    Some(reply) => reply,
                    None => return Ok(Flow::Close),
                },
                "RSET" => {
                    tx = Transaction::default();
                    "250 2.0.0 Ok".to_string()
                }
                "NOOP" => "250 2.0.0 Ok".to_string(),
                "QUIT" => {
                    io.write_all(b"221 2.0.0 Bye\r\n").await?;
                    return Ok(Flow::Close);
                }
                _ => "502 5.5.2 Error: command not recognized".to_string(),
            };
            io.write_all(format!("{reply}\r\n").as_bytes()).await?;
        }
    }

    fn script(&self) -> Script {
        self.script.lock().unwrap().clone()
    }

    fn ehlo(&self) -> String {
        let script = self.script();
        if let Some(reply) = script.ehlo_reply {
            return reply;
        }
        let mut lines = vec!["primary.example.test".to_string()];
        lines.extend(script.capabilities.iter().cloned());
        if !self.tls && !matches!(script.starttls, Starttls::NotOffered) {
            lines.push("STARTTLS".into());
        }
        let last = lines.len() - 1;
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    fn rcpt(&self, line: &str, tx: &mut Transaction) -> String {
        if tx.mail.is_none() {
            return "503 5.5.1 Error: need MAIL command".into();
        }
        let address = line.split_once('<').and_then(|(_, rest)| rest.split_once('>')).map(|(a, _)| a).unwrap_or("");
        match self.script().rcpt_replies.get(&address.to_ascii_lowercase()) {
            Some(reply) => reply.clone(),
            None => {
                tx.rcpts.push(line.to_string());
                "250 2.1.5 Ok".into()
            }
        }
    }

    /// Reads a BDAT chunk (its octets follow the line); at LAST records the message and answers as
    /// after DATA. None when the script says to drop the connection.
    async fn bdat<S: AsyncRead + Unpin>(
        &self,
        io: &mut BufReader<S>,
        line: &str,
        tx: &mut Transaction,
    ) -> std::io::Result<Option<String>> {
        use tokio::io::AsyncReadExt;
        let mut words = line.split_whitespace().skip(1);
        let Some(size) = words.next().and_then(|w| w.parse::<usize>().ok()) else {
            return Ok(Some("501 5.5.4 Syntax: BDAT count [LAST]".into()));
        };
        let last = words.next().is_some_and(|w| w.eq_ignore_ascii_case("LAST"));
        let mut chunk = vec![0u8; size];
        io.read_exact(&mut chunk).await?;
        if tx.rcpts.is_empty() {
            return Ok(Some("554 5.5.1 Error: no valid recipients".into()));
        }
        tx.bdat.push(line.to_string());
        tx.chunks.extend_from_slice(&chunk);
        if !last {
            return Ok(Some(format!("250 2.0.0 Ok: {size} bytes")));
        }
        let tx = std::mem::take(tx);
        let script = self.script();
        let answers = !script.drop_after_data && script.stall != Some(Stall::AfterData);
        let reply = answers.then(|| {
            let next = self.script.lock().unwrap().final_replies.pop_front();
            next.unwrap_or_else(|| "250 2.0.0 Ok: queued".into())
        });
        let received = Received {
            connection: self.number,
            mail: tx.mail.unwrap_or_default(),
            rcpts: tx.rcpts,
            raw: tx.chunks.clone(),
            body: tx.chunks,
            tls: self.tls,
            reply: reply.clone(),
            bdat: tx.bdat,
        };
        self.state.lock().unwrap().messages.push(received);
        if script.stall == Some(Stall::AfterData) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Ok(reply)
    }

    /// Reads DATA up to the final dot; None when the script says to drop the connection.
    async fn data<S: AsyncRead + Unpin>(
        &self,
        io: &mut BufReader<S>,
        tx: Transaction,
    ) -> std::io::Result<Option<String>> {
        let (mut raw, mut body) = (Vec::new(), Vec::new());
        loop {
            let mut line = Vec::new();
            if io.read_until(b'\n', &mut line).await? == 0 {
                return Ok(None);
            }
            raw.extend_from_slice(&line);
            if line == b".\r\n" {
                break;
            }
            body.extend_from_slice(if line.starts_with(b".") { &line[1..] } else { &line });
        }
        let script = self.script();
        let answers = !script.drop_after_data && script.stall != Some(Stall::AfterData);
        // Taken with the message, so each recorded message carries the reply it got.
        let reply = answers.then(|| {
            let next = self.script.lock().unwrap().final_replies.pop_front();
            next.unwrap_or_else(|| "250 2.0.0 Ok: queued".into())
        });
        let received = Received {
            connection: self.number,
            mail: tx.mail.unwrap_or_default(),
            rcpts: tx.rcpts,
            raw,
            body,
            tls: self.tls,
            reply: reply.clone(),
            bdat: Vec::new(),
        };
        self.state.lock().unwrap().messages.push(received);
        if script.drop_after_data {
            return Ok(None);
        }
        if script.stall == Some(Stall::AfterData) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Ok(reply)
    }
}

/// A CA and a server certificate for `names`, signed by it: (server config, CA certificate PEM).
pub fn tls_server(names: &[&str]) -> (Arc<rustls::ServerConfig>, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    (Arc::new(config), ca.pem())
}

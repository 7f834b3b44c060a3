//! Peers for the monitor tests, on loopback: a minimal recording SMTP server that can be started
//! on a chosen address (a primary that "comes back" on the port bartleby routes to), and a tiny
//! HTTP server that records webhook POSTs. Dropping either stops it and its connections.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// One message the sink took: envelope and DATA (dot-stuffed, without the final dot line).
#[derive(Clone, Debug)]
pub struct SinkMessage {
    pub from: String,
    pub rcpts: Vec<String>,
    pub data: String,
}

pub struct SmtpSink {
    pub addr: SocketAddr,
    messages: Arc<Mutex<Vec<SinkMessage>>>,
    task: JoinHandle<()>,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpSink {
    /// Listens on `addr` (port 0 for any).
    pub async fn start(addr: SocketAddr) -> SmtpSink {
        let listener = TcpListener::bind(addr).await.expect("bind SMTP sink");
        let addr = listener.local_addr().expect("local addr");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let store = Arc::clone(&messages);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                connections.spawn(smtp_session(tcp, Arc::clone(&store)));
            }
        });
        SmtpSink { addr, messages, task }
    }

    pub fn messages(&self) -> Vec<SinkMessage> {
        self.messages.lock().unwrap().clone()
    }
}

async fn smtp_session(tcp: TcpStream, store: Arc<Mutex<Vec<SinkMessage>>>) {
    let (read, mut write) = tcp.into_split();
    let mut lines = BufReader::new(read);
    let _ = write.write_all(b"220 sink.test ESMTP\r\n").await;
    let mut current = SinkMessage { from: String::new(), rcpts: Vec::new(), data: String::new() };
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            b"250 sink.test\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            current = SinkMessage { from: line[10..].trim().to_string(), rcpts: Vec::new(), data: String::new() };
            b"250 2.1.0 Ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            current.rcpts.push(line[8..].trim().to_string());
            b"250 2.1.5 Ok\r\n"
        } else if upper.starts_with("DATA") {
            let _ = write.write_all(b"354 go ahead\r\n").await;
            loop {
                let mut data = String::new();
                if lines.read_line(&mut data).await.unwrap_or(0) == 0 {
                    return;
                }
                if data == ".\r\n" {
                    break;
                }
                current.data.push_str(&data);
            }
            store.lock().unwrap().push(current.clone());
            b"250 2.0.0 Ok: queued\r\n"
        } else if upper.starts_with("QUIT") {
            let _ = write.write_all(b"221 2.0.0 Bye\r\n").await;
            return;
        } else {
            b"250 2.0.0 Ok\r\n"
        };
        if write.write_all(reply).await.is_err() {
            return;
        }
    }
}

/// One request the webhook server received.
#[derive(Clone, Debug)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: String,
    pub body: Vec<u8>,
}

pub struct WebhookServer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<HttpRequest>>>,
    task: JoinHandle<()>,
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WebhookServer {
    /// Listens on 127.0.0.1:0 and answers every request with `status`.
    pub async fn start(status: u16) -> WebhookServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind webhook server");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let store = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                connections.spawn(http_exchange(tcp, status, Arc::clone(&store)));
            }
        });
        WebhookServer { addr, requests, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<HttpRequest> {
        self.requests.lock().unwrap().clone()
    }
}

async fn http_exchange(mut tcp: TcpStream, status: u16, store: Arc<Mutex<Vec<HttpRequest>>>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let path = words.next().unwrap_or("").to_string();
    let body = buffer[head_end..].to_vec();
    store.lock().unwrap().push(HttpRequest { method, path, headers: head, body });
    let answer = format!("HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = tcp.write_all(answer.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

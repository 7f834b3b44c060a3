//! Headless Chromium for browser tests, driven over the DevTools protocol with a minimal
//! WebSocket client (RFC 6455: masked client frames, unmasked server frames), so no crate is needed.
//! Chromium is Debian's `chromium` package; when it is missing the test fails and says so.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The browser binary: `$CHROMIUM`, else the first of the usual names on PATH.
pub fn find_chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(path);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "the browser test needs headless Chromium, which is not installed: `apt-get install chromium` \
         (scripts/test installs it), or set CHROMIUM=/path/to/chromium"
    );
}

/// A running headless Chromium; killed on drop.
pub struct Browser {
    child: Option<Child>,
    _profile: tempfile::TempDir,
    pub port: u16,
}

impl Browser {
    /// Starts Chromium with remote debugging on a port it picks (read from `DevToolsActivePort`).
    pub fn start() -> Browser {
        let chromium = find_chromium();
        let profile = tempfile::tempdir().expect("profile dir");
        let child = Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--window-size=1280,1100",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
        let mut browser = Browser { child: Some(child), _profile: profile, port: 0 };
        browser.port = wait_for_port(&browser._profile.path().join("DevToolsActivePort"));
        browser
    }

    /// A DevTools session on the first page target.
    pub fn page(&self) -> Cdp {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let list = http_get(self.port, "/json/list");
            let targets: Value = serde_json::from_str(&list).unwrap_or(Value::Null);
            let url = targets
                .as_array()
                .and_then(|t| t.iter().find(|t| t["type"] == "page").and_then(|t| t["webSocketDebuggerUrl"].as_str()));
            if let Some(url) = url {
                let path = url.splitn(4, '/').nth(3).map(|p| format!("/{p}")).expect("ws path");
                return Cdp::connect(self.port, &path);
            }
            assert!(Instant::now() < deadline, "no page target in Chromium: {list}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_for_port(file: &Path) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && let Some(port) = text.lines().next().and_then(|l| l.trim().parse().ok())
        {
            return port;
        }
        assert!(Instant::now() < deadline, "Chromium did not write {} in 30s", file.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A blocking GET on 127.0.0.1:`port`, returning the body (empty when unreachable). Reads
/// exactly Content-Length bytes: Chromium's DevTools server keeps the connection open.
pub fn http_get(port: u16, path: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").is_err() {
        return String::new();
    }
    let mut reader = BufReader::new(stream);
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return String::new();
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            if reader.read_exact(&mut body).is_err() {
                return String::new();
            }
        }
        None => {
            let _ = reader.read_to_end(&mut body);
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// One DevTools WebSocket connection.
pub struct Cdp {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    next_id: u64,
    /// Events read while waiting for a reply, oldest first.
    events: Vec<Value>,
}

impl Cdp {
    fn connect(port: u16, path: &str) -> Cdp {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to DevTools");
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut writer = stream.try_clone().expect("clone");
        write!(
            writer,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .expect("handshake");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut status = String::new();
        reader.read_line(&mut status).expect("handshake reply");
        assert!(status.contains(" 101 "), "DevTools refused the WebSocket: {status}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("handshake header");
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        Cdp { stream: writer, reader, next_id: 1, events: Vec::new() }
    }

    fn send_frame(&mut self, payload: &[u8]) {
        let mut frame = vec![0x81u8];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n < 65536 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).expect("send to DevTools");
    }

    /// Reads one whole message (joining continuation frames).
    fn read_message(&mut self) -> Value {
        let mut message = Vec::new();
        loop {
            let mut head = [0u8; 2];
            self.reader.read_exact(&mut head).expect("DevTools frame");
            let mut len = u64::from(head[1] & 0x7f);
            if len == 126 {
                let mut b = [0u8; 2];
                self.reader.read_exact(&mut b).expect("length");
                len = u64::from(u16::from_be_bytes(b));
            } else if len == 127 {
                let mut b = [0u8; 8];
                self.reader.read_exact(&mut b).expect("length");
                len = u64::from_be_bytes(b);
            }
            let mut payload = vec![0u8; usize::try_from(len).expect("size")];
            self.reader.read_exact(&mut payload).expect("payload");
            match head[0] & 0x0f {
                0x8 => panic!("DevTools closed the connection"),
                0x9 | 0xa => continue,
                _ => message.extend_from_slice(&payload),
            }
            if head[0] & 0x80 != 0 {
                return serde_json::from_slice(&message).expect("DevTools JSON");
            }
        }
    }

    /// Calls a DevTools method and returns its result (panics on a protocol error).
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({ "id": id, "method": method, "params": params });
        self.send_frame(request.to_string().as_bytes());
        loop {
            let message = self.read_message();
            if message["id"] == id {
                assert!(message.get("error").is_none(), "{method}: {message}");
                return message["result"].clone();
            }
            self.events.push(message);
        }
    }

    /// Waits for an event named `method` (one already read counts), for at most 30 s.
    pub fn wait_event(&mut self, method: &str) -> Value {
        if let Some(at) = self.events.iter().position(|e| e["method"] == method) {
            return self.events.remove(at);
        }
        loop {
            let message = self.read_message();
            if message["method"] == method {
                return message;
            }
        }
    }

    /// Forgets the events read so far (before an action whose events we then wait for).
    pub fn clear_events(&mut self) {
        self.events.clear();
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true }));
        assert!(result.get("exceptionDetails").is_none(), "{expression}: {result}");
        result["result"]["value"].clone()
    }

    /// Navigates and waits for the load event.
    pub fn navigate(&mut self, url: &str) {
        self.clear_events();
        self.call("Page.navigate", json!({ "url": url }));
        self.wait_event("Page.loadEventFired");
    }

    /// A PNG of the whole page, written to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true }));
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }
}

/// Standard base64 (RFC 4648 section 4) without line breaks.
pub fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &c)| acc | (u32::from(value(c)) << (18 - 6 * i)));
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

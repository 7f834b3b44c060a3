//! The daemon's events reach `/metrics`: messages received, rejected, delivered; and what it
//! serves passes `promtool check metrics` (Debian's prometheus package; scripts/test installs it).

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use daemon::{Daemon, free_port, rcpt_reply, send_raw};
use fake_primary::{FakePrimary, Script};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn metrics(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the admin port");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    text
}

fn value(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn received_rejected_and_delivered_are_counted() {
    let primary = FakePrimary::start(Script::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let web = free_port("127.0.0.1");
    let extra = format!("[routes]\n\"example.test\" = \"{}\"\n[web]\nlisten = \"127.0.0.1:{web}\"\n", primary.addr);
    let bartleby = Daemon::start(dir.path(), "", &extra);
    let smtp = bartleby.smtp;
    let (reply, refused) = tokio::task::spawn_blocking(move || {
        let reply = send_raw(smtp, "a@sender.test", &["b@example.test"], b"Subject: m\r\n\r\nm\r\n").expect("send");
        (reply, rcpt_reply(smtp, "x@elsewhere.test"))
    })
    .await
    .expect("join");
    assert!(reply.starts_with("250") && refused.starts_with("550"), "{reply} {refused}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while primary.messages().is_empty() || !bartleby.queue().is_empty() {
        assert!(Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = tokio::task::spawn_blocking(move || metrics(web)).await.expect("join");
    assert_eq!(value(&text, "bartleby_messages_received_total"), 1, "{text}");
    assert_eq!(value(&text, "bartleby_messages_delivered_total"), 1, "{text}");
    assert_eq!(value(&text, "bartleby_messages_rejected_total"), 1, "{text}");
    assert_eq!(value(&text, "bartleby_messages_bounced_total"), 0, "{text}");
    assert_eq!(value(&text, "bartleby_bounces_suppressed"), 0, "{text}");
    assert_eq!(value(&text, "bartleby_delivery_latency_seconds_count"), 1, "{text}");
    assert_eq!(value(&text, "bartleby_messages_deferred_total"), 0, "{text}");
    assert_eq!(value(&text, "bartleby_delivery_attempts_deferred_total"), 0, "{text}");
    let version = format!("bartleby_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    assert!(text.lines().any(|l| l == version), "{text}");
    for name in ["process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"] {
        let line =
            text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}: {text}"));
        let number: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number");
        assert!(number > 0.0, "{line}");
    }
    assert!(text.contains("\n# HELP bartleby_messages_received_total "), "{text}");
    assert!(text.contains("\n# TYPE process_cpu_seconds_total counter\n"), "{text}");
    assert!(!text.contains("# EOF"), "{text}");
    promtool_check(&text);
}

/// `promtool check metrics` on the body: the text format parses and the naming lints pass.
fn promtool_check(response: &str) {
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    let mut child = match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(err) => panic!("promtool is needed (apt-get install prometheus, as scripts/test does): {err}"),
    };
    child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write to promtool");
    let output = child.wait_with_output().expect("promtool");
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool check metrics: {}\n{}\n{}\n{body}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

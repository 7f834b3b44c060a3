//! The daemon's events reach `/metrics`: messages received, rejected, delivered.

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
}

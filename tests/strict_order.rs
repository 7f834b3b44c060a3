//! `strict_order`: after an outage the primary receives the domain's mail in exactly the order
//! bartleby accepted it, even when new mail arrives while the backlog waits for its retry.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use daemon::{Daemon, free_port, send_raw};
use fake_primary::{FakePrimary, Script};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

async fn send(bartleby: &Daemon, subject: &'static str) {
    let smtp = bartleby.smtp;
    let data = format!("Subject: {subject}\r\n\r\n{subject}\r\n");
    let reply =
        tokio::task::spawn_blocking(move || send_raw(smtp, "a@sender.test", &["b@example.test"], data.as_bytes()))
            .await
            .expect("join")
            .expect("send");
    assert!(reply.starts_with("250"), "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mail_arriving_after_an_outage_does_not_overtake_the_backlog() {
    let port = free_port("127.0.0.1");
    let primary_addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "first_retry = \"2s\"\nretry_interval = \"1h\"\n\n[routes]\n\"example.test\" = \"{primary_addr}\"\n\n[domain.\"example.test\"]\nstrict_order = true\n"
    );
    let bartleby = Daemon::start(dir.path(), "", &extra);
    send(&bartleby, "first").await;
    send(&bartleby, "second").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bartleby.queue().iter().all(|m| m["attempts"].as_u64() >= Some(1)) || bartleby.queue().len() < 2 {
        assert!(Instant::now() < deadline, "the backlog was not tried while the primary was down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The primary is back; new mail arrives before the backlog's retry is due.
    let primary = FakePrimary::start_at(primary_addr, Script::default()).await;
    send(&bartleby, "third").await;

    let deadline = Instant::now() + Duration::from_secs(20);
    while primary.messages().len() < 3 {
        assert!(Instant::now() < deadline, "not delivered: {:?}\n{}", bartleby.queue(), bartleby.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let subjects: Vec<String> = primary
        .messages()
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.body).into_owned();
            text.lines().find_map(|l| l.strip_prefix("Subject: ").map(str::to_string)).unwrap_or_default()
        })
        .collect();
    assert_eq!(subjects, vec!["first", "second", "third"], "arrival order");
    assert_eq!(primary.connections(), 1, "one connection carries the domain's mail");
}

//! The primary goes down and comes back: the probe notices within one probe interval and the
//! queue drains without a flush command; the pager hears of the outage once and of the recovery once.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/monitor_peers.rs"]
mod monitor_peers;

use daemon::{Daemon, free_port, send_raw};
use monitor_peers::SmtpSink;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::task::block_in_place;

async fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_back_gets_the_queue_within_a_probe_interval() {
    tokio::time::timeout(Duration::from_secs(90), scenario()).await.expect("test finished in time");
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port("127.0.0.1");
    let alerts = dir.path().join("alerts.jsonl");
    // Retries an hour apart: only the probe can explain a delivery within seconds.
    let extra = format!(
        r#"first_retry = "1h"
retry_interval = "1h"

[routes]
"example.test" = "127.0.0.1:{port}"

[monitor]
spool_min_free_percent = 0     # this machine's disk is not what the test is about
probe_interval = "1s"
probe_timeout = "1s"
primary_down_after = "1s"
reminder_interval = "0s"

[[monitor.command]]
argv = ["/bin/sh", "-c", "cat >> '{}'"]
"#,
        alerts.display()
    );
    let mut daemon = block_in_place(|| Daemon::start(dir.path(), "", &extra));
    let smtp = daemon.smtp;
    let reply = block_in_place(|| send_raw(smtp, "a@sender.test", &["bob@example.test"], b"Subject: t\r\n\r\nhi\r\n"))
        .expect("send");
    assert!(reply.starts_with("250"), "{reply}");

    // The first attempt fails, the probes find the primary down, and the pager hears of it.
    wait_until(Duration::from_secs(15), "the primary-down alert", || read(&alerts).contains(r#""state":"firing""#))
        .await;
    let queue = block_in_place(|| daemon.queue());
    assert_eq!(queue.len(), 1, "{queue:?}");
    let firing = read(&alerts);
    let alert: serde_json::Value = serde_json::from_str(firing.lines().next().unwrap()).expect("alert JSON");
    assert_eq!(alert["rule"], "primary_down");
    assert_eq!(alert["subject"], "example.test");
    assert_eq!(alert["host"], "backup.example.test");
    assert!(alert["summary"].as_str().unwrap().contains("primary of example.test down"), "{alert}");

    // The primary comes back on the same port.
    let sink = SmtpSink::start(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let back = Instant::now();
    wait_until(Duration::from_secs(15), "the queued message at the primary", || sink.messages().len() == 1).await;
    let took = back.elapsed();
    // One probe interval (1 s), a probe and a delivery; generous for a busy CI machine.
    assert!(took < Duration::from_millis(3500), "delivered {took:?} after the primary came back");
    assert!(sink.messages()[0].data.contains("Subject: t"));
    assert_eq!(sink.messages()[0].rcpts, vec!["<bob@example.test>".to_string()]);

    wait_until(Duration::from_secs(10), "the recovery alert", || read(&alerts).contains(r#""state":"recovered""#))
        .await;
    wait_until(Duration::from_secs(10), "an empty queue", || block_in_place(|| daemon.queue()).is_empty()).await;
    // A few more probes: nothing more is said about a primary that stays up.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let all = read(&alerts);
    assert_eq!(all.matches(r#""state":"firing""#).count(), 1, "{all}");
    assert_eq!(all.matches(r#""state":"recovered""#).count(), 1, "{all}");
    assert_eq!(all.lines().count(), 2, "{all}");
    let log = daemon.log();
    assert!(log.contains("probe found the destination back: flushing its queue"), "{log}");
    assert!(log.contains("primary of example.test is down"), "{log}");
    assert!(log.contains("primary of example.test is up"), "{log}");
    assert!(block_in_place(|| daemon.stop()).success());
}

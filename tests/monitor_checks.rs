//! `[[monitor.check]]`: other services watched with a TCP connect, an HTTP GET with an expected
//! status, or an SMTP greeting; and end to end, a service that fails and comes back pages once
//! and recovers once through the same channels as the primary.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_primary.rs"]
mod fake_primary;
#[path = "support/monitor_peers.rs"]
mod monitor_peers;

use bartleby::config::{CheckConfig, CheckKind, HumanDuration};
use bartleby::monitor::probe::run_check;
use daemon::{Daemon, free_port};
use fake_primary::{FakePrimary, Script};
use monitor_peers::WebhookServer;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::task::block_in_place;

fn check(kind: CheckKind, target: String, expect_status: u16) -> CheckConfig {
    CheckConfig {
        name: "svc".into(),
        kind,
        target,
        expect_status,
        down_after: HumanDuration::default(),
        timeout: HumanDuration::seconds(2),
    }
}

#[tokio::test]
async fn tcp_http_and_smtp_checks() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let closed = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        let smtp = FakePrimary::start(Script::default()).await;
        let up = run_check(&check(CheckKind::Tcp, smtp.addr.to_string(), 0)).await;
        assert!(up.up && up.latency.is_some(), "{up:?}");
        let down = run_check(&check(CheckKind::Tcp, closed.clone(), 0)).await;
        assert!(!down.up && down.error.as_deref().unwrap_or("").contains("connect"), "{down:?}");

        let greeted = run_check(&check(CheckKind::Smtp, smtp.addr.to_string(), 0)).await;
        assert!(greeted.up, "{greeted:?}");
        // The check says goodbye (the fake records it when it reads it).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !smtp.commands().contains(&"QUIT".to_string()) {
            assert!(Instant::now() < deadline, "{:?}", smtp.commands());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A server that refuses with 554 is not a working SMTP service.
        let refusing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refusing_addr = refusing.local_addr().unwrap();
        let server = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = refusing.accept().await {
                let _ = tcp.write_all(b"554-go away\r\n554 really\r\n").await;
            }
        });
        let refused = run_check(&check(CheckKind::Smtp, refusing_addr.to_string(), 0)).await;
        server.abort();
        assert!(!refused.up && refused.error.as_deref().unwrap_or("").contains("554 really"), "{refused:?}");

        let web = WebhookServer::start(200).await;
        let ok = run_check(&check(CheckKind::Http, web.url("/health"), 200)).await;
        assert!(ok.up, "{ok:?}");
        assert_eq!(web.requests()[0].method, "GET");
        assert_eq!(web.requests()[0].path, "/health");
        let wrong = run_check(&check(CheckKind::Http, web.url("/health"), 204)).await;
        assert!(
            !wrong.up && wrong.error.as_deref().unwrap_or("").contains("HTTP status 200, expected 204"),
            "{wrong:?}"
        );
        let gone = run_check(&check(CheckKind::Http, format!("http://{closed}/"), 200)).await;
        assert!(!gone.up, "{gone:?}");
    })
    .await
    .expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_service_pages_once_and_recovers_once() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port("127.0.0.1");
        let closed = free_port("127.0.0.1");
        let alerts = dir.path().join("alerts.jsonl");
        let extra = format!(
            r#"
[routes]
"example.test" = "127.0.0.1:{closed}"

[monitor]
spool_min_free_percent = 0     # this machine's disk is not what the test is about
probe_interval = "1s"
probe_timeout = "1s"
primary_down_after = "1h"
reminder_interval = "0s"

[[monitor.command]]
argv = ["/bin/sh", "-c", "cat >> '{}'"]

[[monitor.check]]
name = "intranet"
kind = "tcp"
target = "127.0.0.1:{port}"
timeout = "1s"
"#,
            alerts.display()
        );
        let mut daemon = block_in_place(|| Daemon::start(dir.path(), "", &extra));
        let read = || std::fs::read_to_string(&alerts).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(15);
        while !read().contains(r#""state":"firing""#) {
            assert!(Instant::now() < deadline, "no alert for the failing check:\n{}", daemon.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let first: serde_json::Value = serde_json::from_str(read().lines().next().unwrap()).unwrap();
        assert_eq!(first["rule"], "check");
        assert_eq!(first["subject"], "intranet");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while !read().contains(r#""state":"recovered""#) {
            assert!(Instant::now() < deadline, "no recovery alert:\n{}", daemon.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(listener);
        let all = read();
        assert_eq!(all.lines().count(), 2, "{all}");
        assert!(daemon.log().contains("check intranet is down"));
        assert!(block_in_place(|| daemon.stop()).success());
    })
    .await
    .expect("in time");
}

//! The SMTP server over raw sockets: SMTP smuggling, the session cap, timeouts and shutdown.

#[path = "support/smtp_harness.rs"]
mod smtp_harness;

use bartleby::config::HumanDuration;
use bartleby::spool::Queue as _;
use smtp_harness::{Client, Harness};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpStream;

async fn bounded<F: std::future::Future>(test: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(90), test).await.expect("test finished in time")
}

fn incoming_is_empty(harness: &Harness) -> bool {
    let incoming = harness.spool.root().join("incoming");
    std::fs::read_dir(incoming).expect("incoming").next().is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_yield_one_rejected_message() {
    bounded(async {
        let harness = Harness::start(|_| {}).await;
        for end in [&b"\n.\n"[..], b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r"] {
            let mut client = Client::connect(&harness).await;
            client.start_data().await;
            let mut data = b"Subject: one\r\n\r\nfirst".to_vec();
            data.extend_from_slice(end);
            data.extend_from_slice(b"MAIL FROM:<evil@b.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n");
            data.extend_from_slice(b"Subject: smuggled\r\n\r\nsecond\r\n.\r\nQUIT\r\n");
            client.send(&data).await;
            assert_eq!(client.reply().await, "550 5.5.2 message contains bare CR or LF\r\n", "{end:?}");
            assert_eq!(client.reply().await, "221 2.0.0 Bye\r\n", "{end:?}");
            assert!(client.closed().await);
        }
        assert!(harness.spool.is_empty());
        assert_eq!(harness.queued.load(Ordering::SeqCst), 0);
        assert!(incoming_is_empty(&harness));
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_beyond_the_cap_get_421() {
    bounded(async {
        let harness = Harness::start(|c| c.smtp.max_sessions = 1).await;
        let mut first = Client::connect(&harness).await;
        assert!(first.reply().await.starts_with("220 mx.test"));
        let mut second = Client::connect(&harness).await;
        assert_eq!(second.reply().await, "421 4.3.2 too many connections, try again later\r\n");
        assert!(second.closed().await);
        first.send(b"QUIT\r\n").await;
        assert_eq!(first.reply().await, "221 2.0.0 Bye\r\n");
        assert!(first.closed().await);
        // The slot is free again once the first session has ended.
        let mut greeting = String::new();
        for _ in 0..50 {
            let mut third = Client::connect(&harness).await;
            greeting = third.reply().await;
            if greeting.starts_with("220") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(greeting.starts_with("220 mx.test"), "{greeting}");
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_timeout_closes_with_421() {
    bounded(async {
        let harness = Harness::start(|c| c.smtp.command_timeout = HumanDuration::seconds(1)).await;
        let mut client = Client::connect(&harness).await;
        assert!(client.reply().await.starts_with("220"));
        client.send(b"EHLO client.test\r\n").await;
        assert!(client.reply().await.starts_with("250-"));
        assert_eq!(client.reply().await, "421 4.4.2 mx.test timeout, closing\r\n");
        assert!(client.closed().await);
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_timeout_drops_the_message() {
    bounded(async {
        let harness = Harness::start(|c| c.smtp.data_timeout = HumanDuration::seconds(1)).await;
        let mut client = Client::connect(&harness).await;
        client.start_data().await;
        client.send(b"Subject: slow\r\n\r\nhalf a mess").await;
        assert_eq!(client.reply().await, "421 4.4.2 mx.test timeout, closing\r\n");
        assert!(client.closed().await);
        assert!(harness.spool.is_empty());
        assert!(incoming_is_empty(&harness));
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_421_drops_partial_data_and_returns() {
    bounded(async {
        let mut harness = Harness::start(|_| {}).await;
        let addr = harness.addr;
        let mut idle = Client::connect(&harness).await;
        assert!(idle.reply().await.starts_with("220"));
        idle.send(b"EHLO client.test\r\n").await;
        assert!(idle.reply().await.starts_with("250-"));
        let mut sending = Client::connect(&harness).await;
        sending.start_data().await;
        sending.send(b"Subject: cut\r\n\r\nhalf").await;
        // Let the server take in the partial data before it is told to stop.
        tokio::time::sleep(Duration::from_millis(200)).await;
        harness.shutdown().await.expect("serve returns");
        assert_eq!(idle.reply().await, "421 4.3.2 mx.test shutting down\r\n");
        assert!(idle.closed().await);
        assert_eq!(sending.reply().await, "421 4.3.2 mx.test shutting down\r\n");
        assert!(sending.closed().await);
        assert!(harness.spool.is_empty());
        assert!(incoming_is_empty(&harness), "half-written message left");
        // The listener is gone.
        assert!(TcpStream::connect(addr).await.is_err());
    })
    .await
}

//! The admin page and `/api/queue` with 100,000 messages queued: the first page must come back in
//! well under a second (asserted loosely, < 1 s, so it holds in a debug build too), and a filter
//! that scans the whole queue as well.

#[path = "support/web_server.rs"]
mod web_server;

use bartleby::spool::Queue as _;
use bartleby::spool::{Envelope, Recipient, Spool, now_micros};
use std::time::{Duration, Instant};
use web_server::TestWeb;

const MESSAGES: usize = 100_000;

/// Writes the messages in the spool's documented on-disk format (`docs/spool.md`) without an fsync
/// per message, then lets `Spool::open` recover them: 100,000 durable commits would take minutes.
fn fill(dir: &std::path::Path) -> String {
    let root = dir.join("spool");
    let (spool, _) = Spool::open(&root).expect("spool");
    let messages = root.join("messages");
    let later = now_micros() + 3_600_000_000;
    let mut last = String::new();
    for i in 0..MESSAGES {
        let id = spool.new_id();
        let body = format!("From: s{i}@sender.test\r\nSubject: message {i}\r\n\r\nHello.\r\n");
        let domain = if i % 2 == 0 { "example.test" } else { "other.test" };
        let mut envelope =
            Envelope::new(id.clone(), format!("s{i}@sender.test"), vec![Recipient::new(format!("r{i}@{domain}"))]);
        envelope.size = body.len() as u64;
        envelope.next_attempt = later;
        std::fs::write(messages.join(format!("{id}.msg")), body).expect("body");
        std::fs::write(messages.join(format!("{id}.env")), serde_json::to_vec(&envelope).expect("json"))
            .expect("envelope");
        last = format!("s{i}@sender.test");
    }
    drop(spool);
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_page_is_fast_with_100k_messages() {
    tokio::time::timeout(Duration::from_secs(300), async {
        // 200,000 small files: on tmpfs when there is one, so writing and removing them is quick.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("tempdir");
        let last_sender = tokio::task::spawn_blocking({
            let path = dir.path().to_path_buf();
            move || fill(&path)
        })
        .await
        .expect("fill");
        let web = TestWeb::start_with_spool("trust_allowed_hosts = true", dir).await;
        assert_eq!(web.spool.len(), MESSAGES);
        let mut client = web.client();
        client.get("/healthz").await;

        for path in ["/", "/api/queue", "/api/status", "/api/queue/shape"] {
            let started = Instant::now();
            let reply = client.get(path).await;
            let took = started.elapsed();
            assert_eq!(reply.status, 200, "{path}");
            eprintln!("{path}: {took:?}");
            assert!(took < Duration::from_secs(1), "{path} took {took:?}");
        }
        let started = Instant::now();
        let filtered = client.get(&format!("/api/queue?sender={last_sender}&domain=other.test")).await.json();
        let took = started.elapsed();
        eprintln!("filtered: {took:?}");
        assert_eq!(filtered["matched"], 1);
        assert_eq!(filtered["total"], MESSAGES);
        assert!(took < Duration::from_secs(1), "a filter over the whole queue took {took:?}");
        let last_page = client.get("/api/queue?page=2000").await.json();
        assert_eq!(last_page["messages"].as_array().map(Vec::len), Some(50));
        assert_eq!(last_page["messages"][49]["sender"], last_sender.as_str());
        web.stop().await;
    })
    .await
    .expect("test finished in time");
}

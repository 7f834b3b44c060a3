//! Throughput against Postfix's smtp-sink: 2,000 messages of 4 KiB over pipelined, reused
//! connections. Skipped (with a message) when smtp-sink is not installed.

use bartleby::config::{Config, Route};
use bartleby::deliver::{Deliverer, Job, RcptOutcome};
use bartleby::spool::{Envelope, MemoryQueue, Queue, Recipient};
use std::process::Command;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MESSAGES: usize = 2000;

/// Kills smtp-sink when the test ends, however it ends.
struct Sink(std::process::Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn drains_into_smtp_sink_quickly() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let spawned = Command::new("smtp-sink")
        .args(["-u", "nobody", &format!("127.0.0.1:{port}"), "256"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = spawned else {
        eprintln!("smtp-sink not installed; skipped");
        return;
    };
    let _sink = Sink(child);
    // Wait until it listens.
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    ready.await.expect("smtp-sink listens");

    let line = "x".repeat(78) + "\r\n";
    let body = format!("Subject: load\r\n\r\n{}", line.repeat(4096 / 80));
    let queue = MemoryQueue::new();
    let jobs: Vec<Job> = (0..MESSAGES)
        .map(|i| {
            let id = format!("m{i:05}");
            let mut message = Arc::clone(&queue).incoming(&id).expect("incoming");
            message.write(body.as_bytes()).expect("write");
            let envelope =
                Envelope::new(id.clone(), "s@origin.test".into(), vec![Recipient::new("a@example.test".into())]);
            Job { envelope: message.commit(envelope).expect("commit"), queue: Arc::clone(&queue) as Arc<dyn Queue> }
        })
        .collect();
    let mut config = Config::demo();
    config.dns.nameservers = vec!["127.0.0.1:9".parse().unwrap()];
    config.routes.insert("example.test".into(), Route { host: "127.0.0.1".into(), port });
    let deliverer = Deliverer::new(Arc::new(config)).expect("deliverer");
    let started = Instant::now();
    let results =
        tokio::time::timeout(Duration::from_secs(120), deliverer.deliver("example.test", jobs)).await.expect("in time");
    let elapsed = started.elapsed();
    let delivered = results.iter().filter(|r| matches!(r.outcomes[0].1, RcptOutcome::Delivered(_))).count();
    eprintln!("{delivered} messages in {elapsed:?} ({:.0}/s)", delivered as f64 / elapsed.as_secs_f64());
    assert_eq!(
        delivered,
        MESSAGES,
        "{:?}",
        results.iter().find(|r| !matches!(r.outcomes[0].1, RcptOutcome::Delivered(_)))
    );
}

//! Connections kept open between batches (the deliverer's connection cache): the primary sees
//! many batches on few connections, an idle connection is closed with QUIT after the idle limit,
//! and a cached connection the primary has closed costs no message a deferral.

#[path = "support/delivery.rs"]
mod delivery;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use bartleby::config::Config;
use bartleby::deliver::cache::IDLE_LIMIT;
use bartleby::deliver::{Deliverer, Job, JobResult, RcptOutcome};
use fake_primary::{FakePrimary, Script};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const LIMIT: Duration = Duration::from_secs(30);

fn config(port: u16, connections: usize) -> Arc<Config> {
    delivery::config(port, |c| c.delivery.max_connections_per_destination = connections)
}

fn jobs(dir: &TempDir, first: usize, count: usize) -> Vec<Job> {
    (first..first + count)
        .map(|i| {
            delivery::job(
                dir,
                &format!("m{i:03}"),
                &["a@example.test"],
                format!("Subject: {i}\r\n\r\nbody {i}\r\n").as_bytes(),
            )
        })
        .collect()
}

fn all_delivered(results: &[JobResult]) -> bool {
    results.iter().all(|r| r.outcomes.iter().all(|(_, o)| matches!(o, RcptOutcome::Delivered(_))))
}

#[tokio::test]
async fn batches_share_cached_connections() {
    let primary = FakePrimary::start(Script::default()).await;
    let dir = TempDir::new().unwrap();
    let deliverer = Deliverer::new(config(primary.addr.port(), 2)).unwrap();
    let work = async {
        for batch in 0..5 {
            let results = deliverer.deliver("example.test", jobs(&dir, batch * 4, 4)).await;
            assert!(all_delivered(&results), "batch {batch}: {results:?}");
            assert!(deliverer.idle_connections() <= 2);
        }
        deliverer.close_idle().await;
    };
    tokio::time::timeout(LIMIT, work).await.expect("in time");
    assert_eq!(primary.messages().len(), 20);
    assert!(primary.connections() <= 2, "5 batches on {} connections", primary.connections());
    assert_eq!(deliverer.idle_connections(), 0);
    let commands = primary.commands();
    let quits = commands.iter().filter(|c| *c == "QUIT").count();
    assert_eq!(quits, primary.connections(), "every connection ends with QUIT: {commands:?}");
    // Every transaction after a connection's first starts with RSET (RFC 5321 4.1.1.5).
    let rsets = commands.iter().filter(|c| *c == "RSET").count();
    assert_eq!(rsets, 20 - primary.connections());
}

#[tokio::test]
async fn idle_connection_is_closed_after_the_idle_limit() {
    let primary = FakePrimary::start(Script::default()).await;
    let dir = TempDir::new().unwrap();
    let deliverer = Deliverer::new(config(primary.addr.port(), 1)).unwrap();
    let results = tokio::time::timeout(LIMIT, deliverer.deliver("example.test", jobs(&dir, 0, 1))).await.unwrap();
    assert!(all_delivered(&results));
    assert_eq!(deliverer.idle_connections(), 1);
    assert!(!primary.commands().contains(&"QUIT".to_string()));
    tokio::time::sleep(IDLE_LIMIT + Duration::from_millis(700)).await;
    assert_eq!(deliverer.idle_connections(), 0);
    assert_eq!(primary.commands().last().map(String::as_str), Some("QUIT"));
}

/// A primary that closes every connection right after answering one message, without waiting
/// for a command: each connection the deliverer keeps is dead when the next batch takes it.
struct OneShotPrimary {
    port: u16,
    connections: Arc<AtomicUsize>,
    messages: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OneShotPrimary {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OneShotPrimary {
    async fn start() -> OneShotPrimary {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (connections, messages) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (c, m) = (connections.clone(), messages.clone());
        let task = tokio::spawn(async move {
            let mut sessions = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                sessions.spawn(one_message(tcp, m.clone()));
            }
        });
        OneShotPrimary { port, connections, messages, task }
    }
}

async fn one_message(tcp: tokio::net::TcpStream, messages: Arc<AtomicUsize>) -> std::io::Result<()> {
    let mut io = BufReader::new(tcp);
    io.write_all(b"220 oneshot ESMTP\r\n").await?;
    let mut line = String::new();
    loop {
        line.clear();
        if io.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-oneshot\r\n250 PIPELINING\r\n",
            "DATA" => {
                io.write_all(b"354 go on\r\n").await?;
                loop {
                    line.clear();
                    if io.read_line(&mut line).await? == 0 || line == ".\r\n" {
                        break;
                    }
                }
                messages.fetch_add(1, Ordering::SeqCst);
                io.write_all(b"250 2.0.0 queued\r\n").await?;
                // Gone, as a primary that restarted or timed the idle session out.
                return Ok(());
            }
            "QUIT" => return io.write_all(b"221 bye\r\n").await,
            _ => b"250 ok\r\n",
        };
        io.write_all(reply).await?;
    }
}

#[tokio::test]
async fn dead_cached_connection_loses_nothing() {
    let primary = OneShotPrimary::start().await;
    let dir = TempDir::new().unwrap();
    let deliverer = Deliverer::new(config(primary.port, 1)).unwrap();
    let work = async {
        let first = deliverer.deliver("example.test", jobs(&dir, 0, 1)).await;
        assert!(all_delivered(&first), "{first:?}");
        // The cached connection is closed by now; the next batch must notice and reconnect, for
        // each of its messages, since every connection dies after one.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = deliverer.deliver("example.test", jobs(&dir, 1, 3)).await;
        assert!(all_delivered(&second), "a dead cached connection deferred a message: {second:?}");
        deliverer.close_idle().await;
    };
    tokio::time::timeout(LIMIT, work).await.expect("in time");
    assert_eq!(primary.messages.load(Ordering::SeqCst), 4);
    assert_eq!(primary.connections.load(Ordering::SeqCst), 4);
}

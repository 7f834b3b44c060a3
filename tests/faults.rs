//! Faults, repeated: bartleby is killed with SIGKILL at random moments, round after round, while 20
//! clients send and while it delivers to a slow primary (one that holds each final reply). After
//! every restart nothing is corrupt; in the end every message that got a 250 reached the primary
//! at least once, and duplicates stay within what was in flight at the kills.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use daemon::{Daemon, send_raw};
use fake_primary::{FakePrimary, Script};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ROUNDS: usize = 6;
const CLIENTS: usize = 20;
/// `delivery.max_connections_per_destination`: at most this many deliveries are in flight.
const CONNECTIONS: usize = 4;

fn tag_of(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    text.lines().find_map(|l| l.strip_prefix("Subject: fault ")).map(|t| t.trim().to_string())
}

/// 20 clients sending until `stop`; returns the tags that got a 250.
fn clients(
    smtp: std::net::SocketAddr,
    round: usize,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<String>>> {
    (0..CLIENTS)
        .map(|client| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) || n >= 50 {
                        break;
                    }
                    let tag = format!("{round}-{client}-{n}");
                    let data = format!("Subject: fault {tag}\r\n\r\n{}\r\n", "x".repeat(n * 97 % 4000));
                    match send_raw(smtp, "a@sender.test", &["b@example.test"], data.as_bytes()) {
                        Ok(reply) if reply.starts_with("250") => acked.push(tag),
                        _ => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                acked
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sigkill_while_receiving_and_delivering_loses_nothing() {
    // A slow primary: every message waits for its final reply while the kills happen.
    let primary = FakePrimary::start(Script::default()).await;
    let slow = SlowProxy::start(primary.addr, Duration::from_millis(150)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "[routes]\n\"example.test\" = \"{}\"\n[delivery]\nmax_connections_per_destination = {CONNECTIONS}\n",
        slow.addr
    );
    let mut bartleby = Daemon::start(dir.path(), "", &extra);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    // Deliveries the primary completed in each round before its kill: bartleby settles outcomes when
    // a delivery batch returns, so these are the deliveries that can be "in flight" at a kill.
    let mut in_flight_bound = 0;
    let mut seen = 0;
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = clients(bartleby.smtp, round, Arc::clone(&stop));
        tokio::time::sleep(Duration::from_millis(rng.u64(200..1200))).await;
        bartleby.kill();
        let now = primary.messages().len();
        in_flight_bound += now - seen;
        seen = now;
        stop.store(true, Ordering::SeqCst);
        for thread in threads {
            acked.lock().expect("lock").extend(thread.join().expect("client thread"));
        }
        bartleby.restart();
        assert_no_corruption(&bartleby);
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= ROUNDS * 5, "too few messages got through to mean anything: {}", acked.len());
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let received = counts(&primary);
        if acked.iter().all(|t| received.contains_key(t)) && bartleby.queue().is_empty() {
            let duplicates: usize = received.values().map(|n| n - 1).sum();
            // Each kill can repeat at most the deliveries in flight (not yet settled) at that moment.
            assert!(duplicates <= in_flight_bound, "{duplicates} duplicates, bound {in_flight_bound}");
            println!(
                "{} acknowledged, {} received, {duplicates} duplicates (bound {in_flight_bound}, {} connections)",
                acked.len(),
                received.len(),
                CONNECTIONS
            );
            break;
        }
        assert!(Instant::now() < deadline, "not every acknowledged message was delivered:\n{}", bartleby.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bartleby.stop();
}

fn counts(primary: &FakePrimary) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for message in primary.messages() {
        if let Some(tag) = tag_of(&message.body) {
            *counts.entry(tag).or_insert(0) += 1;
        }
    }
    counts
}

fn assert_no_corruption(bartleby: &Daemon) {
    let log = bartleby.log();
    for line in log.lines().filter(|l| l.contains("spool recovered")) {
        assert!(line.contains("quarantined=0"), "a spool entry was corrupt: {line}");
    }
    let corrupt = bartleby.spool_dir().join("corrupt");
    let entries = std::fs::read_dir(&corrupt).map(|d| d.count()).unwrap_or(0);
    assert_eq!(entries, 0, "quarantined files in {}", corrupt.display());
}

/// A TCP proxy that delays every chunk from the primary, so deliveries are in flight for a while.
struct SlowProxy {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SlowProxy {
    async fn start(target: std::net::SocketAddr, delay: Duration) -> SlowProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                conns.spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            tokio::time::sleep(delay).await;
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(120), async { tokio::join!(up, down) }).await;
                });
            }
        });
        SlowProxy { addr, task }
    }
}

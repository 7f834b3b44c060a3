//! The socket loop on paused time: the trickling client (one octet every 2 s) against the
//! default deadlines, over an in-memory stream, in virtual minutes that take milliseconds.

use super::*;
use crate::config::Config;
use tokio::io::DuplexStream;
use tokio::time::Instant;

struct Fixture {
    _dir: tempfile::TempDir,
    context: Arc<ServerContext>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::demo();
    config.hostname = "mx.test".into();
    config.relay.domains = vec!["example.test".into()];
    config.queue.dir = dir.path().to_path_buf();
    config.queue.min_free = 0;
    let (spool, _) = crate::spool::Spool::open(dir.path()).expect("spool");
    let context = ServerContext::new(Arc::new(config), Arc::new(spool), Box::new(|_: &Envelope| {}));
    Fixture { _dir: dir, context: Arc::new(context) }
}

/// Runs `drive` for one session on `stream` (as if just greeted); returns how it ended and when.
fn serve_one(fx: &Fixture, mut stream: DuplexStream) -> tokio::task::JoinHandle<(&'static str, Instant)> {
    let context = Arc::clone(&fx.context);
    tokio::spawn(async move {
        let (_keep, mut shutdown) = watch::channel(false);
        let overload = Overload::new();
        let mut session = Session::new(Arc::clone(&context), Arc::default(), "192.0.2.7".parse().expect("ip"), false);
        let limits = PaceLimits::from_config(&context.config.smtp);
        let mut timing = Timing { pace: Pace::new(limits, Instant::now()), standing: overload.register() };
        timing.progressed(false);
        let end = match drive(&mut stream, &mut session, &mut shutdown, &mut timing, &[]).await {
            End::Closed(reason) => reason,
            End::StartTls => "starttls",
        };
        (end, Instant::now())
    })
}

/// Fails the test, rather than hanging it, if `future` takes an hour of virtual time.
async fn within_an_hour<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(3600), future).await.expect("done within a virtual hour")
}

/// Writes `setup` at once, then `trickle` one octet every 2 s; returns all the server said.
async fn trickle(mut client: DuplexStream, setup: &[u8], trickle: &[u8]) -> String {
    let mut said = Vec::new();
    let mut buffer = [0u8; 4096];
    client.write_all(setup).await.expect("setup");
    for &byte in trickle {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {
                if client.write_all(&[byte]).await.is_err() {
                    break;
                }
            }
            read = client.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => said.extend_from_slice(&buffer[..n]),
            },
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut said)).await;
    String::from_utf8_lossy(&said).into_owned()
}

#[tokio::test(start_paused = true)]
async fn a_command_line_trickled_at_one_octet_every_2s_is_cut_after_5_minutes() {
    let fx = fixture();
    let (client, server) = tokio::io::duplex(64 * 1024);
    let start = Instant::now();
    let served = serve_one(&fx, server);
    // Never a whole line, and never 5 minutes without an octet: only the command deadline ends it.
    let said = trickle(client, b"", &b"x".repeat(1000)).await;
    let (end, at) = within_an_hour(served).await.expect("session");
    assert_eq!((end, said.as_str()), ("timeout", "421 4.4.2 mx.test timeout, closing\r\n"));
    assert!(at - start >= Duration::from_secs(300) && at - start <= Duration::from_secs(302), "{:?}", at - start);
}

#[tokio::test(start_paused = true)]
async fn data_trickled_at_one_octet_every_2s_is_cut_after_10_minutes() {
    let fx = fixture();
    let (client, server) = tokio::io::duplex(64 * 1024);
    let served = serve_one(&fx, server);
    let setup = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n";
    let start = Instant::now();
    let said = trickle(client, setup, &b"y".repeat(1000)).await;
    let (end, at) = within_an_hour(served).await.expect("session");
    assert_eq!(end, "timeout");
    assert!(said.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n421 4.4.2 mx.test timeout, closing\r\n"), "{said}");
    // 10 minutes, plus the 300 octets' worth at 500 octets a second.
    let took = at - start;
    assert!(took >= Duration::from_secs(600) && took <= Duration::from_secs(603), "{took:?}");
    assert!(fx.context.spool.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_steady_sender_is_not_cut() {
    let fx = fixture();
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let served = serve_one(&fx, server);
    client
        .write_all(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\nSubject: s\r\n\r\n")
        .await
        .expect("write");
    // 1000 octets every 2 s for 20 minutes: longer than the 10-minute deadline, above the rate.
    let line = [b"z".repeat(998), b"\r\n".to_vec()].concat();
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        client.write_all(&line).await.expect("still open");
    }
    client.write_all(b".\r\nQUIT\r\n").await.expect("write");
    let mut said = String::new();
    within_an_hour(client.read_to_string(&mut said)).await.expect("read");
    assert!(said.contains("250 2.0.0 Ok: queued as "), "{said}");
    assert_eq!(served.await.expect("session").0, "quit");
}

#[tokio::test(start_paused = true)]
async fn a_bdat_chunk_trickled_at_one_octet_every_2s_gets_the_data_deadline() {
    let fx = fixture();
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let served = serve_one(&fx, server);
    client.write_all(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\n").await.expect("setup");
    let mut said = Vec::new();
    let mut buffer = [0u8; 4096];
    while !said.ends_with(b"250 2.1.5 Ok\r\n") {
        let n = client.read(&mut buffer).await.expect("replies");
        said.extend_from_slice(&buffer[..n]);
    }
    let start = Instant::now();
    // The BDAT line itself trickles too (18 octets, 36 s of command time); no reply follows it,
    // and from its CRLF on the octets are data: cut at the 10-minute DATA deadline, not at the
    // 5-minute command deadline that would run from the RCPT's reply.
    for byte in [b"BDAT 100000 LAST\r\n".to_vec(), b"y".repeat(1000)].concat() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if client.write_all(&[byte]).await.is_err() {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut said)).await;
    let said = String::from_utf8_lossy(&said);
    let (end, at) = within_an_hour(served).await.expect("session");
    assert_eq!(end, "timeout");
    assert!(said.ends_with("250 2.1.5 Ok\r\n421 4.4.2 mx.test timeout, closing\r\n"), "{said}");
    let took = at - start;
    assert!(took >= Duration::from_secs(636) && took <= Duration::from_secs(640), "{took:?}");
    assert!(fx.context.spool.is_empty());
}

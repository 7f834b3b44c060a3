//! Slow and early clients over real sockets (issue 16, points 1 and 6): a client trickling one octet
//! at a time is cut at the command-line and DATA deadlines with 421 4.4.2; when every session is
//! taken by such clients, a real sender still gets in; a client that talks before the greeting is
//! refused with 554 5.5.1 (or only logged). Timeouts are configured to a few seconds.

#[path = "support/smtp_harness.rs"]
mod smtp_harness;

use bartleby::config::{HumanDuration, PregreetAction};
use bartleby::spool::Queue;
use smtp_harness::{Client, Harness, python, stdout};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;

async fn bounded<F: std::future::Future>(test: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), test).await.expect("test finished in time")
}

/// A client that sends `bytes` one octet every `every`, from its own loopback address, while it
/// collects everything the server says until the server closes. Dropping it stops both.
struct Trickler {
    writer: JoinHandle<()>,
    reader: JoinHandle<(String, Instant)>,
}

impl Trickler {
    /// Connects from `from`, reads the greeting, sends `setup` at once (e.g. up to DATA), waits for
    /// `replies` replies to it, then trickles `bytes`.
    async fn start(
        server: SocketAddr,
        from: &str,
        setup: &[u8],
        replies: usize,
        bytes: Vec<u8>,
        every: Duration,
    ) -> Trickler {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(format!("{from}:0").parse().expect("address")).expect("bind source address");
        let stream = socket.connect(server).await.expect("connect");
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        assert!(smtp_harness::read_reply(&mut read).await.starts_with("220 "));
        write.write_all(setup).await.expect("setup");
        for _ in 0..replies {
            let reply = smtp_harness::read_reply(&mut read).await;
            assert!(reply.starts_with('2') || reply.starts_with('3'), "{reply}");
        }
        let writer = tokio::spawn(async move {
            for byte in bytes {
                tokio::time::sleep(every).await;
                if write.write_all(&[byte]).await.is_err() {
                    return;
                }
            }
        });
        let reader = tokio::spawn(async move {
            let mut text = Vec::new();
            let _ = read.read_to_end(&mut text).await;
            (String::from_utf8_lossy(&text).into_owned(), Instant::now())
        });
        Trickler { writer, reader }
    }

    /// What the server said until it closed, and when it closed; None if it is still open after `wait`.
    async fn outcome(&mut self, wait: Duration) -> Option<(String, Instant)> {
        tokio::time::timeout(wait, &mut self.reader).await.ok().map(|joined| joined.expect("reader"))
    }
}

impl Drop for Trickler {
    fn drop(&mut self) {
        self.writer.abort();
        self.reader.abort();
    }
}

/// An endless command line, one octet at a time: `NOOP xxxx...`.
fn endless_line() -> Vec<u8> {
    let mut line = b"NOOP ".to_vec();
    line.extend(std::iter::repeat_n(b'x', 400));
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_command_line_is_cut_at_the_command_deadline() {
    bounded(async {
        // The per-read timeout stays at 5 minutes: only the deadline for the whole line can fire.
        let harness = Harness::start(|c| c.smtp.command_deadline = HumanDuration::seconds(2)).await;
        let started = Instant::now();
        let mut slow = Trickler::start(
            harness.addr,
            "127.0.0.1",
            b"",
            0,
            b"EHLO client.test\r\n".to_vec(),
            Duration::from_millis(250),
        )
        .await;
        let (text, closed) = slow.outcome(Duration::from_secs(10)).await.expect("the server closed the session");
        assert_eq!(text, "421 4.4.2 mx.test timeout, closing\r\n", "cut before the line was complete");
        let took = closed - started;
        assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(4), "{took:?}");
        // A client that sends whole commands at once is not affected.
        let mut client = Client::connect(&harness).await;
        assert!(client.reply().await.starts_with("220 "));
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(900)).await;
            client.send(b"NOOP\r\n").await;
            assert_eq!(client.reply().await, "250 2.0.0 Ok\r\n");
        }
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_data_below_the_minimum_rate_is_cut() {
    bounded(async {
        let harness = Harness::start(|c| {
            c.smtp.data_deadline = HumanDuration::seconds(2);
            c.smtp.data_min_rate = 1000;
        })
        .await;
        let setup = b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n";
        let body = b"Subject: slow\r\n\r\n".repeat(20);
        let started = Instant::now();
        // 10 octets a second: far below 1000, far above the per-read timeout of 10 minutes.
        let mut slow = Trickler::start(harness.addr, "127.0.0.1", setup, 4, body, Duration::from_millis(100)).await;
        let (text, closed) = slow.outcome(Duration::from_secs(10)).await.expect("the server closed the session");
        assert_eq!(text, "421 4.4.2 mx.test timeout, closing\r\n");
        let took = closed - started;
        assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(4), "{took:?}");
        assert!(harness.spool.is_empty());
        // A sender above the rate may take longer than the 2 s: 3 s for 30 KB (10 KB/s) earns 30 s.
        let mut fast = Client::connect(&harness).await;
        fast.start_data().await;
        fast.send(b"Subject: steady\r\n\r\n").await;
        let mut line = b"y".repeat(998);
        line.extend_from_slice(b"\r\n");
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            fast.send(&line.repeat(3)).await;
        }
        fast.send(b".\r\n").await;
        let reply = fast.reply().await;
        assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
        assert_eq!(harness.spool.len(), 1);
        harness.stop().await.expect("serve");
    })
    .await
}

/// Sends one message with smtplib and prints the outcome.
const SEND: &str = r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='client.test', timeout=20)
try:
    s.sendmail('a@b.test', ['x@example.test'], b'Subject: real\r\n\r\nhello\r\n')
    print('SENT')
except smtplib.SMTPException as e:
    print('ERROR', repr(e))
s.quit()
"#;

/// The replies of the slow clients the server has closed since the last call; those are dropped.
async fn closed_now(slow: &mut Vec<Trickler>) -> Vec<String> {
    let mut closed = Vec::new();
    let mut open = Vec::new();
    for mut trickler in slow.drain(..) {
        match trickler.outcome(Duration::from_millis(300)).await {
            Some((text, _)) => closed.push(text),
            None => open.push(trickler),
        }
    }
    *slow = open;
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sessions_make_room_for_a_real_sender() {
    bounded(async {
        let harness = Harness::start(|c| {
            c.smtp.max_sessions = 3;
            c.smtp.overload_timeout = HumanDuration::seconds(1);
        })
        .await;
        let every = Duration::from_millis(200);
        let data = b"EHLO slow.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n";
        // Every session taken, each from its own address, none ever timing out: two trickle a command
        // line, one trickles message data.
        let mut slow = vec![
            Trickler::start(harness.addr, "127.0.0.11", b"", 0, endless_line(), every).await,
            Trickler::start(harness.addr, "127.0.0.12", b"", 0, endless_line(), every).await,
            Trickler::start(harness.addr, "127.0.0.13", data, 4, b"x".repeat(400), every).await,
        ];
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let text = stdout(&python(&harness, SEND, &[]).await);
        assert!(text.contains("SENT"), "the real sender got in: {text}");
        assert_eq!(harness.spool.len(), 1);
        // Exactly one slow session made room for it, with 421 4.4.2.
        assert_eq!(closed_now(&mut slow).await, ["421 4.4.2 mx.test too busy for stalled sessions, closing\r\n"]);
        // A client that has just been greeted is not behind: the next newcomer takes the place of the
        // slow session behind longest, not of this one.
        let mut patient = Client::connect(&harness).await;
        assert!(patient.reply().await.starts_with("220 "));
        let text = stdout(&python(&harness, SEND, &[]).await);
        assert!(text.contains("SENT"), "the second real sender got in: {text}");
        assert_eq!(closed_now(&mut slow).await.len(), 1, "a second slow session made room");
        patient.send(b"QUIT\r\n").await;
        assert_eq!(patient.reply().await, "221 2.0.0 Bye\r\n");
        drop(slow);
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_talker_is_refused_before_the_greeting() {
    bounded(async {
        let harness = Harness::start(|c| c.smtp.pregreet_delay = HumanDuration::seconds(1)).await;
        let mut bot = Client::connect(&harness).await;
        bot.send(b"EHLO bot.test\r\nMAIL FROM:<spam@b.test>\r\n").await;
        assert_eq!(bot.reply().await, "554 5.5.1 mx.test protocol error: talked before the greeting\r\n");
        assert!(bot.closed().await);
        assert!(harness.spool.is_empty());
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_client_is_greeted_after_the_pregreet_delay() {
    bounded(async {
        let harness = Harness::start(|c| c.smtp.pregreet_delay = HumanDuration::seconds(1)).await;
        let started = Instant::now();
        let mut client = Client::connect(&harness).await;
        client.start_data().await;
        assert!(started.elapsed() >= Duration::from_millis(900), "greeted after the delay");
        client.send(b"Subject: patient\r\n\r\nhi\r\n.\r\nQUIT\r\n").await;
        assert!(client.reply().await.starts_with("250 2.0.0 Ok: queued as "));
        assert_eq!(client.reply().await, "221 2.0.0 Bye\r\n");
        // A real client library waits for the greeting and is served too.
        let text = stdout(&python(&harness, SEND, &[]).await);
        assert!(text.contains("SENT"), "{text}");
        assert_eq!(harness.spool.len(), 2);
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_talker_is_only_logged_when_so_configured() {
    bounded(async {
        let harness = Harness::start(|c| {
            c.smtp.pregreet_delay = HumanDuration::seconds(1);
            c.smtp.pregreet_action = PregreetAction::Log;
        })
        .await;
        let mut early = Client::connect(&harness).await;
        early.send(b"EHLO early.test\r\n").await;
        assert!(early.reply().await.starts_with("220 mx.test"));
        // What it sent early is read as its first command.
        assert!(early.reply().await.starts_with("250-mx.test"));
        early.send(b"QUIT\r\n").await;
        assert_eq!(early.reply().await, "221 2.0.0 Bye\r\n");
        harness.stop().await.expect("serve");
    })
    .await
}

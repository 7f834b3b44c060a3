//! Bursts with the primary up (issue 12): 30 sessions at once, several times, with bodies large
//! enough that journal segments fill, rotate and are compacted while their mail is delivered, and
//! some recipients unknown at the primary so bounces are queued as well. Not one attempt may be
//! deferred with a local error (before the fix: `4.3.0 cannot read message body: .../N.wal: No such
//! file or directory`, then a wait for the next retry).

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use daemon::{Daemon, send_raw};
use fake_primary::{FakePrimary, Script};
use std::time::{Duration, Instant};

const BURSTS: usize = 4;
const SESSIONS: usize = 30;

#[tokio::test(flavor = "multi_thread")]
async fn bursts_with_the_primary_up_are_never_deferred_by_a_local_error() {
    let mut script = Script::default();
    script.rcpt_replies.insert("nobody@example.test".into(), "550 5.1.1 <nobody@example.test>: no such user".into());
    let primary = FakePrimary::start(script).await;
    let senders = FakePrimary::start(Script::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let routes = format!("[routes]\n\"example.test\" = \"{}\"\n\"sender.test\" = \"{}\"\n", primary.addr, senders.addr);
    let mut bartleby = Daemon::start(dir.path(), "", &routes);
    // Every session comes from 127.0.0.1: lift the per-client limits.
    let limits =
        "max_sessions_per_ip = 100\nmax_messages_per_ip_per_minute = 5000\nmax_recipients_per_ip_per_minute = 5000\n";
    bartleby.restart_with_smtp_settings(limits);
    // 200 KiB bodies: 120 messages fill more than one 16 MiB segment.
    let line = "y".repeat(98) + "\r\n";
    let body = format!("Subject: burst\r\n\r\n{}", line.repeat(2000)).into_bytes();
    let (mut expected, mut bounces) = (0, 0);
    for burst in 0..BURSTS {
        let mut sessions = Vec::new();
        for n in 0..SESSIONS {
            let unknown = n % 5 == 0;
            expected += 1;
            bounces += usize::from(unknown);
            let (smtp, body) = (bartleby.smtp, body.clone());
            sessions.push(tokio::task::spawn_blocking(move || {
                let rcpt = if unknown { "nobody@example.test".to_string() } else { format!("user{n}@example.test") };
                send_raw(smtp, &format!("alice{burst}x{n}@sender.test"), &[&rcpt], &body)
            }));
        }
        for session in sessions {
            let reply = session.await.expect("join").expect("session");
            assert!(reply.starts_with("250"), "{reply}");
        }
    }
    let delivered = expected - bounces;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (primary.messages().len() < delivered || senders.messages().len() < bounces) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = bartleby.log();
    let local: Vec<&str> =
        log.lines().filter(|l| l.contains("cannot read message body") || l.contains("4.3.0")).take(3).collect();
    assert!(local.is_empty(), "deferred by a local error: {local:?}");
    assert_eq!(primary.messages().len(), delivered, "every message with a known recipient arrived");
    assert_eq!(senders.messages().len(), bounces, "every bounce arrived");
    bartleby.stop();
}

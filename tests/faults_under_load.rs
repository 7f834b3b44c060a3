//! The primary's faults under load: while many clients send, the primary answers a mix of 250,
//! 451 (try again) and 552 (refused for good) after DATA. In the end every acknowledged message was
//! accepted by the primary or returned to its sender in a failure notice: nothing is lost. (Refused
//! connections, 421 greetings, drops after DATA, stalls and TLS failures are each in
//! `deliver_smtp.rs`; repeated crashes while delivering to a slow primary in `faults.rs`.)

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use daemon::{Daemon, send_raw};
use fake_primary::{FakePrimary, Script};
use std::collections::HashSet;
use std::time::{Duration, Instant};

// 100 messages from one address: within the default per-client limit of 120 a minute.
const CLIENTS: usize = 5;
const PER_CLIENT: usize = 20;

fn token(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let start = text.find("Message-ID: <load-")? + "Message-ID: <".len();
    Some(text[start..].split('@').next()?.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_lost_when_the_primary_misbehaves_under_load() {
    // A repeating pattern of final replies for the first messages, then 250 for the retries.
    let pattern = ["250 2.0.0 ok", "451 4.3.0 try later", "552 5.3.4 too big for this mailbox", "250 2.0.0 ok"];
    let final_replies = pattern.iter().cycle().take(CLIENTS * PER_CLIENT).map(|r| r.to_string()).collect();
    let primary = FakePrimary::start(Script { final_replies, ..Script::default() }).await;
    let senders = FakePrimary::start(Script::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "first_retry = \"1s\"\nretry_interval = \"2s\"\n\n[routes]\n\"example.test\" = \"{}\"\n\"sender.test\" = \"{}\"\n",
        primary.addr, senders.addr
    );
    let bartleby = Daemon::start(dir.path(), "", &extra);
    let smtp = bartleby.smtp;
    let senders_threads: Vec<_> = (0..CLIENTS)
        .map(|client| {
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for n in 0..PER_CLIENT {
                    let token = format!("load-{client}-{n}");
                    let data =
                        format!("Subject: {token}\r\nMessage-ID: <{token}@sender.test>\r\n\r\nbody of {token}\r\n");
                    if let Ok(reply) = send_raw(smtp, "alice@sender.test", &["bob@example.test"], data.as_bytes())
                        && reply.starts_with("250")
                    {
                        acked.push(token);
                    }
                }
                acked
            })
        })
        .collect();
    let acked: HashSet<String> = senders_threads.into_iter().flat_map(|t| t.join().expect("client")).collect();
    assert_eq!(acked.len(), CLIENTS * PER_CLIENT, "every message is accepted while the primary misbehaves");

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let accepted: HashSet<String> = primary
            .messages()
            .iter()
            .filter(|m| m.reply.as_deref().is_some_and(|r| r.starts_with('2')))
            .filter_map(|m| token(&m.body))
            .collect();
        let bounced: HashSet<String> = senders.messages().iter().filter_map(|m| token(&m.body)).collect();
        let settled: HashSet<String> = accepted.union(&bounced).cloned().collect();
        if acked.is_subset(&settled) && bartleby.queue().is_empty() {
            assert!(accepted.is_disjoint(&bounced), "a message was both delivered and bounced");
            let refused: usize =
                primary.messages().iter().filter(|m| m.reply.as_deref().is_some_and(|r| r.starts_with("552"))).count();
            assert_eq!(bounced.len(), refused, "one notice per message the primary refused for good");
            break;
        }
        let missing: Vec<&String> = acked.difference(&settled).take(5).collect();
        assert!(Instant::now() < deadline, "not settled: {missing:?}, queue {:?}", bartleby.queue());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

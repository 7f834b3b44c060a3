//! Notices end to end: the real daemon bounces a recipient the primary refuses, and sends a delay
//! notice and then a failure notice for mail the primary never takes; each reaches the sender's
//! domain (a second test server) and parses as multipart/report (RFC 3464).

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use daemon::{Daemon, free_port, send_raw};
use fake_primary::{FakePrimary, Received, Script};
use mail_parser::{MessageParser, MimeHeaders};
use std::time::{Duration, Instant};

async fn wait_for_messages(server: &FakePrimary, count: usize, limit: Duration) -> Vec<Received> {
    let deadline = Instant::now() + limit;
    loop {
        let messages = server.messages();
        if messages.len() >= count {
            return messages;
        }
        assert!(Instant::now() < deadline, "{} of {count} messages arrived in {limit:?}", messages.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks the notice's structure and returns its delivery-status part as text.
fn report(notice: &Received) -> String {
    assert!(
        notice.mail.starts_with("MAIL FROM:<> ") || notice.mail == "MAIL FROM:<>",
        "not from the null sender: {}",
        notice.mail
    );
    assert_eq!(notice.rcpts.len(), 1);
    assert!(notice.rcpts[0].starts_with("RCPT TO:<alice@sender.test>"), "{:?}", notice.rcpts);
    let message = MessageParser::default().parse(&notice.body).expect("the notice parses");
    let ct = message.content_type().expect("content type");
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let parts = message.root_part().sub_parts().expect("multipart");
    assert_eq!(parts.len(), 3, "explanation, status, original");
    let status = message.part(parts[1]).expect("status part");
    let sct = status.content_type().expect("status content type");
    assert_eq!((sct.ctype(), sct.subtype()), ("message", Some("delivery-status")));
    String::from_utf8_lossy(status.contents()).replace("\r\n ", " ")
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_recipient_is_bounced_to_the_senders_domain() {
    let mut script = Script::default();
    script.rcpt_replies.insert("nobody@example.test".into(), "550 5.1.1 <nobody@example.test>: no such user".into());
    let primary = FakePrimary::start(script).await;
    let senders = FakePrimary::start(Script::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let routes = format!("[routes]\n\"example.test\" = \"{}\"\n\"sender.test\" = \"{}\"\n", primary.addr, senders.addr);
    let bartleby = Daemon::start(dir.path(), "", &routes);
    let data = b"Subject: for two\r\nMessage-ID: <two@sender.test>\r\n\r\nhello\r\n";
    let smtp = bartleby.smtp;
    let reply = tokio::task::spawn_blocking(move || {
        send_raw(smtp, "alice@sender.test", &["nobody@example.test", "bob@example.test"], data)
    })
    .await
    .expect("join")
    .expect("send");
    assert!(reply.starts_with("250"), "{reply}");

    let delivered = wait_for_messages(&primary, 1, Duration::from_secs(20)).await;
    assert_eq!(delivered[0].rcpts, vec!["RCPT TO:<bob@example.test>".to_string()]);
    let notices = wait_for_messages(&senders, 1, Duration::from_secs(20)).await;
    let status = report(&notices[0]);
    for field in [
        "Reporting-MTA: dns; backup.example.test",
        "Final-Recipient: rfc822; nobody@example.test",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1",
    ] {
        assert!(status.contains(field), "missing {field:?} in:\n{status}");
    }
    assert!(!status.contains("bob@example.test"), "only the refused recipient is reported");
    let body = String::from_utf8_lossy(&notices[0].body);
    assert!(body.contains("Message-ID: <two@sender.test>"), "the original headers are returned");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bartleby.queue().is_empty() {
        assert!(Instant::now() < deadline, "queue not empty: {:?}", bartleby.queue());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn delay_notice_then_failure_notice_when_the_primary_never_answers() {
    let senders = FakePrimary::start(Script::default()).await;
    let closed = free_port("127.0.0.1");
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "retry_interval = \"2s\"\nfirst_retry = \"1s\"\nwarn_after = \"1s\"\nmax_lifetime = \"5s\"\n\n[routes]\n\"example.test\" = \"127.0.0.1:{closed}\"\n\"sender.test\" = \"{}\"\n",
        senders.addr
    );
    // `extra` continues the [queue] table the harness writes last.
    let bartleby = Daemon::start(dir.path(), "", &extra);
    let smtp = bartleby.smtp;
    let reply = tokio::task::spawn_blocking(move || {
        send_raw(smtp, "alice@sender.test", &["bob@example.test"], b"Subject: waits\r\n\r\nhello\r\n")
    })
    .await
    .expect("join")
    .expect("send");
    assert!(reply.starts_with("250"), "{reply}");

    let notices = wait_for_messages(&senders, 2, Duration::from_secs(30)).await;
    let delay = report(&notices[0]);
    assert!(delay.contains("Action: delayed"), "{delay}");
    assert!(delay.contains("Final-Recipient: rfc822; bob@example.test"), "{delay}");
    assert!(delay.contains("Will-Retry-Until:"), "{delay}");
    let failure = report(&notices[1]);
    assert!(failure.contains("Action: failed"), "{failure}");
    assert!(failure.contains("Status: 4.4.7"), "delivery time expired: {failure}");
    let explanation = String::from_utf8_lossy(&notices[1].body);
    assert!(explanation.contains(&format!("127.0.0.1:{closed}")), "the last error is explained: {explanation}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bartleby.queue().is_empty() {
        assert!(Instant::now() < deadline, "queue not empty");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(senders.messages().len(), 2, "one delay notice, one failure notice");
}

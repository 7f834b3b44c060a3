//! The SMTP server against real clients: swaks and Python's smtplib.

#[path = "support/smtp_harness.rs"]
mod smtp_harness;

use bartleby::spool::BodyType;
use bartleby::spool::Queue as _;
use smtp_harness::{Harness, python, stdout, strip_received, swaks};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Sends one message with smtplib: argv = port, sender, recipients (comma-separated),
/// MAIL options (comma-separated), message file. Prints what the server refused.
const SEND: &str = r#"
import smtplib, sys
port, sender, rcpts, opts, path = sys.argv[1:6]
msg = open(path, 'rb').read()
s = smtplib.SMTP('127.0.0.1', int(port), local_hostname='client.test', timeout=20)
try:
    refused = s.sendmail(sender, rcpts.split(','), msg, mail_options=[o for o in opts.split(',') if o])
    print('REFUSED', refused)
except smtplib.SMTPException as e:
    print('ERROR', repr(e))
s.quit()
"#;

/// Sends MAIL with a UTF-8 address but without SMTPUTF8, bypassing smtplib's own check.
const RAW_UTF8_MAIL: &str = r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='client.test', timeout=20)
s.ehlo()
s.sock.sendall('MAIL FROM:<j\u00f6rg@b.test>\r\n'.encode('utf-8'))
print(s.getreply())
s.quit()
"#;

async fn bounded<F: std::future::Future>(test: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(90), test).await.expect("test finished in time")
}

async fn send_file(harness: &Harness, sender: &str, rcpts: &str, opts: &str, message: &[u8]) -> String {
    let path = harness.dir.path().join("message.eml");
    std::fs::write(&path, message).expect("write message");
    let path = path.to_string_lossy().into_owned();
    stdout(&python(harness, SEND, &[sender, rcpts, opts, &path]).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_plain_session_is_queued() {
    bounded(async {
        let harness = Harness::start(|_| {}).await;
        let output = swaks(&harness, &["--from", "a@b.test", "--to", "x@example.test"]).await;
        let text = stdout(&output);
        assert!(output.status.success(), "{text}");
        assert!(text.contains("<-  220 mx.test ESMTP bartleby"), "{text}");
        assert!(text.contains("250 2.0.0 Ok: queued as "), "{text}");
        let (envelope, body) = harness.only_body();
        assert_eq!(envelope.sender, "a@b.test");
        assert_eq!(envelope.recipients[0].address, "x@example.test");
        assert_eq!(envelope.helo, "client.test");
        assert!(
            body.starts_with(b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test (bartleby) with ESMTP id ")
        );
        assert_eq!(harness.queued.load(Ordering::SeqCst), 1);
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_pipelined_session_is_queued() {
    bounded(async {
        let harness = Harness::start(|_| {}).await;
        let output = swaks(
            &harness,
            &["--pipeline", "--from", "a@b.test", "--to", "x@example.test,y@example.test,z@elsewhere.test"],
        )
        .await;
        let text = stdout(&output);
        assert!(text.contains("250-PIPELINING"), "{text}");
        assert!(text.contains("550 5.7.1 relaying denied"), "{text}");
        assert!(text.contains("250 2.0.0 Ok: queued as "), "{text}");
        let (envelope, _) = harness.only_body();
        let rcpts: Vec<_> = envelope.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(rcpts, ["x@example.test", "y@example.test"]);
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_round_trip_of_dot_lines_is_byte_exact() {
    bounded(async {
        let harness = Harness::start(|_| {}).await;
        let mut message = b"From: a@b.test\r\nTo: x@example.test\r\nSubject: dots\r\n\r\n".to_vec();
        for line in [".", "..", "...", ".hidden", "a.", " .", ".\t", "end"] {
            message.extend_from_slice(line.as_bytes());
            message.extend_from_slice(b"\r\n");
        }
        message.extend_from_slice(b".\r\n..\r\n");
        let text = send_file(&harness, "a@b.test", "x@example.test", "", &message).await;
        assert!(text.contains("REFUSED {}"), "{text}");
        let (envelope, body) = harness.only_body();
        assert_eq!(strip_received(&body), &message[..]);
        assert_eq!(envelope.size, body.len() as u64);
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limit_is_enforced_at_mail_and_after_data() {
    bounded(async {
        let harness = Harness::start(|c| c.smtp.max_message_size = 1000).await;
        let message = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(70)).repeat(30);
        // smtplib declares SIZE= at MAIL (RFC 1870): refused there.
        let text = send_file(&harness, "a@b.test", "x@example.test", "", message.as_bytes()).await;
        assert!(text.contains("SMTPSenderRefused(552"), "{text}");
        assert!(text.contains("5.3.4 message size exceeds fixed limit of 1000 octets"), "{text}");
        // swaks does not: refused after the data, which is read to its end.
        let output = swaks(&harness, &["--from", "a@b.test", "--to", "x@example.test", "--body", &message]).await;
        let text = stdout(&output);
        assert!(text.contains("<** 552 5.3.4 message size exceeds fixed limit"), "{text}");
        assert!(text.contains("221 2.0.0 Bye"), "{text}");
        assert!(harness.spool.is_empty());
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_is_denied() {
    bounded(async {
        let harness = Harness::start(|_| {}).await;
        let output = swaks(&harness, &["--from", "a@b.test", "--to", "victim@elsewhere.test"]).await;
        let text = stdout(&output);
        assert!(!output.status.success());
        assert!(text.contains("<** 550 5.7.1 relaying denied"), "{text}");
        let text =
            send_file(&harness, "a@b.test", "v@elsewhere.test,w@Example.Test.", "", b"Subject: x\r\n\r\nx\r\n").await;
        assert!(text.contains("REFUSED {'v@elsewhere.test': (550, b'5.7.1 relaying denied')}"), "{text}");
        let (envelope, _) = harness.only_body();
        assert_eq!(envelope.recipients.len(), 1);
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_recipients_get_452() {
    bounded(async {
        let harness = Harness::start(|c| c.smtp.max_recipients = 2).await;
        let rcpts = "a@example.test,b@example.test,c@example.test";
        let text = send_file(&harness, "s@b.test", rcpts, "", b"Subject: x\r\n\r\nx\r\n").await;
        assert!(text.contains("REFUSED {'c@example.test': (452, b'4.5.3 too many recipients')}"), "{text}");
        let (envelope, _) = harness.only_body();
        assert_eq!(envelope.recipients.len(), 2);
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_message_is_stored_verbatim() {
    bounded(async {
        let harness = Harness::start(|_| {}).await;
        let message = b"Subject: =?utf-8?q?x?=\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\
            Content-Transfer-Encoding: 8bit\r\n\r\nGr\xfc\xdfe, caf\xe9\r\n\xff\xfe\x80\r\n";
        let text = send_file(&harness, "a@b.test", "x@example.test", "BODY=8BITMIME", message).await;
        assert!(text.contains("REFUSED {}"), "{text}");
        let (envelope, body) = harness.only_body();
        assert_eq!(envelope.body, BodyType::EightBitMime);
        assert_eq!(strip_received(&body), &message[..]);
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_message_with_non_ascii_addresses() {
    bounded(async {
        let harness = Harness::start(|_| {}).await;
        let message = "From: J\u{f6}rg <j\u{f6}rg@b.test>\r\nTo: \u{e9}l\u{e8}ve@example.test\r\nSubject: \u{2713} d\u{e9}j\u{e0} vu\r\n\r\nHall\u{f6}\r\n";
        let text =
            send_file(&harness, "j\u{f6}rg@b.test", "\u{e9}l\u{e8}ve@example.test", "SMTPUTF8", message.as_bytes())
                .await;
        assert!(text.contains("REFUSED {}"), "{text}");
        let (envelope, body) = harness.only_body();
        assert!(envelope.smtputf8);
        assert_eq!(envelope.sender, "j\u{f6}rg@b.test");
        assert_eq!(envelope.recipients[0].address, "\u{e9}l\u{e8}ve@example.test");
        assert_eq!(strip_received(&body), message.as_bytes());
        // Without SMTPUTF8 the same address is refused (RFC 6531 3.5); smtplib itself will not send
        // it, so the command goes out as raw UTF-8.
        let text = stdout(&python(&harness, RAW_UTF8_MAIL, &[]).await);
        assert!(text.contains("(553, b'5.6.7 a non-ASCII sender address needs SMTPUTF8')"), "{text}");
        assert_eq!(harness.spool.len(), 1);
        harness.stop().await.expect("serve");
    })
    .await
}

//! DSN tests: every notice is parsed back with mail-parser and checked field by field.

use super::*;
use crate::spool::envelope::{RecipientStatus, to_micros};
use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders};
use std::time::Duration;

const HOST: &str = "backup.example.test";

const ORIGINAL: &[u8] = b"Received: from client.sender.test ([127.0.0.4]) by backup.example.test\r\n\
\twith ESMTP id 0123456789abc000; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
From: Alice <alice@sender.test>\r\n\
To: bob@example.test\r\n\
Subject: quarterly report\r\n\
Message-ID: <orig-1@sender.test>\r\n\
\r\n\
Dear Bob,\r\n\
the numbers are in.\r\n";

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_704_153_600)
}

fn envelope(sender: &str, rcpts: &[&str]) -> Envelope {
    let recipients = rcpts.iter().map(|r| Recipient::new(r.to_string())).collect();
    let mut env = Envelope::new("0123456789abc000".into(), sender.into(), recipients);
    env.helo = "client.sender.test".into();
    env.client_ip = Some("127.0.0.4".parse().unwrap());
    env.arrived = to_micros(now() - Duration::from_secs(5 * 86_400));
    env
}

fn failed(address: &str) -> ReportedRecipient {
    ReportedRecipient {
        address: address.into(),
        orcpt: None,
        status: "5.1.1".into(),
        diagnostic: Some("550 5.1.1 <bob@example.test>: Recipient address rejected".into()),
        remote_mta: Some("primary.example.test".into()),
        text: "RCPT TO: 550 5.1.1 <bob@example.test>: Recipient address rejected".into(),
        last_attempt: Some(now() - Duration::from_secs(60)),
    }
}

fn build_failure(env: &Envelope, rcpts: &[ReportedRecipient]) -> Vec<u8> {
    build(HOST, env, DsnKind::Failure, rcpts, ORIGINAL, now(), None)
}

fn parse(raw: &[u8]) -> Message<'_> {
    MessageParser::default().parse(raw).expect("the notice parses")
}

/// The three parts of the multipart/report, checking the top-level structure on the way.
fn report_parts<'a>(msg: &'a Message<'a>, report_type: &str) -> Vec<&'a MessagePart<'a>> {
    let ct = msg.content_type().expect("content type");
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    assert_eq!(ct.attribute("report-type"), Some(report_type));
    let ids = msg.root_part().sub_parts().expect("multipart");
    assert_eq!(ids.len(), 3, "text, report, original");
    ids.iter().map(|id| msg.part(*id).expect("part")).collect()
}

fn ctype(part: &MessagePart<'_>) -> String {
    let ct = part.content_type().expect("part content type");
    format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
}

/// The RFC 3464 field groups (per-message first, then one per recipient), unfolded, as
/// lower-cased name and value pairs.
fn status_groups(part: &MessagePart<'_>) -> Vec<Vec<(String, String)>> {
    let text = String::from_utf8(part.contents().to_vec()).expect("utf-8 report");
    let text = text.replace("\r\n ", " ");
    text.split("\r\n\r\n")
        .filter(|g| !g.trim().is_empty())
        .map(|g| {
            g.lines()
                .map(|l| {
                    let (n, v) = l.split_once(':').expect("name: value");
                    (n.to_ascii_lowercase(), v.trim().to_string())
                })
                .collect()
        })
        .collect()
}

fn get<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
    group.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

#[test]
fn failure_notice_has_report_structure_and_fields() {
    let env = envelope("alice@sender.test", &["bob@example.test"]);
    let raw = build_failure(&env, &[failed("bob@example.test")]);
    let msg = parse(&raw);
    assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
    assert_eq!(msg.from().and_then(|a| a.first()).and_then(|a| a.address()), Some("MAILER-DAEMON@backup.example.test"));
    assert_eq!(msg.to().and_then(|a| a.first()).and_then(|a| a.address()), Some("alice@sender.test"));
    assert_eq!(msg.header_raw("Auto-Submitted").map(str::trim), Some("auto-replied"));
    assert_eq!(msg.header_raw("MIME-Version").map(str::trim), Some("1.0"));
    assert!(msg.message_id().is_some_and(|id| id.ends_with("@backup.example.test")));
    assert!(msg.date().is_some());

    let parts = report_parts(&msg, "delivery-status");
    assert_eq!(ctype(parts[0]), "text/plain");
    let text = parts[0].text_contents().unwrap_or("");
    assert!(text.contains("<bob@example.test>: RCPT TO: 550 5.1.1"), "{text}");
    assert!(text.contains("could not be delivered"));

    assert_eq!(ctype(parts[1]), "message/delivery-status");
    let groups = status_groups(parts[1]);
    assert_eq!(groups.len(), 2);
    assert_eq!(get(&groups[0], "reporting-mta"), Some("dns; backup.example.test"));
    assert_eq!(get(&groups[0], "received-from-mta"), Some("dns; client.sender.test ([127.0.0.4])"));
    assert!(get(&groups[0], "arrival-date").is_some_and(|d| d.contains("28 Dec 2023 00:00:00")));
    assert_eq!(get(&groups[0], "original-envelope-id"), None);
    let r = &groups[1];
    assert_eq!(get(r, "final-recipient"), Some("rfc822; bob@example.test"));
    assert_eq!(get(r, "action"), Some("failed"));
    assert_eq!(get(r, "status"), Some("5.1.1"));
    assert_eq!(get(r, "remote-mta"), Some("dns; primary.example.test"));
    assert_eq!(get(r, "diagnostic-code"), Some("smtp; 550 5.1.1 <bob@example.test>: Recipient address rejected"));
    assert!(get(r, "last-attempt-date").is_some());
    assert_eq!(get(r, "will-retry-until"), None);
    assert_eq!(get(r, "original-recipient"), None);

    // Default RET: the header section only, without the body.
    assert_eq!(ctype(parts[2]), "text/rfc822-headers");
    let headers = parts[2].contents();
    assert!(headers.starts_with(b"Received: from client.sender.test"));
    assert!(std::str::from_utf8(headers).unwrap().contains("Subject: quarterly report\r\n"));
    assert!(!std::str::from_utf8(headers).unwrap().contains("Dear Bob"));
}

#[test]
fn delay_notice_says_when_retries_stop_and_returns_headers_only() {
    let mut env = envelope("alice@sender.test", &["bob@example.test", "carol@example.test"]);
    env.ret = Some(DsnRet::Full);
    env.envid = Some("QQ314159".into());
    let until = now() + Duration::from_secs(86_400);
    let mut bob = ReportedRecipient::from_recipient(&env.recipients[0], DsnKind::Delay);
    bob.remote_mta = None;
    let mut carol = failed("carol@example.test");
    carol.status = "4.2.2".into();
    carol.diagnostic = Some("452 4.2.2 mailbox full".into());
    let raw = build(HOST, &env, DsnKind::Delay, &[bob, carol], ORIGINAL, now(), Some(until));
    let lines = String::from_utf8(raw.clone()).unwrap();
    assert!(lines.split("\r\n").all(|l| l.len() <= 78), "short lines throughout");
    let msg = parse(&raw);
    assert_eq!(msg.subject(), Some("Delayed Mail (still being retried)"));
    let parts = report_parts(&msg, "delivery-status");
    let text = parts[0].text_contents().unwrap_or("");
    assert!(text.contains("WARNING ONLY"));
    assert!(text.contains(&format!("keep trying until {}", rfc5322_date(until))), "{text}");

    let groups = status_groups(parts[1]);
    assert_eq!(groups.len(), 3);
    assert_eq!(get(&groups[0], "original-envelope-id"), Some("QQ314159"));
    for g in &groups[1..] {
        assert_eq!(get(g, "action"), Some("delayed"));
        assert_eq!(get(g, "will-retry-until"), Some(rfc5322_date(until).as_str()));
    }
    assert_eq!(get(&groups[1], "status"), Some("4.0.0"));
    assert_eq!(get(&groups[1], "diagnostic-code"), None);
    assert_eq!(get(&groups[1], "remote-mta"), None);
    assert_eq!(get(&groups[2], "status"), Some("4.2.2"));
    assert_eq!(get(&groups[2], "diagnostic-code"), Some("smtp; 452 4.2.2 mailbox full"));

    // RET=FULL does not apply to delay notices.
    assert_eq!(ctype(parts[2]), "text/rfc822-headers");
    assert!(!String::from_utf8_lossy(parts[2].contents()).contains("Dear Bob"));
}

#[test]
fn ret_full_returns_the_whole_message() {
    let mut env = envelope("alice@sender.test", &["bob@example.test"]);
    env.ret = Some(DsnRet::Full);
    let raw = build_failure(&env, &[failed("bob@example.test")]);
    let msg = parse(&raw);
    let parts = report_parts(&msg, "delivery-status");
    assert_eq!(ctype(parts[2]), "message/rfc822");
    let inner = parts[2].message().expect("nested message");
    assert_eq!(inner.raw_message(), ORIGINAL, "returned byte for byte");
    assert_eq!(inner.subject(), Some("quarterly report"));
    assert!(inner.body_text(0).is_some_and(|b| b.contains("the numbers are in")));
    assert!(parts[0].text_contents().unwrap_or("").contains("It is attached below"));
}

#[test]
fn requiretls_messages_return_headers_only_even_with_ret_full() {
    // RFC 8689 5: the notice may travel without TLS, so the content stays behind.
    let mut env = envelope("alice@sender.test", &["bob@example.test"]);
    env.ret = Some(DsnRet::Full);
    env.requiretls = true;
    let raw = build_failure(&env, &[failed("bob@example.test")]);
    let msg = parse(&raw);
    assert_eq!(ctype(report_parts(&msg, "delivery-status")[2]), "text/rfc822-headers");
    assert!(!String::from_utf8_lossy(&raw).contains("the numbers are in"));
}

#[test]
fn ret_hdrs_and_headers_only_input_return_headers() {
    let mut env = envelope("alice@sender.test", &["bob@example.test"]);
    env.ret = Some(DsnRet::Hdrs);
    let raw = build_failure(&env, &[failed("bob@example.test")]);
    let msg = parse(&raw);
    assert_eq!(ctype(report_parts(&msg, "delivery-status")[2]), "text/rfc822-headers");

    // RET=FULL but the caller only had the header section (Spool::read_headers).
    env.ret = Some(DsnRet::Full);
    let end = ORIGINAL.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
    let raw = build(HOST, &env, DsnKind::Failure, &[failed("bob@example.test")], &ORIGINAL[..end], now(), None);
    let msg = parse(&raw);
    let parts = report_parts(&msg, "delivery-status");
    assert_eq!(ctype(parts[2]), "text/rfc822-headers");
    assert_eq!(parts[2].contents(), &ORIGINAL[..end]);

    // BINARYMIME bodies cannot be carried in an 8bit part.
    env.body = BodyType::BinaryMime;
    let raw = build_failure(&env, &[failed("bob@example.test")]);
    assert_eq!(ctype(report_parts(&parse(&raw), "delivery-status")[2]), "text/rfc822-headers");
}

#[test]
fn notify_decides_who_is_reported() {
    let mut env = envelope("alice@sender.test", &["none@x.test", "never@x.test", "success@x.test", "fd@x.test"]);
    env.recipients[1].notify = Some(vec![DsnNotify::Never]);
    env.recipients[2].notify = Some(vec![DsnNotify::Success]);
    env.recipients[3].notify = Some(vec![DsnNotify::Failure]);
    let names =
        |kind| -> Vec<String> { reported(&env, kind, &env.recipients).iter().map(|r| r.address.clone()).collect() };
    assert_eq!(names(DsnKind::Failure), ["none@x.test", "fd@x.test"]);
    assert_eq!(names(DsnKind::Delay), ["none@x.test"]);
    assert!(wanted(&env, DsnKind::Failure));
    assert!(wanted(&env, DsnKind::Delay));

    // Only NEVER and SUCCESS left: no notice at all.
    env.recipients.retain(|r| r.notify.is_some() && r.address != "fd@x.test");
    assert!(!wanted(&env, DsnKind::Failure));
    assert!(!wanted(&env, DsnKind::Delay));
}

#[test]
fn delay_notice_only_once_and_recipient_status_counts() {
    let mut env = envelope("alice@sender.test", &["bob@example.test"]);
    assert!(wanted(&env, DsnKind::Delay));
    env.delay_notified = true;
    assert!(!wanted(&env, DsnKind::Delay));
    env.delay_notified = false;
    env.recipients[0].status = RecipientStatus::Failed;
    assert!(!wanted(&env, DsnKind::Delay), "failed recipients are not delayed");
    assert!(wanted(&env, DsnKind::Failure), "already marked failed still reports the failure");
    env.recipients[0].status = RecipientStatus::Delivered;
    assert!(!wanted(&env, DsnKind::Delay));
    assert!(!wanted(&env, DsnKind::Failure));
}

#[test]
fn null_sender_and_generated_messages_get_no_notice() {
    let env = envelope("", &["bob@example.test"]);
    assert!(!wanted(&env, DsnKind::Failure));
    assert!(!wanted(&env, DsnKind::Delay));
    assert!(reported(&env, DsnKind::Failure, &env.recipients).is_empty());

    let mut env = envelope("alice@sender.test", &["bob@example.test"]);
    env.generated = true;
    assert!(!wanted(&env, DsnKind::Failure));
    assert!(reported(&env, DsnKind::Failure, &env.recipients).is_empty());
}

#[test]
fn crlf_in_remote_text_cannot_add_fields_or_parts() {
    let env = envelope("alice@sender.test", &["bob@example.test"]);
    let mut r = failed("bob@example.test");
    let evil = "550 5.1.1 no\r\nBcc: victim@evil.test\r\n\r\n--=_bartleby_x\r\nX-Injected: yes\nY-Injected: yes\rZ: z";
    r.diagnostic = Some(evil.into());
    r.text = evil.into();
    r.remote_mta = Some("mx.evil.test\r\nX-Injected: yes".into());
    let mut env2 = env.clone();
    env2.helo = "helo\r\nX-Injected: yes".into();
    let raw = build_failure(&env2, &[r]);
    let text = String::from_utf8(raw.clone()).unwrap();
    for line in text.split("\r\n") {
        assert!(!line.contains('\r') && !line.contains('\n'), "bare CR or LF in {line:?}");
        for bad in ["Bcc:", "X-Injected:", "Y-Injected:", "Z:"] {
            assert!(!line.starts_with(bad), "injected line {line:?}");
        }
    }
    let msg = parse(&raw);
    assert!(msg.header_raw("Bcc").is_none());
    let parts = report_parts(&msg, "delivery-status");
    let groups = status_groups(parts[1]);
    assert_eq!(groups.len(), 2, "no extra recipient group");
    let diag = get(&groups[1], "diagnostic-code").unwrap();
    assert!(diag.starts_with("smtp; 550 5.1.1 no Bcc: victim@evil.test --=_bartleby_x X-Injected"), "{diag}");
}

#[test]
fn no_line_exceeds_998_octets_and_fields_fold() {
    let env = envelope("alice@sender.test", &["bob@example.test"]);
    let mut r = failed("bob@example.test");
    r.diagnostic = Some(format!("550 5.7.1 {}", "x".repeat(5000)));
    r.text = format!("RCPT TO: 550 5.7.1 {}", "blah ".repeat(1000));
    let mut r2 = failed("carol@example.test");
    r2.diagnostic = Some(format!("550 5.7.1 {}", "word ".repeat(1000)));
    let raw = build_failure(&env, &[r, r2]);
    let text = String::from_utf8(raw.clone()).unwrap();
    for line in text.split("\r\n") {
        assert!(line.len() <= 998, "line of {} octets", line.len());
    }
    // Spaced text folds to the recommended 78 octets.
    let long = text.split("\r\n").filter(|l| l.len() > 78).count();
    assert_eq!(long, 1, "only the unbreakable 'xxx...' word may exceed 78 octets");
    let groups = status_groups(report_parts(&parse(&raw), "delivery-status")[1]);
    assert!(get(&groups[2], "diagnostic-code").unwrap().starts_with("smtp; 550 5.7.1 word word"));
}

#[test]
fn orcpt_becomes_original_recipient_decoded() {
    let env = envelope("alice@sender.test", &["bob@example.test"]);
    let mut r = failed("bob@example.test");
    r.orcpt = Some("rfc822;Bob+2BSales@Example.test".into());
    let mut broken = failed("carol@example.test");
    broken.orcpt = Some("no-semicolon".into());
    let raw = build_failure(&env, &[r, broken]);
    let groups = status_groups(report_parts(&parse(&raw), "delivery-status")[1]);
    assert_eq!(get(&groups[1], "original-recipient"), Some("rfc822; Bob+Sales@Example.test"));
    assert_eq!(get(&groups[2], "original-recipient"), None);
}

#[test]
fn smtputf8_uses_global_types() {
    let mut env = envelope("jösé@sender.test", &["bob@example.test"]);
    env.smtputf8 = true;
    env.ret = Some(DsnRet::Full);
    let mut r = failed("zoë@example.test");
    r.text = "RCPT TO: 550 5.1.1 unknown zoë".into();
    let raw = build_failure(&env, &[r]);
    let msg = parse(&raw);
    assert_eq!(msg.to().and_then(|a| a.first()).and_then(|a| a.address()), Some("jösé@sender.test"));
    let parts = report_parts(&msg, "global-delivery-status");
    assert_eq!(ctype(parts[1]), "message/global-delivery-status");
    assert_eq!(ctype(parts[2]), "message/global");
    let groups = status_groups(parts[1]);
    assert_eq!(get(&groups[1], "final-recipient"), Some("utf-8; zoë@example.test"));
    assert!(parts[0].text_contents().unwrap_or("").contains("zoë"));

    let notice = notice_envelope("0123456789abd000".into(), &env, &raw);
    assert!(notice.smtputf8);
    assert_eq!(notice.body, BodyType::EightBitMime);

    // Headers-only variant.
    env.ret = None;
    let raw = build_failure(&env, &[failed("bob@example.test")]);
    assert_eq!(ctype(report_parts(&parse(&raw), "global-delivery-status")[2]), "message/global-headers");
}

#[test]
fn non_ascii_remote_text_is_replaced_in_ascii_notices() {
    let env = envelope("alice@sender.test", &["bob@example.test"]);
    let mut r = failed("bob@example.test");
    r.diagnostic = Some("550 5.1.1 nüt".into());
    let raw = build_failure(&env, &[r]);
    let msg = parse(&raw);
    let groups = status_groups(report_parts(&msg, "delivery-status")[1]);
    assert_eq!(get(&groups[1], "diagnostic-code"), Some("smtp; 550 5.1.1 n?t"));
}

#[test]
fn boundary_is_unique_and_lines_are_crlf() {
    let env = envelope("alice@sender.test", &["bob@example.test"]);
    let original = b"Subject: bare\nX: y\r\n\r\nbody with bare LF\nand CR\rend";
    let raw = build(HOST, &env, DsnKind::Failure, &[failed("bob@example.test")], original, now(), None);
    let text = String::from_utf8(raw.clone()).unwrap();
    assert!(!text.replace("\r\n", "").contains(['\r', '\n']));
    let msg = parse(&raw);
    let boundary = msg.content_type().and_then(|c| c.attribute("boundary")).unwrap().to_string();
    assert!(boundary.starts_with("=_bartleby_"));
    assert_eq!(text.matches(&format!("--{boundary}")).count(), 4, "three parts and the close");
    let other = build(HOST, &env, DsnKind::Failure, &[failed("bob@example.test")], original, now(), None);
    assert_ne!(parse(&other).message_id(), msg.message_id(), "Message-ID is unique");
}

#[test]
fn status_and_diagnostic_come_from_the_last_reply() {
    let mut rcpt = Recipient::new("bob@example.test".into());
    rcpt.last_error = Some("RCPT TO: 550 5.1.1 <bob@example.test>: no such user".into());
    rcpt.remote_mta = Some("primary.example.test".into());
    let r = ReportedRecipient::from_recipient(&rcpt, DsnKind::Failure);
    assert_eq!(r.status, "5.1.1");
    assert_eq!(r.diagnostic.as_deref(), Some("550 5.1.1 <bob@example.test>: no such user"));
    assert_eq!(r.remote_mta.as_deref(), Some("primary.example.test"));

    rcpt.last_error = Some("DATA: 451 try again later".into());
    let r = ReportedRecipient::from_recipient(&rcpt, DsnKind::Failure);
    assert_eq!((r.status.as_str(), r.diagnostic.as_deref()), ("4.0.0", Some("451 try again later")));

    rcpt.last_error = Some("MAIL FROM: 550 4.1.1 mismatched class".into());
    assert_eq!(ReportedRecipient::from_recipient(&rcpt, DsnKind::Failure).status, "5.0.0");

    rcpt.last_error = Some("connect to 127.0.0.2:25: timeout after 450 seconds".into());
    let r = ReportedRecipient::from_recipient(&rcpt, DsnKind::Failure);
    assert_eq!((r.status.as_str(), r.diagnostic), ("4.4.7", None));
    assert_eq!(ReportedRecipient::from_recipient(&rcpt, DsnKind::Delay).status, "4.0.0");

    rcpt.last_error = None;
    let r = ReportedRecipient::from_recipient(&rcpt, DsnKind::Failure);
    assert_eq!(r.text, "delivery time expired");
}

#[test]
fn notice_envelope_goes_from_null_sender_to_the_sender() {
    let env = envelope("alice@sender.test", &["bob@example.test"]);
    let raw = build_failure(&env, &[failed("bob@example.test")]);
    let notice = notice_envelope("0123456789abd000".into(), &env, &raw);
    assert_eq!(notice.sender, "");
    assert_eq!(notice.recipients.len(), 1);
    assert_eq!(notice.recipients[0].address, "alice@sender.test");
    assert!(notice.generated);
    assert!(!notice.smtputf8);
    assert_eq!(notice.body, BodyType::SevenBit);
    assert!(!wanted(&notice, DsnKind::Failure), "a notice is never bounced");
}

//! Interoperability with a real primary: Postfix (Debian's package, its own config directory) on
//! 127.0.0.2:25 delivering to a Maildir; dnsmasq on 127.0.0.53 says `example.test MX 10 primary`
//! and `MX 20 backup`; bartleby listens on 127.0.0.3:25. Mail sent with swaks while Postfix is
//! stopped is queued; after Postfix starts and `bartleby queue flush` runs, every message is in
//! Postfix's Maildir, in arrival order, byte-identical below the Received headers.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/peers.rs"]
mod peers;

use daemon::Daemon;
use peers::{DnsRecord, Dnsmasq, PeersLock, Postfix};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

const PRIMARY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 25);
const BACKUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 3), 25);
const DNS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

fn zone() -> Vec<DnsRecord> {
    vec![
        DnsRecord::mx("example.test", "primary.example.test", 10),
        DnsRecord::mx("example.test", "backup.example.test", 20),
        DnsRecord::a("primary.example.test", Ipv4Addr::new(127, 0, 0, 2)),
        DnsRecord::a("backup.example.test", Ipv4Addr::new(127, 0, 0, 3)),
    ]
}

fn bartleby_config(spool: &std::path::Path) -> String {
    format!(
        r#"hostname = "backup.example.test"

[smtp]
listen = ["{BACKUP}"]

[relay]
domains = ["example.test"]

[dns]
nameservers = ["{DNS}:53"]

[queue]
dir = "{}"
min_free = 0

[domain."example.test"]
strict_order = true
"#,
        spool.display()
    )
}

/// Message data as a client sends it (CRLF, unstuffed), with dot-leading lines; it carries a Date
/// header so that Postfix adds none.
fn message(n: usize) -> Vec<u8> {
    let mut text = format!(
        "From: Sender <sender@sender.test>\r\nTo: Alice <alice@example.test>\r\nSubject: order test {n}\r\nMessage-ID: <order-{n}@sender.test>\r\nDate: Sun, 29 Nov 2026 10:00:0{n} +0000\r\n\r\n"
    );
    for line in 0..20 {
        text += &format!("line {line} of message {n}\r\n.{line} leading dot\r\n");
    }
    text.into_bytes()
}

#[test]
fn mail_queued_while_postfix_is_down_reaches_its_maildir_in_arrival_order() {
    let _lock = PeersLock::acquire().expect("peers lock");
    let _dns = Dnsmasq::start(DNS, &zone()).expect("dnsmasq on 127.0.0.53");
    let mut postfix = Postfix::start(PRIMARY, "example.test", &["alice"]).expect("postfix on 127.0.0.2:25");
    postfix.stop().expect("stop postfix: the primary is down");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut bartleby = Daemon::start_with(dir.path(), &bartleby_config(&dir.path().join("spool")), BACKUP.into());
    let mut sent = Vec::new();
    for n in 0..6 {
        let data = message(n);
        let file = dir.path().join(format!("message-{n}.eml"));
        // swaks ends DATA with CRLF . CRLF after the file's content, so the file leaves off the last CRLF.
        std::fs::write(&file, &data[..data.len() - 2]).expect("write message");
        let at = format!("@{}", file.display());
        let out = peers::swaks(BACKUP, "sender@sender.test", "alice@example.test", &["--data", &at])
            .expect("swaks to bartleby");
        assert!(out.contains("<-  250 2.0.0"), "not queued:\n{out}");
        sent.push(data);
    }

    // Every message waits; the oldest carries the primary's refusal (with strict_order the newer
    // ones wait behind it rather than each being tried on its own).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let queue = bartleby.queue();
        if queue.len() == 6 && queue[0]["last_error"].is_string() {
            let error = queue[0]["last_error"].as_str().unwrap_or_default();
            assert!(error.contains("127.0.0.2"), "error names the primary: {error}");
            break;
        }
        assert!(Instant::now() < deadline, "messages not deferred: {queue:?}\n{}", bartleby.log());
        std::thread::sleep(Duration::from_millis(200));
    }

    postfix.resume().expect("postfix back up");
    let out = bartleby.cli(&["queue", "flush"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("scheduled"), "{out:?}");

    let delivered = postfix
        .wait_for_messages("alice", 6, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\nbartleby log:\n{}", bartleby.log()));
    assert_eq!(delivered.len(), 6);
    // Postfix's cleanup logs each message-id as its smtpd receives the message: that is the order
    // the primary received them in (its Maildir delivery may run in parallel).
    let log = postfix.maillog();
    let received: Vec<usize> = log
        .lines()
        .filter_map(|line| line.split("message-id=<order-").nth(1)?.split('@').next()?.parse().ok())
        .collect();
    assert_eq!(received, (0..6).collect::<Vec<_>>(), "the primary received the mail in arrival order:\n{log}");
    for (n, data) in sent.iter().enumerate() {
        // Maildir files hold LF line endings (Postfix's local convention); everything else is as sent.
        let data = String::from_utf8_lossy(data).replace("\r\n", "\n").into_bytes();
        let got = delivered
            .iter()
            .find(|m| String::from_utf8_lossy(m).contains(&format!("Message-ID: <order-{n}@sender.test>")))
            .unwrap_or_else(|| panic!("message {n} missing"));
        assert!(
            got.ends_with(&data),
            "message {n} differs below the Received headers:\n{}",
            String::from_utf8_lossy(got)
        );
        let head = String::from_utf8_lossy(&got[..got.len() - data.len()]);
        assert!(head.contains("by backup.example.test (bartleby)"), "our Received header is kept: {head}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bartleby.queue().is_empty() {
        assert!(Instant::now() < deadline, "queue not empty after delivery");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(bartleby.stop().success());
}

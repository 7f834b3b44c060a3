//! Against a real primary: Postfix (Debian's, on 127.0.0.2:25) announces CHUNKING but not
//! BINARYMIME. bartleby, delivering from `delivery.source_address = 127.0.0.9` by a static route,
//! hands it a message with BDAT (Postfix's disconnect line counts `bdat=1`, and its connect line
//! names 127.0.0.9) that lands in the Maildir intact; a BINARYMIME message, which Postfix cannot
//! take, fails permanently with 5.6.3 and is never offered.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/peers.rs"]
mod peers;

use daemon::{Daemon, send_raw};
use peers::{PeersLock, Postfix};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

const PRIMARY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 25);

/// Sends one BODY=BINARYMIME message with a single `BDAT n LAST`; returns the last reply.
fn send_binary(addr: SocketAddr, message: &[u8]) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut wire =
        b"EHLO client.test\r\nMAIL FROM:<a@sender.test> BODY=BINARYMIME\r\nRCPT TO:<alice@example.test>\r\n".to_vec();
    wire.extend_from_slice(format!("BDAT {} LAST\r\n", message.len()).as_bytes());
    wire.extend_from_slice(message);
    writer.write_all(&wire)?;
    let mut last = String::new();
    // The greeting, then EHLO, MAIL, RCPT and BDAT.
    for _ in 0..5 {
        loop {
            last.clear();
            reader.read_line(&mut last)?;
            if last.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
    }
    Ok(last)
}

#[test]
fn postfix_takes_bdat_from_the_source_address_and_binarymime_fails_with_5_6_3() {
    let _lock = PeersLock::acquire().expect("peers lock");
    let postfix = Postfix::start(PRIMARY, "example.test", &["alice"]).expect("postfix on 127.0.0.2:25");
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!("\n[routes]\n\"example.test\" = \"{PRIMARY}\"\n\n[delivery]\nsource_address = \"127.0.0.9\"\n");
    let bartleby = Daemon::start(dir.path(), "", &extra);

    let text = "From: a@sender.test\r\nTo: alice@example.test\r\nSubject: chunked\r\nMessage-ID: <bdat-1@sender.test>\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\n.a leading dot\r\nend\r\n";
    let reply = send_raw(bartleby.smtp, "a@sender.test", &["alice@example.test"], text.as_bytes()).expect("send");
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    let delivered = postfix
        .wait_for_messages("alice", 1, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\nbartleby log:\n{}", bartleby.log()));
    // Maildir files hold LF line endings; below our Received header the message is as sent.
    let got = String::from_utf8_lossy(&delivered[0]).into_owned();
    assert!(got.ends_with(&text.replace("\r\n", "\n")), "{got}");
    assert!(got.contains("by backup.example.test (bartleby) with ESMTP id"), "{got}");
    let mut binary = b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: binary\r\nSubject: binary\r\n\r\n".to_vec();
    binary.extend((0..2048u32).map(|i| (i * 13 % 256) as u8));
    let reply = send_binary(bartleby.smtp, &binary).expect("send binary");
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    bartleby.wait_for_log("5.6.3", Duration::from_secs(30));
    let log = bartleby.log();
    assert!(log.contains("does not offer BINARYMIME with CHUNKING"), "{log}");
    // The delivery's connection is kept for reuse; stopping bartleby closes it with QUIT, and
    // then Postfix logs the session's command counts.
    let mut bartleby = bartleby;
    assert!(bartleby.stop().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let sessions = loop {
        let log = postfix.maillog();
        let sessions: Vec<String> =
            log.lines().filter(|l| l.contains("disconnect from") && l.contains(" mail=")).map(str::to_string).collect();
        if !sessions.is_empty() {
            break sessions;
        }
        assert!(Instant::now() < deadline, "no disconnect line of a mail session:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(sessions.len(), 1, "the binary message was never offered: {sessions:?}");
    let session = &sessions[0];
    assert!(session.contains("unknown[127.0.0.9]"), "from the source address: {session}");
    assert!(session.contains(" mail=1 rcpt=1 bdat=1 ") && !session.contains(" data="), "{session}");
    assert_eq!(postfix.maildir_messages("alice").expect("maildir").len(), 1);
}

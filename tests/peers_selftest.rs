//! Self-test of the real-peer harness (`tests/support/peers.rs`): dnsmasq answers MX queries,
//! Postfix accepts a message into its Maildir, refuses connections while stopped, and comes back.

#[path = "support/peers.rs"]
mod peers;

use peers::{DnsRecord, Dnsmasq, PeersLock, Postfix, SmtpSink};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

const DNS_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);
const PRIMARY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 25);

/// Polls `ok` every 100 ms for at most `limit`.
fn wait(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn dnsmasq_answers_mx_a_null_mx_and_nxdomain() -> TestResult {
    let _lock = PeersLock::acquire()?;
    let dns = Dnsmasq::start(
        DNS_IP,
        &[
            DnsRecord::mx("example.test", "primary.example.test", 10),
            DnsRecord::mx("example.test", "backup.example.test", 20),
            DnsRecord::a("primary.example.test", Ipv4Addr::new(127, 0, 0, 2)),
            DnsRecord::a("backup.example.test", Ipv4Addr::new(127, 0, 0, 3)),
            DnsRecord::null_mx("nomail.test"),
        ],
    )?;
    let mut mx = peers::dig(dns.addr(), "example.test", "MX")?;
    mx.sort();
    assert_eq!(mx, ["10 primary.example.test.", "20 backup.example.test."]);
    assert_eq!(peers::dig(dns.addr(), "backup.example.test", "A")?, ["127.0.0.3"]);
    assert_eq!(peers::dig(dns.addr(), "nomail.test", "MX")?, ["0 ."]);
    assert!(peers::dig(dns.addr(), "nosuch.example.test", "A")?.is_empty());
    dns.stop();
    Ok(())
}

#[test]
fn dnsmasq_on_a_free_port_needs_no_lock() -> TestResult {
    let ip = Ipv4Addr::new(127, 0, 0, 1);
    let port = peers::free_loopback_port(ip)?;
    let dns = Dnsmasq::start_at(SocketAddrV4::new(ip, port), &[DnsRecord::mx("x.test", "mx.x.test", 5)])?;
    assert_eq!(peers::dig(dns.addr(), "x.test", "MX")?, ["5 mx.x.test."]);
    Ok(())
}

#[test]
fn postfix_delivers_to_maildir_and_survives_a_restart() -> TestResult {
    let _lock = PeersLock::acquire()?;
    let mut primary = Postfix::start(PRIMARY, "example.test", &["alice", "bob"])?;
    let transcript = peers::swaks(PRIMARY, "sender@sender.test", "alice@example.test", &["--header", "Subject: one"])?;
    assert!(transcript.contains("250"), "{transcript}");
    let first = primary.wait_for_messages("alice", 1, Duration::from_secs(30))?;
    assert!(String::from_utf8_lossy(&first[0]).contains("Subject: one"));

    // Unknown users are refused at RCPT, like a real primary.
    let refused = peers::swaks(PRIMARY, "sender@sender.test", "nobody@example.test", &[]);
    assert!(refused.is_err_and(|e| e.to_string().contains("550 5.1.1")));

    // A second instance on the same address is refused with a clear error.
    let clash = Postfix::start(PRIMARY, "example.test", &["alice"]).err().map(|e| e.to_string());
    assert!(clash.as_deref().is_some_and(|e| e.contains("already answers")), "{clash:?}");

    // postconf + reload: make it answer 4xx, as a primary in trouble would.
    primary.postconf("smtpd_recipient_restrictions", "defer")?;
    let deferred = || {
        peers::swaks(PRIMARY, "s@sender.test", "alice@example.test", &[]).is_err_and(|e| e.to_string().contains("450"))
    };
    assert!(wait(Duration::from_secs(10), deferred), "450 after reload");
    primary.postconf("smtpd_recipient_restrictions", "permit_mynetworks, reject")?;

    primary.stop()?;
    assert!(TcpStream::connect_timeout(&PRIMARY.into(), Duration::from_secs(2)).is_err(), "down while stopped");
    primary.resume()?;
    peers::swaks(PRIMARY, "sender@sender.test", "alice@example.test", &["--header", "Subject: two"])?;
    let both = primary.wait_for_messages("alice@example.test", 2, Duration::from_secs(30))?;
    assert!(String::from_utf8_lossy(&both[0]).contains("Subject: one"), "oldest first");
    assert!(String::from_utf8_lossy(&both[1]).contains("Subject: two"));
    assert!(primary.maildir_messages("bob")?.is_empty());
    let log = primary.maillog();
    assert!(!log.contains("fatal:") && !log.contains("panic:"), "{log}");
    primary.stop()?;
    Ok(())
}

#[test]
fn smtp_sink_counts_messages() -> TestResult {
    let ip = Ipv4Addr::new(127, 0, 0, 1);
    let sink = SmtpSink::start(SocketAddrV4::new(ip, peers::free_loopback_port(ip)?))?;
    for _ in 0..3 {
        peers::swaks(sink.addr(), "a@sender.test", "b@example.test", &[])?;
    }
    assert_eq!(sink.wait_for(3, Duration::from_secs(10))?, 3);
    Ok(())
}

//! Issue 6 end to end, against the real daemon, a recording fake primary and an in-process DNS
//! server: SMTP smuggling never reaches the primary, forged senders get no bounce, callouts decide
//! at RCPT time, and the per-IP session limit holds.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/dns_server.rs"]
mod dns_server;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use daemon::{Daemon, send_raw};
use dns_server::{DnsServer, Zone};
use fake_primary::{FakePrimary, Received, Script};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// A full configuration: relay for example.test via `primary`, DNS at `dns`, `extra` appended.
fn start(dir: &Path, primary: SocketAddr, dns: Option<SocketAddr>, smtp_extra: &str, extra: &str) -> Daemon {
    let dns = dns.map(|d| format!("[dns]\nnameservers = [\"{d}\"]\n")).unwrap_or_default();
    Daemon::start_on_free_port(dir, |smtp| {
        format!(
            "hostname = \"backup.example.test\"\n[smtp]\nlisten = [\"{smtp}\"]\n{smtp_extra}\n[relay]\ndomains = [\"example.test\"]\n\n[queue]\ndir = \"{}\"\nmin_free = 0\nfirst_retry = \"1s\"\nretry_interval = \"2s\"\n\n[routes]\n\"example.test\" = \"{primary}\"\n{dns}{extra}\n",
            dir.join("spool").display()
        )
    })
}

async fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `input` in one piece and reads until the server closes or `limit` passes.
fn converse(addr: SocketAddr, input: &[u8], limit: Duration) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream.set_read_timeout(Some(limit)).expect("timeout");
    let mut greeting = String::new();
    BufReader::new(stream.try_clone().expect("clone")).read_line(&mut greeting).expect("greeting");
    stream.write_all(input).expect("write");
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The end-of-data look-alikes of the December 2023 SMTP smuggling reports.
const VARIANTS: &[(&str, &[u8])] = &[
    ("LF.LF", b"\n.\n"),
    ("CR.CR", b"\r.\r"),
    ("LF.CRLF", b"\n.\r\n"),
    ("CRLF.LF", b"\r\n.\n"),
    ("CR.CRLF", b"\r.\r\n"),
    ("CRLF.CR", b"\r\n.\r"),
];

fn smuggling_session(variant: &[u8]) -> Vec<u8> {
    let mut input =
        b"EHLO attacker.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n".to_vec();
    input.extend_from_slice(b"Subject: innocent\r\n\r\nfirst part");
    input.extend_from_slice(variant);
    // What an attacker hopes a receiver takes as a second, pipelined transaction.
    input.extend_from_slice(
        b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: SMUGGLED\r\n\r\nevil\r\n",
    );
    input.extend_from_slice(b".\r\nQUIT\r\n");
    input
}

fn has_bare_newline(raw: &[u8]) -> bool {
    raw.iter().enumerate().any(|(i, &b)| {
        (b == b'\n' && (i == 0 || raw[i - 1] != b'\r')) || (b == b'\r' && raw.get(i + 1) != Some(&b'\n'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_variants_never_reach_the_primary() {
    let primary = FakePrimary::start(Script::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bartleby = start(dir.path(), primary.addr, None, "sender_auth = false", "");
    let smtp = bartleby.smtp;
    for (name, variant) in VARIANTS {
        let input = smuggling_session(variant);
        let text =
            tokio::task::spawn_blocking(move || converse(smtp, &input, Duration::from_secs(20))).await.expect("join");
        let finals: Vec<&str> =
            text.lines().filter(|l| l.starts_with("250 2.0.0 Ok: queued") || l.starts_with("550 5.5.2")).collect();
        assert_eq!(finals, ["550 5.5.2 message contains bare CR or LF"], "{name}: one transaction, refused:\n{text}");
        assert!(!text.contains("354 End data with <CR><LF>.<CR><LF>\r\n354"), "{name}: DATA ended early:\n{text}");
        assert!(text.ends_with("221 2.0.0 Bye\r\n"), "{name}: the pipelined QUIT is the next command:\n{text}");
    }
    // A clean message after them all is the only one queued and relayed.
    let reply = tokio::task::spawn_blocking(move || {
        send_raw(smtp, "a@sender.test", &["victim@example.test"], b"Subject: clean\r\n\r\n.leading dot\r\nbody\r\n")
    })
    .await
    .expect("join")
    .expect("send");
    assert!(reply.starts_with("250"), "{reply}");
    let messages: Vec<Received> = wait_for("relay", Duration::from_secs(30), || {
        let m = primary.messages();
        (!m.is_empty() && bartleby.queue().is_empty()).then_some(m)
    })
    .await;
    assert_eq!(messages.len(), 1, "nothing smuggled was spooled or relayed");
    let raw = &messages[0].raw;
    assert!(!has_bare_newline(raw), "relayed data has a bare CR or LF");
    assert!(!String::from_utf8_lossy(raw).contains("SMUGGLED"));
    // The only end of data in what was relayed is the final one.
    assert_eq!(raw.windows(5).filter(|w| w == b"\r\n.\r\n").count(), 1);
    assert!(raw.ends_with(b"\r\n.\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_sender_gets_no_bounce_and_the_message_is_kept() {
    let mut script = Script::default();
    script.rcpt_replies.insert("nobody@example.test".into(), "550 5.1.1 no such user".into());
    let primary = FakePrimary::start(script).await;
    let senders = FakePrimary::start(Script::default()).await;
    let zone = Zone::new()
        .txt("forged.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("soft.test", "v=spf1 ~all")
        .txt("good.test", "v=spf1 ip4:127.0.0.0/8 -all");
    let dns = DnsServer::start(zone).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let routes = format!("\"forged.test\" = \"{0}\"\n\"soft.test\" = \"{0}\"\n\"good.test\" = \"{0}\"\n", senders.addr);
    let bartleby = start(dir.path(), primary.addr, Some(dns.addr), "", "");
    // Routes must sit in the [routes] table: rewrite the config with them and restart.
    drop(bartleby);
    let config_path = dir.path().join("bartleby.toml");
    let config = std::fs::read_to_string(&config_path).expect("config");
    let config = config.replacen("[routes]\n", &format!("[routes]\n{routes}"), 1);
    let smtp: SocketAddr =
        config.split("listen = [\"").nth(1).and_then(|r| r.split('"').next()).expect("listen").parse().expect("addr");
    let bartleby = Daemon::start_with(dir.path(), &config, smtp);
    for sender in ["x@forged.test", "x@soft.test", "x@good.test"] {
        let reply = tokio::task::spawn_blocking(move || {
            send_raw(smtp, sender, &["nobody@example.test"], b"Subject: to nobody\r\n\r\nhi\r\n")
        })
        .await
        .expect("join")
        .expect("send");
        assert!(reply.starts_with("250"), "{sender}: {reply}");
    }
    let notices = wait_for("the one bounce", Duration::from_secs(30), || {
        let m = senders.messages();
        (!m.is_empty()).then_some(m)
    })
    .await;
    let kept = wait_for("two kept messages", Duration::from_secs(30), || {
        let q = bartleby.queue();
        (q.len() == 2 && q.iter().all(|m| m["held"] == true)).then_some(q)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let notices_now = senders.messages();
    assert_eq!(notices_now.len(), 1, "only the SPF-passing sender got a bounce");
    assert!(notices[0].rcpts[0].contains("x@good.test"), "{:?}", notices[0].rcpts);
    let senders_kept: Vec<&str> = kept.iter().filter_map(|m| m["sender"].as_str()).collect();
    assert!(senders_kept.contains(&"x@forged.test") && senders_kept.contains(&"x@soft.test"), "{kept:?}");
    let log = bartleby.log();
    assert!(log.contains("failure notice not sent"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callouts_decide_at_rcpt_and_survive_the_primary_going_down() {
    let mut script = Script::default();
    script.rcpt_replies.insert("nobody@example.test".into(), "550 5.1.1 no such user".into());
    let primary = FakePrimary::start(script).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let domain = "[domain.\"example.test\"]\ncallout = true\n";
    let bartleby = start(dir.path(), primary.addr, None, "sender_auth = false", domain);
    let smtp = bartleby.smtp;
    let rcpts = |list: &'static [&'static str]| {
        let mut input = b"EHLO c.test\r\nMAIL FROM:<a@sender.test>\r\n".to_vec();
        for r in list {
            input.extend_from_slice(format!("RCPT TO:<{r}>\r\n").as_bytes());
        }
        input.extend_from_slice(b"QUIT\r\n");
        tokio::task::spawn_blocking(move || converse(smtp, &input, Duration::from_secs(30)))
    };
    let text = rcpts(&["alice@example.test", "nobody@example.test"]).await.expect("join");
    assert!(text.contains("250 2.1.5 Ok\r\n550 5.1.1"), "{text}");
    assert!(primary.commands().iter().any(|c| c == "MAIL FROM:<>"), "a callout uses the null sender");
    let list = bartleby.cli(&["recipients", "list", "--json"]);
    let entries: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(entries.as_array().map(Vec::len), Some(2), "{entries}");
    // The primary goes away: cached answers still hold, an unknown address is never a 550.
    drop(primary);
    let text = rcpts(&["alice@example.test", "nobody@example.test", "carol@example.test"]).await.expect("join");
    assert!(text.contains("250 2.1.5 Ok\r\n550 5.1.1"), "{text}");
    assert!(text.contains("451 4.4.3"), "{text}");
    let out = bartleby.cli(&["recipients", "add", "carol@example.test"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let text = rcpts(&["carol@example.test"]).await.expect("join");
    assert!(text.contains("250 2.1.5 Ok"), "{text}");
    let out = bartleby.cli(&["recipients", "forget", "carol@example.test"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("forgotten"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_ip_are_limited() {
    let primary = FakePrimary::start(Script::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bartleby = start(dir.path(), primary.addr, None, "sender_auth = false\nmax_sessions_per_ip = 2", "");
    let smtp = bartleby.smtp;
    let result = tokio::task::spawn_blocking(move || {
        let open = |_| {
            let stream = TcpStream::connect_timeout(&smtp, Duration::from_secs(5)).expect("connect");
            stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            let mut line = String::new();
            BufReader::new(stream.try_clone().expect("clone")).read_line(&mut line).expect("greeting");
            (stream, line)
        };
        let sessions: Vec<(TcpStream, String)> = (0..3).map(open).collect();
        let lines: Vec<String> = sessions.iter().map(|(_, l)| l.clone()).collect();
        drop(sessions);
        std::thread::sleep(Duration::from_millis(300));
        let (_again, line) = open(0);
        (lines, line)
    })
    .await
    .expect("join");
    let (lines, again) = result;
    assert!(lines[0].starts_with("220") && lines[1].starts_with("220"), "{lines:?}");
    assert!(lines[2].starts_with("421 4.7.0 too many connections from your address"), "{lines:?}");
    assert!(again.starts_with("220"), "slots come back when sessions end: {again}");
}

//! SIGHUP re-reads the configuration; an invalid one is refused and the old one stays in force.

#[path = "support/daemon.rs"]
mod daemon;

use daemon::{Daemon, rcpt_reply};
use std::time::Duration;

#[test]
fn sighup_applies_a_good_config_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bartleby = Daemon::start(dir.path(), "", "");
    assert!(rcpt_reply(bartleby.smtp, "bob@example.test").starts_with("250"));
    assert!(rcpt_reply(bartleby.smtp, "bob@new.test").starts_with("550 5.7.1"));

    bartleby
        .rewrite_config(|c| c.replace("domains = [\"example.test\"]", "domains = [\"example.test\", \"new.test\"]"));
    bartleby.hup();
    bartleby.wait_for_log("configuration reloaded", Duration::from_secs(10));
    assert!(rcpt_reply(bartleby.smtp, "bob@new.test").starts_with("250"), "the new domain is relayed");

    let good = std::fs::read_to_string(&bartleby.config_path).expect("config");
    bartleby.rewrite_config(|c| format!("{c}\n[smtp2]\nbogus = 1\n"));
    bartleby.hup();
    bartleby.wait_for_log("reload refused", Duration::from_secs(10));
    assert!(bartleby.log().contains("unknown field `smtp2`"), "the reason is logged:\n{}", bartleby.log());
    assert!(rcpt_reply(bartleby.smtp, "bob@new.test").starts_with("250"), "the old configuration stays");

    // A listener change cannot be applied live: it is reported and the old listener kept.
    let moved = good.replace(&bartleby.smtp.to_string(), "127.0.0.1:1");
    bartleby.rewrite_config(|_| moved);
    bartleby.hup();
    bartleby.wait_for_log("takes effect only after a restart", Duration::from_secs(10));
    assert!(bartleby.log().contains("smtp.listen"));
    assert!(rcpt_reply(bartleby.smtp, "bob@example.test").starts_with("250"));
}

fn http_status(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the admin page");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())
        .expect("request");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines().next().unwrap_or_default().to_string()
}

#[test]
fn sighup_applies_the_admin_page_allowlist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bartleby = Daemon::start(dir.path(), "", "");
    let config = std::fs::read_to_string(&bartleby.config_path).expect("config");
    let port: u16 = config
        .split("[web]\nlisten = \"127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|p| p.parse().ok())
        .expect("the harness gives the admin page a port");
    assert!(http_status(port, "/healthz").contains("200"), "loopback is allowed by default");
    bartleby.rewrite_config(|c| format!("{c}allow = [\"192.0.2.0/24\"]\n"));
    bartleby.hup();
    bartleby.wait_for_log("configuration reloaded", Duration::from_secs(10));
    assert!(http_status(port, "/healthz").contains("403"), "the new allowlist is in force");
}

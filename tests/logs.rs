//! What an administrator greps and ships: `serve --log-format json` writes one JSON object per
//! line, each delivery attempt logs one line per recipient with its fields, the accept line has
//! the Message-ID, and the text format quotes values with spaces so logfmt parsers read them.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use daemon::{Daemon, send_raw};
use fake_primary::{FakePrimary, Script};
use std::time::{Duration, Instant};

const MESSAGE: &[u8] = b"Message-ID: <log-test@sender.test>\r\nSubject: m\r\n\r\nm\r\n";

/// A daemon routing example.test to a primary that takes b@ and defers c@ (a reply with spaces),
/// after one message to both; returns once both recipient lines are logged.
async fn deliver(json: bool) -> (FakePrimary, tempfile::TempDir, Daemon) {
    let mut script = Script::default();
    script.rcpt_replies.insert("c@example.test".into(), "450 4.2.0 mailbox busy, try later".into());
    let primary = FakePrimary::start(script).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!("[routes]\n\"example.test\" = \"{}\"\n", primary.addr);
    let bartleby = if json {
        let prepare: daemon::Prepare = std::sync::Arc::new(|c: &mut std::process::Command| {
            c.args(["--log-format", "json"]);
        });
        let spool = dir.path().join("spool");
        Daemon::start_prepared(dir.path(), Some(prepare), |smtp| {
            format!(
                "hostname = \"backup.example.test\"\n[smtp]\nlisten = [\"{smtp}\"]\nsender_auth = false\n[relay]\ndomains = [\"example.test\"]\n[dns]\nnameservers = [\"127.0.0.1:1\"]\n[queue]\ndir = \"{}\"\nmin_free = 0\n{extra}[web]\nlisten = \"127.0.0.1:{}\"\n",
                spool.display(),
                daemon::free_port("127.0.0.1")
            )
        })
    } else {
        Daemon::start(dir.path(), "", &extra)
    };
    let smtp = bartleby.smtp;
    let reply = tokio::task::spawn_blocking(move || {
        send_raw(smtp, "a@sender.test", &["b@example.test", "c@example.test"], MESSAGE).expect("send")
    })
    .await
    .expect("join");
    assert!(reply.starts_with("250"), "{reply}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(bartleby.log().contains("b@example.test") && bartleby.log().contains("mailbox busy")) {
        assert!(Instant::now() < deadline, "no delivery lines:\n{}", bartleby.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (primary, dir, bartleby)
}

#[tokio::test(flavor = "multi_thread")]
async fn json_lines_with_per_recipient_delivery_fields() {
    let (_primary, _dir, mut bartleby) = deliver(true).await;
    let log = bartleby.log();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{log}"))).collect();
    let field = |v: &serde_json::Value, k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    let queued = lines.iter().find(|l| field(l, "message") == "queued").expect("accept line");
    assert_eq!(field(queued, "message_id"), "<log-test@sender.test>", "{queued}");
    let queue_id = field(queued, "queue_id");
    assert!(queue_id.is_string(), "{queued}");
    let delivered = lines
        .iter()
        .find(|l| field(l, "message") == "delivered" && field(l, "to") == "b@example.test")
        .expect("delivery line");
    assert_eq!(field(delivered, "level"), "INFO");
    assert_eq!(field(delivered, "queue_id"), queue_id, "{delivered}");
    assert_eq!(field(delivered, "from"), "a@sender.test", "{delivered}");
    assert!(field(delivered, "relay").as_str().is_some_and(|r| r.contains("127.0.0.1")), "{delivered}");
    assert_eq!(field(delivered, "dsn"), "2.0.0", "{delivered}");
    assert_eq!(field(delivered, "tls"), "none", "{delivered}");
    assert_eq!(field(delivered, "attempt"), 1, "{delivered}");
    assert!(field(delivered, "size").as_u64().is_some_and(|s| s >= MESSAGE.len() as u64), "{delivered}");
    assert!(field(delivered, "reply").as_str().is_some_and(|r| r.starts_with("250")), "{delivered}");
    let delays = field(delivered, "delays");
    let parts: Vec<f64> = delays.as_str().expect("delays").split('/').map(|p| p.parse().expect("seconds")).collect();
    assert_eq!(parts.len(), 3, "{delivered}");
    let total: f64 = field(delivered, "delay").as_f64().expect("delay");
    assert!((total - parts.iter().sum::<f64>()).abs() < 0.05, "{delivered}");
    let deferred = lines
        .iter()
        .find(|l| field(l, "message") == "deferred" && field(l, "to") == "c@example.test")
        .expect("deferral line");
    assert_eq!(field(deferred, "dsn"), "4.2.0", "{deferred}");
    assert!(field(deferred, "reply").as_str().is_some_and(|r| r.contains("450 4.2.0 mailbox busy")), "{deferred}");
    bartleby.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn text_lines_quote_values_with_spaces() {
    let (_primary, _dir, mut bartleby) = deliver(false).await;
    let log = bartleby.log();
    let line = log
        .lines()
        .find(|l| l.contains(" deferred ") && l.contains("to=c@example.test"))
        .unwrap_or_else(|| panic!("no deferral line:\n{log}"));
    assert!(line.contains("reply=\"450 4.2.0 mailbox busy, try later\""), "{line}");
    assert!(line.contains(" from=a@sender.test ") && line.contains(" dsn=4.2.0 "), "{line}");
    let queued = log.lines().find(|l| l.contains(" queued ")).expect("accept line");
    assert!(queued.contains("message_id=<log-test@sender.test>"), "{queued}");
    bartleby.stop();
}

/// Under systemd (JOURNAL_STREAM names our stderr) each line starts with its sd-daemon priority
/// and carries no timestamp (journald adds both its own).
#[tokio::test(flavor = "multi_thread")]
async fn journal_lines_carry_priorities() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("bartleby.log");
    let prepare: daemon::Prepare = std::sync::Arc::new(move |c: &mut std::process::Command| {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&log_path).expect("the log file exists before the start");
        c.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    });
    let spool = dir.path().join("spool");
    let mut bartleby = Daemon::start_prepared(dir.path(), Some(prepare), |smtp| {
        format!(
            "hostname = \"backup.example.test\"\n[smtp]\nlisten = [\"{smtp}\"]\nsender_auth = false\n[relay]\ndomains = [\"example.test\"]\n[dns]\nnameservers = [\"127.0.0.1:1\"]\n[queue]\ndir = \"{}\"\nmin_free = 0\n[web]\nlisten = \"127.0.0.1:{}\"\n",
            spool.display(),
            daemon::free_port("127.0.0.1")
        )
    });
    bartleby.stop();
    let log = bartleby.log();
    assert!(!log.is_empty());
    for line in log.lines() {
        assert!(["<3>", "<4>", "<6>", "<7>"].iter().any(|p| line.starts_with(p)), "no priority: {line}\n{log}");
        assert!(!line[3..].starts_with("20"), "a timestamp under journald: {line}");
    }
    assert!(log.lines().any(|l| l.starts_with("<6> INFO ")), "{log}");
}

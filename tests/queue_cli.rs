//! The queue commands against a running daemon (through the control socket) and offline.

#[path = "support/daemon.rs"]
mod daemon;

use daemon::{Daemon, cli_with_config, free_port, queued_id, send_raw};
use std::time::{Duration, Instant};

fn stdout(out: &std::process::Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn send(bartleby: &Daemon, subject: &str) -> String {
    let data = format!("Subject: {subject}\r\n\r\nhello\r\n");
    let reply = send_raw(bartleby.smtp, "alice@sender.test", &["bob@example.test"], data.as_bytes()).expect("send");
    assert!(reply.starts_with("250"), "{reply}");
    queued_id(&reply).expect("queue id")
}

#[test]
fn queue_commands_through_the_daemon_and_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = free_port("127.0.0.1");
    let mut bartleby = Daemon::start(dir.path(), "", &format!("[routes]\n\"example.test\" = \"127.0.0.1:{closed}\"\n"));
    let first = send(&bartleby, "first");
    let second = send(&bartleby, "second");

    // The first attempt fails (nothing listens on the route) and its error is listed.
    let deadline = Instant::now() + Duration::from_secs(15);
    let queue = loop {
        let queue = bartleby.queue();
        if queue.len() == 2 && queue.iter().all(|m| m["attempts"].as_u64() >= Some(1) && m["last_error"].is_string()) {
            break queue;
        }
        assert!(Instant::now() < deadline, "no failed attempt recorded: {queue:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(queue[0]["id"], first.as_str(), "oldest first");
    assert_eq!(queue[1]["id"], second.as_str());
    for key in ["id", "sender", "recipients", "size", "arrived", "attempts", "next_attempt", "last_error", "held"] {
        assert!(queue[0].get(key).is_some(), "missing {key} in {}", queue[0]);
    }
    assert_eq!(queue[0]["sender"], "alice@sender.test");
    assert_eq!(queue[0]["recipients"], serde_json::json!(["bob@example.test"]));
    assert!(queue[0]["arrived"].as_str().is_some_and(|t| t.ends_with('Z') && t.contains('T')));
    assert!(queue[0]["last_error"].as_str().is_some_and(|e| e.contains(&closed.to_string())), "{}", queue[0]);

    let table = stdout(&bartleby.cli(&["queue", "list"]));
    assert!(table.contains(&first) && table.contains("alice@sender.test") && table.contains("bob@example.test"));
    assert!(table.contains("in 2 Requests."), "{table}");

    assert!(stdout(&bartleby.cli(&["queue", "hold", &first])).contains("held"));
    assert!(stdout(&bartleby.cli(&["queue", "list"])).contains(&format!("{first}!")));
    assert_eq!(bartleby.queue()[0]["held"], true);
    let flushed = stdout(&bartleby.cli(&["queue", "flush"]));
    assert!(flushed.contains("1 message scheduled"), "held messages are not flushed: {flushed}");
    let out = bartleby.cli(&["queue", "flush", "--domain", "other.test"]);
    assert_eq!(out.status.code(), Some(1), "a domain we do not relay: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("other.test is not a relayed domain"), "{out:?}");
    assert!(stdout(&bartleby.cli(&["queue", "release", &first])).contains("released"));
    assert_eq!(bartleby.queue()[0]["held"], false);

    let shown = stdout(&bartleby.cli(&["queue", "show", &second]));
    for part in [
        "Sender:       <alice@sender.test>",
        "Recipient:    <bob@example.test> pending",
        "History:",
        "Received: from",
        "Subject: second",
    ] {
        assert!(shown.contains(part), "missing {part:?} in:\n{shown}");
    }

    assert!(stdout(&bartleby.cli(&["queue", "delete", &second])).contains("deleted"));
    assert_eq!(bartleby.queue().len(), 1);
    let out = bartleby.cli(&["queue", "delete", &second]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no message"), "{out:?}");
    let out = bartleby.cli(&["queue", "show", "../../etc/passwd"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a queue ID"));

    assert!(bartleby.stop().success(), "SIGTERM exits 0");

    // Offline: the CLI opens the spool itself. The retry state kept in memory was saved at the stop.
    let queue = bartleby.queue();
    assert_eq!(queue.len(), 1);
    assert_eq!(queue[0]["id"], first.as_str());
    assert!(queue[0]["attempts"].as_u64() >= Some(1) && queue[0]["last_error"].is_string(), "{}", queue[0]);
    assert!(stdout(&bartleby.cli(&["queue", "hold", &first])).contains("held"));
    let out = bartleby.cli(&["queue", "flush"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));

    // The held state survives a restart, and the message is still there.
    bartleby.restart();
    assert_eq!(bartleby.queue()[0]["held"], true);

    // Export while running, import into another host's spool (stopped), same IDs and state.
    let export = dir.path().join("queue.export");
    let out = bartleby.cli(&["queue", "export", export.to_str().expect("utf-8")]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains("exported 1 messages"), "{out:?}");
    assert!(bartleby.stop().success());
    let other = dir.path().join("other.toml");
    std::fs::write(&other, format!("[queue]\ndir = \"{}\"\n", dir.path().join("other-spool").display()))
        .expect("config");
    let out = cli_with_config(&other, &["queue", "import", export.to_str().expect("utf-8")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("imported 1 messages"), "{out:?}");
    let moved: Vec<serde_json::Value> =
        serde_json::from_slice(&cli_with_config(&other, &["queue", "list", "--json"]).stdout).expect("json");
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0]["id"], first.as_str());
    assert_eq!(moved[0]["held"], true);
}

#[test]
fn bad_config_exits_2_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    let out = cli_with_config(&missing, &["queue", "list"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("missing.toml") && err.contains("cannot read"), "{err}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[queue]\nretry_interval = \"soon\"\n").expect("write");
    let out = cli_with_config(&bad, &["serve"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml: line 2: key `queue.retry_interval`"), "{err}");

    std::fs::write(&bad, "[queue]\ndir = \"/tmp\"\n").expect("write");
    let out = cli_with_config(&bad, &["check-config"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("retry_interval = \"30m\""));
}

#[test]
fn queue_sync_gives_journaled_mail_its_own_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = free_port("127.0.0.1");
    let mut bartleby = Daemon::start(dir.path(), "", &format!("[routes]\n\"example.test\" = \"127.0.0.1:{closed}\"\n"));
    let id = send(&bartleby, "synced");
    let messages = bartleby.spool_dir().join("messages");
    let files = || std::fs::read_dir(&messages).map(|d| d.count()).unwrap_or(0);
    assert_eq!(files(), 0, "a small message waits in the journal");
    let synced = stdout(&bartleby.cli(&["queue", "sync"]));
    assert!(synced.contains("1 journaled message written to messages/; journal retired"), "{synced}");
    assert_eq!(files(), 2, "{id}.msg and {id}.env");
    assert!(stdout(&bartleby.cli(&["queue", "show", &id])).contains("Subject: synced"));
    assert!(stdout(&bartleby.cli(&["queue", "sync"])).contains("0 journaled messages"));
    assert!(bartleby.stop().success());
    let segments = std::fs::read_dir(bartleby.spool_dir().join("journal")).expect("journal").count();
    assert_eq!(segments, 0, "a stopped server with nothing in the journal leaves no segment");
    bartleby.restart();
    assert_eq!(bartleby.queue()[0]["id"], id.as_str());
}

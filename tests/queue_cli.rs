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

/// Runs the CLI with `input` on its standard input (for `-`), bounded to 30 s.
fn cli_with_stdin(bartleby: &Daemon, args: &[&str], input: &str) -> std::process::Output {
    let config = bartleby.spool_dir().parent().expect("test dir").join("bartleby.toml");
    daemon::cli_with_config_and_stdin(&config, args, Some(input))
}

/// Exit status 1 and `needle` on stderr.
fn fails_with(out: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected a failure mentioning {needle:?}: {out:?}");
    assert!(err.contains(needle), "expected {needle:?} on stderr: {err}");
}

/// Sends one message from `from`; the queue ID.
fn send_from(bartleby: &Daemon, from: &str, subject: &str) -> String {
    let data = format!("Subject: {subject}\r\n\r\nbody of {subject}\r\n");
    let reply = send_raw(bartleby.smtp, from, &["bob@example.test"], data.as_bytes()).expect("send");
    assert!(reply.starts_with("250"), "{reply}");
    queued_id(&reply).expect("queue id")
}

/// The messages' first attempts have failed (nothing listens on the route); none is in flight.
fn wait_attempted(bartleby: &Daemon, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let queue = bartleby.queue();
        if queue.len() == count && queue.iter().all(|m| m["attempts"].as_u64() >= Some(1)) {
            return queue;
        }
        assert!(Instant::now() < deadline, "no failed attempts recorded: {queue:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A later retry than the test lasts, so that no attempt makes a message busy mid-test.
fn idle_queue(closed: u16) -> String {
    format!("first_retry = \"1h\"\nretry_interval = \"1h\"\n[routes]\n\"example.test\" = \"127.0.0.1:{closed}\"\n")
}

#[test]
fn bulk_commands_by_id_stdin_all_and_selection_with_honest_replies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = free_port("127.0.0.1");
    let mut bartleby = Daemon::start(dir.path(), "", &idle_queue(closed));
    let a = send_from(&bartleby, "alice@sender.test", "a");
    let c = send_from(&bartleby, "carol@other.test", "c");
    let d = send_from(&bartleby, "dave@sender.test", "d");
    wait_attempted(&bartleby, 3);

    let out = stdout(&bartleby.cli(&["queue", "hold", "--sender", "carol@"]));
    assert_eq!(out, format!("{c}: held\n-- 1 message held\n"));
    fails_with(&bartleby.cli(&["queue", "retry", &c]), &format!("message {c} is held; release it first"));
    fails_with(&bartleby.cli(&["queue", "release", &a]), &format!("message {a} is not held"));

    // IDs on standard input, as `queue list` prints them (the held mark and other lines dropped).
    let listing = stdout(&bartleby.cli(&["queue", "list"]));
    let out = cli_with_stdin(&bartleby, &["queue", "hold", "-"], &listing);
    let text = stdout(&out);
    assert!(text.contains(&format!("{a}: held")) && text.contains(&format!("{c}: already held")), "{text}");
    assert!(text.ends_with("-- 3 messages held\n"), "{text}");
    fails_with(&cli_with_stdin(&bartleby, &["queue", "hold", "-"], ""), "no queue IDs on standard input");
    fails_with(&bartleby.cli(&["queue", "hold"]), "name the messages");
    fails_with(&bartleby.cli(&["queue", "hold", "ALL", "--held", &a]), "not both");

    // One unknown ID among many: the others are done, each failure is named, the exit is 1.
    let out = bartleby.cli(&["queue", "release", &a, "00000000000000FF", "garbage", &d]);
    fails_with(&out, "00000000000000FF: no message");
    fails_with(&out, "garbage: \"garbage\" is not a queue ID");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{a}: released")) && text.contains(&format!("{d}: released")), "{text}");
    assert!(text.ends_with("-- 2 messages released, 2 failed\n"), "{text}");

    // More IDs than one control request carries (64 KiB): sent in slices, answered in order.
    let many: String = (1..=3000).map(|n| format!("{n:016X}\n")).collect::<String>() + &a;
    let out = cli_with_stdin(&bartleby, &["queue", "hold", "-"], &many);
    fails_with(&out, "0000000000000BB8: no message");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with(&format!("{a}: held\n-- 1 message held, 3000 failed\n")), "{text}");
    stdout(&bartleby.cli(&["queue", "release", &a]));

    // ALL: the one still held is released, the others are not held, which is said.
    let out = bartleby.cli(&["queue", "release", "ALL"]);
    fails_with(&out, &format!("{a}: message {a} is not held"));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("-- 1 message released, 2 failed\n"), "{out:?}");
    assert!(bartleby.queue().iter().all(|m| m["held"] == false));

    let out = stdout(&bartleby.cli(&["queue", "retry", "--domain", "example.test", "--not-held"]));
    assert!(out.ends_with("-- 3 messages scheduled for delivery now\n"), "{out}");
    wait_attempted(&bartleby, 3);
    let out = stdout(&bartleby.cli(&["queue", "requeue", &d]));
    assert!(out.contains(&format!("{d}: requeued: due now")), "{out}");
    let out = stdout(&bartleby.cli(&["queue", "delete", "--older-than", "1h"]));
    assert_eq!(out, "-- no message matched\n", "nothing is that old");
    let out = bartleby.cli(&["queue", "delete", "--older-than", "soon"]);
    assert_eq!(out.status.code(), Some(2), "a usage error, as clap reports them: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"soon\" is not a duration"), "{out:?}");

    let shown = stdout(&bartleby.cli(&["queue", "show", "--body", &a]));
    assert!(shown.contains("Subject: a\n") && shown.contains("Body:\nbody of a\n"), "{shown}");
    assert!(!stdout(&bartleby.cli(&["queue", "show", &a])).contains("Body:"), "the body only when asked");

    let out = stdout(&bartleby.cli(&["queue", "delete", "--recipient", "BOB@", "--sender", "dave"]));
    assert_eq!(out, format!("{d}: deleted (no bounce sent)\n-- 1 message deleted\n"));

    assert!(bartleby.stop().success());
    // Offline: requeue and the held state work on the spool; what needs the scheduler says so.
    wait_attempted(&bartleby, 2);
    assert!(stdout(&bartleby.cli(&["queue", "requeue", "ALL"])).ends_with("-- 2 messages requeued\n"));
    assert!(stdout(&bartleby.cli(&["queue", "hold", &a])).contains("held"));
    fails_with(&bartleby.cli(&["queue", "requeue", &a]), "is held");
    fails_with(&bartleby.cli(&["queue", "bounce", "ALL"]), "not running");
    fails_with(&bartleby.cli(&["queue", "pause", "example.test"]), "not running");
}

#[test]
fn bounce_returns_a_message_with_a_notice_to_its_sender() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = free_port("127.0.0.1");
    let mut bartleby = Daemon::start(dir.path(), "", &idle_queue(closed));
    let a = send_from(&bartleby, "alice@sender.test", "returned");
    let b = send_from(&bartleby, "", "from the null sender");
    wait_attempted(&bartleby, 2);

    let out = stdout(&bartleby.cli(&["queue", "bounce", &a, &b]));
    assert!(out.contains(&format!("{a}: returned to <alice@sender.test>: failure notice ")), "{out}");
    assert!(out.contains(&format!("{b}: removed; no notice: the sender is the null sender")), "{out}");
    assert!(out.ends_with("-- 2 messages returned\n"), "{out}");
    let queue = bartleby.queue();
    assert_eq!(queue.len(), 1, "only the notice is left: {queue:?}");
    assert_eq!((&queue[0]["sender"], &queue[0]["recipients"]), (&"".into(), &serde_json::json!(["alice@sender.test"])));
    let notice = queue[0]["id"].as_str().expect("id");
    let shown = stdout(&bartleby.cli(&["queue", "show", "--body", notice]));
    assert!(shown.contains("5.0.0") && shown.contains("returned by the operator"), "{shown}");
    fails_with(&bartleby.cli(&["queue", "bounce", &a]), "no message");
    assert!(bartleby.stop().success());
}

#[test]
fn pause_keeps_a_domain_untried_across_restarts_and_resume_tries_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = free_port("127.0.0.1");
    let mut bartleby = Daemon::start(dir.path(), "", &idle_queue(closed));
    let id = send_from(&bartleby, "alice@sender.test", "paused");
    // Attempts, not connections, tell deliveries: the monitor probes the next hop too.
    let attempts = |bartleby: &Daemon| bartleby.queue()[0]["attempts"].as_u64().unwrap_or(0);
    wait_attempted(&bartleby, 1);
    let before = attempts(&bartleby);

    fails_with(&bartleby.cli(&["queue", "pause", "nowhere.test"]), "nowhere.test is not a relayed domain");
    fails_with(&bartleby.cli(&["queue", "resume", "example.test"]), "deliveries to example.test are not paused");
    let out = stdout(&bartleby.cli(&["queue", "pause", "Example.TEST"]));
    assert!(out.contains("deliveries to example.test paused"), "{out}");
    assert!(stdout(&bartleby.cli(&["queue", "pause", "example.test"])).contains("already paused"));
    assert!(stdout(&bartleby.cli(&["queue", "list"])).contains("-- Deliveries paused for: example.test\n"));
    fails_with(&bartleby.cli(&["queue", "flush", "--domain", "example.test"]), "example.test are paused");

    // A retry while paused is accepted, but nothing is tried: not after a reload, not after a
    // restart (which finds the message due).
    stdout(&bartleby.cli(&["queue", "retry", &id]));
    bartleby.hup();
    bartleby.wait_for_log("configuration reloaded", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(attempts(&bartleby), before, "paused across a reload");
    assert!(bartleby.stop().success());
    bartleby.restart();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(attempts(&bartleby), before, "paused across a restart");
    assert!(stdout(&bartleby.cli(&["queue", "list"])).contains("-- Deliveries paused for: example.test\n"));

    let out = stdout(&bartleby.cli(&["queue", "resume", "example.test"]));
    assert!(out.contains("deliveries to example.test resumed"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while attempts(&bartleby) == before {
        assert!(Instant::now() < deadline, "no attempt after the resume");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!stdout(&bartleby.cli(&["queue", "list"])).contains("paused"));
    assert!(bartleby.stop().success());
}

#[test]
fn shape_counts_by_domain_and_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = free_port("127.0.0.1");
    let mut bartleby = Daemon::start(dir.path(), "", &idle_queue(closed));
    for subject in ["one", "two"] {
        send_from(&bartleby, "alice@sender.test", subject);
    }
    let table = stdout(&bartleby.cli(&["queue", "shape"]));
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"], "{table}");
    assert_eq!(rows[1], ["TOTAL", "2", "2", "0", "0", "0", "0", "0", "0", "0", "0", "0"], "{table}");
    assert_eq!(rows[2][..3], ["example.test", "2", "2"], "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&bartleby.cli(&["queue", "shape", "--json"]))).expect("json");
    assert_eq!(json["buckets_minutes"][9], 1280);
    assert_eq!(json["domains"]["example.test"][0], 2);
    assert_eq!(json["total"][0], 2);
    assert!(bartleby.stop().success());
    // Offline, from the spool.
    assert!(stdout(&bartleby.cli(&["queue", "shape"])).contains("example.test"));
}

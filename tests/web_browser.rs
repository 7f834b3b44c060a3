//! The admin page in a real browser: headless Chromium (Debian's `chromium`) driven over the
//! DevTools protocol against the real `bartleby` binary. Mail waits while the primary is down;
//! the page lists it; the primary comes back; a click on "Flush all" empties the queue.
//! Screenshots go to `target/test-output/`.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/web_cdp.rs"]
mod web_cdp;
#[path = "support/web_primary.rs"]
mod web_primary;

use daemon::{Daemon, free_port, send_raw};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use web_cdp::{Browser, http_get};

fn output_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join("test-output")
}

/// Polls `check` every 200 ms for at most `limit`.
fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn api(port: u16, path: &str) -> Value {
    serde_json::from_str(&http_get(port, path)).unwrap_or(Value::Null)
}

#[test]
fn flush_button_empties_the_queue_once_the_primary_is_back() {
    // Fail at once, with the reason, when there is no browser (rather than skipping silently).
    web_cdp::find_chromium();
    let dir = tempfile::tempdir().expect("tempdir");
    let primary: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
    let web_port = free_port("127.0.0.1");
    let extra = format!(
        "[routes]\n\"example.test\" = \"{primary}\"\n[web]\nlisten = \"127.0.0.1:{web_port}\"\nflush_cooldown = \"1s\"\n\
         trust_allowed_hosts = true\n"
    );
    let mut bartleby = Daemon::start(dir.path(), "", &extra);

    let subjects = ["Quarterly report", "=?UTF-8?Q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=", "<b>not bold</b>"];
    for (i, subject) in subjects.iter().enumerate() {
        let data =
            format!("From: sender{i}@remote.test\r\nTo: user{i}@example.test\r\nSubject: {subject}\r\n\r\nHello.\r\n");
        let reply = send_raw(
            bartleby.smtp,
            &format!("sender{i}@remote.test"),
            &[&format!("user{i}@example.test")],
            data.as_bytes(),
        )
        .expect("SMTP");
        assert!(reply.starts_with("250"), "{reply}");
    }
    // The primary is down: every message is tried once and deferred.
    wait_until(Duration::from_secs(30), "all messages were tried and deferred", || {
        let queue = api(web_port, "/api/queue");
        queue["total"] == 3
            && queue["messages"].as_array().is_some_and(|m| m.iter().all(|m| m["attempts"].as_u64() >= Some(1)))
    });

    let browser = Browser::start();
    let mut page = browser.page();
    page.call("Page.enable", serde_json::json!({}));
    let url = format!("http://127.0.0.1:{web_port}/");
    page.navigate(&url);
    let rows = page.eval("document.querySelectorAll('table.queue tbody tr').length");
    assert_eq!(rows, 3, "the page lists the queued messages");
    let text = page.eval("document.body.innerText").as_str().unwrap_or_default().to_string();
    assert!(text.contains("Grüße aus Köln") && text.contains("<b>not bold</b>"), "{text}");
    assert!(text.contains("failing"), "the primary is shown failing: {text}");
    assert_eq!(page.eval("document.querySelectorAll('b').length"), 0, "sender markup stays text");
    page.screenshot(&output_dir().join("web-admin-queued.png"));

    let primary_server = web_primary::AcceptAll::start(primary);
    page.clear_events();
    page.eval("document.querySelector('button[value=all]').click()");
    page.wait_event("Page.loadEventFired");
    let flash = page.eval("document.querySelector('.flash') && document.querySelector('.flash').innerText");
    assert!(flash.as_str().is_some_and(|f| f.contains("3 messages scheduled")), "flash after the click: {flash}");

    wait_until(Duration::from_secs(30), "the queue is empty", || api(web_port, "/api/queue")["total"] == 0);
    assert_eq!(primary_server.messages.load(Ordering::SeqCst), 3, "the primary got every message");
    page.navigate(&url);
    assert_eq!(page.eval("document.querySelectorAll('table.queue tbody tr').length"), 0);
    let text = page.eval("document.body.innerText").as_str().unwrap_or_default().to_string();
    assert!(text.contains("0 messages"), "{text}");
    page.screenshot(&output_dir().join("web-admin-flushed.png"));
    assert!(std::fs::metadata(output_dir().join("web-admin-flushed.png")).is_ok_and(|m| m.len() > 1000));

    drop(browser);
    let status = bartleby.stop();
    assert!(status.success(), "bartleby exit: {status}\n{}", bartleby.log());
}

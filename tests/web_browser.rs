//! The admin page in a real browser: headless Chromium (Debian's `chromium`) driven over the
//! DevTools protocol against the real `bartleby` binary. Mail waits while the primary is down;
//! the page lists it; the primary comes back; a click on "Flush all" empties the queue. And the
//! page as a person sees it, at a desktop's width (1280 px) and a phone's (390 px): layout facts
//! measured in the browser (nothing wider than the screen, the queue near the top, long words
//! wrapped, held mail shown as held). Screenshots go to `target/test-output/`;
//! `docs/admin-page.png` is `web-admin-1280.png` from `page_reads_on_a_desktop_and_on_a_phone`.

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
use web_cdp::{Browser, Cdp, http_get};

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

/// A long unbroken Subject, sender and domain: they must wrap, not widen the page.
const LONG_SUBJECT: &str =
    "Invoice_2026-11-29_0123456789012345678901234567890123456789012345678901234567890123456789_final_FINAL";
const LONG_SENDER: &str = "notifications-and-reminders-for-everyone@bounces.newsletter.remote.test";
const LONG_DOMAIN: &str = "mail.a-rather-long-relayed-domain-name-for-a-narrow-screen.example";

/// The layout facts of the page now shown, measured by the browser: the viewport, the document's
/// width, every visible element of the summary and the queue that sticks out of the viewport, the
/// queue's essential cells per message, and where the queue starts.
const MEASURE: &str = r#"(() => {
  const vw = document.documentElement.clientWidth, vh = window.innerHeight;
  const outside = [];
  for (const el of document.querySelectorAll('section.status *, section.queue *')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    if (r.right > vw + 0.5 || r.left < -0.5) {
      outside.push(`${el.tagName.toLowerCase()}.${el.getAttribute('class') || ''} ${r.left.toFixed(0)}..${r.right.toFixed(0)}: ${(el.textContent || '').trim().slice(0, 60)}`);
    }
  }
  const cell = (tr, name) => {
    const td = tr.querySelector('td.' + name);
    if (!td) return null;
    const r = td.getBoundingClientRect();
    return { shown: getComputedStyle(td).display !== 'none' && r.width > 0, left: r.left, right: r.right,
             top: r.top + window.scrollY, text: td.innerText.trim() };
  };
  const rows = [...document.querySelectorAll('table.queue tbody tr')].map(tr => ({
    held: tr.classList.contains('held'),
    cells: Object.fromEntries(['id', 'subject', 'sender', 'rcpts', 'next', 'error'].map(c => [c, cell(tr, c)])),
  }));
  const domains = [...document.querySelectorAll('table.domains tbody tr')].map(tr => ({
    cells: Object.fromEntries(['domain', 'primary', 'since', 'error', 'queued', 'flush'].map(c => [c, cell(tr, c)])),
    button: !!tr.querySelector('td.flush button'),
  }));
  const top = sel => { const e = document.querySelector(sel); return e ? e.getBoundingClientRect().top + window.scrollY : null; };
  return { vw, vh, scrollWidth: document.documentElement.scrollWidth, outside, rows, domains,
           queueTop: top('section.queue'), firstRowTop: top('table.queue tbody tr'), chartTop: top('section.history') };
})()"#;

/// Sets the viewport (a phone: `mobile`, which honours the page's viewport meta tag).
fn viewport(page: &mut Cdp, width: u32, height: u32, mobile: bool) {
    let scale = if mobile { 2 } else { 1 };
    page.call(
        "Emulation.setDeviceMetricsOverride",
        serde_json::json!({ "width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile }),
    );
}

/// The measurements of [`MEASURE`], after checking what holds at every width: nothing in the
/// summary or the queue sticks out of the viewport, the page does not scroll sideways, and each
/// message's essentials (ID, subject, sender, recipients, next attempt, last error) are shown
/// inside the viewport.
fn check_layout(page: &mut Cdp, what: &str) -> Value {
    let m = page.eval(MEASURE);
    let vw = m["vw"].as_f64().expect("viewport width");
    assert!(m["scrollWidth"].as_f64() <= Some(vw), "{what}: the page scrolls sideways: {m:#}");
    assert_eq!(m["outside"], serde_json::json!([]), "{what}: elements wider than the viewport");
    let rows = m["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4, "{what}: every message is listed: {m:#}");
    for row in rows {
        for (name, cell) in row["cells"].as_object().expect("cells") {
            if name == "error" && cell["text"] == "" {
                continue;
            }
            assert!(cell["shown"] == true, "{what}: the {name} of each message is shown: {row:#}");
            assert!(cell["left"].as_f64() >= Some(-0.5), "{what}: {name} inside the viewport: {row:#}");
            assert!(cell["right"].as_f64() <= Some(vw + 0.5), "{what}: {name} inside the viewport: {row:#}");
        }
    }
    for domain in m["domains"].as_array().expect("domains") {
        for name in ["domain", "primary", "queued"] {
            assert!(domain["cells"][name]["shown"] == true, "{what}: the domain's {name} is shown: {domain:#}");
        }
    }
    m
}

#[test]
fn page_reads_on_a_desktop_and_on_a_phone() {
    web_cdp::find_chromium();
    let dir = tempfile::tempdir().expect("tempdir");
    let web_port = free_port("127.0.0.1");
    // Both primaries are down (nothing listens on their ports): every message waits.
    let (dead_a, dead_b) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let mut bartleby = Daemon::start_on_free_port(dir.path(), |smtp| {
        format!(
            "hostname = \"backup.example.test\"\n[smtp]\nlisten = [\"{smtp}\"]\nsender_auth = false\n\
             [relay]\ndomains = [\"example.test\", \"{LONG_DOMAIN}\"]\n[dns]\nnameservers = [\"127.0.0.1:1\"]\n\
             [queue]\ndir = \"{}\"\nmin_free = 0\n\
             [routes]\n\"example.test\" = \"127.0.0.1:{dead_a}\"\n\"{LONG_DOMAIN}\" = \"127.0.0.1:{dead_b}\"\n\
             [web]\nlisten = \"127.0.0.1:{web_port}\"\ntrust_allowed_hosts = true\n",
            dir.path().join("spool").display()
        )
    });
    let long_rcpt = format!("the-whole-accounts-payable-team@{LONG_DOMAIN}");
    let mail: [(&str, &[&str], &str); 4] = [
        ("alice@remote.test", &["user0@example.test"], "Quarterly report"),
        (LONG_SENDER, &[&long_rcpt], LONG_SUBJECT),
        ("bob@remote.test", &["user1@example.test", "user2@example.test"], "Two recipients"),
        ("carol@remote.test", &["user3@example.test"], "Hold me"),
    ];
    for (from, to, subject) in mail {
        let data = format!("From: {from}\r\nTo: {}\r\nSubject: {subject}\r\n\r\nHello.\r\n", to.join(", "));
        let reply = send_raw(bartleby.smtp, from, to, data.as_bytes()).expect("SMTP");
        assert!(reply.starts_with("250"), "{reply}");
    }
    wait_until(Duration::from_secs(30), "all messages were tried and deferred", || {
        let queue = api(web_port, "/api/queue");
        queue["total"] == 4
            && queue["messages"].as_array().is_some_and(|m| m.iter().all(|m| m["attempts"].as_u64() >= Some(1)))
    });
    let queued = bartleby.queue();
    let held = queued.iter().find(|m| m["recipients"][0] == "user3@example.test").expect("the fourth message");
    let held_id = held["id"].as_str().expect("id").to_string();
    let out = bartleby.cli(&["queue", "hold", &held_id]);
    assert!(out.status.success(), "hold: {}", String::from_utf8_lossy(&out.stderr));

    let browser = Browser::start();
    let mut page = browser.page();
    page.call("Page.enable", serde_json::json!({}));
    let url = format!("http://127.0.0.1:{web_port}/");

    // A desktop: the queue is a table, every column shown.
    viewport(&mut page, 1280, 1100, false);
    page.navigate(&url);
    let desktop = check_layout(&mut page, "1280 px");
    page.screenshot(&output_dir().join("web-admin-1280.png"));
    let queue_top = desktop["queueTop"].as_f64().expect("queue top");
    assert!(queue_top < 1100.0 / 2.0, "1280 px: the queue starts in the top half of the screen: {desktop:#}");
    assert!(desktop["chartTop"].as_f64() > Some(queue_top), "the chart comes after the queue: {desktop:#}");
    assert_eq!(
        page.eval("getComputedStyle(document.querySelector('table.queue thead')).display"),
        "table-header-group"
    );

    let text = page.eval("document.body.innerText").as_str().unwrap_or_default().to_string();
    assert!(text.contains("4 messages"), "plural: {text}");
    assert!(!text.contains("1 messages") && !text.contains("1 recipients") && !text.contains("1 attempts"), "{text}");
    let rows = desktop["rows"].as_array().expect("rows");
    for row in rows {
        let next = row["cells"]["next"]["text"].as_str().unwrap_or_default();
        if row["held"] == true {
            assert_eq!(next, "held", "a held message shows held, not a next attempt: {row:#}");
        } else {
            assert!(next.contains("20") && !next.contains("held"), "a next attempt time: {row:#}");
        }
    }
    assert_eq!(rows.iter().filter(|r| r["held"] == true).count(), 1);
    let subject = rows.iter().find(|r| r["cells"]["subject"]["text"] == LONG_SUBJECT).expect("long subject listed");
    let id_cell = &subject["cells"]["id"];
    assert!(
        subject["cells"]["subject"]["right"].as_f64() <= desktop["vw"].as_f64(),
        "the long subject wraps inside the table: {subject:#} (ID cell {id_cell})"
    );

    // A phone: cards, nothing sideways, the queue on the first screen.
    viewport(&mut page, 390, 844, true);
    page.navigate(&url);
    let phone = check_layout(&mut page, "390 px");
    page.screenshot(&output_dir().join("web-admin-390.png"));
    assert_eq!(phone["vw"], 390, "the page honours the phone's width: {phone:#}");
    let queue_top = phone["queueTop"].as_f64().expect("queue top");
    assert!(queue_top < 844.0, "390 px: the queue starts on the first screen: {phone:#}");
    assert!(phone["chartTop"].as_f64() > Some(queue_top), "the chart comes after the queue: {phone:#}");
    assert_eq!(page.eval("getComputedStyle(document.querySelector('table.queue thead')).display"), "none");
    let text = page.eval("document.body.innerText").as_str().unwrap_or_default().to_string();
    assert!(text.contains("1 attempt") && !text.contains("1 attempts"), "the cards count attempts in words: {text}");
    for row in phone["rows"].as_array().expect("rows") {
        let next = row["cells"]["next"]["text"].as_str().unwrap_or_default();
        assert_eq!(row["held"] == true, next == "held", "held, or the next attempt: {row:#}");
    }
    // The subject's card is as wide as the others: the subject wrapped onto several lines.
    let long = phone["rows"].as_array().and_then(|r| r.iter().find(|r| r["cells"]["subject"]["text"] == LONG_SUBJECT));
    let long = long.expect("long subject listed");
    assert!(long["cells"]["subject"]["right"].as_f64() <= Some(390.0), "{long:#}");
    let domains = phone["domains"].as_array().expect("domains");
    assert_eq!(domains.len(), 2, "{phone:#}");
    for domain in domains {
        assert!(domain["cells"]["primary"]["text"] == "failing", "the state is shown: {domain:#}");
        assert!(domain["button"] == true, "each domain with mail has its flush button: {domain:#}");
        assert!(domain["cells"]["flush"]["right"].as_f64() <= Some(390.0), "{domain:#}");
    }

    // The held message's own page, on the phone: held instead of a next attempt, words not names.
    page.navigate(&format!("{url}message/{held_id}"));
    let next = page.eval("document.querySelector('table.envelope td.next').innerText");
    assert!(next.as_str().is_some_and(|t| t.starts_with("held") && !t.contains("20")), "{next}");
    let text = page.eval("document.body.innerText").as_str().unwrap_or_default().to_string();
    assert!(text.contains("7bit") && !text.contains("SevenBit"), "the body type in words: {text}");
    assert!(text.contains("1 recipient") && !text.contains("1 recipients"), "{text}");
    let width = page.eval("document.documentElement.scrollWidth");
    assert!(width.as_f64() <= Some(390.0), "the message page fits the phone: {width}");
    page.screenshot(&output_dir().join("web-message-390.png"));

    drop(browser);
    let status = bartleby.stop();
    assert!(status.success(), "bartleby exit: {status}\n{}", bartleby.log());
}

//! A crash test: 20 concurrent clients send while bartleby is killed with SIGKILL at a random
//! moment; after a restart every message that got a 250 is queued with intact data, and nothing
//! half-written is listed.

#[path = "support/daemon.rs"]
mod daemon;

use daemon::{Daemon, free_port, queued_id, send_raw, strip_our_received};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn payload(client: usize, n: usize) -> Vec<u8> {
    let mut text = format!("Subject: crash test {client}-{n}\r\nMessage-ID: <{client}.{n}@sender.test>\r\n\r\n");
    for line in 0..(n % 7 + 1) * 40 {
        text += &format!(".line {line} of message {client}-{n}, with a leading dot\r\nplain line {line}\r\n");
    }
    text.into_bytes()
}

#[test]
fn sigkill_at_a_random_moment_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = free_port("127.0.0.1");
    let mut bartleby = Daemon::start(dir.path(), "", &format!("[routes]\n\"example.test\" = \"127.0.0.1:{closed}\"\n"));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(Mutex::new(HashSet::new()));
    let clients: Vec<_> = (0..20)
        .map(|client| {
            let (stop, acked, sent, addr) = (stop.clone(), acked.clone(), sent.clone(), bartleby.smtp);
            std::thread::spawn(move || {
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let data = payload(client, n);
                    sent.lock().expect("lock").insert(data.clone());
                    if let Ok(reply) = send_raw(addr, "a@sender.test", &["b@example.test"], &data)
                        && reply.starts_with("250")
                    {
                        let id = queued_id(&reply).expect("queue id in 250 reply");
                        acked.lock().expect("lock").push((id, data));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(fastrand::u64(800..2500)));
    bartleby.kill();
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().expect("client thread");
    }
    let acked = acked.lock().expect("lock").clone();
    let sent = sent.lock().expect("lock").clone();
    assert!(acked.len() >= 20, "too few messages acknowledged before the kill: {}", acked.len());

    bartleby.restart();
    let listed: HashMap<String, serde_json::Value> =
        bartleby.queue().into_iter().map(|m| (m["id"].as_str().unwrap_or_default().to_string(), m)).collect();
    let bodies = bartleby.exported_bodies();
    for (id, data) in &acked {
        assert!(listed.contains_key(id), "acknowledged message {id} is missing after the crash");
        let stored = bodies.get(id).expect("body");
        assert_eq!(strip_our_received(stored), &data[..], "message {id} changed");
    }
    for id in listed.keys() {
        let stored = bodies.get(id).expect("listed body");
        assert!(sent.contains(strip_our_received(stored)), "listed message {id} is not a complete sent message");
    }
    assert!(bartleby.stop().success());
}

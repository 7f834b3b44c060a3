//! Power loss, not only kill -9 (issue 16, point 7). A SIGKILL leaves the kernel's page cache
//! intact, so a crash test cannot fail on a missing fsync; a power cut loses everything that was not
//! made durable. Here the spool is on a filesystem that forgets every write that was not fsync'd
//! (tests/support/lazy_fs.rs, in the manner of LazyFS), with bartleby's `syncfs` calls seen through
//! seccomp (tests/support/syncfs_watch.rs). 20 senders send while the primary is down; the power is
//! cut mid-load (the daemon killed, every unsynced write and name dropped, some writes torn); after
//! a restart on what the "disk" kept, every message that got a 250 must be queued and, once the
//! primary is back, delivered with exactly the bytes that were sent.
//!
//! Two runs: small messages (the journal, `src/spool/journal.rs`, with a `queue sync` checkpoint
//! during the load so its `syncfs` is covered too) and messages over the journal's 512 KiB limit
//! (their own files in `messages/`). Needs root and /dev/fuse; `POWER_LOSS_SEED=N` repeats a run.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_primary.rs"]
mod fake_primary;
#[path = "support/lazy_fs.rs"]
mod lazy_fs;
#[path = "support/syncfs_watch.rs"]
mod syncfs_watch;

use daemon::{Daemon, free_port, queued_id, send_raw, strip_our_received};
use fake_primary::{FakePrimary, Script};
use lazy_fs::LazyFs;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use syncfs_watch::SyncfsWatch;

const SENDERS: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Size {
    /// Up to a few KiB: journaled.
    Small,
    /// Over `MAX_JOURNALED_BODY` (512 KiB), up to 1.1 MiB: its own files.
    Large,
}

/// A message that tells which sender and which try it is, with lines a dot-stuffing or a torn write
/// would change; its Message-ID carries the token.
fn payload(size: Size, client: usize, n: usize) -> Vec<u8> {
    let token = format!("pl-{client}-{n}");
    let mut text = format!("Subject: {token}\r\nMessage-ID: <{token}@sender.test>\r\n\r\n");
    let lines = match size {
        Size::Small => 2 + (client * 7 + n * 13) % 60,
        Size::Large => 9_000 + (client * 311 + n * 1_009) % 9_000,
    };
    for line in 0..lines {
        text += &format!(".{line:05} of {token}: the quick brown fox jumps over the lazy dog\r\n");
    }
    text.into_bytes()
}

fn token(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let start = text.find("Message-ID: <pl-")? + "Message-ID: <".len();
    Some(text[start..].split('@').next()?.to_string())
}

fn config(smtp: SocketAddr, spool: &std::path::Path, primary: SocketAddr) -> String {
    format!(
        "hostname = \"backup.example.test\"\n\n[smtp]\nlisten = [\"{smtp}\"]\nsender_auth = false\n\
         max_sessions_per_ip = 100\nmax_messages_per_ip_per_minute = 100000\n\
         max_recipients_per_ip_per_minute = 100000\n\n[relay]\ndomains = [\"example.test\"]\n\n\
         [dns]\nnameservers = [\"127.0.0.1:1\"]\n\n[queue]\ndir = \"{}\"\nmin_free = 0\n\
         first_retry = \"1s\"\nretry_interval = \"2s\"\n\n[routes]\n\"example.test\" = \"{primary}\"\n\n\
         [web]\nlisten = \"127.0.0.1:{}\"\n",
        spool.display(),
        free_port("127.0.0.1")
    )
}

/// What the senders saw: every message that got a 250 (queue ID, data) and every message sent.
#[derive(Default)]
struct Sent {
    acked: Vec<(String, Vec<u8>)>,
    all: HashMap<String, Vec<u8>>,
    /// Replies other than 250, or errors, before the power cut.
    failed: Vec<String>,
}

/// 20 senders, each sending one message after another until `stop`.
fn start_senders(
    size: Size,
    smtp: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> (Vec<std::thread::JoinHandle<()>>, Arc<Mutex<Sent>>) {
    let sent = Arc::new(Mutex::new(Sent::default()));
    let threads = (0..SENDERS)
        .map(|client| {
            let (stop, sent) = (Arc::clone(stop), Arc::clone(&sent));
            std::thread::spawn(move || {
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let data = payload(size, client, n);
                    sent.lock().expect("lock").all.insert(format!("pl-{client}-{n}"), data.clone());
                    match send_raw(smtp, "alice@sender.test", &["bob@example.test"], &data) {
                        Ok(reply) if reply.starts_with("250") => {
                            let id = queued_id(&reply).expect("queue ID in the 250 reply");
                            sent.lock().expect("lock").acked.push((id, data));
                        }
                        // After `stop`, the power cut: replies cut short, connections reset.
                        _ if stop.load(Ordering::SeqCst) => {}
                        failed => sent.lock().expect("lock").failed.push(format!("{failed:?}")),
                    }
                }
            })
        })
        .collect();
    (threads, sent)
}

/// Stops the senders however the test ends.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn wait_for_acks(sent: &Mutex<Sent>, count: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while sent.lock().expect("lock").acked.len() < count {
        let failed = sent.lock().expect("lock").failed.clone();
        assert!(failed.is_empty(), "sends failed before the power cut: {failed:?}");
        assert!(Instant::now() < deadline, "fewer than {count} messages acknowledged in {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 20 senders; then the power goes at a random moment. Returns what the senders saw.
fn load_then_cut(
    size: Size,
    rng: &mut fastrand::Rng,
    bartleby: &mut Daemon,
    fs: &mut LazyFs,
    watch: &SyncfsWatch,
) -> Sent {
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_senders_on_panic = StopOnDrop(Arc::clone(&stop));
    let (senders, sent) = start_senders(size, bartleby.smtp, &stop);
    let load_started = Instant::now();
    // However slow the machine: some messages are in the queue before the power goes.
    wait_for_acks(&sent, 2 * SENDERS, Duration::from_secs(30));
    // During the small load, a checkpoint writes journaled messages to their own files, makes them
    // durable with one syncfs, then deletes journal segments; the power goes during or after it.
    let checkpoint = (size == Size::Small).then(|| {
        std::thread::sleep(Duration::from_millis(rng.u64(300..1_000)));
        let config = bartleby.config_path.clone();
        std::thread::spawn(move || daemon::cli_with_config(&config, &["queue", "sync"]))
    });
    std::thread::sleep(Duration::from_millis(rng.u64(300..2_500)));
    let load = load_started.elapsed();
    let before_cut = fs.counters();

    // The senders finish the message each is sending (the kill cuts it short) and start no other.
    stop.store(true, Ordering::SeqCst);
    bartleby.kill();
    for sender in senders {
        sender.join().expect("sender thread");
    }
    if let Some(checkpoint) = checkpoint {
        let out = checkpoint.join().expect("checkpoint thread");
        let said = [String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)].concat();
        eprintln!("{size:?}: queue sync during the load: {}", said.trim());
    }
    let cut = fs.power_cut(Some(rng));
    let Sent { acked, all, failed } = std::mem::take(&mut *sent.lock().expect("lock"));
    assert!(failed.is_empty(), "{} sends failed before the power cut, e.g. {:?}", failed.len(), &failed[..1]);
    eprintln!(
        "{size:?}: {} acknowledged of {} sent in {load:?}; the daemon's fsync {}, fdatasync {}, directory fsync {}, \
         syncfs {}; the power cut dropped {cut:?}",
        acked.len(),
        all.len(),
        before_cut.fsync,
        before_cut.fdatasync,
        before_cut.fsyncdir,
        watch.seen()
    );

    Sent { acked, all, failed }
}

fn power_cut_loses_no_acknowledged_message(size: Size) {
    let started = Instant::now();
    let seed = std::env::var("POWER_LOSS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{size:?}: POWER_LOSS_SEED={seed}");
    if size == Size::Large {
        assert!(payload(size, 0, 0).len() > 512 * 1024, "large messages must not fit in the journal");
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    // Dropped last to first: the primary, the daemon (killed), the watch, the mount, the directory.
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).expect("mount point");
    let mut fs = LazyFs::mount(&spool);
    let watch = Arc::new(SyncfsWatch::start(&spool, fs.syncer()));
    let primary_addr: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().expect("addr");
    let prepare: daemon::Prepare = {
        let watch = Arc::clone(&watch);
        Arc::new(move |command: &mut std::process::Command| watch.prepare(command))
    };
    let mut bartleby = Daemon::start_prepared(dir.path(), Some(prepare), |smtp| config(smtp, &spool, primary_addr));
    // No sync here: the directories bartleby creates at its first start must be durable by its own
    // fsyncs before the first 250 (this test found that they were not).

    let Sent { acked, all, .. } = load_then_cut(size, &mut rng, &mut bartleby, &mut fs, &watch);

    bartleby.restart();
    check_queued(&bartleby, &acked, &all);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let primary = runtime.block_on(FakePrimary::start_at(primary_addr, Script::default()));
    let flushed = bartleby.cli(&["queue", "flush"]);
    assert!(flushed.status.success(), "queue flush: {}", String::from_utf8_lossy(&flushed.stderr));
    check_delivered(&bartleby, &primary, &acked, &all);
    assert!(bartleby.stop().success(), "bartleby did not stop cleanly:\n{}", bartleby.log());
    drop(primary);
    eprintln!("{size:?}: passed in {:?}", started.elapsed());
}

/// Every acknowledged message is queued, intact; anything else queued is a whole sent message.
fn check_queued(bartleby: &Daemon, acked: &[(String, Vec<u8>)], all: &HashMap<String, Vec<u8>>) {
    let listed: HashSet<String> =
        bartleby.queue().iter().filter_map(|m| m["id"].as_str().map(str::to_string)).collect();
    let bodies = bartleby.exported_bodies();
    let missing: Vec<&String> = acked.iter().map(|(id, _)| id).filter(|id| !listed.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages are gone after the power cut: {missing:?}\n{}",
        missing.len(),
        acked.len(),
        bartleby.log()
    );
    for (id, data) in acked {
        let stored = bodies.get(id).unwrap_or_else(|| panic!("no body exported for {id}"));
        assert!(strip_our_received(stored) == &data[..], "message {id} was changed by the power cut");
    }
    for id in &listed {
        let stored = bodies.get(id).unwrap_or_else(|| panic!("no body exported for listed {id}"));
        let sent = token(stored).and_then(|t| all.get(&t));
        assert!(
            sent.is_some_and(|s| strip_our_received(stored) == &s[..]),
            "queued message {id} is not a whole sent message"
        );
    }
}

/// Once the primary is back, every acknowledged message arrives with the bytes that were sent.
fn check_delivered(
    bartleby: &Daemon,
    primary: &FakePrimary,
    acked: &[(String, Vec<u8>)],
    all: &HashMap<String, Vec<u8>>,
) {
    let wanted: HashSet<String> = acked.iter().filter_map(|(_, data)| token(data)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let received = primary.messages();
        for message in &received {
            let sent = token(&message.body).and_then(|t| all.get(&t));
            assert!(
                sent.is_some_and(|s| strip_our_received(&message.body) == &s[..]),
                "the primary got a message that was not sent like this: {:?}",
                token(&message.body)
            );
        }
        let arrived: HashSet<String> = received.iter().filter_map(|m| token(&m.body)).collect();
        if wanted.is_subset(&arrived) && bartleby.queue().is_empty() {
            return;
        }
        let missing: Vec<&String> = wanted.difference(&arrived).take(5).collect();
        assert!(Instant::now() < deadline, "not delivered within 60 s: {missing:?}\n{}", bartleby.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn journaled_messages_survive_a_power_cut() {
    power_cut_loses_no_acknowledged_message(Size::Small);
}

#[test]
fn messages_in_their_own_files_survive_a_power_cut() {
    power_cut_loses_no_acknowledged_message(Size::Large);
}

/// Why the watch exists: Linux does not forward `syncfs` (coreutils' `sync -f`) to a /dev/fuse
/// server, so without the watch the data it should have made durable is lost; with it, kept.
#[test]
fn syncfs_reaches_the_test_filesystem_only_through_the_watch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fs = LazyFs::mount(dir.path());
    let watch = SyncfsWatch::start(dir.path(), fs.syncer());
    let file = dir.path().join("file");
    for watched in [false, true] {
        std::fs::write(&file, format!("watched: {watched}")).expect("write");
        // The name is made durable; the data is left to syncfs.
        std::fs::File::open(dir.path()).and_then(|d| d.sync_all()).expect("fsync the directory");
        let mut sync = std::process::Command::new("sync");
        sync.arg("-f").arg(&file);
        if watched {
            watch.prepare(&mut sync);
        }
        assert!(sync.status().expect("run sync -f").success());
        fs.power_cut(None);
        let kept = std::fs::read(&file).expect("the file's name was made durable");
        assert_eq!(kept.is_empty(), !watched, "watched {watched}: kept {:?}", String::from_utf8_lossy(&kept));
    }
    assert_eq!(watch.seen(), 1);
}

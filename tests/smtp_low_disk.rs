//! Low disk space: with less than `queue.min_free` free on the spool's filesystem, MAIL gets
//! 452 4.3.1, and acceptance resumes by itself once space returns. The spool lives on a small tmpfs
//! mounted by the test (tests run as root).

#[path = "support/smtp_harness.rs"]
mod smtp_harness;

use bartleby::spool::Queue as _;
use smtp_harness::{Harness, python, stdout};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// An 8 MiB tmpfs, unmounted on drop (also when the test fails).
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount() -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).expect("mountpoint");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs (needs root)");
        Tmpfs { path, _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.path).status().is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds a file open there: detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// EHLO, MAIL and (when MAIL is accepted) a whole message; prints the MAIL reply.
const TRY_MAIL: &str = r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='client.test', timeout=20)
s.ehlo()
code, text = s.mail('a@b.test')
print('MAIL', code, text.decode())
if code == 250:
    s.rcpt('x@example.test')
    print('DATA', s.data(b'Subject: space\r\n\r\nok\r\n'))
s.quit()
"#;

/// Sends a 2 MiB message and prints the error.
const BIG_MESSAGE: &str = r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='client.test', timeout=20)
try:
    s.sendmail('a@b.test', ['x@example.test'], b'Subject: big\r\n\r\n' + (b'y' * 998 + b'\r\n') * 2048)
except smtplib.SMTPException as e:
    print('ERROR', repr(e))
s.quit()
"#;

fn fill(path: &Path, bytes: usize) {
    std::fs::write(path, vec![0u8; bytes]).expect("write filler");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_space_refuses_mail_until_space_returns() {
    let tmpfs = Tmpfs::mount();
    let spool_dir = tmpfs.path.join("spool");
    let filler = tmpfs.path.join("filler");
    let test = async {
        let dir = tempfile::tempdir().expect("tempdir");
        let harness = Harness::start_in(dir, &spool_dir, |c| c.queue.min_free = 4 * 1024 * 1024).await;
        let text = stdout(&python(&harness, TRY_MAIL, &[]).await);
        assert!(text.contains("MAIL 250 2.1.0 Ok"), "{text}");
        fill(&filler, 6 * 1024 * 1024);
        // The free-space check is cached for up to a second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let text = stdout(&python(&harness, TRY_MAIL, &[]).await);
        assert!(text.contains("MAIL 452 4.3.1 insufficient system storage"), "{text}");
        std::fs::remove_file(&filler).expect("remove filler");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let text = stdout(&python(&harness, TRY_MAIL, &[]).await);
        assert!(text.contains("MAIL 250 2.1.0 Ok"), "{text}");
        assert!(text.contains("DATA (250, b'2.0.0 Ok: queued as "), "{text}");
        assert_eq!(harness.spool.len(), 2);
        harness.stop().await.expect("serve");
    };
    tokio::time::timeout(Duration::from_secs(90), test).await.expect("test finished in time");
    drop(tmpfs);
}

/// A write that fails (the filesystem is full) gets 451 4.3.0 and leaves nothing queued or half-written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_gets_451_and_queues_nothing() {
    let tmpfs = Tmpfs::mount();
    let spool_dir = tmpfs.path.join("spool");
    let test = async {
        let dir = tempfile::tempdir().expect("tempdir");
        let harness = Harness::start_in(dir, &spool_dir, |c| c.queue.min_free = 0).await;
        fill(&tmpfs.path.join("filler"), 7 * 1024 * 1024);
        let text = stdout(&python(&harness, BIG_MESSAGE, &[]).await);
        assert!(text.contains("SMTPDataError(451, b'4.3.0 error: queue file write error')"), "{text}");
        assert!(harness.spool.is_empty());
        let incoming = std::fs::read_dir(spool_dir.join("incoming")).expect("incoming").count();
        assert_eq!(incoming, 0, "half-written file left in incoming/");
        harness.stop().await.expect("serve");
    };
    tokio::time::timeout(Duration::from_secs(90), test).await.expect("test finished in time");
    drop(tmpfs);
}

/// Sends a 300 KiB message (small enough for the journal) and prints the outcome.
const JOURNALED_MESSAGE: &str = r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='client.test', timeout=20)
try:
    s.sendmail('a@b.test', ['x@example.test'], b'Subject: journaled\r\n\r\n' + (b'z' * 998 + b'\r\n') * 300)
    print('SENT')
except smtplib.SMTPException as e:
    print('ERROR', repr(e))
s.quit()
"#;

/// A journal append that fails (the filesystem is full) gets 451 4.3.0 and queues nothing; once
/// space returns, the same message is accepted, and the journal is still readable after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_journal_write_gets_451_and_the_journal_stays_readable() {
    let tmpfs = Tmpfs::mount();
    let spool_dir = tmpfs.path.join("spool");
    let filler = tmpfs.path.join("filler");
    let test = async {
        let dir = tempfile::tempdir().expect("tempdir");
        let harness = Harness::start_in(dir, &spool_dir, |c| c.queue.min_free = 0).await;
        // Leave about 100 KiB free: less than the 300 KiB record.
        let free = bartleby::spool::space_of(&tmpfs.path).expect("statvfs").free_bytes as usize;
        fill(&filler, free.saturating_sub(100 * 1024));
        let text = stdout(&python(&harness, JOURNALED_MESSAGE, &[]).await);
        assert!(text.contains("SMTPDataError(451, b'4.3.0 error: queue file write error')"), "{text}");
        assert!(harness.spool.is_empty());
        std::fs::remove_file(&filler).expect("free the space");
        let text = stdout(&python(&harness, JOURNALED_MESSAGE, &[]).await);
        assert!(text.contains("SENT"), "{text}");
        assert_eq!(harness.spool.len(), 1);
        let id = harness.spool.list()[0].id.clone();
        let body = harness.spool.read_body(&id).expect("body");
        assert_eq!(body.len() as u64, harness.spool.list()[0].size);
        assert!(body.ends_with(&[b"z".repeat(998), b"\r\n".to_vec()].concat()));
        harness.stop().await.expect("serve");
        // Reopened, the segment reads to its end: the failed write left no torn record before the
        // accepted one.
        let (spool, recovery) = bartleby::spool::Spool::open(&spool_dir).expect("reopen");
        assert_eq!(recovery.queued, 1);
        assert!(spool.get(&id).is_some());
    };
    tokio::time::timeout(Duration::from_secs(90), test).await.expect("test finished in time");
    drop(tmpfs);
}

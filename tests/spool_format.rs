//! A newer bartleby reads a spool written by an older one: `tests/fixtures/spool-v1` is a spool in
//! the version 1 format (docs/spool.md), kept as it was written; `tests/fixtures/spool-journal-v1`
//! is a journal segment (`BJR1` records) left by a daemon killed with SIGKILL.

use bartleby::spool::Queue as _;
use bartleby::spool::{BodyType, DsnNotify, DsnRet, RecipientStatus, Spool};
use std::path::Path;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

#[test]
fn version_1_spool_is_read_by_this_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spool-v1"), dir.path());
    let (spool, recovery) = Spool::open(dir.path()).expect("open v1 spool");
    assert_eq!((recovery.queued, recovery.removed_partial, recovery.quarantined), (2, 0, 0));

    let first = spool.get("0005F2A1B3C4D000").expect("first message");
    assert_eq!(first.sender, "alice@sender.test");
    assert_eq!(first.attempts, 1);
    assert_eq!(first.last_error(), Some("connect to 127.0.0.2:25: Connection refused"));
    assert_eq!(first.body, BodyType::SevenBit);
    let body = spool.read_body(&first.id).expect("body");
    assert!(body.ends_with(b"\r\n.a dot line\r\nbody\r\n"));
    assert_eq!(body.len() as u64, first.size);

    let second = spool.get("0005F2A1B3C4D001").expect("second message");
    assert!(second.sender.is_empty() && second.held);
    assert_eq!(second.ret, Some(DsnRet::Hdrs));
    assert_eq!(second.envid.as_deref(), Some("QQ314159"));
    assert_eq!(second.body, BodyType::EightBitMime);
    assert_eq!(second.recipients[0].notify, Some(vec![DsnNotify::Failure, DsnNotify::Delay]));
    assert_eq!(second.recipients[1].status, RecipientStatus::Delivered);
    assert_eq!(second.pending().count(), 1);
    assert!(spool.new_id().as_str() > "0005F2A1B3C4D001");
}

/// Written by the daemon: three messages accepted, the second held, the third deleted, then SIGKILL.
#[test]
fn journal_v1_segment_is_read_by_this_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spool-journal-v1"), dir.path());
    let (spool, recovery) = Spool::open(dir.path()).expect("open the spool");
    assert_eq!((recovery.queued, recovery.replayed, recovery.quarantined), (2, 2, 0));
    let first = spool.get("6616D270AC997000").expect("first message");
    assert_eq!(first.sender, "alice@sender.test");
    assert!(!first.held);
    let body = spool.read_body(&first.id).expect("body");
    assert!(body.starts_with(b"Received: from "));
    assert!(String::from_utf8_lossy(&body).contains("journaled message 1"));
    assert_eq!(body.len() as u64, first.size);
    assert!(spool.get("6616D270BCB20000").expect("second message").held, "the envelope record applies");
    assert!(spool.get("6616D270CD950000").is_none(), "the forget record applies");
    assert!(spool.new_id().as_str() > "6616D270BCB20000");
}

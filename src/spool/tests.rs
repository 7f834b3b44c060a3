use super::*;
use std::os::unix::fs::PermissionsExt;

fn open(path: &Path) -> Arc<Spool> {
    Arc::new(Spool::open(path).expect("open spool").0)
}

fn envelope(spool: &Spool, id: &str) -> Envelope {
    let _ = spool;
    Envelope::new(id.to_string(), "a@sender.test".into(), vec![Recipient::new("b@example.test".into())])
}

fn put(spool: &Arc<Spool>, data: &[u8]) -> Envelope {
    let id = spool.new_id();
    let mut msg = std::sync::Arc::clone(spool).incoming(&id).expect("incoming");
    msg.write(data).expect("write");
    msg.commit(envelope(spool, &id)).expect("commit")
}

#[test]
fn committed_message_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let env = put(&spool, b"Subject: hi\r\n\r\nbody\r\n");
    assert_eq!(env.size, 21);
    drop(spool);
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    let spool = Arc::new(spool);
    assert_eq!(recovery.queued, 1);
    assert_eq!(spool.get(&env.id), Some(env.clone()));
    assert_eq!(spool.read_body(&env.id).unwrap(), b"Subject: hi\r\n\r\nbody\r\n");
    assert_eq!(spool.read_headers(&env.id, 1000).unwrap(), b"Subject: hi\r\n");
}

#[test]
fn uncommitted_message_never_appears() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let id = spool.new_id();
    let mut msg = std::sync::Arc::clone(&spool).incoming(&id).unwrap();
    msg.write(b"half a mess").unwrap();
    drop(msg);
    assert!(spool.is_empty());
    assert_eq!(fs::read_dir(dir.path().join(INCOMING)).unwrap().count(), 0);
}

#[test]
fn recovery_removes_leftovers_of_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let kept = put(&spool, b"x\r\n");
    drop(spool);
    // What a kill -9 can leave: a body being written, a body without envelope, an envelope without body.
    fs::write(dir.path().join("incoming/0000000000001000.msg"), b"partial").unwrap();
    fs::write(dir.path().join("messages/0000000000002000.msg"), b"orphan").unwrap();
    fs::write(dir.path().join("messages/0000000000003000.env"), b"{}").unwrap();
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    let spool = Arc::new(spool);
    assert_eq!(recovery.queued, 1);
    assert_eq!(recovery.removed_partial, 3);
    assert_eq!(spool.list().len(), 1);
    assert_eq!(spool.list()[0].id, kept.id);
}

#[test]
fn corrupt_envelope_is_quarantined_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let env = put(&spool, b"x\r\n");
    assert!(spool.checkpoint(LIMIT));
    drop(spool);
    fs::write(dir.path().join(format!("messages/{}.env", env.id)), b"not json").unwrap();
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    let spool = Arc::new(spool);
    assert_eq!(recovery.quarantined, 1);
    assert!(spool.is_empty());
    assert!(dir.path().join(format!("corrupt/{}.env", env.id)).exists());
    assert!(dir.path().join(format!("corrupt/{}.msg", env.id)).exists());
}

#[test]
fn ids_sort_by_arrival_and_are_unique() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let ids: Vec<_> = (0..5000).map(|_| spool.new_id()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted);
    assert!(ids.iter().all(|id| is_queue_id(id)));
    assert!(!is_queue_id("../../etc/passwd"));
}

#[test]
fn ids_keep_increasing_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let env = put(&spool, b"x\r\n");
    drop(spool);
    let spool = open(dir.path());
    assert!(spool.new_id() > env.id);
}

#[test]
fn update_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let mut env = put(&spool, b"x\r\n");
    env.held = true;
    env.record("held by test");
    spool.update(std::slice::from_ref(&env)).unwrap();
    drop(spool);
    let spool = open(dir.path());
    assert!(spool.get(&env.id).unwrap().held);
    spool.delete(&env.id).unwrap();
    assert!(spool.get(&env.id).is_none());
    assert!(matches!(spool.delete(&env.id), Err(SpoolError::NotFound(_))));
    assert!(matches!(spool.update(std::slice::from_ref(&env)), Err(SpoolError::NotFound(_))));
    assert_eq!(fs::read_dir(dir.path().join(MESSAGES)).unwrap().count(), 0);
}

#[test]
fn queued_mail_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let spool = open(&root);
    let env = put(&spool, b"secret\r\n");
    assert_eq!(mode_of(&fs::read_dir(root.join(JOURNAL)).unwrap().next().unwrap().unwrap().path()), 0o600);
    assert!(spool.checkpoint(LIMIT));
    let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(root.clone()), 0o700);
    assert_eq!(mode(root.join(MESSAGES)), 0o700);
    assert_eq!(mode(root.join(format!("messages/{}.msg", env.id))), 0o600);
    assert_eq!(mode(root.join(format!("messages/{}.env", env.id))), 0o600);
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn one_owner_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let _spool = open(dir.path());
    assert!(matches!(Spool::open(dir.path()), Err(SpoolError::Locked(_))));
}

#[test]
fn space_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let space = spool.space().unwrap();
    assert!(space.total_bytes > 0 && space.free_bytes <= space.total_bytes);
}

/// Documents are replaced by compare-and-set and survive a restart of the store.
#[test]
fn documents_compare_and_set_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        assert_eq!(spool.document("chart").unwrap(), None);
        assert!(!spool.replace_document("chart", Some(1), b"stale".to_vec()).unwrap());
        assert!(spool.replace_document("chart", None, b"one".to_vec()).unwrap());
        assert!(!spool.replace_document("chart", None, b"again".to_vec()).unwrap(), "written by then");
        let (version, body) = spool.document("chart").unwrap().unwrap();
        assert_eq!(body, b"one");
        assert!(spool.replace_document("chart", Some(version), b"two".to_vec()).unwrap());
        assert!(!spool.replace_document("chart", Some(version), b"lost".to_vec()).unwrap());
        assert!(spool.document("../etc").is_err(), "a name is never a path");
    }
    let spool = open(dir.path());
    let (version, body) = spool.document("chart").unwrap().unwrap();
    assert_eq!(body, b"two");
    assert!(spool.replace_document("chart", Some(version), b"three".to_vec()).unwrap());
    let memory = crate::spool::MemoryQueue::new();
    assert!(memory.replace_document("alerts", None, b"x".to_vec()).unwrap());
    assert!(!memory.replace_document("alerts", None, b"y".to_vec()).unwrap());
    assert_eq!(memory.document("alerts").unwrap(), Some((1, b"x".to_vec())));
}

#[test]
fn batch_update_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let mut envs: Vec<_> = (0..3).map(|_| put(&spool, b"x\r\n")).collect();
    for env in &mut envs {
        env.attempts = 7;
    }
    spool.update(&envs).unwrap();
    assert!(spool.list().iter().all(|e| e.attempts == 7));
    let ids: Vec<_> = envs.iter().map(|e| e.id.clone()).collect();
    spool.remove(&ids[..2]).unwrap();
    assert_eq!(spool.list().len(), 1);
    drop(spool);
    let spool = open(dir.path());
    assert_eq!(spool.list().len(), 1);
    assert_eq!(spool.list()[0].id, ids[2]);
}

#[test]
fn export_and_import_keep_envelopes_bodies_and_order() {
    let from = tempfile::tempdir().unwrap();
    let spool = open(from.path());
    let mut envs: Vec<_> = (0..3).map(|i| put(&spool, format!("Subject: {i}\r\n\r\n.dot\r\n").as_bytes())).collect();
    envs[1].held = true;
    spool.update(std::slice::from_ref(&envs[1])).unwrap();
    let mut exported = Vec::new();
    assert_eq!(export(from.path(), &mut exported).unwrap(), 3);

    let to = tempfile::tempdir().unwrap();
    let target = open(to.path());
    let older_local = put(&target, b"local\r\n");
    let (imported, skipped) = target.import(&mut &exported[..]).unwrap();
    assert_eq!((imported, skipped), (3, 0));
    assert_eq!(target.import(&mut &exported[..]).unwrap(), (0, 3), "a second import skips what is there");
    let listed = target.list();
    assert_eq!(listed.len(), 4);
    for env in &envs {
        let got = target.get(&env.id).expect("imported under its ID");
        assert_eq!(got.held, env.held);
        assert_eq!(got.arrived, env.arrived);
        assert_eq!(target.read_body(&env.id).unwrap(), spool.read_body(&env.id).unwrap());
    }
    assert!(target.new_id() > listed.last().unwrap().id);
    let _ = older_local;
    assert!(matches!(target.import(&mut &b"garbage\n"[..]), Err(SpoolError::Io { .. })));
}

#[test]
fn concurrent_commits_share_directory_syncs_and_all_survive() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let spool = Arc::clone(&spool);
            std::thread::spawn(move || {
                (0..20).map(|n| put(&spool, format!("m {t} {n}\r\n").as_bytes()).id).collect::<Vec<_>>()
            })
        })
        .collect();
    let ids: Vec<String> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(ids.len(), 320);
    drop(spool);
    let spool = open(dir.path());
    assert_eq!(spool.len(), 320);
    assert!(ids.iter().all(|id| spool.get(id).is_some()));
}

#[test]
fn noted_bookkeeping_is_in_memory_until_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let mut env = put(&spool, b"x\r\n");
    env.attempts = 3;
    env.recipients[0].last_error = Some("connect: refused".into());
    spool.note(vec![env.clone()]);
    assert_eq!(spool.get(&env.id).unwrap().attempts, 3, "listings see it at once");
    drop(spool);
    let spool = open(dir.path());
    assert_eq!(spool.get(&env.id).unwrap().attempts, 0, "a crash loses only the bookkeeping");
    spool.note(vec![env.clone()]);
    assert_eq!(spool.persist().unwrap(), 1);
    assert_eq!(spool.persist().unwrap(), 0, "nothing left to write");
    drop(spool);
    let spool = open(dir.path());
    assert_eq!(spool.get(&env.id).unwrap().last_error(), Some("connect: refused"));
}

/// What a power loss right after the last call leaves: the journal is not retired, and files that
/// were never fsync'd may be gone or torn.
fn crash(spool: Arc<Spool>) {
    let mut spool = Arc::try_unwrap(spool).unwrap_or_else(|_| panic!("spool still shared"));
    spool.journal.halt();
    drop(spool);
}

fn segments_in(root: &Path) -> usize {
    fs::read_dir(root.join(JOURNAL)).unwrap().count()
}

/// Waits until the journal's first segment is retired. (Segment counts alone depend on timing: a
/// segment with records is also closed after 5 s, which a slow test run can reach.)
fn wait_for_first_segment_to_go(root: &Path, what: &str) {
    let first = root.join(JOURNAL).join(format!("{:016}.wal", 1));
    let deadline = std::time::Instant::now() + LIMIT;
    while first.exists() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn files_in(root: &Path) -> usize {
    fs::read_dir(root.join(MESSAGES)).unwrap().count()
}

const LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

#[test]
fn journaled_messages_need_no_files_and_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let first = put(&spool, b"Subject: one\r\n\r\nbody\r\n");
    let second = put(&spool, b"Subject: two\r\n\r\nbody\r\n");
    assert_eq!(files_in(dir.path()), 0, "no file is created per message");
    assert_eq!(spool.read_body(&second.id).unwrap(), b"Subject: two\r\n\r\nbody\r\n");
    assert_eq!(spool.read_headers(&second.id, 1000).unwrap(), b"Subject: two\r\n");
    crash(spool);
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    assert_eq!((recovery.queued, recovery.replayed, recovery.quarantined), (2, 2, 0));
    assert_eq!(spool.get(&first.id), Some(first.clone()));
    assert_eq!(spool.get(&second.id), Some(second.clone()));
    assert_eq!(spool.read_body(&first.id).unwrap(), b"Subject: one\r\n\r\nbody\r\n");
    assert!(dir.path().join(JOURNAL).join(format!("{:016}.wal", 1)).exists(), "kept until retired");
    assert!(segments_in(dir.path()) >= 2, "and a fresh one is open");
}

#[test]
fn removed_or_updated_journaled_messages_stay_that_way_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let delivered = put(&spool, b"delivered\r\n");
    let delivered_too = put(&spool, b"delivered too\r\n");
    let mut updated = put(&spool, b"updated\r\n");
    spool.delete(&delivered.id).unwrap();
    assert!(matches!(spool.delete(&delivered.id), Err(SpoolError::NotFound(_))));
    spool.remove(std::slice::from_ref(&delivered_too.id)).unwrap();
    updated.held = true;
    spool.update(std::slice::from_ref(&updated)).unwrap();
    assert_eq!(files_in(dir.path()), 0, "a change of state is one more record, not files");
    crash(spool);
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    assert_eq!(recovery.queued, 1);
    assert!(spool.get(&delivered.id).is_none(), "a delivered message must not come back");
    assert!(spool.get(&delivered_too.id).is_none());
    assert!(spool.get(&updated.id).unwrap().held, "the later, durable envelope wins over the record");
    assert_eq!(spool.read_body(&updated.id).unwrap(), b"updated\r\n");
}

#[test]
fn a_torn_journal_tail_keeps_the_records_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let kept = put(&spool, b"kept\r\n");
    crash(spool);
    let segment = fs::read_dir(dir.path().join(JOURNAL)).unwrap().next().unwrap().unwrap().path();
    let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
    file.write_all(b"BJR1\x01half a record").unwrap();
    drop(file);
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    assert_eq!((recovery.queued, recovery.replayed), (1, 1));
    assert_eq!(spool.read_body(&kept.id).unwrap(), b"kept\r\n");
}

#[test]
fn files_torn_by_a_crash_are_rewritten_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let mut env = put(&spool, b"Subject: whole\r\n\r\nbody\r\n");
    env.held = true;
    spool.update(std::slice::from_ref(&env)).unwrap();
    crash(spool);
    // As if the files had been written by a retirement that a power loss interrupted.
    fs::write(dir.path().join(format!("messages/{}.msg", env.id)), b"Subj").unwrap();
    fs::write(dir.path().join(format!("messages/{}.env", env.id)), b"{\"id\":").unwrap();
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    assert_eq!((recovery.queued, recovery.replayed, recovery.quarantined), (1, 1, 0));
    assert_eq!(spool.read_body(&env.id).unwrap(), b"Subject: whole\r\n\r\nbody\r\n");
    assert!(spool.get(&env.id).unwrap().held, "the latest journaled envelope replaces a torn one");
}

#[test]
fn a_checkpoint_gives_every_message_its_files_and_empties_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let mut env = put(&spool, b"x\r\n");
    env.attempts = 4;
    spool.update(std::slice::from_ref(&env)).unwrap();
    assert!(spool.checkpoint(LIMIT));
    assert_eq!(files_in(dir.path()), 2);
    let written: Envelope =
        serde_json::from_slice(&fs::read(dir.path().join(format!("messages/{}.env", env.id))).unwrap()).unwrap();
    assert_eq!(written.attempts, 4, "the files carry the latest envelope");
    assert_eq!(segments_in(dir.path()), 1, "only the fresh, empty segment is left");
    assert_eq!(spool.read_body(&env.id).unwrap(), b"x\r\n");
    crash(spool);
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    assert_eq!((recovery.queued, recovery.replayed), (1, 0));
    assert!(spool.get(&env.id).is_some());
}

#[test]
fn a_large_message_bypasses_the_journal_and_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let big: Vec<u8> = (0..journal::MAX_JOURNALED_BODY + 10).map(|i| b'a' + (i % 26) as u8).collect();
    let id = spool.new_id();
    let mut msg = std::sync::Arc::clone(&spool).incoming(&id).unwrap();
    msg.write(&big[..1000]).unwrap();
    msg.write(&big[1000..]).unwrap();
    assert!(dir.path().join(format!("incoming/{id}.msg")).exists(), "spilled to a file");
    let env = msg.commit(envelope(&spool, &id)).unwrap();
    assert_eq!(env.size, big.len() as u64);
    crash(spool);
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    assert_eq!((recovery.queued, recovery.replayed), (1, 0), "fsync'd on its own, not journaled");
    assert_eq!(spool.read_body(&id).unwrap(), big);
}

#[test]
fn a_spilled_message_dropped_uncommitted_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let id = spool.new_id();
    let mut msg = std::sync::Arc::clone(&spool).incoming(&id).unwrap();
    msg.write(&vec![b'x'; journal::MAX_JOURNALED_BODY + 1]).unwrap();
    drop(msg);
    assert_eq!(fs::read_dir(dir.path().join(INCOMING)).unwrap().count(), 0);
    assert!(spool.is_empty());
}

#[test]
fn a_segment_whose_messages_are_all_delivered_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    // 40 bodies of 450 KiB fill more than one 16 MiB segment.
    let body = vec![b'x'; 450 * 1024];
    let ids: Vec<_> = (0..40).map(|_| put(&spool, &body).id).collect();
    assert!(segments_in(dir.path()) >= 2);
    spool.remove(&ids[..37]).unwrap();
    wait_for_first_segment_to_go(dir.path(), "the delivered segment was never deleted");
    assert_eq!(files_in(dir.path()), 0, "nothing was written out for delivered mail");
    crash(spool);
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    assert_eq!(recovery.queued, 3);
    assert!(ids[37..].iter().all(|id| spool.read_body(id).unwrap() == body));
}

#[test]
fn a_clean_shutdown_leaves_segments_only_where_mail_waits() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let delivered = put(&spool, b"delivered\r\n");
    spool.delete(&delivered.id).unwrap();
    drop(spool);
    assert_eq!(segments_in(dir.path()), 0, "nothing queued, nothing left in the journal");
    let spool = open(dir.path());
    let waiting = put(&spool, b"waiting\r\n");
    drop(spool);
    assert_eq!(segments_in(dir.path()), 1, "the segment holding queued mail stays");
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    assert_eq!((recovery.queued, recovery.replayed), (1, 1));
    assert_eq!(spool.read_body(&waiting.id).unwrap(), b"waiting\r\n");
}

#[test]
fn a_mostly_delivered_segment_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let body = vec![b'y'; 450 * 1024];
    let ids: Vec<_> = (0..40).map(|_| put(&spool, &body).id).collect();
    // A survivor's latest envelope is a record in a later segment; the copy must carry it.
    let mut held = spool.get(&ids[0]).unwrap();
    held.held = true;
    spool.update(std::slice::from_ref(&held)).unwrap();
    // Of the first segment's 37 messages, 2 still wait: under a quarter of it is still needed.
    spool.remove(&ids[2..37]).unwrap();
    wait_for_first_segment_to_go(dir.path(), "the mostly delivered segment was never compacted");
    assert_eq!(files_in(dir.path()), 0, "the two survivors were copied within the journal");
    assert!(ids[..2].iter().all(|id| spool.read_body(id).unwrap() == body));
    crash(spool);
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    assert_eq!(recovery.queued, 5);
    assert!(ids[..2].iter().chain(&ids[37..]).all(|id| spool.read_body(id).unwrap() == body));
    assert!(spool.get(&ids[0]).unwrap().held && !spool.get(&ids[1]).unwrap().held);
}

#[test]
fn many_removals_with_files_unlink_everything_on_several_threads() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let ids: Vec<_> = (0..40).map(|n| put(&spool, format!("m {n}\r\n").as_bytes()).id).collect();
    assert!(spool.checkpoint(LIMIT));
    assert_eq!(files_in(dir.path()), 80);
    spool.remove(&ids[..39]).unwrap();
    assert_eq!(files_in(dir.path()), 2);
    assert_eq!(spool.list().len(), 1);
    crash(spool);
    let (spool, recovery) = Spool::open(dir.path()).unwrap();
    assert_eq!(recovery.queued, 1);
    assert!(spool.get(&ids[39]).is_some());
}

/// An offline `bartleby queue ...` run as root must not leave files the daemon (the spool's owner)
/// cannot read: what root creates in the spool is given to the spool's owner.
#[test]
fn files_root_creates_in_someone_elses_spool_are_theirs() {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root (CI runs the tests as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    fs::create_dir(&root).unwrap();
    let nobody = (rustix::fs::Uid::from_raw(65534), rustix::fs::Gid::from_raw(65534));
    rustix::fs::chown(&root, Some(nobody.0), Some(nobody.1)).unwrap();
    let spool = open(&root);
    let mut env = put(&spool, b"x\r\n");
    env.held = true;
    spool.update(std::slice::from_ref(&env)).unwrap();
    assert!(spool.checkpoint(LIMIT));
    let owned_by_nobody = |path: &Path| fs::metadata(path).unwrap().uid() == 65534;
    for sub in [MESSAGES, INCOMING, JOURNAL] {
        assert!(owned_by_nobody(&root.join(sub)), "{sub}/");
    }
    for entry in fs::read_dir(root.join(MESSAGES)).unwrap().chain(fs::read_dir(root.join(JOURNAL)).unwrap()) {
        let path = entry.unwrap().path();
        assert!(owned_by_nobody(&path), "{}", path.display());
    }
}

/// The failure of issue 12: a delivery was given a body's location (segment and offset) when it
/// was scheduled; compaction then copied the message forward and deleted the segment, and the
/// delivery opened a file that was gone. A body is now opened through the store, by ID, and an open
/// body stays readable whatever the store does meanwhile.
#[test]
fn a_body_being_read_survives_the_compaction_and_retirement_of_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let body = vec![b'z'; 450 * 1024];
    let ids: Vec<_> = (0..40).map(|_| put(&spool, &body).id).collect();
    // A delivery holds the first message's body, read partly, while the store compacts.
    let mut held = spool.open_body(&ids[0]).expect("open").into_reader();
    let mut start = vec![0; 1000];
    std::io::Read::read_exact(&mut held, &mut start).expect("read the start");
    spool.remove(&ids[2..37]).unwrap();
    wait_for_first_segment_to_go(dir.path(), "the mostly delivered segment was never compacted");
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut held, &mut rest).expect("the rest, from the retired segment");
    start.extend(rest);
    assert!(start == body, "the held body read whole and unchanged");
    // A delivery that opens the body only now finds its new place.
    assert_eq!(spool.read_body(&ids[1]).expect("moved body"), body);
    drop(held);
}

/// Readers race compaction: bodies are opened and read over and over while segments are compacted
/// and retired under them; not one read may fail.
#[test]
fn bodies_read_during_compaction_never_fail() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let body = vec![b'w'; 450 * 1024];
    let ids: Vec<_> = (0..40).map(|_| put(&spool, &body).id).collect();
    let survivors = [ids[0].clone(), ids[1].clone()];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (spool, stop) = (Arc::clone(&spool), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for id in &survivors {
                    assert_eq!(spool.read_body(id).expect("a body read during compaction").len(), 450 * 1024);
                    reads += 1;
                }
            }
            reads
        })
    };
    spool.remove(&ids[2..37]).unwrap();
    wait_for_first_segment_to_go(dir.path(), "the mostly delivered segment was never compacted");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().expect("no failed read") > 0);
}

/// The in-memory store answers the same queries as the local one.
#[test]
fn the_memory_store_and_the_local_store_answer_queries_alike() {
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn Queue> = open(dir.path());
    let memory: Arc<dyn Queue> = MemoryQueue::new();
    for queue in [&local, &memory] {
        for (sender, rcpts, held) in [
            ("a@s.test", vec!["x@example.test"], false),
            ("", vec!["y@example.test", "z@other.test"], false),
            ("b@s.test", vec!["q@OTHER.test."], true),
        ] {
            let id = queue.new_id();
            let mut message = Arc::clone(queue).incoming(&id).unwrap();
            message.write(b"Subject: hi\r\n\r\nbody\r\n").unwrap();
            let mut envelope =
                Envelope::new(id.clone(), sender.into(), rcpts.iter().map(|r| Recipient::new(r.to_string())).collect());
            envelope.held = held;
            message.commit(envelope).unwrap();
        }
    }
    for queue in [&local, &memory] {
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.count(&Filter::domain("other.test")), 2);
        assert_eq!(queue.count(&Filter { held: Some(false), ..Filter::domain("other.test") }), 1);
        assert_eq!(queue.count(&Filter { sender: Some("<>".into()), ..Filter::default() }), 1);
        assert_eq!(queue.count(&Filter { recipient: Some("Y@EX".into()), ..Filter::default() }), 1);
        let page = queue.query(&Filter::all(), Page { offset: 1, limit: 1 });
        assert_eq!((page.total, page.matched, page.envelopes.len()), (3, 3, 1));
        let stats = queue.stats();
        assert_eq!((stats.messages, stats.held), (3, 1));
        assert_eq!(stats.domains["other.test"].messages, 2);
        assert_eq!(stats.domains["example.test"].messages, 2);
        let shape = queue.shape(now_micros());
        assert_eq!(shape["other.test"][0], 2, "both arrived in the last 5 minutes");
        let all = DueQuery { after: None, until: i64::MAX, domain: None, except: &[], limit: 10 };
        assert_eq!(queue.due(&all).len(), 2, "held mail is not due");
        let first = page.envelopes[0].id.clone();
        assert_eq!(queue.read_headers(&first, 1024).unwrap(), b"Subject: hi\r\n");
        assert!(queue.set_held(&first, true).unwrap().held);
        assert_eq!(queue.due(&all).len(), 1);
        queue.delete(&first).unwrap();
        assert!(matches!(queue.delete(&first), Err(SpoolError::NotFound(_))));
        assert!(matches!(queue.open_body(&first), Err(SpoolError::NotFound(_))));
    }
}

#[test]
fn atomic_write_replaces_a_file_privately_and_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    atomic_write(&path, b"old").unwrap();
    atomic_write(&path, b"new").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new");
    assert_eq!(mode_of(&path) & 0o777, 0o600);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    let missing = dir.path().join("no-such-dir").join("x");
    assert!(matches!(atomic_write(&missing, b"x"), Err(SpoolError::Io { .. })));
}

/// An absurd arrival time (a damaged envelope, an import) must not panic the queries on overflow.
#[test]
fn queries_over_an_absurd_arrival_time_do_not_overflow() {
    let queue = MemoryQueue::new();
    let id = queue.new_id();
    let mut message = Arc::clone(&queue).incoming(&id).unwrap();
    message.write(b"x\r\n").unwrap();
    let mut envelope = Envelope::new(id, "a@s.test".into(), vec![Recipient::new("b@example.test".into())]);
    envelope.arrived = i64::MIN;
    message.commit(envelope).unwrap();
    let shape = queue.shape(i64::MAX);
    assert_eq!(shape["example.test"].iter().sum::<usize>(), 1);
    let old = Filter { older_than: Some(std::time::Duration::from_secs(60)), ..Filter::default() };
    assert_eq!(queue.count(&old), 1);
    assert_eq!(queue.stats().oldest, Some(i64::MIN));
}

#[test]
fn a_body_spilled_in_many_chunks_is_written_whole_and_in_order_by_its_writer() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let id = spool.new_id();
    let mut msg = Arc::clone(&spool).incoming(&id).unwrap();
    let mut sent = Vec::new();
    // 3 MiB in 3,000 chunks of distinct octets: far more than the writer's queue holds.
    for i in 0..3000u32 {
        let chunk: Vec<u8> = (0..1024u32).map(|j| ((i * 7 + j) % 251) as u8).collect();
        msg.write(&chunk).unwrap();
        sent.extend_from_slice(&chunk);
    }
    let env = msg.commit(envelope(&spool, &id)).unwrap();
    assert_eq!(env.size, sent.len() as u64);
    assert!(!spool.journal.holds(&id), "a 3 MiB body has its own file");
    assert_eq!(spool.read_body(&id).unwrap(), sent);
}

#[test]
fn listings_from_the_index_match_the_envelopes_and_page_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(put(&spool, format!("Subject: {i}\r\n\r\nbody\r\n").as_bytes()).id);
    }
    let mut deferred = spool.get(&ids[1]).unwrap();
    deferred.attempts = 2;
    deferred.recipients[0].last_error = Some("451 4.3.0 try later".into());
    spool.note(vec![deferred]);
    let mut held = spool.get(&ids[3]).unwrap();
    held.held = true;
    held.recipients[0].last_error = Some("450 greylisted".into());
    spool.update(&[held]).unwrap();
    let from_envelopes: Vec<Listing> = ids.iter().map(|id| Listing::from(&spool.get(id).unwrap())).collect();
    assert_eq!(spool.listing(None, 100), from_envelopes);
    assert_eq!(spool.listing(Some(&ids[1]), 2), from_envelopes[2..4].to_vec());
    assert_eq!(from_envelopes[1].last_error.as_deref(), Some("451 4.3.0 try later"));
    assert!(from_envelopes[3].held);
}

/// The scheduler's window of the queue: both stores answer the due query alike (bounds, order,
/// domain, exceptions, limit), and a flush (expedite) changes what is due without a write.
#[test]
fn both_stores_answer_due_queries_and_expedite_alike() {
    let dir = tempfile::tempdir().unwrap();
    let (local, _) = Spool::open(dir.path()).unwrap();
    let local: Arc<dyn Queue> = Arc::new(local);
    let memory: Arc<dyn Queue> = MemoryQueue::new();
    let mut answers = Vec::new();
    for queue in [&local, &memory] {
        let mut keys = Vec::new();
        // Due at 500, 100, 300, 100 (held), 200: the order is by due time, then arrival.
        for (at, rcpt, held) in [
            (500, "a@one.test", false),
            (100, "b@two.test", false),
            (300, "c@one.test", false),
            (100, "d@one.test", true),
            (200, "e@ONE.test", false),
        ] {
            let id = queue.new_id();
            let mut message = Arc::clone(queue).incoming(&id).unwrap();
            message.write(b"Subject: hi\r\n\r\nbody\r\n").unwrap();
            let mut envelope = Envelope::new(id.clone(), "s@x.test".into(), vec![Recipient::new(rcpt.to_string())]);
            envelope.next_attempt = at;
            envelope.held = held;
            message.commit(envelope).unwrap();
            keys.push(crate::spool::queue_key(&id).unwrap());
        }
        let ask = |after, until, domain, except: &[String], limit| {
            queue.due(&DueQuery { after, until, domain, except, limit })
        };
        assert_eq!(ask(None, 1000, None, &[], 10), [(100, keys[1]), (200, keys[4]), (300, keys[2]), (500, keys[0])]);
        assert_eq!(ask(None, 250, None, &[], 10), [(100, keys[1]), (200, keys[4])], "due by 250");
        assert_eq!(ask(Some((100, keys[1])), 1000, None, &[], 2), [(200, keys[4]), (300, keys[2])], "after, limit");
        assert_eq!(ask(None, 1000, Some("ONE.test"), &[], 10), [(200, keys[4]), (300, keys[2]), (500, keys[0])]);
        assert_eq!(ask(None, 1000, None, &["one.test".to_string()], 10), [(100, keys[1])], "except one.test");
        assert_eq!(ask(None, 1000, Some("nowhere.test"), &[], 10), []);
        // A flush of one.test: due at 50 now, in arrival order; the held one stays held.
        assert_eq!(queue.expedite(&Filter::domain("one.test"), 50), 3);
        assert_eq!(ask(None, 1000, None, &[], 10), [(50, keys[0]), (50, keys[2]), (50, keys[4]), (100, keys[1])]);
        let expedited = queue.get(&crate::spool::queue_id(keys[2])).unwrap();
        assert_eq!(expedited.next_attempt, 50, "the envelope read shows the new time");
        assert_eq!(queue.brief(&crate::spool::queue_id(keys[2])).unwrap().next_attempt, 50);
        assert!(!queue.expedite_id(&crate::spool::queue_id(keys[3]), 10), "held: not made due");
        assert!(queue.expedite_id(&crate::spool::queue_id(keys[1]), 10));
        assert_eq!(ask(None, 20, None, &[], 10), [(10, keys[1])]);
        answers.push(ask(None, i64::MAX, None, &[], 10).into_iter().map(|(at, _)| at).collect::<Vec<_>>());
    }
    assert_eq!(answers[0], answers[1]);
}

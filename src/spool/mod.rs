//! The durable queue, and the one interface every stage uses to reach it ([`Queue`], see
//! `src/spool/queue.rs`). Two stores implement it: the local store ([`Spool`], this module with [`journal`]:
//! the only code that touches queue files, with its slim in-memory index in `index`) and
//! [`MemoryQueue`] (unit tests).
//!
//! The local store's layout under `queue.dir` (see `docs/spool.md`):
//! - `incoming/`: files being written; anything here after a crash was never acknowledged.
//! - `journal/N.wal`: the write-ahead journal; a message up to 512 KiB is one record there, made
//!   durable with the other sessions' (group commit), and is queued and read from there.
//! - `messages/ID.msg`, `ID.env`: a larger message (or one written out by `queue sync`): the body as
//!   received, never changed, and the envelope as JSON, replaced atomically on every change.
//! - `lock`: held (flock) by the process that owns the spool, the daemon or an offline CLI.
//! - `control.sock`: the running daemon's control socket.
//!
//! A message exists once its journal record is fdatasync'd, or once both its files are in
//! `messages/` and that directory has been fsync'd; only then is 250 sent. On start, half-written
//! leftovers are removed and everything else is queued again.

pub mod envelope;
mod index;
pub mod journal;
mod keyed;
mod memory;
pub mod postgres;
mod queue;

pub use envelope::*;
pub use memory::MemoryQueue;
pub use queue::*;

use crate::lock;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const INCOMING: &str = "incoming";
const MESSAGES: &str = "messages";
const CORRUPT: &str = "corrupt";
const JOURNAL: &str = "journal";

/// Threads unlinking removed messages' files at once (1: 660-1,100 messages/s drained on the bench
/// machine; 4, 8 and 16: 2,300-3,500/s, within the noise of each other).
const REMOVERS: usize = 8;

/// Errors of the spool; each names the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: bad envelope: {source}")]
    BadEnvelope { path: PathBuf, source: serde_json::Error },
    #[error("{0}: the spool is in use by another bartleby process")]
    Locked(PathBuf),
    #[error("no message {0} in the queue")]
    NotFound(String),
    /// The shared store (PostgreSQL) failed or did not answer in time.
    #[error("queue store: {0}")]
    Store(String),
    /// Another node holds the message's lease: it is delivering it right now.
    #[error("message {id} is being delivered by node {node} right now; try again in a moment")]
    Leased { id: QueueId, node: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.to_path_buf(), source }
}

/// Free space on the spool's filesystem.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct SpaceInfo {
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub free_inodes: u64,
    pub total_inodes: u64,
}

/// The queue: files on disk plus a slim in-memory index of every message ([`index`]); envelopes
/// are read from disk when asked for.
pub struct Spool {
    root: PathBuf,
    messages: PathBuf,
    incoming: PathBuf,
    /// A summary of every queued message (and the retry bookkeeping kept in memory only), so that
    /// counts, pages, the queue's shape and the scheduler's start never read an envelope.
    index: Mutex<index::Index>,
    /// The last issued ID as (microseconds, sequence), so IDs stay unique and increasing.
    last_id: Mutex<(i64, u16)>,
    /// Coalesces fsyncs of `messages/` across concurrent commits (group commit).
    messages_sync: DirSync,
    /// Where small messages are made durable first (see [`journal`]); dropped before the lock.
    journal: journal::Journal,
    /// The version of each document ([`Queue::document`]) read or written since the spool was
    /// opened: one process owns the directory (the lock), so a version kept in memory is enough
    /// for the compare-and-set of [`Queue::replace_document`]. Its lock also orders the writes.
    documents: Mutex<std::collections::HashMap<String, i64>>,
    /// Held for the life of the Spool: one owner at a time.
    _lock: File,
}

/// What recovery found and did on open.
#[derive(Debug, Default, Clone, Copy)]
pub struct Recovery {
    pub queued: usize,
    /// Messages restored from the journal (a crash came before their files were synced).
    pub replayed: usize,
    pub removed_partial: usize,
    pub quarantined: usize,
}

impl Spool {
    /// Opens (creating if needed) the spool at `root`, takes its lock and recovers it.
    pub fn open(root: &Path) -> Result<(Spool, Recovery), SpoolError> {
        let messages = root.join(MESSAGES);
        let incoming = root.join(INCOMING);
        let journal_dir = root.join(JOURNAL);
        for dir in [root, &messages, &incoming, &journal_dir] {
            if !dir.exists() {
                fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))?;
                if dir != root {
                    let created = File::open(dir).map_err(io_err(dir))?;
                    give_to_spool_owner(&created, dir)?;
                }
                // The new name must survive power loss before any message is acknowledged in it
                // (found by the power-loss test, tests/power_loss.rs).
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    sync_dir(parent)?;
                }
            }
        }
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| SpoolError::Locked(root.to_path_buf()))?;
        // The journal's messages go straight into the index as their segments are read, a few
        // segments at a time: a million envelopes are never in memory at once.
        let mut journaled = index::Index::default();
        let mut unreadable = keyed::KeyMap::default();
        let parse =
            |json: &[u8]| serde_json::from_slice::<IndexedEnvelope>(json).map(Box::new).map_err(|e| e.to_string());
        let replay = journal::replay(&journal_dir, &messages, &parse, &mut |key, latest| {
            unreadable.remove(&key);
            match latest {
                Some(Ok(envelope)) => journaled.insert(key, &*envelope),
                Some(Err(err)) => {
                    journaled.remove(key);
                    unreadable.insert(key, err);
                }
                None => journaled.remove(key),
            }
        })?;
        let restored = replay.restored;
        let journal = journal::Journal::start(&journal_dir, &messages, replay)?;
        let spool = Spool {
            root: root.to_path_buf(),
            messages,
            incoming,
            index: Mutex::new(index::Index::default()),
            last_id: Mutex::new((0, 0)),
            messages_sync: DirSync::default(),
            journal,
            documents: Mutex::default(),
            _lock: lock,
        };
        let mut recovery = spool.recover(journaled, unreadable)?;
        recovery.replayed += restored;
        release_free_memory();
        Ok((spool, recovery))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where document `name` ([`Queue::document`]) is kept: `NAME.state.json` in the spool's root.
    fn document_path(&self, name: &str) -> Result<PathBuf, SpoolError> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
            return Err(SpoolError::Store(format!("bad document name {name:?}")));
        }
        Ok(self.root.join(format!("{name}.state.json")))
    }

    /// Where the running daemon listens for CLI commands.
    pub fn control_socket_path(root: &Path) -> PathBuf {
        root.join("control.sock")
    }

    /// Where the scheduler keeps the domains an operator paused (`queue pause`), one per line.
    pub fn paused_domains_path(root: &Path) -> PathBuf {
        root.join("paused-domains")
    }

    /// Completes the index (`journaled`: the messages queued in the journal, found by
    /// [`journal::replay`]) with the messages in `messages/`, and quarantines journaled messages
    /// whose envelope does not parse (`unreadable`).
    fn recover(&self, mut index: index::Index, unreadable: keyed::KeyMap<String>) -> Result<Recovery, SpoolError> {
        let mut recovery = Recovery { replayed: index.len(), ..Recovery::default() };
        for entry in fs::read_dir(&self.incoming).map_err(io_err(&self.incoming))? {
            let path = entry.map_err(io_err(&self.incoming))?.path();
            fs::remove_file(&path).map_err(io_err(&path))?;
            recovery.removed_partial += 1;
        }
        // One directory read tells which bodies exist; no stat per message (restart time matters
        // with 100,000 queued).
        let mut bodies = std::collections::HashSet::new();
        let mut envelopes = Vec::new();
        for entry in fs::read_dir(&self.messages).map_err(io_err(&self.messages))? {
            let path = entry.map_err(io_err(&self.messages))?.path();
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            match path.extension().and_then(|e| e.to_str()) {
                Some("msg") => {
                    bodies.insert(stem);
                }
                Some("env") => envelopes.push((stem, path)),
                _ => {
                    fs::remove_file(&path).map_err(io_err(&path))?;
                    recovery.removed_partial += 1;
                }
            }
        }
        let (complete, orphans): (Vec<_>, Vec<_>) = envelopes.into_iter().partition(|(id, _)| bodies.contains(id));
        for (_, path) in orphans {
            // The rename of the envelope reached the disk but the directory was never fsync'd
            // with its body: the message was not acknowledged.
            fs::remove_file(&path).map_err(io_err(&path))?;
            recovery.removed_partial += 1;
        }
        // A few thousand envelopes at a time: their parsed copies never pile up in memory.
        let mut loaded = std::collections::HashSet::new();
        let paths: Vec<PathBuf> = complete.into_iter().map(|(_, path)| path).collect();
        for chunk in paths.chunks(8192) {
            for (path, parsed) in read_envelopes(chunk.to_vec())? {
                match parsed.and_then(|e| index::key(&e.id).map(|k| (k, e)).ok_or_else(|| bad_id(&path))) {
                    Ok((key, envelope)) => {
                        loaded.insert(key);
                        index.insert(key, &envelope);
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "unreadable envelope moved to corrupt/");
                        self.quarantine(&path)?;
                        recovery.quarantined += 1;
                    }
                }
            }
        }
        let quarantined: std::collections::HashSet<String> = fs::read_dir(self.root.join(CORRUPT))
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".env").map(str::to_string)).collect()
            })
            .unwrap_or_default();
        for id in bodies {
            let body = self.messages.join(format!("{id}.msg"));
            if quarantined.contains(&id) {
                self.quarantine(&body)?;
            } else if !index::key(&id).is_some_and(|k| loaded.contains(&k)) {
                fs::remove_file(&body).map_err(io_err(&body))?;
                recovery.removed_partial += 1;
            }
        }
        self.messages_sync.sync(&self.messages)?;
        for (key, err) in unreadable {
            let id = index::id_of(key);
            tracing::error!(queue_id = %id, error = %err, "unreadable journaled envelope moved to corrupt/");
            let json = self.journal.read_envelope(&id).transpose()?.unwrap_or_default();
            self.quarantine_journaled(&id, &json)?;
            recovery.quarantined += 1;
            recovery.replayed += 1;
        }
        recovery.queued = index.len();
        if let Some(last) = index.last_key() {
            *lock(&self.last_id) = parse_id(&index::id_of(last)).unwrap_or((0, 0));
        }
        *lock(&self.index) = index;
        Ok(recovery)
    }

    /// A journaled message whose envelope does not parse: its record is written to `corrupt/` and
    /// forgotten in the journal.
    fn quarantine_journaled(&self, id: &str, json: &[u8]) -> Result<(), SpoolError> {
        let dir = self.root.join(CORRUPT);
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_err(&dir))?;
        let body = self.read_body(id)?;
        for (ext, data) in [("msg", &body[..]), ("env", json)] {
            let path = dir.join(format!("{id}.{ext}"));
            fs::write(&path, data).and_then(|()| File::open(&path)?.sync_all()).map_err(io_err(&path))?;
        }
        sync_dir(&dir)?;
        let _files = self.journal.files_lock();
        self.journal.forget(&[id.to_string()])
    }

    /// Unreadable files are kept for a human, never silently deleted: it may be someone's mail.
    fn quarantine(&self, path: &Path) -> Result<(), SpoolError> {
        let dir = self.root.join(CORRUPT);
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_err(&dir))?;
        let target = dir.join(path.file_name().unwrap_or_default());
        fs::rename(path, &target).map_err(io_err(path))
    }

    /// A new queue ID that sorts after every ID issued before.
    fn issue_id(&self) -> QueueId {
        let mut last = lock(&self.last_id);
        let now = now_micros();
        let next = if now > last.0 {
            (now, 0)
        } else if last.1 < 0xfff {
            (last.0, last.1 + 1)
        } else {
            (last.0 + 1, 0)
        };
        *last = next;
        format!("{:013X}{:03X}", next.0, next.1)
    }

    /// A queued message's envelope as it is on disk, with the retry bookkeeping noted in memory
    /// applied; None when it is not queued. Read under the index lock, so that the message cannot
    /// be removed or rewritten halfway through; parsed after it.
    fn load(&self, key: index::Key) -> Result<Option<Envelope>, SpoolError> {
        let id = index::id_of(key);
        let path = self.messages.join(format!("{id}.env"));
        let (json, noted) = {
            let index = lock(&self.index);
            if !index.contains(key) {
                return Ok(None);
            }
            let json = match self.journal.read_envelope(&id) {
                Some(read) => read?,
                // A message leaves the journal only once its files are durable, so a message not
                // in the journal has them.
                None => match fs::read(&path) {
                    Ok(json) => json,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(err) => return Err(SpoolError::Io { path, source: err }),
                },
            };
            (json, index.noted_of(key))
        };
        let mut envelope: Envelope =
            serde_json::from_slice(&json).map_err(|source| SpoolError::BadEnvelope { path, source })?;
        if let Some(noted) = noted {
            noted.apply(&mut envelope);
        }
        Ok(Some(envelope))
    }

    /// Calls `f` with the envelope of each message after `after` that passes `filter`, oldest
    /// first, until it returns false. The index answers what it can first ([`index::Index::prefilter`]);
    /// envelopes are read a page at a time, the lock taken per page and per message only.
    fn each(&self, filter: &Filter, mut after: Option<index::Key>, f: &mut dyn FnMut(Envelope) -> bool) {
        const PAGE: usize = 256;
        let now = now_micros();
        loop {
            let keys: Vec<index::Key> = {
                let index = lock(&self.index);
                let passes = index.prefilter(filter, now);
                index.iter_after(after).filter(|(_, s)| passes(s)).map(|(k, _)| k).take(PAGE).collect()
            };
            let Some(last) = keys.last().copied() else { return };
            after = Some(last);
            for key in keys {
                match self.load(key) {
                    Ok(Some(envelope)) if filter.matches(&envelope, now) => {
                        if !f(envelope) {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(err) => tracing::error!(queue_id = %index::id_of(key), error = %err, "cannot read envelope"),
                }
            }
        }
    }

    /// Gives every message queued in the journal its own files and deletes the journal's segments
    /// (waiting at most `limit`); returns whether all were done.
    pub fn checkpoint(&self, limit: std::time::Duration) -> bool {
        self.journal.checkpoint(limit)
    }

    /// Durably replaces the envelopes of queued messages, with one directory fsync for all of
    /// them, then the index.
    fn update_envelopes(&self, envelopes: &[Envelope]) -> Result<(), SpoolError> {
        if envelopes.is_empty() {
            return Ok(());
        }
        let _files = self.journal.files_lock();
        {
            // A read meanwhile finds the old envelope without its noted bookkeeping: an older
            // retry state at worst, never a mix of the new envelope and the old notes.
            let mut index = lock(&self.index);
            for key in envelopes.iter().filter_map(|e| index::key(&e.id)) {
                index.clear_noted(key);
            }
        }
        if self.write_envelopes(&envelopes.iter().collect::<Vec<_>>())? {
            self.messages_sync.sync(&self.messages)?;
        }
        let mut index = lock(&self.index);
        for envelope in envelopes {
            if let Some(key) = index::key(&envelope.id).filter(|k| index.contains(*k)) {
                index.insert(key, envelope);
            }
        }
        Ok(())
    }

    /// Durably replaces the envelopes of messages: a message queued from the journal gets an
    /// envelope record there (one group commit for all), any other a new envelope file (the caller
    /// syncs the directory). Returns whether any file was written. Call with the files lock held.
    fn write_envelopes(&self, envelopes: &[&Envelope]) -> Result<bool, SpoolError> {
        let mut journaled = Vec::new();
        let mut wrote_files = false;
        for envelope in envelopes {
            if self.journal.holds(&envelope.id) {
                let json = serde_json::to_vec(envelope).map_err(|source| SpoolError::BadEnvelope {
                    path: self.messages.join(format!("{}.env", envelope.id)),
                    source,
                })?;
                journaled.push((envelope.id.clone(), json));
                continue;
            }
            let target = self.messages.join(format!("{}.env", envelope.id));
            if !target.exists() {
                return Err(SpoolError::NotFound(envelope.id.clone()));
            }
            self.write_envelope(envelope, &target)?;
            wrote_files = true;
        }
        self.journal.update_envelopes(&journaled)?;
        Ok(wrote_files)
    }

    /// Writes the envelope to a temporary file, fsyncs it and renames it over `target`.
    fn write_envelope(&self, envelope: &Envelope, target: &Path) -> Result<(), SpoolError> {
        let tmp = self.incoming.join(format!("{}.env", envelope.id));
        let file = write_private_json(envelope, &tmp)?;
        file.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, target).map_err(io_err(target))
    }

    /// Removes many messages with one directory fsync; a message already gone is not an error.
    /// Envelopes are unlinked before bodies, so a crash can leave only an orphan body, which
    /// recovery deletes.
    fn remove_messages(&self, ids: &[QueueId]) -> Result<(), SpoolError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _files = self.journal.files_lock();
        // Journaled messages have no files to unlink; their forget record is the removal.
        let with_files: Vec<&QueueId> = ids.iter().filter(|id| !self.journal.holds(id)).collect();
        self.journal.forget(ids)?;
        if !with_files.is_empty() {
            self.unlink_messages(&with_files)?;
            self.messages_sync.sync(&self.messages)?;
        }
        let mut index = lock(&self.index);
        for key in ids.iter().filter_map(|id| index::key(id)) {
            index.remove(key);
        }
        Ok(())
    }

    /// Unlinks messages' files, envelope first, on up to [`REMOVERS`] threads: freeing a file's
    /// blocks takes the filesystem far longer than creating it (a millisecond or more per file on
    /// ext4 mounted with `discard`, as measured on the bench machine), and the unlinks of different
    /// files overlap well. A file already gone is not an error.
    fn unlink_messages(&self, ids: &[&QueueId]) -> Result<(), SpoolError> {
        let unlink = |part: &[&QueueId]| -> Result<(), SpoolError> {
            for id in part {
                for ext in ["env", "msg"] {
                    let path = self.messages.join(format!("{id}.{ext}"));
                    match fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                        Err(err) => return Err(SpoolError::Io { path, source: err }),
                    }
                }
            }
            Ok(())
        };
        // At least 8 messages per thread: a thread costs more than a few unlinks.
        let threads = (ids.len() / 8).clamp(1, REMOVERS);
        if threads == 1 {
            return unlink(ids);
        }
        std::thread::scope(|scope| {
            let workers: Vec<_> =
                ids.chunks(ids.len().div_ceil(threads)).map(|part| scope.spawn(move || unlink(part))).collect();
            workers.into_iter().try_for_each(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|_| Err(io_err(&self.messages)(io::Error::other("an unlinking thread failed"))))
            })
        })
    }
}

/// The local store: the journal and files under `queue.dir`, with every envelope in memory.
impl Queue for Spool {
    fn new_id(&self) -> QueueId {
        self.issue_id()
    }

    /// The body is held in memory while it is small enough for the journal, and spills to a file
    /// in `incoming/` when it grows past [`journal::MAX_JOURNALED_BODY`].
    fn incoming(self: Arc<Self>, id: &str) -> Result<Box<dyn Incoming>, SpoolError> {
        Ok(Box::new(IncomingMessage {
            spool: self,
            id: id.to_string(),
            path: PathBuf::new(),
            body: Body::Memory(Vec::new()),
            size: 0,
        }))
    }

    fn get(&self, id: &str) -> Option<Envelope> {
        let key = index::key(id)?;
        self.load(key).unwrap_or_else(|err| {
            tracing::error!(queue_id = %id, error = %err, "cannot read envelope");
            None
        })
    }

    fn brief(&self, id: &str) -> Option<Brief> {
        let index = lock(&self.index);
        let summary = index.summary(index::key(id)?)?;
        Some(Brief {
            held: summary.held(),
            domains: index.domains(summary).map(str::to_string).collect(),
            next_attempt: summary.next_attempt,
        })
    }

    /// Reads every envelope from disk, a page at a time: for small queues and exports only.
    fn visit(&self, f: &mut dyn FnMut(&Envelope)) {
        self.each(&Filter::all(), None, &mut |e| {
            f(&e);
            true
        });
    }

    fn len(&self) -> usize {
        lock(&self.index).len()
    }

    /// From the summaries: one pass over the index, no envelope read.
    fn due(&self, query: &DueQuery<'_>) -> Vec<(i64, QueueKey)> {
        lock(&self.index).due(query)
    }

    /// In memory only, in the summaries (a flush of a million writes nothing): after a restart the
    /// next attempts last written hold, and a flush is asked for again.
    fn expedite(&self, filter: &Filter, at: i64) -> usize {
        let filter = Filter { held: Some(false), ..filter.clone() };
        let mut index = lock(&self.index);
        let chosen: Vec<QueueKey> = {
            let passes = index.prefilter(&filter, now_micros());
            index.iter_after(None).filter(|(_, s)| passes(s)).map(|(k, _)| k).collect()
        };
        chosen.into_iter().filter(|k| index.expedite(*k, at)).count()
    }

    fn expedite_id(&self, id: &str, at: i64) -> bool {
        index::key(id).is_some_and(|key| lock(&self.index).expedite(key, at))
    }

    /// The summaries answer the filter (they keep the addresses, interned): only the page's
    /// envelopes are read.
    fn query(&self, filter: &Filter, page: Page) -> Found {
        let (total, matched, keys) = {
            let index = lock(&self.index);
            let passes = index.prefilter(filter, now_micros());
            let mut matched = 0;
            let mut keys = Vec::new();
            for (key, summary) in index.iter_after(None) {
                if passes(summary) {
                    if matched >= page.offset && keys.len() < page.limit {
                        keys.push(key);
                    }
                    matched += 1;
                }
            }
            (index.len(), matched, keys)
        };
        let envelopes = keys.into_iter().filter_map(|k| self.load(k).ok().flatten()).collect();
        Found { total, matched, envelopes }
    }

    fn scan(&self, filter: &Filter, after: Option<&str>, limit: usize) -> Vec<Envelope> {
        let mut found = Vec::new();
        let after = after.map(|id| index::key(id).unwrap_or(0));
        self.each(filter, after, &mut |e| {
            found.push(e);
            found.len() < limit
        });
        found
    }

    fn listing(&self, after: Option<&str>, limit: usize) -> Vec<Listing> {
        let index = lock(&self.index);
        let after = after.map(|id| index::key(id).unwrap_or(0));
        index.iter_after(after).take(limit).map(|(k, s)| index.listing(k, s)).collect()
    }

    fn ids(&self, filter: &Filter) -> Vec<QueueId> {
        let index = lock(&self.index);
        let passes = index.prefilter(filter, now_micros());
        index.iter_after(None).filter(|(_, s)| passes(s)).map(|(k, _)| index::id_of(k)).collect()
    }

    fn count(&self, filter: &Filter) -> usize {
        let index = lock(&self.index);
        let passes = index.prefilter(filter, now_micros());
        index.iter_after(None).filter(|(_, s)| passes(s)).count()
    }

    fn stats(&self) -> Stats {
        let index = lock(&self.index);
        let mut stats = Stats::default();
        for (_, s) in index.iter_after(None) {
            stats.add_message(s.size, s.arrived, s.held(), s.bounce_suppressed());
            for domain in index.domains(s) {
                stats.add_domain(domain, s.size, s.arrived);
            }
        }
        stats
    }

    fn shape(&self, now: i64) -> BTreeMap<String, [usize; SHAPE_BUCKETS_MINUTES.len()]> {
        let index = lock(&self.index);
        let mut shape = BTreeMap::new();
        for (_, s) in index.iter_after(None) {
            let bucket = shape_bucket(now, s.arrived);
            for domain in index.domains(s) {
                shape_add(&mut shape, domain, bucket);
            }
        }
        shape
    }

    fn update(&self, envelopes: &[Envelope]) -> Result<(), SpoolError> {
        self.update_envelopes(envelopes)
    }

    /// Kept in the index's summaries ([`index`]), not on disk; a deferral that one reason cannot
    /// tell for every pending recipient is written durably instead.
    fn note(&self, envelopes: Vec<Envelope>) {
        let now = now_micros();
        let mut durable = Vec::new();
        {
            let mut index = lock(&self.index);
            for envelope in envelopes {
                let Some(key) = index::key(&envelope.id).filter(|k| index.contains(*k)) else { continue };
                let at = envelope.history.last().map_or(now, |h| h.at);
                if !index.note(key, &envelope, at) {
                    durable.push(envelope);
                }
            }
        }
        if let Err(err) = self.update_envelopes(&durable) {
            tracing::error!(error = %err, "cannot save delivery state");
        }
    }

    fn persist(&self) -> Result<usize, SpoolError> {
        let noted = lock(&self.index).noted();
        let mut written = 0;
        for chunk in noted.chunks(512) {
            let envelopes: Vec<Envelope> = chunk.iter().filter_map(|k| self.load(*k).ok().flatten()).collect();
            self.update_envelopes(&envelopes)?;
            written += envelopes.len();
        }
        Ok(written)
    }

    fn remove(&self, ids: &[QueueId]) -> Result<(), SpoolError> {
        self.remove_messages(ids)
    }

    /// A journaled body is opened under the journal's lock ([`journal::Journal::open_body`]); any
    /// other from its own file, which only the message's removal deletes.
    fn open_body(&self, id: &str) -> Result<MessageBody, SpoolError> {
        if let Some(opened) = self.journal.open_body(id) {
            let reader = opened?;
            let len = reader.len();
            return Ok(MessageBody::new(Box::new(reader), len));
        }
        let path = self.messages.join(format!("{id}.msg"));
        let file = File::open(&path).map_err(|err| match err.kind() {
            io::ErrorKind::NotFound => SpoolError::NotFound(id.to_string()),
            _ => SpoolError::Io { path: path.clone(), source: err },
        })?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        Ok(MessageBody::new(Box::new(file), len))
    }

    fn space(&self) -> Result<SpaceInfo, SpoolError> {
        space_of(&self.root)
    }

    fn document(&self, name: &str) -> Result<Option<(i64, Vec<u8>)>, SpoolError> {
        let path = self.document_path(name)?;
        let mut versions = lock(&self.documents);
        match fs::read(&path) {
            Ok(body) => Ok(Some((*versions.entry(name.to_string()).or_insert(1), body))),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                versions.remove(name);
                Ok(None)
            }
            Err(err) => Err(SpoolError::Io { path, source: err }),
        }
    }

    fn replace_document(&self, name: &str, seen: Option<i64>, body: Vec<u8>) -> Result<bool, SpoolError> {
        let path = self.document_path(name)?;
        let mut versions = lock(&self.documents);
        let current = match versions.get(name) {
            Some(version) => Some(*version),
            None => path.exists().then_some(1),
        };
        if current != seen {
            return Ok(false);
        }
        atomic_write(&path, &body)?;
        versions.insert(name.to_string(), current.unwrap_or(0) + 1);
        Ok(true)
    }

    fn sync_files(&self, limit: std::time::Duration) -> Option<usize> {
        let waiting = self.journal.queued();
        self.checkpoint(limit).then_some(waiting)
    }
}

/// First line of a queue export; the number is the export format version.
const EXPORT_MAGIC: &str = "bartleby-queue-export 1";

/// One message's header line in an export: the envelope and the body's length in octets.
#[derive(serde::Serialize, serde::Deserialize)]
struct ExportEntry {
    envelope: Envelope,
    size: u64,
}

/// Writes every message of the spool at `root` to `out`, oldest first: a magic line, then per
/// message one JSON line and the body's octets. Reads only immutable bodies and atomically replaced
/// envelopes, so it is safe while the daemon runs. Returns how many messages were written.
pub fn export(root: &Path, out: &mut impl Write) -> Result<usize, SpoolError> {
    let messages = root.join(MESSAGES);
    // The journal first: a segment retired meanwhile has given its messages files by then.
    let mut journaled: BTreeMap<QueueId, journal::JournaledMessage> =
        journal::read_messages(&root.join(JOURNAL))?.into_iter().map(|m| (m.id.clone(), m)).collect();
    let mut ids: std::collections::BTreeSet<String> = fs::read_dir(&messages)
        .map_err(io_err(&messages))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".env").map(str::to_string))
        .filter(|id| is_queue_id(id))
        .collect();
    ids.extend(journaled.keys().cloned());
    let out_err = |source| SpoolError::Io { path: PathBuf::from("(export)"), source };
    writeln!(out, "{EXPORT_MAGIC}").map_err(out_err)?;
    let mut count = 0;
    for id in ids {
        let from_files = read_envelope(&messages.join(format!("{id}.env")));
        let (envelope, body) = match (journaled.remove(&id), from_files) {
            // The body never changes; an envelope file, when there is one, is the newer.
            (Some(record), Ok(envelope)) => (envelope, record.body),
            (Some(record), Err(_)) => match serde_json::from_slice(&record.envelope) {
                Ok(envelope) => (envelope, record.body),
                Err(_) => continue,
            },
            (None, Ok(envelope)) => match fs::read(messages.join(format!("{id}.msg"))) {
                Ok(body) => (envelope, body),
                Err(_) => continue, // delivered and removed while we read
            },
            (None, Err(_)) => continue,
        };
        let line = serde_json::to_string(&ExportEntry { envelope, size: body.len() as u64 })
            .map_err(|source| SpoolError::BadEnvelope { path: messages.join(&id), source })?;
        writeln!(out, "{line}").and_then(|()| out.write_all(&body)).map_err(out_err)?;
        count += 1;
    }
    out.flush().map_err(out_err)?;
    Ok(count)
}

impl Spool {
    /// Queues every message of an export under its original ID (so arrival order is kept across
    /// hosts). Messages already queued are skipped. Returns (imported, skipped).
    pub fn import(self: &Arc<Self>, input: &mut impl io::BufRead) -> Result<(usize, usize), SpoolError> {
        let queue: Arc<dyn Queue> = Arc::clone(self) as Arc<dyn Queue>;
        import_into(&queue, input)
    }
}

/// Writes every message of any store to `out` in the format of [`export`], oldest first, a page
/// at a time; messages removed meanwhile are left out. Returns how many were written.
pub fn export_from(queue: &dyn Queue, out: &mut impl Write) -> Result<usize, SpoolError> {
    let out_err = |source| SpoolError::Io { path: PathBuf::from("(export)"), source };
    writeln!(out, "{EXPORT_MAGIC}").map_err(out_err)?;
    let (mut after, mut count) = (None::<QueueId>, 0);
    loop {
        let page = queue.scan(&Filter::all(), after.as_deref(), 1000);
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for envelope in page {
            let body = match queue.read_body(&envelope.id) {
                Ok(body) => body,
                Err(SpoolError::NotFound(_)) => continue,
                Err(err) => return Err(err),
            };
            let envelope = Envelope { leased_by: None, ..envelope };
            let line = serde_json::to_string(&ExportEntry { envelope, size: body.len() as u64 })
                .map_err(|source| SpoolError::BadEnvelope { path: PathBuf::from("(export)"), source })?;
            writeln!(out, "{line}").and_then(|()| out.write_all(&body)).map_err(out_err)?;
            count += 1;
        }
    }
    out.flush().map_err(out_err)?;
    Ok(count)
}

/// Queues every message of an export into any store under its original ID; messages already
/// queued are skipped. Returns (imported, skipped).
pub fn import_into(queue: &Arc<dyn Queue>, input: &mut impl io::BufRead) -> Result<(usize, usize), SpoolError> {
    let in_err = |source| SpoolError::Io { path: PathBuf::from("(import)"), source };
    let bad = |what: &str| in_err(io::Error::new(io::ErrorKind::InvalidData, what.to_string()));
    let mut line = String::new();
    input.read_line(&mut line).map_err(in_err)?;
    if line.trim_end() != EXPORT_MAGIC {
        return Err(bad("not a bartleby queue export (bad first line)"));
    }
    let (mut imported, mut skipped) = (0, 0);
    loop {
        line.clear();
        if input.read_line(&mut line).map_err(in_err)? == 0 {
            return Ok((imported, skipped));
        }
        let entry: ExportEntry = serde_json::from_str(&line)
            .map_err(|source| SpoolError::BadEnvelope { path: PathBuf::from("(import)"), source })?;
        let mut body = vec![0; usize::try_from(entry.size).map_err(|_| bad("message too large"))?];
        input.read_exact(&mut body).map_err(in_err)?;
        let id = entry.envelope.id.clone();
        if !is_queue_id(&id) {
            return Err(bad("bad queue ID in export"));
        }
        if queue.brief(&id).is_some() {
            skipped += 1;
            continue;
        }
        let mut message = Arc::clone(queue).incoming(&id)?;
        message.write(&body)?;
        message.commit(entry.envelope)?;
        imported += 1;
    }
}

/// Opens the store `queue.store` names: the local spool under `queue.dir` (taking its lock and
/// recovering it), or the shared PostgreSQL store (as a node, or as a tool that never claims).
pub fn open_store(
    config: &crate::config::Config,
    role: postgres::Role,
) -> Result<(Arc<dyn Queue>, Recovery), SpoolError> {
    match config.queue.store {
        crate::config::StoreKind::Local => {
            let (spool, recovery) = Spool::open(&config.queue.dir)?;
            Ok((Arc::new(spool), recovery))
        }
        crate::config::StoreKind::Postgres => {
            let dir = &config.queue.dir;
            if role == postgres::Role::Node && !dir.exists() {
                fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))?;
            }
            let store = postgres::PgQueue::open(config, role)?;
            let recovery = Recovery { queued: store.len(), ..Recovery::default() };
            Ok((Arc::new(store), recovery))
        }
    }
}

/// An envelope file whose ID is not a queue ID.
fn bad_id(path: &Path) -> SpoolError {
    SpoolError::Io { path: path.to_path_buf(), source: io::Error::new(io::ErrorKind::InvalidData, "bad queue ID") }
}

/// Hands freed heap back to the system: glibc keeps it, so the scratch of a recovery (the parsed
/// envelopes of a million messages, a few segments at a time) would stay in the daemon's RSS.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the kernel; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// statvfs of the filesystem holding `path`.
pub fn space_of(path: &Path) -> Result<SpaceInfo, SpoolError> {
    let st = rustix::fs::statvfs(path).map_err(|e| SpoolError::Io { path: path.to_path_buf(), source: e.into() })?;
    Ok(SpaceInfo {
        free_bytes: st.f_bavail.saturating_mul(st.f_frsize),
        total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
        free_inodes: st.f_favail,
        total_inodes: st.f_files,
    })
}

/// A message being received. Dropping it without `commit` deletes it.
/// Owns an `Arc<Spool>` so the commit can run on a blocking thread.
pub struct IncomingMessage {
    spool: Arc<Spool>,
    id: QueueId,
    /// The body's file in `incoming/` once it spilled there; empty while in memory or once committed.
    path: PathBuf,
    body: Body,
    size: u64,
}

/// Chunks a spilled body's writer may fall behind the session before the session waits for it.
const SPILL_QUEUE: usize = 16;

/// A spilled body's writer thread and the channel that feeds it.
struct Spill {
    chunks: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    writer: Option<std::thread::JoinHandle<Result<File, SpoolError>>>,
}

impl Spill {
    /// Ends the feed and waits for the writer: the file with every chunk written, or its error.
    fn finish(&mut self) -> Result<File, SpoolError> {
        self.chunks = None;
        let failed = || SpoolError::Io {
            path: PathBuf::from("(spilled body)"),
            source: io::Error::other("writer thread failed"),
        };
        match self.writer.take() {
            Some(writer) => writer.join().unwrap_or_else(|_| Err(failed())),
            None => Err(failed()),
        }
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        // The writer ends once the feed does; the file is removed after it (IncomingMessage's drop).
        let _ = self.finish();
    }
}

/// Where a body being received lives.
enum Body {
    /// Small enough for the journal so far.
    Memory(Vec<u8>),
    /// Spilled to `incoming/ID.msg`, written by a thread of its own.
    File(Spill),
    /// Committed or failed.
    Gone,
}

impl Incoming for IncomingMessage {
    fn id(&self) -> &str {
        &self.id
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        if let Body::Memory(held) = &mut self.body {
            if held.len() + data.len() <= journal::MAX_JOURNALED_BODY {
                held.extend_from_slice(data);
                self.size += data.len() as u64;
                return Ok(());
            }
            let held = std::mem::take(held);
            self.spill(&held)?;
        }
        let Body::File(spill) = &mut self.body else { return Err(SpoolError::NotFound(self.id.clone())) };
        if spill.chunks.as_ref().is_none_or(|chunks| chunks.send(data.to_vec()).is_err()) {
            // The writer stopped: it failed, and says why.
            let failed = spill.finish().err();
            self.body = Body::Gone;
            return Err(failed.unwrap_or_else(|| io_err(&self.path)(io::Error::other("the body's writer stopped"))));
        }
        self.size += data.len() as u64;
        Ok(())
    }

    fn commit(mut self: Box<Self>, mut envelope: Envelope) -> Result<Envelope, SpoolError> {
        envelope.id = self.id.clone();
        envelope.size = self.size;
        let envelope = match std::mem::replace(&mut self.body, Body::Gone) {
            Body::Memory(body) => self.commit_journaled(envelope, &body)?,
            Body::File(writer) => self.commit_file(envelope, writer)?,
            Body::Gone => return Err(SpoolError::NotFound(self.id.clone())),
        };
        if let Some(parsed) = parse_id(&envelope.id) {
            let mut last = lock(&self.spool.last_id);
            *last = (*last).max(parsed);
        }
        if let Some(key) = index::key(&envelope.id) {
            lock(&self.spool.index).insert(key, &envelope);
        }
        Ok(envelope)
    }
}

impl IncomingMessage {
    /// Moves a body that outgrew the journal into its own file, written from then on by a thread
    /// of its own: a session's writes never wait for the disk on an async worker thread, unless
    /// the disk falls [`SPILL_QUEUE`] chunks behind.
    fn spill(&mut self, held: &[u8]) -> Result<(), SpoolError> {
        self.body = Body::Gone;
        let path = self.spool.incoming.join(format!("{}.msg", self.id));
        let file = create_private(&path)?;
        self.path = path.clone();
        let (chunks, received) = std::sync::mpsc::sync_channel::<Vec<u8>>(SPILL_QUEUE);
        let first = held.to_vec();
        let writer = std::thread::Builder::new()
            .name("spill-writer".into())
            .spawn(move || {
                let mut writer = BufWriter::with_capacity(64 * 1024, file);
                writer.write_all(&first).map_err(io_err(&path))?;
                for chunk in received {
                    writer.write_all(&chunk).map_err(io_err(&path))?;
                }
                writer.into_inner().map_err(|e| SpoolError::Io { path: path.clone(), source: e.into_error() })
            })
            .map_err(io_err(&self.path))?;
        self.body = Body::File(Spill { chunks: Some(chunks), writer: Some(writer) });
        Ok(())
    }

    /// A small message: one record in the journal, made durable together with the other sessions'
    /// (group commit); it is queued from there (see [`journal`]).
    fn commit_journaled(&mut self, envelope: Envelope, body: &[u8]) -> Result<Envelope, SpoolError> {
        let json = serde_json::to_vec(&envelope).map_err(|source| SpoolError::BadEnvelope {
            path: self.spool.messages.join(format!("{}.env", self.id)),
            source,
        })?;
        self.spool.journal.append_message(&self.id, &json, body)?;
        Ok(envelope)
    }

    /// A large message: body and envelope fsync'd, renamed into `messages/`, directory fsync'd.
    fn commit_file(&mut self, envelope: Envelope, mut spill: Spill) -> Result<Envelope, SpoolError> {
        let body = spill.finish()?;
        let spool = Arc::clone(&self.spool);
        let env_tmp = spool.incoming.join(format!("{}.env", self.id));
        let env_file = write_private_json(&envelope, &env_tmp);
        // The body and the envelope are fsync'd at the same time (two waits on the disk would be
        // one after the other otherwise): one round before the renames, one for the directory.
        let (body_synced, env_synced) = std::thread::scope(|scope| {
            let env = scope.spawn(|| env_file.and_then(|f| f.sync_all().map_err(io_err(&env_tmp))));
            let body_synced = body.sync_all().map_err(io_err(&self.path));
            (body_synced, env.join().unwrap_or_else(|_| Err(io_err(&env_tmp)(io::Error::other("fsync thread failed")))))
        });
        drop(body);
        if let Err(err) = body_synced.and(env_synced) {
            let _ = fs::remove_file(&env_tmp);
            return Err(err);
        }
        let body_target = spool.messages.join(format!("{}.msg", self.id));
        let env_target = spool.messages.join(format!("{}.env", self.id));
        fs::rename(&self.path, &body_target).map_err(io_err(&body_target))?;
        self.path = body_target.clone();
        if let Err(err) = fs::rename(&env_tmp, &env_target)
            .map_err(io_err(&env_target))
            .and_then(|()| spool.messages_sync.sync(&spool.messages))
        {
            // Not acknowledged: take the body back out so the queue never holds a half message.
            let _ = fs::remove_file(&env_tmp);
            let _ = fs::remove_file(&env_target);
            let _ = fs::remove_file(&body_target);
            return Err(err);
        }
        self.path = PathBuf::new();
        Ok(envelope)
    }
}

impl Drop for IncomingMessage {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            self.body = Body::Gone;
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Replaces `path` atomically and durably with `data`: a private temporary file in the same
/// directory, fsync'd, renamed over `path`, then the directory fsync'd, so that after a crash the
/// file holds either the old or the new bytes, never a mix, and the new name survives power loss.
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<(), SpoolError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", fastrand::u64(..)));
    let written = create_private(&tmp).and_then(|mut file| {
        file.write_all(data).and_then(|()| file.sync_all()).map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

/// Writes an envelope as JSON to a new private file (not yet fsync'd).
fn write_private_json(envelope: &Envelope, path: &Path) -> Result<File, SpoolError> {
    let json =
        serde_json::to_vec(envelope).map_err(|source| SpoolError::BadEnvelope { path: path.to_path_buf(), source })?;
    let mut file = create_private(path)?;
    file.write_all(&json).map_err(io_err(path))?;
    Ok(file)
}

fn create_private(path: &Path) -> Result<File, SpoolError> {
    let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io_err(path))?;
    give_to_spool_owner(&file, path)?;
    Ok(file)
}

/// A file that root creates in a spool belonging to another user (an offline `bartleby queue ...`
/// run as root) is given to that user, the owner of its directory, so the daemon running as the
/// spool's owner can still read and replace it.
pub(crate) fn give_to_spool_owner(file: &File, path: &Path) -> Result<(), SpoolError> {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let Some(dir) = path.parent() else { return Ok(()) };
    let owner = fs::metadata(dir).map_err(io_err(dir))?;
    if owner.uid() == 0 {
        return Ok(());
    }
    let (uid, gid) = (rustix::fs::Uid::from_raw(owner.uid()), rustix::fs::Gid::from_raw(owner.gid()));
    rustix::fs::fchown(file, Some(uid), Some(gid))
        .map_err(|e| SpoolError::Io { path: path.to_path_buf(), source: e.into() })
}

/// Runs `work` over `items` on all cores (up to 8), each thread taking one contiguous chunk; returns
/// the results in the order of `items`. A thread that failed outright fails the whole run (naming
/// `what`): a result missing from a recovery would be taken for a leftover and removed.
fn on_all_cores<T: Send, R: Send>(
    items: Vec<T>,
    what: &str,
    work: impl Fn(Vec<T>) -> Result<Vec<R>, SpoolError> + Sync,
) -> Result<Vec<R>, SpoolError> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8);
    let per_thread = items.len().div_ceil(threads).max(1);
    let total = items.len();
    let mut chunks = Vec::new();
    let mut rest = items;
    while rest.len() > per_thread {
        let tail = rest.split_off(per_thread);
        chunks.push(rest);
        rest = tail;
    }
    chunks.push(rest);
    let work = &work;
    std::thread::scope(|scope| {
        let workers: Vec<_> = chunks.into_iter().map(|chunk| scope.spawn(move || work(chunk))).collect();
        let mut all = Vec::with_capacity(total);
        for worker in workers {
            let failed = || io_err(Path::new("(recovery)"))(io::Error::other(format!("{what} failed")));
            all.extend(worker.join().map_err(|_| failed())??);
        }
        Ok(all)
    })
}

/// Reads and parses envelopes on all cores; returns each path with its result.
type Parsed = Vec<(PathBuf, Result<Envelope, SpoolError>)>;

fn read_envelopes(paths: Vec<PathBuf>) -> Result<Parsed, SpoolError> {
    on_all_cores(paths, "an envelope reader", |chunk| {
        Ok(chunk
            .into_iter()
            .map(|path| {
                let parsed = read_envelope(&path);
                (path, parsed)
            })
            .collect())
    })
}

fn read_envelope(path: &Path) -> Result<Envelope, SpoolError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|source| SpoolError::BadEnvelope { path: path.to_path_buf(), source })
}

/// Group commit for a directory: many threads that each need "everything I renamed so far is
/// durable" share one fsync. A caller waits for an fsync that *started* after its call; if one is
/// already running it waits for that to end and the next to cover it, so no caller returns before
/// its own names are on disk, and N concurrent commits cost about two fsyncs instead of N.
#[derive(Default)]
struct DirSync {
    state: Mutex<DirSyncState>,
    done: std::sync::Condvar,
}

#[derive(Default)]
struct DirSyncState {
    /// Tickets handed out; a ticket is covered by an fsync that starts after it was taken.
    issued: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    /// An fsync is running.
    running: bool,
    /// The error of the last fsync, reported to the callers it covered.
    failed: Option<(u64, io::ErrorKind)>,
}

impl DirSync {
    fn sync(&self, dir: &Path) -> Result<(), SpoolError> {
        let mut state = lock(&self.state);
        state.issued += 1;
        let ticket = state.issued;
        loop {
            if state.durable >= ticket {
                return match state.failed {
                    Some((up_to, kind)) if up_to >= ticket => {
                        Err(SpoolError::Io { path: dir.to_path_buf(), source: kind.into() })
                    }
                    _ => Ok(()),
                };
            }
            if !state.running {
                state.running = true;
                let covers = state.issued;
                drop(state);
                let result = sync_dir(dir);
                state = lock(&self.state);
                state.running = false;
                state.durable = covers;
                state.failed = result.as_ref().err().map(|e| (covers, error_kind(e)));
                self.done.notify_all();
                continue;
            }
            state = self.done.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn error_kind(err: &SpoolError) -> io::ErrorKind {
    match err {
        SpoolError::Io { source, .. } => source.kind(),
        _ => io::ErrorKind::Other,
    }
}

/// fsync a directory so the names created or removed in it survive power loss.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

fn parse_id(id: &str) -> Option<(i64, u16)> {
    let micros = i64::from_str_radix(id.get(..13)?, 16).ok()?;
    let seq = u16::from_str_radix(id.get(13..16)?, 16).ok()?;
    Some((micros, seq))
}

/// Is `id` shaped like a queue ID? Guards every path built from user input.
pub fn is_queue_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
}

#[cfg(test)]
mod tests;

//! The write-ahead journal: how a small message becomes durable with one disk wait, shared by every
//! session committing at the same moment (group commit).
//!
//! A message up to [`MAX_JOURNALED_BODY`] octets is appended whole (envelope and body) to the current
//! segment `journal/NNNNNNNNNNNNNNNN.wal`, and one `fdatasync` makes a whole group of such appends
//! durable; only then do their sessions answer 250. The message's ordinary files in `messages/` are
//! written right after, without an fsync of their own. A segment is *retired* once it is full (or
//! idle) and every message in it has its files written: one `syncfs` makes those files durable, then
//! the segment is deleted. After a crash, [`replay`] restores every message of the segments still
//! present from their records, so nothing acknowledged depends on the unsynced files.
//!
//! A message removed while its record is still in the journal (delivered within seconds of arrival)
//! gets a *forget* record first, so a replay does not bring it back.
//!
//! Record layout (little-endian): magic `BJR1`, kind (1 message, 2 forget), queue ID (16 octets),
//! envelope length (u32), body length (u64), CRC-32 of everything after the magic except itself, then
//! the envelope JSON and the body. A replay stops at the first record that does not check out: a
//! write torn by a crash is always the last thing in its segment.

use super::{QueueId, SpoolError, io_err, lock, sync_dir};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bodies up to this size go through the journal (held in memory while received); larger ones are
/// written to their own file and fsync'd, where the data, not the number of disk waits, is the cost.
pub const MAX_JOURNALED_BODY: usize = 512 * 1024;

/// A segment is closed for retirement once it holds this much.
const SEGMENT_LIMIT: u64 = 16 * 1024 * 1024;

/// A segment with records is also closed after this long, so a quiet server does not keep an old
/// segment (and a longer replay) around.
const SEGMENT_MAX_AGE: Duration = Duration::from_secs(5);

/// How long a shutdown waits for sessions still writing files before leaving the journal to replay.
const STOP_GRACE: Duration = Duration::from_secs(10);

const MAGIC: &[u8; 4] = b"BJR1";
const HEADER_LEN: usize = 4 + 1 + 16 + 4 + 8 + 4;
const KIND_MESSAGE: u8 = 1;
const KIND_FORGET: u8 = 2;

/// One record found in a segment.
#[derive(Debug, PartialEq)]
enum Record {
    Message { id: QueueId, envelope: Vec<u8>, body: Vec<u8> },
    Forget { id: QueueId },
}

fn encode(out: &mut Vec<u8>, kind: u8, id: &str, envelope: &[u8], body: &[u8]) {
    let mut id_bytes = [b'0'; 16];
    let n = id.len().min(16);
    id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
    let mut head = Vec::with_capacity(HEADER_LEN);
    head.push(kind);
    head.extend_from_slice(&id_bytes);
    head.extend_from_slice(&(envelope.len() as u32).to_le_bytes());
    head.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(envelope);
    crc.update(body);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&head);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(envelope);
    out.extend_from_slice(body);
}

/// Parses the records of one segment, up to the first one that is torn or damaged.
fn decode(mut data: &[u8]) -> Vec<Record> {
    let mut records = Vec::new();
    while data.len() >= HEADER_LEN && &data[..4] == MAGIC {
        let head = &data[4..HEADER_LEN - 4];
        let kind = head[0];
        let id = String::from_utf8_lossy(&head[1..17]).into_owned();
        let env_len = u32::from_le_bytes([head[17], head[18], head[19], head[20]]) as usize;
        let mut body_len_bytes = [0u8; 8];
        body_len_bytes.copy_from_slice(&head[21..29]);
        let Ok(body_len) = usize::try_from(u64::from_le_bytes(body_len_bytes)) else { break };
        let stored_crc = u32::from_le_bytes([
            data[HEADER_LEN - 4],
            data[HEADER_LEN - 3],
            data[HEADER_LEN - 2],
            data[HEADER_LEN - 1],
        ]);
        let Some(end) = HEADER_LEN.checked_add(env_len).and_then(|n| n.checked_add(body_len)) else { break };
        if data.len() < end {
            break;
        }
        let (envelope, body) = data[HEADER_LEN..end].split_at(env_len);
        let mut crc = crc32fast::Hasher::new();
        crc.update(head);
        crc.update(envelope);
        crc.update(body);
        if crc.finalize() != stored_crc || !super::is_queue_id(&id) {
            break;
        }
        match kind {
            KIND_MESSAGE => records.push(Record::Message { id, envelope: envelope.to_vec(), body: body.to_vec() }),
            KIND_FORGET => records.push(Record::Forget { id }),
            _ => break,
        }
        data = &data[end..];
    }
    records
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:016}.wal"))
}

/// The segments in `dir`, oldest first.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let number = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok());
        match number {
            Some(number) => found.push((number, path)),
            // A segment being created when the process died: it never held a record.
            None => fs::remove_file(&path).map_err(io_err(&path))?,
        }
    }
    found.sort();
    Ok(found)
}

/// What a replay did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Replayed {
    /// Messages restored (or confirmed) from the journal.
    pub restored: usize,
    /// Messages whose forget record meant their leftover files were removed.
    pub forgotten: usize,
    /// The highest segment number seen, so new segments sort after it.
    pub last_segment: u64,
}

/// Restores every message recorded in the journal's segments into `messages/`, removes the files of
/// forgotten ones, makes it all durable and deletes the segments. Runs before the spool's own
/// recovery, which then sees an ordinary spool.
pub fn replay(journal: &Path, messages: &Path) -> Result<Replayed, SpoolError> {
    let mut replayed = Replayed::default();
    let found = segments(journal)?;
    if found.is_empty() {
        return Ok(replayed);
    }
    let mut live: BTreeMap<QueueId, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
    let mut forgotten: HashSet<QueueId> = HashSet::new();
    for (number, path) in &found {
        replayed.last_segment = replayed.last_segment.max(*number);
        let data = fs::read(path).map_err(io_err(path))?;
        for record in decode(&data) {
            match record {
                Record::Message { id, envelope, body } => {
                    forgotten.remove(&id);
                    live.insert(id, (envelope, body));
                }
                Record::Forget { id } => {
                    live.remove(&id);
                    forgotten.insert(id);
                }
            }
        }
    }
    for (id, (envelope, body)) in &live {
        restore(messages, id, envelope, body)?;
        replayed.restored += 1;
    }
    for id in &forgotten {
        for ext in ["env", "msg"] {
            let path = messages.join(format!("{id}.{ext}"));
            match fs::remove_file(&path) {
                Ok(()) => replayed.forgotten += usize::from(ext == "env"),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(SpoolError::Io { path, source: err }),
            }
        }
    }
    sync_dir(messages)?;
    for (_, path) in &found {
        fs::remove_file(path).map_err(io_err(path))?;
    }
    sync_dir(journal)?;
    Ok(replayed)
}

/// Writes a journaled message's files: the body always (it never changes, and the copy on disk may
/// be torn), the envelope only if the one on disk does not parse (a later update is newer than the
/// record and was made durable on its own).
fn restore(messages: &Path, id: &str, envelope: &[u8], body: &[u8]) -> Result<(), SpoolError> {
    let body_path = messages.join(format!("{id}.msg"));
    write_synced(&body_path, body)?;
    let env_path = messages.join(format!("{id}.env"));
    let current_parses = fs::read(&env_path)
        .ok()
        .is_some_and(|bytes| serde_json::from_slice::<super::Envelope>(&bytes).is_ok());
    if !current_parses {
        write_synced(&env_path, envelope)?;
    }
    Ok(())
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), SpoolError> {
    let mut file =
        OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io_err(path))?;
    file.write_all(data).and_then(|()| file.sync_all()).map_err(io_err(path))
}

/// The live journal of a running spool.
pub struct Journal {
    shared: Arc<Shared>,
    retirer: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    dir: PathBuf,
    messages: PathBuf,
    state: Mutex<State>,
    /// Woken when a flush ends (its waiters find their result) or a rotation ends.
    flushed: Condvar,
    /// Wakes the retirer: a segment closed, a message's files were written, or stop.
    retire: Condvar,
}

struct Segment {
    number: u64,
    file: Arc<File>,
    size: u64,
    opened: Instant,
}

/// Messages recorded in one segment, for its retirement.
#[derive(Default)]
struct Members {
    ids: Vec<QueueId>,
    /// Messages whose files in `messages/` are not written yet.
    unplaced: usize,
    closed: bool,
}

struct State {
    /// Encoded records waiting for the next flush, and the tickets (with message IDs) they carry.
    pending: Vec<u8>,
    pending_tickets: Vec<(u64, Option<QueueId>)>,
    next_ticket: u64,
    /// A flush or rotation is running (its thread has released the lock to do I/O).
    busy: bool,
    /// Outcome of each flushed ticket: the segment it landed in, or the error.
    results: HashMap<u64, Result<u64, io::ErrorKind>>,
    current: Option<Segment>,
    /// Segments not yet retired, oldest first (the current one included).
    members: BTreeMap<u64, Members>,
    /// Each message whose record sits in a segment not yet retired, with that segment.
    live: HashMap<QueueId, u64>,
    /// Set on shutdown; `retire_all` says whether to retire what is left first.
    stop: bool,
    retire_all: bool,
}

impl Journal {
    /// Starts the journal in `dir` (replayed and empty), with a fresh segment numbered after `last`.
    pub fn start(dir: &Path, messages: &Path, last: u64) -> Result<Journal, SpoolError> {
        let segment = create_segment(dir, last + 1)?;
        let mut members = BTreeMap::new();
        members.insert(segment.number, Members::default());
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            messages: messages.to_path_buf(),
            state: Mutex::new(State {
                pending: Vec::new(),
                pending_tickets: Vec::new(),
                next_ticket: 0,
                busy: false,
                results: HashMap::new(),
                current: Some(segment),
                members,
                live: HashMap::new(),
                stop: false,
                retire_all: true,
            }),
            flushed: Condvar::new(),
            retire: Condvar::new(),
        });
        let for_thread = Arc::clone(&shared);
        let retirer = std::thread::Builder::new()
            .name("journal-retire".into())
            .spawn(move || for_thread.retire_loop())
            .map_err(io_err(dir))?;
        Ok(Journal { shared, retirer: Some(retirer) })
    }

    /// Appends a message and returns once it is durable. The caller then writes its files and calls
    /// [`Journal::placed`] (also when writing them failed).
    pub fn append_message(&self, id: &str, envelope: &[u8], body: &[u8]) -> Result<(), SpoolError> {
        let mut record = Vec::with_capacity(HEADER_LEN + envelope.len() + body.len());
        encode(&mut record, KIND_MESSAGE, id, envelope, body);
        self.shared.append(record, vec![Some(id.to_string())]).map(|_| ())
    }

    /// The message's files are written (or abandoned): its segment may be retired.
    pub fn placed(&self, id: &str) {
        let mut state = lock(&self.shared.state);
        if let Some(segment) = state.live.get(id).copied()
            && let Some(members) = state.members.get_mut(&segment)
        {
            members.unplaced = members.unplaced.saturating_sub(1);
            if members.unplaced == 0 && members.closed {
                self.shared.retire.notify_all();
            }
        }
    }

    /// Before removing messages: durably records that those still in the journal are gone, so a
    /// replay does not restore them.
    pub fn forget(&self, ids: &[QueueId]) -> Result<(), SpoolError> {
        let in_journal: Vec<&QueueId> = {
            let state = lock(&self.shared.state);
            ids.iter().filter(|id| state.live.contains_key(*id)).collect()
        };
        if in_journal.is_empty() {
            return Ok(());
        }
        let mut records = Vec::with_capacity(in_journal.len() * HEADER_LEN);
        for id in &in_journal {
            encode(&mut records, KIND_FORGET, id, &[], &[]);
        }
        self.shared.append(records, vec![None]).map(|_| ())
    }

    /// Stops the retirer without retiring what is left, as a crash would (tests only).
    #[cfg(test)]
    pub fn halt(&mut self) {
        lock(&self.shared.state).retire_all = false;
        self.stop();
    }

    fn stop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.retire.notify_all();
        if let Some(thread) = self.retirer.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Journal {
    /// A clean shutdown retires every segment, leaving an ordinary spool behind.
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    /// Queues `record` for the next flush and waits for it. The first waiter to find no flush
    /// running does the flush for everyone queued so far (leader/follower, like [`super::DirSync`]).
    fn append(&self, record: Vec<u8>, ids: Vec<Option<QueueId>>) -> Result<u64, SpoolError> {
        let mut state = lock(&self.state);
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.pending.extend_from_slice(&record);
        for id in ids {
            state.pending_tickets.push((ticket, id));
        }
        loop {
            if let Some(result) = state.results.remove(&ticket) {
                return result.map_err(|kind| SpoolError::Io { path: self.dir.clone(), source: kind.into() });
            }
            if !state.busy {
                state = self.flush(state);
                continue;
            }
            state = self.flushed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Writes and fdatasyncs everything pending as one group.
    fn flush<'a>(&'a self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        if state.current.is_none() {
            // The segment was closed after a failed write and no new one could be made: try again,
            // and fail the group if that fails too.
            state = self.rotate(state);
            if state.current.is_none() {
                state.pending.clear();
                for (ticket, _) in std::mem::take(&mut state.pending_tickets) {
                    state.results.insert(ticket, Err(io::ErrorKind::Other));
                }
                self.flushed.notify_all();
                return state;
            }
        }
        let data = std::mem::take(&mut state.pending);
        let tickets = std::mem::take(&mut state.pending_tickets);
        let Some(segment) = state.current.as_ref().map(|s| (s.number, Arc::clone(&s.file), s.size)) else {
            return state;
        };
        let (number, file, size) = segment;
        state.busy = true;
        drop(state);
        let written = (&*file).write_all(&data).and_then(|()| rustix::fs::fdatasync(&*file).map_err(io::Error::from));
        // Cut a torn record off, so the segment stays readable to its end; if even that fails, the
        // segment is closed (its records before the tear still count) and the next flush opens another.
        let torn = written.is_err() && file.set_len(size).is_err();
        let mut state = lock(&self.state);
        state.busy = false;
        if torn && let Some(old) = state.current.take() {
            state.members.entry(old.number).or_default().closed = true;
            self.retire.notify_all();
        }
        match written {
            Ok(()) => {
                if let Some(current) = state.current.as_mut() {
                    current.size += data.len() as u64;
                }
                for (ticket, id) in tickets {
                    if let Some(id) = id {
                        state.live.insert(id.clone(), number);
                        let members = state.members.entry(number).or_default();
                        members.ids.push(id);
                        members.unplaced += 1;
                    }
                    state.results.insert(ticket, Ok(number));
                }
            }
            Err(err) => {
                tracing::error!(segment = %segment_path(&self.dir, number).display(), error = %err, "journal write failed");
                for (ticket, _) in tickets {
                    state.results.insert(ticket, Err(err.kind()));
                }
            }
        }
        let full = state.current.as_ref().is_some_and(|s| s.size >= SEGMENT_LIMIT);
        if full {
            state = self.rotate(state);
        }
        self.flushed.notify_all();
        state
    }

    /// Closes the current segment and opens the next. Called with no flush running.
    fn rotate<'a>(&'a self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let next = state.members.keys().next_back().copied().unwrap_or(0) + 1;
        state.busy = true;
        drop(state);
        let created = create_segment(&self.dir, next);
        let mut state = lock(&self.state);
        state.busy = false;
        match created {
            Ok(segment) => {
                if let Some(old) = state.current.take()
                    && let Some(members) = state.members.get_mut(&old.number)
                {
                    members.closed = true;
                }
                state.members.insert(segment.number, Members::default());
                state.current = Some(segment);
                self.retire.notify_all();
            }
            Err(err) => tracing::error!(error = %err, "cannot open a new journal segment"),
        }
        self.flushed.notify_all();
        state
    }

    /// The retirer thread: retires closed segments in order and closes idle ones. At shutdown it
    /// retires everything, unless a message never got its files written within [`STOP_GRACE`]; then
    /// the segments stay for the next start's replay.
    fn retire_loop(&self) {
        let mut state = lock(&self.state);
        let mut stop_deadline = None;
        loop {
            if state.stop && !state.retire_all {
                return;
            }
            if let Some(number) = self.ready_to_retire(&state) {
                state = self.retire_oldest(state, number);
                continue;
            }
            let has_records = state.current.as_ref().is_some_and(|s| s.size > 0);
            let old = state.current.as_ref().is_some_and(|s| s.opened.elapsed() >= SEGMENT_MAX_AGE);
            if has_records && (state.stop || old) && !state.busy && state.pending.is_empty() {
                state = self.rotate(state);
                continue;
            }
            if state.stop {
                let deadline = *stop_deadline.get_or_insert_with(|| Instant::now() + STOP_GRACE);
                let all_retired = state.members.len() <= 1 && !has_records;
                if all_retired || Instant::now() >= deadline {
                    return self.finish(state);
                }
            }
            let (guard, _) =
                self.retire.wait_timeout(state, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner());
            state = guard;
        }
    }

    fn retire_oldest<'a>(&'a self, state: MutexGuard<'a, State>, number: u64) -> MutexGuard<'a, State> {
        let ids = state.members.get(&number).map(|m| m.ids.clone()).unwrap_or_default();
        drop(state);
        let retired = self.retire_segment(number, &ids);
        let mut state = lock(&self.state);
        match retired {
            Ok(()) => {
                state.members.remove(&number);
                for id in &ids {
                    if state.live.get(id) == Some(&number) {
                        state.live.remove(id);
                    }
                }
                state
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot retire a journal segment; will retry");
                let (guard, _) =
                    self.retire.wait_timeout(state, Duration::from_secs(1)).unwrap_or_else(|p| p.into_inner());
                guard
            }
        }
    }

    /// At shutdown, with everything retired: deletes the empty current segment.
    fn finish(&self, mut state: MutexGuard<'_, State>) {
        if let Some(current) = state.current.take()
            && current.size == 0
        {
            let path = segment_path(&self.dir, current.number);
            drop(state);
            if fs::remove_file(&path).is_ok() {
                let _ = sync_dir(&self.dir);
            }
        }
    }

    /// The oldest segment, if it is closed and every message in it has its files written.
    fn ready_to_retire(&self, state: &State) -> Option<u64> {
        let (number, members) = state.members.iter().next()?;
        (members.closed && members.unplaced == 0).then_some(*number)
    }

    /// Makes the files of a closed segment's messages durable, then deletes the segment.
    fn retire_segment(&self, number: u64, ids: &[QueueId]) -> Result<(), SpoolError> {
        if !ids.is_empty() {
            // One syncfs writes back every file of the segment (thousands) with one journal commit
            // of the filesystem, instead of an fsync (and a commit) per file.
            let dir = File::open(&self.messages).map_err(io_err(&self.messages))?;
            rustix::fs::syncfs(&dir).map_err(|e| SpoolError::Io { path: self.messages.clone(), source: e.into() })?;
        }
        let path = segment_path(&self.dir, number);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(SpoolError::Io { path, source: err }),
        }
        sync_dir(&self.dir)
    }
}

/// Creates a segment and makes its name durable before any record is written to it.
fn create_segment(dir: &Path, number: u64) -> Result<Segment, SpoolError> {
    let path = segment_path(dir, number);
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    file.sync_all().map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok(Segment { number, file: Arc::new(file), size: 0, opened: Instant::now() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_tail_is_ignored() {
        let mut data = Vec::new();
        encode(&mut data, KIND_MESSAGE, "0000000000001000", b"{}", b"body\r\n");
        encode(&mut data, KIND_FORGET, "0000000000001000", &[], &[]);
        let whole = data.len();
        encode(&mut data, KIND_MESSAGE, "0000000000002000", b"{\"a\":1}", b"second");
        let records = decode(&data);
        assert_eq!(records.len(), 3);
        assert_eq!(
            records[0],
            Record::Message { id: "0000000000001000".into(), envelope: b"{}".to_vec(), body: b"body\r\n".to_vec() }
        );
        assert_eq!(records[1], Record::Forget { id: "0000000000001000".into() });
        for cut in whole..data.len() {
            assert_eq!(decode(&data[..cut]).len(), 2, "torn at {cut}");
        }
        // A flipped bit in the last record's body ends the segment there.
        let last = data.len() - 1;
        data[last] ^= 1;
        assert_eq!(decode(&data).len(), 2);
    }
}

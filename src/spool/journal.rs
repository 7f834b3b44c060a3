//! The write-ahead journal: how a small message becomes durable with one disk wait shared by every
//! session committing at the same moment (group commit), and without creating a file.
//!
//! A message up to [`MAX_JOURNALED_BODY`] octets is appended whole (envelope and body) to the current
//! segment `journal/NNNNNNNNNNNNNNNN.wal`, and one `fdatasync` makes a whole group of such appends
//! durable; only then do their sessions answer 250. The message then lives in its segment: its body
//! is read from there, and when it is delivered a *forget* record says so. Creating two files per
//! message (and deleting them) was what limited acceptance: on a filesystem with much churn, inode
//! allocation costs more CPU than everything else together.
//!
//! A closed segment is *retired*: deleted as soon as none of its messages is still queued from it;
//! when less than a quarter of it is still needed, its surviving messages are first copied to the
//! current segment (compaction). A checkpoint (`bartleby queue sync`) instead gives every journaled
//! message its ordinary files in `messages/` (made durable with one `syncfs`). A change of state is
//! an envelope record.
//!
//! Segments are retired oldest first, so a forget record always outlives the record it cancels.
//! On start, [`replay`] reads the segments left: messages without files are queued from their
//! records again; messages that also have files (written by a retirement or update that a crash
//! interrupted) get their body rewritten from the record.
//!
//! Record layout (little-endian): magic `BJR1`, kind (1 message, 2 forget, 3 envelope), queue ID (16 octets),
//! envelope length (u32), body length (u64), CRC-32 of everything after the magic except itself, then
//! the envelope JSON and the body. A replay stops at the first record that does not check out: a
//! write torn by a crash is always the last thing in its segment.

use super::index::{Key, id_of, key};
use super::keyed::{KeyMap, KeySet, Keyed, Slot};
use super::{QueueId, SpoolError, io_err, lock, sync_dir};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bodies up to this size go through the journal (held in memory while received); larger ones are
/// written to their own file and fsync'd, where the data, not the number of disk waits, is the cost.
pub const MAX_JOURNALED_BODY: usize = 512 * 1024;

/// A closed segment in which less than this share of the octets still belong to queued messages is
/// compacted: its survivors are copied to the current segment and it is deleted, so a few
/// stragglers do not keep a mostly delivered segment on disk.
const COMPACT_BELOW: f64 = 0.25;

/// A segment is closed once it holds this much.
const SEGMENT_LIMIT: u64 = 16 * 1024 * 1024;

/// A segment with records is also closed after this long, so it can be retired.
const SEGMENT_MAX_AGE: Duration = Duration::from_secs(5);

const MAGIC: &[u8; 4] = b"BJR1";
const HEADER_LEN: usize = 4 + 1 + 16 + 4 + 8 + 4;
const KIND_MESSAGE: u8 = 1;
const KIND_FORGET: u8 = 2;
const KIND_ENVELOPE: u8 = 3;

/// One record found in a segment; ranges are offsets in the segment.
#[derive(Debug, PartialEq)]
enum Record {
    Message {
        id: Key,
        envelope: Range<usize>,
        body: Range<usize>,
    },
    Forget {
        id: Key,
    },
    /// A newer envelope for a message recorded earlier (a durable change of state).
    Envelope {
        id: Key,
        envelope: Range<usize>,
    },
}

/// The key of a record's 16-octet queue ID, if it is one (upper-case hexadecimal); parsed from the
/// octets without a string, as a restart does this a million times.
fn record_key(octets: &[u8]) -> Option<Key> {
    if octets.len() != 16 {
        return None;
    }
    octets.iter().try_fold(0u64, |key, &b| {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        Some(key << 4 | u64::from(digit))
    })
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
fn decode(data: &[u8]) -> Vec<Record> {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some(rest) = data.get(at..)
        && rest.len() >= HEADER_LEN
        && &rest[..4] == MAGIC
    {
        let head = &rest[4..HEADER_LEN - 4];
        let kind = head[0];
        let env_len = u32::from_le_bytes([head[17], head[18], head[19], head[20]]) as usize;
        let mut body_len_bytes = [0u8; 8];
        body_len_bytes.copy_from_slice(&head[21..29]);
        let Ok(body_len) = usize::try_from(u64::from_le_bytes(body_len_bytes)) else { break };
        let crc_bytes = &rest[HEADER_LEN - 4..HEADER_LEN];
        let stored_crc = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        let Some(end) = HEADER_LEN.checked_add(env_len).and_then(|n| n.checked_add(body_len)) else { break };
        if rest.len() < end {
            break;
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(head);
        crc.update(&rest[HEADER_LEN..end]);
        if crc.finalize() != stored_crc {
            break;
        }
        let Some(id) = record_key(&head[1..17]) else { break };
        let envelope = at + HEADER_LEN..at + HEADER_LEN + env_len;
        let body = envelope.end..at + end;
        match kind {
            KIND_MESSAGE => records.push(Record::Message { id, envelope, body }),
            KIND_FORGET => records.push(Record::Forget { id }),
            KIND_ENVELOPE => records.push(Record::Envelope { id, envelope }),
            _ => break,
        }
        at += end;
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
        if let Some(number) = number {
            found.push((number, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Where a journaled message's body is (in the segment of its message record) and its latest
/// envelope (in that segment or a newer one).
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    segment: u64,
    body: Range<u64>,
    envelope_segment: u64,
    envelope: Range<u64>,
}

/// [`Stored`] in 24 octets instead of 48, as the journal keeps it for each of a million messages:
/// segment numbers and offsets fit in 32 bits (a segment is closed at [`SEGMENT_LIMIT`], and a
/// flush that would take one past 4 GiB fails instead).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Packed {
    segment: u32,
    body_start: u32,
    body_len: u32,
    envelope_segment: u32,
    envelope_start: u32,
    envelope_len: u32,
}

impl Slot for Packed {
    const VACANT: Packed = Packed {
        segment: u32::MAX,
        body_start: 0,
        body_len: 0,
        envelope_segment: 0,
        envelope_start: 0,
        envelope_len: 0,
    };

    fn is_vacant(&self) -> bool {
        self.segment == u32::MAX
    }
}

impl Packed {
    fn new(stored: &Stored) -> Option<Packed> {
        let n = |v: u64| u32::try_from(v).ok();
        Some(Packed {
            segment: n(stored.segment).filter(|s| *s != u32::MAX)?,
            body_start: n(stored.body.start)?,
            body_len: n(stored.body.end.checked_sub(stored.body.start)?)?,
            envelope_segment: n(stored.envelope_segment)?,
            envelope_start: n(stored.envelope.start)?,
            envelope_len: n(stored.envelope.end.checked_sub(stored.envelope.start)?)?,
        })
    }

    fn unpack(&self) -> Stored {
        let range = |start: u32, len: u32| u64::from(start)..u64::from(start) + u64::from(len);
        Stored {
            segment: u64::from(self.segment),
            body: range(self.body_start, self.body_len),
            envelope_segment: u64::from(self.envelope_segment),
            envelope: range(self.envelope_start, self.envelope_len),
        }
    }

    /// A newer envelope of the message; false when its place does not fit (never, see above).
    fn set_envelope(&mut self, segment: u64, envelope: &Range<u64>) -> bool {
        let mut stored = self.unpack();
        stored.envelope_segment = segment;
        stored.envelope = envelope.clone();
        Packed::new(&stored).map(|packed| *self = packed).is_some()
    }
}

/// A message read back from the journal.
pub struct JournaledMessage {
    pub id: QueueId,
    pub envelope: Vec<u8>,
    pub body: Vec<u8>,
}

/// What [`replay`] found: the journal's state for [`Journal::start`].
#[derive(Default)]
pub struct Replay {
    /// Each segment's messages and size.
    segments: BTreeMap<u64, (Vec<Key>, u64)>,
    with_files: HashMap<Key, u64>,
    stored: Keyed<Packed>,
    /// Messages that also had files, whose body was rewritten from the record.
    pub restored: usize,
}

/// Segments each reader thread scans ahead of the records being applied: the envelopes of a few
/// segments are in memory at a time, not those of a million messages.
const SEGMENTS_AHEAD_PER_READER: usize = 2;

/// Reads every segment left by the last run (see the module docs). Does not delete segments.
/// Each record's envelope is parsed with `parse` on all cores, and `found` is told, in record
/// order, of each message queued from the journal with its latest envelope (Some) or that a message
/// it was told of is not (None: forgotten, or given its files back).
pub fn replay<T: Send>(
    journal: &Path,
    messages: &Path,
    parse: &(dyn Fn(&[u8]) -> T + Sync),
    found: &mut dyn FnMut(Key, Option<T>),
) -> Result<Replay, SpoolError> {
    let mut replay = Replay::default();
    let mut latest: KeyMap<Packed> = KeyMap::default();
    let mut forgotten: KeySet = KeySet::default();
    scan_in_order(segments(journal)?, parse, &mut |scan| {
        let number = scan.number;
        let (ids, size) = replay.segments.entry(number).or_default();
        *size = scan.size;
        for record in scan.records {
            match record {
                Scanned::Message { id, envelope, parsed, body } => {
                    forgotten.remove(&id);
                    ids.push(id);
                    let stored = Stored { segment: number, body, envelope_segment: number, envelope };
                    let Some(packed) = Packed::new(&stored) else { continue };
                    latest.insert(id, packed);
                    found(id, Some(parsed));
                }
                Scanned::Forget { id } => {
                    if latest.remove(&id).is_some() {
                        found(id, None);
                    }
                    forgotten.insert(id);
                }
                // An update of a message whose record is gone had given it files already.
                Scanned::Envelope { id, envelope, parsed } => {
                    if let Some(stored) = latest.get_mut(&id)
                        && stored.set_envelope(number, &envelope)
                    {
                        found(id, Some(parsed));
                    }
                }
            }
        }
        Ok(())
    })?;
    // One directory read instead of a lookup per record (restart time matters with 100,000 queued).
    let with_files: KeySet = fs::read_dir(messages)
        .map_err(io_err(messages))?
        .filter_map(|e| key(e.ok()?.path().file_stem()?.to_str()?))
        .collect();
    let mut rewritten = false;
    let mut queued = Vec::with_capacity(latest.len());
    for (id, packed) in latest {
        if with_files.contains(&id) {
            let stored = packed.unpack();
            let read = |segment: u64, range: &Range<u64>| -> Result<Vec<u8>, SpoolError> {
                let path = segment_path(journal, segment);
                let file = File::open(&path).map_err(io_err(&path))?;
                let mut data = vec![0; usize::try_from(range.end - range.start).unwrap_or(0)];
                file.read_exact_at(&mut data, range.start).map_err(io_err(&path))?;
                Ok(data)
            };
            let body = read(stored.segment, &stored.body)?;
            let envelope = read(stored.envelope_segment, &stored.envelope)?;
            restore(messages, &id_of(id), &envelope, &body)?;
            found(id, None);
            rewritten = true;
            replay.restored += 1;
            replay.with_files.insert(id, stored.segment);
        } else {
            queued.push((id, packed));
        }
    }
    replay.stored = Keyed::from_unsorted(queued);
    for id in forgotten.iter().filter(|id| with_files.contains(*id)).map(|k| id_of(*k)) {
        for ext in ["env", "msg"] {
            let path = messages.join(format!("{id}.{ext}"));
            match fs::remove_file(&path) {
                Ok(()) => rewritten = true,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(SpoolError::Io { path, source: err }),
            }
        }
    }
    if rewritten {
        syncfs(messages)?;
    }
    Ok(replay)
}

/// A segment's records as found by [`scan_segments`], with the envelopes parsed.
struct SegmentScan<T> {
    number: u64,
    size: u64,
    records: Vec<Scanned<T>>,
}

enum Scanned<T> {
    Message { id: Key, envelope: Range<u64>, parsed: T, body: Range<u64> },
    Forget { id: Key },
    Envelope { id: Key, envelope: Range<u64>, parsed: T },
}

/// Reads, checks and parses the segments on all cores, each reader a few segments ahead, and
/// hands them to `each` in order while the readers go on: applying one segment's records overlaps
/// with reading the next (a restart with a million queued reads gigabytes).
fn scan_in_order<T: Send>(
    found: Vec<(u64, PathBuf)>,
    parse: &(dyn Fn(&[u8]) -> T + Sync),
    each: &mut dyn FnMut(SegmentScan<T>) -> Result<(), SpoolError>,
) -> Result<(), SpoolError> {
    let readers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8).min(found.len()).max(1);
    let total = found.len();
    std::thread::scope(|scope| {
        let mut queues = Vec::with_capacity(readers);
        for reader in 0..readers {
            // Reader r scans segments r, r + readers, …: taking from the readers in turn gives the
            // segments in order.
            let mine: Vec<(u64, PathBuf)> = found.iter().skip(reader).step_by(readers).cloned().collect();
            let (tx, rx) = std::sync::mpsc::sync_channel(SEGMENTS_AHEAD_PER_READER);
            std::thread::Builder::new()
                .name("journal-replay".into())
                .spawn_scoped(scope, move || {
                    for (number, path) in mine {
                        let scanned = Mapped::open(&path).map(|data| scan(number, data.bytes(), parse));
                        // The receiver is gone when applying failed: stop reading.
                        if tx.send(scanned.map_err(io_err(&path))).is_err() {
                            break;
                        }
                    }
                })
                .map_err(io_err(Path::new("(journal replay)")))?;
            queues.push(rx);
        }
        for at in 0..total {
            let gone = || io_err(Path::new("(journal replay)"))(io::Error::other("a segment reader failed"));
            let scanned = queues[at % readers].recv().map_err(|_| gone())??;
            each(scanned)?;
        }
        Ok(())
    })
}

/// A segment's bytes mapped read-only for a replay: a copy of each through read(2) was a sixth of
/// a restart's time with a million queued.
struct Mapped {
    addr: *mut std::ffi::c_void,
    len: usize,
}

impl Mapped {
    fn open(path: &Path) -> io::Result<Mapped> {
        let file = File::open(path)?;
        let len = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
        if len == 0 {
            return Ok(Mapped { addr: std::ptr::null_mut(), len: 0 });
        }
        // SAFETY: a private read-only mapping of a whole segment. Segments are written only by the
        // journal, which has not started while a replay runs (the spool's lock is held), and are
        // appended to or deleted, never truncated, so every mapped page stays backed by the file.
        let addr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ,
                // Faulted in at once: a page fault per 4 KiB of gigabytes cost more.
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::POPULATE,
                &file,
                0,
            )
        }?;
        // SAFETY: advice on the mapping just made; it changes no data.
        let _ = unsafe { rustix::mm::madvise(addr, len, rustix::mm::Advice::Sequential) };
        Ok(Mapped { addr, len })
    }

    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the mapping is `len` readable bytes, alive until drop.
        unsafe { std::slice::from_raw_parts(self.addr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps the mapping made in `open`; no slice of it outlives `self`.
            let _ = unsafe { rustix::mm::munmap(self.addr, self.len) };
        }
    }
}

fn scan<T>(number: u64, data: &[u8], parse: &(dyn Fn(&[u8]) -> T + Sync)) -> SegmentScan<T> {
    let records = decode(data)
        .into_iter()
        .map(|record| match record {
            Record::Message { id, envelope, body } => Scanned::Message {
                id,
                parsed: parse(&data[envelope.clone()]),
                envelope: range64(&envelope),
                body: range64(&body),
            },
            Record::Forget { id } => Scanned::Forget { id },
            Record::Envelope { id, envelope } => {
                Scanned::Envelope { id, parsed: parse(&data[envelope.clone()]), envelope: range64(&envelope) }
            }
        })
        .collect();
    SegmentScan { number, size: data.len() as u64, records }
}

fn range64(range: &Range<usize>) -> Range<u64> {
    range.start as u64..range.end as u64
}

/// Every message in the journal at `dir` that is not forgotten, read without changing anything (for
/// an export while the daemon runs).
pub fn read_messages(dir: &Path) -> Result<Vec<JournaledMessage>, SpoolError> {
    let mut latest: BTreeMap<Key, JournaledMessage> = BTreeMap::new();
    for (_, path) in segments(dir)? {
        let data = match fs::read(&path) {
            Ok(data) => data,
            // Retired while we read: its messages have their files by now.
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(SpoolError::Io { path, source: err }),
        };
        for record in decode(&data) {
            match record {
                Record::Message { id, envelope, body } => {
                    let message = JournaledMessage {
                        id: id_of(id),
                        envelope: data[envelope].to_vec(),
                        body: data[body].to_vec(),
                    };
                    latest.insert(id, message);
                }
                Record::Forget { id } => {
                    latest.remove(&id);
                }
                Record::Envelope { id, envelope } => {
                    if let Some(message) = latest.get_mut(&id) {
                        message.envelope = data[envelope].to_vec();
                    }
                }
            }
        }
    }
    Ok(latest.into_values().collect())
}

/// Writes a message's files from its record: the body always (it never changes, and the copy on
/// disk may be torn), the envelope only if the one on disk does not parse (a later update is newer
/// than the record). Not synced: the caller syncs the filesystem once for all of them.
pub(super) fn restore(messages: &Path, id: &str, envelope: &[u8], body: &[u8]) -> Result<(), SpoolError> {
    write_file(&messages.join(format!("{id}.msg")), body)?;
    let env_path = messages.join(format!("{id}.env"));
    let current_parses =
        fs::read(&env_path).ok().is_some_and(|bytes| serde_json::from_slice::<super::Envelope>(&bytes).is_ok());
    if !current_parses {
        write_file(&env_path, envelope)?;
    }
    Ok(())
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), SpoolError> {
    let mut file =
        OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io_err(path))?;
    super::give_to_spool_owner(&file, path)?;
    file.write_all(data).map_err(io_err(path))
}

/// One `syncfs` for the filesystem holding `dir`: thousands of files written back with one flush,
/// instead of an fsync (and a flush) per file.
fn syncfs(dir: &Path) -> Result<(), SpoolError> {
    let handle = File::open(dir).map_err(io_err(dir))?;
    rustix::fs::syncfs(&handle).map_err(|e| SpoolError::Io { path: dir.to_path_buf(), source: e.into() })
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
    /// Held while a journaled message's files are written or removed, so a retirement that gives a
    /// message its files and a removal of that message never interleave.
    files: Mutex<()>,
    /// Woken when a flush or rotation ends (its waiters find their result).
    flushed: Condvar,
    /// Wakes the retirer: a segment closed, a checkpoint was asked for, or stop.
    retire: Condvar,
}

struct Segment {
    number: u64,
    file: Arc<File>,
    size: u64,
    opened: Instant,
}

/// The messages recorded in one segment not yet retired.
#[derive(Default)]
struct Members {
    ids: Vec<Key>,
    /// When the segment was closed; None for the current one.
    closed: Option<Instant>,
    /// Its size in octets, known once closed.
    size: u64,
}

/// Records waiting for the next flush, under one ticket.
struct Pending {
    ticket: u64,
    entries: Vec<Entry>,
}

/// A message or envelope record among the pending ones; ranges are offsets in `State::pending`
/// (relative to the caller's buffer until queued).
struct Entry {
    id: Key,
    envelope: Range<usize>,
    /// None for an envelope update.
    body: Option<Range<usize>>,
}

struct State {
    pending: Vec<u8>,
    pending_records: Vec<Pending>,
    next_ticket: u64,
    /// A flush or rotation is running (its thread has released the lock to do I/O).
    busy: bool,
    /// Outcome of each flushed ticket.
    results: HashMap<u64, Result<(), io::ErrorKind>>,
    current: Option<Segment>,
    /// Segments not yet retired, oldest first (the current one included).
    members: BTreeMap<u64, Members>,
    /// Messages with files of their own whose last record still sits in a segment not yet retired,
    /// with that segment: removing one needs a forget record, as removing a queued one does.
    /// Few: those a checkpoint wrote out until their segment is deleted, and those a replay found
    /// with files.
    with_files: HashMap<Key, u64>,
    /// Messages queued from the journal (no files of their own yet), with where their latest
    /// record is: 32 octets each, as a million may be queued so.
    stored: Keyed<Packed>,
    /// Checkpoints asked for: materialize and retire everything now, whatever the segments' age.
    checkpoints: usize,
    stop: bool,
    /// Stop as a crash would: no clean-up (tests).
    halted: bool,
}

impl Journal {
    /// Starts the journal in `dir` with what [`replay`] found, and a fresh segment.
    pub fn start(dir: &Path, messages: &Path, replay: Replay) -> Result<Journal, SpoolError> {
        let last = replay.segments.keys().next_back().copied().unwrap_or(0);
        let segment = create_segment(dir, last + 1)?;
        let now = Instant::now();
        let mut members: BTreeMap<u64, Members> =
            replay.segments.into_iter().map(|(n, (ids, size))| (n, Members { ids, closed: Some(now), size })).collect();
        members.insert(segment.number, Members::default());
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            messages: messages.to_path_buf(),
            state: Mutex::new(State {
                pending: Vec::new(),
                pending_records: Vec::new(),
                next_ticket: 0,
                busy: false,
                results: HashMap::new(),
                current: Some(segment),
                members,
                with_files: replay.with_files,
                stored: replay.stored,
                checkpoints: 0,
                stop: false,
                halted: false,
            }),
            files: Mutex::new(()),
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

    /// Appends a message and returns once it is durable; from then on it is queued from its record.
    pub fn append_message(&self, id: &str, envelope: &[u8], body: &[u8]) -> Result<(), SpoolError> {
        let Some(id_key) = key(id) else { return Err(SpoolError::NotFound(id.to_string())) };
        let mut record = Vec::with_capacity(HEADER_LEN + envelope.len() + body.len());
        encode(&mut record, KIND_MESSAGE, id, envelope, body);
        let env_range = HEADER_LEN..HEADER_LEN + envelope.len();
        let body_range = env_range.end..record.len();
        self.shared.append(record, vec![Entry { id: id_key, envelope: env_range, body: Some(body_range) }])
    }

    /// Records newer envelopes of journaled messages (call with [`Journal::files_lock`] held, for
    /// messages [`Journal::holds`]); returns once durable. One group commit for all of them.
    pub fn update_envelopes(&self, envelopes: &[(QueueId, Vec<u8>)]) -> Result<(), SpoolError> {
        if envelopes.is_empty() {
            return Ok(());
        }
        let mut records = Vec::new();
        let mut entries = Vec::with_capacity(envelopes.len());
        for (id, json) in envelopes {
            let Some(id_key) = key(id) else { return Err(SpoolError::NotFound(id.clone())) };
            let start = records.len() + HEADER_LEN;
            encode(&mut records, KIND_ENVELOPE, id, json, &[]);
            entries.push(Entry { id: id_key, envelope: start..start + json.len(), body: None });
        }
        self.shared.append(records, entries)
    }

    /// Opens a journaled message's body, or returns None when the message is not queued from the
    /// journal (it has files of its own, or is gone). The location is resolved and the segment
    /// opened under the state lock, the lock a retirement takes to move the message elsewhere, and
    /// a segment is deleted only after its survivors were moved: so the segment found here still
    /// exists, and the open handle keeps its bytes readable however long the reader holds it, even
    /// after the segment is retired.
    pub fn open_body(&self, id: &str) -> Option<Result<SegmentReader, SpoolError>> {
        let state = lock(&self.shared.state);
        let stored = state.stored.get(&key(id)?)?.unpack();
        let path = segment_path(&self.shared.dir, stored.segment);
        // Opened while the lock is held: the segment cannot be retired in between. The handle is
        // the reader's own, closed when it is done, so no descriptor outlives the reading.
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(err) => return Some(Err(SpoolError::Io { path, source: err })),
        };
        drop(state);
        Some(Ok(SegmentReader { file, position: stored.body.start, end: stored.body.end }))
    }

    /// Reads a journaled message's latest envelope (JSON), or returns None when the message is not
    /// queued from the journal. Resolved and read under the state lock, like [`Journal::open_body`].
    pub fn read_envelope(&self, id: &str) -> Option<Result<Vec<u8>, SpoolError>> {
        let state = lock(&self.shared.state);
        let stored = state.stored.get(&key(id)?)?.unpack();
        let path = segment_path(&self.shared.dir, stored.envelope_segment);
        let len = usize::try_from(stored.envelope.end - stored.envelope.start).unwrap_or(0);
        let mut json = vec![0; len];
        let read = File::open(&path).and_then(|file| file.read_exact_at(&mut json, stored.envelope.start));
        drop(state);
        Some(read.map(|()| json).map_err(|source| SpoolError::Io { path, source }))
    }

    /// Is the message queued from the journal (no files of its own)?
    pub fn holds(&self, id: &str) -> bool {
        key(id).is_some_and(|k| lock(&self.shared.state).stored.contains_key(&k))
    }

    /// Held while the caller writes or removes files of messages that may be journaled.
    pub fn files_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.shared.files)
    }

    /// Before removing messages (with [`Journal::files_lock`] held): durably records that those whose
    /// record is still in the journal are gone, so a replay does not bring them back.
    pub fn forget(&self, ids: &[QueueId]) -> Result<(), SpoolError> {
        let mut records = Vec::new();
        {
            let state = lock(&self.shared.state);
            let recorded = |k: Key| state.stored.contains_key(&k) || state.with_files.contains_key(&k);
            for id in ids.iter().filter(|id| key(id).is_some_and(recorded)) {
                encode(&mut records, KIND_FORGET, id, &[], &[]);
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        self.shared.append(records, Vec::new())?;
        let mut state = lock(&self.shared.state);
        for id in ids.iter().filter_map(|id| key(id)) {
            state.stored.remove(&id);
        }
        Ok(())
    }

    /// Gives every journaled message its files and retires every closed segment, waiting until done
    /// (at most `limit`). Returns whether everything was retired.
    pub fn checkpoint(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        self.begin_checkpoint();
        let mut state = lock(&self.shared.state);
        loop {
            let done = Self::retired(&state);
            if done || Instant::now() >= deadline {
                state.checkpoints = state.checkpoints.saturating_sub(1);
                return done;
            }
            let (guard, _) =
                self.shared.flushed.wait_timeout(state, Duration::from_millis(50)).unwrap_or_else(|p| p.into_inner());
            state = guard;
        }
    }

    /// Asks the retirer to give every journaled message its files now; pair with
    /// [`Journal::end_checkpoint`]. For callers that must not block (the control socket).
    pub fn begin_checkpoint(&self) {
        lock(&self.shared.state).checkpoints += 1;
        self.shared.retire.notify_all();
    }

    pub fn end_checkpoint(&self) {
        let mut state = lock(&self.shared.state);
        state.checkpoints = state.checkpoints.saturating_sub(1);
    }

    /// No message is queued from the journal and only the current segment is left.
    pub fn checkpointed(&self) -> bool {
        Self::retired(&lock(&self.shared.state))
    }

    fn retired(state: &State) -> bool {
        let current = state.current.as_ref().map(|s| s.number);
        state.stored.is_empty() && state.members.keys().all(|n| Some(*n) == current)
    }

    /// How many messages are queued from the journal.
    pub fn queued(&self) -> usize {
        lock(&self.shared.state).stored.len()
    }

    /// Stops the retirer, as a crash would (tests only).
    #[cfg(test)]
    pub fn halt(&mut self) {
        lock(&self.shared.state).halted = true;
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
    /// Segments that hold queued mail are left as they are: the next start reads them back.
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    /// Queues `record` for the next flush and waits for it. The first waiter to find no flush
    /// running does the flush for everyone queued so far (leader/follower, like `DirSync`).
    fn append(&self, record: Vec<u8>, mut entries: Vec<Entry>) -> Result<(), SpoolError> {
        let mut state = lock(&self.state);
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let base = state.pending.len();
        for entry in &mut entries {
            entry.envelope = entry.envelope.start + base..entry.envelope.end + base;
            entry.body = entry.body.take().map(|body| body.start + base..body.end + base);
        }
        state.pending.extend_from_slice(&record);
        state.pending_records.push(Pending { ticket, entries });
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
                for pending in std::mem::take(&mut state.pending_records) {
                    state.results.insert(pending.ticket, Err(io::ErrorKind::Other));
                }
                self.flushed.notify_all();
                return state;
            }
        }
        let data = std::mem::take(&mut state.pending);
        let records = std::mem::take(&mut state.pending_records);
        let Some((number, file, size)) = state.current.as_ref().map(|s| (s.number, Arc::clone(&s.file), s.size)) else {
            return state;
        };
        if number > u64::from(u32::MAX) || size.saturating_add(data.len() as u64) > u64::from(u32::MAX) {
            // Never with segments closed at 16 MiB; refused rather than recorded where [`Packed`]
            // could not point.
            tracing::error!(segment = number, octets = data.len(), "journal group too large for a segment");
            for pending in records {
                state.results.insert(pending.ticket, Err(io::ErrorKind::Other));
            }
            self.flushed.notify_all();
            return state;
        }
        state.busy = true;
        drop(state);
        let written = (&*file).write_all(&data).and_then(|()| rustix::fs::fdatasync(&*file).map_err(io::Error::from));
        // Cut a torn record off, so the segment stays readable to its end; if even that fails, the
        // segment is closed (its records before the tear still count) and the next flush opens another.
        let torn = written.is_err() && file.set_len(size).is_err();
        let mut state = lock(&self.state);
        state.busy = false;
        match written {
            Ok(()) => {
                if let Some(current) = state.current.as_mut() {
                    current.size += data.len() as u64;
                }
                let at = |r: Range<usize>| size + r.start as u64..size + r.end as u64;
                for pending in records {
                    for entry in pending.entries {
                        match entry.body {
                            Some(body) => {
                                let stored = Stored {
                                    segment: number,
                                    body: at(body),
                                    envelope_segment: number,
                                    envelope: at(entry.envelope),
                                };
                                let Some(packed) = Packed::new(&stored) else {
                                    tracing::error!(queue_id = %id_of(entry.id), "journal offset beyond 4 GiB");
                                    continue;
                                };
                                state.with_files.remove(&entry.id);
                                state.stored.insert(entry.id, packed);
                                state.members.entry(number).or_default().ids.push(entry.id);
                            }
                            None => {
                                if let Some(stored) = state.stored.get_mut(&entry.id)
                                    && !stored.set_envelope(number, &at(entry.envelope))
                                {
                                    tracing::error!(queue_id = %id_of(entry.id), "journal offset beyond 4 GiB");
                                }
                            }
                        }
                    }
                    state.results.insert(pending.ticket, Ok(()));
                }
            }
            Err(err) => {
                tracing::error!(segment = %segment_path(&self.dir, number).display(), error = %err, "journal write failed");
                for pending in records {
                    state.results.insert(pending.ticket, Err(err.kind()));
                }
            }
        }
        if torn && let Some(old) = state.current.take() {
            let members = state.members.entry(old.number).or_default();
            members.closed = Some(Instant::now());
            members.size = old.size;
            self.retire.notify_all();
        }
        if state.current.as_ref().is_some_and(|s| s.size >= SEGMENT_LIMIT) {
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
                if let Some(old) = state.current.take() {
                    let members = state.members.entry(old.number).or_default();
                    members.closed = Some(Instant::now());
                    members.size = old.size;
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

    /// The retirer thread: closes segments that are old enough and retires closed ones, oldest first.
    fn retire_loop(&self) {
        let mut state = lock(&self.state);
        while !state.stop {
            let has_records = state.current.as_ref().is_some_and(|s| s.size > 0);
            let old = state.current.as_ref().is_some_and(|s| s.opened.elapsed() >= SEGMENT_MAX_AGE);
            if has_records && (old || state.checkpoints > 0) && !state.busy && state.pending.is_empty() {
                state = self.rotate(state);
                continue;
            }
            if let Some((number, survivors)) = self.ready_to_retire(&state) {
                let ids = state.members.get(&number).map(|m| m.ids.clone()).unwrap_or_default();
                drop(state);
                let retired = self.retire_segment(number, &ids, survivors);
                state = lock(&self.state);
                match retired {
                    Ok(()) => {
                        state.members.remove(&number);
                        for id in &ids {
                            if state.with_files.get(id) == Some(&number) {
                                state.with_files.remove(id);
                            }
                        }
                        self.flushed.notify_all();
                        continue;
                    }
                    Err(err) => tracing::error!(error = %err, "cannot retire a journal segment; will retry"),
                }
            }
            let (guard, _) =
                self.retire.wait_timeout(state, Duration::from_millis(500)).unwrap_or_else(|p| p.into_inner());
            state = guard;
        }
        if !state.halted {
            self.close(state);
        }
    }

    /// At shutdown: closes the current segment (deleting it if empty) and deletes every segment that
    /// holds no queued mail, so a stopped server leaves segments only where mail waits in them.
    fn close<'a>(&'a self, mut state: MutexGuard<'a, State>) {
        if let Some(current) = state.current.take() {
            if current.size == 0 {
                state.members.remove(&current.number);
                let path = segment_path(&self.dir, current.number);
                if fs::remove_file(&path).is_ok() {
                    let _ = sync_dir(&self.dir);
                }
            } else {
                let members = state.members.entry(current.number).or_default();
                members.closed = Some(Instant::now());
                members.size = current.size;
            }
        }
        while let Some((number, Survivors::None)) = self.ready_to_retire(&state) {
            let ids = state.members.remove(&number).map(|m| m.ids).unwrap_or_default();
            drop(state);
            if let Err(err) = self.retire_segment(number, &ids, Survivors::None) {
                tracing::warn!(error = %err, "journal segment left for the next start");
                return;
            }
            state = lock(&self.state);
        }
    }

    /// The oldest segment, if it is closed and either holds no queued message any more, or is mostly
    /// delivered, or a checkpoint asks for files; with what to do with its survivors.
    fn ready_to_retire(&self, state: &State) -> Option<(u64, Survivors)> {
        let (number, members) = state.members.iter().next()?;
        members.closed?;
        let live: u64 = members
            .ids
            .iter()
            .filter_map(|id| state.stored_in(id, *number))
            // The whole message record: a small body can be outweighed by its envelope.
            .map(|s| HEADER_LEN as u64 + (s.envelope.end - s.envelope.start) + (s.body.end - s.body.start))
            .sum();
        if live == 0 {
            return Some((*number, Survivors::None));
        }
        if state.checkpoints > 0 {
            return Some((*number, Survivors::ToFiles));
        }
        let mostly_delivered = (live as f64) < COMPACT_BELOW * members.size as f64;
        mostly_delivered.then_some((*number, Survivors::Relocate))
    }

    /// Moves the segment's queued messages (to the current segment or to files), then deletes it.
    fn retire_segment(&self, number: u64, ids: &[Key], survivors: Survivors) -> Result<(), SpoolError> {
        let path = segment_path(&self.dir, number);
        if survivors == Survivors::Relocate {
            self.relocate(number, ids)?;
        }
        if survivors == Survivors::ToFiles {
            self.write_out(number, ids)?;
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(SpoolError::Io { path, source: err }),
        }
        sync_dir(&self.dir)
    }
}

/// Survivors of a retiring segment handled at a time: at most 32 MiB of bodies in memory.
const SURVIVORS_AT_ONCE: usize = 64;

impl State {
    /// Where a message is stored, if it is queued from segment `number`.
    fn stored_in(&self, id: &Key, number: u64) -> Option<Stored> {
        self.stored.get(id).map(Packed::unpack).filter(|s| s.segment == number)
    }
}

/// What a retiring segment's queued messages need.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Survivors {
    /// There are none.
    None,
    /// Copied to the current segment (compaction): the journal keeps them, smaller.
    Relocate,
    /// Written to their own files (a checkpoint, `bartleby queue sync`).
    ToFiles,
}

impl Shared {
    /// Appends a copy of each message still queued from segment `number` (its latest envelope and
    /// its body) to the current segment; once durable, the copies are the ones queued and read.
    fn relocate(&self, number: u64, ids: &[Key]) -> Result<(), SpoolError> {
        let mut files: HashMap<u64, File> = HashMap::new();
        for chunk in ids.chunks(SURVIVORS_AT_ONCE) {
            let _files = lock(&self.files);
            let mut records = Vec::new();
            let mut entries = Vec::with_capacity(chunk.len());
            for JournaledMessage { id, envelope, body } in self.read_survivors(&mut files, number, chunk)? {
                let Some(id_key) = key(&id) else { continue };
                let env_start = records.len() + HEADER_LEN;
                encode(&mut records, KIND_MESSAGE, &id, &envelope, &body);
                let env_range = env_start..env_start + envelope.len();
                let body_range = env_range.end..env_range.end + body.len();
                entries.push(Entry { id: id_key, envelope: env_range, body: Some(body_range) });
            }
            if !entries.is_empty() {
                self.append(records, entries)?;
            }
        }
        Ok(())
    }

    /// Writes each message still queued from segment `number` to its own files; once they are durable
    /// (one `syncfs` per group), the files are the ones read.
    fn write_out(&self, number: u64, ids: &[Key]) -> Result<(), SpoolError> {
        let mut files: HashMap<u64, File> = HashMap::new();
        for chunk in ids.chunks(SURVIVORS_AT_ONCE) {
            let _files = lock(&self.files);
            let survivors = self.read_survivors(&mut files, number, chunk)?;
            for message in &survivors {
                write_file(&self.messages.join(format!("{}.msg", message.id)), &message.body)?;
                write_file(&self.messages.join(format!("{}.env", message.id)), &message.envelope)?;
            }
            // Readers switch to the files only once they are durable.
            syncfs(&self.messages)?;
            let mut state = lock(&self.state);
            for message in survivors.iter().filter_map(|m| key(&m.id)) {
                // Until the segment is deleted its record would bring the message back.
                state.stored.remove(&message);
                state.with_files.insert(message, number);
            }
        }
        Ok(())
    }

    /// The messages among `ids` still queued from segment `number`, each with its latest envelope
    /// and its body. Call with the files lock held, so none is removed meanwhile.
    fn read_survivors(
        &self,
        files: &mut HashMap<u64, File>,
        number: u64,
        ids: &[Key],
    ) -> Result<Vec<JournaledMessage>, SpoolError> {
        let stored: Vec<(QueueId, Stored)> = {
            let state = lock(&self.state);
            ids.iter().filter_map(|id| state.stored_in(id, number).map(|s| (id_of(*id), s))).collect()
        };
        stored
            .into_iter()
            .map(|(id, stored)| {
                let envelope = self.read_from(files, stored.envelope_segment, &stored.envelope)?;
                let body = self.read_from(files, stored.segment, &stored.body)?;
                Ok(JournaledMessage { id, envelope, body })
            })
            .collect()
    }

    /// Reads a stretch of a segment, keeping the segments opened so far in `files`.
    fn read_from(
        &self,
        files: &mut HashMap<u64, File>,
        segment: u64,
        range: &Range<u64>,
    ) -> Result<Vec<u8>, SpoolError> {
        let path = segment_path(&self.dir, segment);
        let file = match files.entry(segment) {
            std::collections::hash_map::Entry::Occupied(open) => open.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => slot.insert(File::open(&path).map_err(io_err(&path))?),
        };
        let len = usize::try_from(range.end - range.start).map_err(|e| io_err(&path)(io::Error::other(e)))?;
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, range.start).map_err(io_err(&path))?;
        Ok(buf)
    }
}

/// A journaled body being read: a stretch of a segment, through a handle of its own that keeps the
/// bytes readable even once the segment is retired (they are freed when the handle closes).
pub struct SegmentReader {
    file: File,
    position: u64,
    end: u64,
}

impl SegmentReader {
    /// The body's length in octets.
    pub fn len(&self) -> u64 {
        self.end - self.position
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Read for SegmentReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.end - self.position).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.position)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "journal segment ends inside a body"));
        }
        self.position += n as u64;
        Ok(n)
    }
}

/// Creates a segment and makes its name durable before any record is written to it.
fn create_segment(dir: &Path, number: u64) -> Result<Segment, SpoolError> {
    let path = segment_path(dir, number);
    let file = OpenOptions::new().append(true).create_new(true).mode(0o600).open(&path).map_err(io_err(&path))?;
    super::give_to_spool_owner(&file, &path)?;
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
        let Record::Message { id, envelope, body } = &records[0] else { panic!("not a message: {records:?}") };
        assert_eq!(*id, 0x1000);
        assert_eq!(&data[envelope.clone()], b"{}");
        assert_eq!(&data[body.clone()], b"body\r\n");
        assert_eq!(records[1], Record::Forget { id: 0x1000 });
        let Record::Message { body, .. } = &records[2] else { panic!("not a message: {records:?}") };
        assert_eq!(&data[body.clone()], b"second");
        for cut in whole..data.len() {
            assert_eq!(decode(&data[..cut]).len(), 2, "torn at {cut}");
        }
        // A flipped bit in the last record's body ends the segment there.
        let last = data.len() - 1;
        data[last] ^= 1;
        assert_eq!(decode(&data).len(), 2);
    }
}

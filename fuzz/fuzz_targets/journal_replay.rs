//! Journal replay: whatever a crash, a bad disk or a hostile local user leaves in the journal's
//! segments, a restart reads it without a panic, and the two readers of a segment agree.
//!
//! The input is a flags octet, then one segment's octets (record layout: `src/spool/journal.rs`).
//! Flag 1 recomputes each record's CRC-32, so that mutations of lengths, kinds and IDs reach the
//! code behind the check instead of stopping at it; flag 2 splits the records over two segments
//! (a forget or an envelope record in a newer segment than the message it is about).
//!
//! Checked: `replay` and `read_messages` find the same messages with the same envelopes; each
//! envelope decodes or is refused; and a second replay, with a torn `.env` and `.msg` left for each
//! message, restores both from the records.
#![no_main]
use bartleby::spool::journal::{read_messages, replay};
use bartleby::spool::{Envelope, queue_id};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const MAGIC: &[u8; 4] = b"BJR1";
/// Magic, kind, queue ID, envelope length, body length, CRC.
const HEADER_LEN: usize = 4 + 1 + 16 + 4 + 8 + 4;

/// Where each record starts and ends, by the layout alone (no CRC or ID check).
fn record_ranges(data: &[u8]) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut at = 0;
    while data.len() - at >= HEADER_LEN && &data[at..at + 4] == MAGIC {
        let env_len = u32::from_le_bytes(data[at + 21..at + 25].try_into().unwrap()) as usize;
        let body_len = u64::from_le_bytes(data[at + 25..at + 33].try_into().unwrap());
        let Some(end) = usize::try_from(body_len)
            .ok()
            .and_then(|b| (at + HEADER_LEN).checked_add(env_len)?.checked_add(b))
            .filter(|&end| end <= data.len())
        else {
            break;
        };
        ranges.push((at, end));
        at = end;
    }
    ranges
}

/// The CRC-32 of everything after the magic except the CRC field itself.
fn fix_crc(record: &mut [u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&record[4..HEADER_LEN - 4]);
    crc.update(&record[HEADER_LEN..]);
    record[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.finalize().to_le_bytes());
}

/// A spool directory of this process's own, under `$BARTLEBY_FUZZ_DIR` (scripts/fuzz makes one on
/// tmpfs and removes it after) or the temporary directory; the restore path calls `syncfs`.
fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = std::env::var_os("BARTLEBY_FUZZ_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        base.join(format!("journal-replay-{}", std::process::id()))
    })
}

/// Replays the journal; returns what it found and the messages it left queued from the journal,
/// with their latest envelopes, oldest first.
fn replayed(journal: &Path, messages: &Path) -> (usize, Vec<(String, Vec<u8>)>) {
    let mut queued = BTreeMap::new();
    let parse = |json: &[u8]| json.to_vec();
    let found = replay(journal, messages, &parse, &mut |key, latest| match latest {
        Some(json) => {
            queued.insert(key, json);
        }
        None => {
            queued.remove(&key);
        }
    })
    .expect("replay of readable segments");
    (found.restored, queued.into_iter().map(|(k, json)| (queue_id(k), json)).collect())
}

fn fresh_dir(path: &Path) {
    let _ = fs::remove_dir_all(path);
    fs::create_dir_all(path).expect("create a directory for the fuzzer");
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, segment)) = input.split_first() else { return };
    let mut data = segment.to_vec();
    let ranges = record_ranges(&data);
    if flags & 1 != 0 {
        for &(start, end) in &ranges {
            fix_crc(&mut data[start..end]);
        }
    }
    let split = match ranges.get(ranges.len() / 2) {
        Some(&(start, _)) if flags & 2 != 0 => start,
        _ => data.len(),
    };
    let (journal, messages) = (root().join("journal"), root().join("messages"));
    fresh_dir(&journal);
    fresh_dir(&messages);
    fs::write(journal.join("0000000000000001.wal"), &data[..split]).unwrap();
    if split < data.len() {
        fs::write(journal.join("0000000000000002.wal"), &data[split..]).unwrap();
    }

    let (restored, found_ids) = replayed(&journal, &messages);
    let read = read_messages(&journal).expect("read_messages of readable segments");
    assert_eq!(restored, 0, "restored without files");
    let read_ids: Vec<_> = read.iter().map(|m| (m.id.clone(), m.envelope.clone())).collect();
    assert_eq!(found_ids, read_ids, "replay and read_messages disagree");
    for message in &read {
        let _ = serde_json::from_slice::<Envelope>(&message.envelope);
    }

    // As after a crash during a checkpoint: every message has torn files. A replay restores them.
    for message in &read {
        fs::write(messages.join(format!("{}.msg", message.id)), b"torn").unwrap();
        fs::write(messages.join(format!("{}.env", message.id)), b"{\"torn").unwrap();
    }
    let (restored, queued) = replayed(&journal, &messages);
    assert_eq!(restored, read.len(), "not every message restored");
    assert!(queued.is_empty(), "a restored message also queued from the journal");
    for message in &read {
        let body = fs::read(messages.join(format!("{}.msg", message.id))).unwrap();
        assert!(body == message.body, "body of {} not restored", message.id);
        let env = fs::read(messages.join(format!("{}.env", message.id))).unwrap();
        assert!(env == message.envelope, "envelope of {} not restored", message.id);
    }
});

//! The local store's index: a slim summary of every queued message (arrival, next attempt, size,
//! flags, the domains of its pending recipients), about 100 octets a message, so that a million
//! queued messages fit in a small part of a gigabyte. The envelope itself stays on disk (in its
//! journal record or its `.env` file) and is read when a caller asks for it.
//!
//! Retry bookkeeping that need not be durable (`Queue::note`: attempts, next attempt, the last
//! deferral) is kept here too, in the summary, with the deferral's text interned: during an outage
//! every queued message carries the same "connection refused", once.

use super::{Envelope, Filter, RecipientStatus, for_each_domain};
use std::collections::HashMap;
use std::sync::Arc;

pub use super::envelope::{QueueKey as Key, queue_id as id_of, queue_key as key};

const HELD: u8 = 1;
const BOUNCE_SUPPRESSED: u8 = 2;
/// A removed message's place, until the next compaction ([`Entries`]).
const DEAD: u8 = 0x80;

/// What the index keeps of one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub arrived: i64,
    pub next_attempt: i64,
    pub size: u64,
    /// When the last deferral was noted in memory only (0: none since the envelope was written).
    noted_at: i64,
    /// Pending recipients and their domains beyond the first, interned.
    more: Option<Box<More>>,
    /// The sender's address, interned (a queue's senders and recipients repeat: a backlog for one
    /// site is mostly its few users' mail).
    sender: u32,
    /// The first pending recipient's address, interned; [`NONE`] when none is pending.
    recipient: u32,
    pub attempts: u32,
    /// The last error of a pending recipient (and the host that gave it), interned; [`NONE`] when
    /// none failed yet. Once noted (`noted_at` set), the deferral that every pending recipient got.
    reason: u32,
    /// The first pending recipient's domain, interned; [`NONE`] when none is pending.
    domain: u32,
    flags: u8,
}

/// The rest of a message with more than one pending recipient (or domain).
#[derive(Debug, Clone, PartialEq)]
struct More {
    domains: Vec<u32>,
    recipients: Vec<u32>,
}

const NONE: u32 = u32::MAX;

impl Summary {
    pub fn held(&self) -> bool {
        self.flags & HELD != 0
    }

    pub fn bounce_suppressed(&self) -> bool {
        self.flags & BOUNCE_SUPPRESSED != 0
    }

    pub fn is_noted(&self) -> bool {
        self.noted_at != 0
    }

    fn is_dead(&self) -> bool {
        self.flags & DEAD != 0
    }

    const GONE: Summary = Summary {
        arrived: 0,
        next_attempt: 0,
        size: 0,
        noted_at: 0,
        more: None,
        sender: NONE,
        recipient: NONE,
        attempts: 0,
        reason: 0,
        domain: NONE,
        flags: DEAD,
    };

    fn domain_ids(&self) -> impl Iterator<Item = u32> + '_ {
        let first = (self.domain != NONE).then_some(self.domain);
        first.into_iter().chain(self.more.iter().flat_map(|more| more.domains.iter().copied()))
    }

    fn recipient_ids(&self) -> impl Iterator<Item = u32> + '_ {
        let first = (self.recipient != NONE).then_some(self.recipient);
        first.into_iter().chain(self.more.iter().flat_map(|more| more.recipients.iter().copied()))
    }
}

/// Why pending recipients were last deferred, when that was only noted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reason {
    pub error: Option<String>,
    pub remote_mta: Option<String>,
}

/// Retry bookkeeping kept in memory only, taken out of the index.
#[derive(Debug, Clone, PartialEq)]
pub struct Noted {
    attempts: u32,
    next_attempt: i64,
    at: i64,
    reason: Option<Reason>,
}

impl Noted {
    /// Applies it to the envelope read from disk: the attempts, the next attempt, and the last
    /// deferral of each pending recipient (with its history line).
    pub fn apply(&self, envelope: &mut Envelope) {
        envelope.attempts = self.attempts;
        envelope.next_attempt = self.next_attempt;
        let Some(reason) = &self.reason else { return };
        for rcpt in envelope.recipients.iter_mut().filter(|r| r.status == RecipientStatus::Pending) {
            rcpt.last_error.clone_from(&reason.error);
            rcpt.remote_mta.clone_from(&reason.remote_mta);
            let text = reason.error.as_deref().unwrap_or("deferred");
            let event = format!("deferred <{}>: {text}", rcpt.address);
            envelope.history.push(super::HistoryEntry { at: self.at, event });
        }
    }
}

/// Strings kept once however many summaries name them, counted so that unused ones are freed.
#[derive(Debug)]
struct Interned<T> {
    ids: HashMap<Arc<T>, u32>,
    values: Vec<Option<(Arc<T>, u32)>>,
    free: Vec<u32>,
}

impl<T> Default for Interned<T> {
    fn default() -> Self {
        Interned { ids: HashMap::new(), values: Vec::new(), free: Vec::new() }
    }
}

impl<T: std::hash::Hash + Eq> Interned<T> {
    fn acquire(&mut self, value: T) -> u32 {
        if let Some(&id) = self.ids.get(&value) {
            if let Some(Some((_, count))) = self.values.get_mut(id as usize) {
                *count += 1;
            }
            return id;
        }
        let value = Arc::new(value);
        let id = match self.free.pop() {
            Some(id) => {
                self.values[id as usize] = Some((Arc::clone(&value), 1));
                id
            }
            None => {
                self.values.push(Some((Arc::clone(&value), 1)));
                u32::try_from(self.values.len() - 1).unwrap_or(u32::MAX - 1)
            }
        };
        self.ids.insert(value, id);
        id
    }

    fn release(&mut self, id: u32) {
        let Some(slot) = self.values.get_mut(id as usize) else { return };
        let Some((value, count)) = slot else { return };
        *count -= 1;
        if *count == 0 {
            self.ids.remove(&**value);
            *slot = None;
            self.free.push(id);
        }
    }

    fn get(&self, id: u32) -> Option<&T> {
        self.values.get(id as usize)?.as_ref().map(|(value, _)| &**value)
    }

    fn find(&self, value: &T) -> Option<u32> {
        self.ids.get(value).copied()
    }
}

/// The summaries in one sorted vector: 72 octets a message, where a B-tree's half-full nodes took
/// about twice that. IDs are issued in increasing order, so a new message is pushed at the end; a
/// removed one leaves a dead place behind, and the vector is compacted once half of it is dead.
#[derive(Debug, Default)]
struct Entries {
    items: Vec<(Key, Summary)>,
    dead: usize,
}

impl Entries {
    fn find(&self, key: Key) -> Result<usize, usize> {
        self.items.binary_search_by_key(&key, |(k, _)| *k)
    }

    fn len(&self) -> usize {
        self.items.len() - self.dead
    }

    fn get(&self, key: &Key) -> Option<&Summary> {
        let at = self.find(*key).ok()?;
        self.items.get(at).map(|(_, s)| s).filter(|s| !s.is_dead())
    }

    fn get_mut(&mut self, key: &Key) -> Option<&mut Summary> {
        let at = self.find(*key).ok()?;
        self.items.get_mut(at).map(|(_, s)| s).filter(|s| !s.is_dead())
    }

    fn contains_key(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    fn insert(&mut self, key: Key, summary: Summary) -> Option<Summary> {
        if self.items.last().is_none_or(|(last, _)| *last < key) {
            self.items.push((key, summary));
            return None;
        }
        match self.find(key) {
            Ok(at) => {
                let old = std::mem::replace(&mut self.items[at].1, summary);
                if old.is_dead() {
                    self.dead -= 1;
                    return None;
                }
                Some(old)
            }
            Err(at) => {
                self.items.insert(at, (key, summary));
                None
            }
        }
    }

    fn remove(&mut self, key: &Key) -> Option<Summary> {
        let at = self.find(*key).ok()?;
        if self.items[at].1.is_dead() {
            return None;
        }
        let old = std::mem::replace(&mut self.items[at].1, Summary::GONE);
        self.dead += 1;
        if self.dead > 1024 && self.dead * 2 > self.items.len() {
            self.items.retain(|(_, s)| !s.is_dead());
            self.dead = 0;
            if self.items.capacity() > 4 * self.items.len().max(1024) {
                self.items.shrink_to(2 * self.items.len());
            }
        }
        Some(old)
    }

    fn last_key(&self) -> Option<Key> {
        self.items.iter().rev().find(|(_, s)| !s.is_dead()).map(|(k, _)| *k)
    }

    fn iter(&self) -> impl Iterator<Item = (&Key, &Summary)> {
        self.items.iter().filter(|(_, s)| !s.is_dead()).map(|(k, s)| (k, s))
    }

    fn after(&self, after: Option<Key>) -> impl Iterator<Item = (Key, &Summary)> {
        let start = after.map_or(0, |a| self.items.partition_point(|(k, _)| *k <= a));
        self.items[start..].iter().filter(|(_, s)| !s.is_dead()).map(|(k, s)| (*k, s))
    }
}

/// Every queued message's summary, oldest first.
#[derive(Debug, Default)]
pub struct Index {
    entries: Entries,
    domains: Interned<String>,
    addresses: Interned<String>,
    reasons: Interned<Reason>,
}

impl Index {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn contains(&self, key: Key) -> bool {
        self.entries.contains_key(&key)
    }

    pub fn summary(&self, key: Key) -> Option<&Summary> {
        self.entries.get(&key)
    }

    pub fn last_key(&self) -> Option<Key> {
        self.entries.last_key()
    }

    /// Sets the message's summary from its envelope as it is now on disk (no noted bookkeeping).
    pub fn insert(&mut self, key: Key, envelope: &Envelope) {
        let mut domains = Vec::new();
        for_each_domain(envelope, |d| domains.push(self.domains.acquire(d.to_string())));
        let mut flags = 0;
        if envelope.held {
            flags |= HELD;
        }
        if envelope.bounce_suppressed {
            flags |= BOUNCE_SUPPRESSED;
        }
        let recipients: Vec<u32> = envelope
            .recipients
            .iter()
            .filter(|r| r.status == RecipientStatus::Pending)
            .map(|r| self.addresses.acquire(r.address.clone()))
            .collect();
        let sender = self.addresses.acquire(envelope.sender.clone());
        let domain = domains.first().copied().unwrap_or(NONE);
        let more = (domains.len() > 1 || recipients.len() > 1).then(|| {
            Box::new(More {
                domains: domains.get(1..).unwrap_or_default().to_vec(),
                recipients: recipients.get(1..).unwrap_or_default().to_vec(),
            })
        });
        let summary = Summary {
            arrived: envelope.arrived,
            next_attempt: envelope.next_attempt,
            size: envelope.size,
            noted_at: 0,
            more,
            sender,
            recipient: recipients.first().copied().unwrap_or(NONE),
            attempts: envelope.attempts,
            reason: self.last_error(envelope),
            domain,
            flags,
        };
        if let Some(old) = self.entries.insert(key, summary) {
            self.release(&old);
        }
    }

    pub fn remove(&mut self, key: Key) {
        if let Some(old) = self.entries.remove(&key) {
            self.release(&old);
        }
    }

    fn release(&mut self, summary: &Summary) {
        for id in summary.domain_ids() {
            self.domains.release(id);
        }
        for id in summary.recipient_ids().chain([summary.sender]) {
            self.addresses.release(id);
        }
        if summary.reason != NONE {
            self.reasons.release(summary.reason);
        }
    }

    /// The interned last error of the envelope's first pending recipient that has one.
    fn last_error(&mut self, envelope: &Envelope) -> u32 {
        let failed =
            envelope.recipients.iter().find(|r| r.status == RecipientStatus::Pending && r.last_error.is_some());
        match failed {
            Some(r) => self.reasons.acquire(Reason { error: r.last_error.clone(), remote_mta: r.remote_mta.clone() }),
            None => NONE,
        }
    }

    /// Forgets the noted bookkeeping of a message about to be written durably (its summary is
    /// set again from what is written).
    pub fn clear_noted(&mut self, key: Key) {
        if let Some(summary) = self.entries.get_mut(&key) {
            summary.noted_at = 0;
        }
    }

    /// Keeps a deferral in memory only. Returns false when the envelope's deferral cannot be told
    /// by one reason for every pending recipient (then the caller writes it durably).
    pub fn note(&mut self, key: Key, envelope: &Envelope, at: i64) -> bool {
        let mut pending = envelope.recipients.iter().filter(|r| r.status == RecipientStatus::Pending);
        let Some(first) = pending.next() else { return false };
        let reason = Reason { error: first.last_error.clone(), remote_mta: first.remote_mta.clone() };
        if pending.any(|r| r.last_error != reason.error || r.remote_mta != reason.remote_mta) {
            return false;
        }
        let Some(summary) = self.entries.get(&key) else { return true };
        if summary.held() != envelope.held || summary.bounce_suppressed() != envelope.bounce_suppressed {
            return false;
        }
        let reason = self.reasons.acquire(reason);
        let Some(summary) = self.entries.get_mut(&key) else { return true };
        let old = std::mem::replace(&mut summary.reason, reason);
        summary.attempts = envelope.attempts;
        summary.next_attempt = envelope.next_attempt;
        summary.noted_at = at.max(1);
        if old != NONE {
            self.reasons.release(old);
        }
        true
    }

    /// The message's noted bookkeeping, to apply to its envelope as read from disk.
    pub fn noted_of(&self, key: Key) -> Option<Noted> {
        let summary = self.entries.get(&key).filter(|s| s.is_noted())?;
        Some(Noted {
            attempts: summary.attempts,
            next_attempt: summary.next_attempt,
            at: summary.noted_at,
            reason: self.reasons.get(summary.reason).cloned(),
        })
    }

    /// The message as listings show it, from its summary alone.
    pub fn listing(&self, key: Key, summary: &Summary) -> super::Listing {
        let address = |id: u32| self.addresses.get(id).cloned().unwrap_or_default();
        super::Listing {
            id: id_of(key),
            sender: address(summary.sender),
            recipients: summary.recipient_ids().map(address).collect(),
            size: summary.size,
            arrived: summary.arrived,
            attempts: summary.attempts,
            next_attempt: summary.next_attempt,
            last_error: self.reasons.get(summary.reason).and_then(|r| r.error.clone()),
            held: summary.held(),
        }
    }

    /// Keys of the messages with noted bookkeeping.
    pub fn noted(&self) -> Vec<Key> {
        self.entries.iter().filter(|(_, s)| s.is_noted()).map(|(k, _)| *k).collect()
    }

    /// Every summary, oldest first, from the first key after `after`.
    pub fn iter_after(&self, after: Option<Key>) -> impl Iterator<Item = (Key, &Summary)> {
        self.entries.after(after)
    }

    /// The domains of the summary's pending recipients.
    pub fn domains<'a>(&'a self, summary: &'a Summary) -> impl Iterator<Item = &'a str> + 'a {
        summary.domain_ids().filter_map(|id| self.domains.get(id).map(String::as_str))
    }

    /// Whether a message passes the filter, told by its summary alone. Text is matched once per
    /// distinct address, not once per message.
    pub fn prefilter(&self, filter: &Filter, now: i64) -> impl Fn(&Summary) -> bool + '_ {
        let matching = |needle: &str, null_sender: bool| -> Vec<bool> {
            self.addresses
                .values
                .iter()
                .map(|v| {
                    v.as_ref().is_some_and(|(address, _)| {
                        if null_sender { address.is_empty() } else { super::queue::contains_ci(address, needle) }
                    })
                })
                .collect()
        };
        let senders = filter.sender.as_deref().map(|s| matching(s, s == "<>"));
        let recipients = filter.recipient.as_deref().map(|r| matching(r, false));
        let hit = |ids: &[bool], id: u32| ids.get(id as usize).copied().unwrap_or(false);
        let domain = filter.domain.as_ref().map(|d| {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            self.domains.find(&d)
        });
        let older_than =
            filter.older_than.map(|age| now.saturating_sub(i64::try_from(age.as_micros()).unwrap_or(i64::MAX)));
        let (held, kept) = (filter.held, filter.bounce_suppressed);
        move |s: &Summary| {
            if let Some(domain) = domain {
                match domain {
                    None => return false,
                    Some(id) => {
                        if !s.domain_ids().any(|d| d == id) {
                            return false;
                        }
                    }
                }
            }
            if older_than.is_some_and(|limit| s.arrived > limit) {
                return false;
            }
            if held.is_some_and(|h| h != s.held()) {
                return false;
            }
            if senders.as_ref().is_some_and(|ids| !hit(ids, s.sender)) {
                return false;
            }
            if recipients.as_ref().is_some_and(|ids| !s.recipient_ids().any(|r| hit(ids, r))) {
                return false;
            }
            kept.is_none_or(|k| k == s.bounce_suppressed())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Recipient;

    fn envelope(id: &str, rcpts: &[&str]) -> Envelope {
        let mut e = Envelope::new(
            id.into(),
            "a@example.org".into(),
            rcpts.iter().map(|r| Recipient::new((*r).into())).collect(),
        );
        e.size = 10;
        e
    }

    #[test]
    fn keys_sort_as_queue_ids_and_round_trip() {
        let (a, b) = ("0005F1A2B3C4D000", "0005F1A2B3C4D001");
        assert!(key(a) < key(b));
        assert_eq!(key(a).map(id_of).as_deref(), Some(a));
        assert_eq!(key("not an id"), None);
        assert_eq!(key("0005f1a2b3c4d000"), None, "lower case is not a queue ID");
    }

    #[test]
    fn the_sorted_entries_keep_order_through_removals_compaction_and_late_arrivals() {
        let mut index = Index::default();
        let e = envelope("0000000000001000", &["x@example.com"]);
        for key in (10..5000u64).step_by(2) {
            index.insert(key, &e);
        }
        index.insert(3, &e); // an imported, older ID lands in its place
        for key in (10..4000u64).step_by(2) {
            index.remove(key);
        }
        index.remove(3);
        index.insert(3, &e); // removed and queued again
        let keys: Vec<Key> = index.iter_after(None).map(|(k, _)| k).collect();
        let expected: Vec<Key> = std::iter::once(3).chain((4000..5000).step_by(2)).collect();
        assert_eq!(keys, expected);
        assert_eq!(index.len(), expected.len());
        assert!(index.entries.dead < index.entries.items.len(), "compacted: {}", index.entries.dead);
        assert_eq!(index.iter_after(Some(4001)).next().map(|(k, _)| k), Some(4002));
        assert!(!index.contains(10) && index.contains(4998) && index.last_key() == Some(4998));
        assert_eq!(index.addresses.ids.len(), 2, "one sender and one recipient, interned once");
    }

    #[test]
    fn interned_domains_are_freed_with_their_last_message() {
        let mut index = Index::default();
        let e = envelope("0000000000001000", &["x@Example.COM", "y@other.test", "z@example.com"]);
        index.insert(1, &e);
        let summary = index.summary(1).cloned().expect("summary");
        assert_eq!(index.domains(&summary).collect::<Vec<_>>(), ["example.com", "other.test"]);
        index.remove(1);
        assert!(index.domains.ids.is_empty(), "{:?}", index.domains);
        assert!(index.addresses.ids.is_empty(), "{:?}", index.addresses);
    }

    #[test]
    fn a_noted_deferral_is_materialized_on_the_envelope_from_disk() {
        let mut index = Index::default();
        let on_disk = envelope("0000000000001000", &["x@example.com", "y@example.com"]);
        index.insert(1, &on_disk);
        let mut deferred = on_disk.clone();
        deferred.attempts = 3;
        deferred.next_attempt = 99;
        for r in &mut deferred.recipients {
            r.last_error = Some("connection refused".into());
            r.remote_mta = Some("mx.example.com".into());
        }
        assert!(index.note(1, &deferred, 50));
        let mut read = on_disk.clone();
        index.noted_of(1).expect("noted").apply(&mut read);
        assert_eq!((read.attempts, read.next_attempt), (3, 99));
        assert!(read.recipients.iter().all(|r| r.last_error.as_deref() == Some("connection refused")));
        assert_eq!(read.history.len(), 2);
        assert_eq!(read.history[0].at, 50);
        // Two recipients deferred for different reasons cannot be told by one: written durably.
        deferred.recipients[1].last_error = Some("greylisted".into());
        assert!(!index.note(1, &deferred, 60));
        index.clear_noted(1);
        index.insert(1, &on_disk);
        assert!(index.reasons.ids.is_empty(), "{:?}", index.reasons);
    }

    #[test]
    fn the_prefilter_answers_domain_age_and_flags() {
        let mut index = Index::default();
        let mut e = envelope("0000000000001000", &["x@example.com"]);
        e.arrived = 1_000;
        e.held = true;
        index.insert(1, &e);
        let s = index.summary(1).cloned().expect("summary");
        let pass = |f: Filter, now| index.prefilter(&f, now)(&s);
        assert!(pass(Filter::domain("EXAMPLE.com."), 0));
        assert!(!pass(Filter::domain("other.test"), 0));
        assert!(pass(Filter { sender: Some("A@EXAMPLE".into()), ..Filter::default() }, 0));
        assert!(!pass(Filter { sender: Some("<>".into()), ..Filter::default() }, 0));
        assert!(pass(Filter { recipient: Some("x@".into()), ..Filter::default() }, 0));
        assert!(!pass(Filter { recipient: Some("y@".into()), ..Filter::default() }, 0));
        assert!(pass(Filter { held: Some(true), ..Filter::default() }, 0));
        assert!(!pass(Filter { held: Some(false), ..Filter::default() }, 0));
        let old = Filter { older_than: Some(std::time::Duration::from_micros(500)), ..Filter::default() };
        assert!(pass(old.clone(), 2_000));
        assert!(!pass(old, 1_200));
    }
}

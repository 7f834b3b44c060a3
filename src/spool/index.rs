//! The local store's index: a slim summary of every queued message (arrival, next attempt, size,
//! flags, the domains of its pending recipients), about 100 octets a message, so that a million
//! queued messages fit in a small part of a gigabyte. The envelope itself stays on disk (in its
//! journal record or its `.env` file) and is read when a caller asks for it.
//!
//! Retry bookkeeping that need not be durable (`Queue::note`: attempts, next attempt, the last
//! deferral) is kept here too, in the summary, with the deferral's text interned: during an outage
//! every queued message carries the same "connection refused", once.

use super::envelope::IndexedEnvelope;
use super::keyed::{Keyed, Slot};
use super::queue::lower_domain;
use super::{DueQuery, Envelope, Filter, RecipientStatus};
use std::collections::HashMap;
use std::sync::Arc;

pub use super::envelope::{QueueKey as Key, queue_id as id_of, queue_key as key};

const HELD: u8 = 1;
const BOUNCE_SUPPRESSED: u8 = 2;
/// Made due earlier (a flush, a retry) in memory only: `next_attempt` is not the envelope's.
const EXPEDITED: u8 = 4;
/// A removed message's place, until the next compaction ([`Keyed`]).
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

impl Slot for Summary {
    const VACANT: Summary = Summary::GONE;

    fn is_vacant(&self) -> bool {
        self.is_dead()
    }
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
/// Looked up by reference: a restart interns a million addresses without copying each first.
#[derive(Debug)]
struct Interned<T: ?Sized> {
    ids: HashMap<Arc<T>, u32>,
    values: Vec<Option<(Arc<T>, u32)>>,
    free: Vec<u32>,
}

impl<T: ?Sized> Default for Interned<T> {
    fn default() -> Self {
        Interned { ids: HashMap::new(), values: Vec::new(), free: Vec::new() }
    }
}

/// A value an [`Interned`] pool can keep a shared copy of.
trait Share: std::hash::Hash + Eq {
    fn share(&self) -> Arc<Self>;
}

impl Share for str {
    fn share(&self) -> Arc<str> {
        Arc::from(self)
    }
}

impl Share for Reason {
    fn share(&self) -> Arc<Reason> {
        Arc::new(self.clone())
    }
}

impl<T: Share + ?Sized> Interned<T> {
    fn acquire(&mut self, value: &T) -> u32 {
        if let Some(&id) = self.ids.get(value) {
            if let Some(Some((_, count))) = self.values.get_mut(id as usize) {
                *count += 1;
            }
            return id;
        }
        let value = value.share();
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

/// Called with each pending recipient: its address, last error and the host that gave it.
pub type EachPending<'f> = dyn FnMut(&str, Option<&String>, Option<&String>) + 'f;

/// What the index takes of a message: a whole envelope, or the part of one a restart parses
/// ([`IndexedEnvelope`]).
pub trait Indexable {
    fn sender(&self) -> &str;
    fn each_pending(&self, f: &mut EachPending<'_>);
    /// Arrival, next attempt, size, attempts, held, bounce suppressed.
    fn state(&self) -> (i64, i64, u64, u32, bool, bool);
}

impl Indexable for Envelope {
    fn sender(&self) -> &str {
        &self.sender
    }

    fn each_pending(&self, f: &mut EachPending<'_>) {
        for r in self.pending() {
            f(&r.address, r.last_error.as_ref(), r.remote_mta.as_ref());
        }
    }

    fn state(&self) -> (i64, i64, u64, u32, bool, bool) {
        (self.arrived, self.next_attempt, self.size, self.attempts, self.held, self.bounce_suppressed)
    }
}

impl Indexable for IndexedEnvelope {
    fn sender(&self) -> &str {
        &self.sender
    }

    fn each_pending(&self, f: &mut EachPending<'_>) {
        for r in self.recipients.iter().filter(|r| r.status == RecipientStatus::Pending) {
            f(&r.address, r.last_error.as_ref(), r.remote_mta.as_ref());
        }
    }

    fn state(&self) -> (i64, i64, u64, u32, bool, bool) {
        (self.arrived, self.next_attempt, self.size, self.attempts, self.held, self.bounce_suppressed)
    }
}

/// Every queued message's summary, oldest first.
#[derive(Debug, Default)]
pub struct Index {
    /// The summaries by key: 72 octets a message (see [`Keyed`]).
    entries: Keyed<Summary>,
    domains: Interned<str>,
    addresses: Interned<str>,
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
    pub fn insert(&mut self, key: Key, envelope: &impl Indexable) {
        let (arrived, next_attempt, size, attempts, held, bounce_suppressed) = envelope.state();
        let mut flags = 0;
        if held {
            flags |= HELD;
        }
        if bounce_suppressed {
            flags |= BOUNCE_SUPPRESSED;
        }
        // Distinct domains in the order first seen; the common single recipient allocates none.
        let (mut domains, mut recipients, mut reason) = (Vec::new(), Vec::new(), NONE);
        envelope.each_pending(&mut |address, error, remote_mta| {
            let domain = self.domains.acquire(&lower_domain(address));
            if domains.contains(&domain) {
                self.domains.release(domain);
            } else {
                domains.push(domain);
            }
            recipients.push(self.addresses.acquire(address));
            // The last error of the first pending recipient that has one.
            if reason == NONE && error.is_some() {
                reason = self.reasons.acquire(&Reason { error: error.cloned(), remote_mta: remote_mta.cloned() });
            }
        });
        let sender = self.addresses.acquire(envelope.sender());
        let domain = domains.first().copied().unwrap_or(NONE);
        let more = (domains.len() > 1 || recipients.len() > 1).then(|| {
            Box::new(More {
                domains: domains.get(1..).unwrap_or_default().to_vec(),
                recipients: recipients.get(1..).unwrap_or_default().to_vec(),
            })
        });
        let summary = Summary {
            arrived,
            next_attempt,
            size,
            noted_at: 0,
            more,
            sender,
            recipient: recipients.first().copied().unwrap_or(NONE),
            attempts,
            reason,
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
        let reason = self.reasons.acquire(&reason);
        let Some(summary) = self.entries.get_mut(&key) else { return true };
        let old = std::mem::replace(&mut summary.reason, reason);
        summary.attempts = envelope.attempts;
        summary.next_attempt = envelope.next_attempt;
        summary.noted_at = at.max(1);
        summary.flags &= !EXPEDITED;
        if old != NONE {
            self.reasons.release(old);
        }
        true
    }

    /// The message's noted bookkeeping, to apply to its envelope as read from disk.
    pub fn noted_of(&self, key: Key) -> Option<Noted> {
        let summary = self.entries.get(&key).filter(|s| s.is_noted() || s.flags & EXPEDITED != 0)?;
        Some(Noted {
            attempts: summary.attempts,
            next_attempt: summary.next_attempt,
            at: summary.noted_at,
            // Only expedited: the next attempt is the one change.
            reason: if summary.is_noted() { self.reasons.get(summary.reason).cloned() } else { None },
        })
    }

    /// Makes the message due at `at` in memory (a flush, a retry), unless it is held; returns
    /// whether it was.
    pub fn expedite(&mut self, key: Key, at: i64) -> bool {
        let Some(summary) = self.entries.get_mut(&key).filter(|s| !s.held()) else { return false };
        summary.next_attempt = at;
        if !summary.is_noted() {
            summary.flags |= EXPEDITED;
        }
        true
    }

    /// The messages a [`DueQuery`] asks for, earliest first: one pass over the summaries, keeping
    /// the `limit` earliest in a heap.
    pub fn due(&self, query: &DueQuery<'_>) -> Vec<(i64, Key)> {
        let interned = |d: &str| self.domains.find(&d.trim_end_matches('.').to_ascii_lowercase());
        let domain = match query.domain {
            Some(d) => match interned(d) {
                Some(id) => Some(id),
                None => return Vec::new(),
            },
            None => None,
        };
        let except: Vec<u32> = query.except.iter().filter_map(|d| interned(d)).collect();
        let limit = query.limit;
        let mut earliest: std::collections::BinaryHeap<(i64, Key)> = std::collections::BinaryHeap::new();
        for (key, summary) in self.entries.iter() {
            let at = (summary.next_attempt, key);
            if !query.wants(at.0, key) || summary.held() {
                continue;
            }
            if domain.is_some_and(|d| !summary.domain_ids().any(|id| id == d))
                || summary.domain_ids().any(|id| except.contains(&id))
            {
                continue;
            }
            if earliest.len() < limit {
                earliest.push(at);
            } else if earliest.peek().is_some_and(|latest| at < *latest) {
                earliest.pop();
                earliest.push(at);
            }
        }
        earliest.into_sorted_vec()
    }

    /// The message as listings show it, from its summary alone.
    pub fn listing(&self, key: Key, summary: &Summary) -> super::Listing {
        let address = |id: u32| self.addresses.get(id).map(str::to_string).unwrap_or_default();
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
            accepted_by: None,
            leased_by: None,
        }
    }

    /// Keys of the messages with noted bookkeeping.
    pub fn noted(&self) -> Vec<Key> {
        self.entries.iter().filter(|(_, s)| s.is_noted()).map(|(k, _)| k).collect()
    }

    /// Every summary, oldest first, from the first key after `after`.
    pub fn iter_after(&self, after: Option<Key>) -> impl Iterator<Item = (Key, &Summary)> {
        self.entries.after(after)
    }

    /// The domains of the summary's pending recipients.
    pub fn domains<'a>(&'a self, summary: &'a Summary) -> impl Iterator<Item = &'a str> + 'a {
        summary.domain_ids().filter_map(|id| self.domains.get(id))
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
        assert!(index.entries.vacant() < index.entries.slots(), "compacted: {}", index.entries.vacant());
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

//! The one interface to the queue ([`Queue`]): every stage (smtp, schedule, deliver, dsn, web,
//! control, cli, monitor, metrics) reaches queued mail only through it, by queue ID and by query.
//! None holds a path, a segment, an offset or an index, so a store may move bytes, compact, or live
//! in a database shared by several nodes without a caller noticing. See `docs/spool.md`.
//!
//! Two stores implement it: the local store ([`super::Spool`]: a write-ahead journal and files
//! under `queue.dir`) and [`super::MemoryQueue`] (for unit tests). The methods block (disk or
//! network I/O); async callers run the ones that write on a blocking thread.
//!
//! The queries have default implementations over [`Queue::visit`], right for a store that keeps an
//! index of its envelopes in memory; a store that can answer them better (SQL) overrides them.

use super::{Envelope, QueueId, QueueKey, RecipientStatus, SpaceInfo, SpoolError, now_micros};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

/// Which messages a query or a bulk action concerns. Empty fields match everything; text is
/// matched case-insensitively.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// A pending recipient in this domain (exact).
    pub domain: Option<String>,
    /// The sender address contains this text; `<>` matches the null sender.
    pub sender: Option<String>,
    /// A pending recipient address contains this text.
    pub recipient: Option<String>,
    /// Arrived at least this long ago.
    pub older_than: Option<Duration>,
    /// Held (true) or not held (false).
    pub held: Option<bool>,
    /// Kept without a bounce to a sender that failed SPF/DKIM (true) or not.
    pub bounce_suppressed: Option<bool>,
}

impl Filter {
    /// Everything.
    pub fn all() -> Filter {
        Filter::default()
    }

    /// Messages with a pending recipient in `domain`.
    pub fn domain(domain: &str) -> Filter {
        Filter { domain: Some(domain.to_string()), ..Filter::default() }
    }

    /// No field set: every message passes.
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// Does the envelope pass, at time `now` (microseconds since the epoch)?
    pub fn matches(&self, envelope: &Envelope, now: i64) -> bool {
        if let Some(domain) = &self.domain {
            let domain = domain.trim_end_matches('.');
            if !envelope.pending().any(|r| domain_eq(&r.address, domain)) {
                return false;
            }
        }
        if let Some(sender) = &self.sender {
            let hit = if sender == "<>" { envelope.sender.is_empty() } else { contains_ci(&envelope.sender, sender) };
            if !hit {
                return false;
            }
        }
        if let Some(recipient) = &self.recipient
            && !envelope.pending().any(|r| contains_ci(&r.address, recipient))
        {
            return false;
        }
        if let Some(age) = self.older_than {
            let age = i64::try_from(age.as_micros()).unwrap_or(i64::MAX);
            if envelope.arrived > now.saturating_sub(age) {
                return false;
            }
        }
        if self.held.is_some_and(|held| held != envelope.held) {
            return false;
        }
        if self.bounce_suppressed.is_some_and(|kept| kept != envelope.bounce_suppressed) {
            return false;
        }
        true
    }
}

/// Case-insensitive (ASCII) substring test without allocating: this runs once per queued message.
pub(super) fn contains_ci(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// Is the address's domain `domain` (case-insensitive, trailing dot ignored)?
fn domain_eq(address: &str, domain: &str) -> bool {
    address.rsplit_once('@').is_some_and(|(_, d)| d.trim_end_matches('.').eq_ignore_ascii_case(domain))
}

/// The domain of an address, lower-cased, allocating only when it is not already in lower case.
pub(super) fn lower_domain(address: &str) -> Cow<'_, str> {
    let raw = address.rsplit_once('@').map(|(_, d)| d.trim_end_matches('.')).unwrap_or_default();
    if raw.bytes().any(|b| b.is_ascii_uppercase()) { Cow::Owned(raw.to_ascii_lowercase()) } else { Cow::Borrowed(raw) }
}

/// Calls `f` once per distinct domain of the envelope's pending recipients (this runs for every
/// queued message, so the common single-recipient case allocates nothing).
pub fn for_each_domain(envelope: &Envelope, mut f: impl FnMut(&str)) {
    if let [only] = envelope.recipients.as_slice() {
        if only.status == RecipientStatus::Pending {
            f(&lower_domain(&only.address));
        }
        return;
    }
    let mut seen: Vec<Cow<'_, str>> = Vec::new();
    for r in envelope.pending() {
        let domain = lower_domain(&r.address);
        if !seen.contains(&domain) {
            f(&domain);
            seen.push(domain);
        }
    }
}

/// Which part of a query's matches to return, oldest first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Page {
    /// Matches skipped before the first returned.
    pub offset: usize,
    /// Most envelopes returned.
    pub limit: usize,
}

impl Page {
    /// Every match.
    pub const ALL: Page = Page { offset: 0, limit: usize::MAX };
}

/// One page of a query.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// Messages in the whole queue.
    pub total: usize,
    /// Messages that pass the filter.
    pub matched: usize,
    /// The page's envelopes, oldest first.
    pub envelopes: Vec<Envelope>,
}

/// The queue at a glance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub messages: usize,
    /// Octets of all queued bodies.
    pub bytes: u64,
    pub held: usize,
    /// Failed messages kept without a bounce (no backscatter).
    pub bounce_suppressed: usize,
    /// Arrival of the oldest message (microseconds since the epoch).
    pub oldest: Option<i64>,
    /// Per domain of pending recipients (a message with recipients in two domains counts in both).
    pub domains: BTreeMap<String, DomainStats>,
}

/// One domain's share of the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DomainStats {
    pub messages: usize,
    pub bytes: u64,
    /// Arrival of its oldest message.
    pub oldest: i64,
}

/// Age buckets of [`Queue::shape`], as qshape's: 0-5 m, 5-10 m, 10-20 m, 20-40 m, 40-80 m,
/// 80-160 m, 160-320 m, 320-640 m, 640-1280 m, 1280 m and more (about a day).
pub const SHAPE_BUCKETS_MINUTES: [u64; 10] = [0, 5, 10, 20, 40, 80, 160, 320, 640, 1280];

impl Stats {
    /// Counts one message in the totals.
    pub fn add_message(&mut self, size: u64, arrived: i64, held: bool, bounce_suppressed: bool) {
        self.messages += 1;
        self.bytes += size;
        self.held += usize::from(held);
        self.bounce_suppressed += usize::from(bounce_suppressed);
        self.oldest = Some(self.oldest.map_or(arrived, |o| o.min(arrived)));
    }

    /// Counts one message in the share of a domain of its pending recipients.
    pub fn add_domain(&mut self, domain: &str, size: u64, arrived: i64) {
        if !self.domains.contains_key(domain) {
            self.domains.insert(domain.to_string(), DomainStats { oldest: arrived, ..DomainStats::default() });
        }
        if let Some(entry) = self.domains.get_mut(domain) {
            entry.messages += 1;
            entry.bytes += size;
            entry.oldest = entry.oldest.min(arrived);
        }
    }
}

/// Counts one message of `domain` in age bucket `bucket` of a [`Queue::shape`].
pub fn shape_add(shape: &mut BTreeMap<String, [usize; SHAPE_BUCKETS_MINUTES.len()]>, domain: &str, bucket: usize) {
    if !shape.contains_key(domain) {
        shape.insert(domain.to_string(), Default::default());
    }
    if let Some(counts) = shape.get_mut(domain) {
        counts[bucket] += 1;
    }
}

/// The [`SHAPE_BUCKETS_MINUTES`] bucket of a message that arrived at `arrived`, at `now`.
pub fn shape_bucket(now: i64, arrived: i64) -> usize {
    let minutes = u64::try_from(now.saturating_sub(arrived).max(0) / 60_000_000).unwrap_or(0);
    SHAPE_BUCKETS_MINUTES.iter().rposition(|start| minutes >= *start).unwrap_or(0)
}

/// A message being received; dropping it without [`Incoming::commit`] leaves nothing queued.
pub trait Incoming: Send {
    fn id(&self) -> &str;
    /// Octets written so far.
    fn size(&self) -> u64;
    /// Appends body octets (CRLF line endings, not dot-stuffed).
    fn write(&mut self, data: &[u8]) -> Result<(), SpoolError>;
    /// Makes the message durable and queued; only after this returns Ok may the server answer 250.
    /// Concurrent commits share their disk waits (group commit).
    fn commit(self: Box<Self>, envelope: Envelope) -> Result<Envelope, SpoolError>;
}

/// A queued message's body, open for reading from its first octet.
pub struct MessageBody {
    reader: Box<dyn Read + Send>,
    len: u64,
}

impl MessageBody {
    pub fn new(reader: Box<dyn Read + Send>, len: u64) -> MessageBody {
        MessageBody { reader, len }
    }

    /// The body's length in octets.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The reader, limited to the body.
    pub fn into_reader(self) -> std::io::Take<Box<dyn Read + Send>> {
        self.reader.take(self.len)
    }

    /// Reads at most `limit` octets.
    pub fn read_up_to(self, limit: u64) -> Result<Vec<u8>, std::io::Error> {
        let mut buf = Vec::with_capacity(usize::try_from(self.len.min(limit)).unwrap_or(0));
        self.reader.take(self.len.min(limit)).read_to_end(&mut buf)?;
        Ok(buf)
    }
}

/// What a store knows of a message a node is delivering: its envelope, under a lease until
/// `until` (microseconds since the epoch). A store shared by several nodes records outcomes only
/// from the lease's holder; the local store has one node and grants every claim.
#[derive(Debug, Clone)]
pub struct Claim {
    pub envelope: Envelope,
    pub until: i64,
}

/// A queued message as listings show it (`queue list`, mailq-like): who from, for whom (pending
/// recipients), how large, since when, how delivery has gone.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    pub id: QueueId,
    /// Empty for the null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    pub size: u64,
    /// Microseconds since the epoch.
    pub arrived: i64,
    pub attempts: u32,
    pub next_attempt: i64,
    pub last_error: Option<String>,
    pub held: bool,
    /// The node that accepted it, and the node delivering it now (a shared store).
    pub accepted_by: Option<String>,
    pub leased_by: Option<String>,
}

impl From<&Envelope> for Listing {
    fn from(envelope: &Envelope) -> Listing {
        Listing {
            id: envelope.id.clone(),
            sender: envelope.sender.clone(),
            recipients: envelope.pending().map(|r| r.address.clone()).collect(),
            size: envelope.size,
            arrived: envelope.arrived,
            attempts: envelope.attempts,
            next_attempt: envelope.next_attempt,
            last_error: envelope.last_error().map(str::to_string),
            held: envelope.held,
            accepted_by: envelope.accepted_by.clone(),
            leased_by: envelope.leased_by.clone(),
        }
    }
}

/// Which due messages [`Queue::due`] returns: those not held, due by `until` (microseconds since
/// the epoch), after `after` in (due time, key) order; with `domain`, only those with a pending
/// recipient there; none with a pending recipient in a domain of `except`. At most `limit`.
#[derive(Debug, Clone, Copy)]
pub struct DueQuery<'a> {
    pub after: Option<(i64, QueueKey)>,
    pub until: i64,
    pub domain: Option<&'a str>,
    pub except: &'a [String],
    pub limit: usize,
}

impl DueQuery<'_> {
    /// Does a message due at `at` pass the time bounds?
    pub fn wants(&self, at: i64, key: QueueKey) -> bool {
        at <= self.until && self.after.is_none_or(|a| (at, key) > a)
    }

    /// Do a message's pending domains (lower case) pass `domain` and `except`?
    pub fn wants_domains<'d>(&self, domains: impl Iterator<Item = &'d str> + Clone) -> bool {
        let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b.trim_end_matches('.'));
        self.domain.is_none_or(|want| domains.clone().any(|d| is(d, want)))
            && !domains.clone().any(|d| self.except.iter().any(|e| is(d, e)))
    }
}

/// How long the local store's claims nominally last (it has one node, nothing enforces them).
const LOCAL_LEASE: i64 = 3600 * 1_000_000;

/// A change another node made to a shared queue.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreEvent {
    /// It queued these messages (due now).
    Queued(Vec<QueueId>),
    /// It changed due times (a flush): read the due messages again.
    Changed,
}

/// What the scheduler needs of a message before it reads the envelope: whether it is held, and
/// the domains of its pending recipients (lower case, distinct).
#[derive(Debug, Clone, PartialEq)]
pub struct Brief {
    pub held: bool,
    pub domains: Vec<String>,
    /// When it is due, as the store has it (a flush or retry included).
    pub next_attempt: i64,
}

/// The queue: the one interface between the stages and a store. See the module doc.
pub trait Queue: Send + Sync {
    /// A new queue ID that sorts after every ID issued before (arrival order).
    fn new_id(&self) -> QueueId;

    /// Starts writing a new message under `id` (from [`Queue::new_id`], or an imported one).
    fn incoming(self: Arc<Self>, id: &str) -> Result<Box<dyn Incoming>, SpoolError>;

    /// A message's envelope.
    fn get(&self, id: &str) -> Option<Envelope>;

    /// A message's [`Brief`], without reading its envelope where the store need not.
    fn brief(&self, id: &str) -> Option<Brief> {
        let envelope = self.get(id)?;
        let mut domains = Vec::new();
        for_each_domain(&envelope, |d| domains.push(d.to_string()));
        Some(Brief { held: envelope.held, domains, next_attempt: envelope.next_attempt })
    }

    /// Calls `f` with every queued envelope, oldest first: the hook of the default queries.
    fn visit(&self, f: &mut dyn FnMut(&Envelope));

    /// The messages a [`DueQuery`] asks for, earliest first. The scheduler keeps a window of the
    /// queue from this, not all of it: the store's due times are the truth.
    fn due(&self, query: &DueQuery<'_>) -> Vec<(i64, QueueKey)> {
        let mut due = Vec::new();
        self.visit(&mut |e| {
            if let Some(key) = super::queue_key(&e.id)
                && !e.held
                && query.wants(e.next_attempt, key)
            {
                let mut domains = Vec::new();
                for_each_domain(e, |d| domains.push(d.to_string()));
                if query.wants_domains(domains.iter().map(String::as_str)) {
                    due.push((e.next_attempt, key));
                }
            }
        });
        due.sort_unstable();
        due.truncate(query.limit);
        due
    }

    /// Makes the messages that pass `filter` and are not held due at `at` (a flush); returns how
    /// many. A store may keep this in memory only: after a restart the times last written hold.
    fn expedite(&self, filter: &Filter, at: i64) -> usize {
        let mut chosen = Vec::new();
        self.visit(&mut |e| {
            if !e.held && filter.matches(e, now_micros()) {
                chosen.push(e.id.clone());
            }
        });
        chosen.iter().filter(|id| self.expedite_id(id, at)).count()
    }

    /// Makes one message due at `at` (a retry), unless it is held or gone; returns whether it was.
    fn expedite_id(&self, id: &str, at: i64) -> bool {
        let Some(mut envelope) = self.get(id).filter(|e| !e.held) else { return false };
        envelope.next_attempt = at;
        self.update(std::slice::from_ref(&envelope)).is_ok()
    }

    /// Claims messages for delivery, oldest first: those of `ids` still queued, not held, not
    /// leased to another node and (with `due_by`) due by then, each under the store's lease. A
    /// store shared by several nodes records outcomes only from the lease's holder; the local
    /// store has one node and grants every claim.
    fn claim(&self, ids: &[QueueId], due_by: Option<i64>) -> Vec<Claim> {
        let until = now_micros().saturating_add(LOCAL_LEASE);
        let mut ids = ids.to_vec();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| self.get(&id))
            .filter(|e| !e.held && due_by.is_none_or(|at| e.next_attempt <= at))
            .map(|envelope| Claim { envelope, until })
            .collect()
    }

    /// Gives back claims of messages this node will not send now after all (parked for arrival
    /// order), so that another node may take them.
    fn unclaim(&self, ids: &[QueueId]) {
        let _ = ids;
    }

    /// Claims the right to deliver a `strict_order` domain's mail: one node at a time sends it,
    /// so the primary sees arrival order across nodes. Held until [`Queue::release_lane`] or
    /// until the holder's heartbeats stop for a lease. A store with one node grants it always.
    fn claim_lane(&self, domain: &str) -> bool {
        let _ = domain;
        true
    }

    /// Gives up a domain's lane (its batch is back and settled).
    fn release_lane(&self, domain: &str) {
        let _ = domain;
    }

    /// Is the queue shared with other nodes (whose arrivals and changes this node's scheduler
    /// learns through [`Queue::events`] and by reading the store again every [`Queue::reread_every`])?
    fn shared(&self) -> bool {
        false
    }

    /// Changes made by other nodes: messages they queued, flushes. Taken once, by the scheduler;
    /// None for a store that only this process writes.
    fn events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<StoreEvent>> {
        None
    }

    /// How often the scheduler reads the due messages again when nothing told it of a change
    /// (the backstop of [`Queue::events`]; a dead node's mail is found this way).
    fn reread_every(&self) -> Option<Duration> {
        None
    }

    /// Every envelope, oldest first (for small queues: tests, exports).
    fn list(&self) -> Vec<Envelope> {
        let mut all = Vec::new();
        self.visit(&mut |e| all.push(e.clone()));
        all
    }

    /// The messages that pass `filter`, one page of them, oldest first.
    fn query(&self, filter: &Filter, page: Page) -> Found {
        query_by_visit(self, filter, page)
    }

    /// Up to `limit` messages that pass `filter`, oldest first, after the message `after` (keyset
    /// paging: a listing of a million messages is read a page at a time, and messages that come
    /// and go meanwhile shift no page).
    fn scan(&self, filter: &Filter, after: Option<&str>, limit: usize) -> Vec<Envelope> {
        let now = now_micros();
        let mut found = Vec::new();
        self.visit(&mut |e| {
            if found.len() < limit && after.is_none_or(|a| e.id.as_str() > a) && filter.matches(e, now) {
                found.push(e.clone());
            }
        });
        found
    }

    /// Up to `limit` messages as listings show them, oldest first, after the message `after`. A
    /// store with an index answers from it, without reading an envelope.
    fn listing(&self, after: Option<&str>, limit: usize) -> Vec<Listing> {
        self.scan(&Filter::all(), after, limit).iter().map(Listing::from).collect()
    }

    /// The IDs of the messages that pass `filter`, oldest first (bulk actions, flushes).
    fn ids(&self, filter: &Filter) -> Vec<QueueId> {
        let now = now_micros();
        let mut ids = Vec::new();
        self.visit(&mut |e| {
            if filter.matches(e, now) {
                ids.push(e.id.clone());
            }
        });
        ids
    }

    /// How many messages pass `filter`.
    fn count(&self, filter: &Filter) -> usize {
        let now = now_micros();
        let mut n = 0;
        self.visit(&mut |e| n += usize::from(filter.matches(e, now)));
        n
    }

    /// Messages in the queue.
    fn len(&self) -> usize {
        self.count(&Filter::all())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Totals, and per domain of pending recipients.
    fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        self.visit(&mut |e| {
            stats.add_message(e.size, e.arrived, e.held, e.bounce_suppressed);
            for_each_domain(e, |domain| stats.add_domain(domain, e.size, e.arrived));
        });
        stats
    }

    /// Counts by domain of pending recipients and age bucket ([`SHAPE_BUCKETS_MINUTES`]), at `now`.
    fn shape(&self, now: i64) -> BTreeMap<String, [usize; SHAPE_BUCKETS_MINUTES.len()]> {
        let mut shape = BTreeMap::new();
        self.visit(&mut |e| {
            let bucket = shape_bucket(now, e.arrived);
            for_each_domain(e, |domain| shape_add(&mut shape, domain, bucket));
        });
        shape
    }

    /// Durably replaces the envelopes of queued messages (one group commit for all); a message
    /// that is no longer queued is an error ([`SpoolError::NotFound`]).
    fn update(&self, envelopes: &[Envelope]) -> Result<(), SpoolError>;

    /// Records retry bookkeeping (attempts, next attempt, last error) that need not be durable:
    /// losing it in a crash means an earlier retry, never lost mail. It is written with the
    /// message's next durable change or by [`Queue::persist`].
    fn note(&self, envelopes: Vec<Envelope>);

    /// Writes what [`Queue::note`] kept (at shutdown). Returns how many messages.
    fn persist(&self) -> Result<usize, SpoolError>;

    /// Removes messages (delivered, or expired and bounced); one already gone is not an error.
    fn remove(&self, ids: &[QueueId]) -> Result<(), SpoolError>;

    /// Opens a message's body by queue ID, to be read now. The store keeps the bytes readable for
    /// as long as the returned body is held, whatever it moves or compacts meanwhile.
    fn open_body(&self, id: &str) -> Result<MessageBody, SpoolError>;

    /// Bytes and inodes free where the queue is kept.
    fn space(&self) -> Result<SpaceInfo, SpoolError>;

    /// A small named document kept beside the queue for the daemon's own state (the chart's
    /// samples, the alert rules), with its version; None when it was never written. Every node of
    /// a shared store reads the same document, so the nodes agree on what it says.
    fn document(&self, name: &str) -> Result<Option<(i64, Vec<u8>)>, SpoolError>;

    /// Replaces a document if it is still at version `seen` (None: never written) and returns true;
    /// false when it changed meanwhile (read it again, apply the change again, and retry).
    fn replace_document(&self, name: &str, seen: Option<i64>, body: Vec<u8>) -> Result<bool, SpoolError>;

    /// Store maintenance behind `bartleby queue sync`: gives every message files of its own (the
    /// local store retires its journal), waiting at most `limit`. Returns how many messages it
    /// moved, or None when not all was done in time. A store without a journal has nothing to do.
    fn sync_files(&self, limit: Duration) -> Option<usize> {
        let _ = limit;
        Some(0)
    }

    /// A message's whole body.
    fn read_body(&self, id: &str) -> Result<Vec<u8>, SpoolError> {
        self.open_body(id)?.read_up_to(u64::MAX).map_err(|e| read_error(id, e))
    }

    /// A message's header section (up to its blank line), reading at most `limit` octets.
    fn read_headers(&self, id: &str, limit: usize) -> Result<Vec<u8>, SpoolError> {
        let mut buf = self.open_body(id)?.read_up_to(limit as u64).map_err(|e| read_error(id, e))?;
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end + 2);
        }
        Ok(buf)
    }

    /// Removes one message on an operator's request: not queued is an error.
    fn delete(&self, id: &str) -> Result<(), SpoolError> {
        if self.get(id).is_none() {
            return Err(SpoolError::NotFound(id.to_string()));
        }
        self.remove(&[id.to_string()])
    }

    /// Holds (no delivery attempts) or releases a message; returns its new envelope.
    fn set_held(&self, id: &str, held: bool) -> Result<Envelope, SpoolError> {
        let mut envelope = self.get(id).ok_or_else(|| SpoolError::NotFound(id.to_string()))?;
        if envelope.held != held {
            envelope.held = held;
            envelope.record(if held { "held by the operator" } else { "released by the operator" });
            if !held {
                envelope.next_attempt = now_micros();
            }
            self.update(std::slice::from_ref(&envelope))?;
        }
        Ok(envelope)
    }
}

/// [`Queue::query`] over [`Queue::visit`]: one pass that counts the matches and clones only the
/// page's envelopes. A store with a faster way for some filters uses it for the others.
pub fn query_by_visit<Q: Queue + ?Sized>(queue: &Q, filter: &Filter, page: Page) -> Found {
    let now = now_micros();
    let mut found = Found::default();
    queue.visit(&mut |e| {
        found.total += 1;
        if filter.matches(e, now) {
            if found.matched >= page.offset && found.envelopes.len() < page.limit {
                found.envelopes.push(e.clone());
            }
            found.matched += 1;
        }
    });
    found
}

fn read_error(id: &str, err: std::io::Error) -> SpoolError {
    match err.kind() {
        std::io::ErrorKind::NotFound => SpoolError::NotFound(id.to_string()),
        _ => SpoolError::Io { path: std::path::PathBuf::from(format!("(body of {id})")), source: err },
    }
}

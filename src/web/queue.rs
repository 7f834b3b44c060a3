//! What the page and the API show: the queue filtered and paginated, and the status summary.
//!
//! Both must stay fast with 100,000 messages queued, so one pass over the spool's in-memory index
//! (under its lock, without copying it) counts the matches and clones only the envelopes of the
//! requested page; only those few message files are opened, and only their header section is read
//! (for the Subject).

use super::{WebError, WebState};
use crate::control::ListedMessage;
use crate::schedule::DestinationState;
use crate::spool::{Envelope, RecipientStatus, SpaceInfo, Spool, now_micros, rfc3339};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

/// Messages per page unless asked otherwise.
pub const DEFAULT_PER_PAGE: usize = 50;
/// Most messages per page.
pub const MAX_PER_PAGE: usize = 500;
/// Header bytes read for the Subject.
const HEADER_LIMIT: usize = 64 * 1024;

/// The queue filters and the page wanted; empty strings mean "no filter" (as an HTML form sends).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct QueueFilter {
    /// Messages with a pending recipient in this domain (exact, case-insensitive).
    #[serde(default)]
    pub domain: Option<String>,
    /// Sender address containing this text (case-insensitive); `<>` matches the null sender.
    #[serde(default)]
    pub sender: Option<String>,
    /// A pending recipient address containing this text (case-insensitive).
    #[serde(default)]
    pub recipient: Option<String>,
    /// 1-based page number.
    #[serde(default)]
    pub page: Option<usize>,
    #[serde(default)]
    pub per_page: Option<usize>,
}

impl QueueFilter {
    fn norm(value: &Option<String>) -> Option<String> {
        value.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_ascii_lowercase)
    }

    /// The filter with empty fields removed and text lower-cased.
    pub fn normalised(&self) -> QueueFilter {
        QueueFilter {
            domain: Self::norm(&self.domain).map(|d| d.trim_end_matches('.').to_string()),
            sender: Self::norm(&self.sender),
            recipient: Self::norm(&self.recipient),
            page: Some(self.page.unwrap_or(1).max(1)),
            per_page: Some(self.per_page.unwrap_or(DEFAULT_PER_PAGE).clamp(1, MAX_PER_PAGE)),
        }
    }

    /// Does the envelope pass? Expects a [`QueueFilter::normalised`] filter.
    pub fn matches(&self, envelope: &Envelope) -> bool {
        if let Some(domain) = &self.domain
            && !envelope.pending().any(|r| domain_eq(&r.address, domain))
        {
            return false;
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
        true
    }
}

/// Case-insensitive (ASCII) substring test without allocating: this runs 100,000 times per page.
fn contains_ci(haystack: &str, lower_needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), lower_needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.iter().zip(n).all(|(a, b)| a.to_ascii_lowercase() == *b))
}

/// Is the address's domain `lower_domain`?
fn domain_eq(address: &str, lower_domain: &str) -> bool {
    address.rsplit_once('@').is_some_and(|(_, d)| d.trim_end_matches('.').eq_ignore_ascii_case(lower_domain))
}

/// One message in a listing: the fields of `queue list --json` plus the page's extras.
#[derive(Debug, Clone, Serialize)]
pub struct QueueEntry {
    #[serde(flatten)]
    pub listed: ListedMessage,
    /// Microseconds since the epoch, for computing ages.
    #[serde(skip)]
    pub arrived_micros: i64,
    /// Domains of the pending recipients.
    pub domains: Vec<String>,
    /// The Subject header, RFC 2047-decoded; None when absent or unreadable.
    pub subject: Option<String>,
}

/// One page of the (filtered) queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueuePage {
    /// Messages in the whole queue.
    pub total: usize,
    /// Messages passing the filter.
    pub matched: usize,
    pub page: usize,
    pub per_page: usize,
    pub pages: usize,
    pub filter: QueueFilter,
    /// Oldest first.
    pub messages: Vec<QueueEntry>,
}

/// The filtered page: one pass over the index, clones only the page's envelopes.
pub fn select(spool: &Spool, filter: &QueueFilter) -> (usize, usize, Vec<Envelope>) {
    let per_page = filter.per_page.unwrap_or(DEFAULT_PER_PAGE);
    let skip = (filter.page.unwrap_or(1) - 1).saturating_mul(per_page);
    spool.with_index(|index| {
        if filter.domain.is_none() && filter.sender.is_none() && filter.recipient.is_none() {
            // No filter: no need to look at every envelope to count the matches.
            let chosen = index.values().skip(skip).take(per_page).cloned().collect();
            return (index.len(), index.len(), chosen);
        }
        let mut matched = 0;
        let mut chosen = Vec::new();
        for envelope in index.values().filter(|e| filter.matches(e)) {
            if matched >= skip && chosen.len() < per_page {
                chosen.push(envelope.clone());
            }
            matched += 1;
        }
        (index.len(), matched, chosen)
    })
}

/// The page of the queue the filter asks for, with Subjects read from disk.
pub async fn queue_page(state: &WebState, filter: &QueueFilter) -> Result<QueuePage, WebError> {
    let filter = filter.normalised();
    let spool = std::sync::Arc::clone(&state.spool);
    let wanted = filter.clone();
    let (total, matched, messages) = tokio::task::spawn_blocking(move || {
        let (total, matched, envelopes) = select(&spool, &wanted);
        let entries = envelopes.iter().map(|e| entry(&spool, e)).collect::<Vec<_>>();
        (total, matched, entries)
    })
    .await
    .map_err(|e| WebError::Internal(e.to_string()))?;
    let per_page = filter.per_page.unwrap_or(DEFAULT_PER_PAGE);
    Ok(QueuePage {
        total,
        matched,
        page: filter.page.unwrap_or(1),
        per_page,
        pages: matched.div_ceil(per_page).max(1),
        filter,
        messages,
    })
}

fn entry(spool: &Spool, envelope: &Envelope) -> QueueEntry {
    let domains: BTreeSet<String> = envelope.pending().map(|r| r.domain()).collect();
    QueueEntry {
        listed: ListedMessage::from(envelope),
        arrived_micros: envelope.arrived,
        domains: domains.into_iter().collect(),
        subject: subject(spool, &envelope.id),
    }
}

/// The decoded Subject (mail-parser handles RFC 2047 encoded words), control characters removed.
pub fn subject(spool: &Spool, id: &str) -> Option<String> {
    let headers = spool.read_headers(id, HEADER_LIMIT).ok()?;
    let message = mail_parser::MessageParser::default().parse_headers(&headers)?;
    let text: String = message.subject()?.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    Some(text)
}

/// The state of one relayed domain and its primary.
#[derive(Debug, Clone, Serialize)]
pub struct DomainStatus {
    pub domain: String,
    /// "up" (the last attempt or probe worked), "failing", or "unknown" (nothing tried yet).
    pub primary: &'static str,
    pub last_success: Option<String>,
    pub failing_since: Option<String>,
    pub last_attempt: Option<String>,
    pub last_error: Option<String>,
    /// Messages with recipients pending in the domain.
    pub queued: usize,
}

/// How full the spool's filesystem is, against `[web] disk_warn_percent` and `disk_critical_percent`.
#[derive(Debug, Clone, Serialize)]
pub struct DiskStatus {
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub free_percent: f64,
    /// "ok", "warn" (amber) or "critical" (red).
    pub level: &'static str,
}

/// The top of the page: per-domain primaries, queue totals, disk.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub hostname: String,
    pub messages: usize,
    pub bytes: u64,
    pub held: usize,
    /// RFC 3339 arrival of the oldest message.
    pub oldest_arrived: Option<String>,
    pub oldest_age_seconds: Option<u64>,
    pub domains: Vec<DomainStatus>,
    pub disk: Option<DiskStatus>,
    /// Event counters since start (received, delivered, ...).
    pub counters: BTreeMap<&'static str, u64>,
    pub open_smtp_sessions: i64,
}

struct Totals {
    messages: usize,
    bytes: u64,
    held: usize,
    oldest: Option<i64>,
    per_domain: BTreeMap<String, usize>,
}

fn totals(spool: &Spool) -> Totals {
    spool.with_index(|index| {
        let mut t = Totals { messages: index.len(), bytes: 0, held: 0, oldest: None, per_domain: BTreeMap::new() };
        for e in index.values() {
            t.bytes += e.size;
            t.held += usize::from(e.held);
            t.oldest = Some(t.oldest.map_or(e.arrived, |o| o.min(e.arrived)));
            for_each_domain(e, |d| match t.per_domain.get_mut(d) {
                Some(n) => *n += 1,
                None => {
                    t.per_domain.insert(d.to_string(), 1);
                }
            });
        }
        t
    })
}

/// The domain of an address, lower-cased, allocating only when it is not already in lower case.
fn lower_domain(address: &str) -> Cow<'_, str> {
    let raw = address.rsplit_once('@').map(|(_, d)| d.trim_end_matches('.')).unwrap_or_default();
    if raw.bytes().any(|b| b.is_ascii_uppercase()) { Cow::Owned(raw.to_ascii_lowercase()) } else { Cow::Borrowed(raw) }
}

/// Calls `f` once per distinct domain of the pending recipients (this runs for every queued
/// message, so the common single-recipient case allocates nothing).
fn for_each_domain(envelope: &Envelope, mut f: impl FnMut(&str)) {
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

/// The status summary, computed now.
pub fn status(state: &WebState) -> Status {
    let t = totals(&state.spool);
    let now = now_micros();
    let destinations = state.scheduler.destinations();
    let mut names: BTreeSet<String> = state.config.relay.domains.iter().cloned().collect();
    names.extend(destinations.keys().cloned());
    names.extend(t.per_domain.keys().cloned());
    let domains = names
        .into_iter()
        .map(|d| domain_status(&d, destinations.get(&d), t.per_domain.get(&d).copied().unwrap_or(0)))
        .collect();
    Status {
        hostname: state.config.hostname.clone(),
        messages: t.messages,
        bytes: t.bytes,
        held: t.held,
        oldest_arrived: t.oldest.map(rfc3339),
        oldest_age_seconds: t.oldest.map(|o| u64::try_from((now - o) / 1_000_000).unwrap_or(0)),
        domains,
        disk: state.spool.space().ok().map(|s| disk(&state.config.web, s)),
        counters: state.metrics.counters(),
        open_smtp_sessions: state.metrics.open_sessions(),
    }
}

fn domain_status(domain: &str, state: Option<&DestinationState>, queued: usize) -> DomainStatus {
    let s = state.cloned().unwrap_or_default();
    let primary = match (&s.failing_since, &s.last_success) {
        (Some(_), _) => "failing",
        (None, Some(_)) => "up",
        (None, None) => "unknown",
    };
    DomainStatus {
        domain: domain.to_string(),
        primary,
        last_success: s.last_success.map(rfc3339),
        failing_since: s.failing_since.map(rfc3339),
        last_attempt: s.last_attempt.map(rfc3339),
        last_error: s.last_error,
        queued,
    }
}

fn disk(web: &crate::config::WebConfig, space: SpaceInfo) -> DiskStatus {
    let free_percent =
        if space.total_bytes == 0 { 0.0 } else { space.free_bytes as f64 * 100.0 / space.total_bytes as f64 };
    let level = if free_percent < f64::from(web.disk_critical_percent) {
        "critical"
    } else if free_percent < f64::from(web.disk_warn_percent) {
        "warn"
    } else {
        "ok"
    };
    DiskStatus { free_bytes: space.free_bytes, total_bytes: space.total_bytes, free_percent, level }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Recipient;

    fn envelope(sender: &str, rcpts: &[&str]) -> Envelope {
        Envelope::new("X".into(), sender.into(), rcpts.iter().map(|r| Recipient::new(r.to_string())).collect())
    }

    #[test]
    fn filters() {
        let e = envelope("Alice@Sender.test", &["bob@Example.test", "carol@other.test"]);
        let f = |d: Option<&str>, s: Option<&str>, r: Option<&str>| {
            QueueFilter {
                domain: d.map(Into::into),
                sender: s.map(Into::into),
                recipient: r.map(Into::into),
                ..Default::default()
            }
            .normalised()
        };
        assert!(f(None, None, None).matches(&e));
        assert!(f(Some("example.TEST"), None, None).matches(&e));
        assert!(!f(Some("example"), None, None).matches(&e));
        assert!(f(None, Some("alice@"), None).matches(&e));
        assert!(!f(None, Some("<>"), None).matches(&e));
        assert!(f(None, Some("<>"), None).matches(&envelope("", &["a@b.test"])));
        assert!(f(None, None, Some("CAROL")).matches(&e));
        assert!(!f(None, None, Some("dave")).matches(&e));
        assert!(f(Some(""), Some(" "), None).matches(&e));
    }
}

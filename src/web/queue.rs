//! What the page and the API show: the queue filtered and paginated, and the status summary.
//!
//! Both must stay fast with 100,000 messages queued, so one pass over the spool's in-memory index
//! (under its lock, without copying it) counts the matches and clones only the envelopes of the
//! requested page; only those few message files are opened, and only their header section is read
//! (for the Subject).

use super::{WebError, WebState};
use crate::control::ListedMessage;
use crate::deliver::destination::DestinationState;
use crate::spool::{Envelope, Filter, Page, Queue, SpaceInfo, now_micros, rfc3339};
use serde::{Deserialize, Serialize};
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

    /// The queue's filter for this one. Expects a [`QueueFilter::normalised`] filter.
    pub fn to_filter(&self) -> Filter {
        Filter {
            domain: self.domain.clone(),
            sender: self.sender.clone(),
            recipient: self.recipient.clone(),
            ..Filter::default()
        }
    }
}

/// One message in a listing: the fields of `queue list --json` plus the page's extras.
#[derive(Debug, Clone, Serialize)]
pub struct QueueEntry {
    #[serde(flatten)]
    pub listed: ListedMessage,
    /// Microseconds since the epoch, for computing ages.
    #[serde(skip)]
    pub arrived_micros: i64,
    /// Microseconds since the epoch, for "in 4m".
    #[serde(skip)]
    pub next_attempt_micros: i64,
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

/// The filtered page: one query, which clones only the page's envelopes.
pub fn select(spool: &dyn Queue, filter: &QueueFilter) -> (usize, usize, Vec<Envelope>) {
    let per_page = filter.per_page.unwrap_or(DEFAULT_PER_PAGE);
    let offset = (filter.page.unwrap_or(1) - 1).saturating_mul(per_page);
    let found = spool.query(&filter.to_filter(), Page { offset, limit: per_page });
    (found.total, found.matched, found.envelopes)
}

/// The page of the queue the filter asks for, with Subjects read from disk.
pub async fn queue_page(state: &WebState, filter: &QueueFilter) -> Result<QueuePage, WebError> {
    let filter = filter.normalised();
    let spool = std::sync::Arc::clone(&state.spool);
    let wanted = filter.clone();
    let (total, matched, messages) = tokio::task::spawn_blocking(move || {
        let (total, matched, envelopes) = select(spool.as_ref(), &wanted);
        let entries = envelopes.iter().map(|e| entry(spool.as_ref(), e)).collect::<Vec<_>>();
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

fn entry(spool: &dyn Queue, envelope: &Envelope) -> QueueEntry {
    let domains: BTreeSet<String> = envelope.pending().map(|r| r.domain()).collect();
    QueueEntry {
        listed: ListedMessage::from(envelope),
        arrived_micros: envelope.arrived,
        next_attempt_micros: envelope.next_attempt,
        domains: domains.into_iter().collect(),
        subject: subject(spool, &envelope.id),
    }
}

/// The decoded Subject (mail-parser handles RFC 2047 encoded words), control characters removed.
pub fn subject(spool: &dyn Queue, id: &str) -> Option<String> {
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
    /// Deliveries paused by the operator (`bartleby queue pause`).
    pub paused: bool,
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

/// The status summary, computed now.
pub fn status(state: &WebState) -> Status {
    let t = state.spool.stats();
    let now = now_micros();
    let destinations = state.scheduler.destinations();
    let paused = state.scheduler.paused();
    // Rows for our destinations only: relayed domains and routes, not the senders' domains that
    // our bounces go to.
    let config = state.config();
    let mut names: BTreeSet<String> = config.relay.domains.iter().map(|d| d.to_ascii_lowercase()).collect();
    names.extend(config.routes.keys().map(|d| d.to_ascii_lowercase()));
    names.extend(destinations.keys().filter(|d| config.is_destination(d)).cloned());
    let domains = names
        .into_iter()
        .map(|d| {
            let mut row = domain_status(&d, destinations.get(&d), t.domains.get(&d).map_or(0, |s| s.messages));
            row.paused = paused.contains(&d);
            row
        })
        .collect();
    Status {
        hostname: state.config().hostname.clone(),
        messages: t.messages,
        bytes: t.bytes,
        held: t.held,
        oldest_arrived: t.oldest.map(rfc3339),
        oldest_age_seconds: t.oldest.map(|o| u64::try_from(now.saturating_sub(o) / 1_000_000).unwrap_or(0)),
        domains,
        disk: state.spool.space().ok().map(|s| disk(&state.config().web, s)),
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
        paused: false,
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
        assert!(f(None, None, None).to_filter().matches(&e, 0));
        assert!(f(Some("example.TEST"), None, None).to_filter().matches(&e, 0));
        assert!(!f(Some("example"), None, None).to_filter().matches(&e, 0));
        assert!(f(None, Some("alice@"), None).to_filter().matches(&e, 0));
        assert!(!f(None, Some("<>"), None).to_filter().matches(&e, 0));
        assert!(f(None, Some("<>"), None).to_filter().matches(&envelope("", &["a@b.test"]), 0));
        assert!(f(None, None, Some("CAROL")).to_filter().matches(&e, 0));
        assert!(!f(None, None, Some("dave")).to_filter().matches(&e, 0));
        assert!(f(Some(""), Some(" "), None).to_filter().matches(&e, 0));
    }
}

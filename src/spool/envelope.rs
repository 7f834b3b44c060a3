//! The mutable half of a queued message: who it is from, whom it is for, and how delivery has gone.
//! Stored as JSON beside the immutable body; `docs/spool.md` describes the format.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The envelope format version written by this bartleby; older versions must stay readable.
pub const ENVELOPE_VERSION: u32 = 1;

/// A queue ID: 13 hex digits of microseconds since the epoch and 3 of a sequence number, so that
/// sorting IDs as strings sorts messages by arrival.
pub type QueueId = String;

/// A queue ID as a number: 13 hex digits of microseconds and 3 of a sequence are exactly 64 bits,
/// and the numbers sort as the IDs do. Eight octets instead of a 40-octet string where a million
/// of them are kept (the local store's index, the scheduler's timetable).
pub type QueueKey = u64;

/// The key of a well-formed queue ID.
pub fn queue_key(id: &str) -> Option<QueueKey> {
    if super::is_queue_id(id) { u64::from_str_radix(id, 16).ok() } else { None }
}

/// The queue ID of a key.
pub fn queue_id(key: QueueKey) -> QueueId {
    format!("{key:016X}")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    pub version: u32,
    pub id: QueueId,
    /// The reverse path without angle brackets; empty for the null sender `<>` (bounces).
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// RFC 3461 RET: return the full message or only headers in a failure DSN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<DsnRet>,
    /// RFC 3461 ENVID, xtext-decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    /// The BODY= parameter given at MAIL (RFC 6152).
    #[serde(default)]
    pub body: BodyType,
    /// The SMTPUTF8 parameter was given at MAIL (RFC 6531).
    #[serde(default)]
    pub smtputf8: bool,
    /// The REQUIRETLS parameter was given at MAIL (RFC 8689 4.1): every next hop must be reached
    /// over TLS with a verified certificate and offer REQUIRETLS itself. Written only when set, so
    /// envelopes without it look as before and older ones read as without it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub requiretls: bool,
    /// Who handed us the message; None for messages bartleby made itself (DSNs).
    #[serde(default)]
    pub client_ip: Option<IpAddr>,
    #[serde(default)]
    pub helo: String,
    /// Microseconds since the Unix epoch.
    pub arrived: i64,
    /// Size of the stored body in octets, including our Received header.
    pub size: u64,
    pub attempts: u32,
    /// Microseconds since the epoch; the scheduler tries the message at or after this time.
    pub next_attempt: i64,
    /// Held messages are never tried or flushed until released.
    #[serde(default)]
    pub held: bool,
    /// A delay notice was sent (at most one per message).
    #[serde(default)]
    pub delay_notified: bool,
    /// Made by bartleby (a DSN): never answered with another DSN.
    #[serde(default)]
    pub generated: bool,
    /// What happened to the message, oldest first.
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    /// The sender's SPF and DKIM results, checked at accept time while the client's IP was known;
    /// None when not checked (older spools, generated notices, checks turned off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_auth: Option<SenderAuth>,
    /// A failure notice was due but not sent because the sender could be forged (backscatter): the
    /// message is kept held and counted until the queue lifetime is over.
    #[serde(default)]
    pub bounce_suppressed: bool,
    /// The node that accepted the message, in a store shared by several nodes (docs/cluster.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_by: Option<String>,
    /// The node delivering the message right now (holding its lease), in a shared store; read
    /// from the store with the envelope, never stored in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased_by: Option<String>,
}

/// The part of an envelope the index needs (`src/spool/index.rs`), parsed at a restart without
/// building the history, the HELO name and the rest: a million envelopes are read then.
#[derive(Debug, Deserialize)]
pub struct IndexedEnvelope {
    pub(super) sender: String,
    pub(super) recipients: Vec<IndexedRecipient>,
    pub(super) arrived: i64,
    pub(super) size: u64,
    pub(super) attempts: u32,
    pub(super) next_attempt: i64,
    #[serde(default)]
    pub(super) held: bool,
    #[serde(default)]
    pub(super) bounce_suppressed: bool,
}

/// The part of a recipient the index needs.
#[derive(Debug, Deserialize)]
pub struct IndexedRecipient {
    pub(super) address: String,
    pub(super) status: RecipientStatus,
    #[serde(default)]
    pub(super) last_error: Option<String>,
    #[serde(default)]
    pub(super) remote_mta: Option<String>,
}

/// What SPF (RFC 7208) and DKIM (RFC 6376) said about a message's sender when it arrived.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SenderAuth {
    /// The SPF result for the MAIL FROM identity (the HELO identity for the null sender).
    pub spf: SpfVerdict,
    /// A DKIM signature whose d= domain is aligned with the From header's domain (RFC 7489 3.1.1,
    /// relaxed) verified.
    pub dkim_aligned: bool,
    /// The domain whose DKIM signature passed, if any (for the log and the admin page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim_domain: Option<String>,
}

/// RFC 7208 2.6 results.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SpfVerdict {
    Pass,
    Fail,
    Softfail,
    Neutral,
    None,
    Temperror,
    Permerror,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Recipient {
    /// The forward path without angle brackets.
    pub address: String,
    pub status: RecipientStatus,
    /// RFC 3461 NOTIFY; None means the parameter was not given (default: failure notices only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Vec<DsnNotify>>,
    /// RFC 3461 ORCPT as given (`addr-type;xtext`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    /// The last error or reply for this recipient, with the stage and the server's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The remote host that gave the last reply (for the DSN Remote-MTA field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_mta: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RecipientStatus {
    /// Still to be delivered.
    Pending,
    /// The next hop answered 250 after DATA.
    Delivered,
    /// Permanently failed; a failure DSN has been queued (or was not wanted).
    Failed,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum DsnRet {
    Full,
    Hdrs,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum DsnNotify {
    Never,
    Success,
    Failure,
    Delay,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum BodyType {
    #[default]
    #[serde(rename = "7BIT")]
    SevenBit,
    #[serde(rename = "8BITMIME")]
    EightBitMime,
    #[serde(rename = "BINARYMIME")]
    BinaryMime,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryEntry {
    /// Microseconds since the epoch.
    pub at: i64,
    pub event: String,
}

impl Envelope {
    /// A fresh envelope for a message arriving now.
    pub fn new(id: QueueId, sender: String, recipients: Vec<Recipient>) -> Envelope {
        let now = now_micros();
        Envelope {
            version: ENVELOPE_VERSION,
            id,
            sender,
            recipients,
            ret: None,
            envid: None,
            body: BodyType::SevenBit,
            smtputf8: false,
            requiretls: false,
            client_ip: None,
            helo: String::new(),
            arrived: now,
            size: 0,
            attempts: 0,
            next_attempt: now,
            held: false,
            delay_notified: false,
            generated: false,
            history: Vec::new(),
            sender_auth: None,
            bounce_suppressed: false,
            accepted_by: None,
            leased_by: None,
        }
    }

    /// Recipients still to be delivered.
    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients.iter().filter(|r| r.status == RecipientStatus::Pending)
    }

    pub fn is_done(&self) -> bool {
        self.pending().next().is_none()
    }

    /// The most recent error of any pending recipient, for listings.
    pub fn last_error(&self) -> Option<&str> {
        self.pending().find_map(|r| r.last_error.as_deref())
    }

    pub fn record(&mut self, event: impl Into<String>) {
        self.history.push(HistoryEntry { at: now_micros(), event: event.into() });
    }
}

impl Recipient {
    pub fn new(address: String) -> Recipient {
        Recipient {
            address,
            status: RecipientStatus::Pending,
            notify: None,
            orcpt: None,
            last_error: None,
            remote_mta: None,
        }
    }

    /// The domain part, lower-cased, for routing.
    pub fn domain(&self) -> String {
        domain_of(&self.address)
    }

    /// Does the recipient want a DSN of this kind? Without NOTIFY, failures and delays are reported
    /// (RFC 3461 4.1 leaves it to the MTA; this is what Postfix and sendmail do).
    pub fn wants(&self, kind: DsnNotify) -> bool {
        match &self.notify {
            None => matches!(kind, DsnNotify::Failure | DsnNotify::Delay),
            Some(list) => list.contains(&kind),
        }
    }
}

/// The domain part of an address, lower-cased; empty when there is none.
pub fn domain_of(address: &str) -> String {
    address.rsplit_once('@').map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase()).unwrap_or_default()
}

pub fn now_micros() -> i64 {
    to_micros(SystemTime::now())
}

pub fn to_micros(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

pub fn from_micros(micros: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

/// RFC 3339 form of a timestamp in microseconds, in UTC, for listings and JSON.
pub fn rfc3339(micros: i64) -> String {
    let at = utc(from_micros(micros));
    at.replace_nanosecond(0).unwrap_or(at).format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// RFC 5322 date (for Received and Date headers), in UTC.
pub fn rfc5322_date(time: SystemTime) -> String {
    utc(time).format(&time::format_description::well_known::Rfc2822).unwrap_or_default()
}

/// `time` as a date, clamped to the years 1 to 9999 that the `time` crate represents: its own
/// conversion panics beyond them, and an envelope's timestamps come from a file (a damaged one, or
/// a `queue import` line) that the listing, the admin page and failure notices must still show.
fn utc(time: SystemTime) -> time::OffsetDateTime {
    let nanos = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i128::try_from(after.as_nanos()).unwrap_or(i128::MAX),
        Err(before) => i128::try_from(before.duration().as_nanos()).map_or(i128::MIN, |n| -n),
    };
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(if nanos < 0 {
        time::PrimitiveDateTime::MIN.assume_utc()
    } else {
        time::PrimitiveDateTime::MAX.assume_utc()
    })
}

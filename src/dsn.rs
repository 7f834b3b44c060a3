//! Delivery status notifications (RFC 3464): failure and delay notices, sent from the null sender.
//!
//! The scheduler decides *when* a notice is due (a permanent failure, `queue.max_lifetime`
//! reached, or `queue.warn_after` passed); this module decides *whether* the sender asked for one
//! ([`wanted`], [`reported`]) and builds the message ([`build`]) and its envelope
//! ([`notice_envelope`]). Everything here is pure: no I/O, no clock (the caller passes `now`).
//!
//! The notice is a `multipart/report` (RFC 6522) with three parts: a human explanation, a
//! `message/delivery-status` report (RFC 3464 section 2), and the returned message or its headers
//! (RFC 3461 section 4.3, RET). Messages from SMTPUTF8 senders or with non-ASCII addresses use the
//! internationalised types of RFC 6533 instead.

use crate::spool::envelope::{
    BodyType, DsnNotify, DsnRet, Envelope, QueueId, Recipient, RecipientStatus, from_micros, rfc5322_date,
};
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Messages larger than this are returned as headers only even with RET=FULL, so a bounce of a
/// huge message cannot itself be refused for its size (Postfix's `bounce_size_limit` idea).
pub const RETURN_FULL_LIMIT: usize = 10 * 1024 * 1024;

/// Longest value (in characters) of a field we write, so that no line can exceed the 998 octets
/// of RFC 5322 section 2.1.1 even before folding.
const MAX_VALUE: usize = 900;

/// Folding target for the header fields we write (RFC 5322 section 2.1.1 "SHOULD be 78").
const FOLD_WIDTH: usize = 78;

/// Which notice to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnKind {
    /// The message will not be delivered to these recipients (RFC 3464 `Action: failed`).
    Failure,
    /// Delivery is late but still being retried (RFC 3464 `Action: delayed`); sent at most once.
    Delay,
}

impl DsnKind {
    /// The NOTIFY keyword (RFC 3461 section 4.1) that asks for this kind of notice.
    fn notify(self) -> DsnNotify {
        match self {
            DsnKind::Failure => DsnNotify::Failure,
            DsnKind::Delay => DsnNotify::Delay,
        }
    }

    /// The RFC 3464 section 2.3.3 Action value.
    fn action(self) -> &'static str {
        match self {
            DsnKind::Failure => "failed",
            DsnKind::Delay => "delayed",
        }
    }
}

/// One recipient line of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedRecipient {
    /// The forward path as given at RCPT, without angle brackets (Final-Recipient).
    pub address: String,
    /// RFC 3461 ORCPT as given (`addr-type;xtext`), for Original-Recipient.
    pub orcpt: Option<String>,
    /// RFC 3463 enhanced status code, e.g. "5.1.1".
    pub status: String,
    /// The remote server's reply, e.g. "550 5.1.1 no such user" (Diagnostic-Code: smtp).
    pub diagnostic: Option<String>,
    /// The host that gave that reply (Remote-MTA: dns).
    pub remote_mta: Option<String>,
    /// Human explanation for the text part, e.g. "RCPT TO: 550 5.1.1 no such user".
    pub text: String,
    /// When delivery was last tried (Last-Attempt-Date); `None` uses the notice's date.
    pub last_attempt: Option<SystemTime>,
}

impl ReportedRecipient {
    /// Builds a report line from what the spool remembers about a recipient: the status and
    /// diagnostic are taken from the SMTP reply inside `last_error` when there is one.
    ///
    /// Without any reply (refused connections, DNS trouble) the status is 4.4.7 "delivery time
    /// expired" for a failure and 4.0.0 for a delay (RFC 3463 section 3.5). An expired message
    /// whose last reply was a 4xx keeps that 4.x.x status, as Postfix does, because it tells the
    /// sender most about what went wrong.
    pub fn from_recipient(recipient: &Recipient, kind: DsnKind) -> ReportedRecipient {
        let last = recipient.last_error.as_deref().unwrap_or("");
        let reply = find_reply(last);
        let status = match reply {
            Some(r) => r.status(),
            None if kind == DsnKind::Failure => "4.4.7".to_string(),
            None => "4.0.0".to_string(),
        };
        let text = if last.is_empty() {
            match kind {
                DsnKind::Failure => "delivery time expired".to_string(),
                DsnKind::Delay => "delivery temporarily suspended".to_string(),
            }
        } else {
            last.to_string()
        };
        ReportedRecipient {
            address: recipient.address.clone(),
            orcpt: recipient.orcpt.clone(),
            status,
            diagnostic: reply.map(|r| last[r.start..].to_string()),
            remote_mta: recipient.remote_mta.clone(),
            text,
            last_attempt: None,
        }
    }
}

/// An SMTP reply found inside a longer error text.
#[derive(Debug, Clone, Copy)]
struct FoundReply<'a> {
    /// Byte offset of the reply code in the text.
    start: usize,
    /// The three-digit reply code.
    code: &'a str,
    /// The RFC 2034 enhanced status code following it, if its class matches the reply code.
    enhanced: Option<&'a str>,
}

impl FoundReply<'_> {
    fn status(&self) -> String {
        match self.enhanced {
            Some(e) => e.to_string(),
            None => format!("{}.0.0", &self.code[..1]),
        }
    }
}

/// Finds the SMTP reply in an error text: a `2xx`/`4xx`/`5xx` code at the start or after `": "`
/// (how the deliverer writes "RCPT TO: 550 5.1.1 no such user"), so that numbers in other texts
/// ("timeout after 450 seconds") are not mistaken for one.
fn find_reply(text: &str) -> Option<FoundReply<'_>> {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(2)).find_map(|i| {
        let code = text.get(i..i + 3)?;
        let before_ok = i == 0 || text[..i].ends_with(": ");
        let after = bytes.get(i + 3).copied();
        let after_ok = matches!(after, None | Some(b' ' | b'-'));
        let digits = code.bytes().all(|b| b.is_ascii_digit()) && matches!(bytes[i], b'2' | b'4' | b'5');
        if !(before_ok && after_ok && digits) {
            return None;
        }
        let rest = text.get(i + 4..).unwrap_or("");
        let word = rest.split(' ').next().unwrap_or("");
        let enhanced = is_enhanced(word, bytes[i]).then_some(word);
        Some(FoundReply { start: i, code, enhanced })
    })
}

/// Is `word` an RFC 3463 status code (`class.subject.detail`) of the same class as the reply?
fn is_enhanced(word: &str, class: u8) -> bool {
    let parts: Vec<&str> = word.split('.').collect();
    parts.len() == 3
        && parts[0].as_bytes() == [class]
        && parts[1..].iter().all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Would this envelope produce a notice of `kind` at all? False for the null sender and for
/// messages bartleby generated itself (RFC 3461 section 6.2, RFC 3834 section 2: never answer a
/// notice with a notice), for a second delay notice, and when no recipient that could be reported
/// asked for it: for a delay, the pending ones; for a failure, any not delivered (pending or
/// already marked failed, so the answer does not depend on when the scheduler marks them).
pub fn wanted(envelope: &Envelope, kind: DsnKind) -> bool {
    if kind == DsnKind::Delay && envelope.delay_notified {
        return false;
    }
    let candidates = envelope.recipients.iter().filter(|r| match kind {
        DsnKind::Failure => r.status != RecipientStatus::Delivered,
        DsnKind::Delay => r.status == RecipientStatus::Pending,
    });
    !reported(envelope, kind, candidates).is_empty()
}

/// The recipients among `recipients` that get reported in a notice of `kind`: those whose NOTIFY
/// asks for it (RFC 3461 section 4.1; without NOTIFY, failures and delays). Empty for the null
/// sender and for generated messages.
pub fn reported<'a>(
    envelope: &Envelope,
    kind: DsnKind,
    recipients: impl IntoIterator<Item = &'a Recipient>,
) -> Vec<&'a Recipient> {
    if envelope.sender.is_empty() || envelope.generated {
        return Vec::new();
    }
    recipients.into_iter().filter(|r| r.wants(kind.notify())).collect()
}

/// The envelope for a notice built by [`build`]: from the null sender `<>` to the original sender
/// (RFC 5321 section 4.5.5), marked `generated` so it is never bounced itself, with BODY and
/// SMTPUTF8 set from what the notice contains.
pub fn notice_envelope(id: QueueId, original: &Envelope, notice: &[u8]) -> Envelope {
    let mut rcpt = Recipient::new(original.sender.clone());
    // A notice about a notice is never sent anyway; say so on the wire too (RFC 3461 4.1).
    rcpt.notify = Some(vec![DsnNotify::Never]);
    let mut envelope = Envelope::new(id, String::new(), vec![rcpt]);
    envelope.generated = true;
    let eight_bit = !notice.is_ascii();
    envelope.body = if eight_bit { BodyType::EightBitMime } else { BodyType::SevenBit };
    envelope.smtputf8 = eight_bit && (original.smtputf8 || !original.sender.is_ascii());
    envelope.size = notice.len() as u64;
    envelope
}

/// Everything [`build`] needs besides the envelope, gathered once.
struct Notice<'a> {
    hostname: &'a str,
    envelope: &'a Envelope,
    kind: DsnKind,
    recipients: &'a [ReportedRecipient],
    now: SystemTime,
    retry_until: Option<SystemTime>,
    /// Use the RFC 6533 types and allow UTF-8 in fields.
    utf8: bool,
}

/// Builds the complete notice: CRLF line endings, ready to be spooled as a new message from `<>`
/// to `envelope.sender` (see [`notice_envelope`]).
///
/// `original` is the spooled message (our Received header plus the original), or just its header
/// section. A failure notice returns the whole message for RET=FULL and the header section
/// otherwise (RFC 3461 section 4.3); a delay notice returns headers only.
pub fn build(
    hostname: &str,
    envelope: &Envelope,
    kind: DsnKind,
    recipients: &[ReportedRecipient],
    original: &[u8],
    now: SystemTime,
    retry_until: Option<SystemTime>,
) -> Vec<u8> {
    let utf8 = envelope.smtputf8
        || !envelope.sender.is_ascii()
        || recipients.iter().any(|r| !r.address.is_ascii() || r.orcpt.as_deref().is_some_and(|o| !o.is_ascii()));
    let notice = Notice { hostname, envelope, kind, recipients, now, retry_until, utf8 };
    let original = crlf(original);
    let returned = returned_part(&notice, &original);
    let parts = [text_part(&notice, returned.full), status_part(&notice), returned.bytes];
    let boundary = unique_boundary(&parts);
    let mut out = top_headers(&notice, &boundary, parts.iter().any(|p| !p.is_ascii())).into_bytes();
    out.extend_from_slice(b"This is a MIME-encapsulated message.\r\n");
    for part in &parts {
        out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The top-level header section, ending with the empty line.
fn top_headers(n: &Notice<'_>, boundary: &str, eight_bit: bool) -> String {
    let host = clean(n.hostname, false);
    let subject = match n.kind {
        DsnKind::Failure => "Undelivered Mail Returned to Sender",
        DsnKind::Delay => "Delayed Mail (still being retried)",
    };
    let report_type = if n.utf8 { "global-delivery-status" } else { "delivery-status" };
    let mut h = String::new();
    field(&mut h, "From", &format!("MAILER-DAEMON@{host} (Mail Delivery System)"));
    field(&mut h, "To", &format!("<{}>", clean(&n.envelope.sender, n.utf8)));
    field(&mut h, "Subject", subject);
    field(&mut h, "Date", &rfc5322_date(n.now));
    field(&mut h, "Message-ID", &format!("<{}.{}@{host}>", unix_secs(n.now), random_hex(8)));
    field(&mut h, "MIME-Version", "1.0");
    // RFC 3834 section 5: mark the notice so auto-responders leave it alone.
    field(&mut h, "Auto-Submitted", "auto-replied");
    field(&mut h, "Content-Type", &format!("multipart/report; report-type={report_type}; boundary=\"{boundary}\""));
    field(&mut h, "Content-Transfer-Encoding", if eight_bit { "8bit" } else { "7bit" });
    h.push_str("\r\n");
    h
}

/// Part 1: the human-readable explanation (RFC 6522 section 3: the first part of a report).
fn text_part(n: &Notice<'_>, returned_full: bool) -> Vec<u8> {
    let host = clean(n.hostname, false);
    let mut t = format!("This is the mail system at host {host}.\r\n\r\n");
    match n.kind {
        DsnKind::Failure => {
            t.push_str("Your message could not be delivered to one or more recipients.\r\n");
            t.push_str(if returned_full { "It is attached below.\r\n" } else { "Its headers are attached below.\r\n" });
            t.push_str("The mail system gave up on the recipients listed here, for the\r\nreasons shown.\r\n");
        }
        DsnKind::Delay => {
            t.push_str("#### THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE. ####\r\n\r\n");
            t.push_str("Your message could not be delivered yet to the recipients listed here.\r\n");
            let until = n.retry_until.map_or_else(|| "it expires".to_string(), rfc5322_date);
            let _ = write!(t, "The mail system will keep trying until {until}.\r\n");
            t.push_str("If delivery still fails by then, the message will be returned to you.\r\n");
        }
    }
    let _ = write!(t, "\r\nFor further assistance, please contact the postmaster of {host}.\r\n\r\n");
    for r in n.recipients {
        let line = format!("<{}>: {}", clean(&r.address, n.utf8), clean(&r.text, n.utf8));
        t.push_str(&wrap(&line, "    "));
    }
    let charset = if t.is_ascii() { "us-ascii" } else { "utf-8" };
    let mut h = String::new();
    field(&mut h, "Content-Description", "Notification");
    field(&mut h, "Content-Type", &format!("text/plain; charset={charset}"));
    field(&mut h, "Content-Transfer-Encoding", if t.is_ascii() { "7bit" } else { "8bit" });
    h.push_str("\r\n");
    h.push_str(&t);
    h.into_bytes()
}

/// Part 2: the machine-readable report (RFC 3464 section 2, or RFC 6533 section 6.2 for UTF-8).
fn status_part(n: &Notice<'_>) -> Vec<u8> {
    let env = n.envelope;
    let mut s = String::new();
    field(&mut s, "Reporting-MTA", &format!("dns; {}", clean(n.hostname, false)));
    if let Some(envid) = &env.envid {
        field(&mut s, "Original-Envelope-Id", &clean(envid, false));
    }
    let helo = clean(&env.helo, false);
    if !helo.is_empty() {
        let from = match env.client_ip {
            Some(ip) => format!("dns; {helo} ([{ip}])"),
            None => format!("dns; {helo}"),
        };
        field(&mut s, "Received-From-MTA", &from);
    }
    field(&mut s, "Arrival-Date", &rfc5322_date(from_micros(env.arrived)));
    for r in n.recipients {
        s.push_str("\r\n");
        recipient_fields(&mut s, n, r);
    }
    let ctype = if n.utf8 { "message/global-delivery-status" } else { "message/delivery-status" };
    let mut h = String::new();
    field(&mut h, "Content-Description", "Delivery report");
    field(&mut h, "Content-Type", ctype);
    h.push_str("\r\n");
    h.push_str(&s);
    h.into_bytes()
}

/// The per-recipient fields of RFC 3464 section 2.3.
fn recipient_fields(s: &mut String, n: &Notice<'_>, r: &ReportedRecipient) {
    if let Some(orcpt) = r.orcpt.as_deref().and_then(|o| original_recipient(o, n.utf8)) {
        field(s, "Original-Recipient", &orcpt);
    }
    let address = clean(&r.address, n.utf8);
    let addr_type = if address.is_ascii() { "rfc822" } else { "utf-8" };
    field(s, "Final-Recipient", &format!("{addr_type}; {address}"));
    field(s, "Action", n.kind.action());
    field(s, "Status", &status_code(&r.status, n.kind));
    if let Some(mta) = r.remote_mta.as_deref().map(|m| clean(m, false)).filter(|m| !m.is_empty()) {
        field(s, "Remote-MTA", &format!("dns; {mta}"));
    }
    if let Some(diag) = r.diagnostic.as_deref().map(|d| clean(d, n.utf8)).filter(|d| !d.is_empty()) {
        field(s, "Diagnostic-Code", &format!("smtp; {diag}"));
    }
    field(s, "Last-Attempt-Date", &rfc5322_date(r.last_attempt.unwrap_or(n.now)));
    if let (DsnKind::Delay, Some(until)) = (n.kind, n.retry_until) {
        field(s, "Will-Retry-Until", &rfc5322_date(until));
    }
}

/// A status code safe to put in the report: the given one when it is well formed, else the
/// generic code of the kind's class (RFC 3463 section 3.1).
fn status_code(status: &str, kind: DsnKind) -> String {
    let class = status.as_bytes().first().copied().unwrap_or(b'0');
    if matches!(class, b'2' | b'4' | b'5') && is_enhanced(status, class) {
        status.to_string()
    } else if kind == DsnKind::Failure {
        "5.0.0".to_string()
    } else {
        "4.0.0".to_string()
    }
}

/// Original-Recipient from an ORCPT value `addr-type;xtext` (RFC 3461 section 4.2): the address
/// is xtext-decoded and written as `addr-type; address`. `None` when the value is malformed.
fn original_recipient(orcpt: &str, utf8: bool) -> Option<String> {
    let (addr_type, xtext) = orcpt.split_once(';')?;
    let addr_type = addr_type.trim();
    if addr_type.is_empty() || !addr_type.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return None;
    }
    let address = clean(&xtext_decode(xtext.trim()), utf8);
    (!address.is_empty()).then(|| format!("{addr_type}; {address}"))
}

/// Decodes RFC 3461 section 4 xtext (`+XX` hex escapes); malformed escapes are kept as they are.
fn xtext_decode(xtext: &str) -> String {
    let bytes = xtext.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = xtext.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'+', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Part 3 and whether it holds the whole message.
struct Returned {
    bytes: Vec<u8>,
    full: bool,
}

/// Part 3: the returned message (RET=FULL, failures only, not BINARYMIME, not too large) or its
/// header section (RFC 3462/6522 `text/rfc822-headers`, RFC 6533 `message/global-headers`).
fn returned_part(n: &Notice<'_>, original: &[u8]) -> Returned {
    let headers = header_section(original);
    // A BINARYMIME body cannot travel inside a 7bit/8bit MIME part (RFC 3030 section 3), so such
    // messages are returned as headers only.
    let full = n.kind == DsnKind::Failure
        && n.envelope.ret == Some(DsnRet::Full)
        && n.envelope.body != BodyType::BinaryMime
        // RFC 8689 5: the notice need not travel with REQUIRETLS, so it returns no content.
        && !n.envelope.requiretls
        && original.len() > headers.len()
        && original.len() <= RETURN_FULL_LIMIT;
    let (content, description, ctype) = if full {
        let ctype = if n.utf8 { "message/global" } else { "message/rfc822" };
        (original, "Undelivered Message", ctype)
    } else {
        let ctype = if n.utf8 { "message/global-headers" } else { "text/rfc822-headers" };
        let description = match n.kind {
            DsnKind::Failure => "Undelivered Message Headers",
            DsnKind::Delay => "Delayed Message Headers",
        };
        (headers, description, ctype)
    };
    let mut h = String::new();
    field(&mut h, "Content-Description", description);
    field(&mut h, "Content-Type", ctype);
    // message/rfc822 allows only 7bit, 8bit or binary (RFC 2046 section 5.2.1); never encode.
    field(&mut h, "Content-Transfer-Encoding", if content.is_ascii() { "7bit" } else { "8bit" });
    h.push_str("\r\n");
    let mut bytes = h.into_bytes();
    bytes.extend_from_slice(content);
    // The CRLF before the next boundary belongs to the boundary (RFC 2046 section 5.1.1), so the
    // content keeps its own final CRLF and comes back out byte for byte.
    Returned { bytes, full }
}

/// The header section of a message: everything up to and including the CRLF before the first
/// empty line; all of it if there is no empty line (the caller passed headers only).
fn header_section(message: &[u8]) -> &[u8] {
    if message.starts_with(b"\r\n") {
        return &[];
    }
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => &message[..end + 2],
        None => message,
    }
}

/// The message with every line ending as CRLF: bare CR or LF would otherwise reach the next hop
/// (RFC 5321 section 2.3.8). The spool already stores CRLF, so this rarely changes anything.
fn crlf(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 2);
    let mut i = 0;
    while i < message.len() {
        match message[i] {
            b'\r' if message.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A MIME boundary that occurs in none of the parts (RFC 2046 section 5.1.1). The "=_" cannot
/// appear in quoted-printable or base64 text, and the random part makes a collision with raw
/// content vanishingly unlikely; the loop makes it impossible.
fn unique_boundary(parts: &[Vec<u8>]) -> String {
    loop {
        let boundary = format!("=_bartleby_{}", random_hex(12));
        if !parts.iter().any(|p| p.windows(boundary.len()).any(|w| w == boundary.as_bytes())) {
            return boundary;
        }
    }
}

/// `len` random bytes as hex, from the OS; falls back to fastrand if getrandom fails, since a
/// Message-ID or boundary needs uniqueness, not secrecy.
fn random_hex(len: usize) -> String {
    let mut buf = vec![0u8; len];
    if getrandom::fill(&mut buf).is_err() {
        buf.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    buf.iter().fold(String::with_capacity(len * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Makes untrusted text (remote replies, HELO names, addresses) safe for one header field: every
/// control character, CR and LF included, becomes a space so nothing can start a new field or
/// part; whitespace runs collapse; non-ASCII becomes `?` unless the notice is UTF-8; the length
/// is capped at [`MAX_VALUE`] characters.
fn clean(text: &str, utf8: bool) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_VALUE));
    let mut count = 0;
    for c in text.chars() {
        let c = match c {
            c if c.is_control() || c.is_whitespace() => ' ',
            c if !c.is_ascii() && !utf8 => '?',
            c => c,
        };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if count == MAX_VALUE {
            break;
        }
        out.push(c);
        count += 1;
    }
    out.truncate(out.trim_end().len());
    out
}

/// Appends `Name: value` CRLF, folded at spaces to about [`FOLD_WIDTH`] octets (RFC 5322
/// section 2.2.3). Values are already [`clean`]ed or constant, so no line exceeds 998 octets.
fn field(out: &mut String, name: &str, value: &str) {
    let mut line = format!("{name}:");
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        // Fold only after at least one word, so a long word never leaves an empty line behind.
        if line.len() + 1 + word.len() > FOLD_WIDTH && line.len() > name.len() + 1 {
            out.push_str(&line);
            out.push_str("\r\n");
            line.clear();
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push_str("\r\n");
}

/// Wraps a line of body text at spaces to about [`FOLD_WIDTH`] octets, indenting continuations.
fn wrap(text: &str, indent: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        if !line.trim().is_empty() && line.len() + 1 + word.len() > FOLD_WIDTH {
            out.push_str(&line);
            out.push_str("\r\n");
            line = indent.to_string();
        } else if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&line);
    out.push_str("\r\n");
    out
}

#[cfg(test)]
mod tests;

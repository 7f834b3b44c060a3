//! The HTML pages: server-rendered with maud (which escapes every interpolated string), no script,
//! readable on a phone. Actions are POST forms carrying the session's CSRF token; each answers
//! with a redirect (303) and the result is shown once on the next page.

use super::actions::{self, Action};
use super::queue::{self, QueueEntry, QueueFilter, QueuePage, Status};
use super::session::Session;
use super::{WebError, WebState, chart};
use crate::control::ShapeReport;
use crate::spool::{BodyType, Envelope, RecipientStatus, now_micros, rfc3339};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

/// Seconds between automatic reloads of the queue page (a meta refresh keeps the URL, filters
/// included).
const REFRESH_SECONDS: u32 = 30;

/// An error answered as a small HTML page with the error's status.
pub struct PageError(pub WebError);

impl From<WebError> for PageError {
    fn from(err: WebError) -> Self {
        PageError(err)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let body = html! {
            (DOCTYPE)
            html lang="en" {
                head { meta charset="utf-8"; title { "bartleby: " (status) } link rel="stylesheet" href="/static/style.css"; }
                body { main { h1 { (status) } p.error { (self.0.to_string()) } p { a href="/" { "Back to the queue" } } } }
            }
        };
        super::with_retry_after(&self.0, (status, Html(body.into_string())).into_response())
    }
}

/// The frame of every page.
pub fn layout(title: &str, session: &Session, refresh: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if refresh { meta http-equiv="refresh" content=(REFRESH_SECONDS); }
                title { "bartleby: " (title) }
                link rel="stylesheet" href="/static/style.css";
            }
            body {
                header {
                    a.brand href="/" { "bartleby" }
                    @if let Some(user) = &session.user {
                        form.inline method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(session.csrf);
                            span { (user) " " }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn csrf_field(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// "1.5 MiB".
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", units[unit]) }
}

/// "3d 4h", "2h 5m", "40s".
pub fn human_age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// "2026-11-29T13:14:06Z" -> "2026-11-29 13:14:06" (every time on the page is UTC, as it says).
fn short_time(rfc3339: &str) -> String {
    rfc3339.trim_end_matches('Z').replacen('T', " ", 1)
}

/// [`short_time`] that may break between the date and the time, and nowhere else.
fn time_markup(rfc3339: &str) -> Markup {
    let text = short_time(rfc3339);
    let (date, time) = text.split_once(' ').unwrap_or((&text, ""));
    html! { span.when { (date) } " " span.when { (time) } }
}

fn age_of(micros: i64) -> String {
    human_age(u64::try_from(now_micros().saturating_sub(micros) / 1_000_000).unwrap_or(0))
}

/// "1 message", "2 messages", "0 messages": a count and its noun, agreeing.
pub fn count(n: u64, noun: &str) -> String {
    format!("{n} {}", agreeing(n, noun))
}

/// The noun as it agrees with `n`: "message" for 1, "messages" otherwise.
fn agreeing(n: u64, noun: &str) -> String {
    if n == 1 { noun.to_string() } else { format!("{noun}s") }
}

/// How long until the next attempt, in words: "in 4m", or "due now" (`next` and `now` in
/// microseconds). A held message has no next attempt: the page says "held" instead.
fn until(next: i64, now: i64) -> String {
    match u64::try_from(next.saturating_sub(now) / 1_000_000) {
        Ok(secs) if secs > 0 => format!("in {}", human_age(secs)),
        _ => "due now".to_string(),
    }
}

/// The SMTP body type as the keyword a person knows (RFC 6152, RFC 3030), not the Rust name.
fn body_words(body: BodyType) -> &'static str {
    match body {
        BodyType::SevenBit => "7bit",
        BodyType::EightBitMime => "8bitmime",
        BodyType::BinaryMime => "binarymime",
    }
}

/// Percent-encodes a query component (RFC 3986 unreserved characters pass).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The URL of the queue page with this filter and page.
fn page_url(filter: &QueueFilter, page: usize) -> String {
    let mut parts = Vec::new();
    for (name, value) in [("domain", &filter.domain), ("sender", &filter.sender), ("recipient", &filter.recipient)] {
        if let Some(v) = value {
            parts.push(format!("{name}={}", encode(v)));
        }
    }
    if page > 1 {
        parts.push(format!("page={page}"));
    }
    if filter.per_page.is_some_and(|p| p != queue::DEFAULT_PER_PAGE) {
        parts.push(format!("per_page={}", filter.per_page.unwrap_or(queue::DEFAULT_PER_PAGE)));
    }
    if parts.is_empty() { "/".to_string() } else { format!("/?{}", parts.join("&")) }
}

/// GET /: status, chart, filters and the queue.
pub async fn index(
    State(state): State<WebState>,
    Extension(session): Extension<Session>,
    Query(filter): Query<QueueFilter>,
) -> Result<Response, PageError> {
    let page = queue::queue_page(&state, &filter).await?;
    let status = queue::status(&state);
    let shape = if status.messages == 0 {
        None
    } else {
        let spool = std::sync::Arc::clone(&state.spool);
        tokio::task::spawn_blocking(move || ShapeReport::of(spool.as_ref(), now_micros())).await.ok()
    };
    let flash = state.sessions.take_flash(&session.id);
    let samples = state.samples.snapshot();
    let back = page_url(&page.filter, page.page);
    // The summary, then the queue (what a person came for), then the history and the shape: a
    // chart that is mostly empty must not push the queue below the fold on a phone.
    let body = html! {
        @if let Some(text) = flash { p.flash role="status" { (text) } }
        (status_section(&status, &session, &back))
        (queue_section(&page))
        (chart_section(&samples, status.messages))
        @if let Some(shape) = &shape { (shape_section(shape)) }
    };
    Ok(Html(layout("queue", &session, true, body).into_string()).into_response())
}

/// The chart of the queue's size, folded away (a line on the page) while the queue is empty and was
/// empty in every sample of the window: open, it would be a flat line at zero.
fn chart_section(samples: &[chart::Sample], queued: usize) -> Markup {
    let now = now_micros();
    let window = i64::try_from(chart::WINDOW.as_micros()).unwrap_or(i64::MAX);
    let shown = samples.iter().filter(|s| s.at >= now - window);
    let peak = shown.map(|s| s.messages).max().unwrap_or(0);
    let anything = queued > 0 || peak > 0;
    html! {
        section.history {
            details.chart open[anything] {
                summary {
                    h2 { "Queue size, last 24 hours" }
                    @if peak > 0 { " " span.quiet { "peak " (count(peak, "message")) } }
                    @else if !anything {
                        " " span.quiet { @if samples.is_empty() { "no samples yet" } @else { "empty at every sample" } }
                    }
                }
                (chart::svg(samples, now))
            }
        }
    }
}

/// "**3** messages, 1.5 KiB, oldest 2h 5m old, 1 held."
fn totals(status: &Status) -> Markup {
    html! {
        p.totals {
            strong { (status.messages) } " " (agreeing(status.messages as u64, "message")) ", "
            (human_bytes(status.bytes))
            @if let Some(age) = status.oldest_age_seconds { ", oldest " (human_age(age)) " old" }
            @if status.held > 0 { ", " (status.held) " held" }
            "."
        }
    }
}

fn status_section(status: &Status, session: &Session, back: &str) -> Markup {
    html! {
        section.status {
            h1 { "Backup MX " span.host { (status.hostname) } }
            (totals(status))
            @if status.messages > 0 {
                form.inline method="post" action="/flush" {
                    (csrf_field(session))
                    input type="hidden" name="back" value=(back);
                    button.primary type="submit" name="flush" value="all" { "Flush all" }
                }
            }
            (disk_bar(status))
            table.domains.cards {
                thead { tr {
                    th.domain { "Domain" } th.primary { "Primary" } th.since { "Since" } th.error { "Last error" }
                    th.queued { "Queued" } th.flush {}
                } }
                tbody { @for d in &status.domains { (domain_row(d, session, back)) } }
            }
        }
    }
}

fn domain_row(d: &queue::DomainStatus, session: &Session, back: &str) -> Markup {
    let since = match d.primary {
        "failing" => d.failing_since.as_deref().map(|t| ("failing since", short_time(t))),
        "up" => d.last_success.as_deref().map(|t| ("last OK", short_time(t))),
        _ => None,
    };
    let queued = page_url(&QueueFilter { domain: Some(d.domain.clone()), ..Default::default() }, 1);
    html! {
        tr {
            td.domain { (d.domain) }
            td.primary {
                span class=(format!("badge {}", d.primary)) { (d.primary) }
                @if d.paused { " " span.badge.paused title="bartleby queue resume DOMAIN" { "paused" } }
            }
            td.since { @if let Some((what, when)) = since { (what) " " span.when { (when) } } }
            td.error { (d.last_error.clone().unwrap_or_default()) }
            td.num.queued { a href=(queued) { (d.queued) span.unit { " queued" } } }
            td.flush {
                @if d.queued > 0 {
                    form.inline method="post" action="/flush" {
                        (csrf_field(session))
                        input type="hidden" name="back" value=(back);
                        input type="hidden" name="domain" value=(d.domain);
                        // On a phone the card's title names the domain: the button says "Flush".
                        button type="submit" aria-label=(format!("Flush {}", d.domain)) { "Flush" span.what { " " (d.domain) } }
                    }
                }
            }
        }
    }
}

/// The queue's shape (like qshape): messages by domain and age, each cell coloured by its count
/// on a log scale (classes, not inline styles: the CSP forbids those).
fn shape_section(shape: &ShapeReport) -> Markup {
    let bounds = &shape.buckets_minutes;
    let label = |i: usize| match (bounds.get(i), bounds.get(i + 1)) {
        (Some(from), Some(to)) => format!("{from}\u{2013}{to} m"),
        (Some(from), None) => format!("{from}+ m"),
        _ => String::new(),
    };
    let cells = |counts: &[usize]| {
        html! {
            td.num { strong { (counts.iter().sum::<usize>()) } }
            @for n in counts { td class=(format!("num heat-{}", heat(*n))) { (n) } }
        }
    };
    html! {
        section {
            h2 { "Queue shape" }
            div.scroll {
                table.shape {
                    thead { tr { th { "Domain" } th { "Total" } @for i in 0..bounds.len() { th { (label(i)) } } } }
                    tbody {
                        tr.total { td { "TOTAL" } (cells(&shape.totals())) }
                        @for (domain, counts) in &shape.domains { tr { td { (domain) } (cells(counts)) } }
                    }
                }
            }
        }
    }
}

/// A count's colour level: 0 for none, then one level per power of ten (1-9, 10-99, ...), at most 4.
fn heat(count: usize) -> usize {
    match count {
        0 => 0,
        n => (n.ilog10() as usize + 1).min(4),
    }
}

/// The spool filesystem's space as an SVG bar (no inline style: the CSP forbids it).
fn disk_bar(status: &Status) -> Markup {
    let Some(disk) = &status.disk else { return html! { p.error { "Spool filesystem: unknown" } } };
    let used = (100.0 - disk.free_percent).clamp(0.0, 100.0);
    let colour = match disk.level {
        "critical" => "#c62828",
        "warn" => "#f9a825",
        _ => "#2e7d32",
    };
    html! {
        div.disk {
            span { "Spool disk: " (human_bytes(disk.free_bytes)) " free of " (human_bytes(disk.total_bytes))
                   " (" (format!("{:.1}", disk.free_percent)) " % free)" }
            svg.bar xmlns="http://www.w3.org/2000/svg" viewBox="0 0 100 6" preserveAspectRatio="none" role="img"
                aria-label=(format!("disk {used:.0} % used, {}", disk.level)) {
                rect x="0" y="0" width="100" height="6" fill="#e0e0e0" {}
                rect class=(format!("level-{}", disk.level)) x="0" y="0" width=(format!("{used:.2}")) height="6" fill=(colour) {}
            }
        }
    }
}

/// "3 messages", "2 of 3 messages match the filter", with the page when there are several.
fn queue_summary(page: &QueuePage) -> String {
    let f = &page.filter;
    let filtered = f.domain.is_some() || f.sender.is_some() || f.recipient.is_some();
    if page.total == 0 && !filtered {
        return "The queue is empty.".to_string();
    }
    let mut text = if filtered {
        let verb = if page.matched == 1 { "matches" } else { "match" };
        format!("{} of {} {verb} the filter", page.matched, count(page.total as u64, "message"))
    } else {
        count(page.total as u64, "message")
    };
    if page.pages > 1 {
        text.push_str(&format!("; page {} of {}", page.page, page.pages));
    }
    text.push_str(". Times are UTC.");
    text
}

fn queue_section(page: &QueuePage) -> Markup {
    let f = &page.filter;
    let now = now_micros();
    html! {
        section.queue id="queue" {
            h2 { "Queue" }
            form.filter method="get" action="/" {
                label { span { "Domain" } input type="text" name="domain" value=(f.domain.clone().unwrap_or_default()); }
                label { span { "Sender" } input type="text" name="sender" value=(f.sender.clone().unwrap_or_default()); }
                label { span { "Recipient" } input type="text" name="recipient" value=(f.recipient.clone().unwrap_or_default()); }
                button type="submit" { "Filter" }
                " " a href="/" { "Clear" }
            }
            p.summary { (queue_summary(page)) }
            @if !page.messages.is_empty() {
                div.scroll {
                    table.queue.cards {
                        thead { tr {
                            th.id { "ID" } th.arrived { "Arrived" } th.size { "Size" } th.sender { "Sender" }
                            th.rcpts { "Recipients" } th.subject { "Subject" } th.attempts { "Attempts" }
                            th.next { "Next attempt" } th.error { "Last error" }
                        } }
                        tbody { @for m in &page.messages { (queue_row(m, now)) } }
                    }
                }
            }
            (pagination(page))
        }
    }
}

/// One message: a table row on a wide screen, a card on a phone (style.css places each cell by its
/// class; a cell without one of those classes gets a line of its own in the card).
fn queue_row(m: &QueueEntry, now: i64) -> Markup {
    let l = &m.listed;
    html! {
        tr.held[l.held] {
            // A shared store (docs/cluster.md): the accepting node, and the node delivering it now.
            td.id {
                a href=(format!("/message/{}", l.id)) { (l.id) }
                @if let Some(node) = &l.accepted_by { br; small.node { "via " (node) } }
                @if let Some(node) = &l.leased_by { br; small.node { "sending: " (node) } }
            }
            td.time.arrived { span.full { (time_markup(&l.arrived)) } br; small.age { (age_of(m.arrived_micros)) " ago" } }
            td.num.size { (human_bytes(l.size)) }
            td.addr.sender data-label="From" { @if l.sender.is_empty() { "<>" } @else { (l.sender) } }
            td.addr.rcpts data-label="To" { @for (i, r) in l.recipients.iter().enumerate() { @if i > 0 { br; } (r) } }
            td.subject {
                @match &m.subject { Some(s) if !s.trim().is_empty() => { (s) }, _ => { span.quiet { "(no subject)" } } }
            }
            td.num.attempts { (l.attempts) span.unit { " " (agreeing(u64::from(l.attempts), "attempt")) } }
            @if l.held {
                td.time.next { span.badge.held title="not tried until released" { "held" } }
            } @else {
                td.time.next data-label="Next attempt" {
                    span.full { (time_markup(&l.next_attempt)) } br;
                    small.age { (until(m.next_attempt_micros, now)) }
                }
            }
            td.error { (l.last_error.clone().unwrap_or_default()) }
        }
    }
}

fn pagination(page: &QueuePage) -> Markup {
    html! {
        nav.pages {
            @if page.page > 1 { a rel="prev" href=(page_url(&page.filter, page.page - 1)) { "← previous page" } " " }
            @if page.page > 1 { a href=(page_url(&page.filter, 1)) { "first" } " " }
            @if page.page < page.pages { a rel="next" href=(page_url(&page.filter, page.page + 1)) { "next page →" } }
        }
    }
}

/// GET /message/{id}: envelope, recipients, history, headers, and the buttons.
pub async fn message(
    State(state): State<WebState>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let (envelope, headers, subject) = load(&state, &id).await?;
    let flash = state.sessions.take_flash(&session.id);
    let body = html! {
        @if let Some(text) = flash { p.flash role="status" { (text) } }
        h1 { "Message " span.id { (envelope.id) } @if envelope.held { " " span.badge.held { "held" } } }
        (message_actions(&envelope, &session))
        (envelope_table(&envelope, subject.as_deref()))
        h2 { (count(envelope.recipients.len() as u64, "recipient")) }
        table.recipients.cards { thead { tr { th { "Address" } th { "Status" } th { "Last error" } th { "Remote MTA" } } }
            tbody { @for r in &envelope.recipients { tr {
                td.addr { (r.address) }
                td.status { (match r.status { RecipientStatus::Pending => "pending", RecipientStatus::Delivered => "delivered", RecipientStatus::Failed => "failed" }) }
                td.error { (r.last_error.clone().unwrap_or_default()) }
                td.mta data-label="Remote MTA" { (r.remote_mta.clone().unwrap_or_default()) }
            } } } }
        h2 { "Delivery history" }
        ol.history { @for h in &envelope.history { li { span.when { (short_time(&rfc3339(h.at))) } " " (h.event) } } }
        h2 { "Headers" }
        pre.headers { (headers) }
        p { "Times are UTC. " a href="/" { "Back to the queue" } }
    };
    Ok(Html(layout(&envelope.id, &session, false, body).into_string()).into_response())
}

/// The envelope, the header section and the decoded Subject, read on a blocking thread.
async fn load(state: &WebState, id: &str) -> Result<(Envelope, String, Option<String>), WebError> {
    if !crate::spool::is_queue_id(id) {
        return Err(WebError::BadRequest(format!("{id:?} is not a queue ID")));
    }
    let spool = std::sync::Arc::clone(&state.spool);
    let id = id.to_string();
    tokio::task::spawn_blocking(move || {
        let envelope = spool.get(&id).ok_or_else(|| WebError::NotFound(format!("no message {id} in the queue")))?;
        let headers = spool.read_headers(&id, 256 * 1024).map_err(|e| WebError::Internal(e.to_string()))?;
        let subject = queue::subject(spool.as_ref(), &id);
        Ok((envelope, String::from_utf8_lossy(&headers).replace("\r\n", "\n"), subject))
    })
    .await
    .map_err(|e| WebError::Internal(e.to_string()))?
}

fn message_actions(e: &Envelope, session: &Session) -> Markup {
    let url = |action: &str| format!("/message/{}/{action}", e.id);
    html! {
        div.actions {
            form.inline method="post" action=(url("retry")) { (csrf_field(session)) button type="submit" { "Retry now" } }
            @if e.held {
                form.inline method="post" action=(url("release")) { (csrf_field(session)) button type="submit" { "Release" } }
            } @else {
                form.inline method="post" action=(url("hold")) { (csrf_field(session)) button type="submit" { "Hold" } }
            }
            a.button.danger href=(url("delete")) { "Delete…" }
        }
    }
}

fn envelope_table(e: &Envelope, subject: Option<&str>) -> Markup {
    let sender = if e.sender.is_empty() { "<>".to_string() } else { format!("<{}>", e.sender) };
    let client = e.client_ip.map(|ip| ip.to_string()).unwrap_or_else(|| "local (generated by bartleby)".into());
    html! {
        table.envelope { tbody {
            tr { th { "Subject" } td.subject { (subject.unwrap_or("")) } }
            tr { th { "Sender" } td.addr { (sender) } }
            tr { th { "Arrived" } td { (time_markup(&rfc3339(e.arrived))) " (" (age_of(e.arrived)) " ago)" } }
            tr { th { "From" } td { (e.helo) " [" (client) "]" } }
            tr { th { "Size" } td { (human_bytes(e.size)) " (" (e.size) " bytes)" } }
            // A shared store (docs/cluster.md): which node took the message, and which is delivering it.
            @if let Some(node) = &e.accepted_by { tr { th { "Accepted by" } td { "node " (node) } } }
            @if let Some(node) = &e.leased_by { tr { th { "Being delivered by" } td { "node " (node) } } }
            tr { th { "Attempts" } td { (e.attempts) } }
            tr { th { "Next attempt" } td.next {
                @if e.held { span.badge.held { "held" } " not tried until released" }
                @else { (time_markup(&rfc3339(e.next_attempt))) " (" (until(e.next_attempt, now_micros())) ")" }
            } }
            tr { th { "Body" } td { (body_words(e.body)) @if e.smtputf8 { ", SMTPUTF8" } @if e.requiretls { ", REQUIRETLS" } } }
            @if let Some(envid) = &e.envid { tr { th { "ENVID" } td { (envid) } } }
        } }
    }
}

/// GET /message/{id}/delete: the confirmation step.
pub async fn confirm_delete(
    State(state): State<WebState>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let (envelope, _, _) = load(&state, &id).await?;
    let body = html! {
        h1 { "Delete message " (envelope.id) "?" }
        p { "From " span.addr { (envelope.sender) } " to "
            @for r in envelope.pending() { span.addr { (r.address) } " " }
            ". It will be removed from the queue without a bounce to the sender." }
        form method="post" action=(format!("/message/{}/delete", envelope.id)) {
            (csrf_field(&session))
            input type="hidden" name="confirm" value="yes";
            button.danger type="submit" { "Delete" }
            " " a href=(format!("/message/{}", envelope.id)) { "Cancel" }
        }
    };
    Ok(Html(layout("delete", &session, false, body).into_string()).into_response())
}

/// The fields a delete form sends (besides the CSRF token).
#[derive(Debug, Deserialize)]
pub struct ConfirmForm {
    #[serde(default)]
    pub confirm: Option<String>,
}

/// POST /message/{id}/delete with `confirm=yes`.
pub async fn delete(
    State(state): State<WebState>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    Form(form): Form<ConfirmForm>,
) -> Result<Response, PageError> {
    if form.confirm.as_deref() != Some("yes") {
        return Ok(Redirect::to(&format!("/message/{}/delete", encode(&id))).into_response());
    }
    let done = actions::perform(&state, Action::for_message("delete", id)?, &session).await?;
    state.sessions.set_flash(&session.id, done);
    Ok(Redirect::to("/").into_response())
}

/// POST /message/{id}/{retry|hold|release}.
pub async fn act(
    State(state): State<WebState>,
    Extension(session): Extension<Session>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, PageError> {
    if name == "delete" {
        return Err(WebError::BadRequest("delete needs the confirmation form".into()).into());
    }
    let action = Action::for_message(&name, id.clone())?;
    let done = actions::perform(&state, action, &session).await?;
    state.sessions.set_flash(&session.id, done);
    Ok(Redirect::to(&format!("/message/{id}")).into_response())
}

/// The flush form's fields (besides the CSRF token).
#[derive(Debug, Deserialize)]
pub struct FlushForm {
    #[serde(default)]
    pub domain: Option<String>,
    /// The queue page to return to (path and query of this site only).
    #[serde(default)]
    pub back: Option<String>,
}

/// POST /flush: everything, or one domain; 429 inside the cooldown.
pub async fn flush(
    State(state): State<WebState>,
    Extension(session): Extension<Session>,
    Form(form): Form<FlushForm>,
) -> Result<Response, PageError> {
    let done = actions::perform(&state, Action::Flush(form.domain), &session).await?;
    state.sessions.set_flash(&session.id, done);
    // Only a local path: never an open redirect to another site.
    let back = form.back.filter(|b| b.starts_with('/') && !b.starts_with("//") && !b.contains('\\'));
    Ok(Redirect::to(back.as_deref().unwrap_or("/")).into_response())
}

/// GET /chart.svg: the chart alone, for embedding elsewhere.
pub async fn chart_svg(State(state): State<WebState>) -> Response {
    let svg = chart::svg(&state.samples.snapshot(), now_micros()).into_string();
    ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response()
}

/// GET /static/style.css.
pub async fn style() -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("style.css")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_is_one_level_per_power_of_ten() {
        let levels: Vec<usize> = [0, 1, 9, 10, 99, 100, 1000, 1_000_000].into_iter().map(heat).collect();
        assert_eq!(levels, [0, 1, 1, 2, 2, 3, 4, 4]);
    }

    #[test]
    fn sizes_and_ages() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_age(59), "59s");
        assert_eq!(human_age(3 * 3600 + 120), "3h 2m");
        assert_eq!(human_age(2 * 86_400 + 3600), "2d 1h");
    }

    fn entry(held: bool, now: i64) -> QueueEntry {
        let mut envelope = Envelope::new(
            "661A7D42870F000".into(),
            "alice@remote.test".into(),
            vec![crate::spool::Recipient::new("bob@example.test".into())],
        );
        envelope.held = held;
        envelope.attempts = 1;
        envelope.next_attempt = now + 240 * 1_000_000;
        QueueEntry {
            listed: crate::control::ListedMessage::from(&envelope),
            arrived_micros: envelope.arrived,
            next_attempt_micros: envelope.next_attempt,
            domains: vec!["example.test".into()],
            subject: Some("Hello".into()),
        }
    }

    #[test]
    fn a_held_message_shows_held_instead_of_a_next_attempt() {
        let now = now_micros();
        let held = queue_row(&entry(true, now), now).into_string();
        let next = held.split("class=\"time next\"").nth(1).expect("the next attempt cell");
        let next = &next[..next.find("</td>").expect("cell end")];
        assert!(next.contains(">held<") && !next.contains("20") && !next.contains(" in "), "{held}");
        assert!(held.starts_with("<tr class=\"held\""), "{held}");

        let waiting = queue_row(&entry(false, now), now).into_string();
        let next = waiting.split("class=\"time next\"").nth(1).expect("the next attempt cell");
        assert!(!next.contains("held") && next.contains("in 4m"), "{waiting}");
        assert!(waiting.contains(">1<span class=\"unit\"> attempt</span>"), "{waiting}");

        let mut envelope = Envelope::new("661A7D42870F000".into(), "a@remote.test".into(), Vec::new());
        envelope.held = true;
        let next_cell = |e: &Envelope| {
            let table = envelope_table(e, None).into_string();
            let cell = table.split("<td class=\"next\">").nth(1).expect("the next attempt row").to_string();
            cell[..cell.find("</td>").expect("cell end")].to_string()
        };
        let held = next_cell(&envelope);
        assert!(held.contains(">held<") && held.contains("not tried until released") && !held.contains("20"), "{held}");
        envelope.held = false;
        let waiting = next_cell(&envelope);
        assert!(!waiting.contains("held") && waiting.contains("20") && waiting.contains("(due now)"), "{waiting}");
    }

    #[test]
    fn until_the_next_attempt_in_words() {
        assert_eq!(until(300 * 1_000_000, 0), "in 5m");
        assert_eq!(until(0, 0), "due now");
        assert_eq!(until(0, 10 * 1_000_000), "due now");
    }

    #[test]
    fn body_types_read_as_words() {
        assert_eq!(body_words(BodyType::SevenBit), "7bit");
        assert_eq!(body_words(BodyType::EightBitMime), "8bitmime");
        assert_eq!(body_words(BodyType::BinaryMime), "binarymime");
        let mut envelope = Envelope::new("661A7D42870F000".into(), "a@remote.test".into(), Vec::new());
        envelope.body = BodyType::EightBitMime;
        envelope.smtputf8 = true;
        let table = envelope_table(&envelope, None).into_string();
        assert!(table.contains("<td>8bitmime, SMTPUTF8</td>"), "{table}");
        assert!(!table.contains("EightBit"), "{table}");
    }

    #[test]
    fn plurals_agree() {
        assert_eq!(count(0, "message"), "0 messages");
        assert_eq!(count(1, "message"), "1 message");
        assert_eq!(count(2, "recipient"), "2 recipients");
        let page = |total: usize, matched: usize, pages: usize, domain: Option<&str>| QueuePage {
            total,
            matched,
            page: 1,
            per_page: 50,
            pages,
            filter: QueueFilter { domain: domain.map(Into::into), ..Default::default() },
            messages: Vec::new(),
        };
        assert_eq!(queue_summary(&page(1, 1, 1, None)), "1 message. Times are UTC.");
        assert_eq!(queue_summary(&page(2, 2, 1, None)), "2 messages. Times are UTC.");
        assert_eq!(queue_summary(&page(0, 0, 1, None)), "The queue is empty.");
        assert_eq!(queue_summary(&page(3, 1, 1, Some("a.test"))), "1 of 3 messages matches the filter. Times are UTC.");
        assert_eq!(
            queue_summary(&page(120, 60, 2, Some("a.test"))),
            "60 of 120 messages match the filter; page 1 of 2. Times are UTC."
        );
        let status = |messages: usize, held: usize| Status {
            hostname: "mx.test".into(),
            messages,
            bytes: 100,
            held,
            oldest_arrived: None,
            oldest_age_seconds: None,
            domains: Vec::new(),
            disk: None,
            counters: Default::default(),
            open_smtp_sessions: 0,
        };
        assert!(totals(&status(1, 1)).into_string().contains("<strong>1</strong> message, 100 B, 1 held."));
        assert!(totals(&status(2, 0)).into_string().contains("<strong>2</strong> messages, 100 B."));
        let now = now_micros();
        let one = [chart::Sample { at: now, messages: 1, bytes: 0 }];
        let chart = chart_section(&one, 1).into_string();
        assert!(chart.contains("peak 1 message<") && chart.contains("<details class=\"chart\" open"), "{chart}");
    }

    #[test]
    fn an_empty_chart_is_folded_away() {
        let now = now_micros();
        let zero = [chart::Sample { at: now, messages: 0, bytes: 0 }];
        let folded = chart_section(&zero, 0).into_string();
        assert!(folded.contains("<details class=\"chart\">") && folded.contains("empty at every sample"), "{folded}");
        assert!(chart_section(&[], 0).into_string().contains("no samples yet"));
        assert!(chart_section(&zero, 3).into_string().contains(" open"), "open while mail is queued");
    }

    #[test]
    fn page_urls_keep_the_filter() {
        let filter =
            QueueFilter { domain: Some("example.test".into()), sender: Some("a b&c".into()), ..Default::default() };
        assert_eq!(page_url(&filter, 2), "/?domain=example.test&sender=a%20b%26c&page=2");
        assert_eq!(page_url(&QueueFilter::default(), 1), "/");
    }
}

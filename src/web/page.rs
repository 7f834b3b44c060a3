//! The HTML pages: server-rendered with maud (which escapes every interpolated string), no script,
//! readable on a phone. Actions are POST forms carrying the session's CSRF token; each answers
//! with a redirect (303) and the result is shown once on the next page.

use super::actions::{self, Action};
use super::queue::{self, QueueEntry, QueueFilter, QueuePage, Status};
use super::session::Session;
use super::{WebError, WebState, chart};
use crate::control::ShapeReport;
use crate::spool::{Envelope, RecipientStatus, now_micros, rfc3339};
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

fn age_of(micros: i64) -> String {
    human_age(u64::try_from(now_micros().saturating_sub(micros) / 1_000_000).unwrap_or(0))
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
    let chart = chart::svg(&state.samples.snapshot(), now_micros());
    let back = page_url(&page.filter, page.page);
    let body = html! {
        @if let Some(text) = flash { p.flash role="status" { (text) } }
        (status_section(&status, &session, &back))
        @if let Some(shape) = &shape { (shape_section(shape)) }
        section { h2 { "Queue size, last 24 hours" } (chart) }
        (queue_section(&page))
    };
    Ok(Html(layout("queue", &session, true, body).into_string()).into_response())
}

fn status_section(status: &Status, session: &Session, back: &str) -> Markup {
    html! {
        section.status {
            h1 { "Backup MX " (status.hostname) }
            p.totals {
                strong { (status.messages) } " messages, " (human_bytes(status.bytes))
                @if let Some(age) = status.oldest_age_seconds { ", oldest " (human_age(age)) " old" }
                @if status.held > 0 { ", " (status.held) " held" }
                "."
            }
            @if status.messages > 0 {
                form.inline method="post" action="/flush" {
                    (csrf_field(session))
                    input type="hidden" name="back" value=(back);
                    button.primary type="submit" name="flush" value="all" { "Flush all" }
                }
            }
            (disk_bar(status))
            table.domains {
                thead { tr { th { "Domain" } th { "Primary" } th { "Since" } th { "Last error" } th { "Queued" } th {} } }
                tbody { @for d in &status.domains { (domain_row(d, session, back)) } }
            }
        }
    }
}

fn domain_row(d: &queue::DomainStatus, session: &Session, back: &str) -> Markup {
    let since = match d.primary {
        "failing" => d.failing_since.clone().map(|t| format!("failing since {t}")),
        "up" => d.last_success.clone().map(|t| format!("last OK {t}")),
        _ => None,
    };
    html! {
        tr {
            td { (d.domain) }
            td {
                span class=(format!("badge {}", d.primary)) { (d.primary) }
                @if d.paused { " " span.badge.paused title="bartleby queue resume DOMAIN" { "paused" } }
            }
            td { (since.unwrap_or_default()) }
            td.error { (d.last_error.clone().unwrap_or_default()) }
            td.num { a href=(page_url(&QueueFilter { domain: Some(d.domain.clone()), ..Default::default() }, 1)) { (d.queued) } }
            td {
                @if d.queued > 0 {
                    form.inline method="post" action="/flush" {
                        (csrf_field(session))
                        input type="hidden" name="back" value=(back);
                        input type="hidden" name="domain" value=(d.domain);
                        button type="submit" { "Flush " (d.domain) }
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

fn queue_section(page: &QueuePage) -> Markup {
    let f = &page.filter;
    html! {
        section {
            h2 { "Queue" }
            form.filter method="get" action="/" {
                label { "Domain " input type="text" name="domain" value=(f.domain.clone().unwrap_or_default()); }
                label { "Sender " input type="text" name="sender" value=(f.sender.clone().unwrap_or_default()); }
                label { "Recipient " input type="text" name="recipient" value=(f.recipient.clone().unwrap_or_default()); }
                button type="submit" { "Filter" }
                " " a href="/" { "Clear" }
            }
            p { (page.matched) " of " (page.total) " messages; page " (page.page) " of " (page.pages) ". Times are UTC." }
            div.scroll {
                table.queue {
                    thead { tr {
                        th { "ID" } th { "Arrived" } th { "Size" } th { "Sender" } th { "Recipients" } th { "Subject" }
                        th { "Attempts" } th { "Next attempt" } th { "Last error" } th { "Held" }
                    } }
                    tbody { @for m in &page.messages { (queue_row(m)) } }
                }
            }
            (pagination(page))
        }
    }
}

fn queue_row(m: &QueueEntry) -> Markup {
    let l = &m.listed;
    html! {
        tr.held[l.held] {
            td.id { a href=(format!("/message/{}", l.id)) { (l.id) } }
            td.time { (short_time(&l.arrived)) br; small { (age_of(m.arrived_micros)) " ago" } }
            td.num { (human_bytes(l.size)) }
            td.addr { @if l.sender.is_empty() { "<>" } @else { (l.sender) } }
            td.addr { @for r in &l.recipients { (r) br; } }
            td { (m.subject.clone().unwrap_or_default()) }
            td.num { (l.attempts) }
            td.time { (short_time(&l.next_attempt)) }
            td.error { (l.last_error.clone().unwrap_or_default()) }
            td { @if l.held { "held" } }
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
        h1 { "Message " (envelope.id) @if envelope.held { " (held)" } }
        (message_actions(&envelope, &session))
        (envelope_table(&envelope, subject.as_deref()))
        h2 { "Recipients" }
        table { thead { tr { th { "Address" } th { "Status" } th { "Last error" } th { "Remote MTA" } } }
            tbody { @for r in &envelope.recipients { tr {
                td.addr { (r.address) }
                td { (match r.status { RecipientStatus::Pending => "pending", RecipientStatus::Delivered => "delivered", RecipientStatus::Failed => "failed" }) }
                td.error { (r.last_error.clone().unwrap_or_default()) }
                td { (r.remote_mta.clone().unwrap_or_default()) }
            } } } }
        h2 { "Delivery history" }
        ol.history { @for h in &envelope.history { li { (rfc3339(h.at)) " " (h.event) } } }
        h2 { "Headers" }
        pre.headers { (headers) }
        p { a href="/" { "Back to the queue" } }
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
            tr { th { "Subject" } td { (subject.unwrap_or("")) } }
            tr { th { "Sender" } td.addr { (sender) } }
            tr { th { "Arrived" } td { (rfc3339(e.arrived)) " (" (age_of(e.arrived)) " ago)" } }
            tr { th { "From" } td { (e.helo) " [" (client) "]" } }
            tr { th { "Size" } td { (human_bytes(e.size)) " (" (e.size) " bytes)" } }
            // A shared store (docs/cluster.md): which node took the message, and which is delivering it.
            @if let Some(node) = &e.accepted_by { tr { th { "Accepted by" } td { "node " (node) } } }
            @if let Some(node) = &e.leased_by { tr { th { "Being delivered by" } td { "node " (node) } } }
            tr { th { "Attempts" } td { (e.attempts) } }
            tr { th { "Next attempt" } td { (rfc3339(e.next_attempt)) } }
            tr { th { "Body" } td { (format!("{:?}", e.body)) @if e.smtputf8 { ", SMTPUTF8" } @if e.requiretls { ", REQUIRETLS" } } }
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

    #[test]
    fn page_urls_keep_the_filter() {
        let filter =
            QueueFilter { domain: Some("example.test".into()), sender: Some("a b&c".into()), ..Default::default() };
        assert_eq!(page_url(&filter, 2), "/?domain=example.test&sender=a%20b%26c&page=2");
        assert_eq!(page_url(&QueueFilter::default(), 1), "/");
    }
}

//! Sessions, login and CSRF protection.
//!
//! Every client gets a server-side session on its first request: a random ID in a cookie
//! (HttpOnly, SameSite=Strict, Secure under TLS) and a random CSRF token that every POST must carry,
//! in the form field `csrf` or the `X-CSRF-Token` header, compared in constant time. A POST must
//! also come from our own origin (`Origin` and `Sec-Fetch-Site`, when the browser sends them).
//! With `[web] users`, a session must log in (argon2 password hashes) before anything but the
//! login form, `/healthz`, `/metrics`, the stylesheet and `/api/openapi.json` is served; the session ID is replaced on
//! login so a planted ID is worthless. Without accounts the page is locked (403 for all but
//! `/healthz`, `/metrics`, the stylesheet and `/api/openapi.json`) unless `[web] trust_allowed_hosts` says every peer in
//! `[web] allow` may use it: on a shared machine, loopback is every local user.

pub use super::session::{Session, Sessions};
use super::{WebError, WebState};
use crate::config::{Config, WebConfig};
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::body::{Body, to_bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::html;
use std::net::SocketAddr;

/// The session cookie's name.
pub const COOKIE: &str = "bartleby_session";
/// Largest POST body read (forms and JSON requests are tiny).
const MAX_POST: usize = 64 * 1024;
/// The answer (403) while the page is locked, and the warning logged at start.
pub const LOCKED: &str = "the admin page is locked: no account is configured. Add one to web.users \
    (make the hash with `bartleby hash-password`), or set web.trust_allowed_hosts = true to let every \
    peer in web.allow in without a login";

/// Is the page locked: no accounts, and the operator did not say the allowed peers are trusted?
pub fn locked(web: &WebConfig) -> bool {
    web.users.is_empty() && !web.trust_allowed_hosts
}

/// Compares without an early exit, so the time taken does not tell how much of a token was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A PHC-format argon2id hash of `password` with a random salt, for `[web] users`.
pub fn hash_password(password: &str) -> Result<String, WebError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| WebError::Internal(format!("no randomness: {e}")))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| WebError::Internal(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| WebError::Internal(e.to_string()))
}

/// Checks `password` against a PHC hash from the configuration.
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

fn set_cookie(state: &WebState, session: &Session) -> Option<HeaderValue> {
    let secure = if state.tls() { "; Secure" } else { "" };
    HeaderValue::from_str(&format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{secure}", session.id)).ok()
}

/// Paths served without a login even when accounts are configured.
fn open_path(path: &str) -> bool {
    path == "/login" || sessionless(path)
}

/// Read-only paths that need no session at all (the allowlist still applies). The OpenAPI
/// document is the same in every bartleby of a version and says nothing about the queue.
fn sessionless(path: &str) -> bool {
    matches!(path, "/healthz" | "/metrics" | "/static/style.css" | "/api/openapi.json")
}

/// Finds or creates the session, enforces login and, for POST, the origin and CSRF checks; the
/// session is handed to handlers as an `Extension<Session>`.
pub async fn session_layer(State(state): State<WebState>, request: Request, next: Next) -> Response {
    // Monitors and scrapers poll these every few seconds and never act: no session for them. Any
    // method: they have only GET handlers, so anything else is a 405 that changes nothing (and a
    // 405, not a 401, is what a client of an open path should get for a wrong method).
    if sessionless(request.uri().path()) {
        return next.run(request).await;
    }
    // Locked: no session, no CSRF token, no data (logged once at start, not per request).
    if locked(&state.config().web) {
        return WebError::Forbidden(LOCKED.into()).answer(request.uri().path());
    }
    let client = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let known = cookie_value(request.headers()).and_then(|id| state.sessions.get(&id));
    let (mut session, fresh) = match known {
        Some(s) => (s, false),
        None => match state.sessions.create(None) {
            Ok(s) => (s, true),
            Err(err) => return err.answer(request.uri().path()),
        },
    };
    session.client = client;
    let path = request.uri().path().to_string();
    let mut response = match check(&state, &session, request).await {
        Ok(mut request) => {
            request.extensions_mut().insert(session.clone());
            next.run(request).await
        }
        Err(err) if matches!(err, WebError::Unauthorized) && !super::is_api(&path) => {
            Redirect::to("/login").into_response()
        }
        Err(err) => err.answer(&path),
    };
    if fresh && let Some(cookie) = set_cookie(&state, &session) {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

/// Login and, for POST, origin and CSRF; returns the request rebuilt around its buffered body.
async fn check(state: &WebState, session: &Session, request: Request) -> Result<Request, WebError> {
    let path = request.uri().path();
    let config = state.config();
    if !config.web.users.is_empty() && session.user.is_none() && !open_path(path) {
        return Err(WebError::Unauthorized);
    }
    if request.method() != Method::POST {
        return Ok(request);
    }
    same_origin(request.headers(), &config)?;
    let (parts, body) = request.into_parts();
    let bytes = to_bytes(body, MAX_POST).await.map_err(|_| WebError::BadRequest("request body too large".into()))?;
    let from_header = parts.headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).map(str::to_string);
    let token = from_header.or_else(|| form_urlencoded_field(&bytes, "csrf"));
    match token {
        Some(token) if constant_time_eq(token.as_bytes(), session.csrf.as_bytes()) => {
            Ok(Request::from_parts(parts, Body::from(bytes)))
        }
        Some(_) => Err(WebError::Forbidden("wrong CSRF token (reload the page)".into())),
        None => Err(WebError::Forbidden("missing CSRF token".into())),
    }
}

/// The value of `name` in an `application/x-www-form-urlencoded` body (the WHATWG URL standard's
/// parser: `&`-separated pairs, `+` for space, percent escapes).
fn form_urlencoded_field(body: &[u8], name: &str) -> Option<String> {
    body.split(|&b| b == b'&').find_map(|pair| {
        let (key, value) = pair.split_at(pair.iter().position(|&b| b == b'=').unwrap_or(pair.len()));
        (percent_decode(key) == name).then(|| percent_decode(value.strip_prefix(b"=").unwrap_or(value)))
    })
}

fn percent_decode(input: &[u8]) -> String {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let hex = |at: usize| input.get(at).and_then(|&b| (b as char).to_digit(16));
        match input[i] {
            b'+' => out.push(b' '),
            b'%' if hex(i + 1).is_some() && hex(i + 2).is_some() => {
                out.push((hex(i + 1).unwrap_or(0) * 16 + hex(i + 2).unwrap_or(0)) as u8);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Refuses cross-site POSTs: `Sec-Fetch-Site` must say same-origin (or none, typed by the user),
/// and an `Origin` must name the host the request was sent to, and that host must be one of ours
/// (the Host check has passed already; this keeps the two from drifting apart).
fn same_origin(headers: &HeaderMap, config: &Config) -> Result<(), WebError> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("?"));
    if let Some(site) = text("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Err(WebError::Forbidden(format!("cross-site request (Sec-Fetch-Site: {site})")));
    }
    if let Some(origin) = text("origin") {
        let host = text("host").unwrap_or_default();
        let authority = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
        if authority.is_none_or(|a| !a.eq_ignore_ascii_case(host)) {
            return Err(WebError::Forbidden(format!("request from another origin ({origin})")));
        }
        let ours = authority.and_then(super::host::host_part).is_some_and(|h| super::host::is_ours(config, &h));
        if !ours {
            return Err(WebError::Forbidden(format!("request from an origin not in web.hostnames ({origin})")));
        }
    }
    Ok(())
}

/// GET /login: the form.
pub async fn login_form(State(state): State<WebState>, Extension(session): Extension<Session>) -> Response {
    let flash = state.sessions.take_flash(&session.id);
    let body = html! {
        h1 { "bartleby: log in" }
        @if let Some(text) = flash { p.flash { (text) } }
        form method="post" action="/login" {
            input type="hidden" name="csrf" value=(session.csrf);
            label { "User " input type="text" name="user" autocomplete="username" required; }
            label { "Password " input type="password" name="password" autocomplete="current-password" required; }
            button type="submit" { "Log in" }
        }
    };
    Html(super::page::layout("Log in", &session, false, body).into_string()).into_response()
}

/// The login form's fields.
#[derive(Debug, serde::Deserialize)]
pub struct LoginForm {
    pub user: String,
    pub password: String,
}

/// POST /login: checks the password (on a blocking thread: argon2 is slow on purpose) and replaces
/// the session by a logged-in one.
pub async fn login(
    State(state): State<WebState>,
    Extension(session): Extension<Session>,
    Form(form): Form<LoginForm>,
) -> Response {
    let hash = state.config().web.users.get(&form.user).cloned();
    let password = form.password;
    let ok = tokio::task::spawn_blocking(move || hash.is_some_and(|h| verify_password(&h, &password)))
        .await
        .unwrap_or(false);
    if !ok {
        tracing::warn!(user = %form.user, client = %session.client_text(), "web login failed");
        state.sessions.set_flash(&session.id, "Wrong user name or password.".into());
        return Redirect::to("/login").into_response();
    }
    tracing::info!(user = %form.user, client = %session.client_text(), "web login");
    state.sessions.remove(&session.id);
    let fresh = match state.sessions.create(Some(form.user)) {
        Ok(s) => s,
        Err(err) => return err.plain(),
    };
    let mut response = Redirect::to("/").into_response();
    if let Some(cookie) = set_cookie(&state, &fresh) {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

/// POST /logout.
pub async fn logout(State(state): State<WebState>, Extension(session): Extension<Session>) -> Response {
    if session.user.is_some() {
        tracing::info!(user = session.who(), client = %session.client_text(), "web logout");
    }
    state.sessions.remove(&session.id);
    Redirect::to(if state.config().web.users.is_empty() { "/" } else { "/login" }).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hash_round_trip() {
        let hash = hash_password("correct horse").expect("hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "wrong"));
        assert!(!verify_password("not a hash", "correct horse"));
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn origin_checks() {
        let config = Config::demo();
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("127.0.0.1:8025"));
        assert!(same_origin(&headers, &config).is_ok());
        headers.insert("origin", HeaderValue::from_static("http://127.0.0.1:8025"));
        assert!(same_origin(&headers, &config).is_ok());
        headers.insert("origin", HeaderValue::from_static("http://evil.test"));
        assert!(same_origin(&headers, &config).is_err());
        // Host and Origin agree, as under DNS rebinding, but the name is not ours.
        headers.insert("host", HeaderValue::from_static("rebind.attacker.test:8025"));
        headers.insert("origin", HeaderValue::from_static("http://rebind.attacker.test:8025"));
        assert!(same_origin(&headers, &config).is_err());
        headers.remove("origin");
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&headers, &config).is_err());
    }

    #[test]
    fn form_field() {
        assert_eq!(form_urlencoded_field(b"a=1&csrf=ab%20c", "csrf").as_deref(), Some("ab c"));
        assert_eq!(form_urlencoded_field(b"a=1", "csrf"), None);
    }
}

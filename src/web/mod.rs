//! The admin page, the JSON API, `/metrics` and `/healthz` (axum, server-rendered HTML with maud).
//!
//! Every request passes, outermost first: security headers (CSP without inline script,
//! `frame-ancestors 'none'`, nosniff, no referrer), the `[web] allow` CIDR list on the peer address
//! (403 and a log line), the Host check against DNS rebinding (421 and a log line, see [`host`]),
//! the session layer (a cookie; a login when `[web] users` is set; 403 for everything but
//! `/healthz`, `/metrics`, the stylesheet and `/api/openapi.json` when there are no accounts and
//! `[web] trust_allowed_hosts` is not set), and for a POST the origin checks and the CSRF token.
//! Nothing changes on a GET.
//!
//! - [`page`]: the HTML pages; [`api`]: the same data and actions as JSON under `/api/`;
//! - [`openapi`]: the API's OpenAPI description, served at `/api/openapi.json`;
//! - [`queue`]: filtering and paginating the queue, the status summary (shared by both);
//! - [`actions`]: flush, retry, hold, release and delete through the scheduler, with the flush cooldown;
//! - [`auth`]: sessions, login, CSRF, argon2 passwords; [`chart`]: queue-size samples and the SVG chart;
//! - [`host`]: the names the page answers to (the Host and Origin checks);
//! - [`tls`]: HTTPS when `[web] tls_cert` and `tls_key` are set.

pub mod actions;
pub mod api;
pub mod auth;
pub mod chart;
pub mod host;
pub mod openapi;
pub mod page;
pub mod queue;
pub mod session;
pub mod tls;

use crate::config::{Config, WebConfig, cidr_list_contains};
use crate::metrics::Metrics;
use crate::schedule::SchedulerHandle;
use crate::spool::Queue;
use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What went wrong serving a request; each variant is one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("log in first")]
    Unauthorized,
    /// The request named a host that is not ours (DNS rebinding, or a name missing from
    /// `[web] hostnames`).
    #[error("this server does not answer for {0:?}; add it to web.hostnames if it is ours")]
    Misdirected(String),
    #[error("{0}")]
    NotFound(String),
    /// A path the API serves, with a method it does not take there.
    #[error("method not allowed on this path (the Allow header lists those that are)")]
    MethodNotAllowed,
    #[error("{0}")]
    BadRequest(String),
    #[error("a flush was done {elapsed}s ago; wait {retry_after}s before the next one")]
    TooManyRequests { elapsed: u64, retry_after: u64 },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    #[error("web listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

impl WebError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            WebError::Forbidden(_) => StatusCode::FORBIDDEN,
            WebError::Unauthorized => StatusCode::UNAUTHORIZED,
            WebError::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            WebError::NotFound(_) => StatusCode::NOT_FOUND,
            WebError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            WebError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            WebError::Conflict(_) => StatusCode::CONFLICT,
            WebError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            WebError::Internal(_) | WebError::Io(_) | WebError::Tls(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds to put in Retry-After, for 429.
    fn retry_after(&self) -> Option<u64> {
        match self {
            WebError::TooManyRequests { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// A plain-text answer, for errors raised before a page handler runs.
    fn plain(&self) -> Response {
        with_retry_after(self, (self.status(), format!("{self}\n")).into_response())
    }

    /// The answer for a request to `path` refused before its handler ran: JSON under `/api`, so
    /// that every answer of the API has the same shape, plain text elsewhere.
    fn answer(&self, path: &str) -> Response {
        if is_api(path) { api::error_response(self) } else { self.plain() }
    }
}

/// Is `path` the JSON API's?
pub fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

fn with_retry_after(err: &WebError, mut response: Response) -> Response {
    if let Some(secs) = err.retry_after()
        && let Ok(value) = HeaderValue::from_str(&secs.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Everything the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct WebState {
    /// The running configuration; replaced on a reload (SIGHUP).
    config: Arc<std::sync::RwLock<Arc<Config>>>,
    pub spool: Arc<dyn Queue>,
    pub scheduler: SchedulerHandle,
    pub metrics: Arc<Metrics>,
    /// Queue size over the last 24 hours, for the chart.
    pub samples: Arc<chart::Samples>,
    /// Browser and API sessions (login, CSRF token, the message shown after an action).
    pub sessions: Arc<auth::Sessions>,
    /// When the last flush was done, for the cooldown.
    flush_gate: Arc<Mutex<Option<Instant>>>,
    /// Turns true when the daemon stops accepting mail; `/healthz` then answers 503.
    stopping: watch::Receiver<bool>,
}

impl WebState {
    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts a reloaded configuration in force (allowlist, accounts, cooldown, thresholds). The
    /// listener and its TLS certificate stay as they were at start.
    pub fn set_config(&self, config: Arc<Config>) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    /// The state for [`serve`]; the sampler for the chart is started by `serve`.
    pub fn new(config: Arc<Config>, spool: Arc<dyn Queue>, scheduler: SchedulerHandle, metrics: Arc<Metrics>) -> Self {
        let samples = Arc::new(chart::Samples::new(config.web.sample_interval.0));
        let (_, stopping) = watch::channel(false);
        WebState {
            config: Arc::new(std::sync::RwLock::new(config)),
            spool,
            scheduler,
            metrics,
            samples,
            sessions: Arc::new(auth::Sessions::default()),
            flush_gate: Arc::default(),
            stopping,
        }
    }

    /// Are the pages served over TLS (so cookies get the Secure attribute)?
    pub fn tls(&self) -> bool {
        self.config().web.tls_cert.is_some()
    }
}

/// All routes with their layers; `serve` adds the connection info the allowlist needs.
pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/message/{id}", get(page::message))
        .route("/message/{id}/delete", get(page::confirm_delete).post(page::delete))
        .route("/message/{id}/{action}", post(page::act))
        .route("/flush", post(page::flush))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/static/style.css", get(page::style))
        .route("/chart.svg", get(page::chart_svg))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .nest("/api", api::router())
        .layer(middleware::from_fn_with_state(state.clone(), auth::session_layer))
        .layer(middleware::from_fn_with_state(state.clone(), host_check))
        .layer(middleware::from_fn_with_state(state.clone(), allowlist))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// Serves the admin page on `listener` (over TLS when configured) until `shutdown` turns true;
/// also samples the queue for the chart.
pub async fn serve(
    mut state: WebState,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> Result<(), WebError> {
    state.stopping = shutdown.clone();
    let sampler =
        tokio::spawn(chart::run_sampler(Arc::clone(&state.samples), Arc::clone(&state.spool), shutdown.clone()));
    // Logged here and now: the daemon only looks at this task's result when it stops.
    let tls = tls::acceptor(&state.config().web)
        .inspect_err(|err| tracing::error!(error = %err, "admin page disabled: bad web.tls_cert/tls_key"))?;
    if auth::locked(&state.config().web) {
        tracing::warn!("{}", auth::LOCKED);
    }
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let mut stop = shutdown.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let result = match tls {
        Some(acceptor) => {
            // tap_io gives the TLS listener the SocketAddr connect info the allowlist reads.
            let listener = tls::TlsListener::new(listener, acceptor, shutdown).tap_io(|_| {});
            axum::serve(listener, app).with_graceful_shutdown(stopped).await
        }
        None => axum::serve(listener, app).with_graceful_shutdown(stopped).await,
    };
    sampler.abort();
    result.map_err(WebError::Io)
}

/// The warning to log at start when passwords and session cookies would cross the network in
/// clear text: accounts configured, no TLS, and a listen address other than loopback.
pub fn insecure_login_warning(web: &WebConfig) -> Option<String> {
    let exposed = !web.listen.ip().is_loopback();
    (exposed && !web.users.is_empty() && web.tls_cert.is_none()).then(|| {
        format!(
            "web.users is set but the admin page on {} has no TLS (web.tls_cert/tls_key): passwords and \
             session cookies cross the network in clear text",
            web.listen
        )
    })
}

/// Refuses peers outside `[web] allow` with 403 and one log line.
async fn allowlist(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if cidr_list_contains(&state.config().web.allow, peer.ip()) {
        return next.run(request).await;
    }
    tracing::warn!(peer = %peer.ip(), path = %request.uri().path(), "web request refused: peer not in web.allow");
    WebError::Forbidden(format!("{} is not in web.allow", peer.ip())).answer(request.uri().path())
}

/// Refuses, with 421 and one log line, a request whose Host header (or absolute-form target) names
/// a host that is not ours: a browser tricked by DNS rebinding sends the attacker's name there. A
/// request without Host passes: browsers always send one, so it cannot come from that attack, and
/// some HTTP/1.0 health checkers send none.
async fn host_check(State(state): State<WebState>, request: Request, next: Next) -> Response {
    let config = state.config();
    let hosts = request.headers().get_all(header::HOST);
    let named: Vec<String> = hosts
        .iter()
        .map(|v| v.to_str().unwrap_or("?").to_string())
        .chain(request.uri().authority().map(|a| a.as_str().to_string()))
        .collect();
    let ours = |name: &String| host::host_part(name).is_some_and(|h| host::is_ours(&config, &h));
    // RFC 9112 3.2: more than one Host header is an error, whatever they say.
    let refused = match hosts.iter().count() {
        0 | 1 => named.iter().find(|name| !ours(name)).cloned(),
        _ => Some(named.join(", ")),
    };
    let Some(name) = refused else {
        return next.run(request).await;
    };
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
    tracing::warn!(
        peer = peer.as_deref().unwrap_or("-"),
        host = %name,
        path = %request.uri().path(),
        "web request refused: Host is not in web.hostnames (DNS rebinding?)"
    );
    WebError::Misdirected(name).answer(request.uri().path())
}

/// Headers on every response: no script at all (the pages need none), no framing, no sniffing, no
/// referrer leaking queue IDs or filters to other sites, no caching of queue contents.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let fixed = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // Not "no-referrer": under it browsers send `Origin: null` with form POSTs, and the origin
        // check could no longer tell our own forms from a forged one.
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// 200 while the daemon accepts mail: not stopping and the spool above `queue.min_free`.
async fn healthz(State(state): State<WebState>) -> Response {
    if *state.stopping.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response();
    }
    match state.spool.space() {
        Ok(space) if space.free_bytes < state.config().queue.min_free => {
            (StatusCode::SERVICE_UNAVAILABLE, "spool filesystem below queue.min_free: new mail gets 452\n")
                .into_response()
        }
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, format!("spool: {err}\n")).into_response(),
    }
}

/// Prometheus text format (version 0.0.4 content type, which every scraper accepts).
async fn metrics(State(state): State<WebState>) -> Response {
    let destinations = state.scheduler.destinations();
    let text = state.metrics.render(&state.config(), state.spool.as_ref(), &destinations);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

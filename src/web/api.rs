//! The JSON API under `/api/`: everything the page shows and does, with the same access rules
//! (allowlist, login, CSRF token on every POST). Documented in `docs/api.md`.

use super::actions::{self, Action};
use super::queue::{self, QueueFilter};
use super::session::Session;
use super::{WebError, WebState};
use crate::control::{ListedMessage, ShapeReport};
use crate::spool::Envelope;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The API's routes, nested under `/api`.
pub fn router() -> Router<WebState> {
    Router::new()
        .route("/status", get(status))
        .route("/queue", get(list))
        .route("/queue/shape", get(shape))
        .route("/queue/{id}", get(show))
        .route("/queue/{id}/{action}", post(act))
        .route("/flush", post(flush))
        .route("/chart", get(chart))
}

/// A JSON error: `{"error": "..."}` with the error's status (and Retry-After for 429).
pub fn error_response(err: &WebError) -> Response {
    let response = (err.status(), Json(json!({ "error": err.to_string() }))).into_response();
    super::with_retry_after(err, response)
}

/// An error answered as JSON.
pub struct ApiError(pub WebError);

impl From<WebError> for ApiError {
    fn from(err: WebError) -> Self {
        ApiError(err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self.0)
    }
}

/// `/api/status`: the status summary plus what a client needs to act (the CSRF token).
#[derive(Debug, Serialize)]
pub struct StatusResponse {
    #[serde(flatten)]
    pub status: queue::Status,
    /// Send it back in the `X-CSRF-Token` header of every POST, with the session cookie.
    pub csrf_token: String,
    pub user: Option<String>,
}

async fn status(State(state): State<WebState>, Extension(session): Extension<Session>) -> Json<StatusResponse> {
    Json(StatusResponse { status: queue::status(&state), csrf_token: session.csrf.clone(), user: session.user })
}

async fn list(State(state): State<WebState>, Query(filter): Query<QueueFilter>) -> Result<Response, ApiError> {
    Ok(Json(queue::queue_page(&state, &filter).await?).into_response())
}

/// `/api/queue/{id}`: the listing fields, the Subject, the whole envelope and the header section.
#[derive(Debug, Serialize)]
pub struct MessageResponse {
    #[serde(flatten)]
    pub listed: ListedMessage,
    pub subject: Option<String>,
    pub envelope: Envelope,
    pub headers: String,
}

async fn show(State(state): State<WebState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if !crate::spool::is_queue_id(&id) {
        return Err(WebError::BadRequest(format!("{id:?} is not a queue ID")).into());
    }
    let spool = std::sync::Arc::clone(&state.spool);
    let result = tokio::task::spawn_blocking(move || {
        let envelope = spool.get(&id).ok_or_else(|| WebError::NotFound(format!("no message {id} in the queue")))?;
        let headers = spool.read_headers(&id, 256 * 1024).map_err(|e| WebError::Internal(e.to_string()))?;
        Ok::<_, WebError>(MessageResponse {
            listed: ListedMessage::from(&envelope),
            subject: queue::subject(spool.as_ref(), &id),
            envelope,
            headers: String::from_utf8_lossy(&headers).into_owned(),
        })
    })
    .await
    .map_err(|e| WebError::Internal(e.to_string()))??;
    Ok(Json(result).into_response())
}

fn done(text: String) -> Response {
    Json(json!({ "ok": text })).into_response()
}

async fn act(
    State(state): State<WebState>,
    Extension(session): Extension<Session>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let action = Action::for_message(&name, id)?;
    Ok(done(actions::perform(&state, action, &session).await?))
}

/// The flush request: `domain` in the query string or in a JSON body; neither means everything.
#[derive(Debug, Default, Deserialize)]
pub struct FlushRequest {
    #[serde(default)]
    pub domain: Option<String>,
}

async fn flush(
    State(state): State<WebState>,
    Extension(session): Extension<Session>,
    Query(query): Query<FlushRequest>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let from_body = if body.iter().all(u8::is_ascii_whitespace) {
        FlushRequest::default()
    } else {
        serde_json::from_slice::<FlushRequest>(&body).map_err(|e| WebError::BadRequest(format!("bad JSON: {e}")))?
    };
    let domain = query.domain.or(from_body.domain);
    Ok(done(actions::perform(&state, Action::Flush(domain), &session).await?))
}

/// `/api/queue/shape`: counts by domain and age bucket, as `bartleby queue shape --json` prints.
async fn shape(State(state): State<WebState>) -> Result<Response, ApiError> {
    let spool = std::sync::Arc::clone(&state.spool);
    let report = tokio::task::spawn_blocking(move || ShapeReport::of(spool.as_ref(), crate::spool::now_micros()))
        .await
        .map_err(|e| WebError::Internal(e.to_string()))?;
    let total = report.totals();
    Ok(Json(json!({ "buckets_minutes": report.buckets_minutes, "domains": report.domains, "total": total }))
        .into_response())
}

async fn chart(State(state): State<WebState>) -> Response {
    Json(json!({ "interval_seconds": state.config().web.sample_interval.0.as_secs(), "samples": state.samples.snapshot() }))
        .into_response()
}

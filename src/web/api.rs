//! The JSON API under `/api/`: everything the page shows and does, with the same access rules
//! (allowlist, login, CSRF token on every POST). Documented in `docs/api.md`, and described for
//! machines by the OpenAPI document served at `/api/openapi.json` ([`super::openapi`]).
//!
//! Every answer is JSON, errors too: a path the API does not serve is a JSON 404, a method a path
//! does not take a JSON 405 (with `Allow`), a query string or path that does not parse a JSON 400.

use super::actions::{self, Action};
use super::queue::{self, QueueFilter};
use super::session::Session;
use super::{WebError, WebState};
use crate::control::{ListedMessage, ShapeReport};
use crate::spool::{Envelope, SpoolError};
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// One route of the API: the method and path (under `/api`) as the OpenAPI document names them.
pub struct ApiRoute {
    /// Lower case, as an OpenAPI path item's keys.
    pub method: &'static str,
    /// With `{name}` path parameters, as both axum and OpenAPI write them.
    pub path: &'static str,
    handler: MethodRouter<WebState>,
}

fn get_route<H: Handler<T, WebState>, T: 'static>(path: &'static str, handler: H) -> ApiRoute {
    ApiRoute { method: "get", path, handler: get(handler) }
}

fn post_route<H: Handler<T, WebState>, T: 'static>(path: &'static str, handler: H) -> ApiRoute {
    ApiRoute { method: "post", path, handler: post(handler) }
}

/// Every route the API serves, in one place: [`router`] serves exactly these, and a test checks
/// that `/api/openapi.json` describes each of them (and nothing else).
pub fn routes() -> Vec<ApiRoute> {
    vec![
        get_route("/openapi.json", super::openapi::document),
        get_route("/status", status),
        get_route("/queue", list),
        get_route("/queue/shape", shape),
        get_route("/queue/{id}", show),
        action_route("/queue/{id}/retry", "retry"),
        action_route("/queue/{id}/hold", "hold"),
        action_route("/queue/{id}/release", "release"),
        action_route("/queue/{id}/delete", "delete"),
        post_route("/flush", flush),
        get_route("/chart", chart),
    ]
}

/// The API's routes, nested under `/api`, with JSON answers for unknown paths and wrong methods.
pub fn router() -> Router<WebState> {
    routes()
        .into_iter()
        .fold(Router::new(), |router, route| router.route(route.path, route.handler))
        // After the routes: it is set on each route already added.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
}

async fn not_found() -> ApiError {
    ApiError(WebError::NotFound("no such API path (see /api/openapi.json)".into()))
}

/// axum adds the `Allow` header to this answer itself.
async fn method_not_allowed() -> ApiError {
    ApiError(WebError::MethodNotAllowed)
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

/// A query string, refused with a JSON 400 (axum's own [`Query`] answers in plain text).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(WebError::BadRequest(rejection.body_text()).into()),
        }
    }
}

/// Path parameters, refused with a JSON 400 (a percent escape that is not UTF-8, say).
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(WebError::BadRequest(rejection.body_text()).into()),
        }
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

async fn list(State(state): State<WebState>, ApiQuery(filter): ApiQuery<QueueFilter>) -> Result<Response, ApiError> {
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

async fn show(State(state): State<WebState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    if !crate::spool::is_queue_id(&id) {
        return Err(WebError::BadRequest(format!("{id:?} is not a queue ID")).into());
    }
    let spool = std::sync::Arc::clone(&state.spool);
    let result = tokio::task::spawn_blocking(move || {
        let envelope = spool.get(&id).ok_or_else(|| WebError::NotFound(format!("no message {id} in the queue")))?;
        // Deleted since `get` (a delivery or another operator): 404 as if it had been gone already.
        let headers = spool.read_headers(&id, 256 * 1024).map_err(|e| match e {
            SpoolError::NotFound(_) => WebError::NotFound(format!("no message {id} in the queue")),
            e => WebError::Internal(e.to_string()),
        })?;
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

/// `POST /api/queue/{id}/NAME`: the message action `name` (retry, hold, release, delete).
fn action_route(path: &'static str, name: &'static str) -> ApiRoute {
    let handler = move |State(state): State<WebState>,
                        Extension(session): Extension<Session>,
                        ApiPath(id): ApiPath<String>| async move {
        let action = Action::for_message(name, id)?;
        Ok::<_, ApiError>(done(actions::perform(&state, action, &session).await?))
    };
    ApiRoute { method: "post", path, handler: post(handler) }
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
    ApiQuery(query): ApiQuery<FlushRequest>,
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

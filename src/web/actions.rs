//! The operator's actions, shared by the page and the API: each goes through the scheduler (which
//! owns the queue's state), is logged with who did it and from where (account and client address,
//! refused ones too), and yields a sentence for the next page.

use super::session::Session;
use super::{WebError, WebState};
use crate::lock;
use crate::schedule::ScheduleError;
use crate::spool::{SpoolError, is_queue_id};
use std::time::Instant;

/// Something an operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Try every deferred message now (of one domain, if given).
    Flush(Option<String>),
    Retry(String),
    Hold(String),
    Release(String),
    Delete(String),
}

impl Action {
    /// The action's name, for the log.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Flush(_) => "flush",
            Action::Retry(_) => "retry",
            Action::Hold(_) => "hold",
            Action::Release(_) => "release",
            Action::Delete(_) => "delete",
        }
    }

    /// The message it is about, if any.
    pub fn queue_id(&self) -> Option<&str> {
        match self {
            Action::Flush(_) => None,
            Action::Retry(id) | Action::Hold(id) | Action::Release(id) | Action::Delete(id) => Some(id),
        }
    }

    /// The per-message action named in a URL (`/message/{id}/{name}`).
    pub fn for_message(name: &str, id: String) -> Result<Action, WebError> {
        if !is_queue_id(&id) {
            return Err(WebError::BadRequest(format!("{id:?} is not a queue ID")));
        }
        match name {
            "retry" => Ok(Action::Retry(id)),
            "hold" => Ok(Action::Hold(id)),
            "release" => Ok(Action::Release(id)),
            "delete" => Ok(Action::Delete(id)),
            _ => Err(WebError::NotFound(format!("no action {name:?}"))),
        }
    }
}

fn schedule_error(err: ScheduleError) -> WebError {
    match err {
        ScheduleError::Spool(SpoolError::NotFound(id)) => WebError::NotFound(format!("no message {id} in the queue")),
        ScheduleError::InFlight(_) => WebError::Conflict(err.to_string()),
        ScheduleError::NotRunning => WebError::Unavailable(err.to_string()),
        ScheduleError::Held(_) | ScheduleError::NotHeld(_) | ScheduleError::Paused(_) | ScheduleError::NotPaused(_) => {
            WebError::Conflict(err.to_string())
        }
        ScheduleError::NotRelayed(_) => WebError::BadRequest(err.to_string()),
        ScheduleError::Spool(_) => WebError::Internal(err.to_string()),
    }
}

/// Carries out `action` for the session's user; logs it with the account ("-" without accounts)
/// and the client address, whatever the outcome; returns what happened, in words.
pub async fn perform(state: &WebState, action: Action, session: &Session) -> Result<String, WebError> {
    let (name, queue_id) = (action.name(), action.queue_id().map(str::to_string));
    let domain = match &action {
        Action::Flush(domain) => domain.clone(),
        _ => None,
    };
    let result = run(state, action).await;
    let (user, client) = (session.who(), session.client_text());
    match &result {
        Ok(done) => tracing::info!(user, client, action = name, queue_id, domain, result = %done, "web action"),
        Err(err) => tracing::warn!(user, client, action = name, queue_id, domain, error = %err, "web action failed"),
    }
    result
}

async fn run(state: &WebState, action: Action) -> Result<String, WebError> {
    match action {
        Action::Flush(domain) => {
            let domain = domain.map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase()).filter(|d| !d.is_empty());
            flush_gate(state)?;
            let count = state.scheduler.flush(domain.clone()).await.map_err(schedule_error)?;
            let scope = domain.map(|d| format!(" for {d}")).unwrap_or_default();
            Ok(format!("Flush{scope}: {count} message{} scheduled for delivery now.", plural(count)))
        }
        Action::Retry(id) => {
            state.scheduler.retry(&id).await.map_err(schedule_error)?;
            Ok(format!("{id} scheduled for delivery now."))
        }
        Action::Hold(id) => {
            state.scheduler.hold(&id, true).await.map_err(schedule_error)?;
            Ok(format!("{id} held: it will not be tried until released."))
        }
        Action::Release(id) => {
            state.scheduler.hold(&id, false).await.map_err(schedule_error)?;
            Ok(format!("{id} released."))
        }
        Action::Delete(id) => {
            state.scheduler.delete(&id).await.map_err(schedule_error)?;
            Ok(format!("{id} deleted (no bounce sent)."))
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// One flush per `[web] flush_cooldown`: every flush makes the whole queue due, so repeated clicks
/// (or a script) must not turn into a storm of connections to a primary that just came back.
fn flush_gate(state: &WebState) -> Result<(), WebError> {
    let cooldown = state.config().web.flush_cooldown.0;
    let mut last = lock(&state.flush_gate);
    if let Some(at) = *last {
        let elapsed = at.elapsed();
        if elapsed < cooldown {
            let retry_after = (cooldown - elapsed).as_secs().max(1);
            return Err(WebError::TooManyRequests { elapsed: elapsed.as_secs(), retry_after });
        }
    }
    *last = Some(Instant::now());
    Ok(())
}

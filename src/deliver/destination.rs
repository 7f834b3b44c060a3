//! What the last deliveries to each destination said about its next hop: the up/down state that the
//! scheduler keeps and the admin page, `/metrics` and the monitor show. It lives beside delivery,
//! not in the scheduler, so that the readers need not depend on the scheduler.

use std::collections::BTreeMap;
use std::sync::Arc;

/// What the last deliveries to a destination domain said about its next hop (the primary).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DestinationState {
    /// Microseconds since the epoch of the last successful delivery (or probe).
    pub last_success: Option<i64>,
    /// Since when every attempt has failed; None while the destination works.
    pub failing_since: Option<i64>,
    /// The last error, with the stage and the server's reply.
    pub last_error: Option<String>,
    /// Microseconds since the epoch of the last attempt.
    pub last_attempt: Option<i64>,
}

impl DestinationState {
    /// Records a success (a delivery, or later a probe).
    pub fn succeeded(&mut self, at: i64) {
        self.last_success = Some(at);
        self.last_attempt = Some(at);
        self.failing_since = None;
        self.last_error = None;
    }

    /// Records an attempt in which the destination answered without taking a message (a 4xx or
    /// 5xx for its recipients): it is not failing.
    pub fn reached(&mut self, at: i64) {
        self.last_attempt = Some(at);
        self.failing_since = None;
        self.last_error = None;
    }

    /// Records a failure; `failing_since` keeps the first one of a run.
    pub fn failed(&mut self, at: i64, error: String) {
        self.last_attempt = Some(at);
        self.failing_since.get_or_insert(at);
        self.last_error = Some(error);
    }
}

/// Destination states by domain, shared with the admin page and the monitor.
pub type Destinations = Arc<std::sync::Mutex<BTreeMap<String, DestinationState>>>;

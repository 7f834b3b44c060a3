//! Where a message goes and how it gets there: routes, MX resolution with the backup-MX rule,
//! and the outbound SMTP client.
//!
//! The scheduler hands [`Deliverer::deliver`] a batch of messages for one domain, oldest first, and
//! gets back one [`RcptOutcome`] per pending recipient of that domain. The deliverer never touches
//! the spool's state: turning outcomes into retries, bounces and removals is the scheduler's job.

use crate::config::Config;
use crate::spool::{Envelope, QueueId};
use std::path::PathBuf;
use std::sync::Arc;

/// What happened to one recipient in one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The next hop accepted the message for this recipient (250 after DATA).
    Delivered(Detail),
    /// Try again later: 4xx, refused or dropped connection, timeout, temporary DNS failure.
    TempFail(Detail),
    /// Permanent failure (5xx, null MX, NXDOMAIN): bounce.
    PermFail(Detail),
    /// The MX list points back to us (we are the best MX): defer, never deliver to ourselves.
    Loop(Detail),
}

/// The facts behind an outcome, for the queue listing, the log and the DSN.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Detail {
    /// RFC 3463 enhanced status code, e.g. "4.4.1" or "5.1.1".
    pub status: String,
    /// Human-readable: the stage and the server's reply text, e.g. "RCPT TO: 550 5.1.1 no such user".
    pub text: String,
    /// The host that gave the reply, if one did (DSN Remote-MTA).
    pub remote_mta: Option<String>,
    /// The SMTP reply code and text as received, for the DSN Diagnostic-Code, if any.
    pub diagnostic: Option<String>,
}

/// One message to deliver: its envelope (only pending recipients in the batch's domain are tried)
/// and where its body is.
#[derive(Debug, Clone)]
pub struct Job {
    pub envelope: Envelope,
    pub body: PathBuf,
}

/// The outcomes of one message, one entry per recipient address that was tried.
#[derive(Debug, Clone)]
pub struct JobResult {
    pub id: QueueId,
    pub outcomes: Vec<(String, RcptOutcome)>,
}

/// Delivery to next hops; one per daemon, shared by all queue runs.
pub struct Deliverer {
    config: Arc<Config>,
}

impl Deliverer {
    pub fn new(config: Arc<Config>) -> Result<Deliverer, String> {
        Ok(Deliverer { config })
    }

    /// Delivers `jobs` (all with pending recipients in `domain`, oldest first) to the domain's next
    /// hops and reports per-recipient outcomes for that domain's recipients.
    pub async fn deliver(&self, domain: &str, jobs: Vec<Job>) -> Vec<JobResult> {
        let _ = (&self.config, domain, jobs);
        unimplemented!("deliver")
    }
}

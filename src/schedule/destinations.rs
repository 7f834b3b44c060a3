//! What a batch said about its destination (up, down, back), and what the primary taught us.

use super::*;

/// What one batch's results said about its destination.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub(super) delivered: bool,
    /// The destination answered for a recipient (a delivery, a 5xx, a 4xx for that recipient):
    /// its sessions work, whatever it said.
    pub(super) answered: bool,
    /// The first failure of a connection or a session (see [`Detail::session`]), or a loop.
    pub(super) failed: Option<String>,
}

impl Tally {
    pub(super) fn add(&mut self, result: &JobResult) {
        for (_, outcome) in &result.outcomes {
            match outcome {
                RcptOutcome::Delivered(_) => (self.delivered, self.answered) = (true, true),
                RcptOutcome::Loop(d) => {
                    self.failed.get_or_insert_with(|| d.text.clone());
                }
                RcptOutcome::TempFail(d) | RcptOutcome::PermFail(d) if d.session => {
                    self.failed.get_or_insert_with(|| d.text.clone());
                }
                // A remote MTA answered; a local error (no remote) says nothing of the destination.
                RcptOutcome::TempFail(d) | RcptOutcome::PermFail(d) => self.answered |= d.remote_mta.is_some(),
            }
        }
    }

    /// The destination is failing: no session worked.
    pub(super) fn down(&self) -> bool {
        self.failed.is_some() && !self.answered
    }
}

impl Scheduler {
    /// Hands the addresses the primary accepted to the recipient knowledge (on a blocking thread:
    /// it writes the cache file).
    pub(super) fn learn<'a>(&self, results: impl Iterator<Item = &'a JobResult>) {
        let Some(recipients) = self.recipients.clone() else { return };
        let delivered: Vec<String> = results
            .flat_map(|r| &r.outcomes)
            .filter(|(_, o)| matches!(o, RcptOutcome::Delivered(_)))
            .map(|(address, _)| address.clone())
            .collect();
        if !delivered.is_empty() {
            tokio::task::spawn_blocking(move || recipients.learn(&delivered));
        }
    }

    /// Only relayed domains and routes have a state; the senders' domains our bounces go to do not
    /// (they would add rows to the page and series to `/metrics`).
    pub(super) fn record_destination(&self, domain: &str, tally: &Tally) {
        if !self.config.is_destination(domain) {
            return;
        }
        let now = now();
        let mut table = lock(&self.destinations);
        let state = table.entry(domain.to_string()).or_default();
        if tally.delivered {
            state.succeeded(now);
        } else if tally.answered {
            state.reached(now);
        } else if let Some(error) = &tally.failed {
            state.failed(now, error.clone());
        }
    }
}

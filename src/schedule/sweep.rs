//! The sweep of failed messages kept without a bounce (no backscatter) once their lifetime is over.

use super::*;

/// Failed messages kept instead of bounced, for the admin page and `/metrics`.
pub fn suppressed_bounces(spool: &dyn Queue) -> usize {
    spool.count(&spool::Filter { bounce_suppressed: Some(true), ..spool::Filter::default() })
}

/// Removes kept failed messages whose queue lifetime is over; returns how many.
pub fn sweep_suppressed(config: &Config, spool: &dyn Queue, now: i64) -> usize {
    let lifetime = i64::try_from(config.queue.max_lifetime.0.as_micros()).unwrap_or(i64::MAX / 2);
    let kept = spool::Filter { bounce_suppressed: Some(true), ..spool::Filter::default() };
    let expired: Vec<QueueId> = spool
        .query(&kept, spool::Page::ALL)
        .envelopes
        .into_iter()
        .filter(|e| e.is_done() && e.arrived.saturating_add(lifetime) <= now)
        .map(|e| e.id)
        .collect();
    if expired.is_empty() {
        return 0;
    }
    match spool.remove(&expired) {
        Ok(()) => {
            tracing::info!(messages = expired.len(), "removed failed messages kept without a bounce: lifetime over");
            expired.len()
        }
        Err(err) => {
            tracing::error!(error = %err, "cannot remove expired failed messages");
            0
        }
    }
}

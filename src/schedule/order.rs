//! Arrival order (`strict_order`): batches that keep a destination's mail in the order it came.

use super::*;

impl Scheduler {
    /// `strict_order`: the primary must see the domain's mail in arrival order. While the
    /// destination is down, a batch starts with the oldest message waiting for it and carries the
    /// whole backlog; if the domain was tried less than `queue.first_retry` ago, the batch's newer
    /// messages are parked until the backlog's turn, so an arrival never overtakes the backlog and
    /// arrivals during an outage do not retry it more than once per `first_retry`. A message the
    /// destination deferred itself (a 4xx for one recipient) keeps its own backoff: it neither
    /// holds back later mail nor rides along (README, "Arrival order"). While the destination is
    /// up, nothing older waits for it, so the batch goes as it is.
    ///
    /// In a store shared by several nodes, the domain's older mail may have come in through
    /// another node and not be in this timetable yet: the batch takes every older message that
    /// is due, claimed like the rest (this node holds the domain's lane meanwhile).
    pub(super) fn keep_arrival_order(&mut self, domain: &str, jobs: &mut Vec<Job>) {
        let down = self.down_domains.contains(domain);
        let shared = self.spool.shared();
        if !down && !shared {
            return;
        }
        let in_batch: HashSet<QueueId> = jobs.iter().map(|j| j.envelope.id.clone()).collect();
        let filter = spool::Filter { held: Some(false), ..spool::Filter::domain(domain) };
        let waiting: Vec<Envelope> = self
            .spool
            .query(&filter, spool::Page::ALL)
            .envelopes
            .into_iter()
            .filter(|e| !in_batch.contains(&e.id) && !self.in_flight.contains_key(&e.id))
            .filter(|e| !self.own_backoff.contains(&e.id))
            .collect();
        let oldest_in_batch = jobs.iter().map(|j| j.envelope.id.clone()).min();
        let last_attempt = lock(&self.destinations).get(domain).and_then(|d| d.last_attempt);
        let first_retry = i64::try_from(self.config.queue.first_retry.0.as_micros()).unwrap_or(i64::MAX / 2);
        let next_try = last_attempt.map_or(0, |at| at.saturating_add(first_retry));
        match waiting.first() {
            Some(first) if down && next_try > now() && oldest_in_batch.is_some_and(|oldest| first.id < oldest) => {
                let due = queue_key(&first.id).and_then(|k| self.due_at.get(&k).copied()).unwrap_or(first.next_attempt);
                let at = due.min(next_try);
                let parked: Vec<QueueId> = jobs.iter().map(|j| j.envelope.id.clone()).collect();
                self.spool.unclaim(&parked);
                for job in jobs.drain(..) {
                    self.release_in_flight(&job.envelope.id);
                    self.schedule(job.envelope.id, at);
                }
            }
            _ => {
                let waiting = if shared {
                    // Only what is due while the destination is up: a message in its own backoff
                    // does not hold back later mail.
                    let due_by = if down { None } else { Some(now().saturating_add(STALE_GRACE)) };
                    let ids: Vec<QueueId> = waiting.iter().map(|e| e.id.clone()).collect();
                    self.spool.claim(&ids, due_by).into_iter().map(|c| c.envelope).collect()
                } else {
                    waiting
                };
                for envelope in waiting {
                    self.unschedule(&envelope.id);
                    *self.in_flight.entry(envelope.id.clone()).or_insert(0) += 1;
                    self.dispatched.insert(envelope.id.clone(), envelope.clone());
                    jobs.push(self.job(envelope));
                }
            }
        }
    }
}

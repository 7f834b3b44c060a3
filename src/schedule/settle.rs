//! Settling: the outcomes of finished deliveries made durable off the scheduler's loop (one settle
//! at a time, on a blocking thread, taking everything that arrived meanwhile), notices queued
//! before the states that call for them are saved.

use super::*;

/// When each message still pending after a settle is due next.
pub(super) type NextAttempts = Vec<(QueueId, i64)>;

/// What a settle returns: the messages it took, and when each one still pending is due next.
pub(super) type Settled = (Vec<QueueId>, NextAttempts);

/// Messages with complete outcomes on their way to the spool. One settle runs at a time on a
/// blocking thread; what arrives meanwhile waits and goes in the next one, so the disk work is
/// shared by all the messages the primary answered during the previous one.
#[derive(Default)]
pub(super) struct Settler {
    /// Outcomes waiting for the next settle.
    pub(super) waiting: Vec<(QueueId, Vec<(String, RcptOutcome)>)>,
    /// The running settle, with the IDs it carries.
    pub(super) running: Option<(Vec<QueueId>, tokio::task::JoinHandle<NextAttempts>)>,
    /// Generations: settles started, and settles finished (every one up to it).
    pub(super) started: u64,
    pub(super) finished: u64,
}

pub(super) type Outcomes = Vec<(QueueId, Vec<(String, RcptOutcome)>)>;

impl Settler {
    /// Starts a settle of everything waiting, unless one is running or nothing waits.
    pub(super) fn start(&mut self, work: impl FnOnce(Outcomes) -> NextAttempts + Send + 'static) {
        if self.running.is_some() || self.waiting.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.waiting);
        let ids = batch.iter().map(|(id, _)| id.clone()).collect();
        self.started += 1;
        self.running = Some((ids, tokio::task::spawn_blocking(move || work(batch))));
    }

    /// Messages whose outcomes are known but not yet durable.
    pub(super) fn backlog(&self) -> usize {
        self.waiting.len() + self.running.as_ref().map_or(0, |(ids, _)| ids.len())
    }

    /// The generation that will have settled everything absorbed so far.
    pub(super) fn covering(&self) -> u64 {
        if self.waiting.is_empty() { self.started } else { self.started + 1 }
    }

    /// Waits for the running settle (forever when none runs, so `select!` can poll it).
    pub(super) async fn done(&mut self) -> Settled {
        let Some((_, task)) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let next = match task.await {
            Ok(next) => next,
            Err(err) => {
                tracing::error!(error = %err, "settling delivery results failed");
                Vec::new()
            }
        };
        let ids = self.running.take().map(|(ids, _)| ids).unwrap_or_default();
        self.finished = self.started;
        (ids, next)
    }
}

/// Settles messages whose attempt is complete: queues DSNs first, then saves or removes the
/// messages. Returns when each message still pending is due next.
pub(super) fn settle(
    config: &Config,
    spool: &Arc<dyn Queue>,
    metrics: &Metrics,
    settled: Vec<(QueueId, Vec<(String, RcptOutcome)>)>,
    now: i64,
) -> Vec<(QueueId, i64)> {
    let started = std::time::Instant::now();
    let messages = settled.len();
    let mut updated = Vec::new();
    let mut noted = Vec::new();
    let mut removed = Vec::new();
    let mut next = Vec::new();
    for (id, outcomes) in settled {
        let Some(mut envelope) = spool.get(&id) else { continue };
        let before = envelope.clone();
        let mut verdict = apply_outcomes(config, &mut envelope, &outcomes, now);
        suppress_backscatter(config, &mut envelope, &mut verdict);
        count(metrics, &envelope, &outcomes, &verdict, now);
        for (kind, rcpts) in [(DsnKind::Failure, &verdict.bounce), (DsnKind::Delay, &verdict.delay)] {
            if rcpts.is_empty() {
                continue;
            }
            match queue_dsn(config, spool, &envelope, kind, rcpts) {
                Ok(dsn_id) => {
                    envelope.record(format!("{} notice {dsn_id} sent to <{}>", kind_name(kind), envelope.sender));
                    next.push((dsn_id, now));
                }
                Err(err) => tracing::error!(queue_id = %id, error = %err, "cannot queue DSN"),
            }
        }
        log_verdict(&envelope, &verdict);
        if verdict.done {
            removed.push(id);
        } else {
            if !envelope.held {
                next.push((id, envelope.next_attempt));
            }
            if changes_state(&before, &envelope) {
                updated.push(envelope);
            } else {
                noted.push(envelope);
            }
        }
    }
    if let Err(err) = spool.update(&updated) {
        tracing::error!(error = %err, "cannot save delivery state");
    }
    spool.note(noted);
    if let Err(err) = spool.remove(&removed) {
        tracing::error!(error = %err, "cannot remove delivered messages");
    }
    tracing::debug!(messages, removed = removed.len(), ms = started.elapsed().as_millis(), "settled");
    next
}

/// Did more than retry bookkeeping change (a recipient's status, a notice sent, held)? Those
/// changes are written durably before bartleby acts on them; a bare deferral is only noted.
pub(super) fn changes_state(before: &Envelope, after: &Envelope) -> bool {
    let statuses = |e: &Envelope| e.recipients.iter().map(|r| r.status).collect::<Vec<_>>();
    statuses(before) != statuses(after)
        || before.held != after.held
        || before.delay_notified != after.delay_notified
        || before.bounce_suppressed != after.bounce_suppressed
}

/// One attempt of one message in the counters: delivered if any recipient was (with the time
/// since arrival), deferred if one is still pending (a first deferral when this was the message's
/// first attempt: recipients only leave the pending state, so a message pending after a later
/// attempt was pending after its first), bounced if a failure notice goes out.
pub(super) fn count(
    metrics: &Metrics,
    envelope: &Envelope,
    outcomes: &[(String, RcptOutcome)],
    verdict: &Verdict,
    now: i64,
) {
    if outcomes.iter().any(|(_, o)| matches!(o, RcptOutcome::Delivered(_))) {
        metrics.delivered(now.saturating_sub(envelope.arrived) as f64 / 1e6);
    }
    if !verdict.done {
        metrics.deferred(envelope.attempts == 1);
    }
    if !verdict.bounce.is_empty() {
        metrics.bounced();
    }
}

pub(super) fn kind_name(kind: DsnKind) -> &'static str {
    match kind {
        DsnKind::Failure => "failure",
        DsnKind::Delay => "delay",
    }
}

pub(super) fn log_verdict(envelope: &Envelope, verdict: &Verdict) {
    let pending = envelope.pending().count();
    if verdict.done {
        tracing::info!(queue_id = %envelope.id, attempts = envelope.attempts, "removed: no recipient pending");
    } else {
        tracing::info!(
            queue_id = %envelope.id,
            pending,
            attempts = envelope.attempts,
            next_attempt = %crate::spool::rfc3339(envelope.next_attempt),
            error = envelope.last_error().unwrap_or(""),
            "deferred"
        );
    }
}

/// Writes a DSN for `envelope` into the spool as a new message from `<>` to its sender.
pub(super) fn queue_dsn(
    config: &Config,
    spool: &Arc<dyn Queue>,
    envelope: &Envelope,
    kind: DsnKind,
    recipients: &[ReportedRecipient],
) -> Result<QueueId, SpoolError> {
    let original = match (kind, envelope.ret) {
        (DsnKind::Failure, Some(DsnRet::Full)) => spool.read_body(&envelope.id)?,
        _ => spool.read_headers(&envelope.id, 256 * 1024)?,
    };
    let retry_until = from_micros(envelope.arrived) + config.queue.max_lifetime.0;
    let bytes =
        dsn::build(&config.hostname, envelope, kind, recipients, &original, SystemTime::now(), Some(retry_until));
    let id = spool.new_id();
    let mut message = Arc::clone(spool).incoming(&id)?;
    message.write(&bytes)?;
    let mut notice = dsn::notice_envelope(id.clone(), envelope, &bytes);
    notice.helo = config.hostname.clone();
    notice.record(format!("{} notice for {} to <{}>", kind_name(kind), envelope.id, envelope.sender));
    message.commit(notice)?;
    tracing::info!(queue_id = %id, original = %envelope.id, to = %envelope.sender, kind = kind_name(kind), "DSN queued");
    Ok(id)
}

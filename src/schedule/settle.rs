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
    pub(super) waiting: Outcomes,
    /// The running settle, with the IDs it carries.
    pub(super) running: Option<(Vec<QueueId>, tokio::task::JoinHandle<NextAttempts>)>,
    /// Generations: settles started, and settles finished (every one up to it).
    pub(super) started: u64,
    pub(super) finished: u64,
}

/// Each message's outcomes, with its envelope as it was sent when nothing changed it since (else
/// None: the settle reads it again).
pub(super) type Outcomes = Vec<(QueueId, Vec<(String, RcptOutcome)>, Option<Envelope>)>;

impl Settler {
    /// Starts a settle of everything waiting, unless one is running or nothing waits.
    pub(super) fn start(&mut self, work: impl FnOnce(Outcomes) -> NextAttempts + Send + 'static) {
        if self.running.is_some() || self.waiting.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.waiting);
        let ids = batch.iter().map(|(id, _, _)| id.clone()).collect();
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
    settled: Outcomes,
    now: i64,
) -> Vec<(QueueId, i64)> {
    let started = std::time::Instant::now();
    let messages = settled.len();
    let mut updated = Vec::new();
    let mut noted = Vec::new();
    let mut removed = Vec::new();
    let mut next = Vec::new();
    for (id, outcomes, sent) in settled {
        // The envelope as sent saves reading and parsing it again (a drain settles thousands a
        // second); the scheduler drops it when an operator changed the message meanwhile.
        let Some(mut envelope) = sent.or_else(|| spool.get(&id)) else { continue };
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

/// The status and text of an operator's return (`bartleby queue bounce`, like `exim -Mg`).
pub(super) const RETURNED_STATUS: &str = "5.0.0";
pub(super) const RETURNED_TEXT: &str = "returned by the operator";

/// Returns a message to its sender now: every pending recipient fails with 5.0.0 "returned by
/// the operator", a failure notice goes to the sender through the same path as an expiry's
/// (honouring NOTIFY, never to the null sender or for a notice of ours, and not to a sender that
/// may be forged: no backscatter), and the message leaves the queue. Returns the notice's queue
/// ID, if one was queued, and what happened in words.
pub(super) fn return_to_sender(
    config: &Config,
    spool: &Arc<dyn Queue>,
    metrics: &Metrics,
    id: &str,
) -> Result<(Option<QueueId>, String), ScheduleError> {
    let mut envelope = spool.get(id).ok_or_else(|| SpoolError::NotFound(id.to_string()))?;
    let detail = Detail {
        status: RETURNED_STATUS.into(),
        text: RETURNED_TEXT.into(),
        remote_mta: None,
        diagnostic: None,
        session: false,
    };
    let mut verdict = Verdict::default();
    let pending: Vec<String> = envelope.pending().map(|r| r.address.clone()).collect();
    for rcpt in envelope.recipients.iter_mut().filter(|r| r.status == RecipientStatus::Pending) {
        record_outcome(rcpt, &RcptOutcome::PermFail(detail.clone()), &mut verdict);
    }
    envelope.record(format!("returned by the operator ({} recipients)", pending.len()));
    let refused = if envelope.sender.is_empty() || envelope.generated {
        Some("no notice: the sender is the null sender or the message is a notice of ours")
    } else if !crate::auth::may_bounce(envelope.sender_auth.as_ref(), config.smtp.bounce_unverified) {
        Some("no notice: the sender is not authenticated (no backscatter)")
    } else if verdict.bounce.is_empty() {
        Some("no notice: the recipients asked for none (NOTIFY)")
    } else {
        None
    };
    // The notice first, as settling does: a crash between the two sends the notice again rather
    // than dropping the message without one.
    let notice = match refused {
        Some(_) => None,
        None => Some(queue_dsn(config, spool, &envelope, DsnKind::Failure, &verdict.bounce)?),
    };
    spool.remove(&[id.to_string()])?;
    metrics.bounced();
    tracing::info!(queue_id = %id, to = %envelope.sender, notice = notice.as_deref().unwrap_or(""),
        recipients = pending.len(), "returned by the operator");
    let text = match (&notice, refused) {
        (Some(dsn), _) => format!("returned to <{}>: failure notice {dsn} queued", envelope.sender),
        (None, reason) => format!("removed; {}", reason.unwrap_or("no notice")),
    };
    Ok((notice, text))
}

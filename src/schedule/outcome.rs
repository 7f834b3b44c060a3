//! The outcome policy: per-recipient outcomes plus a message's age turned into delivered, retry,
//! delay notice or bounce, and the backscatter rule. Pure functions.

use super::*;

/// What settling one message decided.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    /// Recipients that failed for good and want a failure notice.
    pub bounce: Vec<ReportedRecipient>,
    /// Recipients still pending that want a delay notice now.
    pub delay: Vec<ReportedRecipient>,
    /// No recipient is pending: the message leaves the spool.
    pub done: bool,
}

/// Applies one attempt's outcomes to an envelope and decides what follows (pure: `now` is given).
pub fn apply_outcomes(
    config: &Config,
    envelope: &mut Envelope,
    outcomes: &[(String, RcptOutcome)],
    now: i64,
) -> Verdict {
    let mut verdict = Verdict::default();
    for (address, outcome) in outcomes {
        let Some(rcpt) = envelope
            .recipients
            .iter_mut()
            .find(|r| r.status == RecipientStatus::Pending && r.address.eq_ignore_ascii_case(address))
        else {
            continue;
        };
        let event = record_outcome(rcpt, outcome, &mut verdict);
        envelope.history.push(crate::spool::HistoryEntry { at: now, event });
    }
    envelope.attempts += 1;
    let age = Duration::from_micros(u64::try_from(now.saturating_sub(envelope.arrived)).unwrap_or(0));
    if !envelope.is_done() && age >= config.queue.max_lifetime.0 {
        expire(config, envelope, now, &mut verdict);
    } else if !envelope.is_done() && age >= config.queue.warn_after.0 && !envelope.delay_notified {
        envelope.delay_notified = true;
        verdict.delay =
            envelope.pending().filter(|r| r.wants(DsnNotify::Delay)).map(|r| reported(r, &pending_detail(r))).collect();
    }
    let wait = backoff(envelope.attempts, config.queue.first_retry.0, config.queue.retry_interval.0);
    envelope.next_attempt = now + i64::try_from(wait.as_micros()).unwrap_or(i64::MAX / 2);
    verdict.done = envelope.is_done();
    // Never answer the null sender or a notice of our own (RFC 3461 6.2, RFC 3834 2).
    if envelope.sender.is_empty() || envelope.generated {
        verdict.bounce.clear();
        verdict.delay.clear();
    }
    verdict
}

/// Records one recipient's outcome; returns the history line.
pub(super) fn record_outcome(rcpt: &mut Recipient, outcome: &RcptOutcome, verdict: &mut Verdict) -> String {
    match outcome {
        RcptOutcome::Delivered(detail) => {
            rcpt.status = RecipientStatus::Delivered;
            rcpt.last_error = None;
            rcpt.remote_mta = detail.remote_mta.clone();
            format!("delivered to <{}>: {}", rcpt.address, detail.text)
        }
        RcptOutcome::PermFail(detail) => {
            rcpt.status = RecipientStatus::Failed;
            rcpt.last_error = Some(detail.text.clone());
            rcpt.remote_mta = detail.remote_mta.clone();
            if rcpt.wants(DsnNotify::Failure) {
                verdict.bounce.push(reported(rcpt, detail));
            }
            format!("failed <{}>: {}", rcpt.address, detail.text)
        }
        RcptOutcome::TempFail(detail) | RcptOutcome::Loop(detail) => {
            rcpt.last_error = Some(detail.text.clone());
            rcpt.remote_mta = detail.remote_mta.clone();
            format!("deferred <{}>: {}", rcpt.address, detail.text)
        }
    }
}

/// The lifetime is over: every pending recipient fails with 4.4.7 (RFC 3463) and the last error.
pub(super) fn expire(config: &Config, envelope: &mut Envelope, now: i64, verdict: &mut Verdict) {
    let lifetime = crate::config::HumanDuration(config.queue.max_lifetime.0);
    for rcpt in envelope.recipients.iter_mut().filter(|r| r.status == RecipientStatus::Pending) {
        let last = rcpt.last_error.clone().unwrap_or_else(|| "no attempt succeeded".into());
        // RFC 8689 5: a REQUIRETLS message kept back by its requirement is returned with 5.7.10.
        let status = crate::deliver::client::requiretls_expiry_status(envelope.requiretls, &last).unwrap_or("4.4.7");
        let detail = Detail {
            status: status.into(),
            text: format!("message expired after {lifetime} in the queue; last error: {last}"),
            remote_mta: rcpt.remote_mta.clone(),
            diagnostic: None,
            session: false,
        };
        rcpt.status = RecipientStatus::Failed;
        rcpt.last_error = Some(detail.text.clone());
        if rcpt.wants(DsnNotify::Failure) {
            verdict.bounce.push(reported(rcpt, &detail));
        }
    }
    envelope.history.push(crate::spool::HistoryEntry { at: now, event: format!("expired after {lifetime}") });
}

pub(super) fn pending_detail(rcpt: &Recipient) -> Detail {
    Detail {
        status: "4.4.1".into(),
        text: rcpt.last_error.clone().unwrap_or_else(|| "not yet delivered".into()),
        remote_mta: rcpt.remote_mta.clone(),
        diagnostic: None,
        session: false,
    }
}

pub(super) fn reported(rcpt: &Recipient, detail: &Detail) -> ReportedRecipient {
    ReportedRecipient {
        address: rcpt.address.clone(),
        orcpt: rcpt.orcpt.clone(),
        status: detail.status.clone(),
        diagnostic: detail.diagnostic.clone(),
        remote_mta: detail.remote_mta.clone(),
        text: detail.text.clone(),
        last_attempt: Some(SystemTime::now()),
    }
}

/// Issue 6: no notice to a sender that may be forged. When SPF failed or soft-failed (or said nothing,
/// with `smtp.bounce_unverified = "hold"`) and no aligned DKIM signature verified, the notices are
/// dropped; a message with nothing left to deliver is then kept held, counted and visible, and
/// removed once the queue lifetime is over ([`sweep_suppressed`]).
pub fn suppress_backscatter(config: &Config, envelope: &mut Envelope, verdict: &mut Verdict) {
    if verdict.bounce.is_empty() && verdict.delay.is_empty() && !envelope.bounce_suppressed {
        return;
    }
    if crate::auth::may_bounce(envelope.sender_auth.as_ref(), config.smtp.bounce_unverified) {
        return;
    }
    if !verdict.bounce.is_empty() {
        let spf = envelope.sender_auth.as_ref().map(|a| a.spf);
        tracing::warn!(queue_id = %envelope.id, from = %envelope.sender, ?spf, failed = verdict.bounce.len(),
            "failure notice not sent: the sender may be forged (backscatter)");
        envelope.record(format!(
            "failure notice to <{}> not sent: sender not authenticated (SPF {spf:?})",
            envelope.sender
        ));
        envelope.bounce_suppressed = true;
    }
    verdict.bounce.clear();
    verdict.delay.clear();
    if verdict.done && envelope.bounce_suppressed {
        verdict.done = false;
        envelope.held = true;
    }
}

use super::*;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR_MICROS: i64 = 3_600_000_000;

fn config() -> Config {
    Config::parse("[relay]\ndomains = [\"example.test\"]\n", "t.toml").expect("config")
}

fn envelope(sender: &str, rcpts: &[&str]) -> Envelope {
    Envelope::new(
        "0000000000001000".into(),
        sender.into(),
        rcpts.iter().map(|r| Recipient::new(r.to_string())).collect(),
    )
}

fn detail(status: &str, text: &str) -> Detail {
    Detail {
        status: status.into(),
        text: text.into(),
        remote_mta: Some("primary.example.test".into()),
        diagnostic: None,
        session: false,
    }
}

fn outcome(rcpt: &str, o: RcptOutcome) -> (String, RcptOutcome) {
    (rcpt.to_string(), o)
}

#[test]
fn backoff_starts_small_and_grows_to_the_interval() {
    let max = 30 * MINUTE;
    assert_eq!(backoff(1, MINUTE, max), MINUTE);
    assert_eq!(backoff(2, MINUTE, max), 2 * MINUTE);
    assert_eq!(backoff(3, MINUTE, max), 4 * MINUTE);
    assert_eq!(backoff(5, MINUTE, max), 16 * MINUTE);
    assert_eq!(backoff(6, MINUTE, max), max);
    assert_eq!(backoff(1000, MINUTE, max), max);
}

#[test]
fn delivered_message_is_done() {
    let config = config();
    let mut env = envelope("a@s.test", &["b@example.test"]);
    let now = env.arrived + 1000;
    let verdict = apply_outcomes(
        &config,
        &mut env,
        &[outcome("B@example.test", RcptOutcome::Delivered(detail("2.0.0", "250 ok")))],
        now,
    );
    assert!(verdict.done);
    assert!(verdict.bounce.is_empty());
    assert_eq!(env.recipients[0].status, RecipientStatus::Delivered);
    assert_eq!(env.attempts, 1);
}

#[test]
fn permanent_failure_bounces_only_that_recipient() {
    let config = config();
    let mut env = envelope("a@s.test", &["b@example.test", "c@example.test"]);
    let now = env.arrived + 1000;
    let verdict = apply_outcomes(
        &config,
        &mut env,
        &[
            outcome("b@example.test", RcptOutcome::PermFail(detail("5.1.1", "RCPT TO: 550 5.1.1 no such user"))),
            outcome("c@example.test", RcptOutcome::TempFail(detail("4.2.0", "RCPT TO: 450 busy"))),
        ],
        now,
    );
    assert!(!verdict.done);
    assert_eq!(verdict.bounce.len(), 1);
    assert_eq!(verdict.bounce[0].address, "b@example.test");
    assert_eq!(verdict.bounce[0].status, "5.1.1");
    assert_eq!(env.recipients[0].status, RecipientStatus::Failed);
    assert_eq!(env.recipients[1].status, RecipientStatus::Pending);
    assert_eq!(env.last_error(), Some("RCPT TO: 450 busy"));
    assert_eq!(env.next_attempt, now + 60_000_000);
}

#[test]
fn deferral_keeps_the_error_and_backs_off() {
    let config = config();
    let mut env = envelope("a@s.test", &["b@example.test"]);
    env.attempts = 2;
    let now = env.arrived + 1000;
    let loop_text = "MX list for example.test points back to backup.example.test";
    let verdict = apply_outcomes(
        &config,
        &mut env,
        &[outcome("b@example.test", RcptOutcome::Loop(detail("4.4.6", loop_text)))],
        now,
    );
    assert!(!verdict.done && verdict.bounce.is_empty() && verdict.delay.is_empty());
    assert_eq!(env.last_error(), Some(loop_text));
    assert_eq!(env.next_attempt, now + 4 * 60_000_000);
}

#[test]
fn one_delay_notice_after_warn_after() {
    let config = config();
    let mut env = envelope("a@s.test", &["b@example.test"]);
    let now = env.arrived + 5 * HOUR_MICROS;
    let temp = [outcome("b@example.test", RcptOutcome::TempFail(detail("4.4.1", "connect to primary: refused")))];
    let verdict = apply_outcomes(&config, &mut env, &temp, now);
    assert_eq!(verdict.delay.len(), 1);
    assert!(env.delay_notified);
    let verdict = apply_outcomes(&config, &mut env, &temp, now + HOUR_MICROS);
    assert!(verdict.delay.is_empty(), "only one delay notice per message");
}

#[test]
fn expiry_fails_every_pending_recipient() {
    let config = config();
    let mut env = envelope("a@s.test", &["b@example.test"]);
    let now = env.arrived + 5 * 24 * HOUR_MICROS + 1;
    let temp = [outcome("b@example.test", RcptOutcome::TempFail(detail("4.4.1", "connect: refused")))];
    let verdict = apply_outcomes(&config, &mut env, &temp, now);
    assert!(verdict.done);
    assert_eq!(verdict.bounce.len(), 1);
    assert_eq!(verdict.bounce[0].status, "4.4.7");
    assert!(verdict.bounce[0].text.contains("connect: refused"), "{}", verdict.bounce[0].text);
}

#[test]
fn no_dsn_to_the_null_sender_or_for_notify_never() {
    let config = config();
    let fail = [outcome("b@example.test", RcptOutcome::PermFail(detail("5.1.1", "550 no")))];
    let mut bounce_of_bounce = envelope("", &["b@example.test"]);
    let now = bounce_of_bounce.arrived + 1;
    assert!(apply_outcomes(&config, &mut bounce_of_bounce, &fail, now).bounce.is_empty());
    let mut never = envelope("a@s.test", &["b@example.test"]);
    never.recipients[0].notify = Some(vec![DsnNotify::Never]);
    let verdict = apply_outcomes(&config, &mut never, &fail, now);
    assert!(verdict.bounce.is_empty() && verdict.done);
    let mut success_only = envelope("a@s.test", &["b@example.test"]);
    success_only.recipients[0].notify = Some(vec![DsnNotify::Success]);
    assert!(apply_outcomes(&config, &mut success_only, &fail, now).bounce.is_empty());
}

#[test]
fn outcomes_for_unknown_or_settled_recipients_are_ignored() {
    let config = config();
    let mut env = envelope("a@s.test", &["b@example.test"]);
    env.recipients[0].status = RecipientStatus::Delivered;
    let now = env.arrived + 1;
    let verdict = apply_outcomes(
        &config,
        &mut env,
        &[
            outcome("b@example.test", RcptOutcome::PermFail(detail("5.1.1", "550"))),
            outcome("x@example.test", RcptOutcome::PermFail(detail("5.1.1", "550"))),
        ],
        now,
    );
    assert!(verdict.done && verdict.bounce.is_empty());
    assert_eq!(env.recipients[0].status, RecipientStatus::Delivered);
}

#[tokio::test]
async fn a_message_with_too_many_received_headers_bounces_as_a_loop() {
    let queue = crate::spool::MemoryQueue::new();
    let job = |hops: usize| {
        let mut text = String::new();
        for hop in 0..hops {
            text += &format!("Received: from hop{hop}.test\r\n\tby next.test; Sun, 29 Nov 2026 10:00:00 +0000\r\n");
        }
        text += "Subject: loop\r\n\r\nreceived: in the body does not count\r\n";
        let mut message = Arc::clone(&queue).incoming(&queue.new_id()).expect("incoming");
        message.write(text.as_bytes()).expect("write");
        let envelope = message.commit(envelope("a@s.test", &["b@example.test", "c@other.test"])).expect("commit");
        Job { envelope, queue: Arc::clone(&queue) as Arc<dyn Queue> }
    };
    // Ours plus 50 is fine (the SMTP server refuses more at DATA); ours plus 51 is a loop.
    let (kept, looped) = split_loops("example.test", vec![job(51), job(52)], 50).await;
    assert_eq!(kept.len(), 1);
    assert_eq!(looped.len(), 1);
    assert_eq!(looped[0].outcomes.len(), 1, "only the batch's domain");
    let (address, outcome) = &looped[0].outcomes[0];
    assert_eq!(address, "b@example.test");
    assert!(matches!(outcome, RcptOutcome::PermFail(d) if d.status == "5.4.6" && d.text.contains("51 Received")));
}

mod backscatter {
    use super::super::*;
    use crate::spool::{SenderAuth, SpfVerdict};

    fn failed_message(spf: Option<SpfVerdict>, dkim: bool) -> (Config, Envelope, Verdict) {
        let config = Config::demo();
        let mut envelope = Envelope::new(
            "0005F2A1B3C4D000".into(),
            "forged@sender.test".into(),
            vec![Recipient::new("a@example.test".into())],
        );
        envelope.sender_auth = spf.map(|spf| SenderAuth { spf, dkim_aligned: dkim, dkim_domain: None });
        let detail = Detail {
            status: "5.1.1".into(),
            text: "RCPT TO: 550 5.1.1 no such user".into(),
            remote_mta: None,
            diagnostic: None,
            session: false,
        };
        let outcomes = vec![("a@example.test".to_string(), RcptOutcome::PermFail(detail))];
        let now = envelope.arrived;
        let verdict = apply_outcomes(&config, &mut envelope, &outcomes, now);
        (config, envelope, verdict)
    }

    #[test]
    fn spf_fail_keeps_the_message_held_instead_of_bouncing() {
        let (config, mut envelope, mut verdict) = failed_message(Some(SpfVerdict::Fail), false);
        assert_eq!(verdict.bounce.len(), 1);
        assert!(verdict.done);
        suppress_backscatter(&config, &mut envelope, &mut verdict);
        assert!(verdict.bounce.is_empty());
        assert!(!verdict.done, "kept, not removed");
        assert!(envelope.held && envelope.bounce_suppressed);
    }

    #[test]
    fn pass_aligned_dkim_and_unchecked_senders_get_their_bounce() {
        for (spf, dkim) in [
            (Some(SpfVerdict::Pass), false),
            (Some(SpfVerdict::Softfail), true),
            (None, false),
            (Some(SpfVerdict::None), false),
        ] {
            let (config, mut envelope, mut verdict) = failed_message(spf, dkim);
            suppress_backscatter(&config, &mut envelope, &mut verdict);
            assert_eq!(verdict.bounce.len(), 1, "{spf:?} {dkim}");
            assert!(verdict.done && !envelope.held);
        }
    }

    #[test]
    fn kept_messages_are_swept_after_the_lifetime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spool, _) = crate::spool::Spool::open(dir.path()).expect("spool");
        let spool: Arc<dyn Queue> = Arc::new(spool);
        let (config, mut envelope, mut verdict) = failed_message(Some(SpfVerdict::Softfail), false);
        suppress_backscatter(&config, &mut envelope, &mut verdict);
        let id = spool.new_id();
        let mut message = std::sync::Arc::clone(&spool).incoming(&id).expect("incoming");
        message.write(b"Subject: x\r\n\r\nbody\r\n").expect("write");
        message.commit(envelope.clone()).expect("commit");
        assert_eq!(suppressed_bounces(spool.as_ref()), 1);
        let arrived = spool.get(&id).expect("queued").arrived;
        assert_eq!(sweep_suppressed(&config, spool.as_ref(), arrived + 1_000_000), 0, "lifetime not over");
        let later = arrived + i64::try_from(config.queue.max_lifetime.0.as_micros()).expect("fits") + 1;
        assert_eq!(sweep_suppressed(&config, spool.as_ref(), later), 1);
        assert_eq!(suppressed_bounces(spool.as_ref()), 0);
    }
}

/// One settle runs at a time; what arrives meanwhile waits and goes in the next one, and the
/// generations tell a finished batch when its results are durable.
#[tokio::test]
async fn settler_groups_what_arrives_while_one_runs() {
    let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut settler = Settler::default();
    let work = |seen: Arc<std::sync::Mutex<Vec<usize>>>, gate: Option<std::sync::mpsc::Receiver<()>>| {
        move |batch: Outcomes| {
            if let Some(gate) = gate {
                let _ = gate.recv();
            }
            lock(&seen).push(batch.len());
            batch.into_iter().map(|(id, _)| (id, 7)).collect()
        }
    };
    settler.waiting.push(("a".into(), Vec::new()));
    settler.start(work(seen.clone(), Some(gate_rx)));
    assert_eq!((settler.started, settler.finished, settler.backlog()), (1, 0, 1));
    // While the first runs, two more arrive; starting again does nothing.
    settler.waiting.push(("b".into(), Vec::new()));
    settler.waiting.push(("c".into(), Vec::new()));
    settler.start(work(seen.clone(), None));
    assert_eq!(settler.started, 1);
    assert_eq!(settler.covering(), 2, "b and c are covered by the next settle");
    assert_eq!(settler.backlog(), 3);
    gate_tx.send(()).expect("gate");
    let within = Duration::from_secs(10);
    let (ids, next) = tokio::time::timeout(within, settler.done()).await.expect("first settle");
    assert_eq!((ids, next), (vec!["a".to_string()], vec![("a".to_string(), 7)]));
    assert_eq!(settler.finished, 1);
    settler.start(work(seen.clone(), None));
    let (ids, _) = tokio::time::timeout(within, settler.done()).await.expect("second settle");
    assert_eq!(ids, vec!["b".to_string(), "c".to_string()]);
    assert_eq!((settler.finished, settler.covering(), settler.backlog()), (2, 2, 0));
    assert_eq!(*lock(&seen), vec![1, 2]);
    // Nothing runs: `done` never finishes (select! polls it alongside the rest).
    assert!(tokio::time::timeout(Duration::from_millis(50), settler.done()).await.is_err());
}

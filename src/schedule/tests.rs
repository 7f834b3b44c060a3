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
            batch.into_iter().map(|(id, _, _)| (id, 7)).collect()
        }
    };
    settler.waiting.push(("a".into(), Vec::new(), None));
    settler.start(work(seen.clone(), Some(gate_rx)));
    assert_eq!((settler.started, settler.finished, settler.backlog()), (1, 0, 1));
    // While the first runs, two more arrive; starting again does nothing.
    settler.waiting.push(("b".into(), Vec::new(), None));
    settler.waiting.push(("c".into(), Vec::new(), None));
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

/// The scheduler run whole, over the in-memory store with a scripted courier, on paused time.
mod runs {
    use super::*;
    use crate::deliver::Courier;
    use crate::spool::MemoryQueue;
    use std::future::Future;
    use std::pin::Pin;

    /// How the scripted destination answers a recipient.
    #[derive(Clone, Copy, PartialEq, Debug)]
    pub(super) enum Answer {
        Accept,
        /// A 4xx for this recipient while the session works (a greylist, a full mailbox).
        DeferRecipient,
        /// No session: connection refused.
        Refuse,
    }

    /// How the script answers a recipient address.
    type Script = Box<dyn FnMut(&str) -> Answer + Send>;

    /// A courier that answers from a script and logs every attempt, in order.
    pub(super) struct ScriptedCourier {
        script: std::sync::Mutex<Script>,
        attempts: std::sync::Mutex<Vec<(QueueId, String)>>,
        /// A domain whose batches take this long (virtual time) before the first answer.
        slow: Option<(String, Duration)>,
    }

    impl ScriptedCourier {
        pub(super) fn new(script: impl FnMut(&str) -> Answer + Send + 'static) -> Arc<ScriptedCourier> {
            Arc::new(ScriptedCourier {
                script: std::sync::Mutex::new(Box::new(script)),
                attempts: Default::default(),
                slow: None,
            })
        }

        pub(super) fn slow_for(domain: &str, delay: Duration) -> Arc<ScriptedCourier> {
            Self::slow_with(domain, delay, |_| Answer::Accept)
        }

        pub(super) fn slow_with(
            domain: &str,
            delay: Duration,
            script: impl FnMut(&str) -> Answer + Send + 'static,
        ) -> Arc<ScriptedCourier> {
            Arc::new(ScriptedCourier {
                script: std::sync::Mutex::new(Box::new(script)),
                attempts: Default::default(),
                slow: Some((domain.to_string(), delay)),
            })
        }

        pub(super) fn tries_of(&self, id: &str) -> usize {
            lock(&self.attempts).iter().filter(|(i, _)| i == id).count()
        }

        pub(super) fn order(&self) -> Vec<QueueId> {
            lock(&self.attempts).iter().map(|(id, _)| id.clone()).collect()
        }
    }

    impl Courier for ScriptedCourier {
        fn deliver_batch<'a>(
            &'a self,
            domain: &'a str,
            jobs: Vec<Job>,
            progress: mpsc::UnboundedSender<(String, JobResult)>,
        ) -> Pin<Box<dyn Future<Output = Vec<JobResult>> + Send + 'a>> {
            Box::pin(async move {
                if let Some((slow, delay)) = &self.slow
                    && slow == domain
                {
                    tokio::time::sleep(*delay).await;
                }
                for job in jobs {
                    let mut outcomes = Vec::new();
                    for rcpt in job.envelope.pending().filter(|r| r.domain() == domain) {
                        let answer = (lock(&self.script))(&rcpt.address);
                        lock(&self.attempts).push((job.envelope.id.clone(), rcpt.address.clone()));
                        let mut d = detail("2.0.0", "250 ok");
                        let outcome = match answer {
                            Answer::Accept => RcptOutcome::Delivered(d),
                            Answer::DeferRecipient => {
                                d.status = "4.2.2".into();
                                d.text = "RCPT TO: 452 4.2.2 mailbox full".into();
                                RcptOutcome::TempFail(d)
                            }
                            Answer::Refuse => RcptOutcome::TempFail(Detail {
                                status: "4.4.1".into(),
                                text: "connect to 127.0.0.2:25: Connection refused".into(),
                                remote_mta: None,
                                diagnostic: None,
                                session: true,
                            }),
                        };
                        outcomes.push((rcpt.address.clone(), outcome));
                    }
                    let _ = progress.send((domain.to_string(), JobResult { id: job.envelope.id.clone(), outcomes }));
                }
                Vec::new()
            })
        }

        fn close_idle(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            Box::pin(async {})
        }
    }

    pub(super) fn config(strict_order: bool) -> Arc<Config> {
        let mut config = Config::demo();
        config.relay.domains = vec!["example.test".into()];
        config.queue.first_retry = crate::config::HumanDuration(Duration::from_secs(60));
        config.queue.retry_interval = crate::config::HumanDuration(Duration::from_secs(3600));
        let policy = crate::config::DomainConfig { strict_order, ..Default::default() };
        config.domain.insert("example.test".into(), policy);
        Arc::new(config)
    }

    fn submit(queue: &Arc<MemoryQueue>, rcpt: &str) -> QueueId {
        let id = queue.new_id();
        let mut message = Arc::clone(queue).incoming(&id).expect("incoming");
        message.write(b"Subject: test\r\n\r\nbody\r\n").expect("write");
        message.commit(envelope("a@sender.test", &[rcpt])).expect("commit");
        id
    }

    /// Starts the scheduler; returns its handle and the sender that stops it.
    pub(super) fn start(
        config: Arc<Config>,
        queue: &Arc<MemoryQueue>,
        courier: &Arc<ScriptedCourier>,
    ) -> (SchedulerHandle, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let queue: Arc<dyn Queue> = Arc::clone(queue) as Arc<dyn Queue>;
        let (scheduler, handle) = Scheduler::new(config, queue, Arc::clone(courier) as Arc<dyn Courier>);
        let (stop, stopped) = watch::channel(false);
        (handle, stop, tokio::spawn(scheduler.run(stopped)))
    }

    /// Lets virtual time pass in small steps until `done` holds (at most `limit` of virtual time).
    pub(super) async fn until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        done()
    }

    /// strict_order: a message the primary defers for one recipient keeps its own backoff; later
    /// mail goes on without it, and it is not carried along in their batches.
    #[tokio::test(start_paused = true)]
    async fn a_message_deferred_for_a_recipient_does_not_hold_back_later_mail() {
        let queue = MemoryQueue::new();
        let courier =
            ScriptedCourier::new(
                |rcpt| if rcpt.starts_with("full@") { Answer::DeferRecipient } else { Answer::Accept },
            );
        let deferred = submit(&queue, "full@example.test");
        let (handle, stop, task) = start(config(true), &queue, &courier);
        assert!(until(Duration::from_secs(5), || courier.tries_of(&deferred) == 1).await);
        // Later mail, one message at a time, within the deferred message's first retry (60 s).
        let mut later = Vec::new();
        for _ in 0..5 {
            let id = submit(&queue, "bob@example.test");
            handle.queued(&id);
            later.push(id.clone());
            assert!(until(Duration::from_secs(5), || queue.get(&id).is_none()).await, "later mail was held back");
        }
        assert_eq!(courier.tries_of(&deferred), 1, "carried along in later batches: {:?}", courier.order());
        // Its own retry comes at its backoff, once.
        assert!(until(Duration::from_secs(90), || courier.tries_of(&deferred) == 2).await);
        assert!(!until(Duration::from_secs(100), || courier.tries_of(&deferred) > 2).await, "retried too often");
        let state = handle.destinations().get("example.test").cloned().expect("a destination state");
        assert!(state.failing_since.is_none(), "a recipient's 4xx does not make the destination fail: {state:?}");
        let _ = stop.send(true);
        let _ = task.await;
    }

    /// The destination fails only when sessions fail; when it answers again its backlog is flushed at
    /// once (not at each message's backoff), oldest first under strict order.
    #[tokio::test(start_paused = true)]
    async fn a_destination_that_comes_back_gets_its_backlog_at_once_in_order() {
        let queue = MemoryQueue::new();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::clone(&up);
        let courier = ScriptedCourier::new(move |_| {
            if seen.load(std::sync::atomic::Ordering::SeqCst) { Answer::Accept } else { Answer::Refuse }
        });
        let backlog: Vec<QueueId> = (0..3).map(|_| submit(&queue, "bob@example.test")).collect();
        let (handle, stop, task) = start(config(true), &queue, &courier);
        assert!(until(Duration::from_secs(5), || backlog.iter().all(|id| courier.tries_of(id) == 1)).await);
        let state = handle.destinations().get("example.test").cloned().expect("a destination state");
        assert!(state.failing_since.is_some(), "refused connections make it fail: {state:?}");
        // While it is down, an arrival within first_retry waits behind the backlog.
        let arrival = submit(&queue, "carol@example.test");
        handle.queued(&arrival);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(courier.tries_of(&arrival), 0, "an arrival overtook the backlog");
        up.store(true, std::sync::atomic::Ordering::SeqCst);
        // At the backlog's retry (60 s) the whole backlog and the arrival go, oldest first.
        assert!(until(Duration::from_secs(120), || queue.is_empty()).await, "the backlog was not delivered");
        let delivered: Vec<QueueId> = courier.order().into_iter().skip(3).collect();
        let mut expected = backlog.clone();
        expected.push(arrival);
        assert_eq!(delivered, expected, "arrival order at the primary");
        assert!(handle.destinations()["example.test"].failing_since.is_none());
        let _ = stop.send(true);
        let _ = task.await;
    }

    /// A destination that is back is flushed: mail deferred by the outage goes at once, not at its
    /// (doubling) backoff, as soon as one new message gets through.
    #[tokio::test(start_paused = true)]
    async fn the_first_delivery_after_an_outage_flushes_the_domain() {
        let queue = MemoryQueue::new();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::clone(&up);
        let courier = ScriptedCourier::new(move |_| {
            if seen.load(std::sync::atomic::Ordering::SeqCst) { Answer::Accept } else { Answer::Refuse }
        });
        let old = submit(&queue, "bob@example.test");
        let (handle, stop, task) = start(config(false), &queue, &courier);
        // Two failed attempts: the next retry is 120 s after the second.
        assert!(until(Duration::from_secs(90), || courier.tries_of(&old) == 2).await);
        up.store(true, std::sync::atomic::Ordering::SeqCst);
        let new = submit(&queue, "carol@example.test");
        handle.queued(&new);
        assert!(until(Duration::from_secs(10), || queue.is_empty()).await, "the old message waited for its backoff");
        let _ = stop.send(true);
        let _ = task.await;
    }

    /// Bounces to a sender's domain give that domain no destination state.
    #[tokio::test(start_paused = true)]
    async fn only_relayed_domains_get_a_destination_state() {
        let queue = MemoryQueue::new();
        let courier = ScriptedCourier::new(|_| Answer::Refuse);
        let id = submit(&queue, "someone@sender.test");
        let (handle, stop, task) = start(config(false), &queue, &courier);
        assert!(until(Duration::from_secs(5), || courier.tries_of(&id) == 1).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(handle.destinations().is_empty(), "{:?}", handle.destinations());
        let _ = stop.send(true);
        let _ = task.await;
    }

    /// A store whose removal of one message waits until the courier has tried another: the
    /// scheduler must go on delivering while an operator's delete does its disk work.
    struct SlowRemoval {
        inner: Arc<MemoryQueue>,
        courier: Arc<ScriptedCourier>,
        slow: QueueId,
        other: QueueId,
        went_on: std::sync::atomic::AtomicBool,
    }

    impl Queue for SlowRemoval {
        fn new_id(&self) -> QueueId {
            self.inner.new_id()
        }
        fn incoming(self: Arc<Self>, id: &str) -> Result<Box<dyn spool::Incoming>, SpoolError> {
            Arc::clone(&self.inner).incoming(id)
        }
        fn get(&self, id: &str) -> Option<Envelope> {
            self.inner.get(id)
        }
        fn visit(&self, f: &mut dyn FnMut(&Envelope)) {
            self.inner.visit(f)
        }
        fn update(&self, envelopes: &[Envelope]) -> Result<(), SpoolError> {
            self.inner.update(envelopes)
        }
        fn note(&self, envelopes: Vec<Envelope>) {
            self.inner.note(envelopes)
        }
        fn persist(&self) -> Result<usize, SpoolError> {
            self.inner.persist()
        }
        fn remove(&self, ids: &[QueueId]) -> Result<(), SpoolError> {
            if ids.contains(&self.slow) {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while std::time::Instant::now() < deadline && self.courier.tries_of(&self.other) == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let went_on = self.courier.tries_of(&self.other) > 0;
                self.went_on.store(went_on, std::sync::atomic::Ordering::SeqCst);
            }
            self.inner.remove(ids)
        }
        fn open_body(&self, id: &str) -> Result<spool::MessageBody, SpoolError> {
            self.inner.open_body(id)
        }
        fn space(&self) -> Result<spool::SpaceInfo, SpoolError> {
            self.inner.space()
        }
        fn document(&self, name: &str) -> Result<Option<(i64, Vec<u8>)>, SpoolError> {
            self.inner.document(name)
        }
        fn replace_document(&self, name: &str, seen: Option<i64>, body: Vec<u8>) -> Result<bool, SpoolError> {
            self.inner.replace_document(name, seen, body)
        }
    }

    /// An operator's delete runs its disk work off the scheduler's loop (issue 12, section 4):
    /// while it waits for the disk, mail that arrives meanwhile is still delivered.
    #[tokio::test(start_paused = true)]
    async fn delivery_goes_on_while_a_delete_waits_for_the_disk() {
        let inner = MemoryQueue::new();
        let courier = ScriptedCourier::new(|_| Answer::Accept);
        let mut held = envelope("a@sender.test", &["bob@example.test"]);
        held.held = true;
        let slow = inner.new_id();
        let mut message = Arc::clone(&inner).incoming(&slow).expect("incoming");
        message.write(b"Subject: held\r\n\r\nbody\r\n").expect("write");
        message.commit(held).expect("commit");
        let other = inner.new_id();
        let queue = Arc::new(SlowRemoval {
            inner: Arc::clone(&inner),
            courier: Arc::clone(&courier),
            slow: slow.clone(),
            other: other.clone(),
            went_on: Default::default(),
        });
        let (scheduler, handle) = Scheduler::new(
            config(false),
            Arc::clone(&queue) as Arc<dyn Queue>,
            Arc::clone(&courier) as Arc<dyn Courier>,
        );
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(scheduler.run(stopped));
        let deleting = tokio::spawn({
            let handle = handle.clone();
            let slow = slow.clone();
            async move { handle.delete(&slow).await }
        });
        tokio::task::yield_now().await;
        let mut message = Arc::clone(&inner).incoming(&other).expect("incoming");
        message.write(b"Subject: later\r\n\r\nbody\r\n").expect("write");
        message.commit(envelope("a@sender.test", &["carol@example.test"])).expect("commit");
        handle.queued(&other);
        assert!(until(Duration::from_secs(10), || deleting.is_finished()).await, "the delete never finished");
        deleting.await.expect("join").expect("deleted");
        assert!(queue.went_on.load(std::sync::atomic::Ordering::SeqCst), "delivery stopped while the delete ran");
        assert!(inner.get(&slow).is_none());
        let _ = stop.send(true);
        let _ = task.await;
    }
}

/// The timetable is a window of the queue (issue 12, section 3): the scheduler reads due mail
/// from the store a bounded batch at a time, and a busy domain's lane keeps two batches' worth.
mod window {
    use super::runs::{Answer, ScriptedCourier, config, start, until};
    use super::*;
    use crate::spool::MemoryQueue;

    fn submit_to(queue: &Arc<MemoryQueue>, rcpt: &str, next_attempt: Option<i64>) -> QueueId {
        let id = queue.new_id();
        let mut message = Arc::clone(queue).incoming(&id).expect("incoming");
        message.write(b"Subject: test\r\n\r\nbody\r\n").expect("write");
        let mut envelope = envelope("a@sender.test", &[rcpt]);
        if let Some(at) = next_attempt {
            envelope.next_attempt = at;
        }
        message.commit(envelope).expect("commit");
        id
    }

    /// More than the timetable reads at once and than a lane keeps: every message is delivered
    /// once, in arrival order.
    #[tokio::test(start_paused = true)]
    async fn a_backlog_larger_than_the_window_goes_once_each_in_arrival_order() {
        let queue = MemoryQueue::new();
        let courier = ScriptedCourier::new(|_| Answer::Accept);
        let ids: Vec<QueueId> =
            (0..REFILL + LANE_CAP + 7).map(|_| submit_to(&queue, "bob@example.test", None)).collect();
        let (_handle, stop, task) = start(config(false), &queue, &courier);
        assert!(until(Duration::from_secs(120), || queue.is_empty()).await, "{} left", queue.len());
        assert_eq!(courier.order(), ids, "each once, oldest first");
        let _ = stop.send(true);
        let _ = task.await;
    }

    /// A flush after an outage: messages deferred beyond the window are made due in the store and
    /// read back a batch at a time, oldest first, each tried once more.
    #[tokio::test(start_paused = true)]
    async fn a_flush_brings_back_mail_deferred_beyond_the_window() {
        let queue = MemoryQueue::new();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let courier = ScriptedCourier::new({
            let up = Arc::clone(&up);
            move |_| if up.load(std::sync::atomic::Ordering::SeqCst) { Answer::Accept } else { Answer::Refuse }
        });
        let n = REFILL + 100;
        let ids: Vec<QueueId> = (0..n).map(|_| submit_to(&queue, "bob@example.test", None)).collect();
        let (handle, stop, task) = start(config(false), &queue, &courier);
        assert!(until(Duration::from_secs(60), || courier.order().len() == n).await, "all tried once");
        up.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(courier.order().len(), n, "deferred by the first retry, not tried again");
        assert_eq!(handle.flush(None).await.expect("flush"), n);
        assert!(until(Duration::from_secs(60), || queue.is_empty()).await, "{} left", queue.len());
        assert_eq!(courier.order()[n..], ids[..], "after the flush, oldest first, each once");
        let _ = stop.send(true);
        let _ = task.await;
    }

    /// Mail due long after the window's end stays in the store and is tried when its time comes.
    #[tokio::test(start_paused = true)]
    async fn mail_due_beyond_the_window_is_tried_at_its_time() {
        let queue = MemoryQueue::new();
        let courier = ScriptedCourier::new(|_| Answer::Accept);
        let later = submit_to(&queue, "bob@example.test", Some(now() + 20 * 60_000_000));
        let (_handle, stop, task) = start(config(false), &queue, &courier);
        assert!(!until(Duration::from_secs(19 * 60), || courier.tries_of(&later) > 0).await, "tried early");
        assert!(until(Duration::from_secs(3 * 60), || courier.tries_of(&later) == 1).await, "not tried in time");
        let _ = stop.send(true);
        let _ = task.await;
    }

    /// A slow destination with a backlog larger than its lane does not hold back another
    /// domain's mail that arrived after all of it.
    #[tokio::test(start_paused = true)]
    async fn a_slow_domains_backlog_does_not_hold_back_another_domain() {
        let queue = MemoryQueue::new();
        let courier = ScriptedCourier::slow_for("example.test", Duration::from_secs(30));
        for _ in 0..REFILL * 2 {
            submit_to(&queue, "bob@example.test", None);
        }
        let other = submit_to(&queue, "carol@other.test", None);
        let mut config = (*config(false)).clone();
        config.relay.domains.push("other.test".into());
        let (_handle, stop, task) = start(Arc::new(config), &queue, &courier);
        assert!(until(Duration::from_secs(5), || courier.tries_of(&other) == 1).await, "held back by the backlog");
        assert!(queue.len() > REFILL, "the slow domain's backlog is still there");
        let _ = stop.send(true);
        let _ = task.await;
    }

    /// A paused domain's mail stays in the store, untried, whatever asks for it (its arrival, a
    /// retry, a flush of everything), while another domain's goes on; a resume sends it at once.
    #[tokio::test(start_paused = true)]
    async fn a_paused_domain_is_not_tried_until_resumed() {
        let queue = MemoryQueue::new();
        let courier = ScriptedCourier::new(|_| Answer::Accept);
        let mut config = (*config(false)).clone();
        config.relay.domains.push("other.test".into());
        let (handle, stop, task) = start(Arc::new(config), &queue, &courier);
        assert!(handle.pause("Example.test.", true).await.expect("pause"));
        assert!(!handle.pause("example.test", true).await.expect("pause again"), "already paused");
        assert_eq!(handle.paused().into_iter().collect::<Vec<_>>(), ["example.test"]);
        let paused = submit_to(&queue, "bob@example.test", None);
        let other = submit_to(&queue, "carol@other.test", None);
        handle.queued(&paused);
        handle.queued(&other);
        assert!(until(Duration::from_secs(5), || courier.tries_of(&other) == 1).await, "other domains go on");
        handle.retry(&paused).await.expect("a retry is accepted");
        handle.flush(None).await.expect("flush");
        assert!(!until(Duration::from_secs(10 * 60), || courier.tries_of(&paused) > 0).await, "tried while paused");
        assert!(matches!(handle.flush(Some("example.test".into())).await, Err(ScheduleError::Paused(_))));
        assert!(matches!(handle.pause("nowhere.test", true).await, Err(ScheduleError::NotRelayed(_))));
        assert!(handle.pause("example.test", false).await.expect("resume"));
        assert!(until(Duration::from_secs(5), || courier.tries_of(&paused) == 1).await, "not sent at the resume");
        assert!(matches!(handle.pause("example.test", false).await, Err(ScheduleError::NotPaused(_))));
        let _ = stop.send(true);
        let _ = task.await;
    }

    /// A retry of a held message says it is held, and a release of one that is not says so.
    #[tokio::test(start_paused = true)]
    async fn retry_of_a_held_message_and_release_of_one_not_held_are_refused() {
        let queue = MemoryQueue::new();
        let courier = ScriptedCourier::new(|_| Answer::Accept);
        let id = submit_to(&queue, "bob@example.test", Some(now() + HOUR_MICROS));
        let (handle, stop, task) = start(config(false), &queue, &courier);
        assert!(matches!(handle.hold(&id, false).await, Err(ScheduleError::NotHeld(_))));
        handle.hold(&id, true).await.expect("hold");
        assert!(matches!(handle.retry(&id).await, Err(ScheduleError::Held(_))));
        handle.hold(&id, false).await.expect("release");
        assert!(until(Duration::from_secs(5), || queue.is_empty()).await, "a release tries it now");
        let _ = stop.send(true);
        let _ = task.await;
    }

    /// The settle uses the envelope as it was sent, unless the operator changed the message while
    /// it was out: a hold given during the attempt survives the deferral that follows.
    #[tokio::test(start_paused = true)]
    async fn a_hold_during_the_attempt_survives_its_deferral() {
        let queue = MemoryQueue::new();
        let courier = ScriptedCourier::slow_with("example.test", Duration::from_secs(10), |_| Answer::Refuse);
        let id = submit_to(&queue, "bob@example.test", None);
        let (handle, stop, task) = start(config(false), &queue, &courier);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(handle.hold(&id, true).await.expect("hold").held);
        assert!(until(Duration::from_secs(20), || courier.tries_of(&id) == 1).await);
        assert!(until(Duration::from_secs(5), || queue.get(&id).is_some_and(|e| e.attempts == 1)).await);
        assert!(queue.get(&id).expect("queued").held, "the deferral's settle undid the hold");
        let _ = stop.send(true);
        let _ = task.await;
    }

    /// An operator's release, hold and delete given at once apply in that order, each after the
    /// one before is written, and the message is never sent in between.
    #[tokio::test(start_paused = true)]
    async fn changes_given_at_once_apply_in_order() {
        let queue = MemoryQueue::new();
        let courier = ScriptedCourier::new(|_| Answer::Accept);
        let id = queue.new_id();
        let mut message = Arc::clone(&queue).incoming(&id).expect("incoming");
        message.write(b"Subject: held\r\n\r\nbody\r\n").expect("write");
        let mut held = envelope("a@sender.test", &["bob@example.test"]);
        held.held = true;
        message.commit(held).expect("commit");
        let (handle, stop, task) = start(config(false), &queue, &courier);
        let (released, held, deleted) =
            tokio::join!(handle.hold(&id, false), handle.hold(&id, true), handle.delete(&id));
        assert!(!released.expect("released").held);
        assert!(held.expect("held").held);
        deleted.expect("deleted while held, not in flight");
        assert!(queue.get(&id).is_none());
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(courier.tries_of(&id), 0, "sent between the release and the hold");
        let _ = stop.send(true);
        let _ = task.await;
    }
}

//! When to try what. One task owns the schedule: a set of `(due, queue ID)` ordered by time, woken by
//! commands (a new message, a flush, hold/release/delete) or by the next due time, like mini-redis's
//! expiry task. It hands batches of due messages, per destination domain and oldest first, to the
//! courier (the [`crate::deliver::Deliverer`]), and turns the outcomes plus a message's age into
//! delivery, retry, delay notice or bounce.
//!
//! A file per job: this one holds the loop and dispatch; `order` keeps arrival order
//! (`strict_order`); `settle` makes outcomes durable and queues notices; `outcome` is the policy
//! (`apply_outcomes`, a pure function); `destinations` tells up, down and back; `loops` bounces mail
//! loops; `sweep` expires failed messages kept without a bounce.

use crate::config::Config;
use crate::deliver::{Courier, Detail, Job, JobResult, RcptOutcome};
use crate::dsn::{self, DsnKind, ReportedRecipient};
use crate::lock;
use crate::metrics::Metrics;
use crate::recipients::Recipients;
use crate::spool::{
    self, DsnNotify, DsnRet, Envelope, Queue, QueueId, QueueKey, Recipient, RecipientStatus, SpoolError, domain_of,
    from_micros, now_micros, queue_id, queue_key,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

/// Most messages handed to one delivery batch; later ones wait for the next batch of the domain.
const BATCH_LIMIT: usize = 1000;

/// How far ahead the timetable holds the queue (microseconds): messages due later are in the store
/// only, and are fetched as their time comes near (five minutes: a fetch each two and a half
/// minutes when nothing else asks for one).
const WINDOW: i64 = 5 * 60 * 1_000_000;

/// How much later than now the store may have a message due when the timetable has it due now
/// before the entry counts as stale (the wall clock and the scheduler's clock may drift apart).
const STALE_GRACE: i64 = 60 * 1_000_000;

/// How long a `strict_order` domain's message waits when another node holds the domain's lane.
const LANE_RETRY: i64 = 2 * 1_000_000;

/// Messages fetched from the store into the timetable at a time.
const REFILL: usize = 4096;

/// Due messages kept per domain while its batch is out (two batches' worth); beyond, the lane
/// overflows and its messages are fetched again from the store as it runs low.
const LANE_CAP: usize = 2 * BATCH_LIMIT;

/// Errors of queue operations, shown to the operator as they are.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("message {0} is being delivered right now; try again in a moment")]
    InFlight(QueueId),
    #[error("bartleby is not running (no scheduler to deliver with)")]
    NotRunning,
    #[error("message {0} is held; release it first (bartleby queue release {0})")]
    Held(QueueId),
    #[error("message {0} is not held")]
    NotHeld(QueueId),
    #[error("{0} is not a relayed domain (neither in relay.domains nor in [routes])")]
    NotRelayed(String),
    #[error("deliveries to {0} are not paused")]
    NotPaused(String),
    #[error("deliveries to {0} are paused; resume them first (bartleby queue resume {0})")]
    Paused(String),
}

/// The delay before the next attempt after `attempts` failed ones: `first`, doubling, at most `max`
/// (the queue run interval, like sendmail's -q30m).
pub fn backoff(attempts: u32, first: Duration, max: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).min(30);
    first.saturating_mul(1u32 << doublings).min(max)
}

enum Command {
    Queued(QueueId),
    Flush { domain: Option<String>, reply: oneshot::Sender<Result<usize, ScheduleError>> },
    Retry { id: QueueId, reply: oneshot::Sender<Result<(), ScheduleError>> },
    Hold { id: QueueId, held: bool, reply: oneshot::Sender<Result<Envelope, ScheduleError>> },
    Delete { id: QueueId, reply: oneshot::Sender<Result<(), ScheduleError>> },
    Bounce { id: QueueId, reply: oneshot::Sender<Result<String, ScheduleError>> },
    Pause { domain: String, paused: bool, reply: oneshot::Sender<Result<bool, ScheduleError>> },
    Reload { config: Arc<Config>, deliverer: Arc<dyn Courier> },
}

impl Command {
    /// The message an operator's command concerns.
    fn message(&self) -> Option<&str> {
        match self {
            Command::Retry { id, .. }
            | Command::Hold { id, .. }
            | Command::Delete { id, .. }
            | Command::Bounce { id, .. } => Some(id),
            _ => None,
        }
    }
}

pub use crate::deliver::destination::{DestinationState, Destinations};

/// The scheduler's clock: wall-clock microseconds since the epoch, advancing with `tokio::time`,
/// so that the scheduler's unit tests run on paused time (`tokio::time::pause`) and retries,
/// backoff and strict order are checked without sleeping. Anchored to the wall clock once.
pub fn now() -> i64 {
    static ANCHOR: std::sync::OnceLock<(i64, std::time::Instant)> = std::sync::OnceLock::new();
    let (wall, at) = *ANCHOR.get_or_init(|| (now_micros(), std::time::Instant::now()));
    let elapsed = tokio::time::Instant::now().into_std().saturating_duration_since(at);
    wall.saturating_add(i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX / 2))
}

/// How the rest of the daemon talks to the scheduler task.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Command>,
    destinations: Destinations,
    /// The domains paused by the operator, as the scheduler last changed them.
    paused: Arc<std::sync::Mutex<BTreeSet<String>>>,
}

impl SchedulerHandle {
    /// A copy of what is known about each destination domain.
    pub fn destinations(&self) -> BTreeMap<String, DestinationState> {
        lock(&self.destinations).clone()
    }

    /// The shared destination table, for the parts that record probes.
    pub fn destination_table(&self) -> Destinations {
        Arc::clone(&self.destinations)
    }

    /// The domains whose deliveries are paused.
    pub fn paused(&self) -> BTreeSet<String> {
        lock(&self.paused).clone()
    }

    /// Pauses (`true`) or resumes deliveries to a relayed domain; returns whether that changed
    /// anything (pausing a paused domain does not; resuming one that is not paused is an error).
    pub async fn pause(&self, domain: &str, paused: bool) -> Result<bool, ScheduleError> {
        let (reply, rx) = oneshot::channel();
        let command = Command::Pause { domain: domain.to_string(), paused, reply };
        self.tx.send(command).map_err(|_| ScheduleError::NotRunning)?;
        rx.await.map_err(|_| ScheduleError::NotRunning)?
    }

    /// Returns a message to its sender now (a failure notice, then removal); says what happened.
    pub async fn bounce(&self, id: &str) -> Result<String, ScheduleError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Bounce { id: id.to_string(), reply }).map_err(|_| ScheduleError::NotRunning)?;
        rx.await.map_err(|_| ScheduleError::NotRunning)?
    }

    /// A message was just queued: consider it now.
    pub fn queued(&self, id: &str) {
        let _ = self.tx.send(Command::Queued(id.to_string()));
    }

    /// Makes every deferred message (of `domain`, if given) due now; returns how many were scheduled.
    /// Held messages and messages being delivered right now are not counted.
    pub async fn flush(&self, domain: Option<String>) -> Result<usize, ScheduleError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Flush { domain, reply }).map_err(|_| ScheduleError::NotRunning)?;
        rx.await.map_err(|_| ScheduleError::NotRunning)?
    }

    /// Tries one message now.
    pub async fn retry(&self, id: &str) -> Result<(), ScheduleError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Retry { id: id.to_string(), reply }).map_err(|_| ScheduleError::NotRunning)?;
        rx.await.map_err(|_| ScheduleError::NotRunning)?
    }

    /// Holds (`true`) or releases (`false`) a message.
    pub async fn hold(&self, id: &str, held: bool) -> Result<Envelope, ScheduleError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Hold { id: id.to_string(), held, reply }).map_err(|_| ScheduleError::NotRunning)?;
        rx.await.map_err(|_| ScheduleError::NotRunning)?
    }

    /// Uses a reloaded configuration (and the deliverer built from it) for the next batches;
    /// batches already out finish with the old one.
    pub fn reload(&self, config: Arc<Config>, deliverer: Arc<dyn Courier>) -> Result<(), ScheduleError> {
        self.tx.send(Command::Reload { config, deliverer }).map_err(|_| ScheduleError::NotRunning)
    }

    /// Deletes a message without a bounce (an operator's decision).
    pub async fn delete(&self, id: &str) -> Result<(), ScheduleError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Delete { id: id.to_string(), reply }).map_err(|_| ScheduleError::NotRunning)?;
        rx.await.map_err(|_| ScheduleError::NotRunning)?
    }
}

/// Holds or releases a message in the spool; used by the scheduler and by the offline CLI.
/// Releasing a message that is not held is an error, so that the operator hears of it.
pub fn set_held(spool: &dyn Queue, id: &str, held: bool) -> Result<Envelope, ScheduleError> {
    let was_held = spool.get(id).ok_or_else(|| SpoolError::NotFound(id.to_string()))?.held;
    if !held && !was_held {
        return Err(ScheduleError::NotHeld(id.to_string()));
    }
    let envelope = spool.set_held(id, held)?;
    if was_held != held {
        tracing::info!(queue_id = %id, held, "{}", if held { "held" } else { "released" });
    }
    Ok(envelope)
}

/// Deletes a message; used by the scheduler and by the offline CLI.
pub fn delete(spool: &dyn Queue, id: &str) -> Result<(), ScheduleError> {
    spool.delete(id)?;
    tracing::info!(queue_id = %id, "removed by the operator");
    Ok(())
}

/// The scheduler task's state.
pub struct Scheduler {
    config: Arc<Config>,
    spool: Arc<dyn Queue>,
    deliverer: Arc<dyn Courier>,
    /// The timetable: messages waiting for their time, ordered by due time then arrival. A window
    /// of the queue, not all of it: the store's due times are the truth ([`Queue::due`]), and
    /// what is due up to `horizon` is here, in a lane, or in flight (see [`Scheduler::refill`]).
    due: BTreeSet<(i64, QueueKey)>,
    /// The due time of each message in `due`, to find and move its entry.
    due_at: HashMap<QueueKey, i64>,
    /// How far the timetable has read the store's due messages, in (due time, key) order; None
    /// before the first read. Every message not held and not in flight that is due up to here
    /// is in `due`, in its domain's lane, or left in the store by a lane that overflowed.
    horizon: Option<(i64, QueueKey)>,
    /// Messages that are due but whose domain already has a batch out (or a full batch), by that
    /// domain, oldest first: when the domain's batch returns, the next batch's worth goes back to
    /// `due`, so a backlog of a million costs a batch's work per batch, not a million.
    lanes: HashMap<String, Lane>,
    /// Every key in a lane, so that a read of the store does not bring one back into `due`.
    in_lanes: HashSet<QueueKey>,
    /// Number of domain batches carrying each message right now.
    in_flight: HashMap<QueueId, usize>,
    /// The envelope of each message in flight as it was sent, until settled; dropped when the
    /// operator changes the message meanwhile (then the settle reads it again).
    dispatched: HashMap<QueueId, Envelope>,
    /// Outcomes gathered for a message until its last batch returns.
    gathered: HashMap<QueueId, Vec<(String, RcptOutcome)>>,
    /// Domains with a batch out: one batch per domain at a time keeps arrival order and the
    /// connection bound.
    busy_domains: HashSet<String>,
    /// Domains whose last batch reached no session (refused, timed out, 421, TLS): when one comes
    /// back, its backlog is flushed.
    down_domains: HashSet<String>,
    /// Messages the destination itself deferred for a recipient (a 4xx at RCPT, a greylist) while
    /// its sessions worked: each keeps its own backoff, and under `strict_order` it neither holds
    /// back the domain's later mail nor rides along in its batches.
    own_backoff: HashSet<QueueId>,
    batches: JoinSet<(String, Vec<JobResult>)>,
    rx: mpsc::UnboundedReceiver<Command>,
    destinations: Destinations,
    /// Where addresses the primary accepted are remembered (issue 6: a 250 is proof).
    recipients: Option<Arc<Recipients>>,
    /// Event counters for `/metrics` (delivered, deferred, bounced).
    metrics: Arc<Metrics>,
    /// Each message's result as soon as the next hop answered for it, settled at once (durable
    /// before the batch goes on), so a crash repeats only deliveries in flight.
    progress_tx: mpsc::UnboundedSender<(String, JobResult)>,
    progress_rx: mpsc::UnboundedReceiver<(String, JobResult)>,
    /// What the results of each domain's running batch said so far, for its destination state.
    tallies: HashMap<String, Tally>,
    /// The disk work of settling outcomes, off the scheduler's loop so that batches keep sending.
    settler: Settler,
    /// `strict_order` domains whose batch is back, each with the settle generation that covers its
    /// results: such a domain takes its next batch only once those are durable, as arrival order
    /// needs (a message the batch deferred is rescheduled before anything newer is sent).
    closing: Vec<(String, u64, Tally)>,
    /// When held messages whose bounce was suppressed were last swept for expiry.
    swept: Option<std::time::Instant>,
    /// A sweep is running.
    sweeping: bool,
    /// Disk work the loop must not wait for (an operator's delete, the sweep), on
    /// blocking threads: the loop goes on dispatching, and applies each when it is done.
    ops: JoinSet<Operation>,
    /// Domains the operator paused: their messages stay in the store until resumed.
    paused: Paused,
    /// Messages with an operator's change running on a blocking thread, each with the commands
    /// given for it meanwhile, in order.
    changing: HashMap<QueueId, VecDeque<Command>>,
    /// What other nodes sharing the store queued or flushed ([`Queue::events`]); None for a
    /// store only this process writes.
    events: Option<mpsc::UnboundedReceiver<spool::StoreEvent>>,
    /// How often the due messages are read again from a shared store, and when they last were:
    /// what no event announced (a dead node's mail, a lost notice) is found this way.
    reread_every: Option<Duration>,
    last_reread: tokio::time::Instant,
}

/// A domain's due messages waiting for its batch to return.
#[derive(Debug, Default)]
struct Lane {
    /// Oldest first, at most [`LANE_CAP`].
    keys: BTreeSet<QueueKey>,
    /// More were due than the lane keeps: they are left in the store, fetched as the lane runs
    /// low, and the timetable's own reads leave the domain out meanwhile.
    overflow: bool,
}

/// Disk work done off the scheduler's loop, with what the loop does once it is done.
enum Operation {
    Held {
        id: QueueId,
        /// Boxed: an envelope is large beside the other variants.
        result: Box<Result<Envelope, ScheduleError>>,
        reply: oneshot::Sender<Result<Envelope, ScheduleError>>,
    },
    Deleted {
        id: QueueId,
        result: Result<(), ScheduleError>,
        reply: oneshot::Sender<Result<(), ScheduleError>>,
    },
    Bounced {
        id: QueueId,
        result: Result<(Option<QueueId>, String), ScheduleError>,
        reply: oneshot::Sender<Result<String, ScheduleError>>,
    },
    Swept,
}

impl Scheduler {
    /// Creates the scheduler; the queued messages are read from the store as they come due.
    pub fn new(
        config: Arc<Config>,
        spool: Arc<dyn Queue>,
        deliverer: Arc<dyn Courier>,
    ) -> (Scheduler, SchedulerHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        let destinations = Destinations::default();
        let paused = Paused::default();
        let handle =
            SchedulerHandle { tx, destinations: Arc::clone(&destinations), paused: Arc::clone(&paused.shared) };
        let scheduler = Scheduler {
            events: spool.events(),
            reread_every: spool.reread_every(),
            last_reread: tokio::time::Instant::now(),
            paused,
            changing: HashMap::new(),
            destinations: Arc::clone(&destinations),
            metrics: Arc::default(),
            progress_tx,
            progress_rx,
            tallies: HashMap::new(),
            settler: Settler::default(),
            closing: Vec::new(),
            config,
            spool,
            deliverer,
            due: BTreeSet::new(),
            due_at: HashMap::new(),
            horizon: None,
            lanes: HashMap::new(),
            in_lanes: HashSet::new(),
            in_flight: HashMap::new(),
            gathered: HashMap::new(),
            dispatched: HashMap::new(),
            busy_domains: HashSet::new(),
            down_domains: HashSet::new(),
            own_backoff: HashSet::new(),
            batches: JoinSet::new(),
            rx,
            recipients: None,
            swept: None,
            sweeping: false,
            ops: JoinSet::new(),
        };
        (scheduler, handle)
    }

    /// Counts deliveries, deferrals and bounces in `metrics`.
    pub fn counting_into(mut self, metrics: Arc<Metrics>) -> Scheduler {
        self.metrics = metrics;
        self
    }

    /// Remembers every recipient the primary accepts in `recipients`.
    pub fn learning_into(mut self, recipients: Arc<Recipients>) -> Scheduler {
        self.recipients = Some(recipients);
        self
    }

    /// Runs until `shutdown` turns true. Batches still out are abandoned: their messages stay
    /// queued and are tried again after a restart.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            self.dispatch();
            let next = self.due.first().map(|(at, _)| *at);
            let sleep = next.map(|at| {
                let wait = Duration::from_micros(u64::try_from(at - now()).unwrap_or(0));
                tokio::time::Instant::now() + wait
            });
            // Wake at least once a minute, so kept failed messages are swept when their time is up,
            // and for the next read of a shared store.
            let mut cap = tokio::time::Instant::now() + Duration::from_secs(60);
            if let Some(every) = self.reread_every {
                cap = cap.min(self.last_reread + every);
            }
            let sleep = Some(sleep.map_or(cap, |at| at.min(cap)));
            tokio::select! {
                Some(event) = next_event(&mut self.events) => self.store_event(event),
                command = self.rx.recv() => match command {
                    Some(command) => self.handle(command),
                    None => break,
                },
                Some(first) = self.progress_rx.recv() => {
                    let mut results = vec![first];
                    while let Ok(more) = self.progress_rx.try_recv() {
                        results.push(more);
                    }
                    self.absorb(results);
                }
                Some(done) = self.batches.join_next(), if !self.batches.is_empty() => match done {
                    Ok((domain, results)) => self.finish(domain, results),
                    Err(err) => tracing::error!(error = %err, "delivery batch failed"),
                },
                done = self.settler.done() => self.settled(done),
                Some(done) = self.ops.join_next(), if !self.ops.is_empty() => match done {
                    Ok(done) => self.operated(done),
                    Err(err) => tracing::error!(error = %err, "queue operation failed"),
                },
                _ = sleep_until(sleep) => {}
                _ = shutdown.changed() => break,
            }
            if self.reread_every.is_some_and(|every| self.last_reread.elapsed() >= every) {
                self.last_reread = tokio::time::Instant::now();
                self.reread();
            }
        }
        self.batches.abort_all();
        // Operators' changes already under way finish and are answered.
        while let Some(done) = self.ops.join_next().await {
            if let Ok(done) = done {
                self.operated(done);
            }
        }
        // What the primary has answered is made durable before we go, so that it is not sent again.
        while self.settler.running.is_some() || !self.settler.waiting.is_empty() {
            let done = self.settler.done().await;
            self.settled(done);
        }
        self.deliverer.close_idle().await;
    }

    fn schedule(&mut self, id: QueueId, at: i64) {
        let Some(key) = queue_key(&id) else {
            tracing::error!(queue_id = %id, "not a queue ID: not scheduled");
            return;
        };
        self.schedule_key(key, at);
    }

    fn schedule_key(&mut self, key: QueueKey, at: i64) {
        if let Some(old) = self.due_at.insert(key, at) {
            self.due.remove(&(old, key));
        }
        self.due.insert((at, key));
    }

    /// The store has the message due at `at` (rescheduled after an attempt, released): it is in
    /// the timetable when that is within what the timetable has read, else the store keeps it.
    fn reschedule(&mut self, id: QueueId, at: i64) {
        let Some(key) = queue_key(&id) else { return };
        if self.horizon.is_some_and(|h| (at, key) <= h) {
            self.schedule_key(key, at);
        } else if let Some(old) = self.due_at.remove(&key) {
            self.due.remove(&(old, key));
        }
    }

    fn unschedule(&mut self, id: &str) {
        let Some(key) = queue_key(id) else { return };
        if let Some(old) = self.due_at.remove(&key) {
            self.due.remove(&(old, key));
        }
        if self.in_lanes.remove(&key) {
            for lane in self.lanes.values_mut() {
                lane.keys.remove(&key);
            }
        }
    }

    /// Reads the store's next due messages into the timetable when it has read less than half a
    /// window ahead and has room: a bounded batch, earliest first, leaving out the domains whose
    /// lanes overflow (those fetch their own, [`Scheduler::fetch_lane`]).
    fn refill(&mut self, now: i64) {
        let until = now.saturating_add(WINDOW);
        let behind = self.horizon.is_none_or(|(at, _)| at < now.saturating_add(WINDOW / 2));
        if !behind || self.due.len() >= REFILL {
            return;
        }
        let mut except: Vec<String> = self.lanes.iter().filter(|(_, l)| l.overflow).map(|(d, _)| d.clone()).collect();
        except.extend(self.paused.domains.iter().cloned());
        let query = spool::DueQuery { after: self.horizon, until, domain: None, except: &except, limit: REFILL };
        let found = self.spool.due(&query);
        let complete = found.len() < REFILL;
        let last = found.last().copied();
        for (at, key) in found {
            if !self.in_lanes.contains(&key) && !self.in_flight.contains_key(&queue_id(key)) {
                self.schedule_key(key, at);
            }
        }
        self.horizon = if complete { Some((until, QueueKey::MAX)) } else { last };
    }

    /// Forgets the timetable and the lanes (not what is in flight): the next refill reads the
    /// store from its earliest due message again. After a flush, which changed due times there.
    /// Another node queued messages (they are due now) or changed due times (read again).
    fn store_event(&mut self, event: spool::StoreEvent) {
        match event {
            spool::StoreEvent::Queued(ids) => {
                let now = now();
                for id in ids {
                    if !self.in_flight.contains_key(&id) {
                        self.schedule(id, now);
                    }
                }
            }
            spool::StoreEvent::Changed => self.reread(),
        }
    }

    fn reread(&mut self) {
        self.due.clear();
        self.due_at.clear();
        self.lanes.clear();
        self.in_lanes.clear();
        self.horizon = None;
    }

    /// A due message waits for `domain`'s batch to return; beyond [`LANE_CAP`] it is left in the
    /// store and the lane overflows.
    fn block(&mut self, domain: &str, key: QueueKey) {
        let lane = self.lanes.entry(domain.to_string()).or_default();
        if lane.keys.len() < LANE_CAP || lane.keys.contains(&key) {
            lane.keys.insert(key);
            self.in_lanes.insert(key);
        } else {
            lane.overflow = true;
        }
    }

    /// The next batch's worth of `domain`'s waiting messages is due again, oldest first; a lane
    /// that overflowed and runs low fetches more of the domain's due mail from the store.
    fn unblock(&mut self, domain: &str, now: i64) {
        let Some(lane) = self.lanes.get_mut(domain) else { return };
        let mut next = Vec::with_capacity(BATCH_LIMIT.min(lane.keys.len()));
        while next.len() < BATCH_LIMIT
            && let Some(key) = lane.keys.pop_first()
        {
            self.in_lanes.remove(&key);
            next.push(key);
        }
        let fetch = lane.overflow && lane.keys.len() < BATCH_LIMIT;
        let empty = lane.keys.is_empty() && !lane.overflow;
        for key in next {
            self.schedule_key(key, now);
        }
        if fetch {
            self.fetch_lane(domain, now);
        }
        if empty && self.lanes.get(domain).is_some_and(|l| l.keys.is_empty() && !l.overflow) {
            self.lanes.remove(domain);
        }
    }

    /// Fetches an overflowing lane's messages from the store: those due now go into the lane,
    /// those due later (up to the horizon) into the timetable. Once the store has no more than the
    /// fetch took, the lane no longer overflows.
    fn fetch_lane(&mut self, domain: &str, now: i64) {
        let Some(horizon) = self.horizon else { return };
        let limit = LANE_CAP + 2 * BATCH_LIMIT;
        let query = spool::DueQuery { after: None, until: horizon.0, domain: Some(domain), except: &[], limit };
        let found = self.spool.due(&query);
        let complete = found.len() < limit;
        let mut lane = self.lanes.remove(domain).unwrap_or_default();
        for (at, key) in found {
            let known = self.due_at.contains_key(&key) || self.in_lanes.contains(&key);
            if known || (at, key) > horizon || self.in_flight.contains_key(&queue_id(key)) {
                continue;
            }
            if at > now {
                self.schedule_key(key, at);
            } else if lane.keys.len() < LANE_CAP {
                lane.keys.insert(key);
                self.in_lanes.insert(key);
            }
        }
        // Still overflowing while the fetch came back full, or kept less than it found.
        lane.overflow = !complete || lane.keys.len() >= LANE_CAP;
        self.lanes.insert(domain.to_string(), lane);
    }

    fn handle(&mut self, command: Command) {
        // An operator's change of a message runs on a blocking thread; the next one for the same
        // message waits its turn, so changes apply in the order given (release, hold, delete).
        if let Some(id) = command.message()
            && let Some(waiting) = self.changing.get_mut(id)
        {
            waiting.push_back(command);
            return;
        }
        match command {
            Command::Queued(id) => self.schedule(id, now()),
            Command::Flush { domain, reply } => {
                let result = match domain.map(|d| d.trim_end_matches('.').to_ascii_lowercase()) {
                    Some(d) if !self.config.is_destination(&d) => Err(ScheduleError::NotRelayed(d)),
                    Some(d) if self.paused.domains.contains(&d) => Err(ScheduleError::Paused(d)),
                    domain => Ok(self.flush(domain.as_deref())),
                };
                let _ = reply.send(result);
            }
            Command::Pause { domain, paused, reply } => {
                let _ = reply.send(self.pause(&domain, paused));
            }
            Command::Bounce { id, reply } => self.bounce(id, reply),
            Command::Retry { id, reply } => {
                let result = match self.spool.brief(&id) {
                    None => Err(SpoolError::NotFound(id).into()),
                    Some(brief) if brief.held => Err(ScheduleError::Held(id)),
                    Some(_) if self.in_flight.contains_key(&id) => Err(ScheduleError::InFlight(id)),
                    Some(_) => {
                        let now = now();
                        self.spool.expedite_id(&id, now);
                        self.schedule(id, now);
                        Ok(())
                    }
                };
                let _ = reply.send(result);
            }
            // The envelope is written on a blocking thread. Meanwhile the message is out of the
            // timetable and dispatch passes it by (`changing`); once written, it is scheduled
            // again by what the store says, unless held.
            Command::Hold { id, held, reply } => {
                self.unschedule(&id);
                self.dispatched.remove(&id);
                self.changing.insert(id.clone(), VecDeque::new());
                let spool = Arc::clone(&self.spool);
                self.ops.spawn_blocking(move || {
                    let result = Box::new(set_held(spool.as_ref(), &id, held));
                    Operation::Held { id, result, reply }
                });
            }
            Command::Reload { config, deliverer } => {
                self.config = config;
                self.deliverer = deliverer;
            }
            Command::Delete { id, reply } => {
                if self.in_flight.contains_key(&id) {
                    let _ = reply.send(Err(ScheduleError::InFlight(id)));
                    return;
                }
                self.unschedule(&id);
                // Kept from dispatch, flushes and retries until the removal is done.
                self.in_flight.insert(id.clone(), 1);
                self.changing.insert(id.clone(), VecDeque::new());
                let spool = Arc::clone(&self.spool);
                self.ops.spawn_blocking(move || {
                    let result = delete(spool.as_ref(), &id);
                    Operation::Deleted { id, result, reply }
                });
            }
        }
    }

    /// An operator's change or a sweep is done on its blocking thread: the timetable follows it.
    fn operated(&mut self, done: Operation) {
        let changed = match &done {
            Operation::Held { id, .. } | Operation::Deleted { id, .. } | Operation::Bounced { id, .. } => {
                Some(id.clone())
            }
            Operation::Swept => None,
        };
        match done {
            Operation::Held { id, result, reply } => {
                self.dispatched.remove(&id);
                if let Some(brief) = self.spool.brief(&id)
                    && !brief.held
                    && !self.in_flight.contains_key(&id)
                {
                    self.reschedule(id, brief.next_attempt);
                }
                let _ = reply.send(*result);
            }
            Operation::Deleted { id, result, reply } => {
                self.in_flight.remove(&id);
                if result.is_err() && self.spool.brief(&id).is_some() {
                    self.schedule(id, now());
                }
                let _ = reply.send(result);
            }
            Operation::Bounced { id, result, reply } => {
                self.in_flight.remove(&id);
                let result = match result {
                    Ok((notice, text)) => {
                        if let Some(notice) = notice {
                            self.schedule(notice, now());
                        }
                        Ok(text)
                    }
                    Err(err) => {
                        if self.spool.brief(&id).is_some_and(|b| !b.held) {
                            self.schedule(id, now());
                        }
                        Err(err)
                    }
                };
                let _ = reply.send(result);
            }
            Operation::Swept => self.sweeping = false,
        }
        if let Some(id) = changed {
            self.next_change(&id);
        }
    }

    /// A change of the message is done: the next one given for it meanwhile starts (those that
    /// finish at once, one after another, until one runs on a blocking thread again).
    fn next_change(&mut self, id: &str) {
        let Some(mut waiting) = self.changing.remove(id) else { return };
        while let Some(command) = waiting.pop_front() {
            self.handle(command);
            if let Some(started) = self.changing.get_mut(id) {
                started.extend(waiting);
                return;
            }
        }
    }

    /// `queue bounce`: like a delete, off the loop and kept from dispatch meanwhile, but with a
    /// failure notice to the sender ([`return_to_sender`]).
    fn bounce(&mut self, id: QueueId, reply: oneshot::Sender<Result<String, ScheduleError>>) {
        if self.in_flight.contains_key(&id) {
            let _ = reply.send(Err(ScheduleError::InFlight(id)));
            return;
        }
        self.unschedule(&id);
        self.in_flight.insert(id.clone(), 1);
        self.changing.insert(id.clone(), VecDeque::new());
        let (config, spool, metrics) = (Arc::clone(&self.config), Arc::clone(&self.spool), Arc::clone(&self.metrics));
        self.ops.spawn_blocking(move || {
            let result = return_to_sender(&config, &spool, &metrics, &id);
            Operation::Bounced { id, result, reply }
        });
    }

    /// Makes deferred messages due now, in the store (a flush of a million is one pass over its
    /// index), and reads the timetable again from there. Returns how many were made due, not
    /// counting messages being delivered right now.
    fn flush(&mut self, domain: Option<&str>) -> usize {
        let now = now();
        let filter =
            spool::Filter { held: Some(false), domain: domain.map(str::to_string), ..spool::Filter::default() };
        let made_due = self.spool.expedite(&filter, now);
        let wanted = |brief: &spool::Brief| {
            !brief.held && domain.is_none_or(|d| brief.domains.iter().any(|b| b.eq_ignore_ascii_case(d)))
        };
        let busy = self.in_flight.keys().filter(|id| self.spool.brief(id).is_some_and(|b| wanted(&b))).count();
        let count = made_due.saturating_sub(busy);
        self.reread();
        tracing::info!(domain = domain.unwrap_or("*"), messages = count, "flush");
        count
    }

    /// Starts one batch per idle domain with its due messages, oldest first. Waits while a batch's
    /// worth of outcomes is not yet durable: the primary's answers are written down at the pace
    /// of the disk, and what a crash could send again stays bounded.
    fn dispatch(&mut self) {
        let now = now();
        if !self.sweeping && self.swept.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            self.swept = Some(std::time::Instant::now());
            self.sweeping = true;
            let (config, spool) = (Arc::clone(&self.config), Arc::clone(&self.spool));
            self.ops.spawn_blocking(move || {
                sweep_suppressed(&config, spool.as_ref(), now);
                Operation::Swept
            });
        }
        if self.settler.backlog() >= BATCH_LIMIT {
            return;
        }
        self.refill(now);
        let mut batches: BTreeMap<String, Vec<Job>> = BTreeMap::new();
        let mut chosen: Vec<(QueueId, BTreeSet<String>)> = Vec::new();
        let mut counts: HashMap<String, usize> = HashMap::new();
        // `strict_order` domains asked for their lane this round, and whether it was granted.
        let mut lanes: HashMap<String, bool> = HashMap::new();
        while let Some((at, key)) = self.due.first().copied() {
            if at > now {
                break;
            }
            self.due.remove(&(at, key));
            self.due_at.remove(&key);
            let id = queue_id(key);
            // The brief first: a message whose domain is busy is set aside without reading its
            // envelope from disk.
            let Some(brief) = self.spool.brief(&id) else { continue };
            // A paused domain's messages are left in the store, due; a resume reads them again.
            if brief.held
                || self.in_flight.contains_key(&id)
                || self.changing.contains_key(&id)
                || self.paused.blocks(&brief.domains)
            {
                continue;
            }
            // Rescheduled since this entry was made (the store's time is the truth): not yet. With
            // a minute's grace: arrival times come from the wall clock, this clock is monotonic.
            if brief.next_attempt > now.saturating_add(STALE_GRACE) {
                self.reschedule(id, brief.next_attempt);
                continue;
            }
            let domains: BTreeSet<String> = brief.domains.into_iter().collect();
            let busy = domains
                .iter()
                .find(|d| self.busy_domains.contains(*d) || counts.get(*d).is_some_and(|n| *n >= BATCH_LIMIT));
            if let Some(busy) = busy.cloned() {
                self.block(&busy, key);
                continue;
            }
            // Another node sends this `strict_order` domain right now: its turn comes later.
            let lane_taken = domains.iter().any(|d| {
                self.config.domain_policy(d).strict_order
                    && !*lanes.entry(d.clone()).or_insert_with(|| self.spool.claim_lane(d))
            });
            if lane_taken {
                self.schedule_key(key, now.saturating_add(LANE_RETRY));
                continue;
            }
            for domain in &domains {
                *counts.entry(domain.clone()).or_default() += 1;
            }
            chosen.push((id, domains));
        }
        // One claim for all: in a shared store, what another node took or changed meanwhile is
        // left out (it is that node's now, or due later).
        let ids: Vec<QueueId> = chosen.iter().map(|(id, _)| id.clone()).collect();
        let mut claimed: HashMap<QueueId, Envelope> = self
            .spool
            .claim(&ids, Some(now.saturating_add(STALE_GRACE)))
            .into_iter()
            .map(|claim| (claim.envelope.id.clone(), claim.envelope))
            .collect();
        for (id, domains) in chosen {
            let Some(envelope) = claimed.remove(&id) else { continue };
            self.in_flight.insert(id.clone(), domains.len());
            self.dispatched.insert(id.clone(), envelope.clone());
            for domain in domains {
                batches.entry(domain).or_default().push(self.job(envelope.clone()));
            }
        }
        // A domain whose blocked messages have no batch out to release them (its batch was
        // parked for arrival order) gets them back now.
        let idle: Vec<String> = self
            .lanes
            .keys()
            .filter(|d| !self.busy_domains.contains(*d) && !batches.contains_key(*d))
            .cloned()
            .collect();
        for domain in idle {
            self.unblock(&domain, now);
        }
        for (domain, mut jobs) in batches {
            if self.config.domain_policy(&domain).strict_order {
                self.keep_arrival_order(&domain, &mut jobs);
                if jobs.is_empty() {
                    continue;
                }
            }
            jobs.sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
            lanes.remove(&domain);
            self.busy_domains.insert(domain.clone());
            let deliverer = Arc::clone(&self.deliverer);
            let max_received = self.config.smtp.max_received_headers;
            let progress = self.progress_tx.clone();
            tracing::debug!(domain = %domain, messages = jobs.len(), "delivery batch");
            self.batches.spawn(async move {
                let (jobs, mut looped) = split_loops(&domain, jobs, max_received).await;
                let mut results = deliverer.deliver_batch(&domain, jobs, progress).await;
                results.append(&mut looped);
                (domain, results)
            });
        }
        // Lanes granted to domains that started no batch after all go back at once.
        for (domain, granted) in lanes {
            if granted && !self.busy_domains.contains(&domain) {
                self.spool.release_lane(&domain);
            }
        }
    }

    /// A delivery of `envelope`; its body is opened through the queue when it is sent.
    fn job(&self, envelope: Envelope) -> Job {
        Job { envelope, queue: Arc::clone(&self.spool) }
    }

    /// One batch fewer carries the message.
    fn release_in_flight(&mut self, id: &str) {
        if let Some(n) = self.in_flight.get_mut(id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(id);
                self.dispatched.remove(id);
            }
        }
    }

    /// Applies a returned batch: gathers outcomes, starts settling the messages whose last batch
    /// is back, and lets the domain take its next batch once they are settled.
    fn finish(&mut self, domain: String, results: Vec<JobResult>) {
        // Results streamed before the batch ended are in the channel already: take them first.
        let mut all = Vec::new();
        while let Ok(more) = self.progress_rx.try_recv() {
            all.push(more);
        }
        all.extend(results.into_iter().map(|r| (domain.clone(), r)));
        self.absorb(all);
        let tally = self.tallies.remove(&domain).unwrap_or_default();
        let generation = self.settler.covering();
        // Other domains go on at once: their messages stay in `in_flight` until settled, so
        // nothing is sent twice, and `dispatch` waits while too many outcomes are not yet durable.
        if generation <= self.settler.finished || !self.config.domain_policy(&domain).strict_order {
            self.release(domain, &tally);
        } else {
            self.closing.push((domain, generation, tally));
        }
    }

    /// A domain's batch is back and its results are durable: the domain may take its next batch.
    fn release(&mut self, domain: String, tally: &Tally) {
        self.busy_domains.remove(&domain);
        if self.config.domain_policy(&domain).strict_order {
            self.spool.release_lane(&domain);
        }
        self.record_destination(&domain, tally);
        let now = now();
        self.unblock(&domain, now);
        // Back only when a session worked after sessions had failed: a batch whose one recipient
        // got a 4xx neither takes the destination down nor brings it back.
        if tally.answered && self.down_domains.remove(&domain) {
            tracing::info!(domain = %domain, "destination is back: flushing its queue");
            self.flush(Some(&domain));
        } else if tally.down() {
            self.down_domains.insert(domain);
        }
    }

    /// Takes in results (from a running batch or at its end): tallies them per domain, gathers
    /// each message's outcomes, and hands the messages whose last batch has answered to the
    /// settler. They stay in `in_flight` until settled, so no flush or retry sends them again.
    fn absorb(&mut self, results: Vec<(String, JobResult)>) {
        if results.is_empty() {
            return;
        }
        self.learn(results.iter().map(|(_, r)| r));
        for (domain, result) in results {
            self.tallies.entry(domain).or_default().add(&result);
            let temp = result.outcomes.iter().filter_map(|(_, o)| match o {
                RcptOutcome::TempFail(d) => Some(d.session),
                _ => None,
            });
            let (mut own, mut destination) = (false, false);
            for session in temp {
                (own, destination) = (own || !session, destination || session);
            }
            if own && !destination {
                self.own_backoff.insert(result.id.clone());
            } else {
                self.own_backoff.remove(&result.id);
            }
            self.gathered.entry(result.id.clone()).or_default().extend(result.outcomes);
            let left = self.in_flight.get_mut(&result.id).map(|n| {
                *n = n.saturating_sub(1);
                *n
            });
            if left == Some(0) {
                let outcomes = self.gathered.remove(&result.id).unwrap_or_default();
                let sent = self.dispatched.remove(&result.id);
                self.settler.waiting.push((result.id, outcomes, sent));
            }
        }
        self.start_settling();
    }

    /// Starts the next settle when none is running: everything waiting goes in one (group commit).
    fn start_settling(&mut self) {
        let (spool, config, metrics) = (Arc::clone(&self.spool), Arc::clone(&self.config), Arc::clone(&self.metrics));
        // The time is taken here, on the scheduler's clock: the settle runs on a blocking thread.
        let at = now();
        self.settler.start(move |settled| settle(&config, &spool, &metrics, settled, at));
    }

    /// A settle finished: its messages leave `in_flight` and are rescheduled when still pending,
    /// the next settle starts, and domains whose results are now durable are released.
    fn settled(&mut self, done: Settled) {
        let (ids, next) = done;
        let pending: HashSet<&QueueId> = next.iter().map(|(id, _)| id).collect();
        for id in &ids {
            if self.in_flight.get(id) == Some(&0) {
                self.in_flight.remove(id);
            }
            if !pending.contains(id) {
                self.own_backoff.remove(id);
            }
        }
        for (id, at) in next {
            self.reschedule(id, at);
        }
        self.start_settling();
        let finished = self.settler.finished;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.closing).into_iter().partition(|c| c.1 <= finished);
        self.closing = waiting;
        for (domain, _, tally) in ready {
            self.release(domain, &tally);
        }
    }
}

/// The next change another node made, or never (no shared store).
async fn next_event(events: &mut Option<mpsc::UnboundedReceiver<spool::StoreEvent>>) -> Option<spool::StoreEvent> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The domain a recipient list is routed by; exposed for listings.
pub fn domains_of(envelope: &Envelope) -> BTreeSet<String> {
    envelope.pending().map(|r| domain_of(&r.address)).collect()
}

mod destinations;
mod loops;
mod order;
mod outcome;
mod pause;
mod settle;
mod sweep;

use destinations::*;
use loops::*;
use outcome::record_outcome;
pub use outcome::{Verdict, apply_outcomes, suppress_backscatter};
use pause::Paused;
pub use pause::{load_paused, parse_paused};
use settle::*;
pub use sweep::{suppressed_bounces, sweep_suppressed};

#[cfg(test)]
mod tests;

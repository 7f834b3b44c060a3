//! Watching the primary and paging a person (the monitor task).
//!
//! Every `[monitor] probe_interval` the monitor probes each relayed domain's next hops
//! ([`probe`]), records up/down, latency and error in its status table and in the scheduler's
//! destination table (both read by the admin page), and logs each change of state. A destination
//! that comes back is flushed at once, so the queue drains without anyone's help. The same round
//! runs the `[[monitor.check]]` entries and evaluates the alert [`rules`] (primary down too long,
//! queue too long or too old, spool nearly full, a check failing); each change of state is sent
//! once through every channel of [`alert`], with reminders at `reminder_interval`.
//!
//! - [`rules`]: the pure fire-once / remind / recover state machine;
//! - [`alert`]: the alert JSON and the command, webhook and e-mail channels;
//! - [`probe`]: SMTP probes of next hops and the TCP, HTTP and SMTP checks;
//! - [`http`]: a minimal HTTP/1.1 client for webhooks and HTTP checks.

pub mod alert;
pub mod http;
pub mod probe;
pub mod rules;

use crate::config::{Config, HumanDuration};
use crate::deliver::{ClientSettings, Deliverer};
use crate::lock;
use crate::schedule::SchedulerHandle;
use crate::spool::{Queue, from_micros, now_micros};
use alert::{Alert, Alerter};
use probe::ProbeResult;
use rules::{Event, Observation, RuleStates};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Errors of the monitor's channels and probes; `Display` is the line logged and shown by
/// `bartleby alert-test`.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("HTTP: {0}")]
    Http(String),
    #[error("command: {0}")]
    Command(String),
    #[error("mail: {0}")]
    Mail(String),
    #[error("{0}")]
    Setup(String),
}

/// What the monitor last saw of one watched thing (a relayed domain's primary, or a check).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatchStatus {
    /// Up or down at the last probe; None before the first one.
    pub up: Option<bool>,
    /// Microseconds since the epoch of the last change between up and down.
    pub since: Option<i64>,
    /// Microseconds since the epoch of the last probe.
    pub last_probe: Option<i64>,
    /// Time to the answer of the last successful probe, in milliseconds.
    pub latency_ms: Option<u64>,
    /// The host that answered, or the last one tried.
    pub host: Option<String>,
    /// Why the last probe failed.
    pub error: Option<String>,
}

/// Everything the monitor shows: primaries by domain, checks by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MonitorStatus {
    pub domains: BTreeMap<String, WatchStatus>,
    pub checks: BTreeMap<String, WatchStatus>,
}

/// The status shared with the admin page and `/metrics`.
pub type SharedStatus = Arc<Mutex<MonitorStatus>>;

/// What a monitor knows that must outlive it: a reload (SIGHUP) replaces the monitor, and the
/// new one takes this over. The rules' states live in the queue store ([`rules::decide`]), so an
/// alert that is firing stays firing across a reload or a restart (no second notice, its start time
/// kept) and its recovery, whenever it comes, is announced; `rules` is the copy last read, which
/// decides when the store cannot.
#[derive(Debug, Clone, Default)]
pub struct MonitorState {
    status: SharedStatus,
    rules: Arc<Mutex<RuleStates>>,
}

/// The monitor task's state.
pub struct Monitor {
    config: Arc<Config>,
    spool: Arc<dyn Queue>,
    scheduler: SchedulerHandle,
    deliverer: Arc<Deliverer>,
    /// Client settings with every timeout capped by `probe_timeout`.
    settings: Arc<ClientSettings>,
    alerter: Arc<Alerter>,
    status: SharedStatus,
    /// The rules' states last read from the store; shared with the monitor a reload replaces it
    /// with.
    rules: Arc<Mutex<RuleStates>>,
    /// This round's observations, decided together at its end ([`Monitor::settle`]).
    seen: Vec<Seen>,
    /// Alerts being sent; a slow channel never delays a probe.
    sending: JoinSet<()>,
}

impl Monitor {
    /// A monitor for `config`, flushing through `scheduler` and resolving with `deliverer`.
    pub fn new(
        config: Arc<Config>,
        spool: Arc<dyn Queue>,
        scheduler: SchedulerHandle,
        deliverer: Arc<Deliverer>,
    ) -> Result<Monitor, MonitorError> {
        let mut settings =
            ClientSettings::new(config.hostname.clone(), &config.delivery).map_err(MonitorError::Setup)?;
        let cap = config.monitor.probe_timeout.0;
        let t = &mut settings.timeouts;
        for d in
            [&mut t.connect, &mut t.greeting, &mut t.command, &mut t.data_init, &mut t.data_block, &mut t.data_done]
        {
            *d = (*d).min(cap);
        }
        Ok(Monitor {
            alerter: Arc::new(Alerter::new(Arc::clone(&config))),
            config,
            spool,
            scheduler,
            deliverer,
            settings: Arc::new(settings),
            status: SharedStatus::default(),
            rules: Arc::default(),
            seen: Vec::new(),
            sending: JoinSet::new(),
        })
    }

    /// This monitor continues from `state`, the [`Monitor::state`] of the one it replaces.
    pub fn with_state(mut self, state: MonitorState) -> Monitor {
        self.status = state.status;
        self.rules = state.rules;
        self
    }

    /// The state to hand to the next monitor at a reload.
    pub fn state(&self) -> MonitorState {
        MonitorState { status: Arc::clone(&self.status), rules: Arc::clone(&self.rules) }
    }

    /// The status table, for the admin page.
    pub fn status(&self) -> SharedStatus {
        Arc::clone(&self.status)
    }

    /// Probes and evaluates the rules every `probe_interval` (every minute when probes are off)
    /// until `shutdown` turns true; alerts still being sent get a few seconds to finish.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let interval = self.config.monitor.probe_interval.0;
        let tick = if interval.is_zero() { Duration::from_secs(60) } else { interval };
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => break,
            }
            tokio::select! {
                _ = self.round() => {}
                _ = shutdown.changed() => break,
            }
            while self.sending.try_join_next().is_some() {}
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(5), async { while self.sending.join_next().await.is_some() {} })
                .await;
        self.sending.abort_all();
    }

    /// One round: probes, checks, rules.
    async fn round(&mut self) {
        if !self.config.monitor.probe_interval.0.is_zero() {
            for (domain, result) in self.probe_domains().await {
                self.domain_probed(&domain, result).await;
            }
            for (name, result) in self.run_checks().await {
                self.check_ran(&name, result);
            }
        } else {
            self.primaries_from_deliveries();
        }
        self.queue_rules();
        self.spool_rule();
        self.settle().await;
    }

    /// Probes every relayed domain at once, each bounded by `probe_timeout`.
    async fn probe_domains(&self) -> Vec<(String, ProbeResult)> {
        let mut set = JoinSet::new();
        let limit = self.config.monitor.probe_timeout.0;
        for domain in self.config.relay.domains.clone() {
            let (deliverer, settings) = (Arc::clone(&self.deliverer), Arc::clone(&self.settings));
            set.spawn(async move {
                let probe = probe::probe_domain(&deliverer, &settings, &domain);
                let result = tokio::time::timeout(limit, probe).await.unwrap_or_else(|_| ProbeResult {
                    up: false,
                    host: None,
                    latency: None,
                    error: Some(format!("no answer within {}", HumanDuration(limit))),
                });
                (domain, result)
            });
        }
        let mut results: Vec<(String, ProbeResult)> = set.join_all().await;
        results.sort_by(|a, b| a.0.cmp(&b.0));
        results
    }

    async fn run_checks(&self) -> Vec<(String, ProbeResult)> {
        let mut set = JoinSet::new();
        for check in self.config.monitor.check.clone() {
            set.spawn(async move { (check.name.clone(), probe::run_check(&check).await) });
        }
        set.join_all().await
    }

    /// Records a probe, logs a change of state, flushes a destination that came back, and feeds
    /// the primary-down rule.
    async fn domain_probed(&mut self, domain: &str, result: ProbeResult) {
        let now = now_micros();
        let failing = self.record_destination(domain, &result, now);
        let previous = update(&mut lock(&self.status).domains, domain, &result, now);
        log_change(&format!("primary of {domain}"), previous, &result);
        // Down -> up by a probe; or the first probe finds up what deliveries found down.
        let came_back = result.up && (previous == Some(false) || (previous.is_none() && failing));
        if came_back {
            match self.scheduler.flush(Some(domain.to_string())).await {
                Ok(count) => {
                    tracing::info!(domain, messages = count, "probe found the destination back: flushing its queue")
                }
                // The operator paused it: its mail waits for `queue resume`, which flushes then.
                Err(err @ crate::schedule::ScheduleError::Paused(_)) => {
                    tracing::info!(domain, reason = %err, "probe found the destination back; not flushed")
                }
                Err(err) => tracing::error!(domain, error = %err, "cannot flush"),
            }
        }
        let hold = self.config.monitor.primary_down_after.0;
        let (name, host, error) = (domain.to_string(), result.host.clone(), result.error.clone());
        let summary = move |event: Event, since: Option<SystemTime>| match event {
            Event::Recovered => format!("primary of {name} is back: {} answers", host.as_deref().unwrap_or("it")),
            _ => format!("primary of {name} down for {}: {}", age(since), error.as_deref().unwrap_or("no answer")),
        };
        if !hold.is_zero() {
            self.observe("primary_down", domain, false, !result.up, hold, summary);
        }
    }

    /// Writes the probe into the scheduler's destination table; returns whether deliveries (or
    /// probes) found it failing before.
    fn record_destination(&self, domain: &str, result: &ProbeResult, now: i64) -> bool {
        let table = self.scheduler.destination_table();
        let mut table = lock(&table);
        let state = table.entry(domain.to_string()).or_default();
        let failing = state.failing_since.is_some();
        if result.up {
            state.succeeded(now);
        } else {
            state.failed(now, format!("probe: {}", result.error.as_deref().unwrap_or("down")));
        }
        failing
    }

    /// Without probes, the primary-down rule follows the deliveries.
    fn primaries_from_deliveries(&mut self) {
        let hold = self.config.monitor.primary_down_after.0;
        if hold.is_zero() {
            return;
        }
        let table = self.scheduler.destinations();
        for domain in self.config.relay.domains.clone() {
            let state = table.get(&domain).cloned().unwrap_or_default();
            let error = state.last_error.clone().unwrap_or_default();
            let name = domain.clone();
            let summary = move |event, since| match event {
                Event::Recovered => format!("primary of {name} is back: a delivery succeeded"),
                _ => format!("primary of {name} down for {}: {error}", age(since)),
            };
            self.observe("primary_down", &domain, false, state.failing_since.is_some(), hold, summary);
        }
    }

    fn check_ran(&mut self, name: &str, result: ProbeResult) {
        let now = now_micros();
        let previous = update(&mut lock(&self.status).checks, name, &result, now);
        log_change(&format!("check {name}"), previous, &result);
        let hold = self.config.monitor.check.iter().find(|c| c.name == name).map(|c| c.down_after.0);
        let (check, error) = (name.to_string(), result.error.clone());
        let summary = move |event: Event, since: Option<SystemTime>| match event {
            Event::Recovered => format!("check {check} is back"),
            _ => format!("check {check} failing for {}: {}", age(since), error.as_deref().unwrap_or("")),
        };
        // A check is run by each node, of what that node reaches: its state is the node's own.
        self.observe("check", name, true, !result.up, hold.unwrap_or_default(), summary);
    }

    /// Queue length and the age of its oldest message.
    fn queue_rules(&mut self) {
        let stats = self.spool.stats();
        let (count, oldest) = (stats.messages, stats.oldest);
        let max = self.config.monitor.queue_max_messages;
        if max > 0 {
            self.observe("queue_size", "queue", false, count > max, Duration::ZERO, move |event, _| match event {
                Event::Recovered => format!("queue back to {count} messages (threshold {max})"),
                _ => format!("{count} messages queued (threshold {max})"),
            });
        }
        let limit = self.config.monitor.queue_max_age.0;
        if !limit.is_zero() {
            let old = oldest.map(|at| age(Some(from_micros(at))));
            let too_old = oldest.is_some_and(|at| now_micros() - at > to_micros_duration(limit));
            self.observe("queue_age", "queue", false, too_old, Duration::ZERO, move |event, _| match event {
                Event::Recovered => format!("no queued message is older than {} any more", HumanDuration(limit)),
                _ => format!(
                    "oldest queued message is {} old (threshold {})",
                    old.clone().unwrap_or_default(),
                    HumanDuration(limit)
                ),
            });
        }
    }

    fn spool_rule(&mut self) {
        let min = self.config.monitor.spool_min_free_percent;
        if min == 0 {
            return;
        }
        let space = match self.spool.space() {
            Ok(space) if space.total_bytes > 0 => space,
            Ok(_) => return,
            Err(err) => {
                tracing::error!(error = %err, "cannot check free space on the spool");
                return;
            }
        };
        let percent = space.free_bytes.saturating_mul(100) / space.total_bytes;
        // Each node has its own disk.
        let low = percent < u64::from(min);
        self.observe("spool_space", "spool", true, low, Duration::ZERO, move |event, _| match event {
            Event::Recovered => format!("spool filesystem {percent}% free again (threshold {min}%)"),
            _ => format!("spool filesystem only {percent}% free (threshold {min}%)"),
        });
    }

    /// Notes one observation of a rule, decided at the end of the round. `own`: the rule is about
    /// this node's own things (its disk, its checks), not about what every node shares.
    fn observe(
        &mut self,
        rule: &'static str,
        subject: &str,
        own: bool,
        bad: bool,
        hold: Duration,
        summary: impl FnOnce(Event, Option<SystemTime>) -> String + Send + Sync + 'static,
    ) {
        let node = own.then_some(self.config.hostname.as_str());
        let key = rules::key(rule, subject, node);
        self.seen.push(Seen {
            observation: (key, bad, hold),
            rule,
            subject: subject.to_string(),
            summary: Box::new(summary),
        });
    }

    /// Decides the round's observations against the rules' states in the store (on a blocking
    /// thread) and sends an alert for each that is news.
    async fn settle(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        if seen.is_empty() {
            return;
        }
        let observations: Vec<Observation> = seen.iter().map(|s| s.observation.clone()).collect();
        let (spool, known) = (Arc::clone(&self.spool), Arc::clone(&self.rules));
        let reminder = self.config.monitor.reminder_interval.0;
        let decided =
            tokio::task::spawn_blocking(move || rules::decide(spool.as_ref(), &known, &observations, reminder)).await;
        let decided = match decided {
            Ok(decided) => decided,
            Err(err) => {
                tracing::error!(error = %err, "cannot decide the alert rules");
                return;
            }
        };
        for (seen, decided) in seen.into_iter().zip(decided) {
            let Some((event, since)) = decided else { continue };
            let state_name = match event {
                Event::Firing => "firing",
                Event::Reminder => "reminder",
                Event::Recovered => "recovered",
            };
            let summary = (seen.summary)(event, since);
            let alert = Alert::new(&self.config.hostname, seen.rule, &seen.subject, state_name, summary, since);
            tracing::warn!(rule = seen.rule, subject = %seen.subject, state = state_name, "alert: {}", alert.summary);
            let alerter = Arc::clone(&self.alerter);
            self.sending.spawn(async move {
                alerter.send(&alert).await;
            });
        }
    }
}

/// One observation waiting for the end of its round, with what the alert would say.
struct Seen {
    observation: Observation,
    rule: &'static str,
    subject: String,
    summary: Box<dyn FnOnce(Event, Option<SystemTime>) -> String + Send + Sync>,
}

/// Updates one entry of a status table; returns its previous up/down.
fn update(table: &mut BTreeMap<String, WatchStatus>, key: &str, result: &ProbeResult, now: i64) -> Option<bool> {
    let entry = table.entry(key.to_string()).or_default();
    let previous = entry.up;
    if previous != Some(result.up) {
        entry.since = Some(now);
    }
    entry.up = Some(result.up);
    entry.last_probe = Some(now);
    entry.latency_ms = result.latency.map(|l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX));
    entry.host = result.host.clone();
    entry.error = result.error.clone();
    previous
}

/// One log line per change of state (not per probe).
fn log_change(what: &str, previous: Option<bool>, result: &ProbeResult) {
    let host = result.host.as_deref().unwrap_or("");
    match (previous, result.up) {
        (Some(true), true) | (Some(false), false) => {}
        (_, true) => {
            let latency_ms = result.latency.map(|l| l.as_millis()).unwrap_or(0);
            tracing::info!(host, latency_ms, "{what} is up");
        }
        (_, false) => {
            tracing::warn!(host, error = result.error.as_deref().unwrap_or(""), "{what} is down");
        }
    }
}

/// How long ago `since` was, e.g. `1h5m`.
fn age(since: Option<SystemTime>) -> String {
    let elapsed = since.and_then(|s| SystemTime::now().duration_since(s).ok()).unwrap_or_default();
    HumanDuration(Duration::from_secs(elapsed.as_secs())).to_string()
}

fn to_micros_duration(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

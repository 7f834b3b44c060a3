//! Counters the daemon keeps about the mail it handles, rendered for `/metrics` in the Prometheus
//! text format (through `prometheus-client`, with an explicit registry built per scrape).
//!
//! The counters live here for the life of the daemon and are incremented by the stages that see
//! the events (`smtp` for received, rejected and sessions; `schedule` for delivered, deferred and
//! bounced). Everything that can be read from the spool or the scheduler (queue size per domain,
//! oldest message, free space, primary up or down) is computed at scrape time instead, so it can
//! never drift from the truth.
//!
//! prometheus-client writes OpenMetrics, where a counter's `# HELP`/`# TYPE` lines name the family
//! (`x`) and its sample `x_total`. `/metrics` is served as the Prometheus text format 0.0.4, which
//! every scraper and `promtool check metrics` read, and there those lines name the series itself;
//! [`text_format`] makes that one translation.

use crate::config::Config;
use crate::deliver::destination::DestinationState;
use crate::spool::{Queue, now_micros};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

mod process;

/// A label set of one `domain` label.
type DomainLabel = Vec<(String, String)>;

/// Upper bounds (seconds) of the delivery-latency buckets: a backup MX delivers within seconds
/// while the primary is up and after minutes to days while it is down, so the buckets span
/// 1 s to 5 d, roughly doubling or tripling.
const LATENCY_BUCKETS: [f64; 16] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0, 86400.0, 172800.0,
    432000.0,
];

/// The daemon's event counters. Share it as `Arc<Metrics>`; every method is lock-free.
#[derive(Debug)]
pub struct Metrics {
    /// Messages accepted and queued (250 after DATA).
    received: Counter,
    /// Recipients handed to the primary (250 after DATA from the next hop), counted per message.
    delivered: Counter,
    /// Messages deferred at least once, each counted once (its first attempt left it pending).
    deferred: Counter,
    /// Delivery attempts that left their message pending (every retry of a message counts).
    deferred_attempts: Counter,
    /// Seconds from a message's arrival to the attempt that delivered it (once per message
    /// counted in `delivered`).
    latency: Histogram,
    /// Messages returned to their sender (a failure DSN was queued).
    bounced: Counter,
    /// Messages or recipients refused at SMTP time (5xx/4xx to RCPT or DATA).
    rejected: Counter,
    /// SMTP sessions open right now.
    sessions: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            received: Counter::default(),
            delivered: Counter::default(),
            deferred: Counter::default(),
            deferred_attempts: Counter::default(),
            latency: Histogram::new(LATENCY_BUCKETS),
            bounced: Counter::default(),
            rejected: Counter::default(),
            sessions: Gauge::default(),
        }
    }
}

/// Decrements the open-session gauge when the session ends, however it ends.
#[derive(Debug)]
pub struct SessionGuard<'a>(&'a Metrics);

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.0.sessions.dec();
    }
}

impl Metrics {
    /// A message was durably queued.
    pub fn received(&self) {
        self.received.inc();
    }

    /// A message was delivered to the primary (all its recipients of one batch), `seconds` after
    /// it arrived.
    pub fn delivered(&self, seconds: f64) {
        self.delivered.inc();
        self.latency.observe(seconds.max(0.0));
    }

    /// A delivery attempt was deferred (temporary failure; the message stays queued);
    /// `first` when it is the message's first deferral.
    pub fn deferred(&self, first: bool) {
        self.deferred_attempts.inc();
        if first {
            self.deferred.inc();
        }
    }

    /// A message bounced (failure DSN queued or, for the null sender, dropped).
    pub fn bounced(&self) {
        self.bounced.inc();
    }

    /// A message or recipient was refused during the SMTP dialogue.
    pub fn rejected(&self) {
        self.rejected.inc();
    }

    /// An SMTP session started; keep the guard for the session's life.
    pub fn session_started(&self) -> SessionGuard<'_> {
        self.sessions.inc();
        SessionGuard(self)
    }

    /// Open SMTP sessions right now.
    pub fn open_sessions(&self) -> i64 {
        self.sessions.get()
    }

    /// The counters as (name, value), for the JSON status.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::from([
            ("received", self.received.get()),
            ("delivered", self.delivered.get()),
            ("deferred", self.deferred.get()),
            ("deferred_attempts", self.deferred_attempts.get()),
            ("bounced", self.bounced.get()),
            ("rejected", self.rejected.get()),
        ])
    }

    /// The Prometheus text exposition of the counters plus the gauges computed now from `spool`
    /// and the scheduler's `destinations`.
    /// Per-domain series exist for `config`'s destinations only (relayed domains and routes).
    pub fn render(
        &self,
        config: &Config,
        spool: &dyn Queue,
        destinations: &BTreeMap<String, DestinationState>,
    ) -> String {
        // The process_* series are a convention without a prefix; everything else is bartleby_*.
        let mut root = Registry::default();
        register_process(&mut root);
        let registry = root.sub_registry_with_prefix("bartleby");
        register_build_info(registry);
        self.register_counters(registry);
        register_queue(registry, config, spool);
        register_destinations(registry, config, destinations);
        let mut out = String::new();
        if let Err(err) = encode(&mut out, &root) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        text_format(&out)
    }

    fn register_counters(&self, registry: &mut Registry) {
        // Counters are shared handles (an Arc inside), so the per-scrape registry sees live values.
        let counters = [
            ("messages_received", "Messages accepted and queued", &self.received),
            ("messages_delivered", "Messages delivered to the primary", &self.delivered),
            ("messages_deferred", "Messages deferred at least once (counted at their first deferral)", &self.deferred),
            (
                "delivery_attempts_deferred",
                "Delivery attempts that left their message queued for a retry",
                &self.deferred_attempts,
            ),
            ("messages_bounced", "Messages returned to their sender", &self.bounced),
            ("messages_rejected", "Messages or recipients refused during SMTP", &self.rejected),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register("smtp_sessions", "SMTP sessions open now", self.sessions.clone());
        registry.register(
            "delivery_latency_seconds",
            "Seconds from a message's arrival to the attempt that delivered it",
            self.latency.clone(),
        );
    }
}

/// Rewrites prometheus-client's OpenMetrics output as the Prometheus text format 0.0.4: a
/// counter's `# HELP` and `# TYPE` lines name its `_total` series, and there is no `# EOF`.
/// (prometheus-client writes HELP before TYPE, so a HELP line is held until its TYPE is known.)
pub fn text_format(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 256);
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        if line.starts_with("# HELP ") {
            if let Some(held) = help.replace(line) {
                out.push_str(held);
                out.push('\n');
            }
            continue;
        }
        let counter = line.strip_prefix("# TYPE ").and_then(|rest| rest.strip_suffix(" counter"));
        if let Some(held) = help.take() {
            match counter.and_then(|name| Some((name, held.strip_prefix(&format!("# HELP {name} "))?))) {
                Some((name, text)) => out.push_str(&format!("# HELP {name}_total {text}\n")),
                None => {
                    out.push_str(held);
                    out.push('\n');
                }
            }
        }
        match counter {
            Some(name) => out.push_str(&format!("# TYPE {name}_total counter\n")),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if let Some(held) = help {
        out.push_str(held);
        out.push('\n');
    }
    out
}

/// `bartleby_build_info{version="..."} 1`, the usual way to expose a version (a gauge, since the
/// 0.0.4 text format has no info type).
fn register_build_info(registry: &mut Registry) {
    let info = Family::<DomainLabel, Gauge>::default();
    info.get_or_create(&vec![("version".to_string(), env!("CARGO_PKG_VERSION").to_string())]).set(1);
    registry.register("build_info", "The running bartleby's version (always 1)", info);
}

/// The standard process metrics of Prometheus client libraries, read from /proc/self now.
/// A value that cannot be read is left out rather than reported as 0.
fn register_process(registry: &mut Registry) {
    let process = crate::metrics::process::read();
    if let Some(rss) = process.resident_bytes {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(rss).unwrap_or(i64::MAX));
        registry.register("process_resident_memory_bytes", "Resident memory size in bytes", gauge);
    }
    if let Some(cpu) = process.cpu_seconds {
        let counter = Counter::<f64, AtomicU64>::default();
        counter.inc_by(cpu);
        registry.register("process_cpu_seconds", "Total user and system CPU time spent in seconds", counter);
    }
    if let Some(fds) = process.open_fds {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(fds).unwrap_or(i64::MAX));
        registry.register("process_open_fds", "Number of open file descriptors", gauge);
    }
    if let Some(max) = process.max_fds {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(max).unwrap_or(i64::MAX));
        registry.register("process_max_fds", "Maximum number of open file descriptors", gauge);
    }
    if let Some(start) = process.start_time_seconds {
        let gauge = Gauge::<f64, AtomicU64>::default();
        gauge.set(start);
        registry.register("process_start_time_seconds", "Start time of the process since unix epoch in seconds", gauge);
    }
}

fn domain_label(domain: &str) -> DomainLabel {
    vec![("domain".to_string(), domain.to_string())]
}

/// Queue messages and bytes per recipient domain (a message with recipients in two domains counts
/// in both), the age of the oldest message, and the spool filesystem's space.
fn register_queue(registry: &mut Registry, config: &Config, spool: &dyn Queue) {
    let messages = Family::<DomainLabel, Gauge>::default();
    let bytes = Family::<DomainLabel, Gauge>::default();
    let total = Gauge::<i64>::default();
    let oldest = Gauge::<i64>::default();
    let oldest_by_domain = Family::<DomainLabel, Gauge>::default();
    let suppressed = Gauge::<i64>::default();
    let now = now_micros();
    let stats = spool.stats();
    total.set(i64::try_from(stats.messages).unwrap_or(i64::MAX));
    suppressed.set(i64::try_from(stats.bounce_suppressed).unwrap_or(i64::MAX));
    if let Some(first) = stats.oldest {
        oldest.set(now.saturating_sub(first).max(0) / 1_000_000);
    }
    for (domain, counts) in stats.domains.iter().filter(|(d, _)| config.is_destination(d)) {
        let label = domain_label(domain);
        messages.get_or_create(&label).set(i64::try_from(counts.messages).unwrap_or(i64::MAX));
        bytes.get_or_create(&label).set(i64::try_from(counts.bytes).unwrap_or(i64::MAX));
        // Relayed domains only: a route's domain or the senders' domains that our notices go to
        // would make series an alert on "the primary is behind" should not see.
        if config.is_relay_domain(domain) {
            oldest_by_domain.get_or_create(&label).set(now.saturating_sub(counts.oldest).max(0) / 1_000_000);
        }
    }
    registry.register("queue_messages", "Queued messages with recipients pending in the domain", messages);
    registry.register("queue_bytes", "Bytes of queued messages with recipients pending in the domain", bytes);
    // Not `queue_messages_total`: `_total` is reserved for counters, and this is a gauge.
    registry.register("queue_size_messages", "Queued messages (each counted once)", total);
    registry.register(
        "queue_domain_oldest_age_seconds",
        "Age of the oldest message with a recipient pending in the relayed domain",
        oldest_by_domain,
    );
    registry.register("queue_oldest_age_seconds", "Age of the oldest queued message", oldest);
    registry.register(
        "bounces_suppressed",
        "Failed messages kept held instead of bounced to a sender that failed SPF/DKIM (no backscatter)",
        suppressed,
    );
    if let Ok(space) = spool.space() {
        let free = Gauge::<i64>::default();
        free.set(i64::try_from(space.free_bytes).unwrap_or(i64::MAX));
        let size = Gauge::<i64>::default();
        size.set(i64::try_from(space.total_bytes).unwrap_or(i64::MAX));
        registry.register("spool_free_bytes", "Bytes available on the spool's filesystem", free);
        registry.register("spool_size_bytes", "Size of the spool's filesystem", size);
    }
}

/// 1 while the domain's primary took our last delivery (or probe), 0 while it fails.
fn register_destinations(registry: &mut Registry, config: &Config, destinations: &BTreeMap<String, DestinationState>) {
    let up = Family::<DomainLabel, Gauge>::default();
    for (domain, state) in destinations.iter().filter(|(d, _)| config.is_destination(d)) {
        up.get_or_create(&domain_label(domain)).set(i64::from(state.failing_since.is_none()));
    }
    registry.register("primary_up", "Whether the domain's primary accepted the last attempt", up);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_session_gauge() {
        let metrics = Metrics::default();
        metrics.received();
        metrics.received();
        metrics.bounced();
        metrics.deferred(true);
        metrics.deferred(false);
        metrics.delivered(3.0);
        {
            let _a = metrics.session_started();
            let _b = metrics.session_started();
            assert_eq!(metrics.open_sessions(), 2);
        }
        assert_eq!(metrics.open_sessions(), 0);
        assert_eq!(metrics.counters()["received"], 2);
        assert_eq!(metrics.counters()["bounced"], 1);
        assert_eq!(metrics.counters()["deferred"], 1);
        assert_eq!(metrics.counters()["deferred_attempts"], 2);
    }

    #[test]
    fn counter_help_and_type_name_the_total_series() {
        let om = "# HELP a_b Some help.\n# TYPE a_b counter\na_b_total 1\n\
                  # HELP g A gauge.\n# TYPE g gauge\ng 2\n# EOF\n";
        assert_eq!(
            text_format(om),
            "# HELP a_b_total Some help.\n# TYPE a_b_total counter\na_b_total 1\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 2\n"
        );
    }
}

//! Counters the daemon keeps about the mail it handles, rendered for `/metrics` in the Prometheus
//! text format (through `prometheus-client`, with an explicit registry built per scrape).
//!
//! The counters live here for the life of the daemon and are incremented by the stages that see
//! the events (`smtp` for received, rejected and sessions; `schedule` for delivered, deferred and
//! bounced). Everything that can be read from the spool or the scheduler (queue size per domain,
//! oldest message, free space, primary up or down) is computed at scrape time instead, so it can
//! never drift from the truth.

use crate::config::Config;
use crate::deliver::destination::DestinationState;
use crate::spool::{Queue, now_micros};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;

/// A label set of one `domain` label.
type DomainLabel = Vec<(String, String)>;

/// The daemon's event counters. Share it as `Arc<Metrics>`; every method is lock-free.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages accepted and queued (250 after DATA).
    received: Counter,
    /// Recipients handed to the primary (250 after DATA from the next hop), counted per message.
    delivered: Counter,
    /// Delivery attempts that ended in a temporary failure and a retry.
    deferred: Counter,
    /// Messages returned to their sender (a failure DSN was queued).
    bounced: Counter,
    /// Messages or recipients refused at SMTP time (5xx/4xx to RCPT or DATA).
    rejected: Counter,
    /// SMTP sessions open right now.
    sessions: Gauge,
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

    /// A message was delivered to the primary (all its recipients of one batch).
    pub fn delivered(&self) {
        self.delivered.inc();
    }

    /// A delivery attempt was deferred (temporary failure; the message stays queued).
    pub fn deferred(&self) {
        self.deferred.inc();
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
        let mut registry = Registry::with_prefix("bartleby");
        self.register_counters(&mut registry);
        register_queue(&mut registry, config, spool);
        register_destinations(&mut registry, config, destinations);
        let mut out = String::new();
        if let Err(err) = encode(&mut out, &registry) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        out
    }

    fn register_counters(&self, registry: &mut Registry) {
        // Counters are shared handles (an Arc inside), so the per-scrape registry sees live values.
        let counters = [
            ("messages_received", "Messages accepted and queued", &self.received),
            ("messages_delivered", "Messages delivered to the primary", &self.delivered),
            ("messages_deferred", "Delivery attempts deferred after a temporary failure", &self.deferred),
            ("messages_bounced", "Messages returned to their sender", &self.bounced),
            ("messages_rejected", "Messages or recipients refused during SMTP", &self.rejected),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register("smtp_sessions", "SMTP sessions open now", self.sessions.clone());
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
    registry.register("queue_messages_total", "Queued messages", total);
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
        {
            let _a = metrics.session_started();
            let _b = metrics.session_started();
            assert_eq!(metrics.open_sessions(), 2);
        }
        assert_eq!(metrics.open_sessions(), 0);
        assert_eq!(metrics.counters()["received"], 2);
        assert_eq!(metrics.counters()["bounced"], 1);
    }
}

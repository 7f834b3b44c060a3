//! Queue size over the last 24 hours: a task samples the queue every `[web] sample_interval`
//! (default each minute, so a fresh outage shows) into a bounded ring, and the page draws it
//! server-side as SVG (no script, no external assets).
//!
//! The samples are kept in the store as the document `chart` ([`Queue::document`]), so the chart
//! survives a restart; in a shared store the nodes keep one series: a node samples only when no
//! node did for half an interval, and the others read what it wrote.

use crate::lock;
use crate::spool::{Queue, SpoolError, now_micros, rfc3339};
use maud::{Markup, html};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The window the chart covers.
pub const WINDOW: Duration = Duration::from_secs(24 * 3600);
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 160.0;
/// Room for the axis labels.
const MARGIN: f64 = 40.0;

/// The queue's size at one moment.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Sample {
    /// Microseconds since the epoch.
    pub at: i64,
    pub messages: u64,
    pub bytes: u64,
}

/// The last 24 hours of samples.
#[derive(Debug)]
pub struct Samples {
    interval: Duration,
    /// Oldest first; at most `capacity` entries.
    ring: Mutex<VecDeque<Sample>>,
    capacity: usize,
}

impl Samples {
    /// An empty ring holding 24 hours of samples taken every `interval`.
    pub fn new(interval: Duration) -> Samples {
        let secs = interval.as_secs().max(1);
        let capacity = usize::try_from(WINDOW.as_secs().div_ceil(secs)).unwrap_or(1) + 1;
        Samples { interval, ring: Mutex::new(VecDeque::with_capacity(capacity)), capacity }
    }

    /// Adds a sample, dropping the oldest when full.
    pub fn push(&self, sample: Sample) {
        let mut ring = lock(&self.ring);
        while ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(sample);
    }

    /// Samples the queue now, in memory only (when the store cannot keep the samples).
    pub fn record(&self, spool: &dyn Queue) {
        self.push(measure(spool, now_micros()));
    }

    /// Takes a sample now and keeps it in the store, unless a sample was taken less than half an
    /// interval ago (by another node of a shared store, or before a restart); either way the ring
    /// then holds the stored series. Returns whether this call took the sample.
    pub fn take(&self, spool: &dyn Queue) -> Result<bool, SpoolError> {
        let half = i64::try_from(self.interval.as_micros() / 2).unwrap_or(i64::MAX);
        for _ in 0..10 {
            let now = now_micros();
            let stored = spool.document(DOCUMENT)?;
            let mut series = stored.as_ref().map(|(_, body)| decode(body)).unwrap_or_default();
            if series.last().is_some_and(|last| last.at > now - half && last.at <= now) {
                self.replace(series);
                return Ok(false);
            }
            series.push(measure(spool, now));
            let window = i64::try_from(WINDOW.as_micros()).unwrap_or(i64::MAX);
            series.retain(|s| s.at >= now - window && s.at <= now);
            let excess = series.len().saturating_sub(self.capacity);
            series.drain(..excess);
            if spool.replace_document(DOCUMENT, stored.map(|(version, _)| version), encode(&series))? {
                self.replace(series);
                return Ok(true);
            }
        }
        Err(SpoolError::Store("the chart's samples change too often".into()))
    }

    fn replace(&self, series: Vec<Sample>) {
        let skip = series.len().saturating_sub(self.capacity);
        *lock(&self.ring) = series.into_iter().skip(skip).collect();
    }

    /// A copy of the samples, oldest first.
    pub fn snapshot(&self) -> Vec<Sample> {
        lock(&self.ring).iter().copied().collect()
    }
}

/// The document that keeps the samples.
const DOCUMENT: &str = "chart";

/// The stored form: `[at, messages, bytes]` triples, oldest first (about 40 octets a sample).
#[derive(Serialize, serde::Deserialize)]
struct Stored {
    samples: Vec<(i64, u64, u64)>,
}

fn encode(series: &[Sample]) -> Vec<u8> {
    let stored = Stored { samples: series.iter().map(|s| (s.at, s.messages, s.bytes)).collect() };
    serde_json::to_vec(&stored).unwrap_or_default()
}

/// The stored samples; a document that does not parse (written by a newer version, or damaged)
/// starts a new series rather than stopping the chart.
fn decode(body: &[u8]) -> Vec<Sample> {
    match serde_json::from_slice::<Stored>(body) {
        Ok(stored) => {
            let mut series: Vec<Sample> =
                stored.samples.into_iter().map(|(at, messages, bytes)| Sample { at, messages, bytes }).collect();
            series.sort_by_key(|s| s.at);
            series
        }
        Err(err) => {
            tracing::warn!(error = %err, "the chart's stored samples do not parse; starting a new series");
            Vec::new()
        }
    }
}

fn measure(spool: &dyn Queue, at: i64) -> Sample {
    let stats = spool.stats();
    Sample { at, messages: stats.messages as u64, bytes: stats.bytes }
}

/// Samples every interval until `shutdown` turns true; the first tick, at once, also brings back
/// the samples kept before a restart ([`Samples::take`]). The store's work (a file write, or a
/// database round trip) runs on a blocking thread; when the store cannot keep a sample, the
/// sample is kept in memory and the error logged.
pub async fn run_sampler(samples: Arc<Samples>, spool: Arc<dyn Queue>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(samples.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (ring, queue) = (Arc::clone(&samples), Arc::clone(&spool));
        match tokio::task::spawn_blocking(move || ring.take(queue.as_ref())).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot store the chart's sample; kept in memory");
                samples.record(spool.as_ref());
            }
            Err(err) => tracing::error!(error = %err, "chart sampler failed"),
        }
    }
}

/// The chart: messages queued over the 24 hours before `now` (microseconds), as inline SVG.
/// Only presentation attributes are used, so the CSP needs no `style-src 'unsafe-inline'`.
pub fn svg(samples: &[Sample], now: i64) -> Markup {
    let window = i64::try_from(WINDOW.as_micros()).unwrap_or(i64::MAX);
    let start = now - window;
    let max = samples.iter().map(|s| s.messages).max().unwrap_or(0).max(1);
    let x = |at: i64| MARGIN + (at - start).max(0) as f64 / window as f64 * (WIDTH - MARGIN);
    let y = |n: u64| HEIGHT - 20.0 - n as f64 / max as f64 * (HEIGHT - 30.0);
    let points: Vec<String> =
        samples.iter().filter(|s| s.at >= start).map(|s| format!("{:.1},{:.1}", x(s.at), y(s.messages))).collect();
    let title = match samples.last() {
        Some(last) => {
            let noun = if last.messages == 1 { "message" } else { "messages" };
            format!("{} {noun} queued at {}; peak {max} in 24 h", last.messages, rfc3339(last.at))
        }
        None => "no samples yet".to_string(),
    };
    html! {
        svg.chart xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(title) {
            title { (title) }
            line x1=(MARGIN) y1=(HEIGHT - 20.0) x2=(WIDTH) y2=(HEIGHT - 20.0) stroke="#888" stroke-width="1" {}
            line x1=(MARGIN) y1="10" x2=(MARGIN) y2=(HEIGHT - 20.0) stroke="#888" stroke-width="1" {}
            text x="2" y="16" font-size="11" fill="#444" { (max) }
            text x="2" y=(HEIGHT - 20.0) font-size="11" fill="#444" { "0" }
            text x=(MARGIN) y=(HEIGHT - 4.0) font-size="11" fill="#444" { "-24 h" }
            text x=(WIDTH - 30.0) y=(HEIGHT - 4.0) font-size="11" fill="#444" { "now" }
            @if points.len() == 1 {
                circle cx=(x(samples[samples.len() - 1].at)) cy=(y(samples[samples.len() - 1].messages)) r="3" fill="#2a6fdb" {}
            } @else if !points.is_empty() {
                polyline points=(points.join(" ")) fill="none" stroke="#2a6fdb" stroke-width="2" {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_bounded_to_a_day() {
        let samples = Samples::new(Duration::from_secs(3600));
        for i in 0..100 {
            samples.push(Sample { at: i, messages: i as u64, bytes: 0 });
        }
        let snap = samples.snapshot();
        assert_eq!(snap.len(), 25);
        assert_eq!(snap[0].at, 75);
    }

    /// Samples are kept in the store: a new ring (a restart) reads them back, and a second sampler
    /// on the same store (another node) within half an interval reads instead of sampling again.
    #[test]
    fn samples_are_kept_in_the_store_and_shared() {
        let queue = crate::spool::MemoryQueue::new();
        let first = Samples::new(Duration::from_secs(60));
        assert!(first.take(queue.as_ref()).unwrap());
        let other_node = Samples::new(Duration::from_secs(60));
        assert!(!other_node.take(queue.as_ref()).unwrap(), "sampled less than half an interval ago");
        assert_eq!(other_node.snapshot(), first.snapshot());
        let restarted = Samples::new(Duration::from_secs(60));
        assert!(!restarted.take(queue.as_ref()).unwrap());
        assert_eq!(restarted.snapshot(), first.snapshot(), "a restart brings the samples back");
        // A sample older than half an interval is followed by a new one.
        let old = Sample { at: now_micros() - 40_000_000, messages: 5, bytes: 9 };
        let (version, _) = queue.document(DOCUMENT).unwrap().unwrap();
        assert!(queue.replace_document(DOCUMENT, Some(version), encode(&[old])).unwrap());
        assert!(restarted.take(queue.as_ref()).unwrap());
        let series = restarted.snapshot();
        assert_eq!(series.len(), 2);
        assert_eq!(series[0], old);
        // A damaged document starts a new series instead of stopping the chart.
        let (version, _) = queue.document(DOCUMENT).unwrap().unwrap();
        assert!(queue.replace_document(DOCUMENT, Some(version), b"{not json".to_vec()).unwrap());
        assert!(restarted.take(queue.as_ref()).unwrap());
        assert_eq!(restarted.snapshot().len(), 1);
    }

    #[test]
    fn svg_draws_a_line_and_labels() {
        let now = 100 * 3_600_000_000;
        let samples =
            [Sample { at: now - 7_200_000_000, messages: 10, bytes: 0 }, Sample { at: now, messages: 40, bytes: 0 }];
        let drawn = svg(&samples, now).into_string();
        assert!(drawn.contains("<polyline"), "{drawn}");
        assert!(drawn.contains(">40<"), "{drawn}");
        assert!(svg(&[], now).into_string().contains("no samples yet"));
    }
}

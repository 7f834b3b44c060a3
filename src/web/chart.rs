//! Queue size over the last 24 hours: a task samples the spool every `[web] sample_interval` into
//! a bounded ring, and the page draws it server-side as SVG (no script, no external assets).

use crate::lock;
use crate::spool::{Queue, now_micros, rfc3339};
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

    /// Samples the spool now.
    pub fn record(&self, spool: &dyn Queue) {
        let stats = spool.stats();
        let (messages, bytes) = (stats.messages, stats.bytes);
        self.push(Sample { at: now_micros(), messages: messages as u64, bytes });
    }

    /// A copy of the samples, oldest first.
    pub fn snapshot(&self) -> Vec<Sample> {
        lock(&self.ring).iter().copied().collect()
    }
}

/// Samples every interval until `shutdown` turns true.
pub async fn run_sampler(samples: Arc<Samples>, spool: Arc<dyn Queue>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(samples.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => samples.record(spool.as_ref()),
            _ = shutdown.changed() => return,
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

//! How long a client may take (RFC 5321 4.5.3.2): a bound per read (`smtp.command_timeout`,
//! `smtp.data_timeout`), a bound per whole command line (`smtp.command_deadline`) and a bound for the
//! whole DATA phase (`smtp.data_deadline`, extended by the octets received at `smtp.data_min_rate`).
//!
//! A bound per read alone lets a client that sends one octet every few seconds hold a session
//! forever; the deadlines here do not move when a read brings a single octet. This is the shape of
//! Postfix's smtpd_per_request_deadline with smtpd_min_data_rate.
//!
//! [`Pace`] is pure bookkeeping over instants the caller passes in, so its rules are tested without
//! waiting; the socket loop sleeps until [`Pace::deadline`].

use crate::config::SmtpConfig;
use std::time::Duration;
use tokio::time::Instant;

/// The bounds, copied from `[smtp]` when a session starts.
#[derive(Debug, Clone, Copy)]
pub struct PaceLimits {
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub command_deadline: Duration,
    pub data_deadline: Duration,
    /// Octets per second; 0 makes `data_deadline` a fixed bound.
    pub data_min_rate: u64,
}

impl PaceLimits {
    pub fn from_config(smtp: &SmtpConfig) -> PaceLimits {
        PaceLimits {
            command_timeout: smtp.command_timeout.0,
            data_timeout: smtp.data_timeout.0,
            command_deadline: smtp.command_deadline.0,
            data_deadline: smtp.data_deadline.0,
            data_min_rate: smtp.data_min_rate,
        }
    }
}

/// What the client owes us now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A command line, since our previous reply went out (or the greeting).
    Command { since: Instant },
    /// Message data, since the 354; `received` octets so far.
    Data { since: Instant, received: u64 },
}

/// One session's clock.
#[derive(Debug, Clone)]
pub struct Pace {
    limits: PaceLimits,
    phase: Phase,
    /// The last read that brought octets: the per-read timeouts count from here.
    last_read: Instant,
}

impl Pace {
    /// A session that has just been greeted and owes us its first command.
    pub fn new(limits: PaceLimits, now: Instant) -> Pace {
        Pace { limits, phase: Phase::Command { since: now }, last_read: now }
    }

    /// The session answered something (or the commit finished): from `now` it owes a command, or,
    /// when `in_data`, message data. A DATA phase already running keeps its start.
    pub fn progressed(&mut self, in_data: bool, now: Instant) {
        self.phase = match (self.phase, in_data) {
            (Phase::Data { .. }, true) => return,
            (Phase::Command { .. }, true) => Phase::Data { since: now, received: 0 },
            (_, false) => Phase::Command { since: now },
        };
        self.last_read = now;
    }

    /// `octets` arrived at `now`.
    pub fn received(&mut self, octets: usize, now: Instant) {
        self.last_read = now;
        if let Phase::Data { received, .. } = &mut self.phase {
            *received = received.saturating_add(octets as u64);
        }
    }

    /// When the session is out of time if nothing more arrives: the earlier of the per-read timeout
    /// and the deadline of the command line or the DATA phase.
    pub fn deadline(&self) -> Instant {
        let (per_read, whole) = match self.phase {
            Phase::Command { since } => (
                self.last_read.checked_add(self.limits.command_timeout),
                since.checked_add(self.limits.command_deadline),
            ),
            Phase::Data { since, received } => (
                self.last_read.checked_add(self.limits.data_timeout),
                since.checked_add(self.limits.data_deadline).and_then(|d| d.checked_add(self.earned(received))),
            ),
        };
        match (per_read, whole) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            // Both bounds beyond what an Instant can hold: a year is as good as never.
            (None, None) => self.last_read + Duration::from_secs(365 * 86_400),
        }
    }

    /// How far behind the client has fallen, as the instant from which it owes us something it has
    /// not sent: the start of the command line it is sending, or in DATA the start of the phase
    /// moved on by the time its octets have earned at `data_min_rate` (a later instant than `now`
    /// when it sends faster than that). Under overload the session behind longest makes room.
    pub fn behind_since(&self) -> Instant {
        match self.phase {
            Phase::Command { since } => since,
            Phase::Data { since, received } => since.checked_add(self.earned(received)).unwrap_or(since),
        }
    }

    /// The time `octets` earn at `data_min_rate` (none when the rate is 0).
    fn earned(&self, octets: u64) -> Duration {
        if self.limits.data_min_rate == 0 {
            return Duration::ZERO;
        }
        let nanos = u128::from(octets) * 1_000_000_000 / u128::from(self.limits.data_min_rate);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn limits() -> PaceLimits {
        PaceLimits {
            command_timeout: 5 * S,
            data_timeout: 10 * S,
            command_deadline: 20 * S,
            data_deadline: 30 * S,
            data_min_rate: 100,
        }
    }

    #[test]
    fn a_trickled_command_line_keeps_its_deadline() {
        let start = Instant::now();
        let mut pace = Pace::new(limits(), start);
        assert_eq!(pace.deadline(), start + 5 * S, "an idle client: the per-read timeout");
        // One octet every 2 s: the per-read timeout never fires, the command deadline does.
        for i in 1..=9 {
            pace.received(1, start + 2 * i * S);
        }
        assert_eq!(pace.deadline(), start + 20 * S);
        assert_eq!(pace.behind_since(), start);
        // A complete command: the next line has its own deadline.
        pace.progressed(false, start + 19 * S);
        assert_eq!(pace.deadline(), start + 24 * S);
        assert_eq!(pace.behind_since(), start + 19 * S);
    }

    #[test]
    fn data_earns_time_at_the_minimum_rate() {
        let start = Instant::now();
        let mut pace = Pace::new(limits(), start);
        pace.progressed(true, start);
        // A trickle: 1 octet a second earns 10 ms each, so the phase ends near its 30 s.
        for i in 1..=29 {
            pace.received(1, start + i * S);
        }
        assert_eq!(pace.deadline(), start + 30 * S + Duration::from_millis(290));
        // A real sender: 10,000 octets a second stays ahead, bound only by the per-read timeout.
        let mut pace = Pace::new(limits(), start);
        pace.progressed(true, start);
        for i in 1..=100 {
            pace.received(10_000, start + i * S);
            assert_eq!(pace.deadline(), start + (i + 10) * S);
        }
        assert!(pace.behind_since() > start + 100 * S, "ahead of the minimum rate");
        // More of the same phase does not restart it; its end does.
        pace.progressed(true, start + 101 * S);
        assert!(pace.behind_since() > start + 100 * S);
        pace.progressed(false, start + 102 * S);
        assert_eq!(pace.behind_since(), start + 102 * S);
    }

    #[test]
    fn rate_zero_makes_the_data_deadline_fixed() {
        let start = Instant::now();
        let mut pace = Pace::new(PaceLimits { data_min_rate: 0, ..limits() }, start);
        pace.progressed(true, start);
        pace.received(usize::MAX, start + 25 * S);
        assert_eq!(pace.deadline(), start + 30 * S);
        assert_eq!(pace.behind_since(), start);
    }

    #[test]
    fn huge_bounds_do_not_overflow() {
        let start = Instant::now();
        let forever = Duration::from_secs(u64::MAX);
        let mut pace = Pace::new(
            PaceLimits {
                command_timeout: forever,
                data_timeout: forever,
                command_deadline: forever,
                data_deadline: forever,
                data_min_rate: 1,
            },
            start,
        );
        assert!(pace.deadline() > start);
        pace.progressed(true, start);
        pace.received(usize::MAX, start);
        assert!(pace.deadline() > start);
        assert!(pace.behind_since() >= start);
    }
}

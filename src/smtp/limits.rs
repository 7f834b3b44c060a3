//! Limits per client IP address that hold under abuse: concurrent sessions, and messages and
//! recipients per minute (like Postfix's anvil: smtpd_client_connection_count_limit,
//! smtpd_client_message_rate_limit, smtpd_client_recipient_rate_limit).

use crate::lock;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The rate window.
const MINUTE: Duration = Duration::from_secs(60);
/// Beyond this many tracked addresses, stale windows are swept so the table stays bounded.
const SWEEP_AT: usize = 10_000;

/// One address's counts in the current minute.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    messages: u32,
    recipients: u32,
}

/// Counters shared by every session of one server.
#[derive(Debug, Default)]
pub struct IpLimits {
    sessions: Mutex<HashMap<IpAddr, usize>>,
    rates: Mutex<HashMap<IpAddr, Window>>,
}

/// A session's place in the per-IP count; given back on drop.
#[derive(Debug)]
pub struct SessionSlot {
    limits: Arc<IpLimits>,
    ip: IpAddr,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut sessions = lock(&self.limits.sessions);
        if let Some(count) = sessions.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                sessions.remove(&self.ip);
            }
        }
    }
}

/// Which per-minute count a request is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    Messages,
    Recipients,
}

impl IpLimits {
    pub fn new() -> Arc<IpLimits> {
        Arc::new(IpLimits::default())
    }

    /// A slot for one more session from `ip`, or None when it has `max` already.
    pub fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SessionSlot> {
        let mut sessions = lock(&self.sessions);
        let count = sessions.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(SessionSlot { limits: Arc::clone(self), ip })
    }

    /// Sessions open from `ip` now.
    pub fn sessions(&self, ip: IpAddr) -> usize {
        lock(&self.sessions).get(&ip).copied().unwrap_or(0)
    }

    /// Charges one message or recipient to `ip`; false when that would pass `max` this minute (the
    /// refused request is not counted).
    pub fn charge(&self, ip: IpAddr, rate: Rate, max: u32, now: Instant) -> bool {
        let mut rates = lock(&self.rates);
        if rates.len() >= SWEEP_AT {
            rates.retain(|_, w| now.duration_since(w.start) < MINUTE);
        }
        let window = rates.entry(ip).or_insert(Window { start: now, messages: 0, recipients: 0 });
        if now.duration_since(window.start) >= MINUTE {
            *window = Window { start: now, messages: 0, recipients: 0 };
        }
        let count = match rate {
            Rate::Messages => &mut window.messages,
            Rate::Recipients => &mut window.recipients,
        };
        if *count >= max {
            return false;
        }
        *count += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_per_ip() {
        let limits = IpLimits::new();
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let other: IpAddr = "192.0.2.2".parse().expect("ip");
        let a = limits.enter(ip, 2).expect("first");
        let _b = limits.enter(ip, 2).expect("second");
        assert!(limits.enter(ip, 2).is_none());
        assert!(limits.enter(other, 2).is_some());
        drop(a);
        assert_eq!(limits.sessions(ip), 1);
        assert!(limits.enter(ip, 2).is_some());
    }

    #[test]
    fn rates_per_minute() {
        let limits = IpLimits::new();
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let start = Instant::now();
        assert!(limits.charge(ip, Rate::Messages, 2, start));
        assert!(limits.charge(ip, Rate::Messages, 2, start));
        assert!(!limits.charge(ip, Rate::Messages, 2, start));
        assert!(limits.charge(ip, Rate::Recipients, 1, start), "counted apart");
        assert!(limits.charge(ip, Rate::Messages, 2, start + MINUTE), "a new minute");
    }
}

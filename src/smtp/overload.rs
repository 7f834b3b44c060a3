//! Room for real senders when `smtp.max_sessions` is reached.
//!
//! Slow clients that each stay within their deadlines can still fill every session. Postfix answers
//! this with overload mode, which shortens smtpd_timeout to 10 s while the server is full; here a new
//! client takes the place of the session that has been behind longest (see
//! [`super::pace::Pace::behind_since`]), if it has been behind at least `smtp.overload_timeout`. A
//! real sender answers each reply within milliseconds and sends data faster than
//! `smtp.data_min_rate`, so it is never the one chosen; a session busy with our own work (a commit,
//! a callout, the greeting) is never chosen either.

use crate::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// `behind` of a session that is waiting for us, not for its client.
const BUSY: u64 = u64::MAX;

/// Every open session's standing, shared by the listener.
#[derive(Debug)]
pub struct Overload {
    /// Instants are kept as milliseconds after this one, so a standing fits in an atomic.
    epoch: Instant,
    sessions: Mutex<HashMap<u64, Arc<Standing>>>,
    next_id: AtomicU64,
}

/// One session's standing: how far behind it is, and how it is told to make room.
#[derive(Debug)]
pub struct Standing {
    /// Milliseconds after the epoch since which it is behind ([`BUSY`] while we are working).
    behind: AtomicU64,
    /// Chosen to make room; it must not be chosen twice.
    chosen: AtomicBool,
    /// Wakes the session to close.
    evict: Notify,
}

/// A session's entry, removed when it is dropped.
#[derive(Debug)]
pub struct Registered {
    overload: Arc<Overload>,
    id: u64,
    standing: Arc<Standing>,
}

impl Overload {
    pub fn new() -> Arc<Overload> {
        Arc::new(Overload { epoch: Instant::now(), sessions: Mutex::default(), next_id: AtomicU64::new(0) })
    }

    /// Enters a new session, busy until it says otherwise.
    pub fn register(self: &Arc<Self>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let standing =
            Arc::new(Standing { behind: AtomicU64::new(BUSY), chosen: AtomicBool::new(false), evict: Notify::new() });
        lock(&self.sessions).insert(id, Arc::clone(&standing));
        Registered { overload: Arc::clone(self), id, standing }
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(BUSY - 1)
    }

    /// Tells the session that has been behind longest, by at least `min_behind`, to close; false
    /// when no session qualifies.
    pub fn evict_one(&self, now: Instant, min_behind: Duration) -> bool {
        let now = self.millis(now);
        let min_behind = u64::try_from(min_behind.as_millis()).unwrap_or(u64::MAX);
        let sessions = lock(&self.sessions);
        let victim = sessions
            .values()
            .filter(|s| !s.chosen.load(Ordering::Relaxed))
            .map(|s| (s.behind.load(Ordering::Relaxed), s))
            .filter(|&(behind, _)| behind != BUSY && now.saturating_sub(behind) >= min_behind && behind <= now)
            .min_by_key(|&(behind, _)| behind);
        let Some((behind, standing)) = victim else { return false };
        standing.chosen.store(true, Ordering::Relaxed);
        standing.evict.notify_one();
        tracing::info!(behind_ms = now - behind, "smtp: session limit reached, closing the session furthest behind");
        true
    }
}

impl Registered {
    /// The session waits for its client, who is behind since `since`.
    pub fn behind_since(&self, since: Instant) {
        self.standing.behind.store(self.overload.millis(since), Ordering::Relaxed);
    }

    /// The session waits for us (a commit, a callout): it cannot be chosen meanwhile.
    pub fn busy(&self) {
        self.standing.behind.store(BUSY, Ordering::Relaxed);
    }

    /// Resolves once this session was chosen to make room.
    pub async fn evicted(&self) {
        self.standing.evict.notified().await;
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.overload.sessions).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn the_session_behind_longest_is_chosen_once() {
        let overload = Overload::new();
        let start = Instant::now();
        let busy = overload.register();
        let recent = overload.register();
        let oldest = overload.register();
        let older = overload.register();
        recent.behind_since(start + 25 * S);
        oldest.behind_since(start);
        older.behind_since(start + 5 * S);
        let now = start + 30 * S;
        assert!(overload.evict_one(now, 10 * S));
        tokio::time::timeout(S, oldest.evicted()).await.expect("the oldest was told");
        assert!(overload.evict_one(now, 10 * S));
        tokio::time::timeout(S, older.evicted()).await.expect("then the next oldest");
        // Behind 5 s only, or busy: nobody else qualifies.
        assert!(!overload.evict_one(now, 10 * S));
        drop(busy);
        assert_eq!(lock(&overload.sessions).len(), 3);
    }

    #[tokio::test]
    async fn a_session_ahead_of_its_rate_is_never_chosen() {
        let overload = Overload::new();
        let start = Instant::now();
        let fast = overload.register();
        // A DATA phase ahead of the minimum rate stands in the future.
        fast.behind_since(start + 60 * S);
        assert!(!overload.evict_one(start + 30 * S, Duration::ZERO));
        fast.busy();
        assert!(!overload.evict_one(start + 90 * S, Duration::ZERO));
    }
}

//! Idle SMTP connections kept open between batches, like Postfix's scache: a queue run that ends
//! leaves its connections here, and the next batch for the same destination takes them instead of
//! connecting, greeting, EHLO-ing (and negotiating TLS) again. A connection waits at most
//! [`IDLE_LIMIT`] and is retired after [`REUSE_TIME_LIMIT`]; each one taken starts its next
//! transaction with RSET (RFC 5321 4.1.1.5). A cached connection the server has closed in the
//! meantime is noticed at that RSET; the worker then sends the message on a fresh connection (see
//! `Transaction::stale`), so a dead cached connection never costs a message a deferral.

use super::client::{Session, TlsMode};
use super::route::NextHop;
use crate::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an idle connection waits for the next batch (Postfix's
/// `smtp_connection_cache_time_limit`, 2 s): long enough to carry a drain from batch to batch and
/// a steady trickle of new mail, short enough not to hold a primary's session slots for nothing.
pub const IDLE_LIMIT: Duration = Duration::from_secs(2);

/// A connection is not reused once it is this old (Postfix's `smtp_connection_reuse_time_limit`),
/// so a long drain still moves to a more preferred MX that came back.
pub const REUSE_TIME_LIMIT: Duration = Duration::from_secs(300);

/// Connections are cached per destination domain and TLS policy: a session opened for a
/// `require_tls` domain has a verified certificate, an opportunistic one may not.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub domain: String,
    pub tls: TlsMode,
    /// Opened under DANE (RFC 7672): hosts with TLSA records were matched against them.
    pub dane: bool,
}

/// One idle connection.
struct Idle {
    /// Identifies the entry for its expiry timer.
    ticket: u64,
    session: Session,
    since: Instant,
}

/// The idle connections of every destination.
#[derive(Default)]
pub struct ConnectionCache {
    idle: Mutex<HashMap<CacheKey, Vec<Idle>>>,
    tickets: AtomicU64,
}

impl ConnectionCache {
    /// The most recently used idle connection of `key` to one of `hops`, if any is still fresh.
    pub fn take(&self, key: &CacheKey, hops: &[NextHop]) -> Option<Session> {
        let mut stale = Vec::new();
        let taken = {
            let mut idle = lock(&self.idle);
            let entries = idle.get_mut(key)?;
            let mut taken = None;
            while let Some(entry) = entries.pop() {
                let current = hops.iter().any(|h| h.addr == entry.session.addr() && h.host == entry.session.host());
                if current && entry.since.elapsed() < IDLE_LIMIT && entry.session.age() < REUSE_TIME_LIMIT {
                    taken = Some(entry.session);
                    break;
                }
                stale.push(entry.session);
            }
            if entries.is_empty() {
                idle.remove(key);
            }
            taken
        };
        for session in stale {
            tokio::spawn(session.quit());
        }
        taken
    }

    /// Keeps `session` for the next batch of `key`, at most `max` per key (the oldest idle one is
    /// closed), and closes it with QUIT when nobody took it within [`IDLE_LIMIT`].
    pub fn put(self: &Arc<Self>, key: CacheKey, session: Session, max: usize) {
        if session.age() >= REUSE_TIME_LIMIT || max == 0 {
            tokio::spawn(session.quit());
            return;
        }
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let evicted = {
            let mut idle = lock(&self.idle);
            let entries = idle.entry(key.clone()).or_default();
            entries.push(Idle { ticket, session, since: Instant::now() });
            (entries.len() > max).then(|| entries.remove(0).session)
        };
        if let Some(old) = evicted {
            tokio::spawn(old.quit());
        }
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(IDLE_LIMIT).await;
            if let Some(session) = cache.remove(&key, ticket) {
                session.quit().await;
            }
        });
    }

    /// Closes every idle connection with QUIT (at shutdown, or when a test wants a clean end).
    pub async fn close_all(&self) {
        let sessions: Vec<Session> =
            lock(&self.idle).drain().flat_map(|(_, entries)| entries.into_iter().map(|e| e.session)).collect();
        let mut quits = tokio::task::JoinSet::new();
        for session in sessions {
            quits.spawn(session.quit());
        }
        while quits.join_next().await.is_some() {}
    }

    /// How many idle connections are kept (for tests and the log).
    pub fn len(&self) -> usize {
        lock(&self.idle).values().map(Vec::len).sum()
    }

    /// No idle connection is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, key: &CacheKey, ticket: u64) -> Option<Session> {
        let mut idle = lock(&self.idle);
        let entries = idle.get_mut(key)?;
        let at = entries.iter().position(|e| e.ticket == ticket)?;
        let session = entries.remove(at).session;
        if entries.is_empty() {
            idle.remove(key);
        }
        Some(session)
    }
}

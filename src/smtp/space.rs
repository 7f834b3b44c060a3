//! Free space on the spool for the mail being received (issue 16, point 4).
//!
//! Checking only at MAIL that `queue.min_free` octets are free let a burst of sessions each pass
//! the check and then fill the disk together, so the last ones got `451 4.3.0 queue file write
//! error` from a full disk. Here every message being received holds a [`Reservation`]: its declared
//! SIZE (RFC 1870) at MAIL, grown as its octets arrive. A new reservation, or a larger one, must
//! leave `queue.min_free` free beyond all of them, and the space is looked at afresh before the
//! commit, so the answer is `452 4.3.1` (RFC 3463: mail system full) while there is still room,
//! as Postfix's smtpd does with `queue_minfree` and the declared size.
//!
//! The accounting errs on the safe side: octets a session has already written to an `incoming/`
//! file are both missing from the free space and still counted in its reservation, until the
//! commit releases it.

use super::ServerContext;
use crate::lock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Free-space checks are cached this long, so a burst of MAILs costs one statvfs. A released
/// reservation is taken off the cached free space, since the octets it stood for may now be on disk.
const SPACE_CACHE: Duration = Duration::from_secs(1);
/// Fewer free inodes than this counts as no room (a message may need two files and a rename).
const MIN_FREE_INODES: u64 = 64;

/// Free space on the spool and the octets promised to messages being received; shared by all sessions.
pub struct SpaceMonitor {
    state: Mutex<State>,
}

struct State {
    /// The last statvfs: when, and the free octets (None: no room, or the check failed).
    last: Option<(Instant, Option<u64>)>,
    /// Octets reserved by messages not yet committed or dropped.
    reserved: u64,
    /// When the refusal was last logged, so a full disk logs once a second, not once a command.
    warned: Option<Instant>,
}

/// Octets promised to one message; given back when it is dropped (after the commit, or with the
/// transaction).
pub struct Reservation {
    monitor: Arc<SpaceMonitor>,
    octets: u64,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation").field("octets", &self.octets).finish()
    }
}

impl SpaceMonitor {
    pub fn new() -> SpaceMonitor {
        SpaceMonitor { state: Mutex::new(State { last: None, reserved: 0, warned: None }) }
    }

    /// Reserves `octets` (the declared SIZE, or 0) for a new message, if they fit.
    pub fn reserve(self: &Arc<Self>, context: &ServerContext, octets: u64) -> Option<Reservation> {
        let mut state = lock(&self.state);
        if !fits(&mut state, context, octets, false) {
            return None;
        }
        state.reserved = state.reserved.saturating_add(octets);
        Some(Reservation { monitor: Arc::clone(self), octets })
    }

    /// Grows `reservation` to `octets` if they fit; true when it holds that much now.
    pub fn grow(&self, reservation: &mut Reservation, context: &ServerContext, octets: u64) -> bool {
        let Some(extra) = octets.checked_sub(reservation.octets).filter(|&extra| extra > 0) else { return true };
        let mut state = lock(&self.state);
        if !fits(&mut state, context, extra, false) {
            return false;
        }
        state.reserved = state.reserved.saturating_add(extra);
        reservation.octets = octets;
        true
    }

    /// Just before the commit, with a fresh look at the disk: do the message's `octets` still fit
    /// beyond the other messages' reservations?
    pub fn confirm(&self, reservation: &Reservation, context: &ServerContext, octets: u64) -> bool {
        let mut state = lock(&self.state);
        let others = state.reserved.saturating_sub(reservation.octets);
        let need = context.config.queue.min_free.saturating_add(others).saturating_add(octets);
        let room = free(&mut state, context, true).is_some_and(|free| free >= need);
        if !room {
            warn(&mut state, context, octets);
        }
        room
    }

    /// Octets reserved by every message being received.
    pub fn reserved(&self) -> u64 {
        lock(&self.state).reserved
    }
}

impl Default for SpaceMonitor {
    fn default() -> Self {
        SpaceMonitor::new()
    }
}

impl Reservation {
    /// Octets held.
    pub fn octets(&self) -> u64 {
        self.octets
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut state = lock(&self.monitor.state);
        state.reserved = state.reserved.saturating_sub(self.octets);
        // Committed, its octets are on disk though the cached figure may predate them; dropped, they
        // are free again, and the next statvfs (within a second) says so.
        let octets = self.octets;
        if let Some((_, Some(free))) = state.last.as_mut() {
            *free = free.saturating_sub(octets);
        }
    }
}

/// Would `extra` more octets leave `queue.min_free` free beyond every reservation?
fn fits(state: &mut State, context: &ServerContext, extra: u64, fresh: bool) -> bool {
    let need = context.config.queue.min_free.saturating_add(state.reserved).saturating_add(extra);
    let room = free(state, context, fresh).is_some_and(|free| free >= need);
    if !room {
        warn(state, context, extra);
    }
    room
}

/// Free octets on the spool (cached unless `fresh`); None when inodes run out or statvfs fails:
/// better a 452 than a message we cannot store.
fn free(state: &mut State, context: &ServerContext, fresh: bool) -> Option<u64> {
    if !fresh
        && let Some((at, free)) = state.last
        && at.elapsed() < SPACE_CACHE
    {
        return free;
    }
    let free = match context.spool.space() {
        Ok(space) if space.total_inodes == 0 || space.free_inodes >= MIN_FREE_INODES => Some(space.free_bytes),
        Ok(_) => None,
        Err(err) => {
            tracing::error!(error = %err, "cannot check free space on the spool");
            None
        }
    };
    state.last = Some((Instant::now(), free));
    free
}

fn warn(state: &mut State, context: &ServerContext, wanted: u64) {
    if state.warned.is_some_and(|at| at.elapsed() < SPACE_CACHE) {
        return;
    }
    state.warned = Some(Instant::now());
    let free = state.last.and_then(|(_, free)| free);
    tracing::warn!(min_free = context.config.queue.min_free, free = ?free, reserved = state.reserved, wanted,
        "spool is low on space: refusing new mail");
}

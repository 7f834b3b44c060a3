//! bartleby: a backup ("fall-back") MX.
//!
//! A message's life, one module per stage:
//! - [`smtp`]: inbound SMTP sessions (byte-driven state machines) and the listener;
//! - [`spool`]: the durable queue, the only code that touches queue files;
//! - [`schedule`]: when to try which message (backoff, queue runs, flushes, lifetimes);
//! - [`deliver`]: where a message goes (routes, MX and the backup-MX rule) and the SMTP client;
//! - [`dsn`]: delivery status notifications (RFC 3464 bounces and delay notices).
//!
//! Guarding the door (issue 6): [`recipients`] (which addresses are real: lists, the site's LDAP
//! directory, callouts, what deliveries taught) and [`auth`] (SPF/DKIM verdicts that decide whether
//! a bounce may be sent).
//!
//! Beside them: [`config`] (the TOML file), [`control`] (the daemon's control socket, used by
//! [`cli`]), [`monitor`] (probes of the primaries, auto-flush, alert rules and channels, checks of
//! other services), [`check_dns`] (are the MX records right for a backup MX?), [`web`] (the admin
//! page, JSON API, `/metrics`) with [`metrics`] (the event counters), and [`daemon`], which wires
//! the parts together for `bartleby serve`.

pub mod auth;
pub mod check_config;
pub mod check_dns;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod deliver;
pub mod dsn;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod privilege;
pub mod recipients;
pub mod schedule;
pub mod smtp;
pub mod spool;
pub mod web;
pub mod xtext;

/// Locks a std mutex, taking over a poisoned one: a panic elsewhere leaves the data as consistent
/// as the last completed update, and a mail server must keep going rather than panic in turn.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

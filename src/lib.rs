//! bartleby: a backup ("fall-back") MX.
//!
//! A message's life, one module per stage:
//! - [`smtp`]: inbound SMTP sessions (byte-driven state machines) and the listener;
//! - [`spool`]: the durable queue, the only code that touches queue files;
//! - [`schedule`]: when to try which message (backoff, queue runs, flushes, lifetimes);
//! - [`deliver`]: where a message goes (routes, MX and the backup-MX rule) and the SMTP client;
//! - [`dsn`]: delivery status notifications (RFC 3464 bounces and delay notices).
//!
//! Guarding the door (issue 6): [`recipients`] (which addresses are real: lists, callouts, what
//! deliveries taught) and [`auth`] (SPF/DKIM verdicts that decide whether a bounce may be sent).
//!
//! Beside them: [`config`] (the TOML file), [`control`] (the daemon's control socket, used by
//! [`cli`]), and [`daemon`], which wires the parts together for `bartleby serve`.

pub mod auth;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod deliver;
pub mod dsn;
pub mod privilege;
pub mod recipients;
pub mod schedule;
pub mod smtp;
pub mod spool;

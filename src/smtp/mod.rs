//! Inbound SMTP (RFC 5321): sessions are byte-driven state machines; the listener is a thin loop.

use crate::config::Config;
use crate::spool::{Envelope, Spool};
use std::sync::Arc;

/// What a session needs from the rest of the daemon.
pub struct ServerContext {
    pub config: Arc<Config>,
    pub spool: Arc<Spool>,
    /// Called after a message is durably queued (and before 250 is sent), so the scheduler can
    /// consider it at once.
    pub on_queued: Box<dyn Fn(&Envelope) + Send + Sync>,
}

/// Listens on already-bound sockets until `shutdown` turns true, then answers 421 to open sessions.
pub async fn serve(
    context: Arc<ServerContext>,
    listeners: Vec<tokio::net::TcpListener>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let _ = (context, listeners);
    let _ = shutdown.changed().await;
    unimplemented!("smtp serve")
}

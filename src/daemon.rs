//! `bartleby serve`: wires the stages together. Binds every listener first, recovers the spool,
//! starts the scheduler, the control socket and the SMTP server, and stops them in order on
//! SIGTERM or SIGINT: no new mail, 421 to open sessions, nothing half-written left behind.

use crate::auth::SenderCheck;
use crate::config::Config;
use crate::control;
use crate::deliver::Deliverer;
use crate::recipients::Recipients;
use crate::schedule::Scheduler;
use crate::smtp::{self, ServerContext};
use crate::spool::{Spool, SpoolError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("control socket {path}: {source}")]
    Control { path: String, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Sockets bound before privileges are dropped (port 25 needs root or CAP_NET_BIND_SERVICE).
pub struct Listeners {
    pub smtp: Vec<std::net::TcpListener>,
}

/// Binds every listener of the configuration (std sets SO_REUSEADDR, so a restart does not wait
/// for TIME_WAIT sockets).
pub fn bind(config: &Config) -> Result<Listeners, DaemonError> {
    let smtp = config.smtp.listen.iter().map(|addr| bind_tcp(*addr)).collect::<Result<Vec<_>, _>>()?;
    Ok(Listeners { smtp })
}

fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener, DaemonError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|source| DaemonError::Listen { addr, source })?;
    raise_backlog(&listener);
    listener.set_nonblocking(true).map_err(|source| DaemonError::Listen { addr, source })?;
    Ok(listener)
}

/// std listens with a backlog of 128: a burst of senders (a site's whole backlog after an outage,
/// or the 1,000-session load test) overflows it and connections stall in SYN retries. Linux lets
/// `listen` be called again on a listening socket to raise the backlog (capped by somaxconn).
fn raise_backlog(listener: &std::net::TcpListener) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is a valid, bound and listening socket owned by `listener`.
    let result = unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    if result != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the listen backlog");
    }
}

fn into_tokio(listener: std::net::TcpListener) -> Result<TcpListener, DaemonError> {
    Ok(TcpListener::from_std(listener)?)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config, bound: Listeners) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    // A bad certificate is an error at start, not at the first STARTTLS.
    smtp::tls_acceptor(&config).map_err(|e| DaemonError::Setup(e.to_string()))?;
    let listeners = bound.smtp.into_iter().map(into_tokio).collect::<Result<Vec<_>, _>>()?;
    let dir = config.queue.dir.clone();
    let (spool, recovery) = tokio::task::spawn_blocking(move || Spool::open(&dir))
        .await
        .map_err(|e| DaemonError::Setup(e.to_string()))??;
    let spool = Arc::new(spool);
    tracing::info!(
        queued = recovery.queued,
        removed_partial = recovery.removed_partial,
        quarantined = recovery.quarantined,
        dir = %config.queue.dir.display(),
        "spool recovered"
    );
    let socket_path = Spool::control_socket_path(&config.queue.dir);
    let control_listener = control::bind(&socket_path)
        .map_err(|source| DaemonError::Control { path: socket_path.display().to_string(), source })?;
    let deliverer = Arc::new(Deliverer::new(Arc::clone(&config)).map_err(DaemonError::Setup)?);
    let recipients = Arc::new(
        Recipients::open(Arc::clone(&config), &config.queue.dir).map_err(|e| DaemonError::Setup(e.to_string()))?,
    );
    let sender_check = match config.smtp.sender_auth {
        true => Some(Arc::new(SenderCheck::new(&config).map_err(|e| DaemonError::Setup(e.to_string()))?)),
        false => None,
    };
    let (scheduler, handle) = Scheduler::new(Arc::clone(&config), Arc::clone(&spool), deliverer);
    let scheduler = scheduler.learning_into(Arc::clone(&recipients));
    let (shutdown_tx, shutdown) = watch::channel(false);

    let scheduler_task = tokio::spawn(scheduler.run(shutdown.clone()));
    let control_task =
        tokio::spawn(control::serve(control_listener, Arc::clone(&spool), handle.clone(), shutdown.clone()));
    let queued_handle = handle.clone();
    let mut context = ServerContext::new(
        Arc::clone(&config),
        Arc::clone(&spool),
        Box::new(move |envelope| queued_handle.queued(&envelope.id)),
    );
    context.recipients = Some(recipients);
    context.sender_check = sender_check;
    let context = Arc::new(context);
    let smtp_task = tokio::spawn(smtp::serve(context, listeners, shutdown.clone()));
    announce(&config);
    let watchdog = notify_systemd_ready();

    wait_for_signal().await;
    tracing::info!("shutting down: no new mail; open sessions get 421");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    let _ = shutdown_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(30), smtp_task).await {
        Ok(Ok(Err(err))) => tracing::error!(error = %err, "SMTP server stopped with an error"),
        Err(_) => tracing::warn!("SMTP sessions did not end within 30s"),
        _ => {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), scheduler_task).await;
    let _ = control_task.await;
    let _ = std::fs::remove_file(&socket_path);
    tracing::info!("stopped");
    Ok(())
}

/// Tells the person who started us where we are, on stdout (the log goes to stderr).
fn announce(config: &Config) {
    let smtp: Vec<String> = config.smtp.listen.iter().map(|a| a.to_string()).collect();
    println!(
        "bartleby {} ({}) listening: SMTP on {}; spool in {}; backup MX for {}",
        env!("CARGO_PKG_VERSION"),
        config.hostname,
        smtp.join(", "),
        config.queue.dir.display(),
        if config.relay.domains.is_empty() {
            "no domains (relay.domains is empty)".to_string()
        } else {
            config.relay.domains.join(", ")
        },
    );
}

/// Tells systemd (Type=notify) that every listener is bound and the spool recovered, and feeds its
/// watchdog at half the interval it asks for. Without systemd both are no-ops.
fn notify_systemd_ready() -> Option<tokio::task::JoinHandle<()>> {
    if let Err(err) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %err, "cannot notify systemd");
    }
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) {
        return None;
    }
    let period = Duration::from_micros(usec / 2);
    Some(tokio::spawn(async move {
        loop {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            tokio::time::sleep(period).await;
        }
    }))
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; running until killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

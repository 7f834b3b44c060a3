//! `bartleby serve`: wires the stages together. Binds every listener first, recovers the spool,
//! starts the scheduler, the monitor, the control socket and the SMTP server, and stops them in order on
//! SIGTERM or SIGINT: no new mail, 421 to open sessions, nothing half-written left behind.

use crate::auth::SenderCheck;
use crate::config::{Config, ConfigError};
use crate::control;
use crate::deliver::{Courier, Deliverer};
use crate::metrics::Metrics;
use crate::monitor::Monitor;
use crate::recipients::CacheAt;
use crate::recipients::Recipients;
use crate::schedule::{Scheduler, SchedulerHandle};
use crate::smtp::{self, ServerContext, Serving};
use crate::spool::{Queue, Spool, SpoolError};
use crate::web;
use std::net::SocketAddr;
use std::path::PathBuf;
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

impl DaemonError {
    /// A start-up problem that only the operator can fix (exit status 2). An I/O error of the
    /// runtime itself (threads, epoll) may pass, so systemd may restart on it.
    pub fn needs_operator(&self) -> bool {
        !matches!(self, DaemonError::Io(_))
    }
}

/// Sockets bound before privileges are dropped (port 25 needs root or CAP_NET_BIND_SERVICE).
pub struct Listeners {
    pub smtp: Vec<std::net::TcpListener>,
    /// The admin page's socket; None when `web.listen` could not be bound.
    pub web: Option<std::net::TcpListener>,
}

/// Caps glibc's malloc arenas at one per core (at least two) before any thread starts. By default
/// glibc gives each thread that contends for the heap an arena of its own, up to eight per core;
/// memory freed in one (a restart's replay threads, a burst of sessions) stays there, and with
/// 100,000 queued that was a quarter of the daemon's RSS (measured: 37 MiB against 28 MiB with
/// the cap). The same setting as `MALLOC_ARENA_MAX`, which still wins when set.
pub fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
        // SAFETY: mallopt only changes the allocator's tuning; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, i32::try_from(cores).unwrap_or(i32::MAX));
        }
    }
}

/// Binds every listener of the configuration (std sets SO_REUSEADDR, so a restart does not wait
/// for TIME_WAIT sockets).
pub fn bind(config: &Config) -> Result<Listeners, DaemonError> {
    let smtp = config.smtp.listen.iter().map(|addr| bind_tcp(*addr)).collect::<Result<Vec<_>, _>>()?;
    // The admin page is secondary to accepting mail: if its address is taken, say so and go on.
    let web = bind_tcp(config.web.listen)
        .inspect_err(|err| tracing::error!(error = %err, "admin page disabled (web.listen)"))
        .ok();
    Ok(Listeners { smtp, web })
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
pub async fn run(config: Config, bound: Listeners, config_path: Option<PathBuf>) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    // A bad certificate is an error at start, not at the first STARTTLS.
    smtp::tls_acceptor(&config).map_err(|e| DaemonError::Setup(e.to_string()))?;
    let listeners = bound.smtp.into_iter().map(into_tokio).collect::<Result<Vec<_>, _>>()?;
    let web_listener = bound.web.map(into_tokio).transpose()?;
    let opening = Arc::clone(&config);
    let (spool, recovery) =
        tokio::task::spawn_blocking(move || crate::spool::open_store(&opening, crate::spool::postgres::Role::Node))
            .await
            .map_err(|e| DaemonError::Setup(e.to_string()))??;
    tracing::info!(
        store = ?config.queue.store,
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
    let guards = Guards::open(&config)?;
    let (scheduler, handle) =
        Scheduler::new(Arc::clone(&config), Arc::clone(&spool), Arc::clone(&deliverer) as Arc<dyn Courier>);
    let metrics = Arc::new(Metrics::default());
    let scheduler = scheduler
        .learning_into(Arc::clone(&guards.recipients))
        .counting_into(Arc::clone(&metrics))
        .pausing_in(&config.queue.dir);
    let monitor = Monitor::new(Arc::clone(&config), Arc::clone(&spool), handle.clone(), deliverer)
        .map_err(|e| DaemonError::Setup(e.to_string()))?;
    let (shutdown_tx, shutdown) = watch::channel(false);

    let scheduler_task = tokio::spawn(scheduler.run(shutdown.clone()));
    let control_task =
        tokio::spawn(control::serve(control_listener, Arc::clone(&spool), handle.clone(), shutdown.clone()));
    // The admin page, JSON API and /metrics (src/web), beside the SMTP server.
    if let Some(warning) = web::insecure_login_warning(&config.web) {
        tracing::warn!("{warning}");
    }
    let web_state = web::WebState::new(Arc::clone(&config), Arc::clone(&spool), handle.clone(), Arc::clone(&metrics));
    let web_task = web_listener.map(|listener| {
        tracing::info!(listen = %config.web.listen, tls = config.web.tls_cert.is_some(), "admin page listening");
        tokio::spawn(web::serve(web_state.clone(), listener, shutdown.clone()))
    });
    let serving = Serving::new(server_context(&config, &spool, &handle, &guards, &metrics, None))
        .map_err(|e| DaemonError::Setup(e.to_string()))?;
    let (serving_tx, serving_rx) = watch::channel(serving);
    let smtp_task = tokio::spawn(smtp::serve_reloadable(serving_rx, listeners, shutdown.clone()));
    let monitor_state = monitor.state();
    let (monitor_stop, monitor_stopping) = monitor_stop(&shutdown);
    let monitor_task = tokio::spawn(monitor.run(monitor_stopping));
    tokio::spawn(crate::check_dns::log_at_start(Arc::clone(&config)));
    announce(&config);
    let watchdog = notify_systemd_ready();

    let mut live = Live {
        path: config_path,
        config,
        spool: Arc::clone(&spool),
        scheduler: handle,
        serving: serving_tx,
        monitor: monitor_task,
        monitor_state,
        monitor_stop,
        shutdown: shutdown.clone(),
        web: web_state,
    };
    run_until_stopped(&mut live).await;
    tracing::info!("shutting down: no new mail; open sessions get 421");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(30), smtp_task).await.is_err() {
        tracing::warn!("SMTP sessions did not end within 30s");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), scheduler_task).await;
    // Retry bookkeeping kept in memory during the run reaches the disk now (see Spool::note).
    let dirty_spool = Arc::clone(&spool);
    match tokio::task::spawn_blocking(move || dirty_spool.persist()).await {
        Ok(Ok(written)) => tracing::info!(envelopes = written, "retry state saved"),
        Ok(Err(err)) => tracing::error!(error = %err, "cannot save retry state"),
        Err(err) => tracing::error!(error = %err, "cannot save retry state"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), live.monitor).await;
    let _ = control_task.await;
    if let Some(web_task) = web_task {
        match tokio::time::timeout(Duration::from_secs(5), web_task).await {
            Ok(Ok(Err(err))) => tracing::error!(error = %err, "admin page stopped with an error"),
            Err(_) => tracing::warn!("admin page connections did not end within 5s"),
            _ => {}
        }
    }
    let _ = std::fs::remove_file(&socket_path);
    tracing::info!("stopped");
    Ok(())
}

/// ETRN (RFC 1985) starts a flush of the domain; the session answers without waiting for it.
fn etrn_flusher(handle: SchedulerHandle) -> smtp::EtrnFlush {
    Box::new(move |domain: &str| {
        let (handle, domain) = (handle.clone(), domain.to_string());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // A paused domain's mail waits for `queue resume`: the operator's word wins.
                match handle.flush(Some(domain.clone())).await {
                    Ok(_) => {}
                    Err(err @ crate::schedule::ScheduleError::Paused(_)) => {
                        tracing::info!(domain = %domain, reason = %err, "ETRN: not flushed");
                    }
                    Err(err) => tracing::error!(domain = %domain, error = %err, "ETRN flush failed"),
                }
            });
        }
    })
}

/// Tells the person who started us where we are, on stdout (the log goes to stderr).
fn announce(config: &Config) {
    let smtp: Vec<String> = config.smtp.listen.iter().map(|a| a.to_string()).collect();
    println!(
        "bartleby {} ({}) listening: SMTP on {}; admin page http://{}/; spool in {}; backup MX for {}",
        env!("CARGO_PKG_VERSION"),
        config.hostname,
        smtp.join(", "),
        config.web.listen,
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

/// What a reload replaces, and what it needs to build the replacements.
struct Live {
    /// The file to re-read; None when running on built-in settings.
    path: Option<PathBuf>,
    config: Arc<Config>,
    spool: Arc<dyn Queue>,
    scheduler: SchedulerHandle,
    serving: watch::Sender<Serving>,
    /// The monitor runs with the configuration it was started with; a reload starts a new one.
    monitor: tokio::task::JoinHandle<()>,
    /// Its alert states and status table, which each new monitor takes over.
    monitor_state: crate::monitor::MonitorState,
    /// Stops the current monitor (at a reload; the daemon's shutdown stops it too).
    monitor_stop: watch::Sender<bool>,
    shutdown: watch::Receiver<bool>,
    /// The admin page takes the new settings (allowlist, accounts) in place.
    web: web::WebState,
}

/// What guards the door (issue 6), built from the configuration at start and on every reload.
struct Guards {
    recipients: Arc<Recipients>,
    sender_check: Option<Arc<SenderCheck>>,
}

impl Guards {
    fn open(config: &Arc<Config>) -> Result<Guards, DaemonError> {
        let setup = |e: String| DaemonError::Setup(e);
        let recipients = Arc::new(
            Recipients::open(Arc::clone(config), CacheAt::of(config).map_err(|e| setup(e.to_string()))?)
                .map_err(|e| setup(e.to_string()))?,
        );
        let sender_check = match config.smtp.sender_auth {
            true => Some(Arc::new(SenderCheck::new(config).map_err(|e| setup(e.to_string()))?)),
            false => None,
        };
        Ok(Guards { recipients, sender_check })
    }
}

/// The SMTP server's view of the daemon, built at start and on every reload. `previous` carries
/// the per-IP counters over a reload, so a reload does not reset the limits.
fn server_context(
    config: &Arc<Config>,
    spool: &Arc<dyn Queue>,
    scheduler: &SchedulerHandle,
    guards: &Guards,
    metrics: &Arc<Metrics>,
    previous: Option<&ServerContext>,
) -> Arc<ServerContext> {
    let queued = scheduler.clone();
    let mut context = ServerContext::new(
        Arc::clone(config),
        Arc::clone(spool),
        Box::new(move |envelope| queued.queued(&envelope.id)),
    );
    context.etrn = Some(etrn_flusher(scheduler.clone()));
    context.recipients = Some(Arc::clone(&guards.recipients));
    context.sender_check = guards.sender_check.clone();
    context.metrics = Arc::clone(metrics);
    if let Some(previous) = previous {
        context.limits = Arc::clone(&previous.limits);
    }
    Arc::new(context)
}

/// Settings that only take effect at start: what a reload keeps, with the key named.
fn fixed_at_start(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    if old.smtp.listen != new.smtp.listen {
        new.smtp.listen = old.smtp.listen.clone();
        kept.push("smtp.listen");
    }
    if old.smtp.max_sessions != new.smtp.max_sessions {
        new.smtp.max_sessions = old.smtp.max_sessions;
        kept.push("smtp.max_sessions");
    }
    if old.queue.dir != new.queue.dir {
        new.queue.dir = old.queue.dir.clone();
        kept.push("queue.dir");
    }
    if old.web.listen != new.web.listen {
        new.web.listen = old.web.listen;
        kept.push("web.listen");
    }
    if (&old.user, &old.group) != (&new.user, &new.group) {
        (new.user, new.group) = (old.user.clone(), old.group.clone());
        kept.push("user/group");
    }
    kept
}

#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error("no configuration file (running on built-in settings)")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Setup(String),
}

impl Live {
    /// Re-reads the configuration, certificates included. Everything is built before anything is
    /// replaced, so an invalid new configuration leaves the old one in force.
    fn reload(&mut self) -> Result<(), ReloadError> {
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        let mut config = Config::load(path)?;
        for key in fixed_at_start(&self.config, &mut config) {
            tracing::warn!(key, "changed in the configuration; takes effect only after a restart");
        }
        let config = Arc::new(config);
        let deliverer = Arc::new(Deliverer::new(Arc::clone(&config)).map_err(ReloadError::Setup)?);
        let guards = Guards::open(&config).map_err(|e| ReloadError::Setup(e.to_string()))?;
        let previous = Arc::clone(&self.serving.borrow().context);
        let serving = Serving::new(server_context(
            &config,
            &self.spool,
            &self.scheduler,
            &guards,
            &previous.metrics,
            Some(&previous),
        ))
        .map_err(|e| ReloadError::Setup(e.to_string()))?;
        let monitor =
            Monitor::new(Arc::clone(&config), Arc::clone(&self.spool), self.scheduler.clone(), Arc::clone(&deliverer))
                .map_err(|e| ReloadError::Setup(e.to_string()))?
                .with_state(self.monitor_state.clone());
        self.scheduler
            .reload(Arc::clone(&config), deliverer as Arc<dyn Courier>)
            .map_err(|e| ReloadError::Setup(e.to_string()))?;
        let _ = self.serving.send(serving);
        self.web.set_config(Arc::clone(&config));
        // Alert rules and checks come with the new monitor, which continues the old one's alert
        // states. The old one is stopped, not aborted: an alert it is sending (a recovery seen just
        // before the reload) gets its few seconds to go out.
        let _ = self.monitor_stop.send(true);
        let (stop, stopping) = monitor_stop(&self.shutdown);
        self.monitor_stop = stop;
        self.monitor = tokio::spawn(monitor.run(stopping));
        self.config = config;
        Ok(())
    }
}

/// A stop signal for one monitor: set by a reload, or when the daemon shuts down.
fn monitor_stop(shutdown: &watch::Receiver<bool>) -> (watch::Sender<bool>, watch::Receiver<bool>) {
    let (stop, stopping) = watch::channel(false);
    let forward = stop.clone();
    let mut shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.wait_for(|stopping| *stopping) => {
                let _ = forward.send(true);
            }
            // The monitor ended (stopped by a reload): nothing left to forward to.
            _ = forward.closed() => {}
        }
    });
    (stop, stopping)
}

/// Waits for SIGTERM or SIGINT; reloads on SIGHUP.
async fn run_until_stopped(live: &mut Live) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers; running until killed");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                match live.reload() {
                    Ok(()) => tracing::info!("configuration reloaded"),
                    Err(err) => tracing::error!(error = %err, "reload refused; the running configuration stays in force"),
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            }
        }
    }
}

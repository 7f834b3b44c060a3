//! Inbound SMTP (RFC 5321): sessions are byte-driven state machines; the listener is a thin loop.
//!
//! - [`command`]: one command line into a typed command with its parameters;
//! - [`reply`]: replies with enhanced status codes (RFC 2034, RFC 3463);
//! - [`data`]: the DATA and BDAT reader (dot-unstuffing, end of data, bare CR/LF, limits);
//! - [`received`]: our Received header (the `with` protocol, the TLS version and cipher);
//! - [`session`]: the per-connection state machine, one function per verb;
//! - [`proxy`]: the PROXY protocol header a load balancer in `smtp.proxy_from` sends first;
//! - `space`: free space on the spool, counted for every message being received;
//! - `pace`: how long a client may take, per read, per command line and per DATA phase;
//! - `overload`: which session makes room when `smtp.max_sessions` is reached;
//! - `server`: sockets, the pregreet test, TLS upgrade, the session cap, timeouts and shutdown.

pub mod command;
pub mod data;
pub mod limits;
mod overload;
mod pace;
pub mod proxy;
pub mod received;
pub mod reply;
mod server;
pub mod session;
mod space;

use crate::auth::SenderCheck;
use crate::config::Config;
use crate::recipients::Recipients;
use crate::spool::{Envelope, Queue};
use limits::IpLimits;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a session needs from the rest of the daemon.
pub struct ServerContext {
    pub config: Arc<Config>,
    pub spool: Arc<dyn Queue>,
    /// Called after a message is durably queued (and before 250 is sent), so the scheduler can
    /// consider it at once.
    pub on_queued: Box<dyn Fn(&Envelope) + Send + Sync>,
    /// Starts a flush of a domain's queue for ETRN (RFC 1985); None: ETRN is not available.
    pub etrn: Option<EtrnFlush>,
    /// Which recipients are real (issue 6); None accepts every address of a relay domain.
    pub recipients: Option<Arc<Recipients>>,
    /// SPF/DKIM at accept time; None records no verdict (bounces then go out as before).
    pub sender_check: Option<Arc<SenderCheck>>,
    /// Per-client-IP sessions and rates, shared by every session.
    pub limits: Arc<IpLimits>,
    /// Event counters for `/metrics` (received, rejected, open sessions).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl ServerContext {
    /// A context without recipient checks or sender checks; add them with the public fields.
    pub fn new(
        config: Arc<Config>,
        spool: Arc<dyn Queue>,
        on_queued: Box<dyn Fn(&Envelope) + Send + Sync>,
    ) -> ServerContext {
        ServerContext {
            config,
            spool,
            on_queued,
            etrn: None,
            recipients: None,
            sender_check: None,
            limits: IpLimits::new(),
            metrics: Arc::default(),
        }
    }
}

/// Starts a flush of one domain's queue (see [`ServerContext::etrn`]).
pub type EtrnFlush = Box<dyn Fn(&str) + Send + Sync>;

/// Errors of the SMTP module that reach the daemon (the rest become SMTP replies).
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    /// The certificate or key named by `smtp.tls_cert` / `smtp.tls_key` cannot be used.
    #[error("{key} {}: {problem}", path.display())]
    Tls { key: &'static str, path: PathBuf, problem: String },
}

/// Builds the STARTTLS acceptor from `smtp.tls_cert` and `smtp.tls_key` (PEM), or None when TLS is not
/// configured. The daemon calls it at start so a bad certificate stops it with a clear message.
pub fn tls_acceptor(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, SmtpError> {
    let (Some(cert_path), Some(key_path)) = (&config.smtp.tls_cert, &config.smtp.tls_key) else {
        return Ok(None);
    };
    let cert_error = |problem: String| SmtpError::Tls { key: "smtp.tls_cert", path: cert_path.clone(), problem };
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| cert_error(err.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error("no certificate found in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|err| key_error(key_path, err.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| cert_error(err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|err| key_error(key_path, format!("does not fit the certificate: {err}")))?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))))
}

fn key_error(path: &Path, problem: String) -> SmtpError {
    SmtpError::Tls { key: "smtp.tls_key", path: path.to_path_buf(), problem }
}

/// Listens on already-bound sockets until `shutdown` turns true (or its sender is dropped), then
/// answers 421 to open sessions and returns once they have closed (waiting a few seconds at most).
pub async fn serve(
    context: Arc<ServerContext>,
    listeners: Vec<tokio::net::TcpListener>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let acceptor = tls_acceptor(&context.config).map_err(|err| std::io::Error::other(err.to_string()))?;
    let (_keep, current) = tokio::sync::watch::channel(Serving { context, acceptor });
    server::serve(current, listeners, shutdown).await;
    Ok(())
}

/// What new sessions are started with; replaced as a whole on a configuration reload.
#[derive(Clone)]
pub struct Serving {
    pub context: Arc<ServerContext>,
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl Serving {
    /// Builds the context's TLS acceptor; fails on an unusable certificate or key.
    pub fn new(context: Arc<ServerContext>) -> Result<Serving, SmtpError> {
        let acceptor = tls_acceptor(&context.config)?;
        Ok(Serving { context, acceptor })
    }
}

/// Like [`serve`], but every new session takes the latest [`Serving`] from `current`, so a reload
/// (new settings, renewed certificates) applies to the next connection while open sessions finish
/// with what they started with. The session cap stays as it was at start.
pub async fn serve_reloadable(
    current: tokio::sync::watch::Receiver<Serving>,
    listeners: Vec<tokio::net::TcpListener>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    server::serve(current, listeners, shutdown).await;
}

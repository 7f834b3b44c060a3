//! The socket side of SMTP: accept loops, the session cap, one task per session moving bytes between
//! the socket and its [`Session`], the STARTTLS upgrade, timeouts and shutdown.

use super::limits::SessionSlot;
use super::reply::Reply;
use super::session::{Action, PendingMessage, Session, SpaceMonitor};
use super::{ServerContext, Serving};
use crate::recipients::Decision;
use crate::spool::{Envelope, SpoolError};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// How long `serve` waits for sessions to close after shutdown before abandoning them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Bytes read from a client at a time; also bounds what a session holds back while busy.
const READ_CHUNK: usize = 16 * 1024;
/// A refused client gets this long to take its 421.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a session task needs besides its socket.
#[derive(Clone)]
struct Shared {
    context: Arc<ServerContext>,
    space: Arc<SpaceMonitor>,
    acceptor: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
}

/// Resolves when the server is to shut down: the flag turned true, or nobody can set it any more.
async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}

pub(super) async fn serve(
    current: watch::Receiver<Serving>,
    listeners: Vec<TcpListener>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(current.borrow().context.config.smtp.max_sessions));
    let space = Arc::new(SpaceMonitor::new());
    let session_shutdown = shutdown.clone();
    let shared = |serving: &Serving| Shared {
        context: Arc::clone(&serving.context),
        space: Arc::clone(&space),
        acceptor: serving.acceptor.clone(),
        shutdown: session_shutdown.clone(),
    };
    let (sender, mut accepted) = mpsc::channel(64);
    let mut accepters = JoinSet::new();
    for listener in listeners {
        accepters.spawn(accept_loop(listener, sender.clone()));
    }
    drop(sender);
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            () = shutting_down(&mut shutdown) => break,
            conn = accepted.recv() => match conn {
                Some((stream, peer)) => match Arc::clone(&limit).try_acquire_owned() {
                    Ok(permit) => {
                        let shared = shared(&current.borrow());
                        match enter(&shared, peer) {
                            Some(slot) => {
                                sessions.spawn(run_session(shared, stream, peer, (permit, slot)));
                            }
                            None => {
                                sessions.spawn(refuse_ip(stream, peer));
                            }
                        }
                    }
                    Err(_) => {
                        sessions.spawn(refuse(stream, peer));
                    }
                },
                None => shutting_down(&mut shutdown).await,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    accepters.abort_all();
    tracing::info!(sessions = sessions.len(), "smtp: shutting down");
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while sessions.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(sessions = sessions.len(), "smtp: sessions did not close in time; abandoning them");
        sessions.abort_all();
    }
}

/// Accepts connections and passes them on; transient errors (EMFILE, ECONNABORTED) are logged and
/// retried after a pause rather than ending the listener.
async fn accept_loop(listener: TcpListener, sender: mpsc::Sender<(TcpStream, SocketAddr)>) {
    loop {
        match listener.accept().await {
            Ok(conn) => {
                if sender.send(conn).await.is_err() {
                    return;
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "smtp: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Beyond `smtp.max_sessions`: greet with 421 and close (RFC 5321 3.1).
async fn refuse(stream: TcpStream, peer: SocketAddr) {
    tracing::warn!(client = %peer.ip(), "too many connections, refused");
    greet_and_close(stream, Reply::new(421, "4.3.2", "too many connections, try again later")).await;
}

/// A refused client gets its reply instead of a greeting, then the connection closes.
async fn greet_and_close(mut stream: TcpStream, reply: Reply) {
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        let _ = stream.write_all(&reply.to_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// A place among the sessions of `peer`'s address, or None when it has `smtp.max_sessions_per_ip`.
fn enter(shared: &Shared, peer: SocketAddr) -> Option<SessionSlot> {
    shared.context.limits.enter(peer.ip().to_canonical(), shared.context.config.smtp.max_sessions_per_ip)
}

/// Beyond `smtp.max_sessions_per_ip`: 421 4.7.0 and close, like Postfix's connection count limit.
async fn refuse_ip(stream: TcpStream, peer: SocketAddr) {
    tracing::warn!(client = %peer.ip(), "too many connections from this address, refused");
    greet_and_close(stream, Reply::new(421, "4.7.0", "too many connections from your address, try again later")).await;
}

/// How a pass of [`drive`] ended.
enum End {
    Closed(&'static str),
    StartTls,
}

/// The session's places under `smtp.max_sessions` and `smtp.max_sessions_per_ip`, held until it ends.
type Permits = (OwnedSemaphorePermit, SessionSlot);

async fn run_session(mut shared: Shared, mut stream: TcpStream, peer: SocketAddr, _permits: Permits) {
    let metrics = Arc::clone(&shared.context.metrics);
    let _open = metrics.session_started();
    let tls_available = shared.acceptor.is_some();
    let mut session = Session::new(Arc::clone(&shared.context), Arc::clone(&shared.space), peer.ip(), tls_available);
    let greeting = session.greeting().to_bytes();
    let write_timeout = shared.context.config.smtp.command_timeout.0;
    if !matches!(tokio::time::timeout(write_timeout, stream.write_all(&greeting)).await, Ok(Ok(()))) {
        session.log_disconnect("greeting not delivered");
        return;
    }
    let reason = match drive(&mut stream, &mut session, &mut shared.shutdown).await {
        End::Closed(reason) => {
            let _ = stream.shutdown().await;
            reason
        }
        End::StartTls => upgrade(stream, &mut session, &mut shared).await,
    };
    session.log_disconnect(reason);
}

/// Runs the TLS handshake (RFC 3207 4), then the rest of the session over TLS.
async fn upgrade(stream: TcpStream, session: &mut Session, shared: &mut Shared) -> &'static str {
    let Some(acceptor) = shared.acceptor.clone() else { return "tls not configured" };
    let timeout = shared.context.config.smtp.command_timeout.0;
    let mut tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "tls handshake failed");
            return "tls handshake failed";
        }
        Err(_) => return "tls handshake timeout",
    };
    session.tls_started();
    let reason = match drive(&mut tls, session, &mut shared.shutdown).await {
        End::Closed(reason) => reason,
        End::StartTls => "starttls twice",
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
    reason
}

/// Moves bytes between `stream` and `session` until the session closes or asks for TLS.
async fn drive<S>(stream: &mut S, session: &mut Session, shutdown: &mut watch::Receiver<bool>) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let smtp = &timeouts(session);
    let mut buffer = vec![0u8; READ_CHUNK];
    let mut actions: VecDeque<Action> = VecDeque::new();
    loop {
        let mut out = Vec::new();
        while let Some(action) = actions.pop_front() {
            match action {
                Action::Reply(reply) => out.extend_from_slice(&reply.to_bytes()),
                Action::Close(reply) => {
                    out.extend_from_slice(&reply.to_bytes());
                    let _ = send(stream, &out, smtp.command_timeout).await;
                    return End::Closed("quit");
                }
                Action::StartTls(reply) => {
                    out.extend_from_slice(&reply.to_bytes());
                    return match send(stream, &out, smtp.command_timeout).await {
                        Ok(()) => End::StartTls,
                        Err(()) => End::Closed("write failed"),
                    };
                }
                Action::Verify(recipient) => {
                    let decision = match &session.context().recipients {
                        Some(recipients) => recipients.callout(&recipient.address).await,
                        None => Decision::Accept,
                    };
                    actions.push_back(session.verified(*recipient, decision));
                    actions.extend(session.feed(&[]));
                }
                Action::Commit(mut pending) => {
                    // Replies before the commit go out first: the client may be waiting for them.
                    if send(stream, &std::mem::take(&mut out), smtp.command_timeout).await.is_err() {
                        return End::Closed("write failed");
                    }
                    if let Some(check) = session.context().sender_check.clone() {
                        pending.authenticate(&check).await;
                    }
                    let reply = session.committed(commit(*pending).await);
                    out.extend_from_slice(&reply.to_bytes());
                    actions.extend(session.feed(&[]));
                }
            }
        }
        if send(stream, &out, smtp.command_timeout).await.is_err() {
            return End::Closed("write failed");
        }
        if *shutdown.borrow() {
            let _ = send(stream, &session.shutdown_reply().to_bytes(), smtp.command_timeout).await;
            return End::Closed("shutdown");
        }
        let timeout = if session.in_data() { smtp.data_timeout } else { smtp.command_timeout };
        tokio::select! {
            read = tokio::time::timeout(timeout, stream.read(&mut buffer)) => match read {
                Ok(Ok(0)) => return End::Closed("lost connection"),
                Ok(Ok(n)) => actions.extend(session.feed(&buffer[..n])),
                Ok(Err(_)) => return End::Closed("read error"),
                Err(_) => {
                    let _ = send(stream, &session.timeout_reply().to_bytes(), smtp.command_timeout).await;
                    return End::Closed("timeout");
                }
            },
            () = shutting_down(shutdown) => {
                // Idle or mid-DATA: answer at once; a half-received message is dropped with the session.
                let _ = send(stream, &session.shutdown_reply().to_bytes(), smtp.command_timeout).await;
                return End::Closed("shutdown");
            }
        }
    }
}

/// The timeouts a session runs with.
struct Timeouts {
    command_timeout: Duration,
    data_timeout: Duration,
}

fn timeouts(session: &Session) -> Timeouts {
    let smtp = &session.config().smtp;
    Timeouts { command_timeout: smtp.command_timeout.0, data_timeout: smtp.data_timeout.0 }
}

/// Writes and flushes, bounded in time so a client that stops reading cannot hold the session.
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8], timeout: Duration) -> Result<(), ()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let write = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Commits on a blocking thread: fsync may take a while and must not stall other sessions.
async fn commit(pending: PendingMessage) -> Result<Envelope, SpoolError> {
    match tokio::task::spawn_blocking(move || pending.commit()).await {
        Ok(result) => result,
        Err(err) => Err(SpoolError::Io { path: Default::default(), source: std::io::Error::other(err.to_string()) }),
    }
}

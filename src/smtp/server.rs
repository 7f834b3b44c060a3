//! The socket side of SMTP: accept loops, the session cap, one task per session moving bytes between
//! the socket and its [`Session`], the PROXY header from a load balancer, the pregreet test, the
//! STARTTLS upgrade, timeouts and shutdown.

use super::limits::SessionSlot;
use super::overload::{Overload, Registered};
use super::pace::{Pace, PaceLimits};
use super::proxy::{self, ProxyHeader};
use super::reply::Reply;
use super::session::{Action, PendingMessage, Session, SpaceMonitor};
use super::{ServerContext, Serving};
use crate::config::{PregreetAction, cidr_list_contains};
use crate::recipients::Decision;
use crate::spool::{Envelope, SpoolError};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
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
/// A session closed to make room gets this long to take its 421.
const EVICTION_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// A new client waits this long for the place of the session closed for it.
const EVICTION_WAIT: Duration = Duration::from_secs(3);
/// A load balancer in `smtp.proxy_from` sends its PROXY header at once, before any client octet;
/// this is Postfix's default `postscreen_upstream_proxy_timeout`.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a session task needs besides its socket.
#[derive(Clone)]
struct Shared {
    context: Arc<ServerContext>,
    space: Arc<SpaceMonitor>,
    /// Every session's standing, to choose one to close when `smtp.max_sessions` is reached.
    overload: Arc<Overload>,
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
    let overload = Overload::new();
    let session_shutdown = shutdown.clone();
    let shared = |serving: &Serving| Shared {
        context: Arc::clone(&serving.context),
        space: Arc::clone(&space),
        overload: Arc::clone(&overload),
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
                Some((stream, peer)) => {
                    sessions.spawn(admit(shared(&current.borrow()), Arc::clone(&limit), stream, peer));
                }
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

/// Where a session's client is, as far as every check and log line is concerned.
struct Origin {
    /// The TCP peer's address, or the client a PROXY header from `smtp.proxy_from` named.
    client: IpAddr,
    /// What the client sent right behind the PROXY header, before its greeting.
    early: Vec<u8>,
}

/// Gives a new client its places under `smtp.max_sessions_per_ip` and `smtp.max_sessions` (making
/// room if it can) and runs its session, or refuses it. A connection from `smtp.proxy_from` is
/// a load balancer's and takes the other way, [`admit_proxied`].
async fn admit(shared: Shared, limit: Arc<Semaphore>, stream: TcpStream, peer: SocketAddr) {
    if cidr_list_contains(&shared.context.config.smtp.proxy_from, peer.ip()) {
        return admit_proxied(shared, limit, stream, peer).await;
    }
    let Some(slot) = enter(&shared, peer.ip()) else { return refuse_ip(stream, peer.ip()).await };
    let Some(permit) = session_permit(&shared, limit).await else { return refuse(stream, peer.ip()).await };
    run_session(shared, stream, Origin { client: peer.ip(), early: Vec::new() }, (permit, slot)).await;
}

/// A load balancer's connection: its place under `smtp.max_sessions` is taken first, since that cap
/// counts TCP connections; the place under `smtp.max_sessions_per_ip` is the real client's, known
/// once the PROXY header is read, so that each client behind the balancer has its own limit.
async fn admit_proxied(shared: Shared, limit: Arc<Semaphore>, mut stream: TcpStream, peer: SocketAddr) {
    let Some(permit) = session_permit(&shared, limit).await else { return refuse(stream, peer.ip()).await };
    let Some(origin) = receive_proxy_header(&mut stream, &shared.context, peer).await else { return };
    let Some(slot) = enter(&shared, origin.client) else { return refuse_ip(stream, origin.client).await };
    run_session(shared, stream, origin, (permit, slot)).await;
}

/// The session's place under `smtp.max_sessions`, making room when every place is taken; None
/// when no room could be made.
async fn session_permit(shared: &Shared, limit: Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    match Arc::clone(&limit).try_acquire_owned() {
        Ok(permit) => Some(permit),
        Err(_) => make_room(shared, limit).await,
    }
}

/// Reads the PROXY header a connection from `smtp.proxy_from` must begin with and returns the client
/// it names: the load balancer's own address for a v2 LOCAL command (its health checks) or a v1
/// UNKNOWN, as proxy-protocol.txt asks. Without a valid header in time the connection gets 421
/// 4.3.0 and is closed, as Postfix's smtpd does with `smtpd_upstream_proxy_protocol = haproxy`
/// ("Server local error"): a balancer that sends none is misconfigured, and the client behind it
/// should try again later, not be refused for good.
async fn receive_proxy_header(stream: &mut TcpStream, context: &ServerContext, peer: SocketAddr) -> Option<Origin> {
    let failure = match tokio::time::timeout(PROXY_HEADER_TIMEOUT, proxy::read_header(stream)).await {
        Ok(Ok((header, early))) => {
            let client = match header {
                ProxyHeader::Proxied { client, .. } => client.ip().to_canonical(),
                ProxyHeader::Local => peer.ip(),
            };
            let local = header == ProxyHeader::Local;
            tracing::info!(client = %client, proxy = %peer, local, "proxy header received");
            return Some(Origin { client, early });
        }
        Ok(Err(err)) => err.to_string(),
        Err(_) => format!("no PROXY protocol header within {PROXY_HEADER_TIMEOUT:?}"),
    };
    tracing::warn!(proxy = %peer, reason = %failure,
        "connection from smtp.proxy_from without a valid PROXY protocol header, closed");
    let text = format!("{} Server local error: no valid PROXY protocol header", context.config.hostname);
    let _ = send(stream, &Reply::new(421, "4.3.0", text).to_bytes(), REFUSAL_TIMEOUT).await;
    discard_rest(stream).await;
    None
}

/// Every session is taken: closes the one behind longest (see [`super::overload`]) and waits for its
/// place. None when no session has been behind `smtp.overload_timeout`, or its place did not come free.
async fn make_room(shared: &Shared, limit: Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    let min_behind = shared.context.config.smtp.overload_timeout.0;
    if !shared.overload.evict_one(tokio::time::Instant::now(), min_behind) {
        return None;
    }
    tokio::time::timeout(EVICTION_WAIT, limit.acquire_owned()).await.ok()?.ok()
}

/// Beyond `smtp.max_sessions`: greet with 421 and close (RFC 5321 3.1).
async fn refuse(stream: TcpStream, client: IpAddr) {
    tracing::warn!(client = %client, "too many connections, refused");
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

/// A place among the sessions of `client`, or None when it has `smtp.max_sessions_per_ip`.
fn enter(shared: &Shared, client: IpAddr) -> Option<SessionSlot> {
    shared.context.limits.enter(client.to_canonical(), shared.context.config.smtp.max_sessions_per_ip)
}

/// Beyond `smtp.max_sessions_per_ip`: 421 4.7.0 and close, like Postfix's connection count limit.
async fn refuse_ip(stream: TcpStream, client: IpAddr) {
    tracing::warn!(client = %client.to_canonical(), "too many connections from this address, refused");
    greet_and_close(stream, Reply::new(421, "4.7.0", "too many connections from your address, try again later")).await;
}

/// How a pass of [`drive`] ended.
enum End {
    Closed(&'static str),
    StartTls,
}

/// The session's places under `smtp.max_sessions` and `smtp.max_sessions_per_ip`, held until it ends.
type Permits = (OwnedSemaphorePermit, SessionSlot);

/// A session's clock and its standing among the others.
struct Timing {
    pace: Pace,
    standing: Registered,
}

impl Timing {
    /// The session answered: from now it owes a command or data, and its standing says since when.
    fn progressed(&mut self, in_data: bool) {
        self.pace.progressed(in_data, tokio::time::Instant::now());
        self.standing.behind_since(self.pace.behind_since());
    }
}

async fn run_session(mut shared: Shared, mut stream: TcpStream, origin: Origin, _permits: Permits) {
    let metrics = Arc::clone(&shared.context.metrics);
    let _open = metrics.session_started();
    let standing = shared.overload.register();
    let tls_available = shared.acceptor.is_some();
    let mut session =
        Session::new(Arc::clone(&shared.context), Arc::clone(&shared.space), origin.client, tls_available);
    let early = match pregreet(&mut stream, &shared.context, session.client(), origin.early).await {
        Ok(early) => early,
        Err(reason) => {
            let _ = stream.shutdown().await;
            session.log_disconnect(reason);
            return;
        }
    };
    let greeting = session.greeting().to_bytes();
    let write_timeout = shared.context.config.smtp.command_timeout.0;
    if !matches!(tokio::time::timeout(write_timeout, stream.write_all(&greeting)).await, Ok(Ok(()))) {
        session.log_disconnect("greeting not delivered");
        return;
    }
    let limits = PaceLimits::from_config(&session.config().smtp);
    let mut timing = Timing { pace: Pace::new(limits, tokio::time::Instant::now()), standing };
    timing.progressed(false);
    let reason = match drive(&mut stream, &mut session, &mut shared.shutdown, &mut timing, &early).await {
        End::Closed(reason) => {
            let _ = stream.shutdown().await;
            reason
        }
        End::StartTls => upgrade(stream, &mut session, &mut shared, &mut timing).await,
    };
    session.log_disconnect(reason);
}

/// Postfix postscreen's pregreet test: with `smtp.pregreet_delay` set, waits that long before the
/// greeting. RFC 5321 3.1 has the client send EHLO once it has received the greeting, so one that
/// talks first is not a real MTA but, as a rule, a spambot writing blind. With
/// `pregreet_action = "reject"` it gets 554 5.5.1 in place of the 220 (RFC 5321 3.1 allows 554
/// there): permanent, because a real sender never fails this test and a bot should not be asked
/// back. Then the connection is closed at once. RFC 5321 3.1 asks a server that greets with 554 to
/// wait for QUIT; we do not, like postscreen's `drop`: what the client sent was written without
/// listening, so it will not QUIT in answer, and waiting would hand the session back to the bot.
/// With `"log"` what it sent is kept and read as its first commands once it is greeted.
///
/// Returns the octets the client sent early (none when it waited), or why the session is over.
/// `already` is what it sent behind a PROXY header: sent early too. It takes the context and the
/// client's address rather than the session, which is not `Sync`.
async fn pregreet(
    stream: &mut TcpStream,
    context: &ServerContext,
    client: IpAddr,
    already: Vec<u8>,
) -> Result<Vec<u8>, &'static str> {
    let smtp = &context.config.smtp;
    let delay = smtp.pregreet_delay.0;
    if delay.is_zero() {
        // Without the test, what came behind a PROXY header is read as the first commands.
        return Ok(already);
    }
    let early = if already.is_empty() {
        match read_within(stream, delay).await? {
            Some(early) => early,
            None => return Ok(Vec::new()),
        }
    } else {
        already
    };
    let n = early.len();
    let sample = String::from_utf8_lossy(&early[..n.min(64)]).escape_debug().to_string();
    tracing::warn!(client = %client, octets = n, sample = %sample, action = ?smtp.pregreet_action,
        "pregreet: client talked before the greeting");
    match smtp.pregreet_action {
        PregreetAction::Log => Ok(early),
        PregreetAction::Reject => {
            let reply = Reply::new(
                554,
                "5.5.1",
                format!("{} protocol error: talked before the greeting", context.config.hostname),
            );
            let _ = send(stream, &reply.to_bytes(), REFUSAL_TIMEOUT).await;
            discard_rest(stream).await;
            Err("pregreet")
        }
    }
}

/// What the client sends within `delay`: None when it sends nothing, an error when it goes away.
async fn read_within(stream: &mut TcpStream, delay: Duration) -> Result<Option<Vec<u8>>, &'static str> {
    let mut early = vec![0u8; READ_CHUNK];
    match tokio::time::timeout(delay, stream.read(&mut early)).await {
        Err(_) => Ok(None),
        Ok(Ok(0)) | Ok(Err(_)) => Err("lost connection before the greeting"),
        Ok(Ok(n)) => {
            early.truncate(n);
            Ok(Some(early))
        }
    }
}

/// Half-closes and reads what the client still sends, for a second at most: closing a socket with
/// unread input makes the kernel reset the connection, which can destroy a reply not yet read.
async fn discard_rest(stream: &mut TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = vec![0u8; READ_CHUNK];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Runs the TLS handshake (RFC 3207 4), then the rest of the session over TLS.
async fn upgrade(stream: TcpStream, session: &mut Session, shared: &mut Shared, timing: &mut Timing) -> &'static str {
    let Some(acceptor) = shared.acceptor.clone() else { return "tls not configured" };
    let timeout = shared.context.config.smtp.command_timeout.0;
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(timeout, acceptor.accept(stream)) => handshake,
        // A handshake is the client's work too: a stalled one may be closed to make room.
        () = timing.standing.evicted() => return "closed to make room",
    };
    let mut tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "tls handshake failed");
            return "tls handshake failed";
        }
        Err(_) => return "tls handshake timeout",
    };
    session.tls_started(super::received::TlsInfo::of(tls.get_ref().1));
    timing.progressed(false);
    let reason = match drive(&mut tls, session, &mut shared.shutdown, timing, &[]).await {
        End::Closed(reason) => reason,
        End::StartTls => "starttls twice",
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
    reason
}

/// Moves bytes between `stream` and `session` until the session closes or asks for TLS. `early` is
/// what the client sent before its greeting (see [`pregreet`]), read as its first input.
async fn drive<S>(
    stream: &mut S,
    session: &mut Session,
    shutdown: &mut watch::Receiver<bool>,
    timing: &mut Timing,
    early: &[u8],
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let write_timeout = session.config().smtp.command_timeout.0;
    let mut buffer = vec![0u8; READ_CHUNK];
    let mut actions: VecDeque<Action> = session.feed(early).into();
    loop {
        let progressed = !actions.is_empty();
        let out = match carry_out(stream, session, &mut actions, timing, write_timeout).await {
            Ok(out) => out,
            Err(end) => return end,
        };
        if send(stream, &out, write_timeout).await.is_err() {
            return End::Closed("write failed");
        }
        if progressed {
            timing.progressed(session.in_data());
        }
        if *shutdown.borrow() {
            let _ = send(stream, &session.shutdown_reply().to_bytes(), write_timeout).await;
            return End::Closed("shutdown");
        }
        tokio::select! {
            read = tokio::time::timeout_at(timing.pace.deadline(), stream.read(&mut buffer)) => match read {
                Ok(Ok(0)) => return End::Closed("lost connection"),
                Ok(Ok(n)) => {
                    timing.pace.received(n, tokio::time::Instant::now());
                    if session.in_data() {
                        timing.standing.behind_since(timing.pace.behind_since());
                    }
                    let was_in_data = session.in_data();
                    actions.extend(session.feed(&buffer[..n]));
                    // A BDAT chunk begins without a reply (RFC 3030 2): from here its octets are
                    // data, with the DATA timeouts, not a command line that takes too long.
                    if !was_in_data && session.in_data() && actions.is_empty() {
                        timing.progressed(true);
                    }
                }
                Ok(Err(_)) => return End::Closed("read error"),
                Err(_) => {
                    // RFC 5321 4.5.3.2: the client ran out of time, per read or for the whole
                    // command line or DATA phase.
                    let _ = send(stream, &session.timeout_reply().to_bytes(), write_timeout).await;
                    return End::Closed("timeout");
                }
            },
            () = timing.standing.evicted() => {
                let _ = send(stream, &session.overload_reply().to_bytes(), EVICTION_REPLY_TIMEOUT).await;
                return End::Closed("closed to make room");
            }
            () = shutting_down(shutdown) => {
                // Idle or mid-DATA: answer at once; a half-received message is dropped with the session.
                let _ = send(stream, &session.shutdown_reply().to_bytes(), write_timeout).await;
                return End::Closed("shutdown");
            }
        }
    }
}

/// Carries out the session's actions; returns the replies still to send, or how the pass ended.
/// While a callout or a commit runs the session waits for us, so it cannot be chosen to make room.
async fn carry_out<S>(
    stream: &mut S,
    session: &mut Session,
    actions: &mut VecDeque<Action>,
    timing: &mut Timing,
    write_timeout: Duration,
) -> Result<Vec<u8>, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::new();
    while let Some(action) = actions.pop_front() {
        match action {
            Action::Reply(reply) => out.extend_from_slice(&reply.to_bytes()),
            Action::Close(reply) => {
                out.extend_from_slice(&reply.to_bytes());
                let _ = send(stream, &out, write_timeout).await;
                return Err(End::Closed("quit"));
            }
            Action::StartTls(reply) => {
                out.extend_from_slice(&reply.to_bytes());
                return Err(match send(stream, &out, write_timeout).await {
                    Ok(()) => End::StartTls,
                    Err(()) => End::Closed("write failed"),
                });
            }
            Action::Verify(recipient) => {
                timing.standing.busy();
                let decision = match &session.context().recipients {
                    Some(recipients) => recipients.callout(&recipient.address).await,
                    None => Decision::Accept,
                };
                actions.push_back(session.verified(*recipient, decision));
                actions.extend(session.feed(&[]));
            }
            Action::Commit(mut pending) => {
                timing.standing.busy();
                // Replies before the commit go out first: the client may be waiting for them.
                if send(stream, &std::mem::take(&mut out), write_timeout).await.is_err() {
                    return Err(End::Closed("write failed"));
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
    Ok(out)
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

#[cfg(test)]
mod tests;

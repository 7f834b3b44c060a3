//! The running daemon's control socket: a Unix socket under the queue directory (0600, in the 0700
//! spool) that speaks one JSON request and one JSON response per line. The CLI uses it so that
//! queue changes go through the one process that owns the spool; when no daemon runs, the CLI opens
//! the spool itself (under its lock) and calls [`execute`] the same way.

use crate::schedule::{self, ScheduleError, SchedulerHandle};
use crate::spool::{Envelope, Listing, Queue, SpoolError, is_queue_id, rfc3339};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted from the socket.
const MAX_REQUEST: usize = 64 * 1024;

/// Most messages in one [`Request::ListPage`].
pub const MAX_PAGE: usize = 10_000;

/// One operator command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// One page of the listing, oldest first, after the message `after` (keyset paging: `queue
    /// list` prints a million messages a page at a time, its first line at once).
    ListPage {
        after: Option<String>,
        limit: usize,
    },
    Show {
        id: String,
    },
    Delete {
        id: String,
    },
    Hold {
        id: String,
    },
    Release {
        id: String,
    },
    Retry {
        id: String,
    },
    Flush {
        domain: Option<String>,
    },
    /// Give every journaled message its own files and retire the journal (see docs/spool.md).
    Sync,
}

/// One answer; `ok` is kept as raw JSON so a listing of 100,000 messages is never built as a tree.
#[derive(Debug, Serialize, Deserialize)]
struct Response {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ok: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A queued message as `queue list --json` shows it (a public contract: keep these names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListedMessage {
    pub id: String,
    /// Empty for the null sender.
    pub sender: String,
    /// Recipients still pending.
    pub recipients: Vec<String>,
    pub size: u64,
    /// RFC 3339.
    pub arrived: String,
    pub attempts: u32,
    /// RFC 3339.
    pub next_attempt: String,
    pub last_error: Option<String>,
    pub held: bool,
}

impl From<&Envelope> for ListedMessage {
    fn from(envelope: &Envelope) -> Self {
        ListedMessage::from(Listing::from(envelope))
    }
}

impl From<Listing> for ListedMessage {
    fn from(m: Listing) -> Self {
        ListedMessage {
            id: m.id,
            sender: m.sender,
            recipients: m.recipients,
            size: m.size,
            arrived: rfc3339(m.arrived),
            attempts: m.attempts,
            next_attempt: rfc3339(m.next_attempt),
            last_error: m.last_error,
            held: m.held,
        }
    }
}

/// One message in full, for `queue show`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageDetail {
    pub envelope: Envelope,
    /// The header section as stored (our Received header first), lossily decoded.
    pub headers: String,
}

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("bartleby is not running (no control socket at {0})")]
    NotRunning(String),
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("control socket: bad response: {0}")]
    BadResponse(String),
    #[error("{0}")]
    Refused(String),
}

/// How long `queue sync` waits for the journal to be retired.
const SYNC_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Carries out one request against the spool, through the scheduler when the daemon runs.
pub async fn execute(
    request: Request,
    spool: &Arc<dyn Queue>,
    scheduler: Option<&SchedulerHandle>,
) -> Result<Box<RawValue>, String> {
    let id_ok = |id: &str| if is_queue_id(id) { Ok(()) } else { Err(format!("{id:?} is not a queue ID")) };
    let json = |v: Result<Box<RawValue>, serde_json::Error>| v.map_err(|e| e.to_string());
    let text = |t: String| json(serde_json::value::to_raw_value(&t));
    match request {
        Request::ListPage { after, limit } => {
            if after.as_deref().is_some_and(|id| !is_queue_id(id)) {
                return Err(format!("{:?} is not a queue ID", after.unwrap_or_default()));
            }
            let store = Arc::clone(spool);
            let limit = limit.clamp(1, MAX_PAGE);
            let page = tokio::task::spawn_blocking(move || {
                store.listing(after.as_deref(), limit).into_iter().map(ListedMessage::from).collect::<Vec<_>>()
            })
            .await
            .map_err(|e| e.to_string())?;
            json(serde_json::value::to_raw_value(&page))
        }
        Request::Show { id } => {
            id_ok(&id)?;
            let envelope = spool.get(&id).ok_or_else(|| SpoolError::NotFound(id.clone()).to_string())?;
            let headers = spool.read_headers(&id, 256 * 1024).map_err(|e| e.to_string())?;
            let headers = String::from_utf8_lossy(&headers).into_owned();
            json(serde_json::value::to_raw_value(&MessageDetail { envelope, headers }))
        }
        Request::Delete { id } => {
            id_ok(&id)?;
            match scheduler {
                Some(s) => s.delete(&id).await,
                None => schedule::delete(spool.as_ref(), &id),
            }
            .map_err(|e| e.to_string())?;
            text(format!("{id} deleted"))
        }
        Request::Hold { id } | Request::Release { id } if id_ok(&id).is_err() => {
            Err(id_ok(&id).err().unwrap_or_default())
        }
        Request::Hold { id } => set_held(spool, scheduler, &id, true).await,
        Request::Release { id } => set_held(spool, scheduler, &id, false).await,
        Request::Retry { id } => {
            id_ok(&id)?;
            scheduler
                .ok_or_else(|| ScheduleError::NotRunning.to_string())?
                .retry(&id)
                .await
                .map_err(|e| e.to_string())?;
            text(format!("{id} scheduled for delivery now"))
        }
        Request::Flush { domain } => {
            let scheduler = scheduler.ok_or_else(|| ScheduleError::NotRunning.to_string())?;
            let count = scheduler.flush(domain).await.map_err(|e| e.to_string())?;
            json(serde_json::value::to_raw_value(&count))
        }
        Request::Sync => {
            let store = Arc::clone(spool);
            match tokio::task::spawn_blocking(move || store.sync_files(SYNC_LIMIT)).await {
                Ok(Some(waiting)) => {
                    let s = if waiting == 1 { "" } else { "s" };
                    text(format!("{waiting} journaled message{s} written to messages/; journal retired"))
                }
                _ => Err(format!("the journal was not retired within {} s; see the log", SYNC_LIMIT.as_secs())),
            }
        }
    }
}

async fn set_held(
    spool: &Arc<dyn Queue>,
    scheduler: Option<&SchedulerHandle>,
    id: &str,
    held: bool,
) -> Result<Box<RawValue>, String> {
    let envelope = match scheduler {
        Some(s) => s.hold(id, held).await,
        None => schedule::set_held(spool.as_ref(), id, held),
    }
    .map_err(|e| e.to_string())?;
    serde_json::value::to_raw_value(&format!("{} {}", envelope.id, if held { "held" } else { "released" }))
        .map_err(|e| e.to_string())
}

/// Binds the control socket, replacing a stale one (we hold the spool lock, so no other daemon
/// can be using it).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers control requests until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    spool: Arc<dyn Queue>,
    scheduler: SchedulerHandle,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let spool = Arc::clone(&spool);
                    let scheduler = scheduler.clone();
                    tokio::spawn(async move {
                        if let Err(err) = answer(stream, &spool, &scheduler).await {
                            tracing::warn!(error = %err, "control connection failed");
                        }
                    });
                }
                Err(err) => tracing::warn!(error = %err, "control socket accept failed"),
            },
            _ = shutdown.changed() => break,
        }
    }
}

async fn answer(stream: UnixStream, spool: &Arc<dyn Queue>, scheduler: &SchedulerHandle) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => match execute(request, spool, Some(scheduler)).await {
            Ok(value) => Response { ok: Some(value), error: None },
            Err(error) => Response { ok: None, error: Some(error) },
        },
        Err(err) => Response { ok: None, error: Some(format!("bad request: {err}")) },
    };
    let mut bytes = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    write.shutdown().await
}

/// Sends one request to the running daemon; the answer is raw JSON for the caller to parse into
/// the type it expects.
pub async fn request(socket: &Path, request: &Request) -> Result<Box<RawValue>, ControlError> {
    let stream = UnixStream::connect(socket).await.map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ControlError::NotRunning(socket.display().to_string())
        }
        _ => ControlError::Io(err),
    })?;
    let (read, mut write) = stream.into_split();
    let mut bytes = serde_json::to_vec(request).map_err(|e| ControlError::BadResponse(e.to_string()))?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response: Response = serde_json::from_str(&line).map_err(|e| ControlError::BadResponse(e.to_string()))?;
    match (response.ok, response.error) {
        (_, Some(error)) => Err(ControlError::Refused(error)),
        (Some(value), None) => Ok(value),
        (None, None) => Err(ControlError::BadResponse("empty response".into())),
    }
}

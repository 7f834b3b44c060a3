//! The running daemon's control socket: a Unix socket under the queue directory (0600, in the 0700
//! spool) that speaks one JSON request and one JSON response per line. The CLI uses it so that
//! queue changes go through the one process that owns the spool; when no daemon runs, the CLI opens
//! the spool itself (under its lock) and calls [`execute`] the same way.

use crate::schedule::{self, ScheduleError, SchedulerHandle};
use crate::spool::{
    Envelope, Filter, Listing, Queue, SHAPE_BUCKETS_MINUTES, SpoolError, is_queue_id, now_micros, rfc3339,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
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
        /// With the body after the header section (`queue show --body`, like `postcat -b`).
        #[serde(default)]
        body: bool,
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
    /// One action on many messages: those named, or those a selection matches.
    Bulk {
        action: BulkAction,
        selection: Selection,
    },
    /// Counts by domain and age bucket, like qshape.
    Shape,
    /// Pause (`true`) or resume deliveries to a domain.
    Pause {
        domain: String,
        paused: bool,
    },
    /// The paused domains.
    Paused,
}

/// What a [`Request::Bulk`] does to each message.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BulkAction {
    Hold,
    Release,
    Delete,
    Retry,
    /// Route again and try now (`postsuper -r`).
    Requeue,
    /// Return to the sender now (`exim -Mg`).
    Bounce,
}

/// Which messages a bulk command concerns: the IDs named, or with `all` or any filter field the
/// messages that pass the filter (`all` alone: every message). Not both.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Selection {
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub sender: Option<String>,
    #[serde(default)]
    pub recipient: Option<String>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub older_than_seconds: Option<u64>,
    #[serde(default)]
    pub held: Option<bool>,
}

impl Selection {
    /// The queue's filter, when the selection is one (`ALL` or a filter field) rather than IDs.
    pub fn filter(&self) -> Option<Filter> {
        let filter = Filter {
            domain: self.domain.clone(),
            sender: self.sender.clone(),
            recipient: self.recipient.clone(),
            older_than: self.older_than_seconds.map(std::time::Duration::from_secs),
            held: self.held,
            bounce_suppressed: None,
        };
        (self.all || !filter.is_empty()).then_some(filter)
    }

    /// Why the selection cannot be carried out, if it cannot: nothing named, or IDs and a filter.
    pub fn problem(&self) -> Option<&'static str> {
        match (self.ids.is_empty(), self.filter().is_some()) {
            (true, false) => Some(
                "name the messages: queue IDs, - (IDs on standard input), ALL, or a selection \
                 (--sender, --recipient, --domain, --older-than, --held, --not-held)",
            ),
            (false, true) => Some("give queue IDs or a selection (ALL, --sender, ...), not both"),
            _ => None,
        }
    }
}

/// What a bulk action did to one message (one line of the CLI's output).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BulkOutcome {
    pub id: String,
    pub ok: bool,
    /// What happened, or why not.
    pub text: String,
}

/// `queue shape` and `/api/queue/shape`: counts by domain of pending recipients and age, in
/// qshape's buckets (a message with recipients in two domains counts in both).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShapeReport {
    /// Each bucket's lower bound in minutes: 0, 5, 10, ... 1280 (the last has no upper bound).
    pub buckets_minutes: Vec<u64>,
    /// Per domain, the count in each bucket.
    pub domains: BTreeMap<String, Vec<usize>>,
}

impl ShapeReport {
    /// The queue's shape at `now` (microseconds since the epoch).
    pub fn of(spool: &dyn Queue, now: i64) -> ShapeReport {
        ShapeReport {
            buckets_minutes: SHAPE_BUCKETS_MINUTES.to_vec(),
            domains: spool.shape(now).into_iter().map(|(d, counts)| (d, counts.to_vec())).collect(),
        }
    }

    /// The counts of all domains, bucket by bucket.
    pub fn totals(&self) -> Vec<usize> {
        let mut totals = vec![0; self.buckets_minutes.len()];
        for counts in self.domains.values() {
            for (total, n) in totals.iter_mut().zip(counts) {
                *total += n;
            }
        }
        totals
    }
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
    /// The node that accepted it (a shared store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_by: Option<String>,
    /// The node delivering it right now (a shared store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased_by: Option<String>,
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
            accepted_by: m.accepted_by,
            leased_by: m.leased_by,
        }
    }
}

/// One message in full, for `queue show`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageDetail {
    pub envelope: Envelope,
    /// The header section as stored (our Received header first), lossily decoded.
    pub headers: String,
    /// What follows the header section, lossily decoded, when asked for (`queue show --body`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
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
        Request::Show { id, body } => {
            id_ok(&id)?;
            let store = Arc::clone(spool);
            let detail = tokio::task::spawn_blocking(move || detail(store.as_ref(), &id, body))
                .await
                .map_err(|e| e.to_string())??;
            json(serde_json::value::to_raw_value(&detail))
        }
        Request::Bulk { action, selection } => {
            let outcomes = bulk(action, &selection, spool, scheduler).await?;
            json(serde_json::value::to_raw_value(&outcomes))
        }
        Request::Shape => {
            let store = Arc::clone(spool);
            let shape = tokio::task::spawn_blocking(move || ShapeReport::of(store.as_ref(), now_micros()))
                .await
                .map_err(|e| e.to_string())?;
            json(serde_json::value::to_raw_value(&shape))
        }
        Request::Pause { domain, paused } => {
            let scheduler = scheduler.ok_or_else(|| ScheduleError::NotRunning.to_string())?;
            let changed = scheduler.pause(&domain, paused).await.map_err(|e| e.to_string())?;
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            text(match (paused, changed) {
                (true, true) => format!("deliveries to {domain} paused: its messages stay queued until resumed"),
                (true, false) => format!("deliveries to {domain} were already paused"),
                (false, _) => format!("deliveries to {domain} resumed: its due messages are tried now"),
            })
        }
        Request::Paused => {
            let scheduler = scheduler.ok_or_else(|| ScheduleError::NotRunning.to_string())?;
            json(serde_json::value::to_raw_value(&scheduler.paused()))
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

/// A message's envelope and header section, with its body when asked (read through the store).
fn detail(spool: &dyn Queue, id: &str, with_body: bool) -> Result<MessageDetail, String> {
    let envelope = spool.get(id).ok_or_else(|| SpoolError::NotFound(id.to_string()).to_string())?;
    let headers = spool.read_headers(id, 256 * 1024).map_err(|e| e.to_string())?;
    let body = if with_body {
        let whole = spool.read_body(id).map_err(|e| e.to_string())?;
        let start = whole.windows(4).position(|w| w == b"\r\n\r\n").map_or(whole.len(), |end| end + 4);
        Some(String::from_utf8_lossy(&whole[start..]).into_owned())
    } else {
        None
    };
    Ok(MessageDetail { envelope, headers: String::from_utf8_lossy(&headers).into_owned(), body })
}

/// The messages a selection names: its IDs as given, or the store's matches, oldest first.
async fn selected(selection: &Selection, spool: &Arc<dyn Queue>) -> Result<Vec<String>, String> {
    if let Some(problem) = selection.problem() {
        return Err(problem.to_string());
    }
    let Some(filter) = selection.filter() else { return Ok(selection.ids.clone()) };
    let store = Arc::clone(spool);
    tokio::task::spawn_blocking(move || store.ids(&filter)).await.map_err(|e| e.to_string())
}

/// Carries out a bulk action message by message: one outcome each, in order. The selection's
/// matches are taken once, at the start; a message gone meanwhile is reported as not queued.
async fn bulk(
    action: BulkAction,
    selection: &Selection,
    spool: &Arc<dyn Queue>,
    scheduler: Option<&SchedulerHandle>,
) -> Result<Vec<BulkOutcome>, String> {
    let ids = selected(selection, spool).await?;
    let needs_daemon = matches!(action, BulkAction::Retry | BulkAction::Bounce);
    if needs_daemon && scheduler.is_none() {
        return Err(ScheduleError::NotRunning.to_string());
    }
    let mut outcomes = Vec::with_capacity(ids.len());
    for id in ids {
        let result = if is_queue_id(&id) {
            one(action, &id, spool, scheduler).await
        } else {
            Err(format!("{id:?} is not a queue ID"))
        };
        outcomes.push(match result {
            Ok(text) => BulkOutcome { id, ok: true, text },
            Err(text) => BulkOutcome { id, ok: false, text },
        });
    }
    Ok(outcomes)
}

/// One message of a bulk action; the text says what happened.
async fn one(
    action: BulkAction,
    id: &str,
    spool: &Arc<dyn Queue>,
    scheduler: Option<&SchedulerHandle>,
) -> Result<String, String> {
    let err = |e: ScheduleError| e.to_string();
    let hold = action == BulkAction::Hold;
    let held_text = |_: Envelope| if hold { "held".to_string() } else { "released: due now".to_string() };
    match (action, scheduler) {
        (BulkAction::Hold, _) if spool.brief(id).is_some_and(|b| b.held) => Ok("already held".into()),
        (BulkAction::Hold | BulkAction::Release, Some(s)) => s.hold(id, hold).await.map(held_text).map_err(err),
        (BulkAction::Hold | BulkAction::Release, None) => {
            schedule::set_held(spool.as_ref(), id, hold).map(held_text).map_err(err)
        }
        (BulkAction::Delete, Some(s)) => s.delete(id).await.map(|()| DELETED.into()).map_err(err),
        (BulkAction::Delete, None) => schedule::delete(spool.as_ref(), id).map(|()| DELETED.into()).map_err(err),
        (BulkAction::Retry, Some(s)) => s.retry(id).await.map(|()| "scheduled for delivery now".into()).map_err(err),
        (BulkAction::Requeue, Some(s)) => s.retry(id).await.map(|()| REQUEUED.into()).map_err(err),
        (BulkAction::Requeue, None) => requeue_offline(spool.as_ref(), id).map(|()| REQUEUED.into()).map_err(err),
        (BulkAction::Bounce, Some(s)) => s.bounce(id).await.map_err(err),
        (BulkAction::Retry | BulkAction::Bounce, None) => Err(err(ScheduleError::NotRunning)),
    }
}

const DELETED: &str = "deleted (no bounce sent)";

/// bartleby keeps no routing decision per message: each attempt looks the domain's next hops up
/// again (the resolver keeps answers for their DNS TTL; the connection cache holds per-domain
/// sessions for seconds), so a requeue makes the message due now and the attempt routes it afresh.
const REQUEUED: &str = "requeued: due now, routed afresh at its next attempt";

/// A requeue while the daemon is stopped: the message is due now in the store, and the daemon
/// tries it as soon as it starts.
fn requeue_offline(spool: &dyn Queue, id: &str) -> Result<(), ScheduleError> {
    match spool.brief(id) {
        None => Err(SpoolError::NotFound(id.to_string()).into()),
        Some(brief) if brief.held => Err(ScheduleError::Held(id.to_string())),
        Some(_) if spool.expedite_id(id, now_micros()) => Ok(()),
        Some(_) => Err(SpoolError::NotFound(id.to_string()).into()),
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

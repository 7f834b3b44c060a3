//! The shared store: one queue in PostgreSQL for several bartleby nodes (`queue.store =
//! "postgres"`, docs/cluster.md). It implements [`Queue`] like the local store, so no stage knows
//! which one it talks to.
//!
//! - **Accept.** A session's body is kept in memory until its commit; concurrent commits go to
//!   the database together, one transaction and one WAL flush for all of them (group commit,
//!   `synchronous_commit` on). The 250 follows the COMMIT; a commit that fails or does not answer
//!   within `queue.db_timeout` is an error, which the session answers with 451 4.3.0.
//! - **Leases.** A node delivers a message only under a claim (`FOR UPDATE SKIP LOCKED`, so two
//!   nodes never claim the same one) that lasts `queue.lease` and is renewed by the holder's
//!   heartbeats while its delivery runs. Writes are fenced: a node changes or removes a message
//!   only when no other node holds a live lease on it, so a node that lost its lease (it stalled
//!   and the lease expired) cannot overwrite the outcome of the node that took over. When a node
//!   dies its leases expire and the others deliver its mail: at least once, never lost.
//! - **Lanes.** A `strict_order` domain is sent by one node at a time (a lane lease), so the
//!   primary sees the domain's mail in arrival order across nodes.
//! - **Wake-ups.** A commit and a flush `NOTIFY` the other nodes (`LISTEN bartleby_queue`); the
//!   scheduler also reads the due messages again every half lease, which finds a dead node's mail.
//!
//! Times (arrival, due, lease expiry) are microseconds of the nodes' wall clocks, as in the local
//! store: the nodes' clocks must agree (NTP) to well under a lease.
//!
//! The [`Queue`] methods block; the database work runs on a small runtime of the store's own, so
//! they may be called from any thread, inside a tokio runtime or not.

use super::{
    Brief, Claim, DueQuery, Envelope, Filter, Found, Incoming, Listing, MessageBody, Page, Queue, QueueId, QueueKey,
    SHAPE_BUCKETS_MINUTES, SpaceInfo, SpoolError, Stats, StoreEvent, for_each_domain, lock, now_micros, queue_id,
    queue_key, space_of,
};
use crate::config::Config;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_postgres::types::ToSql;

/// The schema this build writes; older ones are migrated at start, a newer one is refused.
pub const SCHEMA_VERSION: i32 = 2;

/// Each migration takes the schema from its index to the next version, in one transaction.
const MIGRATIONS: &[&str] = &[
    // Version 1. `domains` and `recipients` are the pending recipients' domains (lower case) and
    // addresses, kept beside the envelope so that filters and the scheduler's due query run in SQL.
    "CREATE TABLE bartleby_nodes (
        name text PRIMARY KEY,
        slot integer NOT NULL UNIQUE,
        started bigint NOT NULL,
        heartbeat bigint NOT NULL,
        version text NOT NULL
    );
    CREATE TABLE bartleby_messages (
        id text PRIMARY KEY,
        arrived bigint NOT NULL,
        next_attempt bigint NOT NULL,
        held boolean NOT NULL,
        bounce_suppressed boolean NOT NULL,
        size bigint NOT NULL,
        sender text NOT NULL,
        recipients text NOT NULL,
        domains text[] NOT NULL,
        accepted_by text NOT NULL,
        leased_by text,
        lease_until bigint NOT NULL DEFAULT 0,
        envelope text NOT NULL
    );
    CREATE INDEX bartleby_messages_due ON bartleby_messages (next_attempt, id) WHERE NOT held;
    CREATE INDEX bartleby_messages_domains ON bartleby_messages USING gin (domains);
    CREATE INDEX bartleby_messages_leased ON bartleby_messages (leased_by) WHERE leased_by IS NOT NULL;
    CREATE TABLE bartleby_bodies (
        id text PRIMARY KEY REFERENCES bartleby_messages (id) ON DELETE CASCADE,
        body bytea NOT NULL
    );
    -- Mail compresses poorly and is read whole: no TOAST compression on the way in.
    ALTER TABLE bartleby_bodies ALTER COLUMN body SET STORAGE EXTERNAL;
    CREATE TABLE bartleby_lanes (
        domain text PRIMARY KEY,
        holder text NOT NULL,
        until bigint NOT NULL
    );",
    // Version 2: what the nodes share beside the queue (the recipient cache), one versioned
    // document each, replaced whole with a compare-and-set on the version.
    "CREATE TABLE bartleby_documents (
        name text PRIMARY KEY,
        version bigint NOT NULL,
        body bytea NOT NULL
    );",
];

/// The NOTIFY channel of queue changes.
const CHANNEL: &str = "bartleby_queue";

/// Nodes that can issue queue IDs at once: a node's slot is 6 of the ID's 12 sequence bits.
const SLOTS: i32 = 64;

/// The advisory lock that serialises schema migrations and node registration across nodes.
const SCHEMA_LOCK: i64 = 0x6261_7274_6c65_6279;

/// Most messages in one group commit, and most octets of their bodies.
const COMMIT_BATCH: usize = 512;
const COMMIT_BYTES: usize = 32 << 20;

/// Group commits running at once; while they run, the next group gathers.
const COMMITTERS: usize = 4;

/// A NOTIFY payload stays under PostgreSQL's 8000-octet limit.
const NOTIFY_LIMIT: usize = 7900;

/// Briefs cached from due queries, at most (the cache is dropped when it grows past this).
const BRIEF_CACHE: usize = 200_000;

/// How a process uses the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The daemon: registers as a node, issues IDs, sends heartbeats, listens for changes.
    Node,
    /// A command-line tool (`queue list`, `import`): reads and changes, never claims.
    Tool,
}

/// The PostgreSQL store. See the module doc.
pub struct PgQueue {
    /// The store's own runtime, for the database connections and its tasks.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    pool: Pool,
    /// This node's name (`queue.node`, or generated and kept in `queue.dir/node-id`).
    node: Arc<str>,
    /// This node's slot in queue IDs (registered in `bartleby_nodes`).
    slot: u16,
    /// The last issued ID as (microseconds, sequence within the slot).
    last_id: Mutex<(i64, u16)>,
    /// Bodies and envelopes waiting for the next group commit.
    commits: mpsc::UnboundedSender<PendingCommit>,
    /// Changes by other nodes, until the scheduler takes the receiver.
    events: Mutex<Option<mpsc::UnboundedReceiver<StoreEvent>>>,
    /// Messages this node holds leases on (claimed, not yet settled): the heartbeat renews these.
    leased: Arc<Mutex<HashSet<QueueId>>>,
    /// `strict_order` domains whose lane this node holds.
    lanes: Arc<Mutex<HashSet<String>>>,
    /// What due queries said of each message (domains, due time), so that dispatch does not ask
    /// once per message; a claim checks again in SQL, so a stale entry costs nothing.
    briefs: Mutex<HashMap<QueueKey, Brief>>,
    timeout: Duration,
    lease: Duration,
    /// `queue.dir`: the local directory whose free space is reported (the database's is not
    /// visible to a client).
    dir: PathBuf,
    /// Stops the heartbeat and the listener.
    stop: watch::Sender<bool>,
}

/// A failure of the database or of the connection to it.
#[derive(Debug, thiserror::Error)]
enum PgError {
    #[error("{}", db_text(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("no connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Bad(String),
}

/// A database error with the server's message, which tokio-postgres keeps in its source.
fn db_text(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(err) {
            Some(source) => format!("{err}: {source}"),
            None => err.to_string(),
        },
    }
}

/// One message on its way into a group commit.
struct PendingCommit {
    row: Row,
    body: Vec<u8>,
    done: std::sync::mpsc::SyncSender<Result<(), String>>,
}

/// A message as its table row has it.
struct Row {
    id: String,
    arrived: i64,
    next_attempt: i64,
    held: bool,
    bounce_suppressed: bool,
    size: i64,
    sender: String,
    /// Pending recipients, one per line.
    recipients: String,
    /// Pending domains, space-separated (`string_to_array` in SQL).
    domains: String,
    envelope: String,
}

impl Row {
    fn of(envelope: &Envelope) -> Result<Row, SpoolError> {
        let mut domains = Vec::new();
        for_each_domain(envelope, |d| domains.push(d.to_string()));
        let recipients: Vec<&str> = envelope.pending().map(|r| r.address.as_str()).collect();
        let stored = Envelope { leased_by: None, ..envelope.clone() };
        let json = serde_json::to_string(&stored)
            .map_err(|source| SpoolError::BadEnvelope { path: PathBuf::from(&envelope.id), source })?;
        Ok(Row {
            id: envelope.id.clone(),
            arrived: envelope.arrived,
            next_attempt: envelope.next_attempt,
            held: envelope.held,
            bounce_suppressed: envelope.bounce_suppressed,
            size: i64::try_from(envelope.size).unwrap_or(i64::MAX),
            sender: envelope.sender.clone(),
            recipients: recipients.join("\n"),
            domains: domains.join(" "),
            envelope: json,
        })
    }
}

/// Rows as column arrays, for one `unnest` statement per group.
#[derive(Default)]
struct Columns {
    id: Vec<String>,
    arrived: Vec<i64>,
    next_attempt: Vec<i64>,
    held: Vec<bool>,
    bounce_suppressed: Vec<bool>,
    size: Vec<i64>,
    sender: Vec<String>,
    recipients: Vec<String>,
    domains: Vec<String>,
    envelope: Vec<String>,
}

impl Columns {
    fn push(&mut self, row: Row) {
        self.id.push(row.id);
        self.arrived.push(row.arrived);
        self.next_attempt.push(row.next_attempt);
        self.held.push(row.held);
        self.bounce_suppressed.push(row.bounce_suppressed);
        self.size.push(row.size);
        self.sender.push(row.sender);
        self.recipients.push(row.recipients);
        self.domains.push(row.domains);
        self.envelope.push(row.envelope);
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 10] {
        [
            &self.id,
            &self.arrived,
            &self.next_attempt,
            &self.held,
            &self.bounce_suppressed,
            &self.size,
            &self.sender,
            &self.recipients,
            &self.domains,
            &self.envelope,
        ]
    }
}

/// The columns of [`Columns::params`] as arrays, and their names as a table's.
const UNNEST_ARRAYS: &str = "unnest($1::text[], $2::int8[], $3::int8[], $4::bool[], $5::bool[], $6::int8[], \
     $7::text[], $8::text[], $9::text[], $10::text[])";
const UNNEST_NAMES: &str =
    "id, arrived, next_attempt, held, bounce_suppressed, size, sender, recipients, domains, envelope";

/// Rows another node does not hold a live lease on: `$me` and `$now` are the given parameters.
fn unleased(me: usize, now: usize) -> String {
    format!("(leased_by IS NULL OR leased_by = ${me} OR lease_until < ${now})")
}

impl PgQueue {
    /// Connects to `queue.url`, creates or migrates the schema, and (as a node) registers this
    /// node, takes back its own leases of an earlier life and starts its heartbeat and listener.
    pub fn open(config: &Config, role: Role) -> Result<PgQueue, SpoolError> {
        let queue = &config.queue;
        let url = queue.url.as_deref().ok_or_else(|| SpoolError::Store("queue.url is not set".into()))?;
        let mut pg: tokio_postgres::Config =
            url.parse().map_err(|e| SpoolError::Store(format!("queue.url: not a PostgreSQL URL: {e}")))?;
        if let Some(path) = &queue.password_file {
            let text = std::fs::read_to_string(path).map_err(|source| SpoolError::Io { path: path.clone(), source })?;
            pg.password(text.lines().next().unwrap_or_default());
        }
        // Durable before 250 whatever the server's default (RFC 5321 6.1).
        pg.options("-c synchronous_commit=on");
        pg.application_name(format!("bartleby {}", env!("CARGO_PKG_VERSION")));
        let timeout = queue.db_timeout.0;
        pg.connect_timeout(timeout);
        let tls = tls_connector(queue.ca_file.as_deref())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bartleby-pg")
            .enable_all()
            .build()
            .map_err(|source| SpoolError::Io { path: PathBuf::from("(postgres runtime)"), source })?;
        let handle = runtime.handle().clone();
        let manager =
            Manager::from_config(pg.clone(), tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = {
            let _entered = handle.enter();
            Pool::builder(manager)
                .max_size(16)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(timeout))
                .create_timeout(Some(timeout))
                .recycle_timeout(Some(timeout))
                .build()
                .map_err(|e| SpoolError::Store(format!("connection pool: {e}")))?
        };
        let node: Arc<str> = match role {
            Role::Node => node_name(config)?.into(),
            Role::Tool => format!("tool-{}", std::process::id()).into(),
        };
        let (commits, commit_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (stop, stopping) = watch::channel(false);
        let mut store = PgQueue {
            runtime: Some(runtime),
            handle,
            pool,
            node,
            slot: 0,
            last_id: Mutex::new((0, 0)),
            commits,
            events: Mutex::new(Some(events_rx)),
            leased: Arc::default(),
            lanes: Arc::default(),
            briefs: Mutex::default(),
            timeout,
            lease: queue.lease.0,
            dir: queue.dir.clone(),
            stop,
        };
        store.migrate()?;
        if role == Role::Node {
            store.slot = store.register()?;
            store.handle.spawn(committer(store.pool.clone(), Arc::clone(&store.node), commit_rx, timeout));
            store.handle.spawn(heartbeat(store.heartbeat_state(), stopping.clone()));
            store.handle.spawn(listen(pg, tls, Arc::clone(&store.node), events_tx, stopping));
        } else {
            store.handle.spawn(committer(store.pool.clone(), Arc::clone(&store.node), commit_rx, timeout));
        }
        Ok(store)
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Runs `work` on the store's runtime and waits for it, at most `queue.db_timeout`.
    fn run<T: Send + 'static>(
        &self,
        what: &str,
        work: impl Future<Output = Result<T, PgError>> + Send + 'static,
    ) -> Result<T, SpoolError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let timeout = self.timeout;
        self.handle.spawn(async move {
            let result = tokio::time::timeout(timeout, work).await.unwrap_or(Err(PgError::Timeout(timeout)));
            let _ = tx.send(result);
        });
        match rx.recv() {
            Ok(result) => result.map_err(|err| SpoolError::Store(format!("{what}: {err}"))),
            Err(_) => Err(SpoolError::Store(format!("{what}: the store has stopped"))),
        }
    }

    /// Like [`PgQueue::run`], for the methods whose signature has no room for an error: the error is
    /// logged and `fallback` returned.
    fn run_or<T: Send + 'static>(
        &self,
        what: &str,
        fallback: T,
        work: impl Future<Output = Result<T, PgError>> + Send + 'static,
    ) -> T {
        match self.run(what, work) {
            Ok(value) => value,
            Err(err) => {
                tracing::error!(error = %err, "queue store");
                fallback
            }
        }
    }

    /// Creates the schema or migrates it to [`SCHEMA_VERSION`], under an advisory lock so that
    /// nodes starting together do it once.
    fn migrate(&self) -> Result<(), SpoolError> {
        let pool = self.pool.clone();
        self.run("schema", async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).await?;
            tx.batch_execute("CREATE TABLE IF NOT EXISTS bartleby_schema (version integer NOT NULL)").await?;
            let version: i32 = match tx.query_opt("SELECT version FROM bartleby_schema", &[]).await? {
                Some(row) => row.try_get(0)?,
                None => {
                    tx.execute("INSERT INTO bartleby_schema VALUES (0)", &[]).await?;
                    0
                }
            };
            if version > SCHEMA_VERSION {
                return Err(PgError::Bad(format!(
                    "the database's schema is version {version}, newer than this bartleby's {SCHEMA_VERSION}: \
                     upgrade this node"
                )));
            }
            for (from, migration) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
                tx.batch_execute(migration).await?;
                tracing::info!(from, to = from + 1, "queue store: schema migrated");
            }
            tx.execute("UPDATE bartleby_schema SET version = $1", &[&SCHEMA_VERSION]).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Registers this node (keeping its slot from an earlier start, else the lowest free one) and
    /// takes back what an earlier life of it held: nothing is in flight at a start.
    fn register(&self) -> Result<u16, SpoolError> {
        let (pool, node) = (self.pool.clone(), Arc::clone(&self.node));
        let stale_after = i64::try_from(Duration::from_secs(86_400).as_micros()).unwrap_or(i64::MAX);
        self.run("node registration", async move {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).await?;
            let now = now_micros();
            let name: &str = &node;
            let slot: i32 = match tx.query_opt("SELECT slot FROM bartleby_nodes WHERE name = $1", &[&name]).await? {
                Some(row) => row.try_get(0)?,
                None => {
                    let used: Vec<i32> = tx
                        .query("SELECT slot FROM bartleby_nodes", &[])
                        .await?
                        .iter()
                        .map(|r| r.try_get(0))
                        .collect::<Result<_, _>>()?;
                    let free = (0..SLOTS).find(|s| !used.contains(s));
                    let slot = match free {
                        Some(slot) => slot,
                        None => {
                            // Every slot taken: the one of the node silent longest, if a day.
                            let row = tx
                                .query_opt(
                                    "DELETE FROM bartleby_nodes WHERE name = (SELECT name FROM bartleby_nodes \
                                     WHERE heartbeat < $1 ORDER BY heartbeat LIMIT 1) RETURNING slot",
                                    &[&(now - stale_after)],
                                )
                                .await?
                                .ok_or_else(|| PgError::Bad(format!("{SLOTS} nodes are registered already")))?;
                            row.try_get(0)?
                        }
                    };
                    tx.execute(
                        "INSERT INTO bartleby_nodes (name, slot, started, heartbeat, version) VALUES ($1, $2, $3, $3, $4)",
                        &[&name, &slot, &now, &env!("CARGO_PKG_VERSION")],
                    )
                    .await?;
                    slot
                }
            };
            tx.execute(
                "UPDATE bartleby_nodes SET started = $2, heartbeat = $2, version = $3 WHERE name = $1",
                &[&name, &now, &env!("CARGO_PKG_VERSION")],
            )
            .await?;
            let released = tx
                .execute("UPDATE bartleby_messages SET leased_by = NULL, lease_until = 0 WHERE leased_by = $1", &[&name])
                .await?;
            tx.execute("DELETE FROM bartleby_lanes WHERE holder = $1", &[&name]).await?;
            tx.commit().await?;
            if released > 0 {
                tracing::info!(messages = released, "queue store: leases of this node's last run released");
            }
            u16::try_from(slot).map_err(|_| PgError::Bad(format!("bad slot {slot}")))
        })
    }

    fn heartbeat_state(&self) -> Heartbeat {
        Heartbeat {
            pool: self.pool.clone(),
            node: Arc::clone(&self.node),
            leased: Arc::clone(&self.leased),
            lanes: Arc::clone(&self.lanes),
            lease: self.lease,
        }
    }

    fn lease_micros(&self) -> i64 {
        i64::try_from(self.lease.as_micros()).unwrap_or(i64::MAX / 4)
    }

    /// Forgets cached briefs of messages this node changed.
    fn forget_briefs<'a>(&self, ids: impl IntoIterator<Item = &'a QueueId>) {
        let mut briefs = lock(&self.briefs);
        for id in ids {
            if let Some(key) = queue_key(id) {
                briefs.remove(&key);
            }
        }
    }

    /// Writes envelopes where no other node holds a live lease, releasing this node's; returns the
    /// IDs written.
    fn write(&self, envelopes: &[Envelope]) -> Result<HashSet<QueueId>, SpoolError> {
        if envelopes.is_empty() {
            return Ok(HashSet::new());
        }
        let mut columns = Columns::default();
        for envelope in envelopes {
            columns.push(Row::of(envelope)?);
        }
        let (pool, node) = (self.pool.clone(), Arc::clone(&self.node));
        let sql = format!(
            "UPDATE bartleby_messages m SET next_attempt = t.next_attempt, held = t.held, \
             bounce_suppressed = t.bounce_suppressed, size = t.size, sender = t.sender, recipients = t.recipients, \
             domains = string_to_array(t.domains, ' '), envelope = t.envelope, leased_by = NULL, lease_until = 0 \
             FROM {UNNEST_ARRAYS} AS t({UNNEST_NAMES}) WHERE m.id = t.id AND (m.leased_by IS NULL OR m.leased_by = $11 OR m.lease_until < $12) \
             RETURNING m.id"
        );
        let written = self.run("update", async move {
            let client = pool.get().await?;
            let statement = client.prepare_cached(&sql).await?;
            let me: &str = &node;
            let now = now_micros();
            let mut params: Vec<&(dyn ToSql + Sync)> = columns.params().to_vec();
            params.push(&me);
            params.push(&now);
            let rows = client.query(&statement, &params).await?;
            rows.iter().map(|r| r.try_get::<_, String>(0)).collect::<Result<HashSet<_>, _>>().map_err(PgError::from)
        })?;
        let mut leased = lock(&self.leased);
        for id in &written {
            leased.remove(id);
        }
        drop(leased);
        self.forget_briefs(&written);
        Ok(written)
    }

    /// Why a message was not written: gone, or leased by another node.
    fn why_not_written(&self, id: &str) -> SpoolError {
        match self.get(id) {
            Some(envelope) => match envelope.leased_by {
                Some(node) => SpoolError::Leased { id: id.to_string(), node },
                None => SpoolError::Store(format!("message {id} could not be written")),
            },
            None => SpoolError::NotFound(id.to_string()),
        }
    }

    /// Envelopes of rows `(envelope, accepted_by, leased_by, lease_until)`, with the lease shown
    /// only while it is live.
    fn envelopes(rows: &[tokio_postgres::Row]) -> Result<Vec<Envelope>, PgError> {
        let now = now_micros();
        rows.iter().map(|row| envelope_of(row, now)).collect()
    }

    /// Sends a NOTIFY to the other nodes.
    fn notify(&self, payload: String) {
        let pool = self.pool.clone();
        self.handle.spawn(async move {
            let result: Result<(), PgError> = async {
                let client = pool.get().await?;
                client.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]).await?;
                Ok(())
            }
            .await;
            if let Err(err) = result {
                tracing::warn!(error = %err, "queue store: cannot notify the other nodes");
            }
        });
    }

    /// Rows of `SELECT ENVELOPE_COLUMNS FROM bartleby_messages WHERE <filter> ... ORDER BY id`.
    fn select_envelopes(
        &self,
        what: &str,
        filter: &Filter,
        after: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<Envelope>, SpoolError> {
        let mut sql = Sql::default();
        let condition = sql.filter(filter, now_micros());
        let after_clause = match after {
            Some(after) => format!(" AND id > {}", sql.param(after.to_string())),
            None => String::new(),
        };
        let limit = if limit == usize::MAX { None } else { Some(i64::try_from(limit).unwrap_or(i64::MAX)) };
        let text = format!(
            "SELECT {ENVELOPE_COLUMNS} FROM bartleby_messages WHERE {condition}{after_clause} ORDER BY id \
             OFFSET {} LIMIT {}",
            sql.param(i64::try_from(offset).unwrap_or(i64::MAX)),
            sql.param(limit)
        );
        let pool = self.pool.clone();
        self.run(what, async move {
            let client = pool.get().await?;
            let rows = client.query(&text, &sql.refs()).await?;
            PgQueue::envelopes(&rows)
        })
    }

    /// `SELECT count(*) FROM bartleby_messages WHERE <filter>`.
    fn count_where(&self, filter: &Filter) -> Result<usize, SpoolError> {
        let mut sql = Sql::default();
        let condition = sql.filter(filter, now_micros());
        let text = format!("SELECT count(*) FROM bartleby_messages WHERE {condition}");
        let pool = self.pool.clone();
        self.run("count", async move {
            let client = pool.get().await?;
            let count: i64 = client.query_one(&text, &sql.refs()).await?.try_get(0)?;
            Ok(usize::try_from(count).unwrap_or(0))
        })
    }
}

impl PgQueue {
    /// A shared document (the recipient cache, the chart's samples, the alert rules' state) with
    /// its version; None when never written.
    pub fn document(&self, name: &str) -> Result<Option<(i64, Vec<u8>)>, SpoolError> {
        let (pool, name) = (self.pool.clone(), name.to_string());
        self.run("document", async move {
            let client = pool.get().await?;
            let row =
                client.query_opt("SELECT version, body FROM bartleby_documents WHERE name = $1", &[&name]).await?;
            match row {
                Some(row) => Ok(Some((row.try_get(0)?, row.try_get(1)?))),
                None => Ok(None),
            }
        })
    }

    /// Replaces a document if it is still at version `seen` (None: not yet written); false when
    /// another node changed it meanwhile (read it again and retry).
    pub fn replace_document(&self, name: &str, seen: Option<i64>, body: Vec<u8>) -> Result<bool, SpoolError> {
        let (pool, name) = (self.pool.clone(), name.to_string());
        self.run("document", async move {
            let client = pool.get().await?;
            let changed = match seen {
                None => {
                    client
                        .execute(
                            "INSERT INTO bartleby_documents (name, version, body) VALUES ($1, 1, $2) ON CONFLICT DO NOTHING",
                            &[&name, &body],
                        )
                        .await?
                }
                Some(version) => {
                    client
                        .execute(
                            "UPDATE bartleby_documents SET body = $3, version = version + 1 WHERE name = $1 AND version = $2",
                            &[&name, &version, &body],
                        )
                        .await?
                }
            };
            Ok(changed == 1)
        })
    }
}

impl Drop for PgQueue {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        // Dropping a runtime blocks, which tokio forbids inside another runtime: let it go.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The columns [`envelope_of`] reads.
const ENVELOPE_COLUMNS: &str = "envelope, accepted_by, leased_by, lease_until";

fn envelope_of(row: &tokio_postgres::Row, now: i64) -> Result<Envelope, PgError> {
    let json: &str = row.try_get(0)?;
    let mut envelope: Envelope = serde_json::from_str(json).map_err(|e| PgError::Bad(format!("bad envelope: {e}")))?;
    envelope.accepted_by = Some(row.try_get(1)?);
    let leased_by: Option<String> = row.try_get(2)?;
    let until: i64 = row.try_get(3)?;
    envelope.leased_by = leased_by.filter(|_| until >= now);
    Ok(envelope)
}

/// A query's text parameters, numbered as they are added.
#[derive(Default)]
struct Sql {
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Sql {
    /// Adds a parameter; returns its placeholder.
    fn param(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
    }

    /// The condition of a [`Filter`] (the same semantics as [`Filter::matches`]).
    fn filter(&mut self, filter: &Filter, now: i64) -> String {
        let mut parts = vec!["true".to_string()];
        if let Some(domain) = &filter.domain {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            parts.push(format!("{} = ANY(domains)", self.param(domain)));
        }
        if let Some(sender) = &filter.sender {
            if sender == "<>" {
                parts.push("sender = ''".to_string());
            } else {
                parts.push(format!("sender ILIKE {}", self.param(like_pattern(sender))));
            }
        }
        if let Some(recipient) = &filter.recipient {
            parts.push(format!("recipients ILIKE {}", self.param(like_pattern(recipient))));
        }
        if let Some(age) = filter.older_than {
            let age = i64::try_from(age.as_micros()).unwrap_or(i64::MAX);
            parts.push(format!("arrived <= {}", self.param(now.saturating_sub(age))));
        }
        if let Some(held) = filter.held {
            parts.push(format!("held = {}", self.param(held)));
        }
        if let Some(kept) = filter.bounce_suppressed {
            parts.push(format!("bounce_suppressed = {}", self.param(kept)));
        }
        parts.join(" AND ")
    }
}

/// `%text%` for ILIKE, with the pattern characters of `text` escaped.
fn like_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// `check-config`: connects to `queue.url` as `serve` would and reads the schema version, changing
/// nothing. Ok(Some(note)) when there is something to say that does not stop a start.
pub fn probe(config: &Config) -> Result<Option<String>, String> {
    let queue = &config.queue;
    let url = queue.url.as_deref().ok_or("not set")?;
    let mut pg: tokio_postgres::Config = url.parse().map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
    if let Some(path) = &queue.password_file {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        pg.password(text.lines().next().unwrap_or_default());
    }
    pg.connect_timeout(queue.db_timeout.0);
    let tls = tls_connector(queue.ca_file.as_deref()).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let version = runtime.block_on(async move {
        let work = async {
            let (client, connection) = pg.connect(tls).await?;
            let driver = tokio::spawn(connection);
            let exists: bool =
                client.query_one("SELECT to_regclass('bartleby_schema') IS NOT NULL", &[]).await?.try_get(0)?;
            let version = if exists {
                client.query_opt("SELECT version FROM bartleby_schema", &[]).await?.map(|r| r.try_get(0)).transpose()?
            } else {
                None
            };
            drop(client);
            driver.abort();
            Ok::<Option<i32>, PgError>(version)
        };
        tokio::time::timeout(queue.db_timeout.0, work).await.unwrap_or(Err(PgError::Timeout(queue.db_timeout.0)))
    });
    match version.map_err(|e| format!("cannot reach the database: {e}"))? {
        None => {
            Ok(Some("queue.url: the database has no bartleby schema yet; the first node to start creates it".into()))
        }
        Some(v) if v > SCHEMA_VERSION => {
            Err(format!("the database's schema is version {v}, newer than this bartleby's {SCHEMA_VERSION}"))
        }
        Some(v) if v < SCHEMA_VERSION => {
            Ok(Some(format!("queue.url: schema version {v} is migrated to {SCHEMA_VERSION} at the next start")))
        }
        Some(_) => Ok(None),
    }
}

/// TLS toward the database (used when the URL's `sslmode` asks for it): the web PKI roots and
/// `queue.ca_file`, ring as everywhere else.
fn tls_connector(ca_file: Option<&Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, SpoolError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let bad = |e: String| SpoolError::Store(format!("TLS: {e}"));
    let mut roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(format!("{}: {e}", path.display())))? {
            let cert = cert.map_err(|e| bad(format!("{}: {e}", path.display())))?;
            roots.add(cert).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `queue.node`, or the name generated at this node's first start and kept in `queue.dir/node-id`.
fn node_name(config: &Config) -> Result<String, SpoolError> {
    if let Some(node) = &config.queue.node {
        return Ok(node.clone());
    }
    let path = config.queue.dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(SpoolError::Io { path, source }),
    }
    let host: String = config.hostname.chars().take(40).collect();
    let mut random = [0u8; 4];
    getrandom::fill(&mut random).map_err(|e| SpoolError::Store(format!("no randomness for a node name: {e}")))?;
    let name = format!("{host}-{}", random.iter().map(|b| format!("{b:02x}")).collect::<String>());
    if !config.queue.dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(&config.queue.dir)
            .map_err(|source| SpoolError::Io { path: config.queue.dir.clone(), source })?;
    }
    super::atomic_write(&path, format!("{name}\n").as_bytes())?;
    Ok(name)
}

/// Takes the waiting commits in groups, each one transaction, several groups at once.
async fn committer(pool: Pool, node: Arc<str>, mut waiting: mpsc::UnboundedReceiver<PendingCommit>, timeout: Duration) {
    let running = Arc::new(tokio::sync::Semaphore::new(COMMITTERS));
    while let Some(first) = waiting.recv().await {
        let Ok(permit) = Arc::clone(&running).acquire_owned().await else { return };
        let mut bytes = first.body.len();
        let mut group = vec![first];
        while group.len() < COMMIT_BATCH && bytes < COMMIT_BYTES {
            match waiting.try_recv() {
                Ok(next) => {
                    bytes += next.body.len();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        let (pool, node) = (pool.clone(), Arc::clone(&node));
        tokio::spawn(async move {
            let mut columns = Columns::default();
            let mut bodies = Vec::with_capacity(group.len());
            let mut done = Vec::with_capacity(group.len());
            for pending in group {
                columns.push(pending.row);
                bodies.push(pending.body);
                done.push(pending.done);
            }
            let result = tokio::time::timeout(timeout, insert(&pool, &node, &columns, &bodies))
                .await
                .unwrap_or(Err(PgError::Timeout(timeout)))
                .map_err(|e| e.to_string());
            if let Err(err) = &result {
                tracing::error!(error = %err, messages = done.len(), "queue store: commit failed");
            }
            for done in done {
                let _ = done.send(result.clone());
            }
            drop(permit);
        });
    }
}

/// One group commit: the messages and their bodies in one statement, a NOTIFY naming them (sent
/// by PostgreSQL at the COMMIT), and the COMMIT, which returns once the WAL is flushed.
async fn insert(pool: &Pool, node: &str, columns: &Columns, bodies: &[Vec<u8>]) -> Result<(), PgError> {
    let mut client = pool.get().await?;
    let sql = format!(
        "WITH t AS (SELECT * FROM {UNNEST_ARRAYS} WITH ORDINALITY AS t({UNNEST_NAMES}, ord)), \
         b AS (SELECT * FROM unnest($12::bytea[]) WITH ORDINALITY AS b(body, ord)), \
         inserted AS (INSERT INTO bartleby_messages (id, arrived, next_attempt, held, bounce_suppressed, size, \
         sender, recipients, domains, accepted_by, envelope) \
         SELECT id, arrived, next_attempt, held, bounce_suppressed, size, sender, recipients, \
         string_to_array(domains, ' '), $11, envelope FROM t ON CONFLICT (id) DO NOTHING RETURNING id) \
         INSERT INTO bartleby_bodies (id, body) SELECT t.id, b.body FROM t JOIN b USING (ord) \
         JOIN inserted USING (id)"
    );
    let tx = client.transaction().await?;
    let statement = tx.prepare_cached(&sql).await?;
    let mut params: Vec<&(dyn ToSql + Sync)> = columns.params().to_vec();
    params.push(&node);
    params.push(&bodies);
    let payload = queued_payload(node, &columns.id);
    let notify: [&(dyn ToSql + Sync); 2] = [&CHANNEL, &payload];
    let (inserted, _) =
        tokio::try_join!(tx.execute(&statement, &params), tx.execute("SELECT pg_notify($1, $2)", &notify))?;
    tx.commit().await?;
    if usize::try_from(inserted).unwrap_or(0) < columns.id.len() {
        tracing::warn!(
            messages = columns.id.len(),
            inserted,
            "queue store: some messages were queued already under their IDs (an import?)"
        );
    }
    Ok(())
}

/// `q NODE ID…` for the other nodes' schedulers, or `r NODE` (read the queue again) when the IDs
/// do not fit in a NOTIFY.
fn queued_payload(node: &str, ids: &[String]) -> String {
    let mut payload = format!("q {node}");
    for id in ids {
        if payload.len() + id.len() + 1 > NOTIFY_LIMIT {
            return format!("r {node}");
        }
        payload.push(' ');
        payload.push_str(id);
    }
    payload
}

/// What the heartbeat task needs.
struct Heartbeat {
    pool: Pool,
    node: Arc<str>,
    leased: Arc<Mutex<HashSet<QueueId>>>,
    lanes: Arc<Mutex<HashSet<String>>>,
    lease: Duration,
}

/// Every quarter lease: the node's heartbeat, and its leases (messages in flight, lanes) renewed,
/// so that a lease outlives a long delivery but not a dead node.
async fn heartbeat(state: Heartbeat, mut stop: watch::Receiver<bool>) {
    let every = (state.lease / 4).max(Duration::from_millis(250));
    let lease = i64::try_from(state.lease.as_micros()).unwrap_or(i64::MAX / 4);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let leased: Vec<String> = lock(&state.leased).iter().cloned().collect();
        let lanes: Vec<String> = lock(&state.lanes).iter().cloned().collect();
        let result: Result<(), PgError> = async {
            let client = state.pool.get().await?;
            let now = now_micros();
            let until = now.saturating_add(lease);
            let me: &str = &state.node;
            client.execute("UPDATE bartleby_nodes SET heartbeat = $2 WHERE name = $1", &[&me, &now]).await?;
            if !leased.is_empty() {
                client
                    .execute(
                        "UPDATE bartleby_messages SET lease_until = $3 WHERE leased_by = $1 AND id = ANY($2)",
                        &[&me, &leased, &until],
                    )
                    .await?;
            }
            if !lanes.is_empty() {
                client
                    .execute(
                        "UPDATE bartleby_lanes SET until = $3 WHERE holder = $1 AND domain = ANY($2)",
                        &[&me, &lanes, &until],
                    )
                    .await?;
            }
            Ok(())
        }
        .await;
        if let Err(err) = result {
            tracing::warn!(error = %err, "queue store: heartbeat failed");
        }
    }
}

/// `LISTEN bartleby_queue` on a connection of its own, turning the other nodes' notices into
/// [`StoreEvent`]s; reconnects after a failure, and then asks for a full read (notices may have
/// been missed meanwhile).
async fn listen(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    node: Arc<str>,
    events: mpsc::UnboundedSender<StoreEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut first = true;
    loop {
        let result = tokio::select! {
            result = listen_once(&config, tls.clone(), &node, &events, first) => result,
            _ = stop.changed() => return,
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, "queue store: lost the notification connection; reconnecting");
        }
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    node: &str,
    events: &mpsc::UnboundedSender<StoreEvent>,
    first: bool,
) -> Result<(), PgError> {
    let (client, mut connection) = config.connect(tls).await?;
    let (notices_tx, mut notices) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if notices_tx.send(n.payload().to_string()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(PgError::from(err)),
                None => return Ok(()),
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    if !first {
        let _ = events.send(StoreEvent::Changed);
    }
    while let Some(payload) = notices.recv().await {
        if let Some(event) = parse_notice(&payload, node) {
            let _ = events.send(event);
        }
    }
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(err) => Err(PgError::Bad(err.to_string())),
    }
}

/// A notice of another node as an event; this node's own are ignored.
fn parse_notice(payload: &str, me: &str) -> Option<StoreEvent> {
    let mut words = payload.split(' ');
    let kind = words.next()?;
    let from = words.next()?;
    if from == me {
        return None;
    }
    match kind {
        "q" => Some(StoreEvent::Queued(words.filter(|w| super::is_queue_id(w)).map(str::to_string).collect())),
        _ => Some(StoreEvent::Changed),
    }
}

/// A message being received: its body in memory until the group commit.
struct PgIncoming {
    queue: Arc<PgQueue>,
    id: QueueId,
    body: Vec<u8>,
}

impl Incoming for PgIncoming {
    fn id(&self) -> &str {
        &self.id
    }

    fn size(&self) -> u64 {
        self.body.len() as u64
    }

    fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        self.body.extend_from_slice(data);
        Ok(())
    }

    fn commit(self: Box<Self>, mut envelope: Envelope) -> Result<Envelope, SpoolError> {
        envelope.id = self.id.clone();
        envelope.size = self.body.len() as u64;
        envelope.accepted_by = Some(self.queue.node.to_string());
        let row = Row::of(&envelope)?;
        let (done, result) = std::sync::mpsc::sync_channel(1);
        self.queue
            .commits
            .send(PendingCommit { row, body: self.body, done })
            .map_err(|_| SpoolError::Store("the store has stopped".into()))?;
        // The committer bounds its own wait; this one covers a committer that is itself stuck.
        match result.recv_timeout(self.queue.timeout + Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(envelope),
            Ok(Err(err)) => Err(SpoolError::Store(format!("commit: {err}"))),
            Err(_) => Err(SpoolError::Store(format!("commit: no answer within {:?}", self.queue.timeout))),
        }
    }
}

impl Queue for PgQueue {
    /// 13 hex digits of microseconds, then 3 of this node's slot (6 bits) and a sequence (6 bits):
    /// unique across nodes, and in arrival order as far as the nodes' clocks agree.
    fn new_id(&self) -> QueueId {
        let mut last = lock(&self.last_id);
        let now = now_micros();
        let next = if now > last.0 {
            (now, 0)
        } else if last.1 < 0x3f {
            (last.0, last.1 + 1)
        } else {
            (last.0 + 1, 0)
        };
        *last = next;
        format!("{:013X}{:03X}", next.0, (self.slot << 6) | next.1)
    }

    fn incoming(self: Arc<Self>, id: &str) -> Result<Box<dyn Incoming>, SpoolError> {
        Ok(Box::new(PgIncoming { queue: self, id: id.to_string(), body: Vec::new() }))
    }

    fn get(&self, id: &str) -> Option<Envelope> {
        let (pool, id) = (self.pool.clone(), id.to_string());
        self.run_or("get", None, async move {
            let client = pool.get().await?;
            let statement = client
                .prepare_cached(&format!("SELECT {ENVELOPE_COLUMNS} FROM bartleby_messages WHERE id = $1"))
                .await?;
            match client.query_opt(&statement, &[&id]).await? {
                Some(row) => Ok(Some(envelope_of(&row, now_micros())?)),
                None => Ok(None),
            }
        })
    }

    fn brief(&self, id: &str) -> Option<Brief> {
        if let Some(brief) = queue_key(id).and_then(|key| lock(&self.briefs).get(&key).cloned()) {
            return Some(brief);
        }
        let (pool, id) = (self.pool.clone(), id.to_string());
        self.run_or("brief", None, async move {
            let client = pool.get().await?;
            let statement = client
                .prepare_cached("SELECT held, domains, next_attempt FROM bartleby_messages WHERE id = $1")
                .await?;
            match client.query_opt(&statement, &[&id]).await? {
                Some(row) => {
                    Ok(Some(Brief { held: row.try_get(0)?, domains: row.try_get(1)?, next_attempt: row.try_get(2)? }))
                }
                None => Ok(None),
            }
        })
    }

    fn visit(&self, f: &mut dyn FnMut(&Envelope)) {
        match self.select_envelopes("visit", &Filter::all(), None, 0, usize::MAX) {
            Ok(envelopes) => envelopes.iter().for_each(f),
            Err(err) => tracing::error!(error = %err, "queue store"),
        }
    }

    fn due(&self, query: &DueQuery<'_>) -> Vec<(i64, QueueKey)> {
        let (after_at, after_id) = match query.after {
            Some((at, key)) => (at, queue_id(key)),
            None => (i64::MIN, String::new()),
        };
        let domain = query.domain.map(|d| d.trim_end_matches('.').to_ascii_lowercase());
        let except: Vec<String> = query.except.iter().map(|d| d.trim_end_matches('.').to_ascii_lowercase()).collect();
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let (until, pool, node) = (query.until, self.pool.clone(), Arc::clone(&self.node));
        let sql = format!(
            "SELECT next_attempt, id, domains FROM bartleby_messages WHERE NOT held AND next_attempt <= $1 \
             AND (next_attempt, id) > ($2, $3) AND ($4::text IS NULL OR $4 = ANY(domains)) \
             AND NOT (domains && $5::text[]) AND {} ORDER BY next_attempt, id LIMIT $8",
            unleased(6, 7)
        );
        let rows = self.run_or("due", Vec::new(), async move {
            let client = pool.get().await?;
            let statement = client.prepare_cached(&sql).await?;
            let me: &str = &node;
            let now = now_micros();
            let rows =
                client.query(&statement, &[&until, &after_at, &after_id, &domain, &except, &me, &now, &limit]).await?;
            rows.iter()
                .map(|r| Ok((r.try_get::<_, i64>(0)?, r.try_get::<_, String>(1)?, r.try_get::<_, Vec<String>>(2)?)))
                .collect::<Result<Vec<_>, PgError>>()
        });
        let mut briefs = lock(&self.briefs);
        if briefs.len() > BRIEF_CACHE {
            briefs.clear();
        }
        let mut due = Vec::with_capacity(rows.len());
        for (at, id, domains) in rows {
            if let Some(key) = queue_key(&id) {
                briefs.insert(key, Brief { held: false, domains, next_attempt: at });
                due.push((at, key));
            }
        }
        due
    }

    fn expedite(&self, filter: &Filter, at: i64) -> usize {
        let mut sql = Sql::default();
        let condition = sql.filter(filter, now_micros());
        let text =
            format!("UPDATE bartleby_messages SET next_attempt = {} WHERE NOT held AND {condition}", sql.param(at));
        let pool = self.pool.clone();
        let made_due = self.run_or("flush", 0, async move {
            let client = pool.get().await?;
            Ok(usize::try_from(client.execute(&text, &sql.refs()).await?).unwrap_or(0))
        });
        lock(&self.briefs).clear();
        self.notify(format!("f {}", self.node));
        made_due
    }

    fn expedite_id(&self, id: &str, at: i64) -> bool {
        let (pool, id_owned) = (self.pool.clone(), id.to_string());
        let made = self.run_or("retry", false, async move {
            let client = pool.get().await?;
            let n = client
                .execute("UPDATE bartleby_messages SET next_attempt = $2 WHERE id = $1 AND NOT held", &[&id_owned, &at])
                .await?;
            Ok(n > 0)
        });
        self.forget_briefs([&id.to_string()]);
        made
    }

    fn claim(&self, ids: &[QueueId], due_by: Option<i64>) -> Vec<Claim> {
        if ids.is_empty() {
            return Vec::new();
        }
        let (pool, node, ids_owned) = (self.pool.clone(), Arc::clone(&self.node), ids.to_vec());
        let lease = self.lease_micros();
        let sql = format!(
            "WITH c AS (SELECT id FROM bartleby_messages WHERE id = ANY($1) AND NOT held \
             AND ($2::int8 IS NULL OR next_attempt <= $2) AND {} ORDER BY id FOR UPDATE SKIP LOCKED) \
             UPDATE bartleby_messages m SET leased_by = $3, lease_until = $5 FROM c WHERE m.id = c.id \
             RETURNING m.envelope, m.accepted_by, m.leased_by, m.lease_until",
            unleased(3, 4)
        );
        let claims = self.run_or("claim", Vec::new(), async move {
            let client = pool.get().await?;
            let statement = client.prepare_cached(&sql).await?;
            let me: &str = &node;
            let now = now_micros();
            let until = now.saturating_add(lease);
            let rows = client.query(&statement, &[&ids_owned, &due_by, &me, &now, &until]).await?;
            let mut claims: Vec<Claim> =
                PgQueue::envelopes(&rows)?.into_iter().map(|envelope| Claim { envelope, until }).collect();
            claims.sort_by(|a, b| a.envelope.id.cmp(&b.envelope.id));
            Ok(claims)
        });
        let mut leased = lock(&self.leased);
        for claim in &claims {
            leased.insert(claim.envelope.id.clone());
        }
        drop(leased);
        self.forget_briefs(ids);
        claims
    }

    fn unclaim(&self, ids: &[QueueId]) {
        if ids.is_empty() {
            return;
        }
        let (pool, node, ids_owned) = (self.pool.clone(), Arc::clone(&self.node), ids.to_vec());
        self.run_or("unclaim", (), async move {
            let client = pool.get().await?;
            let me: &str = &node;
            client
                .execute(
                    "UPDATE bartleby_messages SET leased_by = NULL, lease_until = 0 WHERE leased_by = $1 AND id = ANY($2)",
                    &[&me, &ids_owned],
                )
                .await?;
            Ok(())
        });
        let mut leased = lock(&self.leased);
        for id in ids {
            leased.remove(id);
        }
    }

    fn claim_lane(&self, domain: &str) -> bool {
        let (pool, node, domain_owned) = (self.pool.clone(), Arc::clone(&self.node), domain.to_ascii_lowercase());
        let lease = self.lease_micros();
        let granted = self.run_or("lane", false, async move {
            let client = pool.get().await?;
            let me: &str = &node;
            let now = now_micros();
            let until = now.saturating_add(lease);
            let row = client
                .query_opt(
                    "INSERT INTO bartleby_lanes (domain, holder, until) VALUES ($1, $2, $4) \
                     ON CONFLICT (domain) DO UPDATE SET holder = $2, until = $4 \
                     WHERE bartleby_lanes.holder = $2 OR bartleby_lanes.until < $3 RETURNING holder",
                    &[&domain_owned, &me, &now, &until],
                )
                .await?;
            Ok(row.is_some())
        });
        if granted {
            lock(&self.lanes).insert(domain.to_ascii_lowercase());
        }
        granted
    }

    fn release_lane(&self, domain: &str) {
        let domain = domain.to_ascii_lowercase();
        if !lock(&self.lanes).remove(&domain) {
            return;
        }
        let (pool, node) = (self.pool.clone(), Arc::clone(&self.node));
        self.run_or("lane", (), async move {
            let client = pool.get().await?;
            let me: &str = &node;
            client.execute("DELETE FROM bartleby_lanes WHERE domain = $1 AND holder = $2", &[&domain, &me]).await?;
            Ok(())
        });
    }

    fn shared(&self) -> bool {
        true
    }

    fn events(&self) -> Option<mpsc::UnboundedReceiver<StoreEvent>> {
        lock(&self.events).take()
    }

    fn reread_every(&self) -> Option<Duration> {
        Some((self.lease / 2).clamp(Duration::from_secs(1), Duration::from_secs(30)))
    }

    fn list(&self) -> Vec<Envelope> {
        self.select_envelopes("list", &Filter::all(), None, 0, usize::MAX).unwrap_or_else(|err| {
            tracing::error!(error = %err, "queue store");
            Vec::new()
        })
    }

    fn query(&self, filter: &Filter, page: Page) -> Found {
        let result = (|| {
            let total = self.count_where(&Filter::all())?;
            let matched = if filter.is_empty() { total } else { self.count_where(filter)? };
            let envelopes = self.select_envelopes("query", filter, None, page.offset, page.limit)?;
            Ok::<_, SpoolError>(Found { total, matched, envelopes })
        })();
        result.unwrap_or_else(|err| {
            tracing::error!(error = %err, "queue store");
            Found::default()
        })
    }

    fn scan(&self, filter: &Filter, after: Option<&str>, limit: usize) -> Vec<Envelope> {
        self.select_envelopes("scan", filter, after, 0, limit).unwrap_or_else(|err| {
            tracing::error!(error = %err, "queue store");
            Vec::new()
        })
    }

    fn listing(&self, after: Option<&str>, limit: usize) -> Vec<Listing> {
        self.scan(&Filter::all(), after, limit).iter().map(Listing::from).collect()
    }

    fn ids(&self, filter: &Filter) -> Vec<QueueId> {
        let mut sql = Sql::default();
        let condition = sql.filter(filter, now_micros());
        let text = format!("SELECT id FROM bartleby_messages WHERE {condition} ORDER BY id");
        let pool = self.pool.clone();
        self.run_or("ids", Vec::new(), async move {
            let client = pool.get().await?;
            let rows = client.query(&text, &sql.refs()).await?;
            rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>().map_err(PgError::from)
        })
    }

    fn count(&self, filter: &Filter) -> usize {
        self.count_where(filter).unwrap_or_else(|err| {
            tracing::error!(error = %err, "queue store");
            0
        })
    }

    fn stats(&self) -> Stats {
        let pool = self.pool.clone();
        self.run_or("stats", Stats::default(), async move {
            let client = pool.get().await?;
            let totals = client
                .query_one(
                    "SELECT count(*), coalesce(sum(size), 0)::int8, count(*) FILTER (WHERE held), \
                     count(*) FILTER (WHERE bounce_suppressed), min(arrived) FROM bartleby_messages",
                    &[],
                )
                .await?;
            let count =
                |i: usize| -> Result<usize, PgError> { Ok(usize::try_from(totals.try_get::<_, i64>(i)?).unwrap_or(0)) };
            let mut stats = Stats {
                messages: count(0)?,
                bytes: u64::try_from(totals.try_get::<_, i64>(1)?).unwrap_or(0),
                held: count(2)?,
                bounce_suppressed: count(3)?,
                oldest: totals.try_get(4)?,
                domains: BTreeMap::new(),
            };
            let rows = client
                .query(
                    "SELECT d, count(*), coalesce(sum(size), 0)::int8, min(arrived) \
                     FROM bartleby_messages, unnest(domains) AS d GROUP BY d",
                    &[],
                )
                .await?;
            for row in rows {
                let domain: String = row.try_get(0)?;
                let entry = super::DomainStats {
                    messages: usize::try_from(row.try_get::<_, i64>(1)?).unwrap_or(0),
                    bytes: u64::try_from(row.try_get::<_, i64>(2)?).unwrap_or(0),
                    oldest: row.try_get(3)?,
                };
                stats.domains.insert(domain, entry);
            }
            Ok(stats)
        })
    }

    fn shape(&self, now: i64) -> BTreeMap<String, [usize; SHAPE_BUCKETS_MINUTES.len()]> {
        let mut case = String::from("CASE");
        for (bucket, start) in SHAPE_BUCKETS_MINUTES.iter().enumerate().rev() {
            case.push_str(&format!(" WHEN ($1 - arrived) / 60000000 >= {start} THEN {bucket}"));
        }
        case.push_str(" ELSE 0 END");
        let sql = format!(
            "SELECT d, {case} AS bucket, count(*) FROM bartleby_messages, unnest(domains) AS d GROUP BY d, bucket"
        );
        let pool = self.pool.clone();
        self.run_or("shape", BTreeMap::new(), async move {
            let client = pool.get().await?;
            let mut shape: BTreeMap<String, [usize; SHAPE_BUCKETS_MINUTES.len()]> = BTreeMap::new();
            for row in client.query(&sql, &[&now]).await? {
                let domain: String = row.try_get(0)?;
                let bucket =
                    usize::try_from(row.try_get::<_, i32>(1)?).unwrap_or(0).min(SHAPE_BUCKETS_MINUTES.len() - 1);
                let count = usize::try_from(row.try_get::<_, i64>(2)?).unwrap_or(0);
                shape.entry(domain).or_default()[bucket] += count;
            }
            Ok(shape)
        })
    }

    fn update(&self, envelopes: &[Envelope]) -> Result<(), SpoolError> {
        let written = self.write(envelopes)?;
        match envelopes.iter().find(|e| !written.contains(&e.id)) {
            Some(missed) => Err(self.why_not_written(&missed.id)),
            None => Ok(()),
        }
    }

    /// The database has no cheaper kind of write: bookkeeping is written as it comes.
    fn note(&self, envelopes: Vec<Envelope>) {
        match self.write(&envelopes) {
            Ok(written) if written.len() < envelopes.len() => {
                tracing::warn!(
                    messages = envelopes.len() - written.len(),
                    "queue store: retry state not written (removed, or taken over by another node)"
                );
            }
            Ok(_) => {}
            Err(err) => tracing::error!(error = %err, "queue store: cannot write retry state"),
        }
    }

    fn persist(&self) -> Result<usize, SpoolError> {
        Ok(0)
    }

    fn remove(&self, ids: &[QueueId]) -> Result<(), SpoolError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (pool, node, ids_owned) = (self.pool.clone(), Arc::clone(&self.node), ids.to_vec());
        let sql = format!("DELETE FROM bartleby_messages WHERE id = ANY($1) AND {} RETURNING id", unleased(2, 3));
        let removed: Vec<String> = self.run("remove", async move {
            let client = pool.get().await?;
            let statement = client.prepare_cached(&sql).await?;
            let me: &str = &node;
            let rows = client.query(&statement, &[&ids_owned, &me, &now_micros()]).await?;
            rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>().map_err(PgError::from)
        })?;
        let mut leased = lock(&self.leased);
        for id in ids {
            leased.remove(id);
        }
        drop(leased);
        self.forget_briefs(ids);
        if removed.len() < ids.len() {
            let removed: HashSet<&String> = removed.iter().collect();
            for id in ids.iter().filter(|id| !removed.contains(id)) {
                if let Some(node) = self.get(id).and_then(|e| e.leased_by) {
                    tracing::warn!(queue_id = %id, node = %node, "not removed: another node took it over");
                }
            }
        }
        Ok(())
    }

    fn delete(&self, id: &str) -> Result<(), SpoolError> {
        let (pool, node, id_owned) = (self.pool.clone(), Arc::clone(&self.node), id.to_string());
        let sql = format!("DELETE FROM bartleby_messages WHERE id = $1 AND {}", unleased(2, 3));
        let removed = self.run("delete", async move {
            let client = pool.get().await?;
            let me: &str = &node;
            Ok(client.execute(&sql, &[&id_owned, &me, &now_micros()]).await?)
        })?;
        self.forget_briefs([&id.to_string()]);
        if removed == 0 {
            return Err(match self.get(id) {
                Some(envelope) => match envelope.leased_by {
                    Some(node) => SpoolError::Leased { id: id.to_string(), node },
                    None => SpoolError::Store(format!("message {id} could not be removed")),
                },
                None => SpoolError::NotFound(id.to_string()),
            });
        }
        Ok(())
    }

    fn open_body(&self, id: &str) -> Result<MessageBody, SpoolError> {
        let (pool, id_owned) = (self.pool.clone(), id.to_string());
        let body: Option<Vec<u8>> = self.run("body", async move {
            let client = pool.get().await?;
            let statement = client.prepare_cached("SELECT body FROM bartleby_bodies WHERE id = $1").await?;
            match client.query_opt(&statement, &[&id_owned]).await? {
                Some(row) => Ok(Some(row.try_get(0)?)),
                None => Ok(None),
            }
        })?;
        let body = body.ok_or_else(|| SpoolError::NotFound(id.to_string()))?;
        let len = body.len() as u64;
        Ok(MessageBody::new(Box::new(std::io::Cursor::new(body)), len))
    }

    fn space(&self) -> Result<SpaceInfo, SpoolError> {
        space_of(&self.dir)
    }

    fn document(&self, name: &str) -> Result<Option<(i64, Vec<u8>)>, SpoolError> {
        PgQueue::document(self, name)
    }

    fn replace_document(&self, name: &str, seen: Option<i64>, body: Vec<u8>) -> Result<bool, SpoolError> {
        PgQueue::replace_document(self, name, seen, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(like_pattern("a_b%c\\"), "%a\\_b\\%c\\\\%");
        assert_eq!(like_pattern(""), "%%");
    }

    #[test]
    fn notices_of_other_nodes_become_events() {
        assert_eq!(parse_notice("q me 0000000000001000", "me"), None);
        assert_eq!(
            parse_notice("q other 0000000000001000 junk", "me"),
            Some(StoreEvent::Queued(vec!["0000000000001000".to_string()]))
        );
        assert_eq!(parse_notice("f other", "me"), Some(StoreEvent::Changed));
        assert_eq!(parse_notice("", "me"), None);
    }

    #[test]
    fn queued_notices_fit_in_a_notify() {
        let ids: Vec<String> = (0..1000).map(|i| format!("{i:016X}")).collect();
        assert_eq!(queued_payload("n", &ids), "r n");
        assert_eq!(queued_payload("n", &ids[..2]), "q n 0000000000000000 0000000000000001");
    }

    #[test]
    fn filters_become_conditions() {
        let mut sql = Sql::default();
        let filter = Filter {
            domain: Some("Example.TEST.".into()),
            sender: Some("<>".into()),
            held: Some(false),
            ..Filter::default()
        };
        assert_eq!(sql.filter(&filter, 0), "true AND $1 = ANY(domains) AND sender = '' AND held = $2");
        assert_eq!(sql.params.len(), 2);
    }
}

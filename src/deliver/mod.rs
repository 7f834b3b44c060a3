//! Where a message goes and how it gets there: routes, MX resolution with the backup-MX rule,
//! and the outbound SMTP client.
//!
//! The scheduler hands [`Deliverer::deliver`] a batch of messages for one domain, oldest first, and
//! gets back one [`RcptOutcome`] per pending recipient of that domain. The deliverer never touches
//! the spool's state: turning outcomes into retries, bounces and removals is the scheduler's job.

//!
//! Layout: [`route`] finds the next hops (static routes, MX with the backup-MX rule of [`mx`],
//! implicit MX), [`client`] speaks SMTP to one of them, [`cache`] keeps idle connections between
//! batches, and this file spreads a batch over a bounded number of connections per destination,
//! each carrying many messages.

pub mod cache;
pub mod client;
pub mod dane;
pub mod destination;
pub mod https;
pub mod mta_sts;
pub mod mx;
pub mod route;
pub mod tlsa;

use cache::{CacheKey, ConnectionCache};
pub use client::{ClientError, ClientSettings, Session, TlsMode};
pub use route::{NextHop, RouteError, Router};

use crate::config::Config;
use crate::lock;
use crate::spool::{Envelope, QueueId, Recipient, domain_of};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;

/// What happened to one recipient in one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The next hop accepted the message for this recipient (250 after DATA).
    Delivered(Detail),
    /// Try again later: 4xx, refused or dropped connection, timeout, temporary DNS failure.
    TempFail(Detail),
    /// Permanent failure (5xx, null MX, NXDOMAIN): bounce.
    PermFail(Detail),
    /// The MX list points back to us (we are the best MX): defer, never deliver to ourselves.
    Loop(Detail),
}

/// The facts behind an outcome, for the queue listing, the log and the DSN.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Detail {
    /// RFC 3463 enhanced status code, e.g. "4.4.1" or "5.1.1".
    pub status: String,
    /// Human-readable: the stage and the server's reply text, e.g. "RCPT TO: 550 5.1.1 no such user".
    pub text: String,
    /// The host that gave the reply, if one did (DSN Remote-MTA).
    pub remote_mta: Option<String>,
    /// The SMTP reply code and text as received, for the DSN Diagnostic-Code, if any.
    pub diagnostic: Option<String>,
    /// The connection or the session failed (refused, timed out, dropped, 421, TLS, no next hop),
    /// not this recipient: only such a failure counts against the destination (its up/down state,
    /// the flush when it is back). A 4xx for one recipient (a greylist, a full mailbox) does not.
    pub session: bool,
}

/// One message to deliver: its envelope (only pending recipients in the batch's domain are tried)
/// and the queue that holds it, through which its body is opened, by ID, when it is sent.
#[derive(Clone)]
pub struct Job {
    /// The message's envelope as the spool has it.
    pub envelope: Envelope,
    /// Where the body is read from (CRLF line endings, not dot-stuffed).
    pub queue: Arc<dyn crate::spool::Queue>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("envelope", &self.envelope).finish_non_exhaustive()
    }
}

/// The outcomes of one message, one entry per recipient address that was tried.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// The message's queue ID.
    pub id: QueueId,
    /// (recipient address, outcome), in the envelope's order.
    pub outcomes: Vec<(String, RcptOutcome)>,
}

impl RcptOutcome {
    /// The facts behind the outcome.
    pub fn detail(&self) -> &Detail {
        match self {
            RcptOutcome::Delivered(d) | RcptOutcome::TempFail(d) | RcptOutcome::PermFail(d) | RcptOutcome::Loop(d) => d,
        }
    }
}

/// What the scheduler needs of delivery: one domain's batch taken to its next hops, each message's
/// result sent on `progress` as soon as it is known (the rest returned at the end). [`Deliverer`]
/// is the courier of the daemon; the scheduler's unit tests use a scripted one.
pub trait Courier: Send + Sync {
    fn deliver_batch<'a>(
        &'a self,
        domain: &'a str,
        jobs: Vec<Job>,
        progress: mpsc::UnboundedSender<(String, JobResult)>,
    ) -> Pin<Box<dyn Future<Output = Vec<JobResult>> + Send + 'a>>;

    /// Closes connections kept open between batches (at shutdown).
    fn close_idle(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

impl Courier for Deliverer {
    fn deliver_batch<'a>(
        &'a self,
        domain: &'a str,
        jobs: Vec<Job>,
        progress: mpsc::UnboundedSender<(String, JobResult)>,
    ) -> Pin<Box<dyn Future<Output = Vec<JobResult>> + Send + 'a>> {
        Box::pin(self.deliver_with_progress(domain, jobs, progress))
    }

    fn close_idle(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(Deliverer::close_idle(self))
    }
}

/// Delivery to next hops; one per daemon, shared by all queue runs.
pub struct Deliverer {
    config: Arc<Config>,
    router: Router,
    settings: Arc<ClientSettings>,
    /// One semaphore per destination domain, so that concurrent queue runs together stay within
    /// `delivery.max_connections_per_destination`.
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Connections left open by finished batches, for the next ones.
    cache: Arc<ConnectionCache>,
    /// MTA-STS policies (RFC 8461) by domain, cached in the spool directory.
    sts: mta_sts::StsPolicies,
    /// Fetches the policies over verified HTTPS.
    fetcher: https::Fetcher,
}

impl Deliverer {
    /// Builds the resolver and the TLS configurations; fails on an unreadable CA file or DNS setup.
    pub fn new(config: Arc<Config>) -> Result<Deliverer, String> {
        let router = Router::new(&config)?;
        let settings = Arc::new(ClientSettings::new(config.hostname.clone(), &config.delivery)?);
        let fetcher = https::Fetcher::new(&settings, &config.delivery);
        let sts = mta_sts::StsPolicies::open(Some(&config.queue.dir));
        Ok(Deliverer {
            config,
            router,
            settings,
            limits: Mutex::new(HashMap::new()),
            cache: Arc::default(),
            sts,
            fetcher,
        })
    }

    /// The addresses delivery to `domain` would try, best first (static route or MX list after the
    /// backup-MX rule). `RouteError::outcome` says what recipients get when there are none.
    pub async fn next_hops(&self, domain: &str) -> Result<Vec<NextHop>, RouteError> {
        self.router.next_hops(domain).await
    }

    /// Delivers `jobs` (all with pending recipients in `domain`, oldest first) to the domain's next
    /// hops and reports per-recipient outcomes for that domain's recipients.
    pub async fn deliver(&self, domain: &str, jobs: Vec<Job>) -> Vec<JobResult> {
        self.run(domain, jobs, None).await
    }

    /// Like [`Deliverer::deliver`], but sends each message's result on `progress` (with the
    /// domain) as soon as the next hop has answered for it, so the caller can make it durable
    /// before the rest of the batch is done: a crash then repeats only deliveries in flight.
    /// Returns the results not sent on `progress` (messages no connection took).
    pub async fn deliver_with_progress(
        &self,
        domain: &str,
        jobs: Vec<Job>,
        progress: mpsc::UnboundedSender<(String, JobResult)>,
    ) -> Vec<JobResult> {
        self.run(domain, jobs, Some(progress)).await
    }

    /// Closes the connections kept open between batches, with QUIT (at shutdown).
    pub async fn close_idle(&self) {
        self.cache.close_all().await;
    }

    /// How many idle connections are kept open for the next batches.
    pub fn idle_connections(&self) -> usize {
        self.cache.len()
    }

    async fn run(
        &self,
        domain: &str,
        jobs: Vec<Job>,
        progress: Option<mpsc::UnboundedSender<(String, JobResult)>>,
    ) -> Vec<JobResult> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let hops = match self.router.next_hops(&domain).await {
            Ok(hops) => hops,
            Err(e) => {
                tracing::info!(domain = %domain, error = %e, "no next hop");
                let outcome = e.outcome();
                return jobs.iter().map(|job| uniform_result(job, &domain, &outcome)).collect();
            }
        };
        let policy = self.config.domain_policy(&domain);
        let mut tls = if policy.require_tls { TlsMode::Required } else { TlsMode::Opportunistic };
        let (hops, sts_testing) = match self.apply_mta_sts(&domain, hops).await {
            Ok(StsOutcome { hops, enforce, testing }) => {
                if enforce {
                    tls = TlsMode::Required;
                }
                (hops, testing)
            }
            Err(outcome) => return jobs.iter().map(|job| uniform_result(job, &domain, &outcome)).collect(),
        };
        let dane = match self.dane_plan(&domain, &hops).await {
            Ok(plan) => plan.map(Arc::new),
            Err(outcome) => return jobs.iter().map(|job| uniform_result(job, &domain, &outcome)).collect(),
        };
        // RFC 8689 4.2.1: messages sent with REQUIRETLS go on sessions of their own, verified and
        // to next hops that offer REQUIRETLS; the others keep the domain's policy.
        let order: Vec<QueueId> = jobs.iter().map(|job| job.envelope.id.clone()).collect();
        let (strict, normal): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|job| job.envelope.requiretls);
        let plain_group = self.run_group(&domain, &hops, (tls, sts_testing, dane.clone()), normal, progress.clone());
        let strict_group = self.run_group(&domain, &hops, (TlsMode::RequireTls, false, dane), strict, progress);
        // `strict_order` means one connection at a time: the REQUIRETLS messages go after the
        // others of the batch, on their own connection.
        let (mut results, strict_results) = if policy.strict_order {
            let results = plain_group.await;
            (results, strict_group.await)
        } else {
            tokio::join!(plain_group, strict_group)
        };
        results.extend(strict_results);
        results.sort_by_key(|result| order.iter().position(|id| *id == result.id));
        results
    }

    /// MTA-STS (RFC 8461 5): with a policy in `enforce` mode only the MX hosts it lists are
    /// tried, over verified TLS (section 4.2); none listed defers every recipient. In `testing`
    /// mode the hosts it does not list and certificates that would fail are logged, and delivery
    /// goes on as usual. Static routes are the operator's choice and not checked.
    async fn apply_mta_sts(&self, domain: &str, hops: Vec<NextHop>) -> Result<StsOutcome, RcptOutcome> {
        let from_mx = hops.first().is_some_and(|hop| hop.preference.is_some());
        let unchanged = |hops| Ok(StsOutcome { hops, enforce: false, testing: false });
        if !from_mx || !self.config.mta_sts(domain) {
            return unchanged(hops);
        }
        let Some(policy) = self.sts.policy(domain, &self.router, &self.fetcher).await else {
            return unchanged(hops);
        };
        let (listed, unlisted): (Vec<NextHop>, Vec<NextHop>) = hops.into_iter().partition(|h| policy.matches(&h.host));
        match policy.mode {
            mta_sts::Mode::Enforce if listed.is_empty() => {
                let names: Vec<&str> = unlisted.iter().map(|h| h.host.as_str()).collect();
                tracing::warn!(domain, mx = ?names, policy = ?policy.mx, "MTA-STS: no MX host matches the policy; not delivered");
                Err(RcptOutcome::TempFail(Detail {
                    status: "4.7.5".into(),
                    text: format!(
                        "MTA-STS policy of {domain} (enforce) lists none of its MX hosts {}: mx {}",
                        names.join(", "),
                        policy.mx.join(", ")
                    ),
                    session: true,
                    ..Detail::default()
                }))
            }
            mta_sts::Mode::Enforce => {
                for hop in unlisted {
                    tracing::info!(domain, mx = %hop.host, "MTA-STS: skipping an MX host the policy does not list");
                }
                Ok(StsOutcome { hops: listed, enforce: true, testing: false })
            }
            mta_sts::Mode::Testing => {
                for hop in &unlisted {
                    tracing::warn!(domain, mx = %hop.host, "MTA-STS testing: the policy does not list this MX host (delivered anyway)");
                }
                Ok(StsOutcome { hops: listed.into_iter().chain(unlisted).collect(), enforce: false, testing: true })
            }
            mta_sts::Mode::None => unchanged(listed.into_iter().chain(unlisted).collect()),
        }
    }

    /// DANE (RFC 7672) for a domain found through MX records with `dane` on: None when it does
    /// not apply (off, a static route, an insecure MX RRset, section 2.2.1); otherwise each MX
    /// host's DNSSEC-validated TLSA records. A bogus MX RRset defers the whole domain (section 2.1).
    async fn dane_plan(&self, domain: &str, hops: &[NextHop]) -> Result<Option<dane::DanePlan>, RcptOutcome> {
        let from_mx = hops.first().is_some_and(|hop| hop.preference.is_some());
        if !from_mx || !self.config.dane(domain) {
            return Ok(None);
        }
        match self.router.secure_mx(domain).await {
            Some(dane::Secured::Secure(())) => {}
            Some(dane::Secured::Bogus(reason)) => {
                tracing::warn!(domain, error = %reason, "DANE: the MX records did not validate; not delivered");
                return Err(RcptOutcome::TempFail(Detail {
                    status: "4.7.5".into(),
                    text: format!("DANE: MX records of {domain} are not DNSSEC-valid: {reason}"),
                    session: true,
                    ..Detail::default()
                }));
            }
            Some(dane::Secured::Insecure) | None => {
                tracing::debug!(domain, "DANE: the MX records are not DNSSEC-signed; usual TLS policy");
                return Ok(None);
            }
        }
        let mut plan = dane::DanePlan { domain: domain.to_string(), hosts: HashMap::new() };
        for hop in hops {
            if plan.hosts.contains_key(&hop.host) {
                continue;
            }
            // RFC 6698 3: the TLSA base name is the port and the host (`_25._tcp.mx.example`).
            let name = format!("_{}._tcp.{}", hop.addr.port(), hop.host);
            let host = match self.router.secure_tlsa(&name).await {
                Some(dane::Secured::Secure(records)) => {
                    let usable = dane::usable(records);
                    if usable.is_empty() {
                        continue;
                    }
                    dane::HostDane::Records(Arc::new(usable))
                }
                Some(dane::Secured::Bogus(reason)) => {
                    dane::HostDane::Unusable(format!("TLSA lookup of {name}: {reason}"))
                }
                Some(dane::Secured::Insecure) | None => continue,
            };
            plan.hosts.insert(hop.host.clone(), host);
        }
        Ok(Some(plan))
    }

    /// Delivers `jobs` over sessions of one TLS mode (whether MTA-STS testing mode reports on
    /// them, and the domain's DANE plan), spread over the destination's connections.
    async fn run_group(
        &self,
        domain: &str,
        hops: &[NextHop],
        (tls, sts_testing, dane): (TlsMode, bool, Option<Arc<dane::DanePlan>>),
        jobs: Vec<Job>,
        progress: Option<mpsc::UnboundedSender<(String, JobResult)>>,
    ) -> Vec<JobResult> {
        if jobs.is_empty() {
            return Vec::new();
        }
        let policy = self.config.domain_policy(domain);
        let connections = if policy.strict_order { 1 } else { self.config.delivery.max_connections_per_destination };
        let run = Arc::new(Run {
            cache: Arc::clone(&self.cache),
            key: CacheKey { domain: domain.to_string(), tls, dane: dane.is_some() },
            max_idle: connections,
            targets: jobs.iter().map(|job| targets(job, domain)).collect(),
            jobs,
            hops: hops.to_vec(),
            queue: Mutex::new(VecDeque::new()),
            results: Mutex::new(HashMap::new()),
            reported: Mutex::new(std::collections::HashSet::new()),
            tls,
            sts_testing,
            dane,
            settings: self.settings.clone(),
            last_error: Mutex::new(None),
            progress: progress.map(|sender| (domain.to_string(), sender)),
        });
        run.fill_queue();
        let workers = connections.min(run.queue_len()).max(1);
        let limit = self.limit_for(domain);
        let mut set = JoinSet::new();
        for _ in 0..workers {
            let (run, limit) = (run.clone(), limit.clone());
            set.spawn(async move {
                // A closed semaphore cannot happen (we never close it); without a permit, no worker.
                if let Ok(permit) = limit.acquire_owned().await {
                    worker(run, permit).await;
                }
            });
        }
        while set.join_next().await.is_some() {}
        run.collect()
    }

    fn limit_for(&self, domain: &str) -> Arc<Semaphore> {
        let mut limits = lock(&self.limits);
        let permits = self.config.delivery.max_connections_per_destination;
        limits.entry(domain.to_string()).or_insert_with(|| Arc::new(Semaphore::new(permits))).clone()
    }
}

/// What an MTA-STS policy leaves of a domain's next hops.
struct StsOutcome {
    hops: Vec<NextHop>,
    /// Enforce mode: verified TLS to every hop.
    enforce: bool,
    /// Testing mode: report what enforcing would refuse.
    testing: bool,
}

/// The shared state of one `deliver` call: the work queue and the results.
struct Run {
    jobs: Vec<Job>,
    /// Per job, the indices of its pending recipients in this domain.
    targets: Vec<Vec<usize>>,
    hops: Vec<NextHop>,
    /// Job indices still to send, in arrival order.
    queue: Mutex<VecDeque<usize>>,
    results: Mutex<HashMap<usize, Vec<RcptOutcome>>>,
    /// Jobs whose result went out on `progress`.
    reported: Mutex<std::collections::HashSet<usize>>,
    tls: TlsMode,
    /// The domain's MTA-STS policy is in testing mode: log sessions it would have refused.
    sts_testing: bool,
    /// DANE applies to this domain (RFC 7672): the MX hosts' validated TLSA records.
    dane: Option<Arc<dane::DanePlan>>,
    settings: Arc<ClientSettings>,
    /// Why the last connection attempt failed, for jobs no connection could take.
    last_error: Mutex<Option<Detail>>,
    /// Where each message's result goes as soon as it is known (see `deliver_with_progress`).
    progress: Option<(String, mpsc::UnboundedSender<(String, JobResult)>)>,
    /// Where connections come from and go back to between batches.
    cache: Arc<ConnectionCache>,
    key: CacheKey,
    /// Most idle connections kept for this destination: its connection limit.
    max_idle: usize,
}

impl Run {
    fn fill_queue(&self) {
        let mut queue = lock(&self.queue);
        queue.extend((0..self.jobs.len()).filter(|&i| !self.targets[i].is_empty()));
    }

    fn queue_len(&self) -> usize {
        lock(&self.queue).len()
    }

    fn next_job(&self) -> Option<usize> {
        lock(&self.queue).pop_front()
    }

    fn give_back(&self, index: usize) {
        lock(&self.queue).push_front(index);
    }

    fn record(&self, index: usize, outcomes: Vec<RcptOutcome>) {
        let Some((domain, sender)) = &self.progress else {
            lock(&self.results).insert(index, outcomes);
            return;
        };
        match sender.send((domain.clone(), self.result(index, outcomes))) {
            // Reported already: `collect` leaves it out.
            Ok(()) => {
                lock(&self.reported).insert(index);
            }
            // Nobody listens any more: `collect` returns it with the rest.
            Err(unsent) => {
                let outcomes = (unsent.0).1.outcomes.into_iter().map(|(_, outcome)| outcome).collect();
                lock(&self.results).insert(index, outcomes);
            }
        }
    }

    fn result(&self, index: usize, outcomes: Vec<RcptOutcome>) -> JobResult {
        let job = &self.jobs[index];
        let addresses = self.targets[index].iter().map(|&r| job.envelope.recipients[r].address.clone());
        JobResult { id: job.envelope.id.clone(), outcomes: addresses.zip(outcomes).collect() }
    }

    fn recipients(&self, index: usize) -> Vec<&Recipient> {
        self.targets[index].iter().map(|&r| &self.jobs[index].envelope.recipients[r]).collect()
    }

    /// One JobResult per job in input order; jobs no connection took are deferred with the last
    /// connection error.
    fn collect(&self) -> Vec<JobResult> {
        let mut results = std::mem::take(&mut *lock(&self.results));
        let fallback = lock(&self.last_error).clone().unwrap_or_else(|| Detail {
            status: "4.4.1".into(),
            text: "no connection to any next hop".into(),
            session: true,
            ..Detail::default()
        });
        let reported = std::mem::take(&mut *lock(&self.reported));
        (0..self.jobs.len())
            .filter(|index| !reported.contains(index))
            .map(|index| {
                let outcomes = results
                    .remove(&index)
                    .unwrap_or_else(|| vec![RcptOutcome::TempFail(fallback.clone()); self.targets[index].len()]);
                self.result(index, outcomes)
            })
            .collect()
    }
}

/// One connection's worth of work: take the next message, take a cached connection or connect
/// when needed, send; at the end, leave the connection in the cache for the next batch.
async fn worker(run: Arc<Run>, _permit: OwnedSemaphorePermit) {
    let mut session: Option<Session> = None;
    while let Some(index) = run.next_job() {
        let picked = std::time::Instant::now();
        let picked_at = crate::spool::now_micros();
        if session.is_none() {
            session = run.cache.take(&run.key, &run.hops);
        }
        if session.is_none() {
            match open_any(&run).await {
                Ok(opened) => session = Some(opened),
                Err(detail) => {
                    // Another connection may still take it; if none can, `collect` defers it.
                    run.give_back(index);
                    *lock(&run.last_error) = Some(detail);
                    return;
                }
            }
        }
        let Some(open) = session.as_mut() else { continue };
        let job = &run.jobs[index];
        let connected = picked.elapsed();
        let transaction = open.send(&job.envelope, &run.recipients(index), &job.queue).await;
        if transaction.stale {
            // The server closed the connection while it was idle: nothing was sent, so the message
            // goes again on another connection instead of being deferred.
            tracing::debug!(queue_id = %job.envelope.id, mx = %open.host(), "reused connection was closed; reconnecting");
            session = None;
            run.give_back(index);
            continue;
        }
        let delays = Delays {
            queued: picked_at.saturating_sub(job.envelope.arrived).max(0) as f64 / 1e6,
            connect: connected.as_secs_f64(),
            transmit: picked.elapsed().saturating_sub(connected).as_secs_f64(),
        };
        log_transaction(job, open, &run.recipients(index), &transaction.outcomes, &delays);
        // With strict_order a message the primary defers does not hold back the next ones (the
        // issue's promise, documented in README): only a lost connection stops the batch.
        run.record(index, transaction.outcomes);
        if !transaction.reusable {
            session = None;
        }
    }
    if let Some(open) = session {
        run.cache.put(run.key.clone(), open, run.max_idle);
    }
}

/// Tries the next hops in order until one greets us; a host failing at connect, greeting or TLS
/// sends us to the next (RFC 5321 5.1).
async fn open_any(run: &Run) -> Result<Session, Detail> {
    let mut last = None;
    for hop in &run.hops {
        let dane = run.dane.as_deref();
        if let Some(reason) = dane.and_then(|plan| plan.unusable(&hop.host)) {
            // RFC 7672 2.1: a bogus or failed TLSA lookup makes the host unusable.
            tracing::info!(mx = %hop.host, addr = %hop.addr, error = %reason, "DANE: next hop skipped");
            last = Some(Detail {
                status: "4.7.5".into(),
                text: format!("DANE: {}: {reason}", hop.host),
                remote_mta: Some(hop.host.clone()),
                session: true,
                ..Detail::default()
            });
            continue;
        }
        let verifier = dane.and_then(|plan| plan.verifier(&hop.host, &run.settings.provider));
        match Session::open_with(hop, &run.settings, run.tls, verifier).await {
            Ok(session) => {
                if run.sts_testing && !session.verified {
                    // RFC 8461 5: in testing mode a failure is reported, and delivery goes on.
                    tracing::warn!(mx = %hop.host, addr = %hop.addr, tls = session.tls,
                        "MTA-STS testing: no verified TLS to this MX host (delivered anyway)");
                }
                return Ok(session);
            }
            Err(ClientError::Tls { required: false, .. }) => {
                // A failed opportunistic handshake: Postfix-style, try the same host in plain text.
                match Session::open(hop, &run.settings, TlsMode::Disabled).await {
                    Ok(session) => return Ok(session),
                    Err(e) => last = Some(Detail { session: true, ..e.temp_detail(Some(&hop.host)) }),
                }
            }
            Err(e) => {
                tracing::info!(mx = %hop.host, addr = %hop.addr, error = %e, "next hop failed");
                // Whatever ends a session before its first transaction (a refused connection,
                // a 554 greeting, a failed EHLO or handshake) is the destination's failure.
                last = Some(Detail { session: true, ..e.temp_detail(Some(&hop.host)) });
            }
        }
    }
    Err(last.unwrap_or_else(|| Detail {
        status: "4.4.4".into(),
        text: "no next hop".into(),
        session: true,
        ..Detail::default()
    }))
}

/// Where one attempt's time went, in seconds (Postfix's `delays=b/c/d`; there is no `a`, time
/// before the queue, since a message's arrival is the moment it was queued).
struct Delays {
    /// From arrival until a connection was sought for this attempt.
    queued: f64,
    /// Connection setup: connect, greeting, EHLO, STARTTLS (0 on a reused connection).
    connect: f64,
    /// The transaction: MAIL, RCPT, DATA or BDAT and the final reply.
    transmit: f64,
}

/// One line per recipient and attempt, for administrators to grep and ship (README, "Logs").
fn log_transaction(job: &Job, session: &Session, rcpts: &[&Recipient], outcomes: &[RcptOutcome], delays: &Delays) {
    let relay = format!("{}[{}]", session.host(), session.addr());
    // Rounded to 10 ms, as the split is: the log is for people and parsers, not for benchmarks.
    let total = ((delays.queued + delays.connect + delays.transmit) * 100.0).round() / 100.0;
    let split = format!("{:.2}/{:.2}/{:.2}", delays.queued, delays.connect, delays.transmit);
    for (rcpt, outcome) in rcpts.iter().zip(outcomes) {
        let (result, detail) = match outcome {
            RcptOutcome::Delivered(d) => ("delivered", d),
            RcptOutcome::TempFail(d) => ("deferred", d),
            RcptOutcome::PermFail(d) => ("failed", d),
            RcptOutcome::Loop(d) => ("loop", d),
        };
        let reply = detail.diagnostic.as_deref().unwrap_or(&detail.text);
        tracing::info!(queue_id = %job.envelope.id, from = %job.envelope.sender, to = %rcpt.address, relay = %relay,
            delay = total, delays = %split, size = job.envelope.size, tls = session.tls_label(),
            attempt = job.envelope.attempts + 1, dsn = %detail.status, reply = %reply, "{result}");
    }
}

/// The indices of a job's pending recipients in `domain`.
fn targets(job: &Job, domain: &str) -> Vec<usize> {
    job.envelope
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status == crate::spool::RecipientStatus::Pending && domain_of(&r.address) == domain)
        .map(|(i, _)| i)
        .collect()
}

fn uniform_result(job: &Job, domain: &str, outcome: &RcptOutcome) -> JobResult {
    let outcomes = targets(job, domain)
        .into_iter()
        .map(|i| (job.envelope.recipients[i].address.clone(), outcome.clone()))
        .collect();
    JobResult { id: job.envelope.id.clone(), outcomes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_outside_a_runtime() {
        let mut config = Config::demo();
        config.dns.nameservers = vec!["127.0.0.1:5353".parse().expect("literal")];
        assert!(Deliverer::new(Arc::new(config)).is_ok());
    }

    #[test]
    fn missing_ca_file_is_reported() {
        let mut config = Config::demo();
        config.dns.nameservers = vec!["127.0.0.1:5353".parse().expect("literal")];
        config.delivery.tls_ca_file = Some(std::path::PathBuf::from("/nonexistent/ca.pem"));
        let err = Deliverer::new(Arc::new(config)).err().expect("an error");
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn loop_outcome_wording() {
        let e = RouteError::Loop { domain: "example.test".into(), hostname: "backup.example.test".into() };
        match e.outcome() {
            RcptOutcome::Loop(d) => assert_eq!(d.text, "MX list for example.test points back to backup.example.test"),
            other => panic!("{other:?}"),
        }
    }
}

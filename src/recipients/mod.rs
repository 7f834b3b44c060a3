//! Recipient knowledge: which addresses of a relayed domain are real, so that a backup MX can refuse
//! the others at RCPT time instead of accepting them and bouncing later (backscatter).
//!
//! Four sources, in any mix per `[domain."..."]`:
//! - a static list ([`list`]), reloaded when its file changes;
//! - the site's directory over LDAP ([`ldap`], `recipients_ldap`), asked at every RCPT the list
//!   does not settle; its answers are cached durably like callouts', and the cache answers while
//!   the directory cannot;
//! - callouts to the primary (`MAIL FROM:<>`, `RCPT TO`, `RSET`), answers cached durably
//!   ([`cache`]; positive 30 days, negative 1 hour by default) and bounded per minute;
//! - addresses learned from deliveries (the primary's 250 is proof).
//!
//! An address known to be invalid gets 550 5.1.1. One nobody can vouch for (the directory and the
//! primary are down, the callout budget is spent) gets the domain's `unknown_recipient` policy:
//! never a 550.

pub mod cache;
pub mod ldap;
pub mod list;

use crate::config::{Config, UnknownPolicy};
use crate::deliver::{ClientSettings, Router, Session, TlsMode};
use crate::lock;
use crate::spool::{domain_of, now_micros};
pub use cache::CacheAt;
use cache::{CacheFile, Entry, Source};
use ldap::Directory;
use list::StaticList;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the daemon looks at the cache file and the lists for changes made by others.
const REFRESH: Duration = Duration::from_secs(1);

/// Errors of the recipient cache.
#[derive(Debug, thiserror::Error)]
pub enum RecipientsError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a recipient cache: {problem}", path.display())]
    Corrupt { path: PathBuf, problem: String },
    #[error("{0:?} is not an address (write local@domain)")]
    BadAddress(String),
    #[error("setup: {0}")]
    Setup(String),
}

/// What RCPT gets for one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Known, or the domain does not check recipients: 250.
    Accept,
    /// Unknown under the `hold` policy: 250, and the message is held for review.
    Hold,
    /// Known to be invalid: 550 5.1.1.
    Reject,
    /// Unknown under the `tempfail` policy: 451 4.4.3.
    TempFail,
    /// Not settled yet: ask the directory or the primary ([`Recipients::callout`]).
    Callout,
}

/// The in-memory view, refreshed from disk when files change.
struct State {
    cache: CacheFile,
    /// The cache file's modification time and length when read.
    stamp: Option<(i64, u64)>,
    checked: Option<Instant>,
    lists: HashMap<String, StaticList>,
}

/// Recipient knowledge for the daemon; shared by all sessions and the scheduler.
pub struct Recipients {
    config: Arc<Config>,
    /// Where the cache is kept (the spool directory, or the shared store).
    at: CacheAt,
    state: Mutex<State>,
    /// Start times of the callouts of the last minute, for `smtp.callouts_per_minute`.
    callouts: Mutex<VecDeque<Instant>>,
    router: Router,
    settings: ClientSettings,
    /// The `recipients_ldap` directories, by domain.
    directories: HashMap<String, Directory>,
}

impl Recipients {
    /// Knowledge for the cache `at` (see [`CacheAt::of`]), which is read now.
    pub fn open(config: Arc<Config>, at: impl Into<CacheAt>) -> Result<Recipients, RecipientsError> {
        let at = at.into();
        let cache = cache::load(&at)?;
        let lists = config
            .domain
            .iter()
            .filter_map(|(domain, policy)| {
                policy.recipients_file.as_ref().map(|p| (domain.clone(), StaticList::new(p)))
            })
            .collect();
        let router = Router::new(&config).map_err(RecipientsError::Setup)?;
        let mut delivery = config.delivery.clone();
        delivery.connect_timeout = config.smtp.callout_timeout;
        delivery.greeting_timeout = config.smtp.callout_timeout;
        delivery.command_timeout = config.smtp.callout_timeout;
        let settings = ClientSettings::new(config.hostname.clone(), &delivery).map_err(RecipientsError::Setup)?;
        let directories = open_directories(&config)?;
        let state = State { cache, stamp: None, checked: None, lists };
        Ok(Recipients {
            config,
            at,
            state: Mutex::new(state),
            callouts: Mutex::new(VecDeque::new()),
            router,
            settings,
            directories,
        })
    }

    /// What is known without asking anyone: the lists and the cache.
    pub fn lookup(&self, address: &str) -> Decision {
        let domain = domain_of(address);
        let policy = self.config.domain_policy(&domain);
        if !policy.verifies_recipients() {
            return Decision::Accept;
        }
        let key = address.to_ascii_lowercase();
        let mut state = lock(&self.state);
        self.refresh(&mut state);
        if state.lists.get_mut(&domain).is_some_and(|list| list.contains(&key)) {
            return Decision::Accept;
        }
        let cached = state.cache.entries.get(&key).filter(|e| e.fresh(now_micros()));
        // The directory is the site's own truth and cheap to ask, so it is asked every time: a
        // user removed there is refused at once, not when a cached yes expires. The cache answers
        // only while it cannot be reached. The operator's own entries still come first.
        if policy.recipients_ldap.is_some() && cached.is_none_or(|entry| entry.source != Source::Operator) {
            return Decision::Callout;
        }
        match cached {
            Some(entry) if entry.valid => Decision::Accept,
            Some(_) => Decision::Reject,
            None if policy.callout => Decision::Callout,
            None => unknown(policy.unknown_recipient),
        }
    }

    /// Asks the domain's directory about `address`, or the primary (a callout), caches the answer,
    /// and decides. A directory that cannot answer leaves it to the cache, then to a callout if
    /// the domain has them. Beyond the callout budget, or when the primary cannot answer, the
    /// domain's policy decides.
    pub async fn callout(&self, address: &str) -> Decision {
        let domain = domain_of(address);
        if let Some(directory) = self.directories.get(&domain) {
            if let Some(decision) = self.ask_directory(directory, address).await {
                return decision;
            }
            if !self.config.domain_policy(&domain).callout {
                return unknown(self.config.domain_policy(&domain).unknown_recipient);
            }
        }
        self.ask_primary(&domain, address).await
    }

    /// The directory's answer, or failing that the cache's; None when neither knows.
    async fn ask_directory(&self, directory: &Directory, address: &str) -> Option<Decision> {
        let valid = match directory.exists(address).await {
            Ok(valid) => valid,
            Err(err) => {
                let cached = self.cached(address);
                let answer = match cached {
                    Some(true) => "cached valid: 250",
                    Some(false) => "cached invalid: 550",
                    None => "not cached: unknown_recipient policy",
                };
                tracing::warn!(rcpt = %address, url = directory.url(), error = %err, answer, "directory lookup failed");
                return cached.map(|valid| if valid { Decision::Accept } else { Decision::Reject });
            }
        };
        let smtp = &self.config.smtp;
        let ttl = if valid { smtp.callout_positive_ttl.0 } else { smtp.callout_negative_ttl.0 };
        if self.cached_lately(address, valid, ttl) {
            tracing::debug!(rcpt = %address, valid, "directory lookup");
        } else {
            self.remember(&[address.to_string()], valid, Source::Directory, Some(ttl));
            tracing::info!(rcpt = %address, valid, url = directory.url(), "directory lookup");
        }
        Some(if valid { Decision::Accept } else { Decision::Reject })
    }

    /// What a fresh cache entry says about `address`, if there is one.
    fn cached(&self, address: &str) -> Option<bool> {
        let state = lock(&self.state);
        state.cache.entries.get(&address.to_ascii_lowercase()).filter(|e| e.fresh(now_micros())).map(|e| e.valid)
    }

    /// Does the cache hold this directory answer from less than a quarter of its lifetime ago?
    /// Then it need not be written again: the directory is asked at every RCPT, and an fsync per
    /// RCPT would only move the expiry a little.
    fn cached_lately(&self, address: &str, valid: bool, ttl: Duration) -> bool {
        let quarter = i64::try_from(ttl.as_micros() / 4).unwrap_or(i64::MAX);
        let state = lock(&self.state);
        state.cache.entries.get(&address.to_ascii_lowercase()).is_some_and(|e| {
            e.valid == valid && e.source == Source::Directory && now_micros().saturating_sub(e.at) < quarter
        })
    }

    /// A callout: asks the primary about `address`, caches the answer, and decides.
    async fn ask_primary(&self, domain: &str, address: &str) -> Decision {
        let policy = self.config.domain_policy(domain).unknown_recipient;
        if !self.take_callout_budget() {
            tracing::warn!(rcpt = %address, "callout limit reached (smtp.callouts_per_minute)");
            return unknown(policy);
        }
        let answer = tokio::time::timeout(self.config.smtp.callout_timeout.0, self.ask(domain, address)).await;
        let valid = match answer {
            Ok(Ok(valid)) => valid,
            Ok(Err(why)) => {
                tracing::info!(rcpt = %address, reason = %why, "callout inconclusive");
                return unknown(policy);
            }
            Err(_) => {
                tracing::info!(rcpt = %address, "callout timed out");
                return unknown(policy);
            }
        };
        let smtp = &self.config.smtp;
        let ttl = if valid { smtp.callout_positive_ttl.0 } else { smtp.callout_negative_ttl.0 };
        self.remember(&[address.to_string()], valid, Source::Callout, Some(ttl));
        tracing::info!(rcpt = %address, valid, "callout");
        if valid { Decision::Accept } else { Decision::Reject }
    }

    /// Addresses the primary accepted in a delivery: remembered as valid.
    pub fn learn(&self, addresses: &[String]) {
        let addresses: Vec<String> = addresses
            .iter()
            .filter(|a| self.config.domain_policy(&domain_of(a)).verifies_recipients())
            .filter(|a| !self.known_valid(a))
            .cloned()
            .collect();
        if !addresses.is_empty() {
            self.remember(&addresses, true, Source::Delivery, Some(self.config.smtp.callout_positive_ttl.0));
        }
    }

    fn known_valid(&self, address: &str) -> bool {
        let state = lock(&self.state);
        state.cache.entries.get(&address.to_ascii_lowercase()).is_some_and(|e| e.valid && e.fresh(now_micros()))
    }

    fn remember(&self, addresses: &[String], valid: bool, source: Source, ttl: Option<Duration>) {
        let result = add(&self.at, addresses, valid, source, ttl);
        match result {
            Ok(cache) => {
                let mut state = lock(&self.state);
                state.cache = cache;
                state.stamp = self.at.stamp();
            }
            Err(err) => tracing::error!(error = %err, "cannot save the recipient cache"),
        }
    }

    /// The primary's answer: Ok(true) for 2xx, Ok(false) for a 5xx that says "no such user",
    /// Err for anything that does not decide (4xx, other 5xx, no connection).
    async fn ask(&self, domain: &str, address: &str) -> Result<bool, String> {
        let hops = self.router.next_hops(domain).await.map_err(|e| e.to_string())?;
        let mut last = "no next hop".to_string();
        for hop in &hops {
            let mut session = match Session::open(hop, &self.settings, TlsMode::Opportunistic).await {
                Ok(session) => session,
                Err(err) => {
                    last = err.to_string();
                    continue;
                }
            };
            let reply = session.callout(address).await.map_err(|e| e.to_string())?;
            return match reply.code {
                200..=299 => Ok(true),
                // RFC 5321 4.2.2/4.2.3: 550 mailbox unavailable, 551 not local, 553 name not allowed;
                // RFC 3463 X.1.1/X.1.2/X.1.3 say the same in enhanced codes.
                550 | 551 | 553 => Ok(false),
                _ => Err(format!("RCPT got {reply}")),
            };
        }
        Err(last)
    }

    /// Takes one callout from this minute's budget, if any is left.
    fn take_callout_budget(&self) -> bool {
        let mut recent = lock(&self.callouts);
        let now = Instant::now();
        while recent.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60)) {
            recent.pop_front();
        }
        if recent.len() >= self.config.smtp.callouts_per_minute as usize {
            return false;
        }
        recent.push_back(now);
        true
    }

    /// Re-reads the cache and the lists when they changed on disk (at most once per [`REFRESH`]).
    fn refresh(&self, state: &mut State) {
        if state.checked.is_some_and(|at| at.elapsed() < REFRESH) {
            return;
        }
        state.checked = Some(Instant::now());
        for list in state.lists.values_mut() {
            list.refresh();
        }
        let now = self.at.stamp();
        if now != state.stamp {
            match cache::load(&self.at) {
                Ok(cache) => {
                    state.cache = cache;
                    state.stamp = now;
                }
                Err(err) => tracing::error!(error = %err, "cannot read the recipient cache"),
            }
        }
    }
}

/// A [`Directory`] for every domain with `recipients_ldap`; errors name the key.
fn open_directories(config: &Config) -> Result<HashMap<String, Directory>, RecipientsError> {
    let mut directories = HashMap::new();
    for (domain, policy) in &config.domain {
        if let Some(source) = &policy.recipients_ldap {
            let directory = Directory::new(source)
                .map_err(|e| RecipientsError::Setup(format!("domain.{domain}.recipients_ldap: {e}")))?;
            directories.insert(domain.clone(), directory);
        }
    }
    Ok(directories)
}

fn unknown(policy: UnknownPolicy) -> Decision {
    match policy {
        UnknownPolicy::Tempfail => Decision::TempFail,
        UnknownPolicy::Accept => Decision::Accept,
        UnknownPolicy::Hold => Decision::Hold,
    }
}

/// Adds or replaces entries in the cache `at`; returns the cache as written.
pub fn add(
    at: &CacheAt,
    addresses: &[String],
    valid: bool,
    source: Source,
    ttl: Option<Duration>,
) -> Result<CacheFile, RecipientsError> {
    for address in addresses {
        if !address.contains('@') || address.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(RecipientsError::BadAddress(address.clone()));
        }
    }
    let now = now_micros();
    let expires = ttl.map(|ttl| now.saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX / 2)));
    cache::modify(at, |cache| {
        for address in addresses {
            cache.entries.insert(address.to_ascii_lowercase(), Entry { valid, source, at: now, expires });
        }
        cache.clone()
    })
}

/// Removes an entry; true when there was one.
pub fn forget(at: &CacheAt, address: &str) -> Result<bool, RecipientsError> {
    cache::modify(at, |cache| cache.entries.remove(&address.to_ascii_lowercase()).is_some())
}

/// Every entry still fresh, by address.
pub fn list(at: &CacheAt) -> Result<Vec<(String, Entry)>, RecipientsError> {
    let now = now_micros();
    Ok(cache::load(at)?.entries.into_iter().filter(|(_, e)| e.fresh(now)).collect())
}

#[cfg(test)]
mod tests;

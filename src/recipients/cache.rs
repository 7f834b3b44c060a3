//! The durable recipient cache: `recipients.json` in the spool directory, holding callout and
//! directory answers, addresses learned from deliveries and the operator's entries.
//!
//! The daemon and `bartleby recipients` both change it, so every change is read-modify-write under
//! an exclusive `flock` on `recipients.lock`, and the file is replaced atomically (tmp, fsync, rename,
//! fsync of the directory): a crash leaves the old or the new cache, never half of one.
//!
//! With the shared PostgreSQL store the cache is one document there instead (`bartleby_documents`,
//! replaced with a compare-and-set on its version), so that every node knows what any node learnt.

use super::RecipientsError;
use crate::config::{Config, StoreKind};
use crate::spool::now_micros;
use crate::spool::postgres::{PgQueue, Role};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The cache file's name inside the spool directory.
pub const CACHE_FILE: &str = "recipients.json";
const LOCK_FILE: &str = "recipients.lock";

/// Where an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The primary answered a callout.
    Callout,
    /// The primary accepted a delivery for the address (a 250 is proof).
    Delivery,
    /// `bartleby recipients add`.
    Operator,
    /// The site's directory answered (`recipients_ldap`).
    Directory,
}

/// What is known about one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The primary would take mail for it.
    pub valid: bool,
    pub source: Source,
    /// Microseconds since the epoch when this was learnt.
    pub at: i64,
    /// Microseconds since the epoch after which the entry is ignored; None never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
}

impl Entry {
    /// Is the entry still to be believed at `now`?
    pub fn fresh(&self, now: i64) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

/// The file's content: entries by lower-cased address.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheFile {
    pub version: u32,
    pub entries: BTreeMap<String, Entry>,
}

/// The shared document's name.
const DOCUMENT: &str = "recipients";

/// Where the cache is kept: a file in the spool directory, or the shared store.
#[derive(Clone)]
pub enum CacheAt {
    Dir(PathBuf),
    Shared(Arc<PgQueue>),
}

impl CacheAt {
    /// The cache of `config`'s queue: in the shared store when `queue.store = "postgres"`.
    pub fn of(config: &Config) -> Result<CacheAt, RecipientsError> {
        match config.queue.store {
            StoreKind::Local => Ok(CacheAt::Dir(config.queue.dir.clone())),
            StoreKind::Postgres => {
                PgQueue::open(config, Role::Tool).map(|q| CacheAt::Shared(Arc::new(q))).map_err(store_error)
            }
        }
    }

    /// Something that changes when the cache does (to read it again only then).
    pub fn stamp(&self) -> Option<(i64, u64)> {
        match self {
            CacheAt::Dir(dir) => std::fs::metadata(cache_path(dir)).ok().map(|m| {
                let at = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                (at.map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)), m.len())
            }),
            CacheAt::Shared(store) => store.document(DOCUMENT).ok().flatten().map(|(version, _)| (version, 0)),
        }
    }
}

impl From<&Path> for CacheAt {
    fn from(dir: &Path) -> CacheAt {
        CacheAt::Dir(dir.to_path_buf())
    }
}

fn store_error(err: crate::spool::SpoolError) -> RecipientsError {
    RecipientsError::Io { path: PathBuf::from("(queue store)"), source: std::io::Error::other(err.to_string()) }
}

/// Where the cache file lives.
pub fn cache_path(spool_dir: &Path) -> PathBuf {
    spool_dir.join(CACHE_FILE)
}

/// Reads the cache; a missing file (or document) is an empty cache.
pub fn load(at: &CacheAt) -> Result<CacheFile, RecipientsError> {
    let spool_dir = match at {
        CacheAt::Dir(dir) => dir,
        CacheAt::Shared(store) => {
            return match store.document(DOCUMENT).map_err(store_error)? {
                Some((_, body)) => serde_json::from_slice(&body).map_err(|e| RecipientsError::Corrupt {
                    path: PathBuf::from("(queue store: recipients)"),
                    problem: e.to_string(),
                }),
                None => Ok(CacheFile { version: 1, ..CacheFile::default() }),
            };
        }
    };
    let path = cache_path(spool_dir);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| RecipientsError::Corrupt { path, problem: e.to_string() })
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(CacheFile { version: 1, ..CacheFile::default() }),
        Err(source) => Err(RecipientsError::Io { path, source }),
    }
}

/// Changes the cache under the lock: reads it, applies `change`, drops expired entries, and writes
/// it back atomically. Returns what `change` returned. In the shared store, a change another node
/// made meanwhile means reading again and applying `change` again.
pub fn modify<T>(at: &CacheAt, mut change: impl FnMut(&mut CacheFile) -> T) -> Result<T, RecipientsError> {
    let spool_dir = match at {
        CacheAt::Dir(dir) => dir,
        CacheAt::Shared(store) => {
            for _ in 0..20 {
                let current = store.document(DOCUMENT).map_err(store_error)?;
                let mut cache = match &current {
                    Some((_, body)) => serde_json::from_slice(body).map_err(|e| RecipientsError::Corrupt {
                        path: PathBuf::from("(queue store: recipients)"),
                        problem: e.to_string(),
                    })?,
                    None => CacheFile::default(),
                };
                let result = change(&mut cache);
                let now = now_micros();
                cache.entries.retain(|_, entry| entry.fresh(now));
                cache.version = 1;
                let body = serde_json::to_vec(&cache).map_err(|e| RecipientsError::Corrupt {
                    path: PathBuf::from("(queue store: recipients)"),
                    problem: e.to_string(),
                })?;
                if store.replace_document(DOCUMENT, current.map(|(v, _)| v), body).map_err(store_error)? {
                    return Ok(result);
                }
            }
            return Err(store_error(crate::spool::SpoolError::Store("the recipient cache changes too often".into())));
        }
    };
    let lock_path = spool_dir.join(LOCK_FILE);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RecipientsError::Io { path, source }
    };
    let lock = std::fs::OpenOptions::new().create(true).append(true).open(&lock_path).map_err(io(&lock_path))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| RecipientsError::Io { path: lock_path.clone(), source: e.into() })?;
    let mut cache = load(at)?;
    let result = change(&mut cache);
    let now = now_micros();
    cache.entries.retain(|_, entry| entry.fresh(now));
    cache.version = 1;
    write_atomically(spool_dir, &cache)?;
    // The lock is released when `lock` is closed.
    Ok(result)
}

fn write_atomically(spool_dir: &Path, cache: &CacheFile) -> Result<(), RecipientsError> {
    let path = cache_path(spool_dir);
    let bytes = serde_json::to_vec_pretty(cache)
        .map_err(|e| RecipientsError::Corrupt { path: path.clone(), problem: e.to_string() })?;
    crate::spool::atomic_write(&path, &bytes).map_err(|e| match e {
        crate::spool::SpoolError::Io { path, source } => RecipientsError::Io { path, source },
        other => RecipientsError::Io { path: path.clone(), source: std::io::Error::other(other.to_string()) },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modify_round_trips_and_drops_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = now_micros();
        modify(&dir.path().into(), |cache| {
            let entry = |valid, expires| Entry { valid, source: Source::Callout, at: now, expires };
            cache.entries.insert("a@x.test".into(), entry(true, Some(now + 60_000_000)));
            cache.entries.insert("old@x.test".into(), entry(true, Some(now - 1)));
            cache.entries.insert("b@x.test".into(), entry(false, None));
        })
        .expect("modify");
        let cache = load(&dir.path().into()).expect("load");
        assert_eq!(cache.entries.len(), 2);
        assert!(cache.entries["a@x.test"].valid);
        assert!(!cache.entries["b@x.test"].valid);
        assert!(!dir.path().join("recipients.json.tmp").exists());
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(cache_path(dir.path()), b"{not json").expect("write");
        assert!(matches!(load(&dir.path().into()), Err(RecipientsError::Corrupt { .. })));
    }
}

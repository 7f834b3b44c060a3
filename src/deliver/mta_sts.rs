//! MTA-STS (RFC 8461): a domain says, with a TXT record and a policy file served over HTTPS, that
//! its MX hosts take TLS with certificates valid for their names, and which hosts those are.
//!
//! [`parse_record`] and [`parse_policy`] read the two published texts; [`Policy::matches`] is the
//! MX check of section 4.1; [`StsPolicies`] keeps policies in memory and durably in
//! `mta-sts.json` in the spool directory, and refreshes them as section 5.1 says: a new `id` in the
//! TXT record means a new policy; a policy that cannot be fetched leaves the cached one in force
//! until its `max_age` is over.

use super::https::{self, FetchError};
use super::route::Router;
use crate::lock;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The cache file's name inside the spool directory.
pub const CACHE_FILE: &str = "mta-sts.json";
/// RFC 8461 3.2: max_age is at most 31557600 seconds (about a year).
const MAX_AGE_LIMIT: u64 = 31_557_600;

/// What is wrong with a published record or policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    #[error("TXT record: {0}")]
    Record(String),
    #[error("policy: {0}")]
    Policy(String),
}

/// RFC 8461 3.2 `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deliver only to matching MX hosts over TLS with a valid certificate.
    Enforce,
    /// Report (log) what enforcing would have refused, and deliver anyway.
    Testing,
    /// The domain withdrew its policy.
    None,
}

/// A parsed policy file (RFC 8461 3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub mode: Mode,
    /// `mx:` patterns in lower case without a trailing dot: `mail.example.com` or `*.example.net`.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
}

/// Reads the `_mta-sts` TXT records of a domain (section 3.1): the `id` of the one record that
/// starts with `v=STSv1`. Records not starting so are ignored; none, or more than one, is an error
/// (the domain then has no policy available).
pub fn parse_record<S: AsRef<str>>(records: &[S]) -> Result<String, StsError> {
    let sts: Vec<&str> = records.iter().map(AsRef::as_ref).filter(|r| r.starts_with("v=STSv1")).collect();
    let record = match sts.as_slice() {
        [one] => *one,
        [] => return Err(StsError::Record("no record starting with v=STSv1".into())),
        _ => return Err(StsError::Record(format!("{} records start with v=STSv1, expected one", sts.len()))),
    };
    let mut fields = record.split(';').map(str::trim).filter(|f| !f.is_empty());
    if fields.next() != Some("v=STSv1") {
        return Err(StsError::Record(format!("{record:?} does not start with the field v=STSv1")));
    }
    let mut id = None;
    for field in fields {
        let Some((key, value)) = field.split_once('=') else {
            return Err(StsError::Record(format!("field {field:?} has no '='")));
        };
        // sts-id = 1*32(ALPHA / DIGIT); other extension fields are allowed and ignored.
        if key == "id" {
            let valid = (1..=32).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_alphanumeric());
            if !valid || id.is_some() {
                return Err(StsError::Record(format!("bad or repeated id {value:?}")));
            }
            id = Some(value.to_string());
        }
    }
    id.ok_or_else(|| StsError::Record(format!("{record:?} has no id")))
}

/// Parses a policy file (section 3.2): `key: value` lines ending in CRLF or LF. `version`, `mode`
/// and `max_age` are required, `mx` at least once unless the mode is `none`; unknown keys are
/// ignored, as the section requires.
pub fn parse_policy(text: &str) -> Result<Policy, StsError> {
    let bad = |problem: String| Err(StsError::Policy(problem));
    let (mut version, mut mode, mut max_age, mut mx) = (None, None, None, Vec::new());
    for line in text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)) {
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return bad(format!("line {line:?} is not `key: value`"));
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "version" if version.is_none() => version = Some(value),
            "mode" if mode.is_none() => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return bad(format!("unknown mode {other:?}")),
                })
            }
            "max_age" if max_age.is_none() => {
                // max-age-value = 1*10(DIGIT), at most 31557600.
                let age = value.parse::<u64>().ok().filter(|&a| value.len() <= 10 && a <= MAX_AGE_LIMIT);
                match age {
                    Some(age) => max_age = Some(age),
                    None => return bad(format!("max_age {value:?} is not a number up to {MAX_AGE_LIMIT}")),
                }
            }
            "mx" => mx.push(mx_pattern(value)?),
            "version" | "mode" | "max_age" => return bad(format!("{key} given twice")),
            _ => {}
        }
    }
    match version {
        Some("STSv1") => {}
        Some(other) => return bad(format!("version {other:?}, expected STSv1")),
        None => return bad("no version".into()),
    }
    let Some(mode) = mode else { return bad("no mode".into()) };
    let Some(max_age) = max_age else { return bad("no max_age".into()) };
    if mx.is_empty() && mode != Mode::None {
        return bad("no mx line".into());
    }
    Ok(Policy { mode, mx, max_age })
}

/// One `mx:` value: a host name, or `*.` and a domain (a wildcard for one label, section 3.2).
fn mx_pattern(value: &str) -> Result<String, StsError> {
    let pattern = value.trim_end_matches('.').to_ascii_lowercase();
    let name = pattern.strip_prefix("*.").unwrap_or(&pattern);
    if !crate::config::is_domain_name(name) || name.contains('*') {
        return Err(StsError::Policy(format!("mx {value:?} is not a host name or *.domain")));
    }
    Ok(pattern)
}

impl Policy {
    /// Does `host` match one of the `mx` patterns (section 4.1)? A wildcard stands for exactly one
    /// leftmost label: `*.example.com` matches `mx1.example.com`, not `a.b.example.com` nor
    /// `example.com`.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|pattern| match pattern.strip_prefix("*.") {
            Some(domain) => host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == domain),
            None => *pattern == host,
        })
    }
}

/// A policy as cached: with the TXT `id` it was fetched under and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cached {
    pub id: String,
    pub policy: Policy,
    /// Seconds since the epoch.
    pub fetched: u64,
}

impl Cached {
    /// Still usable at `now` (section 5.1: until max_age after it was fetched)?
    fn fresh(&self, now: u64) -> bool {
        now < self.fetched.saturating_add(self.policy.max_age)
    }
}

/// The policies in force, by domain, in memory and in `mta-sts.json`.
pub struct StsPolicies {
    /// None in tests and tools without a spool: in memory only.
    path: Option<PathBuf>,
    cache: Mutex<BTreeMap<String, Cached>>,
}

impl StsPolicies {
    /// Loads the cache from `spool_dir` (a missing or damaged file is an empty cache: the
    /// policies are fetched again).
    pub fn open(spool_dir: Option<&Path>) -> StsPolicies {
        let path = spool_dir.map(|dir| dir.join(CACHE_FILE));
        let cache = path
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|bytes| match serde_json::from_slice(&bytes) {
                Ok(cache) => Some(cache),
                Err(e) => {
                    tracing::warn!(error = %e, "the MTA-STS cache is damaged; policies are fetched again");
                    None
                }
            })
            .unwrap_or_default();
        StsPolicies { path, cache: Mutex::new(cache) }
    }

    /// The policy in force for `domain`, looked up and fetched as needed (section 5.1); None when
    /// the domain has none (or none could be had and none is cached).
    pub async fn policy(&self, domain: &str, router: &Router, fetcher: &https::Fetcher) -> Option<Policy> {
        let now = unix_now();
        let cached = lock(&self.cache).get(domain).cloned().filter(|c| c.fresh(now));
        let id = match current_id(domain, router).await {
            Ok(id) => id,
            Err(e) => {
                tracing::info!(domain, error = %e, "MTA-STS TXT lookup failed");
                None
            }
        };
        // No record (withdrawn, or DNS trouble): a cached policy stays in force until it expires.
        let Some(id) = id else { return cached.map(|c| c.policy) };
        if let Some(cached) = cached.as_ref().filter(|c| c.id == id) {
            return Some(cached.policy.clone());
        }
        match fetch_policy(domain, router, fetcher).await {
            Ok(policy) => {
                tracing::info!(domain, id = %id, mode = ?policy.mode, mx = ?policy.mx, max_age = policy.max_age, "MTA-STS policy fetched");
                self.store(domain, Cached { id, policy: policy.clone(), fetched: now }).await;
                Some(policy)
            }
            Err(e) => {
                tracing::warn!(domain, error = %e, cached = cached.is_some(), "MTA-STS policy could not be fetched");
                cached.map(|c| c.policy)
            }
        }
    }

    /// Keeps `cached` for `domain`, in memory and on disk (atomically, off the runtime's workers).
    async fn store(&self, domain: &str, cached: Cached) {
        let snapshot = {
            let mut cache = lock(&self.cache);
            cache.insert(domain.to_string(), cached);
            cache.clone()
        };
        let Some(path) = self.path.clone() else { return };
        let written = tokio::task::spawn_blocking(move || {
            let bytes = serde_json::to_vec_pretty(&snapshot).map_err(|e| e.to_string())?;
            crate::spool::atomic_write(&path, &bytes).map_err(|e| e.to_string())
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the MTA-STS cache"),
            Err(e) => tracing::warn!(error = %e, "cannot write the MTA-STS cache"),
        }
    }
}

/// The `id` of the domain's `_mta-sts` TXT record; None when it has no valid one (section 3.1).
pub async fn current_id(domain: &str, router: &Router) -> Result<Option<String>, super::RouteError> {
    let records = router.txt(&format!("_mta-sts.{domain}")).await?;
    match parse_record(&records) {
        Ok(id) => Ok(Some(id)),
        Err(e) => {
            if !records.is_empty() {
                tracing::debug!(domain, error = %e, "no usable MTA-STS record");
            }
            Ok(None)
        }
    }
}

/// Fetches and parses `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` (section 3.3).
pub async fn fetch_policy(domain: &str, router: &Router, fetcher: &https::Fetcher) -> Result<Policy, FetchError> {
    let host = format!("mta-sts.{domain}");
    let addrs = router.host_addresses(&host).await.map_err(|e| FetchError(e.to_string()))?;
    let body = fetcher.get(&host, &addrs, "/.well-known/mta-sts.txt").await?;
    let text = String::from_utf8(body).map_err(|_| FetchError("the policy is not UTF-8".into()))?;
    parse_policy(&text).map_err(|e| FetchError(e.to_string()))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_records() {
        assert_eq!(parse_record(&["v=STSv1; id=20160831085700Z;"]), Ok("20160831085700Z".into()));
        assert_eq!(parse_record(&["v=STSv1;id=abc"]), Ok("abc".into()));
        // Other records are ignored; extension fields too.
        assert_eq!(parse_record(&["v=spf1 -all", "v=STSv1; id=x1; ext=y"]), Ok("x1".into()));
        for bad in [
            vec![],
            vec!["v=spf1 -all"],
            vec!["v=STSv1; id=a", "v=STSv1; id=b"],
            vec!["v=STSv1;"],
            vec!["v=STSv1; id="],
            vec!["v=STSv1; id=has-dash"],
            vec!["v=STSv1; id=a; id=b"],
            vec!["v=STSv1; id"],
            vec!["v=STSv10; id=a"],
        ] {
            assert!(parse_record(&bad).is_err(), "{bad:?}");
        }
        assert!(parse_record(&[format!("v=STSv1; id={}", "a".repeat(33))]).is_err(), "id too long");
    }

    #[test]
    fn policy_files() {
        let text =
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.NET.\r\nmax_age: 604800\r\n";
        let policy = parse_policy(text).unwrap();
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.mx, ["mail.example.com", "*.example.net"]);
        assert_eq!(policy.max_age, 604_800);
        // LF endings, unknown keys, no trailing newline, mode none without mx.
        let policy = parse_policy("version: STSv1\nmode: testing\nfoo: bar\nmx: a.test\nmax_age: 86400").unwrap();
        assert_eq!(policy.mode, Mode::Testing);
        assert_eq!(parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").unwrap().mx, Vec::<String>::new());
    }

    #[test]
    fn bad_policy_files_are_errors() {
        for bad in [
            "",
            "mode: enforce\nmx: a.test\nmax_age: 1\n",
            "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
            "version: STSv1\nmx: a.test\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.test\n",
            "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
            "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",
            "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 00000000001\n",
            "version: STSv1\nmode: enforce\nmode: testing\nmx: a.test\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: **.test\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: bad host\nmax_age: 1\n",
            "version: STSv1\nmode enforce\nmx: a.test\nmax_age: 1\n",
            "<html>not found</html>",
        ] {
            assert!(parse_policy(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mx_matching() {
        let policy =
            Policy { mode: Mode::Enforce, mx: vec!["mail.example.com".into(), "*.example.net".into()], max_age: 1 };
        assert!(policy.matches("mail.example.com"));
        assert!(policy.matches("MAIL.example.com."));
        assert!(policy.matches("mx1.example.net"));
        assert!(!policy.matches("example.net"), "a wildcard needs a label");
        assert!(!policy.matches("a.b.example.net"), "a wildcard is one label");
        assert!(!policy.matches("other.example.com"));
        assert!(!policy.matches("xexample.net"));
    }

    #[test]
    fn freshness() {
        let policy = Policy { mode: Mode::Enforce, mx: vec!["a.test".into()], max_age: 100 };
        let cached = Cached { id: "1".into(), policy, fetched: 1000 };
        assert!(cached.fresh(1099));
        assert!(!cached.fresh(1100));
    }

    #[test]
    fn cache_survives_a_restart_and_a_damaged_file_is_empty() {
        let dir = tempfile::TempDir::new().unwrap();
        let policies = StsPolicies::open(Some(dir.path()));
        let policy = Policy { mode: Mode::Testing, mx: vec!["a.test".into()], max_age: 100 };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(policies.store("example.test", Cached { id: "7".into(), policy: policy.clone(), fetched: 5 }));
        let again = StsPolicies::open(Some(dir.path()));
        assert_eq!(lock(&again.cache).get("example.test").map(|c| &c.policy), Some(&policy));
        std::fs::write(dir.path().join(CACHE_FILE), b"{not json").unwrap();
        assert!(lock(&StsPolicies::open(Some(dir.path())).cache).is_empty());
    }
}

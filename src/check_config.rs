//! `bartleby check-config`'s checks beyond parsing: what `serve` would reject later (a TLS key
//! that does not parse, a file the service user cannot read) is an error here, and settings that
//! have no effect (a route or `[domain]` table for a domain that is not relayed) are warnings.

use crate::config::Config;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What the checks found: errors stop the start (exit 2), warnings do not.
#[derive(Debug, Default)]
pub struct Findings {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Runs every check. `user` is whom the files must be readable by (with `group` or the user's
/// primary group, the only group bartleby keeps after dropping privileges, see privilege.rs).
pub fn check(config: &Config, user: Option<&str>) -> Findings {
    let mut findings = Findings { errors: tls_errors(config), warnings: warnings(config) };
    match reader(config, user) {
        Ok(reader) => {
            for (key, path) in files(config) {
                if let Err(problem) = readable(&path, reader) {
                    findings.errors.push(format!("{key}: {}: {problem}", path.display()));
                }
            }
        }
        Err(err) => findings.errors.push(err),
    }
    if config.queue.store == crate::config::StoreKind::Postgres {
        match crate::spool::postgres::probe(config) {
            Ok(Some(note)) => findings.warnings.push(note),
            Ok(None) => {}
            Err(err) => findings.errors.push(format!("queue.url: {err}")),
        }
    }
    findings
}

/// The TLS certificates and keys, loaded as `serve` loads them.
fn tls_errors(config: &Config) -> Vec<String> {
    let mut errors = Vec::new();
    if let Err(err) = crate::smtp::tls_acceptor(config) {
        errors.push(err.to_string());
    }
    if let Err(err) = crate::web::tls::acceptor(&config.web) {
        errors.push(format!("web.tls_cert/web.tls_key: {err}"));
    }
    errors
}

/// Routes and `[domain]` tables of domains that are not relayed: bartleby accepts no mail for
/// them, so they only matter for mail it sends there itself (bounces to a sender's domain).
pub fn warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    let routes = config.routes.keys().map(|d| ("routes", d));
    for (table, domain) in routes.chain(config.domain.keys().map(|d| ("domain", d))) {
        if !config.is_relay_domain(domain) {
            warnings.push(format!(
                "{table}.{domain}: {domain} is not in relay.domains, so no mail for it is accepted \
                 (this applies only to bounces and notices sent there)"
            ));
        }
    }
    warnings
}

/// Every file the daemon reads after it dropped privileges, with its key.
fn files(config: &Config) -> Vec<(String, PathBuf)> {
    let mut files = Vec::new();
    let mut add = |key: String, path: &Option<PathBuf>| {
        if let Some(path) = path {
            files.push((key, path.clone()));
        }
    };
    add("smtp.tls_cert".into(), &config.smtp.tls_cert);
    add("smtp.tls_key".into(), &config.smtp.tls_key);
    add("web.tls_cert".into(), &config.web.tls_cert);
    add("web.tls_key".into(), &config.web.tls_key);
    add("delivery.tls_ca_file".into(), &config.delivery.tls_ca_file);
    add("queue.password_file".into(), &config.queue.password_file);
    add("queue.ca_file".into(), &config.queue.ca_file);
    for (domain, policy) in &config.domain {
        add(format!("domain.{domain}.recipients_file"), &policy.recipients_file);
        if let Some(ldap) = &policy.recipients_ldap {
            add(format!("domain.{domain}.recipients_ldap.password_file"), &ldap.password_file);
            add(format!("domain.{domain}.recipients_ldap.ca_file"), &ldap.ca_file);
        }
    }
    files
}

/// Who reads the files: a uid and the one gid bartleby keeps, or this process itself.
#[derive(Debug, Clone, Copy)]
enum Reader {
    Ids { uid: u32, gid: u32 },
    Myself,
}

fn reader(config: &Config, user: Option<&str>) -> Result<Reader, String> {
    // Only root becomes `user`; anyone else runs (and reads) as themselves.
    let user = user.or(config.user.as_deref()).filter(|_| rustix::process::geteuid().is_root());
    let Some(user) = user else { return Ok(Reader::Myself) };
    let mut identity = crate::privilege::lookup_user(user).map_err(|e| format!("user: {e}"))?;
    if let Some(group) = &config.group {
        identity.gid = crate::privilege::lookup_group(group).map_err(|e| format!("group: {e}"))?;
    }
    Ok(Reader::Ids { uid: identity.uid, gid: identity.gid })
}

/// Can `reader` open `path` for reading? By the owner, group and other bits of the file and of
/// every directory above it (search permission); ACLs and the unit's sandboxing are not modelled.
fn readable(path: &Path, reader: Reader) -> Result<(), String> {
    let (uid, gid) = match reader {
        Reader::Myself => return std::fs::File::open(path).map(drop).map_err(|e| e.to_string()),
        Reader::Ids { uid, gid } => (uid, gid),
    };
    let absolute = std::path::absolute(path).map_err(|e| e.to_string())?;
    for dir in absolute.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !allows(&meta, uid, gid, 0o1) {
            return Err(format!("uid {uid} gid {gid} may not enter the directory {}", dir.display()));
        }
    }
    let meta = std::fs::metadata(&absolute).map_err(|e| e.to_string())?;
    if !allows(&meta, uid, gid, 0o4) {
        return Err(format!(
            "uid {uid} gid {gid} may not read it (owner {}:{}, mode {:o})",
            meta.uid(),
            meta.gid(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The permission `bit` (4 read, 1 search) for uid/gid, as the kernel decides it without ACLs:
/// the owner's bits for the owner, else the group's for the group, else the others'.
fn allows(meta: &std::fs::Metadata, uid: u32, gid: u32, bit: u32) -> bool {
    if uid == 0 {
        return true;
    }
    let mode = meta.mode();
    let shift = if meta.uid() == uid {
        6
    } else if meta.gid() == gid {
        3
    } else {
        0
    };
    (mode >> shift) & bit == bit
}

//! OpenLDAP's slapd from Debian (`slapd`, `ldap-utils`) in a temporary directory, as the site's
//! directory for `recipients_ldap` tests: a slapd.conf with the core, cosine and inetorgperson
//! schemas, an mdb database loaded with `slapadd`, listening on `ldap://` (plain and StartTLS) and
//! `ldaps://` on 127.0.0.41. Killed when dropped.
//!
//! Include it after peers.rs: `#[path = "support/slapd.rs"] mod slapd;`.
#![allow(dead_code)]

use crate::peers::{ChildGuard, PeerError, Result, free_loopback_port, run_bounded, tail};
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The address slapd listens on.
pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 41);
pub const SUFFIX: &str = "dc=example,dc=test";
pub const ROOT_DN: &str = "cn=admin,dc=example,dc=test";
pub const ROOT_PASSWORD: &str = "root-secret";

/// Active Directory's `proxyAddresses` (Exchange's list of `smtp:` aliases), approximated with
/// OpenLDAP's experimental OID arc: multi-valued and case-insensitive, as in AD.
const PROXY_ADDRESSES_SCHEMA: &str = "\
attributetype ( 1.3.6.1.4.1.4203.666.11.1 NAME 'proxyAddresses' EQUALITY caseIgnoreMatch
  SUBSTR caseIgnoreSubstringsMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
objectclass ( 1.3.6.1.4.1.4203.666.11.2 NAME 'mailRecipient' AUXILIARY MAY proxyAddresses )
";

pub struct Slapd {
    dir: PathBuf,
    conf: PathBuf,
    /// `ldap://` (plain, and StartTLS).
    pub ldap: SocketAddr,
    /// `ldaps://`.
    pub ldaps: SocketAddr,
    child: Option<ChildGuard>,
}

impl Slapd {
    /// Writes the configuration into `dir`, loads `ldif` (entries below [`SUFFIX`]) and starts.
    /// Searching needs a bind: anonymous clients see nothing, as in Active Directory.
    pub fn start(dir: &Path, ldif: &str, cert: &Path, key: &Path) -> Result<Slapd> {
        let io = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| PeerError(format!("{what}: {e}"))
        };
        fs::create_dir_all(dir.join("db")).map_err(io("mkdir db"))?;
        let conf = dir.join("slapd.conf");
        let d = dir.display();
        let text = format!(
            "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\n\
             include /etc/ldap/schema/inetorgperson.schema\n{PROXY_ADDRESSES_SCHEMA}\
             pidfile {d}/slapd.pid\nargsfile {d}/slapd.args\n\
             modulepath /usr/lib/ldap\nmoduleload back_mdb\n\
             TLSCertificateFile {}\nTLSCertificateKeyFile {}\n\
             database mdb\nsuffix \"{SUFFIX}\"\nrootdn \"{ROOT_DN}\"\nrootpw {ROOT_PASSWORD}\n\
             directory {d}/db\nmaxsize 10485760\n\
             access to attrs=userPassword by anonymous auth by * none\n\
             access to * by users read by * none\n",
            cert.display(),
            key.display()
        );
        fs::write(&conf, text).map_err(io("write slapd.conf"))?;
        let ldif_path = dir.join("entries.ldif");
        fs::write(&ldif_path, ldif).map_err(io("write entries.ldif"))?;
        let out = run_bounded(
            Command::new("slapadd").arg("-f").arg(&conf).arg("-l").arg(&ldif_path),
            Duration::from_secs(30),
        )?;
        if !out.status.success() {
            return Err(PeerError(format!("slapadd failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        let ldap = SocketAddr::from((ADDRESS, free_loopback_port(ADDRESS)?));
        let ldaps = SocketAddr::from((ADDRESS, free_loopback_port(ADDRESS)?));
        let mut slapd = Slapd { dir: dir.to_path_buf(), conf, ldap, ldaps, child: None };
        slapd.restart()?;
        Ok(slapd)
    }

    /// `ldap://127.0.0.41:PORT`.
    pub fn ldap_url(&self) -> String {
        format!("ldap://{}", self.ldap)
    }

    /// `ldaps://127.0.0.41:PORT`.
    pub fn ldaps_url(&self) -> String {
        format!("ldaps://{}", self.ldaps)
    }

    /// Starts (again, on the same ports and data) and waits until a bind over `ldap://` works.
    pub fn restart(&mut self) -> Result<()> {
        let log = File::create(self.dir.join("slapd.log")).map_err(|e| PeerError(format!("slapd.log: {e}")))?;
        let urls = format!("{}/ {}/", self.ldap_url(), self.ldaps_url());
        // -d 0: stay in the foreground (a child we can kill) without debug output.
        let child = ChildGuard::spawn(
            Command::new("slapd").arg("-f").arg(&self.conf).arg("-h").arg(&urls).arg("-d").arg("0").stderr(log),
            "slapd",
        )?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().and_then(ChildGuard::exited) {
                self.child = None;
                return Err(PeerError(format!(
                    "slapd exited with {status}:\n{}",
                    tail(&self.dir.join("slapd.log"), 20)
                )));
            }
            let whoami = run_bounded(
                Command::new("ldapwhoami").args(["-x", "-H", &self.ldap_url(), "-D", ROOT_DN, "-w", ROOT_PASSWORD]),
                Duration::from_secs(5),
            )?;
            if whoami.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(PeerError(format!(
                    "slapd did not answer on {} in 20s:\n{}",
                    self.ldap,
                    tail(&self.dir.join("slapd.log"), 20)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills slapd: the directory becomes unreachable.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }
}

//! `[domain."..."] recipients_ldap`: a domain's recipients from the site's directory (issue 15),
//! e.g. Active Directory in front of Exchange. The key and its fields are a public contract.

use super::HumanDuration;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where and how to ask the site's directory whether an address exists.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LdapSource {
    /// `ldap://host[:port]` or `ldaps://host[:port]`: an RFC 4516 URL without DN, attributes or
    /// filter, which have their own keys here.
    pub url: String,
    /// The DN to bind as (RFC 4513 5.1.3 simple bind), with its password in `password_file`.
    /// Neither: an anonymous search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_dn: Option<String>,
    /// A file holding the bind password; one trailing newline is not part of it. A file, so the
    /// configuration can be world-readable and `check-config` can print it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Where the (subtree) search starts, e.g. `dc=example,dc=com`.
    pub base: String,
    /// An RFC 4515 filter in which every `%s` stands for the recipient address, escaped.
    #[serde(default = "default_filter")]
    pub filter: String,
    /// Upgrade an `ldap://` connection with StartTLS (RFC 4511 4.14, RFC 4513 3) before binding.
    #[serde(default)]
    pub starttls: bool,
    /// Extra trust anchors (PEM) besides the Web PKI roots: a site's own CA, as AD Certificate
    /// Services issues for domain controllers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Bounds one lookup: connecting, TLS, bind and search together.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_filter() -> String {
    "(mail=%s)".to_string()
}

fn default_timeout() -> HumanDuration {
    HumanDuration::seconds(5)
}

/// The parts of `url` a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LdapUrl {
    /// `ldaps://`: TLS from the first byte (port 636 by default).
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl LdapSource {
    /// The filter for one address: every `%s` replaced by the address with the characters RFC 4515
    /// section 3 reserves (`*`, `(`, `)`, `\`, NUL) written as `\XX`, so that an address such as
    /// `*)(mail=*` matches itself literally and cannot widen the search.
    pub fn filter_for(&self, address: &str) -> String {
        self.filter.replace("%s", &ldap3::ldap_escape(address))
    }

    /// The URL's scheme, host and port; errors say what is wrong in the operator's terms.
    pub fn parsed_url(&self) -> Result<LdapUrl, String> {
        parse_url(&self.url)
    }

    /// Every check `check-config` and the start make; `key` is `domain.NAME.recipients_ldap`.
    pub fn validate(&self, key: &str) -> Result<(), (String, String)> {
        let bad = |field: &str, problem: String| Err((format!("{key}.{field}"), problem));
        let url = match self.parsed_url() {
            Ok(url) => url,
            Err(problem) => return bad("url", problem),
        };
        if url.tls && self.starttls {
            return bad("starttls", "applies to ldap:// URLs; ldaps:// is TLS already".into());
        }
        match (&self.bind_dn, &self.password_file) {
            (Some(dn), Some(path)) => {
                if dn.trim().is_empty() {
                    return bad(
                        "bind_dn",
                        "must not be empty (leave both bind_dn and password_file out to search anonymously)".into(),
                    );
                }
                if let Err(problem) = read_password(path) {
                    return bad("password_file", problem);
                }
            }
            (None, None) => {}
            (Some(_), None) => return bad("password_file", "bind_dn needs a password_file".into()),
            (None, Some(_)) => return bad("bind_dn", "password_file needs a bind_dn".into()),
        }
        if self.base.trim().is_empty() {
            return bad("base", "must name where the search starts, e.g. \"dc=example,dc=com\"".into());
        }
        if !self.filter.contains("%s") {
            return bad("filter", format!("{:?} has no %s where the address goes", self.filter));
        }
        if ldap3::parse_filter(self.filter_for("probe@example.test")).is_err() {
            return bad("filter", format!("{:?} is not an RFC 4515 filter, e.g. \"(mail=%s)\"", self.filter));
        }
        if let Some(path) = &self.ca_file
            && let Err(problem) = read_ca_file(path)
        {
            return bad("ca_file", problem);
        }
        if self.timeout.0.is_zero() {
            return bad("timeout", "must be longer than 0".into());
        }
        Ok(())
    }
}

/// `ldap://host[:port][/]` or `ldaps://...`; an IPv6 literal in brackets.
fn parse_url(text: &str) -> Result<LdapUrl, String> {
    let (scheme, rest) =
        text.split_once("://").ok_or_else(|| format!("{text:?} is not ldap://host or ldaps://host"))?;
    let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "ldap" => (false, 389),
        "ldaps" => (true, 636),
        _ => return Err(format!("{text:?}: the scheme must be ldap:// or ldaps://")),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '@']) {
        return Err(format!("{text:?}: write only scheme://host[:port]; base and filter have their own keys"));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (ip, after) = bracketed.split_once(']').ok_or_else(|| format!("{text:?}: unclosed ["))?;
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{text:?}: {ip:?} is not an IPv6 address"));
        }
        (ip, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{text:?} names no host"));
    }
    let port = match port {
        None => default_port,
        Some(port) => {
            port.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| format!("{text:?}: bad port {port:?}"))?
        }
    };
    Ok(LdapUrl { tls, host: host.to_string(), port })
}

/// The bind password: the file's content without its trailing line end. An empty password is an
/// error, not an anonymous bind: RFC 4513 5.1.2 makes a DN with an empty password an
/// "unauthenticated" bind that many servers accept, which would look like a working bind.
pub fn read_password(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("{}: cannot read: {err}", path.display()))?;
    let password = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if password.is_empty() {
        return Err(format!("{}: is empty", path.display()));
    }
    Ok(password.to_string())
}

/// The certificates of a PEM file; at least one.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("{}: {err}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{}: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests;

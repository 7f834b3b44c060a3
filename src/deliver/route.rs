//! Where a domain's mail goes: a static route, or the MX list (RFC 5321 5.1) filtered by the
//! backup-MX rule, each host expanded to its addresses.

use super::dane::Secured;
use super::mx::{MxChoice, MxHost, SelfIdentity, backup_mx_rule, interface_addresses};
use super::{Detail, RcptOutcome};
use crate::config::{Config, Route, Switch};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::rr::{RData, Record};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// One address to try, in order: a host of the MX list (or the static route) on one of its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// The host's name as found in the MX record or route (an IP literal for routes by address);
    /// shown in messages and used as the TLS server name.
    pub host: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// The MX preference; None for a static route or an implicit MX.
    pub preference: Option<u16>,
}

/// Why a domain has no next hop to try.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteError {
    /// RFC 7505: the domain says it accepts no mail.
    #[error("domain {0} does not accept mail (null MX)")]
    NullMx(String),
    /// The domain does not exist.
    #[error("host or domain name not found: {0} (NXDOMAIN)")]
    NxDomain(String),
    /// The domain exists but has neither MX nor address records (RFC 5321 5.1).
    #[error("domain {0} has no MX, A or AAAA records")]
    NoRecords(String),
    /// A lookup failed for now: SERVFAIL, timeout, unreachable name server.
    #[error("DNS lookup of {name} {kind} failed: {reason}")]
    Temporary { name: String, kind: &'static str, reason: String },
    /// No host of the list has an address.
    #[error("no address found for the next hops of {0}")]
    NoAddress(String),
    /// We are the best MX: delivering would loop.
    #[error("MX list for {domain} points back to {hostname}")]
    Loop { domain: String, hostname: String },
}

impl RouteError {
    /// The outcome every recipient of the domain gets.
    pub fn outcome(&self) -> RcptOutcome {
        // A failed lookup keeps the destination unreachable: it counts against it.
        let detail = |status: &str| Detail {
            status: status.to_string(),
            text: self.to_string(),
            session: true,
            ..Detail::default()
        };
        match self {
            // RFC 7505 3: 5.1.10 for a null MX.
            RouteError::NullMx(_) => RcptOutcome::PermFail(detail("5.1.10")),
            RouteError::NxDomain(_) => RcptOutcome::PermFail(detail("5.1.2")),
            RouteError::NoRecords(_) => RcptOutcome::PermFail(detail("5.4.4")),
            RouteError::Temporary { .. } => RcptOutcome::TempFail(detail("4.4.3")),
            RouteError::NoAddress(_) => RcptOutcome::TempFail(detail("4.4.4")),
            // RFC 3463: X.4.6 routing loop detected.
            RouteError::Loop { .. } => RcptOutcome::Loop(detail("5.4.6")),
        }
    }
}

/// Resolves next hops; one per deliverer.
pub struct Router {
    resolver: TokioResolver,
    /// A DNSSEC-validating resolver for DANE (RFC 7672 2.1), built when DANE is on anywhere.
    dnssec: Option<TokioResolver>,
    me: SelfIdentity,
    hostname: String,
    routes: BTreeMap<String, Route>,
    mx_port: u16,
}

impl Router {
    /// Builds the resolver (configured name servers, or the system's) and our identity.
    pub fn new(config: &Config) -> Result<Router, String> {
        let resolver = resolver_with(config, None)?;
        let dane_anywhere =
            config.delivery.dane == Switch::On || config.domain.values().any(|d| d.dane == Some(Switch::On));
        let dnssec = if dane_anywhere {
            let anchors = match &config.delivery.dnssec_trust_anchor {
                Some(path) => TrustAnchors::from_file(path)
                    .map_err(|e| format!("delivery.dnssec_trust_anchor {}: {e}", path.display()))?,
                None => TrustAnchors::default(),
            };
            Some(resolver_with(config, Some(Arc::new(anchors)))?)
        } else {
            None
        };
        let mut names = vec![config.hostname.clone()];
        names.extend(config.relay.also_me.iter().cloned());
        let wildcard = config.smtp.listen.iter().any(|l| l.ip().is_unspecified());
        let interfaces = if wildcard { interface_addresses() } else { Vec::new() };
        Ok(Router {
            resolver,
            dnssec,
            me: SelfIdentity::new(&names, &config.smtp.listen, &interfaces),
            hostname: config.hostname.clone(),
            routes: config.routes.clone(),
            mx_port: config.delivery.mx_port,
        })
    }

    /// The addresses to try for `domain`, best first.
    pub async fn next_hops(&self, domain: &str) -> Result<Vec<NextHop>, RouteError> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if let Some(route) = self.routes.get(&domain) {
            return self.route_hops(route).await;
        }
        let hosts = match self.mx_hosts(&domain).await? {
            Some(hosts) => hosts,
            None => return self.implicit_mx(&domain).await,
        };
        match backup_mx_rule(hosts, |h| self.me.is_me(h, self.mx_port)) {
            MxChoice::Loop => Err(RouteError::Loop { domain, hostname: self.hostname.clone() }),
            MxChoice::Hosts(hosts) => {
                let hops: Vec<NextHop> = hosts
                    .iter()
                    .flat_map(|h| {
                        h.addrs.iter().map(|ip| NextHop {
                            host: h.name.clone(),
                            addr: SocketAddr::new(*ip, self.mx_port),
                            preference: Some(h.preference),
                        })
                    })
                    .collect();
                if hops.is_empty() { Err(RouteError::NoAddress(domain)) } else { Ok(hops) }
            }
        }
    }

    /// The MX list of `domain` as published, each host with its addresses (empty when its name
    /// does not resolve); None without MX records. Used by `bartleby check-dns`.
    pub async fn mx_list(&self, domain: &str) -> Result<Option<Vec<MxHost>>, RouteError> {
        self.mx_hosts(&domain.trim_end_matches('.').to_ascii_lowercase()).await
    }

    /// The TXT records of `name`, each one's strings joined (RFC 7208 3.3 and RFC 8461 3.1 read
    /// them so); empty when there are none.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, RouteError> {
        let lookup = match self.resolver.txt_lookup(fqdn(name)).await {
            Ok(lookup) => lookup,
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => return Ok(Vec::new()),
            Err(e) => return Err(temporary(name, "TXT", &e)),
        };
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => Some(txt.txt_data.iter().map(|s| String::from_utf8_lossy(s)).collect()),
                _ => None,
            })
            .collect())
    }

    /// The TLSA records of `name` (e.g. `_25._tcp.mx.example.test`, RFC 7672 2.2); empty when none.
    /// Whether the answer was DNSSEC-validated is not known here.
    pub async fn tlsa(&self, name: &str) -> Result<Vec<super::tlsa::Tlsa>, RouteError> {
        let lookup = match self.resolver.tlsa_lookup(fqdn(name)).await {
            Ok(lookup) => lookup,
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => return Ok(Vec::new()),
            Err(e) => return Err(temporary(name, "TLSA", &e)),
        };
        Ok(tlsa_records(lookup.answers().iter()))
    }

    /// Is the MX RRset of `domain` DNSSEC-validated (RFC 7672 2.2.1)? None when DANE is on
    /// nowhere (no validating resolver).
    pub async fn secure_mx(&self, domain: &str) -> Option<Secured<()>> {
        let resolver = self.dnssec.as_ref()?;
        Some(match resolver.mx_lookup(fqdn(domain)).await {
            Ok(lookup) => {
                judge(lookup.answers().iter().filter(|r| matches!(r.data, RData::MX(_))).map(|r| r.proof)).map(|()| ())
            }
            Err(e) => judge_error(&e),
        })
    }

    /// The TLSA records of `name` (`_25._tcp.mx.example.test`, RFC 7672 2.2) as the validating
    /// resolver judged them; None without one.
    pub async fn secure_tlsa(&self, name: &str) -> Option<Secured<Vec<super::tlsa::Tlsa>>> {
        let resolver = self.dnssec.as_ref()?;
        let lookup = match resolver.tlsa_lookup(fqdn(name)).await {
            Ok(lookup) => lookup,
            Err(e) => return Some(judge_error(&e)),
        };
        let tlsa: Vec<_> = lookup.answers().iter().filter(|r| matches!(r.data, RData::TLSA(_))).collect();
        Some(judge(tlsa.iter().map(|r| r.proof)).map(|()| tlsa_records(tlsa.into_iter())))
    }

    /// The A and AAAA addresses of a host name (none: an error), e.g. an MTA-STS policy server.
    pub async fn host_addresses(&self, name: &str) -> Result<Vec<IpAddr>, RouteError> {
        let ips = self.addresses(name).await?;
        if ips.is_empty() { Err(RouteError::NoAddress(name.to_string())) } else { Ok(ips) }
    }

    /// Is `host` this bartleby, by name or by an address on the MX port?
    pub fn is_me(&self, host: &MxHost) -> bool {
        self.me.is_me(host, self.mx_port)
    }

    /// A static route: an IP literal, or a name resolved with A/AAAA. Any failure defers: a
    /// broken route is the operator's to fix, and the mail must wait for it.
    async fn route_hops(&self, route: &Route) -> Result<Vec<NextHop>, RouteError> {
        if let Ok(ip) = route.host.parse::<IpAddr>() {
            return Ok(vec![NextHop {
                host: route.host.clone(),
                addr: SocketAddr::new(ip, route.port),
                preference: None,
            }]);
        }
        let ips = self.addresses(&route.host).await.map_err(|e| match e {
            temp @ RouteError::Temporary { .. } => temp,
            other => RouteError::Temporary { name: route.host.clone(), kind: "A/AAAA", reason: other.to_string() },
        })?;
        if ips.is_empty() {
            return Err(RouteError::NoAddress(route.host.clone()));
        }
        Ok(ips
            .into_iter()
            .map(|ip| NextHop { host: route.host.clone(), addr: SocketAddr::new(ip, route.port), preference: None })
            .collect())
    }

    /// The MX hosts with their addresses; None when the domain has no MX records.
    async fn mx_hosts(&self, domain: &str) -> Result<Option<Vec<MxHost>>, RouteError> {
        let lookup = match self.resolver.mx_lookup(fqdn(domain)).await {
            Ok(lookup) => lookup,
            Err(e) if e.is_nx_domain() => return Err(RouteError::NxDomain(domain.to_string())),
            Err(e) if e.is_no_records_found() => return Ok(None),
            Err(e) => return Err(temporary(domain, "MX", &e)),
        };
        let mut records: Vec<(u16, String)> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect();
        // RFC 7505 3: one MX record whose exchange is the root is a null MX.
        if records.len() == 1 && records[0].1.trim_end_matches('.').is_empty() {
            return Err(RouteError::NullMx(domain.to_string()));
        }
        records.retain(|(_, name)| !name.trim_end_matches('.').is_empty());
        if records.is_empty() {
            return Ok(None);
        }
        let mut hosts = Vec::with_capacity(records.len());
        for (preference, name) in records {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            // A host whose lookup fails keeps an empty address list: its name may still be us.
            let addrs = self.addresses(&name).await.unwrap_or_default();
            hosts.push(MxHost { preference, name, addrs });
        }
        Ok(Some(hosts))
    }

    /// RFC 5321 5.1: without MX records the domain itself is the only host (implicit MX).
    async fn implicit_mx(&self, domain: &str) -> Result<Vec<NextHop>, RouteError> {
        let ips = self.addresses(domain).await?;
        if ips.is_empty() {
            return Err(RouteError::NoRecords(domain.to_string()));
        }
        let host = MxHost { preference: 0, name: domain.to_string(), addrs: ips.clone() };
        if self.me.is_me(&host, self.mx_port) {
            return Err(RouteError::Loop { domain: domain.to_string(), hostname: self.hostname.clone() });
        }
        Ok(ips
            .into_iter()
            .map(|ip| NextHop { host: domain.to_string(), addr: SocketAddr::new(ip, self.mx_port), preference: None })
            .collect())
    }

    /// A and AAAA addresses of a name; empty when it exists without addresses.
    async fn addresses(&self, name: &str) -> Result<Vec<IpAddr>, RouteError> {
        match self.resolver.lookup_ip(fqdn(name)).await {
            Ok(found) => Ok(found.iter().collect()),
            Err(e) if e.is_nx_domain() => Err(RouteError::NxDomain(name.to_string())),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(temporary(name, "A/AAAA", &e)),
        }
    }
}

/// The resolver for `config`'s name servers (or the system's); with `anchors`, one that validates
/// DNSSEC from them and marks each record's proof.
fn resolver_with(config: &Config, anchors: Option<Arc<TrustAnchors>>) -> Result<TokioResolver, String> {
    let mut builder = if config.dns.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("system DNS configuration: {e}"))?
    } else {
        let servers = config.dns.nameservers.iter().map(|ns| name_server(*ns)).collect();
        TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), TokioRuntimeProvider::default())
    };
    let options = builder.options_mut();
    options.timeout = config.delivery.dns_timeout.0;
    options.attempts = 2;
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    if let Some(anchors) = anchors {
        builder = builder.with_trust_anchor(anchors);
    }
    builder.build().map_err(|e| format!("DNS resolver: {e}"))
}

/// The TLSA records among `answers`.
fn tlsa_records<'a>(answers: impl Iterator<Item = &'a Record>) -> Vec<super::tlsa::Tlsa> {
    answers
        .filter_map(|r| match &r.data {
            RData::TLSA(tlsa) => Some(super::tlsa::Tlsa {
                usage: tlsa.cert_usage.into(),
                selector: tlsa.selector.into(),
                matching: tlsa.matching.into(),
                data: tlsa.cert_data.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// Secure only when every record is (RFC 4035 4.3); bogus when any is; otherwise insecure (no
/// records, unsigned or indeterminate).
fn judge(proofs: impl Iterator<Item = Proof>) -> Secured<()> {
    let proofs: Vec<Proof> = proofs.collect();
    if proofs.contains(&Proof::Bogus) {
        Secured::Bogus("DNSSEC validation failed (bogus)".into())
    } else if !proofs.is_empty() && proofs.iter().all(|p| *p == Proof::Secure) {
        Secured::Secure(())
    } else {
        Secured::Insecure
    }
}

/// A lookup that failed: a denial (no records, NXDOMAIN) is as good as no records; a bogus denial
/// or a failure (SERVFAIL, timeout) leaves nothing to conclude (RFC 7672 2.1).
fn judge_error<T>(error: &NetError) -> Secured<T> {
    use hickory_resolver::net::DnsError;
    match error {
        NetError::Dns(DnsError::Nsec { proof: Proof::Bogus, .. }) | NetError::Dns(DnsError::DnssecBogus) => {
            Secured::Bogus(format!("DNSSEC validation failed: {error}"))
        }
        NetError::Dns(DnsError::Nsec { .. }) => Secured::Insecure,
        _ if error.is_nx_domain() || error.is_no_records_found() => Secured::Insecure,
        _ => Secured::Bogus(error.to_string()),
    }
}

/// A name server at a given address and port, over UDP with TCP for truncated answers.
fn name_server(addr: SocketAddr) -> NameServerConfig {
    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
    server.connections = vec![ConnectionConfig::udp(), ConnectionConfig::tcp()];
    for connection in &mut server.connections {
        connection.port = addr.port();
    }
    server
}

/// Names are looked up fully qualified so the search list never applies.
fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

fn temporary(name: &str, kind: &'static str, error: &NetError) -> RouteError {
    RouteError::Temporary { name: name.to_string(), kind, reason: error.to_string() }
}

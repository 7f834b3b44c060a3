//! `bartleby check-dns`: are each relayed domain's MX records right for a backup MX? A primary
//! must be more preferred than bartleby (RFC 5321 5.1: senders try the lowest preference first),
//! bartleby must be listed under a name that resolves to one of its addresses, every name must
//! resolve, and the primary should answer SMTP. Each finding is printed with the record it is
//! about; the daemon runs the same check at start and logs what is wrong.

use crate::config::{Config, HumanDuration};
use crate::deliver::https::Fetcher;
use crate::deliver::mta_sts::{self, Mode};
use crate::deliver::mx::MxHost;
use crate::deliver::{ClientSettings, NextHop, RouteError, Router};
use crate::monitor::probe;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// As it should be.
    Ok,
    /// Worth knowing, not wrong (the primary is down right now; bartleby is behind NAT).
    Warning,
    /// Wrong: mail will not come to bartleby, or bartleby cannot pass it on.
    Problem,
}

/// One plain-words finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub text: String,
}

/// The findings for one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub domain: String,
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, level: Level, text: String) {
        self.findings.push(Finding { level, text });
    }

    /// Is anything wrong?
    pub fn has_problems(&self) -> bool {
        self.findings.iter().any(|f| f.level == Level::Problem)
    }
}

/// Checks `domains` (the relay domains when empty) with the configured resolver.
pub async fn check(config: &Config, domains: &[String]) -> Result<Vec<Report>, String> {
    let router = Router::new(config)?;
    let mut settings = ClientSettings::new(config.hostname.clone(), &config.delivery)?;
    let cap = config.monitor.probe_timeout.0.min(Duration::from_secs(30));
    let t = &mut settings.timeouts;
    for d in [&mut t.connect, &mut t.greeting, &mut t.command] {
        *d = (*d).min(cap);
    }
    let domains = if domains.is_empty() { config.relay.domains.clone() } else { domains.to_vec() };
    let mut reports = Vec::new();
    for domain in domains {
        reports.push(check_domain(config, &router, &settings, &domain.to_ascii_lowercase()).await);
    }
    Ok(reports)
}

async fn check_domain(config: &Config, router: &Router, settings: &ClientSettings, domain: &str) -> Report {
    let mut report = Report { domain: domain.to_string(), findings: Vec::new() };
    let me = &config.hostname;
    let mut hosts = match router.mx_list(domain).await {
        Ok(Some(hosts)) => hosts,
        Ok(None) => {
            report.add(Level::Problem, format!(
                "{domain} has no MX records: senders deliver to its own address (implicit MX, RFC 5321 5.1) and never to bartleby; publish `{domain}. MX 10 <primary>.` and `{domain}. MX 20 {me}.`"
            ));
            return report;
        }
        Err(RouteError::NxDomain(_)) => {
            report.add(Level::Problem, format!("{domain} does not exist in DNS (NXDOMAIN)"));
            return report;
        }
        Err(e) => {
            report.add(Level::Problem, format!("cannot use the MX records of {domain}: {e}"));
            return report;
        }
    };
    hosts.sort_by(|a, b| a.preference.cmp(&b.preference).then_with(|| a.name.cmp(&b.name)));
    for host in &hosts {
        record_line(&mut report, router, host);
    }
    let ours: Vec<&MxHost> = hosts.iter().filter(|h| router.is_me(h)).collect();
    let Some(best_ours) = ours.iter().map(|h| h.preference).min() else {
        report.add(Level::Problem, format!(
            "bartleby ({me}) is not in the MX list: senders will never hand it mail while the primary is down; add `{domain}. MX 20 {me}.` (or name bartleby's MX host in relay.also_me)"
        ));
        return report;
    };
    identity_findings(&mut report, router, &ours);
    mta_sts_findings(&mut report, router, &Fetcher::new(settings, &config.delivery), domain, &ours).await;
    tlsa_findings(&mut report, router, config, &ours).await;
    let primaries: Vec<&MxHost> = hosts.iter().filter(|h| h.preference < best_ours && !router.is_me(h)).collect();
    for tie in hosts.iter().filter(|h| h.preference == best_ours && !router.is_me(h)) {
        report.add(Level::Warning, format!(
            "MX {} {} has the same preference as bartleby: bartleby never delivers to it, only to more preferred hosts",
            tie.preference, tie.name
        ));
    }
    if primaries.is_empty() {
        report.add(Level::Problem, format!(
            "bartleby is the most preferred MX (preference {best_ours}): senders hand their mail to bartleby first, and it has no primary to pass it to; give the primary a lower preference number than {best_ours}"
        ));
        return report;
    }
    let names: Vec<String> = primaries.iter().map(|h| format!("{} ({})", h.name, h.preference)).collect();
    report.add(Level::Ok, format!("a primary is more preferred than bartleby ({best_ours}): {}", names.join(", ")));
    probe_primaries(&mut report, settings, config.delivery.mx_port, &primaries).await;
    if let Some(route) = config.routes.get(domain) {
        report.add(
            Level::Warning,
            format!("bartleby delivers {domain} through the static route {route}, not through these MX records"),
        );
    }
    report
}

/// `MX 10 primary.example.test -> 192.0.2.1`, or a problem when the name does not resolve.
fn record_line(report: &mut Report, router: &Router, host: &MxHost) {
    let tag = if router.is_me(host) { " (bartleby)" } else { "" };
    if host.addrs.is_empty() {
        report.add(
            Level::Problem,
            format!(
                "MX {} {}{tag}: the name does not resolve to any address, so senders cannot use it",
                host.preference, host.name
            ),
        );
    } else {
        let addrs: Vec<String> = host.addrs.iter().map(|a| a.to_string()).collect();
        report.add(Level::Ok, format!("MX {} {} -> {}{tag}", host.preference, host.name, addrs.join(", ")));
    }
}

/// Is bartleby listed under a name that resolves to one of its own addresses?
fn identity_findings(report: &mut Report, router: &Router, ours: &[&MxHost]) {
    let by_address =
        |h: &MxHost| router.is_me(&MxHost { preference: h.preference, name: String::new(), addrs: h.addrs.clone() });
    if let Some(h) = ours.iter().find(|h| by_address(h)) {
        report.add(
            Level::Ok,
            format!(
                "bartleby is listed as {} (preference {}), which resolves to an address it listens on",
                h.name, h.preference
            ),
        );
        return;
    }
    for h in ours.iter().filter(|h| !h.addrs.is_empty()) {
        let addrs: Vec<String> = h.addrs.iter().map(|a| a.to_string()).collect();
        report.add(Level::Warning, format!(
            "{} is bartleby by name, but resolves to {}, which bartleby does not listen on (right only behind NAT or a port forward)",
            h.name,
            addrs.join(", ")
        ));
    }
}

/// RFC 8461 4.1: a sender that enforces the domain's MTA-STS policy delivers only to MX hosts its
/// `mx:` lines list, so a backup left out never gets mail while the primary is down.
async fn mta_sts_findings(report: &mut Report, router: &Router, fetcher: &Fetcher, domain: &str, ours: &[&MxHost]) {
    match mta_sts::current_id(domain, router).await {
        Ok(None) => return report.add(Level::Ok, format!("{domain} publishes no MTA-STS policy")),
        Ok(Some(_)) => {}
        Err(e) => return report.add(Level::Warning, format!("cannot look up the MTA-STS record of {domain}: {e}")),
    }
    let policy = match mta_sts::fetch_policy(domain, router, fetcher).await {
        Ok(policy) => policy,
        Err(e) => {
            return report.add(Level::Warning, format!(
                "{domain} has an MTA-STS record, but its policy cannot be fetched: {e} (senders that cached it keep enforcing it)"
            ));
        }
    };
    let mode = format!("{:?}", policy.mode).to_ascii_lowercase();
    let listed: Vec<&str> = ours.iter().filter(|h| policy.matches(&h.name)).map(|h| h.name.as_str()).collect();
    if let Some(name) = listed.first() {
        return report
            .add(Level::Ok, format!("the MTA-STS policy of {domain} (mode {mode}) lists bartleby's MX {name}"));
    }
    let names: Vec<&str> = ours.iter().map(|h| h.name.as_str()).collect();
    let consequence = match policy.mode {
        Mode::Enforce => "senders that enforce it will not fall back to bartleby while the primary is down",
        Mode::Testing => "senders report it now and will not fall back to bartleby once the mode is enforce",
        Mode::None => "harmless while the mode is none",
    };
    report.add(Level::Warning, format!(
        "the MTA-STS policy of {domain} (mode {mode}, mx {}) does not list bartleby's MX {}: {consequence}; add `mx: {}` to the policy",
        policy.mx.join(", "),
        names.join(", "),
        names.first().copied().unwrap_or("<this host>")
    ));
}

/// RFC 7672: senders that use DANE check the backup's certificate against the TLSA records of its
/// name; records that match no certificate it serves make them refuse it.
async fn tlsa_findings(report: &mut Report, router: &Router, config: &Config, ours: &[&MxHost]) {
    for host in ours {
        let name = format!("_25._tcp.{}", host.name);
        let records = match router.tlsa(&name).await {
            Ok(records) if records.is_empty() => {
                report.add(Level::Ok, format!("{name} has no TLSA records (DANE not published for bartleby)"));
                continue;
            }
            Ok(records) => records,
            Err(e) => {
                report.add(Level::Warning, format!("cannot look up the TLSA records of {name}: {e}"));
                continue;
            }
        };
        let usable: Vec<_> = records.iter().filter(|r| r.usable()).collect();
        if usable.is_empty() {
            report.add(Level::Warning, format!(
                "{name} has TLSA records, but none usable for SMTP (RFC 7672 3.1.3 wants usage 2 or 3, selector 0 or 1, matching 0 to 2)"
            ));
            continue;
        }
        let Some(chain) = served_chain(config) else {
            report.add(Level::Problem, format!(
                "{name} has TLSA records, but bartleby has no readable certificate (smtp.tls_cert): DANE senders will not deliver to it"
            ));
            continue;
        };
        match usable.iter().find(|r| r.matches(&chain)) {
            Some(record) => report.add(Level::Ok, format!("{name} TLSA {record} matches smtp.tls_cert")),
            None => report.add(Level::Problem, format!(
                "no TLSA record of {name} matches the certificate in smtp.tls_cert: DANE senders will refuse to deliver to bartleby (publish one for the current key, e.g. `3 1 1 <SHA-256 of its SubjectPublicKeyInfo>`)"
            )),
        }
    }
}

/// The certificate chain bartleby serves, end entity first; None without a readable one.
fn served_chain(config: &Config) -> Option<Vec<rustls_pki_types::CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    let path = config.smtp.tls_cert.as_ref()?;
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(path).ok()?.filter_map(Result::ok).collect();
    (!chain.is_empty()).then_some(chain)
}

/// Greeting, EHLO and QUIT with every address of the primaries.
async fn probe_primaries(report: &mut Report, settings: &ClientSettings, port: u16, primaries: &[&MxHost]) {
    for host in primaries {
        for ip in &host.addrs {
            let hop = NextHop {
                host: host.name.clone(),
                addr: SocketAddr::new(*ip, port),
                preference: Some(host.preference),
            };
            let result = probe::probe_hops(std::slice::from_ref(&hop), settings).await;
            let target = format!("{} [{}]:{port}", host.name, ip);
            if result.up {
                let ms = result.latency.map(|l| l.as_millis()).unwrap_or(0);
                report.add(Level::Ok, format!("primary {target} answers SMTP ({ms} ms)"));
            } else {
                report.add(
                    Level::Warning,
                    format!(
                        "primary {target} does not answer SMTP: {} (mail waits in bartleby's queue until it does)",
                        result.error.as_deref().unwrap_or("no answer")
                    ),
                );
            }
        }
    }
}

/// The reports as the command prints them.
pub fn render(reports: &[Report]) -> String {
    let mut out = String::new();
    for report in reports {
        let _ = writeln!(out, "{}:", report.domain);
        for f in &report.findings {
            let word = match f.level {
                Level::Ok => "ok",
                Level::Warning => "warning",
                Level::Problem => "PROBLEM",
            };
            let _ = writeln!(out, "  {word:<8} {}", f.text);
        }
        let verdict = if report.has_problems() {
            "WRONG for a backup MX: see the PROBLEM lines"
        } else {
            "right for a backup MX"
        };
        let _ = writeln!(out, "  => {} records are {verdict}\n", report.domain);
    }
    out
}

/// The daemon's check at start: logs what is wrong, never stops the start. Domains with a static
/// route are left to `bartleby check-dns` (their mail does not follow the MX records).
pub async fn log_at_start(config: std::sync::Arc<Config>) {
    let domains: Vec<String> =
        config.relay.domains.iter().filter(|d| !config.routes.contains_key(*d)).cloned().collect();
    if domains.is_empty() {
        return;
    }
    let limit = Duration::from_secs(120);
    let reports = match tokio::time::timeout(limit, check(&config, &domains)).await {
        Ok(Ok(reports)) => reports,
        Ok(Err(err)) => return tracing::warn!(error = %err, "DNS check at start failed"),
        Err(_) => return tracing::warn!("DNS check at start took longer than {}", HumanDuration(limit)),
    };
    for report in reports {
        for f in &report.findings {
            match f.level {
                Level::Ok => tracing::debug!(domain = %report.domain, "check-dns: {}", f.text),
                Level::Warning | Level::Problem => tracing::warn!(domain = %report.domain, "check-dns: {}", f.text),
            }
        }
    }
}

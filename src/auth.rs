//! Who may get a bounce: SPF (RFC 7208) and DKIM (RFC 6376) verdicts on a message's sender, taken
//! at accept time while the client's IP address is known, with the mail-auth crate.
//!
//! A backup MX that accepts mail it later cannot deliver must not send the failure notice to a
//! forged sender (backscatter). The verdict is stored in the envelope ([`SenderAuth`]); when the
//! scheduler is about to queue a failure notice it asks [`may_bounce`].

use crate::config::{BounceUnverified, Config};
use crate::spool::{SenderAuth, SpfVerdict};
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, SpfResult, spf::verify::SpfParameters};
use std::net::IpAddr;
use std::time::Duration;

/// The DKIM check reads at most this much of a message: a larger one is judged by SPF alone.
pub const DKIM_MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// A sender check never holds the client longer than this; a slow DNS gives `temperror`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors building the checker.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("DNS resolver for sender checks: {0}")]
    Resolver(String),
}

/// Checks senders; one per daemon.
pub struct SenderCheck {
    authenticator: MessageAuthenticator,
    hostname: String,
}

impl SenderCheck {
    /// Uses `dns.nameservers` when set, otherwise the system's resolver configuration.
    pub fn new(config: &Config) -> Result<SenderCheck, AuthError> {
        let mut options = ResolverOpts::default();
        options.timeout = config.delivery.dns_timeout.0;
        options.attempts = 2;
        let authenticator = if config.dns.nameservers.is_empty() {
            MessageAuthenticator::new_system_conf()
        } else {
            let servers = config.dns.nameservers.iter().map(|ns| name_server(*ns)).collect();
            MessageAuthenticator::new(ResolverConfig::from_name_servers(servers), options)
        }
        .map_err(|e| AuthError::Resolver(e.to_string()))?;
        Ok(SenderCheck { authenticator, hostname: config.hostname.clone() })
    }

    /// SPF for `sender` (or the HELO name for the null sender) from `ip`, and DKIM over `message`
    /// (the whole message as received, or None when it was too large to keep).
    pub async fn check(&self, ip: IpAddr, helo: &str, sender: &str, message: Option<&[u8]>) -> SenderAuth {
        let work = async {
            let spf = self.spf(ip, helo, sender).await;
            let (dkim_aligned, dkim_domain) = match message {
                Some(bytes) => self.dkim(bytes).await,
                None => (false, None),
            };
            SenderAuth { spf, dkim_aligned, dkim_domain }
        };
        match tokio::time::timeout(CHECK_TIMEOUT, work).await {
            Ok(verdict) => verdict,
            Err(_) => SenderAuth { spf: SpfVerdict::Temperror, dkim_aligned: false, dkim_domain: None },
        }
    }

    async fn spf(&self, ip: IpAddr, helo: &str, sender: &str) -> SpfVerdict {
        // RFC 7208 2.4: with the null sender the HELO identity is checked, as postmaster@helo.
        let params = if sender.is_empty() {
            SpfParameters::verify_ehlo(ip, helo, &self.hostname)
        } else {
            SpfParameters::verify_mail_from(ip, helo, &self.hostname, sender)
        };
        let output = self.authenticator.verify_spf(mail_auth::Parameters::new(params)).await;
        spf_verdict(output.result())
    }

    /// Is there a valid DKIM signature whose domain is aligned with the From domain?
    async fn dkim(&self, message: &[u8]) -> (bool, Option<String>) {
        let Some(parsed) = AuthenticatedMessage::parse(message) else { return (false, None) };
        let from_domain = crate::spool::domain_of(parsed.from());
        if from_domain.is_empty() {
            return (false, None);
        }
        let outputs = self.authenticator.verify_dkim(mail_auth::Parameters::new(&parsed)).await;
        for output in &outputs {
            if output.result() != &DkimResult::Pass {
                continue;
            }
            if let Some(signature) = output.signature()
                && aligned(&signature.d, &from_domain)
            {
                return (true, Some(signature.d.to_ascii_lowercase()));
            }
        }
        (false, None)
    }
}

fn name_server(addr: std::net::SocketAddr) -> NameServerConfig {
    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
    for connection in &mut server.connections {
        connection.port = addr.port();
    }
    server
}

/// Relaxed alignment (RFC 7489 3.1.1) without the public suffix list: the signing domain is the From
/// domain or a parent of it with at least two labels.
pub fn aligned(signing: &str, from: &str) -> bool {
    let signing = signing.trim_end_matches('.').to_ascii_lowercase();
    let from = from.trim_end_matches('.').to_ascii_lowercase();
    if signing.is_empty() || !signing.contains('.') {
        return false;
    }
    from == signing || from.ends_with(&format!(".{signing}"))
}

fn spf_verdict(result: SpfResult) -> SpfVerdict {
    match result {
        SpfResult::Pass => SpfVerdict::Pass,
        SpfResult::Fail => SpfVerdict::Fail,
        SpfResult::SoftFail => SpfVerdict::Softfail,
        SpfResult::Neutral => SpfVerdict::Neutral,
        SpfResult::TempError => SpfVerdict::Temperror,
        SpfResult::PermError => SpfVerdict::Permerror,
        SpfResult::None => SpfVerdict::None,
    }
}

/// May a failure notice go to this message's sender? Yes when SPF passed or an aligned DKIM
/// signature verified; no when SPF failed or soft-failed without one; otherwise (none, neutral,
/// errors) as `smtp.bounce_unverified` says. Messages never checked (older spools, checks off) keep
/// the old behaviour: the notice is sent.
pub fn may_bounce(auth: Option<&SenderAuth>, unverified: BounceUnverified) -> bool {
    let Some(auth) = auth else { return true };
    if auth.dkim_aligned || auth.spf == SpfVerdict::Pass {
        return true;
    }
    match auth.spf {
        SpfVerdict::Fail | SpfVerdict::Softfail => false,
        _ => unverified == BounceUnverified::Send,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(spf: SpfVerdict, dkim_aligned: bool) -> SenderAuth {
        SenderAuth { spf, dkim_aligned, dkim_domain: None }
    }

    #[test]
    fn bounce_decision() {
        let send = BounceUnverified::Send;
        let hold = BounceUnverified::Hold;
        assert!(may_bounce(None, hold));
        assert!(may_bounce(Some(&auth(SpfVerdict::Pass, false)), hold));
        assert!(!may_bounce(Some(&auth(SpfVerdict::Fail, false)), send));
        assert!(!may_bounce(Some(&auth(SpfVerdict::Softfail, false)), send));
        assert!(may_bounce(Some(&auth(SpfVerdict::Fail, true)), hold));
        assert!(may_bounce(Some(&auth(SpfVerdict::None, false)), send));
        assert!(!may_bounce(Some(&auth(SpfVerdict::Neutral, false)), hold));
        assert!(may_bounce(Some(&auth(SpfVerdict::Temperror, false)), send));
    }

    #[test]
    fn alignment_is_relaxed() {
        assert!(aligned("example.org", "example.org"));
        assert!(aligned("Example.ORG.", "mail.example.org"));
        assert!(!aligned("example.org", "badexample.org"));
        assert!(!aligned("mail.example.org", "example.org"));
        assert!(!aligned("org", "example.org"));
    }
}

//! The configuration file: TOML, validated at start.
//!
//! The key names under `hostname`, `[smtp]`, `[relay]`, `[dns]`, `[queue]`, `[routes]`, `[domain."..."]`
//! (with `recipients_ldap`, config/ldap.rs) and `[web]`, and `delivery.source_address`, are a public
//! contract: tools outside the project write them. New settings go beside them.
//! Every problem is reported as one line naming the file, the key and what is wrong.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

mod ldap;
pub use ldap::{LdapSource, LdapUrl, read_ca_file, read_password};

/// The whole, validated configuration of one bartleby instance.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Our name: in the greeting, in Received headers, and how we recognise ourselves in MX lists.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Started as root, bartleby binds its ports and then becomes this user (and `group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub smtp: SmtpConfig,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    /// Static next hops that override MX, like Postfix's transport maps: domain -> "host:port".
    #[serde(default)]
    pub routes: BTreeMap<String, Route>,
    /// Per-domain delivery policy, keyed by domain.
    #[serde(default)]
    pub domain: BTreeMap<String, DomainConfig>,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub web: WebConfig,
    /// Probes of the primaries, alert rules and channels, and other services to watch.
    #[serde(default)]
    pub monitor: MonitorConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Addresses the SMTP listener binds; one or more.
    pub listen: Vec<SocketAddr>,
    /// Largest message accepted, in bytes; announced in the EHLO SIZE keyword.
    pub max_message_size: u64,
    /// With `tls_key`, STARTTLS is offered (RFC 3207).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Recipients per message; beyond it RCPT gets 452 4.5.3 (RFC 5321 4.5.3.1.8 asks for at least 100).
    pub max_recipients: usize,
    /// Longest text line in DATA, in octets without CRLF (RFC 5321 4.5.3.1.6 says 1000; real mail is longer).
    pub max_line_length: usize,
    /// Concurrent SMTP sessions; beyond it a stalled session makes room (`overload_timeout`), or
    /// new connections get 421 4.3.2.
    pub max_sessions: usize,
    /// Received headers a message may carry before it is refused as a mail loop (RFC 5321 6.3).
    pub max_received_headers: usize,
    /// Time to wait for the next read of a command (RFC 5321 4.5.3.2.7: at least 5 minutes).
    pub command_timeout: HumanDuration,
    /// Time to wait for the next read of message data (RFC 5321 4.5.3.2.7).
    pub data_timeout: HumanDuration,
    /// Time for a whole command line, from our previous reply to its CRLF, however it trickles in
    /// (RFC 5321 4.5.3.2.7 bounds the wait for the next command, not each read).
    pub command_deadline: HumanDuration,
    /// Time for the whole DATA phase, from 354 to the final dot, before `data_min_rate` extends it.
    pub data_deadline: HumanDuration,
    /// Octets per second that extend `data_deadline` (Postfix's smtpd_min_data_rate): a message of
    /// N octets may take `data_deadline + N / data_min_rate`. 0: `data_deadline` is a fixed bound.
    pub data_min_rate: u64,
    /// When `max_sessions` is reached, a new client takes the place of the session that has been
    /// behind its deadlines longest, if that is at least this long (Postfix's stress-mode
    /// smtpd_timeout of 10s); otherwise the new client gets 421 4.3.2.
    pub overload_timeout: HumanDuration,
    /// Wait this long before the 220 greeting, to catch clients that talk first (Postfix postscreen's
    /// pregreet test); 0s: greet at once.
    pub pregreet_delay: HumanDuration,
    /// What happens to a client that talked before the greeting: `reject` (554 5.5.1, closed) or `log`.
    pub pregreet_action: PregreetAction,
    /// Clients (CIDR) allowed to start a queue run with ETRN (RFC 1985); empty: nobody.
    pub etrn_allow: Vec<Cidr>,
    /// Load balancers (CIDR) in front of this node: a connection from one of them must start with a
    /// PROXY protocol header (v1 or v2, HAProxy's proxy-protocol.txt), and the client it names is
    /// the session's client for limits, SPF, the Received header and the logs. A header from any
    /// other address is never trusted. Empty (the default): no PROXY protocol.
    pub proxy_from: Vec<Cidr>,
    /// Concurrent SMTP sessions from one client IP address; beyond it new connections get 421 4.7.0.
    pub max_sessions_per_ip: usize,
    /// Messages (MAIL commands) one client IP may start per minute; beyond it MAIL gets 452 4.7.0.
    pub max_messages_per_ip_per_minute: u32,
    /// Recipients one client IP may give per minute; beyond it RCPT gets 452 4.7.0.
    pub max_recipients_per_ip_per_minute: u32,
    /// Error replies in one session before it is closed with 421 4.7.0 (Postfix's
    /// smtpd_hard_error_limit).
    pub max_errors: usize,
    /// Largest header section, in octets; a message with more gets 552 5.3.4 (Postfix's
    /// header_size_limit).
    pub max_header_size: u64,
    /// Check the sender with SPF and DKIM at accept time (see `docs/security.md`); the verdict decides
    /// later whether a failure notice may be sent.
    pub sender_auth: bool,
    /// What to do with a failure notice when the sender's SPF result is none or neutral and no aligned
    /// DKIM signature passed: `send` (the default) or `hold`.
    pub bounce_unverified: BounceUnverified,
    /// Callouts to primaries in one minute, over all domains; beyond it unknown recipients get the
    /// domain's unknown-recipient policy.
    pub callouts_per_minute: u32,
    /// How long a primary's yes to a callout is remembered.
    pub callout_positive_ttl: HumanDuration,
    /// How long a primary's no to a callout is remembered.
    pub callout_negative_ttl: HumanDuration,
    /// How long a callout may take in total (the client waits for its RCPT reply meanwhile).
    pub callout_timeout: HumanDuration,
}

/// Failure notices to senders whose SPF said nothing either way (none, neutral, errors).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BounceUnverified {
    /// Send the notice.
    #[default]
    Send,
    /// Keep the failed message held and counted instead, like an SPF failure.
    Hold,
}

/// What happens to a client that sends before the greeting (see `smtp.pregreet_delay`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PregreetAction {
    /// 554 5.5.1 instead of the greeting, and the connection is closed.
    #[default]
    Reject,
    /// Log it and serve the client as usual (what it sent early is read as its first commands).
    Log,
}

/// What happens at RCPT to an address bartleby cannot vouch for (issue 6; `docs/security.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownPolicy {
    /// 451 4.4.3: the sender retries, and by then the primary may answer a callout.
    #[default]
    Tempfail,
    /// Accept and relay later; the primary decides.
    Accept,
    /// Accept, but keep the message held for the operator to review.
    Hold,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// The domains we are backup MX for; RCPT to any other domain gets 550 5.7.1.
    pub domains: Vec<String>,
    /// Other names of this host, recognised in MX lists besides `hostname`.
    pub also_me: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers to ask; empty means the system resolver (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// The spool directory; created 0700 if missing.
    pub dir: PathBuf,
    /// How often every deferred message is tried, like sendmail -q30m; also the longest backoff.
    pub retry_interval: HumanDuration,
    /// The first retry after a deferral; the backoff doubles from here up to `retry_interval`.
    pub first_retry: HumanDuration,
    /// After this, undeliverable mail is returned to its sender.
    pub max_lifetime: HumanDuration,
    /// After this, one delay notice is sent (RFC 3464 action=delayed).
    pub warn_after: HumanDuration,
    /// Bytes free on the spool's filesystem below which new mail gets 452 4.3.1.
    pub min_free: u64,
    /// Where the queue is kept: `local` (the journal and files under `dir`, the default) or
    /// `postgres` (one queue shared by several nodes, docs/cluster.md). A public contract.
    pub store: StoreKind,
    /// The PostgreSQL store's connection URL (`postgres://user:password@host:port/db`, with
    /// `sslmode=require` for TLS). A public contract.
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "serialize_url")]
    pub url: Option<String>,
    /// A file holding the PostgreSQL password (first line), instead of one in `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// CA certificates (PEM) for the PostgreSQL server's certificate, beside the web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// This node's name in a shared store; unset: generated once and kept in `dir/node-id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// How long a node's claim on a message (or on a `strict_order` domain) lasts without a
    /// heartbeat: after a node dies, the others deliver its mail within this time.
    pub lease: HumanDuration,
    /// How long a commit may take before the client gets 451 4.3.0 (the database unreachable
    /// or too slow); also the bound of every other query of the shared store.
    pub db_timeout: HumanDuration,
}

/// `queue.url` as `check-config` shows it: a password in it is masked.
fn serialize_url<S: serde::Serializer>(url: &Option<String>, serializer: S) -> Result<S::Ok, S::Error> {
    let masked = url.as_deref().map(mask_url_password);
    masked.serialize(serializer)
}

/// `postgres://user:secret@host/db` as `postgres://user:********@host/db`.
pub fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, tail) = rest.split_once('/').map_or((rest, None), |(a, t)| (a, Some(t)));
    let masked = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:********@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    match tail {
        Some(tail) => format!("{scheme}://{masked}/{tail}"),
        None => format!("{scheme}://{masked}"),
    }
}

/// The kinds of queue store (`queue.store`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The write-ahead journal and files under `queue.dir`.
    #[default]
    Local,
    /// PostgreSQL, shared by every node configured with the same `queue.url`.
    Postgres,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DomainConfig {
    /// The primary receives this domain's mail in exactly the order bartleby accepted it.
    pub strict_order: bool,
    /// Insist on STARTTLS with a verified certificate chain and name when delivering.
    pub require_tls: bool,
    /// A file of valid recipients: one address, `@domain` (every address of the domain) or pattern
    /// with `*` per line, `#` comments. Reloaded when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients_file: Option<PathBuf>,
    /// Ask the primary about unknown recipients (`MAIL FROM:<>`, `RCPT TO`, `RSET`) and cache its answers.
    pub callout: bool,
    /// Ask the site's directory (LDAP, e.g. Active Directory) about every recipient not in the
    /// list, and cache its answers for when it cannot be reached (issue 15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients_ldap: Option<LdapSource>,
    /// What unknown recipients get while neither the directory nor the primary can answer:
    /// `tempfail` (451 4.4.3, the default), `accept` or `hold`. Applies only when
    /// `recipients_file`, `recipients_ldap` or `callout` is set.
    pub unknown_recipient: UnknownPolicy,
    /// MTA-STS (RFC 8461) toward this domain's MX hosts; unset: `delivery.mta_sts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mta_sts: Option<Switch>,
    /// DANE (RFC 7672) toward this domain's MX hosts; unset: `delivery.dane`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dane: Option<Switch>,
}

/// A TLS policy mechanism turned `"off"` or `"on"`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    #[default]
    Off,
    On,
}

impl DomainConfig {
    /// Does bartleby check recipients of this domain at all? Without a list, a directory or
    /// callouts every address of a relay domain is accepted, as before.
    pub fn verifies_recipients(&self) -> bool {
        self.recipients_file.is_some() || self.recipients_ldap.is_some() || self.callout
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Parallel connections to one destination.
    pub max_connections_per_destination: usize,
    /// Port used for hosts found through MX records (routes carry their own).
    pub mx_port: u16,
    /// RFC 5321 4.5.3.2 client timeouts.
    pub connect_timeout: HumanDuration,
    pub greeting_timeout: HumanDuration,
    pub command_timeout: HumanDuration,
    pub data_init_timeout: HumanDuration,
    pub data_block_timeout: HumanDuration,
    pub data_done_timeout: HumanDuration,
    /// Extra trust anchors (PEM) besides the Web PKI roots, for verified outbound TLS: domains with
    /// `require_tls`, REQUIRETLS messages, MTA-STS (the policy's HTTPS server and the MX hosts).
    pub tls_ca_file: Option<PathBuf>,
    /// MTA-STS (RFC 8461) for every domain delivered through MX records, unless its `[domain]`
    /// section says otherwise: `"on"` fetches and honours the policies that domains publish.
    pub mta_sts: Switch,
    /// The port policies are fetched from (RFC 8461 3.3 says HTTPS, 443); another only for tests.
    pub mta_sts_port: u16,
    /// DANE (RFC 7672) for every domain delivered through MX records, unless its `[domain]` section
    /// says otherwise: `"on"` looks up DNSSEC-validated TLSA records of the MX hosts and insists on
    /// a certificate that matches them.
    pub dane: Switch,
    /// DNSKEY records (zone file syntax) that DNSSEC validation for DANE starts from; unset: the
    /// IANA root keys built into hickory (RFC 7672 2.1 needs a validating resolver).
    pub dnssec_trust_anchor: Option<PathBuf>,
    /// How long to wait for one DNS answer before asking again (two tries, then a temporary failure).
    pub dns_timeout: HumanDuration,
    /// The local addresses outbound connections are made from, at most one IPv4 and one IPv6 (like
    /// Postfix's smtp_bind_address and smtp_bind_address6), so the primary's SPF and PTR checks
    /// see the address published for the backup. Unset for a family: the system chooses.
    #[serde(skip_serializing_if = "SourceAddress::is_empty")]
    pub source_address: SourceAddress,
}

/// `delivery.source_address`: one address (`"192.0.2.25"`) or a list with at most one per family
/// (`["192.0.2.25", "2001:db8::25"]`); written back as a list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceAddress {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl SourceAddress {
    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }

    /// The address to bind before connecting to `peer`: the one of its family, if set.
    pub fn for_peer(&self, peer: IpAddr) -> Option<IpAddr> {
        match peer {
            IpAddr::V4(_) => self.v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.v6.map(IpAddr::V6),
        }
    }

    /// Every address set, IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.v4.map(IpAddr::V4).into_iter().chain(self.v6.map(IpAddr::V6)).collect()
    }

    /// Builds it from addresses as written, refusing what cannot be a source address.
    fn from_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<SourceAddress, String> {
        let mut source = SourceAddress::default();
        for text in texts {
            let ip: IpAddr = text.trim().parse().map_err(|_| format!("{text:?} is not an IP address"))?;
            if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
                return Err(format!("{ip} cannot be a source address"));
            }
            let taken = match ip {
                IpAddr::V4(v4) => source.v4.replace(v4).is_some(),
                IpAddr::V6(v6) => source.v6.replace(v6).is_some(),
            };
            if taken {
                return Err("at most one IPv4 and one IPv6 address".into());
            }
        }
        Ok(source)
    }
}

impl Serialize for SourceAddress {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let texts: Vec<String> = self.addresses().iter().map(IpAddr::to_string).collect();
        texts.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SourceAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = SourceAddress;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an IP address or a list of at most one IPv4 and one IPv6 address")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<SourceAddress, E> {
                SourceAddress::from_texts([text]).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<SourceAddress, A::Error> {
                let mut texts = Vec::new();
                while let Some(text) = seq.next_element::<String>()? {
                    texts.push(text);
                }
                SourceAddress::from_texts(texts.iter().map(String::as_str)).map_err(serde::de::Error::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Where the admin page and the JSON API listen.
    pub listen: SocketAddr,
    /// Peer addresses allowed to use the admin page (CIDR); everyone else gets 403.
    pub allow: Vec<Cidr>,
    /// Accounts: user name -> argon2 PHC hash (`bartleby hash-password` makes one). When set, every
    /// visitor logs in; empty, see `trust_allowed_hosts`.
    pub users: BTreeMap<String, String>,
    /// Without `users`, may every peer in `allow` use the page without logging in? False by default:
    /// the page is then locked (403), because with `allow = 127.0.0.0/8` "every peer" means every
    /// local account of the machine, and the page can flush, hold and delete mail. Ignored when
    /// `users` is set.
    pub trust_allowed_hosts: bool,
    /// The names the page answers to, in the Host header (any port), against DNS rebinding. None:
    /// `localhost` and `hostname`. IP literals of the listen address (any, when it is 0.0.0.0 or
    /// [::]) and of loopback are accepted besides these, because an IP literal cannot be rebound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostnames: Option<Vec<String>>,
    /// With `tls_key`, the page is served over HTTPS only.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Least time between two flushes; a flush inside it gets 429, so clicks cannot become a DoS.
    pub flush_cooldown: HumanDuration,
    /// Free space on the spool's filesystem, in percent, below which the disk bar turns amber.
    pub disk_warn_percent: u8,
    /// Free space, in percent, below which the disk bar turns red.
    pub disk_critical_percent: u8,
    /// How often the queue size is sampled for the 24-hour chart (each minute by default, so that a
    /// fresh outage shows).
    pub sample_interval: HumanDuration,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 25))],
            max_message_size: 50 * 1024 * 1024,
            tls_cert: None,
            tls_key: None,
            max_recipients: 100,
            max_line_length: 10_000,
            max_sessions: 500,
            max_received_headers: 50,
            command_timeout: HumanDuration::minutes(5),
            data_timeout: HumanDuration::minutes(10),
            command_deadline: HumanDuration::minutes(5),
            data_deadline: HumanDuration::minutes(10),
            data_min_rate: 500,
            overload_timeout: HumanDuration::seconds(10),
            pregreet_delay: HumanDuration::seconds(0),
            pregreet_action: PregreetAction::Reject,
            etrn_allow: Vec::new(),
            proxy_from: Vec::new(),
            max_sessions_per_ip: 20,
            max_messages_per_ip_per_minute: 120,
            max_recipients_per_ip_per_minute: 600,
            max_errors: 20,
            max_header_size: 1024 * 1024,
            sender_auth: true,
            bounce_unverified: BounceUnverified::Send,
            callouts_per_minute: 60,
            callout_positive_ttl: HumanDuration::hours(30 * 24),
            callout_negative_ttl: HumanDuration::hours(1),
            callout_timeout: HumanDuration::seconds(30),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            dir: PathBuf::from("/var/spool/bartleby"),
            retry_interval: HumanDuration::minutes(30),
            first_retry: HumanDuration::minutes(1),
            max_lifetime: HumanDuration::hours(5 * 24),
            warn_after: HumanDuration::hours(4),
            min_free: 100 * 1024 * 1024,
            store: StoreKind::Local,
            url: None,
            password_file: None,
            ca_file: None,
            node: None,
            lease: HumanDuration::minutes(2),
            db_timeout: HumanDuration(Duration::from_secs(20)),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            max_connections_per_destination: 10,
            mx_port: 25,
            connect_timeout: HumanDuration::seconds(30),
            greeting_timeout: HumanDuration::minutes(5),
            command_timeout: HumanDuration::minutes(5),
            data_init_timeout: HumanDuration::minutes(2),
            data_block_timeout: HumanDuration::minutes(3),
            data_done_timeout: HumanDuration::minutes(10),
            tls_ca_file: None,
            mta_sts: Switch::Off,
            mta_sts_port: 443,
            dane: Switch::Off,
            dnssec_trust_anchor: None,
            dns_timeout: HumanDuration::seconds(5),
            source_address: SourceAddress::default(),
        }
    }
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8025)),
            allow: vec![
                Cidr::from_str("127.0.0.0/8").expect("literal CIDR"),
                Cidr::from_str("::1/128").expect("literal CIDR"),
            ],
            users: BTreeMap::new(),
            trust_allowed_hosts: false,
            hostnames: None,
            tls_cert: None,
            tls_key: None,
            flush_cooldown: HumanDuration::seconds(60),
            disk_warn_percent: 20,
            disk_critical_percent: 10,
            sample_interval: HumanDuration::minutes(1),
        }
    }
}

impl WebConfig {
    /// The `[web]` checks; errors name the key as [`Config::parse`] reports them.
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: String| Err((key.to_string(), problem));
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("web.tls_cert", "tls_cert and tls_key must be set together".into());
        }
        for (key, path) in [("web.tls_cert", &self.tls_cert), ("web.tls_key", &self.tls_key)] {
            if let Some(path) = path
                && let Err(err) = std::fs::metadata(path)
            {
                return bad(key, format!("{}: {err}", path.display()));
            }
        }
        for (user, hash) in &self.users {
            if user.is_empty() || user.chars().any(|c| c.is_control() || c == ':') {
                return bad(&format!("web.users.{user}"), "not a usable user name".into());
            }
            let parsed = argon2::password_hash::PasswordHash::new(hash);
            if !parsed.is_ok_and(|h| h.algorithm.as_str().starts_with("argon2")) {
                return bad(
                    &format!("web.users.{user}"),
                    "not an argon2 hash (make one with `bartleby hash-password`)".into(),
                );
            }
        }
        for (i, name) in self.hostnames.iter().flatten().enumerate() {
            let literal = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
            if !is_domain_name(name) && literal.parse::<IpAddr>().is_err() {
                return bad(&format!("web.hostnames[{i}]"), format!("{name:?} is not a host name or IP address"));
            }
        }
        if self.disk_critical_percent > self.disk_warn_percent || self.disk_warn_percent > 100 {
            return bad("web.disk_warn_percent", "needs disk_critical_percent <= disk_warn_percent <= 100".into());
        }
        if self.sample_interval.0.as_secs() < 10 {
            return bad("web.sample_interval", "must be at least 10s".into());
        }
        Ok(())
    }
}

fn default_hostname() -> String {
    rustix::system::uname().nodename().to_str().ok().filter(|name| !name.is_empty()).unwrap_or("localhost").to_string()
}

/// What went wrong reading a configuration; `Display` is the one line an operator sees.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{file}: line {line}: key `{key}`: {problem}")]
    Parse { file: String, line: usize, key: String, problem: String },
    #[error("{file}: key `{key}`: {problem}")]
    Invalid { file: String, key: String, problem: String },
}

impl Config {
    /// Built-in settings for a first try on loopback: SMTP on 127.0.0.1:2525, the admin page on
    /// 127.0.0.1:8025, a spool in ./bartleby-spool, and a demo domain whose primary (127.0.0.1:2526)
    /// is not running, so mail waits in the queue as it would during an outage.
    pub fn demo() -> Config {
        let mut config = Config::default_for(PathBuf::from("bartleby-spool"));
        config.smtp.listen = vec![SocketAddr::from(([127, 0, 0, 1], 2525))];
        config.relay.domains = vec!["example.test".to_string()];
        config.routes.insert("example.test".to_string(), Route { host: "127.0.0.1".to_string(), port: 2526 });
        // A first try on loopback has no sender domains worth an SPF lookup on the internet.
        config.smtp.sender_auth = false;
        // A first try has no accounts and only test mail: the page opens without a login. The
        // packaged configuration leaves this false.
        config.web.trust_allowed_hosts = true;
        config
    }

    fn default_for(dir: PathBuf) -> Config {
        Config {
            hostname: default_hostname(),
            user: None,
            group: None,
            smtp: SmtpConfig::default(),
            relay: RelayConfig::default(),
            dns: DnsConfig::default(),
            queue: QueueConfig { dir, ..QueueConfig::default() },
            routes: BTreeMap::new(),
            domain: BTreeMap::new(),
            delivery: DeliveryConfig::default(),
            web: WebConfig::default(),
            monitor: MonitorConfig::default(),
        }
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        Config::parse(&text, &file)
    }

    /// Parses and validates configuration text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::new(text);
        let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let key = err.path().to_string();
            let inner = err.into_inner();
            let line = inner.span().map(|span| line_of(text, span.start)).unwrap_or(1);
            ConfigError::Parse { file: file.to_string(), line, key, problem: inner.message().to_string() }
        })?;
        config.case_duplicates().map_err(|(key, problem)| ConfigError::Invalid {
            file: file.to_string(),
            key,
            problem,
        })?;
        config.normalise();
        config.validate().map_err(|(key, problem)| ConfigError::Invalid { file: file.to_string(), key, problem })?;
        Ok(config)
    }

    /// Relayed domains, routes and `[domain]` tables that differ only in case (or a trailing dot)
    /// name one domain twice (RFC 5321 2.4): an error, since [`Config::normalise`] would keep one
    /// of two routes or policies silently.
    fn case_duplicates(&self) -> Result<(), (String, String)> {
        let lists: [(&str, Vec<&String>); 3] = [
            ("relay.domains", self.relay.domains.iter().collect()),
            ("routes", self.routes.keys().collect()),
            ("domain", self.domain.keys().collect()),
        ];
        for (key, names) in lists {
            let mut seen = std::collections::BTreeMap::new();
            for name in names {
                let folded = name.trim_end_matches('.').to_ascii_lowercase();
                if let Some(first) = seen.insert(folded, name)
                    && first != name
                {
                    return Err((
                        key.to_string(),
                        format!("{first:?} and {name:?} are the same domain (names compare without regard to case)"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Domain names compare case-insensitively (RFC 5321 2.4); store them in lower case once.
    fn normalise(&mut self) {
        self.hostname = self.hostname.trim_end_matches('.').to_ascii_lowercase();
        for domain in self.relay.domains.iter_mut().chain(self.relay.also_me.iter_mut()) {
            *domain = domain.trim_end_matches('.').to_ascii_lowercase();
        }
        for name in self.web.hostnames.iter_mut().flatten() {
            *name = name.trim_end_matches('.').to_ascii_lowercase();
        }
        self.routes = std::mem::take(&mut self.routes)
            .into_iter()
            .map(|(domain, route)| (domain.to_ascii_lowercase(), route))
            .collect();
        self.domain = std::mem::take(&mut self.domain)
            .into_iter()
            .map(|(domain, policy)| (domain.to_ascii_lowercase(), policy))
            .collect();
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: String| Err((key.to_string(), problem));
        if !is_domain_name(&self.hostname) {
            return bad("hostname", format!("{:?} is not a host name", self.hostname));
        }
        if self.smtp.listen.is_empty() {
            return bad("smtp.listen", "needs at least one address".into());
        }
        if self.smtp.tls_cert.is_some() != self.smtp.tls_key.is_some() {
            return bad("smtp.tls_cert", "tls_cert and tls_key must be set together".into());
        }
        for (key, path) in [("smtp.tls_cert", &self.smtp.tls_cert), ("smtp.tls_key", &self.smtp.tls_key)] {
            if let Some(path) = path
                && let Err(err) = std::fs::metadata(path)
            {
                return bad(key, format!("{}: {err}", path.display()));
            }
        }
        if self.smtp.max_message_size == 0 {
            return bad("smtp.max_message_size", "must be above 0".into());
        }
        if self.smtp.max_recipients == 0 {
            return bad("smtp.max_recipients", "must be above 0".into());
        }
        if self.smtp.max_line_length < 998 {
            return bad("smtp.max_line_length", "must be at least 998 (RFC 5322 2.1.1)".into());
        }
        if self.smtp.max_sessions == 0 {
            return bad("smtp.max_sessions", "must be above 0".into());
        }
        self.validate_limits()?;
        for (i, domain) in self.relay.domains.iter().enumerate() {
            if !is_domain_name(domain) {
                return bad(&format!("relay.domains[{i}]"), format!("{domain:?} is not a domain name"));
            }
        }
        for domain in self.routes.keys() {
            if !is_domain_name(domain) {
                return bad(&format!("routes.{domain}"), format!("{domain:?} is not a domain name"));
            }
        }
        if self.queue.dir.as_os_str().is_empty() {
            return bad("queue.dir", "must not be empty".into());
        }
        for (key, value) in [
            ("queue.retry_interval", self.queue.retry_interval),
            ("queue.first_retry", self.queue.first_retry),
            ("queue.max_lifetime", self.queue.max_lifetime),
        ] {
            if value.0.is_zero() {
                return bad(key, "must be longer than 0".into());
            }
        }
        self.validate_store()?;
        if self.delivery.max_connections_per_destination == 0 {
            return bad("delivery.max_connections_per_destination", "must be above 0".into());
        }
        if let Some(path) = &self.delivery.tls_ca_file
            && let Err(err) = std::fs::metadata(path)
        {
            return bad("delivery.tls_ca_file", format!("{}: {err}", path.display()));
        }
        if let Some(path) = &self.delivery.dnssec_trust_anchor
            && let Err(err) = std::fs::metadata(path)
        {
            return bad("delivery.dnssec_trust_anchor", format!("{}: {err}", path.display()));
        }
        if self.delivery.dns_timeout.0.is_zero() {
            return bad("delivery.dns_timeout", "must be longer than 0".into());
        }
        for ip in self.delivery.source_address.addresses() {
            // Binding is the test the kernel applies at every connection; ask it now, so a typo or
            // an address this host lacks stops check-config and the start, not each delivery.
            if let Err(err) = std::net::UdpSocket::bind((ip, 0)) {
                return bad("delivery.source_address", format!("{ip} is not an address of this host (bind: {err})"));
            }
        }
        self.monitor.validate(&self.routes)?;
        self.web.validate()
    }

    /// The names the admin page answers to (`web.hostnames`, or `localhost` and `hostname`), in
    /// lower case without a trailing dot; IP literals besides these are `web::host`'s business.
    pub fn web_hostnames(&self) -> Vec<String> {
        match &self.web.hostnames {
            Some(names) => names.clone(),
            None => vec!["localhost".to_string(), self.hostname.clone()],
        }
    }

    /// Is `domain` one we are backup MX for?
    pub fn is_relay_domain(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.');
        self.relay.domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// Is `domain` a destination of ours, with an up/down state: a relayed domain or a route? The
    /// senders' domains that receive our bounces are not.
    pub fn is_destination(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.');
        self.is_relay_domain(domain) || self.routes.keys().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// Is MTA-STS on for `domain` (its own setting, or `delivery.mta_sts`)?
    pub fn mta_sts(&self, domain: &str) -> bool {
        self.domain_policy(domain).mta_sts.unwrap_or(self.delivery.mta_sts) == Switch::On
    }

    /// Is DANE on for `domain` (its own setting, or `delivery.dane`)?
    pub fn dane(&self, domain: &str) -> bool {
        self.domain_policy(domain).dane.unwrap_or(self.delivery.dane) == Switch::On
    }

    /// The per-domain policy, or the defaults.
    pub fn domain_policy(&self, domain: &str) -> DomainConfig {
        self.domain.get(&domain.to_ascii_lowercase()).cloned().unwrap_or_default()
    }

    /// The effective settings as TOML, for `bartleby check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|err| format!("# cannot print settings: {err}\n"))
    }
}

impl Config {
    /// The abuse limits of `[smtp]` and the per-domain recipient settings (issue 6).
    /// The shared store's keys: a URL that parses, a node name that fits in the queue's tables.
    fn validate_store(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: String| Err((key.to_string(), problem));
        let queue = &self.queue;
        for (key, value) in [("queue.lease", queue.lease), ("queue.db_timeout", queue.db_timeout)] {
            if value.0 < Duration::from_secs(1) {
                return bad(key, "must be at least 1s".into());
            }
        }
        if let Some(node) = &queue.node
            && (node.is_empty() || node.len() > 64 || !node.bytes().all(|b| b.is_ascii_graphic()))
        {
            return bad("queue.node", format!("{node:?}: 1 to 64 printable characters without spaces"));
        }
        match (queue.store, &queue.url) {
            (StoreKind::Postgres, None) => {
                bad("queue.url", "store = \"postgres\" needs url = \"postgres://...\"".into())
            }
            (StoreKind::Postgres, Some(url)) => match url.parse::<tokio_postgres::Config>() {
                Ok(_) => Ok(()),
                Err(err) => bad("queue.url", format!("not a PostgreSQL URL: {err}")),
            },
            (StoreKind::Local, Some(_)) => bad("queue.url", "is only used with store = \"postgres\"".into()),
            (StoreKind::Local, None) => Ok(()),
        }
    }

    fn validate_limits(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: String| Err((key.to_string(), problem));
        let smtp = &self.smtp;
        for (key, value) in [
            ("smtp.max_sessions_per_ip", smtp.max_sessions_per_ip as u64),
            ("smtp.max_messages_per_ip_per_minute", u64::from(smtp.max_messages_per_ip_per_minute)),
            ("smtp.max_recipients_per_ip_per_minute", u64::from(smtp.max_recipients_per_ip_per_minute)),
            ("smtp.max_errors", smtp.max_errors as u64),
        ] {
            if value == 0 {
                return bad(key, "must be above 0".into());
            }
        }
        // RFC 5322 2.1.1 lines and a handful of headers must fit.
        if smtp.max_header_size < 4096 {
            return bad("smtp.max_header_size", "must be at least 4096".into());
        }
        if smtp.callout_timeout.0.is_zero() {
            return bad("smtp.callout_timeout", "must be longer than 0".into());
        }
        for (key, value) in [
            ("smtp.command_timeout", smtp.command_timeout),
            ("smtp.data_timeout", smtp.data_timeout),
            ("smtp.command_deadline", smtp.command_deadline),
            ("smtp.data_deadline", smtp.data_deadline),
        ] {
            if value.0.is_zero() {
                return bad(key, "must be longer than 0".into());
            }
        }
        for (domain, policy) in &self.domain {
            if let Some(path) = &policy.recipients_file
                && let Err(err) = std::fs::metadata(path)
            {
                return bad(&format!("domain.{domain}.recipients_file"), format!("{}: {err}", path.display()));
            }
            if let Some(source) = &policy.recipients_ldap {
                source.validate(&format!("domain.{domain}.recipients_ldap"))?;
            }
        }
        Ok(())
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).bytes().filter(|&b| b == b'\n').count() + 1
}

/// A syntactically valid DNS name (letters, digits, hyphens; labels of 1 to 63 octets).
pub fn is_domain_name(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A duration written the way operators write them: `90s`, `30m`, `4h`, `5d`, `1w`, or combined (`1h30m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn seconds(n: u64) -> Self {
        HumanDuration(Duration::from_secs(n))
    }
    pub const fn minutes(n: u64) -> Self {
        HumanDuration(Duration::from_secs(n * 60))
    }
    pub const fn hours(n: u64) -> Self {
        HumanDuration(Duration::from_secs(n * 3600))
    }
}

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || format!("{text:?} is not a duration (write e.g. 90s, 30m, 4h, 5d)");
        let text_trimmed = text.trim();
        if text_trimmed.is_empty() {
            return Err(invalid());
        }
        let mut total: u64 = 0;
        let mut number = String::new();
        for c in text_trimmed.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                'w' => 7 * 86_400,
                _ => return Err(invalid()),
            };
            let value: u64 = number.parse().map_err(|_| invalid())?;
            number.clear();
            total = value.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(invalid)?;
        }
        if !number.is_empty() {
            return Err(invalid());
        }
        Ok(HumanDuration(Duration::from_secs(total)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut secs = self.0.as_secs();
        if secs == 0 {
            return write!(f, "0s");
        }
        for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
            if secs >= size {
                write!(f, "{}{unit}", secs / size)?;
                secs %= size;
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A static next hop: `host:port` or `[ip]:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub host: String,
    pub port: u16,
}

impl FromStr for Route {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || format!("{text:?} is not host:port or [ip]:port");
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (ip, port) = rest.split_once("]:").ok_or_else(invalid)?;
            ip.parse::<IpAddr>().map_err(|_| invalid())?;
            (ip, port)
        } else {
            text.rsplit_once(':').ok_or_else(invalid)?
        };
        let port: u16 = port.parse().map_err(|_| invalid())?;
        if port == 0 || (host.parse::<IpAddr>().is_err() && !is_domain_name(host)) {
            return Err(invalid());
        }
        Ok(Route { host: host.to_ascii_lowercase(), port })
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl<'de> Deserialize<'de> for Route {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Route {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// An address block such as `127.0.0.1/32` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub network: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Does the block contain `addr`? IPv4-mapped IPv6 peers are matched as IPv4.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        match (self.network, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Is `addr` inside any block of `list`?
pub fn cidr_list_contains(list: &[Cidr], addr: IpAddr) -> bool {
    list.iter().any(|cidr| cidr.contains(addr))
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || format!("{text:?} is not an address block (write e.g. 192.0.2.0/24)");
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| invalid())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| invalid())?,
            None => max,
        };
        if prefix > max {
            return Err(invalid());
        }
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// `[monitor]`: probes of each relayed domain's next hops, alert rules with their thresholds, the
/// channels alerts go to, and other services to watch. A zero threshold (`0` or `"0s"`) turns its
/// rule off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// How often the primaries (and the `check` entries) are probed; `"0s"` turns probing off.
    pub probe_interval: HumanDuration,
    /// How long one probe may take (connect, greeting, EHLO, QUIT); at most the interval.
    pub probe_timeout: HumanDuration,
    /// Alert when a relayed domain's primary has been down this long.
    pub primary_down_after: HumanDuration,
    /// Alert when more messages than this are queued.
    pub queue_max_messages: usize,
    /// Alert when the oldest queued message is older than this.
    pub queue_max_age: HumanDuration,
    /// Alert when less than this percentage of the spool's filesystem is free.
    pub spool_min_free_percent: u8,
    /// Repeat an alert that is still firing this often; `"0s"`: tell once.
    pub reminder_interval: HumanDuration,
    /// Commands run with the alert as JSON on stdin (a pager script).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<CommandChannel>,
    /// URLs the alert JSON is POSTed to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhook: Vec<WebhookChannel>,
    /// Mailboxes the alert is mailed to through a smarthost.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub email: Vec<EmailChannel>,
    /// Other services on the network to watch, with the same rules and channels.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub check: Vec<CheckConfig>,
}

/// `[[monitor.command]]`: a program run for every alert, the alert JSON on its stdin.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CommandChannel {
    /// Program and arguments, run directly (no shell).
    pub argv: Vec<String>,
    /// Killed after this long.
    #[serde(default = "default_channel_timeout")]
    pub timeout: HumanDuration,
}

/// `[[monitor.webhook]]`: an HTTP POST of the alert JSON.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookChannel {
    /// `http://` or `https://` URL (https verifies the server against the Web PKI roots).
    pub url: String,
    #[serde(default = "default_channel_timeout")]
    pub timeout: HumanDuration,
}

/// `[[monitor.email]]`: a mail to administrators, through a smarthost, never the primary (which
/// may be the thing that is down).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EmailChannel {
    /// Recipients.
    pub to: Vec<String>,
    /// The envelope and header sender; default `bartleby@<hostname>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The relay that takes the alert: `host:port`.
    pub smarthost: Route,
    #[serde(default = "default_channel_timeout")]
    pub timeout: HumanDuration,
}

/// `[[monitor.check]]`: another service to watch.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// Shown in alerts and logs; unique.
    pub name: String,
    pub kind: CheckKind,
    /// `host:port` for `tcp` and `smtp`; a URL for `http`.
    pub target: String,
    /// The HTTP status a healthy `http` service answers.
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    /// Alert once the service has failed for this long (`"0s"`: at the first failure).
    #[serde(default)]
    pub down_after: HumanDuration,
    /// How long one check may take.
    #[serde(default = "default_channel_timeout")]
    pub timeout: HumanDuration,
}

/// What a `[[monitor.check]]` does.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection is accepted.
    Tcp,
    /// An HTTP GET answers `expect_status`.
    Http,
    /// An SMTP server greets with 220.
    Smtp,
}

impl Default for HumanDuration {
    fn default() -> Self {
        HumanDuration(Duration::ZERO)
    }
}

fn default_channel_timeout() -> HumanDuration {
    HumanDuration::seconds(30)
}

fn default_expect_status() -> u16 {
    200
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            probe_interval: HumanDuration::seconds(60),
            probe_timeout: HumanDuration::seconds(30),
            primary_down_after: HumanDuration::minutes(30),
            queue_max_messages: 10_000,
            queue_max_age: HumanDuration::hours(24),
            spool_min_free_percent: 10,
            reminder_interval: HumanDuration::hours(4),
            command: Vec::new(),
            webhook: Vec::new(),
            email: Vec::new(),
            check: Vec::new(),
        }
    }
}

impl MonitorConfig {
    fn validate(&self, routes: &BTreeMap<String, Route>) -> Result<(), (String, String)> {
        let bad = |key: String, problem: &str| Err((key, problem.to_string()));
        if self.spool_min_free_percent > 100 {
            return bad("monitor.spool_min_free_percent".into(), "must be at most 100");
        }
        if self.probe_timeout.0.is_zero() {
            return bad("monitor.probe_timeout".into(), "must be longer than 0");
        }
        for (i, c) in self.command.iter().enumerate() {
            if c.argv.first().is_none_or(|p| p.is_empty()) {
                return bad(format!("monitor.command[{i}].argv"), "needs a program");
            }
        }
        for (i, w) in self.webhook.iter().enumerate() {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return bad(format!("monitor.webhook[{i}].url"), "must start with http:// or https://");
            }
        }
        for (i, e) in self.email.iter().enumerate() {
            if e.to.is_empty() || e.to.iter().any(|a| !a.contains('@')) {
                return bad(format!("monitor.email[{i}].to"), "needs one or more addresses (user@domain)");
            }
            // The primary may be the thing that is down: alerts must not wait in its queue.
            if routes.values().any(|r| r == &e.smarthost) {
                return bad(format!("monitor.email[{i}].smarthost"), "must not be a primary (a route in [routes])");
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.check.iter().enumerate() {
            if c.name.is_empty() || !names.insert(c.name.as_str()) {
                return bad(format!("monitor.check[{i}].name"), "must be set and unique");
            }
            let ok = match c.kind {
                CheckKind::Http => c.target.starts_with("http://") || c.target.starts_with("https://"),
                CheckKind::Tcp | CheckKind::Smtp => c.target.parse::<Route>().is_ok(),
            };
            if !ok {
                return bad(format!("monitor.check[{i}].target"), "must be host:port (tcp, smtp) or a URL (http)");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT: &str = r#"
hostname = "backup.example.test"

[smtp]
listen = ["127.0.0.3:25"]
max_message_size = 52428800

[relay]
domains = ["Example.test"]

[dns]
nameservers = ["127.0.0.53:53"]

[queue]
dir = "/var/spool/bartleby"
retry_interval = "30m"
max_lifetime = "5d"
warn_after = "4h"
min_free = 104857600

[routes]
"example.org" = "127.0.0.2:2526"
"example.net" = "[::1]:2525"

[domain."example.test"]
strict_order = true
require_tls = false

[web]
listen = "127.0.0.1:8025"
allow = ["127.0.0.1/32", "::1/128"]
"#;

    #[test]
    fn the_public_contract_parses() {
        let config = Config::parse(CONTRACT, "t.toml").expect("valid");
        assert_eq!(config.hostname, "backup.example.test");
        assert_eq!(config.smtp.listen, vec!["127.0.0.3:25".parse().unwrap()]);
        assert!(config.is_relay_domain("EXAMPLE.TEST"));
        assert!(!config.is_relay_domain("example.org"));
        assert_eq!(config.queue.retry_interval.0, Duration::from_secs(1800));
        assert_eq!(config.queue.max_lifetime.0, Duration::from_secs(5 * 86400));
        assert_eq!(config.routes["example.org"], Route { host: "127.0.0.2".into(), port: 2526 });
        assert_eq!(config.routes["example.net"], Route { host: "::1".into(), port: 2525 });
        assert!(config.domain_policy("example.test").strict_order);
        assert!(!config.domain_policy("other.test").strict_order);
        assert_eq!(config.dns.nameservers.len(), 1);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = Config::parse("[smtp]\nlisten = [\"127.0.0.1:25\"]\nlisen = 1\n", "b.toml").unwrap_err();
        let line = err.to_string();
        assert!(line.starts_with("b.toml: line 3: key `smtp"), "{line}");
        assert!(line.contains("unknown field `lisen`"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn bad_duration_names_the_key() {
        let err = Config::parse("[queue]\nretry_interval = \"30 minutes\"\n", "c.toml").unwrap_err();
        let line = err.to_string();
        assert!(line.contains("key `queue.retry_interval`"), "{line}");
        assert!(line.contains("not a duration"), "{line}");
    }

    #[test]
    fn bad_address_names_the_key() {
        let err = Config::parse("[smtp]\nlisten = [\"127.0.0.1\"]\n", "d.toml").unwrap_err();
        assert!(err.to_string().contains("key `smtp.listen"), "{err}");
        let err = Config::parse("[web]\nallow = [\"10.0.0.0/33\"]\n", "d.toml").unwrap_err();
        assert!(err.to_string().contains("key `web.allow"), "{err}");
        let err = Config::parse("[routes]\n\"a.test\" = \"nohost\"\n", "d.toml").unwrap_err();
        assert!(err.to_string().contains("key `routes.a.test`"), "{err}");
    }

    #[test]
    fn source_address_one_or_one_per_family() {
        let parse = |value: &str| Config::parse(&format!("[delivery]\nsource_address = {value}\n"), "s.toml");
        let one = parse("\"127.0.0.9\"").expect("one address");
        let expected = SourceAddress { v4: Some(Ipv4Addr::new(127, 0, 0, 9)), v6: None };
        assert_eq!(one.delivery.source_address, expected);
        assert_eq!(
            one.delivery.source_address.for_peer("192.0.2.1".parse().unwrap()),
            Some("127.0.0.9".parse().unwrap())
        );
        assert_eq!(
            one.delivery.source_address.for_peer("2001:db8::1".parse().unwrap()),
            None,
            "v6: the system chooses"
        );
        assert!(one.to_toml().contains("source_address = [\"127.0.0.9\"]"), "{}", one.to_toml());
        let reread = Config::parse(&one.to_toml(), "again.toml").expect("check-config output parses");
        assert_eq!(reread.delivery.source_address, expected);
        assert!(!Config::parse("", "e.toml").expect("empty").to_toml().contains("source_address"));
        for (value, problem) in [
            ("\"127.0.0.9\", \"127.0.0.10\"]", "at most one IPv4 and one IPv6 address"),
            ("[\"backup.example.test\"]", "\"backup.example.test\" is not an IP address"),
            ("\"0.0.0.0\"", "0.0.0.0 cannot be a source address"),
            ("\"ff02::1\"", "ff02::1 cannot be a source address"),
            ("25", "expected an IP address or a list"),
            // TEST-NET-1 is on no host: bind says so at check-config and at start.
            ("\"192.0.2.25\"", "192.0.2.25 is not an address of this host (bind: "),
        ] {
            let value =
                if value.ends_with(']') && !value.starts_with('[') { format!("[{value}") } else { value.into() };
            let err = parse(&value).expect_err(&value).to_string();
            assert!(err.contains("key `delivery.source_address`") && err.contains(problem), "{value}: {err}");
        }
    }

    #[test]
    fn missing_file_is_one_line() {
        let err = Config::load(Path::new("/nonexistent/bartleby.toml")).unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/bartleby.toml: cannot read"), "{err}");
    }

    #[test]
    fn semantic_checks() {
        let err = Config::parse("[relay]\ndomains = [\"bad domain\"]\n", "e.toml").unwrap_err();
        assert!(err.to_string().contains("key `relay.domains[0]`"), "{err}");
        let err = Config::parse("[smtp]\ntls_cert = \"/x\"\n", "e.toml").unwrap_err();
        assert!(err.to_string().contains("tls_cert and tls_key"), "{err}");
        let err = Config::parse("[smtp]\ntls_cert = \"/no/cert\"\ntls_key = \"/no/key\"\n", "e.toml").unwrap_err();
        assert!(err.to_string().contains("/no/cert"), "{err}");
        let err = Config::parse("[queue]\nretry_interval = \"0s\"\n", "e.toml").unwrap_err();
        assert!(err.to_string().contains("queue.retry_interval"), "{err}");
    }

    #[test]
    fn web_settings_are_checked() {
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$dfPVWFS0qiFj+EmwrvJaCA$WF+YYmMJ4aBERvXbZXLT9xYvH/4gsMi+vP+vnEr69eU";
        let ok =
            Config::parse(&format!("[web]\nusers = {{ alice = \"{hash}\" }}\nflush_cooldown = \"2m\"\n"), "w.toml")
                .expect("valid");
        assert_eq!(ok.web.flush_cooldown.0, Duration::from_secs(120));
        assert!(ok.web.users.contains_key("alice"));
        let err = Config::parse("[web]\nusers = { alice = \"secret\" }\n", "w.toml").unwrap_err();
        assert!(err.to_string().contains("key `web.users.alice`"), "{err}");
        let err = Config::parse("[web]\ntls_cert = \"/x\"\n", "w.toml").unwrap_err();
        assert!(err.to_string().contains("web.tls_cert"), "{err}");
        let err = Config::parse("[web]\ndisk_warn_percent = 5\ndisk_critical_percent = 10\n", "w.toml").unwrap_err();
        assert!(err.to_string().contains("web.disk_warn_percent"), "{err}");
        assert_eq!(Config::demo().web.flush_cooldown.0, Duration::from_secs(60));
    }

    #[test]
    fn web_login_is_required_by_default() {
        let plain = Config::parse("", "w.toml").expect("valid");
        assert!(!plain.web.trust_allowed_hosts, "no page without a login unless the operator says so");
        assert!(Config::demo().web.trust_allowed_hosts, "the demo is a first try on loopback");
    }

    #[test]
    fn web_hostnames_default_and_checked() {
        let plain = Config::parse("hostname = \"Backup.Example.Test.\"\n", "w.toml").expect("valid");
        assert_eq!(plain.web_hostnames(), ["localhost", "backup.example.test"]);
        let set =
            Config::parse("[web]\nhostnames = [\"Admin.Example.Test.\", \"[2001:db8::1]\", \"192.0.2.1\"]\n", "w.toml")
                .expect("valid");
        assert_eq!(set.web_hostnames(), ["admin.example.test", "[2001:db8::1]", "192.0.2.1"]);
        let err = Config::parse("[web]\nhostnames = [\"admin.example.test:8025\"]\n", "w.toml").unwrap_err();
        assert!(err.to_string().contains("key `web.hostnames[0]`"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!("90s".parse::<HumanDuration>().unwrap().0.as_secs(), 90);
        assert_eq!("1h30m".parse::<HumanDuration>().unwrap().0.as_secs(), 5400);
        assert_eq!("5d".parse::<HumanDuration>().unwrap().0.as_secs(), 432_000);
        assert_eq!("2w".parse::<HumanDuration>().unwrap().0.as_secs(), 1_209_600);
        for bad in ["", "30", "m", "3x", "-1m", "1.5h", "99999999999999999999d"] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad}");
        }
        assert_eq!(HumanDuration::seconds(5400).to_string(), "1h30m");
    }

    #[test]
    fn slow_client_and_pregreet_keys() {
        let text = "[smtp]\ncommand_deadline = \"2m\"\ndata_deadline = \"20m\"\ndata_min_rate = 0\n\
            overload_timeout = \"5s\"\npregreet_delay = \"3s\"\npregreet_action = \"log\"\n";
        let smtp = Config::parse(text, "s.toml").unwrap().smtp;
        assert_eq!(
            (smtp.command_deadline, smtp.data_deadline),
            (HumanDuration::minutes(2), HumanDuration::minutes(20))
        );
        assert_eq!((smtp.data_min_rate, smtp.overload_timeout), (0, HumanDuration::seconds(5)));
        assert_eq!((smtp.pregreet_delay, smtp.pregreet_action), (HumanDuration::seconds(3), PregreetAction::Log));
        let defaults = SmtpConfig::default();
        assert_eq!((defaults.pregreet_delay.0, defaults.pregreet_action), (Duration::ZERO, PregreetAction::Reject));
        let err = Config::parse("[smtp]\npregreet_action = \"drop\"\n", "s.toml").unwrap_err();
        assert!(err.to_string().contains("smtp.pregreet_action"), "{err}");
        let err = Config::parse("[smtp]\ncommand_deadline = \"0s\"\n", "s.toml").unwrap_err();
        assert!(err.to_string().contains("smtp.command_deadline"), "{err}");
    }

    #[test]
    fn proxy_from() {
        let text = "[smtp]\nproxy_from = [\"10.0.0.0/8\", \"127.0.0.9/32\", \"::1/128\"]\n";
        let smtp = Config::parse(text, "p.toml").unwrap().smtp;
        assert_eq!(smtp.proxy_from.len(), 3);
        assert!(cidr_list_contains(&smtp.proxy_from, "10.1.2.3".parse().unwrap()));
        assert!(!cidr_list_contains(&smtp.proxy_from, "127.0.0.1".parse().unwrap()));
        assert!(SmtpConfig::default().proxy_from.is_empty(), "off unless configured");
        let err = Config::parse("[smtp]\nproxy_from = [\"10.0.0.0/33\"]\n", "p.toml").unwrap_err().to_string();
        assert!(err.contains("smtp.proxy_from") && err.contains("10.0.0.0/33"), "{err}");
    }

    #[test]
    fn cidr_matching() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        let host: Cidr = "::1".parse().unwrap();
        assert!(host.contains("::1".parse().unwrap()));
        assert!(!host.contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn monitor_section() {
        let text = r#"
[smtp]
etrn_allow = ["192.0.2.0/24", "2001:db8::/32"]

[routes]
"example.test" = "192.0.2.10:25"

[monitor]
probe_interval = "30s"
primary_down_after = "15m"
queue_max_messages = 500
queue_max_age = "6h"
spool_min_free_percent = 5
reminder_interval = "2h"

[[monitor.command]]
argv = ["/usr/local/bin/page", "--urgent"]

[[monitor.webhook]]
url = "https://hooks.example.net/bartleby"
timeout = "10s"

[[monitor.email]]
to = ["admin@example.net"]
smarthost = "smtp.example.net:587"

[[monitor.check]]
name = "intranet"
kind = "http"
target = "http://192.0.2.20/health"
down_after = "2m"
"#;
        let config = Config::parse(text, "m.toml").expect("valid");
        assert_eq!(config.smtp.etrn_allow.len(), 2);
        let m = &config.monitor;
        assert_eq!(m.probe_interval, HumanDuration::seconds(30));
        assert_eq!(m.primary_down_after, HumanDuration::minutes(15));
        assert_eq!((m.queue_max_messages, m.spool_min_free_percent), (500, 5));
        assert_eq!(m.command[0].timeout, HumanDuration::seconds(30));
        assert_eq!(m.webhook[0].timeout, HumanDuration::seconds(10));
        assert_eq!(m.email[0].smarthost.port, 587);
        assert_eq!((m.check[0].kind, m.check[0].expect_status), (CheckKind::Http, 200));
        let again = Config::parse(&config.to_toml(), "again").expect("effective settings parse back");
        assert_eq!(again.monitor.check, m.check);
        assert_eq!(again.monitor.email, m.email);

        let bad = |extra: &str| Config::parse(&format!("{text}{extra}"), "m.toml").unwrap_err().to_string();
        let err = bad("\n[[monitor.email]]\nto = [\"a@b.test\"]\nsmarthost = \"192.0.2.10:25\"\n");
        assert!(err.contains("monitor.email[1].smarthost") && err.contains("must not be a primary"), "{err}");
        let err = bad("\n[[monitor.check]]\nname = \"intranet\"\nkind = \"tcp\"\ntarget = \"h:1\"\n");
        assert!(err.contains("monitor.check[1].name"), "{err}");
        let err = bad("\n[[monitor.check]]\nname = \"x\"\nkind = \"ping\"\ntarget = \"h:1\"\n");
        assert!(err.contains("monitor.check"), "{err}");
        let err = bad("\n[[monitor.webhook]]\nurl = \"ftp://x\"\n");
        assert!(err.contains("monitor.webhook[1].url"), "{err}");
    }

    #[test]
    fn demo_config_is_valid_and_round_trips() {
        let demo = Config::demo();
        assert!(demo.validate().is_ok());
        let again = Config::parse(&demo.to_toml(), "demo").expect("effective settings parse back");
        assert_eq!(again.routes, demo.routes);
        assert_eq!(again.smtp.listen, demo.smtp.listen);
    }

    #[test]
    fn the_database_password_is_masked_where_settings_are_shown() {
        assert_eq!(
            mask_url_password("postgres://u:s3cret@db:5432/q?sslmode=require"),
            "postgres://u:********@db:5432/q?sslmode=require"
        );
        assert_eq!(mask_url_password("postgres://u@db/q"), "postgres://u@db/q");
        assert_eq!(mask_url_password("host=db user=u"), "host=db user=u");
        let config = Config::parse("[queue]\nstore = \"postgres\"\nurl = \"postgres://u:s3cret@db/q\"\n", "pg.toml")
            .expect("parses");
        let shown = toml::to_string(&config).expect("serializes");
        assert!(!shown.contains("s3cret") && shown.contains("postgres://u:********@db/q"), "{shown}");
    }

    #[test]
    fn the_postgres_store_needs_a_url_that_parses() {
        let err = Config::parse("[queue]\nstore = \"postgres\"\n", "pg.toml").unwrap_err();
        assert!(err.to_string().contains("queue.url"), "{err}");
        let err = Config::parse("[queue]\nstore = \"postgres\"\nurl = \"postgres://h:notaport/db\"\n", "pg.toml")
            .unwrap_err();
        assert!(err.to_string().contains("not a PostgreSQL URL"), "{err}");
        let err = Config::parse("[queue]\nurl = \"postgres://h/db\"\n", "pg.toml").unwrap_err();
        assert!(err.to_string().contains("only used with store"), "{err}");
        let err = Config::parse("[queue]\nstore = \"sqlite\"\n", "pg.toml").unwrap_err();
        assert!(err.to_string().contains("store"), "{err}");
    }
}

//! The backup-MX rule and how bartleby recognises itself in an MX list.
//!
//! A backup MX must never hand mail to itself or to a host that is no better than itself: that
//! host would hand the mail back, or sit on it like we do. OpenSMTPD's `backuppref` rule (mta.c)
//! keeps only hosts strictly more preferred than the best entry naming us; if none is left, we are
//! the best MX and the list "points back to" us (sendmail's wording).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

/// One MX host with the addresses it resolved to (empty when its lookup failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// The MX preference; lower is tried first (RFC 5321 5.1).
    pub preference: u16,
    /// The exchange name, lower case, without the trailing dot.
    pub name: String,
    /// The host's A and AAAA addresses.
    pub addrs: Vec<IpAddr>,
}

/// What is left of an MX list after the backup-MX rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxChoice {
    /// Hosts to try, most preferred first, equal preferences shuffled.
    Hosts(Vec<MxHost>),
    /// We are the best MX (or tie with the best): nowhere to deliver without looping.
    Loop,
}

/// The names and addresses bartleby answers on.
#[derive(Debug, Clone, Default)]
pub struct SelfIdentity {
    /// `hostname` and `relay.also_me`, lower case without trailing dots.
    names: HashSet<String>,
    /// Our listening sockets, with wildcards expanded to the interface addresses. Ports count:
    /// a host on our address but another port (tests, or several daemons on one box) is not us.
    addrs: HashSet<SocketAddr>,
}

impl SelfIdentity {
    /// Builds the identity from our names and listening sockets; `interfaces` stands in for a
    /// wildcard listen address (0.0.0.0 or ::).
    pub fn new(names: &[String], listen: &[SocketAddr], interfaces: &[IpAddr]) -> SelfIdentity {
        let names = names.iter().map(|n| normalise(n)).filter(|n| !n.is_empty()).collect();
        let mut addrs = HashSet::new();
        for sock in listen {
            if sock.ip().is_unspecified() {
                // A v6 wildcard usually accepts v4 too (dual stack), so expand to every family.
                addrs.extend(interfaces.iter().map(|ip| SocketAddr::new(*ip, sock.port())));
            } else {
                addrs.insert(*sock);
            }
        }
        SelfIdentity { names, addrs }
    }

    /// Is this MX host us, by name or by any of its addresses on `port`?
    pub fn is_me(&self, host: &MxHost, port: u16) -> bool {
        self.names.contains(&normalise(&host.name))
            || host.addrs.iter().any(|ip| self.addrs.contains(&SocketAddr::new(ip.to_canonical(), port)))
    }
}

/// Applies the backup-MX rule to a resolved MX list: drops every host of equal or worse preference
/// than the best entry that is us, then sorts by preference with equal preferences shuffled
/// (RFC 5321 5.1). When we are not in the list at all (a bounce to a sender's domain), every host
/// is kept.
pub fn backup_mx_rule(mut hosts: Vec<MxHost>, is_me: impl Fn(&MxHost) -> bool) -> MxChoice {
    if let Some(ours) = hosts.iter().filter(|h| is_me(h)).map(|h| h.preference).min() {
        hosts.retain(|h| h.preference < ours);
        if hosts.is_empty() {
            return MxChoice::Loop;
        }
    }
    sort_and_shuffle(&mut hosts);
    MxChoice::Hosts(hosts)
}

/// Sorts by preference and shuffles hosts of equal preference to spread the load (RFC 5321 5.1).
pub fn sort_and_shuffle(hosts: &mut [MxHost]) {
    fastrand::shuffle(hosts);
    // A stable sort keeps the shuffled order within one preference.
    hosts.sort_by_key(|h| h.preference);
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The machine's own interface addresses (Linux: from /proc), used when we listen on a wildcard.
/// Unreadable files yield no addresses rather than an error: names still identify us.
pub fn interface_addresses() -> Vec<IpAddr> {
    let mut addrs = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/proc/net/fib_trie") {
        addrs.extend(parse_fib_trie(&text));
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") {
        addrs.extend(parse_if_inet6(&text));
    }
    addrs.sort();
    addrs.dedup();
    addrs
}

/// Local IPv4 addresses: a `|-- a.b.c.d` line followed by `/32 host LOCAL`.
fn parse_fib_trie(text: &str) -> Vec<IpAddr> {
    let mut found = Vec::new();
    let mut last: Option<IpAddr> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|-- ") {
            last = ip.parse().ok();
        } else if line.starts_with("/32 host LOCAL")
            && let Some(ip) = last
        {
            found.push(ip);
        }
    }
    found
}

/// IPv6 addresses: the first field of each line is 32 hex digits.
fn parse_if_inet6(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|hex| u128::from_str_radix(hex, 16).ok())
        .map(|bits| IpAddr::V6(bits.into()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(preference: u16, name: &str, ip: &str) -> MxHost {
        MxHost { preference, name: name.to_string(), addrs: vec![ip.parse().unwrap()] }
    }

    fn identity() -> SelfIdentity {
        SelfIdentity::new(
            &["backup.example.test".to_string(), "mx2.other.test".to_string()],
            &["127.0.0.3:25".parse().unwrap()],
            &[],
        )
    }

    fn names(choice: &MxChoice) -> Vec<String> {
        match choice {
            MxChoice::Hosts(hosts) => hosts.iter().map(|h| h.name.clone()).collect(),
            MxChoice::Loop => vec!["LOOP".to_string()],
        }
    }

    #[test]
    fn self_by_name_drops_equal_and_worse() {
        let me = identity();
        let list = vec![
            host(30, "worse.example.test", "127.0.0.5"),
            host(20, "Backup.Example.Test.", "127.0.0.9"),
            host(20, "equal.example.test", "127.0.0.6"),
            host(10, "primary.example.test", "127.0.0.2"),
        ];
        let choice = backup_mx_rule(list, |h| me.is_me(h, 25));
        assert_eq!(names(&choice), vec!["primary.example.test"]);
    }

    #[test]
    fn self_by_also_me_and_by_address() {
        let me = identity();
        let by_alias = vec![host(10, "primary.test", "127.0.0.2"), host(20, "mx2.other.test", "10.0.0.1")];
        assert_eq!(names(&backup_mx_rule(by_alias, |h| me.is_me(h, 25))), vec!["primary.test"]);
        let by_addr = vec![host(10, "primary.test", "127.0.0.2"), host(20, "unknown.test", "127.0.0.3")];
        assert_eq!(names(&backup_mx_rule(by_addr.clone(), |h| me.is_me(h, 25))), vec!["primary.test"]);
        // The same address on another port is another server.
        assert_eq!(names(&backup_mx_rule(by_addr, |h| me.is_me(h, 2525))), vec!["primary.test", "unknown.test"]);
    }

    #[test]
    fn wildcard_listen_uses_interfaces() {
        let me = SelfIdentity::new(&[], &["0.0.0.0:25".parse().unwrap()], &["192.0.2.7".parse().unwrap()]);
        assert!(me.is_me(&host(10, "x.test", "192.0.2.7"), 25));
        assert!(me.is_me(&host(10, "x.test", "::ffff:192.0.2.7"), 25));
        assert!(!me.is_me(&host(10, "x.test", "192.0.2.8"), 25));
    }

    #[test]
    fn loop_when_we_are_best() {
        let me = identity();
        let list = vec![host(10, "backup.example.test", "127.0.0.3"), host(20, "other.test", "127.0.0.4")];
        assert_eq!(backup_mx_rule(list, |h| me.is_me(h, 25)), MxChoice::Loop);
        let tie = vec![host(10, "backup.example.test", "127.0.0.3"), host(10, "other.test", "127.0.0.4")];
        assert_eq!(backup_mx_rule(tie, |h| me.is_me(h, 25)), MxChoice::Loop);
    }

    #[test]
    fn not_in_list_keeps_all_sorted() {
        let me = identity();
        let list = vec![host(20, "b.test", "127.0.0.5"), host(5, "a.test", "127.0.0.4")];
        assert_eq!(names(&backup_mx_rule(list, |h| me.is_me(h, 25))), vec!["a.test", "b.test"]);
    }

    #[test]
    fn shuffle_keeps_the_set_and_the_order_of_preferences() {
        let list: Vec<MxHost> =
            (0..8).map(|i| host(if i < 4 { 10 } else { 20 }, &format!("h{i}.test"), "127.0.0.9")).collect();
        let mut seen_orders = HashSet::new();
        for _ in 0..50 {
            let mut hosts = list.clone();
            sort_and_shuffle(&mut hosts);
            let prefs: Vec<u16> = hosts.iter().map(|h| h.preference).collect();
            assert_eq!(prefs, vec![10, 10, 10, 10, 20, 20, 20, 20]);
            let mut sorted: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
            seen_orders.insert(sorted.clone());
            sorted.sort();
            assert_eq!(sorted, (0..8).map(|i| format!("h{i}.test")).collect::<Vec<_>>());
        }
        assert!(seen_orders.len() > 1, "equal preferences are shuffled");
    }

    #[test]
    fn proc_parsers() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n     |-- 127.255.255.255\n        /32 link BROADCAST\n";
        assert_eq!(parse_fib_trie(trie), vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        let inet6 = "00000000000000000000000000000001 01 80 10 80       lo\n";
        assert_eq!(parse_if_inet6(inet6), vec!["::1".parse::<IpAddr>().unwrap()]);
    }
}

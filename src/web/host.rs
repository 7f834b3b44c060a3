//! The names the admin page answers to: the defence against DNS rebinding.
//!
//! A page loaded from `rebind.attacker.test`, whose address the attacker then re-points at
//! 127.0.0.1, is still `rebind.attacker.test` to the browser: its scripts may read our answers, and
//! its POSTs pass an Origin check that only compares Origin with Host, since both name the attacker.
//! The peer address is loopback, so `[web] allow` lets it in. Only the name in the Host header gives
//! it away, so a request for any name that is not ours is refused before a session, a CSRF token or
//! any data exists (RFC 9110 15.5.20, 421 Misdirected Request).
//!
//! Ours are: the names in `[web] hostnames` (default `localhost` and `hostname`); the listen
//! address as an IP literal (any IP literal when it is 0.0.0.0 or [::]); and loopback literals, the
//! near end of an SSH tunnel. An IP literal cannot be rebound, so accepting one opens nothing. The
//! port is not compared: a tunnel or a port forward shows the page on another port, and the
//! attack lies in the name, not the port.

use crate::config::Config;
use std::net::{IpAddr, Ipv6Addr};

/// The host of a Host header value or of an Origin's authority (`name`, `name:port`, `v4:port`,
/// `[v6]:port`): lower case, without the port, the brackets or a trailing dot. None when it is not
/// of that form (a user-info part, a bare IPv6 address, a port that is not a number).
pub fn host_part(authority: &str) -> Option<String> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let (inside, after) = rest.split_once(']')?;
            inside.parse::<Ipv6Addr>().ok()?;
            match after {
                "" => (inside, None),
                _ => (inside, Some(after.strip_prefix(':')?)),
            }
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    // RFC 3986 3.2.3: port = *DIGIT (it may be empty).
    let port_ok = port.is_none_or(|p| p.bytes().all(|b| b.is_ascii_digit()));
    let host = host.strip_suffix('.').unwrap_or(host);
    let plausible = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    (port_ok && plausible).then(|| host.to_ascii_lowercase())
}

/// Is `host` (as [`host_part`] returns it) a name or address the page answers to?
pub fn is_ours(config: &Config, host: &str) -> bool {
    let names = config.web_hostnames();
    match host.parse::<IpAddr>() {
        Ok(ip) => {
            let ip = ip.to_canonical();
            let listen = config.web.listen.ip();
            ip == listen.to_canonical()
                || listen.is_unspecified()
                || ip.is_loopback()
                || names.iter().any(|name| literal(name) == Some(ip))
        }
        Err(_) => names.iter().any(|name| name.eq_ignore_ascii_case(host)),
    }
}

/// A `[web] hostnames` entry that is an IP literal (`192.0.2.1`, `[2001:db8::1]`), as an address.
fn literal(name: &str) -> Option<IpAddr> {
    let bare = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    bare.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_part_strips_port_brackets_and_case() {
        assert_eq!(host_part("LocalHost:8025").as_deref(), Some("localhost"));
        assert_eq!(host_part("backup.example.test.").as_deref(), Some("backup.example.test"));
        assert_eq!(host_part("127.0.0.1:8025").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_part("[::1]:8025").as_deref(), Some("::1"));
        assert_eq!(host_part("[::1]").as_deref(), Some("::1"));
        assert_eq!(host_part("example.test:").as_deref(), Some("example.test"));
        for bad in ["", ":8025", "::1", "a:b:c", "[::1]x", "[nope]:1", "user@127.0.0.1", "x:80a", "a b", "[::1"] {
            assert_eq!(host_part(bad), None, "{bad:?}");
        }
    }

    fn config(web: &str) -> Config {
        Config::parse(&format!("hostname = \"backup.example.test\"\n[web]\n{web}\n"), "t.toml").expect("config")
    }

    #[test]
    fn default_names_listen_address_and_loopback() {
        let config = config("listen = \"192.0.2.7:8025\"");
        for ours in
            ["localhost", "backup.example.test", "192.0.2.7", "127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"]
        {
            assert!(is_ours(&config, ours), "{ours}");
        }
        for theirs in ["rebind.attacker.test", "192.0.2.8", "example.test", "localhost.attacker.test", "2001:db8::1"] {
            assert!(!is_ours(&config, theirs), "{theirs}");
        }
    }

    #[test]
    fn configured_names_replace_the_defaults() {
        let config = config("listen = \"0.0.0.0:8025\"\nhostnames = [\"admin.example.test\", \"[2001:db8::1]\"]");
        assert!(is_ours(&config, "admin.example.test"));
        assert!(is_ours(&config, "2001:db8::1"));
        assert!(is_ours(&config, "198.51.100.1"), "listening on 0.0.0.0: any IP literal");
        assert!(!is_ours(&config, "localhost"), "the list replaces the defaults");
        assert!(!is_ours(&config, "backup.example.test"));
    }
}

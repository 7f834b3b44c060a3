//! Next-hop resolution against a real (in-process) DNS server: MX with the backup-MX rule,
//! implicit MX, null MX, NXDOMAIN, SERVFAIL and a name server that never answers.

#[path = "support/dns_server.rs"]
mod dns_server;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use bartleby::config::{Config, HumanDuration};
use bartleby::deliver::{Deliverer, Job, JobResult, NextHop, RcptOutcome};
use bartleby::spool::{Envelope, MemoryQueue, Queue, Recipient};
use dns_server::{DnsServer, SilentDns, Zone};
use fake_primary::{FakePrimary, Script};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

const LIMIT: Duration = Duration::from_secs(30);
const BODY: &[u8] = b"Subject: dns\r\n\r\nhello\r\n";

/// bartleby as backup.example.test listening on 127.0.0.3:`mx_port`, asking `dns`.
fn config(dns: SocketAddr, mx_port: u16) -> Arc<Config> {
    let mut config = Config::demo();
    config.hostname = "backup.example.test".into();
    config.smtp.listen = vec![SocketAddr::from(([127, 0, 0, 3], mx_port))];
    config.dns.nameservers = vec![dns];
    config.routes.clear();
    config.delivery.mx_port = mx_port;
    config.delivery.dns_timeout = HumanDuration(Duration::from_secs(1));
    let short = HumanDuration(Duration::from_secs(2));
    config.delivery.connect_timeout = short;
    config.delivery.greeting_timeout = short;
    config.delivery.command_timeout = short;
    Arc::new(config)
}

fn job(_dir: &TempDir, rcpt: &str) -> Job {
    let queue = MemoryQueue::new();
    let mut message = Arc::clone(&queue).incoming("m1").expect("incoming");
    message.write(BODY).expect("write");
    let envelope = Envelope::new("m1".into(), "s@origin.test".into(), vec![Recipient::new(rcpt.into())]);
    Job { envelope: message.commit(envelope).expect("commit"), queue }
}

async fn deliver(config: Arc<Config>, domain: &str, rcpt: &str) -> (JobResult, TempDir) {
    let dir = TempDir::new().unwrap();
    let deliverer = Deliverer::new(config).expect("deliverer");
    let mut results =
        tokio::time::timeout(LIMIT, deliverer.deliver(domain, vec![job(&dir, rcpt)])).await.expect("in time");
    assert_eq!(results.len(), 1);
    (results.remove(0), dir)
}

async fn hops(config: Arc<Config>, domain: &str) -> Result<Vec<NextHop>, RcptOutcome> {
    let deliverer = Deliverer::new(config).expect("deliverer");
    let found = tokio::time::timeout(LIMIT, deliverer.next_hops(domain)).await.expect("in time");
    found.map_err(|e| e.outcome())
}

fn example_zone() -> Zone {
    Zone::new()
        .mx("example.test", 10, "primary.example.test")
        .mx("example.test", 20, "backup.example.test")
        .mx("example.test", 30, "worse.example.test")
        .addr("primary.example.test", "127.0.0.1")
        .addr("backup.example.test", "127.0.0.3")
        .addr("worse.example.test", "127.0.0.4")
}

#[tokio::test]
async fn backup_mx_delivers_to_the_better_host_only() {
    let primary = FakePrimary::start(Script::default()).await;
    let dns = DnsServer::start(example_zone()).await;
    let config = config(dns.addr, primary.addr.port());
    let found = hops(config.clone(), "example.test").await.expect("hops");
    let port = primary.addr.port();
    assert_eq!(
        found,
        vec![NextHop {
            host: "primary.example.test".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            preference: Some(10)
        }]
    );
    let (result, _dir) = deliver(config, "example.test", "a@example.test").await;
    assert!(matches!(result.outcomes[0].1, RcptOutcome::Delivered(_)), "{:?}", result.outcomes);
    assert_eq!(result.outcomes[0].1.detail().remote_mta.as_deref(), Some("primary.example.test"));
    assert_eq!(primary.messages()[0].body, BODY);
}

#[tokio::test]
async fn self_recognised_by_address_and_by_also_me() {
    let zone = Zone::new()
        .mx("example.test", 10, "primary.example.test")
        .mx("example.test", 20, "mx2.example.test")
        .mx("example.test", 20, "peer.example.test")
        .addr("primary.example.test", "127.0.0.1")
        .addr("mx2.example.test", "127.0.0.3")
        .addr("peer.example.test", "127.0.0.6");
    let dns = DnsServer::start(zone).await;
    // mx2 is us by address (127.0.0.3 on the MX port); its equal-preference peer goes too.
    let found = hops(config(dns.addr, 2525), "example.test").await.expect("hops");
    let names: Vec<&str> = found.iter().map(|h| h.host.as_str()).collect();
    assert_eq!(names, vec!["primary.example.test"]);
    // Listening elsewhere, but named in also_me.
    let mut other = (*config(dns.addr, 2525)).clone();
    other.smtp.listen = vec!["127.0.0.9:2525".parse().unwrap()];
    other.relay.also_me = vec!["mx2.example.test".into()];
    let found = hops(Arc::new(other.clone()), "example.test").await.expect("hops");
    assert_eq!(found.len(), 1);
    // Not in the list at all (e.g. a bounce to a sender's domain): every host is kept.
    other.relay.also_me.clear();
    let found = hops(Arc::new(other), "example.test").await.expect("hops");
    assert_eq!(found.len(), 3);
    assert_eq!(found[0].host, "primary.example.test");
}

#[tokio::test]
async fn best_mx_points_back_to_us() {
    let zone = Zone::new()
        .mx("example.test", 10, "backup.example.test")
        .mx("example.test", 20, "other.example.test")
        .addr("backup.example.test", "127.0.0.3")
        .addr("other.example.test", "127.0.0.4");
    let dns = DnsServer::start(zone).await;
    let (result, _dir) = deliver(config(dns.addr, 2525), "example.test", "a@example.test").await;
    match &result.outcomes[0].1 {
        RcptOutcome::Loop(detail) => {
            assert_eq!(detail.text, "MX list for example.test points back to backup.example.test")
        }
        other => panic!("expected a loop, got {other:?}"),
    }
}

#[tokio::test]
async fn implicit_mx_uses_the_domain_address() {
    let primary = FakePrimary::start(Script::default()).await;
    let dns = DnsServer::start(Zone::new().addr("implicit.test", "127.0.0.1")).await;
    let (result, _dir) = deliver(config(dns.addr, primary.addr.port()), "implicit.test", "a@implicit.test").await;
    assert!(matches!(result.outcomes[0].1, RcptOutcome::Delivered(_)), "{:?}", result.outcomes);
    assert_eq!(primary.messages()[0].rcpts, vec!["RCPT TO:<a@implicit.test>"]);
}

#[tokio::test]
async fn next_host_is_tried_when_the_first_refuses() {
    let primary = FakePrimary::start(Script::default()).await;
    let zone = Zone::new()
        .mx("example.test", 5, "dead.example.test")
        .mx("example.test", 10, "primary.example.test")
        .addr("dead.example.test", "127.0.0.5")
        .addr("primary.example.test", "127.0.0.1");
    let dns = DnsServer::start(zone).await;
    let (result, _dir) = deliver(config(dns.addr, primary.addr.port()), "example.test", "a@example.test").await;
    assert!(matches!(result.outcomes[0].1, RcptOutcome::Delivered(_)), "{:?}", result.outcomes);
    assert_eq!(primary.messages().len(), 1);
}

#[tokio::test]
async fn null_mx_and_nxdomain_bounce_at_once() {
    let dns = DnsServer::start(Zone::new().null_mx("nomail.test")).await;
    let (result, _dir) = deliver(config(dns.addr, 2525), "nomail.test", "a@nomail.test").await;
    match &result.outcomes[0].1 {
        RcptOutcome::PermFail(detail) => assert_eq!(detail.status, "5.1.10"),
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    let (result, _dir) = deliver(config(dns.addr, 2525), "missing.test", "a@missing.test").await;
    match &result.outcomes[0].1 {
        RcptOutcome::PermFail(detail) => {
            assert_eq!(detail.status, "5.1.2");
            assert!(detail.text.contains("missing.test"), "{}", detail.text);
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
}

#[tokio::test]
async fn servfail_defers() {
    let dns = DnsServer::start(Zone::new().servfail("broken.test")).await;
    let (result, _dir) = deliver(config(dns.addr, 2525), "broken.test", "a@broken.test").await;
    match &result.outcomes[0].1 {
        RcptOutcome::TempFail(detail) => assert_eq!(detail.status, "4.4.3"),
        other => panic!("expected a temporary failure, got {other:?}"),
    }
}

#[tokio::test]
async fn silent_name_server_defers_in_bounded_time() {
    let silent = SilentDns::start();
    let started = std::time::Instant::now();
    let (result, _dir) = deliver(config(silent.addr, 2525), "example.test", "a@example.test").await;
    match &result.outcomes[0].1 {
        RcptOutcome::TempFail(detail) => assert_eq!(detail.status, "4.4.3"),
        other => panic!("expected a temporary failure, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

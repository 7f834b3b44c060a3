//! MTA-STS (RFC 8461) outbound against real peers on loopback: the in-process DNS server publishes
//! `example.test MX 10 primary.example.test`, `_mta-sts.example.test TXT v=STSv1; id=..` and
//! `mta-sts.example.test A 127.0.0.1`; a small HTTPS server (tokio-rustls, a certificate from a test
//! CA that bartleby trusts through `delivery.tls_ca_file`) serves the policy; the scripted primary
//! offers STARTTLS with a certificate for primary.example.test from that CA or from another.

#[path = "support/dns_server.rs"]
mod dns_server;
#[path = "support/fake_primary.rs"]
mod fake_primary;
#[path = "support/policy_server.rs"]
mod policy_server;

use bartleby::config::{Config, HumanDuration, Switch};
use bartleby::deliver::{Deliverer, Job, JobResult, RcptOutcome};
use bartleby::spool::{Envelope, MemoryQueue, Queue, Recipient};
use dns_server::{DnsServer, Zone};
use fake_primary::{FakePrimary, Script, Starttls};
use policy_server::{Ca, PolicyServer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

const LIMIT: Duration = Duration::from_secs(30);

fn policy(mode: &str, mx: &str) -> String {
    format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
}

async fn dns(id: &str) -> DnsServer {
    let zone = Zone::new()
        .mx("example.test", 10, "primary.example.test")
        .mx("example.test", 20, "backup.example.test")
        .addr("primary.example.test", "127.0.0.1")
        .addr("backup.example.test", "127.0.0.3")
        .txt("_mta-sts.example.test", &format!("v=STSv1; id={id};"))
        .addr("mta-sts.example.test", "127.0.0.1");
    DnsServer::start(zone).await
}

/// bartleby as backup.example.test, MTA-STS on, trusting `ca_file`, its cache in `spool`.
fn config(dns: SocketAddr, mx_port: u16, sts_port: u16, ca_file: &std::path::Path, spool: &TempDir) -> Arc<Config> {
    let mut config = Config::demo();
    config.hostname = "backup.example.test".into();
    config.smtp.listen = vec![SocketAddr::from(([127, 0, 0, 3], mx_port))];
    config.dns.nameservers = vec![dns];
    config.routes.clear();
    config.queue.dir = spool.path().to_path_buf();
    let d = &mut config.delivery;
    d.mx_port = mx_port;
    d.mta_sts = Switch::On;
    d.mta_sts_port = sts_port;
    d.tls_ca_file = Some(ca_file.to_path_buf());
    d.dns_timeout = HumanDuration(Duration::from_secs(1));
    let short = HumanDuration(Duration::from_secs(3));
    (d.connect_timeout, d.greeting_timeout, d.command_timeout) = (short, short, short);
    Arc::new(config)
}

fn job(id: &str) -> Job {
    let queue = MemoryQueue::new();
    let mut message = Arc::clone(&queue).incoming(id).expect("incoming");
    message.write(b"Subject: sts\r\n\r\nhello\r\n").expect("write");
    let envelope = Envelope::new(id.into(), "s@origin.test".into(), vec![Recipient::new("a@example.test".into())]);
    Job { envelope: message.commit(envelope).expect("commit"), queue }
}

async fn deliver(deliverer: &Deliverer, id: &str) -> RcptOutcome {
    let work = async {
        let results: Vec<JobResult> = deliverer.deliver("example.test", vec![job(id)]).await;
        deliverer.close_idle().await;
        results
    };
    let mut results = tokio::time::timeout(LIMIT, work).await.expect("in time");
    assert_eq!(results.len(), 1);
    results.remove(0).outcomes.remove(0).1
}

struct Setup {
    ca_file: std::path::PathBuf,
    _dir: TempDir,
    ca: Ca,
}

fn setup() -> Setup {
    let dir = TempDir::new().unwrap();
    let ca = Ca::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.issuer.pem()).unwrap();
    Setup { ca_file, _dir: dir, ca }
}

#[tokio::test]
async fn enforce_is_fetched_cached_on_disk_and_refreshed_when_the_id_changes() {
    let s = setup();
    let primary = FakePrimary::start(Script {
        starttls: Starttls::Accept(s.ca.server("primary.example.test")),
        ..Script::default()
    })
    .await;
    let server =
        PolicyServer::start(s.ca.server("mta-sts.example.test"), &policy("enforce", "primary.example.test")).await;
    let spool = TempDir::new().unwrap();
    let dns1 = dns("1").await;
    let port = primary.addr.port();
    let deliverer = Deliverer::new(config(dns1.addr, port, server.port, &s.ca_file, &spool)).unwrap();
    assert!(matches!(deliver(&deliverer, "m1").await, RcptOutcome::Delivered(_)));
    assert!(primary.messages()[0].tls, "over TLS");
    assert_eq!(server.requests(), 1);
    assert!(spool.path().join("mta-sts.json").exists(), "cached on disk");
    assert!(matches!(deliver(&deliverer, "m2").await, RcptOutcome::Delivered(_)));
    assert_eq!(server.requests(), 1, "the same id: the cached policy");

    // A restart with the policy server broken: the cached policy is in force, nothing fetched.
    server.serve_raw("HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n");
    let restarted = Deliverer::new(config(dns1.addr, port, server.port, &s.ca_file, &spool)).unwrap();
    assert!(matches!(deliver(&restarted, "m3").await, RcptOutcome::Delivered(_)));
    assert_eq!(server.requests(), 1);

    // A new id: fetched again; the new policy lists another host, so nothing goes.
    server.serve(&policy("enforce", "*.elsewhere.test"));
    let dns2 = dns("2").await;
    let moved = Deliverer::new(config(dns2.addr, port, server.port, &s.ca_file, &spool)).unwrap();
    match deliver(&moved, "m4").await {
        RcptOutcome::TempFail(d) => {
            assert_eq!(d.status, "4.7.5");
            assert!(d.text.contains("MTA-STS") && d.text.contains("primary.example.test"), "{}", d.text);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.requests(), 2);
    assert_eq!(primary.messages().len(), 3, "m4 was not sent");
}

#[tokio::test]
async fn enforce_needs_a_valid_certificate_and_testing_only_reports() {
    let s = setup();
    // The primary's certificate comes from a CA bartleby does not trust.
    let stranger = Ca::new();
    let primary = FakePrimary::start(Script {
        starttls: Starttls::Accept(stranger.server("primary.example.test")),
        ..Script::default()
    })
    .await;
    let server =
        PolicyServer::start(s.ca.server("mta-sts.example.test"), &policy("enforce", "primary.example.test")).await;
    let dns1 = dns("1").await;
    let spool = TempDir::new().unwrap();
    let deliverer = Deliverer::new(config(dns1.addr, primary.addr.port(), server.port, &s.ca_file, &spool)).unwrap();
    match deliver(&deliverer, "m1").await {
        RcptOutcome::TempFail(d) => assert!(d.text.contains("TLS handshake failed"), "{}", d.text),
        other => panic!("{other:?}"),
    }
    assert!(primary.messages().is_empty(), "nothing in plain text or over unverified TLS");

    server.serve(&policy("testing", "primary.example.test"));
    let dns2 = dns("2").await;
    let spool = TempDir::new().unwrap();
    let testing = Deliverer::new(config(dns2.addr, primary.addr.port(), server.port, &s.ca_file, &spool)).unwrap();
    assert!(matches!(deliver(&testing, "m2").await, RcptOutcome::Delivered(_)));
    assert!(primary.messages()[0].tls, "opportunistic TLS as usual");
}

#[tokio::test]
async fn without_a_usable_policy_delivery_is_as_before() {
    let s = setup();
    let primary = FakePrimary::start(Script::default()).await;
    // A policy served as HTML (section 3.3 wants text/plain): no policy, plain-text delivery.
    let server = PolicyServer::start(s.ca.server("mta-sts.example.test"), "").await;
    server.serve_raw(&format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 10\r\n\r\n{}",
        "x".repeat(10)
    ));
    let dns = dns("1").await;
    let spool = TempDir::new().unwrap();
    let deliverer = Deliverer::new(config(dns.addr, primary.addr.port(), server.port, &s.ca_file, &spool)).unwrap();
    assert!(matches!(deliver(&deliverer, "m1").await, RcptOutcome::Delivered(_)));
    assert_eq!(server.requests(), 1);
    assert!(!primary.messages()[0].tls);
}

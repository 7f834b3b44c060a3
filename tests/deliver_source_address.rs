//! `delivery.source_address`: outbound connections leave from the configured address of their
//! family, so the primary (here a scripted one on 127.0.0.2 that records each peer) sees the
//! backup's published address; an address this host lacks stops check-config and the start.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/delivery.rs"]
mod delivery;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use bartleby::config::{Config, SourceAddress};
use bartleby::deliver::{JobResult, RcptOutcome};
use daemon::{Daemon, cli_with_config, send_raw};
use delivery::deliver;
use fake_primary::{FakePrimary, Script};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

const SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);

fn delivered(results: &[JobResult]) -> bool {
    results.iter().all(|r| r.outcomes.iter().all(|(_, o)| matches!(o, RcptOutcome::Delivered(_))))
}

/// The primary on `ip` (port 0), and a config routing example.test to it, tweaked.
async fn primary_and_config(ip: IpAddr, tweak: impl FnOnce(&mut Config)) -> (FakePrimary, Arc<Config>) {
    let primary = FakePrimary::start_at(SocketAddr::new(ip, 0), Script::default()).await;
    let addr = primary.addr;
    let config = delivery::config(addr.port(), |c| {
        c.routes.get_mut("example.test").expect("route").host = addr.ip().to_string();
        tweak(c);
    });
    (primary, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_delivers_from_its_source_address() {
    let primary = FakePrimary::start_at("127.0.0.2:0".parse().expect("addr"), Script::default()).await;
    let dir = TempDir::new().expect("tempdir");
    let extra =
        format!("\n[routes]\n\"example.test\" = \"{}\"\n\n[delivery]\nsource_address = \"{SOURCE}\"\n", primary.addr);
    let path = dir.path().to_path_buf();
    let (bartleby, reply) = tokio::task::spawn_blocking(move || {
        let bartleby = Daemon::start(&path, "", &extra);
        let reply = send_raw(bartleby.smtp, "a@sender.test", &["alice@example.test"], b"Subject: from\r\n\r\nhi\r\n");
        (bartleby, reply)
    })
    .await
    .expect("joined");
    assert!(reply.expect("sent").starts_with("250 "), "queued");
    let deadline = Instant::now() + Duration::from_secs(20);
    while primary.messages().is_empty() {
        assert!(Instant::now() < deadline, "not delivered:\n{}", bartleby.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The delivery, and the monitor's probes of the primary, all come from the source address.
    let peers = primary.peers();
    assert!(!peers.is_empty() && peers.iter().all(|p| p.ip() == IpAddr::V4(SOURCE)), "{peers:?}");
    drop(bartleby);
}

#[tokio::test]
async fn without_a_source_address_the_system_chooses() {
    let (primary, config) = primary_and_config("127.0.0.2".parse().expect("ip"), |_| {}).await;
    let dir = TempDir::new().expect("tempdir");
    assert!(delivered(&deliver(config, vec![delivery::job(&dir, "m", &["a@example.test"], b"x\r\n")]).await));
    let peers = primary.peers();
    assert_eq!(peers.len(), 1);
    assert_ne!(peers[0].ip(), IpAddr::V4(SOURCE));
}

#[tokio::test]
async fn a_source_of_the_other_family_is_not_used() {
    // An IPv6 primary while only an IPv4 source is set: the system chooses the IPv6 source.
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    }
    let (primary, config) = primary_and_config("::1".parse().expect("ip"), |c| {
        c.delivery.source_address = SourceAddress { v4: Some(SOURCE), v6: None };
    })
    .await;
    let dir = TempDir::new().expect("tempdir");
    assert!(delivered(&deliver(config, vec![delivery::job(&dir, "m", &["a@example.test"], b"x\r\n")]).await));
    assert_eq!(primary.peers()[0].ip(), "::1".parse::<IpAddr>().expect("ip"));
}

#[tokio::test]
async fn a_source_address_that_cannot_be_bound_defers_with_a_clear_reason() {
    // Not through the config (that refuses it); as if the address was removed after the start.
    let (primary, config) = primary_and_config("127.0.0.2".parse().expect("ip"), |c| {
        c.delivery.source_address = SourceAddress { v4: Some(Ipv4Addr::new(192, 0, 2, 25)), v6: None };
    })
    .await;
    let dir = TempDir::new().expect("tempdir");
    let results = deliver(config, vec![delivery::job(&dir, "m", &["a@example.test"], b"x\r\n")]).await;
    let (_, outcome) = &results[0].outcomes[0];
    let RcptOutcome::TempFail(detail) = outcome else { panic!("deferred: {outcome:?}") };
    assert_eq!(detail.status, "4.4.1");
    assert!(detail.text.contains("cannot bind delivery.source_address 192.0.2.25"), "{detail:?}");
    assert_eq!(primary.connections(), 0);
}

#[test]
fn check_config_and_serve_refuse_an_address_not_on_this_host() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("bartleby.toml");
    let spool = dir.path().join("spool");
    let config =
        |source: &str| format!("[queue]\ndir = \"{}\"\n\n[delivery]\nsource_address = {source}\n", spool.display());
    std::fs::write(&path, config("[\"192.0.2.25\", \"::1\"]")).expect("write");
    for command in ["check-config", "serve"] {
        let out = cli_with_config(&path, &[command]);
        assert_eq!(out.status.code(), Some(2), "{command}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("key `delivery.source_address`: 192.0.2.25 is not an address of this host (bind: "),
            "{command}: {err}"
        );
    }
    std::fs::write(&path, config(&format!("\"{SOURCE}\""))).expect("write");
    let out = cli_with_config(&path, &["check-config"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("source_address = [\"127.0.0.9\"]"), "{out:?}");
}

//! DANE toward the primaries (RFC 7672) against a real DNSSEC-signed zone: Debian's NSD serves
//! `dane.test`, signed with ldns-signzone, on a port of 127.0.0.57, and bartleby's validating resolver
//! starts from the zone's own DNSKEY (`delivery.dnssec_trust_anchor`). The primary is the scripted
//! TLS server of `support/fake_primary.rs` with an rcgen certificate.
//!
//! - `good.dane.test`: signed MX and a TLSA `3 1 1` of the primary's key → delivered over TLS.
//! - `bad.dane.test`: signed MX and a TLSA of another key → nothing sent, deferred with 4.7.5.
//! - `insecure.dane.test`: a delegation without DS (provably unsigned, RFC 7672 2.2) whose TLSA
//!   would not match → delivered as without DANE.

#[path = "support/delivery.rs"]
mod delivery;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use bartleby::config::{Config, Switch};
use bartleby::deliver::{Deliverer, RcptOutcome};
use bartleby::spool::{Envelope, Recipient};
use fake_primary::{FakePrimary, Script, Starttls};
use rcgen::{CertificateParams, KeyPair, PublicKeyData};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// NSD in the foreground, stopped (by its process ID) when dropped.
struct Nsd(Child);

impl Drop for Nsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} (Debian packages nsd and ldnsutils): {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A port on NSD's own loopback address (127.0.0.57: no client connection takes its source port
/// there, unlike 127.0.0.1) that is free for both UDP and TCP at this moment (held, then released).
/// Another process can still take it before NSD binds it, so `start_nsd` tries again on a new port.
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.57:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.57", port)).is_ok() {
            return port;
        }
    }
}

/// Signs `dane.test` (with the TLSA records for `smtp_port`), writes the unsigned child zone,
/// starts NSD and returns it with its address and the trust anchor file.
fn start_dns(dir: &Path, smtp_port: u16, good_spki: &[u8]) -> (Nsd, SocketAddr, std::path::PathBuf) {
    let good = sha256_hex(good_spki);
    let wrong = sha256_hex(b"some other key");
    let zone = format!(
        "$ORIGIN dane.test.\n$TTL 60\n\
         @ IN SOA ns.dane.test. admin.dane.test. 1 3600 600 86400 60\n\
         @ IN NS ns.dane.test.\n\
         ns IN A 127.0.0.1\n\
         good IN MX 10 mx.good\n\
         mx.good IN A 127.0.0.1\n\
         _{smtp_port}._tcp.mx.good IN TLSA 3 1 1 {good}\n\
         bad IN MX 10 mx.bad\n\
         mx.bad IN A 127.0.0.1\n\
         _{smtp_port}._tcp.mx.bad IN TLSA 3 1 1 {wrong}\n\
         insecure IN NS ns.insecure\n\
         ns.insecure IN A 127.0.0.1\n"
    );
    std::fs::write(dir.join("dane.test"), zone).unwrap();
    let child = format!(
        "$ORIGIN insecure.dane.test.\n$TTL 60\n\
         @ IN SOA ns.insecure.dane.test. admin.dane.test. 1 3600 600 86400 60\n\
         @ IN NS ns.insecure.dane.test.\n\
         ns IN A 127.0.0.1\n\
         @ IN MX 10 mx\n\
         mx IN A 127.0.0.1\n\
         _{smtp_port}._tcp.mx IN TLSA 3 1 1 {wrong}\n"
    );
    std::fs::write(dir.join("insecure.dane.test"), child).unwrap();
    let key = run(dir, "ldns-keygen", &["-a", "ECDSAP256SHA256", "-k", "dane.test"]);
    run(dir, "ldns-signzone", &["dane.test", &key]);
    // The trust anchor: the zone's DNSKEY record, without ldns's trailing comment.
    let dnskey = std::fs::read_to_string(dir.join(format!("{key}.key"))).unwrap();
    let anchor = dir.join("anchor.key");
    std::fs::write(&anchor, dnskey.split(';').next().unwrap_or_default().trim().to_string() + "\n").unwrap();
    // And a key the zone is not signed with, for a bogus answer.
    let stranger = run(dir, "ldns-keygen", &["-a", "ECDSAP256SHA256", "-k", "dane.test"]);
    let dnskey = std::fs::read_to_string(dir.join(format!("{stranger}.key"))).unwrap();
    std::fs::write(
        dir.join("wrong-anchor.key"),
        dnskey.split(';').next().unwrap_or_default().trim().to_string() + "\n",
    )
    .unwrap();
    let (nsd, addr) = start_nsd(dir);
    (nsd, addr, anchor)
}

/// NSD serving both zones on a free loopback port, up when it answers over TCP. A port taken by
/// another test between `free_port` and NSD's bind makes NSD exit at once ("Address already in
/// use"): then it is started again on another port, at most five times in all.
fn start_nsd(dir: &Path) -> (Nsd, SocketAddr) {
    let d = dir.display();
    let mut failures = Vec::new();
    for _ in 0..5 {
        let dns_port = free_port();
        let conf = format!(
            "server:\n  ip-address: 127.0.0.57@{dns_port}\n  port: {dns_port}\n  username: \"\"\n  chroot: \"\"\n\
             \x20 database: \"\"\n  zonelistfile: \"{d}/zone.list\"\n  xfrdfile: \"{d}/xfrd.state\"\n\
             \x20 pidfile: \"{d}/nsd.pid\"\n  logfile: \"{d}/nsd.log\"\n  verbosity: 2\n\
             remote-control:\n  control-enable: no\n\
             zone:\n  name: dane.test\n  zonefile: \"{d}/dane.test.signed\"\n\
             zone:\n  name: insecure.dane.test\n  zonefile: \"{d}/insecure.dane.test\"\n"
        );
        std::fs::write(dir.join("nsd.conf"), conf).unwrap();
        let _ = std::fs::remove_file(dir.join("nsd.log"));
        let child = Command::new("nsd")
            .args(["-d", "-c"])
            .arg(dir.join("nsd.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nsd (Debian package nsd)");
        let mut nsd = Nsd(child);
        let addr = SocketAddr::from(([127, 0, 0, 57], dns_port));
        // Up when it has logged its start (after binding both sockets, so the port is its own,
        // not another test's listener) and answers over TCP; at most 10 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = || std::fs::read_to_string(dir.join("nsd.log")).unwrap_or_default();
            if log().contains("nsd started") && std::net::TcpStream::connect(addr).is_ok() {
                return (nsd, addr);
            }
            if let Ok(Some(status)) = nsd.0.try_wait() {
                failures.push(format!("port {dns_port}: NSD exited ({status}): {}", log()));
                break;
            }
            assert!(Instant::now() < deadline, "NSD did not start on {addr}: {}", log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("NSD did not start in five tries:\n{}", failures.join("\n"));
}

struct Setup {
    dir: TempDir,
    _nsd: Nsd,
    primary: FakePrimary,
    config: Arc<Config>,
}

/// The primary with STARTTLS and a certificate (for a name DANE-EE ignores), and NSD serving the
/// zones, and a config with DANE on and the zone's key as trust anchor.
async fn setup() -> Setup {
    let dir = TempDir::new().unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["not-the-mx.test".to_string()]).unwrap().self_signed(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    let primary =
        FakePrimary::start(Script { starttls: Starttls::Accept(Arc::new(server)), ..Script::default() }).await;
    let port = primary.addr.port();
    let (nsd, dns, anchor) = start_dns(dir.path(), port, &key.subject_public_key_info());
    let config = delivery::config(port, |c| {
        c.routes.clear();
        c.dns.nameservers = vec![dns];
        c.delivery.mx_port = port;
        c.smtp.listen = vec![SocketAddr::from(([127, 0, 0, 3], port))];
        c.delivery.dane = Switch::On;
        c.delivery.dnssec_trust_anchor = Some(anchor);
    });
    Setup { dir, _nsd: nsd, primary, config }
}

async fn deliver(config: &Arc<Config>, domain: &str) -> RcptOutcome {
    let rcpt = format!("a@{domain}");
    let envelope = Envelope::new("m1".into(), "sender@origin.test".into(), vec![Recipient::new(rcpt)]);
    let job = delivery::queued_job("m1", envelope, b"Subject: hi\r\n\r\nhello\r\n");
    let deliverer = Deliverer::new(config.clone()).expect("deliverer");
    let work = async {
        let results = deliverer.deliver(domain, vec![job]).await;
        deliverer.close_idle().await;
        results
    };
    let results = tokio::time::timeout(Duration::from_secs(30), work).await.expect("delivery within 30 s");
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0].outcomes.len(), 1, "{results:?}");
    results[0].outcomes[0].1.clone()
}

#[tokio::test]
async fn dane_decides_by_validated_tlsa_records() {
    let s = setup().await;

    // A matching DANE-EE record: delivered over TLS, though the certificate names another host.
    let outcome = deliver(&s.config, "good.dane.test").await;
    assert!(matches!(outcome, RcptOutcome::Delivered(_)), "{outcome:?}");
    assert_eq!(s.primary.messages().len(), 1);
    assert!(s.primary.messages()[0].tls);

    // A record of another key: nothing sent, deferred with the DANE reason.
    match deliver(&s.config, "bad.dane.test").await {
        RcptOutcome::TempFail(d) => {
            assert_eq!(d.status, "4.7.5", "{d:?}");
            assert!(d.text.contains("DANE: no TLSA record of mx.bad.dane.test matches the certificate"), "{}", d.text);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.primary.messages().len(), 1, "nothing more was sent");

    // An unsigned child zone (no DS in the signed parent): its TLSA records do not count.
    let outcome = deliver(&s.config, "insecure.dane.test").await;
    assert!(matches!(outcome, RcptOutcome::Delivered(_)), "{outcome:?}");
    assert_eq!(s.primary.messages().len(), 2);

    // DANE off for the domain (overriding delivery.dane): the mismatch is not looked at.
    let mut config = (*s.config).clone();
    config.domain.insert(
        "bad.dane.test".into(),
        bartleby::config::DomainConfig { dane: Some(Switch::Off), ..Default::default() },
    );
    let outcome = deliver(&Arc::new(config), "bad.dane.test").await;
    assert!(matches!(outcome, RcptOutcome::Delivered(_)), "{outcome:?}");
    assert_eq!(s.primary.messages().len(), 3);

    // Validated from a key the zone is not signed with, the answers are bogus: deferred, not
    // delivered as if unsigned (RFC 7672 2.1).
    let mut config = (*s.config).clone();
    config.delivery.dnssec_trust_anchor = Some(s.dir.path().join("wrong-anchor.key"));
    match deliver(&Arc::new(config), "good.dane.test").await {
        RcptOutcome::TempFail(d) => {
            assert_eq!(d.status, "4.7.5", "{d:?}");
            assert!(d.text.contains("DANE: MX records of good.dane.test are not DNSSEC-valid"), "{}", d.text);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.primary.messages().len(), 3, "nothing more was sent");
}

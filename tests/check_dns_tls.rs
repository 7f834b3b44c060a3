//! `check-dns` on TLS policy: a domain whose MTA-STS policy leaves the backup out of its `mx:`
//! lines gets a warning (senders that enforce it will not fall back to the backup); one that lists
//! it is fine. The TLSA records of the backup's own name (`_25._tcp.backup.example.test`) are
//! compared with the certificate in `smtp.tls_cert`. Real peers on loopback: the in-process DNS
//! server and the HTTPS policy server of `support/policy_server.rs`.

#[path = "support/dns_server.rs"]
mod dns_server;
#[path = "support/policy_server.rs"]
mod policy_server;

use bartleby::check_dns::{Level, Report, check};
use bartleby::config::{Config, HumanDuration};
use dns_server::{DnsServer, Zone};
use policy_server::{Ca, PolicyServer};
use rcgen::PublicKeyData;
use std::time::Duration;
use tempfile::TempDir;

fn texts(report: &Report, level: Level) -> Vec<&str> {
    report.findings.iter().filter(|f| f.level == level).map(|f| f.text.as_str()).collect()
}

#[tokio::test]
async fn mta_sts_without_the_backup_and_tlsa_of_the_backup() {
    let dir = TempDir::new().unwrap();
    let ca = Ca::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.issuer.pem()).unwrap();
    // bartleby's own certificate, and its SPKI for a matching DANE-EE record.
    let key = rcgen::KeyPair::generate().unwrap();
    let spki_sha256 = ring::digest::digest(&ring::digest::SHA256, &key.subject_public_key_info()).as_ref().to_vec();
    let cert =
        rcgen::CertificateParams::new(vec!["backup.example.test".into()]).unwrap().signed_by(&key, &ca.issuer).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    let policy = "version: STSv1\r\nmode: enforce\r\nmx: primary.left.test\r\nmax_age: 86400\r\n";
    let server = PolicyServer::start(ca.server("mta-sts.left.test"), policy).await;
    let listed = PolicyServer::start(ca.server("mta-sts.listed.test"), policy).await;
    listed.serve("version: STSv1\r\nmode: testing\r\nmx: primary.listed.test\r\nmx: *.example.test\r\nmax_age: 60\r\n");
    let zone = Zone::new()
        .mx("left.test", 10, "primary.left.test")
        .mx("left.test", 20, "backup.example.test")
        .txt("_mta-sts.left.test", "v=STSv1; id=1;")
        .addr("mta-sts.left.test", "127.0.0.1")
        .addr("primary.left.test", "127.0.0.1")
        .mx("listed.test", 10, "primary.listed.test")
        .mx("listed.test", 20, "backup.example.test")
        .txt("_mta-sts.listed.test", "v=STSv1; id=1;")
        .addr("mta-sts.listed.test", "127.0.0.1")
        .addr("primary.listed.test", "127.0.0.1")
        .addr("backup.example.test", "127.0.0.3")
        .tlsa("_25._tcp.backup.example.test", 3, 1, 1, &spki_sha256)
        .tlsa("_25._tcp.backup.example.test", 3, 1, 1, &[0; 32]);
    let dns = DnsServer::start(zone).await;

    let config_for = |sts_port: u16| {
        let mut config = Config::demo();
        config.hostname = "backup.example.test".into();
        config.smtp.listen = vec!["127.0.0.3:25".parse().unwrap()];
        config.smtp.tls_cert = Some(cert_file.clone());
        config.smtp.tls_key = Some(key_file.clone());
        config.dns.nameservers = vec![dns.addr];
        config.routes.clear();
        config.delivery.mx_port = 9; // nothing answers: the primary probe only warns
        config.delivery.mta_sts_port = sts_port;
        config.delivery.tls_ca_file = Some(ca_file.clone());
        config.delivery.dns_timeout = HumanDuration(Duration::from_secs(1));
        config.monitor.probe_timeout = HumanDuration(Duration::from_secs(2));
        config
    };
    let left = config_for(server.port);
    let reports =
        tokio::time::timeout(Duration::from_secs(60), check(&left, &["left.test".into()])).await.unwrap().unwrap();
    let warnings = texts(&reports[0], Level::Warning);
    assert!(
        warnings.iter().any(|w| w.contains("MTA-STS policy of left.test (mode enforce")
            && w.contains("does not list bartleby's MX backup.example.test")
            && w.contains("will not fall back")),
        "{:?}",
        reports[0]
    );
    let oks = texts(&reports[0], Level::Ok);
    assert!(
        oks.iter()
            .any(|t| t.contains("_25._tcp.backup.example.test TLSA 3 1 1") && t.contains("matches smtp.tls_cert")),
        "{oks:?}"
    );

    let listed_config = config_for(listed.port);
    let reports = tokio::time::timeout(Duration::from_secs(60), check(&listed_config, &["listed.test".into()]))
        .await
        .unwrap()
        .unwrap();
    let oks = texts(&reports[0], Level::Ok);
    assert!(
        oks.iter().any(|t| t.contains("(mode testing) lists bartleby's MX backup.example.test")),
        "{:?}",
        reports[0]
    );
    assert_eq!(server.requests() + listed.requests(), 2);

    // A certificate the TLSA records do not match is a problem.
    let other = rcgen::KeyPair::generate().unwrap();
    let stranger =
        rcgen::CertificateParams::new(vec!["backup.example.test".into()]).unwrap().self_signed(&other).unwrap();
    std::fs::write(&cert_file, stranger.pem()).unwrap();
    let reports =
        tokio::time::timeout(Duration::from_secs(60), check(&left, &["left.test".into()])).await.unwrap().unwrap();
    let problems = texts(&reports[0], Level::Problem);
    assert!(
        problems.iter().any(|p| p.contains("no TLSA record of _25._tcp.backup.example.test matches")),
        "{problems:?}"
    );
}

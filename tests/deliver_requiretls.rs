//! RFC 8689 REQUIRETLS outbound: a message received with `MAIL FROM:<..> REQUIRETLS` goes only over
//! TLS with a verified certificate to a next hop that offers REQUIRETLS, with the parameter passed
//! on; otherwise nothing is sent and its recipients are deferred with 4.7.10 or 4.7.30. Against the
//! scripted primary of `support/fake_primary.rs` on loopback, and against a real Postfix with TLS
//! (which does not implement REQUIRETLS, so such a message must wait while the rest is delivered).

#[path = "support/delivery.rs"]
mod delivery;
#[path = "support/fake_primary.rs"]
mod fake_primary;
#[path = "support/peers.rs"]
mod peers;

use bartleby::deliver::{JobResult, RcptOutcome};
use bartleby::spool::{Envelope, Recipient};
use delivery::{config, deliver, queued_job};
use fake_primary::{FakePrimary, Script, Starttls};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;
use tempfile::TempDir;

const BODY: &[u8] = b"Subject: secret\r\n\r\nfor your eyes only\r\n";

fn job(id: &str, requiretls: bool) -> bartleby::deliver::Job {
    let mut envelope =
        Envelope::new(id.to_string(), "sender@origin.test".into(), vec![Recipient::new("a@example.test".into())]);
    envelope.requiretls = requiretls;
    queued_job(id, envelope, BODY)
}

fn only(result: &JobResult) -> &RcptOutcome {
    assert_eq!(result.outcomes.len(), 1, "{result:?}");
    &result.outcomes[0].1
}

/// A primary with STARTTLS (a certificate for 127.0.0.1 from a test CA) and `extra` keywords,
/// and a config that trusts the CA when `trusted`.
async fn tls_primary(
    extra: &[&str],
    dir: &TempDir,
    trusted: bool,
) -> (FakePrimary, std::sync::Arc<bartleby::config::Config>) {
    let (server, ca_pem) = fake_primary::tls_server(&["127.0.0.1"]);
    let mut script = Script { starttls: Starttls::Accept(server), ..Script::default() };
    script.capabilities.extend(extra.iter().map(|k| k.to_string()));
    let primary = FakePrimary::start(script).await;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let config = config(primary.addr.port(), |c| {
        if trusted {
            c.delivery.tls_ca_file = Some(ca_file.clone());
        }
    });
    (primary, config)
}

#[tokio::test]
async fn requiretls_goes_over_verified_tls_with_the_parameter() {
    let dir = TempDir::new().unwrap();
    let (primary, config) = tls_primary(&["REQUIRETLS"], &dir, true).await;
    let results = deliver(config, vec![job("m1", true), job("m2", false)]).await;
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| matches!(only(r), RcptOutcome::Delivered(_))), "{results:?}");
    let messages = primary.messages();
    let strict = messages.iter().find(|m| m.mail.contains("REQUIRETLS")).expect("the REQUIRETLS message");
    assert!(strict.tls);
    assert_eq!(messages.iter().filter(|m| m.mail.contains("REQUIRETLS")).count(), 1, "only m1 asks for it");
}

#[tokio::test]
async fn a_next_hop_without_the_extension_gets_nothing() {
    let dir = TempDir::new().unwrap();
    let (primary, config) = tls_primary(&[], &dir, true).await;
    let results = deliver(config, vec![job("m1", true), job("m2", false)]).await;
    let by_id = |id: &str| only(results.iter().find(|r| r.id == id).expect("result"));
    match by_id("m1") {
        RcptOutcome::TempFail(d) => {
            assert_eq!(d.status, "4.7.30", "{d:?}");
            assert!(d.text.contains("does not offer REQUIRETLS"), "{}", d.text);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(by_id("m2"), RcptOutcome::Delivered(_)));
    assert_eq!(primary.messages().len(), 1, "only the message without REQUIRETLS went");
    assert!(!primary.messages()[0].mail.contains("REQUIRETLS"));
}

#[tokio::test]
async fn unverified_or_missing_tls_defers_with_5_7_10_later() {
    let dir = TempDir::new().unwrap();
    // The certificate's CA is not trusted: opportunistic TLS would take it, REQUIRETLS may not.
    let (primary, config) = tls_primary(&["REQUIRETLS"], &dir, false).await;
    let results = deliver(config, vec![job("m1", true)]).await;
    match only(&results[0]) {
        RcptOutcome::TempFail(d) => {
            assert_eq!(d.status, "4.7.10", "{d:?}");
            assert!(d.text.contains("TLS handshake failed") && d.text.contains("REQUIRETLS"), "{}", d.text);
            assert_eq!(
                bartleby::deliver::client::requiretls_expiry_status(true, &d.text),
                Some("5.7.10"),
                "returned with 5.7.10 when it expires"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(primary.messages().is_empty());

    // No STARTTLS at all: nothing in plain text.
    let plain = FakePrimary::start(Script::default()).await;
    let results = deliver(config_for(plain.addr.port()), vec![job("m2", true)]).await;
    match only(&results[0]) {
        RcptOutcome::TempFail(d) => assert_eq!(d.status, "4.7.10", "{d:?}"),
        other => panic!("{other:?}"),
    }
    assert!(plain.messages().is_empty());
    assert!(!plain.commands().iter().any(|c| c.starts_with("MAIL")), "{:?}", plain.commands());
}

fn config_for(port: u16) -> std::sync::Arc<bartleby::config::Config> {
    config(port, |_| {})
}

/// Real Postfix with STARTTLS on 127.0.0.2:25 (a certificate from a test CA that bartleby trusts):
/// it does not offer REQUIRETLS, so the REQUIRETLS message waits with 4.7.30 and the other is
/// delivered over verified TLS.
#[tokio::test(flavor = "multi_thread")]
async fn postfix_with_tls_gets_only_the_message_without_requiretls() {
    let _lock = peers::PeersLock::acquire().expect("peers lock");
    let dir = TempDir::new().unwrap();
    let (cert_file, key_file, ca_file) = write_certificate(&dir, "127.0.0.2");
    let listen = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 25);
    let settings = [
        ("smtpd_tls_cert_file", cert_file.to_str().unwrap()),
        ("smtpd_tls_key_file", key_file.to_str().unwrap()),
        ("smtpd_tls_security_level", "may"),
        ("smtpd_tls_loglevel", "1"),
    ];
    let postfix = peers::Postfix::start_with(listen, "example.test", &["alice"], &settings).expect("postfix");
    let config = delivery::config(25, |c| {
        c.routes.insert("example.test".into(), bartleby::config::Route { host: "127.0.0.2".into(), port: 25 });
        c.delivery.tls_ca_file = Some(ca_file.clone());
    });
    let mut strict = job("m1", true);
    let mut plain = job("m2", false);
    for j in [&mut strict, &mut plain] {
        j.envelope.recipients = vec![Recipient::new("alice@example.test".into())];
    }
    let results = deliver(config, vec![strict, plain]).await;
    let by_id = |id: &str| only(results.iter().find(|r| r.id == id).expect("result"));
    match by_id("m1") {
        RcptOutcome::TempFail(d) => assert_eq!(d.status, "4.7.30", "{d:?}"),
        other => panic!("{other:?}\n{}", postfix.maillog()),
    }
    assert!(matches!(by_id("m2"), RcptOutcome::Delivered(_)), "{results:?}\n{}", postfix.maillog());
    let messages = postfix.wait_for_messages("alice", 1, Duration::from_secs(20)).expect("delivered to the Maildir");
    assert_eq!(messages.len(), 1);
    assert!(postfix.maillog().contains("TLS connection established from"), "{}", postfix.maillog());
}

/// A CA and a certificate for `name` (an IP literal or host name) in PEM files: (cert, key, CA).
fn write_certificate(dir: &TempDir, name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_string()]).unwrap().signed_by(&key, &ca).unwrap();
    let paths = (dir.path().join("cert.pem"), dir.path().join("key.pem"), dir.path().join("ca.pem"));
    std::fs::write(&paths.0, cert.pem()).unwrap();
    std::fs::write(&paths.1, key.serialize_pem()).unwrap();
    std::fs::write(&paths.2, ca.pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

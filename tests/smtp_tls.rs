//! STARTTLS (RFC 3207) with a certificate made by the test: swaks, smtplib, and the command injection
//! attack over a raw socket.

#[path = "support/smtp_harness.rs"]
mod smtp_harness;

use bartleby::spool::Queue as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use smtp_harness::{Harness, make_cert, python, read_reply, stdout, swaks};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

async fn bounded<F: std::future::Future>(test: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(90), test).await.expect("test finished in time")
}

async fn tls_harness() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(dir.path());
    let spool = dir.path().join("spool");
    Harness::start_in(dir, &spool, move |c| {
        c.smtp.tls_cert = Some(cert);
        c.smtp.tls_key = Some(key);
    })
    .await
}

fn connector(cert: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(cert).expect("cert")).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_starttls() {
    bounded(async {
        let harness = tls_harness().await;
        let output = swaks(&harness, &["--tls", "--from", "a@b.test", "--to", "x@example.test"]).await;
        let text = stdout(&output);
        assert!(output.status.success(), "{text}");
        assert!(text.contains("<-  250 STARTTLS"), "{text}");
        assert!(text.contains("<-  220 2.0.0 Ready to start TLS"), "{text}");
        assert!(text.contains("=== TLS started"), "{text}");
        // After TLS, EHLO does not offer STARTTLS again.
        let after = text.split("=== TLS started").nth(1).unwrap_or_default();
        assert!(!after.contains("STARTTLS"), "{after}");
        let (_, body) = harness.only_body();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("(bartleby) with ESMTPS id"), "{body}");
        harness.stop().await.expect("serve");
    })
    .await
}

const SMTPLIB_STARTTLS: &str = r#"
import smtplib, ssl, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), local_hostname='client.test', timeout=20)
s.ehlo()
print('BEFORE', s.has_extn('starttls'))
print(s.starttls(context=ssl._create_unverified_context()))
s.ehlo()
print('AFTER', s.has_extn('starttls'))
print('REFUSED', s.sendmail('a@b.test', ['x@example.test'], b'Subject: tls\r\n\r\nsecret\r\n'))
s.quit()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_starttls() {
    bounded(async {
        let harness = tls_harness().await;
        let text = stdout(&python(&harness, SMTPLIB_STARTTLS, &[]).await);
        assert!(text.contains("BEFORE True"), "{text}");
        assert!(text.contains("(220, b'2.0.0 Ready to start TLS')"), "{text}");
        assert!(text.contains("AFTER False"), "{text}");
        assert!(text.contains("REFUSED {}"), "{text}");
        let (_, body) = harness.only_body();
        assert!(body.ends_with(b"\r\nSubject: tls\r\n\r\nsecret\r\n"));
        harness.stop().await.expect("serve");
    })
    .await
}

/// CVE-2011-0411 and kin: commands pipelined behind STARTTLS in the same packet must not be
/// executed inside the TLS session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_command_injection_is_discarded() {
    bounded(async {
        let harness = tls_harness().await;
        let cert = harness.config.smtp.tls_cert.clone().expect("cert");
        let mut plain = BufReader::new(TcpStream::connect(harness.addr).await.expect("connect"));
        assert!(read_reply(&mut plain).await.starts_with("220 mx.test ESMTP bartleby"));
        plain.get_mut().write_all(b"EHLO client.test\r\n").await.expect("write");
        assert!(read_reply(&mut plain).await.contains("250 STARTTLS\r\n"));
        plain.get_mut().write_all(b"STARTTLS\r\nRSET\r\nMAIL FROM:<a@b.test>\r\n").await.expect("write");
        assert_eq!(read_reply(&mut plain).await, "220 2.0.0 Ready to start TLS\r\n");
        assert!(plain.buffer().is_empty(), "no plaintext reply to the injected commands");
        let tcp = plain.into_inner();
        let name = ServerName::try_from("mx.test").expect("name");
        let tls = connector(&cert).connect(name, tcp).await.expect("handshake");
        let mut tls = BufReader::new(tls);
        // No reply for the injected RSET or MAIL ever arrives.
        let mut line = String::new();
        let quiet = tokio::time::timeout(Duration::from_millis(700), tls.read_line(&mut line)).await;
        assert!(quiet.is_err(), "unexpected data after the handshake: {line:?}");
        // The session starts afresh: no EHLO remembered, no transaction.
        tls.get_mut().write_all(b"RCPT TO:<x@example.test>\r\nMAIL FROM:<a@b.test>\r\n").await.expect("write");
        assert_eq!(read_reply(&mut tls).await, "503 5.5.1 need MAIL command\r\n");
        assert_eq!(read_reply(&mut tls).await, "503 5.5.1 send EHLO or HELO first\r\n");
        tls.get_mut().write_all(b"EHLO client.test\r\n").await.expect("write");
        let ehlo = read_reply(&mut tls).await;
        assert!(ehlo.starts_with("250-mx.test\r\n") && !ehlo.contains("STARTTLS"), "{ehlo}");
        tls.get_mut().write_all(b"QUIT\r\n").await.expect("write");
        assert_eq!(read_reply(&mut tls).await, "221 2.0.0 Bye\r\n");
        assert!(harness.spool.is_empty());
        harness.stop().await.expect("serve");
    })
    .await
}

#[test]
fn bad_certificate_files_are_reported_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_cert(dir.path());
    let mut config = smtp_harness::test_config(dir.path());
    assert!(bartleby::smtp::tls_acceptor(&config).expect("no tls").is_none());
    config.smtp.tls_cert = Some(cert.clone());
    config.smtp.tls_key = Some(key);
    assert!(bartleby::smtp::tls_acceptor(&config).expect("valid").is_some());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    config.smtp.tls_key = Some(garbage.clone());
    let err = bartleby::smtp::tls_acceptor(&config).err().expect("bad key").to_string();
    assert!(err.starts_with("smtp.tls_key ") && err.contains("garbage.pem"), "{err}");
    config.smtp.tls_cert = Some(garbage);
    let err = bartleby::smtp::tls_acceptor(&config).err().expect("bad cert").to_string();
    assert!(err.starts_with("smtp.tls_cert ") && err.contains("no certificate"), "{err}");
}

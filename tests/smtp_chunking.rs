//! BDAT/CHUNKING and BINARYMIME (RFC 3030) and the Received header, over real sockets against
//! the in-process server: a raw client (swaks 20201014 and Python's smtplib cannot send BDAT)
//! pipelines chunks, a BDAT after HELO must not have its octets run as commands, and the
//! Received header is checked exactly for plain, TLS and SMTPUTF8 sessions.

#[path = "support/smtp_harness.rs"]
mod smtp_harness;

use bartleby::spool::{BodyType, Queue as _};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use smtp_harness::{Client, Harness, make_cert, read_reply, strip_received};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};

async fn bounded<F: std::future::Future>(test: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(90), test).await.expect("test finished in time")
}

/// Reads `n` replies and returns their last lines.
async fn replies(client: &mut Client, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(client.reply().await.lines().last().unwrap_or_default().to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_chunks_make_the_message_byte_for_byte() {
    bounded(async {
        let harness = Harness::start(|_| {}).await;
        let mut client = Client::connect(&harness).await;
        assert!(client.reply().await.starts_with("220 "));
        client.send(b"EHLO client.test\r\n").await;
        let ehlo = client.reply().await;
        assert!(ehlo.contains("250-CHUNKING\r\n") && ehlo.contains("250-BINARYMIME\r\n"), "{ehlo}");
        // A 2 MiB message in 64 KiB chunks, everything in as few writes as the socket takes.
        let mut message = b"Subject: chunks\r\n\r\n".to_vec();
        while message.len() < 2 * 1024 * 1024 {
            message.extend_from_slice(b".leading dot\r\n..two\r\n.\r\nplain text line\r\n");
        }
        let mut wire = b"MAIL FROM:<a@b.test> SIZE=3000000\r\nRCPT TO:<x@example.test>\r\n".to_vec();
        let chunks: Vec<&[u8]> = message.chunks(64 * 1024).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = if i + 1 == chunks.len() { " LAST" } else { "" };
            wire.extend_from_slice(format!("BDAT {}{last}\r\n", chunk.len()).as_bytes());
            wire.extend_from_slice(chunk);
        }
        wire.extend_from_slice(b"QUIT\r\n");
        client.send(&wire).await;
        let got = replies(&mut client, 2 + chunks.len() + 1).await;
        assert_eq!(&got[..2], ["250 2.1.0 Ok", "250 2.1.5 Ok"]);
        assert!(got[2..chunks.len() + 1].iter().all(|r| r == "250 2.0.0 65536 octets received"), "{got:?}");
        assert!(got[chunks.len() + 1].starts_with("250 2.0.0 Ok: queued as "), "{got:?}");
        assert_eq!(got[chunks.len() + 2], "221 2.0.0 Bye");
        // The 250 came after the commit: the message is in the spool as it was sent.
        let (_, body) = harness.only_body();
        assert!(strip_received(&body) == message.as_slice(), "stored byte for byte");
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_after_helo_never_runs_its_octets_as_commands() {
    bounded(async {
        let harness = Harness::start(|_| {}).await;
        let mut client = Client::connect(&harness).await;
        assert!(client.reply().await.starts_with("220 "));
        let smuggled =
            b"MAIL FROM:<evil@b.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: no\r\n\r\n.\r\nQUIT\r\n";
        let mut wire = b"HELO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\n".to_vec();
        wire.extend_from_slice(format!("BDAT {} LAST\r\n", smuggled.len()).as_bytes());
        wire.extend_from_slice(smuggled);
        wire.extend_from_slice(b"NOOP\r\n");
        client.send(&wire).await;
        let got = replies(&mut client, 5).await;
        assert_eq!(
            got,
            [
                "250 mx.test",
                "250 2.1.0 Ok",
                "250 2.1.5 Ok",
                "502 5.5.1 BDAT not available after HELO (CHUNKING needs EHLO)",
                "250 2.0.0 Ok"
            ]
        );
        // A BDAT whose size cannot be read: nobody knows where its data ends, so 421 and close.
        client.send(b"BDAT 12x LAST\r\nQUIT\r\n").await;
        let reply = client.reply().await;
        assert!(reply.starts_with("421 4.5.2 Syntax: BDAT chunk-size [LAST]"), "{reply}");
        assert!(client.closed().await);
        assert!(harness.spool.is_empty(), "nothing smuggled was queued");
        harness.stop().await.expect("serve");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binarymime_over_a_socket() {
    bounded(async {
        let harness = Harness::start(|_| {}).await;
        let mut client = Client::connect(&harness).await;
        assert!(client.reply().await.starts_with("220 "));
        let mut message = b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: binary\r\n\r\n".to_vec();
        message.extend((0..4096u32).map(|i| (i * 7 % 256) as u8));
        let mut wire =
            b"EHLO client.test\r\nMAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@example.test>\r\n".to_vec();
        wire.extend_from_slice(b"DATA\r\nRSET\r\nMAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@example.test>\r\n");
        wire.extend_from_slice(format!("BDAT {}\r\n", 1000).as_bytes());
        wire.extend_from_slice(&message[..1000]);
        wire.extend_from_slice(format!("BDAT {} LAST\r\n", message.len() - 1000).as_bytes());
        wire.extend_from_slice(&message[1000..]);
        client.send(&wire).await;
        let got = replies(&mut client, 9).await;
        assert_eq!(got[3], "503 5.5.1 BODY=BINARYMIME needs BDAT, not DATA");
        assert_eq!(got[7], "250 2.0.0 1000 octets received");
        assert!(got[8].starts_with("250 2.0.0 Ok: queued as "), "{got:?}");
        let (envelope, body) = harness.only_body();
        assert_eq!(envelope.body, BodyType::BinaryMime);
        assert!(strip_received(&body) == message.as_slice());
        harness.stop().await.expect("serve");
    })
    .await
}

/// The Received header of the only message, with its date replaced by DATE.
fn received_header(harness: &Harness) -> (String, String) {
    let (envelope, body) = harness.only_body();
    let header = String::from_utf8_lossy(&body[..body.len() - strip_received(&body).len()]).into_owned();
    let at = header.rfind("; ").expect("date") + 2;
    (format!("{}DATE\r\n", &header[..at]), envelope.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_header_of_plain_and_smtputf8_sessions() {
    bounded(async {
        for (mail, protocol) in [("MAIL FROM:<a@b.test>", "ESMTP"), ("MAIL FROM:<j\u{f6}rg@b.test> SMTPUTF8", "UTF8SMTP")] {
            let harness = Harness::start(|_| {}).await;
            let mut client = Client::connect(&harness).await;
            assert!(client.reply().await.starts_with("220 "));
            let wire = format!("EHLO client.test\r\n{mail}\r\nRCPT TO:<x@example.test>\r\nBDAT 4 LAST\r\nhi\r\n");
            client.send(wire.as_bytes()).await;
            assert!(replies(&mut client, 4).await[3].starts_with("250 2.0.0 Ok: queued"));
            let (header, id) = received_header(&harness);
            assert_eq!(
                header,
                format!(
                    "Received: from client.test ([127.0.0.1])\r\n\tby mx.test (bartleby) with {protocol} id {id}\r\n\tfor <x@example.test>; DATE\r\n"
                )
            );
            harness.stop().await.expect("serve");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_header_names_the_tls_version_and_cipher() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = make_cert(dir.path());
        let spool = dir.path().join("spool");
        let cert_file = cert.clone();
        let harness = Harness::start_in(dir, &spool, move |c| {
            c.smtp.tls_cert = Some(cert_file);
            c.smtp.tls_key = Some(key);
        })
        .await;
        let mut plain = BufReader::new(tokio::net::TcpStream::connect(harness.addr).await.expect("connect"));
        assert!(read_reply(&mut plain).await.starts_with("220 "));
        plain.get_mut().write_all(b"EHLO client.test\r\nSTARTTLS\r\n").await.expect("write");
        read_reply(&mut plain).await;
        assert_eq!(read_reply(&mut plain).await, "220 2.0.0 Ready to start TLS\r\n");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(&cert).expect("cert")).expect("root");
        // TLS 1.3 with AES-256-GCM only, so the header's cipher is known.
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites.retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from("mx.test").expect("name");
        let mut tls = BufReader::new(connector.connect(name, plain.into_inner()).await.expect("handshake"));
        tls.get_mut()
            .write_all(b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\nhi\r\n.\r\n")
            .await
            .expect("write");
        for _ in 0..4 {
            read_reply(&mut tls).await;
        }
        assert!(read_reply(&mut tls).await.starts_with("250 2.0.0 Ok: queued"));
        let (header, id) = received_header(&harness);
        assert_eq!(
            header,
            format!(
                "Received: from client.test ([127.0.0.1])\r\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n\tby mx.test (bartleby) with ESMTPS id {id}\r\n\tfor <x@example.test>; DATE\r\n"
            )
        );
        harness.stop().await.expect("serve");
    })
    .await
}

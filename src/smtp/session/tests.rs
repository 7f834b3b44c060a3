use super::*;
use crate::config::Config;
use crate::recipients::Decision;
use crate::spool::{BodyType, DsnNotify, DsnRet, Spool};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The default `smtp.max_errors`.
const MAX_ERRORS: usize = 20;

struct Fixture {
    _dir: tempfile::TempDir,
    context: Arc<ServerContext>,
    queued: Arc<AtomicUsize>,
}

fn fixture(tweak: impl FnOnce(&mut Config)) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::demo();
    config.hostname = "mx.test".into();
    config.relay.domains = vec!["example.test".into(), "other.test".into()];
    config.queue.dir = dir.path().to_path_buf();
    config.queue.min_free = 0;
    tweak(&mut config);
    let (spool, _) = Spool::open(dir.path()).expect("spool");
    let queued = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&queued);
    let on_queued = Box::new(move |_: &Envelope| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let config = Arc::new(config);
    let mut context = ServerContext::new(Arc::clone(&config), Arc::new(spool), on_queued);
    if !config.domain.is_empty() {
        let recipients = crate::recipients::Recipients::open(Arc::clone(&config), dir.path()).expect("recipients");
        context.recipients = Some(Arc::new(recipients));
    }
    let context = Arc::new(context);
    Fixture { _dir: dir, context, queued }
}

impl Fixture {
    fn session(&self, tls: bool) -> Session {
        Session::new(Arc::clone(&self.context), Arc::new(SpaceMonitor::new()), "192.0.2.7".parse().expect("ip"), tls)
    }
}

/// What the server would do with the actions: the replies as text, and how the batch ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Open,
    Closed,
    StartTls,
}

/// Feeds `input`, commits messages as the server would, and returns every reply sent.
fn talk(session: &mut Session, input: &[u8]) -> (String, Ended) {
    let mut text = String::new();
    let mut actions: std::collections::VecDeque<Action> = session.feed(input).into();
    while let Some(action) = actions.pop_front() {
        match action {
            Action::Reply(reply) => text.push_str(&reply.to_string()),
            Action::Close(reply) => {
                text.push_str(&reply.to_string());
                return (text, Ended::Closed);
            }
            Action::StartTls(reply) => {
                text.push_str(&reply.to_string());
                return (text, Ended::StartTls);
            }
            Action::Verify(recipient) => {
                // As if the primary were down.
                actions.push_back(session.verified(*recipient, Decision::TempFail));
                actions.extend(session.feed(&[]));
            }
            Action::Commit(pending) => {
                let reply = session.committed(pending.commit());
                text.push_str(&reply.to_string());
                actions.extend(session.feed(&[]));
            }
        }
    }
    (text, Ended::Open)
}

/// What a TLS 1.3 handshake with rustls's preferred suite agrees on.
fn tls13() -> TlsInfo {
    TlsInfo { version: "TLSv1.3".into(), cipher: "TLS_AES_256_GCM_SHA384".into(), bits: Some(256) }
}

fn codes(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.as_bytes().get(3) == Some(&b' ')).map(|l| &l[..3]).collect()
}

#[test]
fn greeting_and_ehlo_keywords() {
    let fx = fixture(|c| c.smtp.max_message_size = 12345);
    let mut session = fx.session(false);
    assert_eq!(session.greeting().to_string(), "220 mx.test ESMTP bartleby\r\n");
    let (text, _) = talk(&mut session, b"EHLO client.test\r\n");
    assert_eq!(
        text,
        "250-mx.test\r\n250-SIZE 12345\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n\
         250-BINARYMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 DSN\r\n"
    );
    let (text, _) = talk(&mut session, b"HELO client.test\r\n");
    assert_eq!(text, "250 mx.test\r\n");
    let mut tls = fx.session(true);
    let (text, _) = talk(&mut tls, b"EHLO client.test\r\n");
    assert!(text.ends_with("250-DSN\r\n250 STARTTLS\r\n"), "{text}");
}

#[test]
fn small_verbs() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let (text, _) = talk(&mut session, b"NOOP\r\nVRFY alice\r\nHELP\r\nEXPN list\r\nFOO\r\nSTARTTLS\r\nRSET\r\n");
    assert_eq!(
        text,
        "250 2.0.0 Ok\r\n252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n\
         214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS\r\n\
         502 5.5.1 EXPN not implemented\r\n500 5.5.2 command unrecognized: FOO\r\n\
         502 5.5.1 STARTTLS not available\r\n250 2.0.0 Ok\r\n"
    );
    assert_eq!(talk(&mut session, b"QUIT\r\nNOOP\r\n"), ("221 2.0.0 Bye\r\n".to_string(), Ended::Closed));
}

#[test]
fn sequence_errors() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let (text, _) = talk(&mut session, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n");
    assert_eq!(
        text,
        "503 5.5.1 send EHLO or HELO first\r\n503 5.5.1 need MAIL command\r\n503 5.5.1 need MAIL command\r\n"
    );
    let (text, _) = talk(&mut session, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\nDATA\r\n");
    assert_eq!(codes(&text), ["250", "250", "503", "554"]);
    assert!(text.contains("503 5.5.1 nested MAIL command\r\n554 5.5.1 no valid recipients\r\n"), "{text}");
    // RSET ends the transaction; so does EHLO.
    let (text, _) = talk(&mut session, b"RSET\r\nRCPT TO:<c@example.test>\r\nMAIL FROM:<>\r\nEHLO c.test\r\nDATA\r\n");
    assert_eq!(codes(&text), ["250", "503", "250", "250", "503"]);
}

#[test]
fn pipelined_session_in_one_chunk_queues_the_message() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let input = b"EHLO client.test\r\nMAIL FROM:<a@b.test> BODY=8BITMIME RET=HDRS ENVID=e+2B1\r\n\
        RCPT TO:<c@Example.TEST> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@example.test\r\n\
        RCPT TO:<d@elsewhere.test>\r\nRCPT TO:<postmaster>\r\nDATA\r\n\
        Subject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n";
    let (text, ended) = talk(&mut session, input);
    assert_eq!(ended, Ended::Closed);
    assert_eq!(codes(&text), ["250", "250", "250", "550", "250", "354", "250", "221"], "{text}");
    assert!(text.contains("550 5.7.1 relaying denied\r\n"), "{text}");
    assert_eq!(fx.queued.load(Ordering::SeqCst), 1);
    let envelopes = fx.context.spool.list();
    assert_eq!(envelopes.len(), 1);
    let env = &envelopes[0];
    assert!(text.contains(&format!("250 2.0.0 Ok: queued as {}\r\n", env.id)), "{text}");
    assert_eq!(env.sender, "a@b.test");
    let addresses: Vec<_> = env.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(addresses, ["c@Example.TEST", "postmaster@example.test"]);
    assert_eq!(env.recipients[0].notify, Some(vec![DsnNotify::Success, DsnNotify::Failure]));
    assert_eq!(env.recipients[0].orcpt.as_deref(), Some("rfc822;c@example.test"));
    assert_eq!((env.body, env.ret, env.envid.as_deref()), (BodyType::EightBitMime, Some(DsnRet::Hdrs), Some("e+1")));
    assert_eq!((env.client_ip, env.helo.as_str()), (Some("192.0.2.7".parse().expect("ip")), "client.test"));
    assert_eq!(env.next_attempt, env.arrived);
    assert_eq!(env.history[0].event, "received from client.test [192.0.2.7]");
    let body = String::from_utf8(fx.context.spool.read_body(&env.id).expect("body")).expect("utf8");
    let expected_start =
        format!("Received: from client.test ([192.0.2.7])\r\n\tby mx.test (bartleby) with ESMTP id {}; ", env.id);
    assert!(body.starts_with(&expected_start), "{body}");
    assert!(body.ends_with("\r\nSubject: hi\r\n\r\n.dot\r\n"), "{body}");
    assert_eq!(env.size, body.len() as u64);
}

#[test]
fn received_names_the_only_recipient_and_helo_protocol() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let (text, _) = talk(&mut session, b"HELO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<x@other.test>\r\nDATA\r\nhi\r\n.\r\n");
    assert_eq!(codes(&text), ["250", "250", "250", "354", "250"], "{text}");
    let env = &fx.context.spool.list()[0];
    assert_eq!(env.sender, "");
    let body = String::from_utf8(fx.context.spool.read_body(&env.id).expect("body")).expect("utf8");
    let start = format!(
        "Received: from c.test ([192.0.2.7])\r\n\tby mx.test (bartleby) with SMTP id {}\r\n\tfor <x@other.test>; ",
        env.id
    );
    assert!(body.starts_with(&start), "{body}");
}

#[test]
fn recipient_limits_and_checks() {
    let fx = fixture(|c| c.smtp.max_recipients = 2);
    let mut session = fx.session(false);
    let (text, _) = talk(
        &mut session,
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nRCPT TO:<bad@>\r\n\
          RCPT TO:<j\xc3\xb6rg@example.test>\r\nRCPT TO:<y@[127.0.0.1]>\r\nRCPT TO:<y@example.test>\r\nRCPT TO:<z@example.test>\r\n",
    );
    assert_eq!(
        text.lines().skip(9).collect::<Vec<_>>(),
        [
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "501 5.1.3 bad recipient address syntax: invalid domain",
            "553 5.6.7 a non-ASCII recipient address needs SMTPUTF8",
            "550 5.7.1 relaying denied",
            "250 2.1.5 Ok",
            "452 4.5.3 too many recipients",
        ]
    );
}

#[test]
fn smtputf8_addresses() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let (text, _) = talk(
        &mut session,
        "EHLO c.test\r\nMAIL FROM:<j\u{f6}rg@b.test>\r\nMAIL FROM:<j\u{f6}rg@b.test> SMTPUTF8\r\nRCPT TO:<\u{e9}l\u{e8}ve@example.test>\r\nDATA\r\nSubject: caf\u{e9}\r\n\r\n.\r\n".as_bytes(),
    );
    assert_eq!(codes(&text), ["250", "553", "250", "250", "354", "250"], "{text}");
    let env = &fx.context.spool.list()[0];
    assert!(env.smtputf8);
    assert_eq!(env.recipients[0].address, "\u{e9}l\u{e8}ve@example.test");
}

#[test]
fn size_is_checked_at_mail_and_in_data() {
    let fx = fixture(|c| c.smtp.max_message_size = 100);
    let mut session = fx.session(false);
    let (text, _) =
        talk(&mut session, b"EHLO c.test\r\nMAIL FROM:<a@b.test> SIZE=101\r\nMAIL FROM:<a@b.test> SIZE=100\r\n");
    assert!(text.contains("552 5.3.4 message size exceeds fixed limit of 100 octets\r\n"), "{text}");
    let mut data = b"RCPT TO:<x@example.test>\r\nDATA\r\n".to_vec();
    data.extend(std::iter::repeat_n(b"0123456789\r\n".as_slice(), 20).flatten());
    data.extend_from_slice(b".\r\nNOOP\r\n");
    let (text, _) = talk(&mut session, &data);
    assert_eq!(codes(&text), ["250", "354", "552", "250"], "{text}");
    assert!(fx.context.spool.is_empty());
}

#[test]
fn bare_newline_rejects_the_message_and_smuggles_nothing() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let (text, _) = talk(
        &mut session,
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\nSubject: one\r\n\r\nbody\n.\n\
          MAIL FROM:<evil@b.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\nNOOP\r\n",
    );
    assert_eq!(codes(&text), ["250", "250", "250", "354", "550", "250"], "{text}");
    assert!(text.contains("550 5.5.2 message contains bare CR or LF\r\n"), "{text}");
    assert!(fx.context.spool.is_empty());
    assert_eq!(fx.queued.load(Ordering::SeqCst), 0);
}

#[test]
fn long_command_lines_are_refused_without_buffering() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    for _ in 0..100 {
        let (text, _) = talk(&mut session, &[b'x'; 1000]);
        assert_eq!(text, "");
        assert!(session.pending.len() <= MAX_PARAMETER_LINE);
    }
    let (text, _) = talk(&mut session, b"xx\r\nNOOP\r\n");
    assert_eq!(text, "500 5.5.2 line too long\r\n250 2.0.0 Ok\r\n");
    let long = format!("NOOP {}\r\nNOOP\r\n", "y".repeat(600));
    assert_eq!(talk(&mut session, long.as_bytes()).0, "500 5.5.2 line too long\r\n250 2.0.0 Ok\r\n");
}

#[test]
fn long_text_lines_and_mail_loops_are_refused_after_the_data() {
    let fx = fixture(|c| {
        c.smtp.max_line_length = 1000;
        c.smtp.max_received_headers = 2;
    });
    let mut session = fx.session(false);
    let mut input = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n".to_vec();
    input.extend_from_slice(&[b'a'; 1001]);
    input.extend_from_slice(b"\r\n.\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n");
    input.extend_from_slice(b"Received: 1\r\nReceived: 2\r\nReceived: 3\r\n\r\n.\r\n");
    let (text, _) = talk(&mut session, &input);
    assert!(text.contains("554 5.6.0 message contains a line longer than 1000 octets\r\n"), "{text}");
    assert!(text.ends_with("554 5.4.6 too many Received headers: mail loop\r\n"), "{text}");
    assert!(fx.context.spool.is_empty());
}

#[test]
fn starttls_discards_pipelined_input_and_resets_state() {
    let fx = fixture(|_| {});
    let mut session = fx.session(true);
    let (text, ended) = talk(&mut session, b"EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<a@b.test>\r\n");
    assert_eq!(ended, Ended::StartTls);
    assert!(text.ends_with("220 2.0.0 Ready to start TLS\r\n"), "{text}");
    session.tls_started(tls13());
    // The injected MAIL was thrown away, and the EHLO before TLS is forgotten.
    let (text, _) = talk(&mut session, b"");
    assert_eq!(text, "");
    let (text, _) = talk(&mut session, b"MAIL FROM:<a@b.test>\r\nEHLO c.test\r\nSTARTTLS\r\n");
    assert!(text.starts_with("503 5.5.1 send EHLO or HELO first\r\n"), "{text}");
    assert!(!text.contains("STARTTLS\r\n"), "{text}");
    assert!(text.ends_with("503 5.5.1 TLS already active\r\n"), "{text}");
    let (text, _) = talk(&mut session, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\nhi\r\n.\r\n");
    assert_eq!(codes(&text), ["250", "250", "354", "250"], "{text}");
    let env = &fx.context.spool.list()[0];
    let body = String::from_utf8(fx.context.spool.read_body(&env.id).expect("body")).expect("utf8");
    assert!(body.contains("with ESMTPS id"), "{body}");
}

#[test]
fn requiretls_is_offered_and_accepted_only_over_tls() {
    let fx = fixture(|_| {});
    let mut plain = fx.session(true);
    let (text, _) = talk(&mut plain, b"EHLO c.test\r\n");
    assert!(!text.contains("REQUIRETLS"), "{text}");
    // RFC 8689: without TLS the parameter is refused, and the session goes on.
    let (text, _) = talk(&mut plain, b"MAIL FROM:<a@b.test> REQUIRETLS\r\nMAIL FROM:<a@b.test>\r\n");
    assert!(text.starts_with("530 5.7.10 "), "{text}");
    assert!(text.ends_with("250 2.1.0 Ok\r\n"), "{text}");

    let fx = fixture(|_| {});
    let mut session = fx.session(true);
    talk(&mut session, b"EHLO c.test\r\nSTARTTLS\r\n");
    session.tls_started(tls13());
    let (text, _) = talk(&mut session, b"EHLO c.test\r\n");
    assert!(text.contains("250-REQUIRETLS\r\n") || text.ends_with("250 REQUIRETLS\r\n"), "{text}");
    let (text, _) =
        talk(&mut session, b"MAIL FROM:<a@b.test> REQUIRETLS\r\nRCPT TO:<x@example.test>\r\nDATA\r\nhi\r\n.\r\n");
    assert_eq!(codes(&text), ["250", "250", "354", "250"], "{text}");
    let (envelope, _) = only_message(&fx);
    assert!(envelope.requiretls);
}

#[test]
fn starttls_inside_a_transaction_is_refused() {
    let fx = fixture(|_| {});
    let mut session = fx.session(true);
    let (text, ended) = talk(&mut session, b"EHLO c.test\r\nMAIL FROM:<>\r\nSTARTTLS\r\n");
    assert_eq!(ended, Ended::Open);
    assert!(text.ends_with("503 5.5.1 MAIL transaction in progress\r\n"), "{text}");
}

#[test]
fn low_space_refuses_mail() {
    let fx = fixture(|c| c.queue.min_free = u64::MAX);
    let mut session = fx.session(false);
    let (text, _) = talk(&mut session, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n");
    assert!(text.ends_with("452 4.3.1 insufficient system storage\r\n"), "{text}");
}

#[test]
fn bad_senders() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let (text, _) = talk(&mut session, b"EHLO c.test\r\nMAIL FROM:<nodomain>\r\nMAIL FROM:<a@b.test> FOO=1\r\n");
    assert!(text.contains("501 5.1.7 bad sender address syntax"), "{text}");
    assert!(text.ends_with("555 5.5.4 unsupported MAIL parameter FOO\r\n"), "{text}");
}

#[test]
fn too_many_errors_end_the_session() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let (text, ended) = talk(&mut session, "BAD\r\n".repeat(MAX_ERRORS + 5).as_bytes());
    assert_eq!(ended, Ended::Closed);
    assert_eq!(text.lines().count(), MAX_ERRORS);
    assert!(text.ends_with("421 4.7.0 mx.test too many errors\r\n"), "{text}");
}

#[test]
fn overshooting_recipients_is_not_an_error() {
    let fx = fixture(|c| c.smtp.max_recipients = 1);
    let mut session = fx.session(false);
    let mut input = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n".to_vec();
    for _ in 0..MAX_ERRORS + 10 {
        input.extend_from_slice(b"RCPT TO:<x@example.test>\r\n");
    }
    input.extend_from_slice(b"DATA\r\nhi\r\n.\r\n");
    let (text, ended) = talk(&mut session, &input);
    assert_eq!(ended, Ended::Open);
    assert_eq!(text.matches("452 4.5.3 too many recipients\r\n").count(), MAX_ERRORS + 9, "{text}");
    assert!(text.contains("354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as "), "{text}");
    assert_eq!(fx.context.spool.len(), 1);
}

#[test]
fn data_split_across_feeds() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let input =
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\nA: b\r\n\r\n..x\r\n.\r\nNOOP\r\n";
    let mut text = String::new();
    for byte in input {
        text.push_str(&talk(&mut session, std::slice::from_ref(byte)).0);
    }
    assert_eq!(codes(&text), ["250", "250", "250", "354", "250", "250"], "{text}");
    let env = &fx.context.spool.list()[0];
    let body = fx.context.spool.read_body(&env.id).expect("body");
    assert!(body.ends_with(b"\r\nA: b\r\n\r\n.x\r\n"));
}

#[test]
fn max_errors_is_configurable() {
    let fx = fixture(|c| c.smtp.max_errors = 3);
    let mut session = fx.session(false);
    let (text, ended) = talk(&mut session, "BAD\r\n".repeat(10).as_bytes());
    assert_eq!(ended, Ended::Closed);
    assert_eq!(text.lines().count(), 3, "{text}");
}

#[test]
fn message_and_recipient_rates_per_ip() {
    let fx = fixture(|c| {
        c.smtp.max_messages_per_ip_per_minute = 2;
        c.smtp.max_recipients_per_ip_per_minute = 3;
    });
    let mut first = fx.session(false);
    let (text, _) = talk(
        &mut first,
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nRCPT TO:<y@example.test>\r\nRSET\r\n",
    );
    assert_eq!(codes(&text), ["220", "250", "250", "250", "250", "250"][1..].to_vec(), "{text}");
    // A second session from the same address shares the counts.
    let mut second = fx.session(false);
    let (text, _) = talk(
        &mut second,
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<z@example.test>\r\nRCPT TO:<w@example.test>\r\nRSET\r\nMAIL FROM:<a@b.test>\r\n",
    );
    assert!(text.contains("452 4.7.0 too many recipients from 192.0.2.7"), "{text}");
    assert!(text.ends_with("452 4.7.0 too much mail from 192.0.2.7, try again later\r\n"), "{text}");
}

#[test]
fn header_size_is_bounded() {
    let fx = fixture(|c| c.smtp.max_header_size = 4096);
    let mut session = fx.session(false);
    let mut input = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n".to_vec();
    for i in 0..100 {
        input.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "y".repeat(60)).as_bytes());
    }
    input.extend_from_slice(b"\r\nbody\r\n.\r\n");
    let (text, _) = talk(&mut session, &input);
    assert!(text.ends_with("552 5.3.4 message header size exceeds limit of 4096 octets\r\n"), "{text}");
    assert_eq!(fx.context.spool.len(), 0);
}

#[test]
fn unknown_recipients_follow_the_domain_policy() {
    use crate::config::{DomainConfig, UnknownPolicy};
    let list = tempfile::NamedTempFile::new().expect("list");
    std::fs::write(list.path(), "alice@example.test\n").expect("write");
    let path = list.path().to_path_buf();
    let fx = fixture(move |c| {
        let strict = DomainConfig { recipients_file: Some(path.clone()), ..DomainConfig::default() };
        let hold = DomainConfig {
            recipients_file: Some(path),
            unknown_recipient: UnknownPolicy::Hold,
            ..DomainConfig::default()
        };
        c.domain.insert("example.test".into(), strict);
        c.domain.insert("other.test".into(), hold);
    });
    crate::recipients::add(
        &fx._dir.path().into(),
        &["ghost@example.test".into()],
        false,
        crate::recipients::cache::Source::Operator,
        None,
    )
    .expect("add");
    let mut session = fx.session(false);
    let (text, _) = talk(
        &mut session,
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nRCPT TO:<ghost@example.test>\r\nRCPT TO:<carol@other.test>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n",
    );
    assert!(text.contains("451 4.4.3 recipient cannot be verified now"), "{text}");
    assert!(text.contains("550 5.1.1 recipient address rejected: no such user"), "{text}");
    assert!(text.contains("250 2.0.0 Ok: queued as"), "{text}");
    let queued = fx.context.spool.list();
    assert_eq!(queued.len(), 1);
    let addresses: Vec<&str> = queued[0].recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(addresses, ["alice@example.test", "carol@other.test"]);
    assert!(queued[0].held, "carol was accepted under the hold policy");
}

#[test]
fn declared_sizes_and_data_count_against_the_free_space() {
    let fx = fixture(|c| c.smtp.max_message_size = u64::MAX);
    let free = fx.context.spool.space().expect("statvfs").free_bytes;
    // Other processes write to this filesystem too: leave them a hundredth of it.
    let margin = free / 100;
    let space = Arc::new(SpaceMonitor::new());
    let first = space.reserve(&fx.context, free / 2 - margin).expect("half fits");
    let mut second = space.reserve(&fx.context, free / 2 - margin).expect("the other half fits");
    assert!(space.reserve(&fx.context, free / 4).is_none(), "a quarter more does not");
    assert!(!space.grow(&mut second, &fx.context, free / 2 + free / 4), "nor can a reservation grow by it");
    assert!(space.confirm(&second, &fx.context, second.octets()));
    drop(first);
    assert_eq!(space.reserved(), second.octets());
    // Until the disk is looked at again, the octets given back count as written (they might be).
    assert!(!space.grow(&mut second, &fx.context, free / 2 + free / 4));
    assert!(space.confirm(&second, &fx.context, second.octets()), "a fresh look, as before a commit");
    assert!(space.grow(&mut second, &fx.context, free / 2 + free / 4), "room again once one is given back");
    drop(second);
    assert_eq!(space.reserved(), 0);
    // Through a session: a SIZE larger than the free space gets 452 at MAIL, and nothing stays reserved.
    let mut session =
        Session::new(Arc::clone(&fx.context), Arc::clone(&space), "192.0.2.7".parse().expect("ip"), false);
    let mail = format!("EHLO c.test\r\nMAIL FROM:<a@b.test> SIZE={}\r\nMAIL FROM:<a@b.test> SIZE=100\r\n", free + 1);
    let (text, _) = talk(&mut session, mail.as_bytes());
    assert_eq!(codes(&text), ["250", "452", "250"], "{text}");
    assert!(text.contains("452 4.3.1 insufficient system storage\r\n"), "{text}");
    assert_eq!(space.reserved(), 100);
    let (text, _) = talk(&mut session, b"RCPT TO:<x@example.test>\r\nDATA\r\nSubject: s\r\n\r\nhi\r\n.\r\n");
    assert_eq!(codes(&text), ["250", "354", "250"], "{text}");
    assert_eq!(space.reserved(), 0, "given back after the commit");
}

/// The stored body of the only queued message, and its envelope.
fn only_message(fx: &Fixture) -> (Envelope, Vec<u8>) {
    let list = fx.context.spool.list();
    assert_eq!(list.len(), 1, "one message queued: {list:?}");
    let body = fx.context.spool.read_body(&list[0].id).expect("body");
    (list[0].clone(), body)
}

/// The body below our Received header.
fn below_received(body: &[u8]) -> &[u8] {
    let text = body.windows(2).position(|w| w == b"; ").expect("date");
    let end = body[text..].windows(2).position(|w| w == b"\r\n").expect("CRLF") + text + 2;
    &body[end..]
}

const ENVELOPE: &[u8] = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\n";

#[test]
fn bdat_chunks_make_one_message_verbatim() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let mut input = ENVELOPE.to_vec();
    // No dot-stuffing: ".." and a lone "." line are message text.
    input.extend_from_slice(b"BDAT 16\r\nSubject: s\r\n\r\n..BDAT 10 LAST\r\n\r\n.\r\nend\r\nNOOP\r\n");
    let (text, ended) = talk(&mut session, &input);
    assert_eq!(ended, Ended::Open);
    assert_eq!(codes(&text), ["250", "250", "250", "250", "250", "250"], "{text}");
    assert!(text.contains("250 2.0.0 16 octets received\r\n250 2.0.0 Ok: queued as "), "{text}");
    let (env, body) = only_message(&fx);
    assert_eq!(below_received(&body), b"Subject: s\r\n\r\n..\r\n.\r\nend\r\n");
    assert_eq!((env.body, env.size), (BodyType::SevenBit, body.len() as u64));
    assert_eq!(fx.queued.load(Ordering::SeqCst), 1);
}

#[test]
fn bdat_split_at_every_octet_and_zero_last() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let mut input = ENVELOPE.to_vec();
    input.extend_from_slice(b"BDAT 6\r\nA: b\r\nBDAT 3\r\n\r\nxBDAT 0 LAST\r\nNOOP\r\n");
    let mut text = String::new();
    for byte in &input {
        assert!(!session.in_data() || session.chunk.is_some(), "between chunks the session reads commands");
        text.push_str(&talk(&mut session, std::slice::from_ref(byte)).0);
    }
    assert_eq!(codes(&text), ["250", "250", "250", "250", "250", "250", "250"], "{text}");
    assert_eq!(below_received(&only_message(&fx).1), b"A: b\r\n\r\nx");
    // BDAT 0 LAST alone is an empty message (below our header).
    let (text, _) = talk(&mut session, b"MAIL FROM:<>\r\nRCPT TO:<y@example.test>\r\nBDAT 0 LAST\r\n");
    assert_eq!(codes(&text), ["250", "250", "250"], "{text}");
    assert_eq!(fx.context.spool.len(), 2);
}

#[test]
fn bdat_without_chunking_consumes_its_octets() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    // Before any greeting, and after HELO (no extensions): refused, and the octets announced,
    // which look like commands, are read and dropped, never run.
    let (text, ended) = talk(&mut session, b"BDAT 6\r\nQUIT\r\nNOOP\r\n");
    assert_eq!((text.as_str(), ended), ("503 5.5.1 send EHLO or HELO first\r\n250 2.0.0 Ok\r\n", Ended::Open));
    let smuggled = b"MAIL FROM:<evil@b.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n";
    let mut input = b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\n".to_vec();
    input.extend_from_slice(format!("BDAT {} LAST\r\n", smuggled.len()).as_bytes());
    input.extend_from_slice(smuggled);
    input.extend_from_slice(b"NOOP\r\n");
    let (text, ended) = talk(&mut session, &input);
    assert_eq!(ended, Ended::Open);
    assert_eq!(codes(&text), ["250", "250", "250", "502", "250"], "{text}");
    assert!(text.contains("502 5.5.1 BDAT not available after HELO (CHUNKING needs EHLO)\r\n"), "{text}");
    assert!(fx.context.spool.is_empty());
}

#[test]
fn bdat_out_of_sequence_is_refused_after_its_octets() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let (text, _) =
        talk(&mut session, b"EHLO c.test\r\nBDAT 6 LAST\r\nRSET\r\nMAIL FROM:<a@b.test>\r\nBDAT 4\r\nDATANOOP\r\n");
    assert_eq!(codes(&text), ["250", "503", "250", "554", "250"], "{text}");
    assert!(
        text.contains("503 5.5.1 need MAIL command\r\n250 2.1.0 Ok\r\n554 5.5.1 no valid recipients\r\n"),
        "{text}"
    );
    // Within a chunked transaction, DATA, RCPT and MAIL are out of place (RFC 3030 2).
    let (text, _) = talk(
        &mut session,
        b"RCPT TO:<x@example.test>\r\nBDAT 2\r\nA:DATA\r\nRCPT TO:<y@example.test>\r\nMAIL FROM:<a@b.test>\r\nBDAT 4 LAST\r\n b\r\n",
    );
    assert_eq!(codes(&text), ["250", "250", "503", "503", "503", "250"], "{text}");
    assert!(text.contains("503 5.5.1 DATA after BDAT\r\n503 5.5.1 RCPT after BDAT\r\n503 5.5.1 nested MAIL"), "{text}");
    assert_eq!(below_received(&only_message(&fx).1), b"A: b\r\n");
}

#[test]
fn rset_and_ehlo_discard_chunks() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let mut input = ENVELOPE.to_vec();
    input.extend_from_slice(b"BDAT 5\r\nfirstRSET\r\nBDAT 3 LAST\r\nabc");
    input.extend_from_slice(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nBDAT 5\r\nfirstEHLO c.test\r\n");
    input.extend_from_slice(ENVELOPE);
    input.extend_from_slice(b"BDAT 4 LAST\r\nkept");
    let (text, _) = talk(&mut session, &input);
    assert_eq!(text.matches("503 5.5.1 need MAIL command").count(), 1, "{text}");
    assert_eq!(below_received(&only_message(&fx).1), b"kept");
}

#[test]
fn bdat_beyond_the_size_limit_is_read_and_refused() {
    let fx = fixture(|c| c.smtp.max_message_size = 100);
    let mut session = fx.session(false);
    let mut input = ENVELOPE.to_vec();
    input.extend_from_slice(b"BDAT 101 LAST\r\n");
    input.extend_from_slice(&[b'Q'; 101]);
    input.extend_from_slice(b"NOOP\r\n");
    let (text, _) = talk(&mut session, &input);
    assert!(text.ends_with("552 5.3.4 message size exceeds fixed limit of 100 octets\r\n250 2.0.0 Ok\r\n"), "{text}");
    // Over two chunks: the second is refused, and the transaction with it, so a chunk pipelined
    // behind it is read and gets 503.
    let mut input = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nBDAT 60\r\n".to_vec();
    input.extend_from_slice(&[b'x'; 60]);
    input.extend_from_slice(b"BDAT 60\r\n");
    input.extend_from_slice(&[b'y'; 60]);
    input.extend_from_slice(b"BDAT 4 LAST\r\nNOOPNOOP\r\n");
    let (text, _) = talk(&mut session, &input);
    assert_eq!(codes(&text), ["250", "250", "250", "552", "503", "250"], "{text}");
    assert!(fx.context.spool.is_empty());
}

#[test]
fn content_checks_apply_to_chunks() {
    let fx = fixture(|c| c.smtp.max_received_headers = 1);
    let mut session = fx.session(false);
    let mut input = ENVELOPE.to_vec();
    // A bare LF is refused at the chunk that holds it; the transaction ends there.
    input.extend_from_slice(b"BDAT 8\r\nA: b\nc\r\nBDAT 2 LAST\r\n\r\n");
    input.extend_from_slice(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\n");
    input.extend_from_slice(b"BDAT 31 LAST\r\nReceived: 1\r\nReceived: 2\r\n\r\nx\r\n");
    input.extend_from_slice(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nBDAT 5 LAST\r\nA: b\r");
    let (text, _) = talk(&mut session, &input);
    assert_eq!(codes(&text), ["250", "250", "250", "550", "503", "250", "250", "554", "250", "250", "550"], "{text}");
    assert!(text.contains("550 5.5.2 message contains bare CR or LF\r\n503 5.5.1 need MAIL command\r\n"), "{text}");
    assert!(text.contains("554 5.4.6 too many Received headers: mail loop\r\n"), "{text}");
    assert!(fx.context.spool.is_empty());
}

#[test]
fn binarymime_needs_bdat_and_keeps_its_octets() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    let (text, _) = talk(
        &mut session,
        b"EHLO c.test\r\nMAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@example.test>\r\nDATA\r\nRSET\r\n",
    );
    assert!(text.ends_with("503 5.5.1 BODY=BINARYMIME needs BDAT, not DATA\r\n250 2.0.0 Ok\r\n"), "{text}");
    let message: Vec<u8> = b"Content-Transfer-Encoding: binary\r\n\r\n".iter().copied().chain(0..=255u8).collect();
    let mut input = b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@example.test>\r\n".to_vec();
    input.extend_from_slice(format!("BDAT {} LAST\r\n", message.len()).as_bytes());
    input.extend_from_slice(&message);
    let (text, _) = talk(&mut session, &input);
    assert_eq!(codes(&text), ["250", "250", "250"], "{text}");
    let (env, body) = only_message(&fx);
    assert_eq!(env.body, BodyType::BinaryMime);
    assert_eq!(below_received(&body), message.as_slice());
}

#[test]
fn bad_bdat_lines() {
    let fx = fixture(|_| {});
    let mut session = fx.session(false);
    // A size and garbage after it: its octets are still read.
    let (text, ended) = talk(&mut session, b"EHLO c.test\r\nBDAT 6 FIRST\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(ended, Ended::Open);
    assert!(text.ends_with("501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n250 2.0.0 Ok\r\n"), "{text}");
    // In a chunked transaction it ends the transaction: a chunk is missing.
    let mut input = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nBDAT 2\r\nA:".to_vec();
    input.extend_from_slice(b"BDAT 2 LAST x\r\n bBDAT 2 LAST\r\n\r\n");
    let (text, _) = talk(&mut session, &input);
    assert_eq!(codes(&text), ["250", "250", "250", "501", "503"], "{text}");
    // Without a size nobody knows where the data ends: the session is closed.
    let (text, ended) = talk(&mut session, b"BDAT LAST\r\nNOOP\r\n");
    assert_eq!(ended, Ended::Closed);
    assert!(text.starts_with("421 4.5.2 Syntax: BDAT chunk-size [LAST]"), "{text}");
    assert!(fx.context.spool.is_empty());
}

#[test]
fn refused_chunks_count_as_errors() {
    let fx = fixture(|c| c.smtp.max_errors = 3);
    let mut session = fx.session(false);
    let (text, ended) = talk(&mut session, b"BDAT 1\r\nxBDAT 1\r\nxBDAT 1\r\nxNOOP\r\n");
    assert_eq!(ended, Ended::Closed);
    assert!(text.ends_with("421 4.7.0 mx.test too many errors\r\n"), "{text}");
}

#[test]
fn a_chunk_beyond_the_free_space_gets_452() {
    let fx = fixture(|c| c.smtp.max_message_size = u64::MAX);
    let space = Arc::new(SpaceMonitor::new());
    let mut session =
        Session::new(Arc::clone(&fx.context), Arc::clone(&space), "192.0.2.7".parse().expect("ip"), false);
    let (text, _) = talk(&mut session, ENVELOPE);
    assert_eq!(codes(&text), ["250", "250", "250"], "{text}");
    // Another message takes all but a little of the free space (the look at the disk is cached
    // for a second, so the session sees the same figure).
    let free = fx.context.spool.space().expect("statvfs").free_bytes;
    let _other = (1..1000).find_map(|k| space.reserve(&fx.context, free.saturating_sub(k * 4096))).expect("reserve");
    let mut input = b"BDAT 200000\r\n".to_vec();
    input.extend(std::iter::repeat_n(b"xxxxxxxx\r\n".as_slice(), 20_000).flatten());
    input.extend_from_slice(b"BDAT 1 LAST\r\nxNOOP\r\n");
    let (text, _) = talk(&mut session, &input);
    assert_eq!(text, "452 4.3.1 insufficient system storage\r\n503 5.5.1 need MAIL command\r\n250 2.0.0 Ok\r\n");
    assert!(fx.context.spool.is_empty());
}

#[test]
fn received_header_plain_tls_and_smtputf8() {
    let date = |body: &[u8]| {
        let text = String::from_utf8_lossy(body).into_owned();
        let at = text.find("; ").expect("date") + 2;
        text[at..text[at..].find("\r\n").expect("CRLF") + at].to_string()
    };
    let fx = fixture(|_| {});
    let mut plain = fx.session(false);
    talk(&mut plain, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\nhi\r\n.\r\n");
    let (env, body) = only_message(&fx);
    let header = format!(
        "Received: from c.test ([192.0.2.7])\r\n\tby mx.test (bartleby) with ESMTP id {}\r\n\tfor <x@example.test>; {}\r\n",
        env.id,
        date(&body)
    );
    assert!(body.starts_with(header.as_bytes()), "{}", String::from_utf8_lossy(&body));

    let fx = fixture(|_| {});
    let mut utf8 = fx.session(false);
    let input = "EHLO c.test\r\nMAIL FROM:<j\u{f6}rg@b.test> SMTPUTF8\r\nRCPT TO:<x@example.test>\r\nRCPT TO:<y@example.test>\r\nBDAT 4 LAST\r\nhi\r\n";
    talk(&mut utf8, input.as_bytes());
    let (env, body) = only_message(&fx);
    let header = format!(
        "Received: from c.test ([192.0.2.7])\r\n\tby mx.test (bartleby) with UTF8SMTP id {}; {}\r\n",
        env.id,
        date(&body)
    );
    assert!(body.starts_with(header.as_bytes()), "{}", String::from_utf8_lossy(&body));

    for (smtputf8, protocol) in [("", "ESMTPS"), (" SMTPUTF8", "UTF8SMTPS")] {
        let fx = fixture(|_| {});
        let mut tls = fx.session(true);
        talk(&mut tls, b"EHLO c.test\r\nSTARTTLS\r\n");
        tls.tls_started(tls13());
        let input =
            format!("EHLO c.test\r\nMAIL FROM:<a@b.test>{smtputf8}\r\nRCPT TO:<x@example.test>\r\nDATA\r\nhi\r\n.\r\n");
        talk(&mut tls, input.as_bytes());
        let (env, body) = only_message(&fx);
        let header = format!(
            "Received: from c.test ([192.0.2.7])\r\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n\
             \tby mx.test (bartleby) with {protocol} id {}\r\n\tfor <x@example.test>; {}\r\n",
            env.id,
            date(&body)
        );
        assert!(body.starts_with(header.as_bytes()), "{}", String::from_utf8_lossy(&body));
    }
}

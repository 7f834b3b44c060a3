//! The SMTP client against a scripted, fault-injecting primary on loopback: each test asserts the
//! per-recipient outcome and what the primary received.

#[path = "support/delivery.rs"]
mod delivery;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use bartleby::config::{DomainConfig, HumanDuration};
use bartleby::deliver::{Job, JobResult, RcptOutcome};
use bartleby::spool::{BodyType, DsnNotify, DsnRet};
use delivery::{config, deliver, job};
use fake_primary::{FakePrimary, Script, Stall, Starttls};
use std::time::Duration;
use tempfile::TempDir;

fn kind(outcome: &RcptOutcome) -> &'static str {
    match outcome {
        RcptOutcome::Delivered(_) => "delivered",
        RcptOutcome::TempFail(_) => "tempfail",
        RcptOutcome::PermFail(_) => "permfail",
        RcptOutcome::Loop(_) => "loop",
    }
}

fn kinds(result: &JobResult) -> Vec<&'static str> {
    result.outcomes.iter().map(|(_, o)| kind(o)).collect()
}

const BODY: &[u8] = b"Subject: test\r\n\r\nline one\r\n.dot line\r\n..two dots\r\n.\r\nend\r\n";
const STUFFED: &[u8] = b"Subject: test\r\n\r\nline one\r\n..dot line\r\n...two dots\r\n..\r\nend\r\n.\r\n";

#[tokio::test]
async fn delivers_with_pipelining_byte_exact() {
    let primary = FakePrimary::start(Script::default()).await;
    let dir = TempDir::new().unwrap();
    let jobs = vec![job(&dir, "m1", &["a@example.test", "b@example.test", "c@other.test"], BODY)];
    let results = deliver(config(primary.addr.port(), |_| {}), jobs).await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].id, "m1");
    let addresses: Vec<&str> = results[0].outcomes.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(addresses, vec!["a@example.test", "b@example.test"], "only this domain's recipients");
    assert_eq!(kinds(&results[0]), vec!["delivered", "delivered"]);
    let detail = results[0].outcomes[0].1.detail();
    assert_eq!(detail.status, "2.0.0");
    assert_eq!(detail.remote_mta.as_deref(), Some("127.0.0.1"));
    let messages = primary.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].raw, STUFFED);
    assert_eq!(messages[0].body, BODY);
    assert_eq!(messages[0].mail, "MAIL FROM:<sender@origin.test> SIZE=58");
    assert_eq!(messages[0].rcpts, vec!["RCPT TO:<a@example.test>", "RCPT TO:<b@example.test>"]);
    assert_eq!(primary.commands().last().map(String::as_str), Some("QUIT"));
}

#[tokio::test]
async fn delivers_without_pipelining_after_helo_fallback() {
    let script = Script { ehlo_reply: Some("502 5.5.2 EHLO not understood".into()), ..Script::default() };
    let primary = FakePrimary::start(script).await;
    let dir = TempDir::new().unwrap();
    // No final CRLF in the stored body: one is added before the dot.
    let jobs = vec![job(&dir, "m1", &["a@example.test"], b"Subject: x\r\n\r\nno newline")];
    let results = deliver(config(primary.addr.port(), |_| {}), jobs).await;
    assert_eq!(kinds(&results[0]), vec!["delivered"]);
    let commands = primary.commands();
    assert!(commands[0].starts_with("EHLO backup.example.test"), "{commands:?}");
    assert!(commands[1].starts_with("HELO backup.example.test"), "{commands:?}");
    assert_eq!(commands[2], "MAIL FROM:<sender@origin.test>", "no SIZE without EHLO");
    assert_eq!(primary.messages()[0].raw, b"Subject: x\r\n\r\nno newline\r\n.\r\n");
}

#[tokio::test]
async fn refused_connection_is_a_tempfail_with_the_reason() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = TempDir::new().unwrap();
    let jobs = vec![job(&dir, "m1", &["a@example.test"], BODY), job(&dir, "m2", &["b@example.test"], BODY)];
    let results = deliver(config(port, |_| {}), jobs).await;
    for result in &results {
        assert_eq!(kinds(result), vec!["tempfail"]);
        let detail = result.outcomes[0].1.detail();
        assert_eq!(detail.text, format!("connect to 127.0.0.1:{port}: Connection refused"));
        assert!(detail.status.starts_with("4."));
    }
}

#[tokio::test]
async fn greeting_421_is_a_tempfail() {
    let primary =
        FakePrimary::start(Script { greeting: "421 4.3.2 busy, come back later".into(), ..Script::default() }).await;
    let dir = TempDir::new().unwrap();
    let results = deliver(config(primary.addr.port(), |_| {}), vec![job(&dir, "m1", &["a@example.test"], BODY)]).await;
    assert_eq!(kinds(&results[0]), vec!["tempfail"]);
    let detail = results[0].outcomes[0].1.detail();
    assert_eq!(detail.text, "greeting to 127.0.0.1[127.0.0.1]: 421 4.3.2 busy, come back later");
    assert_eq!(detail.status, "4.3.2");
    assert!(primary.messages().is_empty());
}

#[tokio::test]
async fn rcpt_451_and_550_affect_only_their_recipient() {
    for pipelining in [true, false] {
        let mut script = Script::default();
        if !pipelining {
            script.capabilities.retain(|c| c != "PIPELINING");
        }
        script.rcpt_replies.insert("busy@example.test".into(), "451 4.2.0 mailbox busy".into());
        script.rcpt_replies.insert("nobody@example.test".into(), "550 5.1.1 no such user".into());
        let primary = FakePrimary::start(script).await;
        let dir = TempDir::new().unwrap();
        let jobs = vec![job(&dir, "m1", &["busy@example.test", "nobody@example.test", "ok@example.test"], BODY)];
        let results = deliver(config(primary.addr.port(), |_| {}), jobs).await;
        assert_eq!(kinds(&results[0]), vec!["tempfail", "permfail", "delivered"], "pipelining={pipelining}");
        let busy = results[0].outcomes[0].1.detail();
        assert_eq!(busy.text, "RCPT TO:<busy@example.test> to 127.0.0.1[127.0.0.1]: 451 4.2.0 mailbox busy");
        assert_eq!(busy.status, "4.2.0");
        let nobody = results[0].outcomes[1].1.detail();
        assert_eq!(nobody.status, "5.1.1");
        assert_eq!(nobody.diagnostic.as_deref(), Some("550 5.1.1 no such user"));
        let messages = primary.messages();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].rcpts, vec!["RCPT TO:<ok@example.test>"]);
        assert_eq!(messages[0].body, BODY);
    }
}

#[tokio::test]
async fn no_accepted_recipient_skips_data_and_resets() {
    let mut script = Script::default();
    script.capabilities.retain(|c| c != "PIPELINING");
    script.rcpt_replies.insert("nobody@example.test".into(), "550 5.1.1 no such user".into());
    let primary = FakePrimary::start(script).await;
    let dir = TempDir::new().unwrap();
    let results =
        deliver(config(primary.addr.port(), |_| {}), vec![job(&dir, "m1", &["nobody@example.test"], BODY)]).await;
    assert_eq!(kinds(&results[0]), vec!["permfail"]);
    let commands = primary.commands();
    assert!(!commands.iter().any(|c| c == "DATA"), "{commands:?}");
    assert!(commands.iter().any(|c| c == "RSET"), "{commands:?}");
    assert!(primary.messages().is_empty());
}

#[tokio::test]
async fn final_552_is_a_permfail_for_all() {
    let mut script = Script::default();
    script.final_replies.push_back("552 5.3.4 message too big for system".into());
    let primary = FakePrimary::start(script).await;
    let dir = TempDir::new().unwrap();
    let jobs = vec![job(&dir, "m1", &["a@example.test", "b@example.test"], BODY)];
    let results = deliver(config(primary.addr.port(), |_| {}), jobs).await;
    assert_eq!(kinds(&results[0]), vec!["permfail", "permfail"]);
    let detail = results[0].outcomes[0].1.detail();
    assert_eq!(detail.status, "5.3.4");
    assert_eq!(detail.text, "end of DATA to 127.0.0.1[127.0.0.1]: 552 5.3.4 message too big for system");
    assert_eq!(primary.messages()[0].raw, STUFFED);
}

#[tokio::test]
async fn dropped_after_data_is_a_tempfail() {
    let primary = FakePrimary::start(Script { drop_after_data: true, ..Script::default() }).await;
    let dir = TempDir::new().unwrap();
    let results = deliver(config(primary.addr.port(), |_| {}), vec![job(&dir, "m1", &["a@example.test"], BODY)]).await;
    assert_eq!(kinds(&results[0]), vec!["tempfail"]);
    let detail = results[0].outcomes[0].1.detail();
    assert!(detail.text.starts_with("end of DATA to 127.0.0.1[127.0.0.1]: "), "{}", detail.text);
    assert!(detail.status.starts_with("4."));
    assert_eq!(primary.messages()[0].raw, STUFFED, "the message did arrive: a later retry may duplicate it");
}

#[tokio::test]
async fn stall_after_data_times_out() {
    let primary = FakePrimary::start(Script { stall: Some(Stall::AfterData), ..Script::default() }).await;
    let dir = TempDir::new().unwrap();
    let config =
        config(primary.addr.port(), |c| c.delivery.data_done_timeout = HumanDuration(Duration::from_millis(500)));
    let started = std::time::Instant::now();
    let results = deliver(config, vec![job(&dir, "m1", &["a@example.test"], BODY)]).await;
    assert_eq!(kinds(&results[0]), vec!["tempfail"]);
    let detail = results[0].outcomes[0].1.detail();
    assert_eq!(detail.text, "end of DATA to 127.0.0.1[127.0.0.1]: timed out after 0.5s");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn stall_at_greeting_times_out() {
    let primary = FakePrimary::start(Script { stall: Some(Stall::Greeting), ..Script::default() }).await;
    let dir = TempDir::new().unwrap();
    let config =
        config(primary.addr.port(), |c| c.delivery.greeting_timeout = HumanDuration(Duration::from_millis(300)));
    let results = deliver(config, vec![job(&dir, "m1", &["a@example.test"], BODY)]).await;
    assert_eq!(kinds(&results[0]), vec!["tempfail"]);
    assert_eq!(results[0].outcomes[0].1.detail().text, "greeting to 127.0.0.1[127.0.0.1]: timed out after 0.3s");
}

#[tokio::test]
async fn starttls_454_continues_in_plain_text_unless_required() {
    let primary = FakePrimary::start(Script { starttls: Starttls::Refuse, ..Script::default() }).await;
    let dir = TempDir::new().unwrap();
    let results = deliver(config(primary.addr.port(), |_| {}), vec![job(&dir, "m1", &["a@example.test"], BODY)]).await;
    assert_eq!(kinds(&results[0]), vec!["delivered"]);
    assert!(!primary.messages()[0].tls);
    assert!(primary.commands().iter().any(|c| c == "STARTTLS"));

    let required = config(primary.addr.port(), |c| {
        c.domain.insert("example.test".into(), DomainConfig { require_tls: true, ..DomainConfig::default() });
    });
    let results = deliver(required, vec![job(&dir, "m2", &["a@example.test"], BODY)]).await;
    assert_eq!(kinds(&results[0]), vec!["tempfail"]);
    let detail = results[0].outcomes[0].1.detail();
    assert!(detail.text.contains("STARTTLS") && detail.text.contains("454 4.7.0"), "{}", detail.text);
    assert_eq!(primary.messages().len(), 1, "nothing sent in plain text");
}

#[tokio::test]
async fn starttls_opportunistic_and_verified() {
    let (server, ca_pem) = fake_primary::tls_server(&["127.0.0.1"]);
    let primary = FakePrimary::start(Script { starttls: Starttls::Accept(server), ..Script::default() }).await;
    let dir = TempDir::new().unwrap();
    // Opportunistic: the unknown CA does not matter.
    let results = deliver(config(primary.addr.port(), |_| {}), vec![job(&dir, "m1", &["a@example.test"], BODY)]).await;
    assert_eq!(kinds(&results[0]), vec!["delivered"]);
    assert!(primary.messages()[0].tls);
    assert_eq!(primary.messages()[0].raw, STUFFED);

    // Required, chain unknown: deferred, nothing sent.
    let policy = DomainConfig { require_tls: true, ..DomainConfig::default() };
    let unknown = config(primary.addr.port(), |c| {
        c.domain.insert("example.test".into(), policy.clone());
    });
    let results = deliver(unknown, vec![job(&dir, "m2", &["a@example.test"], BODY)]).await;
    assert_eq!(kinds(&results[0]), vec!["tempfail"]);
    assert!(results[0].outcomes[0].1.detail().text.contains("TLS handshake failed"));
    assert_eq!(primary.messages().len(), 1);

    // Required, with the CA as an extra trust anchor: delivered over verified TLS.
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let trusted = config(primary.addr.port(), |c| {
        c.domain.insert("example.test".into(), policy.clone());
        c.delivery.tls_ca_file = Some(ca_file.clone());
    });
    let results = deliver(trusted, vec![job(&dir, "m3", &["a@example.test"], BODY)]).await;
    assert_eq!(kinds(&results[0]), vec!["delivered"]);
    assert!(primary.messages()[1].tls);
}

#[tokio::test]
async fn many_messages_over_one_connection_with_rset() {
    let primary = FakePrimary::start(Script::default()).await;
    let dir = TempDir::new().unwrap();
    let jobs: Vec<Job> = (0..3)
        .map(|i| job(&dir, &format!("m{i}"), &["a@example.test"], format!("n: {i}\r\n\r\n.{i}\r\n").as_bytes()))
        .collect();
    let results = deliver(config(primary.addr.port(), |c| c.delivery.max_connections_per_destination = 1), jobs).await;
    assert!(results.iter().all(|r| kinds(r) == vec!["delivered"]));
    assert_eq!(primary.connections(), 1);
    let messages = primary.messages();
    for (i, message) in messages.iter().enumerate() {
        assert_eq!(message.body, format!("n: {i}\r\n\r\n.{i}\r\n").as_bytes());
        assert_eq!(message.raw, format!("n: {i}\r\n\r\n..{i}\r\n.\r\n").as_bytes());
    }
    let commands: Vec<String> =
        primary.commands().into_iter().filter(|c| !c.starts_with("RCPT") && !c.starts_with("EHLO")).collect();
    let expected = [
        "MAIL FROM:<sender@origin.test> SIZE=12",
        "DATA",
        "RSET",
        "MAIL FROM:<sender@origin.test> SIZE=12",
        "DATA",
        "RSET",
        "MAIL FROM:<sender@origin.test> SIZE=12",
        "DATA",
        "QUIT",
    ];
    assert_eq!(commands, expected);
}

#[tokio::test]
async fn parallel_connections_are_bounded() {
    let primary = FakePrimary::start(Script::default()).await;
    let dir = TempDir::new().unwrap();
    let jobs: Vec<Job> = (0..20).map(|i| job(&dir, &format!("m{i:02}"), &["a@example.test"], BODY)).collect();
    let results = deliver(config(primary.addr.port(), |c| c.delivery.max_connections_per_destination = 3), jobs).await;
    assert_eq!(results.len(), 20);
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result.id, format!("m{i:02}"), "results in input order");
        assert_eq!(kinds(result), vec!["delivered"]);
    }
    assert!(primary.connections() <= 3 && primary.connections() >= 1, "{}", primary.connections());
    assert_eq!(primary.messages().len(), 20);
}

#[tokio::test]
async fn strict_order_uses_one_connection_in_arrival_order_and_a_deferral_does_not_hold_back_the_rest() {
    let final_replies = ["250 ok".to_string(), "250 ok".into(), "451 4.3.0 try later".into()].into();
    let script = Script { final_replies, ..Script::default() };
    let primary = FakePrimary::start(script).await;
    let dir = TempDir::new().unwrap();
    let jobs: Vec<Job> =
        (0..6).map(|i| job(&dir, &format!("m{i}"), &["a@example.test"], format!("n: {i}\r\n").as_bytes())).collect();
    let config = config(primary.addr.port(), |c| {
        c.domain.insert("example.test".into(), DomainConfig { strict_order: true, ..DomainConfig::default() });
    });
    let results = deliver(config, jobs).await;
    let all: Vec<&str> = results.iter().map(|r| kinds(r)[0]).collect();
    assert_eq!(all, vec!["delivered", "delivered", "tempfail", "delivered", "delivered", "delivered"]);
    assert!(results[2].outcomes[0].1.detail().text.contains("451 4.3.0"));
    assert_eq!(primary.connections(), 1);
    let bodies: Vec<Vec<u8>> = primary.messages().into_iter().map(|m| m.body).collect();
    let expected: Vec<Vec<u8>> = (0..6).map(|i| format!("n: {i}\r\n").into_bytes()).collect();
    assert_eq!(bodies, expected, "offered one after the other in arrival order");
}

fn dsn_job(dir: &TempDir) -> Job {
    let mut job = job(dir, "m1", &["a@example.test"], BODY);
    job.envelope.ret = Some(DsnRet::Hdrs);
    job.envelope.envid = Some("id+1=x y".into());
    job.envelope.recipients[0].notify = Some(vec![DsnNotify::Success, DsnNotify::Failure]);
    job.envelope.recipients[0].orcpt = Some("rfc822;a+40example.test".into());
    job
}

#[tokio::test]
async fn dsn_parameters_only_when_offered() {
    let mut script = Script::default();
    script.capabilities.push("DSN".into());
    let primary = FakePrimary::start(script).await;
    let dir = TempDir::new().unwrap();
    let results = deliver(config(primary.addr.port(), |_| {}), vec![dsn_job(&dir)]).await;
    assert_eq!(kinds(&results[0]), vec!["delivered"]);
    let message = &primary.messages()[0];
    assert_eq!(message.mail, "MAIL FROM:<sender@origin.test> SIZE=58 RET=HDRS ENVID=id+2B1+3Dx+20y");
    assert_eq!(message.rcpts, vec!["RCPT TO:<a@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+40example.test"]);

    let plain = FakePrimary::start(Script::default()).await;
    let results = deliver(config(plain.addr.port(), |_| {}), vec![dsn_job(&dir)]).await;
    assert_eq!(kinds(&results[0]), vec!["delivered"]);
    let message = &plain.messages()[0];
    assert_eq!(message.mail, "MAIL FROM:<sender@origin.test> SIZE=58");
    assert_eq!(message.rcpts, vec!["RCPT TO:<a@example.test>"]);
}

#[tokio::test]
async fn size_8bitmime_and_smtputf8_are_checked_before_sending() {
    let script = Script { capabilities: vec!["PIPELINING".into(), "SIZE 20".into()], ..Script::default() };
    let primary = FakePrimary::start(script).await;
    let dir = TempDir::new().unwrap();
    let big = job(&dir, "big", &["a@example.test"], BODY);
    let mut eight = job(&dir, "eight", &["a@example.test"], b"x\r\n");
    eight.envelope.body = BodyType::EightBitMime;
    let mut utf8 = job(&dir, "utf8", &["a@example.test"], b"x\r\n");
    utf8.envelope.smtputf8 = true;
    let small = job(&dir, "small", &["a@example.test"], b"x\r\n");
    let results = deliver(config(primary.addr.port(), |_| {}), vec![big, eight, utf8, small]).await;
    let statuses: Vec<(&str, &str)> =
        results.iter().map(|r| (kinds(r)[0], r.outcomes[0].1.detail().status.as_str())).collect();
    assert_eq!(
        statuses,
        vec![("permfail", "5.3.4"), ("permfail", "5.6.3"), ("permfail", "5.6.7"), ("delivered", "2.0.0")]
    );
    let mails: Vec<String> = primary.commands().into_iter().filter(|c| c.starts_with("MAIL")).collect();
    assert_eq!(mails, vec!["MAIL FROM:<sender@origin.test> SIZE=3"], "refused messages were never offered");
}

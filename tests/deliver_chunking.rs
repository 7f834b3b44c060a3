//! The SMTP client with CHUNKING (RFC 3030) against the scripted primary: BDAT when offered, the
//! body as stored (no dot-stuffing), BINARYMIME only where BINARYMIME and CHUNKING are offered.

#[path = "support/delivery.rs"]
mod delivery;
#[path = "support/fake_primary.rs"]
mod fake_primary;

use bartleby::config::Config;
use bartleby::deliver::{JobResult, RcptOutcome};
use bartleby::spool::BodyType;
use delivery::{config, deliver, job};
use fake_primary::{FakePrimary, Script};
use std::sync::Arc;
use tempfile::TempDir;

/// (kind, status) of each recipient.
fn outcomes(result: &JobResult) -> Vec<(&'static str, String)> {
    let kind = |o: &RcptOutcome| match o {
        RcptOutcome::Delivered(_) => "delivered",
        RcptOutcome::TempFail(_) => "tempfail",
        RcptOutcome::PermFail(_) => "permfail",
        RcptOutcome::Loop(_) => "loop",
    };
    result.outcomes.iter().map(|(_, o)| (kind(o), o.detail().status.clone())).collect()
}

fn chunking(extra: &[&str], pipelining: bool) -> Script {
    let mut script = Script::default();
    script.capabilities.retain(|c| pipelining || c != "PIPELINING");
    script.capabilities.extend(["CHUNKING".to_string()].into_iter().chain(extra.iter().map(|e| e.to_string())));
    script
}

/// One connection, so messages arrive (and take the scripted replies) in the jobs' order.
fn one_connection(port: u16) -> Arc<Config> {
    config(port, |c| c.delivery.max_connections_per_destination = 1)
}

const BODY: &[u8] = b"Subject: test\r\n\r\nline one\r\n.dot line\r\n..two dots\r\n.\r\nend\r\n";

#[tokio::test]
async fn bdat_carries_the_body_as_stored() {
    for pipelining in [true, false] {
        let primary = FakePrimary::start(chunking(&[], pipelining)).await;
        let dir = TempDir::new().unwrap();
        let jobs = vec![
            job(&dir, "m1", &["a@example.test", "b@example.test"], BODY),
            job(&dir, "m2", &["a@example.test"], b"no final newline"),
        ];
        let results = deliver(one_connection(primary.addr.port()), jobs).await;
        assert_eq!(outcomes(&results[0]), vec![("delivered", "2.0.0".into()); 2]);
        assert_eq!(outcomes(&results[1]), vec![("delivered", "2.0.0".into())]);
        let messages = primary.messages();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].body, BODY, "byte for byte, no dot-stuffing");
        assert_eq!(messages[0].bdat, vec![format!("BDAT {} LAST", BODY.len())]);
        assert_eq!(messages[1].body, b"no final newline", "nothing added");
        let commands = primary.commands();
        assert!(!commands.iter().any(|c| c == "DATA"), "{commands:?}");
        assert_eq!(commands.iter().filter(|c| c.starts_with("RSET")).count(), 1, "{commands:?}");
        let detail = results[0].outcomes[0].1.detail();
        assert!(detail.text.starts_with("BDAT LAST to 127.0.0.1[127.0.0.1]: 250 2.0.0 Ok: queued"), "{detail:?}");
    }
}

#[tokio::test]
async fn a_large_body_is_streamed_in_one_chunk() {
    let primary = FakePrimary::start(chunking(&[], true)).await;
    let dir = TempDir::new().unwrap();
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    while body.len() < 3 * 1024 * 1024 {
        body.extend_from_slice(b".a line that starts with a dot, and some more text to fill it\r\n");
    }
    let results =
        deliver(one_connection(primary.addr.port()), vec![job(&dir, "big", &["a@example.test"], &body)]).await;
    assert_eq!(outcomes(&results[0]), vec![("delivered", "2.0.0".into())]);
    let messages = primary.messages();
    assert_eq!(messages[0].bdat, vec![format!("BDAT {} LAST", body.len())]);
    assert!(messages[0].body == body, "the streamed body arrives whole");
}

#[tokio::test]
async fn refusals_of_bdat_and_of_every_recipient() {
    let mut script = chunking(&[], true);
    script.final_replies = ["552 5.3.4 too big for me".to_string(), "451 4.3.0 try later".into()].into();
    script.rcpt_replies.insert("nobody@example.test".into(), "550 5.1.1 no such user".into());
    let primary = FakePrimary::start(script).await;
    let dir = TempDir::new().unwrap();
    let jobs = vec![
        job(&dir, "m1", &["a@example.test"], BODY),
        job(&dir, "m2", &["a@example.test"], BODY),
        job(&dir, "m3", &["nobody@example.test"], BODY),
    ];
    let results = deliver(one_connection(primary.addr.port()), jobs).await;
    assert_eq!(outcomes(&results[0]), vec![("permfail", "5.3.4".into())]);
    assert_eq!(outcomes(&results[1]), vec![("tempfail", "4.3.0".into())]);
    assert_eq!(outcomes(&results[2]), vec![("permfail", "5.1.1".into())]);
    let bdats = primary.commands().into_iter().filter(|c| c.starts_with("BDAT")).count();
    assert_eq!(bdats, 2, "no BDAT when every recipient was refused");
}

#[tokio::test]
async fn binarymime_goes_only_with_bdat_to_a_binarymime_primary() {
    let binary: Vec<u8> = b"Content-Transfer-Encoding: binary\r\n\r\n".iter().copied().chain(0..=255u8).collect();
    let binary_job = |dir: &TempDir| {
        let mut job = job(dir, "bin", &["a@example.test"], &binary);
        job.envelope.body = BodyType::BinaryMime;
        job
    };
    let dir = TempDir::new().unwrap();
    let primary = FakePrimary::start(chunking(&["BINARYMIME"], true)).await;
    let results = deliver(one_connection(primary.addr.port()), vec![binary_job(&dir)]).await;
    assert_eq!(outcomes(&results[0]), vec![("delivered", "2.0.0".into())]);
    let message = &primary.messages()[0];
    assert_eq!(message.mail, format!("MAIL FROM:<sender@origin.test> SIZE={} BODY=BINARYMIME", binary.len()));
    assert_eq!(message.body, binary);

    // CHUNKING without BINARYMIME, and neither: RFC 3030 3 forbids sending binary data; we do not
    // convert, so the message fails permanently with 5.6.3 and is never offered.
    for script in [chunking(&[], true), Script::default()] {
        let primary = FakePrimary::start(script).await;
        let results = deliver(one_connection(primary.addr.port()), vec![binary_job(&dir)]).await;
        assert_eq!(outcomes(&results[0]), vec![("permfail", "5.6.3".into())]);
        let detail = results[0].outcomes[0].1.detail();
        assert!(detail.text.contains("does not offer BINARYMIME with CHUNKING"), "{detail:?}");
        assert!(!primary.commands().iter().any(|c| c.starts_with("MAIL")), "{:?}", primary.commands());
    }
}

//! The envelope decoder: any JSON that decodes as an `Envelope` (a `.env` file, a journal record, a
//! line of `bartleby queue import`) must survive everything done with a queued envelope without a
//! panic: writing it back unchanged, listing it (`queue list`, the admin page), routing it, and
//! building its failure and delay notices.
#![no_main]
use bartleby::control::ListedMessage;
use bartleby::dsn::{self, DsnKind, ReportedRecipient};
use bartleby::spool::{Envelope, from_micros};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, UNIX_EPOCH};

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = serde_json::from_slice::<Envelope>(data) else { return };
    // What is written back must read back as the same envelope (an update rewrites it this way).
    let json = serde_json::to_vec(&envelope).expect("an envelope always encodes");
    let again: Envelope = serde_json::from_slice(&json).expect("an encoded envelope decodes");
    assert_eq!(again, envelope, "envelope changed on a round trip");

    let listed = ListedMessage::from(&envelope);
    serde_json::to_string(&listed).expect("a listing always encodes");
    let _ = bartleby::schedule::domains_of(&envelope);
    let _ = (envelope.is_done(), envelope.last_error());

    // The scheduler passes the real time as `now` and the arrival plus the queue lifetime.
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let retry_until = from_micros(envelope.arrived) + Duration::from_secs(5 * 86_400);
    for kind in [DsnKind::Failure, DsnKind::Delay] {
        if !dsn::wanted(&envelope, kind) {
            continue;
        }
        let reported: Vec<ReportedRecipient> = dsn::reported(&envelope, kind, &envelope.recipients)
            .into_iter()
            .map(|r| ReportedRecipient::from_recipient(r, kind))
            .collect();
        let original = b"Received: from a\r\nSubject: s\r\n\r\nbody\r\n";
        let notice = dsn::build("mx.example.test", &envelope, kind, &reported, original, now, Some(retry_until));
        let _ = dsn::notice_envelope(envelope.id.clone(), &envelope, &notice);
    }
});

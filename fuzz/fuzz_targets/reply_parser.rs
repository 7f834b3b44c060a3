//! The SMTP client's reply reader (RFC 5321 4.2): whatever a next hop sends, each reply read is a
//! well-formed code with bounded text, and what is made of it (the enhanced status, the text shown
//! in logs and notices, the EHLO capabilities, the temporary-failure detail) never panics.
#![no_main]
use bartleby::deliver::ClientError;
use bartleby::deliver::client::{Capabilities, read_reply};
use libfuzzer_sys::fuzz_target;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

fuzz_target!(|wire: &[u8]| {
    // Pipelined replies, one after the other, as a session reads them; a slice never blocks, so one
    // poll finishes each read.
    let mut rest = wire;
    let mut cx = Context::from_waker(Waker::noop());
    while !rest.is_empty() {
        let read = pin!(read_reply(&mut rest)).poll(&mut cx);
        let Poll::Ready(result) = read else { panic!("reading from a slice returned Pending") };
        let Ok(reply) = result else { break };
        assert!((200..600).contains(&reply.code), "reply code {} accepted", reply.code);
        assert!(!reply.lines.is_empty() && reply.lines.len() <= 100, "{} lines kept", reply.lines.len());
        let status = reply.status();
        assert_eq!(status.split('.').count(), 3, "status {status:?}");
        assert_eq!(status.as_bytes()[0], b'0' + (reply.code / 100) as u8, "status {status:?} for {}", reply.code);
        let shown = reply.to_string();
        assert!(shown.starts_with(&reply.code.to_string()));
        let _ = Capabilities::parse(&reply);
        let error = ClientError::Reply { stage: "RCPT TO".into(), peer: "mx.test".into(), reply };
        let detail = error.temp_detail(Some("mx.test"));
        assert!(detail.status.starts_with("4."), "temporary detail {:?}", detail.status);
    }
});

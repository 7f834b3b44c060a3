//! Delivery status notifications (RFC 3464): failure and delay notices, sent from the null sender.
//! (Interface placeholder; the real builder lands from the dsn branch.)

use crate::spool::Envelope;
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnKind {
    Failure,
    Delay,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedRecipient {
    pub address: String,
    pub orcpt: Option<String>,
    pub status: String,
    pub diagnostic: Option<String>,
    pub remote_mta: Option<String>,
    pub text: String,
}

pub fn wanted(envelope: &Envelope) -> bool {
    !envelope.sender.is_empty() && !envelope.generated
}

pub fn build(
    hostname: &str,
    envelope: &Envelope,
    kind: DsnKind,
    recipients: &[ReportedRecipient],
    original: &[u8],
    now: SystemTime,
    retry_until: Option<SystemTime>,
) -> Vec<u8> {
    let _ = (hostname, envelope, kind, recipients, original, now, retry_until);
    Vec::new()
}

//! One SMTP session as a byte-driven state machine: [`Session::feed`] takes whatever arrived from the
//! client and returns what to do (replies to send, a TLS upgrade, a message to commit, a close). The
//! socket loop in `server.rs` is a thin shell around it, so these rules are testable without a network.
//!
//! Commands may be pipelined (RFC 2920): `feed` answers every complete command it holds, and stops at
//! an action the server must carry out first (STARTTLS, committing a message, closing).
//!
//! A message arrives after DATA, dot-stuffed, or in BDAT chunks (RFC 3030), which may be pipelined
//! too. A BDAT line is followed by exactly as many octets as it says, whatever they look like, so
//! they are always read before its reply, even when the BDAT is refused: otherwise what the client
//! sent as message data would be run as commands.

use super::ServerContext;
use super::command::{self, Command, CommandError, EtrnNode, MAX_PARAMETER_LINE, MailFrom, RcptTo};
use super::data::{DataProblem, DataReader};
use super::limits::Rate;
use super::received::{self, Stamp, TlsInfo};
use super::reply::Reply;
pub use super::space::{Reservation, SpaceMonitor};
use crate::recipients::Decision;
use crate::spool::{BodyType, Envelope, Filter, Incoming, Recipient, SpoolError};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// A message's reservation grows in steps of this many octets past what has arrived (see
/// [`SpaceMonitor`]), so the free space is not looked at for every read.
const SPACE_STEP: u64 = 64 * 1024;

/// What the server must do after feeding bytes. At most one action that is not `Reply` is returned,
/// and it is the last one.
#[derive(Debug)]
pub enum Action {
    /// Send this reply.
    Reply(Reply),
    /// Send this reply, then close the connection.
    Close(Reply),
    /// Send this reply (220), then run the TLS handshake and call [`Session::tls_started`].
    StartTls(Reply),
    /// Commit this message on a blocking thread, then send what [`Session::committed`] returns.
    Commit(Box<PendingMessage>),
    /// Ask the primary about this recipient (a callout), then send what [`Session::verified`] returns.
    Verify(Box<Recipient>),
}

/// A message read to its end and found acceptable, waiting to be made durable.
pub struct PendingMessage {
    message: Box<dyn Incoming>,
    envelope: Envelope,
    /// The message as received, for DKIM; None when too large to keep or not checked.
    copy: Option<Vec<u8>>,
    /// The space it was counted against, given back once the commit is over.
    space: Reservation,
}

impl std::fmt::Debug for PendingMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingMessage").field("id", &self.message.id()).field("envelope", &self.envelope).finish()
    }
}

impl PendingMessage {
    /// Makes the message durable (fsyncs; call it from `spawn_blocking`).
    pub fn commit(self) -> Result<Envelope, SpoolError> {
        let PendingMessage { message, envelope, space, .. } = self;
        let committed = message.commit(envelope);
        // Only now are the octets on disk (or given up): until here they stay reserved.
        drop(space);
        committed
    }

    /// Records the sender's SPF/DKIM verdict in the envelope (issue 6: at accept time, while the
    /// client's IP is known).
    pub async fn authenticate(&mut self, check: &crate::auth::SenderCheck) {
        let Some(ip) = self.envelope.client_ip else { return };
        let copy = self.copy.take();
        let verdict = check.check(ip, &self.envelope.helo, &self.envelope.sender, copy.as_deref()).await;
        tracing::info!(queue_id = %self.message.id(), from = %self.envelope.sender, spf = ?verdict.spf,
            dkim_aligned = verdict.dkim_aligned, "sender checked");
        self.envelope.sender_auth = Some(verdict);
    }
}

/// The client's greeting.
#[derive(Debug, Clone)]
struct Helo {
    name: String,
    /// EHLO rather than HELO.
    extended: bool,
}

/// A mail transaction, from MAIL to the end of DATA (RFC 5321 3.3).
#[derive(Debug)]
struct Transaction {
    mail: MailFrom,
    recipients: Vec<Recipient>,
    /// A recipient was accepted under the `hold` policy: the message is held for review.
    hold: bool,
    /// Space on the spool for the message: its declared SIZE at MAIL, grown as data arrives.
    space: Reservation,
}

/// What RCPT came to: a reply now, or a callout first.
enum RcptStep {
    Reply(Reply),
    Verify(Recipient),
}

/// A message being received.
struct DataPhase {
    /// It comes in BDAT chunks (RFC 3030); between them the session reads commands.
    chunked: bool,
    reader: DataReader,
    message: Box<dyn Incoming>,
    /// The first write error; the data is still read to its end, then 451.
    write_error: Option<SpoolError>,
    /// The message outgrew the free space; the data is still read to its end (without storing
    /// more of it), then 452 4.3.1.
    no_space: bool,
    /// Reused buffer for unstuffed data on its way to the spool.
    scratch: Vec<u8>,
    /// The message kept in memory for the DKIM check, up to [`crate::auth::DKIM_MAX_MESSAGE`].
    copy: Option<Vec<u8>>,
}

/// A BDAT chunk whose octets are being read (RFC 3030 2).
struct Chunk {
    /// Octets still to come.
    remaining: u64,
    /// The octets announced, for the reply.
    size: u64,
    /// `BDAT n LAST`: the message ends with this chunk.
    last: bool,
    /// The BDAT was refused: its octets are read and dropped, then this is the reply ("the
    /// receiver-SMTP MUST accept and discard the associated message data before sending the
    /// appropriate 5XX or 4XX code").
    refusal: Option<Reply>,
}

/// Counters for the disconnect log line.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    commands: usize,
    queued: usize,
    rejected_messages: usize,
    rejected_rcpts: usize,
}

/// One SMTP session.
pub struct Session {
    context: Arc<ServerContext>,
    space: Arc<SpaceMonitor>,
    client: IpAddr,
    /// A TLS certificate is configured, so STARTTLS can be offered.
    tls_available: bool,
    /// What the TLS handshake agreed on; None before STARTTLS.
    tls: Option<TlsInfo>,
    helo: Option<Helo>,
    transaction: Option<Transaction>,
    data: Option<DataPhase>,
    /// The BDAT chunk being read, if any.
    chunk: Option<Chunk>,
    /// Received octets not yet processed (a partial command line, or input held back while the
    /// server carries out an action).
    pending: Vec<u8>,
    /// Discarding an overlong command line up to its LF.
    discarding: bool,
    errors: usize,
    stats: Stats,
    /// The Message-ID of the message being committed, for the accept line of the log.
    message_id: Option<String>,
}

impl Session {
    /// A session for a client connected from `client`.
    pub fn new(context: Arc<ServerContext>, space: Arc<SpaceMonitor>, client: IpAddr, tls_available: bool) -> Session {
        let client = client.to_canonical();
        tracing::info!(client = %client, "connect");
        Session {
            context,
            space,
            client,
            tls_available,
            tls: None,
            helo: None,
            transaction: None,
            data: None,
            chunk: None,
            pending: Vec::new(),
            discarding: false,
            errors: 0,
            stats: Stats::default(),
            message_id: None,
        }
    }

    /// What the session shares with the daemon (recipient knowledge, sender checks, limits).
    pub fn context(&self) -> &Arc<ServerContext> {
        &self.context
    }

    /// The configuration this session runs with.
    pub fn config(&self) -> &crate::config::Config {
        &self.context.config
    }

    /// Our name, as in the greeting.
    pub fn hostname(&self) -> &str {
        &self.context.config.hostname
    }

    /// The client's address.
    pub fn client(&self) -> IpAddr {
        self.client
    }

    /// The 220 greeting (RFC 5321 4.2, 3.1).
    pub fn greeting(&self) -> Reply {
        Reply::plain(220, format!("{} ESMTP bartleby", self.hostname()))
    }

    /// The reply when the server is shutting down.
    pub fn shutdown_reply(&self) -> Reply {
        Reply::new(421, "4.3.2", format!("{} shutting down", self.hostname()))
    }

    /// The reply when the client was silent too long (RFC 5321 4.5.3.2).
    pub fn timeout_reply(&self) -> Reply {
        Reply::new(421, "4.4.2", format!("{} timeout, closing", self.hostname()))
    }

    /// The reply to a session closed, at `smtp.max_sessions`, to make room for a new client: it fell
    /// behind for `smtp.overload_timeout`, the timeout Postfix uses under overload (4.4.2: timed out).
    pub fn overload_reply(&self) -> Reply {
        Reply::new(421, "4.4.2", format!("{} too busy for stalled sessions, closing", self.hostname()))
    }

    /// Is message data arriving (after DATA, or a BDAT chunk), so the DATA timeouts apply?
    pub fn in_data(&self) -> bool {
        self.chunk.is_some() || self.data.as_ref().is_some_and(|d| !d.chunked)
    }

    /// Takes bytes from the client (possibly none, to resume after an action) and returns what to do.
    pub fn feed(&mut self, input: &[u8]) -> Vec<Action> {
        self.pending.extend_from_slice(input);
        let buffer = std::mem::take(&mut self.pending);
        let mut pos = 0;
        let mut actions = Vec::new();
        while pos < buffer.len() {
            let input = &buffer[pos..];
            let (used, action) = if self.chunk.is_some() {
                self.feed_chunk(input)
            } else if self.in_data() {
                self.feed_data(input)
            } else {
                self.feed_command(input)
            };
            pos += used;
            let Some(action) = action else {
                if used == 0 {
                    break;
                }
                continue;
            };
            let stop = !matches!(action, Action::Reply(_));
            actions.push(action);
            if stop {
                break;
            }
        }
        match actions.last() {
            // RFC 3207 5: whatever the client pipelined behind STARTTLS must be thrown away.
            Some(Action::StartTls(_)) | Some(Action::Close(_)) => {}
            _ => self.pending = buffer[pos..].to_vec(),
        }
        actions
    }

    /// Handles the next command line in `input`, if complete. Returns octets used and the action.
    fn feed_command(&mut self, input: &[u8]) -> (usize, Option<Action>) {
        let newline = input.iter().position(|&b| b == b'\n');
        if self.discarding {
            // RFC 5321 4.5.3.1.4: an overlong line is refused without buffering it.
            return match newline {
                Some(i) => {
                    self.discarding = false;
                    (i + 1, Some(self.error(CommandError::TooLong.reply())))
                }
                None => (input.len(), None),
            };
        }
        match newline {
            Some(i) => {
                let line = input[..i].strip_suffix(b"\r").unwrap_or(&input[..i]);
                (i + 1, self.command(line))
            }
            None if input.len() >= MAX_PARAMETER_LINE => {
                self.discarding = true;
                (input.len(), None)
            }
            None => (0, None),
        }
    }

    /// Feeds message data; at its end, judges the message.
    fn feed_data(&mut self, input: &[u8]) -> (usize, Option<Action>) {
        match self.absorb(input) {
            Some(used) => (used, Some(self.end_of_data())),
            None => (input.len(), None),
        }
    }

    /// Feeds the octets of a BDAT chunk; once they are all in, answers it.
    fn feed_chunk(&mut self, input: &[u8]) -> (usize, Option<Action>) {
        let Some(chunk) = self.chunk.as_mut() else { return (0, None) };
        let take = usize::try_from(chunk.remaining).map_or(input.len(), |remaining| remaining.min(input.len()));
        chunk.remaining -= take as u64;
        let (refused, done) = (chunk.refusal.is_some(), chunk.remaining == 0);
        if !refused {
            self.absorb(&input[..take]);
        }
        (take, done.then(|| self.chunk_done()))
    }

    /// Takes message data into the spool file (and the DKIM copy), counting it against the free
    /// space. Returns where the data ended, after DATA; BDAT data never ends by itself.
    fn absorb(&mut self, input: &[u8]) -> Option<usize> {
        let data = self.data.as_mut()?;
        data.scratch.clear();
        let end = data.reader.feed(input, &mut data.scratch);
        if let Some(copy) = data.copy.as_mut() {
            if copy.len() + data.scratch.len() > crate::auth::DKIM_MAX_MESSAGE {
                data.copy = None;
            } else {
                copy.extend_from_slice(&data.scratch);
            }
        }
        if data.write_error.is_none()
            && !data.no_space
            && !data.scratch.is_empty()
            && let Err(err) = data.message.write(&data.scratch)
        {
            data.write_error = Some(err);
        }
        // Count what arrived against the free space before the disk is full, not after.
        if let Some(transaction) = self.transaction.as_mut()
            && !data.no_space
            && data.message.size() > transaction.space.octets()
        {
            let wanted = data.message.size().saturating_add(SPACE_STEP);
            data.no_space = !self.space.grow(&mut transaction.space, &self.context, wanted);
        }
        end
    }

    /// Counts an error reply; too many end the session.
    fn error(&mut self, reply: Reply) -> Action {
        self.errors += 1;
        if self.errors >= self.context.config.smtp.max_errors {
            tracing::warn!(client = %self.client, errors = self.errors, "too many errors, disconnecting");
            return Action::Close(Reply::new(421, "4.7.0", format!("{} too many errors", self.hostname())));
        }
        Action::Reply(reply)
    }

    /// One command line; None only for a BDAT whose octets are still to come.
    fn command(&mut self, line: &[u8]) -> Option<Action> {
        self.stats.commands += 1;
        let command = match command::parse(line) {
            Ok(command) => command,
            // The octets announced follow all the same: read and drop them, then refuse.
            Err(err @ CommandError::BadChunk { size, .. }) => return self.bdat(size, false, Some(err.reply())),
            Err(err @ CommandError::NoChunkSize) => {
                tracing::warn!(client = %self.client, "BDAT without a chunk size, closing");
                return Some(Action::Close(err.reply()));
            }
            Err(err) => return Some(self.error(err.reply())),
        };
        let reply = match command {
            Command::Ehlo(name) => self.ehlo(name, true),
            Command::Helo(name) => self.ehlo(name, false),
            Command::Mail(mail) => self.mail(mail),
            Command::Rcpt(rcpt) => match self.rcpt(rcpt) {
                RcptStep::Reply(reply) => reply,
                RcptStep::Verify(recipient) => return Some(Action::Verify(Box::new(recipient))),
            },
            Command::Data => return Some(self.data()),
            Command::Bdat { size, last } => return self.bdat(size, last, None),
            Command::Rset => {
                self.reset_transaction();
                Reply::new(250, "2.0.0", "Ok")
            }
            Command::Noop => Reply::new(250, "2.0.0", "Ok"),
            Command::Quit => return Some(Action::Close(Reply::new(221, "2.0.0", "Bye"))),
            // RFC 5321 3.5.3: 252 when we cannot verify but will accept.
            Command::Vrfy(_) => {
                Reply::new(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
            }
            Command::Help => {
                Reply::new(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS")
            }
            Command::StartTls => return Some(self.starttls()),
            Command::Etrn(node) => self.etrn(node),
            Command::NotImplemented(verb) => Reply::new(502, "5.5.1", format!("{verb} not implemented")),
        };
        // 452 (too many recipients, low space) is the server's limit, not the client's error: a client
        // with many recipients must be able to send the rest later (RFC 5321 4.5.3.1.10).
        Some(if reply.is_positive() || reply.code == 452 { Action::Reply(reply) } else { self.error(reply) })
    }

    /// EHLO/HELO (RFC 5321 4.1.1.1): resets any transaction and lists our extensions.
    fn ehlo(&mut self, name: String, extended: bool) -> Reply {
        tracing::info!(client = %self.client, helo = %name, extended, "helo");
        self.reset_transaction();
        self.helo = Some(Helo { name, extended });
        if !extended {
            return Reply::plain(250, self.hostname().to_string());
        }
        let mut lines = vec![
            self.hostname().to_string(),
            format!("SIZE {}", self.context.config.smtp.max_message_size),
            "PIPELINING".to_string(),
            "8BITMIME".to_string(),
            // RFC 3030: BDAT, and binary bodies, which only BDAT can carry.
            "CHUNKING".to_string(),
            "BINARYMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "DSN".to_string(),
        ];
        if self.tls_available && self.tls.is_none() {
            lines.push("STARTTLS".to_string());
        }
        // RFC 8689 2: REQUIRETLS is offered only in a TLS session; outbound, such a message goes
        // only over verified TLS to next hops that offer it in turn (`deliver::client`).
        if self.tls.is_some() {
            lines.push("REQUIRETLS".to_string());
        }
        if self.etrn_allowed() {
            lines.push("ETRN".to_string());
        }
        Reply::multiline(250, lines)
    }

    /// MAIL (RFC 5321 4.1.1.2), with SIZE (RFC 1870 6) and the low-space check.
    fn mail(&mut self, mail: MailFrom) -> Reply {
        if self.helo.is_none() {
            return Reply::new(503, "5.5.1", "send EHLO or HELO first");
        }
        if self.transaction.is_some() {
            return Reply::new(503, "5.5.1", "nested MAIL command");
        }
        // RFC 8689 4.1 and 5: REQUIRETLS on a session without TLS was never offered and cannot be
        // honoured from its first hop on.
        if mail.requiretls && self.tls.is_none() {
            return Reply::new(530, "5.7.10", "REQUIRETLS needs a TLS session (STARTTLS first)");
        }
        if !mail.address.is_empty() {
            if !mail.smtputf8 && !mail.address.is_ascii() {
                return Reply::new(553, "5.6.7", "a non-ASCII sender address needs SMTPUTF8");
            }
            if let Err(why) = command::check_mailbox(&mail.address, mail.smtputf8) {
                return Reply::new(501, "5.1.7", format!("bad sender address syntax: {why}"));
            }
        }
        let max = self.context.config.smtp.max_message_size;
        if mail.size.is_some_and(|size| size > max) {
            return Reply::new(552, "5.3.4", format!("message size exceeds fixed limit of {max} octets"));
        }
        // RFC 1870: a declared SIZE that would not fit now gets 452 (552 is for the fixed limit).
        let Some(space) = self.space.reserve(&self.context, mail.size.unwrap_or(0)) else {
            return Reply::new(452, "4.3.1", "insufficient system storage");
        };
        let rate = self.context.config.smtp.max_messages_per_ip_per_minute;
        if !self.context.limits.charge(self.client, Rate::Messages, rate, Instant::now()) {
            tracing::warn!(client = %self.client, limit = rate, "message rate limit reached");
            return Reply::new(452, "4.7.0", format!("too much mail from {}, try again later", self.client));
        }
        self.transaction = Some(Transaction { mail, recipients: Vec::new(), hold: false, space });
        Reply::new(250, "2.1.0", "Ok")
    }

    /// RCPT (RFC 5321 4.1.1.3): only relay domains, never an open relay.
    fn rcpt(&mut self, rcpt: RcptTo) -> RcptStep {
        match self.rcpt_checks(rcpt) {
            Ok(recipient) => self.rcpt_known(recipient),
            Err(reply) => RcptStep::Reply(reply),
        }
    }

    /// The checks that need no knowledge of the domain's users: syntax, relay domain, limits.
    fn rcpt_checks(&mut self, rcpt: RcptTo) -> Result<Recipient, Reply> {
        let Some(transaction) = self.transaction.as_ref() else {
            return Err(Reply::new(503, "5.5.1", "need MAIL command"));
        };
        if self.data.is_some() {
            // RFC 3030 2: the envelope is complete once the first chunk has arrived.
            return Err(Reply::new(503, "5.5.1", "RCPT after BDAT"));
        }
        let smtputf8 = transaction.mail.smtputf8;
        if transaction.recipients.len() >= self.context.config.smtp.max_recipients {
            return Err(self.reject_rcpt(&rcpt.address, Reply::new(452, "4.5.3", "too many recipients")));
        }
        let address = match self.postmaster(&rcpt.address) {
            Some(Ok(address)) => address,
            Some(Err(reply)) => return Err(self.reject_rcpt(&rcpt.address, reply)),
            None => rcpt.address.clone(),
        };
        if !smtputf8 && !address.is_ascii() {
            let reply = Reply::new(553, "5.6.7", "a non-ASCII recipient address needs SMTPUTF8");
            return Err(self.reject_rcpt(&address, reply));
        }
        let domain = match command::check_mailbox(&address, smtputf8) {
            Ok(domain) => domain,
            Err(why) => {
                let reply = Reply::new(501, "5.1.3", format!("bad recipient address syntax: {why}"));
                return Err(self.reject_rcpt(&address, reply));
            }
        };
        if !self.context.config.is_relay_domain(domain) {
            return Err(self.reject_rcpt(&address, Reply::new(550, "5.7.1", "relaying denied")));
        }
        let rate = self.context.config.smtp.max_recipients_per_ip_per_minute;
        if !self.context.limits.charge(self.client, Rate::Recipients, rate, Instant::now()) {
            tracing::warn!(client = %self.client, limit = rate, "recipient rate limit reached");
            let reply = Reply::new(452, "4.7.0", format!("too many recipients from {}, try again later", self.client));
            return Err(self.reject_rcpt(&address, reply));
        }
        let mut recipient = Recipient::new(address);
        recipient.notify = rcpt.notify;
        recipient.orcpt = rcpt.orcpt;
        Ok(recipient)
    }

    /// What the lists and the cache say about a recipient that passed the checks.
    fn rcpt_known(&mut self, recipient: Recipient) -> RcptStep {
        let decision = match &self.context.recipients {
            Some(recipients) => recipients.lookup(&recipient.address),
            None => Decision::Accept,
        };
        if decision == Decision::Callout {
            return RcptStep::Verify(recipient);
        }
        RcptStep::Reply(self.rcpt_decided(recipient, decision))
    }

    /// The callout's answer: the reply to the RCPT that waited for it. The session goes on with
    /// [`Session::feed`] (with no new input) for commands pipelined behind it.
    pub fn verified(&mut self, recipient: Recipient, decision: Decision) -> Action {
        let reply = self.rcpt_decided(recipient, decision);
        if reply.is_positive() { Action::Reply(reply) } else { self.error(reply) }
    }

    fn rcpt_decided(&mut self, recipient: Recipient, decision: Decision) -> Reply {
        let reply = match decision {
            // RFC 3463 5.1.1: bad destination mailbox address.
            Decision::Reject => Reply::new(550, "5.1.1", "recipient address rejected: no such user"),
            // 4.4.3: the directory server (the primary) is unavailable. Never 550 for that.
            Decision::TempFail | Decision::Callout => {
                Reply::new(451, "4.4.3", "recipient cannot be verified now, try again later")
            }
            Decision::Accept | Decision::Hold => {
                if let Some(transaction) = self.transaction.as_mut() {
                    transaction.hold |= decision == Decision::Hold;
                    transaction.recipients.push(recipient);
                }
                return Reply::new(250, "2.1.5", "Ok");
            }
        };
        self.reject_rcpt(&recipient.address, reply)
    }

    /// RFC 5321 4.5.1 requires accepting `<postmaster>` without a domain. We take it as the postmaster
    /// of the first relay domain (the site we are backup MX for); with no relay domain it is refused.
    fn postmaster(&self, address: &str) -> Option<Result<String, Reply>> {
        if !address.eq_ignore_ascii_case("postmaster") {
            return None;
        }
        Some(match self.context.config.relay.domains.first() {
            Some(domain) => Ok(format!("postmaster@{domain}")),
            None => Err(Reply::new(550, "5.7.1", "no domain to deliver <postmaster> to")),
        })
    }

    fn reject_rcpt(&mut self, address: &str, reply: Reply) -> Reply {
        self.stats.rejected_rcpts += 1;
        self.context.metrics.rejected();
        let from = self.transaction.as_ref().map(|t| t.mail.address.as_str()).unwrap_or("");
        tracing::warn!(client = %self.client, from, rcpt = %address, reason = %reply.to_string().trim_end(), "rcpt rejected");
        reply
    }

    /// DATA (RFC 5321 4.1.1.4): opens the spool file and writes our Received header first.
    fn data(&mut self) -> Action {
        let reply = match self.transaction.as_ref() {
            None => Some(Reply::new(503, "5.5.1", "need MAIL command")),
            // RFC 3030 2: DATA and BDAT cannot be mixed in one transaction.
            Some(_) if self.data.is_some() => Some(Reply::new(503, "5.5.1", "DATA after BDAT")),
            // RFC 3030 3: a binary body cannot be sent with DATA; the client must RSET.
            Some(t) if t.mail.body == BodyType::BinaryMime => {
                Some(Reply::new(503, "5.5.1", "BODY=BINARYMIME needs BDAT, not DATA"))
            }
            // RFC 2920 3.1 / RFC 5321 3.3: with no accepted recipient, DATA gets 554.
            Some(t) if t.recipients.is_empty() => Some(Reply::new(554, "5.5.1", "no valid recipients")),
            Some(_) => None,
        };
        if let Some(reply) = reply {
            return self.error(reply);
        }
        match self.open_message(false) {
            Ok(()) => Action::Reply(Reply::plain(354, "End data with <CR><LF>.<CR><LF>")),
            Err(reply) => Action::Reply(reply),
        }
    }

    /// Opens the spool file of the transaction's message, writes our Received header first, and
    /// makes it the message being received (after DATA, or in BDAT chunks when `chunked`).
    fn open_message(&mut self, chunked: bool) -> Result<(), Reply> {
        let id = self.context.spool.new_id();
        let header = self.received_header(&id, SystemTime::now());
        let opened = Arc::clone(&self.context.spool).incoming(&id).and_then(|mut message| {
            message.write(header.as_bytes())?;
            Ok(message)
        });
        let message = match opened {
            Ok(message) => message,
            Err(err) => {
                tracing::error!(client = %self.client, queue_id = %id, error = %err, "cannot create queue file");
                return Err(Reply::new(451, "4.3.0", "error: cannot write queue file"));
            }
        };
        let smtp = &self.context.config.smtp;
        let (size, line, received) = (smtp.max_message_size, smtp.max_line_length, smtp.max_received_headers);
        let binary = self.transaction.as_ref().is_some_and(|t| t.mail.body == BodyType::BinaryMime);
        let reader = if chunked {
            DataReader::chunked(size, line, received, binary)
        } else {
            DataReader::new(size, line, received)
        };
        self.data = Some(DataPhase {
            chunked,
            reader: reader.with_max_header(smtp.max_header_size),
            message,
            write_error: None,
            no_space: false,
            scratch: Vec::new(),
            copy: self.context.sender_check.as_ref().map(|_| Vec::new()),
        });
        Ok(())
    }

    /// BDAT (RFC 3030 2); `bad_line` is the reply to a line with a size but bad otherwise. Returns
    /// the reply at once for an empty chunk; otherwise none yet: it comes once the octets are in.
    fn bdat(&mut self, size: u64, last: bool, bad_line: Option<Reply>) -> Option<Action> {
        let refusal = match bad_line {
            Some(reply) => {
                // A chunk missing from a message begun: it can never be whole.
                if self.data.is_some() {
                    self.fail_transaction("bad BDAT line");
                }
                Some(reply)
            }
            None => self.bdat_refusal(size),
        };
        self.chunk = Some(Chunk { remaining: size, size, last, refusal });
        if size == 0 { Some(self.chunk_done()) } else { None }
    }

    /// Why a well-formed BDAT of `size` octets cannot add to the message, or None (then the
    /// message is opened at the first chunk).
    fn bdat_refusal(&mut self, size: u64) -> Option<Reply> {
        let Some(helo) = &self.helo else { return Some(Reply::new(503, "5.5.1", "send EHLO or HELO first")) };
        if !helo.extended {
            // Extensions exist only after EHLO (RFC 5321 4.1.1.1): CHUNKING was not negotiated.
            return Some(Reply::new(502, "5.5.1", "BDAT not available after HELO (CHUNKING needs EHLO)"));
        }
        let transaction = match &self.transaction {
            None => return Some(Reply::new(503, "5.5.1", "need MAIL command")),
            Some(t) if t.recipients.is_empty() => return Some(Reply::new(554, "5.5.1", "no valid recipients")),
            Some(t) => t,
        };
        let max = self.context.config.smtp.max_message_size;
        let so_far = self.data.as_ref().map_or(0, |d| d.reader.size());
        if so_far.saturating_add(size) > max {
            tracing::warn!(client = %self.client, from = %transaction.mail.address, size = so_far.saturating_add(size),
                "message rejected: BDAT beyond the size limit");
            self.fail_transaction("BDAT beyond the size limit");
            return Some(Reply::new(552, "5.3.4", format!("message size exceeds fixed limit of {max} octets")));
        }
        if self.data.is_none()
            && let Err(reply) = self.open_message(true)
        {
            self.fail_transaction("cannot create queue file");
            return Some(reply);
        }
        None
    }

    /// A chunk failed: RFC 3030 2 has the client send no more, and makes the transaction's state
    /// indeterminate. We end it, so chunks already pipelined get 503 (their octets are dropped).
    fn fail_transaction(&mut self, why: &str) {
        if self.transaction.is_some() {
            self.stats.rejected_messages += 1;
            self.context.metrics.rejected();
            tracing::info!(client = %self.client, reason = why, "transaction ended by a failed BDAT");
        }
        self.reset_transaction();
    }

    /// The chunk's octets are all in: its reply, or the message's end (RFC 3030 2: "Once the
    /// receiver-SMTP receives the specified number of octets, it will return a 250 reply code").
    fn chunk_done(&mut self) -> Action {
        let Some(chunk) = self.chunk.take() else {
            return Action::Reply(Reply::new(451, "4.3.0", "internal error: no chunk"));
        };
        if let Some(reply) = chunk.refusal {
            return self.refused(reply);
        }
        let (Some(mut data), Some(transaction)) = (self.data.take(), self.transaction.take()) else {
            return Action::Reply(Reply::new(451, "4.3.0", "internal error: no transaction"));
        };
        if chunk.last {
            data.reader.finish();
            return self.end_of_message(data, transaction);
        }
        // A problem found in this chunk ends the transaction now rather than after more chunks.
        if let Some(action) = self.verdict(&data, &transaction, false) {
            return action;
        }
        self.data = Some(data);
        self.transaction = Some(transaction);
        Action::Reply(Reply::new(250, "2.0.0", format!("{} octets received", chunk.size)))
    }

    /// The reply to a refused command: error replies count towards `smtp.max_errors`; 452 and 451
    /// (our limits, our disk) do not.
    fn refused(&mut self, reply: Reply) -> Action {
        if reply.code == 452 || reply.code == 451 { Action::Reply(reply) } else { self.error(reply) }
    }

    /// Forgets the transaction and any message being received for it (RSET, EHLO, STARTTLS; RFC
    /// 3030 2: RSET "clears all segments sent during that transaction").
    fn reset_transaction(&mut self) {
        self.transaction = None;
        self.data = None;
    }

    /// `Received:` as in RFC 5321 4.4, without a reverse DNS name: `from HELO ([IP])`.
    fn received_header(&self, id: &str, now: SystemTime) -> String {
        let extended = self.helo.as_ref().is_some_and(|h| h.extended);
        let smtputf8 = self.transaction.as_ref().is_some_and(|t| t.mail.smtputf8);
        let only_recipient = match self.transaction.as_ref().map(|t| t.recipients.as_slice()) {
            Some([only]) => Some(only.address.as_str()),
            _ => None,
        };
        Stamp {
            helo: self.helo.as_ref().map(|h| h.name.as_str()).unwrap_or("unknown"),
            client: self.client,
            tls: self.tls.as_ref(),
            protocol: received::protocol(extended, self.tls.is_some(), smtputf8),
            by: self.hostname(),
            id,
            only_recipient,
            date: now,
        }
        .header()
    }

    /// The final dot arrived: refuse the message or hand it over for commit. Either way the
    /// transaction is over (RFC 5321 4.1.1.4).
    fn end_of_data(&mut self) -> Action {
        let (Some(data), Some(transaction)) = (self.data.take(), self.transaction.take()) else {
            return Action::Reply(Reply::new(451, "4.3.0", "internal error: no transaction"));
        };
        self.end_of_message(data, transaction)
    }

    /// The whole message is in (the final dot, or BDAT LAST): refuse it or hand it over for commit.
    fn end_of_message(&mut self, data: DataPhase, transaction: Transaction) -> Action {
        if let Some(action) = self.verdict(&data, &transaction, true) {
            return action;
        }
        let (envelope, space) = self.envelope(transaction);
        self.message_id = data.reader.message_id();
        Action::Commit(Box::new(PendingMessage { message: data.message, envelope, copy: data.copy, space }))
    }

    /// Why the message received so far cannot be queued, as the action that says so; None when it
    /// can. `last_look` asks the disk afresh, as before a commit.
    fn verdict(&mut self, data: &DataPhase, transaction: &Transaction, last_look: bool) -> Option<Action> {
        let id = data.message.id().to_string();
        if let Some(reply) = self.content_refusal(data.reader.problem()) {
            self.stats.rejected_messages += 1;
            self.context.metrics.rejected();
            tracing::warn!(client = %self.client, queue_id = %id, from = %transaction.mail.address,
                size = data.reader.size(), reason = %reply.to_string().trim_end(), "message rejected");
            return Some(self.error(reply));
        }
        if let Some(err) = &data.write_error {
            tracing::error!(client = %self.client, queue_id = %id, error = %err, "queue file write error");
            return Some(Action::Reply(Reply::new(451, "4.3.0", "error: queue file write error")));
        }
        // The last look before the commit: other sessions may have filled the disk meanwhile.
        if data.no_space || (last_look && !self.space.confirm(&transaction.space, &self.context, data.message.size())) {
            tracing::warn!(client = %self.client, queue_id = %id, from = %transaction.mail.address,
                size = data.reader.size(), "message refused: spool low on space");
            return Some(Action::Reply(Reply::new(452, "4.3.1", "insufficient system storage")));
        }
        None
    }

    /// The reply to a message whose content breaks a rule.
    fn content_refusal(&self, problem: Option<DataProblem>) -> Option<Reply> {
        let smtp = &self.context.config.smtp;
        Some(match problem? {
            DataProblem::BareNewline => Reply::new(550, "5.5.2", "message contains bare CR or LF"),
            DataProblem::TooBig => Reply::new(
                552,
                "5.3.4",
                format!("message size exceeds fixed limit of {} octets", smtp.max_message_size),
            ),
            DataProblem::LineTooLong => {
                Reply::new(554, "5.6.0", format!("message contains a line longer than {} octets", smtp.max_line_length))
            }
            DataProblem::TooManyReceived => Reply::new(554, "5.4.6", "too many Received headers: mail loop"),
            DataProblem::HeaderTooBig => Reply::new(
                552,
                "5.3.4",
                format!("message header size exceeds limit of {} octets", smtp.max_header_size),
            ),
        })
    }

    fn envelope(&self, transaction: Transaction) -> (Envelope, Reservation) {
        let Transaction { mail, recipients, hold, space } = transaction;
        let mut envelope = Envelope::new(String::new(), mail.address, recipients);
        envelope.ret = mail.ret;
        envelope.envid = mail.envid;
        envelope.body = mail.body;
        envelope.smtputf8 = mail.smtputf8;
        envelope.requiretls = mail.requiretls;
        envelope.client_ip = Some(self.client);
        envelope.helo = self.helo.as_ref().map(|h| h.name.clone()).unwrap_or_default();
        envelope.record(format!("received from {} [{}]", envelope.helo, self.client));
        if hold {
            // The `hold` policy: an unverifiable recipient was accepted for the operator to review.
            envelope.held = true;
            envelope.record("held for review: a recipient could not be verified");
        }
        (envelope, space)
    }

    /// The result of [`PendingMessage::commit`]: only now may 250 be sent.
    pub fn committed(&mut self, result: Result<Envelope, SpoolError>) -> Reply {
        match result {
            Ok(envelope) => {
                (self.context.on_queued)(&envelope);
                self.stats.queued += 1;
                self.context.metrics.received();
                let message_id = self.message_id.take().unwrap_or_default();
                tracing::info!(client = %self.client, queue_id = %envelope.id, from = %envelope.sender,
                    nrcpt = envelope.recipients.len(), size = envelope.size, message_id = %message_id, "queued");
                Reply::new(250, "2.0.0", format!("Ok: queued as {}", envelope.id))
            }
            Err(err) => {
                tracing::error!(client = %self.client, error = %err, "cannot commit message");
                Reply::new(451, "4.3.0", "error: queue file write error")
            }
        }
    }

    /// May this client use ETRN? Only when the daemon can flush and `smtp.etrn_allow` lists it.
    fn etrn_allowed(&self) -> bool {
        self.context.etrn.is_some()
            && crate::config::cidr_list_contains(&self.context.config.smtp.etrn_allow, self.client)
    }

    /// ETRN (RFC 1985 5.2): start a queue run for a relay domain (`@domain`: and its subdomains).
    /// 250 started, 251 nothing waiting, 458 cannot queue (named queues), 459 not a relay domain.
    fn etrn(&mut self, node: EtrnNode) -> Reply {
        if self.context.config.smtp.etrn_allow.is_empty() || self.context.etrn.is_none() {
            return Reply::new(502, "5.5.1", "ETRN not available");
        }
        if !self.etrn_allowed() {
            tracing::warn!(client = %self.client, "ETRN refused: client not in smtp.etrn_allow");
            return Reply::new(550, "5.7.1", format!("ETRN not allowed from [{}]", self.client));
        }
        if self.helo.is_none() {
            return Reply::new(503, "5.5.1", "send EHLO or HELO first");
        }
        if self.transaction.is_some() {
            return Reply::new(503, "5.5.1", "MAIL transaction in progress");
        }
        let (name, domains): (String, Vec<String>) = match node {
            EtrnNode::Queue(queue) => {
                return Reply::new(
                    458,
                    "4.3.0",
                    format!("Unable to queue messages for node #{queue}: no named queues"),
                );
            }
            EtrnNode::Domain(d) => (d.clone(), self.relay_domains(|r| r == d)),
            EtrnNode::Subdomains(d) => {
                let suffix = format!(".{d}");
                (format!("@{d}"), self.relay_domains(|r| r == d || r.ends_with(&suffix)))
            }
        };
        if domains.is_empty() {
            return Reply::new(459, "4.7.1", format!("Node {name} not allowed: not a relay domain"));
        }
        let waiting: usize =
            domains.iter().map(|d| self.context.spool.count(&Filter { held: Some(false), ..Filter::domain(d) })).sum();
        tracing::info!(client = %self.client, node = %name, waiting, "ETRN");
        if waiting == 0 {
            return Reply::new(251, "2.0.0", format!("OK, no messages waiting for node {name}"));
        }
        if let Some(flush) = &self.context.etrn {
            domains.iter().for_each(|d| flush(d));
        }
        Reply::new(250, "2.0.0", format!("OK, queuing for node {name} started"))
    }

    fn relay_domains(&self, wanted: impl Fn(&str) -> bool) -> Vec<String> {
        self.context.config.relay.domains.iter().filter(|d| wanted(d)).cloned().collect()
    }

    /// STARTTLS (RFC 3207 4).
    fn starttls(&mut self) -> Action {
        let reply = if !self.tls_available {
            Reply::new(502, "5.5.1", "STARTTLS not available")
        } else if self.tls.is_some() {
            Reply::new(503, "5.5.1", "TLS already active")
        } else if self.transaction.is_some() {
            Reply::new(503, "5.5.1", "MAIL transaction in progress")
        } else {
            return Action::StartTls(Reply::new(220, "2.0.0", "Ready to start TLS"));
        };
        self.error(reply)
    }

    /// The TLS handshake succeeded with `tls`: RFC 3207 4.2 says to forget everything learnt before it.
    pub fn tls_started(&mut self, tls: TlsInfo) {
        tracing::info!(client = %self.client, version = %tls.version, cipher = %tls.cipher, "tls started");
        self.tls = Some(tls);
        self.helo = None;
        self.reset_transaction();
        self.pending.clear();
        self.discarding = false;
    }

    /// Logs the end of the session with its counters.
    pub fn log_disconnect(&self, reason: &str) {
        let s = self.stats;
        tracing::info!(client = %self.client, reason, commands = s.commands, queued = s.queued,
            rejected_messages = s.rejected_messages, rejected_rcpts = s.rejected_rcpts, errors = self.errors, "disconnect");
    }
}

#[cfg(test)]
mod tests;

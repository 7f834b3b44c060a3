//! The outbound SMTP client (RFC 5321): one connection to one next hop, carrying any number of
//! transactions. Replies and EHLO keywords are parsed by small pure functions; the session is a
//! thin loop of writes and reads, each bounded by its RFC 5321 4.5.3.2 timeout.
//!
//! The body goes with `BDAT size LAST` when the next hop offers CHUNKING (RFC 3030): sent as
//! stored, without dot-stuffing, and the only way a BINARYMIME message may go.

use super::dane::DaneVerifier;
use super::route::NextHop;
use super::{Detail, RcptOutcome};
use crate::config::{DeliveryConfig, SourceAddress};
use crate::spool::{BodyType, DsnNotify, DsnRet, Envelope, Queue, Recipient};
use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Starts the text of every failure that RFC 8689's REQUIRETLS caused, so that a message that
/// expires after such failures is returned with 5.7.10 rather than 4.4.7 ([`requiretls_expiry_status`]).
pub const REQUIRETLS_MARK: &str = "REQUIRETLS";

/// RFC 8689 5: the status of a REQUIRETLS message whose lifetime ended, from its recipient's last
/// error: 5.7.10 ("encryption needed") when the requirement is what kept it, else None.
pub fn requiretls_expiry_status(requiretls: bool, last_error: &str) -> Option<&'static str> {
    (requiretls && last_error.contains(REQUIRETLS_MARK)).then_some("5.7.10")
}

/// Longest reply line we accept; RFC 5321 4.5.3.1.5 says 512 octets, servers send more.
const MAX_REPLY_LINE: u64 = 16 * 1024;
/// Lines of one multiline reply we keep (more are read and dropped).
const MAX_REPLY_LINES: usize = 100;
/// Size of the chunks read from the body file and written to the socket.
const CHUNK: usize = 256 * 1024;

/// What went wrong on a connection; `Display` is the text shown to operators and in DSNs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("connect to {addr}: {reason}")]
    Connect { addr: std::net::SocketAddr, reason: String },
    /// The connection broke, timed out or was closed during a stage.
    #[error("{stage} to {peer}: {reason}")]
    Network { stage: String, peer: String, reason: String },
    /// The server's reply ended the session or the transaction.
    #[error("{stage} to {peer}: {reply}")]
    Reply { stage: String, peer: String, reply: Reply },
    /// TLS was required and could not be had, or the handshake failed. `status` is the RFC 3463
    /// code recipients get (4.7.5 by default; RFC 8689's 4.7.10 and 4.7.30 for REQUIRETLS).
    #[error("{stage} to {peer}: {reason}")]
    Tls { stage: String, peer: String, reason: String, required: bool, status: &'static str },
    /// The body file could not be read.
    #[error("cannot read message body: {0}")]
    Body(String),
}

impl ClientError {
    /// A temporary-failure detail for every recipient this error stops (4.x.x, RFC 3463).
    pub fn temp_detail(&self, remote_mta: Option<&str>) -> Detail {
        let (status, diagnostic) = match self {
            ClientError::Connect { .. } => ("4.4.1".to_string(), None),
            ClientError::Network { .. } => ("4.4.2".to_string(), None),
            ClientError::Reply { reply, .. } => (temporary_status(&reply.status()), Some(reply.to_string())),
            ClientError::Tls { status, .. } => (status.to_string(), None),
            ClientError::Body(_) => ("4.3.0".to_string(), None),
        };
        let remote_mta = match self {
            ClientError::Connect { .. } | ClientError::Body(_) => None,
            _ => remote_mta.map(str::to_string),
        };
        // A broken connection, a failed handshake or a 421 (RFC 5321 3.8: the server closes the
        // session) is the destination's failure; a body we cannot read is ours, not theirs.
        let session = match self {
            ClientError::Connect { .. } | ClientError::Network { .. } | ClientError::Tls { .. } => true,
            ClientError::Reply { reply, .. } => reply.code == 421,
            ClientError::Body(_) => false,
        };
        Detail { status, text: self.to_string(), remote_mta, diagnostic, session }
    }
}

/// The same status in class 4: a failure that ends a session is always retried.
fn temporary_status(status: &str) -> String {
    match status.split_once('.') {
        Some((_, rest)) => format!("4.{rest}"),
        None => "4.0.0".to_string(),
    }
}

/// One SMTP reply: the code and its text lines (without the code and separator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// The RFC 3463 enhanced code at the start of the text, if the server sent one.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let word = first.split_whitespace().next()?;
        let parts: Vec<&str> = word.split('.').collect();
        let ok = parts.len() == 3
            && parts.iter().all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
            && matches!(parts[0], "2" | "4" | "5")
            && parts[0].as_bytes()[0] == b'0' + (self.code / 100) as u8;
        ok.then_some(word)
    }

    /// The enhanced status: the server's, or the class default (X.0.0).
    pub fn status(&self) -> String {
        self.enhanced().map(str::to_string).unwrap_or_else(|| format!("{}.0.0", self.code / 100))
    }

    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    fn outcome(&self, text: String, remote_mta: &str) -> RcptOutcome {
        let detail = Detail {
            status: self.status(),
            text,
            remote_mta: Some(remote_mta.to_string()),
            diagnostic: Some(self.to_string()),
            // 421 at any stage: the server is closing the session (RFC 5321 3.8).
            session: self.code == 421,
        };
        match self.code / 100 {
            2 => RcptOutcome::Delivered(detail),
            5 => RcptOutcome::PermFail(detail),
            _ => RcptOutcome::TempFail(Detail { status: temporary_status(&detail.status), ..detail }),
        }
    }
}

impl fmt::Display for Reply {
    /// `550 5.1.1 first line second line`: continuation lines that repeat the enhanced code drop it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        let enhanced = self.enhanced();
        for (i, line) in self.lines.iter().enumerate() {
            let line = match enhanced {
                Some(code) if i > 0 => line.strip_prefix(code).map(str::trim_start).unwrap_or(line),
                _ => line,
            };
            if !line.is_empty() {
                write!(f, " {line}")?;
            }
        }
        Ok(())
    }
}

/// Parses one reply line: `Ok((code, is_last, text))` (RFC 5321 4.2.1).
pub fn parse_reply_line(line: &str) -> Result<(u16, bool, &str), String> {
    let line = line.trim_end_matches(['\r', '\n']);
    let bytes = line.as_bytes();
    if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&bytes[0]) {
        return Err(format!("malformed reply: {:?}", truncate(line, 80)));
    }
    let code = u16::from(bytes[0] - b'0') * 100 + u16::from(bytes[1] - b'0') * 10 + u16::from(bytes[2] - b'0');
    match bytes.get(3) {
        None => Ok((code, true, "")),
        Some(b' ') => Ok((code, true, &line[4..])),
        Some(b'-') => Ok((code, false, &line[4..])),
        Some(_) => Err(format!("malformed reply: {:?}", truncate(line, 80))),
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// What the server announced in its EHLO reply (RFC 5321 4.1.1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// RFC 2920.
    pub pipelining: bool,
    /// RFC 3207.
    pub starttls: bool,
    /// RFC 1870: the largest message; None when not announced or unlimited (0).
    pub size: Option<u64>,
    /// The SIZE keyword itself, so we may send SIZE= on MAIL.
    pub size_offered: bool,
    /// RFC 6152.
    pub eightbitmime: bool,
    /// RFC 6531.
    pub smtputf8: bool,
    /// RFC 3461.
    pub dsn: bool,
    /// RFC 3030 2: BDAT.
    pub chunking: bool,
    /// RFC 3030 3: BODY=BINARYMIME (only with CHUNKING).
    pub binarymime: bool,
    /// RFC 8689 2: the server takes `MAIL FROM:<..> REQUIRETLS` (offered only over TLS).
    pub requiretls: bool,
}

impl Capabilities {
    /// Reads the keywords from the lines after the greeting line of an EHLO reply.
    pub fn parse(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else { continue };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "STARTTLS" => caps.starttls = true,
                "8BITMIME" => caps.eightbitmime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "DSN" => caps.dsn = true,
                "CHUNKING" => caps.chunking = true,
                "BINARYMIME" => caps.binarymime = true,
                "REQUIRETLS" => caps.requiretls = true,
                "SIZE" => {
                    caps.size_offered = true;
                    caps.size = words.next().and_then(|n| n.parse::<u64>().ok()).filter(|&n| n > 0);
                }
                _ => {}
            }
        }
        caps
    }
}

/// RFC 3461 4 xtext, shared with the inbound side (ENVID is passed on encoded as it came).
use crate::xtext::xtext_encode;

/// Dot-stuffs a CRLF body while streaming (RFC 5321 4.5.2): a line starting with `.` gets one more.
#[derive(Debug, Clone)]
pub struct DotStuffer {
    at_line_start: bool,
    /// The last two bytes seen, to know whether the body ends with CRLF.
    tail: [u8; 2],
    seen: u64,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer { at_line_start: true, tail: [0, 0], seen: 0 }
    }
}

impl DotStuffer {
    /// Appends `input`, stuffed, to `out`. Copies whole lines: only the first octet of each line
    /// needs a look (a byte-at-a-time loop was a third of a drain's instructions).
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + 8);
        let mut rest = input;
        while let Some(&first) = rest.first() {
            if self.at_line_start && first == b'.' {
                out.push(b'.');
            }
            match rest.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    out.extend_from_slice(&rest[..=end]);
                    rest = &rest[end + 1..];
                    self.at_line_start = true;
                }
                None => {
                    out.extend_from_slice(rest);
                    rest = &[];
                    self.at_line_start = false;
                }
            }
        }
        self.tail = match input {
            [.., a, b] => [*a, *b],
            [b] => [self.tail[1], *b],
            [] => self.tail,
        };
        self.seen += input.len() as u64;
    }

    /// Ends the data: CRLF unless the body already ends with one, then `.` CRLF.
    pub fn finish(&self, out: &mut Vec<u8>) {
        if self.seen > 0 && self.tail != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// The RFC 5321 4.5.3.2 client timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub greeting: Duration,
    pub command: Duration,
    pub data_init: Duration,
    pub data_block: Duration,
    pub data_done: Duration,
}

impl Timeouts {
    pub fn from_config(delivery: &DeliveryConfig) -> Timeouts {
        Timeouts {
            connect: delivery.connect_timeout.0,
            greeting: delivery.greeting_timeout.0,
            command: delivery.command_timeout.0,
            data_init: delivery.data_init_timeout.0,
            data_block: delivery.data_block_timeout.0,
            data_done: delivery.data_done_timeout.0,
        }
    }
}

/// Everything a session needs that does not change between connections.
pub struct ClientSettings {
    /// Our name in EHLO.
    pub helo_name: String,
    pub timeouts: Timeouts,
    /// Opportunistic TLS: any certificate (RFC 3207 4.1 lets the client decide; an unverified
    /// channel is still better than plain text).
    pub opportunistic: TlsConnector,
    /// TLS for `require_tls` domains: Web PKI roots plus the configured extra CA file.
    pub verified: TlsConnector,
    /// The same roots as a verifier, to tell after an opportunistic handshake whether the
    /// certificate would have passed (MTA-STS testing mode reports when it would not).
    pub webpki: Arc<rustls::client::WebPkiServerVerifier>,
    /// `delivery.source_address`: what connections are made from.
    pub source: SourceAddress,
    /// The crypto provider, for the per-host DANE configurations (RFC 7672 3).
    pub provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ClientSettings {
    /// Builds the TLS configurations; fails when the CA file cannot be read.
    pub fn new(helo_name: String, delivery: &DeliveryConfig) -> Result<ClientSettings, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &delivery.tls_ca_file {
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))? {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        let roots = Arc::new(roots);
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("TLS: {e}"))?;
        let verified = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let any = AcceptAnyCertificate(provider.signature_verification_algorithms);
        let opportunistic = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(any))
            .with_no_client_auth();
        Ok(ClientSettings {
            helo_name,
            timeouts: Timeouts::from_config(delivery),
            opportunistic: TlsConnector::from(Arc::new(opportunistic)),
            verified: TlsConnector::from(Arc::new(verified)),
            webpki,
            source: delivery.source_address,
            provider,
        })
    }

    /// A connector whose only check of the certificate is `dane`'s (RFC 7672 3).
    fn dane_connector(&self, dane: &Arc<DaneVerifier>) -> Result<TlsConnector, String> {
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(dane.clone())
            .with_no_client_auth();
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// Accepts any certificate but still checks the handshake signatures, so the channel is
/// encrypted to whoever holds the presented key.
#[derive(Debug)]
struct AcceptAnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// The socket, before or after STARTTLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the TCP stream is handed to the TLS handshake.
    Closed,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

/// How a session treats STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// Use it when offered, with any certificate.
    Opportunistic,
    /// Plain text only (after a failed opportunistic handshake).
    Disabled,
    /// Insist on it with a verified chain and name.
    Required,
    /// RFC 8689 4.2.1, for messages sent with REQUIRETLS: as `Required`, and the server must
    /// offer REQUIRETLS in its EHLO reply after STARTTLS, or the next MX is tried.
    RequireTls,
}

impl TlsMode {
    /// Does this mode refuse plain text and unverified certificates?
    pub fn is_required(self) -> bool {
        matches!(self, TlsMode::Required | TlsMode::RequireTls)
    }
}

/// The per-recipient results of one transaction, and whether the connection can carry another.
#[derive(Debug)]
pub struct Transaction {
    pub outcomes: Vec<RcptOutcome>,
    pub reusable: bool,
    /// The connection had carried a transaction before and broke before the server answered this
    /// one (or refused its RSET): a cached connection the server had closed. No body was sent, so
    /// the message may go again at once on a fresh connection instead of being deferred.
    pub stale: bool,
}

/// An open SMTP connection to one next hop, greeted and EHLO'd (and with TLS when used).
pub struct Session {
    io: BufReader<Stream>,
    /// `host[ip]`, for messages.
    peer: String,
    /// The host name, for DSN Remote-MTA.
    host: String,
    caps: Capabilities,
    /// Is the connection encrypted?
    pub tls: bool,
    /// Was the server's certificate verified (a chain to a trust anchor, valid for the host name)?
    /// Opportunistic TLS accepts any certificate, and only a verified session may carry a
    /// REQUIRETLS message (RFC 8689 4.2.1).
    pub verified: bool,
    /// Was the certificate matched by a DNSSEC-validated TLSA record (RFC 7672 3)?
    pub dane: bool,
    /// A transaction ran on this connection: RSET before the next one.
    used: bool,
    timeouts: Timeouts,
    /// The address connected to, so a cached session is reused only for a current next hop.
    addr: std::net::SocketAddr,
    /// When the connection was made, to retire it after the reuse time limit.
    opened: std::time::Instant,
    /// Transactions begun on this connection.
    transactions: u64,
    /// Replies read on this connection, to tell whether a transaction got any.
    replies: u64,
}

impl Session {
    /// Connects to `hop`, reads the greeting, sends EHLO (HELO after a 5xx) and STARTTLS as `mode` says.
    pub async fn open(hop: &NextHop, settings: &ClientSettings, mode: TlsMode) -> Result<Session, ClientError> {
        Session::open_with(hop, settings, mode, None).await
    }

    /// Like [`Session::open`]; with `dane` (the host has usable TLSA records) STARTTLS is mandatory
    /// and the certificate must match a record (RFC 7672 2.2 and 3), whatever `mode` says of TLS.
    pub async fn open_with(
        hop: &NextHop,
        settings: &ClientSettings,
        mode: TlsMode,
        dane: Option<Arc<DaneVerifier>>,
    ) -> Result<Session, ClientError> {
        let timeouts = settings.timeouts;
        let tcp = match tokio::time::timeout(timeouts.connect, connect(hop.addr, &settings.source)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(reason)) => return Err(ClientError::Connect { addr: hop.addr, reason }),
            Err(_) => return Err(ClientError::Connect { addr: hop.addr, reason: "timed out".into() }),
        };
        let _ = tcp.set_nodelay(true);
        let mut session = Session {
            io: BufReader::with_capacity(64 * 1024, Stream::Plain(tcp)),
            peer: format!("{}[{}]", hop.host, hop.addr.ip()),
            host: hop.host.clone(),
            caps: Capabilities::default(),
            tls: false,
            verified: false,
            dane: false,
            used: false,
            timeouts,
            addr: hop.addr,
            opened: std::time::Instant::now(),
            transactions: 0,
            replies: 0,
        };
        let greeting = session.read_reply("greeting", timeouts.greeting).await?;
        if greeting.code != 220 {
            return Err(session.reply_error("greeting", greeting));
        }
        session.hello(&settings.helo_name).await?;
        session.starttls(hop, settings, mode, dane).await?;
        Ok(session)
    }

    /// How the session is protected, for the delivery log: `dane-verified`, `verified` (PKIX),
    /// `unverified` (opportunistic TLS) or `none`.
    pub fn tls_label(&self) -> &'static str {
        match (self.tls, self.dane, self.verified) {
            (false, _, _) => "none",
            (true, true, _) => "dane-verified",
            (true, false, true) => "verified",
            (true, false, false) => "unverified",
        }
    }

    /// The host name this session talks to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The address this session is connected to.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// How long ago the connection was made.
    pub fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    /// What the server announced.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn hello(&mut self, name: &str) -> Result<(), ClientError> {
        let ehlo = self.command(&format!("EHLO {name}\r\n"), "EHLO", self.timeouts.command).await?;
        if ehlo.is_positive() {
            self.caps = Capabilities::parse(&ehlo);
            return Ok(());
        }
        // RFC 5321 3.2: a server that does not know EHLO answers 5xx; fall back to HELO.
        if ehlo.code / 100 != 5 {
            return Err(self.reply_error("EHLO", ehlo));
        }
        let helo = self.command(&format!("HELO {name}\r\n"), "HELO", self.timeouts.command).await?;
        if !helo.is_positive() {
            return Err(self.reply_error("HELO", helo));
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    /// RFC 3207: STARTTLS, then EHLO again, since the capabilities may differ under TLS.
    async fn starttls(
        &mut self,
        hop: &NextHop,
        settings: &ClientSettings,
        mode: TlsMode,
        dane: Option<Arc<DaneVerifier>>,
    ) -> Result<(), ClientError> {
        // RFC 7672 2.2: usable TLSA records make STARTTLS mandatory.
        let required = mode.is_required() || dane.is_some();
        let dane_mark = if dane.is_some() { "DANE: " } else { "" };
        // RFC 8689 4.2.1: a REQUIRETLS message that cannot get verified TLS is deferred (and in the
        // end returned) with 5.7.10, "encryption needed".
        let status = if mode == TlsMode::RequireTls { "4.7.10" } else { "4.7.5" };
        let requiretls = mode == TlsMode::RequireTls;
        let tls_error = |peer: &str, reason: String| ClientError::Tls {
            stage: "STARTTLS".into(),
            peer: peer.into(),
            reason: if requiretls {
                format!("{REQUIRETLS_MARK}: {dane_mark}{reason}")
            } else {
                format!("{dane_mark}{reason}")
            },
            required,
            status,
        };
        if mode == TlsMode::Disabled || (!self.caps.starttls && !required) {
            return Ok(());
        }
        if !self.caps.starttls {
            return Err(tls_error(&self.peer, "TLS is required, but STARTTLS was not offered".into()));
        }
        let reply = self.command("STARTTLS\r\n", "STARTTLS", self.timeouts.command).await?;
        if reply.code != 220 {
            if required {
                return Err(tls_error(&self.peer, format!("TLS is required, but STARTTLS got {reply}")));
            }
            // Opportunistic TLS: carry on in plain text (RFC 3207 4.1).
            return Ok(());
        }
        let name = server_name(&hop.host).map_err(|reason| tls_error(&self.peer, reason))?;
        let dane_connector = match &dane {
            Some(verifier) => Some(settings.dane_connector(verifier).map_err(|reason| tls_error(&self.peer, reason))?),
            None => None,
        };
        let connector = match &dane_connector {
            Some(connector) => connector,
            None if required => &settings.verified,
            None => &settings.opportunistic,
        };
        // RFC 3207 4.2: nothing may follow the 220 before the handshake; buffered bytes would be
        // injected plain text.
        if !self.io.buffer().is_empty() {
            return Err(tls_error(&self.peer, "data after the STARTTLS reply".into()));
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.io, BufReader::new(Stream::Closed)).into_inner() else {
            return Err(tls_error(&self.peer, "STARTTLS on an encrypted connection".into()));
        };
        let handshake = tokio::time::timeout(self.timeouts.command, connector.connect(name, tcp)).await;
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                // The DANE verifier's own words ("no TLSA record of ... matches") are the clearer.
                let reason = match dane.as_ref().and_then(|v| v.failure()) {
                    Some(failure) => failure.trim_start_matches("DANE: ").to_string(),
                    None => format!("TLS handshake failed: {e}"),
                };
                return Err(tls_error(&self.peer, reason));
            }
            Err(_) => return Err(tls_error(&self.peer, "TLS handshake timed out".into())),
        };
        self.verified = required || would_verify(&settings.webpki, &tls, &hop.host);
        self.dane = dane.is_some();
        self.io = BufReader::with_capacity(64 * 1024, Stream::Tls(Box::new(tls)));
        self.tls = true;
        self.hello(&settings.helo_name).await?;
        // RFC 8689 4.2.1: a next hop that does not offer REQUIRETLS must not get the message; the
        // next MX may (5.7.30, "REQUIRETLS support required", when none does).
        if mode == TlsMode::RequireTls && !self.caps.requiretls {
            // Leave politely: the next hop did nothing wrong, it merely lacks the extension.
            let _ = self.command("QUIT\r\n", "QUIT", self.timeouts.command).await;
            return Err(ClientError::Tls {
                stage: "EHLO".into(),
                peer: self.peer.clone(),
                reason: format!("{REQUIRETLS_MARK}: the server does not offer REQUIRETLS"),
                required,
                status: "4.7.30",
            });
        }
        Ok(())
    }

    /// Runs one mail transaction for `rcpts` of `envelope`, whose body is opened through `queue`,
    /// by queue ID, now that it is sent (never from a location remembered earlier: the store may
    /// have moved it since the delivery was scheduled).
    pub async fn send(&mut self, envelope: &Envelope, rcpts: &[&Recipient], queue: &Arc<dyn Queue>) -> Transaction {
        let (body, size) = match Body::open(queue, &envelope.id).await {
            Ok(opened) => opened,
            Err(e) => return self.all(rcpts.len(), RcptOutcome::TempFail(e.temp_detail(None)), true),
        };
        if let Some(refusal) = self.refuse_before_sending(envelope, size) {
            return self.all(rcpts.len(), refusal, true);
        }
        let mail = self.mail_command(envelope, size);
        let rcpt_cmds: Vec<String> = rcpts.iter().map(|r| self.rcpt_command(r)).collect();
        let (reused, replies_before) = (self.transactions > 0, self.replies);
        self.transactions += 1;
        // With CHUNKING the envelope ends without DATA: BDAT carries the body (RFC 3030 2).
        let chunking = self.caps.chunking;
        let result = if self.caps.pipelining {
            self.envelope_pipelined(&mail, &rcpt_cmds, rcpts, !chunking).await
        } else {
            self.envelope_one_by_one(&mail, &rcpt_cmds, rcpts, !chunking).await
        };
        self.used = true;
        let (mut outcomes, data_reply) = match result {
            Ok(done) => done,
            Err((partial, e)) => {
                let unanswered =
                    self.replies == replies_before || matches!(&e, ClientError::Reply { stage, .. } if stage == "RSET");
                let mut transaction = self.broken(partial, &e);
                transaction.stale = reused && unanswered;
                return transaction;
            }
        };
        let accepted: Vec<usize> = (0..rcpts.len()).filter(|&i| outcomes[i].is_none()).collect();
        let delivered = if chunking {
            self.send_bdat(body, size, &accepted, &mut outcomes).await
        } else {
            self.send_data(body, data_reply, &accepted, &mut outcomes).await
        };
        if let Err(e) = delivered {
            return self.broken(outcomes, &e);
        }
        let reusable = self.reset_if_failed(&outcomes).await;
        let outcomes = outcomes.into_iter().map(|o| o.unwrap_or_else(|| self.no_reply())).collect();
        Transaction { outcomes, reusable, stale: false }
    }

    /// The body with BDAT to the accepted recipients (none accepted: nothing to send).
    async fn send_bdat(
        &mut self,
        body: Body,
        size: u64,
        accepted: &[usize],
        outcomes: &mut [Option<RcptOutcome>],
    ) -> Result<(), ClientError> {
        if accepted.is_empty() {
            return Ok(());
        }
        let last = self.bdat(body, size).await?;
        for &i in accepted {
            outcomes[i] = Some(last.outcome(format!("BDAT LAST to {}: {last}", self.peer), &self.host));
        }
        Ok(())
    }

    /// The body after DATA's 354 to the accepted recipients, or DATA's refusal for them.
    async fn send_data(
        &mut self,
        body: Body,
        data_reply: Option<Reply>,
        accepted: &[usize],
        outcomes: &mut [Option<RcptOutcome>],
    ) -> Result<(), ClientError> {
        match data_reply {
            Some(reply) if reply.code == 354 && !accepted.is_empty() => {
                let last = self.data(body).await?;
                for &i in accepted {
                    outcomes[i] = Some(last.outcome(format!("end of DATA to {}: {last}", self.peer), &self.host));
                }
            }
            // RFC 2920 3.1: DATA accepted with no valid recipient: send an empty message's end.
            Some(reply) if reply.code == 354 => self.finish_empty_data().await?,
            Some(reply) => {
                for &i in accepted {
                    outcomes[i] = Some(reply.outcome(format!("DATA to {}: {reply}", self.peer), &self.host));
                }
            }
            None => {}
        }
        Ok(())
    }

    /// A recipient callout (issue 6): `MAIL FROM:<>`, `RCPT TO:<address>`, then `RSET`, so nothing is
    /// sent. Returns the RCPT reply, or the MAIL reply when that was refused.
    pub async fn callout(&mut self, address: &str) -> Result<Reply, ClientError> {
        let wait = self.timeouts.command;
        let mail = self.command("MAIL FROM:<>\r\n", "MAIL FROM", wait).await?;
        if !mail.is_positive() {
            return Ok(mail);
        }
        let rcpt = self.command(&format!("RCPT TO:<{address}>\r\n"), "RCPT TO", wait).await?;
        let _ = self.command("RSET\r\n", "RSET", wait).await;
        Ok(rcpt)
    }

    /// RFC 1870 SIZE, RFC 6152 8BITMIME and RFC 6531 SMTPUTF8 checks: refuse rather than send
    /// what the server cannot take.
    fn refuse_before_sending(&self, envelope: &Envelope, size: u64) -> Option<RcptOutcome> {
        let refuse = |status: &str, text: String| {
            Some(RcptOutcome::PermFail(Detail {
                status: status.to_string(),
                text,
                remote_mta: Some(self.host.clone()),
                diagnostic: None,
                session: false,
            }))
        };
        if let Some(limit) = self.caps.size
            && size > limit
        {
            return refuse("5.3.4", format!("message size {size} exceeds the limit {limit} of {}", self.peer));
        }
        match envelope.body {
            BodyType::EightBitMime if !self.caps.eightbitmime => {
                return refuse("5.6.3", format!("8-bit message, but {} does not offer 8BITMIME", self.peer));
            }
            // RFC 3030 3: binary data goes only to a server that announced BINARYMIME, and only with
            // BDAT; we do not convert it, so the message fails "in the usual manner for delivery
            // failures", with RFC 3463's conversion required but prohibited.
            BodyType::BinaryMime if !(self.caps.binarymime && self.caps.chunking) => {
                return refuse(
                    "5.6.3",
                    format!("binary message, but {} does not offer BINARYMIME with CHUNKING", self.peer),
                );
            }
            _ => {}
        }
        if envelope.smtputf8 && !self.caps.smtputf8 {
            return refuse("5.6.7", format!("internationalised address, but {} does not offer SMTPUTF8", self.peer));
        }
        // A REQUIRETLS message on a session that cannot carry it (one opened for other mail): never
        // sent, deferred. The deliverer opens REQUIRETLS sessions for such messages; this guards it.
        if envelope.requiretls && !(self.verified && self.caps.requiretls) {
            return Some(RcptOutcome::TempFail(Detail {
                status: "4.7.10".into(),
                text: format!("{REQUIRETLS_MARK}: {} was not reached over verified TLS offering REQUIRETLS", self.peer),
                remote_mta: Some(self.host.clone()),
                diagnostic: None,
                session: false,
            }));
        }
        None
    }

    fn mail_command(&self, envelope: &Envelope, size: u64) -> String {
        let mut cmd = format!("MAIL FROM:<{}>", envelope.sender);
        if self.caps.size_offered {
            cmd.push_str(&format!(" SIZE={size}"));
        }
        match envelope.body {
            BodyType::EightBitMime => cmd.push_str(" BODY=8BITMIME"),
            BodyType::BinaryMime => cmd.push_str(" BODY=BINARYMIME"),
            BodyType::SevenBit => {}
        }
        if envelope.smtputf8 {
            cmd.push_str(" SMTPUTF8");
        }
        // RFC 8689 4.2.1: the requirement travels on with the message.
        if envelope.requiretls {
            cmd.push_str(" REQUIRETLS");
        }
        if self.caps.dsn {
            match envelope.ret {
                Some(DsnRet::Full) => cmd.push_str(" RET=FULL"),
                Some(DsnRet::Hdrs) => cmd.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(envid) = &envelope.envid {
                cmd.push_str(&format!(" ENVID={}", xtext_encode(envid)));
            }
        }
        cmd.push_str("\r\n");
        cmd
    }

    fn rcpt_command(&self, rcpt: &Recipient) -> String {
        let mut cmd = format!("RCPT TO:<{}>", rcpt.address);
        if self.caps.dsn {
            if let Some(notify) = &rcpt.notify {
                let words: Vec<&str> = notify
                    .iter()
                    .map(|n| match n {
                        DsnNotify::Never => "NEVER",
                        DsnNotify::Success => "SUCCESS",
                        DsnNotify::Failure => "FAILURE",
                        DsnNotify::Delay => "DELAY",
                    })
                    .collect();
                cmd.push_str(&format!(" NOTIFY={}", words.join(",")));
            }
            if let Some(orcpt) = &rcpt.orcpt {
                cmd.push_str(&format!(" ORCPT={orcpt}"));
            }
        }
        cmd.push_str("\r\n");
        cmd
    }

    /// RFC 2920: RSET (when needed), MAIL, every RCPT and DATA (when `data`) in one write, then the
    /// replies in order.
    async fn envelope_pipelined(
        &mut self,
        mail: &str,
        rcpts: &[String],
        who: &[&Recipient],
        data: bool,
    ) -> EnvelopeResult {
        let mut batch = String::with_capacity(mail.len() + rcpts.iter().map(String::len).sum::<usize>() + 16);
        if self.used {
            batch.push_str("RSET\r\n");
        }
        batch.push_str(mail);
        rcpts.iter().for_each(|r| batch.push_str(r));
        if data {
            batch.push_str("DATA\r\n");
        }
        let mut outcomes: Vec<Option<RcptOutcome>> = vec![None; rcpts.len()];
        if let Err(e) = self.write("MAIL FROM", batch.as_bytes(), self.timeouts.command).await {
            return Err((outcomes, e));
        }
        if self.used {
            match self.read_reply("RSET", self.timeouts.command).await {
                Ok(reply) if reply.is_positive() => {}
                Ok(reply) => return Err((outcomes, self.reply_error("RSET", reply))),
                Err(e) => return Err((outcomes, e)),
            }
        }
        let mail_reply = match self.read_reply("MAIL FROM", self.timeouts.command).await {
            Ok(reply) => reply,
            Err(e) => return Err((outcomes, e)),
        };
        for (i, rcpt) in who.iter().enumerate() {
            let stage = format!("RCPT TO:<{}>", rcpt.address);
            let reply = match self.read_reply(&stage, self.timeouts.command).await {
                Ok(reply) => reply,
                Err(e) => return Err((outcomes, e)),
            };
            if !mail_reply.is_positive() {
                outcomes[i] = Some(self.mail_refused(&mail_reply));
            } else if !reply.is_positive() {
                outcomes[i] = Some(self.rcpt_refused(&stage, &reply));
            }
        }
        if !data {
            return Ok((outcomes, None));
        }
        match self.read_reply("DATA", self.timeouts.data_init).await {
            Ok(reply) => Ok((outcomes, Some(reply))),
            Err(e) => Err((outcomes, e)),
        }
    }

    /// Without PIPELINING: one command, one reply; DATA (when `data`) only when a recipient was accepted.
    async fn envelope_one_by_one(
        &mut self,
        mail: &str,
        rcpts: &[String],
        who: &[&Recipient],
        data: bool,
    ) -> EnvelopeResult {
        let mut outcomes: Vec<Option<RcptOutcome>> = vec![None; rcpts.len()];
        if self.used {
            match self.command("RSET\r\n", "RSET", self.timeouts.command).await {
                Ok(reply) if reply.is_positive() => {}
                Ok(reply) => return Err((outcomes, self.reply_error("RSET", reply))),
                Err(e) => return Err((outcomes, e)),
            }
        }
        let mail_reply = match self.command(mail, "MAIL FROM", self.timeouts.command).await {
            Ok(reply) => reply,
            Err(e) => return Err((outcomes, e)),
        };
        if !mail_reply.is_positive() {
            let refused = self.mail_refused(&mail_reply);
            return Ok((vec![Some(refused); rcpts.len()], None));
        }
        for (i, (cmd, rcpt)) in rcpts.iter().zip(who).enumerate() {
            let stage = format!("RCPT TO:<{}>", rcpt.address);
            match self.command(cmd, &stage, self.timeouts.command).await {
                Ok(reply) if !reply.is_positive() => outcomes[i] = Some(self.rcpt_refused(&stage, &reply)),
                Ok(_) => {}
                Err(e) => return Err((outcomes, e)),
            }
        }
        if !data || outcomes.iter().all(Option::is_some) {
            return Ok((outcomes, None));
        }
        match self.command("DATA\r\n", "DATA", self.timeouts.data_init).await {
            Ok(reply) => Ok((outcomes, Some(reply))),
            Err(e) => Err((outcomes, e)),
        }
    }

    fn mail_refused(&self, reply: &Reply) -> RcptOutcome {
        reply.outcome(format!("MAIL FROM to {}: {reply}", self.peer), &self.host)
    }

    fn rcpt_refused(&self, stage: &str, reply: &Reply) -> RcptOutcome {
        reply.outcome(format!("{stage} to {}: {reply}", self.peer), &self.host)
    }

    /// Sends the body, dot-stuffed, and reads the final reply (RFC 5321 4.5.3.2.5-6 timeouts).
    async fn data(&mut self, body: Body) -> Result<Reply, ClientError> {
        let mut stuffer = DotStuffer::default();
        let mut file = match body {
            Body::Whole(bytes) => {
                // A small message: stuffed and sent with one write, the end-of-data dot included.
                let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 16 + 8);
                stuffer.push(&bytes, &mut out);
                stuffer.finish(&mut out);
                self.write("DATA", &out, self.timeouts.data_block).await?;
                return self.read_reply("end of DATA", self.timeouts.data_done).await;
            }
            Body::Stream(reader) => reader,
        };
        let mut input = vec![0u8; CHUNK];
        let mut out = Vec::with_capacity(CHUNK + CHUNK / 8 + 8);
        loop {
            let n;
            (file, input, n) = read_block(file, input).await?;
            if n == 0 {
                break;
            }
            stuffer.push(&input[..n], &mut out);
            if out.len() >= CHUNK {
                self.write("DATA", &out, self.timeouts.data_block).await?;
                out.clear();
            }
        }
        stuffer.finish(&mut out);
        self.write("DATA", &out, self.timeouts.data_block).await?;
        self.read_reply("end of DATA", self.timeouts.data_done).await
    }

    /// Sends the body as stored with `BDAT size LAST` (RFC 3030 2) and reads the final reply. One
    /// chunk: the size is known, and a body that turns out shorter than it breaks the connection
    /// (the server then drops the partial message) rather than going out cut short.
    async fn bdat(&mut self, body: Body, size: u64) -> Result<Reply, ClientError> {
        let mut out = format!("BDAT {size} LAST\r\n").into_bytes();
        let mut file = match body {
            Body::Whole(bytes) => {
                out.extend_from_slice(&bytes);
                self.write("BDAT", &out, self.timeouts.data_block).await?;
                return self.read_reply("BDAT LAST", self.timeouts.data_done).await;
            }
            Body::Stream(reader) => reader,
        };
        self.write("BDAT", &out, self.timeouts.data_block).await?;
        let (mut input, mut sent) = (vec![0u8; CHUNK], 0u64);
        loop {
            let n;
            (file, input, n) = read_block(file, input).await?;
            if n == 0 {
                break;
            }
            sent += n as u64;
            self.write("BDAT", &input[..n], self.timeouts.data_block).await?;
        }
        if sent != size {
            return Err(ClientError::Body(format!("the body has {sent} octets, not the {size} announced")));
        }
        self.read_reply("BDAT LAST", self.timeouts.data_done).await
    }

    async fn finish_empty_data(&mut self) -> Result<(), ClientError> {
        self.command(".\r\n", "end of DATA", self.timeouts.data_done).await.map(|_| ())
    }

    /// After a transaction that did not deliver, RSET right away so the connection is clean
    /// (RFC 5321 4.1.1.5); returns whether the connection is still usable.
    async fn reset_if_failed(&mut self, outcomes: &[Option<RcptOutcome>]) -> bool {
        if outcomes.iter().any(|o| matches!(o, Some(RcptOutcome::Delivered(_)))) {
            return true;
        }
        match self.command("RSET\r\n", "RSET", self.timeouts.command).await {
            Ok(reply) if reply.is_positive() => {
                self.used = false;
                true
            }
            _ => false,
        }
    }

    /// Says goodbye (RFC 5321 4.1.1.10); errors do not matter any more.
    pub async fn quit(mut self) {
        let _ = self.command("QUIT\r\n", "QUIT", self.timeouts.command).await;
        let _ = tokio::time::timeout(self.timeouts.command, self.io.get_mut().shutdown()).await;
    }

    /// The connection broke mid-transaction: every recipient without a reply yet is deferred.
    fn broken(&self, outcomes: Vec<Option<RcptOutcome>>, error: &ClientError) -> Transaction {
        let temp = RcptOutcome::TempFail(error.temp_detail(Some(&self.host)));
        Transaction {
            outcomes: outcomes.into_iter().map(|o| o.unwrap_or_else(|| temp.clone())).collect(),
            reusable: false,
            stale: false,
        }
    }

    fn all(&self, n: usize, outcome: RcptOutcome, reusable: bool) -> Transaction {
        Transaction { outcomes: vec![outcome; n], reusable, stale: false }
    }

    fn no_reply(&self) -> RcptOutcome {
        RcptOutcome::TempFail(Detail {
            status: "4.4.2".into(),
            text: format!("no reply from {} for this recipient", self.peer),
            remote_mta: Some(self.host.clone()),
            diagnostic: None,
            session: true,
        })
    }

    fn reply_error(&self, stage: &str, reply: Reply) -> ClientError {
        ClientError::Reply { stage: stage.to_string(), peer: self.peer.clone(), reply }
    }

    fn network(&self, stage: &str, reason: String) -> ClientError {
        ClientError::Network { stage: stage.to_string(), peer: self.peer.clone(), reason }
    }

    async fn command(&mut self, line: &str, stage: &str, wait: Duration) -> Result<Reply, ClientError> {
        self.write(stage, line.as_bytes(), self.timeouts.command).await?;
        self.read_reply(stage, wait).await
    }

    async fn write(&mut self, stage: &str, data: &[u8], wait: Duration) -> Result<(), ClientError> {
        let stream = self.io.get_mut();
        let io = async {
            stream.write_all(data).await?;
            stream.flush().await
        };
        match tokio::time::timeout(wait, io).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.network(stage, io_reason(&e))),
            Err(_) => Err(self.network(stage, format!("timed out after {}s", wait.as_secs_f32()))),
        }
    }

    /// Reads one (possibly multiline) reply within `wait`.
    async fn read_reply(&mut self, stage: &str, wait: Duration) -> Result<Reply, ClientError> {
        match tokio::time::timeout(wait, read_reply(&mut self.io)).await {
            Ok(Ok(reply)) => {
                self.replies += 1;
                Ok(reply)
            }
            Ok(Err(reason)) => Err(self.network(stage, reason)),
            Err(_) => Err(self.network(stage, format!("timed out after {}s", wait.as_secs_f32()))),
        }
    }
}

/// MAIL, RCPT and DATA results: per-recipient refusals so far and DATA's reply; on error, the
/// refusals gathered before the connection broke.
type EnvelopeResult = Result<(Vec<Option<RcptOutcome>>, Option<Reply>), (Vec<Option<RcptOutcome>>, ClientError)>;

/// Reads one (possibly multiline) reply; public for the `reply_parser` fuzz target only.
#[doc(hidden)]
pub async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(io: &mut R) -> Result<Reply, String> {
    let mut lines = Vec::new();
    let mut buf = Vec::with_capacity(128);
    loop {
        buf.clear();
        let n = (&mut *io).take(MAX_REPLY_LINE).read_until(b'\n', &mut buf).await.map_err(|e| io_reason(&e))?;
        if n == 0 {
            return Err("connection closed by the server".into());
        }
        let line = String::from_utf8_lossy(&buf);
        let (code, last, text) = parse_reply_line(&line)?;
        if lines.len() < MAX_REPLY_LINES {
            lines.push(text.to_string());
        }
        if last {
            return Ok(Reply { code, lines });
        }
    }
}

/// The next block of a streamed body, read on a blocking thread: the store's reader blocks (a
/// file, a journal segment) and must never run on the runtime's workers.
async fn read_block(
    mut file: std::io::Take<Box<dyn std::io::Read + Send>>,
    mut input: Vec<u8>,
) -> Result<(std::io::Take<Box<dyn std::io::Read + Send>>, Vec<u8>, usize), ClientError> {
    let read = tokio::task::spawn_blocking(move || {
        let n = std::io::Read::read(&mut file, &mut input);
        (file, input, n)
    })
    .await;
    let (file, input, n) = read.map_err(|e| ClientError::Body(e.to_string()))?;
    let n = n.map_err(|e| ClientError::Body(e.to_string()))?;
    Ok((file, input, n))
}

/// Bodies up to this size are read whole, with the open, in one trip to a blocking thread;
/// larger ones are streamed from the file in `CHUNK`s.
const WHOLE_BODY: u64 = 1024 * 1024;

/// A message body ready to send.
enum Body {
    Whole(Vec<u8>),
    /// A large body, read on a blocking thread as it is sent.
    Stream(std::io::Take<Box<dyn std::io::Read + Send>>),
}

impl Body {
    /// Opens the body through the queue; a small one is read at once (one blocking call, instead
    /// of a round trip to a blocking thread per chunk: most of a small message's cost).
    async fn open(queue: &Arc<dyn Queue>, id: &str) -> Result<(Body, u64), ClientError> {
        let (queue, owned_id) = (Arc::clone(queue), id.to_string());
        let opened = tokio::task::spawn_blocking(move || -> Result<(Body, u64), String> {
            let body = queue.open_body(&owned_id).map_err(|e| e.to_string())?;
            let size = body.len();
            if size > WHOLE_BODY {
                return Ok((Body::Stream(body.into_reader()), size));
            }
            let bytes = body.read_up_to(size).map_err(|e| format!("{owned_id}: {e}"))?;
            let size = bytes.len() as u64;
            Ok((Body::Whole(bytes), size))
        })
        .await;
        match opened {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(e)) => Err(ClientError::Body(e)),
            Err(e) => Err(ClientError::Body(format!("{id}: {e}"))),
        }
    }
}

/// Connects to `addr`, from the source address of its family when one is set.
async fn connect(addr: std::net::SocketAddr, source: &SourceAddress) -> Result<TcpStream, String> {
    let Some(local) = source.for_peer(addr.ip()) else {
        return TcpStream::connect(addr).await.map_err(|e| io_reason(&e));
    };
    let socket = if local.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
    let socket = socket.map_err(|e| io_reason(&e))?;
    socket
        .bind(std::net::SocketAddr::new(local, 0))
        .map_err(|e| format!("cannot bind delivery.source_address {local}: {}", io_reason(&e)))?;
    socket.connect(addr).await.map_err(|e| format!("{} (from {local})", io_reason(&e)))
}

/// Would the certificate of an opportunistic session have passed verification for `host`?
fn would_verify(verifier: &rustls::client::WebPkiServerVerifier, tls: &TlsStream<TcpStream>, host: &str) -> bool {
    let Some((end_entity, intermediates)) = tls.get_ref().1.peer_certificates().and_then(|c| c.split_first()) else {
        return false;
    };
    let Ok(name) = server_name(host) else { return false };
    verifier.verify_server_cert(end_entity, intermediates, &name, &[], UnixTime::now()).is_ok()
}

/// The TLS server name: the MX host name (or the route's IP literal).
fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?} is not a TLS server name: {e}"))
}

/// `Connection refused`, not `Connection refused (os error 111)`.
fn io_reason(error: &io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines() {
        assert_eq!(parse_reply_line("250 ok\r\n"), Ok((250, true, "ok")));
        assert_eq!(parse_reply_line("250-PIPELINING\r\n"), Ok((250, false, "PIPELINING")));
        assert_eq!(parse_reply_line("354\r\n"), Ok((354, true, "")));
        assert!(parse_reply_line("hello\r\n").is_err());
        assert!(parse_reply_line("250x\r\n").is_err());
        assert!(parse_reply_line("650 no\r\n").is_err());
    }

    #[tokio::test]
    async fn multiline_reply_and_enhanced_code() {
        let wire: &[u8] =
            b"550-5.1.1 The email account does not exist.\r\n550-5.1.1 Please check.\r\n550 5.1.1 Bye\r\n";
        let mut reader = BufReader::new(wire);
        let reply = read_reply(&mut reader).await.unwrap();
        assert_eq!(reply.code, 550);
        assert_eq!(reply.lines.len(), 3);
        assert_eq!(reply.enhanced(), Some("5.1.1"));
        assert_eq!(reply.to_string(), "550 5.1.1 The email account does not exist. Please check. Bye");
        let plain = Reply { code: 451, lines: vec!["try later".into()] };
        assert_eq!(plain.enhanced(), None);
        assert_eq!(plain.status(), "4.0.0");
        // An enhanced code of another class than the reply is not taken.
        let odd = Reply { code: 250, lines: vec!["5.1.1 odd".into()] };
        assert_eq!(odd.enhanced(), None);
        let closed: &[u8] = b"250-first\r\n";
        assert!(read_reply(&mut BufReader::new(closed)).await.is_err());
    }

    #[test]
    fn ehlo_capabilities() {
        let reply = Reply {
            code: 250,
            lines: vec![
                "mx.example.test greets you".into(),
                "PIPELINING".into(),
                "SIZE 10240000".into(),
                "starttls".into(),
                "8BITMIME".into(),
                "DSN".into(),
                "SMTPUTF8".into(),
                "ENHANCEDSTATUSCODES".into(),
            ],
        };
        let caps = Capabilities::parse(&reply);
        assert!(caps.pipelining && caps.starttls && caps.eightbitmime && caps.dsn && caps.smtputf8);
        assert_eq!(caps.size, Some(10_240_000));
        let bare = Capabilities::parse(&Reply { code: 250, lines: vec!["hi".into(), "SIZE".into()] });
        assert!(bare.size_offered && bare.size.is_none() && !bare.pipelining);
        let unlimited = Capabilities::parse(&Reply { code: 250, lines: vec!["hi".into(), "SIZE 0".into()] });
        assert_eq!(unlimited.size, None);
        assert!(!caps.chunking && !caps.binarymime);
        let chunking =
            Capabilities::parse(&Reply { code: 250, lines: vec!["hi".into(), "chunking".into(), "BINARYMIME".into()] });
        assert!(chunking.chunking && chunking.binarymime);
    }

    #[test]
    fn requiretls_keyword_and_expiry_status() {
        let caps = Capabilities::parse(&Reply { code: 250, lines: vec!["hi".into(), "requiretls".into()] });
        assert!(caps.requiretls);
        assert!(!Capabilities::parse(&Reply { code: 250, lines: vec!["hi".into()] }).requiretls);
        let text = format!("EHLO to mx[192.0.2.1]: {REQUIRETLS_MARK}: the server does not offer REQUIRETLS");
        assert_eq!(requiretls_expiry_status(true, &text), Some("5.7.10"));
        // A message without the parameter, or kept back by something else, expires as usual.
        assert_eq!(requiretls_expiry_status(false, &text), None);
        assert_eq!(requiretls_expiry_status(true, "connect to 192.0.2.1:25: Connection refused"), None);
    }

    fn stuff(chunks: &[&[u8]]) -> Vec<u8> {
        let mut stuffer = DotStuffer::default();
        let mut out = Vec::new();
        for chunk in chunks {
            stuffer.push(chunk, &mut out);
        }
        stuffer.finish(&mut out);
        out
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(stuff(&[b"a\r\n.b\r\n..c\r\n"]), b"a\r\n..b\r\n...c\r\n.\r\n");
        assert_eq!(stuff(&[b".start\r\nx.y\r\n"]), b"..start\r\nx.y\r\n.\r\n");
        // A dot at a chunk boundary, and a body without a final CRLF.
        assert_eq!(stuff(&[b"a\r\n", b".", b"b"]), b"a\r\n..b\r\n.\r\n");
        assert_eq!(stuff(&[b"a\r", b"\n"]), b"a\r\n.\r\n");
        assert_eq!(stuff(&[b"x", b"\r\n.\r\n"]), b"x\r\n..\r\n.\r\n");
        assert_eq!(stuff(&[]), b".\r\n");
        // Whole lines at a time: several dots, empty lines, a chunk ending right after LF.
        assert_eq!(stuff(&[b".\r\n\r\n.a\r\n", b".b\r\n"]), b"..\r\n\r\n..a\r\n..b\r\n.\r\n");
        assert_eq!(stuff(&[b"x.\r\n", b"y", b".z\r\n"]), b"x.\r\ny.z\r\n.\r\n");
    }

    #[test]
    fn xtext() {
        assert_eq!(xtext_encode("abc@example.test"), "abc@example.test");
        assert_eq!(xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(xtext_encode("é"), "+C3+A9");
    }

    #[test]
    fn os_error_suffix_is_dropped() {
        let e = io::Error::from_raw_os_error(111);
        assert_eq!(io_reason(&e), "Connection refused");
    }
}

//! The DATA reader (RFC 5321 4.1.1.4, 4.5.2): a byte-at-a-time state machine that removes dot-stuffing,
//! finds the end of data, and judges the message without ever holding it whole.
//!
//! Data ends only at `<CRLF>.<CRLF>`. A CR not followed by LF, or an LF not preceded by CR, is a
//! "bare" line ending: it never starts a new line here, so sequences like `\n.\n` or `\r\n.\r` cannot
//! end the data early, and a message containing one is refused once the real end is reached (as
//! Postfix's smtpd_forbid_bare_newline does). Receivers downstream that treat a bare LF as a line end
//! therefore never see what an attacker hoped to smuggle (SMTP smuggling, CVE-2023-51766 and kin).
//!
//! The same reader judges BDAT chunks (RFC 3030), made with [`DataReader::chunked`]: their octets
//! are counted by the client, so there is no dot-stuffing and no end marker, but the same limits,
//! the same bare CR/LF rule and the same Received count apply. With BODY=BINARYMIME only the header
//! section is lines; the body after it is octets, taken as they come.

/// Why a message read to its end is refused; the first problem found wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataProblem {
    /// A bare CR or LF somewhere in the data.
    BareNewline,
    /// More octets than the configured maximum message size.
    TooBig,
    /// A text line longer than the configured maximum line length.
    LineTooLong,
    /// More Received headers than allowed: a mail loop (RFC 5321 6.3).
    TooManyReceived,
    /// A header section larger than `smtp.max_header_size` (like Postfix's header_size_limit).
    HeaderTooBig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (after CRLF, or at the start of data).
    LineStart,
    /// A dot at the start of a line.
    Dot,
    /// `.` then CR at the start of a line: LF now ends the data.
    DotCr,
    /// Inside a line.
    Text,
    /// CR inside a line: LF now ends the line.
    Cr,
}

/// Tracks the header section of the (unstuffed) message to count Received headers.
#[derive(Debug, Clone, Default)]
struct HeaderScan {
    /// Past the empty line that ends the header section.
    done: bool,
    /// The first octets of the current line, enough to recognise `Received:`.
    prefix: Vec<u8>,
    /// Received headers seen so far.
    received: usize,
    /// Octets of the header section so far, with CRLFs.
    size: u64,
    /// The current header line, up to [`MAX_MESSAGE_ID`] octets, while it may be (or continue)
    /// the first Message-ID field.
    line: Vec<u8>,
    /// The first Message-ID field's value so far (RFC 5322 3.6.4), for the log's accept line.
    message_id: Option<Vec<u8>>,
    /// The line before this one was the Message-ID field, so a folded line continues it.
    in_message_id: bool,
}

const RECEIVED: &[u8] = b"received:";
const MESSAGE_ID: &[u8] = b"message-id:";
/// Longer Message-IDs are cut: the log line must stay bounded whatever a sender writes.
const MAX_MESSAGE_ID: usize = 256;

impl HeaderScan {
    fn text(&mut self, byte: u8) {
        if !self.done {
            self.size += 1;
        }
        if !self.done && self.line.len() < MAX_MESSAGE_ID + MESSAGE_ID.len() {
            self.line.push(byte);
        }
        if !self.done && self.prefix.len() < RECEIVED.len() {
            self.prefix.push(byte.to_ascii_lowercase());
            if self.prefix == RECEIVED {
                self.received += 1;
            }
        }
    }

    fn end_of_line(&mut self) {
        if !self.done {
            self.size += 2;
        }
        if self.prefix.is_empty() {
            self.done = true;
        }
        self.message_id_line();
        self.prefix.clear();
        self.line.clear();
    }

    /// Takes the first Message-ID field, with its folded continuation lines.
    fn message_id_line(&mut self) {
        let folded = matches!(self.line.first(), Some(b' ' | b'\t'));
        if self.in_message_id && folded {
            if let Some(id) = self.message_id.as_mut() {
                id.extend_from_slice(&self.line);
                id.truncate(MAX_MESSAGE_ID);
            }
            return;
        }
        self.in_message_id = false;
        let is_field =
            self.line.len() >= MESSAGE_ID.len() && self.line[..MESSAGE_ID.len()].eq_ignore_ascii_case(MESSAGE_ID);
        if !self.done && self.message_id.is_none() && is_field {
            let mut id = self.line[MESSAGE_ID.len()..].to_vec();
            id.truncate(MAX_MESSAGE_ID);
            self.message_id = Some(id);
            self.in_message_id = true;
        }
    }
}

/// How the octets of a message arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// After DATA: dot-stuffed lines up to `<CRLF>.<CRLF>`.
    Dotted,
    /// In BDAT chunks (RFC 3030 2): taken verbatim; the client says where the message ends.
    /// `binary`: BODY=BINARYMIME (RFC 3030 3), whose body is not made of lines.
    Counted { binary: bool },
}

/// Reads one message's data; feed it bytes until it reports the end.
#[derive(Debug, Clone)]
pub struct DataReader {
    framing: Framing,
    state: State,
    /// Octets of the current line so far, without CRLF.
    line_length: usize,
    /// Octets of unstuffed data so far, with CRLFs.
    size: u64,
    max_size: u64,
    max_line: usize,
    max_received: usize,
    max_header: u64,
    problem: Option<DataProblem>,
    headers: HeaderScan,
}

impl DataReader {
    /// A reader for one message, with the limits from `[smtp]`.
    pub fn new(max_size: u64, max_line: usize, max_received: usize) -> DataReader {
        DataReader {
            framing: Framing::Dotted,
            state: State::LineStart,
            line_length: 0,
            size: 0,
            max_size,
            max_line,
            max_received,
            max_header: u64::MAX,
            problem: None,
            headers: HeaderScan::default(),
        }
    }

    /// Consumes `input`, appending the unstuffed data to `out` (only while the message is still
    /// acceptable: after a problem nothing more is produced, so memory and disk stay bounded).
    /// Returns `Some(n)` when the end of data was reached after `n` octets of `input`; the octets
    /// after that are the next commands.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        for (i, &byte) in input.iter().enumerate() {
            if self.step(byte, out) {
                return Some(i + 1);
            }
        }
        None
    }

    /// A reader for a message sent in BDAT chunks, with the limits from `[smtp]`; `binary` for
    /// BODY=BINARYMIME. [`DataReader::feed`] never reports an end: call [`DataReader::finish`] after
    /// the last chunk.
    pub fn chunked(max_size: u64, max_line: usize, max_received: usize, binary: bool) -> DataReader {
        DataReader { framing: Framing::Counted { binary }, ..DataReader::new(max_size, max_line, max_received) }
    }

    /// The last chunk has arrived: a CR at the very end of the message is a bare one (in a text
    /// part; a binary body may end in anything).
    pub fn finish(&mut self) {
        if self.state == State::Cr && !self.in_binary_body() {
            self.flag(DataProblem::BareNewline);
        }
    }

    /// Past the header section of a BINARYMIME message, where octets are not lines.
    fn in_binary_body(&self) -> bool {
        self.framing == Framing::Counted { binary: true } && self.headers.done
    }

    /// Bounds the header section to `max` octets (`smtp.max_header_size`).
    pub fn with_max_header(mut self, max: u64) -> DataReader {
        self.max_header = max;
        self
    }

    /// Octets of unstuffed data seen (counting CRLFs, not the final `.CRLF`).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Why the message must be refused, if it must; meaningful once the end was reached.
    pub fn problem(&self) -> Option<DataProblem> {
        self.problem
    }

    /// Received headers counted in the header section.
    pub fn received_headers(&self) -> usize {
        self.headers.received
    }

    /// The first Message-ID field's value, trimmed (lossy UTF-8; at most 256 octets).
    pub fn message_id(&self) -> Option<String> {
        let id = self.headers.message_id.as_ref()?;
        Some(String::from_utf8_lossy(id).trim().to_string())
    }

    /// Processes one octet; true at the end of data.
    fn step(&mut self, byte: u8, out: &mut Vec<u8>) -> bool {
        if self.framing != Framing::Dotted {
            self.step_counted(byte, out);
            return false;
        }
        match (self.state, byte) {
            (State::LineStart, b'.') => self.state = State::Dot,
            (State::DotCr, b'\n') => return true,
            // RFC 5321 4.5.2: a leading dot followed by more text is removed.
            (State::Dot, b'\r') => self.state = State::DotCr,
            (State::Dot, _) => {
                self.state = State::Text;
                self.step(byte, out);
            }
            (State::DotCr, _) => {
                // `.` CR and something other than LF: a bare CR in a line that began with a dot.
                self.flag(DataProblem::BareNewline);
                self.state = State::Text;
                self.step(byte, out);
            }
            _ => self.step_line(byte, out),
        }
        false
    }

    /// One octet of a BDAT chunk: lines end at CRLF only, as after DATA, but a leading dot is text
    /// and nothing ends the message.
    fn step_counted(&mut self, byte: u8, out: &mut Vec<u8>) {
        if self.in_binary_body() {
            self.state = State::Text;
            self.emit(&[byte], out);
            return;
        }
        self.step_line(byte, out);
    }

    /// One octet within lines, after DATA's dot handling or of a chunk: lines end at CRLF only.
    fn step_line(&mut self, byte: u8, out: &mut Vec<u8>) {
        match (self.state, byte) {
            (State::Cr, b'\n') => self.end_line(out),
            (State::Cr, _) => {
                self.flag(DataProblem::BareNewline);
                self.state = State::Text;
                self.step_line(byte, out);
            }
            (_, b'\r') => self.state = State::Cr,
            (_, b'\n') => {
                // A bare LF: not a line end, so the next octet does not start a line.
                self.flag(DataProblem::BareNewline);
                self.state = State::Text;
            }
            _ => {
                self.state = State::Text;
                self.text_byte(byte, out);
            }
        }
    }

    fn text_byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        self.line_length += 1;
        if self.line_length > self.max_line {
            self.flag(DataProblem::LineTooLong);
        }
        self.headers.text(byte);
        if self.headers.size > self.max_header {
            self.flag(DataProblem::HeaderTooBig);
        }
        self.emit(&[byte], out);
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        self.state = State::LineStart;
        self.line_length = 0;
        self.headers.end_of_line();
        if self.headers.received > self.max_received {
            self.flag(DataProblem::TooManyReceived);
        }
        self.emit(b"\r\n", out);
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.size += bytes.len() as u64;
        if self.size > self.max_size {
            self.flag(DataProblem::TooBig);
        }
        if self.problem.is_none() {
            out.extend_from_slice(bytes);
        }
    }

    fn flag(&mut self, problem: DataProblem) {
        if self.problem.is_none() {
            self.problem = Some(problem);
        }
    }
}

#[cfg(test)]
mod tests;

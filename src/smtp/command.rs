//! Parsing one SMTP command line (without its CRLF) into a typed [`Command`] (RFC 5321 4.1), with the
//! MAIL and RCPT parameters of SIZE (RFC 1870), BODY (RFC 6152, RFC 3030 BINARYMIME), SMTPUTF8
//! (RFC 6531) and DSN (RFC 3461: RET, ENVID, NOTIFY, ORCPT), and BDAT (RFC 3030).

use super::reply::Reply;
use crate::spool::{BodyType, DsnNotify, DsnRet};
use crate::xtext::xtext_decode;

/// The longest command line, CRLF included (RFC 5321 4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;
/// RFC 3461 section 5 (and RFC 1870 for SIZE) let MAIL and RCPT grow by up to 500 octets for the
/// DSN parameters we advertise; no line may be longer than this.
pub const MAX_PARAMETER_LINE: usize = MAX_COMMAND_LINE + 500;

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail(MailFrom),
    Rcpt(RcptTo),
    Data,
    /// `BDAT chunk-size [LAST]` (RFC 3030 2): `size` octets of message data follow the line.
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    /// The argument is ignored: we answer 252 whatever it is (RFC 5321 3.5.3).
    Vrfy(String),
    Help,
    StartTls,
    /// RFC 1985: start a queue run for a node.
    Etrn(EtrnNode),
    /// A verb from RFC 5321 or a common extension that we do not implement (EXPN, TURN, AUTH, ...).
    NotImplemented(String),
}

/// `MAIL FROM:<reverse-path> [parameters]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailFrom {
    /// The reverse path without angle brackets or source route; empty for the null sender `<>`.
    pub address: String,
    /// RFC 1870 SIZE: the client's estimate of the message size.
    pub size: Option<u64>,
    pub body: BodyType,
    /// RFC 6531: the message may carry UTF-8 addresses and headers.
    pub smtputf8: bool,
    pub ret: Option<DsnRet>,
    /// RFC 3461 ENVID, xtext-decoded.
    pub envid: Option<String>,
    /// RFC 8689 REQUIRETLS: the message must travel over verified TLS all the way.
    pub requiretls: bool,
}

/// `RCPT TO:<forward-path> [parameters]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptTo {
    /// The forward path without angle brackets or source route.
    pub address: String,
    pub notify: Option<Vec<DsnNotify>>,
    /// RFC 3461 ORCPT exactly as given (`addr-type;xtext`), checked to decode; it is passed on as is.
    pub orcpt: Option<String>,
}

/// Why a command line could not be parsed; each maps to one reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("line too long")]
    TooLong,
    #[error("command unrecognized: {0}")]
    Unknown(String),
    #[error("{0}")]
    Syntax(String),
    /// A parameter we did not advertise or cannot honour (RFC 5321 4.1.1.11: 555).
    #[error("{0}")]
    Parameter(String),
    /// A BDAT line with a chunk size but something else wrong: its `size` octets follow all the same
    /// and must be read (and dropped) before the reply, or they would be taken for commands.
    #[error("{text}")]
    BadChunk { size: u64, text: String },
    /// A BDAT line without a usable chunk size: where its data ends cannot be known.
    #[error("BDAT without a chunk size")]
    NoChunkSize,
}

impl CommandError {
    /// The reply the client gets for this error.
    pub fn reply(&self) -> Reply {
        match self {
            CommandError::TooLong => Reply::new(500, "5.5.2", "line too long"),
            CommandError::Unknown(verb) => Reply::new(500, "5.5.2", format!("command unrecognized: {verb}")),
            CommandError::Syntax(text) => Reply::new(501, "5.5.4", text.clone()),
            CommandError::Parameter(text) => Reply::new(555, "5.5.4", text.clone()),
            CommandError::BadChunk { text, .. } => Reply::new(501, "5.5.4", text.clone()),
            // RFC 5321 3.8: a server closes only with 421. Reading on would take the chunk, whatever
            // it holds, for commands.
            CommandError::NoChunkSize => Reply::new(
                421,
                "4.5.2",
                "Syntax: BDAT chunk-size [LAST]; the data after it cannot be told from commands, closing",
            ),
        }
    }
}

fn syntax(text: impl Into<String>) -> CommandError {
    CommandError::Syntax(text.into())
}

/// Parses one command line, `line` without its terminating CRLF (or LF).
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    let verb_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let verb = String::from_utf8_lossy(&line[..verb_end]).to_ascii_uppercase();
    if verb == "BDAT" {
        // Before the length and character checks: any refusal must still know the chunk's size.
        return parse_bdat(&line[verb_end..]);
    }
    let limit = if verb == "MAIL" || verb == "RCPT" { MAX_PARAMETER_LINE } else { MAX_COMMAND_LINE };
    if line.len() + 2 > limit {
        return Err(CommandError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|_| syntax("invalid UTF-8 in command"))?;
    if text.chars().any(|c| c.is_control() && c != '\t') {
        return Err(syntax("control character in command"));
    }
    let arg = text.get(verb_end..).unwrap_or("").trim_start_matches(' ').trim_end();
    match verb.as_str() {
        "EHLO" => Ok(Command::Ehlo(helo_name(arg, "EHLO")?)),
        "HELO" => Ok(Command::Helo(helo_name(arg, "HELO")?)),
        "MAIL" => parse_mail(arg).map(Command::Mail),
        "RCPT" => parse_rcpt(arg).map(Command::Rcpt),
        "DATA" => no_argument(arg, Command::Data),
        "RSET" => no_argument(arg, Command::Rset),
        "QUIT" => no_argument(arg, Command::Quit),
        "STARTTLS" => no_argument(arg, Command::StartTls),
        // RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored; HELP may name a topic.
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "VRFY" if arg.is_empty() => Err(syntax("VRFY needs an address")),
        "VRFY" => Ok(Command::Vrfy(arg.to_string())),
        "ETRN" => parse_etrn(arg).map(Command::Etrn),
        "EXPN" | "TURN" | "ATRN" | "AUTH" | "SEND" | "SOML" | "SAML" => Ok(Command::NotImplemented(verb)),
        _ => {
            let shown: String = verb.chars().filter(|c| c.is_ascii_graphic()).take(20).collect();
            Err(CommandError::Unknown(shown))
        }
    }
}

/// `BDAT SP chunk-size [SP "LAST"]` (RFC 3030 2), `chunk-size = 1*DIGIT`; `arg` is what follows
/// the verb. A usable size makes every other problem a [`CommandError::BadChunk`].
fn parse_bdat(arg: &[u8]) -> Result<Command, CommandError> {
    let mut words = arg.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let size = words
        .next()
        .filter(|w| w.iter().all(u8::is_ascii_digit))
        .and_then(|w| std::str::from_utf8(w).ok()?.parse::<u64>().ok())
        .ok_or(CommandError::NoChunkSize)?;
    let bad = |text: &str| CommandError::BadChunk { size, text: text.to_string() };
    let last = match words.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return Err(bad("Syntax: BDAT chunk-size [LAST]")),
    };
    if words.next().is_some() || arg.iter().any(|b| b.is_ascii_control()) {
        return Err(bad("Syntax: BDAT chunk-size [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

/// What `ETRN` asks for (RFC 1985 5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtrnNode {
    /// `ETRN example.test`: that domain, lower case.
    Domain(String),
    /// `ETRN @example.test`: the domain and its subdomains, lower case.
    Subdomains(String),
    /// `ETRN #name`: a queue name, which this server does not have.
    Queue(String),
}

/// `ETRN node`: one argument, `domain`, `@domain` or `#queue`.
fn parse_etrn(arg: &str) -> Result<EtrnNode, CommandError> {
    if arg.is_empty() || arg.contains(' ') {
        return Err(syntax("ETRN needs one argument: a domain, @domain or #queue"));
    }
    if let Some(queue) = arg.strip_prefix('#') {
        return Ok(EtrnNode::Queue(queue.to_string()));
    }
    let (subdomains, domain) = match arg.strip_prefix('@') {
        Some(domain) => (true, domain),
        None => (false, arg),
    };
    if !crate::config::is_domain_name(domain) {
        return Err(syntax(format!("ETRN: {domain:?} is not a domain name")));
    }
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    Ok(if subdomains { EtrnNode::Subdomains(domain) } else { EtrnNode::Domain(domain) })
}

fn no_argument(arg: &str, command: Command) -> Result<Command, CommandError> {
    if arg.is_empty() { Ok(command) } else { Err(syntax(format!("{command:?} takes no argument").to_uppercase())) }
}

/// The EHLO/HELO argument goes into our Received header, so only a domain or address literal made of
/// visible ASCII is accepted (RFC 5321 4.1.1.1), without the characters that would break a comment.
fn helo_name(arg: &str, verb: &str) -> Result<String, CommandError> {
    if arg.is_empty() {
        return Err(syntax(format!("{verb} needs a host name")));
    }
    let ok = arg.len() <= 255 && arg.bytes().all(|b| b.is_ascii_graphic() && !b"()\\<>\";".contains(&b));
    if !ok {
        return Err(syntax(format!("{verb}: invalid host name")));
    }
    Ok(arg.to_string())
}

/// Strips `FROM:` or `TO:` (case-insensitive, spaces allowed after the colon as many clients send them).
fn after_keyword<'a>(arg: &'a str, keyword: &str) -> Result<&'a str, CommandError> {
    let head = arg.get(..keyword.len()).filter(|h| h.eq_ignore_ascii_case(keyword));
    match head {
        Some(_) => Ok(arg[keyword.len()..].trim_start_matches(' ')),
        None => Err(syntax(format!("syntax: expected {keyword}<address>"))),
    }
}

fn parse_mail(arg: &str) -> Result<MailFrom, CommandError> {
    let rest = after_keyword(arg, "FROM:")?;
    let (address, params) = parse_path(rest)?;
    let mut mail = MailFrom { address, ..MailFrom::default() };
    let mut seen = Vec::new();
    for (key, value) in parameters(params)? {
        if seen.contains(&key) {
            return Err(syntax(format!("duplicate parameter {key}")));
        }
        match (key.as_str(), value) {
            ("SIZE", Some(v)) => {
                mail.size = Some(v.parse().map_err(|_| syntax("SIZE needs a number of octets"))?);
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => mail.body = BodyType::SevenBit,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => mail.body = BodyType::EightBitMime,
            // RFC 3030 3: binary content, which only BDAT can carry.
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("BINARYMIME") => mail.body = BodyType::BinaryMime,
            ("BODY", _) => return Err(CommandError::Parameter("BODY must be 7BIT, 8BITMIME or BINARYMIME".into())),
            ("SMTPUTF8", None) => mail.smtputf8 = true,
            // RFC 8689 2: a keyword without a value; whether the session may use it (TLS) is the
            // session's check.
            ("REQUIRETLS", None) => mail.requiretls = true,
            ("RET", Some(v)) if v.eq_ignore_ascii_case("FULL") => mail.ret = Some(DsnRet::Full),
            ("RET", Some(v)) if v.eq_ignore_ascii_case("HDRS") => mail.ret = Some(DsnRet::Hdrs),
            ("RET", _) => return Err(syntax("RET must be FULL or HDRS")),
            // RFC 3461 4.4: at most 100 characters, xtext.
            ("ENVID", Some(v)) if v.len() <= 100 => {
                mail.envid = Some(xtext_decode(v).ok_or_else(|| syntax("ENVID is not valid xtext"))?);
            }
            ("ENVID", _) => return Err(syntax("ENVID must be 1 to 100 characters of xtext")),
            _ => return Err(CommandError::Parameter(format!("unsupported MAIL parameter {key}"))),
        }
        seen.push(key);
    }
    Ok(mail)
}

fn parse_rcpt(arg: &str) -> Result<RcptTo, CommandError> {
    let rest = after_keyword(arg, "TO:")?;
    let (address, params) = parse_path(rest)?;
    if address.is_empty() {
        return Err(syntax("the recipient address must not be empty"));
    }
    let mut rcpt = RcptTo { address, ..RcptTo::default() };
    let mut seen = Vec::new();
    for (key, value) in parameters(params)? {
        if seen.contains(&key) {
            return Err(syntax(format!("duplicate parameter {key}")));
        }
        match (key.as_str(), value) {
            ("NOTIFY", Some(v)) => rcpt.notify = Some(parse_notify(v)?),
            ("ORCPT", Some(v)) => {
                check_orcpt(v)?;
                rcpt.orcpt = Some(v.to_string());
            }
            _ => return Err(CommandError::Parameter(format!("unsupported RCPT parameter {key}"))),
        }
        seen.push(key);
    }
    Ok(rcpt)
}

/// RFC 3461 4.1: `NEVER` alone, or a comma-separated list of SUCCESS, FAILURE and DELAY.
fn parse_notify(value: &str) -> Result<Vec<DsnNotify>, CommandError> {
    let mut list = Vec::new();
    for word in value.split(',') {
        let notify = match word.to_ascii_uppercase().as_str() {
            "NEVER" => DsnNotify::Never,
            "SUCCESS" => DsnNotify::Success,
            "FAILURE" => DsnNotify::Failure,
            "DELAY" => DsnNotify::Delay,
            _ => return Err(syntax(format!("NOTIFY: unknown value {word:?}"))),
        };
        if list.contains(&notify) {
            return Err(syntax("NOTIFY: value repeated"));
        }
        list.push(notify);
    }
    if list.contains(&DsnNotify::Never) && list.len() > 1 {
        return Err(syntax("NOTIFY=NEVER cannot be combined with other values"));
    }
    Ok(list)
}

/// RFC 3461 4.2: `addr-type ";" xtext`, at most 500 characters. RFC 6533 adds the `utf-8` type,
/// whose value may hold UTF-8 directly; it is only checked for being printable.
fn check_orcpt(value: &str) -> Result<(), CommandError> {
    let bad = || syntax("ORCPT must be addr-type;xtext");
    let (kind, address) = value.split_once(';').ok_or_else(bad)?;
    let kind_ok = !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if value.len() > 500 || !kind_ok || address.is_empty() {
        return Err(bad());
    }
    if kind.eq_ignore_ascii_case("utf-8") {
        return if address.chars().all(|c| !c.is_control() && c != ' ') { Ok(()) } else { Err(bad()) };
    }
    xtext_decode(address).map(|_| ()).ok_or_else(bad)
}

/// Splits `<path> params` (or, leniently, `path params` without brackets, as Postfix accepts).
/// Returns the address without brackets and without an RFC 5321 4.1.2 source route (`@a,@b:`),
/// which 4.1.1.3 says to ignore, and the rest of the line.
fn parse_path(text: &str) -> Result<(String, &str), CommandError> {
    let (inner, rest) = match text.strip_prefix('<') {
        Some(after) => {
            let end = closing_bracket(after).ok_or_else(|| syntax("address: missing closing '>'"))?;
            (&after[..end], &after[end + 1..])
        }
        None => {
            let end = text.find(' ').unwrap_or(text.len());
            if end == 0 {
                return Err(syntax("syntax: missing address"));
            }
            (&text[..end], &text[end..])
        }
    };
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err(syntax("address: garbage after '>'"));
    }
    let address = match inner.strip_prefix('@') {
        Some(route) => route.split_once(':').map(|(_, a)| a).ok_or_else(|| syntax("address: bad source route"))?,
        None => inner,
    };
    if address.len() > 254 || address.contains(['<', '>']) && !address.starts_with('"') {
        return Err(syntax("address: invalid syntax"));
    }
    Ok((address.to_string(), rest))
}

/// The index of the `>` closing a path, skipping quoted strings and quoted pairs in the local part.
fn closing_bracket(text: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// `KEYWORD[=value]` pairs separated by spaces (RFC 5321 4.1.2 esmtp-param); keywords upper-cased.
fn parameters(text: &str) -> Result<Vec<(String, Option<&str>)>, CommandError> {
    let mut out = Vec::new();
    for param in text.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        let key_ok = key.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let value_ok = value.is_none_or(|v| !v.is_empty() && !v.contains('='));
        if !key_ok || !value_ok {
            return Err(syntax(format!("bad parameter syntax: {param}")));
        }
        out.push((key.to_ascii_uppercase(), value));
    }
    Ok(out)
}

/// Checks a mailbox `local@domain` (RFC 5321 4.1.2): a dot-string or quoted-string local part and a
/// domain name or address literal. Non-ASCII is allowed only when `utf8` (RFC 6531 3.3).
/// Returns the domain part.
pub fn check_mailbox(address: &str, utf8: bool) -> Result<&str, &'static str> {
    if !utf8 && !address.is_ascii() {
        return Err("non-ASCII address without SMTPUTF8");
    }
    let (local, domain) = address.rsplit_once('@').ok_or("address needs a local part and a domain")?;
    if !local_part_ok(local) {
        return Err("invalid local part");
    }
    let domain_ok = if let Some(literal) = domain.strip_prefix('[') {
        literal.strip_suffix(']').is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_graphic()))
    } else {
        let ascii: String = domain.chars().map(|c| if c.is_ascii() { c } else { 'x' }).collect();
        // A trailing dot (fully qualified) is tolerated, as Postfix does.
        crate::config::is_domain_name(&ascii)
    };
    if domain_ok { Ok(domain) } else { Err("invalid domain") }
}

fn local_part_ok(local: &str) -> bool {
    if let Some(quoted) = local.strip_prefix('"') {
        let Some(inner) = quoted.strip_suffix('"') else { return false };
        let mut escaped = false;
        for c in inner.chars() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => return false,
                _ => {}
            }
        }
        return !escaped;
    }
    // RFC 5322 3.2.3 atext; RFC 6531 3.3 adds any UTF-8 beyond ASCII.
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    !local.is_empty() && local.split('.').all(|atom| !atom.is_empty() && atom.chars().all(atext))
}

#[cfg(test)]
mod tests;

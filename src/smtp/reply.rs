//! SMTP replies: a three-digit code, an optional enhanced status code (RFC 2034, RFC 3463) and one
//! or more lines of text (RFC 5321 4.2.1: every line but the last has a hyphen after the code).

use std::fmt;

/// One reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The basic status code (RFC 5321 4.2).
    pub code: u16,
    /// The enhanced status code, e.g. `5.7.1`; None for the greeting and the EHLO/HELO replies,
    /// which RFC 2034 section 3 exempts.
    pub enhanced: Option<&'static str>,
    /// The text lines; never empty.
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply with an enhanced status code.
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<String>) -> Reply {
        Reply { code, enhanced: Some(enhanced), lines: vec![text.into()] }
    }

    /// A reply without an enhanced status code (greeting, EHLO, HELO, 354).
    pub fn plain(code: u16, text: impl Into<String>) -> Reply {
        Reply { code, enhanced: None, lines: vec![text.into()] }
    }

    /// A multi-line reply without an enhanced status code (the EHLO keyword list).
    pub fn multiline(code: u16, lines: Vec<String>) -> Reply {
        let lines = if lines.is_empty() { vec![String::new()] } else { lines };
        Reply { code, enhanced: None, lines }
    }

    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// The reply as it goes on the wire, CRLF after every line.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            // Replies must never carry a CR or LF of their own: they would end the line early.
            let line: String = line.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
            match self.enhanced {
                Some(enhanced) => write!(f, "{}{sep}{enhanced} {line}\r\n", self.code)?,
                None if line.is_empty() => write!(f, "{}{sep}\r\n", self.code)?,
                None => write!(f, "{}{sep}{line}\r\n", self.code)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_with_enhanced_code() {
        assert_eq!(Reply::new(250, "2.1.0", "Ok").to_string(), "250 2.1.0 Ok\r\n");
        assert_eq!(Reply::new(550, "5.7.1", "relaying denied").to_bytes(), b"550 5.7.1 relaying denied\r\n");
    }

    #[test]
    fn plain_and_multiline() {
        assert_eq!(Reply::plain(220, "mx.test ESMTP bartleby").to_string(), "220 mx.test ESMTP bartleby\r\n");
        let ehlo = Reply::multiline(250, vec!["mx.test".into(), "PIPELINING".into(), "DSN".into()]);
        assert_eq!(ehlo.to_string(), "250-mx.test\r\n250-PIPELINING\r\n250 DSN\r\n");
        assert_eq!(Reply::multiline(250, vec![]).to_string(), "250 \r\n");
    }

    #[test]
    fn multiline_with_enhanced_code_repeats_it() {
        let reply = Reply { code: 214, enhanced: Some("2.0.0"), lines: vec!["a".into(), "b".into()] };
        assert_eq!(reply.to_string(), "214-2.0.0 a\r\n214 2.0.0 b\r\n");
    }

    #[test]
    fn text_cannot_break_the_line() {
        assert_eq!(Reply::new(501, "5.5.4", "bad\r\nthing").to_string(), "501 5.5.4 bad  thing\r\n");
        assert!(Reply::new(354, "2.0.0", "x").is_positive());
        assert!(!Reply::new(452, "4.3.1", "x").is_positive());
    }
}

//! Our Received header (RFC 5321 4.4): where the message came from, how, and for whom.
//!
//! The `with` protocol is one of RFC 3848's (SMTP, ESMTP, ESMTPS; the A forms need AUTH, which we
//! do not offer) or, when the transaction used SMTPUTF8, RFC 6531 3.7.3's UTF8SMTP and UTF8SMTPS.
//! Over TLS a comment names the protocol version and the cipher the way Postfix does,
//! `(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))`, so a reader of the header
//! sees how the hop was protected.

use std::net::IpAddr;
use std::time::SystemTime;

/// What the TLS handshake of a session agreed on, as the Received header names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3`, `TLSv1.2`.
    pub version: String,
    /// The cipher suite, in OpenSSL's spelling as Postfix logs it (`TLS_AES_256_GCM_SHA384`,
    /// `ECDHE-RSA-AES256-GCM-SHA384`).
    pub cipher: String,
    /// The strength of the bulk cipher's key, when the suite is one we know.
    pub bits: Option<u16>,
}

impl TlsInfo {
    /// Reads the version and cipher suite of an established server connection.
    pub fn of(connection: &rustls::ServerConnection) -> TlsInfo {
        let version = match connection.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(other) => format!("{other:?}"),
            None => "TLS".to_string(),
        };
        let suite = connection.negotiated_cipher_suite().map(|s| s.suite());
        let iana = suite.and_then(|s| s.as_str().map(str::to_string)).unwrap_or_else(|| format!("{suite:?}"));
        let cipher = openssl_name(&iana);
        let bits = cipher_bits(&iana);
        TlsInfo { version, cipher, bits }
    }

    /// `(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))`.
    pub fn comment(&self) -> String {
        match self.bits {
            Some(bits) => format!("(using {} with cipher {} ({bits}/{bits} bits))", self.version, self.cipher),
            None => format!("(using {} with cipher {})", self.version, self.cipher),
        }
    }
}

/// rustls spells suites as IANA does, with `TLS13_` for TLS 1.3; OpenSSL (and so Postfix's
/// headers) writes TLS 1.3 suites with `TLS_` and TLS 1.2 ones in its own short form.
fn openssl_name(iana: &str) -> String {
    if let Some(rest) = iana.strip_prefix("TLS13_") {
        return format!("TLS_{rest}");
    }
    let known = match iana {
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => "ECDHE-RSA-CHACHA20-POLY1305",
        other => other,
    };
    known.to_string()
}

/// The key length of the suite's bulk cipher (AES-128, AES-256, ChaCha20 with 256 bits).
fn cipher_bits(iana: &str) -> Option<u16> {
    if iana.contains("AES_256") || iana.contains("CHACHA20") {
        Some(256)
    } else if iana.contains("AES_128") {
        Some(128)
    } else {
        None
    }
}

/// The `with` clause: RFC 3848 section 2 and, for SMTPUTF8 transactions, RFC 6531 3.7.3.
pub fn protocol(extended: bool, tls: bool, smtputf8: bool) -> &'static str {
    match (extended, tls, smtputf8) {
        // SMTPUTF8 is an extension: after HELO a client cannot have used it.
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "UTF8SMTP",
        (true, true, true) => "UTF8SMTPS",
    }
}

/// What one Received header says.
pub struct Stamp<'a> {
    /// The client's EHLO/HELO name (checked to be visible ASCII without comment characters).
    pub helo: &'a str,
    pub client: IpAddr,
    pub tls: Option<&'a TlsInfo>,
    pub protocol: &'static str,
    /// Our host name.
    pub by: &'a str,
    pub id: &'a str,
    /// The recipient, when the message has only one (RFC 5321 4.4 `for`; with several, naming
    /// them would tell each about the others).
    pub only_recipient: Option<&'a str>,
    pub date: SystemTime,
}

impl Stamp<'_> {
    /// The header with its CRLF, folded before each clause.
    pub fn header(&self) -> String {
        let literal = match self.client {
            IpAddr::V4(ip) => format!("[{ip}]"),
            IpAddr::V6(ip) => format!("[IPv6:{ip}]"),
        };
        let mut header = format!("Received: from {} ({literal})", self.helo);
        if let Some(tls) = self.tls {
            header.push_str(&format!("\r\n\t{}", tls.comment()));
        }
        header.push_str(&format!("\r\n\tby {} (bartleby) with {} id {}", self.by, self.protocol, self.id));
        if let Some(rcpt) = self.only_recipient {
            header.push_str(&format!("\r\n\tfor <{rcpt}>"));
        }
        header.push_str(&format!("; {}\r\n", crate::spool::rfc5322_date(self.date)));
        header
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_of_rfc_3848_and_6531() {
        assert_eq!(protocol(false, false, false), "SMTP");
        assert_eq!(protocol(false, true, true), "SMTP");
        assert_eq!(protocol(true, false, false), "ESMTP");
        assert_eq!(protocol(true, true, false), "ESMTPS");
        assert_eq!(protocol(true, false, true), "UTF8SMTP");
        assert_eq!(protocol(true, true, true), "UTF8SMTPS");
    }

    #[test]
    fn cipher_names_as_openssl_writes_them() {
        assert_eq!(openssl_name("TLS13_AES_256_GCM_SHA384"), "TLS_AES_256_GCM_SHA384");
        assert_eq!(openssl_name("TLS13_CHACHA20_POLY1305_SHA256"), "TLS_CHACHA20_POLY1305_SHA256");
        assert_eq!(openssl_name("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"), "ECDHE-RSA-AES128-GCM-SHA256");
        assert_eq!(openssl_name("TLS_SOMETHING_NEW"), "TLS_SOMETHING_NEW");
        assert_eq!(cipher_bits("TLS13_AES_128_GCM_SHA256"), Some(128));
        assert_eq!(cipher_bits("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"), Some(256));
        assert_eq!(cipher_bits("TLS_SOMETHING_NEW"), None);
        let tls = TlsInfo { version: "TLSv1.2".into(), cipher: "X".into(), bits: None };
        assert_eq!(tls.comment(), "(using TLSv1.2 with cipher X)");
    }

    #[test]
    fn header_with_tls_and_ipv6() {
        let tls = TlsInfo { version: "TLSv1.3".into(), cipher: "TLS_AES_256_GCM_SHA384".into(), bits: Some(256) };
        let stamp = Stamp {
            helo: "c.test",
            client: "2001:db8::7".parse().expect("ip"),
            tls: Some(&tls),
            protocol: "UTF8SMTPS",
            by: "mx.test",
            id: "Q1",
            only_recipient: None,
            date: SystemTime::UNIX_EPOCH,
        };
        assert_eq!(
            stamp.header(),
            "Received: from c.test ([IPv6:2001:db8::7])\r\n\
             \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n\
             \tby mx.test (bartleby) with UTF8SMTPS id Q1; Thu, 01 Jan 1970 00:00:00 +0000\r\n"
        );
    }
}

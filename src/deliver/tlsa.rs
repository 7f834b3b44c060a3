//! TLSA records (RFC 6698) as SMTP uses them (RFC 7672): which records are usable, and whether one
//! matches a certificate chain. `bartleby check-dns` compares the records of the backup's own name
//! with the certificate it serves; the matching is what DANE toward the primaries needs as well.

use rustls_pki_types::CertificateDer;

/// One TLSA record: `usage selector matching data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    /// 2 DANE-TA (a trust anchor in the chain), 3 DANE-EE (the server's own certificate); RFC 7672
    /// 3.1.3 makes 0 and 1 (PKIX-TA, PKIX-EE) unusable for SMTP.
    pub usage: u8,
    /// 0: the whole certificate, 1: its SubjectPublicKeyInfo.
    pub selector: u8,
    /// 0: the data itself, 1: SHA-256, 2: SHA-512 of it.
    pub matching: u8,
    pub data: Vec<u8>,
}

impl Tlsa {
    /// RFC 7672 3.1: only DANE-TA(2) and DANE-EE(3) with known selectors and matching types count.
    pub fn usable(&self) -> bool {
        matches!(self.usage, 2 | 3) && matches!(self.selector, 0 | 1) && matches!(self.matching, 0..=2)
    }

    /// Does the record match `chain` (the end-entity certificate first)? DANE-EE compares the
    /// end-entity certificate only (its names and dates do not matter, RFC 7672 3.1.1); DANE-TA any
    /// certificate of the chain above it (3.1.2; that the chain is valid is the caller's check).
    pub fn matches(&self, chain: &[CertificateDer<'_>]) -> bool {
        if !self.usable() {
            return false;
        }
        let candidates = match self.usage {
            3 => chain.get(..1).unwrap_or(&[]),
            _ => chain.get(1..).unwrap_or(&[]),
        };
        candidates.iter().any(|cert| self.matches_one(cert))
    }

    fn matches_one(&self, cert: &CertificateDer<'_>) -> bool {
        let selected = match self.selector {
            0 => Some(cert.as_ref()),
            _ => subject_public_key_info(cert.as_ref()),
        };
        let Some(selected) = selected else { return false };
        match self.matching {
            0 => selected == self.data.as_slice(),
            1 => ring::digest::digest(&ring::digest::SHA256, selected).as_ref() == self.data.as_slice(),
            2 => ring::digest::digest(&ring::digest::SHA512, selected).as_ref() == self.data.as_slice(),
            _ => false,
        }
    }
}

impl std::fmt::Display for Tlsa {
    /// Zone file form: `3 1 1 ab12...`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {} ", self.usage, self.selector, self.matching)?;
        self.data.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The SubjectPublicKeyInfo of a DER certificate (RFC 5280 4.1): the seventh field of
/// tbsCertificate when the version is present, the sixth without it. None for anything else.
pub fn subject_public_key_info(cert: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = der_element(cert, 0x30)?;
    let (tbs, _) = der_element(content(certificate)?, 0x30)?;
    let mut rest = content(tbs)?;
    // [0] EXPLICIT version, when present.
    if rest.first() == Some(&0xa0) {
        rest = der_element(rest, 0xa0)?.1;
    }
    // serialNumber, signature, issuer, validity, subject.
    for tag in [0x02, 0x30, 0x30, 0x30, 0x30] {
        rest = der_element(rest, tag)?.1;
    }
    der_element(rest, 0x30).map(|(spki, _)| spki)
}

/// The first DER element of `input` if its tag is `tag`: (the whole element, what follows).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    let first = *input.get(1)?;
    let (length, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let octets = usize::from(first & 0x7f);
        if octets == 0 || octets > 4 {
            return None;
        }
        let bytes = input.get(2..2 + octets)?;
        (bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b)), 2 + octets)
    };
    let end = header.checked_add(length)?;
    Some((input.get(..end)?, input.get(end..)?))
}

/// The content of a whole DER element (after its tag and length).
fn content(element: &[u8]) -> Option<&[u8]> {
    let first = *element.get(1)?;
    let header = if first < 0x80 { 2 } else { 2 + usize::from(first & 0x7f) };
    element.get(header..)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> (Vec<CertificateDer<'static>>, Vec<u8>, Vec<u8>) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, PublicKeyData};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_spki = ca_key.subject_public_key_info();
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let spki = key.subject_public_key_info();
        let cert = CertificateParams::new(vec!["mx.test".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
        (vec![cert.der().clone(), ca.der().clone()], spki, ca_spki)
    }

    fn record(usage: u8, selector: u8, matching: u8, data: &[u8]) -> Tlsa {
        let data = match matching {
            1 => ring::digest::digest(&ring::digest::SHA256, data).as_ref().to_vec(),
            2 => ring::digest::digest(&ring::digest::SHA512, data).as_ref().to_vec(),
            _ => data.to_vec(),
        };
        Tlsa { usage, selector, matching, data }
    }

    #[test]
    fn spki_is_found() {
        let (chain, spki, ca_spki) = chain();
        assert_eq!(subject_public_key_info(chain[0].as_ref()), Some(spki.as_slice()));
        assert_eq!(subject_public_key_info(chain[1].as_ref()), Some(ca_spki.as_slice()));
    }

    #[test]
    fn dane_ee_and_ta_match() {
        let (chain, spki, ca_spki) = chain();
        for matching in 0..=2 {
            assert!(record(3, 1, matching, &spki).matches(&chain), "3 1 {matching}");
            assert!(record(3, 0, matching, chain[0].as_ref()).matches(&chain), "3 0 {matching}");
            assert!(record(2, 1, matching, &ca_spki).matches(&chain), "2 1 {matching}");
            assert!(record(2, 0, matching, chain[1].as_ref()).matches(&chain), "2 0 {matching}");
        }
        // DANE-EE is the end entity only; DANE-TA is above it.
        assert!(!record(3, 1, 1, &ca_spki).matches(&chain));
        assert!(!record(2, 1, 1, &spki).matches(&chain));
        // PKIX usages and unknown selectors or matching types are unusable (RFC 7672 3.1.3).
        assert!(!record(1, 1, 1, &spki).matches(&chain));
        assert!(!Tlsa { usage: 3, selector: 2, matching: 1, data: vec![] }.matches(&chain));
        assert!(!Tlsa { usage: 3, selector: 1, matching: 3, data: vec![] }.matches(&chain));
        assert!(!record(3, 1, 1, b"other key").matches(&chain));
        assert!(!record(3, 1, 1, &spki).matches(&[]));
    }

    #[test]
    fn bad_der_is_none_not_a_panic() {
        let (chain, _, _) = chain();
        let der = chain[0].as_ref();
        for cut in [0, 1, 2, 10, der.len() / 2, der.len() - 1] {
            let _ = subject_public_key_info(&der[..cut]);
        }
        assert_eq!(subject_public_key_info(b""), None);
        assert_eq!(subject_public_key_info(&[0x30, 0x85, 1, 2, 3, 4, 5]), None);
        assert_eq!(subject_public_key_info(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(subject_public_key_info(&[0x02, 0x01, 0x00]), None);
        assert_eq!(record(3, 1, 1, &[1, 2]).to_string().split(' ').take(3).collect::<Vec<_>>(), ["3", "1", "1"]);
    }
}

//! DANE for SMTP (RFC 7672): TLSA records from DNSSEC-validated answers decide which certificate an
//! MX host must present.
//!
//! Only answers the validating resolver reports as secure count. With an insecure MX RRset no host
//! of the domain gets DANE (section 2.2.1); an insecure or absent TLSA RRset leaves that host to the
//! domain's usual policy (section 2.2); a bogus or failed TLSA lookup makes the host unusable
//! (section 2.1). A host with usable records must do STARTTLS and present a certificate that one
//! of them matches (section 3), checked by [`DaneVerifier`] during the handshake.

use super::tlsa::Tlsa;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How DNSSEC validation judged an answer (RFC 4035 4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secured<T> {
    /// Validated from the trust anchor.
    Secure(T),
    /// Provably unsigned, or nothing to validate (no records).
    Insecure,
    /// Signed but not valid, or the lookup failed: nothing may be concluded (RFC 7672 2.1).
    Bogus(String),
}

impl<T> Secured<T> {
    /// The secure value transformed; insecure and bogus unchanged.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Secured<U> {
        match self {
            Secured::Secure(value) => Secured::Secure(f(value)),
            Secured::Insecure => Secured::Insecure,
            Secured::Bogus(reason) => Secured::Bogus(reason),
        }
    }
}

/// What DANE says about one MX host.
#[derive(Debug, Clone)]
pub enum HostDane {
    /// Usable TLSA records (RFC 7672 3.1.3): STARTTLS is mandatory and the certificate must match.
    Records(Arc<Vec<Tlsa>>),
    /// The TLSA lookup was bogus or failed (RFC 7672 2.1): do not deliver to this host.
    Unusable(String),
}

/// The DANE state of a domain's MX hosts, by host name; a host not listed has no usable records
/// and gets the domain's usual policy.
#[derive(Debug, Clone, Default)]
pub struct DanePlan {
    /// The next-hop domain, a reference identifier for DANE-TA (RFC 7672 3.2.2).
    pub domain: String,
    pub hosts: HashMap<String, HostDane>,
}

impl DanePlan {
    /// The verifier for `host` when it has usable records.
    pub fn verifier(&self, host: &str, provider: &Arc<CryptoProvider>) -> Option<Arc<DaneVerifier>> {
        match self.hosts.get(host)? {
            HostDane::Records(records) => {
                Some(Arc::new(DaneVerifier::new(records.clone(), host, &self.domain, provider.clone())))
            }
            HostDane::Unusable(_) => None,
        }
    }

    /// Why `host` must not be used, when its TLSA lookup was bogus or failed.
    pub fn unusable(&self, host: &str) -> Option<&str> {
        match self.hosts.get(host)? {
            HostDane::Unusable(reason) => Some(reason),
            HostDane::Records(_) => None,
        }
    }
}

/// Keeps only the records RFC 7672 lets SMTP use: DANE-TA(2) and DANE-EE(3) with known selectors
/// and matching types; PKIX-TA(0) and PKIX-EE(1) are unusable (sections 3.1.3 and 4.1).
pub fn usable(records: Vec<Tlsa>) -> Vec<Tlsa> {
    records.into_iter().filter(Tlsa::usable).collect()
}

/// Checks a server's certificate chain against the TLSA records of its MX host (RFC 7672 3), and
/// remembers why it refused, so the operator reads "DANE: no TLSA record ... matches" rather than
/// a TLS alert.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Arc<Vec<Tlsa>>,
    /// The TLSA base domain (the MX host name), for messages and as the first reference identifier.
    host: String,
    /// RFC 7672 3.2.2: a DANE-TA chain's leaf must name the MX host or the next-hop domain.
    names: Vec<String>,
    provider: Arc<CryptoProvider>,
    algorithms: WebPkiSupportedAlgorithms,
    /// Why the last handshake's certificate was refused.
    failure: Mutex<Option<String>>,
}

impl DaneVerifier {
    pub fn new(records: Arc<Vec<Tlsa>>, host: &str, domain: &str, provider: Arc<CryptoProvider>) -> DaneVerifier {
        let mut names = vec![host.to_string()];
        if !domain.eq_ignore_ascii_case(host) {
            names.push(domain.to_string());
        }
        DaneVerifier {
            records,
            host: host.to_string(),
            names,
            algorithms: provider.signature_verification_algorithms,
            provider,
            failure: Mutex::new(None),
        }
    }

    /// Why the certificate of the last handshake was refused, if it was.
    pub fn failure(&self) -> Option<String> {
        crate::lock(&self.failure).clone()
    }

    /// Does a record match `end_entity` (with the rest of the chain in `intermediates`)? Returns
    /// the kind of match or why none did.
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<&'static str, String> {
        let chain: Vec<CertificateDer<'_>> =
            std::iter::once(end_entity.clone()).chain(intermediates.iter().cloned()).collect();
        // RFC 7672 3.1.1: DANE-EE matches the server's own certificate or key; its names and
        // validity dates are not checked.
        if self.records.iter().any(|r| r.usage == 3 && r.matches(&chain)) {
            return Ok("DANE-EE");
        }
        // RFC 7672 3.1.2 and 3.2.2: DANE-TA names a trust anchor, which the server must send in its
        // chain; the chain must lead from the leaf to it, and the leaf must name the MX host or
        // the next-hop domain.
        for anchor in intermediates {
            let ta_records = self.records.iter().filter(|r| r.usage == 2);
            if !ta_records.clone().any(|r| r.matches(&[end_entity.clone(), anchor.clone()])) {
                continue;
            }
            if self.chain_leads_to(anchor, end_entity, intermediates, now) {
                return Ok("DANE-TA");
            }
        }
        Err(format!("DANE: no TLSA record of {} matches the certificate", self.host))
    }

    /// Is the chain valid up to `anchor`, for one of the reference identifiers?
    fn chain_leads_to(
        &self,
        anchor: &CertificateDer<'_>,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        if roots.add(anchor.clone().into_owned()).is_err() {
            return false;
        }
        let Ok(verifier) =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone()).build()
        else {
            return false;
        };
        self.names
            .iter()
            .filter_map(|n| ServerName::try_from(n.clone()).ok())
            .any(|name| verifier.verify_server_cert(end_entity, intermediates, &name, &[], now).is_ok())
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.check(end_entity, intermediates, now) {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(reason) => {
                *crate::lock(&self.failure) = Some(reason.clone());
                Err(rustls::Error::General(reason))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, PublicKeyData};

    struct Chain {
        leaf: CertificateDer<'static>,
        ca: CertificateDer<'static>,
        leaf_spki: Vec<u8>,
    }

    fn chain(names: &[&str]) -> Chain {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
        Chain { leaf: leaf.der().clone(), ca: ca.der().clone(), leaf_spki: key.subject_public_key_info() }
    }

    fn sha256(data: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, data).as_ref().to_vec()
    }

    fn verifier(records: Vec<Tlsa>) -> DaneVerifier {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        DaneVerifier::new(Arc::new(records), "mx.example.test", "example.test", provider)
    }

    #[test]
    fn dane_ee_3_1_1_matches_the_leaf_whatever_its_names() {
        let c = chain(&["unrelated.test"]);
        let v = verifier(vec![Tlsa { usage: 3, selector: 1, matching: 1, data: sha256(&c.leaf_spki) }]);
        assert_eq!(v.check(&c.leaf, &[], UnixTime::now()), Ok("DANE-EE"));
        assert!(
            v.verify_server_cert(&c.leaf, &[], &ServerName::try_from("x.test").unwrap(), &[], UnixTime::now()).is_ok()
        );
        assert_eq!(v.failure(), None);
    }

    #[test]
    fn dane_ee_3_1_1_with_another_key_is_refused_with_the_reason() {
        let c = chain(&["mx.example.test"]);
        let other = chain(&["mx.example.test"]);
        let v = verifier(vec![Tlsa { usage: 3, selector: 1, matching: 1, data: sha256(&other.leaf_spki) }]);
        let name = ServerName::try_from("mx.example.test").unwrap();
        assert!(v.verify_server_cert(&c.leaf, std::slice::from_ref(&c.ca), &name, &[], UnixTime::now()).is_err());
        assert_eq!(v.failure().as_deref(), Some("DANE: no TLSA record of mx.example.test matches the certificate"));
    }

    #[test]
    fn dane_ta_2_0_1_needs_the_anchor_in_the_chain_and_a_reference_name() {
        let record = |c: &Chain| Tlsa { usage: 2, selector: 0, matching: 1, data: sha256(c.ca.as_ref()) };
        let now = UnixTime::now();
        for name in ["mx.example.test", "example.test"] {
            let c = chain(&[name]);
            assert_eq!(
                verifier(vec![record(&c)]).check(&c.leaf, std::slice::from_ref(&c.ca), now),
                Ok("DANE-TA"),
                "{name}"
            );
        }
        // The anchor must be sent (RFC 7672 3.2.2), and the leaf must name the host or the domain.
        let c = chain(&["mx.example.test"]);
        assert!(verifier(vec![record(&c)]).check(&c.leaf, &[], now).is_err());
        let elsewhere = chain(&["elsewhere.test"]);
        assert!(
            verifier(vec![record(&elsewhere)])
                .check(&elsewhere.leaf, std::slice::from_ref(&elsewhere.ca), now)
                .is_err()
        );
        // A leaf from another CA that sends the named CA along does not pass.
        let other = chain(&["mx.example.test"]);
        assert!(verifier(vec![record(&c)]).check(&other.leaf, std::slice::from_ref(&c.ca), now).is_err());
    }

    #[test]
    fn bad_certificates_never_panic() {
        let c = chain(&["mx.example.test"]);
        let records = vec![
            Tlsa { usage: 3, selector: 1, matching: 1, data: sha256(&c.leaf_spki) },
            Tlsa { usage: 2, selector: 1, matching: 0, data: vec![0x30, 0x00] },
            Tlsa { usage: 2, selector: 0, matching: 0, data: vec![] },
        ];
        let v = verifier(records);
        let der = c.leaf.as_ref();
        for cut in [0, 1, 2, 7, der.len() / 2, der.len() - 1] {
            let broken = CertificateDer::from(der[..cut].to_vec());
            let _ = v.check(&broken, &[broken.clone(), CertificateDer::from(vec![0x30, 0x84, 0xff])], UnixTime::now());
        }
        assert!(
            v.check(&CertificateDer::from(Vec::new()), &[CertificateDer::from(Vec::new())], UnixTime::now()).is_err()
        );
    }

    #[test]
    fn pkix_usages_are_unusable() {
        let records = (0..4).map(|usage| Tlsa { usage, selector: 1, matching: 1, data: vec![1] }).collect();
        assert_eq!(usable(records).iter().map(|r| r.usage).collect::<Vec<_>>(), [2, 3]);
    }
}

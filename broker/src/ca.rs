//! The broker's own certificate authority: it issues the broker's server
//! certificate and, from CSRs (the agent's key never leaves the agent), one
//! client certificate per enrolled identity. The CSR's own subject and
//! extensions are ignored: the broker decides the CN (the authenticated or
//! ticketed identity), the validity and the usages.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use crate::error::{ApiError, StartError};

/// Lifetime of an agent's client certificate (renewed every 12 h).
pub const CLIENT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of the broker's server certificate.
pub const SERVER_CERT_TTL: Duration = Duration::from_secs(7 * 86_400);
/// Largest CSR accepted (PEM characters).
pub const MAX_CSR_PEM: usize = 8 * 1024;

/// Names the jail reaches the broker by: the backends' host aliases, the
/// QEMU user-net host, and loopback.
pub const SERVER_NAMES: &[&str] = &["host.orb.internal", "host.lima.internal", "localhost"];
pub const SERVER_IPS: &[&str] = &["127.0.0.1", "::1", "10.0.2.2", "10.0.2.100"];

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca(..)")
    }
}

fn ca_err(e: impl std::fmt::Display) -> StartError {
    StartError::Ca(e.to_string())
}

impl Ca {
    /// A new CA: ECDSA P-256, valid 10 years. Returns (key PEM, cert PEM).
    pub fn generate(instance: &str) -> Result<(String, String), StartError> {
        let key = KeyPair::generate().map_err(ca_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Lever broker CA ({instance})"));
        dn.push(DnType::OrganizationName, "Lever");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = rcgen_time(now - Duration::from_secs(300));
        params.not_after = rcgen_time(now + Duration::from_secs(10 * 365 * 86_400));
        let cert = params.self_signed(&key).map_err(ca_err)?;
        Ok((key.serialize_pem(), cert.pem()))
    }

    pub fn load(key_pem: &str, cert_pem: &str) -> Result<Ca, StartError> {
        let key = KeyPair::from_pem(key_pem).map_err(ca_err)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(ca_err)?;
        let cert_der = pem_certs(cert_pem)
            .map_err(ca_err)?
            .into_iter()
            .next()
            .ok_or_else(|| StartError::Ca("ca.crt holds no certificate".into()))?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_owned(),
            cert_der,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues a client certificate for `identity` from a PEM CSR, signed
    /// with the CSR's key (proof of possession checked). Returns (PEM, not_after).
    pub fn issue_client(
        &self,
        identity: &str,
        csr_pem: &str,
        serial: u64,
    ) -> Result<(String, SystemTime), ApiError> {
        let csr = check_csr(csr_pem)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from(serial));
        let now = SystemTime::now();
        let not_after = now + CLIENT_CERT_TTL;
        params.not_before = rcgen_time(now - Duration::from_secs(60));
        params.not_after = rcgen_time(not_after);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| ApiError::Internal(format!("signing: {e}")))?;
        Ok((cert.pem(), not_after))
    }

    /// A fresh server key and certificate. Returns (chain, key, not_after).
    pub fn issue_server(
        &self,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
            SystemTime,
        ),
        StartError,
    > {
        let key = KeyPair::generate().map_err(ca_err)?;
        let mut sans: Vec<String> = SERVER_NAMES.iter().map(|s| (*s).to_owned()).collect();
        sans.extend(SERVER_IPS.iter().map(|s| (*s).to_owned()));
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(ca_err)?;
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => s.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()
            .map_err(ca_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "lever-broker");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        let not_after = now + SERVER_CERT_TTL;
        params.not_before = rcgen_time(now - Duration::from_secs(300));
        params.not_after = rcgen_time(not_after);
        let cert = params.signed_by(&key, &self.issuer).map_err(ca_err)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((
            vec![cert.der().clone(), self.cert_der.clone()],
            key_der,
            not_after,
        ))
    }
}

pub(crate) fn rcgen_time(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Parses every certificate in a PEM text.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))
}

/// The identity a verified client certificate carries: exactly one CN, not
/// a CA, with the clientAuth usage. (The chain to the broker CA, validity
/// and signature were checked by rustls during the handshake.)
pub fn client_identity(cert: &CertificateDer<'_>) -> Result<String, String> {
    let (_, x) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| format!("unparsable: {e}"))?;
    let mut cns = x.subject().iter_common_name();
    let cn = cns.next().ok_or("no CN")?;
    if cns.next().is_some() {
        return Err("more than one CN".into());
    }
    let cn = cn.as_str().map_err(|_| "CN is not a string")?.to_owned();
    lever_policy::config::Name::parse(&cn).map_err(|_| "CN is not a valid identity")?;
    let mut client_auth = false;
    for ext in x.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err("a CA certificate".into()),
            ParsedExtension::ExtendedKeyUsage(eku) => client_auth = eku.client_auth,
            _ => {}
        }
    }
    if !client_auth {
        return Err("no clientAuth extended key usage".into());
    }
    Ok(cn)
}
/// A CSR as `/v1/enrol` and `/v1/renew` take it: within the size cap and
/// parsing (its self-signature checked). Enrolment runs this before it
/// spends the ticket, so a CSR refused here costs the agent nothing.
pub fn check_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, ApiError> {
    if csr_pem.len() > MAX_CSR_PEM {
        return Err(ApiError::BadRequest("CSR too large".into()));
    }
    CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| ApiError::BadRequest(format!("invalid CSR: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_certificate_takes_only_the_key_from_its_csr() {
        let (k, c) = Ca::generate("t").unwrap();
        let ca = Ca::load(&k, &c).unwrap();
        // A CSR asking for another CN, a server's name, serverAuth and CA
        // powers: the certificate carries the identity the broker chose,
        // clientAuth, and nothing the CSR asked for.
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["host.orb.internal".to_owned()]).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "manager");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let (pem, _) = ca.issue_client("g1", &csr, 7).unwrap();
        let der = pem_certs(&pem).unwrap().remove(0);
        assert_eq!(client_identity(&der).unwrap(), "g1");
        let (_, x) = X509Certificate::from_der(der.as_ref()).unwrap();
        for ext in x.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(_) => {
                    panic!("a SAN was taken from the CSR")
                }
                ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca),
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    assert!(eku.client_auth && !eku.server_auth);
                }
                _ => {}
            }
        }
        // Proof of possession: a CSR whose signature does not verify (one
        // character of its last line changed) is refused.
        let lines: Vec<&str> = csr.lines().collect();
        let last = lines.len() - 2;
        let mut bad: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        let mid = bad[last].len() / 2;
        let flipped = if &bad[last][mid..=mid] == "A" {
            "B"
        } else {
            "A"
        };
        bad[last].replace_range(mid..=mid, flipped);
        let bad = bad.join("\n") + "\n";
        assert!(check_csr(&bad).is_err());
        assert!(ca.issue_client("g1", &bad, 8).is_err());
    }
}

//! TLS for the jail listener: TLS 1.3 only, ring, the broker's server
//! certificate (rotated before it expires), and client certificates
//! requested and verified against the broker CA only. A handshake without a
//! client certificate succeeds (enrolment and health need none); every
//! other route refuses it (see `stack.rs`).

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::ca::{Ca, SERVER_CERT_TTL};
use crate::error::StartError;

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server certificate in use, replaced when a third of its life remains.
#[derive(Debug)]
pub(crate) struct ServerCert {
    ca: Arc<Ca>,
    current: RwLock<(Arc<CertifiedKey>, SystemTime)>,
}

impl ServerCert {
    pub(crate) fn new(ca: Arc<Ca>) -> Result<ServerCert, StartError> {
        let current = Self::issue(&ca)?;
        Ok(ServerCert {
            ca,
            current: RwLock::new(current),
        })
    }

    fn issue(ca: &Ca) -> Result<(Arc<CertifiedKey>, SystemTime), StartError> {
        let (chain, key, not_after) = ca.issue_server()?;
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| StartError::Tls(e.to_string()))?;
        Ok((Arc::new(CertifiedKey::new(chain, signing)), not_after))
    }

    /// Whether a certificate valid until `not_after` should be replaced now.
    pub(crate) fn due(not_after: SystemTime, now: SystemTime) -> bool {
        not_after
            .duration_since(now)
            .map(|left| left < SERVER_CERT_TTL / 3)
            .unwrap_or(true)
    }

    /// Replaces the certificate if it is due. Returns whether it did.
    pub(crate) fn rotate_if_due(&self, now: SystemTime) -> Result<bool, StartError> {
        let not_after = self
            .current
            .read()
            .map(|c| c.1)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        if !Self::due(not_after, now) {
            return Ok(false);
        }
        let next = Self::issue(&self.ca)?;
        if let Ok(mut c) = self.current.write() {
            *c = next;
        }
        Ok(true)
    }

    pub(crate) fn not_after(&self) -> SystemTime {
        self.current
            .read()
            .map(|c| c.1)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.0.clone())
    }
}

/// The jail listener's TLS configuration.
pub(crate) fn server_config(
    ca: &Ca,
    cert: Arc<ServerCert>,
) -> Result<rustls::ServerConfig, StartError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.cert_der().clone())
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No resumption: a resumed session reuses the client certificate of
    // its first handshake without checking it again, so an expired one
    // would go on authenticating for the ticket's life.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

#[cfg(test)]
mod tests;

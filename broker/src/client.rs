//! The client side of the broker's API, used by `lever admin` and `lever
//! agent`: plain HTTP to the loopback admin port, and HTTPS with the broker
//! CA pinned (and a client certificate, once enrolled) to the jail port.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use crate::ca::pem_certs;

/// Largest response body read.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("bad URL {0:?}: {1}")]
    Url(String, String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Target {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, ClientError> {
        let u = lever_policy::config::HttpUrl::parse(url)
            .map_err(|e| ClientError::Url(url.into(), e))?;
        Ok(Target {
            https: u.https,
            host: u.host,
            port: u.port,
        })
    }
}

/// TLS settings for the jail port: the pinned CA and, once enrolled, the
/// client certificate.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls(..)")
    }
}

impl ClientTls {
    /// `ca_pem`: the CA to trust (only it). `identity`: a client
    /// certificate chain and key, both PEM.
    pub fn new(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<ClientTls, ClientError> {
        let mut roots = RootCertStore::empty();
        for c in pem_certs(ca_pem).map_err(ClientError::Tls)? {
            roots.add(c).map_err(|e| ClientError::Tls(e.to_string()))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert_pem, key_pem)) => {
                use rustls::pki_types::pem::PemObject;
                let chain = pem_certs(cert_pem).map_err(ClientError::Tls)?;
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .map_err(|e| ClientError::Tls(format!("client key: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ClientError::Tls(e.to_string()))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }
}

impl ClientTls {
    /// A TLS connector with this configuration.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The broker's `{"error":{"message"}}`, or the body as text.
    pub fn error_message(&self) -> String {
        let v = self.json();
        v["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// Sends one request. `body` is sent as JSON when given.
pub async fn send(
    target: &Target,
    tls: Option<&ClientTls>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) -> Result<Reply, ClientError> {
    let json = body.map(|b| Bytes::from(b.to_string()));
    tokio::time::timeout(
        TIMEOUT,
        send_inner(target, tls, method, path, headers, json, true),
    )
    .await
    .map_err(|_| ClientError::Timeout(TIMEOUT))?
}

/// Like [`send`], with a body of any bytes and only the headers given
/// (no `content-type` of its own).
pub async fn send_bytes(
    target: &Target,
    tls: Option<&ClientTls>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply, ClientError> {
    tokio::time::timeout(
        TIMEOUT,
        send_inner(target, tls, method, path, headers, Some(body), false),
    )
    .await
    .map_err(|_| ClientError::Timeout(TIMEOUT))?
}

async fn send_inner(
    target: &Target,
    tls: Option<&ClientTls>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Bytes>,
    json: bool,
) -> Result<Reply, ClientError> {
    let addr = format!("{}:{}", bracket(&target.host), target.port);
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|e| ClientError::Connect(addr.clone(), e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let has_body = body.is_some();
    let bytes = body.unwrap_or_default();
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.as_str());
    if has_body && json {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    for (k, v) in headers {
        req = req.header(
            *k,
            HeaderValue::from_str(v).map_err(|e| ClientError::Http(e.to_string()))?,
        );
    }
    let req = req
        .body(Full::new(bytes))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    if target.https {
        let tls =
            tls.ok_or_else(|| ClientError::Tls("an https target needs the broker CA".into()))?;
        let name = ServerName::try_from(target.host.clone())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        exchange(TokioIo::new(stream), req).await
    } else {
        exchange(TokioIo::new(tcp), req).await
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

async fn exchange<I>(io: I, req: Request<Full<Bytes>>) -> Result<Reply, ClientError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let (parts, body) = resp.into_parts();
    let body = http_body_util::Limited::new(body, MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    driver.abort();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// A fresh key (ECDSA P-256) and a CSR for it. The CN is a hint only: the
/// broker decides the certificate's identity. Returns (key PEM, CSR PEM).
pub fn key_and_csr(cn_hint: &str) -> Result<(String, String), ClientError> {
    let key = rcgen::KeyPair::generate().map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn_hint);
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    Ok((key.serialize_pem(), csr))
}

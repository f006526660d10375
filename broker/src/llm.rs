//! `/llm/{path}`: the streaming reverse proxy that keeps the real key
//! host-side.
//!
//! Only three API paths are proxied (`v1/messages`, `v1/messages/count_tokens`,
//! `v1/models`), to the configured upstream only. The caller's credentials
//! (its capability token), hop-by-hop and proxy headers are dropped in any
//! letter case: only an allow-list of headers is forwarded, and the real key
//! is added. The response streams back frame by frame: nothing is buffered
//! or coalesced, usage is read from the SSE events on the side, and a
//! client that goes away drops the upstream request with it.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lever_policy::config::{Config, LLM_OP, LLM_TOOL};
use serde::Deserialize;

use crate::audit::{Audit, Record};
use crate::error::{ApiError, StartError};
use crate::server::{Body, BoxError, full};
use crate::stack::Ctx;

/// Largest request body forwarded (images make prompts large).
const MAX_REQUEST: usize = 32 * 1024 * 1024;
/// Request bodies up to this size are peeked at (for the model) in place;
/// larger ones off the jail worker's thread.
const PEEK_INLINE: usize = 256 * 1024;
/// Largest non-streaming response kept aside for reading usage.
const USAGE_PEEK: usize = 1024 * 1024;

/// The proxied API paths and their methods.
const ROUTES: &[(&str, Method)] = &[
    ("v1/messages", Method::POST),
    ("v1/messages/count_tokens", Method::POST),
    ("v1/models", Method::GET),
];

/// Where the real key goes.
static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Request headers forwarded upstream (everything else is dropped).
static FORWARDED: [HeaderName; 5] = [
    HeaderName::from_static("content-type"),
    HeaderName::from_static("accept"),
    HeaderName::from_static("anthropic-version"),
    HeaderName::from_static("anthropic-beta"),
    HeaderName::from_static("user-agent"),
];

/// Response headers never passed back.
static HOP_BY_HOP: [HeaderName; 10] = [
    HeaderName::from_static("connection"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("proxy-authenticate"),
    HeaderName::from_static("proxy-authorization"),
    HeaderName::from_static("te"),
    HeaderName::from_static("trailer"),
    HeaderName::from_static("transfer-encoding"),
    HeaderName::from_static("upgrade"),
    HeaderName::from_static("set-cookie"),
];

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// The upstream: where, with which key, through which pooled client.
pub struct Upstream {
    /// The pooled client, one per jail worker.
    clients: crate::server::PerWorker<HttpsClient>,
    base: String,
    /// The upstream URI of every proxied path, with and without the one
    /// query forwarded: built once, cloned per request (no formatting or
    /// parsing on the hot path).
    uris: Vec<((&'static str, Option<&'static str>), Uri)>,
    key: Option<HeaderValue>,
    key_bytes: Option<Arc<Needle>>,
    /// Time for the upstream to send its response headers.
    header_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds the client (webpki roots plus the configured extra CA; HTTP/1.1
    /// and HTTP/2; pooled; TCP_NODELAY) and reads the key file.
    pub fn new(config: &Config) -> Result<Upstream, StartError> {
        let b = &config.broker;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = &b.upstream_ca_file {
            let pem = std::fs::read_to_string(ca)
                .map_err(|e| StartError::Tls(format!("{}: {e}", ca.display())))?;
            for c in crate::ca::pem_certs(&pem).map_err(StartError::Tls)? {
                roots.add(c).map_err(|e| StartError::Tls(e.to_string()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| StartError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let clients = crate::server::PerWorker::new(|| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(connector.clone())
        });
        let key = match &b.api_key_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    StartError::Config(format!("broker.api_key_file {}: {e}", path.display()))
                })?;
                let k = text.trim().to_owned();
                if k.is_empty() {
                    return Err(StartError::Config("broker.api_key_file is empty".into()));
                }
                Some(k)
            }
            None => None,
        };
        let key_value = match &key {
            Some(k) => {
                let mut v = HeaderValue::from_str(k).map_err(|_| {
                    StartError::Config(
                        "the API key holds characters not allowed in a header".into(),
                    )
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let base = b.upstream.to_string();
        let mut uris = Vec::new();
        for (path, _) in ROUTES {
            for query in [None, Some("beta=true")] {
                let text = match query {
                    None => format!("{base}/{path}"),
                    Some(q) => format!("{base}/{path}?{q}"),
                };
                let uri = text
                    .parse::<Uri>()
                    .map_err(|e| StartError::Config(format!("broker.upstream {base}: {e}")))?;
                uris.push(((*path, query), uri));
            }
        }
        Ok(Upstream {
            clients,
            base,
            uris,
            header_timeout: b.upstream_header_timeout,
            key_bytes: key.map(|k| Arc::new(Needle::new(k.as_bytes()))),
            key: key_value,
        })
    }
}

/// Just the usage of a response (the rest is skipped, not built).
#[derive(Deserialize, Default)]
struct UsageOnly {
    #[serde(default)]
    usage: Usage,
}

#[derive(Deserialize, Default)]
struct Usage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

/// The usage-bearing fields of an SSE event.
#[derive(Deserialize)]
struct SseUsage {
    message: Option<UsageOnly>,
    usage: Option<Usage>,
}

#[derive(Deserialize, Default)]
struct Peek {
    model: Option<String>,
    stream: Option<bool>,
}

/// The capability token of an `/llm` request: `Authorization: Bearer` or
/// `x-api-key`, exactly one value (both only if equal).
///
/// Two different values are taken only when exactly one of them has the
/// shape of a capability token: an agent given a placeholder API key (as
/// Scion gives api-key agents) and its token as a bearer is served, and
/// the placeholder is dropped like any other incoming credential. An
/// `Authorization` of another scheme beside an `x-api-key` is likewise
/// not a credential of ours and is dropped.
fn llm_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let bearer = match crate::jail::bearer_of(headers) {
        Err(ApiError::NoToken) if headers.contains_key("x-api-key") => None,
        other => other?,
    };
    let mut keys = headers.get_all("x-api-key").iter();
    let key = match (keys.next(), keys.next()) {
        (None, _) => None,
        (Some(k), None) => Some(k.to_str().map_err(|_| ApiError::NoToken)?.trim()),
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "more than one x-api-key header".into(),
            ));
        }
    };
    match (bearer, key) {
        (Some(b), Some(k)) if b != k => match (token_shaped(b), token_shaped(k)) {
            (true, false) => Ok(b),
            (false, true) => Ok(k),
            _ => Err(ApiError::BadRequest(
                "conflicting credentials in Authorization and x-api-key".into(),
            )),
        },
        (Some(t), _) | (None, Some(t)) => Ok(t),
        (None, None) => Err(ApiError::NoToken),
    }
}

/// Whether `s` parses as a capability token (not whether it is valid).
fn token_shaped(s: &str) -> bool {
    lever_policy::token::parses(s)
}

/// The API path of an `/llm/...` request, refusing any trick.
fn api_path(req: &Request<Incoming>) -> Result<(&'static str, Query), ApiError> {
    let uri = req.uri();
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Err(ApiError::BadRequest(
            "absolute-form request targets are not accepted".into(),
        ));
    }
    let rest = uri.path().strip_prefix("/llm/").unwrap_or("");
    let Some((path, method)) = ROUTES.iter().find(|(p, _)| *p == rest) else {
        return Err(ApiError::NotFound(format!(
            "/llm/{rest} (proxied: v1/messages, v1/messages/count_tokens, v1/models)"
        )));
    };
    if req.method() != method {
        return Err(ApiError::MethodNotAllowed);
    }
    let query = match uri.query() {
        None | Some("") => Query::None,
        Some("beta=true") => Query::Beta,
        Some(q) if *path == "v1/models" => Query::Paging(paging(q)?),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "only the query `beta=true` is forwarded".into(),
            ));
        }
    };
    Ok((path, query))
}

/// The query of an `/llm` request, as forwarded.
#[derive(Debug, PartialEq, Eq)]
enum Query {
    None,
    /// `beta=true` (Claude Code's).
    Beta,
    /// `v1/models` paging (`limit`, `after_id`, `before_id`, and
    /// `beta=true` beside them), rebuilt from the checked values.
    Paging(String),
}

/// The paging parameters of a `v1/models` query, each at most once and
/// checked (a count; an id of letters, digits, `-`, `_`, `.`), rebuilt in
/// a fixed order: nothing else reaches the upstream.
fn paging(q: &str) -> Result<String, ApiError> {
    let bad = |why: &str| ApiError::BadRequest(format!("v1/models query: {why}"));
    let mut vals: [Option<&str>; 4] = [None; 4];
    for pair in q.split('&') {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| bad("expected key=value"))?;
        let (i, ok) = match k {
            "limit" => (
                0,
                !v.is_empty() && v.len() <= 4 && v.bytes().all(|b| b.is_ascii_digit()),
            ),
            "after_id" | "before_id" => (
                if k == "after_id" { 1 } else { 2 },
                !v.is_empty()
                    && v.len() <= 128
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
            ),
            // Claude Code's marker, beside paging.
            "beta" => (3, v == "true"),
            _ => {
                return Err(bad(
                    "only limit, after_id, before_id and beta=true are forwarded",
                ));
            }
        };
        if !ok {
            return Err(bad(&format!("{k} has an unexpected value")));
        }
        if vals[i].replace(v).is_some() {
            return Err(bad(&format!("{k} given twice")));
        }
    }
    let out: Vec<String> = ["limit", "after_id", "before_id", "beta"]
        .iter()
        .zip(vals)
        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
        .collect();
    Ok(out.join("&"))
}

pub async fn proxy(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let broker = ctx.broker;
    let peer = ctx.peer.clone().ok_or(ApiError::NoClientCert)?;
    let (path, query) = api_path(&req)?;
    let token = llm_token(req.headers())?;
    let no_args = BTreeMap::new();
    let otel = broker.audit.otel.get();
    // The clock is read for the spans alone; the verification's end
    // starts the rate limit's step (`None`: no span, export off or the
    // trace sampled out).
    let mut t = otel.map(|_| std::time::SystemTime::now());
    // Subscribed before the token is judged: a revocation that lands from
    // here on is seen by the call, however far it got.
    let mut revocations = broker.revocations.subscribe();
    let authorized = broker.authorize_token(token, &peer, LLM_TOOL, LLM_OP, &no_args);
    if let (Some(o), Some(start)) = (otel, t) {
        let right = ("lever.right", "llm/generate");
        let step = |a: &[(&str, &str)]| {
            let refused = authorized.as_ref().err().map(|d| d.code());
            o.step(&ctx.trace_ids(o), "verify capability", start, a, refused)
        };
        t = match &authorized {
            Ok(v) => step(&[right, ("lever.token_id", v.token_id.as_str())]),
            Err(_) => step(&[right]),
        };
    }
    let verified = match authorized {
        Ok(v) => v,
        Err(d) => {
            let e = ApiError::from(d);
            ctx.audit_deny(
                Record::new("llm")
                    .deny(e.code())
                    .identity(&peer)
                    .right(LLM_TOOL, LLM_OP)
                    .request(ctx)
                    .detail("path", path)
                    .lane_of(&e),
            )
            .await;
            return Err(e);
        }
    };
    // Limits: after the caller is known, before any body is read.
    let admitted = broker.limits.llm.admit(&peer).and_then(|permit| {
        if let Some(b) = &broker.limits.llm_tokens {
            b.check(&peer)?;
        }
        Ok(permit)
    });
    if let (Some(o), Some(t)) = (otel, t) {
        o.step(
            &ctx.trace_ids(o),
            "rate limit",
            t,
            &[("lever.lane", "llm")],
            admitted.as_ref().err().map(|e| e.code()),
        );
    }
    // The record of a refusal once the token is known.
    let refusal = |code: &str| {
        Record::new("llm")
            .deny(code)
            .identity(&peer)
            .right(LLM_TOOL, LLM_OP)
            .token(verified.token_id.as_str())
            .request(ctx)
    };
    let permit = match admitted {
        Ok(p) => p,
        Err(e) => {
            ctx.audit_deny(refusal(e.code()).detail("message", e.to_string()))
                .await;
            return Err(e);
        }
    };
    let upstream = &broker.upstream;
    let Some(key) = upstream.key.clone() else {
        return Err(ApiError::Forbidden(
            "this instance is in subscription mode: the broker holds no API key".into(),
        ));
    };
    // Only now, with the caller known and its token good, read the body.
    let (parts, body) = req.into_parts();
    let body = crate::stack::read_body(ctx, body, MAX_REQUEST).await?;
    let peek: Peek = if body.is_empty() {
        Peek::default()
    } else if body.len() > PEEK_INLINE {
        // Tens of milliseconds at the cap: through `block_in_place`, so the
        // other connections of this jail worker move to another thread
        // meanwhile instead of waiting on one agent's body.
        crate::blocking(|| serde_json::from_slice(&body).unwrap_or_default())
    } else {
        serde_json::from_slice(&body).unwrap_or_default()
    };

    let uri = match &query {
        Query::Paging(q) => format!("{}/{path}?{q}", upstream.base)
            .parse::<Uri>()
            .map_err(|e| ApiError::Internal(format!("upstream URI for {path}: {e}")))?,
        _ => {
            let beta = (query == Query::Beta).then_some("beta=true");
            let Some((_, uri)) = upstream.uris.iter().find(|(k, _)| *k == (path, beta)) else {
                return Err(ApiError::Internal(format!("no upstream URI for {path}")));
            };
            uri.clone()
        }
    };
    let mut out = Request::builder().method(parts.method.clone()).uri(uri);
    if let Some(h) = out.headers_mut() {
        for name in &FORWARDED {
            for v in parts.headers.get_all(name) {
                h.append(name.clone(), v.clone());
            }
        }
        for (name, v) in &parts.headers {
            if name.as_str().starts_with("x-stainless-") {
                h.append(name.clone(), v.clone());
            }
        }
        h.insert(X_API_KEY.clone(), key);
    }
    let out = out
        .body(full(body))
        .map_err(|e| ApiError::Internal(format!("building the upstream request: {e}")))?;

    let started = Instant::now();
    let wall = otel.map(|_| std::time::SystemTime::now());
    // A revocation or an epoch bump while the body came in, or while the
    // upstream thinks: if this token no longer stands, the call is refused
    // (and the upstream request dropped). Checked before the request
    // starts, and first on every wake-up, so a revoked token never sends
    // the key upstream.
    let sent = tokio::time::timeout(upstream.header_timeout, upstream.clients.get().request(out));
    let sent = tokio::select! {
        biased;
        d = broker.revoked(&mut revocations, &verified, &peer) => Err(d),
        r = sent => Ok(r),
    };
    let sent = match sent {
        Ok(r) => r,
        Err(d) => {
            ctx.audit_deny(
                refusal(d.code())
                    .detail("path", path)
                    .detail("outcome", "revoked"),
            )
            .await;
            return Err(ApiError::Token(d));
        }
    };
    let resp = match sent {
        Err(_) => {
            return Err(upstream_failure(
                ctx,
                &peer,
                path,
                StatusCode::GATEWAY_TIMEOUT,
                "the upstream did not answer in time",
            )
            .await);
        }
        Ok(Err(e)) => {
            let why = format!("the upstream is unreachable ({})", error_chain(&e));
            return Err(upstream_failure(ctx, &peer, path, StatusCode::BAD_GATEWAY, &why).await);
        }
        Ok(Ok(r)) => r,
    };
    let latency = started.elapsed();
    broker
        .stats
        .observe("lever_llm_upstream_latency_seconds", &[], latency);
    let (mut head, upstream_body) = resp.into_parts();
    crate::server::strip_connection_nominated(&mut head.headers);
    for h in &HOP_BY_HOP {
        head.headers.remove(h);
    }
    if let Some(k) = &upstream.key_bytes {
        let leaked: Vec<HeaderName> = head
            .headers
            .iter()
            .filter(|(_, v)| k.within(v.as_bytes()))
            .map(|(n, _)| n.clone())
            .collect();
        for n in leaked {
            head.headers.remove(n);
        }
    }
    let sse = head
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    broker
        .stats
        .open_streams
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let model = peek.model.unwrap_or_default();
    let meter = Meter {
        audit: broker.audit.clone(),
        stats: broker.stats.clone(),
        status: head.status,
        otel: otel
            .zip(wall)
            .map(|(o, wall)| (o.clone(), ctx.trace_ids(o), wall)),
        model: model.clone(),
        record: Some(
            Record::new("llm")
                .allow()
                .identity(&peer)
                .right(LLM_TOOL, LLM_OP)
                .token(verified.token_id.as_str())
                .request(ctx)
                .detail("path", path)
                .detail("model", model)
                .detail("stream", peek.stream.unwrap_or(false))
                .detail("status", head.status.as_u16())
                .detail("upstream_latency_ms", latency.as_secs_f64() * 1000.0),
        ),
        started,
        first_byte: None,
        bytes: 0,
        sse,
        line: Vec::new(),
        peek: Vec::new(),
        input_tokens: None,
        output_tokens: None,
        scan: upstream.key_bytes.clone().map(KeyScan::new),
        failed: None,
        budget: broker.limits.llm_tokens.clone().map(|b| (b, peer.clone())),
        permit: Some(permit),
        ended: None,
    };
    let body = Metered {
        inner: upstream_body,
        meter: Some(Box::new(meter)),
        standing: Some(Box::new(Standing {
            broker: Arc::clone(ctx.broker),
            verified,
            peer,
            seen: revocations,
            wake: None,
        })),
    };
    Ok(Response::from_parts(head, body.boxed()))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

async fn upstream_failure(
    ctx: &Ctx<'_>,
    peer: &str,
    path: &str,
    status: StatusCode,
    why: &str,
) -> ApiError {
    ctx.audit_deny(
        Record::new("llm")
            .deny("upstream_error")
            .identity(peer)
            .right(LLM_TOOL, LLM_OP)
            .request(ctx)
            .detail("path", path)
            .detail("status", status.as_u16())
            .detail("message", why.to_owned()),
    )
    .await;
    ApiError::Upstream(status, why.to_owned())
}

/// Bytes looked for in what passes (the real key, `usage`), with their
/// searcher built once rather than for every header and frame.
pub(crate) struct Needle(memchr::memmem::Finder<'static>);

impl Needle {
    pub(crate) fn new(bytes: &[u8]) -> Needle {
        Needle(memchr::memmem::Finder::new(bytes).into_owned())
    }

    fn len(&self) -> usize {
        self.0.needle().len()
    }

    /// Whether the bytes occur in `hay` (never, for empty bytes).
    fn within(&self, hay: &[u8]) -> bool {
        self.len() > 0 && self.0.find(hay).is_some()
    }
}

static USAGE: std::sync::LazyLock<Needle> = std::sync::LazyLock::new(|| Needle::new(b"usage"));

/// Looks for the real key in a body that arrives in frames, including an
/// occurrence split across frames.
struct KeyScan {
    key: Arc<Needle>,
    /// The last `key.len() - 1` bytes seen.
    tail: Vec<u8>,
}

impl KeyScan {
    fn new(key: Arc<Needle>) -> KeyScan {
        KeyScan {
            key,
            tail: Vec::new(),
        }
    }

    /// Whether the key ends in `chunk`.
    fn leaks(&mut self, chunk: &[u8]) -> bool {
        let keep = self.key.len().saturating_sub(1);
        // Across the seam: the previous tail and the chunk's first bytes.
        if !self.tail.is_empty() {
            let head = &chunk[..chunk.len().min(keep)];
            let mut seam = Vec::with_capacity(self.tail.len() + head.len());
            seam.extend_from_slice(&self.tail);
            seam.extend_from_slice(head);
            if self.key.within(&seam) {
                return true;
            }
        }
        if self.key.within(chunk) {
            return true;
        }
        if chunk.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - keep..]);
        } else {
            self.tail.extend_from_slice(chunk);
            let excess = self.tail.len().saturating_sub(keep);
            self.tail.drain(..excess);
        }
        false
    }
}

/// What is measured while a response streams, recorded when it ends.
struct Meter {
    audit: Audit,
    stats: Arc<crate::metrics::Metrics>,
    /// The upstream's status.
    status: StatusCode,
    /// Telemetry: the exporter, the request's trace ids and when the call
    /// began.
    otel: Option<(crate::otel::Otel, crate::otel::Ids, std::time::SystemTime)>,
    model: String,
    record: Option<Record>,
    started: Instant,
    first_byte: Option<Duration>,
    bytes: u64,
    sse: bool,
    /// The current, incomplete SSE line.
    line: Vec<u8>,
    /// A non-streaming body, kept (up to a cap) to read its usage.
    peek: Vec<u8>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    /// Makes sure no response carries the real key.
    scan: Option<KeyScan>,
    failed: Option<String>,
    /// Where the tokens this call used are counted.
    budget: Option<(Arc<crate::limits::Budget>, String)>,
    /// Held while the response streams: the agent's in-flight slot.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// When the call ended (and, with telemetry, the wall clock then),
    /// read when it settles: the record and span say when it ended, not
    /// when they were made.
    ended: Option<(Instant, Option<std::time::SystemTime>)>,
}

impl Meter {
    fn observe(&mut self, chunk: &[u8]) {
        if self.first_byte.is_none() {
            self.first_byte = Some(self.started.elapsed());
        }
        self.bytes += chunk.len() as u64;
        if self.sse {
            for &b in chunk {
                if b == b'\n' {
                    let line = std::mem::take(&mut self.line);
                    self.sse_line(&line);
                } else if self.line.len() < 64 * 1024 {
                    self.line.push(b);
                }
            }
        } else if self.peek.len() < USAGE_PEEK {
            self.peek
                .extend_from_slice(&chunk[..chunk.len().min(USAGE_PEEK - self.peek.len())]);
        }
    }

    fn sse_line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if !USAGE.within(data) {
            return;
        }
        // `message_start` carries message.usage.input_tokens;
        // `message_delta` carries the cumulative usage.output_tokens.
        let Ok(v) = serde_json::from_slice::<SseUsage>(data) else {
            return;
        };
        if let Some(n) = v.message.and_then(|m| m.usage.input_tokens) {
            self.input_tokens = Some(n);
        }
        if let Some(n) = v.usage.and_then(|u| u.output_tokens) {
            self.output_tokens = Some(n);
        }
    }

    /// The upstream call's client span (gen_ai conventions), a child of
    /// the request's span; it lasts until the last byte.
    fn span(
        &self,
        o: &crate::otel::Otel,
        ids: &crate::otel::Ids,
        start: std::time::SystemTime,
        completed: bool,
    ) {
        use crate::otel::Val;
        let name = ["chat ", self.model.as_str()];
        let Some(mut sp) = o.span(ids, Some("llm"), &name, crate::otel::CLIENT, start) else {
            return;
        };
        sp.str("gen_ai.operation.name", "chat")
            .str("gen_ai.provider.name", "anthropic")
            .str("gen_ai.request.model", &self.model)
            .int("http.response.status_code", i64::from(self.status.as_u16()))
            .attr("lever.completed", Val::Bool(completed));
        if let Some(n) = self.input_tokens {
            sp.int("gen_ai.usage.input_tokens", n as i64);
        }
        if let Some(n) = self.output_tokens {
            sp.int("gen_ai.usage.output_tokens", n as i64);
        }
        if let Some(t) = self.first_byte {
            sp.attr("lever.ttfb_ms", Val::Double(t.as_secs_f64() * 1000.0));
        }
        let failed = !completed || self.status.as_u16() >= 500;
        let error = failed.then(|| self.failed.as_deref().unwrap_or(""));
        match self.ended.and_then(|(_, wall)| wall) {
            Some(at) => sp.end_at(error, at),
            None => sp.end(error),
        };
    }

    /// What the agent's next call must find done the moment this one's
    /// last byte leaves: its in-flight slot given back and, under a token
    /// budget, the tokens counted. The rest of the accounting waits for
    /// [`Meter::finish`]. Runs once (the permit is taken).
    fn settle(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let wall = self.otel.is_some().then(std::time::SystemTime::now);
        self.ended = Some((Instant::now(), wall));
        self.stats
            .open_streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if self.budget.is_some() {
            self.read_usage();
        }
        if let Some((budget, agent)) = &self.budget {
            budget.spend(
                agent,
                self.input_tokens.unwrap_or(0) + self.output_tokens.unwrap_or(0),
            );
        }
        drop(permit);
    }

    /// The usage of a non-streaming answer, from its kept body (once).
    fn read_usage(&mut self) {
        let peek = std::mem::take(&mut self.peek);
        if !self.sse
            && !peek.is_empty()
            && let Ok(v) = serde_json::from_slice::<UsageOnly>(&peek)
        {
            self.input_tokens = v.usage.input_tokens.or(self.input_tokens);
            self.output_tokens = v.usage.output_tokens.or(self.output_tokens);
        }
    }

    /// The call's audit record, metrics and span.
    fn finish(&mut self, completed: bool) {
        let Some(mut rec) = self.record.take() else {
            return;
        };
        self.settle();
        self.read_usage();
        let stats = &self.stats;
        rec = rec
            .detail("bytes", self.bytes)
            .detail("ttfb_ms", self.first_byte.map(|d| d.as_secs_f64() * 1000.0))
            .detail(
                "duration_ms",
                self.ended
                    .map_or_else(Instant::now, |(at, _)| at)
                    .saturating_duration_since(self.started)
                    .as_secs_f64()
                    * 1000.0,
            )
            .detail("input_tokens", self.input_tokens)
            .detail("output_tokens", self.output_tokens)
            .detail("completed", completed);
        if let Some(f) = self.failed.take() {
            rec = rec.detail("failure", f);
        }
        stats.inc(
            "lever_llm_calls_total",
            &[
                ("status", self.status.as_str()),
                ("completed", if completed { "true" } else { "false" }),
            ],
            1,
        );
        for (kind, n) in [("input", self.input_tokens), ("output", self.output_tokens)] {
            if let Some(n) = n {
                stats.inc("lever_llm_tokens_total", &[("kind", kind)], n);
            }
        }
        if let Some(t) = self.first_byte {
            stats.observe("lever_llm_ttfb_seconds", &[], t);
        }
        if let Some((o, ids, start)) = &self.otel {
            self.span(o, ids, *start, completed);
        }
        self.audit.log_now(rec);
    }
}

/// A call's accounting once its body has ended: settled at once, and the
/// rest ([`Meter::finish`]: the audit record, metrics, span) left until
/// its jail worker is about to sleep ([`finish_ended`]), by which time the
/// response is out. Done in place, it came before the last bytes were
/// flushed (hyper drops a body it has read to its end before it flushes),
/// so every response waited for its own record and the audit writer's
/// wake-up. However it goes, it finishes when dropped: the record is never
/// lost.
struct Ending {
    meter: Option<Box<Meter>>,
    completed: bool,
}

/// Ended calls a busy worker holds before it finishes them anyway.
const ENDED_MAX: usize = 32;

thread_local! {
    /// The calls ended on this thread and not finished yet.
    static ENDED: std::cell::RefCell<Vec<Ending>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Whether this thread is a jail worker that has slept before (and so
    /// will again, calling [`finish_ended`]).
    static SLEEPS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// When the oldest call in `ENDED` ended.
    static ENDED_SINCE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// How long a busy worker holds an ended call at most (a worker with
/// deferred tasks checks its events without ever parking).
const ENDED_WAIT: Duration = Duration::from_millis(50);

impl Ending {
    fn start(mut meter: Box<Meter>, completed: bool) {
        meter.settle();
        let e = Ending {
            meter: Some(meter),
            completed,
        };
        if !SLEEPS.with(std::cell::Cell::get) {
            return drop(e);
        }
        ENDED.with(|v| match v.try_borrow_mut() {
            Ok(mut v) => {
                let due = match ENDED_SINCE.get() {
                    Some(t) => t.elapsed() >= ENDED_WAIT,
                    None => {
                        ENDED_SINCE.set(Some(Instant::now()));
                        false
                    }
                };
                v.push(e);
                if due || v.len() >= ENDED_MAX {
                    // Finishing touches no `ENDED`: no borrow is re-entered.
                    ENDED_SINCE.set(None);
                    v.clear();
                }
            }
            Err(_) => drop(e),
        });
    }
}

/// Finishes the calls that ended on this thread: a jail worker calls it
/// each time it runs out of work, before it sleeps, and as it stops. A
/// task per call instead cost about 3,000 instructions a request (spawn,
/// schedule, free); this costs a push.
pub(crate) fn finish_ended() {
    SLEEPS.with(|s| s.set(true));
    finish_here();
}

/// [`finish_ended`] for a thread that stops: what ends after this
/// finishes in place.
pub(crate) fn finish_ended_and_stop() {
    SLEEPS.with(|s| s.set(false));
    finish_here();
}

fn finish_here() {
    ENDED_SINCE.set(None);
    ENDED.with(|v| {
        if let Ok(mut v) = v.try_borrow_mut() {
            v.clear();
        }
    });
}

impl Drop for Ending {
    fn drop(&mut self) {
        if let Some(mut m) = self.meter.take() {
            m.finish(self.completed);
        }
    }
}

/// The upstream body, passed on frame by frame while being measured; the
/// meter is taken when the body ends (which it does once).
struct Metered {
    inner: Incoming,
    meter: Option<Box<Meter>>,
    /// The token the call was authorized with, re-checked whenever a
    /// revocation or an epoch bump lands while the response is open.
    standing: Option<Box<Standing>>,
}

/// A call's token, watched for revocations while its response streams.
struct Standing {
    broker: Arc<crate::Broker>,
    verified: Arc<lever_policy::token::Verified>,
    peer: String,
    /// The revocations this call has already judged itself against.
    seen: tokio::sync::watch::Receiver<u64>,
    /// Wakes the response when the next revocation lands, made when the
    /// upstream first keeps it waiting.
    wake: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>>,
}

impl Standing {
    /// If a revocation landed since the last look: whether the token
    /// still stands (one atomic read when none did). A waker made before
    /// this look may fire for what it judged: `watch` takes that in stride.
    fn recheck(&mut self) -> Option<lever_policy::token::Denial> {
        self.broker
            .recheck(&mut self.seen, &self.verified, &self.peer)
    }

    /// Has `cx` woken when the next revocation lands; if one just did,
    /// re-checks.
    fn watch(&mut self, cx: &mut Context<'_>) -> Option<lever_policy::token::Denial> {
        // Until the waker is set: each pass that finds a revocation landed
        // judges it and moves `seen` up to it, so this ends.
        loop {
            let seen = &self.seen;
            let wake = self.wake.get_or_insert_with(|| {
                let mut next = seen.clone();
                Box::pin(async move {
                    if next.changed().await.is_err() {
                        // The broker is going away: nothing more to watch.
                        std::future::pending::<()>().await;
                    }
                })
            });
            if wake.as_mut().poll(cx).is_pending() {
                return None;
            }
            self.wake = None;
            if let Some(d) = self.recheck() {
                return Some(d);
            }
        }
    }
}

impl Metered {
    /// Ends the call: `failed` says why, if it did not complete.
    fn end(&mut self, failed: Option<String>) {
        if let Some(mut m) = self.meter.take() {
            let completed = failed.is_none();
            if failed.is_some() {
                m.failed = failed;
            }
            Ending::start(m, completed);
        }
    }
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn is_end_stream(&self) -> bool {
        self.meter.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(meter) = this.meter.as_mut() else {
            return Poll::Ready(None);
        };
        let sse = meter.sse;
        if let Some(d) = this.standing.as_mut().and_then(|s| s.recheck()) {
            return this.cut(&d, sse);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => match this.standing.as_mut().and_then(|s| s.watch(cx)) {
                Some(d) => this.cut(&d, sse),
                None => Poll::Pending,
            },
            Poll::Ready(None) => {
                this.end(None);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                let Some(data) = frame.data_ref() else {
                    // Trailers are not forwarded.
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::new()))));
                };
                if meter.scan.as_mut().is_some_and(|s| s.leaks(data)) {
                    this.end(Some(
                        "the upstream response contained the API key; stream cut".into(),
                    ));
                    if sse {
                        return Poll::Ready(Some(Ok(Frame::data(sse_error(
                            "the upstream response was withheld",
                        )))));
                    }
                    return Poll::Ready(Some(Err("response withheld".into())));
                }
                let data = data.clone();
                meter.observe(&data);
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(Some(format!("upstream stream failed: {e}")));
                if sse {
                    // Tell an SSE client in its own protocol, then end.
                    Poll::Ready(Some(Ok(Frame::data(sse_error(
                        "the upstream connection was lost mid-stream",
                    )))))
                } else {
                    Poll::Ready(Some(Err(e.into())))
                }
            }
        }
    }
}

impl Metered {
    /// Ends a response whose token stopped standing: an SSE client is told
    /// in its own protocol, any other sees the body cut.
    fn cut(
        &mut self,
        d: &lever_policy::token::Denial,
        sse: bool,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.end(Some(format!(
            "the capability token stopped standing while the response was open ({})",
            d.code()
        )));
        self.standing = None;
        if sse {
            Poll::Ready(Some(Ok(Frame::data(sse_error_of(
                "authentication_error",
                &format!("capability token refused: {d}"),
            )))))
        } else {
            Poll::Ready(Some(Err(format!("capability token refused: {d}").into())))
        }
    }
}

/// An SSE `error` event in the Anthropic shape.
fn sse_error(message: &str) -> Bytes {
    sse_error_of("api_error", message)
}

/// An SSE `error` event of Anthropic's error type `kind`. It may follow a
/// frame that ended inside an event (or a line): the blank lines first end
/// whatever the upstream left open, so the error is an event of its own
/// (a blank line with no event pending is ignored by SSE clients).
fn sse_error_of(kind: &str, message: &str) -> Bytes {
    let ev = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
    Bytes::from(format!("\n\nevent: error\ndata: {ev}\n\n"))
}

impl Drop for Metered {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            // A sized body that was written out in full.
            self.end(None);
        } else {
            // The client went away: the upstream request is dropped with us.
            self.end(Some(
                "the client went away; upstream request cancelled".into(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{KeyScan, Needle};

    const KEY: &[u8] = b"sk-ant-real-0123456789";

    fn body() -> Vec<u8> {
        let mut b = b"data: {\"text\": \"".to_vec();
        b.extend_from_slice(KEY);
        b.extend_from_slice(b"\"}\n\n");
        b
    }

    #[test]
    fn finds_the_key_split_anywhere_across_frames() {
        let body = body();
        // Two frames, split at every position.
        for cut in 0..=body.len() {
            let mut s = KeyScan::new(std::sync::Arc::new(Needle::new(KEY)));
            let found = s.leaks(&body[..cut]) || s.leaks(&body[cut..]);
            assert!(found, "missed with a cut at {cut}");
        }
        // One byte per frame.
        let mut s = KeyScan::new(std::sync::Arc::new(Needle::new(KEY)));
        assert!(body.iter().any(|b| s.leaks(std::slice::from_ref(b))));
        // Three frames around the key.
        let at = body.len() - KEY.len() - 4;
        for a in at..at + KEY.len() {
            for b in a..at + KEY.len() + 1 {
                let mut s = KeyScan::new(std::sync::Arc::new(Needle::new(KEY)));
                let found = s.leaks(&body[..a]) || s.leaks(&body[a..b]) || s.leaks(&body[b..]);
                assert!(found, "missed with cuts at {a} and {b}");
            }
        }
    }

    #[test]
    fn a_body_without_the_key_passes_whatever_its_framing() {
        // All but the key's last byte, then something else.
        let mut body = body();
        let i = body.windows(KEY.len()).position(|w| w == KEY).unwrap_or(0);
        body[i + KEY.len() - 1] = b'X';
        for cut in 0..=body.len() {
            let mut s = KeyScan::new(std::sync::Arc::new(Needle::new(KEY)));
            assert!(
                !s.leaks(&body[..cut]) && !s.leaks(&body[cut..]),
                "cut {cut}"
            );
        }
    }
}

//! OpenTelemetry export over OTLP/HTTP (protobuf): every audit record as a
//! log record, and spans for requests, LLM upstream calls and tool calls.
//!
//! Export is off the hot path: items go into a bounded queue with
//! `try_send` (a full queue drops the item and counts it, never waits), and
//! one task batches them (up to 512, or every second) and posts them with a
//! deadline. A slow or dead collector costs requests nothing; what could
//! not be delivered is counted in `lever_otel_dropped_total`. The local
//! `audit.jsonl` stays the system of record (`lever audit export` replays it).
//!
//! What is exported is what the audit trail holds (identities, token ids,
//! rights, constraint values, argument digests, decisions) plus timings:
//! never prompts, completions, keys, tokens, tickets or raw tool arguments.
//! Trace and span ids are derived from the instance tag and the request id,
//! so a request's logs and spans correlate without passing ids around.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::Notify;

/// The OTLP messages Lever sends (a subset of opentelemetry-proto v1, with
/// the same field numbers).
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(oneof = "any_value::Value", tags = "1, 2, 3, 4")]
        pub value: Option<any_value::Value>,
    }
    pub mod any_value {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(string, tag = "1")]
            StringValue(String),
            #[prost(bool, tag = "2")]
            BoolValue(bool),
            #[prost(int64, tag = "3")]
            IntValue(i64),
            #[prost(double, tag = "4")]
            DoubleValue(f64),
        }
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub version: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LogRecord {
        #[prost(fixed64, tag = "1")]
        pub time_unix_nano: u64,
        #[prost(int32, tag = "2")]
        pub severity_number: i32,
        #[prost(string, tag = "3")]
        pub severity_text: String,
        #[prost(message, optional, tag = "5")]
        pub body: Option<AnyValue>,
        #[prost(message, repeated, tag = "6")]
        pub attributes: Vec<KeyValue>,
        #[prost(bytes = "vec", tag = "9")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "10")]
        pub span_id: Vec<u8>,
        #[prost(fixed64, tag = "11")]
        pub observed_time_unix_nano: u64,
        #[prost(string, tag = "12")]
        pub event_name: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeLogs {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub log_records: Vec<LogRecord>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceLogs {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_logs: Vec<ScopeLogs>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportLogsServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_logs: Vec<ResourceLogs>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(int32, tag = "3")]
        pub code: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
        #[prost(int32, tag = "6")]
        pub kind: i32,
        #[prost(fixed64, tag = "7")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
        #[prost(message, optional, tag = "15")]
        pub status: Option<Status>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportTraceServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NumberDataPoint {
        #[prost(fixed64, tag = "2")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "3")]
        pub time_unix_nano: u64,
        #[prost(double, tag = "4")]
        pub as_double: f64,
        #[prost(message, repeated, tag = "7")]
        pub attributes: Vec<KeyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HistogramDataPoint {
        #[prost(fixed64, tag = "2")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "3")]
        pub time_unix_nano: u64,
        #[prost(fixed64, tag = "4")]
        pub count: u64,
        #[prost(double, optional, tag = "5")]
        pub sum: Option<f64>,
        #[prost(fixed64, repeated, tag = "6")]
        pub bucket_counts: Vec<u64>,
        #[prost(double, repeated, tag = "7")]
        pub explicit_bounds: Vec<f64>,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Gauge {
        #[prost(message, repeated, tag = "1")]
        pub data_points: Vec<NumberDataPoint>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sum {
        #[prost(message, repeated, tag = "1")]
        pub data_points: Vec<NumberDataPoint>,
        #[prost(int32, tag = "2")]
        pub aggregation_temporality: i32,
        #[prost(bool, tag = "3")]
        pub is_monotonic: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Histogram {
        #[prost(message, repeated, tag = "1")]
        pub data_points: Vec<HistogramDataPoint>,
        #[prost(int32, tag = "2")]
        pub aggregation_temporality: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Metric {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub description: String,
        #[prost(string, tag = "3")]
        pub unit: String,
        #[prost(oneof = "metric::Data", tags = "5, 7, 9")]
        pub data: Option<metric::Data>,
    }
    pub mod metric {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Data {
            #[prost(message, tag = "5")]
            Gauge(super::Gauge),
            #[prost(message, tag = "7")]
            Sum(super::Sum),
            #[prost(message, tag = "9")]
            Histogram(super::Histogram),
        }
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeMetrics {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub metrics: Vec<Metric>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceMetrics {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_metrics: Vec<ScopeMetrics>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportMetricsServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_metrics: Vec<ResourceMetrics>,
    }
}

pub use proto::any_value::Value as V;

/// An attribute value.
pub fn kv(key: &str, v: V) -> proto::KeyValue {
    proto::KeyValue {
        key: key.to_owned(),
        value: Some(proto::AnyValue { value: Some(v) }),
    }
}

pub fn s(v: impl Into<String>) -> V {
    V::StringValue(v.into())
}

impl Otel {
    /// Records an internal step of request `rid` (token verification, a
    /// rate limit) as a child of the request's span.
    pub fn step(
        &self,
        rid: &str,
        name: &'static str,
        start: SystemTime,
        mut attributes: Vec<proto::KeyValue>,
        refused: Option<&str>,
    ) {
        let (trace_id, parent) = ids(&self.tag, rid);
        attributes.push(kv(
            "lever.decision",
            s(if refused.is_some() { "deny" } else { "allow" }),
        ));
        if let Some(r) = refused {
            attributes.push(kv("lever.deny_reason", s(r)));
        }
        self.send(Item::Span(proto::Span {
            span_id: child_id(&parent, name),
            trace_id,
            parent_span_id: parent,
            name: name.to_owned(),
            kind: INTERNAL,
            start_time_unix_nano: nanos(start),
            end_time_unix_nano: now_nanos(),
            attributes,
            status: refused.map(|r| proto::Status {
                message: r.to_owned(),
                code: 2,
            }),
        }));
    }
}

/// OTLP span kinds.
pub const SERVER: i32 = 2;
pub const CLIENT: i32 = 3;
pub const INTERNAL: i32 = 1;

/// What goes to the collector.
#[derive(Debug)]
pub enum Item {
    Log(proto::LogRecord),
    Span(proto::Span),
    /// A snapshot of every metric (sent as one export).
    Metrics(Vec<proto::Metric>),
}

const QUEUE: usize = 8192;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const DEADLINE: Duration = Duration::from_secs(5);

/// The export side: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct Otel {
    queue: Arc<Queue>,
    pub counters: Arc<Counters>,
    tag: Arc<str>,
    /// The share of requests whose spans are kept (1.0: all), from
    /// `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`. Log records are
    /// never sampled: they are the audit trail.
    ratio: f64,
}

/// The trace sampling ratio the standard variables ask for. Incoming trace
/// context is never read, so the `parentbased_*` samplers act as their
/// root samplers.
pub fn sampling_ratio(env: &dyn Fn(&str) -> Option<String>) -> f64 {
    let arg = env("OTEL_TRACES_SAMPLER_ARG")
        .and_then(|a| a.trim().parse::<f64>().ok())
        .filter(|r| (0.0..=1.0).contains(r))
        .unwrap_or(1.0);
    match env("OTEL_TRACES_SAMPLER").as_deref().map(str::trim) {
        Some("always_off" | "parentbased_always_off") => 0.0,
        Some("traceidratio" | "parentbased_traceidratio") => arg,
        _ => 1.0,
    }
}

/// Whether a trace is kept at `ratio`: decided by its id alone, so every
/// span of one request gets the same answer.
fn kept(trace_id: &[u8], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(trace_id.iter().skip(8)) {
        *d = *s;
    }
    (u64::from_be_bytes(b) as f64) < ratio * (u64::MAX as f64)
}

/// Items waiting for the exporter. Senders append under a short lock and
/// wake the exporter only when a batch is full: not one wake-up per item.
#[derive(Debug, Default)]
struct Queue {
    items: std::sync::Mutex<Vec<Item>>,
    full: Notify,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
}

/// Where and as whom to export: the config first, then the standard
/// `OTEL_*` variables.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: String,
    /// OTLP/gRPC instead of OTLP/HTTP.
    pub grpc: bool,
    pub service_name: String,
    pub resource: Vec<(String, String)>,
}

impl Target {
    pub fn resolve(
        endpoint: Option<String>,
        service_name: Option<String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<Target> {
        let endpoint = endpoint.or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
        let service_name = service_name
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| "lever-broker".to_owned());
        let resource = env("OTEL_RESOURCE_ATTRIBUTES")
            .map(|v| {
                v.split(',')
                    .filter_map(|p| p.split_once('='))
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .filter(|(k, _)| !k.is_empty() && k != "service.name")
                    .collect()
            })
            .unwrap_or_default();
        Some(Target {
            grpc: false,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            service_name,
            resource,
        })
    }
}

pub fn now_nanos() -> u64 {
    nanos(SystemTime::now())
}

pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The trace and span id of request `request_id` on instance `tag`.
pub fn ids(tag: &str, request_id: &str) -> (Vec<u8>, Vec<u8>) {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(tag.as_bytes());
    ctx.update(b"/");
    ctx.update(request_id.as_bytes());
    let d = ctx.finish();
    let b = d.as_ref();
    (b[..16].to_vec(), b[16..24].to_vec())
}

/// A child span id under a request's span `parent`: the parent id mixed
/// with the child's name (FNV-1a), so each named step has its own stable id.
pub fn child_id(parent: &[u8], name: &str) -> Vec<u8> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    parent
        .iter()
        .zip(h.to_be_bytes())
        .map(|(a, b)| a ^ b)
        .collect()
}

impl Otel {
    /// Starts the exporter task, and a task that snapshots `metrics` every
    /// `OTEL_METRIC_EXPORT_INTERVAL` milliseconds (default 60 s).
    pub fn start(target: Target, tag: &str, metrics: Arc<crate::metrics::Metrics>) -> Otel {
        let queue = Arc::new(Queue::default());
        let counters = Arc::new(Counters::default());
        tokio::spawn(export(target, queue.clone(), counters.clone()));
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let o = Otel {
            queue,
            counters,
            tag: tag.into(),
            ratio: sampling_ratio(&env),
        };
        let every = std::env::var("OTEL_METRIC_EXPORT_INTERVAL")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| *ms >= 100)
            .map_or(Duration::from_secs(60), Duration::from_millis);
        let sender = o.clone();
        let since = now_nanos();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                sender.send(Item::Metrics(metrics.otlp(since)));
            }
        });
        o
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Queues an item, or counts it dropped when the queue is full.
    pub fn send(&self, item: Item) {
        if let Item::Span(sp) = &item
            && !kept(&sp.trace_id, self.ratio)
        {
            return;
        }
        let len = match self.queue.items.lock() {
            Ok(mut q) if q.len() < QUEUE => {
                q.push(item);
                q.len()
            }
            _ => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if len == BATCH {
            self.queue.full.notify_one();
        }
    }

    /// An audit record as a log record.
    pub fn audit(&self, view: &AuditView<'_>) {
        self.send(Item::Log(log_from(view, &self.tag)));
    }
}

/// The fields of one audit line, borrowed (from the writer's record, or
/// from a line read back for `lever audit export`).
#[derive(Debug)]
pub struct AuditView<'a> {
    pub seq: Option<u64>,
    pub time: Option<SystemTime>,
    pub event: &'a str,
    pub request_id: Option<&'a str>,
    pub identity: Option<&'a str>,
    pub tool: Option<&'a str>,
    pub op: Option<&'a str>,
    pub constraints: Option<&'a std::collections::BTreeMap<String, String>>,
    pub decision: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub token_id: Option<&'a str>,
    pub detail: Option<&'a serde_json::Map<String, Value>>,
    pub prev: Option<&'a str>,
}

/// An audit line read back, as an OTLP log record.
pub fn log_record(line: &Value, tag: &str) -> proto::LogRecord {
    let constraints: Option<std::collections::BTreeMap<String, String>> =
        line["constraints"].as_object().map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                    )
                })
                .collect()
        });
    let view = AuditView {
        seq: line["seq"].as_u64(),
        time: line["time"]
            .as_str()
            .and_then(lever_policy::timefmt::parse_rfc3339),
        event: line["event"].as_str().unwrap_or("record"),
        request_id: line["request_id"].as_str(),
        identity: line["identity"].as_str(),
        tool: line["tool"].as_str(),
        op: line["op"].as_str(),
        constraints: constraints.as_ref(),
        decision: line["decision"].as_str(),
        reason: line["reason"].as_str(),
        token_id: line["token_id"].as_str(),
        detail: line["detail"].as_object(),
        prev: line["prev"].as_str(),
    };
    log_from(&view, tag)
}

/// An audit record as an OTLP log record: every field an attribute
/// (`lever.*`, `detail` as `lever.detail.*`, constraints as
/// `lever.constraint.*`), correlated to its request's span when the
/// instance tag is known (not on replay).
pub fn log_from(v: &AuditView<'_>, tag: &str) -> proto::LogRecord {
    let mut attrs = Vec::with_capacity(12 + v.detail.map_or(0, |d| d.len()));
    if let Some(n) = v.seq {
        attrs.push(kv("lever.seq", V::IntValue(n as i64)));
    }
    attrs.push(kv("lever.event", s(v.event)));
    for (k, x) in [
        ("lever.request_id", v.request_id),
        ("lever.identity", v.identity),
        ("lever.tool", v.tool),
        ("lever.op", v.op),
        ("lever.decision", v.decision),
        ("lever.reason", v.reason),
        ("lever.token_id", v.token_id),
        ("lever.prev", v.prev),
    ] {
        if let Some(x) = x {
            attrs.push(kv(k, s(x)));
        }
    }
    for (k, x) in v.constraints.into_iter().flatten() {
        attrs.push(kv(&format!("lever.constraint.{k}"), s(x.clone())));
    }
    for (k, x) in v.detail.into_iter().flatten() {
        if let Some(val) = any(x) {
            attrs.push(kv(&format!("lever.detail.{k}"), val));
        }
    }
    let deny = v.decision == Some("deny");
    let (trace_id, span_id) = match v.request_id {
        Some(r) if !tag.is_empty() => ids(tag, r),
        _ => (Vec::new(), Vec::new()),
    };
    proto::LogRecord {
        time_unix_nano: v.time.map_or_else(now_nanos, nanos),
        observed_time_unix_nano: now_nanos(),
        severity_number: if deny { 13 } else { 9 },
        severity_text: if deny { "WARN" } else { "INFO" }.into(),
        body: Some(proto::AnyValue {
            value: Some(s(format!("lever {}", v.event))),
        }),
        attributes: attrs,
        trace_id,
        span_id,
        event_name: format!("lever.{}", v.event),
    }
}

fn any(v: &Value) -> Option<V> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => V::BoolValue(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => V::IntValue(i),
            None => V::DoubleValue(n.as_f64()?),
        },
        Value::String(x) => V::StringValue(x.clone()),
        other => V::StringValue(other.to_string()),
    })
}

fn resource(t: &Target) -> proto::Resource {
    let mut attributes = vec![
        kv("service.name", s(t.service_name.clone())),
        kv("service.version", s(env!("CARGO_PKG_VERSION"))),
    ];
    for (k, v) in &t.resource {
        attributes.push(kv(k, s(v.clone())));
    }
    proto::Resource { attributes }
}

fn scope() -> proto::InstrumentationScope {
    proto::InstrumentationScope {
        name: "lever".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

type Http = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn client() -> Result<Http, String> {
    build_client(false)
}

/// `h2`: HTTP/2 only (gRPC; prior knowledge on `http://`, ALPN on `https://`).
fn build_client(h2: bool) -> Result<Http, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(3)));
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let connector = if h2 {
        b.enable_http2().wrap_connector(http)
    } else {
        b.enable_http1().wrap_connector(http)
    };
    Ok(Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build(connector))
}

/// One OTLP/gRPC unary call: a length-prefixed message over HTTP/2, the
/// outcome in `grpc-status` (in the trailers, or in the headers of a
/// trailers-only answer).
pub async fn post_grpc(http: &Http, url: &str, message: Vec<u8>) -> Result<(), String> {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Full::new(Bytes::from(framed)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(DEADLINE, http.request(req))
        .await
        .map_err(|_| "the collector did not answer in time".to_owned())?
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("the collector answered {}", resp.status()));
    }
    let in_headers = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = tokio::time::timeout(DEADLINE, resp.into_body().collect())
        .await
        .map_err(|_| "the collector did not finish in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = in_headers.or_else(|| {
        body.trailers()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    match status.as_deref() {
        Some("0") => Ok(()),
        Some(code) => Err(format!("the collector answered grpc-status {code}")),
        None => Err("the collector's answer has no grpc-status".into()),
    }
}

/// Posts one protobuf message; `Ok` on a 2xx.
pub async fn post(http: &Http, url: &str, body: Vec<u8>) -> Result<(), String> {
    let req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(DEADLINE, http.request(req))
        .await
        .map_err(|_| "the collector did not answer in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = tokio::time::timeout(DEADLINE, resp.into_body().collect()).await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered {status}"))
    }
}

/// Encodes log records as an export request.
pub fn logs_request(t: &Target, logs: Vec<proto::LogRecord>) -> Vec<u8> {
    prost::Message::encode_to_vec(&proto::ExportLogsServiceRequest {
        resource_logs: vec![proto::ResourceLogs {
            resource: Some(resource(t)),
            scope_logs: vec![proto::ScopeLogs {
                scope: Some(scope()),
                log_records: logs,
            }],
        }],
    })
}

fn metrics_request(t: &Target, metrics: Vec<proto::Metric>) -> Vec<u8> {
    prost::Message::encode_to_vec(&proto::ExportMetricsServiceRequest {
        resource_metrics: vec![proto::ResourceMetrics {
            resource: Some(resource(t)),
            scope_metrics: vec![proto::ScopeMetrics {
                scope: Some(scope()),
                metrics,
            }],
        }],
    })
}

fn spans_request(t: &Target, spans: Vec<proto::Span>) -> Vec<u8> {
    prost::Message::encode_to_vec(&proto::ExportTraceServiceRequest {
        resource_spans: vec![proto::ResourceSpans {
            resource: Some(resource(t)),
            scope_spans: vec![proto::ScopeSpans {
                scope: Some(scope()),
                spans,
            }],
        }],
    })
}

/// A client for `lever audit export` and the exporter.
pub fn http_client() -> Result<Http, String> {
    client()
}

async fn export(target: Target, queue: Arc<Queue>, counters: Arc<Counters>) {
    let Ok(http) = build_client(target.grpc) else {
        eprintln!("lever broker: telemetry: cannot build the HTTP client; nothing is exported");
        return;
    };
    let send = |kind: &'static str, body: Vec<u8>| {
        let (http, target) = (&http, &target);
        async move {
            if target.grpc {
                let service = match kind {
                    "logs" => "opentelemetry.proto.collector.logs.v1.LogsService",
                    "metrics" => "opentelemetry.proto.collector.metrics.v1.MetricsService",
                    _ => "opentelemetry.proto.collector.trace.v1.TraceService",
                };
                post_grpc(http, &format!("{}/{service}/Export", target.endpoint), body).await
            } else {
                post(http, &format!("{}/v1/{kind}", target.endpoint), body).await
            }
        }
    };
    loop {
        // A full batch, or a second gone by.
        let _ = tokio::time::timeout(FLUSH_EVERY, queue.full.notified()).await;
        let items = match queue.items.lock() {
            Ok(mut q) => std::mem::take(&mut *q),
            Err(_) => return,
        };
        let (mut logs, mut spans) = (Vec::new(), Vec::new());
        for item in items {
            match item {
                Item::Log(l) => logs.push(l),
                Item::Span(s) => spans.push(s),
                Item::Metrics(m) => {
                    let n = m.len() as u64;
                    let r = send("metrics", metrics_request(&target, m)).await;
                    count(&counters, n, r);
                }
            }
        }
        while !logs.is_empty() {
            let rest = logs.split_off(logs.len().min(BATCH));
            let n = logs.len() as u64;
            let r = send("logs", logs_request(&target, logs)).await;
            count(&counters, n, r);
            logs = rest;
        }
        while !spans.is_empty() {
            let rest = spans.split_off(spans.len().min(BATCH));
            let n = spans.len() as u64;
            let r = send("traces", spans_request(&target, spans)).await;
            count(&counters, n, r);
            spans = rest;
        }
    }
}

fn count(c: &Counters, n: u64, r: Result<(), String>) {
    match r {
        Ok(()) => c.exported.fetch_add(n, Ordering::Relaxed),
        Err(_) => c.dropped.fetch_add(n, Ordering::Relaxed),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_sampler_variables_are_honoured() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(sampling_ratio(&env(&[])), 1.0);
        assert_eq!(
            sampling_ratio(&env(&[("OTEL_TRACES_SAMPLER", "always_off")])),
            0.0
        );
        assert_eq!(
            sampling_ratio(&env(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25")
            ])),
            0.25
        );
        // A bad ratio keeps everything rather than silently nothing.
        assert_eq!(
            sampling_ratio(&env(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "7")
            ])),
            1.0
        );
    }

    #[test]
    fn a_ratio_keeps_about_that_share_and_whole_traces() {
        let kept_n = (0..4000)
            .filter(|i| kept(&ids("tag", &format!("req-{i}")).0, 0.25))
            .count();
        assert!((800..1200).contains(&kept_n), "{kept_n}");
        let (t, _) = ids("tag", "req-7");
        assert_eq!(kept(&t, 0.25), kept(&t, 0.25));
        assert!(!kept(&t, 0.0) && kept(&t, 1.0));
    }
}

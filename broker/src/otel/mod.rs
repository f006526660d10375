//! OpenTelemetry export over OTLP (HTTP/protobuf or gRPC): every audit
//! record as a log record, spans for requests, their steps, LLM upstream
//! calls and tool calls, and metric snapshots.
//!
//! Export is off the hot path: spans and log records are written straight
//! into protobuf bytes where they happen (`wire`) and appended to a batch
//! of their kind under a short lock; at most 8192 items wait (beyond that
//! one is dropped and counted, nothing ever waits). One task posts each
//! batch when 2048 items or 1 MiB have gathered, or every second, with a
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
use http_body_util::BodyExt;

pub use crate::body::Chunks;
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

pub mod wire;

pub use wire::Val;

/// OTLP span kinds.
pub const SERVER: i32 = 2;
pub const CLIENT: i32 = 3;
pub const INTERNAL: i32 = 1;

const QUEUE: usize = 8192;
/// A batch is posted when it holds this many items, or when the next item
/// would take it past `BATCH_BYTES`: large posts, because each one costs
/// wake-ups on both sides of the socket (with 512 items the collector
/// stand-in of the load bench spent twice the CPU per request), and at
/// most 1 MiB (or one item larger than that), well under the 4 MiB a
/// collector accepts by default.
const BATCH: usize = 2048;
pub const BATCH_BYTES: usize = 1 << 20;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const DEADLINE: Duration = Duration::from_secs(5);

/// The trace and span id of one request, derived from the instance tag and
/// the request id, so the audit writer finds the same ids from the record
/// alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub trace: [u8; 16],
    pub span: [u8; 8],
}

impl Ids {
    /// The ids of request `request_id` on instance `tag`.
    pub fn of(tag: &str, request_id: &str) -> Ids {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(tag.as_bytes());
        ctx.update(b"/");
        ctx.update(request_id.as_bytes());
        let d = ctx.finish();
        let mut ids = Ids {
            trace: [0; 16],
            span: [0; 8],
        };
        ids.trace.copy_from_slice(&d.as_ref()[..16]);
        ids.span.copy_from_slice(&d.as_ref()[16..24]);
        ids
    }

    /// The id of the request's child span `name`: the request's span id
    /// mixed with the name (FNV-1a), stable per named step.
    pub fn child(&self, name: &str) -> [u8; 8] {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        (u64::from_be_bytes(self.span) ^ h).to_be_bytes()
    }
}

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
fn kept(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&trace_id[8..]);
    (u64::from_be_bytes(b) as f64) < ratio * (u64::MAX as f64)
}

/// Encoded items of one kind, each framed as a repeated field of its scope
/// message, ready to be wrapped into one export request.
#[derive(Debug, Default)]
pub struct Batch {
    bytes: Vec<u8>,
    n: usize,
}

impl Batch {
    /// The bytes held (what the export request carries besides its header).
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// Appends one encoded item (a `Span` or `LogRecord` message).
    fn push(&mut self, item: &[u8]) {
        wire::bytes_field(&mut self.bytes, 2, item);
        self.n += 1;
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Appends an audit line read back from `audit.jsonl`.
    pub fn push_line(&mut self, line: &Value) {
        SCRATCH.with(|c| {
            let mut buf = c.take();
            log_record_from_line(&mut buf, line);
            self.push(&buf);
            buf.clear();
            c.set(buf);
        });
    }
}

/// The bytes an item takes in a batch: its tag, its length, itself.
fn framed(item: &[u8]) -> usize {
    wire::len_field_size(2, item.len())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Logs,
    Traces,
}

/// What waits for the exporter. Senders append under a short lock and wake
/// the exporter only when a batch is full: not one wake-up per item.
#[derive(Debug, Default)]
struct Pending {
    spans: Batch,
    logs: Batch,
    /// Full batches, oldest first.
    ready: Vec<(Kind, Batch)>,
    /// Items held in all of the above (at most `QUEUE`).
    held: usize,
    /// The latest metrics snapshot not yet sent (a newer one replaces it:
    /// they are cumulative).
    metrics: Option<Vec<proto::Metric>>,
    /// Buffers of sent batches, for the next ones (no allocation and no
    /// fresh pages per batch).
    spare: Vec<Vec<u8>>,
}

/// Batch buffers kept for reuse.
const SPARE: usize = 4;

#[derive(Debug, Default)]
struct Queue {
    pending: std::sync::Mutex<Pending>,
    full: Notify,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
}

thread_local! {
    /// A reusable buffer for encoding one item.
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A span being written straight into its wire form; sent by
/// [`SpanWriter::end`].
#[derive(Debug)]
pub struct SpanWriter<'a> {
    otel: &'a Otel,
    buf: Vec<u8>,
}

impl SpanWriter<'_> {
    pub fn attr(&mut self, key: &str, v: Val<'_>) -> &mut Self {
        wire::attr(&mut self.buf, wire::span::ATTRIBUTES, &[key], v);
        self
    }

    pub fn str(&mut self, key: &str, v: &str) -> &mut Self {
        self.attr(key, Val::Str(v))
    }

    pub fn int(&mut self, key: &str, v: i64) -> &mut Self {
        self.attr(key, Val::Int(v))
    }

    /// Ends the span now, with an error status carrying `error` if given,
    /// and queues it. Returns the time it ended, which can start the next
    /// step without another read of the clock.
    pub fn end(self, error: Option<&str>) -> SystemTime {
        self.end_at(error, SystemTime::now())
    }

    /// [`SpanWriter::end`] at a time read earlier.
    pub fn end_at(mut self, error: Option<&str>, now: SystemTime) -> SystemTime {
        wire::fixed64_field(&mut self.buf, wire::span::END, nanos(now));
        if let Some(m) = error {
            wire::error_status(&mut self.buf, m);
        }
        let mut buf = std::mem::take(&mut self.buf);
        self.otel.push(Kind::Traces, &buf);
        buf.clear();
        SCRATCH.with(|c| c.set(buf));
        now
    }
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
                sender.send_metrics(metrics.otlp(since));
            }
        });
        o
    }

    /// The ids of request `request_id`.
    pub fn ids(&self, request_id: &str) -> Ids {
        Ids::of(&self.tag, request_id)
    }

    /// Starts a span of the request `ids`: the request's own span when
    /// `child` is `None`, else its child span of that stable name. `name`
    /// is the displayed span name, in parts. `None` when the trace is
    /// sampled out.
    pub fn span(
        &self,
        ids: &Ids,
        child: Option<&str>,
        name: &[&str],
        kind: i32,
        start: SystemTime,
    ) -> Option<SpanWriter<'_>> {
        if !kept(&ids.trace, self.ratio) {
            return None;
        }
        let mut buf = SCRATCH.with(std::cell::Cell::take);
        wire::bytes_field(&mut buf, wire::span::TRACE_ID, &ids.trace);
        match child {
            None => wire::bytes_field(&mut buf, wire::span::SPAN_ID, &ids.span),
            Some(c) => {
                wire::bytes_field(&mut buf, wire::span::SPAN_ID, &ids.child(c));
                wire::bytes_field(&mut buf, wire::span::PARENT_SPAN_ID, &ids.span);
            }
        }
        wire::str_field(&mut buf, wire::span::NAME, name);
        wire::varint_field(&mut buf, wire::span::KIND, kind as u64);
        wire::fixed64_field(&mut buf, wire::span::START, nanos(start));
        Some(SpanWriter { otel: self, buf })
    }

    /// Records an internal step of a request (token verification, a rate
    /// limit) as a child of the request's span. Returns when it ended, or
    /// `None` when the trace is sampled out.
    pub fn step(
        &self,
        ids: &Ids,
        name: &'static str,
        start: SystemTime,
        attributes: &[(&str, &str)],
        refused: Option<&str>,
    ) -> Option<SystemTime> {
        let mut sp = self.span(ids, Some(name), &[name], INTERNAL, start)?;
        for (k, v) in attributes {
            sp.str(k, v);
        }
        sp.str(
            "lever.decision",
            if refused.is_some() { "deny" } else { "allow" },
        );
        if let Some(r) = refused {
            sp.str("lever.deny_reason", r);
        }
        Some(sp.end(refused))
    }

    /// Queues an encoded item, or counts it dropped when the queue is full.
    fn push(&self, kind: Kind, item: &[u8]) {
        let full = match self.queue.pending.lock() {
            Ok(mut q) if q.held < QUEUE => {
                q.held += 1;
                let Pending {
                    spare,
                    spans,
                    logs,
                    ready,
                    ..
                } = &mut *q;
                let batch = match kind {
                    Kind::Logs => logs,
                    Kind::Traces => spans,
                };
                // A batch closes before the item that would take it past
                // `BATCH_BYTES` (an item larger than that goes alone), so
                // its buffer, allocated at that size, never grows under
                // this lock.
                let mut closed = false;
                if !batch.is_empty() && batch.bytes.len() + framed(item) > BATCH_BYTES {
                    ready.push((kind, std::mem::take(batch)));
                    closed = true;
                }
                if batch.bytes.capacity() == 0 {
                    batch.bytes = spare
                        .pop()
                        .unwrap_or_else(|| Vec::with_capacity(BATCH_BYTES));
                }
                batch.push(item);
                if batch.n == BATCH {
                    ready.push((kind, std::mem::take(batch)));
                    closed = true;
                }
                closed
            }
            _ => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if full {
            self.queue.full.notify_one();
        }
    }

    fn send_metrics(&self, m: Vec<proto::Metric>) {
        if let Ok(mut q) = self.queue.pending.lock() {
            q.metrics = Some(m);
        }
    }

    /// An audit record as a log record, correlated by `known` trace ids or
    /// else by those derived from its request id.
    pub fn audit(&self, view: &AuditView<'_>, known: Option<Ids>) {
        let ids = known.or_else(|| view.request_id.map(|r| self.ids(r)));
        let mut buf = SCRATCH.with(std::cell::Cell::take);
        log_record(&mut buf, view, ids.as_ref(), false);
        self.push(Kind::Logs, &buf);
        buf.clear();
        SCRATCH.with(|c| c.set(buf));
    }
}

/// The `detail` fields of an audit record.
#[derive(Debug, Clone, Copy)]
pub enum Details<'a> {
    /// As the writer holds them.
    Pairs(&'a [(&'static str, Value)]),
    /// As read back from a line.
    Map(&'a serde_json::Map<String, Value>),
}

impl Details<'_> {
    fn for_each(&self, mut f: impl FnMut(&str, &Value)) {
        match self {
            Details::Pairs(p) => p.iter().for_each(|(k, v)| f(k, v)),
            Details::Map(m) => m.iter().for_each(|(k, v)| f(k, v)),
        }
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
    pub detail: Details<'a>,
    pub prev: Option<&'a str>,
}

/// An audit line read back, as an OTLP log record. Trace ids as the broker
/// derives them need its instance tag, which the file does not hold:
/// replayed records carry none.
fn log_record_from_line(buf: &mut Vec<u8>, line: &Value) {
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
    let empty = serde_json::Map::new();
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
        detail: Details::Map(line["detail"].as_object().unwrap_or(&empty)),
        prev: line["prev"].as_str(),
    };
    log_record(buf, &view, None, true);
}

/// An audit record as an OTLP log record: every field an attribute
/// (`lever.*`, `detail` as `lever.detail.*`, constraints as
/// `lever.constraint.*`), correlated to its request's span by `ids`.
/// The record is observed when it is written (its own time), or, `replayed`
/// from the file, now.
fn log_record(buf: &mut Vec<u8>, v: &AuditView<'_>, ids: Option<&Ids>, replayed: bool) {
    use wire::log as f;
    let deny = v.decision == Some("deny");
    let time = v.time.map_or_else(now_nanos, nanos);
    wire::fixed64_field(buf, f::TIME, time);
    let observed = if replayed { now_nanos() } else { time };
    wire::fixed64_field(buf, f::OBSERVED_TIME, observed);
    wire::varint_field(buf, f::SEVERITY_NUMBER, if deny { 13 } else { 9 });
    wire::str_field(buf, f::SEVERITY_TEXT, &[if deny { "WARN" } else { "INFO" }]);
    wire::any_str_field(buf, f::BODY, &["lever ", v.event]);
    wire::str_field(buf, f::EVENT_NAME, &["lever.", v.event]);
    if let Some(ids) = ids {
        wire::bytes_field(buf, f::TRACE_ID, &ids.trace);
        wire::bytes_field(buf, f::SPAN_ID, &ids.span);
    }
    if let Some(n) = v.seq {
        wire::attr(buf, f::ATTRIBUTES, &["lever.seq"], Val::Int(n as i64));
    }
    wire::str_attr(buf, f::ATTRIBUTES, "", "lever.event", v.event);
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
            wire::str_attr(buf, f::ATTRIBUTES, "", k, x);
        }
    }
    for (k, x) in v.constraints.into_iter().flatten() {
        wire::str_attr(buf, f::ATTRIBUTES, "lever.constraint.", k, x);
    }
    v.detail
        .for_each(|k, x| wire::json_attr(buf, f::ATTRIBUTES, &["lever.detail.", k], x));
}

fn encode<M: prost::Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
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

/// An attribute for the prost messages (metrics).
pub fn kv(key: &str, v: proto::any_value::Value) -> proto::KeyValue {
    proto::KeyValue {
        key: key.to_owned(),
        value: Some(proto::AnyValue { value: Some(v) }),
    }
}

pub fn s(v: impl Into<String>) -> proto::any_value::Value {
    proto::any_value::Value::StringValue(v.into())
}

type Http = Client<hyper_rustls::HttpsConnector<HttpConnector>, Chunks>;

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
pub async fn post_grpc(http: &Http, url: &str, message: Chunks) -> Result<(), String> {
    let len = u32::try_from(message.len()).map_err(|_| "a message over 4 GiB".to_owned())?;
    let mut framed = message;
    // Not compressed, then the length.
    let mut prefix = vec![0];
    prefix.extend_from_slice(&len.to_be_bytes());
    framed.prepend(Bytes::from(prefix));
    let req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(framed)
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
pub async fn post(http: &Http, url: &str, body: Chunks) -> Result<(), String> {
    let req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(body)
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

/// Encodes a batch of log records as an export request.
pub fn logs_request(t: &Target, logs: &Batch) -> Vec<u8> {
    wire::export_request(&encode(&resource(t)), &encode(&scope()), &logs.bytes)
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

/// A client for `lever audit export` and the exporter.
pub fn http_client() -> Result<Http, String> {
    client()
}

async fn export(target: Target, queue: Arc<Queue>, counters: Arc<Counters>) {
    let Ok(http) = build_client(target.grpc) else {
        eprintln!("lever broker: telemetry: cannot build the HTTP client; nothing is exported");
        return;
    };
    let (res, scp) = (encode(&resource(&target)), encode(&scope()));
    let send = |kind: &'static str, body: Chunks| {
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
        let (mut batches, metrics) = match queue.pending.lock() {
            Ok(mut q) => {
                let mut b = std::mem::take(&mut q.ready);
                for (kind, part) in [
                    (Kind::Logs, std::mem::take(&mut q.logs)),
                    (Kind::Traces, std::mem::take(&mut q.spans)),
                ] {
                    if !part.is_empty() {
                        b.push((kind, part));
                    }
                }
                q.held = 0;
                (b, q.metrics.take())
            }
            Err(_) => return,
        };
        if let Some(m) = metrics {
            let n = m.len() as u64;
            let r = send("metrics", metrics_request(&target, m).into()).await;
            count(&counters, n, r);
        }
        // Logs first: they are the audit trail.
        batches.sort_by_key(|(k, _)| *k != Kind::Logs);
        for (kind, batch) in batches {
            // The request's header, then the batch as it is: no copy.
            let head = wire::export_head(&res, &scp, batch.bytes.len());
            let items = Bytes::from(batch.bytes);
            let name = if kind == Kind::Logs { "logs" } else { "traces" };
            let r = send(name, Chunks::from([head.into(), items.clone()])).await;
            count(&counters, batch.n as u64, r);
            // The buffer back for the next batches, once the client has
            // let go of it.
            if let Ok(b) = items.try_into_mut() {
                let mut v = Vec::from(b);
                v.clear();
                if let Ok(mut q) = queue.pending.lock()
                    && q.spare.len() < SPARE
                {
                    q.spare.push(v);
                }
            }
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
            .filter(|i| kept(&Ids::of("tag", &format!("req-{i}")).trace, 0.25))
            .count();
        assert!((800..1200).contains(&kept_n), "{kept_n}");
        let t = Ids::of("tag", "req-7").trace;
        assert_eq!(kept(&t, 0.25), kept(&t, 0.25));
        assert!(!kept(&t, 0.0) && kept(&t, 1.0));
    }

    fn otel(ratio: f64) -> Otel {
        Otel {
            queue: Arc::default(),
            counters: Arc::default(),
            tag: "tag".into(),
            ratio,
        }
    }

    /// Everything queued, decoded with the prost messages.
    fn drain(o: &Otel) -> (Vec<proto::Span>, Vec<proto::LogRecord>) {
        use prost::Message;
        let mut q = o.queue.pending.lock().unwrap();
        let mut all = std::mem::take(&mut q.ready);
        all.push((Kind::Logs, std::mem::take(&mut q.logs)));
        all.push((Kind::Traces, std::mem::take(&mut q.spans)));
        let (mut spans, mut logs) = (Vec::new(), Vec::new());
        for (kind, b) in all {
            let body = wire::export_request(
                &encode(&resource(
                    &Target::resolve(Some("x".into()), None, &|_| None).unwrap(),
                )),
                &encode(&scope()),
                &b.bytes,
            );
            if kind == Kind::Traces {
                let r = proto::ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
                let ss = &r.resource_spans[0].scope_spans[0];
                assert_eq!(ss.scope.as_ref().unwrap().name, "lever");
                spans.extend(ss.spans.iter().cloned());
            } else {
                let r = proto::ExportLogsServiceRequest::decode(body.as_slice()).unwrap();
                let rl = &r.resource_logs[0];
                let service = &rl.resource.as_ref().unwrap().attributes[0];
                assert_eq!(service.key, "service.name");
                logs.extend(rl.scope_logs[0].log_records.iter().cloned());
            }
        }
        (spans, logs)
    }

    fn attr<'a>(a: &'a [proto::KeyValue], k: &str) -> Option<&'a proto::any_value::Value> {
        a.iter()
            .find(|x| x.key == k)
            .and_then(|x| x.value.as_ref()?.value.as_ref())
    }

    #[test]
    fn spans_written_as_bytes_decode_as_otlp_spans() {
        let o = otel(1.0);
        let ids = o.ids("tag-000001");
        let t0 = SystemTime::now();
        let mut sp = o
            .span(&ids, None, &["POST ", "/llm/{path}"], SERVER, t0)
            .unwrap();
        sp.str("http.route", "/llm/{path}")
            .int("http.response.status_code", 200);
        sp.attr("lever.completed", Val::Bool(true));
        sp.attr("lever.ttfb_ms", Val::Double(0.25));
        sp.end(None);
        o.step(
            &ids,
            "rate limit",
            t0,
            &[("lever.lane", "llm")],
            Some("rate_limited"),
        );
        let (spans, logs) = drain(&o);
        assert!(logs.is_empty());
        assert_eq!(spans.len(), 2);
        let (root, step) = (&spans[0], &spans[1]);
        assert_eq!(root.name, "POST /llm/{path}");
        assert_eq!(root.kind, SERVER);
        assert_eq!(root.trace_id, ids.trace);
        assert_eq!(root.span_id, ids.span);
        assert!(root.parent_span_id.is_empty());
        assert_eq!(root.start_time_unix_nano, nanos(t0));
        assert!(root.end_time_unix_nano >= root.start_time_unix_nano);
        assert!(root.status.is_none());
        use proto::any_value::Value as V;
        assert_eq!(
            attr(&root.attributes, "http.route"),
            Some(&V::StringValue("/llm/{path}".into()))
        );
        assert_eq!(
            attr(&root.attributes, "http.response.status_code"),
            Some(&V::IntValue(200))
        );
        assert_eq!(
            attr(&root.attributes, "lever.completed"),
            Some(&V::BoolValue(true))
        );
        assert_eq!(
            attr(&root.attributes, "lever.ttfb_ms"),
            Some(&V::DoubleValue(0.25))
        );
        assert_eq!(step.name, "rate limit");
        assert_eq!(step.kind, INTERNAL);
        assert_eq!(step.trace_id, ids.trace);
        assert_eq!(step.parent_span_id, ids.span);
        assert_eq!(step.span_id, ids.child("rate limit"));
        assert_ne!(step.span_id, ids.child("verify capability"));
        let st = step.status.as_ref().unwrap();
        assert_eq!((st.code, st.message.as_str()), (2, "rate_limited"));
        assert_eq!(
            attr(&step.attributes, "lever.deny_reason"),
            Some(&V::StringValue("rate_limited".into()))
        );
        assert_eq!(
            attr(&step.attributes, "lever.decision"),
            Some(&V::StringValue("deny".into()))
        );
    }

    #[test]
    fn audit_records_written_as_bytes_decode_as_otlp_log_records() {
        let o = otel(0.0); // traces sampled out; logs never are
        let constraints: std::collections::BTreeMap<String, String> =
            [("table".to_owned(), "users".to_owned())].into();
        let detail = [
            ("input_tokens", Value::from(7u64)),
            ("model", Value::from("claude")),
            ("none", Value::Null),
            ("list", serde_json::json!(["a", "b"])),
        ];
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let view = AuditView {
            seq: Some(42),
            time: Some(at),
            event: "tool",
            request_id: Some("tag-000009"),
            identity: Some("agent-a"),
            tool: Some("db"),
            op: Some("read"),
            constraints: Some(&constraints),
            decision: Some("deny"),
            reason: Some("constraint_mismatch"),
            token_id: Some("tok"),
            detail: Details::Pairs(&detail),
            prev: Some("abc"),
        };
        o.audit(&view, None);
        // Ids the request already derived are used as they are.
        let known = o.ids("tag-000010");
        o.audit(&view, Some(known));
        assert!(
            o.span(&o.ids("tag-000009"), None, &["x"], SERVER, at)
                .is_none()
        );
        let (spans, logs) = drain(&o);
        assert!(spans.is_empty());
        assert_eq!(logs.len(), 2);
        assert_eq!(logs[1].trace_id, known.trace);
        assert_eq!(logs[1].span_id, known.span);
        let l = &logs[0];
        let ids = o.ids("tag-000009");
        assert_eq!(
            (l.trace_id.as_slice(), l.span_id.as_slice()),
            (&ids.trace[..], &ids.span[..])
        );
        assert_eq!(l.time_unix_nano, 1_700_000_000_000_000_000);
        // Written live, a record is observed at its own time.
        assert_eq!(l.observed_time_unix_nano, l.time_unix_nano);
        assert_eq!((l.severity_number, l.severity_text.as_str()), (13, "WARN"));
        assert_eq!(l.event_name, "lever.tool");
        use proto::any_value::Value as V;
        assert_eq!(
            l.body.as_ref().unwrap().value,
            Some(V::StringValue("lever tool".into()))
        );
        let a = &l.attributes;
        assert_eq!(attr(a, "lever.seq"), Some(&V::IntValue(42)));
        assert_eq!(
            attr(a, "lever.identity"),
            Some(&V::StringValue("agent-a".into()))
        );
        assert_eq!(
            attr(a, "lever.reason"),
            Some(&V::StringValue("constraint_mismatch".into()))
        );
        assert_eq!(
            attr(a, "lever.constraint.table"),
            Some(&V::StringValue("users".into()))
        );
        assert_eq!(attr(a, "lever.detail.input_tokens"), Some(&V::IntValue(7)));
        assert_eq!(
            attr(a, "lever.detail.model"),
            Some(&V::StringValue("claude".into()))
        );
        assert_eq!(
            attr(a, "lever.detail.list"),
            Some(&V::StringValue("[\"a\",\"b\"]".into()))
        );
        assert!(attr(a, "lever.detail.none").is_none());
        // A line read back gives the same attributes, without trace ids,
        // observed when it is replayed.
        let replayed_at = now_nanos();
        let mut b = Batch::default();
        b.push_line(
            &serde_json::json!({"seq": 42, "event": "tool", "decision": "deny",
            "request_id": "tag-000009", "constraints": {"table": "users"},
            "detail": {"input_tokens": 7, "model": "claude", "none": null, "list": ["a", "b"]}}),
        );
        let mut q = o.queue.pending.lock().unwrap();
        q.logs = b;
        drop(q);
        let (_, back) = drain(&o);
        assert!(back[0].trace_id.is_empty());
        assert!(back[0].observed_time_unix_nano >= replayed_at);
        for k in [
            "lever.seq",
            "lever.constraint.table",
            "lever.detail.input_tokens",
            "lever.detail.model",
            "lever.detail.list",
        ] {
            assert_eq!(attr(&back[0].attributes, k), attr(a, k), "{k}");
        }
    }

    #[test]
    fn a_batch_closes_before_the_item_that_would_pass_its_byte_cap() {
        let o = otel(1.0);
        let item = [7u8; 4000];
        // Each item framed: its tag and a two-byte length.
        let fit = BATCH_BYTES / framed(&item);
        assert_eq!(framed(&item), item.len() + 3);
        for _ in 0..fit {
            o.push(Kind::Logs, &item);
        }
        assert!(o.queue.pending.lock().unwrap().ready.is_empty());
        o.push(Kind::Logs, &item);
        {
            let q = o.queue.pending.lock().unwrap();
            assert_eq!(q.ready.len(), 1);
            let (kind, b) = &q.ready[0];
            assert_eq!((*kind, b.n), (Kind::Logs, fit));
            assert!(fit < BATCH && b.size() <= BATCH_BYTES);
            // Its buffer was never grown past the cap.
            assert_eq!(b.bytes.capacity(), BATCH_BYTES);
            assert_eq!(q.logs.n, 1);
        }
        // An item larger than the cap goes alone.
        let big = vec![1u8; BATCH_BYTES + 10];
        o.push(Kind::Traces, &item);
        o.push(Kind::Traces, &big);
        o.push(Kind::Traces, &item);
        let q = o.queue.pending.lock().unwrap();
        let sizes: Vec<_> = q.ready[1..].iter().map(|(_, b)| b.n).collect();
        assert_eq!(sizes, [1, 1]);
        assert!(q.ready[2].1.size() > BATCH_BYTES);
        assert_eq!(q.spans.n, 1);
    }

    #[test]
    fn a_step_returns_when_it_ended_or_none_when_sampled_out() {
        let o = otel(1.0);
        let ids = o.ids("r");
        let start = SystemTime::now();
        let end = o.step(&ids, "verify capability", start, &[], None).unwrap();
        assert!(end >= start);
        o.step(&ids, "rate limit", end, &[], None).unwrap();
        let (spans, _) = drain(&o);
        assert_eq!(spans[0].end_time_unix_nano, nanos(end));
        // The next step starts where this one ended.
        assert_eq!(spans[1].start_time_unix_nano, spans[0].end_time_unix_nano);
        assert!(otel(0.0).step(&ids, "rate limit", end, &[], None).is_none());
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let o = otel(1.0);
        let ids = o.ids("r");
        for _ in 0..QUEUE + 10 {
            o.step(&ids, "rate limit", SystemTime::now(), &[], None);
        }
        assert_eq!(o.counters.dropped.load(Ordering::Relaxed), 10);
        let q = o.queue.pending.lock().unwrap();
        assert_eq!(q.ready.len(), QUEUE / BATCH);
        assert!(q.ready.iter().all(|(_, b)| b.n == BATCH));
    }
}

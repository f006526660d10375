//! Prometheus metrics, served as text on the admin port's `GET /metrics`.
//!
//! Labels come only from small fixed sets (a route *kind*, a status, a
//! stable reason code, a configured tool), never from request data, so an
//! agent cannot grow the series count. Identities are not labels either:
//! per-agent detail belongs to the audit trail.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Histogram bucket bounds, in seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

type Labels = Vec<(&'static str, String)>;

/// Series of one kind, found by name and label values without allocating
/// (a hash of both indexes the entries; a new series is the only
/// allocation).
#[derive(Debug)]
struct Series<T> {
    entries: Vec<(&'static str, Labels, T)>,
    /// Keyed by [`series_hash`], which is a hash already: not hashed again.
    index: std::collections::HashMap<u64, usize, std::hash::BuildHasherDefault<Prehashed>>,
}

/// The hasher of keys that are hashes: the key as it is.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here (`write_u64`); anything else is
        // folded in, so it stays a hash.
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(K);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// The multiplier of [`series_hash`] (FxHash's).
const K: u64 = 0x517c_c1b7_2722_0a95;

impl<T> Default for Series<T> {
    fn default() -> Self {
        Series {
            entries: Vec::new(),
            index: std::collections::HashMap::default(),
        }
    }
}

/// A hash of a metric's name and label pairs, eight bytes at a step
/// (FxHash's mixing): an index, not a defence (a collision is resolved by
/// comparing the series, and labels never come from request data).
fn series_hash(name: &str, pairs: &[(&'static str, &str)]) -> u64 {
    let mut h: u64 = 0;
    let mut eat = |b: &[u8]| {
        let mut words = b.chunks_exact(8);
        for w in &mut words {
            let mut x = [0u8; 8];
            x.copy_from_slice(w);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(x)).wrapping_mul(K);
        }
        let mut last = [0u8; 8];
        last[..words.remainder().len()].copy_from_slice(words.remainder());
        // The length ends each part: ("ab", "c") and ("a", "bc") differ.
        let end = u64::from_le_bytes(last) ^ (b.len() as u64) << 56;
        h = (h.rotate_left(5) ^ end).wrapping_mul(K);
    };
    eat(name.as_bytes());
    for (k, v) in pairs {
        eat(k.as_bytes());
        eat(v.as_bytes());
    }
    h
}

impl<T: Default> Series<T> {
    fn get(&mut self, name: &'static str, pairs: &[(&'static str, &str)]) -> &mut T {
        let same = |(n, l, _): &(&'static str, Labels, T)| {
            *n == name
                && l.len() == pairs.len()
                && l.iter().zip(pairs).all(|((a, x), (b, y))| a == b && x == y)
        };
        let h = series_hash(name, pairs);
        let at = match self.index.get(&h) {
            Some(&i) if same(&self.entries[i]) => i,
            // A hash collision (never seen in practice): a linear search.
            Some(_) => match self.entries.iter().position(same) {
                Some(i) => i,
                None => {
                    self.entries.push((name, labels(pairs), T::default()));
                    self.entries.len() - 1
                }
            },
            None => {
                self.entries.push((name, labels(pairs), T::default()));
                self.index.insert(h, self.entries.len() - 1);
                self.entries.len() - 1
            }
        };
        &mut self.entries[at].2
    }

    /// Every series, sorted by name and labels.
    fn snapshot<U>(&self, f: impl Fn(&T) -> U) -> BTreeMap<(&'static str, Labels), U> {
        self.entries
            .iter()
            .map(|(n, l, v)| ((*n, l.clone()), f(v)))
            .collect()
    }
}

/// The broker's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<Series<u64>>,
    histograms: Mutex<Series<Histogram>>,
    pub open_streams: AtomicI64,
    pub token_cache_hits: AtomicU64,
    pub token_cache_misses: AtomicU64,
}

/// Help text and type of each metric, in output order.
const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "lever_requests_total",
        "counter",
        "Requests answered, by route kind and status code.",
    ),
    (
        "lever_denials_total",
        "counter",
        "Requests or calls refused, by route kind and reason.",
    ),
    (
        "lever_rate_limited_total",
        "counter",
        "Refusals by a rate limit, by lane (llm, tool, control, verify).",
    ),
    (
        "lever_llm_calls_total",
        "counter",
        "LLM calls proxied, by upstream status and completion.",
    ),
    (
        "lever_llm_tokens_total",
        "counter",
        "LLM tokens used, by kind (input, output).",
    ),
    (
        "lever_tool_calls_total",
        "counter",
        "Authorized tool calls, by tool and outcome.",
    ),
    (
        "lever_request_duration_seconds",
        "histogram",
        "Time from request to response head, by route kind.",
    ),
    (
        "lever_llm_upstream_latency_seconds",
        "histogram",
        "Time for the upstream to send its response head.",
    ),
    (
        "lever_llm_ttfb_seconds",
        "histogram",
        "Time from the upstream call to the first body byte.",
    ),
    (
        "lever_tool_backend_latency_seconds",
        "histogram",
        "Tool backend round trip, by tool.",
    ),
];

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// A label value, escaped for the text format.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn fmt_labels(l: &Labels, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn num(v: f64) -> String {
    if v.is_infinite() {
        "+Inf".into()
    } else {
        format!("{v}")
    }
}

impl Metrics {
    /// Every histogram, copied out from under the lock: (cumulative bucket
    /// counts, sum, count) by name and labels.
    fn histogram_snapshot(&self) -> BTreeMap<(&'static str, Labels), (Vec<u64>, f64, u64)> {
        self.histograms
            .lock()
            .map(|m| m.snapshot(|h| (h.counts.clone(), h.sum, h.count)))
            .unwrap_or_default()
    }

    fn counter_snapshot(&self) -> BTreeMap<(&'static str, Labels), u64> {
        self.counters
            .lock()
            .map(|m| m.snapshot(|v| *v))
            .unwrap_or_default()
    }

    pub fn inc(&self, name: &'static str, pairs: &[(&'static str, &str)], by: u64) {
        if let Ok(mut m) = self.counters.lock() {
            *m.get(name, pairs) += by;
        }
    }

    /// Counts a refusal on `route` for `reason`, and a rate limit in its
    /// lane (`llm`, `tool`, `control`) when it was one.
    pub fn denial(&self, route: &'static str, reason: &str, rate_limited_lane: Option<&str>) {
        self.inc(
            "lever_denials_total",
            &[("route", route), ("reason", reason)],
            1,
        );
        if let Some(lane) = rate_limited_lane {
            self.inc("lever_rate_limited_total", &[("lane", lane)], 1);
        }
    }

    pub fn observe(&self, name: &'static str, pairs: &[(&'static str, &str)], d: Duration) {
        if let Ok(mut m) = self.histograms.lock() {
            m.get(name, pairs).observe(d.as_secs_f64());
        }
    }

    /// The Prometheus text exposition (format 0.0.4). `extra` adds gauges
    /// and counters owned elsewhere (name, type, help, value).
    pub fn render(&self, extra: &[(&str, &str, &str, f64)]) -> String {
        let mut out = String::new();
        let counters = self.counter_snapshot();
        let histograms = self.histogram_snapshot();
        for (name, kind, help) in FAMILIES {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if *kind == "counter" {
                for ((n, l), v) in counters.iter().filter(|((n, _), _)| n == name) {
                    let _ = writeln!(out, "{n}{} {v}", fmt_labels(l, None));
                }
            } else {
                for ((n, l), (counts, sum, count)) in
                    histograms.iter().filter(|((n, _), _)| n == name)
                {
                    for (i, b) in BUCKETS.iter().enumerate() {
                        let c = counts.get(i).copied().unwrap_or(0);
                        let _ = writeln!(
                            out,
                            "{n}_bucket{} {c}",
                            fmt_labels(l, Some(("le", num(*b))))
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{n}_bucket{} {count}",
                        fmt_labels(l, Some(("le", "+Inf".into())))
                    );
                    let _ = writeln!(out, "{n}_sum{} {sum}", fmt_labels(l, None));
                    let _ = writeln!(out, "{n}_count{} {count}", fmt_labels(l, None));
                }
            }
        }
        let own = [
            (
                "lever_open_streams",
                "gauge",
                "LLM responses streaming right now.",
                self.open_streams.load(Ordering::Relaxed) as f64,
            ),
            (
                "lever_token_cache_hits_total",
                "counter",
                "Capability tokens found verified in the cache.",
                self.token_cache_hits.load(Ordering::Relaxed) as f64,
            ),
            (
                "lever_token_cache_misses_total",
                "counter",
                "Capability tokens verified from scratch.",
                self.token_cache_misses.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, kind, help, v) in own.iter().chain(extra.iter()) {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        out
    }
}

impl Metrics {
    /// Every metric as OTLP data (cumulative sums and histograms since
    /// `start`, gauges now), the same names and labels as `/metrics`.
    pub fn otlp(&self, start: u64) -> Vec<crate::otel::proto::Metric> {
        use crate::otel::proto::{self as p, metric::Data};
        let now = crate::otel::now_nanos();
        let attrs = |l: &Labels| {
            l.iter()
                .map(|(k, v)| crate::otel::kv(k, crate::otel::s(v.clone())))
                .collect::<Vec<_>>()
        };
        let help = |name: &str| {
            FAMILIES
                .iter()
                .find(|(n, _, _)| *n == name)
                .map_or("", |(_, _, h)| *h)
                .to_owned()
        };
        let mut out = Vec::new();
        let counters = self.counter_snapshot();
        let mut by_name: BTreeMap<&str, Vec<p::NumberDataPoint>> = BTreeMap::new();
        for ((name, l), v) in &counters {
            by_name.entry(name).or_default().push(p::NumberDataPoint {
                start_time_unix_nano: start,
                time_unix_nano: now,
                as_double: *v as f64,
                attributes: attrs(l),
            });
        }
        let own = [
            (
                "lever_token_cache_hits_total",
                self.token_cache_hits.load(Ordering::Relaxed),
            ),
            (
                "lever_token_cache_misses_total",
                self.token_cache_misses.load(Ordering::Relaxed),
            ),
        ];
        for (name, v) in own {
            by_name.entry(name).or_default().push(p::NumberDataPoint {
                start_time_unix_nano: start,
                time_unix_nano: now,
                as_double: v as f64,
                attributes: Vec::new(),
            });
        }
        for (name, points) in by_name {
            out.push(p::Metric {
                name: name.to_owned(),
                description: help(name),
                unit: String::new(),
                data: Some(Data::Sum(p::Sum {
                    data_points: points,
                    aggregation_temporality: 2,
                    is_monotonic: true,
                })),
            });
        }
        out.push(p::Metric {
            name: "lever_open_streams".into(),
            description: "LLM responses streaming right now.".into(),
            unit: String::new(),
            data: Some(Data::Gauge(p::Gauge {
                data_points: vec![p::NumberDataPoint {
                    start_time_unix_nano: 0,
                    time_unix_nano: now,
                    as_double: self.open_streams.load(Ordering::Relaxed) as f64,
                    attributes: Vec::new(),
                }],
            })),
        });
        let histograms = self.histogram_snapshot();
        let mut hist: BTreeMap<&str, Vec<p::HistogramDataPoint>> = BTreeMap::new();
        for ((name, l), (cumulative, sum, count)) in &histograms {
            // OTLP counts per bucket, the last one above every bound.
            let mut per = Vec::with_capacity(BUCKETS.len() + 1);
            let mut prev = 0;
            for c in cumulative.iter().chain(std::iter::once(count)) {
                per.push(c - prev);
                prev = *c;
            }
            hist.entry(name).or_default().push(p::HistogramDataPoint {
                start_time_unix_nano: start,
                time_unix_nano: now,
                count: *count,
                sum: Some(*sum),
                bucket_counts: per,
                explicit_bounds: BUCKETS.to_vec(),
                attributes: attrs(l),
            });
        }
        for (name, points) in hist {
            out.push(p::Metric {
                name: name.to_owned(),
                description: help(name),
                unit: "s".into(),
                data: Some(Data::Histogram(p::Histogram {
                    data_points: points,
                    aggregation_temporality: 2,
                })),
            });
        }
        out
    }
}

/// The route kind of a path: a fixed set, whatever the request says.
pub fn route_kind(listener_admin: bool, path: &str) -> &'static str {
    if listener_admin {
        return match path {
            "/healthz" => "admin_healthz",
            "/epoch" => "admin_epoch",
            "/register" => "admin_register",
            "/bootstrap" => "admin_bootstrap",
            "/revoke" => "admin_revoke",
            "/bump-epoch" => "admin_bump_epoch",
            "/metrics" => "admin_metrics",
            _ => "admin_other",
        };
    }
    match path {
        "/healthz" => "healthz",
        "/v1/enrol" => "enrol",
        "/v1/renew" => "renew",
        "/v1/capabilities" => "capabilities",
        "/v1/capabilities/delegate" => "delegate",
        "/v1/tools" => "tools",
        "/v1/provision" => "provision",
        "/mcp" => "mcp",
        p if p.starts_with("/llm/") => "llm",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms_in_the_text_format() {
        let m = Metrics::default();
        m.inc(
            "lever_requests_total",
            &[("route", "llm"), ("status", "200")],
            2,
        );
        m.observe(
            "lever_request_duration_seconds",
            &[("route", "llm")],
            Duration::from_millis(3),
        );
        let t = m.render(&[]);
        assert!(
            t.contains("lever_requests_total{route=\"llm\",status=\"200\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("lever_request_duration_seconds_bucket{route=\"llm\",le=\"0.0025\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("lever_request_duration_seconds_bucket{route=\"llm\",le=\"0.005\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("lever_request_duration_seconds_count{route=\"llm\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE lever_open_streams gauge\nlever_open_streams 0\n"),
            "{t}"
        );
    }

    #[test]
    fn series_hashes_tell_parts_apart() {
        let cases: &[(&str, &[(&'static str, &str)])] = &[
            (
                "lever_requests_total",
                &[("route", "llm"), ("status", "200")],
            ),
            (
                "lever_requests_total",
                &[("route", "llm"), ("status", "201")],
            ),
            (
                "lever_requests_total",
                &[("route", "llm2"), ("status", "00")],
            ),
            ("lever_requests_total", &[("route", "ab"), ("status", "c")]),
            ("lever_requests_total", &[("route", "a"), ("status", "bc")]),
            ("lever_requests_totalx", &[]),
            ("lever_requests_total", &[("x", "")]),
            ("lever_requests_total", &[]),
            // Parts of eight bytes and more.
            (
                "lever_request_duration_seconds",
                &[("route", "capabilities")],
            ),
            (
                "lever_request_duration_seconds",
                &[("route", "capabilitiez")],
            ),
        ];
        let hashes: std::collections::BTreeSet<u64> =
            cases.iter().map(|(n, l)| series_hash(n, l)).collect();
        assert_eq!(hashes.len(), cases.len());
    }

    #[test]
    fn series_are_found_again_and_kept_apart() {
        let m = Metrics::default();
        for _ in 0..3 {
            m.inc(
                "lever_requests_total",
                &[("route", "llm"), ("status", "200")],
                1,
            );
        }
        m.inc(
            "lever_requests_total",
            &[("route", "llm"), ("status", "429")],
            1,
        );
        m.inc(
            "lever_requests_total",
            &[("route", "mcp"), ("status", "200")],
            1,
        );
        // Label boundaries count: ("ab","c") is not ("a","bc").
        m.inc(
            "lever_denials_total",
            &[("route", "ab"), ("reason", "c")],
            1,
        );
        m.inc(
            "lever_denials_total",
            &[("route", "a"), ("reason", "bc")],
            5,
        );
        let c = m.counter_snapshot();
        let get = |n: &'static str, l: &[(&'static str, &str)]| c.get(&(n, labels(l))).copied();
        assert_eq!(
            get(
                "lever_requests_total",
                &[("route", "llm"), ("status", "200")]
            ),
            Some(3)
        );
        assert_eq!(
            get(
                "lever_requests_total",
                &[("route", "llm"), ("status", "429")]
            ),
            Some(1)
        );
        assert_eq!(
            get(
                "lever_requests_total",
                &[("route", "mcp"), ("status", "200")]
            ),
            Some(1)
        );
        assert_eq!(
            get("lever_denials_total", &[("route", "ab"), ("reason", "c")]),
            Some(1)
        );
        assert_eq!(
            get("lever_denials_total", &[("route", "a"), ("reason", "bc")]),
            Some(5)
        );
        assert_eq!(c.len(), 5);
        // A collision in the index still finds the right series.
        let mut s: Series<u64> = Series::default();
        *s.get("x", &[("k", "1")]) += 1;
        let h = series_hash("x", &[("k", "2")]);
        s.index.insert(h, 0);
        *s.get("x", &[("k", "2")]) += 7;
        assert_eq!(*s.get("x", &[("k", "1")]), 1);
        assert_eq!(*s.get("x", &[("k", "2")]), 7);
    }

    #[test]
    fn a_denial_counts_its_reason_and_a_rate_limit_its_lane() {
        let m = Metrics::default();
        m.denial("llm", "rate_limited", Some("llm"));
        m.denial("mcp", "constraint_mismatch", None);
        m.denial("mcp", "rate_limited", Some("tool"));
        let c = m.counter_snapshot();
        let get = |n: &'static str, l: &[(&'static str, &str)]| c.get(&(n, labels(l))).copied();
        assert_eq!(
            get(
                "lever_denials_total",
                &[("route", "llm"), ("reason", "rate_limited")]
            ),
            Some(1)
        );
        assert_eq!(
            get(
                "lever_denials_total",
                &[("route", "mcp"), ("reason", "constraint_mismatch")]
            ),
            Some(1)
        );
        assert_eq!(get("lever_rate_limited_total", &[("lane", "llm")]), Some(1));
        assert_eq!(
            get("lever_rate_limited_total", &[("lane", "tool")]),
            Some(1)
        );
        assert_eq!(c.len(), 5);
    }

    #[test]
    fn route_kinds_are_a_fixed_set() {
        assert_eq!(route_kind(false, "/llm/v1/messages"), "llm");
        assert_eq!(route_kind(false, "/anything/an/agent/sends"), "other");
        assert_eq!(route_kind(true, "/metrics"), "admin_metrics");
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}

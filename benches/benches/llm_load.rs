#![allow(clippy::unwrap_used, clippy::expect_used)] // A load harness that cannot set up should stop loudly.

//! Load harness for `/llm`: in one run, against the same mock upstream,
//!
//! - **direct**: plain HTTP to the upstream (the baseline);
//! - **broker**: mTLS + capability token through `lever broker`;
//! - **broker1**: the same with one jail worker (`TOKIO_WORKER_THREADS=1`),
//!   the shape of the nginx here (one worker process);
//! - **nginx** (Debian's): mTLS plus key injection in front of the same
//!   upstream, the operator's alternative.
//!
//! It measures open-loop latency (from each request's *intended* send time,
//! so a stall cannot hide) at 1,000 and 3,000 requests/s, the targets taking
//! turns in short slices, and reports p50/p99 added over direct; closed-loop
//! maximum throughput (also in alternating slices); time to first byte of
//! streams; and the broker's RSS while it holds 1,000 open streams. The
//! mock and the broker run as separate processes (this binary, re-executed
//! in a role); everything shares the machine's cores, so the figures are an
//! upper bound on what each proxy adds.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use lever_benches::lean;
use lever_benches::setup::{Proc, enrol, free_port, role_broker, start_broker};
use lever_broker::client::ClientTls;
use serde_json::json;
use tokio::sync::Semaphore;

const KEY: &str = "sk-ant-bench-key";

fn main() {
    match std::env::var("LEVER_BENCH_ROLE").as_deref() {
        Ok("mock") => return role_mock(),
        Ok("broker") => return role_broker(),
        Ok("sink") => return role_sink(),
        _ => {}
    }
    let quick =
        std::env::args().any(|a| a == "--quick") || std::env::var_os("LEVER_BENCH_QUICK").is_some();
    raise_fd_limit();
    let secs = if quick { 1 } else { 5 };
    // `LEVER_BENCH_ONLY=open,closed,telemetry,ttfb,memory` runs some sections.
    let only = std::env::var("LEVER_BENCH_ONLY").unwrap_or_default();
    let run = |section: &str| only.is_empty() || only.split(',').any(|s| s == section);
    println!(
        "llm load ({} mode: {secs}s per point)",
        if quick { "quick" } else { "full" }
    );
    let dir = std::env::temp_dir().join(format!("lever-bench-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mock_port, nginx_port) = (free_port(), free_port());
    let exe = std::env::current_exe().unwrap();
    let mock = Proc(
        Command::new(&exe)
            .env("LEVER_BENCH_ROLE", "mock")
            .env("MOCK_PORT", mock_port.to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (broker, through, ca) = start_lever(&rt, &dir, mock_port, "", &[]);
    rt.block_on(wait_tcp(mock_port));

    let nginx = start_nginx(&dir, nginx_port, mock_port, &ca);
    if nginx.is_some() {
        rt.block_on(wait_tcp(nginx_port));
    } else {
        println!("  nginx: not installed (apt-get install nginx-light); its column is left out");
    }

    let direct = Arc::new(TargetSpec {
        port: mock_port,
        tls: None,
        path: "/v1/messages",
        auth: ("x-api-key", KEY.to_owned()),
    });
    let via_nginx = Arc::new(TargetSpec {
        port: nginx_port,
        tls: through.tls.clone(),
        path: "/llm/v1/messages",
        auth: ("x-unused", String::new()),
    });
    // The same broker with one jail worker, the shape of the nginx here
    // (one worker process): `TOKIO_WORKER_THREADS`, which `lever broker`
    // honours, set to 1.
    let (one, one_spec, _) = start_lever(
        &rt,
        &dir.join("one"),
        mock_port,
        "",
        &[("TOKIO_WORKER_THREADS", "1")],
    );
    let mut targets = vec![
        ("direct", direct.clone()),
        ("broker", through.clone()),
        ("broker1", one_spec),
    ];
    if nginx.is_some() {
        targets.push(("nginx", via_nginx.clone()));
    }

    // The proxy's processes, by target.
    let pids = |name: &str| -> Vec<u32> {
        match name {
            "broker" => vec![broker.0.id()],
            "broker1" => vec![one.0.id()],
            "nginx" => nginx
                .as_ref()
                .map_or_else(Vec::new, |n| with_children(n.0.id())),
            _ => Vec::new(),
        }
    };
    let proxy_cpu_ns = |name: &str| pids(name).into_iter().map(cpu_ns).sum::<u64>();

    if run("open") {
        let rounds = if quick { 4 } else { 10 };
        println!(
            "\n  open loop (latency from the intended send time, kept by a thread; 64 keep-alive connections; {rounds} rounds of {} ms slices, the targets alternating, latencies pooled)",
            open_slice(quick).as_millis()
        );
        let pools: Vec<Arc<Pool>> = targets
            .iter()
            .map(|(_, t)| rt.block_on(Pool::new(t.clone(), 64)))
            .collect();
        for rate in [1000u64, 3000] {
            for p in &pools {
                open_loop(&rt, p, rate / 10, Duration::from_millis(300)); // warm up
            }
            let mut lats = vec![Vec::new(); pools.len()];
            let mut late = Vec::new();
            let mut cpu = vec![0u64; pools.len()];
            for _ in 0..rounds {
                for (i, p) in pools.iter().enumerate() {
                    let before = proxy_cpu_ns(targets[i].0);
                    let o = open_loop(&rt, p, rate, open_slice(quick));
                    cpu[i] += proxy_cpu_ns(targets[i].0) - before;
                    lats[i].extend(o.lats);
                    late.extend(o.late);
                }
            }
            let mut base = (0u64, 0u64);
            for (((name, _), lats), cpu) in targets.iter().zip(&mut lats).zip(&cpu) {
                lats.sort_unstable();
                let (p50, p99) = (pct(lats, 50.0), pct(lats, 99.0));
                if *name == "direct" {
                    base = (p50, p99);
                    println!(
                        "    {rate:>5} req/s  {name:<7} p50 {p50:>6} us  p99 {p99:>6} us  ({} requests)",
                        lats.len()
                    );
                } else {
                    println!(
                        "    {rate:>5} req/s  {name:<7} p50 {p50:>6} us  p99 {p99:>6} us  => added p50 {:>6} us, p99 {:>6} us  ({:.1} us CPU per request)",
                        p50.saturating_sub(base.0),
                        p99.saturating_sub(base.1),
                        *cpu as f64 / 1e3 / lats.len().max(1) as f64
                    );
                }
            }
            late.sort_unstable();
            println!(
                "    {rate:>5} req/s  (the schedule handed requests over late by p50 {} us, p99 {} us)",
                pct(&late, 50.0),
                pct(&late, 99.0)
            );
        }
    }

    if run("closed") {
        let rounds = if quick { 4 } else { 10 };
        println!(
            "\n  closed loop (64 connections each, as fast as each answers; {rounds} rounds of 1 s slices, the targets alternating; medians)"
        );
        // Per target: the proxy, the mock, the load generator (this process).
        let groups: Vec<Vec<Vec<u32>>> = targets
            .iter()
            .map(|(n, _)| vec![pids(n), vec![mock.0.id()], vec![std::process::id()]])
            .collect();
        let specs: Vec<Arc<TargetSpec>> = targets.iter().map(|(_, t)| t.clone()).collect();
        let m = alternate(&closed_rt(), &specs, &groups, rounds, SLICE);
        let nginx_at = targets.iter().position(|(n, _)| *n == "nginx");
        for (i, (name, _)) in targets.iter().enumerate() {
            let budget = format!(
                "CPU per request: mock {:.1} us, load generator {:.1} us",
                m.cpu(i, 1),
                m.cpu(i, 2)
            );
            if i == 0 {
                println!("    {name:<7} {:>9.0} req/s  ({budget})", m.rps(i));
            } else {
                println!(
                    "    {name:<7} {:>9.0} req/s  {:.1} us CPU per request ({:.2}x direct{}; {budget})",
                    m.rps(i),
                    m.cpu(i, 0),
                    m.ratio(i, 0),
                    match nginx_at {
                        Some(n) if n != i => format!(", {:.2}x nginx", m.ratio(i, n)),
                        _ => String::new(),
                    }
                );
            }
        }
    }

    if run("telemetry") {
        telemetry_cost(&rt, &dir, mock_port, (&through, broker.0.id()), secs);
    }

    if run("ttfb") {
        println!("\n  time to first byte of a stream (new connection each, median of 20)");
    }
    for (name, t) in targets.iter().filter(|_| run("ttfb")) {
        let mut v: Vec<u64> = (0..20).map(|_| rt.block_on(ttfb(t))).collect();
        v.sort_unstable();
        println!("    {name:<7} {:>6} us", v[v.len() / 2]);
    }

    if !run("memory") {
        // The brokers stop (and write their audit tips) before their
        // state dirs go.
        drop((broker, one, nginx));
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    println!("\n  broker memory with 1,000 open streams");
    let before = rss_kib(broker.0.id());
    let held = rt.block_on(hold_streams(&through, 1000));
    let during = rss_kib(broker.0.id());
    println!(
        "    {held} streams open: broker RSS {:.1} MiB (idle {:.1} MiB, {:.1} KiB per stream)",
        during as f64 / 1024.0,
        before as f64 / 1024.0,
        (during.saturating_sub(before)) as f64 / held.max(1) as f64
    );
    drop((broker, one, nginx));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A broker on its own state dir in `root`, in front of the mock, with
/// `extra` appended to its `broker:` section and `env` set; one agent
/// enrolled (as `lever agent` would) and holding an `llm/generate` token.
/// Returns the process, the target, and the broker CA's PEM.
fn start_lever(
    rt: &tokio::runtime::Runtime,
    root: &std::path::Path,
    mock_port: u16,
    extra: &str,
    env: &[(&str, &str)],
) -> (Proc, Arc<TargetSpec>, String) {
    std::fs::create_dir_all(root.join("ws")).unwrap();
    write(&root.join("key"), KEY, 0o600);
    let (jail, admin) = (free_port(), free_port());
    write(
        &root.join("lever.yaml"),
        &format!(
            "name: load\nbackend: qemu\ntree: ws\nmanager: {{image: img/x:1}}\nbroker:\n  api_key_file: key\n  upstream: http://127.0.0.1:{mock_port}\n  jail_port: {jail}\n  admin_port: {admin}\n  rate_limits: {{llm: {{per_minute: 1000000, burst: 100000, max_concurrent: 10000}}}}\n{extra}"
        ),
        0o644,
    );
    let (proc, admin_t, jail_t) = start_broker(rt, &root.join("lever.yaml"), (admin, jail), env);
    let (ca, tls, token) = rt.block_on(enrol(
        &admin_t,
        &jail_t,
        json!([{"tool": "llm", "op": "generate"}]),
    ));
    let spec = Arc::new(TargetSpec {
        port: jail,
        tls: Some(tls),
        path: "/llm/v1/messages",
        auth: ("x-api-key", token),
    });
    (proc, spec, ca)
}

/// Closed-loop throughput of the broker with OTLP export on (to a local
/// sink that accepts everything) against the same broker build with it off,
/// in alternating slices (the box's noise is several percent from run to
/// run, the same size as what is measured: adjacent slices share it).
fn telemetry_cost(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    mock_port: u16,
    (off, off_pid): (&Arc<TargetSpec>, u32),
    secs: u64,
) {
    // The collector stand-in runs as its own process, as a collector would.
    let sink = free_port();
    let _sink = Proc(
        Command::new(std::env::current_exe().unwrap())
            .env("LEVER_BENCH_ROLE", "sink")
            .env("SINK_PORT", sink.to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    rt.block_on(wait_tcp(sink));
    // Two brokers exporting: every trace kept, and traces sampled at 10%
    // (log records are never sampled).
    let mut procs = Vec::new();
    let mut on = Vec::new();
    for (name, env) in [
        ("otel", vec![]),
        (
            "otel-sampled",
            vec![
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
            ],
        ),
    ] {
        let (proc, spec, _) = start_lever(
            rt,
            &dir.join(name),
            mock_port,
            &format!("  telemetry: {{otlp_endpoint: 'http://127.0.0.1:{sink}'}}\n"),
            &env,
        );
        procs.push(proc);
        on.push(spec);
    }
    // Three times the closed loop's rounds, of half-length slices: more
    // pairs of adjacent slices, each pair closer in time (the cost is a
    // few percent and the host swings by more).
    let rounds = if secs <= 1 { 8 } else { 30 };
    println!(
        "\n  telemetry: OTLP export (logs, spans, metrics to a collector stand-in process) vs off, closed loop, {rounds} rounds of 500 ms slices alternating; cost = 1 - median(on/off) of adjacent slices"
    );
    let groups: Vec<Vec<Vec<u32>>> = [off_pid, procs[0].0.id(), procs[1].0.id()]
        .into_iter()
        .map(|p| vec![vec![p], vec![_sink.0.id()]])
        .collect();
    let specs = [off.clone(), on[0].clone(), on[1].clone()];
    let m = alternate(&closed_rt(), &specs, &groups, rounds, SLICE / 2);
    let cost = |i: usize| (1.0 - m.ratio(i, 0)) * 100.0;
    // The middle half of the per-round costs: the spread of the pairs.
    let spread = |i: usize| {
        let (lo, hi) = m.ratio_quartiles(i, 0);
        format!("{:.1} to {:.1}%", (1.0 - hi) * 100.0, (1.0 - lo) * 100.0)
    };
    println!(
        "    off {:>9.0} req/s   on {:>9.0} req/s => cost {:.1}% (target < 5%; middle half of the rounds {})",
        m.rps(0),
        m.rps(1),
        cost(1),
        spread(1),
    );
    println!(
        "    on, traces sampled 10% {:>9.0} req/s => cost {:.1}% (middle half {})",
        m.rps(2),
        cost(2),
        spread(2),
    );
    // What one request exports: a closed loop on the all-traces broker
    // alone, the collector's counts read before and after (after the
    // exporter's one-second collection of what has gathered).
    let before = rt.block_on(sink_count(sink));
    let pool = rt.block_on(Pool::new(specs[1].clone(), 64));
    let (n, _) = rt.block_on(run_closed(&pool, 64, SLICE / 2));
    std::thread::sleep(Duration::from_millis(2500));
    let after = rt.block_on(sink_count(sink));
    let per = |k: usize| (after[k].saturating_sub(before[k])) as f64 / n.max(1) as f64;
    println!(
        "    exported per request: spans {:.0} B, log records {:.0} B ({n} requests)",
        per(0),
        per(1)
    );
    let more = |i: usize| (m.cpu(i, 0) / m.cpu(0, 0) - 1.0) * 100.0;
    println!(
        "    CPU per request: broker off {:.1} us, on {:.1} us ({:+.1}%), sampled {:.1} us ({:+.1}%); collector stand-in {:.1} us / {:.1} us",
        m.cpu(0, 0),
        m.cpu(1, 0),
        more(1),
        m.cpu(2, 0),
        more(2),
        m.cpu(1, 1),
        m.cpu(2, 1),
    );
    drop(procs);
}

struct TargetSpec {
    port: u16,
    tls: Option<ClientTls>,
    path: &'static str,
    auth: (&'static str, String),
}

fn body(stream: bool, prompt: &str) -> Bytes {
    Bytes::from(
        json!({"model": "claude-mock-1", "max_tokens": 16, "stream": stream, "messages": [{"role": "user", "content": prompt}]})
            .to_string(),
    )
}

fn request(t: &TargetSpec, stream: bool, prompt: &str) -> Request<Full<Bytes>> {
    let mut b = Request::post(t.path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01");
    if !t.auth.1.is_empty() {
        b = b.header(t.auth.0, t.auth.1.as_str());
    }
    b.body(Full::new(body(stream, prompt))).unwrap()
}

async fn connect(t: &TargetSpec) -> SendRequest<Full<Bytes>> {
    lever_benches::setup::connect(t.port, t.tls.as_ref()).await
}

/// The non-streaming request of the load sections, whole, as the lean
/// client sends it.
fn load_request(t: &TargetSpec) -> Vec<u8> {
    let mut headers = vec![
        ("host", "localhost"),
        ("content-type", "application/json"),
        ("anthropic-version", "2023-06-01"),
    ];
    if !t.auth.1.is_empty() {
        headers.push((t.auth.0, t.auth.1.as_str()));
    }
    lean::post(t.path, &headers, &body(false, "load"))
}

/// Keep-alive connections of the lean client, each used by one request at
/// a time.
struct Pool {
    spec: Arc<TargetSpec>,
    request: Vec<u8>,
    free: Mutex<Vec<lean::Conn>>,
    slots: Semaphore,
}

impl Pool {
    async fn new(spec: Arc<TargetSpec>, n: usize) -> Arc<Pool> {
        let mut free = Vec::new();
        for _ in 0..n {
            free.push(lean::connect(spec.port, spec.tls.as_ref()).await.unwrap());
        }
        Arc::new(Pool {
            request: load_request(&spec),
            spec,
            free: Mutex::new(free),
            slots: Semaphore::new(n),
        })
    }

    /// One request on a free connection.
    async fn call(&self) {
        let _slot = self.slots.acquire().await.unwrap();
        let c = self.free.lock().unwrap().pop().unwrap();
        let c = self.call_on(c).await;
        self.free.lock().unwrap().push(c);
    }

    /// One request on `c`, or on a new connection if the server closed
    /// it: said so (nginx after 1,000 requests), or silently (the broker's
    /// keep-alive idle limit; this client reads only when it waits for an
    /// answer, so it learns of that when the request fails, and sends it
    /// again on a new connection, as hyper's pool would).
    async fn call_on(&self, mut c: lean::Conn) -> lean::Conn {
        let fresh = || lean::connect(self.spec.port, self.spec.tls.as_ref());
        if c.closed {
            c = fresh().await.unwrap();
        }
        let status = match c.call(&self.request).await {
            Ok(s) => s,
            Err(_) => {
                c = fresh().await.unwrap();
                c.call(&self.request).await.unwrap()
            }
        };
        assert_eq!(status, 200);
        c
    }
}

/// An open loop's latencies (µs, sorted, from each request's intended
/// send time) and how late the schedule handed each request over (µs,
/// sorted).
struct OpenLoop {
    lats: Vec<u64>,
    late: Vec<u64>,
}

/// Sends `rate` requests per second for `dur`, each at its intended time.
/// The schedule is kept by a dedicated thread, not by the async timer (1
/// ms granularity): it sleeps with a timer slack of 1 ns (the default, 50
/// µs, let a sleep end that much late, and that lateness went into every
/// latency) to `AWAKE` before the send time, and waits the rest out awake.
/// The request is then handed to the runtime, whose wake-up is counted,
/// as every client's is.
fn open_loop(rt: &tokio::runtime::Runtime, pool: &Arc<Pool>, rate: u64, dur: Duration) -> OpenLoop {
    const AWAKE: Duration = Duration::from_micros(100);
    let n = (rate as f64 * dur.as_secs_f64()) as u64;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let lats = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let mut late = Vec::with_capacity(n as usize);
    let handle = rt.handle().clone();
    let start = Instant::now() + Duration::from_millis(10);
    let tasks: Vec<tokio::task::JoinHandle<()>> = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
                let mut tasks = Vec::with_capacity(n as usize);
                for i in 0..n {
                    let at = start + period * u32::try_from(i).unwrap_or(u32::MAX);
                    let now = Instant::now();
                    if at > now + AWAKE {
                        std::thread::sleep(at - now - AWAKE);
                    }
                    while Instant::now() < at {
                        std::hint::spin_loop();
                    }
                    late.push(at.elapsed().as_micros() as u64);
                    let (pool, lats) = (pool.clone(), lats.clone());
                    tasks.push(handle.spawn(async move {
                        pool.call().await;
                        lats.lock().unwrap().push(at.elapsed().as_micros() as u64);
                    }));
                }
                tasks
            })
            .join()
            .unwrap()
    });
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    let mut lats = Arc::try_unwrap(lats).unwrap().into_inner().unwrap();
    lats.sort_unstable();
    late.sort_unstable();
    OpenLoop { lats, late }
}

/// One slice of an alternating closed-loop measurement.
const SLICE: Duration = Duration::from_secs(1);

/// One slice of an alternating open-loop measurement: the targets take
/// turns, so a slow spell of the machine (they last seconds here) falls on
/// all of them instead of on whichever ran during it.
fn open_slice(quick: bool) -> Duration {
    Duration::from_millis(if quick { 250 } else { 500 })
}

/// Closed-loop measurements of several targets in alternating slices.
struct Slices {
    /// `[target][round]`: requests per second.
    rps: Vec<Vec<f64>>,
    /// `[target][round][group]`: CPU µs per request of each process group.
    cpu: Vec<Vec<Vec<f64>>>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

impl Slices {
    fn rps(&self, t: usize) -> f64 {
        median(self.rps[t].clone())
    }

    /// The median over rounds of target `t`'s throughput over `base`'s in
    /// the same round (adjacent slices: a slow spell of the machine hits
    /// both).
    fn ratio(&self, t: usize, base: usize) -> f64 {
        median(self.ratios(t, base))
    }

    /// The quartiles (25th, 75th percentile) of the per-round ratios of
    /// [`Slices::ratio`]: how far apart the pairs of slices were.
    fn ratio_quartiles(&self, t: usize, base: usize) -> (f64, f64) {
        let mut r = self.ratios(t, base);
        r.sort_by(f64::total_cmp);
        let at = |q: f64| {
            r.get((r.len().saturating_sub(1) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        (at(0.25), at(0.75))
    }

    /// Target `t`'s throughput over `base`'s, round by round.
    fn ratios(&self, t: usize, base: usize) -> Vec<f64> {
        self.rps[t]
            .iter()
            .zip(&self.rps[base])
            .map(|(a, b)| a / b)
            .collect()
    }

    fn cpu(&self, t: usize, group: usize) -> f64 {
        median(self.cpu[t].iter().map(|g| g[group]).collect())
    }
}

/// The load generator's runtime for closed loops: one thread, its
/// connections and their tasks on it (no wake-ups across threads).
/// Closed loops of 64 connections need far less than a core to drive
/// (about 10 µs of CPU per request), and every microsecond the generator
/// spends is taken from the two cores the proxies run on.
fn closed_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `rounds` rounds; in each, every target in turn for `slice` (64
/// connections each, opened and warmed up once), and reads the CPU time
/// each of its process `groups` used meanwhile.
fn alternate(
    rt: &tokio::runtime::Runtime,
    targets: &[Arc<TargetSpec>],
    groups: &[Vec<Vec<u32>>],
    rounds: usize,
    slice: Duration,
) -> Slices {
    let pools: Vec<Arc<Pool>> = targets
        .iter()
        .map(|t| rt.block_on(Pool::new(t.clone(), 64)))
        .collect();
    for p in &pools {
        rt.block_on(run_closed(p, 64, slice / 5));
    }
    let cpu_of = |g: &[Vec<u32>]| -> Vec<u64> {
        g.iter()
            .map(|ps| ps.iter().copied().map(cpu_ns).sum())
            .collect()
    };
    let mut out = Slices {
        rps: vec![Vec::new(); targets.len()],
        cpu: vec![Vec::new(); targets.len()],
    };
    for _ in 0..rounds {
        for (i, pool) in pools.iter().enumerate() {
            let before = cpu_of(&groups[i]);
            let (n, took) = rt.block_on(run_closed(pool, 64, slice));
            let used = cpu_of(&groups[i])
                .iter()
                .zip(&before)
                .map(|(a, b)| a.saturating_sub(*b) as f64 / 1000.0 / n.max(1) as f64)
                .collect();
            out.rps[i].push(n as f64 / took.as_secs_f64());
            out.cpu[i].push(used);
        }
    }
    out
}

/// Requests completed and the time taken: `workers` tasks, each holding
/// one of the pool's connections for the whole run.
async fn run_closed(pool: &Arc<Pool>, workers: usize, dur: Duration) -> (u64, Duration) {
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = Instant::now() + dur;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (pool, done) = (pool.clone(), done.clone());
        let mut c = pool.free.lock().unwrap().pop().unwrap();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < deadline {
                c = pool.call_on(c).await;
                n += 1;
            }
            done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            pool.free.lock().unwrap().push(c);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (
        done.load(std::sync::atomic::Ordering::Relaxed),
        start.elapsed(),
    )
}

/// A process and its children (nginx's master and its worker).
fn with_children(pid: u32) -> Vec<u32> {
    let mut v = vec![pid];
    if let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        v.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
    }
    v
}

/// CPU time a process has used (all its threads), in nanoseconds.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The collector stand-in's counts: body bytes of spans, of log records.
async fn sink_count(port: u16) -> [u64; 2] {
    let mut s = lever_benches::setup::connect(port, None).await;
    let resp = s
        .send_request(
            Request::get("/count")
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = std::str::from_utf8(&body).unwrap();
    let mut n = text.split(' ').map(|v| v.parse::<u64>().unwrap());
    [n.next().unwrap(), n.next().unwrap()]
}

async fn ttfb(t: &TargetSpec) -> u64 {
    let start = Instant::now();
    let mut s = connect(t).await;
    let resp = s
        .send_request(request(t, true, "mock:events=3"))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let _ = body.frame().await;
    let us = start.elapsed().as_micros() as u64;
    while body.frame().await.is_some() {}
    us
}

/// Opens `n` streams that stay open (the mock pauses 20 s mid-stream) and
/// returns how many reached their first byte.
async fn hold_streams(t: &Arc<TargetSpec>, n: usize) -> usize {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(n);
    let hold = Arc::new(tokio::sync::Notify::new());
    for _ in 0..n {
        let (t, tx, hold) = (t.clone(), tx.clone(), hold.clone());
        tokio::spawn(async move {
            let mut s = connect(&t).await;
            let resp = s
                .send_request(request(&t, true, "mock:events=2 gap_ms=20000"))
                .await
                .unwrap();
            let mut body = resp.into_body();
            let _ = body.frame().await;
            let _ = tx.send(()).await;
            hold.notified().await;
            drop(body);
        });
    }
    drop(tx);
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(())) => got += 1,
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    got
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p / 100.0) as usize).min(sorted.len() - 1)]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn write(path: &std::path::Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if let Some(max) = l.maximum {
        l.current = Some(max.min(65_536));
        let _ = setrlimit(Resource::Nofile, l);
    }
}

async fn wait_tcp(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("port {port} never opened");
}

fn pem(label: &str, der: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for c in der.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                b64.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// nginx with mTLS (client certificates from the broker CA) and key
/// injection, proxying to the mock with keep-alive upstream connections.
fn start_nginx(dir: &std::path::Path, port: u16, mock: u16, ca_pem: &str) -> Option<Proc> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let sd = dir.join(".lever");
    let ca =
        lever_broker::ca::Ca::load(&std::fs::read_to_string(sd.join("ca.key")).unwrap(), ca_pem)
            .unwrap();
    let (chain, key, _) = ca.issue_server().unwrap();
    let nd = dir.join("nginx");
    std::fs::create_dir_all(nd.join("logs")).unwrap();
    write(
        &nd.join("srv.pem"),
        &chain
            .iter()
            .map(|c| pem("CERTIFICATE", c.as_ref()))
            .collect::<String>(),
        0o644,
    );
    write(
        &nd.join("srv.key"),
        &pem("PRIVATE KEY", key.secret_der()),
        0o600,
    );
    write(&nd.join("ca.pem"), ca_pem, 0o644);
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log stderr error;\nevents {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp;\n  upstream mock {{ server 127.0.0.1:{mock}; keepalive 128; }}\n  server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_protocols TLSv1.3;\n    ssl_certificate {d}/srv.pem;\n    ssl_certificate_key {d}/srv.key;\n    ssl_client_certificate {d}/ca.pem;\n    ssl_verify_client on;\n    location /llm/ {{\n      proxy_pass http://mock/;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Authorization \"\";\n      proxy_set_header x-api-key \"{KEY}\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
        d = nd.display()
    );
    write(&nd.join("nginx.conf"), &conf, 0o644);
    std::fs::create_dir_all(nd.join("tmp")).unwrap();
    let child = Command::new(nginx)
        .args([
            "-p",
            &nd.display().to_string(),
            "-c",
            &nd.join("nginx.conf").display().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Proc(child))
}

fn role_mock() {
    let port: u16 = std::env::var("MOCK_PORT").unwrap().parse().unwrap();
    // One thread, as nginx's one worker: the mock is everyone's upstream,
    // what it spends is taken from every target alike.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        lever_broker::mock_upstream::serve(l, Some(KEY.to_owned())).await;
    });
}

/// Body bytes the collector stand-in has received: spans, log records.
static SUNK: [std::sync::atomic::AtomicU64; 2] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

/// An OTLP/HTTP collector stand-in: reads each export and answers 200;
/// `GET /count` answers the body bytes of spans and of log records it has
/// received so far. A blocking thread per connection reading into one
/// large buffer and counting bytes (no HTTP library, no copy of a body):
/// its CPU is on the same two cores as the broker it measures, so it
/// should cost as little as a receiver can.
fn role_sink() {
    let port: u16 = std::env::var("SINK_PORT").unwrap().parse().unwrap();
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    for tcp in l.incoming() {
        let Ok(tcp) = tcp else { continue };
        std::thread::spawn(move || {
            let _ = sink_connection(tcp);
        });
    }
}

/// Serves one keep-alive connection of the stand-in until it closes.
fn sink_connection(mut tcp: std::net::TcpStream) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering::Relaxed;
    let mut buf = vec![0u8; 1 << 20];
    // Bytes in `buf[..have]` not yet consumed.
    let mut have = 0;
    loop {
        // The head: read until the blank line.
        let head = loop {
            if let Some(n) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                break n + 4;
            }
            if have == buf.len() {
                return Err(std::io::Error::other("head too large"));
            }
            let n = tcp.read(&mut buf[have..])?;
            if n == 0 {
                return Ok(());
            }
            have += n;
        };
        let text = std::str::from_utf8(&buf[..head]).map_err(std::io::Error::other)?;
        // The exporter always sends a length; anything else would be
        // miscounted, so it ends the connection.
        if text.to_ascii_lowercase().contains("\ntransfer-encoding:") {
            return Err(std::io::Error::other("a body without content-length"));
        }
        let path = text.split(' ').nth(1).unwrap_or("");
        let kind = match path {
            "/v1/traces" => Some(0),
            "/v1/logs" => Some(1),
            _ => None,
        };
        let length: usize = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let answer = if path == "/count" {
            format!("{} {}", SUNK[0].load(Relaxed), SUNK[1].load(Relaxed))
        } else {
            String::new()
        };
        // The body: what is buffered past the head, then reads of the rest.
        let mut left = length;
        let buffered = (have - head).min(left);
        left -= buffered;
        buf.copy_within(head + buffered..have, 0);
        have -= head + buffered;
        while left > 0 {
            let n = tcp.read(&mut buf[..left.min(1 << 20)])?;
            if n == 0 {
                return Ok(());
            }
            left -= n;
        }
        if let Some(k) = kind {
            SUNK[k].fetch_add(length as u64, Relaxed);
        }
        tcp.write_all(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{answer}",
                answer.len()
            )
            .as_bytes(),
        )?;
    }
}

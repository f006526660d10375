#![allow(clippy::unwrap_used, clippy::expect_used)] // A bench that cannot set up should stop loudly.

//! MCP `tools/call` round trip, in one run against the same backend:
//!
//! - **direct**: plain HTTP to `lever-tool-db` on its loopback port (the
//!   baseline: what the tool itself costs);
//! - **broker**: mTLS + capability token (pinned to `table: users`) through
//!   `lever broker`'s `/mcp`, which authorizes the call and forwards it to
//!   the same supervised backend.
//!
//! Sequential calls on one keep-alive connection give p50/p99 latency and
//! the broker's added p50 (target: under 1 ms); a closed loop of concurrent
//! connections gives throughput. The broker and the tool run as their own
//! processes (this binary re-executed in a role).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use lever_benches::setup::{
    ROLE_TOOL, connect, enrol, free_port, role_broker, role_tool, start_broker,
};
use lever_broker::client::ClientTls;
use serde_json::{Value, json};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if role_tool() {
        return;
    }
    if std::env::var("LEVER_BENCH_ROLE").as_deref() == Ok("broker") {
        return role_broker();
    }
    let quick =
        args.iter().any(|a| a == "--quick") || std::env::var_os("LEVER_BENCH_QUICK").is_some();
    let (calls, secs) = if quick { (300, 1) } else { (5000, 5) };
    println!(
        "mcp tools/call ({} mode: {calls} sequential calls, {secs}s closed loop)",
        if quick { "quick" } else { "full" }
    );
    let dir = std::env::temp_dir().join(format!("lever-bench-mcp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("ws")).unwrap();
    let db = dir.join("data.db");
    lever_tool_db::db::init_demo(&db).unwrap();
    std::fs::write(dir.join("key"), "sk-ant-bench").unwrap();
    std::fs::set_permissions(
        dir.join("key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let (jail, admin, tool) = (free_port(), free_port(), free_port());
    let exe = std::env::current_exe().unwrap();
    std::fs::write(
        dir.join("lever.yaml"),
        format!(
            "name: bench\nbackend: qemu\ntree: ws\nmanager:\n  image: img/x:1\n  obtain: [{{tool: db, op: read}}]\nbroker:\n  api_key_file: key\n  jail_port: {jail}\n  admin_port: {admin}\n  rate_limits: {{tools: {{per_minute: 1000000, burst: 100000, max_concurrent: 1000}}}}\n  tools:\n    - name: db\n      command: ['{}', {ROLE_TOOL}, '{}']\n      backend: 127.0.0.1:{tool}\n      operations: [{{name: read}}]\n      allowed_values: {{table: [users, orders]}}\n",
            exe.display(),
            db.display()
        ),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (broker, admin_t, jail_t) = start_broker(&rt, &dir.join("lever.yaml"), (admin, jail), &[]);
    let (_, tls, token) = rt.block_on(enrol(
        &admin_t,
        &jail_t,
        json!([{"tool": "db", "op": "read", "constraints": {"table": "users"}}]),
    ));
    // The tool is up once the broker can reach it.
    rt.block_on(wait(|| async { tcp_up(tool).await }));

    let direct = Spec {
        port: tool,
        tls: None,
        auth: None,
        session: None,
        name: "read",
    };
    let mut via = Spec {
        port: jail,
        tls: Some(tls),
        auth: Some(format!("Bearer {token}")),
        session: None,
        name: "db_read",
    };
    via.session = Some(rt.block_on(initialize(&via)));
    let direct = Arc::new(direct);
    let via = Arc::new(via);
    // Both answer the same thing.
    let a = rt.block_on(one_call(&direct));
    let b = rt.block_on(one_call(&via));
    assert_eq!(
        a["result"]["structuredContent"], b["result"]["structuredContent"],
        "{a} vs {b}"
    );

    println!("\n  sequential round trips (one keep-alive connection)");
    let mut p50 = Vec::new();
    for (name, spec) in [("direct", &direct), ("broker", &via)] {
        let lat = rt.block_on(sequential(spec, calls));
        let (m, p99) = (pct(&lat, 50), pct(&lat, 99));
        println!("    {name:<7} p50 {m:>6} us  p99 {p99:>6} us  ({calls} calls)");
        p50.push((m, p99));
    }
    println!(
        "    => broker adds p50 {} us, p99 {} us (target: p50 < 1000 us)",
        p50[1].0 as i64 - p50[0].0 as i64,
        p50[1].1 as i64 - p50[0].1 as i64
    );
    println!("\n  closed loop (16 connections, as fast as each answers)");
    let mut rates = Vec::new();
    for (name, spec) in [("direct", &direct), ("broker", &via)] {
        let r = rt.block_on(closed_loop(spec, 16, Duration::from_secs(secs)));
        println!("    {name:<7} {r:>8.0} calls/s");
        rates.push(r);
    }
    println!("    => broker: {:.2}x direct", rates[1] / rates[0]);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

struct Spec {
    port: u16,
    tls: Option<ClientTls>,
    auth: Option<String>,
    session: Option<String>,
    name: &'static str,
}

async fn tcp_up(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

async fn wait<F, Fut>(f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn post(spec: &Spec, msg: &Value) -> Request<Full<Bytes>> {
    let mut b = Request::post("/mcp")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(a) = &spec.auth {
        b = b.header("authorization", a.as_str());
    }
    if let Some(s) = &spec.session {
        b = b.header("mcp-session-id", s.as_str());
    }
    b.body(Full::new(Bytes::from(msg.to_string()))).unwrap()
}

async fn exchange(
    s: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (http::HeaderMap, Value) {
    s.ready().await.unwrap();
    let resp = s.send_request(req).await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

async fn initialize(spec: &Spec) -> String {
    let mut s = connect(spec.port, spec.tls.as_ref()).await;
    let msg = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}});
    let (h, _) = exchange(&mut s, post(spec, &msg)).await;
    h["mcp-session-id"].to_str().unwrap().to_owned()
}

fn call_msg(spec: &Spec) -> Value {
    json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
           "params": {"name": spec.name, "arguments": {"table": "users", "filter": "Grace"}}})
}

async fn one_call(spec: &Spec) -> Value {
    let mut s = connect(spec.port, spec.tls.as_ref()).await;
    // The backend may still be starting behind the broker.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = exchange(&mut s, post(spec, &call_msg(spec))).await;
        if v["error"]["data"]["reason"] != "backend_unavailable" || Instant::now() > deadline {
            assert!(v["result"].is_object(), "{v}");
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sequential(spec: &Spec, n: usize) -> Vec<u64> {
    let mut s = connect(spec.port, spec.tls.as_ref()).await;
    let msg = call_msg(spec);
    for _ in 0..n / 10 {
        exchange(&mut s, post(spec, &msg)).await;
    }
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (_, v) = exchange(&mut s, post(spec, &msg)).await;
        lat.push(t.elapsed().as_micros() as u64);
        assert!(v["result"].is_object(), "{v}");
    }
    lat.sort_unstable();
    lat
}

async fn closed_loop(spec: &Arc<Spec>, workers: usize, dur: Duration) -> f64 {
    let end = Instant::now() + dur;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let spec = spec.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = connect(spec.port, spec.tls.as_ref()).await;
            let msg = call_msg(&spec);
            let mut n = 0u64;
            while Instant::now() < end {
                exchange(&mut s, post(&spec, &msg)).await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / dur.as_secs_f64()
}

fn pct(sorted: &[u64], p: usize) -> u64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

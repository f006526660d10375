//! OpenTelemetry export, against a real OTLP/HTTP receiver that decodes
//! with the official protobuf definitions (`tests/py/otlp_receiver.py`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use lever_tests::broker::{Broker, DEFAULT_AGENTS, Instance, RawMcp, start_mock};
use lever_tests::{TempDir, lever, workspace_root};
use serde_json::{Value, json};

const REAL_KEY: &str = "sk-ant-test-real-key";

struct Receiver {
    child: Child,
    out: PathBuf,
    url: String,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn receiver(dir: &Path, name: &str, stall: bool) -> Receiver {
    receiver_mode(dir, name, if stall { "stall" } else { "" })
}

fn receiver_mode(dir: &Path, name: &str, mode: &str) -> Receiver {
    let out = dir.join(format!("{name}.jsonl"));
    let mut cmd = Command::new("python3");
    cmd.arg(workspace_root().join("tests/py/otlp_receiver.py"))
        .arg(&out);
    if !mode.is_empty() {
        cmd.arg(mode);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("otlp receiver ready ")
        .unwrap_or_else(|| {
            panic!("the receiver did not start (pip install -r tests/requirements.txt): {line:?}")
        })
        .to_owned();
    Receiver {
        child,
        out,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// Every decoded export so far.
fn received(r: &Receiver) -> Vec<Value> {
    std::fs::read_to_string(&r.out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn attrs(v: &Value) -> serde_json::Map<String, Value> {
    v["attributes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let val = &a["value"];
            let x = val
                .get("stringValue")
                .or_else(|| val.get("intValue"))
                .or_else(|| val.get("boolValue"))
                .or_else(|| val.get("doubleValue"))
                .cloned()
                .unwrap_or(Value::Null);
            (a["key"].as_str().unwrap().to_owned(), x)
        })
        .collect()
}

fn spans(all: &[Value]) -> Vec<Value> {
    all.iter()
        .filter(|e| e["path"] == "/v1/traces")
        .flat_map(|e| {
            e["msg"]["resourceSpans"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|r| r["scopeSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|s| s["spans"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn logs(all: &[Value]) -> Vec<Value> {
    all.iter()
        .filter(|e| e["path"] == "/v1/logs")
        .flat_map(|e| {
            e["msg"]["resourceLogs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|r| r["scopeLogs"].as_array().cloned().unwrap_or_default())
        .flat_map(|s| s["logRecords"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn wait_for(r: &Receiver, what: &str, f: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = received(r);
        if f(&all) {
            return all;
        }
        assert!(Instant::now() < deadline, "never received {what}: {all:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Setup {
    inst: Instance,
    b: Broker,
    manager: lever_tests::broker::Agent,
    _mock: lever_tests::broker::Proc,
    _scratch: TempDir,
}

fn setup(endpoint: &str) -> Setup {
    setup_with(endpoint, "")
}

fn setup_with(endpoint: &str, extra: &str) -> Setup {
    setup_env(endpoint, extra, &[])
}

fn setup_env(endpoint: &str, extra: &str, env: &[(&str, &str)]) -> Setup {
    let scratch = TempDir::new("mock");
    scratch.write("key", REAL_KEY, 0o600);
    let (mock, mock_url) = start_mock(scratch.path(), "key");
    let inst = Instance::new(
        DEFAULT_AGENTS,
        &format!(
            "  upstream: {mock_url}\n  telemetry: {{otlp_endpoint: '{endpoint}', service_name: lever-test{extra}}}\n"
        ),
    );
    // Metrics every 300 ms, so a test sees them.
    let mut all_env = vec![("OTEL_METRIC_EXPORT_INTERVAL", "300")];
    all_env.extend_from_slice(env);
    let b = inst.start_env(&all_env);
    let manager = b.enrol("manager");
    Setup {
        inst,
        b,
        manager,
        _mock: mock,
        _scratch: scratch,
    }
}

fn llm_call(s: &Setup, token: &str) -> u16 {
    let body = json!({"model": "claude-mock-1", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "hi"}]});
    s.b.jail(
        &s.manager.tls(),
        Method::POST,
        "/llm/v1/messages",
        &[("x-api-key", token)],
        Some(body),
    )
    .status
    .as_u16()
}

#[test]
fn an_llm_call_tool_calls_and_an_enrolment_arrive_as_spans_and_logs_without_secrets() {
    let dir = TempDir::new("otlp");
    let r = receiver(dir.path(), "rx", false);
    let s = setup(&r.url);
    let (llm, _) =
        s.b.token(&s.manager, json!([{"tool": "llm", "op": "generate"}]));
    assert_eq!(llm_call(&s, &llm), 200);
    let (db, _) = s.b.token(
        &s.manager,
        json!([{"tool": "db", "op": "read", "constraints": {"table": "users"}}]),
    );
    let raw = RawMcp::new(&s.b, &s.manager, &db);
    let (sid, _) = raw.initialize("2025-11-25");
    let args = |table: &str| json!({"table": table, "filter": "Grace-secret-filter"});
    raw.wait_ready(&sid, "db_read", args("users"));
    assert_eq!(
        raw.call(&sid, "db_read", args("orders"))["error"]["code"],
        -32001
    );

    let all = wait_for(&r, "the llm span and the tool denial log", |all| {
        let sp = spans(all);
        let lg = logs(all);
        sp.iter()
            .any(|x| attrs(x).get("gen_ai.operation.name") == Some(&json!("chat")))
            && lg.iter().any(|l| {
                let a = attrs(l);
                a.get("lever.event") == Some(&json!("tool"))
                    && a.get("lever.decision") == Some(&json!("deny"))
            })
    });
    assert!(
        all.iter().all(|e| e.get("error").is_none()),
        "undecodable export: {all:#?}"
    );
    assert!(
        all.iter()
            .all(|e| e["content_type"] == "application/x-protobuf")
    );
    let sp = spans(&all);
    let lg = logs(&all);

    // The LLM call: a server span and a gen_ai client span under it.
    let chat = sp
        .iter()
        .find(|x| attrs(x).get("gen_ai.operation.name") == Some(&json!("chat")))
        .unwrap();
    let a = attrs(chat);
    assert_eq!(a["gen_ai.request.model"], "claude-mock-1");
    assert!(
        a.contains_key("gen_ai.usage.input_tokens") && a.contains_key("gen_ai.usage.output_tokens"),
        "{a:?}"
    );
    let server = sp
        .iter()
        .find(|x| x["spanId"] == chat["parentSpanId"])
        .expect("the chat span's parent is not exported");
    let sa = attrs(server);
    assert_eq!(server["name"], "POST /llm/{path}");
    assert_eq!(sa["http.response.status_code"], "200");
    assert_eq!(sa["lever.identity"], "manager");
    assert_eq!(sa["lever.decision"], "allow");
    assert_eq!(server["traceId"], chat["traceId"]);
    // Its steps: token verification and the rate limit, children of it,
    // the second starting where the first ended.
    let step = |name: &str| {
        sp.iter()
            .find(|x| x["name"] == name && x["parentSpanId"] == server["spanId"])
            .unwrap_or_else(|| panic!("no {name} span under the request"))
    };
    let nanos = |x: &Value, k: &str| x[k].as_str().unwrap().parse::<u64>().unwrap();
    let (verify, limit) = (step("verify capability"), step("rate limit"));
    assert_eq!(
        nanos(limit, "startTimeUnixNano"),
        nanos(verify, "endTimeUnixNano")
    );
    assert!(nanos(verify, "startTimeUnixNano") <= nanos(verify, "endTimeUnixNano"));
    assert!(sp.iter().any(|x| x["name"] == "verify capability"
        && attrs(x).get("lever.deny_reason") == Some(&json!("constraint_mismatch"))));
    // Its audit record is a log in the same trace.
    let llm_log = lg
        .iter()
        .find(|l| attrs(l).get("lever.event") == Some(&json!("llm")))
        .unwrap();
    assert_eq!(llm_log["traceId"], chat["traceId"]);
    assert_eq!(attrs(llm_log)["lever.identity"], "manager");

    // Tool calls: spans with the MCP attributes, allow and deny.
    let tool_spans: Vec<_> = sp
        .iter()
        .filter(|x| attrs(x).get("mcp.method.name") == Some(&json!("tools/call")))
        .collect();
    assert!(tool_spans.iter().any(
        |x| attrs(x)["lever.decision"] == "allow" && attrs(x)["gen_ai.tool.name"] == "db_read"
    ));
    let denied = tool_spans
        .iter()
        .find(|x| attrs(x)["lever.decision"] == "deny")
        .unwrap();
    assert_eq!(attrs(denied)["lever.deny_reason"], "constraint_mismatch");
    assert_eq!(attrs(denied)["mcp.session.id"], sid.as_str());
    // The request that carried the denied call says so too, though its
    // HTTP status is 200 (the refusal is a JSON-RPC error).
    let carrier = sp
        .iter()
        .find(|x| x["spanId"] == denied["parentSpanId"])
        .unwrap();
    assert_eq!(attrs(carrier)["http.response.status_code"], "200");
    assert_eq!(attrs(carrier)["lever.decision"], "deny");
    assert_eq!(attrs(carrier)["lever.deny_reason"], "constraint_mismatch");
    let deny_log = lg
        .iter()
        .find(|l| {
            attrs(l).get("lever.event") == Some(&json!("tool"))
                && attrs(l).get("lever.decision") == Some(&json!("deny"))
        })
        .unwrap();
    assert_eq!(attrs(deny_log)["lever.constraint.table"], "orders");
    assert_eq!(
        attrs(deny_log)["lever.detail.args_sha256"]
            .as_str()
            .unwrap()
            .len(),
        64
    );

    // The enrolment.
    assert!(
        lg.iter()
            .any(|l| attrs(l).get("lever.event") == Some(&json!("enrol"))
                && attrs(l).get("lever.identity") == Some(&json!("manager")))
    );
    // The resource.
    let res = &all.iter().find(|e| e["path"] == "/v1/logs").unwrap()["msg"]["resourceLogs"][0]["resource"];
    assert!(attrs(res).get("service.name") == Some(&json!("lever-test")));

    // No secret anywhere in the bytes that left.
    let raw: Vec<u8> = all
        .iter()
        .flat_map(|e| lever_policy::hex::decode(e["raw"].as_str().unwrap()).unwrap())
        .collect();
    let raw = String::from_utf8_lossy(&raw);
    for secret in [
        llm.as_str(),
        db.as_str(),
        REAL_KEY,
        "Grace-secret-filter",
        "lvtk_",
        "BEGIN",
    ] {
        assert!(!raw.contains(secret), "{secret:?} was exported");
    }
    // Metrics over OTLP, the same names as /metrics: the LLM call counted.
    let all = wait_for(&r, "metrics with the llm call", |all| {
        metric_value(all, "lever_requests_total", "llm") >= 1.0
    });
    assert!(metric_value(&all, "lever_llm_calls_total", "200") >= 1.0);
    assert!(metrics(&all).iter().any(|m| {
        m["name"] == "lever_request_duration_seconds"
            && m["histogram"]["dataPoints"][0]["explicitBounds"]
                .as_array()
                .is_some_and(|b| !b.is_empty())
    }));
    drop(s.inst);
}

fn metrics(all: &[Value]) -> Vec<Value> {
    all.iter()
        .filter(|e| e["path"] == "/v1/metrics")
        .flat_map(|e| {
            e["msg"]["resourceMetrics"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|r| r["scopeMetrics"].as_array().cloned().unwrap_or_default())
        .flat_map(|s| s["metrics"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The largest value of sum `name` over points with a label value `label`
/// (exports are cumulative snapshots).
fn metric_value(all: &[Value], name: &str, label: &str) -> f64 {
    metrics(all)
        .iter()
        .filter(|m| m["name"] == name)
        .flat_map(|m| {
            m["sum"]["dataPoints"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|p| attrs(p).values().any(|v| v == label))
        .filter_map(|p| p["asDouble"].as_f64())
        .fold(0.0, f64::max)
}

#[test]
fn a_stalled_collector_costs_requests_nothing_drops_are_counted_and_backfill_works() {
    let dir = TempDir::new("otlp-stall");
    let stalled = receiver(dir.path(), "stalled", true);
    let s = setup(&stalled.url);
    let (llm, _) =
        s.b.token(&s.manager, json!([{"tool": "llm", "op": "generate"}]));
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(llm_call(&s, &llm), 200);
    }
    // Twenty calls through a broker whose collector never answers: well
    // under the 5 s export deadline, so nothing waited on it.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // The stalled batch times out (5 s) and is counted.
    let deadline = Instant::now() + Duration::from_secs(15);
    let dropped = loop {
        let m = String::from_utf8(s.b.admin(Method::GET, "/metrics", None).body.to_vec()).unwrap();
        let d: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix("lever_otel_dropped_total "))
            .unwrap()
            .parse()
            .unwrap();
        if d > 0.0 {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "nothing counted as dropped:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(dropped >= 1.0);
    // The audit trail has every call.
    let text = std::fs::read_to_string(s.inst.audit_file()).unwrap();
    let calls = text
        .lines()
        .filter(|l| l.contains("\"event\":\"llm\"") && l.contains("\"decision\":\"allow\""))
        .count();
    assert_eq!(calls, 20);

    // Backfill to a collector that answers.
    let good = receiver(dir.path(), "good", false);
    let out = lever(
        &[
            "audit",
            "export",
            "--otlp",
            &good.url,
            s.inst.audit_file().to_str().unwrap(),
        ],
        s.inst.dir.path(),
        s.inst.dir.path(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines = text.lines().count();
    let all = wait_for(&good, "the backfill", |all| logs(all).len() >= lines);
    let lg = logs(&all);
    assert_eq!(lg.len(), lines, "{}", out.stdout);
    assert_eq!(
        lg.iter()
            .filter(|l| attrs(l).get("lever.event") == Some(&json!("llm")))
            .count(),
        20
    );
    // --since keeps only what came after.
    let later = receiver(dir.path(), "later", false);
    let out = lever(
        &[
            "audit",
            "export",
            "--otlp",
            &later.url,
            "--since",
            "2999-01-01T00:00:00Z",
            s.inst.audit_file().to_str().unwrap(),
        ],
        s.inst.dir.path(),
        s.inst.dir.path(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("exported 0 records"), "{}", out.stdout);
}

#[test]
fn otlp_over_grpc_reaches_a_grpc_receiver() {
    let dir = TempDir::new("otlp-grpc");
    let r = receiver_mode(dir.path(), "grpc", "grpc");
    let s = setup_with(&r.url, ", otlp_protocol: grpc");
    let (llm, _) =
        s.b.token(&s.manager, json!([{"tool": "llm", "op": "generate"}]));
    assert_eq!(llm_call(&s, &llm), 200);
    let all = wait_for(&r, "a chat span and the llm log over gRPC", |all| {
        spans(all)
            .iter()
            .any(|x| attrs(x).get("gen_ai.operation.name") == Some(&json!("chat")))
            && logs(all)
                .iter()
                .any(|l| attrs(l).get("lever.event") == Some(&json!("llm")))
            && metric_value(all, "lever_requests_total", "llm") >= 1.0
    });
    assert!(all.iter().all(|e| e["content_type"] == "application/grpc"));
    let raw: Vec<u8> = all
        .iter()
        .flat_map(|e| lever_policy::hex::decode(e["raw"].as_str().unwrap()).unwrap())
        .collect();
    let raw = String::from_utf8_lossy(&raw);
    assert!(!raw.contains(llm.as_str()) && !raw.contains(REAL_KEY));
}

#[test]
fn sampled_out_traces_still_leave_every_log_record() {
    let dir = TempDir::new("otlp-sampled");
    let r = receiver(dir.path(), "rx", false);
    let s = setup_env(&r.url, "", &[("OTEL_TRACES_SAMPLER", "always_off")]);
    let (llm, _) =
        s.b.token(&s.manager, json!([{"tool": "llm", "op": "generate"}]));
    assert_eq!(llm_call(&s, &llm), 200);
    let all = wait_for(&r, "the llm log record", |all| {
        logs(all)
            .iter()
            .any(|l| attrs(l).get("lever.event") == Some(&json!("llm")))
    });
    // Another flush interval: no span ever comes.
    std::thread::sleep(Duration::from_millis(1500));
    let all = [all, received(&r)].concat();
    assert!(spans(&all).is_empty(), "{:#?}", spans(&all));
}

//! `GET /metrics` on the admin port: Prometheus text that the official
//! Python client's parser accepts, whose counters match the requests made,
//! and which names no identity, token or key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use http::Method;
use lever_tests::broker::{DEFAULT_AGENTS, Instance, RawMcp, start_mock};
use lever_tests::{run_with_input, workspace_root};
use serde_json::{Value, json};

const REAL_KEY: &str = "sk-ant-test-real-key";

fn parse(text: &str) -> Vec<Value> {
    let out = run_with_input(
        Command::new("python3").arg(workspace_root().join("tests/py/prom_parse.py")),
        Some(text.as_bytes()),
    );
    assert!(
        out.code == 0,
        "the Prometheus parser refused the text (pip install -r tests/requirements.txt):\n{}\n{text}",
        out.stderr
    );
    serde_json::from_str::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn value(samples: &[Value], name: &str, labels: Value) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| {
            labels
                .as_object()
                .unwrap()
                .iter()
                .all(|(k, v)| &s["labels"][k] == v)
        })
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

/// A broker instance whose upstream is a mock holding the real key, with
/// `extra` added to its `broker:` section; the mock's dir and process go
/// with the instance.
fn with_mock(extra: &str) -> (lever_tests::TempDir, lever_tests::broker::Proc, Instance) {
    let scratch = lever_tests::TempDir::new("mock");
    scratch.write("key", REAL_KEY, 0o600);
    let (mock, mock_url) = start_mock(scratch.path(), "key");
    let inst = Instance::new(DEFAULT_AGENTS, &format!("  upstream: {mock_url}\n{extra}"));
    (scratch, mock, inst)
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    let (_scratch, _mock, inst) = with_mock("");
    let b = inst.start();
    let manager = b.enrol("manager");
    let (llm, _) = b.token(&manager, json!([{"tool": "llm", "op": "generate"}]));
    let body = json!({"model": "claude-mock-1", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        let r = b.jail(
            &manager.tls(),
            Method::POST,
            "/llm/v1/messages",
            &[("x-api-key", &llm)],
            Some(body.clone()),
        );
        assert_eq!(r.status, 200);
    }
    let mut forged = llm.clone().into_bytes();
    let mid = forged.len() / 2;
    forged[mid] = if forged[mid] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let r = b.jail(
        &manager.tls(),
        Method::POST,
        "/llm/v1/messages",
        &[("x-api-key", &forged)],
        Some(body),
    );
    assert_eq!(r.status, 401);
    let reason = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();

    // One allowed and one denied tool call.
    let (db, _) = b.token(
        &manager,
        json!([{"tool": "db", "op": "read", "constraints": {"table": "users"}}]),
    );
    let raw = RawMcp::new(&b, &manager, &db);
    let (sid, _) = raw.initialize("2025-11-25");
    let (v, unavailable) = raw.wait_ready_counting(&sid, "db_read", json!({"table": "users"}));
    assert!(v["result"].is_object(), "{v}");
    let unavailable = f64::from(unavailable);
    assert_eq!(
        raw.call(&sid, "db_read", json!({"table": "orders"}))["error"]["code"],
        -32001
    );

    let m = b.admin(Method::GET, "/metrics", None);
    assert_eq!(m.status, 200);
    assert!(
        m.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    for secret in [llm.as_str(), db.as_str(), REAL_KEY, "manager"] {
        assert!(!text.contains(secret), "the metrics name {secret:?}");
    }
    let s = parse(&text);
    let v = |name: &str, labels: Value| value(&s, name, labels);
    assert_eq!(
        v(
            "lever_requests_total",
            json!({"route": "llm", "status": "200"})
        ),
        3.0
    );
    assert_eq!(
        v(
            "lever_requests_total",
            json!({"route": "llm", "status": "401"})
        ),
        1.0
    );
    assert_eq!(
        v("lever_denials_total", json!({"route": "llm"})),
        1.0,
        "{reason}"
    );
    assert_eq!(
        v(
            "lever_llm_calls_total",
            json!({"status": "200", "completed": "true"})
        ),
        3.0
    );
    assert!(v("lever_llm_tokens_total", json!({"kind": "input"})) > 0.0);
    assert_eq!(
        v(
            "lever_request_duration_seconds_count",
            json!({"route": "llm"})
        ),
        4.0
    );
    assert_eq!(
        v("lever_llm_upstream_latency_seconds_count", json!({})),
        3.0
    );
    assert_eq!(v("lever_open_streams", json!({})), 0.0);
    assert_eq!(
        v(
            "lever_tool_calls_total",
            json!({"tool": "db", "outcome": "ok"})
        ),
        1.0
    );
    assert_eq!(
        v(
            "lever_tool_calls_total",
            json!({"tool": "db", "outcome": "backend_unavailable"})
        ),
        unavailable
    );
    assert_eq!(
        v(
            "lever_denials_total",
            json!({"route": "mcp", "reason": "constraint_mismatch"})
        ),
        1.0
    );
    assert!(v("lever_token_cache_hits_total", json!({})) >= 3.0);
    assert_eq!(v("lever_epoch", json!({})), 1.0);
    // The admin requests so far (this one is counted after it is answered).
    assert!(v("lever_requests_total", json!({"route": "admin_register"})) >= 1.0);
}

#[test]
fn each_rate_limit_refusal_is_counted_in_its_own_lane() {
    // The lane comes from the limit that refused, whatever the route: one
    // refusal in each of the three, and each counted once, in its own.
    let (_scratch, _mock, inst) = with_mock(
        "  rate_limits:\n    llm: {per_minute: 1, burst: 1}\n    tools: {per_minute: 1, burst: 1}\n    control: {per_minute: 1, burst: 2}\n",
    );
    let b = inst.start();
    let manager = b.enrol("manager");
    let llm_grant = json!([{"tool": "llm", "op": "generate"}]);
    let (llm, _) = b.token(&manager, llm_grant.clone());
    let (db, _) = b.token(
        &manager,
        json!([{"tool": "db", "op": "read", "constraints": {"table": "users"}}]),
    );
    let r = b.obtain(&manager, llm_grant);
    assert_eq!(r.status, 429, "a third mint: {}", r.error_message());

    let body = json!({"model": "claude-mock-1", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "hi"}]});
    let statuses: Vec<u16> = (0..2)
        .map(|_| {
            b.jail(
                &manager.tls(),
                Method::POST,
                "/llm/v1/messages",
                &[("x-api-key", &llm)],
                Some(body.clone()),
            )
            .status
            .as_u16()
        })
        .collect();
    assert_eq!(statuses, [200, 429]);

    let raw = RawMcp::new(&b, &manager, &db);
    let (sid, _) = raw.initialize("2025-11-25");
    // The first call takes the lane's one place (answered or not: the
    // backend may still be starting); the second is refused.
    let _ = raw.call(&sid, "db_read", json!({"table": "users"}));
    let v = raw.call(&sid, "db_read", json!({"table": "users"}));
    assert_eq!(v["error"]["code"], -32002, "{v}");

    let m = b.admin(Method::GET, "/metrics", None);
    let s = parse(std::str::from_utf8(&m.body).unwrap());
    for lane in ["llm", "tool", "control"] {
        assert_eq!(
            value(&s, "lever_rate_limited_total", json!({"lane": lane})),
            1.0,
            "lane {lane}"
        );
    }
}

//! `/mcp` with real processes: `lever broker`, its supervised tool backends
//! (`lever-tool-db`, and `@modelcontextprotocol/server-everything` from npm
//! over stdio and over HTTP), `lever agent gateway`, and the official MCP
//! Python SDK as the client. Protocol edge cases are sent raw over mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use lever_tests::broker::{
    Agent, Broker, DEFAULT_AGENTS, Instance, RawMcp, free_port, start_gateway,
};
use lever_tests::{run, workspace_root};
use serde_json::{Value, json};

const USERS: &str = r#"[{"tool": "db", "op": "read", "constraints": {"table": "users"}}]"#;

fn users() -> Value {
    serde_json::from_str(USERS).unwrap()
}

/// The official SDK, through `url`, with `token`, making `calls`.
fn sdk(url: &str, token: &str, calls: Value) -> Value {
    let script = workspace_root().join("tests/py/mcp_client.py");
    let plan = json!({"url": url, "token": token, "calls": calls});
    let out = run(Command::new("python3").arg(&script).arg(plan.to_string()));
    assert_eq!(
        out.code, 0,
        "the MCP SDK failed (pip install -r tests/requirements.txt):\n{}{}",
        out.stdout, out.stderr
    );
    serde_json::from_str(out.stdout.trim()).unwrap()
}

fn everything_dir() -> PathBuf {
    let d =
        workspace_root().join("tests/node/node_modules/@modelcontextprotocol/server-everything");
    assert!(
        d.join("dist/index.js").exists(),
        "server-everything is not installed: npm install --prefix tests/node (.ci/run does it)"
    );
    d
}

/// A running instance with the manager enrolled and holding a token.
struct Env {
    inst: Instance,
    b: Broker,
    manager: Agent,
    token: String,
    token_id: String,
}

fn env(agents: &str, extra: &str, grants: Value) -> Env {
    let inst = Instance::new(agents, extra);
    let b = inst.start();
    let manager = b.enrol("manager");
    let (token, token_id) = b.token(&manager, grants);
    Env {
        inst,
        b,
        manager,
        token,
        token_id,
    }
}

/// Waits (bounded) until the audit file holds a line matching `f`.
fn wait_audit(inst: &Instance, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = inst.audit_records().into_iter().find(&f) {
            return v;
        }
        assert!(Instant::now() < deadline, "no such audit record");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pids of the direct children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

#[test]
fn the_official_sdk_reads_the_db_through_the_gateway_and_a_pinned_table_holds() {
    let Env {
        inst,
        b,
        manager,
        token,
        token_id,
    } = env(DEFAULT_AGENTS, "", users());
    let (_gw, gw_url) = start_gateway(inst.dir.path(), &manager, inst.jail_port);
    let v = sdk(
        &format!("{gw_url}/mcp"),
        &token,
        json!([
            {"name": "db_read", "arguments": {"table": "users", "filter": "Grace"}},
            {"name": "db_read", "arguments": {"table": "orders"}},
            {"name": "db_read", "arguments": {"table": "secrets"}},
        ]),
    );
    assert_eq!(v["server"], "lever-broker");
    assert_eq!(v["protocol"], "2025-11-25");
    assert_eq!(v["tools"], json!(["db_read"]));
    let calls = v["calls"].as_array().unwrap();
    assert_eq!(calls[0]["ok"], true, "{v}");
    assert_eq!(calls[0]["is_error"], false, "{v}");
    assert!(
        calls[0]["text"]
            .as_str()
            .unwrap()
            .contains("grace@example.com"),
        "{v}"
    );
    for c in &calls[1..] {
        assert_eq!(c["ok"], false, "{v}");
        assert_eq!(c["error"]["code"], -32001, "{v}");
        assert_eq!(c["error"]["data"]["reason"], "constraint_mismatch", "{v}");
        assert!(
            c["error"]["message"]
                .as_str()
                .unwrap()
                .contains("table=users"),
            "{v}"
        );
    }
    // The tool saw the allowed call and nothing else.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.stderr().contains("read table=\"users\"") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = b.stderr();
    assert!(log.contains("read table=\"users\": 1 rows"), "{log}");
    assert!(
        !log.contains("table=\"orders\"") && !log.contains("table=\"secrets\""),
        "{log}"
    );
    // Audited: allow and deny, with constraints and a digest, not the arguments.
    let allow = wait_audit(&inst, |l| l["event"] == "tool" && l["decision"] == "allow");
    assert_eq!(allow["identity"], "manager");
    assert_eq!(allow["token_id"], token_id.as_str());
    assert_eq!(
        (allow["tool"].as_str(), allow["op"].as_str()),
        (Some("db"), Some("read"))
    );
    assert_eq!(allow["constraints"], json!({"table": "users"}));
    assert_eq!(allow["detail"]["outcome"], "ok");
    assert_eq!(allow["detail"]["args_sha256"].as_str().unwrap().len(), 64);
    assert!(allow["detail"]["backend_ms"].as_f64().is_some());
    let deny = wait_audit(&inst, |l| {
        l["event"] == "tool" && l["decision"] == "deny" && l["constraints"]["table"] == "orders"
    });
    assert_eq!(deny["reason"], "constraint_mismatch");
    let text = std::fs::read_to_string(inst.audit_file()).unwrap();
    assert!(
        !text.contains("Grace"),
        "raw arguments reached the audit log"
    );
    assert!(!text.contains(&token), "a token reached the audit log");
}

#[test]
fn pins_hold_against_missing_non_string_and_look_alike_arguments() {
    let Env {
        inst,
        b,
        manager,
        token,
        ..
    } = env(DEFAULT_AGENTS, "", users());
    let raw = RawMcp::new(&b, &manager, &token);
    let (sid, _) = raw.initialize("2025-06-18");
    let ok = raw.wait_ready(&sid, "db_read", json!({"table": "users"}));
    assert!(
        ok["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("ada@"),
        "{ok}"
    );
    for args in [
        json!({}),
        json!({"table": null}),
        json!({"table": ["users"]}),
        json!({"table": {"name": "users"}}),
        json!({"table": 1}),
        json!({"table": "users "}),
        json!({"table": "USERS"}),
        json!({"table": "users\u{0000}"}),
        json!({"table": "users;orders"}),
    ] {
        let v = raw.call(&sid, "db_read", args.clone());
        assert_eq!(v["error"]["code"], -32001, "{args} -> {v}");
        assert_eq!(v["id"], 7);
    }
    // An argument the operation does not declare (`db` declares `table`
    // and `filter`) is refused before anything is judged or forwarded,
    // look-alike keys included.
    for args in [
        json!({"table": "orders", "Table": "users"}),
        json!({"table": "users", "limit": 5}),
        json!({"table": "users", "tabIe": "users"}),
    ] {
        let v = raw.call(&sid, "db_read", args.clone());
        assert_eq!(v["error"]["code"], -32602, "{args} -> {v}");
        assert_eq!(
            v["error"]["data"]["reason"], "unknown_argument",
            "{args} -> {v}"
        );
    }
    // A key sent twice: the value judged is the value the tool gets (the
    // last one, as parsed), never one judged and another forwarded.
    let auth = format!("Bearer {token}");
    let dup = |first: &str, last: &str| {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{{"name":"db_read","arguments":{{"table":"{first}","table":"{last}"}}}}}}"#
        );
        raw.send(
            Method::POST,
            &[
                ("authorization", &auth),
                ("mcp-session-id", &sid),
                ("content-type", "application/json"),
                ("accept", "application/json, text/event-stream"),
            ],
            Bytes::from(body),
        )
        .json()
    };
    let v = dup("users", "orders");
    assert_eq!(v["error"]["code"], -32001, "{v}");
    let v = dup("orders", "users");
    assert!(
        v["result"]["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("ada@")),
        "{v}"
    );
    // Names that are not a configured tool/operation.
    for name in [
        "db",
        "db_",
        "db_write",
        "_read",
        "db_read_x",
        "db.read",
        "llm_generate",
    ] {
        let v = raw.call(&sid, name, json!({"table": "users"}));
        assert_eq!(v["error"]["code"], -32602, "{name} -> {v}");
    }
    // What an agent sends is recorded clipped: a 100 kB tool name and a
    // 100 kB pinned value leave records of a bounded size (and an error
    // that does not echo them whole).
    let long = "x".repeat(100_000);
    let v = raw.call(&sid, &long, json!({}));
    assert_eq!(v["error"]["code"], -32602);
    assert!(v.to_string().len() < 2_000, "{} bytes", v.to_string().len());
    let v = raw.call(&sid, "db_read", json!({"table": long}));
    assert_eq!(v["error"]["code"], -32001);
    let rec = wait_audit(&inst, |l| {
        l["event"] == "tool"
            && l["detail"]["call"]
                .as_str()
                .is_some_and(|c| c.starts_with("xxx"))
    });
    assert!(rec.to_string().len() < 2_000, "{rec}");
    let rec = wait_audit(&inst, |l| {
        l["event"] == "tool"
            && l["constraints"]["table"]
                .as_str()
                .is_some_and(|t| t.starts_with("xxx"))
    });
    assert!(rec.to_string().len() < 2_000, "{rec}");
    // Arguments that are not an object.
    let r = raw.post(
        Some(&sid),
        json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call",
               "params": {"name": "db_read", "arguments": ["users"]}}),
    );
    assert_eq!(r.json()["error"]["code"], -32602);
    // A token its holder narrowed with a check on an argument the grant
    // does not pin: that argument sent as a non-string would slip past the
    // check (`["evil"]` is not `"evil"`), so any non-string argument is
    // refused for such a token, before the tool.
    let narrowed = lever_policy::token::attenuate(
        &token,
        "reject if args($m), $m.get(\"filter\") == \"evil\";",
        std::collections::HashMap::new(),
    )
    .unwrap();
    let raw_n = RawMcp::new(&b, &manager, &narrowed);
    for args in [
        json!({"table": "users", "filter": ["evil"]}),
        json!({"table": "users", "filter": 1}),
        json!({"table": "users", "filter": {"x": "evil"}}),
        json!({"table": "users", "filter": null}),
    ] {
        let v = raw_n.call(&sid, "db_read", args.clone());
        assert_eq!(v["error"]["code"], -32001, "{args} -> {v}");
        assert_eq!(
            v["error"]["data"]["reason"], "non_string_argument",
            "{args} -> {v}"
        );
    }
    let v = raw_n.call(&sid, "db_read", json!({"table": "users", "filter": "evil"}));
    assert_eq!(
        v["error"]["data"]["reason"], "attenuation_check_failed",
        "{v}"
    );
    // Strings only: judged and served.
    let v = raw_n.call(&sid, "db_read", json!({"table": "users"}));
    assert!(v["result"].is_object(), "{v}");
    // The tool logs a read as it answers: its line can reach the broker's
    // stderr just after the answer reaches us.
    let reads = || b.stderr().matches("lever-tool-db: read").count();
    let deadline = Instant::now() + Duration::from_secs(3);
    while reads() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(reads(), 3, "{}", b.stderr());
}

#[test]
fn a_token_for_another_tool_or_only_for_llm_sees_and_calls_nothing() {
    let Env {
        inst: _inst,
        b,
        manager,
        token: llm_only,
        ..
    } = env(
        DEFAULT_AGENTS,
        "",
        json!([{"tool": "llm", "op": "generate"}]),
    );
    let raw = RawMcp::new(&b, &manager, &llm_only);
    let (sid, _) = raw.initialize("2025-11-25");
    let r = raw.post(
        Some(&sid),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    );
    assert_eq!(r.json()["result"]["tools"], json!([]));
    let v = raw.call(&sid, "db_read", json!({"table": "users"}));
    assert_eq!(v["error"]["code"], -32001, "{v}");
    assert_eq!(v["error"]["data"]["reason"], "not_granted", "{v}");
    // Another agent's token, presented by the manager: refused outright.
    let g1 = b.enrol("g1");
    let (theirs, _) = b.token(&g1, users());
    let raw2 = RawMcp::new(&b, &manager, &theirs);
    let r = raw2.post(
        Some(&sid),
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}),
    );
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], -32001);
    assert_eq!(r.json()["error"]["data"]["reason"], "token_wrong_holder");
}

#[test]
fn sessions_versions_and_unsupported_messages_get_clear_answers() {
    let Env {
        inst: _inst,
        b,
        manager,
        token,
        ..
    } = env(DEFAULT_AGENTS, "", users());
    let raw = RawMcp::new(&b, &manager, &token);
    // Version negotiation: a known version is echoed, an unknown one gets ours.
    for (asked, got) in [
        ("2025-03-26", "2025-03-26"),
        ("2025-06-18", "2025-06-18"),
        ("2025-11-25", "2025-11-25"),
        ("1999-01-01", "2025-11-25"),
    ] {
        let (_, v) = raw.initialize(asked);
        assert_eq!(v["result"]["protocolVersion"], got);
        assert_eq!(v["result"]["capabilities"]["tools"]["listChanged"], false);
    }
    let (sid, _) = raw.initialize("2025-11-25");
    let ping = json!({"jsonrpc": "2.0", "id": "p", "method": "ping"});
    assert_eq!(
        raw.post(Some(&sid), ping.clone()).json()["result"],
        json!({})
    );
    // No session, an unknown one, another identity's: 400, 404, 404.
    assert_eq!(raw.post(None, ping.clone()).status, 400);
    assert_eq!(
        raw.post(Some("0123456789abcdef0123456789abcdef"), ping.clone())
            .status,
        404
    );
    let g1 = b.enrol("g1");
    let (g1_token, _) = b.token(
        &g1,
        json!([{"tool": "db", "op": "read", "constraints": {"table": "orders"}}]),
    );
    let other = RawMcp::new(&b, &g1, &g1_token);
    let r = other.post(Some(&sid), ping.clone());
    assert_eq!(r.status, 404, "another identity used the manager's session");
    assert_eq!(r.json()["error"]["data"]["reason"], "session_unknown");
    // An unsupported MCP-Protocol-Version header.
    let auth = format!("Bearer {token}");
    let r = raw.send(
        Method::POST,
        &[
            ("authorization", &auth),
            ("mcp-session-id", &sid),
            ("mcp-protocol-version", "1999-01-01"),
            ("content-type", "application/json"),
        ],
        Bytes::from(ping.to_string()),
    );
    assert_eq!(r.status, 400);
    // Notifications are accepted with 202 and no body.
    let r = raw.post(
        Some(&sid),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    );
    assert_eq!(r.status, 202);
    assert!(r.body.is_empty());
    // Methods the broker does not serve.
    for m in [
        "resources/list",
        "prompts/list",
        "sampling/createMessage",
        "tools/delete",
    ] {
        let r = raw.post(Some(&sid), json!({"jsonrpc": "2.0", "id": 9, "method": m}));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["error"]["code"], -32601, "{m}");
    }
    // Batches, non-objects, wrong versions, bad ids, bad JSON.
    let bad: [(&str, i64); 6] = [
        (r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#, -32600),
        (r#""ping""#, -32600),
        (r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#, -32600),
        (r#"{"jsonrpc":"2.0","id":{"x":1},"method":"ping"}"#, -32600),
        (r#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#, -32600),
        (r#"{"jsonrpc":"2.0","id":1,"method":"ping""#, -32700),
    ];
    for (body, code) in bad {
        let r = raw.send(
            Method::POST,
            &[
                ("authorization", &auth),
                ("mcp-session-id", &sid),
                ("content-type", "application/json"),
            ],
            Bytes::from(body),
        );
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.json()["error"]["code"], code, "{body}");
    }
    // Wrong content type, an oversized body, a browser, GET, no token.
    let r = raw.send(
        Method::POST,
        &[
            ("authorization", &auth),
            ("mcp-session-id", &sid),
            ("content-type", "text/plain"),
        ],
        Bytes::from(ping.to_string()),
    );
    assert_eq!(r.status, 415);
    let huge = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "db_read", "arguments": {"table": "users", "filter": "x".repeat(1_100_000)}}});
    let r = raw.post(Some(&sid), huge);
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["jsonrpc"], "2.0");
    let r = raw.send(
        Method::POST,
        &[
            ("authorization", &auth),
            ("origin", "https://evil.example"),
            ("content-type", "application/json"),
        ],
        Bytes::from(ping.to_string()),
    );
    assert_eq!(r.status, 403);
    let r = raw.send(
        Method::GET,
        &[("authorization", &auth), ("mcp-session-id", &sid)],
        Bytes::new(),
    );
    assert_eq!(r.status, 405);
    let r = raw.send(
        Method::POST,
        &[
            ("mcp-session-id", &sid),
            ("content-type", "application/json"),
        ],
        Bytes::from(ping.to_string()),
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["data"]["reason"], "token_required");
    // DELETE needs the token like any other message, then ends the
    // session; it is unknown afterwards.
    let r = raw.send(Method::DELETE, &[("mcp-session-id", &sid)], Bytes::new());
    assert_eq!(r.status, 401);
    assert_eq!(raw.post(Some(&sid), ping.clone()).status, 200);
    let r = raw.send(
        Method::DELETE,
        &[("authorization", &auth), ("mcp-session-id", &sid)],
        Bytes::new(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(raw.post(Some(&sid), ping).status, 404);
}

#[test]
fn revoked_and_epoch_bumped_tokens_lose_the_tools_at_once() {
    let Env {
        inst: _inst,
        b,
        manager,
        token,
        token_id,
    } = env(DEFAULT_AGENTS, "", users());
    let raw = RawMcp::new(&b, &manager, &token);
    let (sid, _) = raw.initialize("2025-11-25");
    let v = raw.wait_ready(&sid, "db_read", json!({"table": "users"}));
    assert!(v["result"].is_object(), "{v}");
    let r = b.admin(Method::POST, "/revoke", Some(json!({"token_id": token_id})));
    assert_eq!(r.status, 200);
    let r = raw.post(
        Some(&sid),
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
               "params": {"name": "db_read", "arguments": {"table": "users"}}}),
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["data"]["reason"], "token_revoked");
    let (token2, _) = b.token(&manager, users());
    let raw2 = RawMcp::new(&b, &manager, &token2);
    assert!(raw2.call(&sid, "db_read", json!({"table": "users"}))["result"].is_object());
    assert_eq!(
        b.admin(Method::POST, "/bump-epoch", Some(json!({}))).status,
        200
    );
    let r = raw2.post(
        Some(&sid),
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["data"]["reason"], "token_stale_epoch");
}

#[test]
fn an_expired_token_loses_the_tools_even_with_its_decisions_cached() {
    // A call's decision is cached per token; expiry is checked in Rust on
    // every use before the cache is read, so a warm cache outlives nothing.
    let Env {
        inst: _inst,
        b,
        manager,
        token,
        ..
    } = env(DEFAULT_AGENTS, "  grant_ttl: 3s\n", users());
    let minted = std::time::Instant::now();
    let raw = RawMcp::new(&b, &manager, &token);
    let (sid, _) = raw.initialize("2025-11-25");
    for _ in 0..2 {
        let v = raw.wait_ready(&sid, "db_read", json!({"table": "users"}));
        assert!(v["result"].is_object(), "{v}");
    }
    assert!(
        minted.elapsed() < Duration::from_secs(3),
        "too slow to warm the cache"
    );
    std::thread::sleep(
        Duration::from_secs(3).saturating_sub(minted.elapsed()) + Duration::from_millis(300),
    );
    for msg in [
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
               "params": {"name": "db_read", "arguments": {"table": "users"}}}),
        json!({"jsonrpc": "2.0", "id": 8, "method": "tools/list"}),
    ] {
        let r = raw.post(Some(&sid), msg);
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"]["data"]["reason"], "token_expired");
    }
}

#[test]
fn tool_calls_are_rate_limited_per_agent() {
    let Env {
        inst: _inst,
        b,
        manager,
        token,
        ..
    } = env(
        DEFAULT_AGENTS,
        "  rate_limits: {tools: {per_minute: 2, burst: 2, max_concurrent: 4}}\n",
        users(),
    );
    let raw = RawMcp::new(&b, &manager, &token);
    let (sid, _) = raw.initialize("2025-11-25");
    let first = raw.wait_ready(&sid, "db_read", json!({"table": "users"}));
    assert!(first["result"].is_object(), "{first}");
    let mut limited = None;
    for _ in 0..3 {
        let v = raw.call(&sid, "db_read", json!({"table": "users"}));
        if v["error"]["code"] == -32002 {
            limited = Some(v);
            break;
        }
    }
    let v = limited.expect("never rate limited");
    assert!(
        v["error"]["data"]["retry_after_secs"].as_u64().unwrap() >= 1,
        "{v}"
    );
    // Another agent has its own allowance.
    let g1 = b.enrol("g1");
    let (t, _) = b.token(&g1, users());
    let raw2 = RawMcp::new(&b, &g1, &t);
    let (sid2, _) = raw2.initialize("2025-11-25");
    assert!(raw2.call(&sid2, "db_read", json!({"table": "users"}))["result"].is_object());
}

fn everything_tools(transport: &str) -> String {
    let dir = everything_dir();
    let command = if transport == "stdio" {
        format!("[node, '{}', stdio]", dir.join("dist/index.js").display())
    } else {
        format!(
            "['{}']",
            workspace_root()
                .join("tests/node/everything-http.sh")
                .display()
        )
    };
    let backend = if transport == "http" {
        format!(", backend: '127.0.0.1:{}'", free_port())
    } else {
        String::new()
    };
    format!(
        "    - {{name: everything, transport: {transport}, command: {command}{backend}, timeout: 1500ms, operations: [{{name: echo}}, {{name: get-sum}}, {{name: trigger-long-running-operation}}]}}\n"
    )
}

const EVERYTHING_AGENTS: &str = "\
manager:
  image: img/x:1
  obtain:
    - {tool: db, op: read}
    - {tool: everything, op: echo}
    - {tool: everything, op: get-sum}
    - {tool: everything, op: trigger-long-running-operation}
";

/// An instance with server-everything over `transport` and the manager
/// holding a token for its three operations.
fn everything(transport: &str) -> Env {
    env(
        EVERYTHING_AGENTS,
        &everything_tools(transport),
        everything_grants(),
    )
}

fn everything_grants() -> Value {
    json!([
        {"tool": "everything", "op": "echo"},
        {"tool": "everything", "op": "get-sum"},
        {"tool": "everything", "op": "trigger-long-running-operation"},
    ])
}

fn third_party_behind_the_broker(transport: &str) {
    let Env {
        inst,
        b,
        manager,
        token,
        ..
    } = env(
        EVERYTHING_AGENTS,
        &everything_tools(transport),
        everything_grants(),
    );
    let (_gw, gw_url) = start_gateway(inst.dir.path(), &manager, inst.jail_port);
    // Wait for the backend through the raw client, then the SDK.
    let raw = RawMcp::new(&b, &manager, &token);
    let _sid = raw.ready_session("everything_echo", json!({"message": "up?"}));
    let v = sdk(
        &format!("{gw_url}/mcp"),
        &token,
        json!([
            {"name": "everything_echo", "arguments": {"message": "hello through lever"}},
            {"name": "everything_get-sum", "arguments": {"a": 2, "b": 40}},
            {"name": "db_read", "arguments": {"table": "users"}},
        ]),
    );
    assert_eq!(
        v["tools"],
        json!([
            "everything_echo",
            "everything_get-sum",
            "everything_trigger-long-running-operation"
        ]),
        "{v}"
    );
    let calls = v["calls"].as_array().unwrap();
    assert!(
        calls[0]["text"]
            .as_str()
            .unwrap()
            .contains("hello through lever"),
        "{v}"
    );
    assert!(calls[1]["text"].as_str().unwrap().contains("42"), "{v}");
    assert_eq!(calls[2]["error"]["data"]["reason"], "not_granted", "{v}");
}

#[test]
fn server_everything_over_stdio_behind_the_broker() {
    third_party_behind_the_broker("stdio");
}

#[test]
fn server_everything_over_http_behind_the_broker() {
    third_party_behind_the_broker("http");
}

#[test]
fn a_backend_killed_mid_call_errors_and_is_back_within_two_seconds() {
    let Env {
        inst: _inst,
        b,
        manager,
        token,
        ..
    } = everything("stdio");
    let raw = RawMcp::new(&b, &manager, &token);
    let sid = raw.ready_session("everything_echo", json!({"message": "up?"}));
    let everything = children(b.pid().unwrap())
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains("server-everything"))
        })
        .expect("no server-everything process");
    // A long call, and the backend killed while it runs.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-9", &everything.to_string()])
            .status();
        Instant::now()
    });
    let started = Instant::now();
    let v = raw.call(
        &sid,
        "everything_trigger-long-running-operation",
        json!({"duration": 1.2, "steps": 2}),
    );
    let killed_at = killer.join().unwrap();
    assert_eq!(v["error"]["code"], -32003, "{v}");
    assert_eq!(v["error"]["data"]["reason"], "backend_died", "{v}");
    assert!(
        started.elapsed() < Duration::from_millis(1100),
        "the call waited past the death"
    );
    // Back, and serving, within 2 s of the kill.
    let deadline = killed_at + Duration::from_secs(2);
    loop {
        let v = raw.call(&sid, "everything_echo", json!({"message": "again"}));
        if v["result"].is_object() {
            break;
        }
        assert!(Instant::now() < deadline, "not back within 2 s: {v}");
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(b.stderr().contains("tool `everything` exited"));
}

#[test]
fn a_cancelled_call_returns_at_once() {
    let Env {
        inst,
        b,
        manager,
        token,
        ..
    } = everything("stdio");
    let raw = RawMcp::new(&b, &manager, &token);
    let sid = raw.ready_session("everything_echo", json!({"message": "up?"}));
    let (v, took) = long_call_while(&raw, &sid, 1.4, || {
        let r = raw.post(
            Some(&sid),
            json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                   "params": {"requestId": 7, "reason": "changed my mind"}}),
        );
        assert_eq!(r.status, 202);
    });
    assert_eq!(v["error"]["code"], -32800, "{v}");
    assert!(took < Duration::from_millis(1000), "{took:?}");
    let rec = wait_audit(&inst, |l| {
        l["event"] == "tool" && l["detail"]["outcome"] == "cancelled"
    });
    assert_eq!(rec["op"], "trigger-long-running-operation");
}

#[test]
fn a_revocation_cuts_the_calls_its_token_has_in_flight() {
    let Env {
        inst,
        b,
        manager,
        token,
        token_id,
    } = everything("stdio");
    let raw = RawMcp::new(&b, &manager, &token);
    let sid = raw.ready_session("everything_echo", json!({"message": "up?"}));
    let revoke = |body: Value| {
        let r = b.admin(Method::POST, "/revoke", Some(body));
        assert_eq!(r.status, 200, "{}", r.error_message());
    };
    // Revoking another token leaves the call alone.
    let (_, other_id) = b.token(&manager, everything_grants());
    let (v, _) = long_call_while(&raw, &sid, 1.0, || {
        revoke(json!({"token_id": other_id}));
    });
    assert!(
        v["result"].is_object(),
        "cut by another token's revocation: {v}"
    );
    // Its own token's revocation cuts it at once.
    let (v, took) = long_call_while(&raw, &sid, 3.0, || {
        revoke(json!({"token_id": token_id}));
    });
    assert_eq!(v["error"]["code"], -32001, "{v}");
    assert_eq!(v["error"]["data"]["reason"], "token_revoked", "{v}");
    assert!(
        took < Duration::from_millis(2000),
        "the call ran on for {took:?}"
    );
    let rec = wait_audit(&inst, |l| {
        l["event"] == "tool" && l["detail"]["outcome"] == "revoked"
    });
    assert_eq!(rec["token_id"], token_id.as_str());
    assert_eq!(rec["detail"]["failure"], "token_revoked");
    // An epoch bump cuts a call of a fresh token the same way.
    let (fresh, _) = b.token(&manager, everything_grants());
    let raw = RawMcp::new(&b, &manager, &fresh);
    let (v, took) = long_call_while(&raw, &sid, 3.0, || {
        let r = b.admin(Method::POST, "/bump-epoch", None);
        assert_eq!(r.status, 200);
    });
    assert_eq!(v["error"]["data"]["reason"], "token_stale_epoch", "{v}");
    assert!(took < Duration::from_millis(2000), "{took:?}");
    // And so does revoking its holder, for a token of the new epoch.
    let (fresh, _) = b.token(&manager, everything_grants());
    let raw = RawMcp::new(&b, &manager, &fresh);
    let (v, _) = long_call_while(&raw, &sid, 3.0, || {
        revoke(json!({"identity": "manager"}));
    });
    assert_eq!(v["error"]["data"]["reason"], "token_revoked", "{v}");
    // Each of the three was cut while running (authorized, then revoked),
    // not refused at the door.
    let deadline = Instant::now() + Duration::from_secs(5);
    let cut = || {
        inst.audit_records()
            .into_iter()
            .filter(|l| l["event"] == "tool" && l["detail"]["outcome"] == "revoked")
            .count()
    };
    while cut() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(cut(), 3, "{:?}", inst.audit_records());
}

/// The call `everything_trigger-long-running-operation` (id 7, `secs`
/// long) in session `sid`, with `meanwhile` run 300 ms into it; its answer
/// and how long it took.
fn long_call_while(
    raw: &RawMcp<'_>,
    sid: &str,
    secs: f64,
    meanwhile: impl FnOnce(),
) -> (Value, Duration) {
    let started = Instant::now();
    let v = std::thread::scope(|s| {
        let call = s.spawn(|| {
            raw.call(
                sid,
                "everything_trigger-long-running-operation",
                json!({"duration": secs, "steps": 2}),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        meanwhile();
        call.join().unwrap()
    });
    (v, started.elapsed())
}

#[test]
fn another_agent_can_neither_cancel_nor_end_what_it_does_not_own() {
    // g1 knows the manager's session id and the id of its call in flight:
    // its cancellation and its DELETE are refused, and the manager's call
    // and session go on.
    let agents = format!("{EVERYTHING_AGENTS}groves:\n  - name: g1\n    dir: g1\n");
    let Env {
        inst: _inst,
        b,
        manager,
        token,
        ..
    } = env(&agents, &everything_tools("stdio"), everything_grants());
    let raw = RawMcp::new(&b, &manager, &token);
    let sid = raw.ready_session("everything_echo", json!({"message": "up?"}));
    let g1 = b.enrol("g1");
    let (g1_token, _) = b.token(&g1, json!([{"tool": "llm", "op": "generate"}]));
    let other = RawMcp::new(&b, &g1, &g1_token);
    let g1_auth = format!("Bearer {g1_token}");
    let (v, _) = long_call_while(&raw, &sid, 1.0, || {
        let r = other.post(
            Some(&sid),
            json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                   "params": {"requestId": 7, "reason": "not mine"}}),
        );
        assert_eq!(r.status, 404);
        let r = other.send(
            Method::DELETE,
            &[("authorization", &g1_auth), ("mcp-session-id", &sid)],
            Bytes::new(),
        );
        assert_eq!(r.status, 404);
    });
    assert!(
        v["result"].is_object(),
        "g1 cancelled the manager's call: {v}"
    );
    let ping = json!({"jsonrpc": "2.0", "id": "p", "method": "ping"});
    assert_eq!(raw.post(Some(&sid), ping).status, 200);
}

#[test]
fn a_call_whose_agent_goes_away_is_still_recorded() {
    // The agent closes its connection while the backend works: hyper drops
    // the handler, and the call (which did run) is recorded anyway.
    let Env {
        inst,
        b,
        manager,
        token,
        ..
    } = everything("stdio");
    let raw = RawMcp::new(&b, &manager, &token);
    let sid = raw.ready_session("everything_echo", json!({"message": "up?"}));
    let auth = format!("Bearer {token}");
    let body = json!({"jsonrpc": "2.0", "id": "gone", "method": "tools/call",
        "params": {"name": "everything_trigger-long-running-operation",
                   "arguments": {"duration": 1.0, "steps": 2}}});
    let tls = manager.tls();
    let headers = [
        ("authorization", auth.as_str()),
        ("mcp-session-id", sid.as_str()),
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    let send = lever_broker::client::send_bytes(
        &b.jail,
        Some(&tls),
        Method::POST,
        "/mcp",
        &headers,
        Bytes::from(body.to_string()),
    );
    let cut =
        b.rt.block_on(async { tokio::time::timeout(Duration::from_millis(300), send).await });
    assert!(cut.is_err(), "the call answered within 300 ms");
    let rec = wait_audit(&inst, |l| {
        l["event"] == "tool" && l["detail"]["outcome"] == "abandoned"
    });
    assert_eq!(rec["op"], "trigger-long-running-operation");
    assert_eq!(rec["identity"], "manager");
    // The session goes on.
    let v = raw.call(&sid, "everything_echo", json!({"message": "still here"}));
    assert!(v["result"].is_object(), "{v}");
}

#[test]
fn a_backend_that_does_not_answer_in_time_is_a_timeout_not_a_hang() {
    let Env {
        inst: _inst,
        b,
        manager,
        token,
        ..
    } = everything("stdio");
    let raw = RawMcp::new(&b, &manager, &token);
    let sid = raw.ready_session("everything_echo", json!({"message": "up?"}));
    let started = Instant::now();
    // 10 s of work against a 1.5 s tool timeout.
    let v = raw.call(
        &sid,
        "everything_trigger-long-running-operation",
        json!({"duration": 10, "steps": 2}),
    );
    let took = started.elapsed();
    assert_eq!(v["error"]["data"]["reason"], "backend_timeout", "{v}");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // The backend is still usable afterwards.
    let v = raw.call(&sid, "everything_echo", json!({"message": "still here"}));
    assert!(v["result"].is_object(), "{v}");
}

#[test]
fn an_oversized_tool_response_is_refused_and_the_broker_stays_up() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    // A 3 MiB row: the tool's answer (text plus structured copy) passes 4 MiB.
    let out = run(Command::new("python3").arg("-c").arg(format!(
        "import sqlite3; c = sqlite3.connect('{}'); c.execute(\"insert into users values (9, ?, 'big@example.com')\", ('x' * (3 * 1024 * 1024),)); c.commit()",
        inst.dir.join("data.db").display()
    )));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let b = inst.start();
    let manager = b.enrol("manager");
    let (token, _) = b.token(&manager, users());
    let raw = RawMcp::new(&b, &manager, &token);
    let (sid, _) = raw.initialize("2025-11-25");
    let v = raw.wait_ready(&sid, "db_read", json!({"table": "users"}));
    assert_eq!(
        v["error"]["data"]["reason"], "backend_response_too_large",
        "{v}"
    );
    let v = raw.call(&sid, "db_read", json!({"table": "users", "filter": "Ada"}));
    assert!(v["result"].is_object(), "{v}");
}

#[test]
fn an_oversized_stdio_answer_fails_its_call_alone_and_the_backend_stays() {
    let agents = "manager:\n  image: img/x:1\n  obtain:\n    - {tool: fx, op: big}\n    - {tool: fx, op: slow}\n    - {tool: fx, op: pid}\n";
    let tool = format!(
        "    - {{name: fx, transport: stdio, command: [python3, '{}'], timeout: 20s, operations: [{{name: big}}, {{name: slow}}, {{name: pid}}]}}\n",
        workspace_root().join("tests/py/stdio_tool.py").display()
    );
    let Env {
        b, manager, token, ..
    } = env(
        agents,
        &tool,
        json!([{"tool": "fx", "op": "big"}, {"tool": "fx", "op": "slow"}, {"tool": "fx", "op": "pid"}]),
    );
    let raw = RawMcp::new(&b, &manager, &token);
    let sid = raw.ready_session("fx_pid", json!({}));
    let pid = |raw: &RawMcp<'_>| {
        raw.call(&sid, "fx_pid", json!({}))["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let before = pid(&raw);
    for id_last in ["no", "yes"] {
        // A call in flight on the same backend while another's answer is
        // over the cap.
        let slow = std::thread::scope(|s| {
            let slow = s.spawn(|| raw.call(&sid, "fx_slow", json!({"secs": "2"})));
            std::thread::sleep(Duration::from_millis(300));
            let v = raw.call(&sid, "fx_big", json!({"mib": "5", "id_last": id_last}));
            assert_eq!(
                v["error"]["data"]["reason"], "backend_response_too_large",
                "{v}"
            );
            slow.join().unwrap()
        });
        assert_eq!(
            slow["result"]["content"][0]["text"], "slow done",
            "the other call failed with the oversized one (id {id_last}): {slow}"
        );
    }
    // Neither was the backend restarted.
    assert_eq!(pid(&raw), before);
}

#[test]
fn stopping_the_broker_stops_its_backends() {
    let Env {
        inst: _inst,
        mut b,
        manager,
        token,
        ..
    } = everything("http");
    let raw = RawMcp::new(&b, &manager, &token);
    let _sid = raw.ready_session("everything_echo", json!({"message": "up?"}));
    // The http backend is a shell wrapper exec'ing node: its whole group.
    let pids = children(b.pid().unwrap());
    assert!(pids.len() >= 2, "expected two backends, got {pids:?}");
    let broker_pid = b.pid().unwrap();
    drop(raw);
    lever_tests::broker::sigterm(broker_pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "backends outlived the broker: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    b.kill();
}

#[test]
fn tools_list_leaves_out_what_an_attenuated_token_cannot_call() {
    let Env {
        inst: _inst,
        b,
        manager,
        token,
        ..
    } = everything("stdio");
    // The holder narrows its own token offline to one operation.
    let narrowed = echo_only(&token);
    let raw = RawMcp::new(&b, &manager, &token);
    let (sid, _) = raw.initialize("2025-11-25");
    raw.wait_ready(&sid, "everything_echo", json!({"message": "hi"}));
    let names = |t: &str| {
        let r = RawMcp::new(&b, &manager, t).post(
            Some(&sid),
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        );
        let mut n: Vec<String> = r.json()["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(
        names(&token),
        [
            "everything_echo",
            "everything_get-sum",
            "everything_trigger-long-running-operation"
        ]
    );
    assert_eq!(names(&narrowed), ["everything_echo"]);
    // What the list says agrees with what a call gets.
    let raw_n = RawMcp::new(&b, &manager, &narrowed);
    let v = raw_n.call(&sid, "everything_get-sum", json!({"a": 1, "b": 2}));
    assert!(v["error"].is_object(), "{v}");
    let v = raw_n.call(&sid, "everything_echo", json!({"message": "hi"}));
    assert!(v["result"].is_object(), "{v}");
}

#[test]
fn listing_with_an_attenuated_token_counts_against_the_tool_rate() {
    // Each grant of an attenuated token costs a Datalog evaluation to list:
    // such a list is rate limited like a call; a plain token's is not.
    let extra = format!(
        "{}  rate_limits: {{tools: {{per_minute: 1, burst: 2}}}}\n",
        everything_tools("stdio")
    );
    let Env {
        inst: _inst,
        b,
        manager,
        token,
        ..
    } = env(EVERYTHING_AGENTS, &extra, everything_grants());
    let narrowed = echo_only(&token);
    let raw = RawMcp::new(&b, &manager, &token);
    let (sid, _) = raw.initialize("2025-11-25");
    let list = |t: &str| {
        RawMcp::new(&b, &manager, t).post(
            Some(&sid),
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        )
    };
    for _ in 0..5 {
        assert!(list(&token).json()["result"].is_object());
    }
    let replies: Vec<_> = (0..3).map(|_| list(&narrowed)).collect();
    // The wait is also in a `retry-after` header, as on the other routes.
    let wait = replies[2]
        .headers
        .get("retry-after")
        .map(|v| v.to_str().unwrap());
    assert!(
        wait.is_some_and(|w| w.parse::<u64>().unwrap() >= 1),
        "{wait:?}"
    );
    let answers: Vec<Value> = replies.iter().map(|r| r.json()).collect();
    assert!(answers[0]["result"].is_object(), "{}", answers[0]);
    assert!(answers[1]["result"].is_object(), "{}", answers[1]);
    assert_eq!(answers[2]["error"]["code"], -32002, "{}", answers[2]);
    assert_eq!(answers[2]["error"]["data"]["reason"], "rate_limited");
    assert!(
        answers[2]["error"]["data"]["retry_after_secs"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

/// `token` narrowed by its holder, offline, to `everything/echo`.
fn echo_only(token: &str) -> String {
    lever_policy::token::attenuate(
        token,
        "check if req(\"everything\", \"echo\");",
        std::collections::HashMap::new(),
    )
    .unwrap()
}

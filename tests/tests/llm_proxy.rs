//! The `/llm` proxy and the in-jail gateway, with real processes: the mock
//! upstream, `lever broker`, `lever agent gateway`, and the official
//! Anthropic Python SDK as the client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::Method;
use lever_tests::broker::{
    Agent, Broker, DEFAULT_AGENTS, Instance, connect_jail, mock_requests, start_gateway, start_mock,
};
use lever_tests::{run, workspace_root};
use serde_json::{Value, json};

const REAL_KEY: &str = "sk-ant-test-real-key";

struct Setup {
    inst: Instance,
    b: Broker,
    _mock: lever_tests::broker::Proc,
    mock_url: String,
    manager: Agent,
    token: String,
}

fn setup(extra: &str) -> Setup {
    setup_env(extra, &[])
}

/// [`setup`] with the broker started with extra environment variables.
fn setup_env(extra: &str, env: &[(&str, &str)]) -> Setup {
    // The mock needs the key before the instance exists: write it first in
    // a scratch dir, then point the instance's upstream at the mock.
    let scratch = lever_tests::TempDir::new("mock");
    scratch.write("key", REAL_KEY, 0o600);
    let (mock, mock_url) = start_mock(scratch.path(), "key");
    std::mem::forget(scratch); // the mock process keeps using its cwd
    let inst = Instance::new(DEFAULT_AGENTS, &format!("  upstream: {mock_url}\n{extra}"));
    let b = inst.start_env(env);
    let manager = b.enrol("manager");
    let (token, _) = b.token(&manager, json!([{"tool": "llm", "op": "generate"}]));
    Setup {
        inst,
        b,
        _mock: mock,
        mock_url,
        manager,
        token,
    }
}

fn messages_body(prompt: &str, stream: bool) -> Value {
    json!({"model": "claude-mock-1", "max_tokens": 32, "stream": stream,
           "messages": [{"role": "user", "content": prompt}]})
}

/// A raw HTTP/1.1 request over mTLS straight to the broker: full control
/// over the request line and headers. Returns the whole response text.
fn raw_tls(s: &Setup, request: &str) -> String {
    let tls = s.manager.tls();
    let port = s.inst.jail_port;
    s.b.rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = connect_jail(&tls, port).await;
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// Reads from `stream` until what it read holds `needle`; returns it all.
async fn read_until(stream: &mut (impl tokio::io::AsyncRead + Unpin), needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 8192];
    let mut got = String::new();
    while !got.contains(needle) {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream ended before {needle:?}: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got
}

/// Connects to the broker's jail port over mTLS as `tls` and writes a raw
/// streaming `/llm/v1/messages` request; the caller reads the answer.
async fn open_llm_stream(
    tls: lever_broker::client::ClientTls,
    port: u16,
    token: &str,
    body: &str,
) -> impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + use<> {
    open_llm_upload(tls, port, token, body, body.len()).await
}

/// [`open_llm_stream`], with only the first `sent` bytes of `body` written
/// (its `Content-Length` is the whole body's): the rest is the caller's.
async fn open_llm_upload(
    tls: lever_broker::client::ClientTls,
    port: u16,
    token: &str,
    body: &str,
    sent: usize,
) -> impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + use<> {
    use tokio::io::AsyncWriteExt;
    let mut stream = connect_jail(&tls, port).await;
    let req = format!(
        "POST /llm/v1/messages HTTP/1.1\r\nHost: localhost\r\nx-api-key: {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..sent]
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    stream
}

fn llm(
    s: &Setup,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> lever_broker::client::Reply {
    s.b.jail(&s.manager.tls(), Method::POST, path, headers, body)
}

#[test]
fn the_official_python_sdk_streams_through_gateway_broker_and_upstream() {
    let s = setup("");
    let (_gw, gw_url) = start_gateway(s.inst.dir.path(), &s.manager, s.inst.jail_port);
    let script = workspace_root().join("tests/py/anthropic_stream.py");
    let out = run(Command::new("python3")
        .arg(&script)
        .arg(format!("{gw_url}/llm"))
        .arg(&s.token));
    assert_eq!(
        out.code, 0,
        "the SDK failed (pip install -r tests/requirements.txt):\n{}{}",
        out.stdout, out.stderr
    );
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["text"], "word0 word1 word2 word3 ");
    assert_eq!(v["usage"], json!({"input": 12, "output": 4}));
    assert_eq!(v["bad"]["status"], 401);
    assert_eq!(v["bad"]["type"], "authentication_error");
    // The client never saw the real key, in headers or bodies.
    assert!(!out.stdout.contains(REAL_KEY));
    // The upstream saw the real key and never the token.
    let seen = mock_requests(&s.b.rt, &s.mock_url);
    assert_eq!(
        seen.len(),
        2,
        "the bad-token call must not reach the upstream: {seen:?}"
    );
    for r in &seen {
        assert_eq!(r["headers"]["x-api-key"], REAL_KEY);
        assert!(r["headers"].get("authorization").is_none(), "{r}");
        assert!(
            !r.to_string().contains(&s.token[..32]),
            "the token reached the upstream: {r}"
        );
        assert_eq!(r["path"], "/v1/messages");
    }
    // Every call is in the audit trail, with usage.
    std::thread::sleep(Duration::from_millis(300));
    let audit = std::fs::read_to_string(s.inst.audit_file()).unwrap();
    let llm: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["event"] == "llm")
        .collect();
    let streamed = llm
        .iter()
        .find(|v| v["detail"]["stream"] == true)
        .expect("a streamed llm record");
    assert_eq!(streamed["identity"], "manager");
    assert_eq!(streamed["detail"]["input_tokens"], 12);
    assert_eq!(streamed["detail"]["output_tokens"], 4);
    assert_eq!(streamed["detail"]["model"], "claude-mock-1");
    assert_eq!(streamed["detail"]["completed"], true);
    assert!(streamed["detail"]["ttfb_ms"].as_f64().is_some());
    assert!(
        llm.iter().any(|v| v["decision"] == "deny"),
        "the bad token's denial is recorded"
    );
    assert!(!audit.contains(REAL_KEY) && !audit.contains(&s.token));
}

/// Reads an SSE stream from `stream`, noting when each `[sent_us=N]` stamp
/// arrived; returns (sent, arrived) pairs in microseconds since the epoch.
fn stamps(mut stream: impl Read, expect: usize) -> Vec<(u128, u128)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < expect && Instant::now() < deadline {
        let n = stream.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros();
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let found: Vec<u128> = text
            .split("[sent_us=")
            .skip(1)
            .filter_map(|s| s.split(']').next()?.parse().ok())
            .collect();
        for sent in found.into_iter().skip(out.len()) {
            out.push((sent, now));
        }
    }
    out
}

#[test]
fn each_event_reaches_the_client_as_soon_as_it_leaves_the_upstream() {
    let s = setup("");
    let (_gw, gw_url) = start_gateway(s.inst.dir.path(), &s.manager, s.inst.jail_port);
    let addr = gw_url.trim_start_matches("http://").to_owned();
    let body = messages_body("go mock:events=8 gap_ms=100 stamp", true).to_string();
    let mut tcp = TcpStream::connect(&addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        tcp,
        "POST /llm/v1/messages HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nanthropic-version: 2023-06-01\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        s.token,
        body.len()
    )
    .unwrap();
    let got = stamps(tcp, 8);
    assert_eq!(got.len(), 8, "not every event arrived: {got:?}");
    for (i, (sent, arrived)) in got.iter().enumerate() {
        let lag = arrived.saturating_sub(*sent);
        assert!(
            lag < 10_000,
            "event {i} arrived {lag} us after leaving the upstream (a buffering proxy?): {got:?}"
        );
    }
    // And they were really spread out, not all sent at the end.
    assert!(got[7].0 - got[0].0 > 600_000, "{got:?}");
}

#[test]
fn only_the_allow_listed_api_paths_are_proxied() {
    let s = setup("");
    let auth = format!("Bearer {}", s.token);
    let h = [
        ("authorization", auth.as_str()),
        ("anthropic-version", "2023-06-01"),
    ];
    for path in [
        "/llm/v1/complete",
        "/llm/v1/messages/batches",
        "/llm/v1/models/../messages",
        "/llm/v1/messages/%2e%2e/models",
        "/llm/v1%2fmessages",
        "/llm//v1/messages",
        "/llm/v1/messages/",
        "/llm/V1/messages",
        "/llm/",
    ] {
        let r = llm(&s, path, &h, Some(messages_body("x", false)));
        assert!(r.status == 404 || r.status == 400, "{path}: {}", r.status);
        assert_eq!(
            r.json()["type"],
            "error",
            "{path}: not Anthropic-shaped: {}",
            r.error_message()
        );
    }
    let r = llm(
        &s,
        "/llm/v1/messages?beta=true&redirect=http://evil",
        &h,
        Some(messages_body("x", false)),
    );
    assert_eq!(r.status, 400);
    let r =
        s.b.jail(&s.manager.tls(), Method::GET, "/llm/v1/messages", &h, None);
    assert_eq!(r.status, 405);
    // Claude Code's own query string is fine.
    let r = llm(
        &s,
        "/llm/v1/messages?beta=true",
        &h,
        Some(messages_body("x", false)),
    );
    assert_eq!(r.status, 200, "{}", r.error_message());
    // Absolute-form targets never pick the upstream.
    let body = messages_body("x", false).to_string();
    let resp = raw_tls(
        &s,
        &format!(
            "POST http://evil.example/llm/v1/messages HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            s.token,
            body.len()
        ),
    );
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let seen = mock_requests(&s.b.rt, &s.mock_url);
    assert_eq!(
        seen.len(),
        1,
        "only the one allowed call reached the upstream: {seen:?}"
    );
    assert_eq!(seen[0]["query"], "beta=true");
}

#[test]
fn credentials_and_proxy_headers_are_stripped_in_any_case() {
    let s = setup("");
    let body = messages_body("x", false).to_string();
    let resp = raw_tls(
        &s,
        &format!(
            "POST /llm/v1/messages HTTP/1.1\r\nHost: localhost\r\nX-API-KEY: {t}\r\nAUTHORIZATION: bearer {t}\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nForwarded: for=1.2.3.4\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Host: evil.example\r\nVia: 1.1 evil\r\nCookie: session=1\r\nConnection: keep-alive, x-evil\r\nX-Evil: 1\r\nAnthropic-Version: 2023-06-01\r\nAnthropic-Beta: tools-2024\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len(),
            t = s.token
        ),
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = mock_requests(&s.b.rt, &s.mock_url);
    let h = &seen[0]["headers"];
    assert_eq!(h["x-api-key"], REAL_KEY);
    assert_eq!(h["anthropic-version"], "2023-06-01");
    assert_eq!(h["anthropic-beta"], "tools-2024");
    for gone in [
        "authorization",
        "proxy-authorization",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "via",
        "cookie",
        "x-evil",
    ] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h}");
    }
    // Two different credentials: refused before anything is sent.
    let other =
        s.b.token(&s.manager, json!([{"tool": "llm", "op": "generate"}]))
            .0;
    let r = llm(
        &s,
        "/llm/v1/messages",
        &[
            ("authorization", &format!("Bearer {}", s.token)),
            ("x-api-key", &other),
        ],
        Some(messages_body("x", false)),
    );
    assert_eq!(r.status, 400);
    assert_eq!(mock_requests(&s.b.rt, &s.mock_url).len(), 1);
}

#[test]
fn tokens_for_another_capability_or_another_cn_are_refused() {
    let s = setup("");
    let (db, _) = s.b.token(
        &s.manager,
        json!([{"tool": "db", "op": "read", "constraints": {"table": "users"}}]),
    );
    let r = llm(
        &s,
        "/llm/v1/messages",
        &[("x-api-key", &db)],
        Some(messages_body("x", false)),
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["type"], "permission_error");
    // A grove replaying the manager's llm token.
    let g1 = s.b.enrol("g1");
    let r = s.b.jail(
        &g1.tls(),
        Method::POST,
        "/llm/v1/messages",
        &[("x-api-key", &s.token)],
        Some(messages_body("x", false)),
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["type"], "permission_error");
    // No token, a ticket, garbage.
    for h in [
        vec![],
        vec![("x-api-key", "lvtk_00")],
        vec![("authorization", "Bearer x.y.z")],
    ] {
        let r = llm(&s, "/llm/v1/messages", &h, Some(messages_body("x", false)));
        assert_eq!(r.status, 401, "{h:?}");
        assert_eq!(r.json()["error"]["type"], "authentication_error");
    }
    // After an epoch bump the token is dead.
    s.b.admin(Method::POST, "/bump-epoch", Some(json!({})));
    let r = llm(
        &s,
        "/llm/v1/messages",
        &[("x-api-key", &s.token)],
        Some(messages_body("x", false)),
    );
    assert_eq!(r.status, 401);
    assert!(
        mock_requests(&s.b.rt, &s.mock_url).is_empty(),
        "a refused call reached the upstream"
    );
}

#[test]
fn upstream_failures_reach_the_client_as_anthropic_errors_and_the_broker_stays_up() {
    let s = setup("");
    let h = [("x-api-key", s.token.as_str())];
    // A 529 passes through as the upstream said it.
    let r = llm(
        &s,
        "/llm/v1/messages",
        &h,
        Some(messages_body("mock:status=529", false)),
    );
    assert_eq!(r.status, 529);
    assert_eq!(r.json()["error"]["type"], "overloaded_error");
    // A mid-stream error event passes through in order.
    let r = llm(
        &s,
        "/llm/v1/messages",
        &h,
        Some(messages_body("mock:events=5 error_after=2", true)),
    );
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        text.contains("word1") && !text.contains("word2") && text.contains("event: error"),
        "{text}"
    );
    // A reset mid-stream ends the stream with an SSE error event.
    let r = llm(
        &s,
        "/llm/v1/messages",
        &h,
        Some(messages_body("mock:events=5 reset_after=2", true)),
    );
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        text.contains("word1") && text.contains("event: error") && text.contains("api_error"),
        "{text}"
    );
    assert!(!text.contains("message_stop"), "{text}");
    // The broker is still up.
    assert_eq!(s.b.admin(Method::GET, "/healthz", None).status, 200);
    assert_eq!(
        llm(&s, "/llm/v1/messages", &h, Some(messages_body("ok", false))).status,
        200
    );
}

#[test]
fn an_unreachable_upstream_is_a_502_api_error() {
    let closed = lever_tests::broker::free_port();
    let inst = Instance::new(
        DEFAULT_AGENTS,
        &format!("  upstream: http://127.0.0.1:{closed}\n"),
    );
    let b = inst.start();
    let m = b.enrol("manager");
    let (t, _) = b.token(&m, json!([{"tool": "llm", "op": "generate"}]));
    let r = b.jail(
        &m.tls(),
        Method::POST,
        "/llm/v1/messages",
        &[("x-api-key", &t)],
        Some(messages_body("x", false)),
    );
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "api_error");
    assert!(!String::from_utf8_lossy(&r.body).contains(REAL_KEY));
}

#[test]
fn a_client_that_goes_away_cancels_the_upstream_request() {
    let s = setup("");
    let body = messages_body("slow mock:events=50 gap_ms=100", true).to_string();
    let tls = s.manager.tls();
    let port = s.inst.jail_port;
    let token = s.token.clone();
    s.b.rt.block_on(async move {
        let mut stream = open_llm_stream(tls, port, &token, &body).await;
        read_until(&mut stream, "word1").await;
        drop(stream); // the client goes away after two events
    });
    std::thread::sleep(Duration::from_millis(800));
    let seen = mock_requests(&s.b.rt, &s.mock_url);
    let r = &seen[0];
    let cancelled = r["cancelled_after"]
        .as_u64()
        .expect("the upstream saw no cancellation");
    assert!(cancelled < 10, "the upstream kept streaming to nobody: {r}");
    assert!(r.get("completed").is_none(), "{r}");
}

#[test]
fn a_revocation_cuts_an_open_stream_and_a_call_awaiting_its_answer() {
    let s = setup("");
    let grant = json!([{"tool": "llm", "op": "generate"}]);
    let (token, token_id) = s.b.token(&s.manager, grant.clone());
    // The upstream goes quiet for 3 s after the first word: the cut must
    // not wait for its next event.
    let body = messages_body("slow mock:events=4 gap_ms=3000", true).to_string();
    let (tls, port) = (s.manager.tls(), s.inst.jail_port);
    let started = Instant::now();
    // The stream is read on one thread; the operator revokes on this one
    // once the first word is through.
    let (first, first_seen) = std::sync::mpsc::channel();
    let (text, revoked_at) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            s.b.rt.block_on(async {
                let mut stream = open_llm_stream(tls, port, &token, &body).await;
                let mut text =
                    tokio::time::timeout(Duration::from_secs(10), read_until(&mut stream, "word0"))
                        .await
                        .expect("no first word");
                first.send(()).unwrap();
                // To the body's last chunk (the connection itself stays
                // open for the next request).
                let rest = tokio::time::timeout(
                    Duration::from_secs(4),
                    read_until(&mut stream, "\r\n0\r\n\r\n"),
                )
                .await
                .expect("the stream did not end");
                text.push_str(&rest);
                text
            })
        });
        first_seen.recv_timeout(Duration::from_secs(10)).unwrap();
        let r =
            s.b.admin(Method::POST, "/revoke", Some(json!({"token_id": token_id})));
        assert_eq!(r.status, 200);
        let at = started.elapsed();
        (reader.join().unwrap(), at)
    });
    // Cut at once, told in the stream's own protocol, the rest never sent.
    assert!(
        text.contains("event: error") && text.contains("authentication_error"),
        "{text}"
    );
    assert!(!text.contains("word1"), "the stream ran on: {text}");
    assert!(
        started.elapsed() < revoked_at + Duration::from_millis(1500),
        "the stream ended {:?} after the revocation",
        started.elapsed() - revoked_at
    );
    // The mock notices when it tries its next event, 3 s after the first.
    let deadline = Instant::now() + Duration::from_secs(5);
    let cancelled = loop {
        let seen = mock_requests(&s.b.rt, &s.mock_url);
        if let Some(n) = seen.last().and_then(|r| r["cancelled_after"].as_u64()) {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the upstream request was not cancelled: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(cancelled, 1);
    let deadline = Instant::now() + Duration::from_secs(3);
    let rec = loop {
        let found = s.inst.audit_records().into_iter().find(|r| {
            r["event"] == "llm"
                && r["token_id"] == token_id.as_str()
                && r["detail"]["failure"]
                    .as_str()
                    .is_some_and(|f| f.contains("token_revoked"))
        });
        if let Some(r) = found {
            break r;
        }
        assert!(Instant::now() < deadline, "{:?}", s.inst.audit_records());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(rec["identity"], "manager");

    // A call still waiting for the upstream's answer is refused when the
    // epoch moves under it.
    let (token, _) = s.b.token(&s.manager, grant.clone());
    let upstream_saw = mock_requests(&s.b.rt, &s.mock_url).len();
    let started = Instant::now();
    let r = std::thread::scope(|scope| {
        let call = scope.spawn(|| {
            llm(
                &s,
                "/llm/v1/messages",
                &[("x-api-key", &token)],
                Some(messages_body("mock:header_delay_ms=5000", false)),
            )
        });
        // Once the request is upstream (authorized, then sent).
        let deadline = Instant::now() + Duration::from_secs(5);
        while mock_requests(&s.b.rt, &s.mock_url).len() == upstream_saw {
            assert!(
                Instant::now() < deadline,
                "the request never reached the upstream"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(s.b.admin(Method::POST, "/bump-epoch", None).status, 200);
        call.join().unwrap()
    });
    assert_eq!(r.status, 401, "{}", r.error_message());
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert!(started.elapsed() < Duration::from_millis(3500));

    // A call revoked while its body is still coming in never reaches the
    // upstream, however the body ends.
    let (token, token_id) = s.b.token(&s.manager, grant);
    let body = messages_body("mock:events=2", false).to_string();
    let half = body.len() / 2;
    let rest = &body[half..];
    let upstream_saw = mock_requests(&s.b.rt, &s.mock_url).len();
    let mut stream = s.b.rt.block_on(open_llm_upload(
        s.manager.tls(),
        s.inst.jail_port,
        &token,
        &body,
        half,
    ));
    // The token is judged as soon as the head is in; then it is revoked.
    std::thread::sleep(Duration::from_millis(300));
    let r =
        s.b.admin(Method::POST, "/revoke", Some(json!({"token_id": token_id})));
    assert_eq!(r.status, 200);
    let answer = s.b.rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        stream.write_all(rest.as_bytes()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), read_until(&mut stream, "\r\n\r\n"))
            .await
            .expect("no answer")
    });
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert_eq!(
        mock_requests(&s.b.rt, &s.mock_url).len(),
        upstream_saw,
        "a revoked token's request reached the upstream"
    );
}

#[test]
fn no_response_ever_carries_the_real_key() {
    let s = setup("");
    // A streaming answer is cut with an SSE error event before the key.
    let r = llm(
        &s,
        "/llm/v1/messages",
        &[("x-api-key", &s.token)],
        Some(messages_body("mock:events=3 echo_key", true)),
    );
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(!text.contains(REAL_KEY), "the key leaked to the client");
    assert!(
        text.contains("word1") && text.contains("withheld"),
        "{text}"
    );
    // A plain answer is cut (the client sees a broken body, never the key).
    let target = s.b.jail.clone();
    let reply = s.b.rt.block_on(lever_broker::client::send(
        &target,
        Some(&s.manager.tls()),
        Method::POST,
        "/llm/v1/messages",
        &[("x-api-key", &s.token)],
        Some(&messages_body("mock:events=3 echo_key", false)),
    ));
    if let Ok(r) = reply {
        assert!(
            !String::from_utf8_lossy(&r.body).contains(REAL_KEY),
            "the key leaked to the client"
        );
    }
}

#[test]
fn a_response_header_carrying_the_real_key_is_dropped() {
    let s = setup("");
    for stream in [false, true] {
        let r = llm(
            &s,
            "/llm/v1/messages",
            &[("x-api-key", &s.token)],
            Some(messages_body("mock:events=2 echo_key_header", stream)),
        );
        assert_eq!(r.status, 200, "stream {stream}");
        // The mock put the key inside `x-upstream-debug`; the header is
        // gone, and no other one carries the key.
        assert!(
            r.headers.get("x-upstream-debug").is_none(),
            "stream {stream}: {:?}",
            r.headers
        );
        for (name, v) in &r.headers {
            assert!(
                !String::from_utf8_lossy(v.as_bytes()).contains(REAL_KEY),
                "stream {stream}: the key leaked in {name}"
            );
        }
        // The rest of the answer is untouched.
        assert!(r.headers.get("content-type").is_some(), "stream {stream}");
        assert!(
            String::from_utf8_lossy(&r.body).contains("word1"),
            "stream {stream}"
        );
    }
}

#[test]
fn a_subscription_instance_holds_no_key_and_proxies_nothing() {
    let inst = Instance::new(
        "manager: {image: img/x:1, llm_auth: subscription, credential_file: cred}\n",
        "  llm_auth: subscription\n",
    );
    inst.dir.write("cred", "oauth", 0o600);
    let b = inst.start();
    let m = b.enrol("manager");
    // Not even a token: llm/generate is not obtainable in subscription mode.
    let r = b.obtain(&m, json!([{"tool": "llm", "op": "generate"}]));
    assert_eq!(r.status, 403);
    let r = b.jail(
        &m.tls(),
        Method::POST,
        "/llm/v1/messages",
        &[("x-api-key", "x")],
        Some(messages_body("x", false)),
    );
    assert_eq!(r.status, 401);
}

#[test]
fn the_gateway_refuses_non_loopback_binds_and_picks_up_a_renewed_certificate() {
    let s = setup("");
    let out = lever_tests::lever(
        &[
            "agent",
            "--dir",
            "/nonexistent",
            "gateway",
            "--listen",
            "0.0.0.0:0",
        ],
        s.inst.dir.path(),
        s.inst.dir.path(),
    );
    // A usage error (DESIGN §4: exit 2), refused before anything starts.
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("must listen on loopback"),
        "{}",
        out.stderr
    );
    let (_gw, gw_url) = start_gateway(s.inst.dir.path(), &s.manager, s.inst.jail_port);
    let target = lever_broker::client::Target::parse(&gw_url).unwrap();
    let call = |b: &Broker| {
        b.rt.block_on(lever_broker::client::send(
            &target,
            None,
            Method::POST,
            "/llm/v1/messages",
            &[("x-api-key", &s.token)],
            Some(&messages_body("x", false)),
        ))
        .unwrap()
    };
    assert_eq!(call(&s.b).status, 200);
    // Renew: new key and certificate in the agent dir; revoke nothing. The
    // next request uses the new pair (the old one would still work, so
    // check the file is re-read by breaking it first).
    let ad = s.inst.dir.join("agent-manager");
    std::fs::write(ad.join("cert.pem"), "garbage").unwrap();
    assert_eq!(
        call(&s.b).status,
        502,
        "the gateway cached the old certificate"
    );
    let (key, r) = s.b.renew(&s.manager, "manager");
    std::fs::write(
        ad.join("cert.pem"),
        r.json()["certificate"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(ad.join("key.pem"), key).unwrap();
    assert_eq!(call(&s.b).status, 200);
}

#[test]
fn the_request_rate_is_limited_per_agent_with_retry_after() {
    let s = setup("  rate_limits: {llm: {per_minute: 60, burst: 2}}\n");
    let h = [("x-api-key", s.token.as_str())];
    assert_eq!(
        llm(&s, "/llm/v1/messages", &h, Some(messages_body("a", false))).status,
        200
    );
    assert_eq!(
        llm(&s, "/llm/v1/messages", &h, Some(messages_body("b", false))).status,
        200
    );
    let r = llm(&s, "/llm/v1/messages", &h, Some(messages_body("c", false)));
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    let retry: u64 = r
        .headers
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "retry-after {retry}");
    // Another agent has its own allowance.
    let g1 = s.b.enrol("g1");
    let (t1, _) = s.b.token(&g1, json!([{"tool": "llm", "op": "generate"}]));
    let r = s.b.jail(
        &g1.tls(),
        Method::POST,
        "/llm/v1/messages",
        &[("x-api-key", &t1)],
        Some(messages_body("d", false)),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        mock_requests(&s.b.rt, &s.mock_url).len(),
        3,
        "the limited call reached the upstream"
    );
}

#[test]
fn a_flood_of_refused_calls_is_counted_in_the_audit_trail_not_written_line_by_line() {
    let s = setup("  rate_limits: {llm: {per_minute: 60, burst: 2}}\n");
    let h = [("x-api-key", s.token.as_str())];
    let started = std::time::Instant::now();
    let n = 300;
    let refused = (0..n)
        .filter(|i| {
            let r = llm(
                &s,
                "/llm/v1/messages",
                &h,
                Some(messages_body(&format!("{i}"), false)),
            );
            r.status == 429
        })
        .count();
    // Two served, at most one more a second refilled while the flood ran.
    let took = started.elapsed().as_secs() as usize;
    assert!(refused >= n - 2 - took - 1, "{refused} of {n} refused");
    // Another agent's refusal is written as it comes.
    let g1 = s.b.enrol("g1");
    let r = s.b.jail(
        &g1.tls(),
        Method::POST,
        "/llm/v1/messages",
        &[("x-api-key", "not-a-token")],
        Some(messages_body("d", false)),
    );
    assert_eq!(r.status, 401);
    // The counts of what was held back arrive on their own, within seconds:
    // the records written plus the counts make every refusal.
    let mine = |r: &Value| r["identity"] == "manager";
    let tally = |all: &[Value]| {
        let written = all
            .iter()
            .filter(|r| mine(r) && r["event"] == "llm" && r["reason"] == "rate_limited")
            .count() as u64;
        let held: u64 = all
            .iter()
            .filter(|r| mine(r) && r["event"] == "suppressed")
            .map(|r| r["detail"]["count"].as_u64().unwrap())
            .sum();
        (written, held)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let all = loop {
        let all = s.inst.audit_records();
        let (written, held) = tally(&all);
        if held > 0 && written + held == refused as u64 {
            break all;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{written} records and {held} counted for {refused} refusals"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The kind's burst, and one more a second the flood lasted.
    let (written, _) = tally(&all);
    assert!(
        (64..64 + 2 * took as u64 + 4).contains(&written),
        "{written} rate_limited records for {refused} refusals"
    );
    for c in all.iter().filter(|r| r["event"] == "suppressed") {
        assert_eq!(c["identity"], "manager");
        assert_eq!(c["decision"], "deny");
        assert_eq!(c["reason"], "rate_limited");
        assert_eq!(c["detail"]["kinds"][0]["event"], "llm", "{c}");
        assert_eq!(c["detail"]["kinds"][0]["count"], c["detail"]["count"]);
    }
    assert!(
        all.iter()
            .any(|r| r["identity"] == "g1" && r["decision"] == "deny" && r["event"] == "llm"),
        "the other agent's refusal is missing"
    );
    let audit = s.inst.audit_file();
    let home = s.inst.dir.path();
    let ok = lever_tests::lever(&["audit", "verify", audit.to_str().unwrap()], home, home);
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
}

#[test]
fn requests_in_flight_are_capped_per_agent() {
    let s = setup("  rate_limits: {llm: {max_concurrent: 1}}\n");
    let tls = s.manager.tls();
    let port = s.inst.jail_port;
    let token = s.token.clone();
    let body = messages_body("slow mock:events=20 gap_ms=100", true).to_string();
    // Hold one stream open on a raw connection.
    let held = s.b.rt.block_on(async move {
        use tokio::io::AsyncReadExt;
        let mut stream = open_llm_stream(tls, port, &token, &body).await;
        let mut buf = vec![0u8; 4096];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        stream
    });
    let r = llm(
        &s,
        "/llm/v1/messages",
        &[("x-api-key", &s.token)],
        Some(messages_body("x", false)),
    );
    assert_eq!(r.status, 429, "{}", r.error_message());
    assert!(
        r.error_message().contains("in flight"),
        "{}",
        r.error_message()
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let r = llm(
        &s,
        "/llm/v1/messages",
        &[("x-api-key", &s.token)],
        Some(messages_body("x", false)),
    );
    assert_eq!(
        r.status,
        200,
        "the slot was not released: {}",
        r.error_message()
    );
}

#[test]
fn the_llm_token_budget_is_enforced_per_window() {
    let s = setup("  rate_limits: {llm_tokens: {tokens: 20, window: 1h}}\n");
    let h = [("x-api-key", s.token.as_str())];
    // Each call uses 12 input + 3 output tokens (the mock's usage).
    assert_eq!(
        llm(&s, "/llm/v1/messages", &h, Some(messages_body("a", true))).status,
        200
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        llm(&s, "/llm/v1/messages", &h, Some(messages_body("b", false))).status,
        200
    );
    std::thread::sleep(Duration::from_millis(100));
    let r = llm(&s, "/llm/v1/messages", &h, Some(messages_body("c", false)));
    assert_eq!(r.status, 429, "{}", r.error_message());
    assert!(
        r.error_message().contains("budget"),
        "{}",
        r.error_message()
    );
    let retry: u64 = r
        .headers
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry > 3000,
        "retry-after {retry} should point at the window's end"
    );
}

#[test]
fn a_cached_allow_is_withdrawn_by_revocation_and_epoch() {
    let s = setup("");
    let h = [("x-api-key", s.token.as_str())];
    for _ in 0..3 {
        assert_eq!(
            llm(&s, "/llm/v1/messages", &h, Some(messages_body("x", false))).status,
            200
        );
    }
    let (t2, id2) =
        s.b.token(&s.manager, json!([{"tool": "llm", "op": "generate"}]));
    assert_eq!(
        llm(
            &s,
            "/llm/v1/messages",
            &[("x-api-key", &t2)],
            Some(messages_body("x", false))
        )
        .status,
        200
    );
    s.b.admin(Method::POST, "/revoke", Some(json!({"token_id": id2})));
    let r = llm(
        &s,
        "/llm/v1/messages",
        &[("x-api-key", &t2)],
        Some(messages_body("x", false)),
    );
    assert_eq!(r.status, 401, "a revoked token was served from the cache");
    s.b.admin(Method::POST, "/bump-epoch", Some(json!({})));
    let r = llm(&s, "/llm/v1/messages", &h, Some(messages_body("x", false)));
    assert_eq!(
        r.status, 401,
        "an old-epoch token was served from the cache"
    );
    assert_eq!(mock_requests(&s.b.rt, &s.mock_url).len(), 4);
}

#[test]
fn an_upstream_slow_to_answer_is_a_504_api_error() {
    let s = setup("  upstream_header_timeout: 1s\n");
    let started = Instant::now();
    let r = llm(
        &s,
        "/llm/v1/messages",
        &[("x-api-key", &s.token)],
        Some(messages_body("mock:header_delay_ms=5000", false)),
    );
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["type"], "api_error");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the timeout did not apply: {:?}",
        started.elapsed()
    );
    assert_eq!(
        llm(
            &s,
            "/llm/v1/messages",
            &[("x-api-key", &s.token)],
            Some(messages_body("fast", false))
        )
        .status,
        200
    );
}

/// A CA and a `localhost` server certificate for an HTTPS mock upstream:
/// (CA PEM, certificate PEM, key PEM).
fn upstream_pki() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "upstream test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn an_https_upstream_is_verified_and_spoken_to_over_http2() {
    let scratch = lever_tests::TempDir::new("tls-mock");
    let (ca, cert, key) = upstream_pki();
    scratch.write("key", REAL_KEY, 0o600);
    scratch.write("srv.pem", &cert, 0o644);
    scratch.write("srv.key", &key, 0o600);
    let ca_path = scratch.write("ca.pem", &ca, 0o644);
    let (child, line) = lever_tests::broker::spawn_ready(
        &[
            "mock-upstream",
            "--listen",
            "127.0.0.1:0",
            "--expect-key-file",
            "key",
            "--tls-cert",
            "srv.pem",
            "--tls-key",
            "srv.key",
        ],
        scratch.path(),
        "lever mock-upstream ready",
    );
    let _mock = lever_tests::broker::Proc(child);
    let port = line.rsplit(':').next().unwrap().to_owned();
    let url = format!("https://localhost:{port}");

    // Trusting the extra CA: the call works, and it went over HTTP/2.
    let inst = Instance::new(
        DEFAULT_AGENTS,
        &format!(
            "  upstream: {url}\n  upstream_ca_file: {}\n",
            ca_path.display()
        ),
    );
    let b = inst.start();
    let m = b.enrol("manager");
    let (t, _) = b.token(&m, json!([{"tool": "llm", "op": "generate"}]));
    for stream in [false, true] {
        let r = b.jail(
            &m.tls(),
            Method::POST,
            "/llm/v1/messages",
            &[("x-api-key", &t)],
            Some(messages_body("tls", stream)),
        );
        assert_eq!(r.status, 200, "{}", r.error_message());
        assert!(String::from_utf8_lossy(&r.body).contains("word2"));
    }
    let mock_tls = lever_broker::client::ClientTls::new(&ca, None).unwrap();
    let mock_target = lever_broker::client::Target::parse(&url).unwrap();
    let seen_by_mock = |rt: &tokio::runtime::Runtime| {
        rt.block_on(lever_broker::client::send(
            &mock_target,
            Some(&mock_tls),
            Method::GET,
            "/_mock/requests",
            &[],
            None,
        ))
        .unwrap()
        .json()
    };
    let seen = seen_by_mock(&b.rt);
    assert_eq!(seen[0]["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen[0]["headers"]["x-api-key"], REAL_KEY);
    drop(b);

    // Without it, the upstream's certificate is not trusted: 502, no key sent.
    let inst2 = Instance::new(DEFAULT_AGENTS, &format!("  upstream: {url}\n"));
    let b2 = inst2.start();
    let m2 = b2.enrol("manager");
    let (t2, _) = b2.token(&m2, json!([{"tool": "llm", "op": "generate"}]));
    let r = b2.jail(
        &m2.tls(),
        Method::POST,
        "/llm/v1/messages",
        &[("x-api-key", &t2)],
        Some(messages_body("tls", false)),
    );
    assert_eq!(r.status, 502, "{}", r.error_message());
    assert_eq!(r.json()["error"]["type"], "api_error");
    assert_eq!(
        seen_by_mock(&b2.rt).as_array().unwrap().len(),
        2,
        "a request reached an untrusted upstream"
    );
}

/// CPU time of each of `pid`'s threads (`schedstat`: nanoseconds on a
/// CPU), by thread id, with the thread's name.
fn thread_cpu(pid: u32) -> std::collections::HashMap<u32, (String, u64)> {
    let mut threads = std::collections::HashMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    for t in tasks {
        let t = t.unwrap().path();
        let tid: u32 = t.file_name().unwrap().to_str().unwrap().parse().unwrap();
        let Ok(name) = std::fs::read_to_string(t.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        let stat = std::fs::read_to_string(t.join("schedstat"))
            .expect("this test reads /proc/PID/task/TID/schedstat");
        let ns: u64 = stat.split_whitespace().next().unwrap().parse().unwrap();
        threads.insert(tid, (name.trim().to_owned(), ns));
    }
    threads
}

/// CPU time spent between two `thread_cpu` readings, by thread name.
fn cpu_spent(
    before: &std::collections::HashMap<u32, (String, u64)>,
    after: &std::collections::HashMap<u32, (String, u64)>,
    name: &str,
) -> u64 {
    after
        .iter()
        .filter(|(_, (n, _))| n == name)
        .map(|(tid, (_, ns))| ns.saturating_sub(before.get(tid).map_or(0, |b| b.1)))
        .sum()
}

/// Opens a keep-alive mTLS connection to the jail port and makes one
/// request on it, so the broker has accepted it and holds it.
async fn held_connection(
    tls: &lever_broker::client::ClientTls,
    port: u16,
) -> impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + use<> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = connect_jail(tls, port).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    stream
}

#[test]
fn jail_connections_are_spread_over_the_jail_workers() {
    let s = setup_env(
        "  rate_limits: {llm: {per_minute: 6000, burst: 200}}\n",
        &[("TOKIO_WORKER_THREADS", "2")],
    );
    let (b, manager, token) = (&s.b, &s.manager, &s.token);
    let pid = b.pid().unwrap();
    let before = thread_cpu(pid);
    let mut workers: Vec<&str> = before
        .values()
        .map(|(n, _)| n.as_str())
        .filter(|n| n.starts_with("lever-jail-"))
        .collect();
    workers.sort();
    workers.dedup();
    assert_eq!(
        workers,
        ["lever-jail-1", "lever-jail-2"],
        "one runtime per worker, named: {before:?}"
    );
    // Four clients at once, each making 25 requests one after another,
    // each request on a new connection (`client::send` opens one).
    let tls = manager.tls();
    let body = messages_body("spread", false);
    let statuses: Vec<u16> = b.rt.block_on(async {
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (target, tls, body, token) =
                    (b.jail.clone(), tls.clone(), body.clone(), token.clone());
                tokio::spawn(async move {
                    let mut statuses = Vec::new();
                    for _ in 0..25 {
                        let r = lever_broker::client::send(
                            &target,
                            Some(&tls),
                            Method::POST,
                            "/llm/v1/messages",
                            &[("x-api-key", &token)],
                            Some(&body),
                        )
                        .await
                        .unwrap();
                        statuses.push(r.status.as_u16());
                    }
                    statuses
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert_eq!(statuses.len(), 100);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let after = thread_cpu(pid);
    let (one, two) = (
        cpu_spent(&before, &after, "lever-jail-1"),
        cpu_spent(&before, &after, "lever-jail-2"),
    );
    // Each served about half; a hand-off that favoured one worker would
    // leave the other near nothing.
    assert!(
        one.min(two) * 4 > one + two,
        "CPU per worker over 100 requests: {one} ns and {two} ns"
    );

    // New connections go to the worker holding the fewest, not by turns:
    // hold six, see where each went (the worker that did its handshake),
    // close those of one worker, and that worker takes the next ones.
    let mut held = Vec::new();
    let mut on_one = Vec::new();
    for _ in 0..6 {
        let before = thread_cpu(pid);
        held.push(b.rt.block_on(held_connection(&tls, s.inst.jail_port)));
        let after = thread_cpu(pid);
        on_one.push(
            cpu_spent(&before, &after, "lever-jail-1") > cpu_spent(&before, &after, "lever-jail-2"),
        );
    }
    assert_eq!(
        on_one.iter().filter(|x| **x).count(),
        3,
        "six connections, three on each worker: {on_one:?}"
    );
    let emptied = "lever-jail-1";
    let kept: Vec<_> = held
        .into_iter()
        .zip(&on_one)
        .filter(|(_, one)| !**one)
        .map(|(c, _)| c)
        .collect();
    // The broker sees the three on worker 1 close.
    std::thread::sleep(Duration::from_millis(300));
    let before = thread_cpu(pid);
    for _ in 0..20 {
        let r = llm(
            &s,
            "/llm/v1/messages",
            &[("x-api-key", token)],
            Some(body.clone()),
        );
        assert_eq!(r.status, 200);
    }
    let after = thread_cpu(pid);
    let (emptied_cpu, other) = (
        cpu_spent(&before, &after, emptied),
        cpu_spent(&before, &after, "lever-jail-2"),
    );
    assert!(
        emptied_cpu > 4 * other,
        "20 requests with worker 1 holding none of the held connections and worker 2 three: {emptied_cpu} ns and {other} ns"
    );
    drop(kept);
}

/// A stream the broker cuts as it stops is audited, and before the
/// `broker_stop` record that ends the file: the jail workers and their
/// connections end before it is written.
#[test]
fn a_stream_cut_by_the_broker_stopping_is_audited_before_it_stops() {
    let s = setup("");
    let body = messages_body("slow mock:events=50 gap_ms=100", true).to_string();
    let (tls, port, token) = (s.manager.tls(), s.inst.jail_port, s.token.clone());
    let pid = s.b.pid().unwrap();
    s.b.rt.block_on(async move {
        use tokio::io::AsyncReadExt;
        let mut stream = open_llm_stream(tls, port, &token, &body).await;
        read_until(&mut stream, "word1").await;
        // The broker stops with the stream open (the client still there).
        lever_tests::broker::sigterm(pid);
        let mut buf = vec![0u8; 8192];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await;
            if matches!(n, Ok(Ok(0)) | Ok(Err(_))) {
                break; // cut
            }
            assert!(Instant::now() < deadline, "the stream outlived the broker");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let events: Vec<Value> = loop {
        let events = s.inst.audit_records();
        if events.last().is_some_and(|v| v["event"] == "broker_stop") {
            break events;
        }
        assert!(Instant::now() < deadline, "no broker_stop record");
        std::thread::sleep(Duration::from_millis(50));
    };
    let llm: Vec<&Value> = events.iter().filter(|v| v["event"] == "llm").collect();
    assert_eq!(llm.len(), 1, "the cut stream's record: {events:?}");
    assert_eq!(
        events
            .iter()
            .filter(|v| v["event"] == "broker_stop")
            .count(),
        1
    );
}

/// One agent's large request body does not stall the other connections of
/// its jail worker while the broker reads the model out of it: a broker
/// with one worker keeps answering other requests meanwhile.
#[test]
fn a_large_body_does_not_stall_the_other_connections_of_its_worker() {
    let s = setup_env(
        "  rate_limits: {llm: {per_minute: 6000, burst: 200}}\n",
        &[("TOKIO_WORKER_THREADS", "1")],
    );
    // About 28 MiB (under the 32 MiB cap) of small JSON values, the slowest
    // kind of body to read through.
    let big = bytes::Bytes::from(format!(
        r#"{{"model":"claude-mock-1","max_tokens":32,"messages":[{{"role":"user","content":"large"}}],"pad":[{}0]}}"#,
        "0,".repeat(14 << 20)
    ));
    let (tls, target, token) = (s.manager.tls(), s.b.jail.clone(), s.token.clone());
    let (status, worst) = s.b.rt.block_on(async move {
        let big_call = {
            let (tls, target) = (tls.clone(), target.clone());
            tokio::spawn(async move {
                lever_broker::client::send_bytes(
                    &target,
                    Some(&tls),
                    Method::POST,
                    "/llm/v1/messages",
                    &[("x-api-key", &token), ("content-type", "application/json")],
                    big,
                )
                .await
                .unwrap()
                .status
            })
        };
        // Small requests one after another until the large one is answered.
        let mut worst = Duration::ZERO;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !big_call.is_finished() {
            assert!(Instant::now() < deadline, "the large call never ended");
            let t = Instant::now();
            let r =
                lever_broker::client::send(&target, Some(&tls), Method::GET, "/healthz", &[], None)
                    .await
                    .unwrap();
            assert_eq!(r.status, 200);
            worst = worst.max(t.elapsed());
        }
        (big_call.await.unwrap(), worst)
    });
    assert_eq!(status, 200);
    eprintln!("worst /healthz while the large body was handled: {worst:?}");
    assert!(worst < Duration::from_millis(400), "{worst:?}");
}

#[test]
fn a_placeholder_api_key_beside_the_token_is_dropped_not_a_conflict() {
    // Scion gives an api-key agent a placeholder key; the agent's real
    // credential is its capability token, as a bearer or as the key.
    let s = setup("");
    let bearer = format!("Bearer {}", s.token);
    let cases: [(&[(&str, &str)], u16); 4] = [
        (
            &[
                ("authorization", &bearer),
                ("x-api-key", "sk-ant-placeholder"),
            ],
            200,
        ),
        (
            &[
                ("authorization", "Bearer sk-ant-placeholder"),
                ("x-api-key", &s.token),
            ],
            200,
        ),
        // Another scheme is not one of ours: dropped, the key is the token.
        (
            &[
                ("authorization", "Basic Zm9vOmJhcg=="),
                ("x-api-key", &s.token),
            ],
            200,
        ),
        // Neither is a token: still ambiguous, refused.
        (
            &[
                ("authorization", "Bearer sk-ant-one"),
                ("x-api-key", "sk-ant-two"),
            ],
            400,
        ),
    ];
    for (i, (headers, want)) in cases.iter().enumerate() {
        let r = llm(
            &s,
            "/llm/v1/messages",
            headers,
            Some(messages_body("x", false)),
        );
        assert_eq!(r.status, *want, "case {i}: {}", r.error_message());
    }
    let seen = mock_requests(&s.b.rt, &s.mock_url);
    assert_eq!(seen.len(), 3, "{seen:?}");
    for r in &seen {
        let h = &r["headers"];
        assert_eq!(h["x-api-key"], REAL_KEY, "{h}");
        assert!(h.get("authorization").is_none(), "{h}");
        assert!(!h.to_string().contains("placeholder"), "{h}");
    }
}

#[test]
fn models_paging_is_forwarded_only_as_checked_values() {
    let s = setup("");
    let h = [("x-api-key", s.token.as_str())];
    let get = |path: &str| s.b.jail(&s.manager.tls(), Method::GET, path, &h, None);
    let r = get("/llm/v1/models?after_id=claude-mock-1&limit=5");
    assert_eq!(r.status, 200, "{}", r.error_message());
    let r = get("/llm/v1/models?beta=true&limit=2");
    assert_eq!(r.status, 200, "{}", r.error_message());
    for bad in [
        "/llm/v1/models?limit=abc",
        "/llm/v1/models?limit=1&limit=2",
        "/llm/v1/models?foo=1",
        "/llm/v1/models?limit=5&redirect=http://evil",
        "/llm/v1/models?after_id=a%26b",
        "/llm/v1/models?after_id=",
        "/llm/v1/models?limit",
        "/llm/v1/models?limit=1&beta=false",
        "/llm/v1/messages?limit=5",
    ] {
        let r = get(bad);
        assert!(r.status == 400 || r.status == 405, "{bad}: {}", r.status);
        assert_eq!(r.json()["type"], "error", "{bad}");
    }
    let seen = mock_requests(&s.b.rt, &s.mock_url);
    assert_eq!(seen.len(), 2, "{seen:?}");
    // Rebuilt in a fixed order from the checked values.
    assert_eq!(seen[0]["query"], "limit=5&after_id=claude-mock-1");
    assert_eq!(seen[1]["query"], "limit=2&beta=true");
}

#[test]
fn a_header_the_upstream_names_in_connection_is_not_passed_back() {
    let s = setup("");
    let r = llm(
        &s,
        "/llm/v1/messages",
        &[("x-api-key", &s.token)],
        Some(messages_body("mock:hop_header", false)),
    );
    assert_eq!(r.status, 200, "{}", r.error_message());
    assert!(r.headers.get("x-hop-secret").is_none(), "{:?}", r.headers);
    assert_eq!(
        r.headers.get("x-end-to-end").map(|v| v.to_str().unwrap()),
        Some("kept"),
        "{:?}",
        r.headers
    );
}

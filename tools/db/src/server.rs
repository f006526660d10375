//! MCP for the tool: JSON-RPC over stdin/stdout or over streamable HTTP
//! (`POST /mcp`, JSON responses, no sessions), loopback only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::db::Db;

/// Whether each call is logged to stderr (one line: the table and the
/// outcome). The `lever-tool-db` binary turns it on.
pub static LOG_CALLS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Largest request accepted.
const MAX_REQUEST: usize = 256 * 1024;
const VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26"];

fn fail(msg: &str) -> ExitCode {
    eprintln!("lever-tool-db: {msg}");
    ExitCode::FAILURE
}

/// Handles one JSON-RPC message; `None` for a notification or a response.
pub async fn answer(db: &Arc<Db>, msg: &Value) -> Option<Value> {
    let id = msg.get("id")?.clone();
    let method = msg.get("method").and_then(Value::as_str)?;
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    let ok = |result: Value| Some(json!({"jsonrpc": "2.0", "id": id, "result": result}));
    let err = |code: i64, message: &str| {
        Some(json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}))
    };
    match method {
        "initialize" => {
            let asked = params.get("protocolVersion").and_then(Value::as_str);
            let version = VERSIONS
                .iter()
                .find(|v| Some(**v) == asked)
                .unwrap_or(&VERSIONS[0]);
            ok(json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "lever-tool-db", "version": env!("CARGO_PKG_VERSION")},
            }))
        }
        "ping" => ok(json!({})),
        "tools/list" => ok(json!({"tools": [db.tool()]})),
        "tools/call" => {
            if params.get("name").and_then(Value::as_str) != Some("read") {
                return err(-32602, "unknown tool (this server has `read`)");
            }
            let args = match params.get("arguments") {
                None | Some(Value::Null) => serde_json::Map::new(),
                Some(Value::Object(m)) => m.clone(),
                Some(_) => return err(-32602, "`arguments` must be an object"),
            };
            let table = args.get("table").map(Value::to_string).unwrap_or_default();
            let db = db.clone();
            let r = tokio::task::spawn_blocking(move || db.read(&args)).await;
            // One line per call on stderr: what was asked and what came of it.
            match &r {
                _ if !LOG_CALLS.load(std::sync::atomic::Ordering::Relaxed) => {}
                Ok(Ok(v)) => eprintln!(
                    "lever-tool-db: read table={table}: {} rows",
                    v["rows"].as_array().map_or(0, Vec::len)
                ),
                Ok(Err(e)) => eprintln!("lever-tool-db: read table={table}: refused: {}", e.0),
                Err(_) => eprintln!("lever-tool-db: read table={table}: failed"),
            }
            match r {
                Ok(Ok(v)) => {
                    let text = serde_json::to_string_pretty(&v["rows"]).unwrap_or_default();
                    ok(
                        json!({"content": [{"type": "text", "text": text}], "structuredContent": v, "isError": false}),
                    )
                }
                Ok(Err(e)) => {
                    ok(json!({"content": [{"type": "text", "text": e.0}], "isError": true}))
                }
                Err(_) => err(-32603, "the read failed"),
            }
        }
        other => err(-32601, &format!("method `{other}` not found")),
    }
}

pub async fn serve_stdio(db: Arc<Db>) -> ExitCode {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.len() > MAX_REQUEST {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(msg) => answer(&db, &msg).await,
            Err(_) => Some(
                json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "parse error"}}),
            ),
        };
        if let Some(r) = reply {
            let mut bytes = r.to_string().into_bytes();
            bytes.push(b'\n');
            if out.write_all(&bytes).await.is_err() || out.flush().await.is_err() {
                break;
            }
        }
    }
    ExitCode::SUCCESS
}

pub async fn serve_http(addr: SocketAddr, db: Arc<Db>) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => return fail(&format!("cannot listen on {addr}: {e}")),
    };
    // The address bound, not the one asked for: `-backend 127.0.0.1:0`
    // takes a free port and says which.
    let bound = listener.local_addr().unwrap_or(addr);
    eprintln!("lever-tool-db: serving MCP on http://{bound}/mcp");
    // Started by a broker: go when it goes, even if it was killed outright
    // and could not take its tools down with it.
    let parent = std::os::unix::process::parent_id();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(0);
            }
        }
    });
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let db = db.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let db = db.clone();
                async move { Ok::<_, Infallible>(handle(&db, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn respond(status: StatusCode, body: Option<&Value>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        body.map(Value::to_string).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    if body.is_some() {
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    r
}

async fn handle(db: &Arc<Db>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/mcp" {
        return respond(StatusCode::NOT_FOUND, None);
    }
    if req.headers().contains_key(http::header::ORIGIN) {
        return respond(StatusCode::FORBIDDEN, None);
    }
    match *req.method() {
        Method::POST => {}
        Method::DELETE => return respond(StatusCode::OK, None),
        _ => return respond(StatusCode::METHOD_NOT_ALLOWED, None),
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_REQUEST)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return respond(StatusCode::PAYLOAD_TOO_LARGE, None),
    };
    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        let e = json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "parse error"}});
        return respond(StatusCode::BAD_REQUEST, Some(&e));
    };
    match answer(db, &msg).await {
        Some(r) => respond(StatusCode::OK, Some(&r)),
        None => respond(StatusCode::ACCEPTED, None),
    }
}

//! `lever demo`: the whole broker flow, offline, in one command. A broker
//! on a temporary state dir, an Anthropic-compatible mock upstream holding
//! a placeholder key, a demo agent enrolled with a one-time ticket, a
//! streamed LLM call through the in-jail gateway, a denied call, MCP tool
//! calls to `lever-tool-db` (one allowed, one outside the token's pinned
//! table), and the audit trail. Every part is the real one except the
//! upstream.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use lever_broker::client::{self, ClientTls, Target};
use lever_policy::config::{self, Env};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{fail, runtime};

pub(crate) const AFTER_HELP: &str = "\
Runs offline in a temporary directory (removed afterwards unless --keep):
no key, no network. The upstream is a mock that speaks the Messages API and
only accepts the placeholder key the broker injects; the agent never sees
that key. Exit status 0 when every step behaved as it should.";

const CONFIG: &str = "\
# lever demo: the bundled example instance.
name: demo
backend: qemu
tree: workspace
manager:
  image: scionlocal/lever-claude:latest
groves:
  - name: scratch
    dir: scratch
    obtain: [{tool: db, op: read}]
broker:
  api_key_file: secrets/anthropic-key
  upstream: http://{UPSTREAM}
  jail_port: {JAIL}
  admin_port: {ADMIN}
  tools:
    - name: db
      command: [lever-tool-db, --database, data.db, --tables, 'users,orders']
      backend: 127.0.0.1:{TOOL}
      operations: [{name: read, args: [table, filter]}]
      allowed_values: {table: [users, orders]}
";

const DEMO_KEY: &str = "sk-ant-demo-placeholder-key-never-leaves-the-host";

struct Step(usize);

impl Step {
    fn say(&mut self, what: &str) {
        self.0 += 1;
        println!("\n[{}] {what}", self.0);
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn write_file(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

pub(crate) fn run(keep: bool) -> ExitCode {
    let dir = std::env::temp_dir().join(format!("lever-demo-{}", std::process::id()));
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(demo(&dir));
    if keep {
        println!("\nkept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    rt.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => {
            println!("\ndemo complete: every step behaved as it should.");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("demo: {e}")),
    }
}

async fn demo(dir: &Path) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let mut step = Step(0);
    std::fs::create_dir_all(dir.join("workspace/scratch")).map_err(|x| e(&x))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|x| e(&x))?;

    step.say("a mock Anthropic upstream that accepts only the host's key");
    let mock = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|x| e(&x))?;
    let mock_addr = mock.local_addr().map_err(|x| e(&x))?;
    tokio::spawn(lever_broker::mock_upstream::serve(
        mock,
        Some(DEMO_KEY.to_owned()),
    ));
    println!("    upstream  http://{mock_addr} (the real API in production)");
    write_file(&dir.join("secrets/anthropic-key"), DEMO_KEY, 0o600).map_err(|x| e(&x))?;
    println!("    key file  secrets/anthropic-key (0600, host-side only)");

    step.say("a first-party tool: lever-tool-db over a demo SQLite database");
    let tool_bin = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join("lever-tool-db")))
        .filter(|p| p.is_file())
        .ok_or(
            "lever-tool-db is not installed beside lever (`cargo build --release` builds both)",
        )?;
    let made = std::process::Command::new(&tool_bin)
        .args(["--init-demo", "--database"])
        .arg(dir.join("data.db"))
        .output()
        .map_err(|x| e(&x))?;
    if !made.status.success() {
        return Err(format!(
            "lever-tool-db --init-demo: {}",
            String::from_utf8_lossy(&made.stderr).trim()
        ));
    }
    println!("    data.db   tables users, orders (allow-listed) and secrets (not)");

    step.say("the broker, on a fresh state dir, supervising the tool");
    let (jail, admin, tool) = (
        free_port().map_err(|x| e(&x))?,
        free_port().map_err(|x| e(&x))?,
        free_port().map_err(|x| e(&x))?,
    );
    let text = CONFIG
        .replace("{UPSTREAM}", &mock_addr.to_string())
        .replace("{JAIL}", &jail.to_string())
        .replace("{ADMIN}", &admin.to_string())
        .replace("{TOOL}", &tool.to_string());
    write_file(&dir.join("lever.yaml"), &text, 0o644).map_err(|x| e(&x))?;
    let loaded =
        config::load(&dir.join("lever.yaml"), &Env::from_process()).map_err(|r| r.to_string())?;
    let broker =
        tokio::task::block_in_place(|| lever_broker::open(loaded.config)).map_err(|x| e(&x))?;
    tokio::spawn(lever_broker::run(broker.clone()));
    let admin_t = Target {
        https: false,
        host: "127.0.0.1".into(),
        port: admin,
    };
    let jail_t = Target {
        https: true,
        host: "localhost".into(),
        port: jail,
    };
    wait_healthy(&admin_t).await?;

    step.say("the operator issues a one-time enrolment ticket for grove `scratch`");
    let r = client::send(
        &admin_t,
        None,
        Method::POST,
        "/register",
        &[],
        Some(&json!({"identity": "scratch"})),
    )
    .await
    .map_err(|x| e(&x))?;
    let reg = r.json();
    let (ticket, ca) = (str_of(&reg, "ticket")?, str_of(&reg, "ca")?);
    println!(
        "    ticket    {}… (expires {})",
        &ticket[..13],
        reg["expires_at"].as_str().unwrap_or("?")
    );

    step.say("the agent enrols: its key is generated locally, only a CSR leaves");
    let (key_pem, csr) = client::key_and_csr("scratch").map_err(|x| e(&x))?;
    let anon = ClientTls::new(&ca, None).map_err(|x| e(&x))?;
    let r = client::send(
        &jail_t,
        Some(&anon),
        Method::POST,
        "/v1/enrol",
        &[],
        Some(&json!({"ticket": ticket, "csr": csr})),
    )
    .await
    .map_err(|x| e(&x))?;
    let enrolled = r.json();
    let cert = str_of(&enrolled, "certificate")?;
    println!(
        "    identity  {} (certificate until {})",
        enrolled["identity"],
        enrolled["expires_at"].as_str().unwrap_or("?")
    );
    let again = client::send(
        &jail_t,
        Some(&anon),
        Method::POST,
        "/v1/enrol",
        &[],
        Some(&json!({"ticket": ticket, "csr": csr})),
    )
    .await
    .map_err(|x| e(&x))?;
    println!(
        "    replaying the ticket: {} ({})",
        again.status,
        again.error_message()
    );
    if again.status != 403 {
        return Err("a replayed ticket was accepted".into());
    }
    let agent_dir = dir.join("agent");
    for (name, text, mode) in [
        ("ca.pem", ca.as_str(), 0o644),
        ("cert.pem", cert.as_str(), 0o600),
        ("key.pem", key_pem.as_str(), 0o600),
        (
            "broker",
            &format!("https://localhost:{jail}") as &str,
            0o644,
        ),
    ] {
        write_file(&agent_dir.join(name), text, mode).map_err(|x| e(&x))?;
    }

    step.say("the agent obtains a capability token for llm/generate (over mTLS)");
    let tls = ClientTls::new(&ca, Some((&cert, &key_pem))).map_err(|x| e(&x))?;
    let r = client::send(
        &jail_t,
        Some(&tls),
        Method::POST,
        "/v1/capabilities",
        &[],
        Some(&json!({"grants": [{"tool": "llm", "op": "generate"}]})),
    )
    .await
    .map_err(|x| e(&x))?;
    let minted = r.json();
    let token = str_of(&minted, "token")?;
    println!(
        "    token     {}… ({} bytes; id {}…; epoch {}; expires {})",
        &token[..16],
        token.len(),
        &minted["token_id"].as_str().unwrap_or("")[..16],
        minted["epoch"],
        minted["expires_at"].as_str().unwrap_or("?")
    );

    step.say("the in-jail gateway: plain HTTP on loopback, mTLS to the broker");
    let gw = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|x| e(&x))?;
    let gw_addr = gw.local_addr().map_err(|x| e(&x))?;
    let gateway = Arc::new(lever_broker::gateway::Gateway {
        broker: jail_t.clone(),
        dir: agent_dir.clone(),
    });
    tokio::spawn(lever_broker::gateway::serve(gw, gateway));
    println!("    ANTHROPIC_BASE_URL=http://{gw_addr}/llm  ANTHROPIC_AUTH_TOKEN=<the token>");

    step.say("a streamed message: agent -> gateway -> broker (injects the key) -> upstream");
    let body = json!({"model": "claude-mock-1", "max_tokens": 64, "stream": true,
        "messages": [{"role": "user", "content": "Say hello. mock:events=6 gap_ms=120"}]});
    let (status, text, saw_key) = stream_message(gw_addr, &token, &body).await?;
    if status != 200 || text.is_empty() {
        return Err(format!("the streamed call failed ({status})"));
    }
    if saw_key {
        return Err("the client saw the real key".into());
    }
    let mock_t = Target {
        https: false,
        host: "127.0.0.1".into(),
        port: mock_addr.port(),
    };
    let seen = client::send(&mock_t, None, Method::GET, "/_mock/requests", &[], None)
        .await
        .map_err(|x| e(&x))?
        .json();
    let last = &seen[seen.as_array().map_or(0, Vec::len).saturating_sub(1)];
    if last["headers"]["x-api-key"] != DEMO_KEY || last.to_string().contains(&token[..32]) {
        return Err(format!("the upstream saw the wrong credentials: {last}"));
    }
    println!(
        "    checked: the client never saw the key; the upstream saw the key and never the token"
    );

    step.say("a denied call: a token that is not the one the broker minted");
    let mut forged = token.clone().into_bytes();
    let mid = forged.len() / 2;
    forged[mid] = if forged[mid] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).map_err(|x| e(&x))?;
    let (status, text, _) = stream_message(gw_addr, &forged, &body).await?;
    println!("    {status} {}", text.trim());
    if status != 401 {
        return Err("a forged token was accepted".into());
    }

    step.say("the agent obtains a db/read capability pinned to table `users`");
    let r = client::send(
        &jail_t,
        Some(&tls),
        Method::POST,
        "/v1/capabilities",
        &[],
        Some(&json!({"grants": [{"tool": "db", "op": "read", "constraints": {"table": "users"}}]})),
    )
    .await
    .map_err(|x| e(&x))?;
    let db_token = str_of(&r.json(), "token")?;
    println!("    token     {}… (db/read, table=users)", &db_token[..16]);

    step.say("MCP through the gateway: initialize, tools/list, tools/call db_read {table: users}");
    let gw_t = Target {
        https: false,
        host: "127.0.0.1".into(),
        port: gw_addr.port(),
    };
    let mcp = Mcp::open(&gw_t, &db_token).await?;
    println!(
        "    session   {}…  tools {}",
        &mcp.session[..8],
        mcp.tools.join(", ")
    );
    let v = mcp
        .call_when_ready("db_read", json!({"table": "users", "filter": "a"}))
        .await?;
    let rows = v["result"]["structuredContent"]["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if rows.is_empty() {
        return Err(format!("the allowed tool call failed: {v}"));
    }
    for row in &rows {
        println!("    row       {row}");
    }

    step.say("a denied tool call: the same token asks for table `orders`");
    let v = mcp.call("db_read", json!({"table": "orders"})).await?;
    println!(
        "    JSON-RPC error {}: {}",
        v["error"]["code"],
        v["error"]["message"].as_str().unwrap_or("")
    );
    if v["error"]["code"] != -32001 {
        return Err(format!(
            "a call outside the pinned table was not denied: {v}"
        ));
    }

    step.say("the audit trail (hash-chained; `lever audit verify` checks it)");
    broker.audit.flush().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let audit = broker.config.broker.telemetry.audit_file.clone();
    print_audit(&audit)?;
    match lever_broker::audit::verify_file(&audit).map_err(|x| e(&x))? {
        lever_broker::audit::Verdict::Intact { records, tip } => {
            println!("    chain intact: {records} records, tip {}…", &tip[..16]);
        }
        lever_broker::audit::Verdict::Broken { line, why } => {
            return Err(format!("audit chain broken at {line}: {why}"));
        }
    }
    Ok(())
}

/// A minimal MCP client over the gateway (the tests use the official SDK).
struct Mcp {
    target: Target,
    auth: String,
    session: String,
    tools: Vec<String>,
}

impl Mcp {
    async fn post(&self, session: bool, msg: Value) -> Result<client::Reply, String> {
        let mut h = vec![("authorization", self.auth.as_str())];
        if session {
            h.push(("mcp-session-id", self.session.as_str()));
        }
        client::send(&self.target, None, Method::POST, "/mcp", &h, Some(&msg))
            .await
            .map_err(|x| x.to_string())
    }

    async fn open(target: &Target, token: &str) -> Result<Mcp, String> {
        let mut m = Mcp {
            target: target.clone(),
            auth: format!("Bearer {token}"),
            session: String::new(),
            tools: Vec::new(),
        };
        let r = m
            .post(
                false,
                json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": "2025-11-25", "capabilities": {},
                    "clientInfo": {"name": "lever-demo", "version": env!("CARGO_PKG_VERSION")}}}),
            )
            .await?;
        m.session = r
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| format!("initialize failed: {}", String::from_utf8_lossy(&r.body)))?
            .to_owned();
        m.post(
            true,
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        )
        .await?;
        let list = m
            .post(
                true,
                json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
            )
            .await?
            .json();
        m.tools = list["result"]["tools"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|t| t["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(m)
    }

    async fn call(&self, name: &str, arguments: Value) -> Result<Value, String> {
        Ok(self
            .post(
                true,
                json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                       "params": {"name": name, "arguments": arguments}}),
            )
            .await?
            .json())
    }

    /// Calls, waiting (up to 15 s) while the tool backend is still starting.
    async fn call_when_ready(&self, name: &str, arguments: Value) -> Result<Value, String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = self.call(name, arguments.clone()).await?;
            if v["error"]["data"]["reason"] != "backend_unavailable" || Instant::now() > deadline {
                return Ok(v);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn str_of(v: &Value, k: &str) -> Result<String, String> {
    v[k].as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no `{k}` in {v}"))
}

async fn wait_healthy(t: &Target) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(r) = client::send(t, None, Method::GET, "/healthz", &[], None).await
            && r.status == 200
        {
            println!("    jail port mTLS + admin port loopback are up");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("the broker did not come up".into())
}

/// Sends a streaming request to the gateway and prints text deltas as they
/// arrive. Returns (status, the text or the error body, whether the demo
/// key appeared anywhere in what came back).
async fn stream_message(
    gw: std::net::SocketAddr,
    token: &str,
    body: &Value,
) -> Result<(u16, String, bool), String> {
    let body = body.to_string();
    let mut tcp = tokio::net::TcpStream::connect(gw)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let req = format!(
        "POST /llm/v1/messages HTTP/1.1\r\nHost: {gw}\r\nAuthorization: Bearer {token}\r\nanthropic-version: 2023-06-01\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 8192];
    let mut printed = 0usize;
    let mut text = String::new();
    let started = Instant::now();
    let mut stdout = std::io::stdout();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut buf))
            .await
            .map_err(|_| "the stream stalled".to_owned())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        let all = String::from_utf8_lossy(&raw).into_owned();
        let deltas: Vec<String> = all
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| v["delta"]["text"].as_str().map(str::to_owned))
            .collect();
        for d in deltas.iter().skip(printed) {
            let _ = writeln!(stdout, "    +{:>4} ms  {d}", started.elapsed().as_millis());
            let _ = stdout.flush();
            text.push_str(d);
        }
        printed = deltas.len();
    }
    let all = String::from_utf8_lossy(&raw).into_owned();
    let status = all
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let saw_key = all.contains(DEMO_KEY);
    if text.is_empty() {
        text = all
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or("")
            .lines()
            .filter(|l| l.starts_with('{'))
            .collect();
    }
    Ok((status, text, saw_key))
}

fn print_audit(path: &PathBuf) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let d = &v["detail"];
        let extra = match v["event"].as_str() {
            Some("llm") if v["decision"] == "allow" => format!(
                "model {} status {} in {} out {} ttfb {:.1} ms",
                d["model"],
                d["status"],
                d["input_tokens"],
                d["output_tokens"],
                d["ttfb_ms"].as_f64().unwrap_or(0.0)
            ),
            Some("tool") => format!(
                "{}/{} {} {}",
                v["tool"].as_str().unwrap_or(""),
                v["op"].as_str().unwrap_or(""),
                v["constraints"],
                d["outcome"].as_str().unwrap_or("")
            ),
            Some("mint") => format!(
                "token {}…",
                &v["token_id"].as_str().unwrap_or("")
                    [..12.min(v["token_id"].as_str().unwrap_or("").len())]
            ),
            _ => d["message"].as_str().map(str::to_owned).unwrap_or_default(),
        };
        println!(
            "    #{:<3} {:<14} {:<9} {:<6} {:<22} {}",
            v["seq"],
            v["event"].as_str().unwrap_or(""),
            v["identity"].as_str().unwrap_or("-"),
            v["decision"].as_str().unwrap_or("-"),
            v["reason"].as_str().unwrap_or(""),
            extra
        );
    }
    Ok(())
}

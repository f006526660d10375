//! A real `lever broker` process on loopback ports, and real clients for
//! it: the admin API over HTTP, the jail API over TLS 1.3 with a client
//! certificate obtained by enrolling with a ticket.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use lever_broker::client::{self, ClientTls, Reply, Target};
use serde_json::{Value, json};

use crate::{TempDir, lever_bin};

/// Two free loopback ports (bound, read, released).
pub fn free_ports() -> (u16, u16) {
    (free_port(), free_port())
}

/// One free loopback port (bound, read, released), never one handed out
/// before in this process: tests run in parallel threads, and a port one
/// test has released but not yet given to its broker must not go to
/// another test.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no fresh loopback port after 1000 tries");
}

/// An instance directory with a config, a key file and the tree.
#[derive(Debug)]
pub struct Instance {
    pub dir: TempDir,
    pub jail_port: u16,
    pub admin_port: u16,
}

/// The config used unless a test gives its own `broker:`-less body: a
/// manager that may delegate db/read to g1, groves g1 and g2, and (from
/// [`Instance::new`]) the real `lever-tool-db` over a demo database, its
/// tables pinned to users/orders.
pub const DEFAULT_AGENTS: &str = "\
manager:
  image: img/x:1
  obtain: [{tool: db, op: read}]
  delegate:
    - {tool: db, op: read, to: [g1]}
    - {tool: llm, op: generate, to: [g1, g2]}
groves:
  - name: g1
    dir: g1
    obtain: [{tool: db, op: read}]
    delegate: [{tool: db, op: read, to: [g2]}]
  - name: g2
    dir: g2
";

impl Instance {
    /// `agents` is the manager/groves part of the YAML; `broker_extra` is
    /// added under `broker:` (indented two spaces).
    pub fn new(agents: &str, broker_extra: &str) -> Instance {
        let dir = TempDir::new("broker");
        let (jail_port, admin_port) = free_ports();
        dir.write("key", "sk-ant-test-real-key", 0o600);
        dir.mkdir("ws");
        let made = crate::run(
            Command::new(crate::tool_db_bin())
                .args(["--init-demo", "--database"])
                .arg(dir.join("data.db")),
        );
        assert_eq!(made.code, 0, "{}", made.stderr);
        let tool_port = free_port();
        let yaml = format!(
            "name: t\nbackend: qemu\ntree: ws\n{agents}broker:\n  api_key_file: key\n  jail_port: {jail_port}\n  admin_port: {admin_port}\n  tools:\n    - name: db\n      command: [lever-tool-db, --database, data.db, --tables, 'users,orders']\n      backend: 127.0.0.1:{tool_port}\n      operations: [{{name: read, args: [table, filter]}}]\n      allowed_values: {{table: [users, orders]}}\n{broker_extra}"
        );
        dir.write("lever.yaml", yaml, 0o644);
        Instance {
            dir,
            jail_port,
            admin_port,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(".lever")
    }

    pub fn audit_file(&self) -> PathBuf {
        self.state_dir().join("audit.jsonl")
    }

    /// The audit records written so far. For polling while the broker
    /// runs: a line still being written (or none yet) is left out.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Starts `lever broker` and waits for its ready line.
    pub fn start(&self) -> Broker {
        self.start_env(&[])
    }

    /// [`Instance::start`] with extra environment variables.
    pub fn start_env(&self, env: &[(&str, &str)]) -> Broker {
        let (child, _, log) = spawn_ready_env(
            &["broker", "-c", "lever.yaml"],
            self.dir.path(),
            "lever broker ready",
            env,
        );
        Broker {
            child: Some(child),
            log,
            admin: Target {
                https: false,
                host: "127.0.0.1".into(),
                port: self.admin_port,
            },
            jail: Target {
                https: true,
                host: "127.0.0.1".into(),
                port: self.jail_port,
            },
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// Runs `lever broker` expecting it to fail; returns its stderr.
    pub fn start_fails(&self) -> String {
        let out = crate::run(
            Command::new(lever_bin())
                .args(["broker", "-c", "lever.yaml"])
                .current_dir(self.dir.path())
                .env("HOME", self.dir.path()),
        );
        assert_ne!(out.code, 0, "the broker started: {}", out.stdout);
        out.stderr
    }
}

/// A running broker process (killed with SIGKILL on drop).
#[derive(Debug)]
pub struct Broker {
    child: Option<Child>,
    /// The broker's stderr (its tool backends write there too).
    pub log: Log,
    pub admin: Target,
    pub jail: Target,
    pub rt: tokio::runtime::Runtime,
}

/// An enrolled agent: its identity, key and certificate.
#[derive(Debug, Clone)]
pub struct Agent {
    pub identity: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl Agent {
    pub fn tls(&self) -> ClientTls {
        ClientTls::new(&self.ca_pem, Some((&self.cert_pem, &self.key_pem))).unwrap()
    }
}

impl Broker {
    /// The broker's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the broker and its tool backends wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.log.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// `kill -9`, no warning.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        self.rt
            .block_on(client::send(
                &self.admin,
                None,
                method,
                path,
                &[],
                body.as_ref(),
            ))
            .unwrap()
    }

    pub fn admin_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        self.rt
            .block_on(client::send(
                &self.admin,
                None,
                method,
                path,
                headers,
                body.as_ref(),
            ))
            .unwrap()
    }

    /// A request to the jail port, as `agent` (or with no client certificate).
    pub fn jail(
        &self,
        tls: &ClientTls,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        self.rt
            .block_on(client::send(
                &self.jail,
                Some(tls),
                method,
                path,
                headers,
                body.as_ref(),
            ))
            .unwrap()
    }

    /// Like [`Broker::jail`] but returns the client error (e.g. TLS refused).
    pub fn try_jail(
        &self,
        tls: &ClientTls,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Reply, client::ClientError> {
        self.rt.block_on(client::send(
            &self.jail,
            Some(tls),
            method,
            path,
            &[],
            body.as_ref(),
        ))
    }

    /// `POST /register` -> (ticket, CA PEM).
    pub fn register(&self, identity: &str) -> (String, String) {
        let r = self.admin(
            Method::POST,
            "/register",
            Some(json!({"identity": identity})),
        );
        assert_eq!(r.status, 200, "register {identity}: {}", r.error_message());
        let v = r.json();
        (
            v["ticket"].as_str().unwrap().to_owned(),
            v["ca"].as_str().unwrap().to_owned(),
        )
    }

    /// Redeems `ticket` with a fresh key; returns the raw reply and the key.
    pub fn redeem(&self, ticket: &str, ca_pem: &str) -> (Reply, String) {
        let (key, csr) = client::key_and_csr("whoever").unwrap();
        let tls = ClientTls::new(ca_pem, None).unwrap();
        let r = self.jail(
            &tls,
            Method::POST,
            "/v1/enrol",
            &[],
            Some(json!({"ticket": ticket, "csr": csr})),
        );
        (r, key)
    }

    /// Registers and enrols `identity`.
    pub fn enrol(&self, identity: &str) -> Agent {
        let (ticket, ca) = self.register(identity);
        let (r, key) = self.redeem(&ticket, &ca);
        assert_eq!(r.status, 200, "enrol {identity}: {}", r.error_message());
        let v = r.json();
        assert_eq!(v["identity"], identity);
        Agent {
            identity: identity.to_owned(),
            cert_pem: v["certificate"].as_str().unwrap().to_owned(),
            key_pem: key,
            ca_pem: ca,
        }
    }

    /// `POST /v1/capabilities` for `grants`.
    pub fn obtain(&self, agent: &Agent, grants: Value) -> Reply {
        self.jail(
            &agent.tls(),
            Method::POST,
            "/v1/capabilities",
            &[],
            Some(json!({"grants": grants})),
        )
    }

    /// `POST /v1/provision` as `agent`, for the grove `grove`.
    pub fn provision(&self, agent: &Agent, grove: &str) -> Reply {
        self.jail(
            &agent.tls(),
            Method::POST,
            "/v1/provision",
            &[],
            Some(json!({"agent": grove})),
        )
    }

    /// `POST /v1/renew` as `agent`, with a fresh key whose CSR names
    /// `cn`; the key and the answer.
    pub fn renew(&self, agent: &Agent, cn: &str) -> (String, Reply) {
        let (key, csr) = client::key_and_csr(cn).unwrap();
        let r = self.jail(
            &agent.tls(),
            Method::POST,
            "/v1/renew",
            &[],
            Some(json!({"csr": csr})),
        );
        (key, r)
    }

    /// A token for `grants`, asserting success.
    pub fn token(&self, agent: &Agent, grants: Value) -> (String, String) {
        let r = self.obtain(agent, grants);
        assert_eq!(r.status, 200, "{}", r.error_message());
        let v = r.json();
        (
            v["token"].as_str().unwrap().to_owned(),
            v["token_id"].as_str().unwrap().to_owned(),
        )
    }

    /// `POST /v1/capabilities/delegate` with `token` as bearer.
    pub fn delegate(&self, agent: &Agent, token: &str, to: &str, grants: Value) -> Reply {
        let auth = format!("Bearer {token}");
        self.jail(
            &agent.tls(),
            Method::POST,
            "/v1/capabilities/delegate",
            &[("authorization", &auth)],
            Some(json!({"to": to, "grants": grants})),
        )
    }

    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(r) = self.rt.block_on(client::send(
                &self.admin,
                None,
                Method::GET,
                "/healthz",
                &[],
                None,
            )) && r.status == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the admin port never became healthy");
    }
}

impl Drop for Broker {
    /// SIGTERM, so the broker stops its tool backends; SIGKILL if it has
    /// not exited within 5 s.
    fn drop(&mut self) {
        if let Some(c) = &mut self.child
            && let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill();
    }
}

/// Sends SIGTERM to `pid` (a broker, which then stops as it would on a
/// service manager's stop).
pub fn sigterm(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
}

/// The error code of a broker error reply.
pub fn code(r: &Reply) -> String {
    r.json()["error"]["code"].as_str().unwrap_or("").to_owned()
}

/// A raw mTLS connection to the broker's jail port, as `tls`, for
/// requests written byte by byte (half a body, a head that never ends).
pub async fn connect_jail(
    tls: &ClientTls,
    port: u16,
) -> impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + use<> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tls.connector().connect(name, tcp).await.unwrap()
}

/// Reads a file of the state dir.
pub fn state_file(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

/// Spawns `lever ARGS` and waits for the line starting with `ready`;
/// returns the process and that line.
pub fn spawn_ready(args: &[&str], cwd: &Path, ready: &str) -> (Child, String) {
    let (child, line, _) = spawn_ready_logged(args, cwd, ready);
    (child, line)
}

/// What a process wrote to stderr so far (the first 64 KiB).
pub type Log = std::sync::Arc<std::sync::Mutex<String>>;

/// [`spawn_ready`], also returning the process's stderr as it comes.
pub fn spawn_ready_logged(args: &[&str], cwd: &Path, ready: &str) -> (Child, String, Log) {
    spawn_ready_env(args, cwd, ready, &[])
}

/// [`spawn_ready_logged`] with extra environment variables.
pub fn spawn_ready_env(
    args: &[&str],
    cwd: &Path,
    ready: &str,
    env: &[(&str, &str)],
) -> (Child, String, Log) {
    let mut child = Command::new(lever_bin())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .env("HOME", cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Drained all along, so a chatty process never blocks on a full pipe.
    let stderr = child.stderr.take().unwrap();
    let errors = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = errors.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut s) = sink.lock()
                && s.len() < 64 * 1024
            {
                s.push_str(&line);
                s.push('\n');
            }
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = ready.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with(&ready) {
                let _ = tx.send(line);
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => (child, line, errors),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
            panic!(
                "{args:?} did not become ready:\n{}",
                errors.lock().map(|s| s.clone()).unwrap_or_default()
            );
        }
    }
}

/// A process killed on drop.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The mock upstream as its own process: (process, base URL).
pub fn start_mock(dir: &Path, expect_key_file: &str) -> (Proc, String) {
    let (child, line) = spawn_ready(
        &[
            "mock-upstream",
            "--listen",
            "127.0.0.1:0",
            "--expect-key-file",
            expect_key_file,
        ],
        dir,
        "lever mock-upstream ready",
    );
    let url = line.rsplit(' ').next().unwrap().to_owned();
    (Proc(child), url)
}

/// What the mock upstream saw.
pub fn mock_requests(rt: &tokio::runtime::Runtime, url: &str) -> Vec<Value> {
    let t = Target::parse(url).unwrap();
    let r = rt
        .block_on(client::send(
            &t,
            None,
            Method::GET,
            "/_mock/requests",
            &[],
            None,
        ))
        .unwrap();
    r.json().as_array().cloned().unwrap_or_default()
}

/// Writes an agent directory for `lever agent` (as `enrol` would) and runs
/// the gateway on it: (process, base URL).
pub fn start_gateway(dir: &Path, agent: &Agent, jail_port: u16) -> (Proc, String) {
    let ad = dir.join(format!("agent-{}", agent.identity));
    std::fs::create_dir_all(&ad).unwrap();
    for (name, text) in [
        ("ca.pem", agent.ca_pem.clone()),
        ("cert.pem", agent.cert_pem.clone()),
        ("key.pem", agent.key_pem.clone()),
        ("broker", format!("https://localhost:{jail_port}")),
    ] {
        std::fs::write(ad.join(name), text).unwrap();
    }
    let ad_s = ad.to_str().unwrap().to_owned();
    let (child, line) = spawn_ready(
        &[
            "agent",
            "--dir",
            &ad_s,
            "gateway",
            "--listen",
            "127.0.0.1:0",
        ],
        dir,
        "lever gateway ready",
    );
    let url = line.split_whitespace().nth(3).unwrap().to_owned();
    (Proc(child), url)
}

/// Raw MCP over mTLS straight to the broker's `/mcp`, as `agent` holding
/// `token`.
#[derive(Debug)]
pub struct RawMcp<'a> {
    b: &'a Broker,
    agent: &'a Agent,
    token: String,
}

impl RawMcp<'_> {
    pub fn new<'a>(b: &'a Broker, agent: &'a Agent, token: &str) -> RawMcp<'a> {
        RawMcp {
            b,
            agent,
            token: token.to_owned(),
        }
    }

    /// A session, opened once `name` answers (its backend is up).
    pub fn ready_session(&self, name: &str, args: Value) -> String {
        let (sid, _) = self.initialize("2025-11-25");
        self.wait_ready(&sid, name, args);
        sid
    }

    pub fn post(&self, session: Option<&str>, msg: Value) -> Reply {
        let auth = format!("Bearer {}", self.token);
        let mut h = vec![("authorization", auth.as_str())];
        if let Some(s) = session {
            h.push(("mcp-session-id", s));
        }
        self.b
            .jail(&self.agent.tls(), Method::POST, "/mcp", &h, Some(msg))
    }

    /// Any method, headers and body to `/mcp` (no token added).
    pub fn send(&self, method: Method, headers: &[(&str, &str)], body: bytes::Bytes) -> Reply {
        self.b
            .rt
            .block_on(client::send_bytes(
                &self.b.jail,
                Some(&self.agent.tls()),
                method,
                "/mcp",
                headers,
                body,
            ))
            .unwrap()
    }

    /// `initialize` at protocol `version`: the session id and the answer.
    pub fn initialize(&self, version: &str) -> (String, Value) {
        let r = self.post(
            None,
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": version, "capabilities": {},
                "clientInfo": {"name": "raw", "version": "0"}}}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let sid = r.headers["mcp-session-id"].to_str().unwrap().to_owned();
        (sid, r.json())
    }

    /// `tools/call` of `name` with `args` in session `sid`: the JSON-RPC
    /// answer.
    pub fn call(&self, sid: &str, name: &str, args: Value) -> Value {
        let r = self.post(
            Some(sid),
            json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                   "params": {"name": name, "arguments": args}}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    /// Calls `name` until its backend is up (20 s at most): the first
    /// answer that is not `backend_unavailable`.
    pub fn wait_ready(&self, sid: &str, name: &str, args: Value) -> Value {
        self.wait_ready_counting(sid, name, args).0
    }

    /// [`RawMcp::wait_ready`], also counting the `backend_unavailable`
    /// refusals seen on the way.
    pub fn wait_ready_counting(&self, sid: &str, name: &str, args: Value) -> (Value, u32) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut refused = 0;
        loop {
            let v = self.call(sid, name, args.clone());
            if v["error"]["data"]["reason"] != "backend_unavailable" {
                return (v, refused);
            }
            refused += 1;
            assert!(Instant::now() < deadline, "the backend never came up: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

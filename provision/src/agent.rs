//! `lever agent`: the in-jail client side. Enrol with a ticket (the key is
//! generated here and never leaves), renew the certificate, obtain
//! capability tokens.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use http::Method;
use lever_broker::client::{self, ClientTls, Target};
use serde_json::json;

use crate::common::{fail, read_value_or_stdin, runtime, write_private};

#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// Enrol with a one-time ticket: generate a key, send a CSR, store the
    /// certificate (key and certificate 0600 in --dir)
    Enrol {
        /// The broker's jail URL, e.g. https://host.orb.internal:8443
        #[arg(long, value_parser = https_url)]
        broker: String,
        /// The ticket (`-` reads it from stdin; or set $LEVER_TICKET)
        #[arg(long, env = "LEVER_TICKET", hide_env_values = true)]
        ticket: String,
        /// The broker CA certificate (PEM) to pin, as returned with the ticket
        #[arg(long, value_name = "FILE")]
        ca: PathBuf,
    },
    /// Renew the client certificate (new key, same identity)
    Renew,
    /// Run the loopback gateway: plain HTTP for local clients, mTLS to the
    /// broker (point ANTHROPIC_BASE_URL at http://127.0.0.1:8462/llm)
    Gateway {
        /// Where to listen (loopback only)
        #[arg(long, default_value = "127.0.0.1:8462", value_parser = loopback_listen)]
        listen: std::net::SocketAddr,
    },
    /// Obtain a capability token and print it (usable as Claude Code's apiKeyHelper)
    Token {
        /// A grant: TOOL/OP, or TOOL/OP:KEY=VALUE,KEY=VALUE (repeatable;
        /// default llm/generate)
        #[arg(long = "grant", value_name = "TOOL/OP[:K=V,...]", value_parser = grant_arg)]
        grants: Vec<String>,
        /// Print the whole JSON answer (token, token_id, epoch, expires_at)
        #[arg(long)]
        json: bool,
    },
}

pub(crate) const AFTER_HELP: &str = "\
The agent's files live in --dir (default $LEVER_AGENT_DIR, else ~/.lever/agent):
key.pem and cert.pem (0600), ca.pem (the pinned broker CA) and broker (the
URL). Enrol once with the ticket the operator gives you (`lever admin
register NAME` on the host); then `lever agent token` prints a fresh token
each time it runs, so Claude Code can use it as apiKeyHelper.";

fn agent_dir(dir: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    if let Some(d) = dir.or_else(|| std::env::var_os("LEVER_AGENT_DIR").map(PathBuf::from)) {
        return Ok(d);
    }
    match std::env::var_os("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".lever/agent")),
        None => Err(fail("no --dir, $LEVER_AGENT_DIR or $HOME")),
    }
}

fn read(dir: &Path, name: &str) -> Result<String, ExitCode> {
    std::fs::read_to_string(dir.join(name)).map_err(|e| {
        fail(&format!(
            "{}: {e} (enrol first: lever agent enrol --broker URL --ticket T --ca CA.pem)",
            dir.join(name).display()
        ))
    })
}

pub(crate) fn run(cmd: AgentCommand, dir: Option<PathBuf>) -> ExitCode {
    let dir = match agent_dir(dir) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match cmd {
        AgentCommand::Enrol { broker, ticket, ca } => {
            let ticket = match read_value_or_stdin(&ticket) {
                Ok(t) => t,
                Err(e) => return fail(&format!("reading the ticket: {e}")),
            };
            let ca_pem = match std::fs::read_to_string(&ca) {
                Ok(s) => s,
                Err(e) => return fail(&format!("{}: {e}", ca.display())),
            };
            rt.block_on(enrol(&dir, &broker, &ticket, &ca_pem))
        }
        AgentCommand::Renew => rt.block_on(renew(&dir)),
        AgentCommand::Gateway { listen } => rt.block_on(gateway(&dir, listen)),
        AgentCommand::Token { grants, json } => rt.block_on(token(&dir, &grants, json)),
    }
}

async fn enrol(dir: &Path, broker: &str, ticket: &str, ca_pem: &str) -> ExitCode {
    let target = match Target::parse(broker) {
        Ok(t) if t.https => t,
        Ok(_) => return fail("the broker's jail URL must be https://"),
        Err(e) => return fail(&e.to_string()),
    };
    if let Err(e) = std::fs::create_dir_all(dir).and_then(|()| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }) {
        return fail(&format!("{}: {e}", dir.display()));
    }
    let (key_pem, csr_pem) = match client::key_and_csr("lever-agent") {
        Ok(v) => v,
        Err(e) => return fail(&e.to_string()),
    };
    let tls = match ClientTls::new(ca_pem, None) {
        Ok(t) => t,
        Err(e) => return fail(&e.to_string()),
    };
    let body = json!({"ticket": ticket, "csr": csr_pem});
    let reply = match client::send(
        &target,
        Some(&tls),
        Method::POST,
        "/v1/enrol",
        &[],
        Some(&body),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return fail(&e.to_string()),
    };
    if !reply.status.is_success() {
        return fail(&format!(
            "enrolment refused ({}): {}",
            reply.status,
            reply.error_message()
        ));
    }
    let v = reply.json();
    let (Some(cert), Some(identity)) = (v["certificate"].as_str(), v["identity"].as_str()) else {
        return fail("the broker's answer has no certificate");
    };
    for (name, bytes, mode) in [
        ("key.pem", key_pem.as_bytes(), 0o600),
        ("cert.pem", cert.as_bytes(), 0o600),
        ("ca.pem", ca_pem.as_bytes(), 0o644),
        ("broker", broker.as_bytes(), 0o644),
    ] {
        if let Err(e) = write_private(&dir.join(name), bytes, mode) {
            return fail(&format!("{}: {e}", dir.join(name).display()));
        }
    }
    eprintln!(
        "enrolled as `{identity}`; certificate valid until {} (in {})",
        v["expires_at"].as_str().unwrap_or("?"),
        dir.display()
    );
    ExitCode::SUCCESS
}

struct Enrolled {
    target: Target,
    tls: ClientTls,
}

fn enrolled(dir: &Path) -> Result<Enrolled, ExitCode> {
    let broker = read(dir, "broker")?;
    let (ca, cert, key) = (
        read(dir, "ca.pem")?,
        read(dir, "cert.pem")?,
        read(dir, "key.pem")?,
    );
    let target = Target::parse(broker.trim()).map_err(|e| fail(&e.to_string()))?;
    let tls = ClientTls::new(&ca, Some((&cert, &key))).map_err(|e| fail(&e.to_string()))?;
    Ok(Enrolled { target, tls })
}

async fn renew(dir: &Path) -> ExitCode {
    let e = match enrolled(dir) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let (key_pem, csr_pem) = match client::key_and_csr("lever-agent") {
        Ok(v) => v,
        Err(e) => return fail(&e.to_string()),
    };
    let body = json!({"csr": csr_pem});
    match client::send(
        &e.target,
        Some(&e.tls),
        Method::POST,
        "/v1/renew",
        &[],
        Some(&body),
    )
    .await
    {
        Ok(r) if r.status.is_success() => {
            let v = r.json();
            let Some(cert) = v["certificate"].as_str() else {
                return fail("the broker's answer has no certificate");
            };
            // Key first, then the certificate: a crash in between leaves a
            // mismatched pair that the next renew (with the old cert) cannot
            // fix, so write both to temporaries before renaming either.
            if let Err(e) = write_private(&dir.join("key.pem"), key_pem.as_bytes(), 0o600)
                .and_then(|()| write_private(&dir.join("cert.pem"), cert.as_bytes(), 0o600))
            {
                return fail(&format!("storing the renewed certificate: {e}"));
            }
            eprintln!(
                "renewed; valid until {}",
                v["expires_at"].as_str().unwrap_or("?")
            );
            ExitCode::SUCCESS
        }
        Ok(r) => fail(&format!(
            "renewal refused ({}): {}",
            r.status,
            r.error_message()
        )),
        Err(e) => fail(&e.to_string()),
    }
}

// Argument checks clap runs, so a bad value is a usage error (exit 2)
// before anything is read or sent.

fn https_url(s: &str) -> Result<String, String> {
    match Target::parse(s) {
        Ok(t) if t.https => Ok(s.to_owned()),
        Ok(_) => Err("the broker's jail URL must be https://".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

fn loopback_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    let a: std::net::SocketAddr = s
        .parse()
        .map_err(|e| format!("{e} (IP:PORT, e.g. 127.0.0.1:8462)"))?;
    lever_broker::gateway::check_listen(a).map(|()| a)
}

fn grant_arg(s: &str) -> Result<String, String> {
    parse_grant(s).map(|_| s.to_owned())
}

/// `TOOL/OP` or `TOOL/OP:K=V,K=V`.
fn parse_grant(s: &str) -> Result<serde_json::Value, String> {
    let (right, pins) = match s.split_once(':') {
        Some((r, p)) => (r, Some(p)),
        None => (s, None),
    };
    let (tool, op) = right
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: a grant is TOOL/OP[:KEY=VALUE,...]"))?;
    let mut constraints = serde_json::Map::new();
    for kv in pins.into_iter().flat_map(|p| p.split(',')) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("{kv:?}: a constraint is KEY=VALUE"))?;
        constraints.insert(k.to_owned(), v.into());
    }
    Ok(json!({"tool": tool, "op": op, "constraints": constraints}))
}

async fn token(dir: &Path, grants: &[String], whole: bool) -> ExitCode {
    let e = match enrolled(dir) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let grants: Result<Vec<_>, _> = if grants.is_empty() {
        Ok(vec![json!({"tool": "llm", "op": "generate"})])
    } else {
        grants.iter().map(|g| parse_grant(g)).collect()
    };
    let grants = match grants {
        Ok(g) => g,
        Err(m) => return fail(&m),
    };
    let body = json!({"grants": grants});
    match client::send(
        &e.target,
        Some(&e.tls),
        Method::POST,
        "/v1/capabilities",
        &[],
        Some(&body),
    )
    .await
    {
        Ok(r) if r.status.is_success() => {
            let v = r.json();
            if whole {
                crate::out::println(&v.to_string());
            } else {
                crate::out::println(v["token"].as_str().unwrap_or(""));
            }
            ExitCode::SUCCESS
        }
        Ok(r) => fail(&format!(
            "token refused ({}): {}",
            r.status,
            r.error_message()
        )),
        Err(e) => fail(&e.to_string()),
    }
}

async fn gateway(dir: &Path, listen: std::net::SocketAddr) -> ExitCode {
    if let Err(e) = lever_broker::gateway::check_listen(listen) {
        return fail(&e);
    }
    let broker = match read(dir, "broker") {
        Ok(b) => b,
        Err(code) => return code,
    };
    let target = match Target::parse(broker.trim()) {
        Ok(t) => t,
        Err(e) => return fail(&e.to_string()),
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => return fail(&format!("cannot listen on {listen}: {e}")),
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    crate::out::println(&format!(
        "lever gateway ready: http://{addr} -> {} (mTLS as the identity in {})",
        broker.trim(),
        dir.display()
    ));
    let gw = std::sync::Arc::new(lever_broker::gateway::Gateway {
        broker: target,
        dir: dir.to_path_buf(),
    });
    tokio::select! {
        _ = lever_broker::gateway::serve(listener, gw) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    ExitCode::SUCCESS
}

#![allow(clippy::unwrap_used)] // A bench that cannot set up should stop loudly.

//! The capability core's hot paths, each against a baseline of the same run:
//!
//! 1. token verify + authorize, cold (parse, signature chain, facts,
//!    Datalog) vs through the broker's cache (standing checked in Rust,
//!    the decision cached) per call;
//! 2. `POST /v1/capabilities` over mTLS to a real broker (peer check,
//!    config check, mint, audit) vs a plain TLS echo server answering the
//!    same request with a canned body, both through the same client (a new
//!    connection per request, as `lever agent token` makes).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use lever_benches::Harness;
use lever_broker::client::{self, ClientTls, Target};
use lever_policy::config::{self, Env};
use lever_policy::token::{self, Grant, Mint, RootKey};
use serde_json::json;

fn main() {
    if lever_benches::setup::role_tool() {
        return;
    }
    let h = Harness::from_env();
    println!(
        "capabilities ({} mode)",
        if h.quick { "quick" } else { "full" }
    );
    let dir = std::env::temp_dir().join(format!("lever-bench-caps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("ws")).unwrap();
    std::fs::write(dir.join("key"), "sk-ant-bench").unwrap();
    std::fs::set_permissions(dir.join("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let ports = [
        lever_benches::setup::free_port(),
        lever_benches::setup::free_port(),
        lever_benches::setup::free_port(),
        lever_benches::setup::free_port(),
    ];
    // The tool the tokens are for: this binary serving `lever-tool-db`.
    let db = dir.join("data.db");
    lever_tool_db::db::init_demo(&db).unwrap();
    std::fs::write(
        dir.join("lever.yaml"),
        format!(
            "name: bench\nbackend: qemu\ntree: ws\nmanager: {{image: img/x:1, obtain: [{{tool: db, op: read}}]}}\nbroker:\n  api_key_file: key\n  jail_port: {}\n  admin_port: {}\n  rate_limits: {{control: {{per_minute: 1000000, burst: 100000}}}}\n  tools: [{{name: db, command: ['{}', {}, '{}'], backend: '127.0.0.1:{}', operations: [{{name: read}}], allowed_values: {{table: [users]}}}}]\n",
            ports[0],
            ports[1],
            std::env::current_exe().unwrap().display(),
            lever_benches::setup::ROLE_TOOL,
            db.display(),
            ports[3]
        ),
    )
    .unwrap();
    let cfg = config::load(&dir.join("lever.yaml"), &Env::from_process())
        .unwrap()
        .config;
    let broker = lever_broker::open(cfg).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.spawn(lever_broker::run(broker.clone()));
    std::thread::sleep(Duration::from_millis(300));

    // --- 1. token verify + authorize ------------------------------------
    let root =
        RootKey::from_pem(&std::fs::read_to_string(dir.join(".lever/root.key")).unwrap()).unwrap();
    let grants = [Grant {
        tool: "db".into(),
        op: "read".into(),
        constraints: [("table".to_owned(), "users".to_owned())].into(),
    }];
    let t = token::mint(
        &root,
        &Mint {
            holder: "manager",
            grants: &grants,
            epoch: broker.epoch(),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
            delegation: None,
            inherit_checks: &[],
        },
    )
    .unwrap()
    .token;
    let args: BTreeMap<String, String> = [("table".to_owned(), "users".to_owned())].into();
    let public = root.public();
    let cold = h.measure("token: verify + authorize, cold", || {
        let v = token::verify(&public, &t).unwrap();
        v.authorize_all(
            &token::Request {
                peer: "manager",
                now: SystemTime::now(),
                epoch: 1,
                tool: "db",
                op: "read",
                args: &args,
            },
            |_| false,
        )
        .unwrap();
    });
    let cached = h.measure("token: verify + authorize, broker cache", || {
        broker
            .authorize_token(&t, "manager", "db", "read", &args)
            .unwrap();
    });
    h.ratio("cached vs cold", cached, cold);
    let verify_only = h.measure("token: verify only (parse + signature)", || {
        token::verify(&public, &t).unwrap()
    });
    h.ratio("verify share of cold", verify_only, cold);

    // --- 2. /v1/capabilities round trip vs a TLS echo ---------------------
    let ca_pem = std::fs::read_to_string(dir.join(".lever/ca.crt")).unwrap();
    let ca_key = std::fs::read_to_string(dir.join(".lever/ca.key")).unwrap();
    let admin = Target {
        https: false,
        host: "127.0.0.1".into(),
        port: ports[1],
    };
    let jail = Target {
        https: true,
        host: "127.0.0.1".into(),
        port: ports[0],
    };
    let agent = rt.block_on(async {
        let r = client::send(
            &admin,
            None,
            Method::POST,
            "/bootstrap",
            &[],
            Some(&json!({})),
        )
        .await
        .unwrap();
        let ticket = r.json()["ticket"].as_str().unwrap().to_owned();
        let (key, csr) = client::key_and_csr("manager").unwrap();
        let anon = ClientTls::new(&ca_pem, None).unwrap();
        let r = client::send(
            &jail,
            Some(&anon),
            Method::POST,
            "/v1/enrol",
            &[],
            Some(&json!({"ticket": ticket, "csr": csr})),
        )
        .await
        .unwrap();
        let cert = r.json()["certificate"].as_str().unwrap().to_owned();
        ClientTls::new(&ca_pem, Some((&cert, &key))).unwrap()
    });
    let body = json!({"grants": [{"tool": "db", "op": "read", "constraints": {"table": "users"}}]});
    let canned = rt
        .block_on(client::send(
            &jail,
            Some(&agent),
            Method::POST,
            "/v1/capabilities",
            &[],
            Some(&body),
        ))
        .unwrap()
        .body;
    let echo_port = ports[2];
    rt.spawn(echo_server(echo_port, ca_key, ca_pem.clone(), canned));
    std::thread::sleep(Duration::from_millis(100));
    let echo = Target {
        https: true,
        host: "127.0.0.1".into(),
        port: echo_port,
    };
    let anon = ClientTls::new(&ca_pem, None).unwrap();
    let baseline = h.measure("round trip: plain TLS echo (new connection)", || {
        let r = rt
            .block_on(client::send(
                &echo,
                Some(&anon),
                Method::POST,
                "/v1/capabilities",
                &[],
                Some(&body),
            ))
            .unwrap();
        assert_eq!(r.status, 200);
    });
    let real = h.measure("round trip: broker /v1/capabilities over mTLS", || {
        let r = rt
            .block_on(client::send(
                &jail,
                Some(&agent),
                Method::POST,
                "/v1/capabilities",
                &[],
                Some(&body),
            ))
            .unwrap();
        assert_eq!(r.status, 200);
    });
    h.ratio("broker mTLS mint vs TLS echo", real, baseline);
    println!(
        "  token cache: {} hits, {} misses",
        broker
            .stats
            .token_cache_hits
            .load(std::sync::atomic::Ordering::Relaxed),
        broker
            .stats
            .token_cache_misses
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TLS 1.3 server with a certificate from the same CA that answers every
/// request with `canned`.
async fn echo_server(port: u16, ca_key: String, ca_pem: String, canned: bytes::Bytes) {
    let ca = lever_broker::ca::Ca::load(&ca_key, &ca_pem).unwrap();
    let (chain, key, _) = ca.issue_server().unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = tcp.set_nodelay(true);
        let (acceptor, canned) = (acceptor.clone(), canned.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let canned = canned.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(http::Response::new(Full::new(canned)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

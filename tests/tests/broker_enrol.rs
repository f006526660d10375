//! Enrolment and identity: tickets, certificates, TLS, revocation of
//! identities, against a real `lever broker` process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use http::Method;
use lever_broker::client::{self, ClientTls};
use lever_tests::broker::{DEFAULT_AGENTS, Instance, code};
use serde_json::json;

#[test]
fn enrol_with_a_ticket_then_use_the_identity() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let g1 = b.enrol("g1");
    // The certificate names the ticket's identity and nothing else.
    let r = b.jail(&g1.tls(), Method::GET, "/v1/tools", &[], None);
    assert_eq!(r.status, 200, "{}", r.error_message());
    let v = r.json();
    assert_eq!(v["identity"], "g1");
    assert_eq!(v["llm"], true);
    assert_eq!(v["obtain"][1]["name"], "db_read");
    assert_eq!(
        v["obtain"][1]["pinned"]["table"],
        json!(["orders", "users"])
    );
    // The ticket answer, the enrol answer and the tools list never echo secrets.
    assert!(!String::from_utf8_lossy(&r.body).contains("sk-ant-test-real-key"));
}

#[test]
fn a_ticket_works_once() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (ticket, ca) = b.register("g1");
    assert!(ticket.starts_with("lvtk_"));
    let (first, _) = b.redeem(&ticket, &ca);
    assert_eq!(first.status, 200);
    let (again, _) = b.redeem(&ticket, &ca);
    assert_eq!(again.status, 403);
    assert!(
        again.error_message().contains("already used"),
        "{}",
        again.error_message()
    );
    // An unknown ticket of the right shape, and things that are not tickets.
    let (unknown, _) = b.redeem(&format!("lvtk_{}", "0".repeat(64)), &ca);
    assert_eq!(unknown.status, 403);
    assert!(unknown.error_message().contains("unknown ticket"));
    let (not_a_ticket, _) = b.redeem("not-a-ticket", &ca);
    assert_eq!(not_a_ticket.status, 403);
}

#[test]
fn a_ticket_expires() {
    let inst = Instance::new(DEFAULT_AGENTS, "  ticket_ttl: 1s\n");
    let b = inst.start();
    let (ticket, ca) = b.register("g1");
    std::thread::sleep(Duration::from_millis(2100));
    let (r, _) = b.redeem(&ticket, &ca);
    assert_eq!(r.status, 403);
    assert!(
        r.error_message().contains("expired"),
        "{}",
        r.error_message()
    );
}

#[test]
fn a_ticket_for_an_agent_dropped_from_the_config_is_refused_and_kept() {
    // Tickets outlive restarts; an agent removed from the config in between
    // gets no certificate. The ticket stays unspent: if the agent comes
    // back, it works.
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (ticket, ca) = b.register("g2");
    drop(b);
    let yaml = std::fs::read_to_string(inst.dir.join("lever.yaml")).unwrap();
    let without = yaml
        .replace("  - name: g2\n    dir: g2\n", "")
        .replace("to: [g1, g2]", "to: [g1]")
        .replace("\n    delegate: [{tool: db, op: read, to: [g2]}]", "");
    assert!(!without.contains("g2"), "{without}");
    std::fs::write(inst.dir.join("lever.yaml"), &without).unwrap();
    let b = inst.start();
    let (r, _) = b.redeem(&ticket, &ca);
    assert_eq!(r.status, 403);
    assert_eq!(code(&r), "ticket_refused");
    assert!(
        r.error_message()
            .contains("no longer an agent of the config"),
        "{}",
        r.error_message()
    );
    drop(b);
    std::fs::write(inst.dir.join("lever.yaml"), &yaml).unwrap();
    let b = inst.start();
    assert_eq!(b.redeem(&ticket, &ca).0.status, 200);
}

#[test]
fn of_concurrent_redeems_of_one_ticket_exactly_one_wins() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    for round in 0..3 {
        let (ticket, ca) = b.register("g1");
        let tls = ClientTls::new(&ca, None).unwrap();
        let statuses: Vec<u16> = b.rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let (_, csr) = client::key_and_csr("x").unwrap();
                let (jail, tls, ticket) = (b.jail.clone(), tls.clone(), ticket.clone());
                tasks.push(tokio::spawn(async move {
                    let body = json!({"ticket": ticket, "csr": csr});
                    client::send(
                        &jail,
                        Some(&tls),
                        Method::POST,
                        "/v1/enrol",
                        &[],
                        Some(&body),
                    )
                    .await
                    .unwrap()
                    .status
                    .as_u16()
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "round {round}: {statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == 403).count(),
            7,
            "round {round}: {statuses:?}"
        );
    }
}

#[test]
fn tickets_only_for_configured_agents() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let r = b.admin(
        Method::POST,
        "/register",
        Some(json!({"identity": "intruder"})),
    );
    assert_eq!(r.status, 403);
    assert_eq!(code(&r), "unknown_agent");
    let r = b.admin(Method::POST, "/bootstrap", Some(json!({})));
    assert_eq!(r.status, 200);
    let m = r.json();
    let (e, _) = b.redeem(m["ticket"].as_str().unwrap(), m["ca"].as_str().unwrap());
    assert_eq!(e.json()["identity"], "manager");
}

#[test]
fn only_the_manager_provisions_and_only_groves() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let manager = b.enrol("manager");
    let g1 = b.enrol("g1");
    let r = b.provision(&g1, "g2");
    assert_eq!(r.status, 403, "a grove provisioned: {}", r.error_message());
    let r = b.provision(&manager, "manager");
    assert_eq!(r.status, 403);
    let r = b.provision(&manager, "g2");
    assert_eq!(r.status, 200, "{}", r.error_message());
    let t = r.json();
    let (e, _) = b.redeem(t["ticket"].as_str().unwrap(), t["ca"].as_str().unwrap());
    assert_eq!(e.json()["identity"], "g2");
}

#[test]
fn every_route_but_enrol_and_health_needs_a_broker_certificate() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (_, ca) = b.register("g1");
    let anon = ClientTls::new(&ca, None).unwrap();
    assert_eq!(
        b.jail(&anon, Method::GET, "/healthz", &[], None).status,
        200
    );
    for (m, path) in [
        (Method::POST, "/v1/capabilities"),
        (Method::POST, "/v1/capabilities/delegate"),
        (Method::POST, "/v1/renew"),
        (Method::GET, "/v1/tools"),
        (Method::POST, "/v1/provision"),
        (Method::GET, "/v1/agents"),
        (Method::POST, "/v1/agents/g1/start"),
    ] {
        let r = b.jail(
            &anon,
            m,
            path,
            &[],
            Some(json!({"grants": [{"tool": "llm", "op": "generate"}]})),
        );
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(code(&r), "client_certificate_required", "{path}");
    }
}

/// A client certificate for `cn` from a CA the broker never saw.
fn foreign_identity(cn: &str) -> (String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Lever broker CA (t)");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn a_client_certificate_from_a_foreign_ca_is_refused() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (_, ca) = b.register("g1");
    let (cert, key) = foreign_identity("g1");
    let tls = ClientTls::new(&ca, Some((&cert, &key))).unwrap();
    // TLS 1.3 client auth fails after the client's Finished: the refusal
    // shows as a failed handshake or a connection closed before any answer.
    match b.try_jail(&tls, Method::GET, "/v1/tools", None) {
        Err(_) => {}
        Ok(r) => panic!(
            "a foreign certificate got an answer: {} {}",
            r.status,
            r.error_message()
        ),
    }
}

/// A client certificate signed by the broker's own CA key (read from the
/// state dir, as only the host could), shaped by `shape`.
fn broker_signed(
    inst: &Instance,
    shape: impl FnOnce(&mut rcgen::CertificateParams),
) -> (String, String) {
    let ca_key = rcgen::KeyPair::from_pem(&lever_tests::broker::state_file(
        &inst.state_dir(),
        "ca.key",
    ))
    .unwrap();
    let ca_pem = lever_tests::broker::state_file(&inst.state_dir(), "ca.crt");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, "g1");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    shape(&mut p);
    (
        p.signed_by(&key, &issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

#[test]
fn a_broker_signed_certificate_of_the_wrong_shape_is_refused() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (_, ca) = b.register("g1");
    // The control: the right shape is accepted (so the refusals below are
    // about the shape, not about forging).
    let (cert, key) = broker_signed(&inst, |_| {});
    let tls = ClientTls::new(&ca, Some((&cert, &key))).unwrap();
    assert_eq!(
        b.jail(&tls, Method::GET, "/v1/tools", &[], None).status,
        200
    );
    // (what, shape, how it is refused: Some(message) by the broker's own
    // check with a 401, None by the TLS handshake itself).
    type Shape = Box<dyn FnOnce(&mut rcgen::CertificateParams)>;
    let shapes: Vec<(&str, Shape, Option<&str>)> = vec![
        (
            "no clientAuth usage",
            Box::new(|p| p.extended_key_usages = vec![]),
            Some("no clientAuth"),
        ),
        (
            "no CN",
            Box::new(|p| p.distinguished_name = rcgen::DistinguishedName::new()),
            Some("no CN"),
        ),
        (
            "a CN that is no identity",
            Box::new(|p| {
                p.distinguished_name = rcgen::DistinguishedName::new();
                p.distinguished_name.push(rcgen::DnType::CommonName, "G1 ");
            }),
            Some("not a valid identity"),
        ),
        (
            "serverAuth only",
            Box::new(|p| p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth]),
            None,
        ),
        (
            "a CA certificate",
            Box::new(|p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)),
            None,
        ),
    ];
    for (what, shape, refusal) in shapes {
        let (cert, key) = broker_signed(&inst, shape);
        let tls = ClientTls::new(&ca, Some((&cert, &key))).unwrap();
        match (b.try_jail(&tls, Method::GET, "/v1/tools", None), refusal) {
            (Err(_), None) => {}
            (Ok(r), Some(why)) => {
                assert_eq!(r.status, 401, "{what}");
                assert!(
                    r.error_message().contains(why),
                    "{what}: {}",
                    r.error_message()
                );
            }
            (other, _) => panic!("{what}: unexpected outcome {:?}", other.map(|r| r.status)),
        }
    }
}

#[test]
fn a_broker_signed_certificate_with_two_cns_is_refused() {
    // rcgen cannot write two CNs; openssl can. Sign with the broker CA key.
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (_, ca) = b.register("g1");
    let d = inst.dir.path();
    let sd = inst.state_dir();
    std::fs::write(d.join("ext.cnf"), "extendedKeyUsage=clientAuth\n").unwrap();
    for args in [
        vec![
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "two.key",
            "-out",
            "two.csr",
            "-subj",
            "/CN=g1/CN=manager",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            "two.csr",
            "-CA",
            sd.join("ca.crt").to_str().unwrap(),
            "-CAkey",
            sd.join("ca.key").to_str().unwrap(),
            "-CAcreateserial",
            "-out",
            "two.crt",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    ] {
        let out = lever_tests::run(Command::new("openssl").args(&args).current_dir(d));
        assert_eq!(out.code, 0, "openssl {args:?}: {}", out.stderr);
    }
    let cert = std::fs::read_to_string(d.join("two.crt")).unwrap();
    let key = std::fs::read_to_string(d.join("two.key")).unwrap();
    let tls = ClientTls::new(&ca, Some((&cert, &key))).unwrap();
    let r = b.try_jail(&tls, Method::GET, "/v1/tools", None).unwrap();
    assert_eq!(r.status, 401, "{}", r.error_message());
    assert!(
        r.error_message().contains("more than one CN"),
        "{}",
        r.error_message()
    );
}

#[test]
fn tls_below_1_3_is_refused() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let _b = inst.start();
    let out = lever_tests::run(
        Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{}", inst.jail_port),
                "-tls1_2",
                "-brief",
            ])
            .stdin(std::process::Stdio::null()),
    );
    assert!(
        out.stderr.contains("alert") || out.stderr.contains("error") || out.code != 0,
        "a TLS 1.2 handshake succeeded:\n{}{}",
        out.stdout,
        out.stderr
    );
    let ok = lever_tests::run(
        Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{}", inst.jail_port),
                "-tls1_3",
                "-brief",
            ])
            .stdin(std::process::Stdio::null()),
    );
    assert!(
        ok.stderr.contains("TLSv1.3"),
        "TLS 1.3 failed:\n{}",
        ok.stderr
    );
}

#[test]
fn renew_issues_for_the_authenticated_cn_not_the_csrs() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let g1 = b.enrol("g1");
    let (key, r) = b.renew(&g1, "manager");
    assert_eq!(r.status, 200, "{}", r.error_message());
    assert_eq!(r.json()["identity"], "g1");
    let renewed = lever_tests::broker::Agent {
        identity: "g1".into(),
        cert_pem: r.json()["certificate"].as_str().unwrap().to_owned(),
        key_pem: key,
        ca_pem: g1.ca_pem.clone(),
    };
    let r = b.jail(&renewed.tls(), Method::GET, "/v1/tools", &[], None);
    assert_eq!(
        r.json()["identity"],
        "g1",
        "the CSR's CN `manager` was ignored"
    );
}

#[test]
fn a_revoked_identity_cannot_mint_renew_delegate_or_enrol() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let g1 = b.enrol("g1");
    let (pending, ca) = b.register("g1");
    let r = b.admin(Method::POST, "/revoke", Some(json!({"identity": "g1"})));
    assert_eq!(r.status, 200);
    let r = b.obtain(&g1, json!([{"tool": "llm", "op": "generate"}]));
    assert_eq!(
        (r.status.as_u16(), code(&r).as_str()),
        (403, "identity_revoked")
    );
    let (_, r) = b.renew(&g1, "g1");
    assert_eq!(r.status, 403);
    // A ticket issued before the revocation is dead too; no new ones.
    let (r, _) = b.redeem(&pending, &ca);
    assert_eq!(r.status, 403);
    assert!(
        r.error_message().contains("revoked"),
        "{}",
        r.error_message()
    );
    let r = b.admin(Method::POST, "/register", Some(json!({"identity": "g1"})));
    assert_eq!(
        (r.status.as_u16(), code(&r).as_str()),
        (403, "identity_revoked")
    );
    // Others are unaffected.
    let g2 = b.enrol("g2");
    assert_eq!(
        b.obtain(&g2, json!([{"tool": "llm", "op": "generate"}]))
            .status,
        200
    );
}

#[test]
fn a_csr_refused_for_its_size_does_not_spend_the_ticket() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (ticket, ca) = b.register("g1");
    let (_, csr) = client::key_and_csr("g1").unwrap();
    // Text before a PEM block is allowed (RFC 7468), so this parses, but it
    // is over the CSR size cap: refused before the ticket is spent.
    let padded = format!("{}\n{csr}", "x".repeat(9 * 1024));
    let anon = ClientTls::new(&ca, None).unwrap();
    let r = b.jail(
        &anon,
        Method::POST,
        "/v1/enrol",
        &[],
        Some(json!({"ticket": ticket, "csr": padded})),
    );
    assert_eq!(r.status, 400, "{}", r.error_message());
    let (r, _) = b.redeem(&ticket, &ca);
    assert_eq!(r.status, 200, "the ticket was spent: {}", r.error_message());
    assert_eq!(r.json()["identity"], "g1");
}

#[test]
fn a_ticket_that_cannot_be_redeemed_is_refused_before_its_csr_is_parsed() {
    // `/v1/enrol` answers callers without a certificate. A guessed or
    // spent ticket is refused from the in-memory state, before the
    // CSR is parsed or verified and without the state's writer lock: a
    // flood of guesses costs the broker a lookup each. The CSR sent here is
    // not a CSR at all, so an answer about it would show it was parsed.
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (spent, ca) = b.register("g1");
    assert_eq!(b.redeem(&spent, &ca).0.status, 200);
    let anon = ClientTls::new(&ca, None).unwrap();
    let enrol = |ticket: &str| {
        b.jail(
            &anon,
            Method::POST,
            "/v1/enrol",
            &[],
            Some(json!({"ticket": ticket, "csr": "not a CSR"})),
        )
    };
    let guessed = format!("lvtk_{}", "0".repeat(64));
    for (ticket, why) in [
        (guessed.as_str(), "unknown ticket"),
        (spent.as_str(), "already used"),
    ] {
        let r = enrol(ticket);
        assert_eq!(r.status, 403, "{why}: {}", r.error_message());
        assert_eq!(code(&r), "ticket_refused", "{why}");
        assert!(r.error_message().contains(why), "{}", r.error_message());
    }
    // A ticket that can be redeemed has its CSR judged first, and is not
    // spent on a bad one.
    let (fresh, _) = b.register("g2");
    let r = enrol(&fresh);
    assert_eq!(r.status, 400, "{}", r.error_message());
    assert_eq!(b.redeem(&fresh, &ca).0.status, 200);
    // Refused from the read side, and still audited (once each).
    let mut denied = Vec::new();
    for _ in 0..50 {
        denied = inst
            .audit_records()
            .iter()
            .filter(|r| r["event"] == "enrol" && r["decision"] == "deny")
            .map(|r| r["reason"].as_str().unwrap_or_default().to_owned())
            .collect();
        if denied.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(denied.len(), 2, "{denied:?}");
    for reason in ["ticket_unknown", "ticket_used"] {
        assert!(denied.iter().any(|d| d == reason), "{reason}: {denied:?}");
    }
}

#[test]
fn only_the_manager_lists_and_dispatches_groves() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let manager = b.enrol("manager");
    let g1 = b.enrol("g1");
    for (m, path) in [
        (Method::GET, "/v1/agents"),
        (Method::POST, "/v1/agents/g2/start"),
        (Method::POST, "/v1/agents/g2/stop"),
        (Method::POST, "/v1/agents/nobody/start"),
    ] {
        let r = b.jail(&g1.tls(), m, path, &[], None);
        assert_eq!(r.status, 403, "a grove got {path}: {}", r.error_message());
        assert_eq!(code(&r), "forbidden", "{path}");
    }
    let r = b.jail(&manager.tls(), Method::GET, "/v1/agents", &[], None);
    assert_eq!(r.status, 200, "{}", r.error_message());
    let list = r.json()["agents"].as_array().unwrap().clone();
    let names: Vec<&str> = list.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["g1", "g2"], "{list:?}");
    assert_eq!(list[0]["image"], "img/x:1");
    assert_eq!(list[1]["revoked"], false);
    assert!(
        !String::from_utf8_lossy(&r.body).contains(inst.dir.path().to_str().unwrap()),
        "a host path reached the manager"
    );
    for (path, status) in [
        // Not a grove: refused as in `/v1/provision`.
        ("/v1/agents/manager/start", 403),
        ("/v1/agents/nobody/start", 403),
        ("/v1/agents/g2/restart", 404),
        ("/v1/agents/g2", 404),
        ("/v1/agents/g2/start", 501),
        ("/v1/agents/g2/stop", 501),
    ] {
        let r = b.jail(&manager.tls(), Method::POST, path, &[], None);
        assert_eq!(r.status, status, "{path}: {}", r.error_message());
    }
    let r = b.jail(
        &manager.tls(),
        Method::GET,
        "/v1/agents/g2/start",
        &[],
        None,
    );
    assert_eq!(r.status, 405);
    // A revoked grove cannot be dispatched.
    let r = b.admin(Method::POST, "/revoke", Some(json!({"identity": "g2"})));
    assert_eq!(r.status, 200);
    let r = b.jail(
        &manager.tls(),
        Method::POST,
        "/v1/agents/g2/start",
        &[],
        None,
    );
    assert_eq!(r.status, 403, "{}", r.error_message());
    let r = b.jail(&manager.tls(), Method::GET, "/v1/agents", &[], None);
    assert_eq!(r.json()["agents"][1]["revoked"], true);
    // Every dispatch attempt that got as far as the jail is audited.
    let mut tries = Vec::new();
    for _ in 0..50 {
        tries = inst
            .audit_records()
            .into_iter()
            .filter(|r| r["event"] == "dispatch")
            .collect();
        if tries.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tries.len(), 2, "{tries:?}");
    assert_eq!(tries[0]["identity"], "g2");
    assert_eq!(tries[0]["detail"]["by"], "manager");
    // One record per attempt: no second, generic denial of the request.
    let all = inst.audit_records();
    for t in &tries {
        let same: Vec<_> = all
            .iter()
            .filter(|r| r["request_id"] == t["request_id"])
            .collect();
        assert_eq!(same.len(), 1, "{same:?}");
    }
}

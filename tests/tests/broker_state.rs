//! Durable state, the admin listener's guards, the listeners' caps and the
//! audit trail, against a real `lever broker` process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use http::Method;
use lever_tests::broker::{DEFAULT_AGENTS, Instance, code, state_file};
use lever_tests::{lever, run};
use serde_json::json;

#[test]
fn kill_9_right_after_revoke_and_bump_loses_nothing() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let mut b = inst.start();
    let m = b.enrol("manager");
    let (t, id) = b.token(
        &m,
        json!([{"tool": "db", "op": "read", "constraints": {"table": "users"}}]),
    );
    let (t2, _) = b.token(
        &m,
        json!([{"tool": "db", "op": "read", "constraints": {"table": "users"}}]),
    );
    let (pending, ca) = b.register("g1");
    assert_eq!(
        b.admin(Method::POST, "/revoke", Some(json!({"token_id": id})))
            .status,
        200
    );
    assert_eq!(
        b.admin(Method::POST, "/revoke", Some(json!({"identity": "g2"})))
            .status,
        200
    );
    assert_eq!(
        b.admin(Method::POST, "/bump-epoch", Some(json!({}))).json()["epoch"],
        2
    );
    assert_eq!(
        b.admin(Method::POST, "/bump-epoch", Some(json!({}))).json()["epoch"],
        3
    );
    b.kill();

    let b = inst.start();
    assert_eq!(
        b.admin(Method::GET, "/epoch", None).json()["epoch"],
        3,
        "the epoch rolled back"
    );
    // The revoked identity stays revoked; the outstanding ticket survives.
    let r = b.admin(Method::POST, "/register", Some(json!({"identity": "g2"})));
    assert_eq!(code(&r), "identity_revoked");
    let (r, _) = b.redeem(&pending, &ca);
    assert_eq!(
        r.status,
        200,
        "an outstanding ticket was lost: {}",
        r.error_message()
    );
    // The same CA: the old certificate still authenticates.
    let r = b.delegate(&m, &t, "g1", json!([]));
    assert_eq!(code(&r), "token_revoked");
    let r = b.delegate(&m, &t2, "g1", json!([]));
    assert_eq!(code(&r), "token_stale_epoch");
}

#[test]
fn kill_9_right_after_enrol_keeps_the_ticket_spent() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let mut b = inst.start();
    let (ticket, ca) = b.register("g1");
    assert_eq!(b.redeem(&ticket, &ca).0.status, 200);
    b.kill();
    let b = inst.start();
    let (r, _) = b.redeem(&ticket, &ca);
    assert_eq!(r.status, 403);
    assert!(r.error_message().contains("already used"));
}

#[test]
fn a_damaged_state_dir_is_a_startup_error_never_a_reset() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let mut b = inst.start();
    b.admin(Method::POST, "/bump-epoch", Some(json!({})));
    b.kill();
    let sd = inst.state_dir();
    let good = state_file(&sd, "state.json");
    let write600 = |name: &str, text: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(sd.join(name), text).unwrap();
        std::fs::set_permissions(sd.join(name), std::fs::Permissions::from_mode(0o600)).unwrap();
    };

    write600("state.json", "{\"version\":1,\"epo");
    let err = inst.start_fails();
    assert!(
        err.contains("corrupt") && err.contains("roll the epoch back"),
        "{err}"
    );

    std::fs::remove_file(sd.join("state.json")).unwrap();
    let err = inst.start_fails();
    assert!(
        err.contains("incomplete") && err.contains("state.json missing"),
        "{err}"
    );

    write600("state.json", &good);
    std::fs::rename(sd.join("root.key"), sd.join("root.key.bak")).unwrap();
    let err = inst.start_fails();
    assert!(err.contains("root.key missing"), "{err}");
    std::fs::rename(sd.join("root.key.bak"), sd.join("root.key")).unwrap();

    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(sd.join("ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = inst.start_fails();
    assert!(err.contains("ca.key") && err.contains("0600"), "{err}");
    std::fs::set_permissions(sd.join("ca.key"), std::fs::Permissions::from_mode(0o600)).unwrap();

    // Restored: it starts, and the epoch is where it was.
    write600("state.json", &good);
    let b = inst.start();
    assert_eq!(b.admin(Method::GET, "/epoch", None).json()["epoch"], 2);
}

#[test]
fn the_state_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let _b = inst.start();
    let sd = inst.state_dir();
    assert_eq!(
        std::fs::metadata(&sd).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for f in ["ca.key", "ca.crt", "root.key", "state.json", "audit.jsonl"] {
        let mode = std::fs::metadata(sd.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    // Tickets are stored hashed, never as issued.
    let b = _b;
    let (ticket, _) = b.register("g1");
    assert!(!state_file(&sd, "state.json").contains(&ticket));
}

#[test]
fn the_admin_port_refuses_a_non_loopback_bind() {
    let inst = Instance::new(DEFAULT_AGENTS, "  admin_bind: 0.0.0.0\n");
    let err = inst.start_fails();
    assert!(
        err.contains("broker.admin_bind") && err.contains("not a loopback address"),
        "{err}"
    );
}

#[test]
fn the_admin_api_does_not_serve_browsers_or_foreign_hosts() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let body = Some(json!({}));
    let r = b.admin_with(
        Method::POST,
        "/bump-epoch",
        &[("origin", "https://evil.example")],
        body.clone(),
    );
    assert_eq!(r.status, 403);
    // DNS rebinding: a page at evil.example resolving to 127.0.0.1.
    let mut s = TcpStream::connect(("127.0.0.1", inst.admin_port)).unwrap();
    s.write_all(b"POST /bump-epoch HTTP/1.1\r\nHost: evil.example\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // A cross-site "simple" POST (text/plain) is refused too.
    let mut s = TcpStream::connect(("127.0.0.1", inst.admin_port)).unwrap();
    s.write_all(b"POST /bump-epoch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 415"), "{out}");
    assert_eq!(
        b.admin(Method::GET, "/epoch", None).json()["epoch"],
        1,
        "an epoch was bumped"
    );
}

#[test]
fn the_admin_api_takes_posts_without_a_content_type_but_not_from_browsers() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    // What `curl -X POST` sends: no body, no content type.
    let mut s = TcpStream::connect(("127.0.0.1", inst.admin_port)).unwrap();
    s.write_all(b"POST /bump-epoch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains(r#""epoch":2"#), "{out}");
    // A JSON body sent without saying so, as `curl -d` does not.
    let mut s = TcpStream::connect(("127.0.0.1", inst.admin_port)).unwrap();
    let body = r#"{"identity":"g1"}"#;
    s.write_all(
        format!(
            "POST /register HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains(r#""ticket""#), "{out}");
    // Fetch metadata says a browser sent it, even without an Origin.
    for site in ["cross-site", "same-site", "same-origin"] {
        let r = b.admin_with(
            Method::POST,
            "/bump-epoch",
            &[("sec-fetch-site", site)],
            None,
        );
        assert_eq!(r.status, 403, "{site}");
    }
    assert_eq!(b.admin(Method::GET, "/epoch", None).json()["epoch"], 2);
}

#[test]
fn bodies_and_headers_are_capped() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let g1 = b.enrol("g1");
    let huge = "x".repeat(64 * 1024);
    let r = b.jail(
        &g1.tls(),
        Method::POST,
        "/v1/capabilities",
        &[],
        Some(json!({"grants": [], "pad": huge})),
    );
    assert_eq!(r.status, 413);
    let r = b.admin(Method::POST, "/register", Some(json!({"identity": huge})));
    assert_eq!(r.status, 413);
    // Oversized headers: the connection is answered 431 or closed.
    let mut s = TcpStream::connect(("127.0.0.1", inst.admin_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let big = format!(
        "GET /epoch HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let _ = s.write_all(big.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out}");
    // A body with no declared length (chunked) is capped as it is read.
    let mut s = TcpStream::connect(("127.0.0.1", inst.admin_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let chunk = format!(r#"{{"identity": "{}"}}"#, "x".repeat(64 * 1024));
    let req = format!(
        "POST /register HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let _ = s.write_all(req.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(
        out.starts_with("HTTP/1.1 413"),
        "{}",
        &out[..out.len().min(200)]
    );
    // Unknown fields in a body are refused, not ignored.
    let r = b.obtain(
        &g1,
        json!([{"tool": "llm", "op": "generate", "holder": "manager"}]),
    );
    assert_eq!(r.status, 400);
}

#[test]
fn every_decision_lands_in_a_hash_chained_audit_trail() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let mut b = inst.start();
    let m = b.enrol("manager");
    let (t, _) = b.token(
        &m,
        json!([{"tool": "db", "op": "read", "constraints": {"table": "users"}}]),
    );
    b.delegate(
        &m,
        &t,
        "g1",
        json!([{"tool": "db", "op": "read", "constraints": {"table": "users"}}]),
    );
    b.obtain(
        &m,
        json!([{"tool": "db", "op": "read", "constraints": {"table": "secret"}}]),
    );
    b.admin(Method::POST, "/bump-epoch", Some(json!({})));
    b.admin(Method::POST, "/revoke", Some(json!({"identity": "g2"})));
    std::thread::sleep(Duration::from_millis(300));
    b.kill();
    let text = std::fs::read_to_string(inst.audit_file()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let events: Vec<(&str, &str)> = lines
        .iter()
        .map(|v| {
            (
                v["event"].as_str().unwrap(),
                v["decision"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    for want in [
        ("ticket_issue", "allow"),
        ("enrol", "allow"),
        ("mint", "allow"),
        ("delegate", "allow"),
        ("mint", "deny"),
        ("bump_epoch", "allow"),
        ("revoke", "allow"),
    ] {
        assert!(events.contains(&want), "{want:?} missing from {events:?}");
    }
    for v in &lines {
        for key in [
            "seq",
            "time",
            "event",
            "request_id",
            "identity",
            "tool",
            "op",
            "constraints",
            "decision",
            "reason",
            "token_id",
            "detail",
            "prev",
        ] {
            assert!(v.get(key).is_some(), "record lacks {key}: {v}");
        }
    }
    assert!(!text.contains(&t), "a token was written to the audit log");
    assert!(!text.contains("sk-ant-test-real-key"));

    let home = inst.dir.path();
    let audit = inst.audit_file();
    let audit_s = audit.to_str().unwrap();
    let ok = lever(&["audit", "verify", audit_s], home, home);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(
        ok.stdout
            .contains(&format!("intact, {} records", lines.len())),
        "{}",
        ok.stdout
    );
    // And through the config, without naming the file.
    assert_eq!(
        lever(&["audit", "-c", "lever.yaml", "verify"], home, home).code,
        0
    );

    // Tamper with line 4 (any byte will do).
    let mut edited: Vec<String> = text.lines().map(str::to_owned).collect();
    edited[3] = edited[3].replacen('{', "{ ", 1);
    std::fs::write(&audit, edited.join("\n") + "\n").unwrap();
    let bad = lever(&["audit", "verify", audit_s], home, home);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains(":5: chain broken"), "{}", bad.stderr);

    // Remove a line in the middle.
    let mut removed: Vec<&str> = text.lines().collect();
    removed.remove(2);
    std::fs::write(&audit, removed.join("\n") + "\n").unwrap();
    let bad = lever(&["audit", "verify", audit_s], home, home);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains(":3: chain broken"), "{}", bad.stderr);

    // Cut records off the end, from the revocation (answered only once
    // durable) on: what is left still chains, but the tip the broker
    // recorded beside the trail shows the loss, to `verify` and to a
    // broker starting on it. Emptied, likewise.
    let tip = inst.state_dir().join("audit.jsonl.tip");
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tip).unwrap()).unwrap();
    let revoke = lines.iter().position(|v| v["event"] == "revoke").unwrap();
    assert!(
        recorded["seq"].as_u64().unwrap() > revoke as u64,
        "{recorded}"
    );
    let kept: Vec<&str> = text.lines().take(revoke).collect();
    for cut in [kept.join("\n") + "\n", String::new()] {
        std::fs::write(&audit, &cut).unwrap();
        let bad = lever(&["audit", "verify", audit_s], home, home);
        assert_eq!(bad.code, 1, "{}", bad.stdout);
        assert!(
            bad.stderr.contains("records were removed from its end"),
            "{}",
            bad.stderr
        );
        let refused = inst.start_fails();
        assert!(
            refused.contains("records were removed from its end"),
            "{refused}"
        );
    }

    // Restored, the broker appends to the same chain across restarts.
    std::fs::write(&audit, &text).unwrap();
    let b = inst.start();
    b.admin(Method::POST, "/bump-epoch", Some(json!({})));
    drop(b);
    std::thread::sleep(Duration::from_millis(200));
    let out = run(
        std::process::Command::new(lever_tests::lever_bin()).args(["audit", "verify", audit_s])
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[test]
fn slow_clients_are_cut_off() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let _b = inst.start();
    let start = std::time::Instant::now();
    // A request head that never ends (admin port) and a TLS handshake that
    // never starts (jail port), side by side.
    let admin = std::thread::spawn({
        let port = inst.admin_port;
        move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
            s.write_all(b"GET /epoch HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            buf
        }
    });
    let jail = std::thread::spawn({
        let port = inst.jail_port;
        move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        }
    });
    let answer = admin.join().unwrap();
    jail.join().unwrap();
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "slow connections were held for {took:?}"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

/// The admin listener serves 64 connections at once: a 65th waits in the
/// kernel's queue, unanswered, until one of the 64 ends, then is served.
#[test]
fn the_connection_cap_holds_until_a_connection_ends() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let _b = inst.start();
    let port = inst.admin_port;
    let mut held: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // Let the broker take all 64 before the next one arrives.
    std::thread::sleep(Duration::from_millis(500));
    let mut late = TcpStream::connect(("127.0.0.1", port)).unwrap();
    late.write_all(b"GET /epoch HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    late.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut first = [0u8; 64];
    match late.read(&mut first) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a connection over the cap was served: {other:?}"),
    }
    drop(held.pop());
    late.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = late.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"epoch\""), "{text}");
}

#[test]
fn two_brokers_never_share_a_state_dir_and_lost_state_is_not_reinitialized() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let mut b = inst.start();
    let err = inst.start_fails();
    assert!(err.contains("in use by another broker"), "{err}");
    b.admin(Method::POST, "/revoke", Some(json!({"identity": "g2"})));
    b.kill();
    // Everything but the audit trail lost: refuse, do not start over.
    let sd = inst.state_dir();
    for f in ["ca.key", "ca.crt", "root.key", "state.json"] {
        std::fs::remove_file(sd.join(f)).unwrap();
    }
    let err = inst.start_fails();
    assert!(err.contains("state was lost"), "{err}");
}

#[test]
fn refusals_never_echo_the_values_they_choke_on() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let g1 = b.enrol("g1");
    let (ticket, _) = b.register("g2");
    // A ticket pasted where a number-typed or list-typed value goes.
    let r = b.jail(
        &g1.tls(),
        Method::POST,
        "/v1/capabilities",
        &[],
        Some(json!({"grants": ticket})),
    );
    assert_eq!(r.status, 400);
    assert!(
        !String::from_utf8_lossy(&r.body).contains(&ticket),
        "{}",
        r.error_message()
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !std::fs::read_to_string(inst.audit_file())
            .unwrap()
            .contains(&ticket[5..])
    );
}

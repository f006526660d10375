//! Capability tokens against a real `lever broker`: obtaining them, using
//! them as bearer tokens, and every way an agent might try to stretch one.
//! (The only bearer route before `/llm` and `/mcp` land is
//! `/v1/capabilities/delegate`; it runs the same verification.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use http::Method;
use lever_broker::client::ClientTls;
use lever_policy::token::{self, DatalogTerm, Grant, Mint, RootKey};
use lever_tests::broker::{Broker, DEFAULT_AGENTS, Instance, code, connect_jail, state_file};
use serde_json::json;

fn db(table: &str) -> serde_json::Value {
    json!([{"tool": "db", "op": "read", "constraints": {"table": table}}])
}

#[test]
fn obtain_only_what_obtain_and_allowed_values_permit() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let g1 = b.enrol("g1");
    let g2 = b.enrol("g2");
    // Within: llm (every api-key agent), db/read pinned to an allowed table.
    assert_eq!(
        b.obtain(&g1, json!([{"tool": "llm", "op": "generate"}]))
            .status,
        200
    );
    assert_eq!(b.obtain(&g1, db("users")).status, 200);
    assert_eq!(
        b.obtain(&g2, json!([{"tool": "llm", "op": "generate"}]))
            .status,
        200
    );
    let both = json!([{"tool": "llm", "op": "generate"}, {"tool": "db", "op": "read", "constraints": {"table": "orders"}}]);
    assert_eq!(b.obtain(&g1, both).status, 200);
    // Outside.
    for (who, grants, why) in [
        (&g1, db("secrets"), "not allowed"),
        (
            &g1,
            json!([{"tool": "db", "op": "read"}]),
            "requires `table` to be pinned",
        ),
        (
            &g1,
            json!([{"tool": "db", "op": "read", "constraints": {"Table": "users"}}]),
            "requires `table`",
        ),
        (
            &g1,
            json!([{"tool": "db", "op": "write", "constraints": {"table": "users"}}]),
            "not in your obtain",
        ),
        (&g2, db("users"), "not in your obtain"),
        (
            &g1,
            json!([{"tool": "fs", "op": "read"}]),
            "not in your obtain",
        ),
        (
            &g1,
            json!([{"tool": "llm", "op": "embed"}]),
            "not in your obtain",
        ),
    ] {
        let r = b.obtain(who, grants.clone());
        assert_eq!(r.status, 403, "{grants}: {}", r.error_message());
        assert!(
            r.error_message().contains(why),
            "{grants}: {}",
            r.error_message()
        );
    }
    for bad in [
        json!([]),
        json!([{"tool": "llm", "op": "generate"}, {"tool": "llm", "op": "generate"}]),
        // `/llm` judges no arguments: a pin there could never be met.
        json!([{"tool": "llm", "op": "generate", "constraints": {"model": "claude-mock-1"}}]),
    ] {
        assert_eq!(b.obtain(&g1, bad.clone()).status, 400, "{bad}");
    }
    // The answer names the epoch and expiry, and is a real token.
    let r = b.obtain(&g1, db("users")).json();
    assert_eq!(r["epoch"], 1);
    assert!(r["expires_at"].as_str().unwrap().ends_with('Z'));
    let root = RootKey::from_pem(&state_file(&inst.state_dir(), "root.key")).unwrap();
    let v = token::verify(&root.public(), r["token"].as_str().unwrap()).unwrap();
    assert_eq!(v.holder, "g1");
    assert_eq!(v.token_id.as_str(), r["token_id"].as_str().unwrap());
}

/// A db/read token pinned to `users` for the manager, minted directly with
/// `root` at `epoch` (as only the holder of a root key could).
fn manager_db_token(root: &RootKey, epoch: u64) -> String {
    let grants = [Grant {
        tool: "db".into(),
        op: "read".into(),
        constraints: [("table".to_owned(), "users".to_owned())].into(),
    }];
    token::mint(
        root,
        &Mint {
            holder: "manager",
            grants: &grants,
            epoch,
            expires_at: SystemTime::now() + Duration::from_secs(600),
            delegation: None,
            inherit_checks: &[],
        },
    )
    .unwrap()
    .token
}

/// The manager's db/read token, pinned to `users`.
fn manager_token(b: &Broker) -> (lever_tests::broker::Agent, String, String) {
    let m = b.enrol("manager");
    let (t, id) = b.token(&m, db("users"));
    (m, t, id)
}

#[test]
fn a_token_replayed_from_another_cn_is_refused() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (_, stolen, _) = manager_token(&b);
    let g1 = b.enrol("g1");
    let r = b.delegate(&g1, &stolen, "g2", db("users"));
    assert_eq!(r.status, 403, "{}", r.error_message());
    assert_eq!(code(&r), "token_wrong_holder");
}

#[test]
fn forged_truncated_flipped_reordered_and_oversized_tokens_are_refused() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, good, _) = manager_token(&b);
    assert_eq!(
        b.delegate(&m, &good, "g1", db("users")).status,
        200,
        "the control works"
    );

    // Forged: the right facts, signed by another root key.
    let forged = manager_db_token(&RootKey::generate(), 1);
    let data = good.trim_end_matches('=');
    let mut flipped = data.as_bytes().to_vec();
    let mid = flipped.len() / 2;
    flipped[mid] = if flipped[mid] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let att1 = token::attenuate(
        &good,
        "check if time($t), $t < 2100-01-01T00:00:00Z;",
        HashMap::new(),
    )
    .unwrap();
    let att2 = token::attenuate(&att1, "check if req(\"db\", \"read\");", HashMap::new()).unwrap();
    let reordered = {
        use prost::Message;
        let raw = biscuit_auth::UnverifiedBiscuit::from_base64(&att2)
            .unwrap()
            .to_vec()
            .unwrap();
        let mut msg = biscuit_auth::format::schema::Biscuit::decode(raw.as_slice()).unwrap();
        msg.blocks.swap(0, 1);
        base64_url(&msg.encode_to_vec())
    };
    let mut many = good.clone();
    for _ in 0..token::MAX_BLOCKS {
        many = token::attenuate(&many, "check if true;", HashMap::new()).unwrap();
    }
    let oversized = "A".repeat(token::MAX_TOKEN_CHARS + 1);
    for (what, t, want) in [
        ("forged", forged.as_str(), "token_bad_signature"),
        ("truncated", &data[..data.len() / 2], ""),
        ("bit-flipped", flipped.as_str(), ""),
        (
            "reordered blocks",
            reordered.as_str(),
            "token_bad_signature",
        ),
        ("too many blocks", many.as_str(), "token_too_many_blocks"),
        ("oversized", oversized.as_str(), "token_too_large"),
        (
            "a ticket",
            "lvtk_0000000000000000000000000000000000000000000000000000000000000000",
            "",
        ),
        ("garbage", "hello world", ""),
    ] {
        let r = b.delegate(&m, t, "g1", db("users"));
        assert!(
            r.status == 401 || r.status == 400,
            "{what}: {} {}",
            r.status,
            r.error_message()
        );
        if !want.is_empty() {
            assert_eq!(code(&r), want, "{what}");
        }
    }
    // The refusals never echo the token back.
    let r = b.delegate(&m, &forged, "g1", db("users"));
    assert!(!String::from_utf8_lossy(&r.body).contains(&forged[..40]));
}

#[test]
fn bearer_tokens_come_in_one_authorization_header() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, good, _) = manager_token(&b);
    let body = json!({"to": "g1", "grants": db("users")});
    let auth = format!("Bearer {good}");
    for headers in [
        vec![],
        vec![("authorization", "Basic bWFuYWdlcjp4")],
        vec![
            ("authorization", auth.as_str()),
            ("authorization", auth.as_str()),
        ],
        vec![("x-api-key", good.as_str())],
    ] {
        let r = b.jail(
            &m.tls(),
            Method::POST,
            "/v1/capabilities/delegate",
            &headers,
            Some(body.clone()),
        );
        assert!(
            r.status == 401 || r.status == 400,
            "{headers:?}: {}",
            r.status
        );
    }
}

#[test]
fn expired_tokens_are_dead() {
    let inst = Instance::new(DEFAULT_AGENTS, "  grant_ttl: 2s\n");
    let b = inst.start();
    let (m, t, _) = manager_token(&b);
    std::thread::sleep(Duration::from_millis(3100));
    let r = b.delegate(&m, &t, "g1", db("users"));
    assert_eq!(
        (r.status.as_u16(), code(&r).as_str()),
        (401, "token_expired")
    );
}

#[test]
fn old_and_future_epochs_are_dead() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, old, _) = manager_token(&b);
    let r = b.admin(Method::POST, "/bump-epoch", Some(json!({})));
    assert_eq!(r.json()["epoch"], 2);
    assert_eq!(b.admin(Method::GET, "/epoch", None).json()["epoch"], 2);
    let r = b.delegate(&m, &old, "g1", db("users"));
    assert_eq!(
        (r.status.as_u16(), code(&r).as_str()),
        (401, "token_stale_epoch")
    );
    // A token of a future epoch, signed with the real root key (as if it
    // had leaked), is refused too: the epoch must be equal, not "at least".
    let root = RootKey::from_pem(&state_file(&inst.state_dir(), "root.key")).unwrap();
    let future = manager_db_token(&root, 3);
    let r = b.delegate(&m, &future, "g1", db("users"));
    assert_eq!(
        (r.status.as_u16(), code(&r).as_str()),
        (401, "token_stale_epoch")
    );
    // A fresh token of the new epoch works.
    let (fresh, _) = b.token(&m, db("users"));
    assert_eq!(b.delegate(&m, &fresh, "g1", db("users")).status, 200);
}

#[test]
fn a_revoked_token_is_dead_and_so_is_its_holder_once_revoked() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, t, id) = manager_token(&b);
    let (t2, _) = b.token(&m, db("users"));
    let r = b.admin(Method::POST, "/revoke", Some(json!({"token_id": id})));
    assert_eq!(r.status, 200);
    let r = b.delegate(&m, &t, "g1", db("users"));
    assert_eq!(
        (r.status.as_u16(), code(&r).as_str()),
        (401, "token_revoked")
    );
    // Another token of the same holder still works...
    assert_eq!(b.delegate(&m, &t2, "g1", db("users")).status, 200);
    // ...until the holder is revoked.
    b.admin(
        Method::POST,
        "/revoke",
        Some(json!({"identity": "manager"})),
    );
    let r = b.delegate(&m, &t2, "g1", db("users"));
    assert_eq!(r.status, 403);
    for bad in [
        json!({"token_id": "xyz"}),
        json!({}),
        json!({"identity": "a", "token_id": "00"}),
        json!({"identity": "Bad Name"}),
    ] {
        assert_eq!(
            b.admin(Method::POST, "/revoke", Some(bad.clone())).status,
            400,
            "{bad}"
        );
    }
}

#[test]
fn an_offline_attenuation_cannot_add_rights_or_change_the_holder() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, t, _) = manager_token(&b);
    let g1 = b.enrol("g1");
    // Facts appended offline (or a rule deriving them) are refused as a
    // whole before any of it runs, whatever they claim: orders, llm, the
    // holder, and even what the token really grants.
    let llm = json!([{"tool": "llm", "op": "generate"}]);
    for block in [
        "right(\"db\", \"read\"); pin(\"db\", \"read\", \"table\", \"orders\"); right(\"llm\", \"generate\"); holder(\"g1\");",
        "right(\"llm\", \"generate\") <- holder($h);",
    ] {
        let widened = token::attenuate(&t, block, HashMap::new()).unwrap();
        for (who, to, grants) in [
            (&m, "g1", db("orders")),
            (&m, "g1", llm.clone()),
            (&g1, "g2", db("users")),
            (&m, "g1", db("users")),
        ] {
            let r = b.delegate(who, &widened, to, grants);
            assert_eq!(r.status, 401, "{block}: {}", r.error_message());
            assert_eq!(code(&r), "token_too_complex", "{block}");
        }
    }
    // The token itself still delegates what it grants.
    assert_eq!(b.delegate(&m, &t, "g1", db("users")).status, 200);
}

#[test]
fn a_holder_block_built_to_exhaust_the_broker_is_refused_at_once() {
    // Biscuit checks its own limits only between evaluation steps: one
    // self-join of a hundred facts, or a join of the token's pins with
    // themselves, is a single step of hours. The broker refuses such a
    // block before evaluating any of it, and stays responsive.
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, t, _) = manager_token(&b);
    let facts: String = (0..100).map(|i| format!("f({i}); ")).collect();
    for block in [
        format!("{facts}g($a, $b, $c, $d) <- f($a), f($b), f($c), f($d);"),
        "check if pin($a, $b, $c, $d), pin($e, $f, $g, $h), pin($i, $j, $k, $l), pin($n, $o, $p, $q), pin($r, $s, $u, $v);".to_owned(),
    ] {
        let hostile = token::attenuate(&t, &block, HashMap::new()).unwrap();
        let start = std::time::Instant::now();
        let r = b.delegate(&m, &hostile, "g1", db("users"));
        assert_eq!(code(&r), "token_too_complex", "{}", r.error_message());
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
        assert_eq!(b.admin(Method::GET, "/healthz", None).status, 200);
    }
}

#[test]
fn delegation_within_config_and_never_wider() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, t, parent_id) = manager_token(&b);
    // Within config: manager -> g1, db/read pinned to users.
    let r = b.delegate(&m, &t, "g1", db("users"));
    assert_eq!(r.status, 200, "{}", r.error_message());
    let child = r.json();
    assert_eq!(child["to"], "g1");
    let root = RootKey::from_pem(&state_file(&inst.state_dir(), "root.key")).unwrap();
    let v = token::verify(&root.public(), child["token"].as_str().unwrap()).unwrap();
    assert_eq!(
        (v.holder.as_str(), v.delegated_by.as_deref()),
        ("g1", Some("manager"))
    );
    assert_eq!(v.ancestors[0].as_str(), parent_id);
    let parent = token::verify(&root.public(), &t).unwrap();
    assert!(
        v.expires_at <= parent.expires_at,
        "the child outlives its parent"
    );

    // To an agent not in `to`: db/read may go to g1 only.
    let r = b.delegate(&m, &t, "g2", db("users"));
    assert_eq!(r.status, 403);
    assert!(
        r.error_message()
            .contains("not in your delegate entries to `g2`"),
        "{}",
        r.error_message()
    );
    // To an unknown agent, and to itself.
    assert_eq!(
        code(&b.delegate(&m, &t, "stranger", db("users"))),
        "unknown_agent"
    );
    assert_eq!(b.delegate(&m, &t, "manager", db("users")).status, 403);
    // Wider than the token: another table, or no pin at all.
    let r = b.delegate(&m, &t, "g1", db("orders"));
    assert_eq!(r.status, 403);
    assert!(r.error_message().contains("wider than the token you hold"));
    let r = b.delegate(&m, &t, "g1", json!([{"tool": "db", "op": "read"}]));
    assert_eq!(r.status, 403);
    // Wider than the delegator's own attenuated token.
    let narrowed =
        token::attenuate(&t, "check if req(\"llm\", \"generate\");", HashMap::new()).unwrap();
    let r = b.delegate(&m, &narrowed, "g1", db("users"));
    assert_eq!(r.status, 403, "{}", r.error_message());
    // An llm token (the manager obtains llm too) may go to g2 as configured.
    let (llm, _) = b.token(&m, json!([{"tool": "llm", "op": "generate"}]));
    assert_eq!(
        b.delegate(&m, &llm, "g2", json!([{"tool": "llm", "op": "generate"}]))
            .status,
        200
    );
}

#[test]
fn a_delegated_token_cannot_be_delegated_again() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, t, _) = manager_token(&b);
    let g1 = b.enrol("g1");
    let child = b.delegate(&m, &t, "g1", db("users")).json();
    // g1 is configured to delegate db/read to g2, but not with a token it
    // was delegated: the chain stops at one hop.
    let r = b.delegate(&g1, child["token"].as_str().unwrap(), "g2", db("users"));
    assert_eq!(r.status, 403, "{}", r.error_message());
    assert_eq!(code(&r), "delegated_token");
    // With its own token, within its own delegate entry, it may.
    let (own, _) = b.token(&g1, db("users"));
    let r = b.delegate(&g1, &own, "g2", db("users"));
    assert_eq!(r.status, 200, "{}", r.error_message());
}

#[test]
fn revoking_the_delegator_kills_the_delegate() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, t, parent_id) = manager_token(&b);
    let g1 = b.enrol("g1");
    let child = b.delegate(&m, &t, "g1", db("users")).json();
    let child_token = child["token"].as_str().unwrap().to_owned();
    // Use the child as g1's bearer: refused for config reasons only, which
    // proves it verifies (contrast with after the revocation).
    let before = b.delegate(&g1, &child_token, "g2", db("users"));
    assert_eq!(code(&before), "delegated_token");
    let r = b.admin(
        Method::POST,
        "/revoke",
        Some(json!({"token_id": parent_id})),
    );
    assert_eq!(r.status, 200);
    let tokens = r.json()["revoked"]["tokens"].as_array().unwrap().clone();
    assert!(tokens.contains(&json!(child["token_id"])), "{tokens:?}");
    let after = b.delegate(&g1, &child_token, "g2", db("users"));
    assert_eq!(
        (after.status.as_u16(), code(&after).as_str()),
        (401, "token_revoked")
    );
    let state = state_file(&inst.state_dir(), "state.json");
    assert!(state.contains(child["token_id"].as_str().unwrap()));
}

#[test]
fn revoking_an_attenuated_copys_own_block_kills_its_delegate_and_spares_the_original() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, t, _) = manager_token(&b);
    let g1 = b.enrol("g1");
    let att = token::attenuate(&t, "check if req(\"db\", \"read\");", HashMap::new()).unwrap();
    let child = b.delegate(&m, &att, "g1", db("users")).json();
    let child_token = child["token"].as_str().unwrap().to_owned();
    assert_eq!(
        code(&b.delegate(&g1, &child_token, "g2", db("users"))),
        "delegated_token"
    );
    // The id of the block the holder appended (not the token's own id).
    let root = RootKey::from_pem(&state_file(&inst.state_dir(), "root.key")).unwrap();
    let appended = token::verify(&root.public(), &att).unwrap().block_ids[1].to_string();
    let r = b.admin(Method::POST, "/revoke", Some(json!({"token_id": appended})));
    assert_eq!(r.status, 200);
    let tokens = r.json()["revoked"]["tokens"].as_array().unwrap().clone();
    assert!(tokens.contains(&json!(child["token_id"])), "{tokens:?}");
    for (who, bearer) in [(&g1, &child_token), (&m, &att)] {
        let r = b.delegate(who, bearer, "g2", db("users"));
        assert_eq!(
            (r.status.as_u16(), code(&r).as_str()),
            (401, "token_revoked")
        );
    }
    // The token as minted, without that block, is untouched.
    assert_eq!(b.delegate(&m, &t, "g1", db("users")).status, 200);
}

#[test]
fn a_holder_narrowing_time_bounds_the_delegate() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, t, _) = manager_token(&b);
    let mut p = HashMap::new();
    p.insert(
        "until".to_owned(),
        DatalogTerm::from(SystemTime::now() + Duration::from_secs(60)),
    );
    let narrowed = token::attenuate(&t, "check if time($t), $t < {until};", p).unwrap();
    let r = b.delegate(&m, &narrowed, "g1", db("users"));
    assert_eq!(r.status, 200, "{}", r.error_message());
    let exp =
        lever_policy::timefmt::parse_rfc3339(r.json()["expires_at"].as_str().unwrap()).unwrap();
    assert!(
        exp <= SystemTime::now() + Duration::from_secs(61),
        "the child outlives the holder's own bound"
    );
}

fn base64_url(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            s.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    while !s.len().is_multiple_of(4) {
        s.push('=');
    }
    s
}

#[test]
fn revoking_the_delegators_identity_kills_what_it_delegated() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, t, _) = manager_token(&b);
    let g1 = b.enrol("g1");
    let child = b.delegate(&m, &t, "g1", db("users")).json();
    let child_token = child["token"].as_str().unwrap().to_owned();
    assert_eq!(
        code(&b.delegate(&g1, &child_token, "g2", db("users"))),
        "delegated_token",
        "the control verifies"
    );
    b.admin(
        Method::POST,
        "/revoke",
        Some(json!({"identity": "manager"})),
    );
    let r = b.delegate(&g1, &child_token, "g2", db("users"));
    assert_eq!(
        (r.status.as_u16(), code(&r).as_str()),
        (401, "token_revoked")
    );
}

#[test]
fn no_delegation_to_a_revoked_identity() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, t, _) = manager_token(&b);
    b.admin(Method::POST, "/revoke", Some(json!({"identity": "g1"})));
    let r = b.delegate(&m, &t, "g1", db("users"));
    assert_eq!(
        (r.status.as_u16(), code(&r).as_str()),
        (403, "identity_revoked")
    );
}

#[test]
fn a_delegate_is_bound_by_the_delegators_own_checks() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, t, _) = manager_token(&b);
    let att = token::attenuate(
        &t,
        "reject if args($m), $m.get(\"filter\") == \"evil\";",
        HashMap::new(),
    )
    .unwrap();
    let r = b.delegate(&m, &att, "g1", db("users"));
    assert_eq!(r.status, 200, "{}", r.error_message());
    let root = RootKey::from_pem(&state_file(&inst.state_dir(), "root.key")).unwrap();
    let v = token::verify(&root.public(), r.json()["token"].as_str().unwrap()).unwrap();
    let args = |f: &str| -> std::collections::BTreeMap<String, String> {
        [
            ("table".to_owned(), "users".to_owned()),
            ("filter".to_owned(), f.to_owned()),
        ]
        .into()
    };
    let epoch = b.admin(Method::GET, "/epoch", None).json()["epoch"]
        .as_u64()
        .unwrap();
    fn req(a: &std::collections::BTreeMap<String, String>, epoch: u64) -> token::Request<'_> {
        token::Request {
            peer: "g1",
            now: SystemTime::now(),
            epoch,
            tool: "db",
            op: "read",
            args: a,
        }
    }
    assert!(v.authorize(&req(&args("fine"), epoch)).is_ok());
    assert_eq!(
        v.authorize(&req(&args("evil"), epoch)),
        Err(token::Denial::AttenuationCheck)
    );
}

#[test]
fn tokens_and_tickets_are_not_interchangeable() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (_, t, _) = manager_token(&b);
    let (ticket, ca) = b.register("g1");
    // A token where a ticket goes.
    let (r, _) = b.redeem(&t, &ca);
    assert_eq!(r.status, 403);
    // A ticket where a token goes.
    let m = b.enrol("manager");
    let r = b.delegate(&m, &ticket, "g1", db("users"));
    assert_eq!(r.status, 401);
    // The ticket still works for what it is for.
    assert_eq!(b.redeem(&ticket, &ca).0.status, 200);
}

/// Minting, delegation, renewal and provisioning share one lane per
/// agent (`broker.rate_limits.control`): past its rate, or with too many
/// of them in flight, an agent is refused with a 429 and `retry-after`
/// before its body is read; another agent keeps its own allowance.
#[test]
fn control_requests_are_limited_per_agent_before_their_bodies_are_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let inst = Instance::new(
        DEFAULT_AGENTS,
        "  rate_limits: {control: {per_minute: 1, burst: 3, max_concurrent: 1}}\n",
    );
    let b = inst.start();
    let g1 = b.enrol("g1");
    let g2 = b.enrol("g2");
    let serial = || {
        let state: serde_json::Value =
            serde_json::from_str(&state_file(&inst.state_dir(), "state.json")).unwrap();
        state["serial"].as_u64().unwrap()
    };
    let enrolled = serial();
    let llm = || json!([{"tool": "llm", "op": "generate"}]);
    // A request whose head is sent and whose body never comes.
    let half = |path: &str| {
        let (tls, port) = (g1.tls(), inst.jail_port);
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
        );
        b.rt.block_on(async move {
            let mut s = lever_tests::broker::connect_jail(&tls, port).await;
            s.write_all(head.as_bytes()).await.unwrap();
            s
        })
    };
    let answer = |s: &mut (dyn tokio::io::AsyncRead + Unpin + Send)| {
        b.rt.block_on(async {
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("no answer within 5 s: the broker waited for the body")
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
    };

    // g1's one slot is held by a renewal whose body is still coming.
    let held = half("/v1/renew");
    std::thread::sleep(Duration::from_millis(300));
    let r = b.obtain(&g1, llm());
    assert_eq!(r.status, 429, "{}", r.error_message());
    assert_eq!(code(&r), "rate_limited");
    assert!(
        r.error_message().contains("in flight"),
        "{}",
        r.error_message()
    );
    assert!(r.headers.contains_key("retry-after"));
    // g2 has a lane of its own.
    assert_eq!(b.obtain(&g2, llm()).status, 200);
    // The slot comes back when the held request ends.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    // Two of g1's burst of three are spent (the held renewal, the refused
    // mint): one more passes, then the rate refuses, whatever the route.
    assert_eq!(b.obtain(&g1, llm()).status, 200);
    let r = b.obtain(&g1, llm());
    assert_eq!(r.status, 429);
    assert!(r.error_message().contains("rate"), "{}", r.error_message());
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    let (_, r) = b.renew(&g1, "g1");
    assert_eq!(r.status, 429);
    // Refused before the body: a renewal and a delegation with half a body
    // are answered at once, not after the body deadline.
    for path in ["/v1/renew", "/v1/capabilities/delegate"] {
        let mut s = half(path);
        let text = answer(&mut s);
        assert!(text.starts_with("HTTP/1.1 429"), "{path}: {text}");
    }
    // No refused renewal took a certificate serial.
    assert_eq!(serial(), enrolled);
    // Provisioning and dispatch are in the lane too (the manager's own).
    let manager = b.enrol("manager");
    for _ in 0..3 {
        assert_eq!(b.provision(&manager, "g2").status, 200);
    }
    let r = b.provision(&manager, "g2");
    assert_eq!(r.status, 429, "{}", r.error_message());
    let r = b.jail(
        &manager.tls(),
        Method::POST,
        "/v1/agents/g1/start",
        &[],
        None,
    );
    assert_eq!(r.status, 429, "{}", r.error_message());
    // Refusals are audited and counted by lane (g1's five, the manager's two).
    let denials = || {
        inst.audit_records()
            .into_iter()
            .filter(|r| r["identity"] == "g1" && r["reason"] == "rate_limited")
            .count()
    };
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while denials() < 5 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(denials(), 5, "{:?}", inst.audit_records());
    let m = b.admin(Method::GET, "/metrics", None);
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("lever_rate_limited_total{lane=\"control\"} 7"),
        "{text}"
    );
}

/// `GET /llm/v1/models` with each of `tokens`, one after the other on one
/// kept-alive connection as `tls`: each answer's status and head.
fn get_models_with(
    b: &Broker,
    port: u16,
    tls: &ClientTls,
    tokens: &[String],
) -> Vec<(u16, String)> {
    b.rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = connect_jail(tls, port).await;
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for t in tokens {
            let req =
                format!("GET /llm/v1/models HTTP/1.1\r\nHost: localhost\r\nx-api-key: {t}\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            // The head, then as much body as it announces.
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the connection closed");
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the connection closed");
                buf.extend_from_slice(&chunk[..n]);
            }
            let status = head[9..12].parse().unwrap();
            out.push((status, head));
            buf.drain(..end + len);
        }
        out
    })
}

#[test]
fn new_tokens_verified_per_agent_are_limited_and_tokens_already_verified_still_work() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let b = inst.start();
    let (m, good, _) = manager_token(&b);
    let tls = m.tls();
    // Verified (and cached) before the flood: refused (it grants no
    // `llm`), but not for want of verification.
    let once = |agent: &lever_tests::broker::Agent, t: &str| {
        get_models_with(&b, inst.jail_port, &agent.tls(), &[t.to_owned()])[0].0
    };
    assert_eq!(once(&m, &good), 403);
    // Tokens the agent attenuates itself: valid, and each new to the
    // broker, so each would cost a full verification.
    let n = 600;
    let fresh: Vec<String> = (0..n)
        .map(|_| token::attenuate(&good, "check if true;", HashMap::new()).unwrap())
        .collect();
    let started = std::time::Instant::now();
    let replies = get_models_with(&b, inst.jail_port, &tls, &fresh);
    let took = started.elapsed().as_secs_f64().ceil() as usize;
    let limited: Vec<_> = replies.iter().filter(|(s, _)| *s == 429).collect();
    let verified = n - limited.len();
    // The burst, and 16 a second more while the flood lasted.
    assert!(
        (256..=256 + 16 * took + 1).contains(&verified),
        "{verified} of {n} new tokens verified in {took} s"
    );
    assert!(replies.iter().all(|(s, _)| *s == 403 || *s == 429));
    assert!(
        limited
            .iter()
            .all(|(_, head)| head.contains("retry-after:"))
    );
    // What the agent already holds, verified before, still works; so do
    // another agent's new tokens.
    assert_eq!(once(&m, &good), 403);
    let g1 = b.enrol("g1");
    let (t1, _) = b.token(&g1, db("users"));
    assert_eq!(once(&g1, &t1), 403);
    // The refusals' records name the limit that refused them.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !inst.audit_records().iter().any(|r| {
        r["event"] == "llm" && r["reason"] == "rate_limited" && r["detail"]["lane"] == "verify"
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "no llm record of a refusal in the verify lane"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = b.admin(Method::GET, "/metrics", None);
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(&format!(
            "lever_rate_limited_total{{lane=\"verify\"}} {}",
            limited.len()
        )),
        "{text}"
    );
}

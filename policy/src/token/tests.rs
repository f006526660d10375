//! Adversarial tests of the token core: every guarantee of DESIGN.md §6
//! that can be judged without a socket, each with an attempt to break it.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use biscuit_auth::format::schema;
use prost::Message;

use super::*;

const EPOCH: u64 = 3;

fn grant(tool: &str, op: &str, pins: &[(&str, &str)]) -> Grant {
    Grant {
        tool: tool.into(),
        op: op.into(),
        constraints: pins
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn mint_for(root: &RootKey, holder: &str, grants: &[Grant], ttl: Duration) -> Minted {
    mint(
        root,
        &Mint {
            holder,
            grants,
            epoch: EPOCH,
            expires_at: SystemTime::now() + ttl,
            delegation: None,
            inherit_checks: &[],
        },
    )
    .unwrap()
}

fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn judge(
    root: &RootKey,
    token: &str,
    peer: &str,
    tool: &str,
    op: &str,
    a: &[(&str, &str)],
) -> Result<(), Denial> {
    let v = verify(&root.public(), token)?;
    let a = args(a);
    v.authorize_all(
        &Request {
            peer,
            now: SystemTime::now(),
            epoch: EPOCH,
            tool,
            op,
            args: &a,
        },
        |_| false,
    )
}

fn db_token(root: &RootKey) -> Minted {
    mint_for(
        root,
        "grove-a",
        &[
            grant("db", "read", &[("table", "users")]),
            grant("llm", "generate", &[]),
        ],
        Duration::from_secs(600),
    )
}

#[test]
fn a_token_grants_exactly_what_it_names() {
    let root = RootKey::generate();
    let t = db_token(&root).token;
    assert_eq!(
        judge(&root, &t, "grove-a", "db", "read", &[("table", "users")]),
        Ok(())
    );
    assert_eq!(
        judge(
            &root,
            &t,
            "grove-a",
            "db",
            "read",
            &[("table", "users"), ("filter", "x")]
        ),
        Ok(())
    );
    assert_eq!(judge(&root, &t, "grove-a", "llm", "generate", &[]), Ok(()));
    assert_eq!(
        judge(&root, &t, "grove-a", "db", "write", &[("table", "users")]),
        Err(Denial::NotGranted)
    );
    assert_eq!(
        judge(&root, &t, "grove-a", "fs", "read", &[]),
        Err(Denial::NotGranted)
    );
}

#[test]
fn pinned_constraints_must_match_exactly() {
    let root = RootKey::generate();
    let t = db_token(&root).token;
    for bad in [
        &[("table", "orders")][..],
        &[],                   // missing
        &[("Table", "users")], // another key
        &[("table", "Users")], // look-alike
        &[("table", "users ")],
        &[("table", "users\u{0}")],
        &[("table", "")],
    ] {
        assert_eq!(
            judge(&root, &t, "grove-a", "db", "read", bad),
            Err(Denial::ConstraintMismatch),
            "{bad:?}"
        );
    }
    // An over-long value is refused outright, never truncated.
    let long = "u".repeat(MAX_ARG_LEN + 1);
    let root2 = RootKey::generate();
    let t2 = mint_for(
        &root2,
        "g",
        &[grant("db", "read", &[("table", &long)])],
        Duration::from_secs(60),
    )
    .token;
    assert_eq!(
        judge(&root2, &t2, "g", "db", "read", &[("table", &long)]),
        Err(Denial::RequestTooLarge)
    );
}

#[test]
fn a_token_is_bound_to_its_holder() {
    let root = RootKey::generate();
    let t = db_token(&root).token;
    assert_eq!(
        judge(&root, &t, "grove-b", "db", "read", &[("table", "users")]),
        Err(Denial::WrongHolder)
    );
    assert_eq!(
        judge(&root, &t, "", "db", "read", &[("table", "users")]),
        Err(Denial::WrongHolder)
    );
}

#[test]
fn epochs_other_than_the_current_are_dead() {
    let root = RootKey::generate();
    let t = db_token(&root).token;
    let v = verify(&root.public(), &t).unwrap();
    let a = args(&[("table", "users")]);
    for epoch in [EPOCH - 1, EPOCH + 1] {
        let r = Request {
            peer: "grove-a",
            now: SystemTime::now(),
            epoch,
            tool: "db",
            op: "read",
            args: &a,
        };
        assert_eq!(v.authorize_all(&r, |_| false), Err(Denial::StaleEpoch));
        // And Datalog agrees on its own, should the Rust check ever go.
        assert_eq!(v.authorize(&r), Err(Denial::StaleEpoch));
    }
}

#[test]
fn expired_tokens_are_dead_in_rust_and_in_datalog() {
    let root = RootKey::generate();
    let t = mint_for(
        &root,
        "g",
        &[grant("llm", "generate", &[])],
        Duration::from_secs(2),
    );
    let v = verify(&root.public(), &t.token).unwrap();
    let a = args(&[]);
    let later = SystemTime::now() + Duration::from_secs(5);
    let r = Request {
        peer: "g",
        now: later,
        epoch: EPOCH,
        tool: "llm",
        op: "generate",
        args: &a,
    };
    assert_eq!(v.authorize_all(&r, |_| false), Err(Denial::Expired));
    assert_eq!(v.authorize(&r), Err(Denial::Expired));
    assert_eq!(v.expires_at, t.expires_at);
}

#[test]
fn revocation_of_any_block_or_ancestor_kills_the_token() {
    let root = RootKey::generate();
    let m = db_token(&root);
    let att = attenuate(&m.token, "check if req(\"db\", \"read\");", HashMap::new()).unwrap();
    let v = verify(&root.public(), &att).unwrap();
    assert_eq!(v.block_ids.len(), 2);
    assert_eq!(
        v.token_id, m.token_id,
        "the token id is the authority block's"
    );
    let a = args(&[("table", "users")]);
    let r = Request {
        peer: "grove-a",
        now: SystemTime::now(),
        epoch: EPOCH,
        tool: "db",
        op: "read",
        args: &a,
    };
    assert_eq!(v.authorize_all(&r, |_| false), Ok(()));
    for id in &v.block_ids {
        assert_eq!(v.authorize_all(&r, |x| x == id), Err(Denial::Revoked));
    }
}

#[test]
fn forged_tokens_are_refused() {
    let root = RootKey::generate();
    let other = RootKey::generate();
    let forged = db_token(&other).token;
    assert_eq!(
        verify(&root.public(), &forged).err(),
        Some(Denial::BadSignature)
    );
}

#[test]
fn truncated_and_bit_flipped_tokens_are_refused() {
    let root = RootKey::generate();
    let t = db_token(&root).token;
    // (Dropping only `=` padding keeps the same bytes, so cut the data.)
    let data = t.trim_end_matches('=');
    for cut in [1, 10, data.len() / 2, data.len() - 2] {
        let r = verify(&root.public(), &data[..cut]);
        assert!(r.is_err(), "truncated to {cut}");
    }
    let bytes = biscuit_auth::UnverifiedBiscuit::from_base64(&t)
        .unwrap()
        .to_vec()
        .unwrap();
    // Flip one bit in every byte position in turn (bounded: ~400 tries).
    let mut accepted = 0;
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        let s = base64_url(&b);
        if let Ok(v) = verify(&root.public(), &s) {
            // A flip in an unsigned field could survive parsing only if the
            // authority content is unchanged; it must never change a fact.
            assert_eq!(v.holder, "grove-a");
            assert_eq!(v.grants.len(), 2);
            accepted += 1;
        }
    }
    assert!(accepted <= 2, "{accepted} bit flips were accepted");
}

#[test]
fn reordered_blocks_are_refused() {
    let root = RootKey::generate();
    let t = db_token(&root).token;
    let t = attenuate(
        &t,
        "check if time($t), $t < 2100-01-01T00:00:00Z;",
        HashMap::new(),
    )
    .unwrap();
    let t = attenuate(&t, "check if req(\"db\", \"read\");", HashMap::new()).unwrap();
    let bytes = biscuit_auth::UnverifiedBiscuit::from_base64(&t)
        .unwrap()
        .to_vec()
        .unwrap();
    let mut msg = schema::Biscuit::decode(bytes.as_slice()).unwrap();
    assert_eq!(msg.blocks.len(), 2);
    msg.blocks.swap(0, 1);
    let swapped = base64_url(&msg.encode_to_vec());
    assert_eq!(
        verify(&root.public(), &swapped).err(),
        Some(Denial::BadSignature)
    );
    // Dropping a block (to shed a holder's restriction) fails too.
    let mut msg = schema::Biscuit::decode(bytes.as_slice()).unwrap();
    msg.blocks.pop();
    let dropped = base64_url(&msg.encode_to_vec());
    assert!(verify(&root.public(), &dropped).is_err());
}

#[test]
fn oversized_and_overlong_tokens_are_refused_before_parsing() {
    let root = RootKey::generate();
    assert_eq!(
        verify(&root.public(), &"A".repeat(MAX_TOKEN_CHARS + 1)).err(),
        Some(Denial::TooLarge)
    );
    let mut t = db_token(&root).token;
    for _ in 0..MAX_BLOCKS {
        t = attenuate(&t, "check if true;", HashMap::new()).unwrap();
    }
    assert_eq!(
        verify(&root.public(), &t).err(),
        Some(Denial::TooManyBlocks)
    );
    for junk in ["", "not a token!", "eyJhbGciOi.x.y", "lvt1_0000"] {
        assert!(verify(&root.public(), junk).is_err(), "{junk}");
    }
}

#[test]
fn an_attenuation_cannot_add_rights_or_change_the_holder() {
    let root = RootKey::generate();
    let t = db_token(&root).token;
    // Facts (or a rule deriving them) appended by a holder: refused as a
    // whole, before any of it is evaluated, whatever they claim.
    for block in [
        "right(\"db\", \"write\"); right(\"fs\", \"read\"); holder(\"grove-b\"); pin(\"db\", \"read\", \"table\", \"orders\"); epoch(9);",
        "right(\"db\", \"write\") <- req($t, $o);",
    ] {
        let widened = attenuate(&t, block, HashMap::new()).unwrap();
        assert_eq!(
            verify(&root.public(), &widened).err(),
            Some(Denial::TooComplex),
            "{block}"
        );
        for (peer, op, table) in [
            ("grove-a", "write", "users"),
            ("grove-b", "read", "users"),
            ("grove-a", "read", "orders"),
            ("grove-a", "read", "users"),
        ] {
            assert_eq!(
                judge(&root, &widened, peer, "db", op, &[("table", table)]),
                Err(Denial::TooComplex)
            );
        }
    }
    // The token itself, untouched, still works.
    assert_eq!(
        judge(&root, &t, "grove-a", "db", "read", &[("table", "users")]),
        Ok(())
    );
}

#[test]
fn what_a_holder_may_append_is_bounded_before_it_runs() {
    let root = RootKey::generate();
    let t = mint_for(
        &root,
        "grove-a",
        &[
            grant("db", "read", &[("table", "users")]),
            grant("db", "write", &[("table", "users")]),
        ],
        Duration::from_secs(600),
    )
    .token;
    let appended = |src: &str| attenuate(&t, src, HashMap::new()).unwrap();
    // `&&` and `||` inside a closure are not closures that multiply work.
    let ok = appended(
        "check if [\"a\", \"b\"].any($v -> $v == \"a\" || $v == \"b\" && true); check if \"users\".matches(\"^u\") || false;",
    );
    assert_eq!(
        judge(&root, &ok, "grove-a", "db", "read", &[("table", "users")]),
        Ok(())
    );
    // Checks over the request and the single-valued facts are fine.
    let ok = appended(
        "check if req(\"db\", \"read\"), args($m), $m.get(\"table\") == \"users\"; check if time($t), $t < 2100-01-01T00:00:00Z; reject if peer(\"grove-z\"); check if holder($h), epoch($e), expires($x), current_epoch($e), [\"a\", \"b\"].all($v -> $v.length() == 1);",
    );
    assert_eq!(
        judge(&root, &ok, "grove-a", "db", "read", &[("table", "users")]),
        Ok(())
    );
    let many_queries = "check if true; ".repeat(MAX_HOLDER_QUERIES + 1);
    let many_ops = format!(
        "check if {};",
        ["1 == 1"; MAX_HOLDER_OPS / 3 + 1].join(" && ")
    );
    let many_regexes = format!(
        "check if {};",
        ["\"a\".matches(\"a\")"; MAX_HOLDER_REGEXES + 1].join(" && ")
    );
    let big_set = format!(
        "check if [{}].contains(1);",
        (0..MAX_HOLDER_OPS)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for src in [
        // A regex inside a closure: compiled once per element.
        "check if [1, 2].all($x -> \"a\".matches(\"a\"));",
        // A literal set counts its elements.
        big_set.as_str(),
        // A join over the token's many-valued facts: the shape of a query
        // that runs for hours (each pin matched against every other).
        "check if pin($a, $b, $c, $d), pin($e, $f, $g, $h), right($i, $j), right($k, $l);",
        "check if ancestor($a);",
        // A fact of the block's own, and a rule.
        "f(1); check if f(1);",
        "g($a) <- req($a, $b); check if g(\"db\");",
        // A closure inside a closure (sets of sets of work).
        "check if [1, 2].all($x -> [3, 4].all($y -> $x != $y));",
        many_queries.as_str(),
        many_ops.as_str(),
        many_regexes.as_str(),
    ] {
        let start = std::time::Instant::now();
        let refused = appended(src);
        assert_eq!(
            judge(
                &root,
                &refused,
                "grove-a",
                "db",
                "read",
                &[("table", "users")]
            ),
            Err(Denial::TooComplex),
            "{src}"
        );
        assert!(start.elapsed() < Duration::from_secs(1), "{src}");
    }
    // Each limit is a limit, not an off-by-one: exactly at it is fine.
    let at_limit = "check if true; ".repeat(MAX_HOLDER_QUERIES);
    assert_eq!(
        judge(
            &root,
            &appended(&at_limit),
            "grove-a",
            "db",
            "read",
            &[("table", "users")]
        ),
        Ok(())
    );
}

#[test]
fn an_attenuation_can_narrow() {
    let root = RootKey::generate();
    let t = db_token(&root).token;
    let mut p = HashMap::new();
    p.insert("f".to_owned(), DatalogTerm::Str("id = 1".into()));
    let narrowed = attenuate(
        &t,
        "check if req(\"db\", \"read\"), args($m), $m.get(\"filter\") == {f};",
        p,
    )
    .unwrap();
    assert_eq!(
        judge(
            &root,
            &narrowed,
            "grove-a",
            "db",
            "read",
            &[("table", "users"), ("filter", "id = 1")]
        ),
        Ok(())
    );
    assert_eq!(
        judge(
            &root,
            &narrowed,
            "grove-a",
            "db",
            "read",
            &[("table", "users"), ("filter", "1 = 1")]
        ),
        Err(Denial::AttenuationCheck)
    );
    assert_eq!(
        judge(&root, &narrowed, "grove-a", "llm", "generate", &[]),
        Err(Denial::AttenuationCheck)
    );
}

#[test]
fn delegation_is_proven_no_wider_than_the_parent() {
    let root = RootKey::generate();
    let parent = db_token(&root);
    let v = verify(&root.public(), &parent.token).unwrap();
    let now = SystemTime::now();
    let want = now + Duration::from_secs(3600);
    // Within: same pin.
    let exp = v
        .prove_covers(
            "grove-a",
            &[grant("db", "read", &[("table", "users")])],
            now,
            EPOCH,
            want,
        )
        .unwrap();
    assert!(exp <= v.expires_at, "never outlives the parent");
    // Within, narrower: an extra pin.
    assert!(
        v.prove_covers(
            "grove-a",
            &[grant("db", "read", &[("table", "users"), ("filter", "x")])],
            now,
            EPOCH,
            want
        )
        .is_ok()
    );
    // Wider: the pin dropped, another value, another op, another tool.
    for g in [
        grant("db", "read", &[]),
        grant("db", "read", &[("table", "orders")]),
        grant("db", "write", &[("table", "users")]),
        grant("fs", "read", &[]),
    ] {
        assert!(
            v.prove_covers("grove-a", std::slice::from_ref(&g), now, EPOCH, want)
                .is_err(),
            "{g:?}"
        );
    }
    // Only the holder can delegate it.
    assert_eq!(
        v.prove_covers(
            "grove-b",
            &[grant("llm", "generate", &[])],
            now,
            EPOCH,
            want
        )
        .err(),
        Some(Denial::WrongHolder)
    );
}

#[test]
fn delegation_honours_the_parents_own_attenuations() {
    let root = RootKey::generate();
    let parent = db_token(&root);
    let mut p = HashMap::new();
    p.insert(
        "until".to_owned(),
        DatalogTerm::from(SystemTime::now() + Duration::from_secs(120)),
    );
    let att = attenuate(
        &parent.token,
        "check if req(\"db\", \"read\"); check if time($t), $t < {until};",
        p,
    )
    .unwrap();
    let v = verify(&root.public(), &att).unwrap();
    let now = SystemTime::now();
    // The holder narrowed its token to db/read: llm is no longer delegable.
    assert_eq!(
        v.prove_covers(
            "grove-a",
            &[grant("llm", "generate", &[])],
            now,
            EPOCH,
            now + Duration::from_secs(600)
        )
        .err(),
        Some(Denial::AttenuationCheck)
    );
    // And the child cannot outlive the holder's own time bound.
    let exp = v
        .prove_covers(
            "grove-a",
            &[grant("db", "read", &[("table", "users")])],
            now,
            EPOCH,
            now + Duration::from_secs(600),
        )
        .unwrap();
    let bound = now + Duration::from_secs(120);
    assert!(
        exp <= bound && exp + Duration::from_secs(3) >= bound,
        "clamped to the holder's bound"
    );
}

#[test]
fn delegated_tokens_carry_their_chain_and_cannot_be_delegated_again() {
    let root = RootKey::generate();
    let parent = db_token(&root);
    let chain = [parent.token_id.clone()];
    let child = mint(
        &root,
        &Mint {
            holder: "grove-b",
            grants: &[grant("db", "read", &[("table", "users")])],
            epoch: EPOCH,
            expires_at: SystemTime::now() + Duration::from_secs(60),
            delegation: Some(("grove-a", &chain)),
            inherit_checks: &[],
        },
    )
    .unwrap();
    let v = verify(&root.public(), &child.token).unwrap();
    assert_eq!(v.delegated_by.as_deref(), Some("grove-a"));
    assert_eq!(v.ancestors, chain);
    let a = args(&[("table", "users")]);
    let r = Request {
        peer: "grove-b",
        now: SystemTime::now(),
        epoch: EPOCH,
        tool: "db",
        op: "read",
        args: &a,
    };
    assert_eq!(v.authorize_all(&r, |_| false), Ok(()));
    // Revoking the parent kills the child.
    assert_eq!(
        v.authorize_all(&r, |id| *id == parent.token_id),
        Err(Denial::Revoked)
    );
    assert_eq!(
        v.prove_covers(
            "grove-b",
            &[grant("db", "read", &[("table", "users")])],
            SystemTime::now(),
            EPOCH,
            SystemTime::now() + Duration::from_secs(10)
        )
        .err(),
        Some(Denial::Delegated)
    );
}

#[test]
fn datalog_injection_through_values_is_inert() {
    let root = RootKey::generate();
    let evil = "users\"); right(\"db\", \"write\"); pin(\"x";
    let t = mint_for(
        &root,
        "g",
        &[grant("db", "read", &[("table", evil)])],
        Duration::from_secs(60),
    )
    .token;
    let v = verify(&root.public(), &t).unwrap();
    assert_eq!(v.grants, vec![grant("db", "read", &[("table", evil)])]);
    assert_eq!(
        judge(&root, &t, "g", "db", "write", &[("table", evil)]),
        Err(Denial::NotGranted)
    );
    assert_eq!(
        judge(&root, &t, "g", "db", "read", &[("table", evil)]),
        Ok(())
    );
    assert_eq!(
        judge(
            &root,
            &t,
            "g\"); holder(\"g",
            "db",
            "read",
            &[("table", evil)]
        ),
        Err(Denial::WrongHolder)
    );
}

#[test]
fn root_keys_round_trip_through_pem() {
    let root = RootKey::generate();
    let pem = root.to_pem().unwrap();
    let again = RootKey::from_pem(&pem).unwrap();
    let t = db_token(&again).token;
    assert!(verify(&root.public(), &t).is_ok());
    assert!(
        RootKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
            .is_err()
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
fn a_delegate_inherits_the_holders_own_checks() {
    let root = RootKey::generate();
    let parent = db_token(&root);
    // A restriction the replay cannot see: `filter` is not pinned.
    let att = attenuate(
        &parent.token,
        "reject if args($m), $m.get(\"filter\") == \"evil\";",
        HashMap::new(),
    )
    .unwrap();
    let v = verify(&root.public(), &att).unwrap();
    let now = SystemTime::now();
    let g = [grant("db", "read", &[("table", "users")])];
    let exp = v
        .prove_covers("grove-a", &g, now, EPOCH, now + Duration::from_secs(60))
        .unwrap();
    let checks = v.holder_checks().unwrap();
    assert_eq!(checks.len(), 1);
    let chain = v.block_ids.clone();
    let child = mint(
        &root,
        &Mint {
            holder: "grove-b",
            grants: &g,
            epoch: EPOCH,
            expires_at: exp,
            delegation: Some(("grove-a", &chain)),
            inherit_checks: &checks,
        },
    )
    .unwrap();
    assert_eq!(
        judge(
            &root,
            &child.token,
            "grove-b",
            "db",
            "read",
            &[("table", "users")]
        ),
        Ok(())
    );
    assert_eq!(
        judge(
            &root,
            &child.token,
            "grove-b",
            "db",
            "read",
            &[("table", "users"), ("filter", "evil")]
        ),
        Err(Denial::AttenuationCheck),
        "the delegate escaped its delegator's restriction"
    );
    // A parent whose appended block carries facts is refused outright, so
    // there is nothing to delegate from it (its facts could not be carried).
    let widened = attenuate(&parent.token, "right(\"db\", \"write\");", HashMap::new()).unwrap();
    assert_eq!(
        verify(&root.public(), &widened).err(),
        Some(Denial::TooComplex)
    );
}

/// `token` with `block` appended, built directly (not from source).
fn append_built(token: &str, block: biscuit_auth::builder::BlockBuilder) -> String {
    UnverifiedBiscuit::from_base64(token)
        .unwrap()
        .append(block)
        .unwrap()
        .to_base64()
        .unwrap()
}

#[test]
fn a_block_is_judged_as_it_runs_not_as_it_prints() {
    use biscuit_auth::builder::{BlockBuilder, CheckKind, check, fact, pred, rule, string, var};
    let root = RootKey::generate();
    let t = db_token(&root).token;
    // Names and strings print unescaped. A fact named to open a comment and
    // a check named to close it print as two harmless checks, with a rule
    // (a self-join) hidden between them; the block really holds a fact and
    // that rule, and is refused.
    let v = [var("a")];
    let hidden = BlockBuilder::new()
        .fact(fact("check if req($a);/*", &[string("x")]))
        .unwrap()
        .rule(rule(
            "g",
            &[var("a"), var("b")],
            &[
                pred("right", &[var("a"), var("x")]),
                pred("right", &[var("b"), var("y")]),
            ],
        ))
        .unwrap()
        .check(check(&[pred("*/check if req", &v)], CheckKind::One))
        .unwrap();
    let hidden = append_built(&t, hidden);
    // What the printout shows: checks only.
    let shown = UnverifiedBiscuit::from_base64(&hidden)
        .unwrap()
        .print_block_source(1)
        .unwrap();
    let reparsed = biscuit_auth::builder::BlockBuilder::new()
        .code(&shown)
        .unwrap();
    assert!(
        reparsed.facts.is_empty() && reparsed.rules.is_empty(),
        "{shown}"
    );
    assert_eq!(
        verify(&root.public(), &hidden).err(),
        Some(Denial::TooComplex)
    );
    // A check over `req` alone, whose string prints as the end of that
    // check and a join over pins: fine as it runs, but what a delegate
    // would inherit (the printout, parsed again) is bounded too, so the
    // delegation is refused rather than handing the child that join.
    let quoted = BlockBuilder::new()
        .check(check(
            &[pred(
                "req",
                &[
                    string("db\"), pin($a, $b, $c, $d), pin($e, $f, $g, $h), req(\"x"),
                    string("read"),
                ],
            )],
            CheckKind::One,
        ))
        .unwrap();
    let quoted = append_built(&t, quoted);
    let v = verify(&root.public(), &quoted).unwrap();
    assert_eq!(v.holder_checks().err(), Some(Denial::TooComplex));
    assert!(v.carries_checks);
    assert!(!verify(&root.public(), &t).unwrap().carries_checks);
}

#[test]
fn too_many_or_too_long_arguments_are_refused_not_dropped() {
    let root = RootKey::generate();
    let t = db_token(&root).token;
    let v = verify(&root.public(), &t).unwrap();
    let mut many: BTreeMap<String, String> = (0..=MAX_ARGS)
        .map(|i| (format!("a{i:03}"), "x".into()))
        .collect();
    many.insert("table".into(), "users".into());
    let r = Request {
        peer: "grove-a",
        now: SystemTime::now(),
        epoch: EPOCH,
        tool: "db",
        op: "read",
        args: &many,
    };
    assert_eq!(v.authorize(&r), Err(Denial::RequestTooLarge));
    let long = args(&[("table", "users"), ("filter", &"f".repeat(MAX_ARG_LEN + 1))]);
    let r = Request {
        peer: "grove-a",
        now: SystemTime::now(),
        epoch: EPOCH,
        tool: "db",
        op: "read",
        args: &long,
    };
    assert_eq!(v.authorize(&r), Err(Denial::RequestTooLarge));
}

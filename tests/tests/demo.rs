//! `lever demo` runs offline and every step behaves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use lever_tests::{TempDir, lever};

#[test]
fn the_demo_runs_offline_end_to_end() {
    let home = TempDir::new("demo");
    let out = lever(&["demo"], home.path(), home.path());
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    for needle in [
        "replaying the ticket: 403",
        "word5",
        "checked: the client never saw the key; the upstream saw the key and never the token",
        "401 {\"error\":",
        "authentication_error",
        "tools db_read",
        "grace@example.com",
        "JSON-RPC error -32001: your capability token for db/read pins table=users",
        "db/read {\"table\":\"users\"} ok",
        "deny   constraint_mismatch    db/read {\"table\":\"orders\"}",
        "chain intact",
        "demo complete",
    ] {
        assert!(
            out.stdout.contains(needle),
            "missing {needle:?} in:\n{}",
            out.stdout
        );
    }
    assert!(
        !out.stdout.contains("sk-ant-demo-placeholder"),
        "the demo printed its key"
    );
    // The tool itself saw only the allowed call.
    assert!(
        out.stderr.contains("read table=\"users\""),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("table=\"orders\""), "{}", out.stderr);
}

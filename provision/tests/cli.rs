//! The CLI's own contract: help, usage errors (exit 2), no subcommand.
//!
//! Besides testing that, this file makes `cargo test --workspace` build the
//! `lever` binary before any test runs, which the end-to-end tests in
//! `tests/` drive.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn lever(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lever"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["frobnicate"][..],
        &["validate", "--bogus"],
        &["validate", "-c"],
        &[],
    ] {
        let out = lever(args);
        assert_eq!(out.status.code(), Some(2), "lever {args:?}: {out:?}");
    }
}

#[test]
fn bad_argument_values_are_usage_errors_caught_before_any_work() {
    // Each value is refused by the argument's own check (exit 2, naming
    // the argument), not after files are read or a connection is tried.
    let dir = std::env::temp_dir().join(format!("lever-cli-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    for (args, says) in [
        (
            &["agent", "--dir", d, "gateway", "--listen", "0.0.0.0:18462"][..],
            "loopback",
        ),
        (
            &["agent", "--dir", d, "gateway", "--listen", "nonsense"],
            "IP:PORT",
        ),
        (
            &[
                "agent",
                "--dir",
                d,
                "enrol",
                "--broker",
                "http://127.0.0.1:1",
                "--ticket",
                "t",
                "--ca",
                "ca.pem",
            ],
            "https://",
        ),
        (
            &["agent", "--dir", d, "token", "--grant", "nogrant"],
            "--grant",
        ),
        (
            &["admin", "--admin", "https://127.0.0.1:1", "epoch"],
            "http://",
        ),
        (&["admin", "--admin", "notaurl", "epoch"], "--admin"),
    ] {
        let out = lever(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "lever {args:?}: {err}");
        assert!(err.contains(says), "lever {args:?}: {err}");
    }
    assert!(!dir.exists(), "a refused command created {}", dir.display());
}

#[test]
fn every_command_has_help_that_teaches() {
    let out = lever(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["validate", "schema", "backends", "never from a parent"] {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
    for cmd in ["validate", "schema", "backends"] {
        let out = lever(&[cmd, "--help"]);
        assert_eq!(out.status.code(), Some(0), "{cmd} --help");
        assert!(!out.stdout.is_empty());
    }
    let v = String::from_utf8_lossy(&lever(&["validate", "--help"]).stdout).into_owned();
    assert!(
        v.contains("FILE:LINE:COL") || v.contains("lever.yaml:12:9"),
        "{v}"
    );
}

//! `lever plan`, `lever apply --dry-run` and `lever doctor` on real configs,
//! and `lever doctor` against a real broker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use lever_tests::broker::{DEFAULT_AGENTS, Instance};
use lever_tests::{TempDir, lever, run, workspace_root};

/// The example is `egress: closed`: sealed before the manager starts.
const STEPS: [&str; 9] = [
    "1. machine up",
    "2. egress",
    "3. broker up",
    "4. guest packages",
    "5. scion",
    "6. images",
    "7. manager bootstrap",
    "8. egress seal",
    "9. manager started",
];

#[test]
fn plan_and_apply_dry_run_print_the_same_ordered_steps() {
    // A copy of the examples with their placeholder secrets (the repo is
    // never touched).
    let dir = TempDir::new("plan");
    let out = run(Command::new("cp")
        .arg("-R")
        .arg(workspace_root().join("examples"))
        .arg(dir.path()));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = run(&mut Command::new(dir.join("examples/setup")));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let full = dir.join("examples/full");
    let home = dir.path().to_path_buf();
    let plan = lever(&["plan"], &full, &home);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    let mut at = 0;
    for s in STEPS {
        let i = plan.stdout[at..]
            .find(s)
            .unwrap_or_else(|| panic!("{s} missing or out of order:\n{}", plan.stdout));
        at += i;
    }
    let dry = lever(&["apply", "--dry-run"], &full, &home);
    assert_eq!(dry.code, 0);
    assert_eq!(dry.stdout, plan.stdout);
    // Running it needs the backend's tools: without OrbStack it stops at
    // the first step, naming what is missing.
    let run = lever(&["apply"], &full, &home);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.stdout.contains("[1/"), "{}", run.stdout);
    assert!(run.stderr.contains("orb"), "{}", run.stderr);
}

#[test]
fn a_qemu_instance_is_brought_up_with_lever_qemu() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    for cmd in ["apply", "up", "down"] {
        let out = lever(&[cmd], inst.dir.path(), inst.dir.path());
        assert_eq!(out.code, 1, "{cmd}: {}", out.stdout);
        assert!(out.stderr.contains("lever qemu"), "{cmd}: {}", out.stderr);
    }
}

#[test]
fn doctor_checks_the_backend_tools_and_the_broker() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    // Without a broker: a failure naming it.
    let down = lever(&["doctor"], inst.dir.path(), inst.dir.path());
    assert_eq!(down.code, 1, "{}", down.stdout);
    assert!(
        down.stdout.contains("FAIL  broker not answering"),
        "{}",
        down.stdout
    );
    // The instance's backend is qemu: its emulator is checked.
    assert!(
        down.stdout.contains("QEMU emulator version"),
        "{}",
        down.stdout
    );
    let _b = inst.start();
    let up = lever(&["doctor"], inst.dir.path(), inst.dir.path());
    assert_eq!(up.code, 0, "{}", up.stdout);
    assert!(up.stdout.contains("ok    broker answers"), "{}", up.stdout);
}

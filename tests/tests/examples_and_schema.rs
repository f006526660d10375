//! The shipped examples, the seed's configs verbatim, the JSON Schema, the
//! no-walk-up rule and the backend matrix, through the real `lever` binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use lever_tests::{Output, ProblemLine, TempDir, errors, lever, problems, run, workspace_root};

/// Copies `examples/` into a temp dir and runs its setup script there (it
/// creates the placeholder secrets 0600), so the repo is never touched.
fn examples_copy() -> TempDir {
    let dir = TempDir::new("examples");
    let src = workspace_root().join("examples");
    let out = run(Command::new("cp").arg("-R").arg(&src).arg(dir.path()));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = run(&mut Command::new(dir.join("examples/setup")));
    assert_eq!(out.code, 0, "{}", out.stderr);
    dir
}

#[test]
fn the_three_examples_validate() {
    let dir = examples_copy();
    for ex in ["minimal", "full", "subscription"] {
        let root = dir.join(&format!("examples/{ex}"));
        let out = lever(&["validate"], &root, &dir.join("home"));
        assert_eq!(out.code, 0, "{ex}: {}", out.stderr);
        assert!(
            out.stdout.starts_with("lever.yaml: valid"),
            "{ex}: {}",
            out.stdout
        );
        assert!(
            errors(&out.stderr, "lever.yaml").is_empty(),
            "{ex}: {}",
            out.stderr
        );
    }
}

/// `lever validate` in `dir`: its output and the warnings it gave.
fn validate_warnings(dir: &Path, home: &Path) -> (Output, Vec<ProblemLine>) {
    let out = lever(&["validate"], dir, home);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let warnings = problems(&out.stderr, "lever.yaml")
        .into_iter()
        .filter(|p| p.warning)
        .collect();
    (out, warnings)
}

#[test]
fn the_full_example_warns_that_its_allow_ports_are_ignored_when_closed() {
    let dir = examples_copy();
    let (full, home) = (dir.join("examples/full"), dir.join("home"));
    let (out, warnings) = validate_warnings(&full, &home);
    assert_eq!(warnings.len(), 1, "{}", out.stderr);
    assert_eq!(warnings[0].path, "manager.allow_ports");
    assert!(warnings[0].message.contains("ignored"));
    assert!(
        out.stdout.contains("(ignored: egress is closed)"),
        "{}",
        out.stdout
    );
    // Opened, the same ports are reachable, and one is a tool's backend.
    let yaml = std::fs::read_to_string(full.join("lever.yaml")).unwrap();
    let opened = yaml.replace("egress: closed", "egress: open");
    assert_ne!(yaml, opened);
    std::fs::write(full.join("lever.yaml"), opened).unwrap();
    let (out, warnings) = validate_warnings(&full, &home);
    assert_eq!(warnings.len(), 1, "{}", out.stderr);
    assert_eq!(warnings[0].path, "manager.allow_ports[1]");
    assert!(warnings[0].message.contains("bypassing the broker"));
}

/// The seed's configs exactly as the seed prints them, with `~/` pointing
/// at a temp home holding the files they name.
#[test]
fn the_seed_configs_validate_verbatim() {
    let minimal = "\
name: myapp
backend: orbstack
tree: workspace
manager:
  image: scionlocal/lever-claude:latest
broker:
  api_key_file: ~/.secrets/anthropic-key # required by the default api-key mode
";
    let subscription = "\
name: myapp
backend: orbstack
tree: workspace
broker:
  llm_auth: subscription
manager:
  image: scionlocal/lever-claude:latest
  credential_file: ~/.scion/oauth-token # 0600; projected to the agents
";
    let full = std::fs::read_to_string(workspace_root().join("examples/full/lever.yaml"))
        .unwrap()
        .replace(
            "api_key_file: secrets/anthropic-key",
            "api_key_file: ~/.secrets/anthropic-key",
        );
    for (name, text) in [
        ("minimal", minimal),
        ("subscription", subscription),
        ("full", &full),
    ] {
        let dir = TempDir::new("seed");
        dir.write(".home/.secrets/anthropic-key", "sk-ant-placeholder", 0o600);
        dir.write(".home/.scion/oauth-token", "sk-ant-oat-placeholder", 0o600);
        dir.mkdir("workspace/groves/scratch");
        dir.write("prompt.md", "boot", 0o644);
        dir.write("lever.yaml", text, 0o644);
        let out = lever(&["validate"], dir.path(), &dir.join(".home"));
        assert_eq!(out.code, 0, "{name}: {}", out.stderr);
    }
}

#[test]
fn no_walk_up_a_parent_lever_yaml_is_never_read() {
    let dir = examples_copy();
    let root = dir.join("examples/minimal");
    // From a subdirectory of a valid instance, with no lever.yaml of its own.
    let out = lever(&["validate"], &root.join("workspace"), &dir.join("home"));
    assert_eq!(out.code, 1, "{}", out.stdout);
    let errs = errors(&out.stderr, "lever.yaml");
    assert_eq!(errs.len(), 1, "{}", out.stderr);
    assert!(
        errs[0]
            .message
            .contains("never looks in parent directories"),
        "{}",
        out.stderr
    );
    // An explicit path is fine.
    let out = lever(
        &["validate", "-c", "../lever.yaml"],
        &root.join("workspace"),
        &dir.join("home"),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[test]
fn the_schema_accepts_every_example_by_an_independent_validator() {
    let dir = examples_copy();
    let out = lever(&["schema"], dir.path(), dir.path());
    assert_eq!(out.code, 0);
    let schema_path = dir.join("schema.json");
    std::fs::write(&schema_path, &out.stdout).unwrap();
    let checker = workspace_root().join("tests/py/schema_check.py");
    let files: Vec<_> = ["minimal", "full", "subscription"]
        .iter()
        .map(|e| dir.join(&format!("examples/{e}/lever.yaml")))
        .collect();
    let res = run(Command::new("python3")
        .arg(&checker)
        .arg(&schema_path)
        .args(&files));
    assert_eq!(
        res.code, 0,
        "the schema rejects an example (needs python3 with jsonschema and pyyaml; .ci/run installs them):\n{}{}",
        res.stdout, res.stderr
    );
    assert_eq!(
        res.stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        3,
        "{}",
        res.stdout
    );

    // And it is a real constraint: a config with an unknown key or a wrong
    // type is rejected by the same validator.
    let bad = dir.write(
        "bad.yaml",
        "name: t\nbackend: lima\ntree: ws\nmanager: {image: x}\ncolour: red\n",
        0o644,
    );
    let bad2 = dir.write(
        "bad2.yaml",
        "name: t\nbackend: vbox\ntree: ws\nmanager: {image: x, allow_ports: [x]}\n",
        0o644,
    );
    let res = run(Command::new("python3")
        .arg(&checker)
        .arg(&schema_path)
        .arg(&bad)
        .arg(&bad2));
    assert_eq!(res.code, 1, "{}{}", res.stdout, res.stderr);
    assert!(res.stdout.contains("colour"), "{}", res.stdout);
    assert!(res.stdout.contains("vbox"), "{}", res.stdout);
}

#[test]
fn the_committed_schema_matches_the_code() {
    let out = lever(&["schema"], Path::new("/"), Path::new("/"));
    assert_eq!(out.code, 0);
    let committed =
        std::fs::read_to_string(workspace_root().join("schema/lever.schema.json")).unwrap();
    assert_eq!(
        out.stdout, committed,
        "schema/lever.schema.json is stale: regenerate it with `lever schema > schema/lever.schema.json`"
    );
}

#[test]
fn backends_lists_exactly_the_implemented_ones() {
    let out = lever(&["backends"], Path::new("/"), Path::new("/"));
    assert_eq!(out.code, 0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    for col in [
        "Backend",
        "Kernel",
        "FS bounded by",
        "Egress enforced at",
        "Version-fragile",
    ] {
        assert!(lines[0].contains(col), "header lacks {col}: {}", lines[0]);
    }
    let names: Vec<&str> = lines[2..]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(names, ["orbstack", "lima", "qemu"]);
    for rejected in ["docker", "linux-docker", "apple-container"] {
        assert!(
            !out.stdout.contains(rejected),
            "{rejected} listed:\n{}",
            out.stdout
        );
    }
    let json = lever(&["backends", "--json"], Path::new("/"), Path::new("/"));
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert_eq!(v[1]["kernel"], "separate");
}

#[test]
fn validate_json_output_carries_every_problem() {
    let dir = TempDir::new("json");
    dir.write("lever.yaml", "name: X\nbackend: vbox\n", 0o644);
    let out = lever(&["validate", "--json"], dir.path(), dir.path());
    assert_eq!(out.code, 1);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    let paths: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains(&"name") && paths.contains(&"backend") && paths.contains(&"tree"),
        "{paths:?}"
    );
}

/// Valid variations that a too-eager rule would reject.
#[test]
fn valid_variations_are_accepted() {
    let cases = [
        // Every agent opts into subscription on its own: uniform, so valid.
        "name: t\nbackend: lima\ntree: ws\nmanager: {image: img/x:1, llm_auth: subscription, credential_file: cred}\ngroves: [{name: g, dir: g, llm_auth: subscription}]\n",
        // YAML 1.2 booleans: `y`, `n` and `on` are strings.
        "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools: [{name: db, command: [lever-tool-db], backend: '127.0.0.1:3201', operations: [{name: read}], allowed_values: {table: [y, n, on]}}]\n",
        // Anchors and aliases within budget; IPv6 loopback admin bind; a stdio tool.
        "name: t\nbackend: qemu\ntree: ws\nmanager: {image: &img img/x:1}\ngroves: [{name: g, dir: g, image: *img}]\nbroker:\n  api_key_file: key\n  admin_bind: '::1'\n  tools: [{name: fs, transport: stdio, command: [npx, server], operations: [{name: read, args: [path]}], allowed_values: {path: [/lever]}}]\n",
        // Delegation between groves, of something the delegator obtains.
        "name: t\nbackend: orbstack\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\ngroves:\n  - {name: a, dir: a, delegate: [{tool: llm, op: generate, to: [b, manager]}]}\n  - {name: b, dir: b}\n",
        // Digest pinning and a registry allow-list with a port.
        "name: t\nbackend: lima\ntree: ws\nmanager: {image: 'reg.example:5000/team/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef'}\nbroker: {api_key_file: key, upstream: 'http://127.0.0.1:9999', grant_ttl: 90s}\nsecurity: {allowed_image_registries: ['reg.example:5000/team'], require_image_digest: true}\n",
    ];
    for (i, yaml) in cases.iter().enumerate() {
        let dir = TempDir::new("valid");
        dir.write("key", "k", 0o600);
        dir.write("cred", "c", 0o400);
        dir.mkdir("ws");
        dir.write("lever.yaml", yaml, 0o644);
        let out = lever(&["validate"], dir.path(), dir.path());
        assert_eq!(out.code, 0, "case {i}:\n{yaml}\n{}", out.stderr);
    }
}

#[test]
fn a_closed_pipe_ends_output_quietly() {
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "{} schema | head -c 1 >/dev/null; echo status=${{PIPESTATUS:-0}}",
        lever_tests::lever_bin().display()
    )));
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

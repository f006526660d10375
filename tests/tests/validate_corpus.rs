//! A corpus of bad configs, each run through the real `lever validate`.
//!
//! Every case starts from a valid instance (the key file 0600, the tree
//! present), breaks exactly one rule, and asserts that `lever validate`
//! exits 1 and reports exactly one error, at the exact line and key path,
//! with the reason. A case whose rule were deleted from the code would
//! report nothing and fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;

use lever_tests::{TempDir, errors, lever};

struct Case {
    name: &'static str,
    yaml: &'static str,
    setup: fn(&TempDir),
    line: u32,
    path: &'static str,
    message: &'static str,
}

fn none(_: &TempDir) {}

/// The valid instance every case starts from.
const BASE: &str = "\
name: t
backend: qemu
tree: ws
manager: {image: img/x:1}
broker: {api_key_file: key}
";

fn prepare(dir: &TempDir) {
    dir.write("key", "sk-ant-test-key\n", 0o600);
    dir.mkdir("ws");
    dir.mkdir("home");
}

const CASES: &[Case] = &[
    // --- types and shape -------------------------------------------------
    Case {
        name: "name of the wrong type",
        yaml: "name: [a]\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 1,
        path: "name",
        message: "expected a string, found a list",
    },
    Case {
        name: "name breaks the regex",
        yaml: "name: My_App\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 1,
        path: "name",
        message: "must match ^[a-z0-9][a-z0-9-]{0,62}$",
    },
    Case {
        name: "name longer than 63",
        yaml: "name: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 1,
        path: "name",
        message: "must match",
    },
    Case {
        name: "name starting with a dash",
        yaml: "name: -x\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 1,
        path: "name",
        message: "must match",
    },
    Case {
        name: "name missing",
        yaml: "backend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 1,
        path: "name",
        message: "missing required key",
    },
    Case {
        name: "unknown top-level key",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\ncolour: red\n",
        setup: none,
        line: 6,
        path: "colour",
        message: "unknown key `colour`",
    },
    Case {
        name: "unknown key in manager",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, imagee: y}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 4,
        path: "manager.imagee",
        message: "unknown key `imagee`",
    },
    Case {
        name: "unknown key in a tool",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: [lever-tool-db]\n      backend: 127.0.0.1:3201\n      operations: [{name: read}]\n      retries: 5\n",
        setup: none,
        line: 12,
        path: "broker.tools[0].retries",
        message: "unknown key `retries`",
    },
    Case {
        name: "tool timeout out of range",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: [lever-tool-db]\n      backend: 127.0.0.1:3201\n      operations: [{name: read}]\n      timeout: 10ms\n",
        setup: none,
        line: 12,
        path: "broker.tools[0].timeout",
        message: "out of range",
    },
    Case {
        name: "unknown key in rate_limits",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  rate_limits: {llm: {per_second: 5}}\n",
        setup: none,
        line: 7,
        path: "broker.rate_limits.llm.per_second",
        message: "unknown key `per_second`",
    },
    Case {
        name: "config that is a list",
        yaml: "- name: t\n",
        setup: none,
        line: 1,
        path: "(document)",
        message: "must be a mapping",
    },
    Case {
        name: "empty config",
        yaml: "",
        setup: none,
        line: 1,
        path: "(document)",
        message: "empty",
    },
    Case {
        name: "two YAML documents",
        yaml: "name: t\n---\nname: u\n",
        setup: none,
        line: 2,
        path: "(document)",
        message: "exactly one YAML document",
    },
    Case {
        name: "YAML syntax error",
        yaml: "name: t\nbackend: [qemu\ntree: ws\n",
        setup: none,
        line: 3,
        path: "backend",
        message: "illegal placement of ':'",
    },
    // --- duplicate keys and alias bombs ---------------------------------
    Case {
        name: "duplicate top-level key",
        yaml: "name: t\nbackend: qemu\nname: u\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 3,
        path: "name",
        message: "duplicate key `name`",
    },
    Case {
        name: "duplicate key inside a tool",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      name: db2\n",
        setup: none,
        line: 9,
        path: "broker.tools[0].name",
        message: "duplicate key `name`",
    },
    Case {
        name: "duplicate key inside allowed_values",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: [lever-tool-db]\n      backend: 127.0.0.1:3201\n      operations: [{name: read}]\n      allowed_values:\n        table: [users]\n        table: [orders]\n",
        setup: none,
        line: 14,
        path: "broker.tools[0].allowed_values.table",
        message: "duplicate key `table`",
    },
    Case {
        name: "alias bomb",
        yaml: "name: t\na: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n",
        setup: none,
        line: 6,
        path: "e[0]",
        message: "too deeply aliased",
    },
    // --- backend -----------------------------------------------------------
    Case {
        name: "unknown backend",
        yaml: "name: t\nbackend: virtualbox\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 2,
        path: "backend",
        message: "unknown backend `virtualbox`",
    },
    Case {
        name: "rejected linux-docker backend",
        yaml: "name: t\nbackend: linux-docker\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 2,
        path: "backend",
        message: "no VM boundary",
    },
    Case {
        name: "rejected docker-desktop backend",
        yaml: "name: t\nbackend: docker-desktop\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 2,
        path: "backend",
        message: "rejected",
    },
    Case {
        name: "roadmap apple-container backend",
        yaml: "name: t\nbackend: apple-container\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 2,
        path: "backend",
        message: "roadmap",
    },
    Case {
        name: "backend of the wrong type",
        yaml: "name: t\nbackend: 1\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 2,
        path: "backend",
        message: "expected a string",
    },
    // --- tree --------------------------------------------------------------
    Case {
        name: "tree absolute",
        yaml: "name: t\nbackend: qemu\ntree: /tmp\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 3,
        path: "tree",
        message: "not absolute",
    },
    Case {
        name: "tree is the root",
        yaml: "name: t\nbackend: qemu\ntree: .\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 3,
        path: "tree",
        message: "must not be the instance root",
    },
    Case {
        name: "tree with ..",
        yaml: "name: t\nbackend: qemu\ntree: ws/../..\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 3,
        path: "tree",
        message: "must not contain `..`",
    },
    Case {
        name: "tree under ~",
        yaml: "name: t\nbackend: qemu\ntree: ~/ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 3,
        path: "tree",
        message: "relative to the instance root",
    },
    Case {
        name: "tree symlinked out of the root",
        yaml: "name: t\nbackend: qemu\ntree: out\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: |d| {
            d.symlink("/tmp", "out");
        },
        line: 3,
        path: "tree",
        message: "outside the instance root",
    },
    Case {
        name: "tree symlinked to the root itself",
        yaml: "name: t\nbackend: qemu\ntree: self\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: |d| {
            d.symlink(".", "self");
        },
        line: 3,
        path: "tree",
        message: "instance root itself",
    },
    Case {
        name: "tree through a dangling symlink",
        yaml: "name: t\nbackend: qemu\ntree: dangling\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: |d| {
            d.symlink("/nonexistent/lever-target", "dangling");
        },
        line: 3,
        path: "tree",
        message: "symlink that cannot be followed",
    },
    Case {
        name: "tree is a file",
        yaml: "name: t\nbackend: qemu\ntree: afile\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: |d| {
            d.write("afile", "x", 0o644);
        },
        line: 3,
        path: "tree",
        message: "not a directory",
    },
    Case {
        name: "tree missing",
        yaml: "name: t\nbackend: qemu\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 1,
        path: "tree",
        message: "missing required key",
    },
    // --- egress and llm_auth ------------------------------------------------
    Case {
        name: "egress not a posture",
        yaml: "name: t\nbackend: qemu\ntree: ws\negress: sealed\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 4,
        path: "egress",
        message: "unknown value `sealed`",
    },
    Case {
        name: "closed egress with subscription",
        yaml: "name: t\nbackend: qemu\ntree: ws\negress: closed\nmanager: {image: img/x:1, credential_file: cred}\nbroker: {llm_auth: subscription}\n",
        setup: |d| {
            d.write("cred", "oauth", 0o600);
        },
        line: 4,
        path: "egress",
        message: "requires an api-key instance",
    },
    Case {
        name: "mixed llm_auth",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\ngroves:\n  - name: g\n    dir: g\n    llm_auth: subscription\n",
        setup: none,
        line: 9,
        path: "groves[0].llm_auth",
        message: "mixing api-key and subscription",
    },
    Case {
        name: "llm_auth of the wrong word",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, llm_auth: apikey}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 4,
        path: "manager.llm_auth",
        message: "unknown value `apikey`",
    },
    Case {
        name: "api-key mode without api_key_file",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {jail_port: 9443}\n",
        setup: none,
        line: 5,
        path: "broker.api_key_file",
        message: "needs broker.api_key_file",
    },
    Case {
        name: "subscription without credential_file",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {llm_auth: subscription}\n",
        setup: none,
        line: 4,
        path: "manager.credential_file",
        message: "subscription mode needs",
    },
    Case {
        name: "credential_file in an api-key instance",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, credential_file: cred}\nbroker: {api_key_file: key}\n",
        setup: |d| {
            d.write("cred", "oauth", 0o600);
        },
        line: 4,
        path: "manager.credential_file",
        message: "keeps credentials host-side",
    },
    Case {
        name: "obtain llm in a subscription instance",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, credential_file: cred, obtain: [{tool: llm, op: generate}]}\nbroker: {llm_auth: subscription}\n",
        setup: |d| {
            d.write("cred", "oauth", 0o600);
        },
        line: 4,
        path: "manager.obtain[0].tool",
        message: "only in api-key mode",
    },
    // --- key and credential files ------------------------------------------
    Case {
        name: "world-readable key file",
        yaml: BASE,
        setup: |d| {
            d.write("key", "k", 0o644);
        },
        line: 5,
        path: "broker.api_key_file",
        message: "mode 0644",
    },
    Case {
        name: "group-readable key file",
        yaml: BASE,
        setup: |d| {
            d.write("key", "k", 0o640);
        },
        line: 5,
        path: "broker.api_key_file",
        message: "mode 0640",
    },
    Case {
        name: "executable key file",
        yaml: BASE,
        setup: |d| {
            d.write("key", "k", 0o700);
        },
        line: 5,
        path: "broker.api_key_file",
        message: "0600 or stricter",
    },
    Case {
        name: "key file missing",
        yaml: BASE,
        setup: |d| {
            std::fs::remove_file(d.join("key")).unwrap();
        },
        line: 5,
        path: "broker.api_key_file",
        message: "does not exist",
    },
    Case {
        name: "key file is a directory",
        yaml: BASE,
        setup: |d| {
            std::fs::remove_file(d.join("key")).unwrap();
            d.mkdir("key");
        },
        line: 5,
        path: "broker.api_key_file",
        message: "not a regular file",
    },
    Case {
        name: "key file oversized",
        yaml: BASE,
        setup: |d| {
            d.write("key", vec![b'k'; 17 * 1024], 0o600);
        },
        line: 5,
        path: "broker.api_key_file",
        message: "the limit is 16384",
    },
    Case {
        name: "key file empty",
        yaml: BASE,
        setup: |d| {
            d.write("key", "", 0o600);
        },
        line: 5,
        path: "broker.api_key_file",
        message: "is empty",
    },
    Case {
        name: "key file owned by someone else",
        yaml: BASE,
        setup: |d| {
            std::os::unix::fs::chown(d.join("key"), Some(65534), None)
                .expect("this case needs root (chown)");
        },
        line: 5,
        path: "broker.api_key_file",
        message: "owned by uid 65534",
    },
    Case {
        name: "key file inside the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: ws/key}\n",
        setup: |d| {
            d.write("ws/key", "k", 0o600);
        },
        line: 5,
        path: "broker.api_key_file",
        message: "inside the tree",
    },
    Case {
        name: "key file symlinked into the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: link}\n",
        setup: |d| {
            d.write("ws/key", "k", 0o600);
            d.symlink("ws/key", "link");
        },
        line: 5,
        path: "broker.api_key_file",
        message: "inside the tree",
    },
    Case {
        name: "world-readable credential file",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, credential_file: cred}\nbroker: {llm_auth: subscription}\n",
        setup: |d| {
            d.write("cred", "oauth", 0o604);
        },
        line: 4,
        path: "manager.credential_file",
        message: "mode 0604",
    },
    // --- ports and binds ---------------------------------------------------
    Case {
        name: "admin port in allow_ports",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, allow_ports: [3101, 8444]}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 4,
        path: "manager.allow_ports[1]",
        message: "admin port",
    },
    Case {
        name: "custom admin port in allow_ports",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager:\n  image: img/x:1\n  allow_ports:\n    - 9000\nbroker: {api_key_file: key, admin_port: 9000}\n",
        setup: none,
        line: 7,
        path: "manager.allow_ports[0]",
        message: "admin port",
    },
    Case {
        name: "allow_ports out of range",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, allow_ports: [70000]}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 4,
        path: "manager.allow_ports[0]",
        message: "not a port",
    },
    Case {
        name: "allow_ports of the wrong type",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, allow_ports: [3101, http]}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 4,
        path: "manager.allow_ports[1]",
        message: "expected an integer",
    },
    Case {
        name: "non-loopback admin bind",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, admin_bind: 0.0.0.0}\n",
        setup: none,
        line: 5,
        path: "broker.admin_bind",
        message: "not a loopback address",
    },
    Case {
        name: "LAN admin bind",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  admin_bind: 192.168.1.10\n",
        setup: none,
        line: 7,
        path: "broker.admin_bind",
        message: "not a loopback address",
    },
    Case {
        name: "jail and admin on one port",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, admin_port: 8443}\n",
        setup: none,
        line: 5,
        path: "broker.admin_port",
        message: "both 8443",
    },
    Case {
        name: "port zero",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, jail_port: 0}\n",
        setup: none,
        line: 5,
        path: "broker.jail_port",
        message: "not a port",
    },
    Case {
        name: "bind not an address",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, bind: everywhere}\n",
        setup: none,
        line: 5,
        path: "broker.bind",
        message: "not an IP address",
    },
    // --- agents, obtain, delegate ------------------------------------------
    Case {
        name: "delegate to an unknown agent",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager:\n  image: img/x:1\n  delegate:\n    - {tool: llm, op: generate, to: [ghost]}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 7,
        path: "manager.delegate[0].to[0]",
        message: "unknown agent `ghost`",
    },
    Case {
        name: "delegate to itself",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager:\n  image: img/x:1\n  delegate:\n    - {tool: llm, op: generate, to: [manager]}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 7,
        path: "manager.delegate[0].to[0]",
        message: "cannot delegate to itself",
    },
    Case {
        name: "delegate to nobody",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager:\n  image: img/x:1\n  delegate:\n    - {tool: llm, op: generate, to: []}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 7,
        path: "manager.delegate[0].to",
        message: "at least one agent",
    },
    Case {
        name: "obtain of an unknown tool",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager:\n  image: img/x:1\n  obtain: [{tool: db, op: read}]\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 6,
        path: "manager.obtain[0].tool",
        message: "unknown tool `db`",
    },
    Case {
        name: "obtain of an unknown op",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager:\n  image: img/x:1\n  obtain: [{tool: db, op: write}]\nbroker:\n  api_key_file: key\n  tools: [{name: db, command: [lever-tool-db], backend: '127.0.0.1:3201', operations: [{name: read}]}]\n",
        setup: none,
        line: 6,
        path: "manager.obtain[0].op",
        message: "unknown operation `write` of tool `db`",
    },
    Case {
        name: "obtain of an unknown llm op",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager:\n  image: img/x:1\n  obtain: [{tool: llm, op: embed}]\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 6,
        path: "manager.obtain[0].op",
        message: "unknown operation `embed` of `llm`",
    },
    Case {
        name: "obtain without op",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager:\n  image: img/x:1\n  obtain: [{tool: llm}]\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 6,
        path: "manager.obtain[0].op",
        message: "missing required key",
    },
    Case {
        name: "duplicate grove names",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\ngroves:\n  - {name: g, dir: a}\n  - {name: g, dir: b}\n",
        setup: none,
        line: 8,
        path: "groves[1].name",
        message: "already used",
    },
    Case {
        name: "grove named like the manager identity",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\ngroves:\n  - {name: manager, dir: a}\n",
        setup: none,
        line: 7,
        path: "groves[0].name",
        message: "already used by broker.manager_identity",
    },
    Case {
        name: "grove named like the instance (the manager's Scion slug)",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\ngroves:\n  - {name: g, dir: a}\n  - {name: t, dir: b}\n",
        setup: none,
        line: 8,
        path: "groves[1].name",
        message: "`t` is the instance name, which is the manager's Scion agent slug",
    },
    Case {
        name: "grove dir absolute",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\ngroves:\n  - {name: g, dir: /etc}\n",
        setup: none,
        line: 7,
        path: "groves[0].dir",
        message: "not absolute",
    },
    Case {
        name: "grove dir escaping the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\ngroves:\n  - {name: g, dir: ../x}\n",
        setup: none,
        line: 7,
        path: "groves[0].dir",
        message: "must not contain `..`",
    },
    Case {
        name: "grove dir symlinked out of the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\ngroves:\n  - {name: g, dir: out}\n",
        setup: |d| {
            d.symlink("..", "ws/out");
        },
        line: 7,
        path: "groves[0].dir",
        message: "outside the tree",
    },
    Case {
        name: "grove without dir",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\ngroves:\n  - {name: g}\n",
        setup: none,
        line: 7,
        path: "groves[0].dir",
        message: "missing required key",
    },
    Case {
        name: "manager_identity breaks the regex",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, manager_identity: Boss}\n",
        setup: none,
        line: 5,
        path: "broker.manager_identity",
        message: "must match",
    },
    // --- tools ---------------------------------------------------------------
    Case {
        name: "operation name that is no MCP tool name",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: fs\n      transport: stdio\n      command: [fs-server]\n      operations: [{name: read_file}, {name: 'read file'}]\n",
        setup: none,
        line: 11,
        path: "broker.tools[0].operations[1].name",
        message: "must match ^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$",
    },
    Case {
        name: "allowed_values for an unknown key",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: [lever-tool-db]\n      backend: 127.0.0.1:3201\n      operations: [{name: read}]\n      allowed_values:\n        tabel: [users]\n",
        setup: none,
        line: 13,
        path: "broker.tools[0].allowed_values.tabel",
        message: "unknown key `tabel`",
    },
    Case {
        name: "allowed_values key not among declared args",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: kv\n      command: [kv-server]\n      backend: 127.0.0.1:3202\n      operations: [{name: get, args: [key]}]\n      allowed_values:\n        bucket: [a]\n",
        setup: none,
        line: 13,
        path: "broker.tools[0].allowed_values.bucket",
        message: "not an argument of operation(s) get",
    },
    Case {
        name: "allowed_values with no values",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: [lever-tool-db]\n      backend: 127.0.0.1:3201\n      operations: [{name: read}]\n      allowed_values: {table: []}\n",
        setup: none,
        line: 12,
        path: "broker.tools[0].allowed_values.table",
        message: "at least one value",
    },
    Case {
        name: "allowed_values with a repeated value",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: [lever-tool-db]\n      backend: 127.0.0.1:3201\n      operations: [{name: read}]\n      allowed_values:\n        table:\n          - users\n          - users\n",
        setup: none,
        line: 15,
        path: "broker.tools[0].allowed_values.table[1]",
        message: "listed twice",
    },
    Case {
        name: "allowed_values as a scalar",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: [lever-tool-db]\n      backend: 127.0.0.1:3201\n      operations: [{name: read}]\n      allowed_values: {table: users}\n",
        setup: none,
        line: 12,
        path: "broker.tools[0].allowed_values.table",
        message: "expected a list",
    },
    Case {
        name: "tool named llm",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools: [{name: llm, command: [x], backend: '127.0.0.1:3201', operations: [{name: read}]}]\n",
        setup: none,
        line: 7,
        path: "broker.tools[0].name",
        message: "reserved",
    },
    Case {
        name: "tool defined twice",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - {name: db, command: [cmd1], backend: '127.0.0.1:3201', operations: [{name: read}]}\n    - {name: db, command: [cmd2], backend: '127.0.0.1:3202', operations: [{name: read}]}\n",
        setup: none,
        line: 9,
        path: "broker.tools[1].name",
        message: "defined twice",
    },
    Case {
        name: "http tool without backend",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: [lever-tool-db]\n      operations: [{name: read}]\n",
        setup: none,
        line: 8,
        path: "broker.tools[0].backend",
        message: "missing required key",
    },
    Case {
        name: "tool backend not on loopback",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: [lever-tool-db]\n      backend: 0.0.0.0:3201\n      operations: [{name: read}]\n",
        setup: none,
        line: 10,
        path: "broker.tools[0].backend",
        message: "not a loopback address",
    },
    Case {
        name: "stdio tool with a backend",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: fs\n      transport: stdio\n      command: [mcp-fs]\n      backend: 127.0.0.1:3201\n      operations: [{name: read}]\n",
        setup: none,
        line: 11,
        path: "broker.tools[0].backend",
        message: "no backend address",
    },
    Case {
        name: "tool transport unknown",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: fs\n      transport: sse\n      command: [mcp-fs]\n      operations: [{name: read}]\n",
        setup: none,
        line: 9,
        path: "broker.tools[0].transport",
        message: "unknown value `sse`",
    },
    Case {
        name: "tool without operations",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: [lever-tool-db]\n      backend: 127.0.0.1:3201\n      operations: []\n",
        setup: none,
        line: 11,
        path: "broker.tools[0].operations",
        message: "at least one operation",
    },
    Case {
        name: "tool operation listed twice",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: [lever-tool-db]\n      backend: 127.0.0.1:3201\n      operations:\n        - {name: read}\n        - {name: read}\n",
        setup: none,
        line: 13,
        path: "broker.tools[0].operations[1].name",
        message: "listed twice",
    },
    Case {
        name: "tool with an empty command",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: []\n      backend: 127.0.0.1:3201\n      operations: [{name: read}]\n",
        setup: none,
        line: 9,
        path: "broker.tools[0].command",
        message: "must name a program",
    },
    Case {
        name: "tool backend on the jail port",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools:\n    - name: db\n      command: [lever-tool-db]\n      backend: 127.0.0.1:8443\n      operations: [{name: read}]\n",
        setup: none,
        line: 7,
        path: "broker.tools",
        message: "uses a broker port",
    },
    // --- prompt file, scion, state dir -------------------------------------
    Case {
        name: "prompt_file inside the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, prompt_file: ws/p.md}\nbroker: {api_key_file: key}\n",
        setup: |d| {
            d.write("ws/p.md", "hi", 0o644);
        },
        line: 4,
        path: "manager.prompt_file",
        message: "inside the tree",
    },
    Case {
        name: "prompt_file with ..",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, prompt_file: ../p.md}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 4,
        path: "manager.prompt_file",
        message: "must not contain `..`",
    },
    Case {
        name: "prompt_file absolute",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, prompt_file: /etc/motd}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 4,
        path: "manager.prompt_file",
        message: "not absolute",
    },
    Case {
        name: "prompt_file symlinked out of the root",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, prompt_file: p.md}\nbroker: {api_key_file: key}\n",
        setup: |d| {
            d.symlink("/etc/hostname", "p.md");
        },
        line: 4,
        path: "manager.prompt_file",
        message: "outside the instance root",
    },
    Case {
        name: "prompt_file missing",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, prompt_file: p.md}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 4,
        path: "manager.prompt_file",
        message: "does not exist",
    },
    Case {
        name: "scion version and source",
        yaml: "name: t\nbackend: qemu\ntree: ws\nscion: {version: 666333f9, source: scion}\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: |d| {
            d.mkdir("scion");
        },
        line: 4,
        path: "scion",
        message: "not both",
    },
    Case {
        name: "scion version with shell in it",
        yaml: "name: t\nbackend: qemu\ntree: ws\nscion: {version: 'v1; rm -rf ~'}\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 4,
        path: "scion.version",
        message: "neither a commit hash",
    },
    Case {
        name: "scion source inside the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nscion: {source: ws/scion}\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: |d| {
            d.mkdir("ws/scion");
        },
        line: 4,
        path: "scion.source",
        message: "inside the tree",
    },
    Case {
        name: "scion source through a symlink in the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nscion: {source: ~/src}\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\n",
        setup: |d| {
            d.mkdir("scion");
            d.symlink("../scion", "ws/src");
            d.symlink("../ws/src", "home/src");
        },
        line: 4,
        path: "scion.source",
        message: "passes through",
    },
    // A path that passes through the tree is the agents' to repoint, even
    // when it resolves outside it today.
    Case {
        name: "api key through a symlink in the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: ws/k}\n",
        setup: |d| {
            d.symlink("../key", "ws/k");
        },
        line: 5,
        path: "broker.api_key_file",
        message: "passes through",
    },
    Case {
        name: "upstream CA through a symlinked directory in the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, upstream_ca_file: ws/certs/ca.pem}\n",
        setup: |d| {
            d.mkdir("certs");
            d.write("certs/ca.pem", "-----BEGIN CERTIFICATE-----\n", 0o644);
            d.symlink("../certs", "ws/certs");
        },
        line: 5,
        path: "broker.upstream_ca_file",
        message: "passes through",
    },
    Case {
        name: "audit file through a symlink in the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, telemetry: {audit_file: ws/l/audit.jsonl}}\n",
        setup: |d| {
            d.mkdir("logs");
            d.symlink("../logs", "ws/l");
        },
        line: 5,
        path: "broker.telemetry.audit_file",
        message: "passes through",
    },
    Case {
        name: "state dir through a symlink in the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, state_dir: ~/t/st}\n",
        setup: |d| {
            d.mkdir("st");
            std::fs::set_permissions(d.join("st"), std::fs::Permissions::from_mode(0o700)).unwrap();
            d.symlink("../st", "ws/st");
            d.symlink("../ws", "home/t");
        },
        line: 5,
        path: "broker.state_dir",
        message: "passes through",
    },
    Case {
        name: "prompt file through a symlink in the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1, prompt_file: ws/p.md}\nbroker: {api_key_file: key}\n",
        setup: |d| {
            d.write("prompt.md", "hello\n", 0o644);
            d.symlink("../prompt.md", "ws/p.md");
        },
        line: 4,
        path: "manager.prompt_file",
        message: "passes through",
    },
    Case {
        name: "tool program in the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools: [{name: db, command: [ws/bin/tool], backend: '127.0.0.1:3201', operations: [{name: read}]}]\n",
        setup: |d| {
            d.mkdir("ws/bin");
            d.write("ws/bin/tool", "#!/bin/sh\n", 0o755);
        },
        line: 7,
        path: "broker.tools[0].command[0]",
        message: "inside the tree",
    },
    Case {
        name: "tool program through a symlink in the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  tools: [{name: db, command: [./ws/t], backend: '127.0.0.1:3201', operations: [{name: read}]}]\n",
        setup: |d| {
            d.write("tool", "#!/bin/sh\n", 0o755);
            d.symlink("../tool", "ws/t");
        },
        line: 7,
        path: "broker.tools[0].command[0]",
        message: "passes through",
    },
    Case {
        // One error: no default port stands in for the broken one.
        name: "jail port of the wrong type beside admin port 8443",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, jail_port: abc, admin_port: 8443}\n",
        setup: none,
        line: 5,
        path: "broker.jail_port",
        message: "expected an integer",
    },
    Case {
        name: "state dir inside the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, state_dir: ws/.lever}\n",
        setup: none,
        line: 5,
        path: "broker.state_dir",
        message: "inside the tree",
    },
    Case {
        name: "state dir readable by others",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, state_dir: st}\n",
        setup: |d| {
            d.mkdir("st");
            std::fs::set_permissions(d.join("st"), std::fs::Permissions::from_mode(0o755)).unwrap();
        },
        line: 5,
        path: "broker.state_dir",
        message: "must be 0700",
    },
    Case {
        name: "state dir symlinked out of the root",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, state_dir: st}\n",
        setup: |d| {
            d.symlink("/tmp", "st");
        },
        line: 5,
        path: "broker.state_dir",
        message: "outside the instance root",
    },
    // --- images -------------------------------------------------------------
    Case {
        name: "image with shell characters",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: 'img/x;reboot'}\nbroker: {api_key_file: key}\n",
        setup: none,
        line: 4,
        path: "manager.image",
        message: "not a valid image reference",
    },
    Case {
        name: "image from a look-alike registry",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: scionlocalevil/x:1}\nbroker: {api_key_file: key}\nsecurity: {allowed_image_registries: [scionlocal]}\n",
        setup: none,
        line: 4,
        path: "manager.image",
        message: "not from an allowed registry",
    },
    Case {
        name: "image by tag when digests are required",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:latest}\nbroker: {api_key_file: key}\nsecurity: {require_image_digest: true}\n",
        setup: none,
        line: 4,
        path: "manager.image",
        message: "not pinned by digest",
    },
    Case {
        name: "grove image from a disallowed registry",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: ok/x:1}\nbroker: {api_key_file: key}\nsecurity: {allowed_image_registries: [ok]}\ngroves:\n  - {name: g, dir: g, image: 'ghcr.io/evil/x:1'}\n",
        setup: none,
        line: 8,
        path: "groves[0].image",
        message: "not from an allowed registry",
    },
    Case {
        name: "image from a registry port that only starts like the allowed one",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: 'localhost:50001/x:1'}\nbroker: {api_key_file: key}\nsecurity: {allowed_image_registries: ['localhost:5000']}\n",
        setup: none,
        line: 4,
        path: "manager.image",
        message: "not from an allowed registry (localhost:5000)",
    },
    Case {
        name: "registry entry with a trailing slash",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\nsecurity:\n  allowed_image_registries: ['localhost:5000/']\n",
        setup: none,
        line: 7,
        path: "security.allowed_image_registries[0]",
        message: "must not end with '/': write \"localhost:5000\"",
    },
    Case {
        name: "registry entry with a bad port",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\nsecurity:\n  allowed_image_registries: ['localhost:99999']\n",
        setup: none,
        line: 7,
        path: "security.allowed_image_registries[0]",
        message: "registry port \"99999\" is not a port",
    },
    Case {
        name: "registry entry with a digest",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key}\nsecurity:\n  allowed_image_registries: ['img@sha256:00']\n",
        setup: none,
        line: 7,
        path: "security.allowed_image_registries[0]",
        message: "without a digest",
    },
    // --- upstream, durations, limits ------------------------------------------
    Case {
        name: "plain http upstream off loopback",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, upstream: 'http://api.example.com'}\n",
        setup: none,
        line: 5,
        path: "broker.upstream",
        message: "in the clear",
    },
    Case {
        name: "upstream with credentials",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, upstream: 'https://u:p@api.example.com'}\n",
        setup: none,
        line: 5,
        path: "broker.upstream",
        message: "credentials in the URL",
    },
    Case {
        name: "upstream of another scheme",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, upstream: 'ftp://x'}\n",
        setup: none,
        line: 5,
        path: "broker.upstream",
        message: "must start with https://",
    },
    Case {
        name: "upstream CA inside the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, upstream_ca_file: ws/ca.pem}\n",
        setup: |d| {
            d.write("ws/ca.pem", "-----BEGIN CERTIFICATE-----\n", 0o644);
        },
        line: 5,
        path: "broker.upstream_ca_file",
        message: "inside the tree",
    },
    Case {
        name: "upstream CA that is not PEM",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, upstream_ca_file: ca.pem}\n",
        setup: |d| {
            d.write("ca.pem", "hello", 0o644);
        },
        line: 5,
        path: "broker.upstream_ca_file",
        message: "no PEM certificate",
    },
    Case {
        name: "grant_ttl not a duration",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, grant_ttl: forever}\n",
        setup: none,
        line: 5,
        path: "broker.grant_ttl",
        message: "not a duration",
    },
    Case {
        name: "grant_ttl too long",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker: {api_key_file: key, grant_ttl: 90d}\n",
        setup: none,
        line: 5,
        path: "broker.grant_ttl",
        message: "out of range",
    },
    Case {
        name: "rate limit of zero",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  rate_limits:\n    tools: {per_minute: 0}\n",
        setup: none,
        line: 8,
        path: "broker.rate_limits.tools.per_minute",
        message: "out of range",
    },
    Case {
        name: "control lane burst of zero",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  rate_limits:\n    control: {burst: 0}\n",
        setup: none,
        line: 8,
        path: "broker.rate_limits.control.burst",
        message: "out of range",
    },
    Case {
        name: "token budget without window",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  rate_limits:\n    llm_tokens: {tokens: 1000}\n",
        setup: none,
        line: 8,
        path: "broker.rate_limits.llm_tokens.window",
        message: "missing required key",
    },
    Case {
        name: "audit file inside the tree",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  telemetry: {audit_file: ws/audit.jsonl}\n",
        setup: none,
        line: 7,
        path: "broker.telemetry.audit_file",
        message: "inside the tree",
    },
    Case {
        name: "OTLP endpoint not a URL",
        yaml: "name: t\nbackend: qemu\ntree: ws\nmanager: {image: img/x:1}\nbroker:\n  api_key_file: key\n  telemetry: {otlp_endpoint: 'collector:4318'}\n",
        setup: none,
        line: 7,
        path: "broker.telemetry.otlp_endpoint",
        message: "must start with https://",
    },
];

#[test]
fn every_bad_config_is_rejected_at_its_key_and_line() {
    assert!(CASES.len() >= 50, "the corpus must hold at least 50 cases");
    let mut names = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for case in CASES {
        assert!(names.insert(case.name), "duplicate case name {}", case.name);
        let dir = TempDir::new("corpus");
        prepare(&dir);
        dir.write("lever.yaml", case.yaml, 0o644);
        (case.setup)(&dir);
        let out = lever(
            &["validate", "-c", "lever.yaml"],
            dir.path(),
            &dir.join("home"),
        );
        let errs = errors(&out.stderr, "lever.yaml");
        let ok = out.code == 1
            && errs.len() == 1
            && errs[0].line == case.line
            && errs[0].path == case.path
            && errs[0].message.contains(case.message);
        if !ok {
            failures.push(format!(
                "{}: expected exit 1 and one error at line {} `{}` containing {:?}; got exit {} with\n{}",
                case.name, case.line, case.path, case.message, out.code, out.stderr
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn the_base_of_the_corpus_is_valid() {
    // If the base were invalid, every case would "pass" for the wrong reason.
    let dir = TempDir::new("base");
    prepare(&dir);
    dir.write("lever.yaml", BASE, 0o644);
    let out = lever(
        &["validate", "-c", "lever.yaml"],
        dir.path(),
        &dir.join("home"),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("lever.yaml: valid"),
        "{}",
        out.stdout
    );
}

#[test]
fn registry_hosts_with_ports_and_mcp_style_operation_names_are_valid() {
    // A private registry on a port (bare, and with a namespace), and a
    // third-party stdio MCP server whose tools are named as such servers
    // name them.
    let dir = TempDir::new("valid-names");
    prepare(&dir);
    let digest = "a".repeat(64);
    dir.write(
        "lever.yaml",
        format!(
            "\
name: t
backend: qemu
tree: ws
manager:
  image: 'localhost:5000/lever-claude:1'
  obtain: [{{tool: fs, op: read_file}}, {{tool: fs, op: listDir}}]
groves:
  - {{name: g, dir: g, image: 'registry.example.com:5000/team/x@sha256:{digest}', obtain: [{{tool: fs, op: get-info}}]}}
broker:
  api_key_file: key
  tools:
    - name: fs
      transport: stdio
      command: [fs-server]
      operations: [{{name: read_file, args: [path]}}, {{name: listDir}}, {{name: get-info}}]
      allowed_values: {{path: [/lever]}}
security:
  allowed_image_registries: ['localhost:5000', 'registry.example.com:5000/team']
"
        ),
        0o644,
    );
    let out = lever(
        &["validate", "-c", "lever.yaml"],
        dir.path(),
        &dir.join("home"),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("read_file"), "{}", out.stdout);
}

#[test]
fn a_config_larger_than_the_cap_is_refused_before_parsing() {
    let dir = TempDir::new("big");
    prepare(&dir);
    let mut text = BASE.to_owned();
    text.push_str(&"# padding\n".repeat(30_000));
    dir.write("lever.yaml", text, 0o644);
    let out = lever(
        &["validate", "-c", "lever.yaml"],
        dir.path(),
        &dir.join("home"),
    );
    assert_eq!(out.code, 1);
    let errs = errors(&out.stderr, "lever.yaml");
    assert_eq!(errs.len(), 1, "{}", out.stderr);
    assert_eq!((errs[0].line, errs[0].path.as_str()), (1, "(file)"));
    assert!(
        errs[0].message.contains("at most 262144"),
        "{}",
        errs[0].message
    );
}

#[test]
fn a_config_others_can_rewrite_is_refused() {
    let dir = TempDir::new("gw");
    prepare(&dir);
    dir.write("lever.yaml", BASE, 0o664);
    let out = lever(
        &["validate", "-c", "lever.yaml"],
        dir.path(),
        &dir.join("home"),
    );
    assert_eq!(out.code, 1);
    let errs = errors(&out.stderr, "lever.yaml");
    assert_eq!(errs.len(), 1, "{}", out.stderr);
    assert_eq!(errs[0].path, "(file)");
    assert!(
        errs[0].message.contains("others can rewrite it"),
        "{}",
        errs[0].message
    );
}

#[test]
fn a_config_with_many_problems_reports_all_of_them_in_one_run() {
    let dir = TempDir::new("many");
    prepare(&dir);
    dir.write(
        "lever.yaml",
        "\
name: Bad_Name
backend: docker-desktop
tree: ../escape
egress: sealed
colour: red
manager:
  image: 'UPPER/x'
  allow_ports: [8444, nope, 70000]
  obtain: [{tool: db, op: write}]
  delegate: [{tool: llm, op: generate, to: [ghost]}]
broker:
  admin_bind: 10.0.0.1
  grant_ttl: forever
  tools:
    - name: db
      command: [lever-tool-db]
      backend: 10.0.0.1:3201
      operations: [{name: read}]
      allowed_values: {tabel: [users]}
groves:
  - {name: g, dir: /abs, llm_auth: subscription}
  - {dir: x, bogus: true}
",
        0o644,
    );
    let out = lever(
        &["validate", "-c", "lever.yaml"],
        dir.path(),
        &dir.join("home"),
    );
    assert_eq!(out.code, 1);
    let got: Vec<(u32, String)> = errors(&out.stderr, "lever.yaml")
        .into_iter()
        .map(|p| (p.line, p.path))
        .collect();
    let want: Vec<(u32, &str)> = vec![
        (1, "name"),
        (2, "backend"),
        (3, "tree"),
        (4, "egress"),
        (5, "colour"),
        (7, "manager.image"),
        (8, "manager.allow_ports[0]"),
        (8, "manager.allow_ports[1]"),
        (8, "manager.allow_ports[2]"),
        (9, "manager.obtain[0].op"),
        (10, "manager.delegate[0].to[0]"),
        (11, "broker.api_key_file"),
        (12, "broker.admin_bind"),
        (13, "broker.grant_ttl"),
        (17, "broker.tools[0].backend"),
        (19, "broker.tools[0].allowed_values.tabel"),
        (21, "groves[0].dir"),
        (21, "groves[0].llm_auth"),
        (22, "groves[1].name"),
        (22, "groves[1].bogus"),
    ];
    let got_ref: Vec<(u32, &str)> = got.iter().map(|(l, p)| (*l, p.as_str())).collect();
    assert_eq!(got_ref, want, "\n{}", out.stderr);
}

#[test]
fn a_scion_source_may_live_anywhere_outside_the_tree() {
    // DESIGN §3: relative paths resolve against the config's directory and
    // `~/` is expanded; only the tree (the agents') is out of bounds.
    let dir = TempDir::new("scion-src");
    prepare(&dir);
    dir.mkdir("home/src/scion");
    dir.mkdir("scion");
    let abs = dir.join("scion");
    for src in [
        "~/src/scion".to_owned(),
        abs.display().to_string(),
        "scion".to_owned(),
    ] {
        let yaml = BASE.replace(
            "tree: ws\n",
            &format!("tree: ws\nscion: {{source: '{src}'}}\n"),
        );
        dir.write("lever.yaml", &yaml, 0o644);
        let out = lever(
            &["validate", "-c", "lever.yaml"],
            dir.path(),
            &dir.join("home"),
        );
        assert_eq!(out.code, 0, "{src}: {}", out.stderr);
    }
}

#[test]
fn the_tree_under_another_name_is_still_the_tree() {
    // A bind mount of the tree (as a case-insensitive file system or a
    // firmlink would) spells it otherwise: a key reached through it is
    // still refused, the tree being known by identity as well as by name.
    // In a mount namespace of its own (needs root, as CI runs), so the
    // mount never outlives the test.
    let dir = TempDir::new("tree-alias");
    prepare(&dir);
    dir.mkdir("alias");
    dir.write("ws/k", "sk-ant-test-key\n", 0o600);
    let yaml = BASE.replace("api_key_file: key", "api_key_file: alias/k");
    dir.write("lever.yaml", &yaml, 0o644);
    let script = format!(
        "mount --bind ws alias && exec {} validate -c lever.yaml",
        lever_tests::lever_bin().display()
    );
    let out = lever_tests::run(
        std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .current_dir(dir.path())
            .env("HOME", dir.join("home")),
    );
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("broker.api_key_file") && out.stderr.contains("passes through"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_tool_program_given_from_home_runs_from_home() {
    // `~/` is expanded by the config, not by a shell: the broker must run
    // the very program that was checked, not `<root>/~/bin/tool`.
    let dir = TempDir::new("tool-home");
    prepare(&dir);
    dir.write("home/bin/tool", "#!/bin/sh\n", 0o755);
    let yaml = BASE.replace(
        "broker: {api_key_file: key}\n",
        "broker:\n  api_key_file: key\n  tools: [{name: db, command: ['~/bin/tool', '-x'], backend: '127.0.0.1:3201', operations: [{name: read}]}]\n",
    );
    dir.write("lever.yaml", &yaml, 0o644);
    let env = lever_policy::config::fs::Env {
        home: Some(dir.join("home")),
        uid: rustix::process::geteuid().as_raw(),
    };
    let loaded = lever_policy::config::load(&dir.join("lever.yaml"), &env).unwrap();
    let command = loaded.config.broker.tools[0].transport.command().to_vec();
    assert_eq!(
        command,
        [
            dir.join("home/bin/tool").display().to_string(),
            "-x".to_owned()
        ]
    );
}

#[test]
fn a_tool_argument_naming_a_file_in_the_tree_is_a_warning() {
    let dir = TempDir::new("tool-arg");
    prepare(&dir);
    dir.write("ws/srv.py", "print()\n", 0o644);
    dir.write("srv.py", "print()\n", 0o644);
    for (script, warned) in [("ws/srv.py", true), ("srv.py", false)] {
        let yaml = BASE.replace(
            "broker: {api_key_file: key}\n",
            &format!("broker:\n  api_key_file: key\n  tools: [{{name: db, command: [python3, {script}], backend: '127.0.0.1:3201', operations: [{{name: read}}]}}]\n"),
        );
        dir.write("lever.yaml", &yaml, 0o644);
        let out = lever(
            &["validate", "-c", "lever.yaml"],
            dir.path(),
            &dir.join("home"),
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(
            out.stderr
                .contains("broker.tools[0].command[1]: warning: \"ws/srv.py\" is in the tree"),
            warned,
            "{script}: {}",
            out.stderr
        );
    }
}

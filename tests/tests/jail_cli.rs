//! `lever plan`, `lever apply --dry-run` and `lever doctor` on real configs,
//! and `lever doctor` against a real broker; `lever apply` against a fake
//! `orb` with the real broker it starts; `lever down`/`doctor --machine`;
//! `lever admin` finding the broker through ./lever.yaml.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lever_tests::broker::{DEFAULT_AGENTS, Instance, free_ports};
use lever_tests::{Output, TempDir, lever, lever_bin, run, workspace_root};

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

/// An orbstack instance with a fake `orb` on PATH that logs its argv and
/// succeeds (reading what it is fed, a ruleset): the machine "runs", its
/// packages and images are there, and `host.orb.internal` resolves inside it.
struct OrbInstance {
    dir: TempDir,
    path: String,
}

impl OrbInstance {
    fn new() -> OrbInstance {
        let dir = TempDir::new("orb");
        let (jail, admin) = free_ports();
        dir.write("key", "sk-ant-test-key", 0o600);
        dir.mkdir("ws");
        dir.write(
            "lever.yaml",
            format!(
                "name: t\nbackend: orbstack\ntree: ws\nmanager: {{image: img/x:1}}\nbroker: {{api_key_file: key, jail_port: {jail}, admin_port: {admin}}}\n"
            ),
            0o644,
        );
        dir.write(
            "bin/orb",
            format!(
                "#!/bin/sh\ncat >/dev/null\nprintf '%s\\n' \"$*\" >> '{}'\ncase \"$*\" in *'getent ahostsv4 host.orb.internal.') echo '198.19.248.254  STREAM host.orb.internal' ;; esac\nexit 0\n",
                dir.join("orb.log").display()
            ),
            0o755,
        );
        let path = format!(
            "{}:{}",
            dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        OrbInstance { dir, path }
    }

    fn lever(&self, args: &[&str]) -> Output {
        run(Command::new(lever_bin())
            .args(args)
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env("PATH", &self.path))
    }

    fn orb_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("orb.log")).unwrap_or_default()
    }
}

/// The broker `lever apply` started in `dir` (in the background, in its
/// own process group): found by its command line and working directory,
/// stopped on drop.
struct AppliedBroker(PathBuf);

impl AppliedBroker {
    fn pid(&self) -> Option<u32> {
        let want = [
            lever_bin().into_os_string().into_string().unwrap(),
            "broker".into(),
            "-c".into(),
            "lever.yaml".into(),
        ];
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let cwd = std::fs::read_link(e.path().join("cwd")).ok()?;
            (args == want && cwd == self.0).then_some(pid)
        })
    }
}

impl Drop for AppliedBroker {
    fn drop(&mut self) {
        let Some(pid) = self.pid() else { return };
        lever_tests::broker::sigterm(pid);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
}

#[test]
fn apply_makes_a_private_state_dir_that_the_broker_it_starts_accepts() {
    let inst = OrbInstance::new();
    let _broker = AppliedBroker(inst.dir.path().to_path_buf());
    let state = inst.dir.join(".lever");
    assert!(!state.exists());
    let out = inst.lever(&["apply"]);
    assert_eq!(
        out.code,
        0,
        "{}\n{}\nbroker.log:\n{}",
        out.stdout,
        out.stderr,
        std::fs::read_to_string(state.join("broker.log")).unwrap_or_default()
    );
    assert!(out.stdout.contains("broker up: done"), "{}", out.stdout);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("broker.log")), 0o600);
    for f in ["ca.key", "root.key", "state.json"] {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }
    assert!(inst.dir.join("ws/.lever/bootstrap/ticket").exists());
    // The state dir passes the config's own check on the next run, and
    // everything is done already.
    let again = inst.lever(&["apply"]);
    assert_eq!(again.code, 0, "{}\n{}", again.stdout, again.stderr);
    assert!(
        again.stdout.contains("broker up: already done"),
        "{}",
        again.stdout
    );
}

#[test]
fn apply_never_stages_the_ca_of_whatever_else_holds_the_admin_port() {
    // Another local process bound the admin port first and answers like a
    // broker, with a CA of its own: bring-up must stop before the manager
    // is handed that CA to pin.
    let inst = OrbInstance::new();
    let yaml = std::fs::read_to_string(inst.dir.join("lever.yaml")).unwrap();
    let admin: u16 = yaml
        .split("admin_port: ")
        .nth(1)
        .and_then(|r| r.split(['}', ',']).next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap();
    let squatter = format!(
        r#"
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def answer(self, body):
        b = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def do_GET(self): self.answer({{"ok": True}})
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.answer({{"ticket": "lvt_" + "a" * 43, "ca": "-----BEGIN CERTIFICATE-----\\nMIIBsquatter\\n-----END CERTIFICATE-----\\n"}})
http.server.HTTPServer(("127.0.0.1", {admin}), H).serve_forever()
"#
    );
    let mut child = Command::new("python3")
        .args(["-c", &squatter])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the squatter never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = inst.lever(&["apply"]);
    let _ = child.kill();
    let _ = child.wait();
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(out.stderr.contains("another process"), "{}", out.stderr);
    assert!(!inst.dir.join("ws/.lever/bootstrap/ticket").exists());
    assert!(!inst.dir.join("ws/.lever/bootstrap/ca.pem").exists());
}

#[test]
fn down_and_doctor_act_on_the_machine_named_by_machine() {
    let inst = OrbInstance::new();
    let down = inst.lever(&["down", "--machine", "lever-old"]);
    assert_eq!(down.code, 0, "{}", down.stderr);
    assert!(
        down.stdout.contains("orb delete -f lever-old"),
        "{}",
        down.stdout
    );
    // No broker runs: doctor fails, but it looked inside lever-old.
    let doctor = inst.lever(&["doctor", "--machine", "lever-old"]);
    assert_eq!(doctor.code, 1, "{}", doctor.stdout);
    let log = inst.orb_log();
    assert!(log.contains("delete -f lever-old\n"), "{log}");
    assert!(
        log.lines().any(|l| l.starts_with("-m lever-old -u root ")),
        "{log}"
    );
    assert!(!log.contains("lever-t"), "{log}");
    // Without it, the config's machine.
    assert_eq!(inst.lever(&["down"]).code, 0);
    assert!(inst.orb_log().contains("delete -f lever-t\n"));
    // A name that could read as an option is a usage error.
    for bad in ["-rf", "a b", ""] {
        assert_eq!(inst.lever(&["down", "--machine", bad]).code, 2, "{bad:?}");
        assert_eq!(inst.lever(&["doctor", "--machine", bad]).code, 2, "{bad:?}");
    }
}

#[test]
fn admin_finds_the_broker_through_lever_yaml_in_the_current_directory() {
    let inst = Instance::new(DEFAULT_AGENTS, "");
    let _b = inst.start();
    let admin = |args: &[&str], cwd: &Path| {
        run(Command::new(lever_bin())
            .args(args)
            .current_dir(cwd)
            .env("HOME", cwd)
            .env_remove("LEVER_ADMIN_URL"))
    };
    // No -c, no --admin: ./lever.yaml's admin port (not 8444).
    let out = admin(&["admin", "epoch"], inst.dir.path());
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["epoch"], 1, "{v}");
    // A broken ./lever.yaml is an error, never a fall back to 8444.
    let broken = TempDir::new("admin-broken");
    broken.write("lever.yaml", "name: [\n", 0o644);
    let out = admin(&["admin", "epoch"], broken.path());
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stderr.contains("lever.yaml:1:"), "{}", out.stderr);
    // Parent directories are never searched: from the tree, the default.
    let child = inst.dir.join("ws");
    let out = admin(&["admin", "epoch"], &child);
    if out.code != 0 {
        assert!(out.stderr.contains("127.0.0.1:8444"), "{}", out.stderr);
    }
    assert!(
        !out.stderr.contains(&inst.admin_port.to_string()),
        "{}",
        out.stderr
    );
    let help = admin(&["admin", "--help"], &child);
    assert!(help.stdout.contains("./lever.yaml"), "{}", help.stdout);
}

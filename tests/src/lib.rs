//! Helpers for Lever's end-to-end tests: temporary instance directories,
//! running the real `lever` binary, and reading its problem lines.
//!
//! Nothing here imitates a Lever component: tests drive the built binary.

#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The workspace root (where `Cargo.toml` and `examples/` live).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `lever` binary of this build: `target/<profile>/lever`.
///
/// `cargo test --workspace` builds it before any test runs, because the
/// provision crate's own integration tests need it (see
/// `provision/tests/cli.rs`). Run the suite that way: `cargo test -p
/// lever-tests` alone may find an old binary or none.
pub fn lever_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/lever
    let bin = exe.parent().unwrap().parent().unwrap().join("lever");
    assert!(
        bin.exists(),
        "no lever binary at {}: run the suite with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// The `lever-tool-db` binary of this build, beside `lever` (built by
/// `cargo test --workspace` for the tool crate's own tests).
pub fn tool_db_bin() -> PathBuf {
    let bin = lever_bin().with_file_name("lever-tool-db");
    assert!(
        bin.exists(),
        "no lever-tool-db binary at {}: run the suite with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "lever-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        // Real path, so tests can compare against what lever prints.
        let path = path.canonicalize().unwrap();
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Writes `rel` (creating parents) with `mode`.
    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>, mode: u32) -> PathBuf {
        let p = self.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, contents).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.join(rel);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn symlink(&self, target: impl AsRef<Path>, rel: &str) -> PathBuf {
        let p = self.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::os::unix::fs::symlink(target, &p).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `lever ARGS` in `cwd` with `HOME` set to `home` (so `~/` in a
/// config never reaches the real home). Bounded: killed after 60 s.
pub fn lever(args: &[&str], cwd: &Path, home: &Path) -> Output {
    run(Command::new(lever_bin())
        .args(args)
        .current_dir(cwd)
        .env("HOME", home))
}

/// Runs a command to completion with a 60 s bound.
pub fn run(cmd: &mut Command) -> Output {
    run_with_input(cmd, None)
}

/// Runs a command to completion with a 60 s bound, writing `input` to its
/// stdin first (stdin is empty without it).
pub fn run_with_input(cmd: &mut Command, input: Option<&[u8]>) -> Output {
    use std::io::Write as _;
    let stdin = match input {
        Some(_) => std::process::Stdio::piped(),
        None => std::process::Stdio::null(),
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let (Some(data), Some(mut w)) = (input, child.stdin.take()) {
        // From a thread, so a child that writes before reading everything
        // cannot block us past the deadline; dropping the handle closes the
        // pipe and the child sees the end.
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(out) => {
                let out = out.unwrap();
                return Output {
                    code: out.status.code().unwrap_or(-1),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                };
            }
            Err(_) if Instant::now() > deadline => {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                panic!("command did not finish within 60 s: {cmd:?}");
            }
            Err(_) => {}
        }
    }
}

/// One `FILE:LINE:COL: key.path: message` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProblemLine {
    pub file: String,
    pub line: u32,
    pub col: u32,
    pub path: String,
    pub message: String,
    pub warning: bool,
}

/// Parses every problem line of `text` whose file is `file`; panics on a
/// line that starts with `file:` but does not have the contract's shape.
pub fn problems(text: &str, file: &str) -> Vec<ProblemLine> {
    let prefix = format!("{file}:");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| {
            let rest = &l[prefix.len()..];
            let mut it = rest.splitn(3, ':');
            let line = it.next().and_then(|s| s.parse().ok());
            let col = it.next().and_then(|s| s.parse().ok());
            let tail = it.next().and_then(|s| s.strip_prefix(' '));
            let (Some(line), Some(col), Some(tail)) = (line, col, tail) else {
                panic!("not a FILE:LINE:COL: key.path: message line: {l:?}");
            };
            let (path, message) = tail
                .split_once(": ")
                .unwrap_or_else(|| panic!("no key path in {l:?}"));
            let (warning, message) = match message.strip_prefix("warning: ") {
                Some(m) => (true, m),
                None => (false, message),
            };
            ProblemLine {
                file: file.to_owned(),
                line,
                col,
                path: path.to_owned(),
                message: message.to_owned(),
                warning,
            }
        })
        .collect()
}

/// Only the errors among `problems`.
pub fn errors(text: &str, file: &str) -> Vec<ProblemLine> {
    problems(text, file)
        .into_iter()
        .filter(|p| !p.warning)
        .collect()
}
pub mod broker;

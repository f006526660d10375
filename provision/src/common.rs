//! Helpers shared by the CLI commands.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use lever_policy::config::{self, Config, Env};

/// Loads and validates the config, printing every problem on failure.
pub(crate) fn load_config(explicit: Option<PathBuf>) -> Result<Config, ExitCode> {
    let path = crate::config_path(explicit);
    match config::load(&path, &Env::from_process()) {
        Ok(loaded) => {
            for w in loaded.report.warnings() {
                eprintln!("{}", loaded.report.line(w));
            }
            Ok(loaded.config)
        }
        Err(report) => {
            eprint!("{report}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// A multi-threaded runtime for one command.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(&format!("cannot start the runtime: {e}")))
}

/// Prints `lever: MESSAGE` to stderr and returns exit status 1.
pub(crate) fn fail(message: &str) -> ExitCode {
    eprintln!("lever: {message}");
    ExitCode::FAILURE
}

/// Writes a file atomically with `mode` (0600 for anything secret).
pub(crate) fn write_private(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Creates `dir` and any missing parent, each 0700 (DESIGN §6: the state
/// dir is 0700). A directory that exists already is left as it is: the
/// config's validation has checked the state dir's mode and owner.
pub(crate) fn private_dir(dir: &Path) -> Result<(), String> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && a.symlink_metadata().is_err())
        .collect();
    for d in missing.into_iter().rev() {
        // Created 0700 (less under the umask), never wider for a moment.
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", d.display())),
        }
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    Ok(())
}

/// Opens `path` for writing, 0600 (a looser existing file is tightened),
/// never through a symlink, creating its directory 0700 first. `append`
/// keeps what is there; otherwise it is truncated.
pub(crate) fn private_file(path: &Path, append: bool) -> Result<std::fs::File, String> {
    use rustix::fs::{Mode, OFlags};
    if let Some(d) = path.parent() {
        private_dir(d)?;
    }
    let how = if append {
        OFlags::APPEND
    } else {
        OFlags::TRUNC
    };
    let fd = rustix::fs::open(
        path,
        OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC | how,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| format!("{}: {e} (a symlink there is refused)", path.display()))?;
    let f = std::fs::File::from(fd);
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(f)
}

/// Reads a secret-ish input: the value itself, or `-` for stdin.
pub(crate) fn read_value_or_stdin(v: &str) -> std::io::Result<String> {
    if v == "-" {
        let mut s = String::new();
        std::io::stdin().read_line(&mut s)?;
        Ok(s.trim().to_owned())
    } else {
        Ok(v.trim().to_owned())
    }
}

/// Tests: writes `yaml` as `DIR/lever.yaml` (with a 0600 key file and the
/// tree `ws`) and loads it.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn test_config(dir: &Path, yaml: &str) -> Config {
    std::fs::create_dir_all(dir.join("ws")).unwrap();
    std::fs::write(dir.join("key"), "k").unwrap();
    std::fs::set_permissions(dir.join("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(dir.join("lever.yaml"), yaml).unwrap();
    config::load(&dir.join("lever.yaml"), &Env::from_process())
        .unwrap()
        .config
}

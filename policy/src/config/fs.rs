//! File-system rules: confined paths, symlinks that leave the instance
//! root, and the checks on key and credential files. Read-only: nothing
//! here creates, changes or reads the contents of a secret.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Largest key or credential file accepted (a Console key is ~110 bytes).
pub const SECRET_FILE_MAX: u64 = 16 * 1024;
/// Largest prompt file accepted.
pub const PROMPT_FILE_MAX: u64 = 1024 * 1024;
/// Largest CA bundle accepted.
pub const CA_FILE_MAX: u64 = 1024 * 1024;

/// Who is asking and where `~` is.
#[derive(Clone, Debug)]
pub struct Env {
    pub home: Option<PathBuf>,
    pub uid: u32,
}

impl Env {
    pub fn from_process() -> Env {
        Env {
            home: std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(PathBuf::from),
            uid: rustix::process::geteuid().as_raw(),
        }
    }
}

/// Resolves a path as written in lever.yaml: `~/` against `$HOME`, relative
/// paths against the config file's directory.
pub fn resolve(raw: &str, base: &Path, env: &Env) -> Result<PathBuf, String> {
    if raw.is_empty() {
        return Err("the path is empty".to_owned());
    }
    if raw.contains('\0') {
        return Err("the path contains a NUL byte".to_owned());
    }
    if raw == "~" || raw.starts_with("~/") {
        let home = env
            .home
            .as_ref()
            .ok_or_else(|| "`~` used but $HOME is not set".to_owned())?;
        return Ok(home.join(raw.trim_start_matches('~').trim_start_matches('/')));
    }
    if raw.starts_with('~') {
        return Err(format!("{raw:?}: only `~/` (your own home) is expanded"));
    }
    Ok(base.join(raw))
}

/// A relative path that stays where it is put: not absolute, no `..`, no
/// `~`, not empty. Returns it with `.` components removed.
pub fn confined_relative(raw: &str) -> Result<PathBuf, String> {
    if raw.is_empty() {
        return Err("the path is empty".to_owned());
    }
    if raw.contains('\0') {
        return Err("the path contains a NUL byte".to_owned());
    }
    if raw.starts_with('~') {
        return Err(format!(
            "{raw:?} must be relative to the instance root, not to `~`"
        ));
    }
    let p = Path::new(raw);
    if p.is_absolute() {
        return Err(format!("{raw:?} must be a relative path, not absolute"));
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(format!("{raw:?} must not contain `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("{raw:?} must be a relative path"));
            }
        }
    }
    Ok(out)
}

/// The real location of `p`: its longest existing ancestor canonicalized
/// (symlinks followed), with the rest appended. A symlink that points
/// nowhere is an error: it could be made to point anywhere later.
pub fn real_path(p: &Path) -> Result<PathBuf, String> {
    let mut existing = p.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(c) => {
                let mut out = c;
                for r in rest.iter().rev() {
                    if r == ".." {
                        out.pop();
                    } else if r != "." {
                        out.push(r);
                    }
                }
                return Ok(out);
            }
            Err(e) => {
                if existing.symlink_metadata().is_ok() {
                    return Err(format!(
                        "{} is a symlink that cannot be followed ({e})",
                        existing.display()
                    ));
                }
                match (existing.file_name(), existing.parent()) {
                    (Some(name), Some(parent)) => {
                        rest.push(name.to_owned());
                        existing = if parent.as_os_str().is_empty() {
                            PathBuf::from(".")
                        } else {
                            parent.to_path_buf()
                        };
                    }
                    _ => return Ok(p.to_path_buf()),
                }
            }
        }
    }
}

/// Whether `inner` is `outer` or below it (both real paths).
pub fn within(inner: &Path, outer: &Path) -> bool {
    inner.starts_with(outer)
}

/// The first place in `tree` (a real path) that resolving `p` passes
/// through: a directory on the way, a symlink on the way, or a hop of a
/// symlink's target. A path that passes through the tree is the agents' to
/// redirect (they can plant or repoint a symlink there before the config is
/// next loaded), whatever it resolves to today. `p` is followed one
/// component and one symlink at a time, as the kernel does.
pub fn through_tree(p: &Path, tree: &Path) -> Option<PathBuf> {
    use std::ffi::OsString;
    // What is left to walk, last component first.
    let mut todo: Vec<OsString> = Vec::new();
    let push = |todo: &mut Vec<OsString>, p: &Path| {
        for c in p.components().rev() {
            match c {
                Component::Normal(n) => todo.push(n.to_owned()),
                Component::ParentDir => todo.push("..".into()),
                _ => {}
            }
        }
    };
    // `cur` is free of symlinks: each of its components was checked.
    let mut cur = if p.is_absolute() {
        PathBuf::from("/")
    } else {
        std::env::current_dir().ok()?
    };
    push(&mut todo, p);
    // The tree by identity as well as by name: a case-insensitive file
    // system, a firmlink or a bind mount can spell it otherwise.
    let id = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
    };
    let tree_id = id(tree);
    let mut hops = 0;
    while let Some(name) = todo.pop() {
        if name == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&name);
        if within(&next, tree) || (tree_id.is_some() && id(&next) == tree_id) {
            return Some(next);
        }
        match std::fs::symlink_metadata(&next) {
            Ok(md) if md.file_type().is_symlink() => {
                hops += 1;
                // A loop: resolving fails elsewhere with its own error.
                let target = std::fs::read_link(&next).ok().filter(|_| hops <= 40)?;
                if target.is_absolute() {
                    cur = PathBuf::from("/");
                }
                push(&mut todo, &target);
            }
            _ => cur = next,
        }
    }
    None
}

/// `root.join(rel)` followed through symlinks must stay strictly inside
/// `root_real`. Returns the real path.
pub fn confined_real(root_real: &Path, rel: &Path) -> Result<PathBuf, String> {
    let real = real_path(&root_real.join(rel))?;
    if !within(&real, root_real) {
        return Err(format!(
            "resolves to {} through a symlink, outside the instance root {}",
            real.display(),
            root_real.display()
        ));
    }
    Ok(real)
}

fn not_found(path: &Path, e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::NotFound {
        format!("{} does not exist", path.display())
    } else {
        format!("{} cannot be read: {e}", path.display())
    }
}

/// A regular file (after following symlinks) of at most `max` bytes.
pub fn regular_file(path: &Path, max: u64) -> Result<std::fs::Metadata, String> {
    let md = std::fs::metadata(path).map_err(|e| not_found(path, &e))?;
    if !md.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if md.len() > max {
        return Err(format!(
            "{} is {} bytes; the limit is {max}",
            path.display(),
            md.len()
        ));
    }
    Ok(md)
}

/// A file holding a secret: regular, non-empty, at most
/// [`SECRET_FILE_MAX`] bytes, mode 0600 or stricter, owned by the caller.
pub fn secret_file(path: &Path, env: &Env) -> Result<(), String> {
    let md = regular_file(path, SECRET_FILE_MAX)?;
    if md.len() == 0 {
        return Err(format!("{} is empty", path.display()));
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & !0o600 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}; a secret must be 0600 or stricter (chmod 600 {})",
            path.display(),
            path.display()
        ));
    }
    if md.uid() != env.uid {
        return Err(format!(
            "{} is owned by uid {}, not by you (uid {})",
            path.display(),
            md.uid(),
            env.uid
        ));
    }
    Ok(())
}

/// A file others must not be able to rewrite (config, prompt, CA bundle):
/// not group- or world-writable, owned by the caller or root.
pub fn not_writable_by_others(
    path: &Path,
    md: &std::fs::Metadata,
    env: &Env,
) -> Result<(), String> {
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}: others can rewrite it (chmod go-w {})",
            path.display(),
            path.display()
        ));
    }
    if md.uid() != env.uid && md.uid() != 0 {
        return Err(format!(
            "{} is owned by uid {}, neither you (uid {}) nor root",
            path.display(),
            md.uid(),
            env.uid
        ));
    }
    Ok(())
}

/// An existing state directory: a real directory (not a symlink), 0700 or
/// stricter, owned by the caller. A missing one is fine: the broker creates it.
pub fn state_dir(path: &Path, env: &Env) -> Result<(), String> {
    let md = match path.symlink_metadata() {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(not_found(path, &e)),
    };
    if md.file_type().is_symlink() {
        return Err(format!(
            "{} is a symlink; the state dir must be a real directory",
            path.display()
        ));
    }
    if !md.is_dir() {
        return Err(format!("{} is not a directory", path.display()));
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}; the state dir must be 0700 (chmod 700 {})",
            path.display(),
            path.display()
        ));
    }
    if md.uid() != env.uid {
        return Err(format!(
            "{} is owned by uid {}, not by you (uid {})",
            path.display(),
            md.uid(),
            env.uid
        ));
    }
    Ok(())
}

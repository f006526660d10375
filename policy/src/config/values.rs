//! Parsers for the scalar values of `lever.yaml`: names, durations, image
//! references, URLs and socket addresses. Each returns a one-line reason on
//! failure, phrased for the operator.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// A name that is safe as a machine name, a certificate CN, a Scion slug and
/// a shell token: `^[a-z0-9][a-z0-9-]{0,62}$`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

pub const NAME_RULE: &str =
    "must match ^[a-z0-9][a-z0-9-]{0,62}$ (lowercase letters, digits and '-', at most 63)";

impl Name {
    pub fn parse(s: &str) -> Result<Name, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && b == b'-'));
        if ok {
            Ok(Name(s.to_owned()))
        } else {
            Err(format!("{s:?} {NAME_RULE}"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A tool operation's name: the MCP tool name its backend answers to,
/// `^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$` (`read`, `read_file`, `get-sum`,
/// `listDir`). Agents see it as `TOOL_OP`: a tool name is a [`Name`] and
/// never holds `_`, so the first `_` of `TOOL_OP` always ends the tool,
/// whatever the operation's name holds; at most 64 characters keeps
/// `TOOL_OP` within MCP's 128.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpName(String);

pub const OP_NAME_RULE: &str =
    "must match ^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$ (ASCII letters, digits, '_' and '-', at most 64)";

impl OpName {
    pub fn parse(s: &str) -> Result<OpName, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && b == b'-'));
        if ok {
            Ok(OpName(s.to_owned()))
        } else {
            Err(format!("{s:?} {OP_NAME_RULE}"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OpName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for OpName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// `90s`, `30m`, `24h`, `7d`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (write e.g. 90s, 30m, 24h, 7d, 1h30m)");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total = total.saturating_add(unit);
    }
    Ok(total)
}

/// Formats a duration the way it is written in lever.yaml.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 {
        return format!("{}ms", d.as_millis());
    }
    match s {
        0 => "0s".to_owned(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A container image reference: `[registry[:port]/]path[:tag][@sha256:hex]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// As written.
    pub reference: String,
    /// Registry and path, without tag or digest.
    pub name: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, String> {
        let bad = |why: &str| format!("{s:?} is not a valid image reference: {why}");
        if s.is_empty() || s.len() > 512 {
            return Err(bad("empty or longer than 512 characters"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("digest must be sha256:<64 hex>"))?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                {
                    return Err(bad("digest must be sha256:<64 lowercase hex>"));
                }
                (r, Some(d.to_owned()))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (&rest[..i], Some(&rest[i + 1..]))
            }
            None => (rest, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes().enumerate().all(|(i, b)| {
                    b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
                });
            if !ok {
                return Err(bad("tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
            }
        }
        check_repository(name).map_err(|why| bad(&why))?;
        Ok(ImageRef {
            reference: s.to_owned(),
            name: name.to_owned(),
            tag: tag.map(str::to_owned),
            digest,
        })
    }

    /// Whether `registry` (a registry host and/or namespace prefix) allows
    /// this image: equal to it, or a prefix followed by `/` (whole path
    /// components only: `scionlocal` allows `scionlocal/x`, not `scionlocalevil/x`).
    pub fn allowed_by(&self, registry: &str) -> bool {
        self.name == registry
            || self
                .name
                .strip_prefix(registry)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

/// Checks `[host[:port]/]component(/component)*`, an image's name.
pub fn check_repository(name: &str) -> Result<(), String> {
    check_name_components(name, false)
}

/// Checks an entry of `security.allowed_image_registries`: a registry host
/// and/or namespace prefix, `host[:port][/component...]` or
/// `component[/component...]`. Unlike in an image name, a lone first
/// component that looks like a host (`localhost`, `localhost:5000`,
/// `registry.example.com:5000`) is a registry host. No trailing `/`.
pub fn check_registry_prefix(entry: &str) -> Result<(), String> {
    check_name_components(entry, true)
}

/// The first component is a registry host if it contains `.` or `:` or
/// is `localhost`, and there is a component after it (or `bare_host`).
fn check_name_components(name: &str, bare_host: bool) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty repository name".to_owned());
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    let first = parts[0];
    if (parts.len() > 1 || bare_host)
        && (first.contains('.') || first.contains(':') || first == "localhost")
    {
        let (host, port) = match first.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (first, None),
        };
        let host_ok = !host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !host_ok {
            return Err(format!("registry host {host:?} is not a hostname"));
        }
        if let Some(p) = port
            && p.parse::<u16>().map_or(true, |p| p == 0)
        {
            return Err(format!("registry port {p:?} is not a port"));
        }
        parts.remove(0);
    }
    for c in parts {
        if !path_component_ok(c) {
            return Err(format!(
                "path component {c:?} must be lowercase letters and digits separated by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

fn path_component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_lower_alnum(b[0]) || !is_lower_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_lower_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or one or more '-'.
        let start = i;
        while i < b.len() && !is_lower_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// An `http(s)://host[:port][/base]` URL, parsed strictly: no user info, no
/// query, no fragment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub https: bool,
    /// Host as written (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// `""` or `/a/b` (no trailing slash).
    pub base_path: String,
}

impl HttpUrl {
    pub fn parse(s: &str) -> Result<HttpUrl, String> {
        let bad = |why: &str| format!("{s:?} is not a usable URL: {why}");
        let (https, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("must start with https:// or http://"));
        };
        if s.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(bad("contains spaces or control characters"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(bad("credentials in the URL are not allowed"));
        }
        if path.contains(['?', '#', '%', '\\']) {
            return Err(bad("no query, fragment, escapes or backslashes allowed"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("bad IPv6 address"))?;
            (h.to_owned(), after.strip_prefix(':'))
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (authority.to_owned(), None),
            }
        };
        let host_ok = !host.is_empty()
            && (host.contains(':')
                || host.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                }));
        if !host_ok {
            return Err(bad("missing or invalid host"));
        }
        let port = match port {
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(bad("invalid port")),
            },
            None if https => 443,
            None => 80,
        };
        let trimmed = path.trim_end_matches('/');
        for seg in trimmed.split('/').skip(1) {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(bad("the path has an empty, '.' or '..' segment"));
            }
        }
        Ok(HttpUrl {
            https,
            host: host.to_ascii_lowercase(),
            port,
            base_path: trimmed.to_owned(),
        })
    }

    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        let default = if self.https { 443 } else { 80 };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]", self.host)?;
        } else {
            write!(f, "{scheme}://{}", self.host)?;
        }
        if self.port != default {
            write!(f, ":{}", self.port)?;
        }
        f.write_str(&self.base_path)
    }
}

/// An IP address; `localhost` is accepted as 127.0.0.1.
pub fn parse_ip(s: &str) -> Result<IpAddr, String> {
    if s == "localhost" {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    s.parse().map_err(|_| format!("{s:?} is not an IP address"))
}

/// A loopback `IP:PORT` (`127.0.0.1:3201`, `[::1]:3201`, `localhost:3201`).
pub fn parse_loopback_addr(s: &str) -> Result<SocketAddr, String> {
    let addr = match s.strip_prefix("localhost:") {
        Some(p) => format!("127.0.0.1:{p}").parse::<SocketAddr>(),
        None => s.parse::<SocketAddr>(),
    }
    .map_err(|_| format!("{s:?} is not an address of the form IP:PORT"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{s:?} is not a loopback address (127.0.0.0/8 or [::1])"
        ));
    }
    if addr.port() == 0 {
        return Err(format!("{s:?} has port 0"));
    }
    Ok(addr)
}

/// A Scion version: a commit (7 to 40 hex digits) or a `vX.Y.Z` module
/// version. The value reaches a Go command line, so nothing else is allowed.
pub fn check_scion_version(s: &str) -> Result<(), String> {
    let commit = (7..=40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
    let tag = s.strip_prefix('v').is_some_and(|r| {
        r.len() <= 100
            && r.as_bytes().first().is_some_and(u8::is_ascii_digit)
            && r.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".+-".contains(&b))
    });
    if commit || tag {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is neither a commit hash (7-40 hex digits) nor a module version (vX.Y.Z)"
        ))
    }
}

#[cfg(test)]
mod tests;

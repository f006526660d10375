use super::*;

#[test]
fn names() {
    for ok in ["a", "myapp", "lever-1", "0x", &"a".repeat(63)] {
        assert!(Name::parse(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "-a",
        "A",
        "a_b",
        "a.b",
        "a b",
        "é",
        &"a".repeat(64),
        "a\n",
    ] {
        assert!(Name::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn operation_names_are_what_mcp_servers_call_their_tools() {
    for ok in [
        "read",
        "read_file",
        "get-sum",
        "listDir",
        "_private",
        "a1",
        &"a".repeat(64),
    ] {
        assert!(OpName::parse(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "-x",
        "read file",
        "read.file",
        "read/file",
        "é",
        "a\n",
        &"a".repeat(65),
    ] {
        assert!(OpName::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    for bad in [
        "",
        "h",
        "10",
        "10x",
        "-1s",
        "1.5h",
        "1h 30m",
        "99999999999999s",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
    for d in ["90s", "30m", "2h", "7d", "250ms"] {
        assert_eq!(format_duration(parse_duration(d).unwrap()), d);
    }
}

#[test]
fn image_refs() {
    let i = ImageRef::parse("scionlocal/lever-claude:latest").unwrap();
    assert_eq!(
        (i.name.as_str(), i.tag.as_deref()),
        ("scionlocal/lever-claude", Some("latest"))
    );
    let d = format!("ghcr.io:5000/org/img@sha256:{}", "a".repeat(64));
    let i = ImageRef::parse(&d).unwrap();
    assert_eq!(i.name, "ghcr.io:5000/org/img");
    assert!(i.digest.is_some() && i.tag.is_none());
    assert!(ImageRef::parse("localhost/x_y__z.w-1:v1.2").is_ok());
    for bad in [
        "",
        "UPPER/x",
        "x;rm",
        "x:",
        "x:-tag",
        "x@sha256:abc",
        "a//b",
        "a/b/",
        "x y",
        "$(id)",
        "x@md5:0000",
    ] {
        assert!(ImageRef::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn registries_match_on_whole_components() {
    let i = ImageRef::parse("scionlocal/x:1").unwrap();
    assert!(i.allowed_by("scionlocal"));
    assert!(
        !ImageRef::parse("scionlocalevil/x:1")
            .unwrap()
            .allowed_by("scionlocal")
    );
    assert!(
        ImageRef::parse("ghcr.io/org/x")
            .unwrap()
            .allowed_by("ghcr.io/org")
    );
    assert!(
        !ImageRef::parse("ghcr.io/organisation/x")
            .unwrap()
            .allowed_by("ghcr.io/org")
    );
    assert!(
        ImageRef::parse("scionlocal")
            .unwrap()
            .allowed_by("scionlocal")
    );
}

#[test]
fn registry_entries_may_be_a_host_with_a_port() {
    for ok in [
        "scionlocal",
        "ghcr.io/myorg",
        "localhost",
        "localhost:5000",
        "registry.example.com",
        "registry.example.com:5000",
        "registry.example.com:5000/team/sub",
    ] {
        assert!(check_registry_prefix(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "localhost:0",
        "localhost:99999",
        "localhost:",
        ":5000",
        "localhost:5000:1",
        "bad_host:5000",
        "UPPER",
        "ghcr.io/Org",
        "a//b",
        "x y",
    ] {
        assert!(check_registry_prefix(bad).is_err(), "{bad:?}");
    }
    // Still whole path components, the port included.
    let img = |s: &str| ImageRef::parse(s).unwrap();
    assert!(img("localhost:5000/x:1").allowed_by("localhost:5000"));
    assert!(img("localhost:5000/team/x").allowed_by("localhost:5000/team"));
    assert!(!img("localhost:50001/x").allowed_by("localhost:5000"));
    assert!(!img("localhost/x").allowed_by("localhost:5000"));
    assert!(!img("registry.example.com:50000/x").allowed_by("registry.example.com:5000"));
    // `localhost:5000` as an image is the image `localhost`, tag 5000.
    assert!(!img("localhost:5000").allowed_by("localhost:5000"));
}

#[test]
fn urls() {
    let u = HttpUrl::parse("https://api.anthropic.com").unwrap();
    assert_eq!((u.https, u.port, u.base_path.as_str()), (true, 443, ""));
    assert_eq!(u.to_string(), "https://api.anthropic.com");
    let u = HttpUrl::parse("http://127.0.0.1:9000/anthropic/").unwrap();
    assert!(u.is_loopback() && !u.https);
    assert_eq!(u.to_string(), "http://127.0.0.1:9000/anthropic");
    assert!(HttpUrl::parse("http://[::1]:80").unwrap().is_loopback());
    assert!(HttpUrl::parse("http://localhost:1").unwrap().is_loopback());
    assert!(
        !HttpUrl::parse("http://127.0.0.1.evil.com")
            .unwrap()
            .is_loopback()
    );
    for bad in [
        "api.anthropic.com",
        "https://",
        "https://u:p@h",
        "https://h/?q",
        "https://h/#f",
        "https://h/a/../b",
        "https://h/%2e%2e",
        "https://h:0",
        "https://h:99999",
        "https://h x",
        "ftp://h",
        "https://h\\@evil",
    ] {
        assert!(HttpUrl::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn addresses() {
    assert!(parse_loopback_addr("127.0.0.1:3201").is_ok());
    assert!(parse_loopback_addr("127.9.9.9:1").is_ok());
    assert!(parse_loopback_addr("[::1]:3201").is_ok());
    assert!(parse_loopback_addr("localhost:3201").is_ok());
    for bad in [
        "0.0.0.0:1",
        "10.0.0.1:1",
        "[::]:1",
        "127.0.0.1",
        "127.0.0.1:0",
        "host:1",
    ] {
        assert!(parse_loopback_addr(bad).is_err(), "{bad}");
    }
}

#[test]
fn scion_versions() {
    for ok in [
        "666333f9",
        "abcdef1234567",
        "v1.2.3",
        "v0.0.0-20240101000000-abcdef123456",
    ] {
        assert!(check_scion_version(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "abc",
        "main",
        "v",
        "vx",
        "v1;rm",
        "666333f9 ",
        "$(x)",
        &"a".repeat(41),
    ] {
        assert!(check_scion_version(bad).is_err(), "{bad:?}");
    }
}

//! The tool on its own, as something that got past the broker would reach
//! it: over stdio and over HTTP, it still reads only its listed tables.
//! (Building this test is also what has `cargo test --workspace` build the
//! `lever-tool-db` binary the end-to-end tests start.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_lever-tool-db");

/// The scratch directory holding a test's database, removed when the test ends.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn demo_db(tag: &str) -> (Scratch, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("lever-tool-db-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("demo.db");
    let st = Command::new(BIN)
        .args(["--init-demo", "--database"])
        .arg(&db)
        .status()
        .unwrap();
    assert!(st.success());
    (Scratch(dir), db)
}

fn call(table: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
           "params": {"name": "read", "arguments": {"table": table}}})
}

#[test]
fn over_stdio_only_listed_tables_are_readable() {
    let (_scratch, db) = demo_db("stdio");
    let mut child = Command::new(BIN)
        .args(["--stdio", "--tables", "users", "--database"])
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut ask = |msg: Value| -> Value {
        writeln!(stdin, "{msg}").unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };
    let init = ask(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                          "params": {"protocolVersion": "2025-06-18", "capabilities": {}}}));
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
    let list = ask(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}));
    assert_eq!(
        list["result"]["tools"][0]["inputSchema"]["properties"]["table"]["enum"],
        json!(["users"])
    );
    let ok = ask(call("users"));
    assert_eq!(ok["result"]["isError"], false, "{ok}");
    assert_eq!(
        ok["result"]["structuredContent"]["rows"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    for t in ["orders", "secrets", "sqlite_master", "users --"] {
        let r = ask(call(t));
        assert_eq!(r["result"]["isError"], true, "{t}: {r}");
        assert!(!r.to_string().contains("launch code"), "{r}");
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn over_http_only_listed_tables_are_readable_and_only_on_loopback() {
    let (_scratch, db) = demo_db("http");
    let refused = Command::new(BIN)
        .args([
            "-backend",
            "0.0.0.0:3999",
            "--tables",
            "users",
            "--database",
        ])
        .arg(&db)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("loopback"));

    // Port 0: the tool binds a free port itself and names it, so no other
    // process can take the port between a probe and the tool's bind.
    let mut child = Command::new(BIN)
        .args([
            "-backend",
            "127.0.0.1:0",
            "--tables",
            "users,orders",
            "--database",
        ])
        .arg(&db)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kept open to the end: the tool logs each read to stderr.
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut banner = String::new();
    log.read_line(&mut banner).unwrap();
    let addr: std::net::SocketAddr = banner
        .trim()
        .strip_prefix("lever-tool-db: serving MCP on http://")
        .and_then(|a| a.strip_suffix("/mcp"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in the tool's banner: {banner:?}"));
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    let post = |msg: &Value| -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        let body = msg.to_string();
        let request = format!(
            "POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    assert!(post(&call("orders")).contains("bombe"));
    let secret = post(&call("secrets"));
    assert!(
        secret.contains("\"isError\":true") && !secret.contains("launch code"),
        "{secret}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
